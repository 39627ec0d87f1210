//! The model a training job trains: a network from [`crate::models`] (the built-in `mlp`
//! or `gpt`, or a TorchScript module) with its `VarStore`, and the loss of the job's task.
//!
//! Every model maps a batch to logits; [`Model::loss_sum`] turns logits into the **sum**
//! over samples of each sample's mean loss, so gradients from members with different
//! shares add up to the gradient of the global batch once divided by its size.

use super::data::{Batch, Task};
use super::job::{JobSpec, ModelKind};
use crate::device::Precision;
use crate::models::gpt::GptConfig;
pub use crate::models::hf::staged::Stage;
use crate::models::{Architecture, Network};
use tch::{nn, Kind, Tensor};

pub use crate::models::ModelError;

/// Byte vocabulary of the `gpt`.
pub const VOCAB: i64 = crate::models::gpt::VOCAB as i64;

/// A model with its parameters, on its device, computing in its precision.
pub struct Model {
    /// The parameters.
    pub vs: nn::VarStore,
    net: Network,
    task: Task,
    /// The kind the network computes in (its floating-point parameters' kind).
    kind: Kind,
}

/// The architecture `job` asks for, checked against the data's `task`.
fn architecture(job: &JobSpec, task: Task) -> Result<Architecture, ModelError> {
    let m = &job.model;
    Ok(match job.model_kind() {
        ModelKind::Mlp => {
            let Task::Classify { features, classes } = task else {
                return Err(ModelError::Shape("mlp needs classification data".into()));
            };
            let mut dims = vec![features as i64];
            dims.extend(&m.hidden);
            dims.push(classes as i64);
            Architecture::Mlp { dims }
        }
        ModelKind::Gpt => {
            let Task::Lm { len, .. } = task else {
                return Err(ModelError::Shape("gpt needs text data".into()));
            };
            if len as i64 > m.gpt_context() {
                return Err(ModelError::Shape(format!(
                    "samples of {len} tokens exceed model.context {}",
                    m.gpt_context()
                )));
            }
            Architecture::Gpt(GptConfig {
                layers: m.layers,
                heads: m.heads,
                width: m.width,
                context: m.gpt_context(),
            })
        }
        ModelKind::Torchscript => {
            Architecture::TorchScript(m.torchscript.clone().expect("validated"))
        }
        ModelKind::Hf => {
            if !matches!(task, Task::Lm { .. }) {
                return Err(ModelError::Shape(
                    "an hf model needs language-model data".into(),
                ));
            }
            let lora = m
                .lora
                .as_ref()
                .map(|l| crate::models::hf::train::LoraConfig {
                    rank: l.rank,
                    alpha: l.alpha,
                    targets: l.targets.clone(),
                });
            Architecture::Hf(Box::new(crate::models::hf::train::HfTrain {
                dir: m.hf.clone().expect("validated"),
                random: m.init == super::job::HfInit::Random,
                context: m.context,
                lora,
            }))
        }
    })
}

impl Model {
    /// Builds the job's model for `task`, initialised from `seed`, on `device`, computing
    /// in `precision`. The weights are drawn on the CPU and then moved, so every device
    /// starts from the same numbers.
    pub fn build(
        job: &JobSpec,
        task: Task,
        seed: u64,
        device: tch::Device,
        precision: Precision,
    ) -> Result<Model, ModelError> {
        let arch = architecture(job, task)?;
        tch::manual_seed(seed as i64);
        let mut vs = nn::VarStore::new(tch::Device::Cpu);
        let net = Network::init(&arch, &vs.root())?;
        vs.set_device(device);
        let kind = precision.compute_kind();
        if kind == Kind::BFloat16 {
            vs.bfloat16();
        }
        let mut net = net;
        if let Network::Hf(d) = &mut net {
            d.set_kind(kind);
        }
        Ok(Model {
            vs,
            net,
            task,
            kind,
        })
    }

    /// The device the parameters live on.
    pub fn device(&self) -> tch::Device {
        self.vs.device()
    }

