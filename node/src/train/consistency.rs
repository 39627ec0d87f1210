//! The periodic weights comparison: every `consistency_every` steps (and after the last)
//! each member hashes its parameters and the members all-gather the hashes; members that
//! hold different weights fail the job with an error naming who holds which hash.

use super::collective::{f32_as_words, tag, words_as_f32, TAG_HASH};
use super::member::Trainer;
use super::TrainError;
use coordinator_free::View;

impl Trainer {
    /// A digest of this member's parameters (SHA-256 of the f32 master weights' bytes,
    /// first 8 bytes, hex).
    fn weights_hash(&self) -> u64 {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for (name, t) in self.opt.named_params(&self.params) {
            let n = t.numel();
            let mut v = vec![0f32; n];
            t.contiguous().view([-1]).copy_data(&mut v, n);
            h.update(name.as_bytes());
            for x in v {
                h.update(x.to_le_bytes());
            }
        }
        u64::from_le_bytes(h.finalize()[..8].try_into().expect("8 bytes"))
    }

    /// Compares every member's weights hash on `view`; a mismatch fails the job naming
    /// the members. A view change during the comparison skips it.
    pub(super) fn check_consistency(&mut self, view: &View) -> Result<(), TrainError> {
        let mine = self.weights_hash();
        self.set_report(|r| r.weights_hash = Some(format!("{mine:016x}")));
        if view.len() == 1 {
            return Ok(());
        }
        let input = words_as_f32(&[mine]);
        let mut out = vec![0f32; 2 * view.len()];
        let dp = self.ctx.dp.clone();
        let t = tag(self.tag_base, view, TAG_HASH, self.step, 0);
        match self.collective(view, dp.all_gather(view, t, &input, &mut out)) {
            Ok(()) => {
                let hashes = f32_as_words(&out);
                if hashes.iter().any(|&h| h != mine) {
                    let detail = view
                        .ids()
                        .zip(&hashes)
                        .map(|(id, h)| format!("{id}={h:016x}"))
                        .collect::<Vec<_>>()
                        .join(", ");
                    return Err(TrainError::Inconsistent {
                        step: self.step,
                        detail,
                    });
                }
                Ok(())
            }
            Err(e) => {
                tracing::info!(step = self.step, "weights comparison skipped: {e}");
                Ok(())
            }
        }
    }
}
