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
use crate::memory::strips::{self, Parts};

/// One segment: a function of a 4-D tensor held as strips of rows ([`Parts`], usually one),
/// applied to plain tensors (forward) and to autodiff tensors (recomputation).
pub type Segment<'a> = Box<dyn Fn(Parts) -> Parts + 'a>;

/// A function as a chain of segments.
pub struct SegmentChain<'a> {
    pub segments: Vec<Segment<'a>>,
}

/// What [`SegmentChain::forward`] keeps for the backward: each segment's input, and the
/// heights of the output's strips.
pub struct Kept {
    inputs: Vec<Parts>,
    out_rows: Vec<usize>,
}

impl Kept {
    /// How many strips of rows the chain's output came in ([`crate::memory::strips`]).
    pub fn output_strips(&self) -> usize {
        self.out_rows.len()
    }
}

impl<'a> SegmentChain<'a> {
    pub fn new(segments: Vec<Segment<'a>>) -> Self {
        Self { segments }
    }

    /// The chain applied to `x` in one go (with a graph when `x` has one).
    pub fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        strips::join(self.segments.iter().fold(vec![x], |x, f| f(x)))
    }

    /// The chain without a graph; returns the output and the segments' inputs.
    pub fn forward(&self, x: Tensor<4>) -> (Tensor<4>, Kept) {
        let mut inputs = Vec::with_capacity(self.segments.len());
        let mut x = vec![x];
        for f in &self.segments {
            inputs.push(x.clone());
            x = f(x);
        }
        let out_rows = strips::rows(&x);
        (strips::join(x), Kept { inputs, out_rows })
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
        let mut g = strips::split_as(g, &kept.out_rows);
        for (k, (f, x)) in self.segments.iter().zip(kept.inputs).enumerate().rev() {
            let what = || format!("segment {k} of a checkpointed chain");
            let (gx, grads) = Recorded::new_parts(f, x, true).vjp_parts(what, g)?;
            on_grads(&grads);
            g = gx.expect("asked for");
        }
        Ok(strips::join(g))
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
    /// The input's strips as tracked leaves, when its gradient is wanted.
    x: Option<Parts>,
    /// The output's strips, with their graph.
    y: Parts,
}

impl Recorded {
    /// `f(x)` with a graph (from `x` when `need_x`, else from the leaves `f` uses).
    pub fn new(f: impl FnOnce(Tensor<4>) -> Tensor<4>, x: Tensor<4>, need_x: bool) -> Self {
        Self::new_parts(|x| vec![f(strips::join(x))], vec![x], need_x)
    }

    /// [`new`](Self::new) for a function of strips.
    pub fn new_parts(f: impl FnOnce(Parts) -> Parts, x: Parts, need_x: bool) -> Self {
        let x = if need_x {
            x.into_iter().map(|x| x.autodiff().require_grad()).collect()
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
        strips::join(
            self.y
                .iter()
                .map(|y| y.clone().without_autodiff())
                .collect(),
        )
    }

    /// `⟨f(x), g⟩` back-propagated: `∂/∂x` (when recorded with `need_x`) and the gradients.
    pub fn vjp(
        self,
        what: impl FnOnce() -> String,
        g: Tensor<4>,
    ) -> Result<(Option<Tensor<4>>, Gradients)> {
        let g = strips::split_as(g, &strips::rows(&self.y));
        let (gx, grads) = self.vjp_parts(what, g)?;
        Ok((gx.map(strips::join), grads))
    }

    /// [`vjp`](Self::vjp) with the output's gradient as strips of the output's heights.
    pub fn vjp_parts(
        self,
        what: impl FnOnce() -> String,
        g: Parts,
    ) -> Result<(Option<Parts>, Gradients)> {
        let grads = self
            .y
            .into_iter()
            .zip(g)
            .map(|(y, g)| (y * g).sum())
            .reduce(|a, b| a + b)
            .expect("a segment has an output")
            .backward();
        let Some(x) = self.x else {
            return Ok((None, grads));
        };
        match x.iter().map(|x| x.grad(&grads)).collect::<Option<Parts>>() {
            Some(gx) => Ok((Some(gx), grads)),
            None => Err(Error::Device(format!(
                "{} has no gradient with respect to its input",
                what()
            ))),
        }
    }
}
