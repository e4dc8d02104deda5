//! A Stable Diffusion pipeline in the diffusers folder layout, loaded from bytes.
//!
//! The caller (CLI, browser) supplies the files as `relative path → bytes` in
//! [`ModelFiles`]; this module knows which files the layout holds and wires the components.
//! Architecture numbers come from each component's `config.json`.

use burn::prelude::*;
use burn::tensor::FloatDType;

use crate::error::{Error, Result};
use crate::model::files::{MAX_IMAGE_SIDE, ModelFiles, load_tokenizer};
use crate::model::lora::{LoraFile, LoraPlan, LoraTable, LoraTarget};
use crate::model::models::clip_text::{CLIPTextConfig, CLIPTextModel};
use crate::model::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::model::models::vae::{AutoencoderKL, AutoencoderKLConfig};
use crate::model::schedule::SchedulerConfig;
use crate::model::tokenizer::ClipTokenizer;
use crate::model::var_builder::VarBuilder;

/// Text encoder + tokenizer + UNet + VAE + noise schedule.
///
/// A folder whose `model_index.json` names no VAE (`"vae": [null, null]` or no entry) is a
/// pixel-space model: the UNet denoises RGB images in [-1, 1] directly (the embedded default
/// model is one).
pub struct Pipeline {
    pub tokenizer: ClipTokenizer,
    pub text_encoder: CLIPTextModel,
    pub unet: UNet2DConditionModel,
    pub vae: Option<AutoencoderKL>,
    pub unet_config: UNet2DConditionConfig,
    pub vae_config: Option<AutoencoderKLConfig>,
    pub text_config: CLIPTextConfig,
    pub scheduler: SchedulerConfig,
    pub device: Device,
    /// The LoRA adapters of the layers [`LoraSetup`] selected (empty without LoRA).
    pub lora: LoraTable,
    /// The largest activation the VAE decoder makes, in bytes, where running a layer on strips
    /// of rows can keep it there ([`crate::memory::strips`]). Default: [`crate::memory::strips::MAX_BUFFER_BYTES`]
    /// (WebGPU's default binding limit) on every device: on the CPU, where no binding limit
    /// asks for it, strips cost no time and lower the decode's memory (docs/benchmarks.md).
    pub max_buffer_bytes: u64,
    /// The dtype the UNet computes in on the sampling steps that no gradient goes through:
    /// `draft sample`, evaluations, and training's steps before the back-propagated ones (all
    /// of DRaFT-LV's and ReFL's chain, DRaFT-K's first N − K). f16 halves those steps'
    /// activations and runs them on an adapter's f16 units; norms' statistics and attention's
    /// softmax still compute in f32, and the guidance combination and the DDIM update stay f32.
    /// The back-propagated steps, the decoder, the reward and the loss always compute in f32:
    /// their gradients are far below f16's smallest normal value (docs/parity.md). Default f32.
    pub sampling_dtype: FloatDType,
}

/// Which layers get LoRA adapters when a pipeline loads.
#[derive(Default)]
pub enum LoraSetup<'f> {
    #[default]
    None,
    /// Trainable adapters on these layer groups (initialised by the trainer).
    Targets(Vec<LoraTarget>),
    /// Fixed adapters from files, each at a scale: inference-time scaling and mixing.
    Files(Vec<(&'f LoraFile, f64)>),
}

impl LoraSetup<'_> {
    fn plan(&self, table: &LoraTable, component: &str) -> Option<LoraPlan> {
        match self {
            LoraSetup::None => None,
            LoraSetup::Targets(t) => Some(LoraPlan::targets(table, component, t)),
            LoraSetup::Files(files) => {
                let paths: std::collections::BTreeSet<String> =
                    files.iter().flat_map(|(f, _)| f.paths(component)).collect();
                (!paths.is_empty()).then(|| LoraPlan::paths(table, component, paths))
            }
        }
    }
}

impl Pipeline {
    pub fn load(files: &ModelFiles, device: &Device) -> Result<Self> {
        Self::load_with_lora(files, device, &LoraSetup::None)
    }

