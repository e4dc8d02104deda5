//! Stable Diffusion XL parity with diffusers' `StableDiffusionXLPipeline` (PyTorch, f32) on the
//! tiny SDXL pipeline that `tests/fixtures/make_sdxl_fixtures.py` builds: both towers' ids and
//! embeddings (tower 1 saved with `text_model.` keys, tower 2 without, as transformers 5 saves
//! it), the pooled projection, one UNet call with its added conditions (size ids and pooled
//! embedding), the VAE decode, and whole DDIM + CFG runs from fixed latents with the scheduler
//! built from SDXL's Euler config: no negative prompt (zeros, `force_zeros_for_empty_prompt`),
//! a negative prompt, and non-default size ids. CPU backend and wgpu, as parity.rs.

use burn::prelude::*;
use draft_core::model::pipeline::{SampleOptions, SizeConditioning, to_nhwc};
use draft_core::model::weights::Weights;
use draft_core::{ModelFiles, Pipeline};

mod common;
use common::{assert_close_scaled, devices, fixtures, read_model, values};

const TOL: f32 = 1e-4;

/// As parity.rs: on wgpu the kernels autotune picks by timing change from run to run, and the
/// sums' order with them; the final latents (to ~40) measured 8.9e-5 relative on lavapipe.
const WGPU_LATENTS_TOL: f32 = 2e-4;

fn close<const D: usize>(what: &str, got: Tensor<D>, want: &Weights, key: &str, relative: bool) {
    assert_close_scaled(what, got, want, key, relative, TOL)
}

struct Fixture {
    model: ModelFiles,
    reference: Vec<u8>,
    json: serde_json::Value,
}

impl Fixture {
    fn load() -> Self {
        let dir = fixtures().join("sdxl-tiny");
        Self {
            model: read_model(&dir),
            reference: std::fs::read(dir.join("reference.safetensors")).unwrap(),
            json: serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap())
                .unwrap(),
        }
    }

    fn reference(&self) -> Weights<'_> {
        Weights::from_bytes("reference.safetensors", &self.reference).unwrap()
    }

    /// The options of reference run `run` (`a`, `b`, `c` of reference.json): its negative
    /// prompt (none: "") and size ids (none: the defaults).
    fn run_options(&self, run: &str) -> SampleOptions {
        let cfg = &self.json["runs"][run];
        let pair = |key: &str| {
            cfg[key]
                .as_array()
                .map(|a| [0, 1].map(|i| a[i].as_u64().unwrap() as usize))
        };
        SampleOptions {
            prompts: self.strings("prompts"),
            negative_prompt: match &cfg["negative_prompt"] {
                serde_json::Value::Array(a) => a[0].as_str().unwrap().to_string(),
                _ => String::new(),
            },
            steps: cfg["num_inference_steps"].as_u64().unwrap() as usize,
            guidance: cfg["guidance_scale"].as_f64().unwrap(),
            eta: 0.0,
            seed: 0,
            size: SizeConditioning {
                original: pair("original_size"),
                crop: pair("crops_coords_top_left").unwrap_or([0, 0]),
                target: pair("target_size"),
            },
        }
    }

    /// `pipe`'s images of run `run` from the fixture's initial latents.
    fn sample(&self, pipe: &Pipeline, run: &str, device: &Device) -> Tensor<4> {
        let x_t = self.reference().tensor::<4>("init_noise", device).unwrap();
        let latents = pipe
            .sample_latents(&self.run_options(run), x_t, |_, _| {})
            .unwrap();
        to_nhwc(pipe.decode(latents))
    }

    fn strings(&self, key: &str) -> Vec<String> {
        self.json[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_str().unwrap().to_string())
            .collect()
    }
}

fn ints(t: Tensor<2, Int>) -> Vec<i64> {
    pollster::block_on(t.into_data_async())
        .unwrap()
        .convert::<i64>()
        .try_into_vec::<i64>()
        .unwrap()
}

