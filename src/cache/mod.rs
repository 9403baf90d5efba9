//! The cache: what is stored ([`store`]), when it expires ([`expiry`]), who fetches it
//! ([`coalesce`]), and the pure rules deciding all of that ([`policy`], [`conditional`],
//! [`key`], and [`decide`]: serve fresh or stale, refresh, keep or drop); [`codec`] is the
//! versioned encoding of a stored variant: the head block an [`entry`] keeps in memory, and
//! the shared tier's value (that block behind the fields only another process needs);
//! [`shared`] is the second tier on Redis (`REDIS_URL`) behind this instance's memory.
//!
//! [`Cache`] is the only way in from the rest of the crate: its store, timers and flights are
//! private, so "every stored version has a timer" is enforced here rather than by convention
//! (the only insert is [`Cache::insert`], which arms one). Lookups answer with the [`Tier`] that
//! held the entry: memory ([`Cache::lookup`]) or the shared tier ([`Cache::lookup_shared`]).

pub mod coalesce;
pub mod codec;
pub mod conditional;
pub mod decide;
pub mod entry;
pub mod eviction;
pub mod expiry;
pub mod key;
pub mod policy;
pub mod range;
pub mod shared;
pub mod status;
pub mod store;

use std::sync::Arc;
use std::time::SystemTime;
use tokio::time::Instant;

use http::{HeaderMap, HeaderName};

use crate::error::UpstreamError;
use coalesce::{FlightGuard, Flights, Outcome, Role};
use entry::{CachedResponse, Filling};
use expiry::ExpiryQueue;
use key::{split_key, Key};
use shared::SharedTier;
use store::Store;

/// What a single-flight fetch produced, as handed to every waiter.
#[derive(Clone, Debug)]
pub enum FetchOutcome {
    /// A complete response was stored (or freshened by a `304`): share it.
    Stored(Arc<CachedResponse>),
    /// The headers are in and the body is arriving: each waiter serves it from its reader of
    /// the flight's body as it comes. Followed by `Stored` or `Failed` when it is to be
    /// stored; a body that will not be stored (too large) ends with the flight.
    Streaming(Arc<Filling>),
    /// The response may not be shared (private, uncacheable): each waiter must make its own
    /// request.
    NotShared,
    /// The upstream failed (before or during the body): every waiter gets this error.
    Failed(UpstreamError),
}

impl Outcome for FetchOutcome {
    fn is_final(&self) -> bool {
        !matches!(self, FetchOutcome::Streaming(_))
    }
}

/// Where a looked-up entry came from: this instance's memory, or the shared tier on Redis
/// (`REDIS_URL`), whose finds the caller puts into memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tier {
    Memory,
    Shared,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Memory => "memory",
            Tier::Shared => "redis",
        }
    }
}

/// A stored variant found by [`Cache::lookup`].
#[derive(Clone, Debug)]
pub struct Hit {
    pub entry: Arc<CachedResponse>,
    pub tier: Tier,
}

/// Which stored keys a purge or selection addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target<'a> {
    /// One path and query, under every origin the origin filter admits.
    Path(&'a str),
    /// Every key whose path and query starts with this (`""`: every key).
    Prefix(&'a str),
}

/// Sizes for the operator listener.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Stored responses (variants).
    pub entries: usize,
    /// Accounted bytes of stored responses.
    pub bytes: usize,
    /// The byte budget (`CACHE_MAX_BYTES`).
    pub max_bytes: usize,
    /// Upstream fetches other requests can join.
    pub in_flight: usize,
    /// Bytes held for bodies streamed to several requests and not stored.
    pub stream_buffer_bytes: usize,
    /// Readers of such bodies cut off for falling too far behind.
    pub stream_cutoffs: u64,
}

/// Store, timers and in-flight fetches together, behind the operations the proxy needs; and
/// the shared tier behind them, when there is one.
pub struct Cache {
    store: Store,
    flights: Flights<FetchOutcome>,
    expiry: ExpiryQueue,
    shared: Option<SharedTier>,
    /// Recent purges (admin requests here and, with a shared tier, from other instances):
    /// a fill that started before one of them must not store what it fetched.
    purges: std::sync::Mutex<std::collections::VecDeque<Purged>>,
}

/// One purge in [`Cache::purges`].
struct Purged {
    at: Instant,
    prefix: bool,
    path: String,
    host: Option<String>,
}

