//! [`Tokenizer`]: a model folder's `tokenizer.json`, its special tokens and stop tokens.

use super::{one_line, read_json, read_limited, Detokenizer, TextError, MAX_TOKENIZER_JSON};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The special tokens `tokenizer_config.json` names (each a string or a `{"content": ...}`
/// object there; `None` when absent or null).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpecialTokens {
    /// `bos_token`.
    pub bos: Option<String>,
    /// `eos_token`.
    pub eos: Option<String>,
    /// `unk_token`.
    pub unk: Option<String>,
    /// `pad_token`.
    pub pad: Option<String>,
}

impl SpecialTokens {
    /// The special tokens of a parsed `tokenizer_config.json` (`path` names it in errors).
    pub fn from_config(config: &Value, path: &Path) -> Result<SpecialTokens, TextError> {
        let get = |key: &str| -> Result<Option<String>, TextError> {
            match config.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(Value::Object(o)) => match o.get("content") {
                    Some(Value::String(s)) => Ok(Some(s.clone())),
                    _ => Err(TextError::Malformed {
                        path: path.to_path_buf(),
                        reason: format!("`{key}` is an object without a string `content`"),
                    }),
                },
                Some(_) => Err(TextError::Malformed {
                    path: path.to_path_buf(),
                    reason: format!(
                        "`{key}` is neither a string nor a {{\"content\": ...}} object"
                    ),
                }),
            }
        };
        Ok(SpecialTokens {
            bos: get("bos_token")?,
            eos: get("eos_token")?,
            unk: get("unk_token")?,
            pad: get("pad_token")?,
        })
    }
}

/// Each token's span of the encoded text, `start..end` in bytes.
pub type Offsets = Vec<(usize, usize)>;

/// A Hugging Face tokenizer with its special and stop tokens. Cheap to clone.
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<tokenizers::Tokenizer>,
    special: SpecialTokens,
    stop_ids: Vec<u32>,
    eos_id: Option<u32>,
    path: PathBuf,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("path", &self.path)
            .field("special", &self.special)
            .field("stop_ids", &self.stop_ids)
            .finish()
    }
}

/// The token ids of an `eos_token_id` value (an int or a list of ints; null is none).
fn eos_ids(v: Option<&Value>, path: &Path) -> Result<Vec<u32>, TextError> {
    let bad = || TextError::Malformed {
        path: path.to_path_buf(),
        reason: "`eos_token_id` is neither a token id nor a list of them".into(),
    };
    let id = |v: &Value| {
        v.as_u64()
            .and_then(|i| u32::try_from(i).ok())
            .ok_or_else(bad)
    };
    match v {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::Array(a)) => a.iter().map(id).collect(),
        Some(v) => Ok(vec![id(v)?]),
    }
}

impl Tokenizer {
    /// Loads the tokenizer of model folder `dir`: `tokenizer.json` (required, at most
    /// [`MAX_TOKENIZER_JSON`] bytes), and when present `tokenizer_config.json` (special
    /// tokens), `config.json` and `generation_config.json` (`eos_token_id`: the stop
    /// tokens, together with the id of `eos_token`).
    pub fn load(dir: &Path) -> Result<Tokenizer, TextError> {
        let path = dir.join("tokenizer.json");
        let bytes = read_limited(&path, MAX_TOKENIZER_JSON)?;
        let mut tok = Tokenizer::from_json(&bytes, &path)?;
        let config_path = dir.join("tokenizer_config.json");
        let special = match read_json(&config_path)? {
            Some(c) => SpecialTokens::from_config(&c, &config_path)?,
            None => SpecialTokens::default(),
        };
        let mut stop_ids = Vec::new();
        for name in ["config.json", "generation_config.json"] {
            let p = dir.join(name);
            if let Some(c) = read_json(&p)? {
                stop_ids.extend(eos_ids(c.get("eos_token_id"), &p)?);
            }
        }
        if let Some(id) = special.eos.as_deref().and_then(|t| tok.token_to_id(t)) {
            stop_ids.push(id);
        }
        // Before sorting: the first named (config.json's first, else
        // generation_config.json's, else `eos_token`'s id).
        tok.eos_id = stop_ids.first().copied();
        stop_ids.sort_unstable();
        stop_ids.dedup();
        tok.special = special;
        tok.stop_ids = stop_ids;
        Ok(tok)
    }

