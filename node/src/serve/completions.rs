//! Admitting a completion request: its checks, the response cache, its deadline, and
//! how its answer is delivered and recorded.
//!
//! A request is checked against its model (a language model, a prompt that leaves room in
//! the context; text only for a byte-level model, token ids below the model's vocabulary
//! for any), gets a seed if the client gave none, and is answered from the response
//! cache when it is deterministic and was answered before ([`Sampling::cache_key`]).
//! Otherwise it becomes a `Row` queued to its model's dispatcher (`lanes`); its answer
//! arrives on its [`Sink`], once or as a stream.

use super::row::Row;
use super::{record_latency, Completion, Prompt, Sampling, ServeError, Server, StreamEvent};
use crate::text::Tokenizer;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Where a request's answer goes.
pub(super) enum Sink {
    /// The whole completion, once.
    Once(oneshot::Sender<Result<Completion, ServeError>>),
    /// Text as it is generated, then the completion.
    Stream(mpsc::Sender<StreamEvent>),
    /// Answered already.
    Closed,
}

/// An admitted request, as it waits for and moves through lanes.
pub(super) struct Pending {
    /// The prompt's token ids (a byte-level model's: the text's bytes).
    pub(super) prompt: Vec<u32>,
    /// Whether the model's tokens are bytes (its tokens are the text; stop sequences
    /// apply).
    pub(super) byte_level: bool,
    /// The tokenizer of a model whose tokens are not bytes, when it has one: generated
    /// tokens are detokenised into the text, its stop tokens end the completion, and
    /// stop sequences apply to the text.
    pub(super) tokenizer: Option<Tokenizer>,
    pub(super) sampling: Sampling,
    /// The alternatives per token its logprobs name (`None`: no logprobs;
    /// [`super::logprobs`]).
    pub(super) logprobs: Option<usize>,
    pub(super) deadline: Instant,
    /// When it arrived (its latency counts from here).
    pub(super) started: Instant,
    pub(super) sink: Sink,
    /// Its response-cache key, when it is deterministic.
    cache_key: Option<String>,
}

