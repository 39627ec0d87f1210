//! Collectives over real loopback sockets, several members in one process: exact results
//! against a reference, failure bounds, view mismatch, non-members.

use coordinator_free::{NodeId, ReduceOp, View, ViewMember};
use half::{bf16, f16};
use libp2p::identity::Keypair;
use shoal_node::data_plane::{
    DataPlane, DataPlaneConfig, DataPlaneError, DataTransport, Element, Roster,
};
use std::collections::HashMap;
use std::time::{Duration, Instant};

async fn members(
    n: usize,
    transport: DataTransport,
    cfg: DataPlaneConfig,
) -> (Vec<DataPlane>, View) {
    let mut dps = Vec::new();
    for _ in 0..n {
        let cfg = DataPlaneConfig {
            transport,
            quic_initial_mtu: 8192,
            ..cfg.clone()
        };
        dps.push(
            DataPlane::bind(
                Keypair::generate_ed25519(),
                "127.0.0.1:0".parse().unwrap(),
                cfg,
            )
            .await
            .unwrap(),
        );
    }
    let view = View::new(
        7,
        dps.iter()
            .map(|d| ViewMember {
                id: d.me().clone(),
                incarnation: 1,
            })
            .collect(),
    );
    // Ring order is sorted ids: put the data planes in that order.
    dps.sort_by(|a, b| a.me().cmp(b.me()));
    let addrs: HashMap<NodeId, _> = dps
        .iter()
        .map(|d| (d.me().clone(), d.local_addr()))
        .collect();
    for d in &dps {
        d.set_roster(Roster {
            view: view.clone(),
            addrs: addrs.clone(),
        });
    }
    (dps, view)
}

fn value(rank: usize, i: usize) -> f32 {
    ((rank * 7 + i * 3) % 16) as f32
}

trait FromF32: Element {
    fn from(x: f32) -> Self;
}
impl FromF32 for f32 {
    fn from(x: f32) -> f32 {
        x
    }
}
impl FromF32 for f16 {
    fn from(x: f32) -> f16 {
        f16::from_f32(x)
    }
}
impl FromF32 for bf16 {
    fn from(x: f32) -> bf16 {
        bf16::from_f32(x)
    }
}

async fn check_all_reduce<T: FromF32>(
    dps: &[DataPlane],
    view: &View,
    len: usize,
    op: ReduceOp,
    tag: u64,
) {
    let n = dps.len();
    let futs = dps.iter().enumerate().map(|(r, d)| {
        let view = view.clone();
        let d = d.clone();
        async move {
            let mut buf: Vec<T> = (0..len).map(|i| T::from(value(r, i))).collect();
            d.all_reduce(&view, tag, &mut buf, op).await.map(|()| buf)
        }
    });
    let results = futures::future::join_all(futs).await;
    let expected: Vec<T> = (0..len)
        .map(|i| {
            let sum: f32 = (0..n).map(|r| value(r, i)).sum();
            match op {
                ReduceOp::Sum => T::from(sum),
                ReduceOp::Avg => T::from(sum / n as f32),
            }
        })
        .collect();
    for (r, res) in results.into_iter().enumerate() {
        let got = res.unwrap_or_else(|e| panic!("rank {r} n={n} len={len}: {e}"));
        assert!(
            got == expected,
            "rank {r} n={n} len={len} {:?} {op:?}: wrong result",
            T::DTYPE
        );
    }
}

