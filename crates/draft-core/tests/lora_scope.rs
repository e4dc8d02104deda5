//! A step that fails half-way, while something is scoped into the LoRA table, leaves nothing
//! behind: the next step gives the numbers of a pipeline that never failed, bit for bit (CPU).
//!
//! Two failures inside a scope: latents of 3 channels where the model has 4 make a recorded
//! step panic half-way (its DDIM update, after the UNet), while the engine's autodiff leaves are in the
//! table (`Pass::record_step`), and a reward panics in the slider's evaluation while the trained
//! LoRA's scale is changed (`Trainer::evaluate_at_scale`). With the swaps these replaced
//! (`set_params` / `set_trainable_scale` before and after), both tests fail.

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use burn::prelude::*;
use common::{fixtures, read_model, values};
use draft_core::model::lora::LoraTarget;
use draft_core::model::pipeline::LoraSetup;
use draft_core::noise::NoiseRng;
use draft_core::reward::builtin::{Reward, RewardOptions, WeightedReward, builtin};
use draft_core::train::config::{MethodConfig, TrainConfig};
use draft_core::train::engine::{Draws, Engine, Evaluation, Method, Prompts};
use draft_core::train::trainer::Trainer;
use draft_core::{Pipeline, Result};

/// sd1-tiny with trainable LoRA on the UNet's attention and the text encoder (so that an
/// evaluation also scopes the leaves into the text encoder, `Pass::finish`).
fn pipeline() -> Pipeline {
    let device = Device::flex();
    let model = read_model(&fixtures().join("sd1-tiny"));
    let pipe = Pipeline::load_with_lora(
        &model,
        &device,
        &LoraSetup::Targets(vec![LoraTarget::Attn, LoraTarget::Text]),
    )
    .unwrap();
    common::perturbed_lora(&pipe, &device);
    pipe
}

fn bits(t: Tensor<2>) -> Vec<u32> {
    values(t).0.iter().map(|v| v.to_bits()).collect()
}

/// An evaluation's figures as bits: loss, rewards, every gradient.
fn figures(eval: &Evaluation) -> (u32, Vec<u32>, Vec<Vec<u32>>) {
    (
        eval.loss.to_bits(),
        eval.rewards.iter().map(|r| r.to_bits()).collect(),
        eval.grads.iter().cloned().map(bits).collect(),
    )
}

fn lora_bytes(pipe: &Pipeline) -> Vec<u8> {
    pollster::block_on(pipe.lora.to_safetensors()).unwrap()
}

#[test]
fn an_evaluation_that_panics_in_a_recorded_step_leaves_the_table_as_it_was() {
    let device = Device::flex();
    let reward =
        WeightedReward::from_specs(&["colorfulness".into()], &RewardOptions::default()).unwrap();
    let texts = vec!["a red circle".to_string()];
    let evaluate = |pipe: &Pipeline, steps: usize, method: Method, channels: usize| {
        let mut engine = Engine::new(pipe, steps, 0.0, &reward).unwrap();
        assert!(engine.text_lora);
        // The step back-propagated first runs once, with its graph (the leaves in the table).
        engine.keep_step_graph = Some(true);
        let prompts = Prompts::new(pipe, &texts, "", 7.5).unwrap();
        let draws = Draws {
            x_t: NoiseRng::new(11).randn([1, channels, 16, 16], &device),
            step_noise: NoiseRng::new(0),
            lv_noise: None,
            truncation: 0.0,
        };
        pollster::block_on(engine.evaluate(method, &prompts, draws))
    };
    let fresh = pipeline();
    let lv = Method::DraftLv { n: 1 };
    let k2 = Method::DraftK { k: 2 };
    let want_lv = figures(&evaluate(&fresh, 2, lv, 4).unwrap());
    let want_k = figures(&evaluate(&fresh, 2, k2, 4).unwrap());
    let want_bytes = lora_bytes(&fresh);

    let pipe = pipeline();
    assert_eq!(lora_bytes(&pipe), want_bytes);
    // DRaFT-1 on one step: the step is recorded at once, and fails half-way through (its DDIM
    // update, on the UNet's 4 channels and the latents' 3), inside the recorded step's scope.
    let failed = catch_unwind(AssertUnwindSafe(|| {
        evaluate(&pipe, 1, Method::DraftK { k: 1 }, 3)
    }));
    assert!(failed.is_err(), "the step panics on latents of 3 channels");
    // The next evaluations are those of the pipeline that never failed, bit for bit.
    let got_lv = figures(&evaluate(&pipe, 2, lv, 4).unwrap());
    assert!(got_lv == want_lv, "DRaFT-LV after the failure differs");
    let got_k = figures(&evaluate(&pipe, 2, k2, 4).unwrap());
    assert!(got_k == want_k, "DRaFT-K after the failure differs");
    assert!(
        pipe.lora.params().iter().all(|p| !p.is_tracked()),
        "no autodiff leaf left in the table"
    );
    assert_eq!(lora_bytes(&pipe), want_bytes);
}

