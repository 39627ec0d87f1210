//! `shoal bench membership`: how long N local nodes take to share one view, and how long
//! the survivors take to drop a node killed with SIGKILL.

use crate::cluster::local_dir;
use crate::failure::{usage, Failure};
use anyhow::anyhow;
use clap::Args;
use shoal_node::local::LocalCluster;
use std::time::{Duration, Instant};

/// `shoal bench membership` arguments.
#[derive(Args)]
pub struct MembershipArgs {
    /// Number of nodes. Default: 8.
    #[arg(long, default_value_t = 8)]
    nodes: usize,
    /// Print one JSON line (the default output is also that line, plus a summary).
    #[arg(long)]
    json: bool,
    /// Give up after this many seconds per phase. Default: 60.
    #[arg(long, default_value_t = 60)]
    timeout_s: u64,
}

/// Starts the nodes (`up_ms`: until every process published its addresses), waits for one
/// view (`converge_ms`), kills the last node and waits for the others to drop it
/// (`detect_ms`). Prints `{"nodes","up_ms","converge_ms","detect_ms"}`.
pub async fn run(a: MembershipArgs) -> Result<(), Failure> {
    let n = a.nodes;
    if n < 2 {
        return Err(usage(anyhow!("--nodes must be at least 2")));
    }
    let (dir, _) = local_dir(None);
    let bound = Duration::from_secs(a.timeout_s);
    let bin = std::env::current_exe().map_err(anyhow::Error::from)?;
    let t0 = Instant::now();
    let mut c = LocalCluster::start(&bin, &dir, n, &[])?;
    let up_ms = t0.elapsed().as_millis() as u64;
    let t1 = Instant::now();
    c.wait_agreed(n, None, bound).await?;
    let converge_ms = t1.elapsed().as_millis() as u64;
    // Kill the last node with SIGKILL; the survivors must drop it.
    let victim = n - 1;
    let victim_id = c
        .statuses()
        .await
        .into_iter()
        .find(|(i, _)| *i == victim)
        .and_then(|(_, r)| r)
        .map(|r| r.node.id)
        .ok_or_else(|| anyhow!("node {victim} stopped answering"))?;
    let t2 = Instant::now();
    c.kill(victim);
    c.wait_agreed(n - 1, Some(&victim_id), bound)
        .await
        .map_err(|e| anyhow!("survivors did not drop the killed node: {e}"))?;
    let detect_ms = t2.elapsed().as_millis() as u64;
    c.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
    let line = serde_json::json!({"nodes": n, "up_ms": up_ms, "converge_ms": converge_ms, "detect_ms": detect_ms});
    println!("{line}");
    if !a.json {
        eprintln!("{n} nodes: processes up in {up_ms} ms, one view {converge_ms} ms later; a SIGKILLed node left every view after {detect_ms} ms");
    }
    Ok(())
}
