//! `draft train`: flags (or a TOML file with the same keys) → the core's training settings
//! ([`Settings`], resolved by [`draft_core::train::config::resolve`]: defaults ← checkpoint ←
//! `--config` file ← flags) → a `draft_core::train::trainer::Trainer`, plus everything around it
//! that touches disk: the model, the LoRA file, metrics, sample grids, the reward curve and the
//! resumable checkpoint.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use draft_core::data::default_model;
use draft_core::model::lora::LoraFile;
use draft_core::model::pipeline::{LoraSetup, to_nhwc};
use draft_core::read_f32;
use draft_core::train::config::{Color, ModelDefaults, Resolved, Saved, Settings, resolve};
use draft_core::train::run::Run;
use draft_core::train::trainer::{CheckpointMeta, FixedEval, StepMetrics, Trainer};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Deserialize;

use crate::device::{self, DeviceArg};
use crate::rewards::RewardFiles;
use crate::{files, images, plot};

pub const LORA_FILE: &str = "pytorch_lora_weights.safetensors";
/// The same LoRA in kohya's layout, for A1111 and ComfyUI.
pub const KOHYA_FILE: &str = "lora_kohya.safetensors";
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";

/// `--help`'s default of a setting that depends on the model.
fn model_default(
    what: &str,
    general: impl std::fmt::Display,
    embedded: impl std::fmt::Display,
) -> String {
    format!("{what} [default: {general}; {embedded} on the embedded model]")
}

/// `draft train`'s flags: the training settings ([`Settings`], the core's: every flag optional so
/// that `--config FILE.toml` or a checkpoint can set it) and what only the command line has
/// (the model, the device, files and folders). The TOML keys are the flag names
/// (`train-steps = 200`, `reward = ["colorfulness=1", "smoothness=0.5"]`).
#[derive(Args, Default, Debug)]
#[command(
    mut_arg("train_steps", |a| a.help(model_default(
        "Optimizer updates",
        ModelDefaults::GENERAL.train_steps,
        default_model::TRAIN_DEFAULTS.train_steps,
    ))),
    mut_arg("lr", |a| a.help(model_default(
        "Learning rate",
        ModelDefaults::GENERAL.lr,
        default_model::TRAIN_DEFAULTS.lr,
    ))),
    mut_arg("eval_every", |a| a.help(model_default(
        "Measure the evaluation set's reward and diversity every N updates and after the last (0: only before and after)",
        ModelDefaults::GENERAL.eval_every,
        default_model::TRAIN_DEFAULTS.eval_every,
    ))),
)]
pub struct TrainArgs {
    /// A TOML file setting any of these flags (flags given on the command line win).
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[command(flatten)]
    pub shell: ShellArgs,
    #[command(flatten)]
    pub settings: Settings,
}

