//! The event loop: one per node. It takes [`Command`]s from the [`super::NodeHandle`]s,
//! swarm events and timers (heartbeats and failure detection, job and model
//! re-announcements, Kademlia), publishes the heartbeats the membership core queues and acts
//! on its events (logs, the data plane's roster, the server's members, the trainers' view).
//!
//! Its other parts live beside it, each an `impl EventLoop` block: `gossip`, `jobs`,
//! `serving`, `roster`, `report` and `debug`.

use super::config::NodeConfig;
use super::error::{error_chain, NodeError};
use super::handle::Command;
use super::jobs::JobRegistry;
use crate::control_plane::{self, Behaviour, BehaviourEvent};
use crate::data_plane::DataPlane;
use crate::identity;
use crate::status::Counters;
use coordinator_free::{ControlMessage, Membership, MembershipEvent, NodeId};
use futures::StreamExt;
use libp2p::swarm::SwarmEvent;
use libp2p::{identify, kad, mdns, Multiaddr, PeerId, Swarm};
use rand::Rng;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

/// Re-announce running jobs (and held models) this often.
const JOB_ANNOUNCE_EVERY: Duration = Duration::from_secs(2);

/// Minimum time between two membership-driven dials of the same peer.
const REDIAL_MS: u64 = 2_000;

/// The state of the event loop (its fields are shared with the sibling `impl` blocks).
pub(super) struct EventLoop {
    pub(super) swarm: Swarm<Behaviour>,
    pub(super) membership: Membership,
    /// The origin of the membership core's clock.
    pub(super) start: Instant,
    pub(super) peer_id: PeerId,
    pub(super) cfg: NodeConfig,
    pub(super) rx: mpsc::Receiver<Command>,
    /// Where the control plane listens.
    pub(super) listen_addrs: Vec<Multiaddr>,
    pub(super) counters: Counters,
    /// When each peer was last dialed because membership named it (ms since start).
    pub(super) last_dial: HashMap<PeerId, u64>,
    pub(super) api_addr: SocketAddr,
    pub(super) bootstrapped: bool,
    pub(super) data_plane: DataPlane,
    /// NCCL unique ids received for recent views.
    pub(super) nccl_id: Option<(coordinator_free::ViewHash, Vec<u8>)>,
    /// Callers waiting for the NCCL id of a view.
    pub(super) nccl_waiters: Vec<(coordinator_free::ViewHash, oneshot::Sender<Vec<u8>>)>,
    /// The IP each connected peer is seen from, for data-plane addresses bound to 0.0.0.0.
    pub(super) remote_ips: HashMap<PeerId, std::net::IpAddr>,
    /// The view for trainers.
    pub(super) views_tx: watch::Sender<crate::train::ViewState>,
    /// A handle to this loop itself, for what it starts (trainers ask it for NCCL ids).
    pub(super) handle: super::NodeHandle,
    /// Trainers report views whose collectives broke here (cloned into each trainer).
    pub(super) view_failed_tx: mpsc::UnboundedSender<coordinator_free::ViewHash>,
    pub(super) view_failed_rx: mpsc::UnboundedReceiver<coordinator_free::ViewHash>,
    /// The jobs this node runs.
    pub(super) jobs: JobRegistry,
    pub(super) server: crate::serve::Server,
}

impl EventLoop {
    /// The membership core's clock: milliseconds since the start.
    pub(super) fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Dials a bootstrap peer (and tells Kademlia about it when the address names it).
    pub(super) fn dial_bootstrap(&mut self, addr: &Multiaddr) -> Result<(), NodeError> {
        let (_, peer) = control_plane::split_peer_id(addr);
        if let Some(peer) = peer {
            self.swarm
                .behaviour_mut()
                .kad
                .add_address(&peer, addr.clone());
        }
        self.swarm
            .dial(addr.clone())
            .map_err(|e| NodeError::Bootstrap {
                addr: addr.clone(),
                reason: error_chain(&e),
            })
    }

    /// Runs until a [`Command::Shutdown`], Ctrl-C or SIGTERM (or every handle is gone).
    pub(super) async fn run(&mut self) {
        let mut kad_tick = tokio::time::interval(Duration::from_secs(30));
        let mut job_tick = tokio::time::interval(JOB_ANNOUNCE_EVERY);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        loop {
            let deadline = self.start + Duration::from_millis(self.membership.poll_timeout());
            tokio::select! {
                ev = self.swarm.select_next_some() => self.on_swarm_event(ev),
                cmd = self.rx.recv() => match cmd {
                    Some(Command::Shutdown) | None => return,
                    Some(cmd) => self.on_command(cmd),
                },
                Some(hash) = self.view_failed_rx.recv() => {
                    let now = self.now_ms();
                    if self.membership.handle_view_failed(&hash, now) {
                        tracing::info!(failed = %hash, "a collective failed in the view: moving every member to the next epoch");
                    }
                }
                _ = job_tick.tick() => {
                    self.announce_jobs();
                    self.announce_models();
                    self.redial_failed();
                }
                _ = tokio::time::sleep_until(deadline.into()) => {
                    let now = self.now_ms();
                    let entropy = rand::thread_rng().gen();
                    self.membership.handle_timeout(now, entropy);
                }
                _ = kad_tick.tick() => {
                    if self.swarm.connected_peers().next().is_some() {
                        let _ = self.swarm.behaviour_mut().kad.bootstrap();
                    }
                }
                _ = tokio::signal::ctrl_c() => return,
                _ = term.recv() => return,
            }
            self.flush();
        }
    }

