//! [`ProviderLookup`] on Kademlia's `get_providers`, for a swarm loop that owns the
//! `kad::Behaviour`: the resolver asks through [`KadProviders`] from any task, and the
//! loop runs the queries with [`KadLookups`].

use std::{
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::Duration,
};

use futures::{
    channel::{mpsc, oneshot},
    future::BoxFuture,
    FutureExt, StreamExt,
};
use libp2p_identity::PeerId;
use libp2p_kad::{store::RecordStore, Event, GetProvidersOk, QueryId, QueryResult, RecordKey};
use libp2p_swarm::StreamProtocol;

use super::ProviderLookup;
use crate::Digest;

/// How long one lookup may take before it counts as "no provider known".
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// Lookups the resolver may queue before they wait; the loop starts them as it goes.
const QUEUED_LOOKUPS: usize = 256;

/// Lookups running at once on one node. A `get_providers` for a key nobody provides
/// asks about twenty peers, each of which sorts its routing table to answer: a node
/// waiting on many pulls at once would otherwise spend its peers' CPU on lookups that
/// the resolver's probes of the puller make redundant. The rest wait in the queue.
const RUNNING_LOOKUPS: usize = 4;

/// A lookup asked for and not yet started.
#[derive(Debug)]
pub struct Lookup {
    digest: Digest,
    reply: oneshot::Sender<Vec<PeerId>>,
}

/// The resolver's side: asks the swarm loop for providers. Cheap to clone.
#[derive(Debug, Clone)]
pub struct KadProviders {
    /// One sender for every clone, so the queue's bound holds for all of them together.
    lookups: Arc<parking_lot::Mutex<mpsc::Sender<Lookup>>>,
    healthy: Arc<AtomicBool>,
}

/// The swarm loop's side: starts the lookups on the `kad::Behaviour` and answers them
/// from its events.
#[derive(Debug)]
pub struct KadLookups {
    lookups: mpsc::Receiver<Lookup>,
    running: HashMap<QueryId, (HashSet<PeerId>, oneshot::Sender<Vec<PeerId>>)>,
    /// Queries whose asker stopped waiting: finished at the next chance, their events
    /// still claimed.
    abandoned: HashSet<QueryId>,
    healthy: Arc<AtomicBool>,
}

/// A connected pair: hand [`KadProviders`] to [`ColdStart`](crate::ColdStart) and drive
/// [`KadLookups`] from the swarm loop:
///
/// ```no_run
/// # use futures::StreamExt;
/// # async fn run<S: libp2p_kad::store::RecordStore + Send + 'static>(
/// #     mut lookups: gantry_coord::KadLookups,
/// #     mut swarm: libp2p_swarm::Swarm<libp2p_kad::Behaviour<S>>,
/// # ) {
/// loop {
///     tokio::select! {
///         Some(lookup) = lookups.next_lookup() => lookups.start(lookup, swarm.behaviour_mut()),
///         event = swarm.select_next_some() => {
///             if let libp2p_swarm::SwarmEvent::Behaviour(event) = event {
///                 lookups.on_event(&event, swarm.behaviour_mut());
///             }
///         }
///     }
/// }
/// # }
/// ```
pub fn kad_providers() -> (KadProviders, KadLookups) {
    let (sender, receiver) = mpsc::channel(QUEUED_LOOKUPS);
    let healthy = Arc::new(AtomicBool::new(false));
    (
        KadProviders {
            lookups: Arc::new(parking_lot::Mutex::new(sender)),
            healthy: healthy.clone(),
        },
        KadLookups {
            lookups: receiver,
            running: HashMap::new(),
            abandoned: HashSet::new(),
            healthy,
        },
    )
}

