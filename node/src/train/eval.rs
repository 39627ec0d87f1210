//! Held-out evaluation: each member evaluates a contiguous share of the held-out split and
//! one all-reduce sums the shares. The loss is the mean over samples of each sample's mean
//! loss (as in training); the accuracy is the fraction of what the task makes meaningful
//! ([`AccuracyOf`]): classification counts samples whose argmax is the label, arithmetic
//! counts sums whose greedily generated answer is exactly right, and text counts held-out
//! positions whose argmax is the next token.

use super::collective::{tag, StepError, TAG_EVAL};
use super::data::{Batch, Task};
use super::member::Trainer;
use super::model::{lm_loss, ModelError};
use super::report::{AccuracyOf, EvalRecord};
use super::{TrainError, REJOIN_TIMEOUT};
use coordinator_free::{ReduceOp, View};
use tch::{Kind, Tensor};

/// Retries of the final evaluation in later views.
const MAX_VIEW_RETRIES: u32 = 20;
/// Samples per forward pass during evaluation.
const EVAL_BATCH: usize = 512;

/// A language model's held-out sums over one batch from its `logits` (`[B, T, VOCAB]`)
/// and the batch's targets and mask: the **sum** over samples of each sample's mean loss
/// over its counted positions (the loss `Model::loss_sum` trains on), the positions whose
/// argmax is the target, and the positions counted (all of them, or where the mask is set).
fn lm_sums(logits: &Tensor, batch: &Batch, task: Task) -> Result<(f64, i64, i64), ModelError> {
    let (loss, hit) = lm_loss(logits, batch, task)?;
    let (hits, positions) = count_hits(&hit, batch.mask.as_ref());
    Ok((loss.double_value(&[]), hits, positions))
}

/// Next-token hits: of the positions of `targets` (`[B, T]` token ids; only where `mask`
/// (`[B, T]`, 1 or 0) is 1 when given), how many have `logits` (`[B, T, V]`) whose argmax
/// is the target, and how many positions were counted.
#[cfg(test)]
fn next_token_hits(logits: &Tensor, targets: &Tensor, mask: Option<&Tensor>) -> (i64, i64) {
    count_hits(&logits.argmax(-1, false).eq_tensor(targets), mask)
}

/// Of the positions of `hit` (`[B, T]`, whether each position's argmax is its target; only
/// where `mask` is 1 when given), how many are hits, and how many were counted.
fn count_hits(hit: &Tensor, mask: Option<&Tensor>) -> (i64, i64) {
    let hit = hit.to_kind(Kind::Float);
    let (hits, counted) = match mask {
        Some(m) => ((&hit * m).sum(Kind::Float), m.sum(Kind::Float)),
        None => (hit.sum(Kind::Float), Tensor::from(hit.numel() as f64)),
    };
    (
        hits.double_value(&[]).round() as i64,
        counted.double_value(&[]).round() as i64,
    )
}

impl Trainer {
    /// Evaluates; the last evaluation must succeed (it is retried in later views), others
    /// are skipped when the view changes under them.
    pub(super) fn evaluate_logged(
        &mut self,
        view: &View,
        first: bool,
        last: bool,
    ) -> Result<(), TrainError> {
        let mut view = view.clone();
        let mut tries = 0;
        loop {
            match self.evaluate(&view) {
                Err(StepError::Fatal(e)) => return Err(e),
                Ok(ev) => {
                    if first {
                        self.run_log()?.eval(&ev)?;
                    }
                    tracing::info!(
                        step = self.step,
                        loss = ev.loss,
                        accuracy = ev.accuracy,
                        accuracy_of = ev.accuracy_of.describe(),
                        "evaluated"
                    );
                    self.set_report(|r| r.eval = Some(ev));
                    return Ok(());
                }
                Err(StepError::Failed(e)) if last && tries < MAX_VIEW_RETRIES => {
                    tries += 1;
                    tracing::info!("final evaluation failed ({e}); retrying in the next view");
                    view = self.next_view(1, Some(view.hash), REJOIN_TIMEOUT)?;
                }
                Err(StepError::Failed(e)) => {
                    tracing::warn!("evaluation at step {} skipped: {e}", self.step);
                    return Ok(());
                }
            }
        }
    }

