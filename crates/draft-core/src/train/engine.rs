//! The checkpointed differentiable sampler and the DRaFT family of training objectives.
//!
//! Forward: the DDIM chain runs without a graph and keeps only its latents `x_0 … x_T`
//! (plus the step noise when η > 0). Backward: the reward's gradient with respect to the final
//! latents comes from one differentiable decode + reward; then, from the last step back to the
//! first one that carries gradient, each step is recomputed *with* a graph (both CFG halves of
//! the UNet in one call), and the vector–Jacobian product `Σ (∂x_{i+1}/∂·)ᵀ g_{i+1}` is taken by
//! back-propagating the scalar `⟨x_{i+1}, g_{i+1}⟩`. That yields the LoRA gradients of the step
//! (accumulated) and `g_i`, the gradient with respect to the step's input. Peak memory is one
//! step's activations plus the stored latents, whatever the number of steps back-propagated.
//!
//! The LoRA weights enter as autodiff leaves scoped into the pipeline's [`LoraTable`] for the
//! differentiable recomputations ([`LoraTable::scoped_params`]: taken back when the pass ends,
//! however it ends) and as plain tensors for everything else; the base weights are plain
//! tensors, constants to autodiff.
//!
//! [`LoraTable`]: crate::model::lora::LoraTable
//! [`LoraTable::scoped_params`]: crate::model::lora::LoraTable::scoped_params

use burn::prelude::*;

use crate::error::{Error, Result};
use crate::model::pipeline::{Pipeline, PromptTokens, SizeConditioning};
use crate::model::sampler::Conditioning;
use crate::model::schedule::{Ddim, StepCoefficients};
use crate::noise::NoiseRng;
use crate::reward::builtin::WeightedReward;

/// A training objective of the DRaFT paper or one of its baselines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// DRaFT-K: back-propagate through the last `k` sampling steps (`k = steps`: full DRaFT).
    DraftK { k: usize },
    /// DRaFT-LV: sample x₀ without gradient, then `n` times re-noise it to the last sampling
    /// timestep and denoise one step with gradient; the reward is the average.
    DraftLv { n: usize },
    /// ReFL: sample without gradient until `r` steps remain, `r` uniform in
    /// `[min_remaining, max_remaining]`, then predict x̂₀ in one step with gradient.
    Refl {
        min_remaining: usize,
        max_remaining: usize,
    },
    /// AlignProp's randomized truncation: DRaFT-K with K uniform in `[k_min, k_max]`.
    AlignProp { k_min: usize, k_max: usize },
}

impl Method {
    /// Refuses settings no sampling chain of `steps` steps can honour.
    pub fn validate(&self, steps: usize) -> Result<()> {
        let bad = |m: String| Err(Error::Input(m));
        match *self {
            Method::DraftK { k } if k == 0 || k > steps => bad(format!(
                "K must be between 1 and the number of sampling steps ({steps}), got {k}"
            )),
            Method::DraftLv { n: 0 } => bad("--lv-samples must be at least 1".into()),
            Method::Refl {
                min_remaining,
                max_remaining,
            } if min_remaining == 0 || min_remaining > max_remaining || max_remaining > steps => {
                bad(format!(
                    "ReFL needs 1 ≤ t-min ≤ t-max ≤ steps ({steps}), got {min_remaining}..={max_remaining}"
                ))
            }
            Method::AlignProp { k_min, k_max } if k_min == 0 || k_min > k_max || k_max > steps => {
                bad(format!(
                    "AlignProp needs 1 ≤ k-min ≤ k-max ≤ steps ({steps}), got {k_min}..={k_max}"
                ))
            }
            _ => Ok(()),
        }
    }
}

/// What the random draws of one objective evaluation are.
pub struct Draws {
    /// The initial latents x_T.
    pub x_t: Tensor<4>,
    /// DDIM step noise for η > 0, one per step (drawn lazily from this stream).
    pub step_noise: NoiseRng,
    /// DRaFT-LV's re-noising noises (one per sample), or `None` to draw from `step_noise`.
    pub lv_noise: Option<Vec<Tensor<4>>>,
    /// A uniform draw in [0, 1) for the random truncation of ReFL / AlignProp.
    pub truncation: f64,
}

