//! GEGLU's gating, `h[..., :I] · gelu(h[..., I:])` (diffusers' `GEGLU` after its projection), as
//! one op ([`GegluBackend`], a Burn backend extension):
//!
//! - on the CPU backend (flex), in f32, one kernel of ours: GELU with the vectorised `erf` of
//!   [`crate::ops::cpu_kernels`], the product in the same pass, the rows spread over rayon's threads
//!   (natively). Composed of Burn's primitives it is two slices, flex's `gelu` (libm's `erff`
//!   one element at a time) and a product: a twentieth of a sd1-tiny training step;
//! - elsewhere (CubeCL, where `Fusion` fuses the element-wise work anyway, and other dtypes) the
//!   composed formula;
//! - under autodiff the op keeps only `h` and the backward is
//!   `dvalue = dout·gelu(gate)`, `dgate = gelu'(gate)·dout·value`: on flex in f32 one kernel of
//!   ours as well, elsewhere the backend's GELU and GELU backward.

use crate::ops::extension::{Differentiable, all_kept, record};
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::wgpu::CubeBackend;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, TensorMetadata, backend_extension};
use burn::prelude::*;
use burn::tensor::{DType, Slice, TensorData};

/// `h[..., :I] · gelu(h[..., I:])` for `[B, T, 2I]` `h`: `[B, T, I]`.
pub fn geglu(h: Tensor<3>) -> Tensor<3> {
    Tensor::from_dispatch(<Dispatch as GegluBackend>::geglu(h.into_dispatch()))
}

/// The op, routed to each backend by Burn's backend-extension dispatch.
#[backend_extension(Flex, Cube, Fusion, Autodiff)]
pub trait GegluBackend: Backend {
    /// `h[..., :I] · gelu(h[..., I:])`.
    #[fusion(default)]
    fn geglu(h: FloatTensor<Self>) -> FloatTensor<Self> {
        composed::<Self>(h)
    }

    /// The gradient with respect to `h` for the output gradient `d_out`.
    #[fusion(default)]
    fn geglu_backward(h: FloatTensor<Self>, d_out: FloatTensor<Self>) -> FloatTensor<Self> {
        backward_composed::<Self>(h, d_out)
    }
}

impl GegluBackend for CubeBackend {}

impl GegluBackend for Flex {
    fn geglu(h: FloatTensor<Self>) -> FloatTensor<Self> {
        if h.dtype() != DType::F32 {
            return composed::<Self>(h);
        }
        let mut shape = h.layout().shape().clone();
        let last = shape.num_dims() - 1;
        let inner = shape[last] / 2;
        shape[last] = inner;
        let h = h.to_contiguous();
        let hs: &[f32] = h.as_slice().expect("contiguous");
        let mut out = vec![0f32; shape.num_elements()];
        // Runs of ~16 K outputs (whole rows) per task.
        if let Some(rows) = 16384usize.checked_div(inner) {
            let rows = rows.max(1);
            crate::ops::cpu_kernels::for_each_chunk(
                &mut out,
                rows * inner,
                hs,
                rows * 2 * inner,
                |_, o, hi| crate::ops::cpu_kernels::geglu_rows(o, hi, inner),
            );
        }
        FlexTensor::from_data(TensorData::new(out, shape))
    }

    fn geglu_backward(h: FloatTensor<Self>, d_out: FloatTensor<Self>) -> FloatTensor<Self> {
        if h.dtype() != DType::F32 || d_out.dtype() != DType::F32 {
            return backward_composed::<Self>(h, d_out);
        }
        let shape = h.layout().shape().clone();
        let inner = shape[shape.num_dims() - 1] / 2;
        let (h, d_out) = (h.to_contiguous(), d_out.to_contiguous());
        let hs: &[f32] = h.as_slice().expect("contiguous");
        let ds: &[f32] = d_out.as_slice().expect("contiguous");
        let mut dh = vec![0f32; hs.len()];
        if inner > 0 {
            crate::ops::cpu_kernels::geglu_backward_rows(&mut dh, hs, ds, inner);
        }
        FlexTensor::from_data(TensorData::new(dh, shape))
    }
}

