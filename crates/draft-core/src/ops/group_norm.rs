//! `torch.nn.GroupNorm` (affine), optionally followed by SiLU, as one op.
//!
//! Composed of Burn's primitives a group norm is ten kernels (two means, a subtraction, a
//! square, a square root, a division, the affine scale and shift) and the SiLU after it two
//! more; on the CPU each is a pass over memory and a round of thread wake-ups, and under
//! autodiff Burn keeps several of the intermediates for the backward. Here it is one op
//! ([`GroupNormBackend`], a Burn backend extension):
//!
//! - on the CPU backend (flex) the forward is one kernel of ours: per (sample, group), the
//!   statistics in f64 and then `silu((x − μ)·a + b)` with the per-channel `a = w/σ`
//!   (vectorised, [`crate::ops::cpu_kernels`]), the groups spread over rayon's threads (natively);
//! - elsewhere (CubeCL, where `Fusion` fuses the element-wise work anyway) the forward is the
//!   composed formula;
//! - under autodiff the op keeps only its input and parameters and the backward recomputes the
//!   statistics (the standard group-norm backward, through SiLU's derivative when fused):
//!
//! ```text
//! x̂ = (x − μ)/σ    y = x̂·w + b    dy = dout · s(1 + y(1 − s)), s = sigmoid(y)   (SiLU)
//! dw = Σ dy·x̂      db = Σ dy      dx = (dx̂ − mean_g(dx̂) − x̂·mean_g(dx̂·x̂)) / σ,  dx̂ = dy·w
//! ```

use crate::ops::extension::{Differentiable, all_kept, record};
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
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

/// The formula in Burn's primitives (PyTorch's order of operations), written for Burn's
/// fusion on CubeCL: the statistics as two reductions over `[N, G, C/G·rest]`, then the
/// element-wise rest — `silu?((x − μ)/σ · w + b)` — as one chain over the `[N, G, C/G, rest]`
/// view of x, with every reshape before it (a reshape inside the chain, or an op on another
/// shape such as the `1/σ` the backward uses, ends the fused kernel there: 13 kernels per
/// group norm instead of 3 were measured so, docs/benchmarks.md).
fn composed<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    bias: FloatTensor<B>,
    groups: usize,
    eps: f64,
    silu: bool,
) -> FloatTensor<B> {
    let shape = x.shape();
    let [n, c, r] = ncr(&shape);
    let xg = reshape::<B>(x, &[n, groups, c / groups * r]);
    let xg_in = xg.clone();
    let mean = B::float_mean_dim(xg.clone(), 2);
    let xc = B::float_sub(xg, mean.clone());
    let var = B::float_mean_dim(B::float_mul(xc.clone(), xc), 2);
    let sigma = B::float_sqrt(B::float_add_scalar(var, eps.into()));
    let per_group = |t: FloatTensor<B>| reshape::<B>(t, &[n, groups, 1, 1]);
    let per_channel = |t: FloatTensor<B>| reshape::<B>(t, &[1, groups, c / groups, 1]);
    let (mean, sigma) = (per_group(mean), per_group(sigma));
    let (w, b) = (per_channel(weight), per_channel(bias));
    // From xg, which a reshape has made contiguous where x was not: no second copy.
    let x = reshape::<B>(xg_in, &[n, groups, c / groups, r]);
    let xhat = B::float_div(B::float_sub(x, mean), sigma);
    let y = B::float_add(B::float_mul(xhat, w), b);
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
    if len == 0 {
        return FlexTensor::from_data(TensorData::new(out, shape));
    }
    crate::ops::cpu_kernels::for_each_chunk(&mut out, len, xs, len, |ng, o, xi| {
        let (mean, m2) = crate::ops::cpu_kernels::moments(xi);
        let inv = 1.0 / (m2 / len as f64 + eps).sqrt();
        let first = (ng % groups) * per_group;
        for (ch, (oc, xc)) in o.chunks_mut(r).zip(xi.chunks(r)).enumerate() {
            // (x − μ)·(w/σ) + b: centred first, as PyTorch, so that a mean far larger than
            // the spread does not cancel.
            let (m, a, shift) = (
                mean as f32,
                (w[first + ch] as f64 * inv) as f32,
                b[first + ch],
            );
            crate::ops::cpu_kernels::affine_silu(oc, xc, m, a, shift, silu);
        }
    });
    FlexTensor::from_data(TensorData::new(out, shape))
}

