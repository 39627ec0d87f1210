//! Data sharding through the public API: exactly-once sample use over many seeds while the
//! view changes between steps, balance and tiling of every split, the errors, and how far a
//! member leaving moves the others' pieces. Everything is driven by seeded RNGs, so a
//! failing seed replays exactly.

use coordinator_free::sharding::{
    advance, assign, epoch_order, next_batch, steps_per_epoch, Assignment, DataCursor,
    ShardingError, StepBatch,
};
use coordinator_free::NodeId;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use std::collections::HashSet;

fn id(i: usize) -> NodeId {
    NodeId::new(format!("12D3KooWmember{i}")).unwrap()
}

/// A number in `lo..=hi` whose logarithm is uniform.
fn log_uniform(rng: &mut StdRng, lo: u64, hi: u64) -> u64 {
    let x = rng.gen_range((lo as f64).ln()..=(hi as f64).ln()).exp();
    (x.round() as u64).clamp(lo, hi)
}

/// Checks that the pieces tile the batch (every position owned exactly once, consistently
/// through `pieces`, `ranges`, `samples` and `owner_of`), that weight-0 members own
/// nothing, and that every member is strictly within one shard of `len * w / W`.
fn check_split(a: &Assignment, members: &[(NodeId, u32)], shard: u64, ctx: &str) {
    let b = a.batch().positions();
    let mut next = b.start;
    for (r, owner) in a.pieces() {
        assert_eq!(r.start, next, "{ctx}: pieces are contiguous");
        assert!(r.start < r.end, "{ctx}: no empty piece");
        assert_eq!(
            r.start / shard,
            (r.end - 1) / shard,
            "{ctx}: a piece is inside one shard"
        );
        assert!(
            a.ranges(owner).contains(&r),
            "{ctx}: piece listed under its owner"
        );
        assert_eq!(a.owner_of(r.start), Some(owner), "{ctx}");
        next = r.end;
    }
    assert_eq!(next, b.end, "{ctx}: pieces cover the batch");
    let total_w: u128 = members.iter().map(|(_, w)| u128::from(*w)).sum();
    let len = u128::from(a.batch().len);
    let mut sum = 0;
    for (m, w) in members {
        let n: u64 = a.ranges(m).iter().map(|r| r.end - r.start).sum();
        assert_eq!(n, a.samples(m), "{ctx}: samples() matches ranges()");
        sum += n;
        if *w == 0 {
            assert_eq!(n, 0, "{ctx}: weight-0 member {m} got samples");
        }
        let diff = (u128::from(n) * total_w).abs_diff(len * u128::from(*w));
        assert!(
            diff < u128::from(shard) * total_w,
            "{ctx}: {m} (weight {w}/{total_w}) got {n} of {len} samples, shard {shard}"
        );
    }
    assert_eq!(
        sum,
        a.batch().len,
        "{ctx}: the members' samples add up to the batch"
    );
}

#[test]
fn epoch_orders_are_permutations_that_depend_on_seed_and_epoch() {
    let mut rng = StdRng::seed_from_u64(11);
    for _ in 0..50 {
        let n = rng.gen_range(0..3000u64);
        let (seed, epoch) = (rng.gen(), rng.gen_range(0..1000u64));
        let o = epoch_order(seed, epoch, n);
        assert_eq!(o, epoch_order(seed, epoch, n), "same inputs, same order");
        let mut sorted = o.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..n).collect::<Vec<_>>(), "a permutation of 0..n");
        if n >= 20 {
            assert_ne!(o, epoch_order(seed, epoch + 1, n), "next epoch differs");
            assert_ne!(o, epoch_order(seed ^ 1, epoch, n), "another seed differs");
        }
    }
}

