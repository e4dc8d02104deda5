//! The weight files of learned rewards (`--reward-model NAME=PATH` natively, files picked in
//! the browser), from memory into a [`WeightedReward`]. The shells only read bytes.
//!
//! | NAME | source | used by |
//! |---|---|---|
//! | `clip` | a CLIP folder: transformers (`config.json` + `model.safetensors` / `pytorch_model.bin`) or OpenCLIP (`open_clip_config.json` + `open_clip_model.safetensors` / `open_clip_pytorch_model.bin`) | `laion-aesthetic`, `clip-score` |
//! | `pickscore` | a transformers CLIP folder (yuvalkirstain/PickScore_v1) | `pickscore` |
//! | `hpsv2` | an OpenCLIP folder, or a checkpoint file; a file's architecture is its sibling `open_clip_config.json`, else ViT-H-14 | `hpsv2` |
//! | `laion-aesthetic` | the aesthetic MLP file | `laion-aesthetic` |
//! | `tokenizer` | a folder with a CLIP `tokenizer.json` or `vocab.json` + `merges.txt`, for reward models that ship none | prompt rewards |
//!
//! Every weights file is safetensors bytes, whatever its name: a shell that can read PyTorch
//! pickles converts them first and keeps the name (`pytorch_model.bin`, `….pt`).

use std::collections::BTreeMap;
use std::sync::Arc;

use burn::prelude::Device;

use crate::error::{Error, Result};
use crate::model::files::{ModelFiles, TOKENIZER_FILES, load_tokenizer_in};
use crate::model::models::clip::CLIPModel;
use crate::model::models::open_clip::OpenClipConfig;
use crate::model::tokenizer::ClipTokenizer;
use crate::reward::builtin::{Reward, RewardOptions, WeightedReward, parse_spec};
use crate::reward::models::{
    AestheticMlp, ClipSimilarity, LaionAesthetic, Similarity, is_open_clip, load_clip,
    load_open_clip,
};

pub const MODEL_NAMES: [&str; 5] = ["clip", "pickscore", "hpsv2", "laion-aesthetic", "tokenizer"];

/// A transformers CLIP folder's weights, best first.
const TRANSFORMERS_WEIGHTS: [&str; 2] = ["model.safetensors", "pytorch_model.bin"];
/// An OpenCLIP folder's weights, best first.
const OPEN_CLIP_WEIGHTS: [&str; 2] = ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"];

/// One `--reward-model` source, its weights already safetensors bytes.
pub enum RewardSource {
    /// A folder: paths relative to it (`config.json`, `model.safetensors`,
    /// `open_clip_config.json`, `open_clip_model.safetensors`, tokenizer files, …).
    Folder(ModelFiles),
    /// A single weights file (HPSv2's checkpoint, the aesthetic MLP), with the name and text of
    /// a sibling `open_clip_config.json` when there is one.
    File {
        name: String,
        bytes: Vec<u8>,
        open_clip_config: Option<(String, String)>,
    },
}

impl RewardSource {
    /// The files of a folder the reward models read, given which exist (`present`): the
    /// configs and tokenizer files there, and the one weights file of its layout.
    pub fn folder_files(present: impl Fn(&str) -> bool) -> Vec<&'static str> {
        let mut out: Vec<&'static str> = ["config.json", "open_clip_config.json"]
            .into_iter()
            .chain(TOKENIZER_FILES)
            .filter(|n| present(n))
            .collect();
        let weights = if present("open_clip_config.json") {
            OPEN_CLIP_WEIGHTS
        } else {
            TRANSFORMERS_WEIGHTS
        };
        out.extend(weights.into_iter().find(|n| present(n)));
        out
    }

    fn name(&self) -> &str {
        match self {
            RewardSource::Folder(f) => &f.name,
            RewardSource::File { name, .. } => name,
        }
    }
}

/// Which `--reward-model` each learned reward in `specs` needs, as `(model, reward)` in the
/// order they are checked (a model once, for the first reward that needs it).
pub fn needed_models(specs: &[String]) -> Result<Vec<(&'static str, &'static str)>> {
    let names: Vec<String> = specs
        .iter()
        .map(|s| parse_spec(s).map(|(n, _)| n))
        .collect::<Result<_>>()?;
    let wants = |n: &str| names.iter().any(|x| x == n);
    let mut out = Vec::new();
    if wants("laion-aesthetic") {
        out.push(("clip", "laion-aesthetic"));
    } else if wants("clip-score") {
        out.push(("clip", "clip-score"));
    }
    for reward in ["laion-aesthetic", "pickscore", "hpsv2"] {
        if wants(reward) {
            out.push((reward, reward));
        }
    }
    Ok(out)
}

