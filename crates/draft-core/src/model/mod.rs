//! The diffusion pipeline: layers (`nn`), weights and their loading (`weights`, `var_builder`,
//! `layouts` for other key layouts, `files` for a pipeline's files as bytes), LoRA adapters
//! (`lora`), the architectures (`models/`: CLIP text and vision towers, OpenCLIP, UNet, VAE),
//! the tokenizer, the DDIM schedule, the sampler, the wired `pipeline`, and `limits` (the
//! largest buffers a pipeline needs at a size, against an adapter's limits). Module fields
//! carry diffusers/transformers names, so that a weight key is the module's path.
//! May use: `memory`, `ops` and the foundation.

pub mod files;
pub mod layouts;
pub mod limits;
pub mod lora;
pub mod models;
pub mod nn;
pub mod pipeline;
pub mod sampler;
pub mod schedule;
pub mod source;
pub mod tokenizer;
pub mod var_builder;
pub mod weights;
