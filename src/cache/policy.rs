//! RFC 9111 caching rules for a shared cache, as pure functions: header values and `now` in,
//! decisions out. No clock, no I/O, so every rule is a plain unit test.
//!
//! * [`CacheControl`] parses the `Cache-Control` field (§5.2).
//! * [`storability`] decides whether a response may be stored (§3, §3.5).
//! * [`freshness_lifetime`] computes how long it stays fresh (§4.2.1, §4.2.2).
//! * [`initial_age`] computes the corrected initial age (§4.2.3).

use std::time::{Duration, SystemTime};

use http::{header, HeaderMap, Method, StatusCode};

/// Largest delta-seconds value we keep; RFC 9111 §1.2.2: "a cache receiving a delta-seconds
/// value greater than the greatest integer it can represent … ought to consider the value to
/// be 2147483648 (2^31)".
const DELTA_SECONDS_MAX: u64 = 1 << 31;

/// Cap on heuristic freshness (10 % of the time since `Last-Modified`, RFC 9111 §4.2.2).
const HEURISTIC_MAX: Duration = Duration::from_secs(24 * 3600);

/// The directives of a `Cache-Control` field, request or response side.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CacheControl {
    pub no_store: bool,
    pub no_cache: bool,
    pub private: bool,
    pub public: bool,
    pub must_revalidate: bool,
    pub proxy_revalidate: bool,
    pub max_age: Option<u64>,
    pub s_maxage: Option<u64>,
    pub stale_while_revalidate: Option<u64>,
    pub stale_if_error: Option<u64>,
    pub only_if_cached: bool,
    /// RFC 9111 §5.2.2.3: store only if the status code is understood.
    pub must_understand: bool,
    /// Request `max-stale`; a bare `max-stale` (any staleness) is `u64::MAX`.
    pub max_stale: Option<u64>,
    pub min_fresh: Option<u64>,
    /// The directives came from a targeted field (RFC 9213), which replaces `Cache-Control`
    /// and `Expires` for this cache.
    pub targeted: bool,
}

/// Our own targeted field (RFC 9213): obeyed only by edgecache, removed before responding.
pub const EDGECACHE_CACHE_CONTROL: header::HeaderName =
    header::HeaderName::from_static("edgecache-cache-control");
/// The W3C Edge Architecture field for surrogates (reverse proxies), with per-target
/// directives; edgecache advertises itself upstream as [`SURROGATE_TARGET`] through
/// `Surrogate-Capability`.
pub const SURROGATE_CONTROL: header::HeaderName =
    header::HeaderName::from_static("surrogate-control");
/// Our device token in `Surrogate-Capability` / `Surrogate-Control` targets.
pub const SURROGATE_TARGET: &str = "edgecache";
/// The CDN-wide targeted field (RFC 9213).
pub const CDN_CACHE_CONTROL: header::HeaderName =
    header::HeaderName::from_static("cdn-cache-control");

impl CacheControl {
    /// Parses every `Cache-Control` line of `headers`. Unknown directives are ignored; the
    /// first occurrence of a duplicated directive wins; a delta-seconds directive with an
    /// invalid value is taken as `0` (RFC 9111 §4.2.1: invalid freshness means stale).
    pub fn parse(headers: &HeaderMap) -> Self {
        Self::parse_field(headers, &header::CACHE_CONTROL)
    }

    /// The directives governing a response for edgecache (RFC 9213 §2.2): the first targeted
    /// field present and valid — `Edgecache-Cache-Control`, then `CDN-Cache-Control` — else
    /// `Cache-Control`.
    pub fn for_response(headers: &HeaderMap) -> Self {
        for name in [
            &EDGECACHE_CACHE_CONTROL,
            &CDN_CACHE_CONTROL,
            &SURROGATE_CONTROL,
        ] {
            let valid = headers
                .get_all(name)
                .iter()
                .any(|v| v.to_str().is_ok_and(|v| directives(v).next().is_some()));
            if valid {
                let mut cc = Self::parse_field(headers, name);
                cc.targeted = true;
                return cc;
            }
        }
        Self::parse(headers)
    }

