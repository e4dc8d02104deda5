//! A Stable Diffusion pipeline in the diffusers folder layout, loaded from bytes.
//!
//! The caller (CLI, browser) supplies the files as `relative path → bytes` in
//! [`ModelFiles`]; this module knows which files the layout holds and wires the components.
//! Architecture numbers come from each component's `config.json`.

use burn::prelude::*;
use burn::tensor::FloatDType;

use crate::error::{Error, Result};
use crate::model::files::{MAX_IMAGE_SIDE, ModelFiles, load_tokenizer, load_tokenizer_in};
use crate::model::lora::{LoraFile, LoraPlan, LoraTable, LoraTarget};
use crate::model::models::clip_text::{CLIPTextConfig, CLIPTextModel};
use crate::model::models::unet::{TimeIds, UNet2DConditionConfig, UNet2DConditionModel};
use crate::model::models::vae::{AutoencoderKL, AutoencoderKLConfig};
use crate::model::schedule::SchedulerConfig;
use crate::model::tokenizer::ClipTokenizer;
use crate::model::var_builder::VarBuilder;

/// Text encoder + tokenizer + UNet + VAE + noise schedule.
///
/// Stable Diffusion XL (a folder with `text_encoder_2/`) has a second tower and tokenizer: the
/// UNet's context is both towers' penultimate hidden states side by side, and its added
/// conditions are tower 2's pooled projection with the size ids ([`SizeConditioning`]).
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
    /// SDXL's second tower (`CLIPTextModelWithProjection`), its tokenizer and config.
    pub text_encoder_2: Option<CLIPTextModel>,
    pub tokenizer_2: Option<ClipTokenizer>,
    pub text_config_2: Option<CLIPTextConfig>,
    /// `model_index.json`'s `force_zeros_for_empty_prompt` (SDXL): without a negative prompt
    /// the unconditional embeddings and pooled embedding are zeros.
    pub force_zeros_for_empty_prompt: bool,
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
        let index = model_index(files)?;
        // A `model_index.json` that names no VAE (no entry, or `[null, null]`) is a pixel-space
        // model; without a `model_index.json` the folder must have a VAE.
        let pixel_space = index.is_some() && !index_names(index.as_ref(), "vae");
        let vae_config = if pixel_space {
            None
        } else {
            let (f, json) = cfg("vae/config.json")?;
            Some(AutoencoderKLConfig::from_json(&f, json)?)
        };
        let (f, json) = cfg("text_encoder/config.json")?;
        let text_config = CLIPTextConfig::from_json(&f, json)?;
        let sdxl = files.has("text_encoder_2/config.json")
            || index_names(index.as_ref(), "text_encoder_2");
        let text_config_2 = match sdxl {
            true => {
                let (f, json) = cfg("text_encoder_2/config.json")?;
                Some(CLIPTextConfig::from_json(&f, json)?)
            }
            false => None,
        };
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
        check_added_conditions(files, &unet_config, text_config_2.as_ref())?;
        let context = text_config.hidden_size + text_config_2.as_ref().map_or(0, |c| c.hidden_size);
        if context != unet_config.cross_attention_dim {
            let towers = match &text_config_2 {
                Some(c2) => format!(
                    "the text encoders' hidden_size {} + {}",
                    text_config.hidden_size, c2.hidden_size
                ),
                None => format!("the text encoder's hidden_size {}", text_config.hidden_size),
            };
            return Err(Error::config(
                &files.display("unet/config.json"),
                format!(
                    "cross_attention_dim {} does not match {towers}",
                    unet_config.cross_attention_dim
                ),
            ));
        }

        let tokenizer = load_tokenizer(files)?;
        check_tokenizer(files, &tokenizer, &text_config, "text_encoder", "tokenizer")?;

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
        let (text_encoder_2, tokenizer_2) = match &text_config_2 {
            None => (None, None),
            Some(c2) => {
                let tokenizer_2 = load_tokenizer_in(files, "tokenizer_2/")?;
                check_tokenizer(files, &tokenizer_2, c2, "text_encoder_2", "tokenizer_2")?;
                if tokenizer_2.max_length != tokenizer.max_length {
                    return Err(Error::config(
                        &files.display("tokenizer_2/tokenizer_config.json"),
                        format!(
                            "model_max_length {} differs from tokenizer/'s {}: the towers' \
                             states are concatenated token by token",
                            tokenizer_2.max_length, tokenizer.max_length
                        ),
                    ));
                }
                let w = files.component_weights("text_encoder_2")?;
                let te2 = CLIPTextModel::load_with_projection(
                    VarBuilder::new(&w, device)
                        .with_weights_dtype(weights_dtype)
                        .with_lora(lora.plan(&table, "text_encoder_2")),
                    c2,
                    &files.display("text_encoder_2/config.json"),
                )?;
                (Some(te2), Some(tokenizer_2))
            }
        };
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
            text_encoder_2,
            tokenizer_2,
            text_config_2,
            // diffusers' SDXL pipeline defaults it to true.
            force_zeros_for_empty_prompt: sdxl
                && index
                    .as_ref()
                    .and_then(|v| v.get("force_zeros_for_empty_prompt"))
                    .and_then(|b| b.as_bool())
                    .unwrap_or(true),
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

    /// Whether this is a Stable Diffusion XL pipeline (two text towers, added conditions).
    pub fn is_sdxl(&self) -> bool {
        self.text_encoder_2.is_some()
    }

    /// The token ids of the prompts for every tower.
    pub fn tokenize_all(&self, prompts: &[String]) -> Result<PromptTokens> {
        let ids = self.tokenize(prompts)?;
        let tower_2 = match (&self.tokenizer_2, &self.text_config_2) {
            (Some(tok), Some(config)) => {
                let n = tok.max_length;
                let mut flat = Vec::with_capacity(prompts.len() * n);
                for p in prompts {
                    flat.extend(tok.encode(p)?);
                }
                let pooled = config.pooled_positions(&flat, n);
                let flat: Vec<i64> = flat.into_iter().map(i64::from).collect();
                Some(TowerTokens {
                    ids: Tensor::from_data(TensorData::new(flat, [prompts.len(), n]), &self.device),
                    pooled,
                })
            }
            _ => None,
        };
        Ok(PromptTokens {
            ids,
            tower_2,
            zeros: false,
        })
    }

    /// The token ids of the negative prompt. An empty one is "no negative prompt": where the
    /// pipeline says `force_zeros_for_empty_prompt` (SDXL), its embeddings are zeros.
    pub fn tokenize_negative(&self, negative: &str) -> Result<PromptTokens> {
        let mut tokens = self.tokenize_all(&[negative.to_string()])?;
        tokens.zeros = self.force_zeros_for_empty_prompt && negative.is_empty();
        Ok(tokens)
    }

    /// What the UNet is conditioned on for these tokens: `text_encoder(ids).last_hidden_state`
    /// [B, N, hidden]; for SDXL both towers' `hidden_states[-2]` side by side and tower 2's
    /// pooled projection [B, projection_dim].
    pub fn encode_tokens(&self, tokens: &PromptTokens) -> TextEmbeddings {
        let [b, n] = tokens.ids.dims();
        if tokens.zeros {
            let proj = self.text_config_2.as_ref().and_then(|c| c.projection_dim);
            return TextEmbeddings {
                hidden: Tensor::zeros([b, n, self.unet_config.cross_attention_dim], &self.device),
                pooled: proj.map(|p| Tensor::zeros([b, p], &self.device)),
            };
        }
        let (Some(te2), Some(t2)) = (&self.text_encoder_2, &tokens.tower_2) else {
            return TextEmbeddings {
                hidden: self.text_encoder.forward(tokens.ids.clone()),
                pooled: None,
            };
        };
        let (h1, _) = self
            .text_encoder
            .forward_penultimate(tokens.ids.clone(), None);
        let (h2, pooled) = te2.forward_penultimate(t2.ids.clone(), Some(&t2.pooled));
        TextEmbeddings {
            hidden: Tensor::cat(vec![h1, h2], 2),
            pooled,
        }
    }

    /// The prompts' embeddings ([`encode_tokens`](Self::encode_tokens)).
    pub fn encode(&self, prompts: &[String]) -> Result<TextEmbeddings> {
        Ok(self.encode_tokens(&self.tokenize_all(prompts)?))
    }

    /// The UNet's context for the prompts: [B, max_length, cross_attention_dim]
    /// ([`encode`](Self::encode)'s hidden states).
    pub fn encode_prompts(&self, prompts: &[String]) -> Result<Tensor<3>> {
        Ok(self.encode(prompts)?.hidden)
    }

    /// SDXL's added conditions for embeddings of an `image` = [height, width] run:
    /// [`UNet2DConditionModel::added_input`] of the pooled embedding and the size ids. `None`
    /// for other models.
    pub fn added_conditions(
        &self,
        embeddings: &TextEmbeddings,
        size: &SizeConditioning,
        image: [usize; 2],
    ) -> Option<Tensor<2>> {
        let pooled = embeddings.pooled.clone()?;
        self.unet.add_embedding.as_ref()?;
        Some(self.unet.added_input(pooled, &size.time_ids(image)))
    }

    /// The conditioning of a run: prompts and the unconditional side stacked for guidance,
    /// with SDXL's added conditions for an `image` = [height, width] run.
    pub fn conditioning(
        &self,
        cond: &TextEmbeddings,
        uncond: &TextEmbeddings,
        guidance: f64,
        size: &SizeConditioning,
        image: [usize; 2],
    ) -> crate::model::sampler::Conditioning {
        let c = crate::model::sampler::Conditioning::new(
            cond.hidden.clone(),
            uncond.hidden.clone(),
            guidance,
        );
        match (
            self.added_conditions(cond, size, image),
            self.added_conditions(uncond, size, image),
        ) {
            (Some(a), Some(u)) => c.with_added(a, u),
            _ => c,
        }
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

/// Token ids for every text tower of a pipeline ([`Pipeline::tokenize_all`]).
#[derive(Clone, Debug)]
pub struct PromptTokens {
    /// Tower 1's ids [B, max_length].
    pub ids: Tensor<2, Int>,
    /// SDXL's tower 2.
    pub tower_2: Option<TowerTokens>,
    /// "No negative prompt" where the pipeline zeroes it ([`Pipeline::tokenize_negative`]).
    pub zeros: bool,
}

/// One tower's ids and each row's pooled position.
#[derive(Clone, Debug)]
pub struct TowerTokens {
    pub ids: Tensor<2, Int>,
    pub pooled: Vec<usize>,
}

/// A text encoding: the UNet's context and (SDXL) the pooled embedding.
#[derive(Clone, Debug)]
pub struct TextEmbeddings {
    /// [B, N, cross_attention_dim].
    pub hidden: Tensor<3>,
    /// SDXL: tower 2's pooled projection [B, projection_dim].
    pub pooled: Option<Tensor<2>>,
}

/// SDXL's size conditioning in pixels, diffusers' `original_size`, `crops_coords_top_left`
/// and `target_size`; an unset size is the run's image size, as in diffusers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SizeConditioning {
    /// (height, width).
    pub original: Option<[usize; 2]>,
    /// (top, left).
    pub crop: [usize; 2],
    /// (height, width).
    pub target: Option<[usize; 2]>,
}

