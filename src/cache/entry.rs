//! A stored response ([`CachedResponse`]): one immutable *head block* in the versioned
//! encoding of [`super::codec`] (status, the validators the headers lack, the header fields as
//! served) followed, for a body of at most [`codec::INLINE_BODY_MAX`] bytes, by the body — one
//! allocation, unless two exact-size ones take less memory in the allocator's size classes
//! (`body_inline`) — plus the metadata the policy needs (age, lifetime, stale allowances) in
//! compact form, and the atomics of eviction and refresh. Headers are not parsed into a
//! `HeaderMap` until a response is built ([`CachedResponse::headers_map`]): their values are
//! served as slices of the block.
//!
//! The entry owns its block and small body outright (`Box<[u8]>`, no reference count per
//! buffer): what a hit hands out are `Bytes` views that hold the entry's own `Arc`
//! ([`Bytes::from_owner`]), so a stored 1 KiB object is three allocations — the entry, its
//! head block and its body — and nothing else.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::time::Instant;

use crate::body::Pieces;
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, StatusCode};

use super::codec::{self, flags, FieldName, Fields, HeadLayout};
use super::key::VaryKey;

/// A complete, successfully read response that the policy allowed to be shared.
#[derive(Debug)]
pub struct CachedResponse {
    /// Unique per stored version; lets timers and admin actions tell a replaced entry apart.
    pub id: u64,
    /// The head block ([`codec`]), then the body when it is inline.
    block: Box<[u8]>,
    /// Where the body is.
    body: Body,
    /// The names the block spells out (not in [`codec::NAMES`]), in its order, parsed once:
    /// a hit clones them instead of parsing them again. `None` when there are none (most
    /// responses), so that they take 8 bytes of the entry, not 16.
    literal_names: Option<Box<Box<[HeaderName]>>>,
    pub vary: VaryKey,
    /// When the response arrived (monotonic), for its age (RFC 9111 §4.2.3): nanoseconds
    /// from the [`clock_ms`] epoch (negative before it), 8 bytes instead of an `Instant`'s 16.
    stored_at_ns: i64,
    /// The age it had when it arrived and its freshness lifetime, in nanoseconds (sub-second
    /// lifetimes such as `DEFAULT_CACHE_EXPIRY_TIME_SECS=0.5` are exact; 584 years at most).
    initial_age_ns: u64,
    lifetime_ns: u64,
    /// `stale-while-revalidate` / `stale-if-error`, in whole seconds (their unit).
    stale_while_revalidate_s: u32,
    stale_if_error_s: u32,
    /// Accounted size in bytes (block, body, key, `Vary` values and bookkeeping).
    pub size: usize,
    /// Last time a client asked for this entry, in ms since [`clock_ms`]'s epoch.
    last_access_ms: AtomicU64,
    /// The [`clock_ms`] time before which no new background refresh starts (backoff).
    refresh_not_before_ms: AtomicU64,
    /// This entry's slot in its eviction queue (`u32::MAX` before it is queued).
    pub node: AtomicU32,
    /// Where the block's header count is, and where its head ends (the inline body starts).
    headers_at: u32,
    head_len: u32,
    pub status: StatusCode,
    /// The block's flags byte ([`codec::flags`]).
    flags: u8,
    /// SIEVE's visited bit: set by hits, cleared by the eviction hand.
    pub visited: AtomicBool,
    /// Background refreshes of this version that failed in a row (the backoff stops growing
    /// after four).
    refresh_failures: AtomicU8,
}

/// Where a stored body is.
#[derive(Debug)]
enum Body {
    /// In the block, after the head (possibly empty).
    Inline,
    /// In an exact-size allocation of its own (a small body, when that takes less memory:
    /// [`body_inline`]).
    Apart(Box<[u8]>),
    /// The pieces it arrived in: a large body, shared with the requests it was streamed to.
    Pieces(Box<Pieces>),
}

/// A view of an entry's bytes that keeps the entry alive: the owner of the `Bytes` a hit
/// hands out (header values, body), so the entry's buffers need no reference count of their
/// own.
struct Held(Arc<CachedResponse>, Part);

#[derive(Clone, Copy)]
enum Part {
    Block,
    Body,
}

