//! Images out: a PNG grid, and the `images` tensor [B, H, W, 3] as safetensors.

use std::path::Path;

use anyhow::{Context, Result};

use crate::files::write_atomic;

/// `values` is [B, H, W, 3] in [0, 1]. Images are laid out in a grid with no empty tile
/// (columns: the smallest divisor of B not below √B, so 8 images are 2 × 4 and 7 are 1 × 7);
/// images smaller than 128 pixels (the embedded 32×32 model's) are enlarged by an integer
/// factor with nearest-neighbour sampling, so every model pixel stays a sharp block. With
/// `captions` (one per image, e.g. its reward), each tile gets its caption on a strip below.
pub fn write_png_grid(
    path: &Path,
    values: &[f32],
    (b, h, w): (usize, usize, usize),
    captions: &[String],
) -> Result<()> {
    let cols = grid_columns(b);
    let f = (128 / h.max(w).max(1)).max(1);
    let (th, tw) = (h * f, w * f);
    let strip = if captions.is_empty() { 0 } else { 22 };
    let rows = b.div_ceil(cols);
    let (gw, gh) = (cols * tw, rows * (th + strip));
    let mut rgb = vec![255u8; gw * gh * 3];
    for i in 0..b {
        let (gx, gy) = ((i % cols) * tw, (i / cols) * (th + strip));
        for y in 0..th {
            for x in 0..tw {
                let o = ((i * h + y / f) * w + x / f) * 3;
                let d = ((gy + y) * gw + gx + x) * 3;
                for c in 0..3 {
                    rgb[d + c] = (values[o + c].clamp(0.0, 1.0) * 255.0).round() as u8;
                }
            }
        }
    }
    if !captions.is_empty() {
        crate::plot::caption_tiles(
            &mut rgb,
            (gw as u32, gh as u32),
            (tw, th, strip),
            cols,
            captions,
        )
        .map_err(|e| anyhow::anyhow!("{}: cannot draw captions: {e}", path.display()))?;
    }
    let grid = image::RgbImage::from_raw(gw as u32, gh as u32, rgb).expect("buffer size matches");
    let mut bytes = Vec::new();
    grid.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .context("cannot encode PNG")?;
    write_atomic(path, &bytes)
}

/// The smallest divisor of `b` that is at least √b: a full grid, as square as `b` allows.
fn grid_columns(b: usize) -> usize {
    (1..=b.max(1))
        .find(|&c| b.max(1).is_multiple_of(c) && c * c >= b)
        .unwrap_or(1)
}

/// Writes f32 tensors to a safetensors file (with the core's one writer).
pub fn write_tensors(path: &Path, tensors: &[(&str, &[f32], Vec<usize>)]) -> Result<()> {
    let owned: Vec<(String, Vec<usize>, Vec<f32>)> = tensors
        .iter()
        .map(|(name, values, shape)| (name.to_string(), shape.clone(), values.to_vec()))
        .collect();
    let bytes = draft_core::model::weights::serialize_f32(&owned, None)
        .with_context(|| format!("cannot serialize tensors for {}", path.display()))?;
    write_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::grid_columns;

    #[test]
    fn grids_have_no_empty_tile() {
        for b in 1..=40 {
            let c = grid_columns(b);
            assert_eq!(b % c, 0, "{b}");
            assert!(c * c >= b, "{b}");
        }
        assert_eq!(grid_columns(8), 4);
        assert_eq!(grid_columns(9), 3);
        assert_eq!(grid_columns(7), 7);
    }
}