/// One evaluation of a training objective and its gradient.
pub struct Evaluation {
    /// `−mean over the batch of the (averaged) reward`.
    pub loss: f32,
    /// The reward of every image (for DRaFT-LV: averaged over the `n` re-noised samples).
    pub rewards: Vec<f32>,
    /// ∂loss/∂θ for the trainable LoRA parameters, in [`LoraTable::params`] order.
    ///
    /// [`LoraTable::params`]: crate::model::lora::LoraTable::params
    pub grads: Vec<Tensor<2>>,
    /// The number of sampling steps back-propagated through.
    pub k: usize,
    /// Differentiable UNet evaluations (each on both CFG halves).
    pub unet_grad_calls: usize,
}

/// Prompt embeddings of a batch, kept plain; leaves are made from them when the text encoder
/// is trained.
pub struct Prompts {
    /// The prompt of each image (what prompt-aware rewards score against).
    pub texts: Vec<String>,
    pub ids: PromptTokens,
    /// The negative prompt's ([`Pipeline::tokenize_negative`]).
    pub uncond_ids: PromptTokens,
    pub guidance: f64,
    /// SDXL's size ids (other models ignore them).
    pub size: SizeConditioning,
}

impl Prompts {
    /// The batch `texts` against `negative` (empty: no negative prompt) at `guidance`.
    pub fn new(
        pipeline: &Pipeline,
        texts: &[String],
        negative: &str,
        guidance: f64,
    ) -> Result<Self> {
        Ok(Self {
            texts: texts.to_vec(),
            ids: pipeline.tokenize_all(texts)?,
            uncond_ids: pipeline.tokenize_negative(negative)?,
            guidance,
            size: SizeConditioning::default(),
        })
    }
}

/// Where an objective evaluation is: `done` of `total` sampling steps (without gradient) or
/// back-propagated steps (`backward`), for progress bars.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub phase: Phase,
    pub done: usize,
    pub total: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Sampling,
    Backward,
    /// Sampling the fixed evaluation set (steps of its DDIM chain).
    Evaluating,
}

impl Phase {
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Sampling => "sampling",
            Phase::Backward => "backward",
            Phase::Evaluating => "evaluating",
        }
    }
}

/// Called after every sampling step and every back-propagated step; returning `false` stops
/// the evaluation with [`Error::Cancelled`] (nothing has been updated yet).
pub type ProgressFn = dyn Fn(&Progress) -> bool;

/// The sampler of one training run: a pipeline with trainable LoRA slots, a DDIM schedule and
/// a reward.
pub struct Engine<'p> {
    pub pipeline: &'p Pipeline,
    pub ddim: Ddim,
    pub eta: f64,
    pub reward: &'p WeightedReward,
    /// Whether any trainable adapter sits in the text encoder (then gradients flow into the
    /// prompt embeddings too).
    pub text_lora: bool,
    /// Progress and cancellation ([`ProgressFn`]).
    pub progress: Option<&'p ProgressFn>,
    /// Whether the step an objective back-propagates first keeps its graph while its output is
    /// decoded and scored; `None`: when the latents are at most
    /// [`KEEP_STEP_GRAPH_MAX_LATENT_PIXELS`]. Either way the gradients are the same.
    pub keep_step_graph: Option<bool>,
}

/// Gradient accumulator over the LoRA parameters.
struct Accumulator {
    leaves: Vec<Tensor<2>>,
    sums: Vec<Option<Tensor<2>>>,
}

impl Accumulator {
    fn add(&mut self, grads: &burn::tensor::Gradients, weight: f64) {
        for (leaf, sum) in self.leaves.iter().zip(self.sums.iter_mut()) {
            if let Some(g) = leaf.grad(grads) {
                let g = if weight == 1.0 { g } else { g * weight };
                *sum = Some(match sum.take() {
                    Some(s) => s + g,
                    None => g,
                });
            }
        }
    }

    fn finish(self, plain: &[Tensor<2>]) -> Vec<Tensor<2>> {
        self.sums
            .into_iter()
            .zip(plain)
            .map(|(s, p)| s.unwrap_or_else(|| p.zeros_like()))
            .collect()
    }
}

