//! The network of a Llama-family decoder (Llama, Mistral, Qwen2, Qwen3), switched by its
//! [`HfConfig`]; op for op transformers' `LlamaForCausalLM` and its relatives:
//!
//! - embeddings `model.embed_tokens` (first stage);
//! - per block `model.layers.{i}`: `input_layernorm` (RMSNorm), attention (`self_attn.
//!   {q,k,v,o}_proj`, biases as the config says, Qwen3's per-head `q_norm`/`k_norm` before
//!   the rotation, rotary positions by `rotate_half`, `num_key_value_heads` key/value heads
//!   shared by groups of query heads), `post_attention_layernorm`, the SwiGLU MLP
//!   (`mlp.down_proj(silu(gate_proj(x)) * up_proj(x))`);
//! - `model.norm` and `lm_head` (or the embeddings when `tie_word_embeddings`) on the last
//!   stage.
//!
//! Serving layout: q, k and v are one packed linear map, as are the MLP's gate and up
//! ([`Linear::packed`]). Weights are converted to the compute type as they load and stay
//! on the device `get` put them on; every tensor made during a forward is made on the
//! input's device.

use super::config::{HfConfig, RopeScaling};
use super::HfWeights;
use crate::models::decoder::{Attention, Causal, Decoder, DecoderShape};
use crate::models::layers::{rows_layout, Linear};
use crate::models::StageError;
use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;
use tch::{Device, Kind, Tensor};

/// The compute type a decoder uses unless told otherwise (the CPU's). f32.
pub const DEFAULT_KIND: Kind = Kind::Float;

/// Stored bytes read at a time when a matrix is read straight into its serving layout
/// ([`HfDecoder::reading_rows`]). 4 MiB.
pub const READ_CHUNK_BYTES: i64 = 4 << 20;

/// RMSNorm as transformers computes it: in f32, `x / sqrt(mean(x²) + eps)`, back in the
/// input's type, times the weight.
pub(super) struct RmsNorm {
    pub(super) w: Tensor,
    pub(super) eps: f64,
}

impl RmsNorm {
    fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let h = x.to_kind(Kind::Float);
        let var = h.square().mean_dim(-1, true, Kind::Float);
        let h = h * (var + self.eps).rsqrt();
        &self.w * h.to_kind(kind)
    }
}

/// A LoRA adapter on a linear map: `(alpha / rank) · x·Aᵀ·Bᵀ` added to its output.
pub(super) struct Lora {
    /// `A`, `[rank, in]`.
    pub(super) a: Tensor,
    /// `B`, `[out, rank]`.
    pub(super) b: Tensor,
    /// `alpha / rank`.
    pub(super) scale: f64,
}

/// One or several linear maps applied to the same input, their outputs side by side.
pub(super) enum Proj {
    /// One map holding them all, packed for serving.
    Packed(Linear),
    /// Each map on its own (training: each weight a variable named as in the folder), with
    /// its LoRA adapter where it has one.
    Parts(Vec<(Linear, Option<Lora>)>),
}

impl Proj {
    /// One map's output of `x` (with its adapter's).
    fn part(l: &Linear, lora: &Option<Lora>, x: &Tensor) -> Tensor {
        let y = l.forward(x);
        match lora {
            Some(a) => y + x.matmul(&a.a.tr()).matmul(&a.b.tr()) * a.scale,
            None => y,
        }
    }

    /// The output of a single map (`o`, `down`, the head).
    fn forward(&self, x: &Tensor) -> Tensor {
        match self {
            Proj::Packed(l) => l.forward(x),
            Proj::Parts(parts) => match parts.as_slice() {
                [(l, a)] => Self::part(l, a, x),
                _ => {
                    let ys: Vec<Tensor> = parts.iter().map(|(l, a)| Self::part(l, a, x)).collect();
                    Tensor::cat(&ys, -1)
                }
            },
        }
    }

