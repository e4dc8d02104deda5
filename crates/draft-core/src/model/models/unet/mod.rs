//! diffusers `UNet2DConditionModel`, built from its `unet/config.json`.

pub mod blocks;
pub mod resnet;
pub mod transformer;

use burn::prelude::*;
use burn::tensor::activation::silu;
use serde::Deserialize;

use crate::error::{Error, Result};
use crate::model::nn::{Conv2d, GroupNorm, Linear};
use crate::model::var_builder::VarBuilder;
use blocks::{DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D};
use resnet::ResnetConfig;
use transformer::TransformerConfig;

/// A config value that diffusers accepts as one int or as one int per block.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    fn expand(&self, n: usize, field: &str, file: &str) -> Result<Vec<usize>> {
        match self {
            PerBlock::One(v) => Ok(vec![*v; n]),
            PerBlock::Each(v) if v.len() == n => Ok(v.clone()),
            PerBlock::Each(v) => Err(Error::config(
                file,
                format!("`{field}` has {} entries but there are {n} blocks", v.len()),
            )),
        }
    }
}

/// The fields of `unet/config.json` (diffusers' names and defaults).
#[derive(Debug, Clone, Deserialize)]
pub struct UNet2DConditionConfig {
    #[serde(default = "d_sample_size")]
    pub sample_size: usize,
    #[serde(default = "d_channels")]
    pub in_channels: usize,
    #[serde(default = "d_channels")]
    pub out_channels: usize,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: usize,
    pub down_block_types: Vec<String>,
    #[serde(default = "d_mid")]
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_layers")]
    pub layers_per_block: PerBlock,
    #[serde(default = "d_one")]
    pub downsample_padding: usize,
    #[serde(default = "d_f1")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "d_act")]
    pub act_fn: String,
    #[serde(default = "d_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "d_eps")]
    pub norm_eps: f64,
    #[serde(default = "d_cross")]
    pub cross_attention_dim: usize,
    #[serde(default = "d_heads")]
    pub attention_head_dim: PerBlock,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    #[serde(default)]
    pub transformer_layers_per_block: Option<PerBlock>,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub upcast_attention: bool,
    #[serde(default)]
    pub only_cross_attention: serde_json::Value,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    /// SDXL (`addition_embed_type: "text_time"`): each size id's sinusoidal embedding size.
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    /// SDXL: `add_embedding.linear_1`'s input, pooled text embedding + 6 size ids' embeddings.
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default = "d_time_emb")]
    pub time_embedding_type: String,
    #[serde(default = "d_shift")]
    pub resnet_time_scale_shift: String,
    #[serde(default = "d_kernel")]
    pub conv_in_kernel: usize,
    #[serde(default = "d_kernel")]
    pub conv_out_kernel: usize,
}

fn d_sample_size() -> usize {
    64
}
fn d_channels() -> usize {
    4
}
fn d_true() -> bool {
    true
}
fn d_mid() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn d_layers() -> PerBlock {
    PerBlock::One(2)
}
fn d_one() -> usize {
    1
}
fn d_f1() -> f64 {
    1.0
}
fn d_act() -> String {
    "silu".into()
}
fn d_groups() -> usize {
    32
}
fn d_eps() -> f64 {
    1e-5
}
fn d_cross() -> usize {
    1280
}
fn d_heads() -> PerBlock {
    PerBlock::One(8)
}
fn d_time_emb() -> String {
    "positional".into()
}
fn d_shift() -> String {
    "default".into()
}
fn d_kernel() -> usize {
    3
}

/// The most blocks (resolution levels) a UNet config may have: SD has 4.
pub const MAX_BLOCKS: usize = 12;

/// The largest `sample_size` (latents or pixels per side) a config may give.
pub const MAX_SAMPLE_SIZE: usize = 4096;

/// The config resolved to one value per block, after diffusers' own defaulting rules.
#[derive(Debug, Clone)]
pub struct ResolvedUNet {
    pub layers_per_block: Vec<usize>,
    pub num_heads: Vec<usize>,
    pub transformer_layers: Vec<usize>,
}

impl UNet2DConditionConfig {
    pub fn from_json(file: &str, json: &str) -> Result<Self> {
        let c: Self = crate::error::from_json(file, json)?;
        c.resolve(file)?;
        Ok(c)
    }

