//! What a WebGPU adapter can hold: each weight tensor becomes one storage buffer, which a
//! shader can bind only up to the adapter's `maxStorageBufferBindingSize` (128 MiB by default).
//! Checked from the safetensors headers alone, before any weight is uploaded.

use crate::error::{Error, Result};
use crate::models::unet::UNet2DConditionConfig;
use crate::pipeline::ModelFiles;

const MIB: f64 = 1024.0 * 1024.0;

/// Refuses the first tensor of `files` larger than `max_binding_bytes` as the runtime holds it
/// (f32: elements × 4, whatever the dtype on disk), naming `what`, the file and the tensor.
/// Reads every `.safetensors` file, and PyTorch-named files a shell converted to safetensors
/// (`.bin`, `.pt`, `.pth`, `.ckpt` whose header reads as safetensors).
pub fn check_tensor_sizes(what: &str, files: &ModelFiles, max_binding_bytes: u64) -> Result<()> {
    for (name, bytes) in &files.files {
        let lower = name.to_ascii_lowercase();
        if lower.ends_with(".safetensors") {
            check_file_tensor_sizes(what, name, bytes, max_binding_bytes).map_err(|e| match e {
                Error::Safetensors { reason, .. } => Error::Safetensors {
                    file: files.display(name),
                    reason,
                },
                e => e,
            })?;
        } else if [".bin", ".pt", ".pth", ".ckpt"]
            .iter()
            .any(|ext| lower.ends_with(ext))
            && safetensors::SafeTensors::read_metadata(bytes).is_ok()
        {
            check_file_tensor_sizes(what, name, bytes, max_binding_bytes)?;
        }
    }
    Ok(())
}

/// [`check_tensor_sizes`] for a single safetensors file `name`.
pub fn check_file_tensor_sizes(
    what: &str,
    name: &str,
    bytes: &[u8],
    max_binding_bytes: u64,
) -> Result<()> {
    let (_, metadata) =
        safetensors::SafeTensors::read_metadata(bytes).map_err(|e| Error::Safetensors {
            file: name.to_string(),
            reason: e.to_string(),
        })?;
    let tensors = metadata.tensors();
    for key in metadata.offset_keys() {
        let shape = &tensors[&key].shape;
        let size = shape.iter().fold(4u64, |n, &d| n.saturating_mul(d as u64));
        if size > max_binding_bytes {
            return Err(Error::Input(format!(
                "{what}: {name}: tensor {key} {shape:?} needs {:.1} MiB, over this adapter's maxStorageBufferBindingSize of {:.1} MiB",
                size as f64 / MIB,
                max_binding_bytes as f64 / MIB
            )));
        }
    }
    Ok(())
}

/// The largest attention-score matrix a training update materialises: self-attention at the
/// highest resolution that has attention, `[batch × 2 (classifier-free guidance), heads, N, N]`
/// with N the latent pixels there (Burn's attention keeps it for the backward pass). Returns a
/// description, the shape and its bytes in f32; `None` when the UNet has no attention.
pub fn attention_scores(
    unet: &UNet2DConditionConfig,
    latent_hw: [usize; 2],
    batch: usize,
) -> Result<Option<(String, [usize; 4], u64)>> {
    let resolved = unet.resolve("unet/config.json")?;
    let mut best: Option<(String, [usize; 4], u64)> = None;
    for (i, kind) in unet.down_block_types.iter().enumerate() {
        if !kind.contains("CrossAttn") {
            continue;
        }
        let n = (latent_hw[0] >> i).max(1) * (latent_hw[1] >> i).max(1);
        let shape = [batch * 2, resolved.num_heads[i], n, n];
        let bytes = shape.iter().fold(4u64, |b, &d| b.saturating_mul(d as u64));
        if best.as_ref().is_none_or(|b| bytes > b.2) {
            best = Some((
                format!("down_blocks.{i} self-attention scores"),
                shape,
                bytes,
            ));
        }
    }
    Ok(best)
}

