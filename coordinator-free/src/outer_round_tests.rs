//! Unit tests of [`super`]: the outer math against hand-computed values, the settings, and
//! one member's walk through rounds, failures and view changes.

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

fn id(s: &str) -> NodeId {
    NodeId::new(s).unwrap()
}

fn close(got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-6, "{got:?} != {want:?}");
    }
}

/// Two Nesterov steps by hand (lr 0.7, μ 0.9, g = [0.5, 0.1] twice from θ = [1, -2]):
/// m₁ = g = [0.5, 0.1]; θ₁ = θ − 0.7·(g + 0.9·m₁) = [1 − 0.665, −2 − 0.133];
/// m₂ = 0.9·m₁ + g = [0.95, 0.19]; θ₂ = θ₁ − 0.7·([0.5, 0.1] + 0.9·[0.95, 0.19])
///    = θ₁ − 0.7·[1.355, 0.271] = [0.335 − 0.9485, −2.133 − 0.1897].
#[test]
fn outer_step_is_nesterov_sgd() {
    let mut theta = vec![1.0f32, -2.0];
    let mut m = vec![0.0f32; 2];
    let g = [0.5f32, 0.1];
    outer_step(&mut theta, &mut m, &g, 0.7, 0.9).unwrap();
    close(&m, &[0.5, 0.1]);
    close(&theta, &[0.335, -2.133]);
    outer_step(&mut theta, &mut m, &g, 0.7, 0.9).unwrap();
    close(&m, &[0.95, 0.19]);
    close(&theta, &[-0.6135, -2.3227]);
    // Without momentum it is plain SGD.
    let mut theta = vec![1.0f32, -2.0];
    let mut m = vec![0.0f32; 2];
    outer_step(&mut theta, &mut m, &g, 0.5, 0.0).unwrap();
    close(&theta, &[0.75, -2.05]);
    // Mismatched lengths are refused, and nothing moves.
    assert!(matches!(
        outer_step(&mut theta, &mut m, &[1.0], 0.5, 0.0),
        Err(OuterError::LengthMismatch(_))
    ));
    close(&theta, &[0.75, -2.05]);
}

/// With lr 1 and no momentum an outer round is model averaging: θ_global becomes the
/// sample-weighted mean of the members' local weights.
#[test]
fn lr_one_without_momentum_averages_the_members() {
    let global = [1.0f32, 2.0, 3.0];
    let locals = [[0.0f32, 2.0, 5.0], [3.0, -1.0, 3.0]];
    let (samples, total) = ([3u64, 1], 4u64);
    let mut sum = [0.0f32; 3];
    for (l, s) in locals.iter().zip(samples) {
        let mut part = [0.0f32; 3];
        pseudo_gradient(&global, l, s as f32 / total as f32, &mut part).unwrap();
        for (a, p) in sum.iter_mut().zip(part) {
            *a += p;
        }
    }
    // The contributions: 0.75·(θ − l₀) = [0.75, 0, −1.5], 0.25·(θ − l₁) = [−0.5, 0.75, 0].
    close(&sum, &[0.25, 0.75, -1.5]);
    let mut theta = global;
    let mut m = [0.0f32; 3];
    outer_step(&mut theta, &mut m, &sum, 1.0, 0.0).unwrap();
    close(&theta, &[0.75, 1.25, 4.5]); // 0.75·l₀ + 0.25·l₁
    assert!(pseudo_gradient(&global, &[1.0], 1.0, &mut sum).is_err());
}

#[test]
fn settings_default_to_the_issue_and_are_checked() {
    let c = OuterConfig::default();
    assert_eq!(
        (c.inner_steps, c.outer_lr, c.outer_momentum),
        (50, 0.7, 0.9)
    );
    assert_eq!(c.validate(), Ok(()));
    let bad = |f: fn(&mut OuterConfig)| {
        let mut c = OuterConfig::default();
        f(&mut c);
        c.validate().unwrap_err()
    };
    assert_eq!(bad(|c| c.inner_steps = 0), OuterError::NoInnerSteps);
    assert!(matches!(bad(|c| c.outer_lr = 0.0), OuterError::BadLr(_)));
    assert!(matches!(
        bad(|c| c.outer_lr = f32::NAN),
        OuterError::BadLr(_)
    ));
    assert!(matches!(
        bad(|c| c.outer_momentum = 1.0),
        OuterError::BadMomentum(_)
    ));
    assert!(matches!(
        bad(|c| c.outer_momentum = -0.1),
        OuterError::BadMomentum(_)
    ));
    assert!(bad(|c| c.outer_momentum = 1.0)
        .to_string()
        .contains("[0, 1)"));
}

