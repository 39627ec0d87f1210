//! What a node keeps on disk in its data dir: its libp2p identity (`identity.key`, mode
//! 0600), its incarnation counter (`incarnation`), and where it listens (`api.addr`,
//! `listen.addrs`, written for `shoal local` and scripts). Also the private-network swarm key.

use libp2p::identity::Keypair;
use libp2p::pnet::PreSharedKey;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// File holding the node's private key (libp2p protobuf encoding), mode 0600.
pub const KEY_FILE: &str = "identity.key";
/// File holding the incarnation counter, bumped at every start.
pub const INCARNATION_FILE: &str = "incarnation";
/// File the node writes with its local API address once it is bound.
pub const API_ADDR_FILE: &str = "api.addr";
/// File the node writes with its control-plane listen addresses (one per line, with /p2p).
pub const LISTEN_ADDRS_FILE: &str = "listen.addrs";

/// Why the on-disk state could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// A file or directory could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The path involved.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The key file exists but does not hold a valid libp2p private key.
    #[error("key file {path} is malformed: {reason}")]
    MalformedKey {
        /// The key file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The incarnation file does not hold a number.
    #[error("incarnation file {path} is malformed")]
    MalformedIncarnation {
        /// The incarnation file.
        path: PathBuf,
    },
    /// The swarm key file is not a valid pnet pre-shared key.
    #[error("swarm key {path} is malformed: {reason}")]
    MalformedSwarmKey {
        /// The swarm key file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// `keygen` refuses to overwrite an existing swarm key.
    #[error("{path} already exists; refusing to overwrite a swarm key")]
    Exists {
        /// The existing file.
        path: PathBuf,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError + '_ {
    move |source| IdentityError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Creates `dir` (and parents) if needed.
pub fn ensure_dir(dir: &Path) -> Result<(), IdentityError> {
    fs::create_dir_all(dir).map_err(io(dir))
}

/// Writes `bytes` to `path` atomically (temp file, fsync, rename) with the given mode.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), IdentityError> {
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io(path))
}

/// Loads the node's key from `dir/identity.key`, creating a new Ed25519 key (mode 0600) on
/// first start. A key file readable by others is tightened to 0600 with a warning.
pub fn load_or_create_identity(dir: &Path) -> Result<Keypair, IdentityError> {
    ensure_dir(dir)?;
    let path = dir.join(KEY_FILE);
    match fs::read(&path) {
        Ok(bytes) => {
            let key = Keypair::from_protobuf_encoding(&bytes).map_err(|e| {
                IdentityError::MalformedKey {
                    path: path.clone(),
                    reason: e.to_string(),
                }
            })?;
            let meta = fs::metadata(&path).map_err(io(&path))?;
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(path = %path.display(), "key file was readable by others; setting mode 0600");
                fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).map_err(io(&path))?;
            }
            Ok(key)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = Keypair::generate_ed25519();
            let bytes = key
                .to_protobuf_encoding()
                .expect("ed25519 keys always encode");
            write_atomic(&path, &bytes, 0o600)?;
            Ok(key)
        }
        Err(e) => Err(io(&path)(e)),
    }
}

/// Reads, increments and stores the incarnation counter; returns the new value (1 on the
/// first start).
pub fn bump_incarnation(dir: &Path) -> Result<u64, IdentityError> {
    let path = dir.join(INCARNATION_FILE);
    let current = match fs::read_to_string(&path) {
        Ok(s) => s
            .trim()
            .parse::<u64>()
            .map_err(|_| IdentityError::MalformedIncarnation { path: path.clone() })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(io(&path)(e)),
    };
    let next = current + 1;
    write_atomic(&path, format!("{next}\n").as_bytes(), 0o644)?;
    Ok(next)
}

/// Reads a pnet swarm key file (the `/key/swarm/psk/1.0.0/` format).
pub fn read_swarm_key(path: &Path) -> Result<PreSharedKey, IdentityError> {
    let text = fs::read_to_string(path).map_err(io(path))?;
    text.parse::<PreSharedKey>()
        .map_err(|e| IdentityError::MalformedSwarmKey {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
}

/// Writes a fresh random swarm key to `path` (mode 0600); refuses to overwrite.
pub fn write_new_swarm_key(path: &Path) -> Result<PreSharedKey, IdentityError> {
    if path.exists() {
        return Err(IdentityError::Exists {
            path: path.to_path_buf(),
        });
    }
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        ensure_dir(parent)?;
    }
    let key = PreSharedKey::new(rand::random::<[u8; 32]>());
    write_atomic(path, format!("{key}\n").as_bytes(), 0o600)?;
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("shoal-id-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn identity_persists_with_mode_0600() {
        let d = tmpdir("persist");
        let a = load_or_create_identity(&d).unwrap();
        let b = load_or_create_identity(&d).unwrap();
        assert_eq!(a.public().to_peer_id(), b.public().to_peer_id());
        let mode = fs::metadata(d.join(KEY_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        fs::write(d.join(KEY_FILE), b"garbage").unwrap();
        assert!(matches!(
            load_or_create_identity(&d),
            Err(IdentityError::MalformedKey { .. })
        ));
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn incarnation_counts_up_and_rejects_garbage() {
        let d = tmpdir("inc");
        ensure_dir(&d).unwrap();
        assert_eq!(bump_incarnation(&d).unwrap(), 1);
        assert_eq!(bump_incarnation(&d).unwrap(), 2);
        fs::write(d.join(INCARNATION_FILE), "x").unwrap();
        assert!(bump_incarnation(&d).is_err());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn swarm_key_roundtrip_and_no_overwrite() {
        let d = tmpdir("psk");
        let p = d.join("swarm.key");
        let k = write_new_swarm_key(&p).unwrap();
        assert_eq!(
            read_swarm_key(&p).unwrap().fingerprint().to_string(),
            k.fingerprint().to_string()
        );
        assert!(matches!(
            write_new_swarm_key(&p),
            Err(IdentityError::Exists { .. })
        ));
        fs::write(&p, "not a key").unwrap();
        assert!(read_swarm_key(&p).is_err());
        fs::remove_dir_all(&d).unwrap();
    }
}
