//! Compressed collectives: the wire forms of f32 buffers that an all-reduce carries in
//! fewer bytes, always summed in f32 by the receiver.
//!
//! - `bf16`: each value rounded to bfloat16 (to nearest, ties to even; 2 bytes).
//! - `int8`: values in blocks of [`INT8_BLOCK`]; each block is its scale (an f32, the
//!   block's largest magnitude / 127) followed by one signed byte per value, the value over
//!   the scale rounded to nearest (`|q| ≤ 127`); a block of zeros has scale 0.
//!
//! A ring all-reduce under compression encodes what it sends at every reduce-scatter hop
//! (the receiver decodes and adds in f32), then the owner of each reduced chunk replaces
//! its chunk by the decoding of its encoding and sends those bytes round the all-gather,
//! where they are forwarded unchanged: every member ends with bit-identical values. Pure
//! functions over slices; [`decode_add`] and [`decode_into`] check the byte count, so
//! bytes from a peer are never read past their end.

use crate::collective::DType;
use serde::{Deserialize, Serialize};

/// Values per int8 block (one f32 scale each): 1024, an overhead of 4 bytes per 1024.
pub const INT8_BLOCK: usize = 1024;

/// How an all-reduce's f32 payload travels.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    /// f32 as it is (4 bytes a value).
    #[default]
    None,
    /// bfloat16 (2 bytes a value), summed in f32.
    Bf16,
    /// int8 with an f32 scale per [`INT8_BLOCK`] values (~1 byte a value), summed in f32.
    Int8,
}

/// A compressed payload that does not have the size its element count implies.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a {compression:?} payload of {values} values must be {expected} bytes, got {got}")]
pub struct WireSizeError {
    /// The payload's form.
    pub compression: Compression,
    /// Values it should hold.
    pub values: usize,
    /// Bytes it should have.
    pub expected: usize,
    /// Bytes it had.
    pub got: usize,
}

impl Compression {
    /// Bytes on the wire for `n` values.
    pub fn wire_bytes(self, n: usize) -> usize {
        match self {
            Compression::None => 4 * n,
            Compression::Bf16 => 2 * n,
            Compression::Int8 => n + 4 * n.div_ceil(INT8_BLOCK),
        }
    }

    /// The dtype its collectives announce in their header (peers that disagree refuse the
    /// operation before any payload moves).
    pub fn dtype(self) -> DType {
        match self {
            Compression::None => DType::F32,
            Compression::Bf16 => DType::Bf16Sum,
            Compression::Int8 => DType::Int8Block,
        }
    }

    /// Its name in job files and on the command line: `none`, `bf16`, `int8`.
    pub fn name(self) -> &'static str {
        match self {
            Compression::None => "none",
            Compression::Bf16 => "bf16",
            Compression::Int8 => "int8",
        }
    }
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Compression, String> {
        match s {
            "none" => Ok(Compression::None),
            "bf16" => Ok(Compression::Bf16),
            "int8" => Ok(Compression::Int8),
            _ => Err(format!("{s:?} is not none, bf16 or int8")),
        }
    }
}

/// `x` rounded to bfloat16 (nearest, ties to even; NaN stays NaN), as its 16 bits.
/// Branch-free, so loops over it vectorize.
#[inline]
pub fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16;
    let nan = (b & 0x7FFF_FFFF) > 0x7F80_0000;
    (if nan { (b >> 16) | 0x40 } else { rounded }) as u16
}

/// The f32 of bfloat16 bits `h` (exact).
#[inline]
pub fn from_bf16(h: u16) -> f32 {
    f32::from_bits(u32::from(h) << 16)
}

/// Appends the encoding of `src` to `out` (`wire_bytes(src.len())` bytes).
pub fn encode(c: Compression, src: &[f32], out: &mut Vec<u8>) {
    let at = out.len();
    out.resize(at + c.wire_bytes(src.len()), 0);
    let dst = &mut out[at..];
    match c {
        Compression::None => {
            for (d, x) in dst.chunks_exact_mut(4).zip(src) {
                d.copy_from_slice(&x.to_le_bytes());
            }
        }
        Compression::Bf16 => {
            for (d, x) in dst.chunks_exact_mut(2).zip(src) {
                d.copy_from_slice(&to_bf16(*x).to_le_bytes());
            }
        }
        Compression::Int8 => {
            let mut at = 0;
            for block in src.chunks(INT8_BLOCK) {
                let max = block.iter().fold(0f32, |m, x| m.max(x.abs()));
                let scale = if max.is_finite() {
                    max / 127.0
                } else {
                    f32::NAN
                };
                dst[at..at + 4].copy_from_slice(&scale.to_le_bytes());
                let inv = if scale > 0.0 { 1.0 / scale } else { 0.0 };
                // Round to nearest even by the 1.5·2^23 trick (|x·inv| ≤ 127 here): plain
                // float adds, which vectorize where `round` is a library call.
                const MAGIC: f32 = 12_582_912.0;
                for (d, x) in dst[at + 4..at + 4 + block.len()].iter_mut().zip(block) {
                    let q = ((x * inv).clamp(-127.0, 127.0) + MAGIC) - MAGIC;
                    *d = q as i8 as u8;
                }
                at += 4 + block.len();
            }
        }
    }
}

