//! A pipeline's files: [`ModelFiles`] (a diffusers folder, a sharded set, a variant or a
//! single-file checkpoint, by path relative to the folder) — configs and tokenizer as bytes,
//! weights as bytes or as sources read by range ([`crate::model::source`]) — the CLIP tokenizer
//! built from them, and the limits on what any command asks of a pipeline.

use std::collections::BTreeMap;
use std::rc::Rc;

use serde_json::json;

use crate::error::{Error, Result};
use crate::model::layouts::ldm;
use crate::model::source::ByteSource;
use crate::model::tokenizer::{ClipTokenizer, SpecialTokens};
use crate::model::weights::{FileRef, Weights};

/// A file as a shell hands it to [`ModelFiles`]: bytes, or a source read by range (a weights
/// file on disk or picked in a browser, which is then never held whole).
pub enum FileData {
    Bytes(Vec<u8>),
    Source(Rc<dyn ByteSource>),
}

impl FileData {
    /// The file as [`Weights`] reads it.
    pub fn file_ref(&self) -> FileRef<'_> {
        match self {
            FileData::Bytes(b) => FileRef::Bytes(b),
            FileData::Source(s) => FileRef::Source(&**s),
        }
    }
}

impl From<Vec<u8>> for FileData {
    fn from(bytes: Vec<u8>) -> Self {
        FileData::Bytes(bytes)
    }
}

/// The largest batch of images any command samples or trains on at once (a guard against a
/// setting that would allocate without bound, not a practical limit).
pub const MAX_BATCH: usize = 4096;
/// The largest image side in pixels.
pub const MAX_IMAGE_SIDE: usize = 16384;

/// Refuses a batch of 0 or above [`MAX_BATCH`]; `what` names the setting.
pub fn check_batch(what: &str, n: usize) -> Result<()> {
    if n == 0 || n > MAX_BATCH {
        return Err(Error::Input(format!(
            "{what} must be between 1 and {MAX_BATCH}, got {n}"
        )));
    }
    Ok(())
}
/// The files of a diffusers pipeline folder, by path relative to the folder.
///
/// Weights may be one safetensors file per component, a sharded set (`*.safetensors.index.json`
/// and the shards its `weight_map` names), a variant (`diffusion_pytorch_model.fp16.safetensors`,
/// chosen with [`variant`](Self::variant) as diffusers' `variant=`), or PyTorch `.bin` files,
/// whose bytes the shell has converted to safetensors (the core has no pickle reader). A
/// single-file checkpoint in the original LDM layout is held under [`checkpoint`](Self::checkpoint)
/// instead, with the folder's config files beside it ([`ModelFiles::from_checkpoint`]).
pub struct ModelFiles {
    /// How the folder is named in error messages (its path, for the CLI).
    pub name: String,
    pub files: BTreeMap<String, Vec<u8>>,
    /// Weight files read by range, one tensor at a time, never whole.
    pub sources: BTreeMap<String, Rc<dyn ByteSource>>,
    /// The weights variant to load (`fp16`, …; a component without it loads its plain files);
    /// `None`: the plain files, else `fp16`.
    pub variant: Option<String>,
    /// The key in `files` of a single-file LDM checkpoint holding every component's weights.
    pub checkpoint: Option<String>,
}

/// The components that have weight files (`text_encoder_2`: SDXL's second text tower).
pub const COMPONENTS: [&str; 4] = ["unet", "vae", "text_encoder", "text_encoder_2"];

