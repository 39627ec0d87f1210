//! Where a completion stops, and how much of its text a streaming client may be sent yet.
//!
//! - [`finish`] decides, after each generated token, whether the completion ends: at the
//!   first stop sequence that occurs in the text (the answer is the text before it), or when
//!   it has its `max_tokens` or the model's context is full.
//! - [`StreamRelease`] decides which bytes of the growing text go to a streaming client now:
//!   never bytes that may still turn out to be the start of a stop sequence (they are held
//!   back until a later token settles it), only whole UTF-8 characters (a character split
//!   across tokens waits for its last byte), and nothing sent before (a retried request
//!   regenerates the same bytes; the client already has them). A finished completion flushes
//!   everything that is left.
//!
//! Both are pure functions of the bytes generated so far (one token is one byte), so the
//! shell only feeds them and sends what they release.

use std::ops::Range;

/// Why a completion ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// A stop sequence occurred.
    Stop,
    /// `max_tokens` were generated, or the model's context is full.
    Length,
}

impl Finish {
    /// The OpenAI `finish_reason`: `stop` or `length`.
    pub fn reason(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

/// Whether a completion ends after its latest token, and where its text ends.
///
/// `out` is every byte generated so far, `stops` the stop sequences (empty ones are
/// ignored; the first in list order that occurs in `out` wins, and the text ends where it
/// first occurs), `max_tokens` the most tokens to generate, and `full` whether the model's
/// context has no room for another token. Returns why it ended and how many leading bytes
/// of `out` are the answer; `None` while it goes on.
pub fn finish(
    out: &[u8],
    stops: &[String],
    max_tokens: u32,
    full: bool,
) -> Option<(Finish, usize)> {
    if let Some(i) = stop_at(out, stops) {
        return Some((Finish::Stop, i));
    }
    (out.len() >= max_tokens as usize || full).then_some((Finish::Length, out.len()))
}

/// Where the first stop sequence (in list order, empty ones ignored) that occurs in `out`
/// first occurs.
pub fn stop_at(out: &[u8], stops: &[String]) -> Option<usize> {
    stops
        .iter()
        .filter(|s| !s.is_empty())
        .find_map(|s| find(out, s.as_bytes()))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Length of the longest suffix of `out` that is a proper prefix of `stop`: the bytes that
/// may still become `stop` once more bytes arrive.
pub fn partial_suffix(out: &[u8], stop: &[u8]) -> usize {
    (1..stop.len().min(out.len() + 1))
        .rev()
        .find(|&k| out[out.len() - k..] == stop[..k])
        .unwrap_or(0)
}

/// How many leading bytes of `b` end on a UTF-8 character boundary: all of them when
/// `finished` (the rest is sent lossily), or when `b` holds an invalid sequence (no later
/// byte can make it valid; it is sent lossily too).
pub fn utf8_safe(b: &[u8], finished: bool) -> usize {
    if finished {
        return b.len();
    }
    match std::str::from_utf8(b) {
        Ok(_) => b.len(),
        Err(e) if e.error_len().is_none() => e.valid_up_to(),
        Err(_) => b.len(),
    }
}

/// What a streaming client has been sent of one completion. Keep one per request, across
/// its retries: a retry starts its text again from nothing and regenerates the same bytes,
/// and nothing is sent twice.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StreamRelease {
    /// Bytes of text sent (ends on UTF-8 boundaries unless the text was invalid or done).
    sent: usize,
}

impl StreamRelease {
    /// Nothing sent yet.
    pub fn new() -> StreamRelease {
        StreamRelease::default()
    }

    /// Bytes of text sent so far.
    pub fn sent(&self) -> usize {
        self.sent
    }

    /// The range of `out` to send now, if any. `out` is the text so far (already cut at a
    /// stop sequence when one matched), `stops` the request's stop sequences, and
    /// `finished` whether the completion ended with this text (then nothing is held back).
    pub fn release(
        &mut self,
        out: &[u8],
        stops: &[String],
        finished: bool,
    ) -> Option<Range<usize>> {
        let hold = if finished {
            0
        } else {
            stops
                .iter()
                .map(|st| partial_suffix(out, st.as_bytes()))
                .max()
                .unwrap_or(0)
        };
        let safe = utf8_safe(&out[..out.len() - hold], finished);
        // A retry regenerates the same bytes (same seed), so nothing below `sent` goes twice.
        let send = (safe > self.sent).then_some(self.sent..safe);
        if send.is_some() {
            self.sent = safe;
        }
        send
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    /// A finished completion: why, and its text.
    type Ended = (Finish, Vec<u8>);

    /// Generates `bytes` one at a time as a lane does, and returns the streamed pieces and
    /// the finished completion (reason, text).
    fn generate(
        bytes: &[u8],
        stops: &[String],
        max_tokens: u32,
        rel: &mut StreamRelease,
    ) -> (Vec<Vec<u8>>, Option<Ended>) {
        let mut out = Vec::new();
        let mut pieces = Vec::new();
        for &b in bytes {
            out.push(b);
            let end = finish(&out, stops, max_tokens, false);
            if let Some((_, n)) = end {
                out.truncate(n);
            }
            if let Some(r) = rel.release(&out, stops, end.is_some()) {
                pieces.push(out[r].to_vec());
            }
            if let Some((f, _)) = end {
                return (pieces, Some((f, out)));
            }
        }
        (pieces, None)
    }

    #[test]
    fn a_stop_spanning_two_tokens_ends_the_text_before_it_and_is_never_streamed() {
        let s = stops(&["=\n"]);
        let mut rel = StreamRelease::new();
        let (pieces, end) = generate(b"12=\nmore", &s, 16, &mut rel);
        assert_eq!(end, Some((Finish::Stop, b"12".to_vec())));
        assert_eq!(pieces, vec![b"1".to_vec(), b"2".to_vec()]);
        assert_eq!(rel.sent(), 2);
    }

    #[test]
    fn a_stop_prefix_at_the_end_is_held_back_until_the_next_token_settles_it() {
        let s = stops(&["=\n"]);
        let mut rel = StreamRelease::new();
        assert_eq!(
            rel.release(b"abc=", &s, false),
            Some(0..3),
            "`=` may start the stop"
        );
        assert_eq!(rel.release(b"abc=", &s, false), None, "nothing new");
        // The next byte shows it was not the stop: the held byte goes out with it.
        assert_eq!(rel.release(b"abc=x", &s, false), Some(3..5));
        assert_eq!(partial_suffix(b"abc=", b"=\n"), 1);
        assert_eq!(partial_suffix(b"abc", b"=\n"), 0);
        // Only proper prefixes: a whole stop is not a partial one.
        assert_eq!(partial_suffix(b"ab", b"ab"), 0);
        assert_eq!(partial_suffix(b"xa", b"ab"), 1);
        assert_eq!(partial_suffix(b"xab", b"abc"), 2);
        // The longest hold over all stops wins.
        let s = stops(&["zz", "=ab"]);
        let mut rel = StreamRelease::new();
        assert_eq!(rel.release(b"x=a", &s, false), Some(0..1));
    }

    #[test]
    fn a_multi_byte_character_split_across_tokens_waits_for_its_last_byte() {
        let e = "é".as_bytes();
        assert_eq!(utf8_safe(&e[..1], false), 0);
        assert_eq!(utf8_safe(b"ab", false), 2);
        let mut rel = StreamRelease::new();
        let mut out = b"a".to_vec();
        out.push(e[0]);
        assert_eq!(rel.release(&out, &[], false), Some(0..1));
        out.push(e[1]);
        assert_eq!(rel.release(&out, &[], false), Some(1..3));
        assert_eq!(std::str::from_utf8(&out[1..3]), Ok("é"));
        // An invalid byte can never become valid: it goes out (lossily) at once.
        let mut rel = StreamRelease::new();
        assert_eq!(rel.release(&[b'a', 0xff], &[], false), Some(0..2));
        // A three-byte character fed a byte at a time (no stops).
        let (pieces, end) = generate("x€".as_bytes(), &[], 4, &mut StreamRelease::new());
        assert_eq!(end, Some((Finish::Length, "x€".as_bytes().to_vec())));
        assert_eq!(pieces, vec![b"x".to_vec(), "€".as_bytes().to_vec()]);
    }

    #[test]
    fn a_finished_completion_flushes_what_was_held_back() {
        let s = stops(&["=\n"]);
        // max_tokens reached with a stop prefix and half a character at the end.
        let mut rel = StreamRelease::new();
        let (pieces, end) = generate(b"ab=", &s, 3, &mut rel);
        assert_eq!(end, Some((Finish::Length, b"ab=".to_vec())));
        assert_eq!(pieces.concat(), b"ab=".to_vec());
        // Half a character at the end when the length runs out: sent lossily.
        let e = "é".as_bytes();
        let (pieces, end) = generate(&[b'a', e[0]], &[], 2, &mut StreamRelease::new());
        assert_eq!(end, Some((Finish::Length, vec![b'a', e[0]])));
        assert_eq!(pieces, vec![b"a".to_vec(), vec![e[0]]], "lossy at the end");
        // A stop that ends the text releases what was held back before it, so the stream
        // carries exactly the completion's text ("x=" of "x=\n" with stops "\n", "=\n").
        let mut rel = StreamRelease::new();
        let s = stops(&["\n", "=\n"]);
        let (pieces, end) = generate(b"x=\n", &s, 8, &mut rel);
        assert_eq!(end, Some((Finish::Stop, b"x=".to_vec())));
        assert_eq!(pieces.concat(), b"x=".to_vec());
        assert_eq!(utf8_safe(&e[..1], true), 1);
        // A full context ends it too.
        assert_eq!(finish(b"a", &[], 16, true), Some((Finish::Length, 1)));
        assert_eq!(finish(b"a", &[], 16, false), None);
        assert_eq!(Finish::Stop.reason(), "stop");
        assert_eq!(Finish::Length.reason(), "length");
    }

    #[test]
    fn the_first_stop_in_list_order_wins_and_empty_stops_are_ignored() {
        // Both occur once `b` arrives; the list decides, not the position.
        assert_eq!(stop_at(b"xab", &stops(&["b", "ab"])), Some(2));
        assert_eq!(stop_at(b"xab", &stops(&["ab", "b"])), Some(1));
        assert_eq!(stop_at(b"xab", &stops(&["", "q"])), None);
        assert_eq!(
            stop_at(b"abab", &stops(&["ab"])),
            Some(0),
            "its first occurrence"
        );
        // A stop beats the length limit reached by the same token.
        assert_eq!(
            finish(b"a\n", &stops(&["\n"]), 2, false),
            Some((Finish::Stop, 1))
        );
    }

    #[test]
    fn a_retry_sends_nothing_twice() {
        let s = stops(&["=\n"]);
        let mut rel = StreamRelease::new();
        let (first, end) = generate(b"hello", &s, 16, &mut rel);
        assert_eq!(end, None, "the attempt failed before finishing");
        assert_eq!(first.concat(), b"hello".to_vec());
        // The retry regenerates the same bytes and goes on.
        let (second, end) = generate(b"hello world", &s, 11, &mut rel);
        assert_eq!(end, Some((Finish::Length, b"hello world".to_vec())));
        assert_eq!(second.concat(), b" world".to_vec());
    }
}
