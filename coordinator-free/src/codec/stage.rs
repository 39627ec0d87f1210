//! Serving: the request/response frames that flow between an entry node and the members
//! holding pipeline stages, over a data-plane stream.
//!
//! A frame is `[u32 LE meta length][meta: bincode, at most MAX_STAGE_META][u64 LE payload
//! length][payload]`. The payload length is checked against [`MAX_STAGE_PAYLOAD`] (and, by
//! the shell, against what the meta says it holds) before anything is allocated for it.

use super::{decode_limited, encode_limited, CodecError};
use serde::{Deserialize, Serialize};

/// Largest encoded meta.
pub const MAX_STAGE_META: usize = 16 * 1024;
/// Largest payload (activations, logits or a model file chunk), in bytes. 1 GiB.
pub const MAX_STAGE_PAYLOAD: u64 = 1 << 30;
/// Largest batch in one forward.
pub const MAX_BATCH: u32 = 4096;

/// What a forward's payload holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Payload {
    /// Token ids, i64 little-endian, `[batch, len]`.
    Tokens,
    /// Hidden states, f32 little-endian, `[batch, len, width]`.
    Hidden,
    /// Logits of every position, f32, `[batch, len, vocab]`.
    Logits,
    /// Logits of the last position only, f32, `[batch, vocab]`.
    LastLogits,
    /// Raw bytes (a model file chunk).
    Bytes,
    /// Each row's next token, sampled by the last stage from its last position's logits
    /// ([`RowSampling`]): `[rows, 1 + top, 2]` pairs of (token id u32, logprob f32),
    /// little-endian. The first pair is the sampled token and its logprob (0 when the row
    /// asked for none), then the row's `top` most likely tokens, most likely first, where
    /// `top` is the largest any row of the call asked for (a row that asked for fewer, or
    /// none, ignores the rest of its pairs).
    Sampled,
}

/// Largest `top` a row may ask logprobs for (OpenAI's `top_logprobs` limit).
pub const MAX_TOP_LOGPROBS: u8 = 20;

/// How the last stage picks one row's next token for a [`Payload::Sampled`] answer:
/// `coordinator_free::serving::sample_token` over the row's last-position logits. The
/// entry draws `u` from the request's seeded generator, so a retry on other members
/// samples the same tokens.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RowSampling {
    /// Softmax temperature; 0 (or less) is greedy.
    pub temperature: f32,
    /// Nucleus mass (1 keeps every token).
    pub top_p: f32,
    /// The uniform draw in `[0, 1)` the sample is taken with (unused when greedy).
    pub u: f64,
    /// `None`: no logprobs; `Some(k)`: the sampled token's logprob and the `k` (at most
    /// [`MAX_TOP_LOGPROBS`]) most likely tokens with theirs.
    pub logprobs: Option<u8>,
}

/// An entry node's request to a stage.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum StageRequest {
    /// Run layers `start..end` of the model over the payload: `prefill` starts the
    /// rows (their KV caches), otherwise each row gets one more token.
    Forward {
        /// The model (SHA-256 of its file).
        model: [u8; 32],
        /// The rows (generated sequences; KV caches are per row), one per `shape[0]`.
        rows: Vec<u64>,
        /// First layer.
        start: u32,
        /// One past the last layer.
        end: u32,
        /// The payload's shape, `[rows, ...]` (1 to 4 dimensions; a `gpt`'s
        /// `[rows, positions]` tokens or `[rows, positions, width]` hidden states).
        shape: Vec<u32>,
        /// Whether this call starts the rows (prompts) or extends them (one token).
        prefill: bool,
        /// Left padding of each row in a prefill (one per row; 0 when decoding).
        pad: Vec<u32>,
        /// What the payload holds.
        input: Payload,
        /// What to answer with (`Hidden` unless `end` is the last layer).
        output: Payload,
        /// How to sample each row (one per row) when `output` is [`Payload::Sampled`];
        /// empty otherwise.
        sampling: Vec<RowSampling>,
    },
    /// Forget rows' KV caches.
    Drop {
        /// The rows (at most [`MAX_BATCH`]).
        rows: Vec<u64>,
    },
    /// Send `len` bytes of the model file from `offset`.
    Fetch {
        /// The model.
        model: [u8; 32],
        /// Offset in the file.
        offset: u64,
        /// Bytes wanted.
        len: u64,
    },
}

