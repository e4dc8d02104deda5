//! transformers' `CLIPModel`: the vision tower (`CLIPVisionTransformer` + `visual_projection`)
//! and the text tower's pooled, projected features, from the `config.json` + safetensors layout
//! of openai/clip-vit-large-patch14 or yuvalkirstain/PickScore_v1.

use burn::module::Param;
use burn::prelude::*;
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::model::models::clip_text::{
    CLIPEncoder, CLIPEncoderLayer, CLIPTextConfig, CLIPTextModel, LayerDims,
};
use crate::model::nn::{Conv2d, Embedding, LayerNorm, Linear};
use crate::model::var_builder::VarBuilder;

#[derive(Debug, Clone, Deserialize)]
pub struct CLIPVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    #[serde(default = "three")]
    pub num_channels: usize,
    #[serde(default = "quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
}

fn three() -> usize {
    3
}
fn quick_gelu() -> String {
    "quick_gelu".into()
}
fn eps() -> f64 {
    1e-5
}

/// The top level of a `CLIPModel` `config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct CLIPConfig {
    pub text_config: serde_json::Value,
    pub vision_config: CLIPVisionConfig,
    pub projection_dim: usize,
}

impl CLIPConfig {
    pub fn from_json(file: &str, json: &str) -> Result<(Self, CLIPTextConfig)> {
        let c: Self = crate::error::from_json(file, json)?;
        let v = &c.vision_config;
        for (field, x) in [
            ("hidden_size", v.hidden_size),
            ("intermediate_size", v.intermediate_size),
            ("num_hidden_layers", v.num_hidden_layers),
            ("num_attention_heads", v.num_attention_heads),
            ("image_size", v.image_size),
            ("patch_size", v.patch_size),
            ("num_channels", v.num_channels),
        ] {
            Error::check_size(file, &format!("vision_config.{field}"), x, 1)?;
        }
        Error::check_size(file, "projection_dim", c.projection_dim, 1)?;
        if !v.image_size.is_multiple_of(v.patch_size) {
            return Err(Error::config(
                file,
                format!(
                    "`vision_config.image_size` = {} is not a multiple of `vision_config.patch_size` = {}",
                    v.image_size, v.patch_size
                ),
            ));
        }
        if !v.hidden_size.is_multiple_of(v.num_attention_heads) {
            return Err(Error::config(
                file,
                format!(
                    "`vision_config.hidden_size` = {} is not divisible by \
                     `vision_config.num_attention_heads` = {}",
                    v.hidden_size, v.num_attention_heads
                ),
            ));
        }
        if !matches!(v.hidden_act.as_str(), "quick_gelu" | "gelu") {
            return Err(Error::config(
                file,
                format!(
                    "`vision_config.hidden_act` {:?} is not supported",
                    v.hidden_act
                ),
            ));
        }
        Error::check_number(
            file,
            "vision_config.layer_norm_eps",
            v.layer_norm_eps,
            0.0..=1.0,
        )?;
        let text: CLIPTextConfig =
            serde_path_to_error::deserialize(&c.text_config).map_err(|e| {
                let path = e.path().to_string();
                let field = if path == "." {
                    String::new()
                } else {
                    format!(".{path}")
                };
                Error::config(file, format!("`text_config{field}`: {}", e.inner()))
            })?;
        text.check(file, "text_config.")?;
        Ok((c, text))
    }
}

#[derive(Module, Debug)]
pub struct CLIPVisionEmbeddings {
    pub class_embedding: Param<Tensor<1>>,
    pub patch_embedding: Conv2d,
    pub position_embedding: Embedding,
}

#[derive(Module, Debug)]
pub struct CLIPVisionTransformer {
    pub embeddings: CLIPVisionEmbeddings,
    /// (sic: transformers' name)
    pub pre_layrnorm: LayerNorm,
    pub encoder: CLIPEncoder,
    pub post_layernorm: LayerNorm,
}

/// `CLIPModel` with both towers and projections; `logit_scale` is kept as its value.
#[derive(Module, Debug)]
pub struct CLIPModel {
    pub vision_model: CLIPVisionTransformer,
    pub visual_projection: Linear,
    pub text_model: CLIPTextModel,
    pub text_projection: Linear,
    pub logit_scale: f64,
    pub image_size: usize,
    pub eos_token_id: Option<i64>,
}