/// How a CLIP model's weights are laid out.
enum Layout {
    /// transformers: its `config.json` (name, text).
    Transformers(String, String),
    OpenClip(OpenClipConfig),
}

/// A CLIP reward model's files, checked, not yet built.
struct ClipFiles {
    layout: Layout,
    weights: (String, Vec<u8>),
    /// Its own tokenizer files, when the folder has them.
    tokenizer: Option<ModelFiles>,
}

impl ClipFiles {
    fn new(role: &str, source: RewardSource, notes: &mut Vec<String>) -> Result<Self> {
        let (name, bytes, sibling) = match source {
            RewardSource::Folder(files) => return Self::from_folder(role, files),
            RewardSource::File {
                name,
                bytes,
                open_clip_config,
            } => (name, bytes, open_clip_config),
        };
        // A single checkpoint file (HPSv2 ships one): OpenCLIP layout.
        if !is_open_clip(&name, &bytes)? {
            return Err(Error::Input(format!(
                "{name}: not an OpenCLIP state dict; give a transformers CLIP model as its folder (with config.json)"
            )));
        }
        let config = match sibling {
            Some((config_name, text)) => OpenClipConfig::from_json(&config_name, &text)?,
            None => {
                notes.push(format!(
                    "{name}: no open_clip_config.json beside it; assuming OpenCLIP ViT-H-14 (HPSv2's)"
                ));
                OpenClipConfig::named("ViT-H-14").expect("built in")
            }
        };
        Ok(Self {
            layout: Layout::OpenClip(config),
            weights: (name, bytes),
            tokenizer: None,
        })
    }

    fn from_folder(role: &str, mut files: ModelFiles) -> Result<Self> {
        let tokenizer = take_tokenizer(&mut files);
        let (layout, weights) = if files.has("open_clip_config.json") {
            let name = files.display("open_clip_config.json");
            let config = OpenClipConfig::from_json(&name, files.text("open_clip_config.json")?)?;
            let Some(w) = take_weights(&mut files, OPEN_CLIP_WEIGHTS) else {
                return Err(Error::Input(format!(
                    "{}: an OpenCLIP folder needs open_clip_model.safetensors or open_clip_pytorch_model.bin",
                    files.name
                )));
            };
            (Layout::OpenClip(config), w)
        } else if files.has("config.json") {
            let config = (
                files.display("config.json"),
                files.text("config.json")?.to_string(),
            );
            let Some(w) = take_weights(&mut files, TRANSFORMERS_WEIGHTS) else {
                return Err(Error::Input(format!(
                    "{}: a transformers CLIP folder needs model.safetensors or pytorch_model.bin",
                    files.name
                )));
            };
            (Layout::Transformers(config.0, config.1), w)
        } else {
            return Err(Error::Input(format!(
                "--reward-model {role}={}: neither config.json (transformers) nor open_clip_config.json (OpenCLIP) found",
                files.name
            )));
        };
        Ok(Self {
            layout,
            weights,
            tokenizer,
        })
    }

    fn build(&self, device: &Device) -> Result<CLIPModel> {
        let (wn, wb) = &self.weights;
        match &self.layout {
            Layout::Transformers(cn, ct) => load_clip(cn, ct, wn, wb, device),
            Layout::OpenClip(c) => load_open_clip(c, wn, wb, device),
        }
    }
}

/// The first of `names` in `files`, moved out, with its display name.
fn take_weights(files: &mut ModelFiles, names: [&str; 2]) -> Option<(String, Vec<u8>)> {
    let name = names.into_iter().find(|n| files.has(n))?;
    let bytes = files.files.remove(name)?;
    Some((files.display(name), bytes))
}

/// The tokenizer files at the top of `files`, moved out (None when they make no tokenizer).
fn take_tokenizer(files: &mut ModelFiles) -> Option<ModelFiles> {
    let usable =
        files.has("tokenizer.json") || (files.has("vocab.json") && files.has("merges.txt"));
    if !usable {
        return None;
    }
    let mut out = ModelFiles::new(files.name.clone());
    for name in TOKENIZER_FILES {
        if let Some(bytes) = files.files.remove(name) {
            out.insert(name, bytes);
        }
    }
    Some(out)
}

/// Everything the learned rewards of a run need, checked before any model is built.
pub struct RewardFiles {
    clip: Option<ClipFiles>,
    pickscore: Option<ClipFiles>,
    hpsv2: Option<ClipFiles>,
    aesthetic: Option<(String, Vec<u8>)>,
    tokenizer: Option<ModelFiles>,
    notes: Vec<String>,
}

