//! The data plane: direct member-to-member links for bulk tensors, and the collectives that
//! run over them (schedules come from `coordinator_free::collective`).
//!
//! Two transports, one protocol:
//! - **QUIC** (quinn; default): TLS 1.3 with libp2p-tls certificates, so the peer id is
//!   proven by the handshake itself; every byte encrypted. For untrusted and wide-area links.
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

use coordinator_free::codec::data::{self as wire, OpHeader, OP_HEADER_LEN};
use coordinator_free::collective::{segments, Kind, ReduceOp, Ring};
use coordinator_free::{DType, NodeId, View};
use libp2p::identity::{Keypair, PublicKey};
use libp2p::PeerId;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::oneshot;

#[cfg(not(target_endian = "little"))]
compile_error!("the data plane sends tensors as raw little-endian bytes");

/// Which transport carries the data plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DataTransport {
    /// QUIC with libp2p-tls (encrypted). The default.
    #[default]
    Quic,
    /// Plain TCP, authenticated at connect time (unencrypted payloads).
    Tcp,
}

impl std::str::FromStr for DataTransport {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "quic" => Ok(DataTransport::Quic),
            "tcp" => Ok(DataTransport::Tcp),
            other => Err(format!(
                "unknown data-plane transport '{other}' (quic or tcp)"
            )),
        }
    }
}

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
    /// QUIC initial MTU. Default: 1200 (safe on any path; loopback benchmarks use 8192).
    pub quic_initial_mtu: u16,
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

/// Element types: f32, f16 and bf16.
pub trait Element: Copy + Send + Sync + Default + PartialEq + std::fmt::Debug + 'static {
    /// Wire dtype.
    const DTYPE: DType;
    /// `dst[i] += src[i]`.
    fn add_into(dst: &mut [Self], src: &[Self]);
    /// `dst[i] /= n`.
    fn div_by(dst: &mut [Self], n: usize);
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    fn add_into(dst: &mut [f32], src: &[f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d += *s;
        }
    }
    fn div_by(dst: &mut [f32], n: usize) {
        let n = n as f32;
        for d in dst {
            *d /= n;
        }
    }
}

macro_rules! half_element {
    ($t:ty, $d:expr) => {
        impl Element for $t {
            const DTYPE: DType = $d;
            fn add_into(dst: &mut [$t], src: &[$t]) {
                for (d, s) in dst.iter_mut().zip(src) {
                    *d = <$t>::from_f32(d.to_f32() + s.to_f32());
                }
            }
            fn div_by(dst: &mut [$t], n: usize) {
                let n = n as f32;
                for d in dst {
                    *d = <$t>::from_f32(d.to_f32() / n);
                }
            }
        }
    };
}
half_element!(half::f16, DType::F16);
half_element!(half::bf16, DType::BF16);

fn bytes_of<T: Element>(s: &[T]) -> &[u8] {
    // SAFETY: Element types are plain little-endian floats without padding.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u8>(), std::mem::size_of_val(s)) }
}

fn bytes_of_mut<T: Element>(s: &mut [T]) -> &mut [u8] {
    // SAFETY: as above; every bit pattern is a valid f32/f16/bf16.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(s)) }
}

/// Who is in, and where their data planes listen.
#[derive(Clone, Debug)]
pub struct Roster {
    /// The current view.
    pub view: View,
    /// Data-plane addresses of members.
    pub addrs: HashMap<NodeId, SocketAddr>,
}

type BoxRead = Box<dyn AsyncRead + Send + Unpin>;
type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// One authenticated, ordered byte stream to or from a member.
struct Link {
    peer: NodeId,
    r: BoxRead,
    w: BoxWrite,
}

/// An authenticated request/response stream for a service (e.g. serving stages) between
/// two members of the view. Framing is the service's business.
pub struct Stream {
    /// The member at the other end.
    pub peer: NodeId,
    /// The service id the opener named.
    pub service: u32,
    /// Bytes from the peer.
    pub r: Box<dyn AsyncRead + Send + Unpin>,
    /// Bytes to the peer.
    pub w: Box<dyn AsyncWrite + Send + Unpin>,
}

#[derive(Default)]
struct Inbox {
    /// Links whose first header arrived before their collective asked for them.
    arrived: HashMap<(NodeId, u64), (Link, OpHeader, Instant)>,
    /// Collectives waiting for a peer's first header, with their view's epoch.
    waiting: HashMap<(NodeId, u64), (Arrival, u64)>,
}

/// Where a waited-for link and its first header are handed over.
type Arrival = oneshot::Sender<(Link, OpHeader)>;

/// Acknowledgement codes sent back on a link after its header is checked.
const ACK_OK: u8 = 1;
const ACK_VIEW_MISMATCH: u8 = 2;
const ACK_OP_MISMATCH: u8 = 3;

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
    /// Durations of successful collectives: counts per [`LATENCY_BUCKETS`] upper bound
    /// (cumulative counts are formed when exported), plus one overflow bucket.
    pub latency_counts: Vec<u64>,
    /// Sum of those durations in seconds.
    pub latency_sum_s: f64,
}