#[test]
fn rounds_are_aligned_at_multiples_of_h() {
    assert_eq!(round_steps(0, 4, 10), 0..4);
    assert_eq!(round_steps(4, 4, 10), 4..8);
    assert_eq!(round_steps(8, 4, 10), 8..10, "the last round is short");
    assert_eq!(round_steps(10, 4, 10), 10..10, "nothing left");
    assert_eq!(
        round_steps(7, 4, 10),
        7..8,
        "an unaligned start reaches the next multiple"
    );
    assert_eq!(round_steps(3, 0, 10), 3..4, "H = 0 counts as 1");
}

fn plan() -> TrainingPlan {
    TrainingPlan {
        min_nodes: 2,
        total_steps: 7,
        batch_size: 4,
        n_samples: 10,
        shard_size: 1,
        balance: false,
    }
}

/// Brings `t` through the exchange and sync of `v`, everyone at `p`.
fn ready(t: &mut OuterTraining, v: &View, p: Progress) {
    t.handle_view(v);
    let all: Vec<(NodeId, Progress)> = v.ids().map(|i| (i.clone(), p)).collect();
    t.handle_progress(v.hash, &all).unwrap();
    assert!(matches!(t.poll_action().unwrap(), OuterAction::Sync { .. }));
    t.handle_synced(v.hash);
}

/// Runs the inner phase of the round `t` is in; returns its batches.
fn inner_phase(t: &mut OuterTraining) -> Vec<StepBatch> {
    let mut batches = Vec::new();
    while let OuterAction::InnerStep {
        view,
        round,
        inner,
        batch,
        ..
    } = t.poll_action().unwrap()
    {
        t.handle_inner_step(view.hash, round, inner).unwrap();
        batches.push(batch);
    }
    batches
}