impl AsRef<[u8]> for Held {
    fn as_ref(&self) -> &[u8] {
        match self.1 {
            Part::Block => &self.0.block,
            Part::Body => self.0.owned_body(),
        }
    }
}

/// A response whose body is still arriving, as the requests waiting for it serve it: the
/// head of a [`CachedResponse`] to be (when `storing`).
#[derive(Debug)]
pub struct Filling {
    pub status: StatusCode,
    /// Headers as served: hop-by-hop and edgecache's own fields removed, `Date` present, no
    /// `Age`; `Content-Length` only when the upstream sent it.
    pub headers: HeaderMap,
    /// The upstream's validators (a generated `ETag` needs the whole body: stored entries
    /// get one, the responses streamed while it arrives do not).
    pub etag: Option<HeaderValue>,
    pub last_modified: Option<SystemTime>,
    /// The body's length, when the upstream declared it.
    pub length: Option<u64>,
    /// When the head arrived and the age it had then.
    pub received_at: Instant,
    pub initial_age: Duration,
    pub lifetime: Duration,
    pub vary: VaryKey,
    /// It will be stored once complete (not over `CACHE_MAX_OBJECT_BYTES`, as far as known).
    pub storing: bool,
}

impl Filling {
    /// Current age (RFC 9111 §4.2.3).
    pub fn age(&self, now: Instant) -> Duration {
        self.initial_age + now.saturating_duration_since(self.received_at)
    }

    /// Freshness left at `now`.
    pub fn ttl(&self, now: Instant) -> Duration {
        self.lifetime.saturating_sub(self.age(now))
    }
}

/// First wait after a failed background refresh; it doubles with each failure up to
/// [`MAX_REFRESH_BACKOFF`].
pub const MIN_REFRESH_BACKOFF: Duration = Duration::from_secs(1);
pub const MAX_REFRESH_BACKOFF: Duration = Duration::from_secs(10);

/// Everything needed to build a [`CachedResponse`] except the bookkeeping fields.
#[derive(Debug)]
pub struct NewEntry {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Pieces,
    pub etag: HeaderValue,
    pub last_modified: Option<SystemTime>,
    pub upstream_etag: Option<HeaderValue>,
    pub upstream_last_modified: Option<HeaderValue>,
    pub vary: VaryKey,
    pub stored_at: Instant,
    pub initial_age: Duration,
    pub lifetime: Duration,
    pub forbids_stale: bool,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    pub operator_ttl: bool,
}

/// A stored response whose head is encoded already: a [`NewEntry`] once encoded, or a
/// variant read back from the shared tier ([`codec::decode`]).
#[derive(Debug)]
pub struct EncodedEntry {
    /// The head block, followed by the body when that is inline (then `body` is a slice of
    /// it).
    pub(crate) block: Bytes,
    pub(crate) head: HeadLayout,
    pub body: Pieces,
    pub vary: VaryKey,
    pub stored_at: Instant,
    pub initial_age: Duration,
    pub lifetime: Duration,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
}

impl NewEntry {
    /// Encodes the head block. A body of at most [`codec::INLINE_BODY_MAX`] bytes is copied
    /// behind it (one exact-size allocation) or, when `body_inline` says two allocations
    /// take less memory, into an exact-size piece of its own; a larger one keeps its pieces.
    pub fn encode(self) -> EncodedEntry {
        let mut head = Vec::with_capacity(64 + self.headers.len() * 48);
        let layout = codec::encode_head(&mut head, &self);
        let (block, body) = if body_inline(head.len(), self.body.len()) {
            let mut block = Vec::with_capacity(head.len() + self.body.len());
            block.extend_from_slice(&head);
            for piece in self.body.as_slice() {
                block.extend_from_slice(piece);
            }
            let block = Bytes::from(block);
            let body = Pieces::from(block.slice(head.len()..));
            (block, body)
        } else if self.body.len() <= codec::INLINE_BODY_MAX {
            let body = Pieces::from(Bytes::from(self.body.to_vec()));
            (Bytes::copy_from_slice(&head), body)
        } else {
            (Bytes::copy_from_slice(&head), self.body)
        };
        EncodedEntry {
            block,
            head: layout,
            body,
            vary: self.vary,
            stored_at: self.stored_at,
            initial_age: self.initial_age,
            lifetime: self.lifetime,
            stale_while_revalidate: self.stale_while_revalidate,
            stale_if_error: self.stale_if_error,
        }
    }
}

