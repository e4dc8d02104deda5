//! Every setting of a training run: [`TrainConfig`], its defaults and its checks.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::lora::LoraTarget;
use crate::reward::builtin::RewardOptions;
use crate::train::engine::Method;

/// `--method`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MethodName {
    Draft,
    DraftK,
    DraftLv,
    Refl,
    Alignprop,
}

impl MethodName {
    pub const ALL: [(&'static str, MethodName); 5] = [
        ("draft", Self::Draft),
        ("draft-k", Self::DraftK),
        ("draft-lv", Self::DraftLv),
        ("refl", Self::Refl),
        ("alignprop", Self::Alignprop),
    ];

    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL
            .iter()
            .find(|(n, _)| *n == s)
            .map(|(_, m)| *m)
            .ok_or_else(|| {
                Error::Input(format!(
                    "unknown method `{s}` (expected draft, draft-k, draft-lv, refl or alignprop)"
                ))
            })
    }

    pub fn name(&self) -> &'static str {
        Self::ALL.iter().find(|(_, m)| m == self).unwrap().0
    }
}

/// `--optimizer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OptimizerName {
    Adamw,
    Sgd,
}

/// Every hyper-parameter of a training run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainConfig {
    pub method: MethodName,
    /// DRaFT-K's K.
    pub k: usize,
    /// DRaFT-LV's n.
    pub lv_samples: usize,
    /// ReFL: the number of steps remaining when x̂₀ is predicted is uniform in [t_min, t_max].
    pub t_min: usize,
    pub t_max: usize,
    /// AlignProp: K uniform in [k_min, k_max].
    pub k_min: usize,
    pub k_max: usize,
    /// `name=weight` reward terms.
    pub rewards: Vec<String>,
    pub reward_options: RewardOptions,
    pub batch: usize,
    /// Sampling steps.
    pub steps: usize,
    pub guidance: f64,
    pub eta: f64,
    pub negative_prompt: String,
    /// Optimizer updates.
    pub train_steps: usize,
    pub lr: f64,
    pub optimizer: OptimizerName,
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub adam_eps: f64,
    pub rank: usize,
    /// LoRA alpha; `None`: equal to the rank (scale 1).
    pub alpha: Option<f64>,
    pub lora_targets: Vec<LoraTarget>,
    /// Clip the global gradient norm to this value (`None`: no clipping).
    pub clip_grad_norm: Option<f64>,
    /// Batches whose gradients are averaged into one update.
    pub grad_accum: usize,
    pub seed: u64,
    /// Stop after this many non-finite updates in a row.
    pub max_bad_steps: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            method: MethodName::DraftLv,
            k: 1,
            lv_samples: 2,
            t_min: 1,
            t_max: 10,
            k_min: 1,
            k_max: 10,
            rewards: vec!["colorfulness".into()],
            reward_options: RewardOptions::default(),
            batch: 2,
            steps: 50,
            guidance: 7.5,
            eta: 0.0,
            negative_prompt: String::new(),
            train_steps: 100,
            lr: 4e-4,
            optimizer: OptimizerName::Adamw,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.999,
            adam_eps: 1e-8,
            rank: 4,
            alpha: None,
            lora_targets: vec![LoraTarget::Attn],
            clip_grad_norm: None,
            grad_accum: 1,
            seed: 0,
            max_bad_steps: 5,
        }
    }
}

impl TrainConfig {
    pub fn alpha(&self) -> f64 {
        self.alpha.unwrap_or(self.rank as f64)
    }

    /// The objective, checked against the number of sampling steps.
    pub fn method(&self) -> Result<Method> {
        let m = match self.method {
            MethodName::Draft => Method::DraftK { k: self.steps },
            MethodName::DraftK => Method::DraftK { k: self.k },
            MethodName::DraftLv => Method::DraftLv { n: self.lv_samples },
            MethodName::Refl => Method::Refl {
                min_remaining: self.t_min,
                max_remaining: self.t_max,
            },
            MethodName::Alignprop => Method::AlignProp {
                k_min: self.k_min,
                k_max: self.k_max,
            },
        };
        m.validate(self.steps)?;
        Ok(m)
    }

    /// Refuses impossible settings before any work.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::Input(m));
        if self.steps == 0 {
            return bad("--steps must be at least 1".into());
        }
        self.method()?;
        if self.rank == 0 {
            return bad("--rank must be at least 1".into());
        }
        if let Some(a) = self.alpha
            && !(a.is_finite() && a > 0.0)
        {
            return bad(format!("--alpha must be positive, got {a}"));
        }
        crate::model::files::check_batch("--batch", self.batch)?;
        // Guards against settings that would allocate without bound (a TOML `rank = 2^40`).
        for (flag, v, max) in [
            ("--steps", self.steps, 10_000),
            ("--rank", self.rank, 4096),
            ("--lv-samples", self.lv_samples, 1024),
            ("--grad-accum", self.grad_accum, 1 << 20),
        ] {
            if v > max {
                return bad(format!("{flag} must be at most {max}, got {v}"));
            }
        }
        if self.grad_accum == 0 {
            return bad("--grad-accum must be at least 1".into());
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(format!("--lr must be positive, got {}", self.lr));
        }
        if let Some(c) = self.clip_grad_norm
            && !(c.is_finite() && c > 0.0)
        {
            return bad(format!("--clip-grad-norm must be positive, got {c}"));
        }
        if !(self.eta.is_finite() && self.eta >= 0.0) {
            return bad(format!("--eta must be ≥ 0, got {}", self.eta));
        }
        if !self.guidance.is_finite() {
            return bad("--guidance must be finite".into());
        }
        if self.lora_targets.is_empty() {
            return bad("at least one LoRA target is needed".into());
        }
        if self.max_bad_steps == 0 {
            return bad("--max-bad-steps must be at least 1".into());
        }
        crate::reward::builtin::check_specs(&self.rewards)?;
        Ok(())
    }
}
