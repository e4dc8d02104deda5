//! A Stable Diffusion pipeline in the diffusers folder layout, loaded from bytes.
//!
//! The caller (CLI, browser) supplies the files as `relative path → bytes` in
//! [`ModelFiles`]; this module knows which files the layout holds and wires the components.
//! Architecture numbers come from each component's `config.json`.

use std::collections::BTreeMap;

use burn::prelude::*;
use burn::tensor::FloatDType;

use crate::error::{Error, Result};
use crate::lora::{LoraFile, LoraPlan, LoraTable, LoraTarget};
use crate::models::clip_text::{CLIPTextConfig, CLIPTextModel};
use crate::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::models::vae::{AutoencoderKL, AutoencoderKLConfig};
use crate::schedule::SchedulerConfig;
use crate::tokenizer::{ClipTokenizer, SpecialTokens};
use crate::var_builder::VarBuilder;
use crate::weights::Weights;

/// The largest batch of images any command samples or trains on at once (a guard against a
/// setting that would allocate without bound, not a practical limit).
pub const MAX_BATCH: usize = 4096;
/// The largest image side in pixels.
pub const MAX_IMAGE_SIDE: usize = 16384;

/// Refuses a batch of 0 or above [`MAX_BATCH`]; `what` names the setting.
pub fn check_batch(what: &str, n: usize) -> Result<()> {
    if n == 0 || n > MAX_BATCH {
        return Err(Error::Input(format!(
            "{what} must be between 1 and {MAX_BATCH}, got {n}"
        )));
    }
    Ok(())
}
/// The files of a diffusers pipeline folder, by path relative to the folder.
///
/// Weights may be one safetensors file per component, a sharded set (`*.safetensors.index.json`
/// and the shards its `weight_map` names), a variant (`diffusion_pytorch_model.fp16.safetensors`,
/// chosen with [`variant`](Self::variant) as diffusers' `variant=`), or PyTorch `.bin` files,
/// whose bytes the shell has converted to safetensors (the core has no pickle reader). A
/// single-file checkpoint in the original LDM layout is held under [`checkpoint`](Self::checkpoint)
/// instead, with the folder's config files beside it ([`crate::layouts::ldm::model_files`]).
pub struct ModelFiles {
    /// How the folder is named in error messages (its path, for the CLI).
    pub name: String,
    pub files: BTreeMap<String, Vec<u8>>,
    /// The weights variant to load (`fp16`, …; a component without it loads its plain files);
    /// `None`: the plain files, else `fp16`.
    pub variant: Option<String>,
    /// The key in `files` of a single-file LDM checkpoint holding every component's weights.
    pub checkpoint: Option<String>,
}

/// The components that have weight files.
pub const COMPONENTS: [&str; 3] = ["unet", "vae", "text_encoder"];

