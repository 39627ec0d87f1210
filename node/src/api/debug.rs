//! The debug routes of the local API, only with `--debug-api` (tests and benchmarks; never
//! on a normal path):
//!
//! - `POST /v1/debug/gossip` — publishes the raw body on the control topic; only with
//!   `--debug-api` (tests use it to send malformed gossip). Body limit 128 KiB.
//! - `POST /v1/debug/allreduce?bytes=B&iters=K&warmup=W&tag=T[&compression=C]` — runs a
//!   barrier, W warm-up and K timed f32 all-reduces (avg) of B bytes over the current view,
//!   their payload compressed as C (`none`, the default, `bf16` or `int8`); only with
//!   `--debug-api` (`shoal bench allreduce` calls every node at once). B ≤ 4 GiB.
//! - `POST /v1/debug/perturb?run=R[&kind=nan|abandon|die]` — nudges this node's weights in
//!   training run R before its next step (tests of the weights consistency check), or
//!   (`kind=nan`) makes its next gradient NaN (tests of the gradient guard), or
//!   (`kind=abandon`) makes it abandon its next collective as if a link broke (tests of the
//!   restart-together rule), or (`kind=die`) ends the node's process, as `kill -9` would,
//!   the moment its next step's or round's all-reduce completes (tests of the samples
//!   log); only with `--debug-api`.

use super::{bad_request, unavailable};
use crate::node::handle::NodeHandle;
use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};

/// The debug routes.
pub(super) fn router() -> Router<NodeHandle> {
    Router::new()
        .route("/v1/debug/gossip", post(debug_gossip))
        .route("/v1/debug/allreduce", post(debug_allreduce))
        .route("/v1/debug/perturb", post(debug_perturb))
}

async fn debug_gossip(State(h): State<NodeHandle>, body: Bytes) -> Response {
    match h.debug_publish_raw(body.to_vec()).await {
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
    /// The payload's form on the wire. Default: none (f32).
    #[serde(default)]
    pub compression: coordinator_free::Compression,
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
    let (c, avg) = (p.compression, coordinator_free::ReduceOp::Avg);
    let run = async {
        dp.barrier(&view, p.tag).await?;
        let mut tag = p.tag + 1;
        for _ in 0..p.warmup {
            dp.all_reduce_compressed(&view, tag, &mut buf, avg, c)
                .await?;
            tag += 1;
        }
        let t = std::time::Instant::now();
        for _ in 0..p.iters {
            dp.all_reduce_compressed(&view, tag, &mut buf, avg, c)
                .await?;
            tag += 1;
        }
        Ok::<_, crate::data_plane::DataPlaneError>(t.elapsed())
    };
    match run.await {
        Ok(elapsed) => {
            // The mean of ones is one; compressed, within the form's rounding of it.
            let tol = match c {
                coordinator_free::Compression::None => 0.0,
                coordinator_free::Compression::Bf16 => 1.0 / 256.0,
                coordinator_free::Compression::Int8 => 1.0 / 127.0,
            };
            let correct = buf.iter().all(|&x| (x - 1.0).abs() <= tol);
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
        Some("die") => crate::train::PERTURB_DIE_AFTER_COLLECTIVE,
        Some(other) => {
            return bad_request(format!(
                "unknown kind `{other}` (weights, nan, abandon or die)"
            ))
        }
    };
    match h.debug_perturb_job(p.run, kind).await {
        Ok(true) => Json(serde_json::json!({"perturbed": true})).into_response(),
        Ok(false) => (
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({"error": "no such run"})),
        )
            .into_response(),
        Err(e) => unavailable(e),
    }
}
