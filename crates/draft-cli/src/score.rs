//! `draft score`: score PNG images (files or folders) or freshly sampled ones with any reward,
//! and print a table (one row per image, one column per reward term, then the weighted total).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::prelude::*;
use clap::Args;
use draft_core::model::lora::LoraFile;
use draft_core::model::pipeline::{LoraSetup, SampleOptions};
use draft_core::noise::NoiseRng;
use draft_core::reward::builtin::{RewardOptions, WeightedReward};
use draft_core::{ModelFiles, read_f32};
use indicatif::{ProgressBar, ProgressStyle};

use crate::device::{self, DeviceArg};
use crate::files;
use crate::rewards::RewardFiles;
use crate::sample::parse_lora_arg;

#[derive(Args)]
pub struct ScoreArgs {
    /// PNG files or folders of PNGs to score (or use --sample).
    images: Vec<PathBuf>,
    /// Sample this many images from --model (prompts cycled) and score them instead.
    #[arg(long)]
    sample: Option<usize>,
    /// A diffusers pipeline folder or single-file checkpoint for --sample [default: the
    /// embedded shapes-32 model].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Weights variant of a diffusers --model (e.g. `fp16`).
    #[arg(long)]
    variant: Option<String>,
    /// Config folder for a single-file --model.
    #[arg(long)]
    model_config: Option<PathBuf>,
    /// A LoRA for --sample, FILE[:SCALE]; repeatable.
    #[arg(long, value_name = "FILE[:SCALE]")]
    lora: Vec<String>,
    /// The prompt of the images (cycled over them); prompt rewards (clip-score, pickscore,
    /// hpsv2) need one, --sample samples from them.
    #[arg(long)]
    prompt: Vec<String>,
    /// DDIM steps, guidance and seed of --sample.
    #[arg(long, default_value_t = 50)]
    steps: usize,
    #[arg(long, default_value_t = 7.5)]
    guidance: f64,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Reward term NAME[=WEIGHT], repeatable (as `draft train --reward`) [default: colorfulness].
    #[arg(long)]
    reward: Vec<String>,
    /// Weights of a learned reward, NAME=PATH (as `draft train --reward-model`).
    #[arg(long, value_name = "NAME=PATH")]
    reward_model: Vec<String>,
    /// The colour of the target-color reward, R,G,B in [0, 1].
    #[arg(long)]
    target_color: Option<String>,
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
}

/// The PNG files named: files as given, folders' `*.png` in name order.
fn collect_pngs(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("{}: cannot list", p.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|f| f.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")))
                .collect();
            found.sort();
            if found.is_empty() {
                bail!("{}: no .png files", p.display());
            }
            out.extend(found);
        } else if p.is_file() {
            out.push(p.clone());
        } else {
            bail!("{}: not found", p.display());
        }
    }
    Ok(out)
}

/// The largest image side `draft score` reads: far above what any reward model looks at (they
/// resize to 224 or so), and it bounds the decode of a small file that claims a huge image.
pub const MAX_IMAGE_SIDE: u32 = 4096;

/// A PNG as `[1, 3, H, W]` in [0, 1].
pub fn read_png(path: &Path, device: &Device) -> Result<Tensor<4>> {
    let name = path.display();
    let mut reader = image::ImageReader::open(path)
        .with_context(|| format!("{name}: cannot read"))?
        .with_guessed_format()
        .with_context(|| format!("{name}: cannot read"))?;
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    reader.limits(limits);
    let img = reader
        .decode()
        .map_err(|e| {
            anyhow::anyhow!(
                "{name}: not a readable image ({MAX_IMAGE_SIDE} pixels a side at most): {e}"
            )
        })?
        .to_rgb8();
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w == 0 || h == 0 {
        bail!("{name}: the image is empty ({w}×{h})");
    }
    let mut chw = vec![0f32; 3 * h * w];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            chw[c * h * w + i] = p[c] as f32 / 255.0;
        }
    }
    Ok(Tensor::from_data(
        TensorData::new(chw, [1, 3, h, w]),
        device,
    ))
}

