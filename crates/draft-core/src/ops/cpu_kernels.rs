//! Vectorised element-wise math for our CPU kernels (group norm + SiLU, attention's softmax,
//! GEGLU): `exp` and `erf` as branch-free polynomials that the compiler turns into SIMD code,
//! compiled once per instruction set and chosen at run time (AVX-512, AVX2 + FMA, else the
//! baseline: SSE2 on x86-64, SIMD128 where a wasm32 build enables it).
//!
//! Flex evaluates `exp` and `erf` through libm one element at a time; on sd1-tiny that was an
//! eighth of a training step (attention's softmax, SiLU, GEGLU's GELU: docs/benchmarks.md).
//!
//! - `exp`: Cephes' `expf` (range reduction by ln 2 in two parts, a degree-7 polynomial on
//!   `[−ln2/2, ln2/2]`, the power of two put into the exponent bits): within 2 ulp of the true
//!   value over `[−87.3, 88.3]`; arguments are clamped to that range (so `exp(−∞)` is 1.2e-38,
//!   not 0: nothing here divides by it), NaN stays NaN.
//! - `erf`: Abramowitz & Stegun 7.1.26 (what PyTorch's vectorised CPU `erf` uses): absolute
//!   error below 1.5e-7 in exact arithmetic, 6e-7 in f32 (its polynomial cancels near 0). GELU
//!   built on it is within 3e-7·|x| of the exact value.

/// `a·b + c`, fused (one rounding, one instruction) in the kernels compiled for CPUs with FMA,
/// a product and a sum in the baseline, where `f32::mul_add` would be a libm call.
pub trait Mad {
    fn mad(a: f32, b: f32, c: f32) -> f32;
}

/// [`Mad`] by the FMA instruction (`f32::mul_add`).
pub struct Fused;

/// [`Mad`] as a product, then a sum.
pub struct Separate;

impl Mad for Fused {
    #[inline(always)]
    fn mad(a: f32, b: f32, c: f32) -> f32 {
        a.mul_add(b, c)
    }
}

impl Mad for Separate {
    #[inline(always)]
    fn mad(a: f32, b: f32, c: f32) -> f32 {
        a * b + c
    }
}

/// `e^x` for `x` in `[−87.3, 88.3]` (clamped outside), within 2 ulp.
#[inline(always)]
pub fn exp<M: Mad>(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer (ties to even).
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.3);
    // n = round(x / ln 2) ∈ [−126, 127], as a float and (the low bits of t) as an integer:
    // no float-to-int conversion, which compilers do not vectorise (Rust's saturates).
    let t = M::mad(x, LOG2E, ROUND);
    let n = t - ROUND;
    // n·LN2_HI is exact (LN2_HI has 12 significant bits), fused or not.
    let r = M::mad(n, -LN2_LO, M::mad(n, -LN2_HI, x));
    let p = 1.987_569_1e-4;
    let p = M::mad(p, r, 1.398_199_9e-3);
    let p = M::mad(p, r, 8.333_452e-3);
    let p = M::mad(p, r, 4.166_579_6e-2);
    let p = M::mad(p, r, 1.666_666_5e-1);
    let p = M::mad(p, r, 0.5);
    let e = M::mad(p, r * r, r) + 1.0;
    let biased = t.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127);
    e * f32::from_bits(biased << 23)
}

/// `erfc(a)` for `a ≥ 0` (Abramowitz & Stegun 7.1.26), absolute error below 6e-7 in f32.
#[inline(always)]
fn erfc_nonneg<M: Mad>(a: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_8,
        -1.453_152_1,
        1.061_405_4,
    ];
    let t = 1.0 / M::mad(P, a, 1.0);
    let poly = M::mad(
        M::mad(M::mad(M::mad(A[4], t, A[3]), t, A[2]), t, A[1]),
        t,
        A[0],
    ) * t;
    poly * exp::<M>(-a * a)
}

/// The error function, absolute error below 6e-7.
#[inline(always)]
pub fn erf<M: Mad>(x: f32) -> f32 {
    (1.0 - erfc_nonneg::<M>(x.abs())).copysign(x)
}

/// `x·sigmoid(x)`.
#[inline(always)]
pub fn silu<M: Mad>(x: f32) -> f32 {
    x / (1.0 + exp::<M>(-x))
}

