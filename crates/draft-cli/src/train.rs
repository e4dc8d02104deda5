//! `draft train`: flags (or a TOML file with the same keys) → a `draft_core::train::trainer::Trainer`,
//! plus everything around it that touches disk: the LoRA file, metrics, sample grids, the
//! reward curve and the resumable checkpoint.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use draft_core::model::lora::{LoraFile, LoraTarget};
use draft_core::model::pipeline::{LoraSetup, to_nhwc};
use draft_core::read_f32;
use draft_core::reward::builtin::RewardOptions;
use draft_core::train::config::{MethodName, OptimizerName, TrainConfig};
use draft_core::train::run::{Run, RunPolicy};
use draft_core::train::trainer::{CheckpointMeta, FixedEval, StepMetrics, Trainer, prompt_set};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;

use crate::device::{self, DeviceArg};
use crate::rewards::RewardFiles;
use crate::{files, images, plot};

/// `--lr`, `--train-steps` and `--eval-every` defaults when training the embedded model (no
/// `--model`), shared with the browser.
use draft_core::data::default_model::{
    EVAL_EVERY as EMBEDDED_EVAL_EVERY, PROMPT_SET as EMBEDDED_PROMPT_SET, TRAIN_LR as EMBEDDED_LR,
    TRAIN_STEPS as EMBEDDED_TRAIN_STEPS,
};

pub const LORA_FILE: &str = "pytorch_lora_weights.safetensors";
/// The same LoRA in kohya's layout, for A1111 and ComfyUI.
pub const KOHYA_FILE: &str = "lora_kohya.safetensors";
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";

