//! safetensors bytes → tensors, addressed by the same dotted paths as the PyTorch modules
//! (read through [`VarBuilder`](crate::model::var_builder::VarBuilder)), and the one safetensors writer
//! of the project ([`serialize_f32`]).

use burn::prelude::*;
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};
use crate::model::source::{ByteSource, SafetensorsHeader};

/// A safetensors file as [`Weights`] reads it: bytes in memory, or a source read by range.
#[derive(Clone, Copy)]
pub enum FileRef<'a> {
    Bytes(&'a [u8]),
    Source(&'a dyn ByteSource),
}

/// One or more parsed safetensors files (the shards of one component) plus the name they are
/// reported under in errors, with the keys the model asks for mapped onto the keys in the files.
///
/// Other layouts (a transformers-5 text encoder without `text_model.`, a single-file LDM
/// checkpoint) are read through [`Weights::renamed`]: the module code always asks for the
/// diffusers/transformers key.
pub struct Weights<'a> {
    file: String,
    shards: Vec<(String, Shard<'a>)>,
    /// Key the model asks for → where it is in the files.
    keys: std::collections::BTreeMap<String, Entry>,
}

/// One safetensors file of a [`Weights`]: parsed bytes in memory, or a header whose tensors
/// are read from their source one at a time ([`crate::model::source`]).
enum Shard<'a> {
    Memory(SafeTensors<'a>),
    Source {
        header: SafetensorsHeader,
        source: &'a dyn ByteSource,
    },
}

impl Shard<'_> {
    fn names(&self) -> Vec<String> {
        match self {
            Shard::Memory(st) => st.names().into_iter().map(str::to_string).collect(),
            Shard::Source { header, .. } => header.metadata.offset_keys(),
        }
    }

    /// `key`'s dtype, shape and the byte range of its data: from the data section's start in a
    /// source; from 0 in memory, where the tensor's view is its own slice.
    fn info(&self, key: &str) -> Option<(Dtype, Vec<usize>, (usize, usize))> {
        match self {
            Shard::Memory(st) => {
                let view = st.tensor(key).ok()?;
                Some((view.dtype(), view.shape().to_vec(), (0, view.data().len())))
            }
            Shard::Source { header, .. } => {
                let info = header.metadata.info(key)?;
                Some((info.dtype, info.shape.clone(), info.data_offsets))
            }
        }
    }

    /// The bytes `range` of `key`'s data (`range` counted as [`Self::info`]'s).
    fn read(
        &self,
        file: &str,
        key: &str,
        range: (usize, usize),
    ) -> Result<std::borrow::Cow<'_, [u8]>> {
        match self {
            Shard::Memory(st) => {
                let view = st.tensor(key).map_err(|e| Error::Safetensors {
                    file: file.to_string(),
                    reason: e.to_string(),
                })?;
                Ok(std::borrow::Cow::Borrowed(&view.data()[range.0..range.1]))
            }
            Shard::Source { header, source } => {
                let base = header.data_start;
                source
                    .slice(base + range.0 as u64, base + range.1 as u64)
                    .map_err(|reason| Error::Safetensors {
                        file: file.to_string(),
                        reason: format!("tensor `{key}`: {reason}"),
                    })
            }
        }
    }
}

/// The bytes of rows `first..first + count` of a tensor of `rows` rows whose data is `range`.
fn row_range(range: (usize, usize), rows: usize, first: usize, count: usize) -> (usize, usize) {
    let row = (range.1 - range.0).checked_div(rows).unwrap_or(0);
    (range.0 + first * row, range.0 + (first + count) * row)
}

/// A tensor found: the name of the file holding it, its shard, its key there, dtype and shape,
/// and its row block, if any.
struct View<'s, 'a> {
    file: &'s str,
    shard: &'s Shard<'a>,
    key: &'s str,
    dtype: Dtype,
    shape: Vec<usize>,
    /// The data's byte range, as [`Shard::info`] gives it.
    range: (usize, usize),
    chunk: Option<(usize, usize)>,
    transposed: bool,
}

/// Where one tensor of a [`Weights`] is: its shard, its key there and, for a tensor that is
/// one of `n` equal row blocks of a fused file tensor (OpenCLIP's `in_proj_weight` as q, k, v),
/// which block.
#[derive(Clone)]
struct Entry {
    shard: usize,
    key: String,
    chunk: Option<(usize, usize)>,
    /// A 2-D file tensor read with its axes swapped (OpenCLIP's `text_projection`, which it
    /// multiplies from the right, as transformers' `text_projection.weight`).
    transposed: bool,
}

