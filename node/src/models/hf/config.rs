//! `config.json` of a Hugging Face decoder folder, parsed into the switches the one
//! decoder implementation ([`super::llama`]) has.
//!
//! Only what is implemented is accepted: a `model_type`, RoPE type, activation, sliding
//! window or other key that would change the computation in a way not implemented here is
//! an error naming the key and its value, never a model that runs wrong. Keys that do not
//! change the forward (`architectures`, `bos_token_id`, `use_cache`,
//! `attention_dropout`, `dtype`, …) are ignored.
//!
//! Both ways transformers writes RoPE are read: `rope_parameters` (transformers 5:
//! `{"rope_type", "rope_theta", …}`) and the older `rope_theta` + `rope_scaling`
//! (`{"rope_type" or "type", …}`, or null).

use super::HfError;
use serde_json::{Map, Value};
use std::path::Path;

/// Largest `config.json` read. 1 MiB.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// Largest width, head count × head width or MLP width accepted. 2^18.
pub const MAX_WIDTH: i64 = 1 << 18;
/// Most blocks accepted. 1024.
pub const MAX_LAYERS: i64 = 1024;
/// Largest vocabulary accepted. 2^22.
pub const MAX_VOCAB: i64 = 1 << 22;
/// Longest context accepted (`max_position_embeddings`). 2^22.
pub const MAX_CONTEXT: i64 = 1 << 22;
/// The context a model is served with unless asked for another (`shoal serve --context`):
/// `max_position_embeddings` or 4096 tokens, whichever is less. Every request row's KV
/// cache is sized for the whole context, so a 128k-token model served at its full context
/// would need gigabytes per request.
pub const DEFAULT_SERVE_CONTEXT: i64 = 4096;

/// The families implemented (`model_type`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelType {
    /// `llama`: optional `attention_bias` (q, k, v, o) and `mlp_bias`.
    Llama,
    /// `mistral`: no biases; `sliding_window` must not be below the context.
    Mistral,
    /// `qwen2`: q, k, v biases (always), no o or MLP bias.
    Qwen2,
    /// `qwen3`: per-head RMSNorms of queries and keys (`q_norm`, `k_norm`), optional
    /// `attention_bias`.
    Qwen3,
}

/// How rotary frequencies are derived from `rope_theta`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeScaling {
    /// `default` (or no scaling): `1 / theta^(2i / head_dim)`.
    Default,
    /// `llama3` (Llama 3.1): low frequencies divided by `factor`, a smooth band between.
    Llama3 {
        /// `factor`.
        factor: f64,
        /// `low_freq_factor`.
        low_freq_factor: f64,
        /// `high_freq_factor`.
        high_freq_factor: f64,
        /// `original_max_position_embeddings`.
        original_context: f64,
    },
}

/// A Hugging Face decoder's architecture, as far as the forward needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct HfConfig {
    /// `model_type`.
    pub model_type: ModelType,
    /// `hidden_size`: width of the hidden states.
    pub hidden: i64,
    /// `intermediate_size`: the MLP's width.
    pub intermediate: i64,
    /// `num_hidden_layers`.
    pub layers: usize,
    /// `num_attention_heads`.
    pub heads: i64,
    /// `num_key_value_heads` (divides `heads`); default `heads`.
    pub kv_heads: i64,
    /// `head_dim` (even); default (absent or null) `hidden / heads`.
    pub head_dim: i64,
    /// `vocab_size`.
    pub vocab: i64,
    /// The context it is served or trained with, in tokens: at most `max_context` and
    /// `sliding_window`; default the least of `max_context`, `sliding_window` and
    /// [`DEFAULT_SERVE_CONTEXT`] (see [`HfConfig::with_context`]).
    pub context: i64,
    /// `max_position_embeddings`: the longest context the model was made for.
    pub max_context: i64,
    /// `sliding_window` where sliding-window attention is enabled (`mistral`; `qwen2`,
    /// `qwen3` with `use_sliding_window`); it must be at least `context`.
    pub sliding_window: Option<i64>,
    /// `rms_norm_eps`; default 1e-6.
    pub rms_norm_eps: f64,
    /// `rope_theta`; default 10000.
    pub rope_theta: f64,
    /// The RoPE type; default [`RopeScaling::Default`].
    pub rope_scaling: RopeScaling,
    /// Whether q, k and v have biases (`qwen2`: always; `llama`, `qwen3`:
    /// `attention_bias`, default false).
    pub qkv_bias: bool,
    /// Whether o has a bias (`llama`, `qwen3`: `attention_bias`, default false).
    pub o_bias: bool,
    /// Whether the MLP has biases (`llama`: `mlp_bias`, default false).
    pub mlp_bias: bool,
    /// Per-head q/k RMSNorms (`qwen3`).
    pub qk_norm: bool,
    /// `tie_word_embeddings`: the head is the embeddings; default false.
    pub tie_word_embeddings: bool,
    /// `initializer_range`: the standard deviation weights are drawn with when a model is
    /// built from the config alone; default 0.02.
    pub init_range: f64,
}

