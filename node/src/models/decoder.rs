//! What a decoder-only language model offers a serving stage, whatever its family.
//!
//! A [`Decoder`] is embeddings, `layers` blocks and a head; a serving stage
//! ([`super::stage::StageExecutor`]) runs a contiguous range of the blocks and owns the
//! KV caches, which it plugs into each block's attention through [`Attention`]. The
//! built-in byte-level [`super::gpt::Gpt`] implements it; another family (e.g. a Hugging
//! Face decoder with rotary positions and grouped-query attention) implements the same
//! trait in a file beside `gpt.rs` and is picked by [`super::config::ModelConfig::kind`].

use super::StageError;
use std::ops::Range;
use tch::Tensor;

/// The sizes a stage needs to batch, cache and check a decoder's activations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecoderShape {
    /// Blocks.
    pub layers: usize,
    /// Width of the hidden states between blocks.
    pub width: i64,
    /// Longest sequence (positions) the model takes.
    pub context: i64,
    /// Vocabulary (logits per position).
    pub vocab: i64,
    /// Key/value heads per block (the KV cache's heads; fewer than the query heads under
    /// grouped-query attention).
    pub kv_heads: i64,
    /// Width of one head (the KV cache's last dimension).
    pub head_dim: i64,
}

/// How a block's attention sees keys and values: the stage's KV caches, or plain causal
/// attention within the call.
pub trait Attention {
    /// Attends `q` (`[batch, heads, len, head_dim]`) to `k` and `v` (`[batch, kv_heads,
    /// len, head_dim]`, the keys and values this call computed in block `layer`), adding
    /// whatever earlier positions it keeps; returns `[batch, heads, len, head_dim]`. When
    /// `kv_heads < heads` (grouped-query attention, `heads` a multiple of `kv_heads`),
    /// query head `h` attends with key/value head `h / (heads / kv_heads)`.
    fn attend(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor, StageError>;
}

/// Causal self-attention within the call: no cache, every position sees the positions
/// before it (a training forward or a full recompute).
pub struct Causal;

impl Attention for Causal {
    fn attend(
        &mut self,
        _: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor, StageError> {
        Ok(causal(q, k, v))
    }
}

/// `softmax(q·kᵀ/√d + causal mask)·v` (PyTorch's fused scaled-dot-product attention),
/// grouped-query when `k` has fewer heads than `q`.
pub fn causal(q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
    let gqa = is_gqa(q, k);
    Tensor::scaled_dot_product_attention::<Tensor>(q, k, v, None, 0.0, true, None, gqa)
}

/// Whether `k` (`[batch, kv_heads, ..]`) has fewer heads than `q` (`[batch, heads, ..]`).
pub fn is_gqa(q: &Tensor, k: &Tensor) -> bool {
    q.size()[1] != k.size()[1]
}

/// A decoder-only language model whose layers can be loaded and run a range at a time.
pub trait Decoder: Send {
    /// Its sizes.
    fn shape(&self) -> DecoderShape;

    /// Drops the weights outside `layers` (a re-plan moved them elsewhere: the embeddings
    /// belong to a range that starts at 0, the head to one that ends at the last layer);
    /// returns whether everything `layers` needs is loaded.
    fn retain(&mut self, layers: Range<usize>) -> bool;

    /// Loads what `layers` needs that is not loaded yet, each tensor by its name in the
    /// model (`get` answers the tensor or why it cannot: missing, unreadable); the error
    /// says which tensor and what is wrong (`get`'s error, or a shape that does not fit).
    fn load(
        &mut self,
        layers: Range<usize>,
        get: &dyn Fn(&str) -> Result<Tensor, String>,
    ) -> Result<(), String>;

    /// Blocks whose weights are loaded.
    fn loaded_layers(&self) -> Vec<usize>;

    /// Hidden states `[batch, len, width]` of `tokens` (`[batch, len]`) at `positions`
    /// (`[batch, len]` or `[len]`, counted from each row's first real token).
    fn embed(&self, tokens: &Tensor, positions: &Tensor) -> Tensor;

    /// Block `layer` applied to `x` at `positions`, attending through `attention`.
    fn layer(
        &self,
        layer: usize,
        x: &Tensor,
        positions: &Tensor,
        attention: &mut dyn Attention,
    ) -> Result<Tensor, StageError>;

    /// Logits `[.., vocab]` of the last block's hidden states.
    fn logits(&self, x: &Tensor) -> Tensor;
}
