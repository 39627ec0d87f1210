//! The stage-call RPC: how the entry of a request reaches the stages of a replica.
//!
//! A stage call is one frame out and one frame back (`[meta len][meta][payload len]
//! [payload]`, the meta a `coordinator_free::codec::stage` message, the payload raw
//! little-endian tensor bytes) on a data-plane stream of service [`STAGE_SERVICE`].
//! Streams to a member are pooled and reused; a call to a member is bounded by
//! `max(call_floor, 10 × the slowest call to it lately)`. A call to this node itself skips
//! the network. [`Server::through`] runs a batch through every stage of a replica, each
//! stage taking the previous one's answer.

use super::{ServeError, Server, STAGE_SERVICE, STREAM_IDLE};
use crate::data_plane::Stream;
use coordinator_free::codec::stage::{self as wire, Payload, StageReply, StageRequest};
use coordinator_free::pipeline;
use coordinator_free::NodeId;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// What this node keeps per member it calls: idle streams and how slow calls were.
#[derive(Default)]
pub(super) struct PeerCalls {
    /// Idle stage streams, by member.
    pool: HashMap<NodeId, Vec<Stream>>,
    /// Slowest recent stage call per member (decaying maximum), seconds.
    call_time: HashMap<NodeId, f64>,
}

impl PeerCalls {
    /// The bound on a call to `peer`: `max(floor, 10 × the slowest call seen lately)`.
    fn call_bound(&self, peer: &NodeId, floor: Duration) -> Duration {
        let slowest = self.call_time.get(peer).copied().unwrap_or(0.0);
        floor.max(Duration::from_secs_f64(slowest * 10.0))
    }

    /// Records a call to `peer` that took `took` (the maximum decays by 5% a call).
    fn observe_call(&mut self, peer: &NodeId, took: Duration) {
        let e = self.call_time.entry(peer.clone()).or_insert(0.0);
        *e = took.as_secs_f64().max(0.95 * *e);
    }
}

impl Server {
    /// One request/response on a pooled stream to `peer`.
    pub(super) async fn call_remote(
        &self,
        peer: &NodeId,
        req: &StageRequest,
        payload: &[u8],
    ) -> Result<(StageReply, Vec<u8>), ServeError> {
        let fail = |reason: String| ServeError::Stage {
            member: peer.clone(),
            reason,
            rejected: false,
        };
        let meta = req.encode().map_err(|e| fail(e.to_string()))?;
        let pooled = self
            .inner
            .peers
            .lock()
            .unwrap()
            .pool
            .get_mut(peer)
            .and_then(Vec::pop);
        let mut stream = match pooled {
            Some(s) => s,
            None => self
                .inner
                .dp
                .open_stream(peer, STAGE_SERVICE)
                .await
                .map_err(|e| fail(e.to_string()))?,
        };
        let bound = self
            .inner
            .peers
            .lock()
            .unwrap()
            .call_bound(peer, self.inner.cfg.call_floor);
        let started = Instant::now();
        let exchange = async {
            write_frame(&mut stream, &meta, payload).await?;
            read_frame(&mut stream.r).await
        };
        let (meta, bytes) = match tokio::time::timeout(bound, exchange).await {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => return Err(fail(e)),
            Err(_) => return Err(fail(format!("no answer within {bound:?}"))),
        };
        self.inner
            .peers
            .lock()
            .unwrap()
            .observe_call(peer, started.elapsed());
        self.inner
            .dp
            .count_bytes((meta.len() + payload.len()) as u64, bytes.len() as u64);
        let reply = StageReply::decode(&meta).map_err(|e| fail(e.to_string()))?;
        self.inner
            .peers
            .lock()
            .unwrap()
            .pool
            .entry(peer.clone())
            .or_default()
            .push(stream);
        Ok((reply, bytes))
    }

    /// Answers stage calls on one inbound stream until it closes or idles.
    pub(super) async fn serve_stream(&self, mut stream: Stream) {
        loop {
            let frame = match tokio::time::timeout(STREAM_IDLE, read_frame(&mut stream.r)).await {
                Ok(Ok(f)) => f,
                Ok(Err(e)) => {
                    if !e.contains("closed") {
                        tracing::debug!(peer = %stream.peer, "stage stream: {e}");
                    }
                    return;
                }
                Err(_) => return,
            };
            let (reply, payload) = match StageRequest::decode(&frame.0) {
                Ok(req) => self.handle_call(req, frame.1).await,
                Err(e) => {
                    tracing::warn!(peer = %stream.peer, "bad stage request: {e}");
                    (StageReply::Err(format!("bad request: {e}")), Vec::new())
                }
            };
            let meta = match reply.encode() {
                Ok(m) => m,
                Err(e) => StageReply::Err(e.to_string()).encode().unwrap_or_default(),
            };
            if write_frame(&mut stream, &meta, &payload).await.is_err() {
                return;
            }
        }
    }