    /// Parses every line of the directive field `name`. In `Surrogate-Control` (W3C Edge
    /// Architecture) a directive may name its target after `;`: only untargeted directives
    /// and those targeted at [`SURROGATE_TARGET`] apply.
    pub fn parse_field(headers: &HeaderMap, name: &header::HeaderName) -> Self {
        let surrogate = name == SURROGATE_CONTROL;
        let mut cc = CacheControl::default();
        for line in headers.get_all(name) {
            let Ok(line) = line.to_str() else { continue };
            for (name, value) in directives(line) {
                if surrogate {
                    let (name, value, target) = split_target(name, value);
                    if target.is_none_or(|t| t.eq_ignore_ascii_case(SURROGATE_TARGET)) {
                        cc.apply(name, value);
                    }
                } else {
                    cc.apply(name, value);
                }
            }
        }
        cc
    }

    /// Records one directive. The first occurrence of a duplicated directive wins.
    fn apply(&mut self, name: &str, value: Option<&str>) {
        let seconds = || Some(value.map(parse_delta_seconds).unwrap_or(0));
        match name.to_ascii_lowercase().as_str() {
            "no-store" => self.no_store = true,
            // `no-cache="field"` and `private="field"` restrict fields, which we treat
            // conservatively as the unqualified directive.
            "no-cache" => self.no_cache = true,
            "private" => self.private = true,
            "public" => self.public = true,
            "must-revalidate" => self.must_revalidate = true,
            "proxy-revalidate" => self.proxy_revalidate = true,
            "only-if-cached" => self.only_if_cached = true,
            "must-understand" => self.must_understand = true,
            "max-age" => self.max_age = self.max_age.or_else(seconds),
            "s-maxage" => self.s_maxage = self.s_maxage.or_else(seconds),
            "stale-while-revalidate" => {
                self.stale_while_revalidate = self.stale_while_revalidate.or_else(seconds)
            }
            "stale-if-error" => self.stale_if_error = self.stale_if_error.or_else(seconds),
            "min-fresh" => self.min_fresh = self.min_fresh.or_else(seconds),
            "max-stale" => {
                let any = || Some(value.map_or(u64::MAX, parse_delta_seconds));
                self.max_stale = self.max_stale.or_else(any)
            }
            _ => {}
        }
    }

    /// RFC 9111 §5.2.2.8, §5.2.2.2, §5.2.2.10: a shared cache must not serve this response
    /// stale without revalidating it (`s-maxage` implies `proxy-revalidate`).
    pub fn forbids_stale(&self) -> bool {
        self.must_revalidate || self.proxy_revalidate || self.no_cache || self.s_maxage.is_some()
    }
}

/// Splits a `Surrogate-Control` directive `name[=value][;target]` into its parts.
fn split_target<'a>(
    name: &'a str,
    value: Option<&'a str>,
) -> (&'a str, Option<&'a str>, Option<&'a str>) {
    if let Some(v) = value {
        if let Some((v, t)) = v.split_once(';') {
            return (name, Some(v.trim()), Some(t.trim()));
        }
        return (name, Some(v), None);
    }
    match name.split_once(';') {
        Some((n, t)) => (n.trim(), None, Some(t.trim())),
        None => (name, None, None),
    }
}

/// Splits `a, b=1, c="x, y"` into `(name, value)` pairs, honouring quoted strings.
fn directives(line: &str) -> impl Iterator<Item = (&str, Option<&str>)> {
    let mut rest = line;
    std::iter::from_fn(move || loop {
        rest = rest.trim_start_matches([' ', '\t', ',']);
        if rest.is_empty() {
            return None;
        }
        let mut in_quotes = false;
        let mut end = rest.len();
        for (i, c) in rest.char_indices() {
            match c {
                '"' => in_quotes = !in_quotes,
                ',' if !in_quotes => {
                    end = i;
                    break;
                }
                _ => {}
            }
        }
        let item = &rest[..end];
        rest = &rest[end..];
        let (name, value) = match item.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
            None => (item.trim(), None),
        };
        if !name.is_empty() {
            return Some((name, value));
        }
    })
}