/// The main property: over 300 seeds, with random data set sizes, batch sizes and shard
/// sizes, and a view that changes between steps (joins, leaves, weight changes, weight-0
/// members, failed steps retried in another view, batch size changes), every sample id
/// is handed out exactly once per completed data epoch, and never twice in the partial
/// last one.
#[test]
fn every_sample_once_per_epoch_while_views_change() {
    const SEEDS: u64 = 300;
    const EPOCHS: u64 = 3;
    let mut steps_run = 0u64;
    let mut epochs_checked = 0u64;
    for seed in 0..SEEDS {
        let mut rng = StdRng::seed_from_u64(seed);
        let n = rng.gen_range(1..5000u64);
        // Log-uniform sizes: at most ~500 steps per epoch, sometimes the whole data set in
        // one step; at most ~64 pieces per batch, sometimes a shard larger than the batch.
        let batch_range = ((n / 500).max(1), n + n / 4 + 1);
        let mut batch_size = log_uniform(&mut rng, batch_range.0, batch_range.1);
        let shard = log_uniform(&mut rng, (batch_size / 64).max(1), 2 * batch_size);
        let data_seed: u64 = rng.gen();

        let mut members: Vec<(NodeId, u32)> = (0..rng.gen_range(1..6))
            .map(|i| (id(i), rng.gen_range(1..5)))
            .collect();
        let mut next_id = members.len();
        let mut cursor = DataCursor::default();
        let mut counts = vec![0u32; n as usize];
        let mut order = epoch_order(data_seed, 0, n);
        let ctx = |c: DataCursor| format!("seed {seed} n {n} shard {shard} at {c:?}");

        while cursor.epoch < EPOCHS {
            steps_run += 1;
            // The view changes between steps.
            match rng.gen_range(0..12) {
                0 | 1 => {
                    members.push((id(next_id), rng.gen_range(0..5)));
                    next_id += 1;
                }
                2 | 3 if members.len() > 1 => {
                    let i = rng.gen_range(0..members.len());
                    members.remove(i);
                }
                4 | 5 => {
                    let i = rng.gen_range(0..members.len());
                    members[i].1 = rng.gen_range(0..5);
                }
                6 => members.shuffle(&mut rng),
                7 => batch_size = log_uniform(&mut rng, batch_range.0, batch_range.1),
                _ => {}
            }
            if members.iter().all(|(_, w)| *w == 0) {
                members[0].1 = 1;
            }

            let b = next_batch(cursor, batch_size, n).unwrap();
            assert_eq!(b.cursor, cursor);
            assert_eq!(b.len, batch_size.min(n - cursor.offset), "{}", ctx(cursor));

            // Sometimes the step fails after the split and is redone under another view:
            // the first split is thrown away, the batch stays the same.
            if rng.gen_bool(0.15) {
                let first = assign(&members, &b, shard).unwrap();
                check_split(&first, &members, shard, &ctx(cursor));
                members.push((id(next_id), rng.gen_range(1..5)));
                next_id += 1;
                if members.len() > 2 {
                    let i = rng.gen_range(0..members.len());
                    members.remove(i);
                }
            }

            let a = assign(&members, &b, shard).unwrap();
            check_split(&a, &members, shard, &ctx(cursor));
            for (m, _) in &members {
                for r in a.ranges(m) {
                    for p in r.clone() {
                        counts[order[p as usize] as usize] += 1;
                    }
                }
            }

            let next = advance(&b, n);
            if next.epoch != cursor.epoch {
                assert_eq!(
                    next,
                    DataCursor {
                        epoch: cursor.epoch + 1,
                        offset: 0
                    }
                );
                assert!(
                    counts.iter().all(|&c| c == 1),
                    "{}: a sample was used other than once in the epoch",
                    ctx(cursor)
                );
                assert_eq!(counts.iter().map(|&c| u64::from(c)).sum::<u64>(), n);
                counts.iter_mut().for_each(|c| *c = 0);
                order = epoch_order(data_seed, next.epoch, n);
                epochs_checked += 1;
            } else {
                assert!(counts.iter().all(|&c| c <= 1), "{}", ctx(cursor));
                assert_eq!(next.offset, cursor.offset + b.len);
            }
            cursor = next;
        }
    }
    assert_eq!(epochs_checked, SEEDS * EPOCHS);
    eprintln!("{steps_run} steps over {SEEDS} seeds");
    assert!(
        steps_run > 5 * SEEDS * EPOCHS,
        "the runs are not trivial ({steps_run} steps)"
    );
}

