//! The weight files of learned rewards (`--reward-model NAME=PATH`), read from disk into the
//! core's reward models. Shared by `draft train` and `draft score`.
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
//! turned into safetensors in memory; a `state_dict.` or DDP `module.` prefix is dropped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result, bail};
use burn::prelude::Device;
use draft_core::ModelFiles;
use draft_core::models::clip::CLIPModel;
use draft_core::models::open_clip::OpenClipConfig;
use draft_core::pipeline::{TOKENIZER_FILES, load_tokenizer_in};
use draft_core::reward::{Reward, RewardOptions, WeightedReward, parse_spec};
use draft_core::reward_models::{
    AestheticMlp, ClipSimilarity, LaionAesthetic, Similarity, is_open_clip, load_clip,
    load_open_clip,
};
use draft_core::tokenizer::ClipTokenizer;

pub const MODEL_NAMES: [&str; 5] = ["clip", "pickscore", "hpsv2", "laion-aesthetic", "tokenizer"];

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

/// How a CLIP model's weights are laid out.
enum Layout {
    /// transformers: its `config.json` (name, text).
    Transformers(String, String),
    OpenClip(OpenClipConfig),
}

/// A CLIP reward model read from disk, not yet built.
struct ClipFiles {
    layout: Layout,
    weights: (String, Vec<u8>),
    /// Its own tokenizer files, when the folder has them.
    tokenizer: Option<ModelFiles>,
}

impl ClipFiles {
    fn read(role: &str, path: &Path) -> Result<Self> {
        if path.is_dir() {
            let first = |names: &[&str]| names.iter().map(|n| path.join(n)).find(|p| p.is_file());
            let tokenizer = read_tokenizer_dir(path)?;
            if path.join("open_clip_config.json").is_file() {
                let config = path.join("open_clip_config.json");
                let text = std::fs::read_to_string(&config)
                    .with_context(|| format!("{}: cannot read", config.display()))?;
                let c = OpenClipConfig::from_json(&config.display().to_string(), &text)?;
                let Some(w) =
                    first(&["open_clip_model.safetensors", "open_clip_pytorch_model.bin"])
                else {
                    bail!(
                        "{}: an OpenCLIP folder needs open_clip_model.safetensors or open_clip_pytorch_model.bin",
                        path.display()
                    );
                };
                return Ok(Self {
                    layout: Layout::OpenClip(c),
                    weights: read_weights(&w)?,
                    tokenizer,
                });
            }
            let config = path.join("config.json");
            if !config.is_file() {
                bail!(
                    "--reward-model {role}={}: neither config.json (transformers) nor open_clip_config.json (OpenCLIP) found",
                    path.display()
                );
            }
            let text = std::fs::read_to_string(&config)
                .with_context(|| format!("{}: cannot read", config.display()))?;
            let Some(w) = first(&["model.safetensors", "pytorch_model.bin"]) else {
                bail!(
                    "{}: a transformers CLIP folder needs model.safetensors or pytorch_model.bin",
                    path.display()
                );
            };
            return Ok(Self {
                layout: Layout::Transformers(config.display().to_string(), text),
                weights: read_weights(&w)?,
                tokenizer,
            });
        }
        if !path.is_file() {
            bail!("--reward-model {role}={}: not found", path.display());
        }
        // A single checkpoint file (HPSv2 ships one): OpenCLIP layout.
        let weights = read_weights(path)?;
        if !is_open_clip(&weights.0, &weights.1)? {
            bail!(
                "{}: not an OpenCLIP state dict; give a transformers CLIP model as its folder (with config.json)",
                path.display()
            );
        }
        let sibling = path.with_file_name("open_clip_config.json");
        let config = if sibling.is_file() {
            let text = std::fs::read_to_string(&sibling)
                .with_context(|| format!("{}: cannot read", sibling.display()))?;
            OpenClipConfig::from_json(&sibling.display().to_string(), &text)?
        } else {
            eprintln!(
                "draft: {}: no open_clip_config.json beside it; assuming OpenCLIP ViT-H-14 (HPSv2's)",
                path.display()
            );
            OpenClipConfig::named("ViT-H-14").expect("built in")
        };
        Ok(Self {
            layout: Layout::OpenClip(config),
            weights,
            tokenizer: None,
        })
    }

    fn build(&self, device: &Device) -> Result<CLIPModel> {
        let (wn, wb) = &self.weights;
        Ok(match &self.layout {
            Layout::Transformers(cn, ct) => load_clip(cn, ct, wn, wb, device)?,
            Layout::OpenClip(c) => load_open_clip(c, wn, wb, device)?,
        })
    }
}

