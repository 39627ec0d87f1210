//! The backward pass of a Hugging Face decoder in stages, last layer first, so that each
//! stage's gradients can travel (be all-reduced) while the earlier layers' backward still
//! runs: what PyTorch DDP does with autograd hooks, done here with the graph cut at the
//! blocks' boundaries.
//!
//! The forward runs every block on a detached copy of its input that requires a gradient.
//! The backward then starts at the loss (the head and the final norm: [`Stage::Head`]),
//! and walks down: block `i`'s output is back-propagated with the gradient its successor
//! left on its own input (`(out · g).sum().backward()`, whose gradient with respect to
//! `out` is `g`), which completes block `i`'s parameters' gradients
//! ([`Stage::Block`]) and leaves the gradient for block `i - 1`; the embeddings come last
//! ([`Stage::Embed`]; with tied embeddings the head's share of their gradient is in by
//! then). The activations kept are the forward's, as in one backward; each block's graph
//! is freed once its backward has run. Gradients accumulate into the parameters' `.grad`
//! as `loss.backward()` would leave them (the same sums, so equal up to the order of the
//! additions, tested against it).

use super::llama::{HfDecoder, EMBED};
use crate::models::decoder::{Causal, Decoder};
use crate::models::StageError;
use tch::Tensor;

/// A part of the decoder whose parameters' gradients are complete once its backward ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// The final norm and the head (first; not the tied embeddings).
    Head,
    /// Block `i` (`model.layers.{i}.*`, LoRA adapters included), from the last block down.
    Block(usize),
    /// The embeddings (last).
    Embed,
}

impl Stage {
    /// The stage whose backward completes the gradient of the parameter `name` (a Hugging
    /// Face name): `model.layers.{i}.…` is block `i`, the embeddings are [`Stage::Embed`],
    /// everything else (`model.norm.weight`, `lm_head.weight`) is [`Stage::Head`].
    pub fn of(name: &str) -> Stage {
        if name == EMBED {
            return Stage::Embed;
        }
        let block = name
            .strip_prefix("model.layers.")
            .and_then(|rest| rest.split('.').next())
            .and_then(|i| i.parse().ok());
        match block {
            Some(i) => Stage::Block(i),
            None => Stage::Head,
        }
    }
}

impl HfDecoder {
    /// Forward of `tokens` (`[B, T]`, every layer loaded), `loss_of` the logits (f32 of
    /// them is the caller's business), then the backward in stages (see the module's
    /// documentation), calling `done` after each: [`Stage::Head`], the blocks from the
    /// last down, [`Stage::Embed`]. Returns the loss (detached). Stages whose parameters
    /// are all frozen still come (their inputs' gradients are needed below them), except
    /// [`Stage::Embed`]'s backward, skipped when the embeddings are frozen.
    pub fn backward_staged<E: From<StageError>>(
        &self,
        tokens: &Tensor,
        loss_of: &mut dyn FnMut(&Tensor) -> Result<Tensor, E>,
        done: &mut dyn FnMut(Stage),
    ) -> Result<Tensor, E> {
        let pos = self.whole_model_positions(tokens)?;
        let x0 = self.embed(tokens, &pos);
        let embed_trains = x0.requires_grad();
        let layers = self.cfg.layers;
        // Block i's (input, output); the input a leaf that collects its gradient.
        let mut cut: Vec<(Tensor, Tensor)> = Vec::with_capacity(layers);
        let mut x = x0.shallow_clone();
        for i in 0..layers {
            let input = x.detach();
            // Block 0's input needs a gradient only to carry it on to trained embeddings.
            let input = if i > 0 || embed_trains {
                input.set_requires_grad(true)
            } else {
                input
            };
            x = self.layer(i, &input, &pos, &mut Causal)?;
            cut.push((input, x.shallow_clone()));
        }
        let last = x.detach().set_requires_grad(true);
        let loss = loss_of(&self.logits(&last))?;
        loss.backward();
        done(Stage::Head);
        let mut g = last.grad();
        while let Some((input, out)) = cut.pop() {
            if out.requires_grad() {
                (&out * &g).sum(out.kind()).backward();
            }
            done(Stage::Block(cut.len()));
            g = input.grad();
            if !g.defined() {
                // Block 0 with frozen embeddings: nothing flows further.
                break;
            }
        }
        if embed_trains && g.defined() {
            (&x0 * &g).sum(x0.kind()).backward();
        }
        done(Stage::Embed);
        Ok(loss.detach())
    }
}
