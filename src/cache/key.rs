//! Cache keys. The primary key is the request's effective URI: the normalised origin the
//! upstream is told about (`scheme://host[:port]`, see [`request_origin`]) followed by the
//! target's path **and query** (the proxy this replaces keyed by path only, so `/x?a=1` and
//! `/x?a=2` collided, and `Host: evil.example` could decide what everyone got under `/x`).
//! GET and HEAD share it. The secondary key is the request's values of the headers the
//! stored response's `Vary` names (RFC 9111 §4.1), held by [`VaryKey`].

use http::{HeaderMap, HeaderName, HeaderValue, Uri};

/// A stored primary key, shared by the map slot, the entry's eviction node and its expiry
/// slot (and by timers and flights, so none of them copies the string). A thin pointer,
/// [`arcstr::ArcStr`]: the length and the reference count sit in the allocation in front of
/// the bytes, so a holder is 8 bytes where `Arc<str>` (pointer and length) is 16 — saved in
/// every map slot, eviction node and expiry slot. It borrows as `str` (same hash and
/// equality), so the map is still looked up by `&str`.
pub type Key = arcstr::ArcStr;

/// The path and query of a request target, as received (`/` when absent).
pub fn path_and_query(uri: &Uri) -> &str {
    uri.path_and_query().map(|pq| pq.as_str()).unwrap_or("/")
}

/// The primary cache key of a request: its origin (see [`request_origin`]) followed by the
/// target's path and query, built in one allocation (this runs for every request).
pub fn request_key(
    uri: &Uri,
    headers: &HeaderMap,
    peer_trusted: bool,
) -> Result<String, BadOrigin> {
    let pq = path_and_query(uri);
    let mut key = String::with_capacity(32 + pq.len());
    push_origin(&mut key, uri, headers, peer_trusted)?;
    key.push_str(pq);
    Ok(key)
}

/// Splits a primary key into its origin (`scheme://host`) and its path and query.
pub fn split_key(key: &str) -> (&str, &str) {
    let after_scheme = key.find("://").map_or(0, |i| i + 3);
    match key[after_scheme..].find(['/', '*']) {
        Some(i) => key.split_at(after_scheme + i),
        None => (key, ""),
    }
}

/// The host part of an origin (`https://example.com:8443` → `example.com:8443`).
pub fn origin_host(origin: &str) -> &str {
    origin.split_once("://").map_or(origin, |(_, h)| h)
}

/// Why a request's host or scheme was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadOrigin {
    /// The host (from the target, `Host` or a trusted `X-Forwarded-Host`) is not a valid
    /// `host[:port]`.
    Host,
    /// A trusted `X-Forwarded-Proto` that is neither `http` nor `https`.
    Scheme,
}

/// The origin a request addresses, normalised (`scheme://host[:port]`: lower case, the
/// scheme's default port dropped, no user info), exactly as it is keyed and as it is told to
/// the upstream in `X-Forwarded-Host` / `X-Forwarded-Proto`.
///
/// From a trusted proxy (`peer_trusted`), its `X-Forwarded-Proto` / `X-Forwarded-Host` (the
/// first member of a list) are used; otherwise the scheme is `http` and the host is the
/// absolute-form target's authority or the `Host` header (RFC 9112 §3.2.2). A request with no
/// host at all (HTTP/1.0) has an empty host.
pub fn request_origin(
    uri: &Uri,
    headers: &HeaderMap,
    peer_trusted: bool,
) -> Result<String, BadOrigin> {
    let mut origin = String::new();
    push_origin(&mut origin, uri, headers, peer_trusted)?;
    Ok(origin)
}

