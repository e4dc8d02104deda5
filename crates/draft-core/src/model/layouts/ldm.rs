//! Single-file checkpoints in the original LDM / CompVis layout — what A1111, ComfyUI and model
//! sites use (`v1-5-pruned-emaonly.safetensors`, `.ckpt`) — read as a diffusers pipeline.
//!
//! One file holds every component: the UNet under `model.diffusion_model.` (`input_blocks`,
//! `middle_block`, `output_blocks`, `time_embed`, `out`), the VAE under `first_stage_model.`
//! (`encoder.down.{i}.block.{j}`, `mid.attn_1.{q,k,v,proj_out}` as 1×1 convs, the decoder's
//! `up.{i}` in reverse order), and the text tower under `cond_stage_model.transformer.` (SD-1.x:
//! transformers' CLIP names) or `cond_stage_model.model.` (SD-2.x: OpenCLIP, fused
//! `in_proj_weight`, one layer more than SD-2 uses). Each component's keys are renamed onto the
//! diffusers / transformers names here, as diffusers' `convert_ldm_*_checkpoint` does; anything
//! else in the file (`model_ema.*`, the loss's `logvar`, …) is ignored, so EMA-only and pruned
//! checkpoints load alike and the non-EMA weights are used, as diffusers' `from_single_file`.
//!
//! Stable Diffusion XL files (Stability's `sd_xl_base_1.0.safetensors` layout) keep the UNet
//! and VAE there (the UNet's `label_emb.0.{0,2}` are diffusers' `add_embedding.linear_{1,2}`)
//! and hold two text towers under `conditioner.embedders.`: `0.transformer.` (CLIP names, as
//! SD-1.x) and `1.model.` (OpenCLIP, all layers used, `text_projection` stored as
//! `[width, projection]`, read transposed).
//!
//! Such a file has no config: [`infer`] reads the architecture from its keys and shapes, with
//! SD's fixed choices where shapes cannot tell (8 heads per UNet block for SD-1.x, 64-channel
//! heads with OpenCLIP; GroupNorm 32; `scaling_factor` 0.18215; SD's noise schedule,
//! v-prediction for SD-2.x as diffusers assumes without a `global_step`). A config folder
//! (`--model-config`) overrides all of it.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::model::weights::Weights;

const UNET: &str = "model.diffusion_model.";
const VAE: &str = "first_stage_model.";
const CLIP: &str = "cond_stage_model.transformer.";
const OPEN_CLIP: &str = "cond_stage_model.model.";
/// SDXL's towers: CLIP ViT-L and OpenCLIP bigG.
const XL_CLIP: &str = "conditioner.embedders.0.transformer.";
const XL_OPEN_CLIP: &str = "conditioner.embedders.1.model.";

/// Whether a checkpoint is SDXL (base): its second tower under `conditioner.embedders.1.model.`.
pub fn is_sdxl(s: &Shapes) -> bool {
    has_prefix(s, XL_OPEN_CLIP)
}

/// Checkpoints of other model families, refused by name before anything is inferred.
fn other_family(s: &Shapes) -> Option<&'static str> {
    let any = |p: &str| has_prefix(s, p);
    if any("model.diffusion_model.joint_blocks.") {
        Some("a Stable Diffusion 3 checkpoint (MMDiT)")
    } else if any("model.diffusion_model.double_blocks.") || any("double_blocks.") {
        Some("a Flux checkpoint")
    } else if any("conditioner.embedders.0.model.") && !is_sdxl(s) {
        Some("an SDXL refiner checkpoint (one OpenCLIP tower, no CLIP ViT-L): only SDXL base loads")
    } else {
        None
    }
}

/// The key a single-file model's checkpoint is held under in its `ModelFiles`.
pub const CHECKPOINT: &str = "checkpoint";

/// Every tensor's key and shape: all that the architecture is read from.
pub type Shapes = BTreeMap<String, Vec<usize>>;

/// The keys and shapes of a file's tensors (from its header: no values are read).
pub fn shapes(w: &Weights) -> Result<Shapes> {
    w.keys()
        .into_iter()
        .map(|k| {
            let s = w.shape(&k)?;
            Ok((k, s))
        })
        .collect()
}

