//! The group-norm op (`draft_core::ops::group_norm`: flex's own kernel on the CPU, a handwritten
//! backward everywhere) against the composed formula differentiated by Burn's autodiff, on
//! every device: values and the gradients of x, weight and bias, with and without the fused
//! SiLU, for 3-d and 4-d inputs, a strided input and a mean away from zero.

mod common;

use burn::prelude::*;
use burn::tensor::activation::silu;
use common::{devices, rel_err, values};
use draft_core::noise::NoiseRng;
use draft_core::ops::group_norm::group_norm;

/// PyTorch's `GroupNorm` (+ SiLU) in Burn's tensor ops.
fn plain<const D: usize>(
    x: Tensor<D>,
    w: Tensor<1>,
    b: Tensor<1>,
    groups: usize,
    eps: f64,
    act: bool,
) -> Tensor<D> {
    let dims = x.dims();
    let n = dims[0];
    let c = dims[1];
    let per = dims[1..].iter().product::<usize>() / groups;
    let xg = x.reshape([n, groups, per]);
    let mean = xg.clone().mean_dim(2);
    let xc = xg - mean;
    let var = xc.clone().square().mean_dim(2);
    let xhat = (xc / (var + eps).sqrt()).reshape(dims);
    let mut affine = [1; D];
    affine[1] = c;
    let y = xhat * w.reshape(affine) + b.reshape(affine);
    if act { silu(y) } else { y }
}

fn check<const D: usize>(
    name: &str,
    what: &str,
    x: Tensor<D>,
    groups: usize,
    act: bool,
    device: &Device,
) {
    let c = x.dims()[1];
    let mut rng = NoiseRng::new(7);
    let w = rng.randn([c], device) * 0.5 + 1.0;
    let b = rng.randn([c], device) * 0.3;
    let g = rng.randn(x.dims(), device);
    let eps = 1e-5;
    let run = |f: &dyn Fn(Tensor<D>, Tensor<1>, Tensor<1>) -> Tensor<D>| {
        let (xa, wa, ba) = (
            x.clone().autodiff().require_grad(),
            w.clone().autodiff().require_grad(),
            b.clone().autodiff().require_grad(),
        );
        let out = f(xa.clone(), wa.clone(), ba.clone());
        let grads = (out.clone() * g.clone().autodiff()).sum().backward();
        (
            values(out.without_autodiff()),
            [
                values(xa.grad(&grads).expect("∂x")).0,
                values(wa.grad(&grads).expect("∂w")).0,
                values(ba.grad(&grads).expect("∂b")).0,
            ],
        )
    };
    let (want_out, want) = run(&|x, w, b| plain(x, w, b, groups, eps, act));
    let (got_out, got) = run(&|x, w, b| group_norm(x, w, b, groups, eps, act));
    assert_eq!(got_out.1, want_out.1);
    let out_err = rel_err(&got_out.0, &want_out.0);
    assert!(
        out_err <= 2e-6,
        "{name} {what}: outputs differ by {out_err:e}"
    );
    // Without autodiff: the same values.
    let direct = values(group_norm(
        x.clone(),
        w.clone(),
        b.clone(),
        groups,
        eps,
        act,
    ));
    assert!(rel_err(&direct.0, &want_out.0) <= 2e-6);
    for (which, (got, want)) in ["x", "weight", "bias"].iter().zip(got.iter().zip(&want)) {
        let err = rel_err(got, want);
        eprintln!("{name} {what}: out {out_err:.1e}, ∂/∂{which} {err:.1e}");
        assert!(err <= 2e-5, "{name} {what}: ∂/∂{which} differs by {err:e}");
    }
}

#[test]
fn group_norm_has_the_composed_formulas_values_and_gradients() {
    for (name, device) in devices() {
        let mut rng = NoiseRng::new(3);
        for act in [false, true] {
            let what = if act { "+silu" } else { "" };
            // A resnet's norm: 4-d, several channels per group.
            let x = rng.randn([2, 12, 5, 7], &device) * 2.0 + 0.5;
            check(name, &format!("4-d{what}"), x, 4, act, &device);
            // One channel per group, 3-d.
            let x = rng.randn([3, 6, 10], &device);
            check(name, &format!("3-d{what}"), x, 6, act, &device);
            // A strided view (channels and width swapped back).
            let x = rng.randn([2, 9, 8, 6], &device).swap_dims(1, 3);
            check(name, &format!("strided{what}"), x, 3, act, &device);
            // A mean five times the spread.
            let x = rng.randn([1, 8, 6, 6], &device) + 5.0;
            check(name, &format!("offset{what}"), x, 2, act, &device);
        }
    }
}
