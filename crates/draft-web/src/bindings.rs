//! The JavaScript face of [`Session`]: promises for the page, one call at a time.

use std::rc::Rc;

use draft_core::ModelFiles;
use draft_core::reward::files::RewardSource;
use js_sys::{Array, Promise, Uint8Array, Uint8ClampedArray};
use serde::Serialize;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::future_to_promise;

use crate::{RunInputs, Session, WebOptions};

// Two shims for Burn 0.22.1's WGSL in Chrome, installed before the device opens:
// - its matmul kernels start with `enable subgroups;`, but wgpu 30's WebGPU backend never asks
//   the browser for the `subgroups` feature, so Chrome rejects them and the device is lost:
//   `requestDevice` gets the feature added when the adapter offers it;
// - Chrome's WGSL compiler (Tint) also runs the subgroup uniformity analysis, which rejects
//   some of those kernels ("'subgroupAdd' must only be called from subgroup uniform control
//   flow"); naga, which compiles the same WGSL natively, has no such check. Shaders that
//   enable subgroups get `diagnostic(off, subgroup_uniformity);`, the WGSL directive that
//   turns the analysis off. The browser tests check the results against the native ones.
#[wasm_bindgen(inline_js = r#"
export function draft_install_subgroups_shim() {
  if (typeof GPUAdapter === "undefined" || typeof GPUDevice === "undefined") return false;
  const adapter = GPUAdapter.prototype;
  if (adapter.__draftSubgroups) return true;
  const requestDevice = adapter.requestDevice;
  adapter.requestDevice = function (descriptor) {
    const d = Object.assign({}, descriptor || {});
    const features = new Set(d.requiredFeatures || []);
    if (this.features.has("subgroups")) features.add("subgroups");
    d.requiredFeatures = [...features];
    return requestDevice.call(this, d);
  };
  const createShaderModule = GPUDevice.prototype.createShaderModule;
  GPUDevice.prototype.createShaderModule = function (descriptor) {
    const code = descriptor && descriptor.code;
    if (typeof code === "string" && code.includes("enable subgroups;") && !code.includes("subgroup_uniformity")) {
      descriptor = Object.assign({}, descriptor, {
        code: code.replace("enable subgroups;", "enable subgroups;\ndiagnostic(off, subgroup_uniformity);"),
      });
    }
    return createShaderModule.call(this, descriptor);
  };
  adapter.__draftSubgroups = true;
  return true;
}
"#)]
extern "C" {
    /// Installs the shim; false when the browser has no WebGPU at all.
    #[wasm_bindgen(js_name = draft_install_subgroups_shim)]
    pub fn install_subgroups_shim() -> bool;
}

// A `Blob`'s bytes `start..end`, read synchronously (`FileReaderSync`: dedicated workers only,
// which is where the page's trainer runs).
#[wasm_bindgen(inline_js = r#"
export function draft_blob_size(blob) { return blob.size; }
export function draft_read_blob(blob, start, end) {
  if (typeof FileReaderSync === "undefined") {
    throw new Error("weights are read by range in a worker (FileReaderSync), not on the page's thread");
  }
  return new Uint8Array(new FileReaderSync().readAsArrayBuffer(blob.slice(start, end)));
}
"#)]
extern "C" {
    #[wasm_bindgen(js_name = draft_blob_size)]
    fn blob_size(blob: &JsValue) -> f64;
    #[wasm_bindgen(js_name = draft_read_blob, catch)]
    fn read_blob(blob: &JsValue, start: f64, end: f64) -> Result<Uint8Array, JsValue>;
}

/// A picked file (a `File`, or an OPFS file's `getFile()`) read by range: the model's weights
/// go to the GPU one tensor at a time and are never whole in WebAssembly memory.
struct BlobSource {
    blob: JsValue,
    len: u64,
}

/// A `Blob` (a picked `File`, an OPFS file) as a source read by range; reads need a dedicated
/// worker (`FileReaderSync`).
pub fn blob_source(blob: JsValue) -> Rc<dyn draft_core::model::source::ByteSource> {
    let len = blob_size(&blob) as u64;
    Rc::new(BlobSource { blob, len })
}

impl draft_core::model::source::ByteSource for BlobSource {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        let end = offset + buf.len() as u64;
        let bytes = read_blob(&self.blob, offset as f64, end as f64)
            .map_err(|e| format!("cannot read bytes {offset}..{end}: {e:?}"))?;
        if bytes.length() as usize != buf.len() {
            return Err(format!(
                "bytes {offset}..{end}: {} read (the file changed since it was picked?)",
                bytes.length()
            ));
        }
        bytes.copy_to(buf);
        Ok(())
    }
}