/// The op's settings, kept with its inputs (x is the size of the output; nothing else is).
#[derive(Clone, Debug)]
struct GroupNorm {
    groups: usize,
    eps: f64,
    silu: bool,
}

impl<B: GroupNormBackend> Differentiable<B, 3> for GroupNorm {
    fn forward(&self, [x, weight, bias]: [FloatTensor<B>; 3]) -> FloatTensor<B> {
        B::group_norm(x, weight, bias, self.groups, self.eps, self.silu)
    }

    fn backward(
        self,
        inputs: [Option<FloatTensor<B>>; 3],
        d_out: FloatTensor<B>,
        want: [bool; 3],
    ) -> [Option<FloatTensor<B>>; 3] {
        let [x, weight, bias] = all_kept(inputs);
        let Self { groups, eps, silu } = self;
        let shape = x.shape();
        let [n, c, r] = ncr(&shape);
        let (xhat, inv) = normalized::<B>(x, groups, eps);
        let d_out = reshape::<B>(d_out, &[n, c, r]);
        let dy = if silu {
            let y = affine::<B>(xhat.clone(), weight.clone(), bias);
            B::float_mul(d_out, silu_derivative::<B>(y))
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
}

/// `silu'(y) = s + y·s·(1 − s) = s·(1 + y·(1 − s))`, `s = sigmoid(y)`.
fn silu_derivative<B: Backend>(y: FloatTensor<B>) -> FloatTensor<B> {
    let s = B::sigmoid(y.clone());
    let one_minus_s = B::float_add_scalar(B::float_neg(s.clone()), 1.0.into());
    B::float_mul(
        s,
        B::float_add_scalar(B::float_mul(y, one_minus_s), 1.0.into()),
    )
}

impl<B: GroupNormBackend, C: CheckpointStrategy> GroupNormBackend for Autodiff<B, C> {
    fn group_norm(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        bias: FloatTensor<Self>,
        groups: usize,
        eps: f64,
        silu: bool,
    ) -> FloatTensor<Self> {
        let op = GroupNorm { groups, eps, silu };
        record::<B, C, _, 3>(op, [x, weight, bias])
    }
}

// ---------------------------------------------------------------------------------------------
// A group norm over strips of rows (crate::memory::strips): each strip's moments, combined, then each
// strip scaled and shifted — two ops whose backwards keep only their inputs, as the op above.

/// Per (sample, group) of `[N, C, ...]` `x`: the mean and the centred sum of squares
/// `M2 = Σ (x − mean)²`, as `[N, G, 2]` (statistics in f64 on the CPU).
pub fn group_moments<const D: usize>(x: Tensor<D>, groups: usize) -> Tensor<3> {
    Tensor::from_dispatch(<Dispatch as StripNormBackend>::group_moments(
        x.into_dispatch(),
        groups,
    ))
}

/// `silu?(x · a + s)` with per (sample, channel) `a` and `s`, `[N, C]`, over `[N, C, ...]` `x`.
pub fn scale_shift<const D: usize>(
    x: Tensor<D>,
    a: Tensor<2>,
    s: Tensor<2>,
    silu: bool,
) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as StripNormBackend>::scale_shift(
        x.into_dispatch(),
        a.into_dispatch(),
        s.into_dispatch(),
        silu,
    ))
}

/// The two ops, routed to each backend by Burn's backend-extension dispatch.
#[backend_extension(Flex, Cube, Fusion, Autodiff)]
pub trait StripNormBackend: Backend {
    #[fusion(default)]
    fn group_moments(x: FloatTensor<Self>, groups: usize) -> FloatTensor<Self> {
        moments_composed::<Self>(x, groups)
    }