impl Server {
    /// Checks a completion request and queues it. The result arrives on `sink`.
    fn admit(
        &self,
        model: &str,
        prompt: &Prompt,
        mut sampling: Sampling,
        logprobs: Option<usize>,
        timeout: Option<Duration>,
        sink: Sink,
    ) -> Result<(), (ServeError, Sink)> {
        let (tokens, byte_level, tokenizer) = match self.check_completion(model, prompt, &sampling)
        {
            Ok(x) => x,
            Err(e) => {
                self.inner.stats.lock().unwrap().requests_rejected += 1;
                return Err((e, sink));
            }
        };
        if !sampling.seeded {
            sampling.seed = rand::random();
        }
        // What logprobs it asked for comes before the prompt, so a NUL in a text prompt
        // cannot reach it (see `Sampling::cache_key`).
        let lp = logprobs.map_or("-".to_string(), |n| n.to_string());
        let key = match prompt {
            Prompt::Text(t) => format!("text\u{0}{lp}\u{0}{t}"),
            Prompt::Tokens(ids) => format!("ids\u{0}{lp}\u{0}{ids:?}"),
        };
        let cache_key = sampling.cache_key(model, &key);
        let cached = cache_key
            .as_ref()
            .and_then(|k| self.inner.cache.lock().unwrap().get(k));
        if let Some(c) = cached {
            self.answer_cached(c, sink);
            return Ok(());
        }
        let now = Instant::now();
        let limit = timeout
            .unwrap_or(self.inner.cfg.request_timeout)
            .min(self.inner.cfg.request_timeout);
        let row = Row::new(Pending {
            prompt: tokens,
            byte_level,
            tokenizer,
            sampling,
            logprobs,
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

    /// Whether `model` can complete `prompt`: a language model whose context leaves room
    /// for at least one token after the (non-empty) prompt; text and stop sequences only
    /// for a byte-level model or one with a tokenizer (text is encoded with its special
    /// tokens, as `transformers`' `tokenizer(text)` does), token ids below its vocabulary.
    /// The prompt's tokens, whether the model is byte-level, and its tokenizer.
    fn check_completion(
        &self,
        model: &str,
        prompt: &Prompt,
        sampling: &Sampling,
    ) -> Result<(Vec<u32>, bool, Option<Tokenizer>), ServeError> {
        let (_, cfg) = self.model_for_request(model)?;
        if !cfg.is_lm() {
            return Err(ServeError::Invalid(format!(
                "`{model}` is a `{}` model: use /v1/infer",
                cfg.kind
            )));
        }
        let byte_level = cfg.is_byte_level();
        let (tokenizer, held) = self.tokenizer_of(model);
        let no_tokenizer = |what: &str| {
            if held {
                ServeError::Invalid(format!(
                    "`{model}` has no tokenizer.json: {what} (send `prompt` as a list of token ids)"
                ))
            } else {
                ServeError::NoPlan {
                    model: model.to_string(),
                    reason: format!("its tokenizer is not here yet, for {what}"),
                }
            }
        };
        let p: Vec<u32> = match prompt {
            Prompt::Text(t) if byte_level => t.bytes().map(u32::from).collect(),
            Prompt::Text(t) => match &tokenizer {
                Some(tok) => tok
                    .encode(t, true)
                    .map_err(|e| ServeError::Invalid(e.to_string()))?,
                None => return Err(no_tokenizer("a text prompt")),
            },
            Prompt::Tokens(ids) => ids.clone(),
        };
        if let Some(t) = p.iter().find(|&&t| t >= cfg.vocab) {
            return Err(ServeError::Invalid(format!(
                "token id {t} is outside the vocabulary of {} tokens",
                cfg.vocab
            )));
        }
        if !byte_level && tokenizer.is_none() && !sampling.stop.is_empty() {
            return Err(no_tokenizer("stop sequences"));
        }
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
        Ok((p, byte_level, tokenizer))
    }

    /// Answers on `sink` with `c`, a completion from the response cache.
    fn answer_cached(&self, mut c: Completion, sink: Sink) {
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
                let (text, tokens) = (c.text.clone(), c.tokens.clone());
                let logprobs = c.logprobs.clone();
                let _ = tx.try_send(StreamEvent::Text {
                    text,
                    tokens,
                    logprobs,
                });
                let _ = tx.try_send(StreamEvent::Done(c));
            }
            Sink::Closed => {}
        }
    }

    /// Completes `prompt` (not streamed); with `logprobs` = `Some(n)` each generated
    /// token carries its logprob and the `n` most likely tokens ([`super::logprobs`]).
    pub async fn complete(
        &self,
        model: &str,
        prompt: &Prompt,
        sampling: Sampling,
        logprobs: Option<usize>,
        timeout: Option<Duration>,
    ) -> Result<Completion, ServeError> {
        let (tx, rx) = oneshot::channel();
        let sink = Sink::Once(tx);
        if let Err((e, _)) = self.admit(model, prompt, sampling, logprobs, timeout, sink) {
            return Err(e);
        }
        rx.await
            .unwrap_or_else(|_| Err(ServeError::Invalid("the request was dropped".into())))
    }

    /// Completes `prompt`, streaming text and tokens (and with `logprobs`, as for
    /// [`Server::complete`], their logprobs) as they are generated.
    pub fn complete_stream(
        &self,
        model: &str,
        prompt: &Prompt,
        sampling: Sampling,
        logprobs: Option<usize>,
        timeout: Option<Duration>,
    ) -> Result<mpsc::Receiver<StreamEvent>, ServeError> {
        let (tx, rx) = mpsc::channel(1024);
        self.admit(model, prompt, sampling, logprobs, timeout, Sink::Stream(tx))
            .map_err(|(e, _)| e)?;
        Ok(rx)
    }

    /// Records a finished request.
    pub(super) fn finish(&self, p: &Pending, c: &Completion) {
        if let Some(k) = &p.cache_key {
            self.inner.cache.lock().unwrap().put(k.clone(), c.clone());
        }
        let mut st = self.inner.stats.lock().unwrap();
        st.requests_ok += 1;
        st.tokens_generated += u64::from(c.completion_tokens);
        record_latency(&mut st, p.started.elapsed().as_secs_f64());
    }
}