impl ModelFiles {
    /// Every file other than weights the loader may read.
    pub const LAYOUT: &'static [&'static str] = &[
        "model_index.json",
        "unet/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        "tokenizer/tokenizer.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer/tokenizer_config.json",
        "tokenizer/special_tokens_map.json",
        "scheduler/scheduler_config.json",
    ];

    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            files: BTreeMap::new(),
            variant: None,
            checkpoint: None,
        }
    }

    /// Collects every file of [`Self::LAYOUT`] and the weights [`Self::weight_names`] picks
    /// that `read(path)` finds (`Ok(None)`: absent).
    pub fn read_layout<E>(
        name: impl Into<String>,
        read: impl FnMut(&str) -> std::result::Result<Option<Vec<u8>>, E>,
    ) -> std::result::Result<Self, E> {
        Self::read_layout_variant(name, None, read)
    }

    /// [`read_layout`](Self::read_layout) for a weights variant (`--variant fp16`): only the
    /// first weights found per component are read, and for a sharded set its shards.
    pub fn read_layout_variant<E>(
        name: impl Into<String>,
        variant: Option<&str>,
        mut read: impl FnMut(&str) -> std::result::Result<Option<Vec<u8>>, E>,
    ) -> std::result::Result<Self, E> {
        let mut files = Self::read_configs(name, &mut read)?;
        files.variant = variant.map(str::to_string);
        for component in COMPONENTS {
            for path in files.weight_names(component) {
                let Some(bytes) = read(&path)? else {
                    continue;
                };
                // A malformed index is reported when the component loads.
                let shards = shard_names(&bytes).unwrap_or_default();
                files.insert(path, bytes);
                for shard in shards {
                    let rel = format!("{component}/{shard}");
                    if let Some(bytes) = read(&rel)? {
                        files.insert(rel, bytes);
                    }
                }
                break;
            }
        }
        Ok(files)
    }

    /// Collects the files of [`Self::LAYOUT`] that `read(path)` finds — configs and tokenizer,
    /// no weights (`--model-config`).
    pub fn read_configs<E>(
        name: impl Into<String>,
        mut read: impl FnMut(&str) -> std::result::Result<Option<Vec<u8>>, E>,
    ) -> std::result::Result<Self, E> {
        let mut files = Self::new(name);
        for rel in Self::LAYOUT {
            if let Some(bytes) = read(rel)? {
                files.insert(*rel, bytes);
            }
        }
        Ok(files)
    }

    /// The weight files `component` may have, best first: the chosen variant, then the plain
    /// files (without a variant: the plain files, then `fp16`), safetensors before a sharded safetensors index before
    /// PyTorch `.bin` (single, then sharded). diffusers' names.
    pub fn weight_names(&self, component: &str) -> Vec<String> {
        let (st, bin) = if component == "text_encoder" {
            ("model", "pytorch_model")
        } else {
            ("diffusion_pytorch_model", "diffusion_pytorch_model")
        };
        let variants: Vec<Option<&str>> = match &self.variant {
            // As diffusers: a component without the variant loads its plain files.
            Some(v) => vec![Some(v.as_str()), None],
            None => vec![None, Some("fp16")],
        };
        let mut names = Vec::new();
        for v in variants {
            let file = |stem: &str, ext: &str| match v {
                Some(v) => format!("{component}/{stem}.{v}.{ext}"),
                None => format!("{component}/{stem}.{ext}"),
            };
            let index = |stem: &str, ext: &str| match v {
                Some(v) => format!("{component}/{stem}.{ext}.index.{v}.json"),
                None => format!("{component}/{stem}.{ext}.index.json"),
            };
            names.extend([
                file(st, "safetensors"),
                index(st, "safetensors"),
                file(bin, "bin"),
                index(bin, "bin"),
            ]);
        }
        names
    }

    pub fn insert(&mut self, path: impl Into<String>, bytes: Vec<u8>) {
        self.files.insert(path.into(), bytes);
    }

    /// The name a file is reported under: `<folder>/<path>`.
    pub fn display(&self, path: &str) -> String {
        format!("{}/{}", self.name.trim_end_matches('/'), path)
    }

    pub fn has(&self, path: &str) -> bool {
        self.files.contains_key(path)
    }

    pub fn bytes(&self, path: &str) -> Result<&[u8]> {
        self.files
            .get(path)
            .map(Vec::as_slice)
            .ok_or_else(|| Error::config(&self.display(path), "file is missing"))
    }

    pub fn text(&self, path: &str) -> Result<&str> {
        std::str::from_utf8(self.bytes(path)?)
            .map_err(|_| Error::config(&self.display(path), "not UTF-8 text"))
    }

    /// The weights of `component` (`unet`, `vae`, `text_encoder`) under the diffusers /
    /// transformers keys its module asks for, whatever layout they are stored in.
    pub fn component_weights(&self, component: &str) -> Result<Weights<'_>> {
        if let Some(key) = &self.checkpoint {
            let w = Weights::from_bytes(&self.name, self.bytes(key)?)?;
            return crate::layouts::ldm::component(w, component);
        }
        let names = self.weight_names(component);
        let Some(path) = names.iter().find(|p| self.has(p)) else {
            let looked: Vec<&str> = names
                .iter()
                .map(|n| n.rsplit('/').next().unwrap_or(n))
                .collect();
            let hint = match &self.variant {
                Some(v) => format!("; the folder has no weights of variant `{v}`"),
                None => String::new(),
            };
            return Err(Error::config(
                &self.display(&names[0]),
                format!(
                    "file is missing, and so are the other weight files of `{component}` \
                     ({}){hint}",
                    looked[1..].join(", ")
                ),
            ));
        };
        let w = if path.ends_with(".json") {
            let shards = shard_names(self.bytes(path)?)
                .map_err(|reason| Error::config(&self.display(path), reason))?;
            let mut parts = Vec::with_capacity(shards.len());
            for shard in shards {
                let rel = format!("{component}/{shard}");
                parts.push((self.display(&rel), self.bytes(&rel)?));
            }
            Weights::from_shards(&self.display(path), &parts)?
        } else {
            Weights::from_bytes(&self.display(path), self.bytes(path)?)?
        };
        if component == "text_encoder" {
            return crate::layouts::text_model_prefix(w);
        }
        Ok(w)
    }
}