/// The size of the allocation the daemon's allocator (mimalloc, `src/alloc.rs`) makes for a
/// request of `n` bytes: a multiple of 8 up to 64 bytes, then one of four size classes per
/// power of two (1,141 bytes take 1,280). Only used to choose between layouts.
pub(crate) fn alloc_size(n: usize) -> usize {
    let words = n.div_ceil(8).max(1);
    if words <= 8 {
        return words * 8;
    }
    let w = words - 1;
    let shift = (usize::BITS - 1 - w.leading_zeros()) - 2;
    ((w >> shift) + 1) << shift << 3
}

/// Whether a body of `body` bytes is kept behind a head block of `head` bytes, in one
/// allocation: when it is at most [`codec::INLINE_BODY_MAX`] bytes and that allocation is
/// no larger than the two separate ones. A 1 KiB body behind a ~120-byte head would take a
/// 1,280-byte size class, 128 + 1,024 bytes apart; most other sizes waste less together.
pub(crate) fn body_inline(head: usize, body: usize) -> bool {
    body <= codec::INLINE_BODY_MAX && alloc_size(head + body) <= alloc_size(head) + alloc_size(body)
}

/// Per-entry bookkeeping counted on top of the block, body, key and `Vary` values: the
/// entry itself and its `Arc`, and its share of the store — map slot, eviction node and
/// expiry heap slot (24 bytes each, with the tables' spare capacity) and the key's header.
const ENTRY_OVERHEAD: usize = std::mem::size_of::<CachedResponse>() + 16 + 112;

