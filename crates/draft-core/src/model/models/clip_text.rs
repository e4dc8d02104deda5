//! `transformers.CLIPTextModel`: token + position embeddings, a pre-norm transformer with a
//! causal mask, and the final layer norm. Stable Diffusion conditions on `last_hidden_state`.

use burn::prelude::*;
use burn::tensor::activation::{gelu, sigmoid};
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::model::nn::{
    Embedding, LayerNorm, Linear, merge_heads, scaled_dot_product_attention, split_heads,
};
use crate::model::var_builder::VarBuilder;

/// The fields of `text_encoder/config.json` that shape the model (transformers' names).
#[derive(Debug, Clone, Deserialize)]
pub struct CLIPTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// `CLIPTextModelWithProjection`'s `text_projection` output size (SDXL's second tower).
    #[serde(default)]
    pub projection_dim: Option<usize>,
    /// Where the pooled output is taken: the first token with this id, or, for the legacy 2
    /// (transformers' default, kept by SD-2 and SDXL configs), the largest id in the row.
    #[serde(default)]
    pub eos_token_id: Option<i64>,
}

fn default_act() -> String {
    "quick_gelu".into()
}
fn default_eps() -> f64 {
    1e-5
}

impl CLIPTextConfig {
    pub fn from_json(file: &str, json: &str) -> Result<Self> {
        let config: Self = crate::error::from_json(file, json)?;
        config.check(file, "")?;
        Ok(config)
    }