/// Whether a file is an LDM checkpoint (it has `model.diffusion_model.*` tensors).
pub fn is_checkpoint(s: &Shapes) -> bool {
    s.keys().any(|k| k.starts_with(UNET))
}

/// The tensors of one component (`unet`, `vae`, `text_encoder`) of an LDM checkpoint under
/// their diffusers / transformers keys.
pub fn component<'a>(w: Weights<'a>, component: &str) -> Result<Weights<'a>> {
    let s = shapes(&w)?;
    match component {
        "unet" => {
            let lpb = unet_layers_per_block(w.file(), &s)?;
            w.renamed(|k| unet_key(k.strip_prefix(UNET)?, lpb))
        }
        "text_encoder" if is_sdxl(&s) => w.renamed(|k| clip_key(k.strip_prefix(XL_CLIP)?)),
        "text_encoder_2" if is_sdxl(&s) => Ok(w
            .remapped(|k| match k.strip_prefix(XL_OPEN_CLIP) {
                Some("text_projection") => vec![("text_projection.weight".into(), None)],
                Some(k) => open_clip_keys(k),
                None => Vec::new(),
            })?
            .transposed("text_projection.weight")),
        "vae" => {
            let levels = count(&s, &format!("{VAE}decoder.up."));
            w.renamed(|k| vae_key(k.strip_prefix(VAE)?, levels))
        }
        "text_encoder" => match text_tower(w.file(), &s)? {
            Tower::Clip => w.renamed(|k| clip_key(k.strip_prefix(CLIP)?)),
            Tower::OpenClip => w.remapped(|k| match k.strip_prefix(OPEN_CLIP) {
                Some(k) => open_clip_keys(k),
                None => Vec::new(),
            }),
        },
        other => Err(Error::Input(format!(
            "no component `{other}` in a checkpoint"
        ))),
    }
}

enum Tower {
    Clip,
    OpenClip,
}

fn text_tower(file: &str, s: &Shapes) -> Result<Tower> {
    if has_prefix(s, CLIP) {
        Ok(Tower::Clip)
    } else if has_prefix(s, OPEN_CLIP) {
        Ok(Tower::OpenClip)
    } else {
        Err(Error::config(
            file,
            "no text encoder in the checkpoint (neither `cond_stage_model.transformer.*` \
             (CLIP, SD-1.x) nor `cond_stage_model.model.*` (OpenCLIP, SD-2.x))",
        ))
    }
}

/// The number of distinct `<prefix>{i}.` indices.
fn count(s: &Shapes, prefix: &str) -> usize {
    let mut seen = std::collections::BTreeSet::new();
    for k in s.keys() {
        if let Some(i) = k
            .strip_prefix(prefix)
            .and_then(|r| r.split('.').next())
            .and_then(|i| i.parse::<usize>().ok())
        {
            seen.insert(i);
        }
    }
    seen.len()
}

fn has_prefix(s: &Shapes, prefix: &str) -> bool {
    s.range(prefix.to_string()..)
        .next()
        .is_some_and(|(k, _)| k.starts_with(prefix))
}

/// The shape of a weight the architecture is read from: a conv, linear or embedding weight,
/// so at least two axes.
fn shape<'s>(file: &str, s: &'s Shapes, key: &str) -> Result<&'s [usize]> {
    let found = s.get(key).ok_or_else(|| Error::MissingTensor {
        file: file.to_string(),
        key: key.to_string(),
    })?;
    if found.len() < 2 {
        return Err(Error::config(
            file,
            format!("tensor `{key}` has shape {found:?}: a weight has at least 2 axes"),
        ));
    }
    Ok(found)
}

/// One LDM input block: a resnet (with its output channels and whether an attention follows)
/// or a downsampler.
enum InputBlock {
    Resnet { channels: usize, attention: bool },
    Downsample,
}

fn input_blocks(file: &str, s: &Shapes) -> Result<Vec<InputBlock>> {
    let mut blocks = Vec::new();
    for i in 1.. {
        let p = format!("{UNET}input_blocks.{i}.");
        if !has_prefix(s, &p) {
            break;
        }
        if s.contains_key(&format!("{p}0.op.weight")) {
            blocks.push(InputBlock::Downsample);
        } else {
            let channels = shape(file, s, &format!("{p}0.out_layers.3.weight"))?[0];
            let attention = has_prefix(s, &format!("{p}1."));
            blocks.push(InputBlock::Resnet {
                channels,
                attention,
            });
        }
    }
    Ok(blocks)
}