    /// What this job's evaluation counts as accurate.
    fn accuracy_of(&self) -> AccuracyOf {
        match self.data.task {
            Task::Classify { .. } => AccuracyOf::Label,
            Task::Lm { .. } if self.data.arithmetic.is_some() => AccuracyOf::Answer,
            Task::Lm { .. } => AccuracyOf::NextToken,
        }
    }

    /// Loss and accuracy on the held-out split, each member evaluating a contiguous share.
    fn evaluate(&mut self, view: &View) -> Result<EvalRecord, StepError> {
        let rank = view.position(&self.ctx.me).unwrap_or(0);
        let total = self.data.eval_len();
        let k = view.len();
        let (lo, hi) = (total * rank / k, total * (rank + 1) / k);
        let of = self.accuracy_of();
        // Loss sum, correct, samples, and what the accuracy divides by (samples, or
        // positions for next-token accuracy).
        let mut sums = [0f32; 4];
        self.model.set_train(false);
        {
            let _guard = tch::no_grad_guard();
            let mut i = lo;
            while i < hi {
                let j = (i + EVAL_BATCH).min(hi);
                let (loss, correct, counted) =
                    self.eval_batch(i..j, of).map_err(StepError::Fatal)?;
                sums[0] += loss as f32;
                sums[1] += correct as f32;
                sums[2] += (j - i) as f32;
                sums[3] += counted as f32;
                i = j;
            }
        }
        self.model.set_train(true);
        let dp = self.ctx.dp.clone();
        let t = tag(self.tag_base, view, TAG_EVAL, self.step, 0);
        self.collective(view, dp.all_reduce(view, t, &mut sums, ReduceOp::Sum))
            .map_err(StepError::Failed)?;
        let n = sums[2].max(1.0) as f64;
        Ok(EvalRecord {
            step: self.step,
            loss: sums[0] as f64 / n,
            accuracy: sums[1] as f64 / sums[3].max(1.0) as f64,
            accuracy_of: of,
            samples: sums[2] as u64,
        })
    }

