//! `draft sample`.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use draft_core::model::lora::LoraFile;
use draft_core::model::pipeline::{LoraSetup, SampleOptions, SizeConditioning, to_nhwc};
use draft_core::noise::NoiseRng;
use draft_core::read_f32;
use draft_core::train::config::parse_pair;
use indicatif::{ProgressBar, ProgressStyle};

use crate::device::{self, DeviceArg};
use crate::{files, images};

#[derive(Args)]
pub struct SampleArgs {
    /// A diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
    /// scheduler/) or a single-file SD-1.x/2.x/XL checkpoint (.safetensors, .ckpt) [default: the
    /// embedded shapes-32 model].
    #[arg(long)]
    model: Option<PathBuf>,
    /// Load this weights variant of a diffusers folder (e.g. `fp16`), as diffusers' `variant=`.
    #[arg(long)]
    variant: Option<String>,
    /// For a single-file --model: a diffusers folder whose config files (and tokenizer) replace
    /// the ones inferred from the checkpoint.
    #[arg(long)]
    model_config: Option<PathBuf>,
    /// The prompt; repeat for a batch of different prompts (cycled over --batch).
    #[arg(long, required = true)]
    prompt: Vec<String>,
    /// The prompt guidance steers away from (default: the empty prompt).
    #[arg(long, default_value = "")]
    negative_prompt: String,
    /// DDIM sampling steps.
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Classifier-free guidance scale (guidance is off at ≤ 1).
    #[arg(long, default_value_t = 7.5)]
    guidance: f64,
    /// DDIM η: 0 is deterministic; > 0 adds seeded noise at each step.
    #[arg(long, default_value_t = 0.0)]
    eta: f64,
    /// Seed of the initial latents and of the η noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Images in the batch (default: one per --prompt).
    #[arg(long)]
    batch: Option<usize>,
    /// Image height in pixels (default: the UNet's sample_size × the VAE's downscale).
    #[arg(long)]
    height: Option<usize>,
    /// Image width in pixels.
    #[arg(long)]
    width: Option<usize>,
    /// Initial latents: a safetensors file with the tensor `noise` [B, C, h, w] (f32), as
    /// diffusers' `latents=` argument. B sets the batch.
    #[arg(long)]
    init_noise: Option<PathBuf>,
    /// PNG grid of the images.
    #[arg(long, default_value = "samples.png")]
    out: PathBuf,
    /// Also write the tensor `images` [B, H, W, 3] f32 in [0, 1] to this safetensors file.
    #[arg(long)]
    out_tensor: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    device: DeviceArg,
    /// A LoRA file (diffusers/peft layout, e.g. `draft train`'s pytorch_lora_weights.safetensors,
    /// or kohya's, e.g. its lora_kohya.safetensors) at an optional scale; repeat to mix several.
    #[arg(long, value_name = "FILE[:SCALE]")]
    lora: Vec<String>,
    #[command(flatten)]
    size: SizeArgs,
}

/// SDXL's size conditioning (diffusers' `original_size`, `crops_coords_top_left`,
/// `target_size`); other models ignore it.
#[derive(Args, Clone, Debug, Default)]
pub struct SizeArgs {
    /// SDXL: the original image size the model is told, HEIGHTxWIDTH in pixels [default: the
    /// image size].
    #[arg(long, value_name = "HxW", value_parser = parse_pair::<'x'>)]
    pub original_size: Option<[usize; 2]>,
    /// SDXL: the crop's top-left corner the model is told, TOP,LEFT in pixels.
    #[arg(long, value_name = "TOP,LEFT", value_parser = parse_pair::<','>, default_value = "0,0")]
    pub crop: [usize; 2],
    /// SDXL: the target size the model is told, HEIGHTxWIDTH [default: the image size].
    #[arg(long, value_name = "HxW", value_parser = parse_pair::<'x'>)]
    pub target_size: Option<[usize; 2]>,
}

impl SizeArgs {
    pub fn conditioning(&self) -> SizeConditioning {
        SizeConditioning {
            original: self.original_size,
            crop: self.crop,
            target: self.target_size,
        }
    }
}

