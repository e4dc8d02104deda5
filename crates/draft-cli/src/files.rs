//! Reading a diffusers model folder and tensor files from disk.

use std::path::Path;

use anyhow::{Context, Result, bail};
use burn::prelude::{Device, Tensor};
use draft_core::ModelFiles;
use draft_core::weights::Weights;

/// The standard CLIP BPE tokenizer SD-1.x/2.x were trained with (49408 tokens; the files
/// `tests/fixtures/make_fixtures.py` rebuilds from open_clip's vocabulary): single-file
/// checkpoints carry none.
const CLIP_TOKENIZER: [(&str, &[u8]); 2] = [
    (
        "vocab.json",
        include_bytes!("../../../tests/fixtures/clip-tokenizer/vocab.json"),
    ),
    (
        "merges.txt",
        include_bytes!("../../../tests/fixtures/clip-tokenizer/merges.txt"),
    ),
];

/// `--model PATH` (with `--variant`, `--model-config`): a diffusers folder, a single-file
/// checkpoint, or without a path the embedded model.
pub fn read_model(
    path: Option<&Path>,
    variant: Option<&str>,
    config: Option<&Path>,
) -> Result<ModelFiles> {
    let Some(path) = path else {
        if variant.is_some() || config.is_some() {
            bail!("--variant and --model-config need --model");
        }
        return Ok(draft_core::default_model::files());
    };
    if path.is_dir() {
        if config.is_some() {
            bail!(
                "--model-config is for a single-file checkpoint; {} is a folder with its own configs",
                path.display()
            );
        }
        return read_model_dir(path, variant);
    }
    if !path.is_file() {
        bail!(
            "{}: model folder or checkpoint file not found",
            path.display()
        );
    }
    if variant.is_some() {
        bail!(
            "--variant selects files in a diffusers folder; {} is a single file",
            path.display()
        );
    }
    let (name, bytes) = crate::rewards::read_weights(path)?;
    let config = config.map(read_config_dir).transpose()?;
    Ok(draft_core::layouts::ldm::model_files(
        &name,
        bytes,
        config.as_ref(),
        &CLIP_TOKENIZER,
    )?)
}

/// Reads every file of the diffusers layout that exists under `dir`, the weights of `variant`
/// (PyTorch `.bin` weights converted to safetensors in memory).
pub fn read_model_dir(dir: &Path, variant: Option<&str>) -> Result<ModelFiles> {
    if !dir.is_dir() {
        bail!("{}: model folder not found", dir.display());
    }
    ModelFiles::read_layout_variant(dir.display().to_string(), variant, |rel| {
        let path = dir.join(rel);
        if !path.is_file() {
            return Ok(None);
        }
        if rel.ends_with(".bin") {
            return crate::rewards::pytorch_to_safetensors(&path).map(Some);
        }
        let bytes =
            std::fs::read(&path).with_context(|| format!("{}: cannot read", path.display()))?;
        Ok(Some(bytes))
    })
}

/// The config and tokenizer files of a diffusers folder, without its weights.
fn read_config_dir(dir: &Path) -> Result<ModelFiles> {
    if !dir.is_dir() {
        bail!("{}: --model-config folder not found", dir.display());
    }
    ModelFiles::read_configs(dir.display().to_string(), |rel| {
        let path = dir.join(rel);
        path.is_file().then(|| read(&path)).transpose()
    })
}

/// `--init-noise`: the tensor `noise` [B, C, h, w] of a safetensors file (`name` in messages),
/// float, finite, no axis empty. Its shape against the model is the caller's check.
pub fn init_noise(name: &str, bytes: &[u8], device: &Device) -> Result<Tensor<4>> {
    let noise = Weights::from_bytes(name, bytes)?.tensor::<4>("noise", device)?;
    let dims = noise.dims();
    if dims.contains(&0) {
        bail!("{name}: tensor `noise` has shape {dims:?}, with an empty axis");
    }
    Ok(noise)
}

pub fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a reader never sees a
/// half-written file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("{}: cannot create", parent.display()))?;
    }
    let tmp = path.with_extension("tmp");
    let written = (|| {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        // Flushed to disk before the rename: a crash leaves the old file or the new one.
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if let Err(e) = written {
        // A full or read-only disk: the previous file stays as it was, no partial file is left.
        let _ = std::fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("{}: cannot write", path.display()));
    }
    Ok(())
}
