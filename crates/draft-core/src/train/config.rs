//! Every setting of a training run, in one place: [`TrainConfig`] (what a run is: the method with
//! its own parameters, the reward, sampling, optimizer and LoRA settings; its defaults, its
//! checks and their words of refusal), [`RunPolicy`] (evaluation, checkpoint and early-stop
//! cadence), [`Settings`] (the same keys, each optional, as a user writes them: a `draft train`
//! flag, a key of its `--config` TOML file, a field of the browser page's form) and [`resolve`],
//! the one layered resolution both shells call:
//!
//! defaults (of the model: [`ModelDefaults`]) ← checkpoint ← config file ← command line / page.
//!
//! Settings a user writes are the flags' names: `method = "refl"`, `t-max = 8`,
//! `reward = ["colorfulness", "smoothness=0.5"]`; the page's JSON may spell them in camelCase
//! (`tMax`, `lvSamples`, `rewards`, `targetColor`). Errors name the flag.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::lora::LoraTarget;
use crate::model::pipeline::SizeConditioning;
use crate::reward::builtin::RewardOptions;
use crate::train::engine::Method;
use crate::train::prompts::prompt_set;

/// `--method` with the parameters of that method. In a [`TrainConfig`]'s JSON the method's name
/// is the `method` key and its parameters sit beside it (`"method": "refl", "t_min": 1,
/// "t_max": 10`); keys of other methods are ignored, so checkpoints that stored every method's
/// parameters still load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "kebab-case")]
pub enum MethodConfig {
    /// Back-propagation through the whole sampling chain.
    Draft,
    /// DRaFT-K: the last `k` sampling steps.
    DraftK { k: usize },
    /// DRaFT-LV: `lv_samples` re-noised samples per image on the last step.
    DraftLv { lv_samples: usize },
    /// ReFL: the number of steps remaining when x̂₀ is predicted is uniform in
    /// `[t_min, t_max]`.
    Refl { t_min: usize, t_max: usize },
    /// AlignProp: DRaFT-K with K uniform in `[k_min, k_max]`.
    #[serde(rename = "alignprop")]
    AlignProp { k_min: usize, k_max: usize },
}

/// The method names `--method` takes.
pub const METHOD_NAMES: [&str; 5] = ["draft", "draft-k", "draft-lv", "refl", "alignprop"];

impl MethodConfig {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Draft => "draft",
            Self::DraftK { .. } => "draft-k",
            Self::DraftLv { .. } => "draft-lv",
            Self::Refl { .. } => "refl",
            Self::AlignProp { .. } => "alignprop",
        }
    }

    /// The method named `name` with its parameters from `s` (those not given: their defaults
    /// for `steps` sampling steps).
    fn from_settings(name: &str, s: &Settings, steps: usize) -> Result<Self> {
        let d = MethodDefaults::for_steps(steps);
        Ok(match name {
            "draft" => Self::Draft,
            "draft-k" => Self::DraftK {
                k: s.k.unwrap_or(d.k),
            },
            "draft-lv" => Self::DraftLv {
                lv_samples: s.lv_samples.unwrap_or(d.lv_samples),
            },
            "refl" => Self::Refl {
                t_min: s.t_min.unwrap_or(d.t_min),
                t_max: s.t_max.unwrap_or(d.t_max),
            },
            "alignprop" => Self::AlignProp {
                k_min: s.k_min.unwrap_or(d.k_min),
                k_max: s.k_max.unwrap_or(d.k_max),
            },
            other => {
                return Err(Error::Input(format!(
                    "unknown method `{other}` (expected draft, draft-k, draft-lv, refl or alignprop)"
                )));
            }
        })
    }

    /// The objective on a chain of `steps` sampling steps, checked against it.
    pub fn engine(&self, steps: usize) -> Result<Method> {
        let m = match *self {
            Self::Draft => Method::DraftK { k: steps },
            Self::DraftK { k } => Method::DraftK { k },
            Self::DraftLv { lv_samples } => Method::DraftLv { n: lv_samples },
            Self::Refl { t_min, t_max } => Method::Refl {
                min_remaining: t_min,
                max_remaining: t_max,
            },
            Self::AlignProp { k_min, k_max } => Method::AlignProp { k_min, k_max },
        };
        m.validate(steps)?;
        Ok(m)
    }

    /// Images the UNet sees per prompt and update (DRaFT-LV's re-noised copies).
    pub fn samples_per_image(&self) -> usize {
        match *self {
            Self::DraftLv { lv_samples } => lv_samples,
            _ => 1,
        }
    }
}

