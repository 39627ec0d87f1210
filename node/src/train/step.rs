//! One training step on a member: the gradient of the sum of losses over its samples of
//! the global batch, the bucketed all-reduce that sums every member's (with the gradient
//! guard riding on it and the redo without rejected members), and the optimizer update that
//! commits the step.

use super::buckets::{Buckets, Prepare, RingRound};
use super::collective::{StepError, StepFailure};
use super::member::Trainer;
use super::model::Stage;
use super::optim;
use super::phases::Phase;
use super::report::StepRecord;
use super::TrainError;
use crate::data_plane::{DataPlaneError, DataPlaneStats};
use coordinator_free::collective::Backend;
use coordinator_free::sharding::{self, StepBatch};
use coordinator_free::training::{redistribute, screen_gradients, Coverage};
use coordinator_free::{Compression, NodeId, View};
use std::ops::Range;
use std::time::{Duration, Instant};
use tch::Tensor;

/// A committed step: its record, the sample ids this member used, and every member's
/// measured speed (samples/s).
pub(super) type StepDone = (StepRecord, Vec<u64>, Vec<(NodeId, f64)>);

/// Where a round's gradient comes from.
pub(super) enum Source<'s> {
    /// Already in the buffer (the host's gradient, a redo's, DiLoCo's pseudo-gradient).
    Ready,
    /// One flat f32 tensor on a device (or in bf16), copied over bucket by bucket: each
    /// bucket's all-reduce starts as soon as its copy is done.
    Device(&'s Tensor),
    /// To compute: the staged backward of these samples (`Model::backward_staged`), each
    /// bucket leaving once the stages covering it are done; it writes the loss, the
    /// samples and the correct count at the tail's start.
    Backward(&'s [u64]),
}

/// One round of a step's all-reduce.
pub(super) struct ReduceRound<'r> {
    /// The guard's round (0 first), part of the collective's tags.
    pub attempt: u64,
    /// Where the gradient ends and the tail (summed exactly) starts.
    pub grad_end: usize,
    /// Where the gradient comes from.
    pub source: Source<'r>,
    /// Where the contribution is kept as it leaves (for a redo); `None`: not kept.
    pub keep: Option<&'r mut [f32]>,
    /// Debug: this member's gradient is NaN (tests of the guard).
    pub nan: bool,
    /// Error feedback under compression (synchronous gradients; DiLoCo's pseudo-gradients
    /// go without).
    pub feedback: bool,
}

/// The sample ids at `ranges` (positions) of a data epoch's `order`.
pub(super) fn ids_at(order: &[u64], ranges: &[Range<u64>]) -> Vec<u64> {
    ranges
        .iter()
        .flat_map(|r| r.clone().map(|p| order[p as usize]))
        .collect()
}

/// After the guard left out `rejected`: splits their positions over the others
/// (`redistribute`, by the step's `weights`), records the new split in `covered` (every
/// member's positions so far) and returns the positions `me` takes over.
fn take_over(
    weights: &[(NodeId, u32)],
    covered: &mut Coverage,
    rejected: &[NodeId],
    me: &NodeId,
) -> Result<Vec<Range<u64>>, StepError> {
    let extra = redistribute(weights, covered, rejected).map_err(|e| StepError::Fatal(e.into()))?;
    for (id, rs) in covered.iter_mut() {
        if rejected.contains(id) {
            rs.clear();
        } else if let Some((_, more)) = extra.iter().find(|(m, _)| m == id) {
            rs.extend(more.iter().cloned());
        }
    }
    Ok(extra
        .into_iter()
        .find(|(m, _)| m == me)
        .map(|(_, rs)| rs)
        .unwrap_or_default())
}

impl Trainer {
    /// The epoch order for `epoch` (cached).
    pub(super) fn order(&mut self, epoch: u64) -> &[u64] {
        if self.order.as_ref().map(|o| o.0) != Some(epoch) {
            let o = sharding::epoch_order(self.job().seed, epoch, self.data.train_len());
            self.order = Some((epoch, o));
        }
        &self.order.as_ref().expect("just set").1
    }