    /// Checks what this implementation supports and expands per-block values.
    pub fn resolve(&self, file: &str) -> Result<ResolvedUNet> {
        let n = self.block_out_channels.len();
        let bad = |reason: String| Err(Error::config(file, reason));
        if n == 0 || n > MAX_BLOCKS {
            return bad(format!(
                "`block_out_channels` has {n} entries (1 to {MAX_BLOCKS} blocks are supported)"
            ));
        }
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            Error::check_size(file, &format!("block_out_channels[{i}]"), c, 1)?;
        }
        Error::check_size(file, "in_channels", self.in_channels, 1)?;
        Error::check_size(file, "out_channels", self.out_channels, 1)?;
        Error::check_size(file, "cross_attention_dim", self.cross_attention_dim, 1)?;
        Error::check_size(file, "norm_num_groups", self.norm_num_groups, 1)?;
        if !(1..=MAX_SAMPLE_SIZE).contains(&self.sample_size) {
            return bad(format!(
                "`sample_size` = {} is out of range (1 to {MAX_SAMPLE_SIZE})",
                self.sample_size
            ));
        }
        // diffusers' models use 0 or 1; larger values only pad the activations.
        if self.downsample_padding > 1 || self.freq_shift > 1 {
            return bad(format!(
                "`downsample_padding` = {} / `freq_shift` = {}: only 0 and 1 are supported",
                self.downsample_padding, self.freq_shift
            ));
        }
        Error::check_number(file, "norm_eps", self.norm_eps, 0.0..=1.0)?;
        Error::check_number(
            file,
            "mid_block_scale_factor",
            self.mid_block_scale_factor,
            f64::MIN_POSITIVE..=f64::MAX,
        )?;
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            return bad(format!(
                "{} `block_out_channels` but {} `down_block_types` and {} `up_block_types`",
                n,
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        for t in &self.down_block_types {
            if !matches!(t.as_str(), "DownBlock2D" | "CrossAttnDownBlock2D") {
                return bad(format!("`down_block_types`: unknown block type {t:?}"));
            }
        }
        for t in &self.up_block_types {
            if !matches!(t.as_str(), "UpBlock2D" | "CrossAttnUpBlock2D") {
                return bad(format!("`up_block_types`: unknown block type {t:?}"));
            }
        }
        match self.mid_block_type.as_deref() {
            Some("UNetMidBlock2DCrossAttn") => {}
            other => return bad(format!("`mid_block_type` {other:?} is not supported")),
        }
        let unsupported = [
            (self.act_fn != "silu", format!("`act_fn` {:?}", self.act_fn)),
            (self.dual_cross_attention, "`dual_cross_attention`".into()),
            (
                self.only_cross_attention.as_bool().unwrap_or(false)
                    || self.only_cross_attention.is_array(),
                "`only_cross_attention`".into(),
            ),
            (self.class_embed_type.is_some(), "`class_embed_type`".into()),
            (
                !matches!(
                    self.addition_embed_type.as_deref(),
                    None | Some("text_time")
                ),
                format!(
                    "`addition_embed_type` {:?} (only SDXL's \"text_time\")",
                    self.addition_embed_type
                ),
            ),
            (
                self.time_embedding_type != "positional",
                format!("`time_embedding_type` {:?}", self.time_embedding_type),
            ),
            (
                self.resnet_time_scale_shift != "default",
                format!(
                    "`resnet_time_scale_shift` {:?}",
                    self.resnet_time_scale_shift
                ),
            ),
            (
                self.conv_in_kernel != 3 || self.conv_out_kernel != 3,
                "`conv_in_kernel` / `conv_out_kernel` other than 3".into(),
            ),
        ];
        if let Some((_, what)) = unsupported.iter().find(|(bad, _)| *bad) {
            return bad(format!("{what} is not supported"));
        }
        if self.addition_embed_type.is_some() {
            for (field, v) in [
                ("addition_time_embed_dim", self.addition_time_embed_dim),
                (
                    "projection_class_embeddings_input_dim",
                    self.projection_class_embeddings_input_dim,
                ),
            ] {
                match v {
                    Some(v) => Error::check_size(file, field, v, 1)?,
                    None => {
                        return bad(format!(
                            "`addition_embed_type` \"text_time\" needs `{field}`"
                        ));
                    }
                }
            }
            let (input, d) = (
                self.projection_class_embeddings_input_dim.unwrap_or(0),
                self.addition_time_embed_dim.unwrap_or(0),
            );
            if input <= 6 * d {
                return bad(format!(
                    "`projection_class_embeddings_input_dim` = {input} leaves no room for a \
                     pooled text embedding beside 6 size ids of `addition_time_embed_dim` = {d}"
                ));
            }
        }
        // diffusers passes `attention_head_dim` as the number of heads when
        // `num_attention_heads` is absent (a historical naming slip that SD configs rely on).
        let heads_field = if self.num_attention_heads.is_some() {
            "num_attention_heads"
        } else {
            "attention_head_dim"
        };
        let heads = self
            .num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim)
            .expand(n, heads_field, file)?;
        let layers = self.layers_per_block.expand(n, "layers_per_block", file)?;
        let transformer_layers = self
            .transformer_layers_per_block
            .clone()
            .unwrap_or(PerBlock::One(1))
            .expand(n, "transformer_layers_per_block", file)?;
        for (i, ((&c, &h), (&l, &t))) in self
            .block_out_channels
            .iter()
            .zip(&heads)
            .zip(layers.iter().zip(&transformer_layers))
            .enumerate()
        {
            Error::check_size(file, &format!("{heads_field}[{i}]"), h, 1)?;
            Error::check_size(file, &format!("layers_per_block[{i}]"), l, 1)?;
            Error::check_size(file, &format!("transformer_layers_per_block[{i}]"), t, 1)?;
            if !c.is_multiple_of(h) {
                return bad(format!(
                    "`block_out_channels[{i}]` = {c} cannot be split into {h} heads \
                     (`{heads_field}`)"
                ));
            }
            if !c.is_multiple_of(self.norm_num_groups) {
                return bad(format!(
                    "`block_out_channels[{i}]` = {c} cannot be split into `norm_num_groups` = {}",
                    self.norm_num_groups
                ));
            }
        }
        Ok(ResolvedUNet {
            layers_per_block: layers,
            num_heads: heads,
            transformer_layers,
        })
    }
}

