//! The status report a node serves on `GET /v1/status`, its table form for `shoal status`,
//! and a minimal HTTP/1.1 client for the local API (loopback only, bounded in time and size).

use coordinator_free::{Capabilities, MemberState};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Counters a node keeps.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Counters {
    /// Heartbeats published.
    pub heartbeats_sent: u64,
    /// Gossip messages accepted.
    pub gossip_accepted: u64,
    /// Gossip messages rejected as malformed or forged.
    pub gossip_rejected: u64,
    /// Gossip messages ignored as stale or duplicate.
    pub gossip_ignored: u64,
    /// Inbound connections whose handshake failed (wrong swarm key, not libp2p, ...).
    pub handshakes_refused: u64,
    /// Views this node went through.
    pub view_changes: u64,
    /// Gossip payload bytes published.
    pub control_bytes_sent: u64,
    /// Gossip payload bytes received.
    pub control_bytes_received: u64,
}

/// This node.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeReport {
    /// Peer id (base58).
    pub id: String,
    /// Incarnation (starts of this data dir).
    pub incarnation: u64,
    /// Local API address.
    pub api: String,
    /// Control-plane listen addresses with /p2p.
    pub listen: Vec<String>,
    /// Capabilities.
    pub caps: Capabilities,
    /// Time since start.
    pub uptime_ms: u64,
    /// Connected libp2p peers.
    pub connected_peers: usize,
    /// Established control-plane connections (at most `--max-connections`).
    #[serde(default)]
    pub connections: u32,
    /// Whether a swarm key is in force.
    pub private_network: bool,
    /// The data plane.
    pub data_plane: Option<DataPlaneReport>,
    /// The process's resident memory now and at its peak, bytes (Linux; absent elsewhere).
    #[serde(default)]
    pub memory: Option<ProcessMemory>,
}

/// A process's resident memory (`/proc/self/status`: `VmRSS`, `VmHWM`).
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ProcessMemory {
    /// Resident now, bytes.
    pub rss_bytes: u64,
    /// The most it has been resident, bytes.
    pub peak_rss_bytes: u64,
}

impl ProcessMemory {
    /// This process's, where `/proc/self/status` says (Linux).
    pub fn now() -> Option<ProcessMemory> {
        ProcessMemory::parse(&std::fs::read_to_string("/proc/self/status").ok()?)
    }

    /// From the text of a `/proc/<pid>/status` file (`VmRSS:   1234 kB`).
    pub fn parse(status: &str) -> Option<ProcessMemory> {
        let field = |key: &str| -> Option<u64> {
            let line = status.lines().find(|l| l.starts_with(key))?;
            let kb: u64 = line[key.len()..]
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .ok()?;
            Some(kb.saturating_mul(1024))
        };
        Some(ProcessMemory {
            rss_bytes: field("VmRSS:")?,
            peak_rss_bytes: field("VmHWM:")?,
        })
    }
}

/// The data plane of a node.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DataPlaneReport {
    /// Where it listens.
    pub addr: String,
    /// Its transport.
    pub transport: crate::data_plane::DataTransport,
    /// Its counters.
    pub stats: crate::data_plane::DataPlaneStats,
}

/// The current view.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ViewReport {
    /// Epoch.
    pub epoch: u64,
    /// Hash in hex.
    pub hash: String,
    /// Member ids in ring order.
    pub members: Vec<String>,
}

/// Another member as this node sees it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MemberReport {
    /// Peer id.
    pub id: String,
    /// Incarnation.
    pub incarnation: u64,
    /// Liveness.
    pub state: MemberState,
    /// Whether it is in this node's view.
    pub in_view: bool,
    /// Time since its last heartbeat.
    pub last_heard_ms_ago: u64,
    /// Capabilities.
    pub caps: Capabilities,
    /// Its control-plane addresses.
    pub addrs: Vec<String>,
    /// Epoch of its own view.
    pub view_epoch: u64,
    /// Hash of its own view.
    pub view_hash: String,
}

