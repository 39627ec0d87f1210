//! One event loop per node: the libp2p swarm, the membership core and a timer, driven by
//! `tokio::select!`, with a cloneable [`NodeHandle`] for the API and the CLI.

use crate::capabilities;
use crate::control_plane::{self, Behaviour, BehaviourEvent, ControlPlaneConfig};
use crate::data_plane::{DataPlane, DataPlaneConfig, DataPlaneError, DataTransport, Roster};
use crate::identity;
use crate::status::{Counters, MemberReport, NodeReport, StatusReport, ViewReport};
use coordinator_free::{ControlMessage, Membership, MembershipConfig, MembershipEvent, NodeId};
use futures::StreamExt;
use libp2p::gossipsub::{self, MessageAcceptance};
use libp2p::swarm::SwarmEvent;
use libp2p::{identify, kad, mdns, Multiaddr, PeerId, Swarm};
use rand::Rng;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot, watch};

/// Everything `shoal up` needs.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Data directory (identity, incarnation, address files).
    pub data_dir: PathBuf,
    /// Control-plane listen addresses.
    pub listen: Vec<Multiaddr>,
    /// Bootstrap peers to dial at start (and for Kademlia).
    pub bootstrap: Vec<Multiaddr>,
    /// Local API address; must be a loopback address.
    pub api: SocketAddr,
    /// Swarm settings.
    pub control: ControlPlaneConfig,
    /// Heartbeat and failure-detection timings.
    pub membership: MembershipConfig,
    /// Expose the debug endpoints (raw gossip, timed collectives; for tests and benches).
    pub debug_api: bool,
    /// Where the data plane listens (port 0: any).
    pub data_listen: SocketAddr,
    /// Data-plane settings.
    pub data_plane: DataPlaneConfig,
    /// Serving settings (batching, cache, API token).
    pub serve: crate::serve::ServeConfig,
}