/// Purges remembered for [`Cache::purged_since`]; a fill that started before the oldest of a
/// full log is not stored (a forgotten purge may have covered it).
const PURGE_LOG: usize = 1024;

impl Cache {
    /// A cache whose store holds at most `max_bytes` (`CACHE_MAX_BYTES`); a body streamed to
    /// several requests and not stored holds at most `stream_limit` bytes, all of them at
    /// most `stream_total` (`STREAM_BUFFER_BYTES`, `STREAM_BUFFER_TOTAL_BYTES`).
    pub fn new(max_bytes: usize, stream_limit: usize, stream_total: usize) -> Self {
        Cache {
            store: Store::new(max_bytes),
            flights: Flights::new(stream_limit, stream_total),
            expiry: ExpiryQueue::default(),
            shared: None,
            purges: Default::default(),
        }
    }

    /// Records a purge of `path` (or, `prefix`, every path starting with it) under `host`
    /// (`None`: all) at `now`, and detaches the flights it covers so later requests do not
    /// join a fetch that started before it.
    pub fn note_purge(&self, prefix: bool, path: &str, host: Option<&str>, now: Instant) {
        let covers = |flight_key: &str| {
            let (origin, rest) = split_key(flight_key);
            let rest = rest.split('\0').next().unwrap_or(rest);
            let path_ok = if prefix {
                rest.starts_with(path)
            } else {
                rest == path
            };
            path_ok && host.is_none_or(|h| key::origin_host(origin) == h)
        };
        self.flights.detach_matching(covers);
        let mut log = self.purges.lock().unwrap_or_else(|e| e.into_inner());
        if log.len() >= PURGE_LOG {
            log.pop_front();
        }
        log.push_back(Purged {
            at: now,
            prefix,
            path: path.to_string(),
            host: host.map(str::to_string),
        });
    }

    /// Whether a purge covering `key` happened after `since` (when a fill started): what it
    /// fetched must then not be stored. A fill older than the oldest purge of a full log is
    /// treated as purged (a forgotten purge may have covered it).
    pub fn purged_since(&self, key: &str, since: Instant) -> bool {
        let (origin, path) = split_key(key);
        let log = self.purges.lock().unwrap_or_else(|e| e.into_inner());
        if log.len() >= PURGE_LOG && log.front().is_some_and(|oldest| since < oldest.at) {
            return true;
        }
        log.iter().rev().take_while(|p| p.at > since).any(|p| {
            let path_ok = if p.prefix {
                path.starts_with(p.path.as_str())
            } else {
                path == p.path
            };
            path_ok
                && p.host
                    .as_deref()
                    .is_none_or(|h| key::origin_host(origin) == h)
        })
    }

    /// The same cache with a shared second tier behind it.
    pub fn with_shared(mut self, tier: SharedTier) -> Self {
        self.shared = Some(tier);
        self
    }

    /// The shared tier, when `REDIS_URL` configured one.
    pub fn shared(&self) -> Option<&SharedTier> {
        self.shared.as_ref()
    }

    /// The variant of `key` that a request with headers `req` selects, from the shared tier
    /// (`None` without one, on a miss, or when Redis is unavailable). Not put into memory:
    /// the caller decides whether it is usable, then stores it ([`Cache::insert`]).
    pub async fn lookup_shared(&self, key: &str, req: &HeaderMap) -> Option<Hit> {
        let tier = self.shared.as_ref()?;
        let blobs = tier.variants(key).await;
        Self::select_shared(key, blobs, req)
    }

    /// The variant among encoded `blobs` of `key` that a request with headers `req` selects.
    pub fn select_shared(key: &str, blobs: Vec<Vec<u8>>, req: &HeaderMap) -> Option<Hit> {
        let (now, wall) = (Instant::now(), SystemTime::now());
        for blob in blobs {
            match codec::decode(&blob, key, now, wall) {
                Ok(e) if e.vary.matches(req) => {
                    let entry = CachedResponse::from_encoded(e, key.len(), entry::clock_ms());
                    return Some(Hit {
                        entry: Arc::new(entry),
                        tier: Tier::Shared,
                    });
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::debug!(key, %error, "unreadable entry in the shared tier skipped")
                }
            }
        }
        None
    }

