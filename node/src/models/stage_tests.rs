//! Serving stages: any device answers as the CPU does, KV buffers grow with the rows.

use super::*;
use crate::models::config::describe;
use crate::models::gpt::GptConfig;

/// A 2-layer `gpt` with fresh weights, written as a checkpoint in a fresh directory.
fn gpt_checkpoint(name: &str) -> PathBuf {
    gpt_checkpoint_with(name, 16)
}

/// [`gpt_checkpoint`] with a context of `context` tokens.
fn gpt_checkpoint_with(name: &str, context: i64) -> PathBuf {
    gpt_checkpoint_of(name, 2, context)
}

/// A `gpt` of `layers` layers and a context of `context` tokens.
fn gpt_checkpoint_of(name: &str, layers: i64, context: i64) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("shoal-stage-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let vs = tch::nn::VarStore::new(tch::Device::Cpu);
    let cfg = GptConfig {
        layers,
        heads: 2,
        width: 16,
        context,
    };
    let _ = Gpt::init(&vs.root(), cfg);
    let tensors: Vec<(String, Tensor)> = vs
        .variables()
        .into_iter()
        .map(|(n, t)| (format!("{PARAM_PREFIX}{n}"), t))
        .collect();
    let meta = std::collections::BTreeMap::from([(
        "model".to_string(),
        format!(r#"{{"kind":"gpt","layers":{layers},"heads":2,"width":16,"context":{context}}}"#),
    )]);
    let path = dir.join("ck.safetensors");
    checkpoint::write(&path, &tensors, &meta).unwrap();
    path
}

/// Two rows (one left-padded) prefilled through both layers in two stages, then two
/// decode steps: every call's logits.
fn run(path: &Path, device: tch::Device) -> Vec<Vec<u8>> {
    let cfg = describe(path).unwrap();
    let mut first = StageExecutor::open_on(path, cfg.clone(), device).unwrap();
    let mut second = StageExecutor::open_on(path, cfg, device).unwrap();
    assert_eq!(first.device(), device);
    let rows = [7u64, 9];
    let tokens: Vec<u8> = [0i64, 5, 6, 1, 2, 3]
        .iter()
        .flat_map(|t| t.to_le_bytes())
        .collect();
    let (mut shape, mut pad, mut bytes) = (vec![2u32, 3], vec![1u32, 0], tokens);
    let mut out = Vec::new();
    for step in 0..3 {
        let prefill = step == 0;
        let (_, hs, hidden) = first
            .forward(
                &rows,
                0..1,
                prefill,
                &pad,
                Payload::Tokens,
                &shape,
                &bytes,
                Payload::Hidden,
            )
            .unwrap();
        let (_, _, logits) = second
            .forward(
                &rows,
                1..2,
                prefill,
                &pad,
                Payload::Hidden,
                &hs,
                &hidden,
                Payload::LastLogits,
            )
            .unwrap();
        out.push(logits);
        (shape, pad) = (vec![2, 1], vec![0, 0]);
        bytes = [4i64 + step, 8]
            .iter()
            .flat_map(|t| t.to_le_bytes())
            .collect();
    }
    out
}

#[test]
fn a_stage_on_any_device_answers_what_the_cpu_stage_answers() {
    let path = gpt_checkpoint("device");
    let on_cpu = run(&path, tch::Device::Cpu);
    assert_eq!(on_cpu.len(), 3);
    // Where libtorch sees CUDA, the same calls on each device: weights, KV caches and
    // payloads there, results back as the same bytes up to f32 rounding.
    for i in 0..crate::device::cuda_device_count() {
        let on_cuda = run(&path, tch::Device::Cuda(i));
        for (a, b) in on_cpu.iter().zip(&on_cuda) {
            let (a, b) = (
                coordinator_free::codec::stage::f32s(a),
                coordinator_free::codec::stage::f32s(b),
            );
            assert_eq!(a.len(), b.len());
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() < 1e-3, "cuda:{i}: {x} vs {y}");
            }
        }
    }
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}

