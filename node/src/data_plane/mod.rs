//! The data plane: direct member-to-member links for bulk tensors, and the collectives that
//! run over them (schedules come from `coordinator_free::collective`).
//!
//! Two transports, one protocol:
//! - **QUIC** (quinn; default): TLS 1.3 with libp2p-tls certificates, so the peer id is
//!   proven by the handshake itself; every byte encrypted (AES-GCM preferred). For untrusted and wide-area links.
//! - **TCP** (`--data-plane tcp`): plain TCP, mutually authenticated at connect time by
//!   signatures of the libp2p identity keys over fresh nonces; payloads unencrypted. For
//!   trusted LANs, where it is several times faster (see the README's measurements).
//!
//! A connection is accepted only from a member of the current view. Every collective opens
//! with a fixed-size [`OpHeader`] (view hash, tag, kind, dtype, length, ranks) that the
//! receiver checks and acknowledges **before** any payload byte moves; payloads are raw
//! little-endian elements whose sizes both sides derive from the header. Every wait on a
//! peer is bounded: the first header by `start_timeout`, every segment by
//! `max(timeout_floor, timeout_multiplier × its expected time at the observed rate)`.
//!
//! This file holds the handle ([`DataPlane`]), its settings, errors, roster and counters.
//! The rest, transport first, collectives on top:
//! - `transport/`: which transport carries links ([`DataTransport`]), dialing a member,
//!   recycling links; `tcp.rs` and `quic.rs` there: sockets, endpoints, accept loops.
//! - `handshake.rs`: authenticating a TCP peer with its libp2p identity key.
//! - `links.rs`: the roster and the inbox: inbound links filed by their first header,
//!   collectives waiting for them, and the pruning of both when the roster changes.
//! - `streams.rs`: service streams other modules open (serving's stage RPC).
//! - `element.rs`: the element types collectives move ([`Element`]).
//! - `collectives.rs`: all-reduce, all-gather, broadcast and barrier: opening a ring and
//!   counting outcomes; `ring.rs`: executing a ring schedule segment by segment;
//!   `compressed.rs`: the all-reduce with its payload in bf16 or int8 on the wire;
//!   `wait.rs`: the counter of time spent waiting for peers to reach a collective.
//!
//! [`OpHeader`]: coordinator_free::codec::data::OpHeader

mod collectives;
mod compressed;
mod element;
mod handshake;
mod links;
mod ring;
mod streams;
mod transport;
mod wait;

pub use element::Element;
pub use handshake::{read_hello, read_sig};
pub use streams::Stream;
pub use transport::DataTransport;

use coordinator_free::{NodeId, View};
use libp2p::identity::Keypair;
use links::Inbox;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use transport::Link;

#[cfg(not(target_endian = "little"))]
compile_error!("the data plane sends tensors as raw little-endian bytes");

/// Data-plane settings.
#[derive(Clone, Debug)]
pub struct DataPlaneConfig {
    /// Transport. Default: QUIC.
    pub transport: DataTransport,
    /// Pipelining unit, in bytes. Default: 1 MiB.
    pub segment_bytes: usize,
    /// Floor of every bound on a wait for a peer. Default: 2 s.
    pub timeout_floor: Duration,
    /// How long to wait for the left neighbour to start a collective. Default: 30 s.
    pub start_timeout: Duration,
    /// A segment may take this many times its expected time at the observed rate.
    /// Default: 8.
    pub timeout_multiplier: u32,
    /// QUIC initial MTU (UDP payload bytes), also the floor after a suspected black hole;
    /// clamped to 1200..=16000 (quinn cannot encode larger handshake packets). Default:
    /// 1200 (safe on any path; loopback benchmarks ask for 16000).
    pub quic_initial_mtu: u16,
    /// The largest QUIC datagram (UDP payload bytes) MTU discovery searches up to, after
    /// the handshake; clamped to the initial MTU..=65507, and at least 1452. Probes a path
    /// cannot carry are lost without slowing anything. Default: 1452 (an Ethernet path;
    /// 8972 suits jumbo frames, 65507 loopback).
    pub quic_max_mtu: u16,
    /// QUIC flow-control windows, in bytes. Default: 64 MiB.
    pub quic_window: u32,
    /// Most links that arrived for collectives not yet started here. Default: 256.
    pub max_pending_links: usize,
    /// TCP socket send/receive buffer in bytes (0: the kernel's autotuning; Linux caps it
    /// at net.core.{w,r}mem_max). Default: 0 (autotuning measured no slower here).
    pub tcp_buffer: u32,
}

