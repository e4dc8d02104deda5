//! Linear and Conv2d ops whose backward keeps the weight as stored and nothing else it does
//! not need.
//!
//! With weights stored in f16 (`--weights-dtype f16`), casting the weight with Burn's `cast` and
//! then `matmul` / `conv2d` computes the same values, but under autodiff the matmul and the
//! convolution keep their f32 operand for the backward pass (and Burn's `Cast` is
//! compute-bound, so checkpointing keeps it as well): a recomputed UNet step then held an f32
//! copy of every weight it used, more memory than f32 weights. Burn's convolution also keeps
//! its input, which the input's gradient does not need (only its shape) when the weight is
//! frozen. The two ops here ([`StoredWeightBackend`], a Burn backend extension with a
//! handwritten `Autodiff` implementation) keep the stored weight, cast it again in the backward
//! pass, and keep the input only when the weight itself is tracked (`draft pretrain`), whose
//! gradient is then returned in the weight's dtype.
//!
//! For f32 weights the forward is Burn's `matmul` / `conv2d` unchanged and the input's gradient
//! is Burn's own formula (`dY · Wᵀ`, `conv2d_x_backward`), so only what is kept changes.

use crate::ops::extension::{Differentiable, record};
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::tensor::FloatTensor;
use burn::backend::wgpu::CubeBackend;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, TensorMetadata, backend_extension};
use burn::prelude::*;
use burn::tensor::FloatDType;
use burn::tensor::ops::ConvOptions;

/// `x · w` for `[.., in]` x and a stored `[in, out]` weight, computed in x's dtype.
pub fn matmul_stored<const D: usize>(x: Tensor<D>, w: Tensor<2>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as StoredWeightBackend>::matmul_stored(
        x.into_dispatch(),
        w.into_dispatch(),
    ))
}

/// `conv2d(x, w)` (no bias) for a stored `[out, in, k, k]` weight, in x's dtype (computed in
/// f32 for half-precision x, as `conv_forward` says).
pub fn conv2d_stored(x: Tensor<4>, w: Tensor<4>, options: ConvOptions<2>) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as StoredWeightBackend>::conv2d_stored(
        x.into_dispatch(),
        w.into_dispatch(),
        options,
    ))
}

/// The two ops, routed to each backend by Burn's backend-extension dispatch; every backend but
/// autodiff runs the default bodies (cast, then Burn's op).
#[backend_extension(Flex, Cube, Fusion, Autodiff)]
pub trait StoredWeightBackend: Backend {
    #[fusion(default)]
    fn matmul_stored(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        matmul_forward::<Self>(x, w)
    }

    #[fusion(default)]
    fn conv2d_stored(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        conv_forward::<Self>(x, w, options)
    }

    /// The gradient of `conv2d(x, w)` with respect to an x of shape `x_shape`, for the output
    /// gradient `dy` (Burn's `conv2d_x_backward`, which needs x's shape only).
    #[fusion(default)]
    fn conv2d_stored_x_backward(
        x_shape: Shape,
        w: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        conv_x_backward_burn::<Self>(x_shape, w, dy, options)
    }
}

/// Burn's `conv2d_x_backward` for an input of shape `x_shape` (its values are not used).
pub(crate) fn conv_x_backward_burn<B: Backend>(
    x_shape: Shape,
    w: FloatTensor<B>,
    dy: FloatTensor<B>,
    options: ConvOptions<2>,
) -> FloatTensor<B> {
    let x = B::float_empty(x_shape, &dy.device(), dy.dtype().into());
    B::conv2d_x_backward(x, w, dy, options)
}

/// The CPU backend: f32 matrix products by [`crate::ops::gemm`] and convolutions by
/// [`crate::ops::conv`], the rest as every backend.
impl StoredWeightBackend for Flex {
    fn matmul_stored(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        use burn::backend::flex::FlexTensor;
        use burn::tensor::{DType, TensorData};
        let f32s = x.dtype() == DType::F32 && w.dtype() == DType::F32;
        if !(f32s && w.layout().has_positive_strides()) {
            return matmul_forward::<Self>(x, w);
        }
        let mut shape = x.layout().shape().clone();
        let last = shape.num_dims() - 1;
        let d_in = shape[last];
        let rows = shape.num_elements() / d_in.max(1);
        let d_out = w.layout().shape()[1];
        assert_eq!(
            w.layout().shape()[0],
            d_in,
            "matmul_stored: a [.., {d_in}] x times a {:?} weight",
            w.layout().shape()
        );
        let x = x.to_contiguous();
        let (w_start, s) = (w.layout().start_offset(), w.layout().strides());
        let values = crate::ops::gemm::matmul(
            x.as_slice().expect("contiguous"),
            [rows, d_in],
            &w.storage::<f32>()[w_start..],
            [s[0], s[1]],
            d_out,
        );
        shape[last] = d_out;
        FlexTensor::from_data(TensorData::new(values, shape))
    }

