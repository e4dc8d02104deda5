//! Weight files read by range instead of whole: a file on disk, a browser `Blob` (a picked
//! file, read by slices) or an OPFS file. A safetensors file is its header, then each tensor's
//! bytes — so a model loads one tensor at a time ([`crate::model::weights::Weights`] over a
//! [`ByteSource`]), and no memory ever holds a whole multi-gigabyte checkpoint: WebAssembly's
//! 32-bit memory stops at 4 GiB, and natively a read-whole file is the weights twice over
//! during the load.

use std::borrow::Cow;

use safetensors::tensor::Metadata;

use crate::error::{Error, Result};

/// Bytes that can be read at any offset. Implemented for in-memory bytes, for a file on disk
/// ([`FileSource`], natively) and, in the web shell, for a `Blob` and an OPFS access handle.
pub trait ByteSource {
    /// The length in bytes.
    fn len(&self) -> u64;

    /// Whether the source is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fills `buf` with the bytes from `offset` on; a short read is an error (its text says why).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::result::Result<(), String>;

    /// The bytes of `range`, borrowed where the source is memory.
    fn slice(&self, start: u64, end: u64) -> std::result::Result<Cow<'_, [u8]>, String> {
        let mut buf = vec![0; (end - start) as usize];
        self.read_at(start, &mut buf)?;
        Ok(Cow::Owned(buf))
    }
}

impl ByteSource for Vec<u8> {
    fn len(&self) -> u64 {
        self.as_slice().len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::result::Result<(), String> {
        let bytes = self.slice(offset, offset + buf.len() as u64)?;
        buf.copy_from_slice(&bytes);
        Ok(())
    }

    fn slice(&self, start: u64, end: u64) -> std::result::Result<Cow<'_, [u8]>, String> {
        self.get(start as usize..end as usize)
            .map(Cow::Borrowed)
            .ok_or_else(|| format!("bytes {start}..{end} are past the end ({})", self.len()))
    }
}

/// A file on disk, read by range (positioned reads; the file is never read whole).
#[cfg(not(target_arch = "wasm32"))]
pub struct FileSource {
    file: std::sync::Mutex<std::fs::File>,
    len: u64,
}

#[cfg(not(target_arch = "wasm32"))]
impl FileSource {
    pub fn open(path: &std::path::Path) -> std::io::Result<Self> {
        let file = std::fs::File::open(path)?;
        let len = file.metadata()?.len();
        Ok(Self {
            file: std::sync::Mutex::new(file),
            len,
        })
    }
}

#[cfg(not(target_arch = "wasm32"))]
impl ByteSource for FileSource {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> std::result::Result<(), String> {
        use std::io::{Read, Seek, SeekFrom};
        let mut file = self
            .file
            .lock()
            .map_err(|_| "a reader panicked".to_string())?;
        file.seek(SeekFrom::Start(offset))
            .and_then(|_| file.read_exact(buf))
            .map_err(|e| {
                format!(
                    "cannot read bytes {offset}..{}: {e}",
                    offset + buf.len() as u64
                )
            })
    }
}

/// The most bytes a safetensors header may take (the safetensors crate's own bound).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// A safetensors file's header read from a [`ByteSource`]: the tensors' dtypes, shapes and
/// byte ranges, with the tensors' bytes left in the source until asked for.
pub struct SafetensorsHeader {
    pub metadata: Metadata,
    /// Where the tensors' bytes begin (8 + the header's length).
    pub data_start: u64,
}

impl SafetensorsHeader {
    /// Reads and checks the header of `source` (`file` names it in errors): its JSON, the
    /// tensors' byte ranges laid end to end, and the file's length against them.
    pub fn read(file: &str, source: &dyn ByteSource) -> Result<Self> {
        let err = |reason: String| Error::Safetensors {
            file: file.to_string(),
            reason,
        };
        let mut n = [0u8; 8];
        if source.len() < 8 {
            return Err(err("HeaderTooSmall".into()));
        }
        source.read_at(0, &mut n).map_err(err)?;
        let n = u64::from_le_bytes(n);
        if n > MAX_HEADER_BYTES {
            return Err(err("HeaderTooLarge".into()));
        }
        let data_start = 8 + n;
        if data_start > source.len() {
            return Err(err("InvalidHeaderLength".into()));
        }
        let header = source.slice(8, data_start).map_err(err)?;
        let text = std::str::from_utf8(&header).map_err(|e| err(format!("InvalidHeader({e})")))?;
        let metadata: Metadata = serde_json::from_str(text)
            .map_err(|e| err(format!("InvalidHeaderDeserialization({e})")))?;
        let end = data_start + metadata.data_len() as u64;
        if end != source.len() {
            return Err(err(format!(
                "MetadataIncompleteBuffer: the header says {end} bytes, the file has {}",
                source.len()
            )));
        }
        Ok(Self {
            metadata,
            data_start,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::weights::serialize_f32;

    #[test]
    fn a_header_read_by_range_matches_the_whole_files() {
        let bytes = serialize_f32(
            &[
                ("a".into(), vec![2, 3], (0..6).map(|i| i as f32).collect()),
                ("b".into(), vec![4], vec![1.5; 4]),
            ],
            None,
        )
        .unwrap();
        let header = SafetensorsHeader::read("f.safetensors", &bytes).unwrap();
        let whole = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (key, view) in whole.tensors() {
            let info = header.metadata.info(&key).unwrap();
            assert_eq!(info.shape, view.shape());
            let (s, e) = info.data_offsets;
            let data = bytes
                .slice(header.data_start + s as u64, header.data_start + e as u64)
                .unwrap();
            assert_eq!(&data[..], view.data(), "{key}");
        }
        // A file cut short, or with bytes past what the header says, is refused.
        for bad in [
            bytes[..bytes.len() - 1].to_vec(),
            [&bytes[..], &[0]].concat(),
        ] {
            let e = SafetensorsHeader::read("f.safetensors", &bad)
                .err()
                .unwrap();
            assert!(e.to_string().contains("MetadataIncompleteBuffer"), "{e}");
        }
        let e = SafetensorsHeader::read("f.safetensors", &vec![1, 2, 3])
            .err()
            .unwrap();
        assert!(e.to_string().contains("HeaderTooSmall"), "{e}");
    }
}
