//! Serving: models offered to the swarm, cut into pipeline stages across members, and
//! answered through an OpenAI-compatible HTTP API on every node.
//!
//! - **Offer.** `shoal serve MODEL` hands a model file to a node ([`Server::offer`]); the
//!   node announces it ([`ControlMessage::Serve`]) every 2 s. Every member that hears of a
//!   model fetches the file over the data plane (from any member that announced it),
//!   checks its SHA-256 and from then on announces it too: an announcement means "I hold
//!   this model".
//! - **Plan.** Any node that receives a request plans on its own, from the view, the
//!   members that hold the model and their announced memory and speed
//!   (`coordinator_free::pipeline`): no coordinator, and every node derives the same plan
//!   from the same view. Members a stage call just failed on are left out until the view
//!   changes (or 10 s pass).
//! - **Execute** ([`model::Stage`]). The entry node (the one the request reached) sends
//!   each request to the replica with the fewest outstanding requests, into one of its
//!   lanes (micro-batches: one more than its stages, `pipeline::lanes`, so stages work on
//!   different lanes' rows at once and the next is waiting when one moves on). A lane batches
//!   continuously: every iteration starts the requests that arrived (one prefill call,
//!   prompts left-padded; an idle lane waits up to `max_wait_ms` for up to `max_batch`)
//!   and adds one token to every running request (one decode call), over data-plane
//!   streams, stage after stage; requests join and leave between iterations. Each stage
//!   keeps the KV cache of its layers per request row.
//! - **Failover.** Every request gets a seed on arrival, so a retry reproduces its tokens:
//!   when a stage call fails, the lane's requests go back to the dispatcher, which
//!   re-plans without that member, until each request's deadline; tokens already
//!   streamed are not sent again.
//! - **Cache.** Deterministic requests (temperature 0, or a seed given) are answered from
//!   an LRU cache of complete responses.

pub mod http;
pub mod model;

use crate::data_plane::{DataPlane, Stream};
use coordinator_free::codec::stage::{self as wire, Payload, StageReply, StageRequest};
use coordinator_free::codec::ServeAnnounce;
use coordinator_free::pipeline::{self, LayerCost, Plan, PlanConfig, Worker};
use coordinator_free::serving::{Balancer, BatchConfig, Batcher, LruCache, SplitMix64};
use coordinator_free::{Capabilities, NodeId, View};
use model::{ModelConfig, Stage};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};

/// Data-plane service id of stage calls.
pub const STAGE_SERVICE: u32 = 1;
/// Model files are fetched in chunks of this many bytes. 8 MiB.
pub const FETCH_CHUNK: u64 = 8 << 20;
/// A member a stage call failed on is left out of plans this long (or until the view
/// changes). 10 s.
pub const SUSPECT_FOR: Duration = Duration::from_secs(10);
/// An idle stage stream is closed after this long. 10 min.
pub const STREAM_IDLE: Duration = Duration::from_secs(600);

/// Serving settings.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Most requests in one batch. Default: 8.
    pub max_batch: usize,
    /// Longest a request waits for others to batch with, in ms. Default: 5.
    pub max_wait_ms: u64,
    /// Complete responses kept for repeated deterministic requests. Default: 1024.
    pub cache_entries: usize,
    /// A request's deadline (a request carrying a smaller `timeout` uses that). Default: 60 s.
    pub request_timeout: Duration,
    /// Bearer token the OpenAI API requires (`--api-token`). Default: none.
    pub api_token: Option<String>,
    /// Where fetched model files are kept. Default: `<data dir>/models`.
    pub models_dir: PathBuf,
    /// Floor of the bound on a stage call; the bound is `max(floor, 10 × the slowest call
    /// seen lately)`. Default: 3 s.
    pub call_floor: Duration,
    /// Largest HTTP request body on the serving routes. Default: 8 MiB.
    pub max_body: usize,
    /// Torch threads for stage compute, set on the thread that runs each forward (0:
    /// libtorch's default). Default: 0.
    pub threads: usize,
}

impl ServeConfig {
    /// Defaults, with model files under `data_dir/models`.
    pub fn new(data_dir: &Path) -> ServeConfig {
        ServeConfig {
            max_batch: 8,
            max_wait_ms: 5,
            cache_entries: 1024,
            request_timeout: Duration::from_secs(60),
            api_token: None,
            models_dir: data_dir.join("models"),
            call_floor: Duration::from_secs(3),
            max_body: 8 << 20,
            threads: 0,
        }
    }
}

/// Why serving failed. The HTTP layer maps each to a status code.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// No model by that name is served.
    #[error("the model `{0}` does not exist")]
    UnknownModel(String),
    /// The request is invalid (prompt too long, bad parameters, bad tensor).
    #[error("{0}")]
    Invalid(String),
    /// No plan can be made now (no member holds the model yet, or too little memory).
    #[error("no pipeline for `{model}`: {reason}")]
    NoPlan {
        /// The model.
        model: String,
        /// Why.
        reason: String,
    },
    /// A stage call failed.
    #[error("stage on {member} failed: {reason}")]
    Stage {
        /// The member.
        member: NodeId,
        /// Why.
        reason: String,
        /// Whether the stage rejected the request itself (not retryable elsewhere).
        rejected: bool,
    },
    /// The request's deadline passed.
    #[error("the request did not complete within {0:?}")]
    Deadline(Duration),
    /// The model file cannot be offered.
    #[error("cannot serve {path}: {reason}")]
    Offer {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
}

/// Sampling parameters of one completion.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    /// Most tokens to generate.
    pub max_tokens: u32,
    /// 0 = greedy.
    pub temperature: f32,
    /// Nucleus mass.
    pub top_p: f32,
    /// Seed (drawn at arrival when the client gave none).
    pub seed: u64,
    /// Whether the client fixed the seed.
    pub seeded: bool,
    /// Stop sequences.
    pub stop: Vec<String>,
}

/// A finished completion.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Completion {
    /// Generated text (lossy UTF-8 of the generated bytes).
    pub text: String,
    /// `stop` or `length`.
    pub finish_reason: String,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Generated tokens.
    pub completion_tokens: u32,
    /// Whether it came from the cache.
    pub cached: bool,
}

/// What a streaming request receives.
#[derive(Debug)]
pub enum StreamEvent {
    /// More text.
    Text(String),
    /// The end.
    Done(Completion),
    /// A failure (the stream ends).
    Failed(ServeError),
}

enum Sink {
    Once(oneshot::Sender<Result<Completion, ServeError>>),
    Stream(mpsc::Sender<StreamEvent>),
    /// Answered already.
    Closed,
}

struct Pending {
    prompt: Vec<u8>,
    sampling: Sampling,
    deadline: Instant,
    started: Instant,
    sink: Sink,
    cache_key: Option<String>,
}