fn unet_layers_per_block(file: &str, s: &Shapes) -> Result<usize> {
    let blocks = input_blocks(file, s)?;
    let lpb = blocks
        .iter()
        .take_while(|b| matches!(b, InputBlock::Resnet { .. }))
        .count();
    if lpb == 0 {
        return Err(Error::config(
            file,
            "no UNet resnets under `model.diffusion_model.input_blocks.1.0.*`",
        ));
    }
    Ok(lpb)
}

/// A UNet key after `model.diffusion_model.` → diffusers' `UNet2DConditionModel` key, for
/// `lpb` resnets per block.
fn unet_key(k: &str, lpb: usize) -> Option<String> {
    let resnet = |rest: &str| -> Option<String> {
        let (head, tail) = match rest.split_once('.') {
            Some(("skip_connection", t)) => ("conv_shortcut", t),
            _ => {
                let mut parts = rest.splitn(3, '.');
                let (a, b, t) = (parts.next()?, parts.next()?, parts.next()?);
                let name = match (a, b) {
                    ("in_layers", "0") => "norm1",
                    ("in_layers", "2") => "conv1",
                    ("emb_layers", "1") => "time_emb_proj",
                    ("out_layers", "0") => "norm2",
                    ("out_layers", "3") => "conv2",
                    _ => return None,
                };
                (name, t)
            }
        };
        Some(format!("{head}.{tail}"))
    };
    let mut parts = k.splitn(4, '.');
    let block = parts.next()?;
    match block {
        "label_emb" => {
            // SDXL: `label_emb.0.{0,2}` (a Sequential inside a Sequential) → `add_embedding`.
            let rest = k.strip_prefix("label_emb.0.")?;
            let (i, t) = rest.split_once('.')?;
            let linear = match i {
                "0" => "linear_1",
                "2" => "linear_2",
                _ => return None,
            };
            Some(format!("add_embedding.{linear}.{t}"))
        }
        "time_embed" => {
            let i = parts.next()?;
            let rest = k.splitn(3, '.').nth(2)?;
            let linear = match i {
                "0" => "linear_1",
                "2" => "linear_2",
                _ => return None,
            };
            Some(format!("time_embedding.{linear}.{rest}"))
        }
        "out" => {
            let i = parts.next()?;
            let rest = k.splitn(3, '.').nth(2)?;
            let name = match i {
                "0" => "conv_norm_out",
                "2" => "conv_out",
                _ => return None,
            };
            Some(format!("{name}.{rest}"))
        }
        "input_blocks" => {
            let i: usize = parts.next()?.parse().ok()?;
            let m = parts.next()?;
            let rest = parts.next()?;
            if i == 0 {
                return (m == "0").then(|| format!("conv_in.{rest}"));
            }
            let (level, j) = ((i - 1) / (lpb + 1), (i - 1) % (lpb + 1));
            match (m, j == lpb) {
                ("0", true) => rest
                    .strip_prefix("op.")
                    .map(|t| format!("down_blocks.{level}.downsamplers.0.conv.{t}")),
                ("0", false) => Some(format!("down_blocks.{level}.resnets.{j}.{}", resnet(rest)?)),
                ("1", false) => Some(format!("down_blocks.{level}.attentions.{j}.{rest}")),
                _ => None,
            }
        }
        "middle_block" => {
            let m = parts.next()?;
            let rest = k.splitn(3, '.').nth(2)?;
            match m {
                "0" => Some(format!("mid_block.resnets.0.{}", resnet(rest)?)),
                "1" => Some(format!("mid_block.attentions.0.{rest}")),
                "2" => Some(format!("mid_block.resnets.1.{}", resnet(rest)?)),
                _ => None,
            }
        }
        "output_blocks" => {
            let i: usize = parts.next()?.parse().ok()?;
            let m = parts.next()?;
            let rest = parts.next()?;
            let (level, j) = (i / (lpb + 1), i % (lpb + 1));
            let upsampler = |t: &str| format!("up_blocks.{level}.upsamplers.0.conv.{t}");
            match m {
                "0" => Some(format!("up_blocks.{level}.resnets.{j}.{}", resnet(rest)?)),
                "1" => match rest.strip_prefix("conv.") {
                    Some(t) => Some(upsampler(t)),
                    None => Some(format!("up_blocks.{level}.attentions.{j}.{rest}")),
                },
                "2" => rest.strip_prefix("conv.").map(upsampler),
                _ => None,
            }
        }
        _ => None,
    }
}

