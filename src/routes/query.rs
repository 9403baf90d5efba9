//! Query strings: parameters left out of the cache key (`key_query_ignore`) and the
//! `cache-control` query parameter read as request directives (`query_cache_control`).
//!
//! Queries are taken without the leading `?`, split on `&`; a parameter's name is what comes
//! before its first `=` (the whole parameter when it has none), compared as it is written
//! (not percent-decoded, case-sensitive for `key_query_ignore`). Kept parameters keep their
//! order and exact bytes, empty ones (`a=1&&b=2`) included.

use std::borrow::Cow;

/// Glob patterns over query parameter names; `*` matches any run of characters (none
/// included), anywhere in the pattern: `utm_*`, `*_ts`, `*`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueryFilter {
    patterns: Vec<Box<str>>,
}

impl QueryFilter {
    pub(super) fn new(patterns: Vec<String>) -> Self {
        QueryFilter {
            patterns: patterns.into_iter().map(String::into_boxed_str).collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.patterns.is_empty()
    }

    /// The patterns, as written in the file.
    pub fn patterns(&self) -> impl Iterator<Item = &str> {
        self.patterns.iter().map(|p| &**p)
    }

    /// Whether the parameter named `name` is left out of the key.
    pub fn matches(&self, name: &str) -> bool {
        self.patterns
            .iter()
            .any(|p| glob_match(p.as_bytes(), name.as_bytes()))
    }

    /// `query` without the parameters whose name matches; borrowed (no allocation) when none
    /// does. `""` when every parameter went.
    pub fn filter<'q>(&self, query: &'q str) -> Cow<'q, str> {
        if self.patterns.is_empty() || !query.split('&').any(|p| self.matches(name(p))) {
            return Cow::Borrowed(query);
        }
        Cow::Owned(join_kept(query, |p| !self.matches(name(p))))
    }
}

/// A parameter's name: up to its first `=`.
fn name(param: &str) -> &str {
    param.split_once('=').map_or(param, |(n, _)| n)
}

/// The parameters of `query` that `keep` accepts, joined by `&` in their order.
fn join_kept(query: &str, keep: impl Fn(&str) -> bool) -> String {
    let mut out = String::with_capacity(query.len());
    let mut first = true;
    for param in query.split('&').filter(|p| keep(p)) {
        if !first {
            out.push('&');
        }
        first = false;
        out.push_str(param);
    }
    out
}

/// Whether `text` matches `pattern`, where `*` stands for any run of bytes. Linear in
/// practice: on a mismatch only the last `*` is backtracked to.
pub fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    let (mut p, mut t) = (0, 0);
    // The position after the last `*` seen, and where in `text` it was tried from.
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p + 1, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((after, from)) = star {
            // Let the `*` take one more byte and try the rest again.
            p = after;
            t = from + 1;
            star = Some((after, from + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&b| b == b'*')
}

/// The `cache-control` query parameter, taken out of a query (`query_cache_control`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryDirectives<'q> {
    /// The parameter's value, percent-decoded (`+` as a space, as in HTML forms); several
    /// occurrences joined by `, ` as repeated header lines would be. Bytes that are not UTF-8
    /// after decoding are replaced (U+FFFD), so a parser sees an unknown directive.
    pub directives: String,
    /// The query without it (exact bytes of the other parameters; `""` when none is left).
    pub rest: Cow<'q, str>,
}

/// Reads the `cache-control` parameter (name compared ASCII-case-insensitively) as request
/// directives, as a Go caching proxy's `?cache-control=no-cache` interface does. `None`
/// (no allocation) when the query has none.
pub fn take_cache_control(query: &str) -> Option<QueryDirectives<'_>> {
    let is_cc = |p: &str| name(p).eq_ignore_ascii_case("cache-control");
    if !query.split('&').any(is_cc) {
        return None;
    }
    let mut directives = String::new();
    for param in query.split('&').filter(|p| is_cc(p)) {
        let value = param.split_once('=').map_or("", |(_, v)| v);
        if !directives.is_empty() && !value.is_empty() {
            directives.push_str(", ");
        }
        directives.push_str(&String::from_utf8_lossy(&percent_decode(value)));
    }
    Some(QueryDirectives {
        directives,
        rest: Cow::Owned(join_kept(query, |p| !is_cc(p))),
    })
}

