//! The run policy both shells drive: the evaluation before training, the evaluation cadence,
//! the checkpoint cadence, the early stop on diversity and the before → after report. The CLI
//! (`draft train`) writes what [`Run::update`] hands back to files; the browser page shows it.
//! Same settings, same numbers, in both.

use crate::error::Result;
use crate::train::trainer::{EvalSummary, FixedEval, StepMetrics, Trainer};

use crate::train::config::RunPolicy;

impl RunPolicy {
    /// The evaluation set's size as [`Trainer::evaluate_fixed`] samples it.
    pub fn eval_set(&self) -> usize {
        if self.eval_images == 0 {
            0
        } else {
            crate::train::trainer::eval_set_size(self.eval_images)
        }
    }
}

/// What one update yields for the shell to record.
pub struct Update {
    /// The step's metrics, with the evaluation's reward and diversity when it was evaluated.
    pub metrics: StepMetrics,
    /// The evaluation set after this update, when the cadence asked for it.
    pub eval: Option<FixedEval>,
    /// The checkpoint's bytes, when one is due: write them after the metrics.
    pub checkpoint: Option<Vec<u8>>,
    /// `(diversity before, diversity now)` when the early stop fired: the run is over.
    pub collapsed: Option<(f64, f64)>,
}

/// A training run under a [`RunPolicy`].
pub struct Run {
    pub trainer: Trainer,
    pub policy: RunPolicy,
    /// The diversity the early stop compares with.
    reference_diversity: Option<f64>,
    /// The latest evaluation and its step: the "after" report when it is the last.
    last_eval: Option<(usize, FixedEval)>,
    stopped: bool,
}

impl Run {
    /// A run of `trainer` from its current step (0, or where a checkpoint left it).
    pub fn new(trainer: Trainer, policy: RunPolicy) -> Result<Self> {
        policy.validate()?;
        let mut run = Self {
            trainer,
            policy,
            reference_diversity: None,
            last_eval: None,
            stopped: false,
        };
        run.reference_diversity = run.before().map(|b| b.diversity);
        Ok(run)
    }

    /// For checkpoints written before the "before" evaluation was kept in them: the early
    /// stop compares with the first diversity logged.
    pub fn with_history(mut self, history: &[StepMetrics]) -> Self {
        if self.reference_diversity.is_none() {
            self.reference_diversity = history.iter().find_map(|m| m.diversity);
        }
        self
    }

    /// The evaluation before training, when it matches this run's evaluation set.
    pub fn before(&self) -> Option<&EvalSummary> {
        self.trainer
            .before
            .as_ref()
            .filter(|b| self.policy.eval_set() > 0 && b.images == self.policy.eval_set())
    }

    /// Samples the evaluation set before the first update (only at step 0, and only once: it
    /// is kept in the trainer, hence in its checkpoints). `None` when there is nothing to do.
    pub async fn evaluate_before(&mut self) -> Result<Option<FixedEval>> {
        if self.policy.eval_set() == 0 || self.trainer.step > 0 || self.before().is_some() {
            return Ok(None);
        }
        let e = self.trainer.evaluate_fixed(self.policy.eval_images).await?;
        self.trainer.before = Some(e.summary());
        self.reference_diversity = Some(e.diversity);
        Ok(Some(e))
    }

    /// Plans `n` updates in all (a run may be extended, as `--resume` with a larger
    /// `--train-steps` does).
    pub fn set_train_steps(&mut self, n: usize) {
        self.trainer.config.train_steps = n;
    }

    /// Whether it stopped early (`min_diversity`).
    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Whether the run is over: all updates done, or stopped early.
    pub fn done(&self) -> bool {
        self.stopped || self.trainer.step >= self.trainer.config.train_steps
    }

    /// One optimiser update, then what the policy asks for after it.
    pub async fn update(&mut self) -> Result<Update> {
        let mut metrics = self.trainer.train_step().await?;
        let step = metrics.step;
        let total = self.trainer.config.train_steps;
        let p = &self.policy;
        let mut eval = None;
        if p.eval_set() > 0
            && p.eval_every > 0
            && (step.is_multiple_of(p.eval_every) || step == total)
        {
            let e = self.trainer.evaluate_fixed(p.eval_images).await?;
            metrics.eval_reward = Some(e.reward);
            metrics.diversity = Some(e.diversity);
            eval = Some(e);
        }
        let collapsed = match (p.min_diversity, self.reference_diversity, metrics.diversity) {
            (Some(f), Some(d0), Some(d)) if d < f * d0 => Some((d0, d)),
            _ => None,
        };
        self.stopped = collapsed.is_some();
        let checkpoint = if p.checkpoint_every > 0
            && (self.stopped || step.is_multiple_of(p.checkpoint_every) || step == total)
        {
            Some(self.trainer.checkpoint().await?)
        } else {
            None
        };
        // The shell gets the evaluation; a copy (tensor handles) is kept for the "after" report.
        let out_eval = eval.clone();
        self.last_eval = eval.map(|e| (step, e));
        Ok(Update {
            metrics,
            eval: out_eval,
            checkpoint,
            collapsed,
        })
    }

    /// The evaluation set after training: the last update's evaluation when it was made at
    /// this step, otherwise sampled now.
    pub async fn evaluate_after(&mut self) -> Result<FixedEval> {
        match self.last_eval.take() {
            Some((step, e)) if step == self.trainer.step => Ok(e),
            _ => self.trainer.evaluate_fixed(self.policy.eval_images).await,
        }
    }
}
