//! The element types collectives move (f32, f16, bf16): their wire dtype, how they are
//! summed and averaged, and their raw little-endian byte view (payloads are never encoded
//! element by element).

use coordinator_free::DType;

/// Element types: f32, f16 and bf16.
pub trait Element: Copy + Send + Sync + Default + PartialEq + std::fmt::Debug + 'static {
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
pub(super) fn bytes_of<T: Element>(s: &[T]) -> &[u8] {
    // SAFETY: Element types are plain little-endian floats without padding.
    unsafe { std::slice::from_raw_parts(s.as_ptr().cast::<u8>(), std::mem::size_of_val(s)) }
}

/// The bytes of `s`, to receive into.
pub(super) fn bytes_of_mut<T: Element>(s: &mut [T]) -> &mut [u8] {
    // SAFETY: as above; every bit pattern is a valid f32/f16/bf16.
    unsafe { std::slice::from_raw_parts_mut(s.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(s)) }
}
