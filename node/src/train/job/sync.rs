//! `[sync]`: how the members combine their work, and its checks.
//!
//! ```toml
//! [sync]
//! kind = "diloco"      # sync (default) | diloco
//! inner_steps = 50     # diloco: local steps per outer round (H)
//! outer_lr = 0.7       # diloco: the outer Nesterov SGD's learning rate
//! outer_momentum = 0.9 # diloco: its momentum
//! compression = "bf16" # none (default) | bf16 | int8: the all-reduce's payload
//! ```
//!
//! The DiLoCo keys are refused with `kind = "sync"` (they would do nothing there). A job
//! without `[sync]`, or with only `kind = "sync"`, is the same job as before the table
//! existed (same hash, so its checkpoints still resume).

use super::{invalid, JobError, JobSpec};
use coordinator_free::outer_round::{
    OuterConfig, OuterError, DEFAULT_INNER_STEPS, DEFAULT_OUTER_LR, DEFAULT_OUTER_MOMENTUM,
};
use coordinator_free::Compression;
use serde::{Deserialize, Serialize};

/// The `[sync]` table.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SyncSpec {
    /// `sync`: every step's gradient is all-reduced (synchronous data parallelism); or
    /// `diloco`: each member takes `inner_steps` local steps with the job's optimizer on
    /// its share of each batch, then the members all-reduce the change of the weights
    /// (the pseudo-gradient) and apply one outer Nesterov step (DiLoCo, arXiv
    /// 2311.08105): about `inner_steps` times fewer bytes on the data plane. Default:
    /// `sync`.
    #[serde(default)]
    pub kind: SyncKind,
    /// diloco: inner steps per outer round (`H`, at least 1). Rounds are aligned at
    /// multiples of it from step 0 (the job's last round may be shorter). Default: 50
    /// (`coordinator_free::outer_round::DEFAULT_INNER_STEPS`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub inner_steps: Option<u64>,
    /// diloco: the outer learning rate (finite, > 0). Default: 0.7
    /// (`coordinator_free::outer_round::DEFAULT_OUTER_LR`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outer_lr: Option<f64>,
    /// diloco: the outer Nesterov momentum, in `[0, 1)`. Default: 0.9
    /// (`coordinator_free::outer_round::DEFAULT_OUTER_MOMENTUM`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outer_momentum: Option<f64>,
    /// How the ring all-reduce carries the gradients (sync) or the pseudo-gradients
    /// (diloco): `none` (f32), `bf16` or `int8` (per-block scale), always summed in f32
    /// (`coordinator_free::compression`); the loss, sample counts and the guard's slots
    /// travel exactly. Synchronous gradients get error feedback: what a member's
    /// encodings lost is added to its next step's gradient. NCCL views (GPUs) sum in f32
    /// whatever this says. Default: `none`.
    #[serde(default, skip_serializing_if = "is_none")]
    pub compression: Compression,
}

/// Whether `c` is the default (left out of the job's TOML form, so the hash of a job that
/// does not set it is the one it had before the key existed).
fn is_none(c: &Compression) -> bool {
    *c == Compression::None
}

/// How members combine their work.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SyncKind {
    /// A gradient all-reduce every step.
    #[default]
    Sync,
    /// DiLoCo outer rounds.
    Diloco,
}

impl SyncSpec {
    /// Whether this is the default table (then it is left out of the job's TOML form, so
    /// jobs written before `[sync]` existed keep their hash).
    pub fn is_default(&self) -> bool {
        *self == SyncSpec::default()
    }

    /// The outer loop's settings with the defaults filled in, for `kind = "diloco"`;
    /// `None` for synchronous training.
    pub fn outer(&self) -> Option<OuterConfig> {
        (self.kind == SyncKind::Diloco).then(|| OuterConfig {
            inner_steps: self.inner_steps.unwrap_or(DEFAULT_INNER_STEPS),
            outer_lr: self.outer_lr.map_or(DEFAULT_OUTER_LR, |x| x as f32),
            outer_momentum: self
                .outer_momentum
                .map_or(DEFAULT_OUTER_MOMENTUM, |x| x as f32),
        })
    }
}

impl JobSpec {
    /// `[sync]`: the DiLoCo keys only with `kind = "diloco"`, and in range.
    pub(super) fn validate_sync(&self) -> Result<(), JobError> {
        let s = &self.sync;
        let Some(config) = s.outer() else {
            let set = [
                ("sync.inner_steps", s.inner_steps.is_some()),
                ("sync.outer_lr", s.outer_lr.is_some()),
                ("sync.outer_momentum", s.outer_momentum.is_some()),
            ];
            return match set.into_iter().find(|(_, set)| *set) {
                Some((key, _)) => Err(invalid(key, "applies only with `sync.kind = \"diloco\"`")),
                None => Ok(()),
            };
        };
        // An f64 outside f32's range becomes infinite and is refused as not finite.
        config.validate().map_err(|e| match e {
            OuterError::NoInnerSteps => invalid("sync.inner_steps", "must be at least 1"),
            OuterError::BadLr(x) => {
                invalid("sync.outer_lr", format!("must be finite and > 0 (got {x})"))
            }
            OuterError::BadMomentum(x) => invalid(
                "sync.outer_momentum",
                format!("must be in [0, 1) (got {x})"),
            ),
            OuterError::LengthMismatch(_) => invalid("sync", "is inconsistent"),
        })
    }
}
