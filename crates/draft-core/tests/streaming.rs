//! Weights read by range (issue 32): a pipeline whose `.safetensors` files are sources
//! ([`ByteSource`]) loads the same tensors as one read whole, reads each tensor's bytes once and
//! never more than one tensor at a time — diffusers folders, a sharded fp16 variant, a
//! transformers-5 text encoder and single-file LDM checkpoints.

mod common;

use std::borrow::Cow;
use std::cell::Cell;
use std::path::Path;
use std::rc::Rc;

use burn::prelude::*;
use common::{fixtures, values};
use draft_core::model::files::{COMPONENTS, FileData};
use draft_core::model::source::{ByteSource, FileSource};
use draft_core::{ModelFiles, Pipeline};

/// A file's bytes that count what is read of them: every read, the largest one.
struct Counted {
    bytes: Vec<u8>,
    total: Rc<Cell<u64>>,
    largest: Rc<Cell<u64>>,
}

impl ByteSource for Counted {
    fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        let n = buf.len() as u64;
        self.total.set(self.total.get() + n);
        self.largest.set(self.largest.get().max(n));
        let end = (offset + n) as usize;
        let src = self.bytes.get(offset as usize..end).ok_or("past the end")?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn slice(&self, start: u64, end: u64) -> Result<Cow<'_, [u8]>, String> {
        let mut buf = vec![0; (end - start) as usize];
        self.read_at(start, &mut buf)?;
        Ok(Cow::Owned(buf))
    }
}

/// The largest tensor's bytes in a safetensors file.
fn largest_tensor(bytes: &[u8]) -> u64 {
    let st = safetensors::SafeTensors::deserialize(bytes).unwrap();
    st.tensors()
        .iter()
        .map(|(_, v)| v.data().len() as u64)
        .max()
        .unwrap()
}

/// `dir` read twice: whole, and with its `.safetensors` files as counted sources. Returns both
/// and, per source, (its file's bytes, its largest tensor, bytes read, largest read).
#[allow(clippy::type_complexity)]
fn read_both(
    dir: &Path,
    variant: Option<&str>,
) -> (
    ModelFiles,
    ModelFiles,
    Vec<(String, u64, u64, Rc<Cell<u64>>, Rc<Cell<u64>>)>,
) {
    let read = |rel: &str| std::fs::read(dir.join(rel)).ok();
    let whole = ModelFiles::read_layout_variant(dir.display().to_string(), variant, |rel| {
        Ok::<_, ()>(read(rel))
    })
    .unwrap();
    let mut counters = Vec::new();
    let streamed = ModelFiles::read_layout_from(dir.display().to_string(), variant, |rel| {
        let Some(bytes) = read(rel) else {
            return Ok::<_, ()>(None);
        };
        if !rel.ends_with(".safetensors") {
            return Ok(Some(FileData::Bytes(bytes)));
        }
        let (total, largest) = (Rc::new(Cell::new(0)), Rc::new(Cell::new(0)));
        counters.push((
            rel.to_string(),
            bytes.len() as u64,
            largest_tensor(&bytes),
            total.clone(),
            largest.clone(),
        ));
        Ok(Some(FileData::Source(Rc::new(Counted {
            bytes,
            total,
            largest,
        }))))
    })
    .unwrap();
    (whole, streamed, counters)
}

/// Every component's tensors, read through both, are equal.
fn assert_same_weights(whole: &ModelFiles, streamed: &ModelFiles) {
    for component in COMPONENTS {
        // SDXL's second tower, where the model has one.
        if component == "text_encoder_2" && !whole.has("text_encoder_2/config.json") {
            continue;
        }
        let (a, b) = (
            whole.component_weights(component).unwrap(),
            streamed.component_weights(component).unwrap(),
        );
        assert_eq!(a.keys(), b.keys(), "{component}");
        for key in a.keys() {
            // Integer tensors (position ids) are no floats either way.
            match (a.read_f32(&key), b.read_f32(&key)) {
                (Ok(x), Ok(y)) => assert_eq!(x, y, "{component}: {key}"),
                (Err(x), Err(y)) => assert_eq!(x.to_string(), y.to_string(), "{key}"),
                (x, y) => panic!("{component}: {key}: {:?} / {:?}", x.is_ok(), y.is_ok()),
            }
        }
    }
}

