//! Learned rewards built by `reward_files` entirely from memory (the browser's way; the CLI only
//! reads the same bytes from disk first): each term's value equals the model built directly from
//! its parts, and the PyTorch reference of `tests/reward_models.rs`. Missing sources are refused
//! by name.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use burn::prelude::*;
use common::{fixtures, values};
use draft_core::ModelFiles;
use draft_core::model::models::open_clip::OpenClipConfig;
use draft_core::model::weights::Weights;
use draft_core::reward::builtin::{Reward, RewardOptions, WeightedReward};
use draft_core::reward::files::{RewardFiles, RewardSource};
use draft_core::reward::models::{
    AestheticMlp, ClipSimilarity, LaionAesthetic, Similarity, load_clip, load_open_clip,
};

const PROMPTS: [&str; 2] = ["a red circle on a blue background", "a photo of a cat"];

/// Every file at the top of `dir`, by its name.
fn folder(dir: &Path) -> RewardSource {
    let mut files = ModelFiles::new(dir.display().to_string());
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            let name = path.file_name().unwrap().to_str().unwrap().to_string();
            files.insert(name, std::fs::read(&path).unwrap());
        }
    }
    RewardSource::Folder(files)
}

fn file(path: &Path, open_clip_config: Option<&Path>) -> RewardSource {
    RewardSource::File {
        name: path.display().to_string(),
        bytes: std::fs::read(path).unwrap(),
        open_clip_config: open_clip_config
            .map(|c| (c.display().to_string(), std::fs::read_to_string(c).unwrap())),
    }
}

fn specs(s: &[&str]) -> Vec<String> {
    s.iter().map(|s| s.to_string()).collect()
}

fn prompts() -> Vec<String> {
    PROMPTS.map(String::from).to_vec()
}

/// Each term's scores of `images`.
fn term_values(reward: &WeightedReward, images: Tensor<4>) -> Vec<Vec<f32>> {
    reward
        .score_terms(images, &prompts())
        .unwrap()
        .into_iter()
        .map(|t| values(t).0)
        .collect()
}

