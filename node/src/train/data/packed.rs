//! Language-model data from `jsonl`, `parquet` and (for `hf` models) `text` files:
//! tokenized once into the token cache, packed into sequences, read a batch at a time.
//!
//! **Split.** `jsonl`/`parquet`: document `d` (numbered from 0 across the files in order,
//! then the records in order) is held out when its own hash says so (the `eval_fraction`
//! of documents, drawn by `seed`), so no document is on both sides. `text`: the last
//! `eval_fraction` of the file's bytes (cut at a character boundary), as for the `gpt`; the
//! file is read in pieces of at most [`TEXT_PIECE`] bytes ending after a line break
//! (where there is one) and each piece tokenized on its own.
//!
//! **Packing.** Each side's documents are tokenized (`tokenize.rs`) and concatenated, each
//! followed by the separator (the model's EOS token; the `gpt`'s `\n`), into one stream of
//! `L` tokens. With `C` the context, sequence `k` (`0 <= k < (L - 1) / C`) is the stream's
//! tokens `k·C ..= k·C + C`: `C + 1` tokens whose first `C` are the inputs and whose last
//! `C` are the targets (target `t` is input `t + 1`), so consecutive sequences share one
//! token and every token but the first is a target exactly once; a tail too short for a
//! sequence is dropped. Chat data counts target `t` when token `k·C + t + 1` has its mask
//! bit (assistant tokens; never a separator). Sequence ids are what sharding hands out,
//! so exactly-once per epoch holds per sequence.
//!
//! **Memory.** Loading holds one record at a time (a JSONL line of at most
//! [`MAX_RECORD_BYTES`](super::source::MAX_RECORD_BYTES), or a Parquet page and its row)
//! and its tokens, a 1 MiB read buffer and two 1 MiB write buffers, whatever the dataset's
//! size. A loaded dataset holds two open files: a batch of `B` sequences reads `B·(C + 1)`
//! entries of 4 bytes with positioned reads. The page cache holds what the kernel chooses.

use super::cache::{self, Cached, TokenFile, Writer, MASK_BIT};
use super::source::{self, Doc, Fields};
use super::tokenize::Encoder;
use super::{format_err, held_out, Batch, DataError};
use crate::train::job::{DataKind, DataSpec};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use tch::Tensor;

/// Largest piece of a `text` file tokenized at once (hf models). 1 MiB.
pub const TEXT_PIECE: usize = 1 << 20;

/// A packed dataset: the cached streams and how they are cut.
#[derive(Debug)]
pub struct Packed {
    cached: Cached,
    context: usize,
    masked: bool,
}

/// What to load and how.
pub struct Setup<'a> {
    /// The job's `[data]`.
    pub spec: &'a DataSpec,
    /// The job's seed (the split).
    pub seed: u64,
    /// The job's held-out fraction.
    pub eval_fraction: f64,
    /// Tokens per sequence's inputs.
    pub context: usize,
    /// The tokenizer.
    pub encoder: Encoder,
    /// Where the token cache goes (`<run dir>/data`).
    pub cache_dir: PathBuf,
}

/// Sequences of `context + 1` tokens at stride `context` in a stream of `tokens`.
pub fn sequences(tokens: u64, context: usize) -> u64 {
    if tokens > context as u64 {
        (tokens - 1) / context as u64
    } else {
        0
    }
}

