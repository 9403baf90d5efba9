//! Admin requests: clear or refresh cached entries on the upstream service's say-so.
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
//! The answer is a small JSON object.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use sha2::{Digest, Sha256};

use crate::body::ProxyBody;
use crate::cache::entry::CachedResponse;
use crate::cache::key::{origin_host, path_and_query};
use crate::cache::{FetchOutcome, Target};
use crate::config::AdminKey;
use crate::metrics::Eviction;
use crate::proxy::headers::{
    Downstream, CLEAR_CACHE, CLEAR_CACHE_HOST, CLEAR_CACHE_KEY, CLEAR_CACHE_SCOPE,
};
use crate::proxy::respond;
use crate::proxy::Proxy;

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
const THROTTLE_WINDOW: Duration = Duration::from_secs(60);
/// Addresses tracked at most: expired windows are pruned first, then the oldest window goes,
/// so a flood of addresses cannot grow the table (IPv6 clients count per /64, the smallest
/// network one client usually holds).
const THROTTLE_TRACKED: usize = 10_000;

/// Slows down key guessing: after `THROTTLE_ATTEMPTS` wrong keys from one client address
/// (derived from `X-Forwarded-For` behind a trusted proxy, see [`Downstream`]) within
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
}

/// Handles an admin request (one that carries `Clear-Cache`).
pub async fn handle(
    proxy: &Arc<Proxy>,
    req: Request<Incoming>,
    down: &Downstream<'_>,
) -> Response<ProxyBody> {
    let path = path_and_query(req.uri()).to_owned();
    let client = down.client(req.headers());
    let Some(configured) = &proxy.config.admin_key else {
        tracing::warn!(%path, %client, "admin request refused: CLEAR_CACHE_KEY is not set");
        proxy.metrics.admin("disabled");
        return respond::json(
            StatusCode::FORBIDDEN,
            r#"{"error":"admin disabled: CLEAR_CACHE_KEY is not set"}"#.into(),
        );
    };
    let now = Instant::now();
    if let Some(retry_after) = proxy.admin_throttle.blocked(client, now) {
        proxy.metrics.admin("throttled");
        let mut resp = respond::json(
            StatusCode::TOO_MANY_REQUESTS,
            r#"{"error":"too many wrong keys; try later"}"#.into(),
        );
        resp.headers_mut()
            .insert(http::header::RETRY_AFTER, HeaderValue::from(retry_after));
        return resp;
    }
    if !key_matches(configured, req.headers().get(CLEAR_CACHE_KEY)) {
        if proxy.admin_throttle.failed(client, now) {
            tracing::warn!(%client, "admin key guessing: throttling this address for {}s", THROTTLE_WINDOW.as_secs());
        }
        tracing::warn!(%path, %client, "admin request with a missing or wrong Clear-Cache-Key");
        proxy.metrics.admin("unauthorized");
        return respond::json(
            StatusCode::UNAUTHORIZED,
            r#"{"error":"unauthorized"}"#.into(),
        );
    }
    let mode = req
        .headers()
        .get(CLEAR_CACHE)
        .map_or(Mode::ByWindow, Mode::parse);
    let Ok(scope) = Scope::parse(req.headers().get(CLEAR_CACHE_SCOPE)) else {
        return respond::json(
            StatusCode::BAD_REQUEST,
            r#"{"error":"Clear-Cache-Scope must be exact, prefix or all"}"#.into(),
        );
    };
    let hosts = HostFilter::parse(req.headers().get(CLEAR_CACHE_HOST));
    let (action, resp) = match scope {
        Scope::Exact => exact(proxy, &path, &hosts, mode).await,
        Scope::Prefix => many(proxy, &path, &hosts, mode),
        Scope::All => many(proxy, "", &hosts, mode),
    };
    proxy.metrics.admin(action);
    tracing::info!(%path, ?mode, ?scope, host = hosts.0.as_deref().unwrap_or("*"), action, status = resp.status().as_u16(), "admin request");
    resp
}

