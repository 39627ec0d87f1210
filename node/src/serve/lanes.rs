//! The completions engine: a dispatcher per model and lanes per replica, batching
//! continuously.
//!
//! The dispatcher sends each request to the replica with the fewest outstanding requests
//! (`coordinator_free::serving::Balancer`), into the lane of that replica with the fewest
//! rows. A replica has one lane more than it has stages (`pipeline::lanes`), so its stages
//! work on different lanes' rows at once. Each lane iteration starts the rows that arrived
//! (prefill calls of at most `prefill_tokens`, prompts left-padded; an idle lane waits up
//! to `max_wait_ms` for up to `max_batch`, `coordinator_free::serving::Batcher`) and adds
//! one token to every running row (one decode call); the last stage samples the tokens.
//! When a stage call fails, the lane's rows go back to the dispatcher, which re-plans
//! without the member, and are regenerated from their seeds.

use super::row::Row;
use super::{ServeError, Server};
use crate::models::config::ModelConfig;
use coordinator_free::codec::stage::{self, Payload};
use coordinator_free::codec::ServeAnnounce;
use coordinator_free::pipeline;
use coordinator_free::serving::{prefill_groups, BatchConfig, Batcher};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// A lane of a replica: its queue and how many rows it holds.
struct Lane {
    tx: mpsc::Sender<Row>,
    load: Arc<AtomicUsize>,
}

/// A row's place in its lane's load and its replica's outstanding count, given back exactly
/// once, when dropped: as soon as the row's answer is sent (so that a client's next request
/// already finds the lane free: lanes refill whole instead of by stragglers), or when the
/// row leaves its lane any other way.
pub(super) struct LaneSlot {
    srv: Server,
    model: String,
    replica: usize,
    load: Arc<AtomicUsize>,
}

impl Drop for LaneSlot {
    fn drop(&mut self) {
        self.load.fetch_sub(1, Ordering::SeqCst);
        if let Some(st) = self.srv.inner.plans.lock().unwrap().get_mut(&self.model) {
            st.balancer.done(self.replica);
        }
    }
}

impl Server {
    /// The queue of `model`'s dispatcher (started on first use).
    pub(super) fn dispatcher_for(&self, model: &str) -> mpsc::Sender<Row> {
        let mut models = self.inner.models.lock().unwrap();
        let e = models.get_mut(model).expect("checked by admit");
        if let Some(tx) = &e.dispatcher {
            if !tx.is_closed() {
                return tx.clone();
            }
        }
        let (tx, rx) = mpsc::channel(4096);
        e.dispatcher = Some(tx.clone());
        let srv = self.clone();
        let name = model.to_string();
        let requeue = tx.clone();
        tokio::spawn(async move { srv.dispatch(name, rx, requeue).await });
        tx
    }

    /// Milliseconds since the server started: the batching clock.
    fn now_ms(&self) -> u64 {
        self.inner.clock.elapsed().as_millis() as u64
    }

