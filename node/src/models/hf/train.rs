//! A Hugging Face decoder built for training: every weight a variable of the job's
//! `VarStore`, named as in the folder (`model.layers.0.self_attn.q_proj.weight`), so
//! gradients, checkpoints and the exported folder all use the Hugging Face names.
//!
//! - `init = "random"`: weights drawn as transformers' `_init_weights` draws them (linear
//!   maps and embeddings normal with `initializer_range`, biases zero, norms one);
//!   otherwise they are then overwritten by the folder's, each checked for shape.
//! - LoRA: each target projection gets `A` (`[rank, in]`, uniform in ±1/√in, as PEFT's
//!   `kaiming_uniform(a=√5)` draws it) and `B` (`[out, rank]`, zero), named
//!   `…q_proj.lora_A.weight` / `…lora_B.weight`; every other variable is frozen
//!   (`requires_grad` off), so only the adapters are trained and all-reduced.
//!
//! The projections stay separate maps ([`Proj::Parts`]): the forward is the serving
//! decoder's, op for op.

use super::config::HfConfig;
use super::llama::{Block, HfDecoder, Lora, Proj, RmsNorm, EMBED, HEAD};
use super::{HfError, HfWeights};
use crate::models::layers::Linear;
use std::collections::BTreeMap;
use std::path::PathBuf;
use tch::{nn, Kind, Tensor};

/// LoRA adapters: rank, scale numerator and the projections adapted.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    /// Rank `r`.
    pub rank: i64,
    /// `alpha`: the update is scaled by `alpha / r`.
    pub alpha: f64,
    /// The projections adapted, by their last name (`q_proj`, `v_proj`, …).
    pub targets: Vec<String>,
}

/// What a training job builds from a Hugging Face folder.
#[derive(Clone, Debug, PartialEq)]
pub struct HfTrain {
    /// The folder (`config.json`; its weights unless `random`).
    pub dir: PathBuf,
    /// Draw the weights from the config alone instead of reading the folder's.
    pub random: bool,
    /// The training context in tokens (at most `max_position_embeddings`). Default
    /// (`None`): the config's served default.
    pub context: Option<i64>,
    /// Train LoRA adapters only. Default (`None`): every weight.
    pub lora: Option<LoraConfig>,
}

/// Names of an adapter's matrices under a projection `p` (`model.layers.0.self_attn.
/// q_proj`): `p.lora_A.weight`, `p.lora_B.weight`.
pub const LORA_A: &str = "lora_A";
/// See [`LORA_A`].
pub const LORA_B: &str = "lora_B";

/// Builds `t`'s decoder under `root` (see the module's documentation): the config read
/// and checked, the weights drawn (from tch's generator: seed it first) and, unless
/// `random`, read from the folder.
pub fn build(t: &HfTrain, root: &nn::Path) -> Result<HfDecoder, HfError> {
    let cfg = HfConfig::read(&t.dir)?;
    let cfg = match t.context {
        Some(c) => cfg.with_context(c, &t.dir.join("config.json").display().to_string())?,
        None => cfg,
    };
    let mut vars = BTreeMap::new();
    let dec = trainable(cfg, root, t.lora.as_ref(), &mut vars);
    if !t.random {
        let weights = HfWeights::open(&t.dir)?;
        load(&weights, &vars)?;
    }
    if t.lora.is_some() {
        for (name, v) in &vars {
            if !name.contains(".lora_") {
                let _ = v.set_requires_grad(false);
            }
        }
    }
    Ok(dec)
}

/// Copies the folder's tensor of each variable's name into it (converted to its type),
/// checking shapes; LoRA adapters are not in the folder and keep their initial values.
fn load(weights: &HfWeights, vars: &BTreeMap<String, Tensor>) -> Result<(), HfError> {
    let _guard = tch::no_grad_guard();
    for (name, v) in vars {
        if name.contains(".lora_") {
            continue;
        }
        let t = weights.get(name)?;
        if t.size() != v.size() {
            return Err(HfError::Weights {
                path: weights.dir().display().to_string(),
                problem: format!(
                    "tensor `{name}` has shape {:?}, the config makes it {:?}",
                    t.size(),
                    v.size()
                ),
            });
        }
        let mut v = v.shallow_clone();
        v.copy_(&t.to_kind(v.kind()));
    }
    Ok(())
}

/// Where [`trainable`] records each variable it makes, by its full name.
type Vars = BTreeMap<String, Tensor>;

/// A variable `name` under `p`, recorded in `vars`.
fn var(vars: &mut Vars, p: &nn::Path, name: &str, dims: &[i64], init: nn::Init) -> Tensor {
    let t = p.var(name, dims, init);
    vars.insert(p.path(name), t.shallow_clone());
    t
}

/// Normal with mean 0 and `std`.
fn normal(std: f64) -> nn::Init {
    nn::Init::Randn {
        mean: 0.0,
        stdev: std,
    }
}

