//! Helpers for the multi-process integration tests: start real `shoal` processes, query
//! their local API, wait on observed state (never on bare sleeps), clean up on drop.
#![allow(dead_code)]

pub mod logprobs;
pub mod netns;

use serde_json::Value;
use shoal_node::local::{agreed_view, LocalNode};
use shoal_node::status;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The `shoal` binary cargo built for these tests.
pub fn shoal_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_shoal"))
}

/// The repository's root (scripts, examples and data live there).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("node/ sits in the repository")
        .to_path_buf()
}

/// A fresh directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(name: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!(
            "shoal-test-{name}-{}-{}",
            std::process::id(),
            Instant::now().elapsed().as_nanos()
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        } else {
            eprintln!("kept {} for inspection", self.0.display());
        }
    }
}

/// Runs `shoal` with `args` to completion (bounded by 60 s).
pub fn run_shoal(args: &[&str]) -> Output {
    let mut child = Command::new(shoal_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn shoal");
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() > end {
            let _ = child.kill();
            panic!("shoal {args:?} did not finish in 60 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Polls `f` every 20 ms until it returns `Some`, panicking with `what` after `bound`.
pub fn wait_until<T>(what: &str, bound: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let end = Instant::now() + bound;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > end {
            panic!("timed out after {bound:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One `shoal up` process: the library's [`LocalNode`], started with the tests' binary and
/// panicking (with the node's log) where the library returns an error.
pub struct Node(pub LocalNode);

impl std::ops::Deref for Node {
    type Target = LocalNode;
    fn deref(&self) -> &LocalNode {
        &self.0
    }
}

impl std::ops::DerefMut for Node {
    fn deref_mut(&mut self) -> &mut LocalNode {
        &mut self.0
    }
}

impl Node {
    /// Starts `shoal up --data-dir dir --api 127.0.0.1:0 <args>` and waits for its API.
    pub fn start(dir: &Path, args: &[&str]) -> Node {
        Node::start_with_prefix(dir, args, &[])
    }

    /// [`Node::start`] under a command prefix (e.g. `ip netns exec NS`).
    pub fn start_with_prefix(dir: &Path, args: &[&str], prefix: &[&str]) -> Node {
        let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let label = dir.display().to_string();
        match LocalNode::start(label, &shoal_bin(), dir, &strings(args), &strings(prefix)) {
            Ok(n) => Node(n),
            Err(e) => panic!(
                "{e}\n{}",
                std::fs::read_to_string(dir.join("node.log")).unwrap_or_default()
            ),
        }
    }

    /// The first TCP listen address (with /p2p), for --bootstrap.
    pub fn tcp_addr(&self) -> String {
        self.0.tcp_addr().expect("a tcp listen address")
    }

    /// `GET /v1/status` as JSON (None if the node does not answer).
    pub fn status(&self) -> Option<Value> {
        let prefix = self.prefix();
        if prefix.is_empty() {
            let body = http(self.api()?, "GET", "/v1/status", &[]).ok()?;
            serde_json::from_slice(&body).ok()
        } else {
            // The API listens on the namespace's own loopback: ask from inside.
            let out = Command::new(&prefix[0])
                .args(&prefix[1..])
                .arg(shoal_bin())
                .args(["status", "--json", "--api", &self.api()?.to_string()])
                .output()
                .ok()?;
            serde_json::from_slice(&out.stdout).ok()
        }
    }

    /// Its peer id (from its status).
    pub fn id(&self) -> String {
        self.status().expect("status")["node"]["id"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// Sends a signal by name (`STOP`, `CONT`, `TERM`) to the node process.
    pub fn signal(&self, sig: &str) {
        let n = match sig {
            "STOP" => libc::SIGSTOP,
            "CONT" => libc::SIGCONT,
            "TERM" => libc::SIGTERM,
            "KILL" => libc::SIGKILL,
            other => panic!("unknown signal {other}"),
        };
        self.0
            .signal(n)
            .unwrap_or_else(|e| panic!("kill -{sig}: {e}"));
    }

    /// Kills it and starts it again on the same data dir, waiting until it is up.
    pub fn restart(&mut self) {
        self.0.restart().unwrap_or_else(|e| panic!("restart: {e}"));
    }
}

/// The runtime the blocking helpers below drive the library's async client on.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime")
    })
}

/// One HTTP request to a local API with the library's client; the body of a 2xx, else
/// `"<status>: <body>"` or why there was no answer.
pub fn http(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> Result<Vec<u8>, String> {
    http_timeout(addr, method, path, body, Duration::from_secs(5))
}

/// [`http`] bounded by `timeout`.
pub fn http_timeout(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>, String> {
    runtime()
        .block_on(status::http_request(addr, method, path, body, timeout))
        .map_err(|e| match e {
            status::ClientError::Status { status, body } => format!("{status}: {body}"),
            e => e.to_string(),
        })
}

/// The view (epoch, hash, member ids) a status report holds.
pub fn view_of(s: &Value) -> (u64, String, Vec<String>) {
    let r: status::StatusReport = serde_json::from_value(s.clone()).expect("a status report");
    (r.view.epoch, r.view.hash, r.view.members)
}

/// Arguments of a node in [`serving_cluster`]: no mDNS, an ephemeral loopback data plane
/// over TCP, and `extra`.
pub fn serving_args(extra: &[&str]) -> Vec<String> {
    [
        "--no-mdns",
        "--data-listen",
        "127.0.0.1:0",
        "--data-plane",
        "tcp",
    ]
    .iter()
    .chain(extra)
    .map(|s| s.to_string())
    .collect()
}

/// `n` nodes started with [`serving_args`]`(extra)` in `dir/node-<i>`, joined by node 0
/// as their bootstrap peer, once they agree on one view.
pub fn serving_cluster(dir: &Path, n: usize, extra: &[&str]) -> Vec<Node> {
    let listen = format!("/ip4/127.0.0.1/tcp/{}", free_port());
    let mut a = serving_args(extra);
    a.extend(["--listen".into(), listen.clone()]);
    let refs: Vec<&str> = a.iter().map(String::as_str).collect();
    let first = Node::start(&dir.join("node-0"), &refs);
    let boot = format!("{listen}/p2p/{}", first.id());
    let mut nodes = vec![first];
    for i in 1..n {
        let mut a = serving_args(extra);
        a.extend([
            "--listen".into(),
            "/ip4/127.0.0.1/tcp/0".into(),
            "--bootstrap".into(),
            boot.clone(),
        ]);
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        nodes.push(Node::start(&dir.join(format!("node-{i}")), &refs));
    }
    let refs: Vec<&Node> = nodes.iter().collect();
    wait_until("the cluster converges", Duration::from_secs(60), || {
        agreed(&refs, n)
    });
    nodes
}

/// Some((epoch, hash, members)) once every node answers with the same view of `n` members
/// (the library's [`agreed_view`] rule).
pub fn agreed(nodes: &[&Node], n: usize) -> Option<(u64, String, Vec<String>)> {
    let reports: Vec<(usize, Option<status::StatusReport>)> = nodes
        .iter()
        .enumerate()
        .map(|(i, node)| {
            let report = node.status().and_then(|v| serde_json::from_value(v).ok());
            (i, report)
        })
        .collect();
    let v = agreed_view(&reports, n, None)?;
    Some((v.epoch, v.hash, v.members))
}

/// The host-side flags for a test node: loopback only, mDNS off (the local cluster's).
#[allow(unused_imports)]
pub use shoal_node::local::LOOPBACK_FLAGS as LOOPBACK;

/// A deterministic 3-class problem with 4 features, 300 rows.
pub fn synthetic_csv(path: &Path) {
    let mut s = String::from("f0,f1,f2,f3,label\n");
    let mut z: u64 = 7;
    let mut next = || {
        z = z
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((z >> 33) as f64 / (1u64 << 31) as f64) * 2.0 - 1.0
    };
    for i in 0..300 {
        let label = i % 3;
        let c = label as f64;
        s += &format!(
            "{:.4},{:.4},{:.4},{:.4},{label}\n",
            c + next() * 0.8,
            -c + next() * 0.8,
            next(),
            c * 0.5 + next()
        );
    }
    std::fs::write(path, s).unwrap();
}

/// Parses Prometheus text with the reference parser (Python `prometheus_client`):
/// `{"name{labels as sorted JSON}": value}`. Panics with the text if it does not parse.
pub fn prometheus_parse(python: &std::ffi::OsStr, dir: &Path, text: &str) -> Value {
    let file = dir.join("metrics.txt");
    std::fs::write(&file, text).unwrap();
    let script = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = {}
for fam in text_string_to_metric_families(open(sys.argv[1]).read()):
    for s in fam.samples:
        key = s.name + json.dumps(s.labels, sort_keys=True)
        out[key] = s.value
print(json.dumps(out))
"#;
    let out = std::process::Command::new(python)
        .args(["-c", script, file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "parser failed: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A free loopback TCP port (for a node that must keep its address across restarts).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Exports `examples/byo_model/` (a TorchScript digits classifier) to `out` with the setup
/// venv's Python.
pub fn export_byo_model(out: &Path) {
    let python = std::env::var("SHOAL_PYTHON").expect("SHOAL_PYTHON (source scripts/env.sh)");
    let root = repo_root();
    let r = Command::new(python)
        .arg(root.join("examples/byo_model/export.py"))
        .arg(out)
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
}

/// The committed steps recorded in metrics.jsonl (the last line per step wins) walk the
/// data epochs batch after batch: no batch skipped, none repeated. A step the view's first
/// member did not log itself must be one it received by a sync (another member committed
/// it). Returns the samples the job must have consumed: every batch of `steps` steps over
/// the training rows (derived from the log).
pub fn check_cursor_walk(run_dir: &Path, steps: u64, batch: u64) -> u64 {
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap();
    let mut by_step = std::collections::BTreeMap::new();
    let mut synced = std::collections::BTreeSet::new();
    for l in text.lines() {
        let v: Value = serde_json::from_str(l).unwrap();
        if v.get("step_ms").is_some() {
            by_step.insert(v["step"].as_u64().unwrap(), v);
        } else if v["event"] == "sync" {
            synced.insert(v["step"].as_u64().unwrap());
        }
    }
    let mut n_train = None;
    let (mut epoch, mut offset, mut known) = (0u64, 0u64, true);
    for step in 1..=steps {
        let Some(v) = by_step.get(&step) else {
            assert!(
                synced.contains(&step),
                "step {step} neither logged nor synced"
            );
            known = false;
            continue;
        };
        let len = v["samples"].as_u64().unwrap();
        let (e, o) = (
            v["data_epoch"].as_u64().unwrap(),
            v["data_offset"].as_u64().unwrap(),
        );
        if known {
            if len < batch || o == 0 {
                assert_eq!(
                    (e, o),
                    (epoch + 1, 0),
                    "step {step}: a batch ends the epoch"
                );
                n_train = Some(offset + len);
            } else {
                assert_eq!(
                    (e, o),
                    (epoch, offset + batch),
                    "step {step}: consecutive batches"
                );
            }
        } else {
            assert!(
                e == epoch || e == epoch + 1,
                "step {step}: after a synced step"
            );
        }
        (epoch, offset, known) = (e, o, true);
    }
    let n = n_train.expect("the log covers an epoch end");
    // Every batch of `steps` steps over n rows.
    let (mut off, mut total) = (0u64, 0u64);
    for _ in 0..steps {
        let len = batch.min(n - off);
        total += len;
        off = if off + len == n { 0 } else { off + len };
    }
    total
}

/// The samples of every committed step of a run, from all its members' `samples.*.jsonl`
/// (`shoal_node::train::report::used_samples`: the lines of the view that committed each
/// step): step → (data epoch, member → ids).
pub fn step_samples(
    run_dir: &Path,
) -> std::collections::BTreeMap<u64, (u64, std::collections::BTreeMap<String, Vec<u64>>)> {
    let mut text = String::new();
    for e in std::fs::read_dir(run_dir).unwrap() {
        let p = e.unwrap().path();
        if p.file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("samples.")
        {
            text += &std::fs::read_to_string(&p).unwrap();
        }
    }
    shoal_node::train::report::used_samples(text.lines())
}

/// The newest training job in a node's status whose `key` (`run` or `job`) is `value`.
pub fn job_where(node: &Node, key: &str, value: &str) -> Option<Value> {
    let s = node.status()?;
    s["jobs"]
        .as_array()?
        .iter()
        .rev()
        .find(|j| j[key] == value)
        .cloned()
}

/// Waits until the job `key` = `value` is done on every node (a failure anywhere panics
/// with its error); returns their reports.
pub fn wait_jobs_done(nodes: &[&Node], key: &str, value: &str, bound: Duration) -> Vec<Value> {
    wait_until("the job to finish everywhere", bound, || {
        let mut out = Vec::new();
        for n in nodes {
            let j = job_where(n, key, value)?;
            assert_ne!(j["state"], "failed", "job failed: {}", j["error"]);
            if j["state"] != "done" {
                return None;
            }
            out.push(j);
        }
        Some(out)
    })
}

/// Runs `shoal train` in `dir` (its cwd, so `runs/` lands there) to completion, bounded.
pub fn train(dir: &Path, job: &Path, args: &[&str]) -> (Option<i32>, Value, String) {
    let nodes_dir = dir.join(format!("nodes-{}", rand_suffix()));
    let child = spawn_train(dir, job, &nodes_dir, args, true);
    let out = wait_output(child, Duration::from_secs(600));
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let summary = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or(Value::Null);
    (out.status.code(), summary, stderr)
}

/// Starts `shoal train JOB --json --dir NODES_DIR ARGS` in `dir` (its cwd, so `runs/` lands
/// there); its stdout and stderr piped to read (`piped`) or dropped.
pub fn spawn_train(
    dir: &Path,
    job: &Path,
    nodes_dir: &Path,
    args: &[&str],
    piped: bool,
) -> std::process::Child {
    let out = || if piped { Stdio::piped() } else { Stdio::null() };
    Command::new(shoal_bin())
        .arg("train")
        .arg(job)
        .args(["--json", "--dir"])
        .arg(nodes_dir)
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(out())
        .stderr(out())
        .spawn()
        .expect("spawn shoal train")
}

/// A number that differs from call to call (nanoseconds since the epoch), for fresh names.
pub fn rand_suffix() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// Waits for `child` to exit, at most `bound` (then kills it and panics with its stderr).
pub fn wait_output(mut child: std::process::Child, bound: Duration) -> std::process::Output {
    let start = std::time::Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if start.elapsed() > bound {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "shoal train did not finish within {bound:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sequence ids used per data epoch, from every member's `samples.*.jsonl`: each complete
/// epoch holds every id of `0..n` once, the last holds none twice. Returns `n` and the
/// members that logged samples.
pub fn sequences_used_once(run_dir: &Path) -> (u64, Vec<String>) {
    let mut epoch_ids: std::collections::HashMap<u64, Vec<u64>> = Default::default();
    let mut members = std::collections::BTreeSet::new();
    for (_, (epoch, by_member)) in step_samples(run_dir) {
        for (member, ids) in by_member {
            if !ids.is_empty() {
                members.insert(member);
            }
            epoch_ids.entry(epoch).or_default().extend(ids);
        }
    }
    let members: Vec<String> = members.into_iter().collect();
    let n = epoch_ids[&0].iter().max().unwrap() + 1;
    let last = *epoch_ids.keys().max().unwrap();
    assert!(last >= 1, "the run covers a whole epoch");
    for (epoch, mut ids) in epoch_ids {
        ids.sort_unstable();
        let before = ids.len();
        ids.dedup();
        assert_eq!(ids.len(), before, "epoch {epoch}: a sequence used twice");
        if epoch < last {
            assert_eq!(ids, (0..n).collect::<Vec<_>>(), "epoch {epoch}");
        }
    }
    (n, members)
}

/// A small byte-level gpt job (1 block, width 32, context 32, batch 32, samples logged) of
/// `steps` steps evaluated every `every`, on `[data]` (`data` holds its keys); `extra` goes
/// before `[model]` (top-level keys, then any tables such as `[sync]`).
pub fn gpt_lm_job(name: &str, steps: u64, every: u64, data: &str, extra: &str) -> String {
    format!(
        r#"
name = "{name}"
seed = 4
steps = {steps}
batch_size = 32
log_samples = true
eval_every = {every}
{extra}
[model]
kind = "gpt"
layers = 1
heads = 2
width = 32
context = 32
[data]
{data}
[optimizer]
lr = 0.003
"#
    )
}

/// Fresh sub-folders of `dir`.
pub fn subdirs<const N: usize>(dir: &Path, names: [&str; N]) -> [PathBuf; N] {
    names.map(|n| {
        let p = dir.join(n);
        std::fs::create_dir_all(&p).unwrap();
        p
    })
}