const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Appends the normalised origin of a request to `out` ([`request_origin`]).
fn push_origin(
    out: &mut String,
    uri: &Uri,
    headers: &HeaderMap,
    peer_trusted: bool,
) -> Result<(), BadOrigin> {
    let forwarded = |name: &HeaderName| {
        if !peer_trusted {
            return None;
        }
        headers
            .get(name)
            .map(|v| first_member(v.as_bytes()))
            .filter(|v| !v.is_empty())
    };
    let https = match forwarded(&X_FORWARDED_PROTO) {
        None => false,
        Some(p) if p.eq_ignore_ascii_case(b"http") => false,
        Some(p) if p.eq_ignore_ascii_case(b"https") => true,
        Some(_) => return Err(BadOrigin::Scheme),
    };
    let host: &[u8] = match forwarded(&X_FORWARDED_HOST) {
        Some(h) => h,
        None => match uri.authority() {
            Some(a) => a.as_str().as_bytes(),
            None => headers
                .get(http::header::HOST)
                .map_or(&b""[..], |h| trim(h.as_bytes())),
        },
    };
    out.push_str(if https { "https://" } else { "http://" });
    if host.is_empty() {
        return Ok(());
    }
    // `host [ ":" port ]` (RFC 9110 §7.2): an IP-literal in brackets or a reg-name / IPv4,
    // never user info; checked and lower-cased in one pass.
    let (name, port) = if host[0] == b'[' {
        let end = host
            .iter()
            .position(|&b| b == b']')
            .ok_or(BadOrigin::Host)?;
        let (name, rest) = host.split_at(end + 1);
        let inner = &name[1..end];
        if inner.is_empty()
            || !inner
                .iter()
                .all(|b| b.is_ascii_hexdigit() || b":.".contains(b))
        {
            return Err(BadOrigin::Host);
        }
        match rest {
            [] => (name, None),
            [b':', port @ ..] => (name, Some(port)),
            _ => return Err(BadOrigin::Host),
        }
    } else {
        match host.iter().rposition(|&b| b == b':') {
            Some(i) => (&host[..i], Some(&host[i + 1..])),
            None => (host, None),
        }
    };
    if name.is_empty() || (name[0] != b'[' && !name.iter().all(|&b| is_reg_name(b))) {
        return Err(BadOrigin::Host);
    }
    let port = match port {
        None | Some([]) => None,
        Some(digits) => {
            let digits = std::str::from_utf8(digits).map_err(|_| BadOrigin::Host)?;
            Some(digits.parse::<u16>().map_err(|_| BadOrigin::Host)?)
        }
    };
    // Only ASCII passed the checks above.
    out.extend(name.iter().map(|&b| char::from(b.to_ascii_lowercase())));
    match port {
        Some(80) if !https => {}
        Some(443) if https => {}
        Some(port) => {
            out.push(':');
            out.push_str(itoa_u16(port, &mut [0; 5]));
        }
        None => {}
    }
    Ok(())
}

/// RFC 3986 `reg-name` characters (unreserved, sub-delims, percent-encoding).
fn is_reg_name(b: u8) -> bool {
    const TABLE: [bool; 256] = {
        let mut t = [false; 256];
        let mut i = 0;
        while i < 256 {
            let c = i as u8;
            t[i] = c.is_ascii_alphanumeric();
            i += 1;
        }
        let extra = b"-._~%!$&'()*+,;=";
        let mut j = 0;
        while j < extra.len() {
            t[extra[j] as usize] = true;
            j += 1;
        }
        t
    };
    TABLE[usize::from(b)]
}

fn itoa_u16(mut n: u16, buf: &mut [u8; 5]) -> &str {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    std::str::from_utf8(&buf[i..]).unwrap_or("0")
}

