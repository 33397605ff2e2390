//! Where time comes from. Local waits and deadlines run on monotonic time; wall-clock
//! time is only for the timestamps peers send (when a pull started, until when a failure
//! cools down), which are compared with this node's own wall clock.

use std::{
    ops::Add,
    time::{Duration, Instant, SystemTime},
};

use futures::{future::BoxFuture, FutureExt};

/// The node layer's clocks, and how it waits on them; tests bring one they control.
pub trait Clock: Send + Sync + 'static {
    /// The current wall-clock time: for peers' timestamps and nothing else.
    fn now(&self) -> SystemTime;

    /// The current monotonic time: for this node's own waits and deadlines.
    fn instant(&self) -> Instant {
        Instant::now()
    }

    /// A future that completes once [`Clock::instant`] has reached `at`.
    fn sleep_until(&self, at: Instant) -> BoxFuture<'static, ()> {
        futures_timer::Delay::new(at.saturating_duration_since(self.instant())).boxed()
    }

    /// Both clocks, read together.
    fn read(&self) -> Now {
        Now {
            instant: self.instant(),
            wall: self.now(),
        }
    }
}

/// The system's clocks and timers.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// One reading of both clocks, as the [`Cascade`](crate::Cascade) takes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// Monotonic time, for local waits.
    pub instant: Instant,
    /// Wall-clock time, to compare peers' timestamps with.
    pub wall: SystemTime,
}

impl Now {
    /// The system clocks, now.
    pub fn system() -> Self {
        SystemClock.read()
    }

    /// How long ago a peer's timestamp was; zero for one in the future.
    pub fn age_of(&self, peer_time: SystemTime) -> Duration {
        self.wall.duration_since(peer_time).unwrap_or_default()
    }

    /// The local instant at which a peer's timestamp comes; now for one in the past.
    pub fn instant_of(&self, peer_time: SystemTime) -> Instant {
        self.instant + peer_time.duration_since(self.wall).unwrap_or_default()
    }
}

impl Add<Duration> for Now {
    type Output = Now;

    fn add(self, elapsed: Duration) -> Now {
        Now {
            instant: self.instant + elapsed,
            wall: self.wall + elapsed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_times_map_onto_local_time_saturating_at_now() {
        let now = Now::system();
        let later = now.wall + Duration::from_secs(5);
        let earlier = now.wall - Duration::from_secs(5);
        assert_eq!(now.instant_of(later), now.instant + Duration::from_secs(5));
        assert_eq!(now.instant_of(earlier), now.instant);
        assert_eq!(now.age_of(earlier), Duration::from_secs(5));
        assert_eq!(now.age_of(later), Duration::ZERO);
        let then = now + Duration::from_secs(1);
        assert_eq!(then.age_of(now.wall), Duration::from_secs(1));
    }
}
