//! Membership: who is alive, from heartbeats, and the view that follows.
//!
//! Every node broadcasts a [`Heartbeat`] every `heartbeat_interval_ms` (with jitter from the
//! entropy the caller passes in). A member is named by its id and its *incarnation*, which
//! the shell bumps on every restart; within one incarnation heartbeats carry an increasing
//! `seq`, so replays and reordered stale heartbeats are ignored.
//!
//! Failure detection is timeout-based with suspicion: silence for `suspect_after_ms` makes
//! a member *suspect* (still in the view, reported), silence for `fail_after_ms` makes it
//! *failed* (out of the view). Any fresh heartbeat refutes both. Failed entries are kept as
//! tombstones for `forget_after_ms` so delayed old heartbeats cannot resurrect them.
//!
//! ## Views without a coordinator
//! The view's members are the alive and suspect entries plus the node itself. The epoch is
//! agreed on by a max rule: when a node's member set changes it takes
//! `max(own epoch, largest epoch any member announced) + 1`; when a heartbeat shows a peer
//! holding the *same* members (its announced hash equals `hash_of(its epoch, my members)`)
//! at a larger epoch, the node adopts that epoch. Once heartbeats flow and membership is
//! quiet, every node has the same members, and within one more heartbeat round the same
//! (largest) epoch, so the same hash. Epochs never go down.
//!
//! ## Bounds
//! With `d` the largest message delay, a crashed member leaves every view within
//! `fail_after_ms + d` of its last heartbeat; after the network heals, all live nodes hold
//! one view within [`MembershipConfig::convergence_bound_ms`].

use crate::address::DataPlaneAddr;
use crate::view::{NodeId, View, ViewHash, ViewMember};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};

/// Most control-plane addresses a heartbeat may carry.
pub const MAX_ADDRS: usize = 16;
/// Longest address string, in bytes.
pub const MAX_ADDR_LEN: usize = 256;
/// Most GPUs a heartbeat may describe.
pub const MAX_GPUS: usize = 64;
/// Longest GPU name, in bytes.
pub const MAX_GPU_NAME: usize = 128;
/// Longest compute-device name (`cpu`, `cuda:3`), in bytes.
pub const MAX_DEVICE_NAME: usize = 32;

/// One GPU of a member.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct GpuInfo {
    /// Device name as the driver reports it.
    pub name: String,
    /// Total device memory in bytes.
    pub total_bytes: u64,
    /// Free device memory in bytes when the heartbeat was sent.
    pub free_bytes: u64,
}

/// What a member offers.
#[derive(Clone, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Capabilities {
    /// Logical CPU cores.
    pub cores: u32,
    /// Physical memory in bytes.
    pub ram_bytes: u64,
    /// GPUs with their free memory.
    pub gpus: Vec<GpuInfo>,
    /// Measured compute speed in MFLOP/s (f32 matrix products on [`device`](Self::device);
    /// 0 if unmeasured). The serving planner cuts stages in proportion to it.
    pub speed_mflops: u32,
    /// The device the member computes on, as the shell names it (`cpu`, `cuda:0`; at
    /// most [`MAX_DEVICE_NAME`] bytes). Empty: not announced.
    #[serde(default)]
    pub device: String,
    /// Free memory on that device in bytes (the CPU's available memory, a CUDA device's
    /// free memory); 0 when unknown. The serving planner budgets stages by it when known.
    #[serde(default)]
    pub device_free_bytes: u64,
}

/// A member's periodic announcement on the control plane.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    /// The sender. The shell checks it equals the gossip message's signed author.
    pub id: NodeId,
    /// The sender's incarnation (bumped on every restart).
    pub incarnation: u64,
    /// Increases with every heartbeat within one incarnation.
    pub seq: u64,
    /// Epoch of the sender's current view.
    pub view_epoch: u64,
    /// Hash of the sender's current view.
    pub view_hash: ViewHash,
    /// The sender's capabilities.
    pub caps: Capabilities,
    /// Where the sender's control plane listens (multiaddrs, opaque to the core).
    pub addrs: Vec<String>,
    /// Where the sender's data plane listens (on the wire as `<transport>/<ip>:<port>`).
    pub data_addr: Option<DataPlaneAddr>,
}