/// The UNet's output for the same input from both loads, on the CPU.
fn unet_output(files: &ModelFiles) -> Vec<f32> {
    let device = Device::flex();
    let pipe = Pipeline::load(files, &device).unwrap();
    let size = pipe.unet_config.sample_size;
    let x = draft_core::noise::NoiseRng::new(1).randn([1, 4, size, size], &device);
    let e = pipe.encode(&["a red circle".into()]).unwrap();
    let pixels = size * pipe.downscale();
    let added = pipe.added_conditions(&e, &Default::default(), [pixels, pixels]);
    values(pipe.unet.forward_added(x, 500.0, e.hidden, added)).0
}

#[test]
fn folders_read_by_range_load_the_same_pipeline_one_tensor_at_a_time() {
    for (dir, variant) in [
        (fixtures().join("sd1-tiny"), None),
        (fixtures().join("sd2-tiny"), None),
        (fixtures().join("layouts/sd1-sharded-fp16"), Some("fp16")),
        (fixtures().join("layouts/sd1-tf5"), None),
        (fixtures().join("sdxl-tiny"), None),
    ] {
        let (whole, streamed, counters) = read_both(&dir, variant);
        assert!(!counters.is_empty(), "{}: no safetensors", dir.display());
        assert!(streamed.files.keys().all(|k| !k.ends_with(".safetensors")));
        assert_same_weights(&whole, &streamed);
        assert_eq!(
            unet_output(&whole),
            unet_output(&streamed),
            "{}",
            dir.display()
        );
        for (rel, len, largest_tensor, total, largest_read) in &counters {
            // No read takes more than one tensor (the header aside), so no buffer ever holds
            // the file; all of it is read, the header once per parse.
            let header = {
                let bytes = std::fs::read(dir.join(rel)).unwrap();
                8 + u64::from_le_bytes(bytes[..8].try_into().unwrap())
            };
            assert!(
                largest_read.get() <= (*largest_tensor).max(header),
                "{rel}: a read of {} bytes, the largest tensor is {largest_tensor}",
                largest_read.get()
            );
            assert!(
                total.get() >= *len,
                "{rel}: {} of {len} bytes read",
                total.get()
            );
            eprintln!(
                "{}/{rel}: {len} bytes, largest tensor {largest_tensor}, {} read in all, largest read {}",
                dir.display(),
                total.get(),
                largest_read.get()
            );
        }
    }
}

#[test]
fn a_single_file_checkpoint_read_by_range_loads_as_read_whole() {
    let tokenizer_dir = fixtures().join("clip-tokenizer");
    let vocab = std::fs::read(tokenizer_dir.join("vocab.json")).unwrap();
    let merges = std::fs::read(tokenizer_dir.join("merges.txt")).unwrap();
    let tokenizer: [(&str, &[u8]); 2] = [("vocab.json", &vocab), ("merges.txt", &merges)];
    for (name, path, dir) in [
        (
            "sd1-tiny.safetensors",
            "layouts/sd1-tiny.safetensors",
            "sd1-tiny",
        ),
        (
            "sd2-tiny.safetensors",
            "layouts/sd2-tiny.safetensors",
            "sd2-tiny",
        ),
        (
            "sdxl-tiny.safetensors",
            "sdxl-single/sdxl-tiny.safetensors",
            "sdxl-tiny",
        ),
    ] {
        let path = fixtures().join(path);
        let bytes = std::fs::read(&path).unwrap();
        // The tiny models' own configs and tokenizer (`--model-config`).
        let dir = fixtures().join(dir);
        let config = ModelFiles::read_configs(dir.display().to_string(), |rel| {
            Ok::<_, ()>(std::fs::read(dir.join(rel)).ok())
        })
        .unwrap();
        let whole =
            ModelFiles::from_checkpoint(name, bytes.clone(), Some(&config), &tokenizer).unwrap();
        // The real reader of the CLI: the file on disk, by range.
        let source = FileSource::open(&path).unwrap();
        let streamed = ModelFiles::from_checkpoint(
            name,
            FileData::Source(Rc::new(source)),
            Some(&config),
            &tokenizer,
        )
        .unwrap();
        assert!(streamed.files.keys().all(|k| k != "checkpoint"), "{name}");
        assert_same_weights(&whole, &streamed);
        assert_eq!(unet_output(&whole), unet_output(&streamed), "{name}");
    }
}