    /// A tokenizer from the bytes of a `tokenizer.json` (`path` names it in errors), with
    /// no special or stop tokens.
    pub fn from_json(bytes: &[u8], path: &Path) -> Result<Tokenizer, TextError> {
        Ok(Tokenizer {
            inner: Arc::new(parse_tokenizer(bytes, path)?),
            special: SpecialTokens::default(),
            stop_ids: Vec::new(),
            eos_id: None,
            path: path.to_path_buf(),
        })
    }

    /// The `tokenizer.json` it was loaded from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The special tokens of `tokenizer_config.json`.
    pub fn special(&self) -> &SpecialTokens {
        &self.special
    }

    /// The token ids that end a completion (sorted, no duplicates).
    pub fn stop_ids(&self) -> &[u32] {
        &self.stop_ids
    }

    /// The end-of-sequence token that separates documents in training data: the first
    /// `eos_token_id` of `config.json` (an int, or a list's first), else of
    /// `generation_config.json`, else the id of `tokenizer_config.json`'s `eos_token`;
    /// `None` when none is named.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }

    /// Whether `id` ends a completion.
    pub fn is_stop(&self, id: u32) -> bool {
        self.stop_ids.binary_search(&id).is_ok()
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The id of token `token`, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token ids of `text`; with `add_special_tokens` the tokenizer's post-processor
    /// adds its tokens (e.g. a leading `<s>`), as `transformers`' `tokenizer(text)` does.
    /// A rendered chat prompt already holds them: encode it without.
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, TextError> {
        self.inner
            .encode(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| self.error(format!("cannot encode: {e}")))
    }

    /// [`encode`](Self::encode) with each token's span of `text` in bytes (`start..end`;
    /// what `transformers`' `return_offsets_mapping` gives, there in characters).
    pub fn encode_with_offsets(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<(Vec<u32>, Offsets), TextError> {
        self.inner
            .encode(text, add_special_tokens)
            .map(|e| (e.get_ids().to_vec(), e.get_offsets().to_vec()))
            .map_err(|e| self.error(format!("cannot encode: {e}")))
    }

    /// The text of `ids`, leaving special tokens out with `skip_special_tokens`. Ids
    /// outside the vocabulary are left out.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String, TextError> {
        self.inner
            .decode(ids, skip_special_tokens)
            .map_err(|e| self.error(format!("cannot decode: {e}")))
    }

    /// The bytes token `id` stands for in a text, `None` for an id outside the
    /// vocabulary (what a logprobs entry's `bytes` reports):
    /// - an added token (`<|im_end|>`, `<s>`): its content;
    /// - a byte-fallback token (`<0xE2>`, with a `ByteFallback` decoder): its one byte;
    /// - a byte-level BPE token (a `ByteLevel` decoder): the bytes its characters stand
    ///   for in GPT-2's byte-to-character table, which may be part of a character;
    /// - any other: the text it adds after a copy of itself (`decode([id, id])` less
    ///   `decode([id])`: a metaspace token `▁Hello` is ` Hello`, where decoding it alone
    ///   strips the space), or its decode alone when that is not a prefix.
    pub fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        if let Some(added) = self.inner.get_added_vocabulary().simple_id_to_token(id) {
            return Some(added.into_bytes());
        }
        let piece = self.inner.id_to_token(id)?;
        let (byte_level, byte_fallback) = decoders(self.inner.get_decoder());
        if byte_fallback {
            if let Some(b) = fallback_byte(&piece) {
                return Some(vec![b]);
            }
        }
        if byte_level {
            if let Some(b) = piece.chars().map(byte_of_char).collect::<Option<Vec<u8>>>() {
                return Some(b);
            }
        }
        let alone = self.inner.decode(&[id], false).ok()?;
        let twice = self.inner.decode(&[id, id], false).ok()?;
        let text = match twice.strip_prefix(alone.as_str()) {
            Some(second) if !second.contains('\u{FFFD}') => second.to_string(),
            _ => alone,
        };
        Some(text.into_bytes())
    }

