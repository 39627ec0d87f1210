//! The token cache: a tokenized dataset on disk, read back a sequence at a time.
//!
//! A dataset's two token streams (training and held-out) are written once per machine to
//! `<run dir>/data/tokens-<key>.train` and `.eval`, each a run of little-endian `u32`
//! entries: bits 0-30 the token id, bit 31 the loss mask. `tokens-<key>.json` is written
//! last and names the key and the entry counts; a cache is used only when it names the
//! same key (SHA-256 of the format, the data keys, the inputs' paths, sizes and
//! modification times, the split, and the tokenizer's files) and the files have the
//! lengths it names. Local members of one job share the run dir: the first to take the
//! lock file `tokens-<key>.lock` (`flock`) builds the cache into temporary files and
//! renames them into place; the others wait on the lock and then open what it built. A
//! file rewritten in place with the same size and modification time is not noticed.

use super::DataError;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

/// Bumped when the cache's layout or the tokenization changes.
pub const FORMAT: u32 = 1;
/// The loss-mask bit of an entry.
pub const MASK_BIT: u32 = 1 << 31;
/// Buffer of each stream being written. 1 MiB.
const WRITE_BUFFER: usize = 1 << 20;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |source| DataError::Read {
        path: path.display().to_string(),
        source,
    }
}

/// One cached token stream, read by positioned reads (no state shared between reads).
#[derive(Debug)]
pub struct TokenFile {
    file: File,
    path: PathBuf,
    tokens: u64,
}

impl TokenFile {
    /// Entries in the stream.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// Entries `start..start + n` into `out` (replacing its contents).
    pub fn read(&self, start: u64, n: usize, out: &mut Vec<u32>) -> Result<(), DataError> {
        if start + n as u64 > self.tokens {
            return Err(super::format_err(
                &self.path,
                format!(
                    "entries {start}..{} past the end ({})",
                    start + n as u64,
                    self.tokens
                ),
            ));
        }
        let mut bytes = vec![0u8; n * 4];
        self.file
            .read_exact_at(&mut bytes, start * 4)
            .map_err(io_err(&self.path))?;
        out.clear();
        out.extend(
            bytes
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        );
        Ok(())
    }
}

/// A token stream being written.
pub struct Writer {
    out: BufWriter<File>,
    path: PathBuf,
    tokens: u64,
}

impl Writer {
    fn create(path: PathBuf) -> Result<Writer, DataError> {
        let f = File::create(&path).map_err(io_err(&path))?;
        Ok(Writer {
            out: BufWriter::with_capacity(WRITE_BUFFER, f),
            path,
            tokens: 0,
        })
    }

    /// Appends token `id` (below 2^31) with loss mask `mask`.
    pub fn push(&mut self, id: u32, mask: bool) -> Result<(), DataError> {
        let e = (id & !MASK_BIT) | if mask { MASK_BIT } else { 0 };
        self.out
            .write_all(&e.to_le_bytes())
            .map_err(io_err(&self.path))?;
        self.tokens += 1;
        Ok(())
    }

    fn finish(self) -> Result<u64, DataError> {
        let f = self
            .out
            .into_inner()
            .map_err(|e| io_err(&self.path)(e.into_error()))?;
        f.sync_all().map_err(io_err(&self.path))?;
        Ok(self.tokens)
    }
}

/// The two streams of a cached dataset.
#[derive(Debug)]
pub struct Cached {
    /// The training stream.
    pub train: TokenFile,
    /// The held-out stream.
    pub eval: TokenFile,
}

#[derive(serde::Serialize, serde::Deserialize, PartialEq)]
struct Meta {
    format: u32,
    key: String,
    train_tokens: u64,
    eval_tokens: u64,
}

/// An exclusive `flock` on a file, released when dropped (the file closes).
struct Lock(#[allow(dead_code)] File);

impl Lock {
    fn take(path: &Path) -> Result<Lock, DataError> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(io_err(path))?;
        loop {
            // SAFETY: flock on a file descriptor this function owns.
            let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
            if rc == 0 {
                return Ok(Lock(f));
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(io_err(path)(e));
            }
        }
    }
}

