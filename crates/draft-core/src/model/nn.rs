//! Leaf layers with PyTorch's parameter names (`weight`, `bias`) and PyTorch's numerics.
//!
//! Each `load` reads the layer from a [`VarBuilder`] at the layer's own path, so callers write
//! `Linear::load(vb.pp("to_q"), 320, 320, false)` exactly where diffusers writes
//! `self.to_q = nn.Linear(320, 320, bias=False)`.

use burn::module::Param;
use burn::prelude::*;
use burn::tensor::module::{embedding, layer_norm};
use burn::tensor::ops::ConvOptions;
use burn::tensor::{DType, FloatDType};

use crate::error::Result;
use crate::model::lora::{LoraKind, LoraSlot};
use crate::model::var_builder::VarBuilder;

/// A module parameter holding `t` as it is. Unlike `Param::from_tensor` this never marks the
/// tensor as requiring a gradient: for plain tensors that is a no-op anyway, and `draft
/// pretrain` builds modules over *views* (reshapes, transposes) of autodiff leaves, which Burn
/// refuses to mark.
pub fn param<const D: usize>(t: Tensor<D>) -> Param<Tensor<D>> {
    Param::initialized(burn::module::ParamId::new(), t)
}

/// A stored weight as the layers compute with it: f32 (weights kept in f16 are cast per use;
/// the f32 copy lives for one op). Linear and Conv2d go through [`crate::ops::stored_weight`]
/// instead, whose backward keeps the stored weight rather than an f32 copy.
pub fn compute_weight<const D: usize>(w: Tensor<D>) -> Tensor<D> {
    if w.dtype() == DType::F32 {
        w
    } else {
        w.cast(FloatDType::F32)
    }
}

use crate::memory::strips::{self, Parts};
use crate::tensor::in_dtype;

/// `f(x)` computed in f32 and returned in x's dtype: for statistics (norms) over activations
/// in f16, which PyTorch likewise accumulates in f32.
pub fn in_f32<const D: usize>(x: Tensor<D>, f: impl FnOnce(Tensor<D>) -> Tensor<D>) -> Tensor<D> {
    let dtype = x.dtype();
    if dtype == DType::F32 {
        f(x)
    } else {
        f(x.cast(FloatDType::F32)).cast(FloatDType::from(dtype))
    }
}

/// `torch.nn.Linear`. The weight is kept as `[in, out]` (Burn's layout): it is transposed once
/// at load time from PyTorch's `[out, in]`.
#[derive(Module, Debug)]
pub struct Linear {
    pub weight: Param<Tensor<2>>,
    pub bias: Option<Param<Tensor<1>>>,
    /// LoRA adapters, when the loading plan selected this layer.
    #[module(skip)]
    pub lora: Option<LoraSlot>,
}

impl Linear {
    pub fn load(vb: VarBuilder, d_in: usize, d_out: usize, bias: bool) -> Result<Self> {
        let weight = vb.get_weight("weight", [d_out, d_in])?.transpose();
        let bias = if bias {
            Some(param(vb.get("bias", [d_out])?))
        } else {
            None
        };
        Ok(Self {
            weight: param(weight),
            bias,
            lora: vb.lora_slot(LoraKind::Linear { d_in, d_out }),
        })
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let w = self.weight.val();
        // Without gradient, the adapters folded into the weight (LoraSlot::merged_linear).
        let (w, lora) = match self.lora.as_ref().map(|l| (l.merged_linear(&w, &x), l)) {
            Some((Some(merged), _)) => (merged, None),
            Some((None, l)) => (w, Some(l)),
            None => (w, None),
        };
        // The weight in its stored dtype (f16 weights are cast per use); the backward keeps
        // the stored weight and not x (crate::ops::stored_weight). On `[rows, in]`, with the
        // bias shaped before the product, so that the add follows it directly: Burn's fusion
        // then runs both as one kernel on CubeCL (a reshape between them ends the fusion).
        let dims = x.dims();
        let bias = self
            .bias
            .as_ref()
            .map(|b| in_dtype(b.val(), x.dtype()).unsqueeze::<2>());
        let y = crate::ops::stored_weight::matmul_stored(x.clone().flatten::<2>(0, D - 2), w);
        let y = match bias {
            Some(b) => y + b,
            None => y,
        };
        let mut out = dims;
        out[D - 1] = y.dims()[1];
        let y = y.reshape(out);
        match lora {
            None => y,
            Some(lora) => lora.linear(&x, y),
        }
    }
}

/// `torch.nn.Conv2d` with square kernels. `padding` is `(begin, end)`, the same on both axes,
/// so diffusers' `F.pad(x, (0, 1, 0, 1))` before a stride-2 conv is `padding = (0, 1)`.
#[derive(Module, Debug)]
pub struct Conv2d {
    pub weight: Param<Tensor<4>>,
    pub bias: Option<Param<Tensor<1>>>,
    pub stride: usize,
    pub pad_begin: usize,
    pub pad_end: usize,
    #[module(skip)]
    pub lora: Option<LoraSlot>,
}

