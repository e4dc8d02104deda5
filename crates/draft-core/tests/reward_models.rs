//! Learned rewards against transformers (PyTorch autograd) on a tiny random `CLIPModel` and a
//! tiny random LAION aesthetic MLP (`tests/fixtures/make_reward_fixtures.py`): preprocessing,
//! vision tower, image and text features, and each reward's value and gradient with respect to
//! the image.

mod common;

use std::sync::Arc;

use common::{devices, fixtures, rel_err, values};
use draft_core::reward::Reward;
use draft_core::reward_models::{
    AestheticMlp, ClipSimilarity, LaionAesthetic, load_clip, preprocess,
};
use draft_core::weights::Weights;

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

#[test]
fn clip_rewards_match_pytorch() {
    let dir = fixtures();
    let config = std::fs::read_to_string(dir.join("clip-tiny/config.json")).unwrap();
    let weights = std::fs::read(dir.join("clip-tiny/model.safetensors")).unwrap();
    let mlp_bytes = std::fs::read(dir.join("rewards/aesthetic-tiny.safetensors")).unwrap();
    let ref_bytes = std::fs::read(dir.join("rewards/reference.safetensors")).unwrap();
    let r = Weights::from_bytes("reference.safetensors", &ref_bytes).unwrap();
    let (ids, ids_shape) = r.read_i64("input_ids").unwrap();
    let ids: Vec<Vec<i64>> = ids.chunks(ids_shape[1]).map(|c| c.to_vec()).collect();
    for (dev, device) in devices() {
        let clip = Arc::new(
            load_clip(
                "config.json",
                &config,
                "model.safetensors",
                &weights,
                &device,
            )
            .unwrap(),
        );
        let image = r.tensor::<4>("image", &device).unwrap();

        let pixels = preprocess(image.clone(), clip.image_size);
        let (got, _) = values(pixels.clone());
        let e = max_abs(&got, &r.read_f32("pixel_values").unwrap().0);
        eprintln!("[{dev}] pixel_values max abs err {e:.1e}");
        assert!(e < 1e-5, "[{dev}] preprocessing {e}");
        let (got, _) = values(clip.vision_hidden(pixels.clone()));
        let e = max_abs(&got, &r.read_f32("vision_last_hidden_state").unwrap().0);
        eprintln!("[{dev}] vision last_hidden_state max abs err {e:.1e}");
        assert!(e < 1e-4, "[{dev}] vision tower {e}");
        let (got, _) = values(clip.image_features(pixels));
        let e = max_abs(&got, &r.read_f32("image_embeds").unwrap().0);
        assert!(e < 1e-4, "[{dev}] image_embeds {e}");
        let (got, _) = values(clip.text_features(&ids, &device));
        let e = max_abs(&got, &r.read_f32("text_embeds").unwrap().0);
        eprintln!("[{dev}] text_embeds max abs err {e:.1e}");
        assert!(e < 1e-4, "[{dev}] text_embeds {e}");

        let aesthetic = LaionAesthetic {
            clip: clip.clone(),
            mlp: AestheticMlp::load("aesthetic-tiny", &mlp_bytes, 16, &device).unwrap(),
        };
        let rewards: Vec<(&str, Box<dyn Reward>)> = vec![
            ("aesthetic", Box::new(aesthetic)),
            (
                "clip_score",
                Box::new(ClipSimilarity::new(clip.clone(), &ids, &device, false)),
            ),
            (
                "pickscore",
                Box::new(ClipSimilarity::new(clip.clone(), &ids, &device, true)),
            ),
        ];
        for (key, reward) in rewards {
            let x = image.clone().autodiff().require_grad();
            let score = reward.score(x.clone());
            let grads = score.clone().sum().backward();
            let (v, _) = values(score.without_autodiff());
            let (g, _) = values(x.grad(&grads).unwrap());
            let ev = max_abs(&v, &r.read_f32(&format!("{key}.value")).unwrap().0);
            let eg = rel_err(&g, &r.read_f32(&format!("{key}.grad")).unwrap().0);
            eprintln!("[{dev}] {key}: value max abs err {ev:.1e}, grad rel err {eg:.1e}");
            assert!(ev < 1e-4, "[{dev}] {key} value {ev}");
            assert!(eg < 1e-3, "[{dev}] {key} grad {eg}");
        }
    }
}