impl Heartbeat {
    /// Checks the bounds the codec's byte limit does not already imply.
    pub fn validate(&self) -> Result<(), String> {
        if self.addrs.len() > MAX_ADDRS {
            return Err(format!("{} addresses, limit {MAX_ADDRS}", self.addrs.len()));
        }
        // The data-plane address is typed: it decoded only if within its bound.
        if let Some(a) = self.addrs.iter().find(|a| a.len() > MAX_ADDR_LEN) {
            return Err(format!(
                "address of {} bytes, limit {MAX_ADDR_LEN}",
                a.len()
            ));
        }
        if self.caps.gpus.len() > MAX_GPUS {
            return Err(format!("{} GPUs, limit {MAX_GPUS}", self.caps.gpus.len()));
        }
        if self.caps.gpus.iter().any(|g| g.name.len() > MAX_GPU_NAME) {
            return Err(format!("GPU name longer than {MAX_GPU_NAME} bytes"));
        }
        if self.caps.gpus.iter().any(|g| g.free_bytes > g.total_bytes) {
            return Err("GPU free memory exceeds its total".into());
        }
        if self.caps.device.len() > MAX_DEVICE_NAME {
            return Err(format!("device name longer than {MAX_DEVICE_NAME} bytes"));
        }
        if self.caps.device.chars().any(char::is_control) {
            return Err("device name with control characters".into());
        }
        if self.seq == 0 {
            return Err("heartbeat seq starts at 1".into());
        }
        Ok(())
    }
}

/// Timing of heartbeats and failure detection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MembershipConfig {
    /// Interval between a node's heartbeats. Default: 250 ms.
    pub heartbeat_interval_ms: u64,
    /// Up to this much is taken off each interval at random (from the caller's entropy),
    /// so nodes do not beat in lockstep. Default: 50 ms.
    pub heartbeat_jitter_ms: u64,
    /// Silence after which a member is suspected (still in the view). Default: 750 ms.
    pub suspect_after_ms: u64,
    /// Silence after which a member is failed and leaves the view. Default: 1500 ms.
    pub fail_after_ms: u64,
    /// How long a failed member's tombstone is kept. Default: 60 000 ms.
    pub forget_after_ms: u64,
    /// Most members tracked; heartbeats from further new ids are refused. Default: 1024.
    pub max_members: usize,
}

impl Default for MembershipConfig {
    fn default() -> Self {
        MembershipConfig {
            heartbeat_interval_ms: 250,
            heartbeat_jitter_ms: 50,
            suspect_after_ms: 750,
            fail_after_ms: 1500,
            forget_after_ms: 60_000,
            max_members: 1024,
        }
    }
}

impl MembershipConfig {
    /// Time after the network heals (and stays quiet) by which all live nodes hold the same
    /// view, given the largest one-way message delay `max_delay_ms`: stale members fail,
    /// every live node hears every other, then one more heartbeat round aligns the epochs.
    pub fn convergence_bound_ms(&self, max_delay_ms: u64) -> u64 {
        self.fail_after_ms + 2 * self.heartbeat_interval_ms + 3 * max_delay_ms
    }

    /// Time after a crash by which every live node's view lacks the crashed node.
    pub fn detection_bound_ms(&self, max_delay_ms: u64) -> u64 {
        self.fail_after_ms + max_delay_ms
    }

    /// Checks the timings make sense together.
    pub fn validate(&self) -> Result<(), String> {
        if self.heartbeat_interval_ms == 0 {
            return Err("heartbeat interval must be positive".into());
        }
        if self.heartbeat_jitter_ms >= self.heartbeat_interval_ms {
            return Err("heartbeat jitter must be below the interval".into());
        }
        if self.suspect_after_ms <= self.heartbeat_interval_ms {
            return Err("suspect-after must exceed the heartbeat interval".into());
        }
        if self.fail_after_ms <= self.suspect_after_ms {
            return Err("fail-after must exceed suspect-after".into());
        }
        Ok(())
    }
}

/// Liveness of a member as this node sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    /// Heard from within `suspect_after_ms`.
    Alive,
    /// Silent for `suspect_after_ms`; still in the view.
    Suspect,
    /// Silent for `fail_after_ms`; out of the view (a tombstone).
    Failed,
}

/// What this node knows of one member.
#[derive(Clone, Debug, PartialEq)]
pub struct MemberInfo {
    /// The member's id.
    pub id: NodeId,
    /// Latest incarnation heard.
    pub incarnation: u64,
    /// Latest heartbeat seq heard in that incarnation.
    pub seq: u64,
    /// Liveness.
    pub state: MemberState,
    /// When the latest heartbeat arrived (caller's clock, ms).
    pub last_heard_ms: u64,
    /// Capabilities from the latest heartbeat.
    pub caps: Capabilities,
    /// Control-plane addresses from the latest heartbeat.
    pub addrs: Vec<String>,
    /// Data-plane address from the latest heartbeat.
    pub data_addr: Option<DataPlaneAddr>,
    /// Epoch and hash of the member's own view, from its latest heartbeat.
    pub their_view: (u64, ViewHash),
}

