//! `draft_core::memory::strips`: a convolution and a group norm on strips of rows against the whole
//! tensor, on every device, strips of one row up to the whole height; and an embedding table
//! held as blocks of rows (`nn::Embedding`) against the whole table; the UNet's feed-forward
//! over chunks of tokens against the whole.

mod common;

use burn::prelude::*;
use common::{devices, rel_err, values};
use draft_core::memory::strips;
use draft_core::model::models::unet::resnet::{ResnetBlock2D, Upsample2D};
use draft_core::model::nn::{Conv2d, Embedding, GroupNorm, param};
use draft_core::model::var_builder::VarBuilder;
use draft_core::model::weights::{Weights, serialize_f32};
use draft_core::noise::NoiseRng;

fn norm(device: &Device, c: usize, seed: u64) -> GroupNorm {
    GroupNorm {
        weight: param(NoiseRng::new(seed).randn([c], device)),
        bias: param(NoiseRng::new(seed + 1).randn([c], device)),
        num_groups: 4,
        eps: 1e-6,
    }
}

fn conv(device: &Device, c_in: usize, c_out: usize, kernel: usize) -> Conv2d {
    let pad = (kernel - 1) / 2;
    Conv2d {
        weight: param(NoiseRng::new(1).randn([c_out, c_in, kernel, kernel], device) * 0.2),
        bias: Some(param(NoiseRng::new(2).randn([c_out], device))),
        stride: 1,
        pad_begin: pad,
        pad_end: pad,
        lora: None,
    }
}

#[test]
fn conv_and_group_norm_on_strips_match_the_whole_tensor() {
    for (name, device) in devices() {
        let x = NoiseRng::new(3).randn([2, 8, 9, 5], &device) + 0.5;
        let norm = GroupNorm {
            weight: param(NoiseRng::new(4).randn([8], &device)),
            bias: param(NoiseRng::new(5).randn([8], &device)),
            num_groups: 4,
            eps: 1e-6,
        };
        for kernel in [1, 3, 5] {
            let conv = conv(&device, 8, 6, kernel);
            let want = values(conv.forward(norm.forward_silu(x.clone())));
            for rows in [1, 2, 4, 9] {
                let parts = strips::resplit(vec![x.clone()], rows);
                let got = conv.forward_strips(&norm.forward_strips(parts, true));
                assert_eq!(got.len(), 9usize.div_ceil(rows));
                let got = values(strips::join(got));
                assert_eq!(got.1, want.1);
                let err = rel_err(&got.0, &want.0);
                eprintln!("{name}: kernel {kernel}, strips of {rows} rows: {err:.1e}");
                assert!(err <= 1e-5, "{name}: kernel {kernel}, {rows} rows: {err:e}");
            }
        }
    }
}

#[test]
fn upsampling_on_strips_matches_the_whole_tensor() {
    for (name, device) in devices() {
        let x = NoiseRng::new(6).randn([2, 8, 7, 5], &device);
        let up = Upsample2D {
            conv: conv(&device, 8, 8, 3),
        };
        let want = values(up.forward(x.clone(), None));
        for rows in [1, 2, 3, 7] {
            let parts = strips::resplit(vec![x.clone()], rows);
            let got = values(strips::join(up.forward_strips(parts)));
            assert_eq!(got.1, want.1);
            let err = rel_err(&got.0, &want.0);
            eprintln!("{name}: ×2, strips of {rows} rows: {err:.1e}");
            assert!(err <= 1e-5, "{name}: ×2, {rows} rows: {err:e}");
        }
    }
}

