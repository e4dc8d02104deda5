//! A procedural captioned-image dataset (no files): coloured shapes on coloured backgrounds,
//! and the deterministic analyser that reads a shape's colour and class back from an image.
//!
//! `Shapes::sample(i)` is a pure function of the dataset seed and the index, so a training run
//! can be resumed at any index. Some (shape, colour) pairs are held out of training
//! ([`Attributes::held_out`]) so that sample quality can be measured on captions the model has
//! never seen.

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

/// Shape classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Shape {
    Circle,
    Square,
    Triangle,
}

impl Shape {
    pub const ALL: [Shape; 3] = [Shape::Circle, Shape::Square, Shape::Triangle];

    pub fn name(&self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
        }
    }
}

/// The palette: names and RGB in [0, 1].
pub const COLORS: [(&str, [f32; 3]); 7] = [
    ("red", [0.90, 0.10, 0.10]),
    ("green", [0.10, 0.75, 0.20]),
    ("blue", [0.15, 0.25, 0.90]),
    ("yellow", [0.95, 0.90, 0.15]),
    ("purple", [0.60, 0.20, 0.75]),
    ("white", [0.97, 0.97, 0.97]),
    ("black", [0.05, 0.05, 0.05]),
];

/// What one image shows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Attributes {
    pub shape: Shape,
    /// Index into [`COLORS`].
    pub color: usize,
    pub background: usize,
    pub large: bool,
    /// Centre in [0, 1]² of the image.
    pub center: (f32, f32),
}

impl Attributes {
    /// "a small red circle on a blue background".
    pub fn caption(&self) -> String {
        format!(
            "a {} {} {} on a {} background",
            if self.large { "large" } else { "small" },
            COLORS[self.color].0,
            self.shape.name(),
            COLORS[self.background].0
        )
    }

    /// (shape, colour) pairs kept out of training: one colour per shape, chosen so that every
    /// colour and every shape still appears in training.
    pub fn held_out(shape: Shape, color: usize) -> bool {
        matches!(
            (shape, COLORS[color].0),
            (Shape::Circle, "green") | (Shape::Square, "yellow") | (Shape::Triangle, "blue")
        )
    }
}

/// One image `[3, size, size]` (planar RGB in [0, 1]) and its caption.
#[derive(Debug, Clone)]
pub struct Example {
    pub attributes: Attributes,
    pub caption: String,
    pub pixels: Vec<f32>,
}

/// The dataset: images of `size`×`size` pixels from `seed`.
#[derive(Debug, Clone, Copy)]
pub struct Shapes {
    pub seed: u64,
    pub size: usize,
}

impl Shapes {
    pub fn new(seed: u64, size: usize) -> Self {
        Self { seed, size }
    }

    /// Random attributes for example `index`, never a held-out pair.
    pub fn attributes(&self, index: u64) -> Attributes {
        let mut rng = StdRng::seed_from_u64(self.seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        loop {
            let shape = Shape::ALL[rng.random_range(0..Shape::ALL.len())];
            let color = rng.random_range(0..COLORS.len());
            let mut background = rng.random_range(0..COLORS.len() - 1);
            if background >= color {
                background += 1;
            }
            if Attributes::held_out(shape, color) {
                continue;
            }
            let large = rng.random_bool(0.5);
            let r = if large { 0.32 } else { 0.2 };
            let center = (
                rng.random_range(r..1.0 - r) as f32,
                rng.random_range(r..1.0 - r) as f32,
            );
            return Attributes {
                shape,
                color,
                background,
                large,
                center,
            };
        }
    }

    pub fn sample(&self, index: u64) -> Example {
        let attributes = self.attributes(index);
        Example {
            caption: attributes.caption(),
            pixels: render(&attributes, self.size),
            attributes,
        }
    }
}

/// Half-size of the shape's bounding box as a fraction of the image.
fn radius(a: &Attributes) -> f32 {
    if a.large { 0.3 } else { 0.18 }
}

/// Whether the point (x, y) in [0, 1]² is inside the shape.
fn inside(a: &Attributes, x: f32, y: f32) -> bool {
    let r = radius(a);
    let (dx, dy) = (x - a.center.0, y - a.center.1);
    match a.shape {
        Shape::Circle => dx * dx + dy * dy <= r * r,
        Shape::Square => dx.abs() <= r && dy.abs() <= r,
        // Apex up, base at the bottom of the bounding box.
        Shape::Triangle => {
            let t = (dy + r) / (2.0 * r); // 0 at the apex, 1 at the base
            (0.0..=1.0).contains(&t) && dx.abs() <= r * t
        }
    }
}

/// Renders with 4×4 supersampling (anti-aliased edges).
pub fn render(a: &Attributes, size: usize) -> Vec<f32> {
    let fg = COLORS[a.color].1;
    let bg = COLORS[a.background].1;
    let mut out = vec![0f32; 3 * size * size];
    const S: usize = 4;
    for py in 0..size {
        for px in 0..size {
            let mut cover = 0;
            for sy in 0..S {
                for sx in 0..S {
                    let x = (px as f32 + (sx as f32 + 0.5) / S as f32) / size as f32;
                    let y = (py as f32 + (sy as f32 + 0.5) / S as f32) / size as f32;
                    cover += inside(a, x, y) as usize;
                }
            }
            let f = cover as f32 / (S * S) as f32;
            for c in 0..3 {
                out[(c * size + py) * size + px] = fg[c] * f + bg[c] * (1.0 - f);
            }
        }
    }
    out
}

/// What the analyser reads from an image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    pub shape: Shape,
    pub color: usize,
    pub background: usize,
}