/// Upper bounds (seconds) of the collective latency histogram.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

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
                let l = tcp_listener(addr, cfg.tcp_buffer)
                    .map_err(|e| DataPlaneError::Endpoint(format!("bind {addr}: {e}")))?;
                (
                    l.local_addr()
                        .map_err(|e| DataPlaneError::Endpoint(e.to_string()))?,
                    None,
                    Some(l),
                )
            }
            DataTransport::Quic => {
                let ep = quic_endpoint(&key, addr, &cfg)?;
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
        self.inner.stats.lock().unwrap().clone()
    }

    /// Installs the current view and addresses. Links from non-members are refused from now
    /// on, pooled links to peers that left are closed, and links that arrived for
    /// collectives of another view are dropped (their senders see the link close).
    pub fn set_roster(&self, roster: Roster) {
        let members: Vec<NodeId> = roster.view.ids().cloned().collect();
        let hash = roster.view.hash;
        let roster_epoch = roster.view.epoch;
        *self.inner.roster.lock().unwrap() = Some(Arc::new(roster));
        self.inner
            .tcp_pool
            .lock()
            .unwrap()
            .retain(|peer, _| members.contains(peer));
        {
            let mut inbox = self.inner.inbox.lock().unwrap();
            inbox
                .arrived
                .retain(|(peer, _), (_, h, _)| members.contains(peer) && h.view_hash == hash);
            // A collective (of this view's epoch or earlier) waiting for a departed member's
            // first header fails now (its sender is dropped) instead of at the start bound.
            let epoch = roster_epoch;
            inbox
                .waiting
                .retain(|(peer, _), (_, e)| members.contains(peer) || *e > epoch);
        }
        // Close QUIC connections to members that left: collectives still waiting on them
        // fail at once instead of at their timeout (TCP links of a dead process are reset
        // by its kernel already). The map's lock is held across a dial; when it is busy,
        // the closing waits for it in a task rather than being skipped.
        let staying = members.clone();
        let close_departed = move |conns: &mut HashMap<NodeId, quinn::Connection>| {
            conns.retain(|peer, conn| {
                let keep = staying.contains(peer);
                if !keep {
                    conn.close(3u32.into(), b"left the view");
                }
                keep
            });
        };
        match self.inner.quic_conns.try_lock() {
            Ok(mut conns) => close_departed(&mut conns),
            Err(_) => {
                let d = self.clone();
                tokio::spawn(async move { close_departed(&mut *d.inner.quic_conns.lock().await) });
            }
        }
        let left: Vec<NodeId> = {
            let mut inbound = self.inner.quic_inbound.lock().unwrap();
            let gone: Vec<NodeId> = inbound
                .keys()
                .filter(|p| !members.contains(p))
                .cloned()
                .collect();
            for p in &gone {
                if let Some(c) = inbound.remove(p) {
                    c.close(3u32.into(), b"left the view");
                }
            }
            gone
        };
        if !left.is_empty() {
            tracing::debug!(?left, "closed data-plane connections of departed members");
        }
    }

    fn roster(&self) -> Option<Arc<Roster>> {
        self.inner.roster.lock().unwrap().clone()
    }

    fn is_member(&self, peer: &PeerId) -> bool {
        let Ok(id) = NodeId::new(peer.to_base58()) else {
            return false;
        };
        self.roster().is_some_and(|r| r.view.contains(&id))
    }

    fn segment_bound(&self, bytes: usize) -> Duration {
        let rate = self.inner.stats.lock().unwrap().observed_rate;
        let floor = self.inner.cfg.timeout_floor;
        if rate <= 0.0 {
            return floor;
        }
        let expected = Duration::from_secs_f64(bytes as f64 / rate);
        floor.max(expected * self.inner.cfg.timeout_multiplier)
    }

    /// Records a segment that took `took`. The rate estimate is a decaying maximum: a
    /// segment that waited for a slow or stalled peer must not loosen the bound the next
    /// one is held to, so the estimate tracks what the link has shown it can do.
    fn observe(&self, bytes: usize, took: Duration) {
        let secs = took.as_secs_f64().max(1e-6);
        let rate = bytes as f64 / secs;
        let mut s = self.inner.stats.lock().unwrap();
        s.bytes_received += bytes as u64;
        s.observed_rate = rate.max(0.9 * s.observed_rate);
    }

    // ---------------------------------------------------------------- inbound

    async fn tcp_accept_loop(self, l: tokio::net::TcpListener) {
        loop {
            let (sock, from) = match l.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("data plane accept: {e}");
                    continue;
                }
            };
            let d = self.clone();
            tokio::spawn(async move {
                let _ = sock.set_nodelay(true);
                let bound = d.inner.cfg.timeout_floor * 2;
                match tokio::time::timeout(bound, d.tcp_handshake_accept(sock)).await {
                    Ok(Ok(link)) => d.read_headers(link).await,
                    Ok(Err(e)) => {
                        d.inner.stats.lock().unwrap().refused += 1;
                        tracing::warn!(%from, "refused data-plane connection: {e}");
                    }
                    Err(_) => {
                        d.inner.stats.lock().unwrap().refused += 1;
                        tracing::warn!(%from, "refused data-plane connection: handshake timed out");
                    }
                }
            });
        }
    }

    async fn quic_accept_loop(self) {
        let ep = self.inner.quic.clone().expect("quic endpoint");
        while let Some(incoming) = ep.accept().await {
            let d = self.clone();
            tokio::spawn(async move {
                let from = incoming.remote_address();
                let conn = match incoming.await {
                    Ok(c) => c,
                    Err(e) => {
                        d.inner.stats.lock().unwrap().refused += 1;
                        tracing::warn!(%from, "refused data-plane connection: {e}");
                        return;
                    }
                };
                let peer = match quic_peer_id(&conn) {
                    Ok(p) => p,
                    Err(e) => {
                        d.inner.stats.lock().unwrap().refused += 1;
                        tracing::warn!(%from, "refused data-plane connection: {e}");
                        conn.close(1u32.into(), b"unauthenticated");
                        return;
                    }
                };
                if !d.is_member(&peer) {
                    d.inner.stats.lock().unwrap().refused += 1;
                    tracing::warn!(%from, %peer, "refused data-plane connection from a non-member");
                    conn.close(2u32.into(), b"not a member");
                    return;
                }
                let Ok(id) = NodeId::new(peer.to_base58()) else {
                    return;
                };
                d.inner
                    .quic_inbound
                    .lock()
                    .unwrap()
                    .insert(id.clone(), conn.clone());
                while let Ok((w, r)) = conn.accept_bi().await {
                    let link = Link {
                        peer: id.clone(),
                        r: Box::new(r),
                        w: Box::new(w),
                    };
                    let d2 = d.clone();
                    tokio::spawn(async move { d2.read_headers(link).await });
                }
            });
        }
    }

    /// Reads operation headers from an idle inbound link and files it in the inbox. Runs
    /// until the link closes; idle links close after 10 minutes.
    async fn read_headers(&self, mut link: Link) {
        let mut buf = [0u8; OP_HEADER_LEN];
        match tokio::time::timeout(Duration::from_secs(600), link.r.read_exact(&mut buf)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        match OpHeader::decode(&buf) {
            Ok(h) => match h.kind {
                Kind::Stream(service) => self.deliver_stream(link, service).await,
                _ => self.deliver(link, h),
            },
            Err(e) => tracing::warn!(peer = %link.peer, "bad data-plane header: {e}"),
        }
    }

    /// Hands an inbound service stream to its acceptor (acknowledged), or refuses it.
    async fn deliver_stream(&self, mut link: Link, service: u32) {
        let tx = self.inner.streams.lock().unwrap().clone();
        let code = if tx.is_some() {
            ACK_OK
        } else {
            ACK_OP_MISMATCH
        };
        let ack = async {
            link.w.write_all(&[code]).await?;
            link.w.flush().await
        };
        if !matches!(
            tokio::time::timeout(self.inner.cfg.timeout_floor, ack).await,
            Ok(Ok(()))
        ) {
            return;
        }
        if let Some(tx) = tx {
            let stream = Stream {
                peer: link.peer,
                service,
                r: link.r,
                w: link.w,
            };
            let _ = tx.send(stream).await;
        }
    }

    /// Registers the acceptor of inbound service streams (replacing any earlier one).
    pub fn accept_streams(&self) -> tokio::sync::mpsc::Receiver<Stream> {
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        *self.inner.streams.lock().unwrap() = Some(tx);
        rx
    }

    /// Opens a service stream to a member of the current view: authenticated like every
    /// data-plane link, acknowledged by the peer (an error if it runs no such service),
    /// within `2 × timeout_floor`.
    pub async fn open_stream(&self, peer: &NodeId, service: u32) -> Result<Stream, DataPlaneError> {
        let roster = self
            .roster()
            .ok_or_else(|| DataPlaneError::NoAddress(peer.clone()))?;
        let header = OpHeader {
            view_hash: roster.view.hash,
            tag: 0,
            kind: Kind::Stream(service),
            dtype: DType::F32,
            len: 0,
            n: 1,
            rank: 0,
        };
        let bound = self.inner.cfg.timeout_floor * 2;
        let open = async {
            let mut link = self.open_link(peer).await?;
            let io = |source| DataPlaneError::Io {
                peer: peer.clone(),
                source,
            };
            link.w.write_all(&header.encode()).await.map_err(io)?;
            link.w.flush().await.map_err(io)?;
            let mut ack = [0u8; 1];
            link.r.read_exact(&mut ack).await.map_err(io)?;
            if ack[0] != ACK_OK {
                return Err(DataPlaneError::OpMismatch {
                    peer: peer.clone(),
                    detail: format!("it runs no service {service}"),
                });
            }
            Ok(Stream {
                peer: link.peer,
                service,
                r: link.r,
                w: link.w,
            })
        };
        tokio::time::timeout(bound, open)
            .await
            .map_err(|_| DataPlaneError::Timeout {
                peer: peer.clone(),
                what: "open a service stream",
                after: bound,
            })?
    }

    /// Adds service-stream traffic to the byte counters.
    pub fn count_bytes(&self, sent: u64, received: u64) {
        let mut s = self.inner.stats.lock().unwrap();
        s.bytes_sent += sent;
        s.bytes_received += received;
    }

    fn deliver(&self, link: Link, h: OpHeader) {
        let key = (link.peer.clone(), h.tag);
        let mut inbox = self.inner.inbox.lock().unwrap();
        if let Some((tx, _)) = inbox.waiting.remove(&key) {
            if let Err((link, h)) = tx.send((link, h)) {
                // The waiter gave up in the meantime; keep the link for a retry.
                inbox.arrived.insert(key, (link, h, Instant::now()));
            }
            return;
        }
        if inbox.arrived.len() >= self.inner.cfg.max_pending_links {
            // Drop the oldest.
            if let Some(oldest) = inbox
                .arrived
                .iter()
                .min_by_key(|(_, (_, _, t))| *t)
                .map(|(k, _)| k.clone())
            {
                inbox.arrived.remove(&oldest);
            }
        }
        inbox.arrived.insert(key, (link, h, Instant::now()));
    }

    /// Waits for `peer`'s first header of collective `tag` in a view of `epoch`. Fails at
    /// once when this node has moved on to a view (of that epoch or later) without the peer,
    /// or when a roster without it arrives while waiting; otherwise within the start bound.
    async fn wait_inbound(
        &self,
        peer: &NodeId,
        tag: u64,
        epoch: u64,
    ) -> Result<(Link, OpHeader), DataPlaneError> {
        let key = (peer.clone(), tag);
        let rx = {
            let mut inbox = self.inner.inbox.lock().unwrap();
            if let Some((link, h, _)) = inbox.arrived.remove(&key) {
                return Ok((link, h));
            }
            // Checked under the inbox lock: a roster installed after this check prunes the
            // waiter inserted below (see `set_roster`).
            if self
                .roster()
                .is_some_and(|r| r.view.epoch >= epoch && !r.view.contains(peer))
            {
                return Err(DataPlaneError::Left(peer.clone()));
            }
            let (tx, rx) = oneshot::channel();
            inbox.waiting.insert(key.clone(), (tx, epoch));
            rx
        };
        let bound = self.inner.cfg.start_timeout;
        match tokio::time::timeout(bound, rx).await {
            Ok(Ok(x)) => Ok(x),
            // `set_roster` dropped the sender: the peer left the view.
            Ok(Err(_)) => Err(DataPlaneError::Left(peer.clone())),
            Err(_) => {
                self.inner.inbox.lock().unwrap().waiting.remove(&key);
                Err(DataPlaneError::Timeout {
                    peer: peer.clone(),
                    what: "start the collective",
                    after: bound,
                })
            }
        }
    }

    // ---------------------------------------------------------------- outbound

    async fn open_link(&self, peer: &NodeId) -> Result<Link, DataPlaneError> {
        if let Some(link) = self
            .inner
            .tcp_pool
            .lock()
            .unwrap()
            .get_mut(peer)
            .and_then(Vec::pop)
        {
            return Ok(link);
        }
        let addr = self
            .roster()
            .and_then(|r| r.addrs.get(peer).copied())
            .ok_or_else(|| DataPlaneError::NoAddress(peer.clone()))?;
        let expected: PeerId = peer.as_str().parse().map_err(|_| DataPlaneError::Auth {
            peer: peer.to_string(),
            reason: "not a peer id".into(),
        })?;
        let bound = self.inner.cfg.timeout_floor * 2;
        let fut = async {
            match self.inner.cfg.transport {
                DataTransport::Tcp => {
                    let sock =
                        tcp_connect(addr, self.inner.cfg.tcp_buffer)
                            .await
                            .map_err(|source| DataPlaneError::Io {
                                peer: peer.clone(),
                                source,
                            })?;
                    let _ = sock.set_nodelay(true);
                    self.tcp_handshake_dial(sock, peer, expected).await
                }
                DataTransport::Quic => {
                    let conn = self.quic_connection(peer, addr, expected).await?;
                    let (w, r) = conn.open_bi().await.map_err(|e| DataPlaneError::Io {
                        peer: peer.clone(),
                        source: std::io::Error::other(e),
                    })?;
                    Ok(Link {
                        peer: peer.clone(),
                        r: Box::new(r),
                        w: Box::new(w),
                    })
                }
            }
        };
        tokio::time::timeout(bound, fut)
            .await
            .map_err(|_| DataPlaneError::Timeout {
                peer: peer.clone(),
                what: "accept a data-plane connection",
                after: bound,
            })?
    }

    async fn quic_connection(
        &self,
        peer: &NodeId,
        addr: SocketAddr,
        expected: PeerId,
    ) -> Result<quinn::Connection, DataPlaneError> {
        let mut conns = self.inner.quic_conns.lock().await;
        if let Some(c) = conns.get(peer) {
            if c.close_reason().is_none() {
                return Ok(c.clone());
            }
        }
        let ep = self.inner.quic.as_ref().expect("quic endpoint");
        let client = quic_client_config(&self.inner.key, expected, &self.inner.cfg)?;
        let conn = ep
            .connect_with(client, addr, "shoal")
            .map_err(|e| DataPlaneError::Endpoint(e.to_string()))?
            .await
            .map_err(|e| DataPlaneError::Auth {
                peer: peer.to_string(),
                reason: e.to_string(),
            })?;
        conns.insert(peer.clone(), conn.clone());
        Ok(conn)
    }

    fn recycle_outbound(&self, link: Link) {
        if self.inner.cfg.transport == DataTransport::Tcp {
            self.inner
                .tcp_pool
                .lock()
                .unwrap()
                .entry(link.peer.clone())
                .or_default()
                .push(link);
        }
        // QUIC: dropping the stream finishes it; the connection stays cached.
    }

    fn recycle_inbound(&self, link: Link) {
        if self.inner.cfg.transport == DataTransport::Tcp {
            let d = self.clone();
            tokio::spawn(async move { d.read_headers(link).await });
        }
    }

    // ------------------------------------------------------------ handshakes

    async fn tcp_handshake_dial(
        &self,
        mut sock: tokio::net::TcpStream,
        peer: &NodeId,
        expected: PeerId,
    ) -> Result<Link, DataPlaneError> {
        let io = |source| DataPlaneError::Io {
            peer: peer.clone(),
            source,
        };
        let auth = |reason: String| DataPlaneError::Auth {
            peer: peer.to_string(),
            reason,
        };
        let my_pk = self.inner.key.public().encode_protobuf();
        let nonce_d: [u8; 32] = rand::random();
        write_hello(&mut sock, &my_pk, &nonce_d).await.map_err(io)?;
        let (their_pk, nonce_l) = read_hello(&mut sock)
            .await
            .map_err(|e| auth(e.to_string()))?;
        let sig_l = read_sig(&mut sock).await.map_err(|e| auth(e.to_string()))?;
        let their = PublicKey::try_decode_protobuf(&their_pk).map_err(|e| auth(e.to_string()))?;
        if their.to_peer_id() != expected {
            return Err(auth(format!("answered as {}", their.to_peer_id())));
        }
        if !their.verify(&transcript(b"listener", &nonce_d, &nonce_l, &my_pk), &sig_l) {
            return Err(auth("bad signature".into()));
        }
        let sig_d = self
            .inner
            .key
            .sign(&transcript(b"dialer", &nonce_l, &nonce_d, &their_pk))
            .map_err(|e| auth(e.to_string()))?;
        write_sig(&mut sock, &sig_d).await.map_err(io)?;
        let mut verdict = [0u8; 1];
        sock.read_exact(&mut verdict).await.map_err(io)?;
        if verdict[0] != ACK_OK {
            return Err(auth("the peer refused us: not a member of its view".into()));
        }
        let (r, w) = sock.into_split();
        Ok(Link {
            peer: peer.clone(),
            r: Box::new(r),
            w: Box::new(w),
        })
    }

    async fn tcp_handshake_accept(
        &self,
        mut sock: tokio::net::TcpStream,
    ) -> Result<Link, DataPlaneError> {
        let auth = |reason: String| DataPlaneError::Auth {
            peer: "unknown".into(),
            reason,
        };
        let (their_pk, nonce_d) = read_hello(&mut sock)
            .await
            .map_err(|e| auth(e.to_string()))?;
        let their = PublicKey::try_decode_protobuf(&their_pk).map_err(|e| auth(e.to_string()))?;
        let peer = their.to_peer_id();
        let my_pk = self.inner.key.public().encode_protobuf();
        let nonce_l: [u8; 32] = rand::random();
        let sig_l = self
            .inner
            .key
            .sign(&transcript(b"listener", &nonce_d, &nonce_l, &their_pk))
            .map_err(|e| auth(e.to_string()))?;
        let io = |e: std::io::Error| auth(e.to_string());
        write_hello(&mut sock, &my_pk, &nonce_l).await.map_err(io)?;
        write_sig(&mut sock, &sig_l).await.map_err(io)?;
        let sig_d = read_sig(&mut sock).await.map_err(|e| auth(e.to_string()))?;
        if !their.verify(&transcript(b"dialer", &nonce_l, &nonce_d, &my_pk), &sig_d) {
            return Err(DataPlaneError::Auth {
                peer: peer.to_string(),
                reason: "bad signature".into(),
            });
        }
        if !self.is_member(&peer) {
            let _ = sock.write_all(&[0]).await;
            return Err(DataPlaneError::Auth {
                peer: peer.to_string(),
                reason: "not a member of the current view".into(),
            });
        }
        sock.write_all(&[ACK_OK]).await.map_err(io)?;
        let id = NodeId::new(peer.to_base58()).map_err(|e| auth(e.to_string()))?;
        let (r, w) = sock.into_split();
        Ok(Link {
            peer: id,
            r: Box::new(r),
            w: Box::new(w),
        })
    }

    // ------------------------------------------------------------ collectives

    /// Opens the two links of a ring collective: to the right (header sent, acknowledged)
    /// and from the left (header received, checked, acknowledged).
    async fn open_ring(
        &self,
        view: &View,
        ring: Ring,
        header: OpHeader,
    ) -> Result<(Link, Link), DataPlaneError> {
        let right = view.members[ring.right()].id.clone();
        let left = view.members[ring.left()].id.clone();
        let out = async {
            let mut link = self.open_link(&right).await?;
            let io = |source| DataPlaneError::Io {
                peer: right.clone(),
                source,
            };
            // A dead peer's flow-control window can be full: bound the header write too.
            let floor = self.inner.cfg.timeout_floor;
            let send_header = async {
                link.w.write_all(&header.encode()).await?;
                link.w.flush().await
            };
            match tokio::time::timeout(floor, send_header).await {
                Ok(r) => r.map_err(io)?,
                Err(_) => {
                    return Err(DataPlaneError::Timeout {
                        peer: right.clone(),
                        what: "take the collective's header",
                        after: floor,
                    })
                }
            }
            let bound = self.inner.cfg.start_timeout;
            let mut ack = [0u8; 1];
            match tokio::time::timeout(bound, link.r.read_exact(&mut ack)).await {
                Err(_) => {
                    return Err(DataPlaneError::Timeout {
                        peer: right.clone(),
                        what: "acknowledge the collective",
                        after: bound,
                    })
                }
                Ok(r) => {
                    r.map_err(io)?;
                }
            }
            match ack[0] {
                ACK_OK => Ok(link),
                ACK_VIEW_MISMATCH => Err(DataPlaneError::ViewMismatch {
                    peer: right.clone(),
                    detail: format!("it is not in view {}", view.hash),
                }),
                _ => Err(DataPlaneError::OpMismatch {
                    peer: right.clone(),
                    detail: "it expected another operation".into(),
                }),
            }
        };
        let inn = async {
            let (mut link, got) = self.wait_inbound(&left, header.tag, view.epoch).await?;
            let expected = OpHeader {
                rank: ring.left() as u32,
                ..header
            };
            let verdict = if got.view_hash != expected.view_hash {
                Err(DataPlaneError::ViewMismatch {
                    peer: left.clone(),
                    detail: format!(
                        "we are in {}, it is in {}",
                        expected.view_hash, got.view_hash
                    ),
                })
            } else if got != expected {
                Err(DataPlaneError::OpMismatch {
                    peer: left.clone(),
                    detail: format!("expected {expected:?}, got {got:?}"),
                })
            } else {
                Ok(())
            };
            let code = match &verdict {
                Ok(()) => ACK_OK,
                Err(DataPlaneError::ViewMismatch { .. }) => ACK_VIEW_MISMATCH,
                Err(_) => ACK_OP_MISMATCH,
            };
            let ack = async {
                link.w.write_all(&[code]).await?;
                link.w.flush().await
            };
            let floor = self.inner.cfg.timeout_floor;
            match tokio::time::timeout(floor, ack).await {
                Ok(Ok(())) => verdict.map(|()| link),
                Ok(Err(source)) => verdict.and(Err(DataPlaneError::Io {
                    peer: left.clone(),
                    source,
                })),
                Err(_) => verdict.and(Err(DataPlaneError::Timeout {
                    peer: left.clone(),
                    what: "take our acknowledgement",
                    after: floor,
                })),
            }
        };
        tokio::try_join!(out, inn)
    }

    /// Runs ring `moves` over `buf`: at each move, sends `buf[send]` to the right while the
    /// left's data for `buf[recv]` arrives, segment by segment. A reader task runs ahead on
    /// the inbound link (up to [`READ_AHEAD`] segments), so receiving overlaps sending and
    /// reducing. Returns the inbound link for reuse.
    async fn run_ring<T: Element>(
        &self,
        out: &mut Link,
        inn: Link,
        buf: &mut [T],
        moves: &[Move],
        avg_after: Option<(usize, usize)>,
    ) -> Result<Link, DataPlaneError> {
        let seg = (self.inner.cfg.segment_bytes / std::mem::size_of::<T>()).max(1);
        // Reducing moves read ahead into pooled buffers (the data must be added anyway);
        // copying moves read straight into place once the reader has handed the link back.
        let lens: Vec<usize> = moves
            .iter()
            .filter(|m| m.reduce)
            .flat_map(|m| segments(m.recv.clone(), seg).map(|r| r.len()))
            .collect();
        let Link { peer, r, w } = inn;
        let (mut filled, free, reader) = spawn_reader::<T>(self.clone(), peer.clone(), r, lens);
        let mut reader = Some(reader);
        let mut direct: Option<BoxRead> = None;
        let reader_failed = |peer: &NodeId| DataPlaneError::Io {
            peer: peer.clone(),
            source: std::io::Error::other("inbound reader stopped"),
        };
        let run = async {
            for (i, m) in moves.iter().enumerate() {
                if !m.reduce && direct.is_none() {
                    let handle = reader.take().expect("reader present until first copy move");
                    direct = Some(
                        handle
                            .await
                            .ok()
                            .flatten()
                            .ok_or_else(|| reader_failed(&peer))?,
                    );
                }
                let sends: Vec<_> = segments(m.send.clone(), seg).collect();
                let recvs: Vec<_> = segments(m.recv.clone(), seg).collect();
                for j in 0..sends.len().max(recvs.len()) {
                    let (send, target) = split_disjoint(buf, m.send.clone(), m.recv.clone());
                    let sseg = sends
                        .get(j)
                        .map(|s| &send[s.start - m.send.start..s.end - m.send.start]);
                    let write = async {
                        if let Some(data) = sseg {
                            self.write_segment(out, bytes_of(data)).await?;
                        }
                        Ok::<(), DataPlaneError>(())
                    };
                    let rseg = recvs
                        .get(j)
                        .map(|r| r.start - m.recv.start..r.end - m.recv.start);
                    if m.reduce {
                        let read = async {
                            if rseg.is_none() {
                                return Ok(None);
                            }
                            match filled.recv().await {
                                Some(Ok(b)) => Ok(Some(b)),
                                Some(Err(e)) => Err(e),
                                None => Err(reader_failed(&peer)),
                            }
                        };
                        let ((), got) = tokio::try_join!(write, read)?;
                        if let (Some(data), Some(r)) = (got, rseg) {
                            T::add_into(&mut target[r.start..r.start + data.len()], &data);
                            let _ = free.try_send(data);
                        }
                    } else {
                        let rd = direct.as_mut().expect("direct link");
                        let read = async {
                            match rseg {
                                Some(r) => {
                                    self.read_segment(rd, &peer, bytes_of_mut(&mut target[r]))
                                        .await
                                }
                                None => Ok(()),
                            }
                        };
                        tokio::try_join!(write, read)?;
                    }
                }
                if let Some((step, n)) = avg_after {
                    if i == step {
                        T::div_by(&mut buf[m.recv.clone()], n);
                    }
                }
            }
            Ok::<(), DataPlaneError>(())
        };
        let result = run.await;
        if let Some(handle) = reader.take() {
            if result.is_err() {
                handle.abort();
            } else {
                direct = handle.await.ok().flatten();
            }
        }
        result?;
        let r = direct.ok_or_else(|| reader_failed(&peer))?;
        Ok(Link { peer, r, w })
    }

    /// Reads one segment from `peer` into `dst`, within the segment bound; records the rate.
    async fn read_segment(
        &self,
        r: &mut BoxRead,
        peer: &NodeId,
        dst: &mut [u8],
    ) -> Result<(), DataPlaneError> {
        let bound = self.segment_bound(dst.len());
        let started = Instant::now();
        match tokio::time::timeout(bound, r.read_exact(dst)).await {
            Ok(Ok(_)) => {
                self.observe(dst.len(), started.elapsed());
                Ok(())
            }
            Ok(Err(source)) => Err(DataPlaneError::Io {
                peer: peer.clone(),
                source,
            }),
            Err(_) => Err(DataPlaneError::Timeout {
                peer: peer.clone(),
                what: "send a segment",
                after: bound,
            }),
        }
    }

    async fn write_segment(&self, out: &mut Link, data: &[u8]) -> Result<(), DataPlaneError> {
        let bound = self.segment_bound(data.len());
        let w = async {
            out.w.write_all(data).await?;
            out.w.flush().await
        };
        match tokio::time::timeout(bound, w).await {
            Ok(Ok(())) => {
                self.inner.stats.lock().unwrap().bytes_sent += data.len() as u64;
                Ok(())
            }
            Ok(Err(source)) => Err(DataPlaneError::Io {
                peer: out.peer.clone(),
                source,
            }),
            Err(_) => Err(DataPlaneError::Timeout {
                peer: out.peer.clone(),
                what: "take a segment",
                after: bound,
            }),
        }
    }

    /// Runs a collective, counting and logging its outcome.
    async fn counted<R>(
        &self,
        op: impl std::future::Future<Output = Result<R, DataPlaneError>>,
    ) -> Result<R, DataPlaneError> {
        let started = Instant::now();
        let r = op.await;
        let took = started.elapsed().as_secs_f64();
        let mut s = self.inner.stats.lock().unwrap();
        match &r {
            Ok(_) => {
                s.collectives_ok += 1;
                if s.latency_counts.len() != LATENCY_BUCKETS.len() + 1 {
                    s.latency_counts = vec![0; LATENCY_BUCKETS.len() + 1];
                }
                let i = LATENCY_BUCKETS
                    .iter()
                    .position(|&b| took <= b)
                    .unwrap_or(LATENCY_BUCKETS.len());
                s.latency_counts[i] += 1;
                s.latency_sum_s += took;
            }
            Err(e) => {
                s.collectives_failed += 1;
                tracing::warn!("collective failed: {e}");
            }
        }
        r
    }

    /// Ring all-reduce of `buf` across `view`, in place. On error the contents of `buf` are
    /// unspecified (the caller redoes the step); an `Ok` always holds the full reduction.
    pub async fn all_reduce<T: Element>(
        &self,
        view: &View,
        tag: u64,
        buf: &mut [T],
        op: ReduceOp,
    ) -> Result<(), DataPlaneError> {
        self.counted(self.all_reduce_inner(view, tag, buf, op))
            .await
    }

    async fn all_reduce_inner<T: Element>(
        &self,
        view: &View,
        tag: u64,
        buf: &mut [T],
        op: ReduceOp,
    ) -> Result<(), DataPlaneError> {
        let ring = Ring::for_view(view, &self.inner.me)?;
        if ring.n == 1 {
            return Ok(());
        }
        let header = op_header::<T>(view, ring, tag, Kind::AllReduce(op), buf.len() as u64);
        let (mut out, inn) = self.open_ring(view, ring, header).await?;
        let len = buf.len();
        let moves: Vec<Move> = ring
            .all_reduce_steps()
            .iter()
            .map(|st| Move {
                send: Ring::chunk(len, ring.n, st.send),
                recv: Ring::chunk(len, ring.n, st.recv),
                reduce: st.reduce,
            })
            .collect();
        // After the last reduce-scatter step this rank owns the full sum of one chunk.
        let avg = (op == ReduceOp::Avg).then_some((ring.n - 2, ring.n));
        let inn = self.run_ring(&mut out, inn, buf, &moves, avg).await?;
        self.recycle_outbound(out);
        self.recycle_inbound(inn);
        Ok(())
    }

    /// All-gather: every member contributes `input`; `output` (n × input.len(), rank order)
    /// ends with every member's block.
    pub async fn all_gather<T: Element>(
        &self,
        view: &View,
        tag: u64,
        input: &[T],
        output: &mut [T],
    ) -> Result<(), DataPlaneError> {
        self.counted(self.all_gather_inner(view, tag, input, output))
            .await
    }

    async fn all_gather_inner<T: Element>(
        &self,
        view: &View,
        tag: u64,
        input: &[T],
        output: &mut [T],
    ) -> Result<(), DataPlaneError> {
        let ring = Ring::for_view(view, &self.inner.me)?;
        let b = input.len();
        if output.len() != b * ring.n {
            return Err(DataPlaneError::Buffer(format!(
                "all_gather output has {} elements, expected {} × {b}",
                output.len(),
                ring.n
            )));
        }
        output[ring.rank * b..(ring.rank + 1) * b].copy_from_slice(input);
        if ring.n == 1 {
            return Ok(());
        }
        let header = op_header::<T>(view, ring, tag, Kind::AllGather, b as u64);
        let (mut out, inn) = self.open_ring(view, ring, header).await?;
        let moves: Vec<Move> = ring
            .all_gather_steps()
            .iter()
            .map(|st| Move {
                send: st.send * b..(st.send + 1) * b,
                recv: st.recv * b..(st.recv + 1) * b,
                reduce: false,
            })
            .collect();
        let inn = self.run_ring(&mut out, inn, output, &moves, None).await?;
        self.recycle_outbound(out);
        self.recycle_inbound(inn);
        Ok(())
    }

    /// Broadcast of the root rank's `buf` to every member (a pipelined chain).
    pub async fn broadcast<T: Element>(
        &self,
        view: &View,
        tag: u64,
        buf: &mut [T],
        root: u32,
    ) -> Result<(), DataPlaneError> {
        self.counted(self.broadcast_inner(view, tag, buf, root))
            .await
    }

    async fn broadcast_inner<T: Element>(
        &self,
        view: &View,
        tag: u64,
        buf: &mut [T],
        root: u32,
    ) -> Result<(), DataPlaneError> {
        let ring = Ring::for_view(view, &self.inner.me)?;
        let (recv, send) = ring.broadcast_roles(root)?;
        if ring.n == 1 {
            return Ok(());
        }
        let header = op_header::<T>(view, ring, tag, Kind::Broadcast { root }, buf.len() as u64);
        // The chain uses the ring's links; the last member's link back to the root carries
        // only the header, which keeps the protocol uniform.
        let (mut out, mut inn) = self.open_ring(view, ring, header).await?;
        let seg = (self.inner.cfg.segment_bytes / std::mem::size_of::<T>()).max(1);
        for s in segments(0..buf.len(), seg) {
            if recv {
                let peer = inn.peer.clone();
                self.read_segment(&mut inn.r, &peer, bytes_of_mut(&mut buf[s.clone()]))
                    .await?;
            }
            if send {
                self.write_segment(&mut out, bytes_of(&buf[s])).await?;
            }
        }
        self.recycle_outbound(out);
        self.recycle_inbound(inn);
        Ok(())
    }

    /// Returns once every member of `view` has entered the barrier with the same tag.
    pub async fn barrier(&self, view: &View, tag: u64) -> Result<(), DataPlaneError> {
        let ring = Ring::for_view(view, &self.inner.me)?;
        let mut token = [1.0f32];
        self.all_reduce(view, tag, &mut token, ReduceOp::Sum)
            .await?;
        if token[0] != ring.n as f32 {
            return Err(DataPlaneError::OpMismatch {
                peer: self.inner.me.clone(),
                detail: format!("barrier counted {} of {} members", token[0], ring.n),
            });
        }
        Ok(())
    }
}