    /// The stored variant of `key` that a request with headers `req` selects.
    pub fn lookup(&self, key: &str, req: &HeaderMap) -> Option<Hit> {
        self.store.get(key, req).map(|entry| Hit {
            entry,
            tier: Tier::Memory,
        })
    }

    /// Version `id` of `key`, if it is still stored (timers and refreshes check this).
    pub fn lookup_version(&self, key: &str, id: u64) -> Option<Arc<CachedResponse>> {
        self.store.get_by_id(key, id)
    }

    /// The `Vary` header names of the stored variants of `key` (empty when none vary).
    pub fn vary_names(&self, key: &str) -> Vec<HeaderName> {
        self.store.vary_names(key)
    }

    /// The stored [`Key`] equal to `key`, shared (so timers and flights do not copy key
    /// strings).
    pub fn shared_key(&self, key: &str) -> Option<Key> {
        self.store.stored_key(key)
    }

    /// Stores `entry` under `key` and arms its timer for `at` (its expiry, or earlier when it
    /// is to be refreshed ahead of expiry). Returns how many entries were evicted for room,
    /// `past_window` ones first.
    pub fn insert(
        &self,
        key: Key,
        entry: Arc<CachedResponse>,
        at: Instant,
        past_window: &dyn Fn(&CachedResponse) -> bool,
    ) -> usize {
        let id = entry.id;
        let key = self.store.stored_key(&key).unwrap_or(key);
        let evicted = self.store.insert(key.clone(), entry, past_window);
        if self.store.get_by_id(&key, id).is_some() {
            self.expiry.schedule(at, key, id);
        }
        evicted
    }

    /// Removes every variant of `key`; returns how many there were.
    pub fn invalidate(&self, key: &str) -> usize {
        self.store.remove(key)
    }

    /// Removes version `id` of `key` if it is still stored; returns whether it was. (Its
    /// timer finds it gone and does nothing.)
    pub fn invalidate_version(&self, key: &str, id: u64) -> bool {
        self.store.remove_version(key, id)
    }

    /// The stored keys `target` addresses under the origins (`scheme://host`) for which
    /// `origin` is true, with their variants (a snapshot).
    pub fn select(
        &self,
        target: Target<'_>,
        origin: impl Fn(&str) -> bool,
    ) -> Vec<(Key, Vec<Arc<CachedResponse>>)> {
        match target {
            Target::Path(path) => self
                .store
                .keys_for_path(path, origin)
                .into_iter()
                .map(|key| {
                    let variants = self.store.variants(&key);
                    (key, variants)
                })
                .collect(),
            Target::Prefix(prefix) => self.store.matching(|key| {
                let (o, path) = split_key(key);
                path.starts_with(prefix) && origin(o)
            }),
        }
    }

    /// Removes every variant of the keys `target` addresses under the origins for which
    /// `origin` is true; returns how many variants went.
    pub fn purge(&self, target: Target<'_>, origin: impl Fn(&str) -> bool) -> usize {
        match target {
            Target::Path(path) => self
                .store
                .keys_for_path(path, origin)
                .iter()
                .map(|key| self.store.remove(key))
                .sum(),
            Target::Prefix(prefix) => self.store.remove_matching(|key| {
                let (o, path) = split_key(key);
                path.starts_with(prefix) && origin(o)
            }),
        }
    }

    /// Joins the single flight for `flight_key` (a primary key plus its `Vary` suffix).
    pub fn join_flight(&self, flight_key: String) -> Role<FetchOutcome> {
        self.flights.join(flight_key)
    }

    /// A flight nobody else can join (a request with credentials fetches alone), with the
    /// same body handling.
    pub fn detached_flight(&self) -> FlightGuard<FetchOutcome> {
        self.flights.detached()
    }

    /// Looks at version `id` of `key` again at `at` (the expiry task's "not yet").
    pub fn recheck(&self, at: Instant, key: Key, id: u64) {
        self.expiry.schedule(at, key, id);
    }

    /// Waits until at least one timer is due and returns the due `(key, version)` pairs. One
    /// consumer (the expiry task) calls this; a version no longer stored is simply skipped by
    /// [`Cache::lookup_version`].
    pub async fn next_due(&self) -> Vec<(Key, u64)> {
        self.expiry.next_due().await
    }

    /// Entry count, bytes, budget and running flights.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            entries: self.store.len(),
            bytes: self.store.bytes(),
            max_bytes: self.store.max_bytes(),
            in_flight: self.flights.len(),
            stream_buffer_bytes: self.flights.budget().held(),
            stream_cutoffs: self.flights.budget().cutoffs(),
        }
    }

    /// Whether nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.store.is_empty()
    }
}

