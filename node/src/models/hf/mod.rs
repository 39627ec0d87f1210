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
pub mod llama;
pub mod weights;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_errors;
#[cfg(test)]
mod tests_mutated;

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
pub fn model_config(cfg: &HfConfig, kind: tch::Kind) -> ModelConfig {
    let elem = kind.elt_size_in_bytes() as u64;
    let (l, d, v) = (cfg.layers as u64, cfg.hidden as u64, cfg.vocab as u64);
    let kv = 2 * KV_BUDGET_BATCH * cfg.context as u64 * (cfg.kv_heads * cfg.head_dim) as u64;
    let block = cfg.block_params();
    let head = if cfg.tie_word_embeddings { 0 } else { v * d };
    let mut layer_bytes = vec![(block + kv) * elem; cfg.layers];
    layer_bytes[0] += v * d * elem;
    layer_bytes[cfg.layers - 1] += (d + v * d) * elem;
    ModelConfig {
        kind: "hf".into(),
        layers: cfg.layers as u32,
        heads: cfg.heads as u32,
        width: cfg.hidden as u32,
        context: cfg.context as u32,
        vocab: cfg.vocab as u32,
        params: l * block + v * d + head + d,
        layer_bytes,
    }
}

/// A serving stage of the folder `dir` computing on `device` in `kind` (layers load on
/// first use, each tensor read from its shard and moved to `device`).
pub fn open_stage(
    dir: &std::path::Path,
    device: tch::Device,
    kind: tch::Kind,
) -> Result<StageExecutor, HfError> {
    let (cfg, weights) = open(dir)?;
    let mc = model_config(&cfg, kind);
    let decoder = Box::new(HfDecoder::new(cfg, kind));
    let source = Box::new(move |n: &str| weights.get(n).map_err(|e| e.to_string()));
    Ok(StageExecutor::with_decoder(
        dir, mc, decoder, source, device,
    ))
}
