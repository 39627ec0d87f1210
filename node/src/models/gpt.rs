//! The built-in `gpt`: one definition for training and serving.
//!
//! A pre-norm decoder over bytes (vocabulary [`VOCAB`]): token and position embeddings
//! (`tok`, `pos`); `layers` blocks of causal self-attention (`ln1`, `qkv`, `proj`) and a
//! GELU MLP (`ln2`, `fc` 4×, `fc2`); a final LayerNorm `ln_f` and an unbiased `head`.
//! Linear weights and embeddings start from N(0, 0.02), biases at zero, LayerNorms at
//! (1, 0). Parameter names (`tok.weight`, `blocks.{i}.qkv.bias`, `head.weight`, …) are
//! the checkpoint's names after its `model.` prefix and PyTorch's `state_dict` names of
//! `scripts/ddp_train.py`'s `GPT`, which mirrors this file op for op.
//!
//! The same blocks serve both uses:
//! - training ([`Gpt::init`], [`Gpt::forward`]): every layer, the `VarStore`'s variables,
//!   full-sequence causal attention under autograd;
//! - serving ([`Gpt::empty`] + [`Decoder::load`]): a range of layers in the packed layout
//!   (see [`super::layers`]), attention through the stage's KV caches
//!   ([`Decoder::layer`]).

use super::decoder::{Attention, Causal, Decoder, DecoderShape};
use super::layers::{self, Linear, Norm};
use super::StageError;
use std::collections::BTreeMap;
use std::ops::Range;
use tch::{nn, Kind, Tensor};

/// Byte vocabulary of the `gpt`. 256.
pub const VOCAB: u32 = 256;

/// A `gpt`'s architecture (the job file's `[model]` keys, the checkpoint's `model`
/// metadata).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GptConfig {
    /// Blocks.
    pub layers: i64,
    /// Attention heads (divides `width`).
    pub heads: i64,
    /// Hidden width.
    pub width: i64,
    /// Positions (the longest sequence).
    pub context: i64,
}

/// One block's weights.
struct Block {
    ln1: Norm,
    qkv: Linear,
    proj: Linear,
    ln2: Norm,
    fc: Linear,
    fc2: Linear,
}

/// A `gpt`, all of it (training) or the layers one stage runs (serving).
pub struct Gpt {
    cfg: GptConfig,
    /// `[VOCAB, width]`, present when layer 0 is here.
    tok: Option<Tensor>,
    /// `[context, width]`, present when layer 0 is here.
    pos: Option<Tensor>,
    blocks: BTreeMap<usize, Block>,
    /// Present when the last layer is here.
    ln_f: Option<Norm>,
    /// Present when the last layer is here.
    head: Option<Linear>,
}

/// Names of block `i`'s tensors start with this.
pub fn block_prefix(i: usize) -> String {
    format!("blocks.{i}.")
}

impl Gpt {
    /// A trainable `gpt` with fresh weights under `p` (drawn from tch's generator in the
    /// order blocks, `tok`, `pos`, `ln_f`, `head`, so a seed gives the same model as
    /// earlier versions).
    pub fn init(p: &nn::Path, cfg: GptConfig) -> Gpt {
        let width = cfg.width;
        let emb = nn::EmbeddingConfig {
            ws_init: layers::normal_init(),
            ..Default::default()
        };
        let blocks = (0..cfg.layers)
            .map(|l| {
                let b = p / "blocks" / l;
                let block = Block {
                    ln1: layers::norm(&b / "ln1", width),
                    qkv: layers::linear(&b / "qkv", width, 3 * width, true),
                    proj: layers::linear(&b / "proj", width, width, true),
                    ln2: layers::norm(&b / "ln2", width),
                    fc: layers::linear(&b / "fc", width, 4 * width, true),
                    fc2: layers::linear(&b / "fc2", 4 * width, width, true),
                };
                (l as usize, block)
            })
            .collect();
        Gpt {
            cfg,
            tok: Some(nn::embedding(p / "tok", VOCAB as i64, width, emb).ws),
            pos: Some(nn::embedding(p / "pos", cfg.context, width, emb).ws),
            blocks,
            ln_f: Some(layers::norm(p / "ln_f", width)),
            head: Some(layers::linear(p / "head", width, VOCAB as i64, false)),
        }
    }

    /// A `gpt` with no weights loaded yet (a serving stage loads its layers with
    /// [`Decoder::load`]).
    pub fn empty(cfg: GptConfig) -> Gpt {
        Gpt {
            cfg,
            tok: None,
            pos: None,
            blocks: BTreeMap::new(),
            ln_f: None,
            head: None,
        }
    }

    /// Its architecture.
    pub fn config(&self) -> GptConfig {
        self.cfg
    }

