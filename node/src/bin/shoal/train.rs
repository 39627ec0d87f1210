//! `shoal train`: validates a job file here, submits it to a node (or to N local nodes it
//! starts), follows its progress and reports the outcome. [`run_job`] is also how
//! `shoal bench train` runs its job.

use crate::cluster::{data_plane_args, local_dir, start_agreed};
use crate::failure::{usage, Failure};
use anyhow::{anyhow, Context};
use clap::Args;
use shoal_node::local::LocalCluster;
use shoal_node::status;
use shoal_node::train::job::JobSpec;
use shoal_node::train::{JobReport, JobState};
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Args)]
pub struct TrainArgs {
    /// The job file (TOML).
    pub job: PathBuf,
    /// Start this many local nodes on 127.0.0.1, run the job on them, and stop them.
    #[arg(long)]
    pub local: Option<usize>,
    /// Continue from the checkpoint in the job's run directory.
    #[arg(long)]
    pub resume: bool,
    /// Print one JSON summary line at the end.
    #[arg(long, env = "SHOAL_JSON")]
    pub json: bool,
    /// The local API of the node to submit to (without --local). Default: 127.0.0.1:4412.
    #[arg(long, env = "SHOAL_API", default_value = "127.0.0.1:4412")]
    pub api: SocketAddr,
    /// Data-plane transport of --local nodes: tcp (loopback is trusted) or quic.
    /// Default: tcp.
    #[arg(long, default_value = "tcp")]
    pub data_plane: shoal_node::data_plane::DataTransport,
    /// Where --local nodes keep their data dirs and logs. Default: a temporary dir.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Give up (exit 1) after this many seconds. Default: 3600.
    #[arg(long, env = "SHOAL_TIMEOUT_S", default_value_t = 3600)]
    pub timeout_s: u64,
}

/// `shoal train`: validates the job here, submits it to a node (or to a local cluster it
/// starts), follows its progress and reports the outcome.
pub async fn train(a: TrainArgs) -> Result<(), Failure> {
    let mut spec = JobSpec::load(&a.job).map_err(|e| usage(e.into()))?;
    let job_dir = a
        .job
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let job_dir =
        std::fs::canonicalize(job_dir).context("cannot resolve the job file's directory")?;
    let cwd = std::env::current_dir().context("cannot read the working directory")?;
    spec.resolve_paths(&job_dir, &cwd);
    let report = run_job(&spec, &a).await?;
    if a.json {
        println!("{}", report.summary());
    } else {
        println!(
            "job {} {}: {} steps, {} samples, {:.1} s on {} members; final loss {}",
            report.job,
            if report.state == JobState::Done {
                "done"
            } else {
                "failed"
            },
            report.step,
            report.samples,
            report.wall_s,
            report.members,
            report
                .loss
                .map(|l| format!("{l:.4}"))
                .unwrap_or_else(|| "-".into()),
        );
        if let Some(e) = &report.eval {
            println!(
                "held-out: loss={:.4} accuracy={:.4} ({} samples)",
                e.loss, e.accuracy, e.samples
            );
        }
        println!("run dir: {}", report.run_dir);
    }
    match report.state {
        JobState::Done => Ok(()),
        _ => Err(anyhow!(
            "job {} failed: {}",
            report.job,
            report.error.unwrap_or_else(|| "unknown error".into())
        )
        .into()),
    }
}

/// Submits `spec` (to `a.api`, or to a local cluster of `a.local` nodes started here) and
/// follows it to its end. The local cluster is stopped afterwards, and its temporary dir
/// removed when the job is done.
pub async fn run_job(spec: &JobSpec, a: &TrainArgs) -> Result<JobReport, Failure> {
    let (dir, temp) = local_dir(a.dir.clone());
    let mut cluster = None;
    let api = match a.local {
        Some(n) => {
            let bound = Duration::from_secs(60);
            let (c, _) = start_agreed(&dir, n, &data_plane_args(a.data_plane), bound).await?;
            let api = c
                .api(0)
                .ok_or_else(|| anyhow!("node 0 has no API address"))?;
            cluster = Some(c);
            api
        }
        None => a.api,
    };
    let body = serde_json::json!({"spec": spec.to_toml(), "resume": a.resume}).to_string();
    let reply = status::http_request(
        api,
        "POST",
        "/v1/jobs",
        body.as_bytes(),
        Duration::from_secs(10),
    )
    .await
    .map_err(anyhow::Error::from)?;
    let first: JobReport = serde_json::from_slice(&reply).context("bad reply from the node")?;
    let report = follow(api, &first.run, cluster.as_mut(), a).await?;
    if let Some(mut c) = cluster {
        c.shutdown();
        if temp && report.state == JobState::Done {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    Ok(report)
}

/// Follows run `run` on the node at `api` until it is done or failed (at most
/// `a.timeout_s`), drawing its progress on stderr unless `a.json`; fails at once when a
/// node of `cluster` exits.
async fn follow(
    api: SocketAddr,
    run: &str,
    mut cluster: Option<&mut LocalCluster>,
    a: &TrainArgs,
) -> Result<JobReport, Failure> {
    let tty = std::io::stderr().is_terminal() && !a.json;
    let bound = Duration::from_secs(a.timeout_s);
    let t0 = Instant::now();
    let mut last_print = Instant::now();
    loop {
        if let Some(c) = cluster.as_deref_mut() {
            c.check_alive().map_err(anyhow::Error::from)?;
        }
        let st = status::fetch_status(api, Duration::from_secs(10))
            .await
            .map_err(anyhow::Error::from)?;
        let Some(r) = st.jobs.into_iter().find(|j| j.run == run) else {
            return Err(anyhow!("the node no longer knows run {run}").into());
        };
        if matches!(r.state, JobState::Done | JobState::Failed) {
            if tty {
                eprintln!();
            }
            return Ok(r);
        }
        if !a.json {
            let line = progress_line(&r);
            if tty {
                eprint!("\r\x1b[2K{line}");
            } else if last_print.elapsed() >= Duration::from_secs(5) {
                eprintln!("{line}");
                last_print = Instant::now();
            }
        }
        if t0.elapsed() >= bound {
            return Err(anyhow!("job {} did not finish within {} s", r.job, a.timeout_s).into());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One progress line: a bar, the step, the loss, samples/s and members.
fn progress_line(r: &shoal_node::train::JobReport) -> String {
    if r.state == JobState::Waiting {
        return format!("job {}: waiting for members", r.job);
    }
    let total = r.total_steps.max(1);
    let width = 30;
    let filled = (r.step * width / total) as usize;
    format!(
        "[{}{}] step {}/{} loss {} {} samples/s, {} members",
        "#".repeat(filled),
        ".".repeat(width as usize - filled),
        r.step,
        r.total_steps,
        r.loss
            .map(|l| format!("{l:.4}"))
            .unwrap_or_else(|| "-".into()),
        r.samples_per_s
            .map(|s| format!("{s:.0}"))
            .unwrap_or_else(|| "-".into()),
        r.members
    )
}
