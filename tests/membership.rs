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
    let api = nodes[0].api.unwrap().to_string();
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
}

#[test]
fn malformed_and_forged_gossip_is_rejected_and_counted() {
    use coordinator_free::{Capabilities, ControlMessage, Heartbeat, NodeId, ViewHash};
    let dir = TempDir::new("gossip");
    let nodes = start_cluster(&dir, 3, &["--debug-api"]);
    let refs: Vec<&Node> = nodes.iter().collect();
    let (_, hash, _) = wait_until("3 nodes in one view", BOUND, || agreed(&refs, 3));
    let api = nodes[0].api.unwrap();
    // Garbage bytes.
    http(api, "POST", "/v1/debug/gossip", b"\xff\x00garbage").unwrap();
    // A well-formed heartbeat that claims to be node 1, signed by node 0.
    let forged = ControlMessage::Heartbeat(Heartbeat {
        id: NodeId::new(nodes[1].id()).unwrap(),
        incarnation: 99,
        seq: 1,
        view_epoch: 1,
        view_hash: ViewHash::default(),
        caps: Capabilities::default(),
        addrs: vec![],
        data_addr: None,
    })
    .encode()
    .unwrap();
    http(api, "POST", "/v1/debug/gossip", &forged).unwrap();
    for n in &nodes[1..] {
        wait_until("both messages rejected", BOUND, || {
            let s = n.status()?;
            (s["counters"]["gossip_rejected"].as_u64()? >= 2).then_some(())
        });
        assert!(n.log().contains("rejected gossip message"));
        assert!(n.log().contains("rejected heartbeat for another peer"));
    }
    // Nobody crashed and the view did not change: node 1 is still at incarnation 1.
    let (_, hash_after, _) = wait_until("still one view", BOUND, || agreed(&refs, 3));
    assert_eq!(hash, hash_after);
}
