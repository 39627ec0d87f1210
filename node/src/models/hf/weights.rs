//! A Hugging Face folder's weights, read by tensor name: from `model.safetensors`, or from
//! the shards `model.safetensors.index.json`'s `weight_map` names.
//!
//! Opening reads the index (size-limited) and checks that every shard it names is a plain
//! file name present in the folder; a shard's header is read (and size-checked against the
//! file, [`crate::models::checkpoint::read_header`]) the first time one of its tensors is
//! asked for, and only the tensors asked for are read, in their stored type (F32, F16 or
//! BF16; the decoder converts them to its compute type).

use super::HfError;
use crate::models::checkpoint::{self, Header};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use tch::Tensor;

/// The single-file weights' name.
pub const SINGLE: &str = "model.safetensors";
/// The sharded weights' index.
pub const INDEX: &str = "model.safetensors.index.json";
/// Largest index read. 16 MiB.
pub const MAX_INDEX_BYTES: u64 = 16 << 20;

/// Reads `path`, refusing a file over `limit` bytes.
pub fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>, HfError> {
    use std::io::Read;
    let io = |source| HfError::Io {
        path: path.display().to_string(),
        source,
    };
    let f = std::fs::File::open(path).map_err(io)?;
    let mut bytes = Vec::new();
    f.take(limit + 1).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() as u64 > limit {
        return Err(HfError::Json {
            path: path.display().to_string(),
            problem: format!("larger than {limit} bytes"),
        });
    }
    Ok(bytes)
}

/// Parses `model.safetensors.index.json`'s bytes (`label` names the file in errors): its
/// `weight_map`, tensor name → shard, where every shard is a plain file name (not empty,
/// `.` or `..`, no `/` or `\`, not absolute). Other keys (`metadata`) are ignored; whether
/// the shards exist is not checked here.
pub fn parse_index(bytes: &[u8], label: &str) -> Result<BTreeMap<String, String>, HfError> {
    let bad = |p: String| HfError::Weights {
        path: label.to_string(),
        problem: p,
    };
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| bad(format!("not JSON: {e}")))?;
    let Some(map) = v.get("weight_map").and_then(|m| m.as_object()) else {
        return Err(bad("no `weight_map` object".into()));
    };
    let mut out = BTreeMap::new();
    for (name, file) in map {
        let Some(file) = file.as_str() else {
            return Err(bad(format!("`weight_map.{name}` is not a file name")));
        };
        let plain = !file.is_empty()
            && file != "."
            && file != ".."
            && !file.contains(['/', '\\'])
            && !Path::new(file).is_absolute();
        if !plain {
            return Err(bad(format!(
                "`weight_map.{name}` = {file:?} is not a file name in the folder"
            )));
        }
        out.insert(name.clone(), file.to_string());
    }
    Ok(out)
}

/// A folder's weights: which file holds each tensor, and the headers read so far.
pub struct HfWeights {
    dir: PathBuf,
    /// Tensor name → the file (in `dir`) that holds it.
    map: BTreeMap<String, String>,
    /// Headers of the files read so far, by file name.
    headers: Mutex<HashMap<String, Header>>,
}

impl HfWeights {
    /// Opens `dir`'s weights: the index and the existence of every shard it names, or the
    /// single file's header.
    pub fn open(dir: &Path) -> Result<HfWeights, HfError> {
        let index = dir.join(INDEX);
        let w = HfWeights {
            dir: dir.to_path_buf(),
            map: BTreeMap::new(),
            headers: Mutex::new(HashMap::new()),
        };
        if index.exists() {
            return w.with_index(&index);
        }
        let single = dir.join(SINGLE);
        if !single.exists() {
            return Err(HfError::Weights {
                path: dir.display().to_string(),
                problem: format!("neither {SINGLE} nor {INDEX} is there"),
            });
        }
        let header = read_header(&single)?;
        let mut w = w;
        w.map = header
            .tensors
            .iter()
            .map(|(n, _)| (n.clone(), SINGLE.to_string()))
            .collect();
        w.headers
            .get_mut()
            .expect("not shared yet")
            .insert(SINGLE.into(), header);
        Ok(w)
    }

