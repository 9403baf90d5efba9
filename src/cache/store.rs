//! The in-memory store: a sharded [`DashMap`] from primary key to the stored variants of that
//! URL, bounded by `CACHE_MAX_BYTES` through [`Sieve`] eviction. Readers take one map-shard
//! read lock for a lookup and leave with an `Arc`, so nothing is held across `.await`, a hit
//! never copies a body, and a hit never touches the eviction queues (it sets one bit).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use http::{HeaderMap, HeaderName};

use super::entry::CachedResponse;
use super::eviction::Sieve;

/// Most variants kept per URL; a `Vary` on a high-cardinality header cannot grow a key
/// without bound (the oldest variant goes first).
const MAX_VARIANTS: usize = 16;

/// Stored responses by primary key, with size accounting and a byte budget.
pub struct Store {
    map: DashMap<Arc<str>, Vec<Arc<CachedResponse>>>,
    sieve: Sieve,
    max_bytes: usize,
    bytes: AtomicUsize,
    entries: AtomicUsize,
}

impl Store {
    /// A store whose accounted size never exceeds `max_bytes`.
    pub fn new(max_bytes: usize) -> Self {
        Store {
            map: DashMap::new(),
            sieve: Sieve::default(),
            max_bytes,
            bytes: AtomicUsize::new(0),
            entries: AtomicUsize::new(0),
        }
    }

    /// The variant of `key` that `req` selects, if stored.
    pub fn get(&self, key: &str, req: &HeaderMap) -> Option<Arc<CachedResponse>> {
        let variants = self.map.get(key)?;
        variants.iter().find(|e| e.vary.matches(req)).cloned()
    }

    /// The `Vary` header names of the stored variants of `key` (empty when none vary).
    pub fn vary_names(&self, key: &str) -> Vec<HeaderName> {
        self.map
            .get(key)
            .and_then(|v| v.first().map(|e| e.vary.names().to_vec()))
            .unwrap_or_default()
    }

    /// The stored version `id` of `key`, if it is still the current one.
    pub fn get_by_id(&self, key: &str, id: u64) -> Option<Arc<CachedResponse>> {
        self.map.get(key)?.iter().find(|e| e.id == id).cloned()
    }

    /// All stored variants of `key`.
    pub fn variants(&self, key: &str) -> Vec<Arc<CachedResponse>> {
        self.map.get(key).map(|v| v.clone()).unwrap_or_default()
    }

    /// Stores `entry`, replacing the variant it supersedes (variants with a different set of
    /// `Vary` names are dropped: the origin changed how it negotiates), then evicts until the
    /// budget holds, entries for which `past_window` is true first. Returns how many entries
    /// were evicted for room; an entry larger than the whole budget is not stored.
    pub fn insert(
        &self,
        key: Arc<str>,
        entry: Arc<CachedResponse>,
        past_window: &dyn Fn(&CachedResponse) -> bool,
    ) -> usize {
        if entry.size > self.max_bytes {
            return 0;
        }
        let mut removed = Vec::new();
        {
            let mut variants = self.map.entry(key.clone()).or_default();
            variants.retain(|old| {
                let keep = old.vary.same_names(&entry.vary) && old.vary != entry.vary;
                if !keep {
                    removed.push(old.clone());
                }
                keep
            });
            if variants.len() >= MAX_VARIANTS {
                removed.push(variants.remove(0));
            }
            variants.push(entry.clone());
        }
        self.bytes.fetch_add(entry.size, Ordering::Relaxed);
        self.entries.fetch_add(1, Ordering::Relaxed);
        self.sieve.insert(key.clone(), &entry);
        self.forget(&key, &removed);

        let mut evicted = 0;
        while self.bytes() > self.max_bytes {
            let Some((victim_key, victim)) = self.sieve.evict(&key, past_window) else {
                break;
            };
            if self.remove_version(&victim_key, victim.id) {
                evicted += 1;
            }
        }
        evicted
    }

