//! Pure decisions about stored entries: whether a lookup serves the entry fresh, serves it
//! stale (and starts a refresh), or goes upstream; whether an upstream failure is answered
//! with the stale copy; when an entry's timer fires; and what the expiry task does when it
//! fires. Each is a function of the entry, the operator's [`Settings`] and [`Now`], returning
//! an enum — no clock is read here, so every branch is a plain unit test. The pipeline
//! ([`crate::proxy`]) only executes the answers.

use std::time::Duration;

use tokio::time::Instant;

use super::entry::{ms_at, CachedResponse};
use super::policy::CacheControl;
use crate::config::{ClientCacheControl, Config};

/// The operator settings the decisions read.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// `DEFAULT_REFRESH_WINDOW_SECS`: an entry requested within it is hot (refreshed, not
    /// dropped); zero turns refreshing off.
    pub refresh_window: Duration,
    /// `STALE_IF_ERROR_SECS`: how long past expiry an entry may answer for a failed upstream.
    pub stale_if_error: Duration,
    /// `STALE_RETENTION_SECS`: how long after its last use an expired entry with validators
    /// is kept for revalidation.
    pub stale_retention: Duration,
    /// `REQ_TIMEOUT`: the most a refresh is started ahead of expiry.
    pub upstream_timeout: Duration,
    /// `CLIENT_CACHE_CONTROL`: which of a client's request directives are obeyed.
    pub client_cache_control: ClientCacheControl,
}

impl From<&Config> for Settings {
    fn from(c: &Config) -> Self {
        Settings {
            refresh_window: c.refresh_window,
            stale_if_error: c.stale_if_error,
            stale_retention: c.stale_retention,
            upstream_timeout: c.upstream_timeout,
            client_cache_control: c.client_cache_control,
        }
    }
}

/// The moment a decision is made, on both clocks an entry keeps: the monotonic instant
/// (freshness) and the millisecond access clock ([`super::entry::clock_ms`]: last use,
/// refresh backoff). Taken from one clock read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Now {
    pub at: Instant,
    pub ms: u64,
}

impl Now {
    /// The decision time `at` (usually `Instant::now()`).
    pub fn at(at: Instant) -> Now {
        Now { at, ms: ms_at(at) }
    }
}

/// What a lookup does with what it found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Serve {
    /// Fresh, and the client accepts it: `HIT`.
    Fresh,
    /// Stale but servable: `STALE`; `refresh` when a background refresh is to start now (not
    /// while failed refreshes back off).
    Stale { refresh: bool },
    /// Stored but not servable as is: revalidate (or refetch) through the single flight.
    Revalidate,
    /// Nothing stored: fetch.
    Fetch,
}

/// The client's request directives this proxy obeys (`CLIENT_CACHE_CONTROL`): under `safe`
/// (the default) `no-cache`, `max-age` and `min-fresh` are dropped, so no client can force
/// an origin fetch at will; `no-store`, `only-if-cached` and `max-stale` always apply.
pub fn client_directives(headers: &http::HeaderMap, settings: &Settings) -> CacheControl {
    if !headers.contains_key(http::header::CACHE_CONTROL) {
        return CacheControl::default(); // the usual request: nothing to parse
    }
    let mut cc = CacheControl::parse(headers);
    if settings.client_cache_control == ClientCacheControl::Safe {
        cc.no_cache = false;
        cc.max_age = None;
        cc.min_fresh = None;
    }
    cc
}

/// What a downstream lookup does with `entry`, given the client's directives `client`.
pub fn serve(
    entry: Option<&CachedResponse>,
    client: &CacheControl,
    settings: &Settings,
    now: Now,
) -> Serve {
    let Some(entry) = entry else {
        return Serve::Fetch;
    };
    let fresh = entry.is_fresh(now.at);
    if fresh && client_accepts_fresh(client, entry, now.at) {
        return Serve::Fresh;
    }
    if !fresh && !client.no_cache && may_serve_stale(entry, client, settings, now.at) {
        // While refreshes of this copy keep failing, clients do not start more of them than
        // the backoff allows.
        return Serve::Stale {
            refresh: entry.may_start_refresh_at(now.ms),
        };
    }
    Serve::Revalidate
}

