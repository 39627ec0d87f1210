//! The collectives: all-reduce, all-gather, broadcast and barrier over the ring of the
//! view's members (sorted ids), executing the schedules of `coordinator_free::collective`.
//!
//! Each collective opens two links: to the right neighbour, sending the operation's header
//! and waiting (up to `start_timeout`) for its acknowledgement; and from the left one,
//! whose header must match ours exactly (view hash, tag, kind, dtype, length, ranks) before
//! we acknowledge it. Only then does payload move (see `ring.rs`). A mismatch is an error,
//! never a wrong sum; every error is retryable once views converge. Outcomes and the
//! durations of successful collectives are counted in [`DataPlaneStats`], and the time
//! spent opening rings feeds its wait counter (`wait.rs`).
//!
//! [`DataPlaneStats`]: super::DataPlaneStats

use super::element::{bytes_of, bytes_of_mut, Element};
use super::links::{ACK_OK, ACK_OP_MISMATCH, ACK_VIEW_MISMATCH};
use super::ring::Move;
use super::transport::Link;
use super::wait::Count;
use super::{DataPlane, DataPlaneError};
use crate::metrics::COLLECTIVE_LATENCY;
use coordinator_free::codec::data::OpHeader;
use coordinator_free::collective::{segments, Kind, ReduceOp, Ring};
use coordinator_free::{NodeId, View};
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

impl DataPlane {
    /// Opens the two links of a ring collective: to the right (header sent, acknowledged)
    /// and from the left (header received, checked, acknowledged).
    pub(super) async fn open_ring(
        &self,
        view: &View,
        ring: Ring,
        header: OpHeader,
    ) -> Result<(Link, Link), DataPlaneError> {
        let _opening = self.count(Count::Opening);
        let right = view.members[ring.right()].id.clone();
        let left = view.members[ring.left()].id.clone();
        tokio::try_join!(
            self.open_right(view, &right, header),
            self.accept_left(view, ring, &left, header)
        )
    }

    /// The link to the right neighbour, once it has acknowledged our `header` (the header
    /// write bounded by `timeout_floor`, the acknowledgement by `start_timeout`).
    async fn open_right(
        &self,
        view: &View,
        right: &NodeId,
        header: OpHeader,
    ) -> Result<Link, DataPlaneError> {
        let mut link = self.open_link(right).await?;
        let io = |source| DataPlaneError::Io {
            peer: right.clone(),
            source,
        };
        // A dead peer's flow-control window can be full: bound the header write too.
        let floor = self.inner.cfg.timeout_floor;
        let send_header = async {
            link.w.write_all(&header.encode()).await?;
            link.w.flush().await
        };
        match tokio::time::timeout(floor, send_header).await {
            Ok(r) => r.map_err(io)?,
            Err(_) => {
                return Err(DataPlaneError::Timeout {
                    peer: right.clone(),
                    what: "take the collective's header",
                    after: floor,
                })
            }
        }
        let bound = self.inner.cfg.start_timeout;
        let mut ack = [0u8; 1];
        match tokio::time::timeout(bound, link.r.read_exact(&mut ack)).await {
            Err(_) => {
                return Err(DataPlaneError::Timeout {
                    peer: right.clone(),
                    what: "acknowledge the collective",
                    after: bound,
                })
            }
            Ok(r) => {
                r.map_err(io)?;
            }
        }
        match ack[0] {
            ACK_OK => Ok(link),
            ACK_VIEW_MISMATCH => Err(DataPlaneError::ViewMismatch {
                peer: right.clone(),
                detail: format!("it is not in view {}", view.hash),
            }),
            _ => Err(DataPlaneError::OpMismatch {
                peer: right.clone(),
                detail: "it expected another operation".into(),
            }),
        }
    }

