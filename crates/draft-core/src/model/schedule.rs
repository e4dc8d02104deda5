//! DDIM (Song et al. 2021) on the noise schedule of `scheduler/scheduler_config.json`, as
//! `DDIMScheduler.from_pretrained(model, subfolder="scheduler")` reads it: whatever class the
//! file names (SD-1.4 names PNDM), the betas, spacing and offsets are taken from it and
//! DDIM's defaults fill the rest. Pure math: no model, no tensors but the one step.

use burn::prelude::*;
use serde::Deserialize;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Deserialize)]
pub struct SchedulerConfig {
    #[serde(default = "d_steps")]
    pub num_train_timesteps: usize,
    #[serde(default = "d_beta_start")]
    pub beta_start: f64,
    #[serde(default = "d_beta_end")]
    pub beta_end: f64,
    #[serde(default = "d_schedule")]
    pub beta_schedule: String,
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    #[serde(default = "d_true")]
    pub clip_sample: bool,
    #[serde(default = "d_one")]
    pub clip_sample_range: f64,
    #[serde(default = "d_true")]
    pub set_alpha_to_one: bool,
    #[serde(default)]
    pub steps_offset: usize,
    #[serde(default = "d_prediction")]
    pub prediction_type: String,
    #[serde(default = "d_spacing")]
    pub timestep_spacing: String,
    #[serde(default)]
    pub thresholding: bool,
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
}

fn d_steps() -> usize {
    1000
}
fn d_beta_start() -> f64 {
    0.0001
}
fn d_beta_end() -> f64 {
    0.02
}
fn d_schedule() -> String {
    "linear".into()
}
fn d_true() -> bool {
    true
}
fn d_one() -> f64 {
    1.0
}
fn d_prediction() -> String {
    "epsilon".into()
}
fn d_spacing() -> String {
    "leading".into()
}

/// The most training timesteps a scheduler config may have (released models have 1000).
pub const MAX_TRAIN_TIMESTEPS: usize = 1_000_000;

/// What the model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prediction {
    Epsilon,
    Sample,
    VPrediction,
}

impl SchedulerConfig {
    pub fn from_json(file: &str, json: &str) -> Result<Self> {
        let c: Self = crate::error::from_json(file, json)?;
        let bad = |r: String| Err(Error::config(file, r));
        // The schedule is a table of num_train_timesteps values: 1000 in every released
        // model; the cap keeps a hostile file from asking for terabytes.
        if !(2..=MAX_TRAIN_TIMESTEPS).contains(&c.num_train_timesteps) {
            return bad(format!(
                "`num_train_timesteps` = {} is out of range (2 to {MAX_TRAIN_TIMESTEPS})",
                c.num_train_timesteps
            ));
        }
        if c.steps_offset >= c.num_train_timesteps {
            return bad(format!(
                "`steps_offset` = {} is not below num_train_timesteps {}",
                c.steps_offset, c.num_train_timesteps
            ));
        }
        if !matches!(
            c.beta_schedule.as_str(),
            "linear" | "scaled_linear" | "squaredcos_cap_v2"
        ) && c.trained_betas.is_none()
        {
            return bad(format!("unknown `beta_schedule` {:?}", c.beta_schedule));
        }
        // β must be a probability below 1, or ᾱ_t reaches 0 (or goes negative) and the DDIM
        // step divides by it.
        let beta = 0.0..=0.999;
        if c.trained_betas.is_none() {
            Error::check_number(file, "beta_start", c.beta_start, beta.clone())?;
            Error::check_number(file, "beta_end", c.beta_end, beta.clone())?;
        }
        Error::check_number(
            file,
            "clip_sample_range",
            c.clip_sample_range,
            0.0..=f64::MAX,
        )?;
        if !matches!(
            c.timestep_spacing.as_str(),
            "leading" | "trailing" | "linspace"
        ) {
            return bad(format!(
                "unknown `timestep_spacing` {:?}",
                c.timestep_spacing
            ));
        }
        c.prediction(file)?;
        if c.thresholding || c.rescale_betas_zero_snr {
            return bad("`thresholding` and `rescale_betas_zero_snr` are not supported".into());
        }
        if let Some(b) = &c.trained_betas {
            if b.len() != c.num_train_timesteps {
                return bad(format!(
                    "`trained_betas` has {} values, expected num_train_timesteps = {}",
                    b.len(),
                    c.num_train_timesteps
                ));
            }
            if let Some((i, v)) = b.iter().enumerate().find(|(_, v)| !beta.contains(*v)) {
                return bad(format!(
                    "`trained_betas[{i}]` = {v} is out of range (0 to 0.999)"
                ));
            }
        }
        // DDIM divides by ᾱ_t and by 1 − ᾱ_t: both must stay above 0 in f32 at every t
        // (ᾱ only decreases, so its first and last values tell).
        let a = c.alphas_cumprod();
        if a.first().is_some_and(|&a0| a0 >= 1.0) {
            return bad(format!(
                "the betas give ᾱ_0 = 1 (no noise at t = 0): `beta_start` {} is too small",
                c.beta_start
            ));
        }
        if a.last().is_some_and(|&last| last <= 0.0) {
            return bad(format!(
                "the betas drive ᾱ to 0 before t = {}: `beta_end` {} is too large for \
                 num_train_timesteps",
                c.num_train_timesteps, c.beta_end
            ));
        }
        Ok(c)
    }

