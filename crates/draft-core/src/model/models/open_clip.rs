//! OpenCLIP checkpoints (`open_clip.CLIP`, the layout of HPSv2's ViT-H-14 and of the
//! `laion/CLIP-*` repos' `open_clip_*` files) loaded into the same [`CLIPModel`] as
//! transformers' layout: the towers compute the same functions, only the keys differ.
//!
//! open_clip's keys are read under their own names: `visual.conv1`, `visual.class_embedding`,
//! `visual.positional_embedding`, `visual.ln_pre`, `visual.transformer.resblocks.{i}.{ln_1,
//! attn.in_proj_weight, attn.in_proj_bias, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}`,
//! `visual.ln_post`, `visual.proj` ([width, embed_dim], applied as `x @ proj`), and for the text
//! tower `token_embedding`, `positional_embedding`, `transformer.resblocks.{i}…`, `ln_final`,
//! `text_projection`, `logit_scale`. The fused `in_proj_weight` [3·d, d] is split into q, k, v.
//! Pooling: the class token (vision), the highest token id = end of text (text), as
//! open_clip's defaults (`pool_type` `tok` / `argmax`).

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};
use crate::model::models::clip::{CLIPModel, CLIPVisionEmbeddings, CLIPVisionTransformer};
use crate::model::models::clip_text::{
    CLIPAttention, CLIPEncoder, CLIPEncoderLayer, CLIPMLP, CLIPTextEmbeddings, CLIPTextModel,
    CLIPTextTransformer,
};
use crate::model::nn::{Conv2d, Embedding, LayerNorm, Linear, param};
use crate::model::var_builder::VarBuilder;

/// open_clip's `ViT-H-14.json` (the architecture of HPSv2 and of laion/CLIP-ViT-H-14-*).
pub const VIT_H_14: &str = r#"{
    "embed_dim": 1024,
    "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24}
}"#;

/// open_clip's `ViT-L-14.json`.
pub const VIT_L_14: &str = r#"{
    "embed_dim": 768,
    "vision_cfg": {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 12}
}"#;

/// The built-in architecture names `OpenClipConfig::named` knows.
pub const NAMED: [(&str, &str); 2] = [("ViT-H-14", VIT_H_14), ("ViT-L-14", VIT_L_14)];

