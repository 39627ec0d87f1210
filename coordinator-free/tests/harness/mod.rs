//! The one simulated network every simulation of the core runs on (in the style of
//! quinn-proto's `Pair` and raft-rs's harness): nodes are `Membership` machines, the network
//! is a priority queue of deliveries with random delay, drop and partitions, and
//! crashes/restarts replace machines. Everything is driven by one seeded RNG, so a failing
//! seed replays exactly. `tests/sim.rs` checks membership on it; `tests/training_sim.rs`
//! drives training machines with the views it produces.
#![allow(dead_code)]

use coordinator_free::{
    Capabilities, Heartbeat, Membership, MembershipConfig, MembershipEvent, NodeId, View,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};

pub const MIN_DELAY: u64 = 1;
pub const MAX_DELAY: u64 = 40;

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

pub struct Slot {
    pub id: NodeId,
    pub incarnation: u64,
    pub machine: Option<Membership>,
}

pub struct Sim {
    pub rng: StdRng,
    pub now: u64,
    pub config: MembershipConfig,
    pub slots: Vec<Slot>,
    queue: BinaryHeap<Reverse<Delivery>>,
    order: u64,
    /// Partition group of each slot; messages only flow within a group.
    pub groups: Vec<u8>,
    pub drop_prob: f64,
    pub ever: BTreeSet<NodeId>,
    pub views_seen: u64,
}

impl Sim {
    pub fn new(seed: u64, n: usize) -> Sim {
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

    pub fn start(&mut self, i: usize) {
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
                device: "cpu".into(),
                device_free_bytes: 1 << 29,
            },
            vec![format!("/sim/{i}")],
            self.config.clone(),
            self.now,
        ));
        self.drain(i);
    }

    /// The id of slot `i` (the same across its restarts).
    pub fn id(&self, i: usize) -> &NodeId {
        &self.slots[i].id
    }

    /// Slot `i` reports that a collective failed in the view with `hash` (as a trainer
    /// does); false when its machine has moved past that view.
    pub fn report_failed(&mut self, i: usize, hash: &coordinator_free::ViewHash) -> bool {
        let now = self.now;
        let taken = self.slots[i]
            .machine
            .as_mut()
            .unwrap()
            .handle_view_failed(hash, now);
        self.drain(i);
        taken
    }

    pub fn crash(&mut self, i: usize) {
        self.slots[i].machine = None;
    }

    pub fn live(&self) -> Vec<usize> {
        (0..self.slots.len())
            .filter(|&i| self.slots[i].machine.is_some())
            .collect()
    }

    pub fn view(&self, i: usize) -> &View {
        self.slots[i].machine.as_ref().unwrap().view()
    }

    pub fn check_view(&self, i: usize, v: &View) {
        let me = &self.slots[i].id;
        assert!(v.contains(me), "node {me} view lacks itself: {v:?}");
        for id in v.ids() {
            assert!(self.ever.contains(id), "view holds unknown id {id}");
        }
        assert!(v.members.windows(2).all(|w| w[0].id < w[1].id));
        assert_eq!(v.hash, View::hash_of(v.epoch, &v.members));
    }

    /// Sends queued heartbeats of slot `i` and checks its events.
    pub fn drain(&mut self, i: usize) {
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

    pub fn run_until(&mut self, t: u64) {
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
    pub fn report_view_failed(&mut self, i: usize) {
        let now = self.now;
        let m = self.slots[i].machine.as_mut().unwrap();
        let hash = m.view().hash;
        assert!(m.handle_view_failed(&hash, now));
        self.drain(i);
    }

    /// All live nodes hold one view whose members are exactly the live nodes at their
    /// current incarnations.
    pub fn assert_converged(&self, what: &str, seed: u64) {
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
