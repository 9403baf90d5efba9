//! Eviction under `CACHE_MAX_BYTES`: SIEVE (Zhang et al., NSDI '24), one queue per eviction
//! shard. Chosen by the hit-ratio comparison in `bench/eviction.md`: on Zipf traces SIEVE is
//! 3.5–9.5 points above LRU and within 1.3 of S3-FIFO, it resists one-hit scans, and it needs
//! nothing on a hit but one per-entry bit — no lock, no reordering.
//!
//! Each shard is a FIFO list (a slab of nodes linked by index) of `(key, entry)` in insertion
//! order, plus a hand. To evict, the hand walks from the oldest node towards the newest:
//! an entry past its refresh window goes at once; a visited entry has its bit cleared and
//! stays; the first unvisited entry goes. Nodes are unlinked eagerly whenever the store drops
//! an entry, so the lists never hold more than the store does.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};

use super::entry::CachedResponse;
use super::key::Key;

const NIL: u32 = u32::MAX;

/// One queued entry: two 4-byte links and two thin pointers, 24 bytes (the thin [`Key`] and
/// the `Option`'s use of the pointers' niche keep it there).
struct Node {
    older: u32,
    newer: u32,
    /// `None` while the slot is free.
    item: Option<(Key, Arc<CachedResponse>)>,
}

const _: () = assert!(std::mem::size_of::<Node>() == 24);

/// One shard's SIEVE list.
struct Queue {
    nodes: Vec<Node>,
    free: Vec<u32>,
    newest: u32,
    oldest: u32,
    hand: u32,
}

impl Queue {
    fn new() -> Self {
        Queue {
            nodes: Vec::new(),
            free: Vec::new(),
            newest: NIL,
            oldest: NIL,
            hand: NIL,
        }
    }

    fn push(&mut self, key: Key, entry: Arc<CachedResponse>) -> u32 {
        let node = Node {
            older: self.newest,
            newer: NIL,
            item: Some((key, entry)),
        };
        let i = match self.free.pop() {
            Some(i) => {
                self.nodes[i as usize] = node;
                i
            }
            None => {
                self.nodes.push(node);
                (self.nodes.len() - 1) as u32
            }
        };
        if self.newest != NIL {
            self.nodes[self.newest as usize].newer = i;
        }
        self.newest = i;
        if self.oldest == NIL {
            self.oldest = i;
        }
        i
    }

    fn unlink(&mut self, i: u32) -> Option<(Key, Arc<CachedResponse>)> {
        let (older, newer) = {
            let n = self.nodes.get(i as usize)?;
            n.item.as_ref()?;
            (n.older, n.newer)
        };
        if older != NIL {
            self.nodes[older as usize].newer = newer;
        } else {
            self.oldest = newer;
        }
        if newer != NIL {
            self.nodes[newer as usize].older = older;
        } else {
            self.newest = older;
        }
        if self.hand == i {
            self.hand = newer;
        }
        self.free.push(i);
        self.nodes[i as usize].item.take()
    }

    /// Runs the hand until it finds a victim; unlinks and returns it.
    fn evict(
        &mut self,
        past_window: &dyn Fn(&CachedResponse) -> bool,
    ) -> Option<(Key, Arc<CachedResponse>)> {
        let len = self.nodes.len() - self.free.len();
        // Two passes are enough: the first clears every visited bit it meets.
        for _ in 0..=2 * len {
            if self.hand == NIL {
                self.hand = self.oldest;
            }
            let i = self.hand;
            let (_, entry) = self.nodes.get(i as usize)?.item.as_ref()?;
            if past_window(entry) || !entry.visited.swap(false, Ordering::Relaxed) {
                return self.unlink(i);
            }
            self.hand = self.nodes[i as usize].newer;
        }
        None
    }
}

/// SIEVE queues, sharded by key hash so that inserts into different shards never contend.
pub struct Sieve {
    shards: Box<[Mutex<Queue>]>,
}

