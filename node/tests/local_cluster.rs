//! `LocalCluster::start_agreed`: N real `shoal up` processes on 127.0.0.1 that agree on
//! one view, a killed node that the others drop, and the typed errors when they cannot.

use shoal_node::local::{LocalCluster, LocalError};
use std::path::{Path, PathBuf};
use std::time::Duration;

fn bin() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_shoal"))
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("shoal-local-cluster-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_agree_and_drop_a_killed_one() {
    let dir = tmp("agree");
    let bound = Duration::from_secs(60);
    let device = ["--device".to_string(), "cpu".to_string()];
    let (mut c, view) = LocalCluster::start_agreed(bin(), &dir, 3, &device, bound)
        .await
        .unwrap();
    let reports: Vec<_> = c
        .statuses()
        .await
        .into_iter()
        .map(|(_, r)| r.expect("every node answers"))
        .collect();
    // Each node computes on the device it was given and announces it with its free
    // memory and the speed measured on it; the others hear it in its heartbeats.
    for r in &reports {
        assert_eq!(r.members.len(), 2, "{:?}", r.members);
        for caps in r.members.iter().map(|m| &m.caps).chain([&r.node.caps]) {
            assert_eq!(caps.device, "cpu", "{caps:?}");
            assert!(caps.device_free_bytes > 0, "{caps:?}");
            assert!(caps.speed_mflops > 0, "{caps:?}");
        }
    }
    // `shoal status`'s table shows them for every member.
    let table = shoal_node::status::render_table(&reports[0]);
    for column in ["DEVICE", "FREE_GiB", "MFLOPS"] {
        assert!(table.contains(column), "{table}");
    }
    assert_eq!(table.matches(" cpu ").count(), 3, "{table}");
    let ids: Vec<String> = reports.into_iter().map(|r| r.node.id).collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(
        view.members, sorted,
        "the view holds exactly the three nodes"
    );
    c.kill(2);
    let after = c.wait_agreed(2, Some(&ids[2]), bound).await.unwrap();
    assert!(after.epoch > view.epoch, "{after:?} after {view:?}");
    assert!(!after.members.contains(&ids[2]));
    c.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn no_nodes_and_a_node_that_exits_are_typed_errors() {
    let dir = tmp("errors");
    let bound = Duration::from_secs(30);
    let none = LocalCluster::start_agreed(bin(), &dir, 0, &[], bound).await;
    assert!(matches!(none, Err(LocalError::NoNodes)));
    // A node that cannot start (a malformed flag) fails the start with its log, not a wait.
    let bad = ["--bootstrap".to_string(), "not-a-multiaddr".to_string()];
    match LocalCluster::start_agreed(bin(), &dir, 1, &bad, bound).await {
        Err(LocalError::Exited { node, log, .. }) if node == "node 0" => {
            let text = std::fs::read_to_string(&log).unwrap();
            assert!(text.contains("invalid --bootstrap address"), "{text}");
        }
        Err(e) => panic!("expected node 0 to exit, got {e}"),
        Ok(_) => panic!("expected node 0 to exit, got a cluster"),
    }
    let _ = std::fs::remove_dir_all(&dir);
}
