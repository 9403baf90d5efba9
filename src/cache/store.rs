//! The in-memory store: a sharded [`DashMap`] from primary key (origin + path + query, see
//! [`super::key`]) to the stored variants of that URL (one held inline, more in a list),
//! bounded by `CACHE_MAX_BYTES` through [`Sieve`] eviction. It also counts keys per origin,
//! so an admin request for a path reaches that path under every host without scanning the
//! map. Readers take one map-shard read lock for a lookup and leave with an `Arc`, so nothing
//! is held across `.await`, a hit never copies a body, and a hit never touches the eviction
//! queues (it sets one bit).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use http::{HeaderMap, HeaderName};

use super::entry::CachedResponse;
use super::eviction::Sieve;
use super::key::{split_key, Key};

/// Most variants kept per URL; a `Vary` on a high-cardinality header cannot grow a key
/// without bound (the oldest variant goes first).
const MAX_VARIANTS: usize = 16;

/// The stored variants of one key: almost always one, held without a list (a list would
/// be an allocation of its own per key, and 8 more bytes in every map slot).
#[derive(Default)]
enum Variants {
    #[default]
    None,
    One(Arc<CachedResponse>),
    /// Two or more.
    // Boxed on purpose: a `Vec` inline would make every map slot 24 bytes instead of 16.
    #[allow(clippy::box_collection)]
    Many(Box<Vec<Arc<CachedResponse>>>),
}

impl std::ops::Deref for Variants {
    type Target = [Arc<CachedResponse>];

    fn deref(&self) -> &Self::Target {
        match self {
            Variants::None => &[],
            Variants::One(e) => std::slice::from_ref(e),
            Variants::Many(v) => v,
        }
    }
}

impl Variants {
    fn push(&mut self, entry: Arc<CachedResponse>) {
        *self = match std::mem::take(self) {
            Variants::None => Variants::One(entry),
            Variants::One(first) => Variants::Many(Box::new(vec![first, entry])),
            Variants::Many(mut v) => {
                v.push(entry);
                Variants::Many(v)
            }
        };
    }

    /// Keeps the variants for which `keep` is true, in order.
    fn retain(&mut self, mut keep: impl FnMut(&Arc<CachedResponse>) -> bool) {
        match self {
            Variants::None => {}
            Variants::One(e) => {
                if !keep(e) {
                    *self = Variants::None;
                }
            }
            Variants::Many(v) => {
                v.retain(keep);
                self.unlist();
            }
        }
    }

    /// Removes and returns variant `i`, if there is one.
    fn remove(&mut self, i: usize) -> Option<Arc<CachedResponse>> {
        match self {
            Variants::Many(v) if i < v.len() => {
                let gone = v.remove(i);
                self.unlist();
                Some(gone)
            }
            Variants::One(_) if i == 0 => match std::mem::take(self) {
                Variants::One(e) => Some(e),
                _ => None,
            },
            _ => None,
        }
    }

    /// A list of one or none becomes `One` or `None` again.
    fn unlist(&mut self) {
        if let Variants::Many(v) = self {
            if v.len() <= 1 {
                *self = v.pop().map_or(Variants::None, Variants::One);
            }
        }
    }
}

/// A map slot, as `DashMap` holds it (key and value side by side in its table): 24 bytes
/// with the thin [`Key`] (32 with an `Arc<str>`).
const _: () = assert!(std::mem::size_of::<(Key, Variants)>() == 24);

