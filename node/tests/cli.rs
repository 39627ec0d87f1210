//! Bad input gives one clear line on stderr and a non-zero exit, never a panic.

mod common;
use common::*;

fn assert_one_line_error(out: &std::process::Output, code: i32, needle: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(!err.contains("RUST_BACKTRACE"), "{err}");
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "exactly one line on stderr: {err}");
    assert!(lines[0].starts_with("error: "), "{err}");
    assert!(lines[0].contains(needle), "{err} lacks {needle}");
}

/// `shoal up` in a fresh data dir, loopback only, mDNS off; `extra` may override
/// `--api`, `--listen` and `--data-listen`.
fn up(d: &TempDir, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["up", "--data-dir", d.0.to_str().unwrap(), "--no-mdns"];
    for (flag, default) in [
        ("--api", "127.0.0.1:0"),
        ("--listen", "/ip4/127.0.0.1/tcp/0"),
        ("--data-listen", "127.0.0.1:0"),
    ] {
        if !extra.contains(&flag) {
            args.extend([flag, default]);
        }
    }
    args.extend_from_slice(extra);
    run_shoal(&args)
}

#[test]
fn bad_multiaddr() {
    let d = TempDir::new("badaddr");
    let out = up(&d, &["--bootstrap", "not-a-multiaddr"]);
    assert_one_line_error(&out, 2, "invalid --bootstrap address 'not-a-multiaddr'");
}

#[test]
fn malformed_key_file() {
    let d = TempDir::new("badkey");
    std::fs::write(d.0.join("identity.key"), b"this is not a key").unwrap();
    assert_one_line_error(&up(&d, &[]), 2, "is malformed");
}

#[test]
fn unreadable_or_malformed_swarm_key() {
    let d = TempDir::new("badpsk");
    let missing = d.0.join("missing.key");
    let out = up(&d, &["--swarm-key", missing.to_str().unwrap()]);
    assert_one_line_error(&out, 2, "missing.key");
    let bad = d.0.join("bad.key");
    std::fs::write(&bad, "/key/swarm/psk/1.0.0/\n/base16/\nnothex").unwrap();
    let out = up(&d, &["--swarm-key", bad.to_str().unwrap()]);
    assert_one_line_error(&out, 2, "swarm key");
}

#[test]
fn port_already_in_use() {
    let d = TempDir::new("port");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let listen = format!("/ip4/127.0.0.1/tcp/{port}");
    assert_one_line_error(&up(&d, &["--listen", &listen]), 1, "cannot listen on");
    let api = format!("127.0.0.1:{port}");
    assert_one_line_error(&up(&d, &["--api", &api]), 1, "cannot bind the local API");
}

#[test]
fn cuda_where_there_is_none_is_one_line_and_no_fall_back() {
    // On a machine without CUDA `cuda` names a device it lacks; with CUDA, one index past
    // its devices does. Either way the node never starts (no fall-back to the CPU).
    let count = shoal_node::device::cuda_device_count();
    let (asked, needle) = if count == 0 {
        (
            "cuda".to_string(),
            "device `cuda:0`: no CUDA device is available".to_string(),
        )
    } else {
        (
            format!("cuda:{count}"),
            format!("device `cuda:{count}`: this machine has {count} CUDA device(s)"),
        )
    };
    let d = TempDir::new("nocuda");
    assert_one_line_error(&up(&d, &["--device", &asked]), 1, &needle);
}