impl Default for Sieve {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        let n = (cores * 4).next_power_of_two().max(4);
        Sieve {
            shards: (0..n).map(|_| Mutex::new(Queue::new())).collect(),
        }
    }
}

impl Sieve {
    fn shard_of(&self, key: &str) -> usize {
        let mut h = DefaultHasher::new();
        key.hash(&mut h);
        (h.finish() as usize) & (self.shards.len() - 1)
    }

    fn lock(&self, shard: usize) -> MutexGuard<'_, Queue> {
        self.shards[shard].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Entries queued in all shards.
    #[cfg(test)]
    pub fn queued(&self) -> usize {
        (0..self.shards.len())
            .map(|i| {
                let q = self.lock(i);
                q.nodes.iter().filter(|n| n.item.is_some()).count()
            })
            .sum()
    }

    /// Adds a newly stored entry at the head of its shard's queue.
    pub fn insert(&self, key: Key, entry: &Arc<CachedResponse>) {
        let shard = self.shard_of(&key);
        let slot = self.lock(shard).push(key, entry.clone());
        entry.node.store(slot, Ordering::Relaxed);
    }

    /// Removes an entry the store dropped (no-op if eviction already took it).
    pub fn remove(&self, key: &str, entry: &CachedResponse) {
        let slot = entry.node.load(Ordering::Relaxed);
        if slot == NIL {
            return;
        }
        let mut q = self.lock(self.shard_of(key));
        let ours = q
            .nodes
            .get(slot as usize)
            .and_then(|n| n.item.as_ref())
            .is_some_and(|(_, e)| e.id == entry.id);
        if ours {
            q.unlink(slot);
        }
    }

    /// Picks and unlinks a victim, starting with `key`'s shard and moving on to the next
    /// ones if it is empty. The caller removes the victim from the store.
    pub fn evict(
        &self,
        key: &str,
        past_window: &dyn Fn(&CachedResponse) -> bool,
    ) -> Option<(Key, Arc<CachedResponse>)> {
        let first = self.shard_of(key);
        (0..self.shards.len()).find_map(|k| {
            self.lock((first + k) % self.shards.len())
                .evict(past_window)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Arc<CachedResponse> {
        crate::cache::entry::test_entry(0)
    }

    fn never(_: &CachedResponse) -> bool {
        false
    }

    #[test]
    fn evicts_unvisited_in_insertion_order_and_spares_visited() {
        let q = Sieve {
            shards: vec![Mutex::new(Queue::new())].into_boxed_slice(),
        };
        let (a, b, c) = (entry(), entry(), entry());
        q.insert("a".into(), &a);
        q.insert("b".into(), &b);
        q.insert("c".into(), &c);
        a.visited.store(true, Ordering::Relaxed);
        assert_eq!(
            q.evict("x", &never).unwrap().1.id,
            b.id,
            "a was visited: spared"
        );
        assert_eq!(q.evict("x", &never).unwrap().1.id, c.id);
        assert_eq!(
            q.evict("x", &never).unwrap().1.id,
            a.id,
            "its bit was cleared on the pass"
        );
        assert!(q.evict("x", &never).is_none());
    }

    #[test]
    fn entries_past_their_window_go_first_and_removed_ones_never() {
        let q = Sieve {
            shards: vec![Mutex::new(Queue::new())].into_boxed_slice(),
        };
        let (a, b) = (entry(), entry());
        q.insert("a".into(), &a);
        q.insert("b".into(), &b);
        a.visited.store(true, Ordering::Relaxed);
        let a_id = a.id;
        assert_eq!(q.evict("x", &|e| e.id == a_id).unwrap().1.id, a.id);
        q.remove("b", &b);
        assert!(
            q.evict("x", &never).is_none(),
            "removed entries leave the queue at once"
        );
        let c = entry();
        q.insert("c".into(), &c);
        q.remove("b", &b);
        assert_eq!(
            q.evict("x", &never).unwrap().1.id,
            c.id,
            "a stale remove does not hit a reused slot"
        );
    }
}