/// The header this rank sends to open a collective on `view`.
fn op_header<T: Element>(view: &View, ring: Ring, tag: u64, kind: Kind, len: u64) -> OpHeader {
    OpHeader {
        view_hash: view.hash,
        tag,
        kind,
        dtype: T::DTYPE,
        len,
        n: ring.n as u32,
        rank: ring.rank as u32,
    }
}

/// Segments the inbound reader may run ahead of the ring.
const READ_AHEAD: usize = 4;

/// One ring step over a single buffer.
struct Move {
    send: std::ops::Range<usize>,
    recv: std::ops::Range<usize>,
    reduce: bool,
}

type Filled<T> = tokio::sync::mpsc::Receiver<Result<Vec<T>, DataPlaneError>>;

/// Reads the segments of `lens` from `r` into pooled buffers, ahead of their use. Returns
/// the filled-buffer channel, the free-buffer channel and the task (which yields `r` back).
fn spawn_reader<T: Element>(
    dp: DataPlane,
    peer: NodeId,
    mut r: BoxRead,
    lens: Vec<usize>,
) -> (
    Filled<T>,
    tokio::sync::mpsc::Sender<Vec<T>>,
    tokio::task::JoinHandle<Option<BoxRead>>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(READ_AHEAD);
    let (free_tx, mut free_rx) = tokio::sync::mpsc::channel::<Vec<T>>(READ_AHEAD + 2);
    let handle = tokio::spawn(async move {
        for len in lens {
            let mut b = free_rx.try_recv().unwrap_or_default();
            b.resize(len, T::default());
            let res = dp
                .read_segment(&mut r, &peer, bytes_of_mut(&mut b))
                .await
                .map(|()| b);
            let failed = res.is_err();
            if tx.send(res).await.is_err() || failed {
                return None;
            }
        }
        Some(r)
    });
    (rx, free_tx, handle)
}

