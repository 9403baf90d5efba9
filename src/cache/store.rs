//! The in-memory store: a sharded [`DashMap`] from primary key to the stored variants of that
//! URL. Readers take one shard read lock for a lookup and leave with an `Arc`, so nothing is
//! held across `.await` and a hit never copies a body.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use dashmap::DashMap;
use http::{HeaderMap, HeaderName};

use super::entry::CachedResponse;

/// Most variants kept per URL; a `Vary` on a high-cardinality header cannot grow a key
/// without bound (the oldest variant goes first).
const MAX_VARIANTS: usize = 16;

/// Stored responses by primary key, with size accounting.
#[derive(Default)]
pub struct Store {
    map: DashMap<Arc<str>, Vec<Arc<CachedResponse>>>,
    bytes: AtomicUsize,
    entries: AtomicUsize,
}

impl Store {
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

    /// Stores `entry`, replacing the variant it supersedes. Variants with a different set of
    /// `Vary` names are dropped: the origin changed how it negotiates.
    pub fn insert(&self, key: Arc<str>, entry: Arc<CachedResponse>) {
        let mut removed = 0usize;
        let mut removed_count = 0usize;
        let added = entry.size;
        {
            let mut variants = self.map.entry(key).or_default();
            variants.retain(|old| {
                let keep = old.vary.same_names(&entry.vary) && old.vary != entry.vary;
                if !keep {
                    removed += old.size;
                    removed_count += 1;
                }
                keep
            });
            if variants.len() >= MAX_VARIANTS {
                let old = variants.remove(0);
                removed += old.size;
                removed_count += 1;
            }
            variants.push(entry);
        }
        self.bytes.fetch_add(added, Ordering::Relaxed);
        self.bytes.fetch_sub(removed, Ordering::Relaxed);
        self.entries.fetch_add(1, Ordering::Relaxed);
        self.entries.fetch_sub(removed_count, Ordering::Relaxed);
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
                self.account_removed(e.size, 1);
                true
            }
            None => false,
        }
    }

    /// Removes every variant of `key`; returns how many there were.
    pub fn remove(&self, key: &str) -> usize {
        match self.map.remove(key) {
            Some((_, variants)) => {
                self.account_removed(variants.iter().map(|e| e.size).sum(), variants.len());
                variants.len()
            }
            None => 0,
        }
    }

    /// Removes every key starting with `prefix` (all keys for `""`); returns how many
    /// variants went.
    pub fn remove_prefix(&self, prefix: &str) -> usize {
        let (mut bytes, mut count) = (0, 0);
        self.map.retain(|k, variants| {
            if k.starts_with(prefix) {
                bytes += variants.iter().map(|e| e.size).sum::<usize>();
                count += variants.len();
                false
            } else {
                true
            }
        });
        self.account_removed(bytes, count);
        count
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

    fn account_removed(&self, bytes: usize, count: usize) {
        self.bytes.fetch_sub(bytes, Ordering::Relaxed);
        self.entries.fetch_sub(count, Ordering::Relaxed);
    }
}
