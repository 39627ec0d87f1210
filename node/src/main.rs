//! The `shoal` command line.
//!
//! Exit codes: 0 success; 1 a failure at run time (one line on stderr); 2 bad usage or bad
//! input (a malformed address, key file or flag).

use anyhow::{anyhow, Context};
use clap::{Args, Parser, Subcommand, ValueEnum};
use libp2p::Multiaddr;
use shoal_node::control_plane::ControlPlaneConfig;
use shoal_node::local::{agreed_view, LocalCluster};
use shoal_node::node::{NodeConfig, NodeError};
use shoal_node::{identity, status};
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

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
    Up(UpArgs),
    /// Show a node's members, view and capabilities.
    Status(StatusArgs),
    /// Run N local nodes on 127.0.0.1 (mDNS off, joined by bootstrap) and show them converge.
    Local(LocalArgs),
    /// Write a private-network swarm key, or create this node's identity and print its id.
    Keygen(KeygenArgs),
    /// Train a job file on the swarm (or on N local nodes with --local N).
    Train(TrainArgs),
    /// Serve a model (a shoal checkpoint or a TorchScript file) on the swarm (or on N local
    /// nodes with --local N) behind the OpenAI-compatible API of every node.
    Serve(ServeArgs),
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
}

#[derive(Args)]
struct UpArgs {
    /// Data dir: identity key (mode 0600), incarnation, address files.
    /// Default: $XDG_DATA_HOME/shoal or ~/.local/share/shoal.
    #[arg(long, env = "SHOAL_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// Control-plane listen multiaddr (repeatable).
    /// Default: /ip4/0.0.0.0/tcp/4411 and /ip4/0.0.0.0/udp/4411/quic-v1 (all interfaces).
    #[arg(long, env = "SHOAL_LISTEN", value_delimiter = ',')]
    listen: Vec<String>,
    /// Bootstrap peer multiaddr, ideally ending in /p2p/<peer id> (repeatable).
    #[arg(long, env = "SHOAL_BOOTSTRAP", value_delimiter = ',')]
    bootstrap: Vec<String>,
    /// Turn off mDNS discovery (on by default).
    #[arg(long, env = "SHOAL_NO_MDNS")]
    no_mdns: bool,
    /// Private network: only peers holding this pnet swarm key can connect (QUIC is off).
    #[arg(long, env = "SHOAL_SWARM_KEY")]
    swarm_key: Option<PathBuf>,
    /// Local HTTP JSON API address; loopback only. Default: 127.0.0.1:4412.
    #[arg(long, env = "SHOAL_API", default_value = "127.0.0.1:4412")]
    api: SocketAddr,
    /// Most established connections. Default: 256.
    #[arg(long, env = "SHOAL_MAX_CONNECTIONS", default_value_t = 256)]
    max_connections: u32,
    /// Heartbeat interval in ms. Default: 250.
    #[arg(long, env = "SHOAL_HEARTBEAT_MS", default_value_t = 250)]
    heartbeat_ms: u64,
    /// Silence before a member is suspected, in ms. Default: 750.
    #[arg(long, env = "SHOAL_SUSPECT_MS", default_value_t = 750)]
    suspect_ms: u64,
    /// Silence before a member is failed and leaves the view, in ms. Default: 1500.
    #[arg(long, env = "SHOAL_FAIL_MS", default_value_t = 1500)]
    fail_ms: u64,
    /// Expose debug endpoints on the local API (for tests and benchmarks).
    #[arg(long, env = "SHOAL_DEBUG_API", hide = true)]
    debug_api: bool,
    /// Bearer token the serving API (/v1/completions, /v1/models, /v1/infer, /v1/serve)
    /// requires. Default: none.
    #[arg(long, env = "SHOAL_API_TOKEN")]
    api_token: Option<String>,
    /// Serving: most requests batched together. Default: 8.
    #[arg(long, env = "SHOAL_SERVE_MAX_BATCH", default_value_t = 8)]
    serve_max_batch: usize,
    /// Serving: longest a request waits to be batched, in ms. Default: 5.
    #[arg(long, env = "SHOAL_SERVE_MAX_WAIT_MS", default_value_t = 5)]
    serve_max_wait_ms: u64,
    /// Serving: torch threads for stage compute (0: libtorch's default). Default: 0.
    #[arg(long, env = "SHOAL_SERVE_THREADS", default_value_t = 0)]
    serve_threads: usize,
    /// Serving: responses kept for repeated deterministic requests. Default: 1024.
    #[arg(long, env = "SHOAL_SERVE_CACHE", default_value_t = 1024)]
    serve_cache: usize,
    /// Data-plane listen address. Default: 0.0.0.0:4413 (all interfaces).
    #[arg(long, env = "SHOAL_DATA_LISTEN", default_value = "0.0.0.0:4413")]
    data_listen: SocketAddr,
    /// Data-plane transport: quic (encrypted; for untrusted networks) or tcp
    /// (authenticated, unencrypted; for trusted LANs). Default: quic.
    #[arg(long, env = "SHOAL_DATA_PLANE", default_value = "quic")]
    data_plane: shoal_node::data_plane::DataTransport,
    /// QUIC initial MTU in bytes. Default: 1200 (safe on any path).
    #[arg(long, env = "SHOAL_QUIC_INITIAL_MTU", default_value_t = 1200)]
    quic_initial_mtu: u16,
    /// Data-plane TCP socket buffers in bytes (0: kernel autotuning). Default: 0.
    #[arg(long, env = "SHOAL_TCP_BUFFER", default_value_t = 0)]
    tcp_buffer: u32,
    /// Data-plane pipelining segment in bytes. Default: 1048576.
    #[arg(long, env = "SHOAL_SEGMENT_BYTES", default_value_t = 1 << 20)]
    segment_bytes: usize,
}

#[derive(Args)]
struct StatusArgs {
    /// The node's local API. Default: 127.0.0.1:4412.
    #[arg(long, env = "SHOAL_API", default_value = "127.0.0.1:4412")]
    api: SocketAddr,
    /// Print JSON instead of a table.
    #[arg(long, env = "SHOAL_JSON")]
    json: bool,
}

#[derive(Args)]
struct LocalArgs {
    /// Number of nodes. Default: 4.
    #[arg(long, env = "SHOAL_NODES", default_value_t = 4)]
    nodes: usize,
    /// Exit 0 once all nodes share one view (instead of running until Ctrl-C).
    #[arg(long, env = "SHOAL_EXIT_WHEN_CONVERGED")]
    exit_when_converged: bool,
    /// Where the nodes' data dirs go. Default: a fresh temporary dir, removed on success.
    #[arg(long, env = "SHOAL_LOCAL_DIR")]
    dir: Option<PathBuf>,
    /// Give up (exit 1) if the nodes do not converge in this many seconds. Default: 60.
    #[arg(long, env = "SHOAL_TIMEOUT_S", default_value_t = 60)]
    timeout_s: u64,
    /// Print one JSON line when converged instead of a table.
    #[arg(long, env = "SHOAL_JSON")]
    json: bool,
}

