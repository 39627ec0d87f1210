//! DiLoCo's outer rounds (`coordinator_free::outer_round`) under churn, over many seeds, on
//! the simulated network (`harness`), as `training_sim.rs` checks synchronous steps. Every
//! member's view is the one its own membership machine derives from heartbeats. Members take
//! their inner steps at their own pace (a few per tick, no collective), on a real if tiny
//! model: three `f32` parameters pulled toward a target that depends on the sample id, so the
//! weights depend on exactly which samples each member trained on and in which order.
//! θ_global, the outer momentum and the committed rounds are what a sync copies. Members
//! crash (also in the inner phase and in the middle of the outer all-reduce, after some
//! survivors committed it), join, and a failed collective is reported as the shell does; a
//! collective succeeds only when every live member takes part in the same view and that view
//! holds exactly the live members.
//!
//! Checked: a member's first inner step of a round starts from θ_global with no leftover
//! inner work (every discard passes through a sync); the members' inner steps of a committed
//! round used every sample of its batches exactly once; the live members' committed rounds
//! are prefixes of one sequence, numbered 0, 1, 2, … over consecutive steps (none lost, none
//! applied twice), and members with the same rounds hold bit-identical θ_global and momentum;
//! once churn stops every member finishes with the same rounds, θ_global and momentum; that
//! θ_global and momentum equal a replay of the committed rounds from zero; and the committed
//! sample ids use every sample exactly once per data epoch.

mod harness;

use coordinator_free::outer_round::{
    outer_step, pseudo_gradient, OuterAction, OuterTraining, DEFAULT_OUTER_LR,
    DEFAULT_OUTER_MOMENTUM,
};
use coordinator_free::sharding::{self, StepBatch};
use coordinator_free::training::{Progress, TrainingPlan};
use coordinator_free::{DataCursor, NodeId, View, ViewHash};
use harness::Sim;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;

/// Slots of the simulated network: initial members plus every joiner of a run.
const SLOTS: usize = 40;
/// Parameters of the toy model.
const DIM: usize = 3;
/// The toy inner optimizer's step size.
const INNER_LR: f32 = 0.1;
/// The data's shuffle seed.
const DATA_SEED: u64 = 0x5eed;

/// Every member's sample ids of one step, in view order.
type PerMember = Vec<(NodeId, Vec<u64>)>;

/// One committed round, as every member that commits it records it.
#[derive(Clone, Debug, PartialEq)]
struct RoundRecord {
    round: u64,
    steps: Range<u64>,
    view: ViewHash,
    round_samples: u64,
    /// Per step: its batch and every member's sample ids, in view order.
    work: Vec<(StepBatch, PerMember)>,
}

struct Member {
    slot: usize,
    id: NodeId,
    machine: OuterTraining,
    /// θ_global and the outer momentum: committed state.
    global: Vec<f32>,
    momentum: Vec<f32>,
    /// Committed rounds (what θ_global is made of).
    committed: Vec<RoundRecord>,
    /// Working weights.
    local: Vec<f32>,
    /// Inner work since θ_global: (step, batch, sample ids).
    inner: Vec<(u64, StepBatch, Vec<u64>)>,
}

/// The toy inner step: every sample pulls each weight toward its target.
fn train(w: &mut [f32], ids: &[u64]) {
    for &id in ids {
        for (j, x) in w.iter_mut().enumerate() {
            let target = ((id * 7 + j as u64 * 3) % 11) as f32 - 5.0;
            *x += INNER_LR * (target - *x);
        }
    }
}

/// Sample ids at `ranges` of the epoch order.
fn ids(
    orders: &mut BTreeMap<u64, Vec<u64>>,
    n: u64,
    epoch: u64,
    ranges: &[Range<u64>],
) -> Vec<u64> {
    let order = orders
        .entry(epoch)
        .or_insert_with(|| sharding::epoch_order(DATA_SEED, epoch, n));
    ranges
        .iter()
        .flat_map(|r| r.clone().map(|p| order[p as usize]))
        .collect()
}