/// The flags (and `--config` keys) that are not training settings.
#[derive(Args, Deserialize, Default, Debug)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct ShellArgs {
    /// A diffusers pipeline folder, or a single-file SD-1.x/2.x/XL checkpoint (.safetensors,
    /// .ckpt) [default: the embedded shapes-32 model].
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Load this weights variant of a diffusers folder (`fp16` reads
    /// diffusion_pytorch_model.fp16.safetensors, …), as diffusers' `variant=`.
    #[arg(long)]
    pub variant: Option<String>,
    /// For a single-file --model: a diffusers folder whose config files (and tokenizer) replace
    /// the ones inferred from the checkpoint.
    #[arg(long)]
    pub model_config: Option<PathBuf>,
    #[arg(long, value_enum)]
    pub device: Option<DeviceArg>,
    /// Weights of a learned reward, NAME=PATH, repeatable: `clip=DIR` (a transformers or
    /// OpenCLIP folder; laion-aesthetic, clip-score), `laion-aesthetic=FILE` (the MLP, .pth or
    /// .safetensors), `pickscore=DIR`, `hpsv2=DIR|FILE` (OpenCLIP; a lone .pt is ViT-H-14),
    /// `tokenizer=DIR` (for models that ship none). See docs/rewards.md.
    #[arg(long, value_name = "NAME=PATH")]
    pub reward_model: Option<Vec<String>>,
    /// A file of training prompts, one per line.
    #[arg(long)]
    pub prompts: Option<PathBuf>,
    /// Start from this LoRA file (diffusers layout).
    #[arg(long)]
    pub init_lora: Option<PathBuf>,
    /// Initial latents of the first step's batch: safetensors with tensor `noise` [B, C, h, w].
    #[arg(long)]
    pub init_noise: Option<PathBuf>,
    /// Output folder [default: a fresh runs/run-NNN].
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Continue from the checkpoint in --out-dir (`draft train`'s or one downloaded from the
    /// browser page); the settings and prompts not given as flags are the checkpoint's.
    #[arg(long)]
    #[serde(default)]
    pub resume: bool,
}

impl ShellArgs {
    /// These flags over the `--config` file's.
    fn over(self, file: ShellArgs) -> ShellArgs {
        ShellArgs {
            model: self.model.or(file.model),
            variant: self.variant.or(file.variant),
            model_config: self.model_config.or(file.model_config),
            device: self.device.or(file.device),
            reward_model: self.reward_model.or(file.reward_model),
            prompts: self.prompts.or(file.prompts),
            init_lora: self.init_lora.or(file.init_lora),
            init_noise: self.init_noise.or(file.init_noise),
            out_dir: self.out_dir.or(file.out_dir),
            resume: self.resume || file.resume,
        }
    }

    /// A layer's settings with its `--prompts` file read into the prompt list.
    fn with_prompt_file(&self, mut settings: Settings) -> Result<Settings> {
        let Some(path) = &self.prompts else {
            return Ok(settings);
        };
        if settings.prompt.is_some() || settings.prompt_set.is_some() {
            bail!("give only one of --prompt, --prompts and --prompt-set");
        }
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
        settings.prompt = Some(list);
        Ok(settings)
    }
}

/// The keys of a `--config` file: the shell's and the training settings.
struct ConfigFile {
    shell: ShellArgs,
    settings: Settings,
}

/// The keys of a `--config` TOML file that are the shell's (the others are [`Settings`]).
const SHELL_KEYS: [&str; 10] = [
    "model",
    "variant",
    "model-config",
    "device",
    "reward-model",
    "prompts",
    "init-lora",
    "init-noise",
    "out-dir",
    "resume",
];

impl ConfigFile {
    fn read(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        // The line of a key, for errors found after parsing.
        let line_of = |key: &str| {
            text.lines().position(|l| {
                l.trim_start()
                    .strip_prefix(key)
                    .is_some_and(|rest| rest.trim_start().starts_with('='))
            })
        };
        let fail = |line: Option<usize>, msg: &str| {
            anyhow::anyhow!(
                "{}{}: {}",
                path.display(),
                line.map(|l| format!(" line {}", l + 1)).unwrap_or_default(),
                draft_core::error::one_line(msg.trim())
            )
        };
        let table: toml::Table = toml::from_str(&text).map_err(|e| {
            let line = e
                .span()
                .and_then(|s| text.get(..s.start))
                .map(|before| before.matches('\n').count());
            fail(line, e.message())
        })?;
        let (shell, settings): (toml::Table, toml::Table) = table
            .into_iter()
            .partition(|(k, _)| SHELL_KEYS.contains(&k.as_str()));
        // Each part with the key a value error is about.
        fn part<T: serde::de::DeserializeOwned>(t: toml::Table) -> Result<T, (String, String)> {
            serde_path_to_error::deserialize(toml::Value::Table(t)).map_err(|e| {
                let key = e.path().to_string();
                (key, e.into_inner().message().to_string())
            })
        }
        let named = |(key, msg): (String, String)| {
            let top = key.split(['.', '[']).next().unwrap_or("");
            match line_of(top) {
                Some(l) => fail(Some(l), &format!("{key}: {msg}")),
                // An unknown key: the message names it.
                None => fail(None, &msg),
            }
        };
        let mut shell: ShellArgs = part(shell).map_err(named)?;
        let settings: Settings = part(settings).map_err(named)?;
        // Relative paths in the file are relative to the file's folder.
        let base = path.parent().unwrap_or(Path::new(".")).to_path_buf();
        for p in [
            &mut shell.model,
            &mut shell.model_config,
            &mut shell.prompts,
            &mut shell.init_lora,
            &mut shell.init_noise,
            &mut shell.out_dir,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
        Ok(Self { shell, settings })
    }
}

/// `draft train`'s arguments with their `--config` file read and the settings resolved: what is
/// refused here is refused before anything loads.
pub struct Plan {
    pub shell: ShellArgs,
    pub run: Resolved,
    /// The checkpoint resumed: its bytes and metadata.
    checkpoint: Option<(Vec<u8>, CheckpointMeta)>,
    out_dir: PathBuf,
    /// `--batch` as given (the file's or the flag's), which `--init-noise` must match.
    batch_given: Option<usize>,
}

impl TrainArgs {
    /// Reads the `--config` file and, with `--resume`, the checkpoint, and resolves the run's
    /// settings: defaults (the model's) ← checkpoint ← file ← flags. A flag that differs from
    /// the checkpoint is refused by [`Trainer::restore`].
    pub fn plan(self) -> Result<Plan> {
        let TrainArgs {
            config,
            shell,
            settings,
        } = self;
        let file = config.as_deref().map(ConfigFile::read).transpose()?;
        // An error about a setting names the `--config` file, where the setting may come from,
        // on one line whatever the file's strings hold.
        let name = |e: anyhow::Error| match &config {
            Some(p) => {
                let msg = format!("{}: {e:#}", p.display());
                anyhow::anyhow!("{}", draft_core::error::one_line(&msg))
            }
            None => e,
        };
        let flags = shell.with_prompt_file(settings)?;
        let (shell, file_settings) = match file {
            Some(f) => {
                let s = f.shell.with_prompt_file(f.settings).map_err(name)?;
                (shell.over(f.shell), s)
            }
            None => (shell, Settings::default()),
        };
        let batch_given = flags.batch.or(file_settings.batch);
        let out_dir = match &shell.out_dir {
            Some(d) => d.clone(),
            None if shell.resume => bail!("--resume needs --out-dir: the run folder to continue"),
            None => fresh_run_dir(Path::new("runs"))?,
        };
        let checkpoint_path = out_dir.join(CHECKPOINT_FILE);
        let checkpoint = if shell.resume && checkpoint_path.is_file() {
            let bytes = files::read(&checkpoint_path)?;
            let meta = CheckpointMeta::read(&checkpoint_path.display().to_string(), &bytes)?;
            Some((bytes, meta))
        } else {
            None
        };
        let defaults = if shell.model.is_none() {
            default_model::TRAIN_DEFAULTS
        } else {
            ModelDefaults::GENERAL
        };
        let saved = checkpoint.as_ref().map(|(_, m)| Saved {
            config: &m.config,
            prompts: m.prompts.as_deref(),
        });
        let run =
            resolve(&defaults, saved, &[&file_settings, &flags]).map_err(|e| name(e.into()))?;
        // The CLI always keeps a checkpoint of the run folder (what `--resume` continues).
        if run.policy.checkpoint_every == 0 {
            return Err(name(anyhow::anyhow!(
                "--checkpoint-every must be at least 1"
            )));
        }
        Ok(Plan {
            shell,
            run,
            checkpoint,
            out_dir,
            batch_given,
        })
    }

    /// The settings of a `--config` file alone, checked as `draft train` checks them before it
    /// loads anything (tests/fuzz.rs).
    pub fn check_file(path: &Path) -> Result<()> {
        TrainArgs {
            config: Some(path.to_path_buf()),
            shell: ShellArgs {
                out_dir: Some(std::env::temp_dir().join("draft-check-file")),
                ..ShellArgs::default()
            },
            ..TrainArgs::default()
        }
        .check()
    }

    /// Everything `draft train` refuses before it loads anything, without `--resume`'s
    /// checkpoint: the `--config` file, the prompt files and the settings.
    pub fn check(mut self) -> Result<()> {
        self.shell.resume = false;
        if self.shell.out_dir.is_none() {
            self.shell.out_dir = Some(std::env::temp_dir().join("draft-check"));
        }
        self.plan().map(|_| ())
    }
}

/// `--target-color` of `draft score`: R,G,B in [0, 1].
pub fn parse_color(s: &str) -> Result<[f32; 3]> {
    let c = Color::parse(s)?;
    c.check()?;
    Ok(c.0)
}

pub fn run(args: TrainArgs) -> Result<()> {
    let Plan {
        shell: a,
        run: Resolved {
            config,
            policy,
            prompts,
        },
        checkpoint,
        out_dir,
        batch_given,
    } = args.plan()?;
    let checkpoint_path = out_dir.join(CHECKPOINT_FILE);
    // Learned rewards' files are read now; the models are built once the device is known.
    let reward_files =
        RewardFiles::read(&config.rewards, a.reward_model.as_deref().unwrap_or(&[]))?;
    let init_lora = match &a.init_lora {
        Some(p) => Some(LoraFile::parse(&p.display().to_string(), &files::read(p)?)?),
        None => None,
    };
    let noise_bytes = a.init_noise.as_ref().map(|p| files::read(p)).transpose()?;
    let preview = policy.eval_images;
    let min_diversity = policy.min_diversity;

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
            if let Some(n) = batch_given.filter(|&n| n != b) {
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
                min_diversity.unwrap_or_default()
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
