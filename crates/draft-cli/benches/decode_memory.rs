//! Memory of the differentiable decode + reward at the paper's resolution (issue 14, item 2):
//! the VAE decoder of SD-1.4 (its config, random weights, 83 M parameters) from 64×64 latents
//! to a 512×512 image, scored by colourfulness, back-propagated to the latents — as one graph
//! (how the trainer did it before), checkpointed per resnet (`Pipeline::decode_chain`, what
//! the trainer does), and checkpointed with the layers over 128 MiB on strips of rows
//! (`draft_core::memory::strips`, what it does on GPU adapters). Prints peak resident memory over the
//! weights and seconds per pass.
//!
//! `cargo bench -p draft-cli --bench decode_memory -- [--batch 1] [--side 512] [--modes whole,chain,strips]`
//!
//! Each mode runs in a child process of its own (peak RSS = VmHWM, reset after loading) on the
//! CPU backend, where every buffer is host memory.

mod common;

use std::process::Command;
use std::time::Instant;

use burn::prelude::*;
use draft_core::model::models::vae::{AutoencoderKL, AutoencoderKLConfig};
use draft_core::model::var_builder::VarBuilder;
use draft_core::noise::NoiseRng;
use draft_core::reward::builtin::{RewardOptions, WeightedReward};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| common::flag(&args, name);
    let batch: usize = flag("--batch").and_then(|s| s.parse().ok()).unwrap_or(1);
    let side: usize = flag("--side").and_then(|s| s.parse().ok()).unwrap_or(512);
    if let Some(mode) = flag("--case") {
        run_case(&mode, batch, side);
        return;
    }
    let modes = flag("--modes").unwrap_or_else(|| "whole,chain,strips".into());
    println!(
        "| decode + reward backward | image | batch | weights (MiB) | peak growth over the weights (MiB) | s / pass |"
    );
    println!("|---|---|---|---|---|---|");
    for mode in modes.split(',') {
        let out = Command::new(std::env::current_exe().unwrap())
            .args([
                "--case",
                mode,
                "--batch",
                &batch.to_string(),
                "--side",
                &side.to_string(),
            ])
            .output()
            .expect("runs itself");
        let text = String::from_utf8_lossy(&out.stdout);
        match text.lines().find(|l| l.starts_with('|')) {
            Some(row) if out.status.success() => println!("{row}"),
            _ => println!(
                "| {mode} | {side}² | {batch} | – | failed: {} | – |",
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            ),
        }
    }
}

fn rss_mib(field: &str) -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

fn run_case(mode: &str, batch: usize, side: usize) {
    let device = Device::flex();
    let config = AutoencoderKLConfig::from_json(
        "sd14_vae_config.json",
        include_str!("sd14_vae_config.json"),
    )
    .unwrap();
    let vae = AutoencoderKL::load(VarBuilder::random(3, &device), &config).unwrap();
    let reward =
        WeightedReward::from_specs(&["colorfulness".into()], &RewardOptions::default()).unwrap();
    let latent = side / 8;
    let z = NoiseRng::new(1).randn([batch, config.latent_channels, latent, latent], &device);
    let prompts = vec![String::new(); batch];
    let weights = rss_mib("VmRSS");
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let to_image = |x: Tensor<4>| (x / 2.0 + 0.5).clamp(0.0, 1.0);
    let scale = config.scaling_factor;
    let t0 = Instant::now();
    let g = match mode {
        "whole" => {
            let z = z.autodiff().require_grad();
            let images = to_image(vae.decode(z.clone() / scale));
            let loss = -reward.score(images, &prompts).unwrap().mean();
            let grads = loss.backward();
            z.grad(&grads).unwrap()
        }
        "chain" | "strips" => {
            let budget = if mode == "strips" {
                draft_core::memory::strips::MAX_BUFFER_BYTES
            } else {
                u64::MAX
            };
            let chain = vae.decode_chain(move |z| z / scale, to_image, budget);
            let (images, kept) = chain.forward(z);
            let images = images.autodiff().require_grad();
            let loss = -reward.score(images.clone(), &prompts).unwrap().mean();
            let grads = loss.backward();
            let g = images.grad(&grads).unwrap();
            drop(grads);
            chain.vjp(kept, g, |_| {}).unwrap()
        }
        other => panic!("unknown mode {other} (whole, chain, strips)"),
    };
    let norm = g.powf_scalar(2.0).sum().into_scalar::<f32>().sqrt();
    let secs = t0.elapsed().as_secs_f64();
    let peak = rss_mib("VmHWM");
    assert!(norm.is_finite() && norm > 0.0, "gradient norm {norm}");
    let what = match mode {
        "whole" => "one graph",
        "chain" => "checkpointed per resnet",
        _ => "checkpointed per resnet, on strips of ≤ 128 MiB",
    };
    println!(
        "| {what} | {side}² | {batch} | {weights:.0} | {:.0} | {secs:.1} |",
        peak - weights
    );
}
