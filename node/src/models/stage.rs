//! The stage executor: runs a contiguous range of a served model's layers and keeps, for
//! a decoder (the `gpt`), the KV cache of those layers per generated row (one request's
//! sequence).
//!
//! A model file is a shoal checkpoint (`gpt` or `mlp`) or a TorchScript module
//! ([`super::config::describe`] says which); weights are loaded per layer on first use and
//! dropped when a re-plan moves layers elsewhere: when the re-plan moved the cut by at
//! most [`KEEP_MOVED_LAYERS`], once no call asked for them for [`KEEP_MOVED`] (the rows
//! that started under the old cut finish on it meanwhile, without each of their calls
//! loading the layers again), else at once (the memory is not there for both cuts). An
//! `mlp` or TorchScript module is one stage.
//!
//! Rows are batched per call, whatever their lengths (continuous batching):
//! - a **prefill** call starts new rows; prompts of different lengths share one
//!   `[batch, len]` tensor by left padding (row `b` starts with `pad[b]` filler positions
//!   that no real position attends to);
//! - a **decode** call adds one token to each of its rows, each at its own length: every
//!   row's cache is a `[kv_heads, capacity, head_dim]` buffer written in place (grown by doubling up to the context) (fewer heads
//!   than the queries' under grouped-query attention), the batch
//!   attends over the buffers' first `max length + 1` positions with a per-row mask.
//!
//! Positions count from each row's first real token, so a row computes what it would
//! alone, and what the training forward computes for the same tokens.
//!
//! A stage computes on one device (the node's, `shoal up --device`, handed down through
//! `ServeConfig::device`): its weights are moved there as they load (a TorchScript module
//! is loaded onto it), its KV caches are allocated there, each call's payload is decoded
//! on the CPU and moved there, and the output comes back to the CPU to be encoded. The
//! code path is the same on every device.

use super::config::{unrecognised, ModelConfig};
use super::decoder::{is_gqa, Attention, Decoder, DecoderShape};
use super::gpt::Gpt;
use super::mlp::Mlp;
use super::{checkpoint, torchscript, StageError, PARAM_PREFIX};
use coordinator_free::codec::stage::Payload;
use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tch::{Kind, Tensor};

/// A row's KV caches are dropped after this long unused. 120 s.
pub const ROW_TTL: Duration = Duration::from_secs(120);
/// Layers that no call asked for in this long are dropped. 10 s.
pub const KEEP_MOVED: Duration = Duration::from_secs(10);
/// Most layers a stage keeps beyond the range a call asks for (those of a recent cut).
/// 2.
pub const KEEP_MOVED_LAYERS: usize = 2;
/// Most rows a stage keeps caches for (the least recently used beyond it are dropped).
/// 1024.
pub const MAX_ROWS: usize = 1024;

enum Weights {
    Decoder(Box<dyn Decoder>),
    /// `None` until the first call loads it.
    Mlp(Option<Mlp>),
    Script(tch::CModule),
}

struct RowCache {
    /// Positions cached.
    len: u32,
    /// Per layer: K and V buffers `[kv_heads, capacity, head_dim]`, valid up to `len`
    /// ([`kv_capacity`]: grown by doubling as the row gets longer, at most the context).
    kv: HashMap<usize, (Tensor, Tensor)>,
    touched: Instant,
}

/// The fewest positions a row's KV buffers hold. 64.
pub const MIN_KV_CAPACITY: i64 = 64;

/// Positions a row's KV buffers hold when it needs `len`: the next power of two, at least
/// [`MIN_KV_CAPACITY`], at most `context` (so a short request never holds a whole
/// context's cache, and a growing one is copied O(log context) times).
pub fn kv_capacity(len: i64, context: i64) -> i64 {
    (len.max(1) as u64)
        .next_power_of_two()
        .max(MIN_KV_CAPACITY as u64)
        .min(context.max(1) as u64) as i64
}

/// Where a decoder's tensors come from when it is not a shoal checkpoint (a Hugging Face
/// folder): each by its name in the model, on the CPU or any device (the stage moves it to
/// its own), or why it cannot be read.
pub type TensorSource = Box<dyn Fn(&str) -> Result<Tensor, String> + Send>;