/// Borrows `a` immutably and `b` mutably from `buf`; the ranges must not overlap.
fn split_disjoint<T>(
    buf: &mut [T],
    a: std::ops::Range<usize>,
    b: std::ops::Range<usize>,
) -> (&[T], &mut [T]) {
    assert!(a.end <= b.start || b.end <= a.start, "ranges overlap");
    if a.start < b.start {
        let (lo, hi) = buf.split_at_mut(b.start);
        (&lo[a], &mut hi[..b.end - b.start])
    } else {
        let (lo, hi) = buf.split_at_mut(a.start);
        (&hi[..a.end - a.start], &mut lo[b])
    }
}

fn transcript(role: &[u8], nonce_a: &[u8; 32], nonce_b: &[u8; 32], pk: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(32 + 64 + pk.len());
    t.extend_from_slice(b"shoal/data-plane/v1/");
    t.extend_from_slice(role);
    t.extend_from_slice(nonce_a);
    t.extend_from_slice(nonce_b);
    t.extend_from_slice(pk);
    t
}

async fn write_hello<W: AsyncWrite + Unpin>(
    w: &mut W,
    pk: &[u8],
    nonce: &[u8; 32],
) -> std::io::Result<()> {
    let mut b = Vec::with_capacity(5 + 2 + pk.len() + 32);
    b.extend_from_slice(&wire::HELLO_MAGIC);
    b.push(wire::VERSION);
    b.extend_from_slice(&(pk.len() as u16).to_le_bytes());
    b.extend_from_slice(pk);
    b.extend_from_slice(nonce);
    w.write_all(&b).await?;
    w.flush().await
}