/// A model this node knows of.
struct ModelEntry {
    announce: ServeAnnounce,
    cfg: ModelConfig,
    /// The local file once held (fetched and verified, or offered here).
    path: Option<PathBuf>,
    /// Members that announced holding it, when last heard.
    holders: HashMap<NodeId, Instant>,
    fetching: bool,
    dispatcher: Option<mpsc::Sender<Row>>,
}

/// A lane of a replica: its queue and how many rows it holds.
struct Lane {
    tx: mpsc::Sender<Row>,
    load: Arc<std::sync::atomic::AtomicUsize>,
}

/// A row's place in its lane's load and its replica's outstanding count, given back exactly
/// once, when dropped: as soon as the row's answer is sent (so that a client's next request
/// already finds the lane free: lanes refill whole instead of by stragglers), or when the
/// row leaves its lane any other way.
struct LaneSlot {
    srv: Server,
    model: String,
    replica: usize,
    load: Arc<std::sync::atomic::AtomicUsize>,
}

impl Drop for LaneSlot {
    fn drop(&mut self) {
        self.load.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        if let Some(st) = self.srv.inner.plans.lock().unwrap().get_mut(&self.model) {
            st.balancer.done(self.replica);
        }
    }
}

/// A model's current plan as the entry sees it.
struct PlanState {
    /// The workers it was made from.
    inputs: Vec<Worker>,
    plan: Plan,
    balancer: Balancer,
}

/// Counters for `/metrics` and status.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct ServeStats {
    /// Completed requests.
    pub requests_ok: u64,
    /// Failed requests (any error after admission).
    pub requests_failed: u64,
    /// Requests refused before running (invalid, unknown model, unauthorised).
    pub requests_rejected: u64,
    /// Cache hits.
    pub cache_hits: u64,
    /// Cache misses (deterministic requests only).
    pub cache_misses: u64,
    /// Tokens generated.
    pub tokens_generated: u64,
    /// Prefill calls (requests started together).
    pub batches: u64,
    /// Requests started by those calls.
    pub batched_requests: u64,
    /// Requests retried after a stage failed.
    pub retries: u64,
    /// Stage calls served here.
    pub stage_calls: u64,
    /// Seconds spent computing stage forwards here.
    #[serde(default)]
    pub forward_s: f64,
    /// Request latencies: counts per [`LATENCY_BUCKETS`] bound plus an overflow bucket.
    pub latency_counts: Vec<u64>,
    /// Sum of request latencies in seconds.
    pub latency_sum_s: f64,
}

/// Upper bounds (seconds) of the request latency histogram.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// One served model as reported by status.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ModelReport {
    /// Name.
    pub name: String,
    /// `gpt`, `mlp` or `torchscript`.
    pub kind: String,
    /// SHA-256 of the file (hex).
    pub sha256: String,
    /// Whether this node holds the file.
    pub held: bool,
    /// Members that announced holding it.
    pub holders: Vec<String>,
    /// Replica pipelines: each stage as `member[start..end]`.
    pub replicas: Vec<Vec<String>>,
    /// Planning problem, if no plan exists now.
    pub plan_error: Option<String>,
}

/// A job for a stage's thread.
type StageJob<S> = Box<dyn FnOnce(&mut S) + Send>;

/// A stage's own compute thread: its forwards and cache drops run there one after another,
/// on one OS thread that keeps the stage's working set in its core's caches (instead of
/// hopping between the runtime's blocking threads), scheduled as a batch thread (Linux
/// `SCHED_BATCH`: the node's I/O threads preempt it when they wake). The thread ends when
/// the last handle is dropped; a panicking job fails only its own call. Generic over what
/// it owns (a [`Stage`] when serving) so it can be tested alone.
struct StageThread<S: Send + 'static = Stage> {
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

struct Inner {
    me: NodeId,
    dp: DataPlane,
    cfg: ServeConfig,
    models: Mutex<BTreeMap<String, ModelEntry>>,
    /// Stages run here, by model hash.
    stages: Mutex<HashMap<[u8; 32], StageThread>>,
    members: Mutex<(View, HashMap<NodeId, Capabilities>)>,
    plans: Mutex<HashMap<String, PlanState>>,
    suspects: Mutex<HashMap<NodeId, (Instant, coordinator_free::ViewHash)>>,
    cache: Mutex<LruCache<String, Completion>>,
    pool: Mutex<HashMap<NodeId, Vec<Stream>>>,
    /// Slowest recent stage call per member (decaying maximum), seconds.
    call_time: Mutex<HashMap<NodeId, f64>>,
    stats: Mutex<ServeStats>,
    clock: Instant,
}

/// This node's serving side. Cheap to clone.
#[derive(Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

fn hex32(h: &[u8; 32]) -> String {
    hex::encode(h)
}

fn sha256_file(path: &Path) -> std::io::Result<([u8; 32], u64)> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((h.finalize().into(), n))
}

impl Server {
    /// A server for node `me` over its data plane; starts answering stage calls.
    pub fn start(me: NodeId, dp: DataPlane, cfg: ServeConfig) -> Server {
        let cache = LruCache::new(cfg.cache_entries);
        let s = Server {
            inner: Arc::new(Inner {
                me,
                dp: dp.clone(),
                cfg,
                models: Mutex::new(BTreeMap::new()),
                stages: Mutex::new(HashMap::new()),
                members: Mutex::new((View::new(0, vec![]), HashMap::new())),
                plans: Mutex::new(HashMap::new()),
                suspects: Mutex::new(HashMap::new()),
                cache: Mutex::new(cache),
                pool: Mutex::new(HashMap::new()),
                call_time: Mutex::new(HashMap::new()),
                stats: Mutex::new(ServeStats::default()),
                clock: Instant::now(),
            }),
        };
        let mut rx = dp.accept_streams();
        let srv = s.clone();
        tokio::spawn(async move {
            while let Some(stream) = rx.recv().await {
                if stream.service != STAGE_SERVICE {
                    continue;
                }
                let srv = srv.clone();
                tokio::spawn(async move { srv.serve_stream(stream).await });
            }
        });
        s
    }

    /// The settings.
    pub fn config(&self) -> &ServeConfig {
        &self.inner.cfg
    }

    /// Counters.
    pub fn stats(&self) -> ServeStats {
        let mut s = self.inner.stats.lock().unwrap().clone();
        let c = self.inner.cache.lock().unwrap();
        s.cache_hits = c.hits();
        s.cache_misses = c.misses();
        s
    }

    // ------------------------------------------------------------------ models

