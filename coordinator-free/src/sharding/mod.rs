//! Data sharding: which training samples each member of a view processes at each step, so
//! that every sample is used exactly once per data epoch.
//!
//! The decision has three layers, each a pure function of agreed inputs, so every member
//! computes the same answer without talking to anyone:
//!
//! 1. **Order.** [`epoch_order`] shuffles the sample ids `0..n_samples` for one data epoch,
//!    with a Fisher–Yates shuffle driven by SplitMix64 seeded from `(seed, epoch)`.
//! 2. **Batch.** A [`DataCursor`] `(epoch, offset)` says how much of that epoch's order is
//!    consumed. [`next_batch`] turns it into the [`StepBatch`] of positions
//!    `[offset, offset + len)` the next step consumes, and [`advance`] moves the cursor past
//!    it once the step commits. The batch depends only on the cursor and the batch size,
//!    never on who is in the view: a step that fails and is retried under a new view consumes
//!    the *same* positions, split differently. That is what makes "exactly once" hold across
//!    joins and leaves: the cursor only moves when a step commits.
//! 3. **Split.** [`assign`] cuts the batch along a fixed grid of shards (`shard_size`
//!    positions each, aligned at position 0 of the epoch) into *pieces* and hands each piece
//!    to one member by rendezvous (highest-random-weight) hashing with bounded loads, so each
//!    member's share is within one shard of its weight-proportional share.
//!
//! Positions index the epoch order; a member turns its positions into sample ids with
//! `order[position]`.
//!
//! ## Contract
//! The shuffle recipe, the bounded-integer draw, the member digest and the rendezvous score
//! are part of the cross-machine contract: two nodes running different recipes would
//! train on different data. `epoch_order_is_pinned` in the tests pins three small orders,
//! one member digest and one score (values reproduced by an independent Python
//! implementation of the recipe), so an accidental change fails loudly.
//!
//! ## Layout
//! - `order.rs`: the epoch's shuffle ([`epoch_order`]) and the PRNG behind it;
//! - `batch.rs`: the cursor, the step's batch, and a member's micro-batches;
//! - `assign.rs`: the rendezvous split of a batch among members.

use crate::view::NodeId;

mod assign;
mod batch;
mod order;

pub use assign::{assign, member_digest, rendezvous_score, Assignment};
pub use batch::{advance, micro_batches, next_batch, steps_per_epoch, DataCursor, StepBatch};
pub use order::epoch_order;

/// Why a batch or an assignment cannot be made.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ShardingError {
    /// The batch size is zero (in [`next_batch`]), or the batch handed to [`assign`] is
    /// empty.
    #[error("batch size is zero")]
    ZeroBatchSize,
    /// The shard size handed to [`assign`] is zero.
    #[error("shard size is zero")]
    ZeroShardSize,
    /// The data set has no samples.
    #[error("the data set has no samples")]
    ZeroSamples,
    /// No member has a positive weight, so nobody can take the batch.
    #[error("no member has a positive weight")]
    NoPositiveWeight,
    /// The same member id appears twice in the member list.
    #[error("member {0} appears more than once")]
    DuplicateMember(NodeId),
    /// The cursor's offset is `n_samples` or more; a valid cursor's offset is always below
    /// `n_samples` because [`advance`] wraps to the next epoch.
    #[error("cursor offset {offset} is not below the {n_samples} samples of an epoch")]
    OffsetOutOfRange {
        /// The cursor's offset.
        offset: u64,
        /// The number of samples.
        n_samples: u64,
    },
    /// The batch's end, `offset + len`, does not fit in a `u64` (only a hand-built
    /// [`StepBatch`] can do this; [`next_batch`] never returns one).
    #[error("batch at offset {offset} with {len} samples ends past u64::MAX")]
    BatchOverflow {
        /// The batch's first position.
        offset: u64,
        /// The batch's length.
        len: u64,
    },
}
