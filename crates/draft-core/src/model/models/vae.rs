//! diffusers `AutoencoderKL`: `Encoder`, `Decoder`, `quant_conv`, `post_quant_conv`.

use burn::prelude::*;
use serde::Deserialize;

use super::unet::resnet::{Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D};
use crate::error::{Error, Result};
use crate::memory::checkpoint::{Segment, SegmentChain};
use crate::memory::strips::{self, Parts};
use crate::model::nn::{
    Conv2d, GroupNorm, Linear, merge_heads, scaled_dot_product_attention, split_heads,
};
use crate::model::var_builder::VarBuilder;

/// The fields of `vae/config.json` (diffusers' names and defaults).
#[derive(Debug, Clone, Deserialize)]
pub struct AutoencoderKLConfig {
    #[serde(default = "d3")]
    pub in_channels: usize,
    #[serde(default = "d3")]
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d1")]
    pub layers_per_block: usize,
    #[serde(default = "d_act")]
    pub act_fn: String,
    #[serde(default = "d4")]
    pub latent_channels: usize,
    #[serde(default = "d32")]
    pub norm_num_groups: usize,
    #[serde(default = "d32")]
    pub sample_size: usize,
    #[serde(default = "d_scale")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "d_true")]
    pub use_quant_conv: bool,
    #[serde(default = "d_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "d_true")]
    pub mid_block_add_attention: bool,
}

fn d1() -> usize {
    1
}
fn d3() -> usize {
    3
}
fn d4() -> usize {
    4
}
fn d32() -> usize {
    32
}
fn d_act() -> String {
    "silu".into()
}
fn d_scale() -> f64 {
    0.18215
}
fn d_true() -> bool {
    true
}

/// The most blocks a VAE config may have (SD's has 4: a downscale of 8).
pub const MAX_BLOCKS: usize = 8;

impl AutoencoderKLConfig {
    pub fn from_json(file: &str, json: &str) -> Result<Self> {
        let c: Self = crate::error::from_json(file, json)?;
        let n = c.block_out_channels.len();
        let bad = |reason: String| Err(Error::config(file, reason));
        if n == 0 || n > MAX_BLOCKS {
            return bad(format!(
                "`block_out_channels` has {n} entries (1 to {MAX_BLOCKS} blocks are supported)"
            ));
        }
        if c.down_block_types.len() != n || c.up_block_types.len() != n {
            return bad(format!(
                "{n} `block_out_channels` but {} `down_block_types` and {} `up_block_types`",
                c.down_block_types.len(),
                c.up_block_types.len()
            ));
        }
        if let Some(t) = c
            .down_block_types
            .iter()
            .find(|t| *t != "DownEncoderBlock2D")
        {
            return bad(format!("`down_block_types`: unknown block type {t:?}"));
        }
        if let Some(t) = c.up_block_types.iter().find(|t| *t != "UpDecoderBlock2D") {
            return bad(format!("`up_block_types`: unknown block type {t:?}"));
        }
        if c.act_fn != "silu" {
            return bad(format!("`act_fn` {:?} is not supported", c.act_fn));
        }
        for (field, v) in [
            ("in_channels", c.in_channels),
            ("out_channels", c.out_channels),
            ("latent_channels", c.latent_channels),
            ("layers_per_block", c.layers_per_block),
            ("norm_num_groups", c.norm_num_groups),
            ("sample_size", c.sample_size),
        ] {
            Error::check_size(file, field, v, 1)?;
        }
        for (i, &ch) in c.block_out_channels.iter().enumerate() {
            Error::check_size(file, &format!("block_out_channels[{i}]"), ch, 1)?;
            if !ch.is_multiple_of(c.norm_num_groups) {
                return bad(format!(
                    "`block_out_channels[{i}]` = {ch} cannot be split into `norm_num_groups` = {}",
                    c.norm_num_groups
                ));
            }
        }
        // Latents are divided by the scaling factor before decoding.
        if !(c.scaling_factor.is_finite() && c.scaling_factor != 0.0) {
            return bad(format!(
                "`scaling_factor` = {} must be finite and non-zero",
                c.scaling_factor
            ));
        }
        if let Some(s) = c.shift_factor
            && !s.is_finite()
        {
            return bad(format!("`shift_factor` = {s} must be finite"));
        }
        Ok(c)
    }