impl SizeConditioning {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// The six ids for an `image` = [height, width] run.
    pub fn time_ids(&self, image: [usize; 2]) -> TimeIds {
        let [oh, ow] = self.original.unwrap_or(image);
        let [ct, cl] = self.crop;
        let [th, tw] = self.target.unwrap_or(image);
        [oh, ow, ct, cl, th, tw].map(|v| v as f32)
    }
}

/// Checks a tokenizer against its text tower's config: ids within the vocabulary, sequences
/// within the position table.
fn check_tokenizer(
    files: &ModelFiles,
    tokenizer: &ClipTokenizer,
    config: &CLIPTextConfig,
    tower: &str,
    dir: &str,
) -> Result<()> {
    if tokenizer.id_bound() > config.vocab_size {
        return Err(Error::config(
            &files.display(&format!("{tower}/config.json")),
            format!(
                "vocab_size {} is smaller than {dir}/'s {} tokens (a tokenizer of another \
                 model? a single-file checkpoint takes its tokenizer from --model-config)",
                config.vocab_size,
                tokenizer.id_bound()
            ),
        ));
    }
    if tokenizer.max_length > config.max_position_embeddings {
        return Err(Error::config(
            &files.display(&format!("{dir}/tokenizer_config.json")),
            format!(
                "model_max_length {} exceeds {tower}'s max_position_embeddings {}",
                tokenizer.max_length, config.max_position_embeddings
            ),
        ));
    }
    Ok(())
}

