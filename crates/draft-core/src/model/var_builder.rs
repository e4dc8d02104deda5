//! A [`VarBuilder`] is a cursor into one safetensors file: `vb.pp("down_blocks").pp(0)` descends
//! one module level, `vb.get("weight", [..])` reads a tensor, checks its shape and converts
//! f16/bf16 to f32. Module code builds itself from these paths, so a key in the file *is* the
//! field path in the code. The same cursor serves made-up weights (benchmarks) and the
//! in-memory [`ParamStore`] that `draft pretrain` trains, and hands out LoRA slots.

use burn::prelude::*;
use burn::tensor::FloatDType;

use crate::error::{Error, Result};
use crate::model::lora::{LoraKind, LoraPlan, LoraSlot};
use crate::model::weights::{Weights, serialize_f32};

/// Where a [`VarBuilder`] takes its tensors from.
#[derive(Clone)]
enum Source<'w, 'a> {
    File(&'w Weights<'a>),
    /// Small random values of whatever shape is asked for: models with real architectures
    /// but no weights file, for benchmarks and shape tests.
    Random(std::rc::Rc<std::cell::RefCell<crate::noise::NoiseRng>>),
    /// Tensors held in memory by key (what `draft pretrain` trains); keys the store lacks are
    /// initialised and added when the store has an initialiser, an error otherwise.
    Store(std::rc::Rc<std::cell::RefCell<ParamStore>>),
}

/// A model's parameters by their file keys, in the file's layout (a Linear weight is
/// `[out, in]` here, as in the safetensors file): what a full training run optimises and writes.
/// Each tensor is kept flat; [`VarBuilder::get`] reshapes it, so the reshape (and a Linear's
/// transpose) is part of the autodiff graph and gradients come back in file layout.
#[derive(Clone, Default)]
pub struct ParamStore {
    pub entries: std::collections::BTreeMap<String, (Tensor<1>, Vec<usize>)>,
    init: Option<std::rc::Rc<std::cell::RefCell<rand::rngs::StdRng>>>,
}

impl ParamStore {
    /// An empty store that initialises every tensor asked for the way PyTorch's layers do:
    /// Linear/Conv weights U(±1/√fan_in), biases 0, norm scales 1, embeddings N(0, 0.02²).
    pub fn init(seed: u64) -> Self {
        use rand::SeedableRng;
        Self {
            entries: Default::default(),
            init: Some(std::rc::Rc::new(std::cell::RefCell::new(
                rand::rngs::StdRng::seed_from_u64(seed),
            ))),
        }
    }

    /// Every tensor of a safetensors file.
    pub fn from_weights(w: &Weights, device: &Device) -> Result<Self> {
        let mut entries = std::collections::BTreeMap::new();
        for key in w.keys() {
            let (values, shape) = match w.read_f32(&key) {
                Ok(v) => v,
                // Integer buffers (e.g. transformers' `position_ids`) are not parameters.
                Err(Error::TensorDtype { .. }) => continue,
                Err(e) => return Err(e),
            };
            let n = values.len();
            entries.insert(
                key,
                (
                    Tensor::from_data(TensorData::new(values, [n]), device),
                    shape,
                ),
            );
        }
        Ok(Self {
            entries,
            init: None,
        })
    }

    /// The same keys and shapes with other tensors (e.g. autodiff leaves, or updated values).
    pub fn with_tensors(&self, tensors: Vec<Tensor<1>>) -> Self {
        assert_eq!(tensors.len(), self.entries.len());
        Self {
            entries: self
                .entries
                .iter()
                .zip(tensors)
                .map(|((k, (_, shape)), t)| (k.clone(), (t, shape.clone())))
                .collect(),
            init: None,
        }
    }

    /// The flat tensors in key order.
    pub fn tensors(&self) -> Vec<Tensor<1>> {
        self.entries.values().map(|(t, _)| t.clone()).collect()
    }

