//! The element types collectives move (f32, f16, bf16): their wire dtype, how they are
//! summed and averaged, and their raw little-endian byte view (payloads are never encoded
//! element by element).

use coordinator_free::DType;

/// What can travel as raw bytes: plain little-endian values without padding, every bit
/// pattern valid (the elements, and the bytes of compressed payloads).
pub trait Raw: Copy + Send + Sync + Default + 'static {}
impl Raw for u8 {}
impl Raw for f32 {}
impl Raw for half::f16 {}
impl Raw for half::bf16 {}

/// Element types: f32, f16 and bf16.
pub trait Element: Raw + PartialEq + std::fmt::Debug {
    /// Wire dtype.
    const DTYPE: DType;
    /// `dst[i] += src[i]`.
    fn add_into(dst: &mut [Self], src: &[Self]);
    /// `dst[i] /= n`.
    fn div_by(dst: &mut [Self], n: usize);
    /// `dst[i] += src[i]` for `src` the little-endian bytes of `dst.len()` values, at
    /// any alignment (the chunks of a received datagram).
    fn add_le_bytes(dst: &mut [Self], src: &[u8]);
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    fn add_into(dst: &mut [f32], src: &[f32]) {
        for (d, s) in dst.iter_mut().zip(src) {
            *d += *s;
        }
    }
    fn div_by(dst: &mut [f32], n: usize) {
        let n = n as f32;
        for d in dst {
            *d /= n;
        }
    }
    fn add_le_bytes(dst: &mut [f32], src: &[u8]) {
        for (d, s) in dst.iter_mut().zip(src.chunks_exact(4)) {
            *d += f32::from_le_bytes([s[0], s[1], s[2], s[3]]);
        }
    }
}

macro_rules! half_element {
    ($t:ty, $d:expr) => {
        impl Element for $t {
            const DTYPE: DType = $d;
            fn add_into(dst: &mut [$t], src: &[$t]) {
                for (d, s) in dst.iter_mut().zip(src) {
                    *d = <$t>::from_f32(d.to_f32() + s.to_f32());
                }
            }
            fn div_by(dst: &mut [$t], n: usize) {
                let n = n as f32;
                for d in dst {
                    *d = <$t>::from_f32(d.to_f32() / n);
                }
            }
            fn add_le_bytes(dst: &mut [$t], src: &[u8]) {
                for (d, s) in dst.iter_mut().zip(src.chunks_exact(2)) {
                    let s = <$t>::from_bits(u16::from_le_bytes([s[0], s[1]]));
                    *d = <$t>::from_f32(d.to_f32() + s.to_f32());
                }
            }
        }
    };
}
half_element!(half::f16, DType::F16);
half_element!(half::bf16, DType::BF16);

/// `dst[i] += x[i]` for `x` the values whose little-endian bytes are `chunks`, in order
/// (a value may straddle two chunks). Chunks beyond `dst`'s bytes are ignored; a shortfall
/// leaves the rest of `dst` unchanged (the reader hands over exactly `dst`'s bytes).
pub(super) fn add_chunks<T: Element>(dst: &mut [T], chunks: &[bytes::Bytes]) {
    let size = std::mem::size_of::<T>();
    let mut at = 0; // next value of `dst`
    let mut carry = [0u8; 8]; // a value split across chunks (size <= 8)
    let mut have = 0;
    for chunk in chunks {
        let mut c = &chunk[..];
        if have > 0 {
            let take = (size - have).min(c.len());
            carry[have..have + take].copy_from_slice(&c[..take]);
            have += take;
            c = &c[take..];
            if have < size {
                continue;
            }
            if at < dst.len() {
                T::add_le_bytes(&mut dst[at..at + 1], &carry[..size]);
            }
            at += 1;
        }
        let whole = (c.len() / size).min(dst.len().saturating_sub(at));
        T::add_le_bytes(&mut dst[at..at + whole], &c[..whole * size]);
        at += whole;
        let rest = &c[whole * size..];
        let keep = rest.len().min(size - 1);
        carry[..keep].copy_from_slice(&rest[..keep]);
        have = keep;
    }
}

/// The bytes of `s`, as they go on the wire.
pub(super) fn bytes_of<T: Raw>(s: &[T]) -> &[u8] {
    // SAFETY: Raw types are plain little-endian values without padding.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u8>(), std::mem::size_of_val(s)) }
}

/// The bytes of `s`, to receive into.
pub(super) fn bytes_of_mut<T: Raw>(s: &mut [T]) -> &mut [u8] {
    // SAFETY: as above; every bit pattern is a valid u8/f32/f16/bf16.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(s)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values split at every possible byte boundary add up as if they were contiguous.
    #[test]
    fn add_chunks_matches_contiguous_add() {
        let src: Vec<f32> = (0..37).map(|i| i as f32 * 0.5 - 3.0).collect();
        let bytes = bytes_of(&src).to_vec();
        for cut in [1, 2, 3, 5, 7, 64, 148] {
            let chunks: Vec<bytes::Bytes> = bytes
                .chunks(cut)
                .map(bytes::Bytes::copy_from_slice)
                .collect();
            let mut dst = vec![1.0f32; src.len()];
            add_chunks(&mut dst, &chunks);
            let want: Vec<f32> = src.iter().map(|x| x + 1.0).collect();
            assert_eq!(dst, want, "chunks of {cut} bytes");
        }
        let halves: Vec<half::bf16> = (0..9).map(|i| half::bf16::from_f32(i as f32)).collect();
        let chunks: Vec<bytes::Bytes> = bytes_of(&halves)
            .chunks(3)
            .map(bytes::Bytes::copy_from_slice)
            .collect();
        let mut dst = vec![half::bf16::from_f32(1.0); 9];
        add_chunks(&mut dst, &chunks);
        let want: Vec<f32> = (0..9).map(|i| i as f32 + 1.0).collect();
        assert_eq!(dst.iter().map(|x| x.to_f32()).collect::<Vec<_>>(), want);
    }
}
