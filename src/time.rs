//! The protocol layer's clock: every `Instant` the behaviour and its handlers act on
//! comes from [`now`], so a unit test can move time forward without waiting. Wall-clock
//! time, [`wall`], only bounds the timestamps peers send.

#[cfg(not(test))]
use std::time::Instant;
use std::time::SystemTime;

/// The current wall-clock time, to clamp peers' timestamps with.
pub(crate) fn wall() -> SystemTime {
    SystemTime::now()
}

/// The current monotonic time.
#[cfg(not(test))]
pub(crate) fn now() -> Instant {
    Instant::now()
}

#[cfg(test)]
pub(crate) use simulated::{advance, now};

#[cfg(test)]
mod simulated {
    use std::{
        cell::Cell,
        time::{Duration, Instant},
    };

    thread_local! {
        static AHEAD: Cell<Duration> = const { Cell::new(Duration::ZERO) };
    }

    /// The current time on this test thread: the system's, plus what it was advanced.
    pub(crate) fn now() -> Instant {
        Instant::now() + AHEAD.with(Cell::get)
    }

    /// Moves this test thread's time forward.
    pub(crate) fn advance(by: Duration) {
        AHEAD.with(|ahead| ahead.set(ahead.get() + by));
    }
}
