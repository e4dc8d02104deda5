//! Attention whose memory is O(N) in training as well as in sampling.
//!
//! `softmax(q kᵀ · scale) v` over `[B, heads, N, d]` tensors, computed a block of query rows at
//! a time so that no score matrix larger than [`SCORE_BLOCK_BYTES`] exists at once — at SD-1.x's
//! 64×64 latents a whole `[2, 8, 4096, 4096]` score matrix is 1 GiB, over WebGPU's buffer limits.
//!
//! Under autodiff the op is one node of our own ([`AttentionBackend`], a Burn backend extension
//! with a handwritten `Autodiff` implementation): its backward keeps only q, k, v and the output
//! and recomputes the scores block by block (the flash-attention backward with the softmax
//! recomputed rather than rebuilt from a saved log-sum-exp):
//!
//! ```text
//! P  = softmax(q_b kᵀ · scale)      dV += Pᵀ dO_b
//! dP = dO_b vᵀ                      dS  = P ∘ (dP − rowsum(P ∘ dP))
//! dq_b = dS k · scale               dK += dSᵀ q_b · scale
//! ```
//!
//! Burn's own autodiff attention keeps every N×N score matrix for the backward pass. The
//! backward's blocks are composed of Burn's primitive ops, so the one definition runs on every
//! backend (the CPU's flex, CubeCL with fusion on wgpu, the browser's WebGPU). The forward —
//! the whole of a pass without gradient (sampling, evaluation, `draft sample`) — is the
//! backend's fused attention kernel: flex's tiled attention on the CPU, Burn's flash kernels
//! (autotuned) on CubeCL, per block of query rows there; the blocked primitives
//! ([`attention_blocked`] with a non-default scale on CubeCL) otherwise.

use crate::ops::extension::{Differentiable, all_kept, record};
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::tensor::FloatTensor;
use burn::backend::wgpu::CubeBackend;
use burn::backend::{Autodiff, Backend, Dispatch, Flex, TensorMetadata, backend_extension};
use burn::prelude::*;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{DType, Slice};

/// The largest block of attention scores (`[B, heads, rows, N]` f32) one step materialises:
/// a quarter of WebGPU's default `maxStorageBufferBindingSize`, so that the block and the
/// softmax's temporaries of the same size fit any adapter.
pub const SCORE_BLOCK_BYTES: usize = 32 << 20;

/// Query rows per block for `batch_heads` (batch × heads) and `keys` key positions: as many as
/// keep one block's scores within [`SCORE_BLOCK_BYTES`], at least one.
pub fn block_rows(batch_heads: usize, keys: usize) -> usize {
    (SCORE_BLOCK_BYTES / (batch_heads * keys * 4).max(1)).max(1)
}

/// `softmax(q kᵀ / √d) v` for `[B, heads, N, d]` q and `[B, heads, M, d]` k, v, in blocks of
/// [`block_rows`] query rows, with the O(N) backward of this module's docs.
pub fn attention(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>) -> Tensor<4> {
    let [b, h, _, d] = q.dims();
    let keys = k.dims()[2];
    attention_blocked(q, k, v, default_scale(d), block_rows(b * h, keys))
}

/// [`attention`] with an explicit `scale` and `block` (query rows per block).
pub fn attention_blocked(
    q: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    scale: f32,
    block: usize,
) -> Tensor<4> {
    Tensor::from_dispatch(<Dispatch as AttentionBackend>::blocked_attention(
        q.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        scale,
        block.max(1),
    ))
}

/// The attention op, routed to each backend by Burn's backend-extension dispatch. The forward
/// is each backend's fused attention kernel where it has one that never materialises the whole
/// score matrix; `Autodiff` has its own backward below (the same for every backend).
#[backend_extension(Flex, Cube, Fusion, Autodiff)]
pub trait AttentionBackend: Backend {
    /// `softmax(q kᵀ · scale) v`, `block` query rows at a time.
    #[fusion(dtype = q, shape = {
        let mut shape = q.clone();
        shape[3] = v[3];
        shape
    })]
    fn blocked_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: f32,
        block: usize,
    ) -> FloatTensor<Self> {
        forward::<Self>(q, k, v, scale, block)
    }

    /// Softmax over the last of 4 dimensions (the probabilities the backward recomputes).
    #[fusion(default)]
    fn softmax_last(scores: FloatTensor<Self>) -> FloatTensor<Self> {
        softmax_dim3::<Self>(scores)
    }
}

