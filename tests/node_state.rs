//! The decisions of the node state, with a clock the test controls.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use gantry_coord::{
    Authorization, Clock, Digest, FailureClass, Member, MemoryStore, NodeState, OriginRefKind,
    Outcome, PleasePull, PullOrder, PullerPump, PumpDecision, RecentFailure, StaticMembership,
};

#[derive(Clone)]
struct ManualClock(Arc<Mutex<SystemTime>>);

impl ManualClock {
    fn new() -> Self {
        ManualClock(Arc::new(Mutex::new(
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        )))
    }
    fn advance(&self, by: Duration) {
        *self.0.lock().unwrap() += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.0.lock().unwrap()
    }
}

/// A pump that records what it was asked and starts everything.
#[derive(Clone, Default)]
struct RecordingPump(Arc<Mutex<Vec<Order>>>);

/// (registry, repository, digest, kind, authorization) as the pump saw them.
type Order = (String, String, String, OriginRefKind, Option<String>);

impl PullerPump for RecordingPump {
    fn start(&self, order: PullOrder<'_>) -> PumpDecision {
        self.0.lock().unwrap().push((
            order.registry.into(),
            order.repository.into(),
            order.digest.to_string(),
            order.kind,
            order.authorization.map(|a| a.expose_secret().to_owned()),
        ));
        PumpDecision::Started
    }
}

fn digest(byte: &str) -> Digest {
    Digest::parse(&format!("sha256:{}", byte.repeat(32))).unwrap()
}

fn cluster(local: &str) -> StaticMembership {
    let members = [
        "node-a", "node-b", "node-c", "node-d", "worker-1", "worker-2", "worker-3",
    ]
    .into_iter()
    .map(|id| Member::new(id, None))
    .collect();
    StaticMembership::new(local, members)
}

fn request(digests: Vec<Digest>) -> PleasePull {
    PleasePull::new("docker.io", "library/nginx", OriginRefKind::Blob, digests).unwrap()
}

#[test]
fn pull_intent_reports_store_rank_and_nothing_else_when_idle() {
    let store = MemoryStore::new();
    store.insert(digest("ab"));
    let state = NodeState::builder(cluster("node-c"))
        .store(store.clone())
        .build();

    let cached = state.local_pull_intent(&digest("ab"));
    assert!(cached.has_cached);
    // Fixed vectors in src/hrw.rs: for sha256:ab…, node-c ranks 1; for sha256:01…, 3.
    assert_eq!(cached.hrw_rank, Some(1));
    assert_eq!(cached.in_flight_since, None);
    assert_eq!(cached.recently_failed, None);
    let miss = state.local_pull_intent(&digest("01"));
    assert!(!miss.has_cached);
    assert_eq!(miss.hrw_rank, Some(3));
    assert_eq!(state.signals().storage_unavailable, 0);
    assert_eq!(
        state.signals().pull_intent_served,
        0,
        "local calls are not wire traffic"
    );
}

#[test]
fn unavailable_store_never_reads_as_cached_and_is_signalled() {
    let store = MemoryStore::new();
    store.insert(digest("ab"));
    store.set_unavailable(true);
    let state = NodeState::builder(cluster("node-a")).store(store).build();
    assert!(!state.local_pull_intent(&digest("ab")).has_cached);
    assert_eq!(state.signals().storage_unavailable, 1);
}

#[test]
fn rank_is_none_without_membership_or_outside_it() {
    let alone = NodeState::builder(StaticMembership::new("node-a", vec![])).build();
    assert_eq!(alone.local_pull_intent(&digest("ab")).hrw_rank, None);
    let outsider = NodeState::builder(cluster("stranger")).build();
    assert_eq!(outsider.local_pull_intent(&digest("ab")).hrw_rank, None);
}

#[test]
fn without_a_pump_every_outcome_is_unspecified() {
    let state = NodeState::builder(cluster("node-a")).build();
    let outcomes = state.start_local_pull(&request(vec![digest("01"), digest("02")]));
    assert_eq!(outcomes.len(), 2);
    assert!(outcomes.iter().all(|o| o.outcome == Outcome::Unspecified));
    assert_eq!(state.signals().moved_in_flight, 0);
}

