//! 2-d convolution on the CPU backend (flex), f32, one group, no dilation: the forward of every
//! UNet and VAE convolution in sampling and training.
//!
//! Flex's own convolution (Burn 0.22.1) re-lays out the whole weight (`[O, C, kh, kw]` →
//! `[O, kh, kw, C]`) and the whole input (NCHW → NHWC) element by element on every call, then
//! gathers an im2col tile and multiplies into a scratch buffer that it scatters into the
//! output: on sd1-tiny those copies took more time than the matrix products (docs/benchmarks.md).
//! Here nothing is re-laid out: the weight in its stored layout is already the `[O, C·kh·kw]`
//! matrix, the im2col rows (one per input channel and kernel tap) are shifted copies of input
//! rows, and one gemm per task writes the NCHW output in place. A 1×1 convolution with stride 1
//! and no padding multiplies the input itself, with no copy at all.
//!
//! Tasks are (sample, block of output rows), the block sized so that its im2col buffer stays
//! within [`COL_FLOATS`]: natively spread over rayon's threads when there are enough of them,
//! else one task at a time with gemm's own threads.

use crate::ops::gemm::{Operand, Parallelism, SendPtr, gemm_into, written};
use burn::tensor::ops::ConvOptions;

/// The most im2col values one task holds (4 MiB of f32).
const COL_FLOATS: usize = 1 << 20;

