//! Retries of a route's upstream requests (`retries`, `retry_unsafe`): which failures are
//! retried ([`should_retry`]), how long to wait first ([`backoff`]: exponential, full jitter,
//! capped) and how many retries the route can afford ([`RetryBudget`]: at most 20% of its
//! requests over 10 s, and at least 10 per 10 s), so a dead upstream sees a trickle of retries
//! rather than a multiple of the traffic. All pure or with time passed in.
//!
//! Wiring (the caller's loop):
//!
//! ```text
//! budget.record_request(now);
//! for attempt in 1.. {
//!     let outcome = send(...).await;                        // Outcome::{NotSent, Failed, Status}
//!     if !should_retry(&method, outcome, attempt, &policy)  // also: request body replayable?
//!         || !budget.try_retry(Instant::now()) { break }
//!     sleep(backoff(attempt, random_unit()).min(time left before the client deadline)).await;
//! }
//! ```

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use http::{Method, StatusCode};
use tokio::time::Instant;

/// A route's retry settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts after the first (`retries`, 0 to 10).
    pub retries: u32,
    /// Retry non-idempotent methods too (`retry_unsafe`) after a failure that may have
    /// reached the upstream.
    pub retry_unsafe: bool,
}

/// How an upstream attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing was sent: no connection could be made (refused, connect timeout, no backend
    /// available). Safe to retry whatever the method.
    NotSent,
    /// The request may have reached the upstream, but no response head came back (reset,
    /// timeout, connection closed).
    Failed,
    /// A response head arrived with this status.
    Status(StatusCode),
}

/// Whether attempt number `attempt` (1 for the first), which ended with `outcome`, is
/// followed by another. Retried: [`Outcome::NotSent`] for any method; [`Outcome::Failed`] and
/// `502`/`503`/`504` for idempotent methods (RFC 9110 §9.2.2), or any with `retry_unsafe`;
/// nothing else (success, `4xx` — the request itself is at fault —, other `5xx`, which an
/// application returns for a request it processed). Never more than `policy.retries` retries.
///
/// The caller also checks that the request body can be sent again (buffered, or none) and
/// the route's [`RetryBudget`].
pub fn should_retry(method: &Method, outcome: Outcome, attempt: u32, policy: &RetryPolicy) -> bool {
    if attempt > policy.retries {
        return false;
    }
    let repeatable = policy.retry_unsafe || is_idempotent(method);
    match outcome {
        Outcome::NotSent => true,
        Outcome::Failed => repeatable,
        Outcome::Status(s) => {
            repeatable
                && matches!(
                    s,
                    StatusCode::BAD_GATEWAY
                        | StatusCode::SERVICE_UNAVAILABLE
                        | StatusCode::GATEWAY_TIMEOUT
                )
        }
    }
}

/// Methods a request may be repeated with (RFC 9110 §9.2.2).
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// The first retry waits up to this long.
pub const BACKOFF_BASE: Duration = Duration::from_millis(25);
/// No retry waits longer than this.
pub const BACKOFF_CAP: Duration = Duration::from_secs(1);

/// The wait before retry number `attempt` (1 for the first retry): "full jitter" (AWS
/// Architecture Blog, "Exponential Backoff And Jitter"): uniformly random between zero and
/// `min(BACKOFF_CAP, BACKOFF_BASE × 2^(attempt−1))`. `rng` is a random number in `[0, 1)`
/// ([`random_unit`]); values outside are clamped.
pub fn backoff(attempt: u32, rng: f64) -> Duration {
    let doublings = attempt.saturating_sub(1).min(31);
    let ceiling = BACKOFF_BASE.saturating_mul(1 << doublings).min(BACKOFF_CAP);
    let rng = if rng.is_nan() {
        0.0
    } else {
        rng.clamp(0.0, 1.0)
    };
    ceiling.mul_f64(rng)
}

/// A random number in `[0, 1)` for [`backoff`]: std's per-process random SipHash keys over a
/// counter (jitter needs spread, not cryptographic strength).
pub fn random_unit() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    static STATE: std::sync::OnceLock<std::hash::RandomState> = std::sync::OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut h = STATE
        .get_or_init(std::hash::RandomState::new)
        .build_hasher();
    h.write_u64(NEXT.fetch_add(1, Ordering::Relaxed));
    // The top 53 bits: every value exactly representable, below 1.
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// The budget's window.
pub const BUDGET_WINDOW: Duration = Duration::from_secs(10);
/// Retries may add this share of the window's requests...
pub const BUDGET_RATIO: f64 = 0.2;
/// ...but at least this many per window, so a quiet route can still retry.
pub const BUDGET_MIN_RETRIES: u32 = 10;

/// One-second slots of the window.
const SLOTS: usize = BUDGET_WINDOW.as_secs() as usize;

