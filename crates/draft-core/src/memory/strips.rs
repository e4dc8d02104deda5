//! Row strips: an activation too large for one buffer, held as strips along its height.
//!
//! A WebGPU shader binds a storage buffer of at most the adapter's
//! `maxStorageBufferBindingSize` (128 MiB unless the adapter grants more), and every Burn tensor
//! is one buffer. SD-1.x's VAE decoder at 512² has `[1, 256, 512, 512]` activations (256 MiB):
//! its layers at full resolution run here on strips of rows ([`Parts`]) instead, none larger than
//! a byte budget ([`MAX_BUFFER_BYTES`] by default). The result is the whole tensor's, up to the
//! order of sums:
//!
//! - a stride-1 "same" convolution ([`conv`]) takes the rows its kernel reaches from the strips
//!   above and below (zero padding only at the image's edges);
//! - a group norm ([`group_norm`]) combines each strip's mean and centred sum of squares into
//!   the statistics of all strips, then scales and shifts each strip;
//! - element-wise work, 1×1 convolutions and nearest upsampling are per strip.
//!
//! Under autodiff the strips are ordinary tensors, so the backward is Burn's and every gradient
//! buffer is a strip too. The checkpointed chains ([`crate::memory::checkpoint`]) carry [`Parts`]
//! between segments, so that a kept segment input is a list of strips as well.

use burn::prelude::*;

/// A tensor `[N, C, H, W]` as strips of rows, top to bottom (one part: the whole tensor).
pub type Parts = Vec<Tensor<4>>;

/// The largest activation the layers that run on strips may make, in bytes (WebGPU's default
/// `maxStorageBufferBindingSize`).
pub const MAX_BUFFER_BYTES: u64 = 128 << 20;

/// The parts as one tensor (a copy only when there are several).
pub fn join(parts: Parts) -> Tensor<4> {
    if parts.len() == 1 {
        parts.into_iter().next().expect("one part")
    } else {
        Tensor::cat(parts, 2)
    }
}

/// `x` cut into strips of `rows[i]` rows (which sum to its height).
pub fn split_as(x: Tensor<4>, rows: &[usize]) -> Parts {
    if rows.len() <= 1 {
        return vec![x];
    }
    let mut start = 0;
    rows.iter()
        .map(|&r| {
            let part = x.clone().narrow(2, start, r);
            start += r;
            part
        })
        .collect()
}

/// Each part's height.
pub fn rows(parts: &[Tensor<4>]) -> Vec<usize> {
    parts.iter().map(|p| p.dims()[2]).collect()
}

/// The parts with every one taller than `max_rows` cut into near-equal strips of at most that.
pub fn resplit(parts: Parts, max_rows: usize) -> Parts {
    let max_rows = max_rows.max(1);
    if parts.iter().all(|p| p.dims()[2] <= max_rows) {
        return parts;
    }
    let mut out = Vec::new();
    for p in parts {
        let h = p.dims()[2];
        let n = h.div_ceil(max_rows);
        let sizes: Vec<usize> = (0..n).map(|i| h / n + usize::from(i < h % n)).collect();
        // Each strip a tensor of its own, not a view of `p`: burn-cubecl 0.22.1's 1×1
        // convolution reads a batch > 1 row slice of a convolution's (NHWC) output with the
        // whole tensor's batch stride (docs/parity.md, "Strips of rows").
        out.extend(split_as(p, &sizes).into_iter().map(|s| s * 1.0));
    }
    out
}

/// How many input rows a strip may have so that a layer's largest tensor stays within
/// `budget` bytes: the layer maps each input row of `x` (dims `[n, _, _, w]`, element size
/// `elem`) to `up` output rows of `channels × up·w` values, and a 3×3 convolution there reads two
/// halo rows more, padded by a column on each side. At least one row.
pub fn max_rows(x: [usize; 4], elem: usize, channels: usize, up: usize, budget: u64) -> usize {
    let [n, _, _, w] = x;
    let row = (n * channels * (w * up + 2) * elem).max(1) as u64;
    let out_rows = (budget / row).saturating_sub(2).min(usize::MAX as u64) as usize;
    (out_rows / up).max(1)
}

/// Runs a layer on `parts`: whole when they are one part of at most `max_rows` rows (exactly the
/// layer's usual forward), else on strips of at most `max_rows` rows.
pub fn apply(
    parts: Parts,
    max_rows: usize,
    whole: impl FnOnce(Tensor<4>) -> Tensor<4>,
    strips: impl FnOnce(Parts) -> Parts,
) -> Parts {
    let parts = resplit(parts, max_rows);
    if parts.len() == 1 {
        vec![whole(join(parts))]
    } else {
        strips(parts)
    }
}

