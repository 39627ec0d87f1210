//! Debug faults for the tests: `POST /v1/debug/perturb` sets [`TrainContext::perturb`] to one
//! of the `PERTURB_*` codes, and the loop takes it (once) at the matching point: before a
//! step ([`PERTURB_WEIGHTS`]), after the local gradient ([`PERTURB_NAN_GRADIENT`]), as a
//! collective starts ([`PERTURB_ABANDON_COLLECTIVE`]) or as one ends
//! ([`PERTURB_DIE_AFTER_COLLECTIVE`]). Each hook is one atomic
//! compare-and-swap when no fault is asked for; nothing else of the loop knows about them.
//!
//! [`TrainContext::perturb`]: super::TrainContext::perturb

use super::member::Trainer;
use std::sync::atomic::Ordering::SeqCst;

/// [`TrainContext::perturb`](super::TrainContext::perturb): nudge the weights before the
/// next step.
pub const PERTURB_WEIGHTS: u8 = 1;
/// [`TrainContext::perturb`](super::TrainContext::perturb): make the next local gradient
/// NaN.
pub const PERTURB_NAN_GRADIENT: u8 = 2;
/// [`TrainContext::perturb`](super::TrainContext::perturb): this member abandons its next
/// collective as if its link had broken, leaving the others waiting in it (tests of the
/// restart-together rule).
pub const PERTURB_ABANDON_COLLECTIVE: u8 = 3;
/// [`TrainContext::perturb`](super::TrainContext::perturb): the node's process ends, as
/// `kill -9` would end it (no destructor, no flush), as soon as its next step's gradient
/// all-reduce or DiLoCo outer all-reduce has completed here, before it records the commit:
/// the others may commit with its contribution (tests of the samples log's lines written
/// ahead).
pub const PERTURB_DIE_AFTER_COLLECTIVE: u8 = 4;

impl Trainer {
    /// Takes the pending fault when it is `code` (clearing it); false otherwise.
    fn take_fault(&self, code: u8) -> bool {
        self.ctx
            .perturb
            .compare_exchange(code, 0, SeqCst, SeqCst)
            .is_ok()
    }

    /// Debug: nudges the weights once when `POST /v1/debug/perturb` asked for it.
    pub(super) fn maybe_perturb(&self, step: u64) {
        if self.take_fault(PERTURB_WEIGHTS) {
            tracing::warn!(step, "debug: perturbing this member's weights");
            let _guard = tch::no_grad_guard();
            if let Some((_, p)) = self.params.first() {
                let _ = p.shallow_clone().g_add_scalar_(1e-3);
            }
        }
    }

    /// Debug: whether this member's next gradient is to be NaN (once, when asked for; tests
    /// of the gradient guard).
    pub(super) fn take_nan_fault(&self) -> bool {
        let nan = self.take_fault(PERTURB_NAN_GRADIENT);
        if nan {
            tracing::warn!(step = self.step, "debug: this member's gradient is NaN");
        }
        nan
    }

    /// Debug: whether this member abandons the collective it is about to run (once, when
    /// asked for).
    pub(super) fn abandon_collective(&self) -> bool {
        let abandon = self.take_fault(PERTURB_ABANDON_COLLECTIVE);
        if abandon {
            tracing::warn!(step = self.step, "debug: abandoning this collective");
        }
        abandon
    }

    /// Debug: ends the process at once when asked to die after this collective (once).
    pub(super) fn maybe_die_after_collective(&self) {
        if self.take_fault(PERTURB_DIE_AFTER_COLLECTIVE) {
            tracing::warn!(step = self.step, "debug: dying after this collective");
            // SAFETY: `_exit` ends the process without running anything of it, which is
            // the point: nothing of this member's after the collective may reach a file.
            unsafe { libc::_exit(137) }
        }
    }
}
