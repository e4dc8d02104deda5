//! In a dedicated worker of a real browser — where the page's trainer runs — weights read by
//! range: sd1-tiny's `.safetensors` files as `Blob`s (what a picked `File` and an OPFS file
//! are), read one tensor at a time through `FileReaderSync`, sample diffusers' images, as a
//! folder and as a single file; and a single file of SD-1.5's full size (2 GB in f16) goes to
//! WebGPU with WebAssembly's memory growing by less than one piece of a tensor and a fixed budget.
//! `wasm-pack test --release --headless --chrome crates/draft-web` runs it with `browser.rs`.

#![cfg(target_arch = "wasm32")]

mod common;

use common::*;
use wasm_bindgen::prelude::*;
use wasm_bindgen_test::*;

wasm_bindgen_test_configure!(run_in_dedicated_worker);

#[wasm_bindgen(inline_js = r#"
export function make_blob(bytes) { return new Blob([bytes]); }
// `header` then `body` bytes of a repeating pattern, without holding them in one buffer: the
// parts of a Blob are copied into the browser's blob store.
export function make_large_blob(header, body) {
  const chunk = new Uint8Array(1 << 24);
  for (let i = 0; i < chunk.length; i++) chunk[i] = (i * 131) & 0x3b;
  const parts = [header];
  for (let left = body; left > 0; left -= chunk.length) {
    parts.push(left >= chunk.length ? chunk : chunk.subarray(0, left));
  }
  return new Blob(parts);
}
export function wasm_memory_bytes(memory) { return memory.buffer.byteLength; }
"#)]
extern "C" {
    fn make_blob(bytes: &[u8]) -> JsValue;
    fn make_large_blob(header: &[u8], body: f64) -> JsValue;
    fn wasm_memory_bytes(memory: &JsValue) -> f64;
}

/// The heap as the allocator sees it: live bytes, their peak since [`heap_reset`], and the
/// largest single allocation since then (WebAssembly memory only grows, so these say what a
/// phase needed where its size cannot).
mod heap {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
    pub static LIVE: AtomicUsize = AtomicUsize::new(0);
    pub static PEAK: AtomicUsize = AtomicUsize::new(0);
    pub static LARGEST: AtomicUsize = AtomicUsize::new(0);
    /// Allocations of 64 MiB or more since the last phase: how many, and how many of them grew
    /// a block in place (`realloc`: a vector that doubled).
    pub static BIG: AtomicUsize = AtomicUsize::new(0);
    pub static BIG_REALLOC: AtomicUsize = AtomicUsize::new(0);
    pub struct Counting;
    fn grew(n: usize) {
        let live = LIVE.fetch_add(n, Relaxed) + n;
        PEAK.fetch_max(live, Relaxed);
        LARGEST.fetch_max(n, Relaxed);
        if n >= 64 << 20 {
            BIG.fetch_add(1, Relaxed);
        }
    }
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, l: Layout) -> *mut u8 {
            grew(l.size());
            unsafe { System.alloc(l) }
        }
        unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
            grew(l.size());
            unsafe { System.alloc_zeroed(l) }
        }
        unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
            LIVE.fetch_sub(l.size(), Relaxed);
            unsafe { System.dealloc(p, l) }
        }
        unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
            LIVE.fetch_sub(l.size(), Relaxed);
            if new >= 64 << 20 {
                BIG_REALLOC.fetch_add(1, Relaxed);
            }
            grew(new);
            unsafe { System.realloc(p, l, new) }
        }
    }
    #[global_allocator]
    static A: Counting = Counting;
    /// (live, peak, largest) in MiB, and the peak and largest restarted.
    pub fn phase() -> String {
        let mib = |a: &AtomicUsize| a.load(Relaxed) as f64 / (1 << 20) as f64;
        let s = format!(
            "live {:.0} MiB, peak {:.0} MiB, largest allocation {:.0} MiB, {} of ≥ 64 MiB \
             ({} by realloc)",
            mib(&LIVE),
            mib(&PEAK),
            mib(&LARGEST),
            BIG.load(Relaxed),
            BIG_REALLOC.load(Relaxed)
        );
        PEAK.store(LIVE.load(Relaxed), Relaxed);
        LARGEST.store(0, Relaxed);
        BIG.store(0, Relaxed);
        BIG_REALLOC.store(0, Relaxed);
        s
    }
}

