//! Figures as PNG (plotters' bitmap backend): the reward curve, `draft compare`'s curves and
//! the captions of sample grids. Text is drawn with DejaVu Sans compiled into the binary, so a
//! headless machine without fonts draws the same figure.

use std::path::Path;

use anyhow::{Result, anyhow};
use draft_core::train::trainer::StepMetrics;
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;
use plotters::style::{FontStyle, register_font};

const FONT: &str = "sans-serif";

/// Registers the embedded font once, before any text is drawn.
fn font() -> Result<(), Box<dyn std::error::Error>> {
    static REGISTERED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *REGISTERED
        .get_or_init(|| register_font(FONT, FontStyle::Normal, dejavu::sans::regular()).is_ok());
    if ok {
        Ok(())
    } else {
        Err("the embedded font does not parse".into())
    }
}

type Draw = Result<(), Box<dyn std::error::Error>>;

type Chart<'a, 'b> =
    ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// A titled chart over `xs` × `ys` with labelled axes (integer x ticks for updates).
fn chart<'a, 'b>(
    root: &'a DrawingArea<BitMapBackend<'b>, plotters::coord::Shift>,
    labels: &Labels,
    xs: std::ops::Range<f64>,
    ys: std::ops::Range<f64>,
) -> Result<Chart<'a, 'b>, Box<dyn std::error::Error>> {
    let ticks = ((xs.end - xs.start) as usize + 1).min(10);
    let mut chart = ChartBuilder::on(root)
        .caption(labels.title, (FONT, 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(xs, ys)?;
    chart
        .configure_mesh()
        .x_labels(ticks)
        .x_label_formatter(&|x| format!("{x:.0}"))
        .x_desc(labels.x)
        .y_desc(labels.y)
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 16))
        .light_line_style(WHITE.mix(0.0))
        .draw()?;
    Ok(chart)
}

/// The legend of the series drawn with labels.
fn legend<'a, 'b: 'a>(chart: &mut Chart<'a, 'b>, position: SeriesLabelPosition) -> Draw {
    chart
        .configure_series_labels()
        .position(position)
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

/// Mean reward per update (line) with its ±1 std band over the batch, a moving average, and the
/// fixed evaluation set's reward where it was measured; titled, with axes and a legend.
pub fn reward_curve(path: &Path, history: &[StepMetrics]) -> Result<()> {
    let (w, h) = (800u32, 500u32);
    let mut rgb = vec![0u8; (w * h * 3) as usize];
    draw_reward(&mut rgb, (w, h), history)
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

/// `(lo, hi)` padded by 5 % (a flat series gets a small range of its own).
fn padded(lo: f64, hi: f64) -> (f64, f64) {
    let pad = ((hi - lo) * 0.05).max(1e-6 * lo.abs().max(1.0));
    (lo - pad, hi + pad)
}

fn draw_reward(rgb: &mut [u8], size: (u32, u32), history: &[StepMetrics]) -> Draw {
    font()?;
    if history.is_empty() {
        return Err("no updates to plot".into());
    }
    let root = BitMapBackend::with_buffer(rgb, size).into_drawing_area();
    root.fill(&WHITE)?;
    let evals: Vec<(f64, f64)> = history
        .iter()
        .filter_map(|m| m.eval_reward.map(|r| (m.step as f64, r)))
        .collect();
    let lo = history
        .iter()
        .map(|m| m.reward_mean - m.reward_std)
        .chain(evals.iter().map(|p| p.1))
        .fold(f64::INFINITY, f64::min);
    let hi = history
        .iter()
        .map(|m| m.reward_mean + m.reward_std)
        .chain(evals.iter().map(|p| p.1))
        .fold(f64::NEG_INFINITY, f64::max);
    let (lo, hi) = padded(lo, hi);
    let first = history[0].step as f64;
    let last = (history[history.len() - 1].step as f64).max(first + 1.0);
    let labels = Labels {
        title: "Reward during training",
        x: "update",
        y: "reward",
    };
    let mut chart = chart(&root, &labels, first..last, lo..hi)?;
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
    let band_color = BLUE.mix(0.15);
    chart
        .draw_series(std::iter::once(Polygon::new(band, band_color.filled())))?
        .label("batch ±1 std")
        .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 20, y + 5)], band_color.filled()));
    chart
        .draw_series(LineSeries::new(
            history.iter().map(|m| (m.step as f64, m.reward_mean)),
            BLUE.stroke_width(1),
        ))?
        .label("batch mean")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(1)));
    let w = history.len() / 10;
    if w > 1 {
        let smooth: Vec<(f64, f64)> = (0..history.len())
            .map(|i| {
                let s = i.saturating_sub(w - 1);
                let mean =
                    history[s..=i].iter().map(|m| m.reward_mean).sum::<f64>() / (i - s + 1) as f64;
                (history[i].step as f64, mean)
            })
            .collect();
        chart
            .draw_series(LineSeries::new(smooth, RED.stroke_width(2)))?
            .label(format!("batch mean, moving average of {w}"))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
    }
    if !evals.is_empty() {
        let green = RGBColor(44, 160, 44);
        chart.draw_series(LineSeries::new(
            evals.iter().copied(),
            green.stroke_width(2),
        ))?;
        chart
            .draw_series(evals.iter().map(|&p| Circle::new(p, 4, green.filled())))?
            .label("fixed evaluation set")
            .legend(move |(x, y)| Circle::new((x + 10, y), 4, green.filled()));
    }
    legend(&mut chart, SeriesLabelPosition::UpperLeft)?;
    root.present()?;
    Ok(())
}

