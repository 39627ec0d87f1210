//! The local control API (HTTP JSON on 127.0.0.1).
//!
//! - `GET /` — the web dashboard (embedded, no external assets).
//! - `GET /healthz` — `ok`.
//! - `GET /v1/status` — the [`crate::status::StatusReport`].
//! - `GET /metrics` — Prometheus text format ([`crate::metrics`]).
//! - `POST /v1/jobs` — body `{"spec": "<job TOML>", "resume": false}`: starts a training
//!   job here and announces it to the swarm; answers the [`crate::train::JobReport`]
//!   (400 with `{"error"}` naming the key for an invalid job).
//! - `GET /v1/jobs` — the jobs this node takes part in.
//! - `POST /v1/debug/gossip` — publishes the raw body on the control topic; only with
//!   `--debug-api` (tests use it to send malformed gossip). Body limit 128 KiB.
//! - `POST /v1/debug/allreduce?bytes=B&iters=K&warmup=W&tag=T` — runs a barrier, W warm-up
//!   and K timed f32 all-reduces (avg) of B bytes over the current view; only with
//!   `--debug-api` (`shoal bench allreduce` calls every node at once). B ≤ 4 GiB.
//! - `POST /v1/debug/perturb?run=R[&kind=nan|abandon]` — nudges this node's weights in
//!   training run R before its next step (tests of the weights consistency check), or
//!   (`kind=nan`) makes its next gradient NaN (tests of the gradient guard), or
//!   (`kind=abandon`) makes it abandon its next collective as if a link broke (tests of the
//!   restart-together rule); only with `--debug-api`.

use crate::node::NodeHandle;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

/// Largest request body the API accepts.
pub const MAX_BODY: usize = 128 * 1024;

/// The API's routes.
pub fn router(handle: NodeHandle, debug: bool) -> Router {
    let mut r = Router::new()
        .route("/", get(dashboard))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/v1/status", get(status))
        .route("/metrics", get(metrics))
        .route("/v1/jobs", get(jobs).post(submit_job));
    if debug {
        r = r
            .route("/v1/debug/gossip", post(debug_gossip))
            .route("/v1/debug/allreduce", post(debug_allreduce))
            .route("/v1/debug/perturb", post(debug_perturb));
    }
    r.layer(DefaultBodyLimit::max(MAX_BODY)).with_state(handle)
}

fn unavailable(e: impl std::fmt::Display) -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(serde_json::json!({"error": e.to_string()})),
    )
        .into_response()
}

fn bad_request(e: impl std::fmt::Display) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(serde_json::json!({"error": e.to_string()})),
    )
        .into_response()
}

async fn jobs(State(h): State<NodeHandle>) -> Response {
    match h.status().await {
        Ok(r) => Json(r.jobs).into_response(),
        Err(e) => unavailable(e),
    }
}

/// The body of `POST /v1/jobs`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SubmitJob {
    spec: String,
    #[serde(default)]
    resume: bool,
}

async fn submit_job(State(h): State<NodeHandle>, body: Bytes) -> Response {
    let req: SubmitJob = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return bad_request(format!("malformed request: {e}")),
    };
    let spec = match crate::train::job::JobSpec::parse(&req.spec) {
        Ok(s) => s,
        Err(e) => return bad_request(e),
    };
    match h.submit_job(spec, req.resume).await {
        Ok(Ok(report)) => Json(report).into_response(),
        Ok(Err(e)) => unavailable(e),
        Err(e) => unavailable(e),
    }
}

async fn status(State(h): State<NodeHandle>) -> Response {
    match h.status().await {
        Ok(r) => Json(r).into_response(),
        Err(e) => unavailable(e),
    }
}

/// The web dashboard: one self-contained page (no CDN; works offline) that polls
/// `/v1/status`.
const DASHBOARD: &str = include_str!("../assets/dashboard.html");

async fn dashboard() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8")],
        DASHBOARD,
    )
        .into_response()
}

