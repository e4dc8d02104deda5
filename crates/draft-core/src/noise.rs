//! Seeded Gaussian noise generated on the host, so a seed gives the same latents on every
//! backend (the backends' own RNGs differ).

use burn::prelude::*;
use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, StandardNormal};

/// A seeded standard-normal stream.
pub struct NoiseRng(StdRng);

impl NoiseRng {
    pub fn new(seed: u64) -> Self {
        Self(StdRng::seed_from_u64(seed))
    }

    pub fn randn<const D: usize>(&mut self, shape: [usize; D], device: &Device) -> Tensor<D> {
        let n = shape.iter().product();
        let values: Vec<f32> = (0..n).map(|_| StandardNormal.sample(&mut self.0)).collect();
        Tensor::from_data(TensorData::new(values, shape.to_vec()), device)
    }
}