    /// Each map's output of `x`, of `sizes` features each (a view of the packed output, or
    /// each part's own: never concatenated to be split again).
    fn forward_split(&self, x: &Tensor, sizes: &[i64]) -> Vec<Tensor> {
        match self {
            Proj::Packed(l) => l.forward(x).split_with_sizes(sizes, -1),
            Proj::Parts(parts) => parts.iter().map(|(l, a)| Self::part(l, a, x)).collect(),
        }
    }
}

/// One block's weights.
pub(super) struct Block {
    pub(super) input_norm: RmsNorm,
    /// q, k and v (`[hidden] → [(heads + 2·kv_heads)·head_dim]`).
    pub(super) qkv: Proj,
    pub(super) o: Proj,
    pub(super) q_norm: Option<RmsNorm>,
    pub(super) k_norm: Option<RmsNorm>,
    pub(super) post_norm: RmsNorm,
    /// gate and up (`[hidden] → [2·intermediate]`).
    pub(super) gate_up: Proj,
    pub(super) down: Proj,
}

/// A Hugging Face decoder, the layers one stage runs (see the module's documentation).
pub struct HfDecoder {
    pub(super) cfg: HfConfig,
    pub(super) kind: Kind,
    /// Rotary inverse frequencies `[head_dim / 2]` (f32, on the weights' device once some
    /// are loaded).
    pub(super) inv_freq: Tensor,
    /// `[vocab, hidden]`, present when layer 0 is here.
    pub(super) embed: Option<Tensor>,
    pub(super) blocks: BTreeMap<usize, Block>,
    /// Present when the last layer is here.
    pub(super) norm: Option<RmsNorm>,
    /// Present when the last layer is here.
    pub(super) head: Option<Proj>,
    /// Where matrices are read from a few rows at a time, and the device they go to
    /// ([`HfDecoder::reading_rows`]); `None`: whole tensors through `load`'s getter.
    rows: Option<(Arc<HfWeights>, Device)>,
    /// Stored bytes read at a time by `rows`; default [`READ_CHUNK_BYTES`].
    chunk_bytes: i64,
}

/// Names of block `i`'s tensors start with this.
pub fn block_prefix(i: usize) -> String {
    format!("model.layers.{i}.")
}

/// The embeddings' name.
pub const EMBED: &str = "model.embed_tokens.weight";
/// The final norm's name.
pub const NORM: &str = "model.norm.weight";
/// The head's name (absent when tied).
pub const HEAD: &str = "lm_head.weight";

/// Rotary inverse frequencies as transformers computes them (f32 on the CPU).
pub fn inv_freq(cfg: &HfConfig) -> Tensor {
    let dim = cfg.head_dim;
    let exps = Tensor::arange_start_step(0, dim, 2, (Kind::Int64, Device::Cpu))
        .to_kind(Kind::Float)
        / dim as f64;
    let inv = Tensor::pow_scalar(cfg.rope_theta, &exps).reciprocal();
    let RopeScaling::Llama3 {
        factor,
        low_freq_factor: lo,
        high_freq_factor: hi,
        original_context: old,
    } = cfg.rope_scaling
    else {
        return inv;
    };
    let (low_wavelen, high_wavelen) = (old / lo, old / hi);
    let wavelen = inv.reciprocal() * (2.0 * std::f64::consts::PI);
    // Wavelengths above the low-frequency bound: divided by `factor`.
    let scaled = (&inv / factor).where_self(&wavelen.gt(low_wavelen), &inv);
    // Between the bounds: interpolated.
    let smooth = (wavelen.reciprocal() * old - lo) / (hi - lo);
    let smoothed = (smooth.neg() + 1.0) * &scaled / factor + &smooth * &scaled;
    let medium = wavelen
        .lt(high_wavelen)
        .logical_not()
        .logical_and(&wavelen.gt(low_wavelen).logical_not());
    smoothed.where_self(&medium, &scaled)
}