/// Whether `host` (an origin's host, possibly with a port) is matched by one of `allowed`:
/// exact names, or `.example.com` / `*.example.com` for the domain and all its subdomains.
/// Ports are ignored, as Django's `ALLOWED_HOSTS` does.
pub fn host_allowed(host: &str, allowed: &[String]) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(v6),
        None => host.split(':').next().unwrap_or(host),
    };
    let name = name.trim_end_matches('.');
    allowed.iter().any(|a| {
        let a = a.trim_end_matches('.');
        match a.strip_prefix("*.").or_else(|| a.strip_prefix('.')) {
            Some(domain) => {
                name.eq_ignore_ascii_case(domain)
                    || name.len() > domain.len() + 1
                        && name.as_bytes()[name.len() - domain.len() - 1] == b'.'
                        && name[name.len() - domain.len()..].eq_ignore_ascii_case(domain)
            }
            None => name.eq_ignore_ascii_case(a.trim_start_matches('[').trim_end_matches(']')),
        }
    })
}

fn first_member(v: &[u8]) -> &[u8] {
    trim(v.split(|&b| b == b',').next().unwrap_or(v))
}

/// The request header values a stored variant was selected by. A response without `Vary`
/// (most of them) keeps no allocation and one pointer.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VaryKey(Option<Box<VaryParts>>);

#[derive(Debug, Clone, PartialEq, Eq)]
struct VaryParts {
    names: Box<[HeaderName]>,
    /// Normalised values, one per name; `None` when the request lacked the header (which
    /// differs from an empty header, RFC 9111 §4.1).
    values: Box<[Option<Box<[u8]>>]>,
}

impl VaryKey {
    /// Captures `req`'s values for the header names listed by a response's `Vary`.
    pub fn capture<'a>(names: impl Iterator<Item = &'a str>, req: &HeaderMap) -> Self {
        let names: Box<[HeaderName]> = names
            .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok())
            .collect();
        let values = names.iter().map(|n| normalized(req, n)).collect();
        VaryKey::new(names, values)
    }

    fn new(names: Box<[HeaderName]>, values: Box<[Option<Box<[u8]>>]>) -> Self {
        VaryKey((!names.is_empty()).then(|| Box::new(VaryParts { names, values })))
    }

    /// A key from its parts as [`Self::names`] and [`Self::values`] give them (a stored
    /// variant read back, [`super::codec`]); `None` unless there is one value per name.
    pub fn from_parts(names: Vec<HeaderName>, values: Vec<Option<Box<[u8]>>>) -> Option<Self> {
        (names.len() == values.len()).then(|| VaryKey::new(names.into(), values.into()))
    }

    /// The header names this key varies on.
    pub fn names(&self) -> &[HeaderName] {
        self.0.as_ref().map_or(&[], |p| &p.names)
    }

    fn stored(&self) -> &[Option<Box<[u8]>>] {
        self.0.as_ref().map_or(&[], |p| &p.values)
    }

    /// The captured (normalised) request values, one per name in [`Self::names`]' order;
    /// `None` where the request lacked the header.
    pub fn values(&self) -> impl ExactSizeIterator<Item = Option<&[u8]>> + '_ {
        self.stored().iter().map(|v| v.as_deref())
    }

    /// Whether a request selects this variant.
    pub fn matches(&self, req: &HeaderMap) -> bool {
        self.names()
            .iter()
            .zip(self.stored())
            .all(|(name, stored)| normalized(req, name).as_deref() == stored.as_deref())
    }

    /// Same header names (the origin's `Vary` did not change).
    pub fn same_names(&self, other: &VaryKey) -> bool {
        self.names() == other.names()
    }

    /// Approximate heap bytes, for size accounting.
    pub fn heap_size(&self) -> usize {
        self.names().iter().map(|n| n.as_str().len()).sum::<usize>()
            + self
                .stored()
                .iter()
                .map(|v| v.as_ref().map_or(0, |v| v.len()))
                .sum::<usize>()
    }

    /// Request headers that reproduce this variant on a background refresh (and nothing else:
    /// refreshes never carry another client's credentials).
    pub fn request_headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in self.names().iter().zip(self.stored()) {
            if let Some(v) = value.as_ref().and_then(|v| HeaderValue::from_bytes(v).ok()) {
                h.insert(name.clone(), v);
            }
        }
        h
    }
}

