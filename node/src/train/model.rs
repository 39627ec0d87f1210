//! Models: the built-in `mlp` and `gpt`, and TorchScript modules brought by the user.
//!
//! Every model maps a batch to logits; [`Model::loss_sum`] turns logits into the **sum**
//! over samples of each sample's mean loss, so gradients from members with different
//! shares add up to the gradient of the global batch once divided by its size.
//!
//! The `gpt` is a pre-norm decoder over bytes (vocabulary 256): token and position
//! embeddings; `layers` blocks of causal self-attention (`qkv`, `proj`) and a GELU MLP
//! (`fc` 4×, `fc2`); a final LayerNorm and an unbiased `head`. Linear weights and
//! embeddings start from N(0, 0.02), biases at zero (`scripts/ddp_train.py` builds the same
//! shapes in PyTorch for the benchmark).

use super::data::{Batch, Task};
use super::job::{JobSpec, ModelKind};
use tch::nn::{self, Module};
use tch::{Kind, Tensor};

/// Byte vocabulary of the `gpt`.
pub const VOCAB: i64 = 256;

/// Why a model could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The TorchScript file could not be loaded.
    #[error("cannot load TorchScript module {path}: {reason}")]
    TorchScript {
        /// The file.
        path: String,
        /// libtorch's message.
        reason: String,
    },
    /// The model does not fit the data (e.g. its output is not `[B, classes]`).
    #[error("model does not fit the data: {0}")]
    Shape(String),
}

struct Block {
    ln1: nn::LayerNorm,
    qkv: nn::Linear,
    proj: nn::Linear,
    ln2: nn::LayerNorm,
    fc: nn::Linear,
    fc2: nn::Linear,
}

struct Gpt {
    tok: nn::Embedding,
    pos: nn::Embedding,
    blocks: Vec<Block>,
    ln_f: nn::LayerNorm,
    head: nn::Linear,
    heads: i64,
}

enum Net {
    Mlp(Vec<nn::Linear>),
    Gpt(Box<Gpt>),
    Script(tch::TrainableCModule),
}

/// A model with its parameters.
pub struct Model {
    /// The parameters.
    pub vs: nn::VarStore,
    net: Net,
    task: Task,
}

fn linear(p: nn::Path, i: i64, o: i64, bias: bool) -> nn::Linear {
    nn::linear(
        p,
        i,
        o,
        nn::LinearConfig {
            ws_init: nn::Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
            bs_init: Some(nn::Init::Const(0.0)),
            bias,
        },
    )
}

impl Gpt {
    fn new(p: &nn::Path, layers: i64, heads: i64, width: i64, context: i64) -> Gpt {
        let emb = nn::EmbeddingConfig {
            ws_init: nn::Init::Randn {
                mean: 0.0,
                stdev: 0.02,
            },
            ..Default::default()
        };
        let blocks = (0..layers)
            .map(|l| {
                let b = p / "blocks" / l;
                Block {
                    ln1: nn::layer_norm(&b / "ln1", vec![width], Default::default()),
                    qkv: linear(&b / "qkv", width, 3 * width, true),
                    proj: linear(&b / "proj", width, width, true),
                    ln2: nn::layer_norm(&b / "ln2", vec![width], Default::default()),
                    fc: linear(&b / "fc", width, 4 * width, true),
                    fc2: linear(&b / "fc2", 4 * width, width, true),
                }
            })
            .collect();
        Gpt {
            tok: nn::embedding(p / "tok", VOCAB, width, emb),
            pos: nn::embedding(p / "pos", context, width, emb),
            blocks,
            ln_f: nn::layer_norm(p / "ln_f", vec![width], Default::default()),
            head: linear(p / "head", width, VOCAB, false),
            heads,
        }
    }

    fn forward(&self, idx: &Tensor) -> Tensor {
        let (b, t) = idx.size2().expect("[B, T] tokens");
        let pos = Tensor::arange(t, (Kind::Int64, idx.device()));
        let mut x = self.tok.forward(idx) + self.pos.forward(&pos);
        let d = x.size()[2];
        let hd = d / self.heads;
        for blk in &self.blocks {
            let qkv = blk.qkv.forward(&blk.ln1.forward(&x));
            let parts = qkv.split(d, 2);
            let shape = |t: &Tensor| t.view([b, -1, self.heads, hd]).transpose(1, 2);
            let a = Tensor::scaled_dot_product_attention::<Tensor>(
                &shape(&parts[0]),
                &shape(&parts[1]),
                &shape(&parts[2]),
                None,
                0.0,
                true,
                None,
                false,
            );
            let a = a.transpose(1, 2).contiguous().view([b, t, d]);
            // Not `+=`: that is an in-place add, and autograd needs the old `x`.
            let h = &x + blk.proj.forward(&a);
            x = h;
            let h = blk.fc.forward(&blk.ln2.forward(&x)).gelu("none");
            let y = &x + blk.fc2.forward(&h);
            x = y;
        }
        self.head.forward(&self.ln_f.forward(&x))
    }
}