/// The part of a served model this member runs, with its rows' KV caches.
pub struct StageExecutor {
    cfg: ModelConfig,
    path: PathBuf,
    device: tch::Device,
    weights: Weights,
    /// A decoder's tensors, when not read from the checkpoint at `path`.
    source: Option<TensorSource>,
    rows: HashMap<u64, RowCache>,
    /// The layer ranges calls asked for, with when last (those of the last [`KEEP_MOVED`]).
    recent: Vec<(Range<usize>, Instant)>,
    /// Time the last forward spent loading weights.
    last_load: Duration,
}

fn req(msg: impl ToString) -> StageError {
    StageError::Request(msg.to_string())
}

impl StageExecutor {
    /// Opens the model at `path` to compute on the CPU ([`open_on`](Self::open_on)).
    pub fn open(path: &Path, cfg: ModelConfig) -> Result<StageExecutor, StageError> {
        StageExecutor::open_on(path, cfg, tch::Device::Cpu)
    }

    /// Opens the model at `path` to compute on `device` (weights are loaded per layer on
    /// first use, onto `device`; a TorchScript module is loaded onto it now).
    pub fn open_on(
        path: &Path,
        cfg: ModelConfig,
        device: tch::Device,
    ) -> Result<StageExecutor, StageError> {
        let weights = match cfg.kind.as_str() {
            "gpt" => Weights::Decoder(Box::new(Gpt::empty(cfg.gpt()))),
            "mlp" => Weights::Mlp(None),
            _ => Weights::Script(
                torchscript::load_frozen(path, device).map_err(|e| unrecognised(path, e))?,
            ),
        };
        Ok(StageExecutor {
            cfg,
            path: path.to_path_buf(),
            device,
            weights,
            source: None,
            rows: HashMap::new(),
            recent: Vec::new(),
            last_load: Duration::ZERO,
        })
    }

    /// A stage of `decoder` (described by `cfg`; `path` names it in errors) whose tensors
    /// come from `source`, computing on `device` (weights are loaded per layer on first
    /// use and moved there).
    pub fn with_decoder(
        path: &Path,
        cfg: ModelConfig,
        decoder: Box<dyn Decoder>,
        source: TensorSource,
        device: tch::Device,
    ) -> StageExecutor {
        StageExecutor {
            cfg,
            path: path.to_path_buf(),
            device,
            weights: Weights::Decoder(decoder),
            source: Some(source),
            rows: HashMap::new(),
            recent: Vec::new(),
            last_load: Duration::ZERO,
        }
    }

    /// The model's config.
    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    /// The device this stage computes on.
    pub fn device(&self) -> tch::Device {
        self.device
    }

    /// Layers whose weights are loaded here.
    pub fn loaded_layers(&self) -> Vec<usize> {
        match &self.weights {
            Weights::Decoder(d) => d.loaded_layers(),
            Weights::Mlp(Some(_)) | Weights::Script(_) => vec![0],
            Weights::Mlp(None) => vec![],
        }
    }

    /// Loads what layers `start..end` need (asked for at `now`) and drops the layers
    /// outside every range asked for in the last [`KEEP_MOVED`] (a re-plan moved them
    /// elsewhere), or outside `start..end` when those ranges span more than
    /// [`KEEP_MOVED_LAYERS`] beyond it.
    fn ensure(&mut self, start: usize, end: usize, now: Instant) -> Result<(), StageError> {
        self.recent
            .retain(|(r, t)| *r != (start..end) && now.saturating_duration_since(*t) < KEEP_MOVED);
        self.recent.push((start..end, now));
        // The ranges asked for lately, as one (the cuts of one model overlap or touch).
        let hull = self.recent.iter().fold(start..end, |k, (r, _)| {
            k.start.min(r.start)..k.end.max(r.end)
        });
        let keep = if hull.len() - (end - start) <= KEEP_MOVED_LAYERS {
            hull
        } else {
            start..end
        };
        let path = self.path.clone();
        let device = self.device;
        let bad = |p: String| StageError::Checkpoint {
            path: path.display().to_string(),
            problem: p,
        };
        let read = || checkpoint::read(&path).map_err(|e| bad(e.to_string()));
        // Checkpoints are read on the CPU; each tensor moves to the stage's device.
        let getter = |c: &checkpoint::Checkpoint, n: &str| {
            c.get(&format!("{PARAM_PREFIX}{n}"))
                .map(|t| t.to_device(device))
        };
        match &mut self.weights {
            Weights::Decoder(d) => {
                let held = d.loaded_layers();
                if d.retain(keep) {
                    if d.loaded_layers() != held {
                        // Layers dropped: their memory goes back to the kernel.
                        crate::allocator::give_back();
                    }
                    return Ok(());
                }
                let loaded = match &self.source {
                    Some(source) => d.load(start..end, &|n| source(n).map(|t| t.to_device(device))),
                    None => {
                        let c = read()?;
                        d.load(start..end, &|n| {
                            getter(&c, n)
                                .ok_or_else(|| format!("tensor `{PARAM_PREFIX}{n}` is missing"))
                        })
                    }
                };
                // The read buffers of the load (and any layers dropped) go back.
                crate::allocator::give_back();
                loaded.map_err(bad)
            }
            Weights::Mlp(Some(_)) | Weights::Script(_) => Ok(()),
            Weights::Mlp(m) => {
                let c = read()?;
                *m = Some(Mlp::load(&|n| getter(&c, n)).map_err(bad)?);
                Ok(())
            }
        }
    }

