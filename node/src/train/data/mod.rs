//! Datasets: loading, the held-out split, and turning sample ids into tensors.
//!
//! Every member loads the same data deterministically (same file, same seed), so a sample
//! id means the same sample everywhere and only ids move between members (see
//! `coordinator_free::sharding`). Two shapes of task:
//! - **classification** (`csv`, `npy`): float features `[B, F]`, integer labels `[B]`;
//! - **language modelling** (`text`, `arithmetic`, `jsonl`, `parquet`): token ids, inputs
//!   `[B, T]` (i64), targets `[B, T]` shifted by one, and for `arithmetic` and chat data a
//!   mask so only some targets (the answer digits, the assistant's tokens) count.
//!
//! The `gpt`'s `text` and `arithmetic` data are held in memory (bytes); `jsonl`,
//! `parquet`, and `text` for an `hf` model are tokenized once into a token cache on disk
//! and read a batch at a time, in memory flat in the dataset's size (`packed.rs`: the
//! split, the packing and the bound; `cache.rs`: the cache; `source.rs`: the files and
//! records; `tokenize.rs`: tokenizers and chat masks).

mod cache;
mod packed;
#[cfg(test)]
mod packed_tests;
mod source;
mod tabular;
mod tokenize;

pub use packed::{sequences, Packed, Setup, TEXT_PIECE};
pub use source::{
    check_records, list_files, parse_record, Doc, Fields, RecordFormat, MAX_PARQUET_CHUNK,
    MAX_RECORD_BYTES,
};
use tabular::parse_csv;
pub use tabular::parse_npy;
pub use tokenize::{chat_tokens, Encoder};

use super::job::{DataKind, DataSpec, JobSpec, ModelKind};
use std::io::Read;
use std::path::Path;
use tch::{Kind, Tensor};

/// Longest training sequence of an `hf` model when `model.context` is not set (and
/// `max_position_embeddings` is longer).
pub const DEFAULT_HF_CONTEXT: i64 = 1024;

/// Largest input file read (csv, npy, text), in bytes.
pub const MAX_FILE_BYTES: u64 = 2 << 30;
/// Most held-out samples evaluated (a deterministic prefix of the held-out split).
pub const MAX_EVAL_SAMPLES: usize = 4096;
/// Most arithmetic pairs enumerated; above it pairs are sampled.
const MAX_PAIRS: u64 = 1_000_000;

/// Why data could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A file is larger than [`MAX_FILE_BYTES`].
    #[error("{path} is larger than {MAX_FILE_BYTES} bytes")]
    TooLarge {
        /// The file.
        path: String,
    },
    /// The content does not have the expected form.
    #[error("{path}: {problem}")]
    Format {
        /// The file (or the dataset kind).
        path: String,
        /// What is wrong, with the line where it applies.
        problem: String,
    },
    /// The data is too small to split into training and held-out samples.
    #[error("{0}")]
    TooSmall(String),
    /// The model folder's tokenizer or configuration cannot be used.
    #[error("{0}")]
    Model(String),
}

fn format_err(path: &Path, problem: impl Into<String>) -> DataError {
    DataError::Format {
        path: path.display().to_string(),
        problem: problem.into(),
    }
}

/// What the model learns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Task {
    /// Features to one of `classes` labels.
    Classify {
        /// Feature count.
        features: usize,
        /// Label count (largest label + 1).
        classes: usize,
    },
    /// Next token; inputs are `len` tokens.
    Lm {
        /// Input tokens per sample.
        len: usize,
        /// Only masked target positions count (arithmetic answers, chat assistants).
        masked: bool,
        /// Vocabulary size (the logits' last dimension): 256 for bytes, an `hf` model's
        /// `vocab_size`.
        vocab: usize,
    },
}

/// One side of the split.
struct Split {
    /// Classification: `n × features` features; LM: `n × (len + 1)` tokens as f32-free u8.
    x: Vec<f32>,
    tokens: Vec<u8>,
    y: Vec<i64>,
    n: usize,
}

/// A batch ready for the model.
pub struct Batch {
    /// Features `[B, F]` (f32) or input tokens `[B, T]` (i64).
    pub x: Tensor,
    /// Labels `[B]` or target tokens `[B, T]` (i64).
    pub y: Tensor,
    /// LM loss mask `[B, T]` (f32), where only some targets count.
    pub mask: Option<Tensor>,
    /// Samples in the batch.
    pub len: usize,
}

