//! Admin requests, the pure half: parse an admin request, authorise it, decide per entry
//! whether it is refreshed or dropped, and shape the JSON report. Executing it (store
//! lookups, refreshes, eviction metrics) is [`crate::proxy::purge`]'s job, so this module
//! never imports the pipeline that calls it.
//!
//! Any request carrying a `Clear-Cache` header is an admin request and never goes upstream
//! (compatible with the proxy edgecache replaces). `Clear-Cache-Key` must equal
//! `CLEAR_CACHE_KEY` (compared in constant time; never logged). The request's path and query
//! name the entry; `Clear-Cache` picks the action:
//!
//! | `Clear-Cache`        | action                                                          |
//! |----------------------|-----------------------------------------------------------------|
//! | `clear`              | drop now                                                        |
//! | `refresh`            | refetch now; the old copy is served until the new one lands     |
//! | anything else        | refresh if requested within `DEFAULT_REFRESH_WINDOW_SECS`, else drop |
//!
//! `Clear-Cache-Scope: prefix` applies the action to every key starting with the path+query,
//! `Clear-Cache-Scope: all` to every key. Entries are keyed by host too (see
//! [`crate::cache::key`]), but the upstream calls under its own address, so an admin request
//! reaches its path under **every** host; `Clear-Cache-Host: example.com` narrows it to one.
//! The answer is a small JSON object whose `action` is an [`Action`], the same word the
//! `edgecache_admin_requests_total` metric counts it under.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::cache::entry::CachedResponse;
use crate::cache::key::origin_host;
use crate::cache::Target;
use crate::config::AdminKey;
use crate::error::UpstreamError;

/// Marks a request as an admin request; its value is the [`Mode`].
pub const CLEAR_CACHE: HeaderName = HeaderName::from_static("clear-cache");
/// The admin password (`CLEAR_CACHE_KEY`).
pub const CLEAR_CACHE_KEY: HeaderName = HeaderName::from_static("clear-cache-key");
/// `exact` (default), `prefix` or `all`: the [`Scope`].
pub const CLEAR_CACHE_SCOPE: HeaderName = HeaderName::from_static("clear-cache-scope");
/// Narrows the request to one host: the [`HostFilter`].
pub const CLEAR_CACHE_HOST: HeaderName = HeaderName::from_static("clear-cache-host");

/// What the `Clear-Cache` value asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Clear,
    Refresh,
    /// Refresh hot entries, drop cold ones (the refresh-window rule of expiry).
    ByWindow,
}

impl Mode {
    pub fn parse(v: &HeaderValue) -> Mode {
        let v = v.to_str().unwrap_or("").trim();
        if v.eq_ignore_ascii_case("clear") {
            Mode::Clear
        } else if v.eq_ignore_ascii_case("refresh") {
            Mode::Refresh
        } else {
            Mode::ByWindow
        }
    }

    /// Whether `entry` is refreshed (else dropped): always under `refresh`, never under
    /// `clear`, and by default when a client asked for it within the refresh `window`
    /// (`DEFAULT_REFRESH_WINDOW_SECS`; zero turns refreshing off).
    pub fn refreshes(self, entry: &CachedResponse, window: Duration) -> bool {
        match self {
            Mode::Clear => false,
            Mode::Refresh => true,
            Mode::ByWindow => !window.is_zero() && entry.requested_within(window),
        }
    }
}

/// Which keys an admin request addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Exact,
    Prefix,
    All,
}

impl Scope {
    fn parse(v: Option<&HeaderValue>) -> Result<Scope, ()> {
        match v
            .map(|v| v.to_str().unwrap_or("").trim().to_ascii_lowercase())
            .as_deref()
        {
            None | Some("") | Some("exact") => Ok(Scope::Exact),
            Some("prefix") => Ok(Scope::Prefix),
            Some("all") => Ok(Scope::All),
            Some(_) => Err(()),
        }
    }
}

