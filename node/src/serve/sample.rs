//! What the last stage of a pipeline answers when the entry asks it to sample
//! ([`Payload::Sampled`](coordinator_free::codec::stage::Payload::Sampled)): each row's
//! next token, drawn from its last position's logits as the entry would draw it, with
//! the logprobs the row asked for. Only these few bytes travel back to the entry, not
//! the `[rows, vocab]` logits (8 rows of a 32,000-token vocabulary: 64 bytes instead of
//! 1 MB per lane iteration).

use super::logprobs::rank;
use coordinator_free::codec::stage::{RowSampling, SampledRow};
use coordinator_free::serving::sample_token;

/// Samples every row of `logits` (`[rows, vocab]`, f32) by its [`RowSampling`]; returns
/// the rows and the `top` width to pack them with (the largest any row asked for).
pub fn sample_rows(
    logits: &[f32],
    vocab: usize,
    sampling: &[RowSampling],
) -> (Vec<SampledRow>, usize) {
    let top = sampling
        .iter()
        .filter_map(|s| s.logprobs)
        .max()
        .unwrap_or(0) as usize;
    let rows = logits
        .chunks_exact(vocab.max(1))
        .zip(sampling)
        .map(|(l, s)| {
            let t = sample_token(l, s.temperature, s.top_p, s.u);
            match s.logprobs {
                Some(k) => {
                    let (lp, best) = rank(l, t, k as usize);
                    (t as u32, lp, best)
                }
                None => (t as u32, 0.0, Vec::new()),
            }
        })
        .collect();
    (rows, top)
}

#[cfg(test)]
mod tests {
    use super::*;
    use coordinator_free::codec::stage::{pack_sampled, unpack_sampled};
    use coordinator_free::serving::SplitMix64;

    /// The last stage's answer, through the wire format, is what the entry computed from
    /// the logits before: the same token for every temperature, top_p and draw, and the
    /// same logprobs for the rows that ask.
    #[test]
    fn sampling_on_the_last_stage_equals_sampling_at_the_entry() {
        let vocab = 300;
        let mut g = SplitMix64::new(7);
        for round in 0..50 {
            let rows = 1 + round % 6;
            let logits: Vec<f32> = (0..rows * vocab)
                .map(|_| (g.next_f64() * 12.0 - 6.0) as f32)
                .collect();
            let sampling: Vec<RowSampling> = (0..rows)
                .map(|i| RowSampling {
                    temperature: [0.0, 0.7, 1.0, 1.6][(round + i) % 4],
                    top_p: [1.0, 0.9, 0.3][(round + 2 * i) % 3],
                    u: g.next_f64(),
                    logprobs: [None, Some(0), Some(5), Some(20)][(round + i) % 4],
                })
                .collect();
            let (sampled, top) = sample_rows(&logits, vocab, &sampling);
            let (shape, bytes) = pack_sampled(&sampled, top);
            let back = unpack_sampled(&shape, &bytes, rows, vocab as u32).unwrap();
            for ((l, s), (t, lp, best)) in logits.chunks_exact(vocab).zip(&sampling).zip(back) {
                let want = sample_token(l, s.temperature, s.top_p, s.u);
                assert_eq!(t as usize, want);
                if let Some(k) = s.logprobs {
                    let (want_lp, want_best) = rank(l, want, k as usize);
                    assert_eq!(lp, want_lp);
                    assert_eq!(&best[..k as usize], &want_best[..]);
                }
            }
        }
    }

    #[test]
    fn a_sampled_answer_that_does_not_fit_is_refused() {
        let (shape, bytes) = pack_sampled(&[(3, -0.5, vec![(3, -0.5), (4, -1.0)])], 2);
        assert_eq!(shape, vec![1, 3, 2]);
        assert!(unpack_sampled(&shape, &bytes, 1, 5).is_ok());
        // A token outside the vocabulary, the wrong row count, a short payload.
        assert!(unpack_sampled(&shape, &bytes, 1, 4).is_err());
        assert!(unpack_sampled(&shape, &bytes, 2, 5).is_err());
        assert!(unpack_sampled(&shape, &bytes[..20], 1, 5).is_err());
        assert!(unpack_sampled(&[1, 0, 2], &[], 1, 5).is_err());
        assert!(unpack_sampled(&[1, 3, 3], &bytes, 1, 5).is_err());
    }
}
