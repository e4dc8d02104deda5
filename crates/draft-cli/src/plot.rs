//! The reward curve PNG (plotters, bitmap backend; no text, so no font is needed: the axes
//! run from step 1 to the last step and from the lowest to the highest value, which
//! `metrics.jsonl` lists).

use std::path::Path;

use anyhow::{Result, anyhow};
use draft_core::train::StepMetrics;
use plotters::prelude::*;

/// Mean reward per step (line) with its ±1 std band over the batch, and a moving average.
pub fn reward_curve(path: &Path, history: &[StepMetrics]) -> Result<()> {
    let (w, h) = (640u32, 400u32);
    let mut rgb = vec![0u8; (w * h * 3) as usize];
    draw(&mut rgb, (w, h), history)
        .map_err(|e| anyhow!("{}: cannot draw the reward curve: {e}", path.display()))?;
    let img = image::RgbImage::from_raw(w, h, rgb).expect("buffer size matches");
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )?;
    crate::files::write_atomic(path, &bytes)
}

fn draw(
    rgb: &mut [u8],
    size: (u32, u32),
    history: &[StepMetrics],
) -> Result<(), Box<dyn std::error::Error>> {
    let root = BitMapBackend::with_buffer(rgb, size).into_drawing_area();
    root.fill(&WHITE)?;
    let lo = history
        .iter()
        .map(|m| m.reward_mean - m.reward_std)
        .fold(f64::INFINITY, f64::min);
    let hi = history
        .iter()
        .map(|m| m.reward_mean + m.reward_std)
        .fold(f64::NEG_INFINITY, f64::max);
    let pad = ((hi - lo) * 0.05).max(1e-6);
    let first = history[0].step as f64;
    let last = (history[history.len() - 1].step as f64).max(first + 1.0);
    let mut chart = ChartBuilder::on(&root)
        .margin(16)
        .build_cartesian_2d(first..last, (lo - pad)..(hi + pad))?;
    chart.plotting_area().draw(&Rectangle::new(
        [(first, lo - pad), (last, hi + pad)],
        BLACK.stroke_width(1),
    ))?;
    let band: Vec<(f64, f64)> = history
        .iter()
        .map(|m| (m.step as f64, m.reward_mean + m.reward_std))
        .chain(
            history
                .iter()
                .rev()
                .map(|m| (m.step as f64, m.reward_mean - m.reward_std)),
        )
        .collect();
    chart.draw_series(std::iter::once(Polygon::new(band, BLUE.mix(0.15).filled())))?;
    chart.draw_series(LineSeries::new(
        history.iter().map(|m| (m.step as f64, m.reward_mean)),
        BLUE.stroke_width(1),
    ))?;
    let w = (history.len() / 10).max(1);
    let smooth: Vec<(f64, f64)> = (0..history.len())
        .map(|i| {
            let s = i.saturating_sub(w - 1);
            let mean =
                history[s..=i].iter().map(|m| m.reward_mean).sum::<f64>() / (i - s + 1) as f64;
            (history[i].step as f64, mean)
        })
        .collect();
    chart.draw_series(LineSeries::new(smooth, RED.stroke_width(2)))?;
    root.present()?;
    Ok(())
}
