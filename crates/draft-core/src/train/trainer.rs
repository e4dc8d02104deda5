//! The training loop shared by the CLI and the browser: batches of prompts, the objective of
//! [`engine`](crate::train::engine), gradient accumulation, global-norm clipping, AdamW / SGD,
//! skipping of non-finite updates, and a checkpoint that resumes bit for bit.
//!
//! Every random draw of training step `s` comes from streams seeded by `(seed, s)`, so a run
//! resumed from a checkpoint at step `s` continues exactly as the uninterrupted run.

use std::collections::HashMap;

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::pipeline::Pipeline;
use crate::noise::NoiseRng;
use crate::reward::builtin::WeightedReward;
use crate::train::config::{OptimizerName, TrainConfig};
use crate::train::engine::{Draws, Engine, Method, Prompts};
use crate::train::optim::{OptimState, Optimizer, clip_coefficient, global_norm};

/// What one training step reports (a line of `metrics.jsonl`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: usize,
    pub reward_mean: f64,
    pub reward_std: f64,
    pub loss: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub lr: f64,
    pub seconds: f64,
    /// The update was skipped because the loss or gradient was not finite.
    pub skipped: bool,
    /// Sampling steps back-propagated (the last batch's K).
    pub k: usize,
    /// Mean reward and diversity of the fixed evaluation set, on the steps it was measured
    /// (`--eval-every`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_reward: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diversity: Option<f64>,
}

/// The fixed evaluation set's figures ([`Trainer::evaluate_fixed`]).
#[derive(Clone)]
pub struct FixedEval {
    pub reward: f64,
    /// Each reward term's mean (unweighted), in the order of the reward's terms.
    pub terms: Vec<f64>,
    pub diversity: f64,
    /// Each image's (weighted) reward.
    pub per_image: Vec<f64>,
    /// The images, [n, 3, H, W] in [0, 1].
    pub images: Tensor<4>,
    /// The prompt of each image.
    pub prompts: Vec<String>,
}

/// The fixed evaluation set's figures before training: kept in the checkpoint, so that a
/// resumed run still reports before → after and its early stop (`--min-diversity`) compares
/// with the start of the run, not with the first evaluation after the resume.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalSummary {
    /// The size of the evaluation set.
    pub images: usize,
    pub reward: f64,
    pub terms: Vec<f64>,
    pub diversity: f64,
}

impl FixedEval {
    pub fn summary(&self) -> EvalSummary {
        EvalSummary {
            images: self.per_image.len(),
            reward: self.reward,
            terms: self.terms.clone(),
            diversity: self.diversity,
        }
    }
}

/// The size of the fixed evaluation set asked for as `n` images: at least 2, rounded up to
/// even (two seeds per prompt).
pub fn eval_set_size(n: usize) -> usize {
    n.max(2).div_ceil(2) * 2
}

/// SplitMix64: independent seeds for the streams of each step.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The seed of stream `purpose` of micro-batch `micro` of step `step`.
pub fn stream_seed(seed: u64, step: usize, micro: usize, purpose: u64) -> u64 {
    stream_seed_u64(seed, step as u64, micro, purpose)
}

/// The uniform draw in [0, 1) that sets ReFL's / AlignProp's random truncation of
/// micro-batch `micro` of step `step` ([`crate::train::engine::uniform_in`] maps it to a step count).
pub fn truncation_draw(seed: u64, step: usize, micro: usize) -> f64 {
    (mix(stream_seed(seed, step, micro, 4)) >> 11) as f64 / (1u64 << 53) as f64
}

fn stream_seed_u64(seed: u64, step: u64, micro: usize, purpose: u64) -> u64 {
    mix(mix(mix(seed) ^ step) ^ ((micro as u64) << 8 | purpose))
}