/// delta-seconds (RFC 9111 §1.2.2): digits only; overflow saturates at 2^31; anything else
/// is invalid and counts as 0.
fn parse_delta_seconds(v: &str) -> u64 {
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return 0;
    }
    v.parse::<u64>()
        .unwrap_or(DELTA_SECONDS_MAX)
        .min(DELTA_SECONDS_MAX)
}

/// Why a response is not stored. Low-cardinality labels for logs and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoStoreReason {
    Method,
    Status,
    RequestNoStore,
    NoStore,
    Private,
    Authorization,
    SetCookie,
    VaryStar,
    NoFreshnessOrValidator,
}

impl NoStoreReason {
    pub fn as_str(self) -> &'static str {
        match self {
            NoStoreReason::Method => "method",
            NoStoreReason::Status => "status",
            NoStoreReason::RequestNoStore => "request_no_store",
            NoStoreReason::NoStore => "no_store",
            NoStoreReason::Private => "private",
            NoStoreReason::Authorization => "authorization",
            NoStoreReason::SetCookie => "set_cookie",
            NoStoreReason::VaryStar => "vary_star",
            NoStoreReason::NoFreshnessOrValidator => "no_freshness",
        }
    }
}

/// Status codes that are cacheable by default (RFC 9110 §15.1), minus `206`, which we never
/// store (we keep complete representations only).
pub fn heuristically_cacheable(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// Status codes whose caching semantics RFC 9110 defines and edgecache implements.
pub fn understood(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200..=206 | 300..=305 | 307 | 308 | 400..=417 | 421 | 422 | 426 | 500..=505
    )
}

/// RFC 9111 §3 and §3.5: may a shared cache store this response?
///
/// `req_cc`/`resp_cc` are the parsed request and response `Cache-Control`; `has_freshness`
/// says whether [`freshness_lifetime`] found any freshness (explicit, default or heuristic),
/// `has_validator` whether the upstream sent `ETag` or `Last-Modified`.
pub fn storability(
    method: &Method,
    status: StatusCode,
    req_headers: &HeaderMap,
    req_cc: &CacheControl,
    resp_headers: &HeaderMap,
    resp_cc: &CacheControl,
    has_freshness: bool,
) -> Result<(), NoStoreReason> {
    if method != Method::GET {
        return Err(NoStoreReason::Method);
    }
    // Statuses outside the heuristically cacheable set need explicit freshness (§3). Server
    // errors need explicit lifetime from the origin (`max-age`, `s-maxage`, `Expires`):
    // `public`, heuristics and DEFAULT_CACHE_EXPIRY_TIME_SECS never keep an error around.
    let expires = !resp_cc.targeted && resp_headers.contains_key(header::EXPIRES);
    let explicit_lifetime = resp_cc.max_age.is_some() || resp_cc.s_maxage.is_some() || expires;
    let allowed = match status.as_u16() {
        206 | 304 | 100..=199 => false,
        501 => true,
        500..=599 => explicit_lifetime,
        _ => heuristically_cacheable(status) || explicit_lifetime || resp_cc.public,
    };
    if !allowed {
        return Err(NoStoreReason::Status);
    }
    if req_cc.no_store {
        return Err(NoStoreReason::RequestNoStore);
    }
    // §5.2.2.3: with must-understand, an understood status overrides no-store and an
    // unknown one is never stored.
    if resp_cc.must_understand && !understood(status) {
        return Err(NoStoreReason::Status);
    }
    if resp_cc.no_store && !resp_cc.must_understand {
        return Err(NoStoreReason::NoStore);
    }
    if resp_cc.private {
        return Err(NoStoreReason::Private);
    }
    // §3.5: a response to a request with Authorization is stored only when the origin says so.
    if req_headers.contains_key(header::AUTHORIZATION)
        && !(resp_cc.public || resp_cc.s_maxage.is_some() || resp_cc.must_revalidate)
    {
        return Err(NoStoreReason::Authorization);
    }
    // Set-Cookie personalises a response; share it only when the origin explicitly allows.
    if resp_headers.contains_key(header::SET_COOKIE)
        && !(resp_cc.public || resp_cc.s_maxage.is_some())
    {
        return Err(NoStoreReason::SetCookie);
    }
    if vary_names(resp_headers).any(|n| n == "*") {
        return Err(NoStoreReason::VaryStar);
    }
    let has_validator =
        resp_headers.contains_key(header::ETAG) || resp_headers.contains_key(header::LAST_MODIFIED);
    if !has_freshness && !has_validator {
        return Err(NoStoreReason::NoFreshnessOrValidator);
    }
    Ok(())
}

