//! Tokenizing documents for a language model: the `gpt`'s bytes, or an `hf` model
//! folder's `tokenizer.json`, and chat conversations with their loss masks.
//!
//! **Chat masks.** A conversation `messages` is rendered whole with the chat template
//! (`add_generation_prompt = false`) and tokenized once, without added special tokens (the
//! template writes them). Assistant message `i` owns the characters from the end of
//! `render(messages[..i], add_generation_prompt = true)` to the end of
//! `render(messages[..=i], add_generation_prompt = false)`: its rendered content and what
//! the template writes after it (the end-of-turn marker). Each rendering must be a prefix
//! of the next (else the record is refused: the template does not render the conversation
//! incrementally). A token's mask is 1 when its offsets (`start..end`, non-empty) overlap
//! an assistant span. `scripts/fixtures/chat_mask.py` builds the same mask with
//! `transformers`.

use super::source::Doc;
use super::DataError;
use crate::text::{ChatMessage, ChatTemplate, Tokenizer};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// The `gpt`'s separator between documents: a line break.
pub const BYTE_SEPARATOR: u32 = b'\n' as u32;

/// How documents become token ids.
pub enum Encoder {
    /// UTF-8 bytes (vocabulary 256); documents separated by `\n`.
    Bytes,
    /// A Hugging Face tokenizer; documents separated by its EOS token.
    Hf {
        /// The tokenizer.
        tok: Box<Tokenizer>,
        /// The chat template (chat data only).
        template: Option<Box<ChatTemplate>>,
        /// The separator (EOS) id.
        eos: u32,
        /// The model's vocabulary (`vocab_size`): every id must be below it.
        vocab: usize,
        /// The model folder.
        dir: PathBuf,
    },
}

fn model_err(dir: &Path, problem: impl std::fmt::Display) -> DataError {
    DataError::Model(format!("{}: {problem}", dir.display()))
}

impl Encoder {
    /// The tokenizer of model folder `dir` (`tokenizer.json`, its EOS), for a model of
    /// `vocab` outputs; with `chat`, its chat template too.
    pub fn hf(dir: &Path, vocab: usize, chat: bool) -> Result<Encoder, DataError> {
        let tok = Tokenizer::load(dir).map_err(|e| DataError::Model(e.to_string()))?;
        let eos = tok.eos_id().ok_or_else(|| {
            model_err(
                dir,
                "no EOS token (eos_token_id in config.json or generation_config.json, or eos_token in tokenizer_config.json) to separate documents",
            )
        })?;
        if eos as usize >= vocab {
            return Err(model_err(
                dir,
                format!("EOS id {eos} is not below vocab_size {vocab}"),
            ));
        }
        let template = if chat {
            let t = ChatTemplate::load(dir).map_err(|e| DataError::Model(e.to_string()))?;
            Some(Box::new(t))
        } else {
            None
        };
        Ok(Encoder::Hf {
            tok: Box::new(tok),
            template,
            eos,
            vocab,
            dir: dir.to_path_buf(),
        })
    }

    /// The token after every document.
    pub fn separator(&self) -> u32 {
        match self {
            Encoder::Bytes => BYTE_SEPARATOR,
            Encoder::Hf { eos, .. } => *eos,
        }
    }

    /// Vocabulary size (the model's outputs).
    pub fn vocab(&self) -> usize {
        match self {
            Encoder::Bytes => 256,
            Encoder::Hf { vocab, .. } => *vocab,
        }
    }

    /// SHA-256 of what decides the token ids: the kind, and for `hf` the folder's
    /// tokenizer files and `config.json` (missing files count as empty).
    pub fn fingerprint(&self) -> Result<[u8; 32], DataError> {
        let mut h = Sha256::new();
        match self {
            Encoder::Bytes => h.update(b"bytes"),
            Encoder::Hf { dir, template, .. } => {
                h.update(b"hf");
                h.update([template.is_some() as u8]);
                for name in [
                    "tokenizer.json",
                    "tokenizer_config.json",
                    "chat_template.jinja",
                    "config.json",
                    "generation_config.json",
                ] {
                    let p = dir.join(name);
                    let bytes = match std::fs::read(&p) {
                        Ok(b) => b,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                        Err(source) => {
                            return Err(DataError::Read {
                                path: p.display().to_string(),
                                source,
                            })
                        }
                    };
                    h.update(name.as_bytes());
                    h.update((bytes.len() as u64).to_le_bytes());
                    h.update(&bytes);
                }
            }
        }
        Ok(h.finalize().into())
    }