#[test]
fn a_round_is_h_local_steps_then_one_outer_all_reduce() {
    let a = id("a");
    let mut t = OuterTraining::new(a.clone(), plan(), 3, Progress::default()).unwrap();
    assert!(OuterTraining::new(a.clone(), plan(), 0, Progress::default()).is_err());
    assert_eq!(t.poll_action().unwrap(), OuterAction::WaitForView);
    t.handle_view(&view(1, &["a"]));
    assert_eq!(
        t.poll_action().unwrap(),
        OuterAction::WaitForView,
        "min_nodes"
    );
    let v = view(2, &["a", "b"]);
    ready(&mut t, &v, Progress::default());
    // Round 0: steps 0..3 over consecutive batches, half of each for a.
    let OuterAction::InnerStep {
        round,
        step,
        inner,
        ranges,
        ..
    } = t.poll_action().unwrap()
    else {
        panic!()
    };
    assert_eq!((round, step, inner), (0, 0, 0));
    assert_eq!(ranges.iter().map(|r| r.end - r.start).sum::<u64>(), 2);
    // Stale inner reports change nothing.
    t.handle_inner_step(v.hash, 0, 1).unwrap();
    t.handle_inner_step(v.hash, 5, 0).unwrap();
    t.handle_inner_step(view(9, &["a", "b"]).hash, 0, 0)
        .unwrap();
    let batches = inner_phase(&mut t);
    let cursors: Vec<u64> = batches.iter().map(|b| b.cursor.offset).collect();
    assert_eq!(cursors, [0, 4, 8]);
    assert_eq!(batches[2].len, 2, "the epoch's last batch is short");
    assert_eq!(
        t.progress(),
        Progress::default(),
        "nothing commits before the outer step"
    );
    let OuterAction::OuterReduce {
        round,
        steps,
        samples,
        round_samples,
        ..
    } = t.poll_action().unwrap()
    else {
        panic!()
    };
    assert_eq!((round, steps, samples, round_samples), (0, 0..3, 5, 10));
    t.handle_outer(v.hash, 1, true); // stale round
    assert_eq!(t.rounds(), 0);
    t.handle_outer(v.hash, 0, true);
    let p1 = Progress {
        step: 3,
        cursor: DataCursor {
            epoch: 1,
            offset: 0,
        },
    };
    assert_eq!((t.progress(), t.rounds()), (p1, 1));
    // Round 1 in the same view, without a new sync.
    let batches = inner_phase(&mut t);
    assert_eq!(batches.len(), 3);
    assert_eq!(batches[0].cursor, p1.cursor);
    // The outer all-reduce fails: nothing commits, the round's work is discarded.
    t.handle_outer(v.hash, 1, false);
    assert_eq!(
        (t.progress(), t.redone, t.discarded_inner_steps),
        (p1, 1, 3)
    );
    assert_eq!(t.poll_action().unwrap(), OuterAction::WaitForView);
    // A new view mid-round discards the inner work done so far.
    let v2 = view(3, &["a", "b", "c"]);
    ready(&mut t, &v2, p1);
    let OuterAction::InnerStep {
        view: w,
        round,
        inner,
        ..
    } = t.poll_action().unwrap()
    else {
        panic!()
    };
    t.handle_inner_step(w.hash, round, inner).unwrap();
    let v3 = view(4, &["a", "c"]);
    t.handle_view(&v3);
    assert_eq!((t.redone, t.discarded_inner_steps), (2, 4));
    assert!(matches!(
        t.poll_action().unwrap(),
        OuterAction::ExchangeProgress { .. }
    ));
    // Redone from the committed cursor: the same batches.
    ready(&mut t, &v3, p1);
    let again = inner_phase(&mut t);
    assert_eq!(again, batches);
    t.handle_outer(v3.hash, 1, true);
    assert_eq!((t.progress().step, t.rounds()), (6, 2));
    // The last round is short: step 6 only; then finished.
    assert_eq!(inner_phase(&mut t).len(), 1);
    t.handle_outer(v3.hash, 2, true);
    assert_eq!((t.progress().step, t.rounds()), (7, 3));
    assert_eq!(t.poll_action().unwrap(), OuterAction::Finished);
}

#[test]
fn shares_are_fixed_for_a_round_and_follow_speeds_after_it() {
    let (a, b) = (id("a"), id("b"));
    let plan = TrainingPlan {
        min_nodes: 2,
        total_steps: 20,
        batch_size: 30,
        n_samples: 600,
        shard_size: 1,
        balance: true,
    };
    let v = view(1, &["a", "b"]);
    let mut t = OuterTraining::new(a.clone(), plan, 2, Progress::default()).unwrap();
    ready(&mut t, &v, Progress::default());
    let mine = |t: &OuterTraining| match t.poll_action().unwrap() {
        OuterAction::InnerStep { ranges, .. } => ranges.iter().map(|r| r.end - r.start).sum(),
        OuterAction::OuterReduce { samples, .. } => samples,
        other => panic!("{other:?}"),
    };
    assert_eq!(mine(&t), 15);
    t.handle_inner_step(v.hash, 0, 0).unwrap();
    // Speeds arrive only with the outer all-reduce; mid-round reports are ignored.
    t.handle_speeds(v.hash, 0, &[(a.clone(), 200.0), (b.clone(), 100.0)]);
    assert_eq!(mine(&t), 15, "fixed for the round");
    t.handle_inner_step(v.hash, 0, 1).unwrap();
    assert_eq!(mine(&t), 30, "a's samples over the round");
    t.handle_speeds(v.hash, 0, &[(a.clone(), 200.0), (b.clone(), 100.0)]);
    t.handle_outer(v.hash, 0, true);
    assert_eq!(mine(&t), 20, "2 : 1 in the next round");
    // A sync starts again from equal shares.
    let v2 = view(2, &["a", "b"]);
    let p = t.progress();
    ready(&mut t, &v2, p);
    assert_eq!(mine(&t), 15);
}