impl CLIPModel {
    pub fn load(
        vb: VarBuilder,
        c: &CLIPConfig,
        text: &CLIPTextConfig,
        logit_scale: f64,
        eos_token_id: Option<i64>,
    ) -> Result<Self> {
        let v = &c.vision_config;
        let dims = LayerDims {
            hidden: v.hidden_size,
            intermediate: v.intermediate_size,
            heads: v.num_attention_heads,
            eps: v.layer_norm_eps,
            quick_gelu: v.hidden_act == "quick_gelu",
        };
        let vm = vb.pp("vision_model");
        let emb = vm.pp("embeddings");
        let patches = (v.image_size / v.patch_size).pow(2);
        let layers = (0..v.num_hidden_layers)
            .map(|i| CLIPEncoderLayer::load(vm.pp("encoder").pp("layers").pp(i), &dims))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            vision_model: CLIPVisionTransformer {
                embeddings: CLIPVisionEmbeddings {
                    class_embedding: crate::model::nn::param(
                        emb.get("class_embedding", [v.hidden_size])?,
                    ),
                    patch_embedding: Conv2d::load_with_bias(
                        emb.pp("patch_embedding"),
                        v.num_channels,
                        v.hidden_size,
                        v.patch_size,
                        v.patch_size,
                        (0, 0),
                        false,
                    )?,
                    position_embedding: Embedding::load(
                        emb.pp("position_embedding"),
                        patches + 1,
                        v.hidden_size,
                    )?,
                },
                pre_layrnorm: LayerNorm::load(
                    vm.pp("pre_layrnorm"),
                    v.hidden_size,
                    v.layer_norm_eps,
                )?,
                encoder: CLIPEncoder { layers },
                post_layernorm: LayerNorm::load(
                    vm.pp("post_layernorm"),
                    v.hidden_size,
                    v.layer_norm_eps,
                )?,
            },
            visual_projection: Linear::load(
                vb.pp("visual_projection"),
                v.hidden_size,
                c.projection_dim,
                false,
            )?,
            text_model: CLIPTextModel::load(vb.clone(), text)?,
            text_projection: Linear::load(
                vb.pp("text_projection"),
                text.hidden_size,
                c.projection_dim,
                false,
            )?,
            logit_scale,
            image_size: v.image_size,
            eos_token_id,
        })
    }

    /// The vision tower's `last_hidden_state` [B, 1 + patches, hidden] for normalised pixels.
    pub fn vision_hidden(&self, pixel_values: Tensor<4>) -> Tensor<3> {
        let m = &self.vision_model;
        let x = m.embeddings.patch_embedding.forward(pixel_values); // [B, D, g, g]
        let [b, d, gh, gw] = x.dims();
        let x = x.reshape([b, d, gh * gw]).swap_dims(1, 2); // [B, P, D]
        let cls = m
            .embeddings
            .class_embedding
            .val()
            .reshape([1, 1, d])
            .expand([b, 1, d]);
        let x = Tensor::cat(vec![cls, x], 1);
        let n = gh * gw + 1;
        let device = x.device();
        let positions = Tensor::<1, Int>::arange(0..n as i64, &device).reshape([1, n]);
        let x = x + m.embeddings.position_embedding.forward(positions);
        let mut x = m.pre_layrnorm.forward(x);
        for layer in &m.encoder.layers {
            x = layer.forward(x, None);
        }
        x
    }

    /// `get_image_features`: `visual_projection(post_layernorm(CLS))` [B, projection_dim].
    pub fn image_features(&self, pixel_values: Tensor<4>) -> Tensor<2> {
        let x = self.vision_hidden(pixel_values);
        let [b, _, d] = x.dims();
        let cls = x.narrow(1, 0, 1).reshape([b, d]);
        self.visual_projection
            .forward(self.vision_model.post_layernorm.forward(cls))
    }

    /// `get_text_features`: the final hidden state at the EOS token, projected. transformers
    /// pools at the first `eos_token_id` when the config's id is not 2, else at the highest id
    /// (the legacy rule); `ids` are the token ids on the host.
    pub fn text_features(&self, ids: &[Vec<i64>], device: &Device) -> Tensor<2> {
        let n = ids[0].len();
        let flat: Vec<i64> = ids.iter().flatten().copied().collect();
        let t = Tensor::<2, Int>::from_data(TensorData::new(flat, [ids.len(), n]), device);
        let hidden = self.text_model.forward(t); // [B, N, D]
        let rows: Vec<Tensor<2>> = ids
            .iter()
            .enumerate()
            .map(|(i, row)| {
                let pos = match self.eos_token_id {
                    Some(eos) if eos != 2 => row.iter().position(|&t| t == eos).unwrap_or(n - 1),
                    _ => {
                        let max = row.iter().max().copied().unwrap_or(0);
                        row.iter().position(|&t| t == max).unwrap_or(0)
                    }
                };
                let d = hidden.dims()[2];
                hidden
                    .clone()
                    .narrow(0, i, 1)
                    .narrow(1, pos, 1)
                    .reshape([1, d])
            })
            .collect();
        self.text_projection.forward(Tensor::cat(rows, 0))
    }
}
