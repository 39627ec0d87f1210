//! `shoal bench dial`: a stress tool, not a measurement. Floods a node's control plane
//! with dials from this one process to check that a wrong swarm key is refused every time
//! and that a flood stays within the node's connection limits.

use crate::failure::{usage, Failure};
use anyhow::anyhow;
use clap::Args;
use libp2p::Multiaddr;
use shoal_node::identity;
use std::path::PathBuf;
use std::time::Duration;

/// `shoal bench dial` arguments.
#[derive(Args)]
pub struct DialArgs {
    /// The node's TCP multiaddr (a trailing /p2p/ID is ignored).
    target: String,
    /// Dials. Default: 100.
    #[arg(long, default_value_t = 100)]
    count: u32,
    /// Dials in flight at once. Default: 16.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Swarm key file to dial with (none: dial without one).
    #[arg(long)]
    swarm_key: Option<PathBuf>,
    /// Bound on each dial in milliseconds. Default: 5000.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
}

/// Dials `count` times (a fresh identity, `concurrency` in flight, upgraded connections
/// held until all are done); prints `{"dials","upgraded","refused","timed_out"}`.
pub async fn run(a: DialArgs) -> Result<(), Failure> {
    let target: Multiaddr = a
        .target
        .parse()
        .map_err(|e| usage(anyhow!("bad target address: {e}")))?;
    let psk = match a.swarm_key {
        Some(p) => Some(identity::read_swarm_key(&p).map_err(|e| usage(e.into()))?),
        None => None,
    };
    let r = shoal_node::control_plane::dial_flood(
        &target,
        psk,
        a.count,
        a.concurrency,
        Duration::from_millis(a.timeout_ms),
    )
    .await
    .map_err(anyhow::Error::from)?;
    println!("{}", serde_json::json!(r));
    Ok(())
}