/// The outer step every member of `view` takes from the contributions (member, sample ids
/// per step): the sample-weighted pseudo-gradients summed in view order, as a ring would.
fn outer(
    global: &mut [f32],
    momentum: &mut [f32],
    contributions: &[(NodeId, Vec<Vec<u64>>)],
    round_samples: u64,
) {
    let mut g = vec![0f32; DIM];
    for (_, steps) in contributions {
        let mut local = global.to_vec();
        let mut samples = 0;
        for ids in steps {
            train(&mut local, ids);
            samples += ids.len();
        }
        let mut part = vec![0f32; DIM];
        let w = samples as f32 / round_samples as f32;
        pseudo_gradient(global, &local, w, &mut part).unwrap();
        for (a, p) in g.iter_mut().zip(part) {
            *a += p;
        }
    }
    outer_step(
        global,
        momentum,
        &g,
        DEFAULT_OUTER_LR,
        DEFAULT_OUTER_MOMENTUM,
    )
    .unwrap();
}

#[derive(Default, Debug)]
struct Stats {
    failed_collectives: u64,
    partial_commits: u64,
    discarded_inner_steps: u64,
    catch_up_syncs: u64,
    rounds: u64,
}

fn join(net: &mut Sim, members: &mut Vec<Member>, next: &mut usize, plan: &TrainingPlan, h: u64) {
    if *next == SLOTS {
        return;
    }
    net.start(*next);
    let id = net.id(*next).clone();
    members.push(Member {
        slot: *next,
        machine: OuterTraining::new(id.clone(), plan.clone(), h, Progress::default()).unwrap(),
        id,
        global: vec![0.0; DIM],
        momentum: vec![0.0; DIM],
        committed: Vec::new(),
        local: vec![0.0; DIM],
        inner: Vec::new(),
    });
    *next += 1;
}

#[test]
fn committed_rounds_form_one_sequence_under_churn() {
    let mut stats = Stats::default();
    for seed in 0..400u64 {
        run(seed, &mut stats);
    }
    eprintln!("{stats:?}");
    // The churn must actually exercise every path.
    assert!(stats.failed_collectives > 400, "{stats:?}");
    assert!(stats.partial_commits > 20, "{stats:?}");
    assert!(stats.discarded_inner_steps > 400, "{stats:?}");
    assert!(stats.catch_up_syncs > 200, "{stats:?}");
}

