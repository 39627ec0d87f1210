//! The libp2p control plane: transports, behaviours and limits.
//!
//! TCP (+ Noise + yamux) always; QUIC too unless a swarm key is set. libp2p's pnet wraps
//! stream transports only and QUIC brings its own TLS, so a node with a swarm key runs
//! without QUIC rather than accept connections that skip the key.

use coordinator_free::codec::MAX_CONTROL_MESSAGE;
use libp2p::core::upgrade::Version;
use libp2p::gossipsub::{self, IdentTopic, MessageAuthenticity, ValidationMode};
use libp2p::identity::Keypair;
use libp2p::kad::{self, store::MemoryStore};
use libp2p::pnet::{PnetConfig, PreSharedKey};
use libp2p::swarm::{behaviour::toggle::Toggle, NetworkBehaviour};
use libp2p::{
    connection_limits, identify, mdns, noise, ping, tcp, yamux, PeerId, StreamProtocol, Swarm,
    Transport,
};
use std::time::Duration;

/// The gossip topic carrying control messages (heartbeats).
pub const CONTROL_TOPIC: &str = "shoal/control/1";
/// Identify protocol version; peers announcing another are not shoal nodes.
pub const PROTOCOL_VERSION: &str = "/shoal/1.0.0";
/// Kademlia protocol name (a private DHT, separate from IPFS's).
pub const KAD_PROTOCOL: &str = "/shoal/kad/1.0.0";

/// Limits and switches for the swarm.
#[derive(Clone, Debug)]
pub struct ControlPlaneConfig {
    /// Run mDNS discovery. Default: true (`--no-mdns` turns it off).
    pub mdns: bool,
    /// Private-network key; when set, QUIC is off and every TCP connection must prove it.
    /// Default: none.
    pub swarm_key: Option<PreSharedKey>,
    /// Most established connections in total. Default: 256.
    pub max_connections: u32,
    /// Most established connections per peer. Default: 4.
    pub max_connections_per_peer: u32,
    /// Most connections still handshaking, inbound. Default: 64.
    pub max_pending_incoming: u32,
    /// Gossipsub heartbeat interval. Default: 250 ms.
    pub gossip_heartbeat: Duration,
    /// Close connections idle this long. Default: 60 s.
    pub idle_timeout: Duration,
}

