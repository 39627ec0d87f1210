//! `shoal bench serve`: greedy completions per second and their latency, served by N
//! local nodes through the OpenAI API, or (`--raw`) the same generation as a raw
//! single-process forward on the same model: the stage executor serving runs on every
//! member (`shoal_node::models::stage::StageExecutor`), over all layers at once, its payloads
//! packed as an entry node packs them (`coordinator_free::codec::stage`), with no HTTP,
//! no batching queue and no pipeline hops. `--device` puts both on the same device: the
//! raw loop's stage, and the nodes' (`shoal up --device`).

use crate::cluster::{local_dir, start_agreed};
use crate::failure::Failure;
use anyhow::{anyhow, Context};
use clap::Args;
use coordinator_free::codec::stage::{f32s, pack_prompts, pack_tokens, Payload};
use shoal_node::local::Reports;
use shoal_node::models::config::describe;
use shoal_node::models::stage::StageExecutor;
use shoal_node::serve::ServeStats;
use shoal_node::status;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// `shoal bench serve` arguments.
#[derive(Args)]
pub struct ServeArgs {
    /// Number of nodes. Default: 1.
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// Pipeline stages per replica. Default: 1.
    #[arg(long, default_value_t = 1)]
    stages: u32,
    /// Requests. Default: 200.
    #[arg(long, default_value_t = 200)]
    requests: usize,
    /// Requests in flight (and the batch of the raw loop). Default: 8.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Largest batch of one lane (`--serve-max-batch`): the micro-batch, since each
    /// pipeline stage works on one lane's rows while the others are elsewhere in the
    /// pipeline. Default: the concurrency over the stages, rounded up (every lane full).
    #[arg(long)]
    batch: Option<usize>,
    /// Tokens generated per request. Default: 16.
    #[arg(long, default_value_t = 16)]
    max_tokens: u32,
    /// gpt blocks. Default: 4.
    #[arg(long, default_value_t = 4)]
    layers: i64,
    /// gpt width. Default: 256.
    #[arg(long, default_value_t = 256)]
    width: i64,
    /// Device of the stages (the raw loop's and the nodes'): auto, cpu, cuda or cuda:N.
    /// Default: auto.
    #[arg(long, default_value = "auto")]
    device: shoal_node::device::DeviceSpec,
    /// Run the raw single-process loop instead of a cluster.
    #[arg(long)]
    raw: bool,
    /// Print only the JSON line.
    #[arg(long)]
    json: bool,
}

impl ServeArgs {
    /// The lane batch: `--batch`, else the concurrency over the stages, rounded up.
    fn lane_batch(&self) -> usize {
        self.batch
            .unwrap_or_else(|| self.concurrency.div_ceil(self.stages.max(1) as usize))
            .max(1)
    }
}

/// What one run measured.
struct Timing {
    /// Each request's latency, ms.
    lat: Vec<f64>,
    /// Wall time of the timed requests.
    elapsed: Duration,
    /// Each node's share of the run its stage compute was busy (cluster only).
    busy: Vec<f64>,
    /// Stage calls and prefill calls of the timed requests (cluster only).
    calls: Option<(u64, u64)>,
}

/// Makes the model, runs the raw loop or the cluster, and prints one line
/// `{"mode","nodes","stages","requests","concurrency","batch","max_tokens","layers",
/// "width","device","requests_per_s","tokens_per_s","p50_ms","p99_ms","stage_busy",
/// "stage_calls_per_request","prefill_calls_per_request"}`.
pub async fn run(mut a: ServeArgs) -> Result<(), Failure> {
    a.concurrency = a.concurrency.max(1);
    a.max_tokens = a.max_tokens.max(1);
    // Resolved before any work: a device this machine lacks is an error, not a fall-back.
    let device = a.device.resolve().map_err(anyhow::Error::from)?;
    let (dir, _) = local_dir(None);
    std::fs::create_dir_all(&dir).map_err(anyhow::Error::from)?;
    let ck = make_model(&dir, a.layers, a.width).await?;
    let (mode, mut t) = if a.raw {
        ("raw", raw(&ck, &a, device)?)
    } else {
        ("shoal", cluster(&ck, &dir.join("nodes"), &a).await?)
    };
    let _ = std::fs::remove_dir_all(&dir);
    t.lat.sort_by(f64::total_cmp);
    let rps = a.requests as f64 / t.elapsed.as_secs_f64();
    let (p50, p99) = (percentile(&t.lat, 0.5), percentile(&t.lat, 0.99));
    let line = serde_json::json!({
        "mode": mode, "nodes": if a.raw { 1 } else { a.nodes }, "stages": if a.raw { 1 } else { a.stages },
        "requests": a.requests, "concurrency": a.concurrency,
        "batch": if a.raw { a.concurrency } else { a.lane_batch() }, "max_tokens": a.max_tokens,
        "layers": a.layers, "width": a.width, "device": shoal_node::device::name(device),
        "requests_per_s": rps, "tokens_per_s": rps * f64::from(a.max_tokens),
        "p50_ms": p50, "p99_ms": p99,
        "stage_busy": t.busy,
        "stage_calls_per_request": t.calls.map(|c| c.0 as f64 / a.requests as f64),
        "prefill_calls_per_request": t.calls.map(|c| c.1 as f64 / a.requests as f64),
    });
    println!("{line}");
    if !a.json {
        eprintln!("{mode}: {rps:.1} requests/s, p50 {p50:.1} ms, p99 {p99:.1} ms");
    }
    Ok(())
}