/// The cache of key `key` in `dir`: opened when a complete one is there, else built by
/// `build` (which writes the training and held-out streams) and then opened.
pub fn open_or_build(
    dir: &Path,
    key: &[u8; 32],
    build: &mut dyn FnMut(&mut Writer, &mut Writer) -> Result<(), DataError>,
) -> Result<Cached, DataError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir))?;
    let hex = hex::encode(key);
    let stem = dir.join(format!("tokens-{}", &hex[..16]));
    let with = |ext: &str| PathBuf::from(format!("{}.{ext}", stem.display()));
    let _lock = Lock::take(&with("lock"))?;
    if let Some(c) = open(&with("json"), &with("train"), &with("eval"), &hex)? {
        return Ok(c);
    }
    let tmp = |ext: &str| {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        with(&format!("{ext}.tmp-{}-{nanos}", std::process::id()))
    };
    let (tt, te) = (tmp("train"), tmp("eval"));
    let result = (|| {
        let mut train = Writer::create(tt.clone())?;
        let mut eval = Writer::create(te.clone())?;
        build(&mut train, &mut eval)?;
        let meta = Meta {
            format: FORMAT,
            key: hex.clone(),
            train_tokens: train.finish()?,
            eval_tokens: eval.finish()?,
        };
        std::fs::rename(&tt, with("train")).map_err(io_err(&tt))?;
        std::fs::rename(&te, with("eval")).map_err(io_err(&te))?;
        let tm = tmp("json");
        let text = serde_json::to_vec(&meta).expect("meta serializes");
        std::fs::write(&tm, text).map_err(io_err(&tm))?;
        std::fs::rename(&tm, with("json")).map_err(io_err(&tm))?;
        Ok::<(), DataError>(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_file(&tt);
        let _ = std::fs::remove_file(&te);
        return Err(e);
    }
    open(&with("json"), &with("train"), &with("eval"), &hex)?.ok_or_else(|| {
        super::format_err(
            &with("json"),
            "the token cache just written does not verify",
        )
    })
}

/// A complete cache of key `hex`, or `None` when missing, stale or incomplete.
fn open(meta: &Path, train: &Path, eval: &Path, hex: &str) -> Result<Option<Cached>, DataError> {
    let Ok(bytes) = std::fs::read(meta) else {
        return Ok(None);
    };
    let Ok(m) = serde_json::from_slice::<Meta>(&bytes) else {
        return Ok(None);
    };
    if m.format != FORMAT || m.key != hex {
        return Ok(None);
    }
    let file = |p: &Path, tokens: u64| -> Result<Option<TokenFile>, DataError> {
        let Ok(f) = File::open(p) else {
            return Ok(None);
        };
        let len = f.metadata().map_err(io_err(p))?.len();
        Ok((len == tokens * 4).then(|| TokenFile {
            file: f,
            path: p.to_path_buf(),
            tokens,
        }))
    };
    match (file(train, m.train_tokens)?, file(eval, m.eval_tokens)?) {
        (Some(train), Some(eval)) => Ok(Some(Cached { train, eval })),
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_once_then_reuses_and_reads_back() {
        let dir = std::env::temp_dir().join(format!("shoal-cache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let key = [7u8; 32];
        let builds = std::cell::Cell::new(0);
        let mut build = |t: &mut Writer, e: &mut Writer| {
            builds.set(builds.get() + 1);
            for i in 0..10u32 {
                t.push(i, i % 2 == 0)?;
            }
            e.push(42, false)?;
            Ok(())
        };
        let c = open_or_build(&dir, &key, &mut build).unwrap();
        assert_eq!((c.train.tokens(), c.eval.tokens()), (10, 1));
        let mut v = Vec::new();
        c.train.read(3, 4, &mut v).unwrap();
        assert_eq!(v, vec![3, 4 | MASK_BIT, 5, 6 | MASK_BIT]);
        assert!(c.train.read(8, 4, &mut v).is_err());
        drop(c);
        let c = open_or_build(&dir, &key, &mut build).unwrap();
        assert_eq!(c.eval.tokens(), 1);
        assert_eq!(builds.get(), 1);
        // A truncated stream is rebuilt; another key builds its own.
        std::fs::write(
            dir.join(format!("tokens-{}.train", &hex::encode(key)[..16])),
            b"x",
        )
        .unwrap();
        open_or_build(&dir, &key, &mut build).unwrap();
        open_or_build(&dir, &[8u8; 32], &mut build).unwrap();
        assert_eq!(builds.get(), 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
