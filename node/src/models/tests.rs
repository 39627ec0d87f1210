//! Tests that training and serving compute the same model: the training forward, the
//! serving stage executor in one or several stages, and incremental decoding through the
//! KV caches against a full recompute.

use super::checkpoint;
use super::config::{describe, ModelConfig};
use super::gpt::{Gpt, GptConfig, VOCAB};
use super::stage::StageExecutor;
use crate::train::data::Task;
use crate::train::job::JobSpec;
use crate::train::model::Model;
use coordinator_free::codec::stage::Payload;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tch::{nn, Tensor};

/// A random-init gpt written as a checkpoint, and the training model it came from.
fn gpt_checkpoint(dir: &Path) -> (PathBuf, Model) {
    let job = JobSpec::parse(
        r#"
name = "t"
steps = 1
batch_size = 4
[model]
kind = "gpt"
layers = 3
heads = 2
width = 16
context = 24
[data]
kind = "arithmetic"
digits = 2
"#,
    )
    .unwrap();
    let m = Model::build(
        &job,
        Task::Lm {
            len: 8,
            masked: true,
            vocab: 256,
        },
        3,
        tch::Device::Cpu,
        crate::device::Precision::F32,
    )
    .unwrap();
    let tensors: Vec<(String, Tensor)> = m
        .params()
        .into_iter()
        .map(|(n, t)| (format!("model.{n}"), t))
        .collect();
    let meta = BTreeMap::from([("model".to_string(), job.model_json())]);
    let path = dir.join("ck.safetensors");
    checkpoint::write(&path, &tensors, &meta).unwrap();
    (path, m)
}

fn bytes_i64(v: &[i64]) -> Vec<u8> {
    v.iter().flat_map(|t| t.to_le_bytes()).collect()
}