    /// Offers the model file at `path` under `name`, served with at least `stages`
    /// stages per replica. Returns the announcement to publish.
    pub fn offer(&self, path: &Path, name: &str, stages: u32) -> Result<ServeAnnounce, ServeError> {
        let offer_err = |reason: String| ServeError::Offer {
            path: path.display().to_string(),
            reason,
        };
        let cfg = model::describe(path).map_err(|e| offer_err(e.to_string()))?;
        let (sha256, bytes) = sha256_file(path).map_err(|e| offer_err(e.to_string()))?;
        let config = serde_json::to_string(&cfg).map_err(|e| offer_err(e.to_string()))?;
        let a = ServeAnnounce {
            name: name.to_string(),
            sha256,
            bytes,
            origin: self.inner.me.clone(),
            config,
            stages,
        };
        // The codec's checks (name, sizes) before anything is kept.
        coordinator_free::ControlMessage::Serve(a.clone())
            .encode()
            .and_then(|b| coordinator_free::ControlMessage::decode(&b))
            .map_err(|e| offer_err(e.to_string()))?;
        let mut models = self.inner.models.lock().unwrap();
        if let Some(old) = models.get(name) {
            if old.announce.sha256 != sha256 {
                return Err(offer_err(format!(
                    "another model is already served as `{name}`"
                )));
            }
        }
        let entry = models
            .entry(name.to_string())
            .or_insert_with(|| ModelEntry {
                announce: a.clone(),
                cfg: cfg.clone(),
                path: None,
                holders: HashMap::new(),
                fetching: false,
                dispatcher: None,
            });
        entry.path = Some(path.to_path_buf());
        entry.holders.insert(self.inner.me.clone(), Instant::now());
        tracing::info!(model = name, kind = %cfg.kind, layers = cfg.layers, sha256 = %hex32(&sha256), "serving model");
        Ok(a)
    }

