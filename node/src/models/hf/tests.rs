//! Parity with transformers on the committed fixtures (`node/tests/fixtures/hf/`, written
//! by `scripts/make-fixtures`): a whole forward's logits, KV-cached decoding through the
//! serving stage, 2- and 3-stage splits and greedy generation; and bad folders refused
//! with errors naming the file and key. No Python at test time.

use super::*;
use crate::models::checkpoint;
use crate::models::decoder::Decoder;
use crate::models::stage::StageExecutor;
use coordinator_free::codec::stage::Payload;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tch::{Device, Kind, Tensor};

/// Largest difference allowed from transformers' f32 logits.
const TOLERANCE: f32 = 1e-4;
/// Every fixture.
const ARCHS: [&str; 5] = ["llama", "llama3", "mistral", "qwen2", "qwen3"];

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(name)
}

/// transformers' outputs for a fixture.
struct Reference {
    /// `[2][12]` token ids.
    tokens: Vec<Vec<i64>>,
    /// `[2, 12, vocab]` logits, flattened.
    logits: Vec<f32>,
    prompt: Vec<i64>,
    generated: Vec<i64>,
}

fn reference(dir: &Path) -> Reference {
    let j: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap()).unwrap();
    let ids = |v: &serde_json::Value| -> Vec<i64> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_i64().unwrap())
            .collect()
    };
    let c = checkpoint::read(&dir.join("reference.safetensors")).unwrap();
    let logits = Vec::<f32>::try_from(c.get("logits").unwrap().view([-1])).unwrap();
    Reference {
        tokens: j["tokens"].as_array().unwrap().iter().map(ids).collect(),
        logits,
        prompt: ids(&j["prompt"]),
        generated: ids(&j["generated"]),
    }
}

/// Runs `f` three ways: on the calling thread's torch settings, on a thread computing with
/// one torch thread, and on a thread whose serving maps take the transposed layout. On a CPU
/// with AVX-512F the first two run few-row maps through [`crate::models::cpu_matmul`]
/// (split over torch's threads, then on one) and the third through MKL's `addmm`.
fn on_every_path(f: fn()) {
    f();
    std::thread::spawn(move || {
        tch::set_num_threads(1);
        f();
    })
    .join()
    .expect("the one-thread run passes");
    std::thread::spawn(move || {
        crate::models::layers::FORCE_TRANSPOSED.with(|t| t.set(true));
        f();
    })
    .join()
    .expect("the transposed-layout run passes");
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

fn bytes_i64(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|t| t.to_le_bytes()).collect()
}

fn floats(b: &[u8]) -> Vec<f32> {
    coordinator_free::codec::stage::f32s(b)
}

fn argmax(v: &[f32]) -> i64 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as i64
}

/// The names of the tensors a stage asked for.
type Asked = Arc<Mutex<Vec<String>>>;

/// Stages of `dir` cut at `cuts`, each recording the tensors it asked for.
fn stages(dir: &Path, cuts: &[usize]) -> (Vec<StageExecutor>, Vec<Asked>) {
    let (cfg, _) = open(dir).unwrap();
    let mc = model_config(&cfg, Kind::Float);
    let mut out = Vec::new();
    let mut asked = Vec::new();
    for _ in cuts.windows(2) {
        let w = HfWeights::open(dir).unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let l = log.clone();
        let source = Box::new(move |n: &str| {
            l.lock().unwrap().push(n.to_string());
            w.get(n).map_err(|e| e.to_string())
        });
        let dec = Box::new(HfDecoder::new(cfg.clone(), Kind::Float));
        out.push(StageExecutor::with_decoder(
            dir,
            mc.clone(),
            dec,
            source,
            Device::Cpu,
        ));
        asked.push(log);
    }
    (out, asked)
}

/// `payload` through `stages` (cut at `cuts`); the last answers `output`.
fn through(
    stages: &mut [StageExecutor],
    cuts: &[usize],
    rows: &[u64],
    prefill: bool,
    mut payload: (Payload, Vec<u32>, Vec<u8>),
    output: Payload,
) -> Vec<f32> {
    let n = stages.len();
    let pad = vec![0u32; rows.len()];
    for (i, st) in stages.iter_mut().enumerate() {
        let out = if i + 1 == n { output } else { Payload::Hidden };
        let (p, shape, bytes) = payload;
        payload = st
            .forward(
                rows,
                cuts[i]..cuts[i + 1],
                prefill,
                &pad,
                p,
                &shape,
                &bytes,
                out,
            )
            .unwrap();
    }
    floats(&payload.2)
}

