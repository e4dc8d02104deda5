//! Learned rewards against transformers (PyTorch autograd) on a tiny random `CLIPModel` and a
//! tiny random LAION aesthetic MLP (`tests/fixtures/make_reward_fixtures.py`): preprocessing,
//! vision tower, image and text features, and each reward's value and gradient with respect to
//! the image.

mod common;

use std::sync::Arc;

use common::{devices, fixtures, rel_err, values};
use draft_core::model::models::open_clip::OpenClipConfig;
use draft_core::model::tokenizer::ClipTokenizer;
use draft_core::model::weights::Weights;
use draft_core::reward::builtin::Reward;
use draft_core::reward::models::{
    AestheticMlp, ClipSimilarity, LaionAesthetic, Similarity, is_open_clip, load_clip,
    load_open_clip, preprocess,
};

const PROMPTS: [&str; 2] = ["a red circle on a blue background", "a photo of a cat"];

/// The sd1-tiny tokenizer (vocabulary 1014), which the tiny CLIP models were made for.
fn tokenizer() -> Arc<ClipTokenizer> {
    let files = common::read_model(&fixtures().join("sd1-tiny"));
    Arc::new(draft_core::model::files::load_tokenizer_in(&files, "tokenizer/").unwrap())
}

fn prompts() -> Vec<String> {
    PROMPTS.map(String::from).to_vec()
}

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
                Box::new(
                    ClipSimilarity::new(clip.clone(), tokenizer(), Similarity::ClipScore).unwrap(),
                ),
            ),
            (
                "pickscore",
                Box::new(
                    ClipSimilarity::new(clip.clone(), tokenizer(), Similarity::PickScore).unwrap(),
                ),
            ),
        ];
        for (key, reward) in rewards {
            let x = image.clone().autodiff().require_grad();
            let score = reward.score(x.clone(), &prompts()).unwrap();
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

#[test]
fn the_reward_tokenizes_prompts_like_transformers() {
    let bytes = std::fs::read(fixtures().join("rewards/reference.safetensors")).unwrap();
    let r = Weights::from_bytes("reference.safetensors", &bytes).unwrap();
    let (ids, _) = r.read_i64("input_ids").unwrap();
    let tok = tokenizer();
    let got: Vec<i64> = PROMPTS
        .iter()
        .flat_map(|p| tok.encode(p).unwrap())
        .map(|i| i as i64)
        .collect();
    assert_eq!(got, ids);
}

/// HPSv2's layout: an open_clip `CLIP` state dict (fused `in_proj_weight`, `visual.proj`, …).
#[test]
fn open_clip_hpsv2_matches_pytorch() {
    let dir = fixtures().join("open-clip-tiny");
    let config = std::fs::read_to_string(dir.join("open_clip_config.json")).unwrap();
    let config = OpenClipConfig::from_json("open_clip_config.json", &config).unwrap();
    let weights = std::fs::read(dir.join("open_clip_model.safetensors")).unwrap();
    assert!(is_open_clip("open_clip_model.safetensors", &weights).unwrap());
    let clip_tiny = std::fs::read(fixtures().join("clip-tiny/model.safetensors")).unwrap();
    assert!(!is_open_clip("model.safetensors", &clip_tiny).unwrap());
    let ref_bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
    let r = Weights::from_bytes("reference.safetensors", &ref_bytes).unwrap();
    let (ids, ids_shape) = r.read_i64("input_ids").unwrap();
    let ids: Vec<Vec<i64>> = ids.chunks(ids_shape[1]).map(|c| c.to_vec()).collect();
    for (dev, device) in devices() {
        let clip = Arc::new(
            load_open_clip(&config, "open_clip_model.safetensors", &weights, &device).unwrap(),
        );
        let image = r.tensor::<4>("image", &device).unwrap();
        let (got, _) = values(clip.image_features(preprocess(image.clone(), clip.image_size)));
        let e = max_abs(&got, &r.read_f32("image_embeds").unwrap().0);
        eprintln!("[{dev}] open_clip image_embeds max abs err {e:.1e}");
        assert!(e < 1e-4, "[{dev}] image_embeds {e}");
        let (got, _) = values(clip.text_features(&ids, &device));
        let e = max_abs(&got, &r.read_f32("text_embeds").unwrap().0);
        eprintln!("[{dev}] open_clip text_embeds max abs err {e:.1e}");
        assert!(e < 1e-4, "[{dev}] text_embeds {e}");

        let reward = ClipSimilarity::new(clip, tokenizer(), Similarity::Hpsv2).unwrap();
        let x = image.clone().autodiff().require_grad();
        let score = reward.score(x.clone(), &prompts()).unwrap();
        let grads = score.clone().sum().backward();
        let (v, _) = values(score.without_autodiff());
        let (g, _) = values(x.grad(&grads).unwrap());
        let ev = max_abs(&v, &r.read_f32("hpsv2.value").unwrap().0);
        let eg = rel_err(&g, &r.read_f32("hpsv2.grad").unwrap().0);
        eprintln!("[{dev}] hpsv2: value max abs err {ev:.1e}, grad rel err {eg:.1e}");
        assert!(ev < 1e-4, "[{dev}] hpsv2 value {ev}");
        assert!(eg < 1e-3, "[{dev}] hpsv2 grad {eg}");
    }
}

#[test]
fn open_clip_configs_refuse_what_the_loader_cannot_compute() {
    let vit_h = OpenClipConfig::named("ViT-H-14").unwrap();
    assert_eq!(vit_h.vision_cfg.width / vit_h.vision_cfg.head_width, 16);
    assert_eq!(vit_h.embed_dim, 1024);
    let bad = r#"{"embed_dim": 8, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32,
        "patch_size": 8, "pool_type": "avg"}, "text_cfg": {}}"#;
    let err = OpenClipConfig::from_json("bad.json", bad)
        .unwrap_err()
        .to_string();
    assert!(err.contains("pool_type"), "{err}");
    let bad = r#"{"embed_dim": 8, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32,
        "patch_size": 8}, "text_cfg": {"hf_model_name": "xlm-roberta-large"}}"#;
    let err = OpenClipConfig::from_json("bad.json", bad)
        .unwrap_err()
        .to_string();
    assert!(err.contains("hf_model_name"), "{err}");
}