#[derive(Args)]
struct TrainArgs {
    /// The job file (TOML).
    job: PathBuf,
    /// Start this many local nodes on 127.0.0.1, run the job on them, and stop them.
    #[arg(long)]
    local: Option<usize>,
    /// Continue from the checkpoint in the job's run directory.
    #[arg(long)]
    resume: bool,
    /// Print one JSON summary line at the end.
    #[arg(long, env = "SHOAL_JSON")]
    json: bool,
    /// The local API of the node to submit to (without --local). Default: 127.0.0.1:4412.
    #[arg(long, env = "SHOAL_API", default_value = "127.0.0.1:4412")]
    api: SocketAddr,
    /// Data-plane transport of --local nodes: tcp (loopback is trusted) or quic.
    /// Default: tcp.
    #[arg(long, default_value = "tcp")]
    data_plane: shoal_node::data_plane::DataTransport,
    /// Where --local nodes keep their data dirs and logs. Default: a temporary dir.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Give up (exit 1) after this many seconds. Default: 3600.
    #[arg(long, env = "SHOAL_TIMEOUT_S", default_value_t = 3600)]
    timeout_s: u64,
}

#[derive(Args)]
struct ServeArgs {
    /// The model: a shoal checkpoint (`runs/<job>/checkpoint.safetensors`) or a
    /// TorchScript file.
    model: PathBuf,
    /// The name clients ask for. Default: the run directory's name for a checkpoint,
    /// else the file stem.
    #[arg(long)]
    name: Option<String>,
    /// Fewest pipeline stages per replica. Default: 1 (as few as memory allows).
    #[arg(long, default_value_t = 1)]
    stages: u32,
    /// Start this many local nodes on 127.0.0.1 and serve on them.
    #[arg(long)]
    local: Option<usize>,
    /// Ask this prompt (greedy) once the model is served, print the question and the
    /// answer (repeatable); with --local, exit afterwards.
    #[arg(long = "prompt")]
    prompts: Vec<String>,
    /// Tokens to generate per --prompt. Default: 16.
    #[arg(long, default_value_t = 16)]
    max_tokens: u32,
    /// Print JSON lines (the offer, then one per prompt).
    #[arg(long, env = "SHOAL_JSON")]
    json: bool,
    /// The local API of the node to offer the model to (without --local).
    /// Default: 127.0.0.1:4412.
    #[arg(long, env = "SHOAL_API", default_value = "127.0.0.1:4412")]
    api: SocketAddr,
    /// Bearer token of the serving API (also given to --local nodes). Default: none.
    #[arg(long, env = "SHOAL_API_TOKEN")]
    api_token: Option<String>,
    /// Data-plane transport of --local nodes: tcp (loopback is trusted) or quic.
    /// Default: tcp.
    #[arg(long, default_value = "tcp")]
    data_plane: shoal_node::data_plane::DataTransport,
    /// Where --local nodes keep their data dirs and logs. Default: a temporary dir.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Give up (exit 1) if the model is not served within this many seconds. Default: 120.
    #[arg(long, env = "SHOAL_TIMEOUT_S", default_value_t = 120)]
    timeout_s: u64,
}

