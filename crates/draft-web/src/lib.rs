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
use draft_core::reward::files::{RewardFiles, RewardSource};
use draft_core::train::config::{ModelDefaults, Resolved, Saved, Settings, TrainConfig, resolve};
use draft_core::train::prompts::prompt_set;
use draft_core::train::run::Run;
use draft_core::train::trainer::{CheckpointMeta, EvalSummary, FixedEval, StepMetrics, Trainer};
use draft_core::{ModelFiles, Pipeline, read_f32};
use serde::Serialize;

#[cfg(target_arch = "wasm32")]
mod bindings;
#[cfg(target_arch = "wasm32")]
pub use bindings::{RunFiles, WebTrainer, blob_source};

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

/// What the page's form sends: the device, and the training settings (the core's [`Settings`],
/// the CLI's flags; the page spells them in camelCase: `lvSamples`, `trainSteps`, `evalEvery`,
/// `rewards`, `targetColor` as `[r, g, b]`, `prompts` as a list), resolved as the CLI resolves
/// its flags ([`WebOptions::resolve`]).
#[derive(Debug, Clone, PartialEq)]
pub struct WebOptions {
    /// `"webgpu"` or `"cpu"`.
    pub device: String,
    /// The form's training settings; those not given are the defaults (or the checkpoint's).
    pub settings: Settings,
}

impl Default for WebOptions {
    fn default() -> Self {
        Self {
            device: "webgpu".into(),
            settings: Settings::default(),
        }
    }
}

impl WebOptions {
    /// The form's JSON: `device`, `prompts` (a list; empty or blank ones: the model's prompt
    /// set) and the training settings.
    pub fn parse(json: &str) -> Result<Self, String> {
        let bad = |e: serde_json::Error| format!("bad training options: {e}");
        let mut form: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(json).map_err(bad)?;
        let device = match form.remove("device") {
            None => "webgpu".to_string(),
            Some(v) => serde_json::from_value(v).map_err(bad)?,
        };
        let prompts: Option<Vec<String>> = match form.remove("prompts") {
            None => None,
            Some(v) => serde_json::from_value(v).map_err(bad)?,
        };
        let mut settings: Settings =
            serde_json::from_value(serde_json::Value::Object(form)).map_err(bad)?;
        let prompts: Vec<String> = prompts
            .unwrap_or_default()
            .iter()
            .map(|p| p.trim().to_string())
            .filter(|p| !p.is_empty())
            .collect();
        if !prompts.is_empty() {
            if settings.prompt.is_some() {
                return Err("bad training options: give `prompts` or `prompt`, not both".into());
            }
            settings.prompt = Some(prompts);
        }
        Ok(Self { device, settings })
    }

    /// The run's settings, resolved as the CLI resolves its flags: defaults (the embedded
    /// model's when `embedded`) ← checkpoint ← the form. Over a checkpoint only the form's
    /// planned updates and run policy count: a continued run keeps the checkpoint's settings
    /// and prompts whatever the form holds, and plans at least the updates it has done.
    pub fn resolve(
        &self,
        embedded: bool,
        checkpoint: Option<&CheckpointMeta>,
    ) -> Result<Resolved, String> {
        let defaults = if embedded {
            default_model::TRAIN_DEFAULTS
        } else {
            ModelDefaults::GENERAL
        };
        let saved = checkpoint.map(|m| Saved {
            config: &m.config,
            prompts: m.prompts.as_deref(),
        });
        let form = match checkpoint {
            Some(_) => self.settings.continuing(),
            None => self.settings.clone(),
        };
        let mut r = resolve(&defaults, saved, &[&form]).map_err(|e| e.to_string())?;
        if let Some(m) = checkpoint {
            r.config.train_steps = r.config.train_steps.max(m.step);
        }
        Ok(r)
    }

    /// A resolved run as the page's form shows it (every setting; see [`Settings::shown`]).
    pub fn shown(device: &str, run: &Resolved) -> Self {
        Self {
            device: device.into(),
            settings: Settings::shown(run),
        }
    }
}

/// The form's JSON, as [`WebOptions::parse`] reads it: camelCase keys, `rewards` and `prompts`.
impl Serialize for WebOptions {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{Error, SerializeMap};
        let value = serde_json::to_value(&self.settings).map_err(S::Error::custom)?;
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("device", &self.device)?;
        for (key, v) in value.as_object().into_iter().flatten() {
            let key = match key.as_str() {
                "reward" => "rewards".to_string(),
                "prompt" => "prompts".to_string(),
                k => camel_case(k),
            };
            map.serialize_entry(&key, v)?;
        }
        map.end()
    }
}