    /// One step on `view`: local gradients over this member's `ranges` of `batch`, the
    /// all-reduce, the guard, the update. Returns the record, the sample ids this member
    /// used, and every member's measured speed (samples/s of gradient computation; 0 for a
    /// member without samples), as the all-reduce delivered them to every member.
    ///
    /// A Hugging Face decoder in f32 on the CPU runs its backward in stages, and each
    /// gradient bucket goes to the ring as soon as the stages covering it are done
    /// (`ReduceRound`, `buckets`): the all-reduce overlaps the backward, as DDP's does.
    ///
    /// The gradient guard rides on the all-reduce: besides its gradient (and loss, samples,
    /// correct), each member contributes its gradient norm and speed in slots of its own,
    /// zero elsewhere, so the sum hands every member every member's norm and speed (an
    /// all-gather without a round of its own). Members whose gradient is NaN/Inf or whose
    /// mean gradient's norm is far above the others' median
    /// (`coordinator_free::training::screen_gradients`) are then left out: the sum is
    /// discarded, the left-out members' samples are split over the others (`redistribute`,
    /// by the step's weights), who compute only those, add them to their own kept
    /// contribution and all-reduce once more (a member left out contributes zeros). The norm
    /// check runs on the first round only: in a redo a member's norm includes the samples it
    /// took over, and a large one there means the samples, not a member, carry the large
    /// gradient (checking again would leave out honest members one after another); NaN/Inf
    /// is refused in every round. A view of one member has nothing to compare and skips the
    /// guard.
    pub(super) fn train_step(
        &mut self,
        view: &View,
        batch: &StepBatch,
        ranges: &[Range<u64>],
        weights: &[(NodeId, u32)],
        coverage: &Coverage,
    ) -> Result<StepDone, StepError> {
        let t0 = Instant::now();
        self.phases.start(t0);
        let stats0 = self.ctx.dp.stats();
        let mut ids = ids_at(self.order(batch.cursor.epoch), ranges);
        self.phases.mark(Phase::Data);
        let n = view.len();
        let me = self.ctx.me.clone();
        // The machine steps only in views holding this member.
        let rank = view
            .position(&me)
            .ok_or(StepError::Failed(StepFailure::ViewChanged))?;
        let nccl = self.backend(view) == Backend::Nccl;
        let staged =
            !nccl && self.model.stages_backward() && self.model.device() == tch::Device::Cpu;
        let numel: usize = self.stage_parts.last().map_or(0, |(_, r)| r.end);
        let tc = Instant::now();
        // Each round appends 2 n floats (norms, speeds) to the gradient and its tail: every
        // vector that becomes `flat` has that room, so that the resize below never moves
        // (and copies) the whole gradient. With every block on the heap (`crate::allocator`),
        // glibc copies a moved block under its one lock, and the node's event loop waited
        // behind 600 MB of copy until members suspected each other.
        let room = 2 * n;
        // The first round's gradient: computed during the round (staged), or before it (on
        // a device, it stays there until the round copies it bucket by bucket).
        let (mut flat, mut on_device, mut compute) = if staged {
            (zeros_with_room(numel + 3, room), None, None)
        } else {
            let (flat, on_device) = self.local_gradients(&ids, room).map_err(StepError::Fatal)?;
            self.phases.mark(Phase::Compute);
            (flat, on_device, Some(tc.elapsed()))
        };
        let mut nan = self.take_nan_fault();
        let (norms_at, speeds_at) = (3, 3 + n);
        let mut rejected: Vec<NodeId> = Vec::new();
        let mut first_round = Duration::ZERO;
        // This member's own contribution of the round (gradient, loss, samples, correct over
        // `ids`), kept across the all-reduce: if the guard leaves someone out, it stands and
        // only the rejected members' samples are computed on top of it.
        let mut mine: Vec<f32> = Vec::new();
        // Every member's positions so far (the step's coverage, from the first rejection on).
        let mut covered: Option<Coverage> = None;
        for attempt in 0..n as u64 {
            let ta = Instant::now();
            if n >= 2 {
                mine.resize(numel + 3, 0.0);
            }
            flat.resize(numel + 3 + 2 * n, 0.0);
            // A view of one member has no guard: no norm to compute. The norm is that of
            // the member's mean gradient (its sum over its samples, divided by their count):
            // shares differ, and a sum's norm grows with the samples in it, so comparing
            // sums would single out whoever got the larger share.
            let guarded = n >= 2 && !rejected.contains(&me);
            let samples = ids.len();
            let fill_tail = |tail: &mut [f32], squares: f64, compute: Duration| {
                let norm = if guarded {
                    squares.sqrt() / samples.max(1) as f64
                } else {
                    0.0
                };
                let speed = samples as f64 / compute.as_secs_f64().max(1e-9);
                tail[norms_at + rank] = norm as f32;
                tail[speeds_at + rank] = if samples == 0 { 0.0 } else { speed as f32 };
            };
            // Written ahead: should this member die once its contribution has left, the
            // step may still commit on the others, with these samples in it.
            if let Some(f) = self.samples.as_mut() {
                let (n, epoch) = (self.step + 1, batch.cursor.epoch);
                f.append(n, epoch, &ids, view, false)
                    .map_err(|e| StepError::Fatal(e.into()))?;
            }
            if nccl {
                let keep = (n >= 2).then_some(&mut mine[..]);
                let fill = |tail: &mut [f32], sq| fill_tail(tail, sq, compute.unwrap_or_default());
                self.nccl_round(view, &mut flat, numel, on_device.as_ref(), nan, keep, fill)?;
            } else {
                let source = match (&on_device, attempt) {
                    (_, 1..) => Source::Ready,
                    (Some(g), 0) => Source::Device(g),
                    (None, 0) if staged => Source::Backward(&ids),
                    (None, 0) => Source::Ready,
                };
                let round = ReduceRound {
                    attempt,
                    grad_end: numel,
                    source,
                    keep: (n >= 2).then_some(&mut mine[..]),
                    nan,
                    feedback: true,
                };
                let took = self.all_reduce_round(view, round, &mut flat, &mut |tail, sq, c| {
                    fill_tail(tail, sq, compute.unwrap_or(c))
                })?;
                if staged && attempt == 0 {
                    compute = Some(took);
                }
                // The ring's copy of a device gradient is in `mine` now.
                on_device = None;
            }
            nan = false;
            if attempt == 0 {
                first_round = ta
                    .elapsed()
                    .saturating_sub(compute.filter(|_| staged).unwrap_or_default());
            }
            if n < 2
                || !self.screen(
                    view,
                    attempt,
                    &flat[numel + norms_at..numel + speeds_at],
                    &mut rejected,
                )?
            {
                break;
            }
            // A redo adds to this member's own contribution on the host: the part of it
            // still on the device comes over now (rare: only when the guard left someone out).
            if let Some(g) = on_device.take() {
                g.copy_data(&mut mine[..numel], numel);
            }
            let covered = covered.get_or_insert_with(|| coverage.clone());
            // The redo's contribution, written over `flat` in place (its room kept): `mine`
            // plus the gradient of the samples taken over, or zeros when left out.
            let more = self.taken_over(batch, weights, covered, &rejected, &mut ids)?;
            flat.clear();
            match more {
                Some(g) => flat.extend(mine.iter().zip(&g).map(|(a, b)| a + b)),
                None => flat.resize(mine.len(), 0.0),
            }
            self.phases.mark(Phase::Compute);
        }
        self.maybe_die_after_collective();
        let compute = compute.unwrap_or_default();
        let speeds: Vec<(NodeId, f64)> = view
            .ids()
            .cloned()
            .zip(flat[numel + speeds_at..].iter().map(|&x| f64::from(x)))
            .collect();
        flat.truncate(numel + 3);
        let redo = tc.elapsed().saturating_sub(compute + first_round);
        let mut rec = self
            .apply(flat, batch, view, t0, stats0)
            .map_err(StepError::Fatal)?;
        rec.compute_ms = compute.as_secs_f64() * 1e3;
        rec.guard_ms = redo.as_secs_f64() * 1e3;
        rec.allreduce_ms = first_round.as_secs_f64() * 1e3;
        rec.phases = self.phases.totals();
        tracing::debug!(
            step = rec.step,
            samples = ids.len(),
            compute_ms = rec.compute_ms,
            allreduce_ms = rec.allreduce_ms,
            guard_ms = rec.guard_ms,
            step_ms = rec.step_ms,
            "step"
        );
        Ok((rec, ids, speeds))
    }