std::thread_local! {
    /// Each thread's im2col buffer, reused from call to call.
    static COLS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Whether [`conv2d`] computes a convolution with these options (else the caller falls back).
pub fn supports(options: &ConvOptions<2>) -> bool {
    options.groups == 1 && options.dilation == [1, 1]
}

/// `conv2d(x, w)` (no bias) for contiguous f32 NCHW `x` (`[n, c, h, w]`) and `[o, c, kh, kw]`
/// `w`, with `options` as [`supports`] requires; returns the `[n, o, oh, ow]` values.
///
/// # Panics
/// If `x` or `w` does not hold as many values as its shape says, or [`supports`] refuses
/// `options`.
pub fn conv2d(
    x: &[f32],
    [n, c, h, wd]: [usize; 4],
    w: &[f32],
    [o, kh, kw]: [usize; 3],
    options: &ConvOptions<2>,
) -> (Vec<f32>, [usize; 4]) {
    assert_len("conv2d: x", x, [n, c, h, wd]);
    assert_len("conv2d: w", w, [o, c, kh, kw]);
    assert!(
        supports(options),
        "conv2d: groups {} and dilation {:?} are not supported",
        options.groups,
        options.dilation
    );
    // Padding (before, after) of each spatial dimension.
    let ([sh, sw], [(ph, ph_end), (pw, pw_end)]) = (options.stride, options.padding);
    let (h_padded, w_padded) = (h + ph + ph_end, wd + pw + pw_end);
    let oh = h_padded.saturating_sub(kh) / sh + 1;
    let ow = w_padded.saturating_sub(kw) / sw + 1;
    let (hw, k) = (oh * ow, c * kh * kw);
    if n * o * hw == 0 || k == 0 || h_padded < kh || w_padded < kw {
        return (vec![0f32; n * o * hw], [n, o, oh, ow]);
    }
    // A 1×1 convolution without stride or padding multiplies x itself.
    let no_padding = ph + ph_end + pw + pw_end == 0;
    let pointwise = kh == 1 && kw == 1 && sh == 1 && sw == 1 && no_padding;
    let rows = if pointwise {
        oh
    } else {
        (COL_FLOATS / (k * ow)).clamp(1, oh)
    };
    let geometry = Geometry {
        c,
        h,
        wd,
        kh,
        kw,
        sh,
        sw,
        ph,
        pw,
        ow,
    };
    let fill = |out_ptr: SendPtr| {
        // Output rows r0..r1 of sample b; `threads`: gemm's own parallelism.
        let task = |b: usize, r0: usize, threads: Parallelism| {
            let r1 = (r0 + rows).min(oh);
            let len = (r1 - r0) * ow;
            let x_b = &x[b * c * h * wd..][..c * h * wd];
            let run = |rhs: *const f32, rhs_rs: usize| {
                let dst = out_ptr;
                // SAFETY: the tasks write disjoint blocks (sample b, columns r0·ow.. of each of the
                // o output rows of length hw), lhs is the o×k weight, rhs a k×len matrix with row
                // stride rhs_rs inside x or the im2col buffer.
                unsafe {
                    gemm_into(
                        [o, len, k],
                        (dst.0.add(b * o * hw + r0 * ow), hw as isize),
                        Operand::rows(w.as_ptr(), k as isize),
                        Operand::rows(rhs, rhs_rs as isize),
                        1.0,
                        threads,
                    );
                }
            };
            if pointwise {
                run(x_b[r0 * ow..].as_ptr(), hw);
            } else {
                COLS.with_borrow_mut(|cols| {
                    cols.resize(k * rows * ow, 0.0);
                    let cols = &mut cols[..k * len];
                    geometry.im2col(cols, x_b, r0, r1);
                    run(cols.as_ptr(), len);
                });
            }
        };
        let blocks = oh.div_ceil(rows);
        let serial = || {
            for t in 0..n * blocks {
                task(t / blocks, t % blocks * rows, Parallelism::None);
            }
        };
        #[cfg(not(target_arch = "wasm32"))]
        if n * o * k * hw < crate::ops::gemm::PARALLEL_WORK {
            serial();
        } else if n * blocks >= rayon::current_num_threads() {
            use rayon::prelude::*;
            (0..n * blocks)
                .into_par_iter()
                .for_each(|t| task(t / blocks, t % blocks * rows, Parallelism::None));
        } else {
            for t in 0..n * blocks {
                task(t / blocks, t % blocks * rows, Parallelism::Rayon(0));
            }
        }
        #[cfg(target_arch = "wasm32")]
        serial();
    };
    // Not zeroed first: the tasks' gemms write every output value (`read_dst` false).
    // SAFETY: `fill`'s tasks cover every (sample, row block), so every value is written.
    let out = unsafe { written(n * o * hw, fill) };
    (out, [n, o, oh, ow])
}

/// Whether [`x_gradient`] computes the input gradient of a convolution with these options, a
/// `[o, c, kh, kw]` kernel and an `[n, c, h, w]` input: stride 1, one group, no dilation, and
/// padding no wider than the kernel less one on each side.
pub fn x_gradient_supported(
    options: &ConvOptions<2>,
    [_, _, kh, kw]: [usize; 4],
    [_, _, h, wd]: [usize; 4],
) -> bool {
    let [(ph, ph_end), (pw, pw_end)] = options.padding;
    supports(options)
        && options.stride == [1, 1]
        && ph.max(ph_end) < kh
        && pw.max(pw_end) < kw
        && h + ph + ph_end >= kh
        && wd + pw + pw_end >= kw
}

/// The gradient of a stride-1 `conv2d(x, w)` with respect to its `[n, c, h, wd]` input, for
/// the `[n, o, oh, ow]` output gradient `dy`: itself a stride-1 convolution of `dy` with the
/// kernel transposed (`[c, o, kh, kw]`) and flipped, padded by `k − 1 − p` on each side, so it
/// runs on [`conv2d`]'s kernel (Burn's transposed convolution re-lays out both operands on
/// every call, as its forward does).
///
/// # Panics
/// If `dy` or `w` does not hold as many values as its shape says, the shapes disagree, or
/// [`x_gradient_supported`] refuses them.
pub fn x_gradient(
    dy: &[f32],
    [n, o, oh, ow]: [usize; 4],
    w: &[f32],
    w_shape: [usize; 4],
    x_shape: [usize; 4],
    options: &ConvOptions<2>,
) -> Vec<f32> {
    let ([wo, c, kh, kw], [xn, xc, h, wd]) = (w_shape, x_shape);
    assert_len("x_gradient: dy", dy, [n, o, oh, ow]);
    assert_len("x_gradient: w", w, w_shape);
    let [(ph, ph_end), (pw, pw_end)] = options.padding;
    assert!(
        x_gradient_supported(options, w_shape, x_shape)
            && (wo, xn, xc) == (o, n, c)
            && (oh + kh, ow + kw) == (h + ph + ph_end + 1, wd + pw + pw_end + 1),
        "x_gradient: a {x_shape:?} input, a {w_shape:?} kernel, a {:?} output gradient, \
         padding {:?} and stride {:?} are not a supported convolution",
        [n, o, oh, ow],
        options.padding,
        options.stride
    );
    let taps = kh * kw;
    let mut flipped = vec![0f32; c * o * taps];
    for (oi, w_o) in w.chunks_exact(c * taps).enumerate() {
        for (ci, w_oc) in w_o.chunks_exact(taps).enumerate() {
            let dst = &mut flipped[(ci * o + oi) * taps..][..taps];
            for (d, s) in dst.iter_mut().zip(w_oc.iter().rev()) {
                *d = *s;
            }
        }
    }
    let mut transposed = ConvOptions::new([1, 1], [0, 0], [1, 1], 1);
    transposed.padding = [
        (kh - 1 - ph, kh - 1 - ph_end),
        (kw - 1 - pw, kw - 1 - pw_end),
    ];
    let (dx, shape) = conv2d(dy, [n, o, oh, ow], &flipped, [c, kh, kw], &transposed);
    debug_assert_eq!(shape, x_shape);
    dx
}

/// Panics unless `values` holds exactly as many values as `shape` says (`what` names them).
fn assert_len(what: &str, values: &[f32], shape: [usize; 4]) {
    let want = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    assert_eq!(
        Some(values.len()),
        want,
        "{what} holds {} values, not the {shape:?} its shape says",
        values.len()
    );
}

/// One sample's input size, the kernel, stride, padding before each dimension and the output
/// width.
#[derive(Clone, Copy)]
struct Geometry {
    c: usize,
    h: usize,
    wd: usize,
    kh: usize,
    kw: usize,
    sh: usize,
    sw: usize,
    ph: usize,
    pw: usize,
    ow: usize,
}

impl Geometry {
    /// The im2col matrix of output rows `r0..r1` of one sample `x` (`[c, h, wd]`): row
    /// `(ch·kh + i)·kw + j` holds, for each output position, the input value under kernel tap
    /// (i, j) of channel ch (0 in the padding).
    fn im2col(&self, cols: &mut [f32], x: &[f32], r0: usize, r1: usize) {
        let Self {
            c,
            h,
            wd,
            kh,
            kw,
            sh,
            sw,
            ph,
            pw,
            ow,
        } = *self;
        let len = (r1 - r0) * ow;
        for ch in 0..c {
            let plane = &x[ch * h * wd..][..h * wd];
            for i in 0..kh {
                for j in 0..kw {
                    let row = &mut cols[((ch * kh + i) * kw + j) * len..][..len];
                    if sw == 1 && ow == wd {
                        self.shifted_plane(row, plane, i, j, r0, r1);
                        continue;
                    }
                    // Output columns whose input column `q·sw + j − pw` lies in 0..wd.
                    let q0 = pw.saturating_sub(j).div_ceil(sw).min(ow);
                    let q1 = if wd + pw > j {
                        ((wd + pw - j - 1) / sw + 1).min(ow)
                    } else {
                        0
                    }
                    .max(q0);
                    for (r, dst) in (r0..r1).zip(row.chunks_exact_mut(ow)) {
                        let y = (r * sh + i).wrapping_sub(ph);
                        if y >= h {
                            dst.fill(0.0);
                            continue;
                        }
                        let src = &plane[y * wd..][..wd];
                        dst[..q0].fill(0.0);
                        dst[q1..].fill(0.0);
                        let first = q0 * sw + j - pw;
                        if sw == 1 {
                            dst[q0..q1].copy_from_slice(&src[first..first + (q1 - q0)]);
                        } else {
                            for (d, s) in
                                dst[q0..q1].iter_mut().zip(src[first..].iter().step_by(sw))
                            {
                                *d = *s;
                            }
                        }
                    }
                }
            }
        }
    }

    /// One im2col row when the output is as wide as the input (stride 1 across, "same"
    /// padding): output position p of rows `r0..r1` reads input position
    /// `p + (r0 + i − ph)·wd + (j − pw)` of the plane, so the row is one contiguous copy whose
    /// columns that wrapped around an input row's edge are then zeroed.
    fn shifted_plane(
        &self,
        row: &mut [f32],
        plane: &[f32],
        i: usize,
        j: usize,
        r0: usize,
        r1: usize,
    ) {
        let Self {
            h, wd, ph, pw, ow, ..
        } = *self;
        // Output rows whose input row r + i − ph lies in 0..h.
        let r_lo = r0.max(ph.saturating_sub(i)).min(r1);
        let r_hi = r1.min((h + ph).saturating_sub(i)).max(r_lo);
        row[..(r_lo - r0) * ow].fill(0.0);
        row[(r_hi - r0) * ow..].fill(0.0);
        if r_hi == r_lo {
            return;
        }
        let dst = &mut row[(r_lo - r0) * ow..(r_hi - r0) * ow];
        let shift = j as isize - pw as isize;
        let start = ((r_lo + i - ph) * wd) as isize + shift;
        // The part of dst whose source lies inside the plane (the rest is wrapped columns).
        let lo = (-start).max(0) as usize;
        let hi = (dst.len() as isize)
            .min((h * wd) as isize - start)
            .max(lo as isize) as usize;
        let from = (start + lo as isize) as usize;
        dst[lo..hi].copy_from_slice(&plane[from..from + (hi - lo)]);
        // Column by column down the rows (a `fill` per row is a memset call per 1–2 values).
        let edge = shift.unsigned_abs().min(ow);
        let columns = if shift < 0 { 0..edge } else { ow - edge..ow };
        for col in columns {
            dst[col..].iter_mut().step_by(ow).for_each(|v| *v = 0.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::prelude::*;

    /// Against flex's own convolution: the UNet's and VAE's kinds (3×3 padded, strided,
    /// unpadded, 1×1, a 4-channel input) at sizes that split into several row blocks.
    #[test]
    fn matches_flex_conv2d() {
        let device = Device::flex();
        let cases = [
            // n, c, h, w, o, kh, kw, stride, padding (begin, end)
            (2, 4, 16, 16, 32, 3, 3, 1, (1, 1)),
            (2, 32, 9, 7, 16, 3, 3, 2, (1, 1)),
            (1, 8, 9, 9, 8, 3, 3, 2, (0, 0)),
            (1, 8, 8, 10, 8, 3, 3, 2, (0, 1)),
            (2, 16, 5, 6, 24, 1, 1, 1, (0, 0)),
            (1, 3, 4, 5, 2, 1, 1, 2, (1, 1)),
            (1, 600, 40, 12, 3, 3, 3, 1, (1, 1)),
            (2, 5, 6, 7, 4, 5, 5, 1, (2, 2)),
            (1, 5, 6, 7, 4, 3, 3, 1, (0, 2)),
            (1, 5, 6, 7, 4, 3, 3, 1, (2, 0)),
        ];
        for (n, c, h, w, o, kh, kw, s, p) in cases {
            let x = crate::noise::NoiseRng::new(1).randn([n, c, h, w], &device);
            let wt = crate::noise::NoiseRng::new(2).randn([o, c, kh, kw], &device);
            let mut options = ConvOptions::new([s, s], [0, 0], [1, 1], 1);
            options.padding = [p, p];
            let want = burn::tensor::module::conv2d(x.clone(), wt.clone(), None, options.clone());
            let (xs, ws) = (x.into_data(), wt.into_data());
            let (got, shape) = conv2d(
                xs.as_slice().unwrap(),
                [n, c, h, w],
                ws.as_slice().unwrap(),
                [o, kh, kw],
                &options,
            );
            assert_eq!(
                shape.to_vec(),
                want.dims().to_vec(),
                "{n} {c} {h} {w} {o} {kh} {s} {p:?}"
            );
            let want = want.into_data().try_to_vec::<f32>().unwrap();
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let err = got
                .iter()
                .zip(&want)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                err <= 1e-5 * scale,
                "{n} {c} {h} {w} {o} {kh} {s} {p:?}: {err} of {scale}"
            );
        }
    }

    /// The input gradient against Burn's `conv2d_x_backward` on flex, for stride-1 cases.
    #[test]
    fn x_gradient_matches_burns() {
        let device = Device::flex();
        let cases = [
            // n, c, h, w, o, k, padding (begin, end)
            (2, 4, 16, 16, 32, 3, (1, 1)),
            (1, 5, 6, 7, 4, 3, (0, 2)),
            (1, 5, 6, 7, 4, 3, (2, 0)),
            (2, 16, 5, 6, 24, 1, (0, 0)),
            (1, 3, 8, 9, 6, 5, (2, 1)),
            (1, 600, 40, 12, 3, 3, (1, 1)),
        ];
        for (n, c, h, w, o, k, p) in cases {
            let mut options = ConvOptions::new([1, 1], [0, 0], [1, 1], 1);
            options.padding = [p, p];
            let (oh, ow) = (h + p.0 + p.1 + 1 - k, w + p.0 + p.1 + 1 - k);
            assert!(x_gradient_supported(&options, [o, c, k, k], [n, c, h, w]));
            let wt = crate::noise::NoiseRng::new(3).randn([o, c, k, k], &device);
            let dy = crate::noise::NoiseRng::new(4).randn([n, o, oh, ow], &device);
            let want =
                Tensor::<4>::from_dispatch(crate::ops::stored_weight::conv_x_backward_burn::<
                    burn::backend::Dispatch,
                >(
                    [n, c, h, w].into(),
                    wt.clone().into_dispatch(),
                    dy.clone().into_dispatch(),
                    options.clone(),
                ));
            let (ws, dys) = (wt.into_data(), dy.into_data());
            let got = x_gradient(
                dys.as_slice().unwrap(),
                [n, o, oh, ow],
                ws.as_slice().unwrap(),
                [o, c, k, k],
                [n, c, h, w],
                &options,
            );
            let want = want.into_data().try_to_vec::<f32>().unwrap();
            assert_eq!(got.len(), want.len());
            let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let err = got
                .iter()
                .zip(&want)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(
                err <= 1e-5 * scale,
                "{n} {c} {h} {w} {o} {k} {p:?}: {err} of {scale}"
            );
        }
    }

    fn same_3x3() -> ConvOptions<2> {
        ConvOptions::new([1, 1], [1, 1], [1, 1], 1)
    }

    /// A slice shorter than its shape says is refused before any pointer into it is formed.
    #[test]
    #[should_panic(expected = "conv2d: x holds 17 values, not the [1, 2, 3, 3]")]
    fn conv2d_refuses_a_short_input() {
        conv2d(&[0.0; 17], [1, 2, 3, 3], &[0.0; 36], [2, 3, 3], &same_3x3());
    }

    #[test]
    #[should_panic(expected = "conv2d: w holds 35 values, not the [2, 2, 3, 3]")]
    fn conv2d_refuses_a_short_kernel() {
        conv2d(&[0.0; 18], [1, 2, 3, 3], &[0.0; 35], [2, 3, 3], &same_3x3());
    }

    #[test]
    #[should_panic(expected = "not supported")]
    fn conv2d_refuses_groups() {
        let mut options = same_3x3();
        options.groups = 2;
        conv2d(&[0.0; 18], [1, 2, 3, 3], &[0.0; 36], [2, 3, 3], &options);
    }

    #[test]
    #[should_panic(expected = "x_gradient: dy holds 17 values, not the [1, 2, 3, 3]")]
    fn x_gradient_refuses_a_short_output_gradient() {
        let shape = [1, 2, 3, 3];
        x_gradient(
            &[0.0; 17],
            shape,
            &[0.0; 36],
            [2, 2, 3, 3],
            shape,
            &same_3x3(),
        );
    }

    #[test]
    #[should_panic(expected = "x_gradient: w holds 35 values")]
    fn x_gradient_refuses_a_short_kernel() {
        let shape = [1, 2, 3, 3];
        x_gradient(
            &[0.0; 18],
            shape,
            &[0.0; 35],
            [2, 2, 3, 3],
            shape,
            &same_3x3(),
        );
    }

    #[test]
    #[should_panic(expected = "are not a supported convolution")]
    fn x_gradient_refuses_an_output_gradient_of_another_size() {
        // A 3×3 "same" convolution of a 3×3 input has a 3×3 output, not 2×4.
        let dy = [1, 2, 2, 4];
        x_gradient(
            &[0.0; 16],
            dy,
            &[0.0; 36],
            [2, 2, 3, 3],
            [1, 2, 3, 3],
            &same_3x3(),
        );
    }
}
