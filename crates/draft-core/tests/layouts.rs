//! Layouts mapped at the edge, checked against the libraries that define them
//! (`tests/fixtures/make_layout_fixtures.py`): the kohya file `draft train` writes is diffusers'
//! `convert_state_dict_to_kohya` output key for key, and the architecture inferred from a
//! single-file checkpoint's keys and shapes is the diffusers config of SD-1.5 and SD-2.1.

use std::collections::BTreeMap;

use burn::prelude::*;
use draft_core::Pipeline;
use draft_core::model::layouts::ldm;
use draft_core::model::lora::{LoraFile, LoraTarget};
use draft_core::model::pipeline::LoraSetup;
use draft_core::model::weights::Weights;

mod common;
use common::{fixtures, read_model};

#[test]
fn kohya_writer_matches_diffusers_convert_state_dict_to_kohya() {
    let device = Device::flex();
    let model = read_model(&fixtures().join("sd1-tiny"));
    let pipe = Pipeline::load_with_lora(
        &model,
        &device,
        &LoraSetup::Targets(LoraTarget::ALL.to_vec()),
    )
    .unwrap();
    let bytes = std::fs::read(fixtures().join("draft/lora_targets.safetensors")).unwrap();
    let file = LoraFile::parse("lora_targets", &bytes).unwrap();
    let rank = file.rank();
    pipe.lora.init_trainable(rank, rank as f64, 0, &device);
    pipe.lora
        .load_trainable(&file, rank as f64, &device)
        .unwrap();
    let ours = pollster::block_on(pipe.lora.to_kohya_safetensors()).unwrap();
    let ours = Weights::from_bytes("ours", &ours).unwrap();
    let theirs = std::fs::read(fixtures().join("layouts/lora_kohya.safetensors")).unwrap();
    // diffusers names the text encoder `lora_te1_` (SDXL's convention); kohya's sd-scripts, and
    // A1111's mapping for SD-1.x, `lora_te_`, which we write. Otherwise the files agree.
    let theirs = Weights::from_bytes("lora_kohya.safetensors", &theirs)
        .unwrap()
        .renamed(|k| Some(k.replacen("lora_te1_", "lora_te_", 1)))
        .unwrap();
    assert_eq!(ours.keys(), theirs.keys(), "key sets differ");
    assert!(
        ours.keys()
            .iter()
            .any(|k| k.starts_with("lora_te_text_model_encoder_layers_"))
    );
    assert!(
        ours.keys()
            .iter()
            .any(|k| k.ends_with("conv1.lora_down.weight"))
    );
    let mut worst = 0f32;
    for key in theirs.keys() {
        let (a, sa) = ours.read_f32(&key).unwrap();
        let (b, sb) = match theirs.read_f32(&key) {
            Ok(v) => v,
            // diffusers writes alpha as an integer tensor.
            Err(_) => {
                let (v, s) = theirs.read_i64(&key).unwrap();
                (v.into_iter().map(|x| x as f32).collect(), s)
            }
        };
        assert_eq!(sa, sb, "{key}: shape");
        for (x, y) in a.iter().zip(&b) {
            worst = worst.max((x - y).abs() / y.abs().max(1e-3));
        }
    }
    eprintln!(
        "{} kohya tensors, worst relative difference {worst:.2e}",
        theirs.keys().len()
    );
    assert!(worst <= 1e-6, "values differ: {worst}");
}

/// diffusers' kohya file (alpha = rank as an int64) and kohya-ss sd-scripts' layout (`lora_te_`,
/// float alpha 2 ≠ rank 4, `lora_up` doubled to compensate) read as the same LoRA as the
/// diffusers/peft file they were converted from.
#[test]
fn kohya_files_read_as_the_same_lora_as_the_diffusers_file() {
    let read = |p: &str| std::fs::read(fixtures().join(p)).unwrap();
    let peft = LoraFile::parse("peft", &read("draft/lora_targets.safetensors")).unwrap();
    for name in [
        "layouts/lora_kohya.safetensors",
        "layouts/lora_kohya_sd_scripts.safetensors",
    ] {
        let kohya = LoraFile::parse(name, &read(name)).unwrap();
        assert_eq!(
            kohya.modules.keys().collect::<Vec<_>>(),
            peft.modules.keys().collect::<Vec<_>>(),
            "{name}"
        );
        for (id, m) in &peft.modules {
            let k = &kohya.modules[id];
            assert_eq!(k.a, m.a, "{name} {id}: A");
            assert_eq!(k.b_shape, m.b_shape, "{name} {id}: B shape");
            let err =
                k.b.iter()
                    .zip(&m.b)
                    .map(|(x, y)| (x - y).abs() / y.abs().max(1e-3))
                    .fold(0f32, f32::max);
            assert!(err <= 1e-6, "{name} {id}: B differs by {err}");
        }
    }
}

