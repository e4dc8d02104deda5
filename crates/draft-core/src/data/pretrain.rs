//! `draft pretrain`: ordinary denoising training of a small text-to-image model on the
//! procedural [`shapes`](crate::data::shapes) dataset — the embedded default model.
//!
//! ε-prediction with SD-1.x's noise schedule (scaled-linear β 0.00085 → 0.012, 1000 steps) on a
//! `UNet2DConditionModel` and a `CLIPTextModel` trained together from scratch, in pixel space
//! (32×32 RGB in [-1, 1]; `model_index.json` names no VAE). Captions are dropped to "" with
//! probability `cond_drop` so classifier-free guidance works. The model is written in the
//! diffusers folder layout (configs, safetensors with diffusers/transformers keys, a word-level
//! `tokenizer.json`), so every other command loads it through [`Pipeline::load`].
//!
//! Parameters live in [`ParamStore`]s keyed by their file names; each step builds the models
//! over autodiff leaves of those tensors, so the gradients come back in file layout and
//! writing the model is writing the store. The weights written are an exponential moving
//! average of the trained ones.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use burn::prelude::*;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::data::shapes::{Attributes, COLORS, Shape, Shapes};
use crate::error::{Error, Result};
use crate::model::files::ModelFiles;
use crate::model::models::clip_text::{CLIPTextConfig, CLIPTextModel};
use crate::model::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::model::pipeline::{Pipeline, SampleOptions};
use crate::model::schedule::SchedulerConfig;
use crate::model::tokenizer::{ClipTokenizer, SpecialTokens};
use crate::model::var_builder::{ParamStore, VarBuilder};
use crate::noise::NoiseRng;
use crate::train::optim::{OptimState, Optimizer, clip_coefficient, global_norm};
use crate::train::trainer::stream_seed;

/// Every word of the dataset's captions: the tokenizer's vocabulary after the special tokens.
pub fn vocabulary() -> Vec<&'static str> {
    let mut words = vec!["a", "on", "background", "small", "large"];
    words.extend(COLORS.iter().map(|(name, _)| *name));
    words.extend(Shape::ALL.iter().map(|s| s.name()));
    words
}

/// Settings of a pretraining run (`draft pretrain` flags / TOML keys).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PretrainConfig {
    pub seed: u64,
    /// Images are `image_size`² pixels (the UNet's `sample_size`).
    pub image_size: usize,
    pub batch: usize,
    pub train_steps: usize,
    pub lr: f64,
    pub warmup_steps: usize,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub ema_decay: f64,
    /// Probability of training on the empty caption (for classifier-free guidance).
    pub cond_drop: f64,
    /// The UNet's `block_out_channels`; the first level has no attention, the others do.
    pub channels: Vec<usize>,
    pub layers_per_block: usize,
    /// Text encoder width (= the UNet's `cross_attention_dim`) and depth.
    pub text_width: usize,
    pub text_layers: usize,
    /// Min-SNR-γ loss weighting (Hang et al. 2023): each sample's ε-MSE is scaled by
    /// min(SNR(t), γ) / SNR(t), so the easy low-noise steps stop dominating. 0 = plain MSE.
    #[serde(default)]
    pub min_snr_gamma: f64,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        Self {
            seed: 0,
            image_size: 32,
            batch: 32,
            train_steps: 6000,
            lr: 1e-3,
            warmup_steps: 200,
            weight_decay: 0.0,
            max_grad_norm: 1.0,
            ema_decay: 0.999,
            cond_drop: 0.1,
            channels: vec![32, 64, 64],
            layers_per_block: 1,
            text_width: 64,
            text_layers: 2,
            min_snr_gamma: 0.0,
        }
    }
}