    fn conv2d_stored(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        use burn::backend::flex::FlexTensor;
        use burn::tensor::{DType, TensorData};
        let f32s = x.dtype() == DType::F32 && w.dtype() == DType::F32;
        if !(f32s && crate::ops::conv::supports(&options)) {
            return conv_forward::<Self>(x, w, options);
        }
        let ([n, c, h, wd], [o, _, kh, kw]) = (dims4(&x), dims4(&w));
        let (x, w) = (x.to_contiguous(), w.to_contiguous());
        let (values, shape) = crate::ops::conv::conv2d(
            x.as_slice().expect("contiguous"),
            [n, c, h, wd],
            w.as_slice().expect("contiguous"),
            [o, kh, kw],
            &options,
        );
        FlexTensor::from_data(TensorData::new(values, shape))
    }

    /// With stride 1, in f32: the convolution of `dy` with the kernel transposed and flipped
    /// ([`crate::ops::conv::x_gradient`]); otherwise Burn's.
    fn conv2d_stored_x_backward(
        x_shape: Shape,
        w: FloatTensor<Self>,
        dy: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        use burn::backend::flex::FlexTensor;
        use burn::tensor::{DType, TensorData};
        let f32s = dy.dtype() == DType::F32 && w.dtype() == DType::F32;
        let x_dims = [x_shape[0], x_shape[1], x_shape[2], x_shape[3]];
        if !(f32s && crate::ops::conv::x_gradient_supported(&options, dims4(&w), x_dims)) {
            return conv_x_backward_burn::<Self>(x_shape, w, dy, options);
        }
        let (w, dy) = (w.to_contiguous(), dy.to_contiguous());
        let values = crate::ops::conv::x_gradient(
            dy.as_slice().expect("contiguous"),
            dims4(&dy),
            w.as_slice().expect("contiguous"),
            dims4(&w),
            x_dims,
            &options,
        );
        FlexTensor::from_data(TensorData::new(values, x_dims))
    }
}
impl StoredWeightBackend for CubeBackend {}

fn as_dtype<B: Backend>(t: FloatTensor<B>, dtype: FloatDType) -> FloatTensor<B> {
    if FloatDType::from(t.dtype()) == dtype {
        t
    } else {
        B::float_cast(t, dtype)
    }
}

/// The sizes of a 4-d flex tensor.
fn dims4(t: &burn::backend::flex::FlexTensor) -> [usize; 4] {
    let s = t.layout().shape();
    [s[0], s[1], s[2], s[3]]
}

/// `conv2d(x, w)` in x's dtype; for half-precision x (activations in f16) computed in f32 and
/// rounded once: Burn 0.22.1's direct convolution kernel on CubeCL accumulates in the tensor's
/// dtype, which measured 5× the error of diffusers' float16 UNet on lavapipe
/// (docs/parity.md, "f16 sampling"); its matmuls accumulate in f32 whatever the inputs.
pub(crate) fn conv_forward<B: Backend>(
    x: FloatTensor<B>,
    w: FloatTensor<B>,
    options: ConvOptions<2>,
) -> FloatTensor<B> {
    let dtype: FloatDType = x.dtype().into();
    if dtype == FloatDType::F32 {
        let w = as_dtype::<B>(w, dtype);
        return B::conv2d(x, w, None, options);
    }
    let x = as_dtype::<B>(x, FloatDType::F32);
    let w = as_dtype::<B>(w, FloatDType::F32);
    as_dtype::<B>(B::conv2d(x, w, None, options), dtype)
}