    /// Checks the sizes; `prefix` names the object the fields are in (`text_config.`).
    pub fn check(&self, file: &str, prefix: &str) -> Result<()> {
        for (field, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            Error::check_size(file, &format!("{prefix}{field}"), v, 1)?;
        }
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(Error::config(
                file,
                format!(
                    "`{prefix}hidden_size` = {} is not divisible by `{prefix}num_attention_heads` = {}",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        if !matches!(self.hidden_act.as_str(), "quick_gelu" | "gelu") {
            return Err(Error::config(
                file,
                format!(
                    "`{prefix}hidden_act` {:?} is not supported (quick_gelu, gelu)",
                    self.hidden_act
                ),
            ));
        }
        Error::check_number(
            file,
            &format!("{prefix}layer_norm_eps"),
            self.layer_norm_eps,
            0.0..=1.0,
        )
    }
}

#[derive(Module, Debug)]
pub struct CLIPAttention {
    pub q_proj: Linear,
    pub k_proj: Linear,
    pub v_proj: Linear,
    pub out_proj: Linear,
    pub num_heads: usize,
}

/// The sizes a CLIP encoder layer needs (shared by the text and vision towers).
#[derive(Debug, Clone, Copy)]
pub struct LayerDims {
    pub hidden: usize,
    pub intermediate: usize,
    pub heads: usize,
    pub eps: f64,
    pub quick_gelu: bool,
}

impl CLIPTextConfig {
    pub fn layer_dims(&self) -> LayerDims {
        LayerDims {
            hidden: self.hidden_size,
            intermediate: self.intermediate_size,
            heads: self.num_attention_heads,
            eps: self.layer_norm_eps,
            quick_gelu: self.hidden_act == "quick_gelu",
        }
    }
}

impl CLIPAttention {
    fn load(vb: VarBuilder, c: &LayerDims) -> Result<Self> {
        let d = c.hidden;
        Ok(Self {
            q_proj: Linear::load(vb.pp("q_proj"), d, d, true)?,
            k_proj: Linear::load(vb.pp("k_proj"), d, d, true)?,
            v_proj: Linear::load(vb.pp("v_proj"), d, d, true)?,
            out_proj: Linear::load(vb.pp("out_proj"), d, d, true)?,
            num_heads: c.heads,
        })
    }

    fn forward(&self, x: Tensor<3>, mask: Option<Tensor<4>>) -> Tensor<3> {
        let q = split_heads(self.q_proj.forward(x.clone()), self.num_heads);
        let k = split_heads(self.k_proj.forward(x.clone()), self.num_heads);
        let v = split_heads(self.v_proj.forward(x), self.num_heads);
        let out = scaled_dot_product_attention(q, k, v, mask);
        self.out_proj.forward(merge_heads(out))
    }
}

#[derive(Module, Debug)]
pub struct CLIPMLP {
    pub fc1: Linear,
    pub fc2: Linear,
    pub quick_gelu: bool,
}

impl CLIPMLP {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let h = self.fc1.forward(x);
        let h = if self.quick_gelu {
            h.clone() * sigmoid(h * 1.702)
        } else {
            gelu(h)
        };
        self.fc2.forward(h)
    }
}

#[derive(Module, Debug)]
pub struct CLIPEncoderLayer {
    pub self_attn: CLIPAttention,
    pub layer_norm1: LayerNorm,
    pub mlp: CLIPMLP,
    pub layer_norm2: LayerNorm,
}

impl CLIPEncoderLayer {
    pub fn load(vb: VarBuilder, c: &LayerDims) -> Result<Self> {
        let (d, eps) = (c.hidden, c.eps);
        Ok(Self {
            self_attn: CLIPAttention::load(vb.pp("self_attn"), c)?,
            layer_norm1: LayerNorm::load(vb.pp("layer_norm1"), d, eps)?,
            mlp: CLIPMLP {
                fc1: Linear::load(vb.pp("mlp").pp("fc1"), d, c.intermediate, true)?,
                fc2: Linear::load(vb.pp("mlp").pp("fc2"), c.intermediate, d, true)?,
                quick_gelu: c.quick_gelu,
            },
            layer_norm2: LayerNorm::load(vb.pp("layer_norm2"), d, eps)?,
        })
    }

    /// Pre-norm residual block; `mask` is additive (the text tower's causal mask).
    pub fn forward(&self, x: Tensor<3>, mask: Option<Tensor<4>>) -> Tensor<3> {
        let x = x.clone() + self.self_attn.forward(self.layer_norm1.forward(x), mask);
        x.clone() + self.mlp.forward(self.layer_norm2.forward(x))
    }
}

#[derive(Module, Debug)]
pub struct CLIPTextEmbeddings {
    pub token_embedding: Embedding,
    pub position_embedding: Embedding,
}

#[derive(Module, Debug)]
pub struct CLIPEncoder {
    pub layers: Vec<CLIPEncoderLayer>,
}

#[derive(Module, Debug)]
pub struct CLIPTextTransformer {
    pub embeddings: CLIPTextEmbeddings,
    pub encoder: CLIPEncoder,
    pub final_layer_norm: LayerNorm,
}

/// `CLIPTextModel`; its weights live under `text_model.` as in transformers. With
/// [`load_with_projection`](Self::load_with_projection), `CLIPTextModelWithProjection`
/// (SDXL's second tower): the same plus `text_projection` (no bias) on the pooled output.
#[derive(Module, Debug)]
pub struct CLIPTextModel {
    pub text_model: CLIPTextTransformer,
    pub text_projection: Option<Linear>,
    pub max_position_embeddings: usize,
}

impl CLIPTextConfig {
    /// The row index of each sequence's pooled token, as transformers' `CLIPTextTransformer`
    /// picks it from the token ids (`ids`: `n` ids per row).
    pub fn pooled_positions(&self, ids: &[u32], n: usize) -> Vec<usize> {
        let eos = self.eos_token_id.unwrap_or(2);
        ids.chunks(n)
            .map(|row| {
                if eos == 2 {
                    // torch's argmax: the first of equal maxima.
                    let max = row.iter().copied().max().unwrap_or(0);
                    row.iter().position(|&t| t == max).unwrap_or(0)
                } else {
                    row.iter().position(|&t| t as i64 == eos).unwrap_or(0)
                }
            })
            .collect()
    }
}

impl CLIPTextModel {
    pub fn load(vb: VarBuilder, c: &CLIPTextConfig) -> Result<Self> {
        Self::load_tower(vb, c, false)
    }

    /// `CLIPTextModelWithProjection`: `text_projection.weight` [projection_dim, hidden] beside
    /// `text_model.…`.
    pub fn load_with_projection(vb: VarBuilder, c: &CLIPTextConfig, file: &str) -> Result<Self> {
        if c.projection_dim.is_none() {
            return Err(Error::config(
                file,
                "`projection_dim` is missing (a CLIPTextModelWithProjection config has it)",
            ));
        }
        Self::load_tower(vb, c, true)
    }

    fn load_tower(vb: VarBuilder, c: &CLIPTextConfig, projection: bool) -> Result<Self> {
        let text_projection = match (projection, c.projection_dim) {
            (true, Some(p)) => Some(Linear::load(
                vb.pp("text_projection"),
                c.hidden_size,
                p,
                false,
            )?),
            _ => None,
        };
        let vb = vb.pp("text_model");
        let emb = vb.pp("embeddings");
        let embeddings = CLIPTextEmbeddings {
            token_embedding: Embedding::load(
                emb.pp("token_embedding"),
                c.vocab_size,
                c.hidden_size,
            )?,
            position_embedding: Embedding::load(
                emb.pp("position_embedding"),
                c.max_position_embeddings,
                c.hidden_size,
            )?,
        };
        let layers = (0..c.num_hidden_layers)
            .map(|i| CLIPEncoderLayer::load(vb.pp("encoder").pp("layers").pp(i), &c.layer_dims()))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            text_model: CLIPTextTransformer {
                embeddings,
                encoder: CLIPEncoder { layers },
                final_layer_norm: LayerNorm::load(
                    vb.pp("final_layer_norm"),
                    c.hidden_size,
                    c.layer_norm_eps,
                )?,
            },
            text_projection,
            max_position_embeddings: c.max_position_embeddings,
        })
    }

