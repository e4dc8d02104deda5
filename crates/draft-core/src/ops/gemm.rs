//! The matrix products of the CPU ops: [`gemm_into`] (the `gemm` crate writing straight into an
//! output, no zeroing, no copy) under the convolution ([`crate::ops::conv`]), Linear
//! ([`matmul`], for [`crate::ops::stored_weight`]) and the attention kernel.
//!
//! Flex's matmul zeroes its output and copies it once more to realign it; gemm writes the
//! result in place, reading its operands through their strides (a transposed weight is a view).

pub(crate) use ::gemm::Parallelism;

/// Below this many multiply-adds a product (a convolution's, a [`matmul`]) runs on the calling
/// thread.
#[cfg(not(target_arch = "wasm32"))]
pub(crate) const PARALLEL_WORK: usize = 1 << 23;

/// `x · w` for row-major `[rows, d_in]` x and a `[d_in, d_out]` w addressed by its strides
/// (`w[i][j]` at `w_rs·i + w_cs·j`: a Linear's stored `[d_out, d_in]` weight, transposed as a
/// view), written straight into the result. Above [`PARALLEL_WORK`] multiply-adds, gemm's own
/// threads.
///
/// # Panics
/// If `x` does not hold `rows · d_in` values, a stride is negative, or w's strides address a
/// value past the end of `w`.
pub fn matmul(
    x: &[f32],
    [rows, d_in]: [usize; 2],
    w: &[f32],
    [w_rs, w_cs]: [isize; 2],
    d_out: usize,
) -> Vec<f32> {
    assert_eq!(
        Some(x.len()),
        rows.checked_mul(d_in),
        "matmul: x holds {} values, not rows × d_in = {rows} × {d_in}",
        x.len()
    );
    assert!(
        strided_extent([d_in, d_out], [w_rs, w_cs]).is_some_and(|end| end <= w.len()),
        "matmul: a {d_in}×{d_out} w with strides ({w_rs}, {w_cs}) does not lie in its {} values",
        w.len()
    );
    let len = rows
        .checked_mul(d_out)
        .expect("matmul: rows × d_out overflows");
    if len == 0 || d_in == 0 {
        return vec![0f32; len];
    }
    #[cfg(not(target_arch = "wasm32"))]
    let threads = if rows * d_in * d_out >= PARALLEL_WORK {
        Parallelism::Rayon(0)
    } else {
        Parallelism::None
    };
    #[cfg(target_arch = "wasm32")]
    let threads = Parallelism::None;
    let fill = |dst: SendPtr| {
        // SAFETY: dst holds rows·d_out values (`written`); x holds rows×d_in values, row-major,
        // and w's non-negative strides address d_in×d_out values inside w (both asserted above).
        unsafe {
            gemm_into(
                [rows, d_out, d_in],
                (dst.0, d_out as isize),
                Operand::rows(x.as_ptr(), d_in as isize),
                Operand {
                    ptr: w.as_ptr(),
                    rs: w_rs,
                    cs: w_cs,
                },
                1.0,
                threads,
            )
        }
    };
    // SAFETY: the gemm writes the whole rows×d_out output (`read_dst` false).
    unsafe { written(len, fill) }
}

/// One past the last offset that non-negative `strides` address for an array of `sizes`
/// (0 when it is empty); `None` for a negative stride or an offset that overflows.
pub(crate) fn strided_extent<const D: usize>(
    sizes: [usize; D],
    strides: [isize; D],
) -> Option<usize> {
    if sizes.contains(&0) {
        return Some(0);
    }
    let mut last = 0usize;
    for (size, stride) in sizes.into_iter().zip(strides) {
        let stride = usize::try_from(stride).ok()?;
        last = last.checked_add((size - 1).checked_mul(stride)?)?;
    }
    // gemm takes strides and offsets as isize.
    isize::try_from(last).ok()?;
    last.checked_add(1)
}

/// A vector of `len` values written by `fill` at the pointer it is given, not zeroed first.
///
/// # Safety
/// `fill` writes every one of the `len` values (and nothing past them) before it returns.
pub(crate) unsafe fn written(len: usize, fill: impl FnOnce(SendPtr)) -> Vec<f32> {
    let mut out = Vec::<f32>::with_capacity(len);
    fill(SendPtr(out.as_mut_ptr()));
    // SAFETY: the capacity is len, and the caller guarantees every value was written (if
    // `fill` panics instead, `out` is dropped with length 0).
    unsafe { out.set_len(len) };
    out
}

