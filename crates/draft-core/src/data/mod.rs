//! The embedded default model and what made it: the procedural shapes dataset (`shapes`), its
//! pretraining (`pretrain`), and the model's files compiled into the library
//! (`default_model`).
//! May use: every layer below (`train` for the optimizer and the seed streams).

pub mod default_model;
pub mod pretrain;
pub mod shapes;
