//! The TCP transport: sockets (buffer sizes from `tcp_buffer`, default 0 = the kernel's
//! autotuning), the listener, dialing, and the accept loop that authenticates every inbound
//! connection (see `handshake.rs`, bounded by `2 × timeout_floor`) before it may carry a
//! header. Payloads travel unencrypted: for trusted LANs.

use crate::data_plane::DataPlane;
use std::net::SocketAddr;

impl DataPlane {
    /// Accepts inbound connections for as long as the data plane lives; each is
    /// authenticated (refused and counted if that fails or times out), then reads headers.
    pub(in crate::data_plane) async fn tcp_accept_loop(self, l: tokio::net::TcpListener) {
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
}

/// A socket for `addr`'s address family with `buffer`-byte send and receive buffers
/// (0: the kernel's autotuning).
fn socket(addr: SocketAddr, buffer: u32) -> std::io::Result<tokio::net::TcpSocket> {
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

/// A listener on `addr` (address reuse on, backlog 128).
pub(in crate::data_plane) fn listener(
    addr: SocketAddr,
    buffer: u32,
) -> std::io::Result<tokio::net::TcpListener> {
    let s = socket(addr, buffer)?;
    s.set_reuseaddr(true)?;
    s.bind(addr)?;
    s.listen(128)
}

/// Connects to `addr`.
pub(super) async fn connect(
    addr: SocketAddr,
    buffer: u32,
) -> std::io::Result<tokio::net::TcpStream> {
    socket(addr, buffer)?.connect(addr).await
}