    /// Loads the pipeline with LoRA slots on the layers `lora` selects.
    pub fn load_with_lora(files: &ModelFiles, device: &Device, lora: &LoraSetup) -> Result<Self> {
        Self::load_with(files, device, lora, FloatDType::F32)
    }

    /// [`load_with_lora`](Self::load_with_lora) with the frozen weight matrices and kernels of
    /// the UNet, VAE and text encoder kept in `weights_dtype` (f16: half the memory; every layer
    /// computes in f32 unless [`sampling_dtype`](Self::sampling_dtype) is set, and LoRA weights,
    /// their gradients and the optimizer state are f32).
    pub fn load_with(
        files: &ModelFiles,
        device: &Device,
        lora: &LoraSetup,
        weights_dtype: FloatDType,
    ) -> Result<Self> {
        if weights_dtype != FloatDType::F32 && !device.supports_dtype(weights_dtype) {
            return Err(Error::Input(format!(
                "this device cannot hold {weights_dtype:?} tensors; use --weights-dtype f32"
            )));
        }
        let table = LoraTable::new();
        let cfg = |p: &str| -> Result<(String, &str)> { Ok((files.display(p), files.text(p)?)) };

        let (f, json) = cfg("unet/config.json")?;
        let unet_config = UNet2DConditionConfig::from_json(&f, json)?;
        let vae_config = if pixel_space(files)? {
            None
        } else {
            let (f, json) = cfg("vae/config.json")?;
            Some(AutoencoderKLConfig::from_json(&f, json)?)
        };
        let (f, json) = cfg("text_encoder/config.json")?;
        let text_config = CLIPTextConfig::from_json(&f, json)?;
        let (f, json) = cfg("scheduler/scheduler_config.json")?;
        let scheduler = SchedulerConfig::from_json(&f, json)?;

        let (channels, what) = match &vae_config {
            Some(v) => (v.latent_channels, "the VAE's latent_channels"),
            None => (
                3,
                "the 3 channels of a pixel-space model (model_index.json names no VAE)",
            ),
        };
        if channels != unet_config.in_channels || channels != unet_config.out_channels {
            return Err(Error::config(
                &files.display("unet/config.json"),
                format!(
                    "in_channels {} / out_channels {} do not match {what}: {channels}",
                    unet_config.in_channels, unet_config.out_channels
                ),
            ));
        }
        if text_config.hidden_size != unet_config.cross_attention_dim {
            return Err(Error::config(
                &files.display("unet/config.json"),
                format!(
                    "cross_attention_dim {} does not match the text encoder's hidden_size {}",
                    unet_config.cross_attention_dim, text_config.hidden_size
                ),
            ));
        }

        let tokenizer = load_tokenizer(files)?;
        if tokenizer.id_bound() > text_config.vocab_size {
            return Err(Error::config(
                &files.display("text_encoder/config.json"),
                format!(
                    "vocab_size {} is smaller than the tokenizer's {} tokens (a tokenizer of \
                     another model? a single-file checkpoint takes its tokenizer from \
                     --model-config)",
                    text_config.vocab_size,
                    tokenizer.id_bound()
                ),
            ));
        }
        if tokenizer.max_length > text_config.max_position_embeddings {
            return Err(Error::config(
                &files.display("tokenizer/tokenizer_config.json"),
                format!(
                    "model_max_length {} exceeds the text encoder's max_position_embeddings {}",
                    tokenizer.max_length, text_config.max_position_embeddings
                ),
            ));
        }

        let w = files.component_weights("unet")?;
        let unet = UNet2DConditionModel::load(
            VarBuilder::new(&w, device)
                .with_weights_dtype(weights_dtype)
                .with_lora(lora.plan(&table, "unet")),
            &unet_config,
            &files.display("unet/config.json"),
        )?;

        let vae = match &vae_config {
            None => None,
            Some(vae_config) => {
                let w = files.component_weights("vae")?;
                Some(AutoencoderKL::load(
                    VarBuilder::new(&w, device).with_weights_dtype(weights_dtype),
                    vae_config,
                )?)
            }
        };

        let w = files.component_weights("text_encoder")?;
        let text_encoder = CLIPTextModel::load(
            VarBuilder::new(&w, device)
                .with_weights_dtype(weights_dtype)
                .with_lora(lora.plan(&table, "text_encoder")),
            &text_config,
        )?;
        if let LoraSetup::Files(lora_files) = lora {
            for (file, scale) in lora_files {
                table.add_file(file, *scale, device)?;
            }
        }

        Ok(Self {
            tokenizer,
            text_encoder,
            unet,
            vae,
            unet_config,
            vae_config,
            text_config,
            scheduler,
            device: device.clone(),
            lora: table,
            max_buffer_bytes: crate::memory::strips::MAX_BUFFER_BYTES,
            sampling_dtype: FloatDType::F32,
        })
    }