/// Everything `GET /v1/status` returns.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusReport {
    /// This node.
    pub node: NodeReport,
    /// Its view.
    pub view: ViewReport,
    /// Every member it knows of (tombstones included).
    pub members: Vec<MemberReport>,
    /// Counters.
    pub counters: Counters,
    /// Training jobs this node takes part in (newest last).
    #[serde(default)]
    pub jobs: Vec<crate::train::JobReport>,
    /// Served models with their plans.
    #[serde(default)]
    pub serving: Vec<crate::serve::ModelReport>,
    /// Serving counters.
    #[serde(default)]
    pub serve_stats: Option<crate::serve::ServeStats>,
}

fn gib(b: u64) -> String {
    format!("{:.1}", b as f64 / (1u64 << 30) as f64)
}

fn short(id: &str) -> &str {
    &id[id.len().saturating_sub(8)..]
}

/// Renders a report as a human-readable table.
pub fn render_table(r: &StatusReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "node {} (incarnation {}), api {}, {} peers connected{}",
        r.node.id,
        r.node.incarnation,
        r.node.api,
        r.node.connected_peers,
        if r.node.private_network {
            ", private network"
        } else {
            ""
        }
    );
    let _ = writeln!(
        s,
        "view epoch {} hash {} with {} members",
        r.view.epoch,
        &r.view.hash[..16.min(r.view.hash.len())],
        r.view.members.len()
    );
    let _ = writeln!(
        s,
        "{:<10} {:>4} {:<8} {:>5} {:>8} {:>5} {:<8} {:>8} {:>8} {:>9}  ADDRESS",
        "MEMBER",
        "INC",
        "STATE",
        "CORES",
        "RAM_GiB",
        "GPUS",
        "DEVICE",
        "FREE_GiB",
        "MFLOPS",
        "HEARD_MS"
    );
    let row = |s: &mut String,
               id: &str,
               inc: u64,
               state: &str,
               c: &Capabilities,
               heard: u64,
               addr: Option<&String>| {
        let _ = writeln!(
            s,
            "{:<10} {:>4} {:<8} {:>5} {:>8} {:>5} {:<8} {:>8} {:>8} {:>9}  {}",
            short(id),
            inc,
            state,
            c.cores,
            gib(c.ram_bytes),
            c.gpus.len(),
            if c.device.is_empty() { "-" } else { &c.device },
            gib(c.device_free_bytes),
            c.speed_mflops,
            heard,
            addr.map(String::as_str).unwrap_or("-")
        );
    };
    row(
        &mut s,
        &r.node.id,
        r.node.incarnation,
        "self",
        &r.node.caps,
        0,
        r.node.listen.first(),
    );
    for m in &r.members {
        let state = match m.state {
            MemberState::Alive => "alive",
            MemberState::Suspect => "suspect",
            MemberState::Failed => "failed",
        };
        row(
            &mut s,
            &m.id,
            m.incarnation,
            state,
            &m.caps,
            m.last_heard_ms_ago,
            m.addrs.first(),
        );
    }
    for m in &r.serving {
        let _ = writeln!(
            s,
            "model {} ({}, sha256 {}), held by {} member(s){}",
            m.name,
            m.kind,
            &m.sha256[..12.min(m.sha256.len())],
            m.holders.len(),
            if m.held { ", here too" } else { "" }
        );
        match &m.plan_error {
            Some(e) => {
                let _ = writeln!(s, "  no plan: {e}");
            }
            None => {
                for (i, rep) in m.replicas.iter().enumerate() {
                    let stages: Vec<String> = rep
                        .iter()
                        .map(|st| {
                            let (id, layers) = st.split_once('[').unwrap_or((st, ""));
                            format!("{}[{layers}", short(id))
                        })
                        .collect();
                    let _ = writeln!(s, "  replica {i}: {}", stages.join(" -> "));
                }
            }
        }
    }
    if let Some(st) = &r.serve_stats {
        if st.requests_ok + st.requests_failed + st.requests_rejected > 0 {
            let _ = writeln!(
                s,
                "serving: {} ok, {} failed, {} rejected, cache {} hits / {} misses, {} tokens",
                st.requests_ok,
                st.requests_failed,
                st.requests_rejected,
                st.cache_hits,
                st.cache_misses,
                st.tokens_generated
            );
        }
    }
    s
}

