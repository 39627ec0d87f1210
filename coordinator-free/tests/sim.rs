//! Deterministic simulated network for the membership core (in the style of quinn-proto's
//! `Pair` and raft-rs's harness): nodes are `Membership` machines, the network is a priority
//! queue of deliveries with random delay, drop and partitions, and crashes/restarts replace
//! machines. Everything is driven by one seeded RNG, so a failing seed replays exactly.

use coordinator_free::{
    Capabilities, Heartbeat, Membership, MembershipConfig, MembershipEvent, NodeId, View,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};

const MIN_DELAY: u64 = 1;
const MAX_DELAY: u64 = 40;

struct Delivery {
    at: u64,
    order: u64,
    to: usize,
    hb: Heartbeat,
}

impl PartialEq for Delivery {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.order) == (o.at, o.order)
    }
}
impl Eq for Delivery {}
impl PartialOrd for Delivery {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Delivery {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.order).cmp(&(o.at, o.order))
    }
}

struct Slot {
    id: NodeId,
    incarnation: u64,
    machine: Option<Membership>,
}

struct Sim {
    rng: StdRng,
    now: u64,
    config: MembershipConfig,
    slots: Vec<Slot>,
    queue: BinaryHeap<Reverse<Delivery>>,
    order: u64,
    /// Partition group of each slot; messages only flow within a group.
    groups: Vec<u8>,
    drop_prob: f64,
    ever: BTreeSet<NodeId>,
    views_seen: u64,
}

impl Sim {
    fn new(seed: u64, n: usize) -> Sim {
        let slots = (0..n)
            .map(|i| Slot {
                id: NodeId::new(format!("node-{i:02}")).unwrap(),
                incarnation: 0,
                machine: None,
            })
            .collect();
        Sim {
            rng: StdRng::seed_from_u64(seed),
            now: 0,
            config: MembershipConfig::default(),
            slots,
            queue: BinaryHeap::new(),
            order: 0,
            groups: vec![0; n],
            drop_prob: 0.0,
            ever: BTreeSet::new(),
            views_seen: 0,
        }
    }

    fn start(&mut self, i: usize) {
        let s = &mut self.slots[i];
        assert!(s.machine.is_none());
        s.incarnation += 1;
        self.ever.insert(s.id.clone());
        s.machine = Some(Membership::new(
            s.id.clone(),
            s.incarnation,
            Capabilities {
                cores: 2,
                ram_bytes: 1 << 30,
                gpus: vec![],
                speed_mflops: 0,
            },
            vec![format!("/sim/{i}")],
            self.config.clone(),
            self.now,
        ));
        self.drain(i);
    }

    fn crash(&mut self, i: usize) {
        self.slots[i].machine = None;
    }

    fn live(&self) -> Vec<usize> {
        (0..self.slots.len())
            .filter(|&i| self.slots[i].machine.is_some())
            .collect()
    }

    fn view(&self, i: usize) -> &View {
        self.slots[i].machine.as_ref().unwrap().view()
    }

    fn check_view(&self, i: usize, v: &View) {
        let me = &self.slots[i].id;
        assert!(v.contains(me), "node {me} view lacks itself: {v:?}");
        for id in v.ids() {
            assert!(self.ever.contains(id), "view holds unknown id {id}");
        }
        assert!(v.members.windows(2).all(|w| w[0].id < w[1].id));
        assert_eq!(v.hash, View::hash_of(v.epoch, &v.members));
    }

    /// Sends queued heartbeats of slot `i` and checks its events.
    fn drain(&mut self, i: usize) {
        let mut out = Vec::new();
        let mut views = Vec::new();
        {
            let m = self.slots[i].machine.as_mut().unwrap();
            while let Some(hb) = m.poll_transmit() {
                out.push(hb);
            }
            while let Some(ev) = m.poll_event() {
                if let MembershipEvent::ViewChanged(v) = ev {
                    views.push(v);
                }
            }
        }
        for v in views {
            self.views_seen += 1;
            self.check_view(i, &v);
        }
        for hb in out {
            for to in 0..self.slots.len() {
                if to == i || self.groups[to] != self.groups[i] {
                    continue;
                }
                if self.drop_prob > 0.0 && self.rng.gen_bool(self.drop_prob) {
                    continue;
                }
                let at = self.now + self.rng.gen_range(MIN_DELAY..=MAX_DELAY);
                self.order += 1;
                self.queue.push(Reverse(Delivery {
                    at,
                    order: self.order,
                    to,
                    hb: hb.clone(),
                }));
            }
        }
    }

    fn run_until(&mut self, t: u64) {
        loop {
            let next_msg = self.queue.peek().map(|d| d.0.at);
            let next_timer = self
                .slots
                .iter()
                .filter_map(|s| s.machine.as_ref().map(|m| m.poll_timeout()))
                .min();
            let next = match (next_msg, next_timer) {
                (Some(a), Some(b)) => a.min(b),
                (a, b) => a.or(b).unwrap_or(u64::MAX),
            };
            if next > t {
                self.now = t;
                return;
            }
            self.now = self.now.max(next);
            if next_msg == Some(next) {
                let Reverse(d) = self.queue.pop().unwrap();
                let from = self
                    .slots
                    .iter()
                    .position(|s| s.id == d.hb.id)
                    .expect("sender exists");
                // A partition raised while the message was in flight cuts it too.
                if self.groups[from] != self.groups[d.to] {
                    continue;
                }
                if let Some(m) = self.slots[d.to].machine.as_mut() {
                    // Stale or duplicate heartbeats are refused, never fatal.
                    let _ = m.handle_heartbeat(d.hb, self.now);
                    self.drain(d.to);
                }
            } else {
                for i in 0..self.slots.len() {
                    let due = self.slots[i]
                        .machine
                        .as_ref()
                        .is_some_and(|m| m.poll_timeout() <= self.now);
                    if due {
                        let entropy = self.rng.gen();
                        self.slots[i]
                            .machine
                            .as_mut()
                            .unwrap()
                            .handle_timeout(self.now, entropy);
                        self.drain(i);
                    }
                }
            }
        }
    }

    /// Slot `i` reports its current view failed (as a trainer does when a collective
    /// breaks without a member change).
    fn report_view_failed(&mut self, i: usize) {
        let now = self.now;
        let m = self.slots[i].machine.as_mut().unwrap();
        let hash = m.view().hash;
        assert!(m.handle_view_failed(&hash, now));
        self.drain(i);
    }

    /// All live nodes hold one view whose members are exactly the live nodes at their
    /// current incarnations.
    fn assert_converged(&self, what: &str, seed: u64) {
        let live = self.live();
        let expected: Vec<(NodeId, u64)> = live
            .iter()
            .map(|&i| (self.slots[i].id.clone(), self.slots[i].incarnation))
            .collect();
        let first = self.view(live[0]).clone();
        for &i in &live {
            let v = self.view(i);
            self.check_view(i, v);
            let got: Vec<(NodeId, u64)> = v
                .members
                .iter()
                .map(|m| (m.id.clone(), m.incarnation))
                .collect();
            assert_eq!(got, expected, "seed {seed} {what}: node {i} members");
            assert_eq!(v, &first, "seed {seed} {what}: node {i} view differs");
        }
    }
}

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
