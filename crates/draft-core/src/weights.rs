//! safetensors bytes → tensors, addressed by the same dotted paths as the PyTorch modules.
//!
//! A [`VarBuilder`] is a cursor into one safetensors file: `vb.pp("down_blocks").pp(0)` descends
//! one module level, `vb.get("weight", [..])` reads a tensor, checks its shape and converts
//! f16/bf16 to f32. Module code builds itself from these paths, so a key in the file *is* the
//! field path in the code.

use burn::prelude::*;
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};
use crate::lora::{LoraKind, LoraPlan, LoraSlot};

/// One parsed safetensors file plus the name it is reported under in errors.
pub struct Weights<'a> {
    file: String,
    st: SafeTensors<'a>,
}

impl<'a> Weights<'a> {
    /// Parses the header of `bytes`; `file` names the file in error messages.
    pub fn from_bytes(file: &str, bytes: &'a [u8]) -> Result<Self> {
        let st = SafeTensors::deserialize(bytes).map_err(|e| Error::Safetensors {
            file: file.to_string(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            file: file.to_string(),
            st,
        })
    }

    pub fn file(&self) -> &str {
        &self.file
    }

    pub fn contains(&self, key: &str) -> bool {
        self.st.tensor(key).is_ok()
    }

    pub fn keys(&self) -> Vec<String> {
        self.st.names().into_iter().map(|s| s.to_string()).collect()
    }

    fn view(&self, key: &str) -> Result<safetensors::tensor::TensorView<'_>> {
        self.st.tensor(key).map_err(|_| Error::MissingTensor {
            file: self.file.clone(),
            key: key.to_string(),
        })
    }

    fn dtype_error(&self, key: &str, dtype: Dtype, expected: &str) -> Error {
        Error::TensorDtype {
            file: self.file.clone(),
            key: key.to_string(),
            dtype: format!("{dtype:?}"),
            expected: expected.to_string(),
        }
    }

    /// Reads `key` as f32 values and its shape.
    pub fn read_f32(&self, key: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        let view = self.view(key)?;
        let bytes = view.data();
        let values = match view.dtype() {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => return Err(self.dtype_error(key, other, "F32, F16 or BF16")),
        };
        Ok((values, view.shape().to_vec()))
    }

    /// Reads an integer tensor (I64 or I32) as i64 values and its shape.
    pub fn read_i64(&self, key: &str) -> Result<(Vec<i64>, Vec<usize>)> {
        let view = self.view(key)?;
        let bytes = view.data();
        let values = match view.dtype() {
            Dtype::I64 => bytes
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            Dtype::I32 => bytes
                .chunks_exact(4)
                .map(|b| i32::from_le_bytes(b.try_into().unwrap()) as i64)
                .collect(),
            other => return Err(self.dtype_error(key, other, "I64 or I32")),
        };
        Ok((values, view.shape().to_vec()))
    }

    /// Reads `key` as a float tensor of rank `D` on `device`, whatever its shape.
    pub fn tensor<const D: usize>(&self, key: &str, device: &Device) -> Result<Tensor<D>> {
        let (values, shape) = self.read_f32(key)?;
        if shape.len() != D {
            return Err(Error::TensorShape {
                file: self.file.clone(),
                key: key.to_string(),
                expected: vec![0; D],
                found: shape,
            });
        }
        Ok(Tensor::from_data(TensorData::new(values, shape), device))
    }
}

/// Writes f32 tensors `(name, shape, values)` as a safetensors file, with optional string
/// metadata.
pub fn serialize_f32(
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let bytes: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, _, v)| v.iter().flat_map(|x| x.to_le_bytes()).collect())
        .collect();
    let mut views = Vec::with_capacity(tensors.len());
    for ((name, shape, _), data) in tensors.iter().zip(&bytes) {
        let view =
            safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), data).map_err(|e| {
                Error::Safetensors {
                    file: name.clone(),
                    reason: e.to_string(),
                }
            })?;
        views.push((name.clone(), view));
    }
    safetensors::tensor::serialize(views, metadata).map_err(|e| Error::Safetensors {
        file: "(output)".into(),
        reason: e.to_string(),
    })
}

/// Where a [`VarBuilder`] takes its tensors from.
#[derive(Clone)]
enum Source<'w, 'a> {
    File(&'w Weights<'a>),
    /// Small random values of whatever shape is asked for: models with real architectures
    /// but no weights file, for benchmarks and shape tests.
    Random(std::rc::Rc<std::cell::RefCell<crate::noise::NoiseRng>>),
}

/// A cursor at one module path inside a [`Weights`] file.
#[derive(Clone)]
pub struct VarBuilder<'w, 'a> {
    source: Source<'w, 'a>,
    prefix: String,
    device: Device,
    lora: Option<LoraPlan>,
}

impl<'w, 'a> VarBuilder<'w, 'a> {
    pub fn new(weights: &'w Weights<'a>, device: &Device) -> Self {
        Self {
            source: Source::File(weights),
            prefix: String::new(),
            device: device.clone(),
            lora: None,
        }
    }

    /// A builder that makes up N(0, 0.02²) weights (norm scales N(1, 0.02²)) from `seed`.
    pub fn random(seed: u64, device: &Device) -> VarBuilder<'static, 'static> {
        VarBuilder {
            source: Source::Random(std::rc::Rc::new(std::cell::RefCell::new(
                crate::noise::NoiseRng::new(seed),
            ))),
            prefix: String::new(),
            device: device.clone(),
            lora: None,
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
        }
    }

    /// Reads the tensor `name` and checks that its shape is `shape`.
    pub fn get<const D: usize>(&self, name: &str, shape: [usize; D]) -> Result<Tensor<D>> {
        let key = self.path(name);
        let weights = match &self.source {
            Source::File(w) => *w,
            Source::Random(rng) => {
                let t = rng.borrow_mut().randn(shape, &self.device) * 0.02;
                let is_norm_scale = D == 1 && name == "weight" && key.contains("norm");
                return Ok(if is_norm_scale { t + 1.0 } else { t });
            }
        };
        let (values, found) = weights.read_f32(&key)?;
        if found != shape {
            return Err(Error::TensorShape {
                file: weights.file.clone(),
                key,
                expected: shape.to_vec(),
                found,
            });
        }
        Ok(Tensor::from_data(
            TensorData::new(values, shape.to_vec()),
            &self.device,
        ))
    }
}