#[test]
fn sdxl_text_embeddings() {
    let fx = Fixture::load();
    let r = fx.reference();
    let negative = fx.json["negative_prompt"].as_str().unwrap().to_string();
    for (dev, device) in devices() {
        let pipe = Pipeline::load(&fx.model, &device).unwrap();
        assert!(pipe.is_sdxl() && pipe.force_zeros_for_empty_prompt);
        for (key, texts) in [
            ("prompt", fx.strings("prompts")),
            ("uncond", vec![String::new()]),
            ("negative", vec![negative.clone()]),
        ] {
            let tokens = pipe.tokenize_all(&texts).unwrap();
            assert_eq!(
                ints(tokens.ids.clone()),
                r.read_i64(&format!("{key}_ids")).unwrap().0
            );
            let t2 = tokens.tower_2.as_ref().unwrap();
            assert_eq!(
                ints(t2.ids.clone()),
                r.read_i64(&format!("{key}_ids_2")).unwrap().0,
                "{key}: tokenizer_2 pads with its own `!`"
            );
            let e = pipe.encode_tokens(&tokens);
            let what = format!("sdxl/{dev} {key}");
            close(
                &format!("{what} embeddings"),
                e.hidden,
                &r,
                &format!("{key}_embeddings"),
                false,
            );
            close(
                &format!("{what} pooled"),
                e.pooled.unwrap(),
                &r,
                &format!("{key}_pooled"),
                false,
            );
        }
        // No negative prompt: zeros, for the context and the pooled embedding.
        let zeros = pipe.encode_tokens(&pipe.tokenize_negative("").unwrap());
        let (h, _) = values(zeros.hidden);
        let (p, shape) = values(zeros.pooled.unwrap());
        assert!(h.iter().chain(&p).all(|v| *v == 0.0) && shape == [1, 40]);
    }
}

#[test]
fn sdxl_unet_and_vae() {
    let fx = Fixture::load();
    let r = fx.reference();
    for (dev, device) in devices() {
        let pipe = Pipeline::load(&fx.model, &device).unwrap();
        let x = r.tensor::<4>("unet_sample", &device).unwrap();
        let ctx = r
            .tensor::<3>("unet_encoder_hidden_states", &device)
            .unwrap();
        let pooled = r.tensor::<2>("unet_text_embeds", &device).unwrap();
        let (ids, _) = r.read_f32("unet_time_ids").unwrap();
        // The UNet's added input for two samples with different size ids.
        let added: Vec<Tensor<2>> = (0..2)
            .map(|i| {
                let t: [f32; 6] = ids[i * 6..i * 6 + 6].try_into().unwrap();
                pipe.unet.added_input(pooled.clone().narrow(0, i, 1), &t)
            })
            .collect();
        let t = r.read_f32("unet_timestep").unwrap().0[0];
        let out = pipe
            .unet
            .forward_added(x, t, ctx, Some(Tensor::cat(added, 0)));
        close(&format!("sdxl/{dev} unet"), out, &r, "unet_out", false);

        let z = r.tensor::<4>("vae_decode_in", &device).unwrap();
        let decoded = pipe.vae.as_ref().unwrap().decode(z);
        close(
            &format!("sdxl/{dev} vae decode"),
            decoded,
            &r,
            "vae_decode_out",
            false,
        );
        assert_eq!(pipe.vae_config.as_ref().unwrap().scaling_factor, 0.13025);
    }
}

#[test]
fn sdxl_sampling() {
    let fx = Fixture::load();
    let r = fx.reference();
    for (dev, device) in devices() {
        let pipe = Pipeline::load(&fx.model, &device).unwrap();
        for run in ["a", "b", "c"] {
            let cfg = &fx.json["runs"][run];
            let options = fx.run_options(run);
            let ddim =
                draft_core::model::schedule::Ddim::new(&pipe.scheduler, options.steps).unwrap();
            let want: Vec<usize> = cfg["timesteps"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_u64().unwrap() as usize)
                .collect();
            assert_eq!(
                ddim.timesteps, want,
                "DDIM from SDXL's Euler config, run {run}"
            );
            let x_t = r.tensor::<4>("init_noise", &device).unwrap();
            let latents = pipe.sample_latents(&options, x_t, |_, _| {}).unwrap();
            let what = format!("sdxl/{dev} run {run}");
            assert_close_scaled(
                &format!("{what} latents (relative)"),
                latents.clone(),
                &r,
                &format!("latents_{run}"),
                true,
                if dev == "wgpu" { WGPU_LATENTS_TOL } else { TOL },
            );
            let images = to_nhwc(pipe.decode(latents));
            close(
                &format!("{what} images"),
                images,
                &r,
                &format!("images_{run}"),
                false,
            );
        }
    }
}

