//! f16 weights (`Pipeline::load_with(…, FloatDType::F16)`, `draft --weights-dtype f16`): the
//! UNet's, VAE's and text encoder's weight matrices and kernels kept in f16, every layer still
//! computing in f32. On sd1-tiny, against
//! - the f32 pipeline whose weight matrices and kernels were rounded to f16 on disk: the same
//!   arithmetic, so the bounds are the f32 ones (images ≤ 1e-5, gradients ≤ 1e-4 relative);
//! - the f32 pipeline: what the rounding itself costs (the bounds users get, stated in
//!   docs/parity.md).

mod common;

use burn::prelude::*;
use burn::tensor::{DType, FloatDType};
use common::{
    LORA_PROMPTS, devices, fixtures, lora_gradients, perturbed_lora, read_model, rel_err, values,
};
use draft_core::model::lora::LoraTarget;
use draft_core::model::pipeline::{LoraSetup, SampleOptions};
use draft_core::model::weights::{Weights, serialize_f32};
use draft_core::noise::NoiseRng;
use draft_core::train::engine::Method;
use draft_core::{ModelFiles, Pipeline};

/// DDIM steps of the sampling and of the DRaFT-K (K = 2) gradient: few, as lavapipe is slow.
const STEPS: usize = 3;

/// The model with every weight matrix and kernel (`*.weight` of two or more dimensions)
/// rounded to f16 and stored back as f32.
fn rounded(model: &ModelFiles) -> ModelFiles {
    let mut out = ModelFiles::new(model.name.clone());
    for (path, bytes) in &model.files {
        if !path.ends_with(".safetensors") {
            out.insert(path.clone(), bytes.clone());
            continue;
        }
        let w = Weights::from_bytes(path, bytes).unwrap();
        let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
        let tensors = st
            .names()
            .into_iter()
            .map(|name| {
                let (mut v, shape) = w.read_f32(name).unwrap();
                if name.ends_with(".weight") && shape.len() >= 2 {
                    for x in &mut v {
                        *x = half::f16::from_f32(*x).to_f32();
                    }
                }
                (name.to_string(), shape, v)
            })
            .collect::<Vec<_>>();
        out.insert(path.clone(), serialize_f32(&tensors, None).unwrap());
    }
    out
}

struct Run {
    images: Vec<f32>,
    grads: Vec<f32>,
}

fn run(model: &ModelFiles, dtype: FloatDType, device: &Device) -> Run {
    let pipe = Pipeline::load_with(
        model,
        device,
        &LoraSetup::Targets(vec![LoraTarget::Attn]),
        dtype,
    )
    .unwrap();
    perturbed_lora(&pipe, device);
    let prompts: Vec<String> = LORA_PROMPTS.map(String::from).to_vec();
    let [c, h, w] = pipe.latent_shape(32, 32).unwrap();
    let x_t = NoiseRng::new(5).randn([2, c, h, w], device);
    let options = SampleOptions {
        prompts,
        negative_prompt: String::new(),
        steps: STEPS,
        guidance: 7.5,
        eta: 0.0,
        seed: 0,
        size: Default::default(),
    };
    let images = pipe.decode(
        pipe.sample_latents(&options, x_t.clone(), |_, _| {})
            .unwrap(),
    );
    let grads = lora_gradients(&pipe, STEPS, Method::DraftK { k: 2 }, x_t);
    Run {
        images: values(images).0,
        grads,
    }
}

#[test]
fn f16_weights_compute_as_the_rounded_f32_model() {
    let model = read_model(&fixtures().join("sd1-tiny"));
    let rounded_model = rounded(&model);
    for (name, device) in devices() {
        if !device.supports_dtype(DType::F16) {
            eprintln!("{name}: no f16 tensors on this device; skipped");
            continue;
        }
        let f16 = run(&model, FloatDType::F16, &device);
        let same_math = run(&rounded_model, FloatDType::F32, &device);
        let img_same = rel_err(&f16.images, &same_math.images);
        let grad_same = rel_err(&f16.grads, &same_math.grads);
        eprintln!(
            "{name}: f16 weights vs rounded f32: images {img_same:.1e}, gradients {grad_same:.1e} (relative)"
        );
        assert!(
            f16.grads.iter().any(|g| *g != 0.0),
            "{name}: zero gradients"
        );
        assert!(img_same <= 1e-5, "{name}: images {img_same:e}");
        assert!(grad_same <= 1e-4, "{name}: gradients {grad_same:e}");
        // What the rounding costs, once (the f32 run is device-independent to 1e-5).
        if name == "cpu" {
            let f32 = run(&model, FloatDType::F32, &device);
            let img_f32 = rel_err(&f16.images, &f32.images);
            let grad_max = rel_err(&f16.grads, &f32.grads);
            let grad_l2 = l2_rel(&f16.grads, &f32.grads);
            eprintln!(
                "{name}: f16 weights vs f32: images {img_f32:.1e}, gradients {grad_l2:.1e} \
                 (‖Δ‖/‖g‖; largest entry {grad_max:.1e} of the largest)"
            );
            assert!(img_f32 <= 1e-2, "{name}: images vs f32 {img_f32:e}");
            assert!(grad_l2 <= 1e-1, "{name}: gradients vs f32 {grad_l2:e}");
        }
    }
}