/// A fixed membership walks epochs in exactly `steps_per_epoch` steps.
#[test]
fn a_fixed_view_walks_each_epoch_in_steps_per_epoch() {
    let members = vec![(id(0), 1), (id(1), 2), (id(2), 3)];
    for (n, batch_size, shard) in [(100u64, 10u64, 4u64), (101, 10, 3), (7, 100, 2), (64, 8, 8)] {
        let mut cursor = DataCursor::default();
        for epoch in 0..3 {
            let mut seen = HashSet::new();
            let order = epoch_order(9, epoch, n);
            for _ in 0..steps_per_epoch(n, batch_size) {
                assert_eq!(cursor.epoch, epoch);
                let b = next_batch(cursor, batch_size, n).unwrap();
                let a = assign(&members, &b, shard).unwrap();
                check_split(&a, &members, shard, &format!("n {n}"));
                for (m, _) in &members {
                    for p in a.positions(m) {
                        assert!(seen.insert(order[p as usize]));
                    }
                }
                cursor = advance(&b, n);
            }
            assert_eq!(seen.len() as u64, n);
            assert_eq!(
                cursor,
                DataCursor {
                    epoch: epoch + 1,
                    offset: 0
                }
            );
        }
    }
}

#[test]
fn splits_tile_and_stay_within_one_shard_of_the_weighted_share() {
    let mut rng = StdRng::seed_from_u64(5);
    for case in 0..3000 {
        let k = rng.gen_range(1..9);
        let members: Vec<(NodeId, u32)> = (0..k)
            .map(|i| {
                let w = match rng.gen_range(0..4) {
                    0 => 0,
                    1 => rng.gen_range(1..1000),
                    _ => rng.gen_range(1..5),
                };
                (id(i), w)
            })
            .collect();
        if members.iter().all(|(_, w)| *w == 0) {
            continue;
        }
        let shard = rng.gen_range(1..50u64);
        let b = StepBatch {
            cursor: DataCursor {
                epoch: rng.gen_range(0..100),
                offset: rng.gen_range(0..1000),
            },
            len: rng.gen_range(1..2000),
        };
        let a = assign(&members, &b, shard).unwrap();
        check_split(&a, &members, shard, &format!("case {case}"));
        // Deterministic.
        assert_eq!(a, assign(&members, &b, shard).unwrap());
    }
}

#[test]
fn every_bad_input_has_its_error() {
    let members = vec![(id(0), 1), (id(1), 1)];
    let c = DataCursor::default();
    let b = next_batch(c, 8, 100).unwrap();
    assert_eq!(next_batch(c, 0, 100), Err(ShardingError::ZeroBatchSize));
    assert_eq!(next_batch(c, 8, 0), Err(ShardingError::ZeroSamples));
    assert_eq!(
        next_batch(
            DataCursor {
                epoch: 2,
                offset: 100
            },
            8,
            100
        ),
        Err(ShardingError::OffsetOutOfRange {
            offset: 100,
            n_samples: 100
        })
    );
    assert_eq!(assign(&members, &b, 0), Err(ShardingError::ZeroShardSize));
    assert_eq!(
        assign(&members, &StepBatch { cursor: c, len: 0 }, 4),
        Err(ShardingError::ZeroBatchSize)
    );
    assert_eq!(assign(&[], &b, 4), Err(ShardingError::NoPositiveWeight));
    assert_eq!(
        assign(&[(id(0), 0)], &b, 4),
        Err(ShardingError::NoPositiveWeight)
    );
    assert_eq!(
        assign(&[(id(0), 1), (id(1), 1), (id(0), 3)], &b, 4),
        Err(ShardingError::DuplicateMember(id(0)))
    );
    let huge = StepBatch {
        cursor: DataCursor {
            epoch: 0,
            offset: u64::MAX - 1,
        },
        len: 5,
    };
    assert_eq!(
        assign(&members, &huge, 4),
        Err(ShardingError::BatchOverflow {
            offset: u64::MAX - 1,
            len: 5
        })
    );
}

/// Exact stability: weight-0 members and the order of the member list change nothing.
#[test]
fn weight_zero_members_and_member_order_change_nothing() {
    let mut rng = StdRng::seed_from_u64(3);
    for case in 0..300 {
        let members: Vec<(NodeId, u32)> = (0..rng.gen_range(1..7))
            .map(|i| (id(i), rng.gen_range(1..6)))
            .collect();
        let b = StepBatch {
            cursor: DataCursor {
                epoch: case,
                offset: rng.gen_range(0..500),
            },
            len: rng.gen_range(1..500),
        };
        let shard = rng.gen_range(1..40);
        let a = assign(&members, &b, shard).unwrap();

        let mut more = members.clone();
        for j in 0..rng.gen_range(1..4) {
            more.push((id(100 + j), 0));
        }
        more.shuffle(&mut rng);
        let a2 = assign(&more, &b, shard).unwrap();
        for (m, _) in &members {
            assert_eq!(
                a.ranges(m),
                a2.ranges(m),
                "case {case}: {m} kept its pieces"
            );
        }
        let owners = |x: &Assignment| x.pieces().map(|(r, o)| (r, o.clone())).collect::<Vec<_>>();
        assert_eq!(owners(&a), owners(&a2), "case {case}");
    }
}

