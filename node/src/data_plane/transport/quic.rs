//! The QUIC transport (quinn): endpoint and transport settings (initial MTU, also the floor
//! after a suspected black hole; MTU discovery up to a configured bound, GSO batches split
//! so each send fits one UDP send; an initial congestion window of at least two datagrams; ACKs
//! every 8 packets; flow-control windows, 4 MiB UDP buffers, 10-minute idle timeout, 10 s
//! keep-alive), libp2p-tls certificates on both sides so the TLS handshake itself proves
//! each peer's libp2p identity (the TLS configs, AES-GCM first, are in `tls.rs`), the
//! accept loop that refuses non-members, and the cache of outbound connections (one per
//! member; every link is a new bidirectional stream on it).

use super::Link;
use crate::data_plane::{DataPlane, DataPlaneConfig, DataPlaneError};
use coordinator_free::NodeId;
use libp2p::identity::Keypair;
use libp2p::PeerId;
use std::io::IoSliceMut;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

impl DataPlane {
    /// Accepts inbound connections for as long as the endpoint lives. A connection whose
    /// certificate names no peer, or a peer outside the current view, is refused and
    /// counted; an accepted one is remembered (so it can be closed when the peer leaves)
    /// and each of its streams reads headers.
    pub(in crate::data_plane) async fn quic_accept_loop(self) {
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
                let peer = match peer_id(&conn) {
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
                        r: super::BoxRead::Quic(r),
                        w: Box::new(w),
                    };
                    let d2 = d.clone();
                    tokio::spawn(async move { d2.read_headers(link).await });
                }
            });
        }
    }

    /// The current path MTU (UDP payload bytes, as MTU discovery left it) of each cached
    /// outbound QUIC connection; empty on TCP.
    pub async fn quic_path_mtus(&self) -> Vec<u16> {
        let conns = self.inner.quic_conns.lock().await;
        conns.values().map(|c| c.stats().path.current_mtu).collect()
    }

    /// The cached connection to `peer`, or a new one to `addr` that must prove to be
    /// `expected`. The cache's lock is held across the dial, so concurrent links to one
    /// peer share one connection.
    pub(super) async fn quic_connection(
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
        let client = client_config(&self.inner.key, expected, &self.inner.cfg)?;
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
}

/// The largest initial MTU: quinn encodes the length of a long-header (handshake) packet in
/// two bytes and panics on 16,384 or more, and the initial MTU pads handshake datagrams.
/// Short-header (1-RTT) packets carry no length, so MTU discovery may go higher.
const MAX_INITIAL_MTU: u16 = 16_000;

/// The most payload bytes one UDP send carries over IPv4, also the largest MTU discovery
/// may search up to (a 65,536-byte loopback MTU less the IPv4 and UDP headers). A GSO batch
/// larger than this is refused by the kernel (EMSGSIZE), which quinn counts as sent, so the
/// whole batch would be lost (measured: 10 × 8192-byte datagrams, 40% of packets lost on
/// loopback); [`GsoSplit`] sends such a batch as several sends.
const MAX_UDP_SEND: usize = 65_507;

/// Ack-eliciting packets the peer may receive before it must acknowledge (quinn's ACK
/// frequency extension; quinn's default is 1, an ACK for every other packet). Every ACK is
/// a packet to build, encrypt, send, receive and process; with 8, a bulk transfer pays for
/// a fourth as many (screened on loopback with 16,000-byte datagrams: at n = 3 1.48–1.68
/// CPU-s per GB against 1.43–2.12 without, within a shared machine's noise).
/// The peer still acknowledges within its max_ack_delay (25 ms by default) and at once on
/// reordering.
const ACK_ELICITING_THRESHOLD: u32 = 8;

/// The MTU the data plane starts with: the configured one within 1200..=[`MAX_INITIAL_MTU`].
fn initial_mtu(cfg: &DataPlaneConfig) -> u16 {
    cfg.quic_initial_mtu.clamp(1200, MAX_INITIAL_MTU)
}

/// The largest datagram this side sends or accepts, also MTU discovery's upper bound: the
/// configured one within [`initial_mtu`]..=[`MAX_UDP_SEND`], or 1452 (quinn's default
/// bound, an Ethernet path) if that is larger.
fn max_mtu(cfg: &DataPlaneConfig) -> u16 {
    let most = MAX_UDP_SEND as u16;
    cfg.quic_max_mtu.clamp(initial_mtu(cfg), most).max(1452)
}

/// Transport settings shared by both sides. The initial MTU is also the floor quinn falls
/// back to when it suspects a black hole: losses under congestion look like one to it, and
/// falling back to 1200 bytes on loopback cost 7x the packets (measured: one spurious
/// detection per run, MTU 8192 -> 1200 for the rest of it). MTU discovery searches up to
/// [`max_mtu`] (probes that a path cannot carry are merely lost, and they are not subject
/// to congestion control). The initial congestion window holds at least two datagrams of
/// the initial MTU; quinn raises it to two of the discovered one.
fn transport_config(cfg: &DataPlaneConfig) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    let mtu = initial_mtu(cfg);
    t.initial_mtu(mtu);
    t.min_mtu(mtu);
    let mut discovery = quinn::MtuDiscoveryConfig::default();
    discovery.upper_bound(max_mtu(cfg));
    t.mtu_discovery_config(Some(discovery));
    t.stream_receive_window(quinn::VarInt::from_u32(cfg.quic_window));
    t.receive_window(quinn::VarInt::from_u32(cfg.quic_window));
    t.send_window(cfg.quic_window as u64);
    t.max_idle_timeout(Some(quinn::IdleTimeout::from(quinn::VarInt::from_u32(
        600_000,
    ))));
    t.keep_alive_interval(Some(Duration::from_secs(10)));
    // quinn's initial congestion window (14,720 bytes) is smaller than one datagram of more
    // than that, and nothing would ever be sent; RFC 9002's rule instead:
    // min(10 × size, max(2 × size, 14720)).
    let size = u64::from(mtu);
    let mut cubic = quinn::congestion::CubicConfig::default();
    cubic.initial_window((2 * size).max(14_720).min(10 * size));
    t.congestion_controller_factory(Arc::new(cubic));
    let mut ack = quinn::AckFrequencyConfig::default();
    ack.ack_eliciting_threshold(quinn::VarInt::from_u32(ACK_ELICITING_THRESHOLD));
    t.ack_frequency_config(Some(ack));
    Arc::new(t)
}

