//! Data plane: the fixed-size header that opens every collective on a link. Payloads that
//! follow are raw little-endian elements whose sizes both sides derive from the header, so
//! no length on the wire is ever trusted for an allocation.

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