/// Every method's parameters at their defaults on a chain of `steps` sampling steps.
struct MethodDefaults {
    k: usize,
    lv_samples: usize,
    t_min: usize,
    t_max: usize,
    k_min: usize,
    k_max: usize,
}

impl MethodDefaults {
    fn for_steps(steps: usize) -> Self {
        Self {
            k: 1,
            lv_samples: 2,
            t_min: 1,
            t_max: 10.min(steps),
            k_min: 1,
            k_max: 10.min(steps),
        }
    }
}

/// `--optimizer`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OptimizerName {
    Adamw,
    Sgd,
}

impl OptimizerName {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Adamw => "adamw",
            Self::Sgd => "sgd",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "adamw" => Ok(Self::Adamw),
            "sgd" => Ok(Self::Sgd),
            o => Err(Error::Input(format!(
                "unknown optimizer {o:?} (expected adamw or sgd)"
            ))),
        }
    }
}

/// Every hyper-parameter of a training run (what a checkpoint stores and a resumed run must
/// match).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    #[serde(flatten)]
    pub method: MethodConfig,
    /// `name=weight` reward terms.
    pub rewards: Vec<String>,
    pub reward_options: RewardOptions,
    pub batch: usize,
    /// Image height and width in pixels (`None`: the model's `sample_size` × the VAE's
    /// downscale). Absent from checkpoints that train at the model's size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<usize>,
    /// Sampling steps.
    pub steps: usize,
    pub guidance: f64,
    pub eta: f64,
    pub negative_prompt: String,
    /// SDXL's size ids (other models ignore them). Absent from checkpoints at the defaults.
    #[serde(default, skip_serializing_if = "SizeConditioning::is_default")]
    pub size: SizeConditioning,
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
    /// The defaults on a model other than the embedded one ([`ModelDefaults::GENERAL`]).
    fn default() -> Self {
        let m = ModelDefaults::GENERAL;
        Self {
            method: MethodConfig::DraftLv { lv_samples: 2 },
            rewards: vec!["colorfulness".into()],
            reward_options: RewardOptions::default(),
            batch: 2,
            height: None,
            width: None,
            steps: 50,
            guidance: 7.5,
            eta: 0.0,
            negative_prompt: String::new(),
            size: SizeConditioning::default(),
            train_steps: m.train_steps,
            lr: m.lr,
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
        self.method.engine(self.steps)
    }

    /// Refuses impossible settings before any work, in words that name the flag.
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
        for (flag, side) in [("--height", self.height), ("--width", self.width)] {
            if let Some(v) = side
                && !(1..=crate::model::files::MAX_IMAGE_SIDE).contains(&v)
            {
                return bad(format!(
                    "{flag} must be between 1 and {} pixels, got {v}",
                    crate::model::files::MAX_IMAGE_SIDE
                ));
            }
        }
        // Guards against settings that would allocate without bound (a TOML `rank = 2^40`).
        let lv_samples = match self.method {
            MethodConfig::DraftLv { lv_samples } => lv_samples,
            _ => 0,
        };
        for (flag, v, max) in [
            ("--steps", self.steps, 10_000),
            ("--rank", self.rank, 4096),
            ("--lv-samples", lv_samples, 1024),
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
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return bad(format!(
                "--weight-decay must be ≥ 0, got {}",
                self.weight_decay
            ));
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
        Color(self.reward_options.target_color).check()?;
        crate::reward::builtin::check_specs(&self.rewards)?;
        Ok(())
    }
}

/// When to evaluate, checkpoint and stop (the run policy both shells drive:
/// [`crate::train::run::Run`]).
#[derive(Debug, Clone, PartialEq)]
pub struct RunPolicy {
    /// Images in the fixed evaluation set (rounded up to even; 0: no evaluation at all).
    pub eval_images: usize,
    /// Evaluate every this many updates and after the last (0: only before and after).
    pub eval_every: usize,
    /// Hand back a checkpoint every this many updates, after the last and on an early stop
    /// (0: never).
    pub checkpoint_every: usize,
    /// Stop as soon as the evaluation set's diversity falls below this fraction of its value
    /// before training (the reward hacking of the DRaFT paper: every seed collapsing to one
    /// image).
    pub min_diversity: Option<f64>,
}

