//! The built-in `mlp`: a ReLU multi-layer perceptron classifier, one definition for
//! training and serving.
//!
//! Linear layers `fc0`, `fc1`, … map `features` through the `hidden` widths to `classes`
//! logits with a ReLU between layers (none after the last). Fresh weights use
//! `tch::nn::linear`'s default initialisation (Kaiming-uniform weights, uniform biases).
//! Serving loads the layers from a checkpoint in the packed layout (see
//! [`super::layers`]).

use super::layers::Linear;
use tch::{nn, Tensor};

/// An `mlp`.
pub struct Mlp {
    layers: Vec<Linear>,
}

impl Mlp {
    /// A trainable `mlp` with fresh weights under `root`; `dims` are the features, the
    /// hidden widths and the classes.
    pub fn init(root: &nn::Path, dims: &[i64]) -> Mlp {
        let layers = dims
            .windows(2)
            .enumerate()
            .map(|(i, w)| {
                Linear::trainable(nn::linear(
                    root / format!("fc{i}"),
                    w[0],
                    w[1],
                    Default::default(),
                ))
            })
            .collect();
        Mlp { layers }
    }

    /// The layers `fc0`, `fc1`, … that `get` finds (by their names in the model), packed
    /// for serving; an error when there is no `fc0`.
    pub fn load(get: &dyn Fn(&str) -> Option<Tensor>) -> Result<Mlp, String> {
        let mut layers = Vec::new();
        for i in 0.. {
            let (Some(w), Some(b)) = (get(&format!("fc{i}.weight")), get(&format!("fc{i}.bias")))
            else {
                break;
            };
            layers.push(Linear::packed(&w, Some(&b)));
        }
        if layers.is_empty() {
            return Err("no `model.fc0` layer".into());
        }
        Ok(Mlp { layers })
    }

    /// Input features.
    pub fn features(&self) -> i64 {
        self.layers[0].in_features()
    }

    /// Logits `[B, classes]` of features `x` (`[B, features]`).
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let mut h = x.shallow_clone();
        for (i, l) in self.layers.iter().enumerate() {
            h = l.forward(&h);
            if i + 1 < self.layers.len() {
                h = h.relu();
            }
        }
        h
    }
}
