//! Tests of tokenized datasets: packing, masks (equal to `transformers`'), Parquet and
//! JSONL reading, and memory flat in the dataset's size.

use super::*;
use std::path::PathBuf;

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("shoal-data-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn spec(kind: DataKind, files: &Path, messages: Option<&str>) -> DataSpec {
    let text = format!(
        "kind = \"{}\"\nfiles = \"{}\"\n{}",
        format!("{kind:?}").to_lowercase(),
        files.display(),
        messages
            .map(|m| format!("messages_field = \"{m}\"\n"))
            .unwrap_or_default()
    );
    toml::from_str(&text).unwrap()
}

fn bytes_setup<'a>(spec: &'a DataSpec, context: usize, cache: &Path) -> Setup<'a> {
    Setup {
        spec,
        seed: 1,
        eval_fraction: 0.2,
        context,
        encoder: Encoder::Bytes,
        cache_dir: cache.to_path_buf(),
    }
}

fn tokenizer_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer/bytelevel")
}

fn ids_of(t: &Tensor) -> Vec<i64> {
    Vec::try_from(t.reshape([-1])).unwrap()
}

/// Documents (each followed by `\n`) packed into sequences of `context + 1` bytes at
/// stride `context`: reading every sequence gives back each side's stream.
#[test]
fn jsonl_packs_documents_into_sequences() {
    let d = temp("pack");
    let docs: Vec<String> = (0..200)
        .map(|i| format!("document {i} {}", "ab".repeat(i % 7)))
        .collect();
    let lines: String = docs
        .iter()
        .map(|t| serde_json::json!({ "text": t }).to_string() + "\n")
        .collect();
    std::fs::write(d.join("a.jsonl"), lines).unwrap();
    let s = spec(DataKind::Jsonl, &d.join("a.jsonl"), None);
    let data = Dataset::packed(bytes_setup(&s, 16, &d.join("cache"))).unwrap();
    assert_eq!(
        data.task,
        Task::Lm {
            len: 16,
            masked: false,
            vocab: 256
        }
    );
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for (i, t) in docs.iter().enumerate() {
        let side = if held_out(1, i as u64, 0.2) {
            &mut eval
        } else {
            &mut train
        };
        side.extend(t.bytes().map(i64::from));
        side.push(10);
    }
    let n = data.train_len() as usize;
    assert_eq!(n, (train.len() - 1) / 16);
    let b = data
        .train_batch(&(0..n as u64).collect::<Vec<_>>())
        .unwrap();
    assert!(b.mask.is_none());
    let (x, y) = (ids_of(&b.x), ids_of(&b.y));
    for k in 0..n {
        assert_eq!(
            x[k * 16..(k + 1) * 16],
            train[k * 16..k * 16 + 16],
            "inputs {k}"
        );
        assert_eq!(
            y[k * 16..(k + 1) * 16],
            train[k * 16 + 1..k * 16 + 17],
            "targets {k}"
        );
    }
    let e = data.eval_batch(0..data.eval_len()).unwrap();
    assert_eq!(ids_of(&e.x)[..16], eval[..16]);
    // A second load reuses the cache (same streams); a changed input rebuilds it.
    let again = Dataset::packed(bytes_setup(&s, 16, &d.join("cache"))).unwrap();
    assert_eq!(again.train_len(), data.train_len());
    let caches = || std::fs::read_dir(d.join("cache")).unwrap().count();
    assert_eq!(caches(), 4, "train, eval, json, lock");
    std::fs::write(d.join("a.jsonl"), "{\"text\": \"changed\"}\n".repeat(300)).unwrap();
    let changed = Dataset::packed(bytes_setup(&s, 16, &d.join("cache"))).unwrap();
    assert_ne!(changed.train_len(), data.train_len());
    // Too little data is an error naming the file.
    std::fs::write(d.join("a.jsonl"), "{\"text\": \"x\"}\n").unwrap();
    let e = Dataset::packed(bytes_setup(&s, 16, &d.join("cache"))).unwrap_err();
    assert!(e.to_string().contains("a.jsonl"), "{e}");
    // A malformed line names the file and line.
    std::fs::write(d.join("a.jsonl"), "{\"text\": \"x\"}\n{\"text\": 1}\n").unwrap();
    let e = Dataset::packed(bytes_setup(&s, 16, &d.join("cache"))).unwrap_err();
    assert!(e.to_string().contains("a.jsonl: line 2"), "{e}");
    std::fs::remove_dir_all(&d).unwrap();
}