    /// One stage call, here or on a member. Returns the output and its shape.
    pub(super) async fn call_stage(
        &self,
        member: &NodeId,
        req: StageRequest,
        payload: Vec<u8>,
    ) -> Result<(Vec<u32>, Vec<u8>), ServeError> {
        let (reply, bytes) = if *member == self.inner.me {
            self.handle_call(req, payload).await
        } else {
            self.call_remote(member, &req, &payload).await?
        };
        match reply {
            StageReply::Ok { payload, shape } => {
                if wire::expected_bytes(payload, &shape) != Some(bytes.len() as u64) {
                    return Err(ServeError::Stage {
                        member: member.clone(),
                        reason: format!(
                            "answer of {} bytes for {payload:?} {shape:?}",
                            bytes.len()
                        ),
                        rejected: false,
                    });
                }
                Ok((shape, bytes))
            }
            StageReply::Err(reason) => Err(ServeError::Stage {
                member: member.clone(),
                rejected: false,
                reason,
            }),
            StageReply::Rejected(reason) => Err(ServeError::Stage {
                member: member.clone(),
                rejected: true,
                reason,
            }),
        }
    }

    /// Runs `input` (of `shape`, `[rows, ...]`) through every stage of `replica`: each
    /// stage takes the previous one's answer, and the last answers `last` (sampling each
    /// row by `sampling` when that is [`Payload::Sampled`]). For a `gpt`, a prefill of
    /// left-padded prompts or one decode token per row.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn through(
        &self,
        model: [u8; 32],
        replica: &[pipeline::Stage],
        rows: &[u64],
        prefill: bool,
        pad: &[u32],
        mut input: (Payload, Vec<u8>),
        mut shape: Vec<u32>,
        last: Payload,
        mut sampling: Vec<wire::RowSampling>,
    ) -> Result<(Vec<u32>, Vec<u8>), ServeError> {
        let n = replica.len();
        for (i, s) in replica.iter().enumerate() {
            let (output, sampling) = if i + 1 == n {
                (last, std::mem::take(&mut sampling))
            } else {
                (Payload::Hidden, Vec::new())
            };
            let req = StageRequest::Forward {
                model,
                rows: rows.to_vec(),
                start: s.layers.start as u32,
                end: s.layers.end as u32,
                shape: std::mem::take(&mut shape),
                prefill,
                pad: pad.to_vec(),
                input: input.0,
                output,
                sampling,
            };
            let (sh, out) = self
                .call_stage(&s.member, req, std::mem::take(&mut input.1))
                .await?;
            shape = sh;
            input = (output, out);
        }
        Ok((shape, input.1))
    }

    /// Forgets `rows`' caches on every stage of `replica` (in the background).
    pub(super) fn drop_rows(&self, replica: &[pipeline::Stage], rows: Vec<u64>) {
        if rows.is_empty() {
            return;
        }
        for s in replica {
            let srv = self.clone();
            let member = s.member.clone();
            let rows = rows.clone();
            tokio::spawn(async move {
                let _ = srv
                    .call_stage(&member, StageRequest::Drop { rows }, vec![])
                    .await;
            });
        }
    }
}

/// Writes one stage frame (`[meta len][meta][payload len][payload]`) and flushes it.
async fn write_frame(s: &mut Stream, meta: &[u8], payload: &[u8]) -> Result<(), String> {
    // One buffer, one write: a frame is small next to a syscall per piece.
    let mut buf = Vec::with_capacity(12 + meta.len() + payload.len());
    buf.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    buf.extend_from_slice(meta);
    buf.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    buf.extend_from_slice(payload);
    let io = |e: std::io::Error| e.to_string();
    s.w.write_all(&buf).await.map_err(io)?;
    s.w.flush().await.map_err(io)
}

/// Reads one stage frame (`[meta len][meta][payload len][payload]`): both lengths checked
/// against their limits before anything is allocated, and the payload buffer grows only
/// as bytes arrive. Returns the meta and payload bytes. Fuzzed by `fuzz/`.
pub async fn read_frame<R: tokio::io::AsyncRead + Unpin + ?Sized>(
    r: &mut R,
) -> Result<(Vec<u8>, Vec<u8>), String> {
    let io = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            "stream closed".to_string()
        } else {
            e.to_string()
        }
    };
    let mut p4 = [0u8; 4];
    r.read_exact(&mut p4).await.map_err(io)?;
    let n = wire::meta_len(p4).map_err(|e| e.to_string())?;
    let mut meta = vec![0u8; n];
    r.read_exact(&mut meta).await.map_err(io)?;
    let mut p8 = [0u8; 8];
    r.read_exact(&mut p8).await.map_err(io)?;
    let n = wire::payload_len(p8).map_err(|e| e.to_string())?;
    let mut payload = Vec::with_capacity((n as usize).min(1 << 20));
    r.take(n).read_to_end(&mut payload).await.map_err(io)?;
    if payload.len() as u64 != n {
        return Err("stream closed".into());
    }
    Ok((meta, payload))
}
