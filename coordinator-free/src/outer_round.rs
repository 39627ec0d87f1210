//! DiLoCo: the outer-round state machine of one member (`[sync] kind = "diloco"`), and the
//! outer optimizer's math over `f32` slices.
//!
//! In DiLoCo (arXiv 2311.08105) every member takes `H` inner steps with the job's optimizer
//! on its own samples, without talking to anyone; then the members all-reduce the
//! *pseudo-gradient* (θ_global − θ_local, averaged) and apply one *outer* step to the shared
//! parameters θ_global with Nesterov SGD ([`outer_step`]). Communication drops by a factor
//! of about `H`.
//!
//! # The protocol, and why it is today's with a round for a step
//! [`crate::training`] commits one step when its all-reduce completes, and that atomic unit
//! is what keeps its guarantees under churn. Here the atomic unit is the **outer round**:
//!
//! 1. **Wait** for a settled view with at least `min_nodes` members.
//! 2. In every new view, **exchange progress** and **sync** from the member with the most
//!    committed steps, exactly as [`crate::training`] does (the same root choice). What the
//!    sync carries is the root's *committed* state: θ_global, the outer momentum and its
//!    progress (step and data cursor); after it every member's working weights are θ_global.
//!    A joiner thus enters at an outer boundary with θ_global and the outer momentum.
//! 3. **Inner phase**: the round covers the `H` consecutive global batches starting at the
//!    committed cursor (fewer for the job's last round, see [`round_steps`]). For each, every
//!    member computes its shards of it, split as [`crate::training`] splits a step's batch,
//!    and takes an inner optimizer step on them; there is no collective between inner steps.
//! 4. **Outer all-reduce**: the members sum their sample-weighted pseudo-gradients
//!    ([`pseudo_gradient`]); where it completes, the member applies [`outer_step`] and the
//!    round **commits** there: `H` steps and the cursor past their batches.
//! 5. A view change during the inner phase or the outer all-reduce, or a failed collective,
//!    **discards** the uncommitted inner work: the member goes back to 1, and the sync of
//!    the next view resets its working weights to θ_global. The round is redone from
//!    θ_global in the new view, with the same batches (the cursor moved only on commit), so
//!    every sample is used exactly once per data epoch in the committed model.
//!
//! A member whose outer all-reduce completed while another's failed (the last chunk of the
//! ring arrived here and not there) is ahead by one round, exactly like today's partial
//! commit of a step: the all-reduce completes only with every member's contribution, so that
//! member holds the one correct outer step; in the next view it has the most steps and
//! becomes the sync root, so the round is neither lost nor applied twice. A commit that dies
//! with its member was seen by nobody else, and the survivors redo it.
//!
//! # Choices
//! - **Batches, not per-member epochs.** Each inner step consumes one *global* batch
//!   (`batch_size` samples split over the view), so a round consumes `H · batch_size`
//!   samples whatever the view's size, the data cursor and [`Progress`] mean what they mean
//!   in synchronous training (`step` counts global batches), and checkpoints, the samples log
//!   and `epochs` carry over unchanged. With `n` members a member's inner batch is about
//!   `batch_size / n`.
//! - **Rounds are aligned at multiples of `H`** from step 0, so the round index is
//!   `step / H` and the committed outer steps are `ceil(step / H)`; a run resumed at a step
//!   that is not a multiple of `H` (a checkpoint of a synchronous run) takes one short round
//!   to the next multiple.
//! - **Sample-weighted average.** A member contributes its pseudo-gradient times its share
//!   of the round's samples ([`OuterAction::OuterReduce`]'s `samples / round_samples`), so
//!   the sum is the sample-weighted mean: DiLoCo's plain mean when shares are equal, and a
//!   member handed no samples (a tiny batch) contributes zero instead of diluting the step.
//! - **Shares are fixed for a round.** With `balance`, every inner step of a round is split
//!   by the share weights known at the round's start; the members' speeds (samples per
//!   second over the whole inner phase) ride on the outer all-reduce as they ride on a
//!   step's today ([`OuterTraining::handle_speeds`]), and move the next round's shares. As
//!   in synchronous training the speeds restart from equal shares at every sync.
//! - **The gradient guard does not apply** to inner steps (there is no exchange to compare
//!   against); screening pseudo-gradients is left to the shell for now.
//!
//! # Driving it from the shell
//! The loop is today's: at the top of every turn hand the settled view to
//! [`OuterTraining::handle_view`] (between inner steps too, so a round in a dead view stops
//! early), then act on [`OuterTraining::poll_action`]. The shell keeps three things besides
//! the working weights θ_local: θ_global, the outer momentum (zeros at the start), and
//! whatever inner optimizer state it restores a redone round from. `WaitForView`,
//! `ExchangeProgress` and the failure paths are synchronous training's, and can be shared
//! with it through [`RoundMachine`]. `Sync` broadcasts committed state, never θ_local.
//! `InnerStep` is local compute only. `OuterReduce` carries the bytes; its view binding and
//! failure handling are those of a step's all-reduce. Logs, evaluation, checkpoints and the
//! samples log follow commits of rounds: a checkpoint holds θ_global and the momentum, and
//! the sample ids of a round's inner steps are recorded only when the round commits.

