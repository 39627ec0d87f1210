//! How the loop runs its collectives: the tag that keeps each one apart, running one on
//! the node's runtime while watching the view (a view change abandons it; a broken one makes
//! every member restart together in the next epoch), and how a failure is classified
//! (redo in the next view, or fatal).

use super::member::Trainer;
use super::TrainError;
use crate::data_plane::DataPlaneError;
use coordinator_free::{View, ViewHash};

/// A collective tag: distinct per run (`base`), view, purpose, step and bucket. Binding it
/// to the view means a link opened for an abandoned collective of an earlier view (or of an
/// earlier attempt: a failed view is replaced by a new epoch) can never be taken for the
/// same step's collective in the current one.
pub(super) fn tag(base: u64, view: &View, purpose: u64, step: u64, index: u64) -> u64 {
    let v = u64::from_le_bytes(view.hash.0[..8].try_into().expect("8 bytes"));
    let mut z = base ^ v.rotate_left(29) ^ purpose.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z ^= step.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z ^= index.wrapping_mul(0x94d0_49bb_1331_11eb);
    z
}

/// [`tag`] purpose: the state broadcast.
pub(super) const TAG_SYNC: u64 = 1;
/// [`tag`] purpose: a step's gradient all-reduce.
pub(super) const TAG_GRAD: u64 = 2;
/// [`tag`] purpose: the evaluation's sums.
pub(super) const TAG_EVAL: u64 = 3;
/// [`tag`] purpose: the progress all-gather.
pub(super) const TAG_EXCHANGE: u64 = 4;
/// [`tag`] purpose: the weights-hash all-gather.
pub(super) const TAG_HASH: u64 = 5;

/// Why a collective of the loop did not complete.
#[derive(Debug, thiserror::Error)]
pub(super) enum StepFailure {
    /// The collective failed (a member died, a link broke, a bound passed).
    #[error(transparent)]
    Collective(DataPlaneError),
    /// The view changed while it ran; it was abandoned.
    #[error("the view changed")]
    ViewChanged,
    /// NCCL setup or the NCCL all-reduce failed (the view is reported as failed).
    #[error("NCCL: {0}")]
    Nccl(String),
}

/// A step's outcome other than success.
#[derive(Debug)]
pub(super) enum StepError {
    /// Redo the step in the next view.
    Failed(StepFailure),
    /// The job cannot go on.
    Fatal(TrainError),
}

/// u64 words as pairs of f32 bit patterns, for collectives that only copy (all-gather,
/// broadcast never add, so the bits arrive intact).
pub(super) fn words_as_f32(words: &[u64]) -> Vec<f32> {
    words
        .iter()
        .flat_map(|w| [f32::from_bits(*w as u32), f32::from_bits((*w >> 32) as u32)])
        .collect()
}

/// The inverse of [`words_as_f32`].
pub(super) fn f32_as_words(v: &[f32]) -> Vec<u64> {
    v.chunks_exact(2)
        .map(|c| c[0].to_bits() as u64 | ((c[1].to_bits() as u64) << 32))
        .collect()
}

/// A progress exchange or state sync failed: log it and wait for the next view.
pub(super) fn collective_failed(
    machine: &mut impl coordinator_free::training::RoundMachine,
    view: &View,
    what: &str,
    e: StepFailure,
) -> ViewHash {
    tracing::info!(
        epoch = view.epoch,
        "state {what} failed ({e}); waiting for the next view"
    );
    machine.handle_failure();
    view.hash
}

impl Trainer {
    /// Runs `fut` (a collective on `view`), abandoning it as soon as the view changes. A
    /// failure of the collective itself is reported to the node, which moves every member
    /// to the next epoch: members that failed at different moments, or are still waiting in
    /// the broken collective, all start over together instead of each retrying on its own
    /// in a view where the others are elsewhere.
    pub(super) fn collective<T>(
        &mut self,
        view: &View,
        fut: impl std::future::Future<Output = Result<T, DataPlaneError>>,
    ) -> Result<T, StepFailure> {
        let hash = view.hash;
        let r = if self.abandon_collective() {
            Err(StepFailure::Collective(DataPlaneError::Io {
                peer: self.ctx.me.clone(),
                source: std::io::Error::other("abandoned (debug)"),
            }))
        } else {
            let views = &mut self.ctx.views;
            self.ctx.rt.block_on(async {
                tokio::select! {
                    r = fut => r.map_err(StepFailure::Collective),
                    _ = views.wait_for(|s| s.view.hash != hash) => Err(StepFailure::ViewChanged),
                }
            })
        };
        if let Err(StepFailure::Collective(_)) = &r {
            // The node is gone only when it is shutting down; then nothing restarts anyway.
            let _ = self.ctx.view_failed.send(hash);
        }
        r
    }
}