/// Reads a handshake's hello (magic, version, length-checked public key, nonce) from an
/// unauthenticated peer. One of the decoders of untrusted bytes the `fuzz/` targets drive.
pub async fn read_hello<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<(Vec<u8>, [u8; 32]), coordinator_free::CodecError> {
    let io = |e: std::io::Error| coordinator_free::CodecError::Malformed(e.to_string());
    let mut prefix = [0u8; 5];
    r.read_exact(&mut prefix).await.map_err(io)?;
    wire::check_hello_prefix(&prefix)?;
    let mut lenb = [0u8; 2];
    r.read_exact(&mut lenb).await.map_err(io)?;
    let len = wire::checked_len(lenb, wire::MAX_PUBLIC_KEY, "public key")?;
    let mut pk = vec![0u8; len];
    r.read_exact(&mut pk).await.map_err(io)?;
    let mut nonce = [0u8; 32];
    r.read_exact(&mut nonce).await.map_err(io)?;
    Ok((pk, nonce))
}

async fn write_sig<W: AsyncWrite + Unpin>(w: &mut W, sig: &[u8]) -> std::io::Result<()> {
    let mut b = Vec::with_capacity(2 + sig.len());
    b.extend_from_slice(&(sig.len() as u16).to_le_bytes());
    b.extend_from_slice(sig);
    w.write_all(&b).await?;
    w.flush().await
}