use crate::sharding::{self, DataCursor, StepBatch};
use crate::training::{
    choose_root, split_batch, update_speeds, Coverage, Progress, RoundMachine, TrainingError,
    TrainingPlan,
};
use crate::view::{NodeId, View, ViewHash};
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// Inner steps per outer round when the job does not say: 50 (the larger of the two values
/// issue 20's slow-link benchmark runs; DiLoCo's paper uses 500 for much longer runs).
pub const DEFAULT_INNER_STEPS: u64 = 50;
/// The outer learning rate when the job does not say: 0.7 (DiLoCo's and OpenDiLoCo's).
pub const DEFAULT_OUTER_LR: f32 = 0.7;
/// The outer Nesterov momentum when the job does not say: 0.9 (DiLoCo's and OpenDiLoCo's).
pub const DEFAULT_OUTER_MOMENTUM: f32 = 0.9;

/// The outer loop's settings (`[sync] kind = "diloco"`).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct OuterConfig {
    /// Inner steps per outer round, `H` (≥ 1). Default [`DEFAULT_INNER_STEPS`] (50).
    pub inner_steps: u64,
    /// The outer learning rate (finite, > 0). Default [`DEFAULT_OUTER_LR`] (0.7).
    pub outer_lr: f32,
    /// The outer Nesterov momentum, in `[0, 1)`. Default [`DEFAULT_OUTER_MOMENTUM`] (0.9).
    pub outer_momentum: f32,
}

impl Default for OuterConfig {
    fn default() -> Self {
        OuterConfig {
            inner_steps: DEFAULT_INNER_STEPS,
            outer_lr: DEFAULT_OUTER_LR,
            outer_momentum: DEFAULT_OUTER_MOMENTUM,
        }
    }
}

impl OuterConfig {
    /// Checks every field's range.
    pub fn validate(&self) -> Result<(), OuterError> {
        if self.inner_steps == 0 {
            return Err(OuterError::NoInnerSteps);
        }
        if !(self.outer_lr.is_finite() && self.outer_lr > 0.0) {
            return Err(OuterError::BadLr(self.outer_lr));
        }
        if !(0.0..1.0).contains(&self.outer_momentum) {
            return Err(OuterError::BadMomentum(self.outer_momentum));
        }
        Ok(())
    }
}

/// Why an outer setting or an outer update was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OuterError {
    /// `inner_steps` is 0.
    #[error("inner_steps must be at least 1")]
    NoInnerSteps,
    /// `outer_lr` is not finite and positive.
    #[error("outer_lr must be finite and positive, got {0}")]
    BadLr(f32),
    /// `outer_momentum` is outside `[0, 1)`.
    #[error("outer_momentum must be in [0, 1), got {0}")]
    BadMomentum(f32),
    /// The slices of an outer update differ in length.
    #[error("outer update over slices of different lengths: {0:?}")]
    LengthMismatch(Vec<usize>),
}

