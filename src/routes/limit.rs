//! A route's admission control for requests about to go upstream: a rate limit
//! (`rate_limit = { per_second, burst, queue, per_client }`, GCRA by the `governor` crate)
//! and a cap on requests in flight (`max_in_flight`).
//!
//! * Within the rate (`burst` at once, refilled at `per_second`): admitted at once.
//! * Over it: the request waits its turn in a queue of at most `queue` waiters (first come,
//!   first served for a route-wide limit), then goes on. With the queue full, or
//!   `queue = 0`, it is refused at once with the time until a permit would be free
//!   ([`Rejected::Rate`]: answer `429` with [`Rejected::headers`]).
//! * Then the in-flight cap: at `max_in_flight` requests of the route already upstream, it is
//!   refused at once ([`Rejected::InFlight`]: answer `503`), never queued. Admitted requests
//!   hold an [`Admitted`] until their upstream exchange is over.
//!
//! A request admitted by the rate and then refused by the cap has used its permit.
//!
//! With `per_client = true` the rate applies to each client address on its own (IPv6 by its
//! /64, as one host usually holds a whole /64); the queue bound is still shared by the route,
//! and a client's waiters are not ordered among themselves (each retries when its bucket
//! should have a permit).
//! The per-client table forgets clients whose bucket is full again (governor's
//! `retain_recent`, every [`SWEEP_INTERVAL`] and whenever the table passes `max_clients`,
//! looked at every 256 requests); if it is still over `max_clients` after that (more active
//! addresses than the cap) it is emptied, which lets those clients start over with a full
//! burst, and counted in `edgecache_route_client_table_resets_total`.
//!
//! The `RateLimit-*` fields follow draft-ietf-httpapi-ratelimit-headers-06, the last draft
//! with separate `RateLimit-Limit`, `RateLimit-Remaining` and `RateLimit-Reset` fields (later
//! drafts fold them into one `RateLimit` field): see [`RateLimitState::headers`].

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use governor::clock::Clock;
use governor::middleware::{StateInformationMiddleware, StateSnapshot};
use governor::state::keyed::DashMapStateStore;
use governor::state::{InMemoryState, NotKeyed};
use governor::{NotUntil, Quota, RateLimiter};
use http::header::{HeaderName, HeaderValue, RETRY_AFTER};
use http::StatusCode;

/// A route's `rate_limit` table.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct RateLimitConfig {
    /// Permits added per second (decimals allowed: 0.5 is one every 2 s).
    pub per_second: f64,
    /// Permits available at once (the bucket's size).
    pub burst: u32,
    /// Requests over the rate that may wait for a permit at once; 0 refuses them at once.
    pub queue: u32,
    /// One bucket per client address instead of one for the route.
    pub per_client: bool,
    /// The per-client table's size bound.
    pub max_clients: u32,
}

impl RateLimitConfig {
    /// The time one permit takes to come back.
    pub fn period(&self) -> Duration {
        Duration::try_from_secs_f64(1.0 / self.per_second)
            .unwrap_or(Duration::MAX)
            .max(Duration::from_nanos(1))
    }

    /// The time an empty bucket takes to fill up: the `w` of `RateLimit-Policy`.
    pub fn window(&self) -> Duration {
        self.period().saturating_mul(self.burst)
    }

    fn quota(&self) -> Quota {
        let burst = NonZeroU32::new(self.burst).unwrap_or(NonZeroU32::MIN);
        Quota::with_period(self.period())
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
            .allow_burst(burst)
    }
}

/// How often the per-client table forgets clients whose bucket is full again.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(10);
/// The per-client table's size is looked at every this many requests.
const SIZE_CHECK_EVERY: u32 = 256;

/// governor's clock on tokio's time, so that waiting (`tokio::time::sleep`) and permits use
/// one clock, and tests run on paused time. Readings are the time since the limiter was made.
#[derive(Clone, Debug)]
pub struct TokioClock {
    origin: tokio::time::Instant,
}

impl Default for TokioClock {
    fn default() -> Self {
        TokioClock {
            origin: tokio::time::Instant::now(),
        }
    }
}

