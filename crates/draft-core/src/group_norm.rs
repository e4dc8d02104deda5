//! `torch.nn.GroupNorm` (affine), optionally followed by SiLU, as one op.
//!
//! Composed of Burn's primitives a group norm is ten kernels (two means, a subtraction, a
//! square, a square root, a division, the affine scale and shift) and the SiLU after it two
//! more; on the CPU each is a pass over memory and a round of thread wake-ups, and under
//! autodiff Burn keeps several of the intermediates for the backward. Here it is one op
//! ([`GroupNormBackend`], a Burn backend extension):
//!
//! - on the CPU backend (flex) the forward is one kernel of ours: per (sample, group), the
//!   statistics in f64 and then `silu((x − μ)·a + b)` with the per-channel `a = w/σ`,
//!   the groups spread over rayon's threads (natively);
//! - elsewhere (CubeCL, where `Fusion` fuses the element-wise work anyway) the forward is the
//!   composed formula;
//! - under autodiff the op keeps only its input and parameters and the backward recomputes the
//!   statistics (the standard group-norm backward, through SiLU's derivative when fused):
//!
//! ```text
//! x̂ = (x − μ)/σ    y = x̂·w + b    dy = dout · s(1 + y(1 − s)), s = sigmoid(y)   (SiLU)
//! dw = Σ dy·x̂      db = Σ dy      dx = (dx̂ − mean_g(dx̂) − x̂·mean_g(dx̂·x̂)) / σ,  dx̂ = dy·w
//! ```

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::wgpu::CubeBackend;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, TensorMetadata, backend_extension};
use burn::prelude::*;
use burn::tensor::{DType, Shape, TensorData};

/// Group norm of `[N, C, ...]` `x` over `groups` groups with per-channel `weight` and `bias`,
/// followed by SiLU when `silu`.
pub fn group_norm<const D: usize>(
    x: Tensor<D>,
    weight: Tensor<1>,
    bias: Tensor<1>,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as GroupNormBackend>::group_norm(
        x.into_dispatch(),
        weight.into_dispatch(),
        bias.into_dispatch(),
        groups,
        eps,
        silu,
    ))
}

/// The op, routed to each backend by Burn's backend-extension dispatch.
#[backend_extension(Flex, Cube, Fusion, Autodiff)]
pub trait GroupNormBackend: Backend {
    /// `silu?(group_norm(x) · weight + bias)`.
    #[fusion(default)]
    fn group_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> FloatTensor<Self> {
        composed::<Self>(x, weight, bias, groups, eps, silu)
    }
}

impl GroupNormBackend for CubeBackend {}

impl GroupNormBackend for Flex {
    fn group_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> FloatTensor<Self> {
        let f32s = [&x, &weight, &bias].iter().all(|t| t.dtype() == DType::F32);
        if !f32s {
            return composed::<Self>(x, weight, bias, groups, eps, silu);
        }
        flex_forward(x, weight, bias, groups, eps, silu)
    }
}

/// `[N, C, rest]` of an `[N, C, ...]` shape.
fn ncr(shape: &Shape) -> [usize; 3] {
    let (n, c) = (shape[0], shape[1]);
    [n, c, shape.num_elements() / (n * c).max(1)]
}

fn reshape<B: Backend>(t: FloatTensor<B>, dims: &[usize]) -> FloatTensor<B> {
    B::float_reshape(t, Shape::from(dims.to_vec()))
}

/// `x̂` as `[N, C, rest]` and `1/σ` as `[N, G, 1]`.
fn normalized<B: Backend>(
    x: FloatTensor<B>,
    groups: usize,
    eps: f64,
) -> (FloatTensor<B>, FloatTensor<B>) {
    let [n, c, r] = ncr(&x.shape());
    let xg = reshape::<B>(x, &[n, groups, c / groups * r]);
    let mean = B::float_mean_dim(xg.clone(), 2);
    let xc = B::float_sub(xg, mean);
    let var = B::float_mean_dim(B::float_mul(xc.clone(), xc.clone()), 2);
    let sigma = B::float_sqrt(B::float_add_scalar(var, eps.into()));
    let xhat = B::float_div(xc, sigma.clone());
    (reshape::<B>(xhat, &[n, c, r]), B::float_recip(sigma))
}