async fn exact_matrix(transport: DataTransport, ns: &[usize]) {
    let mut tag = 0;
    for &n in ns {
        let (dps, view) = members(n, transport, DataPlaneConfig::default()).await;
        for len in [1, 7, n - 1, 1_000_003] {
            for op in [ReduceOp::Sum, ReduceOp::Avg] {
                tag += 1;
                check_all_reduce::<f32>(&dps, &view, len, op, tag).await;
                tag += 1;
                check_all_reduce::<f16>(&dps, &view, len, op, tag).await;
                tag += 1;
                check_all_reduce::<bf16>(&dps, &view, len, op, tag).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_reduce_exact_tcp_n2_to_5() {
    exact_matrix(DataTransport::Tcp, &[2, 3, 4, 5]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_reduce_exact_quic_n2_to_5() {
    exact_matrix(DataTransport::Quic, &[2, 3, 4, 5]).await;
}

/// With MTU discovery allowed up to loopback's 65,507 bytes, the QUIC paths grow past the
/// 16,000-byte handshake limit (quinn then batches more bytes than one UDP send carries,
/// and the socket splits the batch), and every all-reduce is still exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_paths_grow_past_the_handshake_limit_and_stay_exact() {
    let cfg = DataPlaneConfig {
        quic_max_mtu: 65_507,
        ..DataPlaneConfig::default()
    };
    let (dps, view) = members(3, DataTransport::Quic, cfg).await;
    let mut largest = 0;
    for round in 0..40u64 {
        check_all_reduce::<f32>(&dps, &view, 1 << 20, ReduceOp::Sum, 100 + round).await;
        for d in &dps {
            largest = largest.max(d.quic_path_mtus().await.into_iter().min().unwrap_or(0));
        }
        if largest > 16_000 && round >= 4 {
            break;
        }
    }
    assert!(
        largest > 16_000,
        "no QUIC path went past 16,000 bytes: {largest}"
    );
}

/// Compressed all-reduces (bf16, int8) of gradient-like values spanning six decades: every
/// member ends with bit-identical values, each within the compression's bound of the exact
/// sum, the members' error-feedback residuals add up to what was lost, and the bytes sent
/// are the compressed size (a member sends 2(n-1)/n of the buffer).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_all_reduce_is_bounded_and_identical_everywhere() {
    use coordinator_free::Compression;
    let grad = |rank: usize, i: usize| {
        let z = (rank as u64 * 1_000_003 + i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let u = (z >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
        u * 10f32.powi((i % 7) as i32 - 4)
    };
    let mut tag = 500;
    for (transport, n) in [
        (DataTransport::Tcp, 2),
        (DataTransport::Tcp, 3),
        (DataTransport::Quic, 3),
    ] {
        let (dps, view) = members(n, transport, DataPlaneConfig::default()).await;
        for len in [1, 5, 4099, 600_011] {
            for (c, op) in [
                (Compression::Bf16, ReduceOp::Sum),
                (Compression::Int8, ReduceOp::Sum),
                (Compression::Int8, ReduceOp::Avg),
            ] {
                tag += 1;
                let sent0: Vec<u64> = dps.iter().map(|d| d.stats().bytes_sent).collect();
                let futs = dps.iter().enumerate().map(|(r, d)| {
                    let (view, d) = (view.clone(), d.clone());
                    async move {
                        let mut buf: Vec<f32> = (0..len).map(|i| grad(r, i)).collect();
                        let mut residual = vec![f32::NAN; len];
                        d.all_reduce_with_feedback(&view, tag, &mut buf, op, c, Some(&mut residual))
                            .await
                            .map(|()| (buf, residual))
                    }
                });
                let (got, residuals): (Vec<Vec<f32>>, Vec<Vec<f32>>) =
                    futures::future::join_all(futs)
                        .await
                        .into_iter()
                        .map(|r| r.unwrap_or_else(|e| panic!("{c:?} n={n} len={len}: {e}")))
                        .unzip();
                let what = format!("{c:?} {op:?} {transport:?} n={n} len={len}");
                for g in &got[1..] {
                    assert!(
                        g.iter()
                            .zip(&got[0])
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{what}: members differ"
                    );
                }
                let div = if op == ReduceOp::Avg { n as f64 } else { 1.0 };
                // Bounds per element: bf16 rounds each of the n-1 partial sums and the
                // result (relative 2^-8 of the magnitudes summed); int8 errs by at most
                // half a step per encoding, a step being 1/127 of the largest magnitude in
                // the value's block (1024 values from the start of its ring chunk).
                let abs_sum = |i: usize| (0..n).map(|r| f64::from(grad(r, i).abs())).sum::<f64>();
                for k in 0..n {
                    let chunk = coordinator_free::Ring::chunk(len, n, k);
                    for blk in chunk.clone().step_by(1024) {
                        let block = blk..(blk + 1024).min(chunk.end);
                        let block_max = block.clone().map(abs_sum).fold(0.0, f64::max);
                        for i in block {
                            let exact: f64 =
                                (0..n).map(|r| f64::from(grad(r, i))).sum::<f64>() / div;
                            let bound = match c {
                                Compression::Bf16 => abs_sum(i) * n as f64 * 2f64.powi(-8) / div,
                                _ => block_max * n as f64 / 127.0 / div,
                            };
                            let y = got[0][i];
                            assert!(
                                (f64::from(y) - exact).abs() <= bound + 1e-12,
                                "{what}: element {i}: {y} vs {exact} (bound {bound})"
                            );
                        }
                    }
                }
                // Error feedback: the members' residuals add up to what the compression
                // lost, the exact sum minus the result (in units of the sum), up to the f32
                // rounding of the partial sums.
                for i in 0..len {
                    let exact: f64 = (0..n).map(|r| f64::from(grad(r, i))).sum();
                    let lost = exact - f64::from(got[0][i]) * div;
                    let fed: f64 = residuals.iter().map(|r| f64::from(r[i])).sum();
                    let tol = abs_sum(i) * n as f64 * 2f64.powi(-21) + 1e-30;
                    assert!(
                        (fed - lost).abs() <= tol,
                        "{what}: element {i}: residuals add to {fed}, the loss was {lost}"
                    );
                }
                // Bytes: what each member sent is the compressed form of 2(n-1)/n of it.
                let sent: u64 = dps
                    .iter()
                    .zip(&sent0)
                    .map(|(d, s)| d.stats().bytes_sent - s)
                    .sum();
                let wire = c.wire_bytes(len) as f64;
                let expect = 2.0 * (n - 1) as f64 * wire;
                assert!(
                    (sent as f64 - expect).abs() <= 0.02 * expect + 16.0 * n as f64 * 4.0 + 64.0,
                    "{what}: {sent} bytes sent in all, expected about {expect}"
                );
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcast_all_gather_barrier_and_concurrent_tags() {
    for transport in [DataTransport::Tcp, DataTransport::Quic] {
        let (dps, view) = members(3, transport, DataPlaneConfig::default()).await;
        let len = 300_001;
        // Broadcast from rank 1.
        let res = futures::future::join_all(dps.iter().enumerate().map(|(r, d)| {
            let (d, view) = (d.clone(), view.clone());
            async move {
                let mut buf: Vec<f32> = (0..len)
                    .map(|i| if r == 1 { value(1, i) } else { -1.0 })
                    .collect();
                d.broadcast(&view, 1, &mut buf, 1).await.map(|()| buf)
            }
        }))
        .await;
        let expected: Vec<f32> = (0..len).map(|i| value(1, i)).collect();
        for r in res {
            assert!(r.unwrap() == expected);
        }
        // All-gather.
        let res = futures::future::join_all(dps.iter().enumerate().map(|(r, d)| {
            let (d, view) = (d.clone(), view.clone());
            async move {
                let input: Vec<bf16> = (0..1000).map(|i| bf16::from_f32(value(r, i))).collect();
                let mut out = vec![bf16::ZERO; 3000];
                d.all_gather(&view, 2, &input, &mut out).await.map(|()| out)
            }
        }))
        .await;
        let expected: Vec<bf16> = (0..3)
            .flat_map(|r| (0..1000).map(move |i| bf16::from_f32(value(r, i))))
            .collect();
        for r in res {
            assert!(r.unwrap() == expected);
        }
        // Barrier.
        let res = futures::future::join_all(dps.iter().map(|d| {
            let (d, view) = (d.clone(), view.clone());
            async move { d.barrier(&view, 3).await }
        }))
        .await;
        assert!(res.iter().all(Result::is_ok));
        // Two all-reduces at once with distinct tags (gradient buckets).
        let res = futures::future::join_all(dps.iter().enumerate().map(|(r, d)| {
            let (d, view) = (d.clone(), view.clone());
            async move {
                let mut a: Vec<f32> = (0..50_000).map(|i| value(r, i)).collect();
                let mut b: Vec<f32> = (0..70_000).map(|i| value(r, i + 1)).collect();
                let (x, y) = tokio::join!(
                    d.all_reduce(&view, 10, &mut a, ReduceOp::Sum),
                    d.all_reduce(&view, 11, &mut b, ReduceOp::Sum)
                );
                x.and(y).map(|()| (a, b))
            }
        }))
        .await;
        let ea: Vec<f32> = (0..50_000)
            .map(|i| (0..3).map(|r| value(r, i)).sum())
            .collect();
        let eb: Vec<f32> = (0..70_000)
            .map(|i| (0..3).map(|r| value(r, i + 1)).sum())
            .collect();
        for r in res {
            let (a, b) = r.unwrap();
            assert!(a == ea && b == eb);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_killed_mid_collective_errors_everywhere_within_bound() {
    for transport in [DataTransport::Tcp, DataTransport::Quic] {
        let cfg = DataPlaneConfig {
            timeout_floor: Duration::from_secs(1),
            start_timeout: Duration::from_secs(3),
            ..Default::default()
        };
        let (dps, view) = members(3, transport, cfg).await;
        let len = 32 << 20; // 128 MiB of f32: long enough to be killed midway
        let mut tasks = Vec::new();
        for (r, d) in dps.iter().enumerate() {
            let (d, view) = (d.clone(), view.clone());
            tasks.push(tokio::spawn(async move {
                let mut buf = vec![r as f32; len];
                let t = Instant::now();
                let res = d.all_reduce(&view, 99, &mut buf, ReduceOp::Sum).await;
                (res, t.elapsed())
            }));
        }
        // Kill rank 2 once bytes are flowing: its links drop as a crashed process's would.
        let d2 = dps[2].clone();
        while d2.stats().bytes_received == 0 {
            tokio::task::yield_now().await;
        }
        let victim = tasks.pop().unwrap();
        victim.abort();
        let killed_at = Instant::now();
        for t in tasks {
            let (res, _) = t.await.unwrap();
            let err = res.expect_err("a survivor must not succeed");
            // Bound: a closed link is an immediate error; a stalled one waits at most the
            // segment bound (floor 1 s here) or the start bound (3 s).
            assert!(
                killed_at.elapsed() < Duration::from_secs(5),
                "{transport:?}: took {:?}",
                killed_at.elapsed()
            );
            assert!(
                matches!(
                    err,
                    DataPlaneError::Io { .. } | DataPlaneError::Timeout { .. }
                ),
                "{err}"
            );
        }
    }
}

/// A member that stops taking part between collectives, as a dead QUIC peer does (it sends
/// nothing, not even a reset): once the roster drops it, survivors waiting for its first
/// header or its acknowledgement fail at once instead of at the 30 s start bound, and a
/// collective started on the old view afterwards fails without waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_dropped_from_the_roster_fails_waiting_collectives_at_once() {
    let (dps, view) = members(3, DataTransport::Quic, DataPlaneConfig::default()).await;
    let start = |tag: u64| {
        dps[..2]
            .iter()
            .map(|d| {
                let (d, view) = (d.clone(), view.clone());
                tokio::spawn(async move {
                    let mut buf = vec![1.0f32; 1024];
                    d.all_reduce(&view, tag, &mut buf, ReduceOp::Sum).await
                })
            })
            .collect::<Vec<_>>()
    };
    // Rank 2 never joins: rank 0 waits for its header, rank 1 for its acknowledgement.
    let waiting = start(1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let gone = dps[2].me().clone();
    let survivors = View::new(
        view.epoch + 1,
        view.members
            .iter()
            .filter(|m| m.id != gone)
            .cloned()
            .collect(),
    );
    let addrs: HashMap<NodeId, _> = dps[..2]
        .iter()
        .map(|d| (d.me().clone(), d.local_addr()))
        .collect();
    let dropped = Instant::now();
    for d in &dps[..2] {
        d.set_roster(Roster {
            view: survivors.clone(),
            addrs: addrs.clone(),
        });
    }
    for (r, t) in waiting.into_iter().enumerate() {
        let err = t.await.unwrap().expect_err("rank 2 never took part");
        assert!(
            matches!(err, DataPlaneError::Left(_) | DataPlaneError::Io { .. }),
            "rank {r}: {err}"
        );
    }
    assert!(
        dropped.elapsed() < Duration::from_secs(5),
        "{:?}",
        dropped.elapsed()
    );
    // A collective on the old view, started now: fails at once on both survivors.
    let again = Instant::now();
    for (r, t) in start(2).into_iter().enumerate() {
        let err = t.await.unwrap().expect_err("the old view lost a member");
        assert!(
            matches!(err, DataPlaneError::Left(_) | DataPlaneError::NoAddress(_)),
            "rank {r}: {err}"
        );
    }
    assert!(
        again.elapsed() < Duration::from_secs(5),
        "{:?}",
        again.elapsed()
    );
}

/// A collective of a view that is replaced while it waits for a member that stays (that
/// member abandoned the old view's collectives and will never start this one, as a
/// survivor does after its link to a killed member failed) fails at once with
/// `Superseded`, not at the 30 s start bound; one started on the replaced view afterwards
/// fails without waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_view_fails_collectives_waiting_on_members_that_stay() {
    for transport in [DataTransport::Tcp, DataTransport::Quic] {
        let (dps, view) = members(3, transport, DataPlaneConfig::default()).await;
        let start = |tag: u64| {
            let (d, view) = (dps[0].clone(), view.clone());
            tokio::spawn(async move {
                let mut buf = vec![1.0f32; 1024];
                d.all_reduce(&view, tag, &mut buf, ReduceOp::Sum).await
            })
        };
        // Ranks 1 and 2 never start: rank 0 waits for its left neighbour's header.
        let waiting = start(1);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let next = View::new(view.epoch + 1, view.members.clone());
        let addrs: HashMap<NodeId, _> = dps
            .iter()
            .map(|d| (d.me().clone(), d.local_addr()))
            .collect();
        let replaced = Instant::now();
        dps[0].set_roster(Roster { view: next, addrs });
        let err = waiting.await.unwrap().expect_err("nobody else took part");
        assert!(
            matches!(
                err,
                DataPlaneError::Superseded { .. } | DataPlaneError::Io { .. }
            ),
            "{transport:?}: {err}"
        );
        assert!(
            replaced.elapsed() < Duration::from_secs(5),
            "{:?}",
            replaced.elapsed()
        );
        let again = Instant::now();
        let err = start(2).await.unwrap().expect_err("the view was replaced");
        assert!(
            matches!(
                err,
                DataPlaneError::Superseded { .. } | DataPlaneError::Io { .. }
            ),
            "{transport:?}: {err}"
        );
        assert!(
            again.elapsed() < Duration::from_secs(5),
            "{:?}",
            again.elapsed()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn view_mismatch_is_refused_before_any_payload() {
    for transport in [DataTransport::Tcp, DataTransport::Quic] {
        let (dps, view) = members(2, transport, DataPlaneConfig::default()).await;
        let other = View::new(view.epoch + 1, view.members.clone());
        let (a, b) = tokio::join!(
            async {
                let mut buf = vec![1.0f32; 4096];
                dps[0].all_reduce(&view, 5, &mut buf, ReduceOp::Sum).await
            },
            async {
                let mut buf = vec![1.0f32; 4096];
                dps[1].all_reduce(&other, 5, &mut buf, ReduceOp::Sum).await
            }
        );
        assert!(
            matches!(a, Err(DataPlaneError::ViewMismatch { .. })),
            "{a:?}"
        );
        assert!(
            matches!(b, Err(DataPlaneError::ViewMismatch { .. })),
            "{b:?}"
        );
        for d in &dps {
            assert_eq!(d.stats().bytes_sent, 0, "no payload moved");
            assert_eq!(d.stats().bytes_received, 0, "no payload moved");
        }
    }
}

/// 100 outsiders per transport (each its own identity, each believing it is in a view with
/// the members) try a collective: all 100 are refused and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_member_connection_is_refused() {
    for transport in [DataTransport::Tcp, DataTransport::Quic] {
        let (dps, view) = members(2, transport, DataPlaneConfig::default()).await;
        let refused_before: u64 = dps.iter().map(|d| d.stats().refused).sum();
        let mut failed = 0;
        for _ in 0..100 {
            failed += u32::from(outsider_attempt(&dps, &view, transport).await.is_err());
        }
        let refused = dps.iter().map(|d| d.stats().refused).sum::<u64>() - refused_before;
        eprintln!(
            "{transport:?}: {failed}/100 outsider collectives failed, {refused} refusals counted"
        );
        assert_eq!(failed, 100, "{transport:?}");
        assert!(refused >= 100, "{transport:?}: {refused} refusals counted");
    }
}

/// One outsider's all-reduce with the members.
async fn outsider_attempt(
    dps: &[DataPlane],
    view: &View,
    transport: DataTransport,
) -> Result<(), shoal_node::data_plane::DataPlaneError> {
    {
        // An outsider that believes it is in a view with the members.
        let outsider = DataPlane::bind(
            Keypair::generate_ed25519(),
            "127.0.0.1:0".parse().unwrap(),
            DataPlaneConfig {
                transport,
                start_timeout: Duration::from_secs(2),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let mut fake = view.members.clone();
        fake.push(ViewMember {
            id: outsider.me().clone(),
            incarnation: 1,
        });
        let fake = View::new(view.epoch, fake);
        let mut addrs: HashMap<NodeId, _> = dps
            .iter()
            .map(|d| (d.me().clone(), d.local_addr()))
            .collect();
        addrs.insert(outsider.me().clone(), outsider.local_addr());
        outsider.set_roster(Roster {
            view: fake.clone(),
            addrs,
        });
        let mut buf = vec![1.0f32; 1024];
        outsider.all_reduce(&fake, 1, &mut buf, ReduceOp::Sum).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_answering_under_another_identity_is_refused() {
    for transport in [DataTransport::Tcp, DataTransport::Quic] {
        let (dps, view) = members(
            3,
            transport,
            DataPlaneConfig {
                start_timeout: Duration::from_secs(2),
                ..Default::default()
            },
        )
        .await;
        // Rank 0 believes its right neighbour (rank 1) listens where rank 2 does: whoever
        // answers there cannot prove rank 1's identity, so nothing may be sent.
        let mut addrs: HashMap<NodeId, _> = dps
            .iter()
            .map(|d| (d.me().clone(), d.local_addr()))
            .collect();
        addrs.insert(dps[1].me().clone(), dps[2].local_addr());
        dps[0].set_roster(Roster {
            view: view.clone(),
            addrs,
        });
        let mut buf = vec![1.0f32; 1024];
        let r = dps[0].all_reduce(&view, 42, &mut buf, ReduceOp::Sum).await;
        assert!(
            matches!(r, Err(DataPlaneError::Auth { .. })),
            "{transport:?}: {r:?}"
        );
        assert_eq!(
            dps[0].stats().bytes_sent,
            0,
            "{transport:?}: no payload to an impostor"
        );
    }
}

/// Service streams (what serving's stage RPC runs on) over both transports: bytes go both
/// ways between members, a member that runs no such service refuses the stream, and a peer
/// outside the roster has no address.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_streams_reach_members_that_accept_them() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    for transport in [DataTransport::Tcp, DataTransport::Quic] {
        let (dps, _view) = members(2, transport, DataPlaneConfig::default()).await;
        let mut inbound = dps[1].accept_streams();
        let opener = dps[0].me().clone();
        let server = tokio::spawn(async move {
            let mut s = inbound.recv().await.expect("an inbound stream");
            assert_eq!(s.peer, opener);
            assert_eq!(s.service, 9);
            let mut got = [0u8; 5];
            s.r.read_exact(&mut got).await.unwrap();
            got.reverse();
            s.w.write_all(&got).await.unwrap();
            s.w.flush().await.unwrap();
        });
        let mut s = dps[0].open_stream(dps[1].me(), 9).await.unwrap();
        assert_eq!((&s.peer, s.service), (dps[1].me(), 9));
        s.w.write_all(b"hello").await.unwrap();
        s.w.flush().await.unwrap();
        let mut back = [0u8; 5];
        s.r.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"olleh", "{transport:?}");
        server.await.unwrap();
        dps[0].count_bytes(5, 5);
        assert_eq!(
            (dps[0].stats().bytes_sent, dps[0].stats().bytes_received),
            (5, 5)
        );

        // dps[0] registered no acceptor: its refusal is an error at the opener.
        let r = dps[1].open_stream(dps[0].me(), 9).await;
        assert!(
            matches!(r, Err(DataPlaneError::OpMismatch { .. })),
            "{transport:?}: {:?}",
            r.err()
        );

        let stranger = NodeId::new(
            Keypair::generate_ed25519()
                .public()
                .to_peer_id()
                .to_base58(),
        )
        .unwrap();
        let r = dps[0].open_stream(&stranger, 9).await;
        assert!(
            matches!(r, Err(DataPlaneError::NoAddress(_))),
            "{transport:?}: {:?}",
            r.err()
        );
    }
}

/// The wait counter: a member that starts an all-reduce 300 ms before its peer counts
/// about 300 ms of waiting, the late one next to none; four concurrent all-reduces (a
/// step's buckets) that wait together count once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_a_late_peer_is_counted_once() {
    let (dps, view) = members(2, DataTransport::Tcp, DataPlaneConfig::default()).await;
    // Links pooled first, so dialing is not part of what is measured.
    check_all_reduce::<f32>(&dps, &view, 1000, ReduceOp::Sum, 900).await;
    let late = Duration::from_millis(300);
    for buckets in [1u64, 4] {
        let before: Vec<Duration> = dps.iter().map(|d| d.wait_time()).collect();
        let futs = dps.iter().enumerate().map(|(r, d)| {
            let (d, view) = (d.clone(), view.clone());
            async move {
                if r == 1 {
                    tokio::time::sleep(late).await;
                }
                let started = Instant::now();
                let all = (0..buckets).map(|b| {
                    let (d, view) = (d.clone(), view.clone());
                    async move {
                        let mut buf = vec![1f32; 4096];
                        d.all_reduce(&view, 1000 + 10 * buckets + b, &mut buf, ReduceOp::Sum)
                            .await
                    }
                });
                for r in futures::future::join_all(all).await {
                    r.unwrap();
                }
                started.elapsed()
            }
        });
        let took = futures::future::join_all(futs).await;
        let waited: Vec<Duration> = dps
            .iter()
            .zip(&before)
            .map(|(d, b)| d.wait_time() - *b)
            .collect();
        assert!(
            waited[0] >= late.mul_f64(0.8) && waited[0] <= took[0],
            "{buckets} buckets: the early member waited {:?} of {:?}",
            waited[0],
            took[0]
        );
        assert!(
            waited[1] < Duration::from_millis(100),
            "{buckets} buckets: the late member waited {:?}",
            waited[1]
        );
        let s = dps[0].stats();
        assert!((s.wait_s - dps[0].wait_time().as_secs_f64()).abs() < 0.05);
    }
}
