//! `shoal bench train`: data-parallel training throughput of the built-in gpt (or of a
//! Hugging Face folder's model, whole or with LoRA) on 2 MiB of synthetic text, on N local
//! nodes, from the job's own per-step metrics.

use crate::failure::{usage, Failure};
use crate::train::{run_job, TrainArgs as JobArgs};
use anyhow::{anyhow, Context};
use clap::Args;
use shoal_node::data_plane::DataTransport;
use shoal_node::device::{DeviceSpec, Precision};
use shoal_node::train::job::JobSpec;
use shoal_node::train::JobState;
use std::path::Path;

/// `shoal bench train` arguments.
#[derive(Args)]
pub struct TrainArgs {
    /// Number of nodes. Default: 1.
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// Global batch size. Default: 64.
    #[arg(long, default_value_t = 64)]
    batch: u64,
    /// Timed steps. Default: 20.
    #[arg(long, default_value_t = 20)]
    steps: u64,
    /// Job key `micro_batch`: at most this many samples per forward and backward pass, a
    /// member's larger share cut into micro-batches whose gradients are summed. Default: 0
    /// (a member's share in one pass).
    #[arg(long, default_value_t = 0)]
    micro_batch: u64,
    /// Untimed warm-up steps. Default: 3.
    #[arg(long, default_value_t = 3)]
    warmup: u64,
    /// Torch threads per node. Default: 1.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// gpt blocks. Default: 2.
    #[arg(long, default_value_t = 2)]
    layers: i64,
    /// gpt heads. Default: 4.
    #[arg(long, default_value_t = 4)]
    heads: i64,
    /// gpt width. Default: 128.
    #[arg(long, default_value_t = 128)]
    width: i64,
    /// Sequence length (the gpt's context, or an hf model's training context). Default: 64.
    #[arg(long, default_value_t = 64)]
    context: i64,
    /// Train this Hugging Face model folder (job key `[model] hf`: its weights, its
    /// tokenizer) instead of the gpt. Default: none (the gpt).
    #[arg(long)]
    hf: Option<std::path::PathBuf>,
    /// With --hf: train only LoRA adapters of this rank (alpha twice the rank, on
    /// q_proj and v_proj). Default: none (the whole model).
    #[arg(long)]
    lora_rank: Option<u32>,
    /// Data-plane transport. Default: tcp.
    #[arg(long, default_value = "tcp")]
    data_plane: DataTransport,
    /// Split every batch equally (job key `balance = false`, as DDP does) instead of
    /// by measured speed.
    #[arg(long)]
    no_balance: bool,
    /// Where every node computes (job key `device`: auto, cpu, cuda, cuda:N). Default:
    /// auto (the first CUDA device when there is one, else the CPU).
    #[arg(long, default_value = "auto")]
    device: DeviceSpec,
    /// Job key `[sync] compression`: the gradients' payload on the wire, none (f32), bf16
    /// or int8 (with error feedback). Default: none.
    #[arg(long, default_value = "none")]
    compression: coordinator_free::Compression,
    /// Job key `precision`: f32 or bf16. Default: f32.
    #[arg(long, default_value = "f32")]
    precision: Precision,
    /// Print the JSON line only.
    #[arg(long)]
    json: bool,
}

