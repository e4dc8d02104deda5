//! The blocked attention op (`draft_core::ops::attention`, its own O(N) backward) against the plain
//! formula `softmax(q kᵀ · scale) v` differentiated by Burn's autodiff, on every device: the
//! same outputs and the same gradients for q, k and v, with blocks that divide the query rows,
//! that don't, one block, and with only some inputs tracked.

mod common;

use burn::prelude::*;
use common::{devices, rel_err, values};
use draft_core::noise::NoiseRng;
use draft_core::ops::attention::{attention, attention_blocked, block_rows};

fn plain(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, scale: f32) -> Tensor<4> {
    let scores = q.matmul(k.swap_dims(2, 3)) * scale;
    burn::tensor::activation::softmax(scores, 3).matmul(v)
}

struct Case {
    q: [usize; 4],
    kv: [usize; 2],
    dv: usize,
    block: usize,
}

#[test]
fn blocked_attention_has_the_plain_formulas_values_and_gradients() {
    let cases = [
        // Self-attention, blocks that don't divide the rows.
        Case {
            q: [2, 3, 37, 8],
            kv: [37, 8],
            dv: 8,
            block: 5,
        },
        // One block (the op is then the plain formula's ops).
        Case {
            q: [2, 3, 37, 8],
            kv: [37, 8],
            dv: 8,
            block: 37,
        },
        Case {
            q: [1, 2, 16, 4],
            kv: [16, 4],
            dv: 4,
            block: 100,
        },
        // Cross-attention: fewer keys than queries, a value width of its own, one-row blocks.
        Case {
            q: [2, 2, 24, 8],
            kv: [11, 8],
            dv: 6,
            block: 1,
        },
        Case {
            q: [1, 4, 64, 16],
            kv: [77, 16],
            dv: 16,
            block: 16,
        },
        // Large enough for the backends' tiled kernels (flex: over 256 K scores per head).
        Case {
            q: [1, 2, 600, 8],
            kv: [600, 8],
            dv: 8,
            block: 256,
        },
    ];
    for (name, device) in devices() {
        for (i, c) in cases.iter().enumerate() {
            let [b, h, n, d] = c.q;
            let mut rng = NoiseRng::new(11 + i as u64);
            // Scaled so that the softmax is far from uniform.
            let q = rng.randn(c.q, &device) * 2.0;
            let k = rng.randn([b, h, c.kv[0], c.kv[1]], &device) * 2.0;
            let v = rng.randn([b, h, c.kv[0], c.dv], &device);
            let g = rng.randn([b, h, n, c.dv], &device);
            let scale = 1.0 / (d as f32).sqrt();
            // The tiled kernels (flex's over 256 K scores per head, Burn's flash kernels on
            // CubeCL) sum their online softmax in another order than the plain formula.
            let out_bound = if n * c.kv[0] > 256 * 1024 { 4e-6 } else { 1e-6 };

            let grads_of = |f: &dyn Fn(Tensor<4>, Tensor<4>, Tensor<4>) -> Tensor<4>| {
                let (qa, ka, va) = (
                    q.clone().autodiff().require_grad(),
                    k.clone().autodiff().require_grad(),
                    v.clone().autodiff().require_grad(),
                );
                let out = f(qa.clone(), ka.clone(), va.clone());
                let grads = (out.clone() * g.clone().autodiff()).sum().backward();
                let grad = |t: &Tensor<4>| values(t.grad(&grads).expect("a gradient"));
                (
                    values(out.without_autodiff()),
                    [grad(&qa), grad(&ka), grad(&va)],
                )
            };
            let (want_out, want) = grads_of(&|q, k, v| plain(q, k, v, scale));
            let (got_out, got) = grads_of(&|q, k, v| attention_blocked(q, k, v, scale, c.block));
            assert_eq!(got_out.1, want_out.1);
            let out_err = rel_err(&got_out.0, &want_out.0);
            assert!(
                out_err <= out_bound,
                "{name} case {i}: outputs differ by {out_err:e}"
            );
            for (which, (got, want)) in ["q", "k", "v"].iter().zip(got.iter().zip(&want)) {
                assert_eq!(got.1, want.1, "{name} case {i}: ∂/∂{which} shape");
                assert!(want.0.iter().any(|x| x.abs() > 1e-3), "zero gradient");
                let err = rel_err(&got.0, &want.0);
                eprintln!("{name} case {i}: out {out_err:.1e}, ∂/∂{which} {err:.1e}");
                assert!(
                    err <= 1e-5,
                    "{name} case {i}: ∂/∂{which} differs by {err:e}"
                );
            }

            // Without autodiff and on an autodiff device without tracked inputs: the same values.
            let plain_out = values(attention_blocked(
                q.clone(),
                k.clone(),
                v.clone(),
                scale,
                c.block,
            ));
            assert!(rel_err(&plain_out.0, &want_out.0) <= out_bound);
            let untracked = values(
                attention_blocked(
                    q.clone().autodiff(),
                    k.clone().autodiff(),
                    v.clone().autodiff(),
                    scale,
                    c.block,
                )
                .without_autodiff(),
            );
            assert!(rel_err(&untracked.0, &want_out.0) <= out_bound);
        }
    }
}

