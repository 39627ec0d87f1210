//! Local clusters: N `shoal up` processes on 127.0.0.1 with their own data dirs, mDNS off,
//! joined through node 0 as bootstrap peer, and the wait for them to agree on one view.
//! Used by `shoal local`, `shoal train --local`, `shoal serve --local`, `shoal bench` and
//! the end-to-end tests: [`LocalCluster::start_agreed`] is the one place that starts N
//! nodes and waits, bounded, for one agreed view.

use crate::identity::{API_ADDR_FILE, LISTEN_ADDRS_FILE};
use crate::status::{fetch_status, StatusReport};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Why a local cluster could not be run.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// A process could not be started.
    #[error("cannot start node {index}: {source}")]
    Spawn {
        /// Node index.
        index: usize,
        /// Why.
        source: std::io::Error,
    },
    /// A node exited or did not publish its addresses in time.
    #[error("node {index} did not come up within {secs} s (log: {log})")]
    NotUp {
        /// Node index.
        index: usize,
        /// The bound waited.
        secs: u64,
        /// Its log file.
        log: String,
    },
    /// A node process exited.
    #[error("node {index} exited with {status} (log: {log})")]
    Exited {
        /// Node index.
        index: usize,
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

/// A running local cluster. Dropping it kills every node.
pub struct LocalCluster {
    bin: PathBuf,
    dir: PathBuf,
    extra: Vec<String>,
    children: Vec<Option<Child>>,
    apis: Vec<Option<SocketAddr>>,
    bootstrap: Option<String>,
}

/// Waits until `f` returns `Some`, checking every 10 ms, for at most `bound`.
fn wait_for<T>(bound: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
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

/// How long a node may take to write its address files.
const UP_BOUND: Duration = Duration::from_secs(60);

impl LocalCluster {
    /// Starts `n` nodes of binary `bin` under `dir` (`dir/node-<i>`), each with `extra`
    /// arguments after `up`. Returns once every node has published its API address.
    pub fn start(bin: &Path, dir: &Path, n: usize, extra: &[String]) -> Result<Self, LocalError> {
        std::fs::create_dir_all(dir)?;
        let mut c = LocalCluster {
            bin: bin.to_path_buf(),
            dir: dir.to_path_buf(),
            extra: extra.to_vec(),
            children: (0..n).map(|_| None).collect(),
            apis: vec![None; n],
            bootstrap: None,
        };
        c.spawn(0)?;
        c.wait_up(0)?;
        let listen = std::fs::read_to_string(c.node_dir(0).join(LISTEN_ADDRS_FILE))?;
        c.bootstrap = listen
            .lines()
            .find(|l| l.contains("/tcp/"))
            .map(str::to_string);
        for i in 1..n {
            c.spawn(i)?;
        }
        for i in 1..n {
            c.wait_up(i)?;
        }
        Ok(c)
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
                let (epoch, hash) = agreed_view(reports, n, excluded)?;
                let members = reports.first()?.1.as_ref()?.view.members.clone();
                Some(AgreedView {
                    epoch,
                    hash,
                    members,
                })
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
        self.children.len()
    }

    /// Whether the cluster has no nodes.
    pub fn is_empty(&self) -> bool {
        self.children.is_empty()
    }

    /// The data dir of node `i`.
    pub fn node_dir(&self, i: usize) -> PathBuf {
        self.dir.join(format!("node-{i}"))
    }

    /// The log file of node `i`.
    pub fn log_path(&self, i: usize) -> PathBuf {
        self.node_dir(i).join("node.log")
    }

    /// The API address of node `i`, once up.
    pub fn api(&self, i: usize) -> Option<SocketAddr> {
        self.apis[i]
    }

    /// Indices of nodes whose process is running.
    pub fn live(&self) -> Vec<usize> {
        (0..self.len())
            .filter(|&i| self.children[i].is_some())
            .collect()
    }

    fn spawn(&mut self, i: usize) -> Result<(), LocalError> {
        let dir = self.node_dir(i);
        std::fs::create_dir_all(&dir)?;
        let _ = std::fs::remove_file(dir.join(API_ADDR_FILE));
        let _ = std::fs::remove_file(dir.join(LISTEN_ADDRS_FILE));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(i))?;
        let mut cmd = Command::new(&self.bin);
        cmd.arg("up")
            .arg("--data-dir")
            .arg(&dir)
            .args(["--listen", "/ip4/127.0.0.1/tcp/0"])
            .args(["--listen", "/ip4/127.0.0.1/udp/0/quic-v1"])
            .args(["--api", "127.0.0.1:0", "--no-mdns"])
            .args(["--data-listen", "127.0.0.1:0"]);
        if let Some(b) = &self.bootstrap {
            if i != 0 {
                cmd.args(["--bootstrap", b]);
            }
        }
        cmd.args(&self.extra)
            .env_remove("SHOAL_BOOTSTRAP")
            .env_remove("SHOAL_LISTEN")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        // The node dies with us, whatever kills us.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .map_err(|source| LocalError::Spawn { index: i, source })?;
        self.children[i] = Some(child);
        self.apis[i] = None;
        Ok(())
    }

    fn wait_up(&mut self, i: usize) -> Result<(), LocalError> {
        let dir = self.node_dir(i);
        let log = self.log_path(i).display().to_string();
        let child = self.children[i].as_mut().expect("spawned");
        let api = wait_for(UP_BOUND, || {
            if let Ok(Some(_)) = child.try_wait() {
                return Some(None);
            }
            let api = std::fs::read_to_string(dir.join(API_ADDR_FILE)).ok()?;
            let listen = std::fs::read_to_string(dir.join(LISTEN_ADDRS_FILE)).ok()?;
            if listen.trim().is_empty() {
                return None;
            }
            api.trim().parse::<SocketAddr>().ok().map(Some)
        });
        match api {
            Some(Some(a)) => {
                self.apis[i] = Some(a);
                Ok(())
            }
            Some(None) => {
                let status = self.children[i]
                    .take()
                    .and_then(|mut c| c.wait().ok())
                    .map(|s| s.to_string())
                    .unwrap_or_default();
                Err(LocalError::Exited {
                    index: i,
                    status,
                    log,
                })
            }
            None => Err(LocalError::NotUp {
                index: i,
                secs: UP_BOUND.as_secs(),
                log,
            }),
        }
    }

    /// `kill -9` node `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Restarts node `i` with its data dir (same identity, next incarnation).
    pub fn restart(&mut self, i: usize) -> Result<(), LocalError> {
        self.kill(i);
        self.spawn(i)?;
        self.wait_up(i)
    }

    /// Checks that no node exited unexpectedly.
    pub fn check_alive(&mut self) -> Result<(), LocalError> {
        for i in 0..self.len() {
            if let Some(c) = self.children[i].as_mut() {
                if let Ok(Some(status)) = c.try_wait() {
                    self.children[i] = None;
                    return Err(LocalError::Exited {
                        index: i,
                        status: status.to_string(),
                        log: self.log_path(i).display().to_string(),
                    });
                }
            }
        }
        Ok(())
    }

    /// The status of every live node (`None` where it did not answer).
    pub async fn statuses(&self) -> Vec<(usize, Option<StatusReport>)> {
        let futs = self.live().into_iter().map(|i| {
            let api = self.apis[i];
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
        for c in self.children.iter().flatten() {
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
        }
        let end = Instant::now() + Duration::from_secs(5);
        for slot in self.children.iter_mut() {
            if let Some(mut c) = slot.take() {
                while Instant::now() < end {
                    if let Ok(Some(_)) = c.try_wait() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for slot in self.children.iter_mut() {
            if let Some(mut c) = slot.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
}

/// Whether every report holds the same view, of exactly `n` members, none of them in
/// `excluded`. Returns that view's (epoch, hash).
pub fn agreed_view(reports: &Reports, n: usize, excluded: Option<&str>) -> Option<(u64, String)> {
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
    Some((first.view.epoch, first.view.hash.clone()))
}
