//! One request inside a lane: its tokens, its sampling state, and what its client has
//! been sent.
//!
//! After every prefill or decode call the lane hands each row its logits ([`Row::step`]):
//! the row samples its next token (`coordinator_free::serving::sample_token`, from the
//! request's seed, so a retry regenerates the same tokens), asks the core whether it is
//! finished (`coordinator_free::stop::finish`) and what of its text may be streamed yet
//! (`coordinator_free::stop::StreamRelease`), and sends that and, at the end, the
//! completion to its client.

use super::completions::{Pending, Sink};
use super::lanes::LaneSlot;
use super::{Completion, ServeError, Server, StreamEvent};
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
    /// The tokens of this attempt (cut like `out`).
    tokens: Vec<u32>,
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
        Row {
            p,
            id: rand::random(),
            next: 0,
            generated: 0,
            out: Vec::new(),
            tokens: Vec::new(),
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
        self.rng = SplitMix64::new(self.p.sampling.seed);
    }

    /// Takes the next token from `logits` (a finished row takes a filler token and
    /// stays finished). `full`: the batch has filled the context.
    pub(super) fn step(&mut self, logits: &[f32], full: bool, srv: &Server) -> u32 {
        if self.done {
            return 0;
        }
        let s = &self.p.sampling;
        let u = if s.temperature > 0.0 {
            self.rng.next_f64()
        } else {
            0.0
        };
        let t = coordinator_free::serving::sample_token(logits, s.temperature, s.top_p, u) as u32;
        self.tokens.push(t);
        self.generated += 1;
        let finish = if self.p.byte_level {
            // A byte-level model's token is its text's next byte; stop sequences end the
            // text before them.
            self.out.push(t as u8);
            let f = stop::finish(&self.out, &s.stop, s.max_tokens, full);
            if let Some((_, keep)) = f {
                self.out.truncate(keep);
                self.tokens.truncate(keep);
            }
            f
        } else {
            let n = self.tokens.len();
            (n >= s.max_tokens as usize || full).then_some((Finish::Length, n))
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
            };
            self.complete(c, srv);
        }
        t
    }

    /// Streams what is safe to send: never bytes that may start a stop sequence, and only
    /// whole UTF-8 characters (a byte-level model), or every new token (another); a retry
    /// skips what was sent.
    fn stream(&mut self, finished: bool) {
        let Sink::Stream(tx) = &self.p.sink else {
            return;
        };
        if self.p.byte_level {
            let stops = &self.p.sampling.stop;
            if let Some(r) = self.release.release(&self.out, stops, finished) {
                let text = String::from_utf8_lossy(&self.out[r.clone()]).into_owned();
                let tokens = self.out[r].iter().map(|&b| u32::from(b)).collect();
                let _ = tx.try_send(StreamEvent::Text { text, tokens });
            }
        } else if self.tokens.len() > self.sent_tokens {
            let tokens = self.tokens[self.sent_tokens..].to_vec();
            self.sent_tokens = self.tokens.len();
            let text = String::new();
            let _ = tx.try_send(StreamEvent::Text { text, tokens });
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
