//! Authenticating a TCP peer with keys bound to its libp2p identity, before its link may
//! carry anything (QUIC gets the same from libp2p-tls certificates, see `transport/quic.rs`).
//!
//! 1. The dialer sends a hello: magic, version, its public key, a fresh 32-byte nonce.
//! 2. The listener answers with its own hello and its signature over
//!    `"shoal/data-plane/v1/listener" ‖ dialer nonce ‖ listener nonce ‖ dialer key`.
//! 3. The dialer checks that the key is the peer id it meant to reach and the signature,
//!    then signs `"…/dialer" ‖ listener nonce ‖ dialer nonce ‖ listener key`.
//! 4. The listener checks that signature and that the dialer is a member of its current
//!    view, and sends a one-byte verdict (`ACK_OK`, or 0 for a non-member).
//!
//! Fresh nonces on both sides make every signature good for one connection only. The
//! decoders of the peer's bytes ([`read_hello`], [`read_sig`]) are public for the `fuzz/`
//! targets.

use super::links::ACK_OK;
use super::transport::Link;
use super::{DataPlane, DataPlaneError};
use coordinator_free::codec::data as wire;
use coordinator_free::NodeId;
use libp2p::identity::PublicKey;
use libp2p::PeerId;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

impl DataPlane {
    /// Authenticates a dialed connection: the listener must prove to be `expected` and
    /// must accept us as a member of its view.
    pub(super) async fn tcp_handshake_dial(
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
            r: super::transport::BoxRead::Stream(Box::new(r)),
            w: Box::new(w),
        })
    }

    /// Authenticates an accepted connection: the dialer must prove its key and be a member
    /// of the current view (a non-member is told so and refused).
    pub(super) async fn tcp_handshake_accept(
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
            r: super::transport::BoxRead::Stream(Box::new(r)),
            w: Box::new(w),
        })
    }
}

/// The bytes a side signs: the role, both nonces (the signer's peer's first) and the
/// peer's public key.
fn transcript(role: &[u8], nonce_a: &[u8; 32], nonce_b: &[u8; 32], pk: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(32 + 64 + pk.len());
    t.extend_from_slice(b"shoal/data-plane/v1/");
    t.extend_from_slice(role);
    t.extend_from_slice(nonce_a);
    t.extend_from_slice(nonce_b);
    t.extend_from_slice(pk);
    t
}

/// Writes a hello: magic, version, length-prefixed public key, nonce.
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

/// Writes a length-prefixed signature.
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
