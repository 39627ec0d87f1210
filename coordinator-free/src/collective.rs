//! Collective schedules: for a view and this node's place in it, which chunk goes where at
//! every step. The shell moves the bytes; nothing here touches a socket.
//!
//! Ring order is the view's sorted ids; rank `r` sends to `r+1` and receives from `r-1`
//! (mod n). All-reduce is the bandwidth-optimal ring: n-1 reduce-scatter steps then n-1
//! all-gather steps over n chunks, so each member sends `2(n-1)/n · S` bytes.

use crate::view::{NodeId, View, ViewHash};
use serde::{Deserialize, Serialize};
use std::ops::Range;

/// Element types a collective can move.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DType {
    /// IEEE 754 binary32.
    F32,
    /// IEEE 754 binary16.
    F16,
    /// bfloat16.
    BF16,
    /// f32 values carried as bfloat16 and summed in f32 (compression `bf16`).
    Bf16Sum,
    /// f32 values carried as int8 with an f32 scale per block (compression `int8`; the
    /// scales are not counted in [`DType::size`]).
    Int8Block,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 | DType::Bf16Sum => 2,
            DType::Int8Block => 1,
        }
    }

    /// Wire code.
    pub fn code(self) -> u8 {
        match self {
            DType::F32 => 1,
            DType::F16 => 2,
            DType::BF16 => 3,
            DType::Bf16Sum => 4,
            DType::Int8Block => 5,
        }
    }

    /// From a wire code.
    pub fn from_code(c: u8) -> Option<DType> {
        match c {
            1 => Some(DType::F32),
            2 => Some(DType::F16),
            3 => Some(DType::BF16),
            4 => Some(DType::Bf16Sum),
            5 => Some(DType::Int8Block),
            _ => None,
        }
    }
}

/// How all-reduce combines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ReduceOp {
    /// Elementwise sum.
    Sum,
    /// Elementwise sum divided by the number of members.
    Avg,
}

/// Which collective.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Kind {
    /// Every member ends with the reduction of all members' buffers.
    AllReduce(ReduceOp),
    /// Every member ends with the root rank's buffer.
    Broadcast {
        /// Rank (in ring order) whose buffer is sent.
        root: u32,
    },
    /// Every member contributes one block; every member ends with all blocks in rank order.
    AllGather,
    /// No data; returns once every member has entered.
    Barrier,
    /// Not a collective: the link carries request/response frames for a service
    /// (argument: the service id), e.g. serving stages.
    Stream(u32),
}

impl Kind {
    /// Wire code: (kind, argument).
    pub fn code(self) -> (u8, u32) {
        match self {
            Kind::AllReduce(ReduceOp::Sum) => (1, 0),
            Kind::AllReduce(ReduceOp::Avg) => (2, 0),
            Kind::Broadcast { root } => (3, root),
            Kind::AllGather => (4, 0),
            Kind::Barrier => (5, 0),
            Kind::Stream(service) => (6, service),
        }
    }

    /// From a wire code.
    pub fn from_code(code: u8, arg: u32) -> Option<Kind> {
        match code {
            1 => Some(Kind::AllReduce(ReduceOp::Sum)),
            2 => Some(Kind::AllReduce(ReduceOp::Avg)),
            3 => Some(Kind::Broadcast { root: arg }),
            4 => Some(Kind::AllGather),
            5 => Some(Kind::Barrier),
            6 => Some(Kind::Stream(arg)),
            _ => None,
        }
    }
}

/// Why a collective cannot be planned or run.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CollectiveError {
    /// This node is not in the view the collective is bound to.
    #[error("{0} is not a member of the view")]
    NotMember(NodeId),
    /// The broadcast root is not a rank of the view.
    #[error("broadcast root {root} is not a rank of a view of {n}")]
    BadRoot {
        /// Requested root.
        root: u32,
        /// View size.
        n: usize,
    },
    /// The peer's header names another view.
    #[error("view mismatch: we are in {ours}, the peer in {theirs}")]
    ViewMismatch {
        /// Our view hash.
        ours: ViewHash,
        /// The peer's.
        theirs: ViewHash,
    },
    /// The peer's header describes another operation (kind, dtype, length, tag or rank).
    #[error("operation mismatch: {0}")]
    OpMismatch(String),
}

