//! The fuzz targets' seeds (`fuzz/seeds/hf_*`), mutated deterministically (byte flips,
//! truncations, spliced numbers and bytes), through the parsers the `hf_safetensors_header`,
//! `hf_config` and `hf_index` targets drive: refusals are fine, panics are not. A cheap
//! in-process stand-in for `scripts/fuzz` that runs with the unit tests.

use super::weights::parse_index;
use super::*;
use crate::models::checkpoint::{self, parse_file_header, tensor_from_bytes};
use std::path::{Path, PathBuf};

/// Mutations per target.
const ROUNDS: usize = 2000;

/// Values that sit on the parsers' bounds (lengths, dimensions, widths, offsets).
const NUMBERS: &[&str] = &[
    "0",
    "-1",
    "1",
    "2",
    "3",
    "255",
    "65536",
    "1048576",
    "16777217",
    "262144",
    "262145",
    "4194305",
    "2147483648",
    "4294967296",
    "9223372036854775807",
    "9223372036854775808",
    "18446744073709551615",
    "18446744073709551616",
    "1e308",
    "-0.0",
    "0.5",
    "null",
    "true",
    "\"\"",
    "[]",
    "{}",
];

fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/seeds")
        .join(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let p = e.unwrap().path();
            (p.display().to_string(), std::fs::read(&p).unwrap())
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no seeds in {}", dir.display());
    out
}

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One to three mutations of `seed`.
fn mutate(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut b = seed.to_vec();
    for _ in 0..1 + rng.below(3) {
        let at = rng.below(b.len());
        match rng.below(9) {
            // A byte set to anything.
            0 if !b.is_empty() => b[at] = rng.next() as u8,
            // Truncated.
            1 => b.truncate(at),
            // A run of digits (a number in the JSON) replaced by a bound (most often: the
            // JSON stays valid).
            2..=4 => {
                let Some(start) = (at..b.len()).find(|&i| b[i].is_ascii_digit()) else {
                    continue;
                };
                let end = (start..b.len())
                    .find(|&i| !b[i].is_ascii_digit())
                    .unwrap_or(b.len());
                let n = NUMBERS[rng.below(NUMBERS.len())].as_bytes();
                b.splice(start..end, n.iter().copied());
            }
            // The 8-byte length (safetensors) set to a bound.
            5 if b.len() >= 8 => {
                let len = match rng.below(4) {
                    0 => 0,
                    1 => u64::MAX,
                    2 => checkpoint::MAX_HEADER_BYTES + 1,
                    _ => rng.below(b.len() + 16) as u64,
                };
                b[..8].copy_from_slice(&len.to_le_bytes());
            }
            // A slice of itself spliced in elsewhere.
            6 if !b.is_empty() => {
                let from = rng.below(b.len());
                let len = rng.below((b.len() - from).min(64) + 1);
                let chunk = b[from..from + len].to_vec();
                b.splice(at..at, chunk);
            }
            // A byte removed.
            _ if !b.is_empty() => {
                b.remove(at);
            }
            _ => {}
        }
    }
    b
}

/// Feeds `ROUNDS` mutations of `target`'s seeds (the seeds themselves first) to `check`,
/// which must not panic; the number accepted.
fn run(target: &str, check: impl Fn(&[u8]) -> bool) -> usize {
    let seeds = seeds(target);
    let mut rng = Rng(0x5eed_0000 ^ target.len() as u64);
    let mut accepted = 0;
    for (_, s) in &seeds {
        accepted += usize::from(check(s));
    }
    for i in 0..ROUNDS {
        let (name, seed) = &seeds[i % seeds.len()];
        let input = mutate(seed, &mut rng);
        let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&input)));
        match ok {
            Ok(ok) => accepted += usize::from(ok),
            Err(_) => panic!("{target}: a mutation of {name} panicked: {input:?}"),
        }
    }
    eprintln!(
        "{target}: {accepted} of {} inputs accepted",
        seeds.len() + ROUNDS
    );
    accepted
}

