//! [`NodeConfig`]: everything a node needs to start (what `shoal up` parses its flags into).

use crate::control_plane::ControlPlaneConfig;
use crate::data_plane::DataPlaneConfig;
use coordinator_free::MembershipConfig;
use libp2p::Multiaddr;
use std::net::SocketAddr;
use std::path::PathBuf;

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
