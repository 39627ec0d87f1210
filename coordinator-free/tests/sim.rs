//! The membership core on the simulated network (`harness`): views converge after chaos
//! (crashes, restarts, partitions, lossy links), crashes are detected within the bound, replays
//! are refused, and a reported view failure restarts every member in one new view.

mod harness;

use harness::{Sim, MAX_DELAY};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn scenario(seed: u64) -> u64 {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5eed);
    let n = rng.gen_range(3..=8);
    let mut sim = Sim::new(seed, n);
    let cfg = sim.config.clone();
    let converge = cfg.convergence_bound_ms(MAX_DELAY);
    let detect = cfg.detection_bound_ms(MAX_DELAY);

    // Staggered start.
    let mut starts: Vec<(u64, usize)> = (0..n).map(|i| (rng.gen_range(0..500), i)).collect();
    starts.sort();
    for (t, i) in starts {
        sim.run_until(t);
        sim.start(i);
    }

    // Chaos: crashes, restarts, partitions, lossy links.
    let chaos_end = 500 + rng.gen_range(3_000..10_000);
    while sim.now < chaos_end {
        let t = sim.now + rng.gen_range(100..1_200);
        sim.run_until(t.min(chaos_end));
        match rng.gen_range(0..7) {
            0 => {
                let live = sim.live();
                if live.len() > 1 {
                    let i = live[rng.gen_range(0..live.len())];
                    sim.crash(i);
                }
            }
            1 => {
                let dead: Vec<usize> = (0..n).filter(|&i| !sim.live().contains(&i)).collect();
                if !dead.is_empty() {
                    let i = dead[rng.gen_range(0..dead.len())];
                    sim.start(i);
                }
            }
            2 => {
                let k = rng.gen_range(1..=3u8);
                sim.groups = (0..n).map(|_| rng.gen_range(0..k)).collect();
            }
            3 => sim.groups = vec![0; n],
            4 => sim.drop_prob = rng.gen_range(0.0..0.3),
            5 => {
                // A member's collective failed in its view: everyone should restart together.
                let live = sim.live();
                let i = live[rng.gen_range(0..live.len())];
                sim.report_view_failed(i);
            }
            _ => sim.drop_prob = 0.0,
        }
    }

    // Heal; some crashed nodes come back.
    sim.groups = vec![0; n];
    sim.drop_prob = 0.0;
    for i in 0..n {
        if !sim.live().contains(&i) && rng.gen_bool(0.5) {
            sim.start(i);
        }
    }
    if sim.live().is_empty() {
        sim.start(0);
    }
    let healed = sim.now;
    sim.run_until(healed + converge);
    sim.assert_converged("after heal", seed);

    // A crash leaves every view within the detection bound.
    let live = sim.live();
    if live.len() >= 2 {
        let victim = live[rng.gen_range(0..live.len())];
        sim.crash(victim);
        let crashed_at = sim.now;
        sim.run_until(crashed_at + detect);
        let vid = sim.slots[victim].id.clone();
        for i in sim.live() {
            assert!(
                !sim.view(i).contains(&vid),
                "seed {seed}: node {i} still holds crashed {vid} after {detect} ms"
            );
        }
        sim.run_until(crashed_at + converge);
        sim.assert_converged("after crash", seed);

        // The restarted node rejoins under a new incarnation.
        sim.start(victim);
        let restarted_at = sim.now;
        sim.run_until(restarted_at + converge);
        sim.assert_converged("after restart", seed);
        for i in sim.live() {
            let inc = sim
                .view(i)
                .members
                .iter()
                .find(|m| m.id == vid)
                .map(|m| m.incarnation);
            assert_eq!(inc, Some(sim.slots[victim].incarnation), "seed {seed}");
        }
    }
    sim.views_seen
}

#[test]
fn membership_properties_hold_over_600_seeds() {
    let mut views = 0;
    for seed in 0..600 {
        views += scenario(seed);
    }
    // The scenarios must actually exercise view changes.
    assert!(views > 600 * 10, "only {views} view changes seen");
}

