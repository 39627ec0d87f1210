//! One request inside a lane: its tokens, its sampling state, and what its client has
//! been sent.
//!
//! Before every prefill or decode call the row says how its next token is to be sampled
//! ([`Row::sampling`]: its temperature, top_p, logprobs, and the next draw of the
//! request's seeded generator, so a retry regenerates the same tokens). The last stage
//! samples it (`super::sample`) and the lane hands it to the row ([`Row::step`]), which
//! asks the core whether it is finished (`coordinator_free::stop::finish`) and what of
//! its text may be streamed yet (`coordinator_free::stop::StreamRelease`), and sends
//! that and, at the end, the completion to its client. A row whose request asked for
//! logprobs gets them from the stage too (`super::logprobs` names their tokens) and
//! keeps an entry beside each token it keeps.

use super::completions::{Pending, Sink};
use super::lanes::LaneSlot;
use super::logprobs::{CharCount, Namer, Vocab};
use super::{Completion, ServeError, Server, StreamEvent, TokenLogprob};
use crate::text::Detokenizer;
use coordinator_free::codec::stage::{RowSampling, SampledRow, MAX_TOP_LOGPROBS};
use coordinator_free::serving::SplitMix64;
use coordinator_free::stop::{self, Finish, StreamRelease};

/// One request in a lane: its sampling state and how much of it was streamed.
pub(super) struct Row {
    pub(super) p: Pending,
    /// The row's id on the stages (KV caches); a new one for every attempt.
    pub(super) id: u64,
    /// The token to feed at the next decode step.
    pub(super) next: u32,
    /// The text of this attempt (a byte-level model's; cut before a stop sequence once one
    /// matched).
    out: Vec<u8>,
    /// The tokens of this attempt (a byte-level model's cut like `out`; another's up to
    /// the one that completed a stop sequence, a stop token left out).
    tokens: Vec<u32>,
    /// The logprobs of `tokens`, one each, when the request asked for them.
    logprobs: Vec<TokenLogprob>,
    /// Names the tokens of logprobs entries.
    namer: Namer,
    /// The characters of `out` (where the next token's text starts).
    chars: CharCount,
    /// The detokeniser of this attempt (a model with a tokenizer).
    detok: Option<Detokenizer>,
    /// What a streaming client was sent, across attempts (a retry skips it): the text of
    /// a byte-level model, the count of tokens of another.
    release: StreamRelease,
    sent_tokens: usize,
    rng: SplitMix64,
    /// Tokens generated in this attempt.
    generated: usize,
    /// Answered (completed or failed): it leaves its lane.
    pub(super) done: bool,
    /// Its place in the lane it was dispatched to (released when answered).
    pub(super) slot: Option<LaneSlot>,
}

impl Row {
    /// A row for an admitted request, not yet in a lane.
    pub(super) fn new(p: Pending) -> Row {
        let rng = SplitMix64::new(p.sampling.seed);
        let detok = p.tokenizer.as_ref().map(|t| t.detokenizer(true));
        Row {
            detok,
            p,
            id: rand::random(),
            next: 0,
            generated: 0,
            out: Vec::new(),
            tokens: Vec::new(),
            logprobs: Vec::new(),
            namer: Namer::default(),
            chars: CharCount::default(),
            release: StreamRelease::new(),
            sent_tokens: 0,
            rng,
            done: false,
            slot: None,
        }
    }

    /// A fresh attempt: the same seed, the same tokens.
    pub(super) fn restart(&mut self) {
        self.id = rand::random();
        self.generated = 0;
        self.out.clear();
        self.tokens.clear();
        self.logprobs.clear();
        self.chars = CharCount::default();
        self.detok = self.p.tokenizer.as_ref().map(|t| t.detokenizer(true));
        self.rng = SplitMix64::new(self.p.sampling.seed);
    }

    /// How the last stage is to sample this row's next token: the request's temperature,
    /// top_p and logprobs, and the next draw of its seeded generator (one per token, so
    /// a retry draws the same).
    pub(super) fn sampling(&mut self) -> RowSampling {
        let s = &self.p.sampling;
        let u = if s.temperature > 0.0 {
            self.rng.next_f64()
        } else {
            0.0
        };
        RowSampling {
            temperature: s.temperature,
            top_p: s.top_p,
            u,
            logprobs: self
                .p
                .logprobs
                .map(|k| k.min(MAX_TOP_LOGPROBS as usize) as u8),
        }
    }