fn same_len(lens: &[usize]) -> Result<(), OuterError> {
    if lens.windows(2).all(|w| w[0] == w[1]) {
        Ok(())
    } else {
        Err(OuterError::LengthMismatch(lens.to_vec()))
    }
}

/// A member's contribution to the outer all-reduce: `out[i] = weight · (global[i] −
/// local[i])`, its pseudo-gradient scaled by its share of the round's samples (`samples /
/// round_samples` of [`OuterAction::OuterReduce`]), so that the all-reduce's sum is the
/// sample-weighted mean pseudo-gradient.
pub fn pseudo_gradient(
    global: &[f32],
    local: &[f32],
    weight: f32,
    out: &mut [f32],
) -> Result<(), OuterError> {
    same_len(&[global.len(), local.len(), out.len()])?;
    for ((o, g), l) in out.iter_mut().zip(global).zip(local) {
        *o = weight * (g - l);
    }
    Ok(())
}

/// The outer Nesterov SGD step on θ_global (`global`) from the averaged pseudo-gradient
/// `g`: `m ← μ·m + g`, then `θ ← θ − lr·(g + μ·m)`, with `momentum` = m (zeros at the job's
/// start) and `mu` = μ. This is `torch.optim.SGD(lr, momentum=μ, nesterov=True)` with no
/// dampening or weight decay applied to `g` as the gradient, the outer optimizer of DiLoCo
/// and OpenDiLoCo (torch's first step sets the buffer to `g`, which is `μ·0 + g`).
pub fn outer_step(
    global: &mut [f32],
    momentum: &mut [f32],
    g: &[f32],
    lr: f32,
    mu: f32,
) -> Result<(), OuterError> {
    same_len(&[global.len(), momentum.len(), g.len()])?;
    for ((p, m), g) in global.iter_mut().zip(momentum.iter_mut()).zip(g) {
        *m = mu * *m + g;
        *p -= lr * (g + mu * *m);
    }
    Ok(())
}

/// The steps of the outer round that starts after `step` committed steps: up to the next
/// multiple of `inner_steps` (so rounds are aligned at multiples of `H` from step 0), and
/// never past `total_steps`. Empty once every step is committed. `inner_steps` of 0 counts
/// as 1.
pub fn round_steps(step: u64, inner_steps: u64, total_steps: u64) -> Range<u64> {
    let h = inner_steps.max(1);
    let end = (step / h).saturating_add(1).saturating_mul(h);
    step.min(total_steps)..end.min(total_steps)
}

