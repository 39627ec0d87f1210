//! Serving decisions at the entry node: dynamic batching, replica choice, the response cache,
//! and token sampling.
//!
//! - [`Batcher`] holds requests in arrival order and releases them as a batch once enough
//!   are waiting or the oldest has waited long enough.
//! - [`prefill_groups`] splits the prompts a lane starts into prefill calls of bounded
//!   size, so that no call holds a stage much longer than a decode call does.
//! - [`Balancer`] sends each request to the replica pipeline with the fewest outstanding
//!   requests, rotating among equals.
//! - [`LruCache`] keeps recent responses, evicting the least recently used;
//!   [`Sampling::cache_key`] decides which requests it answers and under what key.
//! - [`SplitMix64`] and [`sample_token`] pick tokens from logits (temperature, nucleus)
//!   deterministically from a seed, so every node and version samples the same tokens.
//!
//! Like the rest of the crate these are plain state machines: time comes in as `now_ms` and
//! randomness as arguments.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::Hash;

/// Batcher settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchConfig {
    /// Most requests in one batch (0 is treated as 1). Default: 8.
    pub max_batch: usize,
    /// Longest the oldest waiting request waits before a smaller batch is released, in
    /// milliseconds. Default: 5.
    pub max_wait_ms: u64,
}

impl Default for BatchConfig {
    fn default() -> Self {
        BatchConfig {
            max_batch: 8,
            max_wait_ms: 5,
        }
    }
}

/// Dynamic batching: a FIFO queue of requests released in batches of up to `max_batch`,
/// once `max_batch` are waiting or the oldest has waited `max_wait_ms`.
#[derive(Clone, Debug)]
pub struct Batcher<T> {
    cfg: BatchConfig,
    /// Waiting requests with their arrival times, oldest first.
    queue: VecDeque<(T, u64)>,
}

impl<T> Batcher<T> {
    /// An empty batcher.
    pub fn new(cfg: BatchConfig) -> Self {
        Batcher {
            cfg,
            queue: VecDeque::new(),
        }
    }

    fn max_batch(&self) -> usize {
        self.cfg.max_batch.max(1)
    }

    /// Queues a request that arrived at `now_ms`.
    pub fn handle_request(&mut self, item: T, now_ms: u64) {
        self.queue.push_back((item, now_ms));
    }

    /// Releases the next batch (up to `max_batch` requests, oldest first) if it is due at
    /// `now_ms`: `max_batch` are waiting, or the oldest has waited at least `max_wait_ms`.
    pub fn poll_batch(&mut self, now_ms: u64) -> Option<Vec<T>> {
        let due = self.poll_timeout()?;
        if now_ms < due {
            return None;
        }
        let n = self.queue.len().min(self.max_batch());
        Some(self.queue.drain(..n).map(|(item, _)| item).collect())
    }

    /// When the next batch is due (absolute milliseconds, possibly already past); `None`
    /// when nothing is waiting.
    pub fn poll_timeout(&self) -> Option<u64> {
        let &(_, oldest) = self.queue.front()?;
        let by_time = oldest.saturating_add(self.cfg.max_wait_ms);
        // A full batch is due as soon as its last request arrived.
        let by_size = self.queue.get(self.max_batch() - 1).map(|&(_, at)| at);
        Some(by_size.map_or(by_time, |at| at.min(by_time)))
    }

    /// Requests waiting.
    pub fn len(&self) -> usize {
        self.queue.len()
    }