impl ModelFiles {
    /// Every file other than weights the loader may read.
    pub const LAYOUT: &'static [&'static str] = &[
        "model_index.json",
        "unet/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        "tokenizer/tokenizer.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer/tokenizer_config.json",
        "tokenizer/special_tokens_map.json",
        "text_encoder_2/config.json",
        "tokenizer_2/tokenizer.json",
        "tokenizer_2/vocab.json",
        "tokenizer_2/merges.txt",
        "tokenizer_2/tokenizer_config.json",
        "tokenizer_2/special_tokens_map.json",
        "scheduler/scheduler_config.json",
    ];

    pub fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            files: BTreeMap::new(),
            sources: BTreeMap::new(),
            variant: None,
            checkpoint: None,
        }
    }

    /// A single-file checkpoint as a pipeline: the checkpoint (safetensors bytes: the shell converts
    /// `.ckpt` pickles, dropping a `state_dict` nesting) plus config and tokenizer files. Config files
    /// come from `config` (a diffusers folder, `--model-config`) where it has them, else they are
    /// inferred from the checkpoint; tokenizer files from `config`, else from `tokenizer`
    /// (`(file name, bytes)` of the standard CLIP BPE tokenizer that SD used).
    pub fn from_checkpoint(
        name: &str,
        checkpoint: impl Into<FileData>,
        config: Option<&Self>,
        tokenizer: &[(&str, &[u8])],
    ) -> Result<Self> {
        let checkpoint = checkpoint.into();
        let mut files = Self::new(name);
        let inferred = {
            let s = ldm::shapes(&Weights::from_file(name, checkpoint.file_ref())?)?;
            if !ldm::is_checkpoint(&s) {
                return Err(Error::config(
                    name,
                    "not a Stable Diffusion checkpoint in the LDM layout: it has no \
                     `model.diffusion_model.*` tensors (a diffusers model is a folder)",
                ));
            }
            ldm::infer(name, &s)?
        };
        let from_config = |path: &str| config.filter(|c| c.has(path));
        let mut configs = vec![
            ("model_index.json", &inferred.model_index),
            ("unet/config.json", &inferred.unet),
            ("vae/config.json", &inferred.vae),
            ("text_encoder/config.json", &inferred.text_encoder),
            ("scheduler/scheduler_config.json", &inferred.scheduler),
        ];
        if let Some(c2) = &inferred.text_encoder_2 {
            configs.push(("text_encoder_2/config.json", c2));
        }
        for (path, value) in configs {
            let bytes = match from_config(path) {
                Some(c) => c.bytes(path)?.to_vec(),
                None => serde_json::to_vec_pretty(value).expect("JSON values serialise"),
            };
            files.insert(path, bytes);
        }
        // SDXL's second tokenizer is the same BPE padded with `!`.
        let mut tokenizers = vec![("tokenizer/", inferred.pad_token.as_str())];
        if inferred.text_encoder_2.is_some() {
            tokenizers.push(("tokenizer_2/", "!"));
        }
        for (dir, pad_token) in tokenizers {
            let config_tokenizer = config.is_some_and(|c| {
                c.has(&format!("{dir}tokenizer.json"))
                    || (c.has(&format!("{dir}vocab.json")) && c.has(&format!("{dir}merges.txt")))
            });
            if let (true, Some(c)) = (config_tokenizer, config) {
                for (path, bytes) in &c.files {
                    if path.starts_with(dir) {
                        files.insert(path.clone(), bytes.clone());
                    }
                }
            } else {
                for (file, bytes) in tokenizer {
                    files.insert(format!("{dir}{file}"), bytes.to_vec());
                }
                files.insert(
                    format!("{dir}special_tokens_map.json"),
                    serde_json::to_vec(&json!({ "pad_token": pad_token })).expect("JSON"),
                );
            }
        }
        files.insert_data(ldm::CHECKPOINT, checkpoint);
        files.checkpoint = Some(ldm::CHECKPOINT.into());
        Ok(files)
    }

    /// Collects every file of [`Self::LAYOUT`] and the weights [`Self::weight_names`] picks
    /// that `read(path)` finds (`Ok(None)`: absent).
    pub fn read_layout<E>(
        name: impl Into<String>,
        read: impl FnMut(&str) -> std::result::Result<Option<Vec<u8>>, E>,
    ) -> std::result::Result<Self, E> {
        Self::read_layout_variant(name, None, read)
    }

    /// [`read_layout`](Self::read_layout) for a weights variant (`--variant fp16`): only the
    /// first weights found per component are read, and for a sharded set its shards.
    pub fn read_layout_variant<E>(
        name: impl Into<String>,
        variant: Option<&str>,
        mut read: impl FnMut(&str) -> std::result::Result<Option<Vec<u8>>, E>,
    ) -> std::result::Result<Self, E> {
        Self::read_layout_from(name, variant, |path| Ok(read(path)?.map(FileData::Bytes)))
    }

    /// [`read_layout_variant`](Self::read_layout_variant) where `read` may hand a file over as a
    /// source read by range ([`FileData::Source`]: what a shell does for `.safetensors` weights,
    /// so that they are never held whole). Config, tokenizer and index files are read whole.
    pub fn read_layout_from<E>(
        name: impl Into<String>,
        variant: Option<&str>,
        mut read: impl FnMut(&str) -> std::result::Result<Option<FileData>, E>,
    ) -> std::result::Result<Self, E> {
        let mut files = Self::read_configs_from(name, &mut read)?;
        files.variant = variant.map(str::to_string);
        for component in COMPONENTS {
            for path in files.weight_names(component) {
                let Some(data) = read(&path)? else {
                    continue;
                };
                files.insert_data(path.clone(), data);
                // A malformed index is reported when the component loads.
                let shards = match path.ends_with(".json") {
                    true => files.bytes(&path).ok().and_then(|b| shard_names(b).ok()),
                    false => None,
                };
                for shard in shards.unwrap_or_default() {
                    let rel = format!("{component}/{shard}");
                    if let Some(data) = read(&rel)? {
                        files.insert_data(rel, data);
                    }
                }
                break;
            }
        }
        Ok(files)
    }

    /// Collects the files of [`Self::LAYOUT`] that `read(path)` finds — configs and tokenizer,
    /// no weights (`--model-config`).
    pub fn read_configs<E>(
        name: impl Into<String>,
        mut read: impl FnMut(&str) -> std::result::Result<Option<Vec<u8>>, E>,
    ) -> std::result::Result<Self, E> {
        Self::read_configs_from(name, |path| Ok(read(path)?.map(FileData::Bytes)))
    }

    /// [`read_configs`](Self::read_configs) from a reader of [`FileData`].
    fn read_configs_from<E>(
        name: impl Into<String>,
        mut read: impl FnMut(&str) -> std::result::Result<Option<FileData>, E>,
    ) -> std::result::Result<Self, E> {
        let mut files = Self::new(name);
        for rel in Self::LAYOUT {
            if let Some(data) = read(rel)? {
                files.insert_data(*rel, data);
            }
        }
        Ok(files)
    }

    /// The weight files `component` may have, best first: the chosen variant, then the plain
    /// files (without a variant: the plain files, then `fp16`), safetensors before a sharded safetensors index before
    /// PyTorch `.bin` (single, then sharded). diffusers' names.
    pub fn weight_names(&self, component: &str) -> Vec<String> {
        let (st, bin) = if component.starts_with("text_encoder") {
            ("model", "pytorch_model")
        } else {
            ("diffusion_pytorch_model", "diffusion_pytorch_model")
        };
        let variants: Vec<Option<&str>> = match &self.variant {
            // As diffusers: a component without the variant loads its plain files.
            Some(v) => vec![Some(v.as_str()), None],
            None => vec![None, Some("fp16")],
        };
        let mut names = Vec::new();
        for v in variants {
            let file = |stem: &str, ext: &str| match v {
                Some(v) => format!("{component}/{stem}.{v}.{ext}"),
                None => format!("{component}/{stem}.{ext}"),
            };
            let index = |stem: &str, ext: &str| match v {
                Some(v) => format!("{component}/{stem}.{ext}.index.{v}.json"),
                None => format!("{component}/{stem}.{ext}.index.json"),
            };
            names.extend([
                file(st, "safetensors"),
                index(st, "safetensors"),
                file(bin, "bin"),
                index(bin, "bin"),
            ]);
        }
        names
    }

    pub fn insert(&mut self, path: impl Into<String>, bytes: Vec<u8>) {
        let path = path.into();
        self.sources.remove(&path);
        self.files.insert(path, bytes);
    }

    /// Adds a file read by range (weights: a `.safetensors` file). Any other file given as a
    /// source is read whole here: configs and indexes are small.
    pub fn insert_source(&mut self, path: impl Into<String>, source: Rc<dyn ByteSource>) {
        let path = path.into();
        self.files.remove(&path);
        self.sources.insert(path, source);
    }

    /// [`insert`](Self::insert) or [`insert_source`](Self::insert_source): weights
    /// (`.safetensors`) stay a source, any other file is read whole.
    pub fn insert_data(&mut self, path: impl Into<String>, data: FileData) {
        let path = path.into();
        match data {
            FileData::Bytes(bytes) => self.insert(path, bytes),
            FileData::Source(source)
                if path.ends_with(".safetensors") || path == ldm::CHECKPOINT =>
            {
                self.insert_source(path, source)
            }
            FileData::Source(source) => {
                let mut bytes = vec![0; source.len() as usize];
                // An unreadable config reads as empty: reported as malformed where it is parsed.
                if source.read_at(0, &mut bytes).is_err() {
                    bytes.clear();
                }
                self.insert(path, bytes)
            }
        }
    }

    /// The weights file `path` as [`Weights`] reads it: its bytes or its source.
    pub fn file_ref(&self, path: &str) -> Result<FileRef<'_>> {
        if let Some(source) = self.sources.get(path) {
            return Ok(FileRef::Source(&**source));
        }
        self.bytes(path).map(FileRef::Bytes)
    }

    /// The name a file is reported under: `<folder>/<path>`.
    pub fn display(&self, path: &str) -> String {
        format!("{}/{}", self.name.trim_end_matches('/'), path)
    }

    pub fn has(&self, path: &str) -> bool {
        self.files.contains_key(path) || self.sources.contains_key(path)
    }

    /// The bytes of a file held in memory (a weights file read by range has none: see
    /// [`file_ref`](Self::file_ref)).
    pub fn bytes(&self, path: &str) -> Result<&[u8]> {
        if self.sources.contains_key(path) {
            return Err(Error::config(
                &self.display(path),
                "read by range, not held in memory",
            ));
        }
        self.files
            .get(path)
            .map(Vec::as_slice)
            .ok_or_else(|| Error::config(&self.display(path), "file is missing"))
    }

    pub fn text(&self, path: &str) -> Result<&str> {
        std::str::from_utf8(self.bytes(path)?)
            .map_err(|_| Error::config(&self.display(path), "not UTF-8 text"))
    }

    /// The weights of `component` (`unet`, `vae`, `text_encoder`) under the diffusers /
    /// transformers keys its module asks for, whatever layout they are stored in.
    pub fn component_weights(&self, component: &str) -> Result<Weights<'_>> {
        if let Some(key) = &self.checkpoint {
            let w = Weights::from_file(&self.name, self.file_ref(key)?)?;
            return ldm::component(w, component);
        }
        let names = self.weight_names(component);
        let Some(path) = names.iter().find(|p| self.has(p)) else {
            let looked: Vec<&str> = names
                .iter()
                .map(|n| n.rsplit('/').next().unwrap_or(n))
                .collect();
            let hint = match &self.variant {
                Some(v) => format!("; the folder has no weights of variant `{v}`"),
                None => String::new(),
            };
            return Err(Error::config(
                &self.display(&names[0]),
                format!(
                    "file is missing, and so are the other weight files of `{component}` \
                     ({}){hint}",
                    looked[1..].join(", ")
                ),
            ));
        };
        let w = if path.ends_with(".json") {
            let shards = shard_names(self.bytes(path)?)
                .map_err(|reason| Error::config(&self.display(path), reason))?;
            let mut parts = Vec::with_capacity(shards.len());
            for shard in shards {
                let rel = format!("{component}/{shard}");
                parts.push((self.display(&rel), self.file_ref(&rel)?));
            }
            Weights::from_files(&self.display(path), &parts)?
        } else {
            Weights::from_file(&self.display(path), self.file_ref(path)?)?
        };
        if component.starts_with("text_encoder") {
            return crate::model::layouts::text_model_prefix(w);
        }
        Ok(w)
    }
}