/// One step of a ring schedule: send chunk `send` to the right neighbour while receiving
/// chunk `recv` from the left one; `reduce` says whether the received data is added to the
/// local chunk (reduce-scatter) or replaces it (all-gather).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingStep {
    /// Chunk index sent.
    pub send: usize,
    /// Chunk index received.
    pub recv: usize,
    /// Add (true) or overwrite (false).
    pub reduce: bool,
}

/// A node's place in the ring of a view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ring {
    /// Members.
    pub n: usize,
    /// This node's rank (index in sorted ids).
    pub rank: usize,
}

impl Ring {
    /// The ring of `view` seen from `me`.
    pub fn for_view(view: &View, me: &NodeId) -> Result<Ring, CollectiveError> {
        let rank = view
            .position(me)
            .ok_or_else(|| CollectiveError::NotMember(me.clone()))?;
        Ok(Ring {
            n: view.len(),
            rank,
        })
    }

    /// Rank this node sends to.
    pub fn right(&self) -> usize {
        (self.rank + 1) % self.n
    }

    /// Rank this node receives from.
    pub fn left(&self) -> usize {
        (self.rank + self.n - 1) % self.n
    }

    /// Element range of chunk `i` when `len` elements are split into `n` near-equal chunks
    /// (the first `len % n` chunks hold one more).
    pub fn chunk(len: usize, n: usize, i: usize) -> Range<usize> {
        let base = len / n;
        let extra = len % n;
        let start = i * base + i.min(extra);
        let size = base + usize::from(i < extra);
        start..start + size
    }

    fn modn(&self, x: isize) -> usize {
        x.rem_euclid(self.n as isize) as usize
    }

    /// The 2(n-1) steps of ring all-reduce for this rank. After them every chunk holds the
    /// reduction over all ranks.
    pub fn all_reduce_steps(&self) -> Vec<RingStep> {
        let r = self.rank as isize;
        let mut steps = Vec::with_capacity(2 * (self.n - 1));
        for k in 0..self.n as isize - 1 {
            steps.push(RingStep {
                send: self.modn(r - k),
                recv: self.modn(r - k - 1),
                reduce: true,
            });
        }
        for k in 0..self.n as isize - 1 {
            steps.push(RingStep {
                send: self.modn(r + 1 - k),
                recv: self.modn(r - k),
                reduce: false,
            });
        }
        steps
    }

    /// The n-1 steps of ring all-gather, where block `i` starts at rank `i`.
    pub fn all_gather_steps(&self) -> Vec<RingStep> {
        let r = self.rank as isize;
        (0..self.n as isize - 1)
            .map(|k| RingStep {
                send: self.modn(r - k),
                recv: self.modn(r - k - 1),
                reduce: false,
            })
            .collect()
    }

    /// For a chain broadcast from `root`: (receive from the left?, send to the right?).
    pub fn broadcast_roles(&self, root: u32) -> Result<(bool, bool), CollectiveError> {
        if root as usize >= self.n {
            return Err(CollectiveError::BadRoot { root, n: self.n });
        }
        let root = root as usize;
        let recv = self.rank != root;
        let send = self.right() != root;
        Ok((recv, send))
    }
}

/// Who mints a view's NCCL unique id: the smallest id of the view (no coordinator: every
/// member computes the same answer from the same view).
pub fn nccl_root(view: &View) -> Option<&NodeId> {
    view.members.first().map(|m| &m.id)
}

/// What carries a view's gradient all-reduce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// shoal's ring over the data plane (TCP or QUIC), on host buffers.
    Ring,
    /// NCCL on device buffers.
    Nccl,
}

/// The backend of a view whose members report `device_keys` (in any order, one per
/// member, exchanged in the view's progress all-gather so every member decides on the same
/// list): a member's key is 0 unless it computes on a CUDA device with NCCL available, and
/// then names that device (two members on one GPU report the same key). NCCL only when every
/// member has a key and no two share a device (NCCL refuses two ranks on one device); the
/// ring otherwise, which works for any mix of devices.
pub fn choose_backend(device_keys: &[u64]) -> Backend {
    let mut keys = device_keys.to_vec();
    keys.sort_unstable();
    let distinct = keys.windows(2).all(|w| w[0] != w[1]);
    if !keys.is_empty() && keys[0] != 0 && distinct {
        Backend::Nccl
    } else {
        Backend::Ring
    }
}