#[test]
fn a_truncated_or_unreadable_source_is_an_error_naming_the_file() {
    let path = fixtures().join("sd1-tiny/unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let mut files = common::read_model(&fixtures().join("sd1-tiny"));
    files.insert_source(
        "unet/diffusion_pytorch_model.safetensors",
        Rc::new(bytes[..bytes.len() / 2].to_vec()),
    );
    let err = files.component_weights("unet").err().unwrap().to_string();
    assert!(
        err.contains("unet/diffusion_pytorch_model.safetensors") && err.contains("bytes"),
        "{err}"
    );
    // A source that fails to read (a file removed under the reader) names the tensor.
    struct Failing(u64);
    impl ByteSource for Failing {
        fn len(&self) -> u64 {
            self.0
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
            if offset == 0 && buf.len() == 8 {
                return Err("the file went away".into());
            }
            Err("unreachable".into())
        }
    }
    files.insert_source(
        "unet/diffusion_pytorch_model.safetensors",
        Rc::new(Failing(bytes.len() as u64)),
    );
    let err = files.component_weights("unet").err().unwrap().to_string();
    assert!(err.contains("the file went away"), "{err}");
}

/// A tensor over `UPLOAD_FLUSH_BYTES` in f32 — here `[2600, 4096]` in f16, 20.3 MiB in the file
/// and 40.6 MiB as f32 — loads in pieces of rows joined on the device: no read is larger than
/// one piece (2048 rows, 16 MiB of f16), and the values are the file's.
#[test]
fn a_tensor_over_the_flush_size_loads_in_pieces_of_rows() {
    use draft_core::model::var_builder::{UPLOAD_FLUSH_BYTES, VarBuilder};
    let (rows, cols) = (2600usize, 4096usize);
    assert!(4 * (rows * cols) as u64 > UPLOAD_FLUSH_BYTES);
    let halves: Vec<half::f16> = (0..rows * cols)
        .map(|i| half::f16::from_f32(((i % 1999) as f32 - 999.0) / 1024.0))
        .collect();
    let data: Vec<u8> = halves.iter().flat_map(|v| v.to_le_bytes()).collect();
    let file = draft_core::model::weights::serialize(
        &[("w".into(), safetensors::Dtype::F16, vec![rows, cols], data)],
        None,
    )
    .unwrap();
    let (total, largest) = (Rc::new(Cell::new(0)), Rc::new(Cell::new(0)));
    let mut files = ModelFiles::new("large");
    files.insert_source(
        "unet/diffusion_pytorch_model.safetensors",
        Rc::new(Counted {
            bytes: file,
            total: total.clone(),
            largest: largest.clone(),
        }),
    );
    let weights = files.component_weights("unet").unwrap();
    let (header_reads, header_largest) = (total.get(), largest.get());
    let t = VarBuilder::new(&weights, &Device::flex())
        .get("w", [rows, cols])
        .unwrap();
    let (got, shape) = values(t);
    assert_eq!(shape, [rows, cols]);
    let want: Vec<f32> = halves.iter().map(|v| v.to_f32()).collect();
    assert!(got == want, "the pieces joined are not the tensor");
    let piece_rows = UPLOAD_FLUSH_BYTES as usize / (4 * cols);
    assert!(largest.get().max(header_largest) <= (2 * piece_rows * cols) as u64);
    assert!(largest.get() < (2 * rows * cols) as u64, "read whole");
    assert_eq!(
        total.get() - header_reads,
        (2 * rows * cols) as u64,
        "each byte read once"
    );
}
