//! The `draft` binary end to end: `draft sample` reproduces a diffusers run from the command
//! line, and bad input ends with a non-zero exit and one clear line naming the file and the
//! key at fault — never a panic.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn draft(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_draft"))
        .args(args)
        .output()
        .expect("run draft")
}

/// A scratch copy of a fixture pipeline that a test may damage.
fn scratch(name: &str, test: &str) -> PathBuf {
    let dst = std::env::temp_dir().join(format!("draft-cli-test-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    copy_dir(&fixtures().join(name), &dst);
    dst
}

fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for entry in std::fs::read_dir(src).unwrap() {
        let entry = entry.unwrap();
        let to = dst.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &to);
        } else {
            std::fs::copy(entry.path(), to).unwrap();
        }
    }
}

/// Runs `draft sample` on `model` and checks the failure: exit ≠ 0, one line on stderr that
/// mentions every `needle`, no panic.
fn expect_error(model: &Path, extra: &[&str], needles: &[&str]) {
    let model = model.to_str().unwrap();
    let mut args = vec![
        "sample", "--model", model, "--prompt", "x", "--steps", "2", "--device", "cpu",
    ];
    args.extend_from_slice(extra);
    let out = draft(&args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "expected failure, stderr:\n{stderr}");
    assert!(
        !stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"),
        "panic:\n{stderr}"
    );
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(
        errors.len(),
        1,
        "expected one error line, stderr:\n{stderr}"
    );
    for n in needles {
        assert!(
            errors[0].contains(n),
            "error line lacks {n:?}: {}",
            errors[0]
        );
    }
}

#[test]
fn sample_reproduces_diffusers_from_the_command_line() {
    let err = sample_vs_diffusers("f32", &[]);
    assert!(err <= 1e-4, "max abs error {err}");
}

/// `--weights-dtype f16`: the weight matrices and kernels rounded to f16 move the images by
/// about 1e-3 (crates/draft-core/tests/weights_dtype.rs checks the arithmetic itself).
#[test]
fn sample_with_f16_weights_stays_close_to_diffusers() {
    let err = sample_vs_diffusers("f16", &["--weights-dtype", "f16"]);
    eprintln!("--weights-dtype f16 vs diffusers (f32): max abs error {err:.1e}");
    assert!(err <= 1e-2, "max abs error {err}");
}

