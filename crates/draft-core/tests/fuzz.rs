//! Property tests ("fuzzing") of every parser a user feeds the core: safetensors files, the
//! config.json of each model and of the scheduler, tokenizer files, LoRA files (diffusers and
//! kohya), whole model folders loaded into a pipeline, and the reward models' weight files.
//!
//! Inputs are structured mutations of valid fixtures (one field, header number, dtype, shape,
//! offset, key or byte range at a time, up to three at once), so most get past the first check
//! and reach the next one. Each parser must answer every input with `Ok` or an error whose
//! message is one line and names the file (and, for configs, the field); a panic fails the
//! test with the input that caused it (proptest catches it and shrinks the input). An abort
//! (a refused allocation) would kill the test binary: none may happen.
//!
//! The seed is fixed so CI is reproducible; `DRAFT_FUZZ_SEED=N` explores other inputs and
//! `DRAFT_FUZZ_SCALE=K` runs K times as many. Each test prints its count of inputs
//! (`cargo test --release -p draft-core --test fuzz -- --nocapture`).

mod common;

use std::cell::{Cell, RefCell};
use std::fmt::Debug;
use std::sync::atomic::{AtomicUsize, Ordering};

use burn::prelude::*;
use draft_core::model::lora::{LoraFile, LoraTarget};
use draft_core::model::models::clip::CLIPConfig;
use draft_core::model::models::clip_text::CLIPTextConfig;
use draft_core::model::models::open_clip::OpenClipConfig;
use draft_core::model::models::unet::UNet2DConditionConfig;
use draft_core::model::models::vae::AutoencoderKLConfig;
use draft_core::model::pipeline::LoraSetup;
use draft_core::model::schedule::{Ddim, SchedulerConfig};
use draft_core::model::tokenizer::{ClipTokenizer, SpecialTokens};
use draft_core::model::weights::Weights;
use draft_core::reward::models::{AestheticMlp, is_open_clip, load_clip, load_open_clip};
use draft_core::{ModelFiles, Pipeline};
use proptest::prelude::*;
use proptest::test_runner::{
    Config, RngAlgorithm, TestCaseError, TestCaseResult, TestRng, TestRunner,
};
use safetensors::Dtype;
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------------
// The harness: a seeded proptest runner that counts its inputs.

static TOTAL: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// Inputs the parser under test accepted (`Ok`), counted by [`accepted`].
    static ACCEPTED: Cell<usize> = const { Cell::new(0) };
}

/// Counts an input the parser accepted (how deep the mutations get, for the report).
fn accepted() {
    ACCEPTED.with(|a| a.set(a.get() + 1));
}