/// A stage's answer.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum StageReply {
    /// Done; the payload holds `output` with this shape.
    Ok {
        /// What the payload holds.
        payload: Payload,
        /// Its shape.
        shape: Vec<u32>,
    },
    /// Failed here (model not held yet, a panic, I/O): another member may succeed.
    Err(String),
    /// The request itself does not fit the model (shapes, context length, unknown
    /// row): no member would run it.
    Rejected(String),
}

impl StageRequest {
    /// Encodes the meta.
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        encode_limited::<_, MAX_STAGE_META>(self)
    }
    /// Decodes and validates a meta.
    pub fn decode(bytes: &[u8]) -> Result<StageRequest, CodecError> {
        let r: StageRequest = decode_limited::<_, MAX_STAGE_META>(bytes)?;
        if let StageRequest::Drop { rows } = &r {
            if rows.len() > MAX_BATCH as usize {
                return Err(CodecError::Invalid(format!("drop of {} rows", rows.len())));
            }
        }
        if let StageRequest::Forward {
            start,
            end,
            shape,
            pad,
            rows,
            output,
            sampling,
            ..
        } = &r
        {
            if shape.is_empty() || shape.len() > 4 || shape.contains(&0) {
                return Err(CodecError::Invalid(format!("payload shape {shape:?}")));
            }
            let batch = shape[0];
            if start >= end || batch > MAX_BATCH {
                return Err(CodecError::Invalid(format!(
                    "forward of layers {start}..{end}, batch {batch}"
                )));
            }
            if rows.len() != batch as usize || pad.len() != batch as usize {
                return Err(CodecError::Invalid(format!(
                    "{} row ids and {} paddings for {batch} rows",
                    rows.len(),
                    pad.len()
                )));
            }
            let want = if *output == Payload::Sampled {
                rows.len()
            } else {
                0
            };
            if sampling.len() != want {
                return Err(CodecError::Invalid(format!(
                    "{} row samplings for {want} rows answered with {output:?}",
                    sampling.len()
                )));
            }
            if let Some(s) = sampling.iter().find(|s| !s.valid()) {
                return Err(CodecError::Invalid(format!("row sampling {s:?}")));
            }
        }
        if let StageRequest::Fetch { len, .. } = &r {
            if *len > MAX_STAGE_PAYLOAD {
                return Err(CodecError::Invalid(format!("fetch of {len} bytes")));
            }
        }
        Ok(r)
    }
}

impl RowSampling {
    /// A draw in `[0, 1)`, a temperature and mass that are numbers, and a `top` within
    /// [`MAX_TOP_LOGPROBS`].
    fn valid(&self) -> bool {
        (0.0..1.0).contains(&self.u)
            && self.temperature.is_finite()
            && self.top_p.is_finite()
            && self.logprobs.unwrap_or(0) <= MAX_TOP_LOGPROBS
    }
}

impl StageReply {
    /// Encodes the meta.
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        encode_limited::<_, MAX_STAGE_META>(self)
    }
    /// Decodes a meta.
    pub fn decode(bytes: &[u8]) -> Result<StageReply, CodecError> {
        let r: StageReply = decode_limited::<_, MAX_STAGE_META>(bytes)?;
        if let StageReply::Ok { shape, .. } = &r {
            if shape.len() > 4 {
                return Err(CodecError::Invalid(format!("{}-d payload", shape.len())));
            }
        }
        Ok(r)
    }
}

/// Checks a frame's meta length prefix.
pub fn meta_len(prefix: [u8; 4]) -> Result<usize, CodecError> {
    let n = u32::from_le_bytes(prefix) as usize;
    if n > MAX_STAGE_META {
        return Err(CodecError::TooLarge {
            len: n,
            limit: MAX_STAGE_META,
        });
    }
    Ok(n)
}

/// Checks a frame's payload length prefix.
pub fn payload_len(prefix: [u8; 8]) -> Result<u64, CodecError> {
    let n = u64::from_le_bytes(prefix);
    if n > MAX_STAGE_PAYLOAD {
        return Err(CodecError::TooLarge {
            len: usize::try_from(n).unwrap_or(usize::MAX),
            limit: MAX_STAGE_PAYLOAD as usize,
        });
    }
    Ok(n)
}

/// Bytes a payload of `kind` with `shape` must hold (`width` for hidden states).
pub fn expected_bytes(kind: Payload, shape: &[u32]) -> Option<u64> {
    let elems = shape
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d as u64))?;
    let size = match kind {
        Payload::Tokens => 8,
        Payload::Bytes => 1,
        _ => 4,
    };
    elems.checked_mul(size)
}