/// `x·Φ(x)`, GELU with the exact normal CDF (PyTorch's default `approximate='none'`), as
/// `x/2 · erfc(−x/√2)`: for negative `x` erfc is computed directly, without the cancellation
/// of `1 + erf` in the tail.
#[inline(always)]
pub fn gelu<M: Mad>(x: f32) -> f32 {
    let q = erfc_nonneg::<M>(x.abs() * std::f32::consts::FRAC_1_SQRT_2);
    0.5 * x * if x < 0.0 { q } else { 2.0 - q }
}

/// `kernel(i, out_i, xs_i)` over the i-th chunks of `out` (`out_len` values each) and `xs`
/// (`in_len > 0` each): natively spread over rayon's threads in tasks of at least ~16 K input
/// values (smaller ones cost more to hand out than they save), in order on wasm32.
pub(crate) fn for_each_chunk(
    out: &mut [f32],
    out_len: usize,
    xs: &[f32],
    in_len: usize,
    kernel: impl Fn(usize, &mut [f32], &[f32]) + Send + Sync,
) {
    #[cfg(not(target_arch = "wasm32"))]
    {
        use rayon::prelude::*;
        out.par_chunks_mut(out_len)
            .zip(xs.par_chunks(in_len))
            .enumerate()
            .with_min_len((16384 / in_len).max(1))
            .for_each(|(i, (o, x))| kernel(i, o, x));
    }
    #[cfg(target_arch = "wasm32")]
    out.chunks_mut(out_len)
        .zip(xs.chunks(in_len))
        .enumerate()
        .for_each(|(i, (o, x))| kernel(i, o, x));
}