fn tokens(rows: &[Vec<i64>], len: usize) -> (Payload, Vec<u32>, Vec<u8>) {
    let flat: Vec<i64> = rows.iter().flat_map(|r| r[..len].to_vec()).collect();
    (
        Payload::Tokens,
        vec![rows.len() as u32, len as u32],
        bytes_i64(&flat),
    )
}

/// Every split the tests run: one stage, two, and three where there are 3 layers.
fn splits(layers: usize) -> Vec<Vec<usize>> {
    let mut s = vec![vec![0, layers], vec![0, 1, layers]];
    if layers >= 3 {
        s.push(vec![0, 1, 2, layers]);
    }
    s
}

/// The decoder's own full forward (every layer, causal attention, no cache) equals
/// transformers' logits.
#[test]
fn a_whole_forward_matches_transformers() {
    on_every_path(a_whole_forward_matches_transformers_once);
}

fn a_whole_forward_matches_transformers_once() {
    for arch in ARCHS {
        let dir = fixture(arch);
        let r = reference(&dir);
        let (cfg, w) = open(&dir).unwrap();
        let layers = cfg.layers;
        let mut dec = HfDecoder::new(cfg, Kind::Float);
        dec.load(0..layers, &w.getter(Device::Cpu)).unwrap();
        let flat: Vec<i64> = r.tokens.concat();
        let x = Tensor::from_slice(&flat).view([2, -1]);
        let y = tch::no_grad(|| dec.forward(&x)).unwrap();
        let got = Vec::<f32>::try_from(y.view([-1])).unwrap();
        let d = max_diff(&got, &r.logits);
        eprintln!("{arch}: whole forward, max |Δ| = {d:e}");
        assert!(d <= TOLERANCE, "{arch}: logits differ by {d}");
        // Matrices read a few rows at a time into their place (how stages load, with
        // chunks of 1 KiB here so every matrix takes several) compute the same logits.
        let w = std::sync::Arc::new(w);
        let mut by_rows = HfDecoder::new(dec.config().clone(), Kind::Float)
            .reading_rows(w.clone(), Device::Cpu)
            .with_chunk_bytes(1024);
        by_rows.load(0..layers, &w.getter(Device::Cpu)).unwrap();
        let y2 = tch::no_grad(|| by_rows.forward(&x)).unwrap();
        assert_eq!(
            (y2 - &y).abs().max().double_value(&[]),
            0.0,
            "{arch}: read by rows"
        );
        // Where libtorch sees CUDA: the same weights and tokens there, results within
        // CUDA's f32 matmul rounding (TF32 off by default in libtorch).
        for i in 0..crate::device::cuda_device_count() {
            let dev = Device::Cuda(i);
            let mut dec = HfDecoder::new(dec.config().clone(), Kind::Float);
            dec.load(0..layers, &w.getter(dev)).unwrap();
            let y = tch::no_grad(|| dec.forward(&x.to_device(dev))).unwrap();
            let got = Vec::<f32>::try_from(y.to_device(Device::Cpu).view([-1])).unwrap();
            let d = max_diff(&got, &r.logits);
            eprintln!("{arch}: whole forward on cuda:{i}, max |Δ| = {d:e}");
            assert!(d <= 1e-3, "{arch} on cuda:{i}: logits differ by {d}");
        }
        let e = dec.forward(&Tensor::from_slice(&[0i64, cfg_vocab(&dec)]).view([1, 2]));
        assert!(e.unwrap_err().to_string().contains("vocabulary"));
    }
}

fn cfg_vocab(d: &HfDecoder) -> i64 {
    d.config().vocab
}

/// Through the serving stages, split 1, 2 and 3 ways: the whole prompt's logits, and a
/// 4-token prefill followed by one token at a time through the KV caches, each step
/// against transformers' logits at that position.
#[test]
fn kv_cached_stages_match_transformers() {
    on_every_path(kv_cached_stages_match_transformers_once);
}

fn kv_cached_stages_match_transformers_once() {
    for arch in ARCHS {
        let dir = fixture(arch);
        let r = reference(&dir);
        let (cfg, _) = open(&dir).unwrap();
        let (v, t) = (cfg.vocab as usize, r.tokens[0].len());
        let rows = [3u64, 5];
        let mut worst = 0f32;
        for cuts in splits(cfg.layers) {
            let (mut st, _) = stages(&dir, &cuts);
            let full = through(
                &mut st,
                &cuts,
                &rows,
                true,
                tokens(&r.tokens, t),
                Payload::Logits,
            );
            worst = worst.max(max_diff(&full, &r.logits));
            let (mut st, _) = stages(&dir, &cuts);
            let mut last = through(
                &mut st,
                &cuts,
                &rows,
                true,
                tokens(&r.tokens, 4),
                Payload::LastLogits,
            );
            for j in 4..=t {
                for row in 0..2 {
                    let want = &r.logits[(row * t + j - 1) * v..(row * t + j) * v];
                    worst = worst.max(max_diff(&last[row * v..(row + 1) * v], want));
                }
                if j == t {
                    break;
                }
                let next: Vec<Vec<i64>> = r.tokens.iter().map(|x| vec![x[j]]).collect();
                last = through(
                    &mut st,
                    &cuts,
                    &rows,
                    false,
                    tokens(&next, 1),
                    Payload::LastLogits,
                );
            }
        }
        eprintln!("{arch}: stages (whole prompt and KV-cached decoding), max |Δ| = {worst:e}");
        assert!(worst <= TOLERANCE, "{arch}: logits differ by {worst}");
    }
}

