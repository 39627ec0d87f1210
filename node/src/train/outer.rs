//! DiLoCo on a member (`[sync] kind = "diloco"`): the loop that drives the core's
//! [`OuterTraining`] machine, and the state it keeps beside the model's working weights
//! θ_local (the optimizer's master weights): θ_global, the outer Nesterov momentum, and the
//! inner optimizer's state at the last commit ([`Outer`]). The core's `outer_round` module
//! says why the protocol is safe under churn; this is what each action does here.
//!
//! - `WaitForView`, `ExchangeProgress` and `Sync` are synchronous training's (`member`,
//!   `join`), with one addition to the sync: every member first puts its committed state
//!   back (θ_local = θ_global, the committed inner optimizer state), so the broadcast
//!   carries the root's committed state (θ_global, the outer momentum as the state tensor
//!   `outer.momentum`, the inner optimizer's state, and the progress the exchange agreed),
//!   and what arrives becomes every member's committed state.
//! - `InnerStep`: forward and backward on this member's samples of the step's batch, then
//!   the job's optimizer on their mean gradient (clipped to `grad_clip`); no collective. A
//!   member handed no samples of a batch does not step on it.
//! - `OuterReduce`: one sum all-reduce, on the data plane (or NCCL) exactly as a step's
//!   gradient all-reduce and bound to the view the same way, of the pseudo-gradient
//!   (θ_global − θ_local) weighted by this member's share of the round's samples, followed
//!   by the round's loss sum and sample count and this member's speed (samples per second
//!   of inner compute) in a slot of its own. Then the core's `outer_step` on θ_global and
//!   the momentum, and θ_local = θ_global. A failed all-reduce reports the view failed (as a
//!   step's does), drops the round, and the round is redone from θ_global in the next view.
//!
//! Before the outer all-reduce, the round's sample ids go to `samples.<member>.jsonl` as
//! lines not yet committed (they count only if the view commits the round on some member:
//! `report::used_samples`). Whatever follows a commit follows a round's: one
//! `metrics.jsonl` line per round ([`RoundRecord`]; inner steps have none), the round's
//! committed sample lines, and evaluation, checkpoints and the weights comparison
//! when a multiple of their period passed during the round (at a commit θ_local is
//! θ_global, so they all see θ_global; a checkpoint holds it and the momentum).

use super::collective::{StepError, StepFailure};
use super::member::{Trainer, Turn};
use super::phases::Phase;
use super::report::RoundRecord;
use super::step::{ids_at, ReduceRound, Source};
use super::{optim, TrainError};
use crate::data_plane::{DataPlaneError, DataPlaneStats};
use coordinator_free::outer_round::{
    outer_step, pseudo_gradient, OuterAction, OuterConfig, OuterError, OuterTraining,
};
use coordinator_free::sharding::StepBatch;
use coordinator_free::{NodeId, View, ViewHash};
use std::ops::Range;
use std::time::{Duration, Instant};
use tch::Tensor;

/// The name of the outer momentum among the state tensors (syncs, checkpoints).
const MOMENTUM: &str = "outer.momentum";

/// DiLoCo's state beside the working weights.
pub(super) struct Outer {
    /// `inner_steps`, `outer_lr`, `outer_momentum`.
    config: OuterConfig,
    /// θ_global: the committed weights, flat in parameter order.
    global: Vec<f32>,
    /// The outer Nesterov momentum, flat in parameter order (zeros at the job's start): a
    /// CPU tensor, so the state transfer and checkpoints carry it as they carry the rest.
    momentum: Tensor,
    /// The inner optimizer's state at the last commit, which a dropped round restarts from.
    inner: Option<(Vec<Tensor>, u64)>,
    /// This member's part of the round under way.
    work: RoundWork,
}

impl Outer {
    /// Fresh state for `numel` parameters (θ_global is taken from the weights when the
    /// loop starts).
    pub(super) fn new(config: OuterConfig, numel: usize) -> Outer {
        Outer {
            config,
            global: vec![0.0; numel],
            momentum: Tensor::zeros([numel as i64], (tch::Kind::Float, tch::Device::Cpu)),
            inner: None,
            work: RoundWork::default(),
        }
    }
}

/// What this member did in the round under way.
#[derive(Default)]
struct RoundWork {
    /// When its first inner step started, and the data plane's counters then.
    start: Option<(Instant, DataPlaneStats)>,
    /// Forward, backward and inner updates.
    compute: Duration,
    /// Σ loss over this member's samples.
    loss_sum: f64,
    /// The sample ids of each inner step: (step, 1-based; data epoch; ids).
    ids: Vec<(u64, u64, Vec<u64>)>,
    /// The inner learning rate of the latest inner step.
    lr: f64,
}

