//! `shoal up`: runs a node (join the swarm, take part in the membership, serve the local
//! API) with the data dir locked for the node's life, so two nodes never share one
//! identity. `--device` is resolved first: a device this machine does not have (CUDA
//! without one) ends it with exit code 1 and one line, never a fall-back to the CPU.

use crate::failure::{usage, Failure};
use anyhow::anyhow;
use clap::Args;
use libp2p::Multiaddr;
use shoal_node::control_plane::ControlPlaneConfig;
use shoal_node::identity;
use shoal_node::node::{NodeConfig, NodeError};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Args)]
pub struct UpArgs {
    /// Data dir: identity key (mode 0600), incarnation, address files.
    /// Default: $XDG_DATA_HOME/shoal or ~/.local/share/shoal.
    #[arg(long, env = "SHOAL_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Control-plane listen multiaddr (repeatable).
    /// Default: /ip4/0.0.0.0/tcp/4411 and /ip4/0.0.0.0/udp/4411/quic-v1 (all interfaces).
    #[arg(long, env = "SHOAL_LISTEN", value_delimiter = ',')]
    listen: Vec<String>,
    /// Bootstrap peer multiaddr, ideally ending in /p2p/<peer id> (repeatable).
    #[arg(long, env = "SHOAL_BOOTSTRAP", value_delimiter = ',')]
    bootstrap: Vec<String>,
    /// Turn off mDNS discovery (on by default).
    #[arg(long, env = "SHOAL_NO_MDNS")]
    no_mdns: bool,
    /// Private network: only peers holding this pnet swarm key can connect (QUIC is off).
    #[arg(long, env = "SHOAL_SWARM_KEY")]
    swarm_key: Option<PathBuf>,
    /// Local HTTP JSON API address; loopback only. Default: 127.0.0.1:4412.
    #[arg(long, env = "SHOAL_API", default_value = "127.0.0.1:4412")]
    api: SocketAddr,
    /// Most established connections. Default: 256.
    #[arg(long, env = "SHOAL_MAX_CONNECTIONS", default_value_t = 256)]
    max_connections: u32,
    /// Heartbeat interval in ms. Default: 250.
    #[arg(long, env = "SHOAL_HEARTBEAT_MS", default_value_t = 250)]
    heartbeat_ms: u64,
    /// Silence before a member is suspected, in ms. Default: 750.
    #[arg(long, env = "SHOAL_SUSPECT_MS", default_value_t = 750)]
    suspect_ms: u64,
    /// Silence before a member is failed and leaves the view, in ms. Default: 1500.
    #[arg(long, env = "SHOAL_FAIL_MS", default_value_t = 1500)]
    fail_ms: u64,
    /// Expose debug endpoints on the local API (for tests and benchmarks).
    #[arg(long, env = "SHOAL_DEBUG_API", hide = true)]
    debug_api: bool,
    /// Bearer token the serving API (/v1/completions, /v1/models, /v1/infer, /v1/serve)
    /// requires, on the local API and on --serve-listen. Default: none.
    #[arg(long, env = "SHOAL_API_TOKEN")]
    api_token: Option<String>,
    /// Also serve the OpenAI-compatible routes alone (/v1/completions, /v1/models) on this
    /// address, for clients on the LAN (port 0: any; the bound address is written to
    /// serve.addr in the data dir). An address other machines can reach (not loopback)
    /// needs --api-token. Default: none (the routes are on the local API only).
    #[arg(long, env = "SHOAL_SERVE_LISTEN")]
    serve_listen: Option<SocketAddr>,
    /// Serving: most requests batched together. Default: 8.
    #[arg(long, env = "SHOAL_SERVE_MAX_BATCH", default_value_t = 8)]
    serve_max_batch: usize,
    /// Serving: longest a request waits to be batched, in ms. Default: 5.
    #[arg(long, env = "SHOAL_SERVE_MAX_WAIT_MS", default_value_t = 5)]
    serve_max_wait_ms: u64,
    /// Serving: most prompt tokens (rows × the longest prompt, padding included) in one
    /// prefill call; a lane starts more rows in several calls, so that no call holds a
    /// stage for long (a longer prompt goes alone). Default: 1024.
    #[arg(long, env = "SHOAL_SERVE_PREFILL_TOKENS", default_value_t = 1024)]
    serve_prefill_tokens: usize,
    /// Serving: torch threads for stage compute (0: libtorch's default). Default: 0.
    #[arg(long, env = "SHOAL_SERVE_THREADS", default_value_t = 0)]
    serve_threads: usize,
    /// Serving: responses kept for repeated deterministic requests. Default: 1024.
    #[arg(long, env = "SHOAL_SERVE_CACHE", default_value_t = 1024)]
    serve_cache: usize,
    /// Compute device for serving (and announced to the swarm with its free memory and
    /// speed): auto (the first CUDA device when libtorch sees one, else the CPU), cpu,
    /// cuda (device 0) or cuda:N. Asking for CUDA where there is none is an error, never a
    /// fall-back. Default: auto.
    #[arg(long, env = "SHOAL_DEVICE", default_value = "auto")]
    device: shoal_node::device::DeviceSpec,
    /// Data-plane listen address. Default: 0.0.0.0:4413 (all interfaces).
    #[arg(long, env = "SHOAL_DATA_LISTEN", default_value = "0.0.0.0:4413")]
    data_listen: SocketAddr,
    /// Data-plane transport: quic (encrypted; for untrusted networks) or tcp
    /// (authenticated, unencrypted; for trusted LANs). Default: quic.
    #[arg(long, env = "SHOAL_DATA_PLANE", default_value = "quic")]
    data_plane: shoal_node::data_plane::DataTransport,
    /// QUIC initial MTU in bytes. Default: 1200 (safe on any path).
    #[arg(long, env = "SHOAL_QUIC_INITIAL_MTU", default_value_t = 1200)]
    quic_initial_mtu: u16,
    /// The largest QUIC datagram MTU discovery searches up to (UDP payload bytes, up to
    /// 65507; 8972 for jumbo frames). Default: 1452 (an Ethernet path).
    #[arg(long, env = "SHOAL_QUIC_MAX_MTU", default_value_t = 1452)]
    quic_max_mtu: u16,
    /// QUIC flow-control windows in bytes (per stream and per connection; at least 64 KiB):
    /// the most unacknowledged data in flight on a link, so at least the link's rate times
    /// its round trip. Default: 67108864 (64 MiB).
    #[arg(long, env = "SHOAL_QUIC_WINDOW", default_value_t = 64 << 20,
          value_parser = clap::value_parser!(u32).range(65536..))]
    quic_window: u32,
    /// Data-plane TCP socket buffers in bytes (0: kernel autotuning). Default: 0.
    #[arg(long, env = "SHOAL_TCP_BUFFER", default_value_t = 0)]
    tcp_buffer: u32,
    /// Data-plane pipelining segment in bytes. Default: 1048576.
    #[arg(long, env = "SHOAL_SEGMENT_BYTES", default_value_t = 1 << 20)]
    segment_bytes: usize,
}

