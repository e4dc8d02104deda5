//! `draft pretrain`'s trainer: it learns, it resumes bit-identically, and what it writes is a
//! pipeline folder the ordinary loader reads (pixel space, word-level tokenizer).

use burn::prelude::*;
use draft_core::Pipeline;
use draft_core::data::pretrain::{PretrainConfig, Pretrainer};
use draft_core::model::pipeline::SampleOptions;

/// A model small enough to train for a few dozen steps in a test.
fn tiny() -> PretrainConfig {
    PretrainConfig {
        image_size: 8,
        batch: 8,
        train_steps: 40,
        lr: 3e-3,
        warmup_steps: 5,
        channels: vec![8, 16],
        text_width: 8,
        text_layers: 1,
        ..PretrainConfig::default()
    }
}

/// Every tensor of one written component, by key (the header's metadata order is not fixed,
/// so files are compared by their values).
fn values(t: &Pretrainer, ema: bool, path: &str) -> Vec<(String, Vec<f32>)> {
    let files = pollster::block_on(t.model_files(ema)).unwrap();
    let w =
        draft_core::model::weights::Weights::from_bytes(path, files.bytes(path).unwrap()).unwrap();
    let mut keys = w.keys();
    keys.sort();
    keys.into_iter()
        .map(|k| {
            let v = w.read_f32(&k).unwrap().0;
            (k, v)
        })
        .collect()
}

const UNET: &str = "unet/diffusion_pytorch_model.safetensors";
const TEXT: &str = "text_encoder/model.safetensors";

#[test]
fn denoising_loss_falls() {
    let device = Device::flex();
    let mut t = Pretrainer::new(tiny(), &device).unwrap();
    let losses: Vec<f64> = (0..40)
        .map(|_| pollster::block_on(t.train_step()).unwrap().loss)
        .collect();
    let first = losses[..8].iter().sum::<f64>() / 8.0;
    let last = losses[32..].iter().sum::<f64>() / 8.0;
    eprintln!("loss {first:.4} → {last:.4}");
    assert!(last < 0.7 * first, "loss {first} → {last}");
}

#[test]
fn resume_is_bit_identical() {
    let device = Device::flex();
    let mut straight = Pretrainer::new(tiny(), &device).unwrap();
    for _ in 0..3 {
        pollster::block_on(straight.train_step()).unwrap();
    }
    let mut first = Pretrainer::new(tiny(), &device).unwrap();
    for _ in 0..2 {
        pollster::block_on(first.train_step()).unwrap();
    }
    let checkpoint = pollster::block_on(first.checkpoint()).unwrap();
    drop(first);
    let mut resumed = Pretrainer::new(tiny(), &device).unwrap();
    resumed.restore("checkpoint", &checkpoint).unwrap();
    assert_eq!(resumed.step, 2);
    pollster::block_on(resumed.train_step()).unwrap();
    for (ema, path) in [(false, UNET), (false, TEXT), (true, UNET), (true, TEXT)] {
        assert!(
            values(&straight, ema, path) == values(&resumed, ema, path),
            "resumed run diverged: {path} (EMA: {ema})"
        );
    }

    // Other settings are refused.
    let mut other = Pretrainer::new(PretrainConfig { lr: 1e-2, ..tiny() }, &device).unwrap();
    let err = other
        .restore("checkpoint", &checkpoint)
        .unwrap_err()
        .to_string();
    assert!(err.contains("other settings"), "{err}");
}

#[test]
fn written_model_loads_as_a_pixel_space_pipeline() {
    let device = Device::flex();
    let mut t = Pretrainer::new(tiny(), &device).unwrap();
    pollster::block_on(t.train_step()).unwrap();
    let files = pollster::block_on(t.model_files(true)).unwrap();
    let pipe = Pipeline::load(&files, &device).unwrap();
    assert!(pipe.vae.is_none());
    assert_eq!(pipe.default_image_size(), 8);
    assert_eq!(pipe.latent_shape(8, 8).unwrap(), [3, 8, 8]);
    // Caption words are known; others map to the unknown token.
    assert!(
        pipe.tokenizer
            .unknown_words("a small red circle on a blue background")
            .is_empty()
    );
    assert_eq!(
        pipe.tokenizer.unknown_words("a red giraffe"),
        vec!["giraffe"]
    );
    let options = SampleOptions {
        prompts: vec!["a large green square on a white background".into()],
        negative_prompt: String::new(),
        steps: 3,
        guidance: 7.5,
        eta: 0.0,
        seed: 0,
        size: Default::default(),
    };
    let x_t = draft_core::noise::NoiseRng::new(1).randn([1, 3, 8, 8], &device);
    let images = pipe.decode(pipe.sample_latents(&options, x_t, |_, _| {}).unwrap());
    let (values, shape) = pollster::block_on(draft_core::read_f32(images)).unwrap();
    assert_eq!(shape, vec![1, 3, 8, 8]);
    assert!(values.iter().all(|v| (0.0..=1.0).contains(v)));
}
