//! The optimisers and the gradient clipping of every training loop (`draft train`'s LoRA and
//! `draft pretrain`'s full models): PyTorch's `torch.optim.AdamW`, `torch.optim.SGD` and
//! `torch.nn.utils.clip_grad_norm_`, step for step, so that what the tests prove against
//! PyTorch holds for both loops.

use burn::prelude::*;

use crate::error::Result;

/// Which update rule, with its hyper-parameters (the learning rate is passed per step, so
/// schedules such as a warm-up live with the caller).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Optimizer {
    /// `torch.optim.AdamW`: decoupled weight decay, bias-corrected moments.
    AdamW {
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    },
    /// `torch.optim.SGD` without momentum: weight decay is L2, added to the gradient.
    Sgd { weight_decay: f64 },
}

/// The optimiser's state for one list of parameters: Adam's moments (zeros, also for SGD, so
/// that checkpoints have one layout) and the number of updates taken.
pub struct OptimState<const D: usize> {
    pub m: Vec<Tensor<D>>,
    pub v: Vec<Tensor<D>>,
    /// Updates taken so far (Adam's bias-correction step count is this + 1 in the next update).
    pub updates: usize,
}

impl<const D: usize> OptimState<D> {
    /// Zero moments shaped like `params`.
    pub fn zeros(params: &[Tensor<D>]) -> Self {
        let zeros: Vec<Tensor<D>> = params.iter().map(|p| p.zeros_like()).collect();
        Self {
            m: zeros.clone(),
            v: zeros,
            updates: 0,
        }
    }
}

impl Optimizer {
    /// One update of `params` with `grads` (already clipped / scaled) at learning rate `lr`;
    /// returns the new parameters and advances `state`.
    pub fn step<const D: usize>(
        &self,
        params: Vec<Tensor<D>>,
        grads: Vec<Tensor<D>>,
        lr: f64,
        state: &mut OptimState<D>,
    ) -> Vec<Tensor<D>> {
        assert_eq!(params.len(), grads.len(), "one gradient per parameter");
        assert_eq!(
            params.len(),
            state.m.len(),
            "optimiser state of other params"
        );
        let t = (state.updates + 1) as i32;
        let mut new = Vec::with_capacity(params.len());
        for (i, (p, g)) in params.into_iter().zip(grads).enumerate() {
            let p = match *self {
                Optimizer::Sgd { weight_decay } => {
                    let g = if weight_decay != 0.0 {
                        g + p.clone() * weight_decay
                    } else {
                        g
                    };
                    p - g * lr
                }
                Optimizer::AdamW {
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                } => {
                    let p = if weight_decay != 0.0 {
                        p * (1.0 - lr * weight_decay)
                    } else {
                        p
                    };
                    let m = state.m[i].clone() * beta1 + g.clone() * (1.0 - beta1);
                    let v = state.v[i].clone() * beta2 + g.square() * (1.0 - beta2);
                    let bc1 = 1.0 - beta1.powi(t);
                    let bc2 = 1.0 - beta2.powi(t);
                    let denom = (v.clone() / bc2).sqrt() + eps;
                    let p = p - (m.clone() / bc1) / denom * lr;
                    state.m[i] = m;
                    state.v[i] = v;
                    p
                }
            };
            new.push(p);
        }
        state.updates += 1;
        new
    }
}

/// `sqrt(Σ‖g‖²)` over all tensors, read back to the host.
pub async fn global_norm<'a, const D: usize>(
    grads: impl IntoIterator<Item = &'a Tensor<D>>,
) -> Result<f64> {
    let mut total: Option<Tensor<1>> = None;
    for g in grads {
        let s = g.clone().square().sum();
        total = Some(match total {
            Some(t) => t + s,
            None => s,
        });
    }
    match total {
        None => Ok(0.0),
        Some(t) => Ok((crate::read_f32(t).await?.0[0] as f64).sqrt()),
    }
}

/// The factor `torch.nn.utils.clip_grad_norm_` multiplies the gradients by:
/// `min(1, max_norm / (norm + 1e-6))`; 1 without a bound.
pub fn clip_coefficient(norm: f64, max_norm: Option<f64>) -> f64 {
    match max_norm {
        Some(max) => (max / (norm + 1e-6)).min(1.0),
        None => 1.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_matches_torch_formula() {
        assert_eq!(clip_coefficient(10.0, None), 1.0);
        assert_eq!(clip_coefficient(0.5, Some(1.0)), 1.0);
        let c = clip_coefficient(4.0, Some(1.0));
        assert!((c - 1.0 / (4.0 + 1e-6)).abs() < 1e-15);
    }

    #[test]
    fn adamw_first_step_moves_each_value_by_lr() {
        // With bias correction the first Adam step is lr · g/(|g| + eps') ≈ ±lr.
        let device = Device::default();
        let p = Tensor::<1>::from_floats([1.0, -2.0, 0.5], &device);
        let g = Tensor::<1>::from_floats([0.3, -4.0, 1e-3], &device);
        let opt = Optimizer::AdamW {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        };
        let mut state = OptimState::zeros(std::slice::from_ref(&p));
        let new = opt.step(vec![p], vec![g], 0.1, &mut state);
        let v: Vec<f32> = new[0].clone().into_data().try_to_vec::<f32>().unwrap();
        for (x, want) in v.iter().zip([0.9f32, -1.9, 0.4]) {
            assert!((x - want).abs() < 1e-5, "{x} vs {want}");
        }
        assert_eq!(state.updates, 1);
    }
}