/// The CPU backend: in f32 our kernel ([`flex_attention`]); other dtypes flex's fused attention
/// (threaded over batch × heads, one head's `[N, M]` scores when they fit 1 MB, else tiles of
/// 64 keys with an online softmax). Both are O(N) memory at any size, so `block` does not apply.
impl AttentionBackend for Flex {
    fn blocked_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: f32,
        _block: usize,
    ) -> FloatTensor<Self> {
        if [&q, &k, &v].iter().all(|t| t.dtype() == DType::F32) {
            return flex_attention(q, k, v, scale);
        }
        let options = AttentionModuleOptions {
            scale: Some(scale.into()),
            softcap: None,
            is_causal: false,
        };
        fused::<Self>(q, k, v, options)
    }

    /// In f32, [`crate::ops::cpu_kernels::softmax_rows`] (flex's softmax evaluates `exp` one element
    /// at a time).
    fn softmax_last(scores: FloatTensor<Self>) -> FloatTensor<Self> {
        use burn::backend::flex::FlexTensor;
        use burn::tensor::TensorData;
        if scores.dtype() != DType::F32 {
            return softmax_dim3::<Self>(scores);
        }
        let shape = scores.layout().shape().clone();
        let cols = shape[shape.num_dims() - 1];
        let mut values: Vec<f32> = scores.into_data().try_into_vec().expect("f32 values");
        crate::ops::cpu_kernels::softmax_rows(&mut values, cols);
        FlexTensor::from_data(TensorData::new(values, shape))
    }
}

/// Scores one task of [`flex_attention`] holds (128 KiB of f32, within a core's L2).
const CPU_SCORE_FLOATS: usize = 32 * 1024;

/// Below this much work (`B·H·N·M·(d + e)` multiply-adds) [`flex_attention`] stays on the
/// calling thread: handing tasks out costs more than it saves.
#[cfg(not(target_arch = "wasm32"))]
const CPU_PARALLEL_WORK: usize = 256 * 1024;

std::thread_local! {
    /// Each thread's scores for [`flex_attention`]'s tasks, reused from call to call.
    static SCORES: std::cell::RefCell<(Vec<f32>, Vec<f32>)> =
        const { std::cell::RefCell::new((Vec::new(), Vec::new())) };
}

