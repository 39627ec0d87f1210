//! What a model file is, as far as serving needs to know: its kind, the layers that can
//! be cut into stages and what each costs ([`ModelConfig`], read by [`describe`] from a
//! checkpoint's `model` metadata, a TorchScript module, or a Hugging Face folder's
//! `config.json` ([`super::hf::model_config`])). The planner sizes stages from
//! it; it travels as JSON in the serving announcement.

use super::checkpoint;
use super::gpt;
use super::torchscript;
use super::{StageError, PARAM_PREFIX};
use serde::{Deserialize, Serialize};
use std::path::Path;

/// Largest batch a KV-cache budget is planned for. 8.
pub const KV_BUDGET_BATCH: u64 = 8;

/// What a model is, as far as serving needs to know (travels as JSON in the announcement).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// `gpt`, `hf` (a Hugging Face decoder folder), `mlp` or `torchscript`.
    pub kind: String,
    /// Layers that can be cut into stages (`gpt`, `hf`: its blocks; otherwise 1).
    pub layers: u32,
    /// `gpt`, `hf`: attention heads (0 otherwise).
    pub heads: u32,
    /// `gpt`, `hf`: width (0 otherwise).
    pub width: u32,
    /// `gpt`, `hf`: context length in tokens (0 otherwise).
    pub context: u32,
    /// `gpt`, `hf`: token ids it takes and scores per position it answers (`gpt`: 256,
    /// its bytes; `hf`: `vocab_size`). Default (absent): 0 (not a language model).
    #[serde(default)]
    pub vocab: u32,
    /// Parameters (scalars).
    pub params: u64,
    /// Bytes each layer needs: weights, plus the KV cache for `KV_BUDGET_BATCH` full
    /// contexts (`gpt`); embeddings are counted in the first layer, the head in the last.
    pub layer_bytes: Vec<u64>,
    /// `hf`: the compute type every stage uses, `f32`, `bf16` or `f16` (chosen when the
    /// model is offered, [`super::hf::ServeDtype`]). Default (absent): f32.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
    /// `gpt`, `hf`: each layer's weights in bytes, the head's added to the last layer (not
    /// the embeddings: a lookup): what a decode step streams through it, the pipeline
    /// planner's work per layer ([`Self::layer_work`]). Default (absent, as announced by
    /// older nodes): empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layer_weights: Vec<u64>,
}

impl ModelConfig {
    /// The `gpt` architecture it describes (meaningful when `kind` is `gpt`).
    pub fn gpt(&self) -> gpt::GptConfig {
        gpt::GptConfig {
            layers: i64::from(self.layers),
            heads: i64::from(self.heads),
            width: i64::from(self.width),
            context: i64::from(self.context),
        }
    }

    /// Whether it generates tokens (`/v1/completions`): a `gpt` or an `hf` decoder.
    pub fn is_lm(&self) -> bool {
        self.kind == "gpt" || self.kind == "hf"
    }

    /// Each layer's work per token for the pipeline planner: [`Self::layer_weights`] (a
    /// decode step streams every weight once; on the ~150 M Llama the head is 3.5 blocks'
    /// worth, which a planner counting layers alone left on the last stage), or 1 per layer
    /// where they are absent or do not match the layers.
    pub fn layer_work(&self) -> Vec<u64> {
        if self.layer_weights.len() == self.layer_bytes.len() {
            return self.layer_weights.iter().map(|&w| w.max(1)).collect();
        }
        vec![1; self.layer_bytes.len()]
    }

    /// Whether its tokens are bytes, so that generated tokens are text (a `gpt`).
    pub fn is_byte_level(&self) -> bool {
        self.kind == "gpt"
    }

    /// Checks an announced config before anything is sized from it.
    pub fn validate(&self) -> Result<(), String> {
        if !["gpt", "hf", "mlp", "torchscript"].contains(&self.kind.as_str()) {
            return Err(format!("unknown model kind `{}`", self.kind));
        }
        if self.layers == 0 || self.layers > 4096 || self.layer_bytes.len() != self.layers as usize
        {
            return Err(format!(
                "{} layers with {} costs",
                self.layers,
                self.layer_bytes.len()
            ));
        }
        if self.kind == "gpt"
            && (self.heads == 0
                || self.width == 0
                || !self.width.is_multiple_of(self.heads)
                || self.context == 0
                || self.context > 1 << 20
                || self.vocab != gpt::VOCAB)
        {
            return Err(format!(
                "gpt heads, width and context must be positive, heads divide width, the vocabulary is {}",
                gpt::VOCAB
            ));
        }
        if super::hf::kind_of(self.dtype.as_deref()).is_none()
            || (self.dtype.is_some() && self.kind != "hf")
        {
            return Err(format!(
                "dtype {:?} (hf only: f32, bf16 or f16)",
                self.dtype
            ));
        }
        let max_context = super::hf::config::MAX_CONTEXT as u32;
        let max_vocab = super::hf::config::MAX_VOCAB as u32;
        if self.kind == "hf"
            && (self.heads == 0
                || self.width == 0
                || self.context == 0
                || self.context > max_context
                || self.vocab == 0
                || self.vocab > max_vocab)
        {
            return Err(format!(
                "hf heads and width must be positive, context in 1..={max_context}, vocab in 1..={max_vocab}"
            ));
        }
        Ok(())
    }
}

#[derive(Deserialize)]
struct ArchMeta {
    kind: String,
    #[serde(default)]
    layers: i64,
    #[serde(default)]
    heads: i64,
    #[serde(default)]
    width: i64,
    #[serde(default)]
    context: i64,
}

