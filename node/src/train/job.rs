//! Job files (TOML): what to train, on what, for how long, and where results go.
//!
//! A job file is parsed with unknown keys refused, then validated; every error names the
//! key and the problem. The submitter resolves relative input paths against the job
//! file's directory and the output dir against its working directory
//! ([`JobSpec::resolve_paths`]) before the job is announced on the swarm, so every member
//! reads the same absolute paths.
//!
//! ```toml
//! name = "digits"
//! steps = 300              # or: epochs = 5
//! batch_size = 128         # global, split across members
//! [model]
//! kind = "mlp"             # mlp | gpt | torchscript (or: torchscript = "model.pt")
//! hidden = [128]
//! [data]
//! kind = "csv"             # csv | text | npy | arithmetic | jsonl | parquet
//! path = "digits.csv.gz"
//! [optimizer]
//! kind = "adamw"           # adamw | sgd
//! lr = 0.003
//! ```

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

/// Largest job file accepted (it travels on the control plane).
pub const MAX_JOB_BYTES: usize = 32 * 1024;

/// Why a job file was refused.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The file could not be read.
    #[error("cannot read job file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The text is larger than [`MAX_JOB_BYTES`].
    #[error("job file is {0} bytes; the limit is {MAX_JOB_BYTES}")]
    TooLarge(usize),
    /// The TOML is malformed, a key is unknown, or a value has the wrong type.
    #[error("job file: {0}")]
    Parse(String),
    /// A key holds a value that is out of range or inconsistent with another.
    #[error("job file: `{key}` {problem}")]
    Invalid {
        /// The key, dotted (`optimizer.lr`).
        key: &'static str,
        /// What is wrong with it.
        problem: String,
    },
}

fn invalid(key: &'static str, problem: impl Into<String>) -> JobError {
    JobError::Invalid {
        key,
        problem: problem.into(),
    }
}

/// A training job.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// Job name: letters, digits, `-`, `_`, `.`; names the output folder `runs/<name>/`.
    pub name: String,
    /// Seed for initialisation, data order and held-out split. Default: 1.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Optimizer steps to run (exactly one of `steps` and `epochs`).
    #[serde(default)]
    pub steps: Option<u64>,
    /// Data epochs to run (exactly one of `steps` and `epochs`).
    #[serde(default)]
    pub epochs: Option<u64>,
    /// Global batch size in samples, split across the members by share.
    pub batch_size: u64,
    /// Samples per data shard (the unit handed to members, and so the resolution at which
    /// `balance` can move samples between them). Default: 1.
    #[serde(default = "default_shard_size")]
    pub shard_size: u64,
    /// The job starts once this many members are in the view. Default: 1.
    #[serde(default = "default_min_nodes")]
    pub min_nodes: usize,
    /// Torch intra-op threads per node. Default: 1.
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// Fraction of the data held out for evaluation. Default: 0.1.
    #[serde(default = "default_eval_fraction")]
    pub eval_fraction: f64,
    /// Evaluate every this many steps (and after the last). 0: only after the last. Default: 0.
    #[serde(default)]
    pub eval_every: u64,
    /// Write a checkpoint every this many steps (and after the last). 0: only after the
    /// last. Default: 0.
    #[serde(default)]
    pub checkpoint_every: u64,
    /// Where `<name>/` is written. Default: `runs`.
    #[serde(default = "default_output_dir")]
    pub output_dir: PathBuf,
    /// Compare a hash of every member's weights every this many steps (0: never); a
    /// mismatch stops the job naming the members. Default: 50.
    #[serde(default = "default_consistency_every")]
    pub consistency_every: u64,
    /// Gradient guard: a member's gradient whose norm (of its mean over the member's
    /// samples) exceeds this many times the median of the other members' is left out of
    /// the step (its samples are computed by the others on top of their own); NaN/Inf
    /// gradients always are. 0: only the NaN/Inf check. Default: 10.
    #[serde(default = "default_grad_guard")]
    pub grad_guard: f64,
    /// Split each step's batch in proportion to the members' measured speed (samples per
    /// second of gradient computation, smoothed over steps) rather than equally, so a
    /// slower or busier member does not hold the others up. Default: true.
    #[serde(default = "default_true")]
    pub balance: bool,
    /// Gradient bucket size in bytes; buckets are all-reduced concurrently. Default: 4 MiB.
    #[serde(default = "default_bucket_bytes")]
    pub bucket_bytes: u64,
    /// Record which sample ids every member used at every step in
    /// `runs/<name>/samples.<member>.jsonl` (for audits and tests). Default: false.
    #[serde(default)]
    pub log_samples: bool,
    /// Where each member computes: `auto` (the member's node's device, `shoal up
    /// --device`, whose own default is the first CUDA device when libtorch sees one, else
    /// the CPU), `cpu`, `cuda` or `cuda:N`, resolved by each member on its own machine; a member asked for CUDA without one fails the job with a one-line reason.
    /// Members may differ (a view of CUDA and CPU members trains through the ring; one of
    /// CUDA members only, through NCCL). Not part of the job's identity: a checkpoint
    /// written on one device resumes on another. Default: `auto`.
    #[serde(default)]
    pub device: crate::device::DeviceSpec,
    /// `f32`, or `bf16`: mixed precision (forward and backward in bfloat16 on bfloat16
    /// copies of the weights; gradients summed and the update applied in f32 to f32 master
    /// weights, which checkpoints and state transfer carry). Default: `f32`.
    #[serde(default)]
    pub precision: crate::device::Precision,
    /// The model.
    pub model: ModelSpec,
    /// The data.
    pub data: DataSpec,
    /// The optimizer and learning-rate schedule.
    #[serde(default)]
    pub optimizer: OptimizerSpec,
}