/// Something the shell may want to log or act on.
#[derive(Clone, Debug, PartialEq)]
pub enum MembershipEvent {
    /// A member was heard from for the first time (or again after its tombstone expired).
    Joined(NodeId),
    /// A member came back at a new incarnation (it restarted).
    Restarted(NodeId, u64),
    /// A member fell silent for `suspect_after_ms`.
    Suspected(NodeId),
    /// A suspect or failed member was heard from again within its incarnation.
    Recovered(NodeId),
    /// A member fell silent for `fail_after_ms` and left the view.
    Failed(NodeId),
    /// The view changed (new members or a new epoch).
    ViewChanged(View),
}

/// Why a heartbeat was not taken.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeartbeatError {
    /// The heartbeat claims to come from this node.
    #[error("heartbeat carries our own id")]
    OwnId,
    /// Its incarnation is older than one already heard from that id.
    #[error("stale incarnation {got} < {known}")]
    StaleIncarnation {
        /// Incarnation in the heartbeat.
        got: u64,
        /// Incarnation already known.
        known: u64,
    },
    /// Its seq is not newer than one already heard in the same incarnation (a duplicate,
    /// a replay or a reordering).
    #[error("stale seq {got} <= {known}")]
    StaleSeq {
        /// Seq in the heartbeat.
        got: u64,
        /// Seq already known.
        known: u64,
    },
    /// The membership table is full.
    #[error("membership table is full ({0} members)")]
    TableFull(usize),
    /// The heartbeat breaks a content rule.
    #[error("invalid heartbeat: {0}")]
    Invalid(String),
}

/// The membership state machine of one node.
#[derive(Debug)]
pub struct Membership {
    config: MembershipConfig,
    me: NodeId,
    incarnation: u64,
    seq: u64,
    caps: Capabilities,
    addrs: Vec<String>,
    data_addr: Option<DataPlaneAddr>,
    table: BTreeMap<NodeId, MemberInfo>,
    view: View,
    next_heartbeat_ms: u64,
    transmits: VecDeque<Heartbeat>,
    events: VecDeque<MembershipEvent>,
}

impl Membership {
    /// A node `me` at `incarnation`, starting at `now`. Its first heartbeat is due at once
    /// and its first view holds only itself, at epoch 1.
    pub fn new(
        me: NodeId,
        incarnation: u64,
        caps: Capabilities,
        addrs: Vec<String>,
        config: MembershipConfig,
        now: u64,
    ) -> Membership {
        let view = View::new(
            1,
            vec![ViewMember {
                id: me.clone(),
                incarnation,
            }],
        );
        let mut m = Membership {
            config,
            me,
            incarnation,
            seq: 0,
            caps,
            addrs,
            data_addr: None,
            table: BTreeMap::new(),
            view: view.clone(),
            next_heartbeat_ms: now,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        };
        m.events.push_back(MembershipEvent::ViewChanged(view));
        m
    }

    /// This node's id.
    pub fn me(&self) -> &NodeId {
        &self.me
    }

    /// This node's incarnation.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// The configuration in force.
    pub fn config(&self) -> &MembershipConfig {
        &self.config
    }

    /// The current view.
    pub fn view(&self) -> &View {
        &self.view
    }

    /// Everything known of other members, tombstones included, sorted by id.
    pub fn members(&self) -> impl Iterator<Item = &MemberInfo> {
        self.table.values()
    }

    /// What is known of one member.
    pub fn member(&self, id: &NodeId) -> Option<&MemberInfo> {
        self.table.get(id)
    }

    /// This node's own capabilities.
    pub fn local_capabilities(&self) -> &Capabilities {
        &self.caps
    }

    /// Replaces this node's capabilities and addresses; they go out with the next heartbeat.
    pub fn set_local(&mut self, caps: Capabilities, addrs: Vec<String>) {
        self.caps = caps;
        self.addrs = addrs;
    }

    /// Sets where this node's data plane listens; it goes out with the next heartbeat.
    pub fn set_data_addr(&mut self, addr: Option<DataPlaneAddr>) {
        self.data_addr = addr;
    }