/// A LoRA training run on a pipeline loaded with trainable LoRA slots.
pub struct Trainer {
    pub pipeline: Pipeline,
    pub config: TrainConfig,
    pub reward: WeightedReward,
    pub prompts: Vec<String>,
    method: Method,
    /// Initial latents of the first step's batch (`--init-noise`).
    init_noise: Option<Tensor<4>>,
    latent_shape: [usize; 3],
    /// The optimiser's moments, in parameter order.
    opt: OptimState<2>,
    /// Optimizer updates done (also Adam's bias-correction step count).
    pub step: usize,
    /// Non-finite updates skipped so far, and how many in a row.
    pub skipped: usize,
    pub bad_run: usize,
    /// The evaluation before the first update, once the shell has made it.
    pub before: Option<EvalSummary>,
    /// Progress within an update, and cancellation ([`crate::train::engine::ProgressFn`]).
    progress: Option<Box<crate::train::engine::ProgressFn>>,
}

impl Trainer {
    /// `pipeline` must have been loaded with `LoraSetup::Targets(config.lora_targets)`; its
    /// adapters are initialised here (or taken from `init_lora`).
    pub fn new(
        pipeline: Pipeline,
        config: TrainConfig,
        reward: WeightedReward,
        prompts: Vec<String>,
        init_lora: Option<&crate::model::lora::LoraFile>,
        init_noise: Option<Tensor<4>>,
    ) -> Result<Self> {
        config.validate()?;
        let method = config.method()?;
        if prompts.is_empty() {
            return Err(Error::Input("no prompts to train on".into()));
        }
        if let Some(p) = prompts.iter().find(|p| p.trim().is_empty()) {
            return Err(Error::Input(format!(
                "empty prompt `{p}` in the prompt list"
            )));
        }
        if pipeline.lora.is_empty() {
            return Err(Error::Input(
                "the LoRA targets select no layer of this model".into(),
            ));
        }
        let device = pipeline.device.clone();
        pipeline.lora.init_trainable(
            config.rank,
            config.alpha(),
            stream_seed(config.seed, 0, 0, 99),
            &device,
        );
        if let Some(file) = init_lora {
            pipeline
                .lora
                .load_trainable(file, config.alpha(), &device)?;
        }
        let [height, width] = pipeline.image_size(config.height, config.width);
        let latent_shape = pipeline.latent_shape(height, width)?;
        if let Some(x) = &init_noise {
            let [_, c, h, w] = x.dims();
            if [c, h, w] != latent_shape {
                return Err(Error::Input(format!(
                    "--init-noise has latents [{c}, {h}, {w}] per image, the model samples {latent_shape:?}"
                )));
            }
        }
        let opt = OptimState::zeros(&pipeline.lora.params());
        Ok(Self {
            pipeline,
            reward,
            prompts,
            method,
            init_noise,
            latent_shape,
            opt,
            step: 0,
            skipped: 0,
            bad_run: 0,
            before: None,
            progress: None,
            config,
        })
    }

    /// Calls `f` after every sampling and back-propagated step of each update; when it returns
    /// `false` the update stops with [`Error::Cancelled`] and nothing is changed (the same
    /// update runs again, with the same draws, on the next call).
    pub fn set_progress(&mut self, f: Option<Box<crate::train::engine::ProgressFn>>) {
        self.progress = f;
    }

    /// The batch size of every step: `--batch`, or the batch of `--init-noise`.
    pub fn batch(&self) -> usize {
        self.init_noise
            .as_ref()
            .map_or(self.config.batch, |x| x.dims()[0])
    }

    /// Prompts of micro-batch `micro` of `step`: the list cycled when it is no longer than the
    /// batch, otherwise a seeded random choice.
    pub fn batch_prompts(&self, step: usize, micro: usize) -> Vec<String> {
        let b = self.batch();
        if self.prompts.len() <= b {
            return (0..b)
                .map(|i| self.prompts[i % self.prompts.len()].clone())
                .collect();
        }
        let mut state = stream_seed(self.config.seed, step, micro, 1);
        (0..b)
            .map(|_| {
                state = mix(state);
                self.prompts[(state % self.prompts.len() as u64) as usize].clone()
            })
            .collect()
    }