impl Batch {
    /// The batch on `device` (built on the CPU; a no-op there).
    pub fn to_device(&self, device: tch::Device) -> Batch {
        Batch {
            x: self.x.to_device(device),
            y: self.y.to_device(device),
            mask: self.mask.as_ref().map(|m| m.to_device(device)),
            len: self.len,
        }
    }
}

/// A loaded dataset.
pub struct Dataset {
    /// The task it defines.
    pub task: Task,
    train: Split,
    eval: Split,
    /// LM: answer mask over target positions (same for every sample).
    mask: Option<Vec<f32>>,
    /// Arithmetic: prompt length and answer digits, for exact-match evaluation.
    pub arithmetic: Option<ArithmeticFormat>,
    /// Tokenized data read from the token cache (then `train` and `eval` are empty).
    packed: Option<Packed>,
}

impl std::fmt::Debug for Dataset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataset")
            .field("task", &self.task)
            .field("train", &self.train_len())
            .field("eval", &self.eval_len())
            .finish()
    }
}

/// How an arithmetic sample is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArithmeticFormat {
    /// Digits per operand.
    pub digits: usize,
    /// Tokens before the answer (`aa+bb=`).
    pub prompt: usize,
    /// Answer digits (`digits + 1`).
    pub answer: usize,
    /// Answer written least-significant digit first.
    pub reversed: bool,
}

impl ArithmeticFormat {
    /// The text of `a+b=` followed by the answer, as trained.
    pub fn render(&self, a: u64, b: u64) -> String {
        let d = self.digits;
        let mut ans = format!("{:0w$}", a + b, w = self.answer);
        if self.reversed {
            ans = ans.chars().rev().collect();
        }
        format!("{a:0d$}+{b:0d$}={ans}")
    }

    /// Reads an answer as generated (undoing the reversal).
    pub fn parse_answer(&self, generated: &[u8]) -> Option<u64> {
        let mut s: Vec<u8> = generated.to_vec();
        if self.reversed {
            s.reverse();
        }
        std::str::from_utf8(&s).ok()?.parse().ok()
    }
}

/// splitmix64: the deterministic generator behind splits and sampling.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Whether item `i` is held out, decided by its own hash (so the split of an item never
/// depends on the others).
fn held_out(seed: u64, i: u64, fraction: f64) -> bool {
    (mix(seed ^ mix(i)) >> 11) as f64 / (1u64 << 53) as f64 > 1.0 - fraction
}

fn read_file(path: &Path) -> Result<Vec<u8>, DataError> {
    let f = source::open(path)?;
    let mut buf = Vec::new();
    let gz = path.extension().is_some_and(|e| e == "gz");
    let r: Box<dyn Read> = if gz {
        Box::new(flate2::read::GzDecoder::new(f))
    } else {
        Box::new(f)
    };
    r.take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut buf)
        .map_err(|source| DataError::Read {
            path: path.display().to_string(),
            source,
        })?;
    if buf.len() as u64 > MAX_FILE_BYTES {
        return Err(DataError::TooLarge {
            path: path.display().to_string(),
        });
    }
    Ok(buf)
}

impl Dataset {
    /// Loads the dataset of `job`, tokenized for its model: `jsonl` and `parquet` always,
    /// `text` for an `hf` model, into the token cache `<run dir>/data/` (see `packed.rs`),
    /// with sequences of `model.context` tokens (`hf` default: `max_position_embeddings`,
    /// at most [`DEFAULT_HF_CONTEXT`]; `gpt` default 64).
    pub fn load(job: &JobSpec) -> Result<Dataset, DataError> {
        let spec = &job.data;
        let hf = job.model_kind() == ModelKind::Hf;
        if !(hf || matches!(spec.kind, DataKind::Jsonl | DataKind::Parquet)) {
            let context = job.model.gpt_context() as usize;
            return Dataset::load_spec(spec, job.seed, job.eval_fraction, context);
        }
        let (encoder, context) = if hf {
            let dir = job.model.hf.as_deref().expect("validated");
            let config = crate::models::hf::HfConfig::read(dir)
                .map_err(|e| DataError::Model(e.to_string()))?;
            let context = job
                .model
                .context
                .unwrap_or(config.max_context.min(DEFAULT_HF_CONTEXT));
            let vocab = usize::try_from(config.vocab).unwrap_or(0);
            let chat = spec.messages_field.is_some();
            (Encoder::hf(dir, vocab, chat)?, context as usize)
        } else {
            (Encoder::Bytes, job.model.gpt_context() as usize)
        };
        Dataset::packed(Setup {
            spec,
            seed: job.seed,
            eval_fraction: job.eval_fraction,
            context,
            encoder,
            cache_dir: job.run_dir().join("data"),
        })
    }

