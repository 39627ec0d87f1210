//! The layers every model is made of: a linear map and a LayerNorm, in either of two weight
//! layouts.
//!
//! - **Training layout**: the weights are the `VarStore`'s variables as `tch::nn` creates
//!   them (`W` is `[out, in]`), and [`Linear::forward`] is `tch::nn::Linear`'s (`x·Wᵀ + b`
//!   through `Tensor::linear`), so autograd sees the variables themselves.
//! - **Packed layout** (serving): `Wᵀ` is stored pre-transposed (`[in, out]`, contiguous)
//!   and the forward is one `addmm` that reads the weights in the order they are laid out
//!   (measured 10–40% faster than multiplying by a transposed view at serving batch sizes).
//!
//! Both compute the same function of the same checkpoint tensors; they differ only in the
//! order floating-point sums are taken (about 1e-7 relative).

use tch::{nn, Tensor};

/// LayerNorm's epsilon (`tch::nn::LayerNormConfig`'s and PyTorch's default). 1e-5.
pub const NORM_EPS: f64 = 1e-5;

/// A linear map `x·Wᵀ + b`.
pub struct Linear {
    /// `W` (`[out, in]`) in the training layout, `Wᵀ` (`[in, out]`, contiguous) packed.
    w: Tensor,
    b: Option<Tensor>,
    packed: bool,
}

impl Linear {
    /// The training layout over `tch::nn::Linear`'s variables.
    pub fn trainable(l: nn::Linear) -> Linear {
        Linear {
            w: l.ws,
            b: l.bs,
            packed: false,
        }
    }

    /// The packed layout from a checkpoint's `W` (`[out, in]`) and optional bias.
    pub fn packed(w: &Tensor, b: Option<&Tensor>) -> Linear {
        Linear {
            w: w.tr().contiguous(),
            b: b.map(Tensor::shallow_clone),
            packed: true,
        }
    }

    /// The packed layout from `Wᵀ` already laid out `[in, out]` (contiguous), and an
    /// optional bias.
    pub fn from_transposed(wt: Tensor, b: Option<Tensor>) -> Linear {
        Linear {
            w: wt.contiguous(),
            b,
            packed: true,
        }
    }

    /// Input features.
    pub fn in_features(&self) -> i64 {
        self.w.size()[if self.packed { 0 } else { 1 }]
    }

    /// `x·Wᵀ + b` over the last dimension of `x`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        if !self.packed {
            return x.linear(&self.w, self.b.as_ref());
        }
        let Some(b) = &self.b else {
            return x.matmul(&self.w);
        };
        let mut size = x.size();
        let k = *size.last().expect("a matrix");
        let y = Tensor::addmm(b, &x.reshape([-1, k]), &self.w);
        *size.last_mut().expect("a matrix") = self.w.size()[1];
        y.view(size.as_slice())
    }
}

/// A LayerNorm over the last dimension with a weight and a bias.
pub struct Norm {
    w: Tensor,
    b: Tensor,
}

impl Norm {
    /// Over `tch::nn::LayerNorm`'s variables (created with `elementwise_affine`).
    pub fn trainable(l: nn::LayerNorm) -> Norm {
        Norm {
            w: l.ws.expect("an affine LayerNorm"),
            b: l.bs.expect("an affine LayerNorm"),
        }
    }

    /// From a checkpoint's weight and bias.
    pub fn new(w: &Tensor, b: &Tensor) -> Norm {
        Norm {
            w: w.shallow_clone(),
            b: b.shallow_clone(),
        }
    }

    /// `(x - mean) / sqrt(var + NORM_EPS) · w + b` over the last dimension.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let d = self.w.size()[0];
        x.layer_norm([d], Some(&self.w), Some(&self.b), NORM_EPS, true)
    }
}

/// Linear weights and embeddings of the built-in models start from N(0, 0.02).
pub fn normal_init() -> nn::Init {
    nn::Init::Randn {
        mean: 0.0,
        stdev: 0.02,
    }
}

/// A trainable linear layer with N(0, 0.02) weights and a zero bias (if `bias`).
pub fn linear(p: nn::Path, i: i64, o: i64, bias: bool) -> Linear {
    Linear::trainable(nn::linear(
        p,
        i,
        o,
        nn::LinearConfig {
            ws_init: normal_init(),
            bs_init: Some(nn::Init::Const(0.0)),
            bias,
        },
    ))
}

/// A trainable LayerNorm of `width` (weight 1, bias 0).
pub fn norm(p: nn::Path, width: i64) -> Norm {
    Norm::trainable(nn::layer_norm(p, vec![width], Default::default()))
}