    fn tokenize(&self, prompts: &[String]) -> Result<Prompts> {
        let mut p = Prompts::new(
            &self.pipeline,
            prompts,
            &self.config.negative_prompt,
            self.config.guidance,
        )?;
        p.size = self.config.size;
        Ok(p)
    }

    fn draws(&self, step: usize, micro: usize) -> Draws {
        let device = &self.pipeline.device;
        let b = self.batch();
        let [c, h, w] = self.latent_shape;
        let x_t = match (&self.init_noise, step, micro) {
            (Some(x), 0, 0) => x.clone(),
            _ => NoiseRng::new(stream_seed(self.config.seed, step, micro, 2))
                .randn([b, c, h, w], device),
        };
        let truncation = truncation_draw(self.config.seed, step, micro);
        Draws {
            x_t,
            step_noise: NoiseRng::new(stream_seed(self.config.seed, step, micro, 3)),
            lv_noise: None,
            truncation,
        }
    }

    /// One optimizer update (over `grad_accum` batches). Non-finite losses or gradients skip
    /// the update; after `max_bad_steps` of them in a row this returns an error.
    pub async fn train_step(&mut self) -> Result<StepMetrics> {
        let started = web_time_now();
        let mut engine = Engine::new(
            &self.pipeline,
            self.config.steps,
            self.config.eta,
            &self.reward,
        )?;
        engine.progress = self.progress.as_deref();
        let accum = self.config.grad_accum;
        let mut grads: Option<Vec<Tensor<2>>> = None;
        let mut rewards = Vec::new();
        let mut loss = 0.0f64;
        let mut k = 0;
        for micro in 0..accum {
            let prompts = self.tokenize(&self.batch_prompts(self.step, micro))?;
            let eval = engine
                .evaluate(self.method, &prompts, self.draws(self.step, micro))
                .await?;
            loss += eval.loss as f64 / accum as f64;
            rewards.extend(eval.rewards.iter().map(|&r| r as f64));
            k = eval.k;
            let scaled: Vec<Tensor<2>> = if accum == 1 {
                eval.grads
            } else {
                eval.grads.into_iter().map(|g| g / accum as f64).collect()
            };
            grads = Some(match grads {
                None => scaled,
                Some(acc) => acc.into_iter().zip(scaled).map(|(a, g)| a + g).collect(),
            });
        }
        let grads = grads.expect("grad_accum ≥ 1");
        let grad_norm = global_norm(&grads).await?;
        let finite = loss.is_finite() && grad_norm.is_finite();
        let lr = self.config.lr;
        if finite {
            self.bad_run = 0;
            let clip = clip_coefficient(grad_norm, self.config.clip_grad_norm);
            self.update(grads, clip);
        } else {
            self.skipped += 1;
            self.bad_run += 1;
        }
        self.step += 1;
        let n = rewards.len().max(1) as f64;
        let mean = rewards.iter().sum::<f64>() / n;
        let var = rewards.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / n;
        let metrics = StepMetrics {
            step: self.step,
            reward_mean: mean,
            reward_std: var.sqrt(),
            loss,
            grad_norm,
            lr,
            seconds: web_time_now() - started,
            skipped: !finite,
            k,
            eval_reward: None,
            diversity: None,
        };
        if self.bad_run >= self.config.max_bad_steps {
            return Err(Error::Input(format!(
                "training stopped: {} non-finite updates in a row (last loss {loss}, gradient norm {grad_norm}); try a lower --lr or --clip-grad-norm",
                self.bad_run
            )));
        }
        Ok(metrics)
    }

    /// The mean reward of `n` images sampled (without gradient) from fixed seeds and the first
    /// `n` prompts: comparable before and after training, unlike the per-step rewards.
    pub async fn eval_reward(&self, n: usize) -> Result<f64> {
        Ok(self.evaluate_fixed(n).await?.reward)
    }

