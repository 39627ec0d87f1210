//! Where a step's time goes: the phases a training step (or a DiLoCo outer round) is split
//! into, and the clock that records them on a member ([`PhaseClock`]).
//!
//! The phases partition the step's wall time on the member's training thread, from its
//! start to the end of the update (`step_ms` ends a few microseconds later, after reading
//! the data plane's counters): each moment belongs to the phase of the work that ended
//! next, so the bookkeeping between the instrumented calls (microseconds) goes with them.
//! - **data**: choosing the member's samples of the batch (the epoch's order, computed
//!   once per data epoch), reading, tokenizing and collating them, and moving them to the
//!   model's device (`Dataset::train_batch`);
//! - **compute**: forward and backward (the gradient of the member's samples, flattened),
//!   and the guard's norm of it; in a guard redo, the recomputation too;
//! - **wait**: of the all-reduce, the time this member waited for slower peers to start it:
//!   the data plane's `wait_s` over the all-reduce (time during which every collective this
//!   node had in flight was still opening its ring: waiting for its neighbours' headers
//!   and acknowledgements, i.e. for them to reach the same collective). Drawn at the start
//!   of the all-reduce;
//! - **comm**: the rest of the all-reduce: moving and summing the data (including stalls
//!   of a neighbour mid-stream, and, in a ring of 3 or more, waits for a member further
//!   along the ring, which reach this member as late segments). NCCL all-reduces have no
//!   data-plane wait: all their time is comm;
//! - **optimizer**: the update that commits the step (the fused AdamW/SGD step and the
//!   cursor); in DiLoCo also every inner step's update, the pseudo-gradient and the outer
//!   Nesterov step.
//!
//! In a DiLoCo round the time between inner steps (the round machine choosing the next
//! batch) is data, and the commit after the outer step (the inner optimizer's state kept
//! for a redo, the samples log's lines) is optimizer.

use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// Most spans one step or round keeps for its trace (a DiLoCo round of many inner steps
/// records about 3 per inner step): 65 536. Later spans still count in the totals.
pub const MAX_SPANS: usize = 1 << 16;

/// One phase of a step.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Reading, tokenizing, collating and moving the member's samples.
    Data,
    /// Forward and backward (and the guard's norm).
    Compute,
    /// In the all-reduce, waiting for slower peers to start it.
    Wait,
    /// In the all-reduce, moving and summing data.
    Comm,
    /// The optimizer update and the commit.
    Optimizer,
}

impl Phase {
    /// Every phase, in the order a step runs them.
    pub const ALL: [Phase; 5] = [
        Phase::Data,
        Phase::Compute,
        Phase::Wait,
        Phase::Comm,
        Phase::Optimizer,
    ];

    /// Its name in the trace: `data`, `compute`, `wait`, `comm`, `optimizer`.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Data => "data",
            Phase::Compute => "compute",
            Phase::Wait => "wait",
            Phase::Comm => "comm",
            Phase::Optimizer => "optimizer",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A step's (or outer round's) wall time by phase, in ms: the `phases` object of its
/// `metrics.jsonl` line. The phases partition the step up to the end of its update, so
/// their sum is `step_ms` (`round_ms`) less a few microseconds; see the module's
/// documentation for what each one measures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Phases {
    /// Choosing, reading, tokenizing and collating this member's samples and moving them to
    /// the device, ms.
    pub data_ms: f64,
    /// Forward and backward, the guard's norm, and any guard redo's recomputation, ms.
    pub compute_ms: f64,
    /// Of the all-reduce(s): moving and summing data, ms.
    pub comm_ms: f64,
    /// Of the all-reduce(s): waiting for slower peers to start them (the data plane's
    /// `wait_s`; 0 under NCCL), ms.
    pub wait_ms: f64,
    /// The optimizer update and the commit (DiLoCo: inner updates, pseudo-gradient and
    /// outer step), ms.
    pub optimizer_ms: f64,
}

impl Phases {
    /// The sum of the phases, ms.
    pub fn total_ms(&self) -> f64 {
        self.data_ms + self.compute_ms + self.comm_ms + self.wait_ms + self.optimizer_ms
    }
}

/// One recorded span of a phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    /// The phase.
    pub phase: Phase,
    /// Its start.
    pub start: Instant,
    /// Its end.
    pub end: Instant,
}

/// Records one step's (or round's) phases as it runs, so that they partition its time:
/// [`mark`](Self::mark) gives a phase every moment since the step started that no phase
/// holds yet; [`region`](Self::region) records a span measured around a call (the data
/// load inside the gradient computation) whose surroundings a later `mark` fills.
/// [`start`](Self::start) begins a step.
#[derive(Clone, Debug)]
pub struct PhaseClock {
    /// When the step started.
    start: Instant,
    /// Every moment from `start` to here belongs to a phase.
    filled_to: Instant,
    /// Regions recorded after `filled_to`, in order; the next `mark` fills around them.
    pending: Vec<Span>,
    /// The spans in order, at most [`MAX_SPANS`].
    spans: Vec<Span>,
    /// A span that starts before this never extends the latest one (an inner step ended
    /// there).
    merge_floor: Instant,
    /// Each phase's total (kept past [`MAX_SPANS`]).
    totals: [Duration; 5],
    /// DiLoCo's inner steps: (global step, 1-based; start; end), at most [`MAX_SPANS`].
    inner: Vec<(u64, Instant, Instant)>,
}

