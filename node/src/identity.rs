//! What a node keeps on disk in its data dir: its libp2p identity (`identity.key`, mode
//! 0600), its incarnation counter (`incarnation`), and where it listens (`api.addr`,
//! `listen.addrs`, written for `shoal local` and scripts). Also the private-network swarm key,
//! and the lock (`lock`) that keeps a second node off a data dir in use.
//!
//! The identity key is created once and never replaced: whoever creates it first (a node
//! starting, `shoal keygen`, racing each other) wins, and everyone else reads the winner's
//! key, so a running node's id is always the one its `identity.key` holds.

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
/// File (in the data dir) holding the address the serving listener (`--serve-listen`) is
/// bound to, once it is.
pub const SERVE_ADDR_FILE: &str = "serve.addr";
/// File the node writes with its control-plane listen addresses (one per line, with /p2p).
pub const LISTEN_ADDRS_FILE: &str = "listen.addrs";
/// File a running node holds an exclusive `flock` on (and writes its pid into).
pub const LOCK_FILE: &str = "lock";

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
    /// Another process (a running node) holds the data dir's lock.
    #[error("data dir {dir} is in use by another shoal node{}", pid_note(.pid))]
    Locked {
        /// The data dir.
        dir: PathBuf,
        /// The holder's pid, as it wrote it into the lock file (if readable).
        pid: Option<u32>,
    },
    /// `keygen` refuses to overwrite an existing swarm key.
    #[error("{path} already exists; refusing to overwrite a swarm key")]
    Exists {
        /// The existing file.
        path: PathBuf,
    },
}

/// ` (pid N)` where the lock's holder is known.
fn pid_note(pid: &Option<u32>) -> String {
    pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
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
///
/// The key file is never replaced: a new key is written to a temporary file and linked
/// into place only where no key file exists yet; whoever loses that race (another node
/// starting, `shoal keygen`) reads the key that won. Every caller therefore returns the
/// key the file holds.
pub fn load_or_create_identity(dir: &Path) -> Result<Keypair, IdentityError> {
    ensure_dir(dir)?;
    let path = dir.join(KEY_FILE);
    if let Some(key) = read_identity(&path)? {
        return Ok(key);
    }
    let key = Keypair::generate_ed25519();
    let bytes = key
        .to_protobuf_encoding()
        .expect("ed25519 keys always encode");
    create_exclusive(&path, &bytes, 0o600)?;
    // Ours or a racer's: the file decides.
    read_identity(&path)?.ok_or_else(|| {
        io(&path)(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            "the key file vanished just after it was created",
        ))
    })
}

/// The key in `path`, or `None` where there is no such file.
fn read_identity(path: &Path) -> Result<Option<Keypair>, IdentityError> {
    let bytes = match fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(path)(e)),
    };
    let key = Keypair::from_protobuf_encoding(&bytes).map_err(|e| IdentityError::MalformedKey {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let meta = fs::metadata(path).map_err(io(path))?;
    if meta.permissions().mode() & 0o077 != 0 {
        tracing::warn!(path = %path.display(), "key file was readable by others; setting mode 0600");
        fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(io(path))?;
    }
    Ok(Some(key))
}

/// Writes `bytes` to `path` (with `mode`) unless `path` exists: a complete temporary file
/// (fsynced) is hard-linked into place, so a reader never sees a partial file and an
/// existing one is never replaced. Returns whether this call created it.
pub fn create_exclusive(path: &Path, bytes: &[u8], mode: u32) -> Result<bool, IdentityError> {
    // Unique per caller: racing threads of one process must not share a temporary file.
    let tmp = path.with_extension(format!(
        "tmp.{}.{:016x}",
        std::process::id(),
        rand::random::<u64>()
    ));
    let written = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()
    })();
    let linked = written
        .map_err(io(&tmp))
        .and_then(|()| match fs::hard_link(&tmp, path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(io(path)(e)),
        });
    let _ = fs::remove_file(&tmp);
    linked
}

/// An exclusive advisory lock on a data dir (`flock` on its `lock` file), held while this
/// value lives; the kernel releases it however the process ends.
#[derive(Debug)]
pub struct DataDirLock {
    _file: fs::File,
}

/// Locks `dir` (created if needed) for this process, or fails with
/// [`IdentityError::Locked`] at once where another process holds it. Writes this process's
/// pid into the lock file for the message the next one gets.
pub fn lock_data_dir(dir: &Path) -> Result<DataDirLock, IdentityError> {
    use std::os::fd::AsRawFd;
    ensure_dir(dir)?;
    let path = dir.join(LOCK_FILE);
    let mut file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(&path)
        .map_err(io(&path))?;
    // SAFETY: flock on a descriptor this function owns for the call's duration.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let pid = fs::read_to_string(&path)
                .ok()
                .and_then(|s| s.trim().parse().ok());
            return Err(IdentityError::Locked {
                dir: dir.to_path_buf(),
                pid,
            });
        }
        return Err(io(&path)(e));
    }
    file.set_len(0).map_err(io(&path))?;
    file.write_all(format!("{}\n", std::process::id()).as_bytes())
        .map_err(io(&path))?;
    Ok(DataDirLock { _file: file })
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

/// Writes a fresh random swarm key to `path` (mode 0600); refuses to overwrite, also when
/// another writer creates the file meanwhile.
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
    if !create_exclusive(path, format!("{key}\n").as_bytes(), 0o600)? {
        return Err(IdentityError::Exists {
            path: path.to_path_buf(),
        });
    }
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
    fn racing_creators_all_end_with_the_key_in_the_file() {
        for round in 0..20 {
            let d = tmpdir(&format!("race-{round}"));
            let barrier = std::sync::Arc::new(std::sync::Barrier::new(8));
            let ids: Vec<_> = (0..8)
                .map(|_| {
                    let (d, barrier) = (d.clone(), barrier.clone());
                    std::thread::spawn(move || {
                        barrier.wait();
                        load_or_create_identity(&d).unwrap().public().to_peer_id()
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|t| t.join().unwrap())
                .collect();
            let on_disk = Keypair::from_protobuf_encoding(&fs::read(d.join(KEY_FILE)).unwrap())
                .unwrap()
                .public()
                .to_peer_id();
            assert!(
                ids.iter().all(|id| *id == on_disk),
                "round {round}: {ids:?} vs {on_disk}"
            );
            // No temporary file is left behind.
            let left: Vec<_> = fs::read_dir(&d)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert_eq!(
                left,
                vec![std::ffi::OsString::from(KEY_FILE)],
                "round {round}"
            );
            fs::remove_dir_all(&d).unwrap();
        }
    }

    #[test]
    fn create_exclusive_never_replaces() {
        let d = tmpdir("excl");
        ensure_dir(&d).unwrap();
        let p = d.join("f");
        assert!(create_exclusive(&p, b"first", 0o600).unwrap());
        assert!(!create_exclusive(&p, b"second", 0o600).unwrap());
        assert_eq!(fs::read(&p).unwrap(), b"first");
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_locked_data_dir_refuses_a_second_lock_until_released() {
        let d = tmpdir("lock");
        let held = lock_data_dir(&d).unwrap();
        // flock locks belong to the open file: a second open in this process conflicts too.
        match lock_data_dir(&d) {
            Err(IdentityError::Locked { pid, .. }) => assert_eq!(pid, Some(std::process::id())),
            other => panic!("expected Locked, got {other:?}"),
        }
        drop(held);
        let again = lock_data_dir(&d).unwrap();
        drop(again);
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
