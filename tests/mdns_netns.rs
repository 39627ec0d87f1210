//! mDNS discovery with no bootstrap peer, inside network namespaces this test creates: a
//! bridge namespace and one namespace per node, joined by veth pairs created *inside* the
//! namespaces (the host's interfaces are never touched, and no multicast leaves them).
//! Skips, saying why, where `ip netns` is not permitted.

mod common;
use common::*;
use std::process::Command;
use std::time::Duration;

struct Namespaces {
    names: Vec<String>,
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = Command::new("ip").args(["netns", "del", n]).status();
        }
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn in_ns(ns: &str, args: &[&str]) -> Result<(), String> {
    let mut a = vec!["netns", "exec", ns, "ip"];
    a.extend_from_slice(args);
    ip(&a)
}

/// Builds the namespaces; Err(reason) where that is not permitted here.
fn build(n: usize) -> Result<(Namespaces, Vec<String>), String> {
    let tag = std::process::id() % 100_000;
    let bridge = format!("shoal-br-{tag}");
    let mut guard = Namespaces { names: vec![] };
    ip(&["netns", "add", &bridge])?;
    guard.names.push(bridge.clone());
    in_ns(&bridge, &["link", "add", "br0", "type", "bridge"])?;
    in_ns(&bridge, &["link", "set", "br0", "up"])?;
    let mut nodes = Vec::new();
    for i in 0..n {
        let ns = format!("shoal-n{i}-{tag}");
        ip(&["netns", "add", &ns])?;
        guard.names.push(ns.clone());
        let port = format!("p{i}");
        in_ns(
            &bridge,
            &[
                "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ],
        )?;
        in_ns(&bridge, &["link", "set", &port, "master", "br0"])?;
        in_ns(&bridge, &["link", "set", &port, "up"])?;
        let addr = format!("10.77.0.{}/24", i + 1);
        in_ns(&ns, &["addr", "add", &addr, "dev", "eth0"])?;
        in_ns(&ns, &["link", "set", "eth0", "up"])?;
        in_ns(&ns, &["link", "set", "lo", "up"])?;
        in_ns(&ns, &["route", "add", "224.0.0.0/4", "dev", "eth0"])?;
        nodes.push(ns);
    }
    Ok((guard, nodes))
}

#[test]
fn three_nodes_converge_by_mdns_alone_in_namespaces() {
    let (_guard, namespaces) = match build(3) {
        Ok(x) => x,
        Err(why) => {
            eprintln!("SKIP three_nodes_converge_by_mdns_alone_in_namespaces: network namespaces not permitted here ({why})");
            return;
        }
    };
    let dir = TempDir::new("mdns");
    let nodes: Vec<Node> = namespaces
        .iter()
        .enumerate()
        .map(|(i, ns)| {
            let listen = format!("/ip4/10.77.0.{}/tcp/0", i + 1);
            let data = format!("10.77.0.{}:0", i + 1);
            // mDNS on (the default), no bootstrap peers.
            Node::start_with_prefix(
                &dir.0.join(format!("node-{i}")),
                &["--listen", &listen, "--data-listen", &data],
                &["ip", "netns", "exec", ns],
            )
        })
        .collect();
    let refs: Vec<&Node> = nodes.iter().collect();
    let (_, _, members) = wait_until(
        "3 nodes in one view via mDNS",
        Duration::from_secs(60),
        || agreed(&refs, 3),
    );
    assert_eq!(members.len(), 3);
    for n in &nodes {
        assert!(n.log().contains("discovered peer via mDNS"), "{}", n.log());
        assert!(
            !n.args.iter().any(|a| a == "--bootstrap"),
            "discovery must come from mDNS alone"
        );
    }
}