impl Clock for TokioClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        self.origin.elapsed()
    }
}

type RouteLimiter = RateLimiter<NotKeyed, InMemoryState, TokioClock, StateInformationMiddleware>;
type ClientLimiter =
    RateLimiter<IpAddr, DashMapStateStore<IpAddr>, TokioClock, StateInformationMiddleware>;

/// The rate-limit state of one decision, for the `RateLimit-*` response fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimitState {
    /// The bucket's size (`burst`).
    pub limit: u32,
    /// Permits left after this request (0 on a refusal).
    pub remaining: u32,
    /// Until the bucket is full again; on a refusal, until the next permit (as `Retry-After`).
    pub reset: Duration,
    /// The time an empty bucket takes to fill.
    pub window: Duration,
}

pub const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
pub const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
pub const RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");
pub const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");

impl RateLimitState {
    /// The fields of draft-ietf-httpapi-ratelimit-headers-06 (pure):
    ///
    /// * `RateLimit-Limit: <burst>`
    /// * `RateLimit-Remaining: <permits left>`
    /// * `RateLimit-Reset: <seconds, rounded up>` — until the bucket is full again; on a
    ///   refusal, the same point in time as `Retry-After` (the draft's SHOULD).
    /// * `RateLimit-Policy: <burst>;w=<seconds an empty bucket takes to fill, rounded up>` —
    ///   a token bucket described as the draft's quota policy; it admits up to `burst` more
    ///   within the window while refilling, which the draft allows ("MAY differ when ...
    ///   bursts ... are implemented").
    pub fn headers(&self) -> [(HeaderName, HeaderValue); 4] {
        [
            (RATELIMIT_LIMIT, HeaderValue::from(self.limit)),
            (RATELIMIT_REMAINING, HeaderValue::from(self.remaining)),
            (RATELIMIT_RESET, HeaderValue::from(ceil_secs(self.reset))),
            (
                RATELIMIT_POLICY,
                HeaderValue::from_str(&format!(
                    "{};w={}",
                    self.limit,
                    ceil_secs(self.window).max(1)
                ))
                .expect("digits are a valid header value"),
            ),
        ]
    }
}

/// Whole seconds, rounded up (`Retry-After` and the `RateLimit-*` fields count seconds).
pub fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// `Retry-After` in seconds, rounded up and at least 1 (0 would invite an immediate retry).
pub fn retry_after(d: Duration) -> HeaderValue {
    HeaderValue::from(ceil_secs(d).max(1))
}

/// Why a request was not admitted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejected {
    /// Over the rate with the queue full (or `queue = 0`).
    Rate {
        /// Until a permit is expected to be free for this request (after the waiters ahead).
        retry_after: Duration,
        state: RateLimitState,
    },
    /// `max_in_flight` requests of the route were already upstream.
    InFlight { limit: u32 },
}