    /// Whether no request is waiting.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

/// The prefill calls a lane starts its new rows with: consecutive groups of the rows (by
/// prompt length `lens`, in arrival order) whose padded size (rows × the group's longest
/// prompt) is at most `budget` tokens; a row longer than `budget` goes alone. A stage
/// runs one call at a time, so a long prefill holds it while the other lanes' calls wait
/// behind it, and on a pipeline the next stage idles for as long. Smaller calls
/// interleave with the other lanes' but each streams the stage's weights again: on a
/// 2-stage CPU pipeline with 8 prompts of ~30 tokens per lane, calls of 64 tokens raised
/// the stages' busy time from 0.85-0.91 to 0.89-0.95 and left tokens/s where it was.
/// `budget` 0 is one row per call.
pub fn prefill_groups(lens: &[usize], budget: usize) -> Vec<std::ops::Range<usize>> {
    let mut groups = Vec::new();
    let (mut start, mut longest) = (0, 0);
    for (i, &l) in lens.iter().enumerate() {
        let wider = longest.max(l);
        if i > start && wider * (i + 1 - start) > budget {
            groups.push(start..i);
            (start, longest) = (i, l);
        } else {
            longest = wider;
        }
    }
    if start < lens.len() {
        groups.push(start..lens.len());
    }
    groups
}

/// Replica choice: outstanding requests per replica pipeline, least loaded first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Balancer {
    outstanding: Vec<u32>,
    /// Where the search for the least loaded replica starts; moves past every pick, so
    /// equally loaded replicas take turns.
    cursor: usize,
}

impl Balancer {
    /// A balancer over `replicas` replicas, none busy.
    pub fn new(replicas: usize) -> Self {
        Balancer {
            outstanding: vec![0; replicas],
            cursor: 0,
        }
    }

    /// Picks the replica not in `exclude` with the fewest outstanding requests (ties taken in
    /// turn) and counts the request against it; `None` when every replica is excluded.
    pub fn pick(&mut self, exclude: &[usize]) -> Option<usize> {
        let n = self.outstanding.len();
        let mut best: Option<usize> = None;
        for j in 0..n {
            let i = (self.cursor + j) % n;
            if exclude.contains(&i) {
                continue;
            }
            if best.is_none_or(|b| self.outstanding[i] < self.outstanding[b]) {
                best = Some(i);
            }
        }
        let i = best?;
        self.outstanding[i] = self.outstanding[i].saturating_add(1);
        self.cursor = (i + 1) % n;
        Some(i)
    }

    /// A request on `replica` finished (ignores unknown replicas and never goes below zero).
    pub fn done(&mut self, replica: usize) {
        if let Some(c) = self.outstanding.get_mut(replica) {
            *c = c.saturating_sub(1);
        }
    }

    /// Outstanding requests per replica.
    pub fn outstanding(&self) -> &[u32] {
        &self.outstanding
    }

    /// Starts over with `replicas` replicas, none busy (after a re-plan).
    pub fn reset(&mut self, replicas: usize) {
        self.outstanding.clear();
        self.outstanding.resize(replicas, 0);
        self.cursor = 0;
    }
}

/// A least-recently-used cache (for responses), counting hits and misses. Each operation is
/// O(log n).
#[derive(Clone, Debug)]
pub struct LruCache<K: Eq + Hash + Clone, V: Clone> {
    capacity: usize,
    /// Entries with the stamp of their last use.
    map: HashMap<K, (V, u64)>,
    /// Keys by last use, oldest first.
    order: BTreeMap<u64, K>,
    /// The next stamp.
    clock: u64,
    hits: u64,
    misses: u64,
}

impl<K: Eq + Hash + Clone, V: Clone> LruCache<K, V> {
    /// An empty cache holding at most `capacity` entries (0 stores nothing).
    pub fn new(capacity: usize) -> Self {
        LruCache {
            capacity,
            map: HashMap::new(),
            order: BTreeMap::new(),
            clock: 0,
            hits: 0,
            misses: 0,
        }
    }

    fn stamp(&mut self) -> u64 {
        let s = self.clock;
        self.clock += 1;
        s
    }

    /// The value for `k`, if cached, which becomes the most recently used; counts a hit or
    /// a miss.
    pub fn get(&mut self, k: &K) -> Option<V> {
        let s = self.stamp();
        let Some((v, at)) = self.map.get_mut(k) else {
            self.misses += 1;
            return None;
        };
        self.hits += 1;
        let key = self.order.remove(at).unwrap_or_else(|| k.clone());
        *at = s;
        self.order.insert(s, key);
        Some(v.clone())
    }

