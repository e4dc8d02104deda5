//! Fixture access shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use burn::prelude::*;
use draft_core::ModelFiles;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

pub fn read_model(dir: &Path) -> ModelFiles {
    ModelFiles::read_layout(dir.display().to_string(), |rel| {
        Ok::<_, ()>(std::fs::read(dir.join(rel)).ok())
    })
    .unwrap()
}

/// The devices every parity test runs on. `DRAFT_TEST_DEVICES=cpu` limits a local run to the
/// CPU; CI sets nothing, so wgpu (lavapipe) runs there and a missing adapter fails the test.
pub fn devices() -> Vec<(&'static str, Device)> {
    let mut out = vec![("cpu", Device::flex())];
    if std::env::var("DRAFT_TEST_DEVICES").as_deref() != Ok("cpu") {
        out.push(("wgpu", Device::wgpu(Default::default())));
    }
    out
}

pub fn values<const D: usize>(t: Tensor<D>) -> (Vec<f32>, Vec<usize>) {
    pollster::block_on(draft_core::read_f32(t)).unwrap()
}

/// max |a − b| / max |b|.
pub fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let max_ref = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    err / max_ref.max(1e-30)
}

/// The prompts of the f16 tests' training evaluations.
pub const LORA_PROMPTS: [&str; 2] = ["a red circle on a blue background", "a photo of a cat"];

/// Initialises the pipeline's trainable LoRA (rank 4, α 4) with non-zero up-projections, so
/// that every gradient is non-zero.
pub fn perturbed_lora(pipe: &draft_core::Pipeline, device: &Device) {
    use draft_core::noise::NoiseRng;
    pipe.lora.init_trainable(4, 4.0, 3, device);
    let params: Vec<_> = pipe
        .lora
        .params()
        .into_iter()
        .map(|p| p.clone() + NoiseRng::new(4).randn(p.dims(), device) * 0.05)
        .collect();
    pipe.lora.set_params(&params);
}

/// The LoRA gradients of one `method` evaluation (colourfulness, CFG 7.5, η = 0,
/// [`LORA_PROMPTS`]) from the initial latents `x_t`, flattened.
pub fn lora_gradients(
    pipe: &draft_core::Pipeline,
    steps: usize,
    method: draft_core::train::engine::Method,
    x_t: Tensor<4>,
) -> Vec<f32> {
    use draft_core::noise::NoiseRng;
    use draft_core::reward::builtin::{RewardOptions, WeightedReward};
    use draft_core::train::engine::{Draws, Engine, Prompts};
    let prompts: Vec<String> = LORA_PROMPTS.map(String::from).to_vec();
    let reward =
        WeightedReward::from_specs(&["colorfulness".into()], &RewardOptions::default()).unwrap();
    let engine = Engine::new(pipe, steps, 0.0, &reward).unwrap();
    let p = Prompts::new(pipe, &prompts, "", 7.5).unwrap();
    let draws = Draws {
        x_t,
        step_noise: NoiseRng::new(0),
        lv_noise: None,
        truncation: 0.0,
    };
    let eval = pollster::block_on(engine.evaluate(method, &p, draws)).unwrap();
    eval.grads.into_iter().flat_map(|g| values(g).0).collect()
}

/// With `relative`, each element's error is divided by max(1, |reference|): the final latents
/// of the random ε-model grow to ~40 (DDIM divides by √ᾱ), where f32 itself carries ~4e-6.
pub fn assert_close_scaled<const D: usize>(
    what: &str,
    got: Tensor<D>,
    reference: &draft_core::model::weights::Weights,
    key: &str,
    relative: bool,
    tol: f32,
) {
    let (got, got_shape) = values(got);
    let (want, want_shape) = reference.read_f32(key).unwrap();
    assert_eq!(got_shape, want_shape, "{what}: shape");
    let max_ref = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs() / if relative { b.abs().max(1.0) } else { 1.0 })
        .fold(0f32, f32::max);
    eprintln!("{what}: max abs error {err:.2e} (max |ref| {max_ref:.3})");
    assert!(err <= tol, "{what}: max abs error {err:e} > {tol:e}");
}
