//! What the browser tests and their native twins share: the committed fixtures and the two
//! checks (sampling, one DRaFT-K update), each returning the numbers to assert.

#![allow(dead_code)]

use burn::prelude::*;
use draft_core::data::default_model;
use draft_core::model::pipeline::{SampleOptions, to_nhwc};
use draft_core::model::weights::Weights;
use draft_core::reward::files::RewardSource;
use draft_core::train::trainer::StepMetrics;
use draft_core::{ModelFiles, Pipeline, read_f32};
use draft_web::{RunInputs, Session, WebOptions};
use std::collections::BTreeMap;

macro_rules! sd1 {
    ($($path:literal),* $(,)?) => {
        &[$(($path, include_bytes!(concat!("../../../../tests/fixtures/sd1-tiny/", $path)) as &[u8])),*]
    };
}

/// The tiny random SD-1 pipeline that `tests/fixtures/make_fixtures.py` built with diffusers.
const SD1_FILES: &[(&str, &[u8])] = sd1!(
    "model_index.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json",
    "tokenizer/special_tokens_map.json",
    "scheduler/scheduler_config.json",
);

/// diffusers' outputs for it (`reference.json` run "a": these prompts, no negative prompt,
/// guidance 7.5, 10 DDIM steps, η = 0, latents `init_noise`).
pub const SD1_REFERENCE: &[u8] =
    include_bytes!("../../../../tests/fixtures/sd1-tiny/reference.safetensors");
const SD1_PROMPTS: [&str; 2] = [
    "a red circle on a blue background",
    "A photo of an astronaut riding a horse!",
];

pub fn sd1_files() -> ModelFiles {
    let mut files = ModelFiles::new("sd1-tiny");
    for (path, bytes) in SD1_FILES {
        files.insert(*path, bytes.to_vec());
    }
    files
}

/// Largest |a − b|.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

async fn sample(
    pipe: &Pipeline,
    prompts: &[&str],
    steps: usize,
    x_t: Tensor<4>,
) -> (Vec<f32>, Vec<usize>) {
    let options = SampleOptions {
        prompts: prompts.iter().map(|p| p.to_string()).collect(),
        negative_prompt: String::new(),
        steps,
        guidance: 7.5,
        eta: 0.0,
        seed: 0,
        size: Default::default(),
    };
    let latents = pipe.sample_latents(&options, x_t, |_, _| {}).unwrap();
    read_f32(to_nhwc(pipe.decode(latents))).await.unwrap()
}

/// sd1-tiny, run "a" → the images [2, 16, 16, 3] and diffusers' `images_a`.
pub async fn sample_sd1(device: &Device) -> (Vec<f32>, Vec<f32>) {
    sample_sd1_from(&sd1_files(), device).await
}

/// [`sample_sd1`] from `files` (sd1-tiny's, however they are held).
pub async fn sample_sd1_from(files: &ModelFiles, device: &Device) -> (Vec<f32>, Vec<f32>) {
    let reference = Weights::from_bytes("reference.safetensors", SD1_REFERENCE).unwrap();
    let pipe = Pipeline::load(files, device).unwrap();
    let x_t = reference.tensor::<4>("init_noise", device).unwrap();
    let (got, _) = sample(&pipe, &SD1_PROMPTS, 10, x_t).await;
    (got, reference.read_f32("images_a").unwrap().0)
}

/// The embedded model from the fixture's latents `noise` [2, 3, 32, 32]: two of its
/// captions, 10 DDIM steps → images [2, 32, 32, 3].
pub const SHAPES_PROMPTS: [&str; 2] = [
    "a large red circle on a white background",
    "a small blue square on a yellow background",
];
pub const SHAPES_STEPS: usize = 10;

pub async fn sample_shapes(device: &Device, noise: Tensor<4>) -> Vec<f32> {
    let pipe = Pipeline::load(&default_model::files(), device).unwrap();
    sample(&pipe, &SHAPES_PROMPTS, SHAPES_STEPS, noise).await.0
}

