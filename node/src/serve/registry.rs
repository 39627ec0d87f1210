//! The model registry: the models this node knows of, who holds them, and their files.
//!
//! A model enters by an offer here ([`Server::offer`]: the file is described and hashed)
//! or by a member's announcement ([`Server::on_announce`]); a node that hears of a model
//! it does not hold fetches the file from the members that announced it, in
//! [`FETCH_CHUNK`] pieces over stage calls, checks its SHA-256 and from then on announces
//! it too. Holders that stopped announcing for 10 s are not planned on (`plan`).

use super::row::Row;
use super::{ModelReport, ServeError, Server, FETCH_CHUNK};
use crate::models::config::{self, ModelConfig};
use coordinator_free::codec::stage::{StageReply, StageRequest};
use coordinator_free::codec::ServeAnnounce;
use coordinator_free::NodeId;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

/// A model this node knows of.
pub(super) struct ModelEntry {
    /// The announcement it was first heard by (name, hash, size, config, stages).
    pub(super) announce: ServeAnnounce,
    pub(super) cfg: ModelConfig,
    /// The local file once held (fetched and verified, or offered here).
    pub(super) path: Option<PathBuf>,
    /// Members that announced holding it, when last heard.
    pub(super) holders: HashMap<NodeId, Instant>,
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
            holders: HashMap::new(),
            fetching: false,
            dispatcher: None,
        }
    }
}

/// A model hash as hex, as logs and status show it.
fn hex32(h: &[u8; 32]) -> String {
    hex::encode(h)
}

/// The SHA-256 and size of the file at `path`.
fn sha256_file(path: &Path) -> std::io::Result<([u8; 32], u64)> {
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

impl Server {
    /// Offers the model file at `path` under `name`, served with at least `stages`
    /// stages per replica. Returns the announcement to publish.
    pub fn offer(&self, path: &Path, name: &str, stages: u32) -> Result<ServeAnnounce, ServeError> {
        let offer_err = |reason: String| ServeError::Offer {
            path: path.display().to_string(),
            reason,
        };
        let cfg = config::describe(path).map_err(|e| offer_err(e.to_string()))?;
        let (sha256, bytes) = sha256_file(path).map_err(|e| offer_err(e.to_string()))?;
        let config = serde_json::to_string(&cfg).map_err(|e| offer_err(e.to_string()))?;
        let a = ServeAnnounce {
            name: name.to_string(),
            sha256,
            bytes,
            origin: self.inner.me.clone(),
            config,
            stages,
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
        let start_fetch = {
            let mut models = self.inner.models.lock().unwrap();
            let entry = models
                .entry(a.name.clone())
                .or_insert_with(|| ModelEntry::new(a.clone(), cfg));
            if entry.announce.sha256 != a.sha256 {
                tracing::warn!(peer = %from, model = %a.name, "ignored announcement of another model under a served name");
                return;
            }
            entry.holders.insert(from, Instant::now());
            let start = entry.path.is_none() && !entry.fetching;
            if start {
                entry.fetching = true;
            }
            start
        };
        if start_fetch {
            let s = self.clone();
            tokio::spawn(async move { s.fetch(a).await });
        }
    }

    /// Announcements of the models this node holds (re-published every 2 s).
    pub fn announcements(&self) -> Vec<ServeAnnounce> {
        self.inner
            .models
            .lock()
            .unwrap()
            .values()
            .filter(|e| e.path.is_some())
            .map(|e| ServeAnnounce {
                origin: self.inner.me.clone(),
                ..e.announce.clone()
            })
            .collect()
    }

    /// Fetches a model file from its holders, verifies it and starts holding it.
    async fn fetch(&self, a: ServeAnnounce) {
        let dir = self.inner.cfg.models_dir.clone();
        let dst = dir.join(hex32(&a.sha256));
        let mut attempt = 0u32;
        loop {
            if let Ok((h, _)) = sha256_file(&dst) {
                if h == a.sha256 {
                    break;
                }
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
            let mut ok = false;
            for h in holders {
                match self.fetch_from(&h, &a, &dir, &dst).await {
                    Ok(()) => {
                        ok = true;
                        break;
                    }
                    Err(e) => tracing::warn!(peer = %h, model = %a.name, "fetch failed: {e}"),
                }
            }
            if ok {
                break;
            }
            attempt += 1;
            let wait = Duration::from_millis(200 * u64::from(attempt.min(10)));
            tokio::time::sleep(wait).await;
        }
        let mut models = self.inner.models.lock().unwrap();
        if let Some(e) = models.get_mut(&a.name) {
            e.path = Some(dst);
            e.fetching = false;
            e.holders.insert(self.inner.me.clone(), Instant::now());
            tracing::info!(model = %a.name, bytes = a.bytes, "model fetched and verified");
        }
    }

    /// Fetches the whole file of `a` from `peer` into `dst` (through `dst.part`), checking
    /// its SHA-256 before it takes the final name.
    async fn fetch_from(
        &self,
        peer: &NodeId,
        a: &ServeAnnounce,
        dir: &Path,
        dst: &Path,
    ) -> Result<(), String> {
        std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
        let tmp = dst.with_extension("part");
        let mut file = tokio::fs::File::create(&tmp)
            .await
            .map_err(|e| e.to_string())?;
        let mut h = Sha256::new();
        let mut offset = 0u64;
        while offset < a.bytes {
            let len = FETCH_CHUNK.min(a.bytes - offset);
            let req = StageRequest::Fetch {
                model: a.sha256,
                offset,
                len,
            };
            let (reply, bytes) = self
                .call_remote(peer, &req, &[])
                .await
                .map_err(|e| e.to_string())?;
            match reply {
                StageReply::Ok { .. } if bytes.len() as u64 == len => {}
                StageReply::Ok { .. } => return Err(format!("short chunk at {offset}")),
                StageReply::Err(e) | StageReply::Rejected(e) => return Err(e),
            }
            h.update(&bytes);
            file.write_all(&bytes).await.map_err(|e| e.to_string())?;
            offset += len;
        }
        file.sync_all().await.map_err(|e| e.to_string())?;
        let got: [u8; 32] = h.finalize().into();
        if got != a.sha256 {
            let _ = std::fs::remove_file(&tmp);
            return Err("SHA-256 mismatch".into());
        }
        std::fs::rename(&tmp, dst).map_err(|e| e.to_string())
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

    /// The local file of the model with hash `model`, once held.
    pub(super) fn model_path(&self, model: &[u8; 32]) -> Option<PathBuf> {
        self.inner
            .models
            .lock()
            .unwrap()
            .values()
            .find(|e| &e.announce.sha256 == model)
            .and_then(|e| e.path.clone())
    }
}
