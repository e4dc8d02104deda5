//! Faults, soaked: `draft train` killed with SIGKILL at many random moments (some of them
//! while the checkpoint is being written) and resumed each time ends with the LoRA of an
//! uninterrupted run, bit for bit (CPU backend); an out-dir that fills up or turns read-only
//! mid-run gives a clear error, leaves the last good checkpoint readable, and the run resumes
//! from it elsewhere to the same LoRA.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const TRAIN_STEPS: usize = 24;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn tmp(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("draft-faults-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A short run on the tiny fixture with a checkpoint after every update, an evaluation set
/// (so the "before" evaluation and the early-stop reference must survive the kills too).
fn train_args(out: &Path, train_steps: usize) -> Vec<String> {
    let model = fixtures().join("sd1-tiny");
    [
        "train",
        "--model",
        model.to_str().unwrap(),
        "--device",
        "cpu",
        "--threads",
        "1",
        "--method",
        "draft-k",
        "--k",
        "2",
        "--steps",
        "3",
        "--batch",
        "1",
        "--prompt",
        "a red circle",
        "--prompt",
        "a blue square",
        "--lr",
        "0.01",
        "--seed",
        "7",
        "--preview",
        "2",
        "--eval-every",
        "5",
        "--min-diversity",
        "0.01",
        "--checkpoint-every",
        "1",
        "--train-steps",
        &train_steps.to_string(),
        "--out-dir",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn draft(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_draft"))
        .args(args)
        .output()
        .expect("run draft")
}

fn lora_files(dir: &Path) -> [Vec<u8>; 2] {
    ["pytorch_lora_weights.safetensors", "lora_kohya.safetensors"]
        .map(|f| std::fs::read(dir.join(f)).unwrap_or_else(|e| panic!("{f}: {e}")))
}

/// The uninterrupted run every faulted run must reproduce.
fn reference(root: &Path) -> (PathBuf, Duration) {
    let dir = root.join("full");
    let start = Instant::now();
    let o = draft(&train_args(&dir, TRAIN_STEPS));
    let took = start.elapsed();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    (dir, took)
}

/// The checkpoint, if any, parses as a safetensors file with the run's metadata.
fn assert_checkpoint_readable(dir: &Path) {
    let path = dir.join("checkpoint.safetensors");
    if let Ok(bytes) = std::fs::read(&path) {
        let w = draft_core::model::weights::Weights::from_bytes("checkpoint", &bytes)
            .unwrap_or_else(|e| panic!("{}: unreadable after a fault: {e}", path.display()));
        assert!(!w.keys().is_empty());
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        let meta = meta.metadata().clone().unwrap_or_default();
        assert!(meta.contains_key("step") && meta.contains_key("config"));
    }
}

/// Steps logged in `metrics.jsonl`, in order.
fn logged_steps(dir: &Path) -> Vec<u64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

/// SplitMix64, for reproducible kill times.
fn next(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[test]
fn sigkill_at_random_moments_then_resume_gives_the_same_lora() {
    let root = tmp("soak");
    let (full, took) = reference(&root);
    let per_step = took / TRAIN_STEPS as u32;
    eprintln!("uninterrupted: {took:.2?} for {TRAIN_STEPS} steps");

    let part = root.join("part");
    let ckpt_tmp = part.join("checkpoint.tmp");
    let mut rng = 0x5eed_u64;
    let (mut kills, mut kills_in_write, mut lives) = (0, 0, 0);
    let mut resumed_steps = Vec::new();
    let started = Instant::now();
    loop {
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "soak took too long"
        );
        lives += 1;
        let mut args = train_args(&part, TRAIN_STEPS);
        args.push("--resume".into());
        let mut child = Command::new(env!("CARGO_BIN_EXE_draft"))
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let life = Instant::now();
        // Every third life: kill the moment a checkpoint write is seen in progress (the
        // temporary file exists); the others: at a random moment within about two updates
        // (start-up, the before evaluation, sampling, the backward or a write).
        let in_write = lives % 3 == 0;
        // After enough faults, the last life runs to the end.
        let finish = kills >= 22;
        let deadline = per_step.mul_f64(0.2 + 2.5 * (next(&mut rng) % 1000) as f64 / 1000.0);
        let mut caught_write = false;
        let exited = loop {
            if finish {
                break Some(child.wait().unwrap());
            }
            if let Some(status) = child.try_wait().unwrap() {
                break Some(status);
            }
            if in_write {
                if ckpt_tmp.exists() {
                    caught_write = true;
                    break None;
                }
                if life.elapsed() > per_step * 6 {
                    break None;
                }
                std::thread::sleep(Duration::from_micros(200));
            } else {
                if life.elapsed() >= deadline {
                    break None;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        match exited {
            Some(status) => {
                assert!(status.success(), "a resumed life failed: {status}");
                break;
            }
            None => {
                let _ = child.kill(); // SIGKILL
                let _ = child.wait();
                kills += 1;
                kills_in_write += caught_write as usize;
                assert_checkpoint_readable(&part);
                if let Ok(bytes) = std::fs::read(part.join("checkpoint.safetensors")) {
                    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
                    let step = meta.metadata().as_ref().unwrap()["step"].clone();
                    resumed_steps.push(step);
                }
            }
        }
    }
    eprintln!(
        "{kills} SIGKILLs ({kills_in_write} during a checkpoint write) over {lives} lives; checkpoint steps seen after the kills: {resumed_steps:?}"
    );
    assert!(kills >= 20, "only {kills} kills before the run finished");
    assert!(
        kills_in_write >= 3,
        "only {kills_in_write} kills during a write"
    );
    assert_eq!(
        lora_files(&part),
        lora_files(&full),
        "the resumed LoRA differs from the uninterrupted one"
    );
    assert_eq!(
        logged_steps(&part),
        (1..=TRAIN_STEPS as u64).collect::<Vec<_>>()
    );
    assert!(!ckpt_tmp.exists(), "a temporary checkpoint was left behind");
    let _ = std::fs::remove_dir_all(&root);
}

/// Runs `script` as root in a private mount namespace (`unshare`), so that it can mount a
/// small tmpfs whatever the test's user; `None` where this machine allows no namespace.
fn in_mount_namespace(script: &str) -> Option<Output> {
    let root = is_root();
    let mut cmd = Command::new("unshare");
    if root {
        cmd.arg("--mount");
    } else {
        cmd.args(["--user", "--map-root-user", "--mount"]);
    }
    let probe = Command::new("unshare")
        .args(cmd.get_args())
        .arg("true")
        .output();
    match probe {
        Ok(o) if o.status.success() => {}
        other => {
            eprintln!("SKIPPED: no mount namespace on this machine ({other:?})");
            return None;
        }
    }
    Some(cmd.args(["sh", "-c", script]).output().unwrap())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A run whose out-dir fills up (`fault = "full"`) or turns read-only (`"ro"`) after its
/// second checkpoint: a clear error naming the file and the cause, no panic, the last good
/// checkpoint intact, and, resumed elsewhere, the uninterrupted LoRA.
fn disk_fault(fault: &str, cause: &str) {
    let root = tmp(&format!("disk-{fault}"));
    let mnt = root.join("mnt");
    let saved = root.join("saved");
    std::fs::create_dir_all(&mnt).unwrap();
    let args: Vec<String> = train_args(&mnt.join("run"), TRAIN_STEPS)
        .iter()
        .map(|a| format!("'{a}'"))
        .collect();
    let act = match fault {
        "full" => format!(
            "dd if=/dev/zero of='{}/filler' bs=64k 2>/dev/null || true",
            mnt.display()
        ),
        // A read-only file system mounted over the run folder: every file the run creates or
        // replaces from now on is refused with EROFS (a remount of the tmpfs itself is refused
        // while the run holds `metrics.jsonl` open for writing).
        _ => format!("mount -t tmpfs -o ro tmpfs '{}/run'", mnt.display()),
    };
    let undo = match fault {
        "full" => String::new(),
        _ => format!("umount '{}/run'", mnt.display()),
    };
    let script = format!(
        r#"set -u
mount -t tmpfs -o size=8m tmpfs '{mnt}' || exit 90
'{draft}' {args} 2>'{root}/stderr' &
pid=$!
n=0
until grep -q '"step":2' '{mnt}/run/metrics.jsonl' 2>/dev/null; do
  sleep 0.02; n=$((n+1)); [ $n -lt 15000 ] || {{ kill -9 $pid; exit 91; }}
done
{act} || {{ kill -9 $pid; exit 92; }}
wait $pid
echo "exit=$?" > '{root}/status'
{undo}
mkdir -p '{saved}' && cp -r '{mnt}/run/.' '{saved}/'
"#,
        mnt = mnt.display(),
        draft = env!("CARGO_BIN_EXE_draft"),
        args = args.join(" "),
        root = root.display(),
        saved = saved.display(),
    );
    let Some(o) = in_mount_namespace(&script) else {
        return;
    };
    assert!(
        o.status.success(),
        "fault script failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    let status = std::fs::read_to_string(root.join("status")).unwrap();
    let stderr = std::fs::read_to_string(root.join("stderr")).unwrap();
    eprintln!(
        "[{fault}] {}: {}",
        status.trim(),
        stderr.lines().last().unwrap_or("")
    );
    assert_eq!(
        status.trim(),
        "exit=1",
        "draft must fail with an error:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    let error: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(error.len(), 1, "one error line:\n{stderr}");
    assert!(
        error[0].contains(cause) && error[0].contains("/run/"),
        "the error names the file and the cause: {}",
        error[0]
    );
    assert_checkpoint_readable(&saved);
    assert!(
        !saved.join("checkpoint.tmp").exists(),
        "a partial checkpoint was left behind"
    );

    // The last good checkpoint resumes, on a healthy disk, to the uninterrupted run's LoRA.
    let (full, _) = reference(&root);
    let mut args = train_args(&saved, TRAIN_STEPS);
    args.push("--resume".into());
    let o = draft(&args);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(stderr.contains("resumed from"), "{stderr}");
    // The evaluation before training came back from the checkpoint: the report is complete.
    assert!(
        stderr.contains("reward before → after") && stderr.contains("| diversity |"),
        "{stderr}"
    );
    assert_eq!(lora_files(&saved), lora_files(&full));
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn a_full_out_dir_stops_with_a_clear_error_and_the_checkpoint_resumes() {
    disk_fault("full", "No space left on device");
}

#[test]
fn a_read_only_out_dir_stops_with_a_clear_error_and_the_checkpoint_resumes() {
    disk_fault("ro", "Read-only file system");
}