    /// `last_hidden_state` [B, N, hidden] for token ids [B, N].
    pub fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        let layers = self.text_model.encoder.layers.len();
        let x = self.hidden_after(ids, layers);
        self.text_model.final_layer_norm.forward(x)
    }

    /// What SDXL conditions on: `hidden_states[-2]` (the input of the last layer, without the
    /// final norm) [B, N, hidden] and, with `pooled` (each row's pooled position,
    /// [`CLIPTextConfig::pooled_positions`]), `text_embeds`: the final-normed state there
    /// through `text_projection` [B, projection_dim]. Without `pooled` the last layer is not
    /// run.
    pub fn forward_penultimate(
        &self,
        ids: Tensor<2, Int>,
        pooled: Option<&[usize]>,
    ) -> (Tensor<3>, Option<Tensor<2>>) {
        let layers = &self.text_model.encoder.layers;
        let [b, n] = ids.dims();
        let device = ids.device();
        let penultimate = self.hidden_after(ids, layers.len().saturating_sub(1));
        let Some(positions) = pooled else {
            return (penultimate, None);
        };
        let mask = causal_mask(n, &device);
        let last = match layers.last() {
            Some(layer) => layer.forward(penultimate.clone(), Some(mask)),
            None => penultimate.clone(),
        };
        let last = self.text_model.final_layer_norm.forward(last);
        let d = last.dims()[2];
        let rows: Vec<i64> = positions
            .iter()
            .enumerate()
            .map(|(i, &p)| (i * n + p) as i64)
            .collect();
        let rows = Tensor::<1, Int>::from_data(TensorData::new(rows, [b]), &device);
        let pooled = last.reshape([b * n, d]).select(0, rows);
        let pooled = match &self.text_projection {
            Some(p) => p.forward(pooled),
            None => pooled,
        };
        (penultimate, Some(pooled))
    }

    /// The hidden states after the first `layers` encoder layers (embeddings for 0).
    fn hidden_after(&self, ids: Tensor<2, Int>, layers: usize) -> Tensor<3> {
        let [b, n] = ids.dims();
        let device = ids.device();
        let m = &self.text_model;
        let positions = Tensor::<1, Int>::arange(0..n as i64, &device)
            .reshape([1, n])
            .expand([b, n]);
        let mut x = m.embeddings.token_embedding.forward(ids)
            + m.embeddings.position_embedding.forward(positions);
        let mask = causal_mask(n, &device);
        for layer in &m.encoder.layers[..layers] {
            x = layer.forward(x, Some(mask.clone()));
        }
        x
    }
}

/// Additive causal mask [1, 1, N, N]: 0 on and below the diagonal, a large negative above.
fn causal_mask(n: usize, device: &Device) -> Tensor<4> {
    let values: Vec<f32> = (0..n * n)
        .map(|i| if i % n > i / n { f32::MIN } else { 0.0 })
        .collect();
    Tensor::<2>::from_data(TensorData::new(values, [n, n]), device).reshape([1, 1, n, n])
}
