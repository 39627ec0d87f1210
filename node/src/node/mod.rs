//! One node: the libp2p swarm, the membership core and a timer, driven by one event loop
//! (`tokio::select!`), with a cloneable [`NodeHandle`] for the API and the CLI.
//!
//! What depends on what, one way (each layer uses only the ones above it):
//! 1. `config` ([`NodeConfig`]) and `error` ([`NodeError`]).
//! 2. [`handle`]: the [`Command`]s and the [`NodeHandle`] that sends them. The HTTP routers
//!    ([`crate::api`], [`crate::serve::http`]) and the CLI depend on it (and on layer 1)
//!    alone, never on the event loop.
//! 3. `event_loop`: the loop itself: takes commands, swarm events and timers, publishes
//!    heartbeats and acts on membership events. Its other parts are `impl EventLoop`
//!    blocks beside it: `gossip` (applies the core's acceptance decision,
//!    [`coordinator_free::gossip`]), `jobs` (the job registry and trainers), `serving`
//!    (the server's view of the members, model announcements), `roster` (the data plane's
//!    view of the members), `report` (the status report) and `debug` (the `--debug-api`
//!    commands).
//! 4. this module's [`run`], which starts everything: it builds the handle, gives it to
//!    the routers, and runs the event loop.

mod config;
mod debug;
mod error;
mod event_loop;
mod gossip;
pub mod handle;
mod jobs;
mod report;
mod roster;
mod serving;

pub use config::NodeConfig;
pub use error::NodeError;
pub use handle::{Command, DebugCommand, NodeHandle};

use crate::capabilities;
use crate::control_plane;
use crate::data_plane::DataPlane;
use crate::identity;
use coordinator_free::{DataPlaneAddr, Membership, NodeId};
use error::error_chain;
use event_loop::EventLoop;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// Runs a node until it is shut down (Ctrl-C or SIGTERM or a [`Command::Shutdown`]).
pub async fn run(cfg: NodeConfig) -> Result<(), NodeError> {
    if !cfg.api.ip().is_loopback() {
        return Err(NodeError::ApiNotLoopback(cfg.api));
    }
    check_serve_listen(&cfg)?;
    cfg.membership.validate().map_err(NodeError::Timings)?;
    let key = identity::load_or_create_identity(&cfg.data_dir)?;
    let incarnation = identity::bump_incarnation(&cfg.data_dir)?;
    let peer_id = key.public().to_peer_id();
    let me = NodeId::new(peer_id.to_base58())?;
    let data_plane = DataPlane::bind(key.clone(), cfg.data_listen, cfg.data_plane.clone()).await?;
    let mut swarm = control_plane::build_swarm(key, &cfg.control)?;
    for addr in &cfg.listen {
        if cfg.control.swarm_key.is_some() && control_plane::is_quic(addr) {
            tracing::warn!(%addr, "QUIC is off with a swarm key (pnet covers TCP only); not listening there");
            continue;
        }
        swarm
            .listen_on(addr.clone())
            .map_err(|e| NodeError::Listen {
                addr: addr.clone(),
                reason: error_chain(&e),
            })?;
    }
    swarm
        .behaviour_mut()
        .gossipsub
        .subscribe(&control_plane::control_topic())
        .map_err(|e| control_plane::ControlPlaneError::Gossipsub(e.to_string()))?;

    let api_listener = tokio::net::TcpListener::bind(cfg.api)
        .await
        .map_err(|source| NodeError::Api {
            addr: cfg.api,
            source,
        })?;
    let api_addr = api_listener.local_addr().map_err(|source| NodeError::Api {
        addr: cfg.api,
        source,
    })?;
    let (tx, rx) = mpsc::channel(64);
    // Trainers subscribe to the sender; the channel keeps the value without receivers.
    let (views_tx, _) = watch::channel(crate::train::ViewState {
        view: coordinator_free::View::new(0, vec![]),
        settled: false,
    });
    let handle = NodeHandle::new(tx);
    let (view_failed_tx, view_failed_rx) = mpsc::unbounded_channel();
    let serve_cfg = crate::serve::ServeConfig {
        device: cfg.device,
        ..cfg.serve.clone()
    };
    let server = crate::serve::Server::start(me.clone(), data_plane.clone(), serve_cfg);
    if let Some(addr) = cfg.serve_listen {
        let public = crate::serve::http::openai_router(server.clone(), handle.clone());
        serve_openai(addr, public, &cfg.data_dir).await?;
    }
    let router = crate::api::router(handle.clone(), cfg.debug_api)
        .merge(crate::serve::http::router(server.clone(), handle.clone()));
    spawn_capability_detection(handle.clone(), cfg.device);
    tokio::spawn(async move {
        if let Err(e) = axum::serve(api_listener, router).await {
            tracing::error!("local API stopped: {e}");
        }
    });
    identity::write_atomic(
        &cfg.data_dir.join(identity::API_ADDR_FILE),
        format!("{api_addr}\n").as_bytes(),
        0o644,
    )?;

    let caps = capabilities::detect(cfg.device).await;
    tracing::info!(
        device = %caps.device,
        free_bytes = caps.device_free_bytes,
        speed_mflops = caps.speed_mflops,
        "compute device"
    );
    let start = Instant::now();
    let mut membership = Membership::new(
        me.clone(),
        incarnation,
        caps,
        vec![],
        cfg.membership.clone(),
        0,
    );
    let transport = data_plane.transport();
    membership.set_data_addr(Some(DataPlaneAddr::new(transport, data_plane.local_addr())));
    tracing::info!(addr = %data_plane.local_addr(), %transport, "data plane listening");
    tracing::info!(peer = %peer_id, incarnation, api = %api_addr, "node starting");

    let mut node = EventLoop {
        swarm,
        membership,
        start,
        peer_id,
        cfg,
        rx,
        listen_addrs: Vec::new(),
        counters: Default::default(),
        last_dial: Default::default(),
        api_addr,
        bootstrapped: false,
        data_plane,
        nccl_id: None,
        nccl_waiters: Vec::new(),
        remote_ips: Default::default(),
        views_tx,
        handle: handle.clone(),
        view_failed_tx,
        view_failed_rx,
        jobs: Default::default(),
        server,
    };
    for addr in node.cfg.bootstrap.clone() {
        node.dial_bootstrap(&addr)?;
    }
    node.run().await;
    tracing::info!("node stopped");
    Ok(())
}

