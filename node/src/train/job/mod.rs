//! Job files (TOML): what to train, on what, for how long, and where results go.
//!
//! A job file is parsed with unknown keys refused, then validated; every error names the
//! key and the problem. The submitter resolves relative input paths against the job
//! file's directory and the output dir against its working directory
//! ([`JobSpec::resolve_paths`]) before the job is announced on the swarm, so every member
//! reads the same absolute paths.
//!
//! ```toml
//! name = "digits"
//! steps = 300              # or: epochs = 5
//! batch_size = 128         # global, split across members
//! micro_batch = 32         # optional: at most this many samples per forward/backward
//! [model]
//! kind = "mlp"             # mlp | gpt | torchscript (or: torchscript = "model.pt")
//! hidden = [128]
//! [data]
//! kind = "csv"             # csv | text | npy | arithmetic | jsonl | parquet
//! path = "digits.csv.gz"
//! [optimizer]
//! kind = "adamw"           # adamw | sgd
//! lr = 0.003
//! [sync]
//! kind = "sync"            # sync | diloco (inner_steps, outer_lr, outer_momentum)
//! ```

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

mod data;
mod model;
mod optimizer;
mod sync;
#[cfg(test)]
mod tests;

pub use data::{DataKind, DataSpec};
pub use model::{HfInit, LoraSpec, ModelKind, ModelSpec, LORA_TARGETS};
pub use optimizer::{OptimizerKind, OptimizerSpec, Schedule};
pub use sync::{SyncKind, SyncSpec};

/// Largest job file accepted (it travels on the control plane).
pub const MAX_JOB_BYTES: usize = 32 * 1024;

/// Why a job file was refused.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The file could not be read.
    #[error("cannot read job file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The text is larger than [`MAX_JOB_BYTES`].
    #[error("job file is {0} bytes; the limit is {MAX_JOB_BYTES}")]
    TooLarge(usize),
    /// The TOML is malformed, a key is unknown, or a value has the wrong type.
    #[error("job file: {0}")]
    Parse(String),
    /// A key holds a value that is out of range or inconsistent with another.
    #[error("job file: `{key}` {problem}")]
    Invalid {
        /// The key, dotted (`optimizer.lr`).
        key: &'static str,
        /// What is wrong with it.
        problem: String,
    },
}

fn invalid(key: &'static str, problem: impl Into<String>) -> JobError {
    JobError::Invalid {
        key,
        problem: problem.into(),
    }
}