/// RFC 9111 §5.2.1.1 and §5.2.1.3: the client's `max-age` / `min-fresh` / `no-cache` may
/// refuse a fresh entry (only under `CLIENT_CACHE_CONTROL=full`).
fn client_accepts_fresh(client: &CacheControl, entry: &CachedResponse, now: Instant) -> bool {
    if client.no_cache {
        return false;
    }
    if client.max_age.is_none() && client.min_fresh.is_none() {
        return true; // the usual request: nothing to compute on the hit path
    }
    let age = entry.age(now).as_secs();
    let remaining = entry.expires_at().saturating_duration_since(now).as_secs();
    client.max_age.is_none_or(|m| age <= m) && client.min_fresh.is_none_or(|m| remaining >= m)
}

/// Whether a stale entry may be served (and refreshed in the background): within the
/// response's `stale-while-revalidate`, within the client's `max-stale`, or — for entries
/// whose freshness is the operator's default, not the origin's — within the refresh
/// window. Never when the response forbids serving it stale (RFC 9111 §4.2.4).
fn may_serve_stale(
    entry: &CachedResponse,
    client: &CacheControl,
    settings: &Settings,
    now: Instant,
) -> bool {
    if entry.forbids_stale() {
        return false;
    }
    let stale_for = entry.stale_for(now);
    let window = settings.refresh_window;
    stale_for <= entry.stale_while_revalidate()
        || client.max_stale.is_some_and(|m| stale_for.as_secs() <= m)
        || (entry.operator_ttl() && !window.is_zero() && stale_for <= window)
}

/// What an upstream failure is answered with when `entry` is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnError {
    /// The stale copy (`STALE`).
    ServeStale,
    /// The error.
    Fail,
}

/// RFC 5861 §4 `stale-if-error` from the response (which overrides `must-revalidate`), or
/// the operator's `STALE_IF_ERROR_SECS` for responses that do not forbid serving stale.
pub fn on_upstream_error(entry: &CachedResponse, settings: &Settings, now: Instant) -> OnError {
    let stale_for = entry.stale_for(now);
    if (!entry.stale_if_error().is_zero() && stale_for <= entry.stale_if_error())
        || (!entry.forbids_stale() && stale_for <= settings.stale_if_error)
    {
        OnError::ServeStale
    } else {
        OnError::Fail
    }
}

/// When a newly stored entry's timer fires: at expiry, or — when hot keys are refreshed — a
/// tenth of its lifetime (at most `REQ_TIMEOUT`) before, so that the new copy usually lands
/// before the old one goes stale.
pub fn timer_at(entry: &CachedResponse, settings: &Settings) -> Instant {
    let expires = entry.expires_at();
    if settings.refresh_window.is_zero() || entry.lifetime().is_zero() {
        return expires;
    }
    let lead = (entry.lifetime() / 10).min(settings.upstream_timeout);
    expires.checked_sub(lead).unwrap_or(expires)
}

/// Whether eviction takes `entry` before anything else: expired, and not requested within
/// the refresh window.
pub fn evict_first(entry: &CachedResponse, settings: &Settings, now: Now) -> bool {
    !entry.is_fresh(now.at) && !entry.requested_within_at(settings.refresh_window, now.ms)
}

/// What the expiry task does when an entry's timer fires.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExpiryAction {
    /// Start a background refresh, and look again at `recheck` (if the refresh failed, this
    /// version is still stored then and the refresh is retried after its backoff).
    Refresh { recheck: Instant },
    /// Nothing to do now; look again at this time.
    Recheck(Instant),
    /// Drop this version.
    Drop,
}

/// The expiry task's rule: a hot entry (requested within the refresh window) is refreshed
/// from shortly before expiry until a window past it, within its refresh backoff; a cold one
/// is looked at again at expiry; an expired one is kept while `stale-while-revalidate`,
/// `stale-if-error`, `STALE_IF_ERROR_SECS` or — for entries with validators —
/// `STALE_RETENTION_SECS` after its last use (or the refresh window, while hot) allow, then
/// dropped.
pub fn on_deadline(entry: &CachedResponse, settings: &Settings, now: Now) -> ExpiryAction {
    let window = settings.refresh_window;
    let stale_for = entry.stale_for(now.at);
    let hot = !window.is_zero() && entry.requested_within_at(window, now.ms);
    if hot && !entry.lifetime().is_zero() && stale_for <= window {
        return if entry.may_start_refresh_at(now.ms) {
            ExpiryAction::Refresh {
                recheck: now.at + entry.refresh_backoff(),
            }
        } else {
            ExpiryAction::Recheck(
                now.at + entry.refresh_wait_at(now.ms).max(Duration::from_millis(10)),
            )
        };
    }
    if entry.is_fresh(now.at) {
        // Cold when a refresh would have started: decide again at expiry.
        return ExpiryAction::Recheck(entry.expires_at());
    }
    let stale_allowance = entry
        .stale_while_revalidate()
        .max(entry.stale_if_error())
        .max(settings.stale_if_error);
    let mut keep_until = entry.expires_at() + stale_allowance;
    if entry.revalidatable() {
        let idle = entry.idle_for_at(now.ms);
        if hot {
            // Always-revalidate entries (no-cache, max-age=0) stay while they are used.
            keep_until = keep_until.max(now.at + window.saturating_sub(idle));
        }
        keep_until = keep_until.max(now.at + settings.stale_retention.saturating_sub(idle));
    }
    if now.at < keep_until {
        ExpiryAction::Recheck(keep_until)
    } else {
        ExpiryAction::Drop
    }
}