/// Why a node could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The data dir could not be used.
    #[error(transparent)]
    Identity(#[from] identity::IdentityError),
    /// The swarm could not be built.
    #[error(transparent)]
    ControlPlane(#[from] control_plane::ControlPlaneError),
    /// A listen address could not be bound.
    #[error("cannot listen on {addr}: {reason}")]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
    /// The local API could not be bound.
    #[error("cannot bind the local API on {addr}: {source}")]
    Api {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The API address is not a loopback address.
    #[error("the local API must listen on a loopback address, not {0}")]
    ApiNotLoopback(SocketAddr),
    /// A bootstrap address could not be dialed.
    #[error("cannot dial bootstrap peer {addr}: {reason}")]
    Bootstrap {
        /// The address.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
    /// The data plane could not start.
    #[error(transparent)]
    DataPlane(#[from] DataPlaneError),
    /// The node's event loop has stopped.
    #[error("the node has stopped")]
    Stopped,
    /// The peer id is not a valid node id (cannot happen for libp2p peer ids).
    #[error("invalid node id: {0}")]
    NodeId(#[from] coordinator_free::NodeIdError),
    /// The timings are inconsistent.
    #[error("invalid membership timings: {0}")]
    Timings(String),
}

/// Requests to the event loop.
pub enum Command {
    /// Report the node's status.
    Status(oneshot::Sender<StatusReport>),
    /// Publish raw bytes on the control topic (debug API only).
    PublishRaw(Vec<u8>, oneshot::Sender<Result<(), String>>),
    /// The data plane and the view it is bound to.
    DataPlane(oneshot::Sender<(DataPlane, coordinator_free::View)>),
    /// Publish an NCCL unique id for the current view (only its root may).
    PublishNcclId(Vec<u8>, oneshot::Sender<Result<(), String>>),
    /// The NCCL unique id received for a view, if any.
    /// Replies once it has arrived; dropped (no reply) if the view changes first.
    NcclId(coordinator_free::ViewHash, oneshot::Sender<Vec<u8>>),
    /// New local capabilities (from the periodic detection task).
    SetCapabilities(coordinator_free::Capabilities),
    /// Start a training job here and announce it to the swarm.
    SubmitJob {
        /// The job (validated, paths resolved).
        spec: Box<crate::train::job::JobSpec>,
        /// Continue from the checkpoint.
        resume: bool,
        /// The reply: the job's report.
        reply: oneshot::Sender<Result<crate::train::JobReport, String>>,
    },
    /// Debug: nudge this node's weights in a run (to exercise the consistency check).
    PerturbJob(String, u8, oneshot::Sender<bool>),
    /// Stop the node.
    Shutdown,
}

/// A job this node runs.
struct JobEntry {
    /// The announcement, re-published while the job runs.
    announce: Vec<u8>,
    report: Arc<Mutex<crate::train::JobReport>>,
    perturb: Arc<std::sync::atomic::AtomicU8>,
}

/// Re-announce running jobs this often.
const JOB_ANNOUNCE_EVERY: Duration = Duration::from_secs(2);
/// Finished jobs kept in the status report.
const MAX_FINISHED_JOBS: usize = 16;

/// A cloneable handle to a running node.
#[derive(Clone)]
pub struct NodeHandle {
    tx: mpsc::Sender<Command>,
}

impl NodeHandle {
    /// Sends a command built around a reply channel and waits for the reply.
    async fn ask<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(command(tx))
            .await
            .map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)
    }

    /// The node's status.
    pub async fn status(&self) -> Result<StatusReport, NodeError> {
        self.ask(Command::Status).await
    }

    /// Publishes raw bytes on the control topic.
    pub async fn publish_raw(&self, bytes: Vec<u8>) -> Result<Result<(), String>, NodeError> {
        self.ask(|tx| Command::PublishRaw(bytes, tx)).await
    }

    /// The node's data plane and its current view.
    pub async fn data_plane(&self) -> Result<(DataPlane, coordinator_free::View), NodeError> {
        self.ask(Command::DataPlane).await
    }

    /// Publishes the NCCL unique id of the current view (this node must be its root).
    pub async fn publish_nccl_id(&self, id: Vec<u8>) -> Result<Result<(), String>, NodeError> {
        self.ask(|tx| Command::PublishNcclId(id, tx)).await
    }

    /// Waits, at most `bound`, for the NCCL unique id of `view` to arrive from its root.
    /// `None` if it did not arrive in time or the view changed meanwhile.
    pub async fn nccl_id(
        &self,
        view: coordinator_free::ViewHash,
        bound: Duration,
    ) -> Result<Option<Vec<u8>>, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Command::NcclId(view, tx))
            .await
            .map_err(|_| NodeError::Stopped)?;
        Ok(tokio::time::timeout(bound, rx)
            .await
            .ok()
            .and_then(Result::ok))
    }

    /// Starts a training job on this node and announces it to the swarm.
    pub async fn submit_job(
        &self,
        spec: crate::train::job::JobSpec,
        resume: bool,
    ) -> Result<Result<crate::train::JobReport, String>, NodeError> {
        self.ask(|reply| Command::SubmitJob {
            spec: Box::new(spec),
            resume,
            reply,
        })
        .await
    }

    /// Debug: nudges this node's weights in run `run` (hex); false if the run is unknown.
    pub async fn perturb_job(&self, run: String, kind: u8) -> Result<bool, NodeError> {
        self.ask(|tx| Command::PerturbJob(run, kind, tx)).await
    }

    /// Asks the node to stop.
    pub async fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown).await;
    }
}

