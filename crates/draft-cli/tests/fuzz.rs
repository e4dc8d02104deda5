//! Property tests ("fuzzing") of the files the `draft` command line reads before handing bytes
//! to the core: the TOML file of `draft train --config`, the PNGs of `draft score`, the
//! `--init-noise` safetensors file, and PyTorch checkpoints (`.pt`/`.pth`, the reward models'
//! weights) converted to safetensors. The core's parsers have their own in
//! crates/draft-core/tests/fuzz.rs.
//!
//! The parsers are called directly through the CLI's library (a process per input would be
//! slow).
//! Inputs are structured mutations of valid files; each must give `Ok` or a one-line error
//! naming the file, never a panic. `DRAFT_FUZZ_SEED` / `DRAFT_FUZZ_SCALE` as in the core's.
use draft_cli::{files, score, train};

use std::cell::Cell;
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use burn::prelude::*;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseResult, TestRng, TestRunner};

static TOTAL: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static ACCEPTED: Cell<usize> = const { Cell::new(0) };
}

/// Counts an input the parser accepted (how deep the mutations get, for the report).
fn accepted() {
    ACCEPTED.with(|a| a.set(a.get() + 1));
}

fn fuzz<S>(parser: &str, cases: u32, strategy: S, test: impl Fn(S::Value) -> TestCaseResult)
where
    S: Strategy,
    S::Value: Debug,
{
    let scale: u32 = std::env::var("DRAFT_FUZZ_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    let seed: u64 = std::env::var("DRAFT_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    let tag = parser.as_bytes();
    key[8..8 + tag.len().min(24)].copy_from_slice(&tag[..tag.len().min(24)]);
    let config = Config {
        cases: cases * scale,
        failure_persistence: None,
        max_shrink_iters: 256,
        ..Config::default()
    };
    let mut runner =
        TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &key));
    let n = Cell::new(0usize);
    ACCEPTED.with(|a| a.set(0));
    let started = std::time::Instant::now();
    let result = runner.run(&strategy, |v| {
        n.set(n.get() + 1);
        test(v)
    });
    let total = TOTAL.fetch_add(n.get(), Ordering::SeqCst) + n.get();
    eprintln!(
        "fuzz {parser}: {} inputs ({} accepted) in {:.1} s, {} (this binary so far: {total})",
        n.get(),
        ACCEPTED.with(Cell::get),
        started.elapsed().as_secs_f64(),
        if result.is_ok() { "0 panics" } else { "FAILED" }
    );
    if let Err(e) = result {
        panic!("fuzz {parser}: {e}");
    }
}

/// `{e:#}` (as `draft` prints it) must be one line naming `file`.
fn check_error(e: &anyhow::Error, file: &str) -> TestCaseResult {
    let msg = format!("{e:#}");
    prop_assert!(!msg.contains('\n'), "not one line: {msg:?}");
    prop_assert!(msg.contains(file), "does not name {file}: {msg:?}");
    Ok(())
}

fn scratch(test: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("draft-fuzz-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// Bytes edits: a run of bytes overwritten, the file cut, bytes inserted.
#[derive(Debug, Clone)]
enum ByteEdit {
    Poke(usize, Vec<u8>),
    Truncate(usize),
    Insert(usize, Vec<u8>),
}

fn byte_edit() -> impl Strategy<Value = ByteEdit> {
    prop_oneof![
        4 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..8)).prop_map(|(i, b)| ByteEdit::Poke(i, b)),
        2 => any::<usize>().prop_map(ByteEdit::Truncate),
        1 => (any::<usize>(), prop::collection::vec(any::<u8>(), 1..8)).prop_map(|(i, b)| ByteEdit::Insert(i, b)),
    ]
}