/// q from a tracked input through a projection, k and v constants (a frozen context): the
/// gradient reaches the input through the op, and only for what is tracked.
#[test]
fn gradients_flow_through_the_op_to_what_is_tracked() {
    for (name, device) in devices() {
        let mut rng = NoiseRng::new(5);
        let x = rng.randn([2, 40, 12], &device);
        let w = rng.randn([12, 12], &device) * 0.5;
        let k = rng.randn([2, 3, 9, 4], &device);
        let v = rng.randn([2, 3, 9, 4], &device);
        let run = |f: &dyn Fn(Tensor<4>) -> Tensor<4>| {
            let xa = x.clone().autodiff().require_grad();
            let q = xa.clone().matmul(w.clone().autodiff().unsqueeze::<3>());
            let q = q.reshape([2, 40, 3, 4]).swap_dims(1, 2);
            let out = f(q);
            let grads = (out.clone() * out).sum().backward();
            values(xa.grad(&grads).unwrap())
        };
        let k2 = || k.clone().autodiff();
        let v2 = || v.clone().autodiff();
        let want = run(&|q| plain(q, k2(), v2(), 0.5));
        let got = run(&|q| attention_blocked(q, k2(), v2(), 0.5, 7));
        let err = rel_err(&got.0, &want.0);
        eprintln!("{name}: ∂/∂x {err:.1e}");
        assert!(err <= 1e-5, "{name}: ∂/∂x differs by {err:e}");
    }
}

#[test]
fn blocks_keep_the_scores_within_the_budget() {
    // SD-1.x at 512²: 64×64 latents, 8 heads, batch 2 with classifier-free guidance.
    let rows = block_rows(2 * 2 * 8, 4096);
    assert!(
        rows >= 1 && 2 * 2 * 8 * rows * 4096 * 4 <= draft_core::ops::attention::SCORE_BLOCK_BYTES
    );
    // Small problems are one block: the plain formula's ops.
    assert!(block_rows(2 * 8, 256) >= 256);
    // The default entry point is the plain formula at 1/√d.
    let device = Device::flex();
    let mut rng = NoiseRng::new(3);
    let q = rng.randn([1, 2, 10, 16], &device);
    let k = rng.randn([1, 2, 10, 16], &device);
    let v = rng.randn([1, 2, 10, 16], &device);
    let got = values(attention(q.clone(), k.clone(), v.clone()));
    let want = values(plain(q, k, v, 0.25));
    assert!(rel_err(&got.0, &want.0) <= 1e-6);
}

/// Heads split off `[B, N, H·d]` projections (strided views, as the UNet's attention makes
/// them) and merged back: the same values as the plain formula on contiguous copies, for self-
/// and cross-attention, one task and many (over the CPU kernel's 32 K-score blocks and its
/// threading threshold).
#[test]
fn split_heads_views_give_the_plain_formulas_values() {
    for (name, device) in devices() {
        for (i, (b, n, m, heads, d)) in [(2, 64, 77, 8, 8), (1, 600, 600, 2, 8), (2, 9, 5, 3, 4)]
            .into_iter()
            .enumerate()
        {
            let mut rng = NoiseRng::new(40 + i as u64);
            let x = rng.randn([b, n, heads * d], &device) * 2.0;
            let ctx = rng.randn([b, m, heads * d], &device) * 2.0;
            let split = |t: Tensor<3>| draft_core::model::nn::split_heads(t, heads);
            let (q, k, v) = (split(x), split(ctx.clone()), split(ctx * 0.5));
            let scale = 1.0 / (d as f32).sqrt();
            let got = values(draft_core::model::nn::merge_heads(attention(
                q.clone(),
                k.clone(),
                v.clone(),
            )));
            let contiguous = |t: Tensor<4>| Tensor::<4>::from_data(t.into_data(), &device);
            let want = values(draft_core::model::nn::merge_heads(plain(
                contiguous(q),
                contiguous(k),
                contiguous(v),
                scale,
            )));
            assert_eq!(got.1, want.1);
            let err = rel_err(&got.0, &want.0);
            eprintln!("{name} split heads case {i}: {err:.1e}");
            assert!(err <= 4e-6, "{name} split heads case {i}: {err:e}");
        }
    }
}