#[test]
fn a_resnet_on_strips_matches_the_whole_tensor() {
    for (name, device) in devices() {
        let x = NoiseRng::new(7).randn([2, 8, 16, 6], &device);
        for c_out in [8, 4] {
            let r = ResnetBlock2D {
                norm1: norm(&device, 8, 10),
                conv1: conv(&device, 8, c_out, 3),
                time_emb_proj: None,
                norm2: norm(&device, c_out, 12),
                conv2: conv(&device, c_out, c_out, 3),
                conv_shortcut: (c_out != 8).then(|| conv(&device, 8, c_out, 1)),
                output_scale_factor: 1.0,
            };
            let want = values(r.forward(x.clone(), None));
            for rows in [1, 3, 16] {
                let parts = strips::resplit(vec![x.clone()], rows);
                let got = values(strips::join(r.forward_strips(parts)));
                let err = rel_err(&got.0, &want.0);
                eprintln!("{name}: resnet 8 → {c_out}, strips of {rows} rows: {err:.1e}");
                assert!(err <= 1e-5, "{name}: resnet, {rows} rows: {err:e}");
            }
        }
    }
}

/// A 1×1 convolution on strips cut from a convolution's output (the case that exposed a bug of
/// burn-cubecl 0.22.1's pointwise convolution on row slices: docs/parity.md).
#[test]
fn a_pointwise_conv_on_strips_of_a_conv_output_matches_the_whole_tensor() {
    for (name, device) in devices() {
        let x = NoiseRng::new(8).randn([2, 16, 8, 12], &device);
        let y = conv(&device, 16, 16, 3).forward(x);
        let pointwise = conv(&device, 16, 8, 1);
        let want = values(pointwise.forward(y.clone()));
        for rows in [1, 3] {
            let parts = strips::resplit(vec![y.clone()], rows);
            let got: Vec<_> = parts.into_iter().map(|p| pointwise.forward(p)).collect();
            let err = rel_err(&values(strips::join(got)).0, &want.0);
            eprintln!("{name}: 1×1 after a 3×3, strips of {rows} rows: {err:.1e}");
            assert!(err <= 1e-6, "{name}: {rows} rows: {err:e}");
        }
    }
}

/// A 10 × 3 table read from a file as blocks of 4, 4 and 2 rows (as CLIP-L's token embedding
/// is at 43690 rows a block), looked up at ids in every block and on both sides of the cuts.
#[test]
fn an_embedding_table_in_blocks_of_rows_looks_up_the_whole_tables_rows() {
    let table: Vec<f32> = (0..30).map(|i| i as f32 * 0.5 - 3.0).collect();
    let bytes = serialize_f32(&[("emb.weight".into(), vec![10, 3], table)], None).unwrap();
    let weights = Weights::from_bytes("emb.safetensors", &bytes).unwrap();
    for (name, device) in devices() {
        let vb = VarBuilder::new(&weights, &device).pp("emb");
        let blocks = vb.get_weight_row_blocks("weight", [10, 3], 4).unwrap();
        assert_eq!(
            blocks.iter().map(|b| b.dims()[0]).collect::<Vec<_>>(),
            [4, 4, 2]
        );
        let blocked = Embedding {
            blocks: blocks.into_iter().map(param).collect(),
        };
        assert_eq!(blocked.num_embeddings(), 10);
        let whole = Embedding::load(vb, 10, 3).unwrap();
        assert_eq!(whole.blocks.len(), 1);
        let ids = Tensor::<2, Int>::from_data([[0, 3, 4, 7], [8, 9, 5, 2]], &device);
        let got = values(blocked.forward(ids.clone()));
        let want = values(whole.forward(ids));
        assert_eq!(got.1, [2, 4, 3]);
        assert_eq!(got, want, "{name}");
        // Row 9 is the last block's second row: 27 · 0.5 − 3 = 10.5.
        assert_eq!(got.0[5 * 3..6 * 3], [10.5, 11.0, 11.5]);
        // A random table (the benchmarks' CLIP-L) is drawn block by block: the rows the whole
        // table drawn from the same seed has.
        let random = || VarBuilder::random(7, &device).pp("emb");
        let blocks = random()
            .get_weight_row_blocks("weight", [10, 3], 4)
            .unwrap();
        assert_eq!(blocks.len(), 3);
        let whole = values(random().get_weight("weight", [10, 3]).unwrap());
        assert_eq!(values(Tensor::cat(blocks, 0)), whole, "{name}");
    }
}

