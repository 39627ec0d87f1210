//! Where `jsonl` and `parquet` records come from: the files a `files` key names, and each
//! file's records as documents, read as a stream.
//!
//! Every file is untrusted: a malformed record is an error naming the file and the line
//! (JSONL) or row group and row (Parquet), never a panic; a JSONL line is read with a cap
//! of [`MAX_RECORD_BYTES`], so memory never holds more than one line (and one document's
//! tokens); a Parquet file is read a page at a time through the row-group record reader.

use super::{format_err, DataError};
use crate::text::ChatMessage;
use parquet::file::reader::FileReader;
use parquet::file::serialized_reader::SerializedFileReader;
use parquet::record::Field;
use parquet::schema::types::Type;
use serde_json::Value;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Longest JSONL line (one record) and longest text or conversation of a Parquet row, in
/// bytes. 16 MiB.
pub const MAX_RECORD_BYTES: usize = 16 << 20;
/// Largest Parquet column chunk (compressed) read; above it the file is refused, as a
/// bound on what one malformed footer can make the reader allocate. 1 GiB.
pub const MAX_PARQUET_CHUNK: i64 = 1 << 30;

/// One record: a text, or a conversation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Doc {
    /// Plain text.
    Text(String),
    /// Messages `{role, content}` for the chat template.
    Chat(Vec<ChatMessage>),
}

/// Which fields of a record are read.
#[derive(Clone, Copy, Debug)]
pub struct Fields<'a> {
    /// The text's field (plain text).
    pub text: &'a str,
    /// The messages' field (chat data; `text` is then not read).
    pub messages: Option<&'a str>,
}

/// The files `files` names, sorted by name: the file itself; a directory's files ending in
/// `.{ext}`; or the matches of a glob whose last component holds `*` (any run of
/// characters) or `?` (one character). No match is an error.
pub fn list_files(files: &Path, ext: &str) -> Result<Vec<PathBuf>, DataError> {
    let name = files
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let glob = name.contains(['*', '?']);
    let dir = if glob {
        files.parent().unwrap_or(Path::new(".")).to_path_buf()
    } else if files.is_dir() {
        files.to_path_buf()
    } else {
        if !files.is_file() {
            return Err(format_err(files, "no such file or directory"));
        }
        return Ok(vec![files.to_path_buf()]);
    };
    if dir.to_string_lossy().contains(['*', '?']) {
        return Err(format_err(
            files,
            "only the last component of a glob may hold `*` or `?`",
        ));
    }
    let entries = std::fs::read_dir(&dir).map_err(|source| DataError::Read {
        path: dir.display().to_string(),
        source,
    })?;
    let mut out = Vec::new();
    for e in entries {
        let e = e.map_err(|source| DataError::Read {
            path: dir.display().to_string(),
            source,
        })?;
        let n = e.file_name().to_string_lossy().into_owned();
        let keep = if glob {
            matches_glob(name.as_bytes(), n.as_bytes())
        } else {
            n.ends_with(&format!(".{ext}"))
        };
        if keep && e.path().is_file() {
            out.push(e.path());
        }
    }
    out.sort();
    if out.is_empty() {
        let what = if glob {
            "no file matches".to_string()
        } else {
            format!("the directory holds no .{ext} file")
        };
        return Err(format_err(files, what));
    }
    Ok(out)
}