fn default_seed() -> u64 {
    1
}
fn default_shard_size() -> u64 {
    1
}
fn default_min_nodes() -> usize {
    1
}
fn default_threads() -> usize {
    1
}
fn default_eval_fraction() -> f64 {
    0.1
}
fn default_output_dir() -> PathBuf {
    PathBuf::from("runs")
}
fn default_consistency_every() -> u64 {
    50
}
fn default_grad_guard() -> f64 {
    10.0
}
fn default_bucket_bytes() -> u64 {
    4 << 20
}

/// Which model to train.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// `mlp`, `gpt` or `torchscript`. Default: `torchscript` when `torchscript` is set,
    /// else required.
    #[serde(default)]
    pub kind: Option<ModelKind>,
    /// A trainable TorchScript module file (`forward(x) -> logits`).
    #[serde(default)]
    pub torchscript: Option<PathBuf>,
    /// mlp: hidden layer widths. Default: `[128]`.
    #[serde(default = "default_hidden")]
    pub hidden: Vec<i64>,
    /// gpt: transformer blocks. Default: 2.
    #[serde(default = "default_layers")]
    pub layers: i64,
    /// gpt: attention heads. Default: 4.
    #[serde(default = "default_heads")]
    pub heads: i64,
    /// gpt: model width. Default: 128.
    #[serde(default = "default_width")]
    pub width: i64,
    /// Context length in tokens: gpt: bytes, default 64, at least the arithmetic sequence
    /// length for that corpus; hf: the training sequence length, default the model's
    /// `max_position_embeddings` or 1024, whichever is less.
    #[serde(default)]
    pub context: Option<i64>,
    /// hf: a Hugging Face model folder (`config.json`, the weights unless `init =
    /// "random"`, `tokenizer.json` to tokenize text data). Setting it makes `kind` default
    /// to `hf`. Default: none.
    #[serde(default)]
    pub hf: Option<PathBuf>,
    /// hf: where the weights start: `pretrained` (the folder's) or `random` (drawn from
    /// `config.json` alone as transformers initialises them: pretraining). Default:
    /// `pretrained`.
    #[serde(default)]
    pub init: HfInit,
    /// hf: train LoRA adapters instead of the weights (`{ rank, alpha, targets }`).
    /// Default: none (every weight trains).
    #[serde(default)]
    pub lora: Option<LoraSpec>,
}

