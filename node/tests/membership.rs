//! Membership across real `shoal up` processes on 127.0.0.1 (mDNS off, bootstrap only).

mod common;
use common::*;
use std::time::Duration;

const BOUND: Duration = Duration::from_secs(30);

fn start_cluster(dir: &TempDir, n: usize, extra: &[&str]) -> Vec<Node> {
    let mut args: Vec<&str> = LOOPBACK.to_vec();
    args.extend_from_slice(extra);
    let first = Node::start(&dir.0.join("node-0"), &args);
    let boot = first.tcp_addr();
    let mut nodes = vec![first];
    for i in 1..n {
        let mut a = args.clone();
        a.extend_from_slice(&["--bootstrap", &boot]);
        nodes.push(Node::start(&dir.0.join(format!("node-{i}")), &a));
    }
    nodes
}

#[test]
fn six_nodes_converge_via_bootstrap() {
    let dir = TempDir::new("six");
    let nodes = start_cluster(&dir, 6, &[]);
    let refs: Vec<&Node> = nodes.iter().collect();
    let (_, _, members) = wait_until("6 nodes in one view", BOUND, || agreed(&refs, 6));
    let mut ids: Vec<String> = nodes.iter().map(|n| n.id()).collect();
    ids.sort();
    assert_eq!(
        members, ids,
        "the view is exactly the six peer ids, in sorted order"
    );
    // The human-readable `shoal status` lists every member (by the short form of its id).
    let api = nodes[0].api().unwrap().to_string();
    let out = run_shoal(&["status", "--api", &api]);
    assert!(out.status.success());
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("with 6 members"), "{table}");
    for id in &ids {
        assert!(
            table.contains(&id[id.len() - 8..]),
            "{id} missing from\n{table}"
        );
    }
    // Capabilities travel with heartbeats.
    let s = nodes[0].status().unwrap();
    for m in s["members"].as_array().unwrap() {
        assert!(m["caps"]["cores"].as_u64().unwrap() >= 1);
        assert!(m["caps"]["ram_bytes"].as_u64().unwrap() > 0);
        assert_eq!(m["state"], "alive");
    }
}