fn nearest_color(rgb: [f32; 3]) -> usize {
    let d = |c: &[f32; 3]| (0..3).map(|i| (c[i] - rgb[i]).powi(2)).sum::<f32>();
    (0..COLORS.len())
        .min_by(|&a, &b| d(&COLORS[a].1).total_cmp(&d(&COLORS[b].1)))
        .unwrap()
}

/// Reads background colour, shape colour and shape class from planar RGB `[3, size, size]`,
/// robustly to the pixel noise of model samples:
///
/// 1. the background is the per-channel median of the border pixels (its nearest palette
///    colour is the background class);
/// 2. the shape is the largest 4-connected region of pixels farther than 0.3 (RGB distance)
///    from that background — isolated speckles are other, smaller regions;
/// 3. its colour is the commonest palette colour among its pixels other than the
///    background's;
/// 4. its class comes from how much of its bounding box it fills: square ≈ 1, circle ≈ π/4,
///    triangle ≈ 1/2.
pub fn analyse(pixels: &[f32], size: usize) -> Reading {
    let n = size * size;
    let px = |i: usize| -> [f32; 3] { [pixels[i], pixels[n + i], pixels[2 * n + i]] };
    let mut border: Vec<usize> = Vec::with_capacity(4 * size);
    for i in 0..size {
        for (x, y) in [(i, 0), (i, size - 1), (0, i), (size - 1, i)] {
            border.push(y * size + x);
        }
    }
    let bg_rgb: [f32; 3] = std::array::from_fn(|c| {
        let mut v: Vec<f32> = border.iter().map(|&i| px(i)[c]).collect();
        v.sort_by(f32::total_cmp);
        v[v.len() / 2]
    });
    let background = nearest_color(bg_rgb);
    let far = |i: usize| {
        let p = px(i);
        (0..3).map(|c| (p[c] - bg_rgb[c]).powi(2)).sum::<f32>() > 0.3 * 0.3
    };
    let mask: Vec<bool> = (0..n).map(far).collect();
    // The largest 4-connected component of the mask.
    let mut seen = vec![false; n];
    let mut best: Vec<usize> = Vec::new();
    for start in 0..n {
        if !mask[start] || seen[start] {
            continue;
        }
        let mut region = vec![start];
        seen[start] = true;
        let mut k = 0;
        while k < region.len() {
            let i = region[k];
            k += 1;
            let (x, y) = (i % size, i / size);
            let mut visit = |j: usize| {
                if mask[j] && !seen[j] {
                    seen[j] = true;
                    region.push(j);
                }
            };
            if x > 0 {
                visit(i - 1);
            }
            if x + 1 < size {
                visit(i + 1);
            }
            if y > 0 {
                visit(i - size);
            }
            if y + 1 < size {
                visit(i + size);
            }
        }
        if region.len() > best.len() {
            best = region;
        }
    }
    if best.is_empty() {
        // Nothing stands out from the background: no shape to read.
        let color = (0..COLORS.len()).find(|&c| c != background).unwrap_or(0);
        return Reading {
            shape: Shape::Square,
            color,
            background,
        };
    }
    let mut counts = [0usize; COLORS.len()];
    for &i in &best {
        counts[nearest_color(px(i))] += 1;
    }
    counts[background] = 0;
    let color = (0..COLORS.len()).max_by_key(|&c| counts[c]).unwrap();
    let (mut x0, mut y0, mut x1, mut y1) = (size, size, 0, 0);
    for &i in &best {
        let (x, y) = (i % size, i / size);
        x0 = x0.min(x);
        y0 = y0.min(y);
        x1 = x1.max(x);
        y1 = y1.max(y);
    }
    let area = ((x1 - x0 + 1) * (y1 - y0 + 1)) as f32;
    let fill = best.len() as f32 / area;
    let shape = if fill > 0.9 {
        Shape::Square
    } else if fill > 0.64 {
        Shape::Circle
    } else {
        Shape::Triangle
    };
    Reading {
        shape,
        color,
        background,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_are_deterministic_and_never_held_out() {
        let d = Shapes::new(7, 32);
        for i in 0..500 {
            let a = d.sample(i);
            assert_eq!(a.pixels, d.sample(i).pixels);
            assert!(!Attributes::held_out(
                a.attributes.shape,
                a.attributes.color
            ));
            assert_ne!(a.attributes.color, a.attributes.background);
            assert!(a.pixels.iter().all(|v| (0.0..=1.0).contains(v)));
        }
        assert_eq!(
            Attributes {
                shape: Shape::Circle,
                color: 0,
                background: 2,
                large: false,
                center: (0.5, 0.5)
            }
            .caption(),
            "a small red circle on a blue background"
        );
    }

    #[test]
    fn the_analyser_reads_the_rendered_attributes() {
        let d = Shapes::new(3, 32);
        let n = 600;
        let (mut shape_ok, mut color_ok, mut bg_ok) = (0, 0, 0);
        for i in 0..n {
            let e = d.sample(i);
            let r = analyse(&e.pixels, 32);
            shape_ok += (r.shape == e.attributes.shape) as usize;
            color_ok += (r.color == e.attributes.color) as usize;
            bg_ok += (r.background == e.attributes.background) as usize;
        }
        let pct = |k: usize| 100.0 * k as f64 / n as f64;
        // The analyser has to be near-perfect on clean renders for the quality test to mean
        // anything on model samples.
        assert!(pct(color_ok) >= 99.0, "colour {:.1}%", pct(color_ok));
        assert!(pct(bg_ok) >= 99.0, "background {:.1}%", pct(bg_ok));
        assert!(pct(shape_ok) >= 97.0, "shape {:.1}%", pct(shape_ok));
    }

    /// Model samples are speckled: the reading must survive pixel noise of the amplitude
    /// seen in them (uniform ±0.2 per channel, i.e. ±25 % of the palette's contrast).
    #[test]
    fn the_analyser_survives_pixel_noise() {
        use rand::{RngExt, SeedableRng};
        let d = Shapes::new(5, 32);
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let n = 600;
        let (mut shape_ok, mut color_ok, mut bg_ok) = (0, 0, 0);
        for i in 0..n {
            let e = d.sample(i);
            let noisy: Vec<f32> = e
                .pixels
                .iter()
                .map(|v| (v + rng.random_range(-0.2f32..0.2)).clamp(0.0, 1.0))
                .collect();
            let r = analyse(&noisy, 32);
            shape_ok += (r.shape == e.attributes.shape) as usize;
            color_ok += (r.color == e.attributes.color) as usize;
            bg_ok += (r.background == e.attributes.background) as usize;
        }
        let pct = |k: usize| 100.0 * k as f64 / n as f64;
        assert!(pct(color_ok) >= 97.0, "colour {:.1}%", pct(color_ok));
        assert!(pct(bg_ok) >= 99.0, "background {:.1}%", pct(bg_ok));
        assert!(pct(shape_ok) >= 90.0, "shape {:.1}%", pct(shape_ok));
    }
}
