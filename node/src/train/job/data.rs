//! `[data]`: what a job trains on, and its checks.

use super::{default_true, invalid, JobError, JobSpec, ModelKind};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Which data to train on.
///
/// Language-model data (`text`, `jsonl`, `parquet`) is tokenized with the model's
/// tokenizer: the `gpt`'s bytes (vocabulary 256), or an `hf` model folder's
/// `tokenizer.json` (see `train::data` for packing, the token cache and the memory bound).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// `csv`, `text`, `npy`, `arithmetic`, `jsonl` or `parquet`.
    pub kind: DataKind,
    /// csv / text: the file (`.gz` accepted for csv). Default: none (required by those
    /// kinds).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// jsonl / parquet: the data: a file, a directory (its `*.jsonl` or `*.parquet` files,
    /// sorted by name), or a glob whose last component holds `*` or `?`
    /// (`shards/part-*.parquet`; matches sorted by name). Relative paths resolve against
    /// the job file's directory, as `path` does. Default: none (required by those kinds).
    #[serde(default)]
    pub files: Option<PathBuf>,
    /// jsonl / parquet: the field (column) holding each record's text. Default: `text`.
    #[serde(default = "default_text_field")]
    pub text_field: String,
    /// jsonl / parquet: chat data: the field holding each record's list of `{role,
    /// content}` messages, rendered with the model's chat template, the loss counted only
    /// on the assistant messages' tokens (`text_field` is then not read). Needs an `hf`
    /// model. Default: none (plain text).
    #[serde(default)]
    pub messages_field: Option<String>,
    /// npy: 2-D float32/float64 features.
    #[serde(default)]
    pub features: Option<PathBuf>,
    /// npy: 1-D integer labels.
    #[serde(default)]
    pub labels: Option<PathBuf>,
    /// csv: scale features to zero mean and unit variance (statistics of the training
    /// split). Default: true.
    #[serde(default = "default_true")]
    pub standardize: bool,
    /// arithmetic: digits per operand. Default: 2.
    #[serde(default = "default_digits")]
    pub digits: u32,
    /// arithmetic: write the answer least-significant digit first (easier to learn).
    /// Default: true.
    #[serde(default = "default_true")]
    pub reverse_answer: bool,
}

fn default_digits() -> u32 {
    2
}
fn default_text_field() -> String {
    "text".into()
}

/// Dataset kinds.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum DataKind {
    /// Numeric features then an integer label per line.
    Csv,
    /// A text file for byte-level language modelling.
    Text,
    /// NumPy arrays: `features` and `labels`.
    Npy,
    /// Synthetic sums like `37+45=82`.
    Arithmetic,
    /// JSON Lines: one JSON object per line, its text in `text_field` (or its
    /// conversation in `messages_field`).
    Jsonl,
    /// Apache Parquet: one record per row, its text in the string column `text_field` (or
    /// its conversation in the list column `messages_field`).
    Parquet,
}

impl DataKind {
    /// Whether a language model trains on this kind (else a classifier does).
    pub fn is_lm(self) -> bool {
        matches!(
            self,
            DataKind::Text | DataKind::Arithmetic | DataKind::Jsonl | DataKind::Parquet
        )
    }
}

impl JobSpec {
    /// `[data]`: the kind's keys, and that the model trains on that kind of data.
    pub(super) fn validate_data(&self) -> Result<(), JobError> {
        let m = &self.model;
        let d = &self.data;
        match d.kind {
            DataKind::Csv | DataKind::Text if d.path.is_none() => {
                return Err(invalid("data.path", "is missing"))
            }
            DataKind::Npy if d.features.is_none() => {
                return Err(invalid("data.features", "is missing (an .npy file)"))
            }
            DataKind::Npy if d.labels.is_none() => {
                return Err(invalid("data.labels", "is missing (an .npy file)"))
            }
            DataKind::Arithmetic if !(1..=9).contains(&d.digits) => {
                return Err(invalid("data.digits", "must be between 1 and 9"))
            }
            DataKind::Jsonl | DataKind::Parquet if d.files.is_none() => {
                return Err(invalid(
                    "data.files",
                    "is missing (a file, a directory or a glob of shards)",
                ))
            }
            _ => {}
        }
        let field_ok = |f: &str| !f.is_empty() && f.len() <= 256;
        if !field_ok(&d.text_field) {
            return Err(invalid("data.text_field", "must be 1-256 characters"));
        }
        if let Some(f) = &d.messages_field {
            if !field_ok(f) {
                return Err(invalid("data.messages_field", "must be 1-256 characters"));
            }
            if !matches!(d.kind, DataKind::Jsonl | DataKind::Parquet) {
                return Err(invalid(
                    "data.messages_field",
                    "applies to `jsonl` and `parquet` data only",
                ));
            }
            if self.model_kind() != ModelKind::Hf {
                return Err(invalid(
                    "data.messages_field",
                    "needs an `hf` model (its chat template renders the messages)",
                ));
            }
        }
        match (self.model_kind(), d.kind.is_lm()) {
            (ModelKind::Gpt, false) => {
                return Err(invalid(
                    "model.kind",
                    "gpt trains on `text`, `jsonl`, `parquet` or `arithmetic` data",
                ))
            }
            (ModelKind::Hf, lm) if !lm || d.kind == DataKind::Arithmetic => {
                return Err(invalid(
                    "model.kind",
                    "hf trains on `text`, `jsonl` or `parquet` data",
                ))
            }
            (ModelKind::Mlp, true) => {
                return Err(invalid("model.kind", "mlp trains on `csv` or `npy` data"))
            }
            _ => {}
        }
        if d.kind == DataKind::Arithmetic && self.model_kind() == ModelKind::Gpt {
            let need = 3 * d.digits as i64 + 3;
            if m.gpt_context() < need {
                return Err(invalid(
                    "model.context",
                    format!("must be at least {need} for {}-digit sums", d.digits),
                ));
            }
        }
        Ok(())
    }
}