    /// After the guard left out `rejected`: the gradient (and tail) of the samples this
    /// member takes over for the redo, which join `ids`; `None` when it was left out
    /// itself, and `ids` emptied.
    fn taken_over(
        &mut self,
        batch: &StepBatch,
        weights: &[(NodeId, u32)],
        covered: &mut Coverage,
        rejected: &[NodeId],
        ids: &mut Vec<u64>,
    ) -> Result<Option<Vec<f32>>, StepError> {
        let me = self.ctx.me.clone();
        let more = take_over(weights, covered, rejected, &me)?;
        if rejected.contains(&me) {
            ids.clear();
            return Ok(None);
        }
        let more = ids_at(self.order(batch.cursor.epoch), &more);
        let g = self
            .local_gradients_on_host(&more)
            .map_err(StepError::Fatal)?;
        ids.extend(more);
        Ok(Some(g))
    }

    /// A round in NCCL: the debug NaN (when `nan`), the contribution kept in `keep`, the
    /// tail filled by `fill(tail, squares)` (the gradient's sum of squares, on the device
    /// when it is there), then the all-reduce (all of it comm: NCCL has no data-plane wait).
    #[allow(clippy::too_many_arguments)]
    fn nccl_round(
        &mut self,
        view: &View,
        flat: &mut [f32],
        numel: usize,
        on_device: Option<&Tensor>,
        nan: bool,
        keep: Option<&mut [f32]>,
        fill: impl FnOnce(&mut [f32], f64),
    ) -> Result<(), StepError> {
        let squares = Self::prepare_nccl(flat, numel, on_device, nan);
        if let Some(keep) = keep {
            let k = keep.len();
            keep.copy_from_slice(&flat[..k]);
        }
        fill(&mut flat[numel..], squares);
        self.phases.mark(Phase::Compute);
        let reduced = self.nccl_all_reduce(view, flat, on_device);
        self.phases.all_reduce(Duration::ZERO);
        reduced.map_err(StepError::Failed)
    }