/// A reward that panics while `armed`, else scores as `inner`.
struct Flaky {
    inner: Box<dyn Reward>,
    armed: Arc<AtomicBool>,
}

impl Reward for Flaky {
    fn name(&self) -> &str {
        "flaky"
    }
    fn score(&self, images: Tensor<4>, prompts: &[String]) -> Result<Tensor<1>> {
        assert!(!self.armed.load(Ordering::SeqCst), "the reward fails");
        self.inner.score(images, prompts)
    }
}

fn trainer(armed: &Arc<AtomicBool>) -> Trainer {
    let config = TrainConfig {
        method: MethodConfig::DraftK { k: 2 },
        steps: 3,
        batch: 1,
        train_steps: 4,
        lr: 1e-2,
        seed: 7,
        ..TrainConfig::default()
    };
    let device = Device::flex();
    let model = read_model(&fixtures().join("sd1-tiny"));
    let pipe =
        Pipeline::load_with_lora(&model, &device, &LoraSetup::Targets(vec![LoraTarget::Attn]))
            .unwrap();
    let inner = builtin("colorfulness", &RewardOptions::default()).unwrap();
    let flaky = Flaky {
        inner,
        armed: armed.clone(),
    };
    let reward = WeightedReward::new(vec![(Box::new(flaky), 1.0)]);
    let prompts = ["a red circle", "a blue square"].map(String::from).to_vec();
    Trainer::new(pipe, config, reward, prompts, None, None).unwrap()
}

/// A step's and an evaluation's figures as bits.
fn run_on(t: &mut Trainer) -> (Vec<u64>, Vec<u64>, Vec<u8>) {
    let m = pollster::block_on(t.train_step()).unwrap();
    let step = [m.loss, m.reward_mean, m.grad_norm]
        .map(f64::to_bits)
        .to_vec();
    let e = pollster::block_on(t.evaluate_fixed(2)).unwrap();
    let eval = [vec![e.reward, e.diversity], e.per_image]
        .concat()
        .into_iter()
        .map(f64::to_bits)
        .collect();
    (step, eval, lora_bytes(&t.pipeline))
}

#[test]
fn a_slider_evaluation_that_panics_leaves_the_scale_as_it_was() {
    let armed = Arc::new(AtomicBool::new(false));
    // One step first, so that the LoRA is not the base model and its scale matters.
    let mut fresh = trainer(&armed);
    pollster::block_on(fresh.train_step()).unwrap();
    let want = run_on(&mut fresh);

    let mut t = trainer(&armed);
    pollster::block_on(t.train_step()).unwrap();
    armed.store(true, Ordering::SeqCst);
    let failed = catch_unwind(AssertUnwindSafe(|| {
        pollster::block_on(t.evaluate_at_scale(2, 0.5))
    }));
    assert!(failed.is_err(), "the reward panicked in the evaluation");
    armed.store(false, Ordering::SeqCst);
    assert!(run_on(&mut t) == want, "the run after the failure differs");
}
