//! Executing a ring schedule over a collective's two links: each move sends one range of
//! the buffer to the right while the left's data for another range arrives, segment by
//! segment (`segment_bytes`, default 1 MiB), with a reader task running up to
//! [`READ_AHEAD`] segments ahead so receiving overlaps sending and reducing. Every segment
//! is bounded by `max(timeout_floor, timeout_multiplier × its expected time)`, the expected
//! time coming from the observed rate (a decaying maximum). Over QUIC, segments that are
//! added into the buffer are taken as the chunks quinn received them in and added from
//! there, without a copy into a buffer of their own first.

use super::element::{add_chunks, bytes_of, bytes_of_mut, Element, Raw};
use super::transport::{read_chunks_exact, BoxRead, Link};
use super::{DataPlane, DataPlaneError};
use coordinator_free::collective::segments;
use coordinator_free::NodeId;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

impl DataPlane {
    /// How long a segment of `bytes` may take.
    fn segment_bound(&self, bytes: usize) -> Duration {
        let rate = self.inner.stats.lock().unwrap().observed_rate;
        let floor = self.inner.cfg.timeout_floor;
        if rate <= 0.0 {
            return floor;
        }
        let expected = Duration::from_secs_f64(bytes as f64 / rate);
        floor.max(expected * self.inner.cfg.timeout_multiplier)
    }

    /// Records a segment that took `took`. The rate estimate is a decaying maximum: a
    /// segment that waited for a slow or stalled peer must not loosen the bound the next
    /// one is held to, so the estimate tracks what the link has shown it can do.
    fn observe(&self, bytes: usize, took: Duration) {
        let secs = took.as_secs_f64().max(1e-6);
        let rate = bytes as f64 / secs;
        let mut s = self.inner.stats.lock().unwrap();
        s.bytes_received += bytes as u64;
        s.observed_rate = rate.max(0.9 * s.observed_rate);
    }

    /// Runs ring `moves` over `buf`: at each move, sends `buf[send]` to the right while the
    /// left's data for `buf[recv]` arrives, segment by segment. A reader task runs ahead on
    /// the inbound link (up to [`READ_AHEAD`] segments), so receiving overlaps sending and
    /// reducing. Returns the inbound link for reuse.
    pub(super) async fn run_ring<T: Element>(
        &self,
        out: &mut Link,
        inn: Link,
        buf: &mut [T],
        moves: &[Move],
        avg_after: Option<(usize, usize)>,
    ) -> Result<Link, DataPlaneError> {
        let seg = (self.inner.cfg.segment_bytes / std::mem::size_of::<T>()).max(1);
        // Reducing moves read ahead into pooled buffers (the data must be added anyway);
        // copying moves read straight into place once the reader has handed the link back.
        let lens: Vec<usize> = moves
            .iter()
            .filter(|m| m.reduce)
            .flat_map(|m| segments(m.recv.clone(), seg).map(|r| r.len()))
            .collect();
        let Link { peer, r, w } = inn;
        // QUIC segments arrive as quinn's chunks, added where they landed (one copy less).
        let (mut filled, free, reader) =
            spawn_reader::<T>(self.clone(), peer.clone(), r, lens, true);
        let mut reader = Some(reader);
        let mut direct: Option<BoxRead> = None;
        let reader_failed = |peer: &NodeId| DataPlaneError::Io {
            peer: peer.clone(),
            source: std::io::Error::other("inbound reader stopped"),
        };
        let run = async {
            for (i, m) in moves.iter().enumerate() {
                if !m.reduce && direct.is_none() {
                    let handle = reader.take().expect("reader present until first copy move");
                    direct = Some(
                        handle
                            .await
                            .ok()
                            .flatten()
                            .ok_or_else(|| reader_failed(&peer))?,
                    );
                }
                let sends: Vec<_> = segments(m.send.clone(), seg).collect();
                let recvs: Vec<_> = segments(m.recv.clone(), seg).collect();
                for j in 0..sends.len().max(recvs.len()) {
                    let (send, target) = split_disjoint(buf, m.send.clone(), m.recv.clone());
                    let sseg = sends
                        .get(j)
                        .map(|s| &send[s.start - m.send.start..s.end - m.send.start]);
                    let write = async {
                        if let Some(data) = sseg {
                            self.write_segment(out, bytes_of(data)).await?;
                        }
                        Ok::<(), DataPlaneError>(())
                    };
                    let rseg = recvs
                        .get(j)
                        .map(|r| r.start - m.recv.start..r.end - m.recv.start);
                    if m.reduce {
                        let read = async {
                            if rseg.is_none() {
                                return Ok(None);
                            }
                            match filled.recv().await {
                                Some(Ok(b)) => Ok(Some(b)),
                                Some(Err(e)) => Err(e),
                                None => Err(reader_failed(&peer)),
                            }
                        };
                        let ((), got) = tokio::try_join!(write, read)?;
                        match (got, rseg) {
                            (Some(Segment::Owned(data)), Some(r)) => {
                                T::add_into(&mut target[r.start..r.start + data.len()], &data);
                                let _ = free.try_send(data);
                            }
                            (Some(Segment::Chunks(chunks)), Some(r)) => {
                                add_chunks(&mut target[r], &chunks)
                            }
                            _ => {}
                        }
                    } else {
                        let rd = direct.as_mut().expect("direct link");
                        let read = async {
                            match rseg {
                                Some(r) => {
                                    self.read_segment(rd, &peer, bytes_of_mut(&mut target[r]))
                                        .await
                                }
                                None => Ok(()),
                            }
                        };
                        tokio::try_join!(write, read)?;
                    }
                }
                if let Some((step, n)) = avg_after {
                    if i == step {
                        T::div_by(&mut buf[m.recv.clone()], n);
                    }
                }
            }
            Ok::<(), DataPlaneError>(())
        };
        let result = run.await;
        if let Some(handle) = reader.take() {
            if result.is_err() {
                handle.abort();
            } else {
                direct = handle.await.ok().flatten();
            }
        }
        result?;
        let r = direct.ok_or_else(|| reader_failed(&peer))?;
        Ok(Link { peer, r, w })
    }

