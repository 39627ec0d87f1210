//! Log-probabilities of generated tokens: OpenAI's `logprobs` (`/v1/completions`) and
//! `logprobs` / `top_logprobs` (`/v1/chat/completions`).
//!
//! **What is reported.** A token's logprob is the `log_softmax` of the model's logits (the
//! f32 logits of the last stage, for the position that chose the token), taken *before*
//! temperature and `top_p` reshape them for sampling: the model's own distribution, as
//! OpenAI reports it, whatever the sampling parameters. The alternatives are the `n` most
//! likely tokens of that distribution, most likely first (ties: the lower id first, so
//! under greedy sampling the chosen token is the first). A token of probability 0 (a logit
//! of -inf, or NaN) reports [`FLOOR`].
//!
//! **Cost.** Only rows whose request asked pay anything: one pass over the vocabulary for
//! the log-sum-exp and one for the top `n`, on the logits the entry already holds to sample
//! from (the last position of each row, returned by the pipeline's last stage).
//!
//! **Tokens.** Each entry names its token: a byte-level model's (`gpt`) token is its byte
//! (`bytes` = `[b]`); a tokenizer's token is the text it stands for
//! ([`crate::text::Tokenizer::token_bytes`]: a byte-fallback `<0xE2>` is the raw byte
//! 0xE2, a byte-level BPE token its bytes); a model without a tokenizer names token `7`
//! `token_id:7` with `bytes` null. A token whose bytes are not whole UTF-8 characters
//! writes each stray byte as `\xHH` in its string; `bytes` are always the raw bytes.
//!
//! **Formats.** [`completion_json`] (`tokens`, `token_logprobs`, `top_logprobs`,
//! `text_offset`) and [`chat_json`] (`content`: `token`, `logprob`, `bytes`,
//! `top_logprobs`) render entries the way OpenAI does; streamed chunks carry the entries of
//! their own tokens.

use crate::text::Tokenizer;
use serde_json::{json, Map, Value};
use std::collections::HashMap;

/// The logprob reported for a token of probability 0 (OpenAI's value for it).
pub const FLOOR: f32 = -9999.0;
/// Most alternatives `/v1/completions` returns per token (`logprobs`, OpenAI's bound).
pub const MAX_COMPLETION_TOP: usize = 5;
/// Most alternatives `/v1/chat/completions` returns per token (`top_logprobs`, OpenAI's
/// bound, 20): the most a stage call may ask the last stage to rank.
pub const MAX_CHAT_TOP: usize = coordinator_free::codec::stage::MAX_TOP_LOGPROBS as usize;

/// One of the most likely tokens at a position.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TopLogprob {
    /// The token's text (see the module's documentation).
    pub token: String,
    /// Its bytes (`None` for a model without a tokenizer).
    pub bytes: Option<Vec<u8>>,
    /// Its log-probability under the model's distribution.
    pub logprob: f32,
}

/// A generated token's log-probability and the most likely tokens at its position.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct TokenLogprob {
    /// The token's text (see the module's documentation).
    pub token: String,
    /// Its bytes (`None` for a model without a tokenizer).
    pub bytes: Option<Vec<u8>>,
    /// Its log-probability under the model's distribution (before temperature and
    /// `top_p`).
    pub logprob: f32,
    /// The most likely tokens there, most likely first (as many as the request asked).
    pub top: Vec<TopLogprob>,
    /// Where its text starts in the completion's text, in characters (UTF-8 lead bytes
    /// before it; streamed chunks continue the count).
    pub text_offset: u32,
}

/// A request parameter out of its range: the 400 to answer names it.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct InvalidParam {
    /// What is wrong.
    pub message: String,
    /// The parameter (`logprobs`, `top_logprobs`).
    pub param: &'static str,
}

fn invalid(message: impl Into<String>, param: &'static str) -> InvalidParam {
    InvalidParam {
        message: message.into(),
        param,
    }
}

