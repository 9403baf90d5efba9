//! Cache keys. The primary key is the request target's path **and query** (the proxy this
//! replaces keyed by path only, so `/x?a=1` and `/x?a=2` collided). GET and HEAD share it.
//! The secondary key is the request's values of the headers the stored response's `Vary`
//! names (RFC 9111 §4.1), held by [`VaryKey`].

use http::{HeaderMap, HeaderName, HeaderValue, Uri};

/// The primary cache key of a request target: `path?query` exactly as received.
pub fn primary_key(uri: &Uri) -> &str {
    uri.path_and_query().map(|pq| pq.as_str()).unwrap_or("/")
}

/// The request header values a stored variant was selected by.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VaryKey {
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
        VaryKey { names, values }
    }

    /// The header names this key varies on.
    pub fn names(&self) -> &[HeaderName] {
        &self.names
    }

    /// Whether a request selects this variant.
    pub fn matches(&self, req: &HeaderMap) -> bool {
        self.names
            .iter()
            .zip(self.values.iter())
            .all(|(name, stored)| normalized(req, name).as_deref() == stored.as_deref())
    }

    /// Same header names (the origin's `Vary` did not change).
    pub fn same_names(&self, other: &VaryKey) -> bool {
        self.names == other.names
    }

    /// Approximate heap bytes, for size accounting.
    pub fn heap_size(&self) -> usize {
        self.names.iter().map(|n| n.as_str().len()).sum::<usize>()
            + self
                .values
                .iter()
                .map(|v| v.as_ref().map_or(0, |v| v.len()))
                .sum::<usize>()
    }

    /// Request headers that reproduce this variant on a background refresh (and nothing else:
    /// refreshes never carry another client's credentials).
    pub fn request_headers(&self) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in self.names.iter().zip(self.values.iter()) {
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
        let a: Uri = "/x?a=1".parse().unwrap();
        let b: Uri = "/x?a=2".parse().unwrap();
        assert_ne!(primary_key(&a), primary_key(&b));
        assert_eq!(primary_key(&"http://h/x?a=1".parse().unwrap()), "/x?a=1");
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
}