#[derive(Debug, Clone, Deserialize)]
pub struct VisionCfg {
    pub image_size: usize,
    pub layers: usize,
    pub width: usize,
    #[serde(default = "head_width")]
    pub head_width: usize,
    #[serde(default = "mlp_ratio")]
    pub mlp_ratio: f64,
    pub patch_size: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct TextCfg {
    #[serde(default = "context_length")]
    pub context_length: usize,
    #[serde(default = "vocab_size")]
    pub vocab_size: usize,
    #[serde(default = "text_width")]
    pub width: usize,
    #[serde(default = "text_heads")]
    pub heads: usize,
    #[serde(default = "text_layers")]
    pub layers: usize,
    #[serde(default = "mlp_ratio")]
    pub mlp_ratio: f64,
}

fn head_width() -> usize {
    64
}
fn mlp_ratio() -> f64 {
    4.0
}
fn context_length() -> usize {
    77
}
fn vocab_size() -> usize {
    49408
}
fn text_width() -> usize {
    512
}
fn text_heads() -> usize {
    8
}
fn text_layers() -> usize {
    12
}

/// An open_clip model config (`model_configs/*.json`, or the `model_cfg` of a hub repo's
/// `open_clip_config.json`).
#[derive(Debug, Clone, Deserialize)]
pub struct OpenClipConfig {
    pub embed_dim: usize,
    #[serde(default)]
    pub quick_gelu: bool,
    pub vision_cfg: VisionCfg,
    pub text_cfg: TextCfg,
}

/// Options of open_clip's towers this loader does not implement; a config that sets one is
/// refused rather than loaded into a model that computes something else.
const UNSUPPORTED: [&str; 13] = [
    "timm_model_name",
    "global_average_pool",
    "hf_model_name",
    "ls_init_value",
    "attentional_pool",
    "attn_pooler_heads",
    "no_ln_pre",
    "final_ln_after_pool",
    "pos_embed_type",
    "no_causal_mask",
    "embed_cls",
    "proj_bias",
    "act_kwargs",
];

impl OpenClipConfig {
    /// Parses a model config, or an `open_clip_config.json` (its `model_cfg`).
    pub fn from_json(file: &str, json: &str) -> Result<Self> {
        let v: Value =
            serde_json::from_str(json).map_err(|e| Error::config(file, e.to_string()))?;
        let root = if v.get("model_cfg").is_some() {
            "model_cfg"
        } else {
            ""
        };
        let v = v.get("model_cfg").cloned().unwrap_or(v);
        for tower in ["vision_cfg", "text_cfg"] {
            let Some(obj) = v.get(tower).and_then(Value::as_object) else {
                continue;
            };
            for key in UNSUPPORTED {
                let set = match obj.get(key) {
                    None | Some(Value::Null) | Some(Value::Bool(false)) => false,
                    Some(_) => true,
                };
                if set {
                    return Err(Error::config(
                        file,
                        format!("`{tower}.{key}` is not supported by this OpenCLIP loader"),
                    ));
                }
            }
            match obj.get("pool_type") {
                None | Some(Value::Null) => {}
                Some(Value::String(s)) if s == "tok" || s == "argmax" => {}
                Some(other) => {
                    return Err(Error::config(
                        file,
                        format!("`{tower}.pool_type` = {other} is not supported (tok, argmax)"),
                    ));
                }
            }
        }
        let c: Self = serde_path_to_error::deserialize(&v).map_err(|e| {
            let path = match (root, e.path().to_string()) {
                ("", p) if p == "." => String::new(),
                (r, p) if p == "." => r.to_string(),
                ("", p) => p,
                (r, p) if p.starts_with('[') => format!("{r}{p}"),
                (r, p) => format!("{r}.{p}"),
            };
            match path.as_str() {
                "" => Error::config(file, e.inner().to_string()),
                _ => Error::config(file, format!("`{path}`: {}", e.inner())),
            }
        })?;
        let (vc, tc) = (&c.vision_cfg, &c.text_cfg);
        for (field, x) in [
            ("embed_dim", c.embed_dim),
            ("vision_cfg.image_size", vc.image_size),
            ("vision_cfg.layers", vc.layers),
            ("vision_cfg.width", vc.width),
            ("vision_cfg.head_width", vc.head_width),
            ("vision_cfg.patch_size", vc.patch_size),
            ("text_cfg.context_length", tc.context_length),
            ("text_cfg.vocab_size", tc.vocab_size),
            ("text_cfg.width", tc.width),
            ("text_cfg.heads", tc.heads),
            ("text_cfg.layers", tc.layers),
        ] {
            Error::check_size(file, field, x, 1)?;
        }
        // The MLP's width is width × mlp_ratio (4 in every released model).
        Error::check_number(file, "vision_cfg.mlp_ratio", vc.mlp_ratio, 0.01..=64.0)?;
        Error::check_number(file, "text_cfg.mlp_ratio", tc.mlp_ratio, 0.01..=64.0)?;
        if !vc.image_size.is_multiple_of(vc.patch_size) {
            return Err(Error::config(
                file,
                format!(
                    "`vision_cfg.image_size` = {} is not a multiple of `vision_cfg.patch_size` = {}",
                    vc.image_size, vc.patch_size
                ),
            ));
        }
        if !vc.width.is_multiple_of(vc.head_width) {
            return Err(Error::config(
                file,
                format!(
                    "`vision_cfg.width` = {} is not a multiple of `vision_cfg.head_width` = {}",
                    vc.width, vc.head_width
                ),
            ));
        }
        if !tc.width.is_multiple_of(tc.heads) {
            return Err(Error::config(
                file,
                format!(
                    "`text_cfg.width` = {} is not a multiple of `text_cfg.heads` = {}",
                    tc.width, tc.heads
                ),
            ));
        }
        Ok(c)
    }

    /// A built-in architecture by open_clip's name (`ViT-H-14`, `ViT-L-14`).
    pub fn named(name: &str) -> Option<Self> {
        NAMED
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(n, json)| Self::from_json(n, json).expect("built-in configs parse"))
    }
}

/// `nn.MultiheadAttention`'s fused projection, split into q, k, v.
fn attention(vb: &VarBuilder, d: usize, heads: usize) -> Result<CLIPAttention> {
    let w = vb.get("in_proj_weight", [3 * d, d])?;
    let b = vb.get("in_proj_bias", [3 * d])?;
    let part = |i: usize| Linear {
        weight: param(w.clone().narrow(0, i * d, d).transpose()),
        bias: Some(param(b.clone().narrow(0, i * d, d))),
        lora: None,
    };
    Ok(CLIPAttention {
        q_proj: part(0),
        k_proj: part(1),
        v_proj: part(2),
        out_proj: Linear::load(vb.pp("out_proj"), d, d, true)?,
        num_heads: heads,
    })
}