    /// Whether the current view is *settled*: every other member of it reports, in its
    /// latest heartbeat, holding this same view (same hash). Until then a collective in
    /// this view would wait for members still in another one; trainers start steps only
    /// in a settled view. A view of this node alone is settled.
    pub fn view_settled(&self) -> bool {
        self.view.ids().all(|id| {
            id == &self.me
                || self
                    .table
                    .get(id)
                    .is_some_and(|m| m.their_view.1 == self.view.hash)
        })
    }

    /// Takes in a heartbeat that arrived at `now`.
    pub fn handle_heartbeat(&mut self, hb: Heartbeat, now: u64) -> Result<(), HeartbeatError> {
        if hb.id == self.me {
            return Err(HeartbeatError::OwnId);
        }
        hb.validate().map_err(HeartbeatError::Invalid)?;
        let mut set_changed = false;
        match self.table.get_mut(&hb.id) {
            Some(e) => {
                if hb.incarnation < e.incarnation {
                    return Err(HeartbeatError::StaleIncarnation {
                        got: hb.incarnation,
                        known: e.incarnation,
                    });
                }
                if hb.incarnation == e.incarnation && hb.seq <= e.seq {
                    return Err(HeartbeatError::StaleSeq {
                        got: hb.seq,
                        known: e.seq,
                    });
                }
                if hb.incarnation > e.incarnation {
                    self.events
                        .push_back(MembershipEvent::Restarted(hb.id.clone(), hb.incarnation));
                    set_changed = true;
                } else if e.state != MemberState::Alive {
                    self.events
                        .push_back(MembershipEvent::Recovered(hb.id.clone()));
                }
                if e.state == MemberState::Failed {
                    set_changed = true;
                }
                e.incarnation = hb.incarnation;
                e.seq = hb.seq;
                e.state = MemberState::Alive;
                e.last_heard_ms = now;
                e.caps = hb.caps;
                e.addrs = hb.addrs;
                e.data_addr = hb.data_addr;
                e.their_view = (hb.view_epoch, hb.view_hash);
            }
            None => {
                if self.table.len() >= self.config.max_members {
                    return Err(HeartbeatError::TableFull(self.table.len()));
                }
                self.events
                    .push_back(MembershipEvent::Joined(hb.id.clone()));
                self.table.insert(
                    hb.id.clone(),
                    MemberInfo {
                        id: hb.id.clone(),
                        incarnation: hb.incarnation,
                        seq: hb.seq,
                        state: MemberState::Alive,
                        last_heard_ms: now,
                        caps: hb.caps,
                        addrs: hb.addrs,
                        data_addr: hb.data_addr,
                        their_view: (hb.view_epoch, hb.view_hash),
                    },
                );
                set_changed = true;
            }
        }
        if set_changed {
            self.rebuild_view(now);
        }
        // Epoch adoption: the sender holds our exact member set at a larger epoch.
        if hb.view_epoch > self.view.epoch
            && View::hash_of(hb.view_epoch, &self.view.members) == hb.view_hash
        {
            self.set_view(View::new(hb.view_epoch, self.view.members.clone()), now);
        }
        Ok(())
    }

    /// Advances time to `now`: suspects and fails silent members, forgets old tombstones,
    /// and queues this node's heartbeat when it is due. `entropy` jitters the next beat.
    pub fn handle_timeout(&mut self, now: u64, entropy: u64) {
        let mut set_changed = false;
        let mut forget = Vec::new();
        for e in self.table.values_mut() {
            let silence = now.saturating_sub(e.last_heard_ms);
            if e.state == MemberState::Alive && silence >= self.config.suspect_after_ms {
                e.state = MemberState::Suspect;
                self.events
                    .push_back(MembershipEvent::Suspected(e.id.clone()));
            }
            if e.state == MemberState::Suspect && silence >= self.config.fail_after_ms {
                e.state = MemberState::Failed;
                self.events.push_back(MembershipEvent::Failed(e.id.clone()));
                set_changed = true;
            }
            if e.state == MemberState::Failed && silence >= self.config.forget_after_ms {
                forget.push(e.id.clone());
            }
        }
        for id in forget {
            self.table.remove(&id);
        }
        if set_changed {
            self.rebuild_view(now);
        }
        if now >= self.next_heartbeat_ms {
            self.seq += 1;
            self.transmits.push_back(Heartbeat {
                id: self.me.clone(),
                incarnation: self.incarnation,
                seq: self.seq,
                view_epoch: self.view.epoch,
                view_hash: self.view.hash,
                caps: self.caps.clone(),
                addrs: self.addrs.clone(),
                data_addr: self.data_addr,
            });
            let jitter = match self.config.heartbeat_jitter_ms {
                0 => 0,
                j => entropy % (j + 1),
            };
            self.next_heartbeat_ms = now + self.config.heartbeat_interval_ms - jitter;
        }
    }