/// A VAE key after `first_stage_model.` → diffusers' `AutoencoderKL` key, for a decoder of
/// `levels` up blocks (LDM numbers them from the bottom, diffusers from the top).
fn vae_key(k: &str, levels: usize) -> Option<String> {
    let resnet = |rest: &str| -> String {
        match rest.strip_prefix("nin_shortcut.") {
            Some(t) => format!("conv_shortcut.{t}"),
            None => rest.to_string(),
        }
    };
    let mid = |rest: &str| -> Option<String> {
        let (part, tail) = rest.split_once('.')?;
        match part {
            "block_1" => Some(format!("mid_block.resnets.0.{}", resnet(tail))),
            "block_2" => Some(format!("mid_block.resnets.1.{}", resnet(tail))),
            "attn_1" => {
                let (name, t) = tail.split_once('.')?;
                let name = match name {
                    "norm" => "group_norm",
                    "q" => "to_q",
                    "k" => "to_k",
                    "v" => "to_v",
                    "proj_out" => "to_out.0",
                    _ => return None,
                };
                Some(format!("mid_block.attentions.0.{name}.{t}"))
            }
            _ => None,
        }
    };
    if k.starts_with("quant_conv.") || k.starts_with("post_quant_conv.") {
        return Some(k.to_string());
    }
    let (coder, rest) = k.split_once('.')?;
    if coder != "encoder" && coder != "decoder" {
        return None;
    }
    let (part, tail) = rest.split_once('.')?;
    let mapped = match part {
        "conv_in" | "conv_out" => format!("{part}.{tail}"),
        "norm_out" => format!("conv_norm_out.{tail}"),
        "mid" => mid(tail)?,
        "down" | "up" => {
            let (i, t) = tail.split_once('.')?;
            let i: usize = i.parse().ok()?;
            let (level, blocks) = if part == "down" {
                (i, "down_blocks")
            } else {
                (levels.checked_sub(1 + i)?, "up_blocks")
            };
            let (kind, t) = t.split_once('.')?;
            match kind {
                "block" => {
                    let (j, t) = t.split_once('.')?;
                    format!("{blocks}.{level}.resnets.{j}.{}", resnet(t))
                }
                "downsample" | "upsample" => {
                    let sampler = if kind == "downsample" {
                        "downsamplers"
                    } else {
                        "upsamplers"
                    };
                    format!("{blocks}.{level}.{sampler}.0.{t}")
                }
                _ => return None,
            }
        }
        _ => return None,
    };
    Some(format!("{coder}.{mapped}"))
}

/// A CLIP key after `cond_stage_model.transformer.` → transformers' `CLIPTextModel` key (old
/// checkpoints lack the `text_model.` level).
fn clip_key(k: &str) -> Option<String> {
    if k.starts_with("text_model.") {
        return Some(k.to_string());
    }
    ["embeddings.", "encoder.", "final_layer_norm."]
        .iter()
        .any(|p| k.starts_with(p))
        .then(|| format!("text_model.{k}"))
}