/// The `p` quantile of `sorted` (nearest rank; NaN when empty).
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1]
}

/// Distinct 6-byte prompts (no cache hits, no padding).
fn bench_prompt(i: usize) -> String {
    format!("{:02}+{:02}=", i % 100, (i / 100 + 7 * i) % 100)
}

/// A random-initialised gpt (context 64, 4 heads) in `dir`: one training step on one
/// local node writes its checkpoint. Returns the checkpoint's path.
async fn make_model(dir: &Path, layers: i64, width: i64) -> Result<PathBuf, Failure> {
    let context = 64;
    let job = dir.join("bench-serve.toml");
    std::fs::write(
        &job,
        format!(
            "name = \"bench-serve\"\nsteps = 1\nbatch_size = 8\nthreads = 1\n[model]\nkind = \"gpt\"\nlayers = {layers}\nheads = 4\nwidth = {width}\ncontext = {context}\n[data]\nkind = \"arithmetic\"\ndigits = 2\n",
        ),
    )
    .map_err(anyhow::Error::from)?;
    let bin = std::env::current_exe().context("cannot find the shoal binary")?;
    let out = tokio::process::Command::new(&bin)
        .args(["train", "--local", "1", "--json", "--dir"])
        .arg(dir.join("train-nodes"))
        .arg(&job)
        .current_dir(dir)
        .output()
        .await
        .map_err(anyhow::Error::from)?;
    if !out.status.success() {
        return Err(anyhow!(
            "could not make the benchmark model: {}",
            String::from_utf8_lossy(&out.stderr)
        )
        .into());
    }
    Ok(dir.join("runs/bench-serve/checkpoint.safetensors"))
}

/// The raw baseline: `concurrency` requests at a time through one [`StageExecutor`]
/// holding every layer (one torch thread) on `device`: a prefill of the packed prompts,
/// then one decode call per further token, each token picked greedily from the last
/// position's logits as serving picks it.
fn raw(ck: &Path, a: &ServeArgs, device: tch::Device) -> Result<Timing, Failure> {
    tch::set_num_threads(1);
    let cfg = describe(ck).map_err(anyhow::Error::from)?;
    let mut stage = StageExecutor::open_on(ck, cfg.clone(), device).map_err(anyhow::Error::from)?;
    let layers = 0..cfg.layers as usize;
    let mut lat = Vec::with_capacity(a.requests);
    let t0 = Instant::now();
    let mut done = 0usize;
    while done < a.requests {
        let n = a.concurrency.min(a.requests - done);
        let started = Instant::now();
        let rows: Vec<u64> = (done as u64..(done + n) as u64).collect();
        let prompts: Vec<String> = (done..done + n).map(bench_prompt).collect();
        let (len, mut pad, mut tokens) = pack_prompts(prompts.iter().map(|p| p.as_bytes()));
        let mut shape = [n as u32, len];
        for step in 0..a.max_tokens {
            let (_, out, logits) = stage
                .forward(
                    &rows,
                    layers.clone(),
                    step == 0,
                    &pad,
                    Payload::Tokens,
                    &shape,
                    &tokens,
                    Payload::LastLogits,
                )
                .map_err(anyhow::Error::from)?;
            let vocab = out[1] as usize;
            tokens = pack_tokens(
                f32s(&logits)
                    .chunks_exact(vocab)
                    .map(|row| coordinator_free::serving::sample_token(row, 0.0, 1.0, 0.0) as u8),
            );
            (shape, pad) = ([n as u32, 1], vec![0; n]);
        }
        stage.drop_rows(&rows);
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        lat.extend(std::iter::repeat_n(ms, n));
        done += n;
    }
    Ok(Timing {
        lat,
        elapsed: t0.elapsed(),
        busy: Vec::new(),
        calls: None,
    })
}

