//! Reading a diffusers model folder and tensor files from disk.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use burn::prelude::{Device, Tensor};
use draft_core::ModelFiles;
use draft_core::model::files::FileData;
use draft_core::model::source::FileSource;
use draft_core::model::weights::Weights;

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
        return Ok(draft_core::data::default_model::files());
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
    let (name, data) = open_weights(path)?;
    let config = config.map(read_config_dir).transpose()?;
    Ok(draft_core::ModelFiles::from_checkpoint(
        &name,
        data,
        config.as_ref(),
        &draft_core::model::tokenizer::CLIP_BPE_FILES,
    )?)
}

/// A weights file as the loader reads it: `.safetensors` by range, one tensor at a time (never
/// read whole: a 4 GB checkpoint would be held twice during the load), PyTorch pickles
/// converted in memory.
pub fn open_weights(path: &Path) -> Result<(String, FileData)> {
    let name = path.display().to_string();
    let is_safetensors = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"));
    if is_safetensors {
        let source = FileSource::open(path).with_context(|| format!("{name}: cannot read"))?;
        return Ok((name, FileData::Source(std::rc::Rc::new(source))));
    }
    let (name, bytes) = read_weights(path)?;
    Ok((name, FileData::Bytes(bytes)))
}

/// Reads every file of the diffusers layout that exists under `dir`, the weights of `variant`
/// (PyTorch `.bin` weights converted to safetensors in memory).
pub fn read_model_dir(dir: &Path, variant: Option<&str>) -> Result<ModelFiles> {
    if !dir.is_dir() {
        bail!("{}: model folder not found", dir.display());
    }
    ModelFiles::read_layout_from(dir.display().to_string(), variant, |rel| {
        let path = dir.join(rel);
        if !path.is_file() {
            return Ok(None);
        }
        if rel.ends_with(".bin") {
            return pytorch_to_safetensors(&path).map(|b| Some(FileData::Bytes(b)));
        }
        if rel.ends_with(".safetensors") {
            return open_weights(&path).map(|(_, data)| Some(data));
        }
        let bytes =
            std::fs::read(&path).with_context(|| format!("{}: cannot read", path.display()))?;
        Ok(Some(FileData::Bytes(bytes)))
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

/// Reads a weights file as safetensors bytes: `.safetensors` as is, PyTorch pickles converted.
pub fn read_weights(path: &Path) -> Result<(String, Vec<u8>)> {
    let name = path.display().to_string();
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    match ext.as_str() {
        "safetensors" => Ok((name, crate::files::read(path)?)),
        "pt" | "pth" | "bin" | "ckpt" => Ok((name, pytorch_to_safetensors(path)?)),
        _ => bail!("{name}: expected a .safetensors file or a PyTorch .pt/.pth/.bin/.ckpt file"),
    }
}

/// A PyTorch checkpoint's tensors as an in-memory safetensors file (float tensors as f32/f16/
/// bf16, integer ones as i64/i32).
pub fn pytorch_to_safetensors(path: &Path) -> Result<Vec<u8>> {
    use pytorch_reader::{DType, PytorchReader};
    use safetensors::Dtype;
    let name = path.display();
    let reader = PytorchReader::new(path)
        .map_err(|e| one_line_error(&name, "not a readable PyTorch file", e))?;
    let all = reader.tensors();
    // HPSv2 saves {"state_dict": …, "epoch": …}; DDP training prefixes `module.`.
    let strip = |k: &str| -> String {
        let k = k.strip_prefix("state_dict.").unwrap_or(k);
        k.strip_prefix("module.").unwrap_or(k).to_string()
    };
    let nested = all.keys().any(|k| k.starts_with("state_dict."));
    let mut out: BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> = BTreeMap::new();
    for (key, t) in all {
        if nested && !key.starts_with("state_dict.") {
            continue;
        }
        let key = strip(key);
        let bytes = t
            .read()
            .map_err(|e| one_line_error(&name, &format!("cannot read tensor {key:?}"), e))?;
        let (dtype, bytes) = match t.dtype() {
            DType::F32 => (Dtype::F32, bytes),
            DType::F16 => (Dtype::F16, bytes),
            DType::BF16 => (Dtype::BF16, bytes),
            DType::F64 => (
                Dtype::F32,
                bytes
                    .chunks_exact(8)
                    .flat_map(|b| (f64::from_le_bytes(b.try_into().unwrap()) as f32).to_le_bytes())
                    .collect(),
            ),
            DType::I64 => (Dtype::I64, bytes),
            DType::I32 => (Dtype::I32, bytes),
            // Buffers such as masks and counters: no reward model reads them.
            _ => continue,
        };
        out.insert(key, (dtype, t.shape().to_vec(), bytes));
    }
    if out.is_empty() {
        bail!("{name}: no tensors found");
    }
    let raw: Vec<_> = out
        .into_iter()
        .map(|(k, (dtype, shape, bytes))| (k, dtype, shape, bytes))
        .collect();
    draft_core::model::weights::serialize(&raw, None)
        .with_context(|| format!("{name}: cannot convert"))
}

/// `{name}: {what}: {e}` on one line: the reader's messages quote the file's own bytes.
fn one_line_error(
    name: &impl std::fmt::Display,
    what: &str,
    e: impl std::fmt::Display,
) -> anyhow::Error {
    let msg = format!("{name}: {what}: {e}");
    anyhow::anyhow!("{}", draft_core::error::one_line(&msg))
}
