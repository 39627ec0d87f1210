//! A round's buffer cut into buckets that go to the ring as soon as every part of them is
//! in: the gradient's buckets while the backward still runs (the last layers' first), the
//! tail (loss, counts, the guard's norms and speeds) last, always summed exactly.
//!
//! The buffer is `[gradient (grad_end values) | tail]`. The gradient is cut into buckets of
//! `bucket` values, the tail is a bucket of its own; every member cuts the same way, so a
//! bucket's index names the same values everywhere (it is part of the collective's tag).
//! The producer writes the parts it declared ([`Buckets::new`]'s `parts`: a parameter's
//! range, say) with [`Buckets::write`] and says each is in with [`Buckets::complete`]; a
//! bucket leaves when all parts overlapping it are in. On its way out it is prepared:
//! its squares are added to [`Buckets::squares`] (the guard's norm), it is copied to the
//! round's kept contribution (for a redo without a rejected member), and the committed
//! compression residual is added to it (error feedback; see
//! `DataPlane::all_reduce_with_feedback`). [`RingRound`] is the other end: it starts each
//! bucket's all-reduce as the bucket arrives, several at once.

use super::collective::{tag, TAG_GRAD};
use crate::data_plane::{DataPlane, DataPlaneError};
use coordinator_free::{Compression, ReduceOp, View};
use std::ops::Range;
use tch::Tensor;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

/// Buckets a round all-reduces at once: 4. More gain nothing on a fast link (4 already keep
/// both directions of the ring busy) and on a slow one split it so many ways that each
/// collective's segments outlast their timeout (150 buckets of a 150 M-parameter gradient
/// at once on 100 Mbit/s did).
pub const BUCKETS_IN_FLIGHT: usize = 4;

/// The reducing end of a round: sums each bucket over the view as it arrives, at most
/// [`BUCKETS_IN_FLIGHT`] at once (the others wait in the channel, in order).
pub(super) struct RingRound {
    /// The data plane.
    pub dp: DataPlane,
    /// The round's view.
    pub view: View,
    /// The run's part of the tags.
    pub base: u64,
    /// The step (part of the tags).
    pub step: u64,
    /// The guard's round (part of the tags, so rounds stay apart).
    pub attempt: u64,
    /// How the gradient's buckets travel (the tail always exactly).
    pub compression: Compression,
}

impl RingRound {
    /// All-reduces every bucket `rx` delivers, up to [`BUCKETS_IN_FLIGHT`] at a time,
    /// until the sender is gone and every started one is done; the first error ends the
    /// round.
    pub async fn run(self, mut rx: UnboundedReceiver<Bucket<'_>>) -> Result<(), DataPlaneError> {
        let mut running = futures::stream::FuturesUnordered::new();
        let mut open = true;
        while open || !running.is_empty() {
            tokio::select! {
                next = rx.recv(), if open && running.len() < BUCKETS_IN_FLIGHT => match next {
                    Some(b) => {
                        let index = (self.attempt << 32) | b.index as u64;
                        let t = tag(self.base, &self.view, TAG_GRAD, self.step, index);
                        let c = if b.exact { Compression::None } else { self.compression };
                        running.push(self.dp.all_reduce_with_feedback(
                            &self.view, t, b.values, ReduceOp::Sum, c, b.residual,
                        ));
                    }
                    None => open = false,
                },
                Some(done) = futures::StreamExt::next(&mut running) => done?,
            }
        }
        Ok(())
    }
}

/// One bucket on its way to the ring.
pub(super) struct Bucket<'a> {
    /// Its index in the round (the same on every member).
    pub index: usize,
    /// Its values.
    pub values: &'a mut [f32],
    /// Where the ring writes this member's share of its compression error (error
    /// feedback); `None` for the tail, or without feedback.
    pub residual: Option<&'a mut [f32]>,
    /// The tail: summed exactly whatever the compression.
    pub exact: bool,
}

/// What a bucket's preparation adds to it and keeps of it.
pub(super) struct Prepare<'a> {
    /// The contribution as it left (gradient and the tail's first values, up to this
    /// slice's length), for a redo; `None`: not kept.
    pub keep: Option<&'a mut [f32]>,
    /// The residual the last committed step left, added to the gradient's buckets as they
    /// leave; `None`: no error feedback.
    pub committed: Option<&'a [f32]>,
    /// Where the ring writes the new residual (as long as the gradient); `None` without
    /// feedback.
    pub pending: Option<&'a mut [f32]>,
    /// Debug: the gradient's first value is replaced by NaN as it leaves.
    pub nan: bool,
}