#[test]
fn mutated_safetensors_headers_never_panic() {
    let accepted = run("hf_safetensors_header", |data| {
        let whole = parse_file_header(data, data.len() as u64, "fuzz");
        if let Ok(h) = &whole {
            let body = &data[h.data_start as usize..];
            for (name, e) in &h.tensors {
                let bytes = &body[e.start as usize..e.end as usize];
                if let Ok(t) = tensor_from_bytes(name, e, bytes, "fuzz") {
                    assert_eq!(t.size(), e.shape);
                }
            }
            let _ = checkpoint::parse(data, "fuzz");
        }
        let head = parse_file_header(data, 1 << 40, "fuzz");
        whole.is_ok() || head.is_ok()
    });
    // The real shard heads (and some of their mutations) are accepted.
    assert!(accepted >= 5, "{accepted} accepted");
}

#[test]
fn mutated_configs_never_panic() {
    let accepted = run("hf_config", |data| {
        let Ok(cfg) = HfConfig::parse(data, "config.json") else {
            return false;
        };
        let _ = cfg.block_params();
        let mc = model_config(&cfg, tch::Kind::BFloat16);
        assert_eq!(mc.layer_bytes.len(), cfg.layers);
        let _ = mc.validate();
        assert_eq!(llama::inv_freq(&cfg).size(), [cfg.head_dim / 2]);
        true
    });
    assert!(accepted >= 5, "{accepted} accepted");
}

#[test]
fn mutated_indexes_never_panic() {
    let accepted = run("hf_index", |data| {
        let Ok(map) = parse_index(data, "model.safetensors.index.json") else {
            return false;
        };
        for f in map.values() {
            let mut parts = Path::new(f).components();
            assert!(matches!(
                (parts.next(), parts.next()),
                (Some(std::path::Component::Normal(_)), None)
            ));
        }
        true
    });
    assert!(accepted >= 2, "{accepted} accepted");
}

#[test]
fn the_seeds_are_judged_as_named() {
    // The whole file: every tensor built in its type; the shard heads (and offsets past the
    // end): headers accepted as the start of a larger file, refused as a whole file.
    for (name, data) in &seeds("hf_safetensors_header") {
        let whole = parse_file_header(data, data.len() as u64, name);
        let head = parse_file_header(data, 1 << 40, name);
        if name.ends_with("complete.safetensors") {
            let h = whole.unwrap();
            let body = &data[h.data_start as usize..];
            let mut built = 0;
            for (n, e) in &h.tensors {
                if let Ok(t) = tensor_from_bytes(n, e, &body[e.start as usize..e.end as usize], n) {
                    assert_eq!(t.size(), e.shape);
                    built += 1;
                }
            }
            assert_eq!((h.tensors.len(), built), (6, 5), "I64 is refused");
        } else if name.ends_with("unknown-dtype.safetensors") {
            // A type shoal does not read is no reason to refuse the file; reading the
            // tensor is refused.
            let h = whole.unwrap();
            let (n, e) = &h.tensors[0];
            let body = &data[h.data_start as usize..];
            let e2 = tensor_from_bytes(n, e, &body[e.start as usize..e.end as usize], n);
            assert!(e2.unwrap_err().to_string().contains("is I8"));
        } else if name.ends_with("-head.safetensors")
            || name.ends_with("offsets-past-end.safetensors")
        {
            assert!(whole.is_err() && head.is_ok(), "{name}");
        } else {
            assert!(whole.is_err() && head.is_err(), "{name} is malformed");
        }
    }
    for (name, data) in seeds("hf_config") {
        let family = [
            "llama.json",
            "llama3.json",
            "mistral.json",
            "qwen2.json",
            "qwen3.json",
        ]
        .iter()
        .any(|f| name.ends_with(&format!("/{f}")));
        let ok = HfConfig::parse(&data, &name).is_ok();
        // The older RoPE keys, and layer types a Llama ignores, are fine; a sliding window
        // shortens the served context to it (a longer one is refused by `with_context`).
        let good_variant = name.ends_with("old-rope-scaling.json")
            || name.ends_with("layer-types.json")
            || name.ends_with("sliding.json");
        assert_eq!(ok, family || good_variant, "{name}");
    }
    for (name, data) in seeds("hf_index") {
        let good = name.ends_with("/llama.json") || name.ends_with("/qwen3.json");
        assert_eq!(parse_index(&data, &name).is_ok(), good, "{name}");
    }
}