impl Rejected {
    /// `429 Too Many Requests` for the rate, `503 Service Unavailable` for the cap.
    pub fn status(&self) -> StatusCode {
        match self {
            Rejected::Rate { .. } => StatusCode::TOO_MANY_REQUESTS,
            Rejected::InFlight { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The response fields: `Retry-After` (and the `RateLimit-*` fields for the rate).
    pub fn headers(&self) -> Vec<(HeaderName, HeaderValue)> {
        match self {
            Rejected::Rate {
                retry_after: d,
                state,
            } => {
                let mut h = vec![(RETRY_AFTER, retry_after(*d))];
                h.extend(state.headers());
                h
            }
            Rejected::InFlight { .. } => vec![(RETRY_AFTER, HeaderValue::from(1u32))],
        }
    }
}

/// An admitted request. Keep it until the upstream exchange is over (move it into the
/// response body's stream if that outlives the handler): dropping it frees the in-flight
/// slot.
#[must_use = "dropping it at once frees the in-flight slot"]
#[derive(Debug)]
pub struct Admitted {
    /// The rate limit's state after this request (`None` without a `rate_limit`), for
    /// `RateLimit-*` fields on the response if wanted.
    pub rate: Option<RateLimitState>,
    /// It waited in the queue before being admitted.
    pub waited: bool,
    _in_flight: Option<InFlight>,
}

/// One slot of a route's in-flight cap, freed on drop.
#[derive(Debug)]
pub struct InFlight(Arc<AtomicU32>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A route's limits and their counters.
pub struct Limits {
    rate: Option<Rate>,
    max_in_flight: Option<u32>,
    in_flight: Arc<AtomicU32>,
    admitted: AtomicU64,
    queued: AtomicU64,
    rejected_rate: AtomicU64,
    rejected_in_flight: AtomicU64,
}

/// A snapshot of a route's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct LimitCounters {
    /// Requests admitted upstream (with or without waiting).
    pub admitted: u64,
    /// Of those, requests that waited in the queue first.
    pub queued: u64,
    /// Refused by the rate limit (`429`).
    pub rejected_rate: u64,
    /// Refused by the in-flight cap (`503`).
    pub rejected_in_flight: u64,
    /// Requests waiting in the queue now.
    pub waiting: u32,
    /// Requests upstream now (counted only with a `max_in_flight`).
    pub in_flight: u32,
    /// Per-client table: addresses tracked now.
    pub clients: usize,
    /// Per-client table: times it was emptied for passing `max_clients`.
    pub client_table_resets: u64,
}

impl fmt::Debug for Limits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limits")
            .field("rate", &self.rate.as_ref().map(|r| &r.config))
            .field("max_in_flight", &self.max_in_flight)
            .field("counters", &self.counters())
            .finish()
    }
}

impl Limits {
    pub fn new(rate: Option<RateLimitConfig>, max_in_flight: Option<u32>) -> Self {
        Limits {
            rate: rate.map(Rate::new),
            max_in_flight,
            in_flight: Arc::new(AtomicU32::new(0)),
            admitted: AtomicU64::new(0),
            queued: AtomicU64::new(0),
            rejected_rate: AtomicU64::new(0),
            rejected_in_flight: AtomicU64::new(0),
        }
    }

    pub fn rate_limit(&self) -> Option<&RateLimitConfig> {
        self.rate.as_ref().map(|r| &r.config)
    }

    pub fn max_in_flight(&self) -> Option<u32> {
        self.max_in_flight
    }

    /// Admits a request of `client` about to go upstream: the rate limit (waiting in the
    /// queue if it has room), then the in-flight cap. Immediate without limits. Cancel-safe:
    /// a request dropped while queued leaves the queue.
    pub async fn admit(&self, client: IpAddr) -> Result<Admitted, Rejected> {
        let (rate, waited) = match &self.rate {
            None => (None, false),
            Some(r) => match r.acquire(client).await {
                Ok((state, waited)) => (Some(state), waited),
                Err(rejected) => {
                    self.rejected_rate.fetch_add(1, Ordering::Relaxed);
                    return Err(rejected);
                }
            },
        };
        let in_flight = self.try_in_flight()?;
        self.admitted.fetch_add(1, Ordering::Relaxed);
        if waited {
            self.queued.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Admitted {
            rate,
            waited,
            _in_flight: in_flight,
        })
    }

    /// The in-flight cap alone: a slot, `None` without a cap, or [`Rejected::InFlight`].
    fn try_in_flight(&self) -> Result<Option<InFlight>, Rejected> {
        let Some(limit) = self.max_in_flight else {
            return Ok(None);
        };
        let before = self.in_flight.fetch_add(1, Ordering::AcqRel);
        if before >= limit {
            self.in_flight.fetch_sub(1, Ordering::AcqRel);
            self.rejected_in_flight.fetch_add(1, Ordering::Relaxed);
            return Err(Rejected::InFlight { limit });
        }
        Ok(Some(InFlight(self.in_flight.clone())))
    }

    /// Forgets per-client buckets that are full again (also done as requests come: call it
    /// from a timer only to return memory on a route that went quiet).
    pub fn sweep(&self) {
        if let Some(Rate {
            limiter: Limiter::Client(c),
            ..
        }) = &self.rate
        {
            c.sweep();
        }
    }

