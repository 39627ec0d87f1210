//! Optimizers with their state in plain tensors, so checkpoints and state transfer can
//! carry it (libtorch's C++ optimizers keep theirs out of reach).
//!
//! Same update rules as PyTorch's `AdamW` and `SGD(momentum, weight_decay)`; weight decay
//! applies to every parameter.

use super::job::{OptimizerKind, OptimizerSpec};
use tch::{Kind, Tensor};

/// Why the parameters cannot be optimised.
#[derive(Debug, thiserror::Error)]
pub enum OptimError {
    /// Two parameters share their storage (tied weights), which a flat update would untie.
    #[error("parameters `{0}` and `{1}` share their storage (tied weights are not supported)")]
    Tied(String, String),
    /// A parameter is not 32-bit float on the CPU.
    #[error("parameter `{0}` is not f32 on the CPU")]
    NotF32(String),
}

/// An optimizer and its state.
///
/// The parameters are moved into one contiguous buffer (each parameter's data becomes a
/// view of it, as FSDP's flat parameters do), and the state lives in buffers of the same
/// layout, so an update is a dozen whole-buffer operations instead of a dozen per
/// parameter: the update's cost is the memory traffic, not the per-operation overhead.
pub struct Optimizer {
    spec: OptimizerSpec,
    /// Every parameter, in the order given to [`Optimizer::new`] (that of the flat
    /// gradient [`Optimizer::step`] takes).
    flat: Tensor,
    /// AdamW: first moments; SGD: the momentum buffer.
    m: Tensor,
    /// AdamW: second moments (SGD: empty).
    v: Tensor,
    /// Each parameter's offset, length and shape in the buffers.
    layout: Vec<(i64, i64, Vec<i64>)>,
    /// Updates applied so far (AdamW bias correction).
    pub t: u64,
}

impl Optimizer {
    /// Fresh state for `params`, whose data moves into one flat buffer (their values are
    /// kept).
    pub fn new(spec: &OptimizerSpec, params: &[(String, Tensor)]) -> Result<Optimizer, OptimError> {
        let _guard = tch::no_grad_guard();
        let mut seen: Vec<(usize, &str)> = Vec::new();
        for (name, p) in params {
            if p.kind() != Kind::Float || p.device() != tch::Device::Cpu {
                return Err(OptimError::NotF32(name.clone()));
            }
            let ptr = p.data_ptr() as usize;
            if let Some((_, other)) = seen.iter().find(|(q, _)| *q == ptr) {
                return Err(OptimError::Tied(other.to_string(), name.clone()));
            }
            seen.push((ptr, name));
        }
        let numel: i64 = params.iter().map(|(_, p)| p.numel() as i64).sum();
        let flat = Tensor::zeros([numel], (Kind::Float, tch::Device::Cpu));
        let mut layout = Vec::with_capacity(params.len());
        let mut off = 0i64;
        for (_, p) in params {
            let n = p.numel() as i64;
            let shape = p.size();
            let mut view = flat.narrow(0, off, n).view(shape.as_slice());
            view.copy_(p);
            p.shallow_clone().set_data(&view);
            layout.push((off, n, shape));
            off += n;
        }
        let m = flat.zeros_like();
        let v = match spec.kind {
            OptimizerKind::Adamw => flat.zeros_like(),
            OptimizerKind::Sgd => Tensor::zeros([0], (Kind::Float, tch::Device::Cpu)),
        };
        Ok(Optimizer {
            spec: spec.clone(),
            flat,
            m,
            v,
            layout,
            t: 0,
        })
    }

    /// Applies one update with learning rate `lr` to the gradient `scale × grad`; `grad` is
    /// the flat gradient (every parameter's, in order; the summed gradient, `scale` its
    /// normalisation and clipping). One fused pass over the buffers, as PyTorch's fused
    /// AdamW: each element of the parameters and state is read and written once.
    pub fn step(&mut self, grad: &[f32], scale: f32, lr: f64) {
        self.t += 1;
        let s = &self.spec;
        let p = f32s(&mut self.flat);
        assert_eq!(grad.len(), p.len(), "the gradient covers every parameter");
        let m = f32s(&mut self.m);
        let decay = (1.0 - lr * s.weight_decay) as f32;
        match s.kind {
            OptimizerKind::Adamw => {
                // PyTorch's AdamW, in its order of operations.
                let (b1, b2) = (s.betas[0], s.betas[1]);
                let c1 = 1.0 - b1.powi(self.t as i32);
                let c2 = 1.0 - b2.powi(self.t as i32);
                let (b1, b2) = (b1 as f32, b2 as f32);
                let step = (lr / c1) as f32;
                let inv_sqrt_c2 = (1.0 / c2.sqrt()) as f32;
                let eps = s.eps as f32;
                let v = f32s(&mut self.v);
                for (((p, m), v), &g) in p.iter_mut().zip(m).zip(v).zip(grad) {
                    let g = g * scale;
                    *p *= decay;
                    *m += (1.0 - b1) * (g - *m);
                    *v = *v * b2 + (1.0 - b2) * g * g;
                    *p -= step * *m / (v.sqrt() * inv_sqrt_c2 + eps);
                }
            }
            OptimizerKind::Sgd => {
                let (wd, momentum, lr) = (s.weight_decay as f32, s.momentum as f32, lr as f32);
                let first = self.t == 1;
                for ((p, m), &g) in p.iter_mut().zip(m).zip(grad) {
                    let g = g * scale + wd * *p;
                    *m = if first { g } else { momentum * *m + g };
                    *p -= lr * *m;
                }
            }
        }
    }