/// Splits `range` into consecutive segments of at most `max` elements (pipelining unit).
pub fn segments(range: Range<usize>, max: usize) -> impl Iterator<Item = Range<usize>> {
    let max = max.max(1);
    let end = range.end;
    (range.start..end)
        .step_by(max)
        .map(move |s| s..(s + max).min(end))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::view::ViewMember;

    #[test]
    fn nccl_only_when_every_member_has_a_device_of_its_own() {
        assert_eq!(choose_backend(&[7]), Backend::Nccl);
        assert_eq!(choose_backend(&[7, 9, 11]), Backend::Nccl);
        // A CPU member (or one without NCCL) anywhere: the ring.
        assert_eq!(choose_backend(&[7, 0, 11]), Backend::Ring);
        assert_eq!(choose_backend(&[0]), Backend::Ring);
        // Two members on one GPU: NCCL would refuse them.
        assert_eq!(choose_backend(&[7, 9, 7]), Backend::Ring);
        assert_eq!(choose_backend(&[]), Backend::Ring);
        // The order the keys arrive in does not matter.
        assert_eq!(choose_backend(&[11, 9, 7]), choose_backend(&[7, 9, 11]));
    }

    /// Runs the all-reduce schedule on plain integers for every rank in lockstep.
    fn simulate(n: usize, len: usize) -> Vec<Vec<i64>> {
        let mut bufs: Vec<Vec<i64>> = (0..n)
            .map(|r| (0..len).map(|i| (r * 1000 + i) as i64).collect())
            .collect();
        let plans: Vec<Vec<RingStep>> = (0..n)
            .map(|rank| Ring { n, rank }.all_reduce_steps())
            .collect();
        for s in 0..2 * (n - 1) {
            let sent: Vec<Vec<i64>> = (0..n)
                .map(|r| bufs[r][Ring::chunk(len, n, plans[r][s].send)].to_vec())
                .collect();
            for r in 0..n {
                let left = (r + n - 1) % n;
                let step = plans[r][s];
                assert_eq!(plans[left][s].send, step.recv, "left sends what we expect");
                let range = Ring::chunk(len, n, step.recv);
                for (d, v) in bufs[r][range].iter_mut().zip(&sent[left]) {
                    if step.reduce {
                        *d += v
                    } else {
                        *d = *v
                    }
                }
            }
        }
        bufs
    }

    #[test]
    fn ring_all_reduce_schedule_is_correct() {
        for n in 2..=7 {
            for len in [0, 1, n - 1, n, n + 1, 7, 100] {
                let out = simulate(n, len);
                let expected: Vec<i64> = (0..len)
                    .map(|i| (0..n).map(|r| (r * 1000 + i) as i64).sum())
                    .collect();
                for b in &out {
                    assert_eq!(b, &expected, "n={n} len={len}");
                }
            }
        }
    }

    #[test]
    fn chunks_tile_the_buffer() {
        for n in 1..9 {
            for len in 0..40 {
                let mut next = 0;
                for i in 0..n {
                    let c = Ring::chunk(len, n, i);
                    assert_eq!(c.start, next);
                    next = c.end;
                }
                assert_eq!(next, len);
            }
        }
        let s: Vec<_> = segments(3..10, 3).collect();
        assert_eq!(s, vec![3..6, 6..9, 9..10]);
    }

    #[test]
    fn all_gather_and_broadcast_roles() {
        let n = 4;
        for rank in 0..n {
            let ring = Ring { n, rank };
            let steps = ring.all_gather_steps();
            // Every block except our own arrives exactly once.
            let mut got: Vec<usize> = steps.iter().map(|s| s.recv).collect();
            got.sort();
            let expected: Vec<usize> = (0..n).filter(|&b| b != rank).collect();
            assert_eq!(got, expected);
        }
        assert_eq!(Ring { n: 3, rank: 0 }.broadcast_roles(0), Ok((false, true)));
        assert_eq!(Ring { n: 3, rank: 2 }.broadcast_roles(0), Ok((true, false)));
        assert!(Ring { n: 3, rank: 2 }.broadcast_roles(3).is_err());
    }

    #[test]
    fn ring_from_view() {
        let v = View::new(
            1,
            ["c", "a", "b"]
                .iter()
                .map(|s| ViewMember {
                    id: NodeId::new(*s).unwrap(),
                    incarnation: 1,
                })
                .collect(),
        );
        let r = Ring::for_view(&v, &NodeId::new("c").unwrap()).unwrap();
        assert_eq!((r.rank, r.left(), r.right()), (2, 1, 0));
        assert!(Ring::for_view(&v, &NodeId::new("z").unwrap()).is_err());
    }
}