impl Default for PhaseClock {
    fn default() -> Self {
        PhaseClock::new(Instant::now())
    }
}

impl PhaseClock {
    /// A clock whose step starts at `at`.
    pub fn new(at: Instant) -> PhaseClock {
        PhaseClock {
            start: at,
            filled_to: at,
            pending: Vec::new(),
            spans: Vec::new(),
            merge_floor: at,
            totals: [Duration::ZERO; 5],
            inner: Vec::new(),
        }
    }

    /// Begins a step (or round) at `at`: forgets the previous one's spans.
    pub fn start(&mut self, at: Instant) {
        self.start = at;
        self.filled_to = at;
        self.merge_floor = at;
        self.pending.clear();
        self.spans.clear();
        self.totals = [Duration::ZERO; 5];
        self.inner.clear();
    }

    /// When the step started.
    pub fn started(&self) -> Instant {
        self.start
    }

    /// Where the latest recorded span ends.
    fn latest(&self) -> Instant {
        self.pending.last().map_or(self.filled_to, |s| s.end)
    }

    /// Gives `phase` every moment from the step's start to now that no phase holds yet
    /// (around the regions recorded since the last mark). Returns now.
    pub fn mark(&mut self, phase: Phase) -> Instant {
        let now = Instant::now();
        self.fill(phase, now);
        now
    }

    /// [`region`](Self::region) ending at `now`.
    fn region_at(&mut self, phase: Phase, from: Instant, now: Instant) {
        let from = from.max(self.latest());
        if now > from {
            self.totals[phase.index()] += now - from;
            self.pending.push(Span {
                phase,
                start: from,
                end: now,
            });
        }
    }

    /// [`all_reduce`](Self::all_reduce) ending at `now`.
    fn all_reduce_at(&mut self, waited: Duration, now: Instant) {
        let from = self.latest();
        self.fill(
            Phase::Wait,
            from + waited.min(now.saturating_duration_since(from)),
        );
        self.fill(Phase::Comm, now);
    }

    /// [`inner_step`](Self::inner_step) ending at `now`.
    fn inner_step_at(&mut self, step: u64, now: Instant) {
        let from = self.inner.last().map_or(self.start, |i| i.2);
        if self.inner.len() < MAX_SPANS {
            self.inner.push((step, from, now));
        }
        self.merge_floor = now;
    }

    /// Records `phase` over `from..now` (clipped to start where the latest span ends),
    /// leaving the time before it to the next [`mark`](Self::mark). Returns now.
    pub fn region(&mut self, phase: Phase, from: Instant) -> Instant {
        let now = Instant::now();
        self.region_at(phase, from, now);
        now
    }

    /// An all-reduce ended now, during which the data plane counted `waited` of waiting
    /// for peers: from where the latest span ends, `wait` first (at most all of it), then
    /// `comm`.
    pub fn all_reduce(&mut self, waited: Duration) {
        self.all_reduce_at(waited, Instant::now());
    }

    /// DiLoCo: inner step `step` (global, 1-based) ended now; it began where the previous
    /// one ended (or the round started).
    pub fn inner_step(&mut self, step: u64) {
        self.inner_step_at(step, Instant::now());
    }

    /// Gives `phase` the time from `filled_to` to `to` around the pending regions.
    fn fill(&mut self, phase: Phase, to: Instant) {
        let mut at = self.filled_to;
        for s in std::mem::take(&mut self.pending) {
            self.hole(phase, at, s.start);
            self.store(s);
            at = at.max(s.end);
        }
        self.hole(phase, at, to);
        self.filled_to = self.filled_to.max(to).max(at);
    }

    /// Gives `phase` the time `from..to` (if any).
    fn hole(&mut self, phase: Phase, from: Instant, to: Instant) {
        if to > from {
            self.totals[phase.index()] += to - from;
            self.store(Span {
                phase,
                start: from,
                end: to,
            });
        }
    }

    /// Keeps `s` for the trace: extending the latest span when it is of the same phase
    /// and ends where `s` starts (within one inner step), else as a span of its own while
    /// fewer than [`MAX_SPANS`] are kept.
    fn store(&mut self, s: Span) {
        if let Some(last) = self.spans.last_mut() {
            if last.phase == s.phase && last.end == s.start && s.start > self.merge_floor {
                last.end = s.end;
                return;
            }
        }
        if self.spans.len() < MAX_SPANS {
            self.spans.push(s);
        }
    }

    /// The recorded spans, in order.
    pub fn spans(&self) -> &[Span] {
        &self.spans
    }

    /// DiLoCo's inner steps: (global step, start, end).
    pub fn inner_steps(&self) -> &[(u64, Instant, Instant)] {
        &self.inner
    }