/// A matrix operand of [`gemm_into`]: element (i, j) at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy)]
pub(crate) struct Operand {
    pub(crate) ptr: *const f32,
    pub(crate) rs: isize,
    pub(crate) cs: isize,
}

impl Operand {
    /// Rows `rs` apart, each contiguous.
    pub(crate) fn rows(ptr: *const f32, rs: isize) -> Self {
        Self { ptr, rs, cs: 1 }
    }
}

/// `dst = scale · lhs · rhs` by gemm for `[m, n, k]` (lhs m×k, rhs k×n), dst's m rows of n
/// contiguous values `dst.1` apart; dst is overwritten, not read.
///
/// # Safety
/// Every element that lhs's and rhs's pointers and strides address for these sizes lies in
/// one live allocation of initialised f32 (each its own), every element dst addresses lies in
/// one writable allocation, and no other thread reads or writes dst's elements, or writes the
/// operands' elements, meanwhile.
pub(crate) unsafe fn gemm_into(
    [m, n, k]: [usize; 3],
    dst: (*mut f32, isize),
    lhs: Operand,
    rhs: Operand,
    scale: f32,
    threads: Parallelism,
) {
    // SAFETY: the caller's guarantees are gemm's requirements (with `read_dst` false, dst is
    // only written, and alpha = 0 is never read).
    unsafe {
        ::gemm::gemm(
            m, n, k, dst.0, 1, dst.1, false, lhs.ptr, lhs.cs, lhs.rs, rhs.ptr, rhs.cs, rhs.rs, 0.0,
            scale, false, false, false, threads,
        )
    }
}

/// An output buffer's pointer, shared by tasks that write disjoint parts of it.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
// SAFETY: a SendPtr is only dereferenced by tasks that write disjoint ranges of the buffer
// (`conv2d`'s and the attention kernel's tasks), which outlives them (`written`).
unsafe impl Send for SendPtr {}
// SAFETY: as for `Send`: shared between tasks only to write disjoint ranges.
unsafe impl Sync for SendPtr {}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against a plain triple loop, with the weight read transposed through its strides.
    #[test]
    fn matmul_matches_a_loop_through_strides() {
        let (rows, d_in, d_out) = (3, 5, 4);
        let x: Vec<f32> = (0..rows * d_in).map(|i| (i as f32 * 0.37).sin()).collect();
        // The stored [d_out, d_in] weight, read as its [d_in, d_out] transpose.
        let w: Vec<f32> = (0..d_out * d_in).map(|i| (i as f32 * 0.71).cos()).collect();
        let got = matmul(&x, [rows, d_in], &w, [1, d_in as isize], d_out);
        for r in 0..rows {
            for j in 0..d_out {
                let want: f32 = (0..d_in).map(|i| x[r * d_in + i] * w[j * d_in + i]).sum();
                assert!((got[r * d_out + j] - want).abs() <= 1e-5, "{r} {j}");
            }
        }
    }

    #[test]
    fn strided_extent_is_one_past_the_last_value() {
        assert_eq!(strided_extent([3, 4], [4, 1]), Some(12));
        assert_eq!(strided_extent([3, 4], [1, 3]), Some(12));
        assert_eq!(strided_extent([3, 4], [0, 1]), Some(4));
        assert_eq!(strided_extent([0, 4], [-1, 1]), Some(0));
        assert_eq!(strided_extent([3, 4], [-4, 1]), None);
        assert_eq!(strided_extent([3, 4], [isize::MAX, 1]), None);
    }

    #[test]
    #[should_panic(expected = "matmul: x holds 5 values")]
    fn matmul_refuses_a_short_x() {
        matmul(&[0.0; 5], [2, 3], &[0.0; 6], [2, 1], 2);
    }

    #[test]
    #[should_panic(expected = "does not lie in its 5 values")]
    fn matmul_refuses_a_short_w() {
        matmul(&[0.0; 6], [2, 3], &[0.0; 5], [2, 1], 2);
    }

    #[test]
    #[should_panic(expected = "does not lie in its")]
    fn matmul_refuses_strides_past_w() {
        // A [3, 2] view with strides (1, 3) reaches offset 2 + 3 = 5 of 5 values.
        matmul(&[0.0; 6], [2, 3], &[0.0; 5], [1, 3], 2);
    }

    #[test]
    #[should_panic(expected = "does not lie in its")]
    fn matmul_refuses_negative_strides() {
        matmul(&[0.0; 6], [2, 3], &[0.0; 6], [-2, 1], 2);
    }
}