/// The formula in Burn's primitives.
fn composed<B: Backend>(h: FloatTensor<B>) -> FloatTensor<B> {
    let [value, gate] = halves::<B>(h);
    B::float_mul(value, B::gelu(gate))
}

/// [`GegluBackend::geglu_backward`] in Burn's primitives (the backend's GELU backward).
fn backward_composed<B: Backend>(h: FloatTensor<B>, d_out: FloatTensor<B>) -> FloatTensor<B> {
    let [value, gate] = halves::<B>(h);
    let d_value = B::float_mul(d_out.clone(), B::gelu(gate.clone()));
    let d_gate = B::gelu_backward(gate, B::float_mul(d_out, value));
    let last = d_value.shape().num_dims() - 1;
    B::float_cat(vec![d_value, d_gate], last)
}

/// The value and gate halves of `h`'s last dimension.
fn halves<B: Backend>(h: FloatTensor<B>) -> [FloatTensor<B>; 2] {
    let shape = h.shape();
    let last = shape.num_dims() - 1;
    let inner = shape[last] / 2;
    let half = |start: usize| {
        let mut ranges = vec![Slice::new(0, None, 1); shape.num_dims()];
        ranges[last] = Slice::new(start as isize, Some((start + inner) as isize), 1);
        B::float_slice(h.clone(), &ranges)
    };
    [half(0), half(inner)]
}

/// The op, which keeps `h`, its input, for the backward.
#[derive(Clone, Debug)]
struct Geglu;

impl<B: GegluBackend> Differentiable<B, 1> for Geglu {
    fn forward(&self, [h]: [FloatTensor<B>; 1]) -> FloatTensor<B> {
        B::geglu(h)
    }

    fn backward(
        self,
        inputs: [Option<FloatTensor<B>>; 1],
        d_out: FloatTensor<B>,
        _: [bool; 1],
    ) -> [Option<FloatTensor<B>>; 1] {
        let [h] = all_kept(inputs);
        [Some(B::geglu_backward(h, d_out))]
    }
}

impl<B: GegluBackend, C: CheckpointStrategy> GegluBackend for Autodiff<B, C> {
    fn geglu(h: FloatTensor<Self>) -> FloatTensor<Self> {
        record::<B, C, _, 1>(Geglu, [h])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::activation::gelu;

    fn composed(h: Tensor<3>) -> Tensor<3> {
        let inner = h.dims()[2] / 2;
        h.clone().narrow(2, 0, inner) * gelu(h.narrow(2, inner, inner))
    }

    fn input(device: &Device) -> Tensor<3> {
        let values: Vec<f32> = (0..2 * 5 * 14)
            .map(|i| ((i * 37 % 71) as f32 - 35.0) / 9.0)
            .collect();
        Tensor::<1>::from_floats(values.as_slice(), device).reshape([2, 5, 14])
    }

    #[test]
    fn geglu_matches_the_composed_formula_forward_and_backward() {
        let device = Device::flex();
        let (ours, want) = (geglu(input(&device)), composed(input(&device)));
        let diff: f32 = (ours - want.clone()).abs().max().into_scalar();
        let scale: f32 = want.abs().max().into_scalar();
        assert!(diff <= 1e-6 * scale, "forward {diff} of {scale}");

        let weights = Tensor::<3>::ones([2, 5, 7], &device).cumsum(2).autodiff();
        let grad = |f: fn(Tensor<3>) -> Tensor<3>| {
            let h = input(&device).autodiff().require_grad();
            let g = (f(h.clone()) * weights.clone()).sum().backward();
            h.grad(&g).expect("a gradient")
        };
        let (ours, want) = (grad(geglu), grad(composed));
        let diff: f32 = (ours - want.clone()).abs().max().into_scalar();
        let scale: f32 = want.abs().max().into_scalar();
        assert!(diff <= 1e-6 * scale, "backward {diff} of {scale}");
    }
}
