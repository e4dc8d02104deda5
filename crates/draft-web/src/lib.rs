//! The browser shell: wasm-bindgen bindings over draft-core's [`Trainer`], the same training
//! loop the `draft` binary runs. The page (`web/`) drives it one optimizer update per promise,
//! so it stays responsive and can stop between updates.
//!
//! WebGPU comes through Burn's wgpu backend; without it the page can fall back to Burn's
//! pure-Rust CPU backend compiled to WebAssembly (slow, but the same numbers).

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;

use burn::prelude::*;
use burn::tensor::FloatDType;
use draft_core::data::default_model;
use draft_core::model::pipeline::LoraSetup;
use draft_core::reward::builtin::RewardOptions;
use draft_core::reward::files::{RewardFiles, RewardSource};
use draft_core::train::config::{MethodName, TrainConfig};
use draft_core::train::run::{Run, RunPolicy};
use draft_core::train::trainer::{
    CheckpointMeta, EvalSummary, FixedEval, StepMetrics, Trainer, prompt_set,
};
use draft_core::{ModelFiles, Pipeline, read_f32};
use serde::{Deserialize, Serialize};

#[cfg(target_arch = "wasm32")]
mod bindings;
#[cfg(target_arch = "wasm32")]
pub use bindings::{RunFiles, WebTrainer};

thread_local! {
    /// Burn refuses to initialise the wgpu runtime twice: one device per page.
    static WEBGPU: RefCell<Option<(Device, String)>> = const { RefCell::new(None) };
}

/// `"webgpu"` or `"cpu"` → a Burn device and its name for the page.
pub async fn open_device(kind: &str) -> Result<(Device, String), String> {
    match kind {
        "webgpu" => {
            if let Some(found) = WEBGPU.with(|d| d.borrow().clone()) {
                return Ok(found);
            }
            #[cfg(target_arch = "wasm32")]
            if !bindings::install_subgroups_shim() {
                return Err("this browser has no WebGPU (navigator.gpu is missing)".into());
            }
            let device = Device::wgpu_options()
                .init_async()
                .await
                .map_err(|e| format!("cannot open a WebGPU device: {e}"))?;
            let name = match device.identity() {
                Some(id) if !id.name.is_empty() => format!("{} (WebGPU)", id.name),
                _ => "WebGPU".to_string(),
            };
            WEBGPU.with(|d| *d.borrow_mut() = Some((device.clone(), name.clone())));
            Ok((device, name))
        }
        "cpu" => Ok((
            Device::flex(),
            "CPU (Burn flex backend in WebAssembly)".into(),
        )),
        other => Err(format!("unknown device `{other}` (expected webgpu or cpu)")),
    }
}

/// The dtype the diffusion model's weight matrices and kernels are kept in on `device`, and the
/// one its UNet computes in on the sampling steps no gradient goes through
/// ([`Pipeline::sampling_dtype`]): f16 on a WebGPU adapter with `shader-f16` (half the memory
/// and bandwidth; LoRA, optimizer state, the back-propagated steps, the decoder, reward and
/// loss stay f32: docs/parity.md, "f16 weights" and "f16 sampling"), f32 elsewhere — as the
/// CLI's `--weights-dtype auto --sampling-dtype auto`.
pub fn weights_dtype(device: &Device) -> FloatDType {
    if *device != Device::flex() && device.supports_dtype(FloatDType::F16) {
        FloatDType::F16
    } else {
        FloatDType::F32
    }
}

/// What the page can set; everything else is [`TrainConfig::default`]. Field names are the
/// CLI's flags in camelCase.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct WebOptions {
    /// `"webgpu"` or `"cpu"`.
    pub device: String,
    /// Training prompts; empty: the model's built-in set (shapes for the embedded model).
    pub prompts: Vec<String>,
    /// `name=weight` reward terms.
    pub rewards: Vec<String>,
    pub target_color: [f32; 3],
    /// draft | draft-k | draft-lv | refl | alignprop.
    pub method: String,
    pub k: usize,
    pub lv_samples: usize,
    pub t_min: usize,
    pub t_max: usize,
    pub lr: f64,
    /// Optimizer updates the page plans (it stops the loop; kept in the checkpointed config).
    pub train_steps: usize,
    /// DDIM sampling steps.
    pub steps: usize,
    pub batch: usize,
    pub guidance: f64,
    pub rank: usize,
    pub seed: u64,
    /// Images in the evaluation set (`--preview`).
    pub preview: usize,
    /// Evaluate every this many updates (`--eval-every`).
    pub eval_every: usize,
    /// Stop when the evaluation set's diversity falls below this fraction of its value before
    /// training (`--min-diversity`).
    pub min_diversity: Option<f64>,
    /// Hand back a checkpoint every this many updates and after the last (0: never;
    /// `--checkpoint-every`).
    pub checkpoint_every: usize,
}

