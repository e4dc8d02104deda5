//! Learned, differentiable rewards on CLIP: the LAION aesthetic predictor (improved-aesthetic-
//! predictor v2: an MLP on the L2-normalised CLIP image embedding), CLIP score (cosine to the
//! prompt) and PickScore (`logit_scale.exp()` · cosine). Preprocessing is differentiable: a
//! bilinear resize (as matrix products) of the shorter side to the model's input size (half-pixel centres, no
//! antialiasing), a centre crop and CLIP's mean/std normalisation.

use std::sync::Arc;

use burn::prelude::*;

use crate::error::{Error, Result};
use crate::models::clip::{CLIPConfig, CLIPModel};
use crate::nn::Linear;
use crate::reward::Reward;
use crate::weights::{VarBuilder, Weights};

pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
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
    let logit_scale = if w.contains("logit_scale") {
        w.read_f32("logit_scale")?.0.first().copied().unwrap_or(0.0) as f64
    } else {
        return Err(Error::MissingTensor {
            file: weights_name.into(),
            key: "logit_scale".into(),
        });
    };
    CLIPModel::load(VarBuilder::new(&w, device), &c, &text, logit_scale, eos)
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
        let vb = VarBuilder::new(&w, device).pp("layers");
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
    fn score(&self, images: Tensor<4>) -> Tensor<1> {
        let e = self
            .clip
            .image_features(preprocess(images, self.clip.image_size));
        self.mlp.forward(l2_normalize(e))
    }
}

/// `clip-score` (scale 1) or `pickscore` (scale `logit_scale.exp()`): scaled cosine between
/// each image's embedding and its prompt's (the prompt embeddings are fixed per batch).
pub struct ClipSimilarity {
    pub clip: Arc<CLIPModel>,
    /// L2-normalised prompt embeddings [B, projection_dim], one per image.
    pub prompts: Tensor<2>,
    pub scale: f64,
    pub label: &'static str,
}

impl ClipSimilarity {
    /// `pickscore` when `pick`, else `clip-score`, for these token ids (one row per image).
    pub fn new(clip: Arc<CLIPModel>, ids: &[Vec<i64>], device: &Device, pick: bool) -> Self {
        let prompts = l2_normalize(clip.text_features(ids, device));
        let scale = if pick { clip.logit_scale.exp() } else { 1.0 };
        Self {
            clip,
            prompts,
            scale,
            label: if pick { "pickscore" } else { "clip-score" },
        }
    }
}

impl Reward for ClipSimilarity {
    fn name(&self) -> &str {
        self.label
    }
    fn score(&self, images: Tensor<4>) -> Tensor<1> {
        let b = images.dims()[0];
        let e = l2_normalize(
            self.clip
                .image_features(preprocess(images, self.clip.image_size)),
        );
        (e * self.prompts.clone()).sum_dim(1).reshape([b]) * self.scale
    }
}