/// `config.json`'s keys, with errors naming the file and the key.
struct Keys<'a> {
    path: &'a str,
    map: &'a Map<String, Value>,
}

impl Keys<'_> {
    fn bad(&self, key: &str, problem: impl ToString) -> HfError {
        HfError::Config {
            path: self.path.to_string(),
            key: key.to_string(),
            problem: problem.to_string(),
        }
    }

    fn unsupported(&self, key: &str, value: &Value, why: &str) -> HfError {
        HfError::Unsupported {
            path: self.path.to_string(),
            key: key.to_string(),
            value: value.to_string(),
            why: why.to_string(),
        }
    }

    /// The value of `key` unless absent or null.
    fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    /// A positive integer no larger than `max`; `default` when absent (None: required).
    fn int(&self, key: &str, default: Option<i64>, max: i64) -> Result<i64, HfError> {
        let Some(v) = self.get(key) else {
            return default.ok_or_else(|| self.bad(key, "missing"));
        };
        match v.as_i64() {
            Some(n) if n > 0 && n <= max => Ok(n),
            _ => Err(self.bad(key, format!("{v} is not an integer in 1..={max}"))),
        }
    }

    /// A positive finite number; `default` when absent.
    fn float(&self, key: &str, default: f64) -> Result<f64, HfError> {
        float_in(self.get(key), default)
            .map_err(|v| self.bad(key, format!("{v} is not a positive number")))
    }

    /// A boolean; `default` when absent.
    fn boolean(&self, key: &str, default: bool) -> Result<bool, HfError> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_bool()
                .ok_or_else(|| self.bad(key, format!("{v} is not a boolean"))),
        }
    }

    /// Refuses `key` when present with a value other than `allowed`.
    fn only(&self, key: &str, allowed: &[Value], why: &str) -> Result<(), HfError> {
        match self.get(key) {
            Some(v) if !allowed.contains(v) => Err(self.unsupported(key, v, why)),
            _ => Ok(()),
        }
    }
}

/// A positive finite number from `v` (`default` when absent); the error is the value.
fn float_in(v: Option<&Value>, default: f64) -> Result<f64, String> {
    let Some(v) = v else { return Ok(default) };
    match v.as_f64() {
        Some(x) if x.is_finite() && x > 0.0 => Ok(x),
        _ => Err(v.to_string()),
    }
}

impl HfConfig {
    /// Reads `dir/config.json` (at most [`MAX_CONFIG_BYTES`]).
    pub fn read(dir: &Path) -> Result<HfConfig, HfError> {
        let path = dir.join("config.json");
        let bytes = super::weights::read_limited(&path, MAX_CONFIG_BYTES)?;
        HfConfig::parse(&bytes, &path.display().to_string())
    }

