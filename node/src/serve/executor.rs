//! The stages this node runs, and the stage calls it answers.
//!
//! Each model this node computes stages of gets one [`StageThread`] (opened on its first
//! call, kept while the node runs) that owns the model's [`Stage`]: the layers, and the
//! KV cache of every request row. A stage call (from the entry of a request, over the
//! data plane or from this node itself) is one of: `Forward` (rows through a range of
//! layers, on that thread), `Drop` (forget rows' caches) or `Fetch` (a chunk of a model
//! file, of a held folder's manifest or of one of its files, by hash, for a member
//! fetching it). An `hf` folder's stage is [`crate::models::hf::open_stage`].
//!
//! Stages compute on the node's device (`ServeConfig::device`, from `shoal up --device`):
//! the payloads that arrive as bytes are moved there and the results come back as bytes.

use super::registry::Blob;
use super::sample::sample_rows;
use super::Server;
use crate::models::stage::StageExecutor;
use crate::models::StageError;
use coordinator_free::codec::stage::{pack_sampled, Payload, StageReply, StageRequest};
use std::sync::Arc;
use std::time::Instant;

/// A job for a stage's thread.
type StageJob<S> = Box<dyn FnOnce(&mut S) + Send>;

/// A stage's own compute thread: its forwards and cache drops run there one after another,
/// on one OS thread that keeps the stage's working set in its core's caches (instead of
/// hopping between the runtime's blocking threads), scheduled as a batch thread (Linux
/// `SCHED_BATCH`: the node's I/O threads preempt it when they wake). The thread ends when
/// the last handle is dropped; a panicking job fails only its own call. Generic over what
/// it owns (a [`Stage`] when serving) so it can be tested alone.
pub(super) struct StageThread<S: Send + 'static = StageExecutor> {
    jobs: std::sync::mpsc::Sender<StageJob<S>>,
}

impl<S: Send + 'static> Clone for StageThread<S> {
    fn clone(&self) -> Self {
        StageThread {
            jobs: self.jobs.clone(),
        }
    }
}

impl<S: Send + 'static> StageThread<S> {
    /// Moves `state` to a new thread named `name`; `threads` > 0 sets libtorch's
    /// intra-op thread count there (OpenMP's count is per calling thread).
    fn start(mut state: S, name: &str, threads: usize) -> std::io::Result<StageThread<S>> {
        let (tx, rx) = std::sync::mpsc::channel::<StageJob<S>>();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                if threads > 0 {
                    tch::set_num_threads(threads as i32);
                }
                // SCHED_BATCH (no privilege needed): a CPU-bound thread that yields to
                // the node's I/O threads when they wake, so the lanes' round trips to the
                // entry are not held behind a busy stage's time slice. With every core
                // computing (a pipeline's stages on one machine), this raised a 2-stage
                // pipeline's throughput by 16-40% in A/B rounds.
                let p = libc::sched_param { sched_priority: 0 };
                // SAFETY: plain syscall on the calling thread with a valid parameter.
                if unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &p) } != 0 {
                    tracing::debug!("SCHED_BATCH refused: {}", std::io::Error::last_os_error());
                }
                while let Ok(job) = rx.recv() {
                    let run = std::panic::AssertUnwindSafe(|| job(&mut state));
                    if std::panic::catch_unwind(run).is_err() {
                        tracing::error!("a stage job panicked");
                    }
                }
            })?;
        Ok(StageThread { jobs: tx })
    }

    /// Runs `f` on the thread and waits for its result (without blocking the runtime).
    async fn run<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut S) -> R + Send + 'static,
    ) -> Result<R, String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move |s: &mut S| {
                let _ = tx.send(f(s));
            }))
            .map_err(|_| "the stage's thread stopped".to_string())?;
        rx.await.map_err(|_| "the stage panicked".to_string())
    }
}

impl Server {
    /// The thread of the stage of the model with hash `model`, started on first use.
    fn stage_for(&self, model: &[u8; 32]) -> Result<StageThread, String> {
        if let Some(s) = self.inner.stages.lock().unwrap().get(model) {
            return Ok(s.clone());
        }
        let (path, cfg) = {
            let models = self.inner.models.lock().unwrap();
            let e = models
                .values()
                .find(|e| &e.announce.sha256 == model)
                .ok_or("unknown model")?;
            (
                e.path.clone().ok_or("model not held here yet")?,
                e.cfg.clone(),
            )
        };
        let device = self.inner.cfg.device;
        let stage = if cfg.kind == "hf" {
            crate::models::hf::open_stage(&path, device, &cfg).map_err(|e| e.to_string())?
        } else {
            StageExecutor::open_on(&path, cfg, device).map_err(|e| e.to_string())?
        };
        let stage = StageThread::start(stage, "serve-stage", self.inner.cfg.threads)
            .map_err(|e| e.to_string())?;
        // Two first calls may race here: the one inserted first is the stage (with its
        // rows' caches); the other thread ends when its handle is dropped.
        Ok(self
            .inner
            .stages
            .lock()
            .unwrap()
            .entry(*model)
            .or_insert(stage)
            .clone())
    }

