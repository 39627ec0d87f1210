//! Serving with real `shoal up` processes: a 2-stage pipeline answers exactly what a single
//! node answers (greedy and seeded, alone and batched), the real `openai` Python client
//! works against it (streaming and not), errors are OpenAI-style 4xx, repeated requests hit
//! the cache; and under a bounded load (300 requests, concurrency 8) with a stage killed
//! midway at least 99% succeed and none hang. Prints the success rate and latencies.
//! Logprobs of the byte-level model are the log_softmax of `/v1/infer`'s logits.

mod common;
use common::logprobs::*;
use common::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// `n` joined nodes (node 0 bootstraps the others).
fn cluster(dir: &Path, n: usize) -> Vec<Node> {
    serving_cluster(dir, n, &[])
}

/// Trains a small random-ish gpt for a few steps and returns its checkpoint.
fn tiny_checkpoint(dir: &Path) -> PathBuf {
    let job = dir.join("tiny.toml");
    std::fs::write(
        &job,
        r#"
name = "tiny"
seed = 3
steps = 20
batch_size = 32
threads = 1
[model]
kind = "gpt"
layers = 4
heads = 2
width = 32
context = 16
[data]
kind = "arithmetic"
digits = 2
[optimizer]
kind = "adamw"
lr = 0.003
"#,
    )
    .unwrap();
    let out = Command::new(shoal_bin())
        .args(["train", "--local", "1", "--json", "--dir"])
        .arg(dir.join("train-nodes"))
        .arg(&job)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("shoal train");
    assert!(
        out.status.success(),
        "training the test model failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ck = dir.join("runs/tiny/checkpoint.safetensors");
    assert!(ck.exists());
    ck
}

fn post(node: &Node, path: &str, body: &Value) -> Result<Value, String> {
    http_timeout(
        node.api().unwrap(),
        "POST",
        path,
        body.to_string().as_bytes(),
        Duration::from_secs(60),
    )
    .map(|b| serde_json::from_slice(&b).unwrap_or(Value::Null))
}

fn get(node: &Node, path: &str) -> Value {
    serde_json::from_slice(&http(node.api().unwrap(), "GET", path, b"").unwrap()).unwrap()
}

/// Offers the model on `node` and waits until `node` plans `replicas` pipelines of
/// `stages` stages over `holders` members.
fn offer(node: &Node, ck: &Path, stages: u32, holders: usize, replicas: usize) -> Value {
    post(
        node,
        "/v1/serve",
        &json!({"path": ck, "name": "tiny", "stages": stages}),
    )
    .expect("offer");
    wait_until("the model is planned", Duration::from_secs(60), || {
        let v = get(node, "/v1/serve");
        let m = &v[0];
        let ok = m["holders"].as_array()?.len() >= holders
            && m["replicas"].as_array()?.len() == replicas
            && m["replicas"][0].as_array()?.len() == stages as usize;
        ok.then_some(v)
    })
}

fn complete(node: &Node, prompt: &str, extra: &Value) -> Result<Value, String> {
    let mut body = json!({"model": "tiny", "prompt": prompt, "max_tokens": 6});
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    post(node, "/v1/completions", &body)
}

fn text_of(v: &Value) -> String {
    v["choices"][0]["text"].as_str().unwrap().to_string()
}

const PROMPTS: [&str; 8] = [
    "12+34=", "7+5=", "99+1=", "3+3=", "50+50=", "1+2=", "45+54=", "8+80=",
];

#[test]
fn a_pipeline_answers_like_one_node_and_speaks_openai() {
    let dir = TempDir::new("serve-pipeline");
    let ck = tiny_checkpoint(&dir.0);
    // The pipeline starts a batch in prefill calls of at most 12 prompt tokens: the
    // concurrent prompts below (4 to 6 bytes) go 2 to a call, and must answer the same.
    let pipeline = serving_cluster(&dir.0.join("pipe"), 2, &["--serve-prefill-tokens", "12"]);
    let single = cluster(&dir.0.join("single"), 1);
    let plan = offer(&pipeline[0], &ck, 2, 2, 1);
    println!("plan: {}", plan[0]["replicas"]);
    offer(&single[0], &ck, 1, 1, 1);

    // Greedy and seeded sampling, one request at a time: same text on both.
    let modes = [
        json!({"temperature": 0}),
        json!({"temperature": 0.9, "seed": 11, "top_p": 0.95}),
    ];
    let mut expected = Vec::new();
    for mode in &modes {
        for p in PROMPTS {
            let one = complete(&single[0], p, mode).unwrap();
            // Through the node that did not offer the model (it fetched it).
            let two = complete(&pipeline[1], p, mode).unwrap();
            assert_eq!(text_of(&one), text_of(&two), "prompt {p:?} {mode}");
            assert_eq!(one["usage"]["prompt_tokens"], p.len());
            expected.push((p, mode.clone(), text_of(&one)));
        }
    }
    // Concurrent requests are batched (left-padded rows of different lengths) and still
    // answer exactly what one node answers alone. A new seed avoids the cache.
    let before = get(&pipeline[0], "/v1/status")["serve_stats"].clone();
    let batched: Vec<(String, String)> = std::thread::scope(|s| {
        let hs: Vec<_> = PROMPTS
            .iter()
            .map(|p| {
                let node = &pipeline[0];
                s.spawn(move || {
                    let mode = json!({"temperature": 0.7, "seed": 99});
                    (p.to_string(), text_of(&complete(node, p, &mode).unwrap()))
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (p, text) in &batched {
        let alone = complete(&single[0], p, &json!({"temperature": 0.7, "seed": 99})).unwrap();
        assert_eq!(&text_of(&alone), text, "batched {p:?}");
    }
    let after = get(&pipeline[0], "/v1/status")["serve_stats"].clone();
    let batches = after["batches"].as_u64().unwrap() - before["batches"].as_u64().unwrap();
    println!("8 concurrent requests ran in {batches} prefill calls");
    assert!(batches < 8, "concurrent requests were never batched");
    assert!(
        batches >= 4,
        "prefill calls of at most 12 tokens hold 2 rows at most"
    );

    // The cache answers a repeated deterministic request.
    let hits = |n: &Node| {
        get(n, "/v1/status")["serve_stats"]["cache_hits"]
            .as_u64()
            .unwrap()
    };
    let h0 = hits(&pipeline[1]);
    let again = complete(&pipeline[1], PROMPTS[0], &modes[0]).unwrap();
    assert_eq!(text_of(&again), expected[0].2);
    assert_eq!(again["system_fingerprint"], "shoal-cache");
    assert_eq!(hits(&pipeline[1]), h0 + 1);

    // The real OpenAI client, streaming and not.
    let py = std::env::var("SHOAL_PYTHON").expect("SHOAL_PYTHON (source scripts/env.sh)");
    let script = repo_root().join("scripts/openai_check.py");
    let out = Command::new(py)
        .arg(script)
        .arg(format!("http://{}", pipeline[1].api().unwrap()))
        .arg("tiny")
        .output()
        .expect("python");
    assert!(
        out.status.success(),
        "openai client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    println!("openai client: {r}");
    assert_eq!(r["models"], json!(["tiny"]));
    assert_eq!(r["streamed"], r["text"]);
    let alone = complete(
        &single[0],
        "37+45=",
        &json!({"temperature": 0, "max_tokens": 5}),
    );
    assert_eq!(r["text"].as_str().unwrap(), text_of(&alone.unwrap()));
    assert!(r["stream_chunks"].as_u64().unwrap() >= 1);
    assert!(r["stream_finish"].is_string());
    assert_eq!(r["seeded"][0], r["seeded"][1]);
    assert_eq!(r["errors"]["unknown_model"], 404);
    assert_eq!(r["errors"]["too_long"], 400);

    // Bad requests are OpenAI-style 4xx errors, never 500s or hangs.
    let api = pipeline[1].api().unwrap();
    for (body, code) in [
        (&b"{not json"[..], "400"),
        (br#"{"model":"tiny"}"#, "400"),
        (
            br#"{"model":"tiny","prompt":"1+1=","temperature":9}"#,
            "400",
        ),
        (br#"{"model":"nope","prompt":"1+1="}"#, "404"),
        (
            br#"{"model":"tiny","prompt":"1111111111111111111111"}"#,
            "400",
        ),
        (br#"{"model":"tiny","prompt":""}"#, "400"),
    ] {
        let e = http_timeout(
            api,
            "POST",
            "/v1/completions",
            body,
            Duration::from_secs(10),
        )
        .unwrap_err();
        assert!(
            e.starts_with(code),
            "{}: {e}",
            String::from_utf8_lossy(body)
        );
        let err: Value = serde_json::from_str(e.split_once(": ").unwrap().1).unwrap();
        assert!(err["error"]["message"].is_string(), "{e}");
    }
    let big = vec![b' '; 9 << 20];
    let e = http_timeout(
        api,
        "POST",
        "/v1/completions",
        &big,
        Duration::from_secs(10),
    );
    assert!(e.unwrap_err().starts_with("413"));

    // Generic tensors: logits of every position for token ids.
    let v = post(
        &pipeline[1],
        "/v1/infer",
        &json!({"model": "tiny", "inputs": [[49, 43, 50]]}),
    )
    .unwrap();
    assert_eq!(v["shape"], json!([1, 3, 256]));
    let e = post(
        &pipeline[1],
        "/v1/infer",
        &json!({"model": "tiny", "inputs": [[1.5]]}),
    );
    assert!(e.unwrap_err().starts_with("400"));
    check_byte_logprobs(&pipeline[1]);

    // Serving metrics parse with the reference Prometheus parser and count what happened.
    let text = String::from_utf8(http(api, "GET", "/metrics", b"").unwrap()).unwrap();
    let py = std::env::var_os("SHOAL_PYTHON").unwrap();
    let m = prometheus_parse(&py, &dir.0, &text);
    let get = |k: &str| {
        m[k].as_f64()
            .unwrap_or_else(|| panic!("{k} missing from\n{text}"))
    };
    // 2 modes x 8 prompts + the cache repeat + the client's 4 good requests.
    assert!(get(r#"shoal_serve_requests_total{"outcome": "ok"}"#) >= 21.0);
    assert!(get(r#"shoal_serve_requests_total{"outcome": "rejected"}"#) >= 4.0);
    assert!(get(r#"shoal_serve_cache_total{"result": "hit"}"#) >= 2.0);
    assert!(get("shoal_serve_request_duration_seconds_count{}") >= 21.0);
    assert_eq!(get(r#"shoal_serve_replicas{"model": "tiny"}"#), 1.0);
    assert_eq!(get(r#"shoal_serve_model_holders{"model": "tiny"}"#), 2.0);

    // `shoal status` shows the plan.
    let st = run_shoal(&["status", "--api", &pipeline[0].api().unwrap().to_string()]);
    let table = String::from_utf8_lossy(&st.stdout);
    assert!(table.contains("tiny"), "{table}");
}

#[test]
fn a_stage_killed_under_load_fails_over() {
    let dir = TempDir::new("serve-failover");
    let ck = tiny_checkpoint(&dir.0);
    let mut nodes = cluster(&dir.0.join("c"), 4);
    let plan = offer(&nodes[0], &ck, 2, 4, 2);
    println!("plan: {}", plan[0]["replicas"]);
    // The victim: a stage member other than the entry (node 0).
    let ids: Vec<String> = nodes.iter().map(Node::id).collect();
    let victim = (1..4)
        .find(|&i| plan[0]["replicas"].to_string().contains(&ids[i]))
        .unwrap();

    let total = 300usize;
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let results = Arc::new(Mutex::new(Vec::new()));
    let api = nodes[0].api().unwrap();
    let started = Instant::now();
    let workers: Vec<_> = (0..8)
        .map(|_| {
            let (next, done, results) = (next.clone(), done.clone(), results.clone());
            std::thread::spawn(move || loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= total {
                    return;
                }
                // Distinct prompts: no cache hits.
                let body = json!({"model": "tiny", "prompt": format!("{}+{}=", i % 97, i / 97 + 10),
                    "max_tokens": 4, "temperature": 0, "timeout": 20});
                let t0 = Instant::now();
                let r = http_timeout(
                    api,
                    "POST",
                    "/v1/completions",
                    body.to_string().as_bytes(),
                    Duration::from_secs(30),
                );
                results.lock().unwrap().push((
                    r.map_err(|e| e.chars().take(200).collect::<String>()),
                    t0.elapsed(),
                ));
                done.fetch_add(1, Ordering::SeqCst);
            })
        })
        .collect();
    wait_until("a third of the requests", Duration::from_secs(120), || {
        (done.load(Ordering::SeqCst) >= total / 3).then_some(())
    });
    nodes[victim].kill();
    let killed_at = started.elapsed();
    for w in workers {
        w.join().unwrap();
    }
    let results = results.lock().unwrap();
    assert_eq!(results.len(), total, "every request returned");
    let ok = results.iter().filter(|(r, _)| r.is_ok()).count();
    let mut lat: Vec<f64> = results
        .iter()
        .map(|(_, t)| t.as_secs_f64() * 1000.0)
        .collect();
    lat.sort_by(f64::total_cmp);
    let pct = |p: f64| lat[((lat.len() as f64 * p).ceil() as usize).min(lat.len()) - 1];
    let failures: Vec<&String> = results
        .iter()
        .filter_map(|(r, _)| r.as_ref().err())
        .collect();
    println!(
        "failover: {ok}/{total} succeeded ({:.1}%), stage {victim} killed at {:.2} s, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms, total {:.2} s; failures: {:?}",
        100.0 * ok as f64 / total as f64,
        killed_at.as_secs_f64(),
        pct(0.5),
        pct(0.99),
        lat.last().unwrap(),
        started.elapsed().as_secs_f64(),
        failures.iter().take(3).collect::<Vec<_>>()
    );
    assert!(ok * 100 >= total * 99, "only {ok} of {total} succeeded");
    let st = get(&nodes[0], "/v1/status")["serve_stats"].clone();
    println!("entry stats: {st}");
}

#[test]
fn a_torchscript_module_serves_generic_tensors() {
    let dir = TempDir::new("serve-torchscript");
    let py = std::env::var("SHOAL_PYTHON").expect("SHOAL_PYTHON (source scripts/env.sh)");
    let model = dir.0.join("byo.pt");
    export_byo_model(&model);
    let nodes = cluster(&dir.0.join("c"), 2);
    post(
        &nodes[0],
        "/v1/serve",
        &json!({"path": model, "name": "byo", "stages": 1}),
    )
    .expect("offer");
    wait_until("the module is planned", Duration::from_secs(60), || {
        let v = get(&nodes[1], "/v1/serve");
        (v[0]["holders"].as_array()?.len() == 2 && !v[0]["replicas"].as_array()?.is_empty())
            .then_some(())
    });
    let inputs: Vec<Vec<f64>> = (0..3)
        .map(|r| (0..64).map(|i| ((i * 7 + r * 13) % 17) as f64).collect())
        .collect();
    let v = post(
        &nodes[1],
        "/v1/infer",
        &json!({"model": "byo", "inputs": inputs}),
    )
    .unwrap();
    assert_eq!(v["shape"], json!([3, 10]));
    // The same module in PyTorch (eval mode) gives the same outputs; so does a
    // safetensors request (body built and answer read by Python's `safetensors`).
    let script = r#"
import json, sys, torch, urllib.request
from safetensors.torch import save, load
m = torch.jit.load(sys.argv[1]).eval()
x = torch.tensor(json.loads(sys.argv[2]), dtype=torch.float32)
with torch.no_grad():
    ref = m(x)
req = urllib.request.Request(sys.argv[3] + "/v1/infer?model=byo", data=save({"inputs": x}),
    headers={"Content-Type": "application/octet-stream"}, method="POST")
out = load(urllib.request.urlopen(req).read())["outputs"]
print(json.dumps({"ref": ref.tolist(), "st": out.tolist()}))
"#;
    let out = Command::new(&py)
        .args(["-c", script])
        .arg(&model)
        .arg(json!(inputs).to_string())
        .arg(format!("http://{}", nodes[1].api().unwrap()))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    let close = |got: &Value, want: &Value| {
        for (g, w) in got.as_array().unwrap().iter().zip(want.as_array().unwrap()) {
            for (a, b) in g.as_array().unwrap().iter().zip(w.as_array().unwrap()) {
                let (a, b) = (a.as_f64().unwrap(), b.as_f64().unwrap());
                assert!((a - b).abs() < 1e-4, "{a} vs {b}");
            }
        }
    };
    close(&v["outputs"], &r["ref"]);
    close(&r["st"], &r["ref"]);
    // Inputs the module cannot take are a 400, at once (not retried until the deadline).
    let t0 = std::time::Instant::now();
    let e = post(
        &nodes[1],
        "/v1/infer",
        &json!({"model": "byo", "inputs": [[1.0, 2.0]]}),
    )
    .unwrap_err();
    assert!(e.starts_with("400"), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(10));
    // A TorchScript module does not complete text.
    let e = complete(&nodes[0], "1+1=", &json!({"model": "byo"}));
    assert!(e.unwrap_err().starts_with("400"));
}

/// A raw HTTP request with an optional bearer token: (status, body).
fn request_with_token(api: std::net::SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(api).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}\r\n"
    )
    .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    let code = buf.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = buf
        .split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default();
    (code, body)
}

#[test]
fn the_serving_api_asks_for_the_bearer_token() {
    let dir = TempDir::new("serve-token");
    let mut args = serving_args(&[]);
    args.extend(["--listen".into(), "/ip4/127.0.0.1/tcp/0".into()]);
    args.extend(["--api-token".into(), "s3cret".into()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let node = Node::start(&dir.0.join("n"), &refs);
    let api = node.api().unwrap();
    for token in [None, Some("wrong"), Some("s3cre"), Some("s3cret-")] {
        let (code, body) = request_with_token(api, "/v1/models", token);
        assert_eq!(code, 401, "{token:?}: {body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["error"]["code"], "invalid_api_key");
    }
    let (code, body) = request_with_token(api, "/v1/models", Some("s3cret"));
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["object"],
        "list"
    );
    // Health and the node's own API stay open.
    assert_eq!(request_with_token(api, "/healthz", None).0, 200);
}

/// Logprobs of the byte-level model (3 alternatives; a token is its byte), greedy and
/// sampled, each streamed first (a live generation) then whole (the same request, from
/// the cache): the streamed chunks' entries add up to the whole answer's, and per token
/// the logprob and the alternatives are the log_softmax of `/v1/infer`'s logits of prompt
/// + tokens: the model's distribution, before temperature and top_p.
fn check_byte_logprobs(node: &Node) {
    let prompt: Vec<u32> = "12+34=".bytes().map(u32::from).collect();
    let sampled = json!({"temperature": 0.9, "seed": 11, "top_p": 0.95});
    for mode in [json!({"temperature": 0}), sampled] {
        let mut body = json!({"model": "tiny", "prompt": prompt, "max_tokens": 6, "logprobs": 3});
        for (k, v) in mode.as_object().unwrap() {
            body[k] = v.clone();
        }
        body["stream"] = json!(true);
        let raw = http_timeout(
            node.api().unwrap(),
            "POST",
            "/v1/completions",
            body.to_string().as_bytes(),
            Duration::from_secs(60),
        )
        .expect("stream");
        let keys = ["tokens", "token_logprobs", "top_logprobs", "text_offset"];
        let mut joined =
            json!({"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []});
        let events = String::from_utf8_lossy(&raw)
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .take_while(|d| *d != "[DONE]")
            .map(|d| serde_json::from_str::<Value>(d).unwrap())
            .collect::<Vec<_>>();
        for e in &events {
            for k in keys {
                if let Some(v) = e["choices"][0]["logprobs"][k].as_array() {
                    joined[k].as_array_mut().unwrap().extend(v.iter().cloned());
                }
            }
        }
        body["stream"] = json!(false);
        let c = post(node, "/v1/completions", &body).expect("logprobs");
        let lp = &c["choices"][0]["logprobs"];
        assert_eq!(&joined, lp, "{mode}: streamed logprobs");
        let tokens: Vec<u32> = c["choices"][0]["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tokens.len(), 6, "{c}");
        let ids: Vec<u32> = prompt.iter().chain(&tokens).copied().collect();
        let v = post(
            node,
            "/v1/infer",
            &json!({"model": "tiny", "inputs": [ids]}),
        )
        .unwrap();
        let logits: Vec<f32> = v["outputs"][0]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|r| {
                r.as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
            })
            .collect();
        let rows = log_softmax_rows(&logits, 256)[prompt.len() - 1..][..6].to_vec();
        let name = |b: u32| shoal_node::serve::logprobs::text_of(&[b as u8]);
        if mode["temperature"] == 0 {
            let offsets = check_greedy_completion_logprobs(lp, &tokens, &rows, 3, name, 1e-4);
            if tokens.iter().all(|&b| b < 128) {
                assert_eq!(offsets, (0..6).collect::<Vec<u64>>());
            }
            continue;
        }
        // Sampled: the same distribution (temperature and top_p change only the choice).
        for (i, &b) in tokens.iter().enumerate() {
            assert_eq!(lp["tokens"][i], name(b).as_str());
            let got = lp["token_logprobs"][i].as_f64().unwrap() as f32;
            assert!(
                (got - rows[i][b as usize]).abs() <= 1e-4,
                "token {i}: {got} vs {}",
                rows[i][b as usize]
            );
            let alts = lp["top_logprobs"][i].as_object().unwrap();
            assert_eq!(alts.get(&name(b)), Some(&lp["token_logprobs"][i]));
            let mut top: Vec<f32> = alts.values().map(|x| x.as_f64().unwrap() as f32).collect();
            top.sort_by(|a, b| b.total_cmp(a));
            let want = largest(&rows[i], 3);
            // The 3 most likely, plus the chosen token when it is not among them.
            assert!(
                top.len() == 3 || top.len() == 4 && !want.contains(&got),
                "{alts:?}"
            );
            for (g, w) in top.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-4, "token {i}: {top:?} vs {want:?}");
            }
        }
    }
}