/// Refuses a training batch whose [`attention_scores`] exceed `max_binding_bytes`.
pub fn check_attention(
    unet: &UNet2DConditionConfig,
    latent_hw: [usize; 2],
    batch: usize,
    max_binding_bytes: u64,
) -> Result<()> {
    match attention_scores(unet, latent_hw, batch)? {
        Some((what, shape, bytes)) if bytes > max_binding_bytes => Err(Error::Input(format!(
            "a batch of {batch} at {}×{} latents: the UNet's {what} {shape:?} need {:.1} MiB, over this adapter's maxStorageBufferBindingSize of {:.1} MiB; lower the batch or the resolution",
            latent_hw[0],
            latent_hw[1],
            bytes as f64 / MIB,
            max_binding_bytes as f64 / MIB
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::{serialize, serialize_f32};
    use safetensors::Dtype;

    fn folder() -> ModelFiles {
        let mut files = ModelFiles::new("clip-folder");
        let small = serialize_f32(&[("a.weight".into(), vec![4, 4], vec![0.0; 16])], None).unwrap();
        // f16 on disk, f32 in the runtime: 64 elements = 256 bytes held.
        let half = serialize(
            &[(
                "text_model.embeddings.token_embedding.weight".into(),
                Dtype::F16,
                vec![16, 4],
                vec![0; 128],
            )],
            None,
        )
        .unwrap();
        files.insert("config.json", b"{}".to_vec());
        files.insert("model.safetensors", half);
        files.insert("extra.safetensors", small);
        files
    }

    #[test]
    fn tensors_under_the_limit_pass() {
        check_tensor_sizes("CLIP folder", &folder(), 256).unwrap();
        let bytes = serialize_f32(&[("w".into(), vec![3], vec![1.0; 3])], None).unwrap();
        check_file_tensor_sizes("aesthetic MLP", "mlp.safetensors", &bytes, 12).unwrap();
    }

    #[test]
    fn a_tensor_over_the_limit_is_refused_by_name() {
        let err = check_tensor_sizes("CLIP folder", &folder(), 255)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "CLIP folder: model.safetensors: tensor text_model.embeddings.token_embedding.weight \
             [16, 4] needs 0.0 MiB, over this adapter's maxStorageBufferBindingSize of 0.0 MiB"
        );
        let bytes = serialize_f32(&[("w".into(), vec![3], vec![1.0; 3])], None).unwrap();
        let err = check_file_tensor_sizes("aesthetic MLP", "mlp.safetensors", &bytes, 11)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("aesthetic MLP: mlp.safetensors: tensor w [3] needs"),
            "{err}"
        );
    }

    #[test]
    fn sizes_are_reported_in_mib() {
        // The header alone is read: a real-sized shape needs no real data behind it here, so
        // build the file by hand (49408 × 768 as in CLIP ViT-L/14's token embedding, u8 on
        // disk to keep it small, f32 in the runtime).
        let header = r#"{"text_model.embeddings.token_embedding.weight":{"dtype":"U8","shape":[49408,768],"data_offsets":[0,37945344]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.resize(bytes.len() + 37_945_344, 0);
        let err = check_file_tensor_sizes("CLIP folder", "model.safetensors", &bytes, 128 << 20)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "CLIP folder: model.safetensors: tensor text_model.embeddings.token_embedding.weight \
             [49408, 768] needs 144.8 MiB, over this adapter's maxStorageBufferBindingSize of 128.0 MiB"
        );
        check_file_tensor_sizes("CLIP folder", "model.safetensors", &bytes, 152 << 20).unwrap();
    }

    #[test]
    fn an_unreadable_weights_file_names_its_folder() {
        let mut files = ModelFiles::new("dir");
        files.insert("model.safetensors", b"junk".to_vec());
        // A PyTorch pickle left as it is (no header) is not this check's business.
        files.insert("pytorch_model.bin", b"PK\x03\x04".to_vec());
        let err = check_tensor_sizes("CLIP folder", &files, 1 << 20)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("dir/model.safetensors: "), "{err}");
        files.files.remove("model.safetensors");
        check_tensor_sizes("CLIP folder", &files, 1 << 20).unwrap();
    }

    #[test]
    fn sd1_attention_at_512_is_over_the_default_binding_limit() {
        let json = r#"{"sample_size": 64, "block_out_channels": [320, 640, 1280, 1280],
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "attention_head_dim": 8, "cross_attention_dim": 768}"#;
        let unet = UNet2DConditionConfig::from_json("unet/config.json", json).unwrap();
        let (what, shape, bytes) = attention_scores(&unet, [64, 64], 1).unwrap().unwrap();
        assert_eq!(shape, [2, 8, 4096, 4096]);
        assert_eq!(bytes, 1 << 30);
        assert!(what.starts_with("down_blocks.0"), "{what}");
        let err = check_attention(&unet, [64, 64], 1, 128 << 20)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("1024.0 MiB") && err.contains("128.0 MiB"),
            "{err}"
        );
        // 32×32 latents (256²): [2, 8, 1024, 1024] = 64 MiB fits.
        check_attention(&unet, [32, 32], 1, 128 << 20).unwrap();
    }
}
