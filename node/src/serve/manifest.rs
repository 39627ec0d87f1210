//! A model folder as it travels between members: its **manifest**, the canonical JSON list
//! of the files a member needs (name, SHA-256, size).
//!
//! A Hugging Face folder ([`crate::models::hf`]) is offered as its manifest: the serving
//! announcement's `sha256` and `bytes` are the manifest's. A member that hears of it
//! fetches the manifest by that hash, checks it ([`Manifest::parse`]: size, file count,
//! names, digests, canonical form), then fetches each file by its own hash through the
//! same chunked `Fetch` stage call and checks it, and assembles the folder under its
//! models dir (`registry`), once the disk has room for the sizes listed; each file is
//! fetched at exactly its listed size.
//!
//! The files listed ([`Manifest::build`]): `config.json`; the weights (the index
//! `model.safetensors.index.json` and every shard it names, or `model.safetensors`); and
//! those of [`OPTIONAL`] that are present (generation settings, tokenizer files, chat
//! template). Each name is a plain file name ([`check_name`]): no `/`, `\`, `..`, NUL.

use crate::models::hf::{self, weights};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::path::Path;

/// Largest manifest accepted from a peer. 1 MiB.
pub const MAX_MANIFEST_BYTES: u64 = 1 << 20;
/// Most files a manifest may list. 1024.
pub const MAX_FILES: usize = 1024;
/// Longest file name accepted. 255 bytes.
pub const MAX_NAME: usize = 255;
/// Largest file a manifest may list. 2^40 bytes (1 TiB).
pub const MAX_FILE_BYTES: u64 = 1 << 40;
/// Files that travel with a folder when present: generation settings, tokenizer files
/// and the chat template.
pub const OPTIONAL: [&str; 10] = [
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
];

/// One file of a folder.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestFile {
    /// Its name in the folder (a plain file name, [`check_name`]).
    pub name: String,
    /// Its SHA-256, 64 lowercase hex digits.
    pub sha256: String,
    /// Its size in bytes.
    pub bytes: u64,
}

impl ManifestFile {
    /// Its SHA-256 as bytes (checked by [`Manifest::parse`]; zeros if malformed).
    pub fn digest(&self) -> [u8; 32] {
        let mut d = [0u8; 32];
        let _ = hex::decode_to_slice(&self.sha256, &mut d);
        d
    }
}

/// A folder's files, sorted by name, each once.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The files, sorted by name.
    pub files: Vec<ManifestFile>,
}

/// Why a manifest could not be built or was refused.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The folder is not a servable Hugging Face folder (the error names the file).
    #[error(transparent)]
    Folder(#[from] hf::HfError),
    /// A file of the folder cannot be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A manifest (from a peer, or of a folder) breaks a rule.
    #[error("manifest: {0}")]
    Invalid(String),
}

/// Checks that `name` is a plain file name: 1 to [`MAX_NAME`] bytes, not `.` or `..`, no
/// `/`, `\` or NUL.
pub fn check_name(name: &str) -> Result<(), String> {
    let plain = !name.is_empty()
        && name.len() <= MAX_NAME
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\', '\0']);
    if plain {
        Ok(())
    } else {
        Err(format!("{name:?} is not a plain file name"))
    }
}

/// The SHA-256 and size of the file at `path`.
pub fn sha256_file(path: &Path) -> std::io::Result<([u8; 32], u64)> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((h.finalize().into(), n))
}

/// Bytes free for an unprivileged user on the file system holding `dir` (None when it
/// cannot be asked).
pub fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: `c` is a valid NUL-terminated path and `st` a properly sized out-parameter.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

impl Manifest {
    /// The manifest of the Hugging Face folder `dir`: its config and weights' index are
    /// read and checked first ([`hf::open`]: a shard the index names but the folder lacks
    /// is an error naming it), then every file listed is hashed.
    pub fn build(dir: &Path) -> Result<Manifest, ManifestError> {
        let (_, w) = hf::open(dir)?;
        let mut names: Vec<String> = vec!["config.json".into()];
        if dir.join(weights::INDEX).exists() {
            names.push(weights::INDEX.into());
            names.extend(w.files());
        } else {
            names.push(weights::SINGLE.into());
        }
        names.extend(
            OPTIONAL
                .iter()
                .filter(|n| dir.join(n).is_file())
                .map(|n| n.to_string()),
        );
        names.sort();
        names.dedup();
        let mut files = Vec::with_capacity(names.len());
        for name in names {
            check_name(&name).map_err(ManifestError::Invalid)?;
            let path = dir.join(&name);
            let (h, bytes) = sha256_file(&path).map_err(|source| ManifestError::Io {
                path: path.display().to_string(),
                source,
            })?;
            files.push(ManifestFile {
                name,
                sha256: hex::encode(h),
                bytes,
            });
        }
        let m = Manifest { files };
        m.check()?;
        Ok(m)
    }