/// One DRaFT-K (K = 1) update of the embedded model through the page's trainer.
pub struct Update {
    /// Evaluation-set reward (colourfulness) before and after the update.
    pub before: f64,
    pub after: f64,
    /// Largest |ΔB| over the LoRA's B matrices (zero at initialisation).
    pub lora_change: f32,
    pub metrics: StepMetrics,
}

/// Small enough for SwiftShader (a CPU emulation of a GPU, ~5 s per UNet call here): 4 DDIM
/// steps, one image per batch, an evaluation set of two.
pub async fn draft_k_update(device: &str) -> Update {
    let options = form(
        device,
        r#"{"method": "draft-k", "k": 1, "steps": 4, "batch": 1, "lr": 0.01}"#,
    );
    update_of(&options, RunInputs::default()).await
}

/// The tiny random CLIP of `tests/fixtures/make_reward_fixtures.py` (transformers layout) and
/// an aesthetic MLP for its embeddings: the LAION aesthetic reward's files, as the page's
/// pickers hand them over.
const CLIP_CONFIG: &[u8] = include_bytes!("../../../../tests/fixtures/clip-tiny/config.json");
const CLIP_WEIGHTS: &[u8] =
    include_bytes!("../../../../tests/fixtures/clip-tiny/model.safetensors");
const AESTHETIC: &[u8] =
    include_bytes!("../../../../tests/fixtures/rewards/aesthetic-tiny.safetensors");

/// `laion-aesthetic`'s sources: `clip` (a folder) and `laion-aesthetic` (a file).
pub fn aesthetic_sources() -> BTreeMap<String, RewardSource> {
    let mut clip = ModelFiles::new("clip-tiny");
    clip.insert("config.json", CLIP_CONFIG.to_vec());
    clip.insert("model.safetensors", CLIP_WEIGHTS.to_vec());
    BTreeMap::from([
        ("clip".to_string(), RewardSource::Folder(clip)),
        (
            "laion-aesthetic".to_string(),
            RewardSource::File {
                name: "aesthetic-tiny.safetensors".into(),
                bytes: AESTHETIC.to_vec(),
                open_clip_config: None,
            },
        ),
    ])
}

/// [`aesthetic_update`]'s evaluation rewards before and after, natively on the CPU (the
/// browser's WebGPU result is compared with them).
pub const AESTHETIC_NATIVE: [f32; 2] = [-0.421_916, -0.421_372];

/// One DRaFT-K update of the embedded model on the LAION aesthetic reward (tiny CLIP).
pub async fn aesthetic_update(device: &str) -> Update {
    let options = form(
        device,
        r#"{"method": "draft-k", "rewards": ["laion-aesthetic=1"], "k": 1, "steps": 4,
            "batch": 1, "lr": 0.01}"#,
    );
    let inputs = RunInputs {
        rewards: aesthetic_sources(),
        ..RunInputs::default()
    };
    update_of(&options, inputs).await
}

/// The page's options: `json` (the form's keys) on `device`.
pub fn form(device: &str, json: &str) -> WebOptions {
    WebOptions {
        device: device.into(),
        ..WebOptions::parse(json).unwrap()
    }
}

#[allow(clippy::await_holding_refcell_ref)]
pub async fn update_of(options: &WebOptions, inputs: RunInputs) -> Update {
    let session = Session::build(options, inputs).await.unwrap();
    let mut trainer = session.trainer().unwrap();
    let before = trainer.evaluate_fixed(2).await.unwrap().reward;
    let start = trainer.pipeline.lora.params();
    let metrics = trainer.train_step().await.unwrap();
    let after = trainer.evaluate_fixed(2).await.unwrap().reward;
    let mut lora_change = 0f32;
    for (old, new) in start.into_iter().zip(trainer.pipeline.lora.params()) {
        let (old, _) = read_f32(old).await.unwrap();
        let (new, _) = read_f32(new).await.unwrap();
        lora_change = lora_change.max(max_abs_diff(&old, &new));
    }
    Update {
        before,
        after,
        lora_change,
        metrics,
    }
}
