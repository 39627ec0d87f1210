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
        }
    };
}
half_element!(half::f16, DType::F16);
half_element!(half::bf16, DType::BF16);

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