/// Defines `pub fn $name(args)` whose body (generic over `$m:` [`Mad`]) is compiled for
/// AVX-512 and for AVX2 + FMA with [`Fused`] multiply-adds, and for the baseline with
/// [`Separate`] ones, the first the CPU has chosen when called (natively on x86-64; elsewhere
/// the baseline only).
macro_rules! multiversion {
    ($(#[$doc:meta])* pub fn $name:ident<$m:ident>($($arg:ident: $ty:ty),* $(,)?) $body:block) => {
        multiversion! { $(#[$doc])* pub fn $name<$m>($($arg: $ty),*) -> () $body }
    };
    ($(#[$doc:meta])* pub fn $name:ident<$m:ident>($($arg:ident: $ty:ty),* $(,)?) -> $ret:ty $body:block) => {
        $(#[$doc])*
        pub fn $name($($arg: $ty),*) -> $ret {
            // Kernels without multiply-adds (`moments`) leave `$m` unused.
            #[inline(always)]
            #[allow(clippy::extra_unused_type_parameters)]
            fn body<$m: Mad>($($arg: $ty),*) -> $ret $body
            #[cfg(target_arch = "x86_64")]
            {
                // # Safety: to be called only on a CPU with these features.
                #[target_feature(enable = "avx512f,avx512vl,avx512dq,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) -> $ret {
                    body::<Fused>($($arg),*)
                }
                // # Safety: as `avx512`, with these features.
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) -> $ret {
                    body::<Fused>($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("avx512dq")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the CPU has the features avx512 is compiled for (AVX-512F implies AVX2).
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            body::<Separate>($($arg),*)
        }
    };
}

/// Lanes of the partial reductions below (one AVX-512 register of f32).
pub(crate) const LANES: usize = 16;

/// The first `cols` values of `xs` in `LANES`-wide blocks (`f(block, valid lanes)`), so that
/// rows whose length is not a multiple of `LANES` stay vectorised to the end: the last, partial
/// block in place where `xs` extends a whole block past it (its lanes from `valid` on then hold
/// whatever `xs` holds there), else copied into a block padded with `pad`.
#[inline(always)]
fn blocks(xs: &mut [f32], cols: usize, pad: f32, mut f: impl FnMut(&mut [f32; LANES], usize)) {
    let full = cols / LANES * LANES;
    let (head, rest) = xs.split_at_mut(full);
    for c in head.chunks_exact_mut(LANES) {
        f(c.try_into().expect("LANES values"), LANES);
    }
    let valid = cols - full;
    if valid == 0 {
        return;
    }
    if rest.len() >= LANES {
        f(
            (&mut rest[..LANES]).try_into().expect("LANES values"),
            valid,
        );
    } else {
        let tail = &mut rest[..valid];
        let mut block = [pad; LANES];
        block[..valid].copy_from_slice(tail);
        f(&mut block, valid);
        tail.copy_from_slice(&block[..valid]);
    }
}

/// `e^(x − max)` in place over the first `cols` values of `row`, returning their sum (0, with
/// the values zeroed, when all are −∞).
#[inline(always)]
fn exp_sum<M: Mad>(row: &mut [f32], cols: usize) -> f32 {
    let mut lanes = [f32::NEG_INFINITY; LANES];
    blocks(row, cols, f32::NEG_INFINITY, |b, valid| {
        for (i, (a, &v)) in lanes.iter_mut().zip(b.iter()).enumerate() {
            let v = if i < valid { v } else { f32::NEG_INFINITY };
            *a = if v > *a { v } else { *a };
        }
    });
    let m = lanes.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    if m == f32::NEG_INFINITY {
        row[..cols].fill(0.0);
        return 0.0;
    }
    let mut sums = [0f32; LANES];
    blocks(row, cols, f32::NEG_INFINITY, |b, valid| {
        for (i, (a, v)) in sums.iter_mut().zip(b.iter_mut()).enumerate() {
            *v = exp::<M>(*v - m);
            // Lanes past the row (exp clamps −∞ to 1.2e-38) add nothing.
            *a += if i < valid { *v } else { 0.0 };
        }
    });
    sums.iter().sum()
}

/// Softmax of one row, in place (−∞ everywhere: zeros).
#[inline(always)]
fn softmax_row<M: Mad>(row: &mut [f32]) {
    let cols = row.len();
    let sum = exp_sum::<M>(row, cols);
    if sum == 0.0 {
        return;
    }
    let inv = 1.0 / sum;
    blocks(row, cols, 0.0, |b, _| {
        for v in b.iter_mut() {
            *v *= inv;
        }
    });
}

multiversion! {
    /// Softmax of each row of `cols` values of `scores`, in place.
    pub fn softmax_rows<M>(scores: &mut [f32], cols: usize) {
        for row in scores.chunks_exact_mut(cols.max(1)) {
            softmax_row::<M>(row);
        }
    }
}

multiversion! {
    /// The softmax of each row of `scores` but for its division by the row's sum: rows of
    /// `stride` values of which the first `cols` are the row's (the rest are scratch, written
    /// but not read, so a `stride` of `cols` rounded up to [`LANES`] keeps every block whole),
    /// `e^(x − max)` in place and `1 / Σ` into `inv_sums` (0 for a row of −∞). The attention
    /// kernel divides its `P v` rows instead: `e` values per row, not `cols`.
    pub fn exp_rows<M>(scores: &mut [f32], cols: usize, stride: usize, inv_sums: &mut [f32]) {
        for (row, inv) in scores.chunks_exact_mut(stride.max(1)).zip(inv_sums.iter_mut()) {
            let sum = exp_sum::<M>(row, cols);
            *inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
        }
    }
}

/// Lanes of the f64 partial sums of [`moments`] (one AVX-512 register of f64).
const F64_LANES: usize = 8;

/// `Σ f(x)` over `xs` in f64, in `F64_LANES` partial sums so that it vectorises.
#[inline(always)]
fn sum_f64(xs: &[f32], f: impl Fn(f64) -> f64) -> f64 {
    let mut acc = [0f64; F64_LANES];
    let chunks = xs.chunks_exact(F64_LANES);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += f(v as f64);
        }
    }
    acc.iter().sum::<f64>() + tail.iter().map(|&v| f(v as f64)).sum::<f64>()
}

multiversion! {
    /// The mean and the centred sum of squares `Σ (x − mean)²` of `xs`, in f64 (two passes:
    /// a mean far larger than the spread does not cancel).
    pub fn moments<M>(xs: &[f32]) -> (f64, f64) {
        let mean = sum_f64(xs, |v| v) / xs.len().max(1) as f64;
        (mean, sum_f64(xs, |v| (v - mean) * (v - mean)))
    }
}

multiversion! {
    /// `out[i] = silu?((xs[i] − m)·a + shift)`.
    pub fn affine_silu<M>(out: &mut [f32], xs: &[f32], m: f32, a: f32, shift: f32, silu_after: bool) {
        if silu_after {
            for (o, &v) in out.iter_mut().zip(xs) {
                *o = silu::<M>((v - m) * a + shift);
            }
        } else {
            for (o, &v) in out.iter_mut().zip(xs) {
                *o = (v - m) * a + shift;
            }
        }
    }
}

multiversion! {
    /// GEGLU over rows of `h` (`2·inner` values each: the value half, then the gate half):
    /// `out[r][i] = h[r][i] · gelu(h[r][inner + i])`, `inner` values per row of `out`.
    pub fn geglu_rows<M>(out: &mut [f32], h: &[f32], inner: usize) {
        for (o, row) in out.chunks_exact_mut(inner.max(1)).zip(h.chunks_exact(2 * inner.max(1))) {
            let (value, gate) = row.split_at(inner);
            for ((o, &v), &g) in o.iter_mut().zip(value).zip(gate) {
                *o = v * gelu::<M>(g);
            }
        }
    }
}

multiversion! {
    /// GEGLU's backward over rows: `h` as for [`geglu_rows`], `d_out` the output gradient
    /// (`inner` values a row); writes `dh` (`2·inner` a row): `dvalue = d_out·gelu(gate)`,
    /// `dgate = d_out·value·(Φ(gate) + gate·φ(gate))`.
    pub fn geglu_backward_rows<M>(dh: &mut [f32], h: &[f32], d_out: &[f32], inner: usize) {
        let inner = inner.max(1);
        let rows = dh
            .chunks_exact_mut(2 * inner)
            .zip(h.chunks_exact(2 * inner))
            .zip(d_out.chunks_exact(inner));
        for ((dh, h), d) in rows {
            let (d_value, d_gate) = dh.split_at_mut(inner);
            let (value, gate) = h.split_at(inner);
            for i in 0..inner {
                let g = gate[i];
                let q = erfc_nonneg::<M>(g.abs() * std::f32::consts::FRAC_1_SQRT_2);
                let cdf = if g < 0.0 { 0.5 * q } else { 1.0 - 0.5 * q };
                // φ(g) = e^{−g²/2} / √(2π).
                let pdf = 0.398_942_3 * exp::<M>(-0.5 * g * g);
                d_value[i] = d[i] * g * cdf;
                d_gate[i] = d[i] * value[i] * (cdf + g * pdf);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f32) -> u32 {
        (a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_is_within_two_ulp_over_its_range() {
        fn check<M: Mad>() {
            let mut worst = 0;
            let mut x = -87.0f32;
            while x < 88.3 {
                let want = (x as f64).exp() as f32;
                worst = worst.max(ulps(exp::<M>(x), want));
                x += 0.001_7;
            }
            assert!(worst <= 2, "worst {worst} ulp");
            assert_eq!(exp::<M>(0.0), 1.0);
            assert!(exp::<M>(f32::NEG_INFINITY) < 1.3e-38);
        }
        check::<Fused>();
        check::<Separate>();
    }

    /// erfc's error, halved and times x, plus rounding.
    fn gelu_bound(x: f32, g: f64) -> f64 {
        3e-7 * (x as f64).abs() + 2.5e-7 * g.abs() + 1e-12
    }

    #[test]
    fn erf_and_gelu_are_within_their_bounds() {
        fn check<M: Mad>() {
            let mut x = -6.0f32;
            while x < 6.0 {
                let want = libm_erf(x as f64);
                assert!((erf::<M>(x) as f64 - want).abs() < 6e-7, "erf({x})");
                let g = 0.5 * x as f64 * (1.0 + libm_erf(x as f64 / 2f64.sqrt()));
                assert!(
                    (gelu::<M>(x) as f64 - g).abs() <= gelu_bound(x, g),
                    "gelu({x})"
                );
                x += 0.000_97;
            }
        }
        check::<Fused>();
        check::<Separate>();
    }

    /// erf in f64 (W. J. Cody's rational approximations are overkill here: the series and the
    /// continued fraction, each where it converges fast, to ~1e-15).
    fn libm_erf(x: f64) -> f64 {
        let a = x.abs();
        let r = if a < 2.5 {
            // Maclaurin series.
            let (mut term, mut sum, mut n) = (a, a, 0.0);
            while term.abs() > 1e-17 * sum.abs() {
                n += 1.0;
                term *= -a * a / n;
                sum += term / (2.0 * n + 1.0);
            }
            2.0 / std::f64::consts::PI.sqrt() * sum
        } else {
            // erfc by Lentz's continued fraction.
            let mut f = a;
            for k in (1..200).rev() {
                f = a + (k as f64 / 2.0) / f;
            }
            1.0 - (-a * a).exp() / (f * std::f64::consts::PI.sqrt())
        };
        r.copysign(x)
    }

    #[test]
    fn moments_match_a_sequential_f64_sum() {
        let xs: Vec<f32> = (0..1003)
            .map(|i| 1e3 + ((i * 37 % 101) as f32) / 7.0)
            .collect();
        let mean = xs.iter().map(|&v| v as f64).sum::<f64>() / xs.len() as f64;
        let m2: f64 = xs.iter().map(|&v| (v as f64 - mean).powi(2)).sum();
        let (m, s) = moments(&xs);
        assert!((m - mean).abs() <= 1e-12 * mean && (s - m2).abs() <= 1e-10 * m2);
        assert_eq!(moments(&[]), (0.0, 0.0));
    }

    #[test]
    fn kernels_match_the_scalar_formulas() {
        let xs: Vec<f32> = (0..103)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 9.0)
            .collect();
        let mut s = xs.clone();
        softmax_rows(&mut s, 103);
        // The reference subtracts in f32 as the kernel does (that rounding is the input's).
        let m = xs.iter().cloned().fold(f32::MIN, f32::max);
        let z: f64 = xs.iter().map(|&v| ((v - m) as f64).exp()).sum();
        for (&p, &v) in s.iter().zip(&xs) {
            let want = ((v - m) as f64).exp() / z;
            assert!((p as f64 - want).abs() <= 4e-7 * want + 1e-12, "{p} {want}");
        }
        // Rows of 77 in a stride of 80 whose scratch holds NaN and huge values, and a row of
        // −∞: the same exponentials, the scratch ignored.
        let (cols, stride) = (77, 80);
        let mut rows = vec![f32::NAN; 3 * stride];
        for r in 0..2 {
            rows[r * stride..][..cols].copy_from_slice(&xs[r * 20..][..cols]);
            rows[r * stride + cols] = 1e30;
        }
        rows[2 * stride..][..cols].fill(f32::NEG_INFINITY);
        let mut inv = [f32::NAN; 3];
        exp_rows(&mut rows, cols, stride, &mut inv);
        for r in 0..2 {
            let row = &xs[r * 20..][..cols];
            let m = row.iter().cloned().fold(f32::MIN, f32::max);
            let z: f64 = row.iter().map(|&v| ((v - m) as f64).exp()).sum();
            assert!((inv[r] as f64 * z - 1.0).abs() <= 4e-7, "{} {z}", inv[r]);
            for (&e, &v) in rows[r * stride..][..cols].iter().zip(row) {
                let want = ((v - m) as f64).exp();
                assert!((e as f64 - want).abs() <= 3e-7 * want, "{e} {want}");
            }
        }
        assert_eq!(inv[2], 0.0);
        assert!(rows[2 * stride..][..cols].iter().all(|&v| v == 0.0));
        let mut o = vec![0f32; xs.len()];
        affine_silu(&mut o, &xs, 0.5, 1.5, -0.25, true);
        for (&o, &v) in o.iter().zip(&xs) {
            let y = ((v - 0.5) * 1.5 - 0.25) as f64;
            let want = y / (1.0 + (-y).exp());
            assert!((o as f64 - want).abs() <= 4e-7 * (1.0 + want.abs()));
        }
        let h: Vec<f32> = xs[..100].to_vec();
        let mut o = vec![0f32; 50];
        geglu_rows(&mut o, &h, 25);
        for r in 0..2 {
            for i in 0..25 {
                let (v, g) = (h[r * 50 + i] as f64, h[r * 50 + 25 + i] as f64);
                let gelu = 0.5 * g * (1.0 + libm_erf(g / 2f64.sqrt()));
                let bound = v.abs() * gelu_bound(g as f32, gelu) + 1.2e-7 * (v * gelu).abs();
                assert!((o[r * 25 + i] as f64 - v * gelu).abs() <= bound);
            }
        }
    }
}
