//! A stored response ([`CachedResponse`]): the parts sent to clients, pre-built once at store
//! time, plus the metadata the policy needs (age, lifetime, validators, stale allowances).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::body::Pieces;
use http::{HeaderMap, HeaderValue, StatusCode};

use super::key::VaryKey;

/// A complete, successfully read response that the policy allowed to be shared.
#[derive(Debug)]
pub struct CachedResponse {
    /// Unique per stored version; lets timers and admin actions tell a replaced entry apart.
    pub id: u64,
    pub status: StatusCode,
    /// Headers as served: hop-by-hop fields removed, `ETag` and `Content-Length` present.
    pub headers: HeaderMap,
    pub body: Pieces,
    /// The `ETag` clients see (upstream's, or generated from the body).
    pub etag: HeaderValue,
    /// Parsed `Last-Modified`, for `If-Modified-Since`.
    pub last_modified: Option<SystemTime>,
    /// Validators to send upstream when revalidating (only what the upstream itself sent).
    pub upstream_etag: Option<HeaderValue>,
    pub upstream_last_modified: Option<HeaderValue>,
    pub vary: VaryKey,
    /// When the response arrived (monotonic) and the age it had then (RFC 9111 §4.2.3).
    pub stored_at: Instant,
    pub initial_age: Duration,
    pub lifetime: Duration,
    /// The response forbids serving it stale (must-revalidate, proxy-revalidate, no-cache,
    /// s-maxage).
    pub forbids_stale: bool,
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
    /// The lifetime is the operator's `DEFAULT_CACHE_EXPIRY_TIME_SECS`, not the origin's: the
    /// refresh window may then serve it stale while it is refreshed.
    pub operator_ttl: bool,
    /// Accounted size in bytes (body + headers + key + overhead).
    pub size: usize,
    /// Last time a client asked for this entry, in ms since [`clock_ms`]'s epoch.
    last_access_ms: AtomicU64,
    /// SIEVE's visited bit: set by hits, cleared by the eviction hand.
    pub visited: AtomicBool,
    /// This entry's slot in its eviction queue (`u32::MAX` before it is queued).
    pub node: AtomicU32,
    /// Background refreshes of this version that failed in a row, and the [`clock_ms`] time
    /// before which no new one starts (backoff).
    refresh_failures: AtomicU32,
    refresh_not_before_ms: AtomicU64,
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

/// Per-entry bookkeeping overhead counted on top of body and headers.
const ENTRY_OVERHEAD: usize = 256;

impl CachedResponse {
    pub fn new(e: NewEntry, key_len: usize, last_access_ms: u64) -> Self {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        let header_bytes: usize = e
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 32)
            .sum();
        let size = e.body.len() + header_bytes + key_len + e.vary.heap_size() + ENTRY_OVERHEAD;
        CachedResponse {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            status: e.status,
            headers: e.headers,
            body: e.body,
            etag: e.etag,
            last_modified: e.last_modified,
            upstream_etag: e.upstream_etag,
            upstream_last_modified: e.upstream_last_modified,
            vary: e.vary,
            stored_at: e.stored_at,
            initial_age: e.initial_age,
            lifetime: e.lifetime,
            forbids_stale: e.forbids_stale,
            stale_while_revalidate: e.stale_while_revalidate,
            stale_if_error: e.stale_if_error,
            operator_ttl: e.operator_ttl,
            size,
            last_access_ms: AtomicU64::new(last_access_ms),
            visited: AtomicBool::new(false),
            node: AtomicU32::new(u32::MAX),
            refresh_failures: AtomicU32::new(0),
            refresh_not_before_ms: AtomicU64::new(0),
        }
    }

    /// Current age (RFC 9111 §4.2.3 `current_age`).
    pub fn age(&self, now: Instant) -> Duration {
        self.initial_age + now.saturating_duration_since(self.stored_at)
    }

    /// When this entry stops being fresh.
    pub fn expires_at(&self) -> Instant {
        self.stored_at + self.lifetime.saturating_sub(self.initial_age)
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
        self.upstream_etag.is_some() || self.upstream_last_modified.is_some()
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
        let failures = self.refresh_failures.load(Ordering::Relaxed).min(16);
        (MIN_REFRESH_BACKOFF * (1 << failures)).min(MAX_REFRESH_BACKOFF)
    }

    /// Records a failed background refresh: none starts again for the backoff.
    pub fn refresh_failed(&self) -> Duration {
        self.refresh_failed_at(clock_ms())
    }

    /// [`Self::refresh_failed`] at `now_ms` on the [`clock_ms`] clock.
    pub fn refresh_failed_at(&self, now_ms: u64) -> Duration {
        let backoff = self.refresh_backoff();
        self.refresh_failures.fetch_add(1, Ordering::Relaxed);
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
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    at.saturating_duration_since(epoch).as_millis() as u64
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
