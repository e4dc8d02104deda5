//! Kernels and Burn backend extensions: the operations the models are written in, where Burn's
//! own are too slow or keep too much for the backward.
//!
//! `cpu_kernels` (vectorised exp/erf/softmax/moments, chosen per CPU at run time), `gemm` (the
//! matrix products: Linear, attention, convolution) and `conv` (our convolution on the CPU
//! backend) are plain slice code; the others — `attention`, `group_norm`, `geglu`,
//! `stored_weight` — are ops with their own backward (`burn-backend-extension`), dispatching to
//! those kernels on the CPU and to Burn's on a GPU, each recorded on the autodiff graph by
//! `extension` (the op's settings, forward and backward as one `Differentiable`).
//! May use: the crate's foundation (`error`, `noise`, `tensor`) and nothing above it.

pub mod attention;
pub mod conv;
pub mod cpu_kernels;
mod extension;
pub mod geglu;
pub mod gemm;
pub mod group_norm;
pub mod stored_weight;