    /// Reads one segment from `peer` into `dst`, within the segment bound; records the rate.
    pub(super) async fn read_segment(
        &self,
        r: &mut BoxRead,
        peer: &NodeId,
        dst: &mut [u8],
    ) -> Result<(), DataPlaneError> {
        let bound = self.segment_bound(dst.len());
        let started = Instant::now();
        let res = tokio::time::timeout(bound, r.read_exact(dst)).await;
        self.segment_read(res.map(|r| r.map(|_| ())), peer, dst.len(), started, bound)
    }

    /// Reads one segment of `len` bytes from a QUIC `peer` as quinn's received chunks
    /// (no copy), within the segment bound; records the rate.
    async fn read_segment_chunks(
        &self,
        r: &mut quinn::RecvStream,
        peer: &NodeId,
        len: usize,
    ) -> Result<Vec<bytes::Bytes>, DataPlaneError> {
        let bound = self.segment_bound(len);
        let started = Instant::now();
        let mut chunks = Vec::new();
        let res = tokio::time::timeout(bound, async {
            chunks = read_chunks_exact(r, len).await?;
            Ok(())
        })
        .await;
        self.segment_read(res, peer, len, started, bound)?;
        Ok(chunks)
    }

    /// The outcome of a segment read that started at `started` under `bound`.
    fn segment_read(
        &self,
        res: Result<std::io::Result<()>, tokio::time::error::Elapsed>,
        peer: &NodeId,
        len: usize,
        started: Instant,
        bound: Duration,
    ) -> Result<(), DataPlaneError> {
        match res {
            Ok(Ok(())) => {
                self.observe(len, started.elapsed());
                Ok(())
            }
            Ok(Err(source)) => Err(DataPlaneError::Io {
                peer: peer.clone(),
                source,
            }),
            Err(_) => Err(DataPlaneError::Timeout {
                peer: peer.clone(),
                what: "send a segment",
                after: bound,
            }),
        }
    }

    /// Writes one segment to the link's peer, within the segment bound; counts the bytes.
    pub(super) async fn write_segment(
        &self,
        out: &mut Link,
        data: &[u8],
    ) -> Result<(), DataPlaneError> {
        let bound = self.segment_bound(data.len());
        let w = async {
            out.w.write_all(data).await?;
            out.w.flush().await
        };
        match tokio::time::timeout(bound, w).await {
            Ok(Ok(())) => {
                self.inner.stats.lock().unwrap().bytes_sent += data.len() as u64;
                Ok(())
            }
            Ok(Err(source)) => Err(DataPlaneError::Io {
                peer: out.peer.clone(),
                source,
            }),
            Err(_) => Err(DataPlaneError::Timeout {
                peer: out.peer.clone(),
                what: "take a segment",
                after: bound,
            }),
        }
    }
}

