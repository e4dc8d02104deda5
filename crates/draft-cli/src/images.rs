//! Images out: a PNG grid, and the `images` tensor [B, H, W, 3] as safetensors.

use std::path::Path;

use anyhow::{Context, Result};
use safetensors::{Dtype, tensor::TensorView};

use crate::files::write_atomic;

/// `values` is [B, H, W, 3] in [0, 1]. Images are laid out in a near-square grid; images
/// smaller than 128 pixels (the embedded 32×32 model's) are enlarged by an integer factor with
/// nearest-neighbour sampling, so every model pixel stays a sharp block.
pub fn write_png_grid(path: &Path, values: &[f32], b: usize, h: usize, w: usize) -> Result<()> {
    let cols = (b as f64).sqrt().ceil() as usize;
    let rows = b.div_ceil(cols);
    let grid = grid_image(values, b, h, w, cols);
    let f = (128 / h.max(w).max(1)).max(1) as u32;
    let grid = if f > 1 {
        image::imageops::resize(
            &grid,
            grid.width() * f,
            grid.height() * f,
            image::imageops::FilterType::Nearest,
        )
    } else {
        grid
    };
    debug_assert_eq!(grid.height() as usize, rows * h * f as usize);
    let mut bytes = Vec::new();
    grid.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .context("cannot encode PNG")?;
    write_atomic(path, &bytes)
}

fn grid_image(values: &[f32], b: usize, h: usize, w: usize, cols: usize) -> image::RgbImage {
    let rows = b.div_ceil(cols);
    let mut grid = image::RgbImage::new((cols * w) as u32, (rows * h) as u32);
    for i in 0..b {
        let (gx, gy) = ((i % cols) * w, (i / cols) * h);
        for y in 0..h {
            for x in 0..w {
                let o = ((i * h + y) * w + x) * 3;
                let px = |c: usize| (values[o + c].clamp(0.0, 1.0) * 255.0).round() as u8;
                grid.put_pixel(
                    (gx + x) as u32,
                    (gy + y) as u32,
                    image::Rgb([px(0), px(1), px(2)]),
                );
            }
        }
    }
    grid
}

/// Writes f32 tensors to a safetensors file.
pub fn write_tensors(path: &Path, tensors: &[(&str, &[f32], Vec<usize>)]) -> Result<()> {
    let views = tensors
        .iter()
        .map(|(name, values, shape)| {
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (name.to_string(), shape.clone(), bytes)
        })
        .collect::<Vec<_>>();
    let views = views
        .iter()
        .map(|(name, shape, bytes)| {
            Ok((
                name.clone(),
                TensorView::new(Dtype::F32, shape.clone(), bytes)?,
            ))
        })
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()
        .context("cannot build the safetensors file")?;
    let bytes = safetensors::serialize(views, None).context("cannot serialize tensors")?;
    write_atomic(path, &bytes)
}
