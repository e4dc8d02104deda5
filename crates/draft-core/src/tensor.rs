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
