//! diffusers `Attention`, `FeedForward` (GEGLU), `BasicTransformerBlock` and
//! `Transformer2DModel` (continuous input, conv or linear `proj_in`/`proj_out`).

use burn::prelude::*;

use crate::error::Result;
use crate::model::nn::{
    Conv2d, GroupNorm, LayerNorm, Linear, merge_heads, scaled_dot_product_attention, split_heads,
};
use crate::model::var_builder::VarBuilder;

/// `Attention` as the UNet uses it: bias-free `to_q/to_k/to_v`, `to_out.0` with bias.
/// Self-attention when `context` is `None`, cross-attention otherwise.
#[derive(Module, Debug)]
pub struct Attention {
    pub to_q: Linear,
    pub to_k: Linear,
    pub to_v: Linear,
    pub to_out: Vec<Linear>,
    pub heads: usize,
}

impl Attention {
    pub fn load(
        vb: VarBuilder,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        Ok(Self {
            to_q: Linear::load(vb.pp("to_q"), query_dim, inner, false)?,
            to_k: Linear::load(vb.pp("to_k"), context_dim, inner, false)?,
            to_v: Linear::load(vb.pp("to_v"), context_dim, inner, false)?,
            // `to_out` is a ModuleList [Linear, Dropout]; only index 0 has weights.
            to_out: vec![Linear::load(vb.pp("to_out").pp(0), inner, query_dim, true)?],
            heads,
        })
    }

    pub fn forward(&self, x: Tensor<3>, context: Option<Tensor<3>>) -> Tensor<3> {
        let context = context.unwrap_or_else(|| x.clone());
        let q = split_heads(self.to_q.forward(x), self.heads);
        let k = split_heads(self.to_k.forward(context.clone()), self.heads);
        let v = split_heads(self.to_v.forward(context), self.heads);
        let out = merge_heads(scaled_dot_product_attention(q, k, v, None));
        self.to_out[0].forward(out)
    }
}

/// `GEGLU`: `proj` produces value and gate halves; out = value · gelu(gate).
#[derive(Module, Debug)]
pub struct GEGLU {
    pub proj: Linear,
}

/// `FeedForward(activation_fn="geglu")`; diffusers' `net` is [GEGLU, Dropout, Linear].
#[derive(Module, Debug)]
pub struct FeedForward {
    pub geglu: GEGLU,
    pub out: Linear,
}

impl FeedForward {
    pub fn load(vb: VarBuilder, dim: usize) -> Result<Self> {
        let inner = dim * 4;
        Ok(Self {
            geglu: GEGLU {
                proj: Linear::load(vb.pp("net").pp(0).pp("proj"), dim, inner * 2, true)?,
            },
            out: Linear::load(vb.pp("net").pp(2), inner, dim, true)?,
        })
    }

    /// Over chunks of tokens where the GEGLU projection `[B, N, 8·dim]` would pass
    /// [`crate::memory::strips::MAX_BUFFER_BYTES`] (diffusers' `enable_forward_chunking`; exact, as the
    /// feed-forward acts on each token alone): SD-1.x at 512² with a batch of two images and
    /// CFG makes it `[4, 4096, 2560]` = 160 MiB, over WebGPU's default binding limit.
    pub fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        self.forward_chunked(x, crate::memory::strips::MAX_BUFFER_BYTES)
    }

    /// [`forward`](Self::forward) with projections of at most `max_bytes` (f32), at least one
    /// token per chunk.
    pub fn forward_chunked(&self, x: Tensor<3>, max_bytes: u64) -> Tensor<3> {
        let [b, n, _] = x.dims();
        let width = self.geglu.proj.weight.dims()[1];
        let tokens = Self::chunk_tokens(b, width, max_bytes).min(n.max(1));
        if tokens >= n {
            return self.forward_tokens(x);
        }
        let chunks = (0..n)
            .step_by(tokens)
            .map(|s| self.forward_tokens(x.clone().narrow(1, s, tokens.min(n - s))))
            .collect();
        Tensor::cat(chunks, 1)
    }

    /// Tokens per chunk so that a `[batch, tokens, width]` f32 projection fits `max_bytes`.
    pub fn chunk_tokens(batch: usize, width: usize, max_bytes: u64) -> usize {
        (max_bytes / (4 * batch.max(1) * width.max(1)) as u64).max(1) as usize
    }

    fn forward_tokens(&self, x: Tensor<3>) -> Tensor<3> {
        self.out
            .forward(crate::ops::geglu::geglu(self.geglu.proj.forward(x)))
    }
}

