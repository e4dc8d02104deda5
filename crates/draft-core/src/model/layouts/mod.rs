//! Other layouts of the same weights, mapped onto the diffusers / transformers names the modules
//! are built from. One table per layout: a transformers-5 text encoder ([`text_model_prefix`]),
//! the single-file LDM checkpoints of A1111 / ComfyUI ([`ldm`]), kohya LoRA files ([`kohya`]).

pub mod kohya;
pub mod ldm;

use crate::error::Result;
use crate::model::weights::Weights;

/// A `CLIPTextModel` state dict as transformers ≥ 5 saves it — `embeddings.…`, `encoder.…`,
/// `final_layer_norm.…` without transformers 4's `text_model.` — read under the
/// `text_model.` keys (a `CLIPTextModelWithProjection`'s `text_projection.weight` stays where
/// it is, beside `text_model`). A state dict that has them (or neither form) is returned as it
/// is.
pub fn text_model_prefix(w: Weights<'_>) -> Result<Weights<'_>> {
    let v5 = !w.contains("text_model.embeddings.token_embedding.weight")
        && w.contains("embeddings.token_embedding.weight");
    if !v5 {
        return Ok(w);
    }
    w.renamed(|k| {
        Some(match k.starts_with("text_projection.") {
            true => k.to_string(),
            false => format!("text_model.{k}"),
        })
    })
}