/// DRaFT-1, DRaFT-2 and DRaFT-LV (n = 2) LoRA gradients on SDXL against diffusers + peft
/// autograd (`sdxl-tiny/draft/`): the added conditions and the zeroed unconditional side are
/// in every differentiated UNet call. On the CPU backend (the wgpu gradient kernels are the
/// SD-1.x ones, checked by draft.rs; a lavapipe SDXL run would add minutes to CI).
#[test]
fn sdxl_draft_gradients_match_pytorch() {
    use draft_core::model::lora::{LoraFile, LoraTarget};
    use draft_core::model::pipeline::LoraSetup;
    use draft_core::noise::NoiseRng;
    use draft_core::reward::builtin::{self, RewardOptions, WeightedReward};
    use draft_core::train::engine::{Draws, Engine, Method, Prompts};

    let dir = fixtures().join("sdxl-tiny");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("draft/draft.json")).unwrap()).unwrap();
    let grads = std::fs::read(dir.join("draft/grads.safetensors")).unwrap();
    let reference = Weights::from_bytes("grads.safetensors", &grads).unwrap();
    let noise = std::fs::read(dir.join("init_noise.safetensors")).unwrap();
    let noise = Weights::from_bytes("init_noise.safetensors", &noise).unwrap();
    let device = Device::flex();
    let rank = json["lora"]["rank"].as_u64().unwrap() as usize;
    let alpha = json["lora"]["alpha"].as_f64().unwrap();
    let steps = json["T"].as_u64().unwrap() as usize;

    let model = read_model(&dir);
    let pipe =
        Pipeline::load_with_lora(&model, &device, &LoraSetup::Targets(vec![LoraTarget::Attn]))
            .unwrap();
    pipe.lora.init_trainable(rank, alpha, 0, &device);
    let file = LoraFile::parse(
        "lora.safetensors",
        &std::fs::read(dir.join("draft/lora.safetensors")).unwrap(),
    )
    .unwrap();
    pipe.lora.load_trainable(&file, alpha, &device).unwrap();
    let names = pipe.lora.param_names();
    assert_eq!(
        names.len(),
        2 * json["lora"]["num_modules"].as_u64().unwrap() as usize
    );

    let specs: Vec<String> = builtin::BUILTIN.iter().map(|s| s.to_string()).collect();
    let reward = WeightedReward::from_specs(&specs, &RewardOptions::default()).unwrap();
    let engine = Engine::new(&pipe, steps, 0.0, &reward).unwrap();
    let texts: Vec<String> = json["prompts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p.as_str().unwrap().to_string())
        .collect();
    let prompts =
        Prompts::new(&pipe, &texts, "", json["guidance_scale"].as_f64().unwrap()).unwrap();
    let lv: Tensor<5> = reference.tensor("lv_noise", &device).unwrap();
    let [n, b, c, h, w] = lv.dims();
    for (case, method) in [
        ("k1", Method::DraftK { k: 1 }),
        ("k2", Method::DraftK { k: 2 }),
        ("lv", Method::DraftLv { n: 2 }),
    ] {
        let draws = Draws {
            x_t: noise.tensor::<4>("noise", &device).unwrap(),
            step_noise: NoiseRng::new(0),
            lv_noise: Some(
                (0..n)
                    .map(|j| lv.clone().narrow(0, j, 1).reshape([b, c, h, w]))
                    .collect(),
            ),
            truncation: 0.0,
        };
        let eval = pollster::block_on(engine.evaluate(method, &prompts, draws)).unwrap();
        let loss_ref = reference.read_f32(&format!("{case}.loss")).unwrap().0[0];
        let (mut num, mut den, mut worst) = (0f64, 0f64, 0f32);
        for (name, g) in names.iter().zip(&eval.grads) {
            let key = format!("{case}.{}", name.strip_prefix("unet.").unwrap());
            let (want, _) = reference.read_f32(&key).unwrap();
            let (got, _) = values(g.clone());
            for (a, b) in got.iter().zip(&want) {
                num += ((a - b) as f64).powi(2);
                den += (*b as f64).powi(2);
            }
            worst = worst.max(common::rel_err(&got, &want));
        }
        let global = (num / den).sqrt() as f32;
        eprintln!(
            "sdxl {case}: loss {} (ref {loss_ref}); grad rel err global {global:.1e}, worst \
             tensor {worst:.1e}",
            eval.loss
        );
        assert!(den > 0.0);
        assert!((eval.loss - loss_ref).abs() < 1e-4 * loss_ref.abs().max(1e-3));
        // As draft.rs's CPU bounds for SD-1.x.
        assert!(
            global < 1e-4 && worst < 3e-4,
            "sdxl {case}: {global:e} / {worst:e}"
        );
    }
}