/// What a completed outer all-reduce delivered: the round's loss sum, and every member's
/// speed (samples/s of inner compute).
type Reduced = (f64, Vec<(NodeId, f64)>);

/// An outer update over slices of different lengths: a bug, not a peer's fault.
fn internal(e: OuterError) -> StepError {
    StepError::Fatal(TrainError::Internal(e.to_string()))
}

impl Trainer {
    /// The outer momentum under DiLoCo (nothing otherwise), as a named state tensor.
    pub(super) fn outer_state_tensors(&self) -> Vec<(String, Tensor)> {
        self.outer
            .iter()
            .map(|o| (MOMENTUM.to_string(), o.momentum.shallow_clone()))
            .collect()
    }

    /// DiLoCo: drops uncommitted inner work: θ_local = θ_global and the inner optimizer's
    /// committed state back. Nothing to do in synchronous training.
    pub(super) fn restore_committed(&mut self) {
        let Some(o) = self.outer.as_mut() else {
            return;
        };
        if let Some(inner) = &o.inner {
            self.opt.write_master(&o.global);
            self.opt.restore_state(inner);
        }
        o.work = RoundWork::default();
    }

    /// DiLoCo: the working state becomes the committed state (θ_global = θ_local, the
    /// inner optimizer's state kept for a redo). Nothing to do in synchronous training.
    pub(super) fn capture_committed(&mut self) {
        if let Some(o) = self.outer.as_mut() {
            self.opt.read_master(&mut o.global);
            o.inner = Some(self.opt.snapshot_state());
        }
    }

    /// Runs a DiLoCo job to its last round (or the first fatal error).
    pub(super) fn run_outer(&mut self) -> Result<(), TrainError> {
        let h = self
            .outer
            .as_ref()
            .expect("a diloco job")
            .config
            .inner_steps;
        let mut machine = OuterTraining::new(self.ctx.me.clone(), self.plan(), h, self.progress())
            .map_err(|e| TrainError::Internal(e.to_string()))?;
        // The weights from the seed, or the checkpoint's: the committed state.
        self.capture_committed();
        self.samples = self.samples_log()?;
        let mut turn = Turn::default();
        loop {
            self.observe_view(&mut machine);
            match machine.poll_action()? {
                OuterAction::Finished => return Ok(()),
                OuterAction::WaitForView => self.wait_for_view(&mut machine, &mut turn)?,
                OuterAction::ExchangeProgress { view } => {
                    self.exchange(&mut machine, &mut turn, &view)?
                }
                OuterAction::Sync {
                    view,
                    root,
                    root_rank,
                    progress,
                } => self.sync(&mut machine, &mut turn, &view, &root, root_rank, progress)?,
                OuterAction::InnerStep {
                    view,
                    round,
                    step,
                    inner,
                    batch,
                    ranges,
                    ..
                } => {
                    self.inner_step(step, inner, &batch, &ranges)?;
                    machine.handle_inner_step(view.hash, round, inner)?;
                }
                OuterAction::OuterReduce {
                    view,
                    round,
                    steps,
                    samples,
                    round_samples,
                } => {
                    self.write_ahead(&view)?;
                    let t = Instant::now();
                    match self.outer_reduce(&view, samples, round_samples) {
                        Ok(reduced) => {
                            self.maybe_die_after_collective();
                            let round = Round {
                                view: &view,
                                index: round,
                                steps,
                                samples: round_samples,
                                allreduce: t.elapsed(),
                            };
                            self.round_committed(&mut machine, round, reduced)?
                        }
                        Err(StepError::Fatal(e)) => return Err(e),
                        Err(StepError::Failed(e)) => {
                            let failed = self.round_failed(&mut machine, &view, round, e)?;
                            turn.failed_view = Some(failed);
                        }
                    }
                }
            }
        }
    }

