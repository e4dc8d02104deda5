//! The training loop on the CPU backend: a seeded run is reproducible bit for bit, resuming
//! from a checkpoint gives the uninterrupted run's LoRA, and non-finite updates are skipped.

mod common;

use burn::prelude::*;
use common::{fixtures, read_model, values};
use draft_core::Pipeline;
use draft_core::Result;
use draft_core::model::lora::LoraTarget;
use draft_core::model::pipeline::LoraSetup;
use draft_core::reward::builtin::{Reward, RewardOptions, WeightedReward};
use draft_core::train::config::{MethodConfig, TrainConfig};
use draft_core::train::trainer::Trainer;

fn config() -> TrainConfig {
    TrainConfig {
        method: MethodConfig::DraftK { k: 2 },
        steps: 3,
        batch: 1,
        train_steps: 4,
        lr: 1e-2,
        seed: 7,
        rewards: vec!["colorfulness".into(), "smoothness=0.5".into()],
        ..TrainConfig::default()
    }
}

fn trainer(config: TrainConfig, reward: Option<WeightedReward>) -> Trainer {
    let device = Device::flex();
    let model = read_model(&fixtures().join("sd1-tiny"));
    let pipe =
        Pipeline::load_with_lora(&model, &device, &LoraSetup::Targets(vec![LoraTarget::Attn]))
            .unwrap();
    let reward = reward.unwrap_or_else(|| {
        WeightedReward::from_specs(&config.rewards, &config.reward_options).unwrap()
    });
    let prompts = ["a red circle", "a blue square", "a green triangle"]
        .map(String::from)
        .to_vec();
    Trainer::new(pipe, config, reward, prompts, None, None).unwrap()
}

fn run(t: &mut Trainer, until: usize) {
    while t.step < until {
        let m = pollster::block_on(t.train_step()).unwrap();
        assert!(!m.skipped);
    }
}

fn lora_bytes(t: &Trainer) -> Vec<u8> {
    pollster::block_on(t.pipeline.lora.to_safetensors()).unwrap()
}

#[test]
fn resume_is_bit_identical_on_cpu() {
    let mut a = trainer(config(), None);
    let before = lora_bytes(&a);
    run(&mut a, 4);
    let full = lora_bytes(&a);
    assert_ne!(before, full, "training changed the LoRA");

    let mut b = trainer(config(), None);
    run(&mut b, 2);
    let ckpt = pollster::block_on(b.checkpoint()).unwrap();
    drop(b);
    let mut c = trainer(config(), None);
    c.restore("checkpoint", &ckpt).unwrap();
    assert_eq!(c.step, 2);
    run(&mut c, 4);
    assert_eq!(
        lora_bytes(&c),
        full,
        "resumed run ends at the same LoRA bit for bit"
    );

    // A checkpoint of the earlier flat form (every method's parameters beside `method`)
    // resumes the same.
    let old = with_old_config(&ckpt);
    let meta = draft_core::train::trainer::CheckpointMeta::read("old", &old).unwrap();
    assert_eq!(meta.config, config());
    let mut c = trainer(config(), None);
    c.restore("old", &old).unwrap();
    run(&mut c, 4);
    assert_eq!(lora_bytes(&c), full, "resumed from the old form");

    // A checkpoint of other settings is refused.
    let mut d = trainer(
        TrainConfig {
            lr: 2e-2,
            ..config()
        },
        None,
    );
    let err = d.restore("checkpoint", &ckpt).unwrap_err().to_string();
    assert!(err.contains("other settings"), "{err}");
}