/// Accounted bytes of a body piece kept outside the block beyond its length (its reference
/// count and slot).
const PIECE_OVERHEAD: usize = 64;

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn whole_secs(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

impl CachedResponse {
    pub fn new(e: NewEntry, key_len: usize, last_access_ms: u64) -> Self {
        Self::from_encoded(e.encode(), key_len, last_access_ms)
    }

    /// The entry for an encoded response ([`NewEntry::encode`], [`codec::decode`]).
    pub fn from_encoded(e: EncodedEntry, key_len: usize, last_access_ms: u64) -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let inline = e.block.len() > e.head.len || e.body.is_empty();
        let outside = if inline {
            0
        } else {
            e.body.len() + e.body.as_slice().len() * PIECE_OVERHEAD
        };
        let names: usize = e
            .head
            .literal_names
            .iter()
            .map(|n| n.as_str().len() + 32)
            .sum();
        let size = e.block.len() + outside + names + key_len + e.vary.heap_size() + ENTRY_OVERHEAD;
        let EncodedEntry {
            block,
            head,
            body,
            vary,
            stored_at,
            initial_age,
            lifetime,
            stale_while_revalidate,
            stale_if_error,
        } = e;
        let (block, body) = if inline {
            drop(body); // a slice of the block: dropped first so the block is not copied
            (boxed(block), Body::Inline)
        } else if body.len() <= codec::INLINE_BODY_MAX {
            let apart = match body.single().cloned() {
                Some(piece) => {
                    drop(body); // so the piece is unshared and moves instead of being copied
                    boxed(piece)
                }
                None => body.to_vec().into_boxed_slice(),
            };
            (boxed(block), Body::Apart(apart))
        } else {
            (boxed(block), Body::Pieces(Box::new(body)))
        };
        CachedResponse {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            status: head.status,
            flags: head.flags,
            headers_at: head.headers_at as u32,
            head_len: head.len as u32,
            literal_names: (!head.literal_names.is_empty())
                .then(|| Box::new(head.literal_names.into_boxed_slice())),
            block,
            body,
            vary,
            stored_at_ns: signed_nanos(stored_at),
            initial_age_ns: nanos(initial_age),
            lifetime_ns: nanos(lifetime),
            stale_while_revalidate_s: whole_secs(stale_while_revalidate),
            stale_if_error_s: whole_secs(stale_if_error),
            size,
            last_access_ms: AtomicU64::new(last_access_ms),
            visited: AtomicBool::new(false),
            node: AtomicU32::new(u32::MAX),
            refresh_failures: AtomicU8::new(0),
            refresh_not_before_ms: AtomicU64::new(0),
        }
    }

    /// The parsed `Last-Modified` time, for `If-Modified-Since` and `If-Range`: the header's
    /// (as [`super::policy::http_date`] reads it) unless the block spells out another one.
    /// Read from the block when asked (only conditional and range requests ask).
    pub fn last_modified(&self) -> Option<SystemTime> {
        if self.flags & flags::LAST_MODIFIED_EXPLICIT != 0 {
            codec::explicit_last_modified(self.head_block(), self.flags)
        } else {
            self.header_bytes(&header::LAST_MODIFIED)
                .and_then(codec::parse_date)
        }
    }

    /// The names the block spells out, in its order.
    fn literal_names(&self) -> &[HeaderName] {
        self.literal_names.as_deref().map_or(&[], |n| n)
    }

    /// The head block as [`codec`] encodes it (without the inline body).
    pub fn head_block(&self) -> &[u8] {
        &self.block[..self.head_len as usize]
    }

    /// When the response arrived (monotonic).
    pub fn stored_at(&self) -> Instant {
        at_signed_nanos(self.stored_at_ns).unwrap_or_else(epoch)
    }

    /// The body's length in bytes.
    pub fn body_len(&self) -> usize {
        match &self.body {
            Body::Inline => self.block.len() - self.head_len as usize,
            Body::Apart(b) => b.len(),
            Body::Pieces(p) => p.len(),
        }
    }

    /// The body, to serve: views that hold this entry (no copy), or the shared pieces of a
    /// large one.
    pub fn body(self: &Arc<Self>) -> Pieces {
        match &self.body {
            Body::Pieces(p) => Pieces::clone(p),
            _ if self.body_len() == 0 => Pieces::default(),
            _ => Pieces::from(Bytes::from_owner(Held(Arc::clone(self), Part::Body))),
        }
    }

    /// The body's bytes, in order (one slice unless it is kept as pieces).
    pub fn body_parts(&self) -> impl Iterator<Item = &[u8]> + '_ {
        let (one, many): (Option<&[u8]>, &[Bytes]) = match &self.body {
            Body::Pieces(p) => (None, p.as_slice()),
            _ => (Some(self.owned_body()), &[]),
        };
        one.into_iter().chain(many.iter().map(|b| &b[..]))
    }

    /// The body held by the entry itself (empty when it is kept as pieces).
    fn owned_body(&self) -> &[u8] {
        match &self.body {
            Body::Inline => &self.block[self.head_len as usize..],
            Body::Apart(b) => b,
            Body::Pieces(_) => &[],
        }
    }

    /// The age it had when it arrived (RFC 9111 §4.2.3 `corrected_initial_age`).
    pub fn initial_age(&self) -> Duration {
        Duration::from_nanos(self.initial_age_ns)
    }

    /// Its freshness lifetime.
    pub fn lifetime(&self) -> Duration {
        Duration::from_nanos(self.lifetime_ns)
    }

    /// How long past expiry the response allows serving it while it is revalidated.
    pub fn stale_while_revalidate(&self) -> Duration {
        Duration::from_secs(u64::from(self.stale_while_revalidate_s))
    }

    /// How long past expiry the response allows serving it when the upstream fails.
    pub fn stale_if_error(&self) -> Duration {
        Duration::from_secs(u64::from(self.stale_if_error_s))
    }

    /// The response forbids serving it stale (must-revalidate, proxy-revalidate, no-cache,
    /// s-maxage).
    pub fn forbids_stale(&self) -> bool {
        self.flags & flags::FORBIDS_STALE != 0
    }

    /// The lifetime is the operator's `DEFAULT_CACHE_EXPIRY_TIME_SECS`, not the origin's: the
    /// refresh window may then serve it stale while it is refreshed.
    pub fn operator_ttl(&self) -> bool {
        self.flags & flags::OPERATOR_TTL != 0
    }

    /// The header fields as served (hop-by-hop fields removed, `ETag` and `Content-Length`
    /// present), in order, repeated names included; each value is a copy.
    pub fn fields(&self) -> impl Iterator<Item = (HeaderName, HeaderValue)> + '_ {
        Fields::new(&self.block, self.headers_at as usize)
            .filter_map(move |(name, range)| Some((self.name(name)?, self.value(range))))
    }

    /// How many header fields it has.
    pub fn field_count(&self) -> usize {
        Fields::new(&self.block, self.headers_at as usize).len()
    }

    /// The headers as served, in a map with room for `extra` more fields (the hit path adds
    /// `Age`, `X-Cache-Status` and `Cache-Status` without growing it). Each value is a view
    /// of the block that holds this entry: no copy.
    pub fn headers_map_with(self: &Arc<Self>, extra: usize) -> HeaderMap {
        let fields = Fields::new(&self.block, self.headers_at as usize);
        let mut map = HeaderMap::try_with_capacity(fields.len() + extra).unwrap_or_default();
        let block = Bytes::from_owner(Held(Arc::clone(self), Part::Block));
        for (name, range) in fields {
            if let Some(name) = self.name(name) {
                let _ = map.try_append(name, block_value(block.slice(range)));
            }
        }
        map
    }

    /// The headers as served ([`Self::fields`]) as a map.
    pub fn headers_map(self: &Arc<Self>) -> HeaderMap {
        self.headers_map_with(0)
    }

    /// The first value of header `name`.
    pub fn header(&self, name: &HeaderName) -> Option<HeaderValue> {
        self.header_range(name).map(|r| self.value(r))
    }

    /// The first value of header `name`, as bytes of the block (no reference taken).
    pub fn header_bytes(&self, name: &HeaderName) -> Option<&[u8]> {
        self.header_range(name).map(|r| &self.block[r])
    }

    fn header_range(&self, name: &HeaderName) -> Option<std::ops::Range<usize>> {
        let want = match codec::table_index(name) {
            Some(i) => FieldName::Table(i),
            None => FieldName::Literal(self.literal_names().iter().position(|n| n == name)?),
        };
        Fields::new(&self.block, self.headers_at as usize)
            .find(|(n, _)| *n == want)
            .map(|(_, r)| r)
    }

    /// The `ETag` clients see (upstream's, or generated from the body).
    pub fn etag(&self) -> HeaderValue {
        self.explicit(0, flags::ETAG_EXPLICIT)
            .or_else(|| self.header(&header::ETAG))
            .unwrap_or_else(|| HeaderValue::from_static("\"\""))
    }

    /// The upstream's `ETag`, sent upstream when revalidating (only what the upstream itself
    /// sent).
    pub fn upstream_etag(&self) -> Option<HeaderValue> {
        if self.flags & flags::UPSTREAM_ETAG == 0 {
            return None;
        }
        self.explicit(1, flags::UPSTREAM_ETAG_EXPLICIT)
            .or_else(|| Some(self.etag()))
    }

    /// The upstream's `Last-Modified`, sent upstream when revalidating.
    pub fn upstream_last_modified(&self) -> Option<HeaderValue> {
        if self.flags & flags::UPSTREAM_LM == 0 {
            return None;
        }
        self.explicit(2, flags::UPSTREAM_LM_EXPLICIT)
            .or_else(|| self.header(&header::LAST_MODIFIED))
    }

    /// Validator `i` of the block when its flag says it is spelled out.
    fn explicit(&self, i: usize, bit: u8) -> Option<HeaderValue> {
        if self.flags & bit == 0 {
            return None;
        }
        let range = codec::explicit_validators(self.head_block(), self.flags)[i].clone()?;
        Some(self.value(range))
    }

    fn name(&self, name: FieldName) -> Option<HeaderName> {
        match name {
            FieldName::Table(i) => codec::NAMES.get(i).cloned(),
            FieldName::Literal(i) => self.literal_names().get(i).cloned(),
        }
    }

    /// A value of the block, copied (no check).
    fn value(&self, range: std::ops::Range<usize>) -> HeaderValue {
        block_value(Bytes::copy_from_slice(&self.block[range]))
    }

    /// Current age (RFC 9111 §4.2.3 `current_age`).
    pub fn age(&self, now: Instant) -> Duration {
        self.initial_age() + now.saturating_duration_since(self.stored_at())
    }

    /// When this entry stops being fresh.
    pub fn expires_at(&self) -> Instant {
        self.stored_at() + self.lifetime().saturating_sub(self.initial_age())
    }

    pub fn is_fresh(&self, now: Instant) -> bool {
        now < self.expires_at()
    }

    /// How long past expiry this entry may still be served.
    pub fn stale_for(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.expires_at())
    }

    /// Has validators the upstream can answer a conditional request with.
    pub fn revalidatable(&self) -> bool {
        self.flags & (flags::UPSTREAM_ETAG | flags::UPSTREAM_LM) != 0
    }

    /// Records that a client asked for this entry now.
    pub fn touch(&self) {
        let now = clock_ms();
        // Skip the store when nothing changed: hot keys are read on many cores at once.
        if self.last_access_ms.load(Ordering::Relaxed) != now {
            self.last_access_ms.store(now, Ordering::Relaxed);
        }
        if !self.visited.load(Ordering::Relaxed) {
            self.visited.store(true, Ordering::Relaxed);
        }
    }

    pub fn last_access_ms(&self) -> u64 {
        self.last_access_ms.load(Ordering::Relaxed)
    }

    /// How long ago a client last asked for this entry.
    pub fn idle_for(&self) -> Duration {
        self.idle_for_at(clock_ms())
    }

    /// [`Self::idle_for`] at `now_ms` on the [`clock_ms`] clock.
    pub fn idle_for_at(&self, now_ms: u64) -> Duration {
        Duration::from_millis(now_ms.saturating_sub(self.last_access_ms()))
    }

    /// Whether a background refresh may start now, or the last one failed too recently.
    pub fn may_start_refresh(&self) -> bool {
        self.may_start_refresh_at(clock_ms())
    }

    /// [`Self::may_start_refresh`] at `now_ms` on the [`clock_ms`] clock.
    pub fn may_start_refresh_at(&self, now_ms: u64) -> bool {
        now_ms >= self.refresh_not_before_ms.load(Ordering::Relaxed)
    }

    /// How long until a refresh may start again (zero when it may now).
    pub fn refresh_wait(&self) -> Duration {
        self.refresh_wait_at(clock_ms())
    }

    /// [`Self::refresh_wait`] at `now_ms` on the [`clock_ms`] clock.
    pub fn refresh_wait_at(&self, now_ms: u64) -> Duration {
        let not_before = self.refresh_not_before_ms.load(Ordering::Relaxed);
        Duration::from_millis(not_before.saturating_sub(now_ms))
    }

    /// The wait after the next failed refresh: 1 s, doubling per failure in a row, at most
    /// 10 s.
    pub fn refresh_backoff(&self) -> Duration {
        let failures = self.refresh_failures.load(Ordering::Relaxed).min(4);
        (MIN_REFRESH_BACKOFF * (1 << failures)).min(MAX_REFRESH_BACKOFF)
    }

    /// Records a failed background refresh: none starts again for the backoff.
    pub fn refresh_failed(&self) -> Duration {
        self.refresh_failed_at(clock_ms())
    }

    /// [`Self::refresh_failed`] at `now_ms` on the [`clock_ms`] clock.
    pub fn refresh_failed_at(&self, now_ms: u64) -> Duration {
        let backoff = self.refresh_backoff();
        let _ = self
            .refresh_failures
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_add(1));
        self.refresh_not_before_ms
            .store(now_ms + backoff.as_millis() as u64, Ordering::Relaxed);
        backoff
    }

    /// Whether a client asked for this entry within `window` of now.
    pub fn requested_within(&self, window: Duration) -> bool {
        self.requested_within_at(window, clock_ms())
    }

    /// [`Self::requested_within`] at `now_ms` on the [`clock_ms`] clock.
    pub fn requested_within_at(&self, window: Duration, now_ms: u64) -> bool {
        now_ms.saturating_sub(self.last_access_ms()) <= window.as_millis() as u64
    }
}

