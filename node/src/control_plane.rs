//! The libp2p control plane: transports, behaviours and limits.
//!
//! TCP (+ Noise + yamux) always; QUIC too unless a swarm key is set. libp2p's pnet wraps
//! stream transports only and QUIC brings its own TLS, so a node with a swarm key runs
//! without QUIC rather than accept connections that skip the key.

use coordinator_free::codec::MAX_CONTROL_MESSAGE;
use libp2p::core::muxing::StreamMuxerBox;
use libp2p::core::transport::Boxed;
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
pub const PROTOCOL_VERSION: &str = "/shoal/1.2.0";
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
            .with_other_transport(|k| private_tcp(k, psk))
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

/// TCP behind the swarm key: the pre-shared-key handshake first (a peer without the key
/// never reaches noise), then noise (authenticated by the libp2p identity) and yamux.
fn private_tcp(
    key: &Keypair,
    psk: PreSharedKey,
) -> Result<Boxed<(PeerId, StreamMuxerBox)>, Box<dyn std::error::Error + Send + Sync>> {
    let noise = noise::Config::new(key)?;
    Ok(
        tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
            .and_then(move |socket, _| PnetConfig::new(psk).handshake(socket))
            .upgrade(Version::V1Lazy)
            .authenticate(noise)
            .multiplex(yamux::Config::default())
            .timeout(Duration::from_secs(20))
            .boxed(),
    )
}

/// What [`dial_flood`] saw.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct DialReport {
    /// Dials made.
    pub dials: u32,
    /// Dials whose handshake completed on this side.
    pub upgraded: u32,
    /// Upgraded connections the target closed while they were held (over its limits).
    pub closed_by_target: u32,
    /// Upgraded connections still open when the flood ended.
    pub held: u32,
    /// Dials refused during the handshake (wrong swarm key, connection reset, limits).
    pub refused: u32,
    /// Dials that did not finish within the bound.
    pub timed_out: u32,
}

/// Dials `target` `count` times from this one process (a fresh identity; at most
/// `concurrency` dials in flight), over TCP with `psk` (None: without a swarm key), each
/// dial bounded by `bound`. Every upgraded connection is driven (so its handshake really
/// completes) and held until all dials are done and `bound` more has passed, counting
/// those the target closes meanwhile.
/// `shoal bench dial` uses it to check a node's defenses: a wrong swarm key is refused
/// every time, and a flood stays within the node's connection limits.
pub async fn dial_flood(
    target: &libp2p::Multiaddr,
    psk: Option<PreSharedKey>,
    count: u32,
    concurrency: usize,
    bound: Duration,
) -> Result<DialReport, ControlPlaneError> {
    use futures::StreamExt;
    use libp2p::core::transport::{DialOpts, PortUse};
    use libp2p::core::Endpoint;
    let key = Keypair::generate_ed25519();
    let err = |e: &dyn std::fmt::Display| ControlPlaneError::Transport(e.to_string());
    let mut transport = match psk {
        Some(psk) => private_tcp(&key, psk).map_err(|e| err(&e))?,
        None => tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
            .upgrade(Version::V1Lazy)
            .authenticate(noise::Config::new(&key).map_err(|e| err(&e))?)
            .multiplex(yamux::Config::default())
            .boxed(),
    };
    let (addr, _) = split_peer_id(target);
    let mut dials = Vec::new();
    for _ in 0..count {
        let opts = DialOpts {
            role: Endpoint::Dialer,
            port_use: PortUse::New,
        };
        dials.push(transport.dial(addr.clone(), opts).map_err(|e| err(&e))?);
    }
    let mut report = DialReport {
        dials: count,
        ..DialReport::default()
    };
    let (closed_tx, mut closed_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let mut drivers = Vec::new();
    let mut outcomes = futures::stream::iter(dials)
        .map(|d| tokio::time::timeout(bound, d))
        .buffer_unordered(concurrency.max(1));
    while let Some(r) = outcomes.next().await {
        match r {
            Ok(Ok((_, mut muxer))) => {
                report.upgraded += 1;
                let closed = closed_tx.clone();
                drivers.push(tokio::spawn(async move {
                    use libp2p::core::muxing::StreamMuxerExt;
                    // Drive the connection until the target closes it.
                    while futures::future::poll_fn(|cx| muxer.poll_unpin(cx))
                        .await
                        .is_ok()
                    {}
                    let _ = closed.send(());
                }));
            }
            Ok(Err(_)) => report.refused += 1,
            Err(_) => report.timed_out += 1,
        }
    }
    drop(closed_tx);
    // Give the target `bound` to close what it will not keep.
    let _ = tokio::time::timeout(bound, async {
        while report.closed_by_target < report.upgraded {
            match closed_rx.recv().await {
                Some(()) => report.closed_by_target += 1,
                None => break,
            }
        }
    })
    .await;
    report.held = report.upgraded - report.closed_by_target;
    for d in drivers {
        d.abort();
    }
    Ok(report)
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
