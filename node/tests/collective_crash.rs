//! A member process killed with SIGKILL in the middle of an all-reduce: every survivor's
//! call returns an error within its bound, never a hang and never a result.

mod common;
use common::*;
use std::time::{Duration, Instant};

#[test]
fn sigkill_mid_allreduce_errors_on_every_survivor() {
    for transport in ["quic", "tcp"] {
        let dir = TempDir::new(&format!("crash-{transport}"));
        let mut args: Vec<&str> = LOOPBACK.to_vec();
        args.extend_from_slice(&["--debug-api", "--data-plane", transport]);
        let first = Node::start(&dir.0.join("node-0"), &args);
        let boot = first.tcp_addr();
        let mut nodes = vec![first];
        for i in 1..3 {
            let mut a = args.clone();
            a.extend_from_slice(&["--bootstrap", &boot]);
            nodes.push(Node::start(&dir.0.join(format!("node-{i}")), &a));
        }
        let refs: Vec<&Node> = nodes.iter().collect();
        wait_until("3 nodes in one view", Duration::from_secs(30), || {
            agreed(&refs, 3)
        });
        // 256 MiB per member, many iterations: far longer than it takes to kill one.
        let path = "/v1/debug/allreduce?bytes=268435456&iters=50&warmup=0&tag=1000";
        let calls: Vec<_> = nodes
            .iter()
            .map(|n| {
                let api = n.api().unwrap();
                std::thread::spawn(move || {
                    let t = Instant::now();
                    let r = http_timeout(api, "POST", path, &[], Duration::from_secs(60));
                    (r, t.elapsed())
                })
            })
            .collect();
        // Kill node 2 once it is moving payload.
        wait_until("payload flowing", Duration::from_secs(30), || {
            let s = nodes[2].status()?;
            (s["node"]["data_plane"]["stats"]["bytes_received"].as_u64()? > 0).then_some(())
        });
        nodes[2].kill();
        let killed = Instant::now();
        let mut calls = calls.into_iter();
        for (i, c) in calls.by_ref().take(2).enumerate() {
            let (r, _) = c.join().unwrap();
            let waited = killed.elapsed();
            let err = r.expect_err("a survivor must not report success");
            assert!(err.starts_with("409"), "node {i} ({transport}): {err}");
            // Bound: a closed link fails at once; a silent one (QUIC sends nothing when a
            // process dies) after the segment bound (floor 2 s) or when membership drops
            // the member (1.5 s) and its connections are closed. Leave room for a loaded
            // 2-core machine.
            assert!(
                waited < Duration::from_secs(10),
                "node {i} ({transport}) took {waited:?}"
            );
            eprintln!("{transport}: survivor {i} failed {waited:?} after the kill: {err}");
        }
        // The killed node's call fails too (its HTTP connection dies with it).
        let (r, _) = calls.next().unwrap().join().unwrap();
        assert!(r.is_err());
    }
}