/// Refuses a serving listener other machines can reach (any non-loopback address, the
/// unspecified ones included) without an API token.
pub fn check_serve_listen(cfg: &NodeConfig) -> Result<(), NodeError> {
    match cfg.serve_listen {
        Some(addr) if !addr.ip().is_loopback() && cfg.serve.api_token.is_none() => {
            Err(NodeError::ServeListenNeedsToken(addr))
        }
        _ => Ok(()),
    }
}

/// Binds the serving listener at `addr`, writes the bound address to
/// [`identity::SERVE_ADDR_FILE`] in `data_dir`, and serves the OpenAI routes there.
async fn serve_openai(
    addr: std::net::SocketAddr,
    router: axum::Router,
    data_dir: &std::path::Path,
) -> Result<(), NodeError> {
    let bind_error = |source| NodeError::ServeListen { addr, source };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(bind_error)?;
    let bound = listener.local_addr().map_err(bind_error)?;
    identity::write_atomic(
        &data_dir.join(identity::SERVE_ADDR_FILE),
        format!("{bound}\n").as_bytes(),
        0o644,
    )?;
    tracing::info!(addr = %bound, "serving the OpenAI API");
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!("serving listener stopped: {e}");
        }
    });
    Ok(())
}

/// Re-detects the capabilities (GPU free memory, matmul speed) off the event loop
/// (`nvidia-smi` may take a while and must not delay heartbeats): 1, 2, 4 and 8 s after
/// the start, then every 10 s. The early ones matter for the speed, which keeps the best
/// round measured: nodes of a local cluster start together and measure while the others
/// load, and an unlucky start-up measurement would skew the serving plan until the next
/// re-detection. Stops when the node does.
fn spawn_capability_detection(handle: NodeHandle, device: tch::Device) {
    tokio::spawn(async move {
        let mut waits = [1u64, 1, 2, 4].into_iter();
        loop {
            let wait = waits.next().unwrap_or(10);
            tokio::time::sleep(Duration::from_secs(wait)).await;
            let caps = capabilities::detect(device).await;
            if handle.set_capabilities(caps).await.is_err() {
                return;
            }
        }
    });
}