    /// Inner step `inner` of a round (global step `step`, 0-based): the job's optimizer on
    /// the mean gradient of this member's samples at `ranges` of `batch`, no collective.
    fn inner_step(
        &mut self,
        step: u64,
        inner: u64,
        batch: &StepBatch,
        ranges: &[Range<u64>],
    ) -> Result<(), TrainError> {
        let stats = self.ctx.dp.stats();
        let o = self.outer.as_mut().expect("a diloco job");
        if inner == 0 {
            let now = Instant::now();
            o.work = RoundWork {
                start: Some((now, stats)),
                ..Default::default()
            };
            self.phases.start(now);
        }
        let t = Instant::now();
        let ids = ids_at(self.order(batch.cursor.epoch), ranges);
        self.phases.mark(Phase::Data);
        let lr = self.job().lr_at(step, self.total_steps);
        let mut loss_sum = 0.0;
        if !ids.is_empty() {
            let (flat, on_device) = self.local_gradients(&ids, 0)?;
            self.phases.mark(Phase::Compute);
            let numel = flat.len() - 3;
            loss_sum = f64::from(flat[numel]);
            if !loss_sum.is_finite() {
                return Err(TrainError::Diverged(step));
            }
            let (n, clip) = (ids.len() as f64, self.job().optimizer.grad_clip);
            // AdamW's bias correction counts global steps, as in synchronous training.
            self.opt.t = step;
            match on_device {
                Some(g) => {
                    let squares = || g.square().sum(tch::Kind::Double).double_value(&[]);
                    let scale = optim::mean_scale(n, clip, squares);
                    self.opt.step_tensor(&g, scale as f32, lr);
                }
                None => {
                    let squares = || optim::sum_squares(&flat[..numel]);
                    let scale = optim::mean_scale(n, clip, squares);
                    self.opt.step(&flat[..numel], scale as f32, lr);
                }
            }
            self.phases.mark(Phase::Optimizer);
        }
        self.phases.inner_step(step + 1);
        let o = self.outer.as_mut().expect("a diloco job");
        o.work.compute += t.elapsed();
        o.work.loss_sum += loss_sum;
        o.work.lr = lr;
        o.work.ids.push((step + 1, batch.cursor.epoch, ids));
        Ok(())
    }

    /// The outer all-reduce on `view` (this member computed `samples` of the round's
    /// `round_samples`) and, where it completes, the outer step: θ_global and the momentum
    /// move, and θ_local = θ_global.
    fn outer_reduce(
        &mut self,
        view: &View,
        samples: u64,
        round_samples: u64,
    ) -> Result<Reduced, StepError> {
        let rank = view
            .position(&self.ctx.me)
            .ok_or(StepError::Failed(StepFailure::ViewChanged))?;
        let o = self.outer.as_ref().expect("a diloco job");
        let numel = o.global.len();
        let (loss_at, samples_at, speeds_at) = (numel, numel + 1, numel + 2);
        let mut flat = vec![0f32; numel + 2 + view.len()];
        {
            let mut local = vec![0f32; numel];
            self.opt.read_master(&mut local);
            let share = match round_samples {
                0 => 0.0,
                all => (samples as f64 / all as f64) as f32,
            };
            pseudo_gradient(&o.global, &local, share, &mut flat[..numel]).map_err(internal)?;
        }
        flat[loss_at] = o.work.loss_sum as f32;
        flat[samples_at] = samples as f32;
        let secs = o.work.compute.as_secs_f64().max(1e-9);
        flat[speeds_at + rank] = if samples == 0 {
            0.0
        } else {
            (samples as f64 / secs) as f32
        };
        self.phases.mark(Phase::Optimizer);
        let round = ReduceRound {
            attempt: 0,
            grad_end: numel,
            source: Source::Ready,
            keep: None,
            nan: false,
            feedback: false,
        };
        self.all_reduce_round(view, round, &mut flat, &mut |_, _, _| {})?;
        let total = flat[samples_at] as f64;
        if total as u64 != round_samples {
            return Err(StepError::Fatal(TrainError::Collective {
                step: self.step,
                source: DataPlaneError::Buffer(format!(
                    "members contributed {total} samples, the round has {round_samples}"
                )),
            }));
        }
        let loss_sum = f64::from(flat[loss_at]);
        if !loss_sum.is_finite() {
            return Err(StepError::Fatal(TrainError::Diverged(self.step)));
        }
        let speeds = view
            .ids()
            .cloned()
            .zip(flat[speeds_at..].iter().map(|&x| f64::from(x)))
            .collect();
        let o = self.outer.as_mut().expect("a diloco job");
        let (lr, mu) = (o.config.outer_lr, o.config.outer_momentum);
        let mut m = vec![0f32; numel];
        o.momentum.copy_data(&mut m, numel);
        outer_step(&mut o.global, &mut m, &flat[..numel], lr, mu).map_err(internal)?;
        o.momentum.copy_(&Tensor::from_slice(&m));
        self.opt.write_master(&o.global);
        self.phases.mark(Phase::Optimizer);
        Ok((loss_sum, speeds))
    }