/// `checkpoint` with its `config` metadata as `draft train` wrote it before the method carried
/// its parameters: `"method": "draft-k"` and k, lv_samples, t_min, t_max, k_min, k_max beside
/// it.
fn with_old_config(checkpoint: &[u8]) -> Vec<u8> {
    let n = u64::from_le_bytes(checkpoint[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&checkpoint[8..8 + n]).unwrap();
    let meta = header["__metadata__"].as_object_mut().unwrap();
    let mut config: serde_json::Value =
        serde_json::from_str(meta["config"].as_str().unwrap()).unwrap();
    assert_eq!(config["method"], "draft-k");
    assert!(config.get("lv_samples").is_none());
    for (k, v) in [
        ("lv_samples", 2),
        ("t_min", 1),
        ("t_max", 3),
        ("k_min", 1),
        ("k_max", 3),
    ] {
        config[k] = v.into();
    }
    meta.insert("config".into(), config.to_string().into());
    let mut text = header.to_string().into_bytes();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(text);
    out.extend(&checkpoint[8 + n..]);
    out
}

/// A user-defined reward that goes NaN on demand.
struct Poisoned;

impl Reward for Poisoned {
    fn name(&self) -> &str {
        "poisoned"
    }
    fn score(&self, images: Tensor<4>, _prompts: &[String]) -> Result<Tensor<1>> {
        let b = images.dims()[0];
        Ok(images.reshape([b as i64, -1]).mean_dim(1).reshape([b]) * f32::NAN)
    }
}

#[test]
fn non_finite_updates_are_skipped_then_stop_training() {
    let reward = WeightedReward::new(vec![(Box::new(Poisoned), 1.0)]);
    let mut t = trainer(
        TrainConfig {
            max_bad_steps: 2,
            ..config()
        },
        Some(reward),
    );
    let before = lora_bytes(&t);
    let m = pollster::block_on(t.train_step()).unwrap();
    assert!(m.skipped && !m.loss.is_finite());
    assert_eq!(t.skipped, 1);
    assert_eq!(
        lora_bytes(&t),
        before,
        "a skipped update leaves the LoRA untouched"
    );
    let err = pollster::block_on(t.train_step()).unwrap_err().to_string();
    assert!(err.contains("2 non-finite updates in a row"), "{err}");
    assert_eq!(lora_bytes(&t), before);
    let ckpt = pollster::block_on(t.checkpoint()).unwrap();
    let w = draft_core::model::weights::Weights::from_bytes("ckpt", &ckpt).unwrap();
    for k in w.keys() {
        let (v, _) = w.read_f32(&k).unwrap();
        assert!(
            v.iter().all(|x| x.is_finite()),
            "{k} is finite in the checkpoint"
        );
    }
}

/// A reward that is NaN on one call only (the `bad`-th, counting from 0).
struct NanOnce {
    calls: std::sync::atomic::AtomicUsize,
    bad: usize,
}

impl Reward for NanOnce {
    fn name(&self) -> &str {
        "nan-once"
    }
    fn score(&self, images: Tensor<4>, _prompts: &[String]) -> Result<Tensor<1>> {
        let b = images.dims()[0];
        let call = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let r = images.reshape([b as i64, -1]).mean_dim(1).reshape([b]);
        Ok(if call == self.bad { r * f32::NAN } else { r })
    }
}

#[test]
fn one_nan_gradient_is_skipped_and_never_reaches_the_lora_or_the_checkpoint() {
    let reward = || {
        WeightedReward::new(vec![(
            Box::new(NanOnce {
                calls: 0.into(),
                bad: 1,
            }),
            1.0,
        )])
    };
    // One reward call per update (DRaFT-K): update 2 gets the NaN.
    let mut t = trainer(config(), Some(reward()));
    let mut lora = vec![lora_bytes(&t)];
    for _ in 0..4 {
        let m = pollster::block_on(t.train_step()).unwrap();
        assert_eq!(m.skipped, m.step == 2, "step {}: {m:?}", m.step);
        lora.push(lora_bytes(&t));
    }
    assert_eq!(t.skipped, 1);
    assert_eq!(lora[2], lora[1], "the NaN update left the LoRA as it was");
    assert_ne!(lora[3], lora[2], "training went on after it");
    let ckpt = pollster::block_on(t.checkpoint()).unwrap();
    for bytes in [&ckpt, &lora[4]] {
        let w = draft_core::model::weights::Weights::from_bytes("out", bytes).unwrap();
        for k in w.keys() {
            let (v, _) = w.read_f32(&k).unwrap();
            assert!(v.iter().all(|x| x.is_finite()), "{k} is not finite");
        }
    }
}

#[test]
fn every_method_raises_the_reward() {
    for method in [
        MethodConfig::Draft,
        MethodConfig::DraftK { k: 1 },
        MethodConfig::DraftLv { lv_samples: 2 },
        MethodConfig::Refl { t_min: 1, t_max: 3 },
        MethodConfig::AlignProp { k_min: 1, k_max: 3 },
    ] {
        let cfg = TrainConfig {
            method,
            steps: 4,
            batch: 2,
            train_steps: 12,
            lr: 2e-2,
            rewards: vec!["brightness".into()],
            ..config()
        };
        let mut t = trainer(cfg, None);
        let before = pollster::block_on(t.eval_reward(4)).unwrap();
        run(&mut t, 12);
        let after = pollster::block_on(t.eval_reward(4)).unwrap();
        eprintln!("{}: eval reward {before:.4} → {after:.4}", method.name());
        assert!(
            after > before + 1e-3,
            "{}: {before} → {after}",
            method.name()
        );
    }
    let _ = values::<1>;
    let _ = RewardOptions::default();
}

/// The run policy both shells drive: evaluation and checkpoint cadence, the before → after
/// evaluations, the early stop on diversity, and the "before" figures kept in checkpoints.
#[test]
fn run_policy_evaluates_checkpoints_and_stops_as_asked() {
    use draft_core::train::config::RunPolicy;
    use draft_core::train::run::Run;
    let policy = RunPolicy {
        eval_images: 2,
        eval_every: 2,
        checkpoint_every: 3,
        min_diversity: Some(0.5),
    };
    let cfg = TrainConfig {
        train_steps: 4,
        ..config()
    };
    let mut run = Run::new(trainer(cfg.clone(), None), policy.clone()).unwrap();
    let before = pollster::block_on(run.evaluate_before()).unwrap().unwrap();
    assert_eq!(run.before().unwrap().diversity, before.diversity);
    assert!(
        pollster::block_on(run.evaluate_before()).unwrap().is_none(),
        "the before evaluation is made once"
    );
    let mut seen = Vec::new();
    let mut last_ckpt = None;
    while !run.done() {
        let u = pollster::block_on(run.update()).unwrap();
        assert!(u.collapsed.is_none());
        assert_eq!(u.eval.is_some(), u.metrics.diversity.is_some());
        seen.push((u.metrics.step, u.eval.is_some(), u.checkpoint.is_some()));
        if u.checkpoint.is_some() {
            last_ckpt = u.checkpoint;
        }
    }
    assert_eq!(
        seen,
        [
            (1, false, false),
            (2, true, false),
            (3, false, true),
            (4, true, true)
        ]
    );
    // The after evaluation is the last update's (not sampled again), and equals a fresh one.
    let after = pollster::block_on(run.evaluate_after()).unwrap();
    let fresh = pollster::block_on(run.trainer.evaluate_fixed(2)).unwrap();
    assert_eq!(after.reward, fresh.reward);

    // A resumed run gets the before figures from the checkpoint, and does not evaluate again.
    let mut t = trainer(cfg.clone(), None);
    t.restore("checkpoint", last_ckpt.as_ref().unwrap())
        .unwrap();
    let mut resumed = Run::new(t, policy.clone()).unwrap();
    assert_eq!(resumed.before().unwrap().diversity, before.diversity);
    assert!(
        pollster::block_on(resumed.evaluate_before())
            .unwrap()
            .is_none()
    );
    assert!(resumed.done());

    // Another evaluation-set size: the stored figures do not apply.
    let other = Run::new(
        {
            let mut t = trainer(cfg.clone(), None);
            t.restore("checkpoint", last_ckpt.as_ref().unwrap())
                .unwrap();
            t
        },
        RunPolicy {
            eval_images: 4,
            ..policy.clone()
        },
    )
    .unwrap();
    assert!(other.before().is_none());

    // A diversity far below the reference stops the run at the first evaluation, with a
    // checkpoint.
    let mut t = trainer(cfg, None);
    t.before = Some(draft_core::train::trainer::EvalSummary {
        images: 2,
        reward: 0.0,
        terms: vec![0.0, 0.0],
        diversity: 1e9,
    });
    let mut run = Run::new(t, policy).unwrap();
    assert!(pollster::block_on(run.evaluate_before()).unwrap().is_none());
    let u1 = pollster::block_on(run.update()).unwrap();
    assert!(u1.collapsed.is_none() && !run.done());
    let u2 = pollster::block_on(run.update()).unwrap();
    assert!(u2.collapsed.is_some() && u2.checkpoint.is_some() && run.done());

    // Impossible policies are refused.
    for bad in [
        RunPolicy {
            eval_images: 0,
            eval_every: 1,
            checkpoint_every: 1,
            min_diversity: Some(0.5),
        },
        RunPolicy {
            eval_images: 4,
            eval_every: 1,
            checkpoint_every: 1,
            min_diversity: Some(1.5),
        },
    ] {
        assert!(bad.validate().is_err());
    }
}

/// Progress within an update (every sampling and back-propagated step), and a cancel from the
/// callback: the update stops with `Cancelled`, nothing changes, and the run goes on as if the
/// cancelled attempt never happened.
#[test]
fn progress_is_reported_and_a_cancelled_update_changes_nothing() {
    use draft_core::train::engine::Progress;
    use std::sync::{Arc, Mutex};
    let mut reference = trainer(config(), None);
    run(&mut reference, 2);

    let mut t = trainer(config(), None);
    let seen: Arc<Mutex<Vec<(String, usize, usize)>>> = Default::default();
    let cancel_at = Arc::new(Mutex::new(Some(2usize)));
    let (s, c) = (seen.clone(), cancel_at.clone());
    t.set_progress(Some(Box::new(move |p: &Progress| {
        s.lock()
            .unwrap()
            .push((p.phase.name().to_string(), p.done, p.total));
        !(p.phase.name() == "sampling" && Some(p.done) == *c.lock().unwrap())
    })));
    let before = lora_bytes(&t);
    let err = pollster::block_on(t.train_step()).unwrap_err();
    assert!(matches!(err, draft_core::Error::Cancelled), "{err}");
    assert_eq!(t.step, 0);
    assert_eq!(lora_bytes(&t), before, "a cancelled update changes nothing");
    assert_eq!(
        *seen.lock().unwrap(),
        [
            ("sampling".to_string(), 1, 3),
            ("sampling".to_string(), 2, 3)
        ]
    );
    seen.lock().unwrap().clear();
    *cancel_at.lock().unwrap() = None;
    run(&mut t, 2);
    let events = seen.lock().unwrap().clone();
    let one_update: Vec<(String, usize, usize)> = [
        ("sampling", 1, 3),
        ("sampling", 2, 3),
        ("sampling", 3, 3),
        ("backward", 1, 2),
        ("backward", 2, 2),
    ]
    .iter()
    .map(|(p, d, n)| (p.to_string(), *d, *n))
    .collect();
    assert_eq!(events, [one_update.clone(), one_update].concat());
    assert_eq!(
        lora_bytes(&t),
        lora_bytes(&reference),
        "the run after the cancel is the uninterrupted one"
    );
}

/// `--height`/`--width`: a run samples, trains and evaluates at the asked size instead of the
/// model's (sd1-tiny: 16×16 latents, 32×32 images, a VAE that downscales by 2); the size is
/// kept in the checkpoint; a size the VAE cannot reach is refused before any work.
#[test]
fn a_run_trains_at_the_asked_image_size() {
    let sized = TrainConfig {
        height: Some(24),
        width: Some(40),
        ..config()
    };
    let mut t = trainer(sized.clone(), None);
    let m = pollster::block_on(t.train_step()).unwrap();
    assert!(m.loss.is_finite() && m.grad_norm > 0.0, "{m:?}");
    let e = pollster::block_on(t.evaluate_fixed(2)).unwrap();
    assert_eq!(e.images.dims(), [2, 3, 24, 40]);
    let ckpt = pollster::block_on(t.checkpoint()).unwrap();
    let meta = draft_core::train::trainer::CheckpointMeta::read("sized", &ckpt).unwrap();
    assert_eq!(
        (meta.config.height, meta.config.width),
        (Some(24), Some(40))
    );
    // The default size is not written, so checkpoints of earlier runs keep their bytes.
    let plain = serde_json::to_string(&config()).unwrap();
    assert!(
        !plain.contains("height") && !plain.contains("width"),
        "{plain}"
    );

    let device = Device::flex();
    let model = read_model(&fixtures().join("sd1-tiny"));
    let pipe =
        Pipeline::load_with_lora(&model, &device, &LoraSetup::Targets(vec![LoraTarget::Attn]))
            .unwrap();
    let odd = TrainConfig {
        height: Some(33),
        ..config()
    };
    let reward = WeightedReward::from_specs(&odd.rewards, &odd.reward_options).unwrap();
    let err = Trainer::new(pipe, odd, reward, vec!["a red circle".into()], None, None)
        .err()
        .expect("33 pixels is not a multiple of the VAE's 2")
        .to_string();
    assert_eq!(
        err,
        "height and width must be positive multiples of 2, got 33×32"
    );
}
