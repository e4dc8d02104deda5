//! `draft pretrain`: train the small text-to-image model on the procedural shapes dataset and
//! write it as a diffusers folder (see `draft_core::data::pretrain`).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use draft_core::data::pretrain::{self, PretrainConfig, Pretrainer};
use indicatif::{ProgressBar, ProgressStyle};

use crate::device::{self, DeviceArg};
use crate::files::write_atomic;
use crate::images::write_png_grid;

#[derive(Args, Debug)]
pub struct PretrainArgs {
    /// Folder for the model (`model/`), checkpoint, metrics and sample grids.
    #[arg(long, default_value = "pretrain-out")]
    pub out_dir: PathBuf,
    /// Total optimisation steps (a resumed run continues up to this many).
    #[arg(long)]
    pub train_steps: Option<usize>,
    /// Images per step.
    #[arg(long)]
    pub batch: Option<usize>,
    #[arg(long)]
    pub lr: Option<f64>,
    #[arg(long)]
    pub seed: Option<u64>,
    /// UNet block_out_channels, e.g. `32,64,64`.
    #[arg(long, value_delimiter = ',')]
    pub channels: Option<Vec<usize>>,
    /// Text encoder width (also the UNet's cross_attention_dim).
    #[arg(long)]
    pub text_width: Option<usize>,
    #[arg(long)]
    pub ema_decay: Option<f64>,
    /// Min-SNR-γ loss weighting (e.g. 5; 0 = plain ε-MSE). May change when resuming.
    #[arg(long)]
    pub min_snr_gamma: Option<f64>,
    /// Continue from `<out-dir>/checkpoint.safetensors`.
    #[arg(long)]
    pub resume: bool,
    /// With --resume: only measure the checkpoint's held-out attribute accuracy (written to
    /// accuracy.jsonl and held_out.png), no training.
    #[arg(long, requires = "resume")]
    pub eval_only: bool,
    /// Write the checkpoint and the model every N steps.
    #[arg(long, default_value_t = 250)]
    pub checkpoint_every: usize,
    /// Measure held-out attribute accuracy every N steps (0: only at the end).
    #[arg(long, default_value_t = 0)]
    pub eval_every: usize,
    /// DDIM steps and guidance of the accuracy measurement.
    #[arg(long, default_value_t = 50)]
    pub eval_steps: usize,
    #[arg(long, default_value_t = 7.5)]
    pub eval_guidance: f64,
    #[arg(long, value_enum, default_value = "auto")]
    pub device: DeviceArg,
}

impl PretrainArgs {
    fn config(&self) -> PretrainConfig {
        let d = PretrainConfig::default();
        PretrainConfig {
            seed: self.seed.unwrap_or(d.seed),
            batch: self.batch.unwrap_or(d.batch),
            train_steps: self.train_steps.unwrap_or(d.train_steps),
            lr: self.lr.unwrap_or(d.lr),
            channels: self.channels.clone().unwrap_or(d.channels.clone()),
            text_width: self.text_width.unwrap_or(d.text_width),
            ema_decay: self.ema_decay.unwrap_or(d.ema_decay),
            min_snr_gamma: self.min_snr_gamma.unwrap_or(d.min_snr_gamma),
            ..d
        }
    }
}

