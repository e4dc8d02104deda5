//! DDIM sampling with classifier-free guidance. One step is a pure tensor function
//! `(x_t, step index, text embeddings) → x_{t−1}` so that training can differentiate through
//! it, recompute it, or run it without a graph.

use burn::prelude::*;
use burn::tensor::{DType, FloatDType};

use crate::model::models::unet::UNet2DConditionModel;
use crate::model::schedule::Ddim;

/// The conditioning of a batch: prompt embeddings and, for guidance, the unconditional
/// (empty or negative prompt) embeddings broadcast to the batch, stacked once as the UNet's
/// context `[uncond; cond]` for every step.
///
/// The UNet computes in the dtype of its context ([`with_dtype`](Self::with_dtype)): the
/// latents are cast to it on the way in and the model output back to the latents' dtype, so
/// the guidance combination and the scheduler's update stay in f32.
///
/// SDXL's UNet also takes added conditions (the pooled text embedding and the size ids,
/// [`UNet2DConditionModel::added_input`]), stacked the same way ([`with_added`](Self::with_added)).
#[derive(Clone)]
pub struct Conditioning {
    pub cond: Tensor<3>,
    /// `[uncond; cond]` when guidance applies.
    pub guided_context: Option<Tensor<3>>,
    pub guidance: f64,
    /// SDXL: the added conditions of `cond` [B, P + 6·d].
    pub added: Option<Tensor<2>>,
    /// SDXL: `[uncond; cond]`'s added conditions when guidance applies.
    pub guided_added: Option<Tensor<2>>,
}

/// `uncond` broadcast to a batch of `b` (a single negative prompt serves every sample).
fn batched<const D: usize>(uncond: Tensor<D>, b: usize) -> Tensor<D> {
    if uncond.dims()[0] == b {
        return uncond;
    }
    let mut shape = uncond.dims();
    shape[0] = b;
    uncond.narrow(0, 0, 1).expand(shape)
}

impl Conditioning {
    /// diffusers applies guidance only when `guidance_scale > 1`.
    pub fn new(cond: Tensor<3>, uncond: Tensor<3>, guidance: f64) -> Self {
        let b = cond.dims()[0];
        let guided_context =
            (guidance > 1.0).then(|| Tensor::cat(vec![batched(uncond, b), cond.clone()], 0));
        Self {
            cond,
            guided_context,
            guidance,
            added: None,
            guided_added: None,
        }
    }

    /// The same with SDXL's added conditions for the prompts and the unconditional side.
    pub fn with_added(self, cond: Tensor<2>, uncond: Tensor<2>) -> Self {
        let b = cond.dims()[0];
        let guided_added =
            (self.guidance > 1.0).then(|| Tensor::cat(vec![batched(uncond, b), cond.clone()], 0));
        Self {
            added: Some(cond),
            guided_added,
            ..self
        }
    }

    /// The same conditioning with the UNet computing in `dtype` (f16: the sampling steps that
    /// no gradient goes through, [`Pipeline::sampling_dtype`](crate::Pipeline::sampling_dtype)).
    pub fn with_dtype(self, dtype: FloatDType) -> Self {
        let dtype = DType::from(dtype);
        Self {
            cond: crate::tensor::in_dtype(self.cond, dtype),
            guided_context: self
                .guided_context
                .map(|c| crate::tensor::in_dtype(c, dtype)),
            guidance: self.guidance,
            added: self.added.map(|c| crate::tensor::in_dtype(c, dtype)),
            guided_added: self.guided_added.map(|c| crate::tensor::in_dtype(c, dtype)),
        }
    }

    /// The guided model output for `x` at `timestep`, in x's dtype.
    pub fn model_output(
        &self,
        unet: &UNet2DConditionModel,
        x: Tensor<4>,
        timestep: f32,
    ) -> Tensor<4> {
        let dtype = x.dtype();
        let compute = self.cond.dtype();
        let x = crate::tensor::in_dtype(x, compute);
        let unet_forward = |x, context, added| {
            crate::tensor::in_dtype(unet.forward_added(x, timestep, context, added), dtype)
        };
        match &self.guided_context {
            None => unet_forward(x, self.cond.clone(), self.added.clone()),
            Some(context) => {
                // One UNet call on [uncond; cond], as diffusers batches it.
                let b = x.dims()[0];
                let out = unet_forward(
                    Tensor::cat(vec![x.clone(), x], 0),
                    context.clone(),
                    self.guided_added.clone(),
                );
                let u = out.clone().narrow(0, 0, b);
                let c = out.narrow(0, b, b);
                u.clone() + (c - u) * self.guidance
            }
        }
    }
}

/// One DDIM step: x_{t_i} → x_{t_{i+1}}. `noise` is the fresh noise for η > 0.
pub fn denoise_step(
    unet: &UNet2DConditionModel,
    ddim: &Ddim,
    i: usize,
    eta: f64,
    x: Tensor<4>,
    cond: &Conditioning,
    noise: Option<Tensor<4>>,
) -> Tensor<4> {
    let c = ddim.coefficients(i, eta);
    let eps = cond.model_output(unet, x.clone(), c.timestep as f32);
    ddim.step(&c, eps, x, noise)
}

/// The whole chain from `x_T` to `x_0` without gradient. `noise(i)` supplies the step noise
/// when η > 0; `on_step(i, n)` reports progress after each step, and stops the chain with
/// [`Error::Cancelled`](crate::Error::Cancelled) when it returns `false`.
pub fn sample(
    unet: &UNet2DConditionModel,
    ddim: &Ddim,
    eta: f64,
    x_t: Tensor<4>,
    cond: &Conditioning,
    mut noise: impl FnMut(usize) -> Option<Tensor<4>>,
    mut on_step: impl FnMut(usize, usize) -> bool,
) -> crate::Result<Tensor<4>> {
    let n = ddim.timesteps.len();
    let mut x = x_t;
    for i in 0..n {
        let z = if eta > 0.0 { noise(i) } else { None };
        x = denoise_step(unet, ddim, i, eta, x, cond, z);
        if !on_step(i + 1, n) {
            return Err(crate::Error::Cancelled);
        }
    }
    Ok(x)
}
