//! The one codec for untrusted bytes.
//!
//! Every message that arrives from the network is decoded here, through bincode 2 with a
//! hard byte limit (checked before any allocation), a check that no bytes trail the
//! message, and the message's own semantic validation. A bad frame is an error, never a
//! panic and never an unbounded allocation.

use crate::membership::Heartbeat;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// Largest control-plane (gossip) message, in bytes. Gossipsub is configured with the same
/// limit, so nothing larger is even relayed.
pub const MAX_CONTROL_MESSAGE: usize = 64 * 1024;

/// A message on the control plane's gossip topic.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ControlMessage {
    /// A member's periodic liveness and capability announcement.
    Heartbeat(Heartbeat),
    /// The NCCL unique id of a view, minted by its smallest member id
    /// ([`crate::collective::nccl_root`]); receivers accept it only from that member.
    NcclId {
        /// The view the communicator is for.
        view_hash: crate::view::ViewHash,
        /// `ncclUniqueId` bytes ([`NCCL_ID_LEN`]).
        id: Vec<u8>,
    },
    /// A training job announced to the swarm; every member that can load it joins.
    /// Re-announced while it runs, so members that missed it (or join later) learn it.
    Job {
        /// Submission id: runs of the same job file differ by it.
        run: u64,
        /// Continue from the run directory's checkpoint.
        resume: bool,
        /// The job file as TOML (at most [`MAX_JOB_SPEC`] bytes; the shell validates it).
        spec: String,
    },
    /// A model offered for serving. Every member that can fetch it (over the data plane,
    /// from `origin` or any member that already has it) serves the stages the plan gives
    /// it. Re-announced while it is served.
    Serve(ServeAnnounce),
}

/// A model offered for serving ([`ControlMessage::Serve`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ServeAnnounce {
    /// The name clients use (`model` in the OpenAI API; at most [`MAX_MODEL_NAME`] bytes).
    pub name: String,
    /// SHA-256 of the model file: what members fetch and verify.
    pub sha256: [u8; 32],
    /// Size of the model file in bytes (at most [`stage::MAX_STAGE_PAYLOAD`]).
    pub bytes: u64,
    /// The member that offered it (holds the file).
    pub origin: crate::view::NodeId,
    /// The model's description as JSON (at most [`MAX_MODEL_CONFIG`] bytes; the shell
    /// validates it).
    pub config: String,
    /// Fewest stages per replica pipeline (1..=[`MAX_STAGES`]).
    pub stages: u32,
}

/// Deepest pipeline a [`ServeAnnounce`] may ask for.
pub const MAX_STAGES: u32 = 64;

/// Longest model name.
pub const MAX_MODEL_NAME: usize = 64;
/// Largest model description in a [`ServeAnnounce`].
pub const MAX_MODEL_CONFIG: usize = 4096;

/// Largest job spec carried by [`ControlMessage::Job`].
pub const MAX_JOB_SPEC: usize = 32 * 1024;

/// Length of an `ncclUniqueId`.
pub const NCCL_ID_LEN: usize = 128;

/// Why bytes could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The input is larger than the limit for its kind of message.
    #[error("message of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Bytes offered.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// bincode rejected the bytes (truncated, bad tag, a length over the limit, ...).
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The message decoded but bytes were left over.
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
    /// The message decoded but its content breaks a rule (see the message).
    #[error("invalid message: {0}")]
    Invalid(String),
    /// Encoding failed (only possible for a value over the limit).
    #[error("cannot encode: {0}")]
    Encode(String),
}

fn config<const LIMIT: usize>() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_little_endian()
        .with_variable_int_encoding()
        .with_limit::<LIMIT>()
}

