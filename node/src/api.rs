//! The local control API (HTTP JSON on 127.0.0.1).
//!
//! - `GET /healthz` — `ok`.
//! - `GET /v1/status` — the [`crate::status::StatusReport`].
//! - `POST /v1/debug/gossip` — publishes the raw body on the control topic; only with
//!   `--debug-api` (tests use it to send malformed gossip). Body limit 128 KiB.

use crate::node::NodeHandle;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

/// Largest request body the API accepts.
pub const MAX_BODY: usize = 128 * 1024;

/// The API's routes.
pub fn router(handle: NodeHandle, debug: bool) -> Router {
    let mut r = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/v1/status", get(status));
    if debug {
        r = r.route("/v1/debug/gossip", post(debug_gossip));
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

async fn status(State(h): State<NodeHandle>) -> Response {
    match h.status().await {
        Ok(r) => Json(r).into_response(),
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
