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
//! `Clear-Cache-Scope: all` to every key. The answer is a small JSON object.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use sha2::{Digest, Sha256};

use crate::body::ProxyBody;
use crate::cache::entry::CachedResponse;
use crate::cache::key::primary_key;
use crate::cache::FetchOutcome;
use crate::config::AdminKey;
use crate::metrics::Eviction;
use crate::proxy::headers::{CLEAR_CACHE, CLEAR_CACHE_KEY, CLEAR_CACHE_SCOPE};
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
/// Addresses tracked at most; older windows are pruned first.
const THROTTLE_TRACKED: usize = 10_000;

/// Slows down key guessing: after `THROTTLE_ATTEMPTS` wrong keys from one address within
/// `THROTTLE_WINDOW`, that address gets 429 without its key being checked until the window
/// ends.
#[derive(Default)]
pub struct Throttle {
    failures: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl Throttle {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, (u32, Instant)>> {
        self.failures.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Seconds until `ip` may try again, if it is throttled now.
    fn blocked(&self, ip: IpAddr, now: Instant) -> Option<u64> {
        let map = self.lock();
        let (count, since) = map.get(&ip)?;
        let left = THROTTLE_WINDOW
            .checked_sub(now.duration_since(*since))
            .filter(|left| !left.is_zero())?;
        (*count >= THROTTLE_ATTEMPTS).then(|| left.as_secs().max(1))
    }

    /// Records a wrong key; returns true when this attempt starts the throttling.
    fn failed(&self, ip: IpAddr, now: Instant) -> bool {
        let mut map = self.lock();
        if map.len() >= THROTTLE_TRACKED {
            map.retain(|_, (_, since)| now.duration_since(*since) < THROTTLE_WINDOW);
        }
        let slot = map.entry(ip).or_insert((0, now));
        if now.duration_since(slot.1) >= THROTTLE_WINDOW {
            *slot = (0, now);
        }
        slot.0 += 1;
        slot.0 == THROTTLE_ATTEMPTS
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

/// Handles an admin request (one that carries `Clear-Cache`).
pub async fn handle(
    proxy: &Arc<Proxy>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<ProxyBody> {
    let path = primary_key(req.uri()).to_owned();
    let Some(configured) = &proxy.config.admin_key else {
        tracing::warn!(%path, peer = %peer.ip(), "admin request refused: CLEAR_CACHE_KEY is not set");
        proxy.metrics.admin("disabled");
        return respond::json(
            StatusCode::FORBIDDEN,
            r#"{"error":"admin disabled: CLEAR_CACHE_KEY is not set"}"#.into(),
        );
    };
    let now = Instant::now();
    if let Some(retry_after) = proxy.admin_throttle.blocked(peer.ip(), now) {
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
        if proxy.admin_throttle.failed(peer.ip(), now) {
            tracing::warn!(peer = %peer.ip(), "admin key guessing: throttling this address for {}s", THROTTLE_WINDOW.as_secs());
        }
        tracing::warn!(%path, peer = %peer.ip(), "admin request with a missing or wrong Clear-Cache-Key");
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
    let (action, resp) = match scope {
        Scope::Exact => exact(proxy, &path, mode).await,
        Scope::Prefix => many(proxy, &path, mode),
        Scope::All => many(proxy, "", mode),
    };
    proxy.metrics.admin(action);
    tracing::info!(%path, ?mode, ?scope, action, status = resp.status().as_u16(), "admin request");
    resp
}

/// One key: clear or refresh each stored variant, waiting for refreshes to land.
async fn exact(proxy: &Arc<Proxy>, path: &str, mode: Mode) -> (&'static str, Response<ProxyBody>) {
    let variants = proxy.cache.store.variants(path);
    let Some(key) = proxy
        .cache
        .store
        .key_arc(path)
        .filter(|_| !variants.is_empty())
    else {
        return (
            "not_cached",
            respond::json(StatusCode::OK, report(path, "not_cached", 0)),
        );
    };
    let refresh: Vec<Arc<CachedResponse>> = variants
        .into_iter()
        .filter(|e| wants_refresh(proxy, e, mode))
        .collect();
    if refresh.is_empty() {
        let n = proxy.cache.store.remove(path);
        proxy.metrics.evicted(Eviction::Admin, n);
        return (
            "cleared",
            respond::json(StatusCode::OK, report(path, "cleared", n)),
        );
    }
    let waiters: Vec<_> = refresh
        .iter()
        .map(|e| proxy.refresh(key.clone(), e.clone()))
        .collect();
    let mut refreshed = 0;
    let mut failure = None;
    for w in waiters {
        match w.wait().await {
            Some(FetchOutcome::Stored(_)) => refreshed += 1,
            Some(FetchOutcome::NotShared) => {
                // The upstream no longer lets it be shared: the old copy must go too.
                proxy
                    .metrics
                    .evicted(Eviction::Admin, proxy.cache.store.remove(path));
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
fn many(proxy: &Arc<Proxy>, prefix: &str, mode: Mode) -> (&'static str, Response<ProxyBody>) {
    let (mut cleared, mut refreshing) = (0, 0);
    if mode == Mode::Clear {
        cleared = proxy.cache.store.remove_prefix(prefix);
    } else {
        for (key, variants) in proxy.cache.store.with_prefix(prefix) {
            for entry in variants {
                if wants_refresh(proxy, &entry, mode) {
                    drop(proxy.refresh(key.clone(), entry));
                    refreshing += 1;
                } else if proxy.cache.store.remove_version(&key, entry.id) {
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
