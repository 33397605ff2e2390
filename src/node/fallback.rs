//! The last resort, as the Go agent's: a node pulls from the origin on its own, with no
//! member asked, only when an empty answer can be trusted and the cluster cannot have
//! pulled it meanwhile. Each gate stops a way churn turns into origin pulls: a node that
//! has just started has not reached its members (bootstrap window), an unhealthy lookup
//! misses providers that exist, a burst of misses on one node is a fault and not a cold
//! cluster (token bucket), and nodes that all find nothing at the same moment spread out
//! (jitter) so that the first one's provider record reaches the rest before they pull.
//!
//! [`OriginFallback`] holds the gates as plain state on monotonic time, for tests on
//! simulated time; [`ColdStart::fall_back`](super::ColdStart::fall_back) drives it, with
//! the jitter's wait and the recheck after it.

use std::{
    collections::HashSet,
    sync::Arc,
    time::{Duration, Instant},
};

use parking_lot::Mutex;

use crate::Digest;

/// The gates' settings, with the Go agent's defaults.
#[derive(Debug, Clone)]
pub struct FallbackConfig {
    pub(crate) bootstrap_window: Duration,
    pub(crate) per_minute: u32,
    pub(crate) jitter_base: Duration,
}

impl Default for FallbackConfig {
    fn default() -> Self {
        FallbackConfig {
            bootstrap_window: Duration::from_secs(30),
            per_minute: 2,
            jitter_base: Duration::from_secs(3),
        }
    }
}

impl FallbackConfig {
    /// No direct pull this long after the node started (default 30 s): until its
    /// members are reached and their views include it, an empty answer means nothing.
    pub fn with_bootstrap_window(mut self, window: Duration) -> Self {
        self.bootstrap_window = window;
        self
    }

    /// Direct pulls a node may start per minute, refilled continuously; also the burst
    /// (default 2).
    pub fn with_per_minute(mut self, pulls: u32) -> Self {
        self.per_minute = pulls.max(1);
        self
    }

    /// The jitter before the recheck is uniform in `[0, base × ln N)` for N members
    /// (default base 3 s; none for a single node).
    pub fn with_jitter_base(mut self, base: Duration) -> Self {
        self.jitter_base = base;
        self
    }
}

/// Why a direct origin pull was not allowed (yet): the request waits and asks again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
#[non_exhaustive]
pub enum FallbackDeclined {
    /// The node is still in its bootstrap window.
    #[error("still in the bootstrap window")]
    BootstrapWindow,
    /// The provider lookup is unhealthy, so its empty answer proves nothing.
    #[error("provider lookup unhealthy")]
    LookupUnhealthy,
    /// A direct pull of this digest is already being decided on this node.
    #[error("a direct pull of this digest is already under way")]
    InFlight,
    /// The node's direct pulls are at their rate.
    #[error("direct pulls at their rate limit")]
    RateLimited,
    /// After the jitter, a holder or a pull in progress was found.
    #[error("a holder or a pull appeared during the jitter")]
    RecheckHit,
}

impl FallbackDeclined {
    /// A short name for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            FallbackDeclined::BootstrapWindow => "bootstrap_window",
            FallbackDeclined::LookupUnhealthy => "lookup_unhealthy",
            FallbackDeclined::InFlight => "in_flight",
            FallbackDeclined::RateLimited => "rate_limited",
            FallbackDeclined::RecheckHit => "recheck_hit",
        }
    }
}

/// The gates of one node's direct origin pulls. Cheap to clone; clones share the bucket.
#[derive(Debug, Clone)]
pub struct OriginFallback {
    config: Arc<FallbackConfig>,
    started: Instant,
    state: Arc<Mutex<GateState>>,
}

#[derive(Debug)]
struct GateState {
    tokens: f64,
    refilled: Instant,
    /// Digests admitted and not yet released: one direct pull per digest.
    admitted: HashSet<Digest>,
    rng: u64,
}

/// An admitted direct pull: wait [`FallbackPermit::jitter`], recheck, then pull. The
/// digest stays held until the permit is dropped.
#[derive(Debug)]
pub struct FallbackPermit {
    state: Arc<Mutex<GateState>>,
    digest: Digest,
    jitter: Duration,
}

impl FallbackPermit {
    /// How long to wait before the recheck.
    pub fn jitter(&self) -> Duration {
        self.jitter
    }
}

impl Drop for FallbackPermit {
    fn drop(&mut self) {
        self.state.lock().admitted.remove(&self.digest);
    }
}

impl OriginFallback {
    /// The gates of a node that started at `started`, its bucket full.
    pub fn new(config: FallbackConfig, started: Instant) -> Self {
        let mut seed = [0u8; 8];
        let _ = getrandom::fill(&mut seed);
        Self::with_seed(config, started, u64::from_le_bytes(seed))
    }

    /// As [`OriginFallback::new`], with the jitter drawn from `seed`: for tests.
    pub fn with_seed(config: FallbackConfig, started: Instant, seed: u64) -> Self {
        let tokens = f64::from(config.per_minute);
        OriginFallback {
            config: Arc::new(config),
            started,
            state: Arc::new(Mutex::new(GateState {
                tokens,
                refilled: started,
                admitted: HashSet::new(),
                rng: seed,
            })),
        }
    }