    /// Work bound to the view `failed` broke although its members did not change (a link
    /// failed, a bound passed, members were out of step): if it is still the current view,
    /// move to the next epoch with the same members. Every member abandons what it ran in
    /// the failed view and starts over in the new one; the others take the new epoch from
    /// the heartbeat this queues at once (epoch adoption), so a failure report is a
    /// coordinator-free "everyone restart together". Several members reporting the same
    /// failure land on the same epoch. Returns whether the view changed; a report about any
    /// other view is stale and ignored.
    pub fn handle_view_failed(&mut self, failed: &ViewHash, now: u64) -> bool {
        if *failed != self.view.hash {
            return false;
        }
        let epoch = self.view.epoch + 1;
        self.set_view(View::new(epoch, self.view.members.clone()), now);
        true
    }

    /// The next time [`Membership::handle_timeout`] has work to do.
    pub fn poll_timeout(&self) -> u64 {
        let mut t = self.next_heartbeat_ms;
        for e in self.table.values() {
            let due = match e.state {
                MemberState::Alive => e.last_heard_ms + self.config.suspect_after_ms,
                MemberState::Suspect => e.last_heard_ms + self.config.fail_after_ms,
                MemberState::Failed => e.last_heard_ms + self.config.forget_after_ms,
            };
            t = t.min(due);
        }
        t
    }