/// A training job.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Job name: letters, digits, `-`, `_`, `.`; names the output folder `runs/<name>/`.
    pub name: String,
    /// Seed for initialisation, data order and held-out split. Default: 1.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Optimizer steps to run (exactly one of `steps` and `epochs`).
    #[serde(default)]
    pub steps: Option<u64>,
    /// Data epochs to run (exactly one of `steps` and `epochs`).
    #[serde(default)]
    pub epochs: Option<u64>,
    /// Global batch size in samples, split across the members by share.
    pub batch_size: u64,
    /// Largest number of samples a member computes in one forward and backward pass: a
    /// larger share of a step is cut into micro-batches of at most this many (as equal as
    /// they can be), whose gradients are summed before the step's all-reduce (gradient
    /// accumulation: the same step in less memory). 0: a member's whole share in one pass.
    /// Default: 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub micro_batch: u64,
    /// Samples per data shard (the unit handed to members, and so the resolution at which
    /// `balance` can move samples between them). Default: 1.
    #[serde(default = "default_shard_size")]
    pub shard_size: u64,
    /// The job starts once this many members are in the view. Default: 1.
    #[serde(default = "default_min_nodes")]
    pub min_nodes: usize,
    /// Torch intra-op threads per node. Default: 1.
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// Fraction of the data held out for evaluation. Default: 0.1.
    #[serde(default = "default_eval_fraction")]
    pub eval_fraction: f64,
    /// Evaluate every this many steps (and after the last). 0: only after the last. Default: 0.
    #[serde(default)]
    pub eval_every: u64,
    /// Write a checkpoint every this many steps (and after the last). 0: only after the
    /// last. Default: 0.
    #[serde(default)]
    pub checkpoint_every: u64,
    /// Where `<name>/` is written. Default: `runs`.
    #[serde(default = "default_output_dir")]
    pub output_dir: PathBuf,
    /// Compare a hash of every member's weights every this many steps (0: never); a
    /// mismatch stops the job naming the members. Default: 50.
    #[serde(default = "default_consistency_every")]
    pub consistency_every: u64,
    /// Gradient guard: a member's gradient whose norm (of its mean over the member's
    /// samples) exceeds this many times the median of the other members' is left out of
    /// the step (its samples are computed by the others on top of their own); NaN/Inf
    /// gradients always are. 0: only the NaN/Inf check. Default: 10.
    #[serde(default = "default_grad_guard")]
    pub grad_guard: f64,
    /// Split each step's batch in proportion to the members' measured speed (samples per
    /// second of gradient computation, smoothed over steps) rather than equally, so a
    /// slower or busier member does not hold the others up. Default: true.
    #[serde(default = "default_true")]
    pub balance: bool,
    /// Gradient bucket size in bytes; buckets are all-reduced concurrently. Default: 4 MiB.
    #[serde(default = "default_bucket_bytes")]
    pub bucket_bytes: u64,
    /// Record which sample ids every member contributed at every step in
    /// `runs/<name>/samples.<member>.jsonl` (for audits and tests; the format and how to
    /// read it: `report::SamplesLog`, `report::used_samples`). Default: false.
    #[serde(default)]
    pub log_samples: bool,
    /// Where each member computes: `auto` (the member's node's device, `shoal up
    /// --device`, whose own default is the first CUDA device when libtorch sees one, else
    /// the CPU), `cpu`, `cuda` or `cuda:N`, resolved by each member on its own machine; a member asked for CUDA without one fails the job with a one-line reason.
    /// Members may differ (a view of CUDA and CPU members trains through the ring; one of
    /// CUDA members only, through NCCL). Not part of the job's identity: a checkpoint
    /// written on one device resumes on another. Default: `auto`.
    #[serde(default)]
    pub device: crate::device::DeviceSpec,
    /// `f32`, or `bf16`: mixed precision (forward and backward in bfloat16 on bfloat16
    /// copies of the weights; gradients summed and the update applied in f32 to f32 master
    /// weights, which checkpoints and state transfer carry). Default: `f32`.
    #[serde(default)]
    pub precision: crate::device::Precision,
    /// The model.
    pub model: ModelSpec,
    /// The data.
    pub data: DataSpec,
    /// The optimizer and learning-rate schedule.
    #[serde(default)]
    pub optimizer: OptimizerSpec,
    /// How members combine their work: synchronous steps, or DiLoCo outer rounds
    /// (`[sync] kind = "diloco"`, see [`SyncSpec`]). Default: `kind = "sync"`.
    #[serde(default, skip_serializing_if = "SyncSpec::is_default")]
    pub sync: SyncSpec,
}

fn default_seed() -> u64 {
    1
}
fn default_shard_size() -> u64 {
    1
}
fn default_min_nodes() -> usize {
    1
}
fn default_threads() -> usize {
    1
}
fn default_eval_fraction() -> f64 {
    0.1
}
fn default_output_dir() -> PathBuf {
    PathBuf::from("runs")
}
fn default_consistency_every() -> u64 {
    50
}
fn default_grad_guard() -> f64 {
    10.0
}
fn default_bucket_bytes() -> u64 {
    4 << 20
}

