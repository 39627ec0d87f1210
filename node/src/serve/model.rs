//! Servable models and the stage executor.
//!
//! A model file is a shoal checkpoint (`gpt` or `mlp`, its architecture in the metadata
//! key `model`) or a TorchScript module. [`describe`] reads what the planner needs
//! ([`ModelConfig`]: how many layers can be cut into stages, and what each costs);
//! [`Stage`] runs a contiguous range of layers and keeps, for the `gpt`, the KV cache of
//! those layers per generated row (one request's sequence).
//!
//! Rows are batched per call, whatever their lengths (continuous batching):
//! - a **prefill** call starts new rows; prompts of different lengths share one
//!   `[batch, len]` tensor by left padding (row `b` starts with `pad[b]` filler positions
//!   that no real position attends to);
//! - a **decode** call adds one token to each of its rows, each at its own length: every
//!   row's cache is a `[heads, context, head_dim]` buffer written in place, the batch
//!   attends over the buffers' first `max length + 1` positions with a per-row mask.
//!
//! Position embeddings count from each row's first real token, so a row computes what it
//! would alone.

use crate::train::checkpoint;
use coordinator_free::codec::stage::Payload;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tch::{Kind, Tensor};

/// Vocabulary of the byte-level `gpt`.
pub const VOCAB: u32 = 256;
/// A row's KV caches are dropped after this long unused. 120 s.
pub const ROW_TTL: Duration = Duration::from_secs(120);
/// Most rows a stage keeps caches for (the least recently used beyond it are dropped).
/// 1024.
pub const MAX_ROWS: usize = 1024;
/// Largest batch a KV-cache budget is planned for. 8.
pub const KV_BUDGET_BATCH: u64 = 8;

/// What a model is, as far as serving needs to know (travels as JSON in the announcement).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// `gpt`, `mlp` or `torchscript`.
    pub kind: String,
    /// Layers that can be cut into stages (`gpt`: its blocks; otherwise 1).
    pub layers: u32,
    /// `gpt`: attention heads (0 otherwise).
    pub heads: u32,
    /// `gpt`: width (0 otherwise).
    pub width: u32,
    /// `gpt`: context length in tokens (0 otherwise).
    pub context: u32,
    /// Parameters (scalars).
    pub params: u64,
    /// Bytes each layer needs: weights, plus the KV cache for `KV_BUDGET_BATCH` full
    /// contexts (`gpt`); embeddings are counted in the first layer, the head in the last.
    pub layer_bytes: Vec<u64>,
}

impl ModelConfig {
    /// Whether it generates text (`/v1/completions`).
    pub fn is_lm(&self) -> bool {
        self.kind == "gpt"
    }

    /// Checks an announced config before anything is sized from it.
    pub fn validate(&self) -> Result<(), String> {
        if !["gpt", "mlp", "torchscript"].contains(&self.kind.as_str()) {
            return Err(format!("unknown model kind `{}`", self.kind));
        }
        if self.layers == 0 || self.layers > 4096 || self.layer_bytes.len() != self.layers as usize
        {
            return Err(format!(
                "{} layers with {} costs",
                self.layers,
                self.layer_bytes.len()
            ));
        }
        if self.is_lm()
            && (self.heads == 0
                || self.width == 0
                || !self.width.is_multiple_of(self.heads)
                || self.context == 0
                || self.context > 1 << 20)
        {
            return Err("gpt heads, width and context must be positive, heads divide width".into());
        }
        Ok(())
    }
}

/// Why a model could not be described, loaded or run.
#[derive(Debug, thiserror::Error)]
pub enum ServeModelError {
    /// The file is neither a shoal checkpoint nor a TorchScript module.
    #[error("{path}: not a shoal checkpoint or TorchScript module ({reason})")]
    Unrecognised {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// A checkpoint lacks something the model needs.
    #[error("{path}: {problem}")]
    Checkpoint {
        /// The file.
        path: String,
        /// What is wrong.
        problem: String,
    },
    /// A request does not fit the model (layers, shapes, positions).
    #[error("{0}")]
    Request(String),
    /// A decode names a row whose cache is not here (evicted, or this member restarted):
    /// the row must start again, here or elsewhere.
    #[error("unknown row {0:016x}")]
    UnknownRow(u64),
}

#[derive(Deserialize)]
struct ArchMeta {
    kind: String,
    #[serde(default)]
    layers: i64,
    #[serde(default)]
    heads: i64,
    #[serde(default)]
    width: i64,
    #[serde(default)]
    context: i64,
}

fn is_safetensors(path: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 9];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok()
        && head[8] == b'{'
}