    /// A tokenized dataset (`jsonl`, `parquet`, or `text` for an hf model).
    pub fn packed(setup: Setup) -> Result<Dataset, DataError> {
        let (len, vocab) = (setup.context, setup.encoder.vocab());
        let p = Packed::load(setup)?;
        Ok(Dataset {
            task: Task::Lm {
                len,
                masked: p.masked(),
                vocab,
            },
            train: Split::empty(),
            eval: Split::empty(),
            mask: None,
            arithmetic: None,
            packed: Some(p),
        })
    }

    /// Loads an in-memory dataset (`csv`, `npy`, `arithmetic`, and `text` as bytes).
    /// `context` is the gpt context (LM kinds).
    pub fn load_spec(
        spec: &DataSpec,
        seed: u64,
        eval_fraction: f64,
        context: usize,
    ) -> Result<Dataset, DataError> {
        match spec.kind {
            DataKind::Csv => {
                let path = spec.path.as_deref().expect("validated");
                let (x, y, f) = parse_csv(path, &read_file(path)?)?;
                Dataset::classification(x, y, f, seed, eval_fraction, spec.standardize, path)
            }
            DataKind::Npy => {
                let fp = spec.features.as_deref().expect("validated");
                let lp = spec.labels.as_deref().expect("validated");
                let (shape, x) = parse_npy(fp, &read_file(fp)?)?;
                if shape.len() != 2 {
                    return Err(format_err(
                        fp,
                        format!("features must be 2-D, not {shape:?}"),
                    ));
                }
                let (lshape, y) = parse_npy(lp, &read_file(lp)?)?;
                if lshape.len() != 1 || lshape[0] != shape[0] {
                    return Err(format_err(
                        lp,
                        format!(
                            "labels must be 1-D with {} entries, not {lshape:?}",
                            shape[0]
                        ),
                    ));
                }
                let mut labels = Vec::with_capacity(y.len());
                for (i, v) in y.into_iter().enumerate() {
                    if v < 0.0 || v.fract() != 0.0 || v > 1e6 {
                        return Err(format_err(
                            lp,
                            format!("label {i} is {v}, not a class index"),
                        ));
                    }
                    labels.push(v as i64);
                }
                Dataset::classification(
                    x.into_iter().map(|v| v as f32).collect(),
                    labels,
                    shape[1],
                    seed,
                    eval_fraction,
                    spec.standardize,
                    fp,
                )
            }
            DataKind::Text => {
                let path = spec.path.as_deref().expect("validated");
                Dataset::text(&read_file(path)?, context, eval_fraction, path)
            }
            DataKind::Arithmetic => Ok(Dataset::arithmetic(
                spec.digits as usize,
                spec.reverse_answer,
                seed,
                eval_fraction,
            )),
            DataKind::Jsonl | DataKind::Parquet => Err(format_err(
                Path::new("[data]"),
                "jsonl and parquet data are tokenized: load them with Dataset::load",
            )),
        }
    }

    fn classification(
        mut x: Vec<f32>,
        y: Vec<i64>,
        features: usize,
        seed: u64,
        eval_fraction: f64,
        standardize: bool,
        path: &Path,
    ) -> Result<Dataset, DataError> {
        let classes = y.iter().copied().max().unwrap_or(0) as usize + 1;
        let n = y.len();
        let held: Vec<bool> = (0..n as u64)
            .map(|i| held_out(seed, i, eval_fraction))
            .collect();
        let n_eval = held.iter().filter(|&&h| h).count();
        if n_eval == 0 || n_eval == n {
            return Err(DataError::TooSmall(format!(
                "{}: {n} rows cannot be split into training and held-out rows",
                path.display()
            )));
        }
        if standardize {
            for j in 0..features {
                let (mut s, mut s2, mut c) = (0f64, 0f64, 0f64);
                for i in (0..n).filter(|&i| !held[i]) {
                    let v = x[i * features + j] as f64;
                    s += v;
                    s2 += v * v;
                    c += 1.0;
                }
                let mean = s / c;
                let std = (s2 / c - mean * mean).max(0.0).sqrt();
                let scale = if std > 1e-8 { 1.0 / std } else { 1.0 };
                for i in 0..n {
                    let v = &mut x[i * features + j];
                    *v = ((*v as f64 - mean) * scale) as f32;
                }
            }
        }
        let mut train = Split::empty();
        let mut eval = Split::empty();
        for i in 0..n {
            let s = if held[i] { &mut eval } else { &mut train };
            s.x.extend_from_slice(&x[i * features..(i + 1) * features]);
            s.y.push(y[i]);
            s.n += 1;
        }
        Ok(Dataset {
            task: Task::Classify { features, classes },
            train,
            eval,
            mask: None,
            arithmetic: None,
            packed: None,
        })
    }