/// One path (under every host the filter lets through): clear or refresh each stored
/// variant, waiting for refreshes to land.
async fn exact(
    proxy: &Arc<Proxy>,
    path: &str,
    hosts: &HostFilter,
    mode: Mode,
) -> (&'static str, Response<ProxyBody>) {
    let selected = proxy
        .cache
        .select(Target::Path(path), |o| hosts.matches_origin(o));
    let mut cleared = 0;
    let mut waiters = Vec::new();
    for (key, variants) in selected {
        for entry in variants {
            if wants_refresh(proxy, &entry, mode) {
                waiters.push((key.clone(), proxy.refresh(key.clone(), entry)));
            } else if proxy.cache.invalidate_version(&key, entry.id) {
                cleared += 1;
            }
        }
    }
    proxy.metrics.evicted(Eviction::Admin, cleared);
    if waiters.is_empty() {
        let action = if cleared > 0 { "cleared" } else { "not_cached" };
        return (
            action,
            respond::json(StatusCode::OK, report(path, action, cleared)),
        );
    }
    let mut refreshed = 0;
    let mut failure = None;
    for (key, w) in waiters {
        match w.wait().await {
            Some(FetchOutcome::Stored(_)) => refreshed += 1,
            Some(FetchOutcome::NotShared) => {
                // The upstream no longer lets it be shared: the old copy must go too.
                proxy
                    .metrics
                    .evicted(Eviction::Admin, proxy.cache.invalidate(&key));
                refreshed += 1;
            }
            Some(FetchOutcome::Failed(e)) => failure = Some(e),
            None => {
                failure = Some(crate::error::UpstreamError::BadResponse(
                    "refresh abandoned".into(),
                ))
            }
        }
    }
    match failure {
        Some(e) if refreshed == 0 => {
            let mut body = report(path, "refresh_failed", 0);
            body.pop();
            let _ = write!(body, r#","error":"{}","kept":"previous"}}"#, e.as_str());
            ("refresh_failed", respond::json(e.status(), body))
        }
        _ => (
            "refreshed",
            respond::json(StatusCode::OK, report(path, "refreshed", refreshed)),
        ),
    }
}

/// Many keys (prefix or all): clears happen now, refreshes start in the background.
fn many(
    proxy: &Arc<Proxy>,
    prefix: &str,
    hosts: &HostFilter,
    mode: Mode,
) -> (&'static str, Response<ProxyBody>) {
    let (mut cleared, mut refreshing) = (0, 0);
    let target = Target::Prefix(prefix);
    let origin = |o: &str| hosts.matches_origin(o);
    if mode == Mode::Clear {
        cleared = proxy.cache.purge(target, origin);
    } else {
        for (key, variants) in proxy.cache.select(target, origin) {
            for entry in variants {
                if wants_refresh(proxy, &entry, mode) {
                    drop(proxy.refresh(key.clone(), entry));
                    refreshing += 1;
                } else if proxy.cache.invalidate_version(&key, entry.id) {
                    cleared += 1;
                }
            }
        }
    }
    proxy.metrics.evicted(Eviction::Admin, cleared);
    let action = if refreshing > 0 {
        "refreshing"
    } else if cleared > 0 {
        "cleared"
    } else {
        "not_cached"
    };
    let mut body = String::new();
    let _ = write!(
        body,
        r#"{{"prefix":"{}","action":"{action}","cleared":{cleared},"refreshing":{refreshing}}}"#,
        json_escape(prefix),
    );
    (
        if refreshing > 0 { "refreshed" } else { action },
        respond::json(StatusCode::OK, body),
    )
}

fn wants_refresh(proxy: &Proxy, entry: &CachedResponse, mode: Mode) -> bool {
    match mode {
        Mode::Clear => false,
        Mode::Refresh => true,
        Mode::ByWindow => {
            let window = proxy.config.refresh_window;
            !window.is_zero() && entry.requested_within(window)
        }
    }
}

fn report(path: &str, action: &str, variants: usize) -> String {
    format!(
        r#"{{"path":"{}","action":"{action}","variants":{variants}}}"#,
        json_escape(path)
    )
}

/// Escapes a string for a JSON string literal.
fn json_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out
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

    #[test]
    fn escaping() {
        assert_eq!(json_escape("/a\"b\\c\n"), "/a\\\"b\\\\c\\u000a");
    }
}