/// Decodes exactly one `T` from `bytes`, allocating at most `LIMIT` bytes.
pub fn decode_limited<T: DeserializeOwned, const LIMIT: usize>(
    bytes: &[u8],
) -> Result<T, CodecError> {
    if bytes.len() > LIMIT {
        return Err(CodecError::TooLarge {
            len: bytes.len(),
            limit: LIMIT,
        });
    }
    let (value, used) = bincode::serde::decode_from_slice(bytes, config::<LIMIT>())
        .map_err(|e| CodecError::Malformed(e.to_string()))?;
    if used != bytes.len() {
        return Err(CodecError::Trailing(bytes.len() - used));
    }
    Ok(value)
}

/// Encodes `value`, failing if the encoding would exceed `LIMIT` bytes.
pub fn encode_limited<T: Serialize, const LIMIT: usize>(value: &T) -> Result<Vec<u8>, CodecError> {
    let bytes = bincode::serde::encode_to_vec(value, config::<LIMIT>())
        .map_err(|e| CodecError::Encode(e.to_string()))?;
    if bytes.len() > LIMIT {
        return Err(CodecError::TooLarge {
            len: bytes.len(),
            limit: LIMIT,
        });
    }
    Ok(bytes)
}

impl ControlMessage {
    /// Encodes for gossip.
    pub fn encode(&self) -> Result<Vec<u8>, CodecError> {
        encode_limited::<_, MAX_CONTROL_MESSAGE>(self)
    }

    /// Decodes and validates a gossip payload.
    pub fn decode(bytes: &[u8]) -> Result<ControlMessage, CodecError> {
        let msg: ControlMessage = decode_limited::<_, MAX_CONTROL_MESSAGE>(bytes)?;
        match &msg {
            ControlMessage::Heartbeat(hb) => hb.validate().map_err(CodecError::Invalid)?,
            ControlMessage::NcclId { id, .. } => {
                if id.len() != NCCL_ID_LEN {
                    return Err(CodecError::Invalid(format!(
                        "NCCL id of {} bytes, expected {NCCL_ID_LEN}",
                        id.len()
                    )));
                }
            }
            ControlMessage::Job { spec, .. } => {
                if spec.len() > MAX_JOB_SPEC {
                    return Err(CodecError::Invalid(format!(
                        "job spec of {} bytes exceeds {MAX_JOB_SPEC}",
                        spec.len()
                    )));
                }
            }
            ControlMessage::Serve(a) => {
                let name_ok = !a.name.is_empty()
                    && a.name.len() <= MAX_MODEL_NAME
                    && a.name
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
                if !name_ok {
                    return Err(CodecError::Invalid(format!(
                        "model name must be 1-{MAX_MODEL_NAME} of [A-Za-z0-9-_.:]"
                    )));
                }
                if a.config.len() > MAX_MODEL_CONFIG {
                    return Err(CodecError::Invalid(format!(
                        "model config of {} bytes exceeds {MAX_MODEL_CONFIG}",
                        a.config.len()
                    )));
                }
                if a.stages == 0 || a.stages > MAX_STAGES {
                    return Err(CodecError::Invalid(format!(
                        "{} stages (1..={MAX_STAGES})",
                        a.stages
                    )));
                }
                if a.bytes == 0 || a.bytes > stage::MAX_STAGE_PAYLOAD {
                    return Err(CodecError::Invalid(format!(
                        "model file of {} bytes (1..={})",
                        a.bytes,
                        stage::MAX_STAGE_PAYLOAD
                    )));
                }
            }
        }
        Ok(msg)
    }
}

