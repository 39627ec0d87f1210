//! The training-round protocol under churn, over many seeds, on the simulated network
//! (`harness`): every member's view is the one its own membership machine derives from
//! heartbeats, so members see joins and crashes at different moments and may act in different
//! views. Members crash (also in the middle of a step, after some survivors committed it), new
//! members join, and a failed collective is reported as the shell does. A collective succeeds
//! only when every live member takes part in the same view and that view holds exactly the
//! live members. Checked: the live members' committed steps form one sequence (a commit lost
//! with its member is redone by the survivors); the batches tile each data epoch exactly once;
//! every member's state is that sequence's prefix; once churn stops, every member finishes
//! with the same state.

mod harness;

use coordinator_free::sharding::StepBatch;
use coordinator_free::training::{Action, Progress, Training, TrainingPlan};
use coordinator_free::{NodeId, ViewHash};
use harness::Sim;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Slots of the simulated network: initial members plus every joiner of a run.
const SLOTS: usize = 40;

struct Member {
    slot: usize,
    id: NodeId,
    machine: Training,
    /// The "weights": the steps applied, in order (what a state transfer copies).
    applied: Vec<(u64, ViewHash, StepBatch)>,
}

/// Starts the next unused slot of `net` as a new member with no progress.
fn join(net: &mut Sim, members: &mut Vec<Member>, next: &mut usize, plan: &TrainingPlan) {
    if *next == SLOTS {
        return;
    }
    net.start(*next);
    let id = net.id(*next).clone();
    members.push(Member {
        slot: *next,
        machine: Training::new(id.clone(), plan.clone(), Progress::default()),
        id,
        applied: Vec::new(),
    });
    *next += 1;
}

#[test]
fn committed_steps_form_one_sequence_under_churn() {
    let mut failed = 0;
    for seed in 0..400u64 {
        failed += run(seed);
    }
    // The members' own views must actually disagree at times (else the network is idle).
    assert!(failed > 400, "only {failed} failed collectives in 400 runs");
}