fn js_error(e: impl std::fmt::Display) -> JsValue {
    JsError::new(&e.to_string()).into()
}

fn to_js<T: Serialize>(value: &T) -> Result<JsValue, JsValue> {
    let json = serde_json::to_string(value).map_err(js_error)?;
    js_sys::JSON::parse(&json)
}

/// An evaluation as the page reads it, its images as `Uint8ClampedArray`s of RGBA.
fn evaluation_to_js(eval: &crate::Evaluation) -> Result<JsValue, String> {
    let out = to_js(eval).map_err(|e| format!("{e:?}"))?;
    let images = Array::new();
    for image in &eval.images {
        images.push(&Uint8ClampedArray::from(image.as_slice()));
    }
    js_sys::Reflect::set(&out, &"images".into(), &images).map_err(|e| format!("{e:?}"))?;
    Ok(out)
}

/// What a run is opened with besides its options: a picked model folder's files (paths
/// relative to the folder: `unet/config.json`, …; none: the embedded model) and a checkpoint
/// to continue.
#[wasm_bindgen]
pub struct RunFiles {
    inputs: RunInputs,
    /// A single-file checkpoint (`setModelCheckpoint`): name and `Blob`.
    single: Option<(String, JsValue)>,
}

#[wasm_bindgen]
impl RunFiles {
    #[wasm_bindgen(constructor)]
    pub fn new() -> RunFiles {
        RunFiles {
            inputs: RunInputs::default(),
            single: None,
        }
    }

    /// A file of the model folder named `folder`.
    #[wasm_bindgen(js_name = addModelFile)]
    pub fn add_model_file(&mut self, folder: String, path: String, bytes: Vec<u8>) {
        self.inputs
            .model
            .get_or_insert_with(|| ModelFiles::new(folder))
            .insert(path, bytes);
    }

    /// A weights file (`.safetensors`) of the model folder named `folder`, as a `Blob` (the
    /// picked `File`, or an OPFS file) that is read by range as the model loads, one tensor at a
    /// time: never whole in WebAssembly memory (4 GiB at most; an SD-1.5 folder is 2–4 GB).
    #[wasm_bindgen(js_name = addModelSource)]
    pub fn add_model_source(&mut self, folder: String, path: String, blob: JsValue) {
        self.inputs
            .model
            .get_or_insert_with(|| ModelFiles::new(folder))
            .insert_source(path, blob_source(blob));
    }

    /// A single-file SD-1.x/2.x/XL checkpoint (`.safetensors`, LDM layout) as a `Blob`, read by
    /// range as the model loads. Files of a folder added with `addModelFile` then act as its
    /// configs and tokenizer (the CLI's `--model-config`); without them they are inferred and
    /// the standard CLIP tokenizer is used.
    #[wasm_bindgen(js_name = setModelCheckpoint)]
    pub fn set_model_checkpoint(&mut self, name: String, blob: JsValue) {
        self.single = Some((name, blob));
    }

    /// A checkpoint (`checkpoint.safetensors` of `draft train` or of the page) to continue.
    #[wasm_bindgen(js_name = setCheckpoint)]
    pub fn set_checkpoint(&mut self, name: String, bytes: Vec<u8>) {
        self.inputs.checkpoint = Some((name, bytes));
    }

    /// A file of the folder named `folder` picked for the learned-reward model `role` (the
    /// CLI's `--reward-model ROLE=DIR`: `clip`, `pickscore`, `hpsv2`, `tokenizer`).
    #[wasm_bindgen(js_name = addRewardFile)]
    pub fn add_reward_file(&mut self, role: String, folder: String, path: String, bytes: Vec<u8>) {
        let source = self
            .inputs
            .rewards
            .entry(role)
            .or_insert_with(|| RewardSource::Folder(ModelFiles::new(folder)));
        match source {
            RewardSource::Folder(files) => files.insert(path, bytes),
            RewardSource::File { .. } => {}
        }
    }

