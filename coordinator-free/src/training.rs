//! The training-round state machine of one member: when to wait, when to re-sync state,
//! which step to run on which view, and what a step's outcome commits.
//!
//! The protocol, per member:
//! 1. **Wait** for a settled view with at least `min_nodes` members.
//! 2. In every new view, **exchange progress** (each member's committed step and data
//!    cursor, an all-gather) and **sync**: every member takes the state of the member with
//!    the most committed steps (among equals, the one rendezvous hashing over the view
//!    picks), by a broadcast. A joiner thus pulls
//!    weights, optimizer state, step and cursor; a member that missed a commit catches up.
//! 3. **Step** on that view: the batch at the cursor, this member's shards of it. A step
//!    commits on a member only when its all-reduce completed there, which needs every
//!    member's contribution, so a committed step always holds the whole batch.
//! 4. A failed step (a member died, the view changed) commits nothing here; the member
//!    waits for the next view and goes back to 2. Whoever did commit it is ahead and becomes
//!    the sync root, so the step is neither lost nor applied twice, and its samples are
//!    consumed exactly once.
//!
//! 5. **Guard** ([`screen_gradients`]): before the gradients are summed, the members share
//!    each one's local gradient norm; a member whose gradient is NaN/Inf, or whose norm is far
//!    above the others' median, is left out of the step, and the others compute its samples
//!    at once on top of their own ([`redistribute`]), so the batch is still consumed exactly
//!    once and the update equals the one without the bad contribution.
//!
//! 6. **Shares follow speed** ([`Training::handle_speeds`]): each member reports how fast it
//!    computed its gradients (samples per second) with its step's contribution, so every
//!    member that commits the step holds the same numbers; the next step's batch is split in
//!    proportion to the smoothed speeds ([`share_weights`]), so a member slowed down (a
//!    slower machine, a busy one) gets fewer samples instead of making everyone wait. The
//!    speeds restart from equal shares at every sync, the one point every member passes
//!    through with the same state.
//!
//! Every collective is bound to its view by the data plane, so no step commits with a view
//! that differs between members. `tests/training_sim.rs` checks the protocol under random
//! crashes, joins and partial commits over many seeds.

use crate::sharding::{self, DataCursor, ShardingError, StepBatch};
use crate::view::{NodeId, View, ViewHash};
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// The rendezvous "shard" that names the sync root's role (distinct from data shards).
const SYNC_SHARD: u64 = u64::MAX;

/// What a member has committed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Progress {
    /// Steps committed.
    pub step: u64,
    /// Data cursor after them.
    pub cursor: DataCursor,
}

/// The job's shape, as the state machine needs it.
#[derive(Clone, Debug)]
pub struct TrainingPlan {
    /// Members needed before the first step.
    pub min_nodes: usize,
    /// Steps in the job.
    pub total_steps: u64,
    /// Global batch size.
    pub batch_size: u64,
    /// Training samples per data epoch.
    pub n_samples: u64,
    /// Samples per shard.
    pub shard_size: u64,
    /// Split each batch by measured speed ([`share_weights`]) instead of equally.
    pub balance: bool,
}

/// How far one step's measured speed moves a member's speed estimate (the rest is the
/// previous estimate): 0.5, so a change of speed shows in the shares within a few steps
/// while one noisy step moves them only half as far.
pub const SPEED_SMOOTHING: f64 = 0.5;

/// The smallest share weight relative to the fastest member's: 1/16, so a member that
/// measured very slowly once still gets samples and measures again.
pub const MIN_RELATIVE_WEIGHT: f64 = 1.0 / 16.0;

/// The fastest member's share weight (the resolution of the others'): 4096.
pub const WEIGHT_SCALE: f64 = 4096.0;

/// Share weights for `members` from speed estimates (samples/s; members without a finite
/// positive estimate count as the mean of the others', or everyone weighs 1 when nobody
/// has one): proportional to speed, the fastest at [`WEIGHT_SCALE`], none below
/// [`MIN_RELATIVE_WEIGHT`] of it. Deterministic: every member computing it from the same
/// estimates gets the same weights.
pub fn share_weights(members: &[NodeId], speeds: &[(NodeId, f64)]) -> Vec<(NodeId, u32)> {
    let estimates: Vec<Option<f64>> = members
        .iter()
        .map(|m| {
            speeds
                .iter()
                .find(|(id, _)| id == m)
                .map(|(_, s)| *s)
                .filter(|s| valid_speed(*s))
        })
        .collect();
    let known: Vec<f64> = estimates.iter().flatten().copied().collect();
    if known.is_empty() {
        return members.iter().map(|m| (m.clone(), 1)).collect();
    }
    let mean = known.iter().sum::<f64>() / known.len() as f64;
    let speed: Vec<f64> = estimates.iter().map(|s| s.unwrap_or(mean)).collect();
    let max = speed.iter().copied().fold(0.0, f64::max);
    members
        .iter()
        .zip(speed)
        .map(|(m, s)| {
            let rel = (s / max).max(MIN_RELATIVE_WEIGHT);
            (m.clone(), (rel * WEIGHT_SCALE).round().max(1.0) as u32)
        })
        .collect()
}