    #[fusion(default)]
    fn scale_shift(
        x: FloatTensor<Self>,
        a: FloatTensor<Self>,
        s: FloatTensor<Self>,
        silu: bool,
    ) -> FloatTensor<Self> {
        scale_shift_composed::<Self>(x, a, s, silu)
    }
}

impl StripNormBackend for CubeBackend {}

impl StripNormBackend for Flex {
    fn group_moments(x: FloatTensor<Self>, groups: usize) -> FloatTensor<Self> {
        if x.dtype() != DType::F32 {
            return moments_composed::<Self>(x, groups);
        }
        let [n, c, r] = ncr(&x.shape());
        let x = x.to_contiguous();
        let xs: &[f32] = x.as_slice().expect("contiguous");
        let len = c / groups * r;
        let mut out = vec![0f32; n * groups * 2];
        if len > 0 {
            crate::ops::cpu_kernels::for_each_chunk(&mut out, 2, xs, len, |_, o, xi| {
                let (mean, m2) = crate::ops::cpu_kernels::moments(xi);
                o[0] = mean as f32;
                o[1] = m2 as f32;
            });
        }
        FlexTensor::from_data(TensorData::new(out, [n, groups, 2]))
    }

    fn scale_shift(
        x: FloatTensor<Self>,
        a: FloatTensor<Self>,
        s: FloatTensor<Self>,
        silu: bool,
    ) -> FloatTensor<Self> {
        if [&x, &a, &s].iter().any(|t| t.dtype() != DType::F32) {
            return scale_shift_composed::<Self>(x, a, s, silu);
        }
        let shape = x.layout().shape().clone();
        let [_, _, r] = ncr(&shape);
        let (x, a, s) = (x.to_contiguous(), a.to_contiguous(), s.to_contiguous());
        let xs: &[f32] = x.as_slice().expect("contiguous");
        let av: &[f32] = a.as_slice().expect("contiguous");
        let sv: &[f32] = s.as_slice().expect("contiguous");
        let mut out = vec![0f32; xs.len()];
        if r > 0 {
            crate::ops::cpu_kernels::for_each_chunk(&mut out, r, xs, r, |nc, o, xi| {
                let (a, s) = (av[nc], sv[nc]);
                crate::ops::cpu_kernels::affine_silu(o, xi, 0.0, a, s, silu);
            });
        }
        FlexTensor::from_data(TensorData::new(out, shape))
    }
}

/// [`group_moments`] in Burn's primitives.
fn moments_composed<B: Backend>(x: FloatTensor<B>, groups: usize) -> FloatTensor<B> {
    let [n, c, r] = ncr(&x.shape());
    let xg = reshape::<B>(x, &[n, groups, c / groups * r]);
    let mean = B::float_mean_dim(xg.clone(), 2);
    let xc = B::float_sub(xg, mean.clone());
    let m2 = B::float_sum_dim(B::float_mul(xc.clone(), xc), 2);
    B::float_cat(vec![mean, m2], 2)
}

/// `x · a + s` as `[N, C, rest]`, and `silu` of it when asked.
fn scale_shift_parts<B: Backend>(
    x: FloatTensor<B>,
    a: FloatTensor<B>,
    s: FloatTensor<B>,
) -> FloatTensor<B> {
    let [n, c, r] = ncr(&x.shape());
    let x = reshape::<B>(x, &[n, c, r]);
    let a = reshape::<B>(a, &[n, c, 1]);
    let s = reshape::<B>(s, &[n, c, 1]);
    B::float_add(B::float_mul(x, a), s)
}

/// [`scale_shift`] in Burn's primitives.
fn scale_shift_composed<B: Backend>(
    x: FloatTensor<B>,
    a: FloatTensor<B>,
    s: FloatTensor<B>,
    silu: bool,
) -> FloatTensor<B> {
    let shape = x.shape();
    let y = scale_shift_parts::<B>(x, a, s);
    let y = if silu {
        B::float_mul(y.clone(), B::sigmoid(y))
    } else {
        y
    };
    B::float_reshape(y, shape)
}