#[test]
fn quiet_cluster_converges_fast_and_stays_stable() {
    let mut sim = Sim::new(42, 16);
    for i in 0..16 {
        sim.start(i);
    }
    let cfg = sim.config.clone();
    sim.run_until(cfg.heartbeat_interval_ms * 2 + 3 * MAX_DELAY);
    sim.assert_converged("16 nodes", 42);
    let v = sim.view(0).clone();
    sim.run_until(sim.now + 30_000);
    assert_eq!(sim.view(0), &v, "a quiet cluster must not change its view");
}

#[test]
fn replayed_heartbeats_do_not_resurrect_a_crashed_node() {
    let mut sim = Sim::new(7, 3);
    for i in 0..3 {
        sim.start(i);
    }
    sim.run_until(1_000);
    // Node 2 crashes; a heartbeat it produced at its last moment was captured by an
    // attacker instead of being delivered.
    let mut m2 = sim.slots[2].machine.take().unwrap();
    let t = m2.poll_timeout().max(sim.now);
    m2.handle_timeout(t, 0);
    let old = m2.poll_transmit().expect("heartbeat due");
    let cfg = sim.config.clone();
    sim.run_until(1_000 + cfg.detection_bound_ms(MAX_DELAY) + 10);
    let m0 = sim.slots[0].machine.as_mut().unwrap();
    assert_eq!(m0.view().len(), 2, "crashed node detected");
    // The captured heartbeat was never delivered, so it is genuinely new: taken once...
    m0.handle_heartbeat(old.clone(), sim.now).unwrap();
    assert_eq!(m0.view().len(), 3);
    // ...a replay of it is refused...
    assert!(m0.handle_heartbeat(old, sim.now).is_err());
    // ...and with nothing further from the dead node it fails again within the bound.
    let t = sim.now + cfg.detection_bound_ms(MAX_DELAY);
    sim.run_until(t);
    assert_eq!(sim.view(0).len(), 2);
    assert_eq!(sim.view(0), sim.view(1));
}

/// A failure report moves every member to one new view with the same members, however many
/// members report it and whenever they do (before or after they adopted the new epoch), on
/// a lossy network; stale reports change nothing, and the cluster is quiet afterwards.
#[test]
fn a_reported_view_failure_restarts_every_member_in_one_new_view() {
    for seed in 0..300 {
        let mut rng = StdRng::seed_from_u64(seed ^ 0xfa11);
        let n = rng.gen_range(2..=7);
        let mut sim = Sim::new(seed, n);
        for i in 0..n {
            sim.start(i);
        }
        let cfg = sim.config.clone();
        let converge = cfg.convergence_bound_ms(MAX_DELAY);
        sim.run_until(converge);
        sim.assert_converged("start", seed);
        let before = sim.view(0).clone();
        sim.drop_prob = rng.gen_range(0.0..0.2);
        let reporters = rng.gen_range(1..=n);
        let mut at: Vec<(u64, usize)> = (0..reporters)
            .map(|_| {
                (
                    sim.now + rng.gen_range(0..3 * MAX_DELAY),
                    rng.gen_range(0..n),
                )
            })
            .collect();
        at.sort();
        for (t, i) in at {
            sim.run_until(t);
            // A member reports the view it ran in: the old one, even if it moved on since.
            let now = sim.now;
            let m = sim.slots[i].machine.as_mut().unwrap();
            let moved_on = m.view().hash != before.hash;
            assert_eq!(
                m.handle_view_failed(&before.hash, now),
                !moved_on,
                "seed {seed}"
            );
            sim.drain(i);
        }
        sim.drop_prob = 0.0;
        let t = sim.now + converge;
        sim.run_until(t);
        sim.assert_converged("after failure reports", seed);
        let after = sim.view(0).clone();
        assert!(after.epoch > before.epoch, "seed {seed}: epoch moved on");
        assert_eq!(after.members, before.members, "seed {seed}: same members");
        let t = sim.now + 10 * cfg.heartbeat_interval_ms;
        sim.run_until(t);
        assert_eq!(sim.view(0), &after, "seed {seed}: quiet afterwards");
    }
}
