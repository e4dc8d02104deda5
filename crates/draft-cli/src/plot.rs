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
    write_png(path, (w, h), rgb)
}

fn write_png(path: &Path, (w, h): (u32, u32), rgb: Vec<u8>) -> Result<()> {
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

/// Line colours of [`curves`], in order (the legend is printed, as the bitmap backend draws no
/// text).
pub const PALETTE: [(&str, RGBColor); 6] = [
    ("blue", RGBColor(31, 119, 180)),
    ("orange", RGBColor(255, 127, 14)),
    ("green", RGBColor(44, 160, 44)),
    ("red", RGBColor(214, 39, 40)),
    ("purple", RGBColor(148, 103, 189)),
    ("brown", RGBColor(140, 86, 75)),
];

/// Several (x, y) series on shared axes, one colour each (cycling through [`PALETTE`]).
pub fn curves(path: &Path, series: &[Vec<(f64, f64)>]) -> Result<()> {
    let (w, h) = (640u32, 400u32);
    let mut rgb = vec![0u8; (w * h * 3) as usize];
    draw_curves(&mut rgb, (w, h), series)
        .map_err(|e| anyhow!("{}: cannot draw: {e}", path.display()))?;
    write_png(path, (w, h), rgb)
}

fn draw_curves(
    rgb: &mut [u8],
    size: (u32, u32),
    series: &[Vec<(f64, f64)>],
) -> Result<(), Box<dyn std::error::Error>> {
    let root = BitMapBackend::with_buffer(rgb, size).into_drawing_area();
    root.fill(&WHITE)?;
    let points = || series.iter().flatten();
    let (x0, x1) = points().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
        (a.min(p.0), b.max(p.0))
    });
    let (y0, y1) = points().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| {
        (a.min(p.1), b.max(p.1))
    });
    if !x0.is_finite() || !y0.is_finite() {
        return Err("no points to plot".into());
    }
    let x1 = x1.max(x0 + 1.0);
    let pad = ((y1 - y0) * 0.05).max(1e-6);
    let mut chart = ChartBuilder::on(&root)
        .margin(16)
        .build_cartesian_2d(x0..x1, (y0 - pad)..(y1 + pad))?;
    chart.plotting_area().draw(&Rectangle::new(
        [(x0, y0 - pad), (x1, y1 + pad)],
        BLACK.stroke_width(1),
    ))?;
    for (i, s) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()].1;
        chart.draw_series(LineSeries::new(s.iter().copied(), color.stroke_width(2)))?;
        chart.draw_series(s.iter().map(|&p| Circle::new(p, 2, color.filled())))?;
    }
    root.present()?;
    Ok(())
}