/// A measured speed that counts: finite and positive (a member without samples reports 0).
fn valid_speed(s: f64) -> bool {
    s.is_finite() && s > 0.0
}

/// What the shell should do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Wait for a settled view with enough members (then call [`Training::handle_view`]).
    WaitForView,
    /// All-gather every member's [`Progress`] on `view`, then call
    /// [`Training::handle_progress`].
    ExchangeProgress {
        /// The view.
        view: View,
    },
    /// Broadcast the state of `root` (rank `root_rank` in `view`) to every member, then call
    /// [`Training::handle_synced`] with the root's progress.
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
    /// Run step `step` on `view` over this member's `ranges` of the epoch order (positions
    /// of `batch`), then call [`Training::handle_step`].
    Step {
        /// The view.
        view: View,
        /// The step (0-based; the number of steps committed before it).
        step: u64,
        /// The whole batch.
        batch: StepBatch,
        /// This member's positions in the epoch order.
        ranges: Vec<Range<u64>>,
        /// Every member's share weight the batch was split by (for [`redistribute`]).
        weights: Vec<(NodeId, u32)>,
        /// Every member's positions, in `weights` order (`ranges` is this member's entry;
        /// for [`redistribute`]).
        coverage: Coverage,
    },
    /// Every step is committed.
    Finished,
}

/// Why the state machine refused an input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrainingError {
    /// A member reported progress beyond the job's end or an impossible cursor.
    #[error("member {member} reports impossible progress {progress:?}")]
    BadProgress {
        /// The member.
        member: NodeId,
        /// What it reported.
        progress: Progress,
    },
    /// The progress exchange did not cover exactly the view's members.
    #[error("progress exchange does not match the view's members")]
    IncompleteExchange,
    /// The batch could not be split.
    #[error(transparent)]
    Sharding(#[from] ShardingError),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    /// No usable view yet.
    Waiting,
    /// In `view`, progress not yet exchanged.
    Exchange(View),
    /// In `view`, syncing from `root`.
    Sync(View, NodeId, u32, Progress),
    /// Synced in `view`: stepping.
    Ready(View),
}

/// One member's training state machine.
#[derive(Clone, Debug)]
pub struct Training {
    me: NodeId,
    plan: TrainingPlan,
    progress: Progress,
    phase: Phase,
    /// Smoothed speed of each member (samples/s) in the current `Ready` phase.
    speeds: Vec<(NodeId, f64)>,
    /// Steps this member redid after a failure (for metrics).
    pub redone: u64,
    /// Syncs this member took part in (for metrics).
    pub syncs: u64,
}

impl Training {
    /// A member starting from `progress` (zero, or a checkpoint's).
    pub fn new(me: NodeId, plan: TrainingPlan, progress: Progress) -> Training {
        Training {
            me,
            plan,
            progress,
            phase: Phase::Waiting,
            speeds: Vec::new(),
            redone: 0,
            syncs: 0,
        }
    }

    /// What this member has committed.
    pub fn progress(&self) -> Progress {
        self.progress
    }

    /// A settled view (every member reports it). A view without this member, or with too
    /// few members, means waiting.
    pub fn handle_view(&mut self, view: &View) {
        let current = match &self.phase {
            Phase::Waiting => None,
            Phase::Exchange(v) | Phase::Sync(v, ..) | Phase::Ready(v) => Some(v.hash),
        };
        if current == Some(view.hash) {
            return;
        }
        self.phase = if view.contains(&self.me) && view.len() >= self.plan.min_nodes {
            Phase::Exchange(view.clone())
        } else {
            Phase::Waiting
        };
    }

    /// The result of [`Action::ExchangeProgress`]: every member's progress, in any order.
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

    /// The sync of [`Action::Sync`] completed: this member now holds the root's state.
    pub fn handle_synced(&mut self, view: ViewHash) {
        if let Phase::Sync(v, _, _, p) = &self.phase {
            if v.hash == view {
                self.progress = *p;
                self.syncs += 1;
                self.speeds.clear();
                self.phase = Phase::Ready(v.clone());
            }
        }
    }

