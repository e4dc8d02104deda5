//! Fixture access shared by the integration tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use burn::prelude::*;
use draft_core::ModelFiles;

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

pub fn read_model(dir: &Path) -> ModelFiles {
    ModelFiles::read_layout(dir.display().to_string(), |rel| {
        Ok::<_, ()>(std::fs::read(dir.join(rel)).ok())
    })
    .unwrap()
}

/// The devices every parity test runs on. `DRAFT_TEST_DEVICES=cpu` limits a local run to the
/// CPU; CI sets nothing, so wgpu (lavapipe) runs there and a missing adapter fails the test.
pub fn devices() -> Vec<(&'static str, Device)> {
    let mut out = vec![("cpu", Device::flex())];
    if std::env::var("DRAFT_TEST_DEVICES").as_deref() != Ok("cpu") {
        out.push(("wgpu", Device::wgpu(Default::default())));
    }
    out
}

pub fn values<const D: usize>(t: Tensor<D>) -> (Vec<f32>, Vec<usize>) {
    pollster::block_on(draft_core::read_f32(t)).unwrap()
}

/// max |a − b| / max |b|.
pub fn rel_err(got: &[f32], want: &[f32]) -> f32 {
    assert_eq!(got.len(), want.len());
    let max_ref = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = got
        .iter()
        .zip(want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    err / max_ref.max(1e-30)
}