/// A route's retry budget: retries over the last [`BUDGET_WINDOW`] may not exceed
/// `max(BUDGET_MIN_RETRIES, BUDGET_RATIO × requests)` over the same window (as Finagle's
/// and gRPC's retry budgets). Counted in one-second slots; a mutex around a few integers,
/// taken once per upstream request and once per retry.
#[derive(Debug)]
pub struct RetryBudget {
    window: Mutex<Window>,
    granted: AtomicU64,
    denied: AtomicU64,
}

#[derive(Debug)]
struct Window {
    origin: Instant,
    /// Slot `s % SLOTS` holds second `s` since `origin` (if its `second` says so).
    slots: [Slot; SLOTS],
}

#[derive(Debug, Default, Clone, Copy)]
struct Slot {
    second: u64,
    requests: u32,
    retries: u32,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self::starting_at(Instant::now())
    }
}

impl RetryBudget {
    /// A budget whose seconds count from `origin` (times passed in are at or after it).
    pub fn starting_at(origin: Instant) -> Self {
        RetryBudget {
            window: Mutex::new(Window {
                origin,
                slots: [Slot::default(); SLOTS],
            }),
            granted: AtomicU64::new(0),
            denied: AtomicU64::new(0),
        }
    }

    /// Counts a request sent upstream (its first attempt).
    pub fn record_request(&self, now: Instant) {
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let slot = w.slot(now);
        slot.requests = slot.requests.saturating_add(1);
    }

    /// Takes one retry from the budget; `false` when the budget is spent.
    pub fn try_retry(&self, now: Instant) -> bool {
        let mut w = self.window.lock().unwrap_or_else(|p| p.into_inner());
        let (requests, retries) = w.totals(now);
        let allowed = BUDGET_MIN_RETRIES.max((f64::from(requests) * BUDGET_RATIO) as u32);
        if retries >= allowed {
            self.denied.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let slot = w.slot(now);
        slot.retries = slot.retries.saturating_add(1);
        self.granted.fetch_add(1, Ordering::Relaxed);
        true
    }

    /// Retries granted so far.
    pub fn granted(&self) -> u64 {
        self.granted.load(Ordering::Relaxed)
    }

    /// Retries refused for an exhausted budget so far.
    pub fn denied(&self) -> u64 {
        self.denied.load(Ordering::Relaxed)
    }
}

impl Window {
    fn second(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.origin).as_secs()
    }

    /// The slot of `now`'s second, emptied if it held an older second.
    fn slot(&mut self, now: Instant) -> &mut Slot {
        let second = self.second(now);
        let slot = &mut self.slots[(second % SLOTS as u64) as usize];
        if slot.second != second {
            *slot = Slot {
                second,
                ..Slot::default()
            };
        }
        slot
    }