/// The context of a batch stacked for guidance, with SDXL's added conditions.
fn conditioning(
    cond: &Tensor<3>,
    uncond: &Tensor<3>,
    added: &Option<(Tensor<2>, Tensor<2>)>,
    guidance: f64,
) -> Conditioning {
    let c = Conditioning::new(cond.clone(), uncond.clone(), guidance);
    match added {
        Some((a, u)) => c.with_added(a.clone(), u.clone()),
        None => c,
    }
}

fn add_opt(acc: &mut Option<Tensor<3>>, g: Option<Tensor<3>>) {
    if let Some(g) = g {
        *acc = Some(match acc.take() {
            Some(a) => a + g,
            None => g,
        });
    }
}

impl<'p> Engine<'p> {
    pub fn new(
        pipeline: &'p Pipeline,
        steps: usize,
        eta: f64,
        reward: &'p WeightedReward,
    ) -> Result<Self> {
        let ddim = Ddim::new(&pipeline.scheduler, steps)?;
        let text_lora = pipeline
            .lora
            .entries()
            .iter()
            .any(|e| e.key.starts_with("text_encoder") && !e.adapters.is_empty());
        if text_lora && pipeline.is_sdxl() {
            return Err(Error::Input(
                "training LoRA on SDXL's text towers is not supported yet: use \
                 --lora-targets without `text`"
                    .into(),
            ));
        }
        Ok(Self {
            pipeline,
            ddim,
            eta,
            reward,
            text_lora,
            progress: None,
            keep_step_graph: None,
        })
    }

    pub fn steps(&self) -> usize {
        self.ddim.timesteps.len()
    }

    /// Reports progress; `Err(Cancelled)` when the callback asks to stop.
    fn report(&self, phase: Phase, done: usize, total: usize) -> Result<()> {
        match self.progress {
            Some(f) if !f(&Progress { phase, done, total }) => Err(Error::Cancelled),
            _ => Ok(()),
        }
    }

    /// Runs `method` on one batch and returns the loss, rewards and LoRA gradients.
    /// The pipeline's LoRA table is as it was on exit, whatever the exit (an error or a panic
    /// included): the leaves are only ever scoped in.
    pub async fn evaluate(
        &self,
        method: Method,
        prompts: &Prompts,
        mut draws: Draws,
    ) -> Result<Evaluation> {
        let n = self.steps();
        method.validate(n)?;
        let [_, _, h, w] = draws.x_t.dims();
        let keep_graph = self
            .keep_step_graph
            .unwrap_or(h * w <= KEEP_STEP_GRAPH_MAX_LATENT_PIXELS);
        let f = self.pipeline.downscale();
        let mut pass = Pass::new(self, prompts, keep_graph, [h * f, w * f]);

        // Forward without a graph, keeping the latents (ReFL stops where its x̂₀ is predicted).
        let stop = match method {
            Method::Refl {
                min_remaining,
                max_remaining,
            } => n - uniform_in(draws.truncation, min_remaining, max_remaining),
            _ => n,
        };
        // DRaFT-K back-propagates the last step first: a pending step (to x when K > 1).
        let k = match method {
            Method::DraftK { k } => Some(k),
            Method::AlignProp { k_min, k_max } => Some(uniform_in(draws.truncation, k_min, k_max)),
            _ => None,
        };
        // Steps before `grad_from` are never back-propagated: they may run in f16.
        let grad_from = k.map_or(stop, |k| n - k);
        let chain = pass.sample_chain(&mut draws, stop, grad_from, k.map(|k| k > 1))?;

        let outcome = match method {
            Method::DraftK { .. } | Method::AlignProp { .. } => {
                pass.draft_k(chain, k.expect("drawn above")).await?
            }
            Method::DraftLv { n: samples } => pass.draft_lv(&chain, &mut draws, samples).await?,
            Method::Refl { .. } => pass.refl(&chain).await?,
        };
        let unet_grad_calls = pass.grad_calls;
        let grads = pass.finish();
        Ok(Evaluation {
            loss: outcome.loss,
            rewards: outcome.rewards,
            grads,
            k: outcome.k,
            unet_grad_calls,
        })
    }