    /// Samples the fixed evaluation set — `n` images (rounded up to even): the first `n / 2`
    /// prompts, each from two fixed seeds — and returns its mean reward and diversity (the
    /// mean RMS pixel distance between the two images of each prompt, in [0, 1]). The same
    /// seeds every call, so the figures are comparable across training; a diversity falling
    /// towards 0 while the reward rises is the reward hacking the DRaFT paper warns of (every
    /// seed collapsing to one image).
    pub async fn evaluate_fixed(&self, n: usize) -> Result<FixedEval> {
        self.evaluate_set(n, false).await
    }

    /// The fixed evaluation set, reporting its sampling steps to the progress callback
    /// ([`Phase::Evaluating`](crate::train::engine::Phase::Evaluating)); with `cancellable`, the
    /// callback's `false` stops it with [`Error::Cancelled`].
    async fn evaluate_set(&self, n: usize, cancellable: bool) -> Result<FixedEval> {
        let pipe = &self.pipeline;
        let n = eval_set_size(n);
        let prompts: Vec<String> = (0..n)
            .map(|i| self.prompts[(i / 2) % self.prompts.len()].clone())
            .collect();
        let [c, h, w] = self.latent_shape;
        // u64::MAX, not usize::MAX: the browser's usize is 32 bits, and its evaluation set
        // must be the native one.
        let x_t = NoiseRng::new(stream_seed_u64(self.config.seed, u64::MAX, 0, 5))
            .randn([n, c, h, w], &pipe.device);
        let options = crate::model::pipeline::SampleOptions {
            prompts: prompts.clone(),
            negative_prompt: self.config.negative_prompt.clone(),
            steps: self.config.steps,
            guidance: self.config.guidance,
            eta: 0.0,
            seed: self.config.seed,
            size: self.config.size,
        };
        let progress = self.progress.as_deref();
        let latents = pipe.sample_latents_until(&options, x_t, |done, total| {
            let go = progress.is_none_or(|f| {
                f(&crate::train::engine::Progress {
                    phase: crate::train::engine::Phase::Evaluating,
                    done,
                    total,
                })
            });
            go || !cancellable
        })?;
        let images = pipe.decode(latents);
        let mut terms = Vec::new();
        let mut reward = 0.0;
        let mut per_image = vec![0.0; n];
        for ((_, weight), t) in self
            .reward
            .terms
            .iter()
            .zip(self.reward.score_terms(images.clone(), &prompts)?)
        {
            let mean = crate::read_f32(t.clone().mean()).await?.0[0] as f64;
            reward += weight * mean;
            terms.push(mean);
            for (r, v) in per_image.iter_mut().zip(crate::read_f32(t).await?.0) {
                *r += weight * v as f64;
            }
        }
        let [_, ch, ih, iw] = images.dims();
        let pairs = images.clone().reshape([n / 2, 2, ch * ih * iw]);
        let a = pairs.clone().slice([0..n / 2, 0..1]);
        let b = pairs.slice([0..n / 2, 1..2]);
        let rms = (a - b).square().mean_dim(2).sqrt().mean();
        let diversity = crate::read_f32(rms).await?.0[0] as f64;
        Ok(FixedEval {
            reward,
            terms,
            diversity,
            per_image,
            images,
            prompts,
        })
    }

    /// [`evaluate_fixed`](Self::evaluate_fixed) with the trained LoRA at `factor` times its
    /// scale: 0 is the base model, 1 the trained one, values in between interpolate (the
    /// browser's before → after slider; `draft sample --lora FILE:SCALE` natively). The
    /// progress callback's `false` stops it with [`Error::Cancelled`] (the slider moved on).
    pub async fn evaluate_at_scale(&self, n: usize, factor: f64) -> Result<FixedEval> {
        let base = self.config.alpha() / self.config.rank as f64;
        // Taken back when the evaluation ends, fails, panics or is dropped at an await.
        let _scaled = self.pipeline.lora.scoped_trainable_scale(base * factor);
        self.evaluate_set(n, true).await
    }

