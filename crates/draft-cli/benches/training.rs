//! Training-step benchmark: seconds per DRaFT training step and peak memory, per method, on
//! the sd1-tiny fixture and on a random UNet with SD-1.4's config at 32×32 latents (with the
//! fixture's tiny VAE and a one-layer 768-wide random text encoder, so that the UNet dominates).
//!
//! `cargo bench -p draft-cli --bench training -- [--devices cpu,wgpu] [--tiny-steps 50]
//!  [--sd14-steps 6] [--sd14-devices cpu] [--reward colorfulness|aesthetic-l14]
//!  [--methods k1,k5,k50,lv2,refl] [--threads 1,2] [--torch PYTHON [--torch-threads 1,2]]
//!  [--paper-steps 2] [--sdxl 1024[,512]] [--sdxl-steps 2] [--repeat N]`
//!
//! `--sdxl SIZES` adds SDXL's scale (issue 29): a random pipeline with SDXL-base 1.0's whole
//! architecture (`sdxl_*_config.json`: the 2.6 B UNet, both text towers, the VAE; built in
//! memory, the tiny SDXL fixture giving the tokenizers and scheduler) at SIZE² pixels (1024:
//! 128×128 latents), batch 1 with guidance, `--sdxl-steps` sampling steps (default 2), on the
//! CPU backend; with `--weights-dtype f16` its weights are f16.
//!
//! `--repeat N` (default 1) times N steps of each case (PyTorch's too) and prints their median;
//! the peak memory is the first step's. On a shared machine one step's time varies by ±20 %.
//!
//! `--paper-steps N` (default 0: off) adds the paper's scale (issue 14): a random pipeline with
//! SD-1.4's whole architecture — the UNet, the VAE (`sd14_vae_config.json`) and CLIP ViT-L/14's
//! 12-layer text encoder (vocabulary 49408; token ids from the fixture's tokenizer) — at 64×64
//! latents, i.e. 512×512 images, batch 1 with classifier-free guidance, N sampling steps, on
//! the devices of `--sd14-devices`.
//!
//! `--threads` runs every CPU case once per thread count (`RAYON_NUM_THREADS` of the child;
//! default: all cores). `--torch PYTHON` runs `tests/fixtures/bench_torch.py` with that
//! interpreter on the same models, steps and methods right after (PyTorch's full chain and K > 1
//! checkpointed, as ours), at each of `--torch-threads` (default 1,2), and ends with a table of
//! our time over PyTorch's best time for each case.
//!
//! `--max-buffer-mib N` sets `Pipeline::max_buffer_bytes`: the VAE decoder's layers whose tensors
//! would pass N MiB run on strips of rows (`draft_core::memory::strips`; default 128 MiB).
//!
//! `--weights-dtype f16` keeps the UNet's (and for sd1-tiny the whole pipeline's) weight matrices
//! and kernels in f16 (`Pipeline::load_with`); the rows say so.
//!
//! `--reward aesthetic-l14` scores with the LAION aesthetic reward on a random CLIP ViT-L/14
//! vision tower (304 M parameters, 224×224 input) instead of colourfulness: the memory a
//! learned reward adds to a step, and whether it still stays flat in K.
//!
//! Each case runs in a child process of its own so that its peak resident memory (VmHWM,
//! reset with /proc/self/clear_refs after loading) is the step's alone. On a software adapter
//! (lavapipe) "GPU" buffers are host memory and are counted; on a real GPU they are not.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use burn::prelude::*;
use draft_core::model::models::clip::{CLIPConfig, CLIPModel};
use draft_core::model::var_builder::VarBuilder;
use draft_core::reward::builtin::{RewardOptions, WeightedReward};
use draft_core::reward::models::{AestheticMlp, LaionAesthetic};
use draft_core::train::engine::{Engine, Method};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| common::flag(&args, name);
    if let Some(case) = flag("--case") {
        // On a thread of the CPU backend's pool, as `draft` runs its commands.
        rayon::ThreadPoolBuilder::new()
            .stack_size(8 << 20)
            .build_global()
            .unwrap();
        rayon::scope(|_| run_case(&case));
        return;
    }
    let devices = flag("--devices").unwrap_or_else(|| "cpu,wgpu".into());
    let tiny_steps: usize = flag("--tiny-steps")
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    let sd14_steps: usize = flag("--sd14-steps")
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    let sd14_devices = flag("--sd14-devices").unwrap_or_else(|| "cpu".into());
    let sdxl_sizes: Vec<String> = flag("--sdxl")
        .map(|s| s.split(',').map(|x| format!("sdxl-{x}")).collect())
        .unwrap_or_default();
    let sdxl_steps: usize = flag("--sdxl-steps")
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let paper_steps: usize = flag("--paper-steps")
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let reward = flag("--reward").unwrap_or_else(|| "colorfulness".into());
    if !matches!(reward.as_str(), "colorfulness" | "aesthetic-l14") {
        panic!("--reward {reward}: expected colorfulness or aesthetic-l14");
    }
    let only: Option<Vec<String>> =
        flag("--methods").map(|m| m.split(',').map(str::to_string).collect());
    let threads: Vec<Option<String>> = match flag("--threads") {
        Some(t) => t.split(',').map(|n| Some(n.to_string())).collect(),
        None => vec![None],
    };

    let header = "| device | model | sampling steps | method | s / step | UNet grad calls | peak RSS during step (MiB) | stored latents (KiB) |";
    println!("{header}");
    println!("|---|---|---|---|---|---|---|---|");
    let mut rows: Vec<String> = Vec::new();
    for dev in devices.split(',') {
        let mut models = Vec::new();
        if tiny_steps > 0 {
            models.push(("sd1-tiny", tiny_steps));
        }
        if sd14_steps > 0 && sd14_devices.split(',').any(|d| d == dev) {
            models.push(("sd14", sd14_steps));
        }
        if paper_steps > 0 && sd14_devices.split(',').any(|d| d == dev) {
            models.push(("sd14-512", paper_steps));
        }
        if dev == "cpu" {
            for m in &sdxl_sizes {
                models.push((m.as_str(), sdxl_steps));
            }
        }
        for (model, steps) in models {
            let k5 = 5.min(steps);
            let mut methods = vec![format!("k1"), format!("k{k5}")];
            if k5 != steps {
                methods.push(format!("k{steps}"));
            }
            methods.extend(["lv2".to_string(), "refl".to_string()]);
            methods.retain(|m| only.as_ref().is_none_or(|o| o.contains(m)));
            for m in &methods {
                for t in if dev == "cpu" {
                    &threads[..]
                } else {
                    &[None][..]
                } {
                    let case = format!("{dev}:{model}:{steps}:{m}:{reward}");
                    let mut cmd = Command::new(std::env::current_exe().unwrap());
                    cmd.args(["--case", &case]);
                    if let Some(d) = flag("--weights-dtype") {
                        cmd.env("DRAFT_BENCH_WEIGHTS_DTYPE", d);
                    }
                    if let Some(r) = flag("--repeat") {
                        cmd.env("DRAFT_BENCH_REPEAT", r);
                    }
                    if let Some(m) = flag("--max-buffer-mib") {
                        cmd.env("DRAFT_BENCH_MAX_BUFFER_MIB", m);
                    }
                    if let Some(t) = t {
                        cmd.env("RAYON_NUM_THREADS", t);
                    }
                    let out = cmd.output().expect("run case");
                    let stdout = String::from_utf8_lossy(&out.stdout);
                    let row = match stdout.lines().find(|l| l.starts_with('|')) {
                        Some(row) => row.to_string(),
                        None => format!(
                            "| {dev} | {model} | {steps} | {m} | failed: {} |",
                            String::from_utf8_lossy(&out.stderr)
                                .lines()
                                .last()
                                .unwrap_or("")
                        ),
                    };
                    println!("{row}");
                    rows.push(row);
                }
            }
        }
    }
    if let Some(python) = flag("--torch") {
        let torch_threads = flag("--torch-threads").unwrap_or_else(|| "1,2".into());
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/bench_torch.py");
        // `cargo bench` runs this in crates/draft-cli: a relative interpreter path such as
        // tests/fixtures/.venv/bin/python is taken from the workspace root.
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let python = if python.contains('/') && Path::new(&python).is_relative() {
            root.join(&python).display().to_string()
        } else {
            python
        };
        let mut cmd = Command::new(python);
        cmd.arg(script).args([
            "--tiny-steps",
            &tiny_steps.to_string(),
            "--sd14-steps",
            &sd14_steps.to_string(),
            "--paper-steps",
            &paper_steps.to_string(),
            "--variants",
            "checkpoint",
            "--threads",
            &torch_threads,
            "--repeat",
            &flag("--repeat").unwrap_or_else(|| "1".into()),
        ]);
        if let Some(o) = &only {
            let mut m = o.clone();
            // bench_torch.py names the full chain k<steps> per model, as we do.
            m.dedup();
            cmd.args(["--methods", &m.join(",")]);
        }
        let out = cmd.output().expect("run bench_torch.py");
        let torch_rows: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.starts_with("| cpu (PyTorch"))
            .map(str::to_string)
            .collect();
        if torch_rows.is_empty() {
            eprintln!(
                "bench_torch.py printed no rows: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        println!();
        println!("{header}");
        println!("|---|---|---|---|---|---|---|---|");
        for r in &torch_rows {
            println!("{r}");
        }
        println!();
        println!(
            "| ours | model | sampling steps | method | s / step (ours) | s / step (PyTorch, best of threads) | ours / PyTorch |"
        );
        println!("|---|---|---|---|---|---|---|");
        for r in &rows {
            let Some((dev, model, steps, method, secs)) = fields(r) else {
                continue;
            };
            let best = torch_rows
                .iter()
                .filter_map(|t| fields(t))
                .filter(|t| t.1 == model && t.2 == steps && t.3 == method)
                .map(|t| t.4)
                .fold(f64::INFINITY, f64::min);
            if best.is_finite() {
                println!(
                    "| {dev} | {model} | {steps} | {method} | {secs:.2} | {best:.2} | {:.2} |",
                    secs / best
                );
            }
        }
    }
}