async fn metrics(State(h): State<NodeHandle>) -> Response {
    match h.status().await {
        Ok(r) => (
            [(
                axum::http::header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )],
            crate::metrics::render(&r),
        )
            .into_response(),
        Err(e) => unavailable(e),
    }
}

async fn debug_gossip(State(h): State<NodeHandle>, body: Bytes) -> Response {
    match h.publish_raw(body.to_vec()).await {
        Ok(Ok(())) => Json(serde_json::json!({"published": true})).into_response(),
        Ok(Err(e)) => (
            StatusCode::CONFLICT,
            Json(serde_json::json!({"published": false, "error": e})),
        )
            .into_response(),
        Err(e) => unavailable(e),
    }
}

/// Parameters of `POST /v1/debug/allreduce`.
#[derive(serde::Deserialize)]
pub struct AllReduceParams {
    /// Bytes per member buffer (f32).
    pub bytes: u64,
    /// Timed iterations.
    pub iters: u32,
    /// Untimed iterations first.
    #[serde(default)]
    pub warmup: u32,
    /// First tag; iterations use consecutive tags. Every member must use the same.
    pub tag: u64,
}

/// Largest buffer the debug all-reduce accepts.
const MAX_BENCH_BYTES: u64 = 4 << 30;

async fn debug_allreduce(
    State(h): State<NodeHandle>,
    Query(p): Query<AllReduceParams>,
) -> Response {
    if p.bytes > MAX_BENCH_BYTES || p.iters == 0 || p.iters > 10_000 || p.warmup > 10_000 {
        return (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({"error": "bytes must be <= 4 GiB and 1 <= iters <= 10000"})),
        )
            .into_response();
    }
    let (dp, view) = match h.data_plane().await {
        Ok(x) => x,
        Err(e) => return unavailable(e),
    };
    let len = (p.bytes / 4) as usize;
    let mut buf = vec![1.0f32; len];
    let run = async {
        dp.barrier(&view, p.tag).await?;
        let mut tag = p.tag + 1;
        for _ in 0..p.warmup {
            dp.all_reduce(&view, tag, &mut buf, coordinator_free::ReduceOp::Avg)
                .await?;
            tag += 1;
        }
        let t = std::time::Instant::now();
        for _ in 0..p.iters {
            dp.all_reduce(&view, tag, &mut buf, coordinator_free::ReduceOp::Avg)
                .await?;
            tag += 1;
        }
        Ok::<_, crate::data_plane::DataPlaneError>(t.elapsed())
    };
    match run.await {
        Ok(elapsed) => {
            let correct = buf.iter().all(|&x| x == 1.0);
            Json(serde_json::json!({
                "n": view.len(),
                "view_hash": view.hash.to_hex(),
                "mean_ms": elapsed.as_secs_f64() * 1000.0 / p.iters as f64,
                "correct": correct,
            }))
            .into_response()
        }
        Err(e) => (
            StatusCode::CONFLICT,
            Json(serde_json::json!({"error": e.to_string()})),
        )
            .into_response(),
    }
}

/// Query of `POST /v1/debug/perturb`.
#[derive(serde::Deserialize)]
struct PerturbParams {
    run: String,
    #[serde(default)]
    kind: Option<String>,
}

async fn debug_perturb(State(h): State<NodeHandle>, Query(p): Query<PerturbParams>) -> Response {
    let kind = match p.kind.as_deref() {
        None | Some("weights") => crate::train::PERTURB_WEIGHTS,
        Some("nan") => crate::train::PERTURB_NAN_GRADIENT,
        Some("abandon") => crate::train::PERTURB_ABANDON_COLLECTIVE,
        Some(other) => {
            return bad_request(format!("unknown kind `{other}` (weights, nan or abandon)"))
        }
    };
    match h.perturb_job(p.run, kind).await {
        Ok(true) => Json(serde_json::json!({"perturbed": true})).into_response(),
        Ok(false) => (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({"error": "no such run"})),
        )
            .into_response(),
        Err(e) => unavailable(e),
    }
}