    /// A heartbeat to broadcast, if one is queued.
    pub fn poll_transmit(&mut self) -> Option<Heartbeat> {
        self.transmits.pop_front()
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<MembershipEvent> {
        self.events.pop_front()
    }

    fn rebuild_view(&mut self, now: u64) {
        let mut members: Vec<ViewMember> = self
            .table
            .values()
            .filter(|e| e.state != MemberState::Failed)
            .map(|e| ViewMember {
                id: e.id.clone(),
                incarnation: e.incarnation,
            })
            .collect();
        members.push(ViewMember {
            id: self.me.clone(),
            incarnation: self.incarnation,
        });
        let candidate = View::new(self.view.epoch, members);
        if candidate.members == self.view.members {
            return;
        }
        let heard = self
            .table
            .values()
            .filter(|e| e.state != MemberState::Failed)
            .map(|e| e.their_view.0)
            .max()
            .unwrap_or(0);
        let epoch = self.view.epoch.max(heard) + 1;
        self.set_view(View::new(epoch, candidate.members), now);
    }

    fn set_view(&mut self, view: View, now: u64) {
        self.view = view;
        self.events
            .push_back(MembershipEvent::ViewChanged(self.view.clone()));
        // Announce the new view promptly so peers can align epochs.
        self.next_heartbeat_ms = self.next_heartbeat_ms.min(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> NodeId {
        NodeId::new(s).unwrap()
    }

    fn node(name: &str, inc: u64) -> Membership {
        Membership::new(
            id(name),
            inc,
            Capabilities::default(),
            vec![],
            MembershipConfig::default(),
            0,
        )
    }

    fn beat(m: &mut Membership, now: u64) -> Heartbeat {
        m.handle_timeout(now, 0);
        m.poll_transmit().expect("heartbeat due")
    }

    #[test]
    fn join_suspect_fail_recover() {
        let mut a = node("a", 1);
        let mut b = node("b", 1);
        let hb = beat(&mut b, 0);
        a.handle_heartbeat(hb.clone(), 10).unwrap();
        assert_eq!(a.view().len(), 2);
        assert_eq!(
            a.handle_heartbeat(hb, 11),
            Err(HeartbeatError::StaleSeq { got: 1, known: 1 })
        );
        a.handle_timeout(10 + 750, 0);
        assert_eq!(a.member(&id("b")).unwrap().state, MemberState::Suspect);
        assert_eq!(a.view().len(), 2, "suspect stays in the view");
        a.handle_timeout(10 + 1500, 0);
        assert_eq!(a.member(&id("b")).unwrap().state, MemberState::Failed);
        assert_eq!(a.view().len(), 1);
        let epoch_after_fail = a.view().epoch;
        let hb = beat(&mut b, 2000);
        a.handle_heartbeat(hb, 2000).unwrap();
        assert_eq!(a.view().len(), 2);
        assert!(a.view().epoch > epoch_after_fail, "epochs never go back");
    }

    #[test]
    fn restart_bumps_incarnation_and_old_incarnation_is_refused() {
        let mut a = node("a", 1);
        let mut b1 = node("b", 1);
        a.handle_heartbeat(beat(&mut b1, 0), 0).unwrap();
        let v1 = a.view().clone();
        let mut b2 = node("b", 2);
        a.handle_heartbeat(beat(&mut b2, 100), 100).unwrap();
        assert_ne!(a.view().hash, v1.hash);
        assert_eq!(a.view().members[1].incarnation, 2);
        let mut stale = beat(&mut b1, 300);
        stale.seq = 1000;
        assert!(matches!(
            a.handle_heartbeat(stale, 300),
            Err(HeartbeatError::StaleIncarnation { .. })
        ));
    }

    #[test]
    fn epochs_converge_on_same_members() {
        let mut a = node("a", 1);
        let mut b = node("b", 1);
        // b goes through a few views alone to reach a higher epoch.
        for (i, n) in ["x", "y", "z"].iter().enumerate() {
            let mut other = node(n, 1);
            b.handle_heartbeat(beat(&mut other, 0), i as u64).unwrap();
            b.handle_timeout(2000 + i as u64 * 2000, 0);
        }
        let _ = std::iter::from_fn(|| b.poll_transmit()).count();
        assert!(b.view().epoch > 3);
        let t = 10_000;
        a.handle_heartbeat(beat(&mut b, t), t).unwrap();
        b.handle_heartbeat(beat(&mut a, t), t).unwrap();
        a.handle_heartbeat(beat(&mut b, t + 1), t + 1).unwrap();
        assert_eq!(a.view(), b.view());
    }

    #[test]
    fn own_id_and_full_table_refused() {
        let mut a = node("a", 1);
        let mut a2 = node("a", 2);
        assert_eq!(
            a.handle_heartbeat(beat(&mut a2, 0), 0),
            Err(HeartbeatError::OwnId)
        );
        let mut small = Membership::new(
            id("a"),
            1,
            Capabilities::default(),
            vec![],
            MembershipConfig {
                max_members: 1,
                ..Default::default()
            },
            0,
        );
        small
            .handle_heartbeat(beat(&mut node("b", 1), 0), 0)
            .unwrap();
        assert_eq!(
            small.handle_heartbeat(beat(&mut node("c", 1), 0), 0),
            Err(HeartbeatError::TableFull(1))
        );
    }

    #[test]
    fn view_settles_when_every_member_reports_it() {
        let mut a = node("a", 1);
        let mut b = node("b", 1);
        assert!(a.view_settled(), "a view of this node alone is settled");
        a.handle_heartbeat(beat(&mut b, 0), 0).unwrap();
        assert_eq!(a.view().len(), 2);
        assert!(
            !a.view_settled(),
            "b still reports its view of itself alone"
        );
        b.handle_heartbeat(beat(&mut a, 1), 1).unwrap();
        a.handle_heartbeat(beat(&mut b, 2), 2).unwrap();
        assert_eq!(a.view(), b.view(), "a adopted b's epoch");
        assert!(a.view_settled());
        assert!(
            !b.view_settled(),
            "b last heard a before a adopted the common view"
        );
        b.handle_heartbeat(beat(&mut a, 3), 3).unwrap();
        assert!(b.view_settled());
        // A joiner unsettles the view until every member reports the new one.
        let mut c = node("c", 1);
        a.handle_heartbeat(beat(&mut c, 4), 4).unwrap();
        assert_eq!(a.view().len(), 3);
        assert!(!a.view_settled());
        // A restart-together report moves to a new epoch nobody else reports yet.
        let hash = b.view().hash;
        assert!(b.handle_view_failed(&hash, 5));
        assert!(!b.view_settled());
    }

    #[test]
    fn poll_timeout_tracks_deadlines() {
        let mut a = node("a", 1);
        assert_eq!(a.poll_timeout(), 0);
        a.handle_timeout(0, 7);
        assert_eq!(a.poll_timeout(), 250 - 7);
        a.handle_heartbeat(beat(&mut node("b", 1), 0), 5).unwrap();
        // New view at t=5: our heartbeat is due at once.
        assert_eq!(a.poll_timeout(), 5);
    }
}
