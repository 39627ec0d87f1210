//! The serving HTTP API, OpenAI-compatible where OpenAI has an equivalent.
//!
//! - `POST /v1/completions` — `model`, `prompt` (a string, or a list of one; or token ids:
//!   a list of integers, or a list of one such list, as OpenAI allows), `max_tokens`
//!   (default 16), `temperature` (default 1), `top_p` (default 1), `seed`, `stop` (a
//!   string or up to 4), `stream` (server-sent events ending in `data: [DONE]`),
//!   `timeout` (seconds, shoal's own), `logprobs` (null, the default: none; an integer 0
//!   to 5: each choice, and each streamed chunk for its tokens, carries `logprobs` with
//!   the tokens, their logprobs under the model's distribution, that many most likely
//!   tokens at each position and the tokens' `text_offset`; see [`super::logprobs`]);
//!   other OpenAI fields are accepted when they ask for nothing we do not do (`n` 1, no
//!   `echo`, no `best_of` > 1).
//!   A text prompt needs a byte-level model (`gpt`) or an `hf` folder with a
//!   `tokenizer.json` (encoded with its special tokens; generated tokens are detokenised
//!   into `text`, and its stop tokens end the completion, left out of both); token ids
//!   work with any language model (an `hf` folder without a tokenizer takes only these,
//!   with no stop sequences, and answers an empty `text`). When the prompt was token ids,
//!   each choice (and each streamed chunk) carries `tokens`, the generated token ids,
//!   beside `text`: what a chat layer renders its template into and reads back.
//! - `GET /v1/models` — the served models.
//! - `POST /v1/infer` — `{"model", "inputs": nested arrays}` → `{"model", "shape",
//!   "outputs"}`: a forward of f32 inputs (`mlp`, TorchScript) or token ids (`gpt`, `hf`:
//!   logits of every position). Or a safetensors body (`Content-Type: application/octet-stream`,
//!   `?model=NAME`, one F32 tensor, ideally named `inputs`) answered with a safetensors body
//!   holding `outputs`.
//! - `POST /v1/serve` — `{"path", "name", "stages", "dtype", "context"}`: offer a model
//!   file (or a Hugging Face folder, with its compute type and context) on this node
//!   (what `shoal serve` calls); `GET /v1/serve` — models, holders and plans.
//!
//! With `--api-token`, every route here asks for `Authorization: Bearer <token>`.
//! [`router`] gives them all to the local API's listener (loopback); [`openai_router`]
//! gives `/v1/completions` and `/v1/models` alone to the listener of `shoal up
//! --serve-listen ADDR`, the one LAN clients reach (a non-loopback ADDR needs a token). Errors
//! are OpenAI-style bodies `{"error": {"message", "type", "param", "code"}}` with a 4xx
//! for the client's mistakes (400 invalid, 401 token, 404 unknown model, 413 body too
//! large) and 503/504 when the cluster cannot answer (no plan yet, deadline).

// Handlers return a ready `Response` as their error: built once per request, never moved
// around in hot loops.
#![allow(clippy::result_large_err)]

use super::logprobs::{completion_json, completion_top};
use super::{Prompt, Sampling, ServeError, Server, StreamEvent, TokenLogprob};
use crate::node::handle::NodeHandle;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};
use std::time::Duration;

pub use super::infer::MAX_INFER_VALUES;
use super::infer::{flatten, infer, safetensors_input, InferQuery, InferRequest};

#[derive(Clone)]
pub(super) struct Api {
    pub(super) server: Server,
    node: NodeHandle,
}

/// The serving routes, for the local API's listener.
pub fn router(server: Server, node: NodeHandle) -> Router {
    let limit = server.config().max_body;
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(super::chat::chat_completions))
        .route("/v1/models", get(models))
        .route("/v1/infer", post(infer))
        .route("/v1/serve", get(serve_report).post(serve_offer))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(Api { server, node })
}

