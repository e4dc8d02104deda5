//! `draft convert IN OUT.safetensors`: PyTorch pickles written as safetensors hold exactly the
//! tensors of the fixtures' safetensors twins (names, dtypes, shapes, bytes); bad arguments end
//! with one error line naming the file, and leave OUT as it was.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn tmp(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("draft-convert-test-{}-{test}", std::process::id()));
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

fn convert(input: &Path, output: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["convert", input.to_str().unwrap(), output.to_str().unwrap()];
    args.extend_from_slice(extra);
    draft(&args)
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Exit ≠ 0, no panic, exactly one `error:` line, mentioning every needle.
fn expect_error(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure:\n{err}");
    assert!(!err.contains("panicked"), "panic:\n{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line:\n{err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    for n in needles {
        assert!(lines[0].contains(n), "{n:?} not in {err}");
    }
}

/// Every tensor of the two safetensors files, names, dtypes, shapes and bytes, is the same.
fn assert_same_tensors(got: &[u8], want: &[u8]) {
    let got = safetensors::SafeTensors::deserialize(got).unwrap();
    let want = safetensors::SafeTensors::deserialize(want).unwrap();
    let mut g = got.names();
    let mut w = want.names();
    g.sort();
    w.sort();
    assert_eq!(g, w, "tensor names");
    assert!(!w.is_empty());
    for name in w {
        let (a, b) = (got.tensor(name).unwrap(), want.tensor(name).unwrap());
        assert_eq!(a.dtype(), b.dtype(), "{name}");
        assert_eq!(a.shape(), b.shape(), "{name}");
        assert!(a.data() == b.data(), "{name}: values differ");
    }
}

fn converts_to_its_twin(pickle: &Path, twin: &Path, test: &str) {
    let dir = tmp(test);
    let out = dir.join("nested/out.safetensors");
    let o = convert(pickle, &out, &[]);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    let want = std::fs::read(twin).unwrap();
    let n = safetensors::SafeTensors::deserialize(&want)
        .unwrap()
        .names()
        .len();
    assert!(
        err.contains(&format!("draft: wrote {} ({n} tensors, ", out.display()))
            && err.ends_with(" MB)\n"),
        "{err}"
    );
    assert_same_tensors(&std::fs::read(&out).unwrap(), &want);
    // Nothing but OUT is left behind.
    let left: Vec<_> = std::fs::read_dir(dir.join("nested"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["out.safetensors"]);
}

#[test]
fn hpsv2_checkpoint_equals_its_safetensors() {
    // torch.save({"state_dict": sd, "epoch": 1}), as HPSv2 ships it: the nesting is dropped.
    let oc = fixtures().join("open-clip-tiny");
    converts_to_its_twin(
        &oc.join("hpsv2-style.pt"),
        &oc.join("open_clip_model.safetensors"),
        "hpsv2",
    );
}

#[test]
fn diffusers_bin_equals_its_safetensors() {
    // diffusers save_pretrained(safe_serialization=False): a flat state dict.
    converts_to_its_twin(
        &fixtures().join("layouts/sd1-bin/vae/diffusion_pytorch_model.bin"),
        &fixtures().join("sd1-tiny/vae/diffusion_pytorch_model.safetensors"),
        "bin",
    );
}

#[test]
fn existing_output_needs_force() {
    let dir = tmp("force");
    let pt = fixtures().join("open-clip-tiny/hpsv2-style.pt");
    let out = dir.join("out.safetensors");
    std::fs::write(&out, b"keep me").unwrap();
    let o = convert(&pt, &out, &[]);
    expect_error(&o, &[out.to_str().unwrap(), "already exists", "--force"]);
    assert_eq!(std::fs::read(&out).unwrap(), b"keep me");

    let o = convert(&pt, &out, &["--force"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let want =
        std::fs::read(fixtures().join("open-clip-tiny/open_clip_model.safetensors")).unwrap();
    assert_same_tensors(&std::fs::read(&out).unwrap(), &want);
}

#[test]
fn output_must_be_safetensors() {
    let dir = tmp("ext");
    let pt = fixtures().join("open-clip-tiny/hpsv2-style.pt");
    for name in ["out.bin", "out", "out.safetensors.tmp"] {
        let out = dir.join(name);
        let o = convert(&pt, &out, &[]);
        expect_error(&o, &[out.to_str().unwrap(), ".safetensors"]);
        assert!(!out.exists(), "{name} written");
    }
    // A folder named like one is not overwritten either.
    let out = dir.join("folder.safetensors");
    std::fs::create_dir(&out).unwrap();
    expect_error(
        &convert(&pt, &out, &["--force"]),
        &[out.to_str().unwrap(), "folder"],
    );
}

#[test]
fn bad_inputs_are_refused() {
    let dir = tmp("inputs");
    let out = dir.join("out.safetensors");

    let st = fixtures().join("open-clip-tiny/open_clip_model.safetensors");
    expect_error(
        &convert(&st, &out, &[]),
        &[st.to_str().unwrap(), "already safetensors"],
    );

    let garbage = dir.join("weights.pth");
    std::fs::write(&garbage, b"this is not a pickle\n{}\x80\x02").unwrap();
    expect_error(
        &convert(&garbage, &out, &[]),
        &[garbage.to_str().unwrap(), "PyTorch"],
    );

    let missing = dir.join("missing.pt");
    expect_error(
        &convert(&missing, &out, &[]),
        &[missing.to_str().unwrap(), "not found"],
    );

    let png = dir.join("image.png");
    std::fs::write(&png, b"\x89PNG").unwrap();
    expect_error(&convert(&png, &out, &[]), &[png.to_str().unwrap(), ".pt"]);

    // None of them wrote anything.
    let mut left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    left.sort();
    assert_eq!(left, ["image.png", "weights.pth"]);
}

#[test]
fn help_describes_the_command() {
    let o = draft(&["convert", "--help"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", stderr(&o));
    for needle in ["OUT.safetensors", "--force", ".pth"] {
        assert!(text.contains(needle), "{needle:?} not in\n{text}");
    }
    let o = draft(&["--help"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("convert"));
}