    /// A streaming detokeniser over this tokenizer.
    pub fn detokenizer(&self, skip_special_tokens: bool) -> Detokenizer {
        Detokenizer::new(self.clone(), skip_special_tokens)
    }

    fn error(&self, reason: String) -> TextError {
        TextError::Tokenize {
            path: self.path.clone(),
            reason: one_line(reason),
        }
    }
}

/// Whether `decoder` (or one in its sequence) is `ByteLevel`, and whether one is
/// `ByteFallback`.
fn decoders(decoder: Option<&tokenizers::decoders::DecoderWrapper>) -> (bool, bool) {
    use tokenizers::decoders::DecoderWrapper as D;
    match decoder {
        Some(D::ByteLevel(_)) => (true, false),
        Some(D::ByteFallback(_)) => (false, true),
        Some(D::Sequence(s)) => s
            .get_decoders()
            .iter()
            .map(|d| decoders(Some(d)))
            .fold((false, false), |a, b| (a.0 || b.0, a.1 || b.1)),
        _ => (false, false),
    }
}

/// The byte of a byte-fallback piece `<0xHH>`.
fn fallback_byte(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

/// The byte GPT-2's byte-level alphabet writes as `c` (`bytes_to_unicode`: the printable
/// bytes `!`..=`~`, `¡`..=`¬`, `®`..=`ÿ` stand for themselves, the 68 others in order
/// for U+0100 onwards).
fn byte_of_char(c: char) -> Option<u8> {
    let printable = |b: u32| matches!(b, 33..=126 | 161..=172 | 174..=255);
    let c = c as u32;
    if printable(c) {
        return Some(c as u8);
    }
    let n = c.checked_sub(256)?;
    (0u32..256)
        .filter(|&b| !printable(b))
        .nth(n as usize)
        .map(|b| b as u8)
}

/// Parses `tokenizer.json` bytes. The crate's parser runs on untrusted bytes: a panic in it
/// is an error too.
fn parse_tokenizer(bytes: &[u8], path: &Path) -> Result<tokenizers::Tokenizer, TextError> {
    let parsed = std::panic::catch_unwind(|| tokenizers::Tokenizer::from_bytes(bytes));
    match parsed {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => Err(TextError::Malformed {
            path: path.to_path_buf(),
            reason: format!("not a tokenizer: {}", one_line(e)),
        }),
        Err(_) => Err(TextError::Malformed {
            path: path.to_path_buf(),
            reason: "not a tokenizer: the parser panicked".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn special_tokens_are_strings_or_content_objects() {
        let p = Path::new("tokenizer_config.json");
        let s = SpecialTokens::from_config(
            &json!({"bos_token": {"content": "<s>", "lstrip": false}, "eos_token": "</s>",
                    "unk_token": null}),
            p,
        )
        .unwrap();
        assert_eq!(s.bos.as_deref(), Some("<s>"));
        assert_eq!(s.eos.as_deref(), Some("</s>"));
        assert_eq!(s.unk, None);
        assert_eq!(s.pad, None);
        let e = SpecialTokens::from_config(&json!({"eos_token": 3}), p).unwrap_err();
        assert!(e
            .to_string()
            .starts_with("tokenizer_config.json: `eos_token`"));
    }

    #[test]
    fn eos_token_id_is_an_int_or_a_list() {
        let p = Path::new("config.json");
        assert_eq!(eos_ids(Some(&json!(2)), p).unwrap(), vec![2]);
        assert_eq!(eos_ids(Some(&json!([2, 7])), p).unwrap(), vec![2, 7]);
        assert_eq!(eos_ids(Some(&json!(null)), p).unwrap(), Vec::<u32>::new());
        assert_eq!(eos_ids(None, p).unwrap(), Vec::<u32>::new());
        assert!(eos_ids(Some(&json!("2")), p).is_err());
        assert!(eos_ids(Some(&json!([-1])), p).is_err());
        assert!(eos_ids(Some(&json!(1u64 << 40)), p).is_err());
    }
}
