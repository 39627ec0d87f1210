//! The tokenizers and chat templates against `transformers`' own outputs: the fixtures
//! `scripts/fixtures/tokenizer.py` wrote under `node/tests/fixtures/tokenizer/` (committed;
//! no Python at test time).

use super::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

const KINDS: [&str; 2] = ["bytefallback", "bytelevel"];

fn dir(kind: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tokenizer")
        .join(kind)
}

fn reference(kind: &str) -> Value {
    let s = std::fs::read_to_string(dir(kind).join("reference.json")).unwrap();
    serde_json::from_str(&s).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

/// Pushes `ids` one at a time; the deltas, and their concatenation with the final flush.
fn stream(tok: &Tokenizer, ids: &[u32], skip: bool) -> (Vec<String>, String) {
    let mut d = tok.detokenizer(skip);
    let mut deltas = Vec::new();
    for &id in ids {
        deltas.push(d.push(id).unwrap());
    }
    let last = d.finish().unwrap();
    let all = deltas.concat() + &last;
    (deltas, all)
}

#[test]
fn ids_and_decodes_match_transformers() {
    for kind in KINDS {
        let tok = Tokenizer::load(&dir(kind)).unwrap();
        let r = reference(kind);
        assert_eq!(tok.vocab_size() as u64, r["vocab_size"].as_u64().unwrap());
        for t in r["texts"].as_array().unwrap() {
            let text = t["text"].as_str().unwrap();
            let with = ids(&t["ids"]);
            assert_eq!(tok.encode(text, true).unwrap(), with, "{kind}: {text:?}");
            let plain = ids(&t["ids_plain"]);
            assert_eq!(tok.encode(text, false).unwrap(), plain, "{kind}: {text:?}");
            let decoded = tok.decode(&with, false).unwrap();
            assert_eq!(decoded, t["decoded"].as_str().unwrap(), "{kind}");
            let skipped = tok.decode(&with, true).unwrap();
            assert_eq!(skipped, t["decoded_skip"].as_str().unwrap(), "{kind}");
        }
    }
}

#[test]
fn special_and_stop_tokens_come_from_the_configs() {
    let t = Tokenizer::load(&dir("bytefallback")).unwrap();
    assert_eq!(t.special().bos.as_deref(), Some("<s>"));
    assert_eq!(t.special().eos.as_deref(), Some("</s>"));
    // config.json's 2 (`</s>`) and generation_config.json's [2, 0].
    assert_eq!(t.stop_ids(), &[0, 2]);
    assert!(t.is_stop(2) && !t.is_stop(1));
    let t = Tokenizer::load(&dir("bytelevel")).unwrap();
    assert_eq!(t.special().bos, None);
    let im_end = t.token_to_id("<|im_end|>").unwrap();
    assert_eq!(t.stop_ids(), &[im_end]);
}

#[test]
fn streaming_equals_the_full_decode_and_never_splits_a_character() {
    for kind in KINDS {
        let tok = Tokenizer::load(&dir(kind)).unwrap();
        for t in reference(kind)["texts"].as_array().unwrap() {
            let with = ids(&t["ids"]);
            for skip in [false, true] {
                let (deltas, all) = stream(&tok, &with, skip);
                assert_eq!(all, tok.decode(&with, skip).unwrap(), "{kind} {skip}");
                for d in &deltas {
                    assert!(
                        !d.contains('\u{FFFD}'),
                        "{kind}: a split character in {d:?}"
                    );
                }
            }
        }
    }
}

#[test]
fn byte_fallback_characters_wait_for_their_last_byte() {
    let tok = Tokenizer::load(&dir("bytefallback")).unwrap();
    // "€" is E2 82 AC: three byte-fallback tokens, `<0xNN>` at 3 + NN.
    let euro = tok.encode("a €", false).unwrap();
    let bytes: Vec<u32> = [0xE2u32, 0x82, 0xAC].iter().map(|b| 3 + b).collect();
    assert!(euro.ends_with(&bytes), "{euro:?}");
    let (deltas, all) = stream(&tok, &euro, true);
    let n = deltas.len();
    assert_eq!(&deltas[n - 3..n - 1], &["", ""]);
    assert!(deltas[n - 1].ends_with('€'));
    assert_eq!(all, "a €");
    // A character cut off by the end comes out lossily, once, at finish.
    let cut = &euro[..euro.len() - 1];
    let (deltas, all) = stream(&tok, cut, true);
    assert!(deltas.iter().all(|d| !d.contains('\u{FFFD}')));
    assert_eq!(all, tok.decode(cut, true).unwrap());
}

/// A xorshift generator of numbers below `n`.
fn rng(mut state: u64) -> impl FnMut(usize) -> usize {
    move |n| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n as u64) as usize
    }
}