impl PretrainConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Input(m));
        if self.batch == 0 || self.train_steps == 0 {
            return bad("batch and train_steps must be at least 1".into());
        }
        if self.channels.len() < 2 {
            return bad("channels needs at least two levels (the first has no attention)".into());
        }
        let levels = self.channels.len() - 1;
        if self.image_size == 0 || !self.image_size.is_multiple_of(1 << levels) {
            return bad(format!(
                "image_size {} must be a positive multiple of {} for {} levels",
                self.image_size,
                1 << levels,
                self.channels.len()
            ));
        }
        if let Some(c) = self.channels.iter().find(|&&c| c == 0 || c % 8 != 0) {
            return bad(format!("channel count {c} is not a positive multiple of 8"));
        }
        if self.text_width == 0 || !self.text_width.is_multiple_of(4) || self.text_layers == 0 {
            return bad("text_width must be a positive multiple of 4, text_layers ≥ 1".into());
        }
        if !(self.min_snr_gamma >= 0.0 && self.min_snr_gamma.is_finite()) {
            return bad(format!(
                "min_snr_gamma must be ≥ 0, got {}",
                self.min_snr_gamma
            ));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad(format!("lr must be positive, got {}", self.lr));
        }
        if !(0.0..1.0).contains(&self.ema_decay) || !(0.0..1.0).contains(&self.cond_drop) {
            return bad("ema_decay and cond_drop must lie in [0, 1)".into());
        }
        Ok(())
    }

    /// `unet/config.json` of the model (diffusers' keys).
    pub fn unet_config_json(&self) -> serde_json::Value {
        let n = self.channels.len();
        let down: Vec<&str> = (0..n)
            .map(|i| {
                if i == 0 {
                    "DownBlock2D"
                } else {
                    "CrossAttnDownBlock2D"
                }
            })
            .collect();
        let up: Vec<&str> = (0..n)
            .map(|i| {
                if i == n - 1 {
                    "UpBlock2D"
                } else {
                    "CrossAttnUpBlock2D"
                }
            })
            .collect();
        serde_json::json!({
            "_class_name": "UNet2DConditionModel",
            "_diffusers_version": "0.39.0",
            "act_fn": "silu",
            "attention_head_dim": 4,
            "block_out_channels": self.channels,
            "center_input_sample": false,
            "cross_attention_dim": self.text_width,
            "down_block_types": down,
            "downsample_padding": 1,
            "flip_sin_to_cos": true,
            "freq_shift": 0,
            "in_channels": 3,
            "layers_per_block": self.layers_per_block,
            "mid_block_scale_factor": 1,
            "norm_eps": 1e-5,
            "norm_num_groups": 8,
            "out_channels": 3,
            "sample_size": self.image_size,
            "up_block_types": up,
            "use_linear_projection": false
        })
    }

    /// `text_encoder/config.json` (transformers' keys).
    pub fn text_config_json(&self) -> serde_json::Value {
        serde_json::json!({
            "architectures": ["CLIPTextModel"],
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
            "hidden_act": "quick_gelu",
            "hidden_size": self.text_width,
            "intermediate_size": 4 * self.text_width,
            "layer_norm_eps": 1e-5,
            "max_position_embeddings": MAX_LENGTH,
            "model_type": "clip_text_model",
            "num_attention_heads": 4,
            "num_hidden_layers": self.text_layers,
            "projection_dim": self.text_width,
            "vocab_size": 3 + vocabulary().len()
        })
    }
}

/// Tokens per prompt: BOS, up to 14 words, EOS/padding (captions have 8 words).
pub const MAX_LENGTH: usize = 16;

/// SD-1.x's noise schedule, as SD-1.4's `scheduler/scheduler_config.json` has it.
pub fn scheduler_config_json() -> serde_json::Value {
    serde_json::json!({
        "_class_name": "DDIMScheduler",
        "_diffusers_version": "0.39.0",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": false,
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "set_alpha_to_one": false,
        "steps_offset": 1,
        "trained_betas": null
    })
}

fn model_index_json() -> serde_json::Value {
    serde_json::json!({
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": "0.39.0",
        "feature_extractor": [null, null],
        "requires_safety_checker": false,
        "safety_checker": [null, null],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizerFast"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": [null, null]
    })
}

fn tokenizer_config_json() -> serde_json::Value {
    serde_json::json!({
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "unk_token": "<|unk|>",
        "model_max_length": MAX_LENGTH,
        "tokenizer_class": "PreTrainedTokenizerFast"
    })
}

fn pretty(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).expect("JSON values serialise")
}

