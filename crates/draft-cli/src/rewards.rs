//! The weight files of learned rewards (`--reward-model NAME=PATH`), read from disk for the
//! core's [`draft_core::reward_files`], which checks and builds them (the browser page passes
//! the same sources from memory). Shared by `draft train` and `draft score`.
//!
//! | NAME | PATH | used by |
//! |---|---|---|
//! | `clip` | a CLIP folder: transformers (`config.json` + `model.safetensors` / `pytorch_model.bin`) or OpenCLIP (`open_clip_config.json` + `open_clip_model.safetensors` / `open_clip_pytorch_model.bin`) | `laion-aesthetic`, `clip-score` |
//! | `pickscore` | a transformers CLIP folder (yuvalkirstain/PickScore_v1) | `pickscore` |
//! | `hpsv2` | an OpenCLIP folder, or a checkpoint file (`HPS_v2.1_compressed.pt`, `.safetensors`); a file's architecture is a sibling `open_clip_config.json`, else ViT-H-14 | `hpsv2` |
//! | `laion-aesthetic` | the aesthetic MLP (`sac+logos+ava1-l14-linearMSE.pth` or safetensors) | `laion-aesthetic` |
//! | `tokenizer` | a folder with a CLIP `tokenizer.json` or `vocab.json` + `merges.txt`, for reward models that ship none | prompt rewards |
//!
//! PyTorch pickles (`.pt`, `.pth`, `.bin`, `.ckpt`) are read with Burn's `pytorch-reader` and
//! turned into safetensors in memory, kept under their own names; a `state_dict.` or DDP
//! `module.` prefix is dropped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::prelude::Device;
use draft_core::ModelFiles;
use draft_core::pipeline::TOKENIZER_FILES;
use draft_core::reward::{RewardOptions, WeightedReward};
use draft_core::reward_files::{MODEL_NAMES, RewardSource, needed_models};

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
    draft_core::weights::serialize(&raw, None).with_context(|| format!("{name}: cannot convert"))
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

/// One `--reward-model` path read: a folder's files ([`RewardSource::folder_files`]; only the
/// tokenizer files for `tokenizer`), or a weights file with its sibling `open_clip_config.json`.
fn read_source(role: &str, path: &Path) -> Result<RewardSource> {
    if role == "laion-aesthetic" {
        let (name, bytes) = read_weights(path)?;
        return Ok(RewardSource::File {
            name,
            bytes,
            open_clip_config: None,
        });
    }
    if role == "tokenizer" || path.is_dir() {
        let mut files = ModelFiles::new(path.display().to_string());
        let present = |n: &str| path.join(n).is_file();
        let names = if role == "tokenizer" {
            TOKENIZER_FILES.into_iter().filter(|n| present(n)).collect()
        } else {
            RewardSource::folder_files(present)
        };
        for name in names {
            let p = path.join(name);
            let bytes = if name.ends_with(".bin") {
                read_weights(&p)?.1
            } else {
                crate::files::read(&p)?
            };
            files.insert(name, bytes);
        }
        return Ok(RewardSource::Folder(files));
    }
    if !path.is_file() {
        bail!("--reward-model {role}={}: not found", path.display());
    }
    let (name, bytes) = read_weights(path)?;
    let sibling = path.with_file_name("open_clip_config.json");
    let open_clip_config = if sibling.is_file() {
        let text = std::fs::read_to_string(&sibling)
            .with_context(|| format!("{}: cannot read", sibling.display()))?;
        Some((sibling.display().to_string(), text))
    } else {
        None
    };
    Ok(RewardSource::File {
        name,
        bytes,
        open_clip_config,
    })
}

/// Everything `--reward`/`--reward-model` name, read before any model is built.
pub struct RewardFiles(draft_core::reward_files::RewardFiles);

impl RewardFiles {
    /// Parses `NAME=PATH`, reads what the rewards in `specs` need, and has the core check it.
    pub fn read(specs: &[String], models: &[String]) -> Result<Self> {
        let mut paths = BTreeMap::new();
        for m in models {
            let Some((name, path)) = m.split_once('=') else {
                bail!("--reward-model `{m}`: expected NAME=PATH");
            };
            if !MODEL_NAMES.contains(&name) {
                bail!(
                    "--reward-model `{name}`: expected one of {}",
                    MODEL_NAMES.join(", ")
                );
            }
            paths.insert(name.to_string(), PathBuf::from(path));
        }
        // In the core's order, up to the first missing one (which the core reports).
        let mut sources = BTreeMap::new();
        let mut complete = true;
        for (role, _) in needed_models(specs)? {
            let Some(path) = paths.get(role) else {
                complete = false;
                break;
            };
            sources.insert(role.to_string(), read_source(role, path)?);
        }
        if let (true, Some(dir)) = (complete, paths.get("tokenizer")) {
            sources.insert("tokenizer".into(), read_source("tokenizer", dir)?);
        }
        let files = draft_core::reward_files::RewardFiles::new(specs, sources)?;
        for note in files.notes() {
            eprintln!("draft: {note}");
        }
        Ok(Self(files))
    }

    /// Builds every reward term. A prompt reward takes its tokenizer from its own folder,
    /// else `--reward-model tokenizer=DIR`, else the diffusion model's (`model`, if given).
    pub fn build(
        self,
        specs: &[String],
        options: &RewardOptions,
        model: Option<&ModelFiles>,
        device: &Device,
    ) -> Result<WeightedReward> {
        Ok(self.0.build(specs, options, model, device)?)
    }
}