/// Why the local API could not be queried.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No connection could be made (the node is not running there).
    #[error("cannot reach the node API at {addr}: {source}")]
    Connect {
        /// The API address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The request did not finish in time.
    #[error("the node API at {0} did not answer in time")]
    Timeout(SocketAddr),
    /// The response was not a well-formed HTTP response with a JSON body.
    #[error("bad response from the node API: {0}")]
    BadResponse(String),
    /// The API answered with an error status.
    #[error("the node API answered {status}: {body}")]
    Status {
        /// HTTP status code.
        status: u16,
        /// Response body.
        body: String,
    },
}

/// Largest response body accepted from the local API.
const MAX_RESPONSE: u64 = 16 << 20;

/// Sends one HTTP request to the local API and returns the body of a 2xx response.
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>, ClientError> {
    http_request_with(addr, method, path, None, body, timeout).await
}

/// [`http_request`] with an optional bearer token.
pub async fn http_request_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
    timeout: Duration,
) -> Result<Vec<u8>, ClientError> {
    let fut = async {
        let mut stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|source| ClientError::Connect { addr, source })?;
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}Content-Length: {}\r\nContent-Type: application/json\r\n\r\n",
            body.len()
        );
        let io_err = |e: std::io::Error| ClientError::BadResponse(e.to_string());
        stream.write_all(head.as_bytes()).await.map_err(io_err)?;
        stream.write_all(body).await.map_err(io_err)?;
        let mut buf = Vec::new();
        stream
            .take(MAX_RESPONSE)
            .read_to_end(&mut buf)
            .await
            .map_err(io_err)?;
        parse_response(&buf)
    };
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_| ClientError::Timeout(addr))?
}

fn parse_response(buf: &[u8]) -> Result<Vec<u8>, ClientError> {
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| ClientError::BadResponse("no header end".into()))?;
    let head = String::from_utf8_lossy(&buf[..split]);
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| ClientError::BadResponse("no status code".into()))?;
    let mut body = buf[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body)?;
    }
    if !(200..300).contains(&status) {
        return Err(ClientError::Status {
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
        });
    }
    Ok(body)
}

fn dechunk(mut b: &[u8]) -> Result<Vec<u8>, ClientError> {
    let mut out = Vec::new();
    loop {
        let line_end = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| ClientError::BadResponse("bad chunk".into()))?;
        let size = usize::from_str_radix(String::from_utf8_lossy(&b[..line_end]).trim(), 16)
            .map_err(|_| ClientError::BadResponse("bad chunk size".into()))?;
        b = &b[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if b.len() < size + 2 {
            return Err(ClientError::BadResponse("truncated chunk".into()));
        }
        out.extend_from_slice(&b[..size]);
        b = &b[size + 2..];
    }
}

/// Fetches a node's status.
pub async fn fetch_status(
    addr: SocketAddr,
    timeout: Duration,
) -> Result<StatusReport, ClientError> {
    let body = http_request(addr, "GET", "/v1/status", &[], timeout).await?;
    serde_json::from_slice(&body).map_err(|e| ClientError::BadResponse(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_memory_is_read_from_proc_status() {
        let text = "Name:\tshoal\nVmHWM:\t  204800 kB\nVmRSS:\t  102400 kB\nThreads: 9\n";
        let m = ProcessMemory::parse(text).unwrap();
        assert_eq!((m.rss_bytes, m.peak_rss_bytes), (100 << 20, 200 << 20));
        assert_eq!(ProcessMemory::parse("VmRSS: x kB\nVmHWM: 1 kB"), None);
        // This process's own: resident now at most its peak, and not nothing.
        let me = ProcessMemory::now().unwrap();
        assert!(me.rss_bytes > 1 << 20 && me.rss_bytes <= me.peak_rss_bytes);
    }

    #[test]
    fn parses_plain_and_chunked() {
        let r = parse_response(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi").unwrap();
        assert_eq!(r, b"hi");
        let r = parse_response(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n3\r\n!!!\r\n0\r\n\r\n",
        )
        .unwrap();
        assert_eq!(r, b"hi!!!");
        assert!(matches!(
            parse_response(b"HTTP/1.1 404 Not Found\r\n\r\nnope"),
            Err(ClientError::Status { status: 404, .. })
        ));
        assert!(parse_response(b"garbage").is_err());
    }
}