/// `softmax(q kᵀ · scale) v` on the CPU for f32 `[B, H, N, d]` q, `[B, H, M, d]` k and
/// `[B, H, M, e]` v: per task (a head's block of query rows, at most [`CPU_SCORE_FLOATS`]
/// scores) `scale · q kᵀ` by gemm, each row's softmax with the vectorised `exp` of
/// [`crate::ops::cpu_kernels`], then `P v` by gemm; the tasks spread over rayon's threads (natively).
/// Flex's own kernel evaluates the softmax one element at a time through libm's `expf`, which
/// at sd1-tiny's 8-wide heads cost more than both matrix products (docs/benchmarks.md).
///
/// q, k and v are read through their strides (the heads split off a `[B, N, H·d]` projection
/// are not copied first), and the output is laid out `[B, N, H, e]` in memory, returned as the
/// `[B, H, N, e]` view of it, so that merging the heads back is a reshape without a copy.
fn flex_attention(
    q: burn::backend::flex::FlexTensor,
    k: burn::backend::flex::FlexTensor,
    v: burn::backend::flex::FlexTensor,
    scale: f32,
) -> burn::backend::flex::FlexTensor {
    use crate::ops::gemm::{Operand, Parallelism, SendPtr, gemm_into, written};
    use burn::backend::flex::FlexTensor;
    use burn::tensor::TensorData;
    // (storage, offset, [B, H, N, d] sizes, their strides) of a tensor with positive strides.
    let strided = |t: FlexTensor| {
        if t.layout().has_positive_strides() {
            t
        } else {
            t.to_contiguous()
        }
    };
    let (q, k, v) = (strided(q), strided(k), strided(v));
    let view = |t: &FlexTensor| -> (usize, [usize; 4], [isize; 4]) {
        let (l, s) = (t.layout(), t.layout().strides());
        let shape = l.shape();
        (
            l.start_offset(),
            [shape[0], shape[1], shape[2], shape[3]],
            [s[0], s[1], s[2], s[3]],
        )
    };
    for t in [&q, &k, &v] {
        assert_eq!(
            t.layout().shape().num_dims(),
            4,
            "attention: q, k, v must be 4-d"
        );
    }
    let ((qo, [b, h, n, d], qs), (ko, [kb, kh, m, kd], ks), (vo, [vb, vh, vm, e], vs)) =
        (view(&q), view(&k), view(&v));
    // The gemms below read k and v with q's batch, heads and d and k's m: other sizes would
    // address past their storage.
    assert!(
        [kb, kh, kd] == [b, h, d] && [vb, vh, vm] == [b, h, m],
        "attention: q {:?}, k {:?} and v {:?} do not fit",
        [b, h, n, d],
        [kb, kh, m, kd],
        [vb, vh, vm, e]
    );
    let (qd, kd, vd): (&[f32], &[f32], &[f32]) = (q.storage(), k.storage(), v.storage());
    let physical = [b, n, h, e];
    let heads_view = |t: FlexTensor| t.permute(&[0, 2, 1, 3]);
    if b * h * n * e == 0 || m == 0 {
        return heads_view(FlexTensor::from_data(TensorData::new(
            vec![0f32; b * h * n * e],
            physical,
        )));
    }
    for (t, (offset, sizes, strides)) in
        [qd, kd, vd].into_iter().zip([view(&q), view(&k), view(&v)])
    {
        let end =
            crate::ops::gemm::strided_extent(sizes, strides).and_then(|e| e.checked_add(offset));
        assert!(
            end.is_some_and(|end| end <= t.len()),
            "attention: a view past its storage"
        );
    }
    // Score rows padded to whole vector blocks (crate::ops::cpu_kernels::exp_rows).
    let stride = m.next_multiple_of(crate::ops::cpu_kernels::LANES);
    let rows = (CPU_SCORE_FLOATS / stride).clamp(1, n);
    let blocks = n.div_ceil(rows);
    // Query rows `blk·rows..` of head `bh` (= batch·H + head).
    let task = |dst: SendPtr, bh: usize, blk: usize| {
        let (bi, hi) = ((bh / h) as isize, (bh % h) as isize);
        let r0 = blk * rows;
        let r = rows.min(n - r0);
        let at = |offset: usize, s: [isize; 4], row: usize| {
            (offset as isize + bi * s[0] + hi * s[1] + row as isize * s[2]) as usize
        };
        SCORES.with_borrow_mut(|(scores, inv_sums)| {
            scores.resize(rows * stride, 0.0);
            inv_sums.resize(rows, 0.0);
            let (scores, inv_sums) = (&mut scores[..r * stride], &mut inv_sums[..r]);
            // SAFETY: the pointers and strides below are those of q, k and v's views (asserted
            // above to lie in their storage, with k's and v's sizes fitting q's), of the r×m
            // scores (r rows `stride` ≥ m apart) and of this task's r rows of the [B, N, H, e]
            // output, which no other task writes.
            unsafe {
                gemm_into(
                    [r, m, d],
                    (scores.as_mut_ptr(), stride as isize),
                    Operand {
                        ptr: qd.as_ptr().add(at(qo, qs, r0)),
                        rs: qs[2],
                        cs: qs[3],
                    },
                    Operand {
                        ptr: kd.as_ptr().add(at(ko, ks, 0)),
                        rs: ks[3],
                        cs: ks[2],
                    },
                    scale,
                    Parallelism::None,
                );
            }
            crate::ops::cpu_kernels::exp_rows(scores, m, stride, inv_sums);
            let out_rows = ((bi as usize * n + r0) * h + hi as usize) * e;
            // SAFETY: as above.
            unsafe {
                gemm_into(
                    [r, e, m],
                    (dst.0.add(out_rows), (h * e) as isize),
                    Operand::rows(scores.as_ptr(), stride as isize),
                    Operand {
                        ptr: vd.as_ptr().add(at(vo, vs, 0)),
                        rs: vs[2],
                        cs: vs[3],
                    },
                    1.0,
                    Parallelism::None,
                );
            }
            // The softmax's division, on the e values of each output row.
            for (i, &inv) in inv_sums.iter().enumerate() {
                // SAFETY: row r0 + i of this task's output, written by the gemm above.
                let row =
                    unsafe { std::slice::from_raw_parts_mut(dst.0.add(out_rows + i * h * e), e) };
                for v in row {
                    *v *= inv;
                }
            }
        });
    };
    let tasks = b * h * blocks;
    let fill = |out_ptr: SendPtr| {
        #[cfg(not(target_arch = "wasm32"))]
        if b * h * n * m * (d + e) >= CPU_PARALLEL_WORK {
            use rayon::prelude::*;
            (0..tasks)
                .into_par_iter()
                .for_each(|t| task(out_ptr, t / blocks, t % blocks));
            return;
        }
        for t in 0..tasks {
            task(out_ptr, t / blocks, t % blocks);
        }
    };
    // SAFETY: the tasks' gemms (`read_dst` false) write every row of every head.
    let out = unsafe { written(b * h * n * e, fill) };
    heads_view(FlexTensor::from_data(TensorData::new(out, physical)))
}