/// Broken SDXL folders end with one line naming the file and the field, never a panic.
#[test]
fn sdxl_bad_folders_are_refused_by_name() {
    let dir = fixtures().join("sdxl-tiny");
    let device = Device::flex();
    let edit_json = |m: &mut ModelFiles, path: &str, f: &dyn Fn(&mut serde_json::Value)| {
        let mut v: serde_json::Value = serde_json::from_str(m.text(path).unwrap()).unwrap();
        f(&mut v);
        m.insert(path, serde_json::to_vec(&v).unwrap());
    };
    let error = |m: &ModelFiles| match Pipeline::load(m, &device) {
        Ok(_) => panic!("loaded"),
        Err(e) => e.to_string(),
    };

    // model_index.json names text_encoder_2, whose folder is missing.
    let mut m = read_model(&dir);
    m.files.retain(|k, _| !k.starts_with("text_encoder_2/"));
    m.sources.retain(|k, _| !k.starts_with("text_encoder_2/"));
    let e = error(&m);
    assert!(e.contains("text_encoder_2/config.json"), "{e}");

    // Neither named nor present: the UNet's text_time needs it.
    edit_json(&mut m, "model_index.json", &|v| {
        v.as_object_mut().unwrap().remove("text_encoder_2");
    });
    let e = error(&m);
    assert!(
        e.contains("unet/config.json") && e.contains("text_encoder_2"),
        "{e}"
    );

    // The add_embedding's input does not fit the towers and size ids.
    let mut m = read_model(&dir);
    edit_json(&mut m, "unet/config.json", &|v| {
        v["projection_class_embeddings_input_dim"] = 90.into();
    });
    let e = error(&m);
    assert!(
        e.contains("unet/config.json") && e.contains("projection_class_embeddings_input_dim"),
        "{e}"
    );

    // A context size that is not the two towers' hidden sizes side by side.
    let mut m = read_model(&dir);
    edit_json(&mut m, "unet/config.json", &|v| {
        v["cross_attention_dim"] = 32.into();
    });
    let e = error(&m);
    assert!(
        e.contains("cross_attention_dim") && e.contains("32 + 48"),
        "{e}"
    );

    // tokenizer_2 of another length than tokenizer/.
    let mut m = read_model(&dir);
    edit_json(&mut m, "tokenizer_2/tokenizer_config.json", &|v| {
        v["model_max_length"] = 64.into();
    });
    let e = error(&m);
    assert!(e.contains("tokenizer_2/tokenizer_config.json"), "{e}");

    // A tower 2 without its projection.
    let mut m = read_model(&dir);
    edit_json(&mut m, "text_encoder_2/config.json", &|v| {
        v.as_object_mut().unwrap().remove("projection_dim");
    });
    let e = error(&m);
    assert!(
        e.contains("text_encoder_2/config.json") && e.contains("projection_dim"),
        "{e}"
    );

    // Another addition_embed_type.
    let mut m = read_model(&dir);
    edit_json(&mut m, "unet/config.json", &|v| {
        v["addition_embed_type"] = "image".into();
    });
    let e = error(&m);
    assert!(e.contains("addition_embed_type"), "{e}");
}

/// A single-file SDXL checkpoint (Stability's layout: `conditioner.embedders.{0,1}`, the UNet's
/// `label_emb`, f16) with the tiny SDXL's configs and tokenizers (`--model-config`) gives the
/// images diffusers' `StableDiffusionXLPipeline.from_single_file` gives
/// (`tests/fixtures/make_sdxl_single_file.py`), on the CPU backend and on wgpu.
#[test]
fn sdxl_single_file_matches_diffusers_from_single_file() {
    let fx = Fixture::load();
    let dir = fixtures().join("sdxl-single");
    let bytes = std::fs::read(dir.join("sdxl-tiny.safetensors")).unwrap();
    let reference = std::fs::read(dir.join("reference.safetensors")).unwrap();
    let reference = Weights::from_bytes("reference.safetensors", &reference).unwrap();
    let config_dir = fixtures().join("sdxl-tiny");
    let config = ModelFiles::read_configs(config_dir.display().to_string(), |rel| {
        Ok::<_, ()>(std::fs::read(config_dir.join(rel)).ok())
    })
    .unwrap();
    let files =
        ModelFiles::from_checkpoint("sdxl-tiny.safetensors", bytes, Some(&config), &[]).unwrap();
    for (dev, device) in devices() {
        let pipe = Pipeline::load(&files, &device).unwrap();
        assert!(pipe.is_sdxl());
        let images = fx.sample(&pipe, "a", &device);
        close(
            &format!("sdxl single file/{dev} images"),
            images,
            &reference,
            "images_a",
            false,
        );
    }
}