fn floats(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect()
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

/// Greedy generation through stages `cuts` (layer boundaries), batched with left
/// padding; returns the tokens and the first step's logits per row.
fn generate(
    path: &Path,
    cfg: &ModelConfig,
    cuts: &[usize],
    prompts: &[Vec<i64>],
    n: usize,
) -> (Vec<Vec<i64>>, Vec<Vec<f32>>) {
    let mut stages: Vec<StageExecutor> = cuts
        .windows(2)
        .map(|_| StageExecutor::open(path, cfg.clone()).unwrap())
        .collect();
    let b = prompts.len();
    let l = prompts.iter().map(Vec::len).max().unwrap();
    let pad: Vec<u32> = prompts.iter().map(|p| (l - p.len()) as u32).collect();
    let mut tokens = Vec::new();
    for p in prompts {
        tokens.extend(std::iter::repeat_n(0, l - p.len()));
        tokens.extend(p);
    }
    let mut len = l as u32;
    let rows: Vec<u64> = (0..b as u64).collect();
    let zeros = vec![0u32; b];
    let mut out = vec![vec![]; b];
    let mut first = vec![];
    for step in 0..n {
        let mut payload = (Payload::Tokens, vec![b as u32, len], bytes_i64(&tokens));
        for (i, st) in stages.iter_mut().enumerate() {
            let last = i + 2 == cuts.len();
            let output = if last {
                Payload::LastLogits
            } else {
                Payload::Hidden
            };
            let (kind, shape, bytes) = st
                .forward(
                    &rows,
                    cuts[i]..cuts[i + 1],
                    step == 0,
                    if step == 0 { &pad } else { &zeros },
                    payload.0,
                    &payload.1,
                    &payload.2,
                    output,
                )
                .unwrap();
            payload = (kind, shape, bytes);
        }
        assert_eq!(payload.1, vec![b as u32, VOCAB]);
        let logits = floats(&payload.2);
        tokens.clear();
        for r in 0..b {
            let row = &logits[r * 256..(r + 1) * 256];
            if step == 0 {
                first.push(row.to_vec());
            }
            let t = argmax(row);
            out[r].push(t);
            tokens.push(t);
        }
        len = 1;
    }
    (out, first)
}

#[test]
fn kv_cached_stages_match_the_training_model() {
    let dir = std::env::temp_dir().join(format!("shoal-serve-model-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (path, m) = gpt_checkpoint(&dir);
    let cfg = describe(&path).unwrap();
    assert_eq!((cfg.kind.as_str(), cfg.layers, cfg.context), ("gpt", 3, 24));
    assert_eq!(cfg.params as usize, m.numel());
    let prompts = vec![
        b"12+34=".iter().map(|&b| b as i64).collect::<Vec<_>>(),
        b"7+5=".iter().map(|&b| b as i64).collect(),
        b"99+1=".iter().map(|&b| b as i64).collect(),
    ];
    // Reference: the training model's full-sequence greedy generation, one row at a time.
    let reference: Vec<Vec<i64>> = prompts
        .iter()
        .map(|p| {
            let t = Tensor::from_slice(p).view([1, p.len() as i64]);
            let g = m.generate(&t, 6).unwrap();
            Vec::<i64>::try_from(g.view([-1])).unwrap()
        })
        .collect();
    let ref_logits: Vec<Vec<f32>> = prompts
        .iter()
        .map(|p| {
            let _g = tch::no_grad_guard();
            let t = Tensor::from_slice(p).view([1, p.len() as i64]);
            let y = m.forward(&t).unwrap().select(1, -1).view([-1]);
            Vec::<f32>::try_from(y).unwrap()
        })
        .collect();
    for cuts in [vec![0, 3], vec![0, 1, 3], vec![0, 1, 2, 3]] {
        // Batched with left padding, and each row alone.
        let (batched, first) = generate(&path, &cfg, &cuts, &prompts, 6);
        assert_eq!(batched, reference, "stages {cuts:?}");
        for (r, p) in prompts.iter().enumerate() {
            let (alone, _) = generate(&path, &cfg, &cuts, std::slice::from_ref(p), 6);
            assert_eq!(alone[0], reference[r]);
            for (a, b) in first[r].iter().zip(&ref_logits[r]) {
                assert!((a - b).abs() < 1e-4, "logits differ: {a} vs {b}");
            }
        }
    }
    // Requests that do not fit are errors, not panics.
    let mut st = StageExecutor::open(&path, cfg.clone()).unwrap();
    let long: Vec<i64> = vec![1; 25];
    let e = st.forward(
        &[1],
        0..3,
        true,
        &[0],
        Payload::Tokens,
        &[1, 25],
        &bytes_i64(&long),
        Payload::LastLogits,
    );
    assert!(e.is_err());
    let e = st.forward(
        &[1],
        0..4,
        true,
        &[0],
        Payload::Tokens,
        &[1, 1],
        &bytes_i64(&[1]),
        Payload::LastLogits,
    );
    assert!(e.is_err());
    let e = st.forward(
        &[99],
        0..3,
        false,
        &[0],
        Payload::Tokens,
        &[1, 1],
        &bytes_i64(&[1]),
        Payload::LastLogits,
    );
    assert!(e.unwrap_err().to_string().contains("unknown row"));

    // Continuous batching: a row that joins two tokens later, decoded together with
    // the first, generates what it generates alone.
    let mut st = StageExecutor::open(&path, cfg.clone()).unwrap();
    let greedy = |st: &mut StageExecutor,
                  rows: &[u64],
                  prefill: bool,
                  pad: &[u32],
                  toks: &[i64],
                  len: u32| {
        let (_, _, b) = st
            .forward(
                rows,
                0..3,
                prefill,
                pad,
                Payload::Tokens,
                &[rows.len() as u32, len],
                &bytes_i64(toks),
                Payload::LastLogits,
            )
            .unwrap();
        let l = floats(&b);
        (0..rows.len())
            .map(|r| argmax(&l[r * 256..(r + 1) * 256]))
            .collect::<Vec<i64>>()
    };
    let (pa, pb) = (&prompts[0], &prompts[1]);
    let mut a_out = greedy(&mut st, &[10], true, &[0], pa, pa.len() as u32);
    for _ in 0..2 {
        let t = *a_out.last().unwrap();
        a_out.push(greedy(&mut st, &[10], false, &[0], &[t], 1)[0]);
    }
    let mut b_out = greedy(&mut st, &[11], true, &[0], pb, pb.len() as u32);
    for _ in 0..3 {
        let toks = [*a_out.last().unwrap(), *b_out.last().unwrap()];
        let next = greedy(&mut st, &[10, 11], false, &[0, 0], &toks, 1);
        a_out.push(next[0]);
        b_out.push(next[1]);
    }
    assert_eq!(a_out, reference[0]);
    assert_eq!(b_out[..4], reference[1][..4]);
    st.drop_rows(&[10, 11]);
    assert_eq!(st.cached_rows(), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Largest difference allowed between the training forward's logits and a stage's.
const TOLERANCE: f32 = 1e-5;

/// A fresh `gpt` (training layout, seeded) and the checkpoint of its weights in `dir`.
fn fresh_gpt(dir: &Path, cfg: GptConfig) -> (nn::VarStore, Gpt, PathBuf) {
    tch::manual_seed(11);
    let vs = nn::VarStore::new(tch::Device::Cpu);
    let gpt = Gpt::init(&vs.root(), cfg);
    let tensors: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(n, t)| (format!("{}{n}", super::PARAM_PREFIX), t))
        .collect();
    let model = serde_json::json!({"kind": "gpt", "layers": cfg.layers, "heads": cfg.heads,
        "width": cfg.width, "context": cfg.context});
    let meta = BTreeMap::from([("model".to_string(), model.to_string())]);
    let path = dir.join("fresh.safetensors");
    checkpoint::write(&path, &tensors, &meta).unwrap();
    (vs, gpt, path)
}

/// One stage call; returns the output's shape and values.
#[allow(clippy::too_many_arguments)]
fn call(
    st: &mut StageExecutor,
    rows: &[u64],
    layers: std::ops::Range<usize>,
    prefill: bool,
    pad: &[u32],
    input: (Payload, Vec<u32>, Vec<u8>),
    output: Payload,
) -> (Payload, Vec<u32>, Vec<u8>) {
    st.forward(
        rows, layers, prefill, pad, input.0, &input.1, &input.2, output,
    )
    .unwrap()
}

/// Runs `input` through `stages` (cut at `cuts`); the last answers `output`.
fn through(
    stages: &mut [StageExecutor],
    cuts: &[usize],
    rows: &[u64],
    prefill: bool,
    pad: &[u32],
    mut payload: (Payload, Vec<u32>, Vec<u8>),
    output: Payload,
) -> Vec<f32> {
    let n = stages.len();
    for (i, st) in stages.iter_mut().enumerate() {
        let out = if i + 1 == n { output } else { Payload::Hidden };
        payload = call(st, rows, cuts[i]..cuts[i + 1], prefill, pad, payload, out);
    }
    floats(&payload.2)
}

fn assert_close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let worst = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max);
    assert!(worst < TOLERANCE, "{what}: logits differ by {worst}");
}

/// The same weights give the same logits through training's forward and the serving
/// stages: the whole prompt in one stage, split into two stages (hidden states passed
/// on as f32 bytes), and decoded one token at a time through the KV caches, each step
/// also checked against a full recompute of the prefix.
#[test]
fn training_forward_and_serving_stages_agree() {
    let dir = std::env::temp_dir().join(format!("shoal-models-parity-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = GptConfig {
        layers: 3,
        heads: 2,
        width: 16,
        context: 24,
    };
    let (_vs, gpt, path) = fresh_gpt(&dir, cfg);
    let mc = describe(&path).unwrap();
    let (t, b) = (10usize, 2usize);
    let tokens: Vec<i64> = (0..(b * t) as i64).map(|i| (i * 37 + 5) % 256).collect();
    let reference: Vec<f32> = {
        let _g = tch::no_grad_guard();
        let x = Tensor::from_slice(&tokens).view([b as i64, t as i64]);
        Vec::<f32>::try_from(gpt.forward(&x).view([-1])).unwrap()
    };
    let v = VOCAB as usize;
    let rows = [1u64, 2];
    let tok_payload = |toks: &[i64], len: usize| {
        let n = toks.len() / len;
        (Payload::Tokens, vec![n as u32, len as u32], bytes_i64(toks))
    };
    for cuts in [vec![0, 3], vec![0, 2, 3]] {
        let open = || -> Vec<StageExecutor> {
            cuts.windows(2)
                .map(|_| StageExecutor::open(&path, mc.clone()).unwrap())
                .collect()
        };
        // The whole prompt, every position's logits.
        let mut stages = open();
        let full = through(
            &mut stages,
            &cuts,
            &rows,
            true,
            &[0, 0],
            tok_payload(&tokens, t),
            Payload::Logits,
        );
        assert_close(&full, &reference, &format!("full prompt, stages {cuts:?}"));

        // A 4-token prefill, then one token at a time through the KV caches.
        let mut stages = open();
        let prefix: Vec<i64> = (0..b)
            .flat_map(|r| tokens[r * t..r * t + 4].to_vec())
            .collect();
        let mut last = through(
            &mut stages,
            &cuts,
            &rows,
            true,
            &[0, 0],
            tok_payload(&prefix, 4),
            Payload::LastLogits,
        );
        for j in 4..=t {
            for r in 0..b {
                let want = &reference[(r * t + j - 1) * v..(r * t + j) * v];
                assert_close(
                    &last[r * v..(r + 1) * v],
                    want,
                    &format!("decode step {j}, row {r}, stages {cuts:?}"),
                );
            }
            // A full recompute of the prefix (new rows) answers the same.
            let prefix: Vec<i64> = (0..b)
                .flat_map(|r| tokens[r * t..r * t + j].to_vec())
                .collect();
            let fresh = [100 + j as u64, 200 + j as u64];
            let recomputed = through(
                &mut open(),
                &cuts,
                &fresh,
                true,
                &[0, 0],
                tok_payload(&prefix, j),
                Payload::LastLogits,
            );
            assert_close(
                &last,
                &recomputed,
                &format!("decode vs recompute at {j}, stages {cuts:?}"),
            );
            if j == t {
                break;
            }
            let next: Vec<i64> = (0..b).map(|r| tokens[r * t + j]).collect();
            last = through(
                &mut stages,
                &cuts,
                &rows,
                false,
                &[0, 0],
                tok_payload(&next, 1),
                Payload::LastLogits,
            );
        }
    }
    // Left padding: a shorter row batched with a longer one computes what it computes
    // alone (its logits at its real positions).
    let mut st = StageExecutor::open(&path, mc.clone()).unwrap();
    let short = &tokens[t..t + 7];
    let mut batch = tokens[..t].to_vec();
    batch.extend(std::iter::repeat_n(0, 3));
    batch.extend(short);
    let out = floats(
        &call(
            &mut st,
            &rows,
            0..3,
            true,
            &[0, 3],
            tok_payload(&batch, t),
            Payload::Logits,
        )
        .2,
    );
    let alone: Vec<f32> = {
        let _g = tch::no_grad_guard();
        let x = Tensor::from_slice(short).view([1, 7]);
        Vec::<f32>::try_from(gpt.forward(&x).view([-1])).unwrap()
    };
    assert_close(&out[..t * v], &reference[..t * v], "padded batch, long row");
    assert_close(&out[(t + 3) * v..], &alone, "padded batch, short row");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `scripts/ddp_train.py`'s `GPT` (the PyTorch baseline) is the same model: it loads a
/// shoal checkpoint's `gpt` weights by their names (`strict=True`) and computes the same
/// logits (`scripts/gpt_parity.py` compares them).
#[test]
fn python_baseline_is_the_same_gpt() {
    let dir = std::env::temp_dir().join(format!("shoal-models-python-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = GptConfig {
        layers: 2,
        heads: 4,
        width: 32,
        context: 16,
    };
    let (vs, gpt, path) = fresh_gpt(&dir, cfg);
    let tokens: Vec<i64> = (0..2 * 12).map(|i| (i * 53 + 7) % 256).collect();
    let x = Tensor::from_slice(&tokens).view([2, 12]);
    let logits = tch::no_grad(|| gpt.forward(&x));
    let mut tensors: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(n, t)| (format!("{}{n}", super::PARAM_PREFIX), t))
        .collect();
    tensors.push(("parity.tokens".into(), x.to_kind(tch::Kind::Float)));
    tensors.push(("parity.logits".into(), logits));
    let meta = checkpoint::read(&path).unwrap().metadata;
    let file = dir.join("parity.safetensors");
    checkpoint::write(&file, &tensors, &meta).unwrap();
    let python = std::env::var("SHOAL_PYTHON").expect("SHOAL_PYTHON (source scripts/env.sh)");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/gpt_parity.py");
    let out = std::process::Command::new(python)
        .arg(&script)
        .arg(&file)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_str(report.trim()).unwrap();
    assert_eq!(
        r["params"].as_u64(),
        Some(vs.variables().values().map(|t| t.numel() as u64).sum())
    );
    assert!(r["max_abs_diff"].as_f64().unwrap() <= f64::from(TOLERANCE));
    let _ = std::fs::remove_dir_all(&dir);
}

/// A serving linear map (the rows layout where this CPU allows it, and the transposed one)
/// equals `Tensor::linear` for row counts on both sides of the kernel's limit, with and
/// without a bias, on torch's default thread count and on one thread.
#[test]
fn serving_linear_maps_equal_the_training_forward() {
    use super::cpu_matmul::MAX_ROWS;
    use super::layers::{Linear, FORCE_TRANSPOSED};
    let check = || {
        tch::manual_seed(7);
        let w = Tensor::randn([300, 50], (tch::Kind::Float, tch::Device::Cpu));
        let b = Tensor::randn([300], (tch::Kind::Float, tch::Device::Cpu));
        for transposed in [false, true] {
            FORCE_TRANSPOSED.with(|f| f.set(transposed));
            for bias in [None, Some(&b)] {
                let l = Linear::packed(&w, bias);
                assert_eq!(l.in_features(), 50);
                for rows in [1, 3, 8, 9, MAX_ROWS as i64, MAX_ROWS as i64 + 1, 70] {
                    let x = Tensor::randn([rows, 1, 50], (tch::Kind::Float, tch::Device::Cpu));
                    let want = x.linear(&w, bias);
                    let got = tch::no_grad(|| l.forward(&x));
                    assert_eq!(got.size(), want.size());
                    let d = (got - want).abs().max().double_value(&[]);
                    assert!(
                        d <= 1e-5,
                        "{rows} rows, bias {}, transposed {transposed}: |Δ| {d}",
                        bias.is_some()
                    );
                }
            }
        }
    };
    std::thread::spawn(check)
        .join()
        .expect("the default-thread run passes");
    std::thread::spawn(move || {
        tch::set_num_threads(1);
        check();
    })
    .join()
    .expect("the one-thread run passes");
}

/// The planner's work per layer: the announced layer weights (the head on the last layer),
/// or one per layer when a config has none (an older node's announcement, other kinds).
#[test]
fn layer_work_is_the_layer_weights_with_the_head() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf/qwen2");
    let (cfg, _) = super::hf::open(&dir).unwrap();
    let mut mc = super::hf::model_config(&cfg, tch::Kind::Float);
    let (l, block) = (cfg.layers, cfg.block_params() * 4);
    let head = (cfg.vocab * cfg.hidden) as u64 * 4;
    let mut want = vec![block; l];
    want[l - 1] += head;
    assert_eq!(mc.layer_work(), want, "tied: the embeddings are the head");
    let json = serde_json::to_string(&mc).unwrap();
    let mut older: serde_json::Value = serde_json::from_str(&json).unwrap();
    older.as_object_mut().unwrap().remove("layer_weights");
    let older: ModelConfig = serde_json::from_value(older).unwrap();
    assert_eq!(older.layer_work(), vec![1; l]);
    mc.layer_weights.pop();
    assert_eq!(
        mc.layer_work(),
        vec![1; l],
        "a mismatched length is ignored"
    );
}