    /// How many pixels one latent covers along each axis.
    pub fn downscale(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

/// The VAE mid-block attention: single-head self-attention over pixels with a group norm,
/// a residual connection, and biased projections.
#[derive(Module, Debug)]
pub struct SpatialAttention {
    pub group_norm: GroupNorm,
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Vec<Linear>,
}

impl SpatialAttention {
    fn load(vb: VarBuilder, channels: usize, groups: usize) -> Result<Self> {
        // Checkpoints converted before diffusers 0.14 (SD-1.4's among them) name these
        // `query/key/value/proj_attn`; diffusers renames them on load, and so do we.
        let name = |new: &str, old: &str| {
            if !vb.pp(new).contains("weight") && vb.pp(old).contains("weight") {
                vb.pp(old)
            } else {
                vb.pp(new)
            }
        };
        Ok(Self {
            group_norm: GroupNorm::load(vb.pp("group_norm"), groups, channels, 1e-6)?,
            to_q: Linear::load(name("to_q", "query"), channels, channels, true)?,
            to_k: Linear::load(name("to_k", "key"), channels, channels, true)?,
            to_v: Linear::load(name("to_v", "value"), channels, channels, true)?,
            to_out: vec![Linear::load(
                name("to_out.0", "proj_attn"),
                channels,
                channels,
                true,
            )?],
        })
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let tokens = self
            .group_norm
            .forward(x.clone())
            .reshape([b, c, h * w])
            .swap_dims(1, 2);
        let q = split_heads(self.to_q.forward(tokens.clone()), 1);
        let k = split_heads(self.to_k.forward(tokens.clone()), 1);
        let v = split_heads(self.to_v.forward(tokens), 1);
        let out = self.to_out[0].forward(merge_heads(scaled_dot_product_attention(q, k, v, None)));
        out.swap_dims(1, 2).reshape([b, c, h, w]) + x
    }
}

/// `UNetMidBlock2D` without time embedding: resnet, attention, resnet.
#[derive(Module, Debug)]
pub struct UNetMidBlock2D {
    pub resnets: Vec<ResnetBlock2D>,
    pub attentions: Vec<SpatialAttention>,
}

impl UNetMidBlock2D {
    fn load(
        vb: VarBuilder,
        channels: usize,
        resnet: &ResnetConfig,
        attention: bool,
    ) -> Result<Self> {
        Ok(Self {
            resnets: vec![
                ResnetBlock2D::load(vb.pp("resnets").pp(0), channels, channels, resnet)?,
                ResnetBlock2D::load(vb.pp("resnets").pp(1), channels, channels, resnet)?,
            ],
            attentions: if attention {
                vec![SpatialAttention::load(
                    vb.pp("attentions").pp(0),
                    channels,
                    resnet.groups,
                )?]
            } else {
                vec![]
            },
        })
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut x = self.resnets[0].forward(x, None);
        for attn in &self.attentions {
            x = attn.forward(x);
        }
        self.resnets[1].forward(x, None)
    }
}

/// `DownEncoderBlock2D`.
#[derive(Module, Debug)]
pub struct DownEncoderBlock2D {
    pub resnets: Vec<ResnetBlock2D>,
    pub downsamplers: Vec<Downsample2D>,
}

/// `UpDecoderBlock2D`.
#[derive(Module, Debug)]
pub struct UpDecoderBlock2D {
    pub resnets: Vec<ResnetBlock2D>,
    pub upsamplers: Vec<Upsample2D>,
}

#[derive(Module, Debug)]
pub struct Encoder {
    pub conv_in: Conv2d,
    pub down_blocks: Vec<DownEncoderBlock2D>,
    pub mid_block: UNetMidBlock2D,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

#[derive(Module, Debug)]
pub struct Decoder {
    pub conv_in: Conv2d,
    pub mid_block: UNetMidBlock2D,
    pub up_blocks: Vec<UpDecoderBlock2D>,
    pub conv_norm_out: GroupNorm,
    pub conv_out: Conv2d,
}

fn resnets(
    vb: &VarBuilder,
    n: usize,
    c_in: usize,
    c_out: usize,
    cfg: &ResnetConfig,
) -> Result<Vec<ResnetBlock2D>> {
    (0..n)
        .map(|i| {
            ResnetBlock2D::load(
                vb.pp("resnets").pp(i),
                if i == 0 { c_in } else { c_out },
                c_out,
                cfg,
            )
        })
        .collect()
}

impl Encoder {
    fn load(vb: VarBuilder, c: &AutoencoderKLConfig, resnet: &ResnetConfig) -> Result<Self> {
        let boc = &c.block_out_channels;
        let n = boc.len();
        let mut down_blocks = Vec::new();
        for i in 0..n {
            let vb = vb.pp("down_blocks").pp(i);
            let c_in = if i == 0 { boc[0] } else { boc[i - 1] };
            down_blocks.push(DownEncoderBlock2D {
                resnets: resnets(&vb, c.layers_per_block, c_in, boc[i], resnet)?,
                downsamplers: if i + 1 < n {
                    vec![Downsample2D::load(vb.pp("downsamplers").pp(0), boc[i], 0)?]
                } else {
                    vec![]
                },
            });
        }
        Ok(Self {
            conv_in: Conv2d::load(vb.pp("conv_in"), c.in_channels, boc[0], 3, 1, (1, 1))?,
            down_blocks,
            mid_block: UNetMidBlock2D::load(
                vb.pp("mid_block"),
                boc[n - 1],
                resnet,
                c.mid_block_add_attention,
            )?,
            conv_norm_out: GroupNorm::load(
                vb.pp("conv_norm_out"),
                c.norm_num_groups,
                boc[n - 1],
                1e-6,
            )?,
            conv_out: Conv2d::load(
                vb.pp("conv_out"),
                boc[n - 1],
                2 * c.latent_channels,
                3,
                1,
                (1, 1),
            )?,
        })
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let mut x = self.conv_in.forward(x);
        for block in &self.down_blocks {
            for r in &block.resnets {
                x = r.forward(x, None);
            }
            for d in &block.downsamplers {
                x = d.forward(x);
            }
        }
        x = self.mid_block.forward(x);
        self.conv_out.forward(self.conv_norm_out.forward_silu(x))
    }
}

impl Decoder {
    fn load(vb: VarBuilder, c: &AutoencoderKLConfig, resnet: &ResnetConfig) -> Result<Self> {
        let boc = &c.block_out_channels;
        let n = boc.len();
        let mut up_blocks = Vec::new();
        let mut c_out = boc[n - 1];
        for i in 0..n {
            let vb = vb.pp("up_blocks").pp(i);
            let c_prev = c_out;
            c_out = boc[n - 1 - i];
            up_blocks.push(UpDecoderBlock2D {
                resnets: resnets(&vb, c.layers_per_block + 1, c_prev, c_out, resnet)?,
                upsamplers: if i + 1 < n {
                    vec![Upsample2D::load(vb.pp("upsamplers").pp(0), c_out)?]
                } else {
                    vec![]
                },
            });
        }
        Ok(Self {
            conv_in: Conv2d::load(
                vb.pp("conv_in"),
                c.latent_channels,
                boc[n - 1],
                3,
                1,
                (1, 1),
            )?,
            mid_block: UNetMidBlock2D::load(
                vb.pp("mid_block"),
                boc[n - 1],
                resnet,
                c.mid_block_add_attention,
            )?,
            up_blocks,
            conv_norm_out: GroupNorm::load(
                vb.pp("conv_norm_out"),
                c.norm_num_groups,
                boc[0],
                1e-6,
            )?,
            conv_out: Conv2d::load(vb.pp("conv_out"), boc[0], c.out_channels, 3, 1, (1, 1))?,
        })
    }

    /// The decoder as a chain of segments, for [`SegmentChain`]: `pre` and `conv_in`, the mid
    /// block, every resnet and upsampler of the up blocks, then the output head and `post`.
    /// Checkpointed, the largest graph kept is one resnet's at the output resolution.
    ///
    /// A resnet, upsampler or the head whose largest activation would exceed `max_buffer_bytes`
    /// runs on strips of rows ([`crate::memory::strips`]), and the segments after it take the strips on
    /// (SD-1.x at 512² and 128 MiB: from `up_blocks.1`'s upsampler, whose output is
    /// `[1, 512, 256, 256]`, 128 MiB before the halo rows); below the budget each segment is its
    /// layer's usual forward.
    fn segments<'a>(
        &'a self,
        pre: impl Fn(Tensor<4>) -> Tensor<4> + 'a,
        post: impl Fn(Tensor<4>) -> Tensor<4> + 'a,
        max_buffer_bytes: u64,
    ) -> Vec<Segment<'a>> {
        // How many input rows a strip may have for a layer of `channels` (at ×`up`).
        let limit = move |xs: &Parts, channels: usize, up: usize| {
            let x = &xs[0];
            strips::max_rows(x.dims(), x.dtype().size(), channels, up, max_buffer_bytes)
        };
        let mut out: Vec<Segment<'a>> = vec![
            Box::new(move |z| vec![self.conv_in.forward(pre(strips::join(z)))]),
            Box::new(move |x| vec![self.mid_block.forward(strips::join(x))]),
        ];
        for block in &self.up_blocks {
            for r in &block.resnets {
                out.push(Box::new(move |xs| {
                    let (c_in, c_out) = r.channels();
                    let rows = limit(&xs, c_in.max(c_out), 1);
                    strips::apply(xs, rows, |x| r.forward(x, None), |xs| r.forward_strips(xs))
                }));
            }
            for u in &block.upsamplers {
                out.push(Box::new(move |xs| {
                    let rows = limit(&xs, u.channels(), 2);
                    strips::apply(xs, rows, |x| u.forward(x, None), |xs| u.forward_strips(xs))
                }));
            }
        }
        out.push(Box::new(move |xs| {
            let rows = limit(&xs, self.conv_norm_out.weight.dims()[0], 1);
            let head = strips::apply(
                xs,
                rows,
                |x| self.conv_out.forward(self.conv_norm_out.forward_silu(x)),
                |xs| {
                    self.conv_out
                        .forward_strips(&self.conv_norm_out.forward_strips(xs, true))
                },
            );
            head.into_iter().map(&post).collect()
        }));
        out
    }
}

