//! The browser tests' native twins (CPU backend): the same checks on the same fixtures, and
//! the native result the browser's sampling is compared with.
//! `DRAFT_BLESS=1 cargo test --release --workspace --test native -- --test-threads 1` rewrites
//! `tests/fixtures/web/shapes-32-native.safetensors`.

#![cfg(not(target_arch = "wasm32"))]

mod common;

use burn::prelude::*;
use common::*;
use draft_core::model::weights::Weights;
use draft_core::noise::NoiseRng;

const NATIVE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../tests/fixtures/web/shapes-32-native.safetensors"
);

#[test]
fn sd1_sampling_matches_diffusers() {
    let (got, want) = pollster::block_on(sample_sd1(&Device::flex()));
    let err = max_abs_diff(&got, &want);
    eprintln!("sd1-tiny native (CPU) vs diffusers: max abs error {err:.2e}");
    assert!(err <= 1e-4, "max abs error {err:e}");
}

#[test]
fn native_fixture_is_current() {
    let device = Device::flex();
    if std::env::var_os("DRAFT_BLESS").is_some() {
        let noise = NoiseRng::new(7).randn([2, 3, 32, 32], &device);
        let (noise_values, _) = pollster::block_on(draft_core::read_f32(noise.clone())).unwrap();
        let images = pollster::block_on(sample_shapes(&device, noise));
        let u = pollster::block_on(draft_k_update("cpu"));
        let bytes = draft_core::model::weights::serialize_f32(
            &[
                ("noise".into(), vec![2, 3, 32, 32], noise_values),
                ("images".into(), vec![2, 32, 32, 3], images),
                (
                    "draft_k_reward".into(),
                    vec![2],
                    vec![u.before as f32, u.after as f32],
                ),
            ],
            None,
        )
        .unwrap();
        std::fs::write(NATIVE, bytes).unwrap();
    }
    let bytes = std::fs::read(NATIVE).unwrap();
    let w = Weights::from_bytes(NATIVE, &bytes).unwrap();
    let images = pollster::block_on(sample_shapes(
        &device,
        w.tensor::<4>("noise", &device).unwrap(),
    ));
    let err = max_abs_diff(&images, &w.read_f32("images").unwrap().0);
    eprintln!("shapes-32 native (CPU) vs the committed native result: max abs error {err:.2e}");
    assert!(err <= 1e-5, "the committed native result is stale: {err:e}");
}

#[test]
fn one_draft_k_update_raises_the_reward() {
    let u = pollster::block_on(draft_k_update("cpu"));
    let bytes = std::fs::read(NATIVE).unwrap();
    let w = Weights::from_bytes(NATIVE, &bytes).unwrap();
    let want = w.read_f32("draft_k_reward").unwrap().0;
    let got = [u.before as f32, u.after as f32];
    assert!(
        max_abs_diff(&got, &want) <= 1e-5,
        "the committed native result is stale: {got:?} vs {want:?}"
    );
    eprintln!(
        "native (CPU): evaluation reward {:.4} → {:.4}, max |ΔLoRA| {:.2e}, batch reward {:.4}",
        u.before, u.after, u.lora_change, u.metrics.reward_mean
    );
    assert!(u.lora_change > 1e-4, "the LoRA did not move");
    assert!(u.after > u.before + 1e-3, "{} → {}", u.before, u.after);
}

/// A page run resumed from its own checkpoint (the "Resume run" after a reload) continues to
/// the uninterrupted run's LoRA, byte for byte, with the checkpoint's settings whatever the
/// form holds; the checkpoint is `draft train`'s format (it carries the prompts and "before").
#[test]
fn a_resumed_page_run_continues_to_the_uninterrupted_lora() {
    use draft_web::{RunInputs, Session, WebOptions};
    let options = WebOptions {
        device: "cpu".into(),
        method: "draft-k".into(),
        steps: 3,
        batch: 1,
        lr: 0.01,
        preview: 2,
        eval_every: 2,
        checkpoint_every: 2,
        prompts: vec!["a red circle".into(), "a blue square".into()],
        ..WebOptions::default()
    };
    let run = |options: &WebOptions, inputs: RunInputs, upto: usize| {
        pollster::block_on(async {
            let s = Session::build(options, inputs).await.unwrap();
            s.start().await.unwrap();
            let mut checkpoints = Vec::new();
            while s.updates() < upto {
                let u = s.update(upto, options.eval_every).await.unwrap();
                if let Some(c) = u.checkpoint {
                    checkpoints.push((u.metrics.step, c));
                }
            }
            let info = s.info.clone();
            (s.lora_safetensors().await.unwrap(), checkpoints, info)
        })
    };
    let (full, checkpoints, _) = run(&options, RunInputs::default(), 4);
    let steps: Vec<usize> = checkpoints.iter().map(|c| c.0).collect();
    assert_eq!(
        steps,
        [2, 4],
        "checkpoints every 2 updates and after the last"
    );
    // The form after a reload may hold other settings: the checkpoint's win.
    let form = WebOptions {
        lr: 0.5,
        method: "draft-lv".into(),
        prompts: Vec::new(),
        ..options.clone()
    };
    let inputs = RunInputs {
        model: None,
        checkpoint: Some(("checkpoint.safetensors".into(), checkpoints[0].1.clone())),
        ..RunInputs::default()
    };
    let (resumed, _, info) = run(&form, inputs, 4);
    assert_eq!(info.step, 2);
    assert_eq!(info.options.lr, 0.01);
    assert_eq!(info.options.method, "draft-k");
    assert_eq!(info.options.prompts, options.prompts);
    assert!(
        info.before.is_some(),
        "the evaluation before training is in the checkpoint"
    );
    assert!(
        resumed == full,
        "the resumed run's LoRA differs from the uninterrupted run's"
    );

    // Another model's checkpoint is refused with the file's name.
    let sd1 = RunInputs {
        model: Some(sd1_files()),
        checkpoint: Some(("page.safetensors".into(), checkpoints[0].1.clone())),
        ..RunInputs::default()
    };
    let err = pollster::block_on(Session::build(&options, sd1))
        .err()
        .unwrap();
    assert!(err.contains("page.safetensors"), "{err}");
}

