//! Checkpoints in the safetensors format: tensors plus string metadata (step, data cursor,
//! job hash), written atomically (temp file, fsync, rename, fsync of the directory) so a
//! crash leaves either the old or the new file, never a torn one. Python's
//! `safetensors.torch.load_file` reads them (`scripts/check_checkpoint.py`).
//!
//! Reading is size-checked: the header length, every tensor's offsets and shape are
//! validated against the file before any tensor is built.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use tch::Tensor;

/// Largest safetensors header read.
pub const MAX_HEADER_BYTES: u64 = 16 << 20;

/// Why a checkpoint could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// File system error.
    #[error("checkpoint {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a checkpoint this version can read.
    #[error("checkpoint {path} is malformed: {problem}")]
    Malformed {
        /// The file.
        path: String,
        /// What is wrong.
        problem: String,
    },
}

/// A checkpoint's content: f32 tensors by name and metadata.
pub struct Checkpoint {
    /// Tensors (CPU, f32), in file order.
    pub tensors: Vec<(String, Tensor)>,
    /// Metadata.
    pub metadata: BTreeMap<String, String>,
}

impl Checkpoint {
    /// The tensor called `name`.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> CheckpointError + '_ {
    move |source| CheckpointError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Encodes `tensors` (as f32) and `metadata` in the safetensors format.
pub fn encode(tensors: &[(String, Tensor)], metadata: &BTreeMap<String, String>) -> Vec<u8> {
    let mut out = Vec::new();
    encode_to(&mut out, tensors, metadata).expect("a Vec takes every write");
    out
}

/// Writes `tensors` (as f32) and `metadata` in the safetensors format to `w`, one tensor at
/// a time: beyond what `w` buffers, it holds one tensor's bytes, never the whole file.
fn encode_to(
    w: &mut impl Write,
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
) -> std::io::Result<()> {
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".into(),
        serde_json::to_value(metadata).expect("strings serialize"),
    );
    let mut offset = 0usize;
    for (name, t) in tensors {
        let bytes = t.numel() * 4;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": t.size(), "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut h = serde_json::to_vec(&serde_json::Value::Object(header)).expect("json");
    // Pad the header with spaces to an 8-byte boundary (what the reference writer does).
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    w.write_all(&(h.len() as u64).to_le_bytes())?;
    w.write_all(&h)?;
    // One buffer of the largest tensor's size, allocated once: growing it tensor by tensor
    // would move (and copy) it under glibc's lock (`crate::allocator`).
    let most = tensors.iter().map(|(_, t)| t.numel()).max().unwrap_or(0);
    let mut buf = vec![0u8; most * 4];
    for (_, t) in tensors {
        let t = t.to_kind(tch::Kind::Float).contiguous();
        let n = t.numel();
        // The tensor's bytes as they lie: little-endian f32 (the data plane refuses to
        // compile for other hosts).
        t.copy_data_u8(&mut buf[..n * 4], n);
        w.write_all(&buf[..n * 4])?;
    }
    Ok(())
}

/// Writes `tensors` (f32) and `metadata` to `path` atomically, streaming: it holds one
/// tensor's bytes at a time, not the file's.
pub fn write(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<(), CheckpointError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let tmp = path.with_extension("safetensors.tmp");
    {
        let f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        let mut w = std::io::BufWriter::new(f);
        encode_to(&mut w, tensors, metadata).map_err(io(&tmp))?;
        let f = w.into_inner().map_err(|e| io(&tmp)(e.into_error()))?;
        f.sync_all().map_err(io(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io(path))?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// Reads a checkpoint written by [`write`] (f32 tensors only).
pub fn read(path: &Path) -> Result<Checkpoint, CheckpointError> {
    let bytes = std::fs::read(path).map_err(io(path))?;
    parse(&bytes, &path.display().to_string())
}

/// A tensor's element type in a safetensors file, among those shoal reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dtype {
    /// `F32`.
    F32,
    /// `F16`.
    F16,
    /// `BF16`.
    BF16,
}

impl Dtype {
    /// The type called `name` in a header (`F32`, `F16`, `BF16`), if shoal reads it.
    pub fn parse(name: &str) -> Option<Dtype> {
        match name {
            "F32" => Some(Dtype::F32),
            "F16" => Some(Dtype::F16),
            "BF16" => Some(Dtype::BF16),
            _ => None,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> u64 {
        match self {
            Dtype::F32 => 4,
            Dtype::F16 | Dtype::BF16 => 2,
        }
    }

    /// The libtorch kind.
    pub fn kind(self) -> tch::Kind {
        match self {
            Dtype::F32 => tch::Kind::Float,
            Dtype::F16 => tch::Kind::Half,
            Dtype::BF16 => tch::Kind::BFloat16,
        }
    }
}

/// One tensor's entry in a safetensors header, checked against the file: its bytes
/// `start..end` (from the start of the data section) lie inside the file and, for a
/// [`Dtype`] shoal reads, hold exactly `shape`'s elements.
#[derive(Clone, Debug)]
pub struct Entry {
    /// The type as the header names it (`F32`, `BF16`, `I64`, …).
    pub dtype: String,
    /// The shape.
    pub shape: Vec<i64>,
    /// First byte, from the start of the data section.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

/// A safetensors header: every tensor's entry (in header order), the metadata, and where
/// the data section starts in the file.
#[derive(Clone, Debug)]
pub struct Header {
    /// Entries by name, in the header's order.
    pub tensors: Vec<(String, Entry)>,
    /// `__metadata__`.
    pub metadata: BTreeMap<String, String>,
    /// Offset of the data section in the file (8 + the header's length).
    pub data_start: u64,
}

impl Header {
    /// The entry called `name`.
    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.tensors.iter().find(|(n, _)| n == name).map(|(_, e)| e)
    }
}

/// Checks the 8-byte header length `hlen` of a file of `file_len` bytes.
fn header_len(hlen: u64, file_len: u64, label: &str) -> Result<u64, CheckpointError> {
    if hlen > MAX_HEADER_BYTES || hlen > file_len.saturating_sub(8) {
        return Err(CheckpointError::Malformed {
            path: label.to_string(),
            problem: format!("header length {hlen} is out of bounds"),
        });
    }
    Ok(hlen)
}

/// Parses a safetensors header (`json`, the bytes after the length) whose data section is
/// `data_len` bytes long; every entry's offsets and size are checked against it.
pub fn parse_header(json: &[u8], data_len: u64, label: &str) -> Result<Header, CheckpointError> {
    let bad = |p: String| CheckpointError::Malformed {
        path: label.to_string(),
        problem: p,
    };
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(json).map_err(|e| bad(format!("header: {e}")))?;
    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::with_capacity(header.len());
    for (name, v) in header {
        if name == "__metadata__" {
            metadata = serde_json::from_value(v).map_err(|e| bad(format!("metadata: {e}")))?;
            continue;
        }
        #[derive(serde::Deserialize)]
        struct Info {
            dtype: String,
            shape: Vec<u64>,
            data_offsets: [u64; 2],
        }
        let info: Info =
            serde_json::from_value(v).map_err(|e| bad(format!("tensor {name}: {e}")))?;
        let [a, b] = info.data_offsets;
        // Every dimension, and the product of the non-zero ones, fits an i64: libtorch
        // takes the shape as i64s (a zero elsewhere would hide an overflowing dimension).
        let fits = info
            .shape
            .iter()
            .try_fold(1u64, |x, &d| {
                x.checked_mul(d.max(1)).filter(|&n| n <= i64::MAX as u64)
            })
            .is_some();
        if !fits {
            return Err(bad(format!("tensor {name}: shape overflows")));
        }
        let numel: u64 = info.shape.iter().product();
        let size = Dtype::parse(&info.dtype).map(|d| numel.checked_mul(d.size()));
        if a > b || b > data_len || size.is_some_and(|s| s != Some(b - a)) {
            return Err(bad(format!("tensor {name}: offsets {a}..{b} do not fit")));
        }
        let entry = Entry {
            dtype: info.dtype,
            shape: info.shape.iter().map(|&d| d as i64).collect(),
            start: a,
            end: b,
        };
        tensors.push((name, entry));
    }
    Ok(Header {
        tensors,
        metadata,
        data_start: 0,
    })
}

/// Parses the header of a safetensors file `file_len` bytes long from `head`, the file's
/// first bytes: the 8-byte little-endian length, bounded by [`MAX_HEADER_BYTES`] and the
/// file's size, then at least that many bytes of JSON (bytes past the header are ignored).
/// Every entry's offsets and size are checked against the data section (the rest of the
/// file); [`Header::data_start`] is set. Nothing is allocated beyond the header's entries.
pub fn parse_file_header(
    head: &[u8],
    file_len: u64,
    label: &str,
) -> Result<Header, CheckpointError> {
    let bad = |p: &str| CheckpointError::Malformed {
        path: label.to_string(),
        problem: p.to_string(),
    };
    let Some((len, rest)) = head.split_first_chunk::<8>() else {
        return Err(bad("shorter than its header length"));
    };
    if file_len < 8 {
        return Err(bad("shorter than its header length"));
    }
    let hlen = header_len(u64::from_le_bytes(*len), file_len, label)?;
    // hlen <= MAX_HEADER_BYTES (16 MiB): it fits a usize.
    let json = rest
        .get(..hlen as usize)
        .ok_or_else(|| bad("the header is truncated"))?;
    let mut h = parse_header(json, file_len - 8 - hlen, label)?;
    h.data_start = 8 + hlen;
    Ok(h)
}

/// Reads the header of the safetensors file `path` (its length bounded by
/// [`MAX_HEADER_BYTES`] and the file's size, checked before the header is read), without
/// reading any tensor; [`parse_file_header`] checks it.
pub fn read_header(path: &Path) -> Result<Header, CheckpointError> {
    use std::io::Read;
    let label = path.display().to_string();
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    let file_len = f.metadata().map_err(io(path))?.len();
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|_| CheckpointError::Malformed {
            path: label.clone(),
            problem: "shorter than its header length".into(),
        })?;
    let hlen = header_len(u64::from_le_bytes(len), file_len, &label)?;
    let mut head = vec![0u8; 8 + hlen as usize];
    head[..8].copy_from_slice(&len);
    f.read_exact(&mut head[8..]).map_err(io(path))?;
    parse_file_header(&head, file_len, &label)
}

/// Reads the tensor `name` of `header` (read by [`read_header`] from `path`) onto the CPU
/// in its stored type (F32, F16 or BF16; any other type is an error naming it).
pub fn read_tensor(path: &Path, header: &Header, name: &str) -> Result<Tensor, CheckpointError> {
    let rows = header
        .get(name)
        .map_or(0, |e| e.shape.first().copied().unwrap_or(1));
    read_rows(path, header, name, 0..rows)
}

/// Rows `rows` (along the first dimension; a scalar has one) of the tensor `name` of the
/// file at `path` whose header is `header`, in its stored type: only those bytes are read.
pub fn read_rows(
    path: &Path,
    header: &Header,
    name: &str,
    rows: std::ops::Range<i64>,
) -> Result<Tensor, CheckpointError> {
    use std::io::{Read, Seek, SeekFrom};
    let bad = |p: String| CheckpointError::Malformed {
        path: path.display().to_string(),
        problem: p,
    };
    let e = header
        .get(name)
        .ok_or_else(|| bad(format!("no tensor {name}")))?;
    let label = path.display().to_string();
    // Refused before anything is read.
    let dtype = entry_dtype(name, e, &label)?;
    let (first, rest) = match e.shape.split_first() {
        Some((&n, rest)) => (n, rest.to_vec()),
        None => (1, Vec::new()),
    };
    if rows.start < 0 || rows.start > rows.end || rows.end > first {
        return Err(bad(format!("tensor {name}: rows {rows:?} of {first}")));
    }
    // The size was checked against the file's length when the header was read.
    let row_bytes = rest.iter().product::<i64>() as u64 * dtype.size();
    let mut bytes = vec![0u8; (rows.end - rows.start) as u64 as usize * row_bytes as usize];
    let mut f = std::fs::File::open(path).map_err(io(path))?;
    f.seek(SeekFrom::Start(
        header.data_start + e.start + rows.start as u64 * row_bytes,
    ))
    .map_err(io(path))?;
    f.read_exact(&mut bytes)
        .map_err(|_| bad(format!("tensor {name}: the file is truncated")))?;
    if rows == (0..first) {
        return tensor_from_bytes(name, e, &bytes, &label);
    }
    let shape: Vec<i64> = std::iter::once(rows.end - rows.start).chain(rest).collect();
    Ok(Tensor::from_data_size(&bytes, &shape, dtype.kind()))
}

/// The [`Dtype`] of the entry `e` (tensor `name`), or an error naming its type.
fn entry_dtype(name: &str, e: &Entry, label: &str) -> Result<Dtype, CheckpointError> {
    Dtype::parse(&e.dtype).ok_or_else(|| CheckpointError::Malformed {
        path: label.to_string(),
        problem: format!("tensor {name} is {}, not F32, F16 or BF16", e.dtype),
    })
}

/// The tensor `name` of entry `e` (checked by [`parse_header`]) from its `bytes` (its
/// `start..end` of the data section), on the CPU in its stored type (F32, F16 or BF16; any
/// other type, or bytes of another length than the entry's, is an error).
pub fn tensor_from_bytes(
    name: &str,
    e: &Entry,
    bytes: &[u8],
    label: &str,
) -> Result<Tensor, CheckpointError> {
    let dtype = entry_dtype(name, e, label)?;
    let want = e.end.saturating_sub(e.start);
    // The shape holds exactly those bytes (parse_header checked it; an entry built
    // elsewhere is checked here too).
    let numel = e.shape.iter().try_fold(1u64, |n, &d| {
        u64::try_from(d).ok().and_then(|d| n.checked_mul(d))
    });
    let holds = numel.and_then(|n| n.checked_mul(dtype.size())) == Some(want);
    if bytes.len() as u64 != want || !holds {
        return Err(CheckpointError::Malformed {
            path: label.to_string(),
            problem: format!(
                "tensor {name}: {} bytes do not hold {:?} {}",
                bytes.len(),
                e.shape,
                e.dtype
            ),
        });
    }
    Ok(Tensor::from_data_size(bytes, &e.shape, dtype.kind()))
}

/// Parses safetensors bytes (f32 tensors only; `label` names them in errors). Every
/// length and offset is checked against the input before anything is built.
pub fn parse(bytes: &[u8], label: &str) -> Result<Checkpoint, CheckpointError> {
    let bad = |p: String| CheckpointError::Malformed {
        path: label.to_string(),
        problem: p,
    };
    let header = parse_file_header(bytes, bytes.len() as u64, label)?;
    // parse_file_header checked data_start against the input's length.
    let data = &bytes[header.data_start as usize..];
    let mut tensors = Vec::with_capacity(header.tensors.len());
    for (name, e) in header.tensors {
        if e.dtype != "F32" {
            return Err(bad(format!("tensor {name} is {}, not F32", e.dtype)));
        }
        let vals: Vec<f32> = data[e.start as usize..e.end as usize]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        tensors.push((name, Tensor::from_slice(&vals).view(e.shape.as_slice())));
    }
    Ok(Checkpoint {
        tensors,
        metadata: header.metadata,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_atomic_replace() {
        let dir = std::env::temp_dir().join(format!("shoal-ckpt-{}", std::process::id()));
        let path = dir.join("c.safetensors");
        let t = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0]).view([2, 3]);
        let meta = BTreeMap::from([("step".to_string(), "7".to_string())]);
        write(&path, &[("w".into(), t.shallow_clone())], &meta).unwrap();
        let c = read(&path).unwrap();
        assert_eq!(c.metadata, meta);
        assert_eq!(c.get("w").unwrap().size(), vec![2, 3]);
        assert!(c.get("w").unwrap().equal(&t));
        assert!(!path.with_extension("safetensors.tmp").exists());
        // Corruptions are errors, not panics.
        let bytes = std::fs::read(&path).unwrap();
        let trunc = dir.join("t.safetensors");
        std::fs::write(&trunc, &bytes[..bytes.len() - 1]).unwrap();
        assert!(read(&trunc).is_err());
        let mut huge = bytes.clone();
        huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&trunc, &huge).unwrap();
        assert!(read(&trunc).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A safetensors file of the header `json` and `data`.
    fn file(json: &str, data: &[u8]) -> Vec<u8> {
        let mut b = (json.len() as u64).to_le_bytes().to_vec();
        b.extend_from_slice(json.as_bytes());
        b.extend_from_slice(data);
        b
    }

    #[test]
    fn a_zero_dimension_does_not_hide_one_libtorch_cannot_take() {
        // No elements, but a dimension beyond i64: refused (libtorch panicked on it).
        for shape in ["[0,18446744073709551615]", "[9223372036854775808,0]"] {
            let b = file(
                &format!(r#"{{"x":{{"dtype":"F32","shape":{shape},"data_offsets":[0,0]}}}}"#),
                b"",
            );
            let e = parse(&b, "t").err().unwrap().to_string();
            assert!(e.contains("shape overflows"), "{e}");
            assert!(parse_file_header(&b, b.len() as u64, "t").is_err());
        }
        // Empty tensors with dimensions that fit are fine.
        let b = file(
            r#"{"x":{"dtype":"F32","shape":[0,9223372036854775807],"data_offsets":[0,0]}}"#,
            b"",
        );
        let c = parse(&b, "t").unwrap();
        assert_eq!(c.get("x").unwrap().size(), [0, i64::MAX]);
    }

    #[test]
    fn a_file_header_is_read_from_the_head_of_the_file() {
        let b = file(
            r#"{"x":{"dtype":"BF16","shape":[2],"data_offsets":[0,4]}}"#,
            &[0, 0x3f, 0, 0x40],
        );
        let h = parse_file_header(&b, b.len() as u64, "t").unwrap();
        assert_eq!(h.data_start, b.len() as u64 - 4);
        let (name, e) = &h.tensors[0];
        let t = tensor_from_bytes(name, e, &b[h.data_start as usize..], "t").unwrap();
        assert_eq!((t.kind(), t.size()), (tch::Kind::BFloat16, vec![2]));
        assert!(tensor_from_bytes(name, e, &b[..3], "t").is_err());
        // The header alone, of a larger file: the offsets are checked against that file.
        let head = &b[..h.data_start as usize];
        assert!(parse_file_header(head, b.len() as u64, "t").is_ok());
        assert!(parse_file_header(head, head.len() as u64, "t").is_err());
        // Cut inside the header, or shorter than its length: refused.
        assert!(parse_file_header(&b[..20], b.len() as u64, "t").is_err());
        assert!(parse_file_header(&b[..5], 5, "t").is_err());
        assert!(parse_file_header(&b, 4, "t").is_err());
    }
}