impl Default for WebOptions {
    fn default() -> Self {
        let d = TrainConfig::default();
        Self {
            device: "webgpu".into(),
            prompts: Vec::new(),
            rewards: d.rewards,
            target_color: d.reward_options.target_color,
            method: d.method.name().into(),
            k: d.k,
            lv_samples: d.lv_samples,
            t_min: d.t_min,
            t_max: d.t_max,
            lr: default_model::TRAIN_LR,
            train_steps: default_model::TRAIN_STEPS,
            steps: d.steps,
            batch: d.batch,
            guidance: d.guidance,
            rank: d.rank,
            seed: d.seed,
            preview: 4,
            eval_every: 5,
            min_diversity: None,
            checkpoint_every: 5,
        }
    }
}

impl WebOptions {
    pub fn parse(json: &str) -> Result<Self, String> {
        serde_json::from_str(json).map_err(|e| format!("bad training options: {e}"))
    }

    /// The run policy: the CLI's.
    pub fn policy(&self) -> Result<RunPolicy, String> {
        let p = RunPolicy {
            eval_images: self.preview,
            eval_every: self.eval_every,
            checkpoint_every: self.checkpoint_every,
            min_diversity: self.min_diversity,
        };
        p.validate().map_err(|e| e.to_string())?;
        Ok(p)
    }

    /// The core configuration and the prompt list, checked as the CLI checks its flags.
    pub fn config(&self) -> Result<(TrainConfig, Vec<String>), String> {
        let d = TrainConfig::default();
        let config = TrainConfig {
            method: MethodName::parse(&self.method).map_err(|e| e.to_string())?,
            k: self.k,
            lv_samples: self.lv_samples,
            t_min: self.t_min,
            t_max: self.t_max.min(self.steps),
            k_max: d.k_max.min(self.steps),
            rewards: self.rewards.clone(),
            reward_options: RewardOptions {
                target_color: self.target_color,
            },
            batch: self.batch,
            steps: self.steps,
            guidance: self.guidance,
            train_steps: self.train_steps,
            lr: self.lr,
            rank: self.rank,
            seed: self.seed,
            ..d
        };
        config.validate().map_err(|e| e.to_string())?;
        let prompts: Vec<String> = self
            .prompts
            .iter()
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty())
            .collect();
        let prompts = if prompts.is_empty() {
            prompt_set(default_model::PROMPT_SET).map_err(|e| e.to_string())?
        } else {
            prompts
        };
        Ok((config, prompts))
    }

    /// These options with the training settings and prompts of a checkpoint (`draft train`'s
    /// or the page's), as the page's form shows them: a resumed run continues with the
    /// checkpoint's settings, whatever the form held.
    pub fn with_checkpoint(&self, meta: &CheckpointMeta) -> WebOptions {
        let c = &meta.config;
        WebOptions {
            prompts: meta.prompts.clone().unwrap_or_else(|| self.prompts.clone()),
            rewards: c.rewards.clone(),
            target_color: c.reward_options.target_color,
            method: c.method.name().into(),
            k: c.k,
            lv_samples: c.lv_samples,
            t_min: c.t_min,
            t_max: c.t_max,
            lr: c.lr,
            train_steps: self.train_steps.max(meta.step),
            steps: c.steps,
            batch: c.batch,
            guidance: c.guidance,
            rank: c.rank,
            seed: c.seed,
            ..self.clone()
        }
    }
}

/// What a run is built from besides its options.
#[derive(Default)]
pub struct RunInputs {
    /// A diffusers pipeline folder; `None`: the embedded model.
    pub model: Option<ModelFiles>,
    /// A checkpoint to continue: `(file name, bytes)`.
    pub checkpoint: Option<(String, Vec<u8>)>,
    /// The learned rewards' weight files by `--reward-model` name (`clip`, `pickscore`,
    /// `hpsv2`, `laion-aesthetic`, `tokenizer`), as the CLI takes them.
    pub rewards: BTreeMap<String, RewardSource>,
    /// The WebGPU adapter's largest storage-buffer binding (`maxStorageBufferBindingSize`,
    /// capped by `maxBufferSize`): a model, reward or batch needing a larger buffer is refused
    /// before anything loads. `None`: unchecked (the CPU backend).
    pub max_binding_bytes: Option<u64>,
}