#[test]
fn streaming_random_text_equals_the_full_decode() {
    let alphabet: Vec<char> = "abc xyz,.\n\tÉéüß€½日本語中文🦀🚀👩\u{200d}💻"
        .chars()
        .collect();
    let mut next = rng(0x2545_f491_4f6c_dd1d);
    for kind in KINDS {
        let tok = Tokenizer::load(&dir(kind)).unwrap();
        for _ in 0..300 {
            let len = 1 + next(30);
            let text: String = (0..len).map(|_| alphabet[next(alphabet.len())]).collect();
            let ids = tok.encode(&text, true).unwrap();
            for skip in [false, true] {
                let (deltas, all) = stream(&tok, &ids, skip);
                assert_eq!(all, tok.decode(&ids, skip).unwrap(), "{kind} {text:?}");
                assert!(
                    deltas.iter().all(|d| !d.contains('\u{FFFD}')),
                    "{kind} {text:?}"
                );
            }
        }
    }
}

/// Random ids, byte tokens among them: whenever they decode to valid text (no U+FFFD),
/// the stream adds up to it. (Invalid byte runs differ: the byte-fallback decoder replaces
/// every byte of a run of byte tokens when any of them is invalid, even characters the
/// stream already sent.)
#[test]
fn streaming_random_ids_equals_the_full_decode() {
    let mut next = rng(0x9e37_79b9_7f4a_7c15);
    let mut valid = 0;
    for kind in KINDS {
        let tok = Tokenizer::load(&dir(kind)).unwrap();
        let n = tok.vocab_size();
        for _ in 0..2000 {
            let len = 1 + next(12);
            let seq: Vec<u32> = (0..len)
                .map(|i| if i % 2 == 0 { 3 + next(128) } else { next(n) } as u32)
                .collect();
            for skip in [false, true] {
                let full = tok.decode(&seq, skip).unwrap();
                let (_, all) = stream(&tok, &seq, skip);
                if !full.contains('\u{FFFD}') {
                    valid += 1;
                    assert_eq!(all, full, "{kind} {seq:?}");
                }
            }
        }
    }
    assert!(valid > 1000, "{valid}");
}

#[test]
fn chat_prompts_match_transformers() {
    for kind in KINDS {
        let tmpl = ChatTemplate::load(&dir(kind)).unwrap();
        for c in reference(kind)["chats"].as_array().unwrap() {
            let msgs: Vec<ChatMessage> = serde_json::from_value(c["messages"].clone()).unwrap();
            let gen = c["add_generation_prompt"].as_bool().unwrap();
            let got = tmpl.render(&msgs, gen);
            match (c.get("prompt"), c.get("error")) {
                (Some(p), _) => assert_eq!(got.unwrap(), p.as_str().unwrap(), "{kind}"),
                (_, Some(e)) => {
                    let e = e.as_str().unwrap();
                    let got = got.unwrap_err().to_string();
                    assert!(got.ends_with(&format!("raise_exception: {e}")), "{got}");
                    assert!(got.contains("tokenizer_config.json"), "{got}");
                }
                _ => panic!("a chat fixture without prompt or error"),
            }
        }
    }
}