/// Reads a handshake's length-checked signature (fuzzed like [`read_hello`]).
pub async fn read_sig<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Vec<u8>, coordinator_free::CodecError> {
    let io = |e: std::io::Error| coordinator_free::CodecError::Malformed(e.to_string());
    let mut lenb = [0u8; 2];
    r.read_exact(&mut lenb).await.map_err(io)?;
    let len = wire::checked_len(lenb, wire::MAX_SIGNATURE, "signature")?;
    let mut sig = vec![0u8; len];
    r.read_exact(&mut sig).await.map_err(io)?;
    Ok(sig)
}

fn tcp_socket(addr: SocketAddr, buffer: u32) -> std::io::Result<tokio::net::TcpSocket> {
    let s = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    if buffer > 0 {
        s.set_send_buffer_size(buffer)?;
        s.set_recv_buffer_size(buffer)?;
    }
    Ok(s)
}

fn tcp_listener(addr: SocketAddr, buffer: u32) -> std::io::Result<tokio::net::TcpListener> {
    let s = tcp_socket(addr, buffer)?;
    s.set_reuseaddr(true)?;
    s.bind(addr)?;
    s.listen(128)
}

async fn tcp_connect(addr: SocketAddr, buffer: u32) -> std::io::Result<tokio::net::TcpStream> {
    tcp_socket(addr, buffer)?.connect(addr).await
}