/// Refuses what cannot be read in a browser or cannot fit the adapter, before loading: PyTorch
/// pickles (the page has no pickle reader), tensors over the binding limit, a training batch
/// whose largest activation is over it.
fn check_inputs(
    model: &ModelFiles,
    rewards: &BTreeMap<String, RewardSource>,
    config: &TrainConfig,
    eval_images: usize,
    limit: Option<u64>,
) -> Result<(), String> {
    use draft_core::model::limits;
    let pickle = |name: &str, bytes: &[u8]| -> Result<(), String> {
        let lower = name.to_ascii_lowercase();
        let is_pickle = [".bin", ".pt", ".pth", ".ckpt"]
            .iter()
            .any(|e| lower.ends_with(e));
        if is_pickle && safetensors::SafeTensors::read_metadata(bytes).is_err() {
            return Err(format!(
                "{name} is a PyTorch pickle, which the page cannot read: convert it once with \
                 `draft convert {name} OUT.safetensors` and pick the .safetensors file"
            ));
        }
        Ok(())
    };
    for (role, source) in rewards {
        match source {
            RewardSource::Folder(files) => {
                for (path, bytes) in &files.files {
                    pickle(&files.display(path), bytes)?;
                }
                if let Some(l) = limit {
                    limits::check_tensor_sizes(&format!("reward model {role}"), files, l)
                        .map_err(|e| e.to_string())?;
                }
            }
            RewardSource::File { name, bytes, .. } => {
                pickle(name, bytes)?;
                if let Some(l) = limit {
                    limits::check_file_tensor_sizes(
                        &format!("reward model {role}"),
                        name,
                        bytes,
                        l,
                    )
                    .map_err(|e| e.to_string())?;
                }
            }
        }
    }
    let Some(limit) = limit else {
        return Ok(());
    };
    limits::check_tensor_sizes(&format!("model {}", model.name), model, limit)
        .map_err(|e| e.to_string())?;
    if let Some(json) = model.files.get("unet/config.json") {
        let text = String::from_utf8_lossy(json);
        let unet = draft_core::model::models::unet::UNet2DConditionConfig::from_json(
            &model.display("unet/config.json"),
            &text,
        )
        .map_err(|e| e.to_string())?;
        let per_update = match config.method {
            MethodName::DraftLv => config.batch * config.lv_samples,
            _ => config.batch,
        };
        let batch = per_update.max(draft_core::train::trainer::eval_set_size(
            eval_images.max(1),
        ));
        let vae = match model.files.get("vae/config.json") {
            Some(json) => Some(
                draft_core::model::models::vae::AutoencoderKLConfig::from_json(
                    &model.display("vae/config.json"),
                    &String::from_utf8_lossy(json),
                )
                .map_err(|e| e.to_string())?,
            ),
            None => None,
        };
        let side = unet.sample_size;
        limits::check_activations(&unet, vae.as_ref(), [side, side], batch, limit)
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// What the page shows about the run (the "adapter in use" panel).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RunInfo {
    pub model: String,
    pub device: String,
    /// How the diffusion model's weight matrices and kernels are kept, and what its sampling
    /// steps without gradient compute in: `"f16"` on an adapter that computes in f16
    /// (`shader-f16`), else `"f32"` ([`weights_dtype`]).
    pub weights: String,
    pub method: String,
    pub reward: String,
    pub lora_layers: usize,
    pub lora_params: usize,
    pub rank: usize,
    pub alpha: f64,
    pub lora_targets: Vec<String>,
    pub prompts: usize,
    pub batch: usize,
    pub steps: usize,
    pub lr: f64,
    /// Updates done when the run was opened (a resumed checkpoint's step, else 0).
    pub step: usize,
    /// The evaluation set's figures before training, when the checkpoint carried them.
    pub before: Option<EvalSummary>,
    /// The run's settings as the page's form shows them (a checkpoint's, when resumed).
    pub options: WebOptions,
    /// Notes about the reward models (e.g. an architecture assumed).
    pub notes: Vec<String>,
}

/// One training run: the core run (trainer + run policy, the CLI's) and what the page shows
/// about it. The page's `WebTrainer` wraps one; native tests use it directly.
pub struct Session {
    run: RefCell<Run>,
    /// The reward terms' names, in the order of an evaluation's `terms`.
    term_names: Vec<String>,
    pub info: RunInfo,
    updates: Cell<usize>,
}

// The run is borrowed across awaits on purpose: a second call while one is in flight finds it
// borrowed and is refused (`BUSY`) instead of interleaving with it.
#[allow(clippy::await_holding_refcell_ref)]
impl Session {
    /// Loads the model on the options' device with trainable LoRA slots and builds the
    /// trainer; with a checkpoint, the run continues from it with its settings and prompts.
    pub async fn build(options: &WebOptions, inputs: RunInputs) -> Result<Session, String> {
        let RunInputs {
            model,
            checkpoint,
            rewards,
            max_binding_bytes,
        } = inputs;
        let model = model.unwrap_or_else(default_model::files);
        let meta = match &checkpoint {
            Some((name, bytes)) => {
                Some(CheckpointMeta::read(name, bytes).map_err(|e| e.to_string())?)
            }
            None => None,
        };
        let options = match &meta {
            Some(m) => options.with_checkpoint(m),
            None => options.clone(),
        };
        let (mut config, prompts) = options.config()?;
        if let Some(m) = &meta {
            // Every setting the page has no field for (negative prompt, clipping, targets…).
            config = TrainConfig {
                train_steps: options.train_steps,
                ..m.config.clone()
            };
        }
        let policy = options.policy()?;
        check_inputs(
            &model,
            &rewards,
            &config,
            options.preview,
            max_binding_bytes,
        )?;
        let reward_files = RewardFiles::new(&config.rewards, rewards).map_err(|e| e.to_string())?;
        let notes = reward_files.notes().to_vec();
        let (device, device_name) = open_device(&options.device).await?;
        let weights_dtype = weights_dtype(&device);
        let mut pipeline = Pipeline::load_with(
            &model,
            &device,
            &LoraSetup::Targets(config.lora_targets.clone()),
            weights_dtype,
        )
        .map_err(|e| e.to_string())?;
        pipeline.sampling_dtype = weights_dtype;
        // The adapter's binding limit bounds the VAE decoder's strips (the CPU backend has none).
        if let Some(limit) = max_binding_bytes.filter(|_| device != Device::flex()) {
            pipeline.max_buffer_bytes = pipeline.max_buffer_bytes.min(limit);
        }
        let reward = reward_files
            .build(
                &config.rewards,
                &config.reward_options,
                Some(&model),
                &device,
            )
            .map_err(|e| e.to_string())?;
        let mut trainer = Trainer::new(pipeline, config, reward, prompts, None, None)
            .map_err(|e| e.to_string())?;
        if let Some((name, bytes)) = &checkpoint {
            trainer.restore(name, bytes).map_err(|e| e.to_string())?;
        }
        let c = &trainer.config;
        let info = RunInfo {
            model: model.name.clone(),
            device: device_name,
            weights: match weights_dtype {
                FloatDType::F16 => "f16",
                _ => "f32",
            }
            .into(),
            method: c.method.name().into(),
            reward: trainer.reward.describe(),
            lora_layers: trainer.pipeline.lora.len(),
            lora_params: trainer.pipeline.lora.num_params(),
            rank: c.rank,
            alpha: c.alpha(),
            lora_targets: c
                .lora_targets
                .iter()
                .map(|t| t.name().to_string())
                .collect(),
            prompts: trainer.prompts.len(),
            batch: trainer.batch(),
            steps: c.steps,
            lr: c.lr,
            step: trainer.step,
            before: trainer.before.clone(),
            options: options.clone(),
            notes,
        };
        let run = Run::new(trainer, policy).map_err(|e| e.to_string())?;
        let term_names = run
            .trainer
            .reward
            .terms
            .iter()
            .map(|(r, _)| r.name().to_string())
            .collect();
        Ok(Session {
            run: RefCell::new(run),
            term_names,
            updates: Cell::new(info.step),
            info,
        })
    }

    /// The run; `None` while another call (an update, an evaluation) holds it.
    pub fn run(&self) -> Option<std::cell::RefMut<'_, Run>> {
        self.run.try_borrow_mut().ok()
    }

    /// The trainer; `None` while another call holds it.
    pub fn trainer(&self) -> Option<std::cell::RefMut<'_, Trainer>> {
        self.run()
            .map(|r| std::cell::RefMut::map(r, |r| &mut r.trainer))
    }

    /// Optimizer updates done.
    pub fn updates(&self) -> usize {
        self.updates.get()
    }

    /// The evaluation set before training (once, at the start of the run); `None` when the
    /// run has it already or evaluates nothing.
    pub async fn start(&self) -> Result<Option<Evaluation>, String> {
        let eval = self
            .run()
            .ok_or(BUSY)?
            .evaluate_before()
            .await
            .map_err(|e| e.to_string())?;
        match eval {
            Some(e) => Ok(Some(self.for_page(e).await?)),
            None => Ok(None),
        }
    }

    /// One optimizer update and what the run policy does after it, with `total` updates
    /// planned and an evaluation every `eval_every` (the page may change both between calls).
    pub async fn update(&self, total: usize, eval_every: usize) -> Result<WebUpdate, String> {
        let (u, done) = {
            let mut run = self.run().ok_or(BUSY)?;
            run.set_train_steps(total);
            run.policy.eval_every = eval_every;
            let u = run.update().await.map_err(|e| e.to_string())?;
            self.updates.set(run.trainer.step);
            (u, run.done())
        };
        let eval = match u.eval {
            Some(e) => Some(self.for_page(e).await?),
            None => None,
        };
        Ok(WebUpdate {
            metrics: u.metrics,
            eval,
            checkpoint: u.checkpoint,
            collapsed: u.collapsed,
            done,
        })
    }

    /// The evaluation set after training: the last update's when it was made then.
    pub async fn finish(&self) -> Result<Evaluation, String> {
        let e = self
            .run()
            .ok_or(BUSY)?
            .evaluate_after()
            .await
            .map_err(|e| e.to_string())?;
        self.for_page(e).await
    }

    /// The fixed evaluation set with the LoRA at `scale` × its trained scale.
    pub async fn evaluate(&self, n: usize, scale: f64) -> Result<Evaluation, String> {
        let e = self
            .trainer()
            .ok_or(BUSY)?
            .evaluate_at_scale(n, scale)
            .await
            .map_err(|e| e.to_string())?;
        self.for_page(e).await
    }

    /// An evaluation as the page shows it: RGBA images, each term's name with its mean.
    async fn for_page(&self, e: FixedEval) -> Result<Evaluation, String> {
        let (size, images) = rgba(e.images).await.map_err(|e| e.to_string())?;
        Ok(Evaluation {
            reward: e.reward,
            diversity: e.diversity,
            terms: self.term_names.iter().cloned().zip(e.terms).collect(),
            size,
            prompts: e.prompts,
            images,
        })
    }

    /// The run's checkpoint now (`checkpoint.safetensors`, the format of `draft train`'s: it
    /// resumes with `draft train --resume`).
    pub async fn checkpoint(&self) -> Result<Vec<u8>, String> {
        let trainer = self.trainer().ok_or(BUSY)?;
        trainer.checkpoint().await.map_err(|e| e.to_string())
    }

    /// The trained LoRA as `pytorch_lora_weights.safetensors` bytes.
    pub async fn lora_safetensors(&self) -> Result<Vec<u8>, String> {
        let trainer = self.trainer().ok_or(BUSY)?;
        trainer
            .pipeline
            .lora
            .to_safetensors()
            .await
            .map_err(|e| e.to_string())
    }
}