/// Failed key attempts allowed per client address within [`THROTTLE_WINDOW`].
const THROTTLE_ATTEMPTS: u32 = 5;
pub const THROTTLE_WINDOW: Duration = Duration::from_secs(60);
/// Addresses tracked at most: expired windows are pruned first, then the oldest window goes,
/// so a flood of addresses cannot grow the table (IPv6 clients count per /64, the smallest
/// network one client usually holds).
const THROTTLE_TRACKED: usize = 10_000;

/// Slows down key guessing: after `THROTTLE_ATTEMPTS` wrong keys from one client address
/// (derived from `X-Forwarded-For` behind a trusted proxy, see
/// [`crate::proxy::headers::Downstream`]) within
/// `THROTTLE_WINDOW`, that address gets 429 without its key being checked until the window
/// ends.
#[derive(Default)]
pub struct Throttle {
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

/// The unit one client is counted by: its IPv4 address, or its IPv6 /64.
fn throttle_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
        },
        v4 => v4,
    }
}

impl Throttle {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, (u32, Instant)>> {
        self.failures.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Seconds until `ip` may try again, if it is throttled now.
    fn blocked(&self, ip: IpAddr, now: Instant) -> Option<u64> {
        let map = self.lock();
        let (count, since) = map.get(&throttle_key(ip))?;
        let left = THROTTLE_WINDOW
            .checked_sub(now.saturating_duration_since(*since))
            .filter(|left| !left.is_zero())?;
        (*count >= THROTTLE_ATTEMPTS).then(|| left.as_secs().max(1))
    }

    /// Records a wrong key; returns true when this attempt starts the throttling.
    fn failed(&self, ip: IpAddr, now: Instant) -> bool {
        let ip = throttle_key(ip);
        let mut map = self.lock();
        if map.len() >= THROTTLE_TRACKED && !map.contains_key(&ip) {
            map.retain(|_, (_, since)| now.saturating_duration_since(*since) < THROTTLE_WINDOW);
            if map.len() >= THROTTLE_TRACKED {
                let oldest = map
                    .iter()
                    .min_by_key(|(_, (_, since))| *since)
                    .map(|(k, _)| *k);
                if let Some(oldest) = oldest {
                    map.remove(&oldest);
                }
            }
        }
        let slot = map.entry(ip).or_insert((0, now));
        if now.saturating_duration_since(slot.1) >= THROTTLE_WINDOW {
            *slot = (0, now);
        }
        slot.0 += 1;
        slot.0 == THROTTLE_ATTEMPTS
    }

    /// Addresses tracked now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

/// Compares the presented key with the configured one in constant time: both are hashed to
/// fixed-length digests first, so neither content nor length leaks through timing.
pub fn key_matches(configured: &AdminKey, presented: Option<&HeaderValue>) -> bool {
    let Some(presented) = presented else {
        return false;
    };
    let a = Sha256::digest(configured.0.as_bytes());
    let b = Sha256::digest(presented.as_bytes());
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

/// Which origins an admin request reaches: all, or those whose host is `Clear-Cache-Host`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostFilter(Option<String>);

impl HostFilter {
    /// From `Clear-Cache-Host` (absent or empty: every host). Compared as origins are keyed:
    /// lower case, without a default port.
    pub fn parse(v: Option<&HeaderValue>) -> HostFilter {
        let host = v
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim().to_ascii_lowercase())
            .filter(|v| !v.is_empty())
            .map(|v| {
                v.strip_suffix(":80")
                    .or_else(|| v.strip_suffix(":443"))
                    .map_or(v.clone(), str::to_owned)
            });
        HostFilter(host)
    }

    /// Whether an origin (`scheme://host`) is reached.
    pub fn matches_origin(&self, origin: &str) -> bool {
        self.0.as_deref().is_none_or(|h| origin_host(origin) == h)
    }

    /// The host it narrows to (`None`: every host), for logs.
    pub fn host(&self) -> Option<&str> {
        self.0.as_deref()
    }
}

/// How an admin request ended: the `action` of its JSON reply and the `outcome` label of
/// `edgecache_admin_requests_total` (refusals have no reply `action`, only the label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Variants were dropped.
    Cleared,
    /// Exact scope: the refreshes were awaited and landed.
    Refreshed,
    /// Prefix or all: refreshes were started in the background.
    Refreshing,
    /// Nothing stored matched.
    NotCached,
    /// Exact scope: every refresh failed; the previous copies are kept.
    RefreshFailed,
    /// Missing or wrong `Clear-Cache-Key`.
    Unauthorized,
    /// Too many wrong keys from this client.
    Throttled,
    /// `CLEAR_CACHE_KEY` is not set.
    Disabled,
    /// An unknown `Clear-Cache-Scope`.
    BadRequest,
}

impl Action {
    /// Every action, in the order the metric's series are rendered.
    pub const ALL: [Action; 9] = [
        Action::Throttled,
        Action::Cleared,
        Action::Refreshed,
        Action::Refreshing,
        Action::NotCached,
        Action::RefreshFailed,
        Action::Unauthorized,
        Action::Disabled,
        Action::BadRequest,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Cleared => "cleared",
            Action::Refreshed => "refreshed",
            Action::Refreshing => "refreshing",
            Action::NotCached => "not_cached",
            Action::RefreshFailed => "refresh_failed",
            Action::Unauthorized => "unauthorized",
            Action::Throttled => "throttled",
            Action::Disabled => "disabled",
            Action::BadRequest => "bad_request",
        }
    }
}