/// Milliseconds since the process's first call: a cheap monotonic clock for access times.
pub fn clock_ms() -> u64 {
    ms_at(Instant::now())
}

/// The [`clock_ms`] reading at `at` (zero before the clock's epoch).
pub fn ms_at(at: Instant) -> u64 {
    at.saturating_duration_since(epoch()).as_millis() as u64
}

/// The clock's epoch: the first time it was read.
pub(crate) fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// `at` as nanoseconds from the [`epoch`], negative before it (a runtime under paused time
/// keeps the clock it started with, possibly before the epoch): 8 bytes instead of an
/// `Instant`'s 16, exact within ±292 years of the epoch and clamped beyond. Stored entries
/// and expiry slots keep their times this way.
pub(crate) fn signed_nanos(at: Instant) -> i64 {
    let epoch = epoch();
    match at.checked_duration_since(epoch) {
        Some(after) => i64::try_from(after.as_nanos()).unwrap_or(i64::MAX),
        None => i64::try_from(epoch.duration_since(at).as_nanos()).map_or(i64::MIN, |n| -n),
    }
}

/// The instant [`signed_nanos`] gave `n` for (`None` only if the clock cannot represent it).
pub(crate) fn at_signed_nanos(n: i64) -> Option<Instant> {
    let epoch = epoch();
    let d = Duration::from_nanos(n.unsigned_abs());
    if n >= 0 {
        epoch.checked_add(d)
    } else {
        epoch.checked_sub(d)
    }
}