impl RunPolicy {
    pub fn validate(&self) -> Result<()> {
        if let Some(f) = self.min_diversity {
            if !(0.0..1.0).contains(&f) {
                return Err(Error::Input(format!(
                    "--min-diversity {f}: expected a fraction in [0, 1)"
                )));
            }
            if self.eval_images < 2 {
                return Err(Error::Input(
                    "--min-diversity needs an evaluation set: --preview of at least 2".into(),
                ));
            }
        }
        Ok(())
    }
}

/// The defaults that depend on the model trained: the embedded model's are
/// `crate::data::default_model::TRAIN_DEFAULTS`, every other model's [`ModelDefaults::GENERAL`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ModelDefaults {
    /// `--lr`.
    pub lr: f64,
    /// `--train-steps`.
    pub train_steps: usize,
    /// `--eval-every`.
    pub eval_every: usize,
    /// `--prompt-set` when no prompts are given.
    pub prompt_set: &'static str,
}

impl ModelDefaults {
    /// A diffusers or single-file Stable Diffusion model: the DRaFT paper's learning rate, its
    /// animal prompts.
    pub const GENERAL: Self = Self {
        lr: 4e-4,
        train_steps: 100,
        eval_every: 10,
        prompt_set: "animals",
    };
}

/// `--preview` when not given.
pub const DEFAULT_PREVIEW: usize = 8;
/// `--checkpoint-every` when not given.
pub const DEFAULT_CHECKPOINT_EVERY: usize = 10;

/// `AxB` (or `A,B`): two whole numbers of at most 8 digits (`--original-size 1024x1024`,
/// `--crop 0,0`).
pub fn parse_pair<const SEP: char>(s: &str) -> std::result::Result<[usize; 2], String> {
    let bad = || format!("expected two whole numbers as A{SEP}B, got {s:?}");
    let (a, b) = s.split_once(SEP).ok_or_else(bad)?;
    let num = |v: &str| {
        let v = v.trim();
        (!v.is_empty() && v.len() <= 8)
            .then(|| v.parse::<usize>().ok())
            .flatten()
    };
    Ok([num(a).ok_or_else(bad)?, num(b).ok_or_else(bad)?])
}

/// `--target-color`: R,G,B in [0, 1]. Written as text (`"0.9,0.2,0.1"`, the flag's form) or as
/// a list of three numbers (the page's); its range is checked with the run's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Color(pub [f32; 3]);

impl Color {
    pub fn parse(s: &str) -> Result<Self> {
        let bad = || {
            Error::Input(format!(
                "--target-color {s:?}: expected R,G,B numbers in [0, 1]"
            ))
        };
        let v: Vec<f32> = s
            .split(',')
            .map(|x| x.trim().parse::<f32>().map_err(|_| bad()))
            .collect::<Result<_>>()?;
        match v.as_slice() {
            [r, g, b] => Ok(Self([*r, *g, *b])),
            _ => Err(bad()),
        }
    }

    /// Refuses a channel outside [0, 1].
    pub fn check(&self) -> Result<()> {
        if !self.0.iter().all(|x| (0.0..=1.0).contains(x)) {
            return Err(Error::Input(format!(
                "--target-color {self}: expected three numbers in [0, 1]"
            )));
        }
        Ok(())
    }
}

impl std::fmt::Display for Color {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let [r, g, b] = self.0;
        write!(f, "{r},{g},{b}")
    }
}

impl Serialize for Color {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Color {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Color;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("\"R,G,B\" or [R, G, B], numbers in [0, 1]")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> std::result::Result<Color, E> {
                Color::parse(s).map_err(E::custom)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> std::result::Result<Color, A::Error> {
                let mut v = Vec::new();
                while let Some(x) = seq.next_element::<f32>()? {
                    if v.len() == 3 {
                        return Err(serde::de::Error::invalid_length(4, &self));
                    }
                    v.push(x);
                }
                match v.as_slice() {
                    [r, g, b] => Ok(Color([*r, *g, *b])),
                    _ => Err(serde::de::Error::invalid_length(v.len(), &self)),
                }
            }
        }
        d.deserialize_any(V)
    }
}