impl Default for ControlPlaneConfig {
    fn default() -> Self {
        ControlPlaneConfig {
            mdns: true,
            swarm_key: None,
            max_connections: 256,
            max_connections_per_peer: 4,
            max_pending_incoming: 64,
            gossip_heartbeat: Duration::from_millis(250),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// Why the swarm could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    /// A transport could not be created.
    #[error("transport: {0}")]
    Transport(String),
    /// The gossipsub configuration was rejected.
    #[error("gossipsub: {0}")]
    Gossipsub(String),
    /// mDNS could not start (no usable interface or socket).
    #[error("mdns: {0}")]
    Mdns(String),
}

/// The composed behaviour of a shoal node.
#[derive(NetworkBehaviour)]
pub struct Behaviour {
    /// Connection limits (checked first).
    pub limits: connection_limits::Behaviour,
    /// Exchanges listen addresses and protocol versions.
    pub identify: identify::Behaviour,
    /// Keeps connections alive and measures RTT.
    pub ping: ping::Behaviour,
    /// Peer discovery beyond the LAN, from bootstrap peers.
    pub kad: kad::Behaviour<MemoryStore>,
    /// Membership heartbeats.
    pub gossipsub: gossipsub::Behaviour,
    /// LAN discovery (optional).
    pub mdns: Toggle<mdns::tokio::Behaviour>,
}

/// Builds the swarm for `key` with `cfg`.
pub fn build_swarm(
    key: Keypair,
    cfg: &ControlPlaneConfig,
) -> Result<Swarm<Behaviour>, ControlPlaneError> {
    let behaviour = |key: &Keypair| -> Result<Behaviour, ControlPlaneError> {
        let peer_id = key.public().to_peer_id();
        let gossip_cfg = gossipsub::ConfigBuilder::default()
            .heartbeat_interval(cfg.gossip_heartbeat)
            .validation_mode(ValidationMode::Strict)
            .validate_messages()
            // The envelope (signature, key, topic) adds well under 1 KiB to the payload.
            .max_transmit_size(MAX_CONTROL_MESSAGE + 1024)
            .build()
            .map_err(|e| ControlPlaneError::Gossipsub(e.to_string()))?;
        let gossipsub =
            gossipsub::Behaviour::new(MessageAuthenticity::Signed(key.clone()), gossip_cfg)
                .map_err(|e| ControlPlaneError::Gossipsub(e.to_string()))?;
        let mut kad_cfg = kad::Config::new(StreamProtocol::new(KAD_PROTOCOL));
        kad_cfg.set_query_timeout(Duration::from_secs(30));
        let mut kad = kad::Behaviour::with_config(peer_id, MemoryStore::new(peer_id), kad_cfg);
        // Serve the DHT even without a confirmed external address (LANs, loopback).
        kad.set_mode(Some(kad::Mode::Server));
        let mdns = if cfg.mdns {
            Some(
                mdns::tokio::Behaviour::new(mdns::Config::default(), peer_id)
                    .map_err(|e| ControlPlaneError::Mdns(e.to_string()))?,
            )
        } else {
            None
        };
        let limits = connection_limits::ConnectionLimits::default()
            .with_max_established(Some(cfg.max_connections))
            .with_max_established_per_peer(Some(cfg.max_connections_per_peer))
            .with_max_pending_incoming(Some(cfg.max_pending_incoming));
        Ok(Behaviour {
            limits: connection_limits::Behaviour::new(limits),
            identify: identify::Behaviour::new(
                identify::Config::new(PROTOCOL_VERSION.into(), key.public())
                    .with_interval(Duration::from_secs(60)),
            ),
            ping: ping::Behaviour::new(ping::Config::new().with_interval(Duration::from_secs(5))),
            kad,
            gossipsub,
            mdns: mdns.into(),
        })
    };
    let transport_err = |e: &dyn std::fmt::Display| ControlPlaneError::Transport(e.to_string());
    let idle = cfg.idle_timeout;
    let swarm = match cfg.swarm_key {
        None => libp2p::SwarmBuilder::with_existing_identity(key)
            .with_tokio()
            .with_tcp(
                tcp::Config::default().nodelay(true),
                noise::Config::new,
                yamux::Config::default,
            )
            .map_err(|e| transport_err(&e))?
            .with_quic()
            .with_behaviour(|k| {
                behaviour(k).map_err(Box::<dyn std::error::Error + Send + Sync>::from)
            })
            .map_err(|e| ControlPlaneError::Transport(e.to_string()))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
            .build(),
        Some(psk) => libp2p::SwarmBuilder::with_existing_identity(key)
            .with_tokio()
            .with_other_transport(|k| -> Result<_, Box<dyn std::error::Error + Send + Sync>> {
                let noise = noise::Config::new(k)?;
                Ok(
                    tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
                        .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
                        .upgrade(Version::V1Lazy)
                        .authenticate(noise)
                        .multiplex(yamux::Config::default())
                        .timeout(Duration::from_secs(20)),
                )
            })
            .map_err(|e| transport_err(&e))?
            .with_behaviour(|k| {
                behaviour(k).map_err(Box::<dyn std::error::Error + Send + Sync>::from)
            })
            .map_err(|e| ControlPlaneError::Transport(e.to_string()))?
            .with_swarm_config(|c| c.with_idle_connection_timeout(idle))
            .build(),
    };
    Ok(swarm)
}

/// The control topic.
pub fn control_topic() -> IdentTopic {
    IdentTopic::new(CONTROL_TOPIC)
}

/// Splits a trailing `/p2p/<id>` off a multiaddr.
pub fn split_peer_id(addr: &libp2p::Multiaddr) -> (libp2p::Multiaddr, Option<PeerId>) {
    let mut a = addr.clone();
    match a.pop() {
        Some(libp2p::multiaddr::Protocol::P2p(id)) => (a, Some(id)),
        Some(other) => {
            a.push(other);
            (a, None)
        }
        None => (a, None),
    }
}

/// Whether `addr` uses QUIC.
pub fn is_quic(addr: &libp2p::Multiaddr) -> bool {
    addr.iter()
        .any(|p| matches!(p, libp2p::multiaddr::Protocol::QuicV1))
}