/// One optimisation step's figures.
#[derive(Debug, Clone, Serialize)]
pub struct PretrainMetrics {
    pub step: usize,
    pub loss: f64,
    pub grad_norm: f64,
    pub lr: f64,
}

/// A pretraining run: parameters, their EMA, Adam moments and the step counter.
pub struct Pretrainer {
    pub config: PretrainConfig,
    unet_config: UNet2DConditionConfig,
    text_config: CLIPTextConfig,
    tokenizer_json: String,
    tokenizer: ClipTokenizer,
    alphas_cumprod: Vec<f32>,
    /// UNet then text encoder parameters (two stores, one optimiser).
    stores: [ParamStore; 2],
    ema: [Vec<Tensor<1>>; 2],
    /// AdamW's moments of each store.
    opt: [OptimState<1>; 2],
    pub step: usize,
    dataset: Shapes,
    device: Device,
}

const COMPONENTS: [&str; 2] = ["unet", "text_encoder"];

impl Pretrainer {
    /// A fresh run: both models initialised from `config.seed`.
    pub fn new(config: PretrainConfig, device: &Device) -> Result<Self> {
        config.validate()?;
        let unet_config = UNet2DConditionConfig::from_json(
            "unet/config.json",
            &pretty(&config.unet_config_json()),
        )?;
        let text_config = CLIPTextConfig::from_json(
            "text_encoder/config.json",
            &pretty(&config.text_config_json()),
        )?;
        let tokenizer_json = ClipTokenizer::word_level_json(&vocabulary())?;
        let special = SpecialTokens::from_json_files(&[(
            "tokenizer_config.json",
            &pretty(&tokenizer_config_json()),
        )])?;
        let tokenizer = ClipTokenizer::from_tokenizer_json(tokenizer_json.as_bytes(), &special)?;
        let scheduler =
            SchedulerConfig::from_json("scheduler_config.json", &pretty(&scheduler_config_json()))?;

        let unet = Rc::new(RefCell::new(ParamStore::init(stream_seed(
            config.seed,
            0,
            0,
            1,
        ))));
        UNet2DConditionModel::load(
            VarBuilder::from_store(unet.clone(), device),
            &unet_config,
            "unet/config.json",
        )?;
        let text = Rc::new(RefCell::new(ParamStore::init(stream_seed(
            config.seed,
            0,
            0,
            2,
        ))));
        CLIPTextModel::load(VarBuilder::from_store(text.clone(), device), &text_config)?;
        let freeze = |s: &Rc<RefCell<ParamStore>>| {
            let s = s.borrow();
            s.with_tensors(s.tensors())
        };
        let stores = [freeze(&unet), freeze(&text)];
        Ok(Self {
            ema: [stores[0].tensors(), stores[1].tensors()],
            opt: [
                OptimState::zeros(&stores[0].tensors()),
                OptimState::zeros(&stores[1].tensors()),
            ],
            stores,
            alphas_cumprod: scheduler.alphas_cumprod(),
            dataset: Shapes::new(config.seed, config.image_size),
            config,
            unet_config,
            text_config,
            tokenizer_json,
            tokenizer,
            step: 0,
            device: device.clone(),
        })
    }

    /// Trainable values in the UNet and the text encoder.
    pub fn num_params(&self) -> [usize; 2] {
        [self.stores[0].num_values(), self.stores[1].num_values()]
    }

    /// The learning rate of step `step`: linear warm-up, then constant.
    pub fn lr(&self, step: usize) -> f64 {
        let w = self.config.warmup_steps;
        if w > 0 && step < w {
            self.config.lr * (step + 1) as f64 / w as f64
        } else {
            self.config.lr
        }
    }

