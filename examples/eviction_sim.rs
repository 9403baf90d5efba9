//! Eviction-policy simulator: which policy should bound edgecache's store?
//!
//! Replays synthetic, deterministic request traces against object-count-bounded caches (every
//! object has the same size) and prints one markdown table of hit ratios per trace, rows =
//! policies, columns = cache sizes (1% and 10% of the 1M-object Zipf universe).
//!
//! Policies:
//!
//! * **LRU** (baseline), **FIFO**, **CLOCK** (FIFO ring + reference bit, second chance).
//! * **SIEVE** (Zhang et al., NSDI'24): a FIFO queue, one `visited` bit per object and a hand
//!   that walks from the tail (oldest) towards the head, clearing visited bits and evicting the
//!   first unvisited object; new objects go to the head. A hit only sets the bit.
//! * **S3-FIFO** (Yang et al., SOSP'23): small FIFO (10%) + main FIFO (90%) + ghost queue of
//!   evicted keys (as many entries as the main queue), 2-bit frequency counters capped at 3.
//!   Follows libCacheSim's `S3FIFO.c`: an object leaves the small queue for the main one when it
//!   was hit at least twice there (`move-to-main-threshold=2`); a ghost hit inserts into main.
//! * **sampled LRU** (Redis `allkeys-lru` without the pool): on eviction sample k random
//!   resident objects and evict the least recently used; k = 5 (Redis' default) and 16.
//! * **Redis LRU**: 5 samples per eviction feeding Redis' 16-entry eviction pool.
//! * **per-shard variants**: the same policy run independently in N shards chosen by key hash,
//!   each with capacity/N. This is what a sharded concurrent map can do without a global lock:
//!   a hit touches one per-entry flag or timestamp, a miss locks only its own shard's queue.
//!
//! Traces (fixed seeds, so every run prints the same numbers):
//!
//! * Zipf α = 0.99 and α = 0.8 over 1M objects;
//! * scan-polluted: the Zipf 0.99 trace with a sequential scan of 50k never-repeated keys
//!   (crawler, cache-busting query strings) after every 100k of its requests — the pattern that
//!   flushes LRU. Reported over all requests, over the Zipf requests only (scan requests are
//!   compulsory misses for every policy), and as the hit ratio those same Zipf requests lose
//!   compared with the unpolluted trace;
//! * loop: keys 0..1.2×capacity requested cyclically (LRU's worst case).
//!
//! Run with `cargo run --release --example eviction_sim` (about a minute on two cores);
//! `-- --requests N` changes the length of the Zipf traces (default 10M; the scan trace adds
//! half as many scan requests, the loop traces are N/5 long).
//! The results and the resulting recommendation are recorded in `bench/eviction.md`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// Objects in the Zipf traces' universe.
const OBJECTS: usize = 1_000_000;

/// "No slot" / "no key" marker in the index arrays.
const NONE: u32 = u32::MAX;

// ---------------------------------------------------------------------------------------------
// Randomness: SplitMix64 and a Zipf sampler (Vose's alias method), no external crates.
// ---------------------------------------------------------------------------------------------