impl Default for DataPlaneConfig {
    fn default() -> Self {
        DataPlaneConfig {
            transport: DataTransport::Quic,
            segment_bytes: 1 << 20,
            timeout_floor: Duration::from_secs(2),
            start_timeout: Duration::from_secs(30),
            timeout_multiplier: 8,
            quic_initial_mtu: 1200,
            quic_max_mtu: 1452,
            quic_window: 64 << 20,
            max_pending_links: 256,
            tcp_buffer: 0,
        }
    }
}

/// Why a collective or a link failed. Every variant is retryable once views converge.
#[derive(Debug, thiserror::Error)]
pub enum DataPlaneError {
    /// This node is not in the view, or the schedule cannot be built.
    #[error(transparent)]
    Schedule(#[from] coordinator_free::CollectiveError),
    /// The peer's first header names another view (or it told us ours differs).
    #[error("view mismatch with {peer}: {detail}")]
    ViewMismatch {
        /// The peer.
        peer: NodeId,
        /// What differs.
        detail: String,
    },
    /// The peer's header describes another operation.
    #[error("operation mismatch with {peer}: {detail}")]
    OpMismatch {
        /// The peer.
        peer: NodeId,
        /// What differs.
        detail: String,
    },
    /// No data-plane address is known for a member.
    #[error("no data-plane address known for member {0}")]
    NoAddress(NodeId),
    /// A wait on a peer exceeded its bound.
    #[error("{peer} did not {what} within {after:?}")]
    Timeout {
        /// The peer.
        peer: NodeId,
        /// What it did not do.
        what: &'static str,
        /// The bound.
        after: Duration,
    },
    /// The peer left the view while a collective waited on it.
    #[error("{0} left the view")]
    Left(NodeId),
    /// The collective's view was replaced by a newer one while it waited on a peer (that
    /// peer may never start it: it abandons collectives of views it has left).
    #[error("the view of epoch {epoch} was replaced while waiting for {peer}")]
    Superseded {
        /// The peer waited on.
        peer: NodeId,
        /// The collective's view epoch.
        epoch: u64,
    },
    /// The link to a peer failed (closed, reset, refused).
    #[error("link to {peer} failed: {source}")]
    Io {
        /// The peer.
        peer: NodeId,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The peer could not prove its identity, or refused ours.
    #[error("authentication with {peer} failed: {reason}")]
    Auth {
        /// The peer (as far as known).
        peer: String,
        /// Why.
        reason: String,
    },
    /// Bytes from the peer did not decode.
    #[error("bad frame from {peer}: {source}")]
    Codec {
        /// The peer.
        peer: NodeId,
        /// The decode error.
        source: coordinator_free::CodecError,
    },
    /// Buffers have the wrong size for the collective.
    #[error("bad buffer: {0}")]
    Buffer(String),
    /// The endpoint could not be created.
    #[error("data-plane endpoint: {0}")]
    Endpoint(String),
}

/// Who is in, and where their data planes listen.
#[derive(Clone, Debug)]
pub struct Roster {
    /// The current view.
    pub view: View,
    /// Data-plane addresses of members.
    pub addrs: HashMap<NodeId, SocketAddr>,
}

/// Bytes and time counters.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct DataPlaneStats {
    /// Payload bytes sent.
    pub bytes_sent: u64,
    /// Payload bytes received.
    pub bytes_received: u64,
    /// Collectives completed.
    pub collectives_ok: u64,
    /// Collectives failed.
    pub collectives_failed: u64,
    /// Inbound connections refused (not a member, failed authentication).
    pub refused: u64,
    /// Observed receive rate in bytes/s (decaying maximum), 0 until measured.
    pub observed_rate: f64,
    /// Durations of successful collectives: counts per bound of
    /// [`COLLECTIVE_LATENCY`](crate::metrics::COLLECTIVE_LATENCY) (cumulative counts are
    /// formed when exported), plus one overflow bucket.
    pub latency_counts: Vec<u64>,
    /// Sum of those durations in seconds.
    pub latency_sum_s: f64,
    /// Seconds during which every collective this node had in flight was still waiting
    /// for its ring neighbours to start it (the header exchange before any payload): time
    /// spent waiting for slower peers. Concurrent collectives count once; see
    /// [`DataPlane::wait_time`].
    #[serde(default)]
    pub wait_s: f64,
}

/// The state every clone of a [`DataPlane`] shares.
struct Inner {
    key: Keypair,
    me: NodeId,
    cfg: DataPlaneConfig,
    local_addr: SocketAddr,
    roster: Mutex<Option<Arc<Roster>>>,
    inbox: Mutex<Inbox>,
    tcp_pool: Mutex<HashMap<NodeId, Vec<Link>>>,
    quic: Option<quinn::Endpoint>,
    quic_conns: tokio::sync::Mutex<HashMap<NodeId, quinn::Connection>>,
    /// Inbound QUIC connections by peer, so they can be closed when the peer leaves.
    quic_inbound: Mutex<HashMap<NodeId, quinn::Connection>>,
    stats: Mutex<DataPlaneStats>,
    /// Collectives in flight and opening: the waiting time in `wait_s`.
    wait: Mutex<wait::WaitClock>,
    /// Where inbound service streams go (see [`DataPlane::accept_streams`]).
    streams: Mutex<Option<tokio::sync::mpsc::Sender<Stream>>>,
}

/// A node's data plane. Cheap to clone.
#[derive(Clone)]
pub struct DataPlane {
    inner: Arc<Inner>,
}

impl DataPlane {
    /// Binds the data plane on `addr` (use port 0 for any) with the node's identity.
    pub async fn bind(
        key: Keypair,
        addr: SocketAddr,
        cfg: DataPlaneConfig,
    ) -> Result<DataPlane, DataPlaneError> {
        let me = NodeId::new(key.public().to_peer_id().to_base58())
            .map_err(|e| DataPlaneError::Endpoint(e.to_string()))?;
        let (local_addr, quic, tcp) = match cfg.transport {
            DataTransport::Tcp => {
                let l = transport::tcp::listener(addr, cfg.tcp_buffer)
                    .map_err(|e| DataPlaneError::Endpoint(format!("bind {addr}: {e}")))?;
                (
                    l.local_addr()
                        .map_err(|e| DataPlaneError::Endpoint(e.to_string()))?,
                    None,
                    Some(l),
                )
            }
            DataTransport::Quic => {
                let ep = transport::quic::endpoint(&key, addr, &cfg)?;
                (
                    ep.local_addr()
                        .map_err(|e| DataPlaneError::Endpoint(e.to_string()))?,
                    Some(ep),
                    None,
                )
            }
        };
        let dp = DataPlane {
            inner: Arc::new(Inner {
                key,
                me,
                cfg,
                local_addr,
                roster: Mutex::new(None),
                inbox: Mutex::new(Inbox::default()),
                tcp_pool: Mutex::new(HashMap::new()),
                quic,
                quic_conns: tokio::sync::Mutex::new(HashMap::new()),
                quic_inbound: Mutex::new(HashMap::new()),
                stats: Mutex::new(DataPlaneStats::default()),
                wait: Mutex::new(wait::WaitClock::default()),
                streams: Mutex::new(None),
            }),
        };
        if let Some(l) = tcp {
            let d = dp.clone();
            tokio::spawn(async move { d.tcp_accept_loop(l).await });
        }
        if dp.inner.quic.is_some() {
            let d = dp.clone();
            tokio::spawn(async move { d.quic_accept_loop().await });
        }
        Ok(dp)
    }

    /// Where this data plane listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.inner.local_addr
    }

    /// This node's id.
    pub fn me(&self) -> &NodeId {
        &self.inner.me
    }

    /// The transport in use.
    pub fn transport(&self) -> DataTransport {
        self.inner.cfg.transport
    }

    /// Counters.
    pub fn stats(&self) -> DataPlaneStats {
        let mut s = self.inner.stats.lock().unwrap().clone();
        s.wait_s = self.wait_time().as_secs_f64();
        s
    }
}