#[derive(Args)]
struct KeygenArgs {
    /// Write a new private-network swarm key here (refuses to overwrite).
    #[arg(long, env = "SHOAL_SWARM_KEY")]
    swarm_key: Option<PathBuf>,
    /// Without --swarm-key: create (or load) the identity in this data dir and print its
    /// peer id. Default: $XDG_DATA_HOME/shoal or ~/.local/share/shoal.
    #[arg(long, env = "SHOAL_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum BenchCmd {
    /// Start N local nodes; time until all share one view, and until the survivors drop a
    /// node killed with SIGKILL. Prints {"nodes","up_ms","converge_ms","detect_ms"}.
    Membership {
        /// Number of nodes. Default: 8.
        #[arg(long, default_value_t = 8)]
        nodes: usize,
        /// Print one JSON line (the default output is also that line, plus a summary).
        #[arg(long)]
        json: bool,
        /// Give up after this many seconds per phase. Default: 60.
        #[arg(long, default_value_t = 60)]
        timeout_s: u64,
    },
    /// Start N local nodes and time f32 ring all-reduces over the data plane. Prints one
    /// JSON line per size: {"nodes","bytes","time_ms","algbw_gbps","busbw_gbps",...}.
    Allreduce {
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
        data_plane: shoal_node::data_plane::DataTransport,
        /// Print JSON lines only.
        #[arg(long)]
        json: bool,
    },
    /// Serve a random-initialised gpt on N local nodes (or, with --raw, run the same
    /// generation as a plain in-process tch loop) and time R greedy completions sent C at
    /// a time. Prints {"mode","nodes","stages","requests","requests_per_s","p50_ms",...}.
    Serve {
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
        /// Run the raw single-process loop instead of a cluster.
        #[arg(long)]
        raw: bool,
        /// Print only the JSON line.
        #[arg(long)]
        json: bool,
    },
    /// Start N local nodes and train the built-in gpt on synthetic bytes; prints one JSON
    /// line {"impl":"shoal","nodes","threads","model","batch","steps","step_ms",
    /// "samples_per_s"} over the timed steps (after the warm-up).
    Train {
        /// Number of nodes. Default: 1.
        #[arg(long, default_value_t = 1)]
        nodes: usize,
        /// Global batch size. Default: 64.
        #[arg(long, default_value_t = 64)]
        batch: u64,
        /// Timed steps. Default: 20.
        #[arg(long, default_value_t = 20)]
        steps: u64,
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
        /// gpt context. Default: 64.
        #[arg(long, default_value_t = 64)]
        context: i64,
        /// Data-plane transport. Default: tcp.
        #[arg(long, default_value = "tcp")]
        data_plane: shoal_node::data_plane::DataTransport,
        /// Split every batch equally (job key `balance = false`, as DDP does) instead of
        /// by measured speed.
        #[arg(long)]
        no_balance: bool,
        /// Print the JSON line only.
        #[arg(long)]
        json: bool,
    },
    /// Plain loopback TCP rate of a ring: RING members (one thread each, non-blocking
    /// sockets under poll), each streaming MIB MiB in 1 MiB writes to the next while
    /// receiving from the previous, all at once, with no reduction and no framing. A ring
    /// all-reduce sends and receives busbw bytes per second per member, so the slowest
    /// member's rate here is the reference its busbw is held against (a measured
    /// reference, not a proven bound). Prints {"ring":RING,"per_member_gbps":..,
    /// "aggregate_gbps":..}.
    TcpCeiling {
        /// Members of the ring (1: one stream). Default: 1.
        #[arg(long, default_value_t = 1)]
        ring: usize,
        /// MiB each member streams. Default: 1024.
        #[arg(long, default_value_t = 1024)]
        mib: usize,
    },
    /// Dial a node's control plane COUNT times from this one process (a fresh identity,
    /// CONCURRENCY dials in flight, upgraded connections held until all are done): checks
    /// that a wrong swarm key is refused every time and that a flood stays within the
    /// node's connection limits. Prints {"dials","upgraded","refused","timed_out"}.
    Dial {
        /// The node's TCP multiaddr (a trailing /p2p/ID is ignored).
        target: String,
        /// Dials. Default: 100.
        #[arg(long, default_value_t = 100)]
        count: u32,
        /// Dials in flight at once. Default: 16.
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
        /// Swarm key file to dial with (none: dial without one).
        #[arg(long)]
        swarm_key: Option<PathBuf>,
        /// Bound on each dial in milliseconds. Default: 5000.
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
}

/// An error with the exit code it maps to.
struct Failure {
    code: u8,
    err: anyhow::Error,
}

fn usage(err: anyhow::Error) -> Failure {
    Failure { code: 2, err }
}

impl From<anyhow::Error> for Failure {
    fn from(err: anyhow::Error) -> Self {
        Failure { code: 1, err }
    }
}

/// glibc's allocator, set for tensor work before any thread starts: one arena (the
/// main, `brk` one), blocks up to 32 MiB (the most glibc allows) from it instead of fresh
/// `mmap`s, and freed memory kept up to 1 GiB instead of handed back to the kernel at once.
/// A training step or a serving call allocates and frees the same tens of MiB of
/// activations every time. By default each round trip through the kernel faulted and
/// zeroed those pages again: a 1-node training job of the 2-layer gpt took 65-135 k page
/// faults per 4 s (libtorch's log-softmax, fills and GEMM outputs touching fresh pages);
/// the thresholds alone still left 65 k in two of three runs (a thread's own arena gives
/// whole 64 MiB heaps back when they empty), and with one arena it took 0-512. The price:
/// a node keeps the memory of its largest step mapped, and its threads share one arena.
fn tune_allocator() {
    // SAFETY: mallopt only sets allocator parameters; called before other threads exist.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

fn main() -> ExitCode {
    tune_allocator();
    let cli = Cli::parse();
    init_logging(cli.log_format);
    // Worker threads of the node's runtime. Default: 2 (SHOAL_RUNTIME_THREADS overrides).
    let threads = std::env::var("SHOAL_RUNTIME_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&t| t >= 1)
        .unwrap_or(2);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
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
        Cmd::Up(a) => up(a).await,
        Cmd::Status(a) => status_cmd(a).await,
        Cmd::Local(a) => local(a).await,
        Cmd::Keygen(a) => keygen(a),
        Cmd::Train(a) => train(a).await,
        Cmd::Serve(a) => serve(a).await,
        Cmd::Bench {
            what:
                BenchCmd::Membership {
                    nodes,
                    json,
                    timeout_s,
                },
        } => bench_membership(nodes, json, timeout_s).await,
        Cmd::Bench {
            what:
                BenchCmd::Allreduce {
                    nodes,
                    size,
                    iters,
                    warmup,
                    data_plane,
                    json,
                },
        } => bench_allreduce(nodes, &size, iters, warmup, data_plane, json).await,
        Cmd::Bench {
            what: BenchCmd::TcpCeiling { ring, mib },
        } => tcp_ceiling(ring, mib),
        Cmd::Bench {
            what:
                BenchCmd::Dial {
                    target,
                    count,
                    concurrency,
                    swarm_key,
                    timeout_ms,
                },
        } => {
            let target: Multiaddr = target
                .parse()
                .map_err(|e| usage(anyhow!("bad target address: {e}")))?;
            let psk = match swarm_key {
                Some(p) => Some(identity::read_swarm_key(&p).map_err(|e| usage(e.into()))?),
                None => None,
            };
            let r = shoal_node::control_plane::dial_flood(
                &target,
                psk,
                count,
                concurrency,
                Duration::from_millis(timeout_ms),
            )
            .await
            .map_err(anyhow::Error::from)?;
            println!("{}", serde_json::json!(r));
            Ok(())
        }
        Cmd::Bench {
            what:
                BenchCmd::Serve {
                    nodes,
                    stages,
                    requests,
                    concurrency,
                    batch,
                    max_tokens,
                    layers,
                    width,
                    raw,
                    json,
                },
        } => {
            let concurrency = concurrency.max(1);
            bench_serve(BenchServe {
                nodes,
                stages,
                requests,
                concurrency,
                batch: batch
                    .unwrap_or_else(|| concurrency.div_ceil(stages.max(1) as usize))
                    .max(1),
                max_tokens: max_tokens.max(1),
                layers,
                width,
                raw,
                json,
            })
            .await
        }
        Cmd::Bench {
            what:
                BenchCmd::Train {
                    nodes,
                    batch,
                    steps,
                    warmup,
                    threads,
                    layers,
                    heads,
                    width,
                    context,
                    data_plane,
                    no_balance,
                    json,
                },
        } => {
            let shape = [layers, heads, width, context];
            bench_train(
                nodes,
                batch,
                steps,
                warmup,
                threads,
                shape,
                data_plane,
                !no_balance,
                json,
            )
            .await
        }
    }
}

fn default_data_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME") {
        return PathBuf::from(x).join("shoal");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| ".".into());
    PathBuf::from(home).join(".local/share/shoal")
}

fn parse_addrs(flag: &str, values: &[String]) -> Result<Vec<Multiaddr>, Failure> {
    values
        .iter()
        .map(|v| {
            v.trim()
                .parse::<Multiaddr>()
                .map_err(|e| usage(anyhow!("invalid {flag} address '{v}': {e}")))
        })
        .collect()
}