impl RewardFiles {
    /// Checks that every learned reward in `specs` has its source, and reads the configs.
    /// Sources no reward needs are dropped unread (but for `tokenizer`).
    pub fn new(specs: &[String], mut sources: BTreeMap<String, RewardSource>) -> Result<Self> {
        if let Some(name) = sources.keys().find(|n| !MODEL_NAMES.contains(&n.as_str())) {
            return Err(Error::Input(format!(
                "--reward-model `{name}`: expected one of {}",
                MODEL_NAMES.join(", ")
            )));
        }
        let mut out = Self {
            clip: None,
            pickscore: None,
            hpsv2: None,
            aesthetic: None,
            tokenizer: None,
            notes: Vec::new(),
        };
        for (role, reward) in needed_models(specs)? {
            let source = sources.remove(role).ok_or_else(|| {
                Error::Input(format!(
                    "--reward {reward} needs --reward-model {role}=PATH (see `draft train --help`)"
                ))
            })?;
            let notes = &mut out.notes;
            match role {
                "clip" => out.clip = Some(ClipFiles::new(role, source, notes)?),
                "pickscore" => out.pickscore = Some(ClipFiles::new(role, source, notes)?),
                "hpsv2" => out.hpsv2 = Some(ClipFiles::new(role, source, notes)?),
                _ => {
                    let RewardSource::File { name, bytes, .. } = source else {
                        return Err(Error::Input(format!(
                            "--reward-model {role}={}: expected a weights file, not a folder",
                            source.name()
                        )));
                    };
                    out.aesthetic = Some((name, bytes));
                }
            }
        }
        if let Some(source) = sources.remove("tokenizer") {
            let name = source.name().to_string();
            let tokenizer = match source {
                RewardSource::Folder(mut files) => take_tokenizer(&mut files),
                RewardSource::File { .. } => None,
            };
            out.tokenizer = Some(tokenizer.ok_or_else(|| {
                Error::Input(format!(
                    "--reward-model tokenizer={name}: no tokenizer.json or vocab.json + merges.txt there"
                ))
            })?);
        }
        Ok(out)
    }

    /// What the user should know about the sources (e.g. an architecture assumed).
    pub fn notes(&self) -> &[String] {
        &self.notes
    }

    /// Builds every reward term. A prompt reward takes its tokenizer from its own folder,
    /// else the `tokenizer` source, else the diffusion model's (`model`, if given).
    pub fn build(
        self,
        specs: &[String],
        options: &RewardOptions,
        model: Option<&ModelFiles>,
        device: &Device,
    ) -> Result<WeightedReward> {
        let tokenizer_for = |files: &ClipFiles, reward: &str| -> Result<Arc<ClipTokenizer>> {
            let (source, dir) = match (&files.tokenizer, &self.tokenizer, model) {
                (Some(t), _, _) | (None, Some(t), _) => (t, ""),
                (None, None, Some(m)) => (m, "tokenizer/"),
                (None, None, None) => {
                    return Err(Error::Input(format!(
                        "--reward {reward}: its model folder has no tokenizer; add --reward-model tokenizer=DIR"
                    )));
                }
            };
            Ok(Arc::new(load_tokenizer_in(source, dir)?))
        };
        let clip = self
            .clip
            .as_ref()
            .map(|f| f.build(device))
            .transpose()?
            .map(Arc::new);
        let similarity = |files: &Option<ClipFiles>,
                          built: Option<Arc<CLIPModel>>,
                          kind: Similarity|
         -> Result<Box<dyn Reward>> {
            let files = files.as_ref().expect("new() checked it");
            let model = match built {
                Some(m) => m,
                None => Arc::new(files.build(device)?),
            };
            let tok = tokenizer_for(files, kind.name())?;
            Ok(Box::new(ClipSimilarity::new(model, tok, kind)?))
        };
        let mut learned = |name: &str| -> Result<Box<dyn Reward>> {
            match name {
                "laion-aesthetic" => {
                    let clip = clip.clone().expect("new() checked it");
                    let (n, bytes) = self.aesthetic.as_ref().expect("new() checked it");
                    let dim = clip.visual_projection.weight.val().dims()[1];
                    Ok(Box::new(LaionAesthetic {
                        clip,
                        mlp: AestheticMlp::load(n, bytes, dim, device)?,
                    }))
                }
                "clip-score" => similarity(&self.clip, clip.clone(), Similarity::ClipScore),
                "pickscore" => similarity(&self.pickscore, None, Similarity::PickScore),
                "hpsv2" => similarity(&self.hpsv2, None, Similarity::Hpsv2),
                _ => Err(Error::Input(format!("reward `{name}` has no weights"))),
            }
        };
        WeightedReward::from_specs_with(specs, options, &mut learned)
    }
}