    /// One optimisation step on batch `step` of the dataset.
    pub async fn train_step(&mut self) -> Result<PretrainMetrics> {
        let c = &self.config;
        let (b, s) = (c.batch, c.image_size);
        let device = self.device.clone();
        let mut rng = StdRng::seed_from_u64(stream_seed(c.seed, self.step, 0, 11));
        let mut pixels = Vec::with_capacity(b * 3 * s * s);
        let mut ids = Vec::with_capacity(b * MAX_LENGTH);
        let mut timesteps = Vec::with_capacity(b);
        let mut signal = Vec::with_capacity(b);
        let mut noise_level = Vec::with_capacity(b);
        let mut weight = Vec::with_capacity(b);
        for j in 0..b {
            let ex = self.dataset.sample((self.step * b + j) as u64);
            pixels.extend(ex.pixels.iter().map(|p| p * 2.0 - 1.0));
            let caption = if rng.random_bool(c.cond_drop) {
                ""
            } else {
                ex.caption.as_str()
            };
            ids.extend(
                self.tokenizer
                    .encode(caption)?
                    .into_iter()
                    .map(|i| i as i64),
            );
            let t = rng.random_range(0..self.alphas_cumprod.len());
            let a = self.alphas_cumprod[t];
            timesteps.push(t as f32);
            signal.push(a.sqrt());
            noise_level.push((1.0 - a).sqrt());
            let snr = a as f64 / (1.0 - a as f64);
            weight.push(if c.min_snr_gamma > 0.0 {
                (snr.min(c.min_snr_gamma) / snr) as f32
            } else {
                1.0
            });
        }
        let x0 = Tensor::<4>::from_data(TensorData::new(pixels, [b, 3, s, s]), &device);
        let noise =
            NoiseRng::new(stream_seed(c.seed, self.step, 0, 12)).randn([b, 3, s, s], &device);
        let col = |v: Vec<f32>| Tensor::<4>::from_data(TensorData::new(v, [b, 1, 1, 1]), &device);
        let x_t = x0 * col(signal) + noise.clone() * col(noise_level);
        let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [b, MAX_LENGTH]), &device);

        let leaves: [Vec<Tensor<1>>; 2] = [0, 1].map(|i| {
            self.stores[i]
                .tensors()
                .into_iter()
                .map(|t| t.autodiff().require_grad())
                .collect()
        });
        let store =
            |i: usize| Rc::new(RefCell::new(self.stores[i].with_tensors(leaves[i].clone())));
        let unet = UNet2DConditionModel::load(
            VarBuilder::from_store(store(0), &device),
            &self.unet_config,
            "unet/config.json",
        )?;
        let text =
            CLIPTextModel::load(VarBuilder::from_store(store(1), &device), &self.text_config)?;
        let context = text.forward(ids);
        let pred = unet.forward_timesteps(x_t.autodiff(), &timesteps, context);
        let loss = ((pred - noise.autodiff()).square() * col(weight).autodiff()).mean();
        let loss_value = crate::read_f32(loss.clone().without_autodiff()).await?.0[0] as f64;
        let grads = loss.backward();
        let grads: [Vec<Tensor<1>>; 2] = [0, 1].map(|i| {
            leaves[i]
                .iter()
                .map(|l| {
                    l.grad(&grads)
                        .unwrap_or_else(|| l.clone().without_autodiff().zeros_like())
                })
                .collect()
        });
        drop((unet, text));

        let norm = global_norm(grads.iter().flatten()).await?;
        if !loss_value.is_finite() || !norm.is_finite() {
            return Err(Error::Input(format!(
                "step {}: non-finite loss {loss_value} / gradient norm {norm}; lower --lr",
                self.step
            )));
        }
        let clip = clip_coefficient(norm, (c.max_grad_norm > 0.0).then_some(c.max_grad_norm));
        let lr = self.lr(self.step);
        self.update(grads, clip, lr);
        self.step += 1;
        Ok(PretrainMetrics {
            step: self.step,
            loss: loss_value,
            grad_norm: norm,
            lr,
        })
    }

    fn update(&mut self, grads: [Vec<Tensor<1>>; 2], clip: f64, lr: f64) {
        let c = &self.config;
        let opt = Optimizer::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: c.weight_decay,
        };
        // EMA with the usual warm-up, so early checkpoints are not dominated by the init.
        let decay = c
            .ema_decay
            .min((1.0 + self.step as f64) / (10.0 + self.step as f64));
        for (i, grads) in grads.into_iter().enumerate() {
            let grads = grads
                .into_iter()
                .map(|g| if clip != 1.0 { g * clip } else { g })
                .collect();
            let new = opt.step(self.stores[i].tensors(), grads, lr, &mut self.opt[i]);
            for (e, p) in self.ema[i].iter_mut().zip(&new) {
                *e = e.clone() * decay + p.clone() * (1.0 - decay);
            }
            self.stores[i] = self.stores[i].with_tensors(new);
        }
    }

    /// The model as a diffusers folder (EMA weights, or the raw trained ones).
    pub async fn model_files(&self, ema: bool) -> Result<ModelFiles> {
        let mut files = ModelFiles::new("pretrained");
        files.insert("model_index.json", pretty(&model_index_json()).into_bytes());
        files.insert(
            "unet/config.json",
            pretty(&self.config.unet_config_json()).into_bytes(),
        );
        files.insert(
            "text_encoder/config.json",
            pretty(&self.config.text_config_json()).into_bytes(),
        );
        files.insert(
            "tokenizer/tokenizer.json",
            self.tokenizer_json.clone().into_bytes(),
        );
        files.insert(
            "tokenizer/tokenizer_config.json",
            pretty(&tokenizer_config_json()).into_bytes(),
        );
        files.insert(
            "scheduler/scheduler_config.json",
            pretty(&scheduler_config_json()).into_bytes(),
        );
        let meta = HashMap::from([
            ("format".to_string(), "pt".to_string()),
            ("pretrain_step".to_string(), self.step.to_string()),
        ]);
        for (i, path) in [
            "unet/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors",
        ]
        .into_iter()
        .enumerate()
        {
            let store = if ema {
                self.stores[i].with_tensors(self.ema[i].clone())
            } else {
                self.stores[i].clone()
            };
            files.insert(path, store.to_safetensors(Some(meta.clone())).await?);
        }
        Ok(files)
    }

    /// Everything needed to continue the run: parameters, EMA, Adam moments, step, settings.
    pub async fn checkpoint(&self) -> Result<Vec<u8>> {
        let mut tensors = Vec::new();
        for (i, component) in COMPONENTS.iter().enumerate() {
            let keys: Vec<(&String, &Vec<usize>)> = self.stores[i]
                .entries
                .iter()
                .map(|(k, (_, s))| (k, s))
                .collect();
            for (prefix, list) in [
                ("param", self.stores[i].tensors()),
                ("ema", self.ema[i].clone()),
                ("adam_m", self.opt[i].m.clone()),
                ("adam_v", self.opt[i].v.clone()),
            ] {
                for ((key, shape), t) in keys.iter().zip(list) {
                    let (values, _) = crate::read_f32(t).await?;
                    tensors.push((
                        format!("{prefix}.{component}.{key}"),
                        (*shape).clone(),
                        values,
                    ));
                }
            }
        }
        let meta = HashMap::from([
            ("step".to_string(), self.step.to_string()),
            (
                "config".to_string(),
                serde_json::to_string(&self.config).map_err(|e| Error::Input(e.to_string()))?,
            ),
        ]);
        crate::model::weights::serialize_f32(&tensors, Some(meta))
    }

    /// Continues from a [`checkpoint`](Self::checkpoint) written with the same settings
    /// (`train_steps` and `min_snr_gamma` may differ: a run can switch its loss weighting).
    pub fn restore(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let meta = crate::model::weights::read_string_metadata(name, bytes)?;
        let get = |k: &str| {
            meta.get(k)
                .cloned()
                .ok_or_else(|| Error::config(name, format!("checkpoint metadata lacks `{k}`")))
        };
        let saved: PretrainConfig = serde_json::from_str(&get("config")?)
            .map_err(|e| Error::config(name, format!("bad config in checkpoint: {e}")))?;
        let same = PretrainConfig {
            train_steps: self.config.train_steps,
            min_snr_gamma: self.config.min_snr_gamma,
            ..saved.clone()
        };
        if same != self.config {
            return Err(Error::Input(format!(
                "{name} was written by a run with other settings; resume with the same flags (saved: {})",
                get("config")?
            )));
        }
        let step: usize = get("step")?
            .parse()
            .map_err(|_| Error::config(name, "bad `step` in checkpoint metadata"))?;
        let w = crate::model::weights::Weights::from_bytes(name, bytes)?;
        for (i, component) in COMPONENTS.iter().enumerate() {
            let keys: Vec<String> = self.stores[i].entries.keys().cloned().collect();
            let load = |prefix: &str| -> Result<Vec<Tensor<1>>> {
                keys.iter()
                    .map(|k| {
                        // Stored with their real shapes; kept flat here.
                        let (values, _) = w.read_f32(&format!("{prefix}.{component}.{k}"))?;
                        let n = values.len();
                        Ok(Tensor::from_data(
                            TensorData::new(values, [n]),
                            &self.device,
                        ))
                    })
                    .collect()
            };
            let params = load("param")?;
            self.ema[i] = load("ema")?;
            self.opt[i].m = load("adam_m")?;
            self.opt[i].v = load("adam_v")?;
            self.opt[i].updates = step;
            self.stores[i] = self.stores[i].with_tensors(params);
        }
        self.step = step;
        Ok(())
    }
}

