//! `POST /v1/chat/completions`: a conversation rendered with the model's chat template
//! (`crate::text::ChatTemplate`, from the held folder's `chat_template.jinja` or
//! `tokenizer_config.json`, with `add_generation_prompt`) and encoded by its tokenizer
//! without adding special tokens (the template writes them, as `apply_chat_template`
//! does), then generated exactly like a completion of those token ids; answered in the
//! chat format: `chat.completion`, or `chat.completion.chunk` events when streaming (the
//! first delta carries the role, the last the finish reason, then `[DONE]`).
//!
//! Options are those of `/v1/completions` (`max_tokens` or `max_completion_tokens`,
//! `temperature`, `top_p`, `seed`, `stop`, `stream`, `timeout`), and chat's own
//! `logprobs` (a boolean, default false) with `top_logprobs` (0 to 20, default 0; only
//! with `logprobs` true): each choice, and each streamed chunk for its tokens, then
//! carries `logprobs.content`, per token its text, logprob (under the model's
//! distribution, before temperature and `top_p`), bytes and that many most likely tokens
//! ([`super::logprobs`]). The template is loaded for each request (a small file, compiled
//! in about a millisecond).

use super::http::{
    answer, check, invalid, parse, serve_error, Api, CompletionRequest, Objects, OneOrMany,
    PromptIn,
};
use super::logprobs::{chat_json, chat_top};
use super::{ServeError, Server};
use crate::text::{ChatMessage, ChatTemplate, TextError};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use serde::Deserialize;
use serde_json::{json, Value};

/// Most messages in one conversation.
pub const MAX_MESSAGES: usize = 1024;

#[derive(Deserialize)]
pub(super) struct ChatRequest {
    model: String,
    messages: Vec<ChatMessage>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    seed: Option<i64>,
    #[serde(default)]
    stop: Option<OneOrMany>,
    #[serde(default)]
    stream: Option<bool>,
    #[serde(default)]
    n: Option<u32>,
    #[serde(default)]
    logprobs: Option<Value>,
    #[serde(default)]
    top_logprobs: Option<Value>,
    #[serde(default)]
    timeout: Option<f64>,
}

impl Server {
    /// The token ids of `messages` rendered with the chat template of the model served as
    /// `model` (held here), ending where the assistant's answer starts.
    pub fn chat_prompt(
        &self,
        model: &str,
        messages: &[ChatMessage],
    ) -> Result<Vec<u32>, ServeError> {
        if messages.is_empty() || messages.len() > MAX_MESSAGES {
            return Err(ServeError::Invalid(format!(
                "`messages` must hold 1 to {MAX_MESSAGES} messages"
            )));
        }
        let (tokenizer, held) = self.tokenizer_of(model);
        let dir = match self.folder_of(model)? {
            Some(dir) if held => dir,
            _ if !held => {
                return Err(ServeError::NoPlan {
                    model: model.to_string(),
                    reason: "its chat template is not here yet".into(),
                })
            }
            _ => {
                return Err(ServeError::Invalid(format!(
                    "`{model}` is not a model folder with a chat template"
                )))
            }
        };
        let Some(tokenizer) = tokenizer else {
            return Err(ServeError::Invalid(format!(
                "`{model}` has no tokenizer.json"
            )));
        };
        let template = ChatTemplate::load(&dir).map_err(|e| match e {
            TextError::NoTemplate { .. } => {
                ServeError::Invalid(format!("`{model}` has no chat template"))
            }
            e => ServeError::Invalid(e.to_string()),
        })?;
        let text = template
            .render(messages, true)
            .map_err(|e| ServeError::Invalid(e.to_string()))?;
        tokenizer
            .encode(&text, false)
            .map_err(|e| ServeError::Invalid(e.to_string()))
    }
}

/// The `/v1/chat/completions` handler.
pub(super) async fn chat_completions(
    State(api): State<Api>,
    headers: HeaderMap,
    b: Result<Bytes, BytesRejection>,
) -> Response {
    let req: ChatRequest = match parse(&api, &headers, b) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let logprobs = match chat_top(req.logprobs.as_ref(), req.top_logprobs.as_ref()) {
        Ok(l) => l,
        Err(e) => return invalid(&e, Some(e.param)),
    };
    let ids = match api.server.chat_prompt(&req.model, &req.messages) {
        Ok(ids) => ids,
        Err(e) => return serve_error(e),
    };
    let mut c = match check(CompletionRequest {
        model: req.model,
        prompt: PromptIn::Ids(ids),
        max_tokens: req.max_completion_tokens.or(req.max_tokens),
        temperature: req.temperature,
        top_p: req.top_p,
        seed: req.seed,
        stop: req.stop,
        stream: req.stream,
        n: req.n,
        best_of: None,
        echo: None,
        logprobs: None,
        timeout: req.timeout,
    }) {
        Ok(c) => c,
        Err(r) => return r,
    };
    c.logprobs = logprobs;
    let with_logprobs = logprobs.is_some();
    let first = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    answer(
        &api,
        c,
        &CHAT_COMPLETION,
        |done| {
            json!({
                "index": 0,
                "message": {"role": "assistant", "content": done.text},
                "logprobs": if with_logprobs { chat_json(&done.logprobs) } else { Value::Null },
                "finish_reason": done.finish_reason,
            })
        },
        move |d| {
            let mut delta = json!({});
            if first.swap(false, std::sync::atomic::Ordering::Relaxed) {
                delta["role"] = json!("assistant");
            }
            if d.finish.is_none() || !d.text.is_empty() {
                delta["content"] = json!(d.text);
            }
            let logprobs = if with_logprobs && !d.logprobs.is_empty() {
                chat_json(d.logprobs)
            } else {
                Value::Null
            };
            json!({"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": d.finish})
        },
    )
    .await
}

/// `/v1/chat/completions`' names.
const CHAT_COMPLETION: Objects = Objects {
    id_prefix: "chatcmpl",
    whole: "chat.completion",
    chunk: "chat.completion.chunk",
};