/// The training settings as a user writes them, each optional: `draft train`'s flags (the
/// `clap` feature derives them), the keys of its `--config` TOML file (the flags' names), the
/// browser page's form (JSON; camelCase accepted) and, for a resumed run, a checkpoint's
/// settings ([`Settings::of_config`]). [`resolve`] layers them over the defaults.
///
/// A method's parameters (`k`, `lv-samples`, `t-min`, …) apply to that method only; those of
/// other methods are ignored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::Args))]
#[serde(default, deny_unknown_fields, rename_all = "kebab-case")]
pub struct Settings {
    /// draft (whole chain) | draft-k | draft-lv | refl | alignprop [default: draft-lv].
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// DRaFT-K: sampling steps back-propagated [default: 1].
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub k: Option<usize>,
    /// DRaFT-LV: re-noised samples per image [default: 2].
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(skip_serializing_if = "Option::is_none", alias = "lvSamples")]
    pub lv_samples: Option<usize>,
    /// ReFL: fewest sampling steps remaining when x̂₀ is predicted [default: 1].
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(skip_serializing_if = "Option::is_none", alias = "tMin")]
    pub t_min: Option<usize>,
    /// ReFL: most sampling steps remaining [default: 10, at most --steps].
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(skip_serializing_if = "Option::is_none", alias = "tMax")]
    pub t_max: Option<usize>,
    /// AlignProp: smallest K [default: 1].
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(skip_serializing_if = "Option::is_none", alias = "kMin")]
    pub k_min: Option<usize>,
    /// AlignProp: largest K [default: 10, at most --steps].
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(skip_serializing_if = "Option::is_none", alias = "kMax")]
    pub k_max: Option<usize>,
    /// Reward term NAME[=WEIGHT], repeatable: brightness, colorfulness, contrast, smoothness,
    /// symmetry, target-color; learned (need --reward-model): laion-aesthetic, clip-score,
    /// pickscore, hpsv2 [default: colorfulness].
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(skip_serializing_if = "Option::is_none", alias = "rewards")]
    pub reward: Option<Vec<String>>,
    /// The colour of the target-color reward, R,G,B in [0, 1] [default: 0.9,0.2,0.1].
    #[cfg_attr(feature = "clap", arg(long, value_parser = Color::parse))]
    #[serde(skip_serializing_if = "Option::is_none", alias = "targetColor")]
    pub target_color: Option<Color>,
    /// A training prompt; repeatable (cycled over the batch).
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt: Option<Vec<String>>,
    /// A built-in prompt set: animals (the 45 simple animals of DDPO / DRaFT), shapes (captions
    /// of the embedded model) [default: shapes with the embedded model, else animals].
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(skip_serializing_if = "Option::is_none", alias = "promptSet")]
    pub prompt_set: Option<String>,
    /// The prompt guidance steers away from [default: ""].
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(skip_serializing_if = "Option::is_none", alias = "negativePrompt")]
    pub negative_prompt: Option<String>,
    /// SDXL: the original image size the model is told, HEIGHTxWIDTH [default: the image
    /// size].
    #[cfg_attr(feature = "clap", arg(long, value_name = "HxW", value_parser = parse_pair::<'x'>))]
    #[serde(skip_serializing_if = "Option::is_none", alias = "originalSize")]
    pub original_size: Option<[usize; 2]>,
    /// SDXL: the crop's top-left corner the model is told, TOP,LEFT [default: 0,0].
    #[cfg_attr(feature = "clap", arg(long, value_name = "TOP,LEFT", value_parser = parse_pair::<','>))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crop: Option<[usize; 2]>,
    /// SDXL: the target size the model is told, HEIGHTxWIDTH [default: the image size].
    #[cfg_attr(feature = "clap", arg(long, value_name = "HxW", value_parser = parse_pair::<'x'>))]
    #[serde(skip_serializing_if = "Option::is_none", alias = "targetSize")]
    pub target_size: Option<[usize; 2]>,
    /// Images per batch [default: 2; --init-noise sets it].
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch: Option<usize>,
    /// Image height in pixels, a multiple of the VAE's downscale (8 for Stable Diffusion)
    /// [default: the UNet's sample_size × the downscale].
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub height: Option<usize>,
    /// Image width in pixels [default: as --height's].
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub width: Option<usize>,
    /// DDIM sampling steps [default: 50].
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<usize>,
    /// Classifier-free guidance scale [default: 7.5].
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guidance: Option<f64>,
    /// DDIM η [default: 0].
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta: Option<f64>,
    /// Optimizer updates [default: the model's, ModelDefaults].
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(skip_serializing_if = "Option::is_none", alias = "trainSteps")]
    pub train_steps: Option<usize>,
    /// Learning rate [default: the model's, ModelDefaults].
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// adamw | sgd [default: adamw].
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub optimizer: Option<String>,
    /// AdamW decoupled weight decay [default: 0.1].
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(skip_serializing_if = "Option::is_none", alias = "weightDecay")]
    pub weight_decay: Option<f64>,
    /// LoRA rank [default: 4].
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rank: Option<usize>,
    /// LoRA alpha; scale = alpha / rank [default: the rank].
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alpha: Option<f64>,
    /// Layer groups to adapt, comma-separated: attn, ff, proj, conv, text [default: attn].
    #[cfg_attr(feature = "clap", arg(long, value_delimiter = ','))]
    #[serde(skip_serializing_if = "Option::is_none", alias = "loraTargets")]
    pub lora_targets: Option<Vec<String>>,
    /// Clip the global gradient norm to this value [default: no clipping].
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(skip_serializing_if = "Option::is_none", alias = "clipGradNorm")]
    pub clip_grad_norm: Option<f64>,
    /// Batches averaged into one update [default: 1].
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(skip_serializing_if = "Option::is_none", alias = "gradAccum")]
    pub grad_accum: Option<usize>,
    /// Seed of every random draw [default: 0].
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    /// Stop after this many non-finite updates in a row [default: 5].
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(skip_serializing_if = "Option::is_none", alias = "maxBadSteps")]
    pub max_bad_steps: Option<usize>,
    /// Write the checkpoint every N updates [default: 10].
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(skip_serializing_if = "Option::is_none", alias = "checkpointEvery")]
    pub checkpoint_every: Option<usize>,
    /// Images of the fixed evaluation set (half as many prompts, two seeds each) behind the
    /// before/after grids and the diversity measure [default: 8] (0: none).
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preview: Option<usize>,
    /// Measure the evaluation set's reward and diversity every N updates and after the last
    /// [default: the model's, ModelDefaults] (0: only before and after).
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(skip_serializing_if = "Option::is_none", alias = "evalEvery")]
    pub eval_every: Option<usize>,
    /// Stop early when the diversity falls below this fraction of its value before training
    /// (reward hacking: every seed collapsing to one image) [default: never].
    #[cfg_attr(feature = "clap", arg(long))]
    #[serde(skip_serializing_if = "Option::is_none", alias = "minDiversity")]
    pub min_diversity: Option<f64>,
}