fn max_abs(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

#[test]
fn clip_rewards_from_memory_equal_the_models_built_directly() {
    let dir = fixtures();
    let device = Device::flex();
    let ref_bytes = std::fs::read(dir.join("rewards/reference.safetensors")).unwrap();
    let r = Weights::from_bytes("reference.safetensors", &ref_bytes).unwrap();
    let image = r.tensor::<4>("image", &device).unwrap();

    // The tiny CLIP ships no tokenizer: pickscore takes the `tokenizer` source, clip-score
    // (the same weights, `clip`) too.
    let wanted = specs(&["laion-aesthetic", "clip-score", "pickscore=0.5"]);
    let sources = BTreeMap::from([
        ("clip".to_string(), folder(&dir.join("clip-tiny"))),
        (
            "laion-aesthetic".to_string(),
            file(&dir.join("rewards/aesthetic-tiny.safetensors"), None),
        ),
        ("pickscore".to_string(), folder(&dir.join("clip-tiny"))),
        (
            "tokenizer".to_string(),
            folder(&dir.join("sd1-tiny/tokenizer")),
        ),
    ]);
    let files = RewardFiles::new(&wanted, sources).unwrap();
    assert!(files.notes().is_empty(), "{:?}", files.notes());
    let reward = files
        .build(&wanted, &RewardOptions::default(), None, &device)
        .unwrap();
    let got = term_values(&reward, image.clone());

    // The same models from their parts, as `tests/reward_models.rs` builds them.
    let config = std::fs::read_to_string(dir.join("clip-tiny/config.json")).unwrap();
    let weights = std::fs::read(dir.join("clip-tiny/model.safetensors")).unwrap();
    let mlp = std::fs::read(dir.join("rewards/aesthetic-tiny.safetensors")).unwrap();
    let clip = Arc::new(load_clip("c", &config, "w", &weights, &device).unwrap());
    let tok = Arc::new(
        draft_core::model::files::load_tokenizer_in(
            &common::read_model(&dir.join("sd1-tiny")),
            "tokenizer/",
        )
        .unwrap(),
    );
    let direct: Vec<Box<dyn Reward>> = vec![
        Box::new(LaionAesthetic {
            clip: clip.clone(),
            mlp: AestheticMlp::load("mlp", &mlp, 16, &device).unwrap(),
        }),
        Box::new(ClipSimilarity::new(clip.clone(), tok.clone(), Similarity::ClipScore).unwrap()),
        Box::new(ClipSimilarity::new(clip, tok, Similarity::PickScore).unwrap()),
    ];
    for ((key, got), want) in ["aesthetic", "clip_score", "pickscore"]
        .iter()
        .zip(&got)
        .zip(direct)
    {
        let want = values(want.score(image.clone(), &prompts()).unwrap()).0;
        let e = max_abs(got, &want);
        assert!(e < 1e-6, "{key}: {got:?} vs built directly {want:?}");
        let pytorch = r.read_f32(&format!("{key}.value")).unwrap().0;
        let e = max_abs(got, &pytorch);
        assert!(e < 1e-4, "{key}: {got:?} vs PyTorch {pytorch:?}");
    }
    // The weighted sum: 1 · aesthetic + 1 · clip-score + 0.5 · pickscore.
    let total = values(reward.score(image, &prompts()).unwrap()).0;
    for (i, t) in total.iter().enumerate() {
        let want = got[0][i] + got[1][i] + 0.5 * got[2][i];
        assert!((t - want).abs() < 1e-5, "{total:?}");
    }
}

#[test]
fn hpsv2_from_a_folder_and_from_a_file_with_its_config() {
    let dir = fixtures().join("open-clip-tiny");
    let device = Device::flex();
    let ref_bytes = std::fs::read(dir.join("reference.safetensors")).unwrap();
    let r = Weights::from_bytes("reference.safetensors", &ref_bytes).unwrap();
    let image = r.tensor::<4>("image", &device).unwrap();
    let wanted = specs(&["hpsv2"]);
    // No tokenizer source: the diffusion model's.
    let model = common::read_model(&fixtures().join("sd1-tiny"));
    let score = |source: RewardSource| {
        let files =
            RewardFiles::new(&wanted, BTreeMap::from([("hpsv2".to_string(), source)])).unwrap();
        assert!(files.notes().is_empty(), "{:?}", files.notes());
        let reward = files
            .build(&wanted, &RewardOptions::default(), Some(&model), &device)
            .unwrap();
        term_values(&reward, image.clone()).remove(0)
    };
    let from_folder = score(folder(&dir));
    let from_file = score(file(
        &dir.join("open_clip_model.safetensors"),
        Some(&dir.join("open_clip_config.json")),
    ));
    assert_eq!(from_folder, from_file);
    let config = OpenClipConfig::from_json(
        "c",
        &std::fs::read_to_string(dir.join("open_clip_config.json")).unwrap(),
    )
    .unwrap();
    let weights = std::fs::read(dir.join("open_clip_model.safetensors")).unwrap();
    let clip = Arc::new(load_open_clip(&config, "w", &weights, &device).unwrap());
    let tok = Arc::new(draft_core::model::files::load_tokenizer_in(&model, "tokenizer/").unwrap());
    let direct = ClipSimilarity::new(clip, tok, Similarity::Hpsv2).unwrap();
    let want = values(direct.score(image, &prompts()).unwrap()).0;
    assert!(
        max_abs(&from_folder, &want) < 1e-6,
        "{from_folder:?} vs {want:?}"
    );
    let pytorch = r.read_f32("hpsv2.value").unwrap().0;
    assert!(
        max_abs(&from_folder, &pytorch) < 1e-4,
        "{from_folder:?} vs {pytorch:?}"
    );

    // A checkpoint without its config: HPSv2's own architecture is assumed, and said.
    let files = RewardFiles::new(
        &wanted,
        BTreeMap::from([(
            "hpsv2".to_string(),
            file(&dir.join("open_clip_model.safetensors"), None),
        )]),
    )
    .unwrap();
    assert_eq!(files.notes().len(), 1);
    assert!(
        files.notes()[0].ends_with(
            "open_clip_model.safetensors: no open_clip_config.json beside it; assuming OpenCLIP ViT-H-14 (HPSv2's)"
        ),
        "{:?}",
        files.notes()
    );
}

#[test]
fn missing_or_wrong_sources_are_refused_by_name() {
    let dir = fixtures();
    let err = |wanted: &[&str], sources: Vec<(&str, RewardSource)>| {
        let sources = sources
            .into_iter()
            .map(|(n, s)| (n.to_string(), s))
            .collect();
        match RewardFiles::new(&specs(wanted), sources) {
            Ok(_) => panic!("{wanted:?} accepted"),
            Err(e) => e.to_string(),
        }
    };
    let e = err(&["laion-aesthetic"], vec![]);
    assert!(
        e.starts_with("--reward laion-aesthetic needs --reward-model clip=PATH"),
        "{e}"
    );
    let e = err(
        &["colorfulness", "laion-aesthetic"],
        vec![("clip", folder(&dir.join("clip-tiny")))],
    );
    assert!(
        e.starts_with("--reward laion-aesthetic needs --reward-model laion-aesthetic=PATH"),
        "{e}"
    );
    let e = err(&["clip-score"], vec![]);
    assert!(
        e.contains("--reward clip-score needs --reward-model clip="),
        "{e}"
    );
    let e = err(
        &["hpsv2"],
        vec![("pickscore", folder(&dir.join("clip-tiny")))],
    );
    assert!(
        e.contains("--reward hpsv2 needs --reward-model hpsv2="),
        "{e}"
    );
    let e = err(
        &["colorfulness"],
        vec![("clap", folder(&dir.join("clip-tiny")))],
    );
    assert!(
        e.starts_with("--reward-model `clap`: expected one of clip,"),
        "{e}"
    );
    // A transformers checkpoint is only readable as a folder (its config.json).
    let e = err(
        &["pickscore"],
        vec![(
            "pickscore",
            file(&dir.join("clip-tiny/model.safetensors"), None),
        )],
    );
    assert!(e.contains("not an OpenCLIP state dict"), "{e}");
    // A folder without a config, and one without weights.
    let e = err(
        &["pickscore"],
        vec![("pickscore", folder(&dir.join("sd1-tiny/tokenizer")))],
    );
    assert!(
        e.contains("neither config.json (transformers) nor open_clip_config.json"),
        "{e}"
    );
    let RewardSource::Folder(mut no_weights) = folder(&dir.join("clip-tiny")) else {
        unreachable!()
    };
    no_weights.files.remove("model.safetensors");
    let e = err(
        &["pickscore"],
        vec![("pickscore", RewardSource::Folder(no_weights))],
    );
    assert!(
        e.contains("a transformers CLIP folder needs model.safetensors"),
        "{e}"
    );
    // A tokenizer folder without a tokenizer; a prompt reward with no tokenizer anywhere.
    let e = err(
        &["colorfulness"],
        vec![("tokenizer", folder(&dir.join("clip-tiny")))],
    );
    assert!(
        e.contains("no tokenizer.json or vocab.json + merges.txt there"),
        "{e}"
    );
    let wanted = specs(&["pickscore"]);
    let files = RewardFiles::new(
        &wanted,
        BTreeMap::from([("pickscore".to_string(), folder(&dir.join("clip-tiny")))]),
    )
    .unwrap();
    let e = match files.build(&wanted, &RewardOptions::default(), None, &Device::flex()) {
        Ok(_) => panic!("built without a tokenizer"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("add --reward-model tokenizer=DIR"), "{e}");
}
