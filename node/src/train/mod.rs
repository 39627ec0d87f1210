//! Data-parallel training on the members of the view.
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

pub mod checkpoint;
pub mod data;
pub mod job;
pub mod model;
pub mod optim;
pub mod report;

use crate::data_plane::{DataPlane, DataPlaneError};
use coordinator_free::sharding::{self, DataCursor};
use coordinator_free::{NodeId, ReduceOp, View, ViewHash};
use data::Dataset;
use job::JobSpec;
use model::Model;
use optim::Optimizer;
use report::{EvalRecord, RunLog, SamplesLog, StepRecord};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tch::Tensor;
use tokio::sync::watch;

/// How long a job waits for `min_nodes` members before it fails.
pub const START_TIMEOUT: Duration = Duration::from_secs(600);
/// Retries of the final evaluation in later views.
const MAX_VIEW_RETRIES: u32 = 20;
/// After the job started, how long members wait for a usable view again (e.g. while too
/// few are left) before the job fails.
pub const REJOIN_TIMEOUT: Duration = Duration::from_secs(300);
/// After a failed collective, how long to wait for the view to change before retrying in
/// the same view (a transient failure).
const CHANGE_WAIT: Duration = Duration::from_secs(5);
/// Samples per forward pass during evaluation.
const EVAL_BATCH: usize = 512;
/// The checkpoint file in the run directory.
pub const CHECKPOINT_FILE: &str = "checkpoint.safetensors";
/// Checkpoint format marker (metadata `format`).
const CHECKPOINT_FORMAT: &str = "shoal-checkpoint-1";

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
    Checkpoint(#[from] checkpoint::CheckpointError),
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
    /// Where progress is published.
    pub report: Arc<Mutex<JobReport>>,
    /// Debug: when set to [`PERTURB_WEIGHTS`], the next step first nudges this member's
    /// weights (tests of the consistency check); to [`PERTURB_NAN_GRADIENT`], this member's
    /// next gradient is NaN (tests of the gradient guard); to
    /// [`PERTURB_ABANDON_COLLECTIVE`], its next collective is abandoned. Set through
    /// `POST /v1/debug/perturb`.
    pub perturb: Arc<std::sync::atomic::AtomicU8>,
}