/// The shard files a `*.index.json` names in its `weight_map`, in order of first use.
fn shard_names(index: &[u8]) -> std::result::Result<Vec<String>, String> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let index: Index = serde_json::from_slice(index).map_err(|e| e.to_string())?;
    let mut names: Vec<String> = index.weight_map.into_values().collect();
    names.sort();
    names.dedup();
    if let Some(bad) = names
        .iter()
        .find(|n| n.contains('/') || n.contains('\\') || n.starts_with('.'))
    {
        return Err(format!("shard `{bad}` is not a file name in the folder"));
    }
    Ok(names)
}

/// The tokenizer files a CLIP tokenizer is built from, in a folder (`tokenizer/` of a
/// diffusers model, the top level of a transformers CLIP repo).
pub const TOKENIZER_FILES: [&str; 5] = [
    "tokenizer.json",
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
];

/// The pipeline's CLIP tokenizer (`tokenizer/`).
pub fn load_tokenizer(files: &ModelFiles) -> Result<ClipTokenizer> {
    load_tokenizer_in(files, "tokenizer/")
}

/// A CLIP tokenizer from the [`TOKENIZER_FILES`] under `dir` (`""` or ending in `/`):
/// `tokenizer.json` if present, else `vocab.json` + `merges.txt`.
pub fn load_tokenizer_in(files: &ModelFiles, dir: &str) -> Result<ClipTokenizer> {
    let path = |name: &str| format!("{dir}{name}");
    let mut settings = Vec::new();
    for p in [
        path("special_tokens_map.json"),
        path("tokenizer_config.json"),
    ] {
        if files.has(&p) {
            let text = files.text(&p)?;
            settings.push((p, text));
        }
    }
    let settings: Vec<(&str, &str)> = settings.iter().map(|(a, b)| (a.as_str(), *b)).collect();
    let special = SpecialTokens::from_json_files(&settings).map_err(|e| match e {
        Error::Tokenizer { file, reason } => Error::Tokenizer {
            file: files.display(&file),
            reason,
        },
        e => e,
    })?;
    let result = if files.has(&path("tokenizer.json")) {
        ClipTokenizer::from_tokenizer_json(files.bytes(&path("tokenizer.json"))?, &special)
    } else {
        ClipTokenizer::from_vocab_merges(
            files.text(&path("vocab.json"))?,
            files.text(&path("merges.txt"))?,
            &special,
        )
    };
    // The tokenizer names files by their bare names; report them inside this folder.
    result.map_err(|e| match e {
        Error::Tokenizer { file, reason } => Error::Tokenizer {
            file: files.display(&path(&file)),
            reason,
        },
        e => e,
    })
}
