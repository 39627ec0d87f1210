//! Text for Hugging Face model folders: tokenizers, streaming detokenisation and chat
//! templates.
//!
//! - [`Tokenizer`] (`tokenizer.rs`): `tokenizer.json` through the `tokenizers` crate
//!   (encode, decode), the special tokens of `tokenizer_config.json` (`bos_token`,
//!   `eos_token`, ...; a string or a `{"content": ...}` object) and the stop tokens
//!   (`eos_token_id`, an int or a list, from `config.json` and `generation_config.json`,
//!   plus the id of `eos_token`).
//! - [`Detokenizer`] (`detok.rs`): token ids in one at a time, text deltas out, never
//!   splitting a character (an incomplete UTF-8 sequence, e.g. byte-fallback tokens
//!   `<0xE2>` `<0x82>` of a `€`, is held back until its last byte arrives); the deltas add
//!   up to the full decode.
//! - [`ChatTemplate`] (`chat.rs`): the Jinja chat template (`chat_template.jinja`, else
//!   `chat_template` in `tokenizer_config.json`: a string, or a list of named templates of
//!   which `default` is used) rendered with minijinja the way `transformers`'
//!   `apply_chat_template` renders it (`trim_blocks`, `lstrip_blocks`, Python string
//!   methods, `raise_exception`), bounded in work and output size.
//!
//! Every file is untrusted: each is read with a size limit, and every error is one line
//! naming the file.

mod chat;
mod detok;
#[cfg(test)]
mod tests;
mod tokenizer;

pub use chat::{ChatMessage, ChatTemplate, RenderLimits};
pub use detok::Detokenizer;
pub use tokenizer::{SpecialTokens, Tokenizer};

use std::io::Read;
use std::path::{Path, PathBuf};

/// Largest `tokenizer.json` read. 64 MiB (the largest real ones are ~20 MiB).
pub const MAX_TOKENIZER_JSON: u64 = 64 << 20;
/// Largest `tokenizer_config.json`, `config.json` or `generation_config.json` read. 16 MiB.
pub const MAX_CONFIG_JSON: u64 = 16 << 20;
/// Largest chat template (`chat_template.jinja`, or the one in `tokenizer_config.json`)
/// compiled. 1 MiB.
pub const MAX_TEMPLATE: u64 = 1 << 20;

/// Why a tokenizer or chat template cannot be loaded or used. Every message is one line;
/// those about a file name it.
#[derive(Debug, thiserror::Error)]
pub enum TextError {
    /// A file cannot be read.
    #[error("{}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A file is larger than its limit.
    #[error("{}: larger than the limit of {limit} bytes", path.display())]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// The limit in bytes.
        limit: u64,
    },
    /// A file is not what it should be (bad JSON, a tokenizer the crate refuses, a wrong
    /// field).
    #[error("{}: {reason}", path.display())]
    Malformed {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The model folder has no chat template.
    #[error("{}: no chat template (neither chat_template.jinja nor chat_template in tokenizer_config.json)", dir.display())]
    NoTemplate {
        /// The folder.
        dir: PathBuf,
    },
    /// A chat template does not compile, or rendering it failed (it called
    /// `raise_exception`, ran out of fuel, or its output passed the limit).
    #[error("{}: chat template: {reason}", path.display())]
    Template {
        /// The file the template came from.
        path: PathBuf,
        /// Why (the template's own message when it raised).
        reason: String,
    },
    /// Encoding or decoding failed.
    #[error("{}: {reason}", path.display())]
    Tokenize {
        /// The tokenizer file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

/// The model-folder files this module decodes from untrusted bytes.
#[derive(Clone, Copy, Debug)]
pub enum File {
    /// `tokenizer.json`.
    TokenizerJson,
    /// `tokenizer_config.json` (special tokens, the chat template's place).
    TokenizerConfig,
    /// A chat template's source.
    ChatTemplate,
}

/// Runs the decoding and checks this module applies to file `kind` on `bytes`, then uses
/// what decodes (encodes, decodes and streams a text; renders a conversation, with small
/// limits), and says why it is refused if it is. Panics when streaming disagrees with the
/// full decode of valid text. The `fuzz/` targets drive it; it serves nothing.
pub fn check_file(kind: File, bytes: &[u8]) -> Result<(), TextError> {
    let path = Path::new("fuzz");
    match kind {
        File::TokenizerJson => {
            let tok = Tokenizer::from_json(bytes, path)?;
            let ids = tok.encode("Hello, wörld 🦀 <s>\n", true)?;
            let full = tok.decode(&ids, true)?;
            let mut d = tok.detokenizer(true);
            let mut streamed = String::new();
            for &id in &ids {
                streamed.push_str(&d.push(id)?);
            }
            streamed.push_str(&d.finish()?);
            if !full.contains('\u{FFFD}') {
                assert_eq!(streamed, full, "streaming differs from the full decode");
            }
            Ok(())
        }
        File::TokenizerConfig => {
            let v: serde_json::Value =
                serde_json::from_slice(bytes).map_err(|e| TextError::Malformed {
                    path: path.into(),
                    reason: one_line(e),
                })?;
            SpecialTokens::from_config(&v, path)?;
            if let Some(t) = v.get("chat_template") {
                chat::template_in_config(t, path)?;
            }
            Ok(())
        }
        File::ChatTemplate => {
            let source = String::from_utf8_lossy(bytes);
            let limits = RenderLimits {
                fuel: 100_000,
                max_output: 64 << 10,
            };
            let t = ChatTemplate::from_source(&source, path, SpecialTokens::default())?
                .with_limits(limits);
            let m = [ChatMessage {
                role: "user".into(),
                content: "hi".into(),
            }];
            t.render(&m, true).map(|_| ())
        }
    }
}

/// `s` on one line: line breaks become spaces.
pub(crate) fn one_line(s: impl ToString) -> String {
    s.to_string()
        .split(['\n', '\r'])
        .filter(|l| !l.trim().is_empty())
        .map(str::trim_end)
        .collect::<Vec<_>>()
        .join(" ")
}

/// Reads `path`, refusing more than `limit` bytes (checked while reading, so a file that
/// grows meanwhile is refused too).
pub(crate) fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>, TextError> {
    let f = std::fs::File::open(path).map_err(|source| TextError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut buf = Vec::new();
    f.take(limit + 1)
        .read_to_end(&mut buf)
        .map_err(|source| TextError::Read {
            path: path.to_path_buf(),
            source,
        })?;
    if buf.len() as u64 > limit {
        return Err(TextError::TooLarge {
            path: path.to_path_buf(),
            limit,
        });
    }
    Ok(buf)
}

/// Reads and parses a JSON file of at most [`MAX_CONFIG_JSON`] bytes; `None` when it does
/// not exist.
pub(crate) fn read_json(path: &Path) -> Result<Option<serde_json::Value>, TextError> {
    if !path.exists() {
        return Ok(None);
    }
    let bytes = read_limited(path, MAX_CONFIG_JSON)?;
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| TextError::Malformed {
            path: path.to_path_buf(),
            reason: format!("not JSON: {}", one_line(e)),
        })
}