    /// Caches `v` under `k` as the most recently used, evicting the least recently used
    /// entries beyond capacity.
    pub fn put(&mut self, k: K, v: V) {
        if self.capacity == 0 {
            return;
        }
        let s = self.stamp();
        if let Some((_, old)) = self.map.insert(k.clone(), (v, s)) {
            self.order.remove(&old);
        }
        self.order.insert(s, k);
        while self.map.len() > self.capacity {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            self.map.remove(&oldest);
        }
    }

    /// Lookups that found a value.
    pub fn hits(&self) -> u64 {
        self.hits
    }

    /// Lookups that found nothing.
    pub fn misses(&self) -> u64 {
        self.misses
    }

    /// Entries cached.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// SplitMix64, a small deterministic random number generator. The algorithm is fixed (it is
/// part of the protocol, not an implementation detail), so a request with a seed samples the
/// same tokens on every node and every version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitMix64 {
    state: u64,
}

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64 { state: seed }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniform number in [0, 1) from the top 53 bits of [`next_u64`](Self::next_u64).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Picks a token from `logits` with the uniform number `u` in [0, 1).
///
/// - `temperature` <= 0 or non-finite: the argmax (ties to the lowest index; NaN logits count
///   as -inf).
/// - Otherwise softmax(logits / temperature), computed stably in f64; then the nucleus: the
///   tokens by probability, highest first (ties by index), up to the first at which the
///   cumulative probability reaches `top_p` (clamped into (0, 1]; non-finite means 1),
///   renormalised; the token is the one whose cumulative interval holds `u`.
/// - If the largest logit is infinite (or all are NaN/-inf) the argmax is returned.
/// - Empty `logits`: 0.
pub fn sample_token(logits: &[f32], temperature: f32, top_p: f32, u: f64) -> usize {
    let logit = |x: f32| {
        if x.is_nan() {
            f64::NEG_INFINITY
        } else {
            x as f64
        }
    };
    let mut argmax = 0usize;
    for (i, &x) in logits.iter().enumerate() {
        if logit(x) > logit(logits[argmax]) {
            argmax = i;
        }
    }
    if logits.is_empty() || !temperature.is_finite() || temperature <= 0.0 {
        return argmax;
    }
    let max = logit(logits[argmax]);
    if !max.is_finite() {
        return argmax;
    }
    let t = temperature as f64;
    let weights: Vec<f64> = logits
        .iter()
        .map(|&x| ((logit(x) - max) / t).exp())
        .collect();
    let total: f64 = weights.iter().sum();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| weights[b].total_cmp(&weights[a]).then(a.cmp(&b)));
    let top_p = if top_p.is_finite() {
        (top_p as f64).min(1.0)
    } else {
        1.0
    };
    // The smallest prefix reaching top_p (at least one token).
    let mut kept = 0usize;
    let mut cum = 0.0f64;
    for &i in &order {
        kept += 1;
        cum += weights[i] / total;
        if cum >= top_p {
            break;
        }
    }
    let nucleus = &order[..kept];
    let mass: f64 = nucleus.iter().map(|&i| weights[i]).sum();
    let u = if u.is_finite() {
        u.clamp(0.0, 1.0)
    } else {
        0.0
    };
    let target = u * mass;
    let mut cum = 0.0f64;
    for &i in nucleus {
        cum += weights[i];
        if cum > target {
            return i;
        }
    }
    // Rounding put `target` at the very top: the last token with any weight.
    nucleus
        .iter()
        .rev()
        .copied()
        .find(|&i| weights[i] > 0.0)
        .unwrap_or(argmax)
}

/// Sampling parameters of one completion.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    /// Most tokens to generate.
    pub max_tokens: u32,
    /// 0 = greedy.
    pub temperature: f32,
    /// Nucleus mass.
    pub top_p: f32,
    /// Seed (drawn at arrival when the client gave none).
    pub seed: u64,
    /// Whether the client fixed the seed.
    pub seeded: bool,
    /// Stop sequences.
    pub stop: Vec<String>,
}

