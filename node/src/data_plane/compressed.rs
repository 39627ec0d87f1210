//! Compressed all-reduce: an f32 buffer summed over the ring with its payload in bf16 or
//! int8 on the wire (`coordinator_free::compression`), accumulated in f32.
//!
//! The schedule is the ring all-reduce's. In the reduce-scatter, every hop encodes the range
//! it sends (its running partial sum) and the receiver decodes and adds it in f32. The owner
//! of each reduced chunk then replaces it by the decoding of its encoding, and those bytes
//! go round the all-gather unchanged (each member keeps the bytes it received and forwards
//! them), so every member ends with bit-identical values. Segments are encoded one at a
//! time (`segment_bytes` of f32, a multiple of the int8 block), each bounded like the plain
//! ring's; the header carries the compression's dtype, so peers that disagree refuse the
//! operation before any payload moves.
//!
//! Error feedback: a caller may pass a `residual` buffer. Each member writes there what
//! its own encodings lost (for every range it encoded: the value it sent minus what the
//! receiver decodes; zero elsewhere). Every loss of the operation happens in exactly one
//! member's encoding, so the members' residuals add up to the exact sum minus the result
//! (up to f32 rounding): adding its residual to its next contribution, each member hands
//! the error on instead of dropping it.

use super::ring::spawn_reader;
use super::transport::Link;
use super::{DataPlane, DataPlaneError};
use coordinator_free::codec::data::OpHeader;
use coordinator_free::collective::{segments, Kind, ReduceOp, Ring};
use coordinator_free::compression::{self, Compression, INT8_BLOCK};
use coordinator_free::View;

impl DataPlane {
    /// Ring all-reduce of `buf` across `view` in place, its payload compressed as `c`
    /// (`Compression::None`: [`DataPlane::all_reduce`]). Every member ends with the same
    /// values; on error `buf` is unspecified (the caller redoes the step).
    pub async fn all_reduce_compressed(
        &self,
        view: &View,
        tag: u64,
        buf: &mut [f32],
        op: ReduceOp,
        c: Compression,
    ) -> Result<(), DataPlaneError> {
        self.all_reduce_with_feedback(view, tag, buf, op, c, None)
            .await
    }

    /// [`all_reduce_compressed`](Self::all_reduce_compressed) that also writes this
    /// member's share of the compression error into `residual` (as long as `buf`; see the
    /// module's doc; in units of the sum, also for `ReduceOp::Avg`). Without compression,
    /// or alone in the view, the residual is zeros.
    pub async fn all_reduce_with_feedback(
        &self,
        view: &View,
        tag: u64,
        buf: &mut [f32],
        op: ReduceOp,
        c: Compression,
        mut residual: Option<&mut [f32]>,
    ) -> Result<(), DataPlaneError> {
        if let Some(r) = residual.as_deref_mut() {
            if r.len() != buf.len() {
                return Err(DataPlaneError::Buffer(format!(
                    "a residual of {} values for a buffer of {}",
                    r.len(),
                    buf.len()
                )));
            }
            r.fill(0.0);
        }
        if c == Compression::None {
            return self.all_reduce(view, tag, buf, op).await;
        }
        self.counted(self.compressed_inner(view, tag, buf, op, c, residual))
            .await
    }