/// A parsed, authorised admin request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminRequest {
    pub mode: Mode,
    pub scope: Scope,
    pub hosts: HostFilter,
    /// The request's path and query: the key's path part (or its prefix).
    pub path: String,
}

impl AdminRequest {
    /// The stored keys it addresses.
    pub fn target(&self) -> Target<'_> {
        match self.scope {
            Scope::Exact => Target::Path(&self.path),
            Scope::Prefix => Target::Prefix(&self.path),
            Scope::All => Target::Prefix(""),
        }
    }
}

/// Why an admin request is refused before anything is looked up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminRefusal {
    /// `CLEAR_CACHE_KEY` is not set: 403.
    Disabled,
    /// The client is throttled for this many more seconds: 429 with `Retry-After`.
    Throttled { retry_after_secs: u64 },
    /// A missing or wrong key: 401. `throttling_started` when this attempt used up the
    /// client's allowance.
    Unauthorized { throttling_started: bool },
    /// `Clear-Cache-Scope` is not `exact`, `prefix` or `all`: 400.
    BadScope,
}

impl AdminRefusal {
    pub fn action(self) -> Action {
        match self {
            AdminRefusal::Disabled => Action::Disabled,
            AdminRefusal::Throttled { .. } => Action::Throttled,
            AdminRefusal::Unauthorized { .. } => Action::Unauthorized,
            AdminRefusal::BadScope => Action::BadRequest,
        }
    }

    /// The reply the client gets.
    pub fn reply(self) -> Reply {
        let (status, error, retry_after) = match self {
            AdminRefusal::Disabled => (
                StatusCode::FORBIDDEN,
                "admin disabled: CLEAR_CACHE_KEY is not set",
                None,
            ),
            AdminRefusal::Throttled { retry_after_secs } => (
                StatusCode::TOO_MANY_REQUESTS,
                "too many wrong keys; try later",
                Some(retry_after_secs),
            ),
            AdminRefusal::Unauthorized { .. } => (StatusCode::UNAUTHORIZED, "unauthorized", None),
            AdminRefusal::BadScope => (
                StatusCode::BAD_REQUEST,
                "Clear-Cache-Scope must be exact, prefix or all",
                None,
            ),
        };
        Reply {
            status,
            body: to_json(&ErrorReport { error }),
            retry_after,
            action: self.action(),
        }
    }
}