/// `ResidualAttentionBlock`: x + attn(ln_1(x)), then x + mlp(ln_2(x)) — a CLIP encoder layer.
fn resblock(
    vb: VarBuilder,
    d: usize,
    heads: usize,
    mlp_ratio: f64,
    quick_gelu: bool,
) -> Result<CLIPEncoderLayer> {
    let hidden = (d as f64 * mlp_ratio) as usize;
    Ok(CLIPEncoderLayer {
        self_attn: attention(&vb.pp("attn"), d, heads)?,
        layer_norm1: LayerNorm::load(vb.pp("ln_1"), d, 1e-5)?,
        mlp: CLIPMLP {
            fc1: Linear::load(vb.pp("mlp").pp("c_fc"), d, hidden, true)?,
            fc2: Linear::load(vb.pp("mlp").pp("c_proj"), hidden, d, true)?,
            quick_gelu,
        },
        layer_norm2: LayerNorm::load(vb.pp("ln_2"), d, 1e-5)?,
    })
}

/// `x @ proj` as a bias-free linear layer (`proj` is [d_in, d_out], the layout [`Linear`]
/// keeps its weight in).
fn projection(vb: &VarBuilder, name: &str, d_in: usize, d_out: usize) -> Result<Linear> {
    Ok(Linear {
        weight: param(vb.get(name, [d_in, d_out])?),
        bias: None,
        lora: None,
    })
}

/// Loads an `open_clip.CLIP` state dict (keys without a prefix) into a [`CLIPModel`];
/// `logit_scale` is the value of the checkpoint's (log-scale) `logit_scale`.
pub fn load(vb: VarBuilder, c: &OpenClipConfig, logit_scale: f64) -> Result<CLIPModel> {
    let v = &c.vision_cfg;
    let t = &c.text_cfg;
    let vis = vb.pp("visual");
    let vheads = v.width / v.head_width;
    let patches = (v.image_size / v.patch_size).pow(2);
    let vlayers = (0..v.layers)
        .map(|i| {
            resblock(
                vis.pp("transformer").pp("resblocks").pp(i),
                v.width,
                vheads,
                v.mlp_ratio,
                c.quick_gelu,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    let tlayers = (0..t.layers)
        .map(|i| {
            resblock(
                vb.pp("transformer").pp("resblocks").pp(i),
                t.width,
                t.heads,
                t.mlp_ratio,
                c.quick_gelu,
            )
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(CLIPModel {
        vision_model: CLIPVisionTransformer {
            embeddings: CLIPVisionEmbeddings {
                class_embedding: param(vis.get("class_embedding", [v.width])?),
                patch_embedding: Conv2d::load_with_bias(
                    vis.pp("conv1"),
                    3,
                    v.width,
                    v.patch_size,
                    v.patch_size,
                    (0, 0),
                    false,
                )?,
                position_embedding: Embedding {
                    blocks: vec![param(
                        vis.get("positional_embedding", [patches + 1, v.width])?,
                    )],
                },
            },
            pre_layrnorm: LayerNorm::load(vis.pp("ln_pre"), v.width, 1e-5)?,
            encoder: CLIPEncoder { layers: vlayers },
            post_layernorm: LayerNorm::load(vis.pp("ln_post"), v.width, 1e-5)?,
        },
        visual_projection: projection(&vis, "proj", v.width, c.embed_dim)?,
        text_model: CLIPTextModel {
            text_projection: None,
            text_model: CLIPTextTransformer {
                embeddings: CLIPTextEmbeddings {
                    token_embedding: Embedding::load(
                        vb.pp("token_embedding"),
                        t.vocab_size,
                        t.width,
                    )?,
                    position_embedding: Embedding {
                        blocks: vec![param(
                            vb.get("positional_embedding", [t.context_length, t.width])?,
                        )],
                    },
                },
                encoder: CLIPEncoder { layers: tlayers },
                final_layer_norm: LayerNorm::load(vb.pp("ln_final"), t.width, 1e-5)?,
            },
            max_position_embeddings: t.context_length,
        },
        text_projection: projection(&vb, "text_projection", t.width, c.embed_dim)?,
        logit_scale,
        image_size: v.image_size,
        // open_clip pools the text at `argmax(ids)`: the end-of-text token has the highest id.
        eos_token_id: None,
    })
}