/// The SplitMix64 finaliser: a good 64-bit mixer, also used as the key hash for sharding.
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// SplitMix64 pseudo-random generator.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(mix64(seed ^ 0x5EED_CAFE_F00D_D00D))
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.0)
    }

    /// Uniform in `0..n` (multiply-shift; the bias is below 2^-32, irrelevant here).
    fn below(&mut self, n: u32) -> u32 {
        (((self.next_u64() >> 32) * u64::from(n)) >> 32) as u32
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Zipf(α) over ranks `0..n` (rank 0 most popular), sampled in O(1) with an alias table.
struct Zipf {
    prob: Vec<f64>,
    alias: Vec<u32>,
}

impl Zipf {
    fn new(n: usize, alpha: f64) -> Self {
        let weights: Vec<f64> = (1..=n).map(|r| (r as f64).powf(-alpha)).collect();
        let total: f64 = weights.iter().sum();
        let mut prob: Vec<f64> = weights.iter().map(|w| w * n as f64 / total).collect();
        let mut alias: Vec<u32> = (0..n as u32).collect();
        let (mut small, mut large): (Vec<u32>, Vec<u32>) =
            (0..n as u32).partition(|&i| prob[i as usize] < 1.0);
        while let (Some(&s), Some(&l)) = (small.last(), large.last()) {
            small.pop();
            alias[s as usize] = l;
            prob[l as usize] -= 1.0 - prob[s as usize];
            if prob[l as usize] < 1.0 {
                large.pop();
                small.push(l);
            }
        }
        // Whatever is left over is 1 up to rounding.
        for i in small.into_iter().chain(large) {
            prob[i as usize] = 1.0;
        }
        Zipf { prob, alias }
    }

    fn sample(&self, rng: &mut Rng) -> u32 {
        let i = rng.below(self.prob.len() as u32);
        if rng.unit() < self.prob[i as usize] {
            i
        } else {
            self.alias[i as usize]
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Traces
// ---------------------------------------------------------------------------------------------

/// A request sequence over keys `0..universe`. Keys `>= regular` are scan keys.
struct Trace {
    requests: Vec<u32>,
    universe: usize,
    regular: u32,
}

fn zipf_trace(objects: usize, alpha: f64, len: usize, seed: u64) -> Trace {
    let zipf = Zipf::new(objects, alpha);
    let mut rng = Rng::new(seed);
    Trace {
        requests: (0..len).map(|_| zipf.sample(&mut rng)).collect(),
        universe: objects,
        regular: objects as u32,
    }
}

/// `base` (a Zipf trace) with a scan of `scan` fresh, never-repeated keys (numbered from
/// `base.universe` upwards) inserted after every `every` of its requests. The Zipf requests
/// are exactly `base`'s, so their hit ratio is directly comparable with `base` alone.
fn with_scans(base: &Trace, every: usize, scan: usize) -> Trace {
    let mut requests = Vec::with_capacity(base.requests.len() / every * (every + scan) + every);
    let mut next_scan_key = base.universe as u32;
    for chunk in base.requests.chunks(every) {
        requests.extend_from_slice(chunk);
        if chunk.len() == every {
            requests.extend(next_scan_key..next_scan_key + scan as u32);
            next_scan_key += scan as u32;
        }
    }
    Trace {
        requests,
        universe: next_scan_key as usize,
        regular: base.regular,
    }
}

fn loop_trace(keys: usize, len: usize) -> Trace {
    Trace {
        requests: (0..len).map(|i| (i % keys) as u32).collect(),
        universe: keys,
        regular: keys as u32,
    }
}

// ---------------------------------------------------------------------------------------------
// Policies
// ---------------------------------------------------------------------------------------------

/// A cache replaying a trace: `access` returns whether `key` was a hit (and admits it if not).
/// `now` is the request's index, the simulated clock.
trait Policy {
    fn access(&mut self, key: u32, now: u64) -> bool;
}

/// The replacement logic of one shard, over slots `0..capacity`. The key -> slot index lives
/// in [`Sharded`], shared by all shards, so a shard only manages its own slots.
trait Core {
    /// A hit on the object in `slot`.
    fn hit(&mut self, slot: u32, now: u64);
    /// Admits `key`; returns its slot and the key evicted to make room, if any.
    fn insert(&mut self, key: u32, now: u64) -> (u32, Option<u32>);
}

/// Runs a [`Core`] in `n` shards chosen by key hash, each with about capacity/n slots.
struct Sharded<C> {
    /// key -> global slot (`NONE` when not cached).
    slot_of: Vec<u32>,
    /// Global slot number of each shard's slot 0.
    base: Vec<u32>,
    shards: Vec<C>,
}

impl<C: Core> Sharded<C> {
    fn new(
        capacity: usize,
        shards: usize,
        universe: usize,
        mut make: impl FnMut(usize, u64) -> C,
    ) -> Self {
        let mut base = Vec::with_capacity(shards);
        let mut cores = Vec::with_capacity(shards);
        let mut next = 0;
        for i in 0..shards {
            let cap = capacity / shards + usize::from(i < capacity % shards);
            base.push(next as u32);
            cores.push(make(cap.max(1), i as u64));
            next += cap.max(1);
        }
        Sharded {
            slot_of: vec![NONE; universe],
            base,
            shards: cores,
        }
    }
}

/// The shard of `key` among `n` (the same hash for every sharded policy).
fn shard_of(key: u32, n: usize) -> usize {
    if n == 1 {
        0
    } else {
        (mix64(u64::from(key)) % n as u64) as usize
    }
}

impl<C: Core> Policy for Sharded<C> {
    fn access(&mut self, key: u32, now: u64) -> bool {
        let s = shard_of(key, self.shards.len());
        let slot = self.slot_of[key as usize];
        if slot != NONE {
            self.shards[s].hit(slot - self.base[s], now);
            return true;
        }
        let (local, evicted) = self.shards[s].insert(key, now);
        if let Some(old) = evicted {
            self.slot_of[old as usize] = NONE;
        }
        self.slot_of[key as usize] = self.base[s] + local;
        false
    }
}

/// Intrusive doubly linked list over slots; head = newest, tail = oldest.
struct List {
    newer: Vec<u32>,
    older: Vec<u32>,
    head: u32,
    tail: u32,
}

impl List {
    fn new(cap: usize) -> Self {
        List {
            newer: vec![NONE; cap],
            older: vec![NONE; cap],
            head: NONE,
            tail: NONE,
        }
    }

    fn push_head(&mut self, s: u32) {
        self.newer[s as usize] = NONE;
        self.older[s as usize] = self.head;
        if self.head == NONE {
            self.tail = s;
        } else {
            self.newer[self.head as usize] = s;
        }
        self.head = s;
    }

    fn unlink(&mut self, s: u32) {
        let (newer, older) = (self.newer[s as usize], self.older[s as usize]);
        if newer == NONE {
            self.head = older;
        } else {
            self.older[newer as usize] = older;
        }
        if older == NONE {
            self.tail = newer;
        } else {
            self.newer[older as usize] = newer;
        }
    }
}

/// Fill phase shared by the cores: the next free slot, if the shard is not full yet.
fn free_slot(len: &mut usize, cap: usize) -> Option<u32> {
    (*len < cap).then(|| {
        *len += 1;
        (*len - 1) as u32
    })
}

/// Exact LRU: every hit moves the object to the head (the global-lock-per-hit policy).
struct Lru {
    keys: Vec<u32>,
    list: List,
    len: usize,
}

impl Lru {
    fn new(cap: usize) -> Self {
        Lru {
            keys: vec![NONE; cap],
            list: List::new(cap),
            len: 0,
        }
    }
}

impl Core for Lru {
    fn hit(&mut self, slot: u32, _now: u64) {
        if self.list.head != slot {
            self.list.unlink(slot);
            self.list.push_head(slot);
        }
    }

    fn insert(&mut self, key: u32, _now: u64) -> (u32, Option<u32>) {
        let (slot, evicted) = match free_slot(&mut self.len, self.keys.len()) {
            Some(s) => (s, None),
            None => {
                let s = self.list.tail;
                self.list.unlink(s);
                (s, Some(self.keys[s as usize]))
            }
        };
        self.keys[slot as usize] = key;
        self.list.push_head(slot);
        (slot, evicted)
    }
}

/// FIFO: a ring of slots replaced in insertion order; hits do nothing.
struct Fifo {
    keys: Vec<u32>,
    hand: usize,
    len: usize,
}

impl Fifo {
    fn new(cap: usize) -> Self {
        Fifo {
            keys: vec![NONE; cap],
            hand: 0,
            len: 0,
        }
    }
}

impl Core for Fifo {
    fn hit(&mut self, _slot: u32, _now: u64) {}

    fn insert(&mut self, key: u32, _now: u64) -> (u32, Option<u32>) {
        if let Some(s) = free_slot(&mut self.len, self.keys.len()) {
            self.keys[s as usize] = key;
            return (s, None);
        }
        let s = self.hand;
        self.hand = (self.hand + 1) % self.keys.len();
        let old = std::mem::replace(&mut self.keys[s], key);
        (s as u32, Some(old))
    }
}

/// CLOCK: a ring with a reference bit; the hand gives referenced objects a second chance and
/// replaces the first unreferenced one in place.
struct Clock {
    keys: Vec<u32>,
    referenced: Vec<bool>,
    hand: usize,
    len: usize,
}

impl Clock {
    fn new(cap: usize) -> Self {
        Clock {
            keys: vec![NONE; cap],
            referenced: vec![false; cap],
            hand: 0,
            len: 0,
        }
    }
}

impl Core for Clock {
    fn hit(&mut self, slot: u32, _now: u64) {
        self.referenced[slot as usize] = true;
    }

    fn insert(&mut self, key: u32, _now: u64) -> (u32, Option<u32>) {
        if let Some(s) = free_slot(&mut self.len, self.keys.len()) {
            self.keys[s as usize] = key;
            return (s, None);
        }
        while self.referenced[self.hand] {
            self.referenced[self.hand] = false;
            self.hand = (self.hand + 1) % self.keys.len();
        }
        let s = self.hand;
        self.hand = (self.hand + 1) % self.keys.len();
        let old = std::mem::replace(&mut self.keys[s], key);
        (s as u32, Some(old))
    }
}

/// SIEVE: FIFO list + visited bit; the hand moves from the tail towards the head and stays
/// where it evicted. Survivors keep their position; new objects go to the head.
struct Sieve {
    keys: Vec<u32>,
    visited: Vec<bool>,
    list: List,
    hand: u32,
    len: usize,
}

impl Sieve {
    fn new(cap: usize) -> Self {
        Sieve {
            keys: vec![NONE; cap],
            visited: vec![false; cap],
            list: List::new(cap),
            hand: NONE,
            len: 0,
        }
    }
}

impl Core for Sieve {
    fn hit(&mut self, slot: u32, _now: u64) {
        self.visited[slot as usize] = true;
    }

    fn insert(&mut self, key: u32, _now: u64) -> (u32, Option<u32>) {
        let (slot, evicted) = match free_slot(&mut self.len, self.keys.len()) {
            Some(s) => (s, None),
            None => {
                let mut h = if self.hand == NONE {
                    self.list.tail
                } else {
                    self.hand
                };
                while self.visited[h as usize] {
                    self.visited[h as usize] = false;
                    h = self.list.newer[h as usize];
                    if h == NONE {
                        h = self.list.tail;
                    }
                }
                self.hand = self.list.newer[h as usize];
                self.list.unlink(h);
                (h, Some(self.keys[h as usize]))
            }
        };
        self.keys[slot as usize] = key;
        self.visited[slot as usize] = false;
        self.list.push_head(slot);
        (slot, evicted)
    }
}

/// Sampled LRU: a last-access timestamp per object; eviction samples `samples` random resident
/// objects and evicts the least recently used of them.
struct SampledLru {
    keys: Vec<u32>,
    last_access: Vec<u64>,
    samples: usize,
    rng: Rng,
    len: usize,
}

impl SampledLru {
    fn new(cap: usize, samples: usize, seed: u64) -> Self {
        SampledLru {
            keys: vec![NONE; cap],
            last_access: vec![0; cap],
            samples,
            rng: Rng::new(seed),
            len: 0,
        }
    }
}

impl Core for SampledLru {
    fn hit(&mut self, slot: u32, now: u64) {
        self.last_access[slot as usize] = now;
    }

    fn insert(&mut self, key: u32, now: u64) -> (u32, Option<u32>) {
        let cap = self.keys.len() as u32;
        let (slot, evicted) = match free_slot(&mut self.len, cap as usize) {
            Some(s) => (s, None),
            None => {
                let mut best = self.rng.below(cap);
                for _ in 1..self.samples {
                    let c = self.rng.below(cap);
                    if self.last_access[c as usize] < self.last_access[best as usize] {
                        best = c;
                    }
                }
                (best, Some(self.keys[best as usize]))
            }
        };
        self.keys[slot as usize] = key;
        self.last_access[slot as usize] = now;
        (slot, evicted)
    }
}

/// Redis' approximated LRU: each eviction samples `samples` objects into a pool of the 16
/// oldest candidates seen so far (with their access time as sampled) and evicts the oldest
/// pool entry that is still cached.
struct RedisLru {
    inner: SampledLru,
    /// (last access when sampled, slot, key), oldest first.
    pool: Vec<(u64, u32, u32)>,
}

const REDIS_POOL: usize = 16;

impl Core for RedisLru {
    fn hit(&mut self, slot: u32, now: u64) {
        self.inner.hit(slot, now);
    }

    fn insert(&mut self, key: u32, now: u64) -> (u32, Option<u32>) {
        let s = &mut self.inner;
        let cap = s.keys.len() as u32;
        if let Some(slot) = free_slot(&mut s.len, cap as usize) {
            s.keys[slot as usize] = key;
            s.last_access[slot as usize] = now;
            return (slot, None);
        }
        loop {
            for _ in 0..s.samples {
                let c = s.rng.below(cap);
                let cand = (s.last_access[c as usize], c, s.keys[c as usize]);
                if self
                    .pool
                    .iter()
                    .any(|&(_, slot, k)| slot == c && k == cand.2)
                {
                    continue;
                }
                if self.pool.len() < REDIS_POOL || cand.0 < self.pool[REDIS_POOL - 1].0 {
                    let at = self.pool.partition_point(|p| p.0 <= cand.0);
                    self.pool.insert(at, cand);
                    self.pool.truncate(REDIS_POOL);
                }
            }
            while !self.pool.is_empty() {
                let (_, slot, k) = self.pool.remove(0);
                if s.keys[slot as usize] == k {
                    s.keys[slot as usize] = key;
                    s.last_access[slot as usize] = now;
                    return (slot, Some(k));
                }
            }
        }
    }
}

/// S3-FIFO, optionally sharded: per-key state lives in shared arrays (keys are partitioned by
/// shard), each shard has its own small, main and ghost queues.
struct S3Fifo {
    /// 0 = not cached, 1 = small queue, 2 = main queue.
    queue: Vec<u8>,
    freq: Vec<u8>,
    /// Ghost-clock value when the key entered its shard's ghost queue (0 = not a ghost).
    ghost_at: Vec<u32>,
    threshold: u8,
    shards: Vec<S3Shard>,
}

struct S3Shard {
    small: VecDeque<u32>,
    main: VecDeque<u32>,
    small_cap: usize,
    main_cap: usize,
    ghost_cap: u32,
    /// Number of keys ever put in the ghost queue: the ghost is a FIFO of the last
    /// `ghost_cap` of them, kept as timestamps in `ghost_at` (as the S3-FIFO paper suggests).
    ghost_clock: u32,
    has_evicted: bool,
}

const SMALL: u8 = 1;
const MAIN: u8 = 2;

impl S3Fifo {
    fn new(capacity: usize, shards: usize, universe: usize, threshold: u8) -> Self {
        let shards = (0..shards)
            .map(|i| {
                let cap = (capacity / shards + usize::from(i < capacity % shards)).max(2);
                let small_cap = (cap / 10).max(1);
                S3Shard {
                    small: VecDeque::with_capacity(cap),
                    main: VecDeque::with_capacity(cap),
                    small_cap,
                    main_cap: cap - small_cap,
                    ghost_cap: (cap * 9 / 10) as u32,
                    ghost_clock: 0,
                    has_evicted: false,
                }
            })
            .collect();
        S3Fifo {
            queue: vec![0; universe],
            freq: vec![0; universe],
            ghost_at: vec![0; universe],
            threshold,
            shards,
        }
    }

    fn evict_small(&mut self, s: usize) {
        while let Some(t) = self.shards[s].small.pop_front() {
            let t_us = t as usize;
            if self.freq[t_us] >= self.threshold {
                self.freq[t_us] = 0;
                self.queue[t_us] = MAIN;
                self.shards[s].main.push_back(t);
            } else {
                let sh = &mut self.shards[s];
                sh.ghost_clock += 1;
                self.ghost_at[t_us] = sh.ghost_clock;
                self.queue[t_us] = 0;
                return;
            }
        }
    }

    fn evict_main(&mut self, s: usize) {
        while let Some(t) = self.shards[s].main.pop_front() {
            let t_us = t as usize;
            if self.freq[t_us] > 0 {
                self.freq[t_us] -= 1;
                self.shards[s].main.push_back(t);
            } else {
                self.queue[t_us] = 0;
                return;
            }
        }
    }
}

impl Policy for S3Fifo {
    fn access(&mut self, key: u32, _now: u64) -> bool {
        let k = key as usize;
        if self.queue[k] != 0 {
            self.freq[k] = (self.freq[k] + 1).min(3);
            return true;
        }
        let s = shard_of(key, self.shards.len());
        loop {
            let sh = &mut self.shards[s];
            if sh.small.len() + sh.main.len() < sh.small_cap + sh.main_cap {
                break;
            }
            sh.has_evicted = true;
            if sh.main.len() > sh.main_cap || sh.small.is_empty() {
                self.evict_main(s);
            } else {
                self.evict_small(s);
            }
        }
        let sh = &mut self.shards[s];
        let ghost = self.ghost_at[k] != 0 && sh.ghost_clock - self.ghost_at[k] < sh.ghost_cap;
        self.ghost_at[k] = 0;
        self.freq[k] = 0;
        if ghost || (!sh.has_evicted && sh.small.len() >= sh.small_cap) {
            sh.main.push_back(key);
            self.queue[k] = MAIN;
        } else {
            sh.small.push_back(key);
            self.queue[k] = SMALL;
        }
        false
    }
}

// ---------------------------------------------------------------------------------------------
// Experiment driver
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy)]
enum Kind {
    Lru,
    Fifo,
    Clock,
    Sieve,
    S3Fifo { threshold: u8 },
    Sampled { samples: usize },
    Redis,
}

struct Spec {
    name: &'static str,
    kind: Kind,
    shards: usize,
}

const POLICIES: &[Spec] = &[
    Spec {
        name: "LRU",
        kind: Kind::Lru,
        shards: 1,
    },
    Spec {
        name: "FIFO",
        kind: Kind::Fifo,
        shards: 1,
    },
    Spec {
        name: "CLOCK",
        kind: Kind::Clock,
        shards: 1,
    },
    Spec {
        name: "SIEVE",
        kind: Kind::Sieve,
        shards: 1,
    },
    Spec {
        name: "S3-FIFO",
        kind: Kind::S3Fifo { threshold: 2 },
        shards: 1,
    },
    Spec {
        name: "sampled LRU, 5 samples",
        kind: Kind::Sampled { samples: 5 },
        shards: 1,
    },
    Spec {
        name: "sampled LRU, 16 samples",
        kind: Kind::Sampled { samples: 16 },
        shards: 1,
    },
    Spec {
        name: "Redis LRU (5 samples + 16-entry pool)",
        kind: Kind::Redis,
        shards: 1,
    },
    Spec {
        name: "SIEVE per shard (16)",
        kind: Kind::Sieve,
        shards: 16,
    },
    Spec {
        name: "SIEVE per shard (64)",
        kind: Kind::Sieve,
        shards: 64,
    },
    Spec {
        name: "S3-FIFO per shard (16)",
        kind: Kind::S3Fifo { threshold: 2 },
        shards: 16,
    },
    Spec {
        name: "sampled LRU (5) per shard (16)",
        kind: Kind::Sampled { samples: 5 },
        shards: 16,
    },
    Spec {
        name: "sampled LRU (16) per shard (16)",
        kind: Kind::Sampled { samples: 16 },
        shards: 16,
    },
];

/// Hits over all requests and over the regular (non-scan) requests.
#[derive(Clone, Copy, Default)]
struct Counts {
    hits: u64,
    requests: u64,
    regular_hits: u64,
    regular_requests: u64,
}

fn replay(mut policy: impl Policy, trace: &Trace) -> Counts {
    let mut c = Counts::default();
    for (now, &key) in trace.requests.iter().enumerate() {
        let hit = policy.access(key, now as u64);
        c.hits += u64::from(hit);
        if key < trace.regular {
            c.regular_requests += 1;
            c.regular_hits += u64::from(hit);
        }
    }
    c.requests = trace.requests.len() as u64;
    c
}

fn simulate(spec: &Spec, trace: &Trace, capacity: usize) -> Counts {
    let (n, u) = (spec.shards, trace.universe);
    match spec.kind {
        Kind::Lru => replay(Sharded::new(capacity, n, u, |c, _| Lru::new(c)), trace),
        Kind::Fifo => replay(Sharded::new(capacity, n, u, |c, _| Fifo::new(c)), trace),
        Kind::Clock => replay(Sharded::new(capacity, n, u, |c, _| Clock::new(c)), trace),
        Kind::Sieve => replay(Sharded::new(capacity, n, u, |c, _| Sieve::new(c)), trace),
        Kind::S3Fifo { threshold } => replay(S3Fifo::new(capacity, n, u, threshold), trace),
        Kind::Sampled { samples } => replay(
            Sharded::new(capacity, n, u, |c, seed| SampledLru::new(c, samples, seed)),
            trace,
        ),
        Kind::Redis => replay(
            Sharded::new(capacity, n, u, |c, seed| RedisLru {
                inner: SampledLru::new(c, 5, seed),
                pool: Vec::with_capacity(REDIS_POOL + 1),
            }),
            trace,
        ),
    }
}

/// One column of a table: a cache size and the trace replayed against it.
struct Column<'a> {
    label: String,
    capacity: usize,
    trace: &'a Trace,
}

/// Runs every policy against every column on all cores; returns `[policy][column]`.
fn run_all(columns: &[Column]) -> Vec<Vec<Counts>> {
    let jobs: Vec<(usize, usize)> = (0..POLICIES.len())
        .flat_map(|p| (0..columns.len()).map(move |c| (p, c)))
        .collect();
    let results = Mutex::new(vec![vec![Counts::default(); columns.len()]; POLICIES.len()]);
    let next = AtomicUsize::new(0);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    std::thread::scope(|scope| {
        for _ in 0..threads.min(jobs.len()) {
            scope.spawn(|| {
                while let Some(&(p, c)) = jobs.get(next.fetch_add(1, Ordering::Relaxed)) {
                    let col = &columns[c];
                    let counts = simulate(&POLICIES[p], col.trace, col.capacity);
                    results.lock().unwrap()[p][c] = counts;
                }
            });
        }
    });
    results.into_inner().unwrap()
}

fn pct(hits: u64, of: u64) -> String {
    format!("{:.2}%", 100.0 * hits as f64 / of.max(1) as f64)
}

/// Prints one markdown table. With `baseline` (the same Zipf requests without scans), each
/// column also shows the hit ratio of the regular (non-scan) requests and what the scans cost
/// them, in percentage points.
fn print_table(
    title: &str,
    columns: &[Column],
    results: &[Vec<Counts>],
    baseline: Option<&[Vec<Counts>]>,
) {
    println!("### {title}\n");
    let mut header = String::from("| policy |");
    let mut rule = String::from("|---|");
    for col in columns {
        if baseline.is_some() {
            header += &format!(
                " {0}: all requests | {0}: Zipf requests | {0}: loss from scans |",
                col.label
            );
            rule += "---:|---:|---:|";
        } else {
            header += &format!(" {} |", col.label);
            rule += "---:|";
        }
    }
    println!("{header}\n{rule}");
    for (p, (spec, row)) in POLICIES.iter().zip(results).enumerate() {
        let mut line = format!("| {} |", spec.name);
        for (c, counts) in row.iter().enumerate() {
            line += &format!(" {} |", pct(counts.hits, counts.requests));
            if let Some(base) = baseline {
                let ratio = |hits: u64, of: u64| 100.0 * hits as f64 / of.max(1) as f64;
                let without = ratio(base[p][c].hits, base[p][c].requests);
                let with = ratio(counts.regular_hits, counts.regular_requests);
                line += &format!(" {with:.2}% | {:.2} pp |", without - with);
            }
        }
        println!("{line}");
    }
    println!();
}

fn size_columns<'a>(sizes: &[usize], trace: &'a Trace) -> Vec<Column<'a>> {
    sizes
        .iter()
        .map(|&cap| Column {
            label: format!("{}% ({cap})", cap * 100 / OBJECTS),
            capacity: cap,
            trace,
        })
        .collect()
}

