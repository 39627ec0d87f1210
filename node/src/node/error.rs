//! Why a node could not start or stopped: [`NodeError`], the one error type of the node's
//! startup, its event loop and its command handle.

use crate::control_plane;
use crate::data_plane::DataPlaneError;
use crate::identity;
use libp2p::Multiaddr;
use std::net::SocketAddr;

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
    /// The serving listener is not on a loopback address and no API token is set.
    #[error("--serve-listen {0} is reachable from other machines: it needs --api-token (or a loopback address)")]
    ServeListenNeedsToken(SocketAddr),
    /// The serving listener could not be bound.
    #[error("cannot bind the serving listener on {addr}: {source}")]
    ServeListen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
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

/// The error and its sources as one line (`a: b: c`), each source once.
pub(super) fn error_chain(e: &dyn std::error::Error) -> String {
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