    /// The totals so far, ms.
    pub fn totals(&self) -> Phases {
        let ms = |p: Phase| self.totals[p.index()].as_secs_f64() * 1e3;
        Phases {
            data_ms: ms(Phase::Data),
            compute_ms: ms(Phase::Compute),
            comm_ms: ms(Phase::Comm),
            wait_ms: ms(Phase::Wait),
            optimizer_ms: ms(Phase::Optimizer),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// A step's phases partition its time: a region recorded inside a call (the data load
    /// inside the gradient computation) is kept, and the mark after the call takes the time
    /// around it; the totals add up to the time marked.
    #[test]
    fn marks_fill_around_regions_and_partition_the_step() {
        let t0 = Instant::now();
        let mut c = PhaseClock::new(t0);
        c.fill(Phase::Data, t0 + ms(1)); // selecting the samples
        c.region_at(Phase::Data, t0 + ms(2), t0 + ms(4)); // the load, inside compute
        c.fill(Phase::Compute, t0 + ms(10));
        c.all_reduce_at(ms(3), t0 + ms(15));
        c.fill(Phase::Optimizer, t0 + ms(16));
        let got: Vec<(Phase, Duration, Duration)> = c
            .spans()
            .iter()
            .map(|s| (s.phase, s.start - t0, s.end - t0))
            .collect();
        use Phase::*;
        assert_eq!(
            got,
            [
                (Data, ms(0), ms(1)),
                (Compute, ms(1), ms(2)),
                (Data, ms(2), ms(4)),
                (Compute, ms(4), ms(10)),
                (Wait, ms(10), ms(13)),
                (Comm, ms(13), ms(15)),
                (Optimizer, ms(15), ms(16)),
            ]
        );
        let p = c.totals();
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(close(p.data_ms, 3.0) && close(p.compute_ms, 7.0), "{p:?}");
        assert!(close(p.wait_ms, 3.0) && close(p.comm_ms, 2.0), "{p:?}");
        assert!(
            close(p.optimizer_ms, 1.0) && close(p.total_ms(), 16.0),
            "{p:?}"
        );
        // The same phase again extends the latest span.
        c.fill(Phase::Optimizer, t0 + ms(17));
        assert_eq!(c.spans().len(), 7);
        assert_eq!(c.spans()[6].end, t0 + ms(17));
        // A new step forgets the old one.
        c.start(t0 + ms(20));
        assert!(c.spans().is_empty() && c.totals().total_ms() == 0.0);
        assert_eq!(c.started(), t0 + ms(20));
    }

    /// A wait longer than the all-reduce (the counter ran before it started) is clipped to
    /// it; a region overlapping recorded time is clipped to start after it.
    #[test]
    fn waits_and_regions_are_clipped() {
        let t0 = Instant::now();
        let mut c = PhaseClock::new(t0);
        c.fill(Phase::Compute, t0 + ms(5));
        c.all_reduce_at(Duration::from_secs(60), t0 + ms(8));
        let p = c.totals();
        assert!((p.wait_ms - 3.0).abs() < 1e-9 && p.comm_ms == 0.0, "{p:?}");
        c.region_at(Phase::Data, t0, t0 + ms(9));
        c.fill(Phase::Compute, t0 + ms(9));
        let p = c.totals();
        assert!((p.data_ms - 1.0).abs() < 1e-9, "{p:?}");
        assert!((p.total_ms() - 9.0).abs() < 1e-9, "{p:?}");
    }

    /// DiLoCo: inner steps tile the round from its start; a phase never extends a span of
    /// the previous inner step.
    #[test]
    fn inner_steps_tile_the_round() {
        let t0 = Instant::now();
        let mut c = PhaseClock::new(t0);
        c.fill(Phase::Data, t0 + ms(1));
        c.inner_step_at(1, t0 + ms(1));
        c.fill(Phase::Data, t0 + ms(2));
        c.inner_step_at(2, t0 + ms(2));
        let inner: Vec<(u64, Duration, Duration)> = c
            .inner_steps()
            .iter()
            .map(|&(k, a, b)| (k, a - t0, b - t0))
            .collect();
        assert_eq!(inner, [(1, ms(0), ms(1)), (2, ms(1), ms(2))]);
        assert_eq!(c.spans().len(), 2);
    }

    /// The `phases` object of a metrics line.
    #[test]
    fn phases_serialize_as_named_ms() {
        let p = Phases {
            data_ms: 1.0,
            compute_ms: 2.0,
            comm_ms: 3.0,
            wait_ms: 4.0,
            optimizer_ms: 5.0,
        };
        let v = serde_json::to_value(p).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"data_ms": 1.0, "compute_ms": 2.0, "comm_ms": 3.0,
                "wait_ms": 4.0, "optimizer_ms": 5.0})
        );
        assert_eq!(p.total_ms(), 15.0);
        assert_eq!(
            Phase::ALL.map(Phase::name),
            ["data", "compute", "wait", "comm", "optimizer"]
        );
    }
}