/// CubeCL (wgpu, and WebGPU in the browser, under `Fusion`, which defers to this): CubeCL's
/// unit flash-attention kernel over all query rows where it launches for the shape (it keeps
/// one tile of scores per unit and never materialises the score matrix, so no block is needed:
/// at SD-1.x's 64×64 latents one kernel per layer where blocks took 32 kernels and 32 slice
/// assignments); elsewhere (an adapter without plane operations, a head size its tiles do not
/// divide) Burn's fused attention per block of query rows. Burn autotunes that one between its
/// flash kernels and, where none launches, a fallback that materialises the scores (the only
/// strategy without autotune, in the browser): per block, that fallback stays within
/// [`SCORE_BLOCK_BYTES`]. Burn's flash kernels take the default scale only; another scale runs
/// the blocked primitives.
impl AttentionBackend for CubeBackend {
    fn blocked_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: f32,
        block: usize,
    ) -> FloatTensor<Self> {
        let d = q.shape()[3];
        if scale != default_scale(d) || v.shape()[3] != d {
            return forward::<Self>(q, k, v, scale, block);
        }
        if let Ok(out) = flash_unit(q.clone(), k.clone(), v.clone()) {
            return out;
        }
        let n = q.shape()[2];
        let outs = blocks(n, block)
            .map(|(s, e)| {
                fused::<Self>(
                    rows::<Self>(q.clone(), s, e),
                    k.clone(),
                    v.clone(),
                    AttentionModuleOptions::default(),
                )
            })
            .collect();
        cat_rows::<Self>(outs)
    }
}

/// CubeCL's unit flash-attention kernel (f32 accumulation) on the whole problem, or why it
/// does not launch for this adapter and shape (nothing has run then).
fn flash_unit(
    q: FloatTensor<CubeBackend>,
    k: FloatTensor<CubeBackend>,
    v: FloatTensor<CubeBackend>,
) -> Result<FloatTensor<CubeBackend>, cubek::attention::forward::definition::AttentionSetupError> {
    use cubek::attention::forward::launch::{BlueprintStrategy, Strategy};
    burn_cubecl::kernel::attention::flash_attention(
        q,
        k,
        v,
        None,
        None,
        AttentionModuleOptions::default(),
        Strategy::Unit(BlueprintStrategy::Inferred(())),
    )
}

/// Burn's softmax over dimension 3.
fn softmax_dim3<B: Backend>(scores: FloatTensor<B>) -> FloatTensor<B> {
    B::softmax(scores, 3)
}

/// The backend's own attention op, without mask or bias.
fn fused<B: Backend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    options: AttentionModuleOptions,
) -> FloatTensor<B> {
    B::attention(q, k, v, None, None, options)
}

/// `1/√d` as [`attention`] computes it.
fn default_scale(head_dim: usize) -> f32 {
    1.0 / (head_dim as f32).sqrt()
}

/// Rows `start..end` of dimension 2 of a 4-d tensor.
fn rows<B: Backend>(t: FloatTensor<B>, start: usize, end: usize) -> FloatTensor<B> {
    if start == 0 && end == t.shape()[2] {
        return t;
    }
    let all = Slice::new(0, None, 1);
    B::float_slice(
        t,
        &[
            all,
            all,
            Slice::new(start as isize, Some(end as isize), 1),
            all,
        ],
    )
}

/// Row starts and ends of the blocks over `n` rows.
fn blocks(n: usize, block: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n)
        .step_by(block.max(1))
        .map(move |s| (s, (s + block).min(n)))
}