/// Every flag is optional here so that `--config FILE.toml` can set it; the TOML keys are the
/// flag names (`train-steps = 200`, `reward = ["colorfulness=1", "smoothness=0.5"]`).
#[derive(Args, Deserialize, Default, Debug)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct TrainArgs {
    /// A TOML file setting any of these flags (flags given on the command line win).
    #[arg(long)]
    #[serde(skip)]
    config: Option<PathBuf>,
    /// A diffusers pipeline folder, or a single-file SD-1.x/2.x checkpoint (.safetensors,
    /// .ckpt) [default: the embedded shapes-32 model].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Load this weights variant of a diffusers folder (`fp16` reads
    /// diffusion_pytorch_model.fp16.safetensors, …), as diffusers' `variant=`.
    #[arg(long)]
    variant: Option<String>,
    /// For a single-file --model: a diffusers folder whose config files (and tokenizer) replace
    /// the ones inferred from the checkpoint.
    #[arg(long)]
    model_config: Option<PathBuf>,
    #[arg(long, value_enum)]
    device: Option<DeviceArg>,
    /// draft (whole chain) | draft-k | draft-lv | refl | alignprop [default: draft-lv].
    #[arg(long)]
    method: Option<String>,
    /// DRaFT-K: sampling steps back-propagated [default: 1].
    #[arg(long)]
    k: Option<usize>,
    /// DRaFT-LV: re-noised samples per image [default: 2].
    #[arg(long)]
    lv_samples: Option<usize>,
    /// ReFL: fewest sampling steps remaining when x̂₀ is predicted [default: 1].
    #[arg(long)]
    t_min: Option<usize>,
    /// ReFL: most sampling steps remaining [default: 10, at most --steps].
    #[arg(long)]
    t_max: Option<usize>,
    /// AlignProp: smallest K [default: 1].
    #[arg(long)]
    k_min: Option<usize>,
    /// AlignProp: largest K [default: 10, at most --steps].
    #[arg(long)]
    k_max: Option<usize>,
    /// Reward term NAME[=WEIGHT], repeatable: brightness, colorfulness, contrast, smoothness,
    /// symmetry, target-color; learned (need --reward-model): laion-aesthetic, clip-score,
    /// pickscore, hpsv2 [default: colorfulness].
    #[arg(long)]
    reward: Option<Vec<String>>,
    /// Weights of a learned reward, NAME=PATH, repeatable: `clip=DIR` (a transformers or
    /// OpenCLIP folder; laion-aesthetic, clip-score), `laion-aesthetic=FILE` (the MLP, .pth or
    /// .safetensors), `pickscore=DIR`, `hpsv2=DIR|FILE` (OpenCLIP; a lone .pt is ViT-H-14),
    /// `tokenizer=DIR` (for models that ship none). See docs/rewards.md.
    #[arg(long, value_name = "NAME=PATH")]
    reward_model: Option<Vec<String>>,
    /// The colour of the target-color reward, R,G,B in [0, 1] [default: 0.9,0.2,0.1].
    #[arg(long)]
    target_color: Option<String>,
    /// A training prompt; repeatable (cycled over the batch).
    #[arg(long)]
    prompt: Option<Vec<String>>,
    /// A file of training prompts, one per line.
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// A built-in prompt set: animals (the 45 simple animals of DDPO / DRaFT), shapes (captions
    /// of the embedded model) [default: shapes with the embedded model, else animals].
    #[arg(long)]
    prompt_set: Option<String>,
    /// The prompt guidance steers away from [default: ""].
    #[arg(long)]
    negative_prompt: Option<String>,
    /// Images per batch [default: 2; --init-noise sets it].
    #[arg(long)]
    batch: Option<usize>,
    /// DDIM sampling steps [default: 50].
    #[arg(long)]
    steps: Option<usize>,
    /// Classifier-free guidance scale [default: 7.5].
    #[arg(long)]
    guidance: Option<f64>,
    /// DDIM η [default: 0].
    #[arg(long)]
    eta: Option<f64>,
    /// Optimizer updates [default: 100; 60 on the embedded model].
    #[arg(long)]
    train_steps: Option<usize>,
    /// Learning rate [default: 4e-4; 3e-3 on the embedded model].
    #[arg(long)]
    lr: Option<f64>,
    /// adamw | sgd [default: adamw].
    #[arg(long)]
    optimizer: Option<String>,
    /// AdamW decoupled weight decay [default: 0.1].
    #[arg(long)]
    weight_decay: Option<f64>,
    /// LoRA rank [default: 4].
    #[arg(long)]
    rank: Option<usize>,
    /// LoRA alpha; scale = alpha / rank [default: the rank].
    #[arg(long)]
    alpha: Option<f64>,
    /// Layer groups to adapt, comma-separated: attn, ff, proj, conv, text [default: attn].
    #[arg(long, value_delimiter = ',')]
    lora_targets: Option<Vec<String>>,
    /// Clip the global gradient norm to this value [default: no clipping].
    #[arg(long)]
    clip_grad_norm: Option<f64>,
    /// Batches averaged into one update [default: 1].
    #[arg(long)]
    grad_accum: Option<usize>,
    /// Seed of every random draw [default: 0].
    #[arg(long)]
    seed: Option<u64>,
    /// Start from this LoRA file (diffusers layout).
    #[arg(long)]
    init_lora: Option<PathBuf>,
    /// Initial latents of the first step's batch: safetensors with tensor `noise` [B, C, h, w].
    #[arg(long)]
    init_noise: Option<PathBuf>,
    /// Output folder [default: a fresh runs/run-NNN].
    #[arg(long)]
    out_dir: Option<PathBuf>,
    /// Continue from the checkpoint in --out-dir (`draft train`'s or one downloaded from the
    /// browser page); the settings and prompts not given as flags are the checkpoint's.
    #[arg(long)]
    #[serde(default)]
    resume: bool,
    /// Write the checkpoint every N updates [default: 10].
    #[arg(long)]
    checkpoint_every: Option<usize>,
    /// Stop after this many non-finite updates in a row [default: 5].
    #[arg(long)]
    max_bad_steps: Option<usize>,
    /// Images of the fixed evaluation set (half as many prompts, two seeds each) behind the
    /// before/after grids and the diversity measure [default: 8] (0: none).
    #[arg(long)]
    preview: Option<usize>,
    /// Measure the evaluation set's reward and diversity every N updates and after the last
    /// [default: 10; 25 on the embedded model] (0: only before and after).
    #[arg(long)]
    eval_every: Option<usize>,
    /// Stop early when the diversity falls below this fraction of its value before training
    /// (reward hacking: every seed collapsing to one image) [default: never].
    #[arg(long)]
    min_diversity: Option<f64>,
}

macro_rules! merge {
    ($cli:ident, $file:ident; $($f:ident),*) => {
        $( if $cli.$f.is_none() { $cli.$f = $file.$f.take(); } )*
    };
}