/// An OpenCLIP text-tower key after `cond_stage_model.model.` → transformers' `CLIPTextModel`
/// keys; the fused `in_proj_*` becomes q, k and v (its three row blocks).
fn open_clip_keys(k: &str) -> Vec<(String, Option<(usize, usize)>)> {
    let one = |s: String| vec![(s, None)];
    match k {
        "token_embedding.weight" => {
            return one("text_model.embeddings.token_embedding.weight".into());
        }
        "positional_embedding" => {
            return one("text_model.embeddings.position_embedding.weight".into());
        }
        _ => {}
    }
    if let Some(t) = k.strip_prefix("ln_final.") {
        return one(format!("text_model.final_layer_norm.{t}"));
    }
    let Some(rest) = k.strip_prefix("transformer.resblocks.") else {
        return Vec::new();
    };
    let Some((i, rest)) = rest.split_once('.') else {
        return Vec::new();
    };
    let layer = format!("text_model.encoder.layers.{i}");
    let fused = |leaf: &str| -> Vec<(String, Option<(usize, usize)>)> {
        ["q_proj", "k_proj", "v_proj"]
            .iter()
            .enumerate()
            .map(|(j, p)| (format!("{layer}.self_attn.{p}.{leaf}"), Some((j, 3))))
            .collect()
    };
    match rest {
        "attn.in_proj_weight" => fused("weight"),
        "attn.in_proj_bias" => fused("bias"),
        _ => {
            let Some((part, t)) = rest.split_once('.') else {
                return Vec::new();
            };
            let name = match part {
                "ln_1" => "layer_norm1",
                "ln_2" => "layer_norm2",
                "attn" => match t.split_once('.') {
                    Some(("out_proj", t)) => return one(format!("{layer}.self_attn.out_proj.{t}")),
                    _ => return Vec::new(),
                },
                "mlp" => match t.split_once('.') {
                    Some(("c_fc", t)) => return one(format!("{layer}.mlp.fc1.{t}")),
                    Some(("c_proj", t)) => return one(format!("{layer}.mlp.fc2.{t}")),
                    _ => return Vec::new(),
                },
                _ => return Vec::new(),
            };
            one(format!("{layer}.{name}.{t}"))
        }
    }
}

/// The diffusers configs of a checkpoint, inferred from its keys and shapes.
#[derive(Debug, Clone)]
pub struct Inferred {
    pub model_index: Value,
    pub unet: Value,
    pub vae: Value,
    pub text_encoder: Value,
    /// SDXL's second tower.
    pub text_encoder_2: Option<Value>,
    pub scheduler: Value,
    /// The tokenizer's padding token: `<|endoftext|>` for SD-1.x, `!` for SD-2.x (OpenCLIP).
    pub pad_token: String,
}

