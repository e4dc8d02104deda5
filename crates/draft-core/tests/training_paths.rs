//! Training paths against PyTorch (issue 16, item 2), on the CPU backend: η > 0 with the
//! forward's DDIM noise reused in the backward, v-prediction (sd2-tiny), `trailing` /
//! `linspace` spacing, DRaFT-LV with n = 3, ReFL / AlignProp for given truncation draws (and
//! the distribution of the draws), AdamW / SGD against `torch.optim`, and two `Trainer`
//! updates with `--grad-accum 2`, `--clip-grad-norm` and AdamW. References:
//! `tests/fixtures/make_training_paths_fixture.py` (diffusers + peft autograd, torch.optim).

mod common;

use burn::prelude::*;
use common::{fixtures, read_model, rel_err, values};
use draft_core::Pipeline;
use draft_core::model::lora::{LoraFile, LoraTarget};
use draft_core::model::pipeline::LoraSetup;
use draft_core::model::schedule::{Ddim, SchedulerConfig};
use draft_core::model::weights::Weights;
use draft_core::noise::NoiseRng;
use draft_core::reward::builtin::{self, RewardOptions, WeightedReward};
use draft_core::train::config::{MethodConfig, OptimizerName, TrainConfig};
use draft_core::train::engine::{Draws, Engine, Evaluation, Method, Prompts, uniform_in};
use draft_core::train::optim::{OptimState, Optimizer};
use draft_core::train::trainer::{Trainer, stream_seed, truncation_draw};

/// Bounds against PyTorch, about 10× what is measured on the CPU (docs/parity.md, "Training
/// paths"): ‖Δg‖/‖g‖ over all LoRA parameters (measured ≤ 1.5e-5, v-prediction) …
const GRAD_TOL: f64 = 1.5e-4;
/// … the worst single tensor's max|Δ|/max|g| (measured ≤ 4.4e-5) …
const WORST_TENSOR_TOL: f64 = 5e-4;
/// … and the trainer's updates: the parameter update and AdamW's moments (measured ≤ 3.4e-5),
/// the pre-clip gradient norm (≤ 1.7e-6).
const UPDATE_TOL: f64 = 4e-4;
const GRAD_NORM_TOL: f64 = 2e-5;

fn dir() -> std::path::PathBuf {
    fixtures().join("training_paths")
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(dir().join(name)).unwrap_or_else(|e| {
        panic!(
            "tests/fixtures/training_paths/{name}: {e} (make_training_paths_fixture.py writes it)"
        )
    })
}

fn meta() -> serde_json::Value {
    serde_json::from_slice(&read("training_paths.json")).unwrap()
}

fn all_rewards() -> WeightedReward {
    WeightedReward::from_specs(&reward_specs(), &RewardOptions::default()).unwrap()
}

fn reward_specs() -> Vec<String> {
    builtin::BUILTIN.iter().map(|s| s.to_string()).collect()
}

