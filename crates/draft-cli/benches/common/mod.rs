//! What the training and GPU benchmarks share: the random pipelines with SD-1.4's architecture
//! and the LoRA a benchmarked step differentiates.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use burn::prelude::*;
use burn::tensor::FloatDType;
use draft_core::model::lora::{LoraPlan, LoraTable, LoraTarget};
use draft_core::model::models::clip_text::{CLIPTextConfig, CLIPTextModel};
use draft_core::model::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use draft_core::model::models::vae::{AutoencoderKL, AutoencoderKLConfig};
use draft_core::model::pipeline::LoraSetup;
use draft_core::model::var_builder::VarBuilder;
use draft_core::noise::NoiseRng;
use draft_core::train::engine::{Draws, Engine, Evaluation, Method, Prompts};
use draft_core::{ModelFiles, Pipeline};

/// The committed sd1-tiny fixture pipeline (16×16 latents).
pub fn sd1_tiny_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/sd1-tiny")
}

/// A fixture folder's files.
fn read_folder(dir: &Path) -> ModelFiles {
    ModelFiles::read_layout(dir.display().to_string(), |rel| {
        Ok::<_, ()>(std::fs::read(dir.join(rel)).ok())
    })
    .unwrap()
}

/// Loads sd1-tiny with attention LoRA targets and `weights_dtype`.
pub fn load_sd1_tiny(device: &Device, weights_dtype: FloatDType) -> Pipeline {
    let files = read_folder(&sd1_tiny_dir());
    Pipeline::load_with(
        &files,
        device,
        &LoraSetup::Targets(vec![LoraTarget::Attn]),
        weights_dtype,
    )
    .unwrap()
}

/// Replaces the UNet and text encoder of `pipe` (sd1-tiny, for its tokenizer and scheduler) by
/// random ones with SD-1.4's architecture — with `paper`, also the VAE and CLIP ViT-L/14's
/// whole 12-layer text encoder (vocabulary 49408) — and returns the latent size: 64 (512²
/// images) with `paper`, else 32 (a one-layer 768-wide text encoder and the fixture's VAE, so
/// that the UNet dominates).
pub fn make_sd14(
    pipe: &mut Pipeline,
    device: &Device,
    weights_dtype: FloatDType,
    paper: bool,
) -> usize {
    let config = UNet2DConditionConfig::from_json(
        "sd14_unet_config.json",
        include_str!("../sd14_unet_config.json"),
    )
    .unwrap();
    let table = LoraTable::new();
    let vb = VarBuilder::random(0, device)
        .with_weights_dtype(weights_dtype)
        .with_lora(Some(LoraPlan::targets(&table, "unet", &[LoraTarget::Attn])));
    pipe.unet = UNet2DConditionModel::load(vb, &config, "sd14").unwrap();
    let text = CLIPTextConfig::from_json(
        "text",
        &format!(
            r#"{{"vocab_size":{},"hidden_size":768,"intermediate_size":3072,"num_hidden_layers":{},
            "num_attention_heads":12,"max_position_embeddings":77}}"#,
            if paper {
                49408
            } else {
                pipe.text_config.vocab_size
            },
            if paper { 12 } else { 1 },
        ),
    )
    .unwrap();
    let vb = VarBuilder::random(1, device).with_weights_dtype(weights_dtype);
    pipe.text_encoder = CLIPTextModel::load(vb, &text).unwrap();
    pipe.lora = table;
    if !paper {
        return 32;
    }
    let config = AutoencoderKLConfig::from_json(
        "sd14_vae_config.json",
        include_str!("../sd14_vae_config.json"),
    )
    .unwrap();
    let vb = VarBuilder::random(3, device).with_weights_dtype(weights_dtype);
    pipe.vae = Some(AutoencoderKL::load(vb, &config).unwrap());
    pipe.vae_config = Some(config);
    64
}

/// The committed tiny SDXL fixture (for its two tokenizers and SDXL's scheduler config).
pub fn sdxl_tiny_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/sdxl-tiny")
}