/// Runs a node until it is shut down (Ctrl-C or SIGTERM or a [`Command::Shutdown`]).
pub async fn run(cfg: NodeConfig) -> Result<(), NodeError> {
    if !cfg.api.ip().is_loopback() {
        return Err(NodeError::ApiNotLoopback(cfg.api));
    }
    cfg.membership.validate().map_err(NodeError::Timings)?;
    let key = identity::load_or_create_identity(&cfg.data_dir)?;
    let incarnation = identity::bump_incarnation(&cfg.data_dir)?;
    let peer_id = key.public().to_peer_id();
    let me = NodeId::new(peer_id.to_base58())?;
    let data_plane = DataPlane::bind(key.clone(), cfg.data_listen, cfg.data_plane.clone()).await?;
    let mut swarm = control_plane::build_swarm(key, &cfg.control)?;
    for addr in &cfg.listen {
        if cfg.control.swarm_key.is_some() && control_plane::is_quic(addr) {
            tracing::warn!(%addr, "QUIC is off with a swarm key (pnet covers TCP only); not listening there");
            continue;
        }
        swarm
            .listen_on(addr.clone())
            .map_err(|e| NodeError::Listen {
                addr: addr.clone(),
                reason: error_chain(&e),
            })?;
    }
    swarm
        .behaviour_mut()
        .gossipsub
        .subscribe(&control_plane::control_topic())
        .map_err(|e| control_plane::ControlPlaneError::Gossipsub(e.to_string()))?;

    let api_listener = tokio::net::TcpListener::bind(cfg.api)
        .await
        .map_err(|source| NodeError::Api {
            addr: cfg.api,
            source,
        })?;
    let api_addr = api_listener.local_addr().map_err(|source| NodeError::Api {
        addr: cfg.api,
        source,
    })?;
    let (tx, rx) = mpsc::channel(64);
    // Trainers subscribe to the sender; the channel keeps the value without receivers.
    let (views_tx, _) = watch::channel(crate::train::ViewState {
        view: coordinator_free::View::new(0, vec![]),
        settled: false,
    });
    let handle = NodeHandle { tx };
    let (view_failed_tx, view_failed_rx) = mpsc::unbounded_channel();
    let server = crate::serve::Server::start(me.clone(), data_plane.clone(), cfg.serve.clone());
    let router = crate::api::router(handle.clone(), cfg.debug_api)
        .merge(crate::serve::http::router(server.clone(), handle.clone()));
    // Capabilities (GPU free memory, matmul speed) are re-detected off the event loop
    // (`nvidia-smi` may take a while and must not delay heartbeats): 1, 2, 4 and 8 s after
    // the start, then every 10 s. The early ones matter for the speed, which keeps the best
    // round measured: nodes of a local cluster start together and measure while the others
    // load, and an unlucky start-up measurement would skew the serving plan until the
    // next re-detection.
    let caps_handle = handle.clone();
    tokio::spawn(async move {
        let mut waits = [1u64, 1, 2, 4].into_iter();
        loop {
            let wait = waits.next().unwrap_or(10);
            tokio::time::sleep(Duration::from_secs(wait)).await;
            let caps = capabilities::detect().await;
            if caps_handle
                .tx
                .send(Command::SetCapabilities(caps))
                .await
                .is_err()
            {
                return;
            }
        }
    });
    tokio::spawn(async move {
        if let Err(e) = axum::serve(api_listener, router).await {
            tracing::error!("local API stopped: {e}");
        }
    });
    identity::write_atomic(
        &cfg.data_dir.join(identity::API_ADDR_FILE),
        format!("{api_addr}\n").as_bytes(),
        0o644,
    )?;

    let caps = capabilities::detect().await;
    let start = Instant::now();
    let mut membership = Membership::new(
        me.clone(),
        incarnation,
        caps,
        vec![],
        cfg.membership.clone(),
        0,
    );
    let transport = match data_plane.transport() {
        DataTransport::Quic => "quic",
        DataTransport::Tcp => "tcp",
    };
    membership.set_data_addr(Some(format!("{transport}/{}", data_plane.local_addr())));
    tracing::info!(addr = %data_plane.local_addr(), transport, "data plane listening");
    tracing::info!(peer = %peer_id, incarnation, api = %api_addr, "node starting");

    let mut node = EventLoop {
        swarm,
        membership,
        start,
        peer_id,
        cfg,
        rx,
        listen_addrs: Vec::new(),
        counters: Counters::default(),
        last_dial: HashMap::new(),
        api_addr,
        bootstrapped: false,
        data_plane,
        nccl_id: None,
        nccl_waiters: Vec::new(),
        remote_ips: HashMap::new(),
        views_tx,
        view_failed_tx,
        view_failed_rx,
        jobs: Vec::new(),
        server,
    };
    for addr in node.cfg.bootstrap.clone() {
        node.dial_bootstrap(&addr)?;
    }
    node.run().await;
    tracing::info!("node stopped");
    Ok(())
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    if s.is_empty() {
        s = "error".into();
    }
    let mut src = e.source();
    while let Some(inner) = src {
        let t = inner.to_string();
        if !t.is_empty() && !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        src = inner.source();
    }
    s
}

