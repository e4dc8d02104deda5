//! DRaFT core: Stable Diffusion components on Burn, their weight loading from diffusers /
//! transformers safetensors, the CLIP tokenizer, DDIM, and sampling.
//!
//! Bytes in, tensors out: nothing here touches the file system, so the crate builds for
//! `wasm32-unknown-unknown` and the browser runs the same code as the native binary.
//!
//! Data path: tokenize → encode text → sample → decode.

pub mod attention;
pub mod checkpoint;
pub mod cpu_conv;
pub mod cpu_kernels;
pub mod default_model;
pub mod engine;
pub mod error;
pub mod geglu;
pub mod group_norm;
pub mod layouts;
pub mod limits;
pub mod lora;
pub mod models;
pub mod nn;
pub mod noise;
pub mod optim;
pub mod pipeline;
pub mod pretrain;
pub mod reward;
pub mod reward_files;
pub mod reward_models;
pub mod run;
pub mod sampler;
pub mod schedule;
pub mod shapes;
pub mod stored_weight;
pub mod strips;
pub mod tokenizer;
pub mod train;
pub mod var_builder;
pub mod weights;

pub use error::{Error, Result};
pub use pipeline::{ModelFiles, Pipeline};

use burn::prelude::*;

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
