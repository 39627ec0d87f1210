//! Data-parallel training on the members of the view: the public face of a job (its
//! context, report, states and errors) and [`run`], which drives one member to the end.
//!
//! Every member runs the same loop on its own thread (tch is synchronous; collectives are
//! driven on the node's tokio runtime):
//! 1. wait until the view holds `min_nodes` members and every member reports that view;
//! 2. take the state of the view's first member (a broadcast: fresh weights from the
//!    seed, or the checkpoint when resuming), so every member starts identical;
//! 3. per step: the global batch is the next `batch_size` samples of the data epoch's
//!    order (`coordinator_free::sharding`); its shards go to members by rendezvous hashing;
//!    each member computes the gradient of the **sum** of its samples' losses, and one ring
//!    all-reduce (in buckets that run concurrently) sums gradients, loss and sample count,
//!    so the update equals single-process training on the whole batch;
//! 4. the view's first member writes `metrics.jsonl`, evaluations and checkpoints.
//!
//! A collective refused before any payload (the views differed for a moment) is retried in
//! the settled view; any other collective failure fails the job (a fixed member set: the
//! elastic variant is built on top of this loop).
//!
//! Where each part lives:
//! - `member`: the member's state and the loop that drives the core's
//!   `coordinator_free::training` machine (wait for a view, exchange progress, sync, step);
//! - `step`: one step (local gradients, the guarded all-reduce, the update);
//! - `outer`: DiLoCo (`[sync] kind = "diloco"`): the loop that drives the core's
//!   `coordinator_free::outer_round` machine (local inner steps, the pseudo-gradient
//!   all-reduce, the outer Nesterov step) and the state it keeps beside the weights;
//! - `join`: view changes and the state transfer that brings members
//!   (joiners, members that fell behind) to the same state;
//! - `backend`: which backend carries a view's gradient all-reduce (the ring, or NCCL when
//!   every member is on a CUDA device of its own) and the view's NCCL communicator;
//! - `collective`: tags, running a collective while watching the view,
//!   and how a failed one is classified;
//! - `consistency`: the periodic comparison of weights across members;
//! - `eval`: held-out evaluation and what its accuracy counts;
//! - `resume`: writing the run's checkpoint and resuming from it;
//! - [`phases`], [`trace`]: where each step's time goes (data, compute, wait, comm,
//!   optimizer) and the run's Chrome trace (`trace.<member>.jsonl`, `trace.json`);
//! - [`fault_injection`]: debug faults (`POST /v1/debug/perturb`) the tests use;
//! - [`job`], [`data`], [`model`], [`optim`], [`report`] (and [`crate::models::checkpoint`]): the job file, the
//!   datasets, the models, the optimizers, the run's files, the checkpoint format.

pub mod data;
pub mod job;
pub mod model;
pub mod optim;
pub mod report;

mod backend;
mod buckets;
mod collective;
mod consistency;
mod eval;
pub mod fault_injection;
mod join;
mod member;
mod outer;
pub mod phases;
mod resume;
mod step;
pub mod trace;

pub use fault_injection::{
    PERTURB_ABANDON_COLLECTIVE, PERTURB_DIE_AFTER_COLLECTIVE, PERTURB_NAN_GRADIENT, PERTURB_WEIGHTS,
};

use crate::data_plane::{DataPlane, DataPlaneError};
use coordinator_free::{NodeId, View, ViewHash};
use job::JobSpec;
use report::EvalRecord;
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// How long a job waits for `min_nodes` members before it fails.
pub const START_TIMEOUT: Duration = Duration::from_secs(600);
/// After the job started, how long members wait for a usable view again (e.g. while too
/// few are left) before the job fails.
pub const REJOIN_TIMEOUT: Duration = Duration::from_secs(300);
/// The checkpoint file in the run directory.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";

/// The view as the trainer needs it: the view, and whether every member reports it.
#[derive(Clone, Debug)]
pub struct ViewState {
    /// The current view.
    pub view: View,
    /// Every member's latest heartbeat names this view.
    pub settled: bool,
}

