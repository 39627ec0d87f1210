//! Serving: models offered to the swarm, cut into pipeline stages across members, and
//! answered through an OpenAI-compatible HTTP API on every node.
//!
//! - **Offer.** `shoal serve MODEL` hands a model file to a node ([`Server::offer`]); the
//!   node announces it ([`ControlMessage::Serve`]) every 2 s. Every member that hears of a
//!   model fetches the file over the data plane (from any member that announced it),
//!   checks its SHA-256 and from then on announces it too: an announcement means "I hold
//!   this model". A Hugging Face folder travels as its [`manifest`]: the announced hash
//!   is the manifest's, and a member fetches the manifest, then each file by its own
//!   hash, and assembles the folder under its models dir.
//! - **Plan.** Any node that receives a request plans on its own, from the view, the
//!   members that hold the model and their announced memory and speed (their compute
//!   device's free memory when announced, and the matmul speed measured on it;
//!   `coordinator_free::pipeline`): no coordinator, and every node derives the same plan
//!   from the same view. Members a stage call just failed on are left out until the view
//!   changes (or 10 s pass).
//! - **Execute** ([`crate::models::stage::StageExecutor`]). The entry node (the one the request reached) sends
//!   each request to the replica with the fewest outstanding requests, into one of its
//!   lanes (micro-batches: one more than its stages, `pipeline::lanes`, so stages work on
//!   different lanes' rows at once and the next is waiting when one moves on). A lane batches
//!   continuously: every iteration starts the requests that arrived (prefill calls of at
//!   most `prefill_tokens`, prompts left-padded; an idle lane waits up to `max_wait_ms`
//!   for up to `max_batch`) and adds one token to every running request (one decode
//!   call), over data-plane streams, stage after stage; requests join and leave between
//!   iterations. The last stage samples each row's next token (with the request's
//!   parameters and the next draw of its seeded generator) and answers only the tokens
//!   and the logprobs asked for, not the logits. Each stage
//!   keeps the KV cache of its layers per request row. Stages compute on the node's
//!   device ([`ServeConfig::device`], from `shoal up --device`); the bytes exchanged are
//!   decoded and encoded on the CPU.
//! - **Failover.** Every request gets a seed on arrival, so a retry reproduces its tokens:
//!   when a stage call fails, the lane's requests go back to the dispatcher, which
//!   re-plans without that member, until each request's deadline; tokens already
//!   streamed are not sent again.
//! - **Cache.** Deterministic requests (temperature 0, or a seed given) are answered from
//!   an LRU cache of complete responses.
//!
//! Where each part lives (every file adds an `impl Server` block for its part):
//! - this file: [`Server`], its shared state `Inner` (and the order its locks are taken
//!   in), settings, errors and the public types;
//! - `registry`: the models this node knows of: offers, announcements, fetching a file
//!   from its holders and checking its SHA-256, status reports;
//! - `plan`: the plan the entry derives for a model (`coordinator_free::pipeline`), the
//!   members it leaves out after a failed call, and re-planning when the view changes;
//! - `executor`: the stages run here (one compute thread each) and the stage calls this
//!   node answers (forward, drop caches, file chunks);
//! - `stage_rpc`: the stage-call RPC over the data plane (pooled streams, per-peer bounds)
//!   and its framing, and running a batch through every stage of a replica;
//! - `completions`: admitting a completion request, the response cache, recording results;
//! - `lanes`: the completions engine: per-model dispatcher, per-replica lanes, continuous
//!   batching (prefill, decode), retries after a failed stage;
//! - `row`: one request inside a lane: sampling its tokens, stop sequences and streaming
//!   (the decisions themselves are `coordinator_free::stop` and `coordinator_free::serving`);
//! - [`logprobs`]: the log-probabilities a request may ask of its tokens (computed by its
//!   row from the logits it samples from), their parameters and their OpenAI formats;
//! - `infer`: `/v1/infer`, a plain forward through the pipeline;
//! - [`http`]: the OpenAI-compatible routes; the stage computation itself is in [`crate::models`].

mod chat;
mod completions;
mod executor;
pub mod http;
mod infer;
mod lanes;
pub mod logprobs;
pub mod manifest;
mod plan;
mod registry;
mod row;
mod sample;
mod stage_rpc;

pub use coordinator_free::serving::Sampling;
pub use logprobs::{TokenLogprob, TopLogprob};
pub use stage_rpc::read_frame;

use crate::data_plane::DataPlane;
use coordinator_free::serving::LruCache;
use coordinator_free::NodeId;
use executor::StageThread;
use plan::{PlanState, ViewState};
use registry::ModelEntry;
use stage_rpc::PeerCalls;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    /// Most prompt tokens (rows × the longest prompt) in one prefill call
    /// (`coordinator_free::serving::prefill_groups`): a batch of long prompts is started
    /// in several calls, so that the other lanes' calls do not wait behind one that holds
    /// the stage for seconds. Default: 1024 (8 prompts of up to 128 tokens in one call).
    pub prefill_tokens: usize,
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
    /// Where stages compute: their weights and KV caches live there, payloads move there
    /// and results come back to the CPU. `node::run` sets it from the node's
    /// [`crate::node::NodeConfig::device`] (`shoal up --device`). Default: the CPU.
    pub device: tch::Device,
}