fn default_true() -> bool {
    true
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl JobSpec {
    /// Reads and validates a job file.
    pub fn load(path: &Path) -> Result<JobSpec, JobError> {
        let text = std::fs::read_to_string(path).map_err(|source| JobError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        JobSpec::parse(&text)
    }

    /// Parses and validates job text.
    pub fn parse(text: &str) -> Result<JobSpec, JobError> {
        if text.len() > MAX_JOB_BYTES {
            return Err(JobError::TooLarge(text.len()));
        }
        let spec: JobSpec =
            toml::from_str(text).map_err(|e| JobError::Parse(e.to_string().trim().to_string()))?;
        spec.validate()?;
        Ok(spec)
    }

    /// The job as TOML (what is announced on the swarm).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a job spec always serializes")
    }

    /// A hash naming this exact job (SHA-256 of its TOML form, `device` left out), in hex.
    pub fn hash(&self) -> String {
        hex::encode(self.identity())
    }

    /// A 64-bit digest of [`JobSpec::hash`] used to tag the job's collectives.
    pub fn tag_base(&self) -> u64 {
        u64::from_le_bytes(self.identity()[..8].try_into().expect("8 bytes"))
    }

    /// SHA-256 of the job as TOML, without where it runs (`device`): what the job is.
    fn identity(&self) -> [u8; 32] {
        let what = JobSpec {
            device: Default::default(),
            ..self.clone()
        };
        Sha256::digest(what.to_toml().as_bytes()).into()
    }

    /// Makes every relative path absolute: inputs (data, model) against `job_dir` (the job
    /// file's directory), `output_dir` against `cwd` (where `shoal train` was run).
    pub fn resolve_paths(&mut self, job_dir: &Path, cwd: &Path) {
        if self.output_dir.is_relative() {
            self.output_dir = cwd.join(&self.output_dir);
        }
        let base = job_dir;
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        for p in [
            self.model.torchscript.as_mut(),
            self.model.hf.as_mut(),
            self.data.path.as_mut(),
            self.data.files.as_mut(),
            self.data.features.as_mut(),
            self.data.labels.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            fix(p);
        }
    }

    /// `runs/<name>/`.
    pub fn run_dir(&self) -> PathBuf {
        self.output_dir.join(&self.name)
    }

    /// Checks ranges and consistency; the error names the key.
    pub fn validate(&self) -> Result<(), JobError> {
        self.validate_run()?;
        self.validate_model()?;
        self.validate_data()?;
        self.validate_optimizer()?;
        self.validate_sync()
    }

    /// The run's keys: name, length, batch and shard sizes, members, threads, guard, buckets.
    fn validate_run(&self) -> Result<(), JobError> {
        if self.name.is_empty()
            || self.name.len() > 64
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            || self.name.starts_with('.')
        {
            return Err(invalid(
                "name",
                "must be 1-64 characters of letters, digits, '-', '_', '.' (not starting with '.')",
            ));
        }
        match (self.steps, self.epochs) {
            (Some(0), _) => return Err(invalid("steps", "must be at least 1")),
            (_, Some(0)) => return Err(invalid("epochs", "must be at least 1")),
            (Some(_), Some(_)) => {
                return Err(invalid("steps", "and `epochs` are both set; set one"))
            }
            (None, None) => return Err(invalid("steps", "is missing (or set `epochs`)")),
            _ => {}
        }
        if self.batch_size == 0 || self.batch_size > 1 << 20 {
            return Err(invalid("batch_size", "must be between 1 and 1048576"));
        }
        if self.micro_batch > 1 << 20 {
            return Err(invalid(
                "micro_batch",
                "must be between 0 (off) and 1048576",
            ));
        }
        if self.shard_size == 0 {
            return Err(invalid("shard_size", "must be at least 1"));
        }
        if self.min_nodes == 0 || self.min_nodes > 1024 {
            return Err(invalid("min_nodes", "must be between 1 and 1024"));
        }
        if self.threads == 0 || self.threads > 256 {
            return Err(invalid("threads", "must be between 1 and 256"));
        }
        if !(self.eval_fraction > 0.0 && self.eval_fraction < 1.0) {
            return Err(invalid("eval_fraction", "must be in (0, 1)"));
        }
        if !(self.grad_guard.is_finite() && self.grad_guard >= 0.0) {
            return Err(invalid(
                "grad_guard",
                "must be 0 (off) or a positive factor",
            ));
        }
        if self.bucket_bytes < 4096 {
            return Err(invalid("bucket_bytes", "must be at least 4096"));
        }
        Ok(())
    }
}
