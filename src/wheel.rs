//! One timing wheel per worker thread, for every socket's pings, ping deadlines,
//! heartbeats, stuck-write guards, drains and close deadlines.
//!
//! A socket never owns a timer: it names the tick it next wants to be woken at, and the
//! worker advances the wheel once per tick for all its sockets. Inserting is O(1); an
//! entry that became stale (its socket asked for an earlier tick since) is dropped when
//! its slot comes round. Time is counted in ticks of [`TICK`] from the worker's start.

use std::time::Duration;

use tokio::time::Instant;

/// The wheel's resolution: no deadline fires earlier, none more than one tick late.
pub const TICK: Duration = Duration::from_millis(10);
/// Slots in the wheel; later deadlines wait in their slot for more rounds.
const SLOTS: usize = 1024;

/// A moment, in ticks since the worker's clock started (64 bits: no wrap in practice).
pub type Tick = u64;

/// Converts between instants and ticks.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    epoch: Instant,
}

impl Clock {
    pub fn new() -> Self {
        Clock {
            epoch: Instant::now(),
        }
    }

    /// The current tick (rounded down).
    pub fn now(&self) -> Tick {
        (self.epoch.elapsed().as_nanos() / TICK.as_nanos()) as Tick
    }

    /// Ticks covering `duration`, rounded up, at least one.
    pub fn ticks(duration: Duration) -> Tick {
        let ticks = duration.as_nanos().div_ceil(TICK.as_nanos());
        ticks.clamp(1, u128::from(u32::MAX)) as Tick
    }
}

impl Default for Clock {
    fn default() -> Self {
        Clock::new()
    }
}

pub struct Wheel<T> {
    slots: Box<[Vec<(Tick, T)>]>,
    /// The next tick to process.
    cursor: Tick,
    len: usize,
}

impl<T> Default for Wheel<T> {
    fn default() -> Self {
        Wheel {
            slots: (0..SLOTS).map(|_| Vec::new()).collect(),
            cursor: 0,
            len: 0,
        }
    }
}

impl<T> Wheel<T> {
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Schedules `item` for `tick`; a tick already past fires at the next advance (with
    /// the tick it was scheduled for).
    pub fn insert(&mut self, tick: Tick, item: T) {
        let slot = tick.max(self.cursor) as usize % SLOTS;
        self.slots[slot].push((tick, item));
        self.len += 1;
    }

    /// Fires every entry due at or before `now`, with its tick.
    pub fn advance(&mut self, now: Tick, mut fire: impl FnMut(Tick, T)) {
        if now < self.cursor {
            return;
        }
        let span = (now - self.cursor) as usize + 1;
        for i in 0..span.min(SLOTS) {
            let slot = (self.cursor as usize + i) % SLOTS;
            for (tick, item) in self.slots[slot].extract_if(.., |(tick, _)| *tick <= now) {
                self.len -= 1;
                fire(tick, item);
            }
        }
        self.cursor = now + 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fired(wheel: &mut Wheel<&'static str>, now: Tick) -> Vec<&'static str> {
        let mut out = Vec::new();
        wheel.advance(now, |_, item| out.push(item));
        out.sort_unstable();
        out
    }

    #[test]
    fn entries_fire_at_their_tick_not_before() {
        let mut wheel = Wheel::default();
        wheel.insert(3, "a");
        wheel.insert(5, "b");
        wheel.insert(5 + SLOTS as Tick, "c"); // same slot, a later round
        assert!(fired(&mut wheel, 2).is_empty());
        assert_eq!(fired(&mut wheel, 4), ["a"]);
        assert_eq!(fired(&mut wheel, 5), ["b"]);
        assert!(!wheel.is_empty());
        assert_eq!(fired(&mut wheel, 5 + SLOTS as Tick), ["c"]);
        assert!(wheel.is_empty());
    }

    #[test]
    fn a_late_advance_fires_everything_due() {
        let mut wheel = Wheel::default();
        for (tick, name) in [(1, "a"), (700, "b"), (3000, "c"), (9000, "d")] {
            wheel.insert(tick, name);
        }
        assert_eq!(fired(&mut wheel, 5000), ["a", "b", "c"]);
        wheel.insert(10, "past");
        let mut ticks = Vec::new();
        wheel.advance(5001, |tick, _| ticks.push(tick));
        assert_eq!(ticks, [10], "a past entry fires with its own tick");
        assert_eq!(fired(&mut wheel, 9000), ["d"]);
    }

    #[test]
    fn ticks_round_up() {
        assert_eq!(Clock::ticks(Duration::ZERO), 1);
        assert_eq!(Clock::ticks(TICK), 1);
        assert_eq!(Clock::ticks(TICK + Duration::from_nanos(1)), 2);
        assert_eq!(Clock::ticks(Duration::from_secs(30)), 3000);
    }
}