/// Writes a Parquet file with one optional string column `text` (snappy pages of a few
/// rows, several row groups).
pub(crate) fn write_parquet(path: &Path, texts: &[String], rows_per_group: usize) {
    use parquet::basic::Compression;
    use parquet::data_type::{ByteArray, ByteArrayType};
    use parquet::file::properties::WriterProperties;
    use parquet::file::writer::SerializedFileWriter;
    use parquet::schema::parser::parse_message_type;
    use std::sync::Arc;
    let schema =
        Arc::new(parse_message_type("message m { optional binary text (UTF8); }").unwrap());
    let props = Arc::new(
        WriterProperties::builder()
            .set_compression(Compression::SNAPPY)
            .build(),
    );
    let file = std::fs::File::create(path).unwrap();
    let mut w = SerializedFileWriter::new(file, schema, props).unwrap();
    for group in texts.chunks(rows_per_group) {
        let mut rg = w.next_row_group().unwrap();
        let mut col = rg.next_column().unwrap().unwrap();
        let values: Vec<ByteArray> = group.iter().map(|t| ByteArray::from(t.as_str())).collect();
        col.typed::<ByteArrayType>()
            .write_batch(&values, Some(&vec![1; values.len()]), None)
            .unwrap();
        col.close().unwrap();
        rg.close().unwrap();
    }
    w.close().unwrap();
}

/// Parquet shards (a glob) read row group by row group give the same sequences as the
/// same documents in JSONL; garbage is an error naming the file.
#[test]
fn parquet_shards_read_like_jsonl() {
    let d = temp("parquet");
    let docs: Vec<String> = (0..300)
        .map(|i| format!("row {i}: {}", "xyz ".repeat(i % 5)))
        .collect();
    write_parquet(&d.join("part-0.parquet"), &docs[..120], 50);
    write_parquet(&d.join("part-1.parquet"), &docs[120..], 64);
    std::fs::write(d.join("other.parquet.tmp"), b"not parquet").unwrap();
    let lines: String = docs
        .iter()
        .map(|t| serde_json::json!({ "text": t }).to_string() + "\n")
        .collect();
    std::fs::write(d.join("all.jsonl"), lines).unwrap();
    let pq = spec(DataKind::Parquet, &d.join("part-*.parquet"), None);
    let js = spec(DataKind::Jsonl, &d.join("all.jsonl"), None);
    let a = Dataset::packed(bytes_setup(&pq, 32, &d.join("c1"))).unwrap();
    let b = Dataset::packed(bytes_setup(&js, 32, &d.join("c2"))).unwrap();
    assert_eq!(a.train_len(), b.train_len());
    let ids: Vec<u64> = (0..a.train_len()).collect();
    assert_eq!(
        ids_of(&a.train_batch(&ids).unwrap().y),
        ids_of(&b.train_batch(&ids).unwrap().y)
    );
    // Not a Parquet file; a missing column.
    std::fs::write(d.join("bad.parquet"), b"PAR1 garbage PAR1").unwrap();
    let bad = spec(DataKind::Parquet, &d.join("bad.parquet"), None);
    let e = Dataset::packed(bytes_setup(&bad, 32, &d.join("c3"))).unwrap_err();
    assert!(e.to_string().contains("bad.parquet"), "{e}");
    let mut nocol = pq.clone();
    nocol.text_field = "content".into();
    let e = Dataset::packed(bytes_setup(&nocol, 32, &d.join("c4"))).unwrap_err();
    assert!(e.to_string().contains("no column `content`"), "{e}");
    std::fs::remove_dir_all(&d).unwrap();
}

