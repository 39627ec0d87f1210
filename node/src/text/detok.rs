//! [`Detokenizer`]: streaming detokenisation, token by token.
//!
//! Decoding token by token and concatenating is wrong for real tokenizers: a character may
//! span tokens (byte-level BPE, or byte-fallback tokens `<0xE2>` `<0x82>` `<0xAC>` for
//! `€`), and decoders look at their neighbours (a metaspace tokenizer's `Strip` decoder
//! drops the space of the first token only). So each step decodes a short window instead:
//! the tokens already sent since the last step (its *prefix*) plus the new ones, and sends
//! what the window's text adds to the prefix's text, unless that ends in U+FFFD (an
//! incomplete UTF-8 sequence, held back until a later token completes it, or until
//! [`Detokenizer::finish`]). The window's first token is decoded in both texts alike, so
//! its context-dependent rendering cancels out, and the deltas add up to the decode of all
//! the ids whenever that is valid text (the tests check this on the fixture texts, random
//! text and random ids). Ids that make invalid UTF-8 are the one exception: the
//! byte-fallback decoder turns every byte of a run of byte tokens into U+FFFD when any of
//! them is invalid, so a character of that run the stream already sent stays sent.

use super::{TextError, Tokenizer};

/// Turns token ids, one at a time, into text deltas that never split a character.
#[derive(Debug)]
pub struct Detokenizer {
    tok: Tokenizer,
    skip_special_tokens: bool,
    ids: Vec<u32>,
    /// Where the window starts: the first of the tokens sent by the last delta.
    prefix: usize,
    /// The tokens before this are sent.
    read: usize,
}

impl Detokenizer {
    /// A detokeniser over `tok`, leaving special tokens out with `skip_special_tokens`.
    pub fn new(tok: Tokenizer, skip_special_tokens: bool) -> Detokenizer {
        Detokenizer {
            tok,
            skip_special_tokens,
            ids: Vec::new(),
            prefix: 0,
            read: 0,
        }
    }

    /// The ids pushed so far.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// Adds token `id`; returns the text it completes (empty while a character is
    /// incomplete, or when the token adds no text).
    pub fn push(&mut self, id: u32) -> Result<String, TextError> {
        self.ids.push(id);
        let (prefix, text) = self.window()?;
        if text.ends_with('\u{FFFD}') {
            return Ok(String::new());
        }
        let Some(delta) = delta(&prefix, &text) else {
            return Ok(String::new());
        };
        let delta = delta.to_string();
        if !delta.is_empty() {
            self.prefix = self.read;
            self.read = self.ids.len();
        }
        Ok(delta)
    }

    /// The text held back (an incomplete character at the end is sent lossily, as
    /// U+FFFD); pushing more after it starts a new window.
    pub fn finish(&mut self) -> Result<String, TextError> {
        let (prefix, text) = self.window()?;
        let rest = match delta(&prefix, &text) {
            Some(d) => d.to_string(),
            // The window's text does not extend its prefix's: the full decode settles
            // what is left.
            None => {
                let full = self.tok.decode(&self.ids, self.skip_special_tokens)?;
                let sent = self
                    .tok
                    .decode(&self.ids[..self.read], self.skip_special_tokens)?;
                full.get(sent.len()..).unwrap_or_default().to_string()
            }
        };
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        Ok(rest)
    }

    /// The texts of the prefix and of the whole window.
    fn window(&self) -> Result<(String, String), TextError> {
        let skip = self.skip_special_tokens;
        let prefix = self.tok.decode(&self.ids[self.prefix..self.read], skip)?;
        let text = self.tok.decode(&self.ids[self.prefix..], skip)?;
        Ok((prefix, text))
    }
}

/// What `text` adds to `prefix`, when it extends it.
fn delta<'a>(prefix: &str, text: &'a str) -> Option<&'a str> {
    text.strip_prefix(prefix)
}
