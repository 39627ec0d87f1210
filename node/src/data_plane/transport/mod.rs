//! Transports: which one carries the data plane ([`DataTransport`]), the link type every
//! part of the data plane reads and writes ([`Link`]), and the one way to reach a member:
//! [`DataPlane::open_link`] takes a pooled TCP link or dials a new authenticated one (TCP:
//! connect and handshake; QUIC: a new stream on the cached connection), within
//! `2 × timeout_floor`. After a collective its links are recycled (TCP: the outbound link
//! back to the pool, the inbound one back to reading headers; QUIC: streams are dropped,
//! connections stay cached). The sockets, endpoints and accept loops are in `tcp.rs` and
//! `quic.rs`; QUIC's TLS settings (libp2p-tls identity checks, AES-GCM first) in `tls.rs`.

pub(super) mod quic;
pub(super) mod tcp;
mod tls;

use super::{DataPlane, DataPlaneError};
use coordinator_free::NodeId;
use libp2p::PeerId;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Which transport carries the data plane: the core's [`coordinator_free::Transport`]
/// (`quic`, the default, or `tcp`), the same type members announce in their addresses.
pub use coordinator_free::Transport as DataTransport;

/// The reading half of a link: any byte stream (TCP), or a QUIC stream kept as itself so
/// the ring can take quinn's received chunks without copying them
/// ([`read_chunks_exact`]).
pub(super) enum BoxRead {
    /// A byte stream read through `AsyncRead` (TCP).
    Stream(Box<dyn AsyncRead + Send + Unpin>),
    /// A QUIC stream.
    Quic(quinn::RecvStream),
}

impl AsyncRead for BoxRead {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            BoxRead::Stream(r) => Pin::new(r).poll_read(cx, buf),
            BoxRead::Quic(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

/// Reads exactly `len` bytes from a QUIC stream as the chunks quinn received them in (no
/// copy: each chunk is a slice of a received datagram). At most `len` bytes are taken from
/// the stream; a stream that ends first is an `UnexpectedEof` error. The caller bounds the
/// wait.
pub(super) async fn read_chunks_exact(
    r: &mut quinn::RecvStream,
    len: usize,
) -> std::io::Result<Vec<bytes::Bytes>> {
    let mut chunks = Vec::new();
    let mut got = 0;
    while got < len {
        match r.read_chunk(len - got, true).await? {
            Some(c) => {
                got += c.bytes.len();
                chunks.push(c.bytes);
            }
            None => return Err(std::io::ErrorKind::UnexpectedEof.into()),
        }
    }
    Ok(chunks)
}

/// The writing half of a link.
pub(super) type BoxWrite = Box<dyn AsyncWrite + Send + Unpin>;

/// One authenticated, ordered byte stream to or from a member.
pub(super) struct Link {
    /// The member at the other end.
    pub(super) peer: NodeId,
    /// Bytes from the member.
    pub(super) r: BoxRead,
    /// Bytes to the member.
    pub(super) w: BoxWrite,
}

impl DataPlane {
    /// A link to `peer` (a member of the current roster): a pooled TCP link if one is idle,
    /// otherwise a new authenticated one, within `2 × timeout_floor`.
    pub(super) async fn open_link(&self, peer: &NodeId) -> Result<Link, DataPlaneError> {
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
                    let sock = tcp::connect(addr, self.inner.cfg.tcp_buffer)
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
                        r: BoxRead::Quic(r),
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

    /// Hands back the outbound link of a finished collective for reuse.
    pub(super) fn recycle_outbound(&self, link: Link) {
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

    /// Hands back the inbound link of a finished collective: TCP links go back to waiting
    /// for their next header.
    pub(super) fn recycle_inbound(&self, link: Link) {
        if self.inner.cfg.transport == DataTransport::Tcp {
            let d = self.clone();
            tokio::spawn(async move { d.read_headers(link).await });
        }
    }
}