    /// The state tensors with names (`adam_m.<param>`, `adam_v.<param>` or
    /// `momentum.<param>`), for checkpoints and state transfer: views of the state, so
    /// copying into them sets it. `params` are the names, in the order given to `new`.
    pub fn named_state(&self, params: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
        let view = |t: &Tensor, (off, n, shape): &(i64, i64, Vec<i64>)| {
            t.narrow(0, *off, *n).view(shape.as_slice())
        };
        let mut out = Vec::new();
        for ((name, _), l) in params.iter().zip(&self.layout) {
            match self.spec.kind {
                OptimizerKind::Adamw => {
                    out.push((format!("adam_m.{name}"), view(&self.m, l)));
                    out.push((format!("adam_v.{name}"), view(&self.v, l)));
                }
                OptimizerKind::Sgd => out.push((format!("momentum.{name}"), view(&self.m, l))),
            }
        }
        out
    }
}

/// The elements of a contiguous f32 CPU tensor this module owns (the flat parameters or
/// their state).
fn f32s(t: &mut Tensor) -> &mut [f32] {
    assert!(
        t.kind() == Kind::Float && t.device() == tch::Device::Cpu && t.is_contiguous(),
        "optimizer buffers are contiguous f32 on the CPU"
    );
    let n = t.numel();
    if n == 0 {
        return &mut [];
    }
    // SAFETY: the tensor is a contiguous f32 CPU buffer of `n` elements, allocated by
    // `Optimizer::new` and owned by the optimizer; the trainer thread that calls `step` is
    // the only one running libtorch operations on it, and the returned slice's lifetime is
    // tied to the `&mut` borrow of the tensor handle, so no other Rust slice aliases it.
    unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut f32, n) }
}