    /// Runs one stage request here.
    pub(super) async fn handle_call(
        &self,
        req: StageRequest,
        payload: Vec<u8>,
    ) -> (StageReply, Vec<u8>) {
        self.inner.stats.lock().unwrap().stage_calls += 1;
        match req {
            StageRequest::Drop { rows } => self.drop_here(rows).await,
            StageRequest::Fetch { model, offset, len } => {
                self.read_chunk(&model, offset, len).await
            }
            StageRequest::Forward {
                model,
                rows,
                start,
                end,
                shape,
                prefill,
                pad,
                input,
                output,
                sampling,
            } => {
                let stage = match self.stage_for(&model) {
                    Ok(s) => s,
                    Err(e) => return (StageReply::Err(e), vec![]),
                };
                let stats = self.clone();
                let layers = start as usize..end as usize;
                let run = stage
                    .run(move |st| {
                        let t = Instant::now();
                        // A sampled answer is the last position's logits, sampled here.
                        let computed = match output {
                            Payload::Sampled => Payload::LastLogits,
                            o => o,
                        };
                        let r = st.forward(
                            &rows,
                            layers.clone(),
                            prefill,
                            &pad,
                            input,
                            &shape,
                            &payload,
                            computed,
                        );
                        let r = match r {
                            Ok((_, shape, bytes)) if output == Payload::Sampled => {
                                let vocab = shape.get(1).copied().unwrap_or(0) as usize;
                                let logits = coordinator_free::codec::stage::f32s(&bytes);
                                let (rows, top) = sample_rows(&logits, vocab, &sampling);
                                let (shape, bytes) = pack_sampled(&rows, top);
                                Ok((Payload::Sampled, shape, bytes))
                            }
                            r => r,
                        };
                        let secs = t.elapsed().as_secs_f64();
                        stats.inner.stats.lock().unwrap().forward_s += secs;
                        // Calls measure this node's speed for the planner (compute only:
                        // a call that loads layers would count their reading as slowness).
                        let secs = secs - st.last_load().as_secs_f64();
                        if r.is_ok() {
                            let work = st
                                .config()
                                .layer_work()
                                .get(layers)
                                .map_or(0, |w| w.iter().sum::<u64>());
                            stats.measured_call(&model, work as f64, secs);
                        }
                        r
                    })
                    .await;
                match run {
                    Ok(Ok((payload, shape, bytes))) => (StageReply::Ok { payload, shape }, bytes),
                    Ok(Err(e @ StageError::Request(_))) => {
                        (StageReply::Rejected(e.to_string()), vec![])
                    }
                    Ok(Err(e)) => (StageReply::Err(e.to_string()), vec![]),
                    Err(e) => (StageReply::Err(e), vec![]),
                }
            }
        }
    }

    /// Forgets `rows`' caches on every stage run here.
    async fn drop_here(&self, rows: Vec<u64>) -> (StageReply, Vec<u8>) {
        let stages: Vec<StageThread> = self
            .inner
            .stages
            .lock()
            .unwrap()
            .values()
            .cloned()
            .collect();
        let rows = Arc::new(rows);
        for s in stages {
            let rows = rows.clone();
            let _ = s.run(move |st| st.drop_rows(&rows)).await;
        }
        (
            StageReply::Ok {
                payload: Payload::Bytes,
                shape: vec![0],
            },
            vec![],
        )
    }

    /// Reads `len` bytes at `offset` of the blob with hash `model`: a model file, a held
    /// folder's manifest or one of its files.
    async fn read_chunk(&self, model: &[u8; 32], offset: u64, len: u64) -> (StageReply, Vec<u8>) {
        let path = match self.blob(model) {
            None => return (StageReply::Err("model not held here".into()), vec![]),
            Some(Blob::Manifest(f)) => {
                let start = offset.min(f.bytes.len() as u64) as usize;
                let end = offset.saturating_add(len).min(f.bytes.len() as u64) as usize;
                let b = f.bytes[start..end].to_vec();
                let shape = vec![b.len() as u32];
                let payload = Payload::Bytes;
                return (StageReply::Ok { payload, shape }, b);
            }
            Some(Blob::File(path)) => path,
        };
        let read = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<u8>> {
            use std::io::{Read, Seek};
            let mut f = std::fs::File::open(path)?;
            f.seek(std::io::SeekFrom::Start(offset))?;
            let mut buf = Vec::new();
            f.take(len).read_to_end(&mut buf)?;
            Ok(buf)
        })
        .await;
        match read {
            Ok(Ok(b)) => (
                StageReply::Ok {
                    payload: Payload::Bytes,
                    shape: vec![b.len() as u32],
                },
                b,
            ),
            Ok(Err(e)) => (StageReply::Err(e.to_string()), vec![]),
            Err(e) => (StageReply::Err(e.to_string()), vec![]),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::StageThread;

    #[tokio::test]
    async fn a_stage_thread_runs_jobs_in_order_and_survives_a_panic() {
        let t = StageThread::start(Vec::<u32>::new(), "test-stage", 0).unwrap();
        for i in 0..5 {
            assert_eq!(t.run(move |v| v.push(i)).await, Ok(()));
        }
        let err = t.run(|_| -> u32 { panic!("job fails") }).await;
        assert_eq!(err, Err("the stage panicked".to_string()));
        // The state and the thread outlive the failed job; jobs from clones share them.
        let t2 = t.clone();
        assert_eq!(t2.run(|v| v.clone()).await, Ok(vec![0, 1, 2, 3, 4]));
        assert_eq!(t.run(|v| v.len()).await, Ok(5));
    }
}