pub fn run(a: ScoreArgs) -> Result<()> {
    let specs = if a.reward.is_empty() {
        vec!["colorfulness".to_string()]
    } else {
        a.reward.clone()
    };
    draft_core::reward::builtin::check_specs(&specs)?;
    let mut options = RewardOptions::default();
    if let Some(s) = &a.target_color {
        options.target_color = crate::train::parse_color(s)?;
    }
    let reward_files = RewardFiles::read(&specs, &a.reward_model)?;
    if a.sample.is_some() != a.images.is_empty() {
        bail!("give PNG files/folders to score, or --sample N (not both)");
    }
    let pngs = collect_pngs(&a.images)?;
    let device = device::select(a.device)?;
    let model: Option<ModelFiles> = match (&a.sample, &a.model) {
        (Some(_), model) => Some(files::read_model(
            model.as_deref(),
            a.variant.as_deref(),
            a.model_config.as_deref(),
        )?),
        (None, _) => None,
    };
    let reward = reward_files.build(&specs, &options, model.as_ref(), &device)?;
    if reward.needs_prompts() && a.prompt.is_empty() {
        bail!(
            "{} scores images against their prompts: give --prompt (repeatable, cycled over the images)",
            reward.describe()
        );
    }
    let prompt_of = |i: usize| {
        a.prompt
            .get(i % a.prompt.len().max(1))
            .cloned()
            .unwrap_or_default()
    };

    // (label, prompt, per-term values)
    let mut rows: Vec<(String, String, Vec<f32>)> = Vec::new();
    match a.sample {
        Some(n) => {
            draft_core::model::files::check_batch("--sample", n)?;
            if a.prompt.is_empty() {
                bail!("--sample needs --prompt");
            }
            let mut loras = Vec::new();
            for spec in &a.lora {
                let (path, scale) = parse_lora_arg(spec)?;
                let name = path.display().to_string();
                loras.push((LoraFile::parse(&name, &files::read(&path)?)?, scale));
            }
            let setup = LoraSetup::Files(loras.iter().map(|(f, s)| (f, *s)).collect());
            let pipe = crate::device::load_pipeline(model.as_ref().expect("set"), &device, &setup)?;
            let size = pipe.default_image_size();
            let [c, h, w] = pipe.latent_shape(size, size)?;
            let prompts: Vec<String> = (0..n).map(prompt_of).collect();
            let options = SampleOptions {
                prompts: prompts.clone(),
                negative_prompt: String::new(),
                steps: a.steps,
                guidance: a.guidance,
                eta: 0.0,
                seed: a.seed,
                size: Default::default(),
            };
            let bar = ProgressBar::new(a.steps as u64).with_style(
                ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} steps {elapsed}")
                    .expect("valid template")
                    .progress_chars("=> "),
            );
            bar.set_prefix("sampling");
            let x_t = NoiseRng::new(a.seed).randn([n, c, h, w], &device);
            let latents = pipe.sample_latents(&options, x_t, |i, _| bar.set_position(i as u64))?;
            bar.finish_and_clear();
            let images = pipe.decode(latents);
            let terms = term_values(&reward, images, &prompts)?;
            for (i, p) in prompts.into_iter().enumerate() {
                rows.push((
                    format!("sample {i} (seed {})", a.seed),
                    p,
                    terms.iter().map(|t| t[i]).collect(),
                ));
            }
        }
        None => {
            for (i, path) in pngs.iter().enumerate() {
                let p = prompt_of(i);
                let image = read_png(path, &device)?;
                let terms = term_values(&reward, image, std::slice::from_ref(&p))?;
                rows.push((
                    path.display().to_string(),
                    p,
                    terms.iter().map(|t| t[0]).collect(),
                ));
            }
        }
    }
    print!("{}", table(&reward, &rows, !a.prompt.is_empty()));
    Ok(())
}

/// Each term's values for a batch.
fn term_values(
    reward: &WeightedReward,
    images: Tensor<4>,
    prompts: &[String],
) -> Result<Vec<Vec<f32>>> {
    reward
        .score_terms(images, prompts)?
        .into_iter()
        .map(|t| Ok(pollster::block_on(read_f32(t))?.0))
        .collect()
}

/// A Markdown table: image, prompt, each term, the weighted total; a last row of means.
pub fn table(
    reward: &WeightedReward,
    rows: &[(String, String, Vec<f32>)],
    prompts: bool,
) -> String {
    let mut head = vec!["image".to_string()];
    if prompts {
        head.push("prompt".into());
    }
    for (r, w) in &reward.terms {
        head.push(if *w == 1.0 {
            r.name().to_string()
        } else {
            format!("{} (×{w})", r.name())
        });
    }
    if reward.terms.len() > 1 {
        head.push("total".into());
    }
    let mut out = format!("| {} |\n|{}\n", head.join(" | "), "---|".repeat(head.len()));
    let total = |v: &[f32]| -> f64 {
        v.iter()
            .zip(&reward.terms)
            .map(|(x, (_, w))| *x as f64 * w)
            .sum()
    };
    let mut line = |label: &str, prompt: &str, v: &[f64], t: f64| {
        let mut cells = vec![label.to_string()];
        if prompts {
            cells.push(prompt.to_string());
        }
        cells.extend(v.iter().map(|x| format!("{x:.4}")));
        if reward.terms.len() > 1 {
            cells.push(format!("{t:.4}"));
        }
        out.push_str(&format!("| {} |\n", cells.join(" | ")));
    };
    for (label, prompt, v) in rows {
        let v64: Vec<f64> = v.iter().map(|x| *x as f64).collect();
        line(label, prompt, &v64, total(v));
    }
    if rows.len() > 1 {
        let n = rows.len() as f64;
        let means: Vec<f64> = (0..reward.terms.len())
            .map(|j| rows.iter().map(|r| r.2[j] as f64).sum::<f64>() / n)
            .collect();
        let t = rows.iter().map(|r| total(&r.2)).sum::<f64>() / n;
        line(&format!("**mean of {}**", rows.len()), "", &means, t);
    }
    out
}