/// The tokenizer files present at the top of `dir` (None when it has none).
fn read_tokenizer_dir(dir: &Path) -> Result<Option<ModelFiles>> {
    let mut files = ModelFiles::new(dir.display().to_string());
    for name in TOKENIZER_FILES {
        let p = dir.join(name);
        if p.is_file() {
            files.insert(name, crate::files::read(&p)?);
        }
    }
    let usable =
        files.has("tokenizer.json") || (files.has("vocab.json") && files.has("merges.txt"));
    Ok(usable.then_some(files))
}

/// Everything `--reward`/`--reward-model` name, read before any model is built.
pub struct RewardFiles {
    clip: Option<ClipFiles>,
    pickscore: Option<ClipFiles>,
    hpsv2: Option<ClipFiles>,
    aesthetic: Option<(String, Vec<u8>)>,
    tokenizer: Option<ModelFiles>,
}

impl RewardFiles {
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
        let names: Vec<String> = specs
            .iter()
            .map(|s| parse_spec(s).map(|(n, _)| n))
            .collect::<Result<_, _>>()?;
        let wants = |n: &str| names.iter().any(|x| x == n);
        let need = |role: &str, reward: &str| -> Result<&PathBuf> {
            paths.get(role).with_context(|| {
                format!(
                    "--reward {reward} needs --reward-model {role}=PATH (see `draft train --help`)"
                )
            })
        };
        let mut out = Self {
            clip: None,
            pickscore: None,
            hpsv2: None,
            aesthetic: None,
            tokenizer: None,
        };
        if wants("laion-aesthetic") || wants("clip-score") {
            let reward = if wants("laion-aesthetic") {
                "laion-aesthetic"
            } else {
                "clip-score"
            };
            out.clip = Some(ClipFiles::read("clip", need("clip", reward)?)?);
        }
        if wants("laion-aesthetic") {
            out.aesthetic = Some(read_weights(need("laion-aesthetic", "laion-aesthetic")?)?);
        }
        if wants("pickscore") {
            out.pickscore = Some(ClipFiles::read(
                "pickscore",
                need("pickscore", "pickscore")?,
            )?);
        }
        if wants("hpsv2") {
            out.hpsv2 = Some(ClipFiles::read("hpsv2", need("hpsv2", "hpsv2")?)?);
        }
        if let Some(dir) = paths.get("tokenizer") {
            out.tokenizer = Some(read_tokenizer_dir(dir)?.with_context(|| {
                format!("--reward-model tokenizer={}: no tokenizer.json or vocab.json + merges.txt there", dir.display())
            })?);
        }
        Ok(out)
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
        let tokenizer_for = |files: &ClipFiles, reward: &str| -> Result<Arc<ClipTokenizer>> {
            let (source, dir) = match (&files.tokenizer, &self.tokenizer, model) {
                (Some(t), _, _) => (t, ""),
                (None, Some(t), _) => (t, ""),
                (None, None, Some(m)) => (m, "tokenizer/"),
                (None, None, None) => bail!(
                    "--reward {reward}: its model folder has no tokenizer; add --reward-model tokenizer=DIR"
                ),
            };
            Ok(Arc::new(load_tokenizer_in(source, dir)?))
        };
        let clip = self
            .clip
            .as_ref()
            .map(|f| f.build(device))
            .transpose()?
            .map(Arc::new);
        let mut learned = |name: &str| -> draft_core::Result<Box<dyn Reward>> {
            let fail = |e: anyhow::Error| draft_core::Error::Input(format!("{e:#}"));
            let similarity = |files: &Option<ClipFiles>,
                              built: Option<Arc<CLIPModel>>,
                              kind: Similarity|
             -> Result<Box<dyn Reward>> {
                let files = files.as_ref().expect("read() checked it");
                let model = match built {
                    Some(m) => m,
                    None => Arc::new(files.build(device)?),
                };
                let tok = tokenizer_for(files, kind.name())?;
                Ok(Box::new(ClipSimilarity::new(model, tok, kind)?))
            };
            match name {
                "laion-aesthetic" => {
                    let clip = clip.clone().expect("read() checked it");
                    let (n, bytes) = self.aesthetic.as_ref().expect("read() checked it");
                    let dim = clip.visual_projection.weight.val().dims()[1];
                    Ok(Box::new(LaionAesthetic {
                        clip,
                        mlp: AestheticMlp::load(n, bytes, dim, device)?,
                    }))
                }
                "clip-score" => {
                    similarity(&self.clip, clip.clone(), Similarity::ClipScore).map_err(fail)
                }
                "pickscore" => {
                    similarity(&self.pickscore, None, Similarity::PickScore).map_err(fail)
                }
                "hpsv2" => similarity(&self.hpsv2, None, Similarity::Hpsv2).map_err(fail),
                _ => Err(draft_core::Error::Input(format!(
                    "reward `{name}` has no weights"
                ))),
            }
        };
        Ok(WeightedReward::from_specs_with(
            specs,
            options,
            &mut learned,
        )?)
    }
}
