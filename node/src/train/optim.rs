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
    /// A parameter is not f32 or bf16, or not of the first parameter's kind and device.
    #[error(
        "parameter `{0}` is {1}; every parameter must be f32 (or every one bf16) on one device"
    )]
    Kind(String, String),
}

/// An optimizer and its state.
///
/// The f32 master weights live in one contiguous buffer on the parameters' device, and the
/// state in buffers of the same layout, so an update is a dozen whole-buffer operations
/// instead of a dozen per parameter: the update's cost is the memory traffic, not the
/// per-operation overhead. Under f32 the parameters' data become views of the buffer (as
/// FSDP's flat parameters do); under bf16 (mixed precision) the parameters stay bf16 and are
/// refreshed from the master weights after every update ([`Optimizer::refresh`]).
///
/// On the CPU the update is one fused pass in Rust over the buffers (each element read and
/// written once, as PyTorch's fused AdamW); on other devices it is the same formulas as
/// whole-buffer tensor operations ([`Optimizer::step_tensor`], which runs on the CPU too
/// and is tested against the same reference).
pub struct Optimizer {
    spec: OptimizerSpec,
    /// The f32 master weights: every parameter, in the order given to [`Optimizer::new`]
    /// (that of the flat gradient [`Optimizer::step`] takes).
    flat: Tensor,
    /// AdamW: first moments; SGD: the momentum buffer.
    m: Tensor,
    /// AdamW: second moments (SGD: empty).
    v: Tensor,
    /// Each parameter's offset, length and shape in the buffers.
    layout: Vec<(i64, i64, Vec<i64>)>,
    /// Mixed precision: the (bf16) parameters, refreshed from the master weights after
    /// every update. Empty under f32, where the parameters are views of `flat`.
    shadows: Vec<Tensor>,
    /// Updates applied so far (AdamW bias correction).
    pub t: u64,
}

impl Optimizer {
    /// Fresh state for `params` (all f32, or all bf16, on one device); their values become
    /// the master weights.
    pub fn new(spec: &OptimizerSpec, params: &[(String, Tensor)]) -> Result<Optimizer, OptimError> {
        let _guard = tch::no_grad_guard();
        let (kind, device) = params
            .first()
            .map_or((Kind::Float, tch::Device::Cpu), |(_, p)| {
                (p.kind(), p.device())
            });
        let mut seen: Vec<(usize, &str)> = Vec::new();
        for (name, p) in params {
            if !matches!(p.kind(), Kind::Float | Kind::BFloat16)
                || p.kind() != kind
                || p.device() != device
            {
                let what = format!("{:?} on {}", p.kind(), crate::device::name(p.device()));
                return Err(OptimError::Kind(name.clone(), what));
            }
            let ptr = p.data_ptr() as usize;
            if let Some((_, other)) = seen.iter().find(|(q, _)| *q == ptr) {
                return Err(OptimError::Tied(other.to_string(), name.clone()));
            }
            seen.push((ptr, name));
        }
        let numel: i64 = params.iter().map(|(_, p)| p.numel() as i64).sum();
        let flat = Tensor::zeros([numel], (Kind::Float, device));
        let mut layout = Vec::with_capacity(params.len());
        let mut shadows = Vec::new();
        let mut off = 0i64;
        for (_, p) in params {
            let n = p.numel() as i64;
            let shape = p.size();
            let mut view = flat.narrow(0, off, n).view(shape.as_slice());
            view.copy_(p);
            if kind == Kind::Float {
                p.shallow_clone().set_data(&view);
            } else {
                shadows.push(p.shallow_clone());
            }
            layout.push((off, n, shape));
            off += n;
        }
        let m = flat.zeros_like();
        let v = match spec.kind {
            OptimizerKind::Adamw => flat.zeros_like(),
            OptimizerKind::Sgd => Tensor::zeros([0], (Kind::Float, device)),
        };
        Ok(Optimizer {
            spec: spec.clone(),
            flat,
            m,
            v,
            layout,
            shadows,
            t: 0,
        })
    }