    /// Before an NCCL round: the debug NaN (when `nan`) and the gradient's sum of
    /// squares, on the device when the gradient is there (`on_device`), else in `flat`.
    fn prepare_nccl(flat: &mut [f32], numel: usize, on_device: Option<&Tensor>, nan: bool) -> f64 {
        match on_device {
            Some(g) => {
                if nan {
                    let _ = g.narrow(0, 0, 1).fill_(f64::NAN);
                }
                g.square().sum(tch::Kind::Double).double_value(&[])
            }
            None => {
                if nan && numel > 0 {
                    flat[0] = f32::NAN;
                }
                optim::sum_squares(&flat[..numel])
            }
        }
    }

    /// One round of an all-reduce over the ring: sums `flat` (`round.grad_end` gradient
    /// values, then a tail of loss, counts and guard slots) over `view`'s members, the
    /// gradient in buckets of `bucket_bytes` that run concurrently, compressed as the
    /// job's `[sync] compression` says, the tail exactly and last (see `buckets`).
    /// `fill_tail(tail, squares, compute)` writes this member's slots once its gradient is
    /// in (`squares`: the gradient's sum of squares; `compute`: the time the source took).
    /// Returns the time the source took (the staged backward's forward and backward;
    /// the copy from a device; nothing for a ready buffer).
    pub(super) fn all_reduce_round(
        &mut self,
        view: &View,
        round: ReduceRound<'_>,
        flat: &mut [f32],
        fill_tail: &mut dyn FnMut(&mut [f32], f64, Duration),
    ) -> Result<Duration, StepError> {
        if self.abandon_collective() {
            // As a broken link would: the node moves every member to the next epoch.
            let _ = self.ctx.view_failed.send(view.hash);
            return Err(StepError::Failed(StepFailure::Collective(
                DataPlaneError::Io {
                    peer: self.ctx.me.clone(),
                    source: std::io::Error::other("abandoned (debug)"),
                },
            )));
        }
        let compression = self.job().sync.compression;
        let feedback = round.feedback && compression != Compression::None && view.len() >= 2;
        let grad_end = round.grad_end;
        let (mut committed, mut pending) = (Vec::new(), Vec::new());
        if feedback {
            committed = std::mem::take(&mut self.residual);
            pending = std::mem::take(&mut self.residual_next);
            committed.resize(grad_end, 0.0);
            pending.resize(grad_end, 0.0);
        }
        let bucket = (self.job().bucket_bytes as usize / 4).max(1);
        let parts: Vec<Range<usize>> = match round.source {
            Source::Ready => Vec::new(),
            Source::Device(_) => (0..grad_end)
                .step_by(bucket)
                .map(|s| s..(s + bucket).min(grad_end))
                .collect(),
            Source::Backward(_) => self.stage_parts.iter().map(|(_, r)| r.clone()).collect(),
        };
        let ring = RingRound {
            dp: self.ctx.dp.clone(),
            view: view.clone(),
            base: self.tag_base,
            step: self.step,
            attempt: round.attempt,
            compression,
        };
        let (rt, mut views) = (self.ctx.rt.clone(), self.ctx.views.clone());
        let prepare = Prepare {
            keep: round.keep,
            committed: feedback.then_some(&committed[..]),
            pending: feedback.then_some(&mut pending[..]),
            nan: round.nan,
        };
        // The data plane's waiting counts from when this member's gradient is all in (a
        // staged backward's buckets may wait for peers while it runs: that is compute).
        let mut waited = self.ctx.dp.wait_time();
        let (took, result) = std::thread::scope(|s| {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let hash = ring.view.hash;
            let reducer = s.spawn(move || {
                rt.block_on(async {
                    tokio::select! {
                        r = ring.run(rx) => r.map_err(StepFailure::Collective),
                        _ = views.wait_for(|s| s.view.hash != hash) => Err(StepFailure::ViewChanged),
                    }
                })
            });
            let mut buckets = Buckets::new(flat, grad_end, bucket, &parts, prepare, tx);
            let t = Instant::now();
            let produced = self.produce(&round.source, &mut buckets);
            let took = t.elapsed();
            self.phases.mark(Phase::Compute);
            waited = self.ctx.dp.wait_time();
            let squares = buckets.squares;
            let result = produced.map(|()| {
                fill_tail(buckets.tail(), squares, took);
                buckets.finish();
            });
            let reduced = reducer.join().unwrap_or(Err(StepFailure::ViewChanged));
            (
                took,
                result
                    .map_err(StepError::Fatal)
                    .and_then(|()| reduced.map_err(StepError::Failed)),
            )
        });
        self.phases
            .all_reduce(self.ctx.dp.wait_time().saturating_sub(waited));
        if feedback {
            self.residual = committed;
            self.residual_next = pending;
        }
        if let Err(StepError::Failed(StepFailure::Collective(_))) = &result {
            // The node is gone only when it is shutting down; then nothing restarts anyway.
            let _ = self.ctx.view_failed.send(view.hash);
        }
        result.map(|()| took)
    }

