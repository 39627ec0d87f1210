//! `shoal bench`: the benchmarks, one module each. Each prints JSON lines a script can
//! hold against its reference (gloo, DDP, a raw forward, a plain TCP stream):
//! - [`membership`]: time to one view, and to drop a killed node;
//! - [`allreduce`]: ring all-reduce over the data plane (debug API of local nodes), or
//!   NCCL across this machine's GPUs ([`nccl`]);
//! - [`tcp_ceiling`]: plain loopback TCP rate of a ring, the all-reduce's reference;
//! - [`train`]: data-parallel training throughput of the built-in gpt;
//! - [`serve`]: completions per second and latency against a raw forward;
//! - [`dial`]: a stress tool, not a measurement: floods a node's control plane with dials.

mod allreduce;
mod dial;
mod membership;
mod nccl;
mod serve;
mod tcp_ceiling;
mod train;

use crate::failure::Failure;
use clap::Subcommand;

/// The benchmarks.
#[derive(Subcommand)]
pub enum BenchCmd {
    /// Start N local nodes; time until all share one view, and until the survivors drop a
    /// node killed with SIGKILL. Prints {"nodes","up_ms","converge_ms","detect_ms"}.
    Membership(membership::MembershipArgs),
    /// Start N local nodes and time f32 ring all-reduces over the data plane (or, with
    /// --backend nccl, NCCL all-reduces with one member per GPU). Prints one JSON line per
    /// size: {"nodes","bytes","time_ms","algbw_gbps","busbw_gbps",...}.
    Allreduce(allreduce::AllreduceArgs),
    /// Serve a random-initialised gpt on N local nodes (or, with --raw, run the same
    /// generation as a plain in-process forward loop) and time R greedy completions sent C
    /// at a time. Prints {"mode","nodes","stages","requests","requests_per_s","p50_ms",...}.
    Serve(serve::ServeArgs),
    /// Start N local nodes and train the built-in gpt on synthetic bytes; prints one JSON
    /// line {"impl":"shoal","nodes","threads","model","batch","steps","step_ms",
    /// "samples_per_s"} over the timed steps (after the warm-up).
    Train(train::TrainArgs),
    /// Plain loopback TCP rate of a ring: RING members (one thread each, non-blocking
    /// sockets under poll), each streaming MIB MiB in 1 MiB writes to the next while
    /// receiving from the previous, all at once, with no reduction and no framing. A ring
    /// all-reduce sends and receives busbw bytes per second per member, so the slowest
    /// member's rate here is the reference its busbw is held against (a measured
    /// reference, not a proven bound). Prints {"ring":RING,"per_member_gbps":..,
    /// "aggregate_gbps":..}.
    TcpCeiling(tcp_ceiling::TcpCeilingArgs),
    /// Stress tool: dial a node's control plane COUNT times from this one process (a fresh
    /// identity, CONCURRENCY dials in flight, upgraded connections held until all are
    /// done): checks that a wrong swarm key is refused every time and that a flood stays
    /// within the node's connection limits. Prints {"dials","upgraded","refused","timed_out"}.
    Dial(dial::DialArgs),
}

/// Runs one benchmark.
pub async fn run(what: BenchCmd) -> Result<(), Failure> {
    match what {
        BenchCmd::Membership(a) => membership::run(a).await,
        BenchCmd::Allreduce(a) => allreduce::run(a).await,
        BenchCmd::Serve(a) => serve::run(a).await,
        BenchCmd::Train(a) => train::run(a).await,
        BenchCmd::TcpCeiling(a) => tcp_ceiling::run(a),
        BenchCmd::Dial(a) => dial::run(a).await,
    }
}