/// `[.., in] · [in, out]` through a 2-d matmul.
fn matmul_forward<B: Backend>(x: FloatTensor<B>, w: FloatTensor<B>) -> FloatTensor<B> {
    let w = as_dtype::<B>(w, x.dtype().into());
    let shape = x.shape();
    let d_in = shape[shape.num_dims() - 1];
    let rows = shape.num_elements() / d_in.max(1);
    let d_out = w.shape()[1];
    if shape.num_dims() == 2 {
        // Already `[rows, in]`: no reshape around the product (one would keep Burn's fusion
        // from joining what follows it to the product).
        return B::float_matmul(x, w);
    }
    let y = B::float_matmul(B::float_reshape(x, Shape::new([rows, d_in])), w);
    let mut out = shape.clone();
    let last = out.num_dims() - 1;
    out[last] = d_out;
    B::float_reshape(y, out)
}

/// [`matmul_stored`]'s settings: x's shape. Its backward keeps the stored weight, and x only
/// where the weight's own gradient is wanted.
#[derive(Clone, Debug)]
struct MatmulStored {
    x_shape: Shape,
}

impl<B: StoredWeightBackend> Differentiable<B, 2> for MatmulStored {
    fn keep(&self, [_, w_tracked]: [bool; 2]) -> [bool; 2] {
        [w_tracked, true]
    }

    fn forward(&self, [x, w]: [FloatTensor<B>; 2]) -> FloatTensor<B> {
        B::matmul_stored(x, w)
    }

    fn backward(
        self,
        [x, w]: [Option<FloatTensor<B>>; 2],
        dy: FloatTensor<B>,
        [want_x, want_w]: [bool; 2],
    ) -> [Option<FloatTensor<B>>; 2] {
        let (w, x_shape) = (w.expect("the stored weight"), self.x_shape);
        let compute: FloatDType = dy.dtype().into();
        let d_out = dy.shape()[dy.shape().num_dims() - 1];
        let d_in = x_shape[x_shape.num_dims() - 1];
        let rows = x_shape.num_elements() / d_in.max(1);
        let dy2 = B::float_reshape(dy, Shape::new([rows, d_out]));
        let dw = x.filter(|_| want_w).map(|x| {
            let x2 = B::float_reshape(x, Shape::new([rows, d_in]));
            let dw = B::float_matmul(B::float_swap_dims(x2, 0, 1), dy2.clone());
            as_dtype::<B>(dw, w.dtype().into())
        });
        let dx = want_x.then(|| {
            let wt = B::float_swap_dims(as_dtype::<B>(w, compute), 0, 1);
            B::float_reshape(B::float_matmul(dy2, wt), x_shape)
        });
        [dx, dw]
    }
}

/// [`conv2d_stored`]'s settings: x's shape and the options. Its backward keeps the stored
/// weight, and x only where the weight's own gradient is wanted.
#[derive(Clone, Debug)]
struct Conv2dStored {
    x_shape: Shape,
    options: ConvOptions<2>,
}

impl<B: StoredWeightBackend> Differentiable<B, 2> for Conv2dStored {
    fn keep(&self, [_, w_tracked]: [bool; 2]) -> [bool; 2] {
        [w_tracked, true]
    }

    fn forward(&self, [x, w]: [FloatTensor<B>; 2]) -> FloatTensor<B> {
        B::conv2d_stored(x, w, self.options.clone())
    }

    fn backward(
        self,
        [x, w]: [Option<FloatTensor<B>>; 2],
        dy: FloatTensor<B>,
        [want_x, want_w]: [bool; 2],
    ) -> [Option<FloatTensor<B>>; 2] {
        let Self { x_shape, options } = self;
        let w = w.expect("the stored weight");
        let compute: FloatDType = dy.dtype().into();
        let stored: FloatDType = w.dtype().into();
        let w32 = as_dtype::<B>(w, compute);
        let dw = x.filter(|_| want_w).map(|x| {
            let dw = B::conv2d_weight_backward(x, w32.clone(), dy.clone(), options.clone());
            as_dtype::<B>(dw, stored)
        });
        // The input's values are not needed for its gradient, only its shape.
        let dx = want_x.then(|| B::conv2d_stored_x_backward(x_shape, w32, dy, options));
        [dx, dw]
    }
}

impl<B: StoredWeightBackend, C: CheckpointStrategy> StoredWeightBackend for Autodiff<B, C> {
    fn matmul_stored(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        let op = MatmulStored { x_shape: x.shape() };
        record::<B, C, _, 2>(op, [x, w])
    }

    fn conv2d_stored(
        x: FloatTensor<Self>,
        w: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        let op = Conv2dStored {
            x_shape: x.shape(),
            options,
        };
        record::<B, C, _, 2>(op, [x, w])
    }
}