/// Runs one seed; returns how many collectives failed on some member.
fn run(seed: u64) -> u64 {
    let mut failed_collectives = 0;
    let mut rng = StdRng::seed_from_u64(seed);
    let plan = TrainingPlan {
        min_nodes: rng.gen_range(1..3),
        total_steps: rng.gen_range(5..40),
        batch_size: rng.gen_range(1..50),
        n_samples: rng.gen_range(1..300),
        shard_size: rng.gen_range(1..8),
        balance: rng.gen_bool(0.7),
    };
    let mut net = Sim::new(seed ^ 0x7ea1, SLOTS);
    let mut next = 0;
    let mut members: Vec<Member> = Vec::new();
    for _ in 0..rng.gen_range(1..5) {
        join(&mut net, &mut members, &mut next, &plan);
    }
    let churn_rounds = 150;
    for round in 0..5000 {
        let churn = round < churn_rounds;
        // Joins (after the churn, enough joiners arrive for min_nodes) and crashes between
        // collectives.
        if (churn && rng.gen_bool(0.08) && members.len() < 6)
            || (!churn && members.len() < plan.min_nodes)
        {
            join(&mut net, &mut members, &mut next, &plan);
        }
        if churn && rng.gen_bool(0.05) && members.len() > 1 {
            let i = rng.gen_range(0..members.len());
            net.crash(members.remove(i).slot);
        }
        // Heartbeats flow for a while; each member acts in the view its machine holds.
        let t = net.now + rng.gen_range(20..150);
        net.run_until(t);
        for m in members.iter_mut() {
            m.machine.handle_view(net.view(m.slot));
        }
        let mut live: Vec<NodeId> = members.iter().map(|m| m.id.clone()).collect();
        live.sort();
        let actions: Vec<Action> = members
            .iter()
            .map(|m| m.machine.poll_action().unwrap())
            .collect();
        if actions.iter().all(|a| *a == Action::Finished) {
            break;
        }
        // A collective runs only when every member of the view is in the same one.
        let same = |f: &dyn Fn(&Action) -> bool| actions.iter().all(f);
        let exact = |v: &coordinator_free::View| v.ids().eq(live.iter());
        match &actions[0] {
            Action::ExchangeProgress { view: v }
                if exact(v)
                    && same(
                        &|a| matches!(a, Action::ExchangeProgress { view: w } if w.hash == v.hash),
                    ) =>
            {
                let all: Vec<(NodeId, Progress)> = members
                    .iter()
                    .map(|m| (m.id.clone(), m.machine.progress()))
                    .collect();
                for m in members.iter_mut() {
                    m.machine.handle_progress(v.hash, &all).unwrap();
                }
            }
            Action::Sync { view: v, root, .. }
                if exact(v)
                    && same(
                        &|a| matches!(a, Action::Sync { view: w, root: r, .. } if w.hash == v.hash && r == root),
                    ) =>
            {
                // No live member's committed work is thrown away: the root is the furthest.
                let furthest = members.iter().map(|m| m.machine.progress().step).max();
                let src = members.iter().find(|m| &m.id == root).unwrap();
                assert_eq!(
                    Some(src.machine.progress().step),
                    furthest,
                    "seed {seed}: sync root"
                );
                let state = src.applied.clone();
                let p = src.machine.progress();
                for m in members.iter_mut() {
                    m.applied = state.clone();
                    m.machine.handle_synced(v.hash);
                    assert_eq!(m.machine.progress(), p, "seed {seed}: sync copies progress");
                }
            }
            Action::Step {
                view: v,
                step,
                batch,
                ..
            } if exact(v)
                && same(
                    &|a| matches!(a, Action::Step { view: w, step: s, .. } if w.hash == v.hash && s == step),
                ) =>
            {
                // Every member's shards tile the batch (every member split it by the
                // same weights, though speeds reach only the members that commit).
                let mut covered = Vec::new();
                let mut all_weights = Vec::new();
                let mut all_coverage = Vec::new();
                for a in &actions {
                    if let Action::Step {
                        ranges,
                        batch: b,
                        weights,
                        coverage,
                        ..
                    } = a
                    {
                        assert_eq!(b, batch, "seed {seed}: one batch per step");
                        assert!(
                            coverage.iter().any(|(_, rs)| rs == ranges),
                            "seed {seed}: a member's ranges are its entry in the coverage"
                        );
                        covered.extend(ranges.iter().flat_map(|r| r.clone()));
                        all_weights.push(weights.clone());
                        all_coverage.push(coverage.clone());
                    }
                }
                assert!(
                    all_coverage.windows(2).all(|w| w[0] == w[1]),
                    "seed {seed}: every member holds the same coverage"
                );
                covered.sort();
                assert_eq!(
                    covered,
                    batch.positions().collect::<Vec<_>>(),
                    "seed {seed}"
                );
                assert!(all_weights.windows(2).all(|w| w[0] == w[1]), "seed {seed}");
                // The speeds every member measured, all-gathered with the step.
                let speeds: Vec<(NodeId, f64)> = members
                    .iter()
                    .map(|m| {
                        let s = if rng.gen_bool(0.1) {
                            f64::NAN
                        } else {
                            rng.gen_range(1.0..100.0)
                        };
                        (m.id.clone(), s)
                    })
                    .collect();
                // A crash during the step: some members complete it, the rest fail.
                let crash = churn && members.len() > 1 && rng.gen_bool(0.15);
                let victim = crash.then(|| rng.gen_range(0..members.len()));
                for (i, m) in members.iter_mut().enumerate() {
                    let ok = !crash || rng.gen_bool(0.3);
                    if Some(i) == victim {
                        continue;
                    }
                    if ok {
                        m.applied.push((*step, v.hash, *batch));
                        m.machine.handle_speeds(v.hash, *step, &speeds);
                    }
                    m.machine.handle_step(v.hash, *step, ok);
                }
                if let Some(i) = victim {
                    net.crash(members.remove(i).slot);
                }
            }
            _ => {
                // Members disagree on the collective (the view changed under one of them) or
                // its view holds a member that is gone: it fails everywhere, and each member
                // that was in one reports its view failed, as the shell does.
                for (m, a) in members.iter_mut().zip(&actions) {
                    let failed = match a {
                        Action::Step { view, step, .. } => {
                            m.machine.handle_step(view.hash, *step, false);
                            Some(view.hash)
                        }
                        Action::ExchangeProgress { view } | Action::Sync { view, .. } => {
                            m.machine.handle_failure();
                            Some(view.hash)
                        }
                        _ => None,
                    };
                    if let Some(hash) = failed {
                        failed_collectives += 1;
                        net.report_failed(m.slot, &hash);
                    }
                }
            }
        }
        // The live members' states are prefixes of one sequence (a commit that died with
        // its member is redone by the survivors, who never saw it), matching progress.
        for m in &members {
            assert_eq!(
                m.applied.len() as u64,
                m.machine.progress().step,
                "seed {seed}"
            );
            for (k, (s, _, _)) in m.applied.iter().enumerate() {
                assert_eq!(*s, k as u64, "seed {seed}");
            }
        }
        for a in &members {
            for b in &members {
                let k = a.applied.len().min(b.applied.len());
                assert_eq!(
                    a.applied[..k],
                    b.applied[..k],
                    "seed {seed}: live states diverge"
                );
            }
        }
    }
    // Liveness: with churn over, everyone finished with the same state.
    assert!(!members.is_empty());
    let first = members[0].applied.clone();
    assert_eq!(
        first.len() as u64,
        plan.total_steps,
        "seed {seed}: finished"
    );
    for m in &members {
        assert_eq!(m.applied, first, "seed {seed}: same state everywhere");
    }
    // The committed batches tile the data epochs: consecutive, no gap, no overlap.
    let mut cursor = coordinator_free::DataCursor::default();
    for (_, _, b) in &first {
        assert_eq!(b.cursor, cursor, "seed {seed}: batches are consecutive");
        cursor = coordinator_free::sharding::advance(b, plan.n_samples);
    }
    failed_collectives
}