/// SDXL's `add_embedding` input against what the towers and size ids give:
/// `projection_class_embeddings_input_dim` = tower 2's `projection_dim` + 6 ×
/// `addition_time_embed_dim`. A UNet with added conditions needs tower 2, and tower 2 a UNet
/// that takes them.
fn check_added_conditions(
    files: &ModelFiles,
    unet: &UNet2DConditionConfig,
    tower_2: Option<&CLIPTextConfig>,
) -> Result<()> {
    let file = files.display("unet/config.json");
    match (unet.projection_class_embeddings_input_dim, tower_2) {
        (Some(input), Some(c2)) if unet.addition_embed_type.is_some() => {
            let Some(proj) = c2.projection_dim else {
                return Err(Error::config(
                    &files.display("text_encoder_2/config.json"),
                    "`projection_dim` is missing (SDXL's second tower is a \
                     CLIPTextModelWithProjection)",
                ));
            };
            let d = unet.addition_time_embed_dim.unwrap_or(0);
            if input != proj + 6 * d {
                return Err(Error::config(
                    &file,
                    format!(
                        "projection_class_embeddings_input_dim {input} does not match \
                         text_encoder_2's projection_dim {proj} + 6 size ids × \
                         addition_time_embed_dim {d} = {}",
                        proj + 6 * d
                    ),
                ));
            }
            Ok(())
        }
        (_, Some(_)) => Err(Error::config(
            &file,
            "the folder has text_encoder_2 (SDXL) but the UNet has no \
             `addition_embed_type: \"text_time\"`",
        )),
        (_, None) if unet.addition_embed_type.is_some() => Err(Error::config(
            &file,
            "`addition_embed_type: \"text_time\"` (SDXL) needs text_encoder_2/, which the \
             folder lacks (a refiner-only model? only SDXL base pipelines load)",
        )),
        _ => Ok(()),
    }
}

/// Whether `model_index.json` names `component` with a class (not absent, `null` or
/// `[null, null]`).
fn index_names(index: Option<&serde_json::Value>, component: &str) -> bool {
    index
        .and_then(|v| v.get(component))
        .is_some_and(|c| match c {
            serde_json::Value::Array(a) => a.iter().any(|x| !x.is_null()),
            serde_json::Value::Null => false,
            _ => true,
        })
}

/// `model_index.json`, parsed (`None`: the folder has none).
fn model_index(files: &ModelFiles) -> Result<Option<serde_json::Value>> {
    if !files.has("model_index.json") {
        return Ok(None);
    }
    serde_json::from_str(files.text("model_index.json")?)
        .map(Some)
        .map_err(|e| Error::config(&files.display("model_index.json"), e.to_string()))
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
    /// SDXL's size ids (ignored by other models).
    pub size: SizeConditioning,
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
        let cond = self.encode(&prompts)?;
        let uncond = self.encode_tokens(&self.tokenize_negative(&options.negative_prompt)?);
        let [_, _, h, w] = x_t.dims();
        let f = self.downscale();
        let cond = self
            .conditioning(
                &cond,
                &uncond,
                options.guidance,
                &options.size,
                [h * f, w * f],
            )
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