    /// The speeds (samples/s of gradient computation) every member measured in `step` on
    /// `view`, as all-gathered with the step (so identical on every member); call before
    /// committing the step with [`Training::handle_step`]. Each estimate moves
    /// [`SPEED_SMOOTHING`] of the way to its new measurement; a member without one
    /// (non-finite or non-positive: it had no samples) moves that far toward the measured
    /// members' mean instead, so nobody stays without samples. Stale reports are ignored.
    pub fn handle_speeds(&mut self, view: ViewHash, step: u64, measured: &[(NodeId, f64)]) {
        let Phase::Ready(v) = &self.phase else {
            return;
        };
        if v.hash != view || step != self.progress.step {
            return;
        }
        update_speeds(&mut self.speeds, v, measured);
    }

    /// The outcome of [`Action::Step`] for `step` on `view`: `true` commits it.
    pub fn handle_step(&mut self, view: ViewHash, step: u64, ok: bool) {
        let Phase::Ready(v) = &self.phase else {
            return;
        };
        if v.hash != view || step != self.progress.step {
            return;
        }
        if ok {
            if let Ok(b) = self.batch() {
                self.progress = Progress {
                    step: self.progress.step + 1,
                    cursor: sharding::advance(&b, self.plan.n_samples),
                };
            }
        } else {
            // Nothing committed here; in the next view, whoever did commit is the root.
            self.redone += 1;
            self.phase = Phase::Waiting;
        }
    }

    /// A collective of the exchange or the sync failed: wait for the next view.
    pub fn handle_failure(&mut self) {
        self.phase = Phase::Waiting;
    }

    fn batch(&self) -> Result<StepBatch, ShardingError> {
        sharding::next_batch(
            self.progress.cursor,
            self.plan.batch_size,
            self.plan.n_samples,
        )
    }

    /// The next thing to do.
    ///
    /// A member that has committed every step still takes part in a view's exchange and
    /// sync, so a member that joins at the very end catches up instead of waiting.
    pub fn poll_action(&self) -> Result<Action, TrainingError> {
        let finished = self.progress.step >= self.plan.total_steps;
        Ok(match &self.phase {
            Phase::Waiting | Phase::Ready(_) if finished => Action::Finished,
            Phase::Waiting => Action::WaitForView,
            Phase::Exchange(v) => Action::ExchangeProgress { view: v.clone() },
            Phase::Sync(v, root, rank, p) => Action::Sync {
                view: v.clone(),
                root: root.clone(),
                root_rank: *rank,
                progress: *p,
            },
            Phase::Ready(v) => {
                let batch = self.batch()?;
                let (ranges, weights, coverage) =
                    split_batch(v, &self.me, &self.plan, &self.speeds, &batch)?;
                Action::Step {
                    view: v.clone(),
                    step: self.progress.step,
                    batch,
                    ranges,
                    weights,
                    coverage,
                }
            }
        })
    }
}

/// What the shell's view, exchange and sync handling needs of a round machine, shared by
/// synchronous steps ([`Training`]) and DiLoCo's outer rounds
/// ([`crate::outer_round::OuterTraining`]), so one piece of shell code serves both: the
/// methods mean what the inherent methods of the same names mean.
pub trait RoundMachine {
    /// What this member has committed.
    fn progress(&self) -> Progress;
    /// A settled view.
    fn handle_view(&mut self, view: &View);
    /// The result of the progress exchange on `view`.
    fn handle_progress(
        &mut self,
        view: ViewHash,
        all: &[(NodeId, Progress)],
    ) -> Result<(), TrainingError>;
    /// The sync on `view` completed.
    fn handle_synced(&mut self, view: ViewHash);
    /// A collective of the exchange or the sync failed: wait for the next view.
    fn handle_failure(&mut self);
}

impl RoundMachine for Training {
    fn progress(&self) -> Progress {
        Training::progress(self)
    }
    fn handle_view(&mut self, view: &View) {
        Training::handle_view(self, view)
    }
    fn handle_progress(
        &mut self,
        view: ViewHash,
        all: &[(NodeId, Progress)],
    ) -> Result<(), TrainingError> {
        Training::handle_progress(self, view, all)
    }
    fn handle_synced(&mut self, view: ViewHash) {
        Training::handle_synced(self, view)
    }
    fn handle_failure(&mut self) {
        Training::handle_failure(self)
    }
}