#[derive(Module, Debug)]
pub struct BasicTransformerBlock {
    pub norm1: LayerNorm,
    pub attn1: Attention,
    pub norm2: LayerNorm,
    pub attn2: Attention,
    pub norm3: LayerNorm,
    pub ff: FeedForward,
}

impl BasicTransformerBlock {
    pub fn load(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        head_dim: usize,
        cross_attention_dim: usize,
    ) -> Result<Self> {
        Ok(Self {
            norm1: LayerNorm::load(vb.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::load(vb.pp("attn1"), dim, dim, heads, head_dim)?,
            norm2: LayerNorm::load(vb.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::load(vb.pp("attn2"), dim, cross_attention_dim, heads, head_dim)?,
            norm3: LayerNorm::load(vb.pp("norm3"), dim, 1e-5)?,
            ff: FeedForward::load(vb.pp("ff"), dim)?,
        })
    }

    pub fn forward(&self, x: Tensor<3>, context: Tensor<3>) -> Tensor<3> {
        let x = x.clone() + self.attn1.forward(self.norm1.forward(x), None);
        let x = x.clone() + self.attn2.forward(self.norm2.forward(x), Some(context));
        x.clone() + self.ff.forward(self.norm3.forward(x))
    }
}

/// `proj_in` / `proj_out`: a 1×1 conv (SD-1.x) or a linear layer (SD-2.x).
#[derive(Module, Debug)]
pub enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

impl Projection {
    fn load(vb: VarBuilder, c_in: usize, c_out: usize, linear: bool) -> Result<Self> {
        Ok(if linear {
            Projection::Linear(Linear::load(vb, c_in, c_out, true)?)
        } else {
            Projection::Conv(Conv2d::load(vb, c_in, c_out, 1, 1, (0, 0))?)
        })
    }
}

#[derive(Module, Debug)]
pub struct Transformer2DModel {
    pub norm: GroupNorm,
    pub proj_in: Projection,
    pub transformer_blocks: Vec<BasicTransformerBlock>,
    pub proj_out: Projection,
}

pub struct TransformerConfig {
    pub heads: usize,
    pub num_layers: usize,
    pub cross_attention_dim: usize,
    pub groups: usize,
    pub use_linear_projection: bool,
}

impl Transformer2DModel {
    pub fn load(vb: VarBuilder, channels: usize, cfg: &TransformerConfig) -> Result<Self> {
        let head_dim = channels / cfg.heads;
        let inner = cfg.heads * head_dim;
        let linear = cfg.use_linear_projection;
        Ok(Self {
            norm: GroupNorm::load(vb.pp("norm"), cfg.groups, channels, 1e-6)?,
            proj_in: Projection::load(vb.pp("proj_in"), channels, inner, linear)?,
            transformer_blocks: (0..cfg.num_layers)
                .map(|i| {
                    BasicTransformerBlock::load(
                        vb.pp("transformer_blocks").pp(i),
                        inner,
                        cfg.heads,
                        head_dim,
                        cfg.cross_attention_dim,
                    )
                })
                .collect::<Result<_>>()?,
            proj_out: Projection::load(vb.pp("proj_out"), inner, channels, linear)?,
        })
    }

    pub fn forward(&self, x: Tensor<4>, context: Tensor<3>) -> Tensor<4> {
        let [b, c, h, w] = x.dims();
        let residual = x.clone();
        let x = self.norm.forward(x);
        let to_tokens = |x: Tensor<4>| {
            let inner = x.dims()[1];
            x.permute([0, 2, 3, 1]).reshape([b, h * w, inner])
        };
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => to_tokens(conv.forward(x)),
            Projection::Linear(lin) => lin.forward(to_tokens(x)),
        };
        for block in &self.transformer_blocks {
            tokens = block.forward(tokens, context.clone());
        }
        let from_tokens = |t: Tensor<3>| {
            let inner = t.dims()[2];
            t.reshape([b, h, w, inner]).permute([0, 3, 1, 2])
        };
        let out = match &self.proj_out {
            Projection::Conv(conv) => conv.forward(from_tokens(tokens)),
            Projection::Linear(lin) => from_tokens(lin.forward(tokens)),
        };
        debug_assert_eq!(out.dims()[1], c);
        out + residual
    }
}