/// The OpenAI-compatible routes alone (`/v1/completions`, `/v1/chat/completions`,
/// `/v1/models`), for the listener
/// of `shoal up --serve-listen` that LAN clients reach: nothing else is routed there (no
/// control API, no `/v1/infer` or `/v1/serve`; an OpenAI-style 404 instead), and with an
/// API token every request on it, whatever its path, needs `Authorization: Bearer <token>`
/// before it is looked at.
pub fn openai_router(server: Server, node: NodeHandle) -> Router {
    let limit = server.config().max_body;
    let api = Api { server, node };
    Router::new()
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(super::chat::chat_completions))
        .route("/v1/models", get(models))
        .fallback(unknown_route)
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(
            api.clone(),
            require_token,
        ))
        .with_state(api)
}

async fn require_token(
    State(api): State<Api>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match authorize(&api.server, req.headers()) {
        Ok(()) => next.run(req).await,
        Err(r) => r,
    }
}

async fn unknown_route(uri: axum::http::Uri) -> Response {
    error(
        StatusCode::NOT_FOUND,
        format!(
            "no route {} here (this listener serves /v1/completions, /v1/chat/completions and /v1/models)",
            uri.path()
        ),
        "invalid_request_error",
        None,
    )
}

/// An OpenAI-style error response.
pub fn error(
    status: StatusCode,
    message: impl ToString,
    kind: &str,
    param: Option<&str>,
) -> Response {
    let code = match status {
        StatusCode::NOT_FOUND => Some("model_not_found"),
        StatusCode::UNAUTHORIZED => Some("invalid_api_key"),
        _ => None,
    };
    (
        status,
        Json(json!({"error": {
            "message": message.to_string(),
            "type": kind,
            "param": param,
            "code": code,
        }})),
    )
        .into_response()
}

pub(super) fn invalid(message: impl ToString, param: Option<&str>) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        message,
        "invalid_request_error",
        param,
    )
}

pub(super) fn serve_error(e: ServeError) -> Response {
    match &e {
        ServeError::UnknownModel(_) => error(
            StatusCode::NOT_FOUND,
            e,
            "invalid_request_error",
            Some("model"),
        ),
        ServeError::Invalid(_) | ServeError::Offer { .. } => invalid(e, None),
        ServeError::NoPlan { .. } | ServeError::Stage { .. } => {
            error(StatusCode::SERVICE_UNAVAILABLE, e, "server_error", None)
        }
        ServeError::Deadline(_) => error(StatusCode::GATEWAY_TIMEOUT, e, "server_error", None),
    }
}

/// Checks the bearer token. `Err` is the 401 to answer.
pub(super) fn authorize(server: &Server, headers: &HeaderMap) -> Result<(), Response> {
    let Some(token) = &server.config().api_token else {
        return Ok(());
    };
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let ok = given.is_some_and(|g| tokens_equal(g, token));
    if ok {
        Ok(())
    } else {
        Err(error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token",
            "invalid_request_error",
            None,
        ))
    }
}