/// `TimestepEmbedding`: linear_1 → SiLU → linear_2.
#[derive(Module, Debug)]
pub struct TimestepEmbedding {
    pub linear_1: Linear,
    pub linear_2: Linear,
}

impl TimestepEmbedding {
    fn load(vb: VarBuilder, c_in: usize, c_out: usize) -> Result<Self> {
        Ok(Self {
            linear_1: Linear::load(vb.pp("linear_1"), c_in, c_out, true)?,
            linear_2: Linear::load(vb.pp("linear_2"), c_out, c_out, true)?,
        })
    }

    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.linear_2.forward(silu(self.linear_1.forward(x)))
    }
}

/// SDXL's size conditioning: original (H, W), crop (top, left), target (H, W), in pixels.
pub type TimeIds = [f32; 6];

#[derive(Module, Debug)]
pub struct UNet2DConditionModel {
    pub conv_in: Conv2d,
    pub time_embedding: TimestepEmbedding,
    /// SDXL (`addition_embed_type: "text_time"`): the pooled text embedding and the size ids'
    /// embeddings → an embedding added to the time embedding.
    pub add_embedding: Option<TimestepEmbedding>,
    pub addition_time_embed_dim: usize,
    pub down_blocks: Vec<DownBlock2D>,
    pub mid_block: UNetMidBlock2DCrossAttn,
    pub up_blocks: Vec<UpBlock2D>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
    pub time_proj_channels: usize,
    pub flip_sin_to_cos: bool,
    pub freq_shift: usize,
    pub center_input_sample: bool,
}