/// Σ x² in f64, in eight independent lanes (so it vectorises; the order of summation is
/// fixed, so every member gets the same result from the same numbers).
pub fn sum_squares(xs: &[f32]) -> f64 {
    let mut lanes = [0f64; 8];
    let chunks = xs.chunks_exact(8);
    let rest = chunks.remainder();
    for c in chunks {
        for (l, &x) in lanes.iter_mut().zip(c) {
            *l += f64::from(x) * f64::from(x);
        }
    }
    let tail: f64 = rest.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
    lanes.iter().sum::<f64>() + tail
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One AdamW step on f(p) = p² from p = 1 matches the closed form.
    #[test]
    fn adamw_matches_reference_step() {
        let spec = OptimizerSpec {
            weight_decay: 0.1,
            ..Default::default()
        };
        let p = Tensor::from_slice(&[1.0f32]);
        let params = vec![("p".to_string(), p.shallow_clone())];
        let mut o = Optimizer::new(&spec, &params).unwrap();
        o.step(&[2.0f32], 1.0, 0.1);
        // decay: 1 - 0.1*0.1 = 0.99; m̂ = 2, v̂ = 4 → step = 0.1 * 2 / (2 + 1e-8)
        let want = 0.99 - 0.1 * 2.0 / (2.0 + 1e-8);
        assert!((p.double_value(&[]) - want).abs() < 1e-6);
    }

    /// SGD with momentum and weight decay, on a gradient passed pre-scaled (×4, scale ¼):
    /// PyTorch's rule `g += wd·p; buf = μ·buf + g; p -= lr·buf`, worked by hand.
    #[test]
    fn sgd_momentum_accumulates() {
        let spec = OptimizerSpec {
            kind: OptimizerKind::Sgd,
            weight_decay: 0.1,
            momentum: 0.5,
            ..Default::default()
        };
        let p = Tensor::from_slice(&[1.0f32]);
        let params = vec![("p".to_string(), p.shallow_clone())];
        let mut o = Optimizer::new(&spec, &params).unwrap();
        // g = 1 + 0.1·1 = 1.1; buf = 1.1; p = 1 − 1.1 = −0.1
        o.step(&[4.0f32], 0.25, 1.0);
        assert!((p.double_value(&[]) + 0.1).abs() < 1e-6);
        // g = 1 + 0.1·(−0.1) = 0.99; buf = 0.55 + 0.99 = 1.54; p = −0.1 − 1.54 = −1.64
        o.step(&[4.0f32], 0.25, 1.0);
        assert!((p.double_value(&[]) + 1.64).abs() < 1e-6);
    }

    #[test]
    fn sum_squares_matches_the_plain_sum() {
        let xs: Vec<f32> = (0..1003).map(|i| (i as f32 * 0.37).sin()).collect();
        let plain: f64 = xs.iter().map(|&x| f64::from(x).powi(2)).sum();
        assert!((sum_squares(&xs) - plain).abs() < 1e-9 * plain);
        assert_eq!(sum_squares(&[]), 0.0);
        assert_eq!(sum_squares(&[3.0]), 9.0);
    }

    /// Three AdamW steps on two parameters of different shapes, through the flat buffer,
    /// equal the textbook per-parameter update written out in f64; a model holding the
    /// parameters sees the updates (their data is the buffer); the named state is the
    /// moments, and copying into it sets them.
    #[test]
    fn the_flat_update_equals_the_per_parameter_update() {
        let spec = OptimizerSpec {
            weight_decay: 0.01,
            ..Default::default()
        };
        let a = Tensor::from_slice(&[0.5f32, -1.0, 2.0, 0.25]).view([2, 2]);
        let b = Tensor::from_slice(&[3.0f32, -0.5, 1.5]);
        let params = vec![
            ("a".to_string(), a.shallow_clone()),
            ("b".to_string(), b.shallow_clone()),
        ];
        let mut o = Optimizer::new(&spec, &params).unwrap();
        let mut p = vec![0.5f64, -1.0, 2.0, 0.25, 3.0, -0.5, 1.5];
        let (mut m, mut v) = (vec![0f64; 7], vec![0f64; 7]);
        let (b1, b2, eps, lr, wd) = (spec.betas[0], spec.betas[1], spec.eps, 0.01, 0.01);
        for t in 1..=3 {
            let g: Vec<f64> = p
                .iter()
                .enumerate()
                .map(|(i, x)| x * (i as f64 + 1.0) - 0.3)
                .collect();
            // Passed summed over 8 members, with the scale that makes it the mean.
            let g32: Vec<f32> = g.iter().map(|&x| (8.0 * x) as f32).collect();
            o.step(&g32, 0.125, lr);
            for i in 0..7 {
                p[i] *= 1.0 - lr * wd;
                m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                let mh = m[i] / (1.0 - b1.powi(t));
                let vh = v[i] / (1.0 - b2.powi(t));
                p[i] -= lr * mh / (vh.sqrt() + eps);
            }
        }
        let got: Vec<f64> = [a.view([-1]), b.shallow_clone()]
            .iter()
            .flat_map(|t| Vec::<f32>::try_from(t).unwrap())
            .map(f64::from)
            .collect();
        for (x, y) in got.iter().zip(&p) {
            assert!((x - y).abs() < 1e-5, "{got:?} vs {p:?}");
        }
        let state = o.named_state(&params);
        let names: Vec<&str> = state.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["adam_m.a", "adam_v.a", "adam_m.b", "adam_v.b"]);
        assert_eq!(state[0].1.size(), [2, 2]);
        let m_b: Vec<f32> = Vec::try_from(&state[2].1).unwrap();
        for (x, y) in m_b.iter().zip(&m[4..]) {
            assert!((f64::from(*x) - y).abs() < 1e-5);
        }
        state[3]
            .1
            .shallow_clone()
            .copy_(&Tensor::from_slice(&[7.0f32, 8.0, 9.0]));
        let v_b: Vec<f32> = Vec::try_from(&o.named_state(&params)[3].1).unwrap();
        assert_eq!(v_b, [7.0, 8.0, 9.0]);
    }

    /// Tied parameters are refused rather than silently untied.
    #[test]
    fn tied_parameters_are_refused() {
        let w = Tensor::from_slice(&[1.0f32, 2.0]);
        let params = vec![
            ("x".to_string(), w.shallow_clone()),
            ("y".to_string(), w.shallow_clone()),
        ];
        let e = Optimizer::new(&OptimizerSpec::default(), &params)
            .err()
            .expect("refused");
        assert!(matches!(e, OptimError::Tied(..)), "{e}");
    }
}