/// The LDM keys and shapes of SD-1.5 and SD-2.1 (no weights) and diffusers' configs for them.
fn ldm_shapes() -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(fixtures().join("layouts/ldm_shapes.json")).unwrap())
        .unwrap()
}

#[test]
fn inferred_architecture_is_sd15_and_sd21() {
    let all = ldm_shapes();
    for name in ["sd15", "sd21"] {
        let shapes: BTreeMap<String, Vec<usize>> =
            serde_json::from_value(all[name].clone()).unwrap();
        let inferred = ldm::infer(name, &shapes).unwrap();
        let configs = &all["configs"][name];
        let check =
            |what: &str, got: &serde_json::Value, want: &serde_json::Value, fields: &[&str]| {
                for f in fields {
                    assert_eq!(got[f], want[f], "{name} {what}: {f}");
                }
            };
        check(
            "unet",
            &inferred.unet,
            &configs["unet"],
            &[
                "in_channels",
                "out_channels",
                "block_out_channels",
                "layers_per_block",
                "down_block_types",
                "up_block_types",
                "cross_attention_dim",
                "attention_head_dim",
                "use_linear_projection",
            ],
        );
        check(
            "vae",
            &inferred.vae,
            &configs["vae"],
            &[
                "in_channels",
                "out_channels",
                "latent_channels",
                "block_out_channels",
                "layers_per_block",
            ],
        );
        check(
            "text_encoder",
            &inferred.text_encoder,
            &configs["text_encoder"],
            &[
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "max_position_embeddings",
                "hidden_act",
            ],
        );
        // What the loader makes of them.
        use draft_core::model::models::{
            clip_text::CLIPTextConfig, unet::UNet2DConditionConfig, vae::AutoencoderKLConfig,
        };
        UNet2DConditionConfig::from_json(name, &inferred.unet.to_string()).unwrap();
        AutoencoderKLConfig::from_json(name, &inferred.vae.to_string()).unwrap();
        CLIPTextConfig::from_json(name, &inferred.text_encoder.to_string()).unwrap();
        draft_core::model::schedule::SchedulerConfig::from_json(
            name,
            &inferred.scheduler.to_string(),
        )
        .unwrap();
        let want_v = name == "sd21";
        assert_eq!(
            inferred.scheduler["prediction_type"] == "v_prediction",
            want_v,
            "{name}: prediction type"
        );
    }
}

/// A `CLIPModel` saved by transformers 5 (its config gains `dtype`, `pad_token_id`; its keys
/// keep `text_model.` / `vision_model.`) gives the transformers-4 fixture's features.
#[test]
fn transformers5_clip_model_loads_for_the_reward_towers() {
    let dir = fixtures();
    let ref_bytes = std::fs::read(dir.join("rewards/reference.safetensors")).unwrap();
    let r = Weights::from_bytes("reference.safetensors", &ref_bytes).unwrap();
    let (ids, ids_shape) = r.read_i64("input_ids").unwrap();
    let ids: Vec<Vec<i64>> = ids.chunks(ids_shape[1]).map(|c| c.to_vec()).collect();
    let device = Device::flex();
    let config = std::fs::read_to_string(dir.join("layouts/clip-tiny-tf5/config.json")).unwrap();
    let weights = std::fs::read(dir.join("layouts/clip-tiny-tf5/model.safetensors")).unwrap();
    let clip = draft_core::reward::models::load_clip(
        "clip-tiny-tf5/config.json",
        &config,
        "clip-tiny-tf5/model.safetensors",
        &weights,
        &device,
    )
    .unwrap();
    let image = r.tensor::<4>("image", &device).unwrap();
    let pixels = draft_core::reward::models::preprocess(image, clip.image_size);
    let close = |got: Tensor<2>, key: &str| {
        let (got, _) = common::values(got);
        let want = r.read_f32(key).unwrap().0;
        let err = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(err < 1e-4, "{key}: {err}");
    };
    close(clip.image_features(pixels), "image_embeds");
    close(clip.text_features(&ids, &device), "text_embeds");
}