impl<'a> Weights<'a> {
    /// Parses the header of `bytes`; `file` names the file in error messages.
    pub fn from_bytes(file: &str, bytes: &'a [u8]) -> Result<Self> {
        Self::from_file(file, FileRef::Bytes(bytes))
    }

    /// One safetensors file, in memory or read by range (its header now, each tensor's bytes
    /// when the tensor is read); `file` names it in error messages.
    pub fn from_file(file: &str, data: FileRef<'a>) -> Result<Self> {
        Self::from_files(file, &[(file.to_string(), data)])
    }

    /// The shards of one sharded checkpoint (`*.safetensors.index.json`'s files), read as one:
    /// `file` (the index) names the set, each shard's own name its tensors. A key found in two
    /// shards is refused.
    pub fn from_shards(file: &str, shards: &[(String, &'a [u8])]) -> Result<Self> {
        let files: Vec<(String, FileRef<'a>)> = shards
            .iter()
            .map(|(name, bytes)| (name.clone(), FileRef::Bytes(bytes)))
            .collect();
        Self::from_files(file, &files)
    }

    /// [`from_shards`](Self::from_shards) over files in memory or read by range.
    pub fn from_files(file: &str, shards: &[(String, FileRef<'a>)]) -> Result<Self> {
        let mut parsed = Vec::with_capacity(shards.len());
        let mut keys = std::collections::BTreeMap::new();
        for (i, (name, data)) in shards.iter().enumerate() {
            let shard = match *data {
                FileRef::Bytes(bytes) => {
                    Shard::Memory(SafeTensors::deserialize(bytes).map_err(|e| {
                        Error::Safetensors {
                            file: name.clone(),
                            reason: e.to_string(),
                        }
                    })?)
                }
                FileRef::Source(source) => Shard::Source {
                    header: SafetensorsHeader::read(name, source)?,
                    source,
                },
            };
            for key in shard.names() {
                let entry = Entry {
                    shard: i,
                    key: key.clone(),
                    chunk: None,
                    transposed: false,
                };
                if let Some(other) = keys.insert(key.clone(), entry) {
                    return Err(Error::Safetensors {
                        file: name.clone(),
                        reason: format!("tensor `{key}` is also in {}", shards[other.shard].0),
                    });
                }
            }
            parsed.push((name.clone(), shard));
        }
        Ok(Self {
            file: file.to_string(),
            shards: parsed,
            keys,
        })
    }

    /// The same tensors under other keys: `rename(key in the file)` gives the key the model
    /// asks for, or `None` to hide the tensor. Two file keys renamed alike are refused.
    pub fn renamed(self, rename: impl Fn(&str) -> Option<String>) -> Result<Self> {
        self.remapped(|k| rename(k).map(|new| (new, None)).into_iter().collect())
    }

    /// Like [`renamed`](Self::renamed), where one file tensor may also become several:
    /// `(new key, Some((i, n)))` is the `i`-th of `n` equal blocks of its rows.
    pub fn remapped(
        self,
        map: impl Fn(&str) -> Vec<(String, Option<(usize, usize)>)>,
    ) -> Result<Self> {
        let mut keys = std::collections::BTreeMap::new();
        for entry in self.keys.into_values() {
            for (new, chunk) in map(&entry.key) {
                let e = Entry {
                    chunk,
                    transposed: false,
                    ..entry.clone()
                };
                if let Some(other) = keys.insert(new.clone(), e) {
                    return Err(Error::Safetensors {
                        file: self.file.clone(),
                        reason: format!(
                            "tensors `{}` and `{}` both map to `{new}`",
                            other.key, entry.key
                        ),
                    });
                }
            }
        }
        Ok(Self { keys, ..self })
    }

    pub fn file(&self) -> &str {
        &self.file
    }

    pub fn contains(&self, key: &str) -> bool {
        self.keys.contains_key(key)
    }

    pub fn keys(&self) -> Vec<String> {
        self.keys.keys().cloned().collect()
    }

    /// The same tensors, with `key` (a key the model asks for, if present) read transposed: a
    /// 2-D tensor stored as `[in, out]` where the model wants `[out, in]`.
    pub fn transposed(mut self, key: &str) -> Self {
        if let Some(e) = self.keys.get_mut(key) {
            e.transposed = true;
        }
        self
    }

    /// The shape of `key` without reading its values.
    pub fn shape(&self, key: &str) -> Result<Vec<usize>> {
        let view = self.view(key)?;
        let mut shape = view.shape;
        if let Some((_, n)) = view.chunk {
            Self::check_chunk(view.file, key, &shape, n)?;
            shape[0] /= n;
        }
        if view.transposed {
            Self::check_2d(view.file, key, &shape)?;
            shape.reverse();
        }
        Ok(shape)
    }

    fn check_2d(file: &str, key: &str, shape: &[usize]) -> Result<()> {
        if shape.len() != 2 {
            return Err(Error::Safetensors {
                file: file.to_string(),
                reason: format!("tensor for `{key}` has shape {shape:?}, not a matrix"),
            });
        }
        Ok(())
    }

    fn check_chunk(file: &str, key: &str, shape: &[usize], n: usize) -> Result<()> {
        if shape.first().is_none_or(|&rows| rows % n != 0) {
            return Err(Error::Safetensors {
                file: file.to_string(),
                reason: format!("tensor for `{key}` has shape {shape:?}, not {n} row blocks"),
            });
        }
        Ok(())
    }

    /// The tensor `key`, the name of the file holding it and its row block, if any.
    fn view(&self, key: &str) -> Result<View<'_, 'a>> {
        let missing = || Error::MissingTensor {
            file: self.file.clone(),
            key: key.to_string(),
        };
        let entry = self.keys.get(key).ok_or_else(missing)?;
        let (name, shard) = &self.shards[entry.shard];
        let (dtype, shape, range) = shard.info(&entry.key).ok_or_else(missing)?;
        Ok(View {
            file: name,
            shard,
            key: &entry.key,
            dtype,
            shape,
            range,
            chunk: entry.chunk,
            transposed: entry.transposed,
        })
    }

    /// The bytes of `key` (its row block only, for a block of a fused tensor; with `rows`
    /// `(first, count)`, those rows of it only) and its shape: only those bytes are read from a
    /// source.
    #[allow(clippy::type_complexity)]
    fn data(
        &self,
        key: &str,
        rows: Option<(usize, usize)>,
    ) -> Result<(&str, Dtype, std::borrow::Cow<'_, [u8]>, Vec<usize>)> {
        let view = self.view(key)?;
        let mut shape = view.shape;
        let mut range = view.range;
        if let Some((i, n)) = view.chunk {
            Self::check_chunk(view.file, key, &shape, n)?;
            let block = shape[0] / n;
            range = row_range(range, shape[0], i * block, block);
            shape[0] = block;
        }
        if view.transposed {
            Self::check_2d(view.file, key, &shape)?;
        }
        // The rows asked for, counted in the tensor as the model sees it (transposed or not).
        let total = match view.transposed {
            true => shape[1],
            false => shape.first().copied().unwrap_or(0),
        };
        if let Some((first, count)) = rows
            && first + count > total
        {
            return Err(Error::Safetensors {
                file: view.file.to_string(),
                reason: format!(
                    "tensor `{key}` has {total} rows, not rows {first}..{}",
                    first + count
                ),
            });
        }
        if view.transposed {
            // Read whole, rows and columns swapped, then the rows cut.
            let bytes = view.shard.read(view.file, view.key, range)?;
            let (r, c, size) = (shape[0], shape[1], view.dtype.bitsize() / 8);
            if size == 0 || bytes.len() != r * c * size {
                return Err(Error::Safetensors {
                    file: view.file.to_string(),
                    reason: format!("tensor `{key}`: {} bytes for shape {shape:?}", bytes.len()),
                });
            }
            let mut out = vec![0u8; bytes.len()];
            for i in 0..r {
                for j in 0..c {
                    let (from, to) = ((i * c + j) * size, (j * r + i) * size);
                    out[to..to + size].copy_from_slice(&bytes[from..from + size]);
                }
            }
            shape = vec![c, r];
            if let Some((first, count)) = rows {
                let (a, b) = row_range((0, out.len()), c, first, count);
                out = out[a..b].to_vec();
                shape[0] = count;
            }
            return Ok((view.file, view.dtype, std::borrow::Cow::Owned(out), shape));
        }
        if let Some((first, count)) = rows {
            range = row_range(range, total, first, count);
            shape[0] = count;
        }
        let bytes = view.shard.read(view.file, view.key, range)?;
        Ok((view.file, view.dtype, bytes, shape))
    }

    fn dtype_error(file: &str, key: &str, dtype: Dtype, expected: &str) -> Error {
        Error::TensorDtype {
            file: file.to_string(),
            key: key.to_string(),
            dtype: format!("{dtype:?}"),
            expected: expected.to_string(),
        }
    }

    /// Reads `key` as f32 values and its shape; a value that is not finite (NaN, ±∞, or an
    /// F64 beyond f32's range) is an error naming the tensor.
    pub fn read_f32(&self, key: &str) -> Result<(Vec<f32>, Vec<usize>)> {
        self.read_f32_rows(key, None)
    }

    /// [`read_f32`](Self::read_f32) of rows `first..first + count` of `key` only: only their
    /// bytes are read (a block of an embedding table, which is never read whole).
    pub fn read_f32_rows(
        &self,
        key: &str,
        rows: Option<(usize, usize)>,
    ) -> Result<(Vec<f32>, Vec<usize>)> {
        let (file, dtype, bytes, shape) = self.data(key, rows)?;
        let values: Vec<f32> = match dtype {
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
            Dtype::F64 => bytes
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().unwrap()) as f32)
                .collect(),
            other => return Err(Self::dtype_error(file, key, other, "F32, F16, BF16 or F64")),
        };
        // A NaN or infinite weight turns every output into NaN; refuse it here, by name,
        // rather than as a black image or a NaN reward many steps later.
        if let Some(i) = values.iter().position(|v: &f32| !v.is_finite()) {
            return Err(Error::Safetensors {
                file: file.to_string(),
                reason: format!(
                    "tensor `{key}` holds {} at index {i} (as f32): weights must be finite",
                    values[i]
                ),
            });
        }
        Ok((values, shape))
    }

    /// Reads an integer tensor (I64 or I32) as i64 values and its shape.
    pub fn read_i64(&self, key: &str) -> Result<(Vec<i64>, Vec<usize>)> {
        let (file, dtype, bytes, shape) = self.data(key, None)?;
        let values = match dtype {
            Dtype::I64 => bytes
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            Dtype::I32 => bytes
                .chunks_exact(4)
                .map(|b| i32::from_le_bytes(b.try_into().unwrap()) as i64)
                .collect(),
            other => return Err(Self::dtype_error(file, key, other, "I64 or I32")),
        };
        Ok((values, shape))
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

/// The string metadata of the safetensors file `name` (empty when it has none), from its
/// header alone: what checkpoints keep their counters and settings in.
pub fn read_string_metadata(
    name: &str,
    bytes: &[u8],
) -> Result<std::collections::HashMap<String, String>> {
    let (_, meta) =
        safetensors::SafeTensors::read_metadata(bytes).map_err(|e| Error::Safetensors {
            file: name.into(),
            reason: e.to_string(),
        })?;
    Ok(meta.metadata().clone().unwrap_or_default())
}

/// Writes f32 tensors `(name, shape, values)` as a safetensors file, with optional string
/// metadata.
pub fn serialize_f32(
    tensors: &[(String, Vec<usize>, Vec<f32>)],
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let raw: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, shape, v)| {
            let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            (name.clone(), Dtype::F32, shape.clone(), bytes)
        })
        .collect();
    serialize(&raw, metadata)
}

/// Writes tensors `(name, dtype, shape, little-endian bytes)` as a safetensors file: the one
/// safetensors writer of the project (LoRA files, checkpoints, pretrained models, sampled
/// images, converted PyTorch weights).
pub fn serialize(
    tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)],
    metadata: Option<std::collections::HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let mut views = Vec::with_capacity(tensors.len());
    for (name, dtype, shape, data) in tensors {
        let view =
            safetensors::tensor::TensorView::new(*dtype, shape.clone(), data).map_err(|e| {
                Error::Safetensors {
                    file: "(output)".into(),
                    reason: format!("tensor {name}: {e}"),
                }
            })?;
        views.push((name.clone(), view));
    }
    safetensors::tensor::serialize(views, metadata).map_err(|e| Error::Safetensors {
        file: "(output)".into(),
        reason: e.to_string(),
    })
}