/// Stored responses by primary key, with size accounting and a byte budget.
pub struct Store {
    map: DashMap<Key, Variants>,
    /// Stored keys per origin (`scheme://host`); an origin leaves when its last key does.
    origins: DashMap<Box<str>, usize>,
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
            origins: DashMap::new(),
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
        self.map.get(key).map(|v| v.to_vec()).unwrap_or_default()
    }

    /// Stores `entry`, replacing the variant it supersedes (variants with a different set of
    /// `Vary` names are dropped: the origin changed how it negotiates), then evicts until the
    /// budget holds, entries for which `past_window` is true first. Returns how many entries
    /// were evicted for room; an entry larger than the whole budget is not stored.
    pub fn insert(
        &self,
        key: Key,
        entry: Arc<CachedResponse>,
        past_window: &dyn Fn(&CachedResponse) -> bool,
    ) -> usize {
        if entry.size > self.max_bytes {
            return 0;
        }
        {
            // Everything that must agree with the map (byte and entry counts, the eviction
            // queue, the origin index) is updated under the key's map guard, so a concurrent
            // removal of the same key sees it all or nothing.
            let mut slot = self.map.entry(key.clone()).or_default();
            let variants = slot.value_mut();
            if variants.is_empty() {
                *self.origins.entry(split_key(&key).0.into()).or_default() += 1;
            }
            let mut removed = Vec::new();
            variants.retain(|old| {
                let keep = old.vary.same_names(&entry.vary) && old.vary != entry.vary;
                if !keep {
                    removed.push(old.clone());
                }
                keep
            });
            if variants.len() >= MAX_VARIANTS {
                removed.extend(variants.remove(0));
            }
            variants.push(entry.clone());
            self.bytes.fetch_add(entry.size, Ordering::Relaxed);
            self.entries.fetch_add(1, Ordering::Relaxed);
            self.sieve.insert(key.clone(), &entry);
            self.forget(&key, &removed);
        }

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
        let now_empty = match self.map.get_mut(key) {
            None => return false,
            Some(mut variants) => {
                let Some(pos) = variants.iter().position(|e| e.id == id) else {
                    return false;
                };
                let Some(gone) = variants.remove(pos) else {
                    return false;
                };
                self.forget(key, std::slice::from_ref(&gone));
                if variants.is_empty() {
                    self.forget_origin(key);
                }
                variants.is_empty()
            }
        };
        if now_empty {
            self.map.remove_if(key, |_, v| v.is_empty());
        }
        true
    }

    /// Removes every variant of `key`; returns how many there were.
    pub fn remove(&self, key: &str) -> usize {
        match self.map.remove(key) {
            Some((key, variants)) => {
                self.forget(&key, &variants);
                if !variants.is_empty() {
                    self.forget_origin(&key);
                }
                variants.len()
            }
            None => 0,
        }
    }

    /// Removes every key for which `pred` is true; returns how many variants went.
    pub fn remove_matching(&self, pred: impl Fn(&str) -> bool) -> usize {
        let mut removed = 0;
        self.map.retain(|k, variants| {
            if pred(k) {
                self.forget(k, variants);
                if !variants.is_empty() {
                    self.forget_origin(k);
                }
                removed += variants.len();
                false
            } else {
                true
            }
        });
        removed
    }

    /// Keys for which `pred` is true and their variants (a snapshot).
    pub fn matching(&self, pred: impl Fn(&str) -> bool) -> Vec<(Key, Vec<Arc<CachedResponse>>)> {
        self.map
            .iter()
            .filter(|e| pred(e.key()))
            .map(|e| (e.key().clone(), e.value().to_vec()))
            .collect()
    }

    /// The stored keys for `path_and_query` under every origin for which `origin` is true.
    pub fn keys_for_path(&self, path_and_query: &str, origin: impl Fn(&str) -> bool) -> Vec<Key> {
        let origins: Vec<Box<str>> = self
            .origins
            .iter()
            .filter(|o| origin(o.key()))
            .map(|o| o.key().clone())
            .collect();
        let mut key = String::new();
        origins
            .iter()
            .filter_map(|o| {
                key.clear();
                key.push_str(o);
                key.push_str(path_and_query);
                self.stored_key(&key)
            })
            .collect()
    }

    /// The stored [`Key`] equal to `key`, shared (so timers do not copy key strings).
    pub fn stored_key(&self, key: &str) -> Option<Key> {
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

    /// Accounting and eviction-queue bookkeeping for variants that left the map (`gone` is
    /// everything `key` held when the key itself left).
    fn forget(&self, key: &str, gone: &[Arc<CachedResponse>]) {
        for e in gone {
            self.sieve.remove(key, e);
            self.bytes.fetch_sub(e.size, Ordering::Relaxed);
            self.entries.fetch_sub(1, Ordering::Relaxed);
        }
    }

    /// The origin index counts keys with at least one variant: called when `key`'s last
    /// variant went, under its map guard.
    fn forget_origin(&self, key: &str) {
        let origin = split_key(key).0;
        if let Some(mut n) = self.origins.get_mut(origin) {
            *n = n.saturating_sub(1);
        }
        self.origins.remove_if(origin, |_, n| *n == 0);
    }

    /// Checks that the counters agree with the map (tests only).
    #[cfg(test)]
    fn check_invariants(&self) {
        let (mut entries, mut bytes) = (0, 0);
        let mut origins = std::collections::HashMap::<String, usize>::new();
        for e in self.map.iter() {
            assert!(
                !e.value().is_empty(),
                "empty variant list left for {}",
                e.key()
            );
            entries += e.value().len();
            bytes += e.value().iter().map(|v| v.size).sum::<usize>();
            *origins.entry(split_key(e.key()).0.to_owned()).or_default() += 1;
        }
        assert_eq!(self.len(), entries, "entry count");
        assert_eq!(self.bytes(), bytes, "byte count");
        assert_eq!(self.sieve.queued(), entries, "eviction queue length");
        let indexed: std::collections::HashMap<String, usize> = self
            .origins
            .iter()
            .map(|o| (o.key().to_string(), *o.value()))
            .collect();
        assert_eq!(indexed, origins, "origin index");
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
            evicted += store.insert(Key::from(format!("/k{i}")), entry(1000), &|_| false);
            assert!(store.bytes() <= store.max_bytes());
        }
        assert_eq!(store.len(), 10);
        assert_eq!(evicted, 90);
        assert_eq!(store.bytes(), one * 10);
        assert_eq!(store.remove_matching(|_| true), 10);
        store.check_invariants();
        assert_eq!((store.len(), store.bytes()), (0, 0));
    }

    #[test]
    fn visited_entries_survive_a_scan() {
        let one = entry(100).size;
        let store = Store::new(one * 400);
        let hot = |i| format!("/hot{i}");
        for i in 0..50 {
            store.insert(Key::from(hot(i)), entry(100), &|_| false);
        }
        for round in 0..20 {
            for i in 0..50 {
                let e = store.get(&hot(i), &HeaderMap::new());
                e.unwrap_or_else(|| panic!("round {round}: {} evicted by a scan", hot(i)))
                    .touch();
            }
            for i in 0..100 {
                store.insert(Key::from(format!("/scan{round}-{i}")), entry(100), &|_| {
                    false
                });
            }
        }
        assert_eq!(store.len(), 400);
    }

    /// Many threads insert, replace and remove the same few keys at once: afterwards the
    /// byte and entry counts, the eviction queue and the origin index agree with the map.
    #[test]
    fn concurrent_inserts_and_removals_keep_the_accounting_exact() {
        let one = entry(100).size;
        let store = Arc::new(Store::new(one * 6));
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for i in 0..3000usize {
                        let key = format!("http://h{}/k{}", (i + t) % 3, i % 4);
                        match (i + t) % 5 {
                            0 => {
                                store.remove(&key);
                            }
                            1 => {
                                if let Some(e) = store.get(&key, &HeaderMap::new()) {
                                    store.remove_version(&key, e.id);
                                }
                            }
                            2 if i % 50 == 0 => {
                                store.remove_matching(|k| k.ends_with("/k1"));
                            }
                            _ => {
                                store.insert(Key::from(key.as_str()), entry(100), &|_| false);
                            }
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        store.check_invariants();
        assert!(store.bytes() <= store.max_bytes());
        store.remove_matching(|_| true);
        store.check_invariants();
        assert_eq!((store.len(), store.bytes()), (0, 0));
    }

    #[test]
    fn a_path_is_found_under_every_origin() {
        let store = Store::new(1 << 20);
        for k in ["http://a/x", "https://a/x", "http://b:8080/x", "http://a/y"] {
            store.insert(Key::from(k), entry(10), &|_| false);
        }
        let mut keys: Vec<String> = store
            .keys_for_path("/x", |_| true)
            .iter()
            .map(|k| k.to_string())
            .collect();
        keys.sort();
        assert_eq!(keys, ["http://a/x", "http://b:8080/x", "https://a/x"]);
        assert_eq!(store.keys_for_path("/x", |o| o.ends_with("//a")).len(), 2);
        store.check_invariants();
    }

    #[test]
    fn one_variant_is_held_without_a_list() {
        let (a, b, c) = (entry(1), entry(2), entry(3));
        let ids = |v: &Variants| v.iter().map(|e| e.id).collect::<Vec<_>>();
        assert_eq!(std::mem::size_of::<Variants>(), 16);
        let mut v = Variants::default();
        v.push(a.clone());
        assert!(matches!(v, Variants::One(_)));
        v.push(b.clone());
        v.push(c.clone());
        assert_eq!(ids(&v), [a.id, b.id, c.id]);
        assert_eq!(v.remove(0).map(|e| e.id), Some(a.id));
        assert!(v.remove(2).is_none());
        assert_eq!(ids(&v), [b.id, c.id]);
        v.retain(|e| e.id != c.id);
        assert!(matches!(v, Variants::One(ref e) if e.id == b.id));
        v.push(c.clone());
        assert_eq!(v.remove(1).map(|e| e.id), Some(c.id));
        assert!(matches!(v, Variants::One(_)));
        assert!(v.remove(1).is_none());
        v.retain(|_| false);
        assert!(matches!(v, Variants::None) && v.is_empty());
        assert!(v.remove(0).is_none());
        v.push(a.clone());
        assert_eq!(v.remove(0).map(|e| e.id), Some(a.id));
        assert!(matches!(v, Variants::None));
    }

    #[test]
    fn oversized_entries_are_not_stored() {
        let store = Store::new(100);
        assert_eq!(store.insert(Key::from("/big"), entry(1000), &|_| false), 0);
        assert!(store.is_empty());
    }
}