    /// A round committed: tells the machine, then records the round (its line, its
    /// samples) and evaluates, checkpoints and compares weights as the job's schedule asks.
    fn round_committed(
        &mut self,
        machine: &mut OuterTraining,
        round: Round<'_>,
        (loss_sum, speeds): Reduced,
    ) -> Result<(), TrainError> {
        let view = round.view;
        machine.handle_speeds(view.hash, round.index, &speeds);
        machine.handle_outer(view.hash, round.index, true);
        let before = self.step;
        self.set_progress(machine.progress());
        debug_assert_eq!(self.step, round.steps.end);
        let o = self.outer.as_mut().expect("a diloco job");
        o.inner = Some(self.opt.snapshot_state());
        let work = std::mem::take(&mut o.work);
        if let Some(f) = self.samples.as_mut() {
            for (step, epoch, ids) in &work.ids {
                f.append(*step, *epoch, ids, view, true)?;
            }
        }
        let stats = self.ctx.dp.stats();
        let (start, stats0) = work
            .start
            .unwrap_or_else(|| (Instant::now(), stats.clone()));
        self.phases.mark(Phase::Optimizer);
        let secs = start.elapsed().as_secs_f64();
        let loss = loss_sum / round.samples.max(1) as f64;
        let rec = RoundRecord {
            outer_round: machine.rounds(),
            step: self.step,
            inner_steps: round.steps.end - round.steps.start,
            loss,
            lr: work.lr,
            samples: round.samples,
            samples_per_s: round.samples as f64 / secs.max(1e-9),
            round_ms: secs * 1e3,
            compute_ms: work.compute.as_secs_f64() * 1e3,
            allreduce_ms: round.allreduce.as_secs_f64() * 1e3,
            phases: self.phases.totals(),
            elapsed_s: self.started.elapsed().as_secs_f64(),
            bytes_sent: stats.bytes_sent - stats0.bytes_sent,
            bytes_received: stats.bytes_received - stats0.bytes_received,
            members: view.len(),
            view_epoch: view.epoch,
            data_epoch: self.cursor.epoch,
            data_offset: self.cursor.offset,
        };
        tracing::debug!(
            outer_round = rec.outer_round,
            step = rec.step,
            loss,
            compute_ms = rec.compute_ms,
            allreduce_ms = rec.allreduce_ms,
            round_ms = rec.round_ms,
            "outer round"
        );
        self.trace_round(view, rec.outer_round, true, Some(&rec))?;
        if self.am_first(view) {
            self.run_log()?.round(&rec)?;
        }
        let redone = machine.redone;
        self.set_report(|r| {
            r.committed(rec.step, loss, rec.samples_per_s);
            r.step_ms = Some(rec.round_ms / rec.inner_steps.max(1) as f64);
            r.samples += rec.samples;
            r.members = rec.members;
            r.redone = redone;
        });
        self.scheduled(view, before)
    }

    /// Before the outer all-reduce on `view`: the round's samples as this member's lines of
    /// `view` in the samples log, not yet committed (see `report::SamplesLog`). Should this
    /// member die once its pseudo-gradient has left, the round may still commit on the
    /// others, with these samples in it; should its own end of the all-reduce fail, another
    /// member's may have completed, with them.
    fn write_ahead(&mut self, view: &View) -> Result<(), TrainError> {
        if let (Some(f), Some(o)) = (self.samples.as_mut(), self.outer.as_ref()) {
            for (step, epoch, ids) in &o.work.ids {
                f.append(*step, *epoch, ids, view, false)?;
            }
        }
        Ok(())
    }

    /// The outer all-reduce of `round` failed on `view` (`e`): tells the machine, drops the
    /// round's inner work (its samples stay in the log as lines written ahead, not
    /// committed), and records the redo. Returns the failed view.
    fn round_failed(
        &mut self,
        machine: &mut OuterTraining,
        view: &View,
        round: u64,
        e: StepFailure,
    ) -> Result<ViewHash, TrainError> {
        let start = self.step;
        tracing::warn!(
            round,
            step = start,
            epoch = view.epoch,
            "outer round failed ({e}); it is redone in the next view"
        );
        machine.handle_outer(view.hash, round, false);
        self.trace_round(view, round + 1, false, None)?;
        self.restore_committed();
        let redone = machine.redone;
        self.set_report(|r| r.redone = redone);
        self.event(
            view,
            serde_json::json!({"event": "redo", "outer_round": round, "step": start,
                "view_epoch": view.epoch, "error": e.to_string()}),
        )?;
        Ok(view.hash)
    }
}

/// A round whose outer all-reduce completed.
struct Round<'a> {
    /// Its view.
    view: &'a View,
    /// Its index (`step / inner_steps`).
    index: u64,
    /// The global steps it covers.
    steps: Range<u64>,
    /// Its samples (every member's).
    samples: u64,
    /// The outer all-reduce's wall time.
    allreduce: Duration,
}