/// Appends `\0name=value` for each name to `out`: distinguishes single-flight keys of
/// requests that would select different variants.
pub fn push_flight_suffix(out: &mut String, names: &[HeaderName], req: &HeaderMap) {
    for name in names {
        out.push('\0');
        out.push_str(name.as_str());
        out.push('=');
        if let Some(v) = normalized(req, name) {
            out.push_str(&String::from_utf8_lossy(&v));
        }
    }
}

/// The request's value of `name` in a canonical form (RFC 9111 §4.1 allows normalising
/// values known to be equivalent): all lines combined into one comma-separated list, with
/// whitespace around members removed. For the `Accept-Encoding` / `Accept-Language` lists,
/// whose tokens are case-insensitive, members are also lowercased and sorted.
fn normalized(req: &HeaderMap, name: &HeaderName) -> Option<Box<[u8]>> {
    let mut lines = req.get_all(name).iter().peekable();
    lines.peek()?;
    let mut members: Vec<Vec<u8>> = Vec::new();
    for line in lines {
        for member in line.as_bytes().split(|&b| b == b',') {
            let member = trim(member);
            if !member.is_empty() {
                members.push(member.to_vec());
            }
        }
    }
    if *name == http::header::ACCEPT_ENCODING || *name == http::header::ACCEPT_LANGUAGE {
        for m in &mut members {
            m.make_ascii_lowercase();
            m.retain(|b| !b.is_ascii_whitespace());
        }
        members.sort();
    }
    Some(members.join(&b", "[..]).into_boxed_slice())
}