    fn with_index(mut self, index: &Path) -> Result<HfWeights, HfError> {
        let bytes = read_limited(index, MAX_INDEX_BYTES)?;
        let label = index.display().to_string();
        self.map = parse_index(&bytes, &label)?;
        let files: std::collections::BTreeSet<&String> = self.map.values().collect();
        for f in files {
            if !self.dir.join(f).is_file() {
                return Err(HfError::Weights {
                    path: label,
                    problem: format!("names the shard {f}, which is not in the folder"),
                });
            }
        }
        Ok(self)
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the folder has a tensor called `name`.
    pub fn contains(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    /// The files holding the weights (the shards the index names, or the single file),
    /// each once, sorted.
    pub fn files(&self) -> Vec<String> {
        let set: std::collections::BTreeSet<&String> = self.map.values().collect();
        set.into_iter().cloned().collect()
    }

    /// Reads every file's header now (each is kept for later reads) and checks that every
    /// tensor is in the file the index puts it in: a damaged shard is refused when the
    /// folder is offered, not when a stage first loads its layers.
    pub fn check_headers(&self) -> Result<(), HfError> {
        for name in self.map.keys() {
            self.with_header(name, |_, _| Ok(()))?;
        }
        Ok(())
    }

    /// Every tensor's name.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.map.keys().map(String::as_str)
    }

    /// Runs `f` on the path and header of the file holding `name` (its header read on
    /// first use).
    fn with_header<R>(
        &self,
        name: &str,
        f: impl FnOnce(&Path, &Header) -> Result<R, HfError>,
    ) -> Result<R, HfError> {
        let file = self.map.get(name).ok_or_else(|| HfError::Missing {
            dir: self.dir.display().to_string(),
            name: name.to_string(),
        })?;
        let path = self.dir.join(file);
        let mut headers = self.headers.lock().unwrap_or_else(|e| e.into_inner());
        if !headers.contains_key(file) {
            let h = read_header(&path)?;
            headers.insert(file.clone(), h);
        }
        let header = &headers[file];
        if header.get(name).is_none() {
            return Err(HfError::Weights {
                path: path.display().to_string(),
                problem: format!("has no tensor `{name}` (the index puts it there)"),
            });
        }
        f(&path, header)
    }

    /// The type the embeddings (`model.embed_tokens.weight`) are stored in: the
    /// weights' type, as far as choosing a compute type goes.
    pub fn stored_kind(&self) -> Result<tch::Kind, HfError> {
        let name = super::llama::EMBED;
        self.with_header(name, |path, header| {
            match header.get(name).map(|e| e.dtype.as_str()) {
                Some("F32") => Ok(tch::Kind::Float),
                Some("BF16") => Ok(tch::Kind::BFloat16),
                Some("F16") => Ok(tch::Kind::Half),
                other => Err(HfError::Weights {
                    path: path.display().to_string(),
                    problem: format!("`{name}` is stored as {other:?}, not F32, BF16 or F16"),
                }),
            }
        })
    }

    /// The tensor `name`, on the CPU in its stored type.
    pub fn get(&self, name: &str) -> Result<Tensor, HfError> {
        self.with_header(name, |path, header| {
            checkpoint::read_tensor(path, header, name).map_err(|e| shard_error(path, e))
        })
    }

    /// The stored shape of the tensor `name`.
    pub fn shape(&self, name: &str) -> Result<Vec<i64>, HfError> {
        self.with_header(name, |_, header| {
            Ok(header
                .get(name)
                .map(|e| e.shape.clone())
                .unwrap_or_default())
        })
    }

    /// Rows `rows` (first dimension) of the tensor `name`, on the CPU in its stored type:
    /// only their bytes are read.
    pub fn get_rows(&self, name: &str, rows: std::ops::Range<i64>) -> Result<Tensor, HfError> {
        self.with_header(name, |path, header| {
            checkpoint::read_rows(path, header, name, rows).map_err(|e| shard_error(path, e))
        })
    }

    /// A getter for [`crate::models::decoder::Decoder::load`]: each tensor moved to
    /// `device`, errors as text.
    pub fn getter(&self, device: tch::Device) -> impl Fn(&str) -> Result<Tensor, String> + '_ {
        move |n| {
            self.get(n)
                .map(|t| t.to_device(device))
                .map_err(|e| e.to_string())
        }
    }
}

fn read_header(path: &Path) -> Result<Header, HfError> {
    checkpoint::read_header(path).map_err(|e| shard_error(path, e))
}

fn shard_error(path: &Path, e: checkpoint::CheckpointError) -> HfError {
    match e {
        checkpoint::CheckpointError::Io { source, .. } => HfError::Io {
            path: path.display().to_string(),
            source,
        },
        checkpoint::CheckpointError::Malformed { problem, .. } => HfError::Weights {
            path: path.display().to_string(),
            problem,
        },
    }
}