impl Packed {
    /// Loads (tokenizing into the cache when it is not there yet).
    pub fn load(setup: Setup) -> Result<Packed, DataError> {
        let spec = setup.spec;
        let masked = spec.messages_field.is_some();
        let files = match spec.kind {
            DataKind::Text => vec![spec.path.clone().expect("validated")],
            DataKind::Jsonl => {
                source::list_files(spec.files.as_deref().expect("validated"), "jsonl")?
            }
            DataKind::Parquet => {
                source::list_files(spec.files.as_deref().expect("validated"), "parquet")?
            }
            k => unreachable!("{k:?} is not packed"),
        };
        let key = cache_key(&setup, &files)?;
        let enc = &setup.encoder;
        let fields = Fields {
            text: &spec.text_field,
            messages: spec.messages_field.as_deref(),
        };
        let mut build = |train: &mut Writer, eval: &mut Writer| -> Result<(), DataError> {
            let mut ids = Vec::new();
            let mut mask = Vec::new();
            if spec.kind == DataKind::Text {
                return text_streams(&files[0], enc, setup.eval_fraction, train, eval);
            }
            let mut doc_index = 0u64;
            for f in &files {
                let mut each = |doc: Doc| -> Result<(), DataError> {
                    let out = if held_out(setup.seed, doc_index, setup.eval_fraction) {
                        &mut *eval
                    } else {
                        &mut *train
                    };
                    doc_index += 1;
                    ids.clear();
                    mask.clear();
                    enc.encode(&doc, &mut ids, &mut mask)
                        .map_err(|p| format_err(f, p))?;
                    for (&i, &m) in ids.iter().zip(&mask) {
                        out.push(i, m)?;
                    }
                    out.push(enc.separator(), false)
                };
                match spec.kind {
                    DataKind::Jsonl => source::read_jsonl(f, fields, &mut each)?,
                    _ => source::read_parquet(f, fields, &mut each)?,
                }
            }
            Ok(())
        };
        let cached = cache::open_or_build(&setup.cache_dir, &key, &mut build)?;
        let p = Packed {
            cached,
            context: setup.context,
            masked,
        };
        let where_ = files
            .first()
            .map(|f| f.display().to_string())
            .unwrap_or_default();
        if p.train_len() == 0 || p.eval_seqs() == 0 {
            return Err(DataError::TooSmall(format!(
                "{where_}: {} training and {} held-out tokens are too few for sequences of {} tokens on both sides of the split",
                p.cached.train.tokens(),
                p.cached.eval.tokens(),
                setup.context + 1
            )));
        }
        Ok(p)
    }

    /// Training sequences.
    pub fn train_len(&self) -> u64 {
        sequences(self.cached.train.tokens(), self.context)
    }

    /// Held-out sequences.
    pub fn eval_seqs(&self) -> usize {
        sequences(self.cached.eval.tokens(), self.context) as usize
    }

    /// Whether batches carry a loss mask (chat data).
    pub fn masked(&self) -> bool {
        self.masked
    }

    /// Sequences `ids` of the training (or, with `eval`, held-out) side as a batch:
    /// inputs and targets `[B, C]` (i64), and for chat data the mask `[B, C]` (f32).
    pub fn batch(
        &self,
        eval: bool,
        ids: impl ExactSizeIterator<Item = u64>,
    ) -> Result<Batch, DataError> {
        let file: &TokenFile = if eval {
            &self.cached.eval
        } else {
            &self.cached.train
        };
        let (b, c) = (ids.len(), self.context);
        let mut x = Vec::with_capacity(b * c);
        let mut y = Vec::with_capacity(b * c);
        let mut m = Vec::with_capacity(if self.masked { b * c } else { 0 });
        let mut row = Vec::with_capacity(c + 1);
        for k in ids {
            file.read(k * c as u64, c + 1, &mut row)?;
            x.extend(row[..c].iter().map(|&e| (e & !MASK_BIT) as i64));
            y.extend(row[1..].iter().map(|&e| (e & !MASK_BIT) as i64));
            if self.masked {
                m.extend(
                    row[1..]
                        .iter()
                        .map(|&e| if e & MASK_BIT != 0 { 1f32 } else { 0. }),
                );
            }
        }
        let shape = [b as i64, c as i64];
        Ok(Batch {
            x: Tensor::from_slice(&x).view(shape),
            y: Tensor::from_slice(&y).view(shape),
            mask: self.masked.then(|| Tensor::from_slice(&m).view(shape)),
            len: b,
        })
    }
}

