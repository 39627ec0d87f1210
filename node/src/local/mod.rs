//! Local nodes and clusters: `shoal up` processes on this machine with their own data dirs,
//! and the wait for them to agree on one view. Used by `shoal local`, `shoal train --local`,
//! `shoal serve --local`, `shoal bench` and the end-to-end tests.
//!
//! - [`process`]: one node process ([`LocalNode`]): start, wait until up, kill, restart.
//! - [`cluster`]: N nodes on 127.0.0.1 joined through node 0 ([`LocalCluster`]);
//!   [`LocalCluster::start_agreed`] is the one place that starts N nodes and waits,
//!   bounded, for one agreed view.

pub mod cluster;
pub mod process;

pub use cluster::{runtime_threads, LocalCluster, LOOPBACK_FLAGS};
pub use process::LocalNode;

use crate::status::StatusReport;
use std::time::{Duration, Instant};

/// Why a local node or cluster could not be run.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// A process could not be started.
    #[error("cannot start {node}: {source}")]
    Spawn {
        /// The node ("node 2" in a cluster, else its data dir).
        node: String,
        /// Why.
        source: std::io::Error,
    },
    /// A node exited or did not publish its addresses in time.
    #[error("{node} did not come up within {secs} s (log: {log})")]
    NotUp {
        /// The node ("node 2" in a cluster, else its data dir).
        node: String,
        /// The bound waited.
        secs: u64,
        /// Its log file.
        log: String,
    },
    /// A node process exited.
    #[error("{node} exited with {status} (log: {log})")]
    Exited {
        /// The node ("node 2" in a cluster, else its data dir).
        node: String,
        /// Exit status.
        status: String,
        /// Its log file.
        log: String,
    },
    /// A file could not be read or written.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A cluster of no nodes was asked for.
    #[error("a local cluster needs at least 1 node")]
    NoNodes,
    /// The nodes did not agree on one view in time.
    #[error("{nodes} nodes did not agree on one view within {secs} s; logs under {dir}")]
    NoAgreement {
        /// Members the view had to have.
        nodes: usize,
        /// The bound waited.
        secs: u64,
        /// The cluster's dir (each node's log is `node-<i>/node.log`).
        dir: String,
    },
}

/// The one view every live node of a cluster holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgreedView {
    /// Its epoch.
    pub epoch: u64,
    /// Its hash (hex).
    pub hash: String,
    /// Its members' peer ids, sorted.
    pub members: Vec<String>,
}

/// Every status report of a cluster's live nodes, by node index (`None`: did not answer).
pub type Reports = [(usize, Option<StatusReport>)];

/// How often [`LocalCluster::wait_agreed`] asks every node for its view. 20 ms.
pub const VIEW_POLL: Duration = Duration::from_millis(20);

/// How long a node may take to write its address files. 60 s.
const UP_BOUND: Duration = Duration::from_secs(60);

/// Waits until `f` returns `Some`, checking every 10 ms, for at most `bound`.
pub(crate) fn wait_for<T>(bound: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let end = Instant::now() + bound;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= end {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Whether every report holds the same view, of exactly `n` members, none of them in
/// `excluded`. Returns that view.
pub fn agreed_view(reports: &Reports, n: usize, excluded: Option<&str>) -> Option<AgreedView> {
    let first = reports.first()?.1.as_ref()?;
    for (_, r) in reports {
        let r = r.as_ref()?;
        if r.view != first.view {
            return None;
        }
    }
    if first.view.members.len() != n {
        return None;
    }
    if let Some(x) = excluded {
        if first.view.members.iter().any(|m| m == x) {
            return None;
        }
    }
    Some(AgreedView {
        epoch: first.view.epoch,
        hash: first.view.hash.clone(),
        members: first.view.members.clone(),
    })
}