/// Whether `name` matches `pattern` (`*`: any run, `?`: any one byte).
fn matches_glob(pattern: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        if p < pattern.len() && (pattern[p] == b'?' || pattern[p] == name[n]) {
            p += 1;
            n += 1;
        } else if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, n));
            p += 1;
        } else if let Some((sp, sn)) = star {
            p = sp + 1;
            n = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

/// The document of one JSONL line (a JSON object), or why it is not one.
pub fn parse_record(line: &[u8], fields: Fields) -> Result<Doc, String> {
    let v: Value = serde_json::from_slice(line).map_err(|e| format!("not JSON: {e}"))?;
    let Value::Object(map) = v else {
        return Err("not a JSON object".into());
    };
    match fields.messages {
        Some(f) => match map.get(f) {
            None => Err(format!("no field `{f}`")),
            Some(Value::Array(a)) => {
                let mut msgs = Vec::with_capacity(a.len());
                for (i, m) in a.iter().enumerate() {
                    let get = |k: &str| match m.get(k) {
                        Some(Value::String(s)) => Ok(s.clone()),
                        _ => Err(format!("`{f}`[{i}] has no string `{k}`")),
                    };
                    msgs.push(ChatMessage {
                        role: get("role")?,
                        content: get("content")?,
                    });
                }
                Ok(Doc::Chat(msgs))
            }
            Some(_) => Err(format!("`{f}` is not a list of messages")),
        },
        None => match map.get(fields.text) {
            None => Err(format!("no field `{}`", fields.text)),
            Some(Value::String(s)) => Ok(Doc::Text(s.clone())),
            Some(_) => Err(format!("`{}` is not a string", fields.text)),
        },
    }
}

/// Reads one line (up to and without its `\n`) into `buf`, at most `cap` bytes. `Ok(false)`
/// at the end of the input; `Err(None)` when the line is longer than `cap`.
fn read_line_capped(
    r: &mut impl BufRead,
    buf: &mut Vec<u8>,
    cap: usize,
) -> Result<bool, Option<std::io::Error>> {
    buf.clear();
    let mut any = false;
    loop {
        let avail = match r.fill_buf() {
            Ok(a) => a,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(Some(e)),
        };
        if avail.is_empty() {
            return Ok(any);
        }
        any = true;
        let (chunk, done) = match avail.iter().position(|&b| b == b'\n') {
            Some(i) => (&avail[..i], Some(i + 1)),
            None => (avail, None),
        };
        if buf.len() + chunk.len() > cap {
            return Err(None);
        }
        buf.extend_from_slice(chunk);
        let used = done.unwrap_or(avail.len());
        r.consume(used);
        if done.is_some() {
            return Ok(true);
        }
    }
}

/// Calls `f` with each record of JSONL input `r` (file `path` in errors), in order; blank
/// lines are skipped. A line longer than `cap`, a line that is not a JSON object, or one
/// without the field is an error naming `path` and the line.
pub fn for_each_jsonl(
    path: &Path,
    r: impl std::io::Read,
    fields: Fields,
    cap: usize,
    f: &mut dyn FnMut(Doc) -> Result<(), DataError>,
) -> Result<(), DataError> {
    let mut r = std::io::BufReader::with_capacity(1 << 20, r);
    let mut buf = Vec::new();
    let mut line = 0u64;
    loop {
        line += 1;
        match read_line_capped(&mut r, &mut buf, cap) {
            Ok(false) => return Ok(()),
            Ok(true) => {}
            Err(None) => {
                return Err(format_err(
                    path,
                    format!("line {line}: longer than {cap} bytes"),
                ))
            }
            Err(Some(source)) => {
                return Err(DataError::Read {
                    path: path.display().to_string(),
                    source,
                })
            }
        }
        if buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let doc = parse_record(&buf, fields)
            .map_err(|p| format_err(path, format!("line {line}: {p}")))?;
        f(doc).map_err(|e| match e {
            DataError::Format { problem, .. } => {
                format_err(path, format!("line {line}: {problem}"))
            }
            e => e,
        })?;
    }
}

/// The file at `path`, or an error naming it.
pub(super) fn open(path: &Path) -> Result<std::fs::File, DataError> {
    std::fs::File::open(path).map_err(|source| DataError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Calls `f` with each record of JSONL file `path`.
pub fn read_jsonl(
    path: &Path,
    fields: Fields,
    f: &mut dyn FnMut(Doc) -> Result<(), DataError>,
) -> Result<(), DataError> {
    let file = open(path)?;
    for_each_jsonl(path, file, fields, MAX_RECORD_BYTES, f)
}

/// Calls `f` with each row of Parquet file `path`, row group by row group: its string
/// column `fields.text`, or its list column `fields.messages` of `{role, content}`
/// structs. Errors name the file, and the row group and row where they apply; a panic of
/// the Parquet decoder on a malformed file is caught and becomes an error too.
pub fn read_parquet(
    path: &Path,
    fields: Fields,
    f: &mut dyn FnMut(Doc) -> Result<(), DataError>,
) -> Result<(), DataError> {
    let run = std::panic::AssertUnwindSafe(|| parquet_rows(path, fields, f));
    std::panic::catch_unwind(run).unwrap_or_else(|p| {
        let why = p
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| p.downcast_ref::<&str>().copied())
            .unwrap_or("the decoder failed");
        Err(format_err(path, format!("malformed Parquet file: {why}")))
    })
}

fn parquet_rows(
    path: &Path,
    fields: Fields,
    f: &mut dyn FnMut(Doc) -> Result<(), DataError>,
) -> Result<(), DataError> {
    let file = open(path)?;
    let reader = SerializedFileReader::new(file)
        .map_err(|e| format_err(path, format!("not a readable Parquet file: {e}")))?;
    let meta = reader.metadata();
    let root = meta.file_metadata().schema();
    let name = fields.messages.unwrap_or(fields.text);
    let Some(column) = root.get_fields().iter().find(|c| c.name() == name) else {
        return Err(format_err(path, format!("no column `{name}`")));
    };
    let projection = Type::group_type_builder(root.name())
        .with_fields(vec![Arc::clone(column)])
        .build()
        .map_err(|e| format_err(path, format!("column `{name}`: {e}")))?;
    for g in 0..reader.num_row_groups() {
        let at = |row: Option<usize>, p: String| match row {
            Some(r) => format_err(path, format!("row group {g}, row {r}: {p}")),
            None => format_err(path, format!("row group {g}: {p}")),
        };
        let rg_meta = meta.row_group(g);
        if let Some(c) = rg_meta
            .columns()
            .iter()
            .find(|c| c.compressed_size() > MAX_PARQUET_CHUNK || c.compressed_size() < 0)
        {
            return Err(at(
                None,
                format!(
                    "column chunk of {} bytes (the limit is {MAX_PARQUET_CHUNK})",
                    c.compressed_size()
                ),
            ));
        }
        let rg = reader
            .get_row_group(g)
            .map_err(|e| at(None, e.to_string()))?;
        let rows = rg
            .get_row_iter(Some(projection.clone()))
            .map_err(|e| at(None, e.to_string()))?;
        for (r, row) in rows.enumerate() {
            let row = row.map_err(|e| at(Some(r), e.to_string()))?;
            let Some((_, value)) = row.get_column_iter().next() else {
                return Err(at(Some(r), format!("no `{name}`")));
            };
            let doc = match fields.messages {
                None => field_text(value, name).map(Doc::Text),
                Some(_) => field_messages(value, name).map(Doc::Chat),
            }
            .map_err(|p| at(Some(r), p))?;
            f(doc).map_err(|e| match e {
                DataError::Format { problem, .. } => at(Some(r), problem),
                e => e,
            })?;
        }
    }
    Ok(())
}

/// A Parquet value as text (a UTF-8 string of at most [`MAX_RECORD_BYTES`]).
fn field_text(v: &Field, name: &str) -> Result<String, String> {
    match v {
        Field::Str(s) if s.len() <= MAX_RECORD_BYTES => Ok(s.clone()),
        Field::Bytes(b) if b.len() <= MAX_RECORD_BYTES => {
            String::from_utf8(b.data().to_vec()).map_err(|_| format!("`{name}` is not UTF-8"))
        }
        Field::Str(_) | Field::Bytes(_) => {
            Err(format!("`{name}` is longer than {MAX_RECORD_BYTES} bytes"))
        }
        Field::Null => Err(format!("`{name}` is null")),
        _ => Err(format!("`{name}` is not a string")),
    }
}

/// A Parquet value as a list of `{role, content}` messages.
fn field_messages(v: &Field, name: &str) -> Result<Vec<ChatMessage>, String> {
    let Field::ListInternal(list) = v else {
        return Err(format!("`{name}` is not a list of messages"));
    };
    let mut out = Vec::with_capacity(list.len());
    let mut total = 0usize;
    for (i, m) in list.elements().iter().enumerate() {
        let Field::Group(row) = m else {
            return Err(format!("`{name}`[{i}] is not a {{role, content}} struct"));
        };
        let get = |k: &str| -> Result<String, String> {
            match row.get_column_iter().find(|(n, _)| n.as_str() == k) {
                Some((_, Field::Str(s))) => Ok(s.clone()),
                _ => Err(format!("`{name}`[{i}] has no string `{k}`")),
            }
        };
        let (role, content) = (get("role")?, get("content")?);
        total += role.len() + content.len();
        if total > MAX_RECORD_BYTES {
            return Err(format!("`{name}` is longer than {MAX_RECORD_BYTES} bytes"));
        }
        out.push(ChatMessage { role, content });
    }
    Ok(out)
}

/// The record formats [`check_records`] decodes.
#[derive(Clone, Copy, Debug)]
pub enum RecordFormat {
    /// JSONL, a `text` field.
    Jsonl,
    /// JSONL, a `messages` field.
    JsonlChat,
    /// Parquet, a `text` column.
    Parquet,
    /// Parquet, a `messages` column.
    ParquetChat,
}

/// Decodes `bytes` as a file of `format` (a Parquet file goes through a temporary file)
/// and counts its records, or says why it is refused. The `fuzz/` target `training_data`
/// drives it; it serves nothing.
pub fn check_records(format: RecordFormat, bytes: &[u8]) -> Result<usize, DataError> {
    let text = Fields {
        text: "text",
        messages: None,
    };
    let chat = Fields {
        text: "text",
        messages: Some("messages"),
    };
    let mut n = 0;
    let mut count = |_: Doc| {
        n += 1;
        Ok(())
    };
    match format {
        RecordFormat::Jsonl | RecordFormat::JsonlChat => {
            let fields = if matches!(format, RecordFormat::Jsonl) {
                text
            } else {
                chat
            };
            for_each_jsonl(Path::new("fuzz.jsonl"), bytes, fields, 4096, &mut count)?;
        }
        RecordFormat::Parquet | RecordFormat::ParquetChat => {
            let fields = if matches!(format, RecordFormat::Parquet) {
                text
            } else {
                chat
            };
            let path = std::env::temp_dir().join(format!(
                "shoal-fuzz-{}-{:?}.parquet",
                std::process::id(),
                std::thread::current().id()
            ));
            std::fs::write(&path, bytes).map_err(|source| DataError::Read {
                path: path.display().to_string(),
                source,
            })?;
            let r = read_parquet(&path, fields, &mut count);
            let _ = std::fs::remove_file(&path);
            r?;
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: Fields = Fields {
        text: "text",
        messages: None,
    };

    fn docs(input: &[u8], fields: Fields, cap: usize) -> Result<Vec<Doc>, String> {
        let mut out = Vec::new();
        for_each_jsonl(Path::new("d.jsonl"), input, fields, cap, &mut |d| {
            out.push(d);
            Ok(())
        })
        .map_err(|e| e.to_string())?;
        Ok(out)
    }

    #[test]
    fn jsonl_records_and_errors_name_the_line() {
        let d = docs(
            b"{\"text\": \"a\"}\n\n{\"text\": \"b\\u00e9\", \"x\": 1}",
            TEXT,
            100,
        )
        .unwrap();
        assert_eq!(d, vec![Doc::Text("a".into()), Doc::Text("bé".into())]);
        let e = docs(b"{\"text\": \"a\"}\n{\"txt\": \"b\"}\n", TEXT, 100).unwrap_err();
        assert!(
            e.contains("d.jsonl") && e.contains("line 2") && e.contains("no field `text`"),
            "{e}"
        );
        let e = docs(b"{\"text\": \"a\"}\n{\"text\": \"b\n", TEXT, 100).unwrap_err();
        assert!(e.contains("line 2: not JSON"), "{e}");
        let e = docs(b"{\"text\": 3}\n", TEXT, 100).unwrap_err();
        assert!(e.contains("not a string"), "{e}");
        let e = docs(b"[1]\n", TEXT, 100).unwrap_err();
        assert!(e.contains("not a JSON object"), "{e}");
        let e = docs(b"{\"text\": \"\xff\"}\n", TEXT, 100).unwrap_err();
        assert!(e.contains("line 1"), "{e}");
        let long = format!("{{\"text\": \"{}\"}}\n", "x".repeat(200));
        let e = docs(long.as_bytes(), TEXT, 100).unwrap_err();
        assert!(e.contains("line 1: longer than 100 bytes"), "{e}");
        let chat = Fields {
            text: "text",
            messages: Some("messages"),
        };
        let d = docs(
            b"{\"messages\": [{\"role\": \"user\", \"content\": \"hi\"}]}\n",
            chat,
            100,
        )
        .unwrap();
        assert_eq!(
            d,
            vec![Doc::Chat(vec![ChatMessage {
                role: "user".into(),
                content: "hi".into()
            }])]
        );
        let e = docs(b"{\"messages\": [{\"role\": \"user\"}]}\n", chat, 100).unwrap_err();
        assert!(e.contains("no string `content`"), "{e}");
    }

    #[test]
    fn globs_and_directories() {
        assert!(matches_glob(b"part-*.parquet", b"part-00001.parquet"));
        assert!(!matches_glob(b"part-*.parquet", b"part-00001.parquet.tmp"));
        assert!(matches_glob(b"a?c*", b"abc"));
        assert!(!matches_glob(b"a?c", b"ac"));
        let dir = std::env::temp_dir().join(format!("shoal-src-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for n in ["b.jsonl", "a.jsonl", "c.txt", "part-1.jsonl"] {
            std::fs::write(dir.join(n), "").unwrap();
        }
        let names = |v: Vec<PathBuf>| -> Vec<String> {
            v.iter()
                .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
                .collect()
        };
        assert_eq!(
            names(list_files(&dir, "jsonl").unwrap()),
            ["a.jsonl", "b.jsonl", "part-1.jsonl"]
        );
        assert_eq!(
            names(list_files(&dir.join("part-*.jsonl"), "jsonl").unwrap()),
            ["part-1.jsonl"]
        );
        assert!(list_files(&dir.join("x-*.jsonl"), "jsonl").is_err());
        assert!(list_files(&dir.join("nope.jsonl"), "jsonl").is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