    /// Applies one update with learning rate `lr` to the gradient `scale × grad`; `grad` is
    /// the flat gradient in host memory (every parameter's, in order; the summed gradient,
    /// `scale` its normalisation and clipping). On the CPU: one fused pass over the
    /// buffers; elsewhere the gradient is copied to the device once and
    /// [`step_tensor`](Self::step_tensor) applies it.
    pub fn step(&mut self, grad: &[f32], scale: f32, lr: f64) {
        assert_eq!(
            grad.len() as i64,
            self.flat.numel() as i64,
            "the gradient covers every parameter"
        );
        if self.flat.device() != tch::Device::Cpu {
            let g = Tensor::from_slice(grad).to_device(self.flat.device());
            return self.step_tensor(&g, scale, lr);
        }
        self.t += 1;
        let s = &self.spec;
        let p = f32s(&mut self.flat);
        let m = f32s(&mut self.m);
        let decay = (1.0 - lr * s.weight_decay) as f32;
        match s.kind {
            OptimizerKind::Adamw => {
                // PyTorch's AdamW, in its order of operations.
                let (step, inv_sqrt_c2) = adam_corrections(s, self.t, lr);
                let (b1, b2, eps) = (s.betas[0] as f32, s.betas[1] as f32, s.eps as f32);
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
        self.refresh();
    }

    /// [`step`](Self::step) with the flat gradient as a tensor on the buffers' device:
    /// the same formulas as whole-buffer tensor operations (any device).
    pub fn step_tensor(&mut self, grad: &Tensor, scale: f32, lr: f64) {
        let _guard = tch::no_grad_guard();
        self.t += 1;
        let s = &self.spec;
        let g = grad.to_kind(Kind::Float) * f64::from(scale);
        let decay = 1.0 - lr * s.weight_decay;
        match s.kind {
            OptimizerKind::Adamw => {
                let (step, inv_sqrt_c2) = adam_corrections(s, self.t, lr);
                let (b1, b2) = (s.betas[0], s.betas[1]);
                let _ = self.flat.g_mul_scalar_(decay);
                let _ = self.m.lerp_(&g, 1.0 - b1);
                let _ = self.v.g_mul_scalar_(b2);
                let _ = self.v.g_add_(&(&g * &g * (1.0 - b2)));
                let denom = self.v.sqrt() * f64::from(inv_sqrt_c2) + s.eps;
                let _ = self.flat.g_sub_(&(&self.m / denom * f64::from(step)));
            }
            OptimizerKind::Sgd => {
                let g = g + &self.flat * s.weight_decay;
                if self.t == 1 {
                    self.m.copy_(&g);
                } else {
                    let _ = self.m.g_mul_scalar_(s.momentum);
                    let _ = self.m.g_add_(&g);
                }
                let _ = self.flat.g_sub_(&(&self.m * lr));
            }
        }
        self.refresh();
    }

    /// Mixed precision: copies the master weights into the (bf16) parameters. Called after
    /// every update, and by whoever writes the master weights directly (state transfer, a
    /// resumed checkpoint). Nothing to do under f32.
    pub fn refresh(&mut self) {
        let _guard = tch::no_grad_guard();
        for (p, (off, n, shape)) in self.shadows.iter_mut().zip(&self.layout) {
            p.copy_(&self.flat.narrow(0, *off, *n).view(shape.as_slice()));
        }
    }

    /// The f32 master weights by the parameters' names (`params`, in the order given to
    /// `new`): views, so copying into them sets them (then [`refresh`](Self::refresh)).
    pub fn named_params(&self, params: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
        params
            .iter()
            .zip(&self.layout)
            .map(|((name, _), l)| (name.clone(), view(&self.flat, l)))
            .collect()
    }

    /// Elements of the master weights (every parameter's).
    pub fn numel(&self) -> usize {
        self.flat.numel()
    }

    /// Copies the f32 master weights, flat in parameter order, into `out` (one copy to
    /// the host wherever they are; `out` holds [`numel`](Self::numel) elements).
    pub fn read_master(&self, out: &mut [f32]) {
        self.flat.copy_data(out, out.len());
    }

    /// Sets the f32 master weights from `src` (flat, in parameter order), then the
    /// parameters ([`refresh`](Self::refresh)).
    pub fn write_master(&mut self, src: &[f32]) {
        let _guard = tch::no_grad_guard();
        let t = Tensor::from_slice(src).to_device(self.flat.device());
        self.flat.copy_(&t);
        self.refresh();
    }

    /// A copy of the state buffers (moments, momentum) and the update count, for
    /// [`restore_state`](Self::restore_state).
    pub fn snapshot_state(&self) -> (Vec<Tensor>, u64) {
        let _guard = tch::no_grad_guard();
        (vec![self.m.copy(), self.v.copy()], self.t)
    }

    /// Puts back state taken by [`snapshot_state`](Self::snapshot_state).
    pub fn restore_state(&mut self, (saved, t): &(Vec<Tensor>, u64)) {
        let _guard = tch::no_grad_guard();
        self.m.copy_(&saved[0]);
        self.v.copy_(&saved[1]);
        self.t = *t;
    }

    /// The state tensors with names (`adam_m.<param>`, `adam_v.<param>` or
    /// `momentum.<param>`), for checkpoints and state transfer: views of the state, so
    /// copying into them sets it. `params` are the names, in the order given to `new`.
    pub fn named_state(&self, params: &[(String, Tensor)]) -> Vec<(String, Tensor)> {
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

/// A parameter's view of a flat buffer.
fn view(t: &Tensor, (off, n, shape): &(i64, i64, Vec<i64>)) -> Tensor {
    t.narrow(0, *off, *n).view(shape.as_slice())
}

/// AdamW's bias corrections at update `t`: the step size `lr / (1 - β1^t)` and
/// `1 / sqrt(1 - β2^t)`.
fn adam_corrections(s: &OptimizerSpec, t: u64, lr: f64) -> (f32, f32) {
    let c1 = 1.0 - s.betas[0].powi(t as i32);
    let c2 = 1.0 - s.betas[1].powi(t as i32);
    ((lr / c1) as f32, (1.0 / c2.sqrt()) as f32)
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

/// The factor that turns a gradient summed over `samples` samples into their mean,
/// clipped to global norm `clip` (0: no clipping); `sum_squares` gives Σ g² of the sum (only
/// called when clipping).
pub fn mean_scale(samples: f64, clip: f64, sum_squares: impl FnOnce() -> f64) -> f64 {
    let scale = 1.0 / samples;
    if clip > 0.0 {
        let norm = sum_squares().sqrt() * scale;
        if norm > clip {
            return scale * clip / norm;
        }
    }
    scale
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
        for tensors in [false, true] {
            let p = Tensor::from_slice(&[1.0f32]);
            let params = vec![("p".to_string(), p.shallow_clone())];
            let mut o = Optimizer::new(&spec, &params).unwrap();
            // g = 1 + 0.1·1 = 1.1; buf = 1.1; p = 1 − 1.1 = −0.1
            step(&mut o, &[4.0f32], 0.25, 1.0, tensors);
            assert!(
                (p.double_value(&[]) + 0.1).abs() < 1e-6,
                "tensors: {tensors}"
            );
            // g = 1 + 0.1·(−0.1) = 0.99; buf = 0.55 + 0.99 = 1.54; p = −0.1 − 1.54 = −1.64
            step(&mut o, &[4.0f32], 0.25, 1.0, tensors);
            assert!(
                (p.double_value(&[]) + 1.64).abs() < 1e-6,
                "tensors: {tensors}"
            );
        }
    }

    /// The host update (fused Rust pass on the CPU) or the tensor update (every other
    /// device), both run here.
    fn step(o: &mut Optimizer, g: &[f32], scale: f32, lr: f64, tensors: bool) {
        if tensors {
            o.step_tensor(&Tensor::from_slice(g), scale, lr)
        } else {
            o.step(g, scale, lr)
        }
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
        for tensors in [false, true] {
            flat_update_equals_per_parameter_update(tensors);
        }
    }

    fn flat_update_equals_per_parameter_update(tensors: bool) {
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
            step(&mut o, &g32, 0.125, lr, tensors);
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
            assert!((x - y).abs() < 1e-5, "tensors {tensors}: {got:?} vs {p:?}");
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

    /// Mixed precision: bf16 parameters, f32 master weights. The update lands in the master
    /// weights at f32 accuracy (a step far below bf16's resolution at 1.0 still counts),
    /// and the parameters are the master weights rounded to bf16 after each update.
    #[test]
    fn bf16_parameters_follow_f32_master_weights() {
        let spec = OptimizerSpec {
            kind: OptimizerKind::Sgd,
            weight_decay: 0.0,
            momentum: 0.0,
            ..Default::default()
        };
        for tensors in [false, true] {
            let p = Tensor::from_slice(&[1.0f32, -2.0]).to_kind(Kind::BFloat16);
            let params = vec![("p".to_string(), p.shallow_clone())];
            let mut o = Optimizer::new(&spec, &params).unwrap();
            // 100 steps of 1e-4: bf16 alone could not move 1.0 by 1e-4 (its spacing there
            // is 2^-7), the f32 master moves by 0.01.
            for _ in 0..100 {
                step(&mut o, &[1.0f32, 1.0], 1.0, 1e-4, tensors);
            }
            let master: Vec<f32> = Vec::try_from(&o.named_params(&params)[0].1).unwrap();
            assert!((master[0] - 0.99).abs() < 1e-4, "{master:?}");
            assert!((master[1] + 2.01).abs() < 1e-4, "{master:?}");
            assert_eq!(p.kind(), Kind::BFloat16);
            let want = Tensor::from_slice(&master).to_kind(Kind::BFloat16);
            assert!(p.equal(&want), "tensors {tensors}: {p} vs {want}");
        }
        let mixed = vec![
            ("a".to_string(), Tensor::from_slice(&[1.0f32])),
            (
                "b".to_string(),
                Tensor::from_slice(&[1.0f32]).to_kind(Kind::BFloat16),
            ),
        ];
        let e = Optimizer::new(&spec, &mixed).err().expect("refused");
        assert!(matches!(e, OptimError::Kind(ref n, _) if n == "b"), "{e}");
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