/// (device, model, steps, method without a "[variant]" suffix, seconds) of a table row.
fn fields(row: &str) -> Option<(String, String, String, String, f64)> {
    let cells: Vec<&str> = row.split('|').map(str::trim).collect();
    let secs = cells.get(5)?.parse().ok()?;
    let method = cells.get(4)?.split(" [").next()?.to_string();
    Some((
        cells[1].to_string(),
        cells[2].to_string(),
        cells[3].to_string(),
        method,
        secs,
    ))
}

fn run_case(case: &str) {
    let parts: Vec<&str> = case.split(':').collect();
    let (dev, model, steps, m, reward_name) = (
        parts[0],
        parts[1],
        parts[2].parse::<usize>().unwrap(),
        parts[3],
        parts[4],
    );
    let device = match dev {
        "cpu" => Device::flex(),
        "wgpu" => Device::wgpu(Default::default()),
        other => panic!("unknown device {other}"),
    };
    let f16 = std::env::var("DRAFT_BENCH_WEIGHTS_DTYPE").as_deref() == Ok("f16");
    let weights_dtype = if f16 {
        burn::tensor::FloatDType::F16
    } else {
        burn::tensor::FloatDType::F32
    };
    let sdxl_pixels: Option<usize> = model.strip_prefix("sdxl-").map(|p| p.parse().unwrap());
    let mut pipe = match sdxl_pixels {
        Some(_) => common::make_sdxl(&device, weights_dtype),
        None => common::load_sd1_tiny(&device, weights_dtype),
    };
    let mut size = pipe.unet_config.sample_size;
    if model.starts_with("sd14") {
        size = common::make_sd14(&mut pipe, &device, weights_dtype, model == "sd14-512");
    }
    if let Some(p) = sdxl_pixels {
        size = p / 8;
    }
    let max_buffer_mib = std::env::var("DRAFT_BENCH_MAX_BUFFER_MIB").ok();
    if let Some(m) = &max_buffer_mib {
        pipe.max_buffer_bytes = m.parse::<u64>().expect("--max-buffer-mib N") << 20;
    }
    common::init_bench_lora(&mut pipe, &device);
    let reward = match reward_name {
        "aesthetic-l14" => {
            // CLIP ViT-L/14's vision tower (random weights) under the aesthetic MLP; a one-layer
            // text tower, which the aesthetic reward never runs.
            let config = r#"{"projection_dim": 768,
                "text_config": {"vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
                  "num_hidden_layers": 1, "num_attention_heads": 2, "max_position_embeddings": 77},
                "vision_config": {"hidden_size": 1024, "intermediate_size": 4096,
                  "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 224,
                  "patch_size": 14}}"#;
            let (c, text) = CLIPConfig::from_json("clip-l14", config).unwrap();
            let clip =
                CLIPModel::load(VarBuilder::random(7, &device), &c, &text, 4.6, None).unwrap();
            let mlp = AestheticMlp::load_vb(VarBuilder::random(8, &device), 768).unwrap();
            WeightedReward::new(vec![(
                Box::new(LaionAesthetic {
                    clip: std::sync::Arc::new(clip),
                    mlp,
                }),
                1.0,
            )])
        }
        _ => {
            WeightedReward::from_specs(&["colorfulness".into()], &RewardOptions::default()).unwrap()
        }
    };
    let engine = Engine::new(&pipe, steps, 0.0, &reward).unwrap();
    let method = match m {
        "lv2" => Method::DraftLv { n: 2 },
        "refl" => Method::Refl {
            min_remaining: 1,
            max_remaining: 1,
        },
        k => Method::DraftK {
            k: k[1..].parse().unwrap(),
        },
    };
    let batch = 1;
    let prompts = common::cat_prompts(&pipe);
    let step = |seed: u64| {
        let (e, norm, _) =
            common::timed_step(&engine, method, &prompts, (batch, size), seed, &device);
        (e, norm)
    };
    // Warm-up for kernel compilation and autotuning on wgpu. The CPU backend compiles nothing,
    // and a warm-up there would leave its freed memory resident, hiding the step's own peak.
    if dev != "cpu" {
        step(99);
    }
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let before = common::status_kib("VmRSS");
    let t0 = Instant::now();
    let (e, norm) = step(0);
    let secs = t0.elapsed().as_secs_f64();
    let peak = common::status_kib("VmHWM");
    assert!(norm.is_finite() && norm > 0.0, "gradient norm {norm}");
    // `--repeat N`: N steps timed (the first one's peak), their median printed.
    let repeat: u64 = std::env::var("DRAFT_BENCH_REPEAT")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(1)
        .max(1);
    let mut times = vec![secs];
    for seed in 1..repeat {
        let t0 = Instant::now();
        step(seed);
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let secs = times[times.len() / 2];
    let stored = (steps + 1) * batch * 4 * size * size * 4 / 1024;
    let sdxl_name =
        sdxl_pixels.map(|p| format!("SDXL-base pipeline (random) {size}×{size} → {p}²"));
    let model_name = if let Some(n) = &sdxl_name {
        n.as_str()
    } else if model == "sd14-512" {
        "SD-1.4 pipeline (random) 64×64 → 512²"
    } else if model == "sd14" {
        "SD-1.4 UNet (random) 32×32"
    } else {
        "sd1-tiny 16×16"
    };
    let model_name = if f16 {
        format!("{model_name}, f16 weights")
    } else {
        model_name.to_string()
    };
    let model_name = match &max_buffer_mib {
        Some(m) => format!("{model_name}, decoder strips ≤ {m} MiB"),
        None => model_name,
    };
    let model_name = if reward_name == "aesthetic-l14" {
        format!("{model_name} + aesthetic on CLIP ViT-L/14")
    } else {
        model_name.to_string()
    };
    let dev = if dev == "cpu" {
        let n = rayon::current_num_threads();
        format!("cpu ({n} thread{})", if n == 1 { "" } else { "s" })
    } else {
        dev.to_string()
    };
    println!(
        "| {dev} | {model_name} | {steps} | {} | {secs:.2} | {} | {:.0} (+{:.0} over {:.0} before) | {stored} |",
        match method {
            Method::DraftK { k } if k == steps => format!("DRaFT (full, K={k})"),
            Method::DraftK { k } => format!("DRaFT-K, K={k}"),
            Method::DraftLv { n } => format!("DRaFT-LV, n={n}"),
            _ => "ReFL".to_string(),
        },
        e.unet_grad_calls,
        peak as f64 / 1024.0,
        peak.saturating_sub(before) as f64 / 1024.0,
        before as f64 / 1024.0,
    );
}