/// The field names listed by `Vary`, lowercased, in order.
pub fn vary_names(headers: &HeaderMap) -> impl Iterator<Item = String> + '_ {
    headers
        .get_all(header::VARY)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty())
}

/// Parses an HTTP-date header; `None` when absent or invalid.
pub fn http_date(headers: &HeaderMap, name: header::HeaderName) -> Option<SystemTime> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v.trim()).ok())
}

/// Where a freshness lifetime came from (for logs and tests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreshnessSource {
    SMaxAge,
    MaxAge,
    Expires,
    Default,
    Heuristic,
    None,
}

/// RFC 9111 §4.2.1: `s-maxage` > `max-age` > `Expires − Date`; then the operator's
/// `DEFAULT_CACHE_EXPIRY_TIME_SECS`; then, without it, the §4.2.2 heuristic for
/// heuristically cacheable statuses. `no-cache` forces zero (always revalidate).
/// `response_time` stands in for a missing or invalid `Date`.
pub fn freshness_lifetime(
    status: StatusCode,
    headers: &HeaderMap,
    cc: &CacheControl,
    default_ttl: Option<Duration>,
    response_time: SystemTime,
) -> (Duration, FreshnessSource) {
    if cc.no_cache {
        return (Duration::ZERO, FreshnessSource::MaxAge);
    }
    if let Some(s) = cc.s_maxage {
        return (Duration::from_secs(s), FreshnessSource::SMaxAge);
    }
    if let Some(s) = cc.max_age {
        return (Duration::from_secs(s), FreshnessSource::MaxAge);
    }
    if !cc.targeted && headers.contains_key(header::EXPIRES) {
        // An invalid Expires (e.g. "0") means already expired (§5.3); so does more than one.
        let single = headers.get_all(header::EXPIRES).iter().count() == 1;
        let lifetime = match (single, http_date(headers, header::EXPIRES)) {
            (true, Some(expires)) => {
                let date = http_date(headers, header::DATE).unwrap_or(response_time);
                expires.duration_since(date).unwrap_or(Duration::ZERO)
            }
            _ => Duration::ZERO,
        };
        return (lifetime, FreshnessSource::Expires);
    }
    if let Some(ttl) = default_ttl {
        return (ttl, FreshnessSource::Default);
    }
    if heuristically_cacheable(status) {
        if let Some(last_modified) = http_date(headers, header::LAST_MODIFIED) {
            let date = http_date(headers, header::DATE).unwrap_or(response_time);
            if let Ok(since) = date.duration_since(last_modified) {
                return ((since / 10).min(HEURISTIC_MAX), FreshnessSource::Heuristic);
            }
        }
    }
    (Duration::ZERO, FreshnessSource::None)
}

/// The `Age` value (RFC 9111 §5.1), a singleton delta-seconds. Several values — several lines,
/// or one line that an intermediary combined from several (RFC 9110 §5.3 joins them with
/// `", "`) — or a value that does not start with digits (`-5`, `abc`) cannot be trusted, and a
/// response whose age is unknown is treated as already stale (age 2^31 s). Trailing junk
/// after the digits (`7200;foo`, `7200.0`) is ignored: the number is still the sender's age.
fn age_header(headers: &HeaderMap) -> Duration {
    let invalid = Duration::from_secs(DELTA_SECONDS_MAX);
    let mut lines = headers.get_all(header::AGE).iter();
    let value = match (lines.next(), lines.next()) {
        (None, _) => return Duration::ZERO,
        (Some(v), None) => v.as_bytes(),
        (Some(_), Some(_)) => return invalid,
    };
    let value = value.trim_ascii();
    if value
        .windows(2)
        .any(|w| w[0] == b',' && (w[1] == b' ' || w[1] == b'\t'))
    {
        return invalid;
    }
    let digits = value.iter().take_while(|b| b.is_ascii_digit()).count();
    match std::str::from_utf8(&value[..digits]) {
        Ok(d) if !d.is_empty() => Duration::from_secs(parse_delta_seconds(d)),
        _ => invalid,
    }
}

