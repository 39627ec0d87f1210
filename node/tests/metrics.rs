//! `GET /metrics` parses with the reference Prometheus text parser (Python
//! `prometheus_client`, installed by scripts/setup) and reports real values.

mod common;
use common::*;
use std::time::Duration;

#[test]
fn metrics_parse_with_prometheus_parser_and_match_the_cluster() {
    let Some(python) = std::env::var_os("SHOAL_PYTHON") else {
        eprintln!("SKIP metrics test: SHOAL_PYTHON unset (run through scripts/test)");
        return;
    };
    let dir = TempDir::new("metrics");
    let mut args: Vec<&str> = LOOPBACK.to_vec();
    args.extend_from_slice(&["--debug-api", "--data-plane", "tcp"]);
    let a = Node::start(&dir.0.join("a"), &args);
    let boot = a.tcp_addr();
    let mut b_args = args.clone();
    b_args.extend_from_slice(&["--bootstrap", &boot]);
    let b = Node::start(&dir.0.join("b"), &b_args);
    wait_until("2 nodes in one view", Duration::from_secs(30), || {
        agreed(&[&a, &b], 2)
    });
    // Three collectives (a barrier and two all-reduces) feed the latency histogram.
    let path = "/v1/debug/allreduce?bytes=65536&iters=2&warmup=0&tag=7";
    let calls: Vec<_> = [a.api().unwrap(), b.api().unwrap()]
        .into_iter()
        .map(|api| {
            std::thread::spawn(move || {
                http_timeout(api, "POST", path, &[], Duration::from_secs(30))
            })
        })
        .collect();
    for c in calls {
        c.join().unwrap().unwrap();
    }
    let text = String::from_utf8(http(a.api().unwrap(), "GET", "/metrics", &[]).unwrap()).unwrap();
    let m = prometheus_parse(&python, &dir.0, &text);
    let get = |k: &str| {
        m[k].as_f64()
            .unwrap_or_else(|| panic!("{k} missing from\n{text}"))
    };
    assert_eq!(get("shoal_view_members{}"), 2.0);
    assert!(get("shoal_view_epoch{}") >= 1.0);
    // The node's process memory: tens of MiB at least (libtorch is linked), at most its peak.
    let (rss, peak) = (
        get("shoal_resident_memory_bytes{}"),
        get("shoal_resident_memory_peak_bytes{}"),
    );
    assert!(rss > 16.0 * 1048576.0 && rss <= peak, "{rss} {peak}");
    assert_eq!(get(r#"shoal_members_known{"state": "alive"}"#), 1.0);
    assert!(get("shoal_heartbeats_sent_total{}") >= 1.0);
    assert!(get(r#"shoal_gossip_messages_total{"verdict": "accepted"}"#) >= 1.0);
    assert_eq!(get(r#"shoal_collectives_total{"outcome": "ok"}"#), 3.0);
    assert_eq!(get("shoal_collective_duration_seconds_count{}"), 3.0);
    assert_eq!(
        get(r#"shoal_collective_duration_seconds_bucket{"le": "+Inf"}"#),
        3.0
    );
    // Two all-reduces of 64 KiB between two members: each sends 64 KiB, plus the barrier.
    assert!(
        get(r#"shoal_plane_bytes_total{"direction": "sent", "plane": "data"}"#) >= 2.0 * 65536.0
    );
    assert!(get(r#"shoal_plane_bytes_total{"direction": "received", "plane": "control"}"#) > 0.0);
}
