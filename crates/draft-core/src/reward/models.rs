//! Learned, differentiable rewards on CLIP: the LAION aesthetic predictor (improved-aesthetic-
//! predictor v2: an MLP on the L2-normalised CLIP image embedding), CLIP score (cosine to the
//! prompt), PickScore (`logit_scale.exp()` · cosine) and HPSv2 (cosine, OpenCLIP ViT-H-14). Preprocessing is differentiable: a
//! bilinear resize (as matrix products) of the shorter side to the model's input size (half-pixel centres, no
//! antialiasing), a centre crop and CLIP's mean/std normalisation.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use burn::prelude::*;

use crate::error::{Error, Result};
use crate::model::models::clip::{CLIPConfig, CLIPModel};
use crate::model::models::open_clip::{self, OpenClipConfig};
use crate::model::nn::Linear;
use crate::model::tokenizer::ClipTokenizer;
use crate::model::var_builder::VarBuilder;
use crate::model::weights::Weights;
use crate::reward::builtin::Reward;

pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
#[allow(clippy::excessive_precision)] // the published values, digit for digit
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_58, 0.275_777_11];

/// Loads a transformers `CLIPModel` from its `config.json` text and safetensors bytes.
pub fn load_clip(
    config_name: &str,
    config: &str,
    weights_name: &str,
    weights: &[u8],
    device: &Device,
) -> Result<CLIPModel> {
    let (c, text) = CLIPConfig::from_json(config_name, config)?;
    let eos = c.text_config.get("eos_token_id").and_then(|v| v.as_i64());
    let w = Weights::from_bytes(weights_name, weights)?;
    let logit_scale = logit_scale(&w)?;
    CLIPModel::load(VarBuilder::new(&w, device), &c, &text, logit_scale, eos)
}

/// Loads an OpenCLIP state dict (safetensors bytes, keys without a prefix) of the
/// architecture `config` (e.g. [`OpenClipConfig::named`]`("ViT-H-14")` for HPSv2).
pub fn load_open_clip(
    config: &OpenClipConfig,
    weights_name: &str,
    weights: &[u8],
    device: &Device,
) -> Result<CLIPModel> {
    let w = Weights::from_bytes(weights_name, weights)?;
    let logit_scale = logit_scale(&w)?;
    open_clip::load(VarBuilder::new(&w, device), config, logit_scale)
}

/// Whether a state dict is in OpenCLIP's layout (rather than transformers').
pub fn is_open_clip(weights_name: &str, weights: &[u8]) -> Result<bool> {
    let w = Weights::from_bytes(weights_name, weights)?;
    Ok(w.contains("visual.proj") || w.contains("visual.conv1.weight"))
}

fn logit_scale(w: &Weights) -> Result<f64> {
    if !w.contains("logit_scale") {
        return Err(Error::MissingTensor {
            file: w.file().into(),
            key: "logit_scale".into(),
        });
    }
    Ok(w.read_f32("logit_scale")?.0.first().copied().unwrap_or(0.0) as f64)
}

/// `[B, 3, H, W]` in [0, 1] → CLIP's normalised `[B, 3, S, S]`.
pub fn preprocess(images: Tensor<4>, size: usize) -> Tensor<4> {
    let [_, _, h, w] = images.dims();
    let (rh, rw) = if h <= w {
        (size, (w * size).div_ceil(h).max(size))
    } else {
        ((h * size).div_ceil(w).max(size), size)
    };
    let x = if (h, w) == (rh, rw) {
        images
    } else {
        resize_bilinear(images, rh, rw)
    };
    let x = x
        .narrow(2, (rh - size) / 2, size)
        .narrow(3, (rw - size) / 2, size);
    let device = x.device();
    let mean = Tensor::<1>::from_floats(CLIP_MEAN, &device).reshape([1, 3, 1, 1]);
    let std = Tensor::<1>::from_floats(CLIP_STD, &device).reshape([1, 3, 1, 1]);
    (x - mean) / std
}