#[test]
fn pulls_dedupe_fail_cool_down_and_restart() {
    let clock = ManualClock::new();
    let pump = RecordingPump::default();
    let state = NodeState::builder(cluster("node-a"))
        .clock(clock.clone())
        .pump(pump.clone())
        .build();
    let t0 = clock.now();
    let d = digest("01");
    let authorized = request(vec![d]).with_authorization(Authorization::new("Basic x"));

    assert_eq!(
        state.start_local_pull(&authorized)[0].outcome,
        Outcome::Started { started_at: t0 }
    );
    assert_eq!(state.local_pull_intent(&d).in_flight_since, Some(t0));
    clock.advance(Duration::from_secs(1));
    assert_eq!(
        state.start_local_pull(&request(vec![d]))[0].outcome,
        Outcome::AlreadyPulling { started_at: t0 }
    );
    assert_eq!(pump.0.lock().unwrap().len(), 1, "the pump is asked once");
    assert_eq!(
        pump.0.lock().unwrap()[0],
        (
            "docker.io".into(),
            "library/nginx".into(),
            d.to_string(),
            OriginRefKind::Blob,
            Some("Basic x".into())
        )
    );

    state.finish_pull(&d, Err(FailureClass::RateLimited));
    let t1 = clock.now();
    let failed = Outcome::RecentlyFailed(RecentFailure {
        cooldown_until: t1 + Duration::from_secs(10),
        class: FailureClass::RateLimited,
    });
    assert_eq!(state.start_local_pull(&request(vec![d]))[0].outcome, failed);
    let intent = state.local_pull_intent(&d);
    assert_eq!(intent.in_flight_since, None);
    assert_eq!(
        intent.recently_failed,
        Some(RecentFailure {
            cooldown_until: t1 + Duration::from_secs(10),
            class: FailureClass::RateLimited
        })
    );

    // Live through its last instant, as Go's `After` test: no pull at the end itself.
    clock.advance(Duration::from_secs(10));
    assert_eq!(state.start_local_pull(&request(vec![d]))[0].outcome, failed);
    // Past it the entry heals: the digest may be pulled again, and a failure after
    // expiry starts the ladder again at 10 s rather than escalating to 30 s.
    clock.advance(Duration::from_secs(1));
    let t2 = clock.now();
    assert_eq!(
        state.start_local_pull(&request(vec![d]))[0].outcome,
        Outcome::Started { started_at: t2 }
    );
    state.finish_pull(&d, Err(FailureClass::Transient));
    let until = |state: &NodeState| {
        state
            .local_pull_intent(&d)
            .recently_failed
            .map(|f| f.cooldown_until)
    };
    assert_eq!(until(&state), Some(t2 + Duration::from_secs(10)));
    // A failure recorded while the entry lives escalates.
    state.finish_pull(&d, Err(FailureClass::Transient));
    assert_eq!(until(&state), Some(t2 + Duration::from_secs(30)));
    assert_eq!(state.signals().moved_in_flight, 2);

    // Success clears the failure.
    clock.advance(Duration::from_secs(30));
    state.start_local_pull(&request(vec![d]));
    state.finish_pull(&d, Ok(()));
    assert_eq!(state.local_pull_intent(&d).recently_failed, None);
}

/// A pump at its ceiling.
struct DecliningPump;

impl PullerPump for DecliningPump {
    fn start(&self, _: PullOrder<'_>) -> PumpDecision {
        PumpDecision::Declined
    }
}

#[test]
fn a_full_in_flight_map_or_a_declining_pump_answers_unspecified() {
    let state = NodeState::builder(cluster("node-a"))
        .in_flight(gantry_coord::InFlightMap::new(1))
        .pump(RecordingPump::default())
        .build();
    let outcomes = state.start_local_pull(&request(vec![digest("01"), digest("02")]));
    assert!(matches!(outcomes[0].outcome, Outcome::Started { .. }));
    assert_eq!(
        outcomes[1].outcome,
        Outcome::Unspecified,
        "over the ceiling"
    );
    assert_eq!(state.local_pull_intent(&digest("02")).in_flight_since, None);

    let declining = NodeState::builder(cluster("node-a"))
        .pump(DecliningPump)
        .build();
    let outcomes = declining.start_local_pull(&request(vec![digest("03")]));
    assert_eq!(outcomes[0].outcome, Outcome::Unspecified);
    assert_eq!(
        declining.local_pull_intent(&digest("03")).in_flight_since,
        None
    );
    assert_eq!(declining.signals().moved_in_flight, 0);
    assert_eq!(declining.signals().declined_pulls, 1);
    assert_eq!(declining.signals().please_pull_served, 0, "a local call");
}

#[test]
fn full_map_counts_as_declined() {
    let state = NodeState::builder(cluster("node-a"))
        .in_flight(gantry_coord::InFlightMap::new(1))
        .pump(RecordingPump::default())
        .build();
    state.start_local_pull(&request(vec![digest("01"), digest("02"), digest("03")]));
    let signals = state.signals();
    assert_eq!((signals.moved_in_flight, signals.declined_pulls), (1, 2));
}

/// A pump that is already pulling everything, since a given time.
struct BusyPump(SystemTime);

impl PullerPump for BusyPump {
    fn start(&self, _: PullOrder<'_>) -> PumpDecision {
        PumpDecision::AlreadyPulling { started_at: self.0 }
    }
}

#[test]
fn a_pumps_already_pulling_keeps_its_real_start() {
    let clock = ManualClock::new();
    let started = clock.now() - Duration::from_secs(90);
    let state = NodeState::builder(cluster("node-a"))
        .clock(clock.clone())
        .pump(BusyPump(started))
        .build();
    let d = digest("01");
    assert_eq!(
        state.start_local_pull(&request(vec![d]))[0].outcome,
        Outcome::AlreadyPulling {
            started_at: started
        },
        "a stalled pull must look as old as it is"
    );
    assert_eq!(state.local_pull_intent(&d).in_flight_since, Some(started));
    clock.advance(Duration::from_secs(1));
    assert_eq!(
        state.start_local_pull(&request(vec![d]))[0].outcome,
        Outcome::AlreadyPulling {
            started_at: started
        }
    );
    state.finish_pull(&d, Ok(()));
    assert_eq!(state.local_pull_intent(&d).in_flight_since, None);
}