/// Whether `given` is `token`, in time that depends on neither (their SHA-256 digests are
/// compared with no early exit, so not even the token's length leaks).
fn tokens_equal(given: &str, token: &str) -> bool {
    use sha2::{Digest, Sha256};
    let (a, b) = (
        Sha256::digest(given.as_bytes()),
        Sha256::digest(token.as_bytes()),
    );
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// Checks the token, the body's size and its JSON: the request, or the error to answer.
pub(super) fn parse<T: serde::de::DeserializeOwned>(
    api: &Api,
    headers: &HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> Result<T, Response> {
    authorize(&api.server, headers)?;
    let b = body(b)?;
    serde_json::from_slice(&b).map_err(|e| invalid(format!("malformed request: {e}"), None))
}

pub(super) fn body(b: Result<Bytes, BytesRejection>) -> Result<Bytes, Response> {
    b.map_err(|e| {
        let status = e.status();
        if status == StatusCode::PAYLOAD_TOO_LARGE {
            error(
                status,
                "the request body is too large",
                "invalid_request_error",
                None,
            )
        } else {
            invalid(e.body_text(), None)
        }
    })
}

#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

/// A completion's `prompt` as OpenAI allows it: text, texts, token ids, lists of ids.
#[derive(Deserialize)]
#[serde(untagged)]
pub(super) enum PromptIn {
    Text(String),
    Texts(Vec<String>),
    Ids(Vec<u32>),
    IdLists(Vec<Vec<u32>>),
}

#[derive(Deserialize)]
pub(super) struct CompletionRequest {
    pub(super) model: String,
    pub(super) prompt: PromptIn,
    #[serde(default)]
    pub(super) max_tokens: Option<u32>,
    #[serde(default)]
    pub(super) temperature: Option<f32>,
    #[serde(default)]
    pub(super) top_p: Option<f32>,
    #[serde(default)]
    pub(super) seed: Option<i64>,
    #[serde(default)]
    pub(super) stop: Option<OneOrMany>,
    #[serde(default)]
    pub(super) stream: Option<bool>,
    #[serde(default)]
    pub(super) n: Option<u32>,
    #[serde(default)]
    pub(super) best_of: Option<u32>,
    #[serde(default)]
    pub(super) echo: Option<bool>,
    #[serde(default)]
    pub(super) logprobs: Option<Value>,
    #[serde(default)]
    pub(super) timeout: Option<f64>,
}

/// A checked completion request.
pub(super) struct Checked {
    pub(super) model: String,
    pub(super) prompt: Prompt,
    pub(super) sampling: Sampling,
    /// The alternatives per token its logprobs name (`None`: no logprobs).
    pub(super) logprobs: Option<usize>,
    pub(super) stream: bool,
    pub(super) timeout: Option<Duration>,
}

pub(super) fn check(req: CompletionRequest) -> Result<Checked, Response> {
    let prompt = match req.prompt {
        PromptIn::Text(p) => Prompt::Text(p),
        PromptIn::Texts(mut v) if v.len() == 1 => Prompt::Text(v.remove(0)),
        PromptIn::Ids(ids) => Prompt::Tokens(ids),
        PromptIn::IdLists(mut v) if v.len() == 1 => Prompt::Tokens(v.remove(0)),
        PromptIn::Texts(_) | PromptIn::IdLists(_) => {
            return Err(invalid("send one prompt per request", Some("prompt")));
        }
    };
    if req.n.unwrap_or(1) != 1 || req.best_of.unwrap_or(1) != 1 {
        return Err(invalid(
            "only n = 1 and best_of = 1 are supported",
            Some("n"),
        ));
    }
    if req.echo.unwrap_or(false) {
        return Err(invalid("echo is not supported", Some("echo")));
    }
    let logprobs = completion_top(req.logprobs.as_ref()).map_err(|e| invalid(&e, Some(e.param)))?;
    let max_tokens = req.max_tokens.unwrap_or(16);
    if max_tokens == 0 {
        return Err(invalid("max_tokens must be at least 1", Some("max_tokens")));
    }
    let temperature = req.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(invalid(
            "temperature must be in [0, 2]",
            Some("temperature"),
        ));
    }
    let top_p = req.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(invalid("top_p must be in (0, 1]", Some("top_p")));
    }
    let stop = match req.stop {
        None => vec![],
        Some(OneOrMany::One(s)) => vec![s],
        Some(OneOrMany::Many(v)) => v,
    };
    if stop.len() > 4 || stop.iter().any(|s| s.len() > 64) {
        return Err(invalid(
            "at most 4 stop sequences of at most 64 bytes",
            Some("stop"),
        ));
    }
    let timeout = match req.timeout {
        None => None,
        Some(t) if t.is_finite() && t > 0.0 && t <= 3600.0 => Some(Duration::from_secs_f64(t)),
        Some(_) => {
            return Err(invalid(
                "timeout must be in (0, 3600] seconds",
                Some("timeout"),
            ))
        }
    };
    Ok(Checked {
        model: req.model,
        prompt,
        sampling: Sampling {
            max_tokens,
            temperature,
            top_p,
            seed: req.seed.map(|s| s as u64).unwrap_or(0),
            seeded: req.seed.is_some(),
            stop,
        },
        logprobs,
        stream: req.stream.unwrap_or(false),
        timeout,
    })
}