/// Parses and authorises an admin request from its path and query and headers. `configured`
/// is `CLEAR_CACHE_KEY`; a wrong key counts against `client` in `throttle` at `now`.
pub fn authorise(
    path_and_query: &str,
    headers: &HeaderMap,
    configured: Option<&AdminKey>,
    throttle: &Throttle,
    client: IpAddr,
    now: Instant,
) -> Result<AdminRequest, AdminRefusal> {
    let Some(configured) = configured else {
        return Err(AdminRefusal::Disabled);
    };
    if let Some(retry_after_secs) = throttle.blocked(client, now) {
        return Err(AdminRefusal::Throttled { retry_after_secs });
    }
    if !key_matches(configured, headers.get(CLEAR_CACHE_KEY)) {
        let throttling_started = throttle.failed(client, now);
        return Err(AdminRefusal::Unauthorized { throttling_started });
    }
    let mode = headers.get(CLEAR_CACHE).map_or(Mode::ByWindow, Mode::parse);
    let scope =
        Scope::parse(headers.get(CLEAR_CACHE_SCOPE)).map_err(|()| AdminRefusal::BadScope)?;
    Ok(AdminRequest {
        mode,
        scope,
        hosts: HostFilter::parse(headers.get(CLEAR_CACHE_HOST)),
        path: path_and_query.to_owned(),
    })
}

/// What executing an admin request did, as [`crate::proxy::purge`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Exact scope. `refreshes` is `None` when no variant was to be refreshed.
    Path {
        cleared: usize,
        refreshes: Option<Refreshes>,
    },
    /// Prefix or all scope: clears done, refreshes started.
    Many { cleared: usize, refreshing: usize },
}

/// The awaited refreshes of an exact-scope request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refreshes {
    /// Refreshes that landed (or found the response no longer shareable, and dropped it).
    pub ok: usize,
    /// The last failure, if any failed.
    pub failure: Option<UpstreamError>,
}

impl Outcome {
    pub fn action(&self) -> Action {
        match self {
            Outcome::Path {
                cleared,
                refreshes: None,
            } => {
                if *cleared > 0 {
                    Action::Cleared
                } else {
                    Action::NotCached
                }
            }
            Outcome::Path {
                refreshes: Some(r), ..
            } => {
                if r.ok == 0 && r.failure.is_some() {
                    Action::RefreshFailed
                } else {
                    Action::Refreshed
                }
            }
            Outcome::Many {
                cleared,
                refreshing,
            } => {
                if *refreshing > 0 {
                    Action::Refreshing
                } else if *cleared > 0 {
                    Action::Cleared
                } else {
                    Action::NotCached
                }
            }
        }
    }
}

/// The reply to an admin request: status, JSON body, and the `Retry-After` seconds of a
/// throttled one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: StatusCode,
    pub body: String,
    pub retry_after: Option<u64>,
    pub action: Action,
}

/// `{"path":…,"action":…,"variants":N}` (plus `"error"` and `"kept":"previous"` when every
/// refresh failed), or for prefix and all `{"prefix":…,"action":…,"cleared":N,"refreshing":N}`.
pub fn report(req: &AdminRequest, outcome: &Outcome) -> Reply {
    report_fleet(req, outcome, None)
}

/// How many live instances of the fleet acknowledged a purge (this one included) out of how
/// many are live (`REDIS_URL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acks {
    pub acks: usize,
    pub instances: usize,
}

/// [`report`] for a fleet: the reply also says `"acks"` and `"instances"`, and is `202
/// Accepted` instead of `200` when some live instance did not acknowledge in time (it will
/// apply the purge when it catches up).
pub fn report_fleet(req: &AdminRequest, outcome: &Outcome, fleet: Option<Acks>) -> Reply {
    let mut reply = report_local(req, outcome);
    if let Some(a) = fleet {
        // Appended after the local fields, which keep their order (the predecessor's).
        if let Some(open) = reply.body.strip_suffix('}') {
            reply.body = format!("{open},\"acks\":{},\"instances\":{}}}", a.acks, a.instances);
        }
        if reply.status == StatusCode::OK && a.acks < a.instances {
            reply.status = StatusCode::ACCEPTED;
        }
    }
    reply
}

