//! A set of stream state machines, each with its own deadline, polled only when its I/O
//! woke it or its deadline came: the shape of `futures_bounded::FuturesMap`, for explicit
//! state machines instead of futures.
//!
//! The set owns every stream's deadline and wake-up, so no stream keeps a copy of what it
//! registered. Time is passed in (`now`), as quinn-proto does, so the set and the streams
//! are tested on simulated time; the one timer only wakes the task.

use std::{
    collections::{HashMap, VecDeque},
    hash::Hash,
    sync::Arc,
    task::{Context, Poll, Wake, Waker},
    time::Instant,
};

use parking_lot::Mutex;

use futures::task::AtomicWaker;

use crate::deadlines::DeadlineQueue;

/// What a stream's poll came to.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step<T> {
    /// Something to report; the stream lives on and is polled again at once.
    Progress(T),
    /// The stream is finished and leaves the set.
    Done(T),
}

/// One stream's state machine.
pub(crate) trait StreamMachine {
    /// What the stream reports.
    type Output;

    /// Drives the stream at `now`. Once `now` has reached [`Self::deadline`] the stream
    /// must be done: the set polls it at its deadline and counts on that.
    fn poll(&mut self, cx: &mut Context<'_>, now: Instant) -> Poll<Step<Self::Output>>;

    /// When the stream must next be polled, whether or not its I/O wakes it.
    fn deadline(&self) -> Instant;
}

/// Keys of streams woken since the set last looked, and the waker of the task that polls
/// the set.
#[derive(Debug)]
struct Woken<K> {
    keys: Mutex<Vec<K>>,
    task: AtomicWaker,
}

impl<K> Woken<K> {
    fn push(&self, key: K) {
        self.keys.lock().push(key);
        self.task.wake();
    }

    fn drain(&self) -> Vec<K> {
        std::mem::take(&mut *self.keys.lock())
    }
}

/// The waker one stream's I/O gets: it names the stream.
struct StreamWaker<K> {
    key: K,
    woken: Arc<Woken<K>>,
}

impl<K: Copy + Send + Sync + 'static> Wake for StreamWaker<K> {
    fn wake(self: Arc<Self>) {
        self.woken.push(self.key);
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.push(self.key);
    }
}

struct Entry<S> {
    stream: S,
    waker: Waker,
    /// The deadline registered in the set's queue.
    deadline: Instant,
}

/// Streams keyed by `K`, each polled only when due.
pub(crate) struct StreamSet<K, S> {
    streams: HashMap<K, Entry<S>>,
    woken: Arc<Woken<K>>,
    deadlines: DeadlineQueue<K>,
    /// Streams known due and not yet polled.
    due: VecDeque<K>,
}

impl<K, S> Default for StreamSet<K, S> {
    fn default() -> Self {
        StreamSet {
            streams: HashMap::new(),
            woken: Arc::new(Woken {
                keys: Mutex::default(),
                task: AtomicWaker::new(),
            }),
            deadlines: DeadlineQueue::default(),
            due: VecDeque::new(),
        }
    }
}