fn unrecognised(path: &Path, reason: impl ToString) -> ServeModelError {
    ServeModelError::Unrecognised {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// Reads a model file's architecture.
pub fn describe(path: &Path) -> Result<ModelConfig, ServeModelError> {
    if !is_safetensors(path) {
        let m = tch::CModule::load(path).map_err(|e| unrecognised(path, e))?;
        let params: u64 = m
            .named_parameters()
            .map_err(|e| unrecognised(path, e))?
            .iter()
            .map(|(_, t)| t.numel() as u64)
            .sum();
        let bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
        return Ok(ModelConfig {
            kind: "torchscript".into(),
            layers: 1,
            heads: 0,
            width: 0,
            context: 0,
            params,
            layer_bytes: vec![bytes.max(params * 4)],
        });
    }
    let c = checkpoint::read(path).map_err(|e| unrecognised(path, e))?;
    let bad = |p: &str| ServeModelError::Checkpoint {
        path: path.display().to_string(),
        problem: p.to_string(),
    };
    let arch: ArchMeta = c
        .metadata
        .get("model")
        .and_then(|m| serde_json::from_str(m).ok())
        .ok_or_else(|| bad("metadata `model` is missing (written by an older shoal?)"))?;
    let numel = |prefix: &str| -> u64 {
        c.tensors
            .iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .map(|(_, t)| t.numel() as u64)
            .sum()
    };
    let params = numel("model.");
    match arch.kind.as_str() {
        "gpt" => {
            let (l, w, ctx) = (
                arch.layers.max(0) as u64,
                arch.width as u64,
                arch.context as u64,
            );
            if l == 0 {
                return Err(bad("a gpt without layers"));
            }
            let kv = 2 * KV_BUDGET_BATCH * ctx * w * 4;
            let mut layer_bytes: Vec<u64> = (0..l)
                .map(|i| numel(&format!("model.blocks.{i}.")) * 4 + kv)
                .collect();
            layer_bytes[0] += (numel("model.tok.") + numel("model.pos.")) * 4;
            layer_bytes[l as usize - 1] += (numel("model.ln_f.") + numel("model.head.")) * 4;
            let cfg = ModelConfig {
                kind: "gpt".into(),
                layers: l as u32,
                heads: arch.heads as u32,
                width: w as u32,
                context: ctx as u32,
                params,
                layer_bytes,
            };
            cfg.validate().map_err(|e| bad(&e))?;
            Ok(cfg)
        }
        "mlp" => Ok(ModelConfig {
            kind: "mlp".into(),
            layers: 1,
            heads: 0,
            width: 0,
            context: 0,
            params,
            layer_bytes: vec![params * 4],
        }),
        other => Err(bad(&format!("cannot serve a `{other}` checkpoint"))),
    }
}

struct BlockW {
    ln1: (Tensor, Tensor),
    qkv: (Tensor, Tensor),
    proj: (Tensor, Tensor),
    ln2: (Tensor, Tensor),
    fc: (Tensor, Tensor),
    fc2: (Tensor, Tensor),
}

#[derive(Default)]
struct GptW {
    tok: Option<Tensor>,
    pos: Option<Tensor>,
    blocks: BTreeMap<usize, BlockW>,
    ln_f: Option<(Tensor, Tensor)>,
    head: Option<Tensor>,
}

enum Weights {
    Gpt(GptW),
    Mlp(Vec<(Tensor, Tensor)>),
    Script(tch::CModule),
}

struct RowCache {
    /// Positions cached.
    len: u32,
    /// Per layer: K and V buffers `[heads, context, head_dim]`, valid up to `len`.
    kv: HashMap<usize, (Tensor, Tensor)>,
    touched: Instant,
}

/// The part of a model this member runs, with its rows' KV caches.
pub struct Stage {
    cfg: ModelConfig,
    path: PathBuf,
    weights: Weights,
    rows: HashMap<u64, RowCache>,
}

/// `x · W^T + b` with `W^T` stored pre-transposed (`[in, out]`, contiguous): one `addmm`
/// that reads the weights in the order they are laid out (measured 10–40% faster than
/// multiplying by a transposed view at serving batch sizes).
fn linear(x: &Tensor, w: &(Tensor, Tensor)) -> Tensor {
    let mut size = x.size();
    let k = *size.last().expect("a matrix");
    let y = Tensor::addmm(&w.1, &x.reshape([-1, k]), &w.0);
    *size.last_mut().expect("a matrix") = w.0.size()[1];
    y.view(size.as_slice())
}

fn norm(x: &Tensor, w: &(Tensor, Tensor)) -> Tensor {
    let d = w.0.size()[0];
    x.layer_norm([d], Some(&w.0), Some(&w.1), 1e-5, true)
}

fn req(msg: impl ToString) -> ServeModelError {
    ServeModelError::Request(msg.to_string())
}

impl Stage {
    /// Opens the model at `path` (weights are loaded per layer on first use).
    pub fn open(path: &Path, cfg: ModelConfig) -> Result<Stage, ServeModelError> {
        let weights = match cfg.kind.as_str() {
            "gpt" => Weights::Gpt(GptW::default()),
            "mlp" => Weights::Mlp(Vec::new()),
            _ => {
                let mut m = tch::CModule::load(path).map_err(|e| unrecognised(path, e))?;
                m.set_eval();
                Weights::Script(m)
            }
        };
        Ok(Stage {
            cfg,
            path: path.to_path_buf(),
            weights,
            rows: HashMap::new(),
        })
    }

    /// The model's config.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// Layers whose weights are loaded here.
    pub fn loaded_layers(&self) -> Vec<usize> {
        match &self.weights {
            Weights::Gpt(g) => g.blocks.keys().copied().collect(),
            Weights::Mlp(l) if !l.is_empty() => vec![0],
            Weights::Script(_) => vec![0],
            Weights::Mlp(_) => vec![],
        }
    }

    /// Loads what layers `start..end` need and drops the layers outside it (a re-plan
    /// moved them elsewhere).
    fn ensure(&mut self, start: usize, end: usize) -> Result<(), ServeModelError> {
        let layers = self.cfg.layers as usize;
        let path = self.path.clone();
        let bad = |p: String| ServeModelError::Checkpoint {
            path: path.display().to_string(),
            problem: p,
        };
        match &mut self.weights {
            Weights::Gpt(g) => {
                g.blocks.retain(|i, _| (start..end).contains(i));
                if start > 0 {
                    g.tok = None;
                    g.pos = None;
                }
                if end < layers {
                    g.ln_f = None;
                    g.head = None;
                }
                let missing = (start..end).any(|i| !g.blocks.contains_key(&i))
                    || (start == 0 && g.tok.is_none())
                    || (end == layers && g.head.is_none());
                if !missing {
                    return Ok(());
                }
                let c = checkpoint::read(&path).map_err(|e| bad(e.to_string()))?;
                let t = |n: &str| -> Result<Tensor, ServeModelError> {
                    c.get(&format!("model.{n}"))
                        .map(|t| t.shallow_clone())
                        .ok_or_else(|| bad(format!("tensor `model.{n}` is missing")))
                };
                let wb = |n: String| -> Result<(Tensor, Tensor), ServeModelError> {
                    Ok((t(&format!("{n}.weight"))?, t(&format!("{n}.bias"))?))
                };
                // Linear layers keep W^T (see `linear`).
                let lin = |n: String| -> Result<(Tensor, Tensor), ServeModelError> {
                    let (w, b) = wb(n)?;
                    Ok((w.tr().contiguous(), b))
                };
                for i in start..end {
                    if g.blocks.contains_key(&i) {
                        continue;
                    }
                    let p = format!("blocks.{i}");
                    g.blocks.insert(
                        i,
                        BlockW {
                            ln1: wb(format!("{p}.ln1"))?,
                            qkv: lin(format!("{p}.qkv"))?,
                            proj: lin(format!("{p}.proj"))?,
                            ln2: wb(format!("{p}.ln2"))?,
                            fc: lin(format!("{p}.fc"))?,
                            fc2: lin(format!("{p}.fc2"))?,
                        },
                    );
                }
                if start == 0 {
                    g.tok = Some(t("tok.weight")?);
                    g.pos = Some(t("pos.weight")?);
                }
                if end == layers {
                    g.ln_f = Some(wb("ln_f".into())?);
                    g.head = Some(t("head.weight")?.tr().contiguous());
                }
                Ok(())
            }
            Weights::Mlp(l) => {
                if !l.is_empty() {
                    return Ok(());
                }
                let c = checkpoint::read(&path).map_err(|e| bad(e.to_string()))?;
                for i in 0.. {
                    let (Some(w), Some(b)) = (
                        c.get(&format!("model.fc{i}.weight")),
                        c.get(&format!("model.fc{i}.bias")),
                    ) else {
                        break;
                    };
                    l.push((w.tr().contiguous(), b.shallow_clone()));
                }
                if l.is_empty() {
                    return Err(bad("no `model.fc0` layer".into()));
                }
                Ok(())
            }
            Weights::Script(_) => Ok(()),
        }
    }

    /// Forgets rows' caches.
    pub fn drop_rows(&mut self, rows: &[u64]) {
        for r in rows {
            self.rows.remove(r);
        }
    }

    /// Rows with caches here.
    pub fn cached_rows(&self) -> usize {
        self.rows.len()
    }

    fn evict(&mut self, room: usize) {
        let now = Instant::now();
        self.rows
            .retain(|_, s| now.duration_since(s.touched) < ROW_TTL);
        while self.rows.len() + room > MAX_ROWS {
            let Some(oldest) = self
                .rows
                .iter()
                .min_by_key(|(_, s)| s.touched)
                .map(|(k, _)| *k)
            else {
                break;
            };
            self.rows.remove(&oldest);
        }
    }

    /// Runs one forward over `rows` (a `gpt`: `prefill` starts them, else each gets one
    /// more token). `input` holds `[batch, len]` tokens (first layer of a `gpt`) or f32
    /// activations; returns the output kind, its shape and its bytes.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &mut self,
        rows: &[u64],
        layers: std::ops::Range<usize>,
        prefill: bool,
        pad: &[u32],
        input: Payload,
        shape: &[u32],
        bytes: &[u8],
        output: Payload,
    ) -> Result<(Payload, Vec<u32>, Vec<u8>), ServeModelError> {
        let _guard = tch::no_grad_guard();
        if layers.start >= layers.end || layers.end > self.cfg.layers as usize {
            return Err(req(format!(
                "layers {layers:?} of a {}-layer model",
                self.cfg.layers
            )));
        }
        let expected = coordinator_free::codec::stage::expected_bytes(input, shape);
        if expected != Some(bytes.len() as u64) {
            return Err(req(format!(
                "payload of {} bytes for {input:?} {shape:?}",
                bytes.len()
            )));
        }
        self.ensure(layers.start, layers.end)?;
        let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        // The payload's length was checked against its shape above; the wire is
        // little-endian, like every host the data plane compiles for.
        let x = match input {
            Payload::Tokens => Tensor::from_data_size(bytes, &dims, Kind::Int64),
            Payload::Hidden | Payload::Logits | Payload::LastLogits => {
                Tensor::from_data_size(bytes, &dims, Kind::Float)
            }
            Payload::Bytes => return Err(req("a forward of raw bytes")),
        };
        let out = match &self.weights {
            Weights::Gpt(_) => self.gpt_forward(rows, layers, prefill, pad, input, x, output)?,
            Weights::Mlp(l) => {
                if input != Payload::Hidden || dims.len() != 2 {
                    return Err(req("the mlp takes f32 features [batch, features]"));
                }
                let want = l[0].0.size()[0];
                if dims[1] != want {
                    return Err(req(format!(
                        "the mlp takes {want} features, got {}",
                        dims[1]
                    )));
                }
                let mut h = x;
                for (i, w) in l.iter().enumerate() {
                    h = linear(&h, w);
                    if i + 1 < l.len() {
                        h = h.relu();
                    }
                }
                h
            }
            Weights::Script(m) => {
                let y = m
                    .forward_ts(&[x.to_kind(Kind::Float)])
                    .map_err(|e| req(format!("forward failed: {e}")))?;
                if y.dim() > 4 {
                    return Err(req(format!("the module returned a {}-d tensor", y.dim())));
                }
                y
            }
        };
        let out = out.to_kind(Kind::Float).contiguous();
        let shape: Vec<u32> = out.size().iter().map(|&d| d as u32).collect();
        let n = out.numel();
        let mut b = vec![0u8; n * 4];
        out.copy_data_u8(&mut b, n);
        let kind = match &self.weights {
            Weights::Gpt(_) => output,
            _ => Payload::Logits,
        };
        Ok((kind, shape, b))
    }

    #[allow(clippy::too_many_arguments)]
    fn gpt_forward(
        &mut self,
        rows: &[u64],
        layers: std::ops::Range<usize>,
        prefill: bool,
        pad: &[u32],
        input: Payload,
        x: Tensor,
        output: Payload,
    ) -> Result<Tensor, ServeModelError> {
        let cfg = self.cfg.clone();
        let (heads, width, ctx) = (cfg.heads as i64, cfg.width as i64, cfg.context as i64);
        let size = x.size();
        let (b, l) = (size[0], size[1]);
        if rows.len() != b as usize || pad.len() != b as usize {
            return Err(req("one row id and one padding per row"));
        }
        let mut seen = std::collections::HashSet::new();
        if !rows.iter().all(|r| seen.insert(*r)) {
            return Err(req("a row appears twice in one call"));
        }
        if prefill && pad.iter().any(|&p| p as i64 >= l)
            || !prefill && (l != 1 || pad.iter().any(|&p| p != 0))
        {
            return Err(req(
                "paddings must leave each row a token (decode: one, unpadded)",
            ));
        }
        let first = layers.start == 0;
        if first != (input == Payload::Tokens) {
            return Err(req(
                "the first layer takes tokens, later layers hidden states",
            ));
        }
        if !first && size != [b, l, width] {
            return Err(req(format!(
                "hidden states {size:?}, expected [{b}, {l}, {width}]"
            )));
        }
        if first && size.len() != 2 {
            return Err(req("tokens must be [batch, len]"));
        }
        let last = layers.end == cfg.layers as usize;
        if !last && output != Payload::Hidden
            || last && !matches!(output, Payload::Logits | Payload::LastLogits)
        {
            return Err(req(format!("layers {layers:?} cannot answer {output:?}")));
        }
        // Each row's cached length (0 for new rows) and the positions of this call.
        let lens: Vec<i64> = if prefill {
            vec![0; b as usize]
        } else {
            rows.iter()
                .map(|r| {
                    self.rows
                        .get(r)
                        .map(|c| c.len as i64)
                        .ok_or(ServeModelError::UnknownRow(*r))
                })
                .collect::<Result<_, _>>()?
        };
        let mut positions = Vec::with_capacity((b * l) as usize);
        for (i, &p) in pad.iter().enumerate() {
            for j in 0..l {
                positions.push(if prefill {
                    (j - p as i64).max(0)
                } else {
                    lens[i]
                });
            }
        }
        if positions.iter().any(|&p| p >= ctx) {
            return Err(req(format!(
                "the sequence exceeds the context of {ctx} tokens"
            )));
        }
        if prefill {
            self.evict(rows.len());
            for r in rows {
                self.rows.insert(
                    *r,
                    RowCache {
                        len: 0,
                        kv: HashMap::new(),
                        touched: Instant::now(),
                    },
                );
            }
        }
        // Keys each query may attend to: prefill, causal within the call and not padding
        // (a padding query attends to itself only, so no softmax row is empty); decode,
        // the row's cached positions and the new one.
        let keys = if prefill {
            l
        } else {
            lens.iter().max().copied().unwrap_or(0) + 1
        };
        let mut allowed = Vec::with_capacity((b * l * keys) as usize);
        for (i, &p) in pad.iter().enumerate() {
            for q in 0..l {
                for k in 0..keys {
                    allowed.push(if prefill {
                        k <= q && (k >= p as i64 || k == q)
                    } else {
                        k <= lens[i]
                    });
                }
            }
        }
        let mask = Tensor::from_slice(&allowed).view([b, 1, l, keys]);
        let Weights::Gpt(g) = &self.weights else {
            unreachable!("gpt weights")
        };
        let mut x = if first {
            let tok = g.tok.as_ref().expect("loaded");
            let pe = g.pos.as_ref().expect("loaded");
            let p = Tensor::from_slice(&positions).view([b, l]);
            Tensor::embedding(tok, &x, -1, false, false)
                + Tensor::embedding(pe, &p, -1, false, false)
        } else {
            x
        };
        let hd = width / heads;
        let opts = (Kind::Float, tch::Device::Cpu);
        for li in layers.clone() {
            let blk = &g.blocks[&li];
            let qkv = linear(&norm(&x, &blk.ln1), &blk.qkv);
            let parts = qkv.split(width, 2);
            let shape = |t: &Tensor| t.view([b, l, heads, hd]).transpose(1, 2);
            let (q, k, v) = (shape(&parts[0]), shape(&parts[1]), shape(&parts[2]));
            let a = if prefill {
                let a = Tensor::scaled_dot_product_attention::<Tensor>(
                    &q,
                    &k,
                    &v,
                    Some(mask.shallow_clone()),
                    0.0,
                    false,
                    None,
                    false,
                );
                // Keep each row's real positions in its cache buffers.
                for (i, r) in rows.iter().enumerate() {
                    let p = pad[i] as i64;
                    let kb = Tensor::zeros([heads, ctx, hd], opts);
                    let vb = Tensor::zeros([heads, ctx, hd], opts);
                    kb.narrow(1, 0, l - p)
                        .copy_(&k.get(i as i64).narrow(1, p, l - p));
                    vb.narrow(1, 0, l - p)
                        .copy_(&v.get(i as i64).narrow(1, p, l - p));
                    let c = self.rows.get_mut(r).expect("inserted");
                    c.kv.insert(li, (kb, vb));
                }
                a
            } else {
                let mut ks = Vec::with_capacity(b as usize);
                let mut vs = Vec::with_capacity(b as usize);
                for (i, r) in rows.iter().enumerate() {
                    let c = self.rows.get_mut(r).expect("checked");
                    let Some((kb, vb)) = c.kv.get(&li) else {
                        return Err(ServeModelError::UnknownRow(*r));
                    };
                    kb.narrow(1, lens[i], 1).copy_(&k.get(i as i64));
                    vb.narrow(1, lens[i], 1).copy_(&v.get(i as i64));
                    ks.push(kb.narrow(1, 0, keys));
                    vs.push(vb.narrow(1, 0, keys));
                }
                Tensor::scaled_dot_product_attention::<Tensor>(
                    &q,
                    &Tensor::stack(&ks, 0),
                    &Tensor::stack(&vs, 0),
                    Some(mask.shallow_clone()),
                    0.0,
                    false,
                    None,
                    false,
                )
            };
            let a = a.transpose(1, 2).contiguous().view([b, l, width]);
            let h = &x + linear(&a, &blk.proj);
            x = h;
            let h = linear(&norm(&x, &blk.ln2), &blk.fc).gelu("none");
            let y = &x + linear(&h, &blk.fc2);
            x = y;
        }
        for (i, r) in rows.iter().enumerate() {
            let c = self.rows.get_mut(r).expect("present");
            c.len = if prefill {
                (l - pad[i] as i64) as u32
            } else {
                lens[i] as u32 + 1
            };
            c.touched = Instant::now();
        }
        if !last {
            return Ok(x);
        }
        let x = if output == Payload::LastLogits {
            x.select(1, -1)
        } else {
            x
        };
        let ln = g.ln_f.as_ref().expect("loaded");
        let head = g.head.as_ref().expect("loaded");
        Ok(norm(&x, ln).matmul(head))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::data::Task;
    use crate::train::job::JobSpec;
    use crate::train::model::Model;

    /// A random-init gpt written as a checkpoint, and the training model it came from.
    fn gpt_checkpoint(dir: &Path) -> (PathBuf, Model) {
        let job = JobSpec::parse(
            r#"
name = "t"
steps = 1
batch_size = 4
[model]
kind = "gpt"
layers = 3
heads = 2
width = 16
context = 24
[data]
kind = "arithmetic"
digits = 2
"#,
        )
        .unwrap();
        let m = Model::build(
            &job,
            Task::Lm {
                len: 8,
                masked: true,
            },
            3,
        )
        .unwrap();
        let tensors: Vec<(String, Tensor)> = m
            .params()
            .into_iter()
            .map(|(n, t)| (format!("model.{n}"), t))
            .collect();
        let meta = BTreeMap::from([("model".to_string(), job.model_json())]);
        let path = dir.join("ck.safetensors");
        checkpoint::write(&path, &tensors, &meta).unwrap();
        (path, m)
    }

    fn bytes_i64(v: &[i64]) -> Vec<u8> {
        v.iter().flat_map(|t| t.to_le_bytes()).collect()
    }

    fn floats(b: &[u8]) -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    fn argmax(v: &[f32]) -> i64 {
        let mut best = 0;
        for (i, x) in v.iter().enumerate() {
            if *x > v[best] {
                best = i;
            }
        }
        best as i64
    }

    /// Greedy generation through stages `cuts` (layer boundaries), batched with left
    /// padding; returns the tokens and the first step's logits per row.
    fn generate(
        path: &Path,
        cfg: &ModelConfig,
        cuts: &[usize],
        prompts: &[Vec<i64>],
        n: usize,
    ) -> (Vec<Vec<i64>>, Vec<Vec<f32>>) {
        let mut stages: Vec<Stage> = cuts
            .windows(2)
            .map(|_| Stage::open(path, cfg.clone()).unwrap())
            .collect();
        let b = prompts.len();
        let l = prompts.iter().map(Vec::len).max().unwrap();
        let pad: Vec<u32> = prompts.iter().map(|p| (l - p.len()) as u32).collect();
        let mut tokens = Vec::new();
        for p in prompts {
            tokens.extend(std::iter::repeat_n(0, l - p.len()));
            tokens.extend(p);
        }
        let mut len = l as u32;
        let rows: Vec<u64> = (0..b as u64).collect();
        let zeros = vec![0u32; b];
        let mut out = vec![vec![]; b];
        let mut first = vec![];
        for step in 0..n {
            let mut payload = (Payload::Tokens, vec![b as u32, len], bytes_i64(&tokens));
            for (i, st) in stages.iter_mut().enumerate() {
                let last = i + 2 == cuts.len();
                let output = if last {
                    Payload::LastLogits
                } else {
                    Payload::Hidden
                };
                let (kind, shape, bytes) = st
                    .forward(
                        &rows,
                        cuts[i]..cuts[i + 1],
                        step == 0,
                        if step == 0 { &pad } else { &zeros },
                        payload.0,
                        &payload.1,
                        &payload.2,
                        output,
                    )
                    .unwrap();
                payload = (kind, shape, bytes);
            }
            assert_eq!(payload.1, vec![b as u32, VOCAB]);
            let logits = floats(&payload.2);
            tokens.clear();
            for r in 0..b {
                let row = &logits[r * 256..(r + 1) * 256];
                if step == 0 {
                    first.push(row.to_vec());
                }
                let t = argmax(row);
                out[r].push(t);
                tokens.push(t);
            }
            len = 1;
        }
        (out, first)
    }

    #[test]
    fn kv_cached_stages_match_the_training_model() {
        let dir = std::env::temp_dir().join(format!("shoal-serve-model-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (path, m) = gpt_checkpoint(&dir);
        let cfg = describe(&path).unwrap();
        assert_eq!((cfg.kind.as_str(), cfg.layers, cfg.context), ("gpt", 3, 24));
        assert_eq!(cfg.params as usize, m.numel());
        let prompts = vec![
            b"12+34=".iter().map(|&b| b as i64).collect::<Vec<_>>(),
            b"7+5=".iter().map(|&b| b as i64).collect(),
            b"99+1=".iter().map(|&b| b as i64).collect(),
        ];
        // Reference: the training model's full-sequence greedy generation, one row at a time.
        let reference: Vec<Vec<i64>> = prompts
            .iter()
            .map(|p| {
                let t = Tensor::from_slice(p).view([1, p.len() as i64]);
                let g = m.generate(&t, 6).unwrap();
                Vec::<i64>::try_from(g.view([-1])).unwrap()
            })
            .collect();
        let ref_logits: Vec<Vec<f32>> = prompts
            .iter()
            .map(|p| {
                let _g = tch::no_grad_guard();
                let t = Tensor::from_slice(p).view([1, p.len() as i64]);
                let y = m.forward(&t).unwrap().select(1, -1).view([-1]);
                Vec::<f32>::try_from(y).unwrap()
            })
            .collect();
        for cuts in [vec![0, 3], vec![0, 1, 3], vec![0, 1, 2, 3]] {
            // Batched with left padding, and each row alone.
            let (batched, first) = generate(&path, &cfg, &cuts, &prompts, 6);
            assert_eq!(batched, reference, "stages {cuts:?}");
            for (r, p) in prompts.iter().enumerate() {
                let (alone, _) = generate(&path, &cfg, &cuts, std::slice::from_ref(p), 6);
                assert_eq!(alone[0], reference[r]);
                for (a, b) in first[r].iter().zip(&ref_logits[r]) {
                    assert!((a - b).abs() < 1e-4, "logits differ: {a} vs {b}");
                }
            }
        }
        // Requests that do not fit are errors, not panics.
        let mut st = Stage::open(&path, cfg.clone()).unwrap();
        let long: Vec<i64> = vec![1; 25];
        let e = st.forward(
            &[1],
            0..3,
            true,
            &[0],
            Payload::Tokens,
            &[1, 25],
            &bytes_i64(&long),
            Payload::LastLogits,
        );
        assert!(e.is_err());
        let e = st.forward(
            &[1],
            0..4,
            true,
            &[0],
            Payload::Tokens,
            &[1, 1],
            &bytes_i64(&[1]),
            Payload::LastLogits,
        );
        assert!(e.is_err());
        let e = st.forward(
            &[99],
            0..3,
            false,
            &[0],
            Payload::Tokens,
            &[1, 1],
            &bytes_i64(&[1]),
            Payload::LastLogits,
        );
        assert!(e.unwrap_err().to_string().contains("unknown row"));

        // Continuous batching: a row that joins two tokens later, decoded together with
        // the first, generates what it generates alone.
        let mut st = Stage::open(&path, cfg.clone()).unwrap();
        let greedy =
            |st: &mut Stage, rows: &[u64], prefill: bool, pad: &[u32], toks: &[i64], len: u32| {
                let (_, _, b) = st
                    .forward(
                        rows,
                        0..3,
                        prefill,
                        pad,
                        Payload::Tokens,
                        &[rows.len() as u32, len],
                        &bytes_i64(toks),
                        Payload::LastLogits,
                    )
                    .unwrap();
                let l = floats(&b);
                (0..rows.len())
                    .map(|r| argmax(&l[r * 256..(r + 1) * 256]))
                    .collect::<Vec<i64>>()
            };
        let (pa, pb) = (&prompts[0], &prompts[1]);
        let mut a_out = greedy(&mut st, &[10], true, &[0], pa, pa.len() as u32);
        for _ in 0..2 {
            let t = *a_out.last().unwrap();
            a_out.push(greedy(&mut st, &[10], false, &[0], &[t], 1)[0]);
        }
        let mut b_out = greedy(&mut st, &[11], true, &[0], pb, pb.len() as u32);
        for _ in 0..3 {
            let toks = [*a_out.last().unwrap(), *b_out.last().unwrap()];
            let next = greedy(&mut st, &[10, 11], false, &[0, 0], &toks, 1);
            a_out.push(next[0]);
            b_out.push(next[1]);
        }
        assert_eq!(a_out, reference[0]);
        assert_eq!(b_out[..4], reference[1][..4]);
        st.drop_rows(&[10, 11]);
        assert_eq!(st.cached_rows(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
