//! Serving a Hugging Face folder with real `shoal up` processes: the folder offered on one
//! node travels to the other as its manifest and files (checked by hash), a 2-stage
//! pipeline across both answers `/v1/infer` with transformers' logits and
//! `/v1/completions` (token-id prompt, greedy) with transformers' greedy tokens, and
//! logprobs (completions and chat, streamed and not) equal to the log_softmax of a full
//! forward computed here; and a folder missing a shard its index names is refused in one
//! line naming it.

mod common;
use common::logprobs::*;
use common::*;
use serde_json::{json, Value};
use shoal_node::serve::logprobs::text_of;
use shoal_node::text::Tokenizer;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Largest difference allowed from transformers' f32 logits.
const TOLERANCE: f32 = 1e-4;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/hf")
        .join(name)
}

/// `n` joined nodes (node 0 bootstraps the others).
fn cluster(dir: &Path, n: usize) -> Vec<Node> {
    serving_cluster(dir, n, &["--device", "cpu"])
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

/// transformers' outputs for the fixture: token rows, their logits (flat), the greedy
/// prompt and its 32 greedy tokens.
struct Reference {
    tokens: Value,
    logits: Vec<f32>,
    prompt: Value,
    generated: Vec<u64>,
}

fn reference(dir: &Path) -> Reference {
    let j: Value = serde_json::from_slice(&std::fs::read(dir.join("reference.json")).unwrap())
        .expect("reference.json");
    let c = shoal_node::models::checkpoint::read(&dir.join("reference.safetensors")).unwrap();
    let t = c.get("logits").expect("reference logits").view([-1]);
    let logits = Vec::<f32>::try_from(t).unwrap();
    Reference {
        tokens: j["tokens"].clone(),
        logits,
        prompt: j["prompt"].clone(),
        generated: j["generated"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect(),
    }
}

/// Per generated token, the log_softmax of the logits that chose it: a full forward of
/// `prompt` + `generated` through every layer of the folder `dir` in this process (the
/// library's stage, one prefill), position `prompt.len() - 1 + i` for token `i`.
fn logprob_rows(dir: &Path, prompt: &[u32], generated: &[u32]) -> Vec<Vec<f32>> {
    use coordinator_free::codec::stage::{f32s, Payload};
    let mc = shoal_node::models::config::describe(dir).expect("describe the folder");
    let mut st =
        shoal_node::models::hf::open_stage(dir, tch::Device::Cpu, &mc).expect("open the folder");
    let (layers, vocab) = (st.config().layers as usize, st.config().vocab as usize);
    let ids: Vec<u32> = prompt.iter().chain(generated).copied().collect();
    let bytes: Vec<u8> = ids
        .iter()
        .flat_map(|&t| i64::from(t).to_le_bytes())
        .collect();
    let (_, shape, out) = st
        .forward(
            &[1],
            0..layers,
            true,
            &[0],
            Payload::Tokens,
            &[1, ids.len() as u32],
            &bytes,
            Payload::Logits,
        )
        .expect("a full forward");
    assert_eq!(shape, [1, ids.len() as u32, vocab as u32]);
    let rows = log_softmax_rows(&f32s(&out), vocab);
    rows[prompt.len() - 1..][..generated.len()].to_vec()
}

fn ids_of(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn flat(v: &Value, out: &mut Vec<f32>) {
    match v {
        Value::Array(a) => a.iter().for_each(|x| flat(x, out)),
        x => out.push(x.as_f64().expect("a number") as f32),
    }
}

#[test]
fn a_folder_served_on_two_stages_answers_like_transformers() {
    let tmp = TempDir::new("serve-hf");
    let nodes = cluster(&tmp.0, 2);
    let src = fixture("llama");
    let r = reference(&src);
    let offer = post(
        &nodes[0],
        "/v1/serve",
        &json!({"path": src, "name": "llama", "stages": 2}),
    )
    .expect("offer");
    assert_eq!(offer["config"]["kind"], "hf", "{offer}");
    assert_eq!(offer["config"]["vocab"], 400, "{offer}");
    // `/v1/models` lists it with its context length (max_position_embeddings).
    let listed = get(&nodes[0], "/v1/models");
    assert_eq!(listed["data"][0]["id"], "llama", "{listed}");
    assert_eq!(listed["data"][0]["context"], 64, "{listed}");
    assert_eq!(listed["data"][0]["layers"], 3, "{listed}");
    let sha = offer["sha256"].as_str().unwrap().to_string();
    // Node 1 fetches the folder and holds it; the plan cuts the 3 layers across both.
    let plan = wait_until(
        "2 holders, one 2-stage replica",
        Duration::from_secs(120),
        || {
            let v = get(&nodes[1], "/v1/serve");
            let m = &v[0];
            let ok = m["holders"].as_array()?.len() == 2
                && m["held"] == true
                && m["replicas"].as_array()?.len() == 1
                && m["replicas"][0].as_array()?.len() == 2;
            ok.then_some(v)
        },
    );
    eprintln!("plan: {}", plan[0]["replicas"]);
    let stages: Vec<String> = plan[0]["replicas"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().split('[').next().unwrap().to_string())
        .collect();
    assert_ne!(stages[0], stages[1], "one stage on each member");

    // The second member's models dir holds the verified folder under the manifest's hash.
    let fetched = tmp.0.join("node-1/models").join(&sha);
    let mut names: Vec<String> = std::fs::read_dir(&fetched)
        .unwrap_or_else(|e| panic!("{}: {e}", fetched.display()))
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names.len(), 6, "config, index, 4 shards: {names:?}");
    for n in &names {
        assert_eq!(
            std::fs::read(fetched.join(n)).unwrap(),
            std::fs::read(src.join(n)).unwrap(),
            "{n}"
        );
    }

    // /v1/infer through both stages: the logits of every position.
    let out = post(
        &nodes[1],
        "/v1/infer",
        &json!({"model": "llama", "inputs": r.tokens}),
    )
    .expect("infer");
    assert_eq!(out["shape"], json!([2, 12, 400]), "{}", out["error"]);
    let mut got = Vec::new();
    flat(&out["outputs"], &mut got);
    assert_eq!(got.len(), r.logits.len());
    let diff = got
        .iter()
        .zip(&r.logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    eprintln!("max |logits - transformers| across 2 stages: {diff:e}");
    assert!(diff <= TOLERANCE, "max |Δ| = {diff}");

    // 32 greedy tokens through the lanes, from a token-id prompt, on either entry.
    for node in &nodes {
        let c = post(
            node,
            "/v1/completions",
            &json!({"model": "llama", "prompt": r.prompt, "max_tokens": 32, "temperature": 0}),
        )
        .expect("completion");
        let choice = &c["choices"][0];
        let tokens: Vec<u64> = choice["tokens"]
            .as_array()
            .unwrap_or_else(|| panic!("no tokens: {c}"))
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        assert_eq!(tokens, r.generated, "greedy tokens");
        assert_eq!(choice["text"], "");
        assert_eq!(choice["finish_reason"], "length");
        assert_eq!(c["usage"]["completion_tokens"], 32);
    }
    // Logprobs with 2 alternatives of the same greedy tokens: the log_softmax of a full
    // forward of prompt + tokens computed here; without a tokenizer a token is named by
    // its id, so the alternatives must be the row's 2 most likely ids.
    let c = post(
        &nodes[1],
        "/v1/completions",
        &json!({"model": "llama", "prompt": r.prompt, "max_tokens": 32, "temperature": 0,
                "logprobs": 2}),
    )
    .expect("logprobs");
    let lp = &c["choices"][0]["logprobs"];
    let generated: Vec<u32> = r.generated.iter().map(|&t| t as u32).collect();
    let rows = logprob_rows(&src, &ids_of(&r.prompt), &generated);
    let name = |id: u32| format!("token_id:{id}");
    let offsets = check_greedy_completion_logprobs(lp, &generated, &rows, 2, name, TOLERANCE);
    assert!(offsets.iter().all(|&o| o == 0), "no text: {offsets:?}");
    for (i, row) in rows.iter().enumerate() {
        let mut best: Vec<usize> = (0..row.len()).collect();
        best.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        let mut want: Vec<String> = best[..2].iter().map(|&b| name(b as u32)).collect();
        let mut got: Vec<String> = lp["top_logprobs"][i]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        want.sort();
        got.sort();
        assert_eq!(got, want, "token {i}");
    }
    // Out of range: OpenAI-style 400s naming the parameter.
    for (path, extra, param) in [
        ("/v1/completions", json!({"logprobs": 6}), "logprobs"),
        ("/v1/completions", json!({"logprobs": true}), "logprobs"),
        (
            "/v1/chat/completions",
            json!({"top_logprobs": 2}),
            "top_logprobs",
        ),
        (
            "/v1/chat/completions",
            json!({"logprobs": true, "top_logprobs": 21}),
            "top_logprobs",
        ),
    ] {
        let mut body = json!({"model": "llama", "prompt": r.prompt, "max_tokens": 2,
                              "messages": [{"role": "user", "content": "hi"}]});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let e = post(&nodes[0], path, &body).unwrap_err();
        assert!(e.starts_with("400"), "{path} {extra}: {e}");
        let err: Value = serde_json::from_str(e.split_once(": ").unwrap().1).unwrap();
        assert_eq!(err["error"]["param"], param, "{e}");
    }
    // A text prompt needs the tokenizer; ids outside the vocabulary are refused.
    let text = post(
        &nodes[0],
        "/v1/completions",
        &json!({"model": "llama", "prompt": "hello"}),
    );
    assert!(text.as_ref().is_err_and(|e| e.contains("400")), "{text:?}");
    let oov = post(
        &nodes[0],
        "/v1/completions",
        &json!({"model": "llama", "prompt": [1, 400]}),
    );
    assert!(oov.as_ref().is_err_and(|e| e.contains("400")), "{oov:?}");
}

#[test]
fn a_folder_missing_a_shard_is_refused_naming_it() {
    let tmp = TempDir::new("serve-hf-bad");
    let bad = tmp.0.join("bad-llama");
    std::fs::create_dir_all(&bad).unwrap();
    let src = fixture("llama");
    for e in std::fs::read_dir(&src).unwrap() {
        let name = e.unwrap().file_name();
        if name != "model-00003-of-00004.safetensors" {
            std::fs::copy(src.join(&name), bad.join(&name)).unwrap();
        }
    }
    let out = run_shoal(&[
        "serve",
        "--local",
        "1",
        "--dir",
        tmp.0.join("nodes").to_str().unwrap(),
        bad.to_str().unwrap(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("model-00003-of-00004.safetensors"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
    assert!(!tmp.0.join("nodes").exists(), "no node started");
}

/// The `data:` payloads of a server-sent-events body, up to `[DONE]`.
fn sse_events(body: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(body)
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .take_while(|d| *d != "[DONE]")
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

#[test]
fn a_folder_with_a_tokenizer_completes_text() {
    let tmp = TempDir::new("serve-hf-text");
    // The llama fixture's weights with the byte-level tokenizer fixture (its ids for the
    // prompts below are within the model's 400; its stop token is <|im_end|> = 2).
    let folder = tmp.0.join("llama-text");
    std::fs::create_dir_all(&folder).unwrap();
    let copy = |src: &Path| {
        for e in std::fs::read_dir(src).unwrap() {
            let name = e.unwrap().file_name();
            if name != "config.json" || src == fixture("llama") {
                std::fs::copy(src.join(&name), folder.join(&name)).unwrap();
            }
        }
    };
    copy(&fixture("llama"));
    copy(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer/bytelevel"));
    let tok = shoal_node::text::Tokenizer::load(&folder).expect("tokenizer");
    let nodes = cluster(&tmp.0, 2);
    post(
        &nodes[0],
        "/v1/serve",
        &json!({"path": folder, "name": "llama", "stages": 2}),
    )
    .expect("offer");
    // Node 1, the entry below, holds the folder fetched with its tokenizer files, and the
    // plan is one 2-stage pipeline across both nodes (completions and chat run through it).
    wait_until(
        "node 1 holds the model, 2 stages",
        Duration::from_secs(120),
        || {
            let v = get(&nodes[1], "/v1/serve");
            let m = &v[0];
            let ok = m["held"] == true
                && m["holders"].as_array()?.len() == 2
                && m["replicas"].as_array()?.len() == 1
                && m["replicas"][0].as_array()?.len() == 2;
            ok.then_some(())
        },
    );
    for prompt in ["hello world", "The cat sat on the mat."] {
        let ids = tok.encode(prompt, true).unwrap();
        let ask = |p: Value, extra: Value| {
            let mut body =
                json!({"model": "llama", "prompt": p, "max_tokens": 24, "temperature": 0});
            for (k, v) in extra.as_object().unwrap() {
                body[k] = v.clone();
            }
            post(&nodes[1], "/v1/completions", &body).expect("completion")
        };
        let by_text = ask(json!(prompt), json!({}));
        let by_ids = ask(json!(ids), json!({}));
        let text = by_text["choices"][0]["text"].as_str().unwrap().to_string();
        let tokens: Vec<u32> = by_ids["choices"][0]["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        eprintln!("{prompt:?} -> {text:?} {tokens:?}");
        assert_eq!(by_ids["choices"][0]["text"], text, "text and ids agree");
        assert_eq!(by_text["usage"]["prompt_tokens"], ids.len());
        assert_eq!(
            tok.decode(&tokens, true).unwrap(),
            text,
            "the text is the tokens'"
        );
        assert!(tokens.iter().all(|&t| !tok.is_stop(t)));
        let reason = by_ids["choices"][0]["finish_reason"].as_str().unwrap();
        assert_eq!(reason == "length", tokens.len() == 24, "{reason}");
        // Streamed: the deltas add up to the same text and tokens.
        let body = http_timeout(
            nodes[1].api().unwrap(),
            "POST",
            "/v1/completions",
            json!({"model": "llama", "prompt": ids, "max_tokens": 24, "temperature": 0, "stream": true})
                .to_string()
                .as_bytes(),
            Duration::from_secs(60),
        )
        .expect("stream");
        let events = sse_events(&body);
        let streamed: String = events
            .iter()
            .map(|e| e["choices"][0]["text"].as_str().unwrap().to_string())
            .collect();
        let streamed_ids: Vec<u32> = events
            .iter()
            .flat_map(|e| {
                e["choices"][0]["tokens"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .map(|x| x.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(streamed, text);
        assert_eq!(streamed_ids, tokens);
        check_text_logprobs(&nodes[1], &folder, &tok, prompt, &ids, &tokens, &text);
    }
    // Chat: the conversation rendered as transformers' `apply_chat_template` renders it
    // (the fixture's reference prompts), answered exactly as a completion of those ids.
    let reference: Value = serde_json::from_str(
        &std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("tests/fixtures/tokenizer/bytelevel/reference.json"),
        )
        .unwrap(),
    )
    .unwrap();
    let chats = reference["chats"].as_array().unwrap();
    let chats: Vec<&Value> = chats
        .iter()
        .filter(|c| c["add_generation_prompt"] == true)
        .collect();
    let (mut answered, mut too_long) = (0, 0);
    for chat in &chats {
        let ids = tok.encode(chat["prompt"].as_str().unwrap(), false).unwrap();
        let body = json!({"model": "llama", "messages": chat["messages"], "max_completion_tokens": 16, "temperature": 0});
        if ids.len() >= 64 {
            // Longer than the model's context (64): refused, never truncated.
            let e = post(&nodes[1], "/v1/chat/completions", &body).unwrap_err();
            assert!(e.starts_with("400") && e.contains("context is 64"), "{e}");
            too_long += 1;
            continue;
        }
        answered += 1;
        let got = post(&nodes[1], "/v1/chat/completions", &body).expect("chat");
        let want = post(
            &nodes[1],
            "/v1/completions",
            &json!({"model": "llama", "prompt": ids, "max_tokens": 16, "temperature": 0}),
        )
        .expect("completion");
        eprintln!("chat {} -> {got}", chat["messages"]);
        check_chat_logprobs(&nodes[1], &folder, &tok, &body, &ids, &want);
        assert_eq!(got["object"], "chat.completion");
        assert_eq!(got["choices"][0]["message"]["role"], "assistant");
        assert_eq!(
            got["choices"][0]["message"]["content"],
            want["choices"][0]["text"]
        );
        assert_eq!(got["usage"]["prompt_tokens"], ids.len());
        assert_eq!(
            got["choices"][0]["finish_reason"],
            want["choices"][0]["finish_reason"]
        );
        let mut stream_body = body.clone();
        stream_body["stream"] = json!(true);
        let raw = http_timeout(
            nodes[1].api().unwrap(),
            "POST",
            "/v1/chat/completions",
            stream_body.to_string().as_bytes(),
            Duration::from_secs(60),
        )
        .expect("chat stream");
        let events = sse_events(&raw);
        assert!(events.iter().all(|e| e["choices"][0]["logprobs"].is_null()));
        assert_eq!(events[0]["choices"][0]["delta"]["role"], "assistant");
        assert_eq!(events[0]["object"], "chat.completion.chunk");
        let streamed: String = events
            .iter()
            .filter_map(|e| e["choices"][0]["delta"]["content"].as_str())
            .collect();
        assert_eq!(
            streamed,
            got["choices"][0]["message"]["content"].as_str().unwrap()
        );
        let last = events.last().unwrap();
        assert_eq!(
            last["choices"][0]["finish_reason"],
            got["choices"][0]["finish_reason"]
        );
        // The real `openai` client reads the same answer, streamed and not (12 tokens).
        let py = std::env::var("SHOAL_PYTHON").expect("SHOAL_PYTHON (source scripts/env.sh)");
        let out = std::process::Command::new(py)
            .arg(repo_root().join("scripts/openai_chat_check.py"))
            .arg(format!("http://{}", nodes[1].api().unwrap()))
            .arg("llama")
            .arg(chat["messages"].to_string())
            .output()
            .expect("python");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "openai client failed: {stderr}");
        let r: Value = serde_json::from_slice(&out.stdout).unwrap();
        eprintln!("openai client: {r}");
        // Logprobs (2 alternatives) read through the client's types, streamed and not: the
        // same entries as this API's own answer.
        let mut asked = body.clone();
        asked["max_completion_tokens"] = json!(12);
        asked["logprobs"] = json!(true);
        asked["top_logprobs"] = json!(2);
        let own = post(&nodes[1], "/v1/chat/completions", &asked).expect("chat logprobs");
        let own: Vec<Value> = own["choices"][0]["logprobs"]["content"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let top: Vec<Value> = e["top_logprobs"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| json!([t["token"], t["logprob"], t["bytes"]]))
                    .collect();
                json!({"token": e["token"], "logprob": e["logprob"], "bytes": e["bytes"], "top": top})
            })
            .collect();
        assert_eq!(r["logprobs"], json!(own));
        assert_eq!(r["streamed_logprobs"], json!(own));
        assert_eq!(r["logprobs_content"], r["content"]);
        assert_eq!(r["streamed_logprobs_content"], r["content"]);
        let twelve = post(
            &nodes[1],
            "/v1/completions",
            &json!({"model": "llama", "prompt": ids, "max_tokens": 12, "temperature": 0}),
        )
        .expect("completion");
        assert_eq!(r["content"], twelve["choices"][0]["text"]);
        assert_eq!(r["streamed"], r["content"]);
        assert_eq!(r["role"], "assistant");
        assert_eq!(r["stream_roles"], json!(["assistant"]));
        assert_eq!(r["prompt_tokens"], ids.len());
        assert_eq!(r["finish_reason"], r["stream_finish"]);
    }
    eprintln!("{answered} conversations answered, {too_long} refused as longer than the context");
    assert!(answered >= 2 && too_long >= 1, "{answered} / {too_long}");
    // A conversation the template refuses is a 400 naming the problem, not a 500.
    let bad = post(
        &nodes[1],
        "/v1/chat/completions",
        &json!({"model": "llama", "messages": [], "max_tokens": 4}),
    );
    assert!(bad.is_err(), "{bad:?}");
}

/// A greedy completion of `prompt` (its ids `ids`: answered `tokens` and `text` without
/// logprobs) with `logprobs` 2, by text and streamed by ids: the same text; per token its
/// logprob and alternatives are the log_softmax of a full forward computed here, its name
/// is its text (the tokenizer's bytes for it) and its offset where that text starts; the
/// streamed chunks' logprobs add up to the whole answer's.
fn check_text_logprobs(
    node: &Node,
    folder: &Path,
    tok: &Tokenizer,
    prompt: &str,
    ids: &[u32],
    tokens: &[u32],
    text: &str,
) {
    let body = json!({"model": "llama", "prompt": prompt, "max_tokens": 24, "temperature": 0,
                      "logprobs": 2});
    let c = post(node, "/v1/completions", &body).expect("logprobs");
    assert_eq!(c["choices"][0]["text"], text);
    let lp = &c["choices"][0]["logprobs"];
    let rows = logprob_rows(folder, ids, tokens);
    let name = |id: u32| text_of(&tok.token_bytes(id).unwrap());
    let offsets = check_greedy_completion_logprobs(lp, tokens, &rows, 2, name, TOLERANCE);
    for (i, &o) in offsets.iter().enumerate() {
        let before = tok.decode(&tokens[..i], true).unwrap();
        if !before.contains('\u{FFFD}') {
            assert_eq!(o, before.chars().count() as u64, "offset of token {i}");
        }
    }
    // Streamed (by ids, so not from the cache): each chunk carries its own tokens' entries.
    let mut stream = body.clone();
    stream["prompt"] = json!(ids);
    stream["stream"] = json!(true);
    let raw = http_timeout(
        node.api().unwrap(),
        "POST",
        "/v1/completions",
        stream.to_string().as_bytes(),
        Duration::from_secs(60),
    )
    .expect("stream");
    let keys = ["tokens", "token_logprobs", "top_logprobs", "text_offset"];
    let mut joined =
        json!({"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []});
    for e in sse_events(&raw) {
        let (l, n) = (
            &e["choices"][0]["logprobs"],
            e["choices"][0]["tokens"].as_array(),
        );
        assert_eq!(
            l["tokens"].as_array().map(Vec::len),
            n.filter(|t| !t.is_empty()).map(Vec::len)
        );
        for k in keys {
            if let Some(v) = l[k].as_array() {
                joined[k].as_array_mut().unwrap().extend(v.iter().cloned());
            }
        }
    }
    assert_eq!(&joined, lp, "streamed logprobs");
}

/// A greedy chat answer to `body` (prompt ids `ids`; `want` the completion of those ids)
/// with `logprobs` and `top_logprobs` 3, streamed (first: a live generation) and not: the
/// same content; per token its text and bytes are the tokenizer's, its logprob the
/// log_softmax of a full forward computed here and the first of its 3 alternatives,
/// which are the 3 largest sorted; the streamed chunks' entries add up to the answer's.
fn check_chat_logprobs(
    node: &Node,
    folder: &Path,
    tok: &Tokenizer,
    body: &Value,
    ids: &[u32],
    want: &Value,
) {
    let mut asked = body.clone();
    asked["logprobs"] = json!(true);
    asked["top_logprobs"] = json!(3);
    asked["stream"] = json!(true);
    let raw = http_timeout(
        node.api().unwrap(),
        "POST",
        "/v1/chat/completions",
        asked.to_string().as_bytes(),
        Duration::from_secs(60),
    )
    .expect("chat stream");
    let mut streamed = Vec::new();
    for e in sse_events(&raw) {
        if let Some(c) = e["choices"][0]["logprobs"]["content"].as_array() {
            streamed.extend(c.iter().cloned());
        }
    }
    asked["stream"] = json!(false);
    let got = post(node, "/v1/chat/completions", &asked).expect("chat logprobs");
    let content = got["choices"][0]["message"]["content"].as_str().unwrap();
    assert_eq!(content, want["choices"][0]["text"]);
    let entries = got["choices"][0]["logprobs"]["content"].as_array().unwrap();
    assert_eq!(entries, &streamed, "streamed chat logprobs");
    let tokens = ids_of(&want["choices"][0]["tokens"]);
    assert_eq!(entries.len(), tokens.len());
    let rows = logprob_rows(folder, ids, &tokens);
    let mut worst = 0f32;
    let mut text = Vec::new();
    for (i, (e, &id)) in entries.iter().zip(&tokens).enumerate() {
        let bytes = tok.token_bytes(id).unwrap();
        assert_eq!(e["token"], text_of(&bytes), "token {i}");
        assert_eq!(e["bytes"], json!(bytes), "token {i}");
        // The fixture's added (special) tokens are 0, 1 and 2: not in the text.
        if id > 2 {
            text.extend_from_slice(&bytes);
        }
        let v = e["logprob"].as_f64().unwrap() as f32;
        worst = worst.max((v - rows[i][id as usize]).abs());
        let top = e["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3, "token {i}");
        assert_eq!(top[0]["token"], e["token"], "greedy chose the first");
        assert_eq!(top[0]["logprob"], e["logprob"]);
        assert_eq!(top[0]["bytes"], e["bytes"]);
        let values: Vec<f32> = top
            .iter()
            .map(|t| t["logprob"].as_f64().unwrap() as f32)
            .collect();
        assert!(
            values.windows(2).all(|w| w[0] >= w[1]),
            "sorted: {values:?}"
        );
        for (g, w) in values.iter().zip(largest(&rows[i], 3)) {
            worst = worst.max((g - w).abs());
        }
    }
    assert_eq!(
        String::from_utf8_lossy(&text),
        content,
        "the tokens' bytes are the text"
    );
    eprintln!("chat: max |served logprob - log_softmax| = {worst:e}");
    assert!(worst <= TOLERANCE, "max |Δ| = {worst}");
}

/// A PEFT LoRA adapter folder offered as it is: served merged into its base, its logits
/// those `peft` computes with the adapter loaded onto the base.
#[test]
fn a_lora_adapter_is_served_merged_into_its_base() {
    let tmp = TempDir::new("serve-hf-adapter");
    let base = fixture("llama");
    // Rank-4 adapters on q_proj (64 outputs) and v_proj (2 kv heads × 16) of 3 layers.
    tch::manual_seed(7);
    let mut params = Vec::new();
    for i in 0..3 {
        for (proj, out) in [("q_proj", 64), ("v_proj", 32)] {
            let p = format!("model.layers.{i}.self_attn.{proj}");
            params.push((
                format!("{p}.lora_A.weight"),
                tch::Tensor::randn([4, 64], tch::kind::FLOAT_CPU) * 0.1,
            ));
            params.push((
                format!("{p}.lora_B.weight"),
                tch::Tensor::randn([out, 4], tch::kind::FLOAT_CPU) * 0.1,
            ));
        }
    }
    let lora = shoal_node::models::hf::train::LoraConfig {
        rank: 4,
        alpha: 8.0,
        targets: vec!["q_proj".into(), "v_proj".into()],
    };
    let adapter = tmp.0.join("adapter");
    shoal_node::models::hf::export::write_adapter(&base, &adapter, &lora, &params).unwrap();
    let nodes = cluster(&tmp.0, 1);
    let offer = post(
        &nodes[0],
        "/v1/serve",
        &json!({"path": adapter, "name": "tuned"}),
    )
    .expect("offer");
    assert_eq!(offer["config"]["kind"], "hf", "{offer}");
    assert!(adapter
        .join("merged/model.safetensors.index.json")
        .is_file());
    let tokens = vec![vec![1i64, 17, 250, 3, 99, 380], vec![1, 5, 6, 7, 8, 200]];
    let out = wait_until("the adapter answers", Duration::from_secs(60), || {
        post(
            &nodes[0],
            "/v1/infer",
            &json!({"model": "tuned", "inputs": tokens}),
        )
        .ok()
        .filter(|o| o["shape"] == json!([2, 6, 400]))
    });
    let mut got = Vec::new();
    flat(&out["outputs"], &mut got);
    let python = std::env::var("SHOAL_PYTHON").expect("SHOAL_PYTHON (source scripts/env.sh)");
    let peft = std::process::Command::new(python)
        .arg(repo_root().join("scripts/check_hf_export.py"))
        .arg(&base)
        .arg(&adapter)
        .arg(serde_json::to_string(&tokens).unwrap())
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    assert!(
        peft.status.success(),
        "{}",
        String::from_utf8_lossy(&peft.stderr)
    );
    let want: Vec<f32> = serde_json::from_slice(&peft.stdout).unwrap();
    let base_out = post(
        &nodes[0],
        "/v1/serve",
        &json!({"path": base, "name": "base"}),
    )
    .expect("offer base");
    assert_ne!(
        base_out["sha256"], offer["sha256"],
        "the merge changed the weights"
    );
    let diff = got
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    eprintln!("adapter served merged: max |logits - peft| = {diff:e}");
    assert_eq!(got.len(), want.len());
    assert!(diff <= TOLERANCE, "max |Δ| = {diff}");
}