    pub fn num_values(&self) -> usize {
        self.entries
            .values()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// The store as a safetensors file (f32), with optional metadata.
    pub async fn to_safetensors(
        &self,
        metadata: Option<std::collections::HashMap<String, String>>,
    ) -> Result<Vec<u8>> {
        let mut tensors = Vec::with_capacity(self.entries.len());
        for (key, (t, shape)) in &self.entries {
            let (values, _) = crate::read_f32(t.clone()).await?;
            tensors.push((key.clone(), shape.clone(), values));
        }
        serialize_f32(&tensors, metadata)
    }

    fn initial(&self, key: &str, shape: &[usize], device: &Device) -> Option<Tensor<1>> {
        use rand::RngExt;
        let rng = self.init.as_ref()?;
        let mut rng = rng.borrow_mut();
        let n: usize = shape.iter().product();
        let leaf = key.rsplit('.').next().unwrap_or(key);
        let values: Vec<f32> = if leaf == "bias" {
            vec![0.0; n]
        } else if shape.len() == 1 {
            vec![1.0; n]
        } else if key.contains("embedding") {
            use rand_distr::{Distribution, StandardNormal};
            (0..n)
                .map(|_| {
                    0.02 * <StandardNormal as Distribution<f32>>::sample(&StandardNormal, &mut *rng)
                })
                .collect()
        } else {
            let fan_in: usize = shape[1..].iter().product();
            let bound = 1.0 / (fan_in as f32).sqrt();
            (0..n).map(|_| rng.random_range(-bound..bound)).collect()
        };
        Some(Tensor::from_data(TensorData::new(values, [n]), device))
    }
}

/// A cursor at one module path inside a [`Weights`] file.
#[derive(Clone)]
pub struct VarBuilder<'w, 'a> {
    source: Source<'w, 'a>,
    prefix: String,
    device: Device,
    lora: Option<LoraPlan>,
    /// How layers keep their weight matrices and kernels ([`get_weight`](Self::get_weight)).
    weights_dtype: FloatDType,
}

/// The spread of [`VarBuilder::random`]'s weights.
const RANDOM_STD: f64 = 0.02;

impl<'w, 'a> VarBuilder<'w, 'a> {
    pub fn new(weights: &'w Weights<'a>, device: &Device) -> Self {
        Self {
            source: Source::File(weights),
            prefix: String::new(),
            device: device.clone(),
            lora: None,
            weights_dtype: FloatDType::F32,
        }
    }

    /// A builder that makes up N(0, 0.02²) weights (norm scales N(1, 0.02²)) from `seed`
    /// ([`RANDOM_STD`]).
    pub fn random(seed: u64, device: &Device) -> VarBuilder<'static, 'static> {
        VarBuilder {
            source: Source::Random(std::rc::Rc::new(std::cell::RefCell::new(
                crate::noise::NoiseRng::new(seed),
            ))),
            prefix: String::new(),
            device: device.clone(),
            lora: None,
            weights_dtype: FloatDType::F32,
        }
    }

    /// A builder over the tensors of `store`; with [`ParamStore::init`], missing tensors are
    /// created (and added to the store) as the model asks for them.
    pub fn from_store(
        store: std::rc::Rc<std::cell::RefCell<ParamStore>>,
        device: &Device,
    ) -> VarBuilder<'static, 'static> {
        VarBuilder {
            source: Source::Store(store),
            prefix: String::new(),
            device: device.clone(),
            lora: None,
            weights_dtype: FloatDType::F32,
        }
    }

    /// Layers keep their weight matrices and kernels in `dtype` (f16 halves the memory of
    /// frozen weights; layers compute in f32). Biases, norms and embeddings of positions stay f32.
    pub fn with_weights_dtype(mut self, dtype: FloatDType) -> Self {
        self.weights_dtype = dtype;
        self
    }

    /// A layer's weight matrix or kernel, in the builder's weights dtype.
    pub fn get_weight<const D: usize>(&self, name: &str, shape: [usize; D]) -> Result<Tensor<D>> {
        Ok(self.stored(self.get(name, shape)?))
    }

    /// `t` in the builder's weights dtype.
    fn stored<const D: usize>(&self, t: Tensor<D>) -> Tensor<D> {
        match self.weights_dtype {
            FloatDType::F32 => t,
            d => t.cast(d),
        }
    }

    /// Layers selected by `plan` get a LoRA slot as they load.
    pub fn with_lora(mut self, plan: Option<LoraPlan>) -> Self {
        self.lora = plan;
        self
    }