/// The cache key: SHA-256 of the format, the data keys, the split, the tokenizer and the
/// inputs' paths, sizes and modification times.
fn cache_key(setup: &Setup, files: &[PathBuf]) -> Result<[u8; 32], DataError> {
    let s = setup.spec;
    let mut h = Sha256::new();
    h.update(cache::FORMAT.to_le_bytes());
    h.update(format!(
        "{:?}\0{}\0{:?}\0{}\0{}\0",
        s.kind, s.text_field, s.messages_field, setup.seed, setup.eval_fraction
    ));
    h.update(setup.encoder.fingerprint()?);
    for f in files {
        let m = std::fs::metadata(f).map_err(|source| DataError::Read {
            path: f.display().to_string(),
            source,
        })?;
        let mtime = m
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        h.update(f.as_os_str().as_encoded_bytes());
        h.update(format!("\0{}\0{mtime}\0", m.len()));
    }
    Ok(h.finalize().into())
}

/// A `text` file's two streams: its bytes before the cut (the last `eval_fraction` held
/// out, the cut moved forward to a character boundary) and after, each one document.
fn text_streams(
    path: &Path,
    enc: &Encoder,
    eval_fraction: f64,
    train: &mut Writer,
    eval: &mut Writer,
) -> Result<(), DataError> {
    use std::os::unix::fs::FileExt;
    let io = |source| DataError::Read {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let mut cut = ((len as f64) * (1.0 - eval_fraction)) as u64;
    let mut b = [0u8; 1];
    while cut < len && file.read_at(&mut b, cut).map_err(io)? == 1 && b[0] & 0xc0 == 0x80 {
        cut += 1;
    }
    let mut r = std::io::BufReader::new(&file);
    tokenize_text(path, (&mut r).take(cut), 0, enc, train)?;
    tokenize_text(path, r, cut, enc, eval)
}

/// Tokenizes text `r` (starting at byte `offset` of file `path`) in pieces of at most
/// [`TEXT_PIECE`] bytes, each ending after its last line break where it has one, into
/// `out`, followed by the separator.
fn tokenize_text(
    path: &Path,
    mut r: impl Read,
    mut offset: u64,
    enc: &Encoder,
    out: &mut Writer,
) -> Result<(), DataError> {
    let mut buf = Vec::with_capacity(TEXT_PIECE);
    let (mut ids, mut mask) = (Vec::new(), Vec::new());
    loop {
        let want = (TEXT_PIECE - buf.len()) as u64;
        (&mut r)
            .take(want)
            .read_to_end(&mut buf)
            .map_err(|source| DataError::Read {
                path: path.display().to_string(),
                source,
            })?;
        let eof = buf.len() < TEXT_PIECE;
        if buf.is_empty() {
            break;
        }
        let upto = if eof {
            buf.len()
        } else {
            buf.iter()
                .rposition(|&c| c == b'\n')
                .map_or(buf.len(), |i| i + 1)
        };
        let valid = match std::str::from_utf8(&buf[..upto]) {
            Ok(_) => upto,
            Err(e) if e.error_len().is_none() && !eof && e.valid_up_to() > 0 => e.valid_up_to(),
            Err(e) => {
                return Err(format_err(
                    path,
                    format!("not UTF-8 at byte {}", offset + e.valid_up_to() as u64),
                ))
            }
        };
        let text = std::str::from_utf8(&buf[..valid]).expect("checked above");
        ids.clear();
        mask.clear();
        enc.encode(&Doc::Text(text.to_string()), &mut ids, &mut mask)
            .map_err(|p| format_err(path, p))?;
        for &i in &ids {
            out.push(i, true)?;
        }
        buf.drain(..valid);
        offset += valid as u64;
        if eof && buf.is_empty() {
            break;
        }
    }
    out.push(enc.separator(), false)
}
