//! The CPU backend's kernels that DRaFT's step is made of — softmax forward and backward, sums
//! along every axis, element-wise ops with broadcasting, batched `x·wᵀ` matmuls, convolutions
//! and the two-conv LoRA chain, forward and backward — against an f64 reference computed here.
//! Native builds run Burn's flex backend with its SIMD kernels and threads on; this pins what
//! they compute to within a few f32 roundings (docs/benchmarks.md#parity-with-simd).

use burn::prelude::*;
use burn::tensor::TensorData;
use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;

/// Relative error bound: a few f32 roundings over sums of up to ~1000 terms.
const TOL: f64 = 2e-6;

fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    pollster::block_on(draft_core::read_f32(t)).unwrap().0
}

/// ‖got − want‖ / ‖want‖.
fn rel(got: &[f32], want: &[f64]) -> f64 {
    assert_eq!(got.len(), want.len());
    let (mut n, mut d) = (0.0, 0.0);
    for (x, y) in got.iter().zip(want) {
        n += (*x as f64 - y).powi(2);
        d += y * y;
    }
    (n / d).sqrt()
}

fn check(what: &str, got: &[f32], want: &[f64]) {
    let e = rel(got, want);
    assert!(e < TOL, "{what}: relative error {e:e}");
}

/// Uniform values in [-3, 3) from a small LCG (the same on every platform).
fn rand(shape: [usize; 4], dev: &Device, seed: u64) -> (Tensor<4>, Vec<f32>) {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 33) as f64 / (1u64 << 31) as f64 * 6.0 - 3.0) as f32
        })
        .collect();
    (Tensor::from_data(TensorData::new(v.clone(), shape), dev), v)
}

#[test]
fn attention_pieces_match_f64() {
    let dev = Device::flex();
    for &(b, h, n, m) in &[
        (2, 2, 256, 256),
        (2, 2, 256, 77),
        (2, 8, 64, 64),
        (1, 1, 5, 3),
    ] {
        let tag = format!("[{b},{h},{n},{m}]");
        let (x, xv) = rand([b, h, n, m], &dev, 1);
        let (w, wv) = rand([b, h, n, m], &dev, 2);
        let rows = b * h * n;
        let mut y = vec![0f64; xv.len()];
        for r in 0..rows {
            let row = &xv[r * m..(r + 1) * m];
            let mx = row.iter().cloned().fold(f32::MIN, f32::max) as f64;
            let s: f64 = row.iter().map(|v| (*v as f64 - mx).exp()).sum();
            for j in 0..m {
                y[r * m + j] = (row[j] as f64 - mx).exp() / s;
            }
        }
        let soft = burn::tensor::activation::softmax(x.clone(), 3);
        check(&format!("{tag} softmax"), &host(soft), &y);

        // ∂/∂x Σ softmax(x)·w = y ∘ (w − ⟨y, w⟩)
        let xa = x.clone().autodiff().require_grad();
        let loss = (burn::tensor::activation::softmax(xa.clone(), 3) * w.clone().autodiff()).sum();
        let grads = loss.backward();
        let mut gy = vec![0f64; xv.len()];
        for r in 0..rows {
            let dot: f64 = (0..m).map(|j| y[r * m + j] * wv[r * m + j] as f64).sum();
            for j in 0..m {
                gy[r * m + j] = y[r * m + j] * (wv[r * m + j] as f64 - dot);
            }
        }
        check(
            &format!("{tag} softmax backward"),
            &host(xa.grad(&grads).unwrap()),
            &gy,
        );

        let dims = [b, h, n, m];
        for d in 0..4 {
            let mut out = dims;
            out[d] = 1;
            let mut s = vec![0f64; out.iter().product()];
            for (i, v) in xv.iter().enumerate() {
                let mut idx = [i / (h * n * m), i / (n * m) % h, i / m % n, i % m];
                idx[d] = 0;
                s[((idx[0] * out[1] + idx[1]) * out[2] + idx[2]) * out[3] + idx[3]] += *v as f64;
            }
            check(
                &format!("{tag} sum_dim({d})"),
                &host(x.clone().sum_dim(d)),
                &s,
            );
        }

        let rowsum = x.clone().sum_dim(3);
        let rs = host(rowsum.clone());
        let prod: Vec<f64> = xv
            .iter()
            .zip(&wv)
            .map(|(a, c)| *a as f64 * *c as f64)
            .collect();
        check(&format!("{tag} mul"), &host(x.clone() * w.clone()), &prod);
        let sub: Vec<f64> = xv
            .iter()
            .enumerate()
            .map(|(i, a)| *a as f64 - rs[i / m] as f64)
            .collect();
        check(
            &format!("{tag} sub (broadcast)"),
            &host(x.clone() - rowsum.clone()),
            &sub,
        );
        let div: Vec<f64> = xv
            .iter()
            .enumerate()
            .map(|(i, a)| *a as f64 / (rs[i / m].abs() as f64 + 1.0))
            .collect();
        check(
            &format!("{tag} div (broadcast)"),
            &host(x.clone() / (rowsum.abs() + 1.0)),
            &div,
        );
        let exp: Vec<f64> = xv.iter().map(|a| (*a as f64).exp()).collect();
        check(&format!("{tag} exp"), &host(x.clone().exp()), &exp);

        let mut mm = vec![0f64; b * h * n * n];
        for bh in 0..b * h {
            for i in 0..n {
                for j in 0..n {
                    mm[(bh * n + i) * n + j] = (0..m)
                        .map(|t| xv[(bh * n + i) * m + t] as f64 * wv[(bh * n + j) * m + t] as f64)
                        .sum();
                }
            }
        }
        check(
            &format!("{tag} x·wᵀ"),
            &host(x.matmul(w.swap_dims(2, 3))),
            &mm,
        );
    }
}