    /// Carries out one command (all but [`Command::Shutdown`]).
    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Status(reply) => {
                let _ = reply.send(self.status());
            }
            Command::DataPlane(reply) => {
                let _ = reply.send((self.data_plane.clone(), self.membership.view().clone()));
            }
            Command::PublishNcclId(id, reply) => {
                let _ = reply.send(self.publish_nccl_id(id));
            }
            Command::NcclId(hash, reply) => match &self.nccl_id {
                Some((h, id)) if *h == hash => {
                    let _ = reply.send(id.clone());
                }
                _ if hash == self.membership.view().hash => self.nccl_waiters.push((hash, reply)),
                _ => {} // not the current view: dropping the reply says so
            },
            Command::SetCapabilities(caps) => {
                let addrs = self.announced_addrs();
                self.membership.set_local(caps, addrs);
            }
            Command::SubmitJob {
                spec,
                resume,
                reply,
            } => {
                let run = rand::thread_rng().gen();
                let _ = reply.send(self.start_job(*spec, run, resume));
            }
            Command::OfferModel { announce, reply } => {
                let _ = reply.send(self.offer_model(*announce));
            }
            Command::Debug(cmd) => self.on_debug_command(cmd),
            Command::Shutdown => {}
        }
    }

    /// Publishes `bytes` on the control topic.
    pub(super) fn publish(&mut self, bytes: Vec<u8>) -> Result<(), String> {
        self.swarm
            .behaviour_mut()
            .gossipsub
            .publish(control_plane::control_topic(), bytes)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// The control-plane addresses this node announces (with `/p2p/<id>`), within the
    /// heartbeat's bounds.
    pub(super) fn announced_addrs(&self) -> Vec<String> {
        self.listen_addrs
            .iter()
            .take(coordinator_free::membership::MAX_ADDRS)
            .map(|a| {
                a.clone()
                    .with(libp2p::multiaddr::Protocol::P2p(self.peer_id))
                    .to_string()
            })
            .filter(|s| s.len() <= coordinator_free::membership::MAX_ADDR_LEN)
            .collect()
    }

    /// Sends queued heartbeats and acts on membership events.
    fn flush(&mut self) {
        while let Some(hb) = self.membership.poll_transmit() {
            match ControlMessage::Heartbeat(hb).encode() {
                Ok(bytes) => {
                    let len = bytes.len() as u64;
                    if let Err(e) = self.publish(bytes) {
                        tracing::debug!("heartbeat not published: {e}");
                    } else {
                        self.counters.heartbeats_sent += 1;
                        self.counters.control_bytes_sent += len;
                    }
                }
                Err(e) => tracing::error!("cannot encode heartbeat: {e}"),
            }
        }
        let mut roster_stale = false;
        while let Some(ev) = self.membership.poll_event() {
            roster_stale |= matches!(
                ev,
                MembershipEvent::ViewChanged(_)
                    | MembershipEvent::Joined(_)
                    | MembershipEvent::Restarted(..)
            );
            match ev {
                MembershipEvent::ViewChanged(v) => {
                    self.counters.view_changes += 1;
                    tracing::info!(epoch = v.epoch, hash = %v.hash, members = v.len(), "view changed");
                }
                MembershipEvent::Joined(id) => tracing::info!(peer = %id, "member joined"),
                MembershipEvent::Restarted(id, inc) => {
                    tracing::info!(peer = %id, incarnation = inc, "member restarted")
                }
                MembershipEvent::Suspected(id) => tracing::warn!(peer = %id, "member suspected"),
                MembershipEvent::Recovered(id) => tracing::info!(peer = %id, "member recovered"),
                MembershipEvent::Failed(id) => {
                    tracing::warn!(peer = %id, "member failed");
                    // A connection that carried nothing for the failure timeout is not to be
                    // trusted (a partition keeps TCP connections open, and after it heals
                    // their retransmission backoff delays everything for seconds): close it;
                    // `redial_failed` dials afresh.
                    if let Ok(peer) = id.as_str().parse::<PeerId>() {
                        let _ = self.swarm.disconnect_peer_id(peer);
                    }
                }
            }
        }
        if roster_stale {
            let current = self.membership.view().hash;
            self.nccl_waiters.retain(|(h, _)| *h == current);
            self.update_roster();
            self.update_serving_members();
        }
        self.publish_view_state();
    }

    /// Tells trainers the view and whether every member reports it.
    fn publish_view_state(&mut self) {
        let view = self.membership.view();
        let settled = self.membership.view_settled();
        self.views_tx.send_if_modified(|s| {
            if s.view.hash != view.hash || s.settled != settled {
                s.view = view.clone();
                s.settled = settled;
                true
            } else {
                false
            }
        });
    }

    /// Acts on a swarm event: listen addresses, connections, gossip, discovery.
    fn on_swarm_event(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::NewListenAddr { address, .. } => {
                tracing::info!(%address, "listening");
                self.listen_addrs.push(address);
                self.write_listen_file();
                let addrs = self.announced_addrs();
                let caps = self.membership.local_capabilities().clone();
                self.membership.set_local(caps, addrs);
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.retain(|a| a != &address);
                self.write_listen_file();
            }
            SwarmEvent::ConnectionEstablished {
                peer_id, endpoint, ..
            } => {
                tracing::debug!(peer = %peer_id, addr = %endpoint.get_remote_address(), "connected");
                self.note_remote_ip(peer_id, endpoint.get_remote_address());
                if !self.bootstrapped {
                    self.bootstrapped = true;
                    let _ = self.swarm.behaviour_mut().kad.bootstrap();
                }
            }
            SwarmEvent::ConnectionClosed { peer_id, cause, .. } => {
                tracing::debug!(peer = %peer_id, ?cause, "connection closed");
            }
            SwarmEvent::IncomingConnectionError {
                send_back_addr,
                error,
                ..
            } => {
                self.counters.handshakes_refused += 1;
                tracing::warn!(from = %send_back_addr, "refused handshake: {}", error_chain(&error));
            }
            SwarmEvent::OutgoingConnectionError { peer_id, error, .. } => {
                tracing::debug!(peer = ?peer_id, "dial failed: {}", error_chain(&error));
            }
            SwarmEvent::Behaviour(BehaviourEvent::Gossipsub(ev)) => self.on_gossip(ev),
            SwarmEvent::Behaviour(BehaviourEvent::Identify(identify::Event::Received {
                peer_id,
                info,
                ..
            })) => {
                if info.protocol_version != control_plane::PROTOCOL_VERSION {
                    tracing::warn!(peer = %peer_id, version = %info.protocol_version, "not a shoal peer; disconnecting");
                    let _ = self.swarm.disconnect_peer_id(peer_id);
                    return;
                }
                for addr in info.listen_addrs {
                    self.swarm.behaviour_mut().kad.add_address(&peer_id, addr);
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Mdns(mdns::Event::Discovered(list))) => {
                for (peer, addr) in list {
                    if peer == self.peer_id {
                        continue;
                    }
                    tracing::info!(%peer, %addr, "discovered peer via mDNS");
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer, addr.clone());
                    if !self.swarm.is_connected(&peer) {
                        let _ = self.swarm.dial(addr.with_p2p(peer).unwrap_or_else(|a| a));
                    }
                }
            }
            SwarmEvent::Behaviour(BehaviourEvent::Kad(kad::Event::RoutingUpdated {
                peer, ..
            })) if !self.swarm.is_connected(&peer) => {
                let _ = self.swarm.dial(peer);
            }
            _ => {}
        }
    }

    /// Writes the announced addresses to the data dir (`shoal` commands read them).
    fn write_listen_file(&self) {
        let text: String = self
            .announced_addrs()
            .into_iter()
            .map(|a| a + "\n")
            .collect();
        if let Err(e) = identity::write_atomic(
            &self.cfg.data_dir.join(identity::LISTEN_ADDRS_FILE),
            text.as_bytes(),
            0o644,
        ) {
            tracing::warn!("cannot write listen addresses: {e}");
        }
    }

    /// Dials members that failed but are still remembered (tombstones keep their
    /// addresses), so a partition heals as soon as the network does, not when some heartbeat
    /// happens to cross.
    fn redial_failed(&mut self) {
        let now = self.now_ms();
        let failed: Vec<(NodeId, Vec<String>)> = self
            .membership
            .members()
            .filter(|m| m.state == coordinator_free::MemberState::Failed)
            .map(|m| (m.id.clone(), m.addrs.clone()))
            .collect();
        for (id, addrs) in failed {
            self.maybe_dial(&id, &addrs, now);
        }
    }

    /// Dials a member we heard of but are not connected to, so small clusters become a
    /// full mesh and heartbeats do not depend on relays.
    pub(super) fn maybe_dial(&mut self, id: &NodeId, addrs: &[String], now: u64) {
        let Ok(peer) = id.as_str().parse::<PeerId>() else {
            return;
        };
        if self.swarm.is_connected(&peer) {
            return;
        }
        if let Some(&t) = self.last_dial.get(&peer) {
            if now.saturating_sub(t) < REDIAL_MS {
                return;
            }
        }
        self.last_dial.insert(peer, now);
        let addrs: Vec<Multiaddr> = addrs
            .iter()
            .filter_map(|a| a.parse().ok())
            .filter(|a| self.cfg.control.swarm_key.is_none() || !control_plane::is_quic(a))
            .collect();
        for a in &addrs {
            self.swarm.behaviour_mut().kad.add_address(&peer, a.clone());
        }
        let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
            .addresses(addrs)
            .build();
        let _ = self.swarm.dial(opts);
    }
}