/// The served run: `nodes` local nodes (TCP data plane, one serving thread, lane batch
/// [`ServeArgs::lane_batch`]) serve the model as `stages`-stage replicas; after a warm-up
/// of `concurrency` requests, `concurrency` clients send the `requests` one after another.
async fn cluster(ck: &Path, dir: &Path, a: &ServeArgs) -> Result<Timing, Failure> {
    let extra: Vec<String> = [
        "--data-plane",
        "tcp",
        "--serve-threads",
        "1",
        "--serve-max-batch",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        a.lane_batch().to_string(),
        "--device".into(),
        a.device.to_string(),
    ])
    .collect();
    let bound = Duration::from_secs(120);
    let (mut c, _) = start_agreed(dir, a.nodes, &extra, bound).await?;
    let api = c.api(0).ok_or_else(|| anyhow!("node 0 has no API"))?;
    let offer = serde_json::json!({"path": ck, "name": "bench", "stages": a.stages}).to_string();
    status::http_request(api, "POST", "/v1/serve", offer.as_bytes(), bound)
        .await
        .map_err(anyhow::Error::from)?;
    if crate::serve::wait_served(&mut c, "bench", a.stages, bound)
        .await?
        .is_none()
    {
        return Err(anyhow!("the model was not served; logs under {}", dir.display()).into());
    }
    // Warm-up (weights loaded on first use, connections opened).
    for i in 0..a.concurrency {
        ask(api, a.requests + i, a.max_tokens)
            .await
            .map_err(anyhow::Error::from)?;
    }
    let before = stats_now(&c.statuses().await);
    let t0 = Instant::now();
    let lat = timed_requests(api, a).await?;
    let elapsed = t0.elapsed();
    // How busy each node's stage compute was during the timed run, and how many stage
    // calls and prefill calls the requests took.
    let after = stats_now(&c.statuses().await);
    c.shutdown();
    let secs = elapsed.as_secs_f64();
    let busy = after
        .iter()
        .zip(&before)
        .map(|(a, b)| (a.forward_s - b.forward_s) / secs)
        .collect();
    let delta = |f: fn(&ServeStats) -> u64| -> u64 {
        after.iter().zip(&before).map(|(a, b)| f(a) - f(b)).sum()
    };
    Ok(Timing {
        lat,
        elapsed,
        busy,
        calls: Some((delta(|s| s.stage_calls), delta(|s| s.batches))),
    })
}

/// Every node's serving counters (zero where a node did not answer).
fn stats_now(reports: &Reports) -> Vec<ServeStats> {
    reports
        .iter()
        .map(|(_, r)| {
            r.as_ref()
                .and_then(|r| r.serve_stats.clone())
                .unwrap_or_default()
        })
        .collect()
}

/// Request `i`'s greedy completion of `max_tokens` tokens; its latency in ms.
async fn ask(api: SocketAddr, i: usize, max_tokens: u32) -> Result<f64, status::ClientError> {
    let body = serde_json::json!({"model": "bench", "prompt": bench_prompt(i), "max_tokens": max_tokens, "temperature": 0}).to_string();
    let t = Instant::now();
    status::http_request(
        api,
        "POST",
        "/v1/completions",
        body.as_bytes(),
        Duration::from_secs(120),
    )
    .await
    .map(|_| t.elapsed().as_secs_f64() * 1000.0)
}

/// The timed requests: `concurrency` clients, each sending the next request as soon as
/// its last one is answered. Every request's latency, ms.
async fn timed_requests(api: SocketAddr, a: &ServeArgs) -> Result<Vec<f64>, Failure> {
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers = (0..a.concurrency).map(|_| {
        let next = next.clone();
        async move {
            let mut mine = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                if i >= a.requests {
                    return Ok::<_, status::ClientError>(mine);
                }
                mine.push(ask(api, i, a.max_tokens).await?);
            }
        }
    });
    let mut lat = Vec::with_capacity(a.requests);
    for r in futures::future::join_all(workers).await {
        lat.extend(r.map_err(anyhow::Error::from)?);
    }
    Ok(lat)
}