/// `x̂·w + b` over `[N, C, rest]`.
fn affine<B: Backend>(
    xhat: FloatTensor<B>,
    weight: FloatTensor<B>,
    bias: FloatTensor<B>,
) -> FloatTensor<B> {
    let c = weight.shape()[0];
    let w = reshape::<B>(weight, &[1, c, 1]);
    let b = reshape::<B>(bias, &[1, c, 1]);
    B::float_add(B::float_mul(xhat, w), b)
}

/// The formula in Burn's primitives (PyTorch's order of operations).
fn composed<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    bias: FloatTensor<B>,
    groups: usize,
    eps: f64,
    silu: bool,
) -> FloatTensor<B> {
    let shape = x.shape();
    let (xhat, _) = normalized::<B>(x, groups, eps);
    let y = affine::<B>(xhat, weight, bias);
    let y = if silu {
        B::float_mul(y.clone(), B::sigmoid(y))
    } else {
        y
    };
    B::float_reshape(y, shape)
}

/// The CPU kernel: one pass for each group's statistics, one for the output.
fn flex_forward(
    x: FlexTensor,
    weight: FlexTensor,
    bias: FlexTensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> FlexTensor {
    let shape = x.layout().shape().clone();
    let [_, c, r] = ncr(&shape);
    let (x, weight, bias) = (
        x.to_contiguous(),
        weight.to_contiguous(),
        bias.to_contiguous(),
    );
    let xs: &[f32] = x.as_slice().expect("contiguous");
    let w: &[f32] = weight.as_slice().expect("contiguous");
    let b: &[f32] = bias.as_slice().expect("contiguous");
    let per_group = c / groups;
    let len = per_group * r;
    let mut out = vec![0f32; xs.len()];
    let kernel = |(ng, (o, xi)): (usize, (&mut [f32], &[f32]))| {
        let mean = xi.iter().map(|&v| v as f64).sum::<f64>() / len as f64;
        let var = xi
            .iter()
            .map(|&v| {
                let d = v as f64 - mean;
                d * d
            })
            .sum::<f64>()
            / len as f64;
        let inv = 1.0 / (var + eps).sqrt();
        let first = (ng % groups) * per_group;
        for (ch, (oc, xc)) in o.chunks_mut(r).zip(xi.chunks(r)).enumerate() {
            // (x − μ)·(w/σ) + b: centred first, as PyTorch, so that a mean far larger than
            // the spread does not cancel.
            let (m, a, shift) = (
                mean as f32,
                (w[first + ch] as f64 * inv) as f32,
                b[first + ch],
            );
            if silu {
                for (o, &v) in oc.iter_mut().zip(xc) {
                    let y = (v - m) * a + shift;
                    *o = y / (1.0 + (-y).exp());
                }
            } else {
                for (o, &v) in oc.iter_mut().zip(xc) {
                    *o = (v - m) * a + shift;
                }
            }
        }
    };
    if len == 0 {
        return FlexTensor::from_data(TensorData::new(out, shape));
    }
    #[cfg(not(target_arch = "wasm32"))]
    {
        use rayon::prelude::*;
        // Groups of at least ~16 K elements per task: smaller ones cost more to hand out.
        let min = (16384 / len).max(1);
        out.par_chunks_mut(len)
            .zip(xs.par_chunks(len))
            .enumerate()
            .with_min_len(min)
            .for_each(kernel);
    }
    #[cfg(target_arch = "wasm32")]
    out.chunks_mut(len)
        .zip(xs.chunks(len))
        .enumerate()
        .for_each(kernel);
    FlexTensor::from_data(TensorData::new(out, shape))
}

/// Gradients of x, weight and bias (each only where `want` says) for the output gradient.
#[allow(clippy::too_many_arguments)]
fn backward<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    bias: FloatTensor<B>,
    d_out: FloatTensor<B>,
    groups: usize,
    eps: f64,
    silu: bool,
    want: [bool; 3],
) -> [Option<FloatTensor<B>>; 3] {
    let shape = x.shape();
    let [n, c, r] = ncr(&shape);
    let (xhat, inv) = normalized::<B>(x, groups, eps);
    let d_out = reshape::<B>(d_out, &[n, c, r]);
    let dy = if silu {
        // silu'(y) = s + y·s·(1 − s) = s·(1 + y·(1 − s)).
        let y = affine::<B>(xhat.clone(), weight.clone(), bias);
        let s = B::sigmoid(y.clone());
        let one_minus_s = B::float_add_scalar(B::float_neg(s.clone()), 1.0.into());
        let d = B::float_mul(
            s,
            B::float_add_scalar(B::float_mul(y, one_minus_s), 1.0.into()),
        );
        B::float_mul(d_out, d)
    } else {
        d_out
    };
    let per_channel =
        |t: FloatTensor<B>| reshape::<B>(B::float_sum_dim(B::float_sum_dim(t, 2), 0), &[c]);
    let dw = want[1].then(|| per_channel(B::float_mul(dy.clone(), xhat.clone())));
    let db = want[2].then(|| per_channel(dy.clone()));
    let dx = want[0].then(|| {
        let pg = c / groups * r;
        let dxhat = reshape::<B>(
            B::float_mul(dy, reshape::<B>(weight, &[1, c, 1])),
            &[n, groups, pg],
        );
        let xhat = reshape::<B>(xhat, &[n, groups, pg]);
        let m1 = B::float_mean_dim(dxhat.clone(), 2);
        let m2 = B::float_mean_dim(B::float_mul(dxhat.clone(), xhat.clone()), 2);
        let centred = B::float_sub(B::float_sub(dxhat, m1), B::float_mul(xhat, m2));
        B::float_reshape(B::float_mul(centred, inv), shape)
    });
    [dx, dw, db]
}