struct EventLoop {
    swarm: Swarm<Behaviour>,
    membership: Membership,
    start: Instant,
    peer_id: PeerId,
    cfg: NodeConfig,
    rx: mpsc::Receiver<Command>,
    listen_addrs: Vec<Multiaddr>,
    counters: Counters,
    /// When each peer was last dialed because membership named it (ms since start).
    last_dial: HashMap<PeerId, u64>,
    api_addr: SocketAddr,
    bootstrapped: bool,
    data_plane: DataPlane,
    /// NCCL unique ids received for recent views.
    nccl_id: Option<(coordinator_free::ViewHash, Vec<u8>)>,
    /// Callers waiting for the NCCL id of a view.
    nccl_waiters: Vec<(coordinator_free::ViewHash, oneshot::Sender<Vec<u8>>)>,
    /// The IP each connected peer is seen from, for data-plane addresses bound to 0.0.0.0.
    remote_ips: HashMap<PeerId, std::net::IpAddr>,
    /// The view for trainers.
    views_tx: watch::Sender<crate::train::ViewState>,
    /// Trainers report views whose collectives broke here (cloned into each trainer).
    view_failed_tx: mpsc::UnboundedSender<coordinator_free::ViewHash>,
    view_failed_rx: mpsc::UnboundedReceiver<coordinator_free::ViewHash>,
    /// Jobs by run id, oldest first.
    jobs: Vec<(u64, JobEntry)>,
    server: crate::serve::Server,
}

/// Minimum time between two membership-driven dials of the same peer.
const REDIAL_MS: u64 = 2_000;

