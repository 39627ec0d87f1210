//! # coordinator_free — shoal's sans-IO core
//!
//! Every decision a shoal node makes about *who is in* lives here, as plain state machines
//! with no tokio, no sockets, no tch and no clock. Time (`now`, in milliseconds since any
//! fixed origin the caller picks) and randomness (`entropy: u64`) come in as arguments;
//! messages come in through `handle_*` and go out through `poll_*`. The I/O shell in
//! `node/` adapts these machines to libp2p, and the tests drive them through a
//! deterministic simulated network instead. The map of the whole code: `docs/architecture.md`.
//!
//! - [`membership`]: the membership table built from heartbeats (incarnations, suspicion,
//!   failure), the view it derives and when that view is settled.
//! - [`gossip`]: whether a gossiped control message is accepted, ignored or rejected, and
//!   what it means for the node.
//! - [`address`]: the data-plane address members announce (`<transport>/<ip>:<port>`).
//! - [`view`]: what a view is (epoch, sorted members, hash) and how it is hashed.
//! - [`codec`]: the one size-limited decoder every untrusted byte goes through.
//! - [`collective`]: ring schedules for all-reduce, all-gather, broadcast and barrier.
//! - [`compression`]: the wire forms of compressed all-reduces (bf16, int8 with a scale per
//!   block), summed in f32.
//! - [`pipeline`]: serving plans: layers cut into stages by memory and speed, replicas.
//! - [`serving`]: serving decisions at the entry node: dynamic batching, replica choice, the
//!   response cache and its key, and token sampling.
//! - [`stop`]: where a completion stops (stop sequences, length) and how much of its text
//!   a streaming client may be sent yet (the hold-back).
//! - [`training`]: the training-round state machine (wait, exchange progress, sync, step,
//!   commit or redo).
//! - [`outer_round`]: DiLoCo's outer rounds (H local steps, then one all-reduce of the
//!   pseudo-gradient and a Nesterov outer step), the same protocol with a round for a step.
//! - [`sharding`]: which samples each member trains on at each step (exactly once per
//!   data epoch).

pub mod address;
pub mod codec;
pub mod collective;
pub mod compression;
pub mod gossip;
pub mod membership;
pub mod outer_round;
pub mod pipeline;
pub mod serving;
pub mod sharding;
pub mod stop;
pub mod training;
pub mod view;

pub use address::{AddrError, DataPlaneAddr, Transport};
pub use codec::{CodecError, ControlMessage};
pub use collective::{CollectiveError, DType, Kind, ReduceOp, Ring, RingStep};
pub use compression::Compression;
pub use membership::{
    Capabilities, GpuInfo, Heartbeat, HeartbeatError, MemberInfo, MemberState, Membership,
    MembershipConfig, MembershipEvent,
};
pub use sharding::{Assignment, DataCursor, ShardingError, StepBatch};
pub use view::{NodeId, NodeIdError, View, ViewHash, ViewMember};
