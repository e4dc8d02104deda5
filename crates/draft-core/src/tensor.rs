//! Tensor helpers every layer uses: reading a tensor back to the host, casting to a dtype.

use burn::prelude::*;
use burn::tensor::{DType, FloatDType};

use crate::error::{Error, Result};

/// Reads a float tensor back to the host, asynchronously (the only way that works in a
/// browser; native callers block on it).
pub async fn read_f32<const D: usize>(t: Tensor<D>) -> Result<(Vec<f32>, Vec<usize>)> {
    let data = t
        .into_data_async()
        .await
        .map_err(|e| Error::Device(format!("{e:?}")))?;
    let shape = data.shape().to_vec();
    let values = data
        .convert::<f32>()
        .try_into_vec::<f32>()
        .map_err(|e| Error::Device(format!("{e:?}")))?;
    Ok((values, shape))
}

/// `t` in `dtype` (no op when it already is): a bias or a norm's parameters, kept in f32, for
/// activations in f16 ([`crate::model::pipeline::Pipeline::sampling_dtype`]).
pub fn in_dtype<const D: usize>(t: Tensor<D>, dtype: DType) -> Tensor<D> {
    if t.dtype() == dtype {
        t
    } else {
        t.cast(FloatDType::from(dtype))
    }
}

/// Whether `device` is the CPU backend (flex), whose kernels of ours want plain row-major
/// tensors; on CubeCL devices some tensors are kept in another memory order.
pub fn is_cpu(device: &Device) -> bool {
    matches!(
        device.clone().inner().as_dispatch(),
        burn::backend::DispatchDevice::Flex(_)
    )
}

/// A `[out, in, kh, kw]` convolution weight held in `[out, kh, kw, in]` memory order on
/// CubeCL devices (the logical shape is unchanged). Burn's convolutions there run on
/// channels-last operands and copy a weight whose input channels are not contiguous on every
/// call; in this order the copy is skipped. Unchanged on the CPU and for 1×1 kernels (already
/// contiguous over the input channels).
pub fn conv_weight_channels_last(w: Tensor<4>) -> Tensor<4> {
    let [o, i, kh, kw] = w.dims();
    if kh * kw == 1 || is_cpu(&w.device()) {
        return w;
    }
    w.permute([0, 2, 3, 1])
        .reshape([o, kh * kw * i])
        .reshape([o, kh, kw, i])
        .permute([0, 3, 1, 2])
}