    /// One sampling step (or, with `to_x0`, the one-step x̂₀ prediction of ReFL).
    fn step(
        &self,
        i: usize,
        x: Tensor<4>,
        cond: &Conditioning,
        noise: Option<Tensor<4>>,
        to_x0: bool,
    ) -> Tensor<4> {
        let mut c = self.ddim.coefficients(i, self.eta);
        if to_x0 {
            c = StepCoefficients {
                alpha_prod_prev: 1.0,
                sigma: 0.0,
                prev_timestep: None,
                ..c
            };
        }
        let out = cond.model_output(&self.pipeline.unet, x.clone(), c.timestep as f32);
        self.ddim.step(&c, out, x, noise)
    }

    /// Decodes `z`, scores it and returns `(∂(w·loss)/∂z, rewards, loss)`. The decode is
    /// checkpointed ([`Pipeline::decode_chain`]): it runs without a graph, the reward with one,
    /// and the decoder's vector–Jacobian product is taken one resnet at a time — at 512² the
    /// whole decoder's graph would be gigabytes.
    async fn reward_grad(
        &self,
        z: Tensor<4>,
        weight: f64,
        texts: &[String],
    ) -> Result<(Tensor<4>, Vec<f32>, f32)> {
        let decoder = self.pipeline.decode_chain();
        let (images, kept) = decoder.forward(z);
        let images = images.autodiff().require_grad();
        let rewards = self.reward.score(images.clone(), texts)?;
        let loss = -rewards.clone().mean();
        let (values, _) = crate::read_f32(rewards.clone().without_autodiff()).await?;
        let loss_value = crate::read_f32(loss.clone().without_autodiff()).await?.0[0];
        let grads = (loss * weight).backward();
        let g = images.grad(&grads).ok_or_else(|| {
            Error::Device("the reward has no gradient with respect to the images".into())
        })?;
        drop(grads);
        let g = decoder.vjp(kept, g, |_| {})?;
        Ok((g, values, loss_value))
    }
}

/// `lo + ⌊u·(hi − lo + 1)⌋` for `u` uniform in [0, 1): uniform on `lo..=hi` (clamped, so
/// `u` = 1 − ε stays in range).
pub fn uniform_in(u: f64, lo: usize, hi: usize) -> usize {
    lo + ((u * (hi - lo + 1) as f64) as usize).min(hi - lo)
}

/// The latents of the chain sampled without a graph, and the step noises (η > 0) to reuse in
/// the backward.
struct Chain {
    latents: Vec<Tensor<4>>,
    noises: Vec<Option<Tensor<4>>>,
    /// The last step as a pending one (DRaFT-K's first back-propagated step), when asked.
    last: Option<Pending>,
}

/// Latents up to this many pixels (32×32: SD-1.x at 256²) keep the graph of the step an objective
/// back-propagates first while its output is decoded and scored ([`RecordedStep`]), which saves
/// one UNet call per back-propagated sample. Larger ones recompute it: at 64×64 (512²) keeping it
/// beside the checkpointed decode raised a DRaFT-1 step's peak by about 2 GB (f32, SD-1.4's
/// architecture, docs/benchmarks.md), where at 32×32 the peak did not move.
pub const KEEP_STEP_GRAPH_MAX_LATENT_PIXELS: usize = 32 * 32;

/// A sampling step whose output's gradient is known only after its output is decoded and scored.
/// (A few per training step: the variants' sizes — tensor handles — do not matter.)
#[allow(clippy::large_enum_variant)]
enum Pending {
    /// Run once with its graph ([`Pass::finish_step`] back-propagates it).
    Recorded(RecordedStep),
    /// Run without a graph, recomputed with one when the gradient is known.
    Recompute {
        i: usize,
        x: Tensor<4>,
        noise: Option<Tensor<4>>,
        need_x: bool,
        to_x0: bool,
    },
}

/// A sampling step run with its graph, back-propagated when its output's gradient is known
/// ([`Pass::finish_step`]).
struct RecordedStep {
    i: usize,
    recorded: crate::memory::checkpoint::Recorded,
    /// The prompt-embedding leaves it used (text-encoder LoRA).
    c_leaf: Option<Tensor<3>>,
    u_leaf: Option<Tensor<3>>,
}

