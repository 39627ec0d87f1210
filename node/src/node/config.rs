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
    /// A second listener for the OpenAI-compatible routes alone (`/v1/completions`,
    /// `/v1/models`; `shoal up --serve-listen`), for clients on the LAN. A non-loopback
    /// address needs [`ServeConfig::api_token`](crate::serve::ServeConfig::api_token).
    /// Default: none.
    pub serve_listen: Option<SocketAddr>,
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
    /// The device this node computes on (`shoal up --device`, resolved at start-up by
    /// [`crate::device::DeviceSpec::resolve`]; the CLI's default `auto` is the first CUDA
    /// device when libtorch sees one, else the CPU). Serving builds its stages there and
    /// heartbeats announce it with its free memory and measured speed.
    pub device: tch::Device,
    /// Serving settings (batching, cache, API token). `node::run` sets its `device` to
    /// [`device`](Self::device).
    pub serve: crate::serve::ServeConfig,
}