/// The alternatives a `/v1/completions` request asks for: `logprobs` absent or null is
/// none (`None`: no logprobs); an integer `n` in 0..=[`MAX_COMPLETION_TOP`] asks for each
/// token's logprob and the `n` most likely tokens.
pub fn completion_top(logprobs: Option<&Value>) -> Result<Option<usize>, InvalidParam> {
    match logprobs {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64() {
            Some(n) if n as usize <= MAX_COMPLETION_TOP => Ok(Some(n as usize)),
            _ => Err(invalid(
                format!("logprobs must be an integer from 0 to {MAX_COMPLETION_TOP}"),
                "logprobs",
            )),
        },
    }
}

/// The alternatives a `/v1/chat/completions` request asks for: `logprobs` (a boolean;
/// absent, null or false: none, `None`) and `top_logprobs` (an integer in
/// 0..=[`MAX_CHAT_TOP`]; absent or null: 0), which needs `logprobs` true.
pub fn chat_top(
    logprobs: Option<&Value>,
    top_logprobs: Option<&Value>,
) -> Result<Option<usize>, InvalidParam> {
    let on = match logprobs {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(invalid("logprobs must be a boolean", "logprobs")),
    };
    let top = match top_logprobs {
        None | Some(Value::Null) => None,
        Some(v) => match v.as_u64() {
            Some(n) if n as usize <= MAX_CHAT_TOP => Some(n as usize),
            _ => {
                return Err(invalid(
                    format!("top_logprobs must be an integer from 0 to {MAX_CHAT_TOP}"),
                    "top_logprobs",
                ))
            }
        },
    };
    match (on, top) {
        (false, Some(_)) => Err(invalid(
            "top_logprobs requires logprobs to be true",
            "top_logprobs",
        )),
        (false, None) => Ok(None),
        (true, top) => Ok(Some(top.unwrap_or(0))),
    }
}

/// The log-probability of token `chosen` under `logits` (`log_softmax`, NaN read as -inf,
/// accumulated in f64) and the `top` most likely tokens with theirs, most likely first
/// (ties: the lower id first). A probability of 0 is [`FLOOR`].
pub fn rank(logits: &[f32], chosen: usize, top: usize) -> (f32, Vec<(u32, f32)>) {
    let value = |x: f32| if x.is_nan() { f32::NEG_INFINITY } else { x };
    let max = logits
        .iter()
        .map(|&x| value(x))
        .fold(f32::NEG_INFINITY, f32::max);
    let lse = if max.is_finite() {
        let sum: f64 = logits
            .iter()
            .map(|&x| (value(x) as f64 - max as f64).exp())
            .sum();
        max as f64 + sum.ln()
    } else {
        0.0
    };
    let logprob = |x: f32| -> f32 {
        let x = value(x);
        if !max.is_finite() {
            // No finite logit: the largest ones share everything.
            return if x == max && max > f32::NEG_INFINITY {
                0.0
            } else {
                FLOOR
            };
        }
        let lp = (x as f64 - lse) as f32;
        if lp.is_nan() || lp < FLOOR {
            FLOOR
        } else {
            lp.min(0.0)
        }
    };
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(top + 1);
    if top > 0 {
        for (i, &x) in logits.iter().enumerate() {
            let x = value(x);
            if best.len() == top && x <= best[top - 1].1 {
                continue;
            }
            let at = best.partition_point(|&(_, y)| y >= x);
            best.insert(at, (i as u32, x));
            best.truncate(top);
        }
    }
    let chosen = logits.get(chosen).map_or(FLOOR, |&x| logprob(x));
    let top = best.into_iter().map(|(i, x)| (i, logprob(x))).collect();
    (chosen, top)
}

/// How a model's token ids are named (see the module's documentation).
#[derive(Clone, Copy)]
pub(super) enum Vocab<'a> {
    /// A byte-level model: a token is a byte.
    Bytes,
    /// A tokenizer's tokens.
    Tokenizer(&'a Tokenizer),
    /// A model without a tokenizer: `token_id:N`.
    Ids,
}

/// Names tokens for logprobs entries, remembering the names it made (a row's
/// alternatives repeat from step to step).
#[derive(Default)]
pub(super) struct Namer {
    names: HashMap<u32, (String, Option<Vec<u8>>)>,
}

/// Names remembered per row at most (then the memory starts over).
const MAX_NAMES: usize = 4096;

