//! In a dedicated worker of a real browser — where the page's trainer runs — weights read by
//! range: sd1-tiny's `.safetensors` files as `Blob`s (what a picked `File` and an OPFS file
//! are), read one tensor at a time through `FileReaderSync`, sample diffusers' images.
//! `wasm-pack test --release --headless --chrome crates/draft-web` runs it with `browser.rs`.

#![cfg(target_arch = "wasm32")]

mod common;

use common::*;
use wasm_bindgen::prelude::*;
use wasm_bindgen_test::*;

wasm_bindgen_test_configure!(run_in_dedicated_worker);

#[wasm_bindgen(inline_js = "export function make_blob(bytes) { return new Blob([bytes]); }")]
extern "C" {
    fn make_blob(bytes: &[u8]) -> JsValue;
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
