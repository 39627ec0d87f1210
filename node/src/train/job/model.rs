//! `[model]`: which network a job trains, and its checks.

use super::{invalid, JobError, JobSpec};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// Which model to train.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// `mlp`, `gpt`, `torchscript` or `hf`. Default: `hf` when `hf` is set, `torchscript`
    /// when `torchscript` is set, else required.
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

impl JobSpec {
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

    /// `[model]`: the kind's keys and their ranges.
    pub(super) fn validate_model(&self) -> Result<(), JobError> {
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
}
