//! Where training is in the data ([`DataCursor`]), the batch each step consumes
//! ([`StepBatch`]), and how a member cuts its share of one into micro-batches.

use super::ShardingError;
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// Position in the data: which epoch, and how many samples of that epoch's order are
/// consumed. A valid cursor has `offset < n_samples` ([`advance`] wraps to the next epoch
/// instead of reaching `n_samples`). Default: epoch 0, offset 0 (the start of training).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct DataCursor {
    /// Data epoch: how many full passes over the samples came before this one.
    pub epoch: u64,
    /// Positions of this epoch's order already consumed.
    pub offset: u64,
}

/// The samples one step consumes: positions `[cursor.offset, cursor.offset + len)` of the
/// order of `cursor.epoch`. Built by [`next_batch`]; never crosses an epoch boundary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StepBatch {
    /// Where the batch starts.
    pub cursor: DataCursor,
    /// Number of positions (samples) in the batch.
    pub len: u64,
}

impl StepBatch {
    /// The positions the batch covers, `cursor.offset..cursor.offset + len` (saturating at
    /// `u64::MAX`; [`assign`](fn@super::assign) rejects a batch whose end overflows).
    pub fn positions(&self) -> Range<u64> {
        self.cursor.offset..self.cursor.offset.saturating_add(self.len)
    }
}

/// The batch the next step consumes from `cursor`: `len = min(batch_size, n_samples -
/// cursor.offset)`, so the last batch of an epoch may be shorter and no batch crosses an
/// epoch.
///
/// Errors, checked in this order: [`ShardingError::ZeroBatchSize`],
/// [`ShardingError::ZeroSamples`], [`ShardingError::OffsetOutOfRange`].
pub fn next_batch(
    cursor: DataCursor,
    batch_size: u64,
    n_samples: u64,
) -> Result<StepBatch, ShardingError> {
    if batch_size == 0 {
        return Err(ShardingError::ZeroBatchSize);
    }
    if n_samples == 0 {
        return Err(ShardingError::ZeroSamples);
    }
    if cursor.offset >= n_samples {
        return Err(ShardingError::OffsetOutOfRange {
            offset: cursor.offset,
            n_samples,
        });
    }
    Ok(StepBatch {
        cursor,
        len: batch_size.min(n_samples - cursor.offset),
    })
}

/// The cursor after committing `batch`: `offset + len` in the same epoch, or epoch + 1 at
/// offset 0 once `offset + len` reaches `n_samples` (or passes it, should `n_samples` have
/// shrunk since the batch was made).
pub fn advance(batch: &StepBatch, n_samples: u64) -> DataCursor {
    let end = batch.cursor.offset.saturating_add(batch.len);
    if end >= n_samples {
        DataCursor {
            epoch: batch.cursor.epoch.saturating_add(1),
            offset: 0,
        }
    } else {
        DataCursor {
            epoch: batch.cursor.epoch,
            offset: end,
        }
    }
}

/// Number of steps in one epoch started at offset 0: `ceil(n_samples / batch_size)`; 0 when
/// `n_samples` or `batch_size` is 0 (no valid batch exists).
pub fn steps_per_epoch(n_samples: u64, batch_size: u64) -> u64 {
    if batch_size == 0 {
        0
    } else {
        n_samples.div_ceil(batch_size)
    }
}

