//! f16 sampling (`Pipeline::sampling_dtype`, `draft --sampling-dtype f16`): the UNet computing
//! in f16 on the steps no gradient goes through, with f16 weights.
//!
//! - Against diffusers' float16 pipeline (`torch_dtype=torch.float16`, every weight and
//!   activation in f16; `tests/fixtures/make_fp16_fixtures.py`): one UNet call and a whole
//!   10-step DDIM + CFG run, on sd1-tiny and sd2-tiny (v-prediction, `upcast_attention`). The
//!   bounds are stated beside diffusers' own float16-vs-float32 distance, which the test prints.
//! - Training: DRaFT-1 and DRaFT-LV gradients with the sampling chain in f16 against the same
//!   evaluation in f32, and full DRaFT (every step back-propagated: nothing runs in f16)
//!   unchanged.
//! - Why the back-propagated part stays f32: the reward's gradient at the decoded images is
//!   mostly below f16's smallest normal number.

mod common;

use burn::prelude::*;
use burn::tensor::{DType, FloatDType};
use common::{LORA_PROMPTS, devices, fixtures, lora_gradients, perturbed_lora, read_model, values};
use draft_core::model::lora::LoraTarget;
use draft_core::model::pipeline::{LoraSetup, SampleOptions, to_nhwc};
use draft_core::model::weights::Weights;
use draft_core::noise::NoiseRng;
use draft_core::reward::builtin::{RewardOptions, WeightedReward};
use draft_core::train::engine::Method;
use draft_core::{ModelFiles, Pipeline};

/// max |a − b|.
fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// ‖a − b‖ / ‖b‖.
fn l2_rel(a: &[f32], b: &[f32]) -> f32 {
    let d: f32 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
    let n: f32 = b.iter().map(|y| y * y).sum();
    (d / n.max(1e-30)).sqrt()
}

fn f32_values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    values(t.cast(FloatDType::F32)).0
}

struct References {
    model: ModelFiles,
    f32: Vec<u8>,
    f16: Vec<u8>,
    json: serde_json::Value,
}

impl References {
    fn load(name: &str) -> Self {
        let dir = fixtures().join(name);
        Self {
            model: read_model(&dir),
            f32: std::fs::read(dir.join("reference.safetensors")).unwrap(),
            f16: std::fs::read(fixtures().join("fp16").join(format!("{name}.safetensors")))
                .unwrap(),
            json: serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap())
                .unwrap(),
        }
    }

    fn f32(&self) -> Weights<'_> {
        Weights::from_bytes("reference.safetensors", &self.f32).unwrap()
    }

    fn f16(&self, key: &str) -> Vec<f32> {
        let w = Weights::from_bytes("fp16.safetensors", &self.f16).unwrap();
        w.read_f32(key).unwrap().0
    }
}

/// Ours in f16 against float32 and against diffusers in float16, with diffusers' own
/// float16-vs-float32 distance `d` beside them: ours must be within `1.5·d` of float32 (as
/// accurate as diffusers' float16, to a margin for other rounding orders) and `2.5·d` of
/// diffusers' float16 (two independent roundings); `floor` is an absolute allowance for values
/// where `d` happens to be tiny.
fn compare(what: &str, ours: &[f32], fp16: &[f32], fp32: &[f32], floor: f32) {
    let ours_fp16 = max_abs(ours, fp16);
    let ours_fp32 = max_abs(ours, fp32);
    let d = max_abs(fp16, fp32);
    let scale = fp32.iter().fold(0f32, |m, v| m.max(v.abs()));
    eprintln!(
        "{what}: max |ours f16 − float32| {ours_fp32:.2e}, |ours f16 − diffusers float16| \
         {ours_fp16:.2e}, |diffusers float16 − float32| {d:.2e} (max |x| {scale:.3})"
    );
    let to_fp32 = (1.5 * d).max(floor);
    let to_fp16 = (2.5 * d).max(floor);
    assert!(
        ours_fp32 <= to_fp32,
        "{what}: {ours_fp32:e} from float32 (limit {to_fp32:e})"
    );
    assert!(
        ours_fp16 <= to_fp16,
        "{what}: {ours_fp16:e} from diffusers' float16 (limit {to_fp16:e})"
    );
}