impl ProviderLookup for KadProviders {
    fn providers(&self, digest: &Digest) -> BoxFuture<'static, Vec<PeerId>> {
        let (reply, answer) = oneshot::channel();
        let lookup = Lookup {
            digest: *digest,
            reply,
        };
        // Queued at once; a full queue (the loop is far behind) counts as "none known".
        if self.lookups.lock().try_send(lookup).is_err() {
            return futures::future::ready(Vec::new()).boxed();
        }
        async move {
            futures::select! {
                found = answer.fuse() => found.unwrap_or_default(),
                () = futures_timer::Delay::new(LOOKUP_TIMEOUT).fuse() => Vec::new(),
            }
        }
        .boxed()
    }

    fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }
}

/// The Kademlia protocol of a Gantry cluster, as the Go nodes run go-libp2p-kad-dht
/// (protocol prefix `/gantry`): a node on Kademlia's default protocol would not find
/// their provider records, nor they its.
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/gantry/kad/1.0.0");

/// A Kademlia configuration on [`KAD_PROTOCOL`], Kademlia's defaults otherwise.
pub fn kad_config() -> libp2p_kad::Config {
    libp2p_kad::Config::new(KAD_PROTOCOL)
}

/// The Kademlia key a digest is provided under, the Go nodes' key: they provide a CIDv1
/// (raw codec) over the sha2-256 multihash of the digest's 32 bytes, and go-libp2p-kad-dht
/// keys provider records by that multihash, `0x12 0x20` then the 32 bytes.
pub fn provider_key(digest: &Digest) -> RecordKey {
    let mut multihash = [0u8; 34];
    multihash[0] = 0x12; // sha2-256
    multihash[1] = 32; // digest length
    multihash[2..].copy_from_slice(&digest.to_bytes());
    RecordKey::new(&multihash)
}

impl KadLookups {
    /// The next lookup to start, once fewer than four run; `None` once every
    /// [`KadProviders`] is gone. A lookup whose asker stopped waiting is dropped unstarted.
    pub async fn next_lookup(&mut self) -> Option<Lookup> {
        loop {
            // A query whose asker gave up (it waits at most two seconds) frees its slot.
            let abandoned = &mut self.abandoned;
            self.running.retain(|id, (_, reply)| {
                let waiting = !reply.is_canceled();
                if !waiting {
                    abandoned.insert(*id);
                }
                waiting
            });
            if self.running.len() < RUNNING_LOOKUPS {
                break;
            }
            // Full: `on_event` frees a slot when a query ends (the caller's loop asks
            // again after each event); an asker that gives up frees one here.
            let running = &mut self.running;
            futures::future::poll_fn(|cx| {
                let gone = running
                    .values_mut()
                    .any(|(_, reply)| reply.poll_canceled(cx).is_ready());
                if gone {
                    std::task::Poll::Ready(())
                } else {
                    std::task::Poll::Pending
                }
            })
            .await;
        }
        loop {
            let lookup = self.lookups.next().await?;
            if !lookup.reply.is_canceled() {
                return Some(lookup);
            }
        }
    }