/// The sync root of `view` from every member's progress (`all`, any order), after checking
/// that it covers exactly the view's members and that nobody reports progress beyond the
/// job: the member with the most committed steps; among those, the one rendezvous hashing
/// over the view picks (so the load of serving joiners spreads over members from view to
/// view). Returns the root, its rank in `view` and its progress.
pub(crate) fn choose_root(
    v: &View,
    all: &[(NodeId, Progress)],
    plan: &TrainingPlan,
) -> Result<(NodeId, u32, Progress), TrainingError> {
    if all.len() != v.len() || !v.ids().all(|id| all.iter().any(|(m, _)| m == id)) {
        return Err(TrainingError::IncompleteExchange);
    }
    for (m, p) in all {
        if p.step > plan.total_steps || p.cursor.offset >= plan.n_samples.max(1) {
            return Err(TrainingError::BadProgress {
                member: m.clone(),
                progress: *p,
            });
        }
    }
    let score =
        |id: &NodeId| sharding::rendezvous_score(v.epoch, SYNC_SHARD, sharding::member_digest(id));
    let (root, progress) = all
        .iter()
        .max_by_key(|(m, p)| (p.step, score(m)))
        .map(|(m, p)| (m.clone(), *p))
        .ok_or(TrainingError::IncompleteExchange)?;
    let rank = v.position(&root).ok_or(TrainingError::IncompleteExchange)? as u32;
    Ok((root, rank, progress))
}

/// Moves the smoothed speed estimates `speeds` (of `view`'s members) toward the speeds every
/// member `measured`: each estimate moves [`SPEED_SMOOTHING`] of the way to its new
/// measurement; a member without one (non-finite or non-positive: it had no samples) moves
/// that far toward the measured members' mean instead, so nobody stays without samples.
pub(crate) fn update_speeds(speeds: &mut Vec<(NodeId, f64)>, v: &View, measured: &[(NodeId, f64)]) {
    for (id, s) in measured {
        if !valid_speed(*s) || !v.contains(id) {
            continue;
        }
        match speeds.iter_mut().find(|(m, _)| m == id) {
            Some((_, old)) => *old += SPEED_SMOOTHING * (s - *old),
            None => speeds.push((id.clone(), *s)),
        }
    }
    // A member that measured nothing (no samples) moves toward the others' mean, so one that
    // was handed nothing gets samples again and measures anew.
    let unmeasured = |id: &NodeId| !measured.iter().any(|(m, s)| m == id && valid_speed(*s));
    let others: Vec<f64> = speeds
        .iter()
        .filter(|(id, _)| !unmeasured(id))
        .map(|(_, s)| *s)
        .collect();
    if !others.is_empty() {
        let mean = others.iter().sum::<f64>() / others.len() as f64;
        for (id, s) in speeds.iter_mut() {
            if unmeasured(id) {
                *s += SPEED_SMOOTHING * (mean - *s);
            }
        }
    }
}

/// How `batch` splits over `view`: `me`'s positions, every member's share weight (by the
/// smoothed `speeds` when the plan balances, else equal) and every member's positions in
/// weight order.
pub(crate) fn split_batch(
    v: &View,
    me: &NodeId,
    plan: &TrainingPlan,
    speeds: &[(NodeId, f64)],
    batch: &StepBatch,
) -> Result<BatchSplit, ShardingError> {
    let ids: Vec<NodeId> = v.ids().cloned().collect();
    let weights = if plan.balance {
        share_weights(&ids, speeds)
    } else {
        ids.into_iter().map(|id| (id, 1)).collect()
    };
    let a = sharding::assign(&weights, batch, plan.shard_size)?;
    let coverage = weights
        .iter()
        .map(|(id, _)| (id.clone(), a.ranges(id).to_vec()))
        .collect();
    Ok((a.ranges(me).to_vec(), weights, coverage))
}

/// A batch's split: this member's positions, every member's share weight, every member's
/// positions (in weight order).
pub(crate) type BatchSplit = (Vec<Range<u64>>, Vec<(NodeId, u32)>, Coverage);

/// Why a member's gradient was left out of a step.
#[derive(Clone, Debug, PartialEq)]
pub enum Rejection {
    /// The gradient holds NaN or Inf.
    NonFinite,
    /// Its norm is more than `factor` times the median of the other members' norms.
    TooLarge {
        /// Its norm.
        norm: f64,
        /// The others' median.
        median: f64,
    },
}

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Rejection::NonFinite => write!(f, "non-finite gradient"),
            Rejection::TooLarge { norm, median } => write!(
                f,
                "gradient norm {norm:.3e} is {:.0}x the others' median {median:.3e}",
                norm / median.max(f64::MIN_POSITIVE)
            ),
        }
    }
}