fn report_local(req: &AdminRequest, outcome: &Outcome) -> Reply {
    let action = outcome.action();
    let (status, body) = match outcome {
        Outcome::Path { cleared, refreshes } => {
            let (variants, failure) = match refreshes {
                None => (*cleared, None),
                Some(r) if action == Action::RefreshFailed => (0, r.failure.as_ref()),
                Some(r) => (r.ok, None),
            };
            let body = PathReport {
                path: &req.path,
                action,
                variants,
                error: failure.map(UpstreamError::as_str),
                kept: failure.map(|_| "previous"),
            };
            (
                failure.map_or(StatusCode::OK, UpstreamError::status),
                to_json(&body),
            )
        }
        Outcome::Many {
            cleared,
            refreshing,
        } => {
            let prefix = match req.target() {
                Target::Path(p) | Target::Prefix(p) => p,
            };
            let body = ManyReport {
                prefix,
                action,
                cleared: *cleared,
                refreshing: *refreshing,
            };
            (StatusCode::OK, to_json(&body))
        }
    };
    Reply {
        status,
        body,
        retry_after: None,
        action,
    }
}

/// Field order is the wire order.
#[derive(Serialize)]
struct PathReport<'a> {
    path: &'a str,
    action: Action,
    variants: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kept: Option<&'static str>,
}

#[derive(Serialize)]
struct ManyReport<'a> {
    prefix: &'a str,
    action: Action,
    cleared: usize,
    refreshing: usize,
}

#[derive(Serialize)]
struct ErrorReport {
    error: &'static str,
}

/// Compact JSON. Serialising these plain structs cannot fail; `{}` is a guard, not a path.
fn to_json(value: &impl Serialize) -> String {
    serde_json::to_string(value).unwrap_or_else(|_| "{}".into())
}

#[cfg(test)]
mod fleet_report_tests {
    use super::*;