async fn up(a: UpArgs) -> Result<(), Failure> {
    let listen = if a.listen.is_empty() {
        vec![
            "/ip4/0.0.0.0/tcp/4411".parse().expect("valid"),
            "/ip4/0.0.0.0/udp/4411/quic-v1".parse().expect("valid"),
        ]
    } else {
        parse_addrs("--listen", &a.listen)?
    };
    let bootstrap = parse_addrs("--bootstrap", &a.bootstrap)?;
    let swarm_key = match &a.swarm_key {
        Some(p) => Some(identity::read_swarm_key(p).map_err(|e| usage(e.into()))?),
        None => None,
    };
    let data_dir = a.data_dir.unwrap_or_else(default_data_dir);
    let mut serve = shoal_node::serve::ServeConfig::new(&data_dir);
    serve.api_token = a.api_token.filter(|t| !t.is_empty());
    serve.max_batch = a.serve_max_batch.max(1);
    serve.max_wait_ms = a.serve_max_wait_ms;
    serve.cache_entries = a.serve_cache;
    serve.threads = a.serve_threads;
    let cfg = NodeConfig {
        data_dir,
        listen,
        bootstrap,
        api: a.api,
        control: ControlPlaneConfig {
            mdns: !a.no_mdns,
            swarm_key,
            max_connections: a.max_connections,
            ..Default::default()
        },
        membership: coordinator_free::MembershipConfig {
            heartbeat_interval_ms: a.heartbeat_ms,
            heartbeat_jitter_ms: (a.heartbeat_ms / 5).min(50),
            suspect_after_ms: a.suspect_ms,
            fail_after_ms: a.fail_ms,
            ..Default::default()
        },
        debug_api: a.debug_api,
        data_listen: a.data_listen,
        data_plane: shoal_node::data_plane::DataPlaneConfig {
            transport: a.data_plane,
            quic_initial_mtu: a.quic_initial_mtu,
            segment_bytes: a.segment_bytes.max(4096),
            tcp_buffer: a.tcp_buffer,
            ..Default::default()
        },
        serve,
    };
    shoal_node::node::run(cfg).await.map_err(|e| match e {
        NodeError::Identity(_) | NodeError::Timings(_) | NodeError::ApiNotLoopback(_) => {
            usage(e.into())
        }
        other => Failure::from(anyhow::Error::from(other)),
    })
}

async fn status_cmd(a: StatusArgs) -> Result<(), Failure> {
    let r = status::fetch_status(a.api, Duration::from_secs(5))
        .await
        .map_err(anyhow::Error::from)?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string(&r).map_err(anyhow::Error::from)?
        );
    } else {
        print!("{}", status::render_table(&r));
    }
    Ok(())
}

fn keygen(a: KeygenArgs) -> Result<(), Failure> {
    match a.swarm_key {
        Some(p) => {
            let k = identity::write_new_swarm_key(&p).map_err(|e| usage(e.into()))?;
            println!(
                "wrote swarm key {} (fingerprint {})",
                p.display(),
                k.fingerprint()
            );
        }
        None => {
            let dir = a.data_dir.unwrap_or_else(default_data_dir);
            let k = identity::load_or_create_identity(&dir).map_err(|e| usage(e.into()))?;
            println!("{}", k.public().to_peer_id());
        }
    }
    Ok(())
}

fn local_dir(dir: Option<PathBuf>) -> (PathBuf, bool) {
    match dir {
        Some(d) => (d, false),
        None => (
            std::env::temp_dir().join(format!("shoal-local-{}", std::process::id())),
            true,
        ),
    }
}

