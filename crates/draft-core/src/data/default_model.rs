//! The embedded default model: `shapes-32`, a pixel-space text-to-image model (UNet + CLIP text
//! encoder, diffusers layout) that `draft pretrain` trained on the procedural shapes dataset.
//! Its files are compiled into the library, so the CLI and the browser need no download and
//! no path; `docs/default-model.md` has the command that made it and its figures.

use crate::model::files::ModelFiles;

/// How the embedded model is named in messages.
pub const NAME: &str = "shapes-32 (embedded)";

/// Training defaults for the embedded model, shared by the CLI and the page: the 1M-parameter
/// model needs a larger step than SD-sized models (the paper's 4e-4) to move in a few minutes
/// on a CPU, and the main job's time budget sets the number of updates and evaluations.
pub const TRAIN_LR: f64 = 3e-3;
pub const TRAIN_STEPS: usize = 50;
pub const EVAL_EVERY: usize = 25;
/// The built-in prompt set the embedded model is trained on.
pub const PROMPT_SET: &str = "shapes";
/// The same, as the defaults layer of `train::config::resolve` (fresh runs of the embedded
/// model, in the CLI and the page).
pub const TRAIN_DEFAULTS: crate::train::config::ModelDefaults =
    crate::train::config::ModelDefaults {
        lr: TRAIN_LR,
        train_steps: TRAIN_STEPS,
        eval_every: EVAL_EVERY,
        prompt_set: PROMPT_SET,
    };

macro_rules! embedded {
    ($($path:literal),* $(,)?) => {
        &[$(($path, include_bytes!(concat!("../../assets/shapes-32/", $path)) as &[u8])),*]
    };
}

const FILES: &[(&str, &[u8])] = embedded!(
    "model_index.json",
    "unet/config.json",
    "unet/diffusion_pytorch_model.safetensors",
    "text_encoder/config.json",
    "text_encoder/model.safetensors",
    "tokenizer/tokenizer.json",
    "tokenizer/tokenizer_config.json",
    "scheduler/scheduler_config.json",
);

/// The embedded model's files, ready for [`crate::Pipeline::load`].
pub fn files() -> ModelFiles {
    let mut files = ModelFiles::new(NAME);
    for (path, bytes) in FILES {
        files.insert(*path, bytes.to_vec());
    }
    files
}
