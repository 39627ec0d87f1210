//! The model registry: the models this node knows of, who holds them, and their files.
//!
//! A model enters by an offer here ([`Server::offer`]: the file is described and hashed)
//! or by a member's announcement ([`Server::on_announce`]); a node that hears of a model
//! it does not hold fetches the file from the members that announced it, in
//! [`FETCH_CHUNK`] pieces over stage calls, checks its SHA-256 and from then on announces
//! it too. Holders that stopped announcing for 10 s are not planned on (`plan`).

use super::manifest::{self, sha256_file, Manifest, MAX_MANIFEST_BYTES};
use super::plan::SpeedMeter;
use super::row::Row;
use super::{ModelReport, ServeError, Server, FETCH_CHUNK};
use crate::models::config::{self, ModelConfig};
use crate::text::{TextError, Tokenizer};
use coordinator_free::codec::stage::{StageReply, StageRequest};
use coordinator_free::codec::ServeAnnounce;
use coordinator_free::NodeId;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

/// A model this node knows of.
pub(super) struct ModelEntry {
    /// The announcement it was first heard by (name, hash, size, config, stages).
    pub(super) announce: ServeAnnounce,
    pub(super) cfg: ModelConfig,
    /// The local file (or `hf` folder) once held (fetched and verified, or offered here).
    pub(super) path: Option<PathBuf>,
    /// An `hf` folder's manifest, once held.
    pub(super) folder: Option<Arc<Folder>>,
    /// An `hf` folder's tokenizer, once held, when it has `tokenizer.json`.
    pub(super) tokenizer: Option<Tokenizer>,
    /// Members that announced holding it, when last heard.
    pub(super) holders: HashMap<NodeId, Instant>,
    /// What members last announced measuring its stages at (work per second), when not 0.
    pub(super) measured: HashMap<NodeId, u64>,
    /// This node's own measurement of its stages of it.
    pub(super) meter: SpeedMeter,
    /// Whether a fetch of the file is under way.
    fetching: bool,
    /// The queue of its completions dispatcher, once started (`lanes`).
    pub(super) dispatcher: Option<mpsc::Sender<Row>>,
}

impl ModelEntry {
    /// A model first heard of by `announce`, not held yet.
    fn new(announce: ServeAnnounce, cfg: ModelConfig) -> ModelEntry {
        ModelEntry {
            announce,
            cfg,
            path: None,
            folder: None,
            tokenizer: None,
            holders: HashMap::new(),
            measured: HashMap::new(),
            meter: SpeedMeter::default(),
            fetching: false,
            dispatcher: None,
        }
    }
}

/// A model hash as hex, as logs and status show it.
fn hex32(h: &[u8; 32]) -> String {
    hex::encode(h)
}

/// A held folder's manifest and its canonical bytes (what `Fetch` of the model's hash
/// answers).
pub(super) struct Folder {
    pub(super) manifest: Manifest,
    pub(super) bytes: Vec<u8>,
}

/// The tokenizer of the `hf` folder `dir`, when it has `tokenizer.json`.
pub(super) fn load_tokenizer(dir: &Path) -> Result<Option<Tokenizer>, TextError> {
    if !dir.join("tokenizer.json").is_file() {
        return Ok(None);
    }
    Tokenizer::load(dir).map(Some)
}

/// What a hash a member asks for resolves to here.
pub(super) enum Blob {
    /// A model file, or a file of a held folder.
    File(PathBuf),
    /// A held folder's manifest.
    Manifest(Arc<Folder>),
}

/// Where a fetch writes its chunks.
enum Sink {
    Memory(Vec<u8>),
    File(tokio::fs::File),
}

/// Where an offered PEFT adapter folder's merge with its base is written, inside the
/// adapter folder. `merged`.
pub const MERGED_DIR: &str = "merged";

