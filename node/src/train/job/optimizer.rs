//! `[optimizer]`: the update rule and the learning-rate schedule, and their checks.

use super::{invalid, JobError, JobSpec};
use serde::{Deserialize, Serialize};

/// Optimizer settings.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OptimizerSpec {
    /// `adamw` or `sgd`. Default: adamw.
    #[serde(default = "default_optimizer")]
    pub kind: OptimizerKind,
    /// Peak learning rate. Default: 0.001.
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// Decoupled weight decay (AdamW) or L2 (SGD). Default: 0.01.
    #[serde(default = "default_wd")]
    pub weight_decay: f64,
    /// AdamW betas. Default: [0.9, 0.999].
    #[serde(default = "default_betas")]
    pub betas: [f64; 2],
    /// AdamW epsilon. Default: 1e-8.
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// SGD momentum. Default: 0.9.
    #[serde(default = "default_momentum")]
    pub momentum: f64,
    /// `constant`, `linear` (decay to 0) or `cosine` (decay to 0). Default: cosine.
    #[serde(default = "default_schedule")]
    pub schedule: Schedule,
    /// Linear warm-up steps. Default: 0.
    #[serde(default)]
    pub warmup_steps: u64,
    /// Clip the global gradient norm to this (0: off). Default: 1.0.
    #[serde(default = "default_clip")]
    pub grad_clip: f64,
}

impl Default for OptimizerSpec {
    fn default() -> Self {
        OptimizerSpec {
            kind: default_optimizer(),
            lr: default_lr(),
            weight_decay: default_wd(),
            betas: default_betas(),
            eps: default_eps(),
            momentum: default_momentum(),
            schedule: default_schedule(),
            warmup_steps: 0,
            grad_clip: default_clip(),
        }
    }
}

fn default_optimizer() -> OptimizerKind {
    OptimizerKind::Adamw
}
fn default_lr() -> f64 {
    1e-3
}
fn default_wd() -> f64 {
    0.01
}
fn default_betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn default_eps() -> f64 {
    1e-8
}
fn default_momentum() -> f64 {
    0.9
}
fn default_schedule() -> Schedule {
    Schedule::Cosine
}
fn default_clip() -> f64 {
    1.0
}

/// Optimizers.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// Adam with decoupled weight decay.
    Adamw,
    /// Stochastic gradient descent with momentum.
    Sgd,
}

/// Learning-rate schedules (after warm-up).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// The peak rate throughout.
    Constant,
    /// Linear decay to 0 at the last step.
    Linear,
    /// Cosine decay to 0 at the last step.
    Cosine,
}

impl JobSpec {
    /// `[optimizer]`: ranges.
    pub(super) fn validate_optimizer(&self) -> Result<(), JobError> {
        let o = &self.optimizer;
        if !(o.lr > 0.0 && o.lr < 10.0) {
            return Err(invalid("optimizer.lr", "must be in (0, 10)"));
        }
        if !(0.0..1.0).contains(&o.weight_decay) {
            return Err(invalid("optimizer.weight_decay", "must be in [0, 1)"));
        }
        if o.betas.iter().any(|b| !(0.0..1.0).contains(b)) {
            return Err(invalid("optimizer.betas", "must both be in [0, 1)"));
        }
        if o.eps.is_nan() || o.eps <= 0.0 {
            return Err(invalid("optimizer.eps", "must be > 0"));
        }
        if !(0.0..1.0).contains(&o.momentum) {
            return Err(invalid("optimizer.momentum", "must be in [0, 1)"));
        }
        if o.grad_clip.is_nan() || o.grad_clip < 0.0 {
            return Err(invalid("optimizer.grad_clip", "must be >= 0"));
        }
        Ok(())
    }

    /// Learning rate at `step` (0-based) of `total`.
    pub fn lr_at(&self, step: u64, total: u64) -> f64 {
        let o = &self.optimizer;
        if step < o.warmup_steps {
            return o.lr * (step + 1) as f64 / o.warmup_steps as f64;
        }
        let span = total.saturating_sub(o.warmup_steps).max(1) as f64;
        let t = ((step - o.warmup_steps) as f64 / span).min(1.0);
        match o.schedule {
            Schedule::Constant => o.lr,
            Schedule::Linear => o.lr * (1.0 - t),
            Schedule::Cosine => o.lr * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()),
        }
    }
}
