//! What the subcommands that run local nodes share: where the nodes' dirs go, the
//! `--data-plane` name of a transport, and starting a [`LocalCluster`] of this very binary
//! that has agreed on one view.

use crate::failure::Failure;
use anyhow::Context;
use shoal_node::data_plane::DataTransport;
use shoal_node::local::{AgreedView, LocalCluster};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The dir local nodes keep their data dirs and logs in: `dir` if given, else a fresh
/// `shoal-local-<pid>` under the temporary dir. Also whether it is that temporary one (to
/// remove when done).
pub fn local_dir(dir: Option<PathBuf>) -> (PathBuf, bool) {
    match dir {
        Some(d) => (d, false),
        None => (
            std::env::temp_dir().join(format!("shoal-local-{}", std::process::id())),
            true,
        ),
    }
}

/// `--data-plane <t>`, as extra arguments of local nodes.
pub fn data_plane_args(t: DataTransport) -> Vec<String> {
    vec!["--data-plane".to_string(), t.to_string()]
}

/// Keeps `c` running until Ctrl-C when `wait` (saying so unless `quiet`), then stops its
/// nodes and removes `dir` when it is a temporary one.
pub async fn finish(mut c: LocalCluster, dir: &Path, temp: bool, wait: bool, quiet: bool) {
    if wait {
        if !quiet {
            println!("running; Ctrl-C to stop (logs under {})", dir.display());
        }
        let _ = tokio::signal::ctrl_c().await;
    }
    c.shutdown();
    if temp {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Starts `n` nodes of this binary under `dir`, each with `extra` arguments after `up`,
/// and waits at most `bound` for one agreed view of all `n`.
pub async fn start_agreed(
    dir: &Path,
    n: usize,
    extra: &[String],
    bound: Duration,
) -> Result<(LocalCluster, AgreedView), Failure> {
    let bin = std::env::current_exe().context("cannot find the shoal binary")?;
    Ok(LocalCluster::start_agreed(&bin, dir, n, extra, bound).await?)
}