/// The chat fixture's token ids and loss masks equal the ones `transformers` builds
/// (`scripts/fixtures/chat_mask.py`), and packed chat data carries them as its mask.
#[test]
fn chat_masks_equal_transformers() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/chat");
    let want: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(fixtures.join("mask.json")).unwrap()).unwrap();
    let enc = Encoder::hf(&tokenizer_dir(), 400, true).unwrap();
    let Encoder::Hf { tok, template, .. } = &enc else {
        unreachable!()
    };
    let template = template.as_ref().unwrap();
    let text = std::fs::read_to_string(fixtures.join("chat.jsonl")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), want.len());
    let mut assistant_tokens = 0;
    for (i, (line, w)) in lines.iter().zip(&want).enumerate() {
        let fields = Fields {
            text: "text",
            messages: Some("messages"),
        };
        let Doc::Chat(m) = parse_record(line.as_bytes(), fields).unwrap() else {
            unreachable!()
        };
        let (ids, mask) = chat_tokens(tok, template, &m).unwrap();
        let wids: Vec<u32> = serde_json::from_value(w["ids"].clone()).unwrap();
        let wmask: Vec<u8> = serde_json::from_value(w["mask"].clone()).unwrap();
        assert_eq!(ids, wids, "record {i}: ids");
        let mask: Vec<u8> = mask.iter().map(|&b| b as u8).collect();
        assert_eq!(mask, wmask, "record {i}: mask");
        assistant_tokens += mask.iter().filter(|&&b| b == 1).count();
    }
    assert!(assistant_tokens > 100);
    // Packed: the mask rides with the tokens; separators (EOS) never count.
    let d = temp("chat");
    let s = spec(
        DataKind::Jsonl,
        &fixtures.join("chat.jsonl"),
        Some("messages"),
    );
    let data = Dataset::packed(Setup {
        spec: &s,
        seed: 1,
        eval_fraction: 0.2,
        context: 32,
        encoder: enc,
        cache_dir: d.clone(),
    })
    .unwrap();
    assert!(matches!(
        data.task,
        Task::Lm {
            masked: true,
            vocab: 400,
            ..
        }
    ));
    let b = data.train_batch(&[0, 1, 2]).unwrap();
    let m: Vec<f32> = Vec::try_from(b.mask.unwrap().reshape([-1])).unwrap();
    assert!(m.contains(&1.0) && m.contains(&0.0));
    std::fs::remove_dir_all(&d).unwrap();
}

/// `text` for an hf model: tokenized in pieces, the last `eval_fraction` held out.
#[test]
fn text_tokenized_for_hf() {
    let d = temp("hftext");
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../data/tinyshakespeare.txt"),
    )
    .unwrap();
    let part = &text[..200_000];
    std::fs::write(d.join("t.txt"), part).unwrap();
    let mut s = spec(DataKind::Text, &d.join("t.txt"), None);
    s.path = Some(d.join("t.txt"));
    let enc = Encoder::hf(&tokenizer_dir(), 400, false).unwrap();
    let Encoder::Hf { tok, .. } = &enc else {
        unreachable!()
    };
    let cut = (200_000f64 * 0.8) as usize;
    let want = tok.encode(&part[..cut], false).unwrap();
    let data = Dataset::packed(Setup {
        spec: &s,
        seed: 1,
        eval_fraction: 0.2,
        context: 64,
        encoder: Encoder::hf(&tokenizer_dir(), 400, false).unwrap(),
        cache_dir: d.join("c"),
    })
    .unwrap();
    assert_eq!(data.train_len(), sequences(want.len() as u64 + 1, 64));
    let b = data.train_batch(&[0]).unwrap();
    let got: Vec<u32> = ids_of(&b.x).iter().map(|&i| i as u32).collect();
    assert_eq!(got, want[..64]);
    std::fs::remove_dir_all(&d).unwrap();
}

/// Peak resident growth of a child process that loads `jsonl` and reads every sequence.
fn peak_growth(jsonl: &Path, cache: &Path) -> u64 {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "train::data::packed_tests::memory_child",
            "--exact",
            "--nocapture",
            "--include-ignored",
            "--test-threads=1",
        ])
        .env(
            "SHOAL_MEMORY_CHILD",
            format!("{}\n{}", jsonl.display(), cache.display()),
        )
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .find_map(|l| l.split("PEAK_GROWTH=").nth(1))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no PEAK_GROWTH in {stdout}"))
}