/// Decodes `bytes` (the encoding of `dst.len()` values) and hands each value to `f` with
/// its place in `dst`.
fn decode_with(
    c: Compression,
    bytes: &[u8],
    dst: &mut [f32],
    f: impl Fn(&mut f32, f32),
) -> Result<(), WireSizeError> {
    let expected = c.wire_bytes(dst.len());
    if bytes.len() != expected {
        return Err(WireSizeError {
            compression: c,
            values: dst.len(),
            expected,
            got: bytes.len(),
        });
    }
    match c {
        Compression::None => {
            for (d, b) in dst.iter_mut().zip(bytes.chunks_exact(4)) {
                f(d, f32::from_le_bytes([b[0], b[1], b[2], b[3]]));
            }
        }
        Compression::Bf16 => {
            for (d, b) in dst.iter_mut().zip(bytes.chunks_exact(2)) {
                f(d, from_bf16(u16::from_le_bytes([b[0], b[1]])));
            }
        }
        Compression::Int8 => {
            let mut at = 0;
            for block in dst.chunks_mut(INT8_BLOCK) {
                let s = &bytes[at..at + 4];
                let scale = f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
                let q = &bytes[at + 4..at + 4 + block.len()];
                for (d, &v) in block.iter_mut().zip(q) {
                    f(d, f32::from(v as i8) * scale);
                }
                at += 4 + block.len();
            }
        }
    }
    Ok(())
}

/// `dst[i] += decode(bytes)[i]`, in f32.
pub fn decode_add(c: Compression, bytes: &[u8], dst: &mut [f32]) -> Result<(), WireSizeError> {
    decode_with(c, bytes, dst, |d, v| *d += v)
}

/// `dst[i] = decode(bytes)[i]`.
pub fn decode_into(c: Compression, bytes: &[u8], dst: &mut [f32]) -> Result<(), WireSizeError> {
    decode_with(c, bytes, dst, |d, v| *d = v)
}

/// `err[i] = src[i] - decode(bytes)[i]`: what encoding `src` as `bytes` lost (the error
/// that error feedback carries to the next round). `err` and `src` have the same length.
pub fn encode_error(
    c: Compression,
    bytes: &[u8],
    src: &[f32],
    err: &mut [f32],
) -> Result<(), WireSizeError> {
    err.copy_from_slice(src);
    decode_with(c, bytes, err, |d, v| *d -= v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut z = seed;
        (0..n)
            .map(|i| {
                z = z
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = (z >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                // Magnitudes over six decades, as gradients have.
                u * 10f32.powi((i % 7) as i32 - 4)
            })
            .collect()
    }

    fn round_trip(c: Compression, src: &[f32]) -> Vec<f32> {
        let mut bytes = Vec::new();
        encode(c, src, &mut bytes);
        assert_eq!(bytes.len(), c.wire_bytes(src.len()));
        let mut out = vec![0f32; src.len()];
        decode_into(c, &bytes, &mut out).unwrap();
        out
    }

    #[test]
    fn bf16_rounds_to_nearest_even_and_keeps_specials() {
        assert_eq!(to_bf16(1.0), 0x3F80);
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: ties go to even (1).
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3F80);
        // 1 + 3·2^-8 is halfway between 1 + 2^-7 and 1 + 2^-6: to even (1 + 2^-6).
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3F82);
        assert_eq!(from_bf16(to_bf16(-2.5)), -2.5);
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
        assert_eq!(from_bf16(to_bf16(f32::INFINITY)), f32::INFINITY);
        assert_eq!(from_bf16(to_bf16(f32::MAX)), f32::INFINITY);
        for x in values(10_000, 1) {
            let y = from_bf16(to_bf16(x));
            assert!((x - y).abs() <= x.abs() * 2f32.powi(-8), "{x} -> {y}");
        }
    }

    #[test]
    fn round_trips_stay_within_their_bounds() {
        let src = values(5 * INT8_BLOCK + 17, 2);
        assert_eq!(round_trip(Compression::None, &src), src);
        let b = round_trip(Compression::Bf16, &src);
        for (x, y) in src.iter().zip(&b) {
            assert!((x - y).abs() <= x.abs() * 2f32.powi(-8));
        }
        // int8: each value within half a step (scale / 2) of its block's grid.
        let q = round_trip(Compression::Int8, &src);
        for (block, out) in src.chunks(INT8_BLOCK).zip(q.chunks(INT8_BLOCK)) {
            let scale = block.iter().fold(0f32, |m, x| m.max(x.abs())) / 127.0;
            for (x, y) in block.iter().zip(out) {
                assert!((x - y).abs() <= scale * 0.5 * (1.0 + 1e-5), "{x} -> {y}");
            }
        }
        // Zeros stay zeros; encoding what was decoded gives the same bytes (bf16).
        assert_eq!(round_trip(Compression::Int8, &[0.0; 10]), [0.0; 10]);
        assert_eq!(round_trip(Compression::Bf16, &b), b);
    }

    #[test]
    fn decoding_adds_in_f32_and_checks_the_size() {
        let src = values(3000, 3);
        for c in [Compression::None, Compression::Bf16, Compression::Int8] {
            let mut bytes = Vec::new();
            encode(c, &src, &mut bytes);
            let mut acc = vec![1.0f32; src.len()];
            decode_add(c, &bytes, &mut acc).unwrap();
            let rt = round_trip(c, &src);
            for i in 0..src.len() {
                assert_eq!(acc[i], 1.0 + rt[i]);
            }
            for bad in [bytes.len() - 1, bytes.len() + 1, 0] {
                let mut b = bytes.clone();
                b.resize(bad, 0);
                let e = decode_add(c, &b, &mut acc).unwrap_err();
                assert_eq!((e.expected, e.got), (bytes.len(), bad));
            }
        }
        assert_eq!(Compression::Int8.wire_bytes(2048), 2048 + 8);
        assert_eq!(Compression::Int8.wire_bytes(1), 5);
        assert_eq!("int8".parse::<Compression>(), Ok(Compression::Int8));
        assert!("fp8".parse::<Compression>().is_err());
    }
}