    /// A single weights file for `role` (the CLI's `--reward-model ROLE=FILE`: the aesthetic
    /// MLP, an HPSv2 checkpoint), with the text of an `open_clip_config.json` picked beside it.
    #[wasm_bindgen(js_name = setRewardWeights)]
    pub fn set_reward_weights(
        &mut self,
        role: String,
        name: String,
        bytes: Vec<u8>,
        open_clip_config: Option<String>,
    ) {
        let open_clip_config = open_clip_config.map(|c| ("open_clip_config.json".to_string(), c));
        self.inputs.rewards.insert(
            role,
            RewardSource::File {
                name,
                bytes,
                open_clip_config,
            },
        );
    }

    /// The adapter's largest storage-buffer binding in bytes (`maxStorageBufferBindingSize`,
    /// capped by `maxBufferSize`): what cannot fit is refused before loading.
    #[wasm_bindgen(js_name = setBufferLimit)]
    pub fn set_buffer_limit(&mut self, bytes: f64) {
        self.inputs.max_binding_bytes = (bytes > 0.0).then_some(bytes as u64);
    }
}

impl RunFiles {
    /// What a run is built from: a single-file checkpoint becomes the model (with the folder's
    /// files as its configs).
    fn into_inputs(self) -> Result<RunInputs, String> {
        let RunFiles { mut inputs, single } = self;
        if let Some((name, blob)) = single {
            let data = draft_core::model::files::FileData::Source(blob_source(blob));
            inputs.model = Some(crate::single_file_model(
                &name,
                data,
                inputs.model.as_ref(),
            )?);
        }
        Ok(inputs)
    }
}

/// What the page says about the picked model before a run ([`crate::ModelPlan`]): `options` as
/// for [`WebTrainer::open`], `files` the picked model (its weights read for their headers only)
/// and the adapter's buffer limit, `shader_f16` whether the adapter computes in f16.
#[wasm_bindgen(js_name = planRun)]
pub fn plan_run(options: String, files: RunFiles, shader_f16: bool) -> Result<JsValue, JsValue> {
    let options = WebOptions::parse(&options).map_err(js_error)?;
    let inputs = files.into_inputs().map_err(js_error)?;
    let plan = crate::plan(
        &options,
        inputs.model.as_ref(),
        inputs.max_binding_bytes,
        shader_f16,
    )
    .map_err(js_error)?;
    to_js(&plan)
}

impl Default for RunFiles {
    fn default() -> Self {
        Self::new()
    }
}

/// One training run in the page.
#[wasm_bindgen]
pub struct WebTrainer {
    session: Rc<Session>,
}

impl WebTrainer {
    /// Runs `f` on the session as a promise; refused while another call holds the trainer.
    fn run<F, Fut>(&self, f: F) -> Promise
    where
        F: FnOnce(Rc<Session>) -> Fut + 'static,
        Fut: std::future::Future<Output = Result<JsValue, String>> + 'static,
    {
        let session = self.session.clone();
        future_to_promise(async move { f(session).await.map_err(js_error) })
    }
}

#[wasm_bindgen]
impl WebTrainer {
    /// A run. `options`: a JSON object of `WebOptions` (the CLI's flags in camelCase; missing
    /// ones take the model's defaults, as `draft train`'s); `files`: the model folder (none:
    /// the embedded `shapes-32`) and the checkpoint to continue, whose settings and prompts then
    /// win over the options' but the planned updates and run policy (`info().options` has
    /// them).
    pub async fn open(options: String, files: RunFiles) -> Result<WebTrainer, JsValue> {
        let options = WebOptions::parse(&options).map_err(js_error)?;
        let inputs = files.into_inputs().map_err(js_error)?;
        let session = Session::build(&options, inputs).await.map_err(js_error)?;
        Ok(WebTrainer {
            session: Rc::new(session),
        })
    }

    /// Calls `f(phase, done, total)` after every sampling step (`"sampling"`) and every
    /// back-propagated step (`"backward"`) of each update; when `f` returns `false` the update
    /// stops, rejecting with `cancelled`, and nothing is changed (the next update redoes it).
    /// `null` removes it.
    #[wasm_bindgen(js_name = onProgress)]
    pub fn on_progress(&self, f: Option<js_sys::Function>) -> Result<(), JsValue> {
        let mut trainer = self
            .session
            .trainer()
            .ok_or_else(|| js_error(crate::BUSY))?;
        trainer.set_progress(f.map(|f| {
            Box::new(move |p: &draft_core::train::engine::Progress| {
                let args = (
                    JsValue::from_str(p.phase.name()),
                    JsValue::from_f64(p.done as f64),
                    JsValue::from_f64(p.total as f64),
                );
                // Anything but `false` (or a throwing callback) goes on.
                f.call3(&JsValue::NULL, &args.0, &args.1, &args.2)
                    .map_or(true, |v| v.as_bool() != Some(false))
            }) as Box<draft_core::train::engine::ProgressFn>
        }));
        Ok(())
    }