impl Namer {
    /// The text and bytes of token `id`.
    fn name(&mut self, vocab: Vocab, id: u32) -> (String, Option<Vec<u8>>) {
        if let Some(n) = self.names.get(&id) {
            return n.clone();
        }
        let n = match vocab {
            Vocab::Bytes => {
                let b = vec![id as u8];
                (text_of(&b), Some(b))
            }
            Vocab::Tokenizer(t) => match t.token_bytes(id) {
                Some(b) => (text_of(&b), Some(b)),
                None => (format!("token_id:{id}"), None),
            },
            Vocab::Ids => (format!("token_id:{id}"), None),
        };
        if self.names.len() >= MAX_NAMES {
            self.names.clear();
        }
        self.names.insert(id, n.clone());
        n
    }

    /// The entry of token `chosen`, of `logprob`, with `best`, the most likely tokens and
    /// theirs (from [`rank`], on the stage that sampled it); its text starts at character
    /// `text_offset` of the completion.
    pub(super) fn entry(
        &mut self,
        vocab: Vocab,
        chosen: u32,
        logprob: f32,
        best: Vec<(u32, f32)>,
        text_offset: u32,
    ) -> TokenLogprob {
        let (token, bytes) = self.name(vocab, chosen);
        let top = best
            .into_iter()
            .map(|(id, logprob)| {
                let (token, bytes) = self.name(vocab, id);
                TopLogprob {
                    token,
                    bytes,
                    logprob,
                }
            })
            .collect();
        TokenLogprob {
            token,
            bytes,
            logprob,
            top,
            text_offset,
        }
    }
}

/// `bytes` as a string: whole UTF-8 characters as they are, any other byte as `\xHH`.
pub fn text_of(bytes: &[u8]) -> String {
    let mut s = String::new();
    for chunk in bytes.utf8_chunks() {
        s.push_str(chunk.valid());
        for b in chunk.invalid() {
            s.push_str(&format!("\\x{b:02x}"));
        }
    }
    s
}

/// Counts the characters of a growing text (its UTF-8 lead bytes), resuming where it
/// stopped while the text only grows.
#[derive(Default)]
pub(super) struct CharCount {
    bytes: usize,
    chars: usize,
}

impl CharCount {
    /// The characters of `text`.
    pub(super) fn of(&mut self, text: &[u8]) -> u32 {
        if text.len() < self.bytes {
            *self = CharCount::default();
        }
        let lead = |&&b: &&u8| b & 0xC0 != 0x80;
        self.chars += text[self.bytes..].iter().filter(lead).count();
        self.bytes = text.len();
        self.chars as u32
    }
}

/// `/v1/completions`' `logprobs` of `entries`: `tokens`, `token_logprobs`,
/// `top_logprobs` (per token an object from token text to logprob holding the most likely
/// tokens and the chosen one, so up to `n` + 1 keys; a text two tokens share appears once,
/// with the larger logprob; keys are in no particular order) and `text_offset`.
pub fn completion_json(entries: &[TokenLogprob]) -> Value {
    let tops: Vec<Value> = entries
        .iter()
        .map(|e| {
            let mut m = Map::new();
            for t in &e.top {
                m.entry(t.token.clone()).or_insert(json!(t.logprob));
            }
            m.entry(e.token.clone()).or_insert(json!(e.logprob));
            Value::Object(m)
        })
        .collect();
    json!({
        "tokens": entries.iter().map(|e| &e.token).collect::<Vec<_>>(),
        "token_logprobs": entries.iter().map(|e| e.logprob).collect::<Vec<_>>(),
        "top_logprobs": tops,
        "text_offset": entries.iter().map(|e| e.text_offset).collect::<Vec<_>>(),
    })
}