/// A prefill's [`Payload::Tokens`] of prompts (token ids: a byte-level model's bytes, or
/// any vocabulary's ids): one row per prompt, each left-padded with token 0 to the
/// longest. Returns the row length, each row's padding and the payload (`[prompts,
/// len]`). What an entry node sends a pipeline's first stage.
pub fn pack_prompts<'a, T: Copy + Into<i64> + 'a>(
    prompts: impl IntoIterator<Item = &'a [T]>,
) -> (u32, Vec<u32>, Vec<u8>) {
    let prompts: Vec<&[T]> = prompts.into_iter().collect();
    let len = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
    let mut pad = Vec::with_capacity(prompts.len());
    let mut bytes = Vec::with_capacity(prompts.len() * len * 8);
    for p in &prompts {
        pad.push((len - p.len()) as u32);
        for _ in p.len()..len {
            bytes.extend_from_slice(&0i64.to_le_bytes());
        }
        for &t in *p {
            bytes.extend_from_slice(&t.into().to_le_bytes());
        }
    }
    (len as u32, pad, bytes)
}

/// A decode call's [`Payload::Tokens`]: one token per row (`[rows, 1]`).
pub fn pack_tokens<T: Into<i64>>(tokens: impl IntoIterator<Item = T>) -> Vec<u8> {
    tokens
        .into_iter()
        .flat_map(|t| t.into().to_le_bytes())
        .collect()
}

/// The f32 values of a [`Payload::Hidden`], [`Payload::Logits`] or
/// [`Payload::LastLogits`] payload (little-endian; a trailing partial value is ignored).
pub fn f32s(bytes: &[u8]) -> Vec<f32> {
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// One row of a [`Payload::Sampled`] answer: the sampled token, its logprob, and the `top`
/// most likely (id, logprob) pairs (the width the answer was packed with).
pub type SampledRow = (u32, f32, Vec<(u32, f32)>);

/// Packs a [`Payload::Sampled`] answer: every row gets `1 + top` pairs (a row with fewer
/// top entries is padded with `(0, -inf)`). Returns its shape and bytes.
pub fn pack_sampled(rows: &[SampledRow], top: usize) -> (Vec<u32>, Vec<u8>) {
    let mut bytes = Vec::with_capacity(rows.len() * (1 + top) * 8);
    for (token, logprob, best) in rows {
        let pad = std::iter::repeat((0, f32::NEG_INFINITY));
        let pairs = std::iter::once((*token, *logprob)).chain(best.iter().copied().chain(pad));
        for (id, lp) in pairs.take(1 + top) {
            bytes.extend_from_slice(&id.to_le_bytes());
            bytes.extend_from_slice(&lp.to_le_bytes());
        }
    }
    (vec![rows.len() as u32, 1 + top as u32, 2], bytes)
}

/// Reads a [`Payload::Sampled`] answer for `rows` rows (shape and size checked, every
/// token id, the padding's too, below `vocab`): each row's token, logprob and top pairs.
pub fn unpack_sampled(
    shape: &[u32],
    bytes: &[u8],
    rows: usize,
    vocab: u32,
) -> Result<Vec<SampledRow>, CodecError> {
    let width = match shape {
        [r, w, 2] if *r as usize == rows && *w >= 1 => *w as usize,
        _ => {
            return Err(CodecError::Invalid(format!(
                "sampled answer of shape {shape:?}"
            )))
        }
    };
    if expected_bytes(Payload::Sampled, shape) != Some(bytes.len() as u64) {
        return Err(CodecError::Invalid(format!(
            "sampled answer of {} bytes for shape {shape:?}",
            bytes.len()
        )));
    }
    let mut out = Vec::with_capacity(rows);
    for row in bytes.chunks_exact(width * 8) {
        let mut pairs = Vec::with_capacity(width);
        for p in row.chunks_exact(8) {
            let id = u32::from_le_bytes([p[0], p[1], p[2], p[3]]);
            if id >= vocab {
                return Err(CodecError::Invalid(format!(
                    "sampled token {id} of a vocabulary of {vocab}"
                )));
            }
            pairs.push((id, f32::from_le_bytes([p[4], p[5], p[6], p[7]])));
        }
        let (token, logprob) = pairs.remove(0);
        out.push((token, logprob, pairs));
    }
    Ok(out)
}
