//! Bad input gives one clear line on stderr and a non-zero exit, never a panic.

mod common;
use common::*;

fn assert_one_line_error(out: &std::process::Output, code: i32, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!err.contains("RUST_BACKTRACE"), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "exactly one line on stderr: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(lines[0].contains(needle), "{err} lacks {needle}");
}

/// `shoal up` in a fresh data dir, loopback only, mDNS off; `extra` may override
/// `--api`, `--listen` and `--data-listen`.
fn up(d: &TempDir, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["up", "--data-dir", d.0.to_str().unwrap(), "--no-mdns"];
    for (flag, default) in [
        ("--api", "127.0.0.1:0"),
        ("--listen", "/ip4/127.0.0.1/tcp/0"),
        ("--data-listen", "127.0.0.1:0"),
    ] {
        if !extra.contains(&flag) {
            args.extend([flag, default]);
        }
    }
    args.extend_from_slice(extra);
    run_shoal(&args)
}

#[test]
fn bad_multiaddr() {
    let d = TempDir::new("badaddr");
    let out = up(&d, &["--bootstrap", "not-a-multiaddr"]);
    assert_one_line_error(&out, 2, "invalid --bootstrap address 'not-a-multiaddr'");
}

#[test]
fn malformed_key_file() {
    let d = TempDir::new("badkey");
    std::fs::write(d.0.join("identity.key"), b"this is not a key").unwrap();
    assert_one_line_error(&up(&d, &[]), 2, "is malformed");
}

#[test]
fn unreadable_or_malformed_swarm_key() {
    let d = TempDir::new("badpsk");
    let missing = d.0.join("missing.key");
    let out = up(&d, &["--swarm-key", missing.to_str().unwrap()]);
    assert_one_line_error(&out, 2, "missing.key");
    let bad = d.0.join("bad.key");
    std::fs::write(&bad, "/key/swarm/psk/1.0.0/\n/base16/\nnothex").unwrap();
    let out = up(&d, &["--swarm-key", bad.to_str().unwrap()]);
    assert_one_line_error(&out, 2, "swarm key");
}

#[test]
fn port_already_in_use() {
    let d = TempDir::new("port");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let listen = format!("/ip4/127.0.0.1/tcp/{port}");
    assert_one_line_error(&up(&d, &["--listen", &listen]), 1, "cannot listen on");
    let api = format!("127.0.0.1:{port}");
    assert_one_line_error(&up(&d, &["--api", &api]), 1, "cannot bind the local API");
}

#[test]
fn cuda_where_there_is_none_is_one_line_and_no_fall_back() {
    // On a machine without CUDA `cuda` names a device it lacks; with CUDA, one index past
    // its devices does. Either way the node never starts (no fall-back to the CPU).
    let count = shoal_node::device::cuda_device_count();
    let (asked, needle) = if count == 0 {
        (
            "cuda".to_string(),
            "device `cuda:0`: no CUDA device is available".to_string(),
        )
    } else {
        (
            format!("cuda:{count}"),
            format!("device `cuda:{count}`: this machine has {count} CUDA device(s)"),
        )
    };
    let d = TempDir::new("nocuda");
    assert_one_line_error(&up(&d, &["--device", &asked]), 1, &needle);
}

#[test]
fn a_device_that_is_not_one_is_refused_by_argument_parsing() {
    let d = TempDir::new("baddevice");
    let out = up(&d, &["--device", "bogus"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.starts_with("error: invalid value 'bogus' for '--device"),
        "{err}"
    );
    assert!(err.contains("expected auto, cpu, cuda or cuda:N"), "{err}");
    // Refused before anything starts: the data dir holds no identity.
    assert!(!d.0.join("identity.key").exists());
}

#[test]
fn status_of_absent_node() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = free.local_addr().unwrap().to_string();
    drop(free);
    let out = run_shoal(&["status", "--api", &addr]);
    assert_one_line_error(&out, 1, "cannot reach the node API");
}

#[test]
fn local_cluster_command_converges_and_exits() {
    let out = run_shoal(&["local", "--nodes", "3", "--exit-when-converged", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(v["converged"], true);
    assert_eq!(v["members"].as_array().unwrap().len(), 3);
}

#[test]
fn bench_membership_prints_one_json_line() {
    let out = run_shoal(&["bench", "membership", "--nodes", "3", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1);
    let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(v["nodes"], 3);
    // Detection cannot beat the failure timeout (1500 ms by default).
    assert!(v["detect_ms"].as_u64().unwrap() >= 1000, "{v}");
    assert!(v["converge_ms"].as_u64().is_some());
}

#[test]
fn bench_tcp_ceiling_streams_a_ring() {
    let out = run_shoal(&["bench", "tcp-ceiling", "--ring", "3", "--mib", "32"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    assert_eq!(v["ring"], 3);
    let (per, all) = (
        v["per_member_gbps"].as_f64().unwrap(),
        v["aggregate_gbps"].as_f64().unwrap(),
    );
    // Every member received all its bytes: the slowest rate is positive and at most a
    // third of the sum.
    assert!(per > 0.0 && per * 3.0 <= all * (1.0 + 1e-9), "{v}");
    assert_one_line_error(
        &run_shoal(&["bench", "tcp-ceiling", "--ring", "0"]),
        2,
        "--ring must be 1..=16",
    );
}
