//! What a WebGPU adapter can hold: each weight tensor becomes one storage buffer, which a
//! shader can bind only up to the adapter's `maxStorageBufferBindingSize` (128 MiB by default).
//! Checked from the safetensors headers alone, before any weight is uploaded.

use crate::error::{Error, Result};
use crate::model::files::ModelFiles;
use crate::model::models::unet::UNet2DConditionConfig;
use crate::model::models::vae::AutoencoderKLConfig;

const MIB: f64 = 1024.0 * 1024.0;

/// Refuses the first tensor of `files` larger than `max_binding_bytes` as the runtime holds it
/// (f32: elements × 4, whatever the dtype on disk), naming `what`, the file and the tensor.
/// Reads every `.safetensors` file, and PyTorch-named files a shell converted to safetensors
/// (`.bin`, `.pt`, `.pth`, `.ckpt` whose header reads as safetensors).
pub fn check_tensor_sizes(what: &str, files: &ModelFiles, max_binding_bytes: u64) -> Result<()> {
    // Weights read by range: their headers alone.
    for (name, source) in &files.sources {
        let display = files.display(name);
        let header = crate::model::source::SafetensorsHeader::read(&display, &**source)?;
        check_metadata_tensor_sizes(what, &display, &header.metadata, max_binding_bytes)?;
    }
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

/// The parameters a model's weight files hold, from their headers alone: the count and the
/// largest tensor (`file: key`, elements). An LDM checkpoint's EMA copy (`model_ema.*`), which
/// no pipeline loads, is left out.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WeightCount {
    pub elements: u64,
    pub largest: Option<(String, u64)>,
}

/// [`WeightCount`] of every `.safetensors` weight file of `files` (bytes or sources).
pub fn count_weights(files: &ModelFiles) -> Result<WeightCount> {
    let mut count = WeightCount::default();
    let mut add = |file: String, metadata: &safetensors::tensor::Metadata| {
        for (key, info) in metadata.tensors() {
            if key.starts_with("model_ema.") {
                continue;
            }
            let n = info
                .shape
                .iter()
                .fold(1u64, |n, &d| n.saturating_mul(d as u64));
            count.elements = count.elements.saturating_add(n);
            if count.largest.as_ref().is_none_or(|(_, m)| n > *m) {
                count.largest = Some((format!("{file}: {key}"), n));
            }
        }
    };
    for (name, source) in &files.sources {
        let display = files.display(name);
        let header = crate::model::source::SafetensorsHeader::read(&display, &**source)?;
        add(display, &header.metadata);
    }
    for (name, bytes) in &files.files {
        if name.to_ascii_lowercase().ends_with(".safetensors") {
            let (_, metadata) =
                safetensors::SafeTensors::read_metadata(bytes).map_err(|e| Error::Safetensors {
                    file: files.display(name),
                    reason: e.to_string(),
                })?;
            add(files.display(name), &metadata);
        }
    }
    Ok(count)
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
    check_metadata_tensor_sizes(what, name, &metadata, max_binding_bytes)
}

/// [`check_file_tensor_sizes`] from a header already read.
fn check_metadata_tensor_sizes(
    what: &str,
    name: &str,
    metadata: &safetensors::tensor::Metadata,
    max_binding_bytes: u64,
) -> Result<()> {
    let tensors = metadata.tensors();
    for key in metadata.offset_keys() {
        let shape = &tensors[&key].shape;
        let size = shape.iter().fold(4u64, |n, &d| n.saturating_mul(d as u64));
        // Token embedding tables load as blocks of rows (crate::model::nn::Embedding).
        let block = match shape[..] {
            [rows, cols] if key.ends_with("token_embedding.weight") => {
                let block_rows = crate::model::nn::Embedding::block_rows(cols);
                (rows > block_rows).then_some((block_rows, 4 * (block_rows * cols) as u64))
            }
            _ => None,
        };
        let (held, per) = match block {
            Some((rows, bytes)) => (bytes, format!(" per block of {rows} rows")),
            None => (size, String::new()),
        };
        if held > max_binding_bytes {
            return Err(Error::Input(format!(
                "{what}: {name}: tensor {key} {shape:?} needs {:.1} MiB{per}, over this adapter's maxStorageBufferBindingSize of {:.1} MiB",
                held as f64 / MIB,
                max_binding_bytes as f64 / MIB
            )));
        }
    }
    Ok(())
}