pub fn run(args: PretrainArgs) -> Result<()> {
    let config = args.config();
    config.validate()?;
    let device = device::select(args.device)?;
    std::fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("cannot create {}", args.out_dir.display()))?;
    let checkpoint_path = args.out_dir.join("checkpoint.safetensors");
    let metrics_path = args.out_dir.join("metrics.jsonl");
    let mut trainer = Pretrainer::new(config.clone(), &device)?;
    if args.resume {
        let bytes = std::fs::read(&checkpoint_path)
            .with_context(|| format!("--resume: cannot read {}", checkpoint_path.display()))?;
        trainer.restore(&checkpoint_path.display().to_string(), &bytes)?;
        eprintln!("draft: resumed at step {}", trainer.step);
        if !args.eval_only {
            truncate_metrics(&metrics_path, trainer.step)?;
        }
    } else if checkpoint_path.exists() {
        bail!(
            "{} exists: pass --resume to continue that run, or choose another --out-dir",
            checkpoint_path.display()
        );
    } else {
        let _ = std::fs::remove_file(&metrics_path);
    }
    let [u, t] = trainer.num_params();
    eprintln!(
        "draft: pretraining UNet ({u} parameters) + text encoder ({t}) on {}×{} shapes, batch {}",
        config.image_size, config.image_size, config.batch
    );
    if args.eval_only {
        eprintln!("{}", evaluate(&trainer, &args, &device)?);
        return Ok(());
    }
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .with_context(|| format!("cannot open {}", metrics_path.display()))?;

    let total = config.train_steps;
    let bar = ProgressBar::new(total as u64).with_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .expect("valid template"),
    );
    bar.set_position(trainer.step as u64);
    let mut loss_avg: Option<f64> = None;
    let started = std::time::Instant::now();
    let first = trainer.step;
    while trainer.step < total {
        let m = pollster::block_on(trainer.train_step())?;
        loss_avg = Some(loss_avg.map_or(m.loss, |a| 0.98 * a + 0.02 * m.loss));
        writeln!(metrics, "{}", serde_json::to_string(&m)?)?;
        let per_step = started.elapsed().as_secs_f64() / (trainer.step - first) as f64;
        bar.set_message(format!(
            "loss {:.4} |g| {:.3} {:.2} s/step",
            loss_avg.unwrap_or(m.loss),
            m.grad_norm,
            per_step
        ));
        bar.set_position(trainer.step as u64);
        let done = trainer.step == total;
        if done || trainer.step % args.checkpoint_every.max(1) == 0 {
            metrics.flush()?;
            save(&trainer, &args.out_dir)?;
            write_atomic(&checkpoint_path, &pollster::block_on(trainer.checkpoint())?)?;
        }
        if done || (args.eval_every > 0 && trainer.step % args.eval_every == 0) {
            let line = evaluate(&trainer, &args, &device)?;
            bar.println(line);
        }
    }
    bar.finish();
    eprintln!(
        "draft: model written to {} (load it with --model {0})",
        args.out_dir.join("model").display()
    );
    Ok(())
}

/// Writes the EMA model as a diffusers folder under `<out>/model/`.
fn save(trainer: &Pretrainer, out: &Path) -> Result<()> {
    let files = pollster::block_on(trainer.model_files(true))?;
    for (rel, bytes) in &files.files {
        let path = out.join("model").join(rel);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        write_atomic(&path, bytes)?;
    }
    Ok(())
}

/// Samples the held-out captions from the EMA model, writes the grid and `accuracy.json`, and
/// returns the line to print.
fn evaluate(
    trainer: &Pretrainer,
    args: &PretrainArgs,
    device: &burn::prelude::Device,
) -> Result<String> {
    let files = pollster::block_on(trainer.model_files(true))?;
    let pipeline = draft_core::Pipeline::load(&files, device)?;
    let wanted = pretrain::held_out_attributes();
    let (acc, images) = pollster::block_on(pretrain::attribute_accuracy(
        &pipeline,
        &wanted,
        args.eval_steps,
        args.eval_guidance,
        0,
        wanted.len(),
    ))?;
    let s = pipeline.default_image_size();
    let mut nhwc = Vec::with_capacity(images.len() * 3 * s * s);
    for img in &images {
        for i in 0..s * s {
            for c in 0..3 {
                nhwc.push(img[c * s * s + i]);
            }
        }
    }
    write_png_grid(
        &args.out_dir.join("held_out.png"),
        &nhwc,
        (images.len(), s, s),
        &[],
    )?;
    let mut record = serde_json::to_value(&acc)?;
    record["step"] = trainer.step.into();
    record["ddim_steps"] = args.eval_steps.into();
    record["guidance"] = args.eval_guidance.into();
    let path = args.out_dir.join("accuracy.jsonl");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)?;
    writeln!(f, "{record}")?;
    Ok(format!(
        "step {}: held-out attribute accuracy {:.1} % (shape {:.1} %, colour {:.1} %, background {:.1} %, {} samples)",
        trainer.step,
        100.0 * acc.attributes,
        100.0 * acc.shape,
        100.0 * acc.color,
        100.0 * acc.background,
        acc.samples
    ))
}

/// Keeps the first `upto` lines of the metrics file (a resumed run rewrites the rest).
fn truncate_metrics(path: &Path, upto: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: Vec<&str> = text.lines().take(upto).collect();
    let mut out = kept.join("\n");
    if !out.is_empty() {
        out.push('\n');
    }
    write_atomic(path, out.as_bytes())
}