impl UNet2DConditionModel {
    pub fn load(vb: VarBuilder, c: &UNet2DConditionConfig, file: &str) -> Result<Self> {
        let r = c.resolve(file)?;
        let boc = &c.block_out_channels;
        let n = boc.len();
        let temb = boc[0] * 4;
        let resnet = ResnetConfig {
            temb_channels: Some(temb),
            groups: c.norm_num_groups,
            eps: c.norm_eps,
            output_scale_factor: 1.0,
        };
        let transformer = |i: usize| TransformerConfig {
            heads: r.num_heads[i],
            num_layers: r.transformer_layers[i],
            cross_attention_dim: c.cross_attention_dim,
            groups: c.norm_num_groups,
            use_linear_projection: c.use_linear_projection,
        };

        let mut down_blocks = Vec::new();
        for (i, kind) in c.down_block_types.iter().enumerate() {
            let c_in = if i == 0 { boc[0] } else { boc[i - 1] };
            let t = transformer(i);
            down_blocks.push(DownBlock2D::load(
                vb.pp("down_blocks").pp(i),
                c_in,
                boc[i],
                r.layers_per_block[i],
                i + 1 < n,
                c.downsample_padding,
                &resnet,
                (kind == "CrossAttnDownBlock2D").then_some(&t),
            )?);
        }

        let mid_block = UNetMidBlock2DCrossAttn::load(
            vb.pp("mid_block"),
            boc[n - 1],
            &ResnetConfig {
                output_scale_factor: c.mid_block_scale_factor,
                ..resnet.clone()
            },
            &transformer(n - 1),
        )?;

        let mut up_blocks = Vec::new();
        let mut c_out = boc[n - 1];
        for (i, kind) in c.up_block_types.iter().enumerate() {
            let rev = n - 1 - i; // index into the per-block lists, reversed
            let c_prev_out = c_out;
            c_out = boc[rev];
            let c_in = boc[rev.saturating_sub(1)];
            let t = transformer(rev);
            up_blocks.push(UpBlock2D::load(
                vb.pp("up_blocks").pp(i),
                c_in,
                c_out,
                c_prev_out,
                r.layers_per_block[rev] + 1,
                i + 1 < n,
                &resnet,
                (kind == "CrossAttnUpBlock2D").then_some(&t),
            )?);
        }

        let add_embedding = match c.projection_class_embeddings_input_dim {
            Some(d) if c.addition_embed_type.is_some() => {
                Some(TimestepEmbedding::load(vb.pp("add_embedding"), d, temb)?)
            }
            _ => None,
        };
        Ok(Self {
            conv_in: Conv2d::load(vb.pp("conv_in"), c.in_channels, boc[0], 3, 1, (1, 1))?,
            time_embedding: TimestepEmbedding::load(vb.pp("time_embedding"), boc[0], temb)?,
            add_embedding,
            addition_time_embed_dim: c.addition_time_embed_dim.unwrap_or(0),
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::load(
                vb.pp("conv_norm_out"),
                c.norm_num_groups,
                boc[0],
                c.norm_eps,
            )?,
            conv_out: Conv2d::load(vb.pp("conv_out"), boc[0], c.out_channels, 3, 1, (1, 1))?,
            time_proj_channels: boc[0],
            flip_sin_to_cos: c.flip_sin_to_cos,
            freq_shift: c.freq_shift,
            center_input_sample: c.center_input_sample,
        })
    }

    /// Predicts the noise (or v) for `sample` [B, C, h, w] at `timestep`, conditioned on
    /// `encoder_hidden_states` [B, N, cross_attention_dim].
    pub fn forward(
        &self,
        sample: Tensor<4>,
        timestep: f32,
        encoder_hidden_states: Tensor<3>,
    ) -> Tensor<4> {
        self.forward_added(sample, timestep, encoder_hidden_states, None)
    }

    /// [`forward`](Self::forward) with SDXL's added conditions: `added` [B, P + 6·d] from
    /// [`added_input`](Self::added_input) (required by a UNet with `add_embedding`).
    pub fn forward_added(
        &self,
        sample: Tensor<4>,
        timestep: f32,
        encoder_hidden_states: Tensor<3>,
        added: Option<Tensor<2>>,
    ) -> Tensor<4> {
        let [b, ..] = sample.dims();
        let device = sample.device();
        let t_emb = timestep_embedding(
            timestep,
            self.time_proj_channels,
            self.flip_sin_to_cos,
            self.freq_shift,
            &device,
        )
        .expand([b, self.time_proj_channels]);
        self.forward_embedded(sample, t_emb, encoder_hidden_states, added)
    }