/// The request bodies the API decodes from untrusted clients.
#[derive(Clone, Copy, Debug)]
pub enum Body {
    /// `POST /v1/completions` (JSON).
    Completion,
    /// `POST /v1/infer` with a JSON body.
    InferJson,
    /// `POST /v1/infer` with a safetensors body.
    InferSafetensors,
    /// `POST /v1/serve` (JSON).
    Offer,
}

/// Runs the decoding and checks an endpoint applies to a request body before serving it
/// (the same functions the handlers call), and says why it is refused if it is. The
/// `fuzz/` targets drive it; it never serves anything.
pub fn check_body(kind: Body, body: &[u8]) -> Result<(), String> {
    let why = |r: Response| format!("refused with {}", r.status());
    match kind {
        Body::Completion => {
            let req: CompletionRequest = serde_json::from_slice(body).map_err(|e| e.to_string())?;
            check(req).map(|_| ()).map_err(why)
        }
        Body::InferJson => {
            let req: InferRequest = serde_json::from_slice(body).map_err(|e| e.to_string())?;
            flatten(&req.inputs).map(|_| ())
        }
        Body::InferSafetensors => {
            let q = InferQuery {
                model: Some("m".into()),
            };
            safetensors_input(&q, body).map(|_| ()).map_err(why)
        }
        Body::Offer => serde_json::from_slice::<OfferRequest>(body)
            .map(|_| ())
            .map_err(|e| e.to_string()),
    }
}

pub(super) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn completions(
    State(api): State<Api>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> Response {
    let req: CompletionRequest = match parse(&api, &headers, b) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let c = match check(req) {
        Ok(c) => c,
        Err(r) => return r,
    };
    let with_tokens = matches!(c.prompt, Prompt::Tokens(_));
    let with_logprobs = c.logprobs.is_some();
    answer(
        &api,
        c,
        &TEXT_COMPLETION,
        move |done| {
            let mut choice = json!({
                "text": done.text,
                "index": 0,
                "logprobs": null,
                "finish_reason": done.finish_reason,
            });
            if with_tokens {
                choice["tokens"] = json!(done.tokens);
            }
            if with_logprobs {
                choice["logprobs"] = completion_json(&done.logprobs);
            }
            choice
        },
        move |d| {
            let mut choice =
                json!({"text": d.text, "index": 0, "logprobs": null, "finish_reason": d.finish});
            if with_tokens {
                choice["tokens"] = json!(d.tokens);
            }
            if with_logprobs && !d.logprobs.is_empty() {
                choice["logprobs"] = completion_json(d.logprobs);
            }
            choice
        },
    )
    .await
}

/// The names one of the OpenAI APIs gives its answers.
pub(super) struct Objects {
    /// The id's prefix (`cmpl`, `chatcmpl`).
    pub(super) id_prefix: &'static str,
    /// `object` of a whole answer.
    pub(super) whole: &'static str,
    /// `object` of a streamed chunk.
    pub(super) chunk: &'static str,
}

/// `/v1/completions`' names.
const TEXT_COMPLETION: Objects = Objects {
    id_prefix: "cmpl",
    whole: "text_completion",
    chunk: "text_completion",
};

/// One streamed piece of a completion, which a chunk's choice is made of.
pub(super) struct Delta<'a> {
    /// More text.
    pub(super) text: &'a str,
    /// The tokens it is made of.
    pub(super) tokens: &'a [u32],
    /// Their logprobs, when the request asked for them (else empty).
    pub(super) logprobs: &'a [TokenLogprob],
    /// The finish reason: the last chunk's, which has no text.
    pub(super) finish: Option<&'a str>,
}