/// `conv2d` (stride 1, "same" padding) and its gradients with respect to input and weight.
fn conv_ref(
    x: &[f32],
    [b, c, h, wd]: [usize; 4],
    w: &[f32],
    [o, _, k, _]: [usize; 4],
    up: &[f64],
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let pad = (k / 2) as isize;
    let mut y = vec![0f64; b * o * h * wd];
    let mut gx = vec![0f64; x.len()];
    let mut gw = vec![0f64; w.len()];
    for bi in 0..b {
        for oi in 0..o {
            for yi in 0..h {
                for xi in 0..wd {
                    let out = ((bi * o + oi) * h + yi) * wd + xi;
                    for ci in 0..c {
                        for ki in 0..k {
                            for kj in 0..k {
                                let iy = yi as isize + ki as isize - pad;
                                let ix = xi as isize + kj as isize - pad;
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                    continue;
                                }
                                let xi_ = ((bi * c + ci) * h + iy as usize) * wd + ix as usize;
                                let wi = ((oi * c + ci) * k + ki) * k + kj;
                                y[out] += x[xi_] as f64 * w[wi] as f64;
                                gx[xi_] += up[out] * w[wi] as f64;
                                gw[wi] += up[out] * x[xi_] as f64;
                            }
                        }
                    }
                }
            }
        }
    }
    (y, gx, gw)
}

#[test]
fn convolutions_and_the_lora_conv_chain_match_f64() {
    let dev = Device::flex();
    for &(b, c, h, o, k) in &[
        (2, 32, 16, 4, 3),
        (2, 4, 16, 32, 1),
        (2, 32, 16, 32, 3),
        (2, 96, 8, 64, 3),
        (2, 4, 8, 64, 1),
        (1, 3, 5, 2, 3),
    ] {
        let tag = format!("conv [{b},{c},{h},{h}] → {o}, {k}×{k}");
        let (x, xv) = rand([b, c, h, h], &dev, 3);
        let (w, wv) = rand([o, c, k, k], &dev, 4);
        let (u, uv) = rand([b, o, h, h], &dev, 5);
        let up: Vec<f64> = uv.iter().map(|v| *v as f64).collect();
        let (y, gx, gw) = conv_ref(&xv, [b, c, h, h], &wv, [o, c, k, k], &up);
        let pad = k / 2;
        let opts = ConvOptions::new([1, 1], [pad, pad], [1, 1], 1);
        check(
            &tag,
            &host(conv2d(x.clone(), w.clone(), None, opts.clone())),
            &y,
        );
        let xa = x.autodiff().require_grad();
        let wa = w.autodiff().require_grad();
        let loss = (conv2d(xa.clone(), wa.clone(), None, opts) * u.autodiff()).sum();
        let grads = loss.backward();
        check(&format!("{tag} ∂x"), &host(xa.grad(&grads).unwrap()), &gx);
        check(&format!("{tag} ∂w"), &host(wa.grad(&grads).unwrap()), &gw);
    }

    // LoRA on a 3×3 conv: h = conv(x, A as [r, c, 3, 3]) · s, y = conv(h, B as [o, r, 1, 1]).
    let (b, c, h, o, r, s) = (2, 96, 8, 64, 4, 2.0);
    let (x, xv) = rand([b, c, h, h], &dev, 3);
    let (a4, av) = rand([r, c, 3, 3], &dev, 4);
    let (b4, bv) = rand([o, r, 1, 1], &dev, 6);
    let (u, uv) = rand([b, o, h, h], &dev, 5);
    let a2 = a4.reshape([r, c * 9]).autodiff().require_grad();
    let b2 = b4.reshape([o, r]).autodiff().require_grad();
    let xa = x.autodiff().require_grad();
    let hid = conv2d(
        xa.clone(),
        a2.clone().reshape([r, c, 3, 3]),
        None,
        ConvOptions::new([1, 1], [1, 1], [1, 1], 1),
    ) * s;
    let pointwise = ConvOptions::new([1, 1], [0, 0], [1, 1], 1);
    let y = conv2d(hid, b2.clone().reshape([o, r, 1, 1]), None, pointwise);
    let grads = (y * u.autodiff()).sum().backward();
    // ∂/∂h = s·Bᵀu, ∂/∂B = Σ u·hᵀ (h = conv(x, A)·s)
    let zeros = vec![0f64; b * r * h * h];
    let (hr, _, _) = conv_ref(&xv, [b, c, h, h], &av, [r, c, 3, 3], &zeros);
    let mut gh = vec![0f64; b * r * h * h];
    let mut gb = vec![0f64; o * r];
    for bi in 0..b {
        for p in 0..h * h {
            for oi in 0..o {
                let g = uv[(bi * o + oi) * h * h + p] as f64;
                for ri in 0..r {
                    gh[(bi * r + ri) * h * h + p] += s * g * bv[oi * r + ri] as f64;
                    gb[oi * r + ri] += g * s * hr[(bi * r + ri) * h * h + p];
                }
            }
        }
    }
    let (_, gx, ga) = conv_ref(&xv, [b, c, h, h], &av, [r, c, 3, 3], &gh);
    check("LoRA conv ∂x", &host(xa.grad(&grads).unwrap()), &gx);
    check("LoRA conv ∂A", &host(a2.grad(&grads).unwrap()), &ga);
    check("LoRA conv ∂B", &host(b2.grad(&grads).unwrap()), &gb);
}