/// What one objective yields besides the gradients.
struct Outcome {
    rewards: Vec<f32>,
    loss: f32,
    k: usize,
}

/// The state of one [`Engine::evaluate`]: the conditioning, the LoRA leaves and the gradients
/// accumulated so far.
struct Pass<'e, 'p> {
    engine: &'e Engine<'p>,
    prompts: &'e Prompts,
    /// Plain prompt embeddings (constants, or where text-encoder gradients are taken).
    cond: Tensor<3>,
    uncond: Tensor<3>,
    /// SDXL's added conditions of `cond` and `uncond`.
    added: Option<(Tensor<2>, Tensor<2>)>,
    /// The same, stacked for CFG, for the passes without gradient.
    plain: Conditioning,
    /// `plain` in the pipeline's [`sampling_dtype`](Pipeline::sampling_dtype), for the steps
    /// that are never back-propagated.
    sampling: Conditioning,
    /// The LoRA parameters as plain tensors (what the table holds outside the scopes).
    params: Vec<Tensor<2>>,
    acc: Accumulator,
    cond_grads: (Option<Tensor<3>>, Option<Tensor<3>>),
    grad_calls: usize,
    /// Whether steps awaiting their gradient keep their graph ([`Pending`]).
    keep_graph: bool,
}

impl<'e, 'p> Pass<'e, 'p> {
    fn new(
        engine: &'e Engine<'p>,
        prompts: &'e Prompts,
        keep_graph: bool,
        image: [usize; 2],
    ) -> Self {
        let pipeline = engine.pipeline;
        let params = pipeline.lora.params();
        let leaves: Vec<Tensor<2>> = params
            .iter()
            .map(|p| p.clone().autodiff().require_grad())
            .collect();
        let cond = pipeline.encode_tokens(&prompts.ids);
        let uncond = pipeline.encode_tokens(&prompts.uncond_ids);
        let added = pipeline
            .added_conditions(&cond, &prompts.size, image)
            .zip(pipeline.added_conditions(&uncond, &prompts.size, image));
        let (cond, uncond) = (cond.hidden, uncond.hidden);
        let plain = conditioning(&cond, &uncond, &added, prompts.guidance);
        let sampling = plain.clone().with_dtype(pipeline.sampling_dtype);
        Self {
            engine,
            prompts,
            cond,
            uncond,
            added,
            plain,
            sampling,
            acc: Accumulator {
                sums: vec![None; leaves.len()],
                leaves,
            },
            params,
            cond_grads: (None, None),
            grad_calls: 0,
            keep_graph,
        }
    }

    fn shape_device(draws: &Draws) -> ([usize; 4], Device) {
        (draws.x_t.dims(), draws.x_t.device())
    }

    /// The step noise of the next step (η > 0), from the draws' stream.
    fn next_noise(&self, draws: &mut Draws) -> Option<Tensor<4>> {
        let (shape, device) = Self::shape_device(draws);
        (self.engine.eta > 0.0).then(|| draws.step_noise.randn(shape, &device))
    }

    /// Samples steps `0..stop` without a graph, those before `grad_from` in the sampling dtype;
    /// with `last_needs_x` given, the last one as a pending step ([`Self::start_step`];
    /// back-propagated to its input when it says so).
    fn sample_chain(
        &self,
        draws: &mut Draws,
        stop: usize,
        grad_from: usize,
        last_needs_x: Option<bool>,
    ) -> Result<Chain> {
        let mut latents = vec![draws.x_t.clone()];
        let mut noises = Vec::with_capacity(stop);
        let mut last = None;
        for i in 0..stop {
            let z = self.next_noise(draws);
            let x = latents[i].clone();
            let x = match last_needs_x {
                Some(need_x) if i + 1 == stop => {
                    let (y, pending) = self.start_step(i, x, z.clone(), need_x, false);
                    last = Some(pending);
                    y
                }
                _ => {
                    let cond = if i < grad_from {
                        &self.sampling
                    } else {
                        &self.plain
                    };
                    self.engine.step(i, x, cond, z.clone(), false)
                }
            };
            noises.push(z);
            latents.push(x);
            self.engine.report(Phase::Sampling, i + 1, stop)?;
        }
        Ok(Chain {
            latents,
            noises,
            last,
        })
    }

