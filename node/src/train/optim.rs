//! Optimizers with their state in plain tensors, so checkpoints and state transfer can
//! carry it (libtorch's C++ optimizers keep theirs out of reach).
//!
//! Same update rules as PyTorch's `AdamW` and `SGD(momentum, weight_decay)`; weight decay
//! applies to every parameter.

use super::job::{OptimizerKind, OptimizerSpec};
use tch::Tensor;

/// An optimizer and its per-parameter state.
pub struct Optimizer {
    spec: OptimizerSpec,
    /// AdamW: first and second moments; SGD: the momentum buffer (second unused).
    state: Vec<(Tensor, Tensor)>,
    /// Updates applied so far (AdamW bias correction).
    pub t: u64,
}

impl Optimizer {
    /// Fresh state for `params`.
    pub fn new(spec: &OptimizerSpec, params: &[(String, Tensor)]) -> Optimizer {
        let state = params
            .iter()
            .map(|(_, p)| (p.zeros_like(), p.zeros_like()))
            .collect();
        Optimizer {
            spec: spec.clone(),
            state,
            t: 0,
        }
    }

    /// Applies one update with learning rate `lr`; `grads[i]` is the gradient of
    /// `params[i]`.
    pub fn step(&mut self, params: &[(String, Tensor)], grads: &[Tensor], lr: f64) {
        let _guard = tch::no_grad_guard();
        self.t += 1;
        let s = &self.spec;
        for (((_, p), g), (m, v)) in params.iter().zip(grads).zip(self.state.iter_mut()) {
            let mut p = p.shallow_clone();
            match s.kind {
                OptimizerKind::Adamw => {
                    let (b1, b2) = (s.betas[0], s.betas[1]);
                    if s.weight_decay > 0.0 {
                        let _ = p.g_mul_scalar_(1.0 - lr * s.weight_decay);
                    }
                    let _ = m.g_mul_scalar_(b1);
                    let _ = m.g_add_(&(g * (1.0 - b1)));
                    let _ = v.g_mul_scalar_(b2);
                    let _ = v.g_add_(&(g * g * (1.0 - b2)));
                    let c1 = 1.0 - b1.powi(self.t as i32);
                    let c2 = 1.0 - b2.powi(self.t as i32);
                    let denom = (&*v / c2).sqrt() + s.eps;
                    let _ = p.g_sub_(&((&*m / denom) * (lr / c1)));
                }
                OptimizerKind::Sgd => {
                    let g = if s.weight_decay > 0.0 {
                        g + &p * s.weight_decay
                    } else {
                        g.shallow_clone()
                    };
                    if self.t == 1 {
                        m.copy_(&g);
                    } else {
                        let _ = m.g_mul_scalar_(s.momentum);
                        let _ = m.g_add_(&g);
                    }
                    let _ = p.g_sub_(&(&*m * lr));
                }
            }
        }
    }

    /// The state tensors with names (`adam_m.<param>`, `adam_v.<param>` or
    /// `momentum.<param>`), for checkpoints and state transfer.
    pub fn named_state(&self, params: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for ((name, _), (m, v)) in params.iter().zip(&self.state) {
            match self.spec.kind {
                OptimizerKind::Adamw => {
                    out.push((format!("adam_m.{name}"), m.shallow_clone()));
                    out.push((format!("adam_v.{name}"), v.shallow_clone()));
                }
                OptimizerKind::Sgd => out.push((format!("momentum.{name}"), m.shallow_clone())),
            }
        }
        out
    }
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
        let mut o = Optimizer::new(&spec, &params);
        let g = Tensor::from_slice(&[2.0f32]);
        o.step(&params, &[g], 0.1);
        // decay: 1 - 0.1*0.1 = 0.99; m̂ = 2, v̂ = 4 → step = 0.1 * 2 / (2 + 1e-8)
        let want = 0.99 - 0.1 * 2.0 / (2.0 + 1e-8);
        assert!((p.double_value(&[]) - want).abs() < 1e-6);
    }

    #[test]
    fn sgd_momentum_accumulates() {
        let spec = OptimizerSpec {
            kind: OptimizerKind::Sgd,
            weight_decay: 0.0,
            momentum: 0.5,
            ..Default::default()
        };
        let p = Tensor::from_slice(&[0.0f32]);
        let params = vec![("p".to_string(), p.shallow_clone())];
        let mut o = Optimizer::new(&spec, &params);
        o.step(&params, &[Tensor::from_slice(&[1.0f32])], 1.0);
        o.step(&params, &[Tensor::from_slice(&[1.0f32])], 1.0);
        // buf: 1 then 1.5 → p = -2.5
        assert!((p.double_value(&[]) + 2.5).abs() < 1e-6);
    }
}