/// Serving: the request/response frames that flow between an entry node and the members
/// holding pipeline stages, over a data-plane stream.
///
/// A frame is `[u32 LE meta length][meta: bincode, at most MAX_STAGE_META][u64 LE payload
/// length][payload]`. The payload length is checked against [`MAX_STAGE_PAYLOAD`] (and, by
/// the shell, against what the meta says it holds) before anything is allocated for it.
pub mod stage {
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
            }
            if let StageRequest::Fetch { len, .. } = &r {
                if *len > MAX_STAGE_PAYLOAD {
                    return Err(CodecError::Invalid(format!("fetch of {len} bytes")));
                }
            }
            Ok(r)
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

    /// A prefill's [`Payload::Tokens`] of byte-level prompts: one row per prompt, each
    /// left-padded with token 0 to the longest. Returns the row length, each row's padding
    /// and the payload (`[prompts, len]`). What an entry node sends a pipeline's first stage.
    pub fn pack_prompts<'a>(
        prompts: impl IntoIterator<Item = &'a [u8]>,
    ) -> (u32, Vec<u32>, Vec<u8>) {
        let prompts: Vec<&[u8]> = prompts.into_iter().collect();
        let len = prompts.iter().map(|p| p.len()).max().unwrap_or(0);
        let mut pad = Vec::with_capacity(prompts.len());
        let mut bytes = Vec::with_capacity(prompts.len() * len * 8);
        for p in &prompts {
            pad.push((len - p.len()) as u32);
            for _ in p.len()..len {
                bytes.extend_from_slice(&0i64.to_le_bytes());
            }
            for &t in *p {
                bytes.extend_from_slice(&i64::from(t).to_le_bytes());
            }
        }
        (len as u32, pad, bytes)
    }

    /// A decode call's [`Payload::Tokens`]: one token per row (`[rows, 1]`).
    pub fn pack_tokens(tokens: impl IntoIterator<Item = u8>) -> Vec<u8> {
        tokens
            .into_iter()
            .flat_map(|t| i64::from(t).to_le_bytes())
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_pack_left_padded_and_logits_read_back() {
        use stage::{expected_bytes, f32s, pack_prompts, pack_tokens, Payload};
        let (len, pad, bytes) = pack_prompts([&b"ab"[..], &b"xyz"[..], &b""[..]]);
        assert_eq!((len, pad.clone()), (3, vec![1, 0, 3]));
        assert_eq!(
            expected_bytes(Payload::Tokens, &[3, len]),
            Some(bytes.len() as u64)
        );
        let ids: Vec<i64> = bytes
            .chunks_exact(8)
            .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(ids, [0, 97, 98, 120, 121, 122, 0, 0, 0]);
        assert_eq!(
            pack_prompts(std::iter::empty::<&[u8]>()),
            (0, vec![], vec![])
        );
        let step = pack_tokens([7u8, 255]);
        assert_eq!(step, [7i64.to_le_bytes(), 255i64.to_le_bytes()].concat());
        let v = [1.5f32, -0.25, f32::MAX];
        let raw: Vec<u8> = v.iter().flat_map(|f| f.to_le_bytes()).collect();
        assert_eq!(f32s(&raw), v);
        assert_eq!(f32s(&raw[..5]), [1.5]);
    }
    use crate::membership::{Capabilities, GpuInfo};
    use crate::view::{NodeId, ViewHash};

    fn hb() -> Heartbeat {
        Heartbeat {
            id: NodeId::new("12D3KooWnode").unwrap(),
            incarnation: 3,
            seq: 99,
            view_epoch: 7,
            view_hash: ViewHash([5; 32]),
            caps: Capabilities {
                cores: 2,
                ram_bytes: 24 << 30,
                gpus: vec![GpuInfo {
                    name: "H200".into(),
                    total_bytes: 141 << 30,
                    free_bytes: 140 << 30,
                }],
                speed_mflops: 9000,
            },
            addrs: vec!["/ip4/127.0.0.1/tcp/4001".into()],
            data_addr: None,
        }
    }

    #[test]
    fn roundtrip() {
        let m = ControlMessage::Heartbeat(hb());
        let bytes = m.encode().unwrap();
        assert_eq!(ControlMessage::decode(&bytes).unwrap(), m);
    }

    #[test]
    fn hostile_inputs_are_errors() {
        let bytes = ControlMessage::Heartbeat(hb()).encode().unwrap();
        // Every truncation fails cleanly.
        for cut in 0..bytes.len() {
            assert!(ControlMessage::decode(&bytes[..cut]).is_err(), "cut {cut}");
        }
        // Trailing bytes.
        let mut long = bytes.clone();
        long.push(0);
        assert!(matches!(
            ControlMessage::decode(&long),
            Err(CodecError::Trailing(1))
        ));
        // Over the limit before parsing.
        let big = vec![0u8; MAX_CONTROL_MESSAGE + 1];
        assert!(matches!(
            ControlMessage::decode(&big),
            Err(CodecError::TooLarge { .. })
        ));
        // A string length of u64::MAX: varint 0xFF + 8 bytes. Must not allocate.
        let mut evil = vec![0u8]; // variant 0 = Heartbeat
        evil.push(0xFF);
        evil.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(ControlMessage::decode(&evil).is_err());
        // Random garbage never panics.
        let mut x: u64 = 0x9E3779B97F4A7C15;
        for _ in 0..2000 {
            let len = (x % 200) as usize;
            let buf: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = ControlMessage::decode(&buf);
        }
    }

    #[test]
    fn nccl_id_length_is_checked() {
        let ok = ControlMessage::NcclId {
            view_hash: ViewHash([1; 32]),
            id: vec![7; NCCL_ID_LEN],
        };
        assert_eq!(ControlMessage::decode(&ok.encode().unwrap()).unwrap(), ok);
        let bad = ControlMessage::NcclId {
            view_hash: ViewHash([1; 32]),
            id: vec![7; NCCL_ID_LEN + 1],
        };
        assert!(ControlMessage::decode(&bad.encode().unwrap()).is_err());
    }

    #[test]
    fn job_spec_size_is_checked() {
        let ok = ControlMessage::Job {
            run: 9,
            resume: true,
            spec: "name = \"x\"\n".into(),
        };
        assert_eq!(ControlMessage::decode(&ok.encode().unwrap()).unwrap(), ok);
        let big = ControlMessage::Job {
            run: 9,
            resume: false,
            spec: "#".repeat(MAX_JOB_SPEC + 1),
        };
        assert!(matches!(
            ControlMessage::decode(&big.encode().unwrap()),
            Err(CodecError::Invalid(_))
        ));
        let mut truncated = ok.encode().unwrap();
        truncated.pop();
        assert!(ControlMessage::decode(&truncated).is_err());
    }

    #[test]
    fn data_plane_address_decodes_typed_or_not_at_all() {
        let mut h = hb();
        h.data_addr = Some("tcp/127.0.0.1:5000".parse().unwrap());
        let m = ControlMessage::Heartbeat(h);
        let bytes = m.encode().unwrap();
        assert_eq!(ControlMessage::decode(&bytes).unwrap(), m);
        // The same bytes with another transport name, then with a socket address that is
        // not one: both refused as malformed. (The address is the last `tcp/`: the
        // multiaddr before it holds one too.)
        let at = bytes
            .windows(4)
            .rposition(|w| w == b"tcp/")
            .expect("the address travels as its text");
        let mut udp = bytes.clone();
        udp[at..at + 3].copy_from_slice(b"udp");
        assert!(matches!(
            ControlMessage::decode(&udp),
            Err(CodecError::Malformed(_))
        ));
        let mut port = bytes.clone();
        port[at + 14..at + 18].copy_from_slice(b"99x9");
        assert!(matches!(
            ControlMessage::decode(&port),
            Err(CodecError::Malformed(_))
        ));
    }

    #[test]
    fn semantic_validation() {
        let mut h = hb();
        h.addrs = vec!["x".into(); 100];
        let bytes = ControlMessage::Heartbeat(h).encode().unwrap();
        assert!(matches!(
            ControlMessage::decode(&bytes),
            Err(CodecError::Invalid(_))
        ));
    }

    #[test]
    fn hostile_stage_frames_are_errors() {
        use super::stage::*;
        let fwd = StageRequest::Forward {
            model: [3; 32],
            rows: vec![9, 10],
            start: 0,
            end: 2,
            shape: vec![2, 5],
            prefill: true,
            pad: vec![0, 1],
            input: Payload::Tokens,
            output: Payload::Hidden,
        };
        let bytes = fwd.encode().unwrap();
        assert_eq!(StageRequest::decode(&bytes).unwrap(), fwd);
        for cut in 0..bytes.len() {
            assert!(StageRequest::decode(&bytes[..cut]).is_err(), "cut {cut}");
        }
        let mut long = bytes.clone();
        long.push(0);
        assert!(matches!(
            StageRequest::decode(&long),
            Err(CodecError::Trailing(1))
        ));
        // Length prefixes: one over the limit, and u64::MAX, are refused before any read.
        assert!(meta_len(((MAX_STAGE_META + 1) as u32).to_le_bytes()).is_err());
        assert!(meta_len(u32::MAX.to_le_bytes()).is_err());
        assert_eq!(
            meta_len((MAX_STAGE_META as u32).to_le_bytes()).unwrap(),
            MAX_STAGE_META
        );
        assert!(payload_len((MAX_STAGE_PAYLOAD + 1).to_le_bytes()).is_err());
        assert!(payload_len(u64::MAX.to_le_bytes()).is_err());
        // Semantic checks: paddings per row, layer ranges, batch bounds, fetch sizes.
        let bad = |r: StageRequest| StageRequest::decode(&r.encode().unwrap()).is_err();
        let with = |f: &dyn Fn(&mut StageRequest)| {
            let mut r = fwd.clone();
            f(&mut r);
            r
        };
        assert!(bad(with(
            &|r| if let StageRequest::Forward { pad, .. } = r {
                pad.push(0)
            }
        )));
        assert!(bad(with(
            &|r| if let StageRequest::Forward { start, end, .. } = r {
                (*start, *end) = (2, 2)
            }
        )));
        assert!(bad(with(&|r| if let StageRequest::Forward {
            shape, pad, rows, ..
        } = r
        {
            *shape = vec![MAX_BATCH + 1, 1];
            *pad = vec![0; MAX_BATCH as usize + 1];
            *rows = (0..u64::from(MAX_BATCH) + 1).collect();
        })));
        assert!(bad(StageRequest::Fetch {
            model: [0; 32],
            offset: 0,
            len: MAX_STAGE_PAYLOAD + 1
        }));
        // A reply may not claim a 5-d payload; expected sizes never overflow.
        let r = StageReply::Ok {
            payload: Payload::Hidden,
            shape: vec![1; 5],
        };
        assert!(StageReply::decode(&r.encode().unwrap()).is_err());
        assert_eq!(expected_bytes(Payload::Hidden, &[u32::MAX; 4]), None);
        assert_eq!(expected_bytes(Payload::Tokens, &[2, 5]), Some(80));
        // Random garbage never panics.
        let mut x: u64 = 0x2545F4914F6CDD1D;
        for _ in 0..2000 {
            let len = (x % 120) as usize;
            let buf: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            let _ = StageRequest::decode(&buf);
            let _ = StageReply::decode(&buf);
        }
    }

    #[test]
    fn serve_announcements_are_checked() {
        let ok = ServeAnnounce {
            name: "arith-1".into(),
            sha256: [1; 32],
            bytes: 1000,
            origin: NodeId::new("12D3KooWnode").unwrap(),
            config: "{}".into(),
            stages: 2,
        };
        let m = ControlMessage::Serve(ok.clone());
        assert_eq!(ControlMessage::decode(&m.encode().unwrap()).unwrap(), m);
        let bad = |f: &dyn Fn(&mut ServeAnnounce)| {
            let mut a = ok.clone();
            f(&mut a);
            ControlMessage::decode(&ControlMessage::Serve(a).encode().unwrap()).is_err()
        };
        assert!(bad(&|a| a.name = String::new()));
        assert!(bad(&|a| a.name = "a b".into()));
        assert!(bad(&|a| a.name = "x".repeat(MAX_MODEL_NAME + 1)));
        assert!(bad(&|a| a.config = " ".repeat(MAX_MODEL_CONFIG + 1)));
        assert!(bad(&|a| a.stages = 0));
        assert!(bad(&|a| a.stages = MAX_STAGES + 1));
        assert!(bad(&|a| a.bytes = 0));
        assert!(bad(&|a| a.bytes = stage::MAX_STAGE_PAYLOAD + 1));
    }
}