fn start_cluster(dir: &Path, n: usize, extra: &[String]) -> Result<LocalCluster, Failure> {
    if n == 0 {
        return Err(usage(anyhow!("--nodes must be at least 1")));
    }
    let bin = std::env::current_exe().context("cannot find the shoal binary")?;
    LocalCluster::start(&bin, dir, n, extra).map_err(|e| anyhow::Error::from(e).into())
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

async fn bench_allreduce(
    n: usize,
    sizes: &[String],
    iters: u32,
    warmup: u32,
    transport: shoal_node::data_plane::DataTransport,
    json: bool,
) -> Result<(), Failure> {
    let sizes: Vec<u64> = sizes
        .iter()
        .map(|s| parse_size(s))
        .collect::<Result<_, _>>()?;
    let (dir, _) = local_dir(None);
    let t = match transport {
        shoal_node::data_plane::DataTransport::Quic => "quic",
        shoal_node::data_plane::DataTransport::Tcp => "tcp",
    };
    let extra: Vec<String> = [
        "--debug-api",
        "--data-plane",
        t,
        "--quic-initial-mtu",
        "8192",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut c = start_cluster(&dir, n, &extra)?;
    let converged = poll_until(
        &mut c,
        Duration::from_secs(60),
        Duration::from_millis(20),
        |_| {},
        |r| agreed_view(r, n, None),
    )
    .await?;
    if converged.is_none() {
        return Err(anyhow!("{n} nodes did not converge; logs under {}", dir.display()).into());
    }
    let mut tag = 1u64 << 40;
    for bytes in sizes {
        let path =
            format!("/v1/debug/allreduce?bytes={bytes}&iters={iters}&warmup={warmup}&tag={tag}");
        tag += 2 + u64::from(iters + warmup);
        let apis: Vec<SocketAddr> = (0..n).filter_map(|i| c.api(i)).collect();
        let results =
            futures::future::join_all(apis.iter().map(|a| {
                let path = path.clone();
                async move {
                    status::http_request(*a, "POST", &path, &[], Duration::from_secs(600)).await
                }
            }))
            .await;
        let mut worst = 0.0f64;
        for r in results {
            let body = r.map_err(anyhow::Error::from)?;
            let v: serde_json::Value =
                serde_json::from_slice(&body).map_err(anyhow::Error::from)?;
            if v["correct"] != true {
                return Err(anyhow!("all-reduce of {bytes} bytes returned a wrong result").into());
            }
            worst = worst.max(v["mean_ms"].as_f64().unwrap_or(f64::NAN));
        }
        let algbw = bytes as f64 / (worst / 1000.0) / 1e9;
        let busbw = algbw * 2.0 * (n as f64 - 1.0) / n as f64;
        let line = serde_json::json!({"nodes": n, "bytes": bytes, "time_ms": worst,
            "algbw_gbps": algbw, "busbw_gbps": busbw, "transport": t, "iters": iters});
        println!("{line}");
        if !json {
            eprintln!("{n} nodes, {bytes} bytes over {t}: {worst:.2} ms, busbw {busbw:.3} GB/s");
        }
    }
    c.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

struct BenchServe {
    nodes: usize,
    stages: u32,
    requests: usize,
    concurrency: usize,
    batch: usize,
    max_tokens: u32,
    layers: i64,
    width: i64,
    raw: bool,
    json: bool,
}

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

async fn bench_serve(b: BenchServe) -> Result<(), Failure> {
    let (dir, _) = local_dir(None);
    std::fs::create_dir_all(&dir).map_err(anyhow::Error::from)?;
    // A random-initialised gpt: one training step writes its checkpoint.
    let context = 64;
    let job = dir.join("bench-serve.toml");
    std::fs::write(
        &job,
        format!(
            "name = \"bench-serve\"\nsteps = 1\nbatch_size = 8\nthreads = 1\n[model]\nkind = \"gpt\"\nlayers = {}\nheads = 4\nwidth = {}\ncontext = {context}\n[data]\nkind = \"arithmetic\"\ndigits = 2\n",
            b.layers, b.width
        ),
    )
    .map_err(anyhow::Error::from)?;
    let bin = std::env::current_exe().context("cannot find the shoal binary")?;
    let out = tokio::process::Command::new(&bin)
        .args(["train", "--local", "1", "--json", "--dir"])
        .arg(dir.join("train-nodes"))
        .arg(&job)
        .current_dir(&dir)
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
    let ck = dir.join("runs/bench-serve/checkpoint.safetensors");
    let mut lat: Vec<f64> = Vec::new();
    let t0;
    let elapsed;
    let mode;
    let mut busy: Vec<f64> = Vec::new();
    let mut calls: Option<(u64, u64)> = None;
    if b.raw {
        mode = "raw";
        tch::set_num_threads(1);
        let cfg = shoal_node::serve::model::describe(&ck).map_err(anyhow::Error::from)?;
        let mut stage =
            shoal_node::serve::model::Stage::open(&ck, cfg.clone()).map_err(anyhow::Error::from)?;
        let layers = 0..cfg.layers as usize;
        use coordinator_free::codec::stage::Payload;
        t0 = Instant::now();
        let mut done = 0usize;
        while done < b.requests {
            let n = b.concurrency.min(b.requests - done);
            let started = Instant::now();
            let mut tokens: Vec<u8> = Vec::new();
            for i in done..done + n {
                for &c in bench_prompt(i).as_bytes() {
                    tokens.extend_from_slice(&i64::from(c).to_le_bytes());
                }
            }
            let mut len = 6u32;
            let pad = vec![0u32; n];
            let rows: Vec<u64> = (done as u64..(done + n) as u64).collect();
            for step in 0..b.max_tokens {
                let (_, shape, logits) = stage
                    .forward(
                        &rows,
                        layers.clone(),
                        step == 0,
                        &pad,
                        Payload::Tokens,
                        &[n as u32, len],
                        &tokens,
                        Payload::LastLogits,
                    )
                    .map_err(anyhow::Error::from)?;
                let v = shape[1] as usize;
                tokens.clear();
                for r in 0..n {
                    let row: Vec<f32> = logits[r * v * 4..(r + 1) * v * 4]
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                        .collect();
                    let t = coordinator_free::serving::sample_token(&row, 0.0, 1.0, 0.0) as i64;
                    tokens.extend_from_slice(&t.to_le_bytes());
                }
                len = 1;
            }
            stage.drop_rows(&rows);
            let ms = started.elapsed().as_secs_f64() * 1000.0;
            lat.extend(std::iter::repeat_n(ms, n));
            done += n;
        }
        elapsed = t0.elapsed();
    } else {
        mode = "shoal";
        let extra: Vec<String> = [
            "--data-plane",
            "tcp",
            "--serve-threads",
            "1",
            "--serve-max-batch",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain([b.batch.to_string()])
        .collect();
        let mut c = start_cluster(&dir.join("nodes"), b.nodes, &extra)?;
        let n = b.nodes;
        let bound = Duration::from_secs(120);
        if poll_until(
            &mut c,
            bound,
            Duration::from_millis(50),
            |_| {},
            |r| agreed_view(r, n, None),
        )
        .await?
        .is_none()
        {
            return Err(anyhow!("{n} nodes did not converge").into());
        }
        let api = c.api(0).ok_or_else(|| anyhow!("node 0 has no API"))?;
        let offer =
            serde_json::json!({"path": ck, "name": "bench", "stages": b.stages}).to_string();
        status::http_request(api, "POST", "/v1/serve", offer.as_bytes(), bound)
            .await
            .map_err(anyhow::Error::from)?;
        let depth = (b.stages as usize).min(n).max(1);
        let ready = poll_until(
            &mut c,
            bound,
            Duration::from_millis(100),
            |_| {},
            |reports| {
                let m = reports
                    .first()?
                    .1
                    .as_ref()?
                    .serving
                    .iter()
                    .find(|m| m.name == "bench")?
                    .clone();
                (m.holders.len() >= n && m.replicas.first().is_some_and(|r| r.len() >= depth))
                    .then_some(())
            },
        )
        .await?;
        if ready.is_none() {
            return Err(anyhow!("the model was not served; logs under {}", dir.display()).into());
        }
        let ask = |i: usize| {
            let body = serde_json::json!({"model": "bench", "prompt": bench_prompt(i), "max_tokens": b.max_tokens, "temperature": 0}).to_string();
            async move {
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
        };
        // Warm-up (weights loaded on first use, connections opened).
        for i in 0..b.concurrency {
            ask(b.requests + i).await.map_err(anyhow::Error::from)?;
        }
        let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        t0 = Instant::now();
        let workers = (0..b.concurrency).map(|_| {
            let next = next.clone();
            let ask = &ask;
            async move {
                let mut mine = Vec::new();
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    if i >= b.requests {
                        return Ok::<_, status::ClientError>(mine);
                    }
                    mine.push(ask(i).await?);
                }
            }
        });
        let stats_now = |reports: &[(usize, Option<status::StatusReport>)]| -> Vec<shoal_node::serve::ServeStats> {
            reports
                .iter()
                .map(|(_, r)| {
                    r.as_ref()
                        .and_then(|r| r.serve_stats.clone())
                        .unwrap_or_default()
                })
                .collect()
        };
        let before = stats_now(&c.statuses().await);
        for r in futures::future::join_all(workers).await {
            lat.extend(r.map_err(anyhow::Error::from)?);
        }
        elapsed = t0.elapsed();
        // How busy each node's stage compute was during the timed run, and how many
        // stage calls and prefill calls the requests took.
        let after = stats_now(&c.statuses().await);
        let secs = elapsed.as_secs_f64();
        busy = after
            .iter()
            .zip(&before)
            .map(|(a, b)| (a.forward_s - b.forward_s) / secs)
            .collect();
        let delta = |f: fn(&shoal_node::serve::ServeStats) -> u64| -> u64 {
            after.iter().zip(&before).map(|(a, b)| f(a) - f(b)).sum()
        };
        calls = Some((delta(|s| s.stage_calls), delta(|s| s.batches)));
        c.shutdown();
    }
    let _ = std::fs::remove_dir_all(&dir);
    lat.sort_by(f64::total_cmp);
    let rps = b.requests as f64 / elapsed.as_secs_f64();
    let line = serde_json::json!({
        "mode": mode, "nodes": if b.raw { 1 } else { b.nodes }, "stages": if b.raw { 1 } else { b.stages },
        "requests": b.requests, "concurrency": b.concurrency,
        "batch": if b.raw { b.concurrency } else { b.batch }, "max_tokens": b.max_tokens,
        "layers": b.layers, "width": b.width,
        "requests_per_s": rps, "tokens_per_s": rps * f64::from(b.max_tokens),
        "p50_ms": percentile(&lat, 0.5), "p99_ms": percentile(&lat, 0.99),
        "stage_busy": busy,
        "stage_calls_per_request": calls.map(|c| c.0 as f64 / b.requests as f64),
        "prefill_calls_per_request": calls.map(|c| c.1 as f64 / b.requests as f64),
    });
    println!("{line}");
    if !b.json {
        eprintln!(
            "{mode}: {rps:.1} requests/s, p50 {:.1} ms, p99 {:.1} ms",
            percentile(&lat, 0.5),
            percentile(&lat, 0.99)
        );
    }
    Ok(())
}

fn default_model_name(path: &Path) -> String {
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let name = if stem == "checkpoint" {
        path.canonicalize()
            .ok()
            .and_then(|p| {
                p.parent()
                    .and_then(|d| d.file_name())
                    .map(|n| n.to_string_lossy().into_owned())
            })
            .unwrap_or(stem)
    } else {
        stem
    };
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.:".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect()
}

async fn serve(a: ServeArgs) -> Result<(), Failure> {
    let path = a
        .model
        .canonicalize()
        .map_err(|e| usage(anyhow!("cannot read {}: {e}", a.model.display())))?;
    let name = a.name.clone().unwrap_or_else(|| default_model_name(&path));
    let token = a.api_token.clone().filter(|t| !t.is_empty());
    let offer = serde_json::json!({"path": path, "name": name, "stages": a.stages}).to_string();
    let call = |api: SocketAddr, method: &'static str, route: &'static str, body: String| {
        let token = token.clone();
        async move {
            status::http_request_with(
                api,
                method,
                route,
                token.as_deref(),
                body.as_bytes(),
                Duration::from_secs(120),
            )
            .await
        }
    };
    let Some(n) = a.local else {
        let reply = call(a.api, "POST", "/v1/serve", offer)
            .await
            .map_err(|e| match e {
                status::ClientError::Status { status: 400, body } => usage(anyhow!("{body}")),
                e => anyhow::Error::from(e).into(),
            })?;
        println!("{}", String::from_utf8_lossy(&reply).trim());
        for p in &a.prompts {
            ask(a.api, token.as_deref(), &name, p, a.max_tokens, a.json).await?;
        }
        return Ok(());
    };
    let (dir, temp) = local_dir(a.dir.clone());
    let t = match a.data_plane {
        shoal_node::data_plane::DataTransport::Quic => "quic",
        shoal_node::data_plane::DataTransport::Tcp => "tcp",
    };
    let mut extra = vec!["--data-plane".to_string(), t.to_string()];
    if let Some(tok) = &token {
        extra.extend(["--api-token".to_string(), tok.clone()]);
    }
    let mut c = start_cluster(&dir, n, &extra)?;
    let bound = Duration::from_secs(a.timeout_s);
    let converged = poll_until(
        &mut c,
        bound,
        Duration::from_millis(50),
        |_| {},
        |r| agreed_view(r, n, None),
    )
    .await?;
    if converged.is_none() {
        return Err(anyhow!("{n} nodes did not converge; logs under {}", dir.display()).into());
    }
    let api0 = c
        .api(0)
        .ok_or_else(|| anyhow!("node 0 has no API address"))?;
    let reply = call(api0, "POST", "/v1/serve", offer)
        .await
        .map_err(|e| match e {
            status::ClientError::Status { status: 400, body } => usage(anyhow!("{body}")),
            e => anyhow::Error::from(e).into(),
        })?;
    // Served once every node holds the model and node 0 has a plan over them.
    let depth = (a.stages as usize).max(1);
    let ready = poll_until(
        &mut c,
        bound,
        Duration::from_millis(100),
        |_| {},
        |reports| {
            let r = reports.first()?.1.as_ref()?;
            let m = r.serving.iter().find(|m| m.name == name)?;
            (m.holders.len() >= n && !m.replicas.is_empty() && m.replicas[0].len() >= depth.min(n))
                .then(|| m.clone())
        },
    )
    .await?;
    let Some(model) = ready else {
        return Err(anyhow!(
            "the model was not served within {} s; logs under {}",
            a.timeout_s,
            dir.display()
        )
        .into());
    };
    if a.json {
        println!(
            "{}",
            serde_json::json!({"served": name, "offer": serde_json::from_slice::<serde_json::Value>(&reply).unwrap_or_default(), "replicas": model.replicas})
        );
    } else {
        println!("serving `{name}` on {n} local nodes; replicas:");
        for (i, r) in model.replicas.iter().enumerate() {
            println!("  {i}: {}", r.join(" -> "));
        }
        for i in 0..n {
            if let Some(api) = c.api(i) {
                println!("  node {i}: http://{api}/v1/completions");
            }
        }
    }
    let result = async {
        for p in &a.prompts {
            ask(api0, token.as_deref(), &name, p, a.max_tokens, a.json).await?;
        }
        Ok::<(), Failure>(())
    }
    .await;
    if result.is_ok() && a.prompts.is_empty() {
        if !a.json {
            println!("running; Ctrl-C to stop (logs under {})", dir.display());
        }
        let _ = tokio::signal::ctrl_c().await;
    }
    c.shutdown();
    if temp {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

/// Asks one greedy completion and prints the question and the answer.
async fn ask(
    api: SocketAddr,
    token: Option<&str>,
    model: &str,
    prompt: &str,
    max_tokens: u32,
    json: bool,
) -> Result<(), Failure> {
    let body = serde_json::json!({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
        .to_string();
    let t0 = Instant::now();
    let reply = status::http_request_with(
        api,
        "POST",
        "/v1/completions",
        token,
        body.as_bytes(),
        Duration::from_secs(120),
    )
    .await
    .map_err(anyhow::Error::from)?;
    let ms = t0.elapsed().as_secs_f64() * 1000.0;
    let v: serde_json::Value = serde_json::from_slice(&reply).map_err(anyhow::Error::from)?;
    let text = v["choices"][0]["text"].as_str().unwrap_or_default();
    if json {
        println!(
            "{}",
            serde_json::json!({"prompt": prompt, "completion": text, "finish_reason": v["choices"][0]["finish_reason"], "ms": ms})
        );
    } else {
        println!("{prompt:?} -> {text:?} ({ms:.1} ms)");
    }
    Ok(())
}

/// Polls the cluster every `every` until `done` holds, for at most `bound`.
async fn poll_until<T>(
    c: &mut LocalCluster,
    bound: Duration,
    every: Duration,
    mut on_poll: impl FnMut(&[(usize, Option<status::StatusReport>)]),
    done: impl Fn(&[(usize, Option<status::StatusReport>)]) -> Option<T>,
) -> Result<Option<T>, Failure> {
    let end = Instant::now() + bound;
    loop {
        c.check_alive().map_err(anyhow::Error::from)?;
        let reports = c.statuses().await;
        on_poll(&reports);
        if let Some(v) = done(&reports) {
            return Ok(Some(v));
        }
        if Instant::now() >= end {
            return Ok(None);
        }
        tokio::time::sleep(every).await;
    }
}

fn cluster_table(reports: &[(usize, Option<status::StatusReport>)], n: usize) -> String {
    let mut s = format!(
        "{:<5} {:<54} {:>6} {:<17} {:>8}\n",
        "NODE", "PEER", "EPOCH", "VIEW", "MEMBERS"
    );
    for (i, r) in reports {
        match r {
            Some(r) => {
                s += &format!(
                    "{:<5} {:<54} {:>6} {:<17} {:>5}/{n}\n",
                    i,
                    r.node.id,
                    r.view.epoch,
                    &r.view.hash[..16],
                    r.view.members.len()
                )
            }
            None => s += &format!("{i:<5} (not answering)\n"),
        }
    }
    s
}

async fn local(a: LocalArgs) -> Result<(), Failure> {
    let (dir, temp) = local_dir(a.dir);
    let t0 = Instant::now();
    let mut c = start_cluster(&dir, a.nodes, &[])?;
    let n = a.nodes;
    let tty = std::io::stdout().is_terminal() && !a.json;
    let mut last_line = String::new();
    let result = poll_until(
        &mut c,
        Duration::from_secs(a.timeout_s),
        Duration::from_millis(100),
        |reports| {
            if a.json {
                return;
            }
            let table = cluster_table(reports, n);
            if tty {
                print!("\x1b[H\x1b[2J{table}");
            } else if table != last_line {
                println!("{table}");
                last_line = table;
            }
        },
        |reports| agreed_view(reports, n, None),
    )
    .await?;
    let Some((epoch, hash)) = result else {
        return Err(anyhow!(
            "{n} nodes did not converge within {} s; logs under {}",
            a.timeout_s,
            dir.display()
        )
        .into());
    };
    let ms = t0.elapsed().as_millis();
    if a.json {
        let reports = c.statuses().await;
        let members = reports
            .first()
            .and_then(|(_, r)| r.as_ref())
            .map(|r| r.view.members.clone())
            .unwrap_or_default();
        println!(
            "{}",
            serde_json::json!({"nodes": n, "converged": true, "epoch": epoch, "hash": hash,
                "members": members, "elapsed_ms": ms})
        );
    } else {
        println!(
            "converged: {n} nodes agree on view epoch {epoch} hash {} after {ms} ms",
            &hash[..16]
        );
    }
    if !a.exit_when_converged {
        if !a.json {
            println!("running; Ctrl-C to stop (logs under {})", dir.display());
        }
        let _ = tokio::signal::ctrl_c().await;
    }
    c.shutdown();
    if temp {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

async fn bench_membership(n: usize, json: bool, timeout_s: u64) -> Result<(), Failure> {
    if n < 2 {
        return Err(usage(anyhow!("--nodes must be at least 2")));
    }
    let (dir, _) = local_dir(None);
    let bound = Duration::from_secs(timeout_s);
    let every = Duration::from_millis(20);
    let t0 = Instant::now();
    let mut c = start_cluster(&dir, n, &[])?;
    let up_ms = t0.elapsed().as_millis() as u64;
    let t1 = Instant::now();
    let converged = poll_until(&mut c, bound, every, |_| {}, |r| agreed_view(r, n, None)).await?;
    if converged.is_none() {
        return Err(anyhow!(
            "{n} nodes did not converge within {timeout_s} s; logs under {}",
            dir.display()
        )
        .into());
    }
    let converge_ms = t1.elapsed().as_millis() as u64;
    // Kill the last node with SIGKILL; the survivors must drop it.
    let victim = n - 1;
    let victim_id = c
        .statuses()
        .await
        .into_iter()
        .find(|(i, _)| *i == victim)
        .and_then(|(_, r)| r)
        .map(|r| r.node.id)
        .ok_or_else(|| anyhow!("node {victim} stopped answering"))?;
    let t2 = Instant::now();
    c.kill(victim);
    let detected = poll_until(
        &mut c,
        bound,
        every,
        |_| {},
        |r| agreed_view(r, n - 1, Some(&victim_id)),
    )
    .await?;
    if detected.is_none() {
        return Err(anyhow!(
            "survivors did not drop the killed node within {timeout_s} s; logs under {}",
            dir.display()
        )
        .into());
    }
    let detect_ms = t2.elapsed().as_millis() as u64;
    c.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
    let line = serde_json::json!({"nodes": n, "up_ms": up_ms, "converge_ms": converge_ms, "detect_ms": detect_ms});
    println!("{line}");
    if !json {
        eprintln!("{n} nodes: processes up in {up_ms} ms, one view {converge_ms} ms later; a SIGKILLed node left every view after {detect_ms} ms");
    }
    Ok(())
}

fn tcp_ceiling(ring: usize, mib: usize) -> Result<(), Failure> {
    const CHUNK: usize = 1 << 20;
    if !(1..=16).contains(&ring) {
        return Err(usage(anyhow!("--ring must be 1..=16")));
    }
    if !(1..=1 << 20).contains(&mib) {
        return Err(usage(anyhow!("--mib must be 1..=1048576")));
    }
    let total = mib << 20;
    // Member i listens; member i-1 (mod ring) connects to it: every member has one
    // outgoing and one incoming stream (a single member streams to itself).
    let listeners = (0..ring)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()
        .map_err(anyhow::Error::from)?;
    let mut outgoing = Vec::with_capacity(ring);
    let mut incoming = Vec::with_capacity(ring);
    for i in 0..ring {
        let next = &listeners[(i + 1) % ring];
        let s = std::net::TcpStream::connect(next.local_addr().map_err(anyhow::Error::from)?)
            .map_err(anyhow::Error::from)?;
        s.set_nodelay(true).map_err(anyhow::Error::from)?;
        outgoing.push(s);
        incoming.push(next.accept().map_err(anyhow::Error::from)?.0);
    }
    // incoming[i] flows into member (i + 1) % ring; rotated, it flows into member i. Each
    // member is one thread that sends and receives at once through poll(2) on
    // non-blocking sockets (the shape of gloo's and shoal's transports): no reduction, no
    // framing, only the bytes.
    incoming.rotate_right(1);
    let start = std::sync::Arc::new(std::sync::Barrier::new(ring + 1));
    let members: Vec<_> = outgoing
        .into_iter()
        .zip(incoming)
        .map(|(out, inp)| {
            let start = start.clone();
            std::thread::spawn(move || ring_member(out, inp, total, CHUNK, &start))
        })
        .collect();
    start.wait();
    let mut rates = Vec::with_capacity(ring);
    for m in members {
        rates.push(
            m.join()
                .map_err(|_| anyhow!("ring member thread panicked"))?
                .map_err(anyhow::Error::from)?,
        );
    }
    let slowest = rates.iter().copied().fold(f64::INFINITY, f64::min);
    println!(
        "{}",
        serde_json::json!({
            "ring": ring,
            "per_member_gbps": slowest / 1e9,
            "aggregate_gbps": rates.iter().sum::<f64>() / 1e9,
        })
    );
    Ok(())
}

/// One member of the loopback ring: streams `total` bytes out while reading `total` in,
/// both non-blocking under poll(2). Returns the rate it received at, bytes/s.
fn ring_member(
    mut out: std::net::TcpStream,
    mut inp: std::net::TcpStream,
    total: usize,
    chunk: usize,
    start: &std::sync::Barrier,
) -> std::io::Result<f64> {
    use std::io::{ErrorKind, Read, Write};
    use std::os::fd::AsRawFd;
    out.set_nonblocking(true)?;
    inp.set_nonblocking(true)?;
    let tx = vec![1u8; chunk];
    let mut rx = vec![0u8; chunk];
    let (mut sent, mut got) = (0usize, 0usize);
    start.wait();
    let t = Instant::now();
    while sent < total || got < total {
        let mut fds = [
            libc::pollfd {
                fd: out.as_raw_fd(),
                events: if sent < total { libc::POLLOUT } else { 0 },
                revents: 0,
            },
            libc::pollfd {
                fd: inp.as_raw_fd(),
                events: if got < total { libc::POLLIN } else { 0 },
                revents: 0,
            },
        ];
        // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, 10_000) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if sent < total {
            match out.write(&tx[..chunk.min(total - sent)]) {
                Ok(k) => sent += k,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        if got < total {
            match inp.read(&mut rx) {
                Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
                Ok(k) => got += k,
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }
    Ok(got as f64 / t.elapsed().as_secs_f64())
}

/// `shoal train`: validates the job here, submits it to a node (or to a local cluster it
/// starts), follows its progress and reports the outcome.
async fn train(a: TrainArgs) -> Result<(), Failure> {
    use shoal_node::train::{job::JobSpec, JobState};
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
/// follows it to its end.
async fn run_job(
    spec: &shoal_node::train::job::JobSpec,
    a: &TrainArgs,
) -> Result<shoal_node::train::JobReport, Failure> {
    use shoal_node::train::{JobReport, JobState};
    let bound = Duration::from_secs(a.timeout_s);
    let (dir, temp) = local_dir(a.dir.clone());
    let mut cluster = None;
    let api = match a.local {
        Some(n) => {
            let t = match a.data_plane {
                shoal_node::data_plane::DataTransport::Quic => "quic",
                shoal_node::data_plane::DataTransport::Tcp => "tcp",
            };
            let extra = vec!["--data-plane".to_string(), t.to_string()];
            let mut c = start_cluster(&dir, n, &extra)?;
            let ok = poll_until(
                &mut c,
                Duration::from_secs(60),
                Duration::from_millis(50),
                |_| {},
                |r| agreed_view(r, n, None),
            )
            .await?;
            if ok.is_none() {
                return Err(anyhow!(
                    "{n} local nodes did not converge; logs under {}",
                    dir.display()
                )
                .into());
            }
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
    let run = first.run.clone();
    let tty = std::io::stderr().is_terminal() && !a.json;
    let t0 = Instant::now();
    let mut last_print = Instant::now();
    let report = loop {
        if let Some(c) = cluster.as_mut() {
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
            break r;
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
    };
    if let Some(mut c) = cluster {
        c.shutdown();
        if temp && report.state == JobState::Done {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    Ok(report)
}

fn progress_line(r: &shoal_node::train::JobReport) -> String {
    use shoal_node::train::JobState;
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

/// `shoal bench train`: the built-in gpt on 2 MiB of synthetic bytes, N local nodes.
#[allow(clippy::too_many_arguments)]
async fn bench_train(
    n: usize,
    batch: u64,
    steps: u64,
    warmup: u64,
    threads: usize,
    [layers, heads, width, context]: [i64; 4],
    transport: shoal_node::data_plane::DataTransport,
    balance: bool,
    json: bool,
) -> Result<(), Failure> {
    use shoal_node::train::job::JobSpec;
    let (dir, _) = local_dir(None);
    std::fs::create_dir_all(&dir).context("cannot create the bench dir")?;
    // Bytes from a fixed LCG: the content does not matter, only the shapes.
    let mut z: u64 = 1;
    let text: Vec<u8> = (0..2u64 << 20)
        .map(|_| {
            z = z.wrapping_mul(6364136223846793005).wrapping_add(1);
            b' ' + ((z >> 33) % 95) as u8
        })
        .collect();
    std::fs::write(dir.join("data.txt"), text).context("cannot write the bench data")?;
    let toml = format!(
        r#"
name = "bench-train"
steps = {total}
batch_size = {batch}
threads = {threads}
min_nodes = {n}
balance = {balance}
eval_fraction = 0.01
output_dir = "{out}"
[model]
kind = "gpt"
layers = {layers}
heads = {heads}
width = {width}
context = {context}
[data]
kind = "text"
path = "{data}"
[optimizer]
kind = "adamw"
lr = 0.001
weight_decay = 0.01
schedule = "constant"
grad_clip = 0.0
"#,
        total = warmup + steps,
        out = dir.join("runs").display(),
        data = dir.join("data.txt").display(),
    );
    let spec = JobSpec::parse(&toml).map_err(|e| usage(e.into()))?;
    let args = TrainArgs {
        job: dir.join("job.toml"),
        local: Some(n),
        resume: false,
        json: true,
        api: "127.0.0.1:0".parse().expect("valid"),
        data_plane: transport,
        dir: Some(dir.join("nodes")),
        timeout_s: 3600,
    };
    let report = run_job(&spec, &args).await?;
    if report.state != shoal_node::train::JobState::Done {
        return Err(anyhow!(
            "bench job failed: {}; logs under {}",
            report.error.unwrap_or_default(),
            dir.display()
        )
        .into());
    }
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
    let (Some(t0), Some(t1)) = (at(warmup.max(1)), at(warmup + steps)) else {
        return Err(anyhow!("bench metrics lack the timed steps").into());
    };
    let timed = if warmup == 0 { steps - 1 } else { steps };
    let secs = (t1 - t0).max(1e-9);
    // The first member's mean of each phase over the timed steps (what the rest of a step
    // is: the update, the step's bookkeeping).
    let first = warmup.max(1);
    let timed_rows: Vec<&serde_json::Value> = rows
        .iter()
        .filter(|r| r["step"].as_u64().is_some_and(|s| s > first))
        .collect();
    let mean = |key: &str| {
        let v: Vec<f64> = timed_rows.iter().filter_map(|r| r[key].as_f64()).collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    let line = serde_json::json!({"impl": "shoal", "nodes": n, "threads": threads, "model": "gpt",
        "balance": balance, "batch": batch, "steps": timed, "step_ms": secs * 1e3 / timed as f64,
        "samples_per_s": (batch * timed) as f64 / secs,
        "compute_ms": mean("compute_ms"), "guard_ms": mean("guard_ms"),
        "allreduce_ms": mean("allreduce_ms"), "member_step_ms": mean("step_ms")});
    println!("{line}");
    if !json {
        eprintln!(
            "{n} nodes: {:.1} samples/s ({:.1} ms per step)",
            (batch * timed) as f64 / secs,
            secs * 1e3 / timed as f64
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
