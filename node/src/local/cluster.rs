//! A local cluster: N `shoal up` processes on 127.0.0.1 with their own data dirs
//! (`<dir>/node-<i>`), mDNS off, joined through node 0 as bootstrap peer, and the bounded
//! wait for them to agree on one view.

use super::{agreed_view, AgreedView, LocalError, LocalNode, Reports, VIEW_POLL};
use crate::status::{fetch_status, StatusReport};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The flags every node of a local cluster gets: loopback only, mDNS off.
pub const LOOPBACK_FLAGS: [&str; 7] = [
    "--listen",
    "/ip4/127.0.0.1/tcp/0",
    "--listen",
    "/ip4/127.0.0.1/udp/0/quic-v1",
    "--no-mdns",
    "--data-listen",
    "127.0.0.1:0",
];

/// Worker threads of each node's async runtime when `n` nodes share a machine of `cores`
/// cores (1 if unknown): cores / n within 1..=2 when every node has a core of its own,
/// else the default of `shoal up` (2). Measured on two cores (`docs/benchmarks.md`, QUIC
/// plane, fourth pass): two nodes all-reduced over QUIC 21–28% faster with one worker each
/// than with two, three nodes 6–12% slower; two nodes' TCP plane and training did not change.
pub fn runtime_threads(n: usize, cores: Option<std::num::NonZeroUsize>) -> usize {
    let cores = cores.map_or(1, usize::from);
    if n <= cores {
        (cores / n.max(1)).clamp(1, 2)
    } else {
        2
    }
}

/// A running local cluster. Dropping it kills every node.
pub struct LocalCluster {
    dir: PathBuf,
    nodes: Vec<LocalNode>,
}

impl LocalCluster {
    /// Starts `n` nodes of binary `bin` under `dir` (`dir/node-<i>`), each with
    /// [`LOOPBACK_FLAGS`], `--runtime-threads` [`runtime_threads`] (unless `extra` or
    /// `SHOAL_RUNTIME_THREADS` sets it), node 0 as bootstrap peer for the others, then
    /// `extra`. Returns once every node has published its API address.
    pub fn start(bin: &Path, dir: &Path, n: usize, extra: &[String]) -> Result<Self, LocalError> {
        std::fs::create_dir_all(dir)?;
        let mut args: Vec<String> = LOOPBACK_FLAGS.iter().map(|s| s.to_string()).collect();
        if !extra.iter().any(|a| a.starts_with("--runtime-threads"))
            && std::env::var_os("SHOAL_RUNTIME_THREADS").is_none()
        {
            let threads = runtime_threads(n, std::thread::available_parallelism().ok());
            args.extend(["--runtime-threads".to_string(), threads.to_string()]);
        }
        let node_dir = |i: usize| dir.join(format!("node-{i}"));
        let mut nodes = Vec::with_capacity(n);
        if n > 0 {
            let first = [args.clone(), extra.to_vec()].concat();
            nodes.push(LocalNode::start("node 0", bin, &node_dir(0), &first, &[])?);
            if let Some(b) = nodes[0].tcp_addr() {
                args.extend(["--bootstrap".to_string(), b]);
            }
        }
        args.extend(extra.iter().cloned());
        for i in 1..n {
            nodes.push(LocalNode::spawn(
                format!("node {i}"),
                bin,
                &node_dir(i),
                &args,
                &[],
            )?);
        }
        for n in nodes.iter_mut().skip(1) {
            n.wait_up()?;
        }
        Ok(LocalCluster {
            dir: dir.to_path_buf(),
            nodes,
        })
    }

    /// Starts `n` nodes of binary `bin` under `dir` (see [`LocalCluster::start`]) and waits
    /// at most `bound` for all of them to agree on one view of `n` members. The cluster and
    /// that view, or why not (a node that exits fails the wait at once).
    pub async fn start_agreed(
        bin: &Path,
        dir: &Path,
        n: usize,
        extra: &[String],
        bound: Duration,
    ) -> Result<(Self, AgreedView), LocalError> {
        if n == 0 {
            return Err(LocalError::NoNodes);
        }
        let mut c = LocalCluster::start(bin, dir, n, extra)?;
        let view = c.wait_agreed(n, None, bound).await?;
        Ok((c, view))
    }