    /// Appends the tokens of `doc` to `ids` and their loss mask to `mask` (1 on every
    /// token of a text; on a conversation's assistant tokens only). The error is one line
    /// (the caller adds where).
    pub fn encode(
        &self,
        doc: &Doc,
        ids: &mut Vec<u32>,
        mask: &mut Vec<bool>,
    ) -> Result<(), String> {
        let start = ids.len();
        match (self, doc) {
            (Encoder::Bytes, Doc::Text(t)) => {
                ids.extend(t.bytes().map(u32::from));
                mask.resize(ids.len(), true);
            }
            (Encoder::Bytes, Doc::Chat(_)) => {
                return Err("conversations need an hf model's chat template".into())
            }
            (Encoder::Hf { tok, .. }, Doc::Text(t)) => {
                ids.extend(tok.encode(t, false).map_err(|e| e.to_string())?);
                mask.resize(ids.len(), true);
            }
            (Encoder::Hf { tok, template, .. }, Doc::Chat(m)) => {
                let template = template
                    .as_ref()
                    .ok_or("conversations need the chat template (set data.messages_field)")?;
                let (t, k) = chat_tokens(tok, template, m)?;
                ids.extend(t);
                mask.extend(k);
            }
        }
        let vocab = self.vocab();
        if let Some(&bad) = ids[start..].iter().find(|&&i| i as usize >= vocab) {
            return Err(format!(
                "token id {bad} is not below the model's vocab_size {vocab}"
            ));
        }
        Ok(())
    }
}

/// A conversation's token ids and loss mask (see the module's doc).
pub fn chat_tokens(
    tok: &Tokenizer,
    template: &ChatTemplate,
    messages: &[ChatMessage],
) -> Result<(Vec<u32>, Vec<bool>), String> {
    if messages.is_empty() {
        return Err("the conversation has no messages".into());
    }
    let render = |m: &[ChatMessage], gen: bool| template.render(m, gen).map_err(|e| e.to_string());
    let full = render(messages, false)?;
    let mut spans = Vec::new();
    for (i, m) in messages.iter().enumerate() {
        if m.role != "assistant" {
            continue;
        }
        let before = render(&messages[..i], true)?;
        let through = render(&messages[..=i], false)?;
        if !through.starts_with(&before) || !full.starts_with(&through) {
            return Err(format!(
                "the chat template does not render message {i} after the ones before it (renderings are not prefixes of each other)"
            ));
        }
        spans.push((before.len(), through.len()));
    }
    let (ids, offsets) = tok
        .encode_with_offsets(&full, false)
        .map_err(|e| e.to_string())?;
    let mask = offsets
        .iter()
        .map(|&(s, e)| s < e && spans.iter().any(|&(a, b)| s < b && a < e))
        .collect();
    Ok((ids, mask))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer/bytelevel")
    }

    #[test]
    fn bytes_and_vocab_checks() {
        let mut ids = Vec::new();
        let mut mask = Vec::new();
        Encoder::Bytes
            .encode(&Doc::Text("hé".into()), &mut ids, &mut mask)
            .unwrap();
        assert_eq!(ids, vec![104, 0xc3, 0xa9]);
        assert_eq!(mask, vec![true; 3]);
        assert!(Encoder::Bytes
            .encode(&Doc::Chat(vec![]), &mut ids, &mut mask)
            .is_err());
        // An EOS or id past the model's vocabulary is refused.
        assert!(Encoder::hf(&fixture(), 2, false).is_err());
        let enc = Encoder::hf(&fixture(), 400, false).unwrap();
        assert_eq!(enc.separator(), 2);
        let enc_small = match enc {
            Encoder::Hf { tok, eos, dir, .. } => Encoder::Hf {
                tok,
                template: None,
                eos,
                vocab: 5,
                dir,
            },
            Encoder::Bytes => unreachable!(),
        };
        let e = enc_small
            .encode(&Doc::Text("hello world".into()), &mut ids, &mut mask)
            .unwrap_err();
        assert!(e.contains("vocab_size 5"), "{e}");
    }

    #[test]
    fn chat_mask_covers_assistant_turns() {
        let enc = Encoder::hf(&fixture(), 400, true).unwrap();
        let Encoder::Hf { tok, template, .. } = &enc else {
            unreachable!()
        };
        let m = |r: &str, c: &str| ChatMessage {
            role: r.into(),
            content: c.into(),
        };
        let msgs = [
            m("user", "hello there"),
            m("assistant", "hi, friend"),
            m("user", "bye"),
        ];
        let (ids, mask) = chat_tokens(tok, template.as_ref().unwrap(), &msgs).unwrap();
        assert_eq!(ids.len(), mask.len());
        let masked: Vec<u32> = ids
            .iter()
            .zip(&mask)
            .filter(|x| *x.1)
            .map(|x| *x.0)
            .collect();
        let text = tok.decode(&masked, false).unwrap();
        assert!(text.starts_with("hi, friend<|im_end|>"), "{text:?}");
        assert!(!text.contains("bye") && !text.contains("hello"), "{text:?}");
    }
}
