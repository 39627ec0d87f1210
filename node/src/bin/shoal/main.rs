//! The `shoal` command line: parses the arguments and hands each subcommand to its module.
//!
//! Exit codes: 0 success; 1 a failure at run time (one line on stderr); 2 bad usage or bad
//! input (a malformed address, key file or flag).
//!
//! One module per subcommand (`up`, `status`, `local`, `keygen`, `train`, `trace`,
//! `serve`, `devices`), each
//! with its clap arguments; the benchmarks live in [`bench`], one file each. What several
//! subcommands share (the exit-code error type, local clusters) is in `failure` and
//! `cluster`.

mod bench;
mod cluster;
mod devices;
mod failure;
mod keygen;
mod local;
mod serve;
mod status;
mod trace;
mod train;
mod up;

use clap::{Parser, Subcommand, ValueEnum};
use failure::Failure;
use std::io::IsTerminal;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "shoal",
    version,
    about = "A peer-to-peer cluster for training and serving neural networks"
)]
struct Cli {
    /// Log format on stderr; the level comes from RUST_LOG (default: info).
    #[arg(long, global = true, env = "SHOAL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Worker threads of the process's async runtime: networking, the data plane's
    /// transports, the API. Compute (training, serving) runs on threads of its own.
    /// Default: 2. A local cluster of N nodes on C cores gives each C / N within 1..=2 when
    /// N <= C (`shoal_node::local::runtime_threads`).
    #[arg(long, global = true, env = "SHOAL_RUNTIME_THREADS", default_value_t = 2,
          value_parser = clap::value_parser!(u16).range(1..=1024))]
    runtime_threads: u16,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a node: join the swarm and take part in the membership.
    Up(up::UpArgs),
    /// Show a node's members, view and capabilities.
    Status(status::StatusArgs),
    /// Run N local nodes on 127.0.0.1 (mDNS off, joined by bootstrap) and show them converge.
    Local(local::LocalArgs),
    /// Write a private-network swarm key, or create this node's identity and print its id.
    Keygen(keygen::KeygenArgs),
    /// Train a job file on the swarm (or on N local nodes with --local N).
    Train(train::TrainArgs),
    /// Assemble a run's trace.json (Perfetto, chrome://tracing) from its members'
    /// trace.<member>.jsonl files.
    Trace(trace::TraceArgs),
    /// Serve a model (a shoal checkpoint or a TorchScript file) on the swarm (or on N local
    /// nodes with --local N) behind the OpenAI-compatible API of every node.
    Serve(serve::ServeArgs),
    /// Show the devices this machine offers (CPU, CUDA) and whether NCCL can run here.
    Devices,
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: bench::BenchCmd,
    },
}

fn main() -> ExitCode {
    shoal_node::allocator::tune();
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(usize::from(cli.runtime_threads))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(dispatch(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("error: {:#}", f.err);
            ExitCode::from(f.code)
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        tracing_subscriber::EnvFilter::new(
            "info,libp2p_swarm=warn,libp2p_mdns=warn,libp2p_kad=warn,libp2p_gossipsub=warn",
        )
    });
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => b.init(),
        LogFormat::Json => b.json().init(),
    }
}

async fn dispatch(cmd: Cmd) -> Result<(), Failure> {
    match cmd {
        Cmd::Up(a) => up::up(a).await,
        Cmd::Status(a) => status::status(a).await,
        Cmd::Local(a) => local::local(a).await,
        Cmd::Keygen(a) => keygen::keygen(a),
        Cmd::Devices => devices::devices(),
        Cmd::Train(a) => train::train(a).await,
        Cmd::Trace(a) => trace::trace(a),
        Cmd::Serve(a) => serve::serve(a).await,
        Cmd::Bench { what } => bench::run(what).await,
    }
}