    async fn compressed_inner(
        &self,
        view: &View,
        tag: u64,
        buf: &mut [f32],
        op: ReduceOp,
        c: Compression,
        mut residual: Option<&mut [f32]>,
    ) -> Result<(), DataPlaneError> {
        let ring = Ring::for_view(view, &self.inner.me)?;
        if ring.n == 1 {
            return Ok(());
        }
        let header = OpHeader {
            view_hash: view.hash,
            tag,
            kind: Kind::AllReduce(op),
            dtype: c.dtype(),
            len: buf.len() as u64,
            n: ring.n as u32,
            rank: ring.rank as u32,
        };
        let (mut out, inn) = self.open_ring(view, ring, header).await?;
        let len = buf.len();
        // Whole int8 blocks per segment, so blocks never straddle two segments.
        let seg = (self.inner.cfg.segment_bytes / 4 / INT8_BLOCK).max(1) * INT8_BLOCK;
        let bad = |e: compression::WireSizeError| DataPlaneError::Buffer(e.to_string());
        let steps = ring.all_reduce_steps();
        // A reader task receives every segment ahead (`ring::READ_AHEAD`), so the kernel's
        // receive copies overlap this task's encoding, sending and decoding.
        let lens: Vec<usize> = steps
            .iter()
            .flat_map(|st| segments(Ring::chunk(len, ring.n, st.recv), seg))
            .map(|r| c.wire_bytes(r.len()))
            .collect();
        let Link { peer, r, w } = inn;
        let (mut filled, free, reader) =
            spawn_reader::<u8>(self.clone(), peer.clone(), r, lens, false);
        let reader_failed = || DataPlaneError::Io {
            peer: peer.clone(),
            source: std::io::Error::other("inbound reader stopped"),
        };
        // The encoded segments of the chunk last received in the all-gather (forwarded
        // unchanged at the next move).
        let mut carried: Vec<Vec<u8>> = Vec::new();
        let mut gathering = false;
        let mut sent = Vec::new();
        let run = async {
            for st in &steps {
                let send = Ring::chunk(len, ring.n, st.send);
                let recv = Ring::chunk(len, ring.n, st.recv);
                if !st.reduce && !gathering {
                    // This rank owns the full sum of `send`: averaged if asked, replaced
                    // by what its encoding decodes to, and those bytes are what it sends.
                    gathering = true;
                    let own = &mut buf[send.clone()];
                    let n = ring.n as f32;
                    if op == ReduceOp::Avg {
                        own.iter_mut().for_each(|x| *x /= n);
                    }
                    carried.clear();
                    for s in segments(0..own.len(), seg) {
                        let mut bytes = Vec::new();
                        compression::encode(c, &own[s.clone()], &mut bytes);
                        if let Some(r) = residual.as_deref_mut() {
                            let r = &mut r[send.start + s.start..send.start + s.end];
                            compression::encode_error(c, &bytes, &own[s.clone()], r)
                                .map_err(bad)?;
                            if op == ReduceOp::Avg {
                                r.iter_mut().for_each(|x| *x *= n);
                            }
                        }
                        compression::decode_into(c, &bytes, &mut own[s]).map_err(bad)?;
                        carried.push(bytes);
                    }
                }
                let sends: Vec<_> = segments(send.clone(), seg).collect();
                let recvs: Vec<_> = segments(recv.clone(), seg).collect();
                let mut received: Vec<Vec<u8>> = Vec::with_capacity(recvs.len());
                #[allow(clippy::needless_range_loop)] // j walks sends, recvs and carried together
                for j in 0..sends.len().max(recvs.len()) {
                    let data: &[u8] = match sends.get(j) {
                        None => &[],
                        // The segments of the chunk received last (or owned), as they came.
                        Some(_) if gathering => carried.get(j).map_or(&[][..], Vec::as_slice),
                        Some(s) => {
                            sent.clear();
                            compression::encode(c, &buf[s.clone()], &mut sent);
                            if let Some(r) = residual.as_deref_mut() {
                                compression::encode_error(
                                    c,
                                    &sent,
                                    &buf[s.clone()],
                                    &mut r[s.clone()],
                                )
                                .map_err(bad)?;
                            }
                            &sent
                        }
                    };
                    let write = async {
                        if !data.is_empty() {
                            self.write_segment(&mut out, data).await?;
                        }
                        Ok::<(), DataPlaneError>(())
                    };
                    let read = async {
                        if j >= recvs.len() {
                            return Ok(None);
                        }
                        match filled.recv().await {
                            Some(got) => got.map(|s| Some(s.into_vec())),
                            None => Err(reader_failed()),
                        }
                    };
                    let ((), got) = tokio::try_join!(write, read)?;
                    if let (Some(got), Some(r)) = (got, recvs.get(j)) {
                        if st.reduce {
                            compression::decode_add(c, &got, &mut buf[r.clone()]).map_err(bad)?;
                            let _ = free.try_send(got);
                        } else {
                            compression::decode_into(c, &got, &mut buf[r.clone()]).map_err(bad)?;
                            received.push(got);
                        }
                    }
                }
                if gathering {
                    carried = received;
                }
            }
            Ok::<(), DataPlaneError>(())
        };
        let result = run.await;
        if result.is_err() {
            reader.abort();
        }
        result?;
        let r = reader.await.ok().flatten().ok_or_else(reader_failed)?;
        let inn = Link { peer, r, w };
        self.recycle_outbound(out);
        self.recycle_inbound(inn);
        Ok(())
    }
}
