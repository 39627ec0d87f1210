//! The wait counter: how long this node spent waiting for peers to reach a collective
//! (`DataPlaneStats::wait_s`). A collective is *opening* from its start until its ring is
//! open (its right neighbour acknowledged our header and its left neighbour's header
//! arrived: both have started the same collective); time accrues while this node has
//! collectives in flight and every one of them is still opening, so collectives that run
//! concurrently (a step's buckets) count once, and none accrues while any of them moves
//! data. Dialing a link that is not pooled yet is part of opening. Stalls after the ring is
//! open (a neighbour slow mid-stream, or in a ring of 3 or more a member further along,
//! whose lateness arrives as late segments) are not counted: they are communication.

use super::DataPlane;
use std::time::{Duration, Instant};

/// Collectives in flight and opening, and the waiting time they add up to.
#[derive(Debug, Default)]
pub(super) struct WaitClock {
    /// Collectives in flight.
    in_flight: u32,
    /// Of them, those still opening their ring.
    opening: u32,
    /// Since when every collective in flight has been opening (while they are).
    since: Option<Instant>,
    /// Waiting time before `since`.
    total: Duration,
}

/// Which count a [`Counted`] guard holds.
#[derive(Clone, Copy, Debug)]
pub(super) enum Count {
    /// A collective in flight.
    InFlight,
    /// A collective opening its ring.
    Opening,
}

impl WaitClock {
    fn waiting(&self) -> bool {
        self.opening > 0 && self.opening >= self.in_flight
    }

    /// Adds `delta` to `count` at `now`, accruing the wait up to it.
    fn change(&mut self, count: Count, delta: i32, now: Instant) {
        if let Some(since) = self.since.take() {
            self.total += now.saturating_duration_since(since);
        }
        let c = match count {
            Count::InFlight => &mut self.in_flight,
            Count::Opening => &mut self.opening,
        };
        *c = c.saturating_add_signed(delta);
        if self.waiting() {
            self.since = Some(now);
        }
    }

    /// The waiting time up to `now`.
    fn total_at(&self, now: Instant) -> Duration {
        self.total
            + self
                .since
                .map_or(Duration::ZERO, |s| now.saturating_duration_since(s))
    }
}

/// Holds one count of the wait clock until dropped (a collective's future may be dropped
/// midway: the count goes with it).
pub(super) struct Counted {
    dp: DataPlane,
    count: Count,
}

impl Drop for Counted {
    fn drop(&mut self) {
        let mut w = self.dp.inner.wait.lock().unwrap_or_else(|e| e.into_inner());
        w.change(self.count, -1, Instant::now());
    }
}

impl DataPlane {
    /// Counts one collective in flight or opening until the guard is dropped.
    pub(super) fn count(&self, count: Count) -> Counted {
        self.inner
            .wait
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .change(count, 1, Instant::now());
        Counted {
            dp: self.clone(),
            count,
        }
    }

    /// Time this node has spent waiting for peers to reach its collectives so far (see
    /// the module's documentation); `DataPlaneStats::wait_s` reports the same.
    pub fn wait_time(&self) -> Duration {
        self.inner
            .wait
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .total_at(Instant::now())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Waiting accrues only while every collective in flight is opening; concurrent ones
    /// count once.
    #[test]
    fn waits_accrue_while_all_in_flight_are_opening() {
        let t = Instant::now();
        let ms = Duration::from_millis;
        let mut w = WaitClock::default();
        // Two buckets start and open at t..t+10: 10 ms of waiting, not 20.
        for _ in 0..2 {
            w.change(Count::InFlight, 1, t);
            w.change(Count::Opening, 1, t);
        }
        w.change(Count::Opening, -1, t + ms(10));
        assert_eq!(w.total_at(t + ms(10)), ms(10));
        // One moves data while the other is still opening: no waiting.
        w.change(Count::Opening, -1, t + ms(15));
        assert_eq!(w.total_at(t + ms(30)), ms(10));
        w.change(Count::InFlight, -1, t + ms(30));
        w.change(Count::InFlight, -1, t + ms(31));
        // Idle: no waiting.
        assert_eq!(w.total_at(t + ms(50)), ms(10));
        // An opening collective waits until it opens; the total grows while it does.
        w.change(Count::InFlight, 1, t + ms(50));
        w.change(Count::Opening, 1, t + ms(50));
        assert_eq!(w.total_at(t + ms(55)), ms(15));
        w.change(Count::Opening, -1, t + ms(60));
        w.change(Count::InFlight, -1, t + ms(70));
        assert_eq!(w.total_at(t + ms(100)), ms(20));
    }
}