    /// The run's settings and adapter (`RunInfo` as an object).
    pub fn info(&self) -> Result<JsValue, JsValue> {
        to_js(&self.session.info)
    }

    /// Optimizer updates done.
    #[wasm_bindgen(getter)]
    pub fn updates(&self) -> usize {
        self.session.updates()
    }

    /// The evaluation set before training, once per run (the run policy the CLI follows).
    /// Resolves to an evaluation (as `evaluate`'s) or `null` when the run has one already.
    pub fn start(&self) -> Promise {
        self.run(|s| async move {
            match s.start().await? {
                Some(e) => evaluation_to_js(&e),
                None => Ok(JsValue::NULL),
            }
        })
    }

    /// One optimizer update with `total` updates planned and an evaluation every `evalEvery`
    /// (and after the last). Resolves to `{metrics: StepMetrics, eval: evaluation | null,
    /// checkpoint: Uint8Array | null (due by the options' `checkpointEvery`), collapsed:
    /// [before, now] | null (the early stop on diversity fired), done}`.
    pub fn update(&self, total: usize, eval_every: usize) -> Promise {
        self.run(move |s| async move {
            let u = s.update(total, eval_every).await?;
            let out = to_js(&u).map_err(|e| format!("{e:?}"))?;
            let eval = match &u.eval {
                Some(e) => evaluation_to_js(e)?,
                None => JsValue::NULL,
            };
            js_sys::Reflect::set(&out, &"eval".into(), &eval).map_err(|e| format!("{e:?}"))?;
            let checkpoint = match &u.checkpoint {
                Some(b) => Uint8Array::from(b.as_slice()).into(),
                None => JsValue::NULL,
            };
            js_sys::Reflect::set(&out, &"checkpoint".into(), &checkpoint)
                .map_err(|e| format!("{e:?}"))?;
            Ok(out)
        })
    }

    /// The evaluation set after training: the last update's when it was made then, else
    /// sampled now.
    pub fn finish(&self) -> Promise {
        self.run(|s| async move { evaluation_to_js(&s.finish().await?) })
    }

    /// Samples the fixed evaluation set (`n` images: `n / 2` prompts × two fixed seeds) with
    /// the trained LoRA at `scale` × its scale (0: the base model, 1: trained). Resolves to
    /// `{reward, diversity, terms: [[name, value]], width, height, prompts, images: [Uint8ClampedArray
    /// RGBA]}`.
    pub fn evaluate(&self, n: usize, scale: f64) -> Promise {
        self.run(move |s| async move { evaluation_to_js(&s.evaluate(n, scale).await?) })
    }

    /// The run's checkpoint as `checkpoint.safetensors` bytes (`draft train`'s format: resume
    /// it with `draft train --resume --out-dir DIR` after putting it in DIR).
    pub fn checkpoint(&self) -> Promise {
        self.run(|s| async move {
            let bytes = s.checkpoint().await?;
            Ok(Uint8Array::from(bytes.as_slice()).into())
        })
    }

    /// The trained LoRA as `pytorch_lora_weights.safetensors` bytes (the native binary's
    /// layout, loadable by diffusers).
    #[wasm_bindgen(js_name = loraSafetensors)]
    pub fn lora_safetensors(&self) -> Promise {
        self.run(|s| async move {
            let bytes = s.lora_safetensors().await?;
            Ok(Uint8Array::from(bytes.as_slice()).into())
        })
    }
}

/// The embedded model's training prompts (the page's default list).
#[wasm_bindgen(js_name = defaultPrompts)]
pub fn default_prompts() -> Vec<String> {
    crate::default_prompts()
}

/// The weight-free rewards the page can train on.
#[wasm_bindgen(js_name = rewardNames)]
pub fn reward_names() -> Vec<String> {
    draft_core::reward::builtin::BUILTIN
        .iter()
        .map(|s| s.to_string())
        .collect()
}

/// The learned rewards, which need weight files (`RunFiles.addRewardFile` /
/// `setRewardWeights`).
#[wasm_bindgen(js_name = learnedRewardNames)]
pub fn learned_reward_names() -> Vec<String> {
    draft_core::reward::builtin::LEARNED
        .iter()
        .map(|s| s.to_string())
        .collect()
}
