//! Sampling benchmark: per device, the time of one UNet call (CFG batch: 2) and of one full
//! DDIM + CFG sampling run (50 steps, batch 1), on the committed fixture pipelines and on a
//! random UNet with SD-1.4's real config at 32×32 latents.
//!
//! `cargo bench -p draft-cli --bench sampling -- [--devices cpu,wgpu] [--sd14-steps N]`
//! (`--sd14-steps` shortens the SD-1.4 sampling run, which takes minutes on a CPU, and 0 skips
//! that model; the table says how many steps were run.)

mod common;

use std::path::Path;
use std::time::Instant;

use burn::prelude::*;
use draft_core::model::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use draft_core::model::sampler::{Conditioning, sample};
use draft_core::model::schedule::{Ddim, SchedulerConfig};
use draft_core::model::var_builder::VarBuilder;
use draft_core::noise::NoiseRng;
use draft_core::{ModelFiles, Pipeline};

const SD14_SCHEDULER: &str = r#"{"beta_start":0.00085,"beta_end":0.012,"beta_schedule":"scaled_linear",
 "num_train_timesteps":1000,"set_alpha_to_one":false,"steps_offset":1,"clip_sample":false}"#;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let flag = |name: &str| common::flag(&args, name);
    let devices = flag("--devices").unwrap_or_else(|| "cpu,wgpu".into());
    let sd14_steps: usize = flag("--sd14-steps")
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);

    println!("| device | model | latents | UNet call (CFG batch 2) | sampling | steps |");
    println!("|---|---|---|---|---|---|");
    for dev_name in devices.split(',') {
        let device = match dev_name {
            "cpu" => Device::flex(),
            "wgpu" => Device::wgpu(Default::default()),
            other => panic!("unknown device {other}"),
        };
        for fixture in ["sd1-tiny", "sd2-tiny"] {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../tests/fixtures")
                .join(fixture);
            let files = ModelFiles::read_layout(dir.display().to_string(), |rel| {
                Ok::<_, ()>(std::fs::read(dir.join(rel)).ok())
            })
            .unwrap();
            let pipe = Pipeline::load(&files, &device).expect("fixture loads");
            let scheduler = pipe.scheduler.clone();
            let ctx = pipe.encode_prompts(&["a red circle".into()]).unwrap();
            let size = pipe.unet_config.sample_size;
            bench(
                dev_name, fixture, &pipe.unet, &scheduler, ctx, size, 50, &device,
            );
        }
        if sd14_steps == 0 {
            continue;
        }
        let config = UNet2DConditionConfig::from_json(
            "sd14_unet_config.json",
            include_str!("sd14_unet_config.json"),
        )
        .unwrap();
        let unet =
            UNet2DConditionModel::load(VarBuilder::random(0, &device), &config, "sd14").unwrap();
        let scheduler = SchedulerConfig::from_json("sd14 scheduler", SD14_SCHEDULER).unwrap();
        let ctx = NoiseRng::new(1).randn([1, 77, 768], &device);
        bench(
            dev_name,
            "SD-1.4 UNet (random)",
            &unet,
            &scheduler,
            ctx,
            32,
            sd14_steps,
            &device,
        );
    }
}

#[allow(clippy::too_many_arguments)]
fn bench(
    dev: &str,
    model: &str,
    unet: &UNet2DConditionModel,
    scheduler: &SchedulerConfig,
    ctx: Tensor<3>,
    size: usize,
    steps: usize,
    device: &Device,
) {
    let mut rng = NoiseRng::new(0);
    let x = rng.randn([1, 4, size, size], device);
    let cond = Conditioning::new(ctx.clone(), ctx.zeros_like(), 7.5);
    let ddim = Ddim::new(scheduler, steps).unwrap();

    // Warm-up: kernel compilation and autotuning happen on first use.
    let _ = cond.model_output(unet, x.clone(), 500.0);
    device.sync().unwrap();
    let reps = 3;
    let t0 = Instant::now();
    for _ in 0..reps {
        let _ = cond.model_output(unet, x.clone(), 500.0);
        device.sync().unwrap();
    }
    let call = t0.elapsed().as_secs_f64() / reps as f64;
    eprintln!(
        "{dev} {model}: UNet call {:.1} ms; sampling {steps} steps…",
        call * 1e3
    );

    let t0 = Instant::now();
    let out = sample(unet, &ddim, 0.0, x, &cond, |_| None, |_, _| true).unwrap();
    device.sync().unwrap();
    let total = t0.elapsed().as_secs_f64();
    drop(out);
    println!(
        "| {dev} | {model} | {size}×{size} | {:.1} ms | {:.2} s | {steps} |",
        call * 1e3,
        total
    );
}
