//! `draft train` and `draft sample --lora` end to end: impossible settings are refused before
//! any work, a run killed with SIGKILL resumes to the uninterrupted run's LoRA bit for bit
//! (CPU backend), a TOML config sets flags, and `--lora FILE:SCALE` reproduces diffusers.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn tmp(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("draft-train-test-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn draft(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_draft"))
        .args(args)
        .output()
        .expect("run draft")
}

fn model() -> String {
    fixtures().join("sd1-tiny").display().to_string()
}

/// Fast settings on the tiny fixture model.
fn base_args(out: &Path) -> Vec<String> {
    [
        "train",
        "--model",
        &model(),
        "--device",
        "cpu",
        "--steps",
        "3",
        "--batch",
        "1",
        "--prompt",
        "a red circle",
        "--out-dir",
        out.to_str().unwrap(),
        "--preview",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Exit ≠ 0, exactly one `error:` line mentioning every needle, no panic, and (unless
/// `after_load`) nothing loaded: the refusal comes before any work.
fn expect_refusal(extra: &[&str], needles: &[&str], after_load: bool) {
    let out = tmp("refusal");
    let mut args = base_args(&out);
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = draft(&args);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{extra:?} should fail:\n{stderr}");
    assert!(!stderr.contains("panicked"), "panic:\n{stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(
        errors.len(),
        1,
        "{extra:?}: one error line expected:\n{stderr}"
    );
    for n in needles {
        assert!(
            errors[0].contains(n),
            "{extra:?}: `{n}` not in `{}`",
            errors[0]
        );
    }
    if !after_load {
        assert!(
            !stderr.contains("draft: device"),
            "{extra:?}: work started:\n{stderr}"
        );
    }
    assert!(!out.join("metrics.jsonl").exists() || after_load);
}

#[test]
fn impossible_settings_are_refused() {
    expect_refusal(
        &["--method", "draft-k", "--k", "4"],
        &["K must be between 1 and", "(3)"],
        false,
    );
    expect_refusal(&["--rank", "0"], &["--rank"], false);
    // Settings that would allocate without bound are refused before any work.
    expect_refusal(
        &["--rank", "1099511627776"],
        &["--rank must be at most 4096"],
        false,
    );
    expect_refusal(
        &["--grad-accum", "1000000000000"],
        &["--grad-accum must be at most 1048576"],
        false,
    );
    expect_refusal(&["--reward", "beauty"], &["unknown reward `beauty`"], false);
    expect_refusal(&["--reward", "brightness=x"], &["not a number"], false);
    expect_refusal(&["--method", "ddpo"], &["unknown method `ddpo`"], false);
    expect_refusal(
        &["--method", "refl", "--t-min", "3", "--t-max", "2"],
        &["ReFL"],
        false,
    );
    expect_refusal(
        &["--lora-targets", "attn,mlp"],
        &["unknown LoRA target `mlp`"],
        false,
    );
    expect_refusal(&["--optimizer", "lion"], &["unknown optimizer"], false);
    expect_refusal(&["--lr=-1"], &["--lr must be positive"], false);
    let dir = tmp("prompts");
    let empty = dir.join("empty.txt");
    std::fs::write(&empty, "\n  \n").unwrap();
    let o = {
        let out = tmp("empty-prompts");
        let mut args = base_args(&out);
        // replace --prompt with --prompts
        let i = args.iter().position(|a| a == "--prompt").unwrap();
        args.drain(i..i + 2);
        args.extend(["--prompts".to_string(), empty.display().to_string()]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        draft(&args)
    };
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && stderr.contains("has no prompts"),
        "{stderr}"
    );

    // A LoRA file whose keys match no layer: refused once the model's layers are known.
    let bad = dir.join("bad_lora.safetensors");
    let bytes = draft_core::model::weights::serialize_f32(
        &[
            (
                "unet.nowhere.to_q.lora_A.weight".into(),
                vec![4, 8],
                vec![0.0; 32],
            ),
            (
                "unet.nowhere.to_q.lora_B.weight".into(),
                vec![8, 4],
                vec![0.0; 32],
            ),
        ],
        None,
    )
    .unwrap();
    std::fs::write(&bad, bytes).unwrap();
    expect_refusal(
        &["--init-lora", bad.to_str().unwrap()],
        &["bad_lora.safetensors", "match no layer"],
        true,
    );
    let o = draft(&[
        "sample",
        "--model",
        &model(),
        "--prompt",
        "x",
        "--steps",
        "2",
        "--device",
        "cpu",
        "--out",
        dir.join("x.png").to_str().unwrap(),
        "--lora",
        &format!("{}:0.5", bad.display()),
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && stderr.contains("match no layer"),
        "{stderr}"
    );

    // Unknown keys in a TOML config.
    let cfg = dir.join("bad.toml");
    std::fs::write(&cfg, "train-steps = 3\nlearning-rate = 0.1\n").unwrap();
    expect_refusal(
        &["--config", cfg.to_str().unwrap()],
        &["bad.toml", "learning-rate"],
        false,
    );
}

fn lora_of(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("pytorch_lora_weights.safetensors")).unwrap()
}

#[test]
fn killed_run_resumes_to_the_same_lora() {
    let dir = tmp("resume");
    // The settings come from a TOML file (relative paths are relative to it).
    let cfg = dir.join("run.toml");
    std::fs::write(
        &cfg,
        format!(
            "model = \"{}\"\ndevice = \"cpu\"\nmethod = \"draft-k\"\nk = 2\nsteps = 3\nbatch = 1\n\
             prompt = [\"a red circle\", \"a blue square\"]\nreward = [\"colorfulness\", \"smoothness=0.5\"]\n\
             train-steps = 8\nlr = 0.01\ncheckpoint-every = 2\npreview = 0\nseed = 3\n",
            model()
        ),
    )
    .unwrap();
    let full = dir.join("full");
    let o = draft(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--out-dir",
        full.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let metrics = std::fs::read_to_string(full.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics.lines().count(), 8);
    for f in ["reward_curve.png", "checkpoint.safetensors", "config.json"] {
        assert!(full.join(f).is_file(), "{f}");
    }

    // Kill -9 once a checkpoint exists, then resume.
    let part = dir.join("part");
    let mut child = Command::new(env!("CARGO_BIN_EXE_draft"))
        .args([
            "train",
            "--config",
            cfg.to_str().unwrap(),
            "--out-dir",
            part.to_str().unwrap(),
        ])
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let ckpt = part.join("checkpoint.safetensors");
    while !ckpt.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "no checkpoint written"
        );
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill(); // SIGKILL on Unix
    let _ = child.wait();
    let o = draft(&[
        "train",
        "--config",
        cfg.to_str().unwrap(),
        "--out-dir",
        part.to_str().unwrap(),
        "--resume",
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert_eq!(
        lora_of(&part),
        lora_of(&full),
        "resumed LoRA differs:\n{stderr}"
    );
    let metrics = std::fs::read_to_string(part.join("metrics.jsonl")).unwrap();
    let steps: Vec<u64> = metrics
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(
        steps,
        (1..=8).collect::<Vec<_>>(),
        "one metrics line per step"
    );

    // The LoRA loads back for sampling, at any scale.
    let lora = format!(
        "{}:0.7",
        full.join("pytorch_lora_weights.safetensors").display()
    );
    let o = draft(&[
        "sample",
        "--model",
        &model(),
        "--prompt",
        "a red circle",
        "--steps",
        "3",
        "--device",
        "cpu",
        "--out",
        dir.join("s.png").to_str().unwrap(),
        "--lora",
        &lora,
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn sample_with_lora_scale_reproduces_diffusers() {
    let dir = tmp("lora-sample");
    let out = dir.join("images.safetensors");
    let lora = format!(
        "{}:0.5",
        fixtures().join("draft/lora_a.safetensors").display()
    );
    let o = draft(&[
        "sample",
        "--model",
        &model(),
        "--device",
        "cpu",
        "--steps",
        "10",
        "--guidance",
        "7.5",
        "--prompt",
        "a red circle on a blue background",
        "--prompt",
        "A photo of an astronaut riding a horse!",
        "--init-noise",
        fixtures()
            .join("sd1-tiny/init_noise.safetensors")
            .to_str()
            .unwrap(),
        "--out",
        dir.join("g.png").to_str().unwrap(),
        "--out-tensor",
        out.to_str().unwrap(),
        "--lora",
        &lora,
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ours = std::fs::read(&out).unwrap();
    let ours = safetensors::SafeTensors::deserialize(&ours).unwrap();
    let theirs = std::fs::read(fixtures().join("draft/lora_images.safetensors")).unwrap();
    let theirs = safetensors::SafeTensors::deserialize(&theirs).unwrap();
    let f = |b: &[u8]| -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let a = f(ours.tensor("images").unwrap().data());
    let b = f(theirs.tensor("a_05").unwrap().data());
    let base = f(theirs.tensor("base").unwrap().data());
    let err = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    let effect = base
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(err < 1e-4, "max abs error {err}");
    assert!(
        effect > 1e-2,
        "the LoRA visibly changes the images ({effect})"
    );
}

#[test]
fn every_method_runs_from_the_command_line() {
    for method in ["draft", "draft-k", "draft-lv", "refl", "alignprop"] {
        let out = tmp(&format!("method-{method}"));
        let mut args = base_args(&out);
        args.extend(
            [
                "--method",
                method,
                "--train-steps",
                "3",
                "--lr",
                "0.01",
                "--t-max",
                "2",
                "--k-max",
                "3",
            ]
            .map(String::from),
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let o = draft(&args);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{method}:\n{stderr}");
        assert!(
            stderr.contains(&format!("draft: {method} ·")),
            "{method}:\n{stderr}"
        );
        let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        let lines: Vec<serde_json::Value> = metrics
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3, "{method}");
        for m in &lines {
            for key in [
                "step",
                "reward_mean",
                "reward_std",
                "loss",
                "grad_norm",
                "lr",
                "seconds",
            ] {
                assert!(m[key].is_number(), "{method}: {key} in {m}");
            }
            assert!(
                m["grad_norm"].as_f64().unwrap() > 0.0,
                "{method}: zero gradient"
            );
        }
        assert!(out.join("pytorch_lora_weights.safetensors").is_file());
    }
}

#[test]
fn init_noise_sets_the_first_batch() {
    let noise = fixtures().join("sd1-tiny/init_noise.safetensors");
    let noise = noise.to_str().unwrap();
    let out = tmp("init-noise");
    let mut args = base_args(&out);
    // A --batch equal to the file's batch is accepted; only a mismatch is refused.
    let i = args.iter().position(|a| a == "--batch").unwrap();
    args[i + 1] = "2".into();
    args.extend(["--init-noise", noise, "--train-steps", "2"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = draft(&args);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains("batch 2 × 3 steps"),
        "the file's batch of 2 is used:\n{stderr}"
    );
    expect_refusal(
        &["--init-noise", noise],
        &["--batch 1 does not match", "batch of 2"],
        true,
    );
}

#[test]
fn trains_on_the_laion_aesthetic_reward() {
    let out = tmp("aesthetic");
    let mut args = base_args(&out);
    let clip = format!("clip={}", fixtures().join("clip-tiny").display());
    let mlp = format!(
        "laion-aesthetic={}",
        fixtures()
            .join("rewards/aesthetic-tiny.safetensors")
            .display()
    );
    args.extend(
        [
            "--reward",
            "laion-aesthetic",
            "--reward",
            "smoothness=0.1",
            "--reward-model",
            &clip,
            "--reward-model",
            &mlp,
            "--train-steps",
            "3",
            "--lr",
            "0.01",
        ]
        .map(String::from),
    );
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = draft(&argv);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains("reward laion-aesthetic=1 + smoothness=0.1"),
        "{stderr}"
    );
    // Without its weights the learned reward is refused before any work.
    let out = tmp("aesthetic-missing");
    let mut args = base_args(&out);
    args.extend(["--reward", "laion-aesthetic"].map(String::from));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let o = draft(&argv);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && stderr.contains("needs --reward-model clip="),
        "{stderr}"
    );
    assert!(!stderr.contains("draft: device"), "{stderr}");
}