/// A pipeline with SDXL-base 1.0's whole architecture and random weights (`sdxl_*_config.json`:
/// the 2.6 B UNet, CLIP ViT-L and OpenCLIP bigG towers, SDXL's VAE; 3.5 B parameters), in
/// `weights_dtype`, with attention LoRA targets on the UNet; the tiny SDXL fixture gives the
/// tokenizers and the scheduler. Built in memory: nothing is read but the fixture.
pub fn make_sdxl(device: &Device, weights_dtype: FloatDType) -> Pipeline {
    let mut pipe = Pipeline::load(&read_folder(&sdxl_tiny_dir()), device).unwrap();
    let unet = UNet2DConditionConfig::from_json(
        "sdxl_unet_config.json",
        include_str!("../sdxl_unet_config.json"),
    )
    .unwrap();
    let table = LoraTable::new();
    let vb = VarBuilder::random(0, device)
        .with_weights_dtype(weights_dtype)
        .with_lora(Some(LoraPlan::targets(&table, "unet", &[LoraTarget::Attn])));
    pipe.unet = UNet2DConditionModel::load(vb, &unet, "sdxl").unwrap();
    pipe.unet_config = unet;
    let te1 =
        CLIPTextConfig::from_json("te1", include_str!("../sdxl_text_encoder_config.json")).unwrap();
    let te2 = CLIPTextConfig::from_json("te2", include_str!("../sdxl_text_encoder_2_config.json"))
        .unwrap();
    let vb = VarBuilder::random(1, device).with_weights_dtype(weights_dtype);
    pipe.text_encoder = CLIPTextModel::load(vb, &te1).unwrap();
    let vb = VarBuilder::random(2, device).with_weights_dtype(weights_dtype);
    pipe.text_encoder_2 = Some(CLIPTextModel::load_with_projection(vb, &te2, "te2").unwrap());
    pipe.text_config = te1;
    pipe.text_config_2 = Some(te2);
    let vae = AutoencoderKLConfig::from_json(
        "sdxl_vae_config.json",
        include_str!("../sdxl_vae_config.json"),
    )
    .unwrap();
    let vb = VarBuilder::random(3, device).with_weights_dtype(weights_dtype);
    pipe.vae = Some(AutoencoderKL::load(vb, &vae).unwrap());
    pipe.vae_config = Some(vae);
    pipe.lora = table;
    pipe
}

/// Rank-4 LoRA on the pipeline's targets, with B drawn small as after training (B = 0 would
/// make every gradient but B's vanish).
pub fn init_bench_lora(pipe: &mut Pipeline, device: &Device) {
    pipe.lora.init_trainable(4, 4.0, 0, device);
    let params: Vec<Tensor<2>> = pipe
        .lora
        .params()
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            if i % 2 == 1 {
                NoiseRng::new(i as u64).randn(p.dims(), device) * 1e-3
            } else {
                p
            }
        })
        .collect();
    pipe.lora.set_params(&params);
}

/// "a photo of a cat" against the empty prompt, guidance 7.5.
pub fn cat_prompts(pipe: &Pipeline) -> Prompts {
    Prompts::new(pipe, &["a photo of a cat".into()], "", 7.5).unwrap()
}

/// A field of /proc/self/status in KiB (0 where there is none).
pub fn status_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The value after `name` on the command line, if any.
pub fn flag(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
}

/// One training objective's evaluation and gradient, timed to the device's finish: x_T and
/// the step noise from `seed` ([batch, 4, size, size]). Returns it, the LoRA gradient's global
/// norm and the seconds it took.
pub fn timed_step(
    engine: &Engine,
    method: Method,
    prompts: &Prompts,
    (batch, size): (usize, usize),
    seed: u64,
    device: &Device,
) -> (Evaluation, f64, f64) {
    let draws = Draws {
        x_t: NoiseRng::new(seed).randn([batch, 4, size, size], device),
        step_noise: NoiseRng::new(seed + 1),
        lv_noise: None,
        truncation: 0.0,
    };
    let t0 = std::time::Instant::now();
    let e = pollster::block_on(engine.evaluate(method, prompts, draws)).unwrap();
    let norm = pollster::block_on(draft_core::train::optim::global_norm(&e.grads)).unwrap();
    device.sync().unwrap();
    (e, norm, t0.elapsed().as_secs_f64())
}