    /// Removes version `id` of `key` if it is still stored. Returns whether it was.
    pub fn remove_version(&self, key: &str, id: u64) -> bool {
        let mut found = None;
        let now_empty = match self.map.get_mut(key) {
            None => return false,
            Some(mut variants) => {
                if let Some(pos) = variants.iter().position(|e| e.id == id) {
                    found = Some(variants.remove(pos));
                }
                variants.is_empty()
            }
        };
        if now_empty {
            self.map.remove_if(key, |_, v| v.is_empty());
        }
        match found {
            Some(e) => {
                self.forget(key, std::slice::from_ref(&e));
                true
            }
            None => false,
        }
    }

    /// Removes every variant of `key`; returns how many there were.
    pub fn remove(&self, key: &str) -> usize {
        match self.map.remove(key) {
            Some((key, variants)) => {
                self.forget(&key, &variants);
                variants.len()
            }
            None => 0,
        }
    }

    /// Removes every key starting with `prefix` (all keys for `""`); returns how many
    /// variants went.
    pub fn remove_prefix(&self, prefix: &str) -> usize {
        let mut removed = Vec::new();
        self.map.retain(|k, variants| {
            if k.starts_with(prefix) {
                removed.push((k.clone(), std::mem::take(variants)));
                false
            } else {
                true
            }
        });
        removed
            .iter()
            .map(|(k, v)| {
                self.forget(k, v);
                v.len()
            })
            .sum()
    }

    /// Keys starting with `prefix` and their variants (a snapshot).
    pub fn with_prefix(&self, prefix: &str) -> Vec<(Arc<str>, Vec<Arc<CachedResponse>>)> {
        self.map
            .iter()
            .filter(|e| e.key().starts_with(prefix))
            .map(|e| (e.key().clone(), e.value().clone()))
            .collect()
    }

    /// The shared `Arc<str>` of a stored key (so timers do not copy key strings).
    pub fn key_arc(&self, key: &str) -> Option<Arc<str>> {
        self.map.get(key).map(|e| e.key().clone())
    }

    /// Number of stored variants.
    pub fn len(&self) -> usize {
        self.entries.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Accounted bytes of all stored variants.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// The byte budget (`CACHE_MAX_BYTES`).
    pub fn max_bytes(&self) -> usize {
        self.max_bytes
    }

    /// Accounting and eviction-queue bookkeeping for entries that left the map.
    fn forget(&self, key: &str, gone: &[Arc<CachedResponse>]) {
        for e in gone {
            self.sieve.remove(key, e);
            self.bytes.fetch_sub(e.size, Ordering::Relaxed);
            self.entries.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(body: usize) -> Arc<CachedResponse> {
        crate::cache::entry::test_entry(body)
    }

    #[test]
    fn never_exceeds_the_budget_and_accounts_exactly() {
        let one = entry(1000).size;
        let store = Store::new(one * 10);
        let mut evicted = 0;
        for i in 0..100 {
            evicted += store.insert(Arc::from(format!("/k{i}")), entry(1000), &|_| false);
            assert!(store.bytes() <= store.max_bytes());
        }
        assert_eq!(store.len(), 10);
        assert_eq!(evicted, 90);
        assert_eq!(store.bytes(), one * 10);
        assert_eq!(store.remove_prefix(""), 10);
        assert_eq!((store.len(), store.bytes()), (0, 0));
    }

    #[test]
    fn visited_entries_survive_a_scan() {
        let one = entry(100).size;
        let store = Store::new(one * 400);
        let hot = |i| format!("/hot{i}");
        for i in 0..50 {
            store.insert(Arc::from(hot(i)), entry(100), &|_| false);
        }
        for round in 0..20 {
            for i in 0..50 {
                let e = store.get(&hot(i), &HeaderMap::new());
                e.unwrap_or_else(|| panic!("round {round}: {} evicted by a scan", hot(i)))
                    .touch();
            }
            for i in 0..100 {
                store.insert(Arc::from(format!("/scan{round}-{i}")), entry(100), &|_| {
                    false
                });
            }
        }
        assert_eq!(store.len(), 400);
    }

    #[test]
    fn oversized_entries_are_not_stored() {
        let store = Store::new(100);
        assert_eq!(store.insert(Arc::from("/big"), entry(1000), &|_| false), 0);
        assert!(store.is_empty());
    }
}