#[derive(Debug)]
struct GroupNormBackward;

/// What the backward keeps: the op's inputs (x is the size of the output; nothing else is).
#[derive(Clone, Debug)]
struct Saved<B: Backend> {
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    bias: FloatTensor<B>,
    groups: usize,
    eps: f64,
    silu: bool,
}

impl<B: Backend> Backward<B, 3> for GroupNormBackward {
    type State = Saved<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_x, node_w, node_b] = ops.parents;
        let d_out = grads.consume::<B>(&ops.node);
        let Saved {
            x,
            weight,
            bias,
            groups,
            eps,
            silu,
        } = ops.state;
        let want = [node_x.is_some(), node_w.is_some(), node_b.is_some()];
        let [dx, dw, db] = backward::<B>(x, weight, bias, d_out, groups, eps, silu, want);
        for (node, grad) in [(node_x, dx), (node_w, dw), (node_b, db)] {
            if let (Some(node), Some(grad)) = (node, grad) {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

impl<B: Backend + GroupNormBackend, C: CheckpointStrategy> GroupNormBackend for Autodiff<B, C> {
    fn group_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> FloatTensor<Self> {
        match GroupNormBackward
            .prepare::<C>([x.node(), weight.node(), bias.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (x, weight, bias) = (
                    x.into_primitive(),
                    weight.into_primitive(),
                    bias.into_primitive(),
                );
                let out = B::group_norm(x.clone(), weight.clone(), bias.clone(), groups, eps, silu);
                let saved = Saved {
                    x,
                    weight,
                    bias,
                    groups,
                    eps,
                    silu,
                };
                prep.finish(saved, out)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::group_norm(
                x.into_primitive(),
                weight.into_primitive(),
                bias.into_primitive(),
                groups,
                eps,
                silu,
            )),
        }
    }
}