/// The shard files a `*.index.json` names in its `weight_map`, in order of first use.
fn shard_names(index: &[u8]) -> std::result::Result<Vec<String>, String> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let index: Index = serde_json::from_slice(index).map_err(|e| e.to_string())?;
    let mut names: Vec<String> = index.weight_map.into_values().collect();
    names.sort();
    names.dedup();
    if let Some(bad) = names
        .iter()
        .find(|n| n.contains('/') || n.contains('\\') || n.starts_with('.'))
    {
        return Err(format!("shard `{bad}` is not a file name in the folder"));
    }
    Ok(names)
}

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
    /// of rows can keep it there ([`crate::strips`]). Default: [`crate::strips::MAX_BUFFER_BYTES`]
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
            max_buffer_bytes: crate::strips::MAX_BUFFER_BYTES,
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
        let f = self.downscale();
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
        Ok([self.unet_config.in_channels, height / f, width / f])
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
    /// gradient [`SegmentChain::vjp`](crate::checkpoint::SegmentChain::vjp) takes with one
    /// segment's activations at a time.
    pub fn decode_chain(&self) -> crate::checkpoint::SegmentChain<'_> {
        let to_image = |x: Tensor<4>| (x / 2.0 + 0.5).clamp(0.0, 1.0);
        match (&self.vae, &self.vae_config) {
            (Some(vae), Some(c)) => {
                let scale = c.scaling_factor;
                vae.decode_chain(move |z| z / scale, to_image, self.max_buffer_bytes)
            }
            _ => crate::checkpoint::SegmentChain::new(vec![Box::new(move |x| {
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

/// The tokenizer files a CLIP tokenizer is built from, in a folder (`tokenizer/` of a
/// diffusers model, the top level of a transformers CLIP repo).
pub const TOKENIZER_FILES: [&str; 5] = [
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

fn load_tokenizer(files: &ModelFiles) -> Result<ClipTokenizer> {
    load_tokenizer_in(files, "tokenizer/")
}

/// A CLIP tokenizer from the [`TOKENIZER_FILES`] under `dir` (`""` or ending in `/`):
/// `tokenizer.json` if present, else `vocab.json` + `merges.txt`.
pub fn load_tokenizer_in(files: &ModelFiles, dir: &str) -> Result<ClipTokenizer> {
    let path = |name: &str| format!("{dir}{name}");
    let mut settings = Vec::new();
    for p in [
        path("special_tokens_map.json"),
        path("tokenizer_config.json"),
    ] {
        if files.has(&p) {
            let text = files.text(&p)?;
            settings.push((p, text));
        }
    }
    let settings: Vec<(&str, &str)> = settings.iter().map(|(a, b)| (a.as_str(), *b)).collect();
    let special = SpecialTokens::from_json_files(&settings).map_err(|e| match e {
        Error::Tokenizer { file, reason } => Error::Tokenizer {
            file: files.display(&file),
            reason,
        },
        e => e,
    })?;
    let result = if files.has(&path("tokenizer.json")) {
        ClipTokenizer::from_tokenizer_json(files.bytes(&path("tokenizer.json"))?, &special)
    } else {
        ClipTokenizer::from_vocab_merges(
            files.text(&path("vocab.json"))?,
            files.text(&path("merges.txt"))?,
            &special,
        )
    };
    // The tokenizer names files by their bare names; report them inside this folder.
    result.map_err(|e| match e {
        Error::Tokenizer { file, reason } => Error::Tokenizer {
            file: files.display(&path(&file)),
            reason,
        },
        e => e,
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
        let ddim = crate::schedule::Ddim::new(&self.scheduler, options.steps)?;
        let cond = self.encode_prompts(&prompts)?;
        let uncond = self.encode_prompts(std::slice::from_ref(&options.negative_prompt))?;
        let cond = crate::sampler::Conditioning::new(cond, uncond, options.guidance)
            .with_dtype(self.sampling_dtype);
        let mut rng = crate::noise::NoiseRng::new(options.seed.wrapping_add(1));
        let shape = x_t.dims();
        let device = self.device.clone();
        crate::sampler::sample(
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