/// What the shell should do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OuterAction {
    /// Wait for a settled view with enough members (then call
    /// [`OuterTraining::handle_view`]).
    WaitForView,
    /// All-gather every member's [`Progress`] on `view`, then call
    /// [`OuterTraining::handle_progress`].
    ExchangeProgress {
        /// The view.
        view: View,
    },
    /// Broadcast the *committed* state of `root` (θ_global, the outer momentum, and the
    /// inner optimizer's state as the shell keeps it) to every member; then every member,
    /// the root included, sets its working weights to θ_global (dropping uncommitted inner
    /// work) and calls [`OuterTraining::handle_synced`].
    Sync {
        /// The view.
        view: View,
        /// The member with the most progress.
        root: NodeId,
        /// Its rank in `view`.
        root_rank: u32,
        /// Its progress (what every member holds after the sync).
        progress: Progress,
    },
    /// One inner step, local: the job's optimizer on this member's `ranges` of `batch`, no
    /// collective; then call [`OuterTraining::handle_inner_step`]. Before the round's first
    /// inner step the working weights are θ_global.
    InnerStep {
        /// The view.
        view: View,
        /// The outer round (`step / H`).
        round: u64,
        /// The global step (for the inner learning-rate schedule and logs).
        step: u64,
        /// Inner steps of this round done before this one (0-based).
        inner: u64,
        /// The step's whole batch.
        batch: StepBatch,
        /// This member's positions in the epoch order.
        ranges: Vec<Range<u64>>,
        /// Every member's share weight (fixed for the round).
        weights: Vec<(NodeId, u32)>,
        /// Every member's positions, in `weights` order.
        coverage: Coverage,
    },
    /// The outer all-reduce: contribute [`pseudo_gradient`] with weight
    /// `samples / round_samples` (and this member's speed over the inner phase in a slot of
    /// its own, as a step's all-reduce carries it); where the sum completes, apply
    /// [`outer_step`] to θ_global and the momentum, set the working weights to θ_global, call
    /// [`OuterTraining::handle_speeds`] and then [`OuterTraining::handle_outer`] with `true`;
    /// where it fails, call [`OuterTraining::handle_outer`] with `false`.
    OuterReduce {
        /// The view.
        view: View,
        /// The outer round.
        round: u64,
        /// The global steps the round covers.
        steps: Range<u64>,
        /// Samples this member computed in the round.
        samples: u64,
        /// Samples of the round (every member's).
        round_samples: u64,
    },
    /// Every step is committed.
    Finished,
}

/// The inner phase of a round in a view.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Round {
    view: View,
    /// Inner steps done.
    done: u64,
    /// The cursor of the next inner step's batch.
    cursor: DataCursor,
    /// This member's samples so far.
    samples: u64,
    /// Every member's samples so far.
    round_samples: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    /// No usable view yet.
    Waiting,
    /// In `view`, progress not yet exchanged.
    Exchange(View),
    /// In `view`, syncing from `root`.
    Sync(View, NodeId, u32, Progress),
    /// Synced: inner steps of the round (all done: the outer all-reduce).
    Round(Round),
}

/// One member's DiLoCo state machine (`handle_*` in, [`OuterTraining::poll_action`] out).
#[derive(Clone, Debug)]
pub struct OuterTraining {
    me: NodeId,
    plan: TrainingPlan,
    inner_steps: u64,
    progress: Progress,
    phase: Phase,
    /// Smoothed speed of each member (samples/s) since the last sync.
    speeds: Vec<(NodeId, f64)>,
    /// Rounds this member abandoned (a failure or a view change; for metrics).
    pub redone: u64,
    /// Inner steps thrown away with those rounds (for metrics).
    pub discarded_inner_steps: u64,
    /// Syncs this member took part in (for metrics).
    pub syncs: u64,
}

impl OuterTraining {
    /// A member starting from `progress` (zero, or a checkpoint's), with `inner_steps`
    /// inner steps per round (`H`; refused when 0).
    pub fn new(
        me: NodeId,
        plan: TrainingPlan,
        inner_steps: u64,
        progress: Progress,
    ) -> Result<OuterTraining, OuterError> {
        if inner_steps == 0 {
            return Err(OuterError::NoInnerSteps);
        }
        Ok(OuterTraining {
            me,
            plan,
            inner_steps,
            progress,
            phase: Phase::Waiting,
            speeds: Vec::new(),
            redone: 0,
            discarded_inner_steps: 0,
            syncs: 0,
        })
    }

    /// What this member has committed (steps are global batches; always a round boundary).
    pub fn progress(&self) -> Progress {
        self.progress
    }

    /// Outer rounds committed: `ceil(step / H)` (a run resumed at an unaligned step counts
    /// the round it resumed inside as one).
    pub fn rounds(&self) -> u64 {
        self.progress.step.div_ceil(self.inner_steps)
    }

    /// Inner steps per round.
    pub fn inner_steps(&self) -> u64 {
        self.inner_steps
    }