pub(crate) const BUSY: &str = "the trainer is busy with another call; await it first";

/// What one update hands the page.
#[derive(Debug, Clone, Serialize)]
pub struct WebUpdate {
    pub metrics: StepMetrics,
    /// The evaluation set after this update, when the cadence asked for it.
    #[serde(skip)]
    pub eval: Option<Evaluation>,
    /// The checkpoint's bytes when the policy's cadence asked for one.
    #[serde(skip)]
    pub checkpoint: Option<Vec<u8>>,
    /// `(diversity before, now)` when the early stop fired.
    pub collapsed: Option<(f64, f64)>,
    /// Whether the run is over (all planned updates, or stopped early).
    pub done: bool,
}

/// The evaluation set as the page shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Evaluation {
    pub reward: f64,
    pub diversity: f64,
    /// Each reward term's (name, unweighted mean).
    pub terms: Vec<(String, f64)>,
    /// Image side in pixels.
    pub size: usize,
    /// The prompt of each image.
    pub prompts: Vec<String>,
    /// RGBA bytes per image.
    #[serde(skip)]
    pub images: Vec<Vec<u8>>,
}

/// The embedded model's training prompts (the page's default list).
pub fn default_prompts() -> Vec<String> {
    prompt_set(default_model::PROMPT_SET).unwrap_or_default()
}

/// [n, 3, H, W] in [0, 1] → the side (H = W) and one RGBA buffer per image.
pub async fn rgba(images: Tensor<4>) -> draft_core::Result<(usize, Vec<Vec<u8>>)> {
    let [n, c, h, w] = images.dims();
    let (v, _) = read_f32(images).await?;
    let px = |x: f32| (x.clamp(0.0, 1.0) * 255.0).round() as u8;
    let out = (0..n)
        .map(|i| {
            let mut image = Vec::with_capacity(h * w * 4);
            for y in 0..h {
                for x in 0..w {
                    for ch in 0..3 {
                        image.push(px(v[((i * c + ch.min(c - 1)) * h + y) * w + x]));
                    }
                    image.push(255);
                }
            }
            image
        })
        .collect();
    Ok((h.max(w), out))
}
