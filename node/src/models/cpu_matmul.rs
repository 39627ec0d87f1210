//! `x·Wᵀ` for the few rows of a decode step on the CPU: an AVX-512 kernel that reads `W` in
//! its checkpoint layout (`[out, in]`, each output's weights contiguous), its outputs split
//! over the caller's thread count.
//!
//! A decode step multiplies 1–16 rows (one per request in the batch) by every weight
//! matrix, so it is a stream over the weights with little arithmetic per byte. MKL's sgemm
//! (libtorch's CPU matmul) costs 2.2–3× its one-row time at 8 rows on this work; this kernel
//! lets up to 8 rows share each weight load: a tile is 2 outputs × 8 rows, 16 AVX-512
//! accumulators over the input dimension (1–2 rows: 8 outputs a tile, 3–4 rows: 4), with the
//! weights prefetched ahead. Measured on the ~150 M Llama's maps (16 blocks and the head,
//! one core, this machine drifting ±20%): 8 rows 41–56 ms against MKL's 75–93 ms, 1 row 32–40 ms
//! against MKL's 28–33 ms (served end to end, one request decodes at MKL's speed: 40.7–45.1
//! against 36.2–45.2 ms per token). Above [`MAX_ROWS`] MKL's blocked GEMM wins and the
//! caller uses it.
//!
//! Sums are taken in another order than MKL's (≈1e-7 relative in f32).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Most rows the kernel is used for: 16. Above it MKL's blocked GEMM is faster (the ~150 M
/// Llama's maps on one core: at 16 rows both take 88-116 ms, at 32 rows MKL 113-145 ms
/// against the kernel's 169-196 ms).
pub const MAX_ROWS: usize = 16;

/// Weights prefetched this many floats ahead of the loads (4 KiB; at 8 rows 1024 beat 512,
/// 256 and none by 10-30% in alternating runs).
const PREFETCH: usize = 1024;

/// Whether this CPU runs the kernel (AVX-512F, checked once by `std`'s cached detection).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Fewest outputs a thread is given when [`matmul_nt`] splits the work (below it, starting
/// a thread costs more than it saves): 64.
const MIN_OUTPUTS_PER_THREAD: usize = 64;