/// Runs a job to its end on this member; the report holds the outcome either way.
pub fn run(ctx: TrainContext) {
    let report = ctx.report.clone();
    // A libtorch error surfaces as a panic in tch; it fails the job, never the node, and
    // never leaves the job looking alive.
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        Trainer::new(ctx).and_then(|mut t| t.run())
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

struct Trainer {
    ctx: TrainContext,
    data: Dataset,
    model: Model,
    params: Vec<(String, Tensor)>,
    opt: Optimizer,
    step: u64,
    cursor: DataCursor,
    total_steps: u64,
    order: Option<(u64, Vec<u64>)>,
    log: Option<RunLog>,
    started: Instant,
    tag_base: u64,
}

/// A collective tag: distinct per run (`base`), view, purpose, step and bucket. Binding it
/// to the view means a link opened for an abandoned collective of an earlier view (or of an
/// earlier attempt: a failed view is replaced by a new epoch) can never be taken for the
/// same step's collective in the current one.
fn tag(base: u64, view: &View, purpose: u64, step: u64, index: u64) -> u64 {
    let v = u64::from_le_bytes(view.hash.0[..8].try_into().expect("8 bytes"));
    let mut z = base ^ v.rotate_left(29) ^ purpose.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z ^= step.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z ^= index.wrapping_mul(0x94d0_49bb_1331_11eb);
    z
}

const TAG_SYNC: u64 = 1;
const TAG_GRAD: u64 = 2;
const TAG_EVAL: u64 = 3;
const TAG_EXCHANGE: u64 = 4;
const TAG_HASH: u64 = 5;

/// [`TrainContext::perturb`]: nudge the weights before the next step.
pub const PERTURB_WEIGHTS: u8 = 1;
/// [`TrainContext::perturb`]: make the next local gradient NaN.
pub const PERTURB_NAN_GRADIENT: u8 = 2;
/// [`TrainContext::perturb`]: this member abandons its next collective as if its link had
/// broken, leaving the others waiting in it (tests of the restart-together rule).
pub const PERTURB_ABANDON_COLLECTIVE: u8 = 3;

/// Why a collective of the loop did not complete.
#[derive(Debug, thiserror::Error)]
enum StepFailure {
    /// The collective failed (a member died, a link broke, a bound passed).
    #[error(transparent)]
    Collective(DataPlaneError),
    /// The view changed while it ran; it was abandoned.
    #[error("the view changed")]
    ViewChanged,
}

/// A committed step: its record, the sample ids this member used, and every member's
/// measured speed (samples/s).
type StepDone = (StepRecord, Vec<u64>, Vec<(NodeId, f64)>);

/// A step's outcome other than success.
#[derive(Debug)]
enum StepError {
    /// Redo the step in the next view.
    Failed(StepFailure),
    /// The job cannot go on.
    Fatal(TrainError),
}

/// u64 words as pairs of f32 bit patterns, for collectives that only copy (all-gather,
/// broadcast never add, so the bits arrive intact).
fn words_as_f32(words: &[u64]) -> Vec<f32> {
    words
        .iter()
        .flat_map(|w| [f32::from_bits(*w as u32), f32::from_bits((*w >> 32) as u32)])
        .collect()
}

/// The inverse of [`words_as_f32`].
fn f32_as_words(v: &[f32]) -> Vec<u64> {
    v.chunks_exact(2)
        .map(|c| c[0].to_bits() as u64 | ((c[1].to_bits() as u64) << 32))
        .collect()
}

/// A progress exchange or state sync failed: log it and wait for the next view.
fn collective_failed(
    machine: &mut coordinator_free::training::Training,
    view: &View,
    what: &str,
    e: StepFailure,
) -> ViewHash {
    tracing::info!(
        epoch = view.epoch,
        "state {what} failed ({e}); waiting for the next view"
    );
    machine.handle_failure();
    view.hash
}

impl Trainer {
    fn new(ctx: TrainContext) -> Result<Trainer, TrainError> {
        let job = &ctx.job;
        tch::set_num_threads(job.threads as i32);
        let context = job.model.context as usize;
        let data = Dataset::load(&job.data, job.seed, job.eval_fraction, context)?;
        let model = Model::build(job, data.task, job.seed)?;
        let params = model.params();
        let opt = Optimizer::new(&job.optimizer, &params)?;
        let total_steps = match (job.steps, job.epochs) {
            (Some(s), _) => s,
            (None, Some(e)) => e * sharding::steps_per_epoch(data.train_len(), job.batch_size),
            (None, None) => unreachable!("validated"),
        };
        tracing::info!(job = %job.name, params = model.numel(), train = data.train_len(),
            held_out = data.eval_len(), total_steps, "job loaded");
        let tag_base = job.tag_base() ^ ctx.run;
        {
            let mut r = ctx.report.lock().expect("report lock");
            r.total_steps = total_steps;
        }
        Ok(Trainer {
            ctx,
            data,
            model,
            params,
            opt,
            step: 0,
            cursor: DataCursor::default(),
            total_steps,
            order: None,
            log: None,
            started: Instant::now(),
            tag_base,
        })
    }

    fn job(&self) -> &JobSpec {
        &self.ctx.job
    }

    /// Waits until the view is settled with at least `min_nodes` members, or `bound`.
    fn settled_view(&mut self, min: usize, bound: Duration) -> Result<View, TrainError> {
        let views = &mut self.ctx.views;
        let r = self.ctx.rt.block_on(async {
            tokio::time::timeout(bound, views.wait_for(|s| s.settled && s.view.len() >= min))
                .await
                .map(|r| r.map(|s| s.view.clone()))
        });
        match r {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) => Err(TrainError::Stopped),
            Err(_) => Err(TrainError::NotEnoughMembers {
                have: self.ctx.views.borrow().view.len(),
                need: min,
                after: bound,
            }),
        }
    }

    fn am_first(&self, view: &View) -> bool {
        view.ids().next() == Some(&self.ctx.me)
    }

    fn run(&mut self) -> Result<(), TrainError> {
        use coordinator_free::training::{Action, Progress, Training, TrainingPlan};
        if self.ctx.resume {
            // Any member holding the checkpoint resumes from it; the sync hands its state
            // to the others (the member with the most steps is the root).
            let path = self.job().run_dir().join(CHECKPOINT_FILE);
            if path.exists() {
                self.load_checkpoint()?;
            }
        }
        let plan = TrainingPlan {
            min_nodes: self.job().min_nodes,
            total_steps: self.total_steps,
            batch_size: self.job().batch_size,
            n_samples: self.data.train_len(),
            shard_size: self.job().shard_size,
            balance: self.job().balance,
        };
        let mut machine = Training::new(
            self.ctx.me.clone(),
            plan,
            Progress {
                step: self.step,
                cursor: self.cursor,
            },
        );
        let mut samples_log = if self.job().log_samples {
            Some(SamplesLog::open(
                &self.job().run_dir(),
                self.ctx.me.as_str(),
                self.ctx.resume,
            )?)
        } else {
            None
        };
        let eval_every = self.job().eval_every;
        let ckpt_every = self.job().checkpoint_every;
        let mut first_view = true;
        let mut failed_view: Option<ViewHash> = None;
        loop {
            // A settled view other than the one we hold restarts the exchange.
            {
                let s = self.ctx.views.borrow();
                if s.settled {
                    machine.handle_view(&s.view);
                }
            }
            match machine.poll_action()? {
                Action::Finished => break,
                Action::WaitForView => {
                    let min = self.job().min_nodes;
                    let bound = if first_view {
                        START_TIMEOUT
                    } else {
                        REJOIN_TIMEOUT
                    };
                    let view = self.next_view(min, failed_view.take(), bound)?;
                    machine.handle_view(&view);
                }
                Action::ExchangeProgress { view } => {
                    if first_view {
                        first_view = false;
                        self.started = Instant::now();
                        self.set_report(|r| r.state = JobState::Running);
                    }
                    match self.exchange_progress(&view, machine.progress()) {
                        Ok(all) => machine.handle_progress(view.hash, &all)?,
                        Err(e) => {
                            failed_view =
                                Some(collective_failed(&mut machine, &view, "exchange", e))
                        }
                    }
                }
                Action::Sync {
                    view,
                    root,
                    root_rank,
                    progress,
                } => {
                    let t = Instant::now();
                    match self.sync_state(&view, root_rank) {
                        Ok(bytes) => {
                            self.set_progress(progress);
                            machine.handle_synced(view.hash);
                            let ms = t.elapsed().as_secs_f64() * 1e3;
                            tracing::info!(epoch = view.epoch, members = view.len(), root = %root, step = progress.step, bytes, ms, "state synced");
                            let samples = self.samples_through(progress.step);
                            self.set_report(|r| {
                                r.members = view.len();
                                r.step = progress.step;
                                r.samples = samples;
                            });
                            self.event(
                                &view,
                                serde_json::json!({"event": "sync", "step": progress.step,
                                    "view_epoch": view.epoch, "members": view.len(),
                                    "root": root.as_str(), "bytes": bytes, "ms": ms}),
                            )?;
                        }
                        Err(e) => {
                            failed_view = Some(collective_failed(&mut machine, &view, "sync", e))
                        }
                    }
                }
                Action::Step {
                    view,
                    step,
                    batch,
                    ranges,
                    weights,
                    coverage,
                } => {
                    self.maybe_perturb(step);
                    match self.train_step(&view, &batch, &ranges, &weights, &coverage) {
                        Ok((record, ids, speeds)) => {
                            machine.handle_speeds(view.hash, step, &speeds);
                            machine.handle_step(view.hash, step, true);
                            debug_assert_eq!(machine.progress().step, self.step);
                            if let Some(f) = samples_log.as_mut() {
                                f.append(record.step, batch.cursor.epoch, &ids)?;
                            }
                            let first = self.am_first(&view);
                            if first {
                                self.run_log()?.step(&record)?;
                            }
                            let last = self.step == self.total_steps;
                            if last || (eval_every > 0 && self.step.is_multiple_of(eval_every)) {
                                self.evaluate_logged(&view, first, last)?;
                            }
                            if first
                                && (last
                                    || (ckpt_every > 0 && self.step.is_multiple_of(ckpt_every)))
                            {
                                self.save_checkpoint()?;
                            }
                            let every = self.job().consistency_every;
                            if last || (every > 0 && self.step.is_multiple_of(every)) {
                                self.check_consistency(&view)?;
                            }
                        }
                        Err(StepError::Fatal(e)) => return Err(e),
                        Err(StepError::Failed(e)) => {
                            tracing::warn!(
                                step,
                                epoch = view.epoch,
                                "step failed ({e}); it is redone in the next view"
                            );
                            machine.handle_step(view.hash, step, false);
                            failed_view = Some(view.hash);
                            self.set_report(|r| r.redone += 1);
                            self.event(
                                &view,
                                serde_json::json!({"event": "redo", "step": step,
                                "view_epoch": view.epoch, "error": e.to_string()}),
                            )?;
                        }
                    }
                }
            }
        }
        if let Some(log) = self.log.as_mut() {
            log.finish(&format!("{} — loss", self.ctx.job.name))?;
        }
        Ok(())
    }

    /// The run's log, opened on first use (appending after step 0: a resumed run or a
    /// member that became the view's first member mid-run).
    fn run_log(&mut self) -> Result<&mut RunLog, TrainError> {
        if self.log.is_none() {
            self.log = Some(RunLog::open(&self.job().run_dir(), self.step > 0)?);
        }
        Ok(self.log.as_mut().expect("just opened"))
    }

    /// Writes an event line (sync, redo) when this member is the view's first.
    fn event(&mut self, view: &View, line: serde_json::Value) -> Result<(), TrainError> {
        if self.am_first(view) {
            self.run_log()?.event(&line)?;
        }
        Ok(())
    }

    /// Evaluates; the last evaluation must succeed (it is retried in later views), others
    /// are skipped when the view changes under them.
    fn evaluate_logged(&mut self, view: &View, first: bool, last: bool) -> Result<(), TrainError> {
        let mut view = view.clone();
        let mut tries = 0;
        loop {
            match self.evaluate(&view) {
                Err(StepError::Fatal(e)) => return Err(e),
                Ok(ev) => {
                    if first {
                        self.run_log()?.eval(&ev)?;
                    }
                    tracing::info!(
                        step = self.step,
                        loss = ev.loss,
                        accuracy = ev.accuracy,
                        "evaluated"
                    );
                    self.set_report(|r| r.eval = Some(ev));
                    return Ok(());
                }
                Err(StepError::Failed(e)) if last && tries < MAX_VIEW_RETRIES => {
                    tries += 1;
                    tracing::info!("final evaluation failed ({e}); retrying in the next view");
                    view = self.next_view(1, Some(view.hash), REJOIN_TIMEOUT)?;
                }
                Err(StepError::Failed(e)) => {
                    tracing::warn!("evaluation at step {} skipped: {e}", self.step);
                    return Ok(());
                }
            }
        }
    }

    /// Training samples the first `steps` steps consume (batches are shorter at the end of
    /// each data epoch).
    fn samples_through(&self, steps: u64) -> u64 {
        let n = self.data.train_len();
        let mut cursor = DataCursor::default();
        let mut total = 0;
        for _ in 0..steps {
            let Ok(b) = sharding::next_batch(cursor, self.job().batch_size, n) else {
                break;
            };
            total += b.len;
            cursor = sharding::advance(&b, n);
        }
        total
    }

    /// Debug: nudges the weights once when `POST /v1/debug/perturb` asked for it.
    fn maybe_perturb(&self, step: u64) {
        use std::sync::atomic::Ordering::SeqCst;
        if self
            .ctx
            .perturb
            .compare_exchange(PERTURB_WEIGHTS, 0, SeqCst, SeqCst)
            .is_ok()
        {
            tracing::warn!(step, "debug: perturbing this member's weights");
            let _guard = tch::no_grad_guard();
            if let Some((_, p)) = self.params.first() {
                let _ = p.shallow_clone().g_add_scalar_(1e-3);
            }
        }
    }

    /// A digest of this member's parameters (SHA-256 of their bytes, first 8 bytes, hex).
    fn weights_hash(&self) -> u64 {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for (name, t) in &self.params {
            let n = t.numel();
            let mut v = vec![0f32; n];
            t.contiguous().view([-1]).copy_data(&mut v, n);
            h.update(name.as_bytes());
            for x in v {
                h.update(x.to_le_bytes());
            }
        }
        u64::from_le_bytes(h.finalize()[..8].try_into().expect("8 bytes"))
    }

    /// Compares every member's weights hash on `view`; a mismatch fails the job naming
    /// the members. A view change during the comparison skips it.
    fn check_consistency(&mut self, view: &View) -> Result<(), TrainError> {
        let mine = self.weights_hash();
        self.set_report(|r| r.weights_hash = Some(format!("{mine:016x}")));
        if view.len() == 1 {
            return Ok(());
        }
        let input = words_as_f32(&[mine]);
        let mut out = vec![0f32; 2 * view.len()];
        let dp = self.ctx.dp.clone();
        let t = tag(self.tag_base, view, TAG_HASH, self.step, 0);
        match self.collective(view, dp.all_gather(view, t, &input, &mut out)) {
            Ok(()) => {
                let hashes = f32_as_words(&out);
                if hashes.iter().any(|&h| h != mine) {
                    let detail = view
                        .ids()
                        .zip(&hashes)
                        .map(|(id, h)| format!("{id}={h:016x}"))
                        .collect::<Vec<_>>()
                        .join(", ");
                    return Err(TrainError::Inconsistent {
                        step: self.step,
                        detail,
                    });
                }
                Ok(())
            }
            Err(e) => {
                tracing::info!(step = self.step, "weights comparison skipped: {e}");
                Ok(())
            }
        }
    }

    /// Waits for a settled view with at least `min` members, other than `not` when given
    /// (falling back to the same view after `bound`, so a transient failure is retried).
    fn next_view(
        &mut self,
        min: usize,
        not: Option<ViewHash>,
        bound: Duration,
    ) -> Result<View, TrainError> {
        if let Some(old) = not {
            let views = &mut self.ctx.views;
            // The timer must be created inside the runtime.
            let r = self.ctx.rt.block_on(async {
                tokio::time::timeout(
                    CHANGE_WAIT,
                    views.wait_for(|s| s.settled && s.view.hash != old && s.view.len() >= min),
                )
                .await
                .map(|r| r.map(|s| s.clone()))
            });
            if let Ok(Ok(s)) = r {
                return Ok(s.view);
            }
        }
        self.settled_view(min, bound)
    }

    /// Runs `fut` (a collective on `view`), abandoning it as soon as the view changes. A
    /// failure of the collective itself is reported to the node, which moves every member
    /// to the next epoch: members that failed at different moments, or are still waiting in
    /// the broken collective, all start over together instead of each retrying on its own
    /// in a view where the others are elsewhere.
    fn collective<T>(
        &mut self,
        view: &View,
        fut: impl std::future::Future<Output = Result<T, DataPlaneError>>,
    ) -> Result<T, StepFailure> {
        use std::sync::atomic::Ordering::SeqCst;
        let views = &mut self.ctx.views;
        let hash = view.hash;
        let abandon = self
            .ctx
            .perturb
            .compare_exchange(PERTURB_ABANDON_COLLECTIVE, 0, SeqCst, SeqCst)
            .is_ok();
        let r = if abandon {
            tracing::warn!(step = self.step, "debug: abandoning this collective");
            Err(StepFailure::Collective(DataPlaneError::Io {
                peer: self.ctx.me.clone(),
                source: std::io::Error::other("abandoned (debug)"),
            }))
        } else {
            self.ctx.rt.block_on(async {
                tokio::select! {
                    r = fut => r.map_err(StepFailure::Collective),
                    _ = views.wait_for(|s| s.view.hash != hash) => Err(StepFailure::ViewChanged),
                }
            })
        };
        if let Err(StepFailure::Collective(_)) = &r {
            // The node is gone only when it is shutting down; then nothing restarts anyway.
            let _ = self.ctx.view_failed.send(hash);
        }
        r
    }

    /// All-gathers every member's progress on `view`.
    fn exchange_progress(
        &mut self,
        view: &View,
        mine: coordinator_free::training::Progress,
    ) -> Result<Vec<(NodeId, coordinator_free::training::Progress)>, StepFailure> {
        let input = words_as_f32(&[mine.step, mine.cursor.epoch, mine.cursor.offset]);
        let mut out = vec![0f32; 6 * view.len()];
        let dp = self.ctx.dp.clone();
        let t = tag(self.tag_base, view, TAG_EXCHANGE, 0, 0);
        self.collective(view, dp.all_gather(view, t, &input, &mut out))?;
        let words = f32_as_words(&out);
        Ok(view
            .ids()
            .zip(words.chunks(3))
            .map(|(id, w)| {
                (
                    id.clone(),
                    coordinator_free::training::Progress {
                        step: w[0],
                        cursor: DataCursor {
                            epoch: w[1],
                            offset: w[2],
                        },
                    },
                )
            })
            .collect())
    }

    fn set_report(&self, f: impl FnOnce(&mut JobReport)) {
        let mut r = self.ctx.report.lock().expect("report lock");
        f(&mut r);
        r.wall_s = self.started.elapsed().as_secs_f64();
    }

    /// The state every member must share: parameters, optimizer state, and counters.
    fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self
            .params
            .iter()
            .map(|(n, t)| (format!("model.{n}"), t.shallow_clone()))
            .collect();
        v.extend(
            self.opt
                .named_state(&self.params)
                .into_iter()
                .map(|(n, t)| (format!("optim.{n}"), t)),
        );
        v
    }

    /// Takes `p` as this member's committed progress (the optimizer has applied one
    /// update per committed step).
    fn set_progress(&mut self, p: coordinator_free::training::Progress) {
        self.step = p.step;
        self.cursor = p.cursor;
        self.opt.t = p.step;
    }

    /// Loads the run directory's checkpoint into this member's state.
    fn load_checkpoint(&mut self) -> Result<(), TrainError> {
        let path = self.job().run_dir().join(CHECKPOINT_FILE);
        let c = checkpoint::read(&path)?;
        let bad = |p: String| TrainError::Resume {
            path: path.display().to_string(),
            problem: p,
        };
        let meta = |k: &str| -> Result<u64, TrainError> {
            c.metadata
                .get(k)
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| bad(format!("metadata `{k}` is missing")))
        };
        if c.metadata.get("format").map(String::as_str) != Some(CHECKPOINT_FORMAT) {
            return Err(bad("not a shoal checkpoint".into()));
        }
        if c.metadata.get("job_hash") != Some(&self.job().hash()) {
            return Err(bad(
                "it belongs to another job (the job file changed)".into()
            ));
        }
        let progress = coordinator_free::training::Progress {
            step: meta("step")?,
            cursor: DataCursor {
                epoch: meta("data_epoch")?,
                offset: meta("data_offset")?,
            },
        };
        let _guard = tch::no_grad_guard();
        for (name, mut t) in self.state_tensors() {
            let src = c
                .get(&name)
                .ok_or_else(|| bad(format!("tensor `{name}` is missing")))?;
            if src.size() != t.size() {
                return Err(bad(format!(
                    "tensor `{name}` is {:?}, the model has {:?}",
                    src.size(),
                    t.size()
                )));
            }
            t.copy_(src);
        }
        self.set_progress(progress);
        tracing::info!(step = self.step, "resumed from {}", path.display());
        Ok(())
    }

    fn save_checkpoint(&self) -> Result<(), TrainError> {
        let path = self.job().run_dir().join(CHECKPOINT_FILE);
        let meta = BTreeMap::from([
            ("format".to_string(), CHECKPOINT_FORMAT.to_string()),
            ("job".to_string(), self.job().name.clone()),
            ("job_hash".to_string(), self.job().hash()),
            ("step".to_string(), self.step.to_string()),
            ("data_epoch".to_string(), self.cursor.epoch.to_string()),
            ("data_offset".to_string(), self.cursor.offset.to_string()),
            ("total_steps".to_string(), self.total_steps.to_string()),
            ("model".to_string(), self.job().model_json()),
        ]);
        checkpoint::write(&path, &self.state_tensors(), &meta)?;
        tracing::info!(step = self.step, "checkpoint written to {}", path.display());
        Ok(())
    }

    /// Makes every member's parameters and optimizer state those of rank `root` (one
    /// broadcast). Returns the bytes moved.
    fn sync_state(&mut self, view: &View, root: u32) -> Result<u64, StepFailure> {
        let tensors = self.state_tensors();
        let numel: usize = tensors.iter().map(|(_, t)| t.numel()).sum();
        if view.len() == 1 {
            return Ok(0);
        }
        let mut flat = vec![0f32; numel];
        let mut off = 0;
        for (_, t) in &tensors {
            let n = t.numel();
            t.contiguous()
                .view([-1])
                .copy_data(&mut flat[off..off + n], n);
            off += n;
        }
        let t = tag(self.tag_base, view, TAG_SYNC, 0, 0);
        let dp = self.ctx.dp.clone();
        self.collective(view, dp.broadcast(view, t, &mut flat, root))?;
        let _guard = tch::no_grad_guard();
        let mut off = 0;
        for (_, mut t) in tensors {
            let n = t.numel();
            let src = Tensor::from_slice(&flat[off..off + n]).view(t.size().as_slice());
            t.copy_(&src);
            off += n;
        }
        Ok(numel as u64 * 4)
    }

    /// The epoch order for `epoch` (cached).
    fn order(&mut self, epoch: u64) -> &[u64] {
        if self.order.as_ref().map(|o| o.0) != Some(epoch) {
            let o = sharding::epoch_order(self.job().seed, epoch, self.data.train_len());
            self.order = Some((epoch, o));
        }
        &self.order.as_ref().expect("just set").1
    }

    /// One step on `view`: local gradients over this member's `ranges` of `batch`, the
    /// all-reduce, the guard, the update. Returns the record, the sample ids this member
    /// used, and every member's measured speed (samples/s of gradient computation; 0 for a
    /// member without samples), as the all-reduce delivered them to every member.
    ///
    /// The gradient guard rides on the all-reduce: besides its gradient (and loss, samples,
    /// correct), each member contributes its gradient norm and speed in slots of its own,
    /// zero elsewhere, so the sum hands every member every member's norm and speed (an
    /// all-gather without a round of its own). Members whose gradient is NaN/Inf or whose
    /// mean gradient's norm is far above the others' median
    /// (`coordinator_free::training::screen_gradients`) are then left out: the sum is
    /// discarded, the left-out members' samples are split over the others (`redistribute`,
    /// by the step's weights), who compute only those, add them to their own kept
    /// contribution and all-reduce once more (a member left out contributes zeros). The norm
    /// check runs on the first round only: in a redo a member's norm includes the samples it
    /// took over, and a large one there means the samples, not a member, carry the large
    /// gradient (checking again would leave out honest members one after another); NaN/Inf
    /// is refused in every round. A view of one member has nothing to compare and skips the
    /// guard.
    fn train_step(
        &mut self,
        view: &View,
        batch: &sharding::StepBatch,
        ranges: &[std::ops::Range<u64>],
        weights: &[(NodeId, u32)],
        coverage: &coordinator_free::training::Coverage,
    ) -> Result<StepDone, StepError> {
        use coordinator_free::training::{redistribute, screen_gradients};
        let t0 = Instant::now();
        let stats0 = self.ctx.dp.stats();
        let order = self.order(batch.cursor.epoch);
        let mut ids: Vec<u64> = ranges
            .iter()
            .flat_map(|r| r.clone().map(|p| order[p as usize]))
            .collect();
        let tc = Instant::now();
        let mut flat = self.local_gradients(&ids).map_err(StepError::Fatal)?;
        let compute = tc.elapsed();
        let speed = ids.len() as f64 / compute.as_secs_f64().max(1e-9);
        if self
            .ctx
            .perturb
            .compare_exchange(
                PERTURB_NAN_GRADIENT,
                0,
                std::sync::atomic::Ordering::SeqCst,
                std::sync::atomic::Ordering::SeqCst,
            )
            .is_ok()
        {
            tracing::warn!(step = self.step, "debug: this member's gradient is NaN");
            flat[0] = f32::NAN;
        }
        let numel = flat.len() - 3;
        let n = view.len();
        let me = self.ctx.me.clone();
        // The machine steps only in views holding this member.
        let rank = view
            .position(&me)
            .ok_or(StepError::Failed(StepFailure::ViewChanged))?;
        let (norms_at, speeds_at) = (numel + 3, numel + 3 + n);
        let mut rejected: Vec<NodeId> = Vec::new();
        let mut first_round = Duration::ZERO;
        // This member's own contribution of the round (gradient, loss, samples, correct over
        // `ids`), kept across the all-reduce: if the guard leaves someone out, it stands and
        // only the rejected members' samples are computed on top of it.
        let mut mine: Vec<f32> = Vec::new();
        // Every member's positions so far (the step's coverage, from the first rejection on).
        let mut covered: Option<coordinator_free::training::Coverage> = None;
        for attempt in 0..n as u64 {
            let ta = Instant::now();
            if n >= 2 {
                mine.clear();
                mine.extend_from_slice(&flat[..numel + 3]);
            }
            // A view of one member has no guard: no norm to compute. The norm is that of
            // the member's mean gradient (its sum over its samples, divided by their count):
            // shares differ, and a sum's norm grows with the samples in it, so comparing
            // sums would single out whoever got the larger share.
            let norm = if n < 2 || rejected.contains(&me) {
                0.0
            } else {
                optim::sum_squares(&flat[..numel]).sqrt() / ids.len().max(1) as f64
            };
            flat.resize(numel + 3 + 2 * n, 0.0);
            flat[norms_at + rank] = norm as f32;
            flat[speeds_at + rank] = if ids.is_empty() { 0.0 } else { speed as f32 };
            let dp = self.ctx.dp.clone();
            let bucket = (self.job().bucket_bytes as usize / 4).max(1);
            let (base, step, v) = (self.tag_base, self.step, view.clone());
            let fut = async {
                let futs = flat.chunks_mut(bucket).enumerate().map(|(i, chunk)| {
                    let index = (attempt << 32) | i as u64;
                    dp.all_reduce(
                        &v,
                        tag(base, &v, TAG_GRAD, step, index),
                        chunk,
                        ReduceOp::Sum,
                    )
                });
                futures::future::try_join_all(futs).await.map(|_| ())
            };
            self.collective(view, fut).map_err(StepError::Failed)?;
            if attempt == 0 {
                first_round = ta.elapsed();
            }
            if n < 2 {
                break;
            }
            let norms: Vec<(NodeId, f64)> = view
                .ids()
                .cloned()
                .zip(flat[norms_at..speeds_at].iter().map(|&x| f64::from(x)))
                .filter(|(id, _)| !rejected.contains(id))
                .collect();
            let factor = if attempt == 0 {
                self.job().grad_guard
            } else {
                0.0
            };
            let bad = screen_gradients(&norms, factor);
            if bad.is_empty() {
                break;
            }
            for (peer, why) in &bad {
                tracing::warn!(step = self.step, %peer, "rejected gradient from {peer}: {why}; the step is redone without it");
                self.set_report(|r| r.rejected_gradients += 1);
                if self.am_first(view) {
                    let line = serde_json::json!({"event": "guard", "step": self.step,
                        "rejected": peer.as_str(), "reason": why.to_string()});
                    self.event(view, line).map_err(StepError::Fatal)?;
                }
                rejected.push(peer.clone());
            }
            let covered = covered.get_or_insert_with(|| coverage.clone());
            let extra = redistribute(weights, covered, &rejected)
                .map_err(|e| StepError::Fatal(e.into()))?;
            for (id, rs) in covered.iter_mut() {
                if rejected.contains(id) {
                    rs.clear();
                } else if let Some((_, more)) = extra.iter().find(|(m, _)| m == id) {
                    rs.extend(more.iter().cloned());
                }
            }
            flat = if rejected.contains(&me) {
                ids.clear();
                vec![0f32; numel + 3]
            } else {
                let order = self.order(batch.cursor.epoch);
                let more: Vec<u64> = extra
                    .iter()
                    .find(|(m, _)| *m == me)
                    .map(|(_, rs)| {
                        rs.iter()
                            .flat_map(|r| r.clone().map(|p| order[p as usize]))
                            .collect()
                    })
                    .unwrap_or_default();
                let g = self.local_gradients(&more).map_err(StepError::Fatal)?;
                ids.extend(more);
                mine.iter().zip(&g).map(|(a, b)| a + b).collect()
            };
        }
        let speeds: Vec<(NodeId, f64)> = view
            .ids()
            .cloned()
            .zip(flat[speeds_at..].iter().map(|&x| f64::from(x)))
            .collect();
        flat.truncate(numel + 3);
        let redo = tc.elapsed() - compute - first_round;
        let mut rec = self
            .apply(flat, batch, view, t0, stats0)
            .map_err(StepError::Fatal)?;
        rec.compute_ms = compute.as_secs_f64() * 1e3;
        rec.guard_ms = redo.as_secs_f64() * 1e3;
        rec.allreduce_ms = first_round.as_secs_f64() * 1e3;
        tracing::debug!(
            step = rec.step,
            samples = ids.len(),
            compute_ms = rec.compute_ms,
            allreduce_ms = rec.allreduce_ms,
            guard_ms = rec.guard_ms,
            step_ms = rec.step_ms,
            "step"
        );
        Ok((rec, ids, speeds))
    }

    /// Gradients of the sum of losses over `ids`, flattened in parameter order, followed
    /// by `[loss_sum, samples, correct]`.
    fn local_gradients(&mut self, ids: &[u64]) -> Result<Vec<f32>, TrainError> {
        for (_, p) in &self.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        let numel: usize = self.params.iter().map(|(_, t)| t.numel()).sum();
        let mut flat = vec![0f32; numel + 3];
        if ids.is_empty() {
            return Ok(flat);
        }
        self.model.set_train(true);
        let batch = self.data.train_batch(ids);
        let (loss, correct) = self.model.loss_sum(&batch)?;
        loss.backward();
        let mut off = 0;
        for (_, p) in &self.params {
            let n = p.numel();
            let g = p.grad();
            if g.defined() {
                g.contiguous()
                    .view([-1])
                    .copy_data(&mut flat[off..off + n], n);
            }
            off += n;
        }
        flat[numel] = loss.double_value(&[]) as f32;
        flat[numel + 1] = ids.len() as f32;
        flat[numel + 2] = correct as f32;
        Ok(flat)
    }

    /// Applies the summed gradients and commits the step.
    fn apply(
        &mut self,
        flat: Vec<f32>,
        batch: &sharding::StepBatch,
        view: &View,
        t0: Instant,
        stats0: crate::data_plane::DataPlaneStats,
    ) -> Result<StepRecord, TrainError> {
        let numel = flat.len() - 3;
        let total = flat[numel + 1] as f64;
        if total as u64 != batch.len {
            return Err(TrainError::Collective {
                step: self.step,
                source: DataPlaneError::Buffer(format!(
                    "members contributed {total} samples, the batch has {}",
                    batch.len
                )),
            });
        }
        let loss = flat[numel] as f64 / total;
        if !loss.is_finite() {
            return Err(TrainError::Diverged(self.step));
        }
        // The mean gradient is `flat / total`, clipped to norm `grad_clip`: one scale the
        // fused update applies as it reads each element.
        let mut scale = 1.0 / total;
        let clip = self.job().optimizer.grad_clip;
        if clip > 0.0 {
            let norm = optim::sum_squares(&flat[..numel]).sqrt() * scale;
            if norm > clip {
                scale *= clip / norm;
            }
        }
        let lr = self.job().lr_at(self.step, self.total_steps);
        self.opt.step(&flat[..numel], scale as f32, lr);
        self.step += 1;
        self.cursor = sharding::advance(batch, self.data.train_len());
        let stats = self.ctx.dp.stats();
        let secs = t0.elapsed().as_secs_f64();
        let rec = StepRecord {
            step: self.step,
            loss,
            lr,
            samples: batch.len,
            samples_per_s: batch.len as f64 / secs.max(1e-9),
            step_ms: secs * 1e3,
            elapsed_s: self.started.elapsed().as_secs_f64(),
            compute_ms: 0.0,
            guard_ms: 0.0,
            allreduce_ms: 0.0,
            bytes_sent: stats.bytes_sent - stats0.bytes_sent,
            bytes_received: stats.bytes_received - stats0.bytes_received,
            members: view.len(),
            view_epoch: view.epoch,
            data_epoch: self.cursor.epoch,
            data_offset: self.cursor.offset,
        };
        self.set_report(|r| {
            r.step = rec.step;
            r.loss = Some(loss);
            r.samples_per_s = Some(rec.samples_per_s);
            r.step_ms = Some(rec.step_ms);
            r.samples += batch.len;
            r.members = rec.members;
            r.recent.push((rec.step, loss));
            r.recent_samples_per_s.push((rec.step, rec.samples_per_s));
            if r.recent.len() > 200 {
                r.recent.remove(0);
                r.recent_samples_per_s.remove(0);
            }
        });
        Ok(rec)
    }

    /// Loss and accuracy on the held-out split, each member evaluating a contiguous share.
    fn evaluate(&mut self, view: &View) -> Result<EvalRecord, StepError> {
        let rank = view.position(&self.ctx.me).unwrap_or(0);
        let total = self.data.eval_len();
        let k = view.len();
        let (lo, hi) = (total * rank / k, total * (rank + 1) / k);
        let mut sums = [0f32; 3];
        self.model.set_train(false);
        {
            let _guard = tch::no_grad_guard();
            let mut i = lo;
            while i < hi {
                let j = (i + EVAL_BATCH).min(hi);
                let b = self.data.eval_batch(i..j);
                let (loss, mut correct) = self
                    .model
                    .loss_sum(&b)
                    .map_err(|e| StepError::Fatal(e.into()))?;
                if let Some((prompts, answers)) = self.data.eval_prompts(i..j) {
                    let fmt = self.data.arithmetic.expect("arithmetic");
                    let gen = self
                        .model
                        .generate(&prompts, fmt.answer)
                        .map_err(|e| StepError::Fatal(e.into()))?;
                    let gen: Vec<i64> = Vec::try_from(gen.reshape([-1])).unwrap_or_default();
                    correct = gen
                        .chunks(fmt.answer)
                        .zip(&answers)
                        .filter(|(g, &a)| {
                            let bytes: Vec<u8> = g.iter().map(|&t| t as u8).collect();
                            fmt.parse_answer(&bytes) == Some(a)
                        })
                        .count() as i64;
                }
                sums[0] += loss.double_value(&[]) as f32;
                sums[1] += correct as f32;
                sums[2] += (j - i) as f32;
                i = j;
            }
        }
        self.model.set_train(true);
        let dp = self.ctx.dp.clone();
        let t = tag(self.tag_base, view, TAG_EVAL, self.step, 0);
        self.collective(view, dp.all_reduce(view, t, &mut sums, ReduceOp::Sum))
            .map_err(StepError::Failed)?;
        let n = sums[2].max(1.0) as f64;
        Ok(EvalRecord {
            step: self.step,
            loss: sums[0] as f64 / n,
            accuracy: sums[1] as f64 / n,
            samples: sums[2] as u64,
        })
    }
}
