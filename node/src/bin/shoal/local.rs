//! `shoal local`: runs N nodes on 127.0.0.1 (mDNS off, joined through node 0), shows a
//! table of their views while they converge, and reports the one view they agree on.

use crate::cluster::{self, local_dir};
use crate::failure::Failure;
use clap::Args;
use shoal_node::local::{LocalCluster, LocalError, Reports};
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct LocalArgs {
    /// Number of nodes. Default: 4.
    #[arg(long, env = "SHOAL_NODES", default_value_t = 4)]
    nodes: usize,
    /// Exit 0 once all nodes share one view (instead of running until Ctrl-C).
    #[arg(long, env = "SHOAL_EXIT_WHEN_CONVERGED")]
    exit_when_converged: bool,
    /// Where the nodes' data dirs go. Default: a fresh temporary dir, removed on success.
    #[arg(long, env = "SHOAL_LOCAL_DIR")]
    dir: Option<PathBuf>,
    /// Give up (exit 1) if the nodes do not converge in this many seconds. Default: 60.
    #[arg(long, env = "SHOAL_TIMEOUT_S", default_value_t = 60)]
    timeout_s: u64,
    /// Print one JSON line when converged instead of a table.
    #[arg(long, env = "SHOAL_JSON")]
    json: bool,
}

/// One line per node: its peer id, view epoch, view hash and member count.
fn cluster_table(reports: &Reports, n: usize) -> String {
    let mut s = format!(
        "{:<5} {:<54} {:>6} {:<17} {:>8}\n",
        "NODE", "PEER", "EPOCH", "VIEW", "MEMBERS"
    );
    for (i, r) in reports {
        match r {
            Some(r) => {
                s += &format!(
                    "{:<5} {:<54} {:>6} {:<17} {:>5}/{n}\n",
                    i,
                    r.node.id,
                    r.view.epoch,
                    &r.view.hash[..16],
                    r.view.members.len()
                )
            }
            None => s += &format!("{i:<5} (not answering)\n"),
        }
    }
    s
}

/// `shoal local`: starts the nodes, waits for one agreed view (drawing the table), reports
/// it, and runs until Ctrl-C unless `--exit-when-converged`.
pub async fn local(a: LocalArgs) -> Result<(), Failure> {
    let (dir, temp) = local_dir(a.dir);
    let n = a.nodes;
    if n == 0 {
        return Err(LocalError::NoNodes.into());
    }
    let t0 = Instant::now();
    let bin = std::env::current_exe().map_err(anyhow::Error::from)?;
    let mut c = LocalCluster::start(&bin, &dir, n, &[])?;
    let tty = std::io::stdout().is_terminal() && !a.json;
    let mut last_table = String::new();
    let view = c
        .wait_agreed_observed(n, None, Duration::from_secs(a.timeout_s), |reports| {
            if a.json {
                return;
            }
            let table = cluster_table(reports, n);
            if table == last_table {
                return;
            }
            if tty {
                print!("\x1b[H\x1b[2J{table}");
            } else {
                println!("{table}");
            }
            last_table = table;
        })
        .await?;
    let ms = t0.elapsed().as_millis();
    if a.json {
        println!(
            "{}",
            serde_json::json!({"nodes": n, "converged": true, "epoch": view.epoch,
                "hash": view.hash, "members": view.members, "elapsed_ms": ms})
        );
    } else {
        println!(
            "converged: {n} nodes agree on view epoch {} hash {} after {ms} ms",
            view.epoch,
            &view.hash[..16]
        );
    }
    cluster::finish(c, &dir, temp, !a.exit_when_converged, a.json).await;
    Ok(())
}