/// Where an hf model's weights start.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum HfInit {
    /// The folder's weights.
    #[default]
    Pretrained,
    /// Drawn from `config.json` alone.
    Random,
}

/// LoRA adapters: `W x + (alpha / rank) · B A x` on each target projection, `A` drawn
/// as PEFT draws it and `B` zero, only `A` and `B` trained and all-reduced.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoraSpec {
    /// The adapters' rank. Default: 8.
    #[serde(default = "default_lora_rank")]
    pub rank: i64,
    /// The scale's numerator (the update is scaled by `alpha / rank`). Default: 16.
    #[serde(default = "default_lora_alpha")]
    pub alpha: f64,
    /// The projections adapted, by their last name: `q_proj`, `k_proj`, `v_proj`,
    /// `o_proj`, `gate_proj`, `up_proj`, `down_proj`. Default: `["q_proj", "v_proj"]`.
    #[serde(default = "default_lora_targets")]
    pub targets: Vec<String>,
}

fn default_lora_rank() -> i64 {
    8
}
fn default_lora_alpha() -> f64 {
    16.0
}
fn default_lora_targets() -> Vec<String> {
    vec!["q_proj".into(), "v_proj".into()]
}

/// The projections LoRA may target.
pub const LORA_TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

impl ModelSpec {
    /// The gpt's context: `context`, default 64.
    pub fn gpt_context(&self) -> i64 {
        self.context.unwrap_or(64)
    }
}

fn default_hidden() -> Vec<i64> {
    vec![128]
}
fn default_layers() -> i64 {
    2
}
fn default_heads() -> i64 {
    4
}
fn default_width() -> i64 {
    128
}

/// Built-in model kinds.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ModelKind {
    /// A ReLU multi-layer perceptron classifier.
    Mlp,
    /// A byte-level decoder-only transformer.
    Gpt,
    /// A TorchScript module from `model.torchscript`.
    Torchscript,
    /// A Hugging Face decoder (Llama, Mistral, Qwen2, Qwen3) from `model.hf`.
    Hf,
}

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

fn default_true() -> bool {
    true
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

/// Optimizer settings.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OptimizerSpec {
    /// `adamw` or `sgd`. Default: adamw.
    #[serde(default = "default_optimizer")]
    pub kind: OptimizerKind,
    /// Peak learning rate. Default: 0.001.
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// Decoupled weight decay (AdamW) or L2 (SGD). Default: 0.01.
    #[serde(default = "default_wd")]
    pub weight_decay: f64,
    /// AdamW betas. Default: [0.9, 0.999].
    #[serde(default = "default_betas")]
    pub betas: [f64; 2],
    /// AdamW epsilon. Default: 1e-8.
    #[serde(default = "default_eps")]
    pub eps: f64,
    /// SGD momentum. Default: 0.9.
    #[serde(default = "default_momentum")]
    pub momentum: f64,
    /// `constant`, `linear` (decay to 0) or `cosine` (decay to 0). Default: cosine.
    #[serde(default = "default_schedule")]
    pub schedule: Schedule,
    /// Linear warm-up steps. Default: 0.
    #[serde(default)]
    pub warmup_steps: u64,
    /// Clip the global gradient norm to this (0: off). Default: 1.0.
    #[serde(default = "default_clip")]
    pub grad_clip: f64,
}

impl Default for OptimizerSpec {
    fn default() -> Self {
        OptimizerSpec {
            kind: default_optimizer(),
            lr: default_lr(),
            weight_decay: default_wd(),
            betas: default_betas(),
            eps: default_eps(),
            momentum: default_momentum(),
            schedule: default_schedule(),
            warmup_steps: 0,
            grad_clip: default_clip(),
        }
    }
}

