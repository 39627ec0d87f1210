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
    /// Work per second the origin measured computing its own stages of this model
    /// ([`crate::pipeline::Worker::measured`]); 0 while it has computed none.
    pub speed: u64,
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

/// Serving frames between an entry node and pipeline stages.
pub mod stage;

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
                device: "cuda:0".into(),
                device_free_bytes: 139 << 30,
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
    fn the_compute_device_travels_and_is_bounded() {
        // The device and its free memory round-trip through the codec.
        let h = hb();
        let bytes = ControlMessage::Heartbeat(h.clone()).encode().unwrap();
        match ControlMessage::decode(&bytes).unwrap() {
            ControlMessage::Heartbeat(d) => {
                assert_eq!(d.caps.device, "cuda:0");
                assert_eq!(d.caps.device_free_bytes, 139 << 30);
            }
            other => panic!("{other:?}"),
        }
        // Names up to the bound pass (an unannounced device is empty); longer ones or
        // ones with control characters are refused, by `validate` and by the decoder.
        use crate::membership::MAX_DEVICE_NAME;
        for ok in ["", "cpu", "cuda:12", &"d".repeat(MAX_DEVICE_NAME)] {
            let mut h = hb();
            h.caps.device = ok.into();
            assert_eq!(h.validate(), Ok(()), "{ok:?}");
        }
        for bad in ["d".repeat(MAX_DEVICE_NAME + 1), "cuda:0\n".into()] {
            let mut h = hb();
            h.caps.device = bad.clone();
            assert!(h.validate().is_err(), "{bad:?}");
            let bytes = ControlMessage::Heartbeat(h).encode().unwrap();
            assert!(matches!(
                ControlMessage::decode(&bytes),
                Err(CodecError::Invalid(_))
            ));
        }
    }

    #[test]
    fn the_fuzz_seeds_are_valid_messages() {
        // The fuzzer starts from them; a format change must keep them decoding.
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/control_message");
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            if let Err(e) = ControlMessage::decode(&bytes) {
                panic!("{}: {e}", path.display());
            }
        }
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
            sampling: vec![],
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
        // Row samplings: one per row exactly when the answer is sampled, each in range.
        let draw = RowSampling {
            temperature: 0.7,
            top_p: 0.9,
            u: 0.5,
            logprobs: Some(MAX_TOP_LOGPROBS),
        };
        let sampled = |f: &dyn Fn(&mut Vec<RowSampling>)| {
            with(&|r| {
                if let StageRequest::Forward {
                    output, sampling, ..
                } = r
                {
                    *output = Payload::Sampled;
                    *sampling = vec![draw; 2];
                    f(sampling);
                }
            })
        };
        assert!(!bad(sampled(&|_| {})));
        assert!(bad(sampled(&|s| s.truncate(1))));
        assert!(bad(with(
            &|r| if let StageRequest::Forward { sampling, .. } = r {
                *sampling = vec![draw; 2]
            }
        )));
        assert!(bad(sampled(&|s| s[1].u = 1.0)));
        assert!(bad(sampled(&|s| s[0].u = f64::NAN)));
        assert!(bad(sampled(&|s| s[0].temperature = f32::INFINITY)));
        assert!(bad(sampled(&|s| s[0].top_p = f32::NAN)));
        assert!(bad(
            sampled(&|s| s[1].logprobs = Some(MAX_TOP_LOGPROBS + 1))
        ));
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
            speed: 0,
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

/// The header that opens every collective on a data-plane link.
pub mod data;
