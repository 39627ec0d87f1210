//! Views and state transfer: waiting for a settled view (a changed one after a failure),
//! the progress exchange in which members learn who is furthest along, and the broadcast
//! that gives every member (joiners, members that fell behind, a resumed run) the state of
//! that member: parameters, optimizer state and counters.

use super::collective::{collective_failed, f32_as_words, tag, words_as_f32, StepFailure};
use super::collective::{TAG_EXCHANGE, TAG_SYNC};
use super::member::Trainer;
use super::TrainError;
use coordinator_free::sharding::{self, DataCursor};
use coordinator_free::training::{Progress, RoundMachine};
use coordinator_free::{NodeId, View, ViewHash};
use std::time::{Duration, Instant};
use tch::Tensor;

/// After a failed collective, how long to wait for the view to change before retrying in
/// the same view (a transient failure).
const CHANGE_WAIT: Duration = Duration::from_secs(5);

impl Trainer {
    /// Waits for a settled view with at least `min` members, other than `not` when given
    /// (falling back to the same view after `bound`, so a transient failure is retried).
    pub(super) fn next_view(
        &mut self,
        min: usize,
        not: Option<ViewHash>,
        bound: Duration,
    ) -> Result<View, TrainError> {
        if let Some(old) = not {
            let views = &mut self.ctx.views;
            // The timer must be created inside the runtime.
            let r = self.ctx.rt.block_on(async {
                tokio::time::timeout(
                    CHANGE_WAIT,
                    views.wait_for(|s| s.settled && s.view.hash != old && s.view.len() >= min),
                )
                .await
                .map(|r| r.map(|s| s.clone()))
            });
            if let Ok(Ok(s)) = r {
                return Ok(s.view);
            }
        }
        self.settled_view(min, bound)
    }