/// Data plane: the fixed-size header that opens every collective on a link. Payloads that
/// follow are raw little-endian elements whose sizes both sides derive from the header, so
/// no length on the wire is ever trusted for an allocation.
pub mod data {
    use super::CodecError;
    use crate::collective::{DType, Kind};
    use crate::view::ViewHash;

    /// Magic bytes of an operation header.
    pub const OP_MAGIC: [u8; 4] = *b"SHOP";
    /// Wire version.
    pub const VERSION: u8 = 1;
    /// Encoded size of [`OpHeader`].
    pub const OP_HEADER_LEN: usize = 4 + 1 + 1 + 4 + 1 + 32 + 8 + 8 + 4 + 4;
    /// Largest collective payload accepted, in bytes (per member buffer). Default: 16 GiB.
    pub const MAX_COLLECTIVE_BYTES: u64 = 16 << 30;
    /// Largest view a collective may span.
    pub const MAX_MEMBERS: u32 = 4096;

    /// What a link is about to carry.
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub struct OpHeader {
        /// The view the sender is in.
        pub view_hash: ViewHash,
        /// Distinguishes concurrent collectives (e.g. gradient buckets).
        pub tag: u64,
        /// The collective.
        pub kind: Kind,
        /// Element type.
        pub dtype: DType,
        /// Elements in each member's buffer.
        pub len: u64,
        /// Members in the view.
        pub n: u32,
        /// Sender's rank.
        pub rank: u32,
    }