    /// One held-out batch (`range`): its loss sum, how many of it are correct by `of`, and
    /// how many were counted.
    fn eval_batch(
        &mut self,
        range: std::ops::Range<usize>,
        of: AccuracyOf,
    ) -> Result<(f64, i64, i64), TrainError> {
        let b = self
            .data
            .eval_batch(range.clone())?
            .to_device(self.model.device());
        if of == AccuracyOf::NextToken {
            let logits = self.model.forward(&b.x)?;
            return lm_sums(&logits, &b, self.data.task).map_err(TrainError::from);
        }
        let (loss, mut correct) = self.model.loss_sum(&b)?;
        if let Some((prompts, answers)) = self.data.eval_prompts(range.clone()) {
            let fmt = self.data.arithmetic.expect("arithmetic");
            let prompts = prompts.to_device(self.model.device());
            let gen = self.model.generate(&prompts, fmt.answer)?;
            let gen: Vec<i64> = Vec::try_from(gen.reshape([-1])).unwrap_or_default();
            correct = gen
                .chunks(fmt.answer)
                .zip(&answers)
                .filter(|(g, &a)| {
                    let bytes: Vec<u8> = g.iter().map(|&t| t as u8).collect();
                    fmt.parse_answer(&bytes) == Some(a)
                })
                .count() as i64;
        }
        Ok((loss.double_value(&[]), correct, range.len() as i64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::model::VOCAB;

    /// `[1, T, V]` logits whose argmax at position `p` is `argmax[p]`.
    fn logits_with_argmax(argmax: &[i64], vocab: i64) -> Tensor {
        let t = argmax.len() as i64;
        let mut v = vec![0f32; (t * vocab) as usize];
        for (p, &a) in argmax.iter().enumerate() {
            v[p * vocab as usize + a as usize] = 5.0;
        }
        Tensor::from_slice(&v).view([1, t, vocab])
    }

    /// Hand-made logits: 3 of 4 positions predict their next token.
    #[test]
    fn next_token_accuracy_counts_positions() {
        let logits = logits_with_argmax(&[7, 2, 9, 4], 10);
        let targets = Tensor::from_slice(&[7i64, 2, 3, 4]).view([1, 4]);
        assert_eq!(next_token_hits(&logits, &targets, None), (3, 4));
        // A mask counts only its positions: the miss at position 2 is left out.
        let mask = Tensor::from_slice(&[0f32, 1.0, 0.0, 1.0]).view([1, 4]);
        assert_eq!(next_token_hits(&logits, &targets, Some(&mask)), (2, 2));
        // Two windows: positions of both add up.
        let two = Tensor::cat(&[&logits, &logits_with_argmax(&[0, 0, 0, 0], 10)], 0);
        let targets2 = Tensor::cat(
            &[&targets, &Tensor::from_slice(&[0i64, 1, 0, 1]).view([1, 4])],
            0,
        );
        assert_eq!(next_token_hits(&two, &targets2, None), (5, 8));
    }

    /// The loss computed beside the accuracy is the one `Model::loss_sum` trains on, and a
    /// window half right scores 0.5 (the old whole-window count scored it 0).
    #[test]
    fn lm_sums_match_the_training_loss() {
        use super::super::job::JobSpec;
        use super::super::model::Model;
        let job = JobSpec::parse(
            "name = \"t\"\nsteps = 1\nbatch_size = 2\n[model]\nkind = \"gpt\"\nlayers = 1\nheads = 2\nwidth = 16\ncontext = 8\n[data]\nkind = \"text\"\npath = \"x\"\n",
        )
        .unwrap();
        let task = Task::Lm {
            len: 8,
            masked: false,
            vocab: 256,
        };
        let model = Model::build(&job, task, 1, tch::Device::Cpu, Default::default()).unwrap();
        let x = Tensor::from_slice(&(0..16).map(|i| (i * 7 % 256) as i64).collect::<Vec<_>>())
            .view([2, 8]);
        let y = Tensor::from_slice(
            &(0..16)
                .map(|i| (i * 7 % 256 + 1) as i64)
                .collect::<Vec<_>>(),
        )
        .view([2, 8]);
        let mask = Tensor::from_slice(&[
            1f32, 1., 0., 0., 1., 0., 0., 0., 0., 1., 1., 1., 0., 0., 0., 1.,
        ])
        .view([2, 8]);
        for mask in [None, Some(mask)] {
            let batch = Batch {
                x: x.shallow_clone(),
                y: y.shallow_clone(),
                mask,
                len: 2,
            };
            let (want, _) = model.loss_sum(&batch).unwrap();
            let logits = model.forward(&batch.x).unwrap();
            let (loss, hits, positions) = lm_sums(&logits, &batch, task).unwrap();
            assert!(
                (loss - want.double_value(&[])).abs() < 1e-5,
                "{loss} vs {want}"
            );
            let counted = if batch.mask.is_some() { 7 } else { 16 };
            assert_eq!(positions, counted);
            assert!((0..=positions).contains(&hits));
        }
        // Logits of the wrong shape are refused, as in training.
        let batch = Batch {
            x: x.shallow_clone(),
            y: y.shallow_clone(),
            mask: None,
            len: 2,
        };
        assert!(lm_sums(
            &Tensor::zeros([2, 8, 3], (Kind::Float, tch::Device::Cpu)),
            &batch,
            task
        )
        .is_err());
        // Half the positions right: next-token accuracy 0.5.
        let half: Vec<i64> = (0..8).map(|p| if p % 2 == 0 { 1 } else { 0 }).collect();
        let logits = logits_with_argmax(&half, VOCAB);
        let targets = Tensor::ones([1, 8], (Kind::Int64, tch::Device::Cpu));
        let (hits, positions) = next_token_hits(&logits, &targets, None);
        assert_eq!(hits as f64 / positions as f64, 0.5);
    }
}