/// The buckets of one round (see the module's documentation).
pub(super) struct Buckets<'a> {
    /// Bucket `i` until it leaves.
    slots: Vec<Option<Bucket<'a>>>,
    /// Where each bucket starts in the buffer (and, last, the buffer's length).
    starts: Vec<usize>,
    /// Per bucket: its parts not yet complete.
    missing: Vec<usize>,
    grad_end: usize,
    /// The residual (committed) and the keep buffer, indexed like the buffer.
    committed: Option<&'a [f32]>,
    keep: Option<&'a mut [f32]>,
    nan: bool,
    tx: UnboundedSender<Bucket<'a>>,
    /// Σ x² over the gradient's buckets that left (before feedback was added).
    pub squares: f64,
}

impl<'a> Buckets<'a> {
    /// Cuts `flat` (`grad_end` gradient values, then the tail) into buckets of `bucket`
    /// values (at least 1) plus the tail, each leaving through `tx` once every part of
    /// `parts` (ranges within the gradient that the producer completes one by one)
    /// overlapping it is complete; the tail is one more part of its own. Gradient values
    /// no part covers are zeros the producer never writes.
    pub fn new(
        flat: &'a mut [f32],
        grad_end: usize,
        bucket: usize,
        parts: &[Range<usize>],
        prepare: Prepare<'a>,
        tx: UnboundedSender<Bucket<'a>>,
    ) -> Buckets<'a> {
        let bucket = bucket.max(1);
        let len = flat.len();
        let (grad, tail) = flat.split_at_mut(grad_end);
        let mut pending = prepare.pending;
        let mut slots = Vec::new();
        let mut starts = Vec::new();
        let mut rest_residual = pending.take();
        for (i, values) in grad.chunks_mut(bucket).enumerate() {
            let residual = rest_residual.take().map(|r| {
                let (head, rest) = r.split_at_mut(values.len().min(r.len()));
                rest_residual = Some(rest);
                head
            });
            starts.push(i * bucket);
            slots.push(Some(Bucket {
                index: i,
                values,
                residual,
                exact: false,
            }));
        }
        starts.push(grad_end);
        slots.push(Some(Bucket {
            index: slots.len(),
            values: tail,
            residual: None,
            exact: true,
        }));
        starts.push(len);
        let mut missing = vec![0; slots.len()];
        for p in parts.iter().filter(|p| !p.is_empty()) {
            for b in Self::overlapping(&starts, p.clone()) {
                missing[b] += 1;
            }
        }
        *missing.last_mut().expect("the tail") = 1;
        let mut me = Buckets {
            slots,
            starts,
            missing,
            grad_end,
            committed: prepare.committed,
            keep: prepare.keep,
            nan: prepare.nan,
            tx,
            squares: 0.0,
        };
        // Buckets no part covers are complete already.
        for b in 0..me.missing.len() - 1 {
            if me.missing[b] == 0 {
                me.send(b);
            }
        }
        me
    }

    /// The buckets that `r` overlaps (by the `starts` of the buckets).
    fn overlapping(starts: &[usize], r: Range<usize>) -> Range<usize> {
        let first = starts.partition_point(|&s| s <= r.start) - 1;
        let last = starts.partition_point(|&s| s < r.end) - 1;
        first..last + 1
    }

    /// Copies `src` (f32, contiguous, on any device) to the buffer at `at` (within the
    /// gradient, in buckets that have not left).
    pub fn write(&mut self, at: usize, src: &Tensor) {
        let n = src.numel();
        for b in Self::overlapping(&self.starts, at..at + n) {
            let start = self.starts[b];
            let Some(slot) = self.slots[b].as_mut() else {
                debug_assert!(false, "bucket {b} left before it was written");
                continue;
            };
            let lo = at.max(start);
            let hi = (at + n).min(start + slot.values.len());
            src.narrow(0, (lo - at) as i64, (hi - lo) as i64)
                .copy_data(&mut slot.values[lo - start..hi - start], hi - lo);
        }
    }

    /// Says the part `r` (as declared) is in: the buckets it completes leave.
    pub fn complete(&mut self, r: Range<usize>) {
        if r.is_empty() {
            return;
        }
        for b in Self::overlapping(&self.starts, r) {
            self.missing[b] -= 1;
            if self.missing[b] == 0 {
                self.send(b);
            }
        }
    }

    /// The tail's values (loss, counts, the guard's slots), to fill before
    /// [`Buckets::finish`].
    pub fn tail(&mut self) -> &mut [f32] {
        let slot = self.slots.last_mut().expect("the tail");
        slot.as_mut().map_or(&mut [][..], |b| &mut *b.values)
    }

    /// Sends whatever has not left (the producer is done; its parts are in) and the tail
    /// last.
    pub fn finish(mut self) {
        for b in 0..self.slots.len() {
            if self.slots[b].is_some() {
                self.send(b);
            }
        }
    }

    /// Prepares bucket `b` (see the module's documentation) and hands it to the ring. A
    /// ring that stopped (failed, or the view changed) no longer takes buckets: the
    /// round's error is the ring's.
    fn send(&mut self, b: usize) {
        let Some(bucket) = self.slots[b].take() else {
            return;
        };
        let start = self.starts[b];
        let len = bucket.values.len();
        if let Some(keep) = self.keep.as_deref_mut() {
            let hi = (start + len).min(keep.len());
            if hi > start {
                keep[start..hi].copy_from_slice(&bucket.values[..hi - start]);
            }
        }
        if !bucket.exact {
            if self.nan && start == 0 && len > 0 {
                bucket.values[0] = f32::NAN;
            }
            self.squares += super::optim::sum_squares(bucket.values);
            if let Some(c) = self.committed {
                let c = &c[start..(start + len).min(self.grad_end)];
                bucket.values.iter_mut().zip(c).for_each(|(x, r)| *x += r);
            }
        }
        let _ = self.tx.send(bucket);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(rx: &mut tokio::sync::mpsc::UnboundedReceiver<Bucket<'_>>) -> Vec<(usize, Vec<f32>)> {
        let mut out = Vec::new();
        while let Ok(b) = rx.try_recv() {
            out.push((b.index, b.values.to_vec()));
        }
        out
    }

    /// Buckets leave exactly when their last overlapping part is complete, prepared
    /// (kept, squared, residual added, NaN injected), the tail last and exact.
    #[test]
    fn buckets_leave_when_their_parts_are_in() {
        // Gradient of 10 values in buckets of 4 (0..4, 4..8, 8..10), a tail of 3.
        let mut flat = vec![0f32; 13];
        let mut keep = vec![0f32; 11];
        let committed: Vec<f32> = (0..10).map(|i| i as f32 * 0.5).collect();
        let mut pending = vec![9f32; 10];
        let parts = [0..3, 3..6, 6..10];
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut b = Buckets::new(
            &mut flat,
            10,
            4,
            &parts,
            Prepare {
                keep: Some(&mut keep),
                committed: Some(&committed),
                pending: Some(&mut pending),
                nan: false,
            },
            tx,
        );
        assert!(drain(&mut rx).is_empty(), "nothing is in yet");
        b.write(6, &Tensor::from_slice(&[6f32, 7., 8., 9.]));
        b.complete(6..10);
        // 8..10 is complete; 4..8 still waits for 3..6.
        assert_eq!(drain(&mut rx), vec![(2, vec![8. + 4., 9. + 4.5])]);
        b.write(3, &Tensor::from_slice(&[3f32, 4., 5.]));
        b.complete(3..6);
        assert_eq!(
            drain(&mut rx),
            vec![(1, vec![4. + 2., 5. + 2.5, 6. + 3., 7. + 3.5])]
        );
        b.write(0, &Tensor::from_slice(&[0f32, 1., 2.]));
        b.complete(0..3);
        assert_eq!(
            drain(&mut rx),
            vec![(0, vec![0., 1. + 0.5, 2. + 1., 3. + 1.5])]
        );
        b.tail().copy_from_slice(&[20., 1., 2.]);
        let squares = b.squares;
        b.finish();
        assert_eq!(drain(&mut rx), vec![(3, vec![20., 1., 2.])]);
        assert_eq!(squares, (0..10).map(|i| (i * i) as f64).sum::<f64>());
        drop(rx);
        let want: Vec<f32> = (0..10).map(|i| i as f32).chain([20.]).collect();
        assert_eq!(keep, want, "kept as it left, before the residual");
    }

    /// Values no part covers leave at once; residual slices follow their buckets; the
    /// injected NaN lands on the first value.
    #[test]
    fn uncovered_buckets_leave_at_once_with_their_residual() {
        let mut flat = vec![1f32; 7];
        let mut pending = vec![0f32; 6];
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let b = Buckets::new(
            &mut flat,
            6,
            4,
            std::slice::from_ref(&(4..6)),
            Prepare {
                keep: None,
                committed: None,
                pending: Some(&mut pending),
                nan: true,
            },
            tx,
        );
        let first = rx.try_recv().expect("bucket 0 has no part");
        assert_eq!(first.index, 0);
        assert!(first.values[0].is_nan());
        assert_eq!(first.residual.as_ref().map(|r| r.len()), Some(4));
        assert!(rx.try_recv().is_err());
        b.finish();
        let rest: Vec<(usize, bool, Option<usize>)> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|b| (b.index, b.exact, b.residual.map(|r| r.len())))
            .collect();
        assert_eq!(rest, vec![(1, false, Some(2)), (2, true, None)]);
    }
}