    /// Byte-level windows of `context + 1` bytes at stride `context`; the last
    /// `eval_fraction` of the text is held out.
    fn text(
        bytes: &[u8],
        context: usize,
        eval_fraction: f64,
        path: &Path,
    ) -> Result<Dataset, DataError> {
        let cut = ((bytes.len() as f64) * (1.0 - eval_fraction)) as usize;
        let windows = |part: &[u8]| -> Split {
            let mut s = Split::empty();
            if part.len() > context {
                let n = (part.len() - 1) / context;
                for w in 0..n {
                    s.tokens
                        .extend_from_slice(&part[w * context..w * context + context + 1]);
                }
                s.n = n;
            }
            s
        };
        let train = windows(&bytes[..cut]);
        let eval = windows(&bytes[cut..]);
        if train.n == 0 || eval.n == 0 {
            return Err(DataError::TooSmall(format!(
                "{}: {} bytes are too few for windows of {} bytes on both sides of the split",
                path.display(),
                bytes.len(),
                context + 1
            )));
        }
        Ok(Dataset {
            task: Task::Lm {
                len: context,
                masked: false,
                vocab: 256,
            },
            train,
            eval,
            mask: None,
            arithmetic: None,
            packed: None,
        })
    }

    /// All sums of two `digits`-digit numbers (sampled above [`MAX_PAIRS`]); a pair is held
    /// out by its own hash, so held-out sums never appear in training.
    fn arithmetic(digits: usize, reversed: bool, seed: u64, eval_fraction: f64) -> Dataset {
        let fmt = ArithmeticFormat {
            digits,
            prompt: 2 * digits + 2,
            answer: digits + 1,
            reversed,
        };
        let base = 10u64.pow(digits as u32);
        let total = base.saturating_mul(base);
        let pairs: Box<dyn Iterator<Item = (u64, u64)>> = if total <= MAX_PAIRS {
            Box::new((0..total).map(move |i| (i / base, i % base)))
        } else {
            Box::new((0..MAX_PAIRS).map(move |i| {
                let r = mix(seed ^ mix(i ^ 0xa5a5));
                ((r >> 32) % base, (r & 0xffff_ffff) % base)
            }))
        };
        let mut train = Split::empty();
        let mut eval = Split::empty();
        for (a, b) in pairs {
            let s = if held_out(seed, a * base + b, eval_fraction) {
                &mut eval
            } else {
                &mut train
            };
            s.tokens.extend_from_slice(fmt.render(a, b).as_bytes());
            s.n += 1;
        }
        let len = fmt.prompt + fmt.answer - 1;
        // Target position t predicts token t+1; answer tokens are prompt..prompt+answer.
        let mask = (0..len)
            .map(|t| if t + 1 >= fmt.prompt { 1.0 } else { 0.0 })
            .collect();
        Dataset {
            task: Task::Lm {
                len,
                masked: true,
                vocab: 256,
            },
            train,
            eval,
            mask: Some(mask),
            arithmetic: Some(fmt),
            packed: None,
        }
    }

    /// Training samples.
    pub fn train_len(&self) -> u64 {
        match &self.packed {
            Some(p) => p.train_len(),
            None => self.train.n as u64,
        }
    }

    /// Held-out samples evaluated (at most [`MAX_EVAL_SAMPLES`]).
    pub fn eval_len(&self) -> usize {
        match &self.packed {
            Some(p) => p.eval_seqs(),
            None => self.eval.n,
        }
        .min(MAX_EVAL_SAMPLES)
    }

    /// The training samples `ids` as a batch (an error only when the token cache cannot
    /// be read).
    pub fn train_batch(&self, ids: &[u64]) -> Result<Batch, DataError> {
        match &self.packed {
            Some(p) => p.batch(false, ids.iter().copied()),
            None => Ok(self.batch(&self.train, ids.iter().map(|&i| i as usize))),
        }
    }

    /// Held-out samples `range` as a batch.
    pub fn eval_batch(&self, range: std::ops::Range<usize>) -> Result<Batch, DataError> {
        match &self.packed {
            Some(p) => p.batch(true, range.map(|i| i as u64)),
            None => Ok(self.batch(&self.eval, range)),
        }
    }

