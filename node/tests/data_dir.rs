//! One data dir, one node: a second `shoal up` on a data dir in use exits 1 with a
//! one-line reason, and `shoal keygen` run against it (while the node runs, or racing it
//! as it starts) prints the running node's peer id, never a key of its own.
//!
//! Every process listens on 127.0.0.1 with ports chosen by the kernel, mDNS off.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const SHOAL: &str = env!("CARGO_BIN_EXE_shoal");

/// A fresh directory, removed on drop unless the test failed.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "shoal-data-dir-{name}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept {} for inspection", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// `shoal up` on `dir`, loopback only.
fn up_command(dir: &Path) -> Command {
    let mut cmd = Command::new(SHOAL);
    cmd.arg("up")
        .arg("--data-dir")
        .arg(dir)
        .args(["--no-mdns", "--api", "127.0.0.1:0"])
        .args(["--listen", "/ip4/127.0.0.1/tcp/0"])
        .args(["--data-listen", "127.0.0.1:0"])
        .env_remove("SHOAL_BOOTSTRAP")
        .env_remove("SHOAL_LISTEN")
        .stdin(Stdio::null());
    // The node dies with the test, whatever ends it.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd
}

/// A running `shoal up`, killed on drop.
struct Node(Child);

impl Node {
    /// Starts `shoal up` on `dir`, its output in `log`.
    fn start(dir: &Path, log: &Path) -> Node {
        let log = std::fs::File::create(log).unwrap();
        let child = up_command(dir)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn shoal up");
        Node(child)
    }

    /// Waits (bounded) until the node published its listen addresses; its peer id.
    fn wait_id(&mut self, dir: &Path) -> String {
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = self.0.try_wait().unwrap() {
                panic!("node exited with {st}");
            }
            let listen = std::fs::read_to_string(dir.join("listen.addrs")).unwrap_or_default();
            if let Some(id) = listen.lines().find_map(|l| l.split("/p2p/").nth(1)) {
                return id.trim().to_string();
            }
            assert!(Instant::now() < end, "node did not come up in 60 s");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `cmd` to completion, bounded by 60 s.
fn run(cmd: &mut Command) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn shoal");
    let end = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > end {
            let _ = child.kill();
            panic!("shoal did not finish in 60 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

fn keygen(dir: &Path) -> Output {
    run(Command::new(SHOAL)
        .arg("keygen")
        .arg("--data-dir")
        .arg(dir)
        .env_remove("SHOAL_SWARM_KEY"))
}

#[test]
fn a_second_node_on_a_data_dir_in_use_exits_1_with_one_line() {
    let d = TempDir::new("second");
    let dir = d.0.join("node");
    let mut first = Node::start(&dir, &d.0.join("first.log"));
    let id = first.wait_id(&dir);
    let key = std::fs::read(dir.join("identity.key")).unwrap();

    let out = run(&mut up_command(&dir));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line on stderr: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(
        lines[0].contains("is in use by another shoal node"),
        "{err}"
    );
    assert!(
        lines[0].contains(&format!("(pid {})", first.0.id())),
        "names the running node: {err}"
    );

    // The first node runs on, with its key untouched.
    assert!(
        first.0.try_wait().unwrap().is_none(),
        "the first node still runs"
    );
    assert_eq!(std::fs::read(dir.join("identity.key")).unwrap(), key);
    // Once it is gone, the data dir is free again, with the same identity.
    drop(first);
    let mut again = Node::start(&dir, &d.0.join("again.log"));
    assert_eq!(again.wait_id(&dir), id);
}

#[test]
fn keygen_on_a_running_nodes_data_dir_prints_that_nodes_id() {
    let d = TempDir::new("keygen");
    let dir = d.0.join("node");
    let mut node = Node::start(&dir, &d.0.join("node.log"));
    let id = node.wait_id(&dir);
    let out = keygen(&dir);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), id);
}

#[test]
fn keygen_racing_a_starting_node_agrees_with_it() {
    let d = TempDir::new("race");
    for round in 0..4 {
        let dir = d.0.join(format!("node-{round}"));
        // Both start at once on an empty data dir: each may create the identity.
        let mut kg = Command::new(SHOAL);
        kg.arg("keygen")
            .arg("--data-dir")
            .arg(&dir)
            .env_remove("SHOAL_SWARM_KEY")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let kg = kg.spawn().expect("spawn keygen");
        let mut node = Node::start(&dir, &d.0.join(format!("node-{round}.log")));
        let out = kg.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let printed = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let id = node.wait_id(&dir);
        assert_eq!(
            printed, id,
            "round {round}: keygen printed the running node's id"
        );
        // And the file holds that key: a later keygen prints the same id.
        let later = keygen(&dir);
        assert_eq!(
            String::from_utf8_lossy(&later.stdout).trim(),
            id,
            "round {round}"
        );
    }
}