/// quinn's UDP socket, except that a GSO batch larger than one UDP send carries
/// ([`MAX_UDP_SEND`]) goes out as several sends of whole datagrams. quinn batches up to 10
/// datagrams of the current MTU, which MTU discovery may raise past what one send holds.
#[derive(Debug)]
struct GsoSplit {
    inner: Arc<dyn quinn::AsyncUdpSocket>,
}

impl quinn::AsyncUdpSocket for GsoSplit {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn quinn::UdpPoller>> {
        self.inner.clone().create_io_poller()
    }
    /// An error on the first send is the batch's (quinn retries the whole batch after
    /// `WouldBlock`); after that, the rest of the batch counts as sent and, if it was not,
    /// as lost, which QUIC's loss recovery resends (retrying would resend the part that
    /// went out, and might never get past it).
    fn try_send(&self, transmit: &quinn::udp::Transmit) -> std::io::Result<()> {
        let per_send = match transmit.segment_size {
            Some(size) if transmit.contents.len() > MAX_UDP_SEND => {
                (MAX_UDP_SEND / size).max(1) * size
            }
            _ => return self.inner.try_send(transmit),
        };
        for (i, part) in transmit.contents.chunks(per_send).enumerate() {
            let one = quinn::udp::Transmit {
                destination: transmit.destination,
                ecn: transmit.ecn,
                contents: part,
                segment_size: transmit.segment_size.filter(|&s| part.len() > s),
                src_ip: transmit.src_ip,
            };
            match self.inner.try_send(&one) {
                Ok(()) => {}
                Err(e) if i == 0 => return Err(e),
                Err(_) => break,
            }
        }
        Ok(())
    }
    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> Poll<std::io::Result<usize>> {
        self.inner.poll_recv(cx, bufs, meta)
    }
    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }
    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }
    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

/// The endpoint bound to `addr`: it accepts connections (server side, with this node's
/// certificate) and dials them (with [`client_config`]).
pub(in crate::data_plane) fn endpoint(
    key: &Keypair,
    addr: SocketAddr,
    cfg: &DataPlaneConfig,
) -> Result<quinn::Endpoint, DataPlaneError> {
    let err = |e: &dyn std::fmt::Display| DataPlaneError::Endpoint(e.to_string());
    let tls = super::tls::server_config(key).map_err(|e| err(&e))?;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).map_err(|e| err(&e))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(transport_config(cfg));
    let mut endpoint = quinn::EndpointConfig::default();
    endpoint
        .max_udp_payload_size(max_mtu(cfg))
        .map_err(|e| err(&e))?;
    let socket = std::net::UdpSocket::bind(addr).map_err(|e| err(&format!("bind {addr}: {e}")))?;
    // Bulk transfers burst faster than the default 208 KiB UDP buffers drain; drops would
    // throttle the congestion controller. Linux caps these at net.core.{r,w}mem_max.
    set_udp_buffers(&socket, 4 << 20);
    let runtime = Arc::new(quinn::TokioRuntime);
    let socket = quinn::Runtime::wrap_udp_socket(&*runtime, socket)
        .map_err(|e| err(&format!("bind {addr}: {e}")))?;
    let socket = Arc::new(GsoSplit { inner: socket });
    quinn::Endpoint::new_with_abstract_socket(endpoint, Some(server), socket, runtime)
        .map_err(|e| err(&format!("bind {addr}: {e}")))
}

/// Sets the socket's UDP receive and send buffers (best effort; failures are logged).
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

/// Client settings for dialing `peer`: the TLS handshake fails unless the certificate
/// proves that peer id.
fn client_config(
    key: &Keypair,
    peer: PeerId,
    cfg: &DataPlaneConfig,
) -> Result<quinn::ClientConfig, DataPlaneError> {
    let err = |e: &dyn std::fmt::Display| DataPlaneError::Endpoint(e.to_string());
    let tls = super::tls::client_config(key, peer).map_err(|e| err(&e))?;
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| err(&e))?;
    let mut client = quinn::ClientConfig::new(Arc::new(crypto));
    client.transport_config(transport_config(cfg));
    Ok(client)
}

/// The libp2p peer id the connection's certificate proves.
fn peer_id(conn: &quinn::Connection) -> Result<PeerId, String> {
    let identity = conn.peer_identity().ok_or("no peer certificate")?;
    let certs = identity
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .map_err(|_| "unexpected peer identity type")?;
    let cert = certs.first().ok_or("empty certificate chain")?;
    super::tls::prove(cert, &certs[1..]).map_err(|e| e.to_string())
}