/// ‖a − b‖ / ‖b‖.
fn l2_rel(a: &[f32], b: &[f32]) -> f32 {
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        num += ((x - y) as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    (num / den).sqrt() as f32
}

/// The ops behind f16 Linear and Conv2d layers (`draft_core::ops::stored_weight`: the backward keeps
/// the f16 weight, not its f32 cast) against cast-then-op differentiated by Burn: the same
/// outputs, input gradients and — for a tracked f16 weight — weight gradients (in f16).
#[test]
fn stored_weight_ops_have_cast_then_ops_gradients() {
    use burn::tensor::module::conv2d;
    use burn::tensor::ops::ConvOptions;
    use draft_core::ops::stored_weight::{conv2d_stored, matmul_stored};
    for (name, device) in devices() {
        let mut rng = NoiseRng::new(21);
        let x = rng.randn([2, 5, 12], &device);
        let w = (rng.randn([12, 7], &device) * 0.3).cast(FloatDType::F16);
        let xc = rng.randn([2, 3, 9, 9], &device);
        let wc = (rng.randn([4, 3, 3, 3], &device) * 0.3).cast(FloatDType::F16);
        let options = ConvOptions::new_with_padding([2, 2], [(0, 1); 2], [1, 1], 1);
        type Op<'a, const D: usize, const W: usize> = &'a dyn Fn(Tensor<D>, Tensor<W>) -> Tensor<D>;
        fn grads<const D: usize, const W: usize>(
            x: &Tensor<D>,
            w: &Tensor<W>,
            f: Op<D, W>,
        ) -> [(Vec<f32>, Vec<usize>); 3] {
            let xa = x.clone().autodiff().require_grad();
            let wa = w.clone().autodiff().require_grad();
            let y = f(xa.clone(), wa.clone());
            let g = NoiseRng::new(3).randn(y.dims(), &y.device().inner());
            let gr = (y.clone() * g.autodiff()).sum().backward();
            let dw = wa.grad(&gr).unwrap();
            assert_eq!(
                dw.dtype(),
                DType::F16,
                "the weight's gradient is in its dtype"
            );
            [
                values(y.without_autodiff()),
                values(xa.grad(&gr).unwrap()),
                values(dw.cast(FloatDType::F32)),
            ]
        }
        let linear = grads(&x, &w, &|x, w| matmul_stored(x, w));
        let linear_ref = grads(&x, &w, &|x, w| {
            x.matmul(w.cast(FloatDType::F32).unsqueeze())
        });
        let o = options.clone();
        let conv = grads(&xc, &wc, &move |x, w| conv2d_stored(x, w, o.clone()));
        let o = options.clone();
        let conv_ref = grads(&xc, &wc, &move |x, w| {
            conv2d(x, w.cast(FloatDType::F32), None, o.clone())
        });
        for (op, got, want) in [("matmul", linear, linear_ref), ("conv2d", conv, conv_ref)] {
            for (what, (g, r)) in ["output", "∂/∂x", "∂/∂w"].iter().zip(got.iter().zip(&want))
            {
                assert_eq!(g.1, r.1);
                let err = rel_err(&g.0, &r.0);
                eprintln!("{name} {op}: {what} {err:.1e}");
                // ∂/∂w is rounded to f16 (relative 2⁻¹¹) in both.
                let bound = if *what == "∂/∂w" { 1e-3 } else { 1e-5 };
                assert!(err <= bound, "{name} {op}: {what} differs by {err:e}");
            }
        }
    }
}