/// `y = x·Wᵀ` on up to `threads` threads: `x` is `rows × k`, `w` is `n × k` and `y` is
/// `rows × n`, all row-major. The outputs are split into `threads` ranges (multiples of 8,
/// at least [`MIN_OUTPUTS_PER_THREAD`] each), the first computed on the calling thread and
/// the others on rayon's pool (whose threads sleep between calls; a scoped thread per call
/// cost 20-30 µs each, about 8% of a one-row decode step on two threads).
///
/// # Panics
/// If a slice's length does not match its shape or the CPU lacks AVX-512F (check
/// [`available`] first): both are the caller's bugs, never data-dependent.
pub fn matmul_nt(
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[f32],
    n: usize,
    y: &mut [f32],
    threads: usize,
) {
    assert_eq!(x.len(), rows * k, "x is rows × k");
    assert_eq!(w.len(), n * k, "w is n × k");
    assert_eq!(y.len(), rows * n, "y is rows × n");
    assert!(available(), "the kernel needs AVX-512F");
    let parts = threads.clamp(1, (n / MIN_OUTPUTS_PER_THREAD).max(1));
    let per = n.div_ceil(parts).next_multiple_of(8);
    let op = Operands {
        x: x.as_ptr(),
        k,
        w: w.as_ptr(),
        y: y.as_mut_ptr(),
        n,
    };
    let run = move |part: usize| {
        let cols = (part * per).min(n)..((part + 1) * per).min(n);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: AVX-512F is present (checked above); every pointer the kernel forms stays
        // within the slices, whose shapes were checked above (prefetches use wrapping
        // arithmetic and never dereference); parts write disjoint output columns `cols`
        // of `y`, which outlives the scope below.
        unsafe {
            // Outputs NT at a time, NT chosen so a tile has at most 16 accumulators; beyond
            // 8 rows, each pair of outputs against every block of 8 rows while its weights
            // (2 × k floats) are still in L1.
            match rows {
                0 => {}
                1 | 2 => columns::<8>(rows, op, cols),
                3 | 4 => columns::<4>(rows, op, cols),
                _ => columns::<2>(rows, op, cols),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (cols, op);
    };
    if parts == 1 {
        return run(0);
    }
    rayon::in_place_scope(|s| {
        for part in 1..parts {
            s.spawn(move |_| run(part));
        }
        run(0);
    });
}

/// One product's operands as [`matmul_nt`] checked them: `x` (`· × k`), `w` (`n × k`) and
/// `y` (`· × n`), row-major, shared by the threads of one call, each of which writes its
/// own output columns.
#[derive(Clone, Copy)]
struct Operands {
    x: *const f32,
    k: usize,
    w: *const f32,
    y: *mut f32,
    n: usize,
}

// SAFETY: the threads of one call read `x` and `w` and write disjoint elements of `y`, and
// the call joins them before its borrows of the slices end.
unsafe impl Send for Operands {}
unsafe impl Sync for Operands {}

impl Operands {
    /// The same product from row `r` of `x` and `y` on.
    ///
    /// Safety: `r` is within the rows.
    unsafe fn rows_from(self, r: usize) -> Operands {
        Operands {
            x: self.x.add(r * self.k),
            y: self.y.add(r * self.n),
            ..self
        }
    }
}

/// Outputs `cols`, `NT` at a time (the last few one at a time), against each block of up to
/// 8 rows.
///
/// Safety: AVX-512F; `op` holds `rows` rows; `cols` is within `0..n`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn columns<const NT: usize>(rows: usize, op: Operands, cols: std::ops::Range<usize>) {
    let mut j = cols.start;
    while j < cols.end {
        let whole = cols.end - j >= NT;
        let mut r = 0;
        while r < rows {
            let m = (rows - r).min(8);
            let at = op.rows_from(r);
            if whole {
                tile_dispatch::<NT>(m, at, j);
            } else {
                tile_dispatch::<1>(m, at, j);
            }
            r += m;
        }
        j += if whole { NT } else { 1 };
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile_dispatch<const NT: usize>(m: usize, op: Operands, j: usize) {
    match m {
        1 => tile::<1, NT>(op, j),
        2 => tile::<2, NT>(op, j),
        3 => tile::<3, NT>(op, j),
        4 => tile::<4, NT>(op, j),
        5 => tile::<5, NT>(op, j),
        6 => tile::<6, NT>(op, j),
        7 => tile::<7, NT>(op, j),
        _ => tile::<8, NT>(op, j),
    }
}

/// `y[r, j + t] = Σ_i x[r, i]·w[j + t, i]` for `r < M`, `t < NT`: `M × NT` accumulators of
/// 16 lanes over `k`, the last partial chunk of `k` read with a mask.
///
/// Safety: AVX-512F; `op` holds `M` rows and outputs `j..j + NT`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
// Index loops, not iterators over `acc`: with iterators LLVM kept the accumulators in memory
// (the kernel ran 1.3-1.5x slower).
#[allow(clippy::needless_range_loop)]
unsafe fn tile<const M: usize, const NT: usize>(op: Operands, j: usize) {
    let Operands { x, k, w, y, n } = op;
    let mut acc = [[_mm512_setzero_ps(); NT]; M];
    let wp: [*const f32; NT] = std::array::from_fn(|t| w.add((j + t) * k));
    let whole = k - k % 16;
    let mut i = 0;
    while i < whole {
        for t in 0..NT {
            _mm_prefetch::<_MM_HINT_T0>(wp[t].wrapping_add(i + PREFETCH).cast::<i8>());
        }
        let wv: [__m512; NT] = std::array::from_fn(|t| _mm512_loadu_ps(wp[t].add(i)));
        for r in 0..M {
            let xv = _mm512_loadu_ps(x.add(r * k + i));
            for t in 0..NT {
                acc[r][t] = _mm512_fmadd_ps(xv, wv[t], acc[r][t]);
            }
        }
        i += 16;
    }
    if whole < k {
        let mask: __mmask16 = (1u32 << (k - whole)).wrapping_sub(1) as __mmask16;
        let wv: [__m512; NT] =
            std::array::from_fn(|t| _mm512_maskz_loadu_ps(mask, wp[t].add(whole)));
        for r in 0..M {
            let xv = _mm512_maskz_loadu_ps(mask, x.add(r * k + whole));
            for t in 0..NT {
                acc[r][t] = _mm512_fmadd_ps(xv, wv[t], acc[r][t]);
            }
        }
    }
    for (r, a) in acc.iter().enumerate() {
        for (t, v) in a.iter().enumerate() {
            *y.add(r * n + j + t) = _mm512_reduce_add_ps(*v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A deterministic pseudo-random fill in [-1, 1).
    fn fill(len: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                (s >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    /// Every row count up to past a block of 8, odd output counts (the single-output tile),
    /// input widths off the 16-lane grid (the masked tail) and outputs split over 1-3
    /// threads equal an f64 reference.
    #[test]
    fn matches_reference_on_every_shape_edge() {
        if !available() {
            eprintln!("no AVX-512F: the kernel is not used on this CPU");
            return;
        }
        for &(rows, k, n) in &[
            (1, 16, 2),
            (1, 7, 1),
            (3, 33, 5),
            (8, 64, 8),
            (9, 100, 3),
            (17, 768, 31),
            (24, 2048, 6),
            (5, 40, 200),
            (1, 768, 1000),
        ] {
            let x = fill(rows * k, 1 + rows as u64);
            let w = fill(n * k, 2 + k as u64);
            let check = |y: &[f32], threads: usize| {
                for r in 0..rows {
                    for c in 0..n {
                        let want: f64 = (0..k)
                            .map(|i| x[r * k + i] as f64 * w[c * k + i] as f64)
                            .sum();
                        let got = y[r * n + c] as f64;
                        assert!(
                            (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                            "rows {rows} k {k} n {n} on {threads} threads at ({r}, {c}): \
                             {got} vs {want}"
                        );
                    }
                }
            };
            let mut y = vec![f32::NAN; rows * n];
            for threads in [1, 2, 3] {
                y.fill(f32::NAN);
                matmul_nt(&x, rows, k, &w, n, &mut y, threads);
                check(&y, threads);
            }
        }
    }
}