/// Captions whose (shape, colour) pair pretraining never saw: every held-out pair on every
/// other colour as background, small and large.
pub fn held_out_attributes() -> Vec<Attributes> {
    let mut out = Vec::new();
    for shape in Shape::ALL {
        for color in 0..COLORS.len() {
            if !Attributes::held_out(shape, color) {
                continue;
            }
            for background in (0..COLORS.len()).filter(|&b| b != color) {
                for large in [false, true] {
                    out.push(Attributes {
                        shape,
                        color,
                        background,
                        large,
                        center: (0.5, 0.5),
                    });
                }
            }
        }
    }
    out
}

/// How often the analyser reads back what the caption asked for.
#[derive(Debug, Clone, Serialize)]
pub struct Accuracy {
    pub samples: usize,
    pub shape: f64,
    pub color: f64,
    pub background: f64,
    /// Mean of the three.
    pub attributes: f64,
}

/// Samples one image per entry of `wanted` (DDIM `steps`, guidance `guidance`, seed `seed`,
/// batches of `batch`) and checks shape, colour and background with [`crate::data::shapes::analyse`].
/// Also returns the images ([N, 3, S, S] in [0, 1], planar per image).
pub async fn attribute_accuracy(
    pipeline: &Pipeline,
    wanted: &[Attributes],
    steps: usize,
    guidance: f64,
    seed: u64,
    batch: usize,
) -> Result<(Accuracy, Vec<Vec<f32>>)> {
    let size = pipeline.default_image_size();
    let shape = pipeline.latent_shape(size, size)?;
    let (mut ok_shape, mut ok_color, mut ok_bg) = (0usize, 0usize, 0usize);
    let mut images = Vec::with_capacity(wanted.len());
    for (chunk_index, chunk) in wanted.chunks(batch.max(1)).enumerate() {
        let prompts: Vec<String> = chunk.iter().map(|a| a.caption()).collect();
        let options = SampleOptions {
            prompts,
            negative_prompt: String::new(),
            steps,
            guidance,
            eta: 0.0,
            seed: seed.wrapping_add(chunk_index as u64),
            size: Default::default(),
        };
        let x_t = NoiseRng::new(stream_seed(seed, chunk_index, 0, 21)).randn(
            [chunk.len(), shape[0], shape[1], shape[2]],
            &pipeline.device,
        );
        let latents = pipeline.sample_latents(&options, x_t, |_, _| {})?;
        let (values, _) = crate::read_f32(pipeline.decode(latents)).await?;
        let per = 3 * size * size;
        for (a, pixels) in chunk.iter().zip(values.chunks(per)) {
            let r = crate::data::shapes::analyse(pixels, size);
            ok_shape += (r.shape == a.shape) as usize;
            ok_color += (r.color == a.color) as usize;
            ok_bg += (r.background == a.background) as usize;
            images.push(pixels.to_vec());
        }
    }
    let n = wanted.len().max(1) as f64;
    let (shape, color, background) = (ok_shape as f64 / n, ok_color as f64 / n, ok_bg as f64 / n);
    Ok((
        Accuracy {
            samples: wanted.len(),
            shape,
            color,
            background,
            attributes: (shape + color + background) / 3.0,
        },
        images,
    ))
}
