//! Hugging Face decoder folders (Llama, Mistral, Qwen2, Qwen3): the one decoder
//! implementation they share, switched by their `config.json`.
//!
//! A folder holds `config.json` and the weights as `model.safetensors` or as shards named
//! by `model.safetensors.index.json` (what `save_pretrained` writes):
//! - [`config`] parses `config.json` into an [`HfConfig`], refusing (by key and value) any
//!   `model_type`, RoPE type, activation or attention variant not implemented here;
//! - [`weights`] reads tensors by their Hugging Face names (`model.layers.0.mlp.up_proj.
//!   weight`), only those asked for, from size-checked shard headers
//!   ([`super::checkpoint::read_header`]);
//! - [`llama`] is the network ([`HfDecoder`]: RMSNorm, rotary positions, grouped-query
//!   attention, a SwiGLU MLP), implementing [`super::decoder::Decoder`] so a serving stage
//!   runs a range of its layers with its KV caches.
//!
//! `scripts/make-fixtures` writes tiny random-initialised folders of each family and
//! transformers' outputs for them (`node/tests/fixtures/hf/`); the tests in `tests.rs`
//! compare against those.

pub mod config;
pub mod export;
pub mod llama;
pub mod staged;
pub mod train;
pub mod weights;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_errors;
#[cfg(test)]
mod tests_mutated;
#[cfg(test)]
mod tests_train;

use super::config::{ModelConfig, KV_BUDGET_BATCH};
use super::stage::StageExecutor;
pub use config::HfConfig;
pub use llama::HfDecoder;
pub use weights::HfWeights;

/// Why a Hugging Face folder could not be read or loaded.
#[derive(Debug, thiserror::Error)]
pub enum HfError {
    /// File system error.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A JSON file (`config.json`, the index) is malformed or too large.
    #[error("{path}: {problem}")]
    Json {
        /// The file.
        path: String,
        /// What is wrong.
        problem: String,
    },
    /// A key of `config.json` is missing or has a value of the wrong type or range.
    #[error("{path}: `{key}`: {problem}")]
    Config {
        /// The file.
        path: String,
        /// The key.
        key: String,
        /// What is wrong.
        problem: String,
    },
    /// A key of `config.json` asks for something not implemented here.
    #[error("{path}: `{key}` = {value} is not supported ({why})")]
    Unsupported {
        /// The file.
        path: String,
        /// The key.
        key: String,
        /// Its value, as JSON.
        value: String,
        /// What is supported instead.
        why: String,
    },
    /// The weights' index or a shard is malformed (bad header, truncated, absent file).
    #[error("{path}: {problem}")]
    Weights {
        /// The file.
        path: String,
        /// What is wrong.
        problem: String,
    },
    /// A tensor the model needs is not in the folder.
    #[error("{dir}: tensor `{name}` is missing")]
    Missing {
        /// The folder.
        dir: String,
        /// The tensor.
        name: String,
    },
}

/// The compute type of a served Hugging Face model (`shoal serve --dtype`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ServeDtype {
    /// The weights' stored type on a GPU; f32 on the CPU, where one request at a time
    /// decodes faster in f32 (measured on a ~150 M Llama, 1 thread: 25.7 tok/s f32 vs 16.7
    /// bf16; 8 concurrent requests were faster in bf16, 123.6 vs 69.7: ask for `bf16` when
    /// throughput matters more than latency; `scripts/bench-serve-hf --dtype`). The
    /// default.
    #[default]
    Auto,
    /// f32.
    F32,
    /// bfloat16.
    Bf16,
    /// IEEE half precision.
    F16,
}

impl std::str::FromStr for ServeDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(ServeDtype::Auto),
            "f32" | "float32" => Ok(ServeDtype::F32),
            "bf16" | "bfloat16" => Ok(ServeDtype::Bf16),
            "f16" | "float16" => Ok(ServeDtype::F16),
            _ => Err(format!("unknown dtype `{s}` (auto, f32, bf16 or f16)")),
        }
    }
}

impl std::fmt::Display for ServeDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ServeDtype::Auto => "auto",
            ServeDtype::F32 => "f32",
            ServeDtype::Bf16 => "bf16",
            ServeDtype::F16 => "f16",
        })
    }
}