    /// Takes the next token the last stage sampled (with what [`Row::sampling`] asked;
    /// a finished row takes a filler token and stays finished). `full`: the batch has
    /// filled the context.
    pub(super) fn step(&mut self, sampled: SampledRow, full: bool, srv: &Server) -> u32 {
        if self.done {
            return 0;
        }
        let (t, logprob, mut best) = sampled;
        self.generated += 1;
        // The logprobs of the model's distribution (before temperature and top_p).
        let entry = self.p.logprobs.map(|top| {
            let vocab = match (&self.p.tokenizer, self.p.byte_level) {
                (_, true) => Vocab::Bytes,
                (Some(k), false) => Vocab::Tokenizer(k),
                (None, false) => Vocab::Ids,
            };
            let offset = self.chars.of(&self.out);
            best.truncate(top);
            self.namer.entry(vocab, t, logprob, best, offset)
        });
        let s = &self.p.sampling;
        let finish = if self.p.byte_level {
            // A byte-level model's token is its text's next byte; stop sequences end the
            // text before them.
            self.tokens.push(t);
            self.logprobs.extend(entry);
            self.out.push(t as u8);
            let f = stop::finish(&self.out, &s.stop, s.max_tokens, full);
            if let Some((_, keep)) = f {
                self.out.truncate(keep);
                self.tokens.truncate(keep);
                self.logprobs.truncate(keep);
            }
            f
        } else {
            self.token_step(t, entry, full)
        };
        self.stream(finish.is_some());
        if let Some((reason, _)) = finish {
            let c = Completion {
                text: String::from_utf8_lossy(&self.out).into_owned(),
                tokens: self.tokens.clone(),
                finish_reason: reason.reason().into(),
                prompt_tokens: self.p.prompt.len() as u32,
                completion_tokens: self.generated as u32,
                cached: false,
                logprobs: self.logprobs.clone(),
            };
            self.complete(c, srv);
        }
        t
    }

    /// A step of a model whose tokens are not bytes: a stop token of its tokenizer ends
    /// the completion (left out of text and tokens); otherwise the token joins the tokens
    /// and its text (when there is a tokenizer) the text, where a stop sequence ends it
    /// before the sequence. Then `max_tokens` or a full context end it. `entry`, its
    /// logprobs when asked for, joins them beside the token.
    fn token_step(
        &mut self,
        t: u32,
        entry: Option<TokenLogprob>,
        full: bool,
    ) -> Option<(Finish, usize)> {
        let s = &self.p.sampling;
        let is_stop = self.p.tokenizer.as_ref().is_some_and(|k| k.is_stop(t));
        if !is_stop {
            self.tokens.push(t);
            self.logprobs.extend(entry);
            if let Some(d) = &mut self.detok {
                let text = d.push(t).unwrap_or_else(|e| {
                    tracing::debug!("detokenising: {e}");
                    String::new()
                });
                self.out.extend_from_slice(text.as_bytes());
            }
        }
        let mut finish = if is_stop || stop::stop_at(&self.out, &s.stop).is_some() {
            Some(Finish::Stop)
        } else if self.generated >= s.max_tokens as usize || full {
            Some(Finish::Length)
        } else {
            None
        };
        if finish.is_some() {
            // The text held back for an incomplete character, then a stop sequence in
            // it may end it earlier.
            if let Some(d) = &mut self.detok {
                let rest = d.finish().unwrap_or_default();
                self.out.extend_from_slice(rest.as_bytes());
            }
            if let Some(i) = stop::stop_at(&self.out, &s.stop) {
                self.out.truncate(i);
                finish = Some(Finish::Stop);
            }
        }
        finish.map(|f| (f, self.out.len()))
    }

    /// Streams what is safe to send: never text that may start a stop sequence, only whole
    /// UTF-8 characters, and (a model whose tokens are not bytes) every new token; a retry
    /// skips what was sent.
    fn stream(&mut self, finished: bool) {
        let Sink::Stream(tx) = &self.p.sink else {
            return;
        };
        if self.p.byte_level {
            let stops = &self.p.sampling.stop;
            if let Some(r) = self.release.release(&self.out, stops, finished) {
                let text = String::from_utf8_lossy(&self.out[r.clone()]).into_owned();
                let tokens = self.out[r.clone()].iter().map(|&b| u32::from(b)).collect();
                // The text's bytes are its tokens: their entries are the same range.
                let logprobs = self.logprobs.get(r).unwrap_or_default().to_vec();
                let _ = tx.try_send(StreamEvent::Text {
                    text,
                    tokens,
                    logprobs,
                });
            }
        } else {
            let stops = &self.p.sampling.stop;
            let text = match self.release.release(&self.out, stops, finished) {
                Some(r) => String::from_utf8_lossy(&self.out[r]).into_owned(),
                None => String::new(),
            };
            let tokens = self
                .tokens
                .get(self.sent_tokens..)
                .unwrap_or_default()
                .to_vec();
            let logprobs = self
                .logprobs
                .get(self.sent_tokens..)
                .unwrap_or_default()
                .to_vec();
            self.sent_tokens = self.sent_tokens.max(self.tokens.len());
            if !text.is_empty() || !tokens.is_empty() {
                let _ = tx.try_send(StreamEvent::Text {
                    text,
                    tokens,
                    logprobs,
                });
            }
        }
    }

    /// Records `c` and sends it to the client; the row is done.
    fn complete(&mut self, c: Completion, srv: &Server) {
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

    /// Tokens generated in this attempt (before any stop sequence cut the text).
    pub(super) fn out_len(&self) -> usize {
        self.generated
    }

    /// Answers the client with `e` (unless answered already); the row is done.
    pub(super) fn fail(&mut self, e: ServeError, srv: &Server) {
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
