//! The node-wide inbound stream cap and each peer's share of it.
//!
//! Connection handlers run in their own tasks, yet a stream over the cap must be reset
//! before anything is read, so the counters are atomics shared by every handler rather
//! than state the behaviour would have to be asked about.

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc,
};

/// Which bound refused an inbound stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamCap {
    /// The node-wide cap on concurrent inbound streams.
    Node,
    /// The per-peer share of that cap.
    Peer,
}

/// Handed to each handler: the node's counter and the counter of the handler's peer.
#[derive(Debug, Clone)]
pub(crate) struct StreamBudget {
    node: Arc<AtomicUsize>,
    node_max: usize,
    peer: Arc<AtomicUsize>,
    peer_max: usize,
}

/// One admitted inbound stream; dropping it gives the slot back.
#[derive(Debug)]
pub(crate) struct StreamPermit {
    node: Arc<AtomicUsize>,
    peer: Arc<AtomicUsize>,
}

impl StreamBudget {
    pub(crate) fn new(
        node: Arc<AtomicUsize>,
        node_max: usize,
        peer: Arc<AtomicUsize>,
        peer_max: usize,
    ) -> Self {
        StreamBudget {
            node,
            node_max,
            peer,
            peer_max,
        }
    }

    pub(crate) fn try_admit(&self) -> Result<StreamPermit, StreamCap> {
        if !try_increment(&self.peer, self.peer_max) {
            return Err(StreamCap::Peer);
        }
        if !try_increment(&self.node, self.node_max) {
            self.peer.fetch_sub(1, Ordering::AcqRel);
            return Err(StreamCap::Node);
        }
        Ok(StreamPermit {
            node: self.node.clone(),
            peer: self.peer.clone(),
        })
    }
}

fn try_increment(counter: &AtomicUsize, max: usize) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        self.node.fetch_sub(1, Ordering::AcqRel);
        self.peer.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_share_and_node_cap_both_hold_and_release() {
        let node = Arc::new(AtomicUsize::new(0));
        let a = StreamBudget::new(node.clone(), 3, Arc::default(), 2);
        let b = StreamBudget::new(node.clone(), 3, Arc::default(), 2);
        let a1 = a.try_admit().unwrap();
        let _a2 = a.try_admit().unwrap();
        assert_eq!(a.try_admit().unwrap_err(), StreamCap::Peer);
        let _b1 = b.try_admit().unwrap();
        assert_eq!(b.try_admit().unwrap_err(), StreamCap::Node);
        assert_eq!(node.load(Ordering::Acquire), 3);
        drop(a1);
        assert!(b.try_admit().is_ok());
        assert_eq!(b.peer.load(Ordering::Acquire), 1);
    }
}
