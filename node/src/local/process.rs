//! One `shoal up` process on this machine: its data dir and log, started with the API on
//! 127.0.0.1 and waited for (bounded) until it has published its addresses; killed,
//! signalled or restarted on demand, and killed when dropped or when its parent dies.
//! [`super::LocalCluster`] is made of these; the end-to-end tests use them directly.

use super::{wait_for, LocalError, UP_BOUND};
use crate::identity::{API_ADDR_FILE, LISTEN_ADDRS_FILE};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// The log file a node writes in its data dir.
pub const LOG_FILE: &str = "node.log";

/// A `shoal up` process with its own data dir. Dropping it kills the process.
pub struct LocalNode {
    /// How errors name it ("node 2" in a cluster, else its data dir).
    label: String,
    bin: PathBuf,
    dir: PathBuf,
    args: Vec<String>,
    prefix: Vec<String>,
    child: Option<Child>,
    api: Option<SocketAddr>,
}

impl LocalNode {
    /// Starts `bin up --data-dir dir --api 127.0.0.1:0 <args>` (after the command `prefix`,
    /// e.g. `ip netns exec NS`, when not empty) with stdout and stderr appended to
    /// `dir/node.log`, and waits at most 60 s for it to publish its API and listen
    /// addresses. `label` names it in errors.
    pub fn start(
        label: impl Into<String>,
        bin: &Path,
        dir: &Path,
        args: &[String],
        prefix: &[String],
    ) -> Result<Self, LocalError> {
        let mut n = LocalNode::spawn(label, bin, dir, args, prefix)?;
        n.wait_up()?;
        Ok(n)
    }

    /// Like [`LocalNode::start`] without waiting: call [`LocalNode::wait_up`] later (so
    /// several nodes can start at once).
    pub fn spawn(
        label: impl Into<String>,
        bin: &Path,
        dir: &Path,
        args: &[String],
        prefix: &[String],
    ) -> Result<Self, LocalError> {
        let mut n = LocalNode {
            label: label.into(),
            bin: bin.to_path_buf(),
            dir: dir.to_path_buf(),
            args: args.to_vec(),
            prefix: prefix.to_vec(),
            child: None,
            api: None,
        };
        n.launch()?;
        Ok(n)
    }

    fn launch(&mut self) -> Result<(), LocalError> {
        std::fs::create_dir_all(&self.dir)?;
        let _ = std::fs::remove_file(self.dir.join(API_ADDR_FILE));
        let _ = std::fs::remove_file(self.dir.join(LISTEN_ADDRS_FILE));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let mut cmd = match self.prefix.split_first() {
            None => Command::new(&self.bin),
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg(&self.bin);
                c
            }
        };
        cmd.arg("up")
            .arg("--data-dir")
            .arg(&self.dir)
            .args(["--api", "127.0.0.1:0"])
            .args(&self.args)
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
        let child = cmd.spawn().map_err(|source| LocalError::Spawn {
            node: self.label.clone(),
            source,
        })?;
        self.child = Some(child);
        self.api = None;
        Ok(())
    }

    /// Waits at most 60 s for the process to publish its API and listen addresses; fails
    /// at once if it exits.
    pub fn wait_up(&mut self) -> Result<(), LocalError> {
        let dir = self.dir.clone();
        let log = self.log_path().display().to_string();
        let Some(child) = self.child.as_mut() else {
            return Err(LocalError::Exited {
                node: self.label.clone(),
                status: "not running".into(),
                log,
            });
        };
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
                self.api = Some(a);
                Ok(())
            }
            Some(None) => {
                let status = self
                    .child
                    .take()
                    .and_then(|mut c| c.wait().ok())
                    .map(|s| s.to_string())
                    .unwrap_or_default();
                Err(LocalError::Exited {
                    node: self.label.clone(),
                    status,
                    log,
                })
            }
            None => Err(LocalError::NotUp {
                node: self.label.clone(),
                secs: UP_BOUND.as_secs(),
                log,
            }),
        }
    }

    /// Its data dir.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Its log file (`node.log` in the data dir).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join(LOG_FILE)
    }

    /// Everything it has logged so far (empty if nothing yet).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The arguments it runs with after `up --data-dir D --api A`.
    pub fn args(&self) -> &[String] {
        &self.args
    }

    /// The command prefix it runs under (empty on the host).
    pub fn prefix(&self) -> &[String] {
        &self.prefix
    }

    /// Its local API address, once up.
    pub fn api(&self) -> Option<SocketAddr> {
        self.api
    }

    /// Its first TCP listen address (with `/p2p/<id>`), for `--bootstrap`.
    pub fn tcp_addr(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.join(LISTEN_ADDRS_FILE))
            .ok()?
            .lines()
            .find(|l| l.contains("/tcp/"))
            .map(str::to_string)
    }

    /// Whether the process was started and has not been killed or seen exiting.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Its process id while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Fails if the process has exited on its own (it is then no longer running).
    pub fn check_alive(&mut self) -> Result<(), LocalError> {
        if let Some(c) = self.child.as_mut() {
            if let Ok(Some(status)) = c.try_wait() {
                self.child = None;
                return Err(LocalError::Exited {
                    node: self.label.clone(),
                    status: status.to_string(),
                    log: self.log_path().display().to_string(),
                });
            }
        }
        Ok(())
    }

    /// Sends signal `sig` (e.g. `libc::SIGSTOP`) to the process.
    pub fn signal(&self, sig: i32) -> std::io::Result<()> {
        let pid = self
            .pid()
            .ok_or_else(|| std::io::Error::other("not running"))?;
        // SAFETY: kill(2) on a child we own; no memory is shared.
        if unsafe { libc::kill(pid as i32, sig) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// `kill -9`, and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Kills it and starts it again on the same data dir (same identity, next
    /// incarnation), waiting until it is up.
    pub fn restart(&mut self) -> Result<(), LocalError> {
        self.kill();
        self.launch()?;
        self.wait_up()
    }

    /// Sends SIGTERM without waiting (see [`LocalNode::reap`]).
    pub fn terminate(&self) {
        let _ = self.signal(libc::SIGTERM);
    }

    /// Waits until `deadline` for the process to exit, then kills it; reaps it either way.
    pub fn reap(&mut self, deadline: std::time::Instant) {
        if let Some(mut c) = self.child.take() {
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for LocalNode {
    fn drop(&mut self) {
        self.kill();
    }
}