/// Bounded loads trade some exactness for balance. What is guaranteed: the leaver's pieces
/// all go to survivors, every survivor stays within one shard of its new share, and a piece
/// stays with its highest-scoring member while that member has room. What is not: a
/// survivor that takes over one of the leaver's pieces can have to give up a later piece to
/// another survivor to stay within its share, even when both survivors end with the same
/// share as before. This test pins how much that costs: with 4 members and 64-shard batches,
/// survivors trade about 4% (equal weights) to 5.5% (random weights) of the batch among
/// themselves, while the leaver's own pieces are 25%. The runs are deterministic; the
/// bounds leave some slack for a change of hash and catch a regression to modulo-like
/// reshuffling.
#[test]
fn a_leaver_moves_few_pieces_between_survivors() {
    for (aligned, weighted, bound) in [
        (true, false, 0.05),
        (false, false, 0.07),
        (true, true, 0.07),
    ] {
        let mut rng = StdRng::seed_from_u64(17);
        let (mut moved, mut leavers, mut total) = (0u64, 0u64, 0u64);
        for case in 0..200usize {
            let shard = 16u64;
            let members: Vec<(NodeId, u32)> = (0..4)
                .map(|i| {
                    (
                        id(4 * case + i),
                        if weighted { rng.gen_range(1..6) } else { 1 },
                    )
                })
                .collect();
            let offset = if aligned {
                64 * shard * rng.gen_range(0..10)
            } else {
                rng.gen_range(0..10_000)
            };
            let b = StepBatch {
                cursor: DataCursor {
                    epoch: case as u64,
                    offset,
                },
                len: 64 * shard,
            };
            let before = assign(&members, &b, shard).unwrap();
            let x = rng.gen_range(0..4);
            let survivors: Vec<(NodeId, u32)> = members
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != x)
                .map(|(_, m)| m.clone())
                .collect();
            let after = assign(&survivors, &b, shard).unwrap();
            check_split(&after, &survivors, shard, &format!("case {case}"));
            for (r, owner) in before.pieces() {
                let n = r.end - r.start;
                total += n;
                let now = after.owner_of(r.start).unwrap();
                assert_ne!(now, &members[x].0);
                if owner == &members[x].0 {
                    leavers += n;
                } else if owner != now {
                    moved += n;
                }
            }
        }
        let (moved, leavers) = (moved as f64 / total as f64, leavers as f64 / total as f64);
        eprintln!(
            "aligned {aligned} weighted {weighted}: survivors traded {moved:.3}, the leaver held \
             {leavers:.3}"
        );
        assert!(
            moved <= bound,
            "aligned {aligned} weighted {weighted}: survivors traded {moved:.3} of the samples \
             (the leaver held {leavers:.3})"
        );
        assert!(leavers > 0.1, "the leaver held {leavers:.3}");
    }
}

/// Pieces follow rendezvous where room allows: with equal weights and a batch of many
/// shards, most pieces go to their highest-scoring member.
#[test]
fn most_pieces_go_to_their_top_scoring_member() {
    use coordinator_free::sharding::{member_digest, rendezvous_score};
    let members: Vec<(NodeId, u32)> = (0..5).map(|i| (id(i), 1)).collect();
    let digests: Vec<u64> = members.iter().map(|(m, _)| member_digest(m)).collect();
    let (mut top, mut total) = (0, 0);
    for epoch in 0..100 {
        let shard = 8;
        let b = StepBatch {
            cursor: DataCursor { epoch, offset: 0 },
            len: 100 * shard,
        };
        let a = assign(&members, &b, shard).unwrap();
        for (r, owner) in a.pieces() {
            let s = r.start / shard;
            let best = (0..members.len())
                .max_by_key(|&i| rendezvous_score(epoch, s, digests[i]))
                .unwrap();
            total += 1;
            top += usize::from(&members[best].0 == owner);
        }
    }
    let frac = top as f64 / total as f64;
    assert!(
        frac > 0.8,
        "only {frac:.3} of pieces went to their top choice"
    );
}