/// The child of [`memory_is_flat_in_dataset_size`]: resets the peak (`clear_refs`),
/// loads and reads every training and held-out sequence, prints the peak's growth.
#[test]
#[ignore = "run by memory_is_flat_in_dataset_size"]
fn memory_child() {
    let Ok(args) = std::env::var("SHOAL_MEMORY_CHILD") else {
        return;
    };
    let (jsonl, cache) = args.split_once('\n').unwrap();
    let s = spec(DataKind::Jsonl, Path::new(jsonl), None);
    // Resets VmHWM to the current resident size (Linux); else growth is measured from
    // the peak so far (a lower bound).
    let reset = std::fs::write("/proc/self/clear_refs", "5").is_ok();
    let before = crate::status::ProcessMemory::now().unwrap();
    let data = Dataset::packed(bytes_setup(&s, 64, Path::new(cache))).unwrap();
    let n = data.train_len();
    let mut i = 0;
    while i < n {
        let ids: Vec<u64> = (i..(i + 256).min(n)).collect();
        let b = data.train_batch(&ids).unwrap();
        assert_eq!(b.len, ids.len());
        i += 256;
    }
    let e = data.eval_len();
    data.eval_batch(0..e).unwrap();
    let after = crate::status::ProcessMemory::now().unwrap();
    let base = if reset {
        before.rss_bytes
    } else {
        before.peak_rss_bytes
    };
    println!(
        "\nPEAK_GROWTH={}",
        after.peak_rss_bytes.saturating_sub(base)
    );
}

/// Loading and reading every sequence of 40 MB of JSONL grows the peak resident memory
/// no more than 8 MB of it does, give or take [`SLACK`], and both stay under [`BOUND`].
#[test]
fn memory_is_flat_in_dataset_size() {
    /// What growth may differ by between the sizes.
    const SLACK: u64 = 4 << 20;
    /// The bound: a 1 MiB read buffer, two 1 MiB write buffers, one record and its
    /// tokens, a batch, and the allocator's slack.
    const BOUND: u64 = 24 << 20;
    let d = temp("memory");
    let mut growth = Vec::new();
    for mb in [8usize, 40] {
        let path = d.join(format!("{mb}.jsonl"));
        let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
        let mut written = 0;
        let mut i = 0u64;
        while written < mb << 20 {
            let line = serde_json::json!({ "text": format!("record {i} {}", "lorem ipsum dolor sit amet ".repeat((i % 40) as usize)) }).to_string() + "\n";
            std::io::Write::write_all(&mut f, line.as_bytes()).unwrap();
            written += line.len();
            i += 1;
        }
        drop(f);
        let g = peak_growth(&path, &d.join(format!("cache-{mb}")));
        eprintln!("{mb} MB of JSONL: peak resident growth {} KiB", g >> 10);
        growth.push(g);
    }
    std::fs::remove_dir_all(&d).unwrap();
    assert!(growth.iter().all(|&g| g < BOUND), "{growth:?}");
    assert!(growth[1] < growth[0] + SLACK, "{growth:?}");
}

/// Writes the Parquet seed of the `training_data` fuzz target
/// (`fuzz/seeds/training_data/parquet`: the format byte, then a small file).
#[test]
#[ignore = "writes a fuzz seed: run by hand"]
fn write_parquet_fuzz_seed() {
    let d = temp("seed");
    let texts: Vec<String> = ["First Citizen:", "Before we proceed", "café ☕"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    write_parquet(&d.join("s.parquet"), &texts, 2);
    let mut seed = vec![2u8];
    seed.extend(std::fs::read(d.join("s.parquet")).unwrap());
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/training_data/parquet");
    std::fs::write(out, seed).unwrap();
    assert_eq!(
        check_records(
            RecordFormat::Parquet,
            &std::fs::read(d.join("s.parquet")).unwrap()
        )
        .unwrap(),
        3
    );
    std::fs::remove_dir_all(&d).unwrap();
}