/// Line colours of [`curves`], in order.
pub const PALETTE: [(&str, RGBColor); 6] = [
    ("blue", RGBColor(31, 119, 180)),
    ("orange", RGBColor(255, 127, 14)),
    ("green", RGBColor(44, 160, 44)),
    ("red", RGBColor(214, 39, 40)),
    ("purple", RGBColor(148, 103, 189)),
    ("brown", RGBColor(140, 86, 75)),
];

/// What a figure of [`curves`] says: its title and axis names.
pub struct Labels<'a> {
    pub title: &'a str,
    pub x: &'a str,
    pub y: &'a str,
}

/// Several labelled (x, y) series on shared axes, one colour each (cycling through
/// [`PALETTE`]), with a legend.
pub fn curves(path: &Path, labels: &Labels, series: &[(String, Vec<(f64, f64)>)]) -> Result<()> {
    let (w, h) = (800u32, 500u32);
    let mut rgb = vec![0u8; (w * h * 3) as usize];
    draw_curves(&mut rgb, (w, h), labels, series)
        .map_err(|e| anyhow!("{}: cannot draw: {e}", path.display()))?;
    write_png(path, (w, h), rgb)
}

fn draw_curves(
    rgb: &mut [u8],
    size: (u32, u32),
    labels: &Labels,
    series: &[(String, Vec<(f64, f64)>)],
) -> Draw {
    font()?;
    let root = BitMapBackend::with_buffer(rgb, size).into_drawing_area();
    root.fill(&WHITE)?;
    let points = || series.iter().flat_map(|s| s.1.iter());
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
    let (y0, y1) = padded(y0, y1);
    let mut chart = chart(&root, labels, x0..x1, y0..y1)?;
    for (i, (label, s)) in series.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()].1;
        chart
            .draw_series(LineSeries::new(s.iter().copied(), color.stroke_width(2)))?
            .label(label.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart.draw_series(s.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    }
    legend(&mut chart, SeriesLabelPosition::LowerRight)?;
    root.present()?;
    Ok(())
}

/// Writes each caption centred on the strip below its tile of a grid image (`rgb`, `size`),
/// tiles `(width, height, strip)` pixels, `cols` to a row.
pub fn caption_tiles(
    rgb: &mut [u8],
    size: (u32, u32),
    (tw, th, strip): (usize, usize, usize),
    cols: usize,
    captions: &[String],
) -> Draw {
    font()?;
    let root = BitMapBackend::with_buffer(rgb, size).into_drawing_area();
    let style = TextStyle::from((FONT, 15).into_font()).color(&BLACK).pos(
        plotters::style::text_anchor::Pos::new(
            plotters::style::text_anchor::HPos::Center,
            plotters::style::text_anchor::VPos::Center,
        ),
    );
    for (i, text) in captions.iter().enumerate() {
        let x = (i % cols) * tw + tw / 2;
        let y = (i / cols) * (th + strip) + th + strip / 2;
        root.draw(&Text::new(text.as_str(), (x as i32, y as i32), &style))?;
    }
    root.present()?;
    Ok(())
}