/// Which members' gradients to leave out of a step, from every member's local gradient norm
/// (in view order; NaN or Inf when its gradient holds one). A finite norm is rejected when
/// it exceeds `factor` times the median of the other accepted members' finite norms and that
/// median is positive (members with no samples report 0 and are never outliers). `factor`
/// ≤ 0 turns the norm check off; non-finite gradients are always rejected. Every member
/// computes this from the same all-gathered norms, so all leave out the same members.
pub fn screen_gradients(norms: &[(NodeId, f64)], factor: f64) -> Vec<(NodeId, Rejection)> {
    let mut out: Vec<(NodeId, Rejection)> = norms
        .iter()
        .filter(|(_, n)| !n.is_finite())
        .map(|(id, _)| (id.clone(), Rejection::NonFinite))
        .collect();
    if factor <= 0.0 {
        return out;
    }
    for (i, (id, n)) in norms.iter().enumerate() {
        if !n.is_finite() || *n == 0.0 {
            continue;
        }
        let mut others: Vec<f64> = norms
            .iter()
            .enumerate()
            .filter(|(j, (_, m))| *j != i && m.is_finite() && *m > 0.0)
            .map(|(_, (_, m))| *m)
            .collect();
        if others.is_empty() {
            continue;
        }
        others.sort_by(f64::total_cmp);
        let k = others.len();
        let median = if k % 2 == 1 {
            others[k / 2]
        } else {
            (others[k / 2 - 1] + others[k / 2]) / 2.0
        };
        if median > 0.0 && *n > factor * median {
            out.push((id.clone(), Rejection::TooLarge { norm: *n, median }));
        }
    }
    out
}

/// Members with the positions (of a step's batch) each computes.
pub type Coverage = Vec<(NodeId, Vec<Range<u64>>)>;

/// Who computes what after the guard left members out of a step. Every accepted member
/// keeps the positions it has computed (its gradient over them stands) and takes a part of
/// the positions the `rejected` members held, which are split in position order by the
/// step's `weights` (the one from [`Action::Step`]; largest remainders, ties to the earlier
/// member). `covered` is every member's positions so far (the step's assignment plus earlier
/// redistributions; a rejected member whose positions were already handed on holds none).
/// Returns each accepted member's new positions, in `weights` order. Deterministic: every
/// member computes the same from the same inputs. Errors when no member is left.
pub fn redistribute(
    weights: &[(NodeId, u32)],
    covered: &Coverage,
    rejected: &[NodeId],
) -> Result<Coverage, TrainingError> {
    let accepted: Vec<(NodeId, u128)> = weights
        .iter()
        .filter(|(id, _)| !rejected.contains(id))
        .map(|(id, w)| (id.clone(), u128::from(*w)))
        .collect();
    let mut orphans: Vec<Range<u64>> = covered
        .iter()
        .filter(|(id, _)| rejected.contains(id))
        .flat_map(|(_, rs)| rs.iter().filter(|r| !r.is_empty()).cloned())
        .collect();
    orphans.sort_by_key(|r| r.start);
    let k: u128 = orphans.iter().map(|r| u128::from(r.end - r.start)).sum();
    let total: u128 = accepted.iter().map(|(_, w)| w).sum();
    if accepted.is_empty() || (total == 0 && k > 0) {
        return Err(ShardingError::NoPositiveWeight.into());
    }
    // Quotas: floors of k·w/W, the rest one each by largest remainder.
    let mut quota: Vec<u128> = accepted
        .iter()
        .map(|(_, w)| (k * w).checked_div(total).unwrap_or(0))
        .collect();
    let mut order: Vec<usize> = (0..accepted.len()).collect();
    order.sort_by_key(|&i| {
        let rem = (k * accepted[i].1).checked_rem(total).unwrap_or(0);
        (std::cmp::Reverse(rem), i)
    });
    let short = k - quota.iter().sum::<u128>();
    for &i in order.iter().take(short as usize) {
        quota[i] += 1;
    }
    // Hand out the orphaned positions in order.
    let mut out: Coverage = accepted
        .iter()
        .map(|(id, _)| (id.clone(), Vec::new()))
        .collect();
    let mut member = 0;
    for r in orphans {
        let mut start = r.start;
        while start < r.end {
            while quota[member] == 0 {
                member += 1;
            }
            let take = (u128::from(r.end - start)).min(quota[member]) as u64;
            out[member].1.push(start..start + take);
            quota[member] -= u128::from(take);
            start += take;
        }
    }
    Ok(out)
}

#[cfg(test)]
#[path = "training_tests.rs"]
mod tests;