/// A learned reward through the page's session: LAION aesthetic on the tiny CLIP fixture, its
/// files handed over from memory as the page's pickers do.
#[test]
fn one_update_on_the_learned_aesthetic_reward() {
    let u = pollster::block_on(aesthetic_update("cpu"));
    eprintln!(
        "native (CPU), laion-aesthetic: evaluation reward {:.7} → {:.7}, max |ΔLoRA| {:.2e}, batch reward {:.6}",
        u.before, u.after, u.lora_change, u.metrics.reward_mean
    );
    assert!(u.lora_change > 1e-4, "the LoRA did not move");
    assert!(u.after > u.before, "{} → {}", u.before, u.after);
    let got = [u.before as f32, u.after as f32];
    assert!(
        max_abs_diff(&got, &AESTHETIC_NATIVE) <= 1e-5,
        "AESTHETIC_NATIVE (tests/common) is stale: {got:?}"
    );
}

/// What cannot fit the adapter is refused before loading, naming the tensor and the limit; a
/// PyTorch pickle is refused with the conversion command.
#[test]
fn inputs_over_the_adapter_limit_or_unreadable_are_refused() {
    use draft_core::reward::files::RewardSource;
    use draft_web::{RunInputs, Session, WebOptions};
    let options = WebOptions {
        device: "cpu".into(),
        rewards: vec!["laion-aesthetic=1".into()],
        ..WebOptions::default()
    };
    let build = |inputs| pollster::block_on(Session::build(&options, inputs)).err();
    // The tiny CLIP's largest tensor is far under 1 MiB: a 64 KiB limit refuses it.
    let err = build(RunInputs {
        rewards: aesthetic_sources(),
        max_binding_bytes: Some(64 << 10),
        ..RunInputs::default()
    })
    .expect("refused");
    assert!(
        err.contains("reward model") && err.contains("tensor") && err.contains("0.1 MiB"),
        "{err}"
    );
    // sd1-tiny at 256×256 latents (512² images) on the evaluation batch: its largest activation,
    // the UNet's feed-forward at 128×128, is 256 MiB whole and runs in chunks of tokens of at
    // most 128 MiB (WebGPU's guaranteed binding size), over an adapter of 64 MiB. Attention is
    // not what limits it (its scores are computed in blocks: draft_core::ops::attention), nor the
    // VAE decoder (its layers at 512² run on strips of rows: draft_core::memory::strips).
    let mut sd1 = sd1_files();
    let unet: serde_json::Value = serde_json::from_slice(&sd1.files["unet/config.json"]).unwrap();
    let mut unet = unet.as_object().unwrap().clone();
    unet.insert("sample_size".into(), 256.into());
    sd1.insert("unet/config.json", serde_json::to_vec(&unet).unwrap());
    let err = build(RunInputs {
        model: Some(sd1),
        rewards: aesthetic_sources(),
        max_binding_bytes: Some(64 << 20),
        ..RunInputs::default()
    })
    .expect("refused");
    assert!(
        err.contains("feed-forward")
            && err.contains("128.0 MiB")
            && err.contains("64.0 MiB")
            && err.contains("lower the batch"),
        "{err}"
    );
    // A pickle the page cannot read.
    let mut rewards = aesthetic_sources();
    rewards.insert(
        "laion-aesthetic".into(),
        RewardSource::File {
            name: "sac+logos+ava1-l14-linearMSE.pth".into(),
            bytes: b"PK\x03\x04 not safetensors".to_vec(),
            open_clip_config: None,
        },
    );
    let err = build(RunInputs {
        rewards,
        ..RunInputs::default()
    })
    .expect("refused");
    assert!(err.contains("draft convert"), "{err}");
    // Without the aesthetic file, the CLI's message.
    let mut rewards = aesthetic_sources();
    rewards.remove("laion-aesthetic");
    let err = build(RunInputs {
        rewards,
        ..RunInputs::default()
    })
    .expect("refused");
    assert!(err.contains("laion-aesthetic"), "{err}");
}

/// The page keeps the diffusion model's weights in f16 on an adapter that computes in f16
/// (lavapipe, in CI), in f32 on the CPU backend and elsewhere.
#[test]
fn weights_are_f16_only_where_the_adapter_computes_in_f16() {
    use burn::tensor::FloatDType;
    assert_eq!(draft_web::weights_dtype(&Device::flex()), FloatDType::F32);
    let gpu = Device::wgpu(Default::default());
    assert_eq!(
        draft_web::weights_dtype(&gpu) == FloatDType::F16,
        gpu.supports_dtype(FloatDType::F16)
    );
}
