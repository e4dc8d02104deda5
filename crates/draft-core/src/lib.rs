//! DRaFT core: Stable Diffusion components on Burn, their weight loading from diffusers /
//! transformers safetensors, the CLIP tokenizer, DDIM, and sampling.
//!
//! Bytes in, tensors out: nothing here touches the file system, so the crate builds for
//! `wasm32-unknown-unknown` and the browser runs the same code as the native binary.
//!
//! Data path: tokenize → encode text → sample → decode.

pub mod error;
pub mod noise;
pub mod tensor;

pub mod data;
pub mod memory;
pub mod model;
pub mod ops;
pub mod reward;
pub mod train;

pub use error::{Error, Result};
pub use model::files::ModelFiles;
pub use model::pipeline::Pipeline;
pub use tensor::read_f32;