/// How long the shared tier keeps a copy of `entry` written at `now`: its remaining freshness
/// plus the stale allowances another instance could serve it under (`stale-while-revalidate`,
/// `stale-if-error`, `STALE_IF_ERROR_SECS`; `STALE_RETENTION_SECS` when it has validators).
/// `None` when that is already over (nothing to write).
pub fn shared_ttl(entry: &CachedResponse, settings: &Settings, now: Instant) -> Option<Duration> {
    let mut allowance = entry
        .stale_while_revalidate()
        .max(entry.stale_if_error())
        .max(settings.stale_if_error);
    if entry.revalidatable() {
        allowance = allowance.max(settings.stale_retention);
    }
    let keep_until = entry.expires_at() + allowance;
    let ttl = keep_until.saturating_duration_since(now);
    (!ttl.is_zero()).then_some(ttl)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::entry::NewEntry;
    use crate::cache::key::VaryKey;
    use http::{HeaderMap, HeaderValue, StatusCode};

    const S: Duration = Duration::from_secs(1);

    /// Times are seconds after `t0`; the entry is stored at `t0`, fresh for 100 s, last used
    /// at `t0`, with no stale allowances or validators unless `f` says otherwise.
    struct Clock(Instant);

    impl Clock {
        fn new() -> Clock {
            Clock(Instant::now())
        }
        fn at(&self, secs: f64) -> Now {
            Now::at(self.0 + Duration::from_secs_f64(secs))
        }
        fn entry(&self, f: impl FnOnce(&mut NewEntry)) -> CachedResponse {
            self.used_at(0.0, f)
        }
        /// An entry last requested `secs` after `t0`.
        fn used_at(&self, secs: f64, f: impl FnOnce(&mut NewEntry)) -> CachedResponse {
            let mut e = NewEntry {
                status: StatusCode::OK,
                headers: HeaderMap::new(),
                body: Default::default(),
                etag: HeaderValue::from_static("\"e\""),
                last_modified: None,
                upstream_etag: None,
                upstream_last_modified: None,
                vary: VaryKey::default(),
                stored_at: self.0,
                initial_age: Duration::ZERO,
                lifetime: 100 * S,
                forbids_stale: false,
                stale_while_revalidate: Duration::ZERO,
                stale_if_error: Duration::ZERO,
                operator_ttl: false,
            };
            f(&mut e);
            CachedResponse::new(e, 1, self.at(secs).ms)
        }
    }

    fn settings() -> Settings {
        Settings {
            refresh_window: 60 * S,
            stale_if_error: Duration::ZERO,
            stale_retention: Duration::ZERO,
            upstream_timeout: 10 * S,
            client_cache_control: ClientCacheControl::Safe,
        }
    }

    fn client(f: impl FnOnce(&mut CacheControl)) -> CacheControl {
        let mut cc = CacheControl::default();
        f(&mut cc);
        cc
    }

    /// The shared tier keeps a copy for its freshness plus what another instance could still
    /// serve it stale for; nothing past that.
    #[test]
    fn the_shared_tier_keeps_freshness_plus_stale_allowances() {
        let c = Clock::new();
        let s = settings();
        let plain = c.entry(|_| {});
        assert_eq!(shared_ttl(&plain, &s, c.at(30.0).at), Some(70 * S));
        assert_eq!(shared_ttl(&plain, &s, c.at(100.0).at), None);
        let swr = c.entry(|e| e.stale_while_revalidate = 50 * S);
        assert_eq!(shared_ttl(&swr, &s, c.at(120.0).at), Some(30 * S));
        let sie = Settings {
            stale_if_error: 200 * S,
            stale_retention: 500 * S,
            ..settings()
        };
        assert_eq!(shared_ttl(&plain, &sie, c.at(0.0).at), Some(300 * S));
        let validated = c.entry(|e| e.upstream_etag = Some(HeaderValue::from_static("\"v\"")));
        assert_eq!(shared_ttl(&validated, &sie, c.at(0.0).at), Some(600 * S));
    }

    #[test]
    fn nothing_stored_is_fetched() {
        let c = Clock::new();
        let none = client(|_| {});
        assert_eq!(serve(None, &none, &settings(), c.at(0.0)), Serve::Fetch);
    }

    /// "fresh → HIT"; RFC 9111 §5.2.1: the client's `no-cache`, `max-age`, `min-fresh` may
    /// refuse a fresh entry.
    #[test]
    fn fresh_entries_are_served_unless_the_client_refuses_them() {
        let c = Clock::new();
        let e = c.entry(|_| {});
        let s = settings();
        let at = c.at(30.0);
        let plain = client(|_| {});
        assert_eq!(serve(Some(&e), &plain, &s, at), Serve::Fresh);
        let no_cache = client(|cc| cc.no_cache = true);
        assert_eq!(serve(Some(&e), &no_cache, &s, at), Serve::Revalidate);
        let young = client(|cc| cc.max_age = Some(20));
        assert_eq!(serve(Some(&e), &young, &s, at), Serve::Revalidate);
        let old_enough = client(|cc| cc.max_age = Some(30));
        assert_eq!(serve(Some(&e), &old_enough, &s, at), Serve::Fresh);
        let min_fresh = client(|cc| cc.min_fresh = Some(71));
        assert_eq!(serve(Some(&e), &min_fresh, &s, at), Serve::Revalidate);
        let min_fresh_ok = client(|cc| cc.min_fresh = Some(70));
        assert_eq!(serve(Some(&e), &min_fresh_ok, &s, at), Serve::Fresh);
    }

    /// README "Stale": served while refreshed within the response's
    /// `stale-while-revalidate`, the client's `max-stale`, or — for operator-TTL entries —
    /// the refresh window; never when the response forbids serving stale, nor to `no-cache`.
    #[test]
    fn stale_entries_are_served_within_their_allowances() {
        let c = Clock::new();
        let s = settings();
        let plain = client(|_| {});
        let swr = c.entry(|e| e.stale_while_revalidate = 10 * S);
        let stale = Serve::Stale { refresh: true };
        assert_eq!(serve(Some(&swr), &plain, &s, c.at(110.0)), stale);
        assert_eq!(
            serve(Some(&swr), &plain, &s, c.at(110.5)),
            Serve::Revalidate
        );
        let no_cache = client(|cc| cc.no_cache = true);
        assert_eq!(
            serve(Some(&swr), &no_cache, &s, c.at(105.0)),
            Serve::Revalidate
        );
        let forbidden = c.entry(|e| {
            e.stale_while_revalidate = 10 * S;
            e.forbids_stale = true;
        });
        assert_eq!(
            serve(Some(&forbidden), &plain, &s, c.at(105.0)),
            Serve::Revalidate
        );

        let plain_entry = c.entry(|_| {});
        assert_eq!(
            serve(Some(&plain_entry), &plain, &s, c.at(101.0)),
            Serve::Revalidate
        );
        let max_stale = client(|cc| cc.max_stale = Some(5));
        assert_eq!(
            serve(Some(&plain_entry), &max_stale, &s, c.at(105.0)),
            stale
        );
        assert_eq!(
            serve(Some(&plain_entry), &max_stale, &s, c.at(106.0)),
            Serve::Revalidate
        );

        let operator = c.entry(|e| e.operator_ttl = true);
        assert_eq!(serve(Some(&operator), &plain, &s, c.at(160.0)), stale);
        assert_eq!(
            serve(Some(&operator), &plain, &s, c.at(161.0)),
            Serve::Revalidate
        );
        let off = Settings {
            refresh_window: Duration::ZERO,
            ..s
        };
        assert_eq!(
            serve(Some(&operator), &plain, &off, c.at(101.0)),
            Serve::Revalidate
        );
    }

    /// A stale copy is still served while its refreshes back off, but starts none.
    #[test]
    fn stale_serving_starts_no_refresh_during_backoff() {
        let c = Clock::new();
        let e = c.entry(|e| e.stale_while_revalidate = 10 * S);
        e.refresh_failed_at(c.at(101.0).ms);
        let plain = client(|_| {});
        let s = settings();
        assert_eq!(
            serve(Some(&e), &plain, &s, c.at(101.5)),
            Serve::Stale { refresh: false }
        );
        assert_eq!(
            serve(Some(&e), &plain, &s, c.at(102.0)),
            Serve::Stale { refresh: true }
        );
    }

    /// RFC 5861 §4: the response's `stale-if-error` (even over `must-revalidate`), or
    /// `STALE_IF_ERROR_SECS` for responses that do not forbid serving stale.
    #[test]
    fn upstream_errors_are_answered_stale_within_stale_if_error() {
        let c = Clock::new();
        let s = settings();
        let own = c.entry(|e| {
            e.stale_if_error = 30 * S;
            e.forbids_stale = true;
        });
        assert_eq!(
            on_upstream_error(&own, &s, c.at(130.0).at),
            OnError::ServeStale
        );
        assert_eq!(on_upstream_error(&own, &s, c.at(131.0).at), OnError::Fail);
        let operator = Settings {
            stale_if_error: 20 * S,
            ..s
        };
        let plain = c.entry(|_| {});
        assert_eq!(on_upstream_error(&plain, &s, c.at(101.0).at), OnError::Fail);
        assert_eq!(
            on_upstream_error(&plain, &operator, c.at(120.0).at),
            OnError::ServeStale
        );
        assert_eq!(
            on_upstream_error(&plain, &operator, c.at(121.0).at),
            OnError::Fail
        );
        let forbidden = c.entry(|e| e.forbids_stale = true);
        assert_eq!(
            on_upstream_error(&forbidden, &operator, c.at(101.0).at),
            OnError::Fail
        );
        // A copy still fresh (revalidated at a client's request) always answers.
        assert_eq!(
            on_upstream_error(&plain, &s, c.at(50.0).at),
            OnError::ServeStale
        );
    }

    /// "refreshed … a tenth of their lifetime (at most `REQ_TIMEOUT`) before they expire".
    #[test]
    fn timers_fire_a_tenth_of_the_lifetime_early_at_most_req_timeout() {
        let c = Clock::new();
        let s = settings();
        let e = c.entry(|_| {});
        assert_eq!(timer_at(&e, &s), c.0 + 90 * S);
        let long = c.entry(|e| e.lifetime = 1000 * S);
        assert_eq!(timer_at(&long, &s), c.0 + 990 * S);
        let off = Settings {
            refresh_window: Duration::ZERO,
            ..s
        };
        assert_eq!(timer_at(&e, &off), c.0 + 100 * S);
        let always = c.entry(|e| e.lifetime = Duration::ZERO);
        assert_eq!(timer_at(&always, &s), c.0);
    }

    #[test]
    fn expired_cold_entries_are_evicted_first() {
        let c = Clock::new();
        let s = settings();
        let e = c.entry(|_| {});
        assert!(!evict_first(&e, &s, c.at(50.0)), "fresh");
        assert!(!evict_first(&e, &s, c.at(99.0)), "fresh, though cold");
        assert!(
            evict_first(&e, &s, c.at(101.0)),
            "expired, last used 101 s ago"
        );
        let hot = c.used_at(90.0, |_| {});
        assert!(!evict_first(&hot, &s, c.at(101.0)), "expired but hot");
    }

    /// README `DEFAULT_REFRESH_WINDOW_SECS`: a hot entry is refreshed shortly before it
    /// expires; a failed refresh is retried after its backoff (1 s doubling to 10 s).
    #[test]
    fn hot_entries_are_refreshed_then_retried_after_their_backoff() {
        let c = Clock::new();
        let s = settings();
        let e = c.used_at(80.0, |_| {});
        let at = c.at(90.0);
        assert_eq!(
            on_deadline(&e, &s, at),
            ExpiryAction::Refresh { recheck: at.at + S }
        );
        e.refresh_failed_at(at.ms);
        let soon = c.at(90.5);
        assert_eq!(
            on_deadline(&e, &s, soon),
            ExpiryAction::Recheck(soon.at + Duration::from_millis(500))
        );
        let almost = c.at(90.995);
        assert_eq!(
            on_deadline(&e, &s, almost),
            ExpiryAction::Recheck(almost.at + Duration::from_millis(10)),
            "never sooner than 10 ms"
        );
        // Refreshed up to a window past expiry while a client asked within the window.
        let late = c.at(140.0);
        assert!(matches!(
            on_deadline(&e, &s, late),
            ExpiryAction::Refresh { .. }
        ));
    }

    /// "an entry not requested within it is dropped at expiry"; decided again at expiry when
    /// it was cold at the early timer.
    #[test]
    fn cold_entries_are_dropped_at_expiry() {
        let c = Clock::new();
        let s = settings();
        let e = c.entry(|_| {});
        assert_eq!(
            on_deadline(&e, &s, c.at(90.0)),
            ExpiryAction::Recheck(c.0 + 100 * S),
            "cold at the early timer: decide at expiry"
        );
        assert_eq!(on_deadline(&e, &s, c.at(100.0)), ExpiryAction::Drop);
        let off = Settings {
            refresh_window: Duration::ZERO,
            ..s
        };
        let used = c.used_at(99.0, |_| {});
        assert_eq!(
            on_deadline(&used, &off, c.at(100.0)),
            ExpiryAction::Drop,
            "refreshing off"
        );
    }

    /// Expired entries stay while `stale-while-revalidate`, `stale-if-error` or
    /// `STALE_IF_ERROR_SECS` allow; with validators, `STALE_RETENTION_SECS` after last use,
    /// and while hot.
    #[test]
    fn expired_entries_are_kept_while_an_allowance_lasts() {
        let c = Clock::new();
        let s = settings();
        let swr = c.entry(|e| e.stale_while_revalidate = 10 * S);
        assert_eq!(
            on_deadline(&swr, &s, c.at(100.0)),
            ExpiryAction::Recheck(c.0 + 110 * S)
        );
        assert_eq!(on_deadline(&swr, &s, c.at(110.0)), ExpiryAction::Drop);
        let sie = c.entry(|e| e.stale_if_error = 20 * S);
        assert_eq!(
            on_deadline(&sie, &s, c.at(100.0)),
            ExpiryAction::Recheck(c.0 + 120 * S)
        );
        let operator = Settings {
            stale_if_error: 30 * S,
            ..s
        };
        assert_eq!(
            on_deadline(&sie, &operator, c.at(100.0)),
            ExpiryAction::Recheck(c.0 + 130 * S)
        );

        let retention = Settings {
            stale_retention: 300 * S,
            ..s
        };
        let plain = c.entry(|_| {});
        assert_eq!(
            on_deadline(&plain, &retention, c.at(100.0)),
            ExpiryAction::Drop,
            "no validators"
        );
        let validated = c.entry(|e| e.upstream_etag = Some(HeaderValue::from_static("\"v\"")));
        assert_eq!(
            on_deadline(&validated, &retention, c.at(100.0)),
            ExpiryAction::Recheck(c.0 + 300 * S),
            "300 s after its last use at t0"
        );
        assert_eq!(
            on_deadline(&validated, &retention, c.at(300.0)),
            ExpiryAction::Drop
        );

        // Always-revalidate (lifetime zero) entries with validators stay while hot.
        let always = c.used_at(0.0, |e| {
            e.lifetime = Duration::ZERO;
            e.upstream_etag = Some(HeaderValue::from_static("\"v\""));
        });
        assert_eq!(
            on_deadline(&always, &s, c.at(20.0)),
            ExpiryAction::Recheck(c.0 + 60 * S)
        );
        assert_eq!(on_deadline(&always, &s, c.at(61.0)), ExpiryAction::Drop);
    }

    #[test]
    fn client_directives_under_safe_and_full() {
        let mut h = http::HeaderMap::new();
        h.insert(
            http::header::CACHE_CONTROL,
            http::HeaderValue::from_static(
                "no-cache, max-age=0, min-fresh=5, max-stale=9, only-if-cached, no-store",
            ),
        );
        let mut settings = settings();
        let safe = client_directives(&h, &settings);
        assert!(!safe.no_cache && safe.max_age.is_none() && safe.min_fresh.is_none());
        assert!(safe.only_if_cached && safe.no_store && safe.max_stale == Some(9));
        settings.client_cache_control = ClientCacheControl::Full;
        let full = client_directives(&h, &settings);
        assert!(full.no_cache && full.max_age == Some(0) && full.min_fresh == Some(5));
        assert_eq!(
            client_directives(&http::HeaderMap::new(), &settings).max_age,
            None
        );
    }
}