#[cfg(test)]
mod purge_log_tests {
    use super::*;

    /// A fill that started before a purge covering its key may not store; one that started
    /// after, or a purge of another path or host, does not matter.
    #[test]
    fn fills_older_than_a_covering_purge_are_not_stored() {
        let cache = Cache::new(1 << 20, 1 << 20, 1 << 20);
        let t0 = Instant::now();
        let later = t0 + std::time::Duration::from_secs(1);
        cache.note_purge(false, "/a?x=1", None, later);
        assert!(cache.purged_since("http://h/a?x=1", t0));
        assert!(!cache.purged_since("http://h/a?x=1", later));
        assert!(!cache.purged_since("http://h/b", t0));
        cache.note_purge(true, "/p/", Some("one.example"), later);
        assert!(cache.purged_since("https://one.example/p/q", t0));
        assert!(!cache.purged_since("https://two.example/p/q", t0));
        for _ in 0..PURGE_LOG {
            cache.note_purge(false, "/other", None, later);
        }
        assert!(
            cache.purged_since("http://h/unrelated", t0),
            "older than a full log"
        );
    }

    /// Requests after a purge start a new flight instead of joining one that began before.
    #[test]
    fn a_purge_detaches_the_flights_it_covers() {
        let cache = Cache::new(1 << 20, 1 << 20, 1 << 20);
        let _a = cache.join_flight("http://h/a\0accept=x".into());
        let _b = cache.join_flight("http://h/b".into());
        cache.note_purge(false, "/a", None, Instant::now());
        assert!(matches!(
            cache.join_flight("http://h/a\0accept=x".into()),
            Role::Leader(_)
        ));
        assert!(matches!(
            cache.join_flight("http://h/b".into()),
            Role::Follower(_)
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache_with(keys: &[&str]) -> Cache {
        let cache = Cache::new(1 << 20, 1 << 20, 1 << 20);
        let now = Instant::now();
        for k in keys {
            cache.insert(Key::from(*k), entry::test_entry(10), now, &|_| false);
        }
        cache
    }

    #[test]
    fn insert_arms_a_timer_for_every_stored_version() {
        let cache = cache_with(&["http://a/x", "http://b/x"]);
        assert_eq!(cache.expiry.len(), 2);
        // Larger than the whole budget: not stored, so no timer either.
        let small = Cache::new(100, 100, 100);
        small.insert(
            Key::from("http://a/big"),
            entry::test_entry(1000),
            Instant::now(),
            &|_| false,
        );
        assert_eq!((small.stats().entries, small.expiry.len()), (0, 0));
    }

    #[test]
    fn select_and_purge_by_path_prefix_and_all() {
        let keys = ["http://a/x?1", "http://b/x?1", "http://a/y", "https://b/xz"];
        let cache = cache_with(&keys);
        let by_path = cache.select(Target::Path("/x?1"), |_| true);
        assert_eq!(by_path.len(), 2);
        let only_b = cache.select(Target::Path("/x?1"), |o| o == "http://b");
        assert_eq!(only_b.len(), 1);
        assert_eq!(&*only_b[0].0, "http://b/x?1");
        assert_eq!(cache.select(Target::Prefix("/x"), |_| true).len(), 3);
        assert_eq!(cache.purge(Target::Path("/x?1"), |o| o == "http://a"), 1);
        assert_eq!(cache.purge(Target::Prefix("/x"), |_| true), 2);
        assert_eq!(cache.stats().entries, 1);
        assert_eq!(cache.purge(Target::Prefix(""), |_| true), 1);
        assert!(cache.is_empty());
    }

    #[test]
    fn lookup_reports_the_tier_and_versions_can_be_invalidated() {
        let cache = cache_with(&["http://a/x"]);
        let hit = cache.lookup("http://a/x", &HeaderMap::new()).unwrap();
        assert_eq!(hit.tier, Tier::Memory);
        assert!(cache.lookup_version("http://a/x", hit.entry.id).is_some());
        assert!(cache.invalidate_version("http://a/x", hit.entry.id));
        assert!(!cache.invalidate_version("http://a/x", hit.entry.id));
        assert_eq!(cache.invalidate("http://a/x"), 0);
    }
}