    /// The gates that need no waiting, in the Go agent's order: bootstrap window, lookup
    /// health, one per digest, then a token (spent before the jitter, so that nobody
    /// waits only to find the bucket empty). `members` is the cluster size N.
    pub fn admit(
        &self,
        digest: &Digest,
        lookup_healthy: bool,
        members: usize,
        now: Instant,
    ) -> Result<FallbackPermit, FallbackDeclined> {
        if now.saturating_duration_since(self.started) < self.config.bootstrap_window {
            return Err(FallbackDeclined::BootstrapWindow);
        }
        if !lookup_healthy {
            return Err(FallbackDeclined::LookupUnhealthy);
        }
        let mut state = self.state.lock();
        if state.admitted.contains(digest) {
            return Err(FallbackDeclined::InFlight);
        }
        let capacity = f64::from(self.config.per_minute);
        let elapsed = now.saturating_duration_since(state.refilled).as_secs_f64();
        state.tokens = (state.tokens + elapsed * capacity / 60.0).min(capacity);
        state.refilled = state.refilled.max(now);
        if state.tokens < 1.0 {
            return Err(FallbackDeclined::RateLimited);
        }
        state.tokens -= 1.0;
        state.admitted.insert(*digest);
        let jitter = self.jitter(&mut state.rng, members);
        Ok(FallbackPermit {
            state: self.state.clone(),
            digest: *digest,
            jitter,
        })
    }

    fn jitter(&self, rng: &mut u64, members: usize) -> Duration {
        if members < 2 {
            return Duration::ZERO;
        }
        let window = self.config.jitter_base.as_secs_f64() * (members as f64).ln();
        // splitmix64, 53 bits of it as a fraction in [0, 1).
        *rng = rng.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *rng;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let fraction = (z >> 11) as f64 / (1u64 << 53) as f64;
        Duration::from_secs_f64(window * fraction)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(byte: &str) -> Digest {
        Digest::parse(&format!("sha256:{}", byte.repeat(32))).unwrap()
    }

    fn gate(t0: Instant) -> OriginFallback {
        OriginFallback::with_seed(FallbackConfig::default(), t0, 7)
    }

    const AFTER_BOOT: Duration = Duration::from_secs(30);

    #[test]
    fn nothing_in_the_bootstrap_window_nor_on_an_unhealthy_lookup() {
        let t0 = Instant::now();
        let gate = gate(t0);
        let d = digest("ab");
        let early = gate.admit(&d, true, 8, t0 + Duration::from_secs(29));
        assert_eq!(early.unwrap_err(), FallbackDeclined::BootstrapWindow);
        let blind = gate.admit(&d, false, 8, t0 + AFTER_BOOT);
        assert_eq!(blind.unwrap_err(), FallbackDeclined::LookupUnhealthy);
        assert!(gate.admit(&d, true, 8, t0 + AFTER_BOOT).is_ok());
    }

    #[test]
    fn one_direct_pull_per_digest_until_its_permit_is_dropped() {
        let t0 = Instant::now();
        let gate = gate(t0);
        let d = digest("ab");
        let permit = gate.admit(&d, true, 8, t0 + AFTER_BOOT).unwrap();
        let again = gate.admit(&d, true, 8, t0 + AFTER_BOOT);
        assert_eq!(again.unwrap_err(), FallbackDeclined::InFlight);
        drop(permit);
        assert!(gate.admit(&d, true, 8, t0 + AFTER_BOOT).is_ok());
    }

    #[test]
    fn two_a_minute_refilled_continuously() {
        let t0 = Instant::now();
        let gate = gate(t0);
        let at = |s: u64| t0 + AFTER_BOOT + Duration::from_secs(s);
        // Permits are dropped at once: only the bucket limits.
        assert!(gate.admit(&digest("01"), true, 8, at(0)).is_ok());
        assert!(gate.admit(&digest("02"), true, 8, at(0)).is_ok());
        let third = gate.admit(&digest("03"), true, 8, at(0));
        assert_eq!(third.unwrap_err(), FallbackDeclined::RateLimited);
        let soon = gate.admit(&digest("03"), true, 8, at(29));
        assert_eq!(soon.unwrap_err(), FallbackDeclined::RateLimited);
        assert!(gate.admit(&digest("03"), true, 8, at(30)).is_ok());
        // A long quiet spell refills to the burst, no more.
        let later = at(30 + 600);
        assert!(gate.admit(&digest("04"), true, 8, later).is_ok());
        assert!(gate.admit(&digest("05"), true, 8, later).is_ok());
        let over = gate.admit(&digest("06"), true, 8, later);
        assert_eq!(over.unwrap_err(), FallbackDeclined::RateLimited);
    }

    #[test]
    fn the_jitter_spreads_over_base_times_ln_n() {
        let t0 = Instant::now();
        let config = FallbackConfig::default().with_per_minute(10_000);
        let gate = OriginFallback::with_seed(config.clone(), t0, 42);
        let window = Duration::from_secs_f64(3.0 * (100f64).ln());
        let jitters: Vec<Duration> = (0..1000u32)
            .map(|i| {
                let d = digest(&format!("{:02x}", i % 256));
                let at = t0 + AFTER_BOOT + Duration::from_secs(u64::from(i));
                gate.admit(&d, true, 100, at).unwrap().jitter()
            })
            .collect();
        assert!(jitters.iter().all(|j| *j < window));
        let low = jitters.iter().filter(|j| **j < window / 2).count();
        assert!((400..600).contains(&low), "{low} of 1000 in the lower half");
        // A single node has nobody to wait for.
        let alone = gate.admit(
            &digest("ff"),
            true,
            1,
            t0 + AFTER_BOOT + Duration::from_secs(2000),
        );
        assert_eq!(alone.unwrap().jitter(), Duration::ZERO);
        // The same seed gives the same jitters.
        let replay = OriginFallback::with_seed(config, t0, 42);
        let first = replay
            .admit(&digest("00"), true, 100, t0 + AFTER_BOOT)
            .unwrap();
        assert_eq!(first.jitter(), jitters[0]);
    }
}