#[test]
fn a_device_that_is_not_one_is_refused_by_argument_parsing() {
    let d = TempDir::new("baddevice");
    let out = up(&d, &["--device", "bogus"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.starts_with("error: invalid value 'bogus' for '--device"),
        "{err}"
    );
    assert!(err.contains("expected auto, cpu, cuda or cuda:N"), "{err}");
    // Refused before anything starts: the data dir holds no identity.
    assert!(!d.0.join("identity.key").exists());
}

#[test]
fn runtime_threads_and_quic_window_out_of_range_are_refused_by_argument_parsing() {
    for (flag, value, range) in [
        ("--runtime-threads", "0", "0 is not in 1..=1024"),
        ("--quic-window", "4096", "4096 is not in 65536.."),
    ] {
        let d = TempDir::new("badflag");
        let out = up(&d, &[flag, value]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "stderr: {err}");
        assert!(
            err.starts_with(&format!("error: invalid value '{value}' for '{flag}")),
            "{err}"
        );
        assert!(err.contains(range), "{err}");
        assert!(!d.0.join("identity.key").exists());
    }
}

#[test]
fn status_of_absent_node() {
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = free.local_addr().unwrap().to_string();
    drop(free);
    let out = run_shoal(&["status", "--api", &addr]);
    assert_one_line_error(&out, 1, "cannot reach the node API");
}

#[test]
fn local_cluster_command_converges_and_exits() {
    let out = run_shoal(&["local", "--nodes", "3", "--exit-when-converged", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(v["converged"], true);
    assert_eq!(v["members"].as_array().unwrap().len(), 3);
}

#[test]
fn bench_membership_prints_one_json_line() {
    let out = run_shoal(&["bench", "membership", "--nodes", "3", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1);
    let v: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(v["nodes"], 3);
    // Detection cannot beat the failure timeout (1500 ms by default).
    assert!(v["detect_ms"].as_u64().unwrap() >= 1000, "{v}");
    assert!(v["converge_ms"].as_u64().is_some());
}

#[test]
fn bench_tcp_ceiling_streams_a_ring() {
    let out = run_shoal(&["bench", "tcp-ceiling", "--ring", "3", "--mib", "32"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&out.stdout).trim()).unwrap();
    assert_eq!(v["ring"], 3);
    let (per, all) = (
        v["per_member_gbps"].as_f64().unwrap(),
        v["aggregate_gbps"].as_f64().unwrap(),
    );
    // Every member received all its bytes: the slowest rate is positive and at most a
    // third of the sum.
    assert!(per > 0.0 && per * 3.0 <= all * (1.0 + 1e-9), "{v}");
    assert_one_line_error(
        &run_shoal(&["bench", "tcp-ceiling", "--ring", "0"]),
        2,
        "--ring must be 1..=16",
    );
}

/// The Hugging Face fixture `name`.
fn hf_fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(name)
}

/// Copies the files of `src` into `dst` (created), except those `skip` names.
fn copy_files(src: &std::path::Path, dst: &std::path::Path, skip: &[&str]) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let name = e.unwrap().file_name();
        if !skip.iter().any(|s| name == *s) {
            std::fs::copy(src.join(&name), dst.join(&name)).unwrap();
        }
    }
}

/// `n` greedy tokens of the folder `dir` after `prompt`, computed here by the whole model
/// in one piece (no KV cache, no stages), stopping before a token `stop` accepts.
fn greedy(dir: &std::path::Path, prompt: &[u32], n: usize, stop: impl Fn(u32) -> bool) -> Vec<u32> {
    use shoal_node::models::decoder::Decoder;
    use tch::{Device, Kind, Tensor};
    let (cfg, weights) = shoal_node::models::hf::open(dir).unwrap();
    let layers = cfg.layers;
    let mut dec = shoal_node::models::hf::HfDecoder::new(cfg, Kind::Float);
    dec.load(0..layers, &weights.getter(Device::Cpu)).unwrap();
    let mut ids: Vec<i64> = prompt.iter().map(|&t| i64::from(t)).collect();
    let mut out = Vec::new();
    for _ in 0..n {
        let logits = dec
            .forward(&Tensor::from_slice(&ids).view([1, -1]))
            .unwrap()
            .get(0)
            .get(-1);
        // The runner-up is clearly behind: the served pipeline's rounding cannot flip it.
        let top = logits.topk(2, -1, true, true).0;
        let (a, b) = (top.double_value(&[0]), top.double_value(&[1]));
        assert!(
            a - b > 1e-4,
            "a near tie ({a} vs {b}): choose another prompt"
        );
        let t = logits.argmax(-1, false).int64_value(&[]);
        if stop(t as u32) {
            break;
        }
        out.push(t as u32);
        ids.push(t);
    }
    out
}

#[test]
fn serve_local_answers_a_text_prompt_through_two_stages_and_exits() {
    let d = TempDir::new("serve-local");
    // The oracle: the in-process model gives transformers' greedy tokens for the fixture's
    // reference prompt.
    let llama = hf_fixture("llama");
    let reference: serde_json::Value =
        serde_json::from_slice(&std::fs::read(llama.join("reference.json")).unwrap()).unwrap();
    let ids = |v: &serde_json::Value| -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    };
    let generated = ids(&reference["generated"]);
    assert_eq!(
        greedy(&llama, &ids(&reference["prompt"]), 8, |_| false),
        generated[..8]
    );
    // The llama fixture's weights with the byte-level tokenizer fixture (ids within the
    // model's 400; its stop token <|im_end|> = 2): text prompts work.
    let folder = d.0.join("llama");
    copy_files(&llama, &folder, &[]);
    let tokenizer =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer/bytelevel");
    copy_files(&tokenizer, &folder, &["config.json"]);
    let tok = shoal_node::text::Tokenizer::load(&folder).unwrap();
    let prompt = "The cat sat on the mat.";
    let prompt_ids = tok.encode(prompt, true).unwrap();
    let want = greedy(&folder, &prompt_ids, 8, |t| tok.is_stop(t));
    assert_eq!(want.len(), 8, "the completion runs its 8 tokens: {want:?}");
    let want_text = tok.decode(&want, true).unwrap();

    let nodes = d.0.join("nodes");
    let out = run_shoal(&[
        "serve",
        "--local",
        "2",
        "--stages",
        "2",
        "--device",
        "cpu",
        "--dir",
        nodes.to_str().unwrap(),
        "--max-tokens",
        "8",
        "--json",
        "--prompt",
        prompt,
        folder.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    // The offer, served as one replica of 2 stages (one per node).
    let served = lines
        .iter()
        .find(|v| v.get("served").is_some())
        .unwrap_or_else(|| panic!("no served line: {stdout}"));
    assert_eq!(served["served"], "llama", "{served}");
    let replicas = served["replicas"].as_array().unwrap();
    assert_eq!(replicas.len(), 1, "{served}");
    let stages = replicas[0].as_array().unwrap();
    assert_eq!(stages.len(), 2, "{served}");
    assert_ne!(stages[0], stages[1], "two nodes: {served}");
    // The answer: the model's greedy completion, decoded; 8 tokens, cut by the length.
    let answer = lines
        .iter()
        .find(|v| v["prompt"] == prompt)
        .unwrap_or_else(|| panic!("no answer line: {stdout}"));
    assert_eq!(answer["completion"], want_text.as_str(), "{answer}");
    assert_eq!(answer["finish_reason"], "length", "{answer}");
    let usage = &answer["usage"];
    assert_eq!(usage["prompt_tokens"], prompt_ids.len(), "{answer}");
    assert_eq!(usage["completion_tokens"], 8, "{answer}");
    assert_eq!(usage["total_tokens"], prompt_ids.len() + 8, "{answer}");
    assert!(answer["ms"].as_f64().is_some_and(|ms| ms > 0.0), "{answer}");
}

#[test]
fn serve_refuses_a_bad_folder_in_one_line_before_any_node_starts() {
    let d = TempDir::new("serve-bad");
    let nodes = d.0.join("nodes");
    let serve = |folder: &std::path::Path| {
        run_shoal(&[
            "serve",
            "--local",
            "1",
            "--dir",
            nodes.to_str().unwrap(),
            "--prompt",
            "hi",
            folder.to_str().unwrap(),
        ])
    };
    // A family that is not implemented: the file, the key and its value.
    let gpt2 = d.0.join("gpt2");
    copy_files(&hf_fixture("llama"), &gpt2, &[]);
    let cfg = std::fs::read_to_string(gpt2.join("config.json"))
        .unwrap()
        .replace("\"model_type\": \"llama\"", "\"model_type\": \"gpt2\"");
    std::fs::write(gpt2.join("config.json"), cfg).unwrap();
    assert_one_line_error(&serve(&gpt2), 2, "`model_type` = \"gpt2\" is not supported");
    // An index naming a shard outside the folder.
    let escape = d.0.join("escape");
    copy_files(&hf_fixture("llama"), &escape, &[]);
    let index = escape.join("model.safetensors.index.json");
    let text = std::fs::read_to_string(&index).unwrap().replacen(
        "\"model-00001-of-00004",
        "\"../model-00001-of-00004",
        1,
    );
    std::fs::write(&index, text).unwrap();
    assert_one_line_error(&serve(&escape), 2, "is not a file name in the folder");
    // Not a folder of a model at all.
    let empty = d.0.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    assert_one_line_error(&serve(&empty), 2, "config.json");
    assert!(!nodes.exists(), "no node started");
}