/// `FILE[:SCALE]` → (file, scale); a suffix that is not a number is part of the file name.
pub fn parse_lora_arg(s: &str) -> Result<(PathBuf, f64)> {
    if let Some((file, scale)) = s.rsplit_once(':')
        && let Ok(v) = scale.parse::<f64>()
    {
        if !v.is_finite() {
            bail!("--lora {s}: the scale must be finite");
        }
        return Ok((PathBuf::from(file), v));
    }
    Ok((PathBuf::from(s), 1.0))
}

pub fn run(a: SampleArgs) -> Result<()> {
    if !(a.guidance.is_finite() && a.eta.is_finite() && a.eta >= 0.0) {
        bail!("--guidance must be finite and --eta finite and ≥ 0");
    }
    let model = files::read_model(
        a.model.as_deref(),
        a.variant.as_deref(),
        a.model_config.as_deref(),
    )?;
    let noise_bytes = a.init_noise.as_ref().map(|p| files::read(p)).transpose()?;
    let mut loras = Vec::new();
    for spec in &a.lora {
        let (path, scale) = parse_lora_arg(spec)?;
        let name = path.display().to_string();
        loras.push((LoraFile::parse(&name, &files::read(&path)?)?, scale));
    }
    let device = device::select(a.device)?;
    let setup = LoraSetup::Files(loras.iter().map(|(f, s)| (f, *s)).collect());
    let pipe = device::load_pipeline(&model, &device, &setup)?;
    drop(model);

    let x_t = match (&a.init_noise, &noise_bytes) {
        (Some(path), Some(bytes)) => {
            let name = path.display().to_string();
            let noise = files::init_noise(&name, bytes, &device)?;
            let [b, c, h, wd] = noise.dims();
            let expected = pipe.latent_shape(
                a.height.unwrap_or(h * pipe.downscale()),
                a.width.unwrap_or(wd * pipe.downscale()),
            )?;
            if [c, h, wd] != expected || a.batch.is_some_and(|n| n != b) {
                bail!(
                    "{name}: tensor `noise` has shape {:?}, expected [{}, {}, {}, {}]",
                    [b, c, h, wd],
                    a.batch.unwrap_or(b),
                    expected[0],
                    expected[1],
                    expected[2]
                );
            }
            noise
        }
        _ => {
            let size = pipe.default_image_size();
            let [c, h, w] = pipe.latent_shape(a.height.unwrap_or(size), a.width.unwrap_or(size))?;
            let b = a.batch.unwrap_or(a.prompt.len());
            draft_core::model::files::check_batch("--batch", b)?;
            NoiseRng::new(a.seed).randn([b, c, h, w], &device)
        }
    };

    let options = SampleOptions {
        prompts: a.prompt.clone(),
        negative_prompt: a.negative_prompt.clone(),
        steps: a.steps,
        guidance: a.guidance,
        eta: a.eta,
        seed: a.seed,
        size: a.size.conditioning(),
    };
    let bar = ProgressBar::new(a.steps as u64).with_style(
        ProgressStyle::with_template("{prefix} [{bar:30}] {pos}/{len} steps {elapsed} ({per_sec})")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix("sampling");
    let latents = pipe.sample_latents(&options, x_t, |i, _| bar.set_position(i as u64))?;
    let images = to_nhwc(pipe.decode(latents));
    let (values, shape) = pollster::block_on(read_f32(images))?;
    bar.finish();

    let [b, h, w] = [shape[0], shape[1], shape[2]];
    images::write_png_grid(&a.out, &values, (b, h, w), &[])?;
    eprintln!("draft: wrote {} ({b} images, {w}×{h})", a.out.display());
    if let Some(path) = &a.out_tensor {
        images::write_tensors(path, &[("images", &values, shape.clone())])
            .with_context(|| format!("{}: cannot write", path.display()))?;
        eprintln!("draft: wrote {}", path.display());
    }
    Ok(())
}