    impl OpHeader {
        /// Fixed-size little-endian encoding.
        pub fn encode(&self) -> [u8; OP_HEADER_LEN] {
            let mut b = [0u8; OP_HEADER_LEN];
            let (code, arg) = self.kind.code();
            b[0..4].copy_from_slice(&OP_MAGIC);
            b[4] = VERSION;
            b[5] = code;
            b[6..10].copy_from_slice(&arg.to_le_bytes());
            b[10] = self.dtype.code();
            b[11..43].copy_from_slice(&self.view_hash.0);
            b[43..51].copy_from_slice(&self.tag.to_le_bytes());
            b[51..59].copy_from_slice(&self.len.to_le_bytes());
            b[59..63].copy_from_slice(&self.n.to_le_bytes());
            b[63..67].copy_from_slice(&self.rank.to_le_bytes());
            b
        }

        /// Decodes and bounds-checks a header.
        pub fn decode(b: &[u8]) -> Result<OpHeader, CodecError> {
            if b.len() != OP_HEADER_LEN {
                return Err(CodecError::Malformed(format!(
                    "op header of {} bytes, expected {OP_HEADER_LEN}",
                    b.len()
                )));
            }
            if b[0..4] != OP_MAGIC {
                return Err(CodecError::Malformed("bad op header magic".into()));
            }
            if b[4] != VERSION {
                return Err(CodecError::Malformed(format!(
                    "op header version {}, expected {VERSION}",
                    b[4]
                )));
            }
            let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().unwrap());
            let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
            let kind = Kind::from_code(b[5], u32_at(6))
                .ok_or_else(|| CodecError::Malformed(format!("unknown collective {}", b[5])))?;
            let dtype = DType::from_code(b[10])
                .ok_or_else(|| CodecError::Malformed(format!("unknown dtype {}", b[10])))?;
            let mut hash = [0u8; 32];
            hash.copy_from_slice(&b[11..43]);
            let h = OpHeader {
                view_hash: ViewHash(hash),
                tag: u64_at(43),
                kind,
                dtype,
                len: u64_at(51),
                n: u32_at(59),
                rank: u32_at(63),
            };
            let bytes = h.len.checked_mul(dtype.size() as u64);
            if bytes.is_none_or(|b| b > MAX_COLLECTIVE_BYTES) {
                return Err(CodecError::Invalid(format!(
                    "collective of {} elements exceeds {MAX_COLLECTIVE_BYTES} bytes",
                    h.len
                )));
            }
            if h.n == 0 || h.n > MAX_MEMBERS || h.rank >= h.n {
                return Err(CodecError::Invalid(format!(
                    "rank {} of {} members",
                    h.rank, h.n
                )));
            }
            if let Kind::Broadcast { root } = kind {
                if root >= h.n {
                    return Err(CodecError::Invalid(format!(
                        "broadcast root {root} of {}",
                        h.n
                    )));
                }
            }
            Ok(h)
        }
    }

    /// Magic bytes of a data-plane handshake frame.
    pub const HELLO_MAGIC: [u8; 4] = *b"SHDH";
    /// Longest public key (libp2p protobuf encoding) accepted in a handshake.
    pub const MAX_PUBLIC_KEY: usize = 1024;
    /// Longest signature accepted in a handshake.
    pub const MAX_SIGNATURE: usize = 1024;

    /// Reads a `u16` length prefix and checks it against `max`; returns the length.
    pub fn checked_len(prefix: [u8; 2], max: usize, what: &str) -> Result<usize, CodecError> {
        let len = u16::from_le_bytes(prefix) as usize;
        if len == 0 || len > max {
            return Err(CodecError::Invalid(format!(
                "{what} of {len} bytes (allowed 1..={max})"
            )));
        }
        Ok(len)
    }

    /// Checks the fixed prefix of a handshake frame: magic and version.
    pub fn check_hello_prefix(b: &[u8; 5]) -> Result<(), CodecError> {
        if b[0..4] != HELLO_MAGIC {
            return Err(CodecError::Malformed(
                "not a shoal data-plane handshake".into(),
            ));
        }
        if b[4] != VERSION {
            return Err(CodecError::Malformed(format!(
                "data-plane version {}, expected {VERSION}",
                b[4]
            )));
        }
        Ok(())
    }

    #[cfg(test)]
    mod tests {
        use super::*;
        use crate::collective::ReduceOp;

        fn h() -> OpHeader {
            OpHeader {
                view_hash: ViewHash([9; 32]),
                tag: 77,
                kind: Kind::AllReduce(ReduceOp::Avg),
                dtype: DType::BF16,
                len: 1_000_003,
                n: 3,
                rank: 2,
            }
        }

        #[test]
        fn roundtrip_and_hostile() {
            let b = h().encode();
            assert_eq!(OpHeader::decode(&b).unwrap(), h());
            assert!(OpHeader::decode(&b[..OP_HEADER_LEN - 1]).is_err());
            let mut long = b.to_vec();
            long.push(0);
            assert!(OpHeader::decode(&long).is_err());
            let mut x = b;
            x[51..59].copy_from_slice(&u64::MAX.to_le_bytes());
            assert!(OpHeader::decode(&x).is_err(), "u64::MAX elements");
            let mut x = b;
            x[51..59].copy_from_slice(&((MAX_COLLECTIVE_BYTES / 2) + 1).to_le_bytes());
            assert!(OpHeader::decode(&x).is_err(), "one element over the limit");
            let mut x = b;
            x[51..59].copy_from_slice(&(MAX_COLLECTIVE_BYTES / 2).to_le_bytes());
            assert!(OpHeader::decode(&x).is_ok(), "exactly at the limit");
            let mut x = b;
            x[10] = 99;
            assert!(OpHeader::decode(&x).is_err(), "unknown dtype");
            let mut x = b;
            x[63..67].copy_from_slice(&3u32.to_le_bytes());
            assert!(OpHeader::decode(&x).is_err(), "rank out of range");
            let mut x = b;
            x[0] = b'X';
            assert!(OpHeader::decode(&x).is_err(), "magic");
        }
    }
}