/// `[-x₂, x₁]` of the halves of the last dimension.
fn rotate_half(x: &Tensor) -> Tensor {
    let h = x.size().last().copied().expect("a head dimension") / 2;
    Tensor::cat(&[x.narrow(-1, h, h).neg(), x.narrow(-1, 0, h)], -1)
}

impl HfDecoder {
    /// A decoder of `cfg` with no weights loaded yet, computing in `kind` (a floating
    /// type; [`DEFAULT_KIND`], f32, on the CPU): weights are converted to it as they load.
    pub fn new(cfg: HfConfig, kind: Kind) -> HfDecoder {
        HfDecoder {
            inv_freq: inv_freq(&cfg),
            cfg,
            kind,
            embed: None,
            blocks: BTreeMap::new(),
            norm: None,
            head: None,
            rows: None,
            chunk_bytes: READ_CHUNK_BYTES,
        }
    }

    /// The same decoder reading `bytes` of stored rows at a time (at least one row).
    pub fn with_chunk_bytes(mut self, bytes: i64) -> HfDecoder {
        self.chunk_bytes = bytes;
        self
    }

    /// The same decoder reading its matrices (embeddings, head, every projection) from
    /// `weights` [`READ_CHUNK_BYTES`] of stored rows at a time, converted and copied
    /// into their place in the compute layout on `device`: loading a stage then holds its
    /// weights plus one chunk, never a second copy of a matrix (the head of a 128k
    /// vocabulary is a gigabyte). Norms and biases still come through `load`'s getter.
    pub fn reading_rows(mut self, weights: Arc<HfWeights>, device: Device) -> HfDecoder {
        self.rows = Some((weights, device));
        self
    }

    /// Its config.
    pub fn config(&self) -> &HfConfig {
        &self.cfg
    }

    /// Logits `[B, T, vocab]` of tokens (`[B, T]`, each below the vocabulary): every layer
    /// (all must be loaded), causal attention within the sequence, positions from 0.
    pub fn forward(&self, tokens: &Tensor) -> Result<Tensor, StageError> {
        let pos = self.whole_model_positions(tokens)?;
        let mut x = self.embed(tokens, &pos);
        for i in 0..self.cfg.layers {
            x = self.layer(i, &x, &pos, &mut Causal)?;
        }
        Ok(self.logits(&x))
    }

    /// The positions `0..T` of `tokens` (`[B, T]`) for a pass through every layer, after
    /// checking that every layer is loaded and every token is in the vocabulary.
    pub(super) fn whole_model_positions(&self, tokens: &Tensor) -> Result<Tensor, StageError> {
        let (_, t) = tokens
            .size2()
            .map_err(|_| StageError::Request("tokens must be [batch, len]".into()))?;
        if !self.retained(0..self.cfg.layers) {
            return Err(StageError::Request("not every layer is loaded".into()));
        }
        if tokens.numel() > 0 {
            let (lo, hi) = (tokens.min().int64_value(&[]), tokens.max().int64_value(&[]));
            if lo < 0 || hi >= self.cfg.vocab {
                return Err(StageError::Request(format!(
                    "tokens {lo}..={hi} outside the vocabulary of {}",
                    self.cfg.vocab
                )));
            }
        }
        Ok(Tensor::arange(t, (Kind::Int64, tokens.device())))
    }

    /// Whether everything `layers` needs is loaded.
    fn retained(&self, layers: Range<usize>) -> bool {
        let last = layers.end == self.cfg.layers;
        layers.clone().all(|i| self.blocks.contains_key(&i))
            && (layers.start > 0 || self.embed.is_some())
            && (!last || self.head.is_some())
    }