    /// Its canonical bytes: compact JSON, files sorted by name, fields in declaration
    /// order. Its SHA-256 is the model's hash.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a manifest serialises")
    }

    /// Its SHA-256 (of [`to_bytes`](Self::to_bytes)).
    pub fn hash(&self) -> [u8; 32] {
        Sha256::digest(self.to_bytes()).into()
    }

    /// Total bytes of its files.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.bytes).sum()
    }

    /// The file whose SHA-256 is `h`.
    pub fn file_by_hash(&self, h: &[u8; 32]) -> Option<&ManifestFile> {
        self.files.iter().find(|f| &f.digest() == h)
    }

    /// Parses a manifest from a peer: at most [`MAX_MANIFEST_BYTES`], at most
    /// [`MAX_FILES`] files, each a plain name with a hex SHA-256 and at most
    /// [`MAX_FILE_BYTES`], sorted and unique, `config.json` among them, and the bytes in
    /// canonical form.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        let bad = |s: String| ManifestError::Invalid(s);
        if bytes.len() as u64 > MAX_MANIFEST_BYTES {
            return Err(bad(format!(
                "{} bytes, more than {MAX_MANIFEST_BYTES}",
                bytes.len()
            )));
        }
        let m: Manifest =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("not a manifest: {e}")))?;
        m.check()?;
        if m.to_bytes() != bytes {
            return Err(bad("not in canonical form".into()));
        }
        Ok(m)
    }

    /// The rules of [`parse`](Self::parse) on the parsed value.
    fn check(&self) -> Result<(), ManifestError> {
        let bad = |s: String| ManifestError::Invalid(s);
        if self.files.len() > MAX_FILES {
            return Err(bad(format!(
                "{} files, more than {MAX_FILES}",
                self.files.len()
            )));
        }
        for f in &self.files {
            check_name(&f.name).map_err(bad)?;
            let hex_ok = f.sha256.len() == 64
                && f.sha256
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            if !hex_ok {
                return Err(bad(format!(
                    "{}: sha256 is not 64 lowercase hex digits",
                    f.name
                )));
            }
            if f.bytes > MAX_FILE_BYTES {
                return Err(bad(format!(
                    "{}: {} bytes, more than {MAX_FILE_BYTES}",
                    f.name, f.bytes
                )));
            }
        }
        if self.files.windows(2).any(|w| w[0].name >= w[1].name) {
            return Err(bad("files not sorted by name, or a name twice".into()));
        }
        if !self.files.iter().any(|f| f.name == "config.json") {
            return Err(bad("no config.json".into()));
        }
        Ok(())
    }

    /// Bytes of the files `dir` does not hold yet with their listed size (a file there of
    /// another size counts whole).
    pub fn missing_bytes(&self, dir: &Path) -> u64 {
        self.files
            .iter()
            .filter(|f| std::fs::metadata(dir.join(&f.name)).map(|m| m.len()).ok() != Some(f.bytes))
            .map(|f| f.bytes)
            .sum()
    }

    /// Checks that `dir` holds every file with its size and SHA-256; the first that does
    /// not, and why.
    pub fn verify(&self, dir: &Path) -> Result<(), String> {
        for f in &self.files {
            match sha256_file(&dir.join(&f.name)) {
                Ok((h, n)) if h == f.digest() && n == f.bytes => {}
                Ok(_) => return Err(format!("{}: size or SHA-256 differs", f.name)),
                Err(e) => return Err(format!("{}: {e}", f.name)),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/hf")
            .join(name)
    }

    fn file(name: &str) -> ManifestFile {
        ManifestFile {
            name: name.into(),
            sha256: "ab".repeat(32),
            bytes: 3,
        }
    }

    fn encode(files: Vec<ManifestFile>) -> Vec<u8> {
        Manifest { files }.to_bytes()
    }

    #[test]
    fn a_folder_manifest_lists_config_index_and_shards_canonically() {
        let dir = fixture("llama");
        let m = Manifest::build(&dir).unwrap();
        let names: Vec<&str> = m.files.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "config.json",
                "model-00001-of-00004.safetensors",
                "model-00002-of-00004.safetensors",
                "model-00003-of-00004.safetensors",
                "model-00004-of-00004.safetensors",
                "model.safetensors.index.json",
            ],
            "the references and anything else in the folder stay home"
        );
        for f in &m.files {
            let bytes = std::fs::read(dir.join(&f.name)).unwrap();
            assert_eq!(f.bytes, bytes.len() as u64);
            assert_eq!(f.digest(), <[u8; 32]>::from(Sha256::digest(&bytes)));
            assert_eq!(m.file_by_hash(&f.digest()), Some(f));
        }
        // Canonical: built twice, the same bytes; parsed and written again, the same.
        let b = m.to_bytes();
        assert_eq!(Manifest::build(&dir).unwrap().to_bytes(), b);
        assert_eq!(Manifest::parse(&b).unwrap(), m);
        assert_eq!(m.hash(), <[u8; 32]>::from(Sha256::digest(&b)));
        assert!(m.verify(&dir).is_ok());
        assert_eq!(m.missing_bytes(&dir), 0);
        assert_eq!(m.missing_bytes(&dir.join("absent")), m.total_bytes());
        assert!(free_bytes(&dir).is_some_and(|b| b > 0));
        // The fuzz seed, written by Python's `json.dumps(separators=(",", ":"))`, is it.
        let seed =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/serve_manifest/llama.json");
        assert_eq!(std::fs::read(seed).unwrap(), b);
        // Not canonical: the same content with whitespace, or files out of order.
        let pretty = serde_json::to_vec_pretty(&m).unwrap();
        assert!(Manifest::parse(&pretty).is_err());
        let mut rev = m.clone();
        rev.files.reverse();
        assert!(Manifest::parse(&rev.to_bytes()).is_err());
    }

    #[test]
    fn names_that_leave_the_folder_are_refused() {
        for name in ["../x", "a/b", "..", ".", "", "a\\b", "/etc/passwd", "a\0b"] {
            let b = encode(vec![file("config.json"), file(name)]);
            let e = Manifest::parse(&b).unwrap_err().to_string();
            assert!(e.contains("not a plain file name"), "{name:?}: {e}");
        }
        assert!(check_name(&"x".repeat(MAX_NAME + 1)).is_err());
        assert!(check_name("model-00001-of-00004.safetensors").is_ok());
        // Twice the same name, no config.json, a bad digest, unknown fields.
        let twice = encode(vec![file("a"), file("a"), file("config.json")]);
        assert!(Manifest::parse(&twice).is_err());
        assert!(Manifest::parse(&encode(vec![file("a")])).is_err());
        let mut f = file("config.json");
        f.sha256 = "AB".repeat(32);
        assert!(Manifest::parse(&encode(vec![f])).is_err());
        let extra = br#"{"files":[],"more":1}"#;
        assert!(Manifest::parse(extra).is_err());
    }

    #[test]
    fn limits_bound_what_a_peer_sends() {
        let many: Vec<ManifestFile> = (0..=MAX_FILES)
            .map(|i| file(&format!("f{i:05}")))
            .chain([file("config.json")])
            .collect();
        let mut many = many;
        many.sort_by(|a, b| a.name.cmp(&b.name));
        let e = Manifest::parse(&encode(many)).unwrap_err().to_string();
        assert!(e.contains("more than 1024"), "{e}");
        let big = vec![b' '; MAX_MANIFEST_BYTES as usize + 1];
        let e = Manifest::parse(&big).unwrap_err().to_string();
        assert!(e.contains("more than"), "{e}");
        let mut f = file("config.json");
        f.bytes = MAX_FILE_BYTES + 1;
        assert!(Manifest::parse(&encode(vec![f])).is_err());
    }

    #[test]
    fn a_folder_missing_a_shard_is_an_error_naming_it() {
        let tmp = std::env::temp_dir().join(format!("shoal-manifest-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).unwrap();
        let src = fixture("llama");
        for f in ["config.json", "model.safetensors.index.json"] {
            std::fs::copy(src.join(f), tmp.join(f)).unwrap();
        }
        for i in 1..=3 {
            let f = format!("model-0000{i}-of-00004.safetensors");
            std::fs::copy(src.join(&f), tmp.join(&f)).unwrap();
        }
        let e = Manifest::build(&tmp).unwrap_err().to_string();
        let _ = std::fs::remove_dir_all(&tmp);
        assert!(e.contains("model-00004-of-00004.safetensors"), "{e}");
    }
}