impl Settings {
    /// These settings over `lower`: each one given here wins. The prompts are one choice: a
    /// layer that gives `prompt` or `prompt-set` replaces both of the layer below.
    pub fn over(self, lower: Settings) -> Settings {
        let (prompt, prompt_set) = if self.prompt.is_some() || self.prompt_set.is_some() {
            (self.prompt, self.prompt_set)
        } else {
            (lower.prompt, lower.prompt_set)
        };
        // A struct literal: a field added to `Settings` and forgotten here does not compile.
        macro_rules! over {
            ($($f:ident),*) => {
                Settings { prompt, prompt_set, $($f: self.$f.or(lower.$f)),* }
            };
        }
        over!(
            method,
            k,
            lv_samples,
            t_min,
            t_max,
            k_min,
            k_max,
            reward,
            target_color,
            negative_prompt,
            original_size,
            crop,
            target_size,
            batch,
            height,
            width,
            steps,
            guidance,
            eta,
            train_steps,
            lr,
            optimizer,
            weight_decay,
            rank,
            alpha,
            lora_targets,
            clip_grad_norm,
            grad_accum,
            seed,
            max_bad_steps,
            checkpoint_every,
            preview,
            eval_every,
            min_diversity
        )
    }

    /// A run's configuration as settings (the checkpoint's layer of a resumed run): the
    /// method's own parameters, none of other methods', no run policy, no prompts.
    pub fn of_config(c: &TrainConfig) -> Settings {
        let mut s = Settings {
            method: Some(c.method.name().into()),
            reward: Some(c.rewards.clone()),
            target_color: Some(Color(c.reward_options.target_color)),
            negative_prompt: Some(c.negative_prompt.clone()),
            original_size: c.size.original,
            crop: (c.size.crop != [0, 0]).then_some(c.size.crop),
            target_size: c.size.target,
            batch: Some(c.batch),
            height: c.height,
            width: c.width,
            steps: Some(c.steps),
            guidance: Some(c.guidance),
            eta: Some(c.eta),
            train_steps: Some(c.train_steps),
            lr: Some(c.lr),
            optimizer: Some(c.optimizer.name().into()),
            weight_decay: Some(c.weight_decay),
            rank: Some(c.rank),
            alpha: c.alpha,
            lora_targets: Some(c.lora_targets.iter().map(|t| t.name().into()).collect()),
            clip_grad_norm: c.clip_grad_norm,
            grad_accum: Some(c.grad_accum),
            seed: Some(c.seed),
            max_bad_steps: Some(c.max_bad_steps),
            ..Settings::default()
        };
        match c.method {
            MethodConfig::Draft => {}
            MethodConfig::DraftK { k } => s.k = Some(k),
            MethodConfig::DraftLv { lv_samples } => s.lv_samples = Some(lv_samples),
            MethodConfig::Refl { t_min, t_max } => (s.t_min, s.t_max) = (Some(t_min), Some(t_max)),
            MethodConfig::AlignProp { k_min, k_max } => {
                (s.k_min, s.k_max) = (Some(k_min), Some(k_max))
            }
        }
        s
    }