/// Why a job failed.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// The job's device is not available on this member.
    #[error(transparent)]
    Device(#[from] crate::device::DeviceError),
    /// The data could not be loaded.
    #[error(transparent)]
    Data(#[from] data::DataError),
    /// The model could not be built or does not fit the data.
    #[error(transparent)]
    Model(#[from] model::ModelError),
    /// The model's parameters cannot be optimised (tied or not f32).
    #[error("optimizer: {0}")]
    Optim(#[from] optim::OptimError),
    /// A checkpoint could not be read or written.
    #[error(transparent)]
    Checkpoint(#[from] crate::models::checkpoint::CheckpointError),
    /// A checkpoint belongs to another job or is incomplete.
    #[error("cannot resume from {path}: {problem}")]
    Resume {
        /// The checkpoint.
        path: String,
        /// Why not.
        problem: String,
    },
    /// The data split assignment failed.
    #[error(transparent)]
    Sharding(#[from] coordinator_free::sharding::ShardingError),
    /// The training protocol refused an input (a member reported impossible progress).
    #[error(transparent)]
    Protocol(#[from] coordinator_free::training::TrainingError),
    /// Members hold different weights (found by the periodic hash comparison).
    #[error("step {step}: weights differ between members: {detail}")]
    Inconsistent {
        /// The step.
        step: u64,
        /// Which members hold which hash.
        detail: String,
    },
    /// A collective failed.
    #[error("step {step}: {source}")]
    Collective {
        /// The step.
        step: u64,
        /// Why.
        source: DataPlaneError,
    },
    /// Not enough members joined in time.
    #[error("only {have} of min_nodes = {need} members after {after:?}")]
    NotEnoughMembers {
        /// Members present.
        have: usize,
        /// Members needed.
        need: usize,
        /// How long it waited.
        after: Duration,
    },
    /// The loss became NaN or infinite.
    #[error("step {0}: the loss is not finite")]
    Diverged(u64),
    /// The run directory could not be written.
    #[error("cannot write the run directory: {0}")]
    Output(#[from] std::io::Error),
    /// The node stopped.
    #[error("the node stopped")]
    Stopped,
    /// libtorch raised an error (a bug or a model that does not fit; the message says).
    #[error("internal error: {0}")]
    Internal(String),
}

/// Job states.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Waiting for `min_nodes` members.
    Waiting,
    /// Training.
    Running,
    /// Finished all steps.
    Done,
    /// Stopped with an error.
    Failed,
}

/// A job as `GET /v1/jobs` reports it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobReport {
    /// Run id (hex), unique per submission.
    pub run: String,
    /// Job name.
    pub job: String,
    /// Job hash (hex SHA-256 of its TOML form).
    pub hash: String,
    /// State.
    pub state: JobState,
    /// Steps committed.
    pub step: u64,
    /// Steps in the job.
    pub total_steps: u64,
    /// Latest mean loss.
    pub loss: Option<f64>,
    /// Latest global samples per second.
    pub samples_per_s: Option<f64>,
    /// Wall time of the latest step, ms.
    pub step_ms: Option<f64>,
    /// Training samples consumed.
    pub samples: u64,
    /// Members in the latest step's view.
    pub members: usize,
    /// Latest evaluation.
    pub eval: Option<EvalRecord>,
    /// Steps this member redid after a failure (a member died, the view changed).
    pub redone: u64,
    /// Gradients the guard left out of steps (NaN/Inf or far above the others' median).
    #[serde(default)]
    pub rejected_gradients: u64,
    /// Digest of this member's weights at the latest comparison (hex).
    pub weights_hash: Option<String>,
    /// Seconds since the job started training.
    pub wall_s: f64,
    /// Run directory.
    pub run_dir: String,
    /// Recent losses (step, loss), at most 200, for the dashboard.
    pub recent: Vec<(u64, f64)>,
    /// Recent throughput (step, samples/s), at most 200, for the dashboard.
    pub recent_samples_per_s: Vec<(u64, f64)>,
    /// The error, when failed.
    pub error: Option<String>,
    /// Where this member computes (`cpu`, `cuda:N`; empty until the job is loaded).
    #[serde(default)]
    pub device: String,
    /// The backend of the latest view's gradient all-reduce (`ring` or `nccl`; empty until
    /// the first progress exchange).
    #[serde(default)]
    pub backend: String,
}

impl JobReport {
    /// A fresh report for `job`.
    pub fn new(job: &JobSpec, run: u64) -> JobReport {
        JobReport {
            run: format!("{run:016x}"),
            job: job.name.clone(),
            hash: job.hash(),
            state: JobState::Waiting,
            step: 0,
            total_steps: 0,
            loss: None,
            samples_per_s: None,
            step_ms: None,
            samples: 0,
            members: 0,
            eval: None,
            redone: 0,
            rejected_gradients: 0,
            weights_hash: None,
            wall_s: 0.0,
            run_dir: job.run_dir().display().to_string(),
            recent: Vec::new(),
            recent_samples_per_s: Vec::new(),
            error: None,
            device: String::new(),
            backend: String::new(),
        }
    }

    /// A commit at `step` with mean loss `loss`, at `samples_per_s`: the latest figures,
    /// and the recent ones the dashboard plots (at most 200).
    pub fn committed(&mut self, step: u64, loss: f64, samples_per_s: f64) {
        self.step = step;
        self.loss = Some(loss);
        self.samples_per_s = Some(samples_per_s);
        self.recent.push((step, loss));
        self.recent_samples_per_s.push((step, samples_per_s));
        if self.recent.len() > 200 {
            self.recent.remove(0);
            self.recent_samples_per_s.remove(0);
        }
    }

    /// The one-line summary `shoal train --json` prints.
    pub fn summary(&self) -> serde_json::Value {
        serde_json::json!({
            "job": self.job,
            "run": self.run,
            "state": self.state,
            "steps": self.step,
            "final_loss": self.loss,
            "eval": self.eval,
            "samples": self.samples,
            "wall_s": self.wall_s,
            "members": self.members,
            "device": self.device,
            "backend": self.backend,
            "run_dir": self.run_dir,
            "error": self.error,
        })
    }
}

/// Everything a trainer needs from its node.
pub struct TrainContext {
    /// The job.
    pub job: JobSpec,
    /// Submission id (distinguishes runs of the same job).
    pub run: u64,
    /// Continue from the run directory's checkpoint.
    pub resume: bool,
    /// This node.
    pub me: NodeId,
    /// The data plane.
    pub dp: DataPlane,
    /// The view, as it changes.
    pub views: watch::Receiver<ViewState>,
    /// Where this trainer reports a view whose collective broke without a member change:
    /// the node moves every member to the next epoch, so all restart together.
    pub view_failed: tokio::sync::mpsc::UnboundedSender<ViewHash>,
    /// The node's runtime (collectives run there).
    pub rt: tokio::runtime::Handle,
    /// The node (the NCCL id of a view travels on its control plane).
    pub node: crate::node::NodeHandle,
    /// The node's device (`shoal up --device`): where a job with `device = "auto"` runs,
    /// so a machine with several GPUs runs one node per GPU.
    pub node_device: tch::Device,
    /// Where progress is published.
    pub report: Arc<Mutex<JobReport>>,
    /// Debug: when set to [`PERTURB_WEIGHTS`], the next step first nudges this member's
    /// weights (tests of the consistency check); to [`PERTURB_NAN_GRADIENT`], this member's
    /// next gradient is NaN (tests of the gradient guard); to
    /// [`PERTURB_ABANDON_COLLECTIVE`], its next collective is abandoned; to
    /// [`PERTURB_DIE_AFTER_COLLECTIVE`], the process ends as its next step's or round's
    /// all-reduce completes. Set through
    /// `POST /v1/debug/perturb`.
    pub perturb: Arc<std::sync::atomic::AtomicU8>,
}

/// Runs a job to its end on this member; the report holds the outcome either way.
pub fn run(ctx: TrainContext) {
    let report = ctx.report.clone();
    // A libtorch error surfaces as a panic in tch; it fails the job, never the node, and
    // never leaves the job looking alive.
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        member::Trainer::new(ctx).and_then(|mut t| t.run())
    }))
    .unwrap_or_else(|p| {
        let msg = p
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| p.downcast_ref::<&str>().copied())
            .unwrap_or("unknown panic");
        // libtorch's messages carry a C++ backtrace after the first sentence.
        let msg = msg.split("\\nException raised").next().unwrap_or(msg);
        let msg: String = msg.lines().next().unwrap_or("").chars().take(400).collect();
        Err(TrainError::Internal(msg))
    });
    // The trainer is gone: the memory of its steps goes back to the kernel.
    crate::allocator::give_back();
    let mut rep = report.lock().unwrap_or_else(|e| e.into_inner());
    match r {
        Ok(()) => rep.state = JobState::Done,
        Err(e) => {
            tracing::error!(job = %rep.job, "training failed: {e}");
            rep.state = JobState::Failed;
            rep.error = Some(e.to_string());
        }
    }
}