/// `F.interpolate(x, (oh, ow), mode="bilinear", align_corners=False, antialias=False)` as two
/// matrix products with host-built interpolation matrices, so that its gradient exists on every
/// backend (Burn's GPU backends have no bilinear-interpolation backward).
pub fn resize_bilinear(x: Tensor<4>, oh: usize, ow: usize) -> Tensor<4> {
    let [b, c, h, w] = x.dims();
    let device = x.device();
    let rh = Tensor::<2>::from_data(TensorData::new(bilinear_matrix(h, oh), [oh, h]), &device);
    let rw = Tensor::<2>::from_data(TensorData::new(bilinear_matrix(w, ow), [ow, w]), &device);
    let rw_t = rw.transpose().reshape([1, 1, w, ow]).expand([b, c, w, ow]);
    let rh = rh.reshape([1, 1, oh, h]).expand([b, c, oh, h]);
    rh.matmul(x.matmul(rw_t))
}

/// Row-major [out, in] weights of PyTorch's half-pixel linear interpolation.
fn bilinear_matrix(n_in: usize, n_out: usize) -> Vec<f32> {
    let scale = n_in as f64 / n_out as f64;
    let mut m = vec![0f32; n_out * n_in];
    for o in 0..n_out {
        let src = ((o as f64 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(n_in - 1);
        let i1 = if i0 + 1 < n_in { i0 + 1 } else { i0 };
        let l1 = (src - i0 as f64) as f32;
        m[o * n_in + i0] += 1.0 - l1;
        m[o * n_in + i1] += l1;
    }
    m
}

fn l2_normalize(x: Tensor<2>) -> Tensor<2> {
    let norm = x.clone().square().sum_dim(1).sqrt();
    x / norm
}

/// improved-aesthetic-predictor's MLP: Linear(d,1024) → Linear(1024,128) → Linear(128,64) →
/// Linear(64,16) → Linear(16,1), dropout between (inactive), no activations; keys
/// `layers.{0,2,4,6,7}.{weight,bias}`.
pub struct AestheticMlp {
    layers: Vec<Linear>,
}

impl AestheticMlp {
    pub fn load(name: &str, bytes: &[u8], input_dim: usize, device: &Device) -> Result<Self> {
        let w = Weights::from_bytes(name, bytes)?;
        Self::load_vb(VarBuilder::new(&w, device), input_dim)
    }

    /// From any variable source (e.g. [`VarBuilder::random`] for benchmarks).
    pub fn load_vb(vb: VarBuilder, input_dim: usize) -> Result<Self> {
        let vb = vb.pp("layers");
        let sizes = [
            (0, input_dim, 1024),
            (2, 1024, 128),
            (4, 128, 64),
            (6, 64, 16),
            (7, 16, 1),
        ];
        let layers = sizes
            .iter()
            .map(|&(i, a, b)| Linear::load(vb.pp(i), a, b, true))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers })
    }

    pub fn forward(&self, x: Tensor<2>) -> Tensor<1> {
        let b = x.dims()[0];
        let mut x = x;
        for l in &self.layers {
            x = l.forward(x);
        }
        x.reshape([b])
    }
}

/// `laion-aesthetic`: the MLP on the L2-normalised CLIP image embedding.
pub struct LaionAesthetic {
    pub clip: Arc<CLIPModel>,
    pub mlp: AestheticMlp,
}

impl Reward for LaionAesthetic {
    fn name(&self) -> &str {
        "laion-aesthetic"
    }
    fn score(&self, images: Tensor<4>, _prompts: &[String]) -> Result<Tensor<1>> {
        let e = self
            .clip
            .image_features(preprocess(images, self.clip.image_size));
        Ok(self.mlp.forward(l2_normalize(e)))
    }
}

/// How [`ClipSimilarity`] scales the cosine between image and prompt embeddings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Similarity {
    /// `clip-score`: the cosine.
    ClipScore,
    /// `pickscore`: `logit_scale.exp()` · cosine (PickScore_v1's `logits_per_image`).
    PickScore,
    /// `hpsv2`: the cosine of HPSv2's OpenCLIP ViT-H-14 (its `score` is the diagonal of
    /// `image_features @ text_features.T`, both L2-normalised).
    Hpsv2,
}