    /// The round now under way: its index and steps.
    fn round(&self) -> (u64, Range<u64>) {
        let steps = round_steps(self.progress.step, self.inner_steps, self.plan.total_steps);
        (self.progress.step / self.inner_steps, steps)
    }

    /// Leaves the current phase for `next`, counting uncommitted inner work as discarded.
    fn abandon(&mut self, next: Phase) {
        if let Phase::Round(r) = &self.phase {
            if r.done > 0 {
                self.redone += 1;
                self.discarded_inner_steps += r.done;
            }
        }
        self.phase = next;
    }

    /// A settled view (every member reports it). A view other than the one held discards the
    /// round under way; one without this member, or with too few members, means waiting.
    pub fn handle_view(&mut self, view: &View) {
        let current = match &self.phase {
            Phase::Waiting => None,
            Phase::Exchange(v) | Phase::Sync(v, ..) => Some(v.hash),
            Phase::Round(r) => Some(r.view.hash),
        };
        if current == Some(view.hash) {
            return;
        }
        let next = if view.contains(&self.me) && view.len() >= self.plan.min_nodes {
            Phase::Exchange(view.clone())
        } else {
            Phase::Waiting
        };
        self.abandon(next);
    }

    /// The result of [`OuterAction::ExchangeProgress`]: every member's progress, in any
    /// order. The root is chosen as in synchronous training (most steps, then rendezvous).
    pub fn handle_progress(
        &mut self,
        view: ViewHash,
        all: &[(NodeId, Progress)],
    ) -> Result<(), TrainingError> {
        let Phase::Exchange(v) = &self.phase else {
            return Ok(()); // stale
        };
        if v.hash != view {
            return Ok(());
        }
        let (root, rank, progress) = choose_root(v, all, &self.plan)?;
        self.phase = Phase::Sync(v.clone(), root, rank, progress);
        Ok(())
    }

    /// The sync of [`OuterAction::Sync`] completed: this member holds the root's committed
    /// state, and its working weights are θ_global.
    pub fn handle_synced(&mut self, view: ViewHash) {
        if let Phase::Sync(v, _, _, p) = &self.phase {
            if v.hash == view {
                self.progress = *p;
                self.syncs += 1;
                self.speeds.clear();
                self.phase = Phase::Round(self.fresh_round(v.clone()));
            }
        }
    }

    fn fresh_round(&self, view: View) -> Round {
        Round {
            view,
            done: 0,
            cursor: self.progress.cursor,
            samples: 0,
            round_samples: 0,
        }
    }

    /// Inner step `inner` of `round` on `view` is done (the inner optimizer stepped).
    /// Stale reports are ignored.
    pub fn handle_inner_step(
        &mut self,
        view: ViewHash,
        round: u64,
        inner: u64,
    ) -> Result<(), TrainingError> {
        let (index, steps) = self.round();
        let Phase::Round(r) = &self.phase else {
            return Ok(());
        };
        let len = steps.end - steps.start;
        if r.view.hash != view || round != index || inner != r.done || r.done >= len {
            return Ok(());
        }
        let batch = sharding::next_batch(r.cursor, self.plan.batch_size, self.plan.n_samples)?;
        let (ranges, ..) = split_batch(&r.view, &self.me, &self.plan, &self.speeds, &batch)?;
        let mine: u64 = ranges.iter().map(|p| p.end - p.start).sum();
        let cursor = sharding::advance(&batch, self.plan.n_samples);
        if let Phase::Round(r) = &mut self.phase {
            r.done += 1;
            r.cursor = cursor;
            r.samples += mine;
            r.round_samples += batch.len;
        }
        Ok(())
    }

    /// The speeds (samples/s over the inner phase) every member measured in `round` on
    /// `view`, as all-gathered with the outer all-reduce (so identical on every member);
    /// call before committing the round with [`OuterTraining::handle_outer`]. They set the
    /// shares of the next round as a step's do in synchronous training. Stale reports are
    /// ignored.
    pub fn handle_speeds(&mut self, view: ViewHash, round: u64, measured: &[(NodeId, f64)]) {
        if !self.at_outer(view, round) {
            return;
        }
        if let Phase::Round(r) = &self.phase {
            update_speeds(&mut self.speeds, &r.view, measured);
        }
    }