fn prompt_texts(json: &serde_json::Value) -> Vec<String> {
    json["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect()
}

fn prompts(pipe: &Pipeline, json: &serde_json::Value) -> Prompts {
    let list = prompt_texts(json);
    Prompts::new(pipe, &list, "", json["guidance_scale"].as_f64().unwrap()).unwrap()
}

fn rank_alpha(json: &serde_json::Value) -> (usize, f64) {
    (
        json["lora"]["rank"].as_u64().unwrap() as usize,
        json["lora"]["alpha"].as_f64().unwrap(),
    )
}

/// `model` (sd1-tiny / sd2-tiny) with trainable attention LoRA set to the fixture's file.
fn lora_pipeline(model: &str, lora: &str, json: &serde_json::Value, device: &Device) -> Pipeline {
    let (rank, alpha) = rank_alpha(json);
    let files = read_model(&fixtures().join(model));
    let pipe =
        Pipeline::load_with_lora(&files, device, &LoraSetup::Targets(vec![LoraTarget::Attn]))
            .unwrap();
    pipe.lora.init_trainable(rank, alpha, 0, device);
    let file = LoraFile::parse(lora, &read(lora)).unwrap();
    assert_eq!(
        file.modules.len(),
        pipe.lora.len(),
        "{lora} adapts every layer"
    );
    pipe.lora.load_trainable(&file, alpha, device).unwrap();
    pipe
}

fn init_noise(model: &str, device: &Device) -> Tensor<4> {
    let bytes = std::fs::read(fixtures().join(model).join("init_noise.safetensors")).unwrap();
    Weights::from_bytes("init_noise", &bytes)
        .unwrap()
        .tensor::<4>("noise", device)
        .unwrap()
}

/// The `[n, B, C, H, W]` tensor `key` as n tensors `[B, C, H, W]`.
fn noise_list(w: &Weights, key: &str, device: &Device) -> Vec<Tensor<4>> {
    let t: Tensor<5> = w.tensor(key, device).unwrap();
    let [n, b, c, h, ww] = t.dims();
    (0..n)
        .map(|j| t.clone().narrow(0, j, 1).reshape([b, c, h, ww]))
        .collect()
}

fn draws(x_t: Tensor<4>) -> Draws {
    Draws {
        x_t,
        step_noise: NoiseRng::new(0),
        lv_noise: None,
        truncation: 0.0,
    }
}

/// Compares an evaluation with the fixture's case; returns (loss rel. error, global gradient
/// rel. error, worst tensor's max|Δ|/max|g|) after asserting them.
fn check_case(case: &str, pipe: &Pipeline, eval: &Evaluation, reference: &Weights) -> (f64, f64) {
    let loss_ref = reference.read_f32(&format!("{case}.loss")).unwrap().0[0];
    let loss_err = ((eval.loss - loss_ref).abs() / loss_ref.abs().max(1e-6)) as f64;
    let names = pipe.lora.param_names();
    assert_eq!(names.len(), eval.grads.len());
    let (mut num, mut den) = (0f64, 0f64);
    let mut worst = (0f32, String::new());
    for (name, g) in names.iter().zip(&eval.grads) {
        let key = format!("{case}.{}", name.strip_prefix("unet.").unwrap());
        let (want, want_shape) = reference.read_f32(&key).unwrap();
        let (got, _) = values(g.clone());
        assert_eq!(
            g.dims(),
            [want_shape[0], want_shape[1..].iter().product()],
            "{key}"
        );
        for (a, b) in got.iter().zip(&want) {
            num += ((a - b) as f64).powi(2);
            den += (*b as f64).powi(2);
        }
        let e = rel_err(&got, &want);
        if e > worst.0 {
            worst = (e, key);
        }
    }
    let global = (num / den).sqrt();
    eprintln!(
        "{case}: loss {:.6} (ref {loss_ref:.6}, rel err {loss_err:.1e}); grad rel err: global \
         {global:.1e}, worst tensor {:.1e} ({}); K={} calls={}",
        eval.loss, worst.0, worst.1, eval.k, eval.unet_grad_calls
    );
    assert!(den > 0.0, "{case}: reference gradient is zero");
    assert!(loss_err < 1e-4, "{case}: loss {} vs {loss_ref}", eval.loss);
    assert!(global < GRAD_TOL, "{case}: global grad rel err {global:e}");
    assert!(
        (worst.0 as f64) < WORST_TENSOR_TOL,
        "{case}: {} rel err {:e}",
        worst.1,
        worst.0
    );
    (loss_err, global)
}

fn evaluate(engine: &Engine, method: Method, p: &Prompts, d: Draws) -> Evaluation {
    pollster::block_on(engine.evaluate(method, p, d)).unwrap()
}

fn case_timesteps(json: &serde_json::Value, case: &str) -> Vec<usize> {
    json["cases"][case]["timesteps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as usize)
        .collect()
}

/// η = 0.5: every forward step's noise (PyTorch's, replayed) is the one of its differentiated
/// recomputation — DRaFT-K (K = 2), and DRaFT-LV (n = 2) whose re-noised step draws one more.
#[test]
fn eta_step_noise_is_reused_in_the_backward() {
    let device = Device::flex();
    let json = meta();
    let noises_bytes = read("noises.safetensors");
    let noises = Weights::from_bytes("noises", &noises_bytes).unwrap();
    let grads_bytes = read("grads.safetensors");
    let reference = Weights::from_bytes("grads", &grads_bytes).unwrap();
    let pipe = lora_pipeline("sd1-tiny", "lora_sd1.safetensors", &json, &device);
    let reward = all_rewards();
    let steps = json["T"].as_u64().unwrap() as usize;
    let eta = json["cases"]["eta_k2"]["eta"].as_f64().unwrap();
    let mut engine = Engine::new(&pipe, steps, eta, &reward).unwrap();
    assert_eq!(engine.ddim.timesteps, case_timesteps(&json, "eta_k2"));
    let p = prompts(&pipe, &json);
    let (step_noise, _) = noises.read_f32("eta.step_noise").unwrap();
    for (case, method, keep) in [
        ("eta_k2", Method::DraftK { k: 2 }, true),
        ("eta_k2", Method::DraftK { k: 2 }, false),
        ("eta_lv", Method::DraftLv { n: 2 }, true),
        ("eta_lv", Method::DraftLv { n: 2 }, false),
    ] {
        // The first back-propagated step's graph kept, and recomputed: the same noise either way.
        engine.keep_step_graph = Some(keep);
        let mut d = draws(init_noise("sd1-tiny", &device));
        d.step_noise = NoiseRng::replay(step_noise.clone());
        if case == "eta_lv" {
            d.lv_noise = Some(noise_list(&noises, "eta.lv_noise", &device));
        }
        let eval = evaluate(&engine, method, &p, d);
        check_case(case, &pipe, &eval, &reference);
    }
}

/// v-prediction (sd2-tiny): DRaFT-1, DRaFT-LV (n = 2) and ReFL's x̂₀ = √ᾱ·x − √(1−ᾱ)·v.
#[test]
fn v_prediction_matches_pytorch() {
    let device = Device::flex();
    let json = meta();
    assert_eq!(json["sd2_scheduler"]["prediction_type"], "v_prediction");
    let noises_bytes = read("noises.safetensors");
    let noises = Weights::from_bytes("noises", &noises_bytes).unwrap();
    let grads_bytes = read("grads.safetensors");
    let reference = Weights::from_bytes("grads", &grads_bytes).unwrap();
    let pipe = lora_pipeline("sd2-tiny", "lora_sd2.safetensors", &json, &device);
    let reward = all_rewards();
    let steps = json["T"].as_u64().unwrap() as usize;
    let engine = Engine::new(&pipe, steps, 0.0, &reward).unwrap();
    assert_eq!(
        engine.ddim.prediction,
        draft_core::model::schedule::Prediction::VPrediction
    );
    assert_eq!(engine.ddim.timesteps, case_timesteps(&json, "sd2_k1"));
    let p = prompts(&pipe, &json);
    let refl = &json["cases"]["sd2_refl"];
    for (case, method) in [
        ("sd2_k1", Method::DraftK { k: 1 }),
        ("sd2_lv", Method::DraftLv { n: 2 }),
        (
            "sd2_refl",
            Method::Refl {
                min_remaining: refl["lo"].as_u64().unwrap() as usize,
                max_remaining: refl["hi"].as_u64().unwrap() as usize,
            },
        ),
    ] {
        let mut d = draws(init_noise("sd2-tiny", &device));
        if case == "sd2_lv" {
            d.lv_noise = Some(noise_list(&noises, "sd2.lv_noise", &device));
        }
        if case == "sd2_refl" {
            d.truncation = refl["truncation"].as_f64().unwrap();
        }
        let eval = evaluate(&engine, method, &p, d);
        check_case(case, &pipe, &eval, &reference);
    }
}

/// Our DDIM timesteps for every spacing are diffusers' for 1 … 64 steps and some larger counts
/// (numpy's round-half-to-even ties: 7 linspace steps, 16 trailing steps, …).
#[test]
fn timestep_spacing_matches_diffusers() {
    let bytes = read("timesteps.json");
    let tables: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    let config_json =
        std::fs::read_to_string(fixtures().join("sd1-tiny/scheduler/scheduler_config.json"))
            .unwrap();
    let mut checked = 0;
    for spacing in ["leading", "trailing", "linspace"] {
        let mut config = SchedulerConfig::from_json("scheduler_config.json", &config_json).unwrap();
        config.timestep_spacing = spacing.into();
        let rows = tables[spacing]["timesteps"].as_object().unwrap();
        let mut wrong = Vec::new();
        for (steps, want) in rows {
            let steps: usize = steps.parse().unwrap();
            let want: Vec<usize> = want
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_u64().unwrap() as usize)
                .collect();
            if want.iter().any(|&t| t >= config.num_train_timesteps) {
                // `leading` at 1000 steps with steps_offset 1: diffusers lists t = 1000, past
                // its 1000-entry schedule (its step then fails); ours refuses the schedule.
                assert!(Ddim::new(&config, steps).is_err(), "{spacing} {steps}");
                checked += 1;
                continue;
            }
            let got = Ddim::new(&config, steps).unwrap().timesteps;
            if got != want {
                wrong.push(format!("{steps}: ours {got:?}, diffusers {want:?}"));
            }
            checked += 1;
        }
        assert!(
            wrong.is_empty(),
            "{spacing}: {} of {} step counts differ from diffusers:\n{}",
            wrong.len(),
            rows.len(),
            wrong.join("\n")
        );
        eprintln!("{spacing}: {} step counts equal diffusers'", rows.len());
    }
    assert!(checked > 200);
}

/// A DRaFT-K (K = 2) gradient with `trailing` (16 steps) and `linspace` (7 steps) spacing.
#[test]
fn trailing_and_linspace_gradients_match_pytorch() {
    let device = Device::flex();
    let json = meta();
    let grads_bytes = read("grads.safetensors");
    let reference = Weights::from_bytes("grads", &grads_bytes).unwrap();
    let mut pipe = lora_pipeline("sd1-tiny", "lora_sd1.safetensors", &json, &device);
    let reward = all_rewards();
    for spacing in ["trailing", "linspace"] {
        let case = format!("spacing_{spacing}");
        let c = &json["cases"][&case];
        pipe.scheduler.timestep_spacing = spacing.into();
        let steps = c["steps"].as_u64().unwrap() as usize;
        let engine = Engine::new(&pipe, steps, 0.0, &reward).unwrap();
        assert_eq!(
            engine.ddim.timesteps,
            case_timesteps(&json, &case),
            "{case}"
        );
        let p = prompts(&pipe, &json);
        let k = c["k"].as_u64().unwrap() as usize;
        let eval = evaluate(
            &engine,
            Method::DraftK { k },
            &p,
            draws(init_noise("sd1-tiny", &device)),
        );
        check_case(&case, &pipe, &eval, &reference);
    }
}

/// DRaFT-LV with n = 3 given noises; ReFL and AlignProp for two given truncation draws each.
#[test]
fn lv3_refl_and_alignprop_match_pytorch() {
    let device = Device::flex();
    let json = meta();
    let noises_bytes = read("noises.safetensors");
    let noises = Weights::from_bytes("noises", &noises_bytes).unwrap();
    let grads_bytes = read("grads.safetensors");
    let reference = Weights::from_bytes("grads", &grads_bytes).unwrap();
    let pipe = lora_pipeline("sd1-tiny", "lora_sd1.safetensors", &json, &device);
    let reward = all_rewards();
    let steps = json["T"].as_u64().unwrap() as usize;
    let mut engine = Engine::new(&pipe, steps, 0.0, &reward).unwrap();
    let p = prompts(&pipe, &json);

    // Both ways of back-propagating the first step: its graph kept while the reward is taken
    // (the default at these latents), and recomputed (the default at 64×64).
    for keep in [true, false] {
        engine.keep_step_graph = Some(keep);
        eprint!("[step graph kept: {keep}] ");
        lv3_refl_and_alignprop(&engine, &p, &noises, &reference, &json, &pipe, &device);
    }
}

fn lv3_refl_and_alignprop(
    engine: &Engine,
    p: &Prompts,
    noises: &Weights,
    reference: &Weights,
    json: &serde_json::Value,
    pipe: &Pipeline,
    device: &Device,
) {
    let mut d = draws(init_noise("sd1-tiny", device));
    d.lv_noise = Some(noise_list(noises, "lv3.lv_noise", device));
    assert_eq!(d.lv_noise.as_ref().unwrap().len(), 3);
    let eval = evaluate(engine, Method::DraftLv { n: 3 }, p, d);
    assert_eq!(eval.unet_grad_calls, 3);
    check_case("lv3", pipe, &eval, reference);

    for case in ["refl0", "refl1", "alignprop0", "alignprop1"] {
        let c = &json["cases"][case];
        let (lo, hi) = (
            c["lo"].as_u64().unwrap() as usize,
            c["hi"].as_u64().unwrap() as usize,
        );
        let u = c["truncation"].as_f64().unwrap();
        let (method, drawn) = if case.starts_with("refl") {
            let r = c["remaining"].as_u64().unwrap() as usize;
            let m = Method::Refl {
                min_remaining: lo,
                max_remaining: hi,
            };
            (m, r)
        } else {
            let k = c["k"].as_u64().unwrap() as usize;
            (
                Method::AlignProp {
                    k_min: lo,
                    k_max: hi,
                },
                k,
            )
        };
        assert_eq!(uniform_in(u, lo, hi), drawn, "{case}: u = {u}");
        let mut d = draws(init_noise("sd1-tiny", device));
        d.truncation = u;
        let eval = evaluate(engine, method, p, d);
        if case.starts_with("alignprop") {
            assert_eq!(eval.k, drawn, "{case}");
            assert_eq!(eval.unet_grad_calls, drawn, "{case}");
        }
        eprint!("(u = {u} → {drawn}) ");
        check_case(case, pipe, &eval, reference);
    }
}

/// The truncation rule `uniform_in` maps u ∈ [0, 1) uniformly onto lo..=hi: exactly on a
/// stratified grid, and within a chi-square bound over the u of 10,000 training steps drawn as
/// `Trainer::draws` draws them (`train::truncation_draw`).
#[test]
fn truncation_draws_are_uniform() {
    for (lo, hi) in [(1, 10), (3, 7), (1, 1), (2, 50)] {
        let m = hi - lo + 1;
        // Stratified: u = (i + ½)/N with N a multiple of m gives every value exactly N/m times.
        let n = 1000 * m;
        let mut counts = vec![0usize; m];
        for i in 0..n {
            counts[uniform_in((i as f64 + 0.5) / n as f64, lo, hi) - lo] += 1;
        }
        assert!(
            counts.iter().all(|&c| c == n / m),
            "{lo}..={hi}: {counts:?}"
        );
        // Edges: 0 → lo, the largest u below 1 → hi, just inside [j/m, (j+1)/m) → lo + j.
        assert_eq!(uniform_in(0.0, lo, hi), lo);
        assert_eq!(uniform_in(1.0 - f64::EPSILON / 2.0, lo, hi), hi);
        for j in 0..m {
            for u in [
                (j as f64 + 1e-9) / m as f64,
                (j as f64 + 1.0 - 1e-9) / m as f64,
            ] {
                assert_eq!(uniform_in(u, lo, hi), lo + j, "{lo}..={hi}: u = {u}");
            }
        }
        // The Trainer's draws of 10,000 steps: chi-square with m − 1 degrees of freedom.
        let steps = 10_000;
        let mut counts = vec![0f64; m];
        for step in 0..steps {
            let u = truncation_draw(7 + lo as u64, step, 0);
            assert!((0.0..1.0).contains(&u));
            counts[uniform_in(u, lo, hi) - lo] += 1.0;
        }
        let expected = steps as f64 / m as f64;
        let chi2: f64 = counts
            .iter()
            .map(|c| (c - expected).powi(2) / expected)
            .sum();
        // Above the 0.999 quantile of chi-square(df) for every df here (df + 3.5·√(2·df) + 7).
        let df = (m - 1) as f64;
        let bound = df + 3.5 * (2.0 * df).sqrt() + 7.0;
        eprintln!("{lo}..={hi}: chi² = {chi2:.2} over {m} values, df {df} (bound {bound:.1})");
        assert!(
            chi2 < bound,
            "{lo}..={hi}: chi² {chi2} ≥ {bound}: {counts:?}"
        );
    }
}

fn optim_tensor(w: &Weights, key: &str, device: &Device) -> Tensor<2> {
    w.tensor::<2>(key, device).unwrap()
}

/// `Optimizer::step` against torch.optim.AdamW (weight decay 0.1, betas 0.9 / 0.999, a
/// learning rate per step) and torch.optim.SGD (weight decay 0.1 and 0) over 6 steps of given
/// gradients: parameters and both moments after every step.
#[test]
fn optimisers_match_torch_optim() {
    let device = Device::flex();
    let json = meta();
    let o = &json["optim"];
    let steps = o["steps"].as_u64().unwrap() as usize;
    let n = o["shapes"].as_array().unwrap().len();
    let lrs: Vec<f64> = o["lrs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    let bytes = read("optim.safetensors");
    let w = Weights::from_bytes("optim", &bytes).unwrap();
    let init: Vec<Tensor<2>> = (0..n)
        .map(|i| optim_tensor(&w, &format!("init.{i}"), &device))
        .collect();
    let adamw = Optimizer::AdamW {
        beta1: o["adamw"]["betas"][0].as_f64().unwrap(),
        beta2: o["adamw"]["betas"][1].as_f64().unwrap(),
        eps: o["adamw"]["eps"].as_f64().unwrap(),
        weight_decay: o["adamw"]["weight_decay"].as_f64().unwrap(),
    };
    for (name, opt) in [
        ("adamw", adamw),
        (
            "sgd_wd",
            Optimizer::Sgd {
                weight_decay: o["sgd_wd"]["weight_decay"].as_f64().unwrap(),
            },
        ),
        ("sgd", Optimizer::Sgd { weight_decay: 0.0 }),
    ] {
        let mut params = init.clone();
        let mut state = OptimState::zeros(&params);
        let mut worst = [0f32; 3];
        for (s, &lr) in lrs.iter().enumerate().take(steps) {
            let grads: Vec<Tensor<2>> = (0..n)
                .map(|i| optim_tensor(&w, &format!("grad.{s}.{i}"), &device))
                .collect();
            params = opt.step(params, grads, lr, &mut state);
            let mut parts = vec![("param", &params, 0)];
            if name == "adamw" {
                parts.push(("exp_avg", &state.m, 1));
                parts.push(("exp_avg_sq", &state.v, 2));
            }
            for (what, list, slot) in parts {
                for (i, t) in list.iter().enumerate() {
                    let (want, _) = w.read_f32(&format!("{name}.{s}.{what}.{i}")).unwrap();
                    let (got, _) = values(t.clone());
                    let e = rel_err(&got, &want);
                    worst[slot] = worst[slot].max(e);
                    assert!(e < 2e-6, "{name} step {s} {what}.{i}: rel err {e:e}");
                }
            }
        }
        assert_eq!(state.updates, steps);
        eprintln!(
            "{name}: {steps} steps, max rel err (max|Δ|/max|ref| per tensor) params {:.1e}, \
             exp_avg {:.1e}, exp_avg_sq {:.1e}",
            worst[0], worst[1], worst[2]
        );
    }
}

fn trainer_config(t: &serde_json::Value, json: &serde_json::Value) -> TrainConfig {
    let (rank, alpha) = rank_alpha(json);
    assert_eq!(t["method"], "draft-k");
    TrainConfig {
        method: MethodConfig::DraftK {
            k: t["k"].as_u64().unwrap() as usize,
        },
        steps: t["steps"].as_u64().unwrap() as usize,
        guidance: json["guidance_scale"].as_f64().unwrap(),
        eta: 0.0,
        rewards: reward_specs(),
        batch: 2,
        train_steps: t["updates"].as_u64().unwrap() as usize,
        lr: t["lr"].as_f64().unwrap(),
        optimizer: OptimizerName::Adamw,
        weight_decay: t["weight_decay"].as_f64().unwrap(),
        beta1: t["beta1"].as_f64().unwrap(),
        beta2: t["beta2"].as_f64().unwrap(),
        adam_eps: t["adam_eps"].as_f64().unwrap_or(1e-8),
        rank,
        alpha: Some(alpha),
        lora_targets: vec![LoraTarget::Attn],
        clip_grad_norm: t["clip_grad_norm"].as_f64(),
        grad_accum: t["grad_accum"].as_u64().unwrap() as usize,
        seed: t["seed"].as_u64().unwrap(),
        ..TrainConfig::default()
    }
}

/// The initial latents the Trainer draws for micro-batch `micro` of update `step` (all but
/// (0, 0), which is `--init-noise`): `Trainer::draws`' stream 2.
fn trainer_x_t(seed: u64, step: usize, micro: usize, device: &Device) -> Tensor<4> {
    NoiseRng::new(stream_seed(seed, step, micro, 2)).randn([2, 4, 16, 16], device)
}

/// The Trainer case's seed, gradient accumulation and updates (make_training_paths_fixture.py's
/// `TRAINER`, which checks them against trainer_noise.safetensors' metadata).
const TRAINER_SEED: u64 = 7;
const TRAINER_ACCUM: usize = 2;
const TRAINER_UPDATES: usize = 2;

/// `trainer_noise.safetensors` holds the Trainer's own x_T of the micro-batches after the
/// first, which make_training_paths_fixture.py feeds to PyTorch. This checks that the
/// committed file is what the Trainer draws today; `DRAFT_BLESS=1 cargo test --release -p
/// draft-core --test training_paths trainer_noise` rewrites it (then rerun the script).
#[test]
fn trainer_noise_fixture_is_current() {
    let device = Device::flex();
    let mut tensors = Vec::new();
    for step in 0..TRAINER_UPDATES {
        for micro in 0..TRAINER_ACCUM {
            if (step, micro) == (0, 0) {
                continue;
            }
            let (v, shape) = values(trainer_x_t(TRAINER_SEED, step, micro, &device));
            tensors.push((format!("x_t.{step}.{micro}"), shape, v));
        }
    }
    let path = dir().join("trainer_noise.safetensors");
    if std::env::var_os("DRAFT_BLESS").is_some() {
        let meta = [
            ("seed", TRAINER_SEED.to_string()),
            ("grad_accum", TRAINER_ACCUM.to_string()),
            ("updates", TRAINER_UPDATES.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let bytes = draft_core::model::weights::serialize_f32(&tensors, Some(meta)).unwrap();
        std::fs::create_dir_all(dir()).unwrap();
        std::fs::write(&path, bytes).unwrap();
        eprintln!("wrote {} tensors (seed {TRAINER_SEED})", tensors.len());
    }
    let bytes = std::fs::read(&path).unwrap();
    let w = Weights::from_bytes("trainer_noise.safetensors", &bytes).unwrap();
    for (key, shape, v) in &tensors {
        let (want, want_shape) = w.read_f32(key).unwrap();
        assert_eq!((&want_shape, &want), (shape, v), "{key} is stale: rebless");
    }
}

/// Two updates of the real `Trainer::train_step` (DRaFT-K, K = 1, `--grad-accum 2`,
/// `--clip-grad-norm` below the gradient's norm, AdamW) against PyTorch: the mean of the
/// micro-batch gradients, `clip_grad_norm_`, `AdamW.step`.
#[test]
fn trainer_grad_accum_clip_adamw_match_pytorch() {
    let device = Device::flex();
    let json = meta();
    let t = &json["trainer"];
    assert!(
        t.is_object(),
        "training_paths.json has no trainer case: run the trainer_noise test with DRAFT_BLESS=1, then the script"
    );
    let config = trainer_config(t, &json);
    // The x_T the fixture used are the Trainer's draws.
    let tn_bytes = read("trainer_noise.safetensors");
    let tn = Weights::from_bytes("trainer_noise", &tn_bytes).unwrap();
    for key in tn.keys() {
        let parts: Vec<usize> = key.split('.').skip(1).map(|s| s.parse().unwrap()).collect();
        let (want, _) = tn.read_f32(&key).unwrap();
        let (got, _) = values(trainer_x_t(config.seed, parts[0], parts[1], &device));
        assert_eq!(
            got, want,
            "{key}: the Trainer's stream changed; re-export and regenerate"
        );
    }
    let model = read_model(&fixtures().join("sd1-tiny"));
    let pipe =
        Pipeline::load_with_lora(&model, &device, &LoraSetup::Targets(vec![LoraTarget::Attn]))
            .unwrap();
    let lora = LoraFile::parse("lora_sd1", &read("lora_sd1.safetensors")).unwrap();
    let mut trainer = Trainer::new(
        pipe,
        config,
        all_rewards(),
        prompt_texts(&json),
        Some(&lora),
        Some(init_noise("sd1-tiny", &device)),
    )
    .unwrap();
    let names = trainer.pipeline.lora.param_names();
    let bytes = read("trainer.safetensors");
    let reference = Weights::from_bytes("trainer", &bytes).unwrap();
    let mut before: Vec<Vec<f32>> = trainer
        .pipeline
        .lora
        .params()
        .into_iter()
        .map(|p| values(p).0)
        .collect();
    let updates = t["updates"].as_u64().unwrap() as usize;
    for s in 0..updates {
        let detail = &t["updates_detail"][s];
        let m = pollster::block_on(trainer.train_step()).unwrap();
        assert!(!m.skipped);
        let norm_ref = detail["grad_norm"].as_f64().unwrap();
        let loss_ref = detail["loss"].as_f64().unwrap();
        let norm_err = (m.grad_norm - norm_ref).abs() / norm_ref;
        let loss_err = (m.loss - loss_ref).abs() / loss_ref.abs();
        assert!(
            m.grad_norm > t["clip_grad_norm"].as_f64().unwrap(),
            "clipping must act"
        );
        let ckpt = pollster::block_on(trainer.checkpoint()).unwrap();
        let ours = Weights::from_bytes("checkpoint", &ckpt).unwrap();
        // param: the update (p_new − p_old) relative to torch's; moments: relative to torch's.
        let mut sums = [(0f64, 0f64); 3];
        let mut after = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let short = name.strip_prefix("unet.").unwrap();
            for (slot, (ours_key, ref_key)) in [
                (format!("param.{name}"), format!("step{s}.param.{short}")),
                (format!("adam_m.{name}"), format!("step{s}.exp_avg.{short}")),
                (
                    format!("adam_v.{name}"),
                    format!("step{s}.exp_avg_sq.{short}"),
                ),
            ]
            .into_iter()
            .enumerate()
            {
                let (got, _) = ours.read_f32(&ours_key).unwrap();
                let (want, _) = reference.read_f32(&ref_key).unwrap();
                assert_eq!(got.len(), want.len(), "{ours_key}");
                for (j, (a, b)) in got.iter().zip(&want).enumerate() {
                    let base = if slot == 0 { before[i][j] } else { 0.0 };
                    sums[slot].0 += ((a - b) as f64).powi(2);
                    sums[slot].1 += ((b - base) as f64).powi(2);
                }
                if slot == 0 {
                    after.push(want);
                }
            }
        }
        let errs: Vec<f64> = sums.iter().map(|(n, d)| (n / d).sqrt()).collect();
        eprintln!(
            "trainer update {s}: loss {:.6} (rel err {loss_err:.1e}), grad norm {:.4e} (ref \
             {norm_ref:.4e}, rel err {norm_err:.1e}, clipped to {}); rel err: update {:.1e}, \
             exp_avg {:.1e}, exp_avg_sq {:.1e}",
            m.loss, m.grad_norm, t["clip_grad_norm"], errs[0], errs[1], errs[2]
        );
        assert!(loss_err < 1e-4, "update {s}: loss {} vs {loss_ref}", m.loss);
        assert!(
            norm_err < GRAD_NORM_TOL,
            "update {s}: grad norm {} vs {norm_ref}",
            m.grad_norm
        );
        for (what, e) in ["update", "exp_avg", "exp_avg_sq"].iter().zip(&errs) {
            assert!(*e < UPDATE_TOL, "update {s}: {what} rel err {e:e}");
        }
        before = after;
    }
}