    /// The link from the left neighbour, once its first header matched `header` (with its
    /// rank) and we acknowledged it; a mismatch is acknowledged as such, then returned.
    async fn accept_left(
        &self,
        view: &View,
        ring: Ring,
        left: &NodeId,
        header: OpHeader,
    ) -> Result<Link, DataPlaneError> {
        let (mut link, got) = self.wait_inbound(left, header.tag, view.epoch).await?;
        let expected = OpHeader {
            rank: ring.left() as u32,
            ..header
        };
        let verdict = if got.view_hash != expected.view_hash {
            Err(DataPlaneError::ViewMismatch {
                peer: left.clone(),
                detail: format!(
                    "we are in {}, it is in {}",
                    expected.view_hash, got.view_hash
                ),
            })
        } else if got != expected {
            Err(DataPlaneError::OpMismatch {
                peer: left.clone(),
                detail: format!("expected {expected:?}, got {got:?}"),
            })
        } else {
            Ok(())
        };
        let code = match &verdict {
            Ok(()) => ACK_OK,
            Err(DataPlaneError::ViewMismatch { .. }) => ACK_VIEW_MISMATCH,
            Err(_) => ACK_OP_MISMATCH,
        };
        let ack = async {
            link.w.write_all(&[code]).await?;
            link.w.flush().await
        };
        let floor = self.inner.cfg.timeout_floor;
        match tokio::time::timeout(floor, ack).await {
            Ok(Ok(())) => verdict.map(|()| link),
            Ok(Err(source)) => verdict.and(Err(DataPlaneError::Io {
                peer: left.clone(),
                source,
            })),
            Err(_) => verdict.and(Err(DataPlaneError::Timeout {
                peer: left.clone(),
                what: "take our acknowledgement",
                after: floor,
            })),
        }
    }

    /// Runs a collective, counting and logging its outcome.
    pub(super) async fn counted<R>(
        &self,
        op: impl std::future::Future<Output = Result<R, DataPlaneError>>,
    ) -> Result<R, DataPlaneError> {
        let started = Instant::now();
        let in_flight = self.count(Count::InFlight);
        let r = op.await;
        drop(in_flight);
        let took = started.elapsed().as_secs_f64();
        let mut s = self.inner.stats.lock().unwrap();
        match &r {
            Ok(_) => {
                s.collectives_ok += 1;
                let s = &mut *s;
                COLLECTIVE_LATENCY.record(&mut s.latency_counts, &mut s.latency_sum_s, took);
            }
            Err(e) => {
                s.collectives_failed += 1;
                tracing::warn!("collective failed: {e}");
            }
        }
        r
    }

    /// Ring all-reduce of `buf` across `view`, in place. On error the contents of `buf` are
    /// unspecified (the caller redoes the step); an `Ok` always holds the full reduction.
    pub async fn all_reduce<T: Element>(
        &self,
        view: &View,
        tag: u64,
        buf: &mut [T],
        op: ReduceOp,
    ) -> Result<(), DataPlaneError> {
        self.counted(self.all_reduce_inner(view, tag, buf, op))
            .await
    }

    async fn all_reduce_inner<T: Element>(
        &self,
        view: &View,
        tag: u64,
        buf: &mut [T],
        op: ReduceOp,
    ) -> Result<(), DataPlaneError> {
        let ring = Ring::for_view(view, &self.inner.me)?;
        if ring.n == 1 {
            return Ok(());
        }
        let header = op_header::<T>(view, ring, tag, Kind::AllReduce(op), buf.len() as u64);
        let (mut out, inn) = self.open_ring(view, ring, header).await?;
        let len = buf.len();
        let moves: Vec<Move> = ring
            .all_reduce_steps()
            .iter()
            .map(|st| Move {
                send: Ring::chunk(len, ring.n, st.send),
                recv: Ring::chunk(len, ring.n, st.recv),
                reduce: st.reduce,
            })
            .collect();
        // After the last reduce-scatter step this rank owns the full sum of one chunk.
        let avg = (op == ReduceOp::Avg).then_some((ring.n - 2, ring.n));
        let inn = self.run_ring(&mut out, inn, buf, &moves, avg).await?;
        self.recycle_outbound(out);
        self.recycle_inbound(inn);
        Ok(())
    }