    /// Waits until the view is settled with at least `min_nodes` members, or `bound`.
    fn settled_view(&mut self, min: usize, bound: Duration) -> Result<View, TrainError> {
        let views = &mut self.ctx.views;
        let r = self.ctx.rt.block_on(async {
            tokio::time::timeout(bound, views.wait_for(|s| s.settled && s.view.len() >= min))
                .await
                .map(|r| r.map(|s| s.view.clone()))
        });
        match r {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) => Err(TrainError::Stopped),
            Err(_) => Err(TrainError::NotEnoughMembers {
                have: self.ctx.views.borrow().view.len(),
                need: min,
                after: bound,
            }),
        }
    }

    /// All-gathers every member's progress on `view`, and its device key (the view's
    /// backend choice, see `backend`).
    pub(super) fn exchange_progress(
        &mut self,
        view: &View,
        mine: Progress,
    ) -> Result<Vec<(NodeId, Progress)>, StepFailure> {
        let input = words_as_f32(&[
            mine.step,
            mine.cursor.epoch,
            mine.cursor.offset,
            self.device_key,
        ]);
        let mut out = vec![0f32; 8 * view.len()];
        let dp = self.ctx.dp.clone();
        let t = tag(self.tag_base, view, TAG_EXCHANGE, 0, 0);
        self.collective(view, dp.all_gather(view, t, &input, &mut out))?;
        let words = f32_as_words(&out);
        self.set_device_keys(view, words.chunks(4).map(|w| w[3]).collect());
        Ok(view
            .ids()
            .zip(words.chunks(4))
            .map(|(id, w)| {
                (
                    id.clone(),
                    Progress {
                        step: w[0],
                        cursor: DataCursor {
                            epoch: w[1],
                            offset: w[2],
                        },
                    },
                )
            })
            .collect())
    }

    /// The machine asked for a sync on `view` from `root` (rank `root_rank`, at
    /// `progress`): runs it and reports the outcome to the machine. Returns the view when
    /// the sync failed (the machine then waits for the next one).
    pub(super) fn on_sync(
        &mut self,
        machine: &mut impl RoundMachine,
        view: &View,
        root: &NodeId,
        root_rank: u32,
        progress: Progress,
    ) -> Result<Option<ViewHash>, TrainError> {
        let t = Instant::now();
        let bytes = match self.sync_state(view, root_rank) {
            Ok(bytes) => bytes,
            Err(e) => return Ok(Some(collective_failed(machine, view, "sync", e))),
        };
        self.set_progress(progress);
        machine.handle_synced(view.hash);
        let ms = t.elapsed().as_secs_f64() * 1e3;
        tracing::info!(epoch = view.epoch, members = view.len(), root = %root, step = progress.step, bytes, ms, "state synced");
        let samples = self.samples_through(progress.step);
        self.set_report(|r| {
            r.members = view.len();
            r.step = progress.step;
            r.samples = samples;
        });
        self.event(
            view,
            serde_json::json!({"event": "sync", "step": progress.step,
                "view_epoch": view.epoch, "members": view.len(),
                "root": root.as_str(), "bytes": bytes, "ms": ms}),
        )?;
        Ok(None)
    }

    /// Makes every member's parameters and optimizer state those of rank `root` (one
    /// broadcast). Returns the bytes moved. Under DiLoCo every member first drops its
    /// uncommitted inner work, so the broadcast carries the root's committed state
    /// (θ_global, the outer momentum, the inner optimizer's state at the commit), and the
    /// result becomes every member's committed state.
    fn sync_state(&mut self, view: &View, root: u32) -> Result<u64, StepFailure> {
        self.restore_committed();
        let bytes = self.broadcast_state(view, root)?;
        self.capture_committed();
        Ok(bytes)
    }

    /// The broadcast of [`sync_state`](Self::sync_state).
    fn broadcast_state(&mut self, view: &View, root: u32) -> Result<u64, StepFailure> {
        let tensors = self.state_tensors();
        let numel: usize = tensors.iter().map(|(_, t)| t.numel()).sum();
        if view.len() == 1 {
            return Ok(0);
        }
        let mut flat = vec![0f32; numel];
        let mut off = 0;
        for (_, t) in &tensors {
            let n = t.numel();
            t.contiguous()
                .view([-1])
                .copy_data(&mut flat[off..off + n], n);
            off += n;
        }
        let t = tag(self.tag_base, view, TAG_SYNC, 0, 0);
        let dp = self.ctx.dp.clone();
        self.collective(view, dp.broadcast(view, t, &mut flat, root))?;
        let _guard = tch::no_grad_guard();
        let mut off = 0;
        for (_, mut t) in tensors {
            let n = t.numel();
            let src = Tensor::from_slice(&flat[off..off + n]).view(t.size().as_slice());
            t.copy_(&src);
            off += n;
        }
        self.opt.refresh();
        Ok(numel as u64 * 4)
    }

    /// The state every member must share: parameters (the f32 master weights; after
    /// writing into them, `opt.refresh()` updates a bf16 model), optimizer state, under
    /// DiLoCo the outer momentum (`outer.momentum`), and counters.
    pub(super) fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self
            .opt
            .named_params(&self.params)
            .into_iter()
            .map(|(n, t)| (format!("model.{n}"), t))
            .collect();
        v.extend(
            self.opt
                .named_state(&self.params)
                .into_iter()
                .map(|(n, t)| (format!("optim.{n}"), t)),
        );
        v.extend(self.outer_state_tensors());
        v
    }

    /// Takes `p` as this member's committed progress (the optimizer has applied one
    /// update per committed step).
    pub(super) fn set_progress(&mut self, p: Progress) {
        self.step = p.step;
        self.cursor = p.cursor;
        self.opt.t = p.step;
    }

    /// Training samples the first `steps` steps consume (batches are shorter at the end of
    /// each data epoch).
    fn samples_through(&self, steps: u64) -> u64 {
        let n = self.data.train_len();
        let mut cursor = DataCursor::default();
        let mut total = 0;
        for _ in 0..steps {
            let Ok(b) = sharding::next_batch(cursor, self.job().batch_size, n) else {
                break;
            };
            total += b.len;
            cursor = sharding::advance(&b, n);
        }
        total
    }
}