/// RFC 9111 §4.2.3 `corrected_initial_age`: the age the response already had when it arrived,
/// from the upstream `Age`, the `Date` and the request/response times.
pub fn initial_age(
    headers: &HeaderMap,
    request_time: SystemTime,
    response_time: SystemTime,
) -> Duration {
    let age_value = age_header(headers);
    // `Date` has one-second resolution: compare whole seconds, so the truncation of `Date`
    // is not mistaken for up to a second of age (which would make sub-second or few-second
    // lifetimes expire early).
    let whole_secs = |t: SystemTime| {
        t.duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
    };
    let apparent_age = match http_date(headers, header::DATE) {
        Some(date) => {
            Duration::from_secs(whole_secs(response_time).saturating_sub(whole_secs(date)))
        }
        None => Duration::ZERO,
    };
    let response_delay = response_time
        .duration_since(request_time)
        .unwrap_or(Duration::ZERO);
    let corrected_age_value = age_value + response_delay;
    apparent_age.max(corrected_age_value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn cc(v: &str) -> CacheControl {
        CacheControl::parse(&headers(&[("cache-control", v)]))
    }

    fn store(
        req: &[(&str, &str)],
        status: u16,
        resp: &[(&str, &str)],
    ) -> Result<(), NoStoreReason> {
        let (rq, rs) = (headers(req), headers(resp));
        let (rqc, rsc) = (CacheControl::parse(&rq), CacheControl::parse(&rs));
        let status = StatusCode::from_u16(status).unwrap();
        let fresh = !freshness_lifetime(
            status,
            &rs,
            &rsc,
            Some(Duration::from_secs(2)),
            SystemTime::now(),
        )
        .0
        .is_zero();
        storability(&Method::GET, status, &rq, &rqc, &rs, &rsc, fresh)
    }

    #[test]
    fn parses_directives_case_insensitively_with_quotes() {
        let c = cc(r#"Public, MAX-AGE=60, no-cache="set-cookie, foo", s-maxage="30""#);
        assert!(c.public && c.no_cache);
        assert_eq!(c.max_age, Some(60));
        assert_eq!(c.s_maxage, Some(30));
    }

    #[test]
    fn first_duplicate_wins_and_invalid_is_zero() {
        assert_eq!(cc("max-age=10, max-age=20").max_age, Some(10));
        assert_eq!(cc("max-age=abc").max_age, Some(0));
        assert_eq!(cc("max-age=-5").max_age, Some(0));
        assert_eq!(cc("max-age").max_age, Some(0));
        assert_eq!(
            cc("max-age=99999999999999999999").max_age,
            Some(DELTA_SECONDS_MAX)
        );
    }

    #[test]
    fn targeted_fields_replace_cache_control() {
        let h = headers(&[
            ("cache-control", "no-store"),
            ("surrogate-control", "max-age=60"),
        ]);
        let c = CacheControl::for_response(&h);
        assert!(c.targeted && !c.no_store);
        assert_eq!(c.max_age, Some(60));
        let h = headers(&[("surrogate-control", "max-age=60;other, no-store;edgecache")]);
        let c = CacheControl::for_response(&h);
        assert_eq!((c.max_age, c.no_store), (None, true));
        let h = headers(&[
            ("surrogate-control", "max-age=5"),
            ("cdn-cache-control", "max-age=7"),
        ]);
        assert_eq!(CacheControl::for_response(&h).max_age, Some(7));
        let h = headers(&[
            ("edgecache-cache-control", "max-age=9"),
            ("cdn-cache-control", "max-age=7"),
        ]);
        assert_eq!(CacheControl::for_response(&h).max_age, Some(9));
        let h = headers(&[("cache-control", "max-age=3")]);
        assert!(!CacheControl::for_response(&h).targeted);
    }

    #[test]
    fn multiple_lines_combine() {
        let c = CacheControl::parse(&headers(&[
            ("cache-control", "public"),
            ("cache-control", "max-age=5"),
        ]));
        assert!(c.public);
        assert_eq!(c.max_age, Some(5));
    }

    /// Malformed fields neither panic nor yield a directive, except that a `max-age` with an
    /// invalid value counts as `0` (stale, RFC 9111 §4.2.1): nothing becomes storable, fresh or
    /// forbidden by accident.
    #[test]
    fn garbage_never_panics_nor_yields_directives() {
        let stale = CacheControl {
            max_age: Some(0),
            ..CacheControl::default()
        };
        for (v, want) in [
            (",,,", &CacheControl::default()),
            ("=", &CacheControl::default()),
            ("=5", &CacheControl::default()),
            ("\"", &CacheControl::default()),
            ("max-age=\"", &stale),
            ("a=\"b,c", &CacheControl::default()),
            ("max-age=1 2", &stale),
            ("\t;;", &CacheControl::default()),
        ] {
            let parsed = CacheControl::parse(&headers(&[("cache-control", v)]));
            assert_eq!(&parsed, want, "{v:?}");
        }
    }

    #[test]
    fn freshness_precedence() {
        let now = SystemTime::now();
        let date = httpdate::fmt_http_date(now);
        let exp = httpdate::fmt_http_date(now + Duration::from_secs(100));
        let h = headers(&[
            ("cache-control", "max-age=10, s-maxage=20"),
            ("date", &date),
            ("expires", &exp),
        ]);
        let f = |h: &HeaderMap, d| {
            freshness_lifetime(StatusCode::OK, h, &CacheControl::parse(h), d, now)
        };
        assert_eq!(
            f(&h, None),
            (Duration::from_secs(20), FreshnessSource::SMaxAge)
        );
        let h = headers(&[
            ("cache-control", "max-age=10"),
            ("date", &date),
            ("expires", &exp),
        ]);
        assert_eq!(f(&h, None).0, Duration::from_secs(10));
        let h = headers(&[("date", &date), ("expires", &exp)]);
        assert_eq!(
            f(&h, Some(Duration::from_secs(2))).0,
            Duration::from_secs(100)
        );
        let h = headers(&[("date", &date), ("expires", "0")]);
        assert_eq!(f(&h, Some(Duration::from_secs(2))).0, Duration::ZERO);
        let h = headers(&[("date", &date)]);
        assert_eq!(
            f(&h, Some(Duration::from_secs(2))),
            (Duration::from_secs(2), FreshnessSource::Default)
        );
        assert_eq!(f(&h, None).1, FreshnessSource::None);
    }

    #[test]
    fn heuristic_is_ten_percent_of_last_modified_age() {
        let now = SystemTime::now();
        let h = headers(&[
            ("date", &httpdate::fmt_http_date(now)),
            (
                "last-modified",
                &httpdate::fmt_http_date(now - Duration::from_secs(1000)),
            ),
        ]);
        let (d, src) = freshness_lifetime(StatusCode::OK, &h, &CacheControl::default(), None, now);
        assert_eq!(
            (d, src),
            (Duration::from_secs(100), FreshnessSource::Heuristic)
        );
        let (d, _) = freshness_lifetime(StatusCode::FOUND, &h, &CacheControl::default(), None, now);
        assert_eq!(d, Duration::ZERO);
    }

    #[test]
    fn no_cache_is_stored_only_with_a_validator_and_is_never_fresh() {
        assert_eq!(
            store(&[], 200, &[("cache-control", "no-cache")]),
            Err(NoStoreReason::NoFreshnessOrValidator)
        );
        assert_eq!(
            store(
                &[],
                200,
                &[("cache-control", "no-cache"), ("etag", "\"a\"")]
            ),
            Ok(())
        );
    }

    #[test]
    fn private_data_is_never_shared() {
        assert_eq!(
            store(&[], 200, &[("cache-control", "private, max-age=60")]),
            Err(NoStoreReason::Private)
        );
        assert_eq!(
            store(&[], 200, &[("cache-control", "no-store")]),
            Err(NoStoreReason::NoStore)
        );
        assert_eq!(
            store(&[("cache-control", "no-store")], 200, &[]),
            Err(NoStoreReason::RequestNoStore)
        );
        assert_eq!(
            store(&[], 200, &[("set-cookie", "a=b")]),
            Err(NoStoreReason::SetCookie)
        );
        assert_eq!(
            store(
                &[],
                200,
                &[
                    ("set-cookie", "a=b"),
                    ("cache-control", "public, max-age=5")
                ]
            ),
            Ok(())
        );
        assert_eq!(
            store(&[("authorization", "Bearer x")], 200, &[]),
            Err(NoStoreReason::Authorization)
        );
        assert_eq!(
            store(
                &[("authorization", "Bearer x")],
                200,
                &[("cache-control", "s-maxage=5")]
            ),
            Ok(())
        );
        assert_eq!(
            store(
                &[("authorization", "Bearer x")],
                200,
                &[("cache-control", "must-revalidate")]
            ),
            Ok(())
        );
        assert_eq!(
            store(&[], 200, &[("vary", "Accept, *")]),
            Err(NoStoreReason::VaryStar)
        );
    }

    #[test]
    fn status_rules() {
        assert_eq!(
            store(&[], 500, &[("cache-control", "max-age=60")]),
            Ok(()),
            "explicit"
        );
        assert_eq!(store(&[], 503, &[]), Err(NoStoreReason::Status));
        assert_eq!(
            store(&[], 503, &[("cache-control", "public")]),
            Err(NoStoreReason::Status)
        );
        assert_eq!(store(&[], 599, &[("cache-control", "s-maxage=5")]), Ok(()));
        assert_eq!(store(&[], 501, &[]), Ok(()), "heuristically cacheable");
        let mu = [("cache-control", "max-age=60, must-understand, no-store")];
        assert_eq!(store(&[], 599, &mu), Err(NoStoreReason::Status));
        assert_eq!(
            store(&[], 200, &mu),
            Ok(()),
            "understood: no-store is overridden"
        );
        assert_eq!(
            store(&[], 206, &[("cache-control", "max-age=60")]),
            Err(NoStoreReason::Status)
        );
        assert_eq!(store(&[], 302, &[]), Err(NoStoreReason::Status));
        assert_eq!(store(&[], 302, &[("cache-control", "max-age=60")]), Ok(()));
        assert_eq!(store(&[], 404, &[]), Ok(()));
        assert_eq!(store(&[], 200, &[]), Ok(()));
    }

    #[test]
    fn stale_rules() {
        assert!(cc("max-age=1, must-revalidate").forbids_stale());
        assert!(cc("s-maxage=1").forbids_stale());
        assert!(!cc("max-age=1, stale-while-revalidate=5").forbids_stale());
    }

    #[test]
    fn initial_age_uses_age_header_and_delay() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let t1 = t0 + Duration::from_secs(1);
        let h = headers(&[("age", "30"), ("date", &httpdate::fmt_http_date(t1))]);
        assert_eq!(initial_age(&h, t0, t1), Duration::from_secs(31));
        let h = headers(&[(
            "date",
            &httpdate::fmt_http_date(t1 - Duration::from_secs(50)),
        )]);
        assert_eq!(initial_age(&h, t1, t1), Duration::from_secs(50));
        let h = headers(&[("age", "5;a=b")]);
        assert_eq!(
            initial_age(&h, t1, t1),
            Duration::from_secs(5),
            "trailing junk ignored"
        );
        for bad in ["junk", "-1", "0, 0", "3600, 3600", ""] {
            let h = headers(&[("age", bad)]);
            assert_eq!(
                initial_age(&h, t1, t1),
                Duration::from_secs(DELTA_SECONDS_MAX),
                "{bad}"
            );
        }
        let h = headers(&[("age", "0"), ("age", "0")]);
        assert_eq!(
            initial_age(&h, t1, t1),
            Duration::from_secs(DELTA_SECONDS_MAX)
        );
        // A Date truncated to the second is not age.
        let h = headers(&[("date", &httpdate::fmt_http_date(t1))]);
        let later = t1 + Duration::from_millis(900);
        assert_eq!(initial_age(&h, later, later), Duration::ZERO);
    }
}
