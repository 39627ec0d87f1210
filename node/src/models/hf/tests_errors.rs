//! Bad folders: each is an error naming the file and the key or tensor, never a panic and
//! never a model that runs wrong.

use super::config::{ModelType, RopeScaling};
use super::*;
use crate::models::decoder::Decoder;
use coordinator_free::codec::stage::Payload;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(name)
}

/// A copy of fixture `name` in a fresh temporary folder.
fn copy(name: &str, tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("shoal-hf-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for e in std::fs::read_dir(fixture(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    dir
}

fn config_json(name: &str) -> Value {
    serde_json::from_slice(&std::fs::read(fixture(name).join("config.json")).unwrap()).unwrap()
}

fn parse(v: &Value) -> Result<HfConfig, HfError> {
    HfConfig::parse(v.to_string().as_bytes(), "dir/config.json")
}

/// `v` with `key` set to `value` (`null` removes it).
fn with(v: &Value, key: &str, value: Value) -> Value {
    let mut v = v.clone();
    let m = v.as_object_mut().unwrap();
    if value.is_null() {
        m.remove(key);
    } else {
        m.insert(key.into(), value);
    }
    v
}

/// The error's text, asserting it names every one of `words`.
fn err_names<T>(r: Result<T, impl std::fmt::Display>, words: &[&str]) -> String {
    let Err(e) = r else {
        panic!("expected an error naming {words:?}")
    };
    let s = e.to_string();
    for w in words {
        assert!(s.contains(w), "`{s}` does not name {w}");
    }
    s
}

fn index(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join(weights::INDEX)).unwrap()).unwrap()
}

fn write_index(dir: &Path, v: &Value) {
    std::fs::write(dir.join(weights::INDEX), v.to_string()).unwrap();
}

/// A safetensors file of raw tensors (name, dtype, shape, bytes).
fn write_safetensors(path: &Path, tensors: &[(&str, &str, Vec<i64>, Vec<u8>)]) {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, dtype, shape, bytes) in tensors {
        let a = data.len();
        data.extend_from_slice(bytes);
        header.insert(
            name.to_string(),
            json!({"dtype": dtype, "shape": shape, "data_offsets": [a, data.len()]}),
        );
    }
    let h = Value::Object(header).to_string().into_bytes();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    std::fs::write(path, out).unwrap();
}