/// Segments the inbound reader may run ahead of the ring.
const READ_AHEAD: usize = 4;

/// One ring step over a single buffer.
pub(super) struct Move {
    /// The range sent to the right.
    pub(super) send: std::ops::Range<usize>,
    /// The range the left's data arrives for.
    pub(super) recv: std::ops::Range<usize>,
    /// Whether the arriving data is added into `recv` (else it replaces it).
    pub(super) reduce: bool,
}

/// A segment the reader received: in a pooled buffer, or (QUIC, when asked for) as the
/// chunks quinn received it in, so reducing reads it where it landed instead of after a
/// copy into a buffer.
pub(super) enum Segment<T> {
    /// Read into a buffer (given back through the free channel after use).
    Owned(Vec<T>),
    /// quinn's received chunks, `len × size_of::<T>()` bytes in all.
    Chunks(Vec<bytes::Bytes>),
}

impl<T: Raw> Segment<T> {
    /// The segment in a buffer of its own (chunks are copied into one).
    pub(super) fn into_vec(self) -> Vec<T> {
        match self {
            Segment::Owned(v) => v,
            Segment::Chunks(chunks) => {
                let len: usize = chunks.iter().map(|c| c.len()).sum();
                let mut v = vec![T::default(); len / std::mem::size_of::<T>()];
                let mut at = 0;
                let dst = bytes_of_mut(&mut v);
                for c in &chunks {
                    let n = c.len().min(dst.len() - at);
                    dst[at..at + n].copy_from_slice(&c[..n]);
                    at += n;
                }
                v
            }
        }
    }
}

/// Segments the reader has filled, in order (or the error that stopped it).
pub(super) type Filled<T> = tokio::sync::mpsc::Receiver<Result<Segment<T>, DataPlaneError>>;

/// Reads the segments of `lens` (in values of `T`) from `r` ahead of their use: as quinn's
/// chunks when `zero_copy` and the link is QUIC, else into pooled buffers. Returns the
/// filled-segment channel, the free-buffer channel and the task (which yields `r` back).
pub(super) fn spawn_reader<T: Raw>(
    dp: DataPlane,
    peer: NodeId,
    mut r: BoxRead,
    lens: Vec<usize>,
    zero_copy: bool,
) -> (
    Filled<T>,
    tokio::sync::mpsc::Sender<Vec<T>>,
    tokio::task::JoinHandle<Option<BoxRead>>,
) {
    let (tx, rx) = tokio::sync::mpsc::channel(READ_AHEAD);
    let (free_tx, mut free_rx) = tokio::sync::mpsc::channel::<Vec<T>>(READ_AHEAD + 2);
    let handle = tokio::spawn(async move {
        for len in lens {
            let res = match &mut r {
                BoxRead::Quic(q) if zero_copy => dp
                    .read_segment_chunks(q, &peer, len * std::mem::size_of::<T>())
                    .await
                    .map(Segment::Chunks),
                r => {
                    let mut b = free_rx.try_recv().unwrap_or_default();
                    b.resize(len, T::default());
                    dp.read_segment(r, &peer, bytes_of_mut(&mut b))
                        .await
                        .map(|()| Segment::Owned(b))
                }
            };
            let failed = res.is_err();
            if tx.send(res).await.is_err() || failed {
                return None;
            }
        }
        Some(r)
    });
    (rx, free_tx, handle)
}

/// Borrows `a` immutably and `b` mutably from `buf`; the ranges must not overlap.
fn split_disjoint<T>(
    buf: &mut [T],
    a: std::ops::Range<usize>,
    b: std::ops::Range<usize>,
) -> (&[T], &mut [T]) {
    assert!(a.end <= b.start || b.end <= a.start, "ranges overlap");
    if a.start < b.start {
        let (lo, hi) = buf.split_at_mut(b.start);
        (&lo[a], &mut hi[..b.end - b.start])
    } else {
        let (lo, hi) = buf.split_at_mut(a.start);
        (&hi[..a.end - a.start], &mut lo[b])
    }
}