    /// Time the last successful [`Self::forward`] spent making sure its layers were
    /// loaded (reading weights when they were not): not compute.
    pub fn last_load(&self) -> Duration {
        self.last_load
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

    /// Runs one forward over `rows` (a decoder: `prefill` starts them, else each gets one
    /// more token). `input` holds `[batch, len]` tokens (first layer of a decoder) or f32
    /// activations; returns the output kind, its shape and its bytes.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &mut self,
        rows: &[u64],
        layers: Range<usize>,
        prefill: bool,
        pad: &[u32],
        input: Payload,
        shape: &[u32],
        bytes: &[u8],
        output: Payload,
    ) -> Result<(Payload, Vec<u32>, Vec<u8>), StageError> {
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
        let t = Instant::now();
        self.ensure(layers.start, layers.end, t)?;
        self.last_load = t.elapsed();
        let dims: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
        // The payload's length was checked against its shape above; the wire is
        // little-endian, like every host the data plane compiles for. Decoded on the CPU,
        // computed on the stage's device.
        let x = match input {
            Payload::Tokens => Tensor::from_data_size(bytes, &dims, Kind::Int64),
            Payload::Hidden | Payload::Logits | Payload::LastLogits => {
                Tensor::from_data_size(bytes, &dims, Kind::Float)
            }
            Payload::Bytes => return Err(req("a forward of raw bytes")),
            Payload::Sampled => return Err(req("a forward of sampled tokens")),
        }
        .to_device(self.device);
        let call = Call {
            rows,
            layers,
            prefill,
            pad,
            input,
            output,
        };
        let out = match &self.weights {
            Weights::Decoder(_) => self.decoder_forward(&call, x)?,
            Weights::Mlp(m) => {
                let m = m.as_ref().expect("loaded by ensure");
                if input != Payload::Hidden || dims.len() != 2 {
                    return Err(req("the mlp takes f32 features [batch, features]"));
                }
                let want = m.features();
                if dims[1] != want {
                    return Err(req(format!(
                        "the mlp takes {want} features, got {}",
                        dims[1]
                    )));
                }
                m.forward(&x)
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
        // Back on the CPU to be encoded.
        let out = out
            .to_kind(Kind::Float)
            .to_device(tch::Device::Cpu)
            .contiguous();
        let shape: Vec<u32> = out.size().iter().map(|&d| d as u32).collect();
        let n = out.numel();
        let mut b = vec![0u8; n * 4];
        out.copy_data_u8(&mut b, n);
        let kind = match &self.weights {
            Weights::Decoder(_) => output,
            _ => Payload::Logits,
        };
        Ok((kind, shape, b))
    }
}

/// One decoder call's arguments (see [`StageExecutor::forward`]).
struct Call<'a> {
    rows: &'a [u64],
    layers: Range<usize>,
    prefill: bool,
    pad: &'a [u32],
    input: Payload,
    output: Payload,
}

/// Checks a decoder call against the model (`width`, `layers`) and its input's `size`: one
/// row id and padding per row, rows distinct, tokens into the first layer and hidden
/// states `[b, l, width]` elsewhere, hidden states out of all but the last layer, logits
/// out of the last.
fn check_call(c: &Call, size: &[i64], width: i64, layers: usize) -> Result<(), StageError> {
    let (b, l) = (size[0], size[1]);
    if c.rows.len() != b as usize || c.pad.len() != b as usize {
        return Err(req("one row id and one padding per row"));
    }
    let mut seen = std::collections::HashSet::new();
    if !c.rows.iter().all(|r| seen.insert(*r)) {
        return Err(req("a row appears twice in one call"));
    }
    if c.prefill && c.pad.iter().any(|&p| p as i64 >= l)
        || !c.prefill && (l != 1 || c.pad.iter().any(|&p| p != 0))
    {
        return Err(req(
            "paddings must leave each row a token (decode: one, unpadded)",
        ));
    }
    let first = c.layers.start == 0;
    if first != (c.input == Payload::Tokens) {
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
    let last = c.layers.end == layers;
    if !last && c.output != Payload::Hidden
        || last && !matches!(c.output, Payload::Logits | Payload::LastLogits)
    {
        return Err(req(format!(
            "layers {:?} cannot answer {:?}",
            c.layers, c.output
        )));
    }
    Ok(())
}

impl StageExecutor {
    /// A decoder's layers `c.layers` on `x`, through the rows' KV caches.
    fn decoder_forward(&mut self, c: &Call, x: Tensor) -> Result<Tensor, StageError> {
        let Weights::Decoder(dec) = &self.weights else {
            unreachable!("a decoder")
        };
        let shape = dec.shape();
        let size = x.size();
        if size.len() < 2 {
            return Err(req(
                "inputs are [batch, len] tokens or [batch, len, width] hidden states",
            ));
        }
        check_call(c, &size, shape.width, shape.layers)?;
        if c.layers.start == 0 && x.numel() > 0 {
            let (lo, hi) = (x.min().int64_value(&[]), x.max().int64_value(&[]));
            if lo < 0 || hi >= shape.vocab {
                return Err(req(format!(
                    "tokens {lo}..={hi} outside the vocabulary of {}",
                    shape.vocab
                )));
            }
        }
        let (b, l, ctx) = (size[0], size[1], shape.context);
        // Each row's cached length (0 for new rows) and the positions of this call.
        let lens: Vec<i64> = if c.prefill {
            vec![0; b as usize]
        } else {
            c.rows
                .iter()
                .map(|r| {
                    self.rows
                        .get(r)
                        .map(|c| c.len as i64)
                        .ok_or(StageError::UnknownRow(*r))
                })
                .collect::<Result<_, _>>()?
        };
        let mut positions = Vec::with_capacity((b * l) as usize);
        for (i, &p) in c.pad.iter().enumerate() {
            for j in 0..l {
                positions.push(if c.prefill {
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
        if c.prefill {
            self.evict(c.rows.len());
            for r in c.rows {
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
        let positions = Tensor::from_slice(&positions)
            .view([b, l])
            .to_device(self.device);
        let Weights::Decoder(dec) = &self.weights else {
            unreachable!("a decoder")
        };
        let mut attention = RowAttention::new(&mut self.rows, c, &lens, l, shape, self.device);
        let mut x = if c.layers.start == 0 {
            dec.embed(&x, &positions)
        } else {
            x
        };
        for li in c.layers.clone() {
            x = dec.layer(li, &x, &positions, &mut attention)?;
        }
        for (i, r) in c.rows.iter().enumerate() {
            let row = self.rows.get_mut(r).expect("present");
            row.len = if c.prefill {
                (l - c.pad[i] as i64) as u32
            } else {
                lens[i] as u32 + 1
            };
            row.touched = Instant::now();
        }
        if c.layers.end < shape.layers {
            return Ok(x);
        }
        let x = if c.output == Payload::LastLogits {
            x.select(1, -1)
        } else {
            x
        };
        Ok(dec.logits(&x))
    }
}

/// Attention through the rows' KV caches: a prefill attends causally within the call
/// (padding excluded) and fills each row's buffers; a decode writes the new position into
/// each row's buffers and attends over them.
struct RowAttention<'a> {
    caches: &'a mut HashMap<u64, RowCache>,
    rows: &'a [u64],
    pad: &'a [u32],
    lens: &'a [i64],
    prefill: bool,
    /// Positions each query may attend to (`[b, 1, len, keys]`).
    mask: Tensor,
    /// Keys per query: the call's length (prefill) or the longest row's length + 1.
    keys: i64,
    /// Each row's cache buffers hold at most this many positions.
    context: i64,
    kv_heads: i64,
    head_dim: i64,
}

impl<'a> RowAttention<'a> {
    /// Keys each query may attend to: prefill, causal within the call and not padding
    /// (a padding query attends to itself only, so no softmax row is empty); decode,
    /// the row's cached positions and the new one. The mask is built on the CPU and
    /// moved to `device`, where the attention runs.
    fn new(
        caches: &'a mut HashMap<u64, RowCache>,
        c: &Call<'a>,
        lens: &'a [i64],
        l: i64,
        shape: DecoderShape,
        device: tch::Device,
    ) -> RowAttention<'a> {
        let b = c.rows.len() as i64;
        let keys = if c.prefill {
            l
        } else {
            lens.iter().max().copied().unwrap_or(0) + 1
        };
        let mut allowed = Vec::with_capacity((b * l * keys) as usize);
        for (i, &p) in c.pad.iter().enumerate() {
            for q in 0..l {
                for k in 0..keys {
                    allowed.push(if c.prefill {
                        k <= q && (k >= p as i64 || k == q)
                    } else {
                        k <= lens[i]
                    });
                }
            }
        }
        RowAttention {
            caches,
            rows: c.rows,
            pad: c.pad,
            lens,
            prefill: c.prefill,
            mask: Tensor::from_slice(&allowed)
                .view([b, 1, l, keys])
                .to_device(device),
            keys,
            context: shape.context,
            kv_heads: shape.kv_heads,
            head_dim: shape.head_dim,
        }
    }

    fn sdpa(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Tensor {
        Tensor::scaled_dot_product_attention::<Tensor>(
            q,
            k,
            v,
            Some(self.mask.shallow_clone()),
            0.0,
            false,
            None,
            is_gqa(q, k),
        )
    }
}

impl Attention for RowAttention<'_> {
    fn attend(
        &mut self,
        layer: usize,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor, StageError> {
        let (heads, hd) = (self.kv_heads, self.head_dim);
        let size = k.size();
        if size.len() != 4 || size[1] != heads || size[3] != hd || v.size() != size {
            return Err(req(format!(
                "keys {size:?} and values {:?} are not [batch, {heads}, len, {hd}]",
                v.size()
            )));
        }
        let l = size[2];
        if self.prefill {
            let a = self.sdpa(q, k, v);
            // Keep each row's real positions in its cache buffers.
            let opts = (k.kind(), k.device());
            for (i, r) in self.rows.iter().enumerate() {
                let p = self.pad[i] as i64;
                let cap = kv_capacity(l - p, self.context);
                let kb = Tensor::zeros([heads, cap, hd], opts);
                let vb = Tensor::zeros([heads, cap, hd], opts);
                kb.narrow(1, 0, l - p)
                    .copy_(&k.get(i as i64).narrow(1, p, l - p));
                vb.narrow(1, 0, l - p)
                    .copy_(&v.get(i as i64).narrow(1, p, l - p));
                let c = self.caches.get_mut(r).expect("inserted");
                c.kv.insert(layer, (kb, vb));
            }
            return Ok(a);
        }
        let mut ks = Vec::with_capacity(self.rows.len());
        let mut vs = Vec::with_capacity(self.rows.len());
        for (i, r) in self.rows.iter().enumerate() {
            let c = self.caches.get_mut(r).expect("checked");
            let Some((kb, vb)) = c.kv.get_mut(&layer) else {
                return Err(StageError::UnknownRow(*r));
            };
            // Every row of the call is read up to `keys` positions (the longest row's).
            let cap = kb.size()[1];
            if cap < self.keys {
                let grown = kv_capacity(self.keys, self.context);
                for buf in [&mut *kb, &mut *vb] {
                    let g = Tensor::zeros([heads, grown, hd], (buf.kind(), buf.device()));
                    g.narrow(1, 0, cap).copy_(buf);
                    *buf = g;
                }
            }
            kb.narrow(1, self.lens[i], 1).copy_(&k.get(i as i64));
            vb.narrow(1, self.lens[i], 1).copy_(&v.get(i as i64));
            ks.push(kb.narrow(1, 0, self.keys));
            vs.push(vb.narrow(1, 0, self.keys));
        }
        Ok(self.sdpa(q, &Tensor::stack(&ks, 0), &Tensor::stack(&vs, 0)))
    }
}

#[cfg(test)]
#[path = "stage_tests.rs"]
mod tests;