/// The architecture read from the keys and shapes of a checkpoint with SDXL-base 1.0's exact
/// architecture (`sdxl-single/sdxl_ldm_shapes.json`) is SDXL-base's diffusers config, and the
/// loader accepts what is inferred.
#[test]
fn sdxl_base_architecture_is_inferred_from_a_single_file() {
    use draft_core::model::layouts::ldm;
    use draft_core::model::models::{
        clip_text::CLIPTextConfig, unet::UNet2DConditionConfig, vae::AutoencoderKLConfig,
    };
    let all: serde_json::Value = serde_json::from_slice(
        &std::fs::read(fixtures().join("sdxl-single/sdxl_ldm_shapes.json")).unwrap(),
    )
    .unwrap();
    let shapes: std::collections::BTreeMap<String, Vec<usize>> =
        serde_json::from_value(all["sdxl"].clone()).unwrap();
    assert!(ldm::is_sdxl(&shapes));
    let inferred = ldm::infer("sd_xl_base_1.0.safetensors", &shapes).unwrap();
    let configs = &all["configs"];
    let check = |what: &str, got: &serde_json::Value, fields: &[&str]| {
        for f in fields {
            assert_eq!(got[f], configs[what][f], "{what}: {f}");
        }
    };
    check(
        "unet",
        &inferred.unet,
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
            "transformer_layers_per_block",
            "addition_embed_type",
            "addition_time_embed_dim",
            "projection_class_embeddings_input_dim",
            "sample_size",
        ],
    );
    check(
        "vae",
        &inferred.vae,
        &[
            "block_out_channels",
            "layers_per_block",
            "latent_channels",
            "scaling_factor",
            "force_upcast",
            "sample_size",
        ],
    );
    let tower_fields = [
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "max_position_embeddings",
        "hidden_act",
        "projection_dim",
    ];
    check("text_encoder", &inferred.text_encoder, &tower_fields);
    let te2 = inferred.text_encoder_2.as_ref().unwrap();
    check("text_encoder_2", te2, &tower_fields);
    assert_eq!(inferred.model_index["force_zeros_for_empty_prompt"], true);
    UNet2DConditionConfig::from_json("unet", &inferred.unet.to_string()).unwrap();
    AutoencoderKLConfig::from_json("vae", &inferred.vae.to_string()).unwrap();
    CLIPTextConfig::from_json("te", &inferred.text_encoder.to_string()).unwrap();
    let c2 = CLIPTextConfig::from_json("te2", &te2.to_string()).unwrap();
    assert_eq!(c2.projection_dim, Some(1280));
}

/// An SDXL LoRA on the UNet and both towers, in diffusers' layout (`text_encoder_2.…`) and in
/// kohya sd-scripts' (`lora_unet_input_blocks_…`, `lora_te1_`, `lora_te2_`, alpha = rank / 2):
/// `draft sample --lora` gives diffusers' `load_lora_weights` images with either file.
#[test]
fn sdxl_lora_files_match_diffusers_load_lora_weights() {
    use draft_core::model::lora::LoraFile;
    use draft_core::model::pipeline::LoraSetup;
    let fx = Fixture::load();
    let dir = fixtures().join("sdxl-single");
    let reference = std::fs::read(dir.join("reference.safetensors")).unwrap();
    let reference = Weights::from_bytes("reference.safetensors", &reference).unwrap();
    let device = Device::flex();
    for name in ["lora_diffusers.safetensors", "lora_kohya_sdxl.safetensors"] {
        let file = LoraFile::parse(name, &std::fs::read(dir.join(name)).unwrap()).unwrap();
        assert_eq!(file.paths("text_encoder_2").len(), 12, "{name}");
        assert_eq!(file.paths("unet").len(), 136, "{name}");
        let pipe =
            Pipeline::load_with_lora(&fx.model, &device, &LoraSetup::Files(vec![(&file, 1.0)]))
                .unwrap();
        let images = fx.sample(&pipe, "a", &device);
        close(
            &format!("sdxl {name}"),
            images,
            &reference,
            "lora_images",
            false,
        );
    }
}