fn default_optimizer() -> OptimizerKind {
    OptimizerKind::Adamw
}
fn default_lr() -> f64 {
    1e-3
}
fn default_wd() -> f64 {
    0.01
}
fn default_betas() -> [f64; 2] {
    [0.9, 0.999]
}
fn default_eps() -> f64 {
    1e-8
}
fn default_momentum() -> f64 {
    0.9
}
fn default_schedule() -> Schedule {
    Schedule::Cosine
}
fn default_clip() -> f64 {
    1.0
}

/// Optimizers.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    /// Adam with decoupled weight decay.
    Adamw,
    /// Stochastic gradient descent with momentum.
    Sgd,
}

/// Learning-rate schedules (after warm-up).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Schedule {
    /// The peak rate throughout.
    Constant,
    /// Linear decay to 0 at the last step.
    Linear,
    /// Cosine decay to 0 at the last step.
    Cosine,
}

impl JobSpec {
    /// Reads and validates a job file.
    pub fn load(path: &Path) -> Result<JobSpec, JobError> {
        let text = std::fs::read_to_string(path).map_err(|source| JobError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        JobSpec::parse(&text)
    }

    /// Parses and validates job text.
    pub fn parse(text: &str) -> Result<JobSpec, JobError> {
        if text.len() > MAX_JOB_BYTES {
            return Err(JobError::TooLarge(text.len()));
        }
        let spec: JobSpec =
            toml::from_str(text).map_err(|e| JobError::Parse(e.to_string().trim().to_string()))?;
        spec.validate()?;
        Ok(spec)
    }

    /// The job as TOML (what is announced on the swarm).
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a job spec always serializes")
    }

    /// A hash naming this exact job (SHA-256 of its TOML form, `device` left out), in hex.
    pub fn hash(&self) -> String {
        hex::encode(self.identity())
    }

    /// A 64-bit digest of [`JobSpec::hash`] used to tag the job's collectives.
    pub fn tag_base(&self) -> u64 {
        u64::from_le_bytes(self.identity()[..8].try_into().expect("8 bytes"))
    }

    /// SHA-256 of the job as TOML, without where it runs (`device`): what the job is.
    fn identity(&self) -> [u8; 32] {
        let what = JobSpec {
            device: Default::default(),
            ..self.clone()
        };
        Sha256::digest(what.to_toml().as_bytes()).into()
    }