/// Runs the checked request `c` and answers it in the envelope both APIs share (`id`,
/// `object` from `objects`, `created`, `model`; a whole answer's `usage` and
/// `system_fingerprint`), with the one choice `choice(done)` makes of the finished
/// completion, or, when it streams, a chunk per event whose choice `delta` makes of its
/// [`Delta`] (see [`sse`]).
pub(super) async fn answer(
    api: &Api,
    c: Checked,
    objects: &Objects,
    choice: impl FnOnce(&super::Completion) -> Value,
    delta: impl Fn(&Delta) -> Value + Clone + Send + Sync + 'static,
) -> Response {
    let id = format!("{}-{:016x}", objects.id_prefix, rand::random::<u64>());
    let created = unix_now();
    if !c.stream {
        return match api
            .server
            .complete(&c.model, &c.prompt, c.sampling, c.logprobs, c.timeout)
            .await
        {
            Ok(done) => Json(json!({
                "id": id,
                "object": objects.whole,
                "created": created,
                "model": c.model,
                "choices": [choice(&done)],
                "usage": {
                    "prompt_tokens": done.prompt_tokens,
                    "completion_tokens": done.completion_tokens,
                    "total_tokens": done.prompt_tokens + done.completion_tokens,
                },
                "system_fingerprint": if done.cached { "shoal-cache" } else { "shoal" },
            }))
            .into_response(),
            Err(e) => serve_error(e),
        };
    }
    let rx = match api
        .server
        .complete_stream(&c.model, &c.prompt, c.sampling, c.logprobs, c.timeout)
    {
        Ok(rx) => rx,
        Err(e) => return serve_error(e),
    };
    let (model, object) = (c.model, objects.chunk);
    sse(rx, move |d: &Delta| {
        json!({
            "id": id,
            "object": object,
            "created": created,
            "model": model,
            "choices": [delta(d)],
        })
        .to_string()
    })
}

/// A completion's stream as server-sent events: `chunk` makes each event's JSON of its
/// [`Delta`] (the last one has the finish reason and no text), an error ends it with an
/// OpenAI-style error object, then `[DONE]`.
pub(super) fn sse(
    rx: tokio::sync::mpsc::Receiver<StreamEvent>,
    chunk: impl Fn(&Delta) -> String + Clone + Send + Sync + 'static,
) -> Response {
    let events = futures::stream::unfold((rx, false), move |(mut rx, ended)| {
        let chunk = chunk.clone();
        async move {
            if ended {
                return None;
            }
            let (data, ended) = match rx.recv().await {
                Some(StreamEvent::Text {
                    text,
                    tokens,
                    logprobs,
                }) => {
                    let d = Delta {
                        text: &text,
                        tokens: &tokens,
                        logprobs: &logprobs,
                        finish: None,
                    };
                    (chunk(&d), false)
                }
                Some(StreamEvent::Done(c)) => {
                    let d = Delta {
                        text: "",
                        tokens: &[],
                        logprobs: &[],
                        finish: Some(&c.finish_reason),
                    };
                    (chunk(&d), true)
                }
                Some(StreamEvent::Failed(e)) => (
                    json!({"error": {"message": e.to_string(), "type": "server_error", "param": null, "code": null}})
                        .to_string(),
                    true,
                ),
                None => return None,
            };
            let mut out = vec![Ok::<Event, std::convert::Infallible>(
                Event::default().data(data),
            )];
            if ended {
                out.push(Ok(Event::default().data("[DONE]")));
            }
            Some((futures::stream::iter(out), (rx, ended)))
        }
    });
    use futures::StreamExt;
    Sse::new(events.flatten()).into_response()
}

async fn models(State(api): State<Api>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&api.server, &headers) {
        return r;
    }
    let data: Vec<Value> = api
        .server
        .models()
        .into_iter()
        .map(|(name, cfg)| {
            json!({
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": "shoal",
                "kind": cfg.kind,
                "layers": cfg.layers,
                "context": cfg.context,
                "params": cfg.params,
            })
        })
        .collect();
    Json(json!({"object": "list", "data": data})).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct OfferRequest {
    path: String,
    name: String,
    #[serde(default = "one")]
    stages: u32,
    /// A Hugging Face folder's compute type: auto, f32, bf16 or f16. Default: auto.
    #[serde(default)]
    dtype: Option<String>,
    /// A Hugging Face folder's context in tokens. Default: the config's (4096 at most).
    #[serde(default)]
    context: Option<u32>,
}

fn one() -> u32 {
    1
}

