//! Differentiable rewards on images: the weight-free ones and the weighted sum of terms
//! (`builtin`), the learned reward models — LAION aesthetic, CLIP score, PickScore, HPSv2 —
//! (`models`), and the reading of their weight files (`files`).
//! May use: `model`, `memory`, `ops` and the foundation.

pub mod builtin;
pub mod files;
pub mod models;