    /// DRaFT-K (and AlignProp's drawn K): the reward's gradient at x₀, back through the last
    /// `k` steps.
    async fn draft_k(&mut self, mut chain: Chain, k: usize) -> Result<Outcome> {
        let n = self.engine.steps();
        let (mut g, rewards, loss) = self
            .engine
            .reward_grad(chain.latents[n].clone(), 1.0, &self.prompts.texts)
            .await?;
        for i in (n - k..n).rev() {
            let gx = match chain.last.take() {
                Some(pending) => self.finish_pending(pending, g)?,
                None => {
                    let x = chain.latents[i].clone();
                    self.backprop_step(i, x, chain.noises[i].clone(), g, i > n - k, false)?
                }
            };
            self.engine.report(Phase::Backward, n - i, k)?;
            match gx {
                Some(gx) => g = gx,
                None => break,
            }
        }
        Ok(Outcome { rewards, loss, k })
    }

    /// DRaFT-LV: `samples` re-noisings of x₀ to the last timestep, each denoised one step with
    /// gradient; rewards and loss averaged.
    async fn draft_lv(
        &mut self,
        chain: &Chain,
        draws: &mut Draws,
        samples: usize,
    ) -> Result<Outcome> {
        let engine = self.engine;
        let n = engine.steps();
        let last = n - 1;
        let a = engine.ddim.coefficients(last, engine.eta).alpha_prod_t;
        let x0 = chain.latents[n].clone();
        let (shape, device) = Self::shape_device(draws);
        let weight = 1.0 / samples as f64;
        let mut rewards = vec![0.0; shape[0]];
        let mut loss = 0.0;
        for j in 0..samples {
            let eps = match &draws.lv_noise {
                Some(v) => v.get(j).cloned().ok_or_else(|| {
                    Error::Input(format!("DRaFT-LV needs {samples} noises, got {}", v.len()))
                })?,
                None => draws.step_noise.randn(shape, &device),
            };
            let x_t = x0.clone() * a.sqrt() + eps * (1.0 - a).sqrt();
            let z = self.next_noise(draws);
            let (y, pending) = self.start_step(last, x_t, z, false, false);
            let (g, r, l) = engine.reward_grad(y, weight, &self.prompts.texts).await?;
            for (s, v) in rewards.iter_mut().zip(&r) {
                *s += v * weight as f32;
            }
            loss += l * weight as f32;
            self.finish_pending(pending, g)?;
            engine.report(Phase::Backward, j + 1, samples)?;
        }
        Ok(Outcome {
            rewards,
            loss,
            k: 1,
        })
    }

    /// ReFL: x̂₀ predicted in one step with gradient from where the chain stopped.
    async fn refl(&mut self, chain: &Chain) -> Result<Outcome> {
        let stop = chain.latents.len() - 1;
        let x = chain.latents[stop].clone();
        let (x0, pending) = self.start_step(stop, x, None, false, true);
        let (g, rewards, loss) = self
            .engine
            .reward_grad(x0, 1.0, &self.prompts.texts)
            .await?;
        self.finish_pending(pending, g)?;
        self.engine.report(Phase::Backward, 1, 1)?;
        Ok(Outcome {
            rewards,
            loss,
            k: 1,
        })
    }

    /// Recomputes step `i` from `x` with a graph and back-propagates `⟨x_{i+1}, g⟩`: LoRA
    /// gradients go to the accumulator, prompt-embedding gradients to `cond_grads`; with
    /// `need_x`, returns ∂/∂x (an error if the graph does not reach `x`).
    fn backprop_step(
        &mut self,
        i: usize,
        x: Tensor<4>,
        noise: Option<Tensor<4>>,
        g: Tensor<4>,
        need_x: bool,
        to_x0: bool,
    ) -> Result<Option<Tensor<4>>> {
        let rec = self.record_step(i, x, noise, need_x, to_x0);
        self.finish_step(rec, g)
    }

