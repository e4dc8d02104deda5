//! In a real browser on WebGPU (headless Chromium in CI):
//! `wasm-pack test --release --headless --chrome crates/draft-web` (the flags Chromium needs
//! are in `crates/draft-web/webdriver.json`). The same checks run natively in `native.rs`.

#![cfg(target_arch = "wasm32")]

mod common;

use common::*;
use draft_core::model::weights::Weights;
use wasm_bindgen_test::*;

wasm_bindgen_test_configure!(run_in_browser);

const NATIVE: &[u8] = include_bytes!("../../../tests/fixtures/web/shapes-32-native.safetensors");

async fn webgpu() -> burn::prelude::Device {
    let (device, name) = draft_web::open_device("webgpu").await.unwrap();
    console_log!("device: {name}");
    device
}

#[wasm_bindgen_test]
async fn sampling_matches_the_native_result() {
    let device = webgpu().await;
    let w = Weights::from_bytes("shapes-32-native.safetensors", NATIVE).unwrap();
    let images = sample_shapes(&device, w.tensor::<4>("noise", &device).unwrap()).await;
    let err = max_abs_diff(&images, &w.read_f32("images").unwrap().0);
    console_log!("shapes-32 WebGPU vs native: max abs error {err:.2e}");
    assert!(err <= 1e-4, "max abs error {err:e}");
}

#[wasm_bindgen_test]
async fn sd1_sampling_matches_diffusers() {
    let (got, want) = sample_sd1(&webgpu().await).await;
    let err = max_abs_diff(&got, &want);
    console_log!("sd1-tiny WebGPU vs diffusers: max abs error {err:.2e}");
    assert!(err <= 1e-4, "max abs error {err:e}");
}

#[wasm_bindgen_test]
async fn one_draft_k_update_raises_the_reward() {
    let u = draft_k_update("webgpu").await;
    console_log!(
        "WebGPU: evaluation reward {:.4} → {:.4}, max |ΔLoRA| {:.2e}, batch reward {:.4}, {:.1} s",
        u.before,
        u.after,
        u.lora_change,
        u.metrics.reward_mean,
        u.metrics.seconds
    );
    assert!(u.lora_change > 1e-4, "the LoRA did not move");
    assert!(u.after > u.before + 1e-3, "{} → {}", u.before, u.after);
    // The same evaluation set and update as natively (wgpu's gradients differ from the CPU's
    // by ~4e-4 relative, docs/parity.md).
    let w = Weights::from_bytes("shapes-32-native.safetensors", NATIVE).unwrap();
    let native = w.read_f32("draft_k_reward").unwrap().0;
    let err = max_abs_diff(&[u.before as f32, u.after as f32], &native);
    console_log!("evaluation rewards vs native {native:?}: max abs error {err:.2e}");
    assert!(
        err <= 1e-3,
        "native {native:?}, here {} → {}",
        u.before,
        u.after
    );
}

#[wasm_bindgen_test]
async fn one_update_on_the_learned_aesthetic_reward() {
    let u = aesthetic_update("webgpu").await;
    console_log!(
        "WebGPU, laion-aesthetic: evaluation reward {:.6} → {:.6} (native {AESTHETIC_NATIVE:?}), max |ΔLoRA| {:.2e}",
        u.before,
        u.after,
        u.lora_change
    );
    assert!(u.lora_change > 1e-4, "the LoRA did not move");
    let err = max_abs_diff(&[u.before as f32, u.after as f32], &AESTHETIC_NATIVE);
    assert!(err <= 1e-3, "vs native: max abs error {err:e}");
}