    /// Logits `[B, T, VOCAB]` of tokens `idx` (`[B, T]`, `T <= context`): every layer,
    /// causal attention within the sequence (the training forward; autograd follows it).
    pub fn forward(&self, idx: &Tensor) -> Tensor {
        let (_, t) = idx.size2().expect("[B, T] tokens");
        let pos = Tensor::arange(t, (Kind::Int64, idx.device()));
        let mut x = self.embed(idx, &pos);
        for i in 0..self.cfg.layers as usize {
            x = self
                .layer(i, &x, &pos, &mut Causal)
                .expect("causal attention does not fail");
        }
        self.logits(&x)
    }

    fn load_block(get: &dyn Fn(&str) -> Result<Tensor, String>, i: usize) -> Result<Block, String> {
        let p = block_prefix(i);
        let t = |n: &str| get(&format!("{p}{n}"));
        let lin = |n: &str| -> Result<Linear, String> {
            Ok(Linear::packed(
                &t(&format!("{n}.weight"))?,
                Some(&t(&format!("{n}.bias"))?),
            ))
        };
        let norm = |n: &str| -> Result<Norm, String> {
            Ok(Norm::new(
                &t(&format!("{n}.weight"))?,
                &t(&format!("{n}.bias"))?,
            ))
        };
        Ok(Block {
            ln1: norm("ln1")?,
            qkv: lin("qkv")?,
            proj: lin("proj")?,
            ln2: norm("ln2")?,
            fc: lin("fc")?,
            fc2: lin("fc2")?,
        })
    }
}

impl Decoder for Gpt {
    fn shape(&self) -> DecoderShape {
        DecoderShape {
            layers: self.cfg.layers as usize,
            width: self.cfg.width,
            context: self.cfg.context,
            vocab: VOCAB as i64,
            kv_heads: self.cfg.heads,
            head_dim: self.cfg.width / self.cfg.heads,
        }
    }

    fn retain(&mut self, layers: Range<usize>) -> bool {
        self.blocks.retain(|i, _| layers.contains(i));
        if layers.start > 0 {
            self.tok = None;
            self.pos = None;
        }
        let last = layers.end == self.cfg.layers as usize;
        if !last {
            self.ln_f = None;
            self.head = None;
        }
        layers.clone().all(|i| self.blocks.contains_key(&i))
            && (layers.start > 0 || self.tok.is_some())
            && (!last || self.head.is_some())
    }

    fn load(
        &mut self,
        layers: Range<usize>,
        get: &dyn Fn(&str) -> Result<Tensor, String>,
    ) -> Result<(), String> {
        for i in layers.clone() {
            if let std::collections::btree_map::Entry::Vacant(e) = self.blocks.entry(i) {
                e.insert(Gpt::load_block(get, i)?);
            }
        }
        let t = |n: &str| get(n);
        if layers.start == 0 {
            self.tok = Some(t("tok.weight")?);
            self.pos = Some(t("pos.weight")?);
        }
        if layers.end == self.cfg.layers as usize {
            self.ln_f = Some(Norm::new(&t("ln_f.weight")?, &t("ln_f.bias")?));
            self.head = Some(Linear::packed(&t("head.weight")?, None));
        }
        Ok(())
    }

    fn loaded_layers(&self) -> Vec<usize> {
        self.blocks.keys().copied().collect()
    }

    fn embed(&self, tokens: &Tensor, positions: &Tensor) -> Tensor {
        let tok = self.tok.as_ref().expect("layer 0 is loaded");
        let pos = self.pos.as_ref().expect("layer 0 is loaded");
        Tensor::embedding(tok, tokens, -1, false, false)
            + Tensor::embedding(pos, positions, -1, false, false)
    }

    /// Block `layer` on `x` (`[B, T, width]`); positions entered at the embeddings.
    fn layer(
        &self,
        layer: usize,
        x: &Tensor,
        _positions: &Tensor,
        attention: &mut dyn Attention,
    ) -> Result<Tensor, StageError> {
        let blk = &self.blocks[&layer];
        let (b, t, d) = x.size3().expect("[B, T, width] hidden states");
        let hd = d / self.cfg.heads;
        let qkv = blk.qkv.forward(&blk.ln1.forward(x));
        let parts = qkv.split(d, 2);
        let shape = |t: &Tensor| t.view([b, -1, self.cfg.heads, hd]).transpose(1, 2);
        let a = attention.attend(
            layer,
            &shape(&parts[0]),
            &shape(&parts[1]),
            &shape(&parts[2]),
        )?;
        let a = a.transpose(1, 2).contiguous().view([b, t, d]);
        // Not `+=`: that is an in-place add, and autograd needs the old `x`.
        let x = x + blk.proj.forward(&a);
        let h = blk.fc.forward(&blk.ln2.forward(&x)).gelu("none");
        Ok(&x + blk.fc2.forward(&h))
    }

    fn logits(&self, x: &Tensor) -> Tensor {
        let ln_f = self.ln_f.as_ref().expect("the last layer is loaded");
        let head = self.head.as_ref().expect("the last layer is loaded");
        head.forward(&ln_f.forward(x))
    }
}
