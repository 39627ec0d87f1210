//! `shoal bench allreduce --backend nccl`: NCCL all-reduces of f32 CUDA tensors, one member
//! per GPU of this machine (a thread each, with its communicator from one minted id, as
//! a view's members build theirs), through shoal's NCCL module ([`shoal_node::nccl`]). The
//! lines match the ring's, so a lab can hold them against nccl-tests' `all_reduce_perf`
//! (`busbw` computed the same way: `algbw × 2(n−1)/n`). Each timed all-reduce waits for
//! its completion, as a training step does.

use crate::failure::{usage, Failure};
use anyhow::anyhow;

/// Runs the benchmark on `n` GPUs; one JSON line per size.
#[cfg(feature = "nccl")]
pub fn run(n: usize, sizes: &[u64], iters: u32, warmup: u32, json: bool) -> Result<(), Failure> {
    use coordinator_free::{NodeId, View, ViewMember};
    use shoal_node::nccl;
    nccl::available().map_err(|e| anyhow!("bench allreduce --backend nccl: {e}"))?;
    let gpus = shoal_node::device::cuda_device_count();
    if n == 0 || n > gpus {
        return Err(usage(anyhow!(
            "--nodes {n}: NCCL takes one member per GPU, and this machine has {gpus}"
        )));
    }
    let ids: Vec<NodeId> = (0..n)
        .map(|i| NodeId::new(format!("bench-gpu-{i}")).expect("valid id"))
        .collect();
    let members = ids
        .iter()
        .map(|id| ViewMember {
            id: id.clone(),
            incarnation: 1,
        })
        .collect();
    let view = View::new(1, members);
    let id = nccl::mint_id().map_err(anyhow::Error::from)?;
    let members: Vec<_> = ids
        .into_iter()
        .map(|me| {
            let (view, id, sizes) = (view.clone(), id.clone(), sizes.to_vec());
            std::thread::spawn(move || member(&view, &me, &id, &sizes, iters, warmup))
        })
        .collect();
    // Per size, the slowest member's mean.
    let mut worst = vec![0f64; sizes.len()];
    for m in members {
        let times = m
            .join()
            .map_err(|_| anyhow!("an NCCL member panicked"))?
            .map_err(|e| anyhow!("{e}"))?;
        for (w, t) in worst.iter_mut().zip(times) {
            *w = w.max(t);
        }
    }
    for (&bytes, &ms) in sizes.iter().zip(&worst) {
        let algbw = bytes as f64 / (ms / 1000.0) / 1e9;
        let busbw = algbw * 2.0 * (n as f64 - 1.0) / n as f64;
        let line = serde_json::json!({"nodes": n, "bytes": bytes, "time_ms": ms,
            "algbw_gbps": algbw, "busbw_gbps": busbw, "transport": "nccl", "iters": iters});
        println!("{line}");
        if !json {
            eprintln!("{n} GPUs, {bytes} bytes over NCCL: {ms:.3} ms, busbw {busbw:.2} GB/s");
        }
    }
    Ok(())
}

/// One member: its communicator on GPU `rank`, then per size a checked all-reduce, the
/// warm-up and the timed ones; the mean ms per size.
#[cfg(feature = "nccl")]
fn member(
    view: &coordinator_free::View,
    me: &coordinator_free::NodeId,
    id: &[u8],
    sizes: &[u64],
    iters: u32,
    warmup: u32,
) -> Result<Vec<f64>, String> {
    use coordinator_free::ReduceOp;
    use std::time::{Duration, Instant};
    let bound = Duration::from_secs(120);
    let rank = view.position(me).ok_or("not in the view")?;
    let mut comm =
        shoal_node::nccl::NcclComm::init(view, me, id, rank, bound).map_err(|e| e.to_string())?;
    let n = view.len() as f64;
    let device = tch::Device::Cuda(rank);
    let mut out = Vec::with_capacity(sizes.len());
    for &bytes in sizes {
        let len = (bytes / 4).max(1) as i64;
        let mut t = tch::Tensor::full([len], rank as f64 + 1.0, (tch::Kind::Float, device));
        comm.all_reduce_(&mut t, ReduceOp::Sum, bound)
            .map_err(|e| e.to_string())?;
        let want = n * (n + 1.0) / 2.0;
        let (lo, hi) = (t.min().double_value(&[]), t.max().double_value(&[]));
        if lo != want || hi != want {
            return Err(format!("{bytes} bytes: got [{lo}, {hi}], expected {want}"));
        }
        for _ in 0..warmup {
            comm.all_reduce_(&mut t, ReduceOp::Avg, bound)
                .map_err(|e| e.to_string())?;
        }
        let started = Instant::now();
        for _ in 0..iters {
            comm.all_reduce_(&mut t, ReduceOp::Avg, bound)
                .map_err(|e| e.to_string())?;
        }
        out.push(started.elapsed().as_secs_f64() * 1e3 / f64::from(iters.max(1)));
    }
    Ok(out)
}

/// Without the `nccl` feature there is nothing to time.
#[cfg(not(feature = "nccl"))]
pub fn run(_n: usize, _s: &[u64], _i: u32, _w: u32, _json: bool) -> Result<(), Failure> {
    Err(usage(anyhow!(
        "bench allreduce --backend nccl: this build has no NCCL (cargo feature `nccl`)"
    )))
}