    /// The LoRA slot of the layer at this cursor, if the plan selects it.
    pub fn lora_slot(&self, kind: LoraKind) -> Option<LoraSlot> {
        self.lora.as_ref().and_then(|p| p.slot(&self.prefix, kind))
    }

    /// Descends into the sub-module `name` (a field name or a list index).
    pub fn pp(&self, name: impl ToString) -> Self {
        let name = name.to_string();
        let prefix = if self.prefix.is_empty() {
            name
        } else {
            format!("{}.{}", self.prefix, name)
        };
        Self {
            source: self.source.clone(),
            prefix,
            device: self.device.clone(),
            lora: self.lora.clone(),
            weights_dtype: self.weights_dtype,
        }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The full dotted path of `name` under this cursor.
    pub fn path(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{}", self.prefix, name)
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        match &self.source {
            Source::File(w) => w.contains(&self.path(name)),
            Source::Random(_) => true,
            Source::Store(s) => {
                let s = s.borrow();
                s.init.is_some() || s.entries.contains_key(&self.path(name))
            }
        }
    }

    /// Reads the tensor `name` and checks that its shape is `shape`.
    pub fn get<const D: usize>(&self, name: &str, shape: [usize; D]) -> Result<Tensor<D>> {
        let key = self.path(name);
        let weights = match &self.source {
            Source::File(w) => *w,
            Source::Random(rng) => {
                let t = rng.borrow_mut().randn(shape, &self.device) * RANDOM_STD;
                let is_norm_scale = D == 1 && name == "weight" && key.contains("norm");
                return Ok(if is_norm_scale { t + 1.0 } else { t });
            }
            Source::Store(store) => {
                let mut store = store.borrow_mut();
                let flat = match store.entries.get(&key) {
                    Some((t, found)) => {
                        if found.as_slice() != shape {
                            return Err(Error::TensorShape {
                                file: "(parameters)".into(),
                                key,
                                expected: shape.to_vec(),
                                found: found.clone(),
                            });
                        }
                        t.clone()
                    }
                    None => {
                        let t = store.initial(&key, &shape, &self.device).ok_or_else(|| {
                            Error::MissingTensor {
                                file: "(parameters)".into(),
                                key: key.clone(),
                            }
                        })?;
                        store
                            .entries
                            .insert(key.clone(), (t.clone(), shape.to_vec()));
                        t
                    }
                };
                return Ok(flat.reshape(shape));
            }
        };
        let found = weights.shape(&key)?;
        check_shape(weights, &key, &found, &shape)?;
        let total: usize = shape.iter().product();
        let rows = found.first().copied().unwrap_or(1);
        // Over UPLOAD_FLUSH_BYTES in f32, a tensor is read, converted and uploaded in pieces of
        // rows joined on the device: the host never holds it whole (SD-1.5's largest kernel,
        // [1280, 2560, 3, 3], is 56 MiB in f16 and 112 MiB in f32).
        if 4 * total as u64 > UPLOAD_FLUSH_BYTES && rows > 1 {
            let whole = read_rows_in_pieces(weights, &key, (0, rows), total / rows, &self.device)?;
            return Ok(whole.reshape(shape));
        }
        let (values, _) = weights.read_f32(&key)?;
        Ok(upload(values, shape, &self.device))
    }

    /// [`get_weight`](Self::get_weight) of a `[rows, cols]` table as blocks of at most
    /// `max_rows` rows, top to bottom: from a file each block is its own upload, so no buffer
    /// holds the whole table (an embedding table over WebGPU's binding limit).
    pub fn get_weight_row_blocks(
        &self,
        name: &str,
        shape: [usize; 2],
        max_rows: usize,
    ) -> Result<Vec<Tensor<2>>> {
        let [rows, cols] = shape;
        let max_rows = max_rows.max(1);
        let starts = (0..rows).step_by(max_rows);
        match &self.source {
            // Each block's rows are read alone: the whole table is never in memory (CLIP-L's is
            // 144.8 MiB in f32, in a WebAssembly memory of 4 GiB at most).
            Source::File(weights) if rows > max_rows => {
                let key = self.path(name);
                let found = weights.shape(&key)?;
                check_shape(weights, &key, &found, &shape)?;
                // A block is uploaded in pieces too: a 128 MiB block is never on the host.
                starts
                    .map(|r0| {
                        let n = max_rows.min(rows - r0);
                        let block =
                            read_rows_in_pieces(weights, &key, (r0, n), cols, &self.device)?;
                        Ok(self.stored(block))
                    })
                    .collect()
            }
            // Random tables (benchmarks) are drawn block by block: the same values as the whole
            // table drawn at once (its rows are consecutive in the stream), and no buffer holds
            // the whole, which a 128 MiB binding limit refuses (CLIP-L's 49408 × 768 in f32 is
            // 144.8 MiB).
            Source::Random(rng) if rows > max_rows => Ok(starts
                .map(|r0| {
                    let n = max_rows.min(rows - r0);
                    self.stored(rng.borrow_mut().randn([n, cols], &self.device) * RANDOM_STD)
                })
                .collect()),
            // Stored tables (tests: small) are cut from the whole.
            _ => {
                let whole = self.get_weight(name, shape)?;
                if rows <= max_rows {
                    return Ok(vec![whole]);
                }
                Ok(starts
                    .map(|r0| whole.clone().narrow(0, r0, max_rows.min(rows - r0)))
                    .collect())
            }
        }
    }
}

/// The bytes of weights handed to the device since it was last flushed ([`upload`]).
static UNFLUSHED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// What may wait on the host for the device between two flushes while a model loads: CubeCL
/// queues each upload with its bytes (32 tasks per stream on wgpu) until it flushes, so without
/// this a load held hundreds of MiB of weights at once in memory (585 MiB of a 2 GB SD-1.5 file
/// in the browser's worker, where WebAssembly's whole memory is 4 GiB at most).
pub const UPLOAD_FLUSH_BYTES: u64 = 32 << 20;

/// `values` as a tensor of `shape` on `device`, the device flushed once
/// [`UPLOAD_FLUSH_BYTES`] have been handed to it since the last flush.
fn upload<const D: usize>(values: Vec<f32>, shape: [usize; D], device: &Device) -> Tensor<D> {
    use std::sync::atomic::Ordering::Relaxed;
    let bytes = 4 * values.len() as u64;
    let t = Tensor::from_data(TensorData::new(values, shape.to_vec()), device);
    if UNFLUSHED.fetch_add(bytes, Relaxed) + bytes >= UPLOAD_FLUSH_BYTES {
        UNFLUSHED.store(0, Relaxed);
        // A device that cannot flush fails its next operation, with the reason.
        let _ = device.flush();
    }
    t
}

/// Rows `first..first + count` of `key` (each `cols` values) as a `[count, cols]` f32 tensor,
/// read, converted and uploaded in pieces of at most [`UPLOAD_FLUSH_BYTES`] and joined on the
/// device, so that the host holds one piece at a time.
fn read_rows_in_pieces(
    weights: &Weights,
    key: &str,
    (first, count): (usize, usize),
    cols: usize,
    device: &Device,
) -> Result<Tensor<2>> {
    let piece_rows = (UPLOAD_FLUSH_BYTES as usize / (4 * cols.max(1))).max(1);
    let mut pieces = (first..first + count)
        .step_by(piece_rows)
        .map(|p0| {
            let m = piece_rows.min(first + count - p0);
            let (piece, _) = weights.read_f32_rows(key, Some((p0, m)))?;
            Ok(upload(piece, [m, cols], device))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(if pieces.len() == 1 {
        pieces.remove(0)
    } else {
        Tensor::cat(pieces, 0)
    })
}

/// `found` is `shape`, or `shape` with trailing axes of 1.
fn check_shape(weights: &Weights, key: &str, found: &[usize], shape: &[usize]) -> Result<()> {
    let d = shape.len();
    let squeezed = found.len() > d && found[..d] == *shape && found[d..].iter().all(|&n| n == 1);
    if found != shape && !squeezed {
        return Err(Error::TensorShape {
            file: weights.file().to_string(),
            key: key.to_string(),
            expected: shape.to_vec(),
            found: found.to_vec(),
        });
    }
    Ok(())
}