    pub fn prediction(&self, file: &str) -> Result<Prediction> {
        match self.prediction_type.as_str() {
            "epsilon" => Ok(Prediction::Epsilon),
            "sample" => Ok(Prediction::Sample),
            "v_prediction" => Ok(Prediction::VPrediction),
            other => Err(Error::config(
                file,
                format!("unknown `prediction_type` {other:?}"),
            )),
        }
    }

    /// ᾱ_t for t = 0 … T−1, accumulated in f32 as PyTorch's `cumprod` does.
    pub fn alphas_cumprod(&self) -> Vec<f32> {
        let n = self.num_train_timesteps;
        let betas: Vec<f32> = if let Some(b) = &self.trained_betas {
            b.iter().map(|&x| x as f32).collect()
        } else {
            match self.beta_schedule.as_str() {
                "linear" => linspace(self.beta_start, self.beta_end, n),
                "scaled_linear" => linspace(self.beta_start.sqrt(), self.beta_end.sqrt(), n)
                    .into_iter()
                    .map(|b| b * b)
                    .collect(),
                _ => {
                    let alpha_bar = |t: f64| {
                        ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
                            .cos()
                            .powi(2)
                    };
                    (0..n)
                        .map(|i| {
                            let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
                            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
                        })
                        .collect()
                }
            }
        };
        let mut acc = 1.0f32;
        betas
            .iter()
            .map(|b| {
                acc *= 1.0 - b;
                acc
            })
            .collect()
    }
}

/// `torch.linspace(start, end, n, dtype=float32)`.
fn linspace(start: f64, end: f64, n: usize) -> Vec<f32> {
    let step = (end - start) / (n - 1) as f64;
    (0..n)
        .map(|i| {
            // torch fills the second half from the end to keep it symmetric.
            if i < n / 2 {
                (start + step * i as f64) as f32
            } else {
                (end - step * (n - 1 - i) as f64) as f32
            }
        })
        .collect()
}

/// One DDIM step's coefficients: x_{prev} = a·x_t + b·model_output (+ σ·noise), after the
/// optional clipping of x̂₀, which is why x̂₀'s own coefficients are kept too.
#[derive(Debug, Clone, Copy)]
pub struct StepCoefficients {
    pub timestep: usize,
    pub prev_timestep: Option<usize>,
    pub alpha_prod_t: f64,
    pub alpha_prod_prev: f64,
    /// σ_t = η·sqrt((1−ᾱ_prev)/(1−ᾱ_t))·sqrt(1−ᾱ_t/ᾱ_prev).
    pub sigma: f64,
}

/// A DDIM schedule for a given number of inference steps.
#[derive(Debug, Clone)]
pub struct Ddim {
    pub alphas_cumprod: Vec<f32>,
    pub final_alpha_cumprod: f32,
    pub timesteps: Vec<usize>,
    pub step_ratio: usize,
    pub prediction: Prediction,
    pub clip_sample: Option<f64>,
    pub num_train_timesteps: usize,
}

impl Ddim {
    pub fn new(config: &SchedulerConfig, steps: usize) -> Result<Self> {
        let n = config.num_train_timesteps;
        if steps == 0 || steps > n {
            return Err(Error::Input(format!(
                "the number of sampling steps must be between 1 and {n}, got {steps}"
            )));
        }
        let alphas_cumprod = config.alphas_cumprod();
        let timesteps: Vec<usize> = match config.timestep_spacing.as_str() {
            "leading" => {
                let ratio = n / steps;
                (0..steps)
                    .rev()
                    .map(|i| i * ratio + config.steps_offset)
                    .collect()
            }
            // diffusers computes these two with numpy, whose `round` rounds halves to even,
            // and whose `arange` / `linspace` fill `start + i·δ`: the same operations here
            // give its timesteps bit for bit (1000 train steps, 7 linspace steps: …, 166 — not
            // 167; 16 trailing steps: 999, 937, 874, 811, … — not …, 874, 812).
            "trailing" => {
                // np.round(np.arange(n, 0, -n / steps)) - 1; arange's δ is (n − ratio) − n.
                let start = n as f64;
                let delta = (start - n as f64 / steps as f64) - start;
                (0..steps)
                    .map(|i| {
                        ((start + i as f64 * delta).round_ties_even() as i64 - 1).max(0) as usize
                    })
                    .collect()
            }
            _ => {
                // np.linspace(0, n − 1, steps).round()[::-1]: i · ((n − 1) / (steps − 1)),
                // the last point exactly n − 1.
                let step = (n - 1) as f64 / (steps - 1).max(1) as f64;
                (0..steps)
                    .rev()
                    .map(|i| match i {
                        0 => 0,
                        i if i == steps - 1 => n - 1,
                        i => (i as f64 * step).round_ties_even() as usize,
                    })
                    .collect()
            }
        };
        if let Some(&t) = timesteps.iter().find(|&&t| t >= n) {
            return Err(Error::Input(format!(
                "timestep {t} (steps_offset {}) is outside the {n}-step schedule",
                config.steps_offset
            )));
        }
        Ok(Self {
            final_alpha_cumprod: if config.set_alpha_to_one {
                1.0
            } else {
                alphas_cumprod[0]
            },
            alphas_cumprod,
            timesteps,
            step_ratio: n / steps,
            prediction: config.prediction("scheduler_config.json")?,
            clip_sample: config.clip_sample.then_some(config.clip_sample_range),
            num_train_timesteps: n,
        })
    }