/// A buffer as a block's field value, which is known valid.
#[inline]
fn block_value(bytes: Bytes) -> HeaderValue {
    debug_assert!(codec::valid_value(&bytes));
    // SAFETY: the value bytes of a block are valid field-value bytes: a block is only made by
    // `codec::encode_head` from `HeaderValue`s or checked byte by byte by `codec::parse_head`
    // (`valid_value`, what `HeaderValue::from_bytes` accepts), it is immutable, and `Fields`
    // walks it the same way `parse_head` checked it, so every value range it gives is one of
    // the values checked. Checking again on every hit cost ~2 % of a 1 KiB hit's
    // instructions.
    unsafe { HeaderValue::from_maybe_shared_unchecked(bytes) }
}

/// A buffer's bytes in an exact-size allocation of their own: moved when the buffer is
/// unshared and exactly that size, else copied.
fn boxed(b: Bytes) -> Box<[u8]> {
    match b.try_into_mut() {
        Ok(m) if m.capacity() == m.len() => Vec::from(m).into_boxed_slice(),
        Ok(m) => Box::from(&m[..]),
        Err(b) => Box::from(&b[..]),
    }
}

/// A fresh 200 entry with a `body`-byte body, for unit tests of the store and eviction.
#[cfg(test)]
pub(crate) fn test_entry(body: usize) -> std::sync::Arc<CachedResponse> {
    std::sync::Arc::new(CachedResponse::new(
        NewEntry {
            status: StatusCode::OK,
            headers: HeaderMap::new(),
            body: Pieces::from(bytes::Bytes::from(vec![0u8; body])),
            etag: HeaderValue::from_static("\"e\""),
            last_modified: None,
            upstream_etag: None,
            upstream_last_modified: None,
            vary: VaryKey::default(),
            stored_at: Instant::now(),
            initial_age: Duration::ZERO,
            lifetime: Duration::from_secs(60),
            forbids_stale: false,
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            operator_ttl: false,
        },
        4,
        0,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An entry and its `Arc` counts fit the allocator's 160-byte size class (one more
    /// field and it takes 192).
    #[cfg(target_pointer_width = "64")]
    #[test]
    fn an_entry_fits_its_size_class() {
        let arc = std::mem::size_of::<CachedResponse>() + 16;
        assert_eq!(alloc_size(arc), 160, "{arc} bytes");
    }

    #[test]
    fn allocation_sizes_follow_the_allocator_classes() {
        let sizes = [
            1, 8, 9, 64, 65, 117, 128, 129, 216, 1024, 1025, 1141, 1281, 16384,
        ];
        let want = [
            8, 8, 16, 64, 80, 128, 128, 160, 224, 1024, 1280, 1280, 1536, 16384,
        ];
        assert_eq!(sizes.map(alloc_size), want);
        assert!(!body_inline(117, 1024), "1,280 together, 1,152 apart");
        assert!(body_inline(117, 900), "1,024 together");
        assert!(body_inline(117, 0));
        assert!(!body_inline(16, codec::INLINE_BODY_MAX + 1));
    }

    #[test]
    fn failed_refreshes_back_off_exponentially_up_to_the_cap() {
        let e = test_entry(1);
        assert!(e.may_start_refresh());
        let waits: Vec<u64> = (0..6).map(|_| e.refresh_failed().as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 10, 10]);
        assert!(!e.may_start_refresh());
        assert!(e.refresh_wait() > Duration::from_secs(9));
    }
}