    /// The optimiser of the run: PyTorch's AdamW, or SGD without momentum or weight decay.
    pub fn optimizer(&self) -> Optimizer {
        let c = &self.config;
        match c.optimizer {
            OptimizerName::Sgd => Optimizer::Sgd { weight_decay: 0.0 },
            OptimizerName::Adamw => Optimizer::AdamW {
                beta1: c.beta1,
                beta2: c.beta2,
                eps: c.adam_eps,
                weight_decay: c.weight_decay,
            },
        }
    }

    /// One optimiser update of the LoRA parameters with `grads` scaled by `clip`.
    fn update(&mut self, grads: Vec<Tensor<2>>, clip: f64) {
        let grads = grads
            .into_iter()
            .map(|g| if clip != 1.0 { g * clip } else { g })
            .collect();
        let params = self.pipeline.lora.params();
        let new = self
            .optimizer()
            .step(params, grads, self.config.lr, &mut self.opt);
        self.pipeline.lora.set_params(&new);
    }

    /// The checkpoint: LoRA parameters, Adam moments and counters in one safetensors file.
    pub async fn checkpoint(&self) -> Result<Vec<u8>> {
        let names = self.pipeline.lora.param_names();
        let params = self.pipeline.lora.params();
        let mut tensors = Vec::new();
        for (prefix, list) in [
            ("param", &params),
            ("adam_m", &self.opt.m),
            ("adam_v", &self.opt.v),
        ] {
            for (name, t) in names.iter().zip(list.iter()) {
                let (values, shape) = crate::read_f32(t.clone()).await?;
                tensors.push((format!("{prefix}.{name}"), shape, values));
            }
        }
        let mut meta = HashMap::new();
        meta.insert("step".into(), self.step.to_string());
        meta.insert("skipped".into(), self.skipped.to_string());
        meta.insert("bad_run".into(), self.bad_run.to_string());
        meta.insert(
            "config".into(),
            serde_json::to_string(&self.config).map_err(|e| Error::Input(e.to_string()))?,
        );
        meta.insert(
            "prompts".into(),
            serde_json::to_string(&self.prompts).map_err(|e| Error::Input(e.to_string()))?,
        );
        if let Some(b) = &self.before {
            meta.insert(
                "before".into(),
                serde_json::to_string(b).map_err(|e| Error::Input(e.to_string()))?,
            );
        }
        crate::model::weights::serialize_f32(&tensors, Some(meta))
    }

    /// Restores a [`checkpoint`](Self::checkpoint). The run's settings must be the ones the
    /// checkpoint was written with (except `train_steps`, which may grow).
    pub fn restore(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        let meta = CheckpointMeta::read(name, bytes)?;
        let mut a = serde_json::to_value(&meta.config).unwrap();
        let mut b = serde_json::to_value(&self.config).unwrap();
        a["train_steps"] = 0.into();
        b["train_steps"] = 0.into();
        if a != b {
            // Keys of both (a method's parameters are present with that method only).
            let keys: std::collections::BTreeSet<&String> = [&a, &b]
                .into_iter()
                .filter_map(|v| v.as_object())
                .flat_map(|o| o.keys())
                .collect();
            let differ: Vec<String> = keys
                .into_iter()
                .filter(|k| a.get(k.as_str()) != b.get(k.as_str()))
                .map(|k| {
                    let show = |v: &serde_json::Value| match v.get(k.as_str()) {
                        Some(x) => x.to_string(),
                        None => "none".into(),
                    };
                    format!("{k} {} (this run: {})", show(&a), show(&b))
                })
                .collect();
            return Err(Error::Input(format!(
                "{name} was written by a run with other settings: {}; resume with the checkpoint's settings (leave those flags out)",
                differ.join(", ")
            )));
        }
        // Checkpoints of earlier versions do not name their prompts.
        if let Some(p) = meta.prompts.as_ref().filter(|p| **p != self.prompts) {
            return Err(Error::Input(format!(
                "{name} was written by a run on other prompts ({} prompts, the first {:?}); resume with the same prompts",
                p.len(),
                p.first().map(String::as_str).unwrap_or("")
            )));
        }
        let w = crate::model::weights::Weights::from_bytes(name, bytes)?;
        let device = self.pipeline.device.clone();
        let names = self.pipeline.lora.param_names();
        let load = |prefix: &str| -> Result<Vec<Tensor<2>>> {
            names
                .iter()
                .map(|n| w.tensor::<2>(&format!("{prefix}.{n}"), &device))
                .collect()
        };
        let params = load("param")?;
        self.opt.m = load("adam_m")?;
        self.opt.v = load("adam_v")?;
        self.pipeline.lora.set_params(&params);
        self.step = meta.step;
        self.skipped = meta.skipped;
        self.opt.updates = self.step - self.skipped;
        self.before = meta.before;
        self.bad_run = meta.bad_run;
        Ok(())
    }
}