impl EventLoop {
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn dial_bootstrap(&mut self, addr: &Multiaddr) -> Result<(), NodeError> {
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

    async fn run(&mut self) {
        let mut kad_tick = tokio::time::interval(Duration::from_secs(30));
        let mut job_tick = tokio::time::interval(JOB_ANNOUNCE_EVERY);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        loop {
            let deadline = self.start + Duration::from_millis(self.membership.poll_timeout());
            tokio::select! {
                ev = self.swarm.select_next_some() => self.on_swarm_event(ev),
                cmd = self.rx.recv() => match cmd {
                    Some(Command::Status(reply)) => { let _ = reply.send(self.status()); }
                    Some(Command::PublishRaw(bytes, reply)) => {
                        let r = self.swarm.behaviour_mut().gossipsub
                            .publish(control_plane::control_topic(), bytes)
                            .map(|_| ()).map_err(|e| e.to_string());
                        let _ = reply.send(r);
                    }
                    Some(Command::DataPlane(reply)) => {
                        let _ = reply.send((self.data_plane.clone(), self.membership.view().clone()));
                    }
                    Some(Command::PublishNcclId(id, reply)) => {
                        let _ = reply.send(self.publish_nccl_id(id));
                    }
                    Some(Command::NcclId(hash, reply)) => match &self.nccl_id {
                        Some((h, id)) if *h == hash => { let _ = reply.send(id.clone()); }
                        _ if hash == self.membership.view().hash => self.nccl_waiters.push((hash, reply)),
                        _ => {} // not the current view: dropping the reply says so
                    },
                    Some(Command::SetCapabilities(caps)) => {
                        let addrs = self.announced_addrs();
                        self.membership.set_local(caps, addrs);
                    }
                    Some(Command::SubmitJob { spec, resume, reply }) => {
                        let run = rand::thread_rng().gen();
                        let _ = reply.send(self.start_job(*spec, run, resume));
                    }
                    Some(Command::PerturbJob(run, kind, reply)) => {
                        let found = self.jobs.iter().find(|(r, _)| format!("{r:016x}") == run);
                        if let Some((_, e)) = found {
                            e.perturb.store(kind, std::sync::atomic::Ordering::SeqCst);
                        }
                        let _ = reply.send(found.is_some());
                    }
                    Some(Command::Shutdown) | None => return,
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

    fn announced_addrs(&self) -> Vec<String> {
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
                    if let Err(e) = self
                        .swarm
                        .behaviour_mut()
                        .gossipsub
                        .publish(control_plane::control_topic(), bytes)
                    {
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
        let me = self.membership.me();
        let settled = view.ids().all(|id| {
            id == me
                || self
                    .membership
                    .members()
                    .any(|m| &m.id == id && m.their_view.1 == view.hash)
        });
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

    /// Starts a job on a trainer thread (once per run id) and announces it.
    fn start_job(
        &mut self,
        spec: crate::train::job::JobSpec,
        run: u64,
        resume: bool,
    ) -> Result<crate::train::JobReport, String> {
        if let Some((_, e)) = self.jobs.iter().find(|(r, _)| *r == run) {
            return Ok(e.report.lock().expect("report lock").clone());
        }
        let msg = ControlMessage::Job {
            run,
            resume,
            spec: spec.to_toml(),
        };
        let announce = msg.encode().map_err(|e| e.to_string())?;
        let report = Arc::new(Mutex::new(crate::train::JobReport::new(&spec, run)));
        let perturb = Arc::new(std::sync::atomic::AtomicU8::new(0));
        let ctx = crate::train::TrainContext {
            job: spec,
            run,
            resume,
            me: self.membership.me().clone(),
            dp: self.data_plane.clone(),
            views: self.views_tx.subscribe(),
            view_failed: self.view_failed_tx.clone(),
            rt: tokio::runtime::Handle::current(),
            report: report.clone(),
            perturb: perturb.clone(),
        };
        let name = format!("train-{run:016x}");
        std::thread::Builder::new()
            .name(name)
            .spawn(move || crate::train::run(ctx))
            .map_err(|e| format!("cannot start the trainer thread: {e}"))?;
        tracing::info!(job = %report.lock().expect("report lock").job, run = format!("{run:016x}"), resume, "job started");
        let first = report.lock().expect("report lock").clone();
        self.jobs.push((
            run,
            JobEntry {
                announce,
                report,
                perturb,
            },
        ));
        // Forget the oldest finished jobs.
        while self.jobs.len() > MAX_FINISHED_JOBS {
            let Some(i) = self.jobs.iter().position(|(_, e)| {
                matches!(
                    e.report.lock().expect("report lock").state,
                    crate::train::JobState::Done | crate::train::JobState::Failed
                )
            }) else {
                break;
            };
            self.jobs.remove(i);
        }
        self.announce_jobs();
        Ok(first)
    }

    /// Tells the server the view and the members' capabilities.
    fn update_serving_members(&self) {
        let mut caps: HashMap<NodeId, coordinator_free::Capabilities> = self
            .membership
            .members()
            .map(|m| (m.id.clone(), m.caps.clone()))
            .collect();
        caps.insert(
            self.membership.me().clone(),
            self.membership.local_capabilities().clone(),
        );
        self.server
            .set_members(self.membership.view().clone(), caps);
    }

    /// Announces the models this node holds (an announcement means "I hold it").
    fn announce_models(&mut self) {
        self.update_serving_members();
        for a in self.server.announcements() {
            if let Ok(bytes) = ControlMessage::Serve(a).encode() {
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(control_plane::control_topic(), bytes);
            }
        }
    }

    /// Re-publishes the announcement of every job still waiting or running.
    fn announce_jobs(&mut self) {
        for (_, e) in &self.jobs {
            let state = e.report.lock().expect("report lock").state;
            if matches!(
                state,
                crate::train::JobState::Waiting | crate::train::JobState::Running
            ) {
                let _ = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(control_plane::control_topic(), e.announce.clone());
            }
        }
    }

    fn publish_nccl_id(&mut self, id: Vec<u8>) -> Result<(), String> {
        let view = self.membership.view().clone();
        if coordinator_free::collective::nccl_root(&view) != Some(self.membership.me()) {
            return Err("only the view's smallest member id mints its NCCL id".into());
        }
        let msg = ControlMessage::NcclId {
            view_hash: view.hash,
            id: id.clone(),
        };
        let bytes = msg.encode().map_err(|e| e.to_string())?;
        self.store_nccl_id(view.hash, id);
        self.swarm
            .behaviour_mut()
            .gossipsub
            .publish(control_plane::control_topic(), bytes)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    /// Keeps the NCCL id of the current view and hands it to whoever waits for it.
    fn store_nccl_id(&mut self, hash: coordinator_free::ViewHash, id: Vec<u8>) {
        for (_, w) in self.nccl_waiters.drain(..).filter(|(h, _)| *h == hash) {
            let _ = w.send(id.clone());
        }
        self.nccl_id = Some((hash, id));
    }

    /// Gives the data plane the current view and the members' data-plane addresses.
    fn update_roster(&mut self) {
        let view = self.membership.view().clone();
        let mine = match self.data_plane.transport() {
            DataTransport::Quic => "quic",
            DataTransport::Tcp => "tcp",
        };
        let mut addrs = HashMap::new();
        addrs.insert(self.membership.me().clone(), self.data_plane.local_addr());
        for m in self.membership.members() {
            let Some(text) = &m.data_addr else { continue };
            let Some((transport, addr)) = text.split_once('/') else {
                continue;
            };
            if transport != mine {
                tracing::warn!(peer = %m.id, transport, "member runs another data-plane transport");
                continue;
            }
            let Ok(mut addr) = addr.parse::<SocketAddr>() else {
                continue;
            };
            if addr.ip().is_unspecified() {
                let Some(ip) =
                    m.id.as_str()
                        .parse::<PeerId>()
                        .ok()
                        .and_then(|p| self.remote_ips.get(&p))
                else {
                    continue;
                };
                addr.set_ip(*ip);
            }
            addrs.insert(m.id.clone(), addr);
        }
        self.data_plane.set_roster(Roster { view, addrs });
    }

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

    fn on_gossip(&mut self, ev: gossipsub::Event) {
        let gossipsub::Event::Message {
            propagation_source,
            message_id,
            message,
        } = ev
        else {
            return;
        };
        let now = self.now_ms();
        self.counters.control_bytes_received += message.data.len() as u64;
        let verdict = match ControlMessage::decode(&message.data) {
            Err(e) => {
                self.counters.gossip_rejected += 1;
                tracing::warn!(from = %propagation_source, author = ?message.source, "rejected gossip message: {e}");
                MessageAcceptance::Reject
            }
            Ok(ControlMessage::NcclId { view_hash, id }) => {
                let view = self.membership.view();
                let root =
                    coordinator_free::collective::nccl_root(view).map(|r| r.as_str().to_string());
                let author = message.source.map(|p| p.to_base58());
                if view_hash != view.hash {
                    self.counters.gossip_ignored += 1;
                    MessageAcceptance::Ignore
                } else if author.is_none() || author != root {
                    self.counters.gossip_rejected += 1;
                    tracing::warn!(from = %propagation_source, author = ?message.source, "rejected NCCL id not minted by the view's root");
                    MessageAcceptance::Reject
                } else {
                    self.counters.gossip_accepted += 1;
                    self.store_nccl_id(view_hash, id);
                    MessageAcceptance::Accept
                }
            }
            Ok(ControlMessage::Job { run, resume, spec }) => {
                if self.jobs.iter().any(|(r, _)| *r == run) {
                    self.counters.gossip_ignored += 1;
                    MessageAcceptance::Accept
                } else {
                    match crate::train::job::JobSpec::parse(&spec) {
                        Ok(job) => {
                            self.counters.gossip_accepted += 1;
                            if let Err(e) = self.start_job(job, run, resume) {
                                tracing::error!("cannot start announced job: {e}");
                            }
                            MessageAcceptance::Accept
                        }
                        Err(e) => {
                            self.counters.gossip_rejected += 1;
                            tracing::warn!(from = %propagation_source, author = ?message.source, "rejected job announcement: {e}");
                            MessageAcceptance::Reject
                        }
                    }
                }
            }
            Ok(ControlMessage::Serve(a)) => {
                // An announcement speaks for its signed author only.
                if message.source.map(|p| p.to_base58()) != Some(a.origin.as_str().to_string()) {
                    self.counters.gossip_rejected += 1;
                    tracing::warn!(from = %propagation_source, author = ?message.source, claimed = %a.origin, "rejected model announcement for another peer");
                    MessageAcceptance::Reject
                } else {
                    self.counters.gossip_accepted += 1;
                    let from = a.origin.clone();
                    self.server.on_announce(a, from);
                    MessageAcceptance::Accept
                }
            }
            Ok(ControlMessage::Heartbeat(hb)) => {
                // Strict signing guarantees `source` is the signed author; the heartbeat
                // must speak for that author only.
                if message.source.map(|p| p.to_base58()) != Some(hb.id.as_str().to_string()) {
                    self.counters.gossip_rejected += 1;
                    tracing::warn!(from = %propagation_source, author = ?message.source, claimed = %hb.id, "rejected heartbeat for another peer");
                    MessageAcceptance::Reject
                } else {
                    let addrs = hb.addrs.clone();
                    let id = hb.id.clone();
                    match self.membership.handle_heartbeat(hb, now) {
                        Ok(()) => {
                            self.counters.gossip_accepted += 1;
                            self.maybe_dial(&id, &addrs, now);
                            MessageAcceptance::Accept
                        }
                        Err(
                            e @ (coordinator_free::membership::HeartbeatError::StaleSeq { .. }
                            | coordinator_free::membership::HeartbeatError::StaleIncarnation {
                                ..
                            }),
                        ) => {
                            // Gossip drops exact duplicates itself: an older heartbeat of
                            // the same author is a replay (or a rare reordering).
                            self.counters.gossip_rejected += 1;
                            tracing::warn!(from = %propagation_source, author = %id, "rejected replayed heartbeat: {e}");
                            MessageAcceptance::Ignore
                        }
                        Err(e) => {
                            self.counters.gossip_ignored += 1;
                            tracing::trace!(peer = %id, "ignored heartbeat: {e}");
                            MessageAcceptance::Ignore
                        }
                    }
                }
            }
        };
        let _ = self
            .swarm
            .behaviour_mut()
            .gossipsub
            .report_message_validation_result(&message_id, &propagation_source, verdict);
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
    fn maybe_dial(&mut self, id: &NodeId, addrs: &[String], now: u64) {
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

    fn status(&self) -> StatusReport {
        let now = self.now_ms();
        let view = self.membership.view();
        let members = self
            .membership
            .members()
            .map(|m| MemberReport {
                id: m.id.to_string(),
                incarnation: m.incarnation,
                state: m.state,
                in_view: view.contains(&m.id),
                last_heard_ms_ago: now.saturating_sub(m.last_heard_ms),
                caps: m.caps.clone(),
                addrs: m.addrs.clone(),
                view_epoch: m.their_view.0,
                view_hash: m.their_view.1.to_hex(),
            })
            .collect();
        StatusReport {
            node: NodeReport {
                id: self.peer_id.to_base58(),
                incarnation: self.membership.incarnation(),
                api: self.api_addr.to_string(),
                listen: self.announced_addrs(),
                caps: self.membership.local_capabilities().clone(),
                uptime_ms: now,
                connected_peers: self.swarm.connected_peers().count(),
                connections: self
                    .swarm
                    .network_info()
                    .connection_counters()
                    .num_established(),
                private_network: self.cfg.control.swarm_key.is_some(),
                data_plane: Some(crate::status::DataPlaneReport {
                    addr: self.data_plane.local_addr().to_string(),
                    transport: self.data_plane.transport(),
                    stats: self.data_plane.stats(),
                }),
            },
            view: ViewReport {
                epoch: view.epoch,
                hash: view.hash.to_hex(),
                members: view.ids().map(|i| i.to_string()).collect(),
            },
            members,
            counters: self.counters.clone(),
            jobs: self
                .jobs
                .iter()
                .map(|(_, e)| e.report.lock().expect("report lock").clone())
                .collect(),
            serving: self.server.report(),
            serve_stats: Some(self.server.stats()),
        }
    }
}