#[derive(Module, Debug)]
pub struct AutoencoderKL {
    pub encoder: Encoder,
    pub decoder: Decoder,
    pub quant_conv: Option<Conv2d>,
    pub post_quant_conv: Option<Conv2d>,
}

impl AutoencoderKL {
    pub fn load(vb: VarBuilder, c: &AutoencoderKLConfig) -> Result<Self> {
        let resnet = ResnetConfig {
            temb_channels: None,
            groups: c.norm_num_groups,
            eps: 1e-6,
            output_scale_factor: 1.0,
        };
        let l2 = 2 * c.latent_channels;
        Ok(Self {
            encoder: Encoder::load(vb.pp("encoder"), c, &resnet)?,
            decoder: Decoder::load(vb.pp("decoder"), c, &resnet)?,
            quant_conv: if c.use_quant_conv {
                Some(Conv2d::load(vb.pp("quant_conv"), l2, l2, 1, 1, (0, 0))?)
            } else {
                None
            },
            post_quant_conv: if c.use_post_quant_conv {
                let l = c.latent_channels;
                Some(Conv2d::load(vb.pp("post_quant_conv"), l, l, 1, 1, (0, 0))?)
            } else {
                None
            },
        })
    }

    /// `vae.encode(x).latent_dist`: (mean, logvar), logvar clamped to [-30, 20] as diffusers does.
    pub fn encode(&self, x: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let h = self.encoder.forward(x);
        let moments = match &self.quant_conv {
            Some(q) => q.forward(h),
            None => h,
        };
        let l = moments.dims()[1] / 2;
        let mean = moments.clone().narrow(1, 0, l);
        let logvar = moments.narrow(1, l, l).clamp(-30.0, 20.0);
        (mean, logvar)
    }

    /// `vae.decode(z).sample`, in [-1, 1] for a trained VAE (`z` already divided by the scale),
    /// on whole tensors ([`crate::Pipeline::decode`] bounds its buffers: `max_buffer_bytes`).
    pub fn decode(&self, z: Tensor<4>) -> Tensor<4> {
        self.decode_chain(|z| z, |x| x, u64::MAX).apply(z)
    }

    /// [`decode`](Self::decode) as a chain of segments, with `pre` applied to the latents first
    /// and `post` (element-wise: it may see strips of rows) to the image last; no activation
    /// over `max_buffer_bytes` where strips can avoid it.
    pub fn decode_chain<'a>(
        &'a self,
        pre: impl Fn(Tensor<4>) -> Tensor<4> + 'a,
        post: impl Fn(Tensor<4>) -> Tensor<4> + 'a,
        max_buffer_bytes: u64,
    ) -> SegmentChain<'a> {
        SegmentChain::new(self.decoder.segments(
            move |z| match &self.post_quant_conv {
                Some(q) => q.forward(pre(z)),
                None => pre(z),
            },
            post,
            max_buffer_bytes,
        ))
    }
}