#[test]
fn configs_of_every_fixture_parse_to_their_switches() {
    let l = parse(&config_json("llama")).unwrap();
    assert_eq!(
        (l.model_type, l.kv_heads, l.head_dim),
        (ModelType::Llama, 2, 16)
    );
    assert!(!l.tie_word_embeddings && !l.qkv_bias && !l.qk_norm);
    let l3 = parse(&config_json("llama3")).unwrap();
    assert!(matches!(l3.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
    assert!(l3.tie_word_embeddings);
    assert_eq!(parse(&config_json("mistral")).unwrap().head_dim, 24);
    let q2 = parse(&config_json("qwen2")).unwrap();
    assert!(q2.qkv_bias && !q2.o_bias && q2.tie_word_embeddings);
    let q3 = parse(&config_json("qwen3")).unwrap();
    assert!(q3.qk_norm && q3.head_dim == 32);
    // transformers 4's way of writing RoPE (`rope_theta` + `rope_scaling` with `type`)
    // means the same.
    let old = with(
        &with(&config_json("llama3"), "rope_parameters", Value::Null),
        "rope_scaling",
        json!({"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    );
    assert_eq!(
        parse(&with(&old, "rope_theta", json!(500000.0))).unwrap(),
        l3
    );
    let plain = with(&config_json("llama"), "rope_parameters", Value::Null);
    assert_eq!(parse(&plain).unwrap().rope_theta, 10000.0);
    assert_eq!(
        parse(&with(&plain, "rope_scaling", Value::Null)).unwrap(),
        parse(&plain).unwrap()
    );
}

#[test]
fn configs_asking_for_what_is_not_implemented_are_refused_by_key() {
    let l = config_json("llama");
    err_names(
        parse(&with(&l, "model_type", json!("gemma"))),
        &["model_type", "gemma"],
    );
    err_names(
        parse(&with(&l, "model_type", Value::Null)),
        &["model_type", "missing"],
    );
    err_names(
        parse(&with(&l, "hidden_act", json!("gelu"))),
        &["hidden_act", "gelu"],
    );
    err_names(
        parse(&with(
            &l,
            "rope_parameters",
            json!({"rope_type": "yarn", "factor": 4.0}),
        )),
        &["rope_parameters.rope_type", "yarn"],
    );
    let old = with(&l, "rope_parameters", Value::Null);
    err_names(
        parse(&with(
            &old,
            "rope_scaling",
            json!({"type": "linear", "factor": 2.0}),
        )),
        &["rope_scaling.type", "linear"],
    );
    err_names(
        parse(&with(
            &l,
            "rope_parameters",
            json!({"rope_type": "llama3", "factor": 8.0}),
        )),
        &["rope_parameters.low_freq_factor", "missing"],
    );
    err_names(
        parse(&with(&l, "partial_rotary_factor", json!(0.5))),
        &["partial_rotary_factor", "0.5"],
    );
    err_names(
        parse(&with(
            &l,
            "quantization_config",
            json!({"quant_method": "gptq"}),
        )),
        &["quantization_config"],
    );
    err_names(
        parse(&with(&l, "hidden_size", Value::Null)),
        &["hidden_size", "missing"],
    );
    err_names(
        parse(&with(&l, "hidden_size", json!("64"))),
        &["hidden_size", "\"64\""],
    );
    err_names(
        parse(&with(&l, "num_hidden_layers", json!(-3))),
        &["num_hidden_layers"],
    );
    err_names(
        parse(&with(&l, "vocab_size", json!(1u64 << 40))),
        &["vocab_size"],
    );
    err_names(
        parse(&with(&l, "num_key_value_heads", json!(3))),
        &["num_key_value_heads"],
    );
    err_names(
        parse(&with(&l, "head_dim", json!(15))),
        &["head_dim", "odd"],
    );
    err_names(
        parse(&with(&l, "rms_norm_eps", json!(-1))),
        &["rms_norm_eps"],
    );
    err_names(
        parse(&with(&l, "attention_bias", json!("yes"))),
        &["attention_bias"],
    );
    // A sliding window shortens the default context to it (attention within the window
    // is full attention); a context beyond it is refused. Mistral always, Qwen when
    // enabled.
    let m = config_json("mistral");
    let c = parse(&with(&m, "sliding_window", json!(16))).unwrap();
    assert_eq!((c.context, c.sliding_window), (16, Some(16)));
    err_names(
        c.clone().with_context(17, "dir/config.json"),
        &["sliding_window", "16", "sliding-window", "17"],
    );
    assert_eq!(c.clone().with_context(8, "x").unwrap().context, 8);
    let q = with(&config_json("qwen2"), "use_sliding_window", json!(true));
    assert!(parse(&q).is_ok(), "no window given: full attention");
    let c = parse(&with(&q, "sliding_window", json!(8))).unwrap();
    err_names(c.with_context(9, "x"), &["sliding_window", "8"]);
    let off = with(&config_json("qwen2"), "sliding_window", json!(8));
    assert_eq!(parse(&off).unwrap().sliding_window, None, "not enabled");
    err_names(
        parse(&with(&m, "sliding_window", json!("wide"))),
        &["sliding_window", "wide"],
    );
    // The served context: at most max_position_embeddings, 4096 unless asked for more.
    let long = parse(&with(&l, "max_position_embeddings", json!(131072))).unwrap();
    assert_eq!((long.context, long.max_context), (4096, 131072));
    assert_eq!(
        long.clone().with_context(131072, "x").unwrap().context,
        131072
    );
    err_names(
        long.with_context(131073, "dir/config.json"),
        &[
            "dir/config.json",
            "max_position_embeddings",
            "131073",
            "131072",
        ],
    );
    err_names(
        parse(&with(
            &q,
            "layer_types",
            json!(["full_attention", "chunked_attention"]),
        )),
        &["layer_types", "chunked_attention"],
    );
    // Malformed JSON names the file.
    let e = HfConfig::parse(b"{\"model_type\": ", "x/config.json");
    err_names(e, &["x/config.json", "not JSON"]);
    err_names(
        HfConfig::parse(b"[1]", "x/config.json"),
        &["not a JSON object"],
    );
    let dir = copy("llama", "cfg");
    std::fs::write(dir.join("config.json"), b"{oops").unwrap();
    err_names(HfConfig::read(&dir), &["config.json"]);
    std::fs::remove_file(dir.join("config.json")).unwrap();
    err_names(HfConfig::read(&dir), &["config.json"]);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Loads every layer of `dir` (one stage) and runs a prefill; the error's text.
fn load_all(dir: &Path) -> Result<(), String> {
    let (cfg, w) = open(dir).map_err(|e| e.to_string())?;
    let layers = cfg.layers;
    let mut dec = HfDecoder::new(cfg, Kind::Float);
    let get = w.getter(Device::Cpu);
    dec.load(0..layers, &get)
}

#[test]
fn broken_weights_are_errors_naming_the_file_and_tensor() {
    // A truncated shard.
    let dir = copy("llama", "trunc");
    let shard = "model-00002-of-00004.safetensors";
    let bytes = std::fs::read(dir.join(shard)).unwrap();
    std::fs::write(dir.join(shard), &bytes[..bytes.len() / 2]).unwrap();
    err_names(load_all(&dir), &[shard]);
    // Refused when the folder is offered (described), before any stage loads.
    let describe = crate::models::config::describe;
    err_names(describe(&dir), &[shard]);
    // … also through a serving stage: an error, not a panic.
    let mc = crate::models::config::describe(&fixture("llama")).unwrap();
    let mut st = open_stage(&dir, Device::Cpu, &mc).unwrap();
    let toks: Vec<u8> = [1i64, 2, 3].iter().flat_map(|t| t.to_le_bytes()).collect();
    let r = st.forward(
        &[1],
        0..3,
        true,
        &[0],
        Payload::Tokens,
        &[1, 3],
        &toks,
        Payload::LastLogits,
    );
    err_names(r, &[shard]);
    // A header length beyond the file.
    let mut huge = bytes.clone();
    huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(dir.join(shard), &huge).unwrap();
    err_names(load_all(&dir), &[shard, "header length"]);
    err_names(describe(&dir), &[shard, "header length"]);
    std::fs::write(dir.join(shard), &bytes[..4]).unwrap();
    err_names(load_all(&dir), &[shard]);
    err_names(describe(&dir), &[shard]);

    // A tensor the index does not name.
    let dir = copy("llama", "missing");
    let mut idx = index(&dir);
    let name = "model.layers.1.mlp.up_proj.weight";
    idx["weight_map"].as_object_mut().unwrap().remove(name);
    write_index(&dir, &idx);
    err_names(load_all(&dir), &[name, "missing"]);
    // Named by the index but not in its shard.
    let mut idx = index(&fixture("llama"));
    let other = idx["weight_map"][llama::NORM].as_str().unwrap().to_string();
    let wrong = if other == shard {
        "model-00001-of-00004.safetensors"
    } else {
        shard
    };
    idx["weight_map"][llama::NORM] = json!(wrong);
    write_index(&dir, &idx);
    err_names(load_all(&dir), &[wrong, llama::NORM]);
    err_names(describe(&dir), &[wrong, llama::NORM]);

    // An index naming an absent shard, or a path outside the folder.
    let dir = copy("llama", "absent");
    std::fs::remove_file(dir.join("model-00003-of-00004.safetensors")).unwrap();
    err_names(
        HfWeights::open(&dir),
        &[weights::INDEX, "model-00003-of-00004.safetensors"],
    );
    let mut idx = index(&dir);
    idx["weight_map"][llama::NORM] = json!("../model-00001-of-00004.safetensors");
    write_index(&dir, &idx);
    err_names(HfWeights::open(&dir), &[weights::INDEX, llama::NORM]);
    std::fs::write(dir.join(weights::INDEX), b"{\"weight_map\": 3}").unwrap();
    err_names(HfWeights::open(&dir), &[weights::INDEX, "weight_map"]);
    std::fs::write(dir.join(weights::INDEX), b"not json").unwrap();
    err_names(HfWeights::open(&dir), &[weights::INDEX, "JSON"]);
    std::fs::remove_file(dir.join(weights::INDEX)).unwrap();
    err_names(HfWeights::open(&dir), &[weights::SINGLE]);

    // A tensor of the wrong shape (the config says a narrower MLP).
    let dir = copy("llama", "shape");
    let cfg = with(&config_json("llama"), "intermediate_size", json!(96));
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    err_names(
        load_all(&dir),
        &[
            "model.layers.0.mlp.gate_proj.weight",
            "[128, 64]",
            "[96, 64]",
        ],
    );

    // A tensor of a type that is not floating point.
    let dir = copy("llama", "dtype");
    write_safetensors(
        &dir.join("ints.safetensors"),
        &[(llama::NORM, "I64", vec![64], vec![0u8; 64 * 8])],
    );
    let mut idx = index(&dir);
    idx["weight_map"][llama::NORM] = json!("ints.safetensors");
    write_index(&dir, &idx);
    err_names(load_all(&dir), &["ints.safetensors", llama::NORM, "I64"]);
    // A declared size that does not match the shape.
    write_safetensors(
        &dir.join("ints.safetensors"),
        &[(llama::NORM, "F32", vec![64], vec![0u8; 64 * 2])],
    );
    err_names(
        load_all(&dir),
        &["ints.safetensors", llama::NORM, "do not fit"],
    );
    for tag in ["trunc", "missing", "absent", "shape", "dtype", "cfg"] {
        let _ = std::fs::remove_dir_all(
            std::env::temp_dir().join(format!("shoal-hf-{tag}-{}", std::process::id())),
        );
    }
}

/// BF16 and F16 tensors are read in their type; the decoder converts them to its compute
/// type, and a bf16 model computes close to the f32 one.
#[test]
fn half_precision_weights_load_and_compute() {
    let dir = std::env::temp_dir().join(format!("shoal-hf-half-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let vals = [1.0f32, -2.5, 0.125, 3.0];
    let t = Tensor::from_slice(&vals);
    let raw = |k: Kind| {
        let h = t.to_kind(k);
        let mut b = vec![0u8; 8];
        h.copy_data_u8(&mut b, 4);
        b
    };
    write_safetensors(
        &dir.join(weights::SINGLE),
        &[
            ("a", "BF16", vec![2, 2], raw(Kind::BFloat16)),
            ("b", "F16", vec![4], raw(Kind::Half)),
        ],
    );
    let w = HfWeights::open(&dir).unwrap();
    let a = w.get("a").unwrap();
    assert_eq!((a.kind(), a.size()), (Kind::BFloat16, vec![2, 2]));
    assert_eq!(
        Vec::<f32>::try_from(a.to_kind(Kind::Float).view([-1])).unwrap(),
        vals
    );
    let b = w.get("b").unwrap();
    assert_eq!(b.kind(), Kind::Half);
    assert_eq!(Vec::<f32>::try_from(b.to_kind(Kind::Float)).unwrap(), vals);
    let _ = std::fs::remove_dir_all(&dir);

    // The llama fixture in bf16: logits within bf16's rounding of the f32 ones.
    let (cfg, w) = open(&fixture("llama")).unwrap();
    let n = cfg.layers;
    let x = Tensor::from_slice(&[1i64, 17, 250, 3, 99, 380]).view([1, 6]);
    let run = |k: Kind| {
        let mut d = HfDecoder::new(cfg.clone(), k);
        d.load(0..n, &w.getter(Device::Cpu)).unwrap();
        tch::no_grad(|| d.forward(&x)).unwrap().to_kind(Kind::Float)
    };
    let (f32s, bf16s) = (run(Kind::Float), run(Kind::BFloat16));
    let d = (f32s - bf16s).abs().max().double_value(&[]);
    assert!(d < 0.1, "bf16 logits differ by {d}");
}

/// The compute type and context chosen when a folder is offered: sizes follow them, the
/// stage computes in them, and an impossible context is refused naming the key.
#[test]
fn offered_dtype_and_context_shape_the_stage() {
    use crate::models::config::{describe_with, HfServe};
    let dir = fixture("llama");
    let (cfg, w) = open(&dir).unwrap();
    assert_eq!(w.stored_kind().unwrap(), Kind::Float);
    let f32s = describe_with(&dir, HfServe::default()).unwrap();
    assert_eq!(f32s.dtype.as_deref(), Some("f32"));
    assert_eq!(i64::from(f32s.context), cfg.context);
    let bf16 = HfServe {
        dtype: ServeDtype::Bf16,
        ..Default::default()
    };
    let half = describe_with(&dir, bf16).unwrap();
    assert_eq!(half.dtype.as_deref(), Some("bf16"));
    for (a, b) in f32s.layer_bytes.iter().zip(&half.layer_bytes) {
        assert_eq!(*a, 2 * b, "bf16 layers take half the bytes");
    }
    // Auto: f32 on the CPU whatever the file holds; the stored type elsewhere.
    assert_eq!(
        ServeDtype::Auto.kind(Kind::BFloat16, Device::Cpu),
        Kind::Float
    );
    assert_eq!(
        ServeDtype::Auto.kind(Kind::BFloat16, Device::Cuda(0)),
        Kind::BFloat16
    );
    let short = HfServe {
        context: Some(16),
        ..Default::default()
    };
    let s = describe_with(&dir, short).unwrap();
    assert_eq!(s.context, 16);
    assert!(
        s.layer_bytes[1] < f32s.layer_bytes[1],
        "a shorter KV budget"
    );
    let too_long = HfServe {
        context: Some(cfg.max_context as u32 + 1),
        ..Default::default()
    };
    err_names(describe_with(&dir, too_long), &["max_position_embeddings"]);
    // A stage opened as announced computes in bf16 and refuses a prompt past the context.
    let mut stage = open_stage(&dir, Device::Cpu, &s).unwrap();
    let rows = [1u64];
    let toks: Vec<u8> = [1i64, 17, 250, 3]
        .iter()
        .flat_map(|t| t.to_le_bytes())
        .collect();
    let run = |stage: &mut crate::models::stage::StageExecutor, n: u32, toks: &[u8]| {
        stage
            .forward(
                &rows,
                0..cfg.layers,
                true,
                &[0],
                Payload::Tokens,
                &[1, n],
                toks,
                Payload::LastLogits,
            )
            .map(|(_, shape, bytes)| (shape, bytes))
    };
    assert_eq!(run(&mut stage, 4, &toks).unwrap().0[1] as i64, cfg.vocab);
    stage.drop_rows(&rows);
    let long: Vec<u8> = (0..17i64).flat_map(|t| t.to_le_bytes()).collect();
    err_names(run(&mut stage, 17, &long), &["context of 16"]);
    let mut half_stage = open_stage(&dir, Device::Cpu, &half).unwrap();
    let (f, h) = (
        run(&mut open_stage(&dir, Device::Cpu, &f32s).unwrap(), 4, &toks),
        run(&mut half_stage, 4, &toks),
    );
    let floats = |b: &[u8]| -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let (f, h) = (floats(&f.unwrap().1), floats(&h.unwrap().1));
    assert_eq!(f.len(), cfg.vocab as usize);
    let d = f
        .iter()
        .zip(&h)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(d > 0.0 && d < 0.1, "bf16 logits differ from f32 by {d}");
}