    /// Token ids [B, max_length] for the prompts.
    pub fn tokenize(&self, prompts: &[String]) -> Result<Tensor<2, Int>> {
        if prompts.is_empty() {
            return Err(Error::Input("at least one prompt is needed".into()));
        }
        let mut ids = Vec::new();
        for p in prompts {
            ids.extend(self.tokenizer.encode(p)?.into_iter().map(|i| i as i64));
        }
        let n = self.tokenizer.max_length;
        Ok(Tensor::from_data(
            TensorData::new(ids, [prompts.len(), n]),
            &self.device,
        ))
    }

    /// `text_encoder(tokenizer(prompts)).last_hidden_state`: [B, max_length, hidden].
    pub fn encode_prompts(&self, prompts: &[String]) -> Result<Tensor<3>> {
        Ok(self.text_encoder.forward(self.tokenize(prompts)?))
    }

    /// Pixels per latent along each axis (1 for a pixel-space model).
    pub fn downscale(&self) -> usize {
        self.vae_config.as_ref().map_or(1, |v| v.downscale())
    }

    /// Latent shape [C, h, w] for an image of `height` × `width` pixels.
    pub fn latent_shape(&self, height: usize, width: usize) -> Result<[usize; 3]> {
        let [h, w] = latent_size(height, width, self.downscale())?;
        Ok([self.unet_config.in_channels, h, w])
    }

    /// The image size a run asks for (`None`: this model's default), in pixels.
    pub fn image_size(&self, height: Option<usize>, width: Option<usize>) -> [usize; 2] {
        let size = self.default_image_size();
        [height.unwrap_or(size), width.unwrap_or(size)]
    }

    /// Default image size: the UNet's `sample_size` latents, decoded.
    pub fn default_image_size(&self) -> usize {
        self.unet_config.sample_size * self.downscale()
    }

    /// Latents → image in [0, 1], [B, 3, H, W]: `(vae.decode(z / scale) / 2 + 0.5).clamp(0, 1)`
    /// (pixel space: `(x / 2 + 0.5).clamp(0, 1)`).
    pub fn decode(&self, latents: Tensor<4>) -> Tensor<4> {
        self.decode_chain().apply(latents)
    }

    /// [`decode`](Self::decode) as a chain of segments (per resnet of the VAE decoder), whose
    /// gradient [`SegmentChain::vjp`](crate::memory::checkpoint::SegmentChain::vjp) takes with one
    /// segment's activations at a time.
    pub fn decode_chain(&self) -> crate::memory::checkpoint::SegmentChain<'_> {
        let to_image = |x: Tensor<4>| (x / 2.0 + 0.5).clamp(0.0, 1.0);
        match (&self.vae, &self.vae_config) {
            (Some(vae), Some(c)) => {
                let scale = c.scaling_factor;
                vae.decode_chain(move |z| z / scale, to_image, self.max_buffer_bytes)
            }
            _ => crate::memory::checkpoint::SegmentChain::new(vec![Box::new(move |x| {
                x.into_iter().map(to_image).collect()
            })]),
        }
    }
}