/// A stride-1 "same" convolution on strips: `conv(x, (pad_top, pad_bottom))` is applied to each
/// strip with the `above` / `below` rows of its neighbours that the kernel reaches, and with
/// zero padding only where the image ends (`nn::Conv2d::forward_strips`).
pub fn conv(
    parts: &[Tensor<4>],
    (above, below): (usize, usize),
    conv: impl Fn(Tensor<4>, (usize, usize)) -> Tensor<4>,
) -> Parts {
    (0..parts.len())
        .map(|i| {
            let mut pieces = Vec::new();
            // Rows above, from as many strips up as it takes; what is left is zero padding.
            let mut need = above;
            for p in parts[..i].iter().rev() {
                if need == 0 {
                    break;
                }
                let h = p.dims()[2];
                let r = need.min(h);
                pieces.insert(0, p.clone().narrow(2, h - r, r));
                need -= r;
            }
            let pad_top = need;
            pieces.push(parts[i].clone());
            let mut need = below;
            for p in &parts[i + 1..] {
                if need == 0 {
                    break;
                }
                let r = need.min(p.dims()[2]);
                pieces.push(p.clone().narrow(2, 0, r));
                need -= r;
            }
            conv(join(pieces), (pad_top, need))
        })
        .collect()
}

/// A group norm of `num_groups` groups with per-channel `weight` and `bias` (then SiLU when
/// `silu_after`) on strips, with the statistics of all of them: each
/// strip's mean and centred sum of squares ([`crate::ops::group_norm::group_moments`]), combined as
/// Chan et al.'s parallel variance (`M2 = Σ M2ᵢ + Σ nᵢ (meanᵢ − mean)²`, nothing cancels), then
/// `y = x·a + s` per (sample, channel), `a = w/σ`, `s = b − μ·a`
/// ([`crate::ops::group_norm::scale_shift`]). Both ops keep only their inputs for the backward, so a
/// strip's group norm holds no more memory under autodiff than the whole tensor's.
pub fn group_norm(
    parts: Parts,
    (num_groups, eps): (usize, f64),
    weight: Tensor<1>,
    bias: Tensor<1>,
    silu_after: bool,
) -> Parts {
    use crate::ops::group_norm::{group_moments, scale_shift};
    let [n, c, _, w] = parts[0].dims();
    let g = num_groups;
    let per = c / g;
    let counts: Vec<f64> = rows(&parts).iter().map(|&h| (per * h * w) as f64).collect();
    let total: f64 = counts.iter().sum::<f64>().max(1.0);
    let moments: Vec<Tensor<3>> = parts.iter().map(|x| group_moments(x.clone(), g)).collect();
    let sum = |ts: Vec<Tensor<3>>| ts.into_iter().reduce(|a, b| a + b).expect("a strip");
    let mean = sum(moments
        .iter()
        .zip(&counts)
        .map(|(m, &k)| m.clone().narrow(2, 0, 1) * (k / total))
        .collect()); // [n, g, 1]
    let m2 = sum(moments
        .iter()
        .zip(&counts)
        .map(|(m, &k)| {
            let spread = (m.clone().narrow(2, 0, 1) - mean.clone()).square() * k;
            m.clone().narrow(2, 1, 1) + spread
        })
        .collect());
    let inv = (m2 / total + eps).sqrt().recip();
    let per_channel = |t: Tensor<3>| t.expand([n, g, per]).reshape([n, c]);
    let a = per_channel(inv) * weight.reshape([1, c]);
    let s = bias.reshape([1, c]) - per_channel(mean) * a.clone();
    parts
        .into_iter()
        .map(|x| scale_shift(x, a.clone(), s.clone(), silu_after))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resplit_cuts_near_equal_strips() {
        let device = Device::default();
        let x = Tensor::<4>::zeros([1, 2, 10, 3], &device);
        assert_eq!(rows(&resplit(vec![x.clone()], 4)), [4, 3, 3]);
        assert_eq!(rows(&resplit(vec![x.clone()], 10)), [10]);
        assert_eq!(rows(&resplit(vec![x.clone()], 0)), [1; 10]);
        let parts = split_as(x, &[7, 3]);
        assert_eq!(rows(&resplit(parts, 4)), [4, 3, 3]);
    }

    #[test]
    fn max_rows_keeps_a_strip_and_its_halo_within_the_budget() {
        // SD-1.x's decoder at 512²: the upsampler of up_blocks.2 doubles [1, 256, 256, 512]
        // rows; a 128 MiB budget holds 255 padded rows of [256, 514] f32, 2 of them halo rows.
        let up = max_rows([1, 256, 256, 256], 4, 256, 2, MAX_BUFFER_BYTES);
        assert_eq!(up, 126);
        assert!(((2 * up + 2) * 256 * 514 * 4) as u64 <= MAX_BUFFER_BYTES);
        let same = max_rows([1, 256, 512, 512], 4, 256, 1, MAX_BUFFER_BYTES);
        assert_eq!(same, 253);
        // A budget below one row still makes progress, a row at a time.
        assert_eq!(max_rows([1, 256, 512, 512], 4, 256, 1, 1), 1);
    }
}
