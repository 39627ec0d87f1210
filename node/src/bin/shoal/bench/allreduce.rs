//! `shoal bench allreduce`: times f32 ring all-reduces over the data plane of N local
//! nodes (through their debug API), size by size, and checks every result; or, with
//! `--backend nccl`, NCCL all-reduces of CUDA tensors, one member per GPU of this machine
//! (`nccl_bench`), in the same JSON lines, to set beside nccl-tests' `all_reduce_perf`.

use crate::cluster::{local_dir, start_agreed};
use crate::failure::{usage, Failure};
use anyhow::anyhow;
use clap::Args;
use shoal_node::data_plane::DataTransport;
use shoal_node::status;
use std::net::SocketAddr;
use std::time::Duration;

/// `shoal bench allreduce` arguments.
#[derive(Args)]
pub struct AllreduceArgs {
    /// Number of nodes. Default: 2.
    #[arg(long, default_value_t = 2)]
    nodes: usize,
    /// Buffer size in bytes, with an optional K/M/G suffix (powers of 1024); repeatable
    /// or comma-separated. Default: 1M,16M,64M.
    #[arg(long, value_delimiter = ',', default_value = "1M,16M,64M")]
    size: Vec<String>,
    /// Timed iterations per size. Default: 10.
    #[arg(long, default_value_t = 10)]
    iters: u32,
    /// Untimed warm-up iterations per size. Default: 2.
    #[arg(long, default_value_t = 2)]
    warmup: u32,
    /// Data-plane transport. Default: quic.
    #[arg(long, default_value = "quic")]
    data_plane: DataTransport,
    /// The ring's payload on the wire: none (f32), bf16 or int8 (summed in f32 either
    /// way). Default: none.
    #[arg(long, default_value = "none")]
    compression: coordinator_free::Compression,
    /// `ring` (shoal's ring over the data plane) or `nccl` (one member per GPU of this
    /// machine; `--data-plane` does not apply). Default: ring.
    #[arg(long, default_value = "ring")]
    backend: BenchBackend,
    /// The nodes' QUIC initial MTU (`shoal up --quic-initial-mtu`; UDP payload bytes,
    /// 1200..=16000; loopback carries any of them). Default: 16000 (fewest packets per
    /// byte; measured cheaper than 6500).
    #[arg(long, default_value_t = 16000)]
    quic_mtu: u16,
    /// The nodes' MTU discovery bound (`shoal up --quic-max-mtu`; UDP payload bytes, up to
    /// 65507). Default: 65507 (loopback's largest: fewest packets per byte).
    #[arg(long, default_value_t = 65507)]
    quic_max_mtu: u16,
    /// Print JSON lines only.
    #[arg(long)]
    json: bool,
}

/// What `shoal bench allreduce` times.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchBackend {
    /// shoal's ring over the data plane of local nodes.
    Ring,
    /// NCCL on CUDA tensors, one member per GPU.
    Nccl,
}

/// Parses `123`, `4K`, `16M`, `1G` (powers of 1024).
fn parse_size(s: &str) -> Result<u64, Failure> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|&b| b >= 4)
        .ok_or_else(|| {
            usage(anyhow!(
                "invalid --size '{s}' (bytes, optional K/M/G suffix, at least 4)"
            ))
        })
}

/// Starts the nodes (QUIC initial MTU `--quic-mtu`), then per size has every node run `iters`
/// all-reduces (after `warmup`) at once and prints one line
/// `{"nodes","bytes","time_ms","algbw_gbps","busbw_gbps","transport","compression","iters"}`
/// from the slowest node's mean time (`bytes` and the bandwidths count the f32 buffer, not
/// the compressed bytes that travel).
pub async fn run(a: AllreduceArgs) -> Result<(), Failure> {
    let n = a.nodes;
    let sizes: Vec<u64> = a
        .size
        .iter()
        .map(|s| parse_size(s))
        .collect::<Result<_, _>>()?;
    if a.backend == BenchBackend::Nccl {
        return super::nccl::run(n, &sizes, a.iters, a.warmup, a.json);
    }
    let (dir, _) = local_dir(None);
    let t = a.data_plane.as_str();
    let extra: Vec<String> = ["--debug-api", "--data-plane", t]
        .iter()
        .map(|s| s.to_string())
        .chain(["--quic-initial-mtu".to_string(), a.quic_mtu.to_string()])
        .chain(["--quic-max-mtu".to_string(), a.quic_max_mtu.to_string()])
        .collect();
    let (mut c, _) = start_agreed(&dir, n, &extra, Duration::from_secs(60)).await?;
    let apis: Vec<SocketAddr> = (0..n).filter_map(|i| c.api(i)).collect();
    let mut tag = 1u64 << 40;
    for bytes in sizes {
        let worst = time_size(&apis, bytes, a.iters, a.warmup, tag, a.compression).await?;
        tag += 2 + u64::from(a.iters + a.warmup);
        let algbw = bytes as f64 / (worst / 1000.0) / 1e9;
        let busbw = algbw * 2.0 * (n as f64 - 1.0) / n as f64;
        let line = serde_json::json!({"nodes": n, "bytes": bytes, "time_ms": worst,
            "algbw_gbps": algbw, "busbw_gbps": busbw, "transport": t,
            "compression": a.compression.name(), "iters": a.iters});
        println!("{line}");
        if !a.json {
            eprintln!("{n} nodes, {bytes} bytes over {t}: {worst:.2} ms, busbw {busbw:.3} GB/s");
        }
    }
    c.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Has every node behind `apis` all-reduce `bytes` at once (collective tags from `tag`,
/// payload as `compression`);
/// the slowest node's mean time per all-reduce, in ms. Fails if any result is wrong.
async fn time_size(
    apis: &[SocketAddr],
    bytes: u64,
    iters: u32,
    warmup: u32,
    tag: u64,
    compression: coordinator_free::Compression,
) -> Result<f64, Failure> {
    let path = format!("/v1/debug/allreduce?bytes={bytes}&iters={iters}&warmup={warmup}&tag={tag}&compression={compression}");
    let results =
        futures::future::join_all(
            apis.iter().map(|a| {
                let path = path.clone();
                async move {
                    status::http_request(*a, "POST", &path, &[], Duration::from_secs(600)).await
                }
            }),
        )
        .await;
    let mut worst = 0.0f64;
    for r in results {
        let body = r.map_err(anyhow::Error::from)?;
        let v: serde_json::Value = serde_json::from_slice(&body).map_err(anyhow::Error::from)?;
        if v["correct"] != true {
            return Err(anyhow!("all-reduce of {bytes} bytes returned a wrong result").into());
        }
        worst = worst.max(v["mean_ms"].as_f64().unwrap_or(f64::NAN));
    }
    Ok(worst)
}