/// Whether `model_index.json` says the pipeline has no VAE (no `vae` entry, or `[null, null]`).
/// Without a `model_index.json` the folder must have a VAE.
fn pixel_space(files: &ModelFiles) -> Result<bool> {
    if !files.has("model_index.json") {
        return Ok(false);
    }
    let v: serde_json::Value = serde_json::from_str(files.text("model_index.json")?)
        .map_err(|e| Error::config(&files.display("model_index.json"), e.to_string()))?;
    Ok(match v.get("vae") {
        None | Some(serde_json::Value::Null) => true,
        Some(serde_json::Value::Array(a)) => a.iter().all(|x| x.is_null()),
        Some(_) => false,
    })
}

/// What `draft sample` asks of a pipeline.
#[derive(Debug, Clone)]
pub struct SampleOptions {
    pub prompts: Vec<String>,
    pub negative_prompt: String,
    pub steps: usize,
    pub guidance: f64,
    pub eta: f64,
    pub seed: u64,
}

impl Pipeline {
    /// Text → latents x_0 with DDIM + CFG from the initial latents `x_t` [B, C, h, w]
    /// (`prompts` are cycled over the batch). `on_step(i, n)` reports progress.
    pub fn sample_latents(
        &self,
        options: &SampleOptions,
        x_t: Tensor<4>,
        mut on_step: impl FnMut(usize, usize),
    ) -> Result<Tensor<4>> {
        self.sample_latents_until(options, x_t, |i, n| {
            on_step(i, n);
            true
        })
    }

    /// [`sample_latents`](Self::sample_latents), stopped with [`Error::Cancelled`] after the
    /// first step where `on_step(i, n)` returns `false`.
    pub fn sample_latents_until(
        &self,
        options: &SampleOptions,
        x_t: Tensor<4>,
        on_step: impl FnMut(usize, usize) -> bool,
    ) -> Result<Tensor<4>> {
        if options.prompts.is_empty() {
            return Err(Error::Input("at least one prompt is needed".into()));
        }
        let b = x_t.dims()[0];
        let prompts: Vec<String> = (0..b)
            .map(|i| options.prompts[i % options.prompts.len()].clone())
            .collect();
        let ddim = crate::model::schedule::Ddim::new(&self.scheduler, options.steps)?;
        let cond = self.encode_prompts(&prompts)?;
        let uncond = self.encode_prompts(std::slice::from_ref(&options.negative_prompt))?;
        let cond = crate::model::sampler::Conditioning::new(cond, uncond, options.guidance)
            .with_dtype(self.sampling_dtype);
        let mut rng = crate::noise::NoiseRng::new(options.seed.wrapping_add(1));
        let shape = x_t.dims();
        let device = self.device.clone();
        crate::model::sampler::sample(
            &self.unet,
            &ddim,
            options.eta,
            x_t,
            &cond,
            |_| Some(rng.randn(shape, &device)),
            on_step,
        )
    }
}

/// [B, 3, H, W] → [B, H, W, 3], diffusers' `output_type="np"` layout.
pub fn to_nhwc(images: Tensor<4>) -> Tensor<4> {
    images.permute([0, 2, 3, 1])
}

/// The latents `[h, w]` of a `height` × `width` image for a VAE that downscales by `factor`;
/// refuses sizes that are not positive multiples of it or pass [`MAX_IMAGE_SIDE`].
pub fn latent_size(height: usize, width: usize, factor: usize) -> Result<[usize; 2]> {
    let f = factor.max(1);
    if height == 0 || width == 0 || !height.is_multiple_of(f) || !width.is_multiple_of(f) {
        return Err(Error::Input(format!(
            "height and width must be positive multiples of {f}, got {height}×{width}"
        )));
    }
    if height.max(width) > MAX_IMAGE_SIDE {
        return Err(Error::Input(format!(
            "height and width must be at most {MAX_IMAGE_SIDE} pixels, got {height}×{width}"
        )));
    }
    Ok([height / f, width / f])
}
