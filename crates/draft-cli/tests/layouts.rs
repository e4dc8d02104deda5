//! The layouts users have, loaded end to end with `draft sample` as a user would: a folder
//! saved by transformers 5, a sharded fp16 Hub-style snapshot (`--variant fp16`), PyTorch
//! `.bin` weights, single-file LDM checkpoints (`.safetensors`, `.ckpt` with EMA entries, SD-2.x
//! with its OpenCLIP tower), and kohya LoRA files. Each reproduces the images diffusers made
//! from the same files (`tests/fixtures/make_layout_fixtures.py`), CPU backend.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn layouts() -> PathBuf {
    fixtures().join("layouts")
}

fn draft(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_draft"))
        .args(args)
        .output()
        .expect("run draft")
}

fn scratch(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("draft-layouts-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Reads tensor `key` of a safetensors file as f32 values and its shape.
fn tensor(path: &Path, key: &str) -> (Vec<f32>, Vec<usize>) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(key).unwrap();
    assert_eq!(t.dtype(), safetensors::Dtype::F32, "{key}");
    (f32s(t.data()), t.shape().to_vec())
}

/// `draft sample` with run "a" of `reference_of`'s reference.json (its prompts, steps, guidance
/// and initial noise) and `model_args`; returns the images [B, H, W, 3].
fn sample_run_a(reference_of: &str, model_args: &[&str], test: &str) -> (Vec<f32>, Vec<usize>) {
    let dir = fixtures().join(reference_of);
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
    let prompts: Vec<&str> = json["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    let run = &json["runs"]["a"];
    let steps = run["num_inference_steps"].as_u64().unwrap().to_string();
    let guidance = run["guidance_scale"].as_f64().unwrap().to_string();
    let out = scratch(test);
    let images = out.join("images.safetensors");
    let noise = dir.join("init_noise.safetensors");
    let mut args = vec![
        "sample",
        "--prompt",
        prompts[0],
        "--prompt",
        prompts[1],
        "--steps",
        &steps,
        "--guidance",
        &guidance,
        "--init-noise",
        noise.to_str().unwrap(),
        "--out",
    ];
    let png = out.join("grid.png");
    args.push(png.to_str().unwrap());
    args.extend(["--out-tensor", images.to_str().unwrap(), "--device", "cpu"]);
    args.extend_from_slice(model_args);
    let o = draft(&args);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{model_args:?}:\n{stderr}");
    assert!(
        !stderr.contains("XDG_RUNTIME_DIR"),
        "noise on stderr:\n{stderr}"
    );
    tensor(&images, "images")
}

fn assert_images(what: &str, got: (Vec<f32>, Vec<usize>), want: (Vec<f32>, Vec<usize>)) {
    assert_eq!(got.1, want.1, "{what}: shape");
    let err = got
        .0
        .iter()
        .zip(&want.0)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    eprintln!("{what}: max abs error {err:.2e}");
    assert!(err <= 1e-4, "{what}: max abs error {err}");
}

fn sd1_images() -> (Vec<f32>, Vec<usize>) {
    tensor(
        &fixtures().join("sd1-tiny/reference.safetensors"),
        "images_a",
    )
}

fn safetensors_keys(path: &Path) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    st.names().into_iter().map(String::from).collect()
}

#[test]
fn transformers5_folder_samples_like_diffusers() {
    let dir = layouts().join("sd1-tf5");
    // The fixture is what transformers ≥ 5 writes: no `text_model.` level.
    let keys = safetensors_keys(&dir.join("text_encoder/model.safetensors"));
    assert!(
        keys.iter()
            .any(|k| k == "embeddings.token_embedding.weight")
    );
    assert!(!keys.iter().any(|k| k.starts_with("text_model.")));
    let got = sample_run_a("sd1-tiny", &["--model", dir.to_str().unwrap()], "tf5");
    assert_images("sd1-tf5", got, sd1_images());
}

#[test]
fn sharded_fp16_variant_samples_like_diffusers() {
    let dir = layouts().join("sd1-sharded-fp16");
    let want = tensor(&dir.join("reference.safetensors"), "a");
    let model = dir.to_str().unwrap();
    let got = sample_run_a("sd1-tiny", &["--model", model, "--variant", "fp16"], "fp16");
    assert_images("sd1-sharded-fp16 --variant fp16", got, want.clone());
    // Without --variant, a folder with only fp16 weights loads them.
    let got = sample_run_a("sd1-tiny", &["--model", model], "fp16-default");
    assert_images("sd1-sharded-fp16", got, want);
    // A variant the folder does not have is refused, naming it.
    let o = draft(&[
        "sample",
        "--model",
        model,
        "--variant",
        "bf16",
        "--prompt",
        "x",
        "--steps",
        "2",
        "--device",
        "cpu",
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        stderr.contains("unet") && stderr.contains("bf16") && !stderr.contains("panicked"),
        "{stderr}"
    );
}

#[test]
fn pytorch_bin_folder_samples_like_diffusers() {
    let dir = layouts().join("sd1-bin");
    assert!(dir.join("unet/diffusion_pytorch_model.bin").is_file());
    let got = sample_run_a("sd1-tiny", &["--model", dir.to_str().unwrap()], "bin");
    assert_images("sd1-bin", got, sd1_images());
}

#[test]
fn single_file_checkpoints_sample_like_the_diffusers_folder() {
    let config = fixtures().join("sd1-tiny");
    let config = config.to_str().unwrap();
    // The .ckpt holds the weights in f16 (as the fp16 snapshot) and perturbed `model_ema.*`
    // copies, which must be ignored (diffusers' default); a `state_dict` nesting too.
    let fp16 = tensor(
        &layouts().join("sd1-sharded-fp16/reference.safetensors"),
        "a",
    );
    for (file, want) in [
        ("sd1-tiny.safetensors", sd1_images()),
        ("sd1-tiny.ckpt", fp16),
    ] {
        let path = layouts().join(file);
        let got = sample_run_a(
            "sd1-tiny",
            &["--model", path.to_str().unwrap(), "--model-config", config],
            file,
        );
        assert_images(file, got, want);
    }
    let sd2 = layouts().join("sd2-tiny.safetensors");
    let config = fixtures().join("sd2-tiny");
    let got = sample_run_a(
        "sd2-tiny",
        &[
            "--model",
            sd2.to_str().unwrap(),
            "--model-config",
            config.to_str().unwrap(),
        ],
        "sd2",
    );
    let want = tensor(
        &fixtures().join("sd2-tiny/reference.safetensors"),
        "images_a",
    );
    assert_images("sd2-tiny.safetensors (OpenCLIP tower)", got, want);
}

#[test]
fn single_file_without_config_is_inferred_or_refused_clearly() {
    // Without --model-config the standard CLIP tokenizer (49408 tokens) comes with the binary,
    // but the tiny model's text encoder has 1014: refused before sampling, with one error line.
    let path = layouts().join("sd1-tiny.safetensors");
    let o = draft(&[
        "sample",
        "--model",
        path.to_str().unwrap(),
        "--prompt",
        "x",
        "--steps",
        "2",
        "--device",
        "cpu",
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        stderr.lines().filter(|l| l.starts_with("error")).count(),
        1,
        "{stderr}"
    );
    assert!(stderr.contains("vocab_size 1014"), "{stderr}");
    // A file that is no checkpoint is refused with what it lacks.
    let lora = fixtures().join("draft/lora_a.safetensors");
    let o = draft(&[
        "sample",
        "--model",
        lora.to_str().unwrap(),
        "--prompt",
        "x",
        "--device",
        "cpu",
    ]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(stderr.contains("model.diffusion_model"), "{stderr}");
}

#[test]
fn kohya_lora_samples_like_diffusers_load_lora_weights() {
    let model = fixtures().join("sd1-tiny");
    let kohya = layouts().join("lora_kohya.safetensors");
    let want = tensor(&layouts().join("lora_kohya_images.safetensors"), "a");
    let got = sample_run_a(
        "sd1-tiny",
        &[
            "--model",
            model.to_str().unwrap(),
            "--lora",
            kohya.to_str().unwrap(),
        ],
        "kohya",
    );
    assert_images("kohya LoRA", got, want.clone());
    // The same LoRA in diffusers' layout gives the same images.
    let peft = fixtures().join("draft/lora_targets.safetensors");
    let got = sample_run_a(
        "sd1-tiny",
        &[
            "--model",
            model.to_str().unwrap(),
            "--lora",
            peft.to_str().unwrap(),
        ],
        "peft",
    );
    assert_images("diffusers LoRA", got, want);
}

/// `--device auto` on a machine without a display: wgpu's adapter probe must not print
/// libwayland's "XDG_RUNTIME_DIR is invalid or not set" (Mesa's Vulkan drivers, lavapipe
/// included, probe for a Wayland display when wgpu enables VK_KHR_wayland_surface).
#[test]
fn device_auto_is_quiet_without_a_display() {
    let model = fixtures().join("sd1-tiny");
    let out = scratch("auto");
    let png = out.join("x.png");
    let o = Command::new(env!("CARGO_BIN_EXE_draft"))
        .args([
            "sample",
            "--model",
            model.to_str().unwrap(),
            "--prompt",
            "x",
            "--steps",
            "2",
            "--out",
            png.to_str().unwrap(),
        ])
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("WAYLAND_DISPLAY")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(!stderr.contains("XDG_RUNTIME_DIR"), "{stderr}");
}

/// `draft train --init-lora` continues from a kohya file (here sd-scripts' layout with alpha 2 ≠
/// rank 4) as from the diffusers file of the same LoRA: the first update's reward is the same.
#[test]
fn init_lora_reads_kohya_files() {
    let model = fixtures().join("sd1-tiny");
    let first_reward = |lora: &Path, test: &str| -> f64 {
        let out = scratch(test);
        let o = draft(&[
            "train",
            "--model",
            model.to_str().unwrap(),
            "--device",
            "cpu",
            "--steps",
            "3",
            "--batch",
            "1",
            "--prompt",
            "a red circle",
            "--lora-targets",
            "attn,ff,proj,conv,text",
            "--init-lora",
            lora.to_str().unwrap(),
            "--train-steps",
            "1",
            "--preview",
            "0",
            "--out-dir",
            out.to_str().unwrap(),
        ]);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.success(), "{stderr}");
        assert!(out.join("lora_kohya.safetensors").is_file());
        let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        let m: serde_json::Value = serde_json::from_str(metrics.lines().next().unwrap()).unwrap();
        m["reward_mean"].as_f64().unwrap()
    };
    let peft = first_reward(
        &fixtures().join("draft/lora_targets.safetensors"),
        "init-peft",
    );
    let kohya = first_reward(
        &layouts().join("lora_kohya_sd_scripts.safetensors"),
        "init-kohya",
    );
    assert!((peft - kohya).abs() <= 1e-5, "{peft} vs {kohya}");
}

/// `--variant fp16` takes the variant where a component has it and the plain files elsewhere
/// (diffusers does the same); here only the UNet has a variant file, and its plain file is
/// damaged, so the images prove which file was read.
#[test]
fn variant_falls_back_to_plain_files_per_component() {
    let dir = scratch("variant-mix");
    let src = fixtures().join("sd1-tiny");
    for entry in [
        "model_index.json",
        "scheduler",
        "text_encoder",
        "tokenizer",
        "unet",
        "vae",
    ] {
        let from = src.join(entry);
        if from.is_dir() {
            std::fs::create_dir_all(dir.join(entry)).unwrap();
            for f in std::fs::read_dir(&from).unwrap() {
                let f = f.unwrap();
                std::fs::copy(f.path(), dir.join(entry).join(f.file_name())).unwrap();
            }
        } else {
            std::fs::copy(&from, dir.join(entry)).unwrap();
        }
    }
    let unet = dir.join("unet/diffusion_pytorch_model.safetensors");
    std::fs::rename(
        &unet,
        dir.join("unet/diffusion_pytorch_model.fp16.safetensors"),
    )
    .unwrap();
    std::fs::write(&unet, b"not a safetensors file").unwrap();
    let model = dir.to_str().unwrap();
    let got = sample_run_a("sd1-tiny", &["--model", model, "--variant", "fp16"], "mix");
    assert_images(
        "unet fp16 variant + plain vae/text_encoder",
        got,
        sd1_images(),
    );
}