impl ServeConfig {
    /// Defaults, with model files under `data_dir/models`.
    pub fn new(data_dir: &Path) -> ServeConfig {
        ServeConfig {
            max_batch: 8,
            max_wait_ms: 5,
            prefill_tokens: 1024,
            cache_entries: 1024,
            request_timeout: Duration::from_secs(60),
            api_token: None,
            models_dir: data_dir.join("models"),
            call_floor: Duration::from_secs(3),
            max_body: 8 << 20,
            threads: 0,
            device: tch::Device::Cpu,
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

/// A completion's prompt.
#[derive(Clone, Debug, PartialEq)]
pub enum Prompt {
    /// Text, for a byte-level model (`gpt`: one token per byte) or an `hf` folder with a
    /// `tokenizer.json` (encoded by it).
    Text(String),
    /// Token ids of the model's vocabulary (any language model; an `hf` folder without a
    /// tokenizer takes only these).
    Tokens(Vec<u32>),
}

/// A finished completion.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Completion {
    /// Generated text (lossy UTF-8 of the generated bytes of a byte-level model; empty for
    /// a model whose tokens are not bytes: see `tokens`).
    pub text: String,
    /// The generated token ids (a byte-level model's: the bytes of `text`), cut before a
    /// stop sequence like `text`.
    pub tokens: Vec<u32>,
    /// `stop` or `length`.
    pub finish_reason: String,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Generated tokens.
    pub completion_tokens: u32,
    /// Whether it came from the cache.
    pub cached: bool,
    /// When the request asked for logprobs: one entry per token of `tokens`, in order
    /// ([`logprobs`]); otherwise empty.
    pub logprobs: Vec<TokenLogprob>,
}

/// What a streaming request receives.
#[derive(Debug)]
pub enum StreamEvent {
    /// More of the completion: its text (empty for a model whose tokens are not bytes)
    /// and the token ids it is made of.
    Text {
        /// The text.
        text: String,
        /// The tokens.
        tokens: Vec<u32>,
        /// Their logprobs, one per token, when the request asked for them (else empty).
        logprobs: Vec<TokenLogprob>,
    },
    /// The end.
    Done(Completion),
    /// A failure (the stream ends).
    Failed(ServeError),
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
    /// Request latencies: counts per [`crate::metrics::REQUEST_LATENCY`] bound plus an
    /// overflow bucket.
    pub latency_counts: Vec<u64>,
    /// Sum of request latencies in seconds.
    pub latency_sum_s: f64,
}

/// One served model as reported by status.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct ModelReport {
    /// Name.
    pub name: String,
    /// `gpt`, `hf`, `mlp` or `torchscript`.
    pub kind: String,
    /// SHA-256 of the file, or of an `hf` folder's manifest (hex).
    pub sha256: String,
    /// Whether this node holds the file.
    pub held: bool,
    /// Members that announced holding it.
    pub holders: Vec<String>,
    /// Work per second each holder measured computing its stages of it (the planner's
    /// unit); a holder that has computed none yet is absent.
    #[serde(default)]
    pub measured: std::collections::BTreeMap<String, u64>,
    /// Replica pipelines: each stage as `member[start..end]`.
    pub replicas: Vec<Vec<String>>,
    /// Planning problem, if no plan exists now.
    pub plan_error: Option<String>,
}

/// The serving side's shared state.
///
/// **Locks.** Each mutex guards one part and is held briefly: never across an `.await`,
/// never while calling into another part. No code path holds two at once today; a path
/// that must do so takes them in this order (the fields' order):
/// `models` → `stages` → `view` → `plans` → `peers` → `cache` → `stats`.
/// Dropping a lane's row gives its `lanes::LaneSlot` back, which takes `plans`: never
/// drop a row (or a channel holding rows) while holding `plans`. Parts always used
/// together share one mutex: the view with the suspected members (`view`), the pooled
/// streams with the call times (`peers`).
struct Inner {
    me: NodeId,
    dp: DataPlane,
    cfg: ServeConfig,
    /// Models this node knows of, by name.
    models: Mutex<BTreeMap<String, ModelEntry>>,
    /// Stages run here, by model hash.
    stages: Mutex<HashMap<[u8; 32], StageThread>>,
    /// The view, the members' capabilities and the members suspected in it.
    view: Mutex<ViewState>,
    /// Each model's current plan and replica balance, by name.
    plans: Mutex<HashMap<String, PlanState>>,
    /// Pooled stage streams and recent call times, per member.
    peers: Mutex<PeerCalls>,
    /// Complete responses of deterministic requests, by [`Sampling::cache_key`].
    cache: Mutex<LruCache<String, Completion>>,
    stats: Mutex<ServeStats>,
    /// The origin of the lanes' batching clock (`now_ms`).
    clock: Instant,
}

/// This node's serving side. Cheap to clone.
#[derive(Clone)]
pub struct Server {
    inner: Arc<Inner>,
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
                view: Mutex::new(ViewState::default()),
                plans: Mutex::new(HashMap::new()),
                peers: Mutex::new(PeerCalls::default()),
                cache: Mutex::new(cache),
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
}

/// Counts one request that took `took` seconds in the latency histogram.
fn record_latency(st: &mut ServeStats, took: f64) {
    crate::metrics::REQUEST_LATENCY.record(&mut st.latency_counts, &mut st.latency_sum_s, took);
}