/// `lv-samples` → `lvSamples`.
fn camel_case(kebab: &str) -> String {
    let mut out = String::new();
    let mut upper = false;
    for c in kebab.chars() {
        match c {
            '-' => upper = true,
            c if upper => {
                out.extend(c.to_uppercase());
                upper = false;
            }
            c => out.push(c),
        }
    }
    out
}

/// A single-file checkpoint picked in the page (SD-1.x/2.x/XL in the LDM layout, as `draft train
/// --model FILE` reads it), read by range from `data`; `config`, a diffusers folder picked with
/// it, gives configs and tokenizer where it has them (the CLI's `--model-config`), else they
/// are inferred from the checkpoint and the standard CLIP tokenizer is used. PyTorch pickles
/// are refused with the conversion command: the page has no pickle reader.
pub fn single_file_model(
    name: &str,
    data: draft_core::model::files::FileData,
    config: Option<&ModelFiles>,
) -> Result<ModelFiles, String> {
    if let Some(why) = pickle_refusal(name) {
        return Err(why);
    }
    ModelFiles::from_checkpoint(
        name,
        data,
        config,
        &draft_core::model::tokenizer::CLIP_BPE_FILES,
    )
    .map_err(|e| e.to_string())
}

/// Why the page refuses a file named as a PyTorch pickle (`.bin`, `.pt`, `.pth`, `.ckpt`): it
/// has no pickle reader, and `draft convert` makes a `.safetensors` of it once.
fn pickle_refusal(name: &str) -> Option<String> {
    let lower = name.to_ascii_lowercase();
    let is_pickle = [".bin", ".pt", ".pth", ".ckpt"]
        .iter()
        .any(|e| lower.ends_with(e));
    is_pickle.then(|| {
        format!(
            "{name} is a PyTorch pickle, which the page cannot read: convert it once with \
             `draft convert {name} OUT.safetensors` and pick the .safetensors file"
        )
    })
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
    // A pickle-named file that a shell already converted reads as safetensors.
    let pickle = |name: &str, bytes: &[u8]| match pickle_refusal(name) {
        Some(why) if safetensors::SafeTensors::read_metadata(bytes).is_err() => Err(why),
        _ => Ok(()),
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
    if let Some((unet, vae)) = denoiser_configs(model)? {
        let per_update = config.batch * config.method.samples_per_image();
        let batch = per_update.max(draft_core::train::trainer::eval_set_size(
            eval_images.max(1),
        ));
        let latents = run_latents(&unet, vae.as_ref(), config)?;
        limits::check_activations(&unet, vae.as_ref(), latents, batch, limit)
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

type UNetConfig = draft_core::model::models::unet::UNet2DConditionConfig;
type VaeConfig = draft_core::model::models::vae::AutoencoderKLConfig;

/// A diffusers-layout model's UNet and VAE configs (`None`: no `unet/config.json`).
fn denoiser_configs(model: &ModelFiles) -> Result<Option<(UNetConfig, Option<VaeConfig>)>, String> {
    let Some(json) = model.files.get("unet/config.json") else {
        return Ok(None);
    };
    let unet = UNetConfig::from_json(
        &model.display("unet/config.json"),
        &String::from_utf8_lossy(json),
    )
    .map_err(|e| e.to_string())?;
    let vae = match model.files.get("vae/config.json") {
        Some(json) => Some(
            VaeConfig::from_json(
                &model.display("vae/config.json"),
                &String::from_utf8_lossy(json),
            )
            .map_err(|e| e.to_string())?,
        ),
        None => None,
    };
    Ok(Some((unet, vae)))
}

/// The latents `[h, w]` a run of `config` samples at: its `--height`/`--width`, else the
/// model's `sample_size` (as [`draft_core::Pipeline::image_size`]).
fn run_latents(
    unet: &UNetConfig,
    vae: Option<&VaeConfig>,
    config: &TrainConfig,
) -> Result<[usize; 2], String> {
    let f = vae.map_or(1, |v| v.downscale());
    let side = unet.sample_size * f;
    draft_core::model::pipeline::latent_size(
        config.height.unwrap_or(side),
        config.width.unwrap_or(side),
        f,
    )
    .map_err(|e| e.to_string())
}

/// What the page says about a picked model before a run opens ([`plan`]): its size, the memory
/// its weights take on the chosen device, and whether a training update at the model's size
/// fits the adapter's buffers — and if not, which tensor or activation passes which limit.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ModelPlan {
    pub model: String,
    /// Parameters in the weight files (an LDM checkpoint's EMA copy left out).
    pub parameters: u64,
    /// The largest tensor, `file: key`, and its elements.
    pub largest: Option<(String, u64)>,
    /// `"f16"` or `"f32"`, as [`weights_dtype`] will choose on this device.
    pub weights_dtype: String,
    /// Parameters × the dtype's size: by arithmetic (norms and biases stay f32 in an f16 run).
    pub weights_bytes: u64,
    /// The latents `[h, w]` a training update runs at (`--height`/`--width` over the VAE's
    /// downscale, else the UNet's `sample_size`).
    pub latents: Option<[usize; 2]>,
    /// The weights plus what one training update holds beyond them, by arithmetic
    /// ([`draft_core::model::limits::step_activation_bytes`]; `None` without a UNet config).
    pub step_bytes: Option<u64>,
    pub batch: usize,
    pub trains: bool,
    /// Why not: the limit, and the tensor or activation over it.
    pub why: Option<String>,
}

/// [`ModelPlan`] for `model` (`None`: the embedded one) under the form's `options`, on an
/// adapter whose largest binding is `limit` bytes (`None`: the CPU backend) and that computes
/// in f16 when `shader_f16`. Reads configs and safetensors headers only.
pub fn plan(
    options: &WebOptions,
    model: Option<&ModelFiles>,
    limit: Option<u64>,
    shader_f16: bool,
) -> Result<ModelPlan, String> {
    let embedded = model.is_none();
    let default;
    let model = match model {
        Some(m) => m,
        None => {
            default = default_model::files();
            &default
        }
    };
    let Resolved { config, policy, .. } = options.resolve(embedded, None)?;
    let count = draft_core::model::limits::count_weights(model).map_err(|e| e.to_string())?;
    let f16 = options.device == "webgpu" && shader_f16;
    let webgpu_limit = limit.filter(|_| options.device == "webgpu");
    let weights_bytes = count.elements * if f16 { 2 } else { 4 };
    let (mut latents, mut step_bytes) = (None, None);
    // A size the VAE cannot reach is the plan's `why` (check_inputs says it).
    if let Some((unet, vae)) = denoiser_configs(model)?
        && let Ok(hw) = run_latents(&unet, vae.as_ref(), &config)
    {
        latents = Some(hw);
        let budget = webgpu_limit.map_or(draft_core::memory::strips::MAX_BUFFER_BYTES, |l| {
            l.min(draft_core::memory::strips::MAX_BUFFER_BYTES)
        });
        step_bytes = draft_core::model::limits::step_activation_bytes(
            &unet,
            vae.as_ref(),
            hw,
            config.batch,
            budget,
        )
        .ok()
        .map(|a| weights_bytes.saturating_add(a));
    }
    let checked = check_inputs(
        model,
        &BTreeMap::new(),
        &config,
        policy.eval_images,
        webgpu_limit,
    );
    Ok(ModelPlan {
        model: model.name.clone(),
        parameters: count.elements,
        largest: count.largest,
        weights_dtype: if f16 { "f16" } else { "f32" }.into(),
        weights_bytes,
        latents,
        step_bytes,
        batch: config.batch,
        trains: checked.is_ok(),
        why: checked.err(),
    })
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
        let embedded = model.is_none();
        let model = model.unwrap_or_else(default_model::files);
        let meta = match &checkpoint {
            Some((name, bytes)) => {
                Some(CheckpointMeta::read(name, bytes).map_err(|e| e.to_string())?)
            }
            None => None,
        };
        let resolved = options.resolve(embedded, meta.as_ref())?;
        let shown = WebOptions::shown(&options.device, &resolved);
        let Resolved {
            config,
            policy,
            prompts,
        } = resolved;
        check_inputs(
            &model,
            &rewards,
            &config,
            policy.eval_images,
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
            options: shown,
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
        let ([height, width], images) = rgba(e.images).await.map_err(|e| e.to_string())?;
        Ok(Evaluation {
            reward: e.reward,
            diversity: e.diversity,
            terms: self.term_names.iter().cloned().zip(e.terms).collect(),
            width,
            height,
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
    /// Image width and height in pixels.
    pub width: usize,
    pub height: usize,
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

/// [n, 3, H, W] in [0, 1] → `[H, W]` and one RGBA buffer per image.
pub async fn rgba(images: Tensor<4>) -> draft_core::Result<([usize; 2], Vec<Vec<u8>>)> {
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
    Ok(([h, w], out))
}