/// What a [`Trainer::checkpoint`] says about its run, read without building anything: the
/// settings and prompts a shell resumes it with (`draft train --resume`, the page's "Resume
/// run" and "Open checkpoint").
#[derive(Debug, Clone)]
pub struct CheckpointMeta {
    pub config: TrainConfig,
    /// `None` in checkpoints written before the prompts were kept in them.
    pub prompts: Option<Vec<String>>,
    pub step: usize,
    pub skipped: usize,
    pub bad_run: usize,
    pub before: Option<EvalSummary>,
}

impl CheckpointMeta {
    pub fn read(name: &str, bytes: &[u8]) -> Result<Self> {
        let meta = crate::model::weights::read_string_metadata(name, bytes)?;
        let get = |k: &str| -> Result<&String> {
            meta.get(k).ok_or_else(|| {
                Error::config(
                    name,
                    format!("checkpoint metadata lacks `{k}` (not a `draft train` checkpoint?)"),
                )
            })
        };
        let num = |k: &str| -> Result<usize> {
            get(k)?
                .parse()
                .map_err(|_| Error::config(name, format!("bad `{k}` in checkpoint metadata")))
        };
        let json = |k: &str, text: &str| -> Result<serde_json::Value> {
            serde_json::from_str(text)
                .map_err(|e| Error::config(name, format!("bad `{k}` in checkpoint metadata: {e}")))
        };
        let config: TrainConfig = serde_json::from_value(json("config", get("config")?)?)
            .map_err(|e| Error::config(name, format!("bad config in checkpoint: {e}")))?;
        config
            .validate()
            .map_err(|e| Error::config(name, format!("config in checkpoint: {e}")))?;
        let prompts: Option<Vec<String>> = match meta.get("prompts") {
            Some(p) => Some(serde_json::from_value(json("prompts", p)?).map_err(|e| {
                Error::config(name, format!("bad `prompts` in checkpoint metadata: {e}"))
            })?),
            None => None,
        };
        if prompts
            .as_ref()
            .is_some_and(|p| p.is_empty() || p.iter().any(|p| p.trim().is_empty()))
        {
            return Err(Error::config(
                name,
                "checkpoint has an empty prompt list or prompt",
            ));
        }
        let before = match meta.get("before") {
            Some(b) => Some(serde_json::from_value(json("before", b)?).map_err(|e| {
                Error::config(name, format!("bad `before` in checkpoint metadata: {e}"))
            })?),
            None => None,
        };
        let (step, skipped) = (num("step")?, num("skipped")?);
        if skipped > step {
            return Err(Error::config(
                name,
                "checkpoint has more skipped updates than steps",
            ));
        }
        Ok(Self {
            config,
            prompts,
            step,
            skipped,
            bad_run: num("bad_run")?,
            before,
        })
    }
}

/// Seconds since an arbitrary origin (wall clock; `performance.now()` in the browser).
pub fn web_time_now() -> f64 {
    use std::sync::OnceLock;
    static START: OnceLock<web_time::Instant> = OnceLock::new();
    START
        .get_or_init(web_time::Instant::now)
        .elapsed()
        .as_secs_f64()
}