    /// The tensor `name` from `get`, checked to be floating point of `shape`, converted to
    /// the compute type.
    fn fetch(
        &self,
        get: &dyn Fn(&str) -> Result<Tensor, String>,
        name: &str,
        shape: &[i64],
    ) -> Result<Tensor, String> {
        let t = get(name)?;
        if !t.is_floating_point() {
            return Err(format!(
                "tensor `{name}` is {:?}, not floating point",
                t.kind()
            ));
        }
        if t.size() != shape {
            return Err(format!(
                "tensor `{name}` has shape {:?}, expected {shape:?}",
                t.size()
            ));
        }
        Ok(t.to_kind(self.kind))
    }

    /// The matrix `name`, checked to be `[out, input]` and floating point, passed to `put`
    /// in chunks of rows (`put(first_row, rows)`, on the CPU in the stored type).
    fn read_matrix(
        &self,
        w: &HfWeights,
        name: &str,
        out: i64,
        input: i64,
        mut put: impl FnMut(i64, &Tensor),
    ) -> Result<(), String> {
        let shape = w.shape(name).map_err(|e| e.to_string())?;
        if shape != [out, input] {
            return Err(format!(
                "tensor `{name}` has shape {shape:?}, expected {:?}",
                [out, input]
            ));
        }
        let chunk = (self.chunk_bytes / (4 * input).max(1)).max(1);
        let mut r0 = 0;
        while r0 < out {
            let r1 = (r0 + chunk).min(out);
            let t = w.get_rows(name, r0..r1).map_err(|e| e.to_string())?;
            put(r0, &t);
            r0 = r1;
        }
        Ok(())
    }

    /// The embeddings `[vocab, hidden]` in the compute type.
    fn embeddings(&self, get: &dyn Fn(&str) -> Result<Tensor, String>) -> Result<Tensor, String> {
        let (v, d) = (self.cfg.vocab, self.cfg.hidden);
        let Some((w, device)) = &self.rows else {
            return self.fetch(get, EMBED, &[v, d]);
        };
        let dst = Tensor::empty([v, d], (self.kind, *device));
        self.read_matrix(w, EMBED, v, d, |r0, t| {
            dst.narrow(0, r0, t.size()[0]).copy_(t);
        })?;
        Ok(dst)
    }

    fn norm(
        &self,
        get: &dyn Fn(&str) -> Result<Tensor, String>,
        name: &str,
        width: i64,
    ) -> Result<RmsNorm, String> {
        Ok(RmsNorm {
            w: self.fetch(get, name, &[width])?,
            eps: self.cfg.rms_norm_eps,
        })
    }

    /// A packed linear map of the weights `names` (each `[outs[j], input]`, with biases
    /// `{name}.bias` when `bias`) concatenated along the outputs.
    fn linear(
        &self,
        get: &dyn Fn(&str) -> Result<Tensor, String>,
        names: &[(&str, i64)],
        input: i64,
        bias: bool,
    ) -> Result<Proj, String> {
        let mut bs = Vec::with_capacity(names.len());
        if bias {
            for (n, out) in names {
                bs.push(self.fetch(get, &format!("{n}.bias"), &[*out])?);
            }
        }
        let b = bias.then(|| Tensor::cat(&bs, 0));
        let Some((w, device)) = &self.rows else {
            let mut ws = Vec::with_capacity(names.len());
            for (n, out) in names {
                ws.push(self.fetch(get, &format!("{n}.weight"), &[*out, input])?);
            }
            return Ok(Proj::Packed(Linear::packed(
                &Tensor::cat(&ws, 0),
                b.as_ref(),
            )));
        };
        // The concatenated maps in the serving layout (`W` in the rows layout, else `Wᵀ`),
        // filled a chunk of rows at a time.
        let total = names.iter().map(|(_, o)| o).sum::<i64>();
        let rows = rows_layout(self.kind, *device);
        let shape = if rows { [total, input] } else { [input, total] };
        let dst = Tensor::empty(shape, (self.kind, *device));
        let mut off = 0;
        for (n, out) in names {
            self.read_matrix(w, &format!("{n}.weight"), *out, input, |r0, t| {
                let len = t.size()[0];
                if rows {
                    dst.narrow(0, off + r0, len).copy_(t);
                } else {
                    dst.narrow(1, off + r0, len).copy_(&t.tr());
                }
            })?;
            off += out;
        }
        Ok(Proj::Packed(if rows {
            Linear::packed(&dst, b.as_ref())
        } else {
            Linear::from_transposed(dst, b)
        }))
    }

