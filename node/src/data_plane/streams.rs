//! Service streams: authenticated byte streams between two members that other modules open
//! for their own protocols (serving's stage RPC). A stream is a data-plane link whose first
//! header names a service instead of a collective; the receiver acknowledges it if an
//! acceptor is registered ([`DataPlane::accept_streams`]) and refuses it otherwise. Framing
//! is the service's business; its traffic is added to the byte counters by the service
//! ([`DataPlane::count_bytes`]).

use super::links::{ACK_OK, ACK_OP_MISMATCH};
use super::transport::Link;
use super::{DataPlane, DataPlaneError};
use coordinator_free::codec::data::OpHeader;
use coordinator_free::collective::Kind;
use coordinator_free::{DType, NodeId};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

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

impl DataPlane {
    /// Hands an inbound service stream to its acceptor (acknowledged), or refuses it.
    pub(super) async fn deliver_stream(&self, mut link: Link, service: u32) {
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
                r: Box::new(link.r),
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
                r: Box::new(link.r),
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
}