fn quic_transport(cfg: &DataPlaneConfig) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    let mtu = cfg.quic_initial_mtu.max(1200);
    t.initial_mtu(mtu);
    // Let MTU discovery climb to the configured initial MTU where the path allows it.
    let mut discovery = quinn::MtuDiscoveryConfig::default();
    discovery.upper_bound(mtu.max(1452));
    t.mtu_discovery_config(Some(discovery));
    t.stream_receive_window(quinn::VarInt::from_u32(cfg.quic_window));
    t.receive_window(quinn::VarInt::from_u32(cfg.quic_window));
    t.send_window(cfg.quic_window as u64);
    t.max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(
        600_000,
    ))));
    t.keep_alive_interval(Some(Duration::from_secs(10)));
    Arc::new(t)
}

fn quic_endpoint(
    key: &Keypair,
    addr: SocketAddr,
    cfg: &DataPlaneConfig,
) -> Result<quinn::Endpoint, DataPlaneError> {
    let err = |e: &dyn std::fmt::Display| DataPlaneError::Endpoint(e.to_string());
    let tls = libp2p_tls::make_server_config(key).map_err(|e| err(&e))?;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| err(&e))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(quic_transport(cfg));
    let mut endpoint = quinn::EndpointConfig::default();
    endpoint
        .max_udp_payload_size(cfg.quic_initial_mtu.max(1472))
        .map_err(|e| err(&e))?;
    let socket = std::net::UdpSocket::bind(addr).map_err(|e| err(&format!("bind {addr}: {e}")))?;
    // Bulk transfers burst faster than the default 208 KiB UDP buffers drain; drops would
    // throttle the congestion controller. Linux caps these at net.core.{r,w}mem_max.
    set_udp_buffers(&socket, 4 << 20);
    quinn::Endpoint::new(
        endpoint,
        Some(server),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|e| err(&format!("bind {addr}: {e}")))
}