    /// Puts the round's gradient into `buckets` from `source` (see [`Source`]).
    fn produce(
        &mut self,
        source: &Source<'_>,
        buckets: &mut Buckets<'_>,
    ) -> Result<(), TrainError> {
        match *source {
            Source::Ready => Ok(()),
            Source::Device(g) => {
                let n = g.numel();
                let bucket = self.job().bucket_bytes as usize / 4;
                for s in (0..n).step_by(bucket.max(1)) {
                    let len = bucket.max(1).min(n - s);
                    buckets.write(s, &g.narrow(0, s as i64, len as i64));
                    buckets.complete(s..s + len);
                }
                Ok(())
            }
            Source::Backward(ids) => {
                self.zero_grads();
                let parts = &self.stage_parts;
                let params = &self.params;
                let mut done = |stage: Stage| {
                    for ((st, r), (_, p)) in parts.iter().zip(params) {
                        if *st == stage {
                            let g = p.grad();
                            if g.defined() {
                                buckets.write(r.start, &g.reshape([-1]));
                            }
                            buckets.complete(r.clone());
                        }
                    }
                };
                if ids.is_empty() {
                    for stage in parts.iter().map(|(s, _)| *s).collect::<Vec<_>>() {
                        done(stage);
                    }
                }
                // Micro-batches accumulate into `.grad`; only the last one's stages are
                // complete gradients, so only its backward sends buckets.
                let micro = sharding::micro_batches(ids.len(), self.job().micro_batch as usize);
                let last = micro.len().saturating_sub(1);
                let (mut loss, mut correct) = (0.0, 0);
                self.model.set_train(true);
                for (i, r) in micro.into_iter().enumerate() {
                    let td = Instant::now();
                    let batch = self.data.train_batch(&ids[r])?;
                    self.phases.region(Phase::Data, td);
                    let (l, c) = if i == last {
                        self.model.backward_staged(&batch, &mut done)?
                    } else {
                        self.model.backward_staged(&batch, &mut |_| {})?
                    }
                    .ok_or_else(|| {
                        TrainError::Internal("the model cannot stage its backward".into())
                    })?;
                    loss += l;
                    correct += c;
                }
                let tail = buckets.tail();
                tail[0] = loss as f32;
                tail[1] = ids.len() as f32;
                tail[2] = correct as f32;
                Ok(())
            }
        }
    }