impl Conv2d {
    pub fn load(
        vb: VarBuilder,
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        padding: (usize, usize),
    ) -> Result<Self> {
        Self::load_with_bias(vb, c_in, c_out, kernel, stride, padding, true)
    }

    /// As [`load`](Self::load), for a conv that may have no bias (CLIP's patch embedding).
    pub fn load_with_bias(
        vb: VarBuilder,
        c_in: usize,
        c_out: usize,
        kernel: usize,
        stride: usize,
        padding: (usize, usize),
        bias: bool,
    ) -> Result<Self> {
        let weight = vb.get_weight("weight", [c_out, c_in, kernel, kernel])?;
        let weight = crate::tensor::conv_weight_channels_last(weight);
        let bias = if bias {
            Some(param(vb.get("bias", [c_out])?))
        } else {
            None
        };
        Ok(Self {
            weight: param(weight),
            bias,
            stride,
            pad_begin: padding.0,
            pad_end: padding.1,
            lora: vb.lora_slot(LoraKind::Conv {
                c_in,
                c_out,
                kernel,
                stride,
                pad: padding,
            }),
        })
    }

    pub fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        self.forward_rows_padded(x, (self.pad_begin, self.pad_end))
    }

    /// [`forward`](Self::forward) on row strips ([`strips::conv`]): each strip with the rows
    /// its kernel reaches in the strips above and below. Needs stride 1 and "same" padding
    /// along the height (`pad_begin + pad_end = kernel − 1`).
    pub fn forward_strips(&self, parts: &[Tensor<4>]) -> Parts {
        let kernel = self.weight.dims()[2];
        let (above, below) = (self.pad_begin, self.pad_end);
        assert!(
            self.stride == 1 && above + below + 1 == kernel,
            "strips need a stride-1 'same' convolution"
        );
        strips::conv(parts, (above, below), |x, pad| {
            self.forward_rows_padded(x, pad)
        })
    }

    /// [`forward`](Self::forward) with `(top, bottom)` padding along the height instead of the
    /// layer's own (a strip of rows whose halo comes from its neighbours: [`crate::memory::strips`]).
    pub fn forward_rows_padded(&self, x: Tensor<4>, rows: (usize, usize)) -> Tensor<4> {
        let options = ConvOptions::new_with_padding(
            [self.stride, self.stride],
            [rows, (self.pad_begin, self.pad_end)],
            [1, 1],
            1,
        );
        let w = self.weight.val();
        // As Linear: without gradient, the adapters folded into the weight; the
        // stored weight, kept without x for the backward (crate::ops::stored_weight).
        let (w, lora) = match self.lora.as_ref().map(|l| (l.merged_conv(&w, &x), l)) {
            Some((Some(merged), _)) => (merged, None),
            Some((None, l)) => (w, Some(l)),
            None => (w, None),
        };
        // The bias shaped before the convolution, so that its add starts the element-wise
        // chain after it (as Linear).
        let bias = self.bias.as_ref().map(|b| {
            let c = b.dims()[0];
            in_dtype(b.val(), x.dtype()).reshape([1, c, 1, 1])
        });
        let y = crate::ops::stored_weight::conv2d_stored(x.clone(), w, options.clone());
        let y = match bias {
            Some(b) => y + b,
            None => y,
        };
        match lora {
            None => y,
            Some(lora) => lora.conv(&x, y, &options),
        }
    }
}

/// `torch.nn.GroupNorm` with affine parameters, over `[N, C, ...]`.
#[derive(Module, Debug)]
pub struct GroupNorm {
    pub weight: Param<Tensor<1>>,
    pub bias: Param<Tensor<1>>,
    pub num_groups: usize,
    pub eps: f64,
}

impl GroupNorm {
    pub fn load(vb: VarBuilder, num_groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if num_groups == 0 || !channels.is_multiple_of(num_groups) {
            return Err(crate::Error::Input(format!(
                "{}: {channels} channels cannot be split into {num_groups} groups",
                vb.path("weight")
            )));
        }
        Ok(Self {
            weight: param(vb.get("weight", [channels])?),
            bias: param(vb.get("bias", [channels])?),
            num_groups,
            eps,
        })
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        self.apply(x, false)
    }

    /// `silu(self.forward(x))` as one op (the resnets' and the output heads' norm + activation).
    pub fn forward_silu<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        self.apply(x, true)
    }

    /// [`forward`](Self::forward) (then SiLU when `silu_after`) on row strips, with the
    /// statistics of all of them ([`strips::group_norm`]).
    pub fn forward_strips(&self, parts: Parts, silu_after: bool) -> Parts {
        strips::group_norm(
            parts,
            (self.num_groups, self.eps),
            self.weight.val(),
            self.bias.val(),
            silu_after,
        )
    }

    fn apply<const D: usize>(&self, x: Tensor<D>, silu: bool) -> Tensor<D> {
        in_f32(x, |x| {
            crate::ops::group_norm::group_norm(
                x,
                self.weight.val(),
                self.bias.val(),
                self.num_groups,
                self.eps,
                silu,
            )
        })
    }
}