    /// Step `i` from `x` with a graph from the LoRA leaves (and the prompt embeddings, with
    /// text-encoder LoRA; from `x` too with `need_x`).
    fn record_step(
        &self,
        i: usize,
        x: Tensor<4>,
        noise: Option<Tensor<4>>,
        need_x: bool,
        to_x0: bool,
    ) -> RecordedStep {
        let engine = self.engine;
        let lora = &engine.pipeline.lora;
        let leaf = |t: &Tensor<3>| {
            engine
                .text_lora
                .then(|| t.clone().autodiff().require_grad())
        };
        let (c_leaf, u_leaf) = (leaf(&self.cond), leaf(&self.uncond));
        let conditioning = conditioning(
            c_leaf.as_ref().unwrap_or(&self.cond),
            u_leaf.as_ref().unwrap_or(&self.uncond),
            &self.added,
            self.prompts.guidance,
        );
        let leaves = &self.acc.leaves;
        let recorded = crate::memory::checkpoint::Recorded::new(
            |x| {
                let _leaves = lora.scoped_params(leaves);
                engine.step(i, x, &conditioning, noise, to_x0)
            },
            x,
            need_x,
        );
        RecordedStep {
            i,
            recorded,
            c_leaf,
            u_leaf,
        }
    }

    /// Step `i` from `x`, whose output's gradient comes later: with its graph when the pass
    /// keeps graphs, else without (recomputed by [`Self::finish_pending`]).
    fn start_step(
        &self,
        i: usize,
        x: Tensor<4>,
        noise: Option<Tensor<4>>,
        need_x: bool,
        to_x0: bool,
    ) -> (Tensor<4>, Pending) {
        if self.keep_graph {
            let rec = self.record_step(i, x, noise, need_x, to_x0);
            (rec.recorded.output(), Pending::Recorded(rec))
        } else {
            let y = self
                .engine
                .step(i, x.clone(), &self.plain, noise.clone(), to_x0);
            let pending = Pending::Recompute {
                i,
                x,
                noise,
                need_x,
                to_x0,
            };
            (y, pending)
        }
    }

    /// Back-propagates `⟨output, g⟩` through a [`Self::start_step`]; `∂/∂x` when it was asked.
    fn finish_pending(&mut self, pending: Pending, g: Tensor<4>) -> Result<Option<Tensor<4>>> {
        match pending {
            Pending::Recorded(rec) => self.finish_step(rec, g),
            Pending::Recompute {
                i,
                x,
                noise,
                need_x,
                to_x0,
            } => self.backprop_step(i, x, noise, g, need_x, to_x0),
        }
    }

    /// Back-propagates `⟨x_{i+1}, g⟩` through a recorded step (see [`Self::backprop_step`]).
    fn finish_step(&mut self, rec: RecordedStep, g: Tensor<4>) -> Result<Option<Tensor<4>>> {
        let i = rec.i;
        let (gx, grads) = rec.recorded.vjp(|| format!("sampling step {i}"), g)?;
        self.grad_calls += 1;
        self.acc.add(&grads, 1.0);
        if let Some(c) = &rec.c_leaf {
            add_opt(&mut self.cond_grads.0, c.grad(&grads));
        }
        if let Some(u) = &rec.u_leaf {
            add_opt(&mut self.cond_grads.1, u.grad(&grads));
        }
        Ok(gx)
    }

    /// Prompt-embedding gradients → text-encoder LoRA gradients; the accumulated LoRA
    /// gradients in parameter order.
    fn finish(mut self) -> Vec<Tensor<2>> {
        let engine = self.engine;
        if engine.text_lora {
            let leaves = engine.pipeline.lora.scoped_params(&self.acc.leaves);
            let te = &engine.pipeline.text_encoder;
            let mut total: Option<Tensor<1>> = None;
            for (g, ids) in [
                (self.cond_grads.0.take(), &self.prompts.ids),
                (self.cond_grads.1.take(), &self.prompts.uncond_ids),
            ] {
                if let Some(g) = g
                    && !ids.zeros
                {
                    let t = (te.forward(ids.ids.clone()) * g).sum();
                    total = Some(match total {
                        Some(s) => s + t,
                        None => t,
                    });
                }
            }
            drop(leaves);
            if let Some(total) = total
                && total.is_tracked()
            {
                self.acc.add(&total.backward(), 1.0);
            }
        }
        self.acc.finish(&self.params)
    }
}