fn trim(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| !b.is_ascii_whitespace())
        .map_or(start, |e| e + 1);
    &v[start..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        m
    }

    #[test]
    fn query_is_part_of_the_key() {
        let key = |target: &str| {
            request_key(&target.parse().unwrap(), &h(&[("host", "h")]), false).unwrap()
        };
        assert_ne!(key("/x?a=1"), key("/x?a=2"));
        assert_eq!(key("/x?a=1"), "http://h/x?a=1");
        assert_eq!(key("http://H:80/x?a=1"), "http://h/x?a=1");
        assert_eq!(split_key("http://h/x?a=1"), ("http://h", "/x?a=1"));
        assert_eq!(split_key("https:///x"), ("https://", "/x"));
        assert_eq!(split_key("http://[::1]:8080/"), ("http://[::1]:8080", "/"));
        assert_eq!(origin_host("https://h:1"), "h:1");
    }

    fn origin(target: &str, pairs: &[(&str, &str)], trusted: bool) -> Result<String, BadOrigin> {
        request_origin(&target.parse().unwrap(), &h(pairs), trusted)
    }

    #[test]
    fn origins_are_normalised_and_only_trusted_peers_forward_them() {
        let ok = |o: &str| Ok(o.to_string());
        assert_eq!(
            origin("/x", &[("host", "Example.COM:80")], false),
            ok("http://example.com")
        );
        assert_eq!(
            origin("/x", &[("host", "example.com:8080")], false),
            ok("http://example.com:8080")
        );
        assert_eq!(
            origin("http://A.example/x", &[("host", "b")], false),
            ok("http://a.example")
        );
        assert_eq!(origin("/x", &[], false), ok("http://"));
        // An untrusted peer's X-Forwarded-* are not believed.
        let fwd = [
            ("host", "real"),
            ("x-forwarded-host", "evil"),
            ("x-forwarded-proto", "https"),
        ];
        assert_eq!(origin("/x", &fwd, false), ok("http://real"));
        assert_eq!(origin("/x", &fwd, true), ok("https://evil"));
        let list = [
            ("x-forwarded-host", " a.example:443 , b"),
            ("x-forwarded-proto", "HTTPS"),
        ];
        assert_eq!(origin("/x", &list, true), ok("https://a.example"));
        assert_eq!(
            origin("/x", &[("host", "[::1]:8000")], false),
            ok("http://[::1]:8000")
        );
        assert_eq!(origin("/x", &[("host", "h:")], false), ok("http://h"));
        assert_eq!(
            origin("/x", &[("host", "h:65535")], false),
            ok("http://h:65535")
        );
        for bad in [
            "a b",
            "user@host",
            "a/b",
            "h:99999",
            ":80",
            "h:8x",
            "[::1",
            "[zz]",
            "[::1]x",
            "é",
        ] {
            assert_eq!(
                origin("/x", &[("host", bad)], false),
                Err(BadOrigin::Host),
                "{bad}"
            );
        }
        assert_eq!(
            origin("/x", &[("x-forwarded-proto", "gopher")], true),
            Err(BadOrigin::Scheme)
        );
    }

    #[test]
    fn allowed_hosts() {
        let allowed = [
            "example.com".to_string(),
            ".example.org".into(),
            "*.test".into(),
        ];
        for (host, ok) in [
            ("example.com", true),
            ("EXAMPLE.com:8080", true),
            ("www.example.com", false),
            ("example.org", true),
            ("a.b.example.org", true),
            ("badexample.org", false),
            ("x.test", true),
            ("test", true),
            ("evil.example", false),
            ("", false),
        ] {
            assert_eq!(host_allowed(host, &allowed), ok, "{host}");
        }
        assert!(host_allowed("[::1]:80", &["[::1]".to_string()]));
    }

    #[test]
    fn vary_selects_variants() {
        let k = VaryKey::capture(
            ["accept-encoding"].into_iter(),
            &h(&[("accept-encoding", " gzip ")]),
        );
        assert!(k.matches(&h(&[("accept-encoding", "gzip")])));
        assert!(!k.matches(&h(&[("accept-encoding", "br")])));
        assert!(!k.matches(&h(&[])));
        let absent = VaryKey::capture(["accept-encoding"].into_iter(), &h(&[]));
        assert!(absent.matches(&h(&[])));
        assert!(
            !absent.matches(&h(&[("accept-encoding", "")])),
            "absent differs from empty"
        );
        let lang = VaryKey::capture(
            ["accept-language"].into_iter(),
            &h(&[("accept-language", "en, de")]),
        );
        assert!(lang.matches(&h(&[("accept-language", " De ,EN")])));
        assert!(!lang.matches(&h(&[("accept-language", "fr")])));
        let spaced = VaryKey::capture(["foo"].into_iter(), &h(&[("foo", "1,2")]));
        assert!(spaced.matches(&h(&[("foo", "1, 2")])));
        assert!(
            !spaced.matches(&h(&[("foo", "2, 1")])),
            "order matters for unknown fields"
        );
        let multi = VaryKey::capture(["x"].into_iter(), &h(&[("x", "a"), ("x", "b")]));
        assert!(multi.matches(&h(&[("x", "a, b")])));
        assert!(multi.matches(&h(&[("x", "a"), ("x", "b")])));
        assert_eq!(multi.request_headers().get("x").unwrap(), "a, b");
    }

    #[test]
    fn vary_key_rebuilds_from_its_parts() {
        let k = VaryKey::capture(
            ["accept-encoding", "x-absent", "x-empty"].into_iter(),
            &h(&[("accept-encoding", "GZIP, br"), ("x-empty", "")]),
        );
        let values: Vec<Option<&[u8]>> = k.values().collect();
        assert_eq!(values, [Some(&b"br, gzip"[..]), None, Some(&b""[..])]);
        let owned = values.iter().map(|v| v.map(Box::from)).collect();
        assert_eq!(
            VaryKey::from_parts(k.names().to_vec(), owned),
            Some(k.clone())
        );
        assert_eq!(VaryKey::from_parts(k.names().to_vec(), vec![None]), None);
        assert_eq!(
            VaryKey::from_parts(Vec::new(), Vec::new()),
            Some(VaryKey::default())
        );
    }
}