    /// The guard's verdict on a round: `norms` holds every member's norm (in `view`
    /// order; [`screen_gradients`] on members not yet `rejected`, with the job's
    /// `grad_guard` factor on the first round and NaN/Inf only after). Adds the members it
    /// leaves out to `rejected`, logs them, and returns whether there were any.
    fn screen(
        &mut self,
        view: &View,
        attempt: u64,
        norms: &[f32],
        rejected: &mut Vec<NodeId>,
    ) -> Result<bool, StepError> {
        let norms: Vec<(NodeId, f64)> = view
            .ids()
            .cloned()
            .zip(norms.iter().map(|&x| f64::from(x)))
            .filter(|(id, _)| !rejected.contains(id))
            .collect();
        let factor = if attempt == 0 {
            self.job().grad_guard
        } else {
            0.0
        };
        let bad = screen_gradients(&norms, factor);
        for (peer, why) in &bad {
            tracing::warn!(step = self.step, %peer, "rejected gradient from {peer}: {why}; the step is redone without it");
            self.set_report(|r| r.rejected_gradients += 1);
            if self.am_first(view) {
                let line = serde_json::json!({"event": "guard", "step": self.step,
                    "rejected": peer.as_str(), "reason": why.to_string()});
                self.event(view, line).map_err(StepError::Fatal)?;
            }
            rejected.push(peer.clone());
        }
        Ok(!bad.is_empty())
    }

    /// [`local_gradients`](Self::local_gradients) with the gradient in `flat` wherever
    /// the model is.
    fn local_gradients_on_host(&mut self, ids: &[u64]) -> Result<Vec<f32>, TrainError> {
        let (mut flat, on_device) = self.local_gradients(ids, 0)?;
        if let Some(g) = on_device {
            g.copy_data(&mut flat[..g.numel()], g.numel());
        }
        Ok(flat)
    }

    /// Gradients of the sum of losses over `ids`, flattened in parameter order, followed
    /// by `[loss_sum, samples, correct]`. On the CPU in f32 the gradient is in the returned
    /// vector; on another device (or in bf16) it is one flat f32 tensor there (returned
    /// beside a vector whose gradient part is zeros), for the all-reduce to copy bucket by
    /// bucket. The vector has capacity for `room` more floats.
    pub(super) fn local_gradients(
        &mut self,
        ids: &[u64],
        room: usize,
    ) -> Result<(Vec<f32>, Option<Tensor>), TrainError> {
        self.zero_grads();
        let numel: usize = self.params.iter().map(|(_, t)| t.numel()).sum();
        let mut flat = zeros_with_room(numel + 3, room);
        if ids.is_empty() {
            return Ok((flat, None));
        }
        self.model.set_train(true);
        let device = self.model.device();
        // Micro-batches (the job's `micro_batch`) accumulate into `.grad`.
        let (mut loss_sum, mut correct_sum) = (0.0, 0);
        for r in sharding::micro_batches(ids.len(), self.job().micro_batch as usize) {
            let td = Instant::now();
            let batch = self.data.train_batch(&ids[r])?.to_device(device);
            self.phases.region(Phase::Data, td);
            let (loss, correct) = self.model.loss_sum(&batch)?;
            loss.backward();
            loss_sum += loss.double_value(&[]);
            correct_sum += correct;
        }
        flat[numel] = loss_sum as f32;
        flat[numel + 1] = ids.len() as f32;
        flat[numel + 2] = correct_sum as f32;
        // Each parameter's gradient as f32 (a no-op under f32), flat.
        let grads = self.params.iter().map(|(_, p)| {
            let g = p.grad();
            if g.defined() {
                g.to_kind(tch::Kind::Float).reshape([-1])
            } else {
                Tensor::zeros([p.numel() as i64], (tch::Kind::Float, device))
            }
        });
        // Off the CPU, and in mixed precision (whose bf16 gradients are converted anyway,
        // so the CPU runs this path too and the tests exercise it), the gradient stays one
        // tensor for the all-reduce to copy bucket by bucket.
        if device != tch::Device::Cpu || self.job().precision != crate::device::Precision::F32 {
            let all: Vec<Tensor> = grads.collect();
            return Ok((flat, Some(Tensor::cat(&all, 0))));
        }
        let mut off = 0;
        for g in grads {
            let n = g.numel();
            g.copy_data(&mut flat[off..off + n], n);
            off += n;
        }
        Ok((flat, None))
    }

