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
//! - `/v1/debug/*`: only with `--debug-api`; see [`debug`].
//!
//! The routes reach the node through its [`NodeHandle`] ([`crate::node::handle`]) only.

mod debug;

pub use debug::AllReduceParams;

use crate::node::handle::NodeHandle;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
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
        r = r.merge(debug::router());
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
const DASHBOARD: &str = include_str!("../../assets/dashboard.html");

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