/// Writes the synthetic data and runs the job (`warmup + steps` steps) on `nodes` local
/// nodes; prints one line `{"impl":"shoal","nodes","threads","model","balance","batch",
/// "micro_batch","context","steps","step_ms","samples_per_s","tokens_per_s","compute_ms",
/// "guard_ms","allreduce_ms","member_step_ms","bytes_per_step","peak_rss_bytes"}` over the
/// timed steps (`model`: `gpt`, `hf` or `hf-lora`; the byte and memory figures are the
/// first member's).
pub async fn run(a: TrainArgs) -> Result<(), Failure> {
    let (dir, _) = crate::cluster::local_dir(None);
    std::fs::create_dir_all(&dir).context("cannot create the bench dir")?;
    let spec = write_job(&a, &dir)?;
    let args = JobArgs {
        job: dir.join("job.toml"),
        local: Some(a.nodes),
        resume: false,
        json: true,
        api: "127.0.0.1:0".parse().expect("valid"),
        data_plane: a.data_plane,
        dir: Some(dir.join("nodes")),
        timeout_s: 3600,
    };
    let report = run_job(&spec, &args).await?;
    if report.state != JobState::Done {
        return Err(anyhow!(
            "bench job failed: {}; logs under {}",
            report.error.unwrap_or_default(),
            dir.display()
        )
        .into());
    }
    let line = summarize(&a, &spec)?;
    println!("{line}");
    if !a.json {
        eprintln!(
            "{} nodes: {:.1} samples/s ({:.1} ms per step)",
            a.nodes,
            line["samples_per_s"].as_f64().unwrap_or(f64::NAN),
            line["step_ms"].as_f64().unwrap_or(f64::NAN)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Writes 2 MiB of synthetic text to `dir/data.txt` and returns the job over it.
fn write_job(a: &TrainArgs, dir: &Path) -> Result<JobSpec, Failure> {
    // Bytes from a fixed LCG: the content does not matter, only the shapes.
    let mut z: u64 = 1;
    let text: Vec<u8> = (0..2u64 << 20)
        .map(|_| {
            z = z.wrapping_mul(6364136223846793005).wrapping_add(1);
            b' ' + ((z >> 33) % 95) as u8
        })
        .collect();
    std::fs::write(dir.join("data.txt"), text).context("cannot write the bench data")?;
    if a.lora_rank.is_some() && a.hf.is_none() {
        return Err(usage(anyhow!("--lora-rank needs --hf")));
    }
    let model = match &a.hf {
        None => format!(
            "kind = \"gpt\"\nlayers = {}\nheads = {}\nwidth = {}\ncontext = {}\n",
            a.layers, a.heads, a.width, a.context
        ),
        Some(dir) => {
            let dir = std::path::absolute(dir).context("the --hf folder")?;
            let lora = a.lora_rank.map_or(String::new(), |r| {
                format!("lora = {{ rank = {r}, alpha = {} }}\n", 2 * r)
            });
            format!(
                "hf = {:?}\ncontext = {}\n{lora}",
                dir.display().to_string(),
                a.context
            )
        }
    };
    let toml = format!(
        r#"
name = "bench-train"
steps = {total}
batch_size = {batch}
micro_batch = {micro_batch}
threads = {threads}
min_nodes = {n}
balance = {balance}
device = "{device}"
precision = "{precision}"
eval_fraction = {eval_fraction}
output_dir = "{out}"
[model]
{model}[data]
kind = "text"
path = "{data}"
[optimizer]
kind = "adamw"
lr = 0.001
weight_decay = 0.01
schedule = "constant"
grad_clip = 0.0
[sync]
compression = "{compression}"
"#,
        total = a.warmup + a.steps,
        batch = a.batch,
        micro_batch = a.micro_batch,
        threads = a.threads,
        n = a.nodes,
        balance = !a.no_balance,
        device = a.device,
        precision = a.precision,
        compression = a.compression,
        // An hf model's evaluation after the last step is slow and untimed: a few sequences.
        eval_fraction = if a.hf.is_some() { 0.002 } else { 0.01 },
        out = dir.join("runs").display(),
        data = dir.join("data.txt").display(),
    );
    JobSpec::parse(&toml).map_err(|e| usage(e.into()))
}

/// The benchmark's line, from the run's `metrics.jsonl`: wall time between the first and
/// last timed step, and the first member's mean of each phase over the timed steps (what
/// the rest of a step is: the update, the step's bookkeeping).
fn summarize(a: &TrainArgs, spec: &JobSpec) -> Result<serde_json::Value, Failure> {
    let metrics = std::fs::read_to_string(spec.run_dir().join("metrics.jsonl"))
        .context("cannot read the bench metrics")?;
    let rows: Vec<serde_json::Value> = metrics
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &serde_json::Value| v["loss"].is_number())
        .collect();
    let at = |step: u64| {
        rows.iter()
            .find(|r| r["step"] == step)
            .and_then(|r| r["elapsed_s"].as_f64())
    };
    let (warmup, steps) = (a.warmup, a.steps);
    let (Some(t0), Some(t1)) = (at(warmup.max(1)), at(warmup + steps)) else {
        return Err(anyhow!("bench metrics lack the timed steps").into());
    };
    let timed = if warmup == 0 { steps - 1 } else { steps };
    let secs = (t1 - t0).max(1e-9);
    let first = warmup.max(1);
    let timed_rows: Vec<&serde_json::Value> = rows
        .iter()
        .filter(|r| r["step"].as_u64().is_some_and(|s| s > first))
        .collect();
    let mean = |key: &str| {
        let v: Vec<f64> = timed_rows.iter().filter_map(|r| r[key].as_f64()).collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    let peak = rows
        .iter()
        .filter_map(|r| r["peak_rss_bytes"].as_u64())
        .max()
        .unwrap_or(0);
    let model = match (&a.hf, a.lora_rank) {
        (None, _) => "gpt",
        (Some(_), None) => "hf",
        (Some(_), Some(_)) => "hf-lora",
    };
    let samples_per_s = (a.batch * timed) as f64 / secs;
    Ok(
        serde_json::json!({"impl": "shoal", "nodes": a.nodes, "threads": a.threads, "model": model,
        "width": a.width, "device": a.device.to_string(), "precision": a.precision,
        "compression": a.compression.name(),
        "balance": !a.no_balance, "batch": a.batch, "micro_batch": a.micro_batch, "context": a.context, "steps": timed,
        "step_ms": secs * 1e3 / timed as f64, "samples_per_s": samples_per_s,
        "tokens_per_s": samples_per_s * a.context as f64,
        "compute_ms": mean("compute_ms"), "guard_ms": mean("guard_ms"),
        "allreduce_ms": mean("allreduce_ms"), "member_step_ms": mean("step_ms"),
        "bytes_per_step": mean("bytes_sent"), "peak_rss_bytes": peak}),
    )
}