/// The size of this module's WebAssembly memory (it only grows: after a load, its peak).
fn wasm_memory() -> u64 {
    wasm_memory_bytes(&wasm_bindgen::memory()) as u64
}

#[wasm_bindgen_test]
async fn sd1_weights_read_by_range_from_blobs_sample_like_diffusers() {
    let mut files = sd1_files();
    let weights: Vec<String> = files
        .files
        .keys()
        .filter(|k| k.ends_with(".safetensors"))
        .cloned()
        .collect();
    assert_eq!(weights.len(), 3);
    for path in weights {
        let bytes = files.files.remove(&path).unwrap();
        files.insert_source(path, draft_web::blob_source(make_blob(&bytes)));
    }
    assert!(files.files.keys().all(|k| !k.ends_with(".safetensors")));
    // The CPU backend, as the page offers it: the point is the reading, not the device.
    let (got, want) = sample_sd1_from(&files, &burn::prelude::Device::flex()).await;
    let err = max_abs_diff(&got, &want);
    console_log!("sd1-tiny from Blobs read by range (worker, CPU backend) vs diffusers: {err:.2e}");
    assert!(err <= 1e-4, "max abs error {err:e}");
}

#[wasm_bindgen_test]
async fn sd1_single_file_read_by_range_from_a_blob_samples_like_diffusers() {
    const CHECKPOINT: &[u8] =
        include_bytes!("../../../tests/fixtures/layouts/sd1-tiny.safetensors");
    // sd1-tiny's configs and its own small tokenizer (the page's folder picked beside the
    // file, as the CLI's --model-config): the standard CLIP tokenizer has more tokens than
    // sd1-tiny's text encoder.
    let mut config = sd1_files();
    config.files.retain(|k, _| !k.ends_with(".safetensors"));
    let files = draft_web::single_file_model(
        "sd1-tiny.safetensors",
        draft_core::model::files::FileData::Source(draft_web::blob_source(make_blob(CHECKPOINT))),
        Some(&config),
    )
    .unwrap();
    assert!(
        files
            .files
            .keys()
            .all(|k| !k.ends_with(".safetensors") && k != "checkpoint")
    );
    let (got, want) = sample_sd1_from(&files, &burn::prelude::Device::flex()).await;
    let err = max_abs_diff(&got, &want);
    console_log!("sd1-tiny single file from a Blob (worker, CPU backend) vs diffusers: {err:.2e}");
    assert!(err <= 1e-4, "max abs error {err:e}");
}

/// The LDM keys and shapes of a pruned SD-1.5 checkpoint (`tests/fixtures/layouts`), as a
/// safetensors header of f16 tensors (`position_ids` i64): the header's bytes, the data's
/// length and the largest tensor's element count (held whole on the device only).
fn sd15_header() -> (Vec<u8>, u64, u64) {
    let all: serde_json::Value = serde_json::from_str(include_str!(
        "../../../tests/fixtures/layouts/ldm_shapes.json"
    ))
    .unwrap();
    let shapes: std::collections::BTreeMap<String, Vec<u64>> =
        serde_json::from_value(all["sd15"].clone()).unwrap();
    let mut header = serde_json::Map::new();
    let (mut offset, mut largest) = (0u64, 0u64);
    for (key, shape) in &shapes {
        let n: u64 = shape.iter().product();
        let (dtype, size) = if key.ends_with("position_ids") {
            ("I64", 8)
        } else {
            ("F16", 2)
        };
        header.insert(
            key.clone(),
            serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n * size]}),
        );
        offset += n * size;
        largest = largest.max(n);
    }
    let mut json = serde_json::to_vec(&header).unwrap();
    while json.len() % 8 != 0 {
        json.push(b' ');
    }
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend(json);
    (bytes, offset, largest)
}