impl<K, S> StreamSet<K, S>
where
    K: Copy + Eq + Hash + Ord + Send + Sync + 'static,
    S: StreamMachine,
{
    /// Streams in the set.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.streams.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.streams.is_empty()
    }

    /// Adds a stream; it is polled first on the set's next poll.
    pub(crate) fn insert(&mut self, key: K, stream: S) {
        let deadline = stream.deadline();
        let waker = Waker::from(Arc::new(StreamWaker {
            key,
            woken: self.woken.clone(),
        }));
        if let Some(old) = self.streams.insert(
            key,
            Entry {
                stream,
                waker,
                deadline,
            },
        ) {
            self.deadlines.remove(key, old.deadline);
        }
        self.deadlines.insert(key, deadline);
        self.due.push_back(key);
    }

    /// Polls due streams until one reports; when none is due, registers the task to be
    /// woken by a stream's I/O or by the earliest deadline.
    pub(crate) fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        mut now: Instant,
    ) -> Poll<(K, Step<S::Output>)> {
        self.woken.task.register(cx.waker());
        loop {
            while let Some(key) = self.due.pop_front() {
                if let Some(step) = self.poll_stream(key, now) {
                    return Poll::Ready((key, step));
                }
            }
            self.due.extend(self.woken.drain());
            while let Poll::Ready((key, at)) = self.deadlines.poll_expired(cx, now) {
                // A deadline the timer says has come has come, even if `now` lags it.
                now = now.max(at);
                self.due.push_back(key);
            }
            if self.due.is_empty() {
                return Poll::Pending;
            }
        }
    }

    /// Polls one stream with its own waker; keeps its registered deadline in step.
    fn poll_stream(&mut self, key: K, now: Instant) -> Option<Step<S::Output>> {
        let entry = self.streams.get_mut(&key)?;
        let waker = entry.waker.clone();
        let step = entry.stream.poll(&mut Context::from_waker(&waker), now);
        match step {
            Poll::Ready(Step::Done(output)) => {
                let entry = self.streams.remove(&key)?;
                self.deadlines.remove(key, entry.deadline);
                Some(Step::Done(output))
            }
            other => {
                let deadline = entry.stream.deadline();
                debug_assert!(deadline > now, "a stream past its deadline must be done");
                // An unchanged deadline is still queued: one taken out as due has
                // passed, and a stream past its deadline is done.
                if deadline != entry.deadline {
                    self.deadlines.remove(key, entry.deadline);
                    self.deadlines.insert(key, deadline);
                    entry.deadline = deadline;
                }
                match other {
                    Poll::Ready(progress) => {
                        self.due.push_back(key);
                        Some(progress)
                    }
                    Poll::Pending => None,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::atomic::{AtomicUsize, Ordering},
        time::Duration,
    };

    use futures::task::noop_waker;

    use super::*;

    /// A stream that counts its polls, reports once when told, and ends at its deadline.
    struct Probe {
        deadline: Instant,
        polls: Arc<AtomicUsize>,
        report: Arc<Mutex<Option<&'static str>>>,
        waker: Arc<Mutex<Option<Waker>>>,
    }

    #[derive(Clone, Default)]
    struct Handle {
        polls: Arc<AtomicUsize>,
        report: Arc<Mutex<Option<&'static str>>>,
        waker: Arc<Mutex<Option<Waker>>>,
    }

    impl Handle {
        fn probe(&self, deadline: Instant) -> Probe {
            Probe {
                deadline,
                polls: self.polls.clone(),
                report: self.report.clone(),
                waker: self.waker.clone(),
            }
        }
        fn polls(&self) -> usize {
            self.polls.load(Ordering::SeqCst)
        }
        /// What the stream's I/O would do: wake it.
        fn wake(&self) {
            self.waker.lock().take().unwrap().wake();
        }
    }

    impl StreamMachine for Probe {
        type Output = &'static str;

        fn poll(&mut self, cx: &mut Context<'_>, now: Instant) -> Poll<Step<&'static str>> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            if now >= self.deadline {
                return Poll::Ready(Step::Done("deadline"));
            }
            if let Some(report) = self.report.lock().take() {
                return Poll::Ready(Step::Progress(report));
            }
            *self.waker.lock() = Some(cx.waker().clone());
            Poll::Pending
        }

        fn deadline(&self) -> Instant {
            self.deadline
        }
    }

    fn poll(set: &mut StreamSet<u8, Probe>, now: Instant) -> Poll<(u8, Step<&'static str>)> {
        set.poll_next(&mut Context::from_waker(&noop_waker()), now)
    }

    #[test]
    fn polls_only_woken_or_due_streams() {
        let t0 = Instant::now();
        let (a, b) = (Handle::default(), Handle::default());
        let mut set = StreamSet::default();
        set.insert(1, a.probe(t0 + Duration::from_secs(5)));
        set.insert(2, b.probe(t0 + Duration::from_secs(9)));
        assert!(poll(&mut set, t0).is_pending());
        assert_eq!((a.polls(), b.polls()), (1, 1), "each polled once on insert");

        // Nothing woke and no deadline passed: nobody is polled.
        assert!(poll(&mut set, t0 + Duration::from_secs(1)).is_pending());
        assert_eq!((a.polls(), b.polls()), (1, 1));

        // One stream's I/O wakes it: only that one is polled.
        b.wake();
        assert!(poll(&mut set, t0 + Duration::from_secs(2)).is_pending());
        assert_eq!((a.polls(), b.polls()), (1, 2));

        // The first deadline passes: that stream ends, the other is left alone.
        assert_eq!(
            poll(&mut set, t0 + Duration::from_secs(5)),
            Poll::Ready((1, Step::Done("deadline")))
        );
        assert_eq!((a.polls(), b.polls()), (2, 2));
        assert_eq!(set.len(), 1);
        assert!(poll(&mut set, t0 + Duration::from_secs(8)).is_pending());
        assert_eq!(
            poll(&mut set, t0 + Duration::from_secs(9)),
            Poll::Ready((2, Step::Done("deadline")))
        );
        assert!(set.is_empty());
        assert_eq!(set.deadlines.len(), 0);
    }

    #[test]
    fn a_stream_that_reports_progress_is_polled_again() {
        let t0 = Instant::now();
        let a = Handle::default();
        *a.report.lock() = Some("read");
        let mut set = StreamSet::default();
        set.insert(1, a.probe(t0 + Duration::from_secs(5)));
        assert_eq!(poll(&mut set, t0), Poll::Ready((1, Step::Progress("read"))));
        // Polled again at once, so it parks with its waker registered.
        assert!(poll(&mut set, t0).is_pending());
        assert_eq!(a.polls(), 2);
        assert!(a.waker.lock().is_some());
        assert_eq!(set.len(), 1);
    }

    /// A stream whose deadline moves later as it goes, as an inbound stream's does once
    /// it has its response.
    struct Mover {
        deadlines: Vec<Instant>,
        polls: usize,
    }

    impl StreamMachine for Mover {
        type Output = usize;

        fn poll(&mut self, _: &mut Context<'_>, now: Instant) -> Poll<Step<usize>> {
            self.polls += 1;
            while self.deadlines.len() > 1 && now >= self.deadlines[0] {
                self.deadlines.remove(0);
            }
            if now >= self.deadlines[0] {
                return Poll::Ready(Step::Done(self.polls));
            }
            Poll::Pending
        }

        fn deadline(&self) -> Instant {
            self.deadlines[0]
        }
    }

    #[test]
    fn a_moved_deadline_is_the_one_kept() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut set = StreamSet::default();
        set.insert(
            7u8,
            Mover {
                deadlines: vec![t0 + s, t0 + 3 * s],
                polls: 0,
            },
        );
        assert!(set
            .poll_next(&mut Context::from_waker(&noop_waker()), t0)
            .is_pending());
        // At the first deadline the stream moves on to its second instead of ending.
        assert!(set
            .poll_next(&mut Context::from_waker(&noop_waker()), t0 + s)
            .is_pending());
        assert_eq!(set.deadlines.len(), 1);
        assert!(set
            .poll_next(&mut Context::from_waker(&noop_waker()), t0 + 2 * s)
            .is_pending());
        assert_eq!(
            set.poll_next(&mut Context::from_waker(&noop_waker()), t0 + 3 * s),
            Poll::Ready((7, Step::Done(3))),
            "polled on insert, at the first deadline and at the second, and never between"
        );
    }
}
