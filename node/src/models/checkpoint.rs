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
    let mut header = serde_json::Map::new();
    header.insert(
        "__metadata__".into(),
        serde_json::to_value(metadata).expect("strings serialize"),
    );
    let mut offset = 0usize;
    let mut datas = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.to_kind(tch::Kind::Float).contiguous();
        let n = t.numel();
        let mut v = vec![0f32; n];
        t.copy_data(&mut v, n);
        let bytes = n * 4;
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": t.size(), "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
        datas.push(v);
    }
    let mut h = serde_json::to_vec(&serde_json::Value::Object(header)).expect("json");
    // Pad the header with spaces to an 8-byte boundary (what the reference writer does).
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + h.len() + offset);
    out.extend_from_slice(&(h.len() as u64).to_le_bytes());
    out.extend_from_slice(&h);
    for v in &datas {
        for x in v {
            out.extend_from_slice(&x.to_le_bytes());
        }
    }
    out
}

/// Writes `tensors` (f32) and `metadata` to `path` atomically.
pub fn write(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: &BTreeMap<String, String>,
) -> Result<(), CheckpointError> {
    let bytes = encode(tensors, metadata);
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let tmp = path.with_extension("safetensors.tmp");
    {
        let f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        let mut w = std::io::BufWriter::new(f);
        w.write_all(&bytes).map_err(io(&tmp))?;
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

/// Parses safetensors bytes (f32 tensors only; `label` names them in errors). Every
/// length and offset is checked against the input before anything is built.
pub fn parse(bytes: &[u8], label: &str) -> Result<Checkpoint, CheckpointError> {
    let bad = |p: String| CheckpointError::Malformed {
        path: label.to_string(),
        problem: p,
    };
    if bytes.len() < 8 {
        return Err(bad("shorter than its header length".into()));
    }
    let hlen = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    if hlen > MAX_HEADER_BYTES || hlen > (bytes.len() - 8) as u64 {
        return Err(bad(format!("header length {hlen} is out of bounds")));
    }
    let data = &bytes[8 + hlen as usize..];
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + hlen as usize])
            .map_err(|e| bad(format!("header: {e}")))?;
    let mut metadata = BTreeMap::new();
    let mut tensors = Vec::new();
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
        if info.dtype != "F32" {
            return Err(bad(format!("tensor {name} is {}, not F32", info.dtype)));
        }
        let [a, b] = info.data_offsets;
        let numel = info
            .shape
            .iter()
            .try_fold(1u64, |x, &d| x.checked_mul(d))
            .ok_or_else(|| bad(format!("tensor {name}: shape overflows")))?;
        if a > b || b > data.len() as u64 || Some(b - a) != numel.checked_mul(4) {
            return Err(bad(format!("tensor {name}: offsets {a}..{b} do not fit")));
        }
        let vals: Vec<f32> = data[a as usize..b as usize]
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        let shape: Vec<i64> = info.shape.iter().map(|&d| d as i64).collect();
        tensors.push((name, Tensor::from_slice(&vals).view(shape.as_slice())));
    }
    Ok(Checkpoint { tensors, metadata })
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
}