fn run(seed: u64, stats: &mut Stats) {
    let mut rng = StdRng::seed_from_u64(seed);
    let h = rng.gen_range(1..9);
    let plan = TrainingPlan {
        min_nodes: rng.gen_range(1..3),
        total_steps: rng.gen_range(5..60),
        batch_size: rng.gen_range(1..50),
        n_samples: rng.gen_range(1..300),
        shard_size: rng.gen_range(1..8),
        balance: rng.gen_bool(0.7),
    };
    let n = plan.n_samples;
    let mut orders = BTreeMap::new();
    let mut net = Sim::new(seed ^ 0xd1_10c0, SLOTS);
    let mut next = 0;
    let mut members: Vec<Member> = Vec::new();
    for _ in 0..rng.gen_range(1..5) {
        join(&mut net, &mut members, &mut next, &plan, h);
    }
    let churn_rounds = 200;
    let mut done = false;
    for tick in 0..8000 {
        let churn = tick < churn_rounds;
        if (churn && rng.gen_bool(0.08) && members.len() < 6)
            || (!churn && members.len() < plan.min_nodes)
        {
            join(&mut net, &mut members, &mut next, &plan, h);
        }
        if churn && rng.gen_bool(0.05) && members.len() > 1 {
            let m = members.remove(rng.gen_range(0..members.len()));
            stats.discarded_inner_steps += m.machine.discarded_inner_steps;
            net.crash(m.slot);
        }
        let t = net.now + rng.gen_range(20..150);
        net.run_until(t);
        for m in members.iter_mut() {
            m.machine.handle_view(net.view(m.slot));
        }
        // Inner steps: local, a few per tick at each member's own pace.
        for m in members.iter_mut() {
            for _ in 0..rng.gen_range(0..4) {
                let OuterAction::InnerStep {
                    view,
                    round,
                    step,
                    inner,
                    batch,
                    ranges,
                    coverage,
                    ..
                } = m.machine.poll_action().unwrap()
                else {
                    break;
                };
                if inner == 0 {
                    assert!(m.inner.is_empty(), "seed {seed}: leftover inner work");
                    assert_eq!(m.local, m.global, "seed {seed}: a round starts at θ_global");
                }
                assert_eq!(step, round * h + inner, "seed {seed}: rounds aligned at H");
                assert!(coverage.iter().any(|(id, rs)| id == &m.id && rs == &ranges));
                let mine = ids(&mut orders, n, batch.cursor.epoch, &ranges);
                train(&mut m.local, &mine);
                m.inner.push((step, batch, mine));
                m.machine
                    .handle_inner_step(view.hash, round, inner)
                    .unwrap();
            }
        }
        let mut live: Vec<NodeId> = members.iter().map(|m| m.id.clone()).collect();
        live.sort();
        let actions: Vec<OuterAction> = members
            .iter()
            .map(|m| m.machine.poll_action().unwrap())
            .collect();
        if actions.iter().all(|a| *a == OuterAction::Finished) {
            done = true;
            break;
        }
        // A collective waits for members still computing their inner steps.
        if actions
            .iter()
            .any(|a| matches!(a, OuterAction::InnerStep { .. }))
        {
            continue;
        }
        let same = |f: &dyn Fn(&OuterAction) -> bool| actions.iter().all(f);
        let exact = |v: &View| v.ids().eq(live.iter());
        match &actions[0] {
            OuterAction::ExchangeProgress { view: v }
                if exact(v)
                    && same(
                        &|a| matches!(a, OuterAction::ExchangeProgress { view: w } if w.hash == v.hash),
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
            OuterAction::Sync { view: v, root, .. }
                if exact(v)
                    && same(&|a| {
                        matches!(a, OuterAction::Sync { view: w, root: r, .. }
                            if w.hash == v.hash && r == root)
                    }) =>
            {
                sync(&mut members, v, root, seed, stats);
            }
            OuterAction::OuterReduce { view: v, round, .. }
                if exact(v)
                    && same(&|a| {
                        matches!(a, OuterAction::OuterReduce { view: w, round: r, .. }
                        if w.hash == v.hash && r == round)
                    }) =>
            {
                outer_reduce(
                    &mut net,
                    &mut members,
                    &actions,
                    v,
                    &mut orders,
                    n,
                    seed,
                    &mut rng,
                    churn,
                    stats,
                );
            }
            _ => {
                // Members disagree on the collective (the view changed under one of them) or
                // its view holds a member that is gone: it fails everywhere.
                for (m, a) in members.iter_mut().zip(&actions) {
                    let failed = match a {
                        OuterAction::OuterReduce { view, round, .. } => {
                            m.machine.handle_outer(view.hash, *round, false);
                            Some(view.hash)
                        }
                        OuterAction::ExchangeProgress { view } | OuterAction::Sync { view, .. } => {
                            m.machine.handle_failure();
                            Some(view.hash)
                        }
                        _ => None,
                    };
                    if let Some(hash) = failed {
                        stats.failed_collectives += 1;
                        net.report_failed(m.slot, &hash);
                    }
                }
            }
        }
        check_live(&members, h, seed);
    }
    assert!(done, "seed {seed}: not finished");
    finish(&members, &plan, seed, stats);
}

/// Every member takes the root's committed state; working weights become θ_global.
fn sync(members: &mut [Member], v: &View, root: &NodeId, seed: u64, stats: &mut Stats) {
    let furthest = members.iter().map(|m| m.machine.progress().step).max();
    let src = members.iter().find(|m| &m.id == root).unwrap();
    assert_eq!(
        Some(src.machine.progress().step),
        furthest,
        "seed {seed}: sync root"
    );
    assert_eq!(
        src.committed.len() as u64,
        src.machine.rounds(),
        "seed {seed}"
    );
    let (global, momentum, committed) = (
        src.global.clone(),
        src.momentum.clone(),
        src.committed.clone(),
    );
    let p = src.machine.progress();
    if members.iter().any(|m| m.machine.progress().step < p.step) {
        stats.catch_up_syncs += 1;
    }
    for m in members.iter_mut() {
        m.global = global.clone();
        m.momentum = momentum.clone();
        m.committed = committed.clone();
        m.local = global.clone();
        m.inner.clear();
        m.machine.handle_synced(v.hash);
        assert_eq!(m.machine.progress(), p, "seed {seed}: sync copies progress");
    }
}

/// The outer all-reduce of the round every member is at, on `v`; with churn, a crash in its
/// middle leaves some members committed and the rest failed.
#[allow(clippy::too_many_arguments)]
fn outer_reduce(
    net: &mut Sim,
    members: &mut Vec<Member>,
    actions: &[OuterAction],
    v: &View,
    orders: &mut BTreeMap<u64, Vec<u64>>,
    n: u64,
    seed: u64,
    rng: &mut StdRng,
    churn: bool,
    stats: &mut Stats,
) {
    let OuterAction::OuterReduce {
        round,
        steps,
        round_samples,
        ..
    } = actions[0].clone()
    else {
        unreachable!()
    };
    // Each member's inner work covers the round's steps, in order, and reports its samples.
    for (m, a) in members.iter().zip(actions) {
        let OuterAction::OuterReduce {
            steps: s,
            samples,
            round_samples: rs,
            ..
        } = a
        else {
            unreachable!()
        };
        assert_eq!((s, *rs), (&steps, round_samples), "seed {seed}");
        let done: Vec<u64> = m.inner.iter().map(|(s, _, _)| *s).collect();
        assert_eq!(
            done,
            steps.clone().collect::<Vec<_>>(),
            "seed {seed}: inner steps"
        );
        let mine: usize = m.inner.iter().map(|(_, _, ids)| ids.len()).sum();
        assert_eq!(mine as u64, *samples, "seed {seed}: samples reported");
    }
    // Per step: one batch, whose samples the members used exactly once between them.
    let in_view: Vec<&Member> = v
        .ids()
        .map(|id| members.iter().find(|m| &m.id == id).unwrap())
        .collect();
    let mut work = Vec::new();
    for k in 0..steps.end - steps.start {
        let batch = in_view[0].inner[k as usize].1;
        let mut used = Vec::new();
        let mut per_member = Vec::new();
        for m in &in_view {
            assert_eq!(
                m.inner[k as usize].1, batch,
                "seed {seed}: one batch per step"
            );
            used.extend(m.inner[k as usize].2.iter().copied());
            per_member.push((m.id.clone(), m.inner[k as usize].2.clone()));
        }
        used.sort();
        let mut want = ids(orders, n, batch.cursor.epoch, &[batch.positions()]);
        want.sort();
        assert_eq!(used, want, "seed {seed}: a batch's samples, each once");
        work.push((batch, per_member));
    }
    assert_eq!(
        work.iter().map(|(b, _)| b.len).sum::<u64>(),
        round_samples,
        "seed {seed}"
    );
    // The all-reduce's result: the same on every member that completes it.
    let contributions: Vec<(NodeId, Vec<Vec<u64>>)> = in_view
        .iter()
        .map(|m| {
            let steps = m.inner.iter().map(|(_, _, ids)| ids.clone()).collect();
            (m.id.clone(), steps)
        })
        .collect();
    let (mut global, mut momentum) = (in_view[0].global.clone(), in_view[0].momentum.clone());
    outer(&mut global, &mut momentum, &contributions, round_samples);
    let record = RoundRecord {
        round,
        steps: steps.clone(),
        view: v.hash,
        round_samples,
        work,
    };
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
    let crash = churn && members.len() > 1 && rng.gen_bool(0.15);
    let victim = crash.then(|| rng.gen_range(0..members.len()));
    let mut oks = 0;
    for (i, m) in members.iter_mut().enumerate() {
        let ok = !crash || rng.gen_bool(0.3);
        if Some(i) == victim {
            continue;
        }
        if ok {
            oks += 1;
            m.global = global.clone();
            m.momentum = momentum.clone();
            m.local = global.clone();
            m.inner.clear();
            m.committed.push(record.clone());
            m.machine.handle_speeds(v.hash, round, &speeds);
        }
        m.machine.handle_outer(v.hash, round, ok);
    }
    if crash && oks > 0 && oks + 1 < members.len() {
        stats.partial_commits += 1;
    }
    if let Some(i) = victim {
        let m = members.remove(i);
        stats.discarded_inner_steps += m.machine.discarded_inner_steps;
        net.crash(m.slot);
    }
}

/// The live members' committed rounds are prefixes of one sequence, numbered from 0 over
/// consecutive steps and matching their progress; equal rounds mean equal weights.
fn check_live(members: &[Member], h: u64, seed: u64) {
    for m in members {
        assert_eq!(m.committed.len() as u64, m.machine.rounds(), "seed {seed}");
        let mut step = 0;
        for (k, r) in m.committed.iter().enumerate() {
            assert_eq!(
                r.round, k as u64,
                "seed {seed}: rounds in order, none twice"
            );
            assert_eq!(r.steps.start, step, "seed {seed}: consecutive steps");
            assert!(r.steps.end - r.steps.start <= h, "seed {seed}");
            step = r.steps.end;
        }
        assert_eq!(m.machine.progress().step, step, "seed {seed}");
    }
    for a in members {
        for b in members {
            let k = a.committed.len().min(b.committed.len());
            assert_eq!(
                a.committed[..k],
                b.committed[..k],
                "seed {seed}: states diverge"
            );
            if a.committed.len() == b.committed.len() {
                assert_eq!(a.global, b.global, "seed {seed}: θ_global differs");
                assert_eq!(a.momentum, b.momentum, "seed {seed}: momentum differs");
            }
        }
    }
}

/// Everyone finished with the same state, which replays from zero, and the committed
/// samples use every sample exactly once per data epoch.
fn finish(members: &[Member], plan: &TrainingPlan, seed: u64, stats: &mut Stats) {
    assert!(!members.is_empty());
    let first = &members[0];
    for m in members {
        assert_eq!(
            m.committed, first.committed,
            "seed {seed}: same rounds everywhere"
        );
        assert_eq!(m.global, first.global, "seed {seed}");
        assert_eq!(m.momentum, first.momentum, "seed {seed}");
        assert_eq!(
            m.machine.progress().step,
            plan.total_steps,
            "seed {seed}: finished"
        );
        stats.discarded_inner_steps += m.machine.discarded_inner_steps;
    }
    stats.rounds += first.committed.len() as u64;
    // Replay.
    let (mut global, mut momentum) = (vec![0f32; DIM], vec![0f32; DIM]);
    for r in &first.committed {
        let ids_of = |id: &NodeId| -> Vec<Vec<u64>> {
            r.work
                .iter()
                .map(|(_, per)| per.iter().find(|(m, _)| m == id).unwrap().1.clone())
                .collect()
        };
        let contributions: Vec<(NodeId, Vec<Vec<u64>>)> = r.work[0]
            .1
            .iter()
            .map(|(id, _)| (id.clone(), ids_of(id)))
            .collect();
        outer(&mut global, &mut momentum, &contributions, r.round_samples);
    }
    assert_eq!(global, first.global, "seed {seed}: θ_global replays");
    assert_eq!(momentum, first.momentum, "seed {seed}: momentum replays");
    // Exactly once per data epoch: consecutive batches, and within an epoch no sample twice;
    // every epoch passed in full used every sample.
    let mut cursor = DataCursor::default();
    let mut used: BTreeMap<u64, BTreeSet<u64>> = BTreeMap::new();
    for r in &first.committed {
        for (batch, per) in &r.work {
            assert_eq!(batch.cursor, cursor, "seed {seed}: batches are consecutive");
            cursor = sharding::advance(batch, plan.n_samples);
            let seen = used.entry(batch.cursor.epoch).or_default();
            for (_, ids) in per {
                for id in ids {
                    assert!(
                        seen.insert(*id),
                        "seed {seed}: sample {id} twice in an epoch"
                    );
                }
            }
        }
    }
    for (epoch, seen) in &used {
        if *epoch < cursor.epoch {
            assert_eq!(
                seen.len() as u64,
                plan.n_samples,
                "seed {seed}: epoch {epoch}"
            );
        }
    }
}