/// The data dir when none is given: `$XDG_DATA_HOME/shoal`, else `~/.local/share/shoal`.
pub fn default_data_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(x).join("shoal");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    PathBuf::from(home).join(".local/share/shoal")
}

/// Parses the multiaddrs given to `flag`; a malformed one is bad usage.
pub fn parse_addrs(flag: &str, values: &[String]) -> Result<Vec<Multiaddr>, Failure> {
    values
        .iter()
        .map(|v| {
            v.trim()
                .parse::<Multiaddr>()
                .map_err(|e| usage(anyhow!("invalid {flag} address '{v}': {e}")))
        })
        .collect()
}

/// `shoal up`: locks the data dir (a second node on it exits 1 at once), then runs the
/// node until it stops.
pub async fn up(a: UpArgs) -> Result<(), Failure> {
    let api_token = a.api_token.filter(|t| !t.is_empty());
    // Before anything is created or bound: a LAN listener without a token never starts.
    if let Some(addr) = a.serve_listen {
        if !addr.ip().is_loopback() && api_token.is_none() {
            return Err(usage(NodeError::ServeListenNeedsToken(addr).into()));
        }
    }
    let device = a.device.resolve().map_err(anyhow::Error::from)?;
    let listen = if a.listen.is_empty() {
        vec![
            "/ip4/0.0.0.0/tcp/4411".parse().expect("valid"),
            "/ip4/0.0.0.0/udp/4411/quic-v1".parse().expect("valid"),
        ]
    } else {
        parse_addrs("--listen", &a.listen)?
    };
    let bootstrap = parse_addrs("--bootstrap", &a.bootstrap)?;
    let swarm_key = match &a.swarm_key {
        Some(p) => Some(identity::read_swarm_key(p).map_err(|e| usage(e.into()))?),
        None => None,
    };
    let data_dir = a.data_dir.unwrap_or_else(default_data_dir);
    // Held until the node stops; the kernel releases it however the process ends.
    let _lock = identity::lock_data_dir(&data_dir).map_err(|e| match e {
        identity::IdentityError::Locked { .. } => Failure::from(anyhow::Error::from(e)),
        e => usage(e.into()),
    })?;
    let mut serve = shoal_node::serve::ServeConfig::new(&data_dir);
    serve.api_token = api_token;
    serve.max_batch = a.serve_max_batch.max(1);
    serve.max_wait_ms = a.serve_max_wait_ms;
    serve.prefill_tokens = a.serve_prefill_tokens;
    serve.cache_entries = a.serve_cache;
    serve.threads = a.serve_threads;
    let cfg = NodeConfig {
        data_dir,
        listen,
        bootstrap,
        api: a.api,
        serve_listen: a.serve_listen,
        control: ControlPlaneConfig {
            mdns: !a.no_mdns,
            swarm_key,
            max_connections: a.max_connections,
            ..Default::default()
        },
        membership: coordinator_free::MembershipConfig {
            heartbeat_interval_ms: a.heartbeat_ms,
            heartbeat_jitter_ms: (a.heartbeat_ms / 5).min(50),
            suspect_after_ms: a.suspect_ms,
            fail_after_ms: a.fail_ms,
            ..Default::default()
        },
        debug_api: a.debug_api,
        data_listen: a.data_listen,
        data_plane: shoal_node::data_plane::DataPlaneConfig {
            transport: a.data_plane,
            quic_initial_mtu: a.quic_initial_mtu,
            quic_max_mtu: a.quic_max_mtu,
            quic_window: a.quic_window,
            segment_bytes: a.segment_bytes.max(4096),
            tcp_buffer: a.tcp_buffer,
            ..Default::default()
        },
        device,
        serve,
    };
    shoal_node::node::run(cfg).await.map_err(|e| match e {
        NodeError::Identity(_)
        | NodeError::Timings(_)
        | NodeError::ApiNotLoopback(_)
        | NodeError::ServeListenNeedsToken(_) => usage(e.into()),
        other => Failure::from(anyhow::Error::from(other)),
    })
}