impl Server {
    /// Offers the model file at `path` under `name`, served with at least `stages`
    /// stages per replica; a Hugging Face folder computing in `dtype` (`auto`: for this
    /// node's device) with a context of `context` tokens (default: the config's,
    /// [`crate::models::hf::config::DEFAULT_SERVE_CONTEXT`] at most); a PEFT adapter
    /// folder is merged into its base first (into `<adapter>/merged/`). Returns the
    /// announcement to publish.
    pub fn offer(
        &self,
        path: &Path,
        name: &str,
        stages: u32,
        dtype: crate::models::hf::ServeDtype,
        context: Option<u32>,
    ) -> Result<ServeAnnounce, ServeError> {
        let offer_err = |reason: String| ServeError::Offer {
            path: path.display().to_string(),
            reason,
        };
        // A PEFT adapter is served merged into its base, as a model folder beside it.
        let merged;
        let path = if crate::models::hf::export::is_adapter(path) {
            merged = path.join(MERGED_DIR);
            crate::models::hf::export::merge_adapter(path, &merged)
                .map_err(|e| offer_err(e.to_string()))?;
            merged.as_path()
        } else {
            path
        };
        let hf = config::HfServe {
            dtype,
            context,
            device: self.inner.cfg.device,
        };
        let cfg = config::describe_with(path, hf).map_err(|e| offer_err(e.to_string()))?;
        // A folder travels as its manifest: the announced hash and size are the manifest's.
        let folder = if cfg.kind == "hf" {
            let manifest = Manifest::build(path).map_err(|e| offer_err(e.to_string()))?;
            let bytes = manifest.to_bytes();
            Some(Arc::new(Folder { manifest, bytes }))
        } else {
            None
        };
        let tokenizer = match &folder {
            Some(_) => load_tokenizer(path).map_err(|e| offer_err(e.to_string()))?,
            None => None,
        };
        let (sha256, bytes) = match &folder {
            Some(f) => (Sha256::digest(&f.bytes).into(), f.bytes.len() as u64),
            None => sha256_file(path).map_err(|e| offer_err(e.to_string()))?,
        };
        let config = serde_json::to_string(&cfg).map_err(|e| offer_err(e.to_string()))?;
        let a = ServeAnnounce {
            name: name.to_string(),
            sha256,
            bytes,
            origin: self.inner.me.clone(),
            config,
            stages,
            speed: 0,
        };
        // The codec's checks (name, sizes) before anything is kept.
        coordinator_free::ControlMessage::Serve(a.clone())
            .encode()
            .and_then(|b| coordinator_free::ControlMessage::decode(&b))
            .map_err(|e| offer_err(e.to_string()))?;
        let mut models = self.inner.models.lock().unwrap();
        if let Some(old) = models.get(name) {
            if old.announce.sha256 != sha256 {
                return Err(offer_err(format!(
                    "another model is already served as `{name}`"
                )));
            }
        }
        let entry = models
            .entry(name.to_string())
            .or_insert_with(|| ModelEntry::new(a.clone(), cfg.clone()));
        entry.path = Some(path.to_path_buf());
        entry.folder = folder;
        entry.tokenizer = tokenizer;
        entry.holders.insert(self.inner.me.clone(), Instant::now());
        tracing::info!(model = name, kind = %cfg.kind, layers = cfg.layers, sha256 = %hex32(&sha256), "serving model");
        Ok(a)
    }