/// A shorter row left-padded into a batch with a longer one computes, at its real
/// positions, transformers' logits of those tokens (positions count from its first real
/// token; no query attends to the padding).
#[test]
fn left_padded_rows_match_transformers() {
    for arch in ["llama", "qwen3"] {
        let dir = fixture(arch);
        let r = reference(&dir);
        let (cfg, _) = open(&dir).unwrap();
        let (v, t, pad) = (cfg.vocab as usize, r.tokens[0].len(), 3usize);
        let mut short = vec![0i64; pad];
        short.extend(&r.tokens[1][..t - pad]);
        let rows = [r.tokens[0].clone(), short];
        let (mut st, _) = stages(&dir, &[0, cfg.layers]);
        let (p, shape, bytes) = tokens(&rows, t);
        let (_, _, out) = st[0]
            .forward(
                &[1, 2],
                0..cfg.layers,
                true,
                &[0, pad as u32],
                p,
                &shape,
                &bytes,
                Payload::Logits,
            )
            .unwrap();
        let out = floats(&out);
        let d0 = max_diff(&out[..t * v], &r.logits[..t * v]);
        let d1 = max_diff(&out[(t + pad) * v..], &r.logits[t * v..(2 * t - pad) * v]);
        assert!(
            d0.max(d1) <= TOLERANCE,
            "{arch}: padded batch differs by {d0} / {d1}"
        );
    }
}

/// Each stage asks only for its own layers' tensors, the embeddings on the first and the
/// final norm and head (or the tied embeddings) on the last.
#[test]
fn stages_load_only_their_layers() {
    for arch in ["llama", "qwen2"] {
        let dir = fixture(arch);
        let r = reference(&dir);
        let (cfg, _) = open(&dir).unwrap();
        let l = cfg.layers;
        let cuts = [0, 1, 2, l];
        let (mut st, asked) = stages(&dir, &cuts);
        through(
            &mut st,
            &cuts,
            &[1, 2],
            true,
            tokens(&r.tokens, 5),
            Payload::LastLogits,
        );
        for (i, log) in asked.iter().enumerate() {
            let log = log.lock().unwrap();
            for n in log.iter() {
                let layer_ok =
                    (cuts[i]..cuts[i + 1]).any(|b| n.starts_with(&llama::block_prefix(b)));
                let first = i == 0 && n == llama::EMBED;
                let last = i + 2 == cuts.len()
                    && (n == llama::NORM
                        || n == llama::HEAD
                        || cfg.tie_word_embeddings && n == llama::EMBED);
                assert!(layer_ok || first || last, "{arch}: stage {i} asked for {n}");
            }
            assert_eq!(
                st[i].loaded_layers(),
                (cuts[i]..cuts[i + 1]).collect::<Vec<_>>()
            );
        }
    }
}

/// 32 greedy tokens from the prompt, decoded through the KV caches in one stage and in
/// two, equal transformers' `generate(do_sample=False)`.
#[test]
fn greedy_generation_matches_transformers() {
    on_every_path(greedy_generation_matches_transformers_once);
}

fn greedy_generation_matches_transformers_once() {
    for arch in ARCHS {
        let dir = fixture(arch);
        let r = reference(&dir);
        let (cfg, _) = open(&dir).unwrap();
        let v = cfg.vocab as usize;
        for cuts in [vec![0, cfg.layers], vec![0, 1, cfg.layers]] {
            let (mut st, _) = stages(&dir, &cuts);
            let p = &r.prompt;
            let mut payload = tokens(std::slice::from_ref(p), p.len());
            let mut out = Vec::new();
            for step in 0..r.generated.len() {
                let logits = through(
                    &mut st,
                    &cuts,
                    &[9],
                    step == 0,
                    payload,
                    Payload::LastLogits,
                );
                assert_eq!(logits.len(), v);
                let t = argmax(&logits);
                out.push(t);
                payload = tokens(&[vec![t]], 1);
            }
            assert_eq!(out, r.generated, "{arch}: greedy tokens, stages {cuts:?}");
        }
    }
}
