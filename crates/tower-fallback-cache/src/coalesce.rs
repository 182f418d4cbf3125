//! Coalescing of identical requests in cache-first mode: while one request for a key is
//! at the upstream, the others wait for its answer to be stored and are served from it.
//!
//! A follower waits at most the layer's `coalesce_wait`, then calls the upstream itself.
//! When the leader ends without a stored answer, the followers join again: the first to
//! come becomes the next leader and the rest wait for it, so a failed call is retried by
//! one request, not by all of them at once. When the second leader's answer is not stored
//! either, each follower calls the upstream itself: behind an upstream that keeps failing,
//! the last of N followers would otherwise wait out N failed calls.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::watch;

use crate::key::CacheKey;

#[derive(Default)]
pub(crate) struct InFlight {
    calls: Mutex<HashMap<CacheKey, watch::Receiver<()>>>,
}

pub(crate) enum Turn {
    /// No call for this key is under way: this request makes it. Others wait until the
    /// guard is dropped.
    Lead(Leader),
    /// A call is under way: wait for it to end.
    Follow(watch::Receiver<()>),
}

impl InFlight {
    fn calls(&self) -> MutexGuard<'_, HashMap<CacheKey, watch::Receiver<()>>> {
        self.calls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn join(self: &Arc<Self>, key: CacheKey) -> Turn {
        let mut calls = self.calls();
        if let Some(call) = calls.get(&key) {
            return Turn::Follow(call.clone());
        }
        let (done, call) = watch::channel(());
        calls.insert(key, call);
        Turn::Lead(Leader {
            in_flight: self.clone(),
            key,
            done,
        })
    }
}

/// The request making the call for a key. Dropped when its answer is stored (or will not
/// be), which wakes the requests waiting for it.
pub(crate) struct Leader {
    in_flight: Arc<InFlight>,
    key: CacheKey,
    done: watch::Sender<()>,
}

impl Drop for Leader {
    fn drop(&mut self) {
        let mut calls = self.in_flight.calls();
        // Only this leader's own call: a follower that gave up waiting may lead the key's
        // next call while this one is still held.
        if calls
            .get(&self.key)
            .is_some_and(|call| call.same_channel(&self.done.subscribe()))
        {
            calls.remove(&self.key);
        }
    }
}

/// Waits until the leader is done, whatever became of its answer.
pub(crate) async fn wait(mut call: watch::Receiver<()>) {
    while call.changed().await.is_ok() {}
}
