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
}

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