    pub fn counters(&self) -> LimitCounters {
        let (waiting, clients, client_table_resets) = match &self.rate {
            None => (0, 0, 0),
            Some(r) => {
                let (clients, resets) = match &r.limiter {
                    Limiter::Route(_) => (0, 0),
                    Limiter::Client(c) => (c.len(), c.resets.load(Ordering::Relaxed)),
                };
                (r.waiting.load(Ordering::Relaxed), clients, resets)
            }
        };
        LimitCounters {
            admitted: self.admitted.load(Ordering::Relaxed),
            queued: self.queued.load(Ordering::Relaxed),
            rejected_rate: self.rejected_rate.load(Ordering::Relaxed),
            rejected_in_flight: self.rejected_in_flight.load(Ordering::Relaxed),
            waiting,
            in_flight: self.in_flight.load(Ordering::Relaxed),
            clients,
            client_table_resets,
        }
    }
}

/// A rate limit and its queue.
struct Rate {
    config: RateLimitConfig,
    clock: TokioClock,
    limiter: Limiter,
    /// Requests in the queue (or, for a moment, on their way out of a full one).
    waiting: AtomicU32,
    /// Serves a route-wide queue in arrival order (tokio's mutex is fair): only its holder
    /// waits on the limiter, the others wait for it.
    turn: tokio::sync::Mutex<()>,
}

enum Limiter {
    Route(RouteLimiter),
    Client(Clients),
}

/// Leaves the queue on drop (admitted, refused or cancelled).
struct Leave<'a>(&'a AtomicU32);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Rate {
    fn new(config: RateLimitConfig) -> Self {
        let clock = TokioClock::default();
        let limiter = if config.per_client {
            Limiter::Client(Clients::new(&config, clock.clone()))
        } else {
            Limiter::Route(
                RateLimiter::direct_with_clock(config.quota(), clock.clone()).with_middleware(),
            )
        };
        Rate {
            config,
            clock,
            limiter,
            waiting: AtomicU32::new(0),
            turn: tokio::sync::Mutex::new(()),
        }
    }

