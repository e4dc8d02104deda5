//! Differentiable rewards on images `[B, 3, H, W]` with values in [0, 1].
//!
//! Weight-free rewards live here; a user adds their own by implementing [`Reward`].
//! Every formula is written out in `docs/rewards.md` and checked against PyTorch autograd
//! (`tests/fixtures/draft/rewards.safetensors`).

use burn::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Added under square roots so that their gradient stays finite at zero.
pub const EPS: f64 = 1e-8;

/// A differentiable score per image: `[B, 3, H, W]` in [0, 1] → `[B]`, higher is better.
/// `prompts` holds the prompt each image was sampled from (prompt-aware rewards such as CLIP
/// score read it; the others ignore it).
pub trait Reward: Send + Sync {
    fn name(&self) -> &str;
    /// An error, not a panic, for what the images or prompts cannot be scored on (a prompt
    /// the reward's tokenizer refuses, a prompt count that is not the image count).
    fn score(&self, images: Tensor<4>, prompts: &[String]) -> Result<Tensor<1>>;
    /// Whether `score` needs the prompts (one per image).
    fn needs_prompts(&self) -> bool {
        false
    }
}

/// Per-image mean over channels and pixels: `[B, C, H, W]` → `[B]`.
fn mean_chw(x: Tensor<4>) -> Tensor<1> {
    let b = x.dims()[0];
    x.reshape([b as i64, -1]).mean_dim(1).reshape([b])
}

/// Per-image population variance over pixels of a `[B, 1, H, W]` map.
fn var_hw(x: Tensor<4>) -> Tensor<1> {
    let centered = x.clone() - x.mean_dim(2).mean_dim(3);
    mean_chw(centered.square())
}

fn channel(images: &Tensor<4>, c: usize) -> Tensor<4> {
    images.clone().narrow(1, c, 1)
}

/// Mean brightness: the mean over channels and pixels.
pub struct Brightness;

impl Reward for Brightness {
    fn name(&self) -> &str {
        "brightness"
    }
    fn score(&self, images: Tensor<4>, _prompts: &[String]) -> Result<Tensor<1>> {
        Ok(mean_chw(images))
    }
}

/// Hasler & Süsstrunk (2003) colourfulness on [0, 1] values:
/// `rg = R − G`, `yb = (R + G)/2 − B`,
/// `sqrt(var(rg) + var(yb) + ε) + 0.3·sqrt(mean(rg)² + mean(yb)² + ε)`.
pub struct Colorfulness;

impl Reward for Colorfulness {
    fn name(&self) -> &str {
        "colorfulness"
    }
    fn score(&self, images: Tensor<4>, _prompts: &[String]) -> Result<Tensor<1>> {
        let (r, g, b) = (
            channel(&images, 0),
            channel(&images, 1),
            channel(&images, 2),
        );
        let rg = r.clone() - g.clone();
        let yb = (r + g) * 0.5 - b;
        let sigma = (var_hw(rg.clone()) + var_hw(yb.clone()) + EPS).sqrt();
        let mu = (mean_chw(rg).square() + mean_chw(yb).square() + EPS).sqrt();
        Ok(sigma + mu * 0.3)
    }
}

/// RMS contrast: the standard deviation of the luma `0.299R + 0.587G + 0.114B`.
pub struct Contrast;

impl Reward for Contrast {
    fn name(&self) -> &str {
        "contrast"
    }
    fn score(&self, images: Tensor<4>, _prompts: &[String]) -> Result<Tensor<1>> {
        let y =
            channel(&images, 0) * 0.299 + channel(&images, 1) * 0.587 + channel(&images, 2) * 0.114;
        Ok((var_hw(y) + EPS).sqrt())
    }
}

/// Negative total variation (mean absolute difference of vertical and horizontal
/// neighbours): a differentiable stand-in for JPEG compressibility.
pub struct Smoothness;

impl Reward for Smoothness {
    fn name(&self) -> &str {
        "smoothness"
    }
    fn score(&self, images: Tensor<4>, _prompts: &[String]) -> Result<Tensor<1>> {
        let [_, _, h, w] = images.dims();
        let dy = images.clone().narrow(2, 1, h - 1) - images.clone().narrow(2, 0, h - 1);
        let dx = images.clone().narrow(3, 1, w - 1) - images.narrow(3, 0, w - 1);
        Ok(-(mean_chw(dy.abs()) + mean_chw(dx.abs())))
    }
}

/// Left–right mirror symmetry: minus the mean squared difference to the flipped image.
pub struct Symmetry;

impl Reward for Symmetry {
    fn name(&self) -> &str {
        "symmetry"
    }
    fn score(&self, images: Tensor<4>, _prompts: &[String]) -> Result<Tensor<1>> {
        let flipped = images.clone().flip([3]);
        Ok(-mean_chw((images - flipped).square()))
    }
}

/// Closeness to a colour: minus the mean squared distance of every pixel to it.
pub struct TargetColor(pub [f32; 3]);

impl Reward for TargetColor {
    fn name(&self) -> &str {
        "target-color"
    }
    fn score(&self, images: Tensor<4>, _prompts: &[String]) -> Result<Tensor<1>> {
        let device = images.device();
        let c = Tensor::<1>::from_floats(self.0, &device).reshape([1, 3, 1, 1]);
        Ok(-mean_chw((images - c).square()))
    }
}