/// One tensor a training update materialises: what it is, its shape, its bytes in f32.
#[derive(Debug, Clone, PartialEq)]
pub struct Activation {
    pub what: String,
    pub shape: Vec<usize>,
    pub bytes: u64,
}

impl Activation {
    fn new(what: String, shape: Vec<usize>) -> Self {
        let bytes = shape.iter().fold(4u64, |b, &d| b.saturating_mul(d as u64));
        Self { what, shape, bytes }
    }
}

/// The largest tensors of a training update on `batch` images at `latent_hw` latents (the UNet
/// runs on `2 × batch` for classifier-free guidance), one per kind, largest first:
///
/// - a block of self-attention scores at the highest resolution with attention,
///   `[2·batch, heads, rows, N]` with the rows of [`crate::ops::attention::block_rows`] (the whole
///   N×N matrix never exists: see [`crate::ops::attention`]);
/// - the UNet's feed-forward (GEGLU) projection there, `[2·batch, tokens, 8·channels]`, over
///   chunks of tokens where the whole would pass [`crate::memory::strips::MAX_BUFFER_BYTES`]
///   ([`FeedForward::forward`](crate::model::models::unet::transformer::FeedForward::forward));
/// - with `vae`, the VAE decoder's largest activation with a `decoder_budget` of
///   [`crate::Pipeline::max_buffer_bytes`]: a resnet's or an upsampler's whole tensor where it
///   fits the budget, else one strip of rows with its halo rows and padding columns
///   ([`crate::memory::strips`]).
pub fn largest_activations(
    unet: &UNet2DConditionConfig,
    vae: Option<&AutoencoderKLConfig>,
    latent_hw: [usize; 2],
    batch: usize,
    decoder_budget: u64,
) -> Result<Vec<Activation>> {
    let resolved = unet.resolve("unet/config.json")?;
    let mut out = Vec::new();
    // The highest resolution with attention is the first cross-attention down block.
    if let Some(i) = unet
        .down_block_types
        .iter()
        .position(|kind| kind.contains("CrossAttn"))
    {
        let n = (latent_hw[0] >> i).max(1) * (latent_hw[1] >> i).max(1);
        let heads = resolved.num_heads[i];
        let rows = crate::ops::attention::block_rows(2 * batch * heads, n).min(n);
        out.push(Activation::new(
            format!("down_blocks.{i} self-attention scores (a block of {rows} of {n} query rows)"),
            vec![2 * batch, heads, rows, n],
        ));
        let width = 8 * unet.block_out_channels[i];
        let tokens = crate::model::models::unet::transformer::FeedForward::chunk_tokens(
            2 * batch,
            width,
            crate::memory::strips::MAX_BUFFER_BYTES,
        );
        out.push(if tokens >= n {
            Activation::new(
                format!("down_blocks.{i} feed-forward projection"),
                vec![2 * batch, n, width],
            )
        } else {
            Activation::new(
                format!(
                    "down_blocks.{i} feed-forward projection (a chunk of {tokens} of {n} tokens)"
                ),
                vec![2 * batch, tokens, width],
            )
        });
    }
    if let Some(vae) = vae {
        let channels: Vec<usize> = vae.block_out_channels.iter().rev().copied().collect();
        let [mut h, mut w] = latent_hw;
        let mut c_prev = channels[0];
        let mut best: Option<Activation> = None;
        // A layer mapping [batch, _, h, w] to `up`× the rows and columns of `c` channels.
        let mut consider = |what: String, c: usize, up: usize, h: usize, w: usize| {
            // The decoder's own rule (models::vae): whole when its rows fit a strip.
            let rows = crate::memory::strips::max_rows([batch, c, h, w], 4, c, up, decoder_budget);
            let a = if rows >= h {
                Activation::new(what, vec![batch, c, h * up, w * up])
            } else {
                Activation::new(
                    format!(
                        "{what}, a strip of {} of {} rows with its halo",
                        rows * up,
                        h * up
                    ),
                    vec![batch, c, rows * up + 2, w * up + 2],
                )
            };
            if best.as_ref().is_none_or(|b| a.bytes > b.bytes) {
                best = Some(a);
            }
        };
        for (i, &c) in channels.iter().enumerate() {
            consider(
                format!("VAE decoder up_blocks.{i} resnets"),
                c.max(c_prev),
                1,
                h,
                w,
            );
            if i + 1 < channels.len() {
                consider(format!("VAE decoder up_blocks.{i} upsampler"), c, 2, h, w);
                (h, w) = (h * 2, w * 2);
            }
            c_prev = c;
        }
        out.extend(best);
    }
    out.sort_by_key(|a| std::cmp::Reverse(a.bytes));
    Ok(out)
}