    /// A member announced that it holds a model. Starts fetching it if this node does not
    /// hold it yet.
    pub fn on_announce(&self, a: ServeAnnounce, from: NodeId) {
        let cfg: ModelConfig = match serde_json::from_str(&a.config) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(peer = %from, "ignored model announcement: bad config: {e}");
                return;
            }
        };
        if let Err(e) = cfg.validate() {
            tracing::warn!(peer = %from, "ignored model announcement: {e}");
            return;
        }
        if cfg.kind == "hf" && a.bytes > MAX_MANIFEST_BYTES {
            tracing::warn!(peer = %from, "ignored model announcement: a manifest of {} bytes", a.bytes);
            return;
        }
        let folder = cfg.kind == "hf";
        let start_fetch = {
            let mut models = self.inner.models.lock().unwrap();
            let entry = models
                .entry(a.name.clone())
                .or_insert_with(|| ModelEntry::new(a.clone(), cfg));
            if entry.announce.sha256 != a.sha256 {
                tracing::warn!(peer = %from, model = %a.name, "ignored announcement of another model under a served name");
                return;
            }
            entry.holders.insert(from.clone(), Instant::now());
            if a.speed > 0 {
                entry.measured.insert(from, a.speed);
            }
            let start = entry.path.is_none() && !entry.fetching;
            if start {
                entry.fetching = true;
            }
            start
        };
        if start_fetch {
            let s = self.clone();
            tokio::spawn(async move { s.fetch(a, folder).await });
        }
    }

    /// Announcements of the models this node holds (re-published every 2 s), each with
    /// the speed this node measured computing its stages of it.
    pub fn announcements(&self) -> Vec<ServeAnnounce> {
        self.inner
            .models
            .lock()
            .unwrap()
            .values()
            .filter(|e| e.path.is_some())
            .map(|e| ServeAnnounce {
                origin: self.inner.me.clone(),
                speed: e.meter.speed(),
                ..e.announce.clone()
            })
            .collect()
    }

    /// Counts a decode call of the model with hash `model` that computed `work` (the
    /// planner's unit) in `secs` here.
    pub(super) fn measured_call(&self, model: &[u8; 32], work: f64, secs: f64) {
        let mut models = self.inner.models.lock().unwrap();
        if let Some(e) = models.values_mut().find(|e| &e.announce.sha256 == model) {
            e.meter.record(work, secs);
        }
    }

    /// Fetches a model (a file, or an `hf` folder through its manifest) from its holders,
    /// verifies it and starts holding it.
    async fn fetch(&self, a: ServeAnnounce, folder: bool) {
        let dir = self.inner.cfg.models_dir.clone();
        let dst = dir.join(hex32(&a.sha256));
        let mut attempt = 0u32;
        let held = loop {
            if !folder && sha256_file(&dst).is_ok_and(|(h, _)| h == a.sha256) {
                break None;
            }
            let holders: Vec<NodeId> = {
                let models = self.inner.models.lock().unwrap();
                let Some(e) = models.get(&a.name) else { return };
                let mut v: Vec<NodeId> = e
                    .holders
                    .keys()
                    .filter(|h| **h != self.inner.me)
                    .cloned()
                    .collect();
                v.sort_by_key(|h| *h != a.origin);
                v
            };
            let mut got = None;
            for h in holders {
                let r = if folder {
                    self.fetch_folder(&h, &a, &dir).await.map(Some)
                } else {
                    let tmp = dst.with_extension("part");
                    self.fetch_file(&h, &a.sha256, a.bytes, &tmp, &dst)
                        .await
                        .map(|()| None)
                };
                match r {
                    Ok(f) => {
                        got = Some(f);
                        break;
                    }
                    Err(e) => tracing::warn!(peer = %h, model = %a.name, "fetch failed: {e}"),
                }
            }
            if let Some(f) = got {
                break f;
            }
            attempt += 1;
            let wait = Duration::from_millis(200 * u64::from(attempt.min(10)));
            tokio::time::sleep(wait).await;
        };
        let tokenizer = match held {
            Some(_) => load_tokenizer(&dst).unwrap_or_else(|e| {
                tracing::warn!(model = %a.name, "no tokenizer: {e}");
                None
            }),
            None => None,
        };
        let mut models = self.inner.models.lock().unwrap();
        if let Some(e) = models.get_mut(&a.name) {
            e.path = Some(dst);
            e.folder = held;
            e.tokenizer = tokenizer;
            e.fetching = false;
            e.holders.insert(self.inner.me.clone(), Instant::now());
            tracing::info!(model = %a.name, bytes = a.bytes, "model fetched and verified");
        }
    }

    /// Fetches the `hf` folder of `a` from `peer`: its manifest (by the model's hash),
    /// then each file it lists by its own hash, each checked, assembled in
    /// `<dir>/<hash>.part/` and renamed to `<dir>/<hash>/` once all are there and the
    /// folder describes as announced. Files already there and verified are kept; the
    /// files missing must fit on the disk first.
    async fn fetch_folder(
        &self,
        peer: &NodeId,
        a: &ServeAnnounce,
        dir: &Path,
    ) -> Result<Arc<Folder>, String> {
        let bytes = match self
            .fetch_chunks(peer, &a.sha256, a.bytes, Sink::Memory(Vec::new()))
            .await?
        {
            Sink::Memory(b) => b,
            Sink::File(_) => unreachable!("fetched into memory"),
        };
        let manifest = Manifest::parse(&bytes).map_err(|e| e.to_string())?;
        let hex = hex32(&a.sha256);
        let done = dir.join(&hex);
        let folder = Arc::new(Folder { manifest, bytes });
        if done.is_dir() && folder.manifest.verify(&done).is_ok() {
            return Ok(folder);
        }
        let part = dir.join(format!("{hex}.part"));
        let tmp = dir.join(format!("{hex}.file.part"));
        std::fs::create_dir_all(&part).map_err(|e| format!("{}: {e}", part.display()))?;
        // The sizes a peer announced are bounded by the disk before anything is fetched
        // (with 1% or 64 MiB to spare, whichever is more).
        let need = folder.manifest.missing_bytes(&part);
        if let Some(free) = manifest::free_bytes(&part) {
            let spare = (free / 100).max(64 << 20);
            if need.saturating_add(spare) > free {
                return Err(format!(
                    "the folder needs {need} more bytes; {} has {free} free",
                    part.display()
                ));
            }
        }
        for f in &folder.manifest.files {
            manifest::check_name(&f.name)?;
            let dst = part.join(&f.name);
            if sha256_file(&dst).is_ok_and(|(h, n)| h == f.digest() && n == f.bytes) {
                continue;
            }
            self.fetch_file(peer, &f.digest(), f.bytes, &tmp, &dst)
                .await
                .map_err(|e| format!("{}: {e}", f.name))?;
        }
        // The files must be the model announced (a peer could announce one config and
        // send another folder).
        let announced: ModelConfig = serde_json::from_str(&a.config).map_err(|e| e.to_string())?;
        let hf = config::HfServe {
            dtype: announced
                .dtype
                .as_deref()
                .unwrap_or("f32")
                .parse()
                .map_err(|e: String| e)?,
            context: Some(announced.context),
            device: tch::Device::Cpu,
        };
        let got = config::describe_with(&part, hf).map_err(|e| e.to_string())?;
        if got != announced {
            return Err("the folder does not describe as announced".into());
        }
        if done.exists() {
            std::fs::remove_dir_all(&done).map_err(|e| format!("{}: {e}", done.display()))?;
        }
        std::fs::rename(&part, &done).map_err(|e| format!("{}: {e}", done.display()))?;
        Ok(folder)
    }

    /// Fetches `bytes` bytes of the blob with hash `hash` from `peer` into `dst` (through
    /// `tmp`), checking its size and SHA-256 before it takes the final name.
    async fn fetch_file(
        &self,
        peer: &NodeId,
        hash: &[u8; 32],
        bytes: u64,
        tmp: &Path,
        dst: &Path,
    ) -> Result<(), String> {
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
        }
        let file = tokio::fs::File::create(tmp)
            .await
            .map_err(|e| e.to_string())?;
        match self.fetch_chunks(peer, hash, bytes, Sink::File(file)).await {
            Ok(_) => std::fs::rename(tmp, dst).map_err(|e| e.to_string()),
            Err(e) => {
                let _ = std::fs::remove_file(tmp);
                Err(e)
            }
        }
    }

    /// Fetches the `bytes` bytes of the blob with hash `hash` from `peer` in
    /// [`FETCH_CHUNK`] pieces into `sink`; an error unless every chunk came whole and the
    /// SHA-256 matches.
    async fn fetch_chunks(
        &self,
        peer: &NodeId,
        hash: &[u8; 32],
        bytes: u64,
        mut sink: Sink,
    ) -> Result<Sink, String> {
        let mut h = Sha256::new();
        let mut offset = 0u64;
        while offset < bytes {
            let len = FETCH_CHUNK.min(bytes - offset);
            let req = StageRequest::Fetch {
                model: *hash,
                offset,
                len,
            };
            let (reply, chunk) = self
                .call_remote(peer, &req, &[])
                .await
                .map_err(|e| e.to_string())?;
            match reply {
                StageReply::Ok { .. } if chunk.len() as u64 == len => {}
                StageReply::Ok { .. } => return Err(format!("short chunk at {offset}")),
                StageReply::Err(e) | StageReply::Rejected(e) => return Err(e),
            }
            h.update(&chunk);
            match &mut sink {
                Sink::Memory(v) => v.extend_from_slice(&chunk),
                Sink::File(f) => f.write_all(&chunk).await.map_err(|e| e.to_string())?,
            }
            offset += len;
        }
        if let Sink::File(f) = &mut sink {
            f.sync_all().await.map_err(|e| e.to_string())?;
        }
        let got: [u8; 32] = h.finalize().into();
        if &got != hash {
            return Err("SHA-256 mismatch".into());
        }
        Ok(sink)
    }

    /// Models as status reports them.
    pub fn report(&self) -> Vec<ModelReport> {
        let names: Vec<String> = self.inner.models.lock().unwrap().keys().cloned().collect();
        names
            .into_iter()
            .filter_map(|name| {
                let plan = self.plan(&name);
                let models = self.inner.models.lock().unwrap();
                let e = models.get(&name)?;
                let mut holders: Vec<String> = e.holders.keys().map(|h| h.to_string()).collect();
                holders.sort();
                let mut measured: std::collections::BTreeMap<String, u64> = e
                    .measured
                    .iter()
                    .map(|(h, v)| (h.to_string(), *v))
                    .collect();
                if e.meter.speed() > 0 {
                    measured.insert(self.inner.me.to_string(), e.meter.speed());
                }
                let (replicas, plan_error) = match plan {
                    Ok(p) => (
                        p.replicas
                            .iter()
                            .map(|r| {
                                r.iter()
                                    .map(|s| {
                                        format!(
                                            "{}[{}..{}]",
                                            s.member, s.layers.start, s.layers.end
                                        )
                                    })
                                    .collect()
                            })
                            .collect(),
                        None,
                    ),
                    Err(e) => (vec![], Some(e.to_string())),
                };
                Some(ModelReport {
                    name: name.clone(),
                    kind: e.cfg.kind.clone(),
                    sha256: hex32(&e.announce.sha256),
                    held: e.path.is_some(),
                    holders,
                    measured,
                    replicas,
                    plan_error,
                })
            })
            .collect()
    }

    /// Served models: (name, config).
    pub fn models(&self) -> Vec<(String, ModelConfig)> {
        self.inner
            .models
            .lock()
            .unwrap()
            .iter()
            .map(|(n, e)| (n.clone(), e.cfg.clone()))
            .collect()
    }

    /// The announcement and config of the model served as `name`.
    pub(super) fn model_for_request(
        &self,
        name: &str,
    ) -> Result<(ServeAnnounce, ModelConfig), ServeError> {
        let models = self.inner.models.lock().unwrap();
        let e = models
            .get(name)
            .ok_or_else(|| ServeError::UnknownModel(name.to_string()))?;
        Ok((e.announce.clone(), e.cfg.clone()))
    }

    /// The tokenizer of the model served as `name` (an `hf` folder with `tokenizer.json`,
    /// once held here), and whether it is held here.
    pub(super) fn tokenizer_of(&self, name: &str) -> (Option<Tokenizer>, bool) {
        let models = self.inner.models.lock().unwrap();
        models
            .get(name)
            .map(|e| (e.tokenizer.clone(), e.path.is_some()))
            .unwrap_or((None, false))
    }

    /// The folder of the model served as `name`, when it is an `hf` folder held here.
    pub(super) fn folder_of(&self, name: &str) -> Result<Option<PathBuf>, ServeError> {
        let models = self.inner.models.lock().unwrap();
        let e = models
            .get(name)
            .ok_or_else(|| ServeError::UnknownModel(name.to_string()))?;
        Ok(e.folder.as_ref().and(e.path.clone()))
    }

    /// What the hash `h` resolves to here: a held model's file, a held folder's manifest
    /// (the model's hash) or one of its files (by the file's hash).
    pub(super) fn blob(&self, h: &[u8; 32]) -> Option<Blob> {
        let models = self.inner.models.lock().unwrap();
        for e in models.values() {
            let Some(path) = &e.path else { continue };
            match &e.folder {
                Some(f) if &e.announce.sha256 == h => return Some(Blob::Manifest(f.clone())),
                Some(f) => {
                    if let Some(file) = f.manifest.file_by_hash(h) {
                        return Some(Blob::File(path.join(&file.name)));
                    }
                }
                None if &e.announce.sha256 == h => return Some(Blob::File(path.clone())),
                None => {}
            }
        }
        None
    }
}