/// A copy of fixture `kind` in a fresh temporary folder, to break.
fn copy(kind: &str, tag: &str) -> PathBuf {
    let to = std::env::temp_dir().join(format!("shoal-text-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&to);
    std::fs::create_dir_all(&to).unwrap();
    for e in std::fs::read_dir(dir(kind)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
    to
}

#[test]
fn bad_files_are_one_line_errors_naming_the_file() {
    let one_line_naming = |e: TextError, file: &str| {
        let s = e.to_string();
        assert!(s.contains(file), "{s}");
        assert!(!s.contains('\n'), "{s}");
        s
    };
    let d = copy("bytelevel", "bad");
    std::fs::write(d.join("tokenizer.json"), "{\"model\": {\"type\": \"BPE\"").unwrap();
    let e = Tokenizer::load(&d).unwrap_err();
    one_line_naming(e, "tokenizer.json: not a tokenizer");
    std::fs::write(
        d.join("tokenizer.json"),
        "{\"version\": \"1.0\", \"model\": 3}",
    )
    .unwrap();
    one_line_naming(Tokenizer::load(&d).unwrap_err(), "tokenizer.json");
    // Larger than the limit: refused while reading (a sparse file, nothing allocated).
    let f = std::fs::File::create(d.join("tokenizer.json")).unwrap();
    f.set_len(MAX_TOKENIZER_JSON + 1).unwrap();
    let s = one_line_naming(Tokenizer::load(&d).unwrap_err(), "tokenizer.json");
    assert!(
        s.ends_with("larger than the limit of 67108864 bytes"),
        "{s}"
    );
    std::fs::remove_file(d.join("tokenizer.json")).unwrap();
    one_line_naming(Tokenizer::load(&d).unwrap_err(), "tokenizer.json");

    std::fs::write(
        d.join("chat_template.jinja"),
        "{% for m in messages %}{{ m.role }",
    )
    .unwrap();
    let e = ChatTemplate::load(&d).unwrap_err();
    one_line_naming(e, "chat_template.jinja: chat template: syntax error");
    std::fs::write(
        d.join("chat_template.jinja"),
        "{{ raise_exception('no system messages here') }}",
    )
    .unwrap();
    let t = ChatTemplate::load(&d).unwrap();
    let e = t.render::<ChatMessage>(&[], true).unwrap_err();
    let s = one_line_naming(e, "chat_template.jinja");
    assert!(
        s.ends_with("raise_exception: no system messages here"),
        "{s}"
    );
    std::fs::write(
        d.join("chat_template.jinja"),
        "{% macro f(n) %}{{ f(n) }}{% endmacro %}{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}{% endfor %}",
    )
    .unwrap();
    let e = ChatTemplate::load(&d)
        .unwrap()
        .render::<ChatMessage>(&[], true);
    one_line_naming(
        e.unwrap_err(),
        "chat_template.jinja: chat template: rendering ran out of fuel",
    );
    std::fs::remove_file(d.join("chat_template.jinja")).unwrap();
    let e = ChatTemplate::load(&d).unwrap_err();
    one_line_naming(e, "no chat template");
    std::fs::write(d.join("tokenizer_config.json"), "{\"chat_template\": 7}").unwrap();
    one_line_naming(ChatTemplate::load(&d).unwrap_err(), "tokenizer_config.json");
    std::fs::copy(
        dir("bytelevel").join("tokenizer.json"),
        d.join("tokenizer.json"),
    )
    .unwrap();
    std::fs::write(d.join("config.json"), "{\"eos_token_id\": \"x\"}").unwrap();
    one_line_naming(
        Tokenizer::load(&d).unwrap_err(),
        "config.json: `eos_token_id`",
    );
    std::fs::write(d.join("config.json"), "{").unwrap();
    one_line_naming(Tokenizer::load(&d).unwrap_err(), "config.json: not JSON");
    let _ = std::fs::remove_dir_all(&d);
}

/// Templates in the styles of Llama 3.1 (strftime_now, tools through tojson with an
/// indent, trim) and Qwen 3 (namespace, reversed slices, break, string methods, tojson)
/// with `apply_chat_template`'s keyword arguments, against `transformers`.
#[test]
fn real_world_style_templates_match_transformers() {
    let root = dir("bytefallback").parent().unwrap().to_path_buf();
    let s = std::fs::read_to_string(root.join("templates.json")).unwrap();
    let cases: Vec<Value> = serde_json::from_str(&s).unwrap();
    // The same, in key order (serde_json's maps sort their keys; tojson keeps the order).
    let ordered: Vec<minijinja::Value> = serde_json::from_str(&s).unwrap();
    let special = Tokenizer::load(&dir("bytefallback"))
        .unwrap()
        .special()
        .clone();
    assert!(cases.len() >= 10);
    for (c, o) in cases.into_iter().zip(ordered) {
        let name = c["name"].as_str().unwrap();
        let path = PathBuf::from(format!("{name}.jinja"));
        let t = ChatTemplate::from_source(c["template"].as_str().unwrap(), &path, special.clone())
            .unwrap();
        let msgs = c["messages"].as_array().unwrap();
        let gen = c["add_generation_prompt"].as_bool().unwrap();
        let kwargs = o.get_attr("kwargs").unwrap();
        let got = t.render_with(msgs, gen, &kwargs);
        match (c.get("prompt"), c.get("error")) {
            (Some(p), _) => assert_eq!(got.unwrap(), p.as_str().unwrap(), "{name} {msgs:?}"),
            (_, Some(e)) => {
                let got = got.unwrap_err().to_string();
                let want = format!(
                    "{name}.jinja: chat template: raise_exception: {}",
                    e.as_str().unwrap()
                );
                assert_eq!(got, want);
            }
            _ => panic!("a template fixture without prompt or error"),
        }
    }
}

#[test]
fn a_list_of_named_templates_uses_default() {
    let d = copy("bytefallback", "named");
    let path = d.join("tokenizer_config.json");
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    config["chat_template"] = serde_json::json!([
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": "{{ bos_token }}{{ messages[0].content.strip() }}{{ eos_token }}"},
    ]);
    std::fs::write(&path, config.to_string()).unwrap();
    let t = ChatTemplate::load(&d).unwrap();
    let m = [ChatMessage {
        role: "user".into(),
        content: " hi ".into(),
    }];
    assert_eq!(t.render(&m, true).unwrap(), "<s>hi</s>");
    config["chat_template"] = serde_json::json!([{"name": "tool_use", "template": "T"}]);
    std::fs::write(&path, config.to_string()).unwrap();
    let e = ChatTemplate::load(&d).unwrap_err().to_string();
    assert!(
        e.contains(
            "tokenizer_config.json: `chat_template` is a list without a template named `default`"
        ),
        "{e}"
    );
    let _ = std::fs::remove_dir_all(&d);
}

/// The fuzz target's checks accept its seeds (the fixtures).
#[test]
fn the_fuzz_seeds_pass_the_checks() {
    let seeds = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/model_text");
    let mut n = 0;
    for e in std::fs::read_dir(&seeds).unwrap() {
        let bytes = std::fs::read(e.unwrap().path()).unwrap();
        let kind = [
            File::TokenizerJson,
            File::TokenizerConfig,
            File::ChatTemplate,
        ][bytes[0] as usize % 3];
        check_file(kind, &bytes[1..]).unwrap();
        n += 1;
    }
    assert_eq!(n, 4);
    assert!(check_file(File::TokenizerJson, b"{").is_err());
    assert!(check_file(File::ChatTemplate, b"{% for %}").is_err());
}

#[test]
fn token_bytes_add_up_to_the_text() {
    for kind in KINDS {
        let tok = Tokenizer::load(&dir(kind)).unwrap();
        let r = reference(kind);
        for t in r["texts"].as_array().unwrap() {
            let text = t["text"].as_str().unwrap();
            let bytes: Vec<u8> = ids(&t["ids_plain"])
                .iter()
                .flat_map(|&id| tok.token_bytes(id).unwrap())
                .collect();
            // A metaspace tokenizer writes a space before the first word (its decoder
            // strips it again).
            let want = match kind {
                "bytefallback" if !text.starts_with(' ') && !text.is_empty() => {
                    format!(" {text}")
                }
                _ => text.to_string(),
            };
            assert_eq!(String::from_utf8_lossy(&bytes), want, "{kind}: {text:?}");
        }
        assert_eq!(tok.token_bytes(1 << 30), None);
    }
    // A byte-fallback token is its byte (`<0xE2>` at 3 + 0xE2), an added token its content.
    let tok = Tokenizer::load(&dir("bytefallback")).unwrap();
    assert_eq!(tok.token_bytes(3 + 0xE2), Some(vec![0xE2]));
    assert_eq!(tok.token_bytes(1), Some(b"<s>".to_vec()));
    // A byte-level BPE token may be part of a character: "€" is E2 82 AC.
    let tok = Tokenizer::load(&dir("bytelevel")).unwrap();
    let euro = tok.encode("€", false).unwrap();
    let parts: Vec<Vec<u8>> = euro.iter().map(|&i| tok.token_bytes(i).unwrap()).collect();
    assert_eq!(parts.concat(), "€".as_bytes(), "{parts:?}");
    assert_eq!(tok.token_bytes(2), Some(b"<|im_end|>".to_vec()));
}