#[test]
fn the_sync_root_is_the_member_a_round_ahead() {
    let a = id("a");
    let mut t = OuterTraining::new(a.clone(), plan(), 3, Progress::default()).unwrap();
    let v = view(1, &["a", "b", "c"]);
    t.handle_view(&v);
    let ahead = Progress {
        step: 3,
        cursor: DataCursor {
            epoch: 1,
            offset: 0,
        },
    };
    let all = [
        (a.clone(), Progress::default()),
        (id("b"), ahead),
        (id("c"), Progress::default()),
    ];
    t.handle_progress(v.hash, &all).unwrap();
    let OuterAction::Sync {
        root,
        root_rank,
        progress,
        ..
    } = t.poll_action().unwrap()
    else {
        panic!()
    };
    assert_eq!((root.as_str(), root_rank, progress), ("b", 1, ahead));
    // An exchange or sync failure waits for the next view without discarding anything.
    t.handle_failure();
    assert_eq!(t.poll_action().unwrap(), OuterAction::WaitForView);
    assert_eq!(t.redone, 0);
    // Impossible progress is refused.
    t.handle_view(&view(2, &["a", "b"]));
    let bad = [
        (a, Progress::default()),
        (id("b"), Progress { step: 99, ..ahead }),
    ];
    assert!(matches!(
        t.handle_progress(view(2, &["a", "b"]).hash, &bad),
        Err(TrainingError::BadProgress { .. })
    ));
}

/// The shell's view, exchange and sync code can be written once over [`RoundMachine`]: the
/// same generic walk brings both machines to their first step, and a failure to waiting.
#[test]
fn one_generic_sync_path_serves_both_machines() {
    fn bring_up<M: RoundMachine>(m: &mut M, v: &View, at: Progress) {
        m.handle_view(v);
        let all: Vec<(NodeId, Progress)> = v.ids().map(|i| (i.clone(), at)).collect();
        m.handle_progress(v.hash, &all).unwrap();
        m.handle_synced(v.hash);
        assert_eq!(m.progress(), at);
    }
    let v = view(1, &["a", "b"]);
    let at = Progress {
        step: 3,
        cursor: DataCursor {
            epoch: 0,
            offset: 4,
        },
    };
    let mut sync = crate::training::Training::new(id("a"), plan(), Progress::default());
    bring_up(&mut sync, &v, at);
    assert!(matches!(
        sync.poll_action().unwrap(),
        crate::training::Action::Step { step: 3, .. }
    ));
    let mut outer = OuterTraining::new(id("a"), plan(), 3, Progress::default()).unwrap();
    bring_up(&mut outer, &v, at);
    assert!(matches!(
        outer.poll_action().unwrap(),
        OuterAction::InnerStep {
            round: 1,
            step: 3,
            ..
        }
    ));
    RoundMachine::handle_failure(&mut outer);
    assert_eq!(outer.poll_action().unwrap(), OuterAction::WaitForView);
}

/// A run resumed at a step that is not a multiple of H (a synchronous run's checkpoint)
/// takes one short round to the next multiple, then whole rounds.
#[test]
fn an_unaligned_resume_takes_a_short_round_first() {
    let at = Progress {
        step: 4,
        cursor: DataCursor {
            epoch: 1,
            offset: 6,
        },
    };
    let mut t = OuterTraining::new(id("a"), plan(), 3, at).unwrap();
    assert_eq!(
        t.rounds(),
        2,
        "ceil(4 / 3) outer steps counted as committed"
    );
    let v = view(1, &["a", "b"]);
    ready(&mut t, &v, at);
    let batches = inner_phase(&mut t);
    assert_eq!(batches.len(), 2, "steps 4 and 5");
    assert_eq!(batches[0].cursor, at.cursor);
    let OuterAction::OuterReduce { round, steps, .. } = t.poll_action().unwrap() else {
        panic!()
    };
    assert_eq!((round, steps.clone()), (1, 4..6));
    t.handle_outer(v.hash, round, true);
    assert_eq!((t.progress().step, t.rounds()), (6, 2));
    assert_eq!(inner_phase(&mut t).len(), 1, "the job's last step");
    t.handle_outer(v.hash, 2, true);
    assert_eq!(t.poll_action().unwrap(), OuterAction::Finished);
}