/// `application/x-www-form-urlencoded` decoding: `%XX` to its byte, `+` to a space; a `%` not
/// followed by two hex digits is kept as it is.
fn percent_decode(s: &str) -> Vec<u8> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => match (
                bytes.get(i + 1).and_then(|&b| hex(b)),
                bytes.get(i + 2).and_then(|&b| hex(b)),
            ) {
                (Some(hi), Some(lo)) => {
                    out.push(hi << 4 | lo);
                    i += 3;
                    continue;
                }
                _ => out.push(b'%'),
            },
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    out
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(patterns: &[&str]) -> QueryFilter {
        QueryFilter::new(patterns.iter().map(|p| p.to_string()).collect())
    }

    #[test]
    fn globs() {
        let cases = [
            ("utm_*", "utm_source", true),
            ("utm_*", "utm_", true),
            ("utm_*", "xutm_source", false),
            ("*_ts", "cache_ts", true),
            ("*_ts", "cache_tsx", false),
            ("a*b*c", "aXXbYYc", true),
            ("a*b*c", "abc", true),
            ("a*b*c", "acb", false),
            ("*", "", true),
            ("*", "anything", true),
            ("exact", "exact", true),
            ("exact", "exac", false),
            ("exact", "exactly", false),
            ("**x", "yx", true),
            ("a*a*a*a*b", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", false),
        ];
        for (pattern, text, want) in cases {
            assert_eq!(
                glob_match(pattern.as_bytes(), text.as_bytes()),
                want,
                "{pattern} vs {text}"
            );
        }
    }

    #[test]
    fn filter_removes_matching_parameters_and_keeps_the_rest_byte_for_byte() {
        let f = filter(&["utm_*", "fbclid"]);
        assert_eq!(
            f.filter("b=2&utm_source=x&a=%20+1&fbclid=9&utm_medium"),
            "b=2&a=%20+1"
        );
        assert_eq!(f.filter("utm_a=1&utm_b=2"), "");
        // Empty parameters and ones without `=` are kept as written.
        assert_eq!(f.filter("a&&utm_x=1&b="), "a&&b=");
        // Names are compared as written, not decoded.
        assert_eq!(f.filter("utm%5Fsource=1"), "utm%5Fsource=1");
    }

    #[test]
    fn filter_borrows_when_nothing_matches() {
        let f = filter(&["utm_*"]);
        assert!(matches!(f.filter("a=1&b=2"), Cow::Borrowed("a=1&b=2")));
        assert!(matches!(f.filter(""), Cow::Borrowed("")));
        assert!(matches!(
            QueryFilter::default().filter("utm_x=1"),
            Cow::Borrowed("utm_x=1")
        ));
        // A value that looks like a pattern match does not count: only names do.
        assert!(matches!(f.filter("a=utm_x"), Cow::Borrowed(_)));
    }

    #[test]
    fn cache_control_parameter_is_decoded_and_taken_out() {
        let d = take_cache_control("a=1&cache-control=max-age%3D0%2C+no-cache&b=2").unwrap();
        assert_eq!(d.directives, "max-age=0, no-cache");
        assert_eq!(d.rest, "a=1&b=2");

        let d = take_cache_control("Cache-Control=no-store").unwrap();
        assert_eq!(d.directives, "no-store");
        assert_eq!(d.rest, "");

        // Repeated: joined like repeated header lines; a broken escape is kept.
        let d =
            take_cache_control("cache-control=no-cache&x=%zz&cache-control=max-age=5%").unwrap();
        assert_eq!(d.directives, "no-cache, max-age=5%");
        assert_eq!(d.rest, "x=%zz");

        // Without a value.
        let d = take_cache_control("cache-control&a").unwrap();
        assert_eq!(d.directives, "");
        assert_eq!(d.rest, "a");

        assert_eq!(take_cache_control("a=1&cache-controls=x"), None);
        assert_eq!(take_cache_control(""), None);
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("a%2Cb+c%2c"), b"a,b c,");
        assert_eq!(percent_decode("%"), b"%");
        assert_eq!(percent_decode("%4"), b"%4");
        assert_eq!(percent_decode("%ff"), [0xff]);
    }
}
