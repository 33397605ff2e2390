//! One deadline mechanism for the protocol layer: keys ordered by when they are due, and
//! one timer that wakes the task at the earliest. Streams (in the handler's
//! [`StreamSet`](crate::stream_set)), requests queued for a stream slot, and requests
//! waiting for a dial all use it, at O(log n) per insert, removal and expiry.
//!
//! Time is passed in (`now`), as quinn-proto does, so the queue is tested on simulated
//! time; the timer only wakes the task.

use std::{
    collections::BTreeSet,
    task::{Context, Poll},
    time::Instant,
};

use futures::FutureExt;
use futures_timer::Delay;

/// Keys by deadline, with a timer armed for the earliest.
pub(crate) struct DeadlineQueue<K> {
    due: BTreeSet<(Instant, K)>,
    timer: Option<(Instant, Delay)>,
}

impl<K> Default for DeadlineQueue<K> {
    fn default() -> Self {
        DeadlineQueue {
            due: BTreeSet::new(),
            timer: None,
        }
    }
}

impl<K: Copy + Ord> DeadlineQueue<K> {
    /// Keys waiting for their deadline.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.due.len()
    }

    pub(crate) fn insert(&mut self, key: K, at: Instant) {
        self.due.insert((at, key));
    }

    /// Forgets `key`'s deadline `at`, once what it guarded ended otherwise.
    pub(crate) fn remove(&mut self, key: K, at: Instant) {
        self.due.remove(&(at, key));
    }

    /// The next key whose deadline has come by `now`, taken out of the queue, with its
    /// deadline (which may be a little ahead of `now` when the timer said it came: the
    /// caller then takes it as the time); when none has come, the task is woken at the
    /// earliest deadline.
    pub(crate) fn poll_expired(
        &mut self,
        cx: &mut Context<'_>,
        now: Instant,
    ) -> Poll<(K, Instant)> {
        let mut now = now;
        loop {
            let Some(&(next, key)) = self.due.first() else {
                return Poll::Pending;
            };
            if next <= now {
                self.due.pop_first();
                return Poll::Ready((key, next));
            }
            // A timer armed for an earlier instant stays: it wakes the task early at
            // worst, and a timer per deadline would cost more (each wakes the timer
            // thread).
            let (at, timer) = match &mut self.timer {
                Some((at, timer)) if *at <= next => (*at, timer),
                slot => {
                    let wait = next.saturating_duration_since(now);
                    (next, &mut slot.insert((next, Delay::new(wait))).1)
                }
            };
            if timer.poll_unpin(cx).is_pending() {
                return Poll::Pending;
            }
            self.timer = None;
            // The timer fired, so its instant has come even if `now` is a little behind.
            now = now.max(at);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::task::noop_waker;

    use super::*;

    #[test]
    fn keys_expire_in_deadline_order_and_removed_ones_never() {
        let t0 = Instant::now();
        let mut queue = DeadlineQueue::default();
        let s = Duration::from_secs;
        queue.insert(3u8, t0 + s(30));
        queue.insert(1, t0 + s(10));
        queue.insert(2, t0 + s(20));
        queue.remove(2, t0 + s(20));
        let waker = noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(queue.poll_expired(&mut cx, t0 + s(5)).is_pending());
        assert_eq!(
            queue.poll_expired(&mut cx, t0 + s(25)),
            Poll::Ready((1, t0 + s(10)))
        );
        assert!(queue.poll_expired(&mut cx, t0 + s(25)).is_pending());
        assert_eq!(
            queue.poll_expired(&mut cx, t0 + s(30)),
            Poll::Ready((3, t0 + s(30)))
        );
        assert_eq!(queue.len(), 0);
    }

    #[test]
    fn the_timer_wakes_the_task_at_the_earliest_deadline() {
        let mut queue = DeadlineQueue::default();
        queue.insert(7u8, Instant::now() + Duration::from_millis(30));
        let started = Instant::now();
        let key = futures::executor::block_on(futures::future::poll_fn(|cx| {
            queue.poll_expired(cx, Instant::now())
        }));
        assert_eq!(key.0, 7);
        assert!(started.elapsed() >= Duration::from_millis(25));
    }
}