    /// Sends each request (new, or back from a failed lane) to a lane of the replica with
    /// the fewest outstanding requests: the lane (`pipeline::lanes`, so stages overlap) with
    /// the fewest rows. Lanes of replicas that left the plan get no more work and stop.
    async fn dispatch(
        self,
        model: String,
        mut rx: mpsc::Receiver<Row>,
        requeue: mpsc::Sender<Row>,
    ) {
        let mut lanes: HashMap<Vec<pipeline::Stage>, Vec<Lane>> = HashMap::new();
        while let Some(mut row) = rx.recv().await {
            if Instant::now() >= row.p.deadline {
                row.fail(ServeError::Deadline(row.p.deadline - row.p.started), &self);
                continue;
            }
            let plan = match self.plan(&model) {
                Ok(p) => p,
                Err(e @ (ServeError::UnknownModel(_) | ServeError::Invalid(_))) => {
                    row.fail(e, &self);
                    continue;
                }
                Err(e) => {
                    // No plan yet (members still fetching, or all suspected): retry soon.
                    tracing::debug!(model, "no plan, request waits: {e}");
                    let tx = requeue.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        let _ = tx.send(row).await;
                    });
                    continue;
                }
            };
            let ix = {
                let mut plans = self.inner.plans.lock().unwrap();
                plans
                    .get_mut(&model)
                    .and_then(|st| st.balancer.pick(&[]))
                    .unwrap_or(0)
            };
            let replica = plan.replicas[ix].clone();
            // Lanes of replicas no longer planned, or that stopped, are dropped (a fresh
            // group starts when their replica is planned again).
            lanes.retain(|k, g| plan.replicas.contains(k) && g.iter().all(|l| !l.tx.is_closed()));
            let group = lanes.entry(replica.clone()).or_insert_with(|| {
                (0..pipeline::lanes(replica.len()))
                    .map(|_| {
                        let (tx, rx) = mpsc::channel(4096);
                        let load = Arc::new(AtomicUsize::new(0));
                        let srv = self.clone();
                        let (m, r, q) = (model.clone(), replica.clone(), requeue.clone());
                        tokio::spawn(async move { srv.lane(m, r, rx, q).await });
                        Lane { tx, load }
                    })
                    .collect()
            });
            let lane = group
                .iter()
                .min_by_key(|l| l.load.load(Ordering::SeqCst))
                .expect("at least one lane");
            lane.load.fetch_add(1, Ordering::SeqCst);
            row.slot = Some(LaneSlot {
                srv: self.clone(),
                model: model.clone(),
                replica: ix,
                load: lane.load.clone(),
            });
            if let Err(mpsc::error::SendError(mut row)) = lane.tx.send(row).await {
                // The lane stopped in the meantime: forget its group, try again.
                lanes.remove(&replica);
                row.slot = None;
                let tx = requeue.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    let _ = tx.send(row).await;
                });
            }
        }
    }

    /// One lane of a replica: continuous batching. Each iteration starts the rows that
    /// arrived (one prefill call, batched) and adds one token to every active row (one
    /// decode call); rows join and leave between iterations. When a stage call fails,
    /// the lane's rows go back to the dispatcher (a re-plan leaves the member out) and are
    /// regenerated with the same seed. The lane stops when its replica left the plan.
    async fn lane(
        self,
        model: String,
        replica: Vec<pipeline::Stage>,
        mut rx: mpsc::Receiver<Row>,
        requeue: mpsc::Sender<Row>,
    ) {
        let Ok((a, cfg)) = self.model_for_request(&model) else {
            return;
        };
        let mut active: Vec<Row> = Vec::new();
        loop {
            let Some(mut fresh) = self
                .newcomers(&mut rx, active.len(), &model, &replica)
                .await
            else {
                return;
            };
            let result = self
                .iterate(&a, &cfg, &replica, &mut active, &mut fresh)
                .await;
            // Finished rows leave; their caches are dropped.
            let mut gone = Vec::new();
            active.retain(|r| {
                if r.done {
                    gone.push(r.id);
                }
                !r.done
            });
            self.drop_rows(&replica, gone);
            if let Err(e) = result {
                tracing::warn!(model, "lane failed ({e}); its requests are retried");
                let rows: Vec<Row> = active.drain(..).chain(fresh.drain(..)).collect();
                self.lane_failed(e, &replica, rows, &requeue).await;
                if self.replica_gone(&model, &replica) {
                    return;
                }
            }
        }
    }

    /// The rows that join a lane holding `active` rows now: when it is idle, the first to
    /// arrive and those that arrive within `max_wait_ms` after it (up to `max_batch`);
    /// otherwise whoever is queued, up to `max_batch` rows in all. Empty when an idle lane
    /// waited 30 s for nothing; `None` when the lane should stop (its queue closed, or
    /// idle and its replica left the plan).
    async fn newcomers(
        &self,
        rx: &mut mpsc::Receiver<Row>,
        active: usize,
        model: &str,
        replica: &[pipeline::Stage],
    ) -> Option<Vec<Row>> {
        let max_batch = self.inner.cfg.max_batch.max(1);
        let mut fresh: Vec<Row> = Vec::new();
        if active > 0 {
            while active + fresh.len() < max_batch {
                match rx.try_recv() {
                    Ok(r) => fresh.push(r),
                    Err(_) => break,
                }
            }
            return Some(fresh);
        }
        let first = match tokio::time::timeout(Duration::from_secs(30), rx.recv()).await {
            Ok(Some(r)) => r,
            Ok(None) => return None,
            Err(_) => {
                if rx.is_closed() || rx.is_empty() && self.replica_gone(model, replica) {
                    return None;
                }
                return Some(fresh);
            }
        };
        let mut batcher = Batcher::new(BatchConfig {
            max_batch,
            max_wait_ms: self.inner.cfg.max_wait_ms,
        });
        batcher.handle_request(first, self.now_ms());
        loop {
            if let Some(b) = batcher.poll_batch(self.now_ms()) {
                return Some(b);
            }
            let due = batcher.poll_timeout().expect("not empty");
            let at = self.inner.clock + Duration::from_millis(due);
            tokio::select! {
                r = rx.recv() => match r {
                    Some(r) => batcher.handle_request(r, self.now_ms()),
                    None => return Some(batcher.poll_batch(u64::MAX).unwrap_or_default()),
                },
                _ = tokio::time::sleep_until(at.into()) => {}
            }
        }
    }

    /// After a lane iteration failed with `e`: suspects the member that failed (unless it
    /// rejected the request itself), drops `rows`' caches, and sends each unanswered row
    /// back to the dispatcher to start again (or fails it, when the request was rejected).
    async fn lane_failed(
        &self,
        e: ServeError,
        replica: &[pipeline::Stage],
        rows: Vec<Row>,
        requeue: &mpsc::Sender<Row>,
    ) {
        let rejected = matches!(e, ServeError::Stage { rejected: true, .. })
            || matches!(e, ServeError::Invalid(_) | ServeError::UnknownModel(_));
        if let ServeError::Stage { member, .. } = &e {
            if !rejected {
                self.suspect(member);
            }
        }
        self.drop_rows(replica, rows.iter().map(|r| r.id).collect());
        for mut r in rows {
            r.slot = None;
            if r.done {
                continue;
            }
            if rejected {
                r.fail(ServeError::Invalid(e.to_string()), self);
                continue;
            }
            self.inner.stats.lock().unwrap().retries += 1;
            r.restart();
            let _ = requeue.send(r).await;
        }
    }

    /// One lane iteration: prefill `fresh` (they join `active` unless done at once), then
    /// one decode token for every active row. On error the rows stay where they are.
    async fn iterate(
        &self,
        a: &ServeAnnounce,
        cfg: &ModelConfig,
        replica: &[pipeline::Stage],
        active: &mut Vec<Row>,
        fresh: &mut Vec<Row>,
    ) -> Result<(), ServeError> {
        let now = Instant::now();
        for r in active.iter_mut().chain(fresh.iter_mut()) {
            if now >= r.p.deadline {
                r.fail(ServeError::Deadline(r.p.deadline - r.p.started), self);
            }
        }
        fresh.retain(|r| !r.done);
        if !fresh.is_empty() {
            self.prefill(a, cfg, replica, fresh).await?;
            active.append(fresh);
        }
        self.decode(a, cfg, replica, active).await
    }

    /// Starts `fresh` (not empty): calls of at most `prefill_tokens` prompt tokens
    /// (`coordinator_free::serving::prefill_groups`), each with its rows' prompts
    /// left-padded to its longest, each row taking its first token.
    async fn prefill(
        &self,
        a: &ServeAnnounce,
        cfg: &ModelConfig,
        replica: &[pipeline::Stage],
        fresh: &mut [Row],
    ) -> Result<(), ServeError> {
        let lens: Vec<usize> = fresh.iter().map(|r| r.p.prompt.len()).collect();
        for group in prefill_groups(&lens, self.inner.cfg.prefill_tokens) {
            let rows = &mut fresh[group];
            {
                let mut st = self.inner.stats.lock().unwrap();
                st.batches += 1;
                st.batched_requests += rows.len() as u64;
            }
            let (l, pad, tokens) = stage::pack_prompts(rows.iter().map(|r| &r.p.prompt[..]));
            let ids: Vec<u64> = rows.iter().map(|r| r.id).collect();
            let sampling = rows.iter_mut().map(|r| r.sampling()).collect();
            let (shape, bytes) = self
                .through(
                    a.sha256,
                    replica,
                    &ids,
                    true,
                    &pad,
                    (Payload::Tokens, tokens),
                    vec![ids.len() as u32, l],
                    Payload::Sampled,
                    sampling,
                )
                .await?;
            let sampled = sampled_of(replica, &shape, &bytes, rows.len(), cfg.vocab)?;
            for (r, s) in rows.iter_mut().zip(sampled) {
                let full = r.p.prompt.len() as u32 + 1 >= cfg.context;
                r.next = r.step(s, full, self);
            }
        }
        Ok(())
    }

    /// Adds one token to every row of `active` that is not done: one call with each row's
    /// last token.
    async fn decode(
        &self,
        a: &ServeAnnounce,
        cfg: &ModelConfig,
        replica: &[pipeline::Stage],
        active: &mut [Row],
    ) -> Result<(), ServeError> {
        // Rows that finished on their first token leave before decoding.
        let live: Vec<usize> = (0..active.len()).filter(|&i| !active[i].done).collect();
        if live.is_empty() {
            return Ok(());
        }
        let ids: Vec<u64> = live.iter().map(|&i| active[i].id).collect();
        let tokens = stage::pack_tokens(live.iter().map(|&i| active[i].next));
        let sampling = live.iter().map(|&i| active[i].sampling()).collect();
        let pad = vec![0u32; live.len()];
        let (shape, bytes) = self
            .through(
                a.sha256,
                replica,
                &ids,
                false,
                &pad,
                (Payload::Tokens, tokens),
                vec![ids.len() as u32, 1],
                Payload::Sampled,
                sampling,
            )
            .await?;
        let sampled = sampled_of(replica, &shape, &bytes, live.len(), cfg.vocab)?;
        for (&i, s) in live.iter().zip(sampled) {
            let r = &mut active[i];
            // The row now holds prompt + generated tokens; the next one must still fit.
            let full = (r.p.prompt.len() + r.out_len() + 1) as u32 >= cfg.context;
            r.next = r.step(s, full, self);
        }
        Ok(())
    }
}

/// Each row's sampled token (and logprobs) the last stage of `replica` answered, checked
/// for shape and vocabulary.
fn sampled_of(
    replica: &[pipeline::Stage],
    shape: &[u32],
    bytes: &[u8],
    rows: usize,
    vocab: u32,
) -> Result<Vec<stage::SampledRow>, ServeError> {
    stage::unpack_sampled(shape, bytes, rows, vocab).map_err(|e| ServeError::Stage {
        member: replica.last().expect("stages").member.clone(),
        reason: e.to_string(),
        rejected: false,
    })
}
