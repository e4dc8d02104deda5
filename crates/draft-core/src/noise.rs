//! Seeded Gaussian noise generated on the host, so a seed gives the same latents on every
//! backend (the backends' own RNGs differ).

use burn::prelude::*;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};

/// A seeded standard-normal stream, or a replay of given values.
pub struct NoiseRng(Source);

// One NoiseRng per draw stream, never in bulk: the size of the seeded variant does not matter.
#[allow(clippy::large_enum_variant)]
enum Source {
    Seeded(StdRng),
    /// The values still to be handed out, in order.
    Replay(std::vec::IntoIter<f32>),
}

impl NoiseRng {
    pub fn new(seed: u64) -> Self {
        Self(Source::Seeded(StdRng::seed_from_u64(seed)))
    }

    /// A stream that hands out `values` in order, in row-major order per draw, instead of
    /// drawing: how the tests feed a reference implementation's noises (PyTorch's DDIM step
    /// noise for η > 0) through the code paths that draw them. Drawing more than `values`
    /// holds panics.
    pub fn replay(values: Vec<f32>) -> Self {
        Self(Source::Replay(values.into_iter()))
    }

    pub fn randn<const D: usize>(&mut self, shape: [usize; D], device: &Device) -> Tensor<D> {
        let n = shape.iter().product();
        let values: Vec<f32> = match &mut self.0 {
            Source::Seeded(rng) => (0..n).map(|_| StandardNormal.sample(rng)).collect(),
            Source::Replay(rest) => {
                let v: Vec<f32> = rest.by_ref().take(n).collect();
                assert_eq!(v.len(), n, "NoiseRng::replay: the replayed noise ran out");
                v
            }
        };
        Tensor::from_data(TensorData::new(values, shape.to_vec()), device)
    }
}