fn scale() -> u32 {
    std::env::var("DRAFT_FUZZ_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

/// Runs `test` on `cases` inputs drawn from `strategy`, prints the count, and fails with the
/// (shrunk) input on the first failure or panic.
fn fuzz<S>(parser: &str, cases: u32, strategy: S, test: impl Fn(S::Value) -> TestCaseResult)
where
    S: Strategy,
    S::Value: Debug,
{
    let cases = cases * scale();
    let seed: u64 = std::env::var("DRAFT_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..8 + parser.len().min(24)].copy_from_slice(&parser.as_bytes()[..parser.len().min(24)]);
    let config = Config {
        cases,
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

/// An error message must be one line and name `file`.
fn check_message(msg: &str, file: &str) -> TestCaseResult {
    prop_assert!(!msg.contains('\n'), "not one line: {msg:?}");
    prop_assert!(msg.contains(file), "does not name {file}: {msg:?}");
    Ok(())
}

/// A config error must also name a field: one of `fields` (the config's keys), or the line
/// and column of a syntax error.
fn check_config_message(msg: &str, file: &str, fields: &[&str]) -> TestCaseResult {
    check_message(msg, file)?;
    let leaf = |f: &&str| f.rsplit('.').next().unwrap_or(f).to_string();
    prop_assert!(
        fields.iter().any(|f| msg.contains(&leaf(f))) || msg.contains(" line "),
        "names no field: {msg:?}"
    );
    Ok(())
}

fn device() -> Device {
    Device::flex()
}

fn fixture(rel: &str) -> Vec<u8> {
    std::fs::read(common::fixtures().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

fn fixture_text(rel: &str) -> String {
    String::from_utf8(fixture(rel)).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Hostile values and JSON edits.

/// Numbers a config may hold: small and typical, zero, negative, huge, fractional.
fn number() -> BoxedStrategy<Value> {
    prop_oneof![
        5 => (0u64..70).prop_map(Value::from),
        1 => Just(json!(-1)),
        1 => any::<i64>().prop_map(Value::from),
        2 => prop::sample::select(vec![
            1u64 << 20,
            (1 << 20) + 1,
            1 << 31,
            1 << 32,
            1 << 40,
            1 << 53,
            u64::MAX
        ])
        .prop_map(Value::from),
        2 => prop::sample::select(vec![0.0, 0.5, -0.5, 1.0, 0.999, 1.5, 1e-30, 1e-7, 1e300, -1e300])
            .prop_map(|f| json!(f)),
    ]
    .boxed()
}

/// Names a config may hold: the ones the loaders know, and others.
const WORDS: &[&str] = &[
    "DownBlock2D",
    "CrossAttnDownBlock2D",
    "UpBlock2D",
    "CrossAttnUpBlock2D",
    "UNetMidBlock2DCrossAttn",
    "DownEncoderBlock2D",
    "UpDecoderBlock2D",
    "Mystery2D",
    "silu",
    "gelu",
    "quick_gelu",
    "positional",
    "fourier",
    "default",
    "scale_shift",
    "linear",
    "scaled_linear",
    "squaredcos_cap_v2",
    "leading",
    "trailing",
    "linspace",
    "epsilon",
    "v_prediction",
    "sample",
    "tok",
    "<|endoftext|>",
    "<|startoftext|>",
    "",
    "line\nbreak",
];

fn text() -> BoxedStrategy<String> {
    prop_oneof![
        3 => prop::sample::select(WORDS).prop_map(str::to_string),
        1 => prop::collection::vec(any::<char>(), 0..8).prop_map(|v| v.into_iter().collect()),
    ]
    .boxed()
}

fn hostile() -> BoxedStrategy<Value> {
    prop_oneof![
        8 => number(),
        1 => Just(Value::Null),
        1 => any::<bool>().prop_map(Value::from),
        3 => text().prop_map(Value::from),
        3 => prop::collection::vec(number(), 0..6).prop_map(Value::from),
        1 => prop::collection::vec(text().prop_map(Value::from), 0..5).prop_map(Value::from),
        1 => Just(json!({})),
    ]
    .boxed()
}

/// One edit of a JSON object: a field (dotted path, chosen by index) set to a value or
/// removed, one element of a list field replaced, or the text cut short.
#[derive(Debug, Clone)]
enum Edit {
    Set(usize, Value),
    Remove(usize),
    Element(usize, usize, Value),
    Truncate(usize),
}

fn edits() -> impl Strategy<Value = Vec<Edit>> {
    let edit = prop_oneof![
        8 => (any::<usize>(), hostile()).prop_map(|(f, v)| Edit::Set(f, v)),
        2 => any::<usize>().prop_map(Edit::Remove),
        3 => (any::<usize>(), any::<usize>(), hostile()).prop_map(|(f, i, v)| Edit::Element(f, i, v)),
        1 => any::<usize>().prop_map(Edit::Truncate),
    ];
    prop::collection::vec(edit, 1..=3)
}

fn slot<'v>(
    v: &'v mut Value,
    path: &str,
) -> Option<(&'v mut serde_json::Map<String, Value>, String)> {
    let mut parts: Vec<&str> = path.split('.').collect();
    let last = parts.pop()?.to_string();
    let mut cur = v;
    for p in parts {
        cur = cur.as_object_mut()?.entry(p).or_insert_with(|| json!({}));
    }
    Some((cur.as_object_mut()?, last))
}

/// `base` with `edits` applied to its `fields`, as JSON text.
fn apply(base: &Value, fields: &[&str], edits: &[Edit]) -> String {
    let mut v = base.clone();
    let mut cut = None;
    for e in edits {
        match e {
            Edit::Set(f, x) => {
                if let Some((obj, k)) = slot(&mut v, fields[f % fields.len()]) {
                    obj.insert(k, x.clone());
                }
            }
            Edit::Remove(f) => {
                if let Some((obj, k)) = slot(&mut v, fields[f % fields.len()]) {
                    obj.remove(&k);
                }
            }
            Edit::Element(f, i, x) => {
                if let Some((obj, k)) = slot(&mut v, fields[f % fields.len()])
                    && let Some(Value::Array(a)) = obj.get_mut(&k)
                    && !a.is_empty()
                {
                    let n = a.len();
                    a[i % n] = x.clone();
                }
            }
            Edit::Truncate(at) => cut = Some(*at),
        }
    }
    let mut s = serde_json::to_string_pretty(&v).unwrap();
    if let Some(at) = cut {
        let mut at = at % s.len().max(1);
        while !s.is_char_boundary(at) {
            at -= 1;
        }
        s.truncate(at);
    }
    s
}

/// Fuzzes a JSON config parser: `parse(file, text)`; on `Ok`, `more` may check further.
fn fuzz_config(
    parser: &str,
    file: &str,
    base: &str,
    fields: &[&str],
    cases: u32,
    parse: impl Fn(&str, &str) -> draft_core::Result<()>,
) {
    let base: Value = serde_json::from_str(base).unwrap();
    parse(file, &base.to_string()).expect("the fixture parses");
    fuzz(parser, cases, edits(), |e| {
        let text = apply(&base, fields, &e);
        match parse(file, &text) {
            Ok(()) => accepted(),
            Err(err) => check_config_message(&err.to_string(), file, fields)?,
        }
        Ok(())
    });
}

// ---------------------------------------------------------------------------------------------
// safetensors.

/// A small valid file with every dtype the readers meet.
fn sample_safetensors(prefix: &str) -> Vec<u8> {
    let f32s: Vec<u8> = (0..24)
        .flat_map(|i| (i as f32 * 0.5).to_le_bytes())
        .collect();
    let f16s: Vec<u8> = (0..6)
        .flat_map(|i| half::f16::from_f32(i as f32).to_le_bytes())
        .collect();
    let bf16s: Vec<u8> = (0..4)
        .flat_map(|i| half::bf16::from_f32(i as f32).to_le_bytes())
        .collect();
    let f64s: Vec<u8> = (0..3).flat_map(|i| (i as f64).to_le_bytes()).collect();
    let i64s: Vec<u8> = (0..5i64).flat_map(|i| i.to_le_bytes()).collect();
    let i32s: Vec<u8> = (0..4i32).flat_map(|i| i.to_le_bytes()).collect();
    let u8s: Vec<u8> = (0..6u8).collect();
    let tensors: Vec<(&str, Dtype, Vec<usize>, &[u8])> = vec![
        ("a.weight", Dtype::F32, vec![2, 3, 4], &f32s),
        ("b.half", Dtype::F16, vec![6], &f16s),
        ("c.bf", Dtype::BF16, vec![2, 2], &bf16s),
        ("d.double", Dtype::F64, vec![3, 1], &f64s),
        ("e.ids", Dtype::I64, vec![5], &i64s),
        ("f.int", Dtype::I32, vec![1, 4], &i32s),
        ("g.bytes", Dtype::U8, vec![6], &u8s),
        ("h.scalar", Dtype::F32, vec![], &f32s[..4]),
        ("i.empty", Dtype::F32, vec![0, 3], &[]),
    ];
    let named: Vec<String> = tensors.iter().map(|t| format!("{prefix}{}", t.0)).collect();
    let tensors: Vec<(&str, Dtype, Vec<usize>, &[u8])> = tensors
        .iter()
        .zip(&named)
        .map(|((_, d, s, b), n)| (n.as_str(), *d, s.clone(), *b))
        .collect();
    serialize(&tensors)
}

fn serialize(tensors: &[(&str, Dtype, Vec<usize>, &[u8])]) -> Vec<u8> {
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(k, d, s, b)| {
            (
                k.to_string(),
                safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap(),
            )
        })
        .collect();
    safetensors::tensor::serialize(views, None).unwrap()
}

/// A safetensors file as (header JSON, data).
fn split(bytes: &[u8]) -> (Value, Vec<u8>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    (header, bytes[8 + n..].to_vec())
}

fn join(header: &Value, data: &[u8]) -> Vec<u8> {
    let h = header.to_string();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(h.as_bytes());
    out.extend_from_slice(data);
    out
}

/// One edit of a safetensors file, at the level of its header or its bytes.
#[derive(Debug, Clone)]
enum StEdit {
    /// The 8-byte header length: set to a value, or shifted by a small amount.
    HeaderLen(u64),
    HeaderLenDelta(i64),
    /// Tensor `i` of the header gets another dtype / shape / offsets.
    Dtype(usize, String),
    Shape(usize, Value),
    ShapeDim(usize, usize, Value),
    Offsets(usize, Value),
    /// Tensor `i` overlaps tensor `j` (takes its offsets).
    Overlap(usize, usize),
    /// The header's `__metadata__`.
    Metadata(Value),
    /// A tensor entry removed, or renamed.
    RemoveTensor(usize),
    Rename(usize, String),
    /// Bytes of the data changed (the values: NaN, ∞, anything), the file truncated or extended.
    Poke(usize, Vec<u8>),
    Truncate(usize),
    Extend(Vec<u8>),
    /// The header JSON text cut or a byte in it changed.
    HeaderByte(usize, u8),
}

fn st_edit() -> impl Strategy<Value = StEdit> {
    let dtype = prop::sample::select(vec![
        "F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "U64",
        "F4", "X", "",
    ])
    .prop_map(str::to_string);
    let dim = prop_oneof![
        4 => (0u64..8).prop_map(Value::from),
        2 => prop::sample::select(vec![1u64 << 20, 1 << 32, 1_000_000_000_000, 1 << 62, u64::MAX])
            .prop_map(Value::from),
        1 => Just(json!(-1)),
        1 => Just(json!(1.5)),
        1 => Just(json!("3")),
    ];
    let offset = prop_oneof![
        4 => (0u64..200).prop_map(Value::from),
        1 => prop::sample::select(vec![1u64 << 32, 1 << 62, u64::MAX]).prop_map(Value::from),
        1 => Just(json!(-8)),
    ];
    prop_oneof![
        2 => prop::sample::select(vec![0u64, 1, 2, 7, 8, 100_000_000, 100_000_001, 1 << 40, u64::MAX])
            .prop_map(StEdit::HeaderLen),
        2 => (-9i64..9).prop_map(StEdit::HeaderLenDelta),
        4 => (any::<usize>(), dtype).prop_map(|(i, d)| StEdit::Dtype(i, d)),
        3 => (any::<usize>(), prop::collection::vec(dim.clone(), 0..5))
            .prop_map(|(i, s)| StEdit::Shape(i, Value::from(s))),
        3 => (any::<usize>(), any::<usize>(), dim).prop_map(|(i, j, d)| StEdit::ShapeDim(i, j, d)),
        3 => (any::<usize>(), prop::collection::vec(offset, 0..4))
            .prop_map(|(i, o)| StEdit::Offsets(i, Value::from(o))),
        2 => (any::<usize>(), any::<usize>()).prop_map(|(i, j)| StEdit::Overlap(i, j)),
        1 => hostile().prop_map(StEdit::Metadata),
        1 => any::<usize>().prop_map(StEdit::RemoveTensor),
        1 => (any::<usize>(), text()).prop_map(|(i, k)| StEdit::Rename(i, k)),
        3 => (any::<usize>(), prop_oneof![
                Just(f32::NAN.to_le_bytes().to_vec()),
                Just(f32::INFINITY.to_le_bytes().to_vec()),
                Just(vec![0xff, 0x7c]),
                prop::collection::vec(any::<u8>(), 1..8),
            ])
            .prop_map(|(i, b)| StEdit::Poke(i, b)),
        2 => any::<usize>().prop_map(StEdit::Truncate),
        1 => prop::collection::vec(any::<u8>(), 1..16).prop_map(StEdit::Extend),
        2 => (any::<usize>(), any::<u8>()).prop_map(|(i, b)| StEdit::HeaderByte(i, b)),
    ]
}

/// `bytes` (a valid safetensors file) with `edits` applied.
fn apply_st(bytes: &[u8], edits: &[StEdit]) -> Vec<u8> {
    let (mut header, mut data) = split(bytes);
    let mut raw_edits = Vec::new();
    let names = |h: &Value| -> Vec<String> {
        h.as_object()
            .map(|o| o.keys().filter(|k| *k != "__metadata__").cloned().collect())
            .unwrap_or_default()
    };
    for e in edits {
        let keys = names(&header);
        let pick = |i: usize| keys.get(i % keys.len().max(1)).cloned();
        let with =
            |h: &mut Value, i: usize, f: &mut dyn FnMut(&mut serde_json::Map<String, Value>)| {
                if let Some(k) = pick(i)
                    && let Some(m) = h.get_mut(&k).and_then(Value::as_object_mut)
                {
                    f(m);
                }
            };
        match e {
            StEdit::Dtype(i, d) => with(&mut header, *i, &mut |m| {
                m.insert("dtype".into(), json!(d));
            }),
            StEdit::Shape(i, s) => with(&mut header, *i, &mut |m| {
                m.insert("shape".into(), s.clone());
            }),
            StEdit::ShapeDim(i, j, d) => with(&mut header, *i, &mut |m| {
                if let Some(Value::Array(a)) = m.get_mut("shape")
                    && !a.is_empty()
                {
                    let n = a.len();
                    a[j % n] = d.clone();
                }
            }),
            StEdit::Offsets(i, o) => with(&mut header, *i, &mut |m| {
                m.insert("data_offsets".into(), o.clone());
            }),
            StEdit::Overlap(i, j) => {
                let other = pick(*j)
                    .and_then(|k| header.get(&k).and_then(|t| t.get("data_offsets")).cloned());
                if let Some(o) = other {
                    with(&mut header, *i, &mut |m| {
                        m.insert("data_offsets".into(), o.clone());
                    });
                }
            }
            StEdit::Metadata(v) => {
                if let Some(o) = header.as_object_mut() {
                    o.insert("__metadata__".into(), v.clone());
                }
            }
            StEdit::RemoveTensor(i) => {
                if let (Some(k), Some(o)) = (pick(*i), header.as_object_mut()) {
                    o.remove(&k);
                }
            }
            StEdit::Rename(i, new) => {
                if let (Some(k), Some(o)) = (pick(*i), header.as_object_mut())
                    && let Some(t) = o.remove(&k)
                {
                    o.insert(new.clone(), t);
                }
            }
            StEdit::Poke(at, b) => {
                if !data.is_empty() {
                    let at = at % data.len();
                    for (k, x) in b.iter().enumerate() {
                        if let Some(d) = data.get_mut(at + k) {
                            *d = *x;
                        }
                    }
                }
            }
            StEdit::Extend(b) => data.extend_from_slice(b),
            other => raw_edits.push(other.clone()),
        }
    }
    let mut out = join(&header, &data);
    for e in raw_edits {
        match e {
            _ if out.len() < 8 => {}
            StEdit::HeaderLen(n) => out[..8].copy_from_slice(&n.to_le_bytes()),
            StEdit::HeaderLenDelta(d) => {
                let n = u64::from_le_bytes(out[..8].try_into().unwrap());
                out[..8].copy_from_slice(&n.wrapping_add_signed(d).to_le_bytes());
            }
            StEdit::Truncate(at) => {
                let n = out.len();
                out.truncate(at % (n + 1));
            }
            StEdit::HeaderByte(at, b) => {
                let n = u64::from_le_bytes(out[..8].try_into().unwrap()) as usize;
                if n > 0 && n <= out.len().saturating_sub(8) {
                    out[8 + at % n] = b;
                }
            }
            _ => unreachable!(),
        }
    }
    out
}

/// Reads every tensor of `w` every way the loaders do; errors must name the file.
fn read_all(w: &Weights, file: &str) -> TestCaseResult {
    accepted();
    let dev = device();
    for key in w.keys() {
        let results: Vec<Option<draft_core::Error>> = vec![
            w.shape(&key).err(),
            w.read_f32(&key).err(),
            w.read_i64(&key).err(),
            w.tensor::<1>(&key, &dev).err(),
            w.tensor::<2>(&key, &dev).err(),
            w.tensor::<3>(&key, &dev).err(),
        ];
        for e in results.into_iter().flatten() {
            check_message(&e.to_string(), file)?;
        }
        if let Ok((v, shape)) = w.read_f32(&key) {
            prop_assert_eq!(v.len(), shape.iter().product::<usize>());
            prop_assert!(v.iter().all(|x| x.is_finite()));
        }
    }
    Ok(())
}

#[test]
fn safetensors_files() {
    let base = sample_safetensors("");
    let file = "weights/model.safetensors";
    read_all(&Weights::from_bytes(file, &base).unwrap(), file).unwrap();
    fuzz(
        "safetensors",
        6000,
        prop::collection::vec(st_edit(), 1..=3),
        |edits| {
            let bytes = apply_st(&base, &edits);
            match Weights::from_bytes(file, &bytes) {
                Ok(w) => read_all(&w, file),
                Err(e) => check_message(&e.to_string(), file),
            }
        },
    );
}

#[test]
fn sharded_safetensors() {
    let (first, second) = (sample_safetensors("one."), sample_safetensors("two."));
    let index = "unet/diffusion_pytorch_model.safetensors.index.json";
    fuzz(
        "safetensors shards",
        1000,
        (
            prop::collection::vec(st_edit(), 0..=2),
            prop::collection::vec(st_edit(), 0..=2),
        ),
        |(a, b)| {
            let (x, y) = (apply_st(&first, &a), apply_st(&second, &b));
            let shards = [
                ("unet/part-1.safetensors".to_string(), x.as_slice()),
                ("unet/part-2.safetensors".to_string(), y.as_slice()),
            ];
            match Weights::from_shards(index, &shards) {
                // A key in both shards (a renamed one) is refused.
                Ok(w) => read_all(&w, "unet/"),
                Err(e) => check_message(&e.to_string(), "unet/"),
            }
        },
    );
}

// ---------------------------------------------------------------------------------------------
// Model configs.

const UNET_FIELDS: &[&str] = &[
    "sample_size",
    "in_channels",
    "out_channels",
    "center_input_sample",
    "flip_sin_to_cos",
    "freq_shift",
    "down_block_types",
    "mid_block_type",
    "up_block_types",
    "block_out_channels",
    "layers_per_block",
    "downsample_padding",
    "mid_block_scale_factor",
    "act_fn",
    "norm_num_groups",
    "norm_eps",
    "cross_attention_dim",
    "attention_head_dim",
    "num_attention_heads",
    "transformer_layers_per_block",
    "use_linear_projection",
    "upcast_attention",
    "only_cross_attention",
    "dual_cross_attention",
    "class_embed_type",
    "addition_embed_type",
    "addition_time_embed_dim",
    "projection_class_embeddings_input_dim",
    "time_embedding_type",
    "resnet_time_scale_shift",
    "conv_in_kernel",
    "conv_out_kernel",
];

#[test]
fn unet_config() {
    fuzz_config(
        "unet/config.json",
        "sd1-tiny/unet/config.json",
        &fixture_text("sd1-tiny/unet/config.json"),
        UNET_FIELDS,
        4000,
        |f, t| UNet2DConditionConfig::from_json(f, t).map(drop),
    );
}

const VAE_FIELDS: &[&str] = &[
    "in_channels",
    "out_channels",
    "down_block_types",
    "up_block_types",
    "block_out_channels",
    "layers_per_block",
    "act_fn",
    "latent_channels",
    "norm_num_groups",
    "sample_size",
    "scaling_factor",
    "shift_factor",
    "use_quant_conv",
    "use_post_quant_conv",
    "mid_block_add_attention",
];

#[test]
fn sdxl_unet_config() {
    fuzz_config(
        "unet/config.json (SDXL)",
        "sdxl-tiny/unet/config.json",
        &fixture_text("sdxl-tiny/unet/config.json"),
        UNET_FIELDS,
        2000,
        |f, t| UNet2DConditionConfig::from_json(f, t).map(drop),
    );
}

#[test]
fn vae_config() {
    fuzz_config(
        "vae/config.json",
        "sd1-tiny/vae/config.json",
        &fixture_text("sd1-tiny/vae/config.json"),
        VAE_FIELDS,
        2000,
        |f, t| {
            let c = AutoencoderKLConfig::from_json(f, t)?;
            // What the pipeline derives from an accepted config.
            assert!(c.downscale() >= 1);
            Ok(())
        },
    );
}

const TEXT_FIELDS: &[&str] = &[
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "hidden_act",
    "layer_norm_eps",
    "projection_dim",
    "eos_token_id",
];

#[test]
fn clip_text_config() {
    fuzz_config(
        "text_encoder/config.json",
        "sd1-tiny/text_encoder/config.json",
        &fixture_text("sd1-tiny/text_encoder/config.json"),
        TEXT_FIELDS,
        2000,
        |f, t| CLIPTextConfig::from_json(f, t).map(drop),
    );
}

#[test]
fn clip_config() {
    let mut fields: Vec<String> = vec![
        "projection_dim".into(),
        "text_config".into(),
        "vision_config".into(),
    ];
    for f in TEXT_FIELDS {
        fields.push(format!("text_config.{f}"));
    }
    for f in [
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "image_size",
        "patch_size",
        "num_channels",
        "hidden_act",
        "layer_norm_eps",
    ] {
        fields.push(format!("vision_config.{f}"));
    }
    let fields: Vec<&str> = fields.iter().map(String::as_str).collect();
    fuzz_config(
        "CLIP config.json",
        "clip-tiny/config.json",
        &fixture_text("clip-tiny/config.json"),
        &fields,
        2000,
        |f, t| CLIPConfig::from_json(f, t).map(drop),
    );
}

#[test]
fn open_clip_config() {
    let mut fields: Vec<String> = vec![
        "model_cfg".into(),
        "model_cfg.embed_dim".into(),
        "model_cfg.quick_gelu".into(),
    ];
    for f in [
        "image_size",
        "layers",
        "width",
        "head_width",
        "mlp_ratio",
        "patch_size",
        "pool_type",
        "timm_model_name",
        "ls_init_value",
        "no_ln_pre",
    ] {
        fields.push(format!("model_cfg.vision_cfg.{f}"));
    }
    for f in [
        "context_length",
        "vocab_size",
        "width",
        "heads",
        "layers",
        "mlp_ratio",
        "pool_type",
        "hf_model_name",
        "embed_cls",
    ] {
        fields.push(format!("model_cfg.text_cfg.{f}"));
    }
    let fields: Vec<&str> = fields.iter().map(String::as_str).collect();
    fuzz_config(
        "open_clip_config.json",
        "open-clip-tiny/open_clip_config.json",
        &fixture_text("open-clip-tiny/open_clip_config.json"),
        &fields,
        2000,
        |f, t| OpenClipConfig::from_json(f, t).map(drop),
    );
}

const SCHEDULER_FIELDS: &[&str] = &[
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "clip_sample",
    "clip_sample_range",
    "set_alpha_to_one",
    "steps_offset",
    "prediction_type",
    "timestep_spacing",
    "thresholding",
    "rescale_betas_zero_snr",
];

#[test]
fn scheduler_config() {
    // The report of issue 16: this aborted allocating 4 TB.
    let e = SchedulerConfig::from_json("s.json", r#"{"num_train_timesteps": 1099511627776}"#)
        .unwrap_err();
    assert!(e.to_string().contains("num_train_timesteps"), "{e}");
    fuzz_config(
        "scheduler_config.json",
        "sd1-tiny/scheduler/scheduler_config.json",
        &fixture_text("sd1-tiny/scheduler/scheduler_config.json"),
        SCHEDULER_FIELDS,
        3000,
        |f, t| {
            let c = SchedulerConfig::from_json(f, t)?;
            // Every schedule accepted gives finite DDIM steps, for any number of steps.
            for steps in [1, 2, 7, 50, c.num_train_timesteps] {
                // Too many steps, or a steps_offset that pushes the first timestep past the
                // schedule for this many steps: refused by the sampler, naming the cause.
                let d = match Ddim::new(&c, steps) {
                    Ok(d) => d,
                    Err(e) => {
                        let msg = e.to_string();
                        assert!(!msg.contains('\n') && msg.contains("steps"), "{msg}");
                        continue;
                    }
                };
                for i in 0..d.timesteps.len().min(64) {
                    let k = d.coefficients(i, 1.0);
                    assert!(
                        k.sigma.is_finite() && k.alpha_prod_t > 0.0 && k.alpha_prod_t < 1.0,
                        "steps {steps}, i {i}: {k:?}"
                    );
                }
            }
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------------------------
// Tokenizers.

#[derive(Debug, Clone)]
enum TokEdit {
    /// A vocab.json entry removed, re-numbered or added.
    VocabRemove(usize),
    VocabId(usize, Value),
    VocabAdd(String, Value),
    /// A merges.txt line replaced, or the text cut.
    MergeLine(usize, String),
    MergesCut(usize),
    /// tokenizer_config.json / special_tokens_map.json fields.
    Special(bool, usize, Value),
}

fn tok_edit() -> impl Strategy<Value = TokEdit> {
    prop_oneof![
        3 => any::<usize>().prop_map(TokEdit::VocabRemove),
        2 => (any::<usize>(), number()).prop_map(|(i, v)| TokEdit::VocabId(i, v)),
        1 => (text(), number()).prop_map(|(k, v)| TokEdit::VocabAdd(k, v)),
        3 => (any::<usize>(), prop_oneof![
                text(),
                (text(), text()).prop_map(|(a, b)| format!("{a} {b}")),
                Just("a b c".to_string()),
                Just("#version: 0.2".to_string()),
            ])
            .prop_map(|(i, l)| TokEdit::MergeLine(i, l)),
        1 => any::<usize>().prop_map(TokEdit::MergesCut),
        4 => (any::<bool>(), any::<usize>(), hostile()).prop_map(|(a, f, v)| TokEdit::Special(a, f, v)),
    ]
}

/// Prompts no tokenizer may trip on.
fn hostile_prompt() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just(" \t\n ".to_string()),
        Just("<|endoftext|>".repeat(100)),
        Just("<|startoftext|><|endoftext|>".to_string()),
        Just("a photo of a cat ".repeat(40)),
        Just("&#xFFFFFFFF; &#99999999999; &; &#; &amp &amp;lt; ＡＢＣ ﬁ “x”".to_string()),
        prop::collection::vec(any::<char>(), 0..64).prop_map(|v| v.into_iter().collect()),
    ]
}

/// A tokenizer that loaded must turn any prompt into `max_length` ids it can embed.
fn check_tokenizer(t: &ClipTokenizer, prompts: &[String]) -> TestCaseResult {
    accepted();
    for p in prompts {
        let ids = t
            .encode(p)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(ids.len(), t.max_length);
        prop_assert!(ids.iter().all(|&i| (i as usize) < t.id_bound().max(1)));
        let _ = t.unknown_words(p);
    }
    Ok(())
}

#[test]
fn tokenizer_vocab_merges() {
    let vocab: serde_json::Map<String, Value> =
        serde_json::from_str(&fixture_text("sd1-tiny/tokenizer/vocab.json")).unwrap();
    let merges = fixture_text("sd1-tiny/tokenizer/merges.txt");
    let config: Value =
        serde_json::from_str(&fixture_text("sd1-tiny/tokenizer/tokenizer_config.json")).unwrap();
    let special: Value =
        serde_json::from_str(&fixture_text("sd1-tiny/tokenizer/special_tokens_map.json")).unwrap();
    let special_fields = [
        "pad_token",
        "model_max_length",
        "bos_token",
        "eos_token",
        "unk_token",
    ];
    fuzz(
        "vocab.json + merges.txt",
        1000,
        (
            prop::collection::vec(tok_edit(), 1..=3),
            prop::collection::vec(hostile_prompt(), 1..3),
        ),
        |(edits, prompts)| {
            let mut vocab = vocab.clone();
            let mut lines: Vec<String> = merges.lines().map(str::to_string).collect();
            let mut cut = None;
            let (mut config, mut special) = (config.clone(), special.clone());
            for e in &edits {
                let key = |i: usize| vocab.keys().nth(i % vocab.len().max(1)).cloned();
                match e {
                    TokEdit::VocabRemove(i) => {
                        if let Some(k) = key(*i) {
                            vocab.remove(&k);
                        }
                    }
                    TokEdit::VocabId(i, v) => {
                        if let Some(k) = key(*i) {
                            vocab.insert(k, v.clone());
                        }
                    }
                    TokEdit::VocabAdd(k, v) => {
                        vocab.insert(k.clone(), v.clone());
                    }
                    TokEdit::MergeLine(i, l) => {
                        let n = lines.len();
                        lines[i % n] = l.clone();
                    }
                    TokEdit::MergesCut(at) => cut = Some(*at),
                    TokEdit::Special(which, f, v) => {
                        let target = if *which { &mut config } else { &mut special };
                        target[special_fields[f % special_fields.len()]] = v.clone();
                    }
                }
            }
            let mut merges = lines.join("\n");
            if let Some(at) = cut {
                let mut at = at % merges.len().max(1);
                while !merges.is_char_boundary(at) {
                    at -= 1;
                }
                merges.truncate(at);
            }
            let mut files = ModelFiles::new("sd1-tiny");
            files.insert(
                "tokenizer/vocab.json",
                Value::Object(vocab).to_string().into_bytes(),
            );
            files.insert("tokenizer/merges.txt", merges.into_bytes());
            files.insert(
                "tokenizer/tokenizer_config.json",
                config.to_string().into_bytes(),
            );
            files.insert(
                "tokenizer/special_tokens_map.json",
                special.to_string().into_bytes(),
            );
            match draft_core::model::files::load_tokenizer_in(&files, "tokenizer/") {
                Ok(t) => check_tokenizer(&t, &prompts),
                Err(e) => check_message(&e.to_string(), "sd1-tiny/tokenizer/"),
            }
        },
    );
}

#[test]
fn tokenizer_json() {
    let files = draft_core::data::default_model::files();
    let base: Value = serde_json::from_slice(&files.files["tokenizer/tokenizer.json"]).unwrap();
    let mut fields: Vec<String> = [
        "added_tokens",
        "normalizer",
        "pre_tokenizer",
        "model",
        "model.type",
        "model.vocab",
        "model.unk_token",
        "truncation",
        "padding",
        "post_processor",
        "decoder",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for w in [
        "<|startoftext|>",
        "<|endoftext|>",
        "<|unk|>",
        "circle",
        "red",
    ] {
        fields.push(format!("model.vocab.{w}"));
    }
    let fields: Vec<&str> = fields.iter().map(String::as_str).collect();
    let special = SpecialTokens::from_json_files(&[]).unwrap();
    fuzz(
        "tokenizer.json",
        1500,
        (edits(), prop::collection::vec(hostile_prompt(), 1..3)),
        |(e, prompts)| {
            let text = apply(&base, &fields, &e);
            match ClipTokenizer::from_tokenizer_json(text.as_bytes(), &special) {
                Ok(t) => check_tokenizer(&t, &prompts),
                Err(e) => check_message(&e.to_string(), "tokenizer.json"),
            }
        },
    );
}

// ---------------------------------------------------------------------------------------------
// Whole model folders, loaded into a pipeline.

/// The embedded model's files (small: a pipeline loads in milliseconds).
fn embedded() -> ModelFiles {
    draft_core::data::default_model::files()
}

fn clone_files(f: &ModelFiles) -> ModelFiles {
    let mut out = ModelFiles::new(f.name.clone());
    out.files = f.files.clone();
    out
}

#[derive(Debug, Clone)]
enum FolderEdit {
    Config(usize, Vec<Edit>),
    Weights(usize, Vec<StEdit>),
    RemoveFile(usize),
}

const FOLDER_CONFIGS: &[&str] = &[
    "unet/config.json",
    "text_encoder/config.json",
    "text_encoder_2/config.json",
    "tokenizer_2/tokenizer_config.json",
    "scheduler/scheduler_config.json",
    "model_index.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/tokenizer.json",
];

fn folder_fields(path: &str) -> &'static [&'static str] {
    match path {
        "unet/config.json" => UNET_FIELDS,
        "text_encoder/config.json" | "text_encoder_2/config.json" => TEXT_FIELDS,
        "scheduler/scheduler_config.json" => SCHEDULER_FIELDS,
        "model_index.json" => &[
            "vae",
            "unet",
            "text_encoder",
            "tokenizer",
            "scheduler",
            "text_encoder_2",
            "tokenizer_2",
            "force_zeros_for_empty_prompt",
        ],
        "tokenizer/tokenizer_config.json" | "tokenizer_2/tokenizer_config.json" => {
            &["pad_token", "model_max_length", "eos_token"]
        }
        _ => &[
            "added_tokens",
            "model",
            "model.vocab",
            "normalizer",
            "pre_tokenizer",
        ],
    }
}

#[test]
fn model_folders() {
    fuzz_folder("model folder → Pipeline::load", embedded(), 1500);
}

/// The tiny SDXL folder: two towers, two tokenizers, the UNet's added conditions.
#[test]
fn sdxl_folders() {
    let base = common::read_model(&common::fixtures().join("sdxl-tiny"));
    fuzz_folder("SDXL folder → Pipeline::load", base, 400);
}

fn fuzz_folder(parser: &str, base: ModelFiles, cases: u32) {
    let dev = device();
    let pipe = Pipeline::load(&base, &dev).unwrap();
    drop(pipe);
    let strategy = prop_oneof![
        6 => (any::<usize>(), edits()).prop_map(|(i, e)| FolderEdit::Config(i, e)),
        3 => (any::<usize>(), prop::collection::vec(st_edit(), 1..=2))
            .prop_map(|(u, e)| FolderEdit::Weights(u, e)),
        1 => any::<usize>().prop_map(FolderEdit::RemoveFile),
    ];
    let configs: Vec<&str> = FOLDER_CONFIGS
        .iter()
        .copied()
        .filter(|p| base.files.contains_key(*p) || !p.contains("_2/"))
        .collect();
    let weights: Vec<String> = base
        .files
        .keys()
        .filter(|k| {
            k.ends_with(".safetensors") && (k.starts_with("unet/") || k.starts_with("text_encoder"))
        })
        .cloned()
        .collect();
    fuzz(
        parser,
        cases,
        prop::collection::vec(strategy, 1..=2),
        |edits| {
            let mut files = clone_files(&base);
            for e in &edits {
                match e {
                    FolderEdit::Config(i, e) => {
                        let path = configs[i % configs.len()];
                        let v: Value = files
                            .files
                            .get(path)
                            .and_then(|b| serde_json::from_slice(b).ok())
                            .unwrap_or(json!({}));
                        let text = apply(&v, folder_fields(path), e);
                        files.insert(path, text.into_bytes());
                    }
                    FolderEdit::Weights(i, e) => {
                        let path = &weights[i % weights.len()];
                        let bytes = apply_st(&base.files[path], e);
                        files.insert(path.clone(), bytes);
                    }
                    FolderEdit::RemoveFile(i) => {
                        let keys: Vec<String> = files.files.keys().cloned().collect();
                        files.files.remove(&keys[i % keys.len()]);
                    }
                }
            }
            match Pipeline::load(&files, &dev) {
                Err(e) => check_message(&e.to_string(), &files.name),
                Ok(pipe) => {
                    accepted();
                    // An accepted folder must also run: a prompt through the text encoder(s)
                    // and one guided UNet step.
                    let fail = |e: draft_core::Error| TestCaseError::fail(e.to_string());
                    let cond = pipe.encode(&["red circle".to_string()]).map_err(fail)?;
                    let uncond = pipe.encode_tokens(&pipe.tokenize_negative("").map_err(fail)?);
                    let [c, h, w] = pipe.latent_shape(8, 8).map_err(fail)?;
                    let conditioning =
                        pipe.conditioning(&cond, &uncond, 7.5, &Default::default(), [8, 8]);
                    let x = Tensor::<4>::zeros([1, c, h, w], &dev);
                    let y = conditioning.model_output(&pipe.unet, x, 500.0);
                    prop_assert_eq!(y.dims(), [1, c, h, w]);
                    Ok(())
                }
            }
        },
    );
}

/// What the pipeline does with prompts no one should send: none, or only padding.
#[test]
fn hostile_prompts() {
    let pipe = Pipeline::load(&embedded(), &device()).unwrap();
    let e = pipe.encode_prompts(&[]).unwrap_err();
    assert!(e.to_string().contains("prompt"), "{e}");
    let pad = "<|endoftext|>".repeat(pipe.tokenizer.max_length * 2);
    let cond = pipe
        .encode_prompts(&[pad, String::new(), " ".repeat(1000)])
        .unwrap();
    let (v, _) = common::values(cond);
    assert!(v.iter().all(|x| x.is_finite()));
}

// ---------------------------------------------------------------------------------------------
// LoRA files.

/// A layer's LoRA file tensors: the valid files of the embedded model's layers.
struct LoraFixtures {
    peft: Vec<u8>,
    kohya: Vec<u8>,
}

fn lora_fixtures(pipe: &Pipeline) -> LoraFixtures {
    pipe.lora.init_trainable(2, 2.0, 7, &pipe.device);
    // B starts at zero: give it values so that scales and shapes matter.
    let params: Vec<Tensor<2>> = pipe
        .lora
        .params()
        .into_iter()
        .map(|p| p.clone() + 0.01)
        .collect();
    pipe.lora.set_params(&params);
    LoraFixtures {
        peft: pollster::block_on(pipe.lora.to_safetensors()).unwrap(),
        kohya: pollster::block_on(pipe.lora.to_kohya_safetensors()).unwrap(),
    }
}

#[derive(Debug, Clone)]
enum LoraEdit {
    /// Header/byte level edits of the file.
    Bytes(Vec<StEdit>),
    /// Tensor `i` rewritten with another shape (its values resized), dtype or rank.
    Reshape(usize, Vec<usize>),
    Retype(usize, bool),
    /// A key renamed to something else, or to an unmatched layer.
    Rekey(usize, String),
    /// The kohya alpha of a layer set to a value.
    Alpha(usize, f32),
}

fn lora_edit() -> impl Strategy<Value = LoraEdit> {
    prop_oneof![
        3 => prop::collection::vec(st_edit(), 1..=2).prop_map(LoraEdit::Bytes),
        3 => (any::<usize>(), prop::collection::vec(0usize..70, 0..5))
            .prop_map(|(i, s)| LoraEdit::Reshape(i, s)),
        2 => (any::<usize>(), any::<bool>()).prop_map(|(i, b)| LoraEdit::Retype(i, b)),
        2 => (any::<usize>(), prop_oneof![
                text(),
                Just("unet.down_blocks.9.attentions.0.proj_in.lora_A.weight".to_string()),
                Just("lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight".to_string()),
                Just("lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha".to_string()),
                Just("text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_B.weight".to_string()),
            ])
            .prop_map(|(i, k)| LoraEdit::Rekey(i, k)),
        1 => (any::<usize>(), prop::sample::select(vec![0.0f32, -1.0, 1e30, f32::NAN, 4.0]))
            .prop_map(|(i, a)| LoraEdit::Alpha(i, a)),
    ]
}

/// The tensors of a (valid) safetensors file.
fn tensors(bytes: &[u8]) -> Vec<(String, Dtype, Vec<usize>, Vec<u8>)> {
    let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
    let mut out: Vec<_> = st
        .tensors()
        .into_iter()
        .map(|(k, v)| (k, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn apply_lora(bytes: &[u8], edits: &[LoraEdit]) -> Vec<u8> {
    let mut t = tensors(bytes);
    let mut raw = Vec::new();
    for e in edits {
        let n = t.len();
        match e {
            LoraEdit::Bytes(b) => raw.extend(b.iter().cloned()),
            LoraEdit::Reshape(i, shape) => {
                let (_, dtype, s, data) = &mut t[i % n];
                let size = dtype.bitsize() / 8;
                *s = shape.clone();
                data.resize(shape.iter().product::<usize>() * size, 0);
            }
            LoraEdit::Retype(i, half) => {
                let (_, dtype, _, data) = &mut t[i % n];
                if *dtype == Dtype::F32 {
                    let v: Vec<f32> = data
                        .chunks_exact(4)
                        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                        .collect();
                    if *half {
                        *dtype = Dtype::F16;
                        *data = v
                            .iter()
                            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                            .collect();
                    } else {
                        *dtype = Dtype::I32;
                        *data = v.iter().flat_map(|x| (*x as i32).to_le_bytes()).collect();
                    }
                }
            }
            LoraEdit::Rekey(i, k) => t[i % n].0 = k.clone(),
            LoraEdit::Alpha(i, a) => {
                let alphas: Vec<usize> = (0..n).filter(|&j| t[j].0.ends_with(".alpha")).collect();
                if !alphas.is_empty() {
                    let j = alphas[i % alphas.len()];
                    t[j].1 = Dtype::F32;
                    t[j].2 = vec![];
                    t[j].3 = a.to_le_bytes().to_vec();
                }
            }
        }
    }
    t.sort_by(|a, b| a.0.cmp(&b.0));
    t.dedup_by(|a, b| a.0 == b.0);
    let views: Vec<(&str, Dtype, Vec<usize>, &[u8])> = t
        .iter()
        .map(|(k, d, s, b)| (k.as_str(), *d, s.clone(), b.as_slice()))
        .collect();
    let bytes = serialize(&views);
    if raw.is_empty() {
        bytes
    } else {
        apply_st(&bytes, &raw)
    }
}

#[test]
fn lora_files() {
    let dev = device();
    let base = embedded();
    let trainable =
        Pipeline::load_with_lora(&base, &dev, &LoraSetup::Targets(LoraTarget::ALL.to_vec()))
            .unwrap();
    let fx = lora_fixtures(&trainable);
    for (name, bytes) in [("peft", &fx.peft), ("kohya", &fx.kohya)] {
        let f = LoraFile::parse(name, bytes).unwrap();
        trainable.lora.load_trainable(&f, 2.0, &dev).unwrap();
    }
    let n = Cell::new(0usize);
    let trainable = RefCell::new(trainable);
    fuzz(
        "LoRA files",
        2000,
        (any::<bool>(), prop::collection::vec(lora_edit(), 1..=3)),
        |(kohya, edits)| {
            let file = "runs/run-001/lora.safetensors";
            let bytes = apply_lora(if kohya { &fx.kohya } else { &fx.peft }, &edits);
            let f = match LoraFile::parse(file, &bytes) {
                Ok(f) => f,
                Err(e) => return check_message(&e.to_string(), file),
            };
            // Into training: every module must match a layer with its shapes and rank.
            match trainable.borrow().lora.load_trainable(&f, 2.0, &dev) {
                Ok(()) => accepted(),
                Err(e) => check_message(&e.to_string(), file)?,
            }
            // Into a pipeline at a scale (the user path of `draft sample --lora`), for some.
            n.set(n.get() + 1);
            if n.get().is_multiple_of(8) {
                let setup = LoraSetup::Files(vec![(&f, 0.5)]);
                match Pipeline::load_with_lora(&base, &dev, &setup) {
                    Ok(pipe) => {
                        let cond = pipe
                            .encode_prompts(&["red".to_string()])
                            .map_err(|e| TestCaseError::fail(e.to_string()))?;
                        let x = Tensor::<4>::zeros([1, 3, 8, 8], &dev);
                        let _ = pipe.unet.forward(x, 10.0, cond);
                    }
                    Err(e) => check_message(&e.to_string(), file)?,
                }
            }
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------------------------
// Reward models' weight files.

#[test]
fn aesthetic_weights() {
    let base = fixture("rewards/aesthetic-tiny.safetensors");
    let w = Weights::from_bytes("a", &base).unwrap();
    let dim = w.shape("layers.0.weight").unwrap()[1];
    let dev = device();
    AestheticMlp::load("a", &base, dim, &dev).unwrap();
    let file = "sac+logos+ava1-l14-linearMSE.safetensors";
    fuzz(
        "aesthetic MLP weights",
        1000,
        prop::collection::vec(lora_edit(), 1..=3),
        |edits| {
            let bytes = apply_lora(&base, &edits);
            match AestheticMlp::load(file, &bytes, dim, &dev) {
                Ok(_) => accepted(),
                Err(e) => check_message(&e.to_string(), file)?,
            }
            Ok(())
        },
    );
}

#[test]
fn clip_reward_models() {
    let config = fixture_text("clip-tiny/config.json");
    let weights = fixture("clip-tiny/model.safetensors");
    let oc_config = OpenClipConfig::from_json(
        "open_clip_config.json",
        &fixture_text("open-clip-tiny/open_clip_config.json"),
    )
    .unwrap();
    let oc_weights = fixture("open-clip-tiny/open_clip_model.safetensors");
    let dev = device();
    load_clip("config.json", &config, "model.safetensors", &weights, &dev).unwrap();
    load_open_clip(&oc_config, "open_clip_model.safetensors", &oc_weights, &dev).unwrap();
    let config_v: Value = serde_json::from_str(&config).unwrap();
    let fields = [
        "projection_dim",
        "vision_config.image_size",
        "vision_config.patch_size",
        "vision_config.hidden_size",
        "vision_config.num_hidden_layers",
        "text_config.vocab_size",
        "text_config.hidden_size",
        "text_config.eos_token_id",
        "text_config.max_position_embeddings",
    ];
    fuzz(
        "CLIP / OpenCLIP reward weights",
        1500,
        (
            0usize..3,
            prop::collection::vec(lora_edit(), 1..=2),
            edits(),
        ),
        |(which, w_edits, c_edits)| match which {
            0 => {
                let file = "clip/model.safetensors";
                let bytes = apply_lora(&weights, &w_edits);
                match load_clip("clip/config.json", &config, file, &bytes, &dev) {
                    Ok(_) => accepted(),
                    Err(e) => check_message(&e.to_string(), file)?,
                }
                Ok(())
            }
            1 => {
                let cfg = apply(&config_v, &fields, &c_edits);
                match load_clip(
                    "clip/config.json",
                    &cfg,
                    "clip/model.safetensors",
                    &weights,
                    &dev,
                ) {
                    Ok(_) => accepted(),
                    Err(e) => check_message(&e.to_string(), "clip/")?,
                }
                Ok(())
            }
            _ => {
                let file = "hpsv2/open_clip_model.safetensors";
                let bytes = apply_lora(&oc_weights, &w_edits);
                if let Err(e) = is_open_clip(file, &bytes) {
                    check_message(&e.to_string(), file)?;
                }
                match load_open_clip(&oc_config, file, &bytes, &dev) {
                    Ok(_) => accepted(),
                    Err(e) => check_message(&e.to_string(), file)?,
                }
                Ok(())
            }
        },
    );
}

/// Non-finite weights are refused at load time, naming the tensor.
#[test]
fn non_finite_weights_are_refused() {
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let data: Vec<u8> = [1.0, bad, 2.0]
            .iter()
            .flat_map(|x: &f32| x.to_le_bytes())
            .collect();
        let bytes = serialize(&[("layer.weight", Dtype::F32, vec![3], &data)]);
        let w = Weights::from_bytes("w.safetensors", &bytes).unwrap();
        let e = w.read_f32("layer.weight").unwrap_err().to_string();
        assert!(
            e.contains("w.safetensors") && e.contains("layer.weight"),
            "{e}"
        );
    }
    let big: Vec<u8> = 1e300f64.to_le_bytes().to_vec();
    let bytes = serialize(&[("x", Dtype::F64, vec![1], &big)]);
    let w = Weights::from_bytes("w.safetensors", &bytes).unwrap();
    assert!(w.read_f32("x").is_err());
}

// ---------------------------------------------------------------------------------------------
// Single-file LDM checkpoints: the architecture is inferred from the tensors' shapes.

#[test]
fn ldm_checkpoints() {
    fuzz_ldm(
        "LDM single-file checkpoint",
        "layouts/sd1-tiny.safetensors",
        "sd1-tiny",
        "models/sd1-tiny.safetensors",
        600,
    );
}

/// SDXL single files: two towers under `conditioner.embedders.`, the UNet's `label_emb`.
#[test]
fn sdxl_ldm_checkpoints() {
    fuzz_ldm(
        "SDXL single-file checkpoint",
        "sdxl-single/sdxl-tiny.safetensors",
        "sdxl-tiny",
        "models/sdxl-tiny.safetensors",
        300,
    );
}

fn fuzz_ldm(parser: &str, file: &str, tokenizer_of: &str, name: &str, cases: u32) {
    let base = fixture(file);
    let tokenizer = [
        (
            "vocab.json",
            fixture(&format!("{tokenizer_of}/tokenizer/vocab.json")),
        ),
        (
            "merges.txt",
            fixture(&format!("{tokenizer_of}/tokenizer/merges.txt")),
        ),
    ];
    let tokenizer: Vec<(&str, &[u8])> = tokenizer.iter().map(|(n, b)| (*n, b.as_slice())).collect();
    let dev = device();
    let files =
        draft_core::ModelFiles::from_checkpoint(name, base.clone(), None, &tokenizer).unwrap();
    Pipeline::load(&files, &dev).unwrap();
    let n = Cell::new(0usize);
    fuzz(
        parser,
        cases,
        prop::collection::vec(lora_edit(), 1..=3),
        |edits| {
            let bytes = apply_lora(&base, &edits);
            let files = match draft_core::ModelFiles::from_checkpoint(name, bytes, None, &tokenizer)
            {
                Ok(f) => {
                    accepted();
                    f
                }
                Err(e) => return check_message(&e.to_string(), name),
            };
            for c in ["unet", "vae", "text_encoder", "text_encoder_2"] {
                if c == "text_encoder_2" && !files.has("text_encoder_2/config.json") {
                    continue;
                }
                if let Err(e) = files.component_weights(c) {
                    check_message(&e.to_string(), name)?;
                }
            }
            n.set(n.get() + 1);
            if n.get().is_multiple_of(4)
                && let Err(e) = Pipeline::load(&files, &dev)
            {
                check_message(&e.to_string(), name)?;
            }
            Ok(())
        },
    );
}