/// After a re-cut moves a boundary by a layer, the stage keeps the layer for the rows
/// still running on the old cut until no call asked for it for `KEEP_MOVED`; a cut moved
/// by more than `KEEP_MOVED_LAYERS` drops the old layers at once.
#[test]
fn a_recut_keeps_the_moved_layers_a_while_when_few() {
    let path = gpt_checkpoint_of("recut", 6, 16);
    let cfg = describe(&path).unwrap();
    let mut st = StageExecutor::open_on(&path, cfg, tch::Device::Cpu).unwrap();
    let t0 = Instant::now();
    let at = |s: u64| t0 + Duration::from_secs(s);
    st.ensure(0, 3, at(0)).unwrap();
    assert_eq!(st.loaded_layers(), [0, 1, 2]);
    // Re-cut to 0..2: layer 2 stays while the old cut is still asked for.
    st.ensure(0, 2, at(1)).unwrap();
    assert_eq!(st.loaded_layers(), [0, 1, 2]);
    st.ensure(0, 3, at(5)).unwrap();
    st.ensure(0, 2, at(8)).unwrap();
    assert_eq!(st.loaded_layers(), [0, 1, 2]);
    // 0..3 last asked for at 5 s: gone at 16 s.
    st.ensure(0, 2, at(16)).unwrap();
    assert_eq!(st.loaded_layers(), [0, 1]);
    // A cut moved by 3 layers: the old ones go at once.
    st.ensure(0, 5, at(17)).unwrap();
    assert_eq!(st.loaded_layers(), [0, 1, 2, 3, 4]);
    st.ensure(0, 2, at(18)).unwrap();
    assert_eq!(st.loaded_layers(), [0, 1]);
}

fn le(tokens: &[i64]) -> Vec<u8> {
    tokens.iter().flat_map(|t| t.to_le_bytes()).collect()
}

/// Rows of different lengths decoding together past their KV buffers' first capacity
/// (64) up to the context (160): each step's logits equal a fresh prefill of the whole
/// sequence, the buffers grow by doubling and never beyond the context.
#[test]
fn kv_buffers_grow_with_the_rows_up_to_the_context() {
    assert_eq!(kv_capacity(1, 160), 64);
    assert_eq!(kv_capacity(65, 160), 128);
    assert_eq!(kv_capacity(129, 160), 160);
    assert_eq!(kv_capacity(5, 16), 16);
    let path = gpt_checkpoint_with("grow", 160);
    let cfg = describe(&path).unwrap();
    let mut stage = StageExecutor::open_on(&path, cfg.clone(), tch::Device::Cpu).unwrap();
    let mut fresh = StageExecutor::open_on(&path, cfg, tch::Device::Cpu).unwrap();
    let mut seqs: Vec<Vec<i64>> = vec![
        (0..3).map(|i| (i * 7 + 1) % 256).collect(),
        (0..60).map(|i| (i * 13 + 5) % 256).collect(),
    ];
    let rows = [1u64, 2];
    let pad = [57u32, 0];
    let mut tokens = vec![0i64; 57];
    tokens.extend(&seqs[0]);
    tokens.extend(&seqs[1]);
    fn call(
        st: &mut StageExecutor,
        rows: &[u64],
        prefill: bool,
        pad: &[u32],
        len: u32,
        toks: &[i64],
    ) -> Vec<f32> {
        let (_, _, out) = st
            .forward(
                rows,
                0..2,
                prefill,
                pad,
                Payload::Tokens,
                &[rows.len() as u32, len],
                &le(toks),
                Payload::LastLogits,
            )
            .unwrap();
        coordinator_free::codec::stage::f32s(&out)
    }
    let mut got = call(&mut stage, &rows, true, &pad, 60, &tokens);
    for step in 0..99 {
        // Each row's logits against a prefill of its whole sequence.
        for (i, seq) in seqs.iter().enumerate() {
            let want = call(&mut fresh, &[100], true, &[0], seq.len() as u32, seq);
            fresh.drop_rows(&[100]);
            let mine = &got[i * 256..(i + 1) * 256];
            let d = mine
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(d < 1e-4, "step {step}, row {i}: {d}");
        }
        let next: Vec<i64> = seqs
            .iter()
            .map(|s| (s.len() as i64 * 31 + step) % 256)
            .collect();
        for (s, t) in seqs.iter_mut().zip(&next) {
            s.push(*t);
        }
        got = call(&mut stage, &rows, false, &[0, 0], 1, &next);
    }
    assert_eq!(seqs[1].len(), 159);
    let caps: Vec<i64> = stage.rows[&2]
        .kv
        .values()
        .map(|(k, _)| k.size()[1])
        .collect();
    assert_eq!(caps, vec![160, 160], "grown to the context, not beyond");
    let _ = std::fs::remove_dir_all(path.parent().unwrap());
}