    /// Whether this member is at the outer all-reduce of `round` on `view`.
    fn at_outer(&self, view: ViewHash, round: u64) -> bool {
        let (index, steps) = self.round();
        matches!(&self.phase, Phase::Round(r)
            if r.view.hash == view && round == index && !steps.is_empty()
                && r.done == steps.end - steps.start)
    }

    /// The outcome of [`OuterAction::OuterReduce`] for `round` on `view`: `true` (the
    /// all-reduce completed and the outer step is applied) commits the round; `false`
    /// discards it, and the member waits for the next view. Stale reports are ignored.
    pub fn handle_outer(&mut self, view: ViewHash, round: u64, ok: bool) {
        if !self.at_outer(view, round) {
            return;
        }
        let Phase::Round(r) = &self.phase else {
            return;
        };
        if ok {
            let (_, steps) = self.round();
            self.progress = Progress {
                step: steps.end,
                cursor: r.cursor,
            };
            self.phase = Phase::Round(self.fresh_round(r.view.clone()));
        } else {
            // Nothing committed here; in the next view, whoever did commit is the root.
            self.abandon(Phase::Waiting);
        }
    }

    /// A collective of the exchange or the sync failed (or the shell gave up on the round
    /// for a reason of its own): discard the round under way and wait for the next view.
    pub fn handle_failure(&mut self) {
        self.abandon(Phase::Waiting);
    }

    /// The next thing to do.
    ///
    /// A member that has committed every step still takes part in a view's exchange and
    /// sync, so a member that joins at the very end catches up instead of waiting.
    pub fn poll_action(&self) -> Result<OuterAction, TrainingError> {
        let finished = self.progress.step >= self.plan.total_steps;
        let (round, steps) = self.round();
        Ok(match &self.phase {
            Phase::Waiting | Phase::Round(_) if finished => OuterAction::Finished,
            Phase::Waiting => OuterAction::WaitForView,
            Phase::Exchange(v) => OuterAction::ExchangeProgress { view: v.clone() },
            Phase::Sync(v, root, rank, p) => OuterAction::Sync {
                view: v.clone(),
                root: root.clone(),
                root_rank: *rank,
                progress: *p,
            },
            Phase::Round(r) if r.done < steps.end - steps.start => {
                let batch =
                    sharding::next_batch(r.cursor, self.plan.batch_size, self.plan.n_samples)?;
                let (ranges, weights, coverage) =
                    split_batch(&r.view, &self.me, &self.plan, &self.speeds, &batch)?;
                OuterAction::InnerStep {
                    view: r.view.clone(),
                    round,
                    step: steps.start + r.done,
                    inner: r.done,
                    batch,
                    ranges,
                    weights,
                    coverage,
                }
            }
            Phase::Round(r) => OuterAction::OuterReduce {
                view: r.view.clone(),
                round,
                steps,
                samples: r.samples,
                round_samples: r.round_samples,
            },
        })
    }
}

impl RoundMachine for OuterTraining {
    fn progress(&self) -> Progress {
        OuterTraining::progress(self)
    }
    fn handle_view(&mut self, view: &View) {
        OuterTraining::handle_view(self, view)
    }
    fn handle_progress(
        &mut self,
        view: ViewHash,
        all: &[(NodeId, Progress)],
    ) -> Result<(), TrainingError> {
        OuterTraining::handle_progress(self, view, all)
    }
    fn handle_synced(&mut self, view: ViewHash) {
        OuterTraining::handle_synced(self, view)
    }
    fn handle_failure(&mut self) {
        OuterTraining::handle_failure(self)
    }
}

#[cfg(test)]
#[path = "outer_round_tests.rs"]
mod tests;