impl TrainArgs {
    /// Flags over the TOML file.
    fn with_file(mut self) -> Result<Self> {
        let Some(path) = self.config.clone() else {
            return Ok(self);
        };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        let mut f: TrainArgs = toml::from_str(&text).map_err(|e| {
            let line = e
                .span()
                .and_then(|s| text.get(..s.start))
                .map(|before| before.matches('\n').count() + 1);
            anyhow::anyhow!(
                "{}{}: {}",
                path.display(),
                line.map(|l| format!(" line {l}")).unwrap_or_default(),
                draft_core::error::one_line(e.message().trim())
            )
        })?;
        // Relative paths in the file are relative to the file's folder.
        let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        for p in [
            &mut f.model,
            &mut f.model_config,
            &mut f.prompts,
            &mut f.init_lora,
            &mut f.init_noise,
            &mut f.out_dir,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        merge!(self, f; model, variant, model_config, device, method, k, lv_samples, t_min, t_max, k_min, k_max, reward, reward_model,
            target_color, prompt, prompts, prompt_set, negative_prompt, batch, steps, guidance,
            eta, train_steps, lr, optimizer, weight_decay, rank, alpha, lora_targets,
            clip_grad_norm, grad_accum, seed, init_lora, init_noise, out_dir, checkpoint_every,
            max_bad_steps, preview, eval_every, min_diversity);
        self.resume |= f.resume;
        Ok(self)
    }

    /// The settings of a `--config` file alone, checked as `draft train` checks them before it
    /// loads anything (tests/fuzz.rs).
    pub fn check_file(path: &Path) -> Result<()> {
        let args = TrainArgs {
            config: Some(path.to_path_buf()),
            ..Default::default()
        }
        .with_file()?;
        args.in_file(args.settings(None))?;
        args.in_file(args.prompt_list(None))?;
        Ok(())
    }

    /// An error about a setting names the `--config` file, where the setting may come from,
    /// on one line whatever the file's strings hold.
    fn in_file<T>(&self, r: Result<T>) -> Result<T> {
        match &self.config {
            Some(path) => r.map_err(|e| {
                let msg = format!("{}: {e:#}", path.display());
                anyhow::anyhow!("{}", draft_core::error::one_line(&msg))
            }),
            None => r,
        }
    }

    /// The run's settings: the flags, and for those not given the defaults, or when resuming,
    /// the checkpoint's (`saved`) — so `--resume` needs no flags, and one that differs from the
    /// checkpoint is refused by [`Trainer::restore`].
    fn settings(&self, saved: Option<&TrainConfig>) -> Result<TrainConfig> {
        let d = saved.cloned().unwrap_or_default();
        // The embedded model's defaults apply to fresh runs only.
        let embedded = self.model.is_none() && saved.is_none();
        let steps = self.steps.unwrap_or(d.steps);
        let (t_max, k_max) = match saved {
            Some(c) => (c.t_max, c.k_max),
            None => (d.t_max.min(steps), d.k_max.min(steps)),
        };
        let mut c = TrainConfig {
            method: match &self.method {
                Some(m) => MethodName::parse(m)?,
                None => d.method,
            },
            k: self.k.unwrap_or(d.k),
            lv_samples: self.lv_samples.unwrap_or(d.lv_samples),
            t_min: self.t_min.unwrap_or(d.t_min),
            t_max: self.t_max.unwrap_or(t_max),
            k_min: self.k_min.unwrap_or(d.k_min),
            k_max: self.k_max.unwrap_or(k_max),
            rewards: self.reward.clone().unwrap_or(d.rewards),
            reward_options: RewardOptions {
                target_color: match &self.target_color {
                    Some(s) => parse_color(s)?,
                    None => d.reward_options.target_color,
                },
            },
            batch: self.batch.unwrap_or(d.batch),
            steps,
            guidance: self.guidance.unwrap_or(d.guidance),
            eta: self.eta.unwrap_or(d.eta),
            negative_prompt: self.negative_prompt.clone().unwrap_or(d.negative_prompt),
            train_steps: self.train_steps.unwrap_or(if embedded {
                EMBEDDED_TRAIN_STEPS
            } else {
                d.train_steps
            }),
            lr: self.lr.unwrap_or(if embedded { EMBEDDED_LR } else { d.lr }),
            optimizer: match self.optimizer.as_deref() {
                None => d.optimizer,
                Some("adamw") => OptimizerName::Adamw,
                Some("sgd") => OptimizerName::Sgd,
                Some(o) => bail!("unknown optimizer {o:?} (expected adamw or sgd)"),
            },
            weight_decay: self.weight_decay.unwrap_or(d.weight_decay),
            rank: self.rank.unwrap_or(d.rank),
            alpha: self.alpha.or(d.alpha),
            lora_targets: match &self.lora_targets {
                Some(t) => t
                    .iter()
                    .map(|s| LoraTarget::parse(s.trim()))
                    .collect::<Result<Vec<_>, _>>()?,
                None => d.lora_targets,
            },
            clip_grad_norm: self.clip_grad_norm.or(d.clip_grad_norm),
            grad_accum: self.grad_accum.unwrap_or(d.grad_accum),
            seed: self.seed.unwrap_or(d.seed),
            max_bad_steps: self.max_bad_steps.unwrap_or(d.max_bad_steps),
            ..d
        };
        c.lora_targets.sort();
        c.lora_targets.dedup();
        c.validate()?;
        Ok(c)
    }

    /// The prompts given, else the checkpoint's (`saved`) when resuming, else the default set.
    fn prompt_list(&self, saved: Option<&[String]>) -> Result<Vec<String>> {
        let given = [
            self.prompt.is_some(),
            self.prompts.is_some(),
            self.prompt_set.is_some(),
        ];
        if given.iter().filter(|g| **g).count() > 1 {
            bail!("give only one of --prompt, --prompts and --prompt-set");
        }
        if let Some(p) = &self.prompt {
            if let Some(e) = p.iter().find(|p| p.trim().is_empty()) {
                bail!("--prompt {e:?} is empty");
            }
            return Ok(p.clone());
        }
        if let Some(path) = &self.prompts {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("{}: cannot read", path.display()))?;
            let list: Vec<String> = text
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(str::to_string)
                .collect();
            if list.is_empty() {
                bail!("{}: the prompt file has no prompts", path.display());
            }
            return Ok(list);
        }
        if let (Some(p), None) = (saved, &self.prompt_set) {
            return Ok(p.to_vec());
        }
        let default = if self.model.is_none() {
            EMBEDDED_PROMPT_SET
        } else {
            "animals"
        };
        Ok(prompt_set(self.prompt_set.as_deref().unwrap_or(default))?)
    }
}