    /// All-gather: every member contributes `input`; `output` (n × input.len(), rank order)
    /// ends with every member's block.
    pub async fn all_gather<T: Element>(
        &self,
        view: &View,
        tag: u64,
        input: &[T],
        output: &mut [T],
    ) -> Result<(), DataPlaneError> {
        self.counted(self.all_gather_inner(view, tag, input, output))
            .await
    }

    async fn all_gather_inner<T: Element>(
        &self,
        view: &View,
        tag: u64,
        input: &[T],
        output: &mut [T],
    ) -> Result<(), DataPlaneError> {
        let ring = Ring::for_view(view, &self.inner.me)?;
        let b = input.len();
        if output.len() != b * ring.n {
            return Err(DataPlaneError::Buffer(format!(
                "all_gather output has {} elements, expected {} × {b}",
                output.len(),
                ring.n
            )));
        }
        output[ring.rank * b..(ring.rank + 1) * b].copy_from_slice(input);
        if ring.n == 1 {
            return Ok(());
        }
        let header = op_header::<T>(view, ring, tag, Kind::AllGather, b as u64);
        let (mut out, inn) = self.open_ring(view, ring, header).await?;
        let moves: Vec<Move> = ring
            .all_gather_steps()
            .iter()
            .map(|st| Move {
                send: st.send * b..(st.send + 1) * b,
                recv: st.recv * b..(st.recv + 1) * b,
                reduce: false,
            })
            .collect();
        let inn = self.run_ring(&mut out, inn, output, &moves, None).await?;
        self.recycle_outbound(out);
        self.recycle_inbound(inn);
        Ok(())
    }

    /// Broadcast of the root rank's `buf` to every member (a pipelined chain).
    pub async fn broadcast<T: Element>(
        &self,
        view: &View,
        tag: u64,
        buf: &mut [T],
        root: u32,
    ) -> Result<(), DataPlaneError> {
        self.counted(self.broadcast_inner(view, tag, buf, root))
            .await
    }

    async fn broadcast_inner<T: Element>(
        &self,
        view: &View,
        tag: u64,
        buf: &mut [T],
        root: u32,
    ) -> Result<(), DataPlaneError> {
        let ring = Ring::for_view(view, &self.inner.me)?;
        let (recv, send) = ring.broadcast_roles(root)?;
        if ring.n == 1 {
            return Ok(());
        }
        let header = op_header::<T>(view, ring, tag, Kind::Broadcast { root }, buf.len() as u64);
        // The chain uses the ring's links; the last member's link back to the root carries
        // only the header, which keeps the protocol uniform.
        let (mut out, mut inn) = self.open_ring(view, ring, header).await?;
        let seg = (self.inner.cfg.segment_bytes / std::mem::size_of::<T>()).max(1);
        for s in segments(0..buf.len(), seg) {
            if recv {
                let peer = inn.peer.clone();
                self.read_segment(&mut inn.r, &peer, bytes_of_mut(&mut buf[s.clone()]))
                    .await?;
            }
            if send {
                self.write_segment(&mut out, bytes_of(&buf[s])).await?;
            }
        }
        self.recycle_outbound(out);
        self.recycle_inbound(inn);
        Ok(())
    }

    /// Returns once every member of `view` has entered the barrier with the same tag.
    pub async fn barrier(&self, view: &View, tag: u64) -> Result<(), DataPlaneError> {
        let ring = Ring::for_view(view, &self.inner.me)?;
        let mut token = [1.0f32];
        self.all_reduce(view, tag, &mut token, ReduceOp::Sum)
            .await?;
        if token[0] != ring.n as f32 {
            return Err(DataPlaneError::OpMismatch {
                peer: self.inner.me.clone(),
                detail: format!("barrier counted {} of {} members", token[0], ring.n),
            });
        }
        Ok(())
    }
}

/// The header this rank sends to open a collective on `view`.
fn op_header<T: Element>(view: &View, ring: Ring, tag: u64, kind: Kind, len: u64) -> OpHeader {
    OpHeader {
        view_hash: view.hash,
        tag,
        kind,
        dtype: T::DTYPE,
        len,
        n: ring.n as u32,
        rank: ring.rank as u32,
    }
}
