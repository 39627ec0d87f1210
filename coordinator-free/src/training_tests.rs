//! Unit tests of [`super`]: waiting and syncing, the gradient guard, redistribution and
//! speed-balanced shares.

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