fn half_pipeline(model: &ModelFiles, device: &Device, lora: &LoraSetup) -> Pipeline {
    let mut pipe = Pipeline::load_with(model, device, lora, FloatDType::F16).unwrap();
    pipe.sampling_dtype = FloatDType::F16;
    pipe
}

fn against_diffusers_float16(name: &str) {
    let r = References::load(name);
    let reference = r.f32();
    for (dev, device) in devices() {
        if !device.supports_dtype(DType::F16) {
            eprintln!("{dev}: no f16 tensors on this device; skipped");
            continue;
        }
        let pipe = half_pipeline(&r.model, &device, &LoraSetup::None);

        // One UNet call in f16 (the sample and the text states cast, as diffusers' test did).
        let x = reference.tensor::<4>("unet_sample", &device).unwrap();
        let ctx = reference
            .tensor::<3>("unet_encoder_hidden_states", &device)
            .unwrap();
        let t = reference.read_f32("unet_timestep").unwrap().0[0];
        let out = pipe
            .unet
            .forward(x.cast(FloatDType::F16), t, ctx.cast(FloatDType::F16));
        assert_eq!(
            out.dtype(),
            DType::F16,
            "the UNet computes in its input's dtype"
        );
        compare(
            &format!("{name}/{dev} unet"),
            &f32_values(out),
            &r.f16("unet_out"),
            &reference.read_f32("unet_out").unwrap().0,
            0.0,
        );

        // Run "a": 10 DDIM steps with CFG 7.5 from the reference noise, decoded.
        let run = &r.json["runs"]["a"];
        let options = SampleOptions {
            prompts: r.json["prompts"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p.as_str().unwrap().to_string())
                .collect(),
            negative_prompt: String::new(),
            steps: run["num_inference_steps"].as_u64().unwrap() as usize,
            guidance: run["guidance_scale"].as_f64().unwrap(),
            eta: 0.0,
            seed: 0,
            size: Default::default(),
        };
        let x_t = reference.tensor::<4>("init_noise", &device).unwrap();
        let latents = pipe.sample_latents(&options, x_t, |_, _| {}).unwrap();
        assert_eq!(latents.dtype(), DType::F32, "the DDIM update stays f32");
        // The latents of these random ε-models grow to ~40 (DDIM divides by √ᾱ): compared
        // relative to their largest value, the images absolutely.
        let scale = reference
            .read_f32("latents_a")
            .unwrap()
            .0
            .iter()
            .fold(0f32, |m, v| m.max(v.abs()));
        let rel = |v: Vec<f32>| v.into_iter().map(|x| x / scale).collect::<Vec<_>>();
        compare(
            &format!("{name}/{dev} latents_a / max |latents|"),
            &rel(f32_values(latents.clone())),
            &rel(r.f16("latents_a")),
            &rel(reference.read_f32("latents_a").unwrap().0),
            0.0,
        );
        compare(
            &format!("{name}/{dev} images_a"),
            &f32_values(to_nhwc(pipe.decode(latents))),
            &r.f16("images_a"),
            &reference.read_f32("images_a").unwrap().0,
            // Images in [0, 1]: f16's spacing near 1 is 4.9e-4.
            2e-3,
        );
    }
}

#[test]
fn sd1_f16_sampling_is_as_close_as_diffusers_float16() {
    against_diffusers_float16("sd1-tiny");
}

#[test]
fn sd2_f16_sampling_is_as_close_as_diffusers_float16() {
    against_diffusers_float16("sd2-tiny");
}

/// DDIM steps of the training evaluations.
const STEPS: usize = 4;