/// The group norm on strips under autodiff (the moments and scale-shift ops' own backwards)
/// against the whole tensor's group norm: ∂x, ∂weight, ∂bias, with a mean five times the spread.
#[test]
fn group_norm_on_strips_has_the_whole_tensors_gradients() {
    for (name, device) in devices() {
        let x = NoiseRng::new(13).randn([2, 8, 9, 5], &device) + 5.0;
        let g_out = NoiseRng::new(14).randn([2, 8, 9, 5], &device);
        for silu in [false, true] {
            let grads_of = |strip_rows: Option<usize>| {
                let norm = norm(&device, 8, 20);
                let (w, b) = (norm.weight.val(), norm.bias.val());
                let (wg, bg) = (w.autodiff().require_grad(), b.autodiff().require_grad());
                let norm = GroupNorm {
                    weight: param(wg.clone()),
                    bias: param(bg.clone()),
                    ..norm
                };
                let xg = x.clone().autodiff().require_grad();
                let y = match strip_rows {
                    None if silu => norm.forward_silu(xg.clone()),
                    None => norm.forward(xg.clone()),
                    Some(rows) => strips::join(
                        norm.forward_strips(strips::resplit(vec![xg.clone()], rows), silu),
                    ),
                };
                let grads = (y.clone() * g_out.clone().autodiff()).sum().backward();
                [
                    values(y.without_autodiff()).0,
                    values(xg.grad(&grads).unwrap()).0,
                    values(wg.grad(&grads).unwrap()).0,
                    values(bg.grad(&grads).unwrap()).0,
                ]
            };
            let want = grads_of(None);
            for rows in [1, 4] {
                let got = grads_of(Some(rows));
                for (what, (g, w)) in ["output", "∂x", "∂weight", "∂bias"]
                    .iter()
                    .zip(got.iter().zip(&want))
                {
                    let err = rel_err(g, w);
                    eprintln!("{name}: silu {silu}, strips of {rows} rows: {what} {err:.1e}");
                    assert!(err <= 5e-6, "{name}: {what}, {rows} rows: {err:e}");
                }
            }
        }
    }
}

#[test]
fn the_feed_forward_over_chunks_of_tokens_matches_the_whole() {
    use draft_core::model::models::unet::transformer::{FeedForward, GEGLU};
    use draft_core::model::nn::Linear;
    let linear = |device: &Device, d_in: usize, d_out: usize, seed: u64| Linear {
        weight: param(NoiseRng::new(seed).randn([d_in, d_out], device) * 0.3),
        bias: Some(param(NoiseRng::new(seed + 1).randn([d_out], device))),
        lora: None,
    };
    for (name, device) in devices() {
        let ff = FeedForward {
            geglu: GEGLU {
                proj: linear(&device, 8, 64, 1),
            },
            out: linear(&device, 32, 8, 3),
        };
        let x = NoiseRng::new(5).randn([2, 13, 8], &device);
        let want = values(ff.forward(x.clone()));
        let (_, want_grad) = {
            let x = x.clone().autodiff().require_grad();
            let grads = ff.forward(x.clone()).square().sum().backward();
            ((), values(x.grad(&grads).unwrap()))
        };
        // [2, tokens, 64] f32 projections: 512 bytes per token.
        for tokens in [1, 4, 12] {
            let max_bytes = (tokens * 512) as u64;
            assert_eq!(FeedForward::chunk_tokens(2, 64, max_bytes), tokens);
            let got = values(ff.forward_chunked(x.clone(), max_bytes));
            assert_eq!(got.1, want.1);
            let err = rel_err(&got.0, &want.0);
            let x = x.clone().autodiff().require_grad();
            let grads = ff
                .forward_chunked(x.clone(), max_bytes)
                .square()
                .sum()
                .backward();
            let grad_err = rel_err(&values(x.grad(&grads).unwrap()).0, &want_grad.0);
            eprintln!("{name}: chunks of {tokens} tokens: output {err:.1e}, ∂x {grad_err:.1e}");
            assert!(err <= 1e-6, "{name}: {tokens} tokens: {err:e}");
            assert!(grad_err <= 1e-6, "{name}: {tokens} tokens: ∂x {grad_err:e}");
        }
    }
}