/// `torch.nn.LayerNorm` over the last axis.
#[derive(Module, Debug)]
pub struct LayerNorm {
    pub weight: Param<Tensor<1>>,
    pub bias: Param<Tensor<1>>,
    pub eps: f64,
}

impl LayerNorm {
    pub fn load(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: param(vb.get("weight", [dim])?),
            bias: param(vb.get("bias", [dim])?),
            eps,
        })
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let on_cpu = crate::tensor::is_cpu(&x.device());
        in_f32(x, |x| {
            if on_cpu {
                // The CPU backend's one-pass kernel.
                layer_norm(x, self.weight.val(), Some(self.bias.val()), self.eps)
            } else {
                self.composed(x)
            }
        })
    }

    /// Burn's default layer norm (the same operations in the same order) with the weight and
    /// bias shaped before the statistics: Burn's version reshapes them between the division
    /// and the scale, which ends the fused kernel there on CubeCL.
    fn composed<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let mut dims = [1; D];
        dims[D - 1] = self.weight.dims()[0];
        let (w, b) = (
            self.weight.val().reshape(dims),
            self.bias.val().reshape(dims),
        );
        let mean = x.clone().mean_dim(D - 1);
        let centred = x - mean;
        let var = (centred.clone() * centred.clone()).mean_dim(D - 1);
        centred / (var + self.eps).sqrt() * w + b
    }
}

/// `torch.nn.Embedding`. A table over [`crate::memory::strips::MAX_BUFFER_BYTES`] in f32 (CLIP
/// ViT-L/14's token embedding, 49408 × 768 = 145 MiB; OpenCLIP ViT-H/14's, 193 MiB) is held as
/// blocks of rows, each one buffer within WebGPU's default binding limit; a lookup gathers from
/// every block and keeps each id's row from the block that has it.
#[derive(Module, Debug)]
pub struct Embedding {
    pub blocks: Vec<Param<Tensor<2>>>,
}

impl Embedding {
    pub fn load(vb: VarBuilder, num: usize, dim: usize) -> Result<Self> {
        let blocks = vb.get_weight_row_blocks("weight", [num, dim], Self::block_rows(dim))?;
        Ok(Self {
            blocks: blocks.into_iter().map(param).collect(),
        })
    }

    /// The most rows of `dim` f32 values a block holds.
    pub fn block_rows(dim: usize) -> usize {
        (crate::memory::strips::MAX_BUFFER_BYTES as usize / (4 * dim.max(1))).max(1)
    }

    /// The table's rows (the vocabulary).
    pub fn num_embeddings(&self) -> usize {
        self.blocks.iter().map(|b| b.val().dims()[0]).sum()
    }

    pub fn forward(&self, ids: Tensor<2, Int>) -> Tensor<3> {
        // The rows looked up, then cast: not the whole table.
        if let [table] = &self.blocks[..] {
            return compute_weight(embedding(table.val(), ids));
        }
        let mut start = 0;
        let mut out: Option<Tensor<3>> = None;
        for table in &self.blocks {
            let table = table.val();
            let n = table.dims()[0];
            let local = ids.clone() - start as i64;
            let inside = local
                .clone()
                .greater_equal_elem(0)
                .bool_and(local.clone().lower_elem(n as i64));
            let rows = compute_weight(embedding(table, local.clamp(0, n as i64 - 1)));
            let rows = rows * inside.float().unsqueeze_dim::<3>(2);
            out = Some(match out {
                Some(o) => o + rows,
                None => rows,
            });
            start += n;
        }
        out.expect("a table has a block")
    }
}

/// Scaled dot-product attention over `[B, heads, N, head_dim]` tensors.
///
/// Without a mask (the UNet's and the VAE's attention, N up to 4096 at SD-1.x 512²) this is
/// [`crate::ops::attention::attention`]: the backend's fused attention kernel forward, and a backward
/// that recomputes the scores block by block instead of keeping them (Burn's own autodiff
/// attention keeps the N×N scores). With a mask (CLIP's causal text attention, N = 77) it is
/// the materialised matmul + softmax.
pub fn scaled_dot_product_attention(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    mask: Option<Tensor<4>>,
) -> Tensor<4> {
    let Some(mask) = mask else {
        return crate::ops::attention::attention(q, k, v);
    };
    let head_dim = q.dims()[3];
    let scores = q.matmul(k.swap_dims(2, 3)) * (1.0 / (head_dim as f64).sqrt()) + mask;
    burn::tensor::activation::softmax(scores, 3).matmul(v)
}

/// `[B, N, heads * head_dim]` → `[B, heads, N, head_dim]`.
pub fn split_heads(x: Tensor<3>, heads: usize) -> Tensor<4> {
    let [b, n, c] = x.dims();
    x.reshape([b, n, heads, c / heads]).swap_dims(1, 2)
}

/// `[B, heads, N, head_dim]` → `[B, N, heads * head_dim]`.
pub fn merge_heads(x: Tensor<4>) -> Tensor<3> {
    let [b, h, n, d] = x.dims();
    x.swap_dims(1, 2).reshape([b, n, h * d])
}
