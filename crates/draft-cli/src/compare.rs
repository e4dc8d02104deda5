//! `draft compare`: several runs' `metrics.jsonl` on one figure, with a table of their first
//! and last values — how docs/methods.md compares DRaFT-1, DRaFT-LV, ReFL, full DRaFT and
//! AlignProp.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use draft_core::train::trainer::StepMetrics;

use crate::plot;

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Metric {
    /// The fixed evaluation set's mean reward (every --eval-every steps).
    EvalReward,
    /// The training batches' mean reward (every step; noisier).
    Reward,
    /// The fixed evaluation set's diversity.
    Diversity,
}

#[derive(Args, Debug)]
pub struct CompareArgs {
    /// Run folders (each with metrics.jsonl), optionally labelled: DIR[=LABEL].
    #[arg(required = true)]
    runs: Vec<String>,
    #[arg(long, value_enum, default_value = "eval-reward")]
    metric: Metric,
    /// The figure (PNG).
    #[arg(long)]
    out: Option<PathBuf>,
}

pub fn run(a: CompareArgs) -> Result<()> {
    let mut series = Vec::new();
    let mut labels = Vec::new();
    for spec in &a.runs {
        let (dir, label) = match spec.split_once('=') {
            Some((d, l)) => (PathBuf::from(d), l.to_string()),
            None => (PathBuf::from(spec), spec.clone()),
        };
        let path = dir.join("metrics.jsonl");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        let mut points = Vec::new();
        for (i, line) in text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
        {
            let m: StepMetrics = serde_json::from_str(line)
                .with_context(|| format!("{}:{}: not a metrics line", path.display(), i + 1))?;
            let y = match a.metric {
                Metric::Reward => Some(m.reward_mean),
                Metric::EvalReward => m.eval_reward,
                Metric::Diversity => m.diversity,
            };
            if let Some(y) = y {
                points.push((m.step as f64, y));
            }
        }
        if points.is_empty() {
            bail!(
                "{}: no {:?} values (eval-reward and diversity need --eval-every)",
                path.display(),
                a.metric
            );
        }
        series.push(points);
        labels.push(label);
    }
    println!(
        "| run | colour | {:?} first | last | best | at step |",
        a.metric
    );
    println!("|---|---|---|---|---|---|");
    for (i, (s, label)) in series.iter().zip(&labels).enumerate() {
        let best = s.iter().copied().fold(
            (0.0, f64::NEG_INFINITY),
            |b, p| if p.1 > b.1 { p } else { b },
        );
        println!(
            "| {label} | {} | {:.4} | {:.4} | {:.4} | {} |",
            plot::PALETTE[i % plot::PALETTE.len()].0,
            s[0].1,
            s[s.len() - 1].1,
            best.1,
            best.0
        );
    }
    if let Some(out) = &a.out {
        let (title, y) = match a.metric {
            Metric::EvalReward => ("Fixed evaluation set reward", "evaluation-set reward"),
            Metric::Reward => ("Training batch reward", "batch mean reward"),
            Metric::Diversity => ("Fixed evaluation set diversity", "diversity"),
        };
        let labelled: Vec<(String, Vec<(f64, f64)>)> =
            labels.iter().cloned().zip(series.iter().cloned()).collect();
        let labels = plot::Labels {
            title,
            x: "update",
            y,
        };
        plot::curves(out, &labels, &labelled)?;
        eprintln!("draft: wrote {}", out.display());
    }
    Ok(())
}