    /// Waits at most `bound` until every live node holds the same view of exactly `n`
    /// members, none of them `excluded`, asking every [`VIEW_POLL`].
    pub async fn wait_agreed(
        &mut self,
        n: usize,
        excluded: Option<&str>,
        bound: Duration,
    ) -> Result<AgreedView, LocalError> {
        self.wait_agreed_observed(n, excluded, bound, |_| {}).await
    }

    /// [`LocalCluster::wait_agreed`], showing every round of reports to `observe` (e.g. to
    /// draw a table while the nodes converge).
    pub async fn wait_agreed_observed(
        &mut self,
        n: usize,
        excluded: Option<&str>,
        bound: Duration,
        mut observe: impl FnMut(&Reports),
    ) -> Result<AgreedView, LocalError> {
        let agreed = self
            .poll_until(bound, VIEW_POLL, |reports| {
                observe(reports);
                agreed_view(reports, n, excluded)
            })
            .await?;
        agreed.ok_or_else(|| LocalError::NoAgreement {
            nodes: n,
            secs: bound.as_secs(),
            dir: self.dir.display().to_string(),
        })
    }

    /// Asks every live node for its status every `every` until `done` answers `Some`, for
    /// at most `bound` (`Ok(None)` then). Fails as soon as a node exits.
    pub async fn poll_until<T>(
        &mut self,
        bound: Duration,
        every: Duration,
        mut done: impl FnMut(&Reports) -> Option<T>,
    ) -> Result<Option<T>, LocalError> {
        let end = Instant::now() + bound;
        loop {
            self.check_alive()?;
            let reports = self.statuses().await;
            if let Some(v) = done(&reports) {
                return Ok(Some(v));
            }
            if Instant::now() >= end {
                return Ok(None);
            }
            tokio::time::sleep(every).await;
        }
    }

    /// The cluster's dir (node `i` keeps its data dir and log in `node-<i>`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Number of node slots.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the cluster has no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node `i`.
    pub fn node(&self, i: usize) -> &LocalNode {
        &self.nodes[i]
    }

    /// The data dir of node `i`.
    pub fn node_dir(&self, i: usize) -> PathBuf {
        self.nodes[i].dir().to_path_buf()
    }

    /// The log file of node `i`.
    pub fn log_path(&self, i: usize) -> PathBuf {
        self.nodes[i].log_path()
    }

    /// The API address of node `i`, once up.
    pub fn api(&self, i: usize) -> Option<SocketAddr> {
        self.nodes[i].api()
    }

    /// Indices of nodes whose process is running.
    pub fn live(&self) -> Vec<usize> {
        (0..self.len())
            .filter(|&i| self.nodes[i].is_running())
            .collect()
    }

    /// `kill -9` node `i`.
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Restarts node `i` with its data dir (same identity, next incarnation).
    pub fn restart(&mut self, i: usize) -> Result<(), LocalError> {
        self.nodes[i].restart()
    }

    /// Checks that no node exited unexpectedly.
    pub fn check_alive(&mut self) -> Result<(), LocalError> {
        self.nodes.iter_mut().try_for_each(LocalNode::check_alive)
    }

    /// The status of every live node (`None` where it did not answer).
    pub async fn statuses(&self) -> Vec<(usize, Option<StatusReport>)> {
        let futs = self.live().into_iter().map(|i| {
            let api = self.nodes[i].api();
            async move {
                let s = match api {
                    Some(a) => fetch_status(a, Duration::from_secs(2)).await.ok(),
                    None => None,
                };
                (i, s)
            }
        });
        futures::future::join_all(futs).await
    }

    /// Stops every node: SIGTERM, then SIGKILL after 5 s.
    pub fn shutdown(&mut self) {
        for n in &self.nodes {
            n.terminate();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for n in self.nodes.iter_mut() {
            n.reap(deadline);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::runtime_threads;
    use std::num::NonZeroUsize;

    #[test]
    fn nodes_with_a_core_each_share_the_cores() {
        let cores = |c| NonZeroUsize::new(c);
        assert_eq!(runtime_threads(2, cores(2)), 1);
        assert_eq!(runtime_threads(3, cores(4)), 1);
        assert_eq!(runtime_threads(4, cores(4)), 1);
        assert_eq!(runtime_threads(2, cores(16)), 2);
        assert_eq!(runtime_threads(1, cores(2)), 2);
        assert_eq!(runtime_threads(0, cores(1)), 1);
        // More nodes than cores: the cores are shared anyway; the default measured better.
        assert_eq!(runtime_threads(3, cores(2)), 2);
        assert_eq!(runtime_threads(2, None), 2);
    }
}