    fn load_block(
        &self,
        get: &dyn Fn(&str) -> Result<Tensor, String>,
        i: usize,
    ) -> Result<Block, String> {
        let c = &self.cfg;
        let p = block_prefix(i);
        let (d, hd, m) = (c.hidden, c.head_dim, c.intermediate);
        let n = |s: &str| format!("{p}{s}");
        let (q, k, v, o) = (
            n("self_attn.q_proj"),
            n("self_attn.k_proj"),
            n("self_attn.v_proj"),
            n("self_attn.o_proj"),
        );
        let qk_norm = |s: &str| -> Result<Option<RmsNorm>, String> {
            c.qk_norm.then(|| self.norm(get, &n(s), hd)).transpose()
        };
        let (gate, up, down) = (n("mlp.gate_proj"), n("mlp.up_proj"), n("mlp.down_proj"));
        Ok(Block {
            input_norm: self.norm(get, &n("input_layernorm.weight"), d)?,
            qkv: self.linear(
                get,
                &[
                    (&q, c.heads * hd),
                    (&k, c.kv_heads * hd),
                    (&v, c.kv_heads * hd),
                ],
                d,
                c.qkv_bias,
            )?,
            o: self.linear(get, &[(&o, d)], c.heads * hd, c.o_bias)?,
            q_norm: qk_norm("self_attn.q_norm.weight")?,
            k_norm: qk_norm("self_attn.k_norm.weight")?,
            post_norm: self.norm(get, &n("post_attention_layernorm.weight"), d)?,
            gate_up: self.linear(get, &[(&gate, m), (&up, m)], d, c.mlp_bias)?,
            down: self.linear(get, &[(&down, d)], m, c.mlp_bias)?,
        })
    }

    /// Rotary `cos` and `sin` (`[.., len, head_dim]`, broadcasting over heads) of
    /// `positions`, in the compute type.
    fn rope(&self, positions: &Tensor) -> (Tensor, Tensor) {
        let inv = self.inv_freq.to_device(positions.device());
        let freqs = positions.to_kind(Kind::Float).unsqueeze(-1) * inv;
        let emb = Tensor::cat(&[&freqs, &freqs], -1);
        let (cos, sin) = (emb.cos().to_kind(self.kind), emb.sin().to_kind(self.kind));
        if positions.dim() == 2 {
            (cos.unsqueeze(1), sin.unsqueeze(1))
        } else {
            (cos, sin)
        }
    }
}

impl Decoder for HfDecoder {
    fn shape(&self) -> DecoderShape {
        DecoderShape {
            layers: self.cfg.layers,
            width: self.cfg.hidden,
            context: self.cfg.context,
            vocab: self.cfg.vocab,
            kv_heads: self.cfg.kv_heads,
            head_dim: self.cfg.head_dim,
        }
    }

    fn retain(&mut self, layers: Range<usize>) -> bool {
        self.blocks.retain(|i, _| layers.contains(i));
        if layers.start > 0 {
            self.embed = None;
        }
        if layers.end != self.cfg.layers {
            self.norm = None;
            self.head = None;
        }
        self.retained(layers)
    }