    /// Parses `config.json`'s bytes (`label` names the file in errors).
    pub fn parse(bytes: &[u8], label: &str) -> Result<HfConfig, HfError> {
        let value: Value = serde_json::from_slice(bytes).map_err(|e| HfError::Json {
            path: label.to_string(),
            problem: format!("not JSON: {e}"),
        })?;
        let Value::Object(map) = &value else {
            return Err(HfError::Json {
                path: label.to_string(),
                problem: "not a JSON object".into(),
            });
        };
        let k = Keys { path: label, map };
        let model_type = match k.get("model_type") {
            Some(Value::String(t)) if t == "llama" => ModelType::Llama,
            Some(Value::String(t)) if t == "mistral" => ModelType::Mistral,
            Some(Value::String(t)) if t == "qwen2" => ModelType::Qwen2,
            Some(Value::String(t)) if t == "qwen3" => ModelType::Qwen3,
            Some(v) => {
                return Err(k.unsupported("model_type", v, "llama, mistral, qwen2 or qwen3"))
            }
            None => return Err(k.bad("model_type", "missing")),
        };
        refuse_unimplemented(&k)?;
        let hidden = k.int("hidden_size", None, MAX_WIDTH)?;
        let heads = k.int("num_attention_heads", None, MAX_WIDTH)?;
        let kv_heads = k.int("num_key_value_heads", Some(heads), heads)?;
        if heads % kv_heads != 0 {
            return Err(k.bad(
                "num_key_value_heads",
                format!("{kv_heads} does not divide num_attention_heads {heads}"),
            ));
        }
        if k.get("head_dim").is_none() && hidden % heads != 0 {
            return Err(k.bad("num_attention_heads", "does not divide hidden_size"));
        }
        let head_dim = k.int("head_dim", Some(hidden / heads), MAX_WIDTH / heads)?;
        if head_dim % 2 != 0 {
            return Err(k.bad("head_dim", format!("{head_dim} is odd (rotary halves)")));
        }
        let context = k.int("max_position_embeddings", None, MAX_CONTEXT)?;
        let attention_bias = k.boolean("attention_bias", false)?;
        let (qkv_bias, o_bias, mlp_bias) = match model_type {
            ModelType::Llama => (
                attention_bias,
                attention_bias,
                k.boolean("mlp_bias", false)?,
            ),
            ModelType::Qwen3 => (attention_bias, attention_bias, false),
            ModelType::Qwen2 => (true, false, false),
            ModelType::Mistral => (false, false, false),
        };
        let sliding_window = sliding_window(&k, model_type)?;
        let (rope_theta, rope_scaling) = rope(&k)?;
        let cfg = HfConfig {
            model_type,
            hidden,
            intermediate: k.int("intermediate_size", None, MAX_WIDTH)?,
            layers: k.int("num_hidden_layers", None, MAX_LAYERS)? as usize,
            heads,
            kv_heads,
            head_dim,
            vocab: k.int("vocab_size", None, MAX_VOCAB)?,
            context,
            max_context: context,
            sliding_window,
            rms_norm_eps: k.float("rms_norm_eps", 1e-6)?,
            rope_theta,
            rope_scaling,
            qkv_bias,
            o_bias,
            mlp_bias,
            qk_norm: model_type == ModelType::Qwen3,
            tie_word_embeddings: k.boolean("tie_word_embeddings", false)?,
            init_range: k.float("initializer_range", 0.02)?,
        };
        let default = context
            .min(DEFAULT_SERVE_CONTEXT)
            .min(sliding_window.unwrap_or(i64::MAX));
        cfg.with_context(default, label)
    }

    /// The same model used with a context of `context` tokens: refused (naming the key)
    /// beyond `max_position_embeddings` or beyond a sliding window (which would change
    /// which positions attend to which; a window at or beyond the context is the same as
    /// full attention). `label` names the file in errors.
    pub fn with_context(mut self, context: i64, label: &str) -> Result<HfConfig, HfError> {
        if context < 1 || context > self.max_context {
            return Err(HfError::Config {
                path: label.to_string(),
                key: "max_position_embeddings".into(),
                problem: format!(
                    "a context of {context} tokens is asked for; this model takes 1..={}",
                    self.max_context
                ),
            });
        }
        if let Some(w) = self.sliding_window.filter(|&w| w < context) {
            return Err(HfError::Unsupported {
                path: label.to_string(),
                key: "sliding_window".into(),
                value: w.to_string(),
                why: format!(
                    "sliding-window attention below the context of {context} is not implemented; serve it with a context of at most {w} tokens"
                ),
            });
        }
        self.context = context;
        Ok(self)
    }

    /// Scalars of the weights of block `i` (every block is the same).
    pub fn block_params(&self) -> u64 {
        let (d, h, kv, hd, m) = (
            self.hidden as u64,
            self.heads as u64,
            self.kv_heads as u64,
            self.head_dim as u64,
            self.intermediate as u64,
        );
        let attn = d * h * hd + 2 * d * kv * hd + h * hd * d;
        let bias = if self.qkv_bias { (h + 2 * kv) * hd } else { 0 }
            + if self.o_bias { d } else { 0 }
            + if self.mlp_bias { 2 * m + d } else { 0 };
        let norms = 2 * d + if self.qk_norm { 2 * hd } else { 0 };
        attn + 3 * d * m + bias + norms
    }
}