    /// Held-out arithmetic samples `range`: prompts `[B, prompt]` and answers as numbers.
    pub fn eval_prompts(&self, range: std::ops::Range<usize>) -> Option<(Tensor, Vec<u64>)> {
        let fmt = self.arithmetic?;
        let row = fmt.prompt + fmt.answer;
        let mut prompts = Vec::with_capacity(range.len() * fmt.prompt);
        let mut answers = Vec::with_capacity(range.len());
        for i in range.clone() {
            let s = &self.eval.tokens[i * row..(i + 1) * row];
            prompts.extend(s[..fmt.prompt].iter().map(|&b| b as i64));
            answers.push(fmt.parse_answer(&s[fmt.prompt..])?);
        }
        Some((
            Tensor::from_slice(&prompts).view([range.len() as i64, fmt.prompt as i64]),
            answers,
        ))
    }

    fn batch(&self, split: &Split, ids: impl ExactSizeIterator<Item = usize>) -> Batch {
        let b = ids.len();
        match self.task {
            Task::Classify { features, .. } => {
                let mut x = Vec::with_capacity(b * features);
                let mut y = Vec::with_capacity(b);
                for i in ids {
                    x.extend_from_slice(&split.x[i * features..(i + 1) * features]);
                    y.push(split.y[i]);
                }
                Batch {
                    x: Tensor::from_slice(&x).view([b as i64, features as i64]),
                    y: Tensor::from_slice(&y),
                    mask: None,
                    len: b,
                }
            }
            Task::Lm { len, .. } => {
                let row = len + 1;
                let mut x = Vec::with_capacity(b * len);
                let mut y = Vec::with_capacity(b * len);
                for i in ids {
                    let s = &split.tokens[i * row..(i + 1) * row];
                    x.extend(s[..len].iter().map(|&t| t as i64));
                    y.extend(s[1..].iter().map(|&t| t as i64));
                }
                let mask = self.mask.as_ref().map(|m| {
                    Tensor::from_slice(m)
                        .view([1, len as i64])
                        .expand([b as i64, len as i64], false)
                        .to_kind(Kind::Float)
                });
                Batch {
                    x: Tensor::from_slice(&x).view([b as i64, len as i64]),
                    y: Tensor::from_slice(&y).view([b as i64, len as i64]),
                    mask,
                    len: b,
                }
            }
        }
    }
}

impl Split {
    fn empty() -> Split {
        Split {
            x: Vec::new(),
            tokens: Vec::new(),
            y: Vec::new(),
            n: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_layout_and_split() {
        let d = Dataset::arithmetic(2, true, 1, 0.1);
        assert_eq!(d.train_len() as usize + d.eval.n, 10_000);
        let fmt = d.arithmetic.unwrap();
        assert_eq!(fmt.render(37, 45), "37+45=280");
        assert_eq!(fmt.parse_answer(b"280"), Some(82));
        assert_eq!(
            d.task,
            Task::Lm {
                len: 8,
                masked: true,
                vocab: 256
            }
        );
        // Held-out sums never appear in training.
        let row = 9;
        let train: std::collections::HashSet<&[u8]> =
            d.train.tokens.chunks(row).map(|c| &c[..6]).collect();
        assert!(d.eval.tokens.chunks(row).all(|c| !train.contains(&c[..6])));
        let b = d.train_batch(&[0, 1]).unwrap();
        assert_eq!(b.x.size(), vec![2, 8]);
        let m: Vec<f32> = Vec::try_from(b.mask.unwrap().get(0)).unwrap();
        assert_eq!(m, vec![0., 0., 0., 0., 0., 1., 1., 1.]);
        let (p, a) = d.eval_prompts(0..3).unwrap();
        assert_eq!(p.size(), vec![3, 6]);
        assert_eq!(a.len(), 3);
    }

    #[test]
    fn text_windows() {
        let text: Vec<u8> = (0..1000u32).map(|i| b'a' + (i % 26) as u8).collect();
        let d = Dataset::text(&text, 16, 0.1, Path::new("t")).unwrap();
        assert_eq!(d.train_len(), (900 - 1) / 16);
        let b = d.train_batch(&[1]).unwrap();
        let x: Vec<i64> = Vec::try_from(b.x.view([-1])).unwrap();
        let y: Vec<i64> = Vec::try_from(b.y.view([-1])).unwrap();
        assert_eq!(x[1..], y[..15]);
        assert!(Dataset::text(b"short", 16, 0.1, Path::new("t")).is_err());
    }
}