    /// Loads `model.layers.{i}.*` for `layers`, plus `model.embed_tokens` when the range
    /// starts at 0 and `model.norm` + `lm_head` (or the tied embeddings) when it ends at
    /// the last layer; nothing else is asked of `get`.
    fn load(
        &mut self,
        layers: Range<usize>,
        get: &dyn Fn(&str) -> Result<Tensor, String>,
    ) -> Result<(), String> {
        if layers.end > self.cfg.layers {
            return Err(format!(
                "layers {layers:?} of a {}-layer model",
                self.cfg.layers
            ));
        }
        let (d, v) = (self.cfg.hidden, self.cfg.vocab);
        for i in layers.clone() {
            if !self.blocks.contains_key(&i) {
                let b = self.load_block(get, i)?;
                self.inv_freq = self.inv_freq.to_device(b.input_norm.w.device());
                self.blocks.insert(i, b);
            }
        }
        if layers.start == 0 && self.embed.is_none() {
            self.embed = Some(self.embeddings(get)?);
        }
        if layers.end == self.cfg.layers && self.head.is_none() {
            self.norm = Some(self.norm(get, NORM, d)?);
            self.head = Some(match (&self.embed, self.cfg.tie_word_embeddings) {
                // Tied, in the rows layout, on a stage that holds the embeddings: the head
                // is the embedding matrix itself (one copy of `[vocab, hidden]`, not two).
                (Some(e), true) if rows_layout(e.kind(), e.device()) => {
                    Proj::Packed(Linear::packed(e, None))
                }
                (_, tied) => {
                    let head = if tied { EMBED } else { HEAD };
                    self.linear(get, &[(head.trim_end_matches(".weight"), v)], d, false)?
                }
            });
        }
        Ok(())
    }

    fn loaded_layers(&self) -> Vec<usize> {
        self.blocks.keys().copied().collect()
    }

    fn embed(&self, tokens: &Tensor, _positions: &Tensor) -> Tensor {
        let e = self.embed.as_ref().expect("layer 0 is loaded");
        Tensor::embedding(e, tokens, -1, false, false)
    }

    fn layer(
        &self,
        layer: usize,
        x: &Tensor,
        positions: &Tensor,
        attention: &mut dyn Attention,
    ) -> Result<Tensor, StageError> {
        let blk = self
            .blocks
            .get(&layer)
            .ok_or_else(|| StageError::Request(format!("layer {layer} is not loaded")))?;
        let c = &self.cfg;
        let x = x.to_kind(self.kind);
        let (b, t, _) = x
            .size3()
            .map_err(|_| StageError::Request("hidden states must be [batch, len, width]".into()))?;
        let (h, kv, hd) = (c.heads, c.kv_heads, c.head_dim);
        let parts = blk
            .qkv
            .forward_split(&blk.input_norm.forward(&x), &[h * hd, kv * hd, kv * hd]);
        let q = parts[0].view([b, t, h, hd]);
        let k = parts[1].view([b, t, kv, hd]);
        let v = parts[2].view([b, t, kv, hd]).transpose(1, 2);
        let q = blk
            .q_norm
            .as_ref()
            .map_or(q.shallow_clone(), |n| n.forward(&q));
        let k = blk
            .k_norm
            .as_ref()
            .map_or(k.shallow_clone(), |n| n.forward(&k));
        let (q, k) = (q.transpose(1, 2), k.transpose(1, 2));
        let (cos, sin) = self.rope(positions);
        let q = &q * &cos + rotate_half(&q) * &sin;
        let k = &k * &cos + rotate_half(&k) * &sin;
        let a = attention.attend(layer, &q, &k, &v)?;
        let a = a.transpose(1, 2).contiguous().view([b, t, h * hd]);
        let x = &x + blk.o.forward(&a);
        let m = c.intermediate;
        let parts = blk
            .gate_up
            .forward_split(&blk.post_norm.forward(&x), &[m, m]);
        let mlp = blk.down.forward(&(parts[0].silu() * &parts[1]));
        Ok(x + mlp)
    }

    fn logits(&self, x: &Tensor) -> Tensor {
        let norm = self.norm.as_ref().expect("the last layer is loaded");
        let head = self.head.as_ref().expect("the last layer is loaded");
        head.forward(&norm.forward(&x.to_kind(self.kind)))
    }
}