    /// Requests and retries over the window ending at `now`.
    fn totals(&self, now: Instant) -> (u32, u32) {
        let second = self.second(now);
        self.slots
            .iter()
            .filter(|s| s.second <= second && second - s.second < SLOTS as u64)
            .fold((0u32, 0u32), |(q, r), s| {
                (q.saturating_add(s.requests), r.saturating_add(s.retries))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: RetryPolicy = RetryPolicy {
        retries: 2,
        retry_unsafe: false,
    };

    #[test]
    fn retries_stop_after_the_configured_number() {
        let get = Method::GET;
        assert!(should_retry(&get, Outcome::Failed, 1, &POLICY));
        assert!(should_retry(&get, Outcome::Failed, 2, &POLICY));
        assert!(!should_retry(&get, Outcome::Failed, 3, &POLICY));
        let none = RetryPolicy {
            retries: 0,
            ..POLICY
        };
        assert!(!should_retry(&get, Outcome::NotSent, 1, &none));
    }

    #[test]
    fn which_outcomes_are_retried() {
        let get = Method::GET;
        let status = |n| Outcome::Status(StatusCode::from_u16(n).unwrap());
        for n in [502, 503, 504] {
            assert!(should_retry(&get, status(n), 1, &POLICY), "{n}");
        }
        for n in [200, 204, 304, 400, 404, 408, 429, 500, 501, 505] {
            assert!(!should_retry(&get, status(n), 1, &POLICY), "{n}");
        }
        assert!(should_retry(&get, Outcome::NotSent, 1, &POLICY));
        assert!(should_retry(&get, Outcome::Failed, 1, &POLICY));
    }

    #[test]
    fn unsafe_methods_retry_only_when_nothing_was_sent_unless_allowed() {
        let post = Method::POST;
        assert!(should_retry(&post, Outcome::NotSent, 1, &POLICY));
        assert!(!should_retry(&post, Outcome::Failed, 1, &POLICY));
        assert!(!should_retry(
            &post,
            Outcome::Status(StatusCode::SERVICE_UNAVAILABLE),
            1,
            &POLICY
        ));
        let unsafe_ok = RetryPolicy {
            retry_unsafe: true,
            ..POLICY
        };
        assert!(should_retry(&post, Outcome::Failed, 1, &unsafe_ok));
        assert!(should_retry(
            &Method::PATCH,
            Outcome::Status(StatusCode::BAD_GATEWAY),
            2,
            &unsafe_ok
        ));
        // 4xx stays terminal even then.
        assert!(!should_retry(
            &post,
            Outcome::Status(StatusCode::CONFLICT),
            1,
            &unsafe_ok
        ));
        assert!(should_retry(&Method::PUT, Outcome::Failed, 1, &POLICY));
        assert!(should_retry(&Method::DELETE, Outcome::Failed, 1, &POLICY));
    }

    #[test]
    fn backoff_is_exponential_with_full_jitter_and_capped() {
        let ms = Duration::from_millis;
        // The ceiling doubles per attempt: 25, 50, 100, ..., then 1 s.
        assert_eq!(backoff(1, 0.999_999), ms(25).mul_f64(0.999_999));
        assert_eq!(backoff(2, 0.5), ms(25));
        assert_eq!(backoff(3, 0.5), ms(50));
        assert_eq!(backoff(5, 0.5), ms(200));
        assert_eq!(backoff(6, 0.5), ms(400));
        assert_eq!(backoff(7, 0.5), ms(500));
        assert_eq!(backoff(50, 0.5), ms(500));
        assert_eq!(backoff(u32::MAX, 0.999), BACKOFF_CAP.mul_f64(0.999));
        // Full jitter: anywhere from zero.
        assert_eq!(backoff(4, 0.0), Duration::ZERO);
        // Out-of-range randomness is clamped.
        assert_eq!(backoff(1, -3.0), Duration::ZERO);
        assert_eq!(backoff(1, f64::NAN), Duration::ZERO);
        assert_eq!(backoff(1, 7.0), ms(25));
        // attempt 0 is treated as the first.
        assert_eq!(backoff(0, 0.5), backoff(1, 0.5));
    }

    #[test]
    fn random_units_are_in_range_and_spread() {
        let draws: Vec<f64> = (0..1000).map(|_| random_unit()).collect();
        assert!(draws.iter().all(|&x| (0.0..1.0).contains(&x)));
        let low = draws.iter().filter(|&&x| x < 0.5).count();
        assert!((350..650).contains(&low), "{low} of 1000 below 0.5");
    }

    #[test]
    fn budget_allows_a_minimum_then_a_share_of_requests() {
        let t0 = Instant::now();
        let budget = RetryBudget::starting_at(t0);
        // A quiet route: the minimum.
        for i in 0..BUDGET_MIN_RETRIES {
            assert!(budget.try_retry(t0), "retry {i}");
        }
        assert!(!budget.try_retry(t0));
        assert_eq!((budget.granted(), budget.denied()), (10, 1));

        // 100 requests in the window allow 20 retries in all.
        let t1 = t0 + Duration::from_millis(1500);
        for _ in 0..100 {
            budget.record_request(t1);
        }
        let granted = (0..50).filter(|_| budget.try_retry(t1)).count();
        assert_eq!(granted, 10, "10 more, to 20 in the window");
    }

    #[test]
    fn budget_window_slides() {
        let t0 = Instant::now();
        let budget = RetryBudget::starting_at(t0);
        for _ in 0..BUDGET_MIN_RETRIES {
            assert!(budget.try_retry(t0));
        }
        assert!(!budget.try_retry(t0 + Duration::from_millis(9_999)));
        // Ten seconds later the first second's retries have left the window.
        assert!(budget.try_retry(t0 + Duration::from_secs(10)));
        // A time before the origin counts as the origin's second.
        let early = RetryBudget::starting_at(t0 + Duration::from_secs(5));
        early.record_request(t0);
        assert!(early.try_retry(t0));
    }

    #[test]
    fn a_dead_upstream_gets_a_fifth_more_not_a_multiple() {
        // 1,000 requests a second for 30 s against an upstream that always fails, each
        // wanting up to 3 retries: the budget holds retries to ~20% of requests.
        let t0 = Instant::now();
        let budget = RetryBudget::starting_at(t0);
        let policy = RetryPolicy {
            retries: 3,
            retry_unsafe: false,
        };
        let (mut requests, mut retries) = (0u64, 0u64);
        for ms in 0..30_000u64 {
            let now = t0 + Duration::from_millis(ms);
            budget.record_request(now);
            requests += 1;
            let mut attempt = 1;
            while should_retry(&Method::GET, Outcome::Failed, attempt, &policy)
                && budget.try_retry(now)
            {
                retries += 1;
                attempt += 1;
            }
        }
        let share = retries as f64 / requests as f64;
        assert!((0.15..=0.21).contains(&share), "retries/requests = {share}");
    }
}