fn gradients(pipe: &Pipeline, method: Method, seed: u64, device: &Device) -> Vec<f32> {
    perturbed_lora(pipe, device);
    let [c, h, w] = pipe.latent_shape(32, 32).unwrap();
    let x_t = NoiseRng::new(seed).randn([2, c, h, w], device);
    lora_gradients(pipe, STEPS, method, x_t)
}

#[test]
fn f16_sampling_chains_keep_the_training_gradients() {
    let model = read_model(&fixtures().join("sd1-tiny"));
    let lora = LoraSetup::Targets(vec![LoraTarget::Attn, LoraTarget::Conv]);
    // What one other noise draw moves the f32 DRaFT-1 gradient by: the scale of the gradient
    // noise that training averages over anyway (device-independent; measured once).
    let other_draw = {
        let device = Device::flex();
        let pipe = Pipeline::load_with(&model, &device, &lora, FloatDType::F16).unwrap();
        l2_rel(
            &gradients(&pipe, Method::DraftK { k: 1 }, 6, &device),
            &gradients(&pipe, Method::DraftK { k: 1 }, 5, &device),
        )
    };
    eprintln!("DRaFT-1 gradients of two noise draws (f32 sampling): ‖Δ‖/‖g‖ = {other_draw:.1e}");
    for (dev, device) in devices() {
        if !device.supports_dtype(DType::F16) {
            eprintln!("{dev}: no f16 tensors on this device; skipped");
            continue;
        }
        let half = half_pipeline(&model, &device, &lora);
        let mut full = Pipeline::load_with(&model, &device, &lora, FloatDType::F16).unwrap();
        full.sampling_dtype = FloatDType::F32;
        for (method, bound) in [
            (Method::DraftK { k: 1 }, 5e-2),
            (Method::DraftLv { n: 2 }, 5e-2),
            // Every step back-propagated: nothing runs in f16, nothing moves.
            (Method::DraftK { k: STEPS }, 0.0),
        ] {
            let g16 = gradients(&half, method, 5, &device);
            let g32 = gradients(&full, method, 5, &device);
            let err = l2_rel(&g16, &g32);
            eprintln!(
                "{dev} {method:?}: gradients with the sampling chain in f16 vs f32: \
                 ‖Δ‖/‖g‖ = {err:.1e}"
            );
            assert!(g32.iter().any(|g| *g != 0.0), "{dev}: zero gradients");
            assert!(err <= bound, "{dev} {method:?}: {err:e} > {bound:e}");
            assert!(
                err <= 0.1 * other_draw,
                "{dev} {method:?}: {err:e} vs {other_draw:e}"
            );
        }
    }
}

#[test]
fn reward_gradients_at_512px_images_are_below_f16_normals() {
    // The loss is a mean over the batch of rewards that pool over the image, so ∂loss/∂pixel
    // shrinks with the pixel count: at SD's 512² this is what back-propagation starts from.
    let device = Device::flex();
    let images = NoiseRng::new(3)
        .randn([2, 3, 512, 512], &device)
        .mul_scalar(0.2)
        .add_scalar(0.5)
        .clamp(0.0, 1.0)
        .autodiff()
        .require_grad();
    let texts: Vec<String> = LORA_PROMPTS.map(String::from).to_vec();
    let normal = half::f16::MIN_POSITIVE.to_f32();
    for spec in ["brightness", "colorfulness", "contrast", "target-color"] {
        let reward = WeightedReward::from_specs(&[spec.into()], &RewardOptions::default()).unwrap();
        let loss = -reward.score(images.clone(), &texts).unwrap().mean();
        let grads = loss.backward();
        let g = values(images.grad(&grads).unwrap()).0;
        let below = g.iter().filter(|v| v.abs() < normal).count() as f32 / g.len() as f32;
        let max = g.iter().fold(0f32, |m, v| m.max(v.abs()));
        eprintln!(
            "{spec}: ∂loss/∂image at 512²: {:.1} % of entries below f16's smallest normal \
             {normal:.1e} (largest {max:.1e})",
            below * 100.0
        );
        assert!(
            below > 0.9,
            "{spec}: only {below} of the gradient entries are below f16's normal range"
        );
    }
}