    /// The coefficients of the step from `timestep` (index `i` in `timesteps`).
    pub fn coefficients(&self, i: usize, eta: f64) -> StepCoefficients {
        let t = self.timesteps[i];
        let prev = t as i64 - self.step_ratio as i64;
        let a_t = self.alphas_cumprod[t] as f64;
        let a_prev = if prev >= 0 {
            self.alphas_cumprod[prev as usize] as f64
        } else {
            self.final_alpha_cumprod as f64
        };
        let variance = (1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev);
        StepCoefficients {
            timestep: t,
            prev_timestep: (prev >= 0).then_some(prev as usize),
            alpha_prod_t: a_t,
            alpha_prod_prev: a_prev,
            sigma: eta * variance.max(0.0).sqrt(),
        }
    }

    /// One DDIM step x_t → x_{t−1} from the model output, as a pure tensor function
    /// (differentiable in `sample` and `model_output`). `noise` is used when σ > 0.
    pub fn step(
        &self,
        c: &StepCoefficients,
        model_output: Tensor<4>,
        sample: Tensor<4>,
        noise: Option<Tensor<4>>,
    ) -> Tensor<4> {
        let (a_t, a_prev) = (c.alpha_prod_t, c.alpha_prod_prev);
        let (sa, sb) = (a_t.sqrt(), (1.0 - a_t).sqrt());
        let (pred_x0, pred_eps) = match self.prediction {
            Prediction::Epsilon => (
                (sample.clone() - model_output.clone() * sb) / sa,
                model_output,
            ),
            Prediction::Sample => {
                let eps = (sample.clone() - model_output.clone() * sa) / sb;
                (model_output, eps)
            }
            Prediction::VPrediction => (
                sample.clone() * sa - model_output.clone() * sb,
                model_output * sa + sample * sb,
            ),
        };
        let pred_x0 = match self.clip_sample {
            Some(r) => pred_x0.clamp(-r, r),
            None => pred_x0,
        };
        let dir = pred_eps * (1.0 - a_prev - c.sigma * c.sigma).max(0.0).sqrt();
        let prev = pred_x0 * a_prev.sqrt() + dir;
        match noise {
            Some(noise) if c.sigma > 0.0 => prev + noise * c.sigma,
            _ => prev,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sd14() -> SchedulerConfig {
        SchedulerConfig::from_json(
            "scheduler_config.json",
            r#"{"_class_name":"PNDMScheduler","beta_start":0.00085,"beta_end":0.012,
                "beta_schedule":"scaled_linear","num_train_timesteps":1000,"set_alpha_to_one":false,
                "skip_prk_steps":true,"steps_offset":1,"clip_sample":false}"#,
        )
        .unwrap()
    }

    #[test]
    fn leading_spacing_matches_diffusers() {
        // DDIMScheduler(...).set_timesteps(50).timesteps for SD-1.4: 981, 961, …, 1.
        let d = Ddim::new(&sd14(), 50).unwrap();
        assert_eq!(d.timesteps.len(), 50);
        assert_eq!(d.timesteps[0], 981);
        assert_eq!(d.timesteps[49], 1);
        assert_eq!(d.step_ratio, 20);
    }

    #[test]
    fn alphas_cumprod_matches_diffusers() {
        // torch: DDIMScheduler(beta_schedule="scaled_linear", 0.00085, 0.012).alphas_cumprod
        let a = sd14().alphas_cumprod();
        assert!((a[0] - 0.99915).abs() < 1e-6, "{}", a[0]);
        assert!((a[999] - 0.0046).abs() < 1e-4, "{}", a[999]);
    }

    #[test]
    fn trailing_and_linspace_round_halves_to_even_as_numpy() {
        // DDIMScheduler(timestep_spacing=…).set_timesteps(n).timesteps (diffusers 0.39).
        let mut c = sd14();
        c.timestep_spacing = "trailing".into();
        let d = Ddim::new(&c, 16).unwrap();
        assert_eq!(&d.timesteps[..4], &[999, 937, 874, 811]);
        c.timestep_spacing = "linspace".into();
        let d = Ddim::new(&c, 7).unwrap();
        assert_eq!(d.timesteps, vec![999, 832, 666, 500, 333, 166, 0]);
    }

    #[test]
    fn too_many_steps_is_an_error() {
        assert!(Ddim::new(&sd14(), 1001).is_err());
        assert!(Ddim::new(&sd14(), 0).is_err());
    }
}