/// `softmax(q_b kᵀ · scale)` for one block of queries, `kt` = kᵀ. Half-precision inputs
/// (activations in f16) have their scores and softmax computed in f32 — diffusers'
/// `upcast_attention` — and the probabilities returned in their dtype.
fn probabilities<B: AttentionBackend>(
    qb: FloatTensor<B>,
    kt: FloatTensor<B>,
    scale: f32,
) -> FloatTensor<B> {
    let dtype = qb.dtype();
    if dtype != burn::tensor::DType::F32 {
        let f32 = burn::tensor::FloatDType::F32;
        let p = probabilities::<B>(B::float_cast(qb, f32), B::float_cast(kt, f32), scale);
        return B::float_cast(p, dtype.into());
    }
    B::softmax_last(B::float_mul_scalar(B::float_matmul(qb, kt), scale.into()))
}

fn cat_rows<B: Backend>(mut parts: Vec<FloatTensor<B>>) -> FloatTensor<B> {
    if parts.len() == 1 {
        parts.pop().expect("one block")
    } else {
        B::float_cat(parts, 2)
    }
}

fn forward<B: AttentionBackend>(
    q: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    scale: f32,
    block: usize,
) -> FloatTensor<B> {
    let n = q.shape()[2];
    let kt = B::float_swap_dims(k, 2, 3);
    let outs = blocks(n, block)
        .map(|(s, e)| {
            let p = probabilities::<B>(rows::<B>(q.clone(), s, e), kt.clone(), scale);
            B::float_matmul(p, v.clone())
        })
        .collect();
    cat_rows::<B>(outs)
}

/// The op's settings, kept with q, k and v for the backward of this module's docs.
#[derive(Clone, Debug)]
struct Attention {
    scale: f32,
    block: usize,
}

impl<B: AttentionBackend> Differentiable<B, 3> for Attention {
    fn forward(&self, [q, k, v]: [FloatTensor<B>; 3]) -> FloatTensor<B> {
        B::blocked_attention(q, k, v, self.scale, self.block)
    }

    fn backward(
        self,
        inputs: [Option<FloatTensor<B>>; 3],
        d_o: FloatTensor<B>,
        want: [bool; 3],
    ) -> [Option<FloatTensor<B>>; 3] {
        let ([q, k, v], Self { scale, block }) = (all_kept(inputs), self);
        let n = q.shape()[2];
        let kt = B::float_swap_dims(k.clone(), 2, 3);
        let vt = B::float_swap_dims(v, 2, 3);
        let mut dq = Vec::new();
        let mut dk: Option<FloatTensor<B>> = None;
        let mut dv: Option<FloatTensor<B>> = None;
        let accumulate = |acc: &mut Option<FloatTensor<B>>, x: FloatTensor<B>| {
            *acc = Some(match acc.take() {
                Some(a) => B::float_add(a, x),
                None => x,
            });
        };
        for (s, e) in blocks(n, block) {
            let qb = rows::<B>(q.clone(), s, e);
            let dob = rows::<B>(d_o.clone(), s, e);
            let p = probabilities::<B>(qb.clone(), kt.clone(), scale);
            if want[2] {
                accumulate(
                    &mut dv,
                    B::float_matmul(B::float_swap_dims(p.clone(), 2, 3), dob.clone()),
                );
            }
            if !(want[0] || want[1]) {
                continue;
            }
            let dp = B::float_matmul(dob, vt.clone());
            let pdp = B::float_mul(p.clone(), dp);
            let row = B::float_sum_dim(pdp.clone(), 3);
            // P ∘ (dP − rowsum(P ∘ dP)) = P∘dP − P ∘ rowsum(P∘dP); scaled once here for dq, dk.
            let ds = B::float_mul_scalar(B::float_sub(pdp, B::float_mul(p, row)), scale.into());
            if want[0] {
                dq.push(B::float_matmul(ds.clone(), k.clone()));
            }
            if want[1] {
                accumulate(&mut dk, B::float_matmul(B::float_swap_dims(ds, 2, 3), qb));
            }
        }
        [want[0].then(|| cat_rows::<B>(dq)), dk, dv]
    }
}

impl<B: AttentionBackend, C: CheckpointStrategy> AttentionBackend for Autodiff<B, C> {
    fn blocked_attention(
        q: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        scale: f32,
        block: usize,
    ) -> FloatTensor<Self> {
        record::<B, C, _, 3>(Attention { scale, block }, [q, k, v])
    }
}
