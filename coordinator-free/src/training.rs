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
) -> Result<(Vec<Range<u64>>, Vec<(NodeId, u32)>, Coverage), ShardingError> {
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
mod tests {
    use super::*;
    use crate::view::ViewMember;

    fn view(epoch: u64, ids: &[&str]) -> View {
        View::new(
            epoch,
            ids.iter()
                .map(|i| ViewMember {
                    id: NodeId::new(*i).unwrap(),
                    incarnation: 1,
                })
                .collect(),
        )
    }

    fn node_ids(names: &[&str]) -> Vec<NodeId> {
        names.iter().map(|s| NodeId::new(*s).unwrap()).collect()
    }

    fn plan() -> TrainingPlan {
        TrainingPlan {
            min_nodes: 2,
            total_steps: 10,
            batch_size: 4,
            n_samples: 10,
            shard_size: 2,
            balance: false,
        }
    }

    #[test]
    fn waits_for_enough_members_then_syncs_from_the_furthest() {
        let a = NodeId::new("a").unwrap();
        let mut t = Training::new(a.clone(), plan(), Progress::default());
        assert_eq!(t.poll_action().unwrap(), Action::WaitForView);
        t.handle_view(&view(1, &["a"]));
        assert_eq!(
            t.poll_action().unwrap(),
            Action::WaitForView,
            "min_nodes = 2"
        );
        let v = view(2, &["a", "b", "c"]);
        t.handle_view(&v);
        assert!(matches!(
            t.poll_action().unwrap(),
            Action::ExchangeProgress { .. }
        ));
        let ahead = Progress {
            step: 3,
            cursor: DataCursor {
                epoch: 1,
                offset: 2,
            },
        };
        let all = [
            (a.clone(), Progress::default()),
            (NodeId::new("b").unwrap(), ahead),
            (NodeId::new("c").unwrap(), Progress::default()),
        ];
        t.handle_progress(v.hash, &all).unwrap();
        let Action::Sync {
            root, root_rank, ..
        } = t.poll_action().unwrap()
        else {
            panic!("sync expected")
        };
        assert_eq!((root.as_str(), root_rank), ("b", 1));
        t.handle_synced(v.hash);
        assert_eq!(t.progress(), ahead);
        let Action::Step { step, batch, .. } = t.poll_action().unwrap() else {
            panic!("step expected")
        };
        assert_eq!((step, batch.cursor), (3, ahead.cursor));
        // A failure commits nothing and waits for the next view.
        t.handle_step(v.hash, 3, false);
        assert_eq!(t.progress(), ahead);
        assert_eq!(t.redone, 1);
        assert_eq!(t.poll_action().unwrap(), Action::WaitForView);
        // Impossible progress is refused.
        let v2 = view(3, &["a", "b"]);
        t.handle_view(&v2);
        let bad = [
            (a, Progress::default()),
            (NodeId::new("b").unwrap(), Progress { step: 99, ..ahead }),
        ];
        assert!(matches!(
            t.handle_progress(v2.hash, &bad),
            Err(TrainingError::BadProgress { .. })
        ));
        assert_eq!(
            t.handle_progress(v2.hash, &bad[..1]),
            Err(TrainingError::IncompleteExchange)
        );
    }

    #[test]
    fn the_guard_leaves_out_non_finite_and_outlying_gradients() {
        let id = |s: &str| NodeId::new(s).unwrap();
        let norms = |v: &[f64]| -> Vec<(NodeId, f64)> {
            v.iter()
                .enumerate()
                .map(|(i, n)| (id(&format!("m{i}")), *n))
                .collect()
        };
        assert!(screen_gradients(&norms(&[1.0, 1.2, 0.9]), 10.0).is_empty());
        let r = screen_gradients(&norms(&[1.0, f64::NAN, 0.9]), 10.0);
        assert_eq!(r, vec![(id("m1"), Rejection::NonFinite)]);
        let r = screen_gradients(&norms(&[1.0, f64::INFINITY, 0.9]), 0.0);
        assert_eq!(
            r.len(),
            1,
            "non-finite is rejected even with the norm check off"
        );
        let r = screen_gradients(&norms(&[1.0, 1.1, 50.0, 0.9]), 10.0);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].0, id("m2"));
        assert!(matches!(r[0].1, Rejection::TooLarge { .. }));
        assert!(r[0].1.to_string().contains("median"));
        // Two members: the other's norm is the median.
        assert_eq!(screen_gradients(&norms(&[1.0, 20.0]), 10.0).len(), 1);
        assert!(screen_gradients(&norms(&[1.0, 5.0]), 10.0).is_empty());
        // A member without samples (norm 0) is never an outlier nor a reference.
        assert!(screen_gradients(&norms(&[0.0, 1.0, 1.5]), 10.0).is_empty());
        assert!(screen_gradients(&norms(&[3.0]), 10.0).is_empty());
        assert!(screen_gradients(&norms(&[1.0, 50.0]), 0.0).is_empty());
    }

    /// Positions of a member's ranges, flattened.
    fn positions(rs: &[Range<u64>]) -> Vec<u64> {
        rs.iter().flat_map(|r| r.clone()).collect()
    }

    #[test]
    fn a_rejected_members_positions_go_to_the_others_once() {
        let ids = node_ids(&["a", "b", "c"]);
        let batch = StepBatch {
            cursor: DataCursor {
                epoch: 0,
                offset: 40,
            },
            len: 30,
        };
        let weights: Vec<(NodeId, u32)> = vec![
            (ids[0].clone(), 3),
            (ids[1].clone(), 2),
            (ids[2].clone(), 1),
        ];
        let a = sharding::assign(&weights, &batch, 4).unwrap();
        let mut covered: Vec<(NodeId, Vec<Range<u64>>)> = ids
            .iter()
            .map(|id| (id.clone(), a.ranges(id).to_vec()))
            .collect();
        // b is left out: a and c take its positions 3 : 1, nobody else's.
        let b_had = positions(&covered[1].1);
        let extra = redistribute(&weights, &covered, &ids[1..2]).unwrap();
        assert_eq!(extra.len(), 2);
        assert_eq!((&extra[0].0, &extra[1].0), (&ids[0], &ids[2]));
        let (to_a, to_c) = (positions(&extra[0].1), positions(&extra[1].1));
        let mut got = [to_a.clone(), to_c.clone()].concat();
        got.sort();
        assert_eq!(got, b_had);
        let k = b_had.len();
        assert_eq!(
            to_a.len(),
            (3 * k + 2) / 4,
            "3 : 1, rounded to the larger remainder"
        );
        // Commit that round; then c is left out too: a ends with the whole batch.
        covered[0].1.extend(extra[0].1.iter().cloned());
        covered[2].1.extend(extra[1].1.iter().cloned());
        covered[1].1.clear();
        let rejected = [ids[1].clone(), ids[2].clone()];
        let extra = redistribute(&weights, &covered, &rejected).unwrap();
        assert_eq!(extra.len(), 1);
        covered[0].1.extend(extra[0].1.iter().cloned());
        let mut all = positions(&covered[0].1);
        all.sort();
        assert_eq!(all, (40..70).collect::<Vec<_>>());
        // Nobody left.
        assert!(redistribute(&weights, &covered, &ids).is_err());
        // Nothing to hand on: nobody gets anything.
        let none = redistribute(&weights, &covered, &ids[1..2]).unwrap();
        assert!(none.iter().all(|(_, rs)| rs.is_empty()));
    }

    /// Over many random splits, weights and rejections, the orphaned positions are handed
    /// out exactly once, only to accepted members, in shares within one of k·w/W.
    #[test]
    fn redistribution_is_exact_for_random_splits() {
        let ids = node_ids(&["a", "b", "c", "d", "e"]);
        let mut seed = 7u64;
        let mut next = |m: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % m
        };
        for _ in 0..500 {
            let n = 2 + next(4) as usize;
            let weights: Vec<(NodeId, u32)> = ids[..n]
                .iter()
                .map(|id| (id.clone(), 1 + next(4096) as u32))
                .collect();
            let batch = StepBatch {
                cursor: DataCursor {
                    epoch: 0,
                    offset: next(1000),
                },
                len: 1 + next(200),
            };
            let a = sharding::assign(&weights, &batch, 1 + next(8)).unwrap();
            let covered: Vec<(NodeId, Vec<Range<u64>>)> = ids[..n]
                .iter()
                .map(|id| (id.clone(), a.ranges(id).to_vec()))
                .collect();
            let rejected: Vec<NodeId> = ids[..n]
                .iter()
                .filter(|_| next(3) == 0)
                .take(n - 1)
                .cloned()
                .collect();
            let extra = redistribute(&weights, &covered, &rejected).unwrap();
            let orphaned: Vec<u64> = covered
                .iter()
                .filter(|(id, _)| rejected.contains(id))
                .flat_map(|(_, rs)| positions(rs))
                .collect();
            let mut got: Vec<u64> = extra.iter().flat_map(|(_, rs)| positions(rs)).collect();
            got.sort();
            let mut want = orphaned.clone();
            want.sort();
            assert_eq!(got, want);
            let w: u64 = extra
                .iter()
                .map(|(id, _)| u64::from(weights.iter().find(|(i, _)| i == id).unwrap().1))
                .sum();
            for (id, rs) in &extra {
                assert!(!rejected.contains(id));
                let wi = u64::from(weights.iter().find(|(i, _)| i == id).unwrap().1);
                let fair = orphaned.len() as f64 * wi as f64 / w as f64;
                assert!((positions(rs).len() as f64 - fair).abs() < 1.0 + 1e-9);
            }
        }
    }

    #[test]
    fn share_weights_follow_speed_within_bounds() {
        let ids = node_ids(&["a", "b", "c"]);
        // Nobody measured: equal.
        assert!(share_weights(&ids, &[]).iter().all(|(_, w)| *w == 1));
        let speeds = vec![
            (ids[0].clone(), 200.0),
            (ids[1].clone(), 100.0),
            (ids[2].clone(), 1.0),
        ];
        let w = share_weights(&ids, &speeds);
        assert_eq!(w[0].1, WEIGHT_SCALE as u32);
        assert_eq!(w[1].1, WEIGHT_SCALE as u32 / 2);
        assert_eq!(
            w[2].1,
            (WEIGHT_SCALE * MIN_RELATIVE_WEIGHT) as u32,
            "floored"
        );
        // An unmeasured member counts as the mean of the measured ones.
        let w = share_weights(&ids, &speeds[..2]);
        assert_eq!(w[2].1, (WEIGHT_SCALE * 0.75) as u32);
    }

    /// After a step in which b computed at half a's speed, the next batch splits about
    /// 2 : 1; a sync (any new round) starts again from equal shares; stale and
    /// non-finite reports change nothing.
    #[test]
    fn the_next_batch_follows_the_measured_speeds_until_the_next_sync() {
        let (a, b) = (NodeId::new("a").unwrap(), NodeId::new("b").unwrap());
        let plan = TrainingPlan {
            min_nodes: 2,
            total_steps: 10,
            batch_size: 30,
            n_samples: 300,
            shard_size: 1,
            balance: true,
        };
        let v = view(1, &["a", "b"]);
        let mut t = Training::new(a.clone(), plan, Progress::default());
        let ready = |t: &mut Training, v: &View| {
            t.handle_view(v);
            let p = Progress::default();
            t.handle_progress(v.hash, &[(a.clone(), p), (b.clone(), p)])
                .unwrap();
            t.handle_synced(v.hash);
        };
        ready(&mut t, &v);
        let mine = |t: &Training| match t.poll_action().unwrap() {
            Action::Step { ranges, .. } => ranges.iter().map(|r| r.end - r.start).sum::<u64>(),
            other => panic!("{other:?}"),
        };
        assert_eq!(mine(&t), 15);
        t.handle_speeds(v.hash, 5, &[(a.clone(), 1.0), (b.clone(), 9.0)]); // stale step
        t.handle_speeds(v.hash, 0, &[(a.clone(), 200.0), (b.clone(), 100.0)]);
        t.handle_step(v.hash, 0, true);
        assert_eq!(mine(&t), 20);
        // b's next measurement is missing (NaN): a's estimate moves halfway to 100, b's
        // halfway toward the mean of the measured (a's 150).
        t.handle_speeds(v.hash, 1, &[(a.clone(), 100.0), (b.clone(), f64::NAN)]);
        t.handle_step(v.hash, 1, true);
        assert_eq!(mine(&t), 16, "a at 150, b at 125");
        let v2 = view(2, &["a", "b"]);
        ready(&mut t, &v2);
        assert_eq!(mine(&t), 15);
    }
}