pub fn parse_color(s: &str) -> Result<[f32; 3]> {
    let v: Vec<f32> = s
        .split(',')
        .map(|x| x.trim().parse::<f32>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("--target-color {s:?}: expected R,G,B numbers in [0, 1]"))?;
    match v.as_slice() {
        [r, g, b] if v.iter().all(|x| (0.0..=1.0).contains(x)) => Ok([*r, *g, *b]),
        _ => bail!("--target-color {s:?}: expected three numbers in [0, 1]"),
    }
}

pub fn run(args: TrainArgs) -> Result<()> {
    let a = args.with_file()?;
    let out_dir = match &a.out_dir {
        Some(d) => d.clone(),
        None if a.resume => bail!("--resume needs --out-dir: the run folder to continue"),
        None => fresh_run_dir(Path::new("runs"))?,
    };
    let checkpoint_path = out_dir.join(CHECKPOINT_FILE);
    let checkpoint = if a.resume && checkpoint_path.is_file() {
        let bytes = files::read(&checkpoint_path)?;
        let meta = CheckpointMeta::read(&checkpoint_path.display().to_string(), &bytes)?;
        Some((bytes, meta))
    } else {
        None
    };
    // Everything that can be refused is refused before the model loads. A resumed run takes
    // the checkpoint's settings and prompts for the flags not given.
    let saved = checkpoint.as_ref().map(|(_, m)| m);
    let config = a.in_file(a.settings(saved.map(|m| &m.config)))?;
    let prompts = a.in_file(a.prompt_list(saved.and_then(|m| m.prompts.as_deref())))?;
    // Learned rewards' files are read now; the models are built once the device is known.
    let reward_files =
        RewardFiles::read(&config.rewards, a.reward_model.as_deref().unwrap_or(&[]))?;
    let init_lora = match &a.init_lora {
        Some(p) => Some(LoraFile::parse(&p.display().to_string(), &files::read(p)?)?),
        None => None,
    };
    let noise_bytes = a.init_noise.as_ref().map(|p| files::read(p)).transpose()?;
    let eval_every = a.eval_every.unwrap_or(if a.model.is_none() {
        EMBEDDED_EVAL_EVERY
    } else {
        10
    });
    let checkpoint_every = a.checkpoint_every.unwrap_or(10);
    if checkpoint_every == 0 {
        bail!("--checkpoint-every must be at least 1");
    }
    let policy = RunPolicy {
        eval_images: a.preview.unwrap_or(8),
        eval_every,
        checkpoint_every,
        min_diversity: a.min_diversity,
    };
    policy.validate()?;
    let preview = policy.eval_images;

    let model = files::read_model(
        a.model.as_deref(),
        a.variant.as_deref(),
        a.model_config.as_deref(),
    )?;
    let device = device::select(a.device.unwrap_or(DeviceArg::Auto))?;
    let pipeline = device::load_pipeline(
        &model,
        &device,
        &LoraSetup::Targets(config.lora_targets.clone()),
    )?;
    let reward = reward_files.build(
        &config.rewards,
        &config.reward_options,
        Some(&model),
        &device,
    )?;
    drop(model);
    let init_noise = match (&a.init_noise, &noise_bytes) {
        (Some(p), Some(bytes)) => {
            let name = p.display().to_string();
            let noise = files::init_noise(&name, bytes, &device)?;
            let b = noise.dims()[0];
            draft_core::model::files::check_batch(&format!("the batch of {name}"), b)?;
            if let Some(n) = a.batch.filter(|&n| n != b) {
                bail!("--batch {n} does not match {name}: tensor `noise` holds a batch of {b}");
            }
            Some(noise)
        }
        _ => None,
    };
    let mut trainer = Trainer::new(
        pipeline,
        config,
        reward,
        prompts,
        init_lora.as_ref(),
        init_noise,
    )?;
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("{}: cannot create", out_dir.display()))?;

    let metrics_path = out_dir.join("metrics.jsonl");
    let mut history: Vec<StepMetrics> = Vec::new();
    if let Some((bytes, _)) = &checkpoint {
        trainer.restore(&checkpoint_path.display().to_string(), bytes)?;
        history = read_metrics(&metrics_path, trainer.step)?;
        eprintln!(
            "draft: resumed from {} at step {}",
            checkpoint_path.display(),
            trainer.step
        );
    } else if a.resume {
        eprintln!(
            "draft: no checkpoint in {}; starting from step 0",
            out_dir.display()
        );
    }
    // Rewrite the metrics up to the restored step (a killed run may have logged past it).
    let lines: String = history
        .iter()
        .map(|m| serde_json::to_string(m).unwrap() + "\n")
        .collect();
    files::write_atomic(&metrics_path, lines.as_bytes())?;
    let mut metrics_file = std::fs::OpenOptions::new()
        .append(true)
        .open(&metrics_path)
        .with_context(|| format!("{}: cannot open", metrics_path.display()))?;
    files::write_atomic(
        &out_dir.join("config.json"),
        serde_json::to_string_pretty(&trainer.config)?.as_bytes(),
    )?;

    let n_params = trainer.pipeline.lora.num_params();
    eprintln!(
        "draft: {} · {} LoRA layers, {} parameters (rank {}, alpha {}) · reward {} · {} prompts · batch {} × {} steps",
        trainer.config.method.name(),
        trainer.pipeline.lora.len(),
        n_params,
        trainer.config.rank,
        trainer.config.alpha(),
        trainer.reward.describe(),
        trainer.prompts.len(),
        trainer.batch(),
        trainer.config.steps
    );

    let mut run = Run::new(trainer, policy)?.with_history(&history);
    // The evaluation before training: made once, at step 0, and carried by the checkpoint.
    if let Some(e) = pollster::block_on(run.evaluate_before())? {
        write_eval(e, &out_dir.join("samples_before.png"))?;
    }

    let total = run.trainer.config.train_steps;
    let bar = ProgressBar::new(total as u64).with_style(
        ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} {msg} · {elapsed} (eta {eta})",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    bar.set_prefix("training");
    bar.set_position(run.trainer.step as u64);
    while !run.done() {
        let u = pollster::block_on(run.update())?;
        let m = u.metrics;
        writeln!(metrics_file, "{}", serde_json::to_string(&m)?)
            .and_then(|_| metrics_file.flush())
            .with_context(|| format!("{}: cannot write", metrics_path.display()))?;
        bar.set_position(m.step as u64);
        let skipped = run.trainer.skipped;
        bar.set_message(format!(
            "reward {:.4} ± {:.4} · |g| {:.3e} · {:.2} s/step{}",
            m.reward_mean,
            m.reward_std,
            m.grad_norm,
            m.seconds,
            if skipped > 0 {
                format!(" · {skipped} skipped")
            } else {
                String::new()
            }
        ));
        if m.skipped {
            bar.println(format!(
                "draft: step {}: non-finite loss or gradient (loss {}, |g| {}); update skipped",
                m.step, m.loss, m.grad_norm
            ));
        }
        if let Some((d0, d)) = u.collapsed {
            bar.println(format!(
                "draft: step {}: diversity {d:.4} fell below {} × its initial {d0:.4}; stopping early (--min-diversity)",
                m.step,
                a.min_diversity.unwrap_or_default()
            ));
        }
        history.push(m);
        if let Some(bytes) = u.checkpoint {
            files::write_atomic(&checkpoint_path, &bytes)?;
        }
    }
    bar.finish();

    let lora_bytes = pollster::block_on(run.trainer.pipeline.lora.to_safetensors())?;
    let lora_path = out_dir.join(LORA_FILE);
    files::write_atomic(&lora_path, &lora_bytes)?;
    let kohya_bytes = pollster::block_on(run.trainer.pipeline.lora.to_kohya_safetensors())?;
    let kohya_path = out_dir.join(KOHYA_FILE);
    files::write_atomic(&kohya_path, &kohya_bytes)?;
    eprintln!(
        "draft: wrote {} (diffusers) and {} (A1111, ComfyUI)",
        lora_path.display(),
        kohya_path.display()
    );
    if preview > 0 {
        let after = out_dir.join("samples_after.png");
        let e = pollster::block_on(run.evaluate_after())?;
        let (r, d, terms) = write_eval(e, &after)?;
        if let Some(b) = run.before() {
            let (rb, db) = (b.reward, b.diversity);
            eprintln!(
                "draft: reward before → after (fixed evaluation set, {} images): {rb:.4} → {r:.4}; diversity {db:.4} → {d:.4}",
                b.images
            );
            eprint!(
                "{}",
                before_after_table(&run.trainer, &b.terms, &terms, (rb, r), (db, d))
            );
        }
    }
    if !history.is_empty() {
        plot::reward_curve(&out_dir.join("reward_curve.png"), &history)?;
    }
    if let (Some(first), Some(last)) = (history.first(), history.last()) {
        eprintln!(
            "draft: reward {:.4} → {:.4} over {} steps ({} skipped); outputs in {}",
            first.reward_mean,
            last.reward_mean,
            history.len(),
            run.trainer.skipped,
            out_dir.display()
        );
    }
    Ok(())
}