impl Sampling {
    /// Whether the answer is a function of the request alone: greedy (temperature 0), or
    /// sampled from a seed the client gave.
    pub fn deterministic(&self) -> bool {
        self.temperature <= 0.0 || self.seeded
    }

    /// The response-cache key of a completion of `prompt` by `model` with these parameters,
    /// or `None` when the answer must not be cached (sampled without a client seed).
    ///
    /// Equal for requests whose answers are equal: a greedy request's key leaves out
    /// temperature, `top_p` and seed (they change nothing), a seeded request's includes
    /// them. Fields are joined by NUL bytes, with the stop list last in its `Debug` form
    /// (which escapes NUL): the separators a NUL in a prompt could add would leave too few
    /// for the fields after it, so two different requests never share a key.
    pub fn cache_key(&self, model: &str, prompt: &str) -> Option<String> {
        if !self.deterministic() {
            return None;
        }
        let greedy = self.temperature <= 0.0;
        Some(format!(
            "{model}\u{0}{prompt}\u{0}{}\u{0}{}\u{0}{}\u{0}{}\u{0}{:?}",
            self.max_tokens,
            if greedy {
                0
            } else {
                self.temperature.to_bits()
            },
            if greedy { 0 } else { self.top_p.to_bits() },
            if greedy { 0 } else { self.seed },
            self.stop
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn greedy() -> Sampling {
        Sampling {
            max_tokens: 16,
            temperature: 0.0,
            top_p: 1.0,
            seed: 7,
            seeded: false,
            stop: vec!["\n".into()],
        }
    }

    #[test]
    fn prefill_groups_cover_every_row_once_within_the_budget() {
        assert_eq!(
            prefill_groups(&[], 64),
            Vec::<std::ops::Range<usize>>::new()
        );
        assert_eq!(
            prefill_groups(&[30, 32, 34, 20], 64),
            vec![0..2, 2..3, 3..4]
        );
        assert_eq!(prefill_groups(&[30, 32, 34, 20], 70), vec![0..2, 2..4]);
        assert_eq!(
            prefill_groups(&[10, 200, 10, 10], 64),
            vec![0..1, 1..2, 2..4]
        );
        assert_eq!(prefill_groups(&[5, 5, 5], 0), vec![0..1, 1..2, 2..3]);
        assert_eq!(prefill_groups(&[5, 5, 5], usize::MAX), vec![0..3]);
        let mut g = SplitMix64::new(3);
        for _ in 0..500 {
            let lens: Vec<usize> = (0..1 + g.next_u64() % 12)
                .map(|_| 1 + (g.next_u64() % 100) as usize)
                .collect();
            let budget = (g.next_u64() % 300) as usize;
            let groups = prefill_groups(&lens, budget);
            // In order, no gaps, no overlaps, every group within the budget or alone.
            assert_eq!(groups.first().unwrap().start, 0);
            assert_eq!(groups.last().unwrap().end, lens.len());
            for w in groups.windows(2) {
                assert_eq!(w[0].end, w[1].start);
            }
            for r in &groups {
                let longest = lens[r.clone()].iter().max().unwrap();
                assert!(
                    r.len() == 1 || longest * r.len() <= budget,
                    "{lens:?} {budget} {r:?}"
                );
            }
            // Greedy: the next row would not have fit in the group before it.
            for w in groups.windows(2) {
                let longest = lens[w[0].start..=w[1].start].iter().max().unwrap();
                assert!(longest * (w[0].len() + 1) > budget);
            }
        }
    }

    #[test]
    fn equal_requests_share_a_cache_key_and_any_field_that_changes_the_answer_parts_them() {
        let g = greedy();
        let key = |s: &Sampling| s.cache_key("m", "1+1=").expect("deterministic");
        assert_eq!(key(&g), key(&g.clone()));
        // Greedy: temperature 0, so top_p and the seed change nothing.
        let same = Sampling {
            top_p: 0.5,
            seed: 99,
            seeded: true,
            ..g.clone()
        };
        assert_eq!(key(&same), key(&g));
        assert_ne!(g.cache_key("m2", "1+1="), Some(key(&g)));
        assert_ne!(g.cache_key("m", "1+2="), Some(key(&g)));
        for other in [
            Sampling {
                max_tokens: 17,
                ..g.clone()
            },
            Sampling {
                stop: vec![],
                ..g.clone()
            },
            Sampling {
                stop: vec!["\n".into(), "x".into()],
                ..g.clone()
            },
        ] {
            assert_ne!(key(&other), key(&g), "{other:?}");
        }
        // Seeded sampling: temperature, top_p and the seed each change the answer.
        let seeded = Sampling {
            temperature: 0.8,
            seeded: true,
            ..g.clone()
        };
        assert_ne!(key(&seeded), key(&g));
        assert_eq!(key(&seeded), key(&seeded.clone()));
        for other in [
            Sampling {
                temperature: 0.9,
                ..seeded.clone()
            },
            Sampling {
                top_p: 0.9,
                ..seeded.clone()
            },
            Sampling {
                seed: 8,
                ..seeded.clone()
            },
        ] {
            assert_ne!(key(&other), key(&seeded), "{other:?}");
        }
        // A NUL in the prompt cannot forge another request's key.
        let a = g.cache_key("m", "a\u{0}16").unwrap();
        let b = Sampling {
            max_tokens: 160,
            ..g.clone()
        }
        .cache_key("m", "a")
        .unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn sampling_without_a_client_seed_is_not_cached() {
        let s = Sampling {
            temperature: 0.7,
            seeded: false,
            ..greedy()
        };
        assert!(!s.deterministic());
        assert_eq!(s.cache_key("m", "p"), None);
        assert!(greedy().deterministic());
    }

    #[test]
    fn batcher_releases_on_size() {
        let mut b = Batcher::new(BatchConfig {
            max_batch: 3,
            max_wait_ms: 100,
        });
        assert!(b.is_empty());
        assert_eq!(b.poll_timeout(), None);
        assert_eq!(b.poll_batch(0), None);
        b.handle_request(1, 10);
        b.handle_request(2, 11);
        assert_eq!(b.poll_timeout(), Some(110));
        assert_eq!(b.poll_batch(12), None);
        b.handle_request(3, 12);
        b.handle_request(4, 13);
        assert_eq!(b.len(), 4);
        assert_eq!(b.poll_timeout(), Some(12), "full since the third arrived");
        assert_eq!(b.poll_batch(13), Some(vec![1, 2, 3]));
        assert_eq!(b.len(), 1);
        assert_eq!(b.poll_timeout(), Some(113));
        assert_eq!(b.poll_batch(112), None);
        assert_eq!(b.poll_batch(113), Some(vec![4]));
        assert!(b.is_empty());
        assert_eq!(b.poll_timeout(), None);
    }

    #[test]
    fn batcher_releases_on_time_in_fifo_order() {
        let cfg = BatchConfig::default();
        assert_eq!(cfg.max_batch, 8);
        assert_eq!(cfg.max_wait_ms, 5);
        let mut b = Batcher::new(cfg);
        for (i, at) in [(0, 100), (1, 101), (2, 103)] {
            b.handle_request(i, at);
        }
        assert_eq!(b.poll_timeout(), Some(105));
        assert_eq!(b.poll_batch(104), None);
        assert_eq!(b.poll_batch(105), Some(vec![0, 1, 2]));
        // Twenty at once: batches of eight, oldest first.
        for i in 0..20 {
            b.handle_request(i, 200);
        }
        let mut out = Vec::new();
        while let Some(batch) = b.poll_batch(200) {
            assert!(batch.len() <= 8);
            out.push(batch);
        }
        assert_eq!(out.len(), 2);
        assert_eq!(b.len(), 4);
        assert_eq!(b.poll_timeout(), Some(205));
        out.push(b.poll_batch(205).unwrap());
        assert_eq!(out.concat(), (0..20).collect::<Vec<_>>());
        // max_batch 0 acts as 1.
        let mut b = Batcher::new(BatchConfig {
            max_batch: 0,
            max_wait_ms: 5,
        });
        b.handle_request("a", 0);
        b.handle_request("b", 1);
        assert_eq!(b.poll_timeout(), Some(0));
        assert_eq!(b.poll_batch(1), Some(vec!["a"]));
        assert_eq!(b.poll_batch(1), Some(vec!["b"]));
        assert_eq!(b.poll_batch(1), None);
    }

    #[test]
    fn balancer_picks_least_loaded_and_alternates() {
        let mut b = Balancer::new(3);
        assert_eq!(b.pick(&[]), Some(0));
        assert_eq!(b.pick(&[]), Some(1));
        assert_eq!(b.pick(&[]), Some(2));
        assert_eq!(b.outstanding(), &[1, 1, 1]);
        b.done(1);
        assert_eq!(b.pick(&[]), Some(1), "fewest outstanding");
        b.done(0);
        b.done(2);
        assert_eq!(b.outstanding(), &[0, 1, 0]);
        // Ties alternate, even when each request finishes before the next.
        let mut seen = Vec::new();
        for _ in 0..4 {
            let r = b.pick(&[]).unwrap();
            seen.push(r);
            b.done(r);
        }
        assert_eq!(
            seen,
            vec![2, 0, 2, 0],
            "the cursor sits past the last pick (1)"
        );
        b.done(7);
        b.done(0);
        assert_eq!(b.outstanding(), &[0, 1, 0]);
    }

    #[test]
    fn balancer_exclude_and_reset() {
        let mut b = Balancer::new(3);
        assert_eq!(b.pick(&[0]), Some(1));
        assert_eq!(b.pick(&[0, 2]), Some(1));
        assert_eq!(b.pick(&[0, 1, 2]), None);
        assert_eq!(b.outstanding(), &[0, 2, 0]);
        assert_eq!(b.pick(&[1, 9]), Some(2));
        b.reset(2);
        assert_eq!(b.outstanding(), &[0, 0]);
        assert_eq!(b.pick(&[]), Some(0));
        assert_eq!(Balancer::new(0).pick(&[]), None);
    }

    #[test]
    fn lru_evicts_least_recently_used() {
        let mut c = LruCache::new(2);
        assert!(c.is_empty());
        c.put("a", 1);
        c.put("b", 2);
        assert_eq!(c.get(&"a"), Some(1), "refreshes a");
        c.put("c", 3);
        assert_eq!(c.len(), 2);
        assert_eq!(c.get(&"b"), None, "b was least recently used");
        assert_eq!(c.get(&"a"), Some(1));
        assert_eq!(c.get(&"c"), Some(3));
        // Overwriting refreshes too.
        c.put("a", 10);
        c.put("d", 4);
        assert_eq!(c.get(&"c"), None);
        assert_eq!(c.get(&"a"), Some(10));
        assert_eq!(c.get(&"d"), Some(4));
        assert_eq!(c.hits(), 5);
        assert_eq!(c.misses(), 2);
        let mut z = LruCache::new(0);
        z.put(1, 1);
        assert!(z.is_empty());
        assert_eq!(z.get(&1), None);
        assert_eq!(z.misses(), 1);
    }

    #[test]
    fn splitmix_is_reproducible() {
        // Reference output of SplitMix64 seeded with 0.
        assert_eq!(SplitMix64::new(0).next_u64(), 0xE220_A839_7B1D_CDAF);
        let mut a = SplitMix64::new(42);
        let mut b = SplitMix64::new(42);
        let xs: Vec<u64> = (0..100).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..100).map(|_| b.next_u64()).collect();
        assert_eq!(xs, ys);
        assert_ne!(SplitMix64::new(43).next_u64(), xs[0]);
        let mut r = SplitMix64::new(7);
        let mut sum = 0.0;
        for _ in 0..10_000 {
            let x = r.next_f64();
            assert!((0.0..1.0).contains(&x));
            sum += x;
        }
        assert!((sum / 10_000.0 - 0.5).abs() < 0.02);
    }

    fn softmax(logits: &[f32], t: f64) -> Vec<f64> {
        let e: Vec<f64> = logits.iter().map(|&x| (x as f64 / t).exp()).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|x| x / s).collect()
    }

    fn frequencies(logits: &[f32], temperature: f32, top_p: f32, seed: u64) -> Vec<f64> {
        let mut rng = SplitMix64::new(seed);
        let mut counts = vec![0usize; logits.len()];
        let n = 20_000;
        for _ in 0..n {
            counts[sample_token(logits, temperature, top_p, rng.next_f64())] += 1;
        }
        counts.iter().map(|&c| c as f64 / n as f64).collect()
    }

    #[test]
    fn argmax_at_zero_temperature() {
        assert_eq!(sample_token(&[], 1.0, 1.0, 0.5), 0);
        let l = [0.1, 3.0, f32::NAN, 3.0, -1.0];
        for u in [0.0, 0.5, 0.999] {
            assert_eq!(sample_token(&l, 0.0, 1.0, u), 1, "ties to the lowest index");
            assert_eq!(sample_token(&l, -1.0, 0.5, u), 1);
            assert_eq!(sample_token(&l, f32::NAN, 0.5, u), 1);
        }
        assert_eq!(sample_token(&[f32::NAN, 0.0], 0.0, 1.0, 0.0), 1);
        // A tiny top_p keeps only the most likely token.
        let mut rng = SplitMix64::new(1);
        for _ in 0..1000 {
            assert_eq!(sample_token(&l, 1.0, 1e-6, rng.next_f64()), 1);
            assert_eq!(sample_token(&l, 5.0, 0.0, rng.next_f64()), 1);
        }
    }

    #[test]
    fn frequencies_match_softmax() {
        let l = [1.0f32, 2.0, 0.5];
        let want = softmax(&l, 1.0);
        let got = frequencies(&l, 1.0, 1.0, 12345);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 0.02, "{got:?} vs {want:?}");
        }
        // Non-finite top_p means 1.
        let got = frequencies(&l, 1.0, f32::NAN, 99);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 0.02, "{got:?} vs {want:?}");
        }
        // A nucleus of the top two (0.63 + 0.23 >= 0.8), renormalised.
        let got = frequencies(&l, 1.0, 0.8, 7);
        assert_eq!(got[2], 0.0);
        let kept = want[0] + want[1];
        assert!((got[0] - want[0] / kept).abs() < 0.02, "{got:?}");
        assert!((got[1] - want[1] / kept).abs() < 0.02, "{got:?}");
    }

    #[test]
    fn temperature_sharpens_and_flattens() {
        let l = [1.0f32, 2.0, 0.5];
        let cold = frequencies(&l, 0.5, 1.0, 3);
        let warm = frequencies(&l, 1.0, 1.0, 3);
        let hot = frequencies(&l, 4.0, 1.0, 3);
        assert!(cold[1] > warm[1] && warm[1] > hot[1]);
        assert!(cold[2] < warm[2] && warm[2] < hot[2]);
        for (t, got) in [(0.5, &cold), (4.0, &hot)] {
            let want = softmax(&l, t);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 0.02, "t={t}: {got:?} vs {want:?}");
            }
        }
        // Very large logits stay stable.
        let big = [1000.0f32, 1001.0, 999.5];
        let got = frequencies(&big, 1.0, 1.0, 5);
        let want = softmax(&[1.0, 2.0, 0.5], 1.0);
        for (g, w) in got.iter().zip(&want) {
            assert!((g - w).abs() < 0.02, "{got:?} vs {want:?}");
        }
    }
}
