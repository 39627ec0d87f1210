//! mDNS discovery with no bootstrap peer, inside network namespaces this test creates: a
//! bridge namespace and one namespace per node, joined by veth pairs created *inside* the
//! namespaces (the host's interfaces are never touched, and no multicast leaves them).
//! Skips, saying why, where `ip netns` is not permitted.

mod common;
use common::*;
use std::time::Duration;

#[test]
fn three_nodes_converge_by_mdns_alone_in_namespaces() {
    let (_guard, namespaces) = match netns::build(3) {
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
            !n.args().iter().any(|a| a == "--bootstrap"),
            "discovery must come from mDNS alone"
        );
    }
}