/// `/v1/chat/completions`' `logprobs` of `entries`: `content`, one object per token
/// (`token`, `logprob`, `bytes`, `top_logprobs`: the most likely tokens, each `token`,
/// `logprob`, `bytes`), and `refusal` null.
pub fn chat_json(entries: &[TokenLogprob]) -> Value {
    let content: Vec<Value> = entries
        .iter()
        .map(|e| {
            let top: Vec<Value> = e
                .top
                .iter()
                .map(|t| json!({"token": t.token, "logprob": t.logprob, "bytes": t.bytes}))
                .collect();
            json!({"token": e.token, "logprob": e.logprob, "bytes": e.bytes, "top_logprobs": top})
        })
        .collect();
    json!({"content": content, "refusal": null})
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `log_softmax` computed the plain way, in f64.
    fn log_softmax(x: &[f32]) -> Vec<f64> {
        let m = x.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
        let s: f64 = x.iter().map(|&v| (v as f64 - m).exp()).sum();
        x.iter().map(|&v| v as f64 - m - s.ln()).collect()
    }

    #[test]
    fn rank_is_log_softmax_and_its_top_sorted() {
        let logits = [1.0f32, 3.0, -2.0, 3.0, 0.5, 2.5];
        let want = log_softmax(&logits);
        let (lp, top) = rank(&logits, 4, 3);
        assert!((lp as f64 - want[4]).abs() < 1e-6, "{lp} vs {}", want[4]);
        // Ties: the lower id first (3.0 at ids 1 and 3), then 2.5.
        let ids: Vec<u32> = top.iter().map(|t| t.0).collect();
        assert_eq!(ids, [1, 3, 5]);
        for (id, lp) in &top {
            assert!((*lp as f64 - want[*id as usize]).abs() < 1e-6);
        }
        // Probabilities sum to 1.
        let total: f64 = (0..logits.len())
            .map(|i| (rank(&logits, i, 0).0 as f64).exp())
            .sum();
        assert!((total - 1.0).abs() < 1e-6, "{total}");
        // The greedy token is the first alternative, with the same logprob.
        let greedy = coordinator_free::serving::sample_token(&logits, 0.0, 1.0, 0.0);
        let (g, top) = rank(&logits, greedy, 1);
        assert_eq!(top, vec![(greedy as u32, g)]);
        // More alternatives than tokens: all of them.
        assert_eq!(rank(&logits, 0, 50).1.len(), logits.len());
        assert!(rank(&logits, 0, 0).1.is_empty());
    }

    #[test]
    fn rank_survives_infinities_and_nan() {
        let (lp, top) = rank(&[0.0, f32::NEG_INFINITY, f32::NAN, 0.0], 1, 4);
        assert_eq!(lp, FLOOR);
        assert!((top[0].1 - (0.5f32).ln()).abs() < 1e-6);
        assert_eq!(top[0].0, 0);
        assert_eq!(top[1].0, 3);
        assert_eq!(top[2].1, FLOOR);
        assert_eq!(top[3].1, FLOOR);
        // A huge spread stays finite; an out-of-range choice is FLOOR, never a panic.
        let (lp, _) = rank(&[1e30, -1e30], 1, 0);
        assert_eq!(lp, FLOOR);
        assert_eq!(rank(&[1.0], 9, 1).0, FLOOR);
        assert_eq!(rank(&[], 0, 3), (FLOOR, vec![]));
        let (lp, _) = rank(&[f32::INFINITY, 0.0], 0, 0);
        assert_eq!(lp, 0.0);
        assert_eq!(rank(&[f32::NAN, f32::NAN], 0, 0).0, FLOOR);
    }

    #[test]
    fn completion_logprobs_are_null_or_0_to_5() {
        assert_eq!(completion_top(None).unwrap(), None);
        assert_eq!(completion_top(Some(&json!(null))).unwrap(), None);
        assert_eq!(completion_top(Some(&json!(0))).unwrap(), Some(0));
        assert_eq!(completion_top(Some(&json!(5))).unwrap(), Some(5));
        for bad in [json!(6), json!(-1), json!(true), json!("2"), json!(1.5)] {
            let e = completion_top(Some(&bad)).unwrap_err();
            assert_eq!(e.param, "logprobs", "{bad}");
        }
    }

    #[test]
    fn chat_top_logprobs_need_logprobs() {
        let t = |lp: Value, top: Value| chat_top(Some(&lp), Some(&top));
        assert_eq!(chat_top(None, None).unwrap(), None);
        assert_eq!(t(json!(false), json!(null)).unwrap(), None);
        assert_eq!(t(json!(true), json!(null)).unwrap(), Some(0));
        assert_eq!(chat_top(Some(&json!(true)), None).unwrap(), Some(0));
        assert_eq!(t(json!(true), json!(20)).unwrap(), Some(20));
        assert_eq!(t(json!(true), json!(3)).unwrap(), Some(3));
        for (lp, top, param) in [
            (json!(false), json!(2), "top_logprobs"),
            (json!(null), json!(0), "top_logprobs"),
            (json!(true), json!(21), "top_logprobs"),
            (json!(true), json!(-1), "top_logprobs"),
            (json!(1), json!(null), "logprobs"),
            (json!("yes"), json!(2), "logprobs"),
        ] {
            let e = t(lp.clone(), top.clone()).unwrap_err();
            assert_eq!(e.param, param, "{lp} {top}: {e}");
        }
        let e = chat_top(None, Some(&json!(2))).unwrap_err();
        assert_eq!(e.to_string(), "top_logprobs requires logprobs to be true");
    }

    fn entry(token: &str, logprob: f32, top: &[(&str, f32)], offset: u32) -> TokenLogprob {
        let t = |s: &str, lp: f32| TopLogprob {
            token: s.into(),
            bytes: Some(s.as_bytes().to_vec()),
            logprob: lp,
        };
        TokenLogprob {
            token: token.into(),
            bytes: Some(token.as_bytes().to_vec()),
            logprob,
            top: top.iter().map(|&(s, lp)| t(s, lp)).collect(),
            text_offset: offset,
        }
    }

    #[test]
    fn the_json_has_openais_shapes() {
        let e = [
            entry(" a", -0.5, &[(" a", -0.5), ("b", -1.25)], 0),
            // Sampled outside the top: the completions object adds it.
            entry("é", -3.0, &[("c", -0.25)], 2),
        ];
        assert_eq!(
            completion_json(&e),
            json!({
                "tokens": [" a", "é"],
                "token_logprobs": [-0.5, -3.0],
                "top_logprobs": [{" a": -0.5, "b": -1.25}, {"c": -0.25, "é": -3.0}],
                "text_offset": [0, 2],
            })
        );
        assert_eq!(
            chat_json(&e),
            json!({"content": [
                {"token": " a", "logprob": -0.5, "bytes": [32, 97], "top_logprobs": [
                    {"token": " a", "logprob": -0.5, "bytes": [32, 97]},
                    {"token": "b", "logprob": -1.25, "bytes": [98]},
                ]},
                {"token": "é", "logprob": -3.0, "bytes": [0xC3, 0xA9], "top_logprobs": [
                    {"token": "c", "logprob": -0.25, "bytes": [99]},
                ]},
            ], "refusal": null})
        );
        assert_eq!(
            completion_json(&[]),
            json!({"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []})
        );
    }

    #[test]
    fn tokens_are_named_by_their_bytes() {
        let mut n = Namer::default();
        assert_eq!(n.name(Vocab::Bytes, 65), ("A".into(), Some(vec![65])));
        assert_eq!(
            n.name(Vocab::Bytes, 0xE2),
            ("\\xe2".into(), Some(vec![0xE2]))
        );
        assert_eq!(n.name(Vocab::Ids, 7), ("token_id:7".into(), None));
        assert_eq!(text_of("a€".as_bytes()), "a€");
        assert_eq!(text_of(&[b'a', 0xE2, 0x82]), "a\\xe2\\x82");
        let (logprob, best) = rank(&[0.0, 1.0, 2.0], 1, 2);
        let e = n.entry(Vocab::Bytes, 1, logprob, best, 4);
        assert_eq!(e.token, "\u{1}");
        assert_eq!(e.text_offset, 4);
        let tops: Vec<&str> = e.top.iter().map(|t| t.token.as_str()).collect();
        assert_eq!(tops, ["\u{2}", "\u{1}"]);
        assert_eq!(e.top[1].logprob, e.logprob);
    }

    #[test]
    fn characters_are_counted_as_the_text_grows() {
        let mut c = CharCount::default();
        assert_eq!(c.of(b""), 0);
        assert_eq!(c.of("ab".as_bytes()), 2);
        // A character's first bytes count once; its continuation bytes never.
        assert_eq!(c.of(&"ab€".as_bytes()[..3]), 3);
        assert_eq!(c.of("ab€".as_bytes()), 3);
        assert_eq!(c.of("ab€d".as_bytes()), 4);
        // A shorter text (a new attempt) is counted afresh.
        assert_eq!(c.of("x".as_bytes()), 1);
    }
}