#[test]
fn a_held_digest_starts_no_second_origin_pull() {
    let clock = ManualClock::new();
    let pump = RecordingPump::default();
    let store = MemoryStore::new();
    let state = NodeState::builder(cluster("node-a"))
        .clock(clock.clone())
        .store(store.clone())
        .pump(pump.clone())
        .build();
    let d = digest("01");
    state.start_local_pull(&request(vec![d]));
    // The pull lands, and a please_pull arrives just after.
    store.insert(d);
    state.finish_pull(&d, Ok(()));
    clock.advance(Duration::from_millis(5));
    assert_eq!(
        state.start_local_pull(&request(vec![d]))[0].outcome,
        Outcome::AlreadyPulling {
            started_at: clock.now()
        }
    );
    assert_eq!(pump.0.lock().unwrap().len(), 1, "one origin pull");
    assert_eq!(state.local_pull_intent(&d).in_flight_since, None);

    // The negative cache is asked first, as the Go pump does.
    state.finish_pull(&d, Err(FailureClass::NotFound));
    assert!(matches!(
        state.start_local_pull(&request(vec![d]))[0].outcome,
        Outcome::RecentlyFailed(_)
    ));
}

#[test]
fn a_secondary_store_answers_when_the_primary_misses() {
    let primary = MemoryStore::new();
    let secondary = MemoryStore::new();
    secondary.insert(digest("ab"));
    let state = NodeState::builder(cluster("node-a"))
        .store(primary.clone())
        .secondary_store(secondary.clone())
        .build();
    assert!(state.local_pull_intent(&digest("ab")).has_cached);
    assert!(!state.local_pull_intent(&digest("cd")).has_cached);
    assert_eq!(state.signals().storage_unavailable, 0, "a plain miss");

    // The primary is down: the secondary still answers, and a miss in both is told
    // apart from a plain miss.
    primary.set_unavailable(true);
    assert!(state.local_pull_intent(&digest("ab")).has_cached);
    assert_eq!(state.signals().storage_unavailable, 0);
    assert!(!state.local_pull_intent(&digest("cd")).has_cached);
    assert_eq!(state.signals().storage_unavailable, 1);

    // The secondary is down and the primary misses: also unavailable, never cached.
    primary.set_unavailable(false);
    secondary.set_unavailable(true);
    assert!(!state.local_pull_intent(&digest("ab")).has_cached);
    assert_eq!(state.signals().storage_unavailable, 2);
}

#[test]
fn an_auth_failure_holds_only_for_the_credentials_that_failed() {
    let clock = ManualClock::new();
    let pump = RecordingPump::default();
    let state = NodeState::builder(cluster("node-a"))
        .pump(pump.clone())
        .clock(clock.clone())
        .build();
    let d = digest("ab");
    let bare = request(vec![d]);
    let with = |secret: &str| bare.clone().with_authorization(Authorization::new(secret));
    let outcome = |request: &PleasePull| state.start_local_pull(request)[0].outcome;

    // Pulled with no credentials, refused by the origin.
    assert!(matches!(outcome(&bare), Outcome::Started { .. }));
    state.finish_pull(&d, Err(FailureClass::Auth));
    assert!(
        matches!(outcome(&bare), Outcome::RecentlyFailed(_)),
        "none again"
    );
    // A requester's credentials are other ones: pulled again with them.
    clock.advance(Duration::from_secs(1));
    assert!(matches!(
        outcome(&with("Basic right")),
        Outcome::Started { .. }
    ));
    assert!(
        matches!(
            outcome(&with("Basic other")),
            Outcome::AlreadyPulling { .. }
        ),
        "one pull at a time still"
    );
    state.finish_pull(&d, Err(FailureClass::Auth));
    // Those failed too: the same ones, and none, are answered from the cache.
    assert!(matches!(
        outcome(&with("Basic right")),
        Outcome::RecentlyFailed(_)
    ));
    assert!(matches!(outcome(&bare), Outcome::RecentlyFailed(_)));
    let asked: Vec<Option<String>> = pump.0.lock().unwrap().iter().map(|o| o.4.clone()).collect();
    assert_eq!(asked, vec![None, Some("Basic right".to_owned())]);

    // Another class is about the blob, whatever the credentials.
    let e = digest("ef");
    let missing = request(vec![e]);
    assert!(matches!(
        state.start_local_pull(&missing)[0].outcome,
        Outcome::Started { .. }
    ));
    state.finish_pull(&e, Err(FailureClass::NotFound));
    let retried = missing.with_authorization(Authorization::new("Basic right"));
    assert!(matches!(
        state.start_local_pull(&retried)[0].outcome,
        Outcome::RecentlyFailed(RecentFailure {
            class: FailureClass::NotFound,
            ..
        })
    ));
}