    /// A member announced that it holds a model. Starts fetching it if this node does not
    /// hold it yet.
    pub fn on_announce(&self, a: ServeAnnounce, from: NodeId) {
        let cfg: ModelConfig = match serde_json::from_str(&a.config) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(peer = %from, "ignored model announcement: bad config: {e}");
                return;
            }
        };
        if let Err(e) = cfg.validate() {
            tracing::warn!(peer = %from, "ignored model announcement: {e}");
            return;
        }
        let start_fetch = {
            let mut models = self.inner.models.lock().unwrap();
            let entry = models.entry(a.name.clone()).or_insert_with(|| ModelEntry {
                announce: a.clone(),
                cfg,
                path: None,
                holders: HashMap::new(),
                fetching: false,
                dispatcher: None,
            });
            if entry.announce.sha256 != a.sha256 {
                tracing::warn!(peer = %from, model = %a.name, "ignored announcement of another model under a served name");
                return;
            }
            entry.holders.insert(from, Instant::now());
            let start = entry.path.is_none() && !entry.fetching;
            if start {
                entry.fetching = true;
            }
            start
        };
        if start_fetch {
            let s = self.clone();
            tokio::spawn(async move { s.fetch(a).await });
        }
    }

    /// Announcements of the models this node holds (re-published every 2 s).
    pub fn announcements(&self) -> Vec<ServeAnnounce> {
        self.inner
            .models
            .lock()
            .unwrap()
            .values()
            .filter(|e| e.path.is_some())
            .map(|e| ServeAnnounce {
                origin: self.inner.me.clone(),
                ..e.announce.clone()
            })
            .collect()
    }

    /// The current view and the members' capabilities (from the event loop).
    pub fn set_members(&self, view: View, caps: HashMap<NodeId, Capabilities>) {
        let mut m = self.inner.members.lock().unwrap();
        if m.0.hash != view.hash {
            // Suspicions hold until the view changes.
            self.inner
                .suspects
                .lock()
                .unwrap()
                .retain(|_, (_, h)| *h == view.hash);
        }
        *m = (view, caps);
    }

    /// Fetches a model file from its holders, verifies it and starts holding it.
    async fn fetch(&self, a: ServeAnnounce) {
        let dir = self.inner.cfg.models_dir.clone();
        let dst = dir.join(hex32(&a.sha256));
        let mut attempt = 0u32;
        loop {
            if let Ok((h, _)) = sha256_file(&dst) {
                if h == a.sha256 {
                    break;
                }
            }
            let holders: Vec<NodeId> = {
                let models = self.inner.models.lock().unwrap();
                let Some(e) = models.get(&a.name) else { return };
                let mut v: Vec<NodeId> = e
                    .holders
                    .keys()
                    .filter(|h| **h != self.inner.me)
                    .cloned()
                    .collect();
                v.sort_by_key(|h| *h != a.origin);
                v
            };
            let mut ok = false;
            for h in holders {
                match self.fetch_from(&h, &a, &dir, &dst).await {
                    Ok(()) => {
                        ok = true;
                        break;
                    }
                    Err(e) => tracing::warn!(peer = %h, model = %a.name, "fetch failed: {e}"),
                }
            }
            if ok {
                break;
            }
            attempt += 1;
            let wait = Duration::from_millis(200 * u64::from(attempt.min(10)));
            tokio::time::sleep(wait).await;
        }
        let mut models = self.inner.models.lock().unwrap();
        if let Some(e) = models.get_mut(&a.name) {
            e.path = Some(dst);
            e.fetching = false;
            e.holders.insert(self.inner.me.clone(), Instant::now());
            tracing::info!(model = %a.name, bytes = a.bytes, "model fetched and verified");
        }
    }

    async fn fetch_from(
        &self,
        peer: &NodeId,
        a: &ServeAnnounce,
        dir: &Path,
        dst: &Path,
    ) -> Result<(), String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let tmp = dst.with_extension("part");
        let mut file = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| e.to_string())?;
        let mut h = Sha256::new();
        let mut offset = 0u64;
        while offset < a.bytes {
            let len = FETCH_CHUNK.min(a.bytes - offset);
            let req = StageRequest::Fetch {
                model: a.sha256,
                offset,
                len,
            };
            let (reply, bytes) = self
                .call_remote(peer, &req, &[])
                .await
                .map_err(|e| e.to_string())?;
            match reply {
                StageReply::Ok { .. } if bytes.len() as u64 == len => {}
                StageReply::Ok { .. } => return Err(format!("short chunk at {offset}")),
                StageReply::Err(e) | StageReply::Rejected(e) => return Err(e),
            }
            h.update(&bytes);
            file.write_all(&bytes).await.map_err(|e| e.to_string())?;
            offset += len;
        }
        file.sync_all().await.map_err(|e| e.to_string())?;
        let got: [u8; 32] = h.finalize().into();
        if got != a.sha256 {
            let _ = std::fs::remove_file(&tmp);
            return Err("SHA-256 mismatch".into());
        }
        std::fs::rename(&tmp, dst).map_err(|e| e.to_string())
    }

    /// Models as status reports them.
    pub fn report(&self) -> Vec<ModelReport> {
        let names: Vec<String> = self.inner.models.lock().unwrap().keys().cloned().collect();
        names
            .into_iter()
            .filter_map(|name| {
                let plan = self.plan(&name);
                let models = self.inner.models.lock().unwrap();
                let e = models.get(&name)?;
                let mut holders: Vec<String> = e.holders.keys().map(|h| h.to_string()).collect();
                holders.sort();
                let (replicas, plan_error) = match plan {
                    Ok(p) => (
                        p.replicas
                            .iter()
                            .map(|r| {
                                r.iter()
                                    .map(|s| {
                                        format!(
                                            "{}[{}..{}]",
                                            s.member, s.layers.start, s.layers.end
                                        )
                                    })
                                    .collect()
                            })
                            .collect(),
                        None,
                    ),
                    Err(e) => (vec![], Some(e.to_string())),
                };
                Some(ModelReport {
                    name: name.clone(),
                    kind: e.cfg.kind.clone(),
                    sha256: hex32(&e.announce.sha256),
                    held: e.path.is_some(),
                    holders,
                    replicas,
                    plan_error,
                })
            })
            .collect()
    }

    /// Served models: (name, config).
    pub fn models(&self) -> Vec<(String, ModelConfig)> {
        self.inner
            .models
            .lock()
            .unwrap()
            .iter()
            .map(|(n, e)| (n.clone(), e.cfg.clone()))
            .collect()
    }

    // -------------------------------------------------------------------- plan

    /// The plan for `name` now: members of the view that hold the model and are not
    /// suspected, by announced memory and speed.
    fn plan(&self, name: &str) -> Result<Plan, ServeError> {
        let no_plan = |reason: String| ServeError::NoPlan {
            model: name.to_string(),
            reason,
        };
        let (cfg, holders, stages) = {
            let models = self.inner.models.lock().unwrap();
            let e = models
                .get(name)
                .ok_or_else(|| ServeError::UnknownModel(name.to_string()))?;
            let holders: Vec<NodeId> = e
                .holders
                .iter()
                .filter(|(id, t)| **id == self.inner.me || t.elapsed() < Duration::from_secs(10))
                .map(|(id, _)| id.clone())
                .collect();
            (e.cfg.clone(), holders, e.announce.stages)
        };
        let mut workers: Vec<Worker> = {
            let members = self.inner.members.lock().unwrap();
            let suspects = self.inner.suspects.lock().unwrap();
            let (view, caps) = &*members;
            view.ids()
                .filter(|id| holders.contains(id))
                .filter(|id| {
                    suspects
                        .get(*id)
                        .is_none_or(|(t, _)| t.elapsed() >= SUSPECT_FOR)
                })
                .map(|id| {
                    let c = caps.get(id);
                    Worker {
                        id: id.clone(),
                        // Half the memory is for serving; the rest for everything else.
                        free_bytes: c.map_or(0, |c| c.ram_bytes / 2),
                        speed: f64::from(c.map_or(0, |c| c.speed_mflops).max(1)),
                    }
                })
                .collect()
        };
        workers.sort_by(|a, b| a.id.cmp(&b.id));
        if workers.is_empty() {
            return Err(no_plan("no member in the view holds it yet".into()));
        }
        // Plans change with their inputs only: answer from the last one while they hold
        // (this runs for every request).
        if let Some(st) = self.inner.plans.lock().unwrap().get(name) {
            if st.inputs == workers {
                return Ok(st.plan.clone());
            }
        }
        let layers: Vec<LayerCost> = cfg
            .layer_bytes
            .iter()
            .map(|&bytes| LayerCost { bytes, work: 1 })
            .collect();
        let pcfg = PlanConfig {
            min_stages: stages as usize,
            ..PlanConfig::default()
        };
        let plan = pipeline::plan(&layers, &workers, pcfg).map_err(|e| no_plan(e.to_string()))?;
        let mut plans = self.inner.plans.lock().unwrap();
        let st = plans.entry(name.to_string()).or_insert_with(|| PlanState {
            inputs: Vec::new(),
            plan: plan.clone(),
            balancer: Balancer::new(plan.replicas.len()),
        });
        st.inputs = workers;
        // Keep the balancer while the plan is unchanged.
        if st.plan != plan {
            st.plan = plan.clone();
            st.balancer.reset(plan.replicas.len());
        }
        Ok(plan)
    }

    fn suspect(&self, member: &NodeId) {
        if *member == self.inner.me {
            return;
        }
        let view = self.inner.members.lock().unwrap().0.hash;
        self.inner
            .suspects
            .lock()
            .unwrap()
            .insert(member.clone(), (Instant::now(), view));
    }

    // ------------------------------------------------------------ stage calls

    fn call_bound(&self, peer: &NodeId) -> Duration {
        let slowest = self
            .inner
            .call_time
            .lock()
            .unwrap()
            .get(peer)
            .copied()
            .unwrap_or(0.0);
        self.inner
            .cfg
            .call_floor
            .max(Duration::from_secs_f64(slowest * 10.0))
    }

    fn observe_call(&self, peer: &NodeId, took: Duration) {
        let mut m = self.inner.call_time.lock().unwrap();
        let e = m.entry(peer.clone()).or_insert(0.0);
        *e = took.as_secs_f64().max(0.95 * *e);
    }

    /// One request/response on a pooled stream to `peer`.
    async fn call_remote(
        &self,
        peer: &NodeId,
        req: &StageRequest,
        payload: &[u8],
    ) -> Result<(StageReply, Vec<u8>), ServeError> {
        let fail = |reason: String| ServeError::Stage {
            member: peer.clone(),
            reason,
            rejected: false,
        };
        let meta = req.encode().map_err(|e| fail(e.to_string()))?;
        let pooled = self
            .inner
            .pool
            .lock()
            .unwrap()
            .get_mut(peer)
            .and_then(Vec::pop);
        let mut stream = match pooled {
            Some(s) => s,
            None => self
                .inner
                .dp
                .open_stream(peer, STAGE_SERVICE)
                .await
                .map_err(|e| fail(e.to_string()))?,
        };
        let bound = self.call_bound(peer);
        let started = Instant::now();
        let exchange = async {
            write_frame(&mut stream, &meta, payload).await?;
            read_frame(&mut stream.r).await
        };
        let (meta, bytes) = match tokio::time::timeout(bound, exchange).await {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => return Err(fail(e)),
            Err(_) => return Err(fail(format!("no answer within {bound:?}"))),
        };
        self.observe_call(peer, started.elapsed());
        self.inner
            .dp
            .count_bytes((meta.len() + payload.len()) as u64, bytes.len() as u64);
        let reply = StageReply::decode(&meta).map_err(|e| fail(e.to_string()))?;
        self.inner
            .pool
            .lock()
            .unwrap()
            .entry(peer.clone())
            .or_default()
            .push(stream);
        Ok((reply, bytes))
    }

    /// Answers stage calls on one inbound stream until it closes or idles.
    async fn serve_stream(&self, mut stream: Stream) {
        loop {
            let frame = match tokio::time::timeout(STREAM_IDLE, read_frame(&mut stream.r)).await {
                Ok(Ok(f)) => f,
                Ok(Err(e)) => {
                    if !e.contains("closed") {
                        tracing::debug!(peer = %stream.peer, "stage stream: {e}");
                    }
                    return;
                }
                Err(_) => return,
            };
            let (reply, payload) = match StageRequest::decode(&frame.0) {
                Ok(req) => self.handle_call(req, frame.1).await,
                Err(e) => {
                    tracing::warn!(peer = %stream.peer, "bad stage request: {e}");
                    (StageReply::Err(format!("bad request: {e}")), Vec::new())
                }
            };
            let meta = match reply.encode() {
                Ok(m) => m,
                Err(e) => StageReply::Err(e.to_string()).encode().unwrap_or_default(),
            };
            if write_frame(&mut stream, &meta, &payload).await.is_err() {
                return;
            }
        }
    }

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
        let stage = Stage::open(&path, cfg).map_err(|e| e.to_string())?;
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

    fn model_path(&self, model: &[u8; 32]) -> Option<PathBuf> {
        self.inner
            .models
            .lock()
            .unwrap()
            .values()
            .find(|e| &e.announce.sha256 == model)
            .and_then(|e| e.path.clone())
    }

    /// Runs one stage request here.
    async fn handle_call(&self, req: StageRequest, payload: Vec<u8>) -> (StageReply, Vec<u8>) {
        self.inner.stats.lock().unwrap().stage_calls += 1;
        match req {
            StageRequest::Drop { rows } => {
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
            StageRequest::Fetch { model, offset, len } => {
                let Some(path) = self.model_path(&model) else {
                    return (StageReply::Err("model not held here".into()), vec![]);
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
            } => {
                let stage = match self.stage_for(&model) {
                    Ok(s) => s,
                    Err(e) => return (StageReply::Err(e), vec![]),
                };
                let stats = self.clone();
                let run = stage
                    .run(move |st| {
                        let t = Instant::now();
                        let r = st.forward(
                            &rows,
                            start as usize..end as usize,
                            prefill,
                            &pad,
                            input,
                            &shape,
                            &payload,
                            output,
                        );
                        stats.inner.stats.lock().unwrap().forward_s += t.elapsed().as_secs_f64();
                        r
                    })
                    .await;
                match run {
                    Ok(Ok((payload, shape, bytes))) => (StageReply::Ok { payload, shape }, bytes),
                    Ok(Err(e @ model::ServeModelError::Request(_))) => {
                        (StageReply::Rejected(e.to_string()), vec![])
                    }
                    Ok(Err(e)) => (StageReply::Err(e.to_string()), vec![]),
                    Err(e) => (StageReply::Err(e), vec![]),
                }
            }
        }
    }

    /// One stage call, here or on a member. Returns the output and its shape.
    async fn call_stage(
        &self,
        member: &NodeId,
        req: StageRequest,
        payload: Vec<u8>,
    ) -> Result<(Vec<u32>, Vec<u8>), ServeError> {
        let (reply, bytes) = if *member == self.inner.me {
            self.handle_call(req, payload).await
        } else {
            self.call_remote(member, &req, &payload).await?
        };
        match reply {
            StageReply::Ok { payload, shape } => {
                if wire::expected_bytes(payload, &shape) != Some(bytes.len() as u64) {
                    return Err(ServeError::Stage {
                        member: member.clone(),
                        reason: format!(
                            "answer of {} bytes for {payload:?} {shape:?}",
                            bytes.len()
                        ),
                        rejected: false,
                    });
                }
                Ok((shape, bytes))
            }
            StageReply::Err(reason) => Err(ServeError::Stage {
                member: member.clone(),
                rejected: false,
                reason,
            }),
            StageReply::Rejected(reason) => Err(ServeError::Stage {
                member: member.clone(),
                rejected: true,
                reason,
            }),
        }
    }

    /// Runs `input` (of `shape`, `[rows, ...]`) through every stage of `replica`: each
    /// stage takes the previous one's answer. For a `gpt`, a prefill of left-padded
    /// prompts or one decode token per row.
    #[allow(clippy::too_many_arguments)]
    async fn through(
        &self,
        model: [u8; 32],
        replica: &[pipeline::Stage],
        rows: &[u64],
        prefill: bool,
        pad: &[u32],
        mut input: (Payload, Vec<u8>),
        mut shape: Vec<u32>,
        last: Payload,
    ) -> Result<(Vec<u32>, Vec<u8>), ServeError> {
        let n = replica.len();
        for (i, s) in replica.iter().enumerate() {
            let output = if i + 1 == n { last } else { Payload::Hidden };
            let req = StageRequest::Forward {
                model,
                rows: rows.to_vec(),
                start: s.layers.start as u32,
                end: s.layers.end as u32,
                shape: std::mem::take(&mut shape),
                prefill,
                pad: pad.to_vec(),
                input: input.0,
                output,
            };
            let (sh, out) = self
                .call_stage(&s.member, req, std::mem::take(&mut input.1))
                .await?;
            shape = sh;
            input = (output, out);
        }
        Ok((shape, input.1))
    }

    /// Forgets `rows`' caches on every stage of `replica` (in the background).
    fn drop_rows(&self, replica: &[pipeline::Stage], rows: Vec<u64>) {
        if rows.is_empty() {
            return;
        }
        for s in replica {
            let srv = self.clone();
            let member = s.member.clone();
            let rows = rows.clone();
            tokio::spawn(async move {
                let _ = srv
                    .call_stage(&member, StageRequest::Drop { rows }, vec![])
                    .await;
            });
        }
    }

    // -------------------------------------------------------------- completions

    fn model_for_request(&self, name: &str) -> Result<(ServeAnnounce, ModelConfig), ServeError> {
        let models = self.inner.models.lock().unwrap();
        let e = models
            .get(name)
            .ok_or_else(|| ServeError::UnknownModel(name.to_string()))?;
        Ok((e.announce.clone(), e.cfg.clone()))
    }

    /// Checks a completion request and queues it. The result arrives on `sink`.
    fn admit(
        &self,
        model: &str,
        prompt: &str,
        mut sampling: Sampling,
        timeout: Option<Duration>,
        sink: Sink,
    ) -> Result<(), (ServeError, Sink)> {
        let checked = (|| {
            let (_, cfg) = self.model_for_request(model)?;
            if !cfg.is_lm() {
                return Err(ServeError::Invalid(format!(
                    "`{model}` is a `{}` model: use /v1/infer",
                    cfg.kind
                )));
            }
            let p = prompt.as_bytes();
            if p.is_empty() {
                return Err(ServeError::Invalid("the prompt is empty".into()));
            }
            if p.len() >= cfg.context as usize {
                return Err(ServeError::Invalid(format!(
                    "the prompt is {} tokens; this model's context is {} tokens (the prompt must leave room for at least one more)",
                    p.len(),
                    cfg.context
                )));
            }
            Ok(())
        })();
        if let Err(e) = checked {
            self.inner.stats.lock().unwrap().requests_rejected += 1;
            return Err((e, sink));
        }
        if !sampling.seeded {
            sampling.seed = rand::random();
        }
        let deterministic = sampling.temperature <= 0.0 || sampling.seeded;
        let cache_key = deterministic.then(|| {
            format!(
                "{model}\u{0}{prompt}\u{0}{}\u{0}{}\u{0}{}\u{0}{}\u{0}{:?}",
                sampling.max_tokens,
                if sampling.temperature <= 0.0 {
                    0
                } else {
                    sampling.temperature.to_bits()
                },
                if sampling.temperature <= 0.0 {
                    0
                } else {
                    sampling.top_p.to_bits()
                },
                if sampling.temperature <= 0.0 {
                    0
                } else {
                    sampling.seed
                },
                sampling.stop
            )
        });
        if let Some(k) = &cache_key {
            let hit = self.inner.cache.lock().unwrap().get(k);
            if let Some(mut c) = hit {
                c.cached = true;
                let mut st = self.inner.stats.lock().unwrap();
                st.requests_ok += 1;
                record_latency(&mut st, 0.0);
                drop(st);
                match sink {
                    Sink::Once(tx) => {
                        let _ = tx.send(Ok(c));
                    }
                    Sink::Stream(tx) => {
                        let _ = tx.try_send(StreamEvent::Text(c.text.clone()));
                        let _ = tx.try_send(StreamEvent::Done(c));
                    }
                    Sink::Closed => {}
                }
                return Ok(());
            }
        }
        let now = Instant::now();
        let limit = timeout
            .unwrap_or(self.inner.cfg.request_timeout)
            .min(self.inner.cfg.request_timeout);
        let row = Row::new(Pending {
            prompt: prompt.as_bytes().to_vec(),
            sampling,
            deadline: now + limit,
            started: now,
            sink,
            cache_key,
        });
        let tx = self.dispatcher_for(model);
        if let Err(mpsc::error::TrySendError::Full(r) | mpsc::error::TrySendError::Closed(r)) =
            tx.try_send(row)
        {
            self.inner.stats.lock().unwrap().requests_rejected += 1;
            return Err((
                ServeError::NoPlan {
                    model: model.to_string(),
                    reason: "too many requests queued".into(),
                },
                r.p.sink,
            ));
        }
        Ok(())
    }

    /// Completes `prompt` (not streamed).
    pub async fn complete(
        &self,
        model: &str,
        prompt: &str,
        sampling: Sampling,
        timeout: Option<Duration>,
    ) -> Result<Completion, ServeError> {
        let (tx, rx) = oneshot::channel();
        if let Err((e, _)) = self.admit(model, prompt, sampling, timeout, Sink::Once(tx)) {
            return Err(e);
        }
        rx.await
            .unwrap_or_else(|_| Err(ServeError::Invalid("the request was dropped".into())))
    }

    /// Completes `prompt`, streaming text as it is generated.
    pub fn complete_stream(
        &self,
        model: &str,
        prompt: &str,
        sampling: Sampling,
        timeout: Option<Duration>,
    ) -> Result<mpsc::Receiver<StreamEvent>, ServeError> {
        let (tx, rx) = mpsc::channel(1024);
        self.admit(model, prompt, sampling, timeout, Sink::Stream(tx))
            .map_err(|(e, _)| e)?;
        Ok(rx)
    }

    /// The queue of `model`'s dispatcher (started on first use).
    fn dispatcher_for(&self, model: &str) -> mpsc::Sender<Row> {
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
                        let load = Arc::new(std::sync::atomic::AtomicUsize::new(0));
                        let srv = self.clone();
                        let (m, r, q) = (model.clone(), replica.clone(), requeue.clone());
                        tokio::spawn(async move { srv.lane(m, r, rx, q).await });
                        Lane { tx, load }
                    })
                    .collect()
            });
            let lane = group
                .iter()
                .min_by_key(|l| l.load.load(std::sync::atomic::Ordering::SeqCst))
                .expect("at least one lane");
            lane.load.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
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
        let max_batch = self.inner.cfg.max_batch.max(1);
        let Ok((a, cfg)) = self.model_for_request(&model) else {
            return;
        };
        let mut active: Vec<Row> = Vec::new();
        loop {
            // Newcomers: wait for the first when idle (and a little for others to batch
            // with), take whoever is queued otherwise.
            let mut fresh: Vec<Row> = Vec::new();
            if active.is_empty() {
                let first = match tokio::time::timeout(Duration::from_secs(30), rx.recv()).await {
                    Ok(Some(r)) => r,
                    Ok(None) => return,
                    Err(_) => {
                        if rx.is_closed() || rx.is_empty() && self.replica_gone(&model, &replica) {
                            return;
                        }
                        continue;
                    }
                };
                let mut batcher = Batcher::new(BatchConfig {
                    max_batch,
                    max_wait_ms: self.inner.cfg.max_wait_ms,
                });
                batcher.handle_request(first, self.now_ms());
                loop {
                    if let Some(b) = batcher.poll_batch(self.now_ms()) {
                        fresh = b;
                        break;
                    }
                    let due = batcher.poll_timeout().expect("not empty");
                    let at = self.inner.clock + Duration::from_millis(due);
                    tokio::select! {
                        r = rx.recv() => match r {
                            Some(r) => batcher.handle_request(r, self.now_ms()),
                            None => {
                                fresh = batcher.poll_batch(u64::MAX).unwrap_or_default();
                                break;
                            }
                        },
                        _ = tokio::time::sleep_until(at.into()) => {}
                    }
                }
            } else {
                while active.len() + fresh.len() < max_batch {
                    match rx.try_recv() {
                        Ok(r) => fresh.push(r),
                        Err(_) => break,
                    }
                }
            }
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
                let rejected = matches!(e, ServeError::Stage { rejected: true, .. })
                    || matches!(e, ServeError::Invalid(_) | ServeError::UnknownModel(_));
                tracing::warn!(model, "lane failed ({e}); its requests are retried");
                if let ServeError::Stage { member, .. } = &e {
                    if !rejected {
                        self.suspect(member);
                    }
                }
                let rows: Vec<Row> = active.drain(..).chain(fresh.drain(..)).collect();
                self.drop_rows(&replica, rows.iter().map(|r| r.id).collect());
                for mut r in rows {
                    r.slot = None;
                    if r.done {
                        continue;
                    }
                    if rejected {
                        r.fail(ServeError::Invalid(e.to_string()), &self);
                        continue;
                    }
                    self.inner.stats.lock().unwrap().retries += 1;
                    r.restart();
                    let _ = requeue.send(r).await;
                }
                if self.replica_gone(&model, &replica) {
                    return;
                }
            }
        }
    }

    /// Whether `replica` is no longer in the model's plan.
    fn replica_gone(&self, model: &str, replica: &[pipeline::Stage]) -> bool {
        match self.plan(model) {
            Ok(p) => !p.replicas.iter().any(|r| r.as_slice() == replica),
            Err(_) => true,
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
        let vocab = model::VOCAB as usize;
        let logits_of = |shape: &[u32], bytes: &[u8], b: usize| -> Result<Vec<f32>, ServeError> {
            if shape != [b as u32, model::VOCAB] {
                return Err(ServeError::Stage {
                    member: replica.last().expect("stages").member.clone(),
                    reason: format!("logits of shape {shape:?}"),
                    rejected: false,
                });
            }
            Ok(bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect())
        };
        let now = Instant::now();
        for r in active.iter_mut().chain(fresh.iter_mut()) {
            if now >= r.p.deadline {
                r.fail(ServeError::Deadline(r.p.deadline - r.p.started), self);
            }
        }
        fresh.retain(|r| !r.done);
        if !fresh.is_empty() {
            {
                let mut st = self.inner.stats.lock().unwrap();
                st.batches += 1;
                st.batched_requests += fresh.len() as u64;
            }
            let l = fresh.iter().map(|r| r.p.prompt.len()).max().expect("rows") as u32;
            let pad: Vec<u32> = fresh.iter().map(|r| l - r.p.prompt.len() as u32).collect();
            let mut tokens = Vec::with_capacity(fresh.len() * l as usize * 8);
            for r in fresh.iter() {
                for _ in 0..(l as usize - r.p.prompt.len()) {
                    tokens.extend_from_slice(&0i64.to_le_bytes());
                }
                for &t in &r.p.prompt {
                    tokens.extend_from_slice(&i64::from(t).to_le_bytes());
                }
            }
            let ids: Vec<u64> = fresh.iter().map(|r| r.id).collect();
            let (shape, bytes) = self
                .through(
                    a.sha256,
                    replica,
                    &ids,
                    true,
                    &pad,
                    (Payload::Tokens, tokens),
                    vec![ids.len() as u32, l],
                    Payload::LastLogits,
                )
                .await?;
            let logits = logits_of(&shape, &bytes, fresh.len())?;
            for (i, mut r) in fresh.drain(..).enumerate() {
                let full = r.p.prompt.len() as u32 + 1 >= cfg.context;
                r.next = r.step(&logits[i * vocab..(i + 1) * vocab], full, self);
                active.push(r);
            }
        }
        // Rows that finished on their first token leave before decoding.
        let live: Vec<usize> = (0..active.len()).filter(|&i| !active[i].done).collect();
        if live.is_empty() {
            return Ok(());
        }
        let ids: Vec<u64> = live.iter().map(|&i| active[i].id).collect();
        let mut tokens = Vec::with_capacity(live.len() * 8);
        for &i in &live {
            tokens.extend_from_slice(&i64::from(active[i].next).to_le_bytes());
        }
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
                Payload::LastLogits,
            )
            .await?;
        let logits = logits_of(&shape, &bytes, live.len())?;
        for (j, &i) in live.iter().enumerate() {
            let r = &mut active[i];
            // The row now holds prompt + generated tokens; the next one must still fit.
            let full = (r.p.prompt.len() + r.out_len() + 1) as u32 >= cfg.context;
            r.next = r.step(&logits[j * vocab..(j + 1) * vocab], full, self);
        }
        Ok(())
    }

    /// Records a finished request.
    fn finish(&self, p: &Pending, c: &Completion) {
        if let Some(k) = &p.cache_key {
            self.inner.cache.lock().unwrap().put(k.clone(), c.clone());
        }
        let mut st = self.inner.stats.lock().unwrap();
        st.requests_ok += 1;
        st.tokens_generated += u64::from(c.completion_tokens);
        record_latency(&mut st, p.started.elapsed().as_secs_f64());
    }

    // ------------------------------------------------------------------- infer

    /// Runs a generic forward through the model's pipeline: f32 inputs (`mlp`,
    /// TorchScript) or token ids (`gpt`, answering logits of every position).
    pub async fn infer(
        &self,
        model: &str,
        shape: Vec<u32>,
        data: Vec<f32>,
    ) -> Result<(Vec<u32>, Vec<f32>), ServeError> {
        let (a, cfg) = self.model_for_request(model)?;
        let deadline = Instant::now() + self.inner.cfg.request_timeout;
        if shape.is_empty() || shape.len() > 4 || shape.contains(&0) {
            return Err(ServeError::Invalid(format!("input shape {shape:?}")));
        }
        let input = if cfg.is_lm() {
            if shape.len() != 2 || shape[1] > cfg.context {
                return Err(ServeError::Invalid(format!(
                    "a gpt takes token ids [batch, len ≤ {}]",
                    cfg.context
                )));
            }
            let mut b = Vec::with_capacity(data.len() * 8);
            for &t in &data {
                if !(0.0..256.0).contains(&t) || t.fract() != 0.0 {
                    return Err(ServeError::Invalid(format!("token id {t} is not a byte")));
                }
                b.extend_from_slice(&(t as i64).to_le_bytes());
            }
            (Payload::Tokens, b)
        } else {
            let b = data.iter().flat_map(|f| f.to_le_bytes()).collect();
            (Payload::Hidden, b)
        };
        if wire::expected_bytes(input.0, &shape) != Some(input.1.len() as u64) {
            return Err(ServeError::Invalid(format!(
                "{} values for shape {shape:?}",
                data.len()
            )));
        }
        let batch = shape[0] as usize;
        loop {
            let plan = self.plan(model)?;
            let replica = plan.replicas[0].clone();
            let rows: Vec<u64> = (0..batch).map(|_| rand::random()).collect();
            let r = self
                .through(
                    a.sha256,
                    &replica,
                    &rows,
                    true,
                    &vec![0; batch],
                    input.clone(),
                    shape.clone(),
                    Payload::Logits,
                )
                .await;
            if cfg.is_lm() {
                self.drop_rows(&replica, rows);
            }
            match r {
                Ok((shape, out)) => {
                    let v = out
                        .chunks_exact(4)
                        .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                        .collect();
                    return Ok((shape, v));
                }
                Err(ServeError::Stage {
                    rejected: true,
                    reason,
                    ..
                }) => return Err(ServeError::Invalid(reason)),
                Err(e) => {
                    if let ServeError::Stage { member, .. } = &e {
                        self.suspect(member);
                    }
                    if Instant::now() >= deadline {
                        return Err(e);
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

fn record_latency(st: &mut ServeStats, took: f64) {
    if st.latency_counts.len() != LATENCY_BUCKETS.len() + 1 {
        st.latency_counts = vec![0; LATENCY_BUCKETS.len() + 1];
    }
    let i = LATENCY_BUCKETS
        .iter()
        .position(|&b| took <= b)
        .unwrap_or(LATENCY_BUCKETS.len());
    st.latency_counts[i] += 1;
    st.latency_sum_s += took;
}

/// One request in a lane: its sampling state and how much of it was streamed.
struct Row {
    p: Pending,
    /// The row's id on the stages (KV caches); a new one for every attempt.
    id: u64,
    /// The token to feed at the next decode step.
    next: u8,
    out: Vec<u8>,
    /// Tokens already sent to a streaming client (a retry skips them).
    streamed: usize,
    /// Bytes of text already sent (UTF-8 boundaries).
    sent_text: usize,
    rng: SplitMix64,
    /// Tokens generated in this attempt.
    generated: usize,
    done: bool,
    /// Its place in the lane it was dispatched to (released when answered).
    slot: Option<LaneSlot>,
}

impl Row {
    fn new(p: Pending) -> Row {
        let rng = SplitMix64::new(p.sampling.seed);
        Row {
            p,
            id: rand::random(),
            next: 0,
            generated: 0,
            out: Vec::new(),
            streamed: 0,
            sent_text: 0,
            rng,
            done: false,
            slot: None,
        }
    }

    /// A fresh attempt: the same seed, the same tokens.
    fn restart(&mut self) {
        self.id = rand::random();
        self.generated = 0;
        self.out.clear();
        self.rng = SplitMix64::new(self.p.sampling.seed);
    }

    /// Takes the next token from `logits` (a finished row takes a filler token and
    /// stays finished). `full`: the batch has filled the context.
    fn step(&mut self, logits: &[f32], full: bool, srv: &Server) -> u8 {
        if self.done {
            return 0;
        }
        let s = &self.p.sampling;
        let u = if s.temperature > 0.0 {
            self.rng.next_f64()
        } else {
            0.0
        };
        let t = coordinator_free::serving::sample_token(logits, s.temperature, s.top_p, u) as u8;
        self.out.push(t);
        self.generated += 1;
        // Stop sequences end the text before them.
        let mut finish = None;
        let text_len = self.out.len();
        for stop in &s.stop {
            if stop.is_empty() {
                continue;
            }
            if let Some(i) = find(&self.out, stop.as_bytes()) {
                self.out.truncate(i);
                finish = Some("stop");
                break;
            }
        }
        if finish.is_none() && (text_len >= s.max_tokens as usize || full) {
            finish = Some("length");
        }
        // Stream what is safe to send: never bytes that may start a stop sequence, and
        // only whole UTF-8 characters; a retry skips what was sent.
        if let Sink::Stream(tx) = &self.p.sink {
            let hold = if finish.is_some() {
                0
            } else {
                s.stop
                    .iter()
                    .map(|st| partial_suffix(&self.out, st.as_bytes()))
                    .max()
                    .unwrap_or(0)
            };
            let safe = utf8_safe(&self.out[..self.out.len() - hold], finish.is_some());
            if safe > self.sent_text && self.out.len() > self.streamed {
                let text = String::from_utf8_lossy(&self.out[self.sent_text..safe]).into_owned();
                let _ = tx.try_send(StreamEvent::Text(text));
                self.sent_text = safe;
            }
            self.streamed = self.streamed.max(self.out.len());
        }
        if let Some(reason) = finish {
            let c = Completion {
                text: String::from_utf8_lossy(&self.out).into_owned(),
                finish_reason: reason.into(),
                prompt_tokens: self.p.prompt.len() as u32,
                completion_tokens: text_len as u32,
                cached: false,
            };
            srv.finish(&self.p, &c);
            self.done = true;
            self.slot = None;
            match &self.p.sink {
                Sink::Once(_) => {
                    if let Sink::Once(tx) = std::mem::replace(&mut self.p.sink, Sink::Closed) {
                        let _ = tx.send(Ok(c));
                    }
                }
                Sink::Stream(tx) => {
                    let _ = tx.try_send(StreamEvent::Done(c));
                }
                Sink::Closed => {}
            }
        }
        t
    }

    /// Tokens generated in this attempt (before any stop sequence cut the text).
    fn out_len(&self) -> usize {
        self.generated
    }

    fn fail(&mut self, e: ServeError, srv: &Server) {
        if self.done {
            return;
        }
        self.done = true;
        self.slot = None;
        srv.inner.stats.lock().unwrap().requests_failed += 1;
        match std::mem::replace(&mut self.p.sink, Sink::Closed) {
            Sink::Once(tx) => {
                let _ = tx.send(Err(e));
            }
            Sink::Stream(tx) => {
                let _ = tx.try_send(StreamEvent::Failed(e));
            }
            Sink::Closed => {}
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Length of the longest suffix of `out` that is a proper prefix of `stop`.
fn partial_suffix(out: &[u8], stop: &[u8]) -> usize {
    (1..stop.len().min(out.len() + 1))
        .rev()
        .find(|&k| out[out.len() - k..] == stop[..k])
        .unwrap_or(0)
}

/// How many leading bytes of `b` end on a UTF-8 character boundary (all of them when
/// `finished`: the rest is sent lossily).
fn utf8_safe(b: &[u8], finished: bool) -> usize {
    if finished {
        return b.len();
    }
    match std::str::from_utf8(b) {
        Ok(_) => b.len(),
        Err(e) if e.error_len().is_none() => e.valid_up_to(),
        Err(_) => b.len(),
    }
}

// --------------------------------------------------------------------- framing

async fn write_frame(s: &mut Stream, meta: &[u8], payload: &[u8]) -> Result<(), String> {
    // One buffer, one write: a frame is small next to a syscall per piece.
    let mut buf = Vec::with_capacity(12 + meta.len() + payload.len());
    buf.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    buf.extend_from_slice(meta);
    buf.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    buf.extend_from_slice(payload);
    let io = |e: std::io::Error| e.to_string();
    s.w.write_all(&buf).await.map_err(io)?;
    s.w.flush().await.map_err(io)
}

/// Reads one stage frame (`[meta len][meta][payload len][payload]`): both lengths checked
/// against their limits before anything is allocated, and the payload buffer grows only
/// as bytes arrive. Returns the meta and payload bytes. Fuzzed by `fuzz/`.
pub async fn read_frame<R: tokio::io::AsyncRead + Unpin + ?Sized>(
    r: &mut R,
) -> Result<(Vec<u8>, Vec<u8>), String> {
    let io = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            "stream closed".to_string()
        } else {
            e.to_string()
        }
    };
    let mut p4 = [0u8; 4];
    r.read_exact(&mut p4).await.map_err(io)?;
    let n = wire::meta_len(p4).map_err(|e| e.to_string())?;
    let mut meta = vec![0u8; n];
    r.read_exact(&mut meta).await.map_err(io)?;
    let mut p8 = [0u8; 8];
    r.read_exact(&mut p8).await.map_err(io)?;
    let n = wire::payload_len(p8).map_err(|e| e.to_string())?;
    let mut payload = Vec::with_capacity((n as usize).min(1 << 20));
    r.take(n).read_to_end(&mut payload).await.map_err(io)?;
    if payload.len() as u64 != n {
        return Err("stream closed".into());
    }
    Ok((meta, payload))
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
