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

/// Who sent a request: the TCP peer and whether it is a trusted proxy (`TRUSTED_PROXIES`).
/// The client address behind it ([`Downstream::client`]) is derived from both when needed
/// (admin throttle, access log), not on every cache hit.
#[derive(Debug, Clone, Copy)]
pub struct Downstream<'a> {
    pub peer: IpAddr,
    pub peer_trusted: bool,
    trusted: &'a [IpNet],
}

impl<'a> Downstream<'a> {
    pub fn new(peer: IpAddr, trusted: &'a [IpNet]) -> Self {
        Downstream {
            peer,
            peer_trusted: trusted.iter().any(|net| net.contains(peer)),
            trusted,
        }
    }

    /// The client's address. From a trusted peer, the rightmost `X-Forwarded-For` entry that
    /// is not itself a trusted proxy (as nginx's `real_ip_recursive`); from anyone else, the
    /// peer. An entry that is not an address stops the walk at the proxy that added it.
    pub fn client(&self, headers: &HeaderMap) -> IpAddr {
        let mut client = self.peer;
        if !self.peer_trusted {
            return client;
        }
        let entries = headers
            .get_all(X_FORWARDED_FOR)
            .iter()
            .rev()
            .flat_map(|v| v.to_str().unwrap_or("").rsplit(','));
        for entry in entries {
            let entry = entry.trim();
            if entry.is_empty() {
                continue;
            }
            match parse_forwarded_ip(entry) {
                Some(ip) => {
                    client = ip;
                    if !self.trusted.iter().any(|net| net.contains(ip)) {
                        break;
                    }
                }
                None => break,
            }
        }
        client
    }
}

/// An `X-Forwarded-For` member: an address, possibly `[v6]`, `v4:port` or `[v6]:port`.
fn parse_forwarded_ip(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse() {
        return Some(ip);
    }
    if let Ok(sa) = s.parse::<std::net::SocketAddr>() {
        return Some(sa.ip());
    }
    s.strip_prefix('[')?.strip_suffix(']')?.parse().ok()
}

/// Rewrites `X-Forwarded-For/-Proto/-Host` for the upstream. From a trusted peer the
/// `X-Forwarded-For` chain is extended; from anyone else client-supplied values are replaced,
/// so a client cannot forge its address. `X-Forwarded-Proto` / `-Host` always say `origin`,
/// the normalised origin the response is keyed by ([`crate::cache::key::request_origin`]), so
/// nothing the upstream reads about the host is outside the key.
pub fn set_forwarded(headers: &mut HeaderMap, down: &Downstream<'_>, origin: &str) {
    strip_unkeyed_overrides(headers);
    let peer_str = down.peer.to_string();
    let xff = match headers.get(X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prior) if down.peer_trusted && !prior.trim().is_empty() => {
            format!("{}, {peer_str}", prior.trim())
        }
        _ => peer_str,
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert(X_FORWARDED_FOR, v);
    }
    set_forwarded_origin(headers, origin);
}

/// Sets `X-Forwarded-Proto` and `X-Forwarded-Host` from a normalised origin
/// (`scheme://host`); without a host, `X-Forwarded-Host` is removed.
pub fn set_forwarded_origin(headers: &mut HeaderMap, origin: &str) {
    let (scheme, host) = origin.split_once("://").unwrap_or(("http", origin));
    let proto = if scheme == "https" { "https" } else { "http" };
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(proto));
    match HeaderValue::from_str(host)
        .ok()
        .filter(|_| !host.is_empty())
    {
        Some(host) => headers.insert(X_FORWARDED_HOST, host),
        None => headers.remove(X_FORWARDED_HOST),
    };
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

/// Removes `UNKEYED_OVERRIDES` and `Forwarded` (whose `host=` / `proto=` would be unkeyed
/// too: edgecache sends `X-Forwarded-*` from the keyed origin instead).
pub fn strip_unkeyed_overrides(headers: &mut HeaderMap) {
    for name in &UNKEYED_OVERRIDES {
        headers.remove(name);
    }
    headers.remove(header::FORWARDED);
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

    fn client(peer: &str, h: &HeaderMap) -> IpAddr {
        Downstream::new(peer.parse().unwrap(), &trusted()).client(h)
    }

    #[test]
    fn untrusted_peer_cannot_forge_forwarded_for() {
        let mut h = HeaderMap::new();
        h.insert(X_FORWARDED_FOR, HeaderValue::from_static("1.2.3.4"));
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        h.insert(header::HOST, HeaderValue::from_static("example.com"));
        h.insert(header::FORWARDED, HeaderValue::from_static("host=evil"));
        let trusted = trusted();
        let d = Downstream::new("203.0.113.9".parse().unwrap(), &trusted);
        assert_eq!(d.client(&h), "203.0.113.9".parse::<IpAddr>().unwrap());
        set_forwarded(&mut h, &d, "http://example.com");
        assert_eq!(h[X_FORWARDED_FOR], "203.0.113.9");
        assert_eq!(h[X_FORWARDED_PROTO], "http");
        assert_eq!(h[X_FORWARDED_HOST], "example.com");
        assert!(!h.contains_key(header::FORWARDED));
    }

    #[test]
    fn trusted_peer_extends_the_chain() {
        let mut h = HeaderMap::new();
        h.insert(X_FORWARDED_FOR, HeaderValue::from_static("1.2.3.4"));
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
        let trusted = trusted();
        let d = Downstream::new("127.0.0.1".parse().unwrap(), &trusted);
        set_forwarded(&mut h, &d, "https://a.example");
        assert_eq!(h[X_FORWARDED_FOR], "1.2.3.4, 127.0.0.1");
        assert_eq!(h[X_FORWARDED_PROTO], "https");
        assert_eq!(h[X_FORWARDED_HOST], "a.example");
    }

    #[test]
    fn client_address_is_the_rightmost_untrusted_forwarded_entry() {
        let xff = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(X_FORWARDED_FOR, HeaderValue::from_static(v));
            h
        };
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // Behind nginx: the client nginx saw.
        assert_eq!(client("127.0.0.1", &xff("203.0.113.7")), ip("203.0.113.7"));
        // A client-forged entry on the left is not believed: the rightmost untrusted wins.
        assert_eq!(
            client("127.0.0.1", &xff("6.6.6.6, 203.0.113.7")),
            ip("203.0.113.7")
        );
        // Trusted hops are skipped; ports and brackets are understood.
        assert_eq!(
            client("::1", &xff("198.51.100.1:5000, 127.0.0.1")),
            ip("198.51.100.1")
        );
        assert_eq!(
            client("127.0.0.1", &xff("[2001:db8::1]:443")),
            ip("2001:db8::1")
        );
        // Garbage stops the walk at the proxy that passed it on.
        assert_eq!(
            client("127.0.0.1", &xff("203.0.113.7, junk")),
            ip("127.0.0.1")
        );
        // An untrusted peer is the client, whatever it says.
        assert_eq!(client("203.0.113.9", &xff("1.2.3.4")), ip("203.0.113.9"));
        assert_eq!(client("127.0.0.1", &HeaderMap::new()), ip("127.0.0.1"));
    }
}