/// sd1-tiny's run "a" from the command line; returns the max abs error against diffusers.
fn sample_vs_diffusers(tag: &str, extra: &[&str]) -> f32 {
    let dir = fixtures().join("sd1-tiny");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
    let prompts: Vec<&str> = json["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap())
        .collect();
    let steps = json["runs"]["a"]["num_inference_steps"]
        .as_u64()
        .unwrap()
        .to_string();
    let guidance = json["runs"]["a"]["guidance_scale"]
        .as_f64()
        .unwrap()
        .to_string();
    let out_dir =
        std::env::temp_dir().join(format!("draft-cli-sample-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&out_dir).unwrap();
    let png = out_dir.join("grid.png");
    let tensor = out_dir.join("images.safetensors");
    let noise = dir.join("init_noise.safetensors");
    let mut args = vec![
        "sample",
        "--model",
        dir.to_str().unwrap(),
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
        png.to_str().unwrap(),
        "--out-tensor",
        tensor.to_str().unwrap(),
        "--device",
        "cpu",
    ];
    args.extend_from_slice(extra);
    let out = draft(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(std::fs::metadata(&png).unwrap().len() > 100);

    let got = std::fs::read(&tensor).unwrap();
    let got = safetensors::SafeTensors::deserialize(&got).unwrap();
    let got = got.tensor("images").unwrap();
    let reference = std::fs::read(dir.join("reference.safetensors")).unwrap();
    let reference = safetensors::SafeTensors::deserialize(&reference).unwrap();
    let want = reference.tensor("images_a").unwrap();
    assert_eq!(got.shape(), want.shape());
    let f = |b: &[u8]| {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect::<Vec<_>>()
    };
    f(got.data())
        .iter()
        .zip(f(want.data()))
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max)
}

#[test]
fn missing_model_folder() {
    expect_error(
        Path::new("/nonexistent/model"),
        &[],
        &["/nonexistent/model", "not found"],
    );
}

#[test]
fn missing_weights_file() {
    let m = scratch("sd1-tiny", "missing-file");
    std::fs::remove_file(m.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    expect_error(
        &m,
        &[],
        &["unet/diffusion_pytorch_model.safetensors", "missing"],
    );
}

#[test]
fn truncated_safetensors() {
    let m = scratch("sd1-tiny", "truncated");
    let path = m.join("vae/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    expect_error(&m, &[], &["vae/diffusion_pytorch_model.safetensors"]);
}

#[test]
fn corrupt_safetensors_header() {
    let m = scratch("sd1-tiny", "corrupt");
    let path = m.join("text_encoder/model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[8..20].copy_from_slice(b"not json at ");
    std::fs::write(&path, &bytes).unwrap();
    expect_error(&m, &[], &["text_encoder/model.safetensors"]);
}

#[test]
fn header_claims_more_bytes_than_the_file_has() {
    let m = scratch("sd1-tiny", "header-size");
    let path = m.join("unet/diffusion_pytorch_model.safetensors");
    let mut bytes = std::fs::read(&path).unwrap();
    let claimed = bytes.len() as u64 * 2;
    bytes[..8].copy_from_slice(&claimed.to_le_bytes());
    std::fs::write(&path, &bytes).unwrap();
    expect_error(&m, &[], &["unet/diffusion_pytorch_model.safetensors"]);
}

/// Rewrites one safetensors file keeping every tensor but `drop`, and renaming/reshaping as asked.
fn rewrite_tensors(
    path: &Path,
    edit: impl Fn(&str, Vec<usize>, Vec<u8>) -> Option<(String, Vec<usize>, Vec<u8>)>,
) {
    let bytes = std::fs::read(path).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut kept = Vec::new();
    for (name, view) in st.tensors() {
        if let Some(t) = edit(&name, view.shape().to_vec(), view.data().to_vec()) {
            kept.push((t, view.dtype()));
        }
    }
    let views: Vec<_> = kept
        .iter()
        .map(|((n, s, d), dtype)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(*dtype, s.clone(), d).unwrap(),
            )
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

#[test]
fn missing_tensor() {
    let m = scratch("sd1-tiny", "missing-tensor");
    let key = "mid_block.attentions.0.proj_in.weight";
    rewrite_tensors(
        &m.join("unet/diffusion_pytorch_model.safetensors"),
        |n, s, d| (n != key).then(|| (n.to_string(), s, d)),
    );
    expect_error(
        &m,
        &[],
        &["unet/diffusion_pytorch_model.safetensors", key, "missing"],
    );
}

#[test]
fn misshaped_tensor() {
    let m = scratch("sd1-tiny", "misshaped");
    let key = "conv_in.weight";
    rewrite_tensors(
        &m.join("unet/diffusion_pytorch_model.safetensors"),
        |n, s, d| {
            if n == key {
                // Same bytes, claimed as a different (but consistent) shape.
                let total: usize = s.iter().product();
                Some((n.to_string(), vec![total / 2, 2], d))
            } else {
                Some((n.to_string(), s, d))
            }
        },
    );
    expect_error(&m, &[], &[key, "shape"]);
}

#[test]
fn malformed_config_json() {
    let m = scratch("sd1-tiny", "bad-json");
    std::fs::write(
        m.join("unet/config.json"),
        "{ \"block_out_channels\": [32, ",
    )
    .unwrap();
    expect_error(&m, &[], &["unet/config.json"]);
}

#[test]
fn inconsistent_config() {
    let m = scratch("sd1-tiny", "inconsistent");
    let path = m.join("unet/config.json");
    let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    c["block_out_channels"] = serde_json::json!([32, 64, 64]);
    std::fs::write(&path, c.to_string()).unwrap();
    expect_error(&m, &[], &["unet/config.json", "block_out_channels"]);
}

#[test]
fn unknown_block_type() {
    let m = scratch("sd1-tiny", "block-type");
    let path = m.join("unet/config.json");
    let mut c: serde_json::Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    c["down_block_types"][0] = serde_json::json!("AttnDownBlock2D");
    std::fs::write(&path, c.to_string()).unwrap();
    expect_error(&m, &[], &["unet/config.json", "AttnDownBlock2D"]);
}

#[test]
fn init_noise_of_the_wrong_shape() {
    let m = fixtures().join("sd1-tiny");
    let noise = std::env::temp_dir().join(format!(
        "draft-cli-noise-{}.safetensors",
        std::process::id()
    ));
    let data = vec![0u8; 4 * 3 * 5 * 5 * 4];
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4, 3, 5, 5], &data)
            .unwrap();
    std::fs::write(
        &noise,
        safetensors::serialize([("noise", view)], None).unwrap(),
    )
    .unwrap();
    expect_error(
        &m,
        &["--init-noise", noise.to_str().unwrap()],
        &[noise.to_str().unwrap(), "noise", "shape"],
    );
}

/// Runs `draft sample` on sd1-tiny and returns the `images` tensor's raw bytes.
fn sample_bytes(tag: &str, extra: &[&str]) -> Vec<u8> {
    let model = fixtures().join("sd1-tiny");
    let out = std::env::temp_dir().join(format!(
        "draft-cli-{tag}-{}.safetensors",
        std::process::id()
    ));
    let png = out.with_extension("png");
    let mut args = vec![
        "sample",
        "--model",
        model.to_str().unwrap(),
        "--prompt",
        "a red circle",
        "--steps",
        "4",
        "--batch",
        "2",
        "--out",
        png.to_str().unwrap(),
        "--out-tensor",
        out.to_str().unwrap(),
        "--device",
        "cpu",
    ];
    args.extend_from_slice(extra);
    let run = draft(&args);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let bytes = std::fs::read(&out).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let images = st.tensor("images").unwrap();
    assert_eq!(images.shape(), [2, 32, 32, 3]);
    images.data().to_vec()
}

#[test]
fn seeds_and_eta_noise_are_reproducible() {
    let a = sample_bytes("eta-a", &["--seed", "3", "--eta", "0.5"]);
    let b = sample_bytes("eta-b", &["--seed", "3", "--eta", "0.5"]);
    let deterministic = sample_bytes("eta-0", &["--seed", "3"]);
    let other_seed = sample_bytes("seed-4", &["--seed", "4", "--eta", "0.5"]);
    assert_eq!(a, b, "same seed and eta must give the same images");
    assert_ne!(a, deterministic, "eta > 0 must add noise");
    assert_ne!(a, other_seed, "another seed must give other images");
}
