//! Training: the one configuration (`config`: every setting, its default, its check and its
//! words of refusal, resolved defaults ← checkpoint ← file ← flags/page), the methods on the
//! differentiable sampler (`engine`: DRaFT, DRaFT-K, DRaFT-LV, ReFL, AlignProp), the trainer
//! (`trainer`: batches, accumulation, clipping, the optimizer step, the resumable checkpoint),
//! the run policy both shells drive (`run`), the optimizers (`optim`) and the built-in prompt
//! sets (`prompts`).
//! May use: `reward`, `model`, `memory`, `ops` and the foundation.

pub mod config;
pub mod engine;
pub mod optim;
pub mod prompts;
pub mod run;
pub mod trainer;