fn apply_bytes(base: &[u8], edits: &[ByteEdit]) -> Vec<u8> {
    let mut out = base.to_vec();
    for e in edits {
        let n = out.len().max(1);
        match e {
            ByteEdit::Poke(i, b) => {
                let at = i % n;
                for (k, x) in b.iter().enumerate() {
                    if let Some(d) = out.get_mut(at + k) {
                        *d = *x;
                    }
                }
            }
            ByteEdit::Truncate(i) => out.truncate(i % (n + 1)),
            ByteEdit::Insert(i, b) => {
                let at = i % (out.len() + 1);
                out.splice(at..at, b.iter().cloned());
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// `draft train --config FILE.toml`.

/// A config setting every key, valid as it is.
const TRAIN_TOML: &str = r#"method = "draft-lv"
k = 1
lv-samples = 2
t-min = 0
t-max = 4
k-min = 1
k-max = 4
reward = ["colorfulness=1", "smoothness=0.5"]
target-color = "1,0,0"
prompt = ["a red circle", "a blue square"]
negative-prompt = ""
batch = 2
steps = 8
guidance = 7.5
eta = 0.0
train-steps = 3
lr = 0.001
optimizer = "adamw"
weight-decay = 0.01
rank = 4
alpha = 4.0
lora-targets = ["attn", "text"]
clip-grad-norm = 1.0
grad-accum = 1
seed = 0
checkpoint-every = 10
max-bad-steps = 5
preview = 8
eval-every = 10
min-diversity = 0.5
resume = false
"#;

/// TOML values of every kind, hostile ones included.
fn toml_value() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => prop::sample::select(vec![
            "0", "1", "-1", "2", "1000000", "9223372036854775807", "-9223372036854775808",
            "18446744073709551616", "0.0", "-0.5", "1e308", "nan", "inf", "-inf", "true",
            "\"\"", "\"draft-k\"", "\"refl\"", "\"sgd\"", "\"adam\"", "\"colorfulness\"",
            "\"1,2\"", "\"0.5, 0.5, 0.5\"", "\"x\\ny\"", "[]", "[\"\"]", "[\"attn\", \"bogus\"]",
            "[\"colorfulness=nan\"]", "[\"hpsv2\"]", "[1, 2]", "{}", "{ a = 1 }",
            "1979-05-27T07:32:00Z", "'''multi\nline'''", "\"animals\"", "\"no-such-set\"",
        ]).prop_map(str::to_string),
        1 => any::<i64>().prop_map(|v| v.to_string()),
        1 => any::<f64>().prop_map(|v| format!("{v:?}")),
        1 => prop::collection::vec(any::<char>(), 0..6)
            .prop_map(|v| format!("{:?}", v.into_iter().collect::<String>())),
    ]
}

#[derive(Debug, Clone)]
enum TomlEdit {
    Set(usize, String),
    Remove(usize),
    Add(String, String),
    Truncate(usize),
}

const TRAIN_KEYS: &[&str] = &[
    "model",
    "variant",
    "model-config",
    "device",
    "method",
    "k",
    "lv-samples",
    "t-min",
    "t-max",
    "k-min",
    "k-max",
    "reward",
    "reward-model",
    "target-color",
    "prompt",
    "prompts",
    "prompt-set",
    "negative-prompt",
    "batch",
    "steps",
    "guidance",
    "eta",
    "train-steps",
    "lr",
    "optimizer",
    "weight-decay",
    "rank",
    "alpha",
    "lora-targets",
    "clip-grad-norm",
    "grad-accum",
    "seed",
    "init-lora",
    "init-noise",
    "out-dir",
    "resume",
    "checkpoint-every",
    "max-bad-steps",
    "preview",
    "eval-every",
    "min-diversity",
    "config",
];

fn toml_edit() -> impl Strategy<Value = TomlEdit> {
    prop_oneof![
        6 => (any::<usize>(), toml_value()).prop_map(|(k, v)| TomlEdit::Set(k, v)),
        2 => any::<usize>().prop_map(TomlEdit::Remove),
        1 => (prop::sample::select(vec!["unknown-key", "train_steps", "[section]", "k"]), toml_value())
            .prop_map(|(k, v)| TomlEdit::Add(k.to_string(), v)),
        1 => any::<usize>().prop_map(TomlEdit::Truncate),
    ]
}

fn apply_toml(edits: &[TomlEdit]) -> String {
    let mut lines: Vec<(String, String)> = TRAIN_TOML
        .lines()
        .filter_map(|l| l.split_once(" = "))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut cut = None;
    for e in edits {
        match e {
            TomlEdit::Set(k, v) => {
                let key = TRAIN_KEYS[k % TRAIN_KEYS.len()];
                match lines.iter_mut().find(|(name, _)| name == key) {
                    Some(line) => line.1 = v.clone(),
                    None => lines.push((key.to_string(), v.clone())),
                }
            }
            TomlEdit::Remove(i) => {
                let n = lines.len();
                if n > 0 {
                    lines.remove(i % n);
                }
            }
            TomlEdit::Add(k, v) => lines.push((k.clone(), v.clone())),
            TomlEdit::Truncate(at) => cut = Some(*at),
        }
    }
    let mut text: String = lines
        .iter()
        .map(|(k, v)| {
            if k.starts_with('[') {
                format!("{k}\n")
            } else {
                format!("{k} = {v}\n")
            }
        })
        .collect();
    if let Some(at) = cut {
        let mut at = at % text.len().max(1);
        while !text.is_char_boundary(at) {
            at -= 1;
        }
        text.truncate(at);
    }
    text
}

#[test]
fn train_config_toml() {
    let dir = scratch("toml");
    let path = dir.join("train.toml");
    std::fs::write(&path, TRAIN_TOML).unwrap();
    train::TrainArgs::check_file(&path).unwrap();
    let name = path.display().to_string();
    fuzz(
        "train --config TOML",
        2000,
        prop::collection::vec(toml_edit(), 1..=3),
        |edits| {
            std::fs::write(&path, apply_toml(&edits)).unwrap();
            match train::TrainArgs::check_file(&path) {
                Ok(()) => accepted(),
                Err(e) => check_error(&e, &name)?,
            }
            Ok(())
        },
    );
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// `draft score IMAGE.png`.

fn png(w: u32, h: u32, color: image::ColorType) -> Vec<u8> {
    use image::ImageEncoder;
    let channels = color.channel_count() as usize;
    let bytes = color.bytes_per_pixel() as usize / channels;
    let data: Vec<u8> = (0..(w * h) as usize * channels * bytes)
        .map(|i| (i * 37 % 251) as u8)
        .collect();
    let mut out = Vec::new();
    image::codecs::png::PngEncoder::new(&mut out)
        .write_image(&data, w, h, color.into())
        .unwrap();
    out
}

/// PNG edits that keep the chunk checksums right, so the decoder gets past them: the IHDR
/// width, height, bit depth and colour type, and any chunk's data; or raw byte edits.
#[derive(Debug, Clone)]
enum PngEdit {
    Width(u32),
    Height(u32),
    Depth(u8),
    Color(u8),
    ChunkData(usize, usize, Vec<u8>),
    Bytes(Vec<ByteEdit>),
}

fn dimension() -> impl Strategy<Value = u32> {
    prop_oneof![
        3 => 0u32..64,
        1 => prop::sample::select(vec![4096u32, 4097, 65535, 1 << 24, 1 << 31, u32::MAX]),
    ]
}

fn png_edit() -> impl Strategy<Value = PngEdit> {
    prop_oneof![
        2 => dimension().prop_map(PngEdit::Width),
        2 => dimension().prop_map(PngEdit::Height),
        1 => prop::sample::select(vec![0u8, 1, 2, 4, 8, 16, 3, 255]).prop_map(PngEdit::Depth),
        1 => prop::sample::select(vec![0u8, 2, 3, 4, 6, 1, 7, 255]).prop_map(PngEdit::Color),
        3 => (any::<usize>(), any::<usize>(), prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(c, i, b)| PngEdit::ChunkData(c, i, b)),
        2 => prop::collection::vec(byte_edit(), 1..=2).prop_map(PngEdit::Bytes),
    ]
}

/// The chunks of a PNG: (offset of the length field, data length).
fn chunks(png: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut at = 8;
    while at + 12 <= png.len() {
        let len = u32::from_be_bytes(png[at..at + 4].try_into().unwrap()) as usize;
        if at + 12 + len > png.len() {
            break;
        }
        out.push((at, len));
        at += 12 + len;
    }
    out
}

fn fix_crc(png: &mut [u8], at: usize, len: usize) {
    let crc = crc32(&png[at + 4..at + 8 + len]);
    png[at + 8 + len..at + 12 + len].copy_from_slice(&crc.to_be_bytes());
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in data {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn apply_png(base: &[u8], edits: &[PngEdit]) -> Vec<u8> {
    let mut out = base.to_vec();
    for e in edits {
        let cs = chunks(&out);
        let ihdr = |out: &mut Vec<u8>, offset: usize, bytes: &[u8]| {
            if let Some(&(at, len)) = cs.first()
                && len >= 13
            {
                out[at + 8 + offset..at + 8 + offset + bytes.len()].copy_from_slice(bytes);
                fix_crc(out, at, len);
            }
        };
        match e {
            PngEdit::Width(w) => ihdr(&mut out, 0, &w.to_be_bytes()),
            PngEdit::Height(h) => ihdr(&mut out, 4, &h.to_be_bytes()),
            PngEdit::Depth(d) => ihdr(&mut out, 8, &[*d]),
            PngEdit::Color(c) => ihdr(&mut out, 9, &[*c]),
            PngEdit::ChunkData(c, i, b) => {
                if !cs.is_empty() {
                    let (at, len) = cs[c % cs.len()];
                    if len > 0 {
                        let start = at + 8 + i % len;
                        for (k, x) in b.iter().enumerate() {
                            if start + k < at + 8 + len {
                                out[start + k] = *x;
                            }
                        }
                        fix_crc(&mut out, at, len);
                    }
                }
            }
            PngEdit::Bytes(b) => out = apply_bytes(&out, b),
        }
    }
    out
}

#[test]
fn score_png() {
    let dir = scratch("png");
    let device = Device::flex();
    let bases = [
        png(8, 6, image::ColorType::Rgb8),
        png(5, 7, image::ColorType::Rgba8),
        png(4, 4, image::ColorType::L8),
        png(3, 5, image::ColorType::Rgb16),
        png(6, 2, image::ColorType::La8),
    ];
    let path = dir.join("image.png");
    for b in &bases {
        std::fs::write(&path, b).unwrap();
        score::read_png(&path, &device).unwrap();
    }
    let name = path.display().to_string();
    fuzz(
        "score PNG",
        2000,
        (0..bases.len(), prop::collection::vec(png_edit(), 1..=3)),
        |(i, edits)| {
            std::fs::write(&path, apply_png(&bases[i], &edits)).unwrap();
            match score::read_png(&path, &device) {
                Ok(t) => {
                    accepted();
                    let [b, c, h, w] = t.dims();
                    prop_assert!(b == 1 && c == 3 && h > 0 && w > 0);
                }
                Err(e) => check_error(&e, &name)?,
            }
            Ok(())
        },
    );
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// `--init-noise FILE.safetensors`.

#[derive(Debug, Clone)]
enum NoiseEdit {
    Shape(Vec<usize>),
    Dtype(u8),
    Name(String),
    Value(usize, f32),
    Bytes(Vec<ByteEdit>),
}

fn noise_file(name: &str, dtype: safetensors::Dtype, shape: &[usize], f: &[f32]) -> Vec<u8> {
    let data: Vec<u8> = match dtype {
        safetensors::Dtype::F16 => f
            .iter()
            .flat_map(|x| burn::tensor::f16::from_f32(*x).to_le_bytes())
            .collect(),
        safetensors::Dtype::I64 => f.iter().flat_map(|x| (*x as i64).to_le_bytes()).collect(),
        safetensors::Dtype::U8 => f.iter().map(|x| *x as u8).collect(),
        _ => f.iter().flat_map(|x| x.to_le_bytes()).collect(),
    };
    let view = safetensors::tensor::TensorView::new(dtype, shape.to_vec(), &data).unwrap();
    safetensors::tensor::serialize([(name.to_string(), view)], None).unwrap()
}

#[test]
fn init_noise() {
    let device = Device::flex();
    let strategy = prop_oneof![
        3 => prop::collection::vec(0usize..6, 0..6).prop_map(NoiseEdit::Shape),
        1 => (0u8..4).prop_map(NoiseEdit::Dtype),
        1 => prop::sample::select(vec!["noise", "latents", "", "noise\n"]).prop_map(|s| NoiseEdit::Name(s.to_string())),
        2 => (any::<usize>(), prop::sample::select(vec![f32::NAN, f32::INFINITY, -f32::INFINITY, 1e38, 0.0]))
            .prop_map(|(i, v)| NoiseEdit::Value(i, v)),
        2 => prop::collection::vec(byte_edit(), 1..=2).prop_map(NoiseEdit::Bytes),
    ];
    let name = "runs/noise.safetensors";
    fuzz(
        "--init-noise",
        1500,
        prop::collection::vec(strategy, 1..=3),
        |edits| {
            let (mut shape, mut dtype, mut key) = (
                vec![2, 3, 4, 4],
                safetensors::Dtype::F32,
                "noise".to_string(),
            );
            let mut values: Option<Vec<f32>> = None;
            let mut raw = Vec::new();
            for e in &edits {
                match e {
                    NoiseEdit::Shape(s) => shape = s.clone(),
                    NoiseEdit::Dtype(d) => {
                        dtype = [
                            safetensors::Dtype::F32,
                            safetensors::Dtype::F16,
                            safetensors::Dtype::I64,
                            safetensors::Dtype::U8,
                        ][*d as usize]
                    }
                    NoiseEdit::Name(n) => key = n.clone(),
                    NoiseEdit::Value(i, v) => {
                        let n: usize = shape.iter().product();
                        let vals = values
                            .get_or_insert_with(|| (0..n).map(|i| (i as f32).sin()).collect());
                        vals.resize(n, 0.5);
                        if n > 0 {
                            vals[i % n] = *v;
                        }
                    }
                    NoiseEdit::Bytes(b) => raw.extend(b.iter().cloned()),
                }
            }
            let n: usize = shape.iter().product();
            let mut vals = values.unwrap_or_else(|| (0..n).map(|i| (i as f32).sin()).collect());
            vals.resize(n, 0.5);
            let bytes = apply_bytes(&noise_file(&key, dtype, &shape, &vals), &raw);
            match files::init_noise(name, &bytes, &device) {
                Ok(t) => {
                    accepted();
                    prop_assert!(t.dims().iter().all(|&d| d > 0));
                }
                Err(e) => check_error(&e, name)?,
            }
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------------------------
// PyTorch checkpoints (`--reward-model hpsv2=FILE.pt`, `.pth` aesthetic weights, `.bin`).

/// The stored (uncompressed) entries of a zip file as PyTorch writes them (sizes and CRCs in
/// the central directory and in a data descriptor after the data): for each, the offset of its
/// central directory record, and the offset and length of its data.
fn zip_entries(zip: &[u8]) -> Vec<(usize, usize, usize)> {
    let u16_at = |p: usize| u16::from_le_bytes([zip[p], zip[p + 1]]) as usize;
    let u32_at = |p: usize| u32::from_le_bytes(zip[p..p + 4].try_into().unwrap()) as usize;
    let mut out = Vec::new();
    for q in 0..zip.len().saturating_sub(46) {
        if &zip[q..q + 4] != b"PK\x01\x02" {
            continue;
        }
        let (len, local) = (u32_at(q + 20), u32_at(q + 42));
        if local + 30 > zip.len() || &zip[local..local + 4] != b"PK\x03\x04" {
            continue;
        }
        let data = local + 30 + u16_at(local + 26) + u16_at(local + 28);
        if data + len + 4 <= zip.len() {
            out.push((q, data, len));
        }
    }
    out
}

/// Bytes of zip entry `entry` overwritten and its CRC-32 fixed (central directory, data
/// descriptor), so the reader gets past the zip layer into the pickle and the storages.
fn poke_zip_entry(zip: &mut [u8], entry: usize, at: usize, bytes: &[u8]) {
    let entries = zip_entries(zip);
    if entries.is_empty() {
        return;
    }
    let (central, data, len) = entries[entry % entries.len()];
    if len == 0 {
        return;
    }
    let start = data + at % len;
    for (k, b) in bytes.iter().enumerate() {
        if start + k < data + len {
            zip[start + k] = *b;
        }
    }
    let crc = crc32(&zip[data..data + len]).to_le_bytes();
    zip[central + 16..central + 20].copy_from_slice(&crc);
    let descriptor = if &zip[data + len..data + len + 4] == b"PK\x07\x08" {
        data + len + 4
    } else {
        data + len
    };
    if descriptor + 4 <= zip.len() {
        zip[descriptor..descriptor + 4].copy_from_slice(&crc);
    }
}

#[test]
fn pytorch_checkpoints() {
    let base = std::fs::read(fixtures().join("open-clip-tiny/hpsv2-style.pt")).unwrap();
    let dir = scratch("pth");
    let path = dir.join("reward.pth");
    std::fs::write(&path, &base).unwrap();
    files::pytorch_to_safetensors(&path).unwrap();
    let name = path.display().to_string();
    assert!(zip_entries(&base).len() > 2, "the fixture is a stored zip");
    let edit = prop_oneof![
        // Inside an entry (the pickle, a storage, the version record), CRCs fixed.
        4 => (any::<usize>(), any::<usize>(), prop::collection::vec(any::<u8>(), 1..6))
            .prop_map(|(e, at, b)| (Some((e, at, b)), vec![])),
        // Anywhere in the file: the zip layer (headers, sizes, offsets).
        1 => prop::collection::vec(byte_edit(), 1..=2).prop_map(|b| (None, b)),
    ];
    fuzz(
        "PyTorch .pt/.pth",
        1000,
        prop::collection::vec(edit, 1..=3),
        |edits| {
            let mut bytes = base.clone();
            for (entry, raw) in &edits {
                if let Some((e, at, b)) = entry {
                    poke_zip_entry(&mut bytes, *e, *at, b);
                }
                bytes = apply_bytes(&bytes, raw);
            }
            std::fs::write(&path, &bytes).unwrap();
            match files::pytorch_to_safetensors(&path) {
                Ok(st) => {
                    accepted();
                    // What the conversion writes must read back.
                    if let Err(e) = draft_core::model::weights::Weights::from_bytes(&name, &st) {
                        check_error(&e.into(), &name)?;
                    }
                }
                Err(e) => check_error(&e, &name)?,
            }
            Ok(())
        },
    );
    let _ = std::fs::remove_dir_all(&dir);
}