/// Refuses a training batch whose [`largest_activations`] exceed `max_binding_bytes`, naming
/// the largest; the VAE decoder's strips are at most that or
/// [`crate::memory::strips::MAX_BUFFER_BYTES`] (a pipeline's [`crate::Pipeline::max_buffer_bytes`]).
pub fn check_activations(
    unet: &UNet2DConditionConfig,
    vae: Option<&AutoencoderKLConfig>,
    latent_hw: [usize; 2],
    batch: usize,
    max_binding_bytes: u64,
) -> Result<()> {
    let budget = max_binding_bytes.min(crate::memory::strips::MAX_BUFFER_BYTES);
    match largest_activations(unet, vae, latent_hw, batch, budget)?
        .into_iter()
        .next()
    {
        Some(a) if a.bytes > max_binding_bytes => Err(Error::Input(format!(
            "a batch of {batch} at {}×{} latents: the {} {:?} needs {:.1} MiB, over this adapter's maxStorageBufferBindingSize of {:.1} MiB; lower the batch or the resolution",
            latent_hw[0],
            latent_hw[1],
            a.what,
            a.shape,
            a.bytes as f64 / MIB,
            max_binding_bytes as f64 / MIB
        ))),
        _ => Ok(()),
    }
}

/// The memory a training update holds beyond the weights, by arithmetic: the activations the
/// one UNet call with gradient keeps for its backward pass, on `2 × batch` rows (classifier-free
/// guidance) in f32, whatever the weights' dtype — the checkpointed sampler keeps one step's
/// graph at a time, and DRaFT-LV back-propagates its samples one after the other, so neither K
/// nor the LV samples multiply it — or, with `vae` and when larger, four of the decoder's
/// largest activations ([`largest_activations`] with a `decoder_budget`), which its strips'
/// backward holds at once: the decoder's graph is freed before the UNet step's is rebuilt, so
/// the two peaks do not add. A learned reward's own activations are not counted.
///
/// Per latent position and row, in elements: a resnet from `c_in` to `c` channels keeps
/// 2·c_in + 3·c (its two norms' and convolutions' inputs, the residual); a transformer of
/// `layers` blocks at width `c` keeps 25·c per block (norms, q/k/v, both attentions' outputs and
/// projections, the GEGLU's 8·c projection and 4·c gate) and 2·c around them (proj_in/out); a
/// resampler, its input. Against the CPU backend's measured growth of a step (SD-1.4's UNet at
/// 32×32 and its whole pipeline at 64×64, docs/web.md) it is 18–20 % above: it answers "does it
/// fit", not "how much exactly".
pub fn step_activation_bytes(
    unet: &UNet2DConditionConfig,
    vae: Option<&AutoencoderKLConfig>,
    latent_hw: [usize; 2],
    batch: usize,
    decoder_budget: u64,
) -> Result<u64> {
    let r = unet.resolve("unet/config.json")?;
    let boc = &unet.block_out_channels;
    let n = boc.len();
    let tokens =
        |level: usize| ((latent_hw[0] >> level).max(1) * (latent_hw[1] >> level).max(1)) as u64;
    let resnet = |c_in: usize, c: usize| (2 * c_in + 3 * c) as u64;
    let transformer = |c: usize, layers: usize| (layers * 25 * c + 2 * c) as u64;
    let attends = |kind: &str| kind.contains("CrossAttn");
    // Elements per latent position and row, summed over the levels with their tokens.
    let mut elements = 0u64;
    for (i, kind) in unet.down_block_types.iter().enumerate() {
        let c = boc[i];
        let mut per = 0;
        for j in 0..r.layers_per_block[i] {
            per += resnet(if j == 0 { boc[i.saturating_sub(1)] } else { c }, c);
            if attends(kind) {
                per += transformer(c, r.transformer_layers[i]);
            }
        }
        if i + 1 < n {
            per += c as u64;
        }
        elements += per * tokens(i);
    }
    let last = boc[n - 1];
    let mid = unet
        .mid_block_type
        .as_deref()
        .unwrap_or("UNetMidBlock2DCrossAttn");
    if !mid.is_empty() {
        let mut per = 2 * resnet(last, last);
        if attends(mid) {
            per += transformer(last, r.transformer_layers[n - 1]);
        }
        elements += per * tokens(n - 1);
    }
    for (k, kind) in unet.up_block_types.iter().enumerate() {
        let level = n - 1 - k;
        let out = boc[level];
        let prev_out = boc[(level + 1).min(n - 1)];
        let skip_in = boc[level.saturating_sub(1)];
        let layers = r.layers_per_block[level];
        let mut per = 0;
        for j in 0..=layers {
            let skip = if j == layers { skip_in } else { out };
            per += resnet((if j == 0 { prev_out } else { out }) + skip, out);
            if attends(kind) {
                per += transformer(out, r.transformer_layers[level]);
            }
        }
        elements += per * tokens(level);
        if level > 0 {
            // The upsampler's interpolated input and its convolution's, at the next level.
            elements += 2 * out as u64 * tokens(level - 1);
        }
    }
    let rows = 2 * batch as u64;
    let mut bytes = elements.saturating_mul(rows).saturating_mul(4);
    if let Some(vae) = vae {
        let decoder = largest_activations(unet, Some(vae), latent_hw, batch, decoder_budget)?
            .into_iter()
            .filter(|a| a.what.starts_with("VAE"))
            .map(|a| a.bytes)
            .max()
            .unwrap_or(0);
        bytes = bytes.max(4 * decoder);
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::weights::{serialize, serialize_f32};
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
        // build the file by hand (u8 on disk to keep it small, f32 in the runtime).
        let file = |key: &str, shape: [usize; 2]| {
            let n = shape[0] * shape[1];
            let header = format!(
                r#"{{"{key}":{{"dtype":"U8","shape":[{},{}],"data_offsets":[0,{n}]}}}}"#,
                shape[0], shape[1]
            );
            let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
            bytes.extend_from_slice(header.as_bytes());
            bytes.resize(bytes.len() + n, 0);
            bytes
        };
        // CLIP ViT-L/14's token embedding, 49408 × 768: 144.8 MiB whole, loaded as blocks of
        // 43690 rows (128.0 MiB), which a 128 MiB adapter binds.
        let key = "text_model.embeddings.token_embedding.weight";
        let bytes = file(key, [49408, 768]);
        check_file_tensor_sizes("CLIP folder", "model.safetensors", &bytes, 128 << 20).unwrap();
        let err = check_file_tensor_sizes("CLIP folder", "model.safetensors", &bytes, 100 << 20)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "CLIP folder: model.safetensors: tensor text_model.embeddings.token_embedding.weight \
             [49408, 768] needs 128.0 MiB per block of 43690 rows, over this adapter's \
             maxStorageBufferBindingSize of 100.0 MiB"
        );
        // Any other tensor is one buffer.
        let bytes = file("text_projection.weight", [49408, 768]);
        let err = check_file_tensor_sizes("CLIP folder", "model.safetensors", &bytes, 128 << 20)
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "CLIP folder: model.safetensors: tensor text_projection.weight [49408, 768] needs \
             144.8 MiB, over this adapter's maxStorageBufferBindingSize of 128.0 MiB"
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

    fn sd1() -> (UNet2DConditionConfig, AutoencoderKLConfig) {
        let json = r#"{"sample_size": 64, "block_out_channels": [320, 640, 1280, 1280],
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "attention_head_dim": 8, "cross_attention_dim": 768}"#;
        let vae = r#"{"block_out_channels": [128, 256, 512, 512],
            "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
            "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]}"#;
        (
            UNet2DConditionConfig::from_json("unet/config.json", json).unwrap(),
            AutoencoderKLConfig::from_json("vae/config.json", vae).unwrap(),
        )
    }

    #[test]
    fn sd1_at_512_attention_is_blocked_and_the_decoder_runs_on_strips() {
        let (unet, vae) = sd1();
        let budget = crate::memory::strips::MAX_BUFFER_BYTES;
        let acts = largest_activations(&unet, Some(&vae), [64, 64], 1, budget).unwrap();
        let find = |prefix: &str| acts.iter().find(|a| a.what.starts_with(prefix)).unwrap();
        // The whole score matrix would be [2, 8, 4096, 4096] = 1 GiB; a block is within budget.
        let scores = find("down_blocks.0 self-attention scores");
        assert_eq!(scores.shape[..2], [2, 8]);
        assert_eq!(scores.shape[3], 4096);
        assert!(scores.bytes <= crate::ops::attention::SCORE_BLOCK_BYTES as u64);
        // GEGLU: [2, 4096, 2560] = 80 MiB.
        assert_eq!(find("down_blocks.0 feed-forward").bytes, 80 << 20);
        // The decoder's up_blocks.3 resnets take [1, 256, 512, 512] (256 MiB whole): on strips
        // of 253 rows, 255 with the halo, 514 columns with the padding: just under 128 MiB.
        assert_eq!(
            acts[0].what,
            "VAE decoder up_blocks.3 resnets, a strip of 253 of 512 rows with its halo"
        );
        assert_eq!(acts[0].shape, [1, 256, 255, 514]);
        assert!(acts[0].bytes <= budget);
        check_activations(&unet, Some(&vae), [64, 64], 1, 128 << 20).unwrap();
        // Unbounded, the decoder's largest is the whole [1, 256, 512, 512] = 256 MiB.
        let whole = largest_activations(&unet, Some(&vae), [64, 64], 1, u64::MAX).unwrap();
        assert_eq!(whole[0].what, "VAE decoder up_blocks.2 upsampler");
        assert_eq!(whole[0].shape, [1, 256, 512, 512]);
        // At batch 2 the feed-forward's [4, 4096, 2560] (160 MiB) runs in chunks of 3276
        // tokens: 127.97 MiB.
        let acts = largest_activations(&unet, Some(&vae), [64, 64], 2, budget).unwrap();
        let ff = acts
            .iter()
            .find(|a| a.what.starts_with("down_blocks.0 feed-forward"))
            .unwrap();
        assert_eq!(ff.shape, [4, 3276, 2560]);
        assert!(ff.bytes <= budget);
        check_activations(&unet, Some(&vae), [64, 64], 2, 128 << 20).unwrap();
        // Below what any layer can be cut to, the check names the layer and the limit.
        let err = check_activations(&unet, Some(&vae), [64, 64], 1, 64 << 20)
            .unwrap_err()
            .to_string();
        assert!(err.contains("64.0 MiB"), "{err}");
        check_activations(&unet, None, [32, 32], 4, 128 << 20).unwrap();
    }

    /// SD-1.4's UNet at 32×32 latents, batch 1: 761 MiB by this arithmetic, against the +634 MiB
    /// the CPU backend's step measured (docs/benchmarks.md, 6dccfbd); at 64×64 four times that.
    #[test]
    fn the_step_estimate_of_sd14() {
        let json = r#"{"sample_size": 64, "block_out_channels": [320, 640, 1280, 1280],
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "cross_attention_dim": 768, "attention_head_dim": 8, "layers_per_block": 2}"#;
        let unet = UNet2DConditionConfig::from_json("unet", json).unwrap();
        let mib = |b: u64| b as f64 / MIB;
        let small = step_activation_bytes(&unet, None, [32, 32], 1, 128 << 20).unwrap();
        let large = step_activation_bytes(&unet, None, [64, 64], 1, 128 << 20).unwrap();
        assert!((mib(small) - 761.25).abs() < 0.01, "{}", mib(small));
        assert!((mib(large) / mib(small) - 4.0).abs() < 0.05);
        let two = step_activation_bytes(&unet, None, [32, 32], 2, 128 << 20).unwrap();
        assert_eq!(two, 2 * small);
    }
}