/// Infers the architecture of an LDM checkpoint (see the module docs for the fixed choices).
pub fn infer(file: &str, s: &Shapes) -> Result<Inferred> {
    if let Some(what) = other_family(s) {
        return Err(Error::config(
            file,
            format!("{what}: only Stable Diffusion 1.x, 2.x and XL (base) single files load"),
        ));
    }
    let shape = |k: String| shape(file, s, &k).map(<[usize]>::to_vec);
    let xl = is_sdxl(s);
    let open_clip = !xl && matches!(text_tower(file, s)?, Tower::OpenClip);

    // UNet.
    let conv_in = shape(format!("{UNET}input_blocks.0.0.weight"))?;
    let out_channels = shape(format!("{UNET}out.2.weight"))?[0];
    let blocks = input_blocks(file, s)?;
    let lpb = unet_layers_per_block(file, s)?;
    let mut levels: Vec<(usize, bool)> = Vec::new();
    for level in blocks.split(|b| matches!(b, InputBlock::Downsample)) {
        let resnets: Vec<(usize, bool)> = level
            .iter()
            .filter_map(|b| match b {
                InputBlock::Resnet {
                    channels,
                    attention,
                } => Some((*channels, *attention)),
                InputBlock::Downsample => None,
            })
            .collect();
        if resnets.len() != lpb || lpb == 0 {
            return Err(Error::config(
                file,
                format!(
                    "UNet blocks with {} and {lpb} resnets: only one layers_per_block is supported",
                    resnets.len()
                ),
            ));
        }
        levels.push((resnets[0].0, resnets.iter().any(|r| r.1)));
    }
    let channels: Vec<usize> = levels.iter().map(|l| l.0).collect();
    let down_types: Vec<&str> = levels
        .iter()
        .map(|l| {
            if l.1 {
                "CrossAttnDownBlock2D"
            } else {
                "DownBlock2D"
            }
        })
        .collect();
    let up_types: Vec<&str> = (0..levels.len())
        .map(|l| {
            if has_prefix(s, &format!("{UNET}output_blocks.{}.1.", l * (lpb + 1)))
                && !s.contains_key(&format!(
                    "{UNET}output_blocks.{}.1.conv.weight",
                    l * (lpb + 1)
                ))
            {
                "CrossAttnUpBlock2D"
            } else {
                "UpBlock2D"
            }
        })
        .collect();
    if !has_prefix(s, &format!("{UNET}middle_block.1.")) {
        return Err(Error::config(
            file,
            "the UNet's middle block has no attention: only UNetMidBlock2DCrossAttn is supported",
        ));
    }
    let unet_key_ending = |end: &str| {
        s.iter()
            .find(|(k, _)| k.starts_with(UNET) && k.ends_with(end))
            .map(|(k, v)| (k.clone(), v.clone()))
    };
    let (attn_key, _) = unet_key_ending(".attn2.to_k.weight")
        .ok_or_else(|| Error::config(file, "the UNet has no cross-attention (attn2)"))?;
    let cross_attention_dim = shape(attn_key)?[1];
    let (proj_in, proj_shape) = unet_key_ending(".proj_in.weight")
        .ok_or_else(|| Error::config(file, "the UNet's attention blocks have no proj_in"))?;
    let use_linear_projection = proj_shape.len() == 2;
    let block_prefix = proj_in.trim_end_matches("proj_in.weight");
    let transformer_layers = count(s, &format!("{block_prefix}transformer_blocks."));
    // Heads cannot be read from shapes: SD-1.x has 8 per block, SD-2.x and XL 64 channels per
    // head.
    let heads: Value = if open_clip || xl {
        json!(channels.iter().map(|c| (c / 64).max(1)).collect::<Vec<_>>())
    } else {
        json!(8)
    };
    let v_prediction = open_clip;
    let sample_size = match (xl, v_prediction) {
        (true, _) => 128,
        (false, true) => 96,
        (false, false) => 64,
    };
    let mut unet = json!({
        "_class_name": "UNet2DConditionModel",
        "in_channels": conv_in[1],
        "out_channels": out_channels,
        "block_out_channels": channels,
        "layers_per_block": lpb,
        "down_block_types": down_types,
        "up_block_types": up_types,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "cross_attention_dim": cross_attention_dim,
        "attention_head_dim": heads,
        "use_linear_projection": use_linear_projection,
        "transformer_layers_per_block": transformer_layers.max(1),
        "sample_size": sample_size,
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "flip_sin_to_cos": true,
        "freq_shift": 0,
        "act_fn": "silu",
        "downsample_padding": 1,
    });
    if xl {
        // A transformer depth per level (1 where a level has no attention, as SDXL's config
        // says); the mid block takes the last level's.
        let depths: Vec<usize> = (0..levels.len())
            .map(|l| {
                count(
                    s,
                    &format!(
                        "{UNET}input_blocks.{}.1.transformer_blocks.",
                        1 + l * (lpb + 1)
                    ),
                )
                .max(1)
            })
            .collect();
        let mid = count(s, &format!("{UNET}middle_block.1.transformer_blocks."));
        if Some(&mid) != depths.last() {
            return Err(Error::config(
                file,
                format!(
                    "the UNet's middle block has {mid} transformer layers and its last level {:?}: \
                     diffusers' config gives both one number",
                    depths.last()
                ),
            ));
        }
        let label = shape(format!("{UNET}label_emb.0.0.weight"))?[1];
        let projection = shape(format!("{XL_OPEN_CLIP}text_projection"))?[1];
        let ids = label
            .checked_sub(projection)
            .filter(|d| *d > 0 && d % 6 == 0);
        let Some(ids) = ids else {
            return Err(Error::config(
                file,
                format!(
                    "`label_emb.0.0.weight` takes {label} inputs: not the text projection's \
                     {projection} and six size ids"
                ),
            ));
        };
        unet["transformer_layers_per_block"] = json!(depths);
        unet["addition_embed_type"] = json!("text_time");
        unet["addition_time_embed_dim"] = json!(ids / 6);
        unet["projection_class_embeddings_input_dim"] = json!(label);
    }

    // VAE.
    let levels = count(s, &format!("{VAE}encoder.down."));
    if levels == 0 {
        return Err(Error::config(
            file,
            "no VAE in the checkpoint (`first_stage_model.encoder.down.*`)",
        ));
    }
    let vae_channels = (0..levels)
        .map(|i| Ok(shape(format!("{VAE}encoder.down.{i}.block.0.conv2.weight"))?[0]))
        .collect::<Result<Vec<usize>>>()?;
    let vae_lpb = count(s, &format!("{VAE}encoder.down.0.block."));
    let latent = shape(format!("{VAE}decoder.conv_in.weight"))?[1];
    let vae = json!({
        "_class_name": "AutoencoderKL",
        "in_channels": shape(format!("{VAE}encoder.conv_in.weight"))?[1],
        "out_channels": shape(format!("{VAE}decoder.conv_out.weight"))?[0],
        "latent_channels": latent,
        "block_out_channels": vae_channels,
        "layers_per_block": vae_lpb,
        "down_block_types": vec!["DownEncoderBlock2D"; levels],
        "up_block_types": vec!["UpDecoderBlock2D"; levels],
        "norm_num_groups": 32,
        "act_fn": "silu",
        "scaling_factor": if xl { 0.13025 } else { 0.18215 },
        "force_upcast": xl,
        "sample_size": sample_size * 8,
        "use_quant_conv": s.contains_key(&format!("{VAE}quant_conv.weight")),
        "use_post_quant_conv": s.contains_key(&format!("{VAE}post_quant_conv.weight")),
    });

    // Text encoders.
    let open_clip_tower = |prefix: &str, used_layers_dropped: usize, projection: bool| {
        let emb = shape(format!("{prefix}token_embedding.weight"))?;
        let resblocks = count(s, &format!("{prefix}transformer.resblocks."));
        if resblocks < 2 {
            return Err(Error::config(
                file,
                "the OpenCLIP text tower needs at least 2 layers (SD-2.x and XL use the \
                 penultimate)",
            ));
        }
        let mut c = json!({
            "architectures": [if projection { "CLIPTextModelWithProjection" } else { "CLIPTextModel" }],
            "vocab_size": emb[0],
            "hidden_size": emb[1],
            "intermediate_size": shape(format!("{prefix}transformer.resblocks.0.mlp.c_fc.weight"))?[0],
            "num_hidden_layers": resblocks - used_layers_dropped,
            "num_attention_heads": (emb[1] / 64).max(1),
            "max_position_embeddings": shape(format!("{prefix}positional_embedding"))?[0],
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-5,
            "projection_dim": emb[1],
        });
        if projection {
            c["projection_dim"] = json!(shape(format!("{prefix}text_projection"))?[1]);
        }
        Ok(c)
    };
    let clip_tower = |prefix: &str| {
        // Old checkpoints (transformers < 4.?) lack the `text_model.` level.
        let base = if s.contains_key(&format!(
            "{prefix}text_model.embeddings.token_embedding.weight"
        )) {
            format!("{prefix}text_model.")
        } else {
            prefix.to_string()
        };
        let t = |k: &str| format!("{base}{k}");
        let emb = shape(t("embeddings.token_embedding.weight"))?;
        let layers = t("encoder.layers.");
        Ok::<_, Error>(json!({
            "architectures": ["CLIPTextModel"],
            "vocab_size": emb[0],
            "hidden_size": emb[1],
            "intermediate_size": shape(t("encoder.layers.0.mlp.fc1.weight"))?[0],
            "num_hidden_layers": count(s, &layers),
            "num_attention_heads": (emb[1] / 64).max(1),
            "max_position_embeddings": shape(t("embeddings.position_embedding.weight"))?[0],
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-5,
            "projection_dim": emb[1],
        }))
    };
    let (text_encoder, text_encoder_2) = if xl {
        // SDXL uses every layer of both towers (the penultimate state, and tower 2's last for
        // its pooled projection).
        (
            clip_tower(XL_CLIP)?,
            Some(open_clip_tower(XL_OPEN_CLIP, 0, true)?),
        )
    } else if open_clip {
        // SD-2.x conditions on the penultimate layer; diffusers drops the last one.
        (open_clip_tower(OPEN_CLIP, 1, false)?, None)
    } else {
        (clip_tower(CLIP)?, None)
    };
    // SD's noise schedule; SDXL names it as its Euler config does
    // (stabilityai/stable-diffusion-xl-base-1.0's scheduler_config.json).
    let mut scheduler = json!({
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "clip_sample": false,
        "set_alpha_to_one": false,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "prediction_type": if v_prediction { "v_prediction" } else { "epsilon" },
    });
    let mut model_index = json!({
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
    });
    if xl {
        scheduler["_class_name"] = json!("EulerDiscreteScheduler");
        scheduler["interpolation_type"] = json!("linear");
        scheduler["use_karras_sigmas"] = json!(false);
        model_index["_class_name"] = json!("StableDiffusionXLPipeline");
        model_index["text_encoder_2"] = json!(["transformers", "CLIPTextModelWithProjection"]);
        model_index["tokenizer_2"] = json!(["transformers", "CLIPTokenizer"]);
        model_index["scheduler"] = json!(["diffusers", "EulerDiscreteScheduler"]);
        model_index["force_zeros_for_empty_prompt"] = json!(true);
    }
    Ok(Inferred {
        model_index,
        unet,
        vae,
        text_encoder,
        text_encoder_2,
        scheduler,
        pad_token: if open_clip { "!" } else { "<|endoftext|>" }.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unet_keys_map_like_diffusers() {
        let cases = [
            ("time_embed.0.weight", "time_embedding.linear_1.weight"),
            ("input_blocks.0.0.bias", "conv_in.bias"),
            (
                "input_blocks.1.0.in_layers.0.weight",
                "down_blocks.0.resnets.0.norm1.weight",
            ),
            (
                "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight",
                "down_blocks.0.attentions.1.transformer_blocks.0.attn2.to_k.weight",
            ),
            (
                "input_blocks.3.0.op.weight",
                "down_blocks.0.downsamplers.0.conv.weight",
            ),
            (
                "input_blocks.4.0.skip_connection.weight",
                "down_blocks.1.resnets.0.conv_shortcut.weight",
            ),
            (
                "middle_block.2.emb_layers.1.bias",
                "mid_block.resnets.1.time_emb_proj.bias",
            ),
            (
                "output_blocks.2.1.conv.weight",
                "up_blocks.0.upsamplers.0.conv.weight",
            ),
            (
                "output_blocks.5.2.conv.bias",
                "up_blocks.1.upsamplers.0.conv.bias",
            ),
            (
                "output_blocks.5.1.proj_out.weight",
                "up_blocks.1.attentions.2.proj_out.weight",
            ),
            ("out.2.weight", "conv_out.weight"),
        ];
        for (ldm, diffusers) in cases {
            assert_eq!(unet_key(ldm, 2).as_deref(), Some(diffusers), "{ldm}");
        }
        assert_eq!(unet_key("input_blocks.3.1.x", 2), None);
    }

    #[test]
    fn vae_keys_map_like_diffusers() {
        let cases = [
            (
                "encoder.down.1.block.0.nin_shortcut.weight",
                "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
            ),
            (
                "encoder.down.0.downsample.conv.bias",
                "encoder.down_blocks.0.downsamplers.0.conv.bias",
            ),
            (
                "decoder.up.3.block.2.conv1.weight",
                "decoder.up_blocks.0.resnets.2.conv1.weight",
            ),
            (
                "decoder.up.1.upsample.conv.weight",
                "decoder.up_blocks.2.upsamplers.0.conv.weight",
            ),
            (
                "decoder.mid.attn_1.proj_out.weight",
                "decoder.mid_block.attentions.0.to_out.0.weight",
            ),
            (
                "encoder.mid.attn_1.norm.bias",
                "encoder.mid_block.attentions.0.group_norm.bias",
            ),
            ("encoder.norm_out.weight", "encoder.conv_norm_out.weight"),
            ("post_quant_conv.weight", "post_quant_conv.weight"),
        ];
        for (ldm, diffusers) in cases {
            assert_eq!(vae_key(ldm, 4).as_deref(), Some(diffusers), "{ldm}");
        }
    }

    #[test]
    fn open_clip_in_proj_splits_into_q_k_v() {
        let got = open_clip_keys("transformer.resblocks.3.attn.in_proj_bias");
        assert_eq!(
            got,
            vec![
                (
                    "text_model.encoder.layers.3.self_attn.q_proj.bias".to_string(),
                    Some((0, 3))
                ),
                (
                    "text_model.encoder.layers.3.self_attn.k_proj.bias".to_string(),
                    Some((1, 3))
                ),
                (
                    "text_model.encoder.layers.3.self_attn.v_proj.bias".to_string(),
                    Some((2, 3))
                ),
            ]
        );
        assert_eq!(
            open_clip_keys("transformer.resblocks.0.mlp.c_proj.weight"),
            vec![(
                "text_model.encoder.layers.0.mlp.fc2.weight".to_string(),
                None
            )]
        );
        assert!(open_clip_keys("text_projection").is_empty());
    }
}