fn secs(d: std::time::Duration) -> String {
    format!("{:.1}s", d.as_secs_f64())
}

fn main() {
    let mut requests = 10_000_000usize;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (
            arg.as_str(),
            args.next().map(|v| v.replace('_', "").parse()),
        ) {
            ("--requests", Some(Ok(n))) if n >= 100_000 => requests = n,
            _ => {
                eprintln!("usage: eviction_sim [--requests N]   (N >= 100000, default 10M)");
                std::process::exit(2);
            }
        }
    }

    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let sizes = [OBJECTS / 100, OBJECTS / 10];
    let started = Instant::now();
    println!(
        "Object-count-bounded caches (uniform object size), {OBJECTS} objects, caches of 1% and \
         10% of them. Hit ratio = hits / requests, cold misses included. {threads} threads.\n"
    );

    // (a) Zipf 0.99: kept, as the scan trace is built from it.
    let t = Instant::now();
    let zipf99 = zipf_trace(OBJECTS, 0.99, requests, 1);
    let generated = t.elapsed();
    let columns = size_columns(&sizes, &zipf99);
    let zipf99_results = run_all(&columns);
    print_table("Zipf α=0.99", &columns, &zipf99_results, None);
    println!(
        "_{requests} requests; trace generated in {}, simulated in {}._\n",
        secs(generated),
        secs(t.elapsed() - generated)
    );

    // (b) Zipf 0.8.
    let t = Instant::now();
    let zipf80 = zipf_trace(OBJECTS, 0.8, requests, 2);
    let generated = t.elapsed();
    let columns = size_columns(&sizes, &zipf80);
    print_table("Zipf α=0.8", &columns, &run_all(&columns), None);
    println!(
        "_{requests} requests; trace generated in {}, simulated in {}._\n",
        secs(generated),
        secs(t.elapsed() - generated)
    );
    drop(zipf80);

    // (c) The Zipf 0.99 trace with a 50k-key one-hit scan after every 100k of its requests.
    let t = Instant::now();
    let scanned = with_scans(&zipf99, 100_000, 50_000);
    let columns = size_columns(&sizes, &scanned);
    let results = run_all(&columns);
    print_table(
        "Scan-polluted: the Zipf α=0.99 trace + a 50k-key one-hit scan after every 100k requests",
        &columns,
        &results,
        Some(&zipf99_results),
    );
    println!(
        "_{} requests ({} of them scans, which can never hit: the best possible \"all \
         requests\" ratio is {:.1}% of the \"Zipf requests\" one); \"loss from scans\" = Zipf \
         α=0.99 table minus the \"Zipf requests\" column; simulated in {}._\n",
        scanned.requests.len(),
        scanned.requests.len() - requests,
        100.0 * requests as f64 / scanned.requests.len() as f64,
        secs(t.elapsed())
    );
    drop((scanned, zipf99));

    // (d) Loop over 1.2x the cache size, so each column has its own trace.
    let t = Instant::now();
    let loop_len = requests / 5;
    let loops: Vec<Trace> = sizes
        .iter()
        .map(|&cap| loop_trace(cap * 6 / 5, loop_len))
        .collect();
    let columns: Vec<Column> = sizes
        .iter()
        .zip(&loops)
        .map(|(&cap, trace)| Column {
            label: format!(
                "{}% ({cap}), loop of {}",
                cap * 100 / OBJECTS,
                trace.universe
            ),
            capacity: cap,
            trace,
        })
        .collect();
    print_table(
        "Loop: keys 0..1.2×capacity requested cyclically",
        &columns,
        &run_all(&columns),
        None,
    );
    println!(
        "_{loop_len} requests per column; simulated in {}._\n",
        secs(t.elapsed())
    );

    println!("Total runtime: {}", secs(started.elapsed()));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn random_trace(universe: u32, len: usize, seed: u64) -> Vec<u32> {
        let mut rng = Rng::new(seed);
        // Skewed enough to produce both hits and evictions.
        (0..len)
            .map(|_| {
                let bound = rng.below(universe) + 1;
                rng.below(bound)
            })
            .collect()
    }

    /// Hit/miss sequence of `policy` over `trace`.
    fn outcomes(mut policy: impl Policy, trace: &[u32]) -> Vec<bool> {
        (0..)
            .zip(trace)
            .map(|(now, &k)| policy.access(k, now))
            .collect()
    }

    /// Textbook LRU over a `Vec` (front = least recently used).
    fn reference_lru(cap: usize, trace: &[u32]) -> Vec<bool> {
        let mut q: Vec<u32> = Vec::new();
        trace
            .iter()
            .map(|&k| {
                if let Some(i) = q.iter().position(|&x| x == k) {
                    q.remove(i);
                    q.push(k);
                    return true;
                }
                if q.len() == cap {
                    q.remove(0);
                }
                q.push(k);
                false
            })
            .collect()
    }

    /// SIEVE as in the NSDI'24 pseudocode, over a `Vec` (index 0 = tail = oldest).
    fn reference_sieve(cap: usize, trace: &[u32]) -> Vec<bool> {
        let mut q: Vec<(u32, bool)> = Vec::new();
        let mut hand: Option<usize> = None;
        trace
            .iter()
            .map(|&k| {
                if let Some(e) = q.iter_mut().find(|e| e.0 == k) {
                    e.1 = true;
                    return true;
                }
                if q.len() == cap {
                    let mut h = hand.unwrap_or(0);
                    while q[h].1 {
                        q[h].1 = false;
                        h = if h + 1 == q.len() { 0 } else { h + 1 };
                    }
                    q.remove(h);
                    // The next newer object slid into index h.
                    hand = (h < q.len()).then_some(h);
                }
                q.push((k, false));
                false
            })
            .collect()
    }

    fn resident<C>(p: &Sharded<C>) -> usize {
        p.slot_of.iter().filter(|&&s| s != NONE).count()
    }

    #[test]
    fn lru_matches_reference() {
        let trace = random_trace(200, 20_000, 7);
        let got = outcomes(Sharded::new(16, 1, 200, |c, _| Lru::new(c)), &trace);
        assert_eq!(got, reference_lru(16, &trace));
    }

    #[test]
    fn sieve_matches_reference() {
        for cap in [1, 2, 5, 16] {
            let trace = random_trace(100, 20_000, cap as u64);
            let got = outcomes(Sharded::new(cap, 1, 100, |c, _| Sieve::new(c)), &trace);
            assert_eq!(got, reference_sieve(cap, &trace), "capacity {cap}");
        }
    }

    #[test]
    fn sharded_policies_respect_capacity_and_hit_resident_keys() {
        let trace = random_trace(5_000, 50_000, 3);
        for shards in [1, 16] {
            let mut p = Sharded::new(100, shards, 5_000, |c, seed| SampledLru::new(c, 5, seed));
            let mut q = Sharded::new(100, shards, 5_000, |c, _| Clock::new(c));
            let mut r = Sharded::new(100, shards, 5_000, |c, _| Sieve::new(c));
            for (now, &k) in (0..).zip(&trace) {
                p.access(k, now);
                q.access(k, now);
                r.access(k, now);
                // Just admitted or hit: the very next access must hit.
                assert!(p.access(k, now) && q.access(k, now) && r.access(k, now));
            }
            assert_eq!(resident(&p), 100);
            assert_eq!(resident(&q), 100);
            assert_eq!(resident(&r), 100);
        }
    }

    #[test]
    fn s3fifo_respects_capacity_and_keeps_its_queues_consistent() {
        let trace = random_trace(5_000, 50_000, 4);
        for shards in [1, 4] {
            let mut p = S3Fifo::new(200, shards, 5_000, 2);
            for (now, &k) in (0..).zip(&trace) {
                p.access(k, now);
                assert!(p.access(k, now), "just admitted");
            }
            let queued: usize = p.shards.iter().map(|s| s.small.len() + s.main.len()).sum();
            assert!(queued <= 200);
            assert_eq!(queued, p.queue.iter().filter(|&&q| q != 0).count());
        }
    }

    #[test]
    fn s3fifo_resists_a_scan() {
        // A hot set hit repeatedly, then a long one-hit scan: the hot set survives in S3-FIFO
        // (it went to the main queue), not in LRU.
        let hot: Vec<u32> = (0..50).cycle().take(500).collect();
        let scan: Vec<u32> = (1_000..2_000).collect();
        let trace: Vec<u32> = hot.iter().chain(&scan).chain(&hot[..50]).copied().collect();
        let s3 = outcomes(S3Fifo::new(100, 1, 2_000, 2), &trace);
        let lru = outcomes(Sharded::new(100, 1, 2_000, |c, _| Lru::new(c)), &trace);
        assert!(s3[trace.len() - 50..].iter().all(|&h| h));
        assert!(lru[trace.len() - 50..].iter().all(|&h| !h));
    }

    #[test]
    fn zipf_sampler_has_the_right_head() {
        let (n, alpha, draws) = (1_000, 0.99, 200_000);
        let zipf = Zipf::new(n, alpha);
        let mut rng = Rng::new(9);
        let mut counts = vec![0u32; n];
        for _ in 0..draws {
            counts[zipf.sample(&mut rng) as usize] += 1;
        }
        let total: f64 = (1..=n).map(|r| (r as f64).powf(-alpha)).sum();
        for rank in [0usize, 1, 9] {
            let expected = ((rank + 1) as f64).powf(-alpha) / total * draws as f64;
            let got = f64::from(counts[rank]);
            assert!(
                (got - expected).abs() < 0.05 * expected,
                "rank {rank}: {got} vs {expected}"
            );
        }
    }

    #[test]
    fn scans_are_inserted_between_zipf_chunks() {
        let base = loop_trace(10, 25);
        let t = with_scans(&base, 10, 3);
        assert_eq!(t.requests.len(), 25 + 2 * 3);
        assert_eq!(&t.requests[10..13], &[10, 11, 12]);
        assert_eq!(&t.requests[23..26], &[13, 14, 15]);
        assert_eq!(t.universe, 16);
    }
}
