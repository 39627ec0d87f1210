//! The layers every model is made of: a linear map and a LayerNorm, in one of three weight
//! layouts.
//!
//! - **Training layout**: the weights are the `VarStore`'s variables as `tch::nn` creates
//!   them (`W` is `[out, in]`), and [`Linear::forward`] is `tch::nn::Linear`'s (`x·Wᵀ + b`
//!   through `Tensor::linear`), so autograd sees the variables themselves.
//! - **Rows layout** (serving f32 on a CPU with AVX-512F): `W` stays `[out, in]` as the
//!   checkpoint has it; up to [`cpu_matmul::MAX_ROWS`] rows (a decode step) go through
//!   [`cpu_matmul`] on torch's thread count, more rows (a prefill) through `Tensor::linear`,
//!   which is MKL's blocked GEMM at the same speed as the transposed layout's from 32 rows
//!   up.
//! - **Transposed layout** (serving anywhere else, or with `SHOAL_CPU_MATMUL=off`): `Wᵀ` is
//!   stored pre-transposed (`[in, out]`, contiguous) and the forward is one `addmm` that reads
//!   the weights in the order they are laid out (measured 10–40% faster than multiplying by a
//!   transposed view at serving batch sizes).
//!
//! All compute the same function of the same checkpoint tensors; they differ only in the
//! order floating-point sums are taken (about 1e-7 relative).

use std::sync::OnceLock;

use super::cpu_matmul;
use tch::{nn, Device, Kind, Tensor};

/// LayerNorm's epsilon (`tch::nn::LayerNormConfig`'s and PyTorch's default). 1e-5.
pub const NORM_EPS: f64 = 1e-5;

/// How a [`Linear`] holds its weights (see the module's documentation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Layout {
    /// `W` `[out, in]`: `tch::nn::Linear`'s variables.
    Training,
    /// `W` `[out, in]` contiguous, f32 on the CPU, with [`cpu_matmul`] for few rows.
    Rows,
    /// `Wᵀ` `[in, out]` contiguous.
    Transposed,
}

/// A linear map `x·Wᵀ + b`.
pub struct Linear {
    /// `W` (`[out, in]`) in the training and rows layouts, `Wᵀ` (`[in, out]`) transposed.
    w: Tensor,
    b: Option<Tensor>,
    layout: Layout,
}

/// Whether serving weights of `kind` on `device` keep the rows layout: f32 on a CPU whose
/// cores have AVX-512F, unless the environment sets `SHOAL_CPU_MATMUL=off` (read once; for
/// measuring the two layouts against each other). Default: on where the CPU allows it.
pub fn rows_layout(kind: Kind, device: Device) -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    let on = *ON.get_or_init(|| {
        cpu_matmul::available() && std::env::var("SHOAL_CPU_MATMUL").as_deref() != Ok("off")
    });
    on && kind == Kind::Float && device == Device::Cpu && !transposed_forced()
}

#[cfg(test)]
thread_local! {
    /// Tests set this to build the transposed layout on a CPU that would get the rows one.
    pub(crate) static FORCE_TRANSPOSED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn transposed_forced() -> bool {
    #[cfg(test)]
    return FORCE_TRANSPOSED.with(|f| f.get());
    #[cfg(not(test))]
    false
}

impl Linear {
    /// The training layout over `tch::nn::Linear`'s variables.
    pub fn trainable(l: nn::Linear) -> Linear {
        Linear {
            w: l.ws,
            b: l.bs,
            layout: Layout::Training,
        }
    }

    /// A serving layout from a checkpoint's `W` (`[out, in]`) and optional bias: the rows
    /// layout where [`rows_layout`] says so (sharing `w`'s storage when it is contiguous),
    /// else the transposed one.
    pub fn packed(w: &Tensor, b: Option<&Tensor>) -> Linear {
        let b = b.map(Tensor::shallow_clone);
        if rows_layout(w.kind(), w.device()) {
            return Linear {
                w: w.contiguous(),
                b,
                layout: Layout::Rows,
            };
        }
        Linear {
            w: w.tr().contiguous(),
            b,
            layout: Layout::Transposed,
        }
    }

    /// The transposed layout from `Wᵀ` already laid out `[in, out]` (contiguous), and an
    /// optional bias.
    pub fn from_transposed(wt: Tensor, b: Option<Tensor>) -> Linear {
        Linear {
            w: wt.contiguous(),
            b,
            layout: Layout::Transposed,
        }
    }

    /// Input features.
    pub fn in_features(&self) -> i64 {
        self.w.size()[if self.layout == Layout::Transposed {
            0
        } else {
            1
        }]
    }

    /// `x·Wᵀ + b` over the last dimension of `x`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        match self.layout {
            Layout::Training => x.linear(&self.w, self.b.as_ref()),
            Layout::Rows => self.forward_rows(x),
            Layout::Transposed => {
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
    }

    /// The rows layout's forward: [`cpu_matmul`] (on as many threads as torch computes with
    /// on this thread) for 1..=[`cpu_matmul::MAX_ROWS`] rows of f32 without autograd,
    /// `Tensor::linear` otherwise.
    fn forward_rows(&self, x: &Tensor) -> Tensor {
        let (n, k) = (self.w.size()[0], self.w.size()[1]);
        let rows = x.numel() / k.max(1) as usize;
        if rows == 0
            || rows > cpu_matmul::MAX_ROWS
            || x.kind() != Kind::Float
            || x.device() != Device::Cpu
            || x.size().last() != Some(&k)
            || x.requires_grad()
        {
            return x.linear(&self.w, self.b.as_ref());
        }
        let (ku, nu) = (k as usize, n as usize);
        let threads = tch::get_num_threads().max(1) as usize;
        let x = x.contiguous();
        let mut size = x.size();
        *size.last_mut().expect("a matrix") = n;
        let mut y = Tensor::empty(size.as_slice(), (Kind::Float, Device::Cpu));
        // SAFETY: `x` and `y` are contiguous f32 CPU tensors of `rows·k` and `rows·n`
        // elements (`y` fresh, so nothing else aliases it) and `w` is a contiguous f32 CPU
        // tensor of `n·k` (the rows layout's invariant); all three live until the end of
        // this function, past the slices' last use.
        unsafe {
            let xs = std::slice::from_raw_parts(x.data_ptr() as *const f32, rows * ku);
            let ws = std::slice::from_raw_parts(self.w.data_ptr() as *const f32, nu * ku);
            let ys = std::slice::from_raw_parts_mut(y.data_ptr() as *mut f32, rows * nu);
            cpu_matmul::matmul_nt(xs, rows, ku, ws, nu, ys, threads);
        }
        if let Some(b) = &self.b {
            y += b;
        }
        y
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
