//! The cache: what is stored ([`store`]), when it expires ([`expiry`]), who fetches it
//! ([`coalesce`]), and the pure rules deciding all of that ([`policy`], [`conditional`],
//! [`key`]).

pub mod coalesce;
pub mod conditional;
pub mod entry;
pub mod eviction;
pub mod expiry;
pub mod key;
pub mod policy;
pub mod range;
pub mod store;

use std::sync::Arc;

use crate::error::UpstreamError;
use coalesce::Flights;
use entry::CachedResponse;
use expiry::ExpiryQueue;
use store::Store;

/// What a single-flight fetch produced, as handed to every waiter.
#[derive(Clone, Debug)]
pub enum FetchOutcome {
    /// A complete response was stored (or freshened by a `304`): share it.
    Stored(Arc<CachedResponse>),
    /// The response may not be shared (private, uncacheable, too large): each waiter
    /// must make its own request.
    NotShared,
    /// The upstream failed: every waiter gets this error.
    Failed(UpstreamError),
}

/// Store, timers and in-flight fetches together.
pub struct Cache {
    pub store: Store,
    pub flights: Flights<FetchOutcome>,
    pub expiry: ExpiryQueue,
}

impl Cache {
    /// A cache whose store holds at most `max_bytes` (`CACHE_MAX_BYTES`).
    pub fn new(max_bytes: usize) -> Self {
        Cache {
            store: Store::new(max_bytes),
            flights: Flights::default(),
            expiry: ExpiryQueue::default(),
        }
    }

    /// Stores `entry` under `key` and arms its timer for `at` (its expiry, or earlier when it
    /// is to be refreshed ahead of expiry). Returns how many entries were evicted for room.
    pub fn insert(
        &self,
        key: Arc<str>,
        entry: Arc<CachedResponse>,
        at: std::time::Instant,
        past_window: &dyn Fn(&CachedResponse) -> bool,
    ) -> usize {
        let id = entry.id;
        let key = self.store.key_arc(&key).unwrap_or(key);
        let evicted = self.store.insert(key.clone(), entry, past_window);
        if self.store.get_by_id(&key, id).is_some() {
            self.expiry.schedule(at, key, id);
        }
        evicted
    }
}
