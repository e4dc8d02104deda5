//! Model modules, one file per component; field names are diffusers'/transformers' names.
pub mod clip;
pub mod clip_text;
pub mod open_clip;
pub mod unet;
pub mod vae;