#[test]
fn killed_node_leaves_and_rejoins_with_same_id() {
    let dir = TempDir::new("kill");
    let mut nodes = start_cluster(&dir, 3, &[]);
    let refs: Vec<&Node> = nodes.iter().collect();
    let (epoch0, _, _) = wait_until("3 nodes in one view", BOUND, || agreed(&refs, 3));
    let victim_id = nodes[2].id();
    nodes[2].kill();
    let survivors: Vec<&Node> = nodes[..2].iter().collect();
    let (epoch1, _, members) = wait_until("survivors drop the killed node", BOUND, || {
        agreed(&survivors, 2)
    });
    assert!(!members.contains(&victim_id));
    assert!(epoch1 > epoch0);
    nodes[2].restart();
    assert_eq!(nodes[2].id(), victim_id, "same data dir, same peer id");
    let refs: Vec<&Node> = nodes.iter().collect();
    let (epoch2, _, members) = wait_until("restarted node rejoins", BOUND, || agreed(&refs, 3));
    assert!(members.contains(&victim_id));
    assert!(epoch2 > epoch1);
    let s = nodes[0].status().unwrap();
    let m = s["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == victim_id.as_str())
        .unwrap();
    assert_eq!(m["incarnation"], 2, "the restart is a new incarnation");
}

#[test]
fn node_with_another_swarm_key_never_joins() {
    let dir = TempDir::new("psk");
    let key_a = dir.0.join("a.key");
    let key_b = dir.0.join("b.key");
    for k in [&key_a, &key_b] {
        let out = run_shoal(&["keygen", "--swarm-key", k.to_str().unwrap()]);
        assert!(out.status.success(), "{out:?}");
    }
    let a = key_a.to_str().unwrap();
    let nodes = start_cluster(&dir, 2, &["--swarm-key", a]);
    let refs: Vec<&Node> = nodes.iter().collect();
    wait_until("the two keyed nodes converge", BOUND, || agreed(&refs, 2));
    let mut args: Vec<&str> = LOOPBACK.to_vec();
    let boot = nodes[0].tcp_addr();
    args.extend_from_slice(&["--swarm-key", key_b.to_str().unwrap(), "--bootstrap", &boot]);
    let intruder = Node::start(&dir.0.join("intruder"), &args);
    let intruder_id = intruder.id();
    // Wait for the evidence that the intruder tried: node 0 refused its handshake.
    wait_until("node 0 to refuse the handshake", BOUND, || {
        let s = nodes[0].status()?;
        (s["counters"]["handshakes_refused"].as_u64()? >= 1).then_some(())
    });
    assert!(
        nodes[0].log().contains("refused handshake"),
        "{}",
        nodes[0].log()
    );
    // Let the intruder run through several heartbeat intervals, then check every view.
    wait_until("intruder uptime 2 s", BOUND, || {
        (intruder.status()?["node"]["uptime_ms"].as_u64()? > 2000).then_some(())
    });
    for n in &nodes {
        let s = n.status().unwrap();
        let (_, _, members) = view_of(&s);
        assert_eq!(members.len(), 2);
        assert!(!members.contains(&intruder_id));
        assert!(s["members"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["id"] != intruder_id.as_str()));
    }
    let (_, _, alone) = view_of(&intruder.status().unwrap());
    assert_eq!(alone, vec![intruder_id]);
    // 100 dials with the wrong key and 100 with none, from one process: every one refused
    // in the handshake, each with a log line naming where it came from.
    let refusals = || {
        nodes[0].status().unwrap()["counters"]["handshakes_refused"]
            .as_u64()
            .unwrap()
    };
    let before = refusals();
    for key in [Some(key_b.to_str().unwrap()), None] {
        let start = refusals();
        let mut args = vec![
            "bench",
            "dial",
            &boot,
            "--count",
            "100",
            "--timeout-ms",
            "1000",
        ];
        if let Some(k) = key {
            args.extend_from_slice(&["--swarm-key", k]);
        }
        let out = run_shoal(&args);
        assert!(out.status.success(), "{out:?}");
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        // The dialer may not hear the refusal (it waits out its bound); the node counts it.
        assert_eq!(r["upgraded"], 0, "{r}");
        let n = wait_until("node 0 to count 100 refusals", BOUND, || {
            let n = refusals() - start;
            (n >= 100).then_some(n)
        });
        eprintln!(
            "dials with {}: {r}; node 0 refused {n}",
            key.map_or("no key", |_| "a wrong key")
        );
    }
    let refused = refusals() - before;
    let lines = nodes[0]
        .log()
        .lines()
        .filter(|l| l.contains("refused handshake") && l.contains("from=/ip4/127.0.0.1/tcp/"))
        .count();
    assert!(lines >= 200, "{lines} log lines");
    eprintln!(
        "wrong or missing swarm key: 200/200 dials refused ({refused} counted, {lines} log lines)"
    );
    for n in &nodes {
        assert_eq!(view_of(&n.status().unwrap()).2.len(), 2);
    }
}

/// A flood of dials from one process (300, 64 at a time, each held open) against a node
/// limited to 8 connections (4 per peer): it never holds more than 8, keeps at most 4 of
/// the flooder's, refuses the rest (counted and logged), and its cluster carries on.
#[test]
fn a_dial_flood_from_one_process_stays_within_the_connection_limit() {
    let dir = TempDir::new("flood");
    let nodes = start_cluster(&dir, 2, &["--max-connections", "8"]);
    let refs: Vec<&Node> = nodes.iter().collect();
    let (_, hash, _) = wait_until("2 nodes in one view", BOUND, || agreed(&refs, 2));
    let boot = nodes[0].tcp_addr();
    let mut flood = std::process::Command::new(shoal_bin())
        .args([
            "bench",
            "dial",
            &boot,
            "--count",
            "300",
            "--concurrency",
            "64",
        ])
        .args(["--timeout-ms", "1000"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut most = 0;
    let mut samples = 0;
    while flood.try_wait().unwrap().is_none() {
        if let Some(s) = nodes[0].status() {
            most = most.max(s["node"]["connections"].as_u64().unwrap());
            samples += 1;
        }
    }
    let out = flood.wait_with_output().unwrap();
    assert!(out.status.success());
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let s = nodes[0].status().unwrap();
    eprintln!(
        "flood: {r}; node 0 held at most {most} connections over {samples} samples; refused {}",
        s["counters"]["handshakes_refused"]
    );
    assert!(samples > 0);
    assert!(most <= 8, "{most} connections");
    // One process is one peer: at most 4 connections per peer (the default) stay up.
    let n = |k: &str| r[k].as_u64().unwrap();
    assert_eq!(n("upgraded") + n("refused") + n("timed_out"), 300, "{r}");
    assert!(r["held"].as_u64().unwrap() <= 4, "{r}");
    assert!(s["counters"]["handshakes_refused"].as_u64().unwrap() >= 300 - 4);
    assert!(nodes[0].log().contains("refused handshake"));
    let (_, hash_after, _) = wait_until("still one view", BOUND, || agreed(&refs, 2));
    assert_eq!(hash, hash_after);
}

#[test]
fn malformed_and_forged_gossip_is_rejected_and_counted() {
    use coordinator_free::{Capabilities, ControlMessage, Heartbeat, NodeId, ViewHash};
    let dir = TempDir::new("gossip");
    let nodes = start_cluster(&dir, 3, &["--debug-api"]);
    let refs: Vec<&Node> = nodes.iter().collect();
    let (_, hash, _) = wait_until("3 nodes in one view", BOUND, || agreed(&refs, 3));
    let api = nodes[0].api().unwrap();
    // Garbage bytes.
    http(api, "POST", "/v1/debug/gossip", b"\xff\x00garbage").unwrap();
    let heartbeat = |id: &str, incarnation: u64, seq: u64| {
        ControlMessage::Heartbeat(Heartbeat {
            id: NodeId::new(id).unwrap(),
            incarnation,
            seq,
            view_epoch: 1,
            view_hash: ViewHash::default(),
            caps: Capabilities::default(),
            addrs: vec![],
            data_addr: None,
        })
        .encode()
        .unwrap()
    };
    // A well-formed heartbeat that claims to be node 1, signed by node 0.
    let forged = heartbeat(&nodes[1].id(), 99, 1);
    http(api, "POST", "/v1/debug/gossip", &forged).unwrap();
    for n in &nodes[1..] {
        wait_until("both messages rejected", BOUND, || {
            let s = n.status()?;
            (s["counters"]["gossip_rejected"].as_u64()? >= 2).then_some(())
        });
        assert!(n.log().contains("rejected gossip message"));
        assert!(n.log().contains("rejected heartbeat for another peer"));
    }
    // 100 forgeries (heartbeats claiming node 1 or 2, signed by node 0) and 100 replays
    // (node 0's own heartbeats with seqs it already sent): all refused, each logged naming
    // node 0.
    let me = nodes[0].id();
    let others = [nodes[1].id(), nodes[2].id()];
    for i in 0..100u64 {
        http(
            api,
            "POST",
            "/v1/debug/gossip",
            &heartbeat(&others[i as usize % 2], 1, 1000 + i),
        )
        .unwrap();
        http(
            api,
            "POST",
            "/v1/debug/gossip",
            &heartbeat(&me, 1, 1 + i % 3),
        )
        .unwrap();
    }
    for n in &nodes[1..] {
        let count = |what: &str| {
            n.log()
                .lines()
                .filter(|l| l.contains(what) && l.contains(&me))
                .count()
        };
        let (forged, replayed) = wait_until("200 more rejections", BOUND, || {
            let (f, r) = (
                count("rejected heartbeat for another peer"),
                count("rejected replayed heartbeat"),
            );
            (f >= 101 && r >= 100).then_some((f - 1, r))
        });
        eprintln!("forged heartbeats refused {forged}/100, replayed {replayed}/100");
        assert_eq!((forged, replayed), (100, 100));
    }
    // Nobody crashed and the view did not change: node 1 is still at incarnation 1.
    let (_, hash_after, _) = wait_until("still one view", BOUND, || agreed(&refs, 3));
    assert_eq!(hash, hash_after);
}