    /// Zeroes every trainable parameter's gradient.
    fn zero_grads(&mut self) {
        for (_, p) in &self.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    }

    /// Applies the summed gradients and commits the step.
    fn apply(
        &mut self,
        flat: Vec<f32>,
        batch: &StepBatch,
        view: &View,
        t0: Instant,
        stats0: DataPlaneStats,
    ) -> Result<StepRecord, TrainError> {
        let numel = flat.len() - 3;
        let total = flat[numel + 1] as f64;
        if total as u64 != batch.len {
            return Err(TrainError::Collective {
                step: self.step,
                source: DataPlaneError::Buffer(format!(
                    "members contributed {total} samples, the batch has {}",
                    batch.len
                )),
            });
        }
        let loss = flat[numel] as f64 / total;
        if !loss.is_finite() {
            return Err(TrainError::Diverged(self.step));
        }
        // The mean gradient is `flat / total`, clipped to norm `grad_clip`: one scale the
        // fused update applies as it reads each element.
        let clip = self.job().optimizer.grad_clip;
        let scale = optim::mean_scale(total, clip, || optim::sum_squares(&flat[..numel]));
        let lr = self.job().lr_at(self.step, self.total_steps);
        self.opt.step(&flat[..numel], scale as f32, lr);
        self.step += 1;
        self.cursor = sharding::advance(batch, self.data.train_len());
        self.phases.mark(Phase::Optimizer);
        let stats = self.ctx.dp.stats();
        let secs = t0.elapsed().as_secs_f64();
        let rec = StepRecord {
            step: self.step,
            loss,
            lr,
            samples: batch.len,
            samples_per_s: batch.len as f64 / secs.max(1e-9),
            step_ms: secs * 1e3,
            elapsed_s: self.started.elapsed().as_secs_f64(),
            compute_ms: 0.0,
            guard_ms: 0.0,
            allreduce_ms: 0.0,
            phases: Default::default(),
            bytes_sent: stats.bytes_sent - stats0.bytes_sent,
            bytes_received: stats.bytes_received - stats0.bytes_received,
            members: view.len(),
            view_epoch: view.epoch,
            data_epoch: self.cursor.epoch,
            data_offset: self.cursor.offset,
            peak_rss_bytes: crate::status::ProcessMemory::now().map_or(0, |m| m.peak_rss_bytes),
        };
        self.set_report(|r| {
            r.step = rec.step;
            r.loss = Some(loss);
            r.samples_per_s = Some(rec.samples_per_s);
            r.step_ms = Some(rec.step_ms);
            r.samples += batch.len;
            r.members = rec.members;
            r.recent.push((rec.step, loss));
            r.recent_samples_per_s.push((rec.step, rec.samples_per_s));
            if r.recent.len() > 200 {
                r.recent.remove(0);
                r.recent_samples_per_s.remove(0);
            }
        });
        Ok(rec)
    }
}

/// `len` zeros in a vector with capacity for `room` more.
fn zeros_with_room(len: usize, room: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(len + room);
    v.resize(len, 0.0);
    v
}