fn is_safetensors(path: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 9];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok()
        && head[8] == b'{'
}

pub(super) fn unrecognised(path: &Path, reason: impl ToString) -> StageError {
    StageError::Unrecognised {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// How a Hugging Face folder is served (other models ignore it).
#[derive(Clone, Copy, Debug)]
pub struct HfServe {
    /// The compute type. Default: [`super::hf::ServeDtype::Auto`].
    pub dtype: super::hf::ServeDtype,
    /// The context in tokens. Default (`None`): the config's default
    /// ([`super::hf::config::DEFAULT_SERVE_CONTEXT`] at most).
    pub context: Option<u32>,
    /// The device `auto` resolves for (the offering node's). Default: the CPU.
    pub device: tch::Device,
}

impl Default for HfServe {
    fn default() -> Self {
        HfServe {
            dtype: super::hf::ServeDtype::Auto,
            context: None,
            device: tch::Device::Cpu,
        }
    }
}

/// Reads a model's architecture: a file (a shoal checkpoint or a TorchScript module) or a
/// Hugging Face folder, served as [`HfServe::default`] says.
pub fn describe(path: &Path) -> Result<ModelConfig, StageError> {
    describe_with(path, HfServe::default())
}

/// [`describe`], a Hugging Face folder served as `hf` says (a directory with
/// `config.json`: its config, weights' index and every shard's header are read and
/// checked; the compute type and context chosen and the layers sized for them).
pub fn describe_with(path: &Path, hf: HfServe) -> Result<ModelConfig, StageError> {
    if path.is_dir() {
        if !path.join("config.json").is_file() {
            return Err(unrecognised(path, "a folder without config.json"));
        }
        let (cfg, weights) = super::hf::open(path)?;
        weights.check_headers()?;
        let cfg = match hf.context {
            Some(c) => {
                let label = path.join("config.json").display().to_string();
                cfg.with_context(i64::from(c), &label)?
            }
            None => cfg,
        };
        let kind = hf.dtype.kind(weights.stored_kind()?, hf.device);
        let mc = super::hf::model_config(&cfg, kind);
        mc.validate().map_err(|e| unrecognised(path, e))?;
        return Ok(mc);
    }
    if !is_safetensors(path) {
        let params = torchscript::params(path).map_err(|e| unrecognised(path, e))?;
        let bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        return Ok(ModelConfig {
            kind: "torchscript".into(),
            layers: 1,
            heads: 0,
            width: 0,
            context: 0,
            vocab: 0,
            params,
            layer_bytes: vec![bytes.max(params * 4)],
            dtype: None,
            layer_weights: Vec::new(),
        });
    }
    let c = checkpoint::read(path).map_err(|e| unrecognised(path, e))?;
    let bad = |p: &str| StageError::Checkpoint {
        path: path.display().to_string(),
        problem: p.to_string(),
    };
    let arch: ArchMeta = c
        .metadata
        .get("model")
        .and_then(|m| serde_json::from_str(m).ok())
        .ok_or_else(|| bad("metadata `model` is missing (written by an older shoal?)"))?;
    // Scalars in the model's tensors whose names start with `prefix`.
    let numel = |prefix: &str| -> u64 {
        let prefix = format!("{PARAM_PREFIX}{prefix}");
        c.tensors
            .iter()
            .filter(|(n, _)| n.starts_with(&prefix))
            .map(|(_, t)| t.numel() as u64)
            .sum()
    };
    let params = numel("");
    match arch.kind.as_str() {
        "gpt" => {
            let cfg = gpt_config(&arch, params, &numel).map_err(|e| bad(&e))?;
            cfg.validate().map_err(|e| bad(&e))?;
            Ok(cfg)
        }
        "mlp" => Ok(ModelConfig {
            kind: "mlp".into(),
            layers: 1,
            heads: 0,
            width: 0,
            context: 0,
            vocab: 0,
            params,
            layer_bytes: vec![params * 4],
            dtype: None,
            layer_weights: Vec::new(),
        }),
        other => Err(bad(&format!("cannot serve a `{other}` checkpoint"))),
    }
}

/// A `gpt`'s config: each block's weights and KV-cache budget, the embeddings counted in
/// the first layer, `ln_f` and the head in the last.
fn gpt_config(
    arch: &ArchMeta,
    params: u64,
    numel: &dyn Fn(&str) -> u64,
) -> Result<ModelConfig, String> {
    let (l, w, ctx) = (
        arch.layers.max(0) as u64,
        arch.width as u64,
        arch.context as u64,
    );
    if l == 0 {
        return Err("a gpt without layers".into());
    }
    let kv = 2 * KV_BUDGET_BATCH * ctx * w * 4;
    let mut layer_bytes: Vec<u64> = (0..l)
        .map(|i| numel(&gpt::block_prefix(i as usize)) * 4 + kv)
        .collect();
    layer_bytes[0] += (numel("tok.") + numel("pos.")) * 4;
    layer_bytes[l as usize - 1] += (numel("ln_f.") + numel("head.")) * 4;
    let mut layer_weights: Vec<u64> = (0..l)
        .map(|i| numel(&gpt::block_prefix(i as usize)) * 4)
        .collect();
    layer_weights[l as usize - 1] += numel("head.") * 4;
    Ok(ModelConfig {
        kind: "gpt".into(),
        layers: l as u32,
        heads: arch.heads as u32,
        width: w as u32,
        context: ctx as u32,
        vocab: gpt::VOCAB,
        params,
        layer_bytes,
        dtype: None,
        layer_weights,
    })
}
