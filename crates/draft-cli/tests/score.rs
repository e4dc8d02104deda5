//! `draft score` and the learned rewards' weight files end to end: a PNG scored with a
//! hand-computed value, HPSv2 from an HPSv2-style PyTorch checkpoint equal to the same weights
//! as safetensors, prompt rewards refused without prompts, and `draft train --reward hpsv2`.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn tmp(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("draft-score-test-{}-{test}", std::process::id()));
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

fn ok(o: &Output) -> String {
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The numeric cells of the table's row starting with `label`.
fn row(table: &str, label: &str) -> Vec<f64> {
    let line = table
        .lines()
        .find(|l| l.starts_with(&format!("| {label}")))
        .unwrap_or_else(|| panic!("no row {label} in\n{table}"));
    line.split('|')
        .filter_map(|c| c.trim().parse::<f64>().ok())
        .collect()
}

#[test]
fn scores_a_png_with_the_hand_computed_value() {
    let dir = tmp("png");
    // Pure red: rg = 1, yb = 0.5, no variance → colourfulness = √ε + 0.3·√(1.25 + ε).
    let red = image::RgbImage::from_pixel(8, 8, image::Rgb([255, 0, 0]));
    red.save(dir.join("red.png")).unwrap();
    let grey = image::RgbImage::from_pixel(8, 8, image::Rgb([128, 128, 128]));
    grey.save(dir.join("grey.png")).unwrap();
    let table = ok(&draft(&[
        "score",
        dir.to_str().unwrap(),
        "--reward",
        "colorfulness",
        "--reward",
        "brightness=2",
        "--device",
        "cpu",
    ]));
    let want_red = 1e-4 + 0.3 * (1.25f64 + 1e-8).sqrt();
    let r = row(&table, &dir.join("red.png").display().to_string());
    assert!((r[0] - want_red).abs() < 1e-4, "{table}");
    assert!((r[1] - 1.0 / 3.0).abs() < 1e-4, "{table}");
    assert!((r[2] - (want_red + 2.0 / 3.0)).abs() < 1e-4, "{table}");
    let g = row(&table, &dir.join("grey.png").display().to_string());
    assert!(
        g[0] < 1e-3 && (g[1] - 128.0 / 255.0).abs() < 1e-4,
        "{table}"
    );
    assert!(table.contains("**mean of 2**"), "{table}");
}

#[test]
fn hpsv2_from_a_pytorch_checkpoint_equals_its_safetensors() {
    let model = fixtures().join("sd1-tiny").display().to_string();
    let oc = fixtures().join("open-clip-tiny");
    let score = |weights: &Path| {
        let spec = format!("hpsv2={}", weights.display());
        ok(&draft(&[
            "score",
            "--sample",
            "2",
            "--model",
            &model,
            "--steps",
            "3",
            "--prompt",
            "a red circle on a blue background",
            "--prompt",
            "a photo of a cat",
            "--reward",
            "hpsv2",
            "--reward-model",
            &spec,
            "--device",
            "cpu",
        ]))
    };
    // A folder (open_clip_config.json + open_clip_model.safetensors) and HPSv2's own format,
    // torch.save({"state_dict": …}), read by pytorch-reader.
    let from_folder = score(&oc);
    let from_pt = score(&oc.join("hpsv2-style.pt"));
    let a = row(&from_folder, "sample 0");
    let b = row(&from_pt, "sample 0");
    assert_eq!(a, b, "{from_folder}\n{from_pt}");
    assert!(
        a[0].abs() > 1e-4 && a[0].abs() <= 1.0,
        "a cosine: {from_folder}"
    );
    assert_ne!(row(&from_folder, "sample 1")[0], a[0], "{from_folder}");
}

#[test]
fn prompt_rewards_need_prompts_and_weights() {
    let dir = tmp("noprompt");
    image::RgbImage::from_pixel(8, 8, image::Rgb([1, 2, 3]))
        .save(dir.join("a.png"))
        .unwrap();
    let spec = format!("pickscore={}", fixtures().join("clip-tiny").display());
    let tok = format!(
        "tokenizer={}",
        fixtures().join("sd1-tiny/tokenizer").display()
    );
    let o = draft(&[
        "score",
        dir.to_str().unwrap(),
        "--reward",
        "pickscore",
        "--reward-model",
        &spec,
        "--reward-model",
        &tok,
        "--device",
        "cpu",
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && stderr.contains("give --prompt"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    // With a prompt it scores.
    let table = ok(&draft(&[
        "score",
        dir.to_str().unwrap(),
        "--reward",
        "pickscore",
        "--reward-model",
        &spec,
        "--reward-model",
        &tok,
        "--prompt",
        "a photo of a cat",
        "--device",
        "cpu",
    ]));
    assert!(table.contains("| image | prompt | pickscore |"), "{table}");
    // No weights: refused before any work.
    let o = draft(&["score", dir.to_str().unwrap(), "--reward", "hpsv2"]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && stderr.contains("needs --reward-model hpsv2="),
        "{stderr}"
    );
    assert!(!stderr.contains("draft: device"), "{stderr}");
}

#[test]
fn trains_on_hpsv2_with_the_prompts_of_the_batch() {
    let out = tmp("train-hpsv2");
    let spec = format!(
        "hpsv2={}",
        fixtures().join("open-clip-tiny/hpsv2-style.pt").display()
    );
    let o = draft(&[
        "train",
        "--model",
        fixtures().join("sd1-tiny").to_str().unwrap(),
        "--device",
        "cpu",
        "--steps",
        "3",
        "--batch",
        "2",
        "--prompt",
        "a red circle on a blue background",
        "--prompt",
        "a photo of a cat",
        "--reward",
        "hpsv2",
        "--reward",
        "colorfulness=0.5",
        "--reward-model",
        &spec,
        "--train-steps",
        "2",
        "--preview",
        "2",
        "--out-dir",
        out.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    // The before/after report names each term.
    assert!(stderr.contains("| hpsv2 |"), "{stderr}");
    assert!(stderr.contains("| colorfulness (×0.5) |"), "{stderr}");
    assert!(out.join("pytorch_lora_weights.safetensors").is_file());
}
