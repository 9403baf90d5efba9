//! Header rewriting between downstream and upstream: hop-by-hop fields (RFC 9110 §7.6.1) are
//! removed in both directions, and `X-Forwarded-*` are set from the real connection, keeping
//! the values a trusted proxy in front of us (nginx) supplied.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::config::IpNet;

/// Fields that describe one connection, never the message (RFC 9110 §7.6.1), plus the
/// obsolete `Proxy-Connection` and `Keep-Alive`.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub const X_CACHE_STATUS: HeaderName = HeaderName::from_static("x-cache-status");
/// RFC 9211.
pub const CACHE_STATUS: HeaderName = HeaderName::from_static("cache-status");
pub const CLEAR_CACHE: HeaderName = HeaderName::from_static("clear-cache");
pub const CLEAR_CACHE_KEY: HeaderName = HeaderName::from_static("clear-cache-key");
pub const CLEAR_CACHE_SCOPE: HeaderName = HeaderName::from_static("clear-cache-scope");

/// Removes hop-by-hop fields, including those named by `Connection`, and `Upgrade` (we do
/// not tunnel protocol upgrades).
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for name in named.iter().chain(HOP_BY_HOP.iter()) {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// Rewrites `X-Forwarded-For/-Proto/-Host` for the upstream. From a trusted peer the chain
/// is extended; from anyone else client-supplied values are replaced, so a client cannot
/// forge its address.
pub fn set_forwarded(headers: &mut HeaderMap, peer: IpAddr, trusted: &[IpNet]) {
    let peer_trusted = trusted.iter().any(|net| net.contains(peer));
    strip_unkeyed_overrides(headers, peer_trusted);
    let peer_str = peer.to_string();
    let xff = match headers.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prior) if peer_trusted && !prior.trim().is_empty() => {
            format!("{}, {peer_str}", prior.trim())
        }
        _ => peer_str,
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert(X_FORWARDED_FOR, v);
    }
    if !peer_trusted || !headers.contains_key(X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    }
    if !peer_trusted || !headers.contains_key(X_FORWARDED_HOST) {
        match headers.get(header::HOST).cloned() {
            Some(host) => headers.insert(X_FORWARDED_HOST, host),
            None => headers.remove(X_FORWARDED_HOST),
        };
    }
}

/// Request headers that make many origins and frameworks serve a *different* resource (or
/// believe another scheme, host or method) but are not part of the cache key: a client could
/// use them to poison the cache entry everyone else reads. Never forwarded; edgecache sets
/// `X-Forwarded-*` itself.
const UNKEYED_OVERRIDES: [HeaderName; 10] = [
    HeaderName::from_static("x-original-url"),
    HeaderName::from_static("x-rewrite-url"),
    HeaderName::from_static("x-forwarded-scheme"),
    HeaderName::from_static("x-forwarded-server"),
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("x-forwarded-prefix"),
    HeaderName::from_static("x-host"),
    HeaderName::from_static("x-http-method-override"),
    HeaderName::from_static("x-http-method"),
    HeaderName::from_static("x-method-override"),
];

/// Removes `UNKEYED_OVERRIDES`, and `Forwarded` unless the peer is a trusted proxy.
pub fn strip_unkeyed_overrides(headers: &mut HeaderMap, peer_trusted: bool) {
    for name in &UNKEYED_OVERRIDES {
        headers.remove(name);
    }
    if !peer_trusted {
        headers.remove(header::FORWARDED);
    }
}

/// Headers a client sends that must not reach the upstream on a fetch meant to fill the
/// cache: its own preconditions and ranges (we want the complete, current representation).
pub fn strip_client_conditionals(headers: &mut HeaderMap) {
    for name in [
        header::IF_NONE_MATCH,
        header::IF_MODIFIED_SINCE,
        header::IF_MATCH,
        header::IF_UNMODIFIED_SINCE,
        header::IF_RANGE,
        header::RANGE,
    ] {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trusted() -> Vec<IpNet> {
        crate::config::Config::from_lookup(|k| {
            (k == "UPSTREAM_URL").then(|| "http://127.0.0.1:1".to_string())
        })
        .unwrap()
        .trusted_proxies
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named_fields() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert(header::ETAG, HeaderValue::from_static("\"a\""));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key(header::ETAG));
    }

    #[test]
    fn untrusted_peer_cannot_forge_forwarded_for() {
        let mut h = HeaderMap::new();
        h.insert(X_FORWARDED_FOR, HeaderValue::from_static("1.2.3.4"));
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        h.insert(header::HOST, HeaderValue::from_static("example.com"));
        set_forwarded(&mut h, "203.0.113.9".parse().unwrap(), &trusted());
        assert_eq!(h[X_FORWARDED_FOR], "203.0.113.9");
        assert_eq!(h[X_FORWARDED_PROTO], "http");
        assert_eq!(h[X_FORWARDED_HOST], "example.com");
    }

    #[test]
    fn trusted_peer_extends_the_chain() {
        let mut h = HeaderMap::new();
        h.insert(X_FORWARDED_FOR, HeaderValue::from_static("1.2.3.4"));
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        set_forwarded(&mut h, "127.0.0.1".parse().unwrap(), &trusted());
        assert_eq!(h[X_FORWARDED_FOR], "1.2.3.4, 127.0.0.1");
        assert_eq!(h[X_FORWARDED_PROTO], "https");
    }
}