/// Names of the built-in rewards.
pub const BUILTIN: [&str; 6] = [
    "brightness",
    "colorfulness",
    "contrast",
    "smoothness",
    "symmetry",
    "target-color",
];

/// Learned rewards (`reward_models`): they need weight files, so the caller builds them.
pub const LEARNED: [&str; 4] = ["laion-aesthetic", "clip-score", "pickscore", "hpsv2"];

/// Checks that every `name=weight` spec parses and names a known reward, without building any.
pub fn check_specs(specs: &[String]) -> Result<()> {
    if specs.is_empty() {
        return Err(Error::Input("at least one reward is needed".into()));
    }
    for spec in specs {
        let (name, _) = parse_spec(spec)?;
        if !BUILTIN.contains(&name.as_str()) && !LEARNED.contains(&name.as_str()) {
            return Err(Error::Input(format!(
                "unknown reward `{name}` (rewards: {}, {})",
                BUILTIN.join(", "),
                LEARNED.join(", ")
            )));
        }
    }
    Ok(())
}

/// Options of the built-in rewards.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RewardOptions {
    /// The colour `target-color` pulls towards, RGB in [0, 1].
    pub target_color: [f32; 3],
}

impl Default for RewardOptions {
    fn default() -> Self {
        Self {
            target_color: [0.9, 0.2, 0.1],
        }
    }
}

/// A built-in reward by name.
pub fn builtin(name: &str, options: &RewardOptions) -> Result<Box<dyn Reward>> {
    Ok(match name {
        "brightness" => Box::new(Brightness),
        "colorfulness" => Box::new(Colorfulness),
        "contrast" => Box::new(Contrast),
        "smoothness" => Box::new(Smoothness),
        "symmetry" => Box::new(Symmetry),
        "target-color" => Box::new(TargetColor(options.target_color)),
        other => {
            return Err(Error::Input(format!(
                "unknown reward `{other}` (built-in rewards: {})",
                BUILTIN.join(", ")
            )));
        }
    })
}

/// `name=weight` (weight defaults to 1) → (name, weight).
pub fn parse_spec(spec: &str) -> Result<(String, f64)> {
    let (name, weight) = match spec.split_once('=') {
        Some((n, w)) => {
            let w: f64 = w
                .trim()
                .parse()
                .map_err(|_| Error::Input(format!("reward `{spec}`: `{w}` is not a number")))?;
            (n.trim(), w)
        }
        None => (spec.trim(), 1.0),
    };
    if !weight.is_finite() {
        return Err(Error::Input(format!(
            "reward `{spec}`: the weight must be finite"
        )));
    }
    Ok((name.to_string(), weight))
}

/// A weighted sum of rewards: `Σ wᵢ·rᵢ(image)`.
pub struct WeightedReward {
    pub terms: Vec<(Box<dyn Reward>, f64)>,
}

impl WeightedReward {
    /// From `name=weight` specs of built-in rewards.
    pub fn from_specs(specs: &[String], options: &RewardOptions) -> Result<Self> {
        if specs.is_empty() {
            return Err(Error::Input("at least one reward is needed".into()));
        }
        let mut terms = Vec::new();
        for spec in specs {
            let (name, weight) = parse_spec(spec)?;
            terms.push((builtin(&name, options)?, weight));
        }
        Ok(Self { terms })
    }

    /// From `name=weight` specs; names that are not built in are asked of `learned`.
    pub fn from_specs_with(
        specs: &[String],
        options: &RewardOptions,
        learned: &mut dyn FnMut(&str) -> Result<Box<dyn Reward>>,
    ) -> Result<Self> {
        check_specs(specs)?;
        let mut terms = Vec::new();
        for spec in specs {
            let (name, weight) = parse_spec(spec)?;
            let reward = if BUILTIN.contains(&name.as_str()) {
                builtin(&name, options)?
            } else {
                learned(&name)?
            };
            terms.push((reward, weight));
        }
        Ok(Self { terms })
    }

    pub fn new(terms: Vec<(Box<dyn Reward>, f64)>) -> Self {
        Self { terms }
    }

    /// `[B, 3, H, W]` and the prompt of each image → `[B]`.
    pub fn score(&self, images: Tensor<4>, prompts: &[String]) -> Result<Tensor<1>> {
        let mut total: Option<Tensor<1>> = None;
        for ((_, weight), r) in self.terms.iter().zip(self.score_terms(images, prompts)?) {
            let r = r * *weight;
            total = Some(match total {
                Some(t) => t + r,
                None => r,
            });
        }
        total.ok_or_else(|| Error::Input("at least one reward is needed".into()))
    }

    /// Each term's unweighted score `[B]`, in the order of `terms` (for reports).
    pub fn score_terms(&self, images: Tensor<4>, prompts: &[String]) -> Result<Vec<Tensor<1>>> {
        self.terms
            .iter()
            .map(|(reward, _)| reward.score(images.clone(), prompts))
            .collect()
    }

    /// Whether a term scores images against their prompts.
    pub fn needs_prompts(&self) -> bool {
        self.terms.iter().any(|(r, _)| r.needs_prompts())
    }

    pub fn describe(&self) -> String {
        self.terms
            .iter()
            .map(|(r, w)| format!("{}={w}", r.name()))
            .collect::<Vec<_>>()
            .join(" + ")
    }
}
