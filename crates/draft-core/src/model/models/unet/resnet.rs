//! diffusers `ResnetBlock2D`, `Downsample2D`, `Upsample2D`.

use burn::prelude::*;
use burn::tensor::activation::silu;
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};

use crate::error::Result;
use crate::memory::strips::Parts;
use crate::model::nn::{Conv2d, GroupNorm, Linear};
use crate::model::var_builder::VarBuilder;

/// `ResnetBlock2D` with `time_embedding_norm="default"`; `time_emb_proj` is absent in the VAE.
#[derive(Module, Debug)]
pub struct ResnetBlock2D {
    pub norm1: GroupNorm,
    pub conv1: Conv2d,
    pub time_emb_proj: Option<Linear>,
    pub norm2: GroupNorm,
    pub conv2: Conv2d,
    pub conv_shortcut: Option<Conv2d>,
    pub output_scale_factor: f64,
}

#[derive(Clone)]
pub struct ResnetConfig {
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f64,
    pub output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn load(vb: VarBuilder, c_in: usize, c_out: usize, cfg: &ResnetConfig) -> Result<Self> {
        Ok(Self {
            norm1: GroupNorm::load(vb.pp("norm1"), cfg.groups, c_in, cfg.eps)?,
            conv1: Conv2d::load(vb.pp("conv1"), c_in, c_out, 3, 1, (1, 1))?,
            time_emb_proj: match cfg.temb_channels {
                Some(t) => Some(Linear::load(vb.pp("time_emb_proj"), t, c_out, true)?),
                None => None,
            },
            norm2: GroupNorm::load(vb.pp("norm2"), cfg.groups, c_out, cfg.eps)?,
            conv2: Conv2d::load(vb.pp("conv2"), c_out, c_out, 3, 1, (1, 1))?,
            conv_shortcut: if c_in != c_out {
                Some(Conv2d::load(
                    vb.pp("conv_shortcut"),
                    c_in,
                    c_out,
                    1,
                    1,
                    (0, 0),
                )?)
            } else {
                None
            },
            output_scale_factor: cfg.output_scale_factor,
        })
    }

    pub fn forward(&self, x: Tensor<4>, temb: Option<Tensor<2>>) -> Tensor<4> {
        // The time embedding's projection first, so that its add follows conv1's bias add
        // (one fused kernel on CubeCL; between them it split the adds into kernels of their own).
        let t = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(temb)) => {
                let t = proj.forward(silu(temb));
                let [b, c] = t.dims();
                Some(t.reshape([b, c, 1, 1]))
            }
            _ => None,
        };
        let h = self.conv1.forward(self.norm1.forward_silu(x.clone()));
        let h = match t {
            Some(t) => h + t,
            None => h,
        };
        let h = self.conv2.forward(self.norm2.forward_silu(h));
        self.residual(x, h)
    }

    /// [`forward`](Self::forward) without a time embedding, on strips of rows
    /// ([`crate::memory::strips`]: the group norms' statistics over all strips, each convolution with
    /// its neighbours' halo rows).
    pub fn forward_strips(&self, xs: Parts) -> Parts {
        let h = self.norm1.forward_strips(xs.clone(), true);
        let h = self.conv1.forward_strips(&h);
        let h = self.norm2.forward_strips(h, true);
        let h = self.conv2.forward_strips(&h);
        xs.into_iter()
            .zip(h)
            .map(|(x, h)| self.residual(x, h))
            .collect()
    }

    /// The input and output channels.
    pub fn channels(&self) -> (usize, usize) {
        let [c_out, c_in, _, _] = self.conv1.weight.dims();
        (c_in, c_out)
    }

    /// `(shortcut(x) + h) / output_scale_factor`.
    fn residual(&self, x: Tensor<4>, h: Tensor<4>) -> Tensor<4> {
        let x = match &self.conv_shortcut {
            Some(conv) => conv.forward(x),
            None => x,
        };
        let out = x + h;
        if self.output_scale_factor == 1.0 {
            out
        } else {
            out / self.output_scale_factor
        }
    }
}

/// `Downsample2D(use_conv=True)`: a stride-2 3×3 conv. diffusers' `padding=0` variant (the VAE)
/// pads right/bottom by one first, which is the asymmetric padding `(0, 1)` here.
#[derive(Module, Debug)]
pub struct Downsample2D {
    pub conv: Conv2d,
}

impl Downsample2D {
    pub fn load(vb: VarBuilder, channels: usize, padding: usize) -> Result<Self> {
        let pad = if padding == 0 {
            (0, 1)
        } else {
            (padding, padding)
        };
        Ok(Self {
            conv: Conv2d::load(vb.pp("conv"), channels, channels, 3, 2, pad)?,
        })
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.conv.forward(x)
    }
}

/// `Upsample2D(use_conv=True)`: nearest-neighbour ×2 (or to `size`), then a 3×3 conv.
#[derive(Module, Debug)]
pub struct Upsample2D {
    pub conv: Conv2d,
}

impl Upsample2D {
    pub fn load(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::load(vb.pp("conv"), channels, channels, 3, 1, (1, 1))?,
        })
    }

    pub fn forward(&self, x: Tensor<4>, size: Option<[usize; 2]>) -> Tensor<4> {
        let [_, _, h, w] = x.dims();
        let size = size.unwrap_or([h * 2, w * 2]);
        let x = if size == [h * 2, w * 2] {
            twice(x)
        } else {
            interpolate(
                x,
                InterpolateOptions::new(InterpolateMode::Nearest).with_output_size(size),
            )
        };
        self.conv.forward(x)
    }

    /// [`forward`](Self::forward) at ×2 on strips of rows ([`crate::memory::strips`]).
    pub fn forward_strips(&self, xs: Parts) -> Parts {
        let up: Parts = xs.into_iter().map(twice).collect();
        self.conv.forward_strips(&up)
    }

    pub fn channels(&self) -> usize {
        self.conv.weight.dims()[0]
    }
}

/// Exact ×2 nearest upsampling as a broadcast: same values as `interpolate`, and a plain
/// reshape/expand in the backward pass on every backend. Widened, then heightened: each step
/// is a copy flex makes by rows (one expand of both axes walks element by element).
fn twice(x: Tensor<4>) -> Tensor<4> {
    let [b, c, h, w] = x.dims();
    let wide = x
        .reshape([b * c * h, w, 1])
        .expand([b * c * h, w, 2])
        .reshape([b * c * h, 1, w * 2]);
    wide.expand([b * c * h, 2, w * 2])
        .reshape([b, c, h * 2, w * 2])
}