    /// A resolved run as a form shows it: every setting, every method's parameters (the other
    /// methods' at their defaults), the run policy and the prompts.
    pub fn shown(r: &Resolved) -> Settings {
        let d = MethodDefaults::for_steps(r.config.steps);
        let given = Settings::of_config(&r.config);
        Settings {
            k: given.k.or(Some(d.k)),
            lv_samples: given.lv_samples.or(Some(d.lv_samples)),
            t_min: given.t_min.or(Some(d.t_min)),
            t_max: given.t_max.or(Some(d.t_max)),
            k_min: given.k_min.or(Some(d.k_min)),
            k_max: given.k_max.or(Some(d.k_max)),
            prompt: Some(r.prompts.clone()),
            preview: Some(r.policy.eval_images),
            eval_every: Some(r.policy.eval_every),
            checkpoint_every: Some(r.policy.checkpoint_every),
            min_diversity: r.policy.min_diversity,
            ..given
        }
    }

    /// Only what may change when a run continues from a checkpoint: the planned updates and
    /// the run policy (the page's form over a checkpoint: the checkpoint's settings win).
    pub fn continuing(&self) -> Settings {
        Settings {
            train_steps: self.train_steps,
            checkpoint_every: self.checkpoint_every,
            preview: self.preview,
            eval_every: self.eval_every,
            min_diversity: self.min_diversity,
            ..Settings::default()
        }
    }
}

/// What a run is resolved to.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    pub config: TrainConfig,
    pub policy: RunPolicy,
    pub prompts: Vec<String>,
}

/// A checkpoint's part in [`resolve`]: its configuration and prompts (`None` in checkpoints
/// written before the prompts were kept in them).
#[derive(Debug, Clone, Copy)]
pub struct Saved<'a> {
    pub config: &'a TrainConfig,
    pub prompts: Option<&'a [String]>,
}