/// An RMSNorm of `width` under `p` (weight one).
fn norm(vars: &mut Vars, p: &nn::Path, width: i64, eps: f64) -> RmsNorm {
    RmsNorm {
        w: var(vars, p, "weight", &[width], nn::Init::Const(1.0)),
        eps,
    }
}

/// The maps `parts` (name, outputs) of `input` features under `parent`, with biases when
/// `bias`, each with a LoRA adapter when `lora` targets its name.
fn proj(
    vars: &mut Vars,
    parent: &nn::Path,
    parts: &[(&str, i64)],
    input: i64,
    bias: bool,
    std: f64,
    lora: Option<&LoraConfig>,
) -> Proj {
    let maps = parts
        .iter()
        .map(|(name, out)| {
            let p = parent / *name;
            let ws = var(vars, &p, "weight", &[*out, input], normal(std));
            let bs = bias.then(|| var(vars, &p, "bias", &[*out], nn::Init::Const(0.0)));
            let adapter = lora
                .filter(|l| l.targets.iter().any(|t| t == name))
                .map(|l| {
                    let bound = 1.0 / (input as f64).sqrt();
                    let uniform = nn::Init::Uniform {
                        lo: -bound,
                        up: bound,
                    };
                    Lora {
                        a: var(vars, &(&p / LORA_A), "weight", &[l.rank, input], uniform),
                        b: var(
                            vars,
                            &(&p / LORA_B),
                            "weight",
                            &[*out, l.rank],
                            nn::Init::Const(0.0),
                        ),
                        scale: l.alpha / l.rank as f64,
                    }
                });
            (Linear::trainable(nn::Linear { ws, bs }), adapter)
        })
        .collect();
    Proj::Parts(maps)
}

/// `cfg`'s decoder with fresh variables under `root`, each recorded in `vars` by name.
fn trainable(
    cfg: HfConfig,
    root: &nn::Path,
    lora: Option<&LoraConfig>,
    vars: &mut Vars,
) -> HfDecoder {
    let (std, eps) = (cfg.init_range, cfg.rms_norm_eps);
    let (d, v, hd, m) = (cfg.hidden, cfg.vocab, cfg.head_dim, cfg.intermediate);
    let model = root / "model";
    let embed = var(
        vars,
        &(&model / "embed_tokens"),
        "weight",
        &[v, d],
        normal(std),
    );
    let mut blocks = BTreeMap::new();
    for i in 0..cfg.layers {
        let p = &model / "layers" / i;
        let (attn, mlp) = (&p / "self_attn", &p / "mlp");
        let input_norm = norm(vars, &(&p / "input_layernorm"), d, eps);
        let (q_norm, k_norm) = if cfg.qk_norm {
            (
                Some(norm(vars, &(&attn / "q_norm"), hd, eps)),
                Some(norm(vars, &(&attn / "k_norm"), hd, eps)),
            )
        } else {
            (None, None)
        };
        let (h, kv) = (cfg.heads * hd, cfg.kv_heads * hd);
        let qkv = [("q_proj", h), ("k_proj", kv), ("v_proj", kv)];
        let qkv = proj(vars, &attn, &qkv, d, cfg.qkv_bias, std, lora);
        let o = proj(vars, &attn, &[("o_proj", d)], h, cfg.o_bias, std, lora);
        let post_norm = norm(vars, &(&p / "post_attention_layernorm"), d, eps);
        let gu = [("gate_proj", m), ("up_proj", m)];
        let gate_up = proj(vars, &mlp, &gu, d, cfg.mlp_bias, std, lora);
        let down = proj(vars, &mlp, &[("down_proj", d)], m, cfg.mlp_bias, std, lora);
        let block = Block {
            input_norm,
            qkv,
            o,
            q_norm,
            k_norm,
            post_norm,
            gate_up,
            down,
        };
        blocks.insert(i, block);
    }
    let final_norm = norm(vars, &(&model / "norm"), d, eps);
    let head = if cfg.tie_word_embeddings {
        embed.shallow_clone()
    } else {
        let p = root / HEAD.trim_end_matches(".weight");
        var(vars, &p, "weight", &[v, d], normal(std))
    };
    debug_assert!(vars.contains_key(EMBED));
    let mut dec = HfDecoder::new(cfg, Kind::Float);
    dec.inv_freq = dec.inv_freq.to_device(root.device());
    dec.embed = Some(embed);
    dec.blocks = blocks;
    dec.norm = Some(final_norm);
    let head = Linear::trainable(nn::Linear { ws: head, bs: None });
    dec.head = Some(Proj::Parts(vec![(head, None)]));
    dec
}

impl HfDecoder {
    /// Computes in `kind` from now on (a training job's `precision`; the variables must
    /// have been converted to it).
    pub fn set_kind(&mut self, kind: Kind) {
        self.kind = kind;
    }
}
