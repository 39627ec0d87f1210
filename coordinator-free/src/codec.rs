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
}

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
        }
        Ok(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
    fn semantic_validation() {
        let mut h = hb();
        h.addrs = vec!["x".into(); 100];
        let bytes = ControlMessage::Heartbeat(h).encode().unwrap();
        assert!(matches!(
            ControlMessage::decode(&bytes),
            Err(CodecError::Invalid(_))
        ));
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
