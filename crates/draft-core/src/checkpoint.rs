//! Gradient checkpointing of a chain of segments: `f = f_n ∘ … ∘ f_1` runs forward without a
//! graph, keeping only each segment's input; its vector–Jacobian product is taken from the last
//! segment back, each segment recomputed *with* a graph and back-propagated alone
//! (`∂⟨f_k(x_k), g_k⟩/∂x_k`). Peak memory is one segment's activations plus the kept inputs, for
//! one more forward of the chain. The differentiable sampler does the same over its DDIM steps
//! (`engine.rs`, with [`segment_vjp`] for each step); the VAE decoder is chained this way per
//! resnet / upsampler ([`crate::Pipeline::decode_chain`]).

use burn::prelude::*;
use burn::tensor::Gradients;

use crate::error::{Error, Result};

/// One segment: a function of a 4-D tensor, applied to plain tensors (forward) and to
/// autodiff tensors (recomputation).
pub type Segment<'a> = Box<dyn Fn(Tensor<4>) -> Tensor<4> + 'a>;

/// A function as a chain of segments.
pub struct SegmentChain<'a> {
    pub segments: Vec<Segment<'a>>,
}

/// What [`SegmentChain::forward`] keeps for the backward: each segment's input.
pub struct Kept {
    inputs: Vec<Tensor<4>>,
}

impl<'a> SegmentChain<'a> {
    pub fn new(segments: Vec<Segment<'a>>) -> Self {
        Self { segments }
    }

    /// The chain applied to `x` in one go (with a graph when `x` has one).
    pub fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        self.segments.iter().fold(x, |x, f| f(x))
    }

    /// The chain without a graph; returns the output and the segments' inputs.
    pub fn forward(&self, x: Tensor<4>) -> (Tensor<4>, Kept) {
        let mut inputs = Vec::with_capacity(self.segments.len());
        let mut x = x;
        for f in &self.segments {
            inputs.push(x.clone());
            x = f(x);
        }
        (x, Kept { inputs })
    }

    /// `(∂⟨f(x), g⟩/∂x)`: the gradient with respect to the chain's input of the scalar whose
    /// gradient with respect to its output is `g`; `on_grads` sees each segment's gradients
    /// (for parameters that are autodiff leaves inside a segment).
    pub fn vjp(
        &self,
        kept: Kept,
        g: Tensor<4>,
        mut on_grads: impl FnMut(&Gradients),
    ) -> Result<Tensor<4>> {
        let mut g = g;
        for (k, (f, x)) in self.segments.iter().zip(kept.inputs).enumerate().rev() {
            let what = || format!("segment {k} of a checkpointed chain");
            let (gx, grads) = segment_vjp(what, f, x, g, true)?;
            on_grads(&grads);
            g = gx.expect("asked for");
        }
        Ok(g)
    }
}

/// One segment's vector–Jacobian product, the step every checkpointed backward here is made
/// of (the decoder's chain above, the sampler's steps in `engine.rs`): `f` recomputed on `x`
/// with a graph and `⟨f(x), g⟩` back-propagated. Returns `∂/∂x` when `need_x` (an error naming
/// `what()` if the graph does not reach `x`) and the gradients, for the autodiff leaves `f`
/// used (LoRA parameters, prompt embeddings).
pub fn segment_vjp(
    what: impl FnOnce() -> String,
    f: impl FnOnce(Tensor<4>) -> Tensor<4>,
    x: Tensor<4>,
    g: Tensor<4>,
    need_x: bool,
) -> Result<(Option<Tensor<4>>, Gradients)> {
    Recorded::new(f, x, need_x).vjp(what, g)
}

/// A segment run once with its graph kept, for when its output's gradient is known only after
/// the output itself has been used (the sampler's last step: its output is decoded and scored
/// first). [`segment_vjp`] is this, recorded and back-propagated at once.
pub struct Recorded {
    /// The input as a tracked leaf, when its gradient is wanted.
    x: Option<Tensor<4>>,
    /// The output, with its graph.
    y: Tensor<4>,
}

impl Recorded {
    /// `f(x)` with a graph (from `x` when `need_x`, else from the leaves `f` uses).
    pub fn new(f: impl FnOnce(Tensor<4>) -> Tensor<4>, x: Tensor<4>, need_x: bool) -> Self {
        let x = if need_x {
            x.autodiff().require_grad()
        } else {
            x
        };
        let y = f(x.clone());
        Self {
            x: need_x.then_some(x),
            y,
        }
    }

    /// The output as a plain tensor.
    pub fn output(&self) -> Tensor<4> {
        self.y.clone().without_autodiff()
    }

    /// `⟨f(x), g⟩` back-propagated: `∂/∂x` (when recorded with `need_x`) and the gradients.
    pub fn vjp(
        self,
        what: impl FnOnce() -> String,
        g: Tensor<4>,
    ) -> Result<(Option<Tensor<4>>, Gradients)> {
        let grads = (self.y * g).sum().backward();
        let Some(x) = self.x else {
            return Ok((None, grads));
        };
        match x.grad(&grads) {
            Some(gx) => Ok((Some(gx), grads)),
            None => Err(Error::Device(format!(
                "{} has no gradient with respect to its input",
                what()
            ))),
        }
    }
}
