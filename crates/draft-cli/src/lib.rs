//! `draft`: sample from and fine-tune diffusion models with DRaFT.
//! A thin shell: argument parsing, files, progress bars and images; the tensor work is in
//! `draft-core`. The binary (`main.rs`) parses [`Cli`] and calls [`run`]; tests call the
//! modules directly.

pub mod compare;
pub mod convert;
pub mod device;
pub mod files;
pub mod images;
pub mod plot;
pub mod pretrain;
pub mod rewards;
pub mod sample;
pub mod score;
pub mod train;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "draft",
    version,
    about = "DRaFT: reward fine-tuning of diffusion models on any GPU"
)]
pub struct Cli {
    /// Threads of the CPU backend (its matrix products, convolutions and element-wise kernels).
    /// Default: `RAYON_NUM_THREADS` when set, else one per logical core.
    #[arg(long, global = true, value_name = "N")]
    pub threads: Option<usize>,
    /// How the diffusion model's frozen weight matrices and kernels are kept: f16 halves their
    /// resident memory, in sampling and in training (layers compute in f32 except where
    /// `--sampling-dtype` says f16; LoRA weights, gradients and the optimizer state stay f32).
    /// `auto`: f16 on a GPU adapter that computes in f16, f32 on the CPU backend and elsewhere.
    #[arg(long, global = true, value_enum, default_value = "auto")]
    pub weights_dtype: device::DtypeArg,
    /// What the UNet computes in on the sampling steps no gradient goes through (`draft sample`,
    /// evaluations, training's steps before the back-propagated ones): f16 halves their
    /// activations and runs them on the adapter's f16 units (norm statistics and attention's
    /// softmax still in f32). The back-propagated steps, the decoder, the reward and the loss
    /// always compute in f32. `auto`: f16 on a GPU adapter that computes in f16, f32 on the
    /// CPU backend (which computes f16 through f32, slower) and elsewhere.
    #[arg(long, global = true, value_enum, default_value = "auto")]
    pub sampling_dtype: device::DtypeArg,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Sample images from a diffusers-layout model with DDIM and classifier-free guidance.
    Sample(sample::SampleArgs),
    /// Fine-tune LoRA weights to maximise a differentiable reward (DRaFT and its baselines).
    Train(Box<train::TrainArgs>),
    /// Train the small text-to-image model on the procedural shapes dataset (the default model).
    Pretrain(pretrain::PretrainArgs),
    /// Compare runs: their metrics on one figure and a table of first/last/best values.
    Compare(compare::CompareArgs),
    /// Score PNG images, or freshly sampled ones, with any reward and print a table.
    Score(score::ScoreArgs),
    /// Convert a PyTorch weights file (.pt, .pth, .bin, .ckpt) to safetensors, for the browser
    /// page (which reads no pickles).
    Convert(convert::ConvertArgs),
}

/// Runs one parsed command line (on the CPU backend's thread pool).
pub fn run(cli: Cli) -> anyhow::Result<()> {
    device::set_dtypes(cli.weights_dtype, cli.sampling_dtype);
    device::in_cpu_pool(cli.threads, || match cli.command {
        Command::Sample(args) => sample::run(args),
        Command::Train(args) => train::run(*args),
        Command::Pretrain(args) => pretrain::run(args),
        Command::Compare(args) => compare::run(args),
        Command::Score(args) => score::run(args),
        Command::Convert(args) => convert::run(args),
    })
}