/// [`group_moments`]' settings, kept with its input.
#[derive(Clone, Debug)]
struct Moments {
    groups: usize,
}

impl<B: StripNormBackend> Differentiable<B, 1> for Moments {
    fn forward(&self, [x]: [FloatTensor<B>; 1]) -> FloatTensor<B> {
        B::group_moments(x, self.groups)
    }

    fn backward(
        self,
        inputs: [Option<FloatTensor<B>>; 1],
        d_out: FloatTensor<B>,
        _: [bool; 1],
    ) -> [Option<FloatTensor<B>>; 1] {
        let ([x], groups) = (all_kept(inputs), self.groups);
        // ∂mean/∂x = 1/len, ∂M2/∂x = 2(x − mean) (the mean's own term sums to zero).
        let shape = x.shape();
        let [n, c, r] = ncr(&shape);
        let len = c / groups * r;
        let xg = reshape::<B>(x, &[n, groups, len]);
        let mean = B::float_mean_dim(xg.clone(), 2);
        let idx = |i: usize| {
            B::float_slice(
                d_out.clone(),
                &[(0..n).into(), (0..groups).into(), (i..i + 1).into()],
            )
        };
        let d_mean = B::float_div_scalar(idx(0), (len.max(1) as f64).into());
        let d_m2 = B::float_mul_scalar(idx(1), 2.0.into());
        let dx = B::float_add(B::float_mul(B::float_sub(xg, mean), d_m2), d_mean);
        [Some(B::float_reshape(dx, shape))]
    }
}

/// [`scale_shift`]'s settings, kept with its inputs.
#[derive(Clone, Debug)]
struct ScaleShift {
    silu: bool,
}

impl<B: StripNormBackend> Differentiable<B, 3> for ScaleShift {
    fn forward(&self, [x, a, s]: [FloatTensor<B>; 3]) -> FloatTensor<B> {
        B::scale_shift(x, a, s, self.silu)
    }

    fn backward(
        self,
        inputs: [Option<FloatTensor<B>>; 3],
        d_out: FloatTensor<B>,
        [want_x, want_a, want_s]: [bool; 3],
    ) -> [Option<FloatTensor<B>>; 3] {
        let [x, a, s] = all_kept(inputs);
        let shape = x.shape();
        let [n, c, r] = ncr(&shape);
        let d_out = reshape::<B>(d_out, &[n, c, r]);
        let dy = if self.silu {
            let y = scale_shift_parts::<B>(x.clone(), a.clone(), s);
            B::float_mul(d_out, silu_derivative::<B>(y))
        } else {
            d_out
        };
        let da = want_a.then(|| {
            let xr = reshape::<B>(x.clone(), &[n, c, r]);
            let da = B::float_sum_dim(B::float_mul(dy.clone(), xr), 2);
            reshape::<B>(da, &[n, c])
        });
        let ds = want_s.then(|| reshape::<B>(B::float_sum_dim(dy.clone(), 2), &[n, c]));
        let dx = want_x.then(|| {
            let dx = B::float_mul(dy, reshape::<B>(a, &[n, c, 1]));
            B::float_reshape(dx, shape)
        });
        [dx, da, ds]
    }
}

impl<B: StripNormBackend, C: CheckpointStrategy> StripNormBackend for Autodiff<B, C> {
    fn group_moments(x: FloatTensor<Self>, groups: usize) -> FloatTensor<Self> {
        record::<B, C, _, 1>(Moments { groups }, [x])
    }

    fn scale_shift(
        x: FloatTensor<Self>,
        a: FloatTensor<Self>,
        s: FloatTensor<Self>,
        silu: bool,
    ) -> FloatTensor<Self> {
        record::<B, C, _, 3>(ScaleShift { silu }, [x, a, s])
    }
}