impl Model {
    /// Builds the job's model for `task`, initialised from `seed`.
    pub fn build(job: &JobSpec, task: Task, seed: u64) -> Result<Model, ModelError> {
        tch::manual_seed(seed as i64);
        let vs = nn::VarStore::new(tch::Device::Cpu);
        let root = vs.root();
        let m = &job.model;
        let net = match job.model_kind() {
            ModelKind::Mlp => {
                let Task::Classify { features, classes } = task else {
                    return Err(ModelError::Shape("mlp needs classification data".into()));
                };
                let mut dims = vec![features as i64];
                dims.extend(&m.hidden);
                dims.push(classes as i64);
                let layers = dims
                    .windows(2)
                    .enumerate()
                    .map(|(i, w)| {
                        nn::linear(&root / format!("fc{i}"), w[0], w[1], Default::default())
                    })
                    .collect();
                Net::Mlp(layers)
            }
            ModelKind::Gpt => {
                let Task::Lm { len, .. } = task else {
                    return Err(ModelError::Shape("gpt needs text data".into()));
                };
                if len as i64 > m.context {
                    return Err(ModelError::Shape(format!(
                        "samples of {len} tokens exceed model.context {}",
                        m.context
                    )));
                }
                Net::Gpt(Box::new(Gpt::new(
                    &root, m.layers, m.heads, m.width, m.context,
                )))
            }
            ModelKind::Torchscript => {
                let path = m.torchscript.as_deref().expect("validated");
                let module = tch::TrainableCModule::load(path, root.clone()).map_err(|e| {
                    ModelError::TorchScript {
                        path: path.display().to_string(),
                        reason: e.to_string(),
                    }
                })?;
                Net::Script(module)
            }
        };
        Ok(Model { vs, net, task })
    }

    /// Logits for inputs `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        match &self.net {
            Net::Mlp(layers) => {
                let mut h = x.shallow_clone();
                for (i, l) in layers.iter().enumerate() {
                    h = l.forward(&h);
                    if i + 1 < layers.len() {
                        h = h.relu();
                    }
                }
                Ok(h)
            }
            Net::Gpt(g) => Ok(g.forward(x)),
            Net::Script(s) => s
                .forward_ts(&[x])
                .map_err(|e| ModelError::Shape(format!("forward failed: {e}"))),
        }
    }

    /// Switches dropout/batch-norm style behaviour (TorchScript modules only).
    pub fn set_train(&mut self, train: bool) {
        if let Net::Script(s) = &mut self.net {
            if train {
                s.set_train()
            } else {
                s.set_eval()
            }
        }
    }

    /// Sum over the batch of each sample's mean loss, and the number of correct
    /// predictions (classification: argmax = label; LM: every counted target right).
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
            Task::Lm { len, .. } => {
                let (b, t) = (batch.len as i64, len as i64);
                if logits.size() != [b, t, VOCAB] {
                    return Err(ModelError::Shape(format!(
                        "logits are {:?}, expected [{b}, {t}, {VOCAB}]",
                        logits.size()
                    )));
                }
                let per_token = logits
                    .view([b * t, VOCAB])
                    .cross_entropy_loss::<Tensor>(
                        &batch.y.view([b * t]),
                        None,
                        tch::Reduction::None,
                        -100,
                        0.0,
                    )
                    .view([b, t]);
                let hit = logits.argmax(-1, false).eq_tensor(&batch.y);
                let (loss, correct) =
                    match &batch.mask {
                        Some(mask) => {
                            let per_sample =
                                (&per_token * mask).sum_dim_intlist(1, false, Kind::Float)
                                    / mask.sum_dim_intlist(1, false, Kind::Float);
                            let miss = (hit.logical_not().to_kind(Kind::Float) * mask)
                                .sum_dim_intlist(1, false, Kind::Float);
                            (per_sample.sum(Kind::Float), miss.eq(0.0))
                        }
                        None => (
                            per_token.mean_dim(1, false, Kind::Float).sum(Kind::Float),
                            hit.all_dim(1, false),
                        ),
                    };
                Ok((loss, correct.sum(Kind::Int64).int64_value(&[])))
            }
        }
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