/// Refuses keys that change the forward in ways not implemented.
fn refuse_unimplemented(k: &Keys) -> Result<(), HfError> {
    k.only(
        "hidden_act",
        &["silu".into()],
        "only silu (SwiGLU) is implemented",
    )?;
    k.only(
        "partial_rotary_factor",
        &[1.into(), 1.0.into()],
        "rotary positions over the whole head only",
    )?;
    for key in [
        "quantization_config",
        "attn_logit_softcapping",
        "final_logit_softcapping",
    ] {
        if let Some(v) = k.get(key) {
            return Err(k.unsupported(key, v, "not implemented"));
        }
    }
    Ok(())
}

/// The sliding window where sliding-window attention is enabled (`mistral`: always;
/// `qwen2`, `qwen3`: `use_sliding_window`, default false); `layer_types` may name only
/// `full_attention` and `sliding_attention`. [`HfConfig::with_context`] refuses a window
/// below the context.
fn sliding_window(k: &Keys, t: ModelType) -> Result<Option<i64>, HfError> {
    let enabled = match t {
        ModelType::Mistral => true,
        ModelType::Qwen2 | ModelType::Qwen3 => k.boolean("use_sliding_window", false)?,
        ModelType::Llama => false,
    };
    if let Some(types) = k.get("layer_types") {
        let Some(list) = types.as_array() else {
            return Err(k.bad("layer_types", "not a list"));
        };
        for v in list {
            if v != "full_attention" && v != "sliding_attention" {
                return Err(k.unsupported("layer_types", v, "full_attention only"));
            }
        }
    }
    match k.get("sliding_window").filter(|_| enabled) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_i64() {
            Some(w) if w >= 1 => Ok(Some(w)),
            _ => Err(k.unsupported(
                "sliding_window",
                v,
                "a positive number of tokens, at least the context",
            )),
        },
    }
}

/// `rope_theta` and the RoPE type, from `rope_parameters` or `rope_theta` + `rope_scaling`.
fn rope(k: &Keys) -> Result<(f64, RopeScaling), HfError> {
    let (key, params) = match (k.get("rope_parameters"), k.get("rope_scaling")) {
        (Some(p), _) => ("rope_parameters", Some(p)),
        (None, s) => ("rope_scaling", s),
    };
    let empty = Map::new();
    let params = match params {
        None => &empty,
        Some(Value::Object(m)) => m,
        Some(v) => return Err(k.bad(key, format!("{v} is not an object"))),
    };
    let sub = |name: &str| format!("{key}.{name}");
    let pf = |name: &str, default: f64| {
        float_in(params.get(name).filter(|v| !v.is_null()), default)
            .map_err(|v| k.bad(&sub(name), format!("{v} is not a positive number")))
    };
    let theta = match params.get("rope_theta") {
        Some(_) => pf("rope_theta", 10000.0)?,
        None => k.float("rope_theta", 10000.0)?,
    };
    if let Some(v) = params.get("partial_rotary_factor") {
        if v.as_f64() != Some(1.0) {
            return Err(k.unsupported(&sub("partial_rotary_factor"), v, "1.0 only"));
        }
    }
    let (tkey, rope_type) = match (params.get("rope_type"), params.get("type")) {
        (Some(t), _) => (sub("rope_type"), Some(t)),
        (None, Some(t)) => (sub("type"), Some(t)),
        (None, None) => (sub("rope_type"), None),
    };
    let scaling = match rope_type {
        None => RopeScaling::Default,
        Some(v) if v == "default" => RopeScaling::Default,
        Some(v) if v == "llama3" => {
            let req = |name: &str| {
                if params.get(name).is_none_or(Value::is_null) {
                    return Err(k.bad(&sub(name), "missing (rope type llama3)"));
                }
                pf(name, 0.0)
            };
            let s = RopeScaling::Llama3 {
                factor: req("factor")?,
                low_freq_factor: req("low_freq_factor")?,
                high_freq_factor: req("high_freq_factor")?,
                original_context: req("original_max_position_embeddings")?,
            };
            if let RopeScaling::Llama3 {
                low_freq_factor: lo,
                high_freq_factor: hi,
                ..
            } = s
            {
                if hi <= lo {
                    return Err(k.bad(&sub("high_freq_factor"), "not above low_freq_factor"));
                }
            }
            s
        }
        Some(v) => return Err(k.unsupported(&tkey, v, "default or llama3 only")),
    };
    Ok((theta, scaling))
}
