//! Wake-ups and deadlines of the many streams one handler drives: a poll touches only the
//! streams whose I/O woke them or whose deadline passed, never every open stream, so the
//! cost of an event does not grow with the number of streams in flight.

use std::{
    collections::{BTreeSet, VecDeque},
    sync::{Arc, Mutex},
    task::{Context, Poll, Wake, Waker},
    time::Instant,
};

use futures::{task::AtomicWaker, FutureExt};
use futures_timer::Delay;

/// Names one stream of a handler.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum StreamKey {
    Inbound(u64),
    Outbound(u64),
}

/// Keys of streams woken since the handler last looked, and the handler's own waker.
#[derive(Debug, Default)]
struct ReadySet {
    keys: Mutex<Vec<StreamKey>>,
    handler: AtomicWaker,
}

impl ReadySet {
    fn push(&self, key: StreamKey) {
        self.keys
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(key);
        self.handler.wake();
    }
}

/// The waker handed to one stream's I/O.
struct StreamWaker {
    key: StreamKey,
    ready: Arc<ReadySet>,
}

impl Wake for StreamWaker {
    fn wake(self: Arc<Self>) {
        self.ready.push(self.key);
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.ready.push(self.key);
    }
}

#[derive(Debug, Default)]
pub(crate) struct Schedule {
    ready: Arc<ReadySet>,
    /// Each stream's next deadline; the first entry arms the one timer.
    deadlines: BTreeSet<(Instant, StreamKey)>,
    timer: Option<(Instant, Delay)>,
    /// Streams found due and not yet handed out.
    due: VecDeque<StreamKey>,
}

impl Schedule {
    /// A waker that marks `key` ready.
    pub(crate) fn waker(&self, key: StreamKey) -> Waker {
        Waker::from(Arc::new(StreamWaker {
            key,
            ready: self.ready.clone(),
        }))
    }

    /// Marks `key` ready for the next poll. Called from within the handler, which the
    /// connection polls next anyway, so the task is not woken again.
    pub(crate) fn wake(&mut self, key: StreamKey) {
        self.due.push_back(key);
    }

    /// Moves the deadline registered for `key` from `old` to `new`. A deadline handed out
    /// as due has passed, so its stream, polled with a later `now`, ends and never asks to
    /// keep it: an unchanged deadline needs no work.
    pub(crate) fn reschedule(
        &mut self,
        key: StreamKey,
        old: Option<Instant>,
        new: Option<Instant>,
    ) {
        if old == new {
            return;
        }
        if let Some(old) = old {
            self.deadlines.remove(&(old, key));
        }
        if let Some(new) = new {
            self.deadlines.insert((new, key));
        }
    }

    /// The next stream to poll: one that was woken or whose deadline passed. Handing
    /// them out one at a time lets the handler report each result as soon as it has it.
    /// When none is due, the handler's task is registered to be woken by either.
    pub(crate) fn poll_next_due(&mut self, cx: &mut Context<'_>) -> Poll<StreamKey> {
        if let Some(key) = self.due.pop_front() {
            return Poll::Ready(key);
        }
        self.ready.handler.register(cx.waker());
        loop {
            self.due.extend(
                self.ready
                    .keys
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .drain(..),
            );
            let now = Instant::now();
            while let Some(&(at, key)) = self.deadlines.first() {
                if at > now {
                    break;
                }
                self.deadlines.pop_first();
                self.due.push_back(key);
            }
            if let Some(key) = self.due.pop_front() {
                return Poll::Ready(key);
            }
            // A timer armed for an earlier instant stays, also when no deadline is left:
            // it wakes the handler early at worst, once, and creating and dropping a
            // timer as each stream comes and goes would cost more (each wakes the timer
            // thread).
            let timer = match (&mut self.timer, self.deadlines.first()) {
                (Some((_, timer)), None) => timer,
                (None, None) => return Poll::Pending,
                (Some((at, timer)), Some(&(next, _))) if *at <= next => timer,
                (slot, Some(&(next, _))) => &mut slot.insert((next, Delay::new(next - now))).1,
            };
            if timer.poll_unpin(cx).is_pending() {
                return Poll::Pending;
            }
            self.timer = None;
        }
    }
}