    /// Logits (f32, on the model's device) for inputs `x` (on that device; floating-point
    /// features are cast to the model's kind).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        let logits = if x.is_floating_point() && x.kind() != self.kind {
            self.net.forward(&x.to_kind(self.kind))?
        } else {
            self.net.forward(x)?
        };
        Ok(logits.to_kind(Kind::Float))
    }

    /// Switches dropout/batch-norm style behaviour (TorchScript modules only).
    pub fn set_train(&mut self, train: bool) {
        self.net.set_train(train)
    }

    /// Sum over the batch of each sample's mean loss, and the number of correct
    /// predictions (classification: argmax = label; LM: every counted target right). The
    /// batch is on the model's device ([`Batch::to_device`]).
    pub fn loss_sum(&self, batch: &Batch) -> Result<(Tensor, i64), ModelError> {
        let logits = self.forward(&batch.x)?;
        match self.task {
            Task::Classify { classes, .. } => {
                if logits.size() != [batch.len as i64, classes as i64] {
                    return Err(ModelError::Shape(format!(
                        "logits are {:?}, expected [{}, {classes}]",
                        logits.size(),
                        batch.len
                    )));
                }
                let loss = logits.cross_entropy_loss::<Tensor>(
                    &batch.y,
                    None,
                    tch::Reduction::Sum,
                    -100,
                    0.0,
                );
                let correct = logits
                    .argmax(-1, false)
                    .eq_tensor(&batch.y)
                    .sum(Kind::Int64)
                    .int64_value(&[]);
                Ok((loss, correct))
            }
            Task::Lm { .. } => self.lm_loss_sum(&logits, batch),
        }
    }

    /// [`Model::lm_loss`]'s loss with the samples whose every counted target is right.
    fn lm_loss_sum(&self, logits: &Tensor, batch: &Batch) -> Result<(Tensor, i64), ModelError> {
        let (loss, hit) = lm_loss(logits, batch, self.task)?;
        let correct = match &batch.mask {
            Some(mask) => (hit.logical_not().to_kind(Kind::Float) * mask)
                .sum_dim_intlist(1, false, Kind::Float)
                .eq(0.0),
            None => hit.all_dim(1, false),
        };
        Ok((loss, correct.sum(Kind::Int64).int64_value(&[])))
    }

    /// Whether [`Model::backward_staged`] stages this model's backward: a Hugging Face
    /// decoder computing in f32 on language-model data.
    pub fn stages_backward(&self) -> bool {
        matches!(self.net, Network::Hf(_))
            && self.kind == Kind::Float
            && matches!(self.task, Task::Lm { .. })
    }

    /// [`Model::loss_sum`] and its backward in stages, `done` told after each stage
    /// ([`Stage`]: the head, the blocks from the last down, the embeddings) that the
    /// gradients of its parameters are complete, so they can be sent while the backward
    /// goes on (`crate::models::hf::staged`). Only Hugging Face decoders computing in f32
    /// stage their backward; for any other model this returns `Ok(None)` having done
    /// nothing (the caller runs `loss_sum` and one backward). Returns the loss (detached)
    /// and the correct count.
    pub fn backward_staged(
        &self,
        batch: &Batch,
        done: &mut dyn FnMut(Stage),
    ) -> Result<Option<(f64, i64)>, ModelError> {
        let Network::Hf(d) = &self.net else {
            return Ok(None);
        };
        if !self.stages_backward() {
            return Ok(None);
        }
        let mut correct = 0;
        let mut loss_of = |logits: &Tensor| -> Result<Tensor, ModelError> {
            let (loss, c) = self.lm_loss_sum(&logits.to_kind(Kind::Float), batch)?;
            correct = c;
            Ok(loss)
        };
        let loss = d.backward_staged(&batch.x, &mut loss_of, done)?;
        Ok(Some((loss.double_value(&[]), correct)))
    }

    /// Greedy continuation of `prompts` (`[B, P]` tokens) by `n` tokens (gpt and
    /// TorchScript LMs).
    pub fn generate(&self, prompts: &Tensor, n: usize) -> Result<Tensor, ModelError> {
        let _guard = tch::no_grad_guard();
        let mut seq = prompts.shallow_clone();
        for _ in 0..n {
            let logits = self.forward(&seq)?;
            let next = logits.select(1, -1).argmax(-1, true);
            seq = Tensor::cat(&[seq, next], 1);
        }
        let p = prompts.size()[1];
        Ok(seq.narrow(1, p, n as i64))
    }

    /// Trainable parameters, sorted by name (the order every member flattens them in).
    pub fn params(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> = self
            .vs
            .variables()
            .into_iter()
            .filter(|(_, t)| t.requires_grad())
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Number of trainable scalars.
    pub fn numel(&self) -> usize {
        self.params().iter().map(|(_, t)| t.numel()).sum()
    }
}

/// A language model's loss on one batch from its `logits` (`[B, T, V]`, `V` the `task`'s
/// vocabulary): the **sum** over samples of each sample's mean loss over its counted
/// positions (all of them, or where the batch's mask is set; a sample with none counted
/// adds 0), and whether each position's argmax is its target (`[B, T]`).
pub(crate) fn lm_loss(
    logits: &Tensor,
    batch: &Batch,
    task: Task,
) -> Result<(Tensor, Tensor), ModelError> {
    let Task::Lm { vocab, .. } = task else {
        return Err(ModelError::Shape(
            "a language model's loss needs LM data".into(),
        ));
    };
    let vocab = vocab as i64;
    let b = batch.len as i64;
    let t = batch.y.size().get(1).copied().unwrap_or(0);
    if logits.size() != [b, t, vocab] {
        return Err(ModelError::Shape(format!(
            "logits are {:?}, expected [{b}, {t}, {vocab}]",
            logits.size()
        )));
    }
    let per_token = logits
        .view([b * t, vocab])
        .cross_entropy_loss::<Tensor>(
            &batch.y.view([b * t]),
            None,
            tch::Reduction::None,
            -100,
            0.0,
        )
        .view([b, t]);
    let loss = match &batch.mask {
        Some(mask) => ((&per_token * mask).sum_dim_intlist(1, false, Kind::Float)
            / mask.sum_dim_intlist(1, false, Kind::Float).clamp_min(1.0))
        .sum(Kind::Float),
        None => per_token.mean_dim(1, false, Kind::Float).sum(Kind::Float),
    };
    Ok((loss, logits.argmax(-1, false).eq_tensor(&batch.y)))
}