    /// Starts `lookup` on `kad`.
    pub fn start<S: RecordStore + Send + 'static>(
        &mut self,
        lookup: Lookup,
        kad: &mut libp2p_kad::Behaviour<S>,
    ) {
        self.note_health(kad);
        self.finish_abandoned(kad);
        let id = kad.get_providers(provider_key(&lookup.digest));
        self.running.insert(id, (HashSet::new(), lookup.reply));
    }

    /// Feeds a Kademlia event; answers a lookup once it found providers or ended.
    /// Returns whether the event belonged to one of these lookups.
    pub fn on_event<S: RecordStore + Send + 'static>(
        &mut self,
        event: &Event,
        kad: &mut libp2p_kad::Behaviour<S>,
    ) -> bool {
        if let Event::RoutingUpdated { .. } = event {
            // A peer entered the routing table: lookups can find what exists.
            self.healthy.store(true, Ordering::Relaxed);
            return false;
        }
        let Event::OutboundQueryProgressed {
            id,
            result: QueryResult::GetProviders(result),
            step,
            ..
        } = event
        else {
            return false;
        };
        if self.abandoned.contains(id) {
            if step.last {
                self.abandoned.remove(id);
            }
            self.finish_abandoned(kad);
            return true;
        }
        let Some((found, _)) = self.running.get_mut(id) else {
            return false;
        };
        self.healthy.store(true, Ordering::Relaxed);
        if let Ok(GetProvidersOk::FoundProviders { providers, .. }) = result {
            found.extend(providers.iter().copied());
        }
        if !found.is_empty() || step.last {
            if let Some((found, reply)) = self.running.remove(id) {
                let _ = reply.send(found.into_iter().collect());
            }
            if let Some(mut query) = kad.query_mut(id) {
                query.finish();
            }
        }
        true
    }

    /// Stops the queries nobody waits for any more; their last events are still claimed.
    fn finish_abandoned<S: RecordStore + Send + 'static>(
        &mut self,
        kad: &mut libp2p_kad::Behaviour<S>,
    ) {
        self.abandoned.retain(|id| match kad.query_mut(id) {
            Some(mut query) => {
                query.finish();
                true
            }
            None => false,
        });
    }

    /// A routing table with peers in it can find providers that exist.
    fn note_health<S: RecordStore + Send + 'static>(&self, kad: &mut libp2p_kad::Behaviour<S>) {
        let known = kad.kbuckets().any(|bucket| bucket.num_entries() > 0);
        self.healthy.store(known, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use std::num::NonZeroUsize;

    use libp2p_kad::{store::MemoryStore, ProgressStep, QueryStats};

    use super::*;

    fn digest() -> Digest {
        Digest::parse(&format!("sha256:{}", "ab".repeat(32))).unwrap()
    }

    fn progressed(id: QueryId, providers: HashSet<PeerId>, last: bool) -> Event {
        Event::OutboundQueryProgressed {
            id,
            result: QueryResult::GetProviders(Ok(GetProvidersOk::FoundProviders {
                key: provider_key(&digest()),
                providers,
            })),
            stats: QueryStats::empty(),
            step: ProgressStep {
                count: NonZeroUsize::MIN,
                last,
            },
        }
    }

    /// The empty blob's digest, whose CIDv1 (raw) every IPFS tool prints as
    /// `bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku`.
    #[test]
    fn the_provider_key_is_the_multihash_the_go_nodes_provide() {
        let empty = Digest::parse(
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        )
        .unwrap();
        let key = provider_key(&empty);
        let hex: String = key.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "1220e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        // CIDv1 = version 1, codec raw (0x55), then the multihash; multibase 'b' is
        // lowercase RFC 4648 base32 without padding.
        let cid: Vec<u8> = [0x01, 0x55].iter().chain(key.as_ref()).copied().collect();
        let alphabet = b"abcdefghijklmnopqrstuvwxyz234567";
        let (mut bits, mut acc, mut text) = (0u32, 0u32, String::from("b"));
        for byte in cid {
            acc = (acc << 8) | u32::from(byte);
            bits += 8;
            while bits >= 5 {
                bits -= 5;
                text.push(alphabet[((acc >> bits) & 31) as usize] as char);
            }
        }
        if bits > 0 {
            text.push(alphabet[((acc << (5 - bits)) & 31) as usize] as char);
        }
        assert_eq!(
            text,
            "bafkreihdwdcefgh4dqkjv67uzcmw7ojee6xedzdetojuzjevtenxquvyku"
        );
        assert_eq!(KAD_PROTOCOL.as_ref(), "/gantry/kad/1.0.0");
    }

    #[test]
    fn a_lookup_is_answered_with_the_first_providers_found() {
        let local = PeerId::random();
        let mut kad = libp2p_kad::Behaviour::new(local, MemoryStore::new(local));
        let (providers, mut lookups) = kad_providers();
        assert!(!providers.is_healthy(), "an empty routing table");

        let answer = providers.providers(&digest());
        let lookup = futures::executor::block_on(lookups.next_lookup()).unwrap();
        lookups.start(lookup, &mut kad);
        let (&id, _) = lookups.running.iter().next().unwrap();

        // An unrelated query's event is not ours.
        let other = kad.get_providers(provider_key(&digest()));
        assert!(!lookups.on_event(&progressed(other, HashSet::new(), true), &mut kad));

        let provider = PeerId::random();
        assert!(lookups.on_event(&progressed(id, HashSet::from([provider]), false), &mut kad));
        assert!(lookups.running.is_empty());
        assert_eq!(futures::executor::block_on(answer), vec![provider]);
        assert!(providers.is_healthy());
    }

    #[test]
    fn a_lookup_that_ends_empty_answers_empty() {
        let local = PeerId::random();
        let mut kad = libp2p_kad::Behaviour::new(local, MemoryStore::new(local));
        let (providers, mut lookups) = kad_providers();
        let answer = providers.providers(&digest());
        let lookup = futures::executor::block_on(lookups.next_lookup()).unwrap();
        lookups.start(lookup, &mut kad);
        let (&id, _) = lookups.running.iter().next().unwrap();
        assert!(lookups.on_event(&progressed(id, HashSet::new(), false), &mut kad));
        assert_eq!(lookups.running.len(), 1, "still looking");
        assert!(lookups.on_event(&progressed(id, HashSet::new(), true), &mut kad));
        assert_eq!(futures::executor::block_on(answer), Vec::<PeerId>::new());
    }

    #[test]
    fn at_most_four_lookups_run_and_an_abandoned_one_frees_its_slot() {
        use futures::FutureExt;
        let local = PeerId::random();
        let mut kad = libp2p_kad::Behaviour::new(local, MemoryStore::new(local));
        let (providers, mut lookups) = kad_providers();
        let mut answers: Vec<_> = (0..6).map(|_| providers.providers(&digest())).collect();
        for _ in 0..RUNNING_LOOKUPS {
            let lookup = lookups.next_lookup().now_or_never().flatten().unwrap();
            lookups.start(lookup, &mut kad);
        }
        assert!(
            lookups.next_lookup().now_or_never().is_none(),
            "a fifth waits while four run"
        );

        // The first asker stops waiting: its query is abandoned and its slot taken.
        drop(answers.remove(0));
        let fifth = lookups.next_lookup().now_or_never().flatten().unwrap();
        assert_eq!(lookups.abandoned.len(), 1);
        let abandoned = *lookups.abandoned.iter().next().unwrap();
        lookups.start(fifth, &mut kad);
        // Its events are still claimed, and its last one forgets it.
        assert!(lookups.on_event(&progressed(abandoned, HashSet::new(), true), &mut kad));
        assert!(lookups.abandoned.is_empty());

        // A lookup whose asker is gone before it starts is never started.
        drop(answers.pop());
        let (&running, _) = lookups.running.iter().next().unwrap();
        assert!(lookups.on_event(&progressed(running, HashSet::new(), true), &mut kad));
        assert!(
            lookups.next_lookup().now_or_never().is_none(),
            "the remaining queued lookup's asker is gone"
        );
        assert_eq!(lookups.running.len(), RUNNING_LOOKUPS - 1);
    }

    #[test]
    fn a_full_driver_wakes_when_an_asker_gives_up_without_any_event() {
        use futures::FutureExt;
        let local = PeerId::random();
        let mut kad = libp2p_kad::Behaviour::new(local, MemoryStore::new(local));
        let (providers, mut lookups) = kad_providers();
        let mut answers: Vec<_> = (0..5).map(|_| providers.providers(&digest())).collect();
        for _ in 0..RUNNING_LOOKUPS {
            let lookup = lookups.next_lookup().now_or_never().flatten().unwrap();
            lookups.start(lookup, &mut kad);
        }
        let first = answers.remove(0);
        let giving_up = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            drop(first);
        });
        // The same wait, no Kademlia event: it must notice the asker that left.
        let next = futures::executor::block_on(async {
            futures::select! {
                lookup = lookups.next_lookup().fuse() => lookup,
                () = futures_timer::Delay::new(Duration::from_secs(5)).fuse() => None,
            }
        });
        giving_up.join().unwrap();
        assert!(next.is_some(), "the driver waited on nothing");
    }
}