/// The run's settings: `given` (lowest first: the config file, then the command line or the
/// page's form) over the checkpoint's (`saved`, when resuming) over the defaults (`model`'s,
/// then [`TrainConfig::default`]'s); checked, so that every impossible setting is refused here,
/// before anything loads, in the same words in both shells.
///
/// Defaults that depend on other settings: `t-max` and `k-max` are at most `--steps` (10 or
/// fewer) on a fresh run, the checkpoint's on a resumed one; the prompts are the given ones,
/// else the checkpoint's, else the model's prompt set.
pub fn resolve(
    model: &ModelDefaults,
    saved: Option<Saved>,
    given: &[&Settings],
) -> Result<Resolved> {
    for layer in given {
        if layer.prompt.is_some() && layer.prompt_set.is_some() {
            return Err(Error::Input(
                "give only one of --prompt, --prompts and --prompt-set".into(),
            ));
        }
    }
    let mut s = saved
        .map(|c| Settings::of_config(c.config))
        .unwrap_or_default();
    for layer in given {
        s = (*layer).clone().over(s);
    }
    // What no setting names (Adam's betas and ε) is the checkpoint's, else the default.
    let base = saved.map(|c| c.config.clone()).unwrap_or_default();
    let steps = s.steps.unwrap_or(base.steps);
    let method_name = s.method.as_deref().unwrap_or(base.method.name());
    let mut lora_targets = match &s.lora_targets {
        Some(t) => t
            .iter()
            .map(|s| LoraTarget::parse(s.trim()))
            .collect::<Result<Vec<_>>>()?,
        None => base.lora_targets.clone(),
    };
    lora_targets.sort();
    lora_targets.dedup();
    let config = TrainConfig {
        method: MethodConfig::from_settings(method_name, &s, steps)?,
        rewards: s.reward.clone().unwrap_or(base.rewards),
        reward_options: RewardOptions {
            target_color: s
                .target_color
                .map(|c| c.0)
                .unwrap_or(base.reward_options.target_color),
        },
        batch: s.batch.unwrap_or(base.batch),
        height: s.height.or(base.height),
        width: s.width.or(base.width),
        steps,
        guidance: s.guidance.unwrap_or(base.guidance),
        eta: s.eta.unwrap_or(base.eta),
        negative_prompt: s.negative_prompt.clone().unwrap_or(base.negative_prompt),
        size: SizeConditioning {
            original: s.original_size.or(base.size.original),
            crop: s.crop.unwrap_or(base.size.crop),
            target: s.target_size.or(base.size.target),
        },
        train_steps: s.train_steps.unwrap_or(model.train_steps),
        lr: s.lr.unwrap_or(model.lr),
        optimizer: match &s.optimizer {
            Some(o) => OptimizerName::parse(o)?,
            None => base.optimizer,
        },
        weight_decay: s.weight_decay.unwrap_or(base.weight_decay),
        rank: s.rank.unwrap_or(base.rank),
        alpha: s.alpha.or(base.alpha),
        lora_targets,
        clip_grad_norm: s.clip_grad_norm.or(base.clip_grad_norm),
        grad_accum: s.grad_accum.unwrap_or(base.grad_accum),
        seed: s.seed.unwrap_or(base.seed),
        max_bad_steps: s.max_bad_steps.unwrap_or(base.max_bad_steps),
        beta1: base.beta1,
        beta2: base.beta2,
        adam_eps: base.adam_eps,
    };
    config.validate()?;
    let policy = RunPolicy {
        eval_images: s.preview.unwrap_or(DEFAULT_PREVIEW),
        eval_every: s.eval_every.unwrap_or(model.eval_every),
        checkpoint_every: s.checkpoint_every.unwrap_or(DEFAULT_CHECKPOINT_EVERY),
        min_diversity: s.min_diversity,
    };
    policy.validate()?;
    let prompts = match (&s.prompt, &s.prompt_set, saved.and_then(|c| c.prompts)) {
        (Some(p), _, _) => {
            if p.is_empty() {
                return Err(Error::Input(
                    "--prompt: the list of prompts is empty".into(),
                ));
            }
            if let Some(e) = p.iter().find(|p| p.trim().is_empty()) {
                return Err(Error::Input(format!("--prompt {e:?} is empty")));
            }
            p.clone()
        }
        (None, Some(set), _) => prompt_set(set)?,
        (None, None, Some(p)) => p.to_vec(),
        (None, None, None) => prompt_set(model.prompt_set)?,
    };
    Ok(Resolved {
        config,
        policy,
        prompts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIVEN: ModelDefaults = ModelDefaults::GENERAL;

    fn json(text: &str) -> Settings {
        serde_json::from_str(text).unwrap()
    }

    #[test]
    fn defaults_and_layers() {
        let r = resolve(&GIVEN, None, &[]).unwrap();
        assert_eq!(r.config, TrainConfig::default());
        assert_eq!(r.policy.eval_every, 10);
        assert_eq!(r.prompts.len(), 45);
        // t-max defaults to min(10, steps) on a fresh run.
        let r = resolve(&GIVEN, None, &[&json(r#"{"method": "refl", "steps": 4}"#)]).unwrap();
        assert_eq!(r.config.method, MethodConfig::Refl { t_min: 1, t_max: 4 });
        // The command line over the file over the checkpoint.
        let saved = TrainConfig {
            method: MethodConfig::Refl { t_min: 2, t_max: 8 },
            lr: 0.01,
            ..TrainConfig::default()
        };
        let prompts = vec!["a cat".to_string()];
        let file = json(r#"{"lr": 0.02, "rank": 8, "prompt-set": "shapes"}"#);
        let flags = json(r#"{"rank": 2, "prompt": ["a dog"]}"#);
        let r = resolve(
            &GIVEN,
            Some(Saved {
                config: &saved,
                prompts: Some(&prompts),
            }),
            &[&file, &flags],
        )
        .unwrap();
        assert_eq!(r.config.method, MethodConfig::Refl { t_min: 2, t_max: 8 });
        assert_eq!((r.config.lr, r.config.rank), (0.02, 2));
        assert_eq!(r.prompts, ["a dog"]);
        let r = resolve(
            &GIVEN,
            Some(Saved {
                config: &saved,
                prompts: Some(&prompts),
            }),
            &[],
        )
        .unwrap();
        assert_eq!(r.config, saved);
        assert_eq!(r.prompts, prompts);
    }

    #[test]
    fn camel_case_and_kebab_case_keys() {
        let a = json(
            r#"{"lvSamples": 3, "tMax": 4, "rewards": ["contrast"], "targetColor": [1, 0, 0]}"#,
        );
        let b = json(
            r#"{"lv-samples": 3, "t-max": 4, "reward": ["contrast"], "target-color": "1,0,0"}"#,
        );
        assert_eq!(a, b);
        assert!(serde_json::from_str::<Settings>(r#"{"learning-rate": 1}"#).is_err());
    }

    /// SDXL's size ids: from the page's keys, kept by a checkpoint, absent at the defaults.
    #[test]
    fn size_conditioning_settings() {
        let form = json(r#"{"originalSize": [1024, 768], "crop": [16, 0]}"#);
        let r = resolve(&GIVEN, None, &[&form]).unwrap();
        assert_eq!(
            r.config.size,
            SizeConditioning {
                original: Some([1024, 768]),
                crop: [16, 0],
                target: None,
            }
        );
        let back = resolve(
            &GIVEN,
            Some(Saved {
                config: &r.config,
                prompts: None,
            }),
            &[],
        )
        .unwrap();
        assert_eq!(back.config.size, r.config.size);
        let plain = serde_json::to_value(TrainConfig::default()).unwrap();
        assert!(plain.get("size").is_none());
        assert_eq!(parse_pair::<'x'>("1024x768"), Ok([1024, 768]));
        assert!(parse_pair::<'x'>("1024").is_err() && parse_pair::<','>("1,").is_err());
        assert!(parse_pair::<'x'>("123456789x1").is_err());
    }

    /// Checkpoints written before the method carried its parameters: every method's keys.
    #[test]
    fn old_checkpoint_config_loads() {
        let old = r#"{"method":"draft-lv","k":1,"lv_samples":3,"t_min":1,"t_max":10,"k_min":1,
            "k_max":10,"rewards":["colorfulness"],"reward_options":{"target_color":[0.9,0.2,0.1]},
            "batch":2,"steps":50,"guidance":7.5,"eta":0.0,"negative_prompt":"","train_steps":100,
            "lr":0.0004,"optimizer":"adamw","weight_decay":0.1,"beta1":0.9,"beta2":0.999,
            "adam_eps":1e-8,"rank":4,"alpha":null,"lora_targets":["attn"],"clip_grad_norm":null,
            "grad_accum":1,"seed":0,"max_bad_steps":5}"#;
        let c: TrainConfig = serde_json::from_str(old).unwrap();
        assert_eq!(c.method, MethodConfig::DraftLv { lv_samples: 3 });
        let back: TrainConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        let json = serde_json::to_value(&c).unwrap();
        assert_eq!(json["method"], "draft-lv");
        assert_eq!(json["lv_samples"], 3);
        assert!(json.get("t_max").is_none());
    }

    #[test]
    fn the_page_over_a_checkpoint_keeps_its_settings() {
        let form = json(r#"{"method": "draft-k", "lr": 0.5, "trainSteps": 9, "preview": 2}"#);
        let saved = TrainConfig::default();
        let r = resolve(
            &GIVEN,
            Some(Saved {
                config: &saved,
                prompts: None,
            }),
            &[&form.continuing()],
        )
        .unwrap();
        assert_eq!(r.config.method, saved.method);
        assert_eq!((r.config.lr, r.config.train_steps), (saved.lr, 9));
        assert_eq!(r.policy.eval_images, 2);
        let shown = Settings::shown(&r);
        assert_eq!(shown.k, Some(1));
        assert_eq!(resolve(&GIVEN, None, &[&shown]).unwrap(), r);
    }
}