async fn serve_offer(
    State(api): State<Api>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> Response {
    let req: OfferRequest = match parse(&api, &headers, b) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let dtype = match req.dtype.as_deref().unwrap_or("auto").parse() {
        Ok(d) => d,
        Err(e) => return invalid(e, Some("dtype")),
    };
    match api.server.offer(
        std::path::Path::new(&req.path),
        &req.name,
        req.stages,
        dtype,
        req.context,
    ) {
        Ok(a) => {
            // Announce at once (the node re-announces every 2 s).
            let _ = api.node.offer_model(a.clone()).await;
            Json(json!({
                "name": a.name,
                "sha256": hex::encode(a.sha256),
                "bytes": a.bytes,
                "stages": a.stages,
                "config": serde_json::from_str::<Value>(&a.config).unwrap_or(Value::Null),
            }))
            .into_response()
        }
        Err(e) => serve_error(e),
    }
}

async fn serve_report(State(api): State<Api>, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&api.server, &headers) {
        return r;
    }
    Json(api.server.report()).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(tokens_equal("s3cret", "s3cret"));
        assert!(!tokens_equal("s3cre", "s3cret"));
        assert!(!tokens_equal("s3cret0", "s3cret"));
        assert!(!tokens_equal("", "s3cret"));
        assert!(!tokens_equal("S3cret", "s3cret"));
    }

    #[test]
    fn completion_parameters_are_checked() {
        let parse = |v: Value| check(serde_json::from_value(v).unwrap());
        assert!(parse(json!({"model": "m", "prompt": "1+1="})).is_ok());
        assert!(parse(json!({"model": "m", "prompt": ["a", "b"]})).is_err());
        let ids = |v: Value| match parse(v).ok().unwrap().prompt {
            Prompt::Tokens(t) => t,
            Prompt::Text(t) => panic!("text {t:?}"),
        };
        assert_eq!(
            ids(json!({"model": "m", "prompt": [1, 33, 66]})),
            [1, 33, 66]
        );
        assert_eq!(ids(json!({"model": "m", "prompt": [[7, 8]]})), [7, 8]);
        assert!(parse(json!({"model": "m", "prompt": [[1], [2]]})).is_err());
        let negative = json!({"model": "m", "prompt": [-1]});
        assert!(serde_json::from_value::<CompletionRequest>(negative).is_err());
        assert!(parse(json!({"model": "m", "prompt": "a", "temperature": 3})).is_err());
        assert!(parse(json!({"model": "m", "prompt": "a", "top_p": 0})).is_err());
        assert!(parse(json!({"model": "m", "prompt": "a", "n": 2})).is_err());
        assert!(parse(json!({"model": "m", "prompt": "a", "max_tokens": 0})).is_err());
        let c = parse(json!({"model": "m", "prompt": ["a"], "stop": "\n", "seed": 7}))
            .ok()
            .unwrap();
        assert_eq!(c.sampling.stop, vec!["\n".to_string()]);
        assert!(c.sampling.seeded);
        assert_eq!(c.logprobs, None);
    }

    /// The `error` object of a refusal, and its status.
    fn refusal(r: Response) -> (StatusCode, Value) {
        let status = r.status();
        let b = futures::executor::block_on(axum::body::to_bytes(r.into_body(), 1 << 16));
        let v: Value = serde_json::from_slice(&b.unwrap()).unwrap();
        (status, v["error"].clone())
    }

    #[test]
    fn completion_logprobs_are_0_to_5_and_refusals_name_them() {
        let parse = |v: Value| check(serde_json::from_value(v).unwrap());
        let c = parse(json!({"model": "m", "prompt": "a", "logprobs": 2}));
        assert_eq!(c.ok().unwrap().logprobs, Some(2));
        let c = parse(json!({"model": "m", "prompt": "a", "logprobs": null}));
        assert_eq!(c.ok().unwrap().logprobs, None);
        for bad in [json!(6), json!(-1), json!(true), json!("1")] {
            let r = parse(json!({"model": "m", "prompt": "a", "logprobs": bad}));
            let (status, e) = refusal(r.err().unwrap());
            assert_eq!(status, StatusCode::BAD_REQUEST, "{bad}");
            assert_eq!(e["param"], "logprobs", "{bad}");
            assert_eq!(e["type"], "invalid_request_error");
            assert_eq!(e["message"], "logprobs must be an integer from 0 to 5");
        }
    }
}
