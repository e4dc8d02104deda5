//! Training: the one configuration (`config`: every setting, its default, its check and its
//! words of refusal, resolved defaults ← checkpoint ← file ← flags/page), the methods on the
//! differentiable sampler (`engine`: DRaFT, DRaFT-K, DRaFT-LV, ReFL, AlignProp), the trainer
//! (`trainer`: batches, accumulation, clipping, the optimizer step, the resumable checkpoint),
//! the run policy both shells drive (`run`) and the optimizers (`optim`).
//! May use: `reward`, `model`, `memory`, `ops` and the foundation.

pub mod config;
pub mod engine;
pub mod optim;
pub mod run;
pub mod trainer;