    #[test]
    fn fleet_replies_count_acknowledgements_and_are_202_when_some_are_missing() {
        let req = AdminRequest {
            mode: Mode::Clear,
            scope: Scope::Exact,
            hosts: HostFilter::parse(None),
            path: "/x".into(),
        };
        let outcome = Outcome::Path {
            cleared: 1,
            refreshes: None,
        };
        let all = report_fleet(
            &req,
            &outcome,
            Some(Acks {
                acks: 3,
                instances: 3,
            }),
        );
        assert_eq!(all.status, StatusCode::OK);
        assert_eq!(
            all.body,
            r#"{"path":"/x","action":"cleared","variants":1,"acks":3,"instances":3}"#
        );
        let some = report_fleet(
            &req,
            &outcome,
            Some(Acks {
                acks: 2,
                instances: 3,
            }),
        );
        assert_eq!(some.status, StatusCode::ACCEPTED);
        assert_eq!(
            report_fleet(&req, &outcome, None).body,
            report(&req, &outcome).body
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_comparison() {
        let k = AdminKey("Secret".into());
        assert!(key_matches(&k, Some(&HeaderValue::from_static("Secret"))));
        assert!(!key_matches(&k, Some(&HeaderValue::from_static("secret"))));
        assert!(!key_matches(&k, Some(&HeaderValue::from_static("Secret "))));
        assert!(!key_matches(&k, None));
    }

    #[test]
    fn throttle_after_repeated_failures_for_one_window() {
        let t = Throttle::default();
        let (ip, other) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let t0 = Instant::now();
        for i in 1..THROTTLE_ATTEMPTS {
            assert!(!t.failed(ip, t0), "attempt {i}");
            assert_eq!(t.blocked(ip, t0), None);
        }
        assert!(t.failed(ip, t0));
        assert_eq!(t.blocked(ip, t0), Some(60));
        assert_eq!(t.blocked(other, t0), None, "per address");
        assert_eq!(t.blocked(ip, t0 + THROTTLE_WINDOW), None, "the window ends");
    }

    #[test]
    fn throttle_memory_is_bounded_and_ipv6_counts_per_64() {
        let t = Throttle::default();
        let t0 = Instant::now();
        // One /64: every address in it shares one slot.
        for i in 0..THROTTLE_ATTEMPTS {
            let ip: IpAddr = format!("2001:db8:1:2::{:x}", i + 1).parse().unwrap();
            t.failed(ip, t0);
        }
        assert_eq!(t.len(), 1);
        assert!(t
            .blocked("2001:db8:1:2:ffff::1".parse().unwrap(), t0)
            .is_some());
        // A flood of distinct /64s within one window never grows the table past its bound.
        for i in 0..(THROTTLE_TRACKED as u32 + 500) {
            let ip: IpAddr = format!("2001:db8:{:x}:{:x}::1", i >> 16, i & 0xffff)
                .parse()
                .unwrap();
            t.failed(ip, t0 + Duration::from_millis(u64::from(i)));
        }
        assert!(t.len() <= THROTTLE_TRACKED, "{}", t.len());
    }

    #[test]
    fn host_filter() {
        let any = HostFilter::parse(None);
        assert!(any.matches_origin("http://a") && any.matches_origin("https://"));
        let one = HostFilter::parse(Some(&HeaderValue::from_static(" Example.COM:80 ")));
        assert!(one.matches_origin("http://example.com"));
        assert!(one.matches_origin("https://example.com"));
        assert!(!one.matches_origin("http://example.com:8080"));
        assert!(!one.matches_origin("http://evil.example"));
    }

    #[test]
    fn modes() {
        assert_eq!(
            Mode::parse(&HeaderValue::from_static("True")),
            Mode::ByWindow
        );
        assert_eq!(Mode::parse(&HeaderValue::from_static("CLEAR")), Mode::Clear);
        assert_eq!(
            Mode::parse(&HeaderValue::from_static(" refresh ")),
            Mode::Refresh
        );
    }

    fn request(scope: Scope, path: &str) -> AdminRequest {
        AdminRequest {
            mode: Mode::Refresh,
            scope,
            hosts: HostFilter::parse(None),
            path: path.into(),
        }
    }

    #[test]
    fn path_reports_keep_their_wire_format() {
        let req = request(Scope::Exact, "/a\"b?x=1");
        let cleared = report(
            &req,
            &Outcome::Path {
                cleared: 3,
                refreshes: None,
            },
        );
        assert_eq!(cleared.status, StatusCode::OK);
        assert_eq!(
            cleared.body,
            r#"{"path":"/a\"b?x=1","action":"cleared","variants":3}"#
        );
        let none = report(
            &req,
            &Outcome::Path {
                cleared: 0,
                refreshes: None,
            },
        );
        assert_eq!(none.action, Action::NotCached);
        assert!(none.body.contains(r#""action":"not_cached","variants":0}"#));
        let refreshed = Outcome::Path {
            cleared: 1,
            refreshes: Some(Refreshes {
                ok: 2,
                failure: Some(UpstreamError::Timeout),
            }),
        };
        assert!(report(&req, &refreshed)
            .body
            .ends_with(r#""action":"refreshed","variants":2}"#));
        let failed = report(
            &req,
            &Outcome::Path {
                cleared: 0,
                refreshes: Some(Refreshes {
                    ok: 0,
                    failure: Some(UpstreamError::Timeout),
                }),
            },
        );
        assert_eq!(failed.action, Action::RefreshFailed);
        assert_eq!(failed.status, UpstreamError::Timeout.status());
        assert_eq!(
            failed.body,
            format!(
                r#"{{"path":"/a\"b?x=1","action":"refresh_failed","variants":0,"error":"{}","kept":"previous"}}"#,
                UpstreamError::Timeout.as_str()
            )
        );
    }

    #[test]
    fn prefix_and_all_reports() {
        let many = |scope, cleared, refreshing| {
            report(
                &request(scope, "/p"),
                &Outcome::Many {
                    cleared,
                    refreshing,
                },
            )
        };
        assert_eq!(
            many(Scope::Prefix, 2, 1).body,
            r#"{"prefix":"/p","action":"refreshing","cleared":2,"refreshing":1}"#
        );
        assert_eq!(
            many(Scope::All, 2, 0).body,
            r#"{"prefix":"","action":"cleared","cleared":2,"refreshing":0}"#
        );
        assert_eq!(many(Scope::All, 0, 0).action, Action::NotCached);
        assert_eq!(many(Scope::Prefix, 0, 4).action, Action::Refreshing);
    }

    #[test]
    fn authorisation_order_and_refusals() {
        let key = AdminKey("Secret".into());
        let ip: IpAddr = "10.0.0.9".parse().unwrap();
        let t = Throttle::default();
        let now = Instant::now();
        let mut h = HeaderMap::new();
        h.insert(CLEAR_CACHE, HeaderValue::from_static("clear"));
        assert_eq!(
            authorise("/x", &h, None, &t, ip, now),
            Err(AdminRefusal::Disabled)
        );
        assert_eq!(
            authorise("/x", &h, Some(&key), &t, ip, now),
            Err(AdminRefusal::Unauthorized {
                throttling_started: false
            })
        );
        h.insert(CLEAR_CACHE_KEY, HeaderValue::from_static("Secret"));
        h.insert(CLEAR_CACHE_SCOPE, HeaderValue::from_static("Prefix"));
        h.insert(CLEAR_CACHE_HOST, HeaderValue::from_static("a.example"));
        let ok = authorise("/x?y", &h, Some(&key), &t, ip, now).unwrap();
        assert_eq!(
            (ok.mode, ok.scope, ok.path.as_str()),
            (Mode::Clear, Scope::Prefix, "/x?y")
        );
        assert_eq!(ok.hosts.host(), Some("a.example"));
        assert_eq!(ok.target(), Target::Prefix("/x?y"));
        h.insert(CLEAR_CACHE_SCOPE, HeaderValue::from_static("some"));
        let bad = authorise("/x", &h, Some(&key), &t, ip, now).unwrap_err();
        assert_eq!(
            (bad, bad.reply().status),
            (AdminRefusal::BadScope, StatusCode::BAD_REQUEST)
        );
        assert_eq!(bad.action(), Action::BadRequest);
        // Wrong keys (one was counted above) until the throttle starts; then even the right
        // key is refused.
        h.insert(CLEAR_CACHE_KEY, HeaderValue::from_static("guess"));
        let started: Vec<bool> = (1..THROTTLE_ATTEMPTS)
            .map(|_| match authorise("/x", &h, Some(&key), &t, ip, now) {
                Err(AdminRefusal::Unauthorized { throttling_started }) => throttling_started,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(started.iter().filter(|s| **s).count(), 1);
        assert!(started[started.len() - 1]);
        h.insert(CLEAR_CACHE_KEY, HeaderValue::from_static("Secret"));
        let throttled = authorise("/x", &h, Some(&key), &t, ip, now).unwrap_err();
        let reply = throttled.reply();
        assert_eq!(
            (reply.status, reply.retry_after, reply.body.as_str()),
            (
                StatusCode::TOO_MANY_REQUESTS,
                Some(60),
                r#"{"error":"too many wrong keys; try later"}"#
            )
        );
        assert_eq!(
            AdminRefusal::Disabled.reply().body,
            r#"{"error":"admin disabled: CLEAR_CACHE_KEY is not set"}"#
        );
        assert_eq!(
            AdminRefusal::Unauthorized {
                throttling_started: true
            }
            .reply()
            .body,
            r#"{"error":"unauthorized"}"#
        );
    }

    #[test]
    fn action_labels_are_the_reply_words() {
        for a in Action::ALL {
            assert_eq!(
                serde_json::to_string(&a).unwrap(),
                format!("\"{}\"", a.as_str())
            );
        }
    }

    #[test]
    fn by_window_refreshes_only_recently_requested_entries() {
        let e = crate::cache::entry::test_entry(1);
        e.touch();
        let w = Duration::from_secs(60);
        assert!(Mode::Refresh.refreshes(&e, Duration::ZERO));
        assert!(!Mode::Clear.refreshes(&e, w));
        assert!(Mode::ByWindow.refreshes(&e, w));
        assert!(!Mode::ByWindow.refreshes(&e, Duration::ZERO));
    }
}