    /// Makes every relative path absolute: inputs (data, model) against `job_dir` (the job
    /// file's directory), `output_dir` against `cwd` (where `shoal train` was run).
    pub fn resolve_paths(&mut self, job_dir: &Path, cwd: &Path) {
        if self.output_dir.is_relative() {
            self.output_dir = cwd.join(&self.output_dir);
        }
        let base = job_dir;
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        };
        if let Some(p) = self.model.torchscript.as_mut() {
            fix(p);
        }
        for p in [
            self.data.path.as_mut(),
            self.data.files.as_mut(),
            self.data.features.as_mut(),
            self.data.labels.as_mut(),
        ]
        .into_iter()
        .flatten()
        {
            fix(p);
        }
    }

    /// The model kind, with the `torchscript = ...` shorthand applied.
    pub fn model_kind(&self) -> ModelKind {
        match (self.model.kind, &self.model.hf) {
            (Some(k), _) => k,
            (None, Some(_)) => ModelKind::Hf,
            (None, None) => ModelKind::Torchscript,
        }
    }

    /// The model's architecture as JSON (checkpoint metadata `model`; what `shoal serve`
    /// rebuilds the model from).
    pub fn model_json(&self) -> String {
        let kind = match self.model_kind() {
            ModelKind::Mlp => "mlp",
            ModelKind::Gpt => "gpt",
            ModelKind::Torchscript => "torchscript",
            ModelKind::Hf => "hf",
        };
        let m = &self.model;
        serde_json::json!({
            "kind": kind,
            "layers": m.layers,
            "heads": m.heads,
            "width": m.width,
            "context": m.gpt_context(),
            "hidden": m.hidden,
        })
        .to_string()
    }

    /// `runs/<name>/`.
    pub fn run_dir(&self) -> PathBuf {
        self.output_dir.join(&self.name)
    }

    /// Checks ranges and consistency; the error names the key.
    pub fn validate(&self) -> Result<(), JobError> {
        self.validate_run()?;
        self.validate_model()?;
        self.validate_data()?;
        self.validate_optimizer()
    }

    /// The run's keys: name, length, batch and shard sizes, members, threads, guard, buckets.
    fn validate_run(&self) -> Result<(), JobError> {
        if self.name.is_empty()
            || self.name.len() > 64
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            || self.name.starts_with('.')
        {
            return Err(invalid(
                "name",
                "must be 1-64 characters of letters, digits, '-', '_', '.' (not starting with '.')",
            ));
        }
        match (self.steps, self.epochs) {
            (Some(0), _) => return Err(invalid("steps", "must be at least 1")),
            (_, Some(0)) => return Err(invalid("epochs", "must be at least 1")),
            (Some(_), Some(_)) => {
                return Err(invalid("steps", "and `epochs` are both set; set one"))
            }
            (None, None) => return Err(invalid("steps", "is missing (or set `epochs`)")),
            _ => {}
        }
        if self.batch_size == 0 || self.batch_size > 1 << 20 {
            return Err(invalid("batch_size", "must be between 1 and 1048576"));
        }
        if self.shard_size == 0 {
            return Err(invalid("shard_size", "must be at least 1"));
        }
        if self.min_nodes == 0 || self.min_nodes > 1024 {
            return Err(invalid("min_nodes", "must be between 1 and 1024"));
        }
        if self.threads == 0 || self.threads > 256 {
            return Err(invalid("threads", "must be between 1 and 256"));
        }
        if !(self.eval_fraction > 0.0 && self.eval_fraction < 1.0) {
            return Err(invalid("eval_fraction", "must be in (0, 1)"));
        }
        if !(self.grad_guard.is_finite() && self.grad_guard >= 0.0) {
            return Err(invalid(
                "grad_guard",
                "must be 0 (off) or a positive factor",
            ));
        }
        if self.bucket_bytes < 4096 {
            return Err(invalid("bucket_bytes", "must be at least 4096"));
        }
        Ok(())
    }

    /// `[model]`: the kind's keys and their ranges.
    fn validate_model(&self) -> Result<(), JobError> {
        let m = &self.model;
        if self.precision == crate::device::Precision::Bf16
            && self.model_kind() == ModelKind::Torchscript
        {
            return Err(invalid(
                "precision",
                "\"bf16\" is not supported for TorchScript models (their own code decides its types)",
            ));
        }
        match self.model_kind() {
            ModelKind::Torchscript if m.torchscript.is_none() => {
                return Err(invalid(
                    "model.torchscript",
                    "is missing (the path of a TorchScript module)",
                ))
            }
            ModelKind::Mlp | ModelKind::Gpt | ModelKind::Hf if m.torchscript.is_some() => {
                return Err(invalid(
                    "model.torchscript",
                    "is set but `model.kind` is not \"torchscript\"",
                ))
            }
            ModelKind::Mlp => {
                if m.hidden.iter().any(|&h| !(1..=65536).contains(&h)) {
                    return Err(invalid(
                        "model.hidden",
                        "widths must be between 1 and 65536",
                    ));
                }
            }
            ModelKind::Gpt => {
                if !(1..=64).contains(&m.layers) {
                    return Err(invalid("model.layers", "must be between 1 and 64"));
                }
                if !(1..=64).contains(&m.heads) {
                    return Err(invalid("model.heads", "must be between 1 and 64"));
                }
                if !(1..=8192).contains(&m.width) || m.width % m.heads != 0 {
                    return Err(invalid(
                        "model.width",
                        format!(
                            "must be between 1 and 8192 and divisible by model.heads ({})",
                            m.heads
                        ),
                    ));
                }
                if !(2..=8192).contains(&m.gpt_context()) {
                    return Err(invalid("model.context", "must be between 2 and 8192"));
                }
            }
            ModelKind::Torchscript => {}
            ModelKind::Hf => self.validate_hf()?,
        }
        Ok(())
    }

    /// `[model]` of an hf job: the folder, the context, LoRA's keys.
    fn validate_hf(&self) -> Result<(), JobError> {
        let m = &self.model;
        if m.hf.is_none() {
            return Err(invalid(
                "model.hf",
                "is missing (a Hugging Face model folder)",
            ));
        }
        if m.context.is_some_and(|c| !(2..=1 << 20).contains(&c)) {
            return Err(invalid("model.context", "must be between 2 and 1048576"));
        }
        if let Some(l) = &m.lora {
            if !(1..=1024).contains(&l.rank) {
                return Err(invalid("model.lora.rank", "must be between 1 and 1024"));
            }
            if !(l.alpha.is_finite() && l.alpha > 0.0) {
                return Err(invalid("model.lora.alpha", "must be positive"));
            }
            if l.targets.is_empty() {
                return Err(invalid(
                    "model.lora.targets",
                    "must name at least one projection",
                ));
            }
            if let Some(t) = l
                .targets
                .iter()
                .find(|t| !LORA_TARGETS.contains(&t.as_str()))
            {
                return Err(invalid(
                    "model.lora.targets",
                    format!("`{t}` is not one of {}", LORA_TARGETS.join(", ")),
                ));
            }
        }
        Ok(())
    }

    /// `[data]`: the kind's keys, and that the model trains on that kind of data.
    fn validate_data(&self) -> Result<(), JobError> {
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

    /// `[optimizer]`: ranges.
    fn validate_optimizer(&self) -> Result<(), JobError> {
        let o = &self.optimizer;
        if !(o.lr > 0.0 && o.lr < 10.0) {
            return Err(invalid("optimizer.lr", "must be in (0, 10)"));
        }
        if !(0.0..1.0).contains(&o.weight_decay) {
            return Err(invalid("optimizer.weight_decay", "must be in [0, 1)"));
        }
        if o.betas.iter().any(|b| !(0.0..1.0).contains(b)) {
            return Err(invalid("optimizer.betas", "must both be in [0, 1)"));
        }
        if o.eps.is_nan() || o.eps <= 0.0 {
            return Err(invalid("optimizer.eps", "must be > 0"));
        }
        if !(0.0..1.0).contains(&o.momentum) {
            return Err(invalid("optimizer.momentum", "must be in [0, 1)"));
        }
        if o.grad_clip.is_nan() || o.grad_clip < 0.0 {
            return Err(invalid("optimizer.grad_clip", "must be >= 0"));
        }
        Ok(())
    }

    /// Learning rate at `step` (0-based) of `total`.
    pub fn lr_at(&self, step: u64, total: u64) -> f64 {
        let o = &self.optimizer;
        if step < o.warmup_steps {
            return o.lr * (step + 1) as f64 / o.warmup_steps as f64;
        }
        let span = total.saturating_sub(o.warmup_steps).max(1) as f64;
        let t = ((step - o.warmup_steps) as f64 / span).min(1.0);
        match o.schedule {
            Schedule::Constant => o.lr,
            Schedule::Linear => o.lr * (1.0 - t),
            Schedule::Cosine => o.lr * 0.5 * (1.0 + (std::f64::consts::PI * t).cos()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: &str = r#"
name = "t"
steps = 10
batch_size = 8
[model]
kind = "mlp"
[data]
kind = "csv"
path = "d.csv"
"#;

    #[test]
    fn minimal_job_parses_with_defaults() {
        let j = JobSpec::parse(MIN).unwrap();
        assert_eq!(j.seed, 1);
        assert_eq!(j.optimizer.kind, OptimizerKind::Adamw);
        assert_eq!(j.model.hidden, vec![128]);
        assert_eq!(j.run_dir(), PathBuf::from("runs/t"));
        // Round trip through the announced form.
        assert_eq!(JobSpec::parse(&j.to_toml()).unwrap(), j);
    }

    fn err(text: &str) -> String {
        JobSpec::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_key() {
        assert!(err(&MIN.replace("steps = 10", "steps = 0")).contains("`steps`"));
        assert!(err(&MIN.replace("steps = 10", "")).contains("`steps` is missing"));
        assert!(err(&MIN.replace("batch_size = 8", "batch_size = 0")).contains("`batch_size`"));
        assert!(err(&MIN.replace("path = \"d.csv\"", "")).contains("`data.path`"));
        assert!(err(&MIN.replace("kind = \"mlp\"", "kind = \"gpt\"")).contains("`model.kind`"));
        assert!(err(&format!("{MIN}[optimizer]\nlr = -1\n")).contains("`optimizer.lr`"));
        let unknown = err(&MIN.replace("steps = 10", "steps = 10\nstepz = 3"));
        assert!(unknown.contains("stepz"), "{unknown}");
        let wrong_type = err(&MIN.replace("steps = 10", "steps = \"ten\""));
        assert!(wrong_type.contains("steps"), "{wrong_type}");
        assert!(err(&MIN.replace("name = \"t\"", "name = \"../x\"")).contains("`name`"));
        assert!(err(&"#".repeat(MAX_JOB_BYTES + 1)).contains("limit"));
    }

    #[test]
    fn gpt_context_must_hold_a_sum() {
        let text = r#"
name = "a"
steps = 1
batch_size = 4
[model]
kind = "gpt"
context = 8
[data]
kind = "arithmetic"
digits = 2
"#;
        assert!(err(text).contains("`model.context` must be at least 9"));
    }

    #[test]
    fn schedules() {
        let mut j = JobSpec::parse(MIN).unwrap();
        j.optimizer.warmup_steps = 10;
        assert!((j.lr_at(0, 110) - j.optimizer.lr / 10.0).abs() < 1e-12);
        assert!((j.lr_at(10, 110) - j.optimizer.lr).abs() < 1e-12);
        assert!(j.lr_at(109, 110) < j.optimizer.lr * 0.01);
        j.optimizer.schedule = Schedule::Constant;
        assert_eq!(j.lr_at(100, 110), j.optimizer.lr);
    }

    #[test]
    fn lm_data_keys() {
        let gpt = MIN.replace("kind = \"mlp\"", "kind = \"gpt\"");
        let jsonl = gpt.replace(
            "kind = \"csv\"\npath = \"d.csv\"",
            "kind = \"jsonl\"\nfiles = \"shards/*.jsonl\"",
        );
        let j = JobSpec::parse(&jsonl).unwrap();
        assert_eq!(j.data.text_field, "text");
        assert_eq!(j.data.messages_field, None);
        assert!(err(&jsonl.replace("files = \"shards/*.jsonl\"", "")).contains("`data.files`"));
        assert!(err(&format!("{jsonl}messages_field = \"m\"\n")).contains("`data.messages_field`"));
        assert!(err(&format!("{jsonl}text_field = \"\"\n")).contains("`data.text_field`"));
        let parquet = jsonl.replace("jsonl", "parquet");
        assert!(JobSpec::parse(&parquet).is_ok());
        assert!(err(&parquet.replace("kind = \"gpt\"", "kind = \"mlp\"")).contains("`model.kind`"));
        let mut j = JobSpec::parse(&parquet).unwrap();
        j.resolve_paths(Path::new("/jobs"), Path::new("/work"));
        assert_eq!(
            j.data.files.as_deref(),
            Some(Path::new("/jobs/shards/*.parquet"))
        );
    }

    #[test]
    fn relative_paths_resolve_against_the_job_dir() {
        let mut j = JobSpec::parse(MIN).unwrap();
        j.resolve_paths(Path::new("/jobs"), Path::new("/work"));
        assert_eq!(j.data.path.as_deref(), Some(Path::new("/jobs/d.csv")));
        assert_eq!(j.output_dir, PathBuf::from("/work/runs"));
    }
}