/// A member's share of a step (`len` samples) cut into micro-batches of at most `max`
/// samples each, computed one after another with their gradients summed (gradient
/// accumulation): the fewest passes that respect `max`, as equal as they can be (sizes
/// differ by at most one, the larger first), so no pass is a small remainder that
/// libtorch's kernels run less efficiently. `max` of 0 means no limit (one pass). Empty
/// when `len` is 0.
pub fn micro_batches(len: usize, max: usize) -> Vec<Range<usize>> {
    if len == 0 {
        return Vec::new();
    }
    let passes = if max == 0 { 1 } else { len.div_ceil(max) };
    let (base, extra) = (len / passes, len % passes);
    let mut start = 0;
    (0..passes)
        .map(|i| {
            let size = base + usize::from(i < extra);
            let r = start..start + size;
            start += size;
            r
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn micro_batches_cover_the_share_in_the_fewest_even_passes() {
        assert_eq!(micro_batches(0, 4), Vec::<Range<usize>>::new());
        assert_eq!(micro_batches(7, 0), vec![0..7]);
        assert_eq!(micro_batches(8, 4), vec![0..4, 4..8]);
        assert_eq!(micro_batches(5, 4), vec![0..3, 3..5]);
        assert_eq!(micro_batches(3, 8), vec![0..3]);
        for len in 0..60 {
            for max in 0..12 {
                let parts = micro_batches(len, max);
                // Contiguous, in order, covering 0..len exactly.
                let mut next = 0;
                for r in &parts {
                    assert_eq!(r.start, next, "{len} {max}: {parts:?}");
                    assert!(!r.is_empty() && (max == 0 || r.len() <= max));
                    next = r.end;
                }
                assert_eq!(next, len);
                // The fewest passes, differing by at most one sample.
                let want = if len == 0 {
                    0
                } else if max == 0 {
                    1
                } else {
                    len.div_ceil(max)
                };
                assert_eq!(parts.len(), want, "{len} {max}");
                let sizes: Vec<usize> = parts.iter().map(|r| r.len()).collect();
                let (lo, hi) = (sizes.iter().min(), sizes.iter().max());
                assert!(hi.zip(lo).is_none_or(|(h, l)| h - l <= 1), "{sizes:?}");
            }
        }
    }

    #[test]
    fn batches_walk_an_epoch_and_wrap() {
        let n = 10;
        let mut c = DataCursor::default();
        assert_eq!(
            c,
            DataCursor {
                epoch: 0,
                offset: 0
            }
        );
        let mut lens = Vec::new();
        for _ in 0..steps_per_epoch(n, 4) {
            let b = next_batch(c, 4, n).unwrap();
            assert_eq!(b.cursor, c);
            lens.push(b.len);
            c = advance(&b, n);
        }
        assert_eq!(lens, vec![4, 4, 2]);
        assert_eq!(
            c,
            DataCursor {
                epoch: 1,
                offset: 0
            }
        );
        // Exact fit wraps too.
        let b = next_batch(
            DataCursor {
                epoch: 1,
                offset: 6,
            },
            4,
            n,
        )
        .unwrap();
        assert_eq!(b.len, 4);
        assert_eq!(
            advance(&b, n),
            DataCursor {
                epoch: 2,
                offset: 0
            }
        );
        // A batch larger than the data set is the whole epoch.
        let b = next_batch(DataCursor::default(), 100, n).unwrap();
        assert_eq!(b.len, 10);
        // If the data set shrank, advance still wraps.
        assert_eq!(
            advance(&b, 5),
            DataCursor {
                epoch: 1,
                offset: 0
            }
        );
    }

    #[test]
    fn steps_per_epoch_is_ceil() {
        assert_eq!(steps_per_epoch(10, 4), 3);
        assert_eq!(steps_per_epoch(12, 4), 3);
        assert_eq!(steps_per_epoch(1, 4), 1);
        assert_eq!(steps_per_epoch(0, 4), 0);
        assert_eq!(steps_per_epoch(10, 0), 0);
        assert_eq!(steps_per_epoch(u64::MAX, 1), u64::MAX);
    }

    #[test]
    fn next_batch_rejects_bad_input() {
        let c = DataCursor::default();
        assert_eq!(next_batch(c, 0, 10), Err(ShardingError::ZeroBatchSize));
        assert_eq!(next_batch(c, 4, 0), Err(ShardingError::ZeroSamples));
        let late = DataCursor {
            epoch: 0,
            offset: 10,
        };
        assert_eq!(
            next_batch(late, 4, 10),
            Err(ShardingError::OffsetOutOfRange {
                offset: 10,
                n_samples: 10
            })
        );
        assert!(next_batch(
            DataCursor {
                epoch: 0,
                offset: 9
            },
            4,
            10
        )
        .is_ok());
    }

    #[test]
    fn cursor_round_trips_through_bincode() {
        let c = DataCursor {
            epoch: 3,
            offset: 12345,
        };
        let cfg = bincode::config::standard();
        let bytes = bincode::serde::encode_to_vec(c, cfg).unwrap();
        let (back, _): (DataCursor, usize) =
            bincode::serde::decode_from_slice(&bytes, cfg).unwrap();
        assert_eq!(back, c);
    }
}
