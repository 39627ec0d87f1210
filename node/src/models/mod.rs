//! Model definitions, shared by training and serving: every model is defined once here.
//!
//! - [`Architecture`] is the registry of what can be built: the built-in [`mlp`] and
//!   [`gpt`], or a user's [`torchscript`] module; [`Network::init`] builds one with fresh,
//!   trainable weights (a training job, see `crate::train::model`).
//! - [`config`] says what a model *file* is ([`config::describe`] → [`ModelConfig`]): the
//!   layers the serving planner can cut into stages and what each costs.
//! - [`stage`] runs a range of a served model's layers ([`stage::StageExecutor`]) with the
//!   KV caches of the rows it decodes; decoder-only language models plug into it through
//!   [`decoder::Decoder`]: the `gpt`, and [`hf`]'s Hugging Face decoders (Llama, Mistral,
//!   Qwen2, Qwen3 folders).
//! - [`layers`]: linear maps and LayerNorms in the training or the packed serving layout.
//! - [`checkpoint`]: the safetensors format training writes and serving reads; a model's
//!   tensors are named [`PARAM_PREFIX`] + their name in the model (`model.blocks.0.qkv.weight`).

pub mod checkpoint;
pub mod config;
pub mod cpu_matmul;
pub mod decoder;
pub mod gpt;
pub mod hf;
pub mod layers;
pub mod mlp;
pub mod stage;
pub mod torchscript;

#[cfg(test)]
mod tests;

pub use config::ModelConfig;
use gpt::{Gpt, GptConfig};
use mlp::Mlp;
use std::path::PathBuf;
use tch::{nn, Tensor};

/// A checkpoint names a model's tensors with this prefix (other entries hold optimizer
/// state). `model.`.
pub const PARAM_PREFIX: &str = "model.";

/// Why a model could not be built or run for training.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The TorchScript file could not be loaded.
    #[error("cannot load TorchScript module {path}: {reason}")]
    TorchScript {
        /// The file.
        path: String,
        /// libtorch's message.
        reason: String,
    },
    /// The model does not fit the data (e.g. its output is not `[B, classes]`).
    #[error("model does not fit the data: {0}")]
    Shape(String),
    /// A Hugging Face folder cannot be read or loaded (the error names the file).
    #[error(transparent)]
    Hf(#[from] hf::HfError),
}

impl From<StageError> for ModelError {
    /// A decoder's refusal of a training batch (its tokens or shapes): the model does not
    /// fit the data.
    fn from(e: StageError) -> ModelError {
        ModelError::Shape(e.to_string())
    }
}

/// Why a model could not be described, loaded or run by a serving stage.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// The file is neither a shoal checkpoint nor a TorchScript module.
    #[error("{path}: not a shoal checkpoint or TorchScript module ({reason})")]
    Unrecognised {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// A Hugging Face folder cannot be read or loaded (the error names the file).
    #[error(transparent)]
    Hf(#[from] hf::HfError),
    /// A checkpoint lacks something the model needs.
    #[error("{path}: {problem}")]
    Checkpoint {
        /// The file.
        path: String,
        /// What is wrong.
        problem: String,
    },
    /// A request does not fit the model (layers, shapes, positions).
    #[error("{0}")]
    Request(String),
    /// A decode names a row whose cache is not here (evicted, or this member restarted):
    /// the row must start again, here or elsewhere.
    #[error("unknown row {0:016x}")]
    UnknownRow(u64),
}

/// What can be built with fresh weights.
#[derive(Clone, Debug, PartialEq)]
pub enum Architecture {
    /// An `mlp` through these widths: features, the hidden widths, classes.
    Mlp {
        /// Features, hidden widths, classes.
        dims: Vec<i64>,
    },
    /// A `gpt`.
    Gpt(GptConfig),
    /// A TorchScript module in this file (its own initial weights).
    TorchScript(PathBuf),
    /// A Hugging Face decoder folder, trained whole or through LoRA adapters.
    Hf(Box<hf::train::HfTrain>),
}

/// A model built for training: its parameters are variables of the `VarStore` it was
/// built under.
pub enum Network {
    /// The built-in `mlp`.
    Mlp(Mlp),
    /// The built-in `gpt`.
    Gpt(Box<Gpt>),
    /// A user's TorchScript module.
    Script(tch::TrainableCModule),
    /// A Hugging Face decoder.
    Hf(Box<hf::HfDecoder>),
}

impl Network {
    /// Builds `arch` with fresh weights (from tch's generator: seed it first) as variables
    /// under `root`.
    pub fn init(arch: &Architecture, root: &nn::Path) -> Result<Network, ModelError> {
        Ok(match arch {
            Architecture::Mlp { dims } => Network::Mlp(Mlp::init(root, dims)),
            Architecture::Gpt(cfg) => Network::Gpt(Box::new(Gpt::init(root, *cfg))),
            Architecture::TorchScript(path) => Network::Script(
                torchscript::load_trainable(path, root.clone()).map_err(|e| {
                    ModelError::TorchScript {
                        path: path.display().to_string(),
                        reason: e.to_string(),
                    }
                })?,
            ),
            Architecture::Hf(t) => Network::Hf(Box::new(hf::train::build(t, root)?)),
        })
    }

    /// Logits for inputs `x` (a batch of features or of token sequences).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        match self {
            Network::Mlp(m) => Ok(m.forward(x)),
            Network::Gpt(g) => Ok(g.forward(x)),
            Network::Script(s) => s
                .forward_ts(&[x])
                .map_err(|e| ModelError::Shape(format!("forward failed: {e}"))),
            Network::Hf(d) => d.forward(x).map_err(|e| ModelError::Shape(e.to_string())),
        }
    }

    /// Switches dropout/batch-norm style behaviour (TorchScript modules only; the
    /// built-in models have none).
    pub fn set_train(&mut self, train: bool) {
        if let Network::Script(s) = self {
            if train {
                s.set_train()
            } else {
                s.set_eval()
            }
        }
    }
}