#[wasm_bindgen_test]
async fn a_full_size_sd15_file_goes_to_webgpu_without_filling_webassembly_memory() {
    use draft_core::model::pipeline::LoraSetup;
    let (header, body, largest) = sd15_header();
    let blob = make_large_blob(&header, body as f64);
    let (device, name) = draft_web::open_device("webgpu").await.unwrap();
    let dtype = draft_web::weights_dtype(&device);
    let before = wasm_memory();
    let start = js_sys::Date::now();
    let files = draft_web::single_file_model(
        "sd15-sized.safetensors",
        draft_core::model::files::FileData::Source(draft_web::blob_source(blob)),
        None,
    )
    .unwrap();
    console_log!(
        "configs and header: {}; memory {} MiB",
        heap::phase(),
        wasm_memory() >> 20
    );
    drop(draft_core::model::files::load_tokenizer(&files).unwrap());
    console_log!(
        "standard tokenizer: {}; memory {} MiB",
        heap::phase(),
        wasm_memory() >> 20
    );
    let pipe = draft_core::Pipeline::load_with(
        &files,
        &device,
        &LoraSetup::Targets(draft_core::train::config::TrainConfig::default().lora_targets),
        dtype,
    )
    .unwrap();
    console_log!(
        "pipeline load: {}; memory {} MiB",
        heap::phase(),
        wasm_memory() >> 20
    );
    // Every upload done before measuring, and the standard CLIP tokenizer with the text
    // encoder run once: [1, 77, 768].
    let (_, dims) =
        draft_core::read_f32(pipe.encode_prompts(&["a photo of a cat".into()]).unwrap())
            .await
            .unwrap();
    let seconds = (js_sys::Date::now() - start) / 1e3;
    let grown = wasm_memory().saturating_sub(before);
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    // What the host holds at once: one piece of a tensor (tensors over UPLOAD_FLUSH_BYTES in
    // f32 load in pieces of rows of at most that, joined on the device; the largest, the UNet's
    // [1280, 2560, 3, 3] kernel, is 112 MiB in f32) as read (f16: half) and as converted (f32),
    // the uploads that may wait for a flush (UPLOAD_FLUSH_BYTES), and a fixed budget for the
    // header, the configs, the tokenizer and the allocator's slack (measured 2026-12-07: with
    // whole tensors the heap peaked at 210 MiB and the memory grew by 283 MiB).
    let budget = 128 << 20;
    let flush = draft_core::model::var_builder::UPLOAD_FLUSH_BYTES;
    let piece = flush + flush / 2;
    let bound = piece + flush + budget;
    console_log!(
        "SD-1.5-sized single file ({:.0} MiB of f16 weights) to {name} in {dtype:?}: {seconds:.1} s; \
         WebAssembly memory {:.0} → {:.0} MiB (+{:.0} MiB; bound {:.0} MiB = a piece of {:.0} MiB \
         in f32 + f16, + {:.0} MiB of unflushed uploads + {:.0} MiB; the largest tensor is \
         {:.0} MiB in f32)",
        mib(body),
        mib(before),
        mib(before + grown),
        mib(grown),
        mib(bound),
        mib(piece),
        mib(flush),
        mib(budget),
        mib(largest * 4)
    );
    assert_eq!(dims, [1, 77, 768]);
    assert!(
        grown <= bound,
        "WebAssembly memory grew by {} MiB",
        mib(grown)
    );
    assert!(
        grown < body / 4,
        "grew by {:.0} MiB of {:.0}",
        mib(grown),
        mib(body)
    );
}