impl Similarity {
    pub fn name(self) -> &'static str {
        match self {
            Similarity::ClipScore => "clip-score",
            Similarity::PickScore => "pickscore",
            Similarity::Hpsv2 => "hpsv2",
        }
    }
}

/// `clip-score`, `pickscore` or `hpsv2`: the (scaled) cosine between each image's embedding
/// and its prompt's. Prompts are tokenized with the reward model's own tokenizer; their
/// embeddings are computed once per prompt and cached.
pub struct ClipSimilarity {
    pub clip: Arc<CLIPModel>,
    pub tokenizer: Arc<ClipTokenizer>,
    pub kind: Similarity,
    pub scale: f64,
    cache: Mutex<HashMap<String, Tensor<1>>>,
}

impl ClipSimilarity {
    /// Checks that the tokenizer's ids and length fit the text tower.
    pub fn new(
        clip: Arc<CLIPModel>,
        tokenizer: Arc<ClipTokenizer>,
        kind: Similarity,
    ) -> Result<Self> {
        let text = &clip.text_model;
        let vocab = text.text_model.embeddings.token_embedding.num_embeddings();
        if tokenizer.max_length > text.max_position_embeddings {
            return Err(Error::Input(format!(
                "{}: the tokenizer makes {} tokens, the CLIP text tower takes at most {}",
                kind.name(),
                tokenizer.max_length,
                text.max_position_embeddings
            )));
        }
        let top = tokenizer.bos_id.max(tokenizer.eos_id).max(tokenizer.pad_id) as usize;
        if top >= vocab {
            return Err(Error::Input(format!(
                "{}: the tokenizer's special ids (up to {top}) do not fit the CLIP text tower's \
                 vocabulary of {vocab}: give the reward model's own tokenizer.json",
                kind.name()
            )));
        }
        let scale = match kind {
            Similarity::PickScore => clip.logit_scale.exp(),
            Similarity::ClipScore | Similarity::Hpsv2 => 1.0,
        };
        Ok(Self {
            clip,
            tokenizer,
            kind,
            scale,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// The L2-normalised embeddings of `prompts`, [B, projection_dim].
    pub fn prompt_embeddings(&self, prompts: &[String]) -> Result<Tensor<2>> {
        let device = self.clip.text_projection.weight.val().device();
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let missing: Vec<&String> = prompts
            .iter()
            .filter(|p| !cache.contains_key(*p))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        if !missing.is_empty() {
            let ids = missing
                .iter()
                .map(|p| {
                    Ok(self
                        .tokenizer
                        .encode(p)?
                        .into_iter()
                        .map(|i| i as i64)
                        .collect())
                })
                .collect::<Result<Vec<Vec<i64>>>>()?;
            let e = l2_normalize(self.clip.text_features(&ids, &device));
            let d = e.dims()[1];
            for (i, p) in missing.into_iter().enumerate() {
                let row = e.clone().narrow(0, i, 1).reshape([d]);
                cache.insert(p.clone(), row);
            }
        }
        Ok(Tensor::stack(
            prompts.iter().map(|p| cache[p].clone()).collect(),
            0,
        ))
    }
}

impl Reward for ClipSimilarity {
    fn name(&self) -> &str {
        self.kind.name()
    }
    fn needs_prompts(&self) -> bool {
        true
    }
    fn score(&self, images: Tensor<4>, prompts: &[String]) -> Result<Tensor<1>> {
        let b = images.dims()[0];
        if prompts.len() != b {
            return Err(Error::Input(format!(
                "{} scores each image against its prompt: {b} images, {} prompts",
                self.kind.name(),
                prompts.len()
            )));
        }
        let text = self.prompt_embeddings(prompts).map_err(|e| {
            Error::Input(format!(
                "{}: cannot tokenize the prompts: {e}",
                self.kind.name()
            ))
        })?;
        let e = l2_normalize(
            self.clip
                .image_features(preprocess(images, self.clip.image_size)),
        );
        Ok((e * text).sum_dim(1).reshape([b]) * self.scale)
    }
}