    /// The input of SDXL's `add_embedding`: the pooled text embeddings [B, P] beside the
    /// sinusoidal embeddings of the six size ids (diffusers' `add_time_proj`, with the time
    /// embedding's `flip_sin_to_cos` and `freq_shift`), [B, P + 6·d].
    pub fn added_input(&self, pooled: Tensor<2>, time_ids: &TimeIds) -> Tensor<2> {
        let [b, _] = pooled.dims();
        let device = pooled.device();
        let d = self.addition_time_embed_dim;
        let ids = time_ids
            .iter()
            .map(|&t| timestep_embedding(t, d, self.flip_sin_to_cos, self.freq_shift, &device))
            .collect();
        let ids = Tensor::cat(ids, 1).expand([b, 6 * d]);
        Tensor::cat(vec![pooled, ids], 1)
    }

    /// As [`forward`](Self::forward) with one timestep per sample (denoising training).
    pub fn forward_timesteps(
        &self,
        sample: Tensor<4>,
        timesteps: &[f32],
        encoder_hidden_states: Tensor<3>,
    ) -> Tensor<4> {
        assert_eq!(timesteps.len(), sample.dims()[0], "one timestep per sample");
        let device = sample.device();
        let t_emb = Tensor::cat(
            timesteps
                .iter()
                .map(|&t| {
                    timestep_embedding(
                        t,
                        self.time_proj_channels,
                        self.flip_sin_to_cos,
                        self.freq_shift,
                        &device,
                    )
                })
                .collect(),
            0,
        );
        self.forward_embedded(sample, t_emb, encoder_hidden_states, None)
    }

    fn forward_embedded(
        &self,
        sample: Tensor<4>,
        t_emb: Tensor<2>,
        encoder_hidden_states: Tensor<3>,
        added: Option<Tensor<2>>,
    ) -> Tensor<4> {
        // The UNet computes in the sample's dtype (f16 for `Pipeline::sampling_dtype`); the
        // sinusoidal embedding is made in f32 and cast, as diffusers does.
        let dtype = sample.dtype();
        let t_emb = crate::tensor::in_dtype(t_emb, dtype);
        let mut emb = self.time_embedding.forward(t_emb);
        match (&self.add_embedding, added) {
            (Some(add), Some(added)) => {
                emb = emb + add.forward(crate::tensor::in_dtype(added, dtype));
            }
            (None, None) => {}
            (Some(_), None) => panic!(
                "this UNet (addition_embed_type \"text_time\") needs the pooled text embedding \
                 and size ids"
            ),
            (None, Some(_)) => panic!("added conditions given to a UNet without add_embedding"),
        }

        let sample = if self.center_input_sample {
            sample * 2.0 - 1.0
        } else {
            sample
        };
        let mut x = self.conv_in.forward(sample);
        let mut skips = vec![x.clone()];
        for block in &self.down_blocks {
            let (out, states) =
                block.forward(x, Some(emb.clone()), Some(encoder_hidden_states.clone()));
            x = out;
            skips.extend(states);
        }
        x = self
            .mid_block
            .forward(x, emb.clone(), encoder_hidden_states.clone());
        for block in &self.up_blocks {
            let own = skips.split_off(skips.len() - block.resnets.len());
            // Upsample to the size of the next skip state (odd sizes round like diffusers).
            let upsample_size = skips.last().map(|s| {
                let d = s.dims();
                [d[2], d[3]]
            });
            x = block.forward(
                x,
                own,
                Some(emb.clone()),
                Some(encoder_hidden_states.clone()),
                upsample_size,
            );
        }
        self.conv_out.forward(self.conv_norm_out.forward_silu(x))
    }
}

/// diffusers `get_timestep_embedding` for one timestep, in f32 like PyTorch: `[1, dim]`.
pub fn timestep_embedding(
    t: f32,
    dim: usize,
    flip_sin_to_cos: bool,
    shift: usize,
    device: &Device,
) -> Tensor<2> {
    let half = dim / 2;
    let ln = -(10000f32).ln();
    let args: Vec<f32> = (0..half)
        .map(|i| {
            let exponent = ln * i as f32 / (half as f32 - shift as f32);
            t * exponent.exp()
        })
        .collect();
    let (sin, cos): (Vec<f32>, Vec<f32>) = args.iter().map(|a| (a.sin(), a.cos())).unzip();
    let mut values = if flip_sin_to_cos {
        [cos, sin].concat()
    } else {
        [sin, cos].concat()
    };
    values.resize(dim, 0.0); // odd dims are zero-padded
    Tensor::<2>::from_data(TensorData::new(values, [1, dim]), device)
}