    /// One permit for `client`: `Ok((state, waited))` or the refusal.
    async fn acquire(&self, client: IpAddr) -> Result<(RateLimitState, bool), Rejected> {
        let key = client_key(client);
        let per_client = matches!(self.limiter, Limiter::Client(_));
        // Straight to the limiter unless others are queued for the same bucket (they were
        // first).
        let mut over = None;
        if per_client || self.waiting.load(Ordering::Acquire) == 0 {
            match self.check(key) {
                Ok(s) => return Ok((self.admitted(&s), false)),
                Err(wait) => over = Some(wait),
            }
        }
        let ahead = self.waiting.fetch_add(1, Ordering::AcqRel);
        let leave = Leave(&self.waiting);
        if ahead >= self.config.queue {
            drop(leave);
            let wait = match over {
                Some(wait) => wait,
                // Skipped the limiter for the queue, which is full: a permit free now goes
                // to this request rather than being refused.
                None => match self.check(key) {
                    Ok(s) => return Ok((self.admitted(&s), false)),
                    Err(wait) => wait,
                },
            };
            // A route-wide queue is served first.
            let retry_after = if per_client {
                wait
            } else {
                wait.saturating_add(self.config.period().saturating_mul(ahead))
            };
            return Err(Rejected::Rate {
                retry_after,
                state: RateLimitState {
                    limit: self.config.burst,
                    remaining: 0,
                    reset: retry_after,
                    window: self.config.window(),
                },
            });
        }
        // `waited`: it did wait (for its turn, or for a permit), not merely pass the queue.
        let (_turn, mut waited) = match per_client {
            true => (None, false),
            false => match self.turn.try_lock() {
                Ok(turn) => (Some(turn), false),
                Err(_) => (Some(self.turn.lock().await), true),
            },
        };
        loop {
            match self.check(key) {
                Ok(s) => return Ok((self.admitted(&s), waited)),
                Err(wait) => {
                    waited = true;
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// Takes a permit, or says how long until one is free.
    fn check(&self, key: IpAddr) -> Result<StateSnapshot, Duration> {
        let result = match &self.limiter {
            Limiter::Route(l) => l.check(),
            Limiter::Client(c) => c.check(key),
        };
        result.map_err(|not_until: NotUntil<Duration>| not_until.wait_time_from(self.clock.now()))
    }

    fn admitted(&self, s: &StateSnapshot) -> RateLimitState {
        let remaining = s.remaining_burst_capacity().min(self.config.burst);
        RateLimitState {
            limit: self.config.burst,
            remaining,
            reset: self
                .config
                .period()
                .saturating_mul(self.config.burst - remaining),
            window: self.config.window(),
        }
    }
}

/// The key of a client's bucket: IPv4 addresses (IPv4-mapped IPv6 included) as they are,
/// IPv6 addresses by their /64.
fn client_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
    }
}

/// The per-client buckets, bounded by `max_clients`.
struct Clients {
    quota: Quota,
    clock: TokioClock,
    max_clients: usize,
    /// Replaced by an empty one when it cannot be brought under `max_clients`.
    table: RwLock<ClientLimiter>,
    checks: AtomicU32,
    /// When the next time-driven sweep is due, in nanoseconds of `clock`.
    next_sweep: AtomicU64,
    resets: AtomicU64,
}

impl Clients {
    fn new(config: &RateLimitConfig, clock: TokioClock) -> Self {
        let quota = config.quota();
        Clients {
            quota,
            table: RwLock::new(Self::table(quota, clock.clone())),
            clock,
            max_clients: config.max_clients as usize,
            checks: AtomicU32::new(0),
            next_sweep: AtomicU64::new(SWEEP_INTERVAL.as_nanos() as u64),
            resets: AtomicU64::new(0),
        }
    }

    fn table(quota: Quota, clock: TokioClock) -> ClientLimiter {
        RateLimiter::dashmap_with_clock(quota, clock).with_middleware()
    }

    fn check(&self, key: IpAddr) -> Result<StateSnapshot, NotUntil<Duration>> {
        if self
            .checks
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(SIZE_CHECK_EVERY)
        {
            self.housekeeping();
        }
        let table = self.table.read().unwrap_or_else(|p| p.into_inner());
        table.check_key(&key)
    }

    fn len(&self) -> usize {
        self.table.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Sweeps when it is time to, or when the table is over its bound.
    fn housekeeping(&self) {
        let now = self.clock.now().as_nanos() as u64;
        let due = self.next_sweep.load(Ordering::Relaxed);
        if now >= due || self.len() > self.max_clients {
            let next = now + SWEEP_INTERVAL.as_nanos() as u64;
            // One sweeper at a time; the others go on.
            if self
                .next_sweep
                .compare_exchange(due, next, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                self.sweep();
            }
        }
    }

    /// Forgets the clients whose bucket is full again; empties the table if it is still over
    /// its bound.
    fn sweep(&self) {
        let over = {
            let table = self.table.read().unwrap_or_else(|p| p.into_inner());
            table.retain_recent();
            table.shrink_to_fit();
            table.len() > self.max_clients
        };
        if over {
            let mut table = self.table.write().unwrap_or_else(|p| p.into_inner());
            *table = Self::table(self.quota, self.clock.clone());
            self.resets.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                max_clients = self.max_clients,
                "routes: more clients than rate_limit.max_clients are active; their per-client buckets start over"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;
    use std::sync::Arc;

    use tokio::time::{advance, Instant};

    fn config(per_second: f64, burst: u32, queue: u32) -> RateLimitConfig {
        RateLimitConfig {
            per_second,
            burst,
            queue,
            per_client: false,
            max_clients: 100_000,
        }
    }

    const A: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
    const B: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2));

    #[tokio::test(start_paused = true)]
    async fn admits_the_burst_then_refuses_with_the_time_to_the_next_permit() {
        let limits = Limits::new(Some(config(10.0, 3, 0)), None);
        for remaining in [2, 1, 0] {
            let a = limits.admit(A).await.unwrap();
            assert!(!a.waited);
            let state = a.rate.unwrap();
            assert_eq!((state.limit, state.remaining), (3, remaining));
        }
        let Err(Rejected::Rate { retry_after, state }) = limits.admit(A).await else {
            panic!("over the burst");
        };
        assert_eq!(retry_after, Duration::from_millis(100));
        assert_eq!(state.remaining, 0);
        assert_eq!(state.reset, retry_after);
        // A permit comes back every 100 ms.
        advance(Duration::from_millis(100)).await;
        assert!(limits.admit(A).await.is_ok());
        assert!(limits.admit(A).await.is_err());
        let c = limits.counters();
        assert_eq!((c.admitted, c.queued, c.rejected_rate), (4, 0, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn fractional_rates() {
        let limits = Limits::new(Some(config(0.5, 1, 0)), None);
        assert!(limits.admit(A).await.is_ok());
        let Err(Rejected::Rate { retry_after, .. }) = limits.admit(A).await else {
            panic!()
        };
        assert_eq!(retry_after, Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn over_the_rate_waits_in_the_queue_in_order_then_proceeds() {
        let limits = Arc::new(Limits::new(Some(config(10.0, 1, 2)), None));
        let start = Instant::now();
        assert!(limits.admit(A).await.is_ok());
        let waiter = |l: Arc<Limits>| {
            tokio::spawn(async move {
                let a = l.admit(A).await.unwrap();
                assert!(a.waited);
                Instant::now() - start
            })
        };
        let first = waiter(limits.clone());
        tokio::task::yield_now().await;
        let second = waiter(limits.clone());
        tokio::task::yield_now().await;
        assert_eq!(limits.counters().waiting, 2);
        // The queue (2) is full: the next one is refused, told to come back after both.
        let Err(Rejected::Rate { retry_after, .. }) = limits.admit(A).await else {
            panic!("queue full");
        };
        assert_eq!(retry_after, Duration::from_millis(300));
        assert_eq!(first.await.unwrap(), Duration::from_millis(100));
        assert_eq!(second.await.unwrap(), Duration::from_millis(200));
        let c = limits.counters();
        assert_eq!(
            (c.admitted, c.queued, c.rejected_rate, c.waiting),
            (3, 2, 1, 0)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_waiter_leaves_the_queue() {
        let limits = Limits::new(Some(config(1.0, 1, 1)), None);
        assert!(limits.admit(A).await.is_ok());
        let timed_out = tokio::time::timeout(Duration::from_millis(10), limits.admit(A)).await;
        assert!(timed_out.is_err());
        assert_eq!(limits.counters().waiting, 0);
        // Its place is free again.
        let waited = limits.admit(A).await.unwrap();
        assert!(waited.waited);
    }

    #[tokio::test(start_paused = true)]
    async fn per_client_buckets_are_separate() {
        let mut c = config(1.0, 2, 0);
        c.per_client = true;
        let limits = Limits::new(Some(c), None);
        assert!(limits.admit(A).await.is_ok());
        assert!(limits.admit(A).await.is_ok());
        assert!(limits.admit(A).await.is_err());
        // Another client has its own burst.
        assert!(limits.admit(B).await.is_ok());
        assert!(limits.admit(B).await.is_ok());
        assert!(limits.admit(B).await.is_err());
        // One IPv6 host's /64 is one client.
        let v6 = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(limits.admit(v6("2001:db8::1")).await.is_ok());
        assert!(limits.admit(v6("2001:db8::ffff:1")).await.is_ok());
        assert!(limits.admit(v6("2001:db8::2")).await.is_err());
        assert!(limits.admit(v6("2001:db8:0:1::1")).await.is_ok());
        assert_eq!(limits.counters().clients, 4);
        // IPv4-mapped is the IPv4 address.
        assert!(limits.admit(v6("::ffff:192.0.2.1")).await.is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn per_client_table_is_bounded() {
        let mut c = config(1.0, 1, 0);
        c.per_client = true;
        c.max_clients = 100;
        let limits = Limits::new(Some(c), None);
        let client = |i: u32| IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
        // Each address once: 1,000 clients, each with an empty bucket.
        for i in 0..1000 {
            assert!(limits.admit(client(i)).await.is_ok());
        }
        let counters = limits.counters();
        assert!(
            counters.clients <= 100 + SIZE_CHECK_EVERY as usize,
            "{counters:?}"
        );
        assert!(counters.client_table_resets > 0);
        // Full buckets are forgotten by a sweep.
        advance(Duration::from_secs(2)).await;
        limits.sweep();
        assert_eq!(limits.counters().clients, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn full_buckets_are_swept_as_requests_come() {
        let mut c = config(10.0, 1, 0);
        c.per_client = true;
        let limits = Limits::new(Some(c), None);
        for i in 0..10u32 {
            let client = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
            assert!(limits.admit(client).await.is_ok());
        }
        assert_eq!(limits.counters().clients, 10);
        advance(SWEEP_INTERVAL).await;
        // The requests that come along every SIZE_CHECK_EVERY look at the clock.
        for _ in 0..SIZE_CHECK_EVERY {
            let _ = limits.admit(A).await;
        }
        assert_eq!(limits.counters().clients, 1, "only A is still recent");
    }

    #[tokio::test]
    async fn in_flight_cap_refuses_at_once_and_frees_on_drop() {
        let limits = Limits::new(None, Some(2));
        let first = limits.admit(A).await.unwrap();
        let second = limits.admit(B).await.unwrap();
        assert_eq!(
            limits.admit(A).await.unwrap_err(),
            Rejected::InFlight { limit: 2 }
        );
        assert_eq!(limits.counters().in_flight, 2);
        drop(first);
        let third = limits.admit(A).await.unwrap();
        drop((second, third));
        let c = limits.counters();
        assert_eq!((c.admitted, c.rejected_in_flight, c.in_flight), (3, 1, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn rate_then_cap() {
        let limits = Limits::new(Some(config(1.0, 1, 0)), Some(1));
        let held = limits.admit(A).await.unwrap();
        // Over the rate: 429, not 503.
        assert_eq!(
            limits.admit(A).await.unwrap_err().status(),
            StatusCode::TOO_MANY_REQUESTS
        );
        advance(Duration::from_secs(1)).await;
        // Within the rate, at the cap: 503.
        assert_eq!(
            limits.admit(A).await.unwrap_err().status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        drop(held);
    }

    #[tokio::test]
    async fn no_limits_admit_everything() {
        let limits = Limits::new(None, None);
        for _ in 0..1000 {
            let a = limits.admit(A).await.unwrap();
            assert!(a.rate.is_none() && !a.waited);
        }
        assert_eq!(limits.counters().admitted, 1000);
    }

    #[test]
    fn header_values() {
        let state = RateLimitState {
            limit: 20,
            remaining: 7,
            reset: Duration::from_millis(1300),
            window: Duration::from_secs(2),
        };
        let h = state.headers();
        let text: Vec<(&str, &str)> = h
            .iter()
            .map(|(n, v)| (n.as_str(), v.to_str().unwrap()))
            .collect();
        assert_eq!(
            text,
            [
                ("ratelimit-limit", "20"),
                ("ratelimit-remaining", "7"),
                ("ratelimit-reset", "2"),
                ("ratelimit-policy", "20;w=2"),
            ]
        );
        let rejected = Rejected::Rate {
            retry_after: Duration::from_millis(100),
            state: RateLimitState {
                remaining: 0,
                reset: Duration::from_millis(100),
                ..state
            },
        };
        let h = rejected.headers();
        assert_eq!(h[0], (RETRY_AFTER, HeaderValue::from(1u32)));
        assert_eq!(h[3].1, "1", "RateLimit-Reset matches Retry-After");
        assert_eq!(retry_after(Duration::ZERO), "1");
        assert_eq!(retry_after(Duration::from_secs(3)), "3");
        assert_eq!(ceil_secs(Duration::from_nanos(3_000_000_001)), 4);
        assert_eq!(
            Rejected::InFlight { limit: 1 }.headers(),
            [(RETRY_AFTER, HeaderValue::from(1u32))]
        );
    }

    #[test]
    fn config_periods() {
        let c = config(0.5, 3, 0);
        assert_eq!(c.period(), Duration::from_secs(2));
        assert_eq!(c.window(), Duration::from_secs(6));
        let q = c.quota();
        assert_eq!(q.burst_size().get(), 3);
        assert_eq!(q.replenish_interval(), Duration::from_secs(2));
    }
}