impl ServeDtype {
    /// The compute type for weights stored as `stored`, computed on `device`.
    pub fn kind(self, stored: tch::Kind, device: tch::Device) -> tch::Kind {
        match self {
            ServeDtype::Auto if device == tch::Device::Cpu => tch::Kind::Float,
            ServeDtype::Auto => stored,
            ServeDtype::F32 => tch::Kind::Float,
            ServeDtype::Bf16 => tch::Kind::BFloat16,
            ServeDtype::F16 => tch::Kind::Half,
        }
    }
}

/// The name of a compute type as [`ModelConfig::dtype`] carries it (`f32`, `bf16`, `f16`).
pub fn kind_name(kind: tch::Kind) -> &'static str {
    match kind {
        tch::Kind::BFloat16 => "bf16",
        tch::Kind::Half => "f16",
        _ => "f32",
    }
}

/// The compute type [`ModelConfig::dtype`] names (absent: f32); `None` for another name.
pub fn kind_of(dtype: Option<&str>) -> Option<tch::Kind> {
    match dtype {
        None | Some("f32") => Some(tch::Kind::Float),
        Some("bf16") => Some(tch::Kind::BFloat16),
        Some("f16") => Some(tch::Kind::Half),
        Some(_) => None,
    }
}

/// Opens the folder `dir`: its config and its weights' index (no tensor is read yet).
pub fn open(dir: &std::path::Path) -> Result<(HfConfig, HfWeights), HfError> {
    let cfg = HfConfig::read(dir)?;
    let weights = HfWeights::open(dir)?;
    Ok((cfg, weights))
}

/// What a serving planner needs to know of the folder's model ([`ModelConfig`], kind
/// `hf`) when it computes in `kind`: each block's weights plus the KV cache of
/// [`KV_BUDGET_BATCH`] full contexts, the embeddings counted in the first layer, the final
/// norm and the head (the embeddings again when tied) in the last.
/// `dtype` names `kind` and `context` is the config's (the served context).
pub fn model_config(cfg: &HfConfig, kind: tch::Kind) -> ModelConfig {
    let elem = kind.elt_size_in_bytes() as u64;
    let (l, d, v) = (cfg.layers as u64, cfg.hidden as u64, cfg.vocab as u64);
    let kv = 2 * KV_BUDGET_BATCH * cfg.context as u64 * (cfg.kv_heads * cfg.head_dim) as u64;
    let block = cfg.block_params();
    let head = if cfg.tie_word_embeddings { 0 } else { v * d };
    let mut layer_bytes = vec![(block + kv) * elem; cfg.layers];
    layer_bytes[0] += v * d * elem;
    layer_bytes[cfg.layers - 1] += (d + v * d) * elem;
    // The head is a product with every row whether or not it is tied.
    let mut layer_weights = vec![block * elem; cfg.layers];
    layer_weights[cfg.layers - 1] += v * d * elem;
    ModelConfig {
        kind: "hf".into(),
        layers: cfg.layers as u32,
        heads: cfg.heads as u32,
        width: cfg.hidden as u32,
        context: cfg.context as u32,
        vocab: cfg.vocab as u32,
        params: l * block + v * d + head + d,
        layer_bytes,
        dtype: Some(kind_name(kind).into()),
        layer_weights,
    }
}

/// A serving stage of the folder `dir` as announced in `mc` (its `dtype` and served
/// `context`), computing on `device` (layers load on first use, each tensor read from its
/// shard, converted and moved to `device`).
pub fn open_stage(
    dir: &std::path::Path,
    device: tch::Device,
    mc: &ModelConfig,
) -> Result<StageExecutor, HfError> {
    let (cfg, weights) = open(dir)?;
    let label = dir.join("config.json").display().to_string();
    let cfg = cfg.with_context(i64::from(mc.context), &label)?;
    let kind = kind_of(mc.dtype.as_deref()).ok_or_else(|| HfError::Config {
        path: label,
        key: "dtype".into(),
        problem: format!("{:?} is not f32, bf16 or f16", mc.dtype),
    })?;
    let mc = model_config(&cfg, kind);
    let weights = std::sync::Arc::new(weights);
    let decoder = Box::new(HfDecoder::new(cfg, kind).reading_rows(weights.clone(), device));
    let source = Box::new(move |n: &str| weights.get(n).map_err(|e| e.to_string()));
    Ok(StageExecutor::with_decoder(
        dir, mc, decoder, source, device,
    ))
}
