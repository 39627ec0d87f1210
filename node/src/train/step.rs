//! One training step on a member: the gradient of the sum of losses over its samples of
//! the global batch, the bucketed all-reduce that sums every member's (with the gradient
//! guard riding on it and the redo without rejected members), and the optimizer update that
//! commits the step.

use super::collective::{tag, StepError, StepFailure, TAG_GRAD};
use super::member::Trainer;
use super::optim;
use super::phases::Phase;
use super::report::StepRecord;
use super::TrainError;
use crate::data_plane::{DataPlaneError, DataPlaneStats};
use coordinator_free::collective::Backend;
use coordinator_free::sharding::{self, StepBatch};
use coordinator_free::training::{redistribute, screen_gradients, Coverage};
use coordinator_free::{NodeId, ReduceOp, View};
use std::ops::Range;
use std::time::{Duration, Instant};
use tch::Tensor;

/// A committed step: its record, the sample ids this member used, and every member's
/// measured speed (samples/s).
pub(super) type StepDone = (StepRecord, Vec<u64>, Vec<(NodeId, f64)>);

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
        self.attempted.clear();
        let mut ids = ids_at(self.order(batch.cursor.epoch), ranges);
        self.phases.mark(Phase::Data);
        let tc = Instant::now();
        // On a device, the gradient stays there until the all-reduce copies it bucket by
        // bucket (`on_device`); `flat` then holds only the loss, samples and correct.
        let (mut flat, mut on_device) = self.local_gradients(&ids).map_err(StepError::Fatal)?;
        let compute = tc.elapsed();
        self.phases.mark(Phase::Compute);
        let speed = ids.len() as f64 / compute.as_secs_f64().max(1e-9);
        self.maybe_nan_gradient(&mut flat, on_device.as_ref());
        let numel = flat.len() - 3;
        let n = view.len();
        let me = self.ctx.me.clone();
        // The machine steps only in views holding this member.
        let rank = view
            .position(&me)
            .ok_or(StepError::Failed(StepFailure::ViewChanged))?;
        let (norms_at, speeds_at) = (numel + 3, numel + 3 + n);
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
                mine.clear();
                mine.extend_from_slice(&flat[..numel + 3]);
            }
            // A view of one member has no guard: no norm to compute. The norm is that of
            // the member's mean gradient (its sum over its samples, divided by their count):
            // shares differ, and a sum's norm grows with the samples in it, so comparing
            // sums would single out whoever got the larger share.
            let norm = if n < 2 || rejected.contains(&me) {
                0.0
            } else {
                let squares = match &on_device {
                    Some(g) => g.square().sum(tch::Kind::Double).double_value(&[]),
                    None => optim::sum_squares(&flat[..numel]),
                };
                squares.sqrt() / ids.len().max(1) as f64
            };
            self.phases.mark(Phase::Compute);
            flat.resize(numel + 3 + 2 * n, 0.0);
            flat[norms_at + rank] = norm as f32;
            flat[speeds_at + rank] = if ids.is_empty() { 0.0 } else { speed as f32 };
            self.attempted.clone_from(&ids);
            let waited = self.ctx.dp.wait_time();
            let reduced = self.all_reduce_round(view, attempt, &mut flat, on_device.as_ref());
            self.phases
                .all_reduce(self.ctx.dp.wait_time().saturating_sub(waited));
            reduced.map_err(StepError::Failed)?;
            if attempt == 0 {
                first_round = ta.elapsed();
            }
            if n < 2 || !self.screen(view, attempt, &flat[norms_at..speeds_at], &mut rejected)? {
                break;
            }
            // A redo adds to this member's own contribution on the host: the part of it
            // still on the device comes over now (rare: only when the guard left someone out).
            if let Some(g) = on_device.take() {
                g.copy_data(&mut mine[..numel], numel);
            }
            let covered = covered.get_or_insert_with(|| coverage.clone());
            let more = take_over(weights, covered, &rejected, &me)?;
            flat = if rejected.contains(&me) {
                ids.clear();
                vec![0f32; numel + 3]
            } else {
                let more = ids_at(self.order(batch.cursor.epoch), &more);
                let g = self
                    .local_gradients_on_host(&more)
                    .map_err(StepError::Fatal)?;
                ids.extend(more);
                mine.iter().zip(&g).map(|(a, b)| a + b).collect()
            };
            self.phases.mark(Phase::Compute);
        }
        let speeds: Vec<(NodeId, f64)> = view
            .ids()
            .cloned()
            .zip(flat[speeds_at..].iter().map(|&x| f64::from(x)))
            .collect();
        flat.truncate(numel + 3);
        let redo = tc.elapsed() - compute - first_round;
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

    /// One round of the step's all-reduce: sums `flat` over `view`'s members, in NCCL when
    /// the view's backend is NCCL (see `backend`), else over the ring in buckets of
    /// `bucket_bytes` that run concurrently (`attempt` keeps the guard's rounds apart).
    ///
    /// `on_device` is the gradient (the first `numel` elements of `flat`) when it is still
    /// on a device: a copier thread brings it to `flat` one bucket at a time, and each
    /// bucket's all-reduce starts as soon as its copy is done, so the copy of the next
    /// bucket overlaps the ring's work on this one. On the host the buckets are handed over
    /// at once, without a thread.
    pub(super) fn all_reduce_round(
        &mut self,
        view: &View,
        attempt: u64,
        flat: &mut [f32],
        on_device: Option<&tch::Tensor>,
    ) -> Result<(), StepFailure> {
        if self.backend(view) == Backend::Nccl {
            return self.nccl_all_reduce(view, flat, on_device);
        }
        let dp = self.ctx.dp.clone();
        let bucket = (self.job().bucket_bytes as usize / 4).max(1);
        let (base, step, v) = (self.tag_base, self.step, view.clone());
        let source = on_device.map(|g| g.shallow_clone());
        std::thread::scope(|s| {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            let on_host = source.is_none();
            let hand_over = move || {
                for (i, chunk) in { flat }.chunks_mut(bucket).enumerate() {
                    if let Some(g) = &source {
                        let start = (i * bucket) as i64;
                        let len = (chunk.len() as i64).min(g.numel() as i64 - start);
                        if len > 0 {
                            g.narrow(0, start, len)
                                .copy_data(&mut chunk[..len as usize], len as usize);
                        }
                    }
                    if tx.send((i, chunk)).is_err() {
                        return; // the round was abandoned
                    }
                }
            };
            // Host buckets need no copy: all are handed over at once, on this thread.
            if on_host {
                hand_over();
            } else {
                s.spawn(hand_over);
            }
            let fut = async {
                let mut running = futures::stream::FuturesUnordered::new();
                let mut copied = true;
                while copied || !running.is_empty() {
                    tokio::select! {
                        next = rx.recv(), if copied => match next {
                            Some((i, chunk)) => {
                                let index = (attempt << 32) | i as u64;
                                let t = tag(base, &v, TAG_GRAD, step, index);
                                running.push(dp.all_reduce(&v, t, chunk, ReduceOp::Sum));
                            }
                            None => copied = false,
                        },
                        Some(done) = futures::StreamExt::next(&mut running) => done?,
                    }
                }
                Ok(())
            };
            self.collective(view, fut)
        })
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
        let (mut flat, on_device) = self.local_gradients(ids)?;
        if let Some(g) = on_device {
            g.copy_data(&mut flat[..g.numel()], g.numel());
        }
        Ok(flat)
    }

    /// Gradients of the sum of losses over `ids`, flattened in parameter order, followed
    /// by `[loss_sum, samples, correct]`. On the CPU in f32 the gradient is in the returned
    /// vector; on another device (or in bf16) it is one flat f32 tensor there (returned
    /// beside a vector whose gradient part is zeros), for the all-reduce to copy bucket by
    /// bucket.
    pub(super) fn local_gradients(
        &mut self,
        ids: &[u64],
    ) -> Result<(Vec<f32>, Option<Tensor>), TrainError> {
        for (_, p) in &self.params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        let numel: usize = self.params.iter().map(|(_, t)| t.numel()).sum();
        let mut flat = vec![0f32; numel + 3];
        if ids.is_empty() {
            return Ok((flat, None));
        }
        self.model.set_train(true);
        let device = self.model.device();
        let td = Instant::now();
        let batch = self.data.train_batch(ids)?.to_device(device);
        self.phases.region(Phase::Data, td);
        let (loss, correct) = self.model.loss_sum(&batch)?;
        loss.backward();
        flat[numel] = loss.double_value(&[]) as f32;
        flat[numel + 1] = ids.len() as f32;
        flat[numel + 2] = correct as f32;
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
