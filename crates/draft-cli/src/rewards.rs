//! The weight files of learned rewards (`--reward-model NAME=PATH`), read from disk for the
//! core's [`draft_core::reward::files`], which checks and builds them (the browser page passes
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
//! PyTorch pickles (`.pt`, `.pth`, `.bin`, `.ckpt`) are read ([`crate::files::read_weights`]) with Burn's `pytorch-reader` and
//! turned into safetensors in memory, kept under their own names; a `state_dict.` or DDP
//! `module.` prefix is dropped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::prelude::Device;
use draft_core::ModelFiles;
use draft_core::model::files::TOKENIZER_FILES;
use draft_core::reward::builtin::{RewardOptions, WeightedReward};
use draft_core::reward::files::{MODEL_NAMES, RewardSource, needed_models};

use crate::files::{self, read_weights};

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
                files::read(&p)?
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
pub struct RewardFiles(draft_core::reward::files::RewardFiles);

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
        let files = draft_core::reward::files::RewardFiles::new(specs, sources)?;
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
