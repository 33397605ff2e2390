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

use super::ProviderLookup;
use crate::Digest;

/// How long one lookup may take before it counts as "no provider known".
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// Lookups the resolver may queue before they wait; the loop starts them as it goes.
const QUEUED_LOOKUPS: usize = 256;

/// A lookup asked for and not yet started.
#[derive(Debug)]
pub struct Lookup {
    digest: Digest,
    reply: oneshot::Sender<Vec<PeerId>>,
}

/// The resolver's side: asks the swarm loop for providers. Cheap to clone.
#[derive(Debug, Clone)]
pub struct KadProviders {
    lookups: mpsc::Sender<Lookup>,
    healthy: Arc<AtomicBool>,
}

/// The swarm loop's side: starts the lookups on the `kad::Behaviour` and answers them
/// from its events.
#[derive(Debug)]
pub struct KadLookups {
    lookups: mpsc::Receiver<Lookup>,
    running: HashMap<QueryId, (HashSet<PeerId>, oneshot::Sender<Vec<PeerId>>)>,
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
            lookups: sender,
            healthy: healthy.clone(),
        },
        KadLookups {
            lookups: receiver,
            running: HashMap::new(),
            healthy,
        },
    )
}

impl ProviderLookup for KadProviders {
    fn providers(&self, digest: &Digest) -> BoxFuture<'static, Vec<PeerId>> {
        let (reply, answer) = oneshot::channel();
        let mut lookups = self.lookups.clone();
        let lookup = Lookup {
            digest: digest.clone(),
            reply,
        };
        async move {
            let asked = async {
                futures::SinkExt::send(&mut lookups, lookup).await.ok()?;
                answer.await.ok()
            };
            futures::select! {
                found = asked.fuse() => found.unwrap_or_default(),
                () = futures_timer::Delay::new(LOOKUP_TIMEOUT).fuse() => Vec::new(),
            }
        }
        .boxed()
    }

    fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }
}

/// The Kademlia key a digest is provided under: its canonical string.
pub fn provider_key(digest: &Digest) -> RecordKey {
    RecordKey::new(&digest.as_str())
}

impl KadLookups {
    /// The next lookup to start; `None` once every [`KadProviders`] is gone.
    pub async fn next_lookup(&mut self) -> Option<Lookup> {
        self.lookups.next().await
    }

    /// Starts `lookup` on `kad`.
    pub fn start<S: RecordStore + Send + 'static>(
        &mut self,
        lookup: Lookup,
        kad: &mut libp2p_kad::Behaviour<S>,
    ) {
        self.note_health(kad);
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

    /// A routing table with peers in it can find providers that exist.
    fn note_health<S: RecordStore + Send + 'static>(&self, kad: &mut libp2p_kad::Behaviour<S>) {
        let known = kad.kbuckets().any(|bucket| bucket.num_entries() > 0);
        self.healthy.store(known, Ordering::Relaxed);
    }
}
