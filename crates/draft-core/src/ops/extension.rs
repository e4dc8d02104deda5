//! What the ops with a backward of their own share: their node on Burn's autodiff graph.
//!
//! Each of them (attention, group norm and strips' two norm ops, GEGLU, the stored-weight
//! Linear and Conv2d) is a Burn backend extension whose `Autodiff` implementation is one call:
//! the op's settings, a value whose type implements [`Differentiable`] (the forward on the
//! inner backend and the inputs' gradients), handed to [`record`] with the op's inputs.
//! `record` runs the forward and, when an input is tracked, adds a node that keeps the
//! settings and the inputs the backward reads; in the backward pass the node hands
//! [`Differentiable::backward`] the output's gradient and registers the inputs' gradients it
//! returns.

use burn::backend::autodiff::checkpoint::{base::Checkpointer, strategy::CheckpointStrategy};
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Backend};
use std::marker::PhantomData;

/// An op of `N` float inputs with a handwritten backward; `Self` holds its settings (kept for
/// the backward with the inputs it reads).
pub(crate) trait Differentiable<B: Backend, const N: usize>:
    Clone + Send + std::fmt::Debug + 'static
{
    /// Which inputs the backward reads, given which inputs are tracked: all of them unless the
    /// op says otherwise.
    fn keep(&self, tracked: [bool; N]) -> [bool; N] {
        let _ = tracked;
        [true; N]
    }

    /// The op on the inner backend.
    fn forward(&self, inputs: [FloatTensor<B>; N]) -> FloatTensor<B>;

    /// The inputs' gradients for the output gradient `d_out`, each only where `want` says;
    /// `inputs`: those [`Self::keep`] asked for, the others `None`.
    fn backward(
        self,
        inputs: [Option<FloatTensor<B>>; N],
        d_out: FloatTensor<B>,
        want: [bool; N],
    ) -> [Option<FloatTensor<B>>; N];
}

/// `op`'s forward of `inputs`, recorded on the autodiff graph when any input is tracked (as a
/// compute-bound op: a checkpointing strategy keeps its output rather than recomputing it).
pub(crate) fn record<B, C, O, const N: usize>(
    op: O,
    inputs: [FloatTensor<Autodiff<B, C>>; N],
) -> FloatTensor<Autodiff<B, C>>
where
    B: Backend,
    C: CheckpointStrategy,
    O: Differentiable<B, N>,
{
    let tracked = inputs.each_ref().map(|t| t.is_tracked());
    let nodes = inputs.each_ref().map(|t| t.node());
    let inputs = inputs.map(|t| t.into_primitive());
    match Node::<O>(PhantomData)
        .prepare::<C>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => {
            let keep = op.keep(tracked);
            let kept = std::array::from_fn(|i| keep[i].then(|| inputs[i].clone()));
            let out = op.forward(inputs);
            prep.finish((op, kept), out)
        }
        OpsKind::UnTracked(prep) => prep.finish(op.forward(inputs)),
    }
}

/// The inputs of a [`Differentiable`] that keeps all of them.
pub(crate) fn all_kept<T, const N: usize>(inputs: [Option<T>; N]) -> [T; N] {
    inputs.map(|t| t.expect("an input the backward keeps"))
}

/// The graph node of a [`Differentiable`] `O` (stateless, as Burn asks: the settings and
/// inputs are its `State`).
#[derive(Debug)]
struct Node<O>(PhantomData<O>);

impl<B: Backend, O: Differentiable<B, N>, const N: usize> Backward<B, N> for Node<O> {
    type State = (O, [Option<FloatTensor<B>>; N]);

    fn backward(self, ops: Ops<Self::State, N>, grads: &mut Gradients, _: &mut Checkpointer) {
        let d_out = grads.consume::<B>(&ops.node);
        let want = ops.parents.each_ref().map(Option::is_some);
        if !want.contains(&true) {
            return;
        }
        let (op, inputs) = ops.state;
        let input_grads = op.backward(inputs, d_out, want);
        for (node, grad) in ops.parents.into_iter().zip(input_grads) {
            if let (Some(node), Some(grad)) = (node, grad) {
                grads.register::<B>(node.id, grad);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
    use burn::backend::ops::FloatTensorOps;
    use burn::backend::{AutodiffBackend, Flex};
    use burn::tensor::TensorData;

    type Ad = Autodiff<Flex>;

    /// `x ∘ w`; each input's gradient reads the other, so each is kept only when the other is
    /// tracked.
    #[derive(Clone, Debug)]
    struct Product;

    impl<B: Backend> Differentiable<B, 2> for Product {
        fn keep(&self, [x, w]: [bool; 2]) -> [bool; 2] {
            [w, x]
        }

        fn forward(&self, [x, w]: [FloatTensor<B>; 2]) -> FloatTensor<B> {
            B::float_mul(x, w)
        }

        fn backward(
            self,
            [x, w]: [Option<FloatTensor<B>>; 2],
            d_out: FloatTensor<B>,
            [want_x, want_w]: [bool; 2],
        ) -> [Option<FloatTensor<B>>; 2] {
            [
                want_x.then(|| B::float_mul(d_out.clone(), w.expect("w, kept for x"))),
                want_w.then(|| B::float_mul(d_out, x.expect("x, kept for w"))),
            ]
        }
    }

    fn values(t: FloatTensor<Flex>) -> Vec<f32> {
        t.into_data().try_to_vec().expect("f32 values")
    }

    /// The forward's values, and the gradients of `x · w` summed, for x and w each tracked or
    /// not.
    fn product(tracked: [bool; 2]) -> (Vec<f32>, [Option<Vec<f32>>; 2]) {
        let input = |v: [f32; 3], grad: bool| {
            let t = Ad::float_from_data(TensorData::new(v.to_vec(), [3]), &Default::default());
            Ad::float_set_require_grad(t, grad)
        };
        let x = input([1.0, 2.0, 3.0], tracked[0]);
        let w = input([4.0, 5.0, 6.0], tracked[1]);
        let y = record::<Flex, NoCheckpointing, _, 2>(Product, [x.clone(), w.clone()]);
        let out = values(Ad::inner(y.clone()));
        if !tracked.contains(&true) {
            return (out, [None, None]);
        }
        let grads = Ad::backward(Ad::float_sum(y));
        (out, [&x, &w].map(|t| Ad::grad(t, &grads).map(values)))
    }

    #[test]
    fn gradients_reach_the_tracked_inputs_from_what_was_kept() {
        let (x, w) = (vec![1.0, 2.0, 3.0], vec![4.0, 5.0, 6.0]);
        let y = vec![4.0, 10.0, 18.0];
        assert_eq!(product([false, false]), (y.clone(), [None, None]));
        assert_eq!(product([true, false]), (y.clone(), [Some(w.clone()), None]));
        assert_eq!(product([false, true]), (y.clone(), [None, Some(x.clone())]));
        assert_eq!(product([true, true]), (y, [Some(w), Some(x)]));
    }
}