fn set_udp_buffers(socket: &std::net::UdpSocket, bytes: libc::c_int) {
    use std::os::fd::AsRawFd;
    for opt in [libc::SO_RCVBUF, libc::SO_SNDBUF] {
        // SAFETY: a valid socket fd and a c_int option value of the right size.
        let rc = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                (&bytes as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            tracing::debug!(
                "cannot set UDP buffer option {opt}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

fn quic_client_config(
    key: &Keypair,
    peer: PeerId,
    cfg: &DataPlaneConfig,
) -> Result<quinn::ClientConfig, DataPlaneError> {
    let err = |e: &dyn std::fmt::Display| DataPlaneError::Endpoint(e.to_string());
    let tls = libp2p_tls::make_client_config(key, Some(peer)).map_err(|e| err(&e))?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| err(&e))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(quic_transport(cfg));
    Ok(client)
}

fn quic_peer_id(conn: &quinn::Connection) -> Result<PeerId, String> {
    let identity = conn.peer_identity().ok_or("no peer certificate")?;
    let certs = identity
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .map_err(|_| "unexpected peer identity type")?;
    let cert = certs.first().ok_or("empty certificate chain")?;
    let parsed = libp2p_tls::certificate::parse(cert).map_err(|e| e.to_string())?;
    Ok(parsed.peer_id())
}
