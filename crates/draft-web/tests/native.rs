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
    use draft_core::train::config::Settings;
    use draft_web::{RunInputs, Session, WebOptions};
    let options = form(
        "cpu",
        r#"{"method": "draft-k", "steps": 3, "batch": 1, "lr": 0.01, "preview": 2,
            "evalEvery": 2, "checkpointEvery": 2, "prompts": ["a red circle", "a blue square"]}"#,
    );
    let run = |options: &WebOptions, inputs: RunInputs, upto: usize| {
        pollster::block_on(async {
            let s = Session::build(options, inputs).await.unwrap();
            s.start().await.unwrap();
            let mut checkpoints = Vec::new();
            while s.updates() < upto {
                let u = s.update(upto, 2).await.unwrap();
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
        settings: Settings {
            lr: Some(0.5),
            method: Some("draft-lv".into()),
            prompt: None,
            ..options.settings.clone()
        },
        ..options.clone()
    };
    let inputs = RunInputs {
        model: None,
        checkpoint: Some(("checkpoint.safetensors".into(), checkpoints[0].1.clone())),
        ..RunInputs::default()
    };
    let (resumed, _, info) = run(&form, inputs, 4);
    assert_eq!(info.step, 2);
    assert_eq!(info.options.settings.lr, Some(0.01));
    assert_eq!(info.options.settings.method.as_deref(), Some("draft-k"));
    assert_eq!(info.options.settings.prompt, options.settings.prompt);
    // What the page is handed back reads back as the same options.
    let json = serde_json::to_string(&info.options).unwrap();
    assert!(
        json.contains(r#""lvSamples":2"#) && json.contains(r#""trainSteps":4"#),
        "{json}"
    );
    assert_eq!(WebOptions::parse(&json).unwrap(), info.options);
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
    use draft_web::{RunInputs, Session};
    let options = form("cpu", r#"{"rewards": ["laion-aesthetic=1"]}"#);
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

/// Impossible settings, each refused with these words: by the page's form (camelCase JSON), by
/// `draft train`'s flags and by its `--config` TOML file — one list, the same text in all three.
/// Keys are the flags' names; a value a shell cannot even parse (a negative count) is not here.
const REFUSED: [(&str, &str); 24] = [
    (r#"{"steps": 0}"#, "--steps must be at least 1"),
    (
        r#"{"steps": 20000}"#,
        "--steps must be at most 10000, got 20000",
    ),
    (
        r#"{"method": "refl", "steps": 5, "t-max": 6}"#,
        "ReFL needs 1 ≤ t-min ≤ t-max ≤ steps (5), got 1..=6",
    ),
    (
        r#"{"method": "draft-k", "steps": 3, "k": 4}"#,
        "K must be between 1 and the number of sampling steps (3), got 4",
    ),
    (
        r#"{"method": "alignprop", "k-min": 3, "k-max": 2}"#,
        "AlignProp needs 1 ≤ k-min ≤ k-max ≤ steps (50), got 3..=2",
    ),
    (
        r#"{"method": "draft-lv", "lv-samples": 0}"#,
        "--lv-samples must be at least 1",
    ),
    (r#"{"rank": 0}"#, "--rank must be at least 1"),
    (r#"{"rank": 5000}"#, "--rank must be at most 4096, got 5000"),
    (r#"{"lr": -1}"#, "--lr must be positive, got -1"),
    (r#"{"lr": 0}"#, "--lr must be positive, got 0"),
    (
        r#"{"method": "ddpo"}"#,
        "unknown method `ddpo` (expected draft, draft-k, draft-lv, refl or alignprop)",
    ),
    (r#"{"reward": ["beauty"]}"#, "unknown reward `beauty`"),
    (r#"{"batch": 0}"#, "--batch must be between 1 and"),
    (
        r#"{"min-diversity": 1.5}"#,
        "--min-diversity 1.5: expected a fraction in [0, 1)",
    ),
    (
        r#"{"min-diversity": 0.5, "preview": 0}"#,
        "--min-diversity needs an evaluation set: --preview of at least 2",
    ),
    (
        r#"{"optimizer": "lion"}"#,
        "unknown optimizer \"lion\" (expected adamw or sgd)",
    ),
    (
        r#"{"lora-targets": ["attn", "mlp"]}"#,
        "unknown LoRA target `mlp`",
    ),
    (r#"{"eta": -0.5}"#, "--eta must be ≥ 0, got -0.5"),
    (r#"{"alpha": 0}"#, "--alpha must be positive, got 0"),
    (r#"{"grad-accum": 0}"#, "--grad-accum must be at least 1"),
    (
        r#"{"max-bad-steps": 0}"#,
        "--max-bad-steps must be at least 1",
    ),
    (
        r#"{"clip-grad-norm": 0}"#,
        "--clip-grad-norm must be positive, got 0",
    ),
    (
        r#"{"target-color": [1.5, 0, 0]}"#,
        "--target-color 1.5,0,0: expected three numbers in [0, 1]",
    ),
    (r#"{"prompt-set": "birds"}"#, "unknown prompt set `birds`"),
];

#[test]
fn the_page_and_the_cli_refuse_the_same_settings_in_the_same_words() {
    use clap::Parser;
    use draft_web::WebOptions;
    let dir = std::env::temp_dir().join(format!("draft-web-refusals-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for (i, (json, words)) in REFUSED.iter().enumerate() {
        let settings: serde_json::Map<String, serde_json::Value> =
            serde_json::from_str(json).unwrap();
        // The page: its form's camelCase keys.
        let camel: serde_json::Map<String, serde_json::Value> = settings
            .iter()
            .map(|(k, v)| {
                let mut key = String::new();
                let mut upper = false;
                for c in if k == "reward" { "rewards" } else { k }.chars() {
                    match c {
                        '-' => upper = true,
                        c if upper => {
                            key.extend(c.to_uppercase());
                            upper = false;
                        }
                        c => key.push(c),
                    }
                }
                (key, v.clone())
            })
            .collect();
        let page = WebOptions::parse(&serde_json::Value::Object(camel).to_string())
            .and_then(|o| o.resolve(true, None))
            .expect_err(json);
        // `draft train`'s flags: `--key=value`, lists repeated (`--lora-targets` comma-separated).
        let mut args = vec!["draft".to_string(), "train".to_string()];
        for (k, v) in &settings {
            let text = |v: &serde_json::Value| match v {
                serde_json::Value::String(s) => s.clone(),
                v => v.to_string(),
            };
            match v {
                serde_json::Value::Array(items) if k == "lora-targets" || k == "target-color" => {
                    let joined: Vec<String> = items.iter().map(text).collect();
                    args.push(format!("--{k}={}", joined.join(",")));
                }
                serde_json::Value::Array(items) => {
                    args.extend(items.iter().map(|x| format!("--{k}={}", text(x))));
                }
                v => args.push(format!("--{k}={}", text(v))),
            }
        }
        let draft_cli::Command::Train(flags) = draft_cli::Cli::try_parse_from(&args)
            .unwrap_or_else(|e| panic!("{args:?}: {e}"))
            .command
        else {
            unreachable!()
        };
        let cli = format!("{:#}", flags.check().expect_err(json));
        // Its `--config` file: the same keys (JSON values are TOML values here).
        let path = dir.join(format!("bad-{i}.toml"));
        let toml: String = settings
            .iter()
            .map(|(k, v)| format!("{k} = {v}\n"))
            .collect();
        std::fs::write(&path, toml).unwrap();
        let file = format!(
            "{:#}",
            draft_cli::train::TrainArgs::check_file(&path).expect_err(json)
        );
        assert!(page.starts_with(words), "{json}: page: {page}");
        assert_eq!(cli, page, "{json}: flags");
        assert_eq!(file, format!("{}: {page}", path.display()), "{json}: file");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Before a run the page says what the picked model needs: its parameters (from the headers),
/// its weights' memory on the device, and whether an update at its size fits the adapter —
/// naming the tensor over the limit when not.
#[test]
fn the_plan_of_a_picked_model_says_its_size_and_what_does_not_fit() {
    let files = sd1_files();
    let sizes: Vec<u64> = ["unet", "vae", "text_encoder"]
        .iter()
        .flat_map(|c| {
            let w = files.component_weights(c).unwrap();
            w.keys()
                .iter()
                .map(|n| w.shape(n).unwrap().iter().product::<usize>() as u64)
                .collect::<Vec<_>>()
        })
        .collect();
    let expected: u64 = sizes.iter().sum();
    let options = form("webgpu", "{}");
    let fits = draft_web::plan(&options, Some(&files), Some(128 << 20), true).unwrap();
    assert!(fits.trains, "{:?}", fits.why);
    assert_eq!(fits.parameters, expected);
    assert_eq!(
        (fits.weights_dtype.as_str(), fits.weights_bytes),
        ("f16", 2 * expected)
    );
    assert_eq!(fits.latents, Some([16, 16]));
    assert!(fits.step_bytes.unwrap() > fits.weights_bytes, "{fits:?}");
    let (largest, n) = fits.largest.clone().unwrap();
    assert_eq!(n, *sizes.iter().max().unwrap(), "{largest}");
    assert!(largest.starts_with("sd1-tiny/"), "{largest}");
    let over = draft_web::plan(&options, Some(&files), Some(64 << 10), false).unwrap();
    assert!(!over.trains);
    assert_eq!(over.weights_bytes, 4 * expected);
    let why = over.why.unwrap();
    assert!(
        why.contains("maxStorageBufferBindingSize") && why.contains("tensor"),
        "{why}"
    );
    // The CPU backend has no binding limit.
    let cpu = draft_web::plan(&form("cpu", "{}"), Some(&files), Some(64 << 10), true).unwrap();
    assert!(cpu.trains && cpu.weights_dtype == "f32");
    // The chosen size (sd1-tiny's VAE downscales by 2), and one the VAE cannot reach.
    let sized = form("webgpu", r#"{"height": 48, "width": 24}"#);
    let sized = draft_web::plan(&sized, Some(&files), Some(128 << 20), true).unwrap();
    assert!(sized.trains && sized.latents == Some([24, 12]), "{sized:?}");
    // A larger image holds more (the weights are the same).
    assert!(
        sized.step_bytes.unwrap() > fits.step_bytes.unwrap(),
        "{sized:?}"
    );
    let odd = form("webgpu", r#"{"height": 47}"#);
    let odd = draft_web::plan(&odd, Some(&files), Some(128 << 20), true).unwrap();
    assert!(!odd.trains && odd.latents.is_none());
    assert_eq!(
        odd.why.as_deref(),
        Some("height and width must be positive multiples of 2, got 47×32")
    );
}

/// A single file picked in the page: read by range with its folder's configs (sd1-tiny's own
/// tokenizer), or refused by name when it is a pickle; without configs the standard CLIP
/// tokenizer comes with the core, and sd1-tiny's 1014-token text encoder is refused for it.
#[test]
fn a_single_file_picked_in_the_page_loads_as_in_the_cli() {
    use draft_core::model::files::FileData;
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/layouts/sd1-tiny.safetensors");
    let source = draft_core::model::source::FileSource::open(&path).unwrap();
    let data = || {
        FileData::Source(std::rc::Rc::new(
            draft_core::model::source::FileSource::open(&path).unwrap(),
        ))
    };
    let mut config = sd1_files();
    config.files.retain(|k, _| !k.ends_with(".safetensors"));
    let files = draft_web::single_file_model(
        "sd1-tiny.safetensors",
        FileData::Source(std::rc::Rc::new(source)),
        Some(&config),
    )
    .unwrap();
    let (got, want) = pollster::block_on(sample_sd1_from(&files, &Device::flex()));
    assert!(max_abs_diff(&got, &want) <= 1e-4);
    let alone = draft_web::single_file_model("sd1-tiny.safetensors", data(), None).unwrap();
    let err = draft_core::Pipeline::load(&alone, &Device::flex())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("vocab_size 1014") && err.contains("49408"),
        "{err}"
    );
    let err = draft_web::single_file_model("v1-5-pruned.ckpt", data(), None)
        .err()
        .unwrap();
    assert!(err.contains("draft convert v1-5-pruned.ckpt"), "{err}");
}

/// An SDXL folder picked in the page (its files as the page's folder picker hands them over:
/// both towers, both tokenizers): the plan counts both towers, and one DRaFT-K update runs
/// with SDXL's size ids from the form and moves the LoRA.
#[test]
fn an_sdxl_folder_trains_in_the_page() {
    use draft_core::ModelFiles;
    use draft_web::RunInputs;
    let dir =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/sdxl-tiny");
    let read = || {
        ModelFiles::read_layout("sdxl-tiny", |rel| {
            Ok::<_, ()>(std::fs::read(dir.join(rel)).ok())
        })
        .unwrap()
    };
    let files = read();
    assert!(files.has("text_encoder_2/model.safetensors") && files.has("tokenizer_2/vocab.json"));
    let options = form(
        "cpu",
        r#"{"method": "draft-k", "k": 1, "steps": 3, "batch": 1, "lr": 0.01,
            "originalSize": [64, 64], "crop": [4, 0]}"#,
    );
    let plan = draft_web::plan(&options, Some(&files), None, true).unwrap();
    let tower_2: u64 = {
        let w = files.component_weights("text_encoder_2").unwrap();
        w.keys()
            .iter()
            .map(|k| w.shape(k).unwrap().iter().product::<usize>() as u64)
            .sum()
    };
    assert!(
        plan.trains && plan.parameters > tower_2 && tower_2 > 0,
        "{plan:?}"
    );
    let u = pollster::block_on(update_of(
        &options,
        RunInputs {
            model: Some(read()),
            ..RunInputs::default()
        },
    ));
    eprintln!(
        "sdxl-tiny in the page (CPU): evaluation reward {:.4} → {:.4}, max |ΔLoRA| {:.2e}",
        u.before, u.after, u.lora_change
    );
    assert!(u.metrics.reward_mean.is_finite() && u.lora_change > 1e-5);
}