fn read_metrics(path: &Path, upto: usize) -> Result<Vec<StepMetrics>> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(Vec::new());
    };
    Ok(text
        .lines()
        .filter_map(|l| serde_json::from_str::<StepMetrics>(l).ok())
        .filter(|m| m.step <= upto)
        .collect())
}

/// Writes an evaluation's images as a grid (a row of two seeds per prompt); returns its reward,
/// diversity and term means, comparable across the run.
fn write_eval(e: FixedEval, path: &Path) -> Result<(f64, f64, Vec<f64>)> {
    let (values, shape) = pollster::block_on(read_f32(to_nhwc(e.images)))?;
    let captions: Vec<String> = e.per_image.iter().map(|r| format!("{r:.4}")).collect();
    images::write_png_grid(path, &values, (shape[0], shape[1], shape[2]), &captions)?;
    eprintln!(
        "draft: wrote {} (mean reward {:.4}, diversity {:.4})",
        path.display(),
        e.reward,
        e.diversity
    );
    Ok((e.reward, e.diversity, e.terms))
}

/// The before/after report as a Markdown table: each reward term's mean on the fixed
/// evaluation set, the weighted total and the diversity.
fn before_after_table(
    trainer: &Trainer,
    before: &[f64],
    after: &[f64],
    total: (f64, f64),
    diversity: (f64, f64),
) -> String {
    let mut out = String::from("| evaluation set | before | after | change |\n|---|---|---|---|\n");
    let mut row = |name: &str, b: f64, a: f64| {
        out.push_str(&format!("| {name} | {b:.4} | {a:.4} | {:+.4} |\n", a - b));
    };
    let terms = &trainer.reward.terms;
    for (((r, w), b), a) in terms.iter().zip(before).zip(after) {
        let name = if *w == 1.0 {
            r.name().to_string()
        } else {
            format!("{} (×{w})", r.name())
        };
        row(&name, *b, *a);
    }
    if terms.len() > 1 {
        row("total", total.0, total.1);
    }
    row("diversity", diversity.0, diversity.1);
    out
}

/// The first `<parent>/run-NNN` that does not exist yet.
fn fresh_run_dir(parent: &Path) -> Result<PathBuf> {
    for i in 1..100_000 {
        let dir = parent.join(format!("run-{i:03}"));
        if !dir.exists() {
            return Ok(dir);
        }
    }
    bail!("{}: no free run-NNN name", parent.display())
}
