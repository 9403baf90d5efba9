//! The routes file's text to validated [`Route`]s: TOML through serde (unknown keys refused),
//! then each value checked, every error naming its route and key.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Method;
use serde::Deserialize;

use super::headers::{header_name, header_value, InjectedHeaders};
use super::limit::{Limits, RateLimitConfig};
use super::matcher::{miscased_standard, Methods};
use super::query::QueryFilter;
use super::retry::{RetryBudget, RetryPolicy};
use super::Route;
use crate::config::parse_backends;

/// A routes file that cannot be used. Displays as one line, e.g.
/// ``ROUTES_FILE /etc/x.toml: route 2 (prefix "/api/"): key `ttl_secs`: must be 0 to 31536000``.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoutesError(Box<ErrorParts>);

#[derive(Clone, Debug, PartialEq, Eq)]
struct ErrorParts {
    file: Option<PathBuf>,
    /// 1-based position in the file, and its prefix when it has one.
    route: Option<(usize, Option<String>)>,
    key: Option<String>,
    message: String,
    /// 1-based line and column.
    position: Option<(usize, usize)>,
}

impl RoutesError {
    pub(super) fn new(message: impl Into<String>) -> Self {
        RoutesError(Box::new(ErrorParts {
            file: None,
            route: None,
            key: None,
            message: message.into(),
            position: None,
        }))
    }

    fn in_route(mut self, number: usize, prefix: Option<&str>) -> Self {
        self.0.route = Some((number, prefix.map(str::to_owned)));
        self
    }

    fn at_key(mut self, key: impl Into<String>) -> Self {
        self.0.key = Some(key.into());
        self
    }

    fn at(mut self, position: Option<(usize, usize)>) -> Self {
        self.0.position = position;
        self
    }

    pub(super) fn in_file(mut self, path: &Path) -> Self {
        self.0.file = Some(path.to_owned());
        self
    }

    /// The route's 1-based position in the file, when the error is about one.
    pub fn route(&self) -> Option<usize> {
        self.0.route.as_ref().map(|(n, _)| *n)
    }

    /// The key (`ttl_secs`, `rate_limit.burst`, `headers.Authorization`), when the error is
    /// about one.
    pub fn key(&self) -> Option<&str> {
        self.0.key.as_deref()
    }

    /// What is wrong.
    pub fn message(&self) -> &str {
        &self.0.message
    }

    /// Line and column (1-based) in the file, when known.
    pub fn position(&self) -> Option<(usize, usize)> {
        self.0.position
    }
}

impl fmt::Display for RoutesError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let e = &self.0;
        f.write_str("ROUTES_FILE")?;
        if let Some(file) = &e.file {
            write!(f, " {}", file.display())?;
        }
        f.write_str(": ")?;
        if let Some((number, prefix)) = &e.route {
            write!(f, "route {number}")?;
            if let Some(prefix) = prefix {
                write!(f, " (prefix {prefix:?})")?;
            }
            f.write_str(": ")?;
        }
        if let Some(key) = &e.key {
            write!(f, "key `{key}`: ")?;
        }
        f.write_str(&e.message)?;
        if let Some((line, column)) = e.position {
            write!(f, " (line {line}, column {column})")?;
        }
        Ok(())
    }
}

impl std::error::Error for RoutesError {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    allowlist: bool,
    #[serde(default)]
    routes: Vec<RawRoute>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRoute {
    prefix: String,
    methods: Option<Vec<String>>,
    upstream: Option<String>,
    health_check_path: Option<String>,
    cache: Option<bool>,
    ttl_secs: Option<f64>,
    key_query_ignore: Option<Vec<String>>,
    query_cache_control: Option<bool>,
    headers: Option<BTreeMap<String, String>>,
    rate_limit: Option<RawRateLimit>,
    max_in_flight: Option<u32>,
    retries: Option<u32>,
    retry_unsafe: Option<bool>,
    client_deadline_secs: Option<f64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRateLimit {
    per_second: f64,
    burst: Option<u32>,
    queue: Option<u32>,
    per_client: Option<bool>,
    max_clients: Option<u32>,
}

/// The longest `ttl_secs`: a year, as `DEFAULT_CACHE_EXPIRY_TIME_SECS`.
const MAX_TTL_SECS: f64 = 31_536_000.0;
/// The longest `client_deadline_secs`: a day.
const MAX_DEADLINE_SECS: f64 = 86_400.0;
const MAX_RETRIES: u32 = 10;
const MAX_PER_SECOND: f64 = 1_000_000.0;
const MAX_BURST: u32 = 1_000_000;
const MAX_QUEUE: u32 = 100_000;
const MAX_IN_FLIGHT: u32 = 1_000_000;
const DEFAULT_MAX_CLIENTS: u32 = 100_000;
const MAX_MAX_CLIENTS: u32 = 10_000_000;

/// Parses and validates the file's text: `(allowlist, routes in file order)`.
pub(super) fn parse(
    text: &str,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<(bool, Vec<Route>), RoutesError> {
    let raw = deserialize(text)?;
    if raw.allowlist && raw.routes.is_empty() {
        return Err(RoutesError::new(
            "`allowlist = true` without any [[routes]] would refuse every request",
        )
        .at_key("allowlist"));
    }
    let mut routes: Vec<Route> = Vec::with_capacity(raw.routes.len());
    for (i, r) in raw.routes.into_iter().enumerate() {
        let number = i + 1;
        let prefix = r.prefix.clone();
        let fail = |key: &str, message: String| {
            RoutesError::new(message)
                .in_route(number, Some(&prefix))
                .at_key(key)
        };
        let route = route(number, r, env).map_err(|(key, message)| fail(&key, message))?;
        // One route per prefix and method.
        for other in routes.iter().filter(|o| o.prefix == route.prefix) {
            let clash = match (&route.methods, &other.methods) {
                (None, None) => Some("every method".to_string()),
                (Some(a), Some(b)) => a.shared_with(b).map(|m| format!("method {m}")),
                _ => None,
            };
            if let Some(what) = clash {
                return Err(fail(
                    if route.methods.is_some() {
                        "methods"
                    } else {
                        "prefix"
                    },
                    format!(
                        "route {} has the same prefix for {what} (GET includes HEAD)",
                        other.number
                    ),
                ));
            }
        }
        routes.push(route);
    }
    Ok((raw.allowlist, routes))
}

/// TOML to the raw structs; errors name the route and key, with the line and column.
fn deserialize(text: &str) -> Result<RawFile, RoutesError> {
    let position = |span: Option<std::ops::Range<usize>>| span.map(|s| line_column(text, s.start));
    let de = toml::de::Deserializer::parse(text).map_err(|e| {
        RoutesError::new(format!("invalid TOML: {}", e.message())).at(position(e.span()))
    })?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let mut message = e
            .inner()
            .message()
            .replace("unknown field", "unknown key")
            .replace("expected f64", "expected a number")
            .replace("expected u32", "expected a whole number, 0 or more");
        // A missing key is reported at its table: name it.
        let mut missing = None;
        if let Some(rest) = message.strip_prefix("missing field `") {
            missing = rest.split('`').next().map(str::to_owned);
            message = "is required".into();
        }
        let mut error = RoutesError::new(message).at(position(e.inner().span()));
        // `routes[1].rate_limit.burst`: the route's index, then the key within it.
        use serde_path_to_error::Segment;
        let path: Vec<Segment> = e.path().iter().cloned().collect();
        let mut segments = &path[..];
        if let [Segment::Map { key }, Segment::Seq { index }, rest @ ..] = segments {
            if key == "routes" {
                error = error.in_route(index + 1, route_prefix(text, *index).as_deref());
                segments = rest;
            }
        }
        let mut key: Vec<String> = Vec::new();
        for segment in segments {
            match segment {
                Segment::Map { key: k } => key.push(k.clone()),
                Segment::Seq { index } => match key.last_mut() {
                    Some(last) => *last = format!("{last}[{index}]"),
                    None => key.push(format!("[{index}]")),
                },
                _ => {}
            }
        }
        key.extend(missing);
        if !key.is_empty() {
            error = error.at_key(key.join("."));
        }
        error
    })
}

/// The `prefix` of route `index`, to name it in an error (when it is a string).
fn route_prefix(text: &str, index: usize) -> Option<String> {
    let table: toml::Table = text.parse().ok()?;
    let route = table.get("routes")?.as_array()?.get(index)?;
    route.get("prefix")?.as_str().map(str::to_owned)
}

/// 1-based line and column (in characters) of byte `offset`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..floor_char_boundary(text, offset.min(text.len()))];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line, column)
}

fn floor_char_boundary(text: &str, mut i: usize) -> usize {
    while !text.is_char_boundary(i) {
        i -= 1;
    }
    i
}

type KeyError = (String, String);

fn err<T>(key: &str, message: impl Into<String>) -> Result<T, KeyError> {
    Err((key.to_owned(), message.into()))
}

/// Validates one route.
fn route(
    number: usize,
    r: RawRoute,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<Route, KeyError> {
    check_path("prefix", &r.prefix)?;
    let methods = r.methods.map(methods).transpose()?;
    let upstream = match r.upstream {
        Some(list) => Some(parse_backends(&list).map_err(|e| ("upstream".to_owned(), e))?),
        None => None,
    };
    if let Some(path) = &r.health_check_path {
        check_path("health_check_path", path)?;
        if upstream.is_none() {
            return err(
                "health_check_path",
                "applies to the route's own pool: set `upstream` too (the global pool is probed on HEALTH_CHECK_PATH)",
            );
        }
    }
    let cache = r.cache.unwrap_or(true);
    let ttl = match r.ttl_secs {
        Some(s) => Some(seconds(
            "ttl_secs",
            s,
            0.0,
            MAX_TTL_SECS,
            "must be 0 to 31536000",
        )?),
        None => None,
    };
    let key_query_ignore = QueryFilter::new(r.key_query_ignore.unwrap_or_default());
    for p in key_query_ignore.patterns() {
        if p.is_empty() || p.contains(['&', '=', '#']) {
            return err(
                "key_query_ignore",
                format!("`{}`: a pattern is a parameter name, `*` standing for any characters (no `&`, `=`, `#`, not empty)", p.escape_debug()),
            );
        }
    }
    let query_cache_control = r.query_cache_control.unwrap_or(false);
    if !cache {
        for (set, key) in [
            (ttl.is_some(), "ttl_secs"),
            (!key_query_ignore.is_empty(), "key_query_ignore"),
            (query_cache_control, "query_cache_control"),
        ] {
            if set {
                return err(key, "has no effect with `cache = false`");
            }
        }
    }
    let headers = injected_headers(r.headers.unwrap_or_default(), env)?;
    let rate_limit = r.rate_limit.map(rate_limit).transpose()?;
    if let Some(n) = r.max_in_flight {
        if !(1..=MAX_IN_FLIGHT).contains(&n) {
            return err("max_in_flight", format!("must be 1 to {MAX_IN_FLIGHT}"));
        }
    }
    let retry = match (r.retries, r.retry_unsafe) {
        (Some(n), _) if n > MAX_RETRIES => return err("retries", "must be 0 to 10"),
        (Some(retries), retry_unsafe) => Some(RetryPolicy {
            retries,
            retry_unsafe: retry_unsafe.unwrap_or(false),
        }),
        (None, Some(_)) => {
            return err(
                "retry_unsafe",
                "needs `retries` (the number of retries it allows)",
            )
        }
        (None, None) => None,
    };
    let client_deadline = match r.client_deadline_secs {
        Some(s) => Some(seconds(
            "client_deadline_secs",
            s,
            0.001,
            MAX_DEADLINE_SECS,
            "must be more than 0 (at least 0.001) and at most 86400",
        )?),
        None => None,
    };
    Ok(Route {
        number,
        prefix: r.prefix,
        methods,
        upstream,
        health_check_path: r.health_check_path,
        cache,
        ttl,
        key_query_ignore,
        query_cache_control,
        headers,
        retry,
        client_deadline,
        limits: Limits::new(rate_limit, r.max_in_flight),
        retry_budget: RetryBudget::default(),
    })
}

/// A path (`prefix`, `health_check_path`): starts with `/`, visible ASCII (non-ASCII
/// percent-encoded, as in a request), no query or fragment.
fn check_path(key: &str, path: &str) -> Result<(), KeyError> {
    if !path.starts_with('/') {
        return err(key, format!("{path:?} must start with `/`"));
    }
    if let Some(c) = path
        .chars()
        .find(|&c| !c.is_ascii_graphic() || c == '?' || c == '#')
    {
        return err(
            key,
            format!("{path:?} has {c:?}: a path is visible ASCII without `?` or `#` (percent-encode the rest, as requests do)"),
        );
    }
    Ok(())
}

fn methods(listed: Vec<String>) -> Result<Methods, KeyError> {
    if listed.is_empty() {
        return err(
            "methods",
            "is empty; leave `methods` out to allow every method",
        );
    }
    let mut parsed: Vec<Method> = Vec::with_capacity(listed.len());
    for m in &listed {
        if let Some(standard) = miscased_standard(m) {
            return err(
                "methods",
                format!("`{m}`: methods are case-sensitive; use `{standard}`"),
            );
        }
        let method = Method::from_bytes(m.as_bytes()).map_err(|_| {
            (
                "methods".to_owned(),
                format!("{m:?} is not a method (an HTTP token)"),
            )
        })?;
        if parsed.contains(&method) {
            return err("methods", format!("`{m}` is listed twice"));
        }
        parsed.push(method);
    }
    Ok(Methods::new(parsed))
}

fn seconds(key: &str, s: f64, min: f64, max: f64, range: &str) -> Result<Duration, KeyError> {
    if !(min..=max).contains(&s) {
        return err(key, range);
    }
    Duration::try_from_secs_f64(s).map_err(|_| (key.to_owned(), range.to_owned()))
}

fn injected_headers(
    raw: BTreeMap<String, String>,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<InjectedHeaders, KeyError> {
    let mut entries: Vec<(http::HeaderName, http::HeaderValue)> = Vec::with_capacity(raw.len());
    for (name, value) in &raw {
        let key = format!("headers.{name}");
        let parsed = header_name(name).map_err(|e| (key.clone(), e))?;
        if entries.iter().any(|(n, _)| *n == parsed) {
            return err(&key, "is listed twice (header names are case-insensitive)");
        }
        let value = header_value(value, env).map_err(|e| (key, e))?;
        entries.push((parsed, value));
    }
    Ok(InjectedHeaders::new(entries))
}

fn rate_limit(r: RawRateLimit) -> Result<RateLimitConfig, KeyError> {
    if !(r.per_second > 0.0 && r.per_second <= MAX_PER_SECOND) {
        return err(
            "rate_limit.per_second",
            "must be more than 0 and at most 1000000 (decimals allowed: 0.5 is one every 2 s)",
        );
    }
    let burst = r
        .burst
        .unwrap_or_else(|| (r.per_second.ceil() as u32).clamp(1, MAX_BURST));
    if !(1..=MAX_BURST).contains(&burst) {
        return err("rate_limit.burst", format!("must be 1 to {MAX_BURST}"));
    }
    let queue = r.queue.unwrap_or(0);
    if queue > MAX_QUEUE {
        return err("rate_limit.queue", format!("must be 0 to {MAX_QUEUE}"));
    }
    let per_client = r.per_client.unwrap_or(false);
    let max_clients = match (r.max_clients, per_client) {
        (Some(_), false) => {
            return err("rate_limit.max_clients", "needs `per_client = true`");
        }
        (Some(n), true) if !(1..=MAX_MAX_CLIENTS).contains(&n) => {
            return err(
                "rate_limit.max_clients",
                format!("must be 1 to {MAX_MAX_CLIENTS}"),
            );
        }
        (n, _) => n.unwrap_or(DEFAULT_MAX_CLIENTS),
    };
    Ok(RateLimitConfig {
        per_second: r.per_second,
        burst,
        queue,
        per_client,
        max_clients,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_and_column() {
        let text = "a\nbc\né=1";
        assert_eq!(line_column(text, 0), (1, 1));
        assert_eq!(line_column(text, 3), (2, 2));
        assert_eq!(line_column(text, 5), (3, 1));
        assert_eq!(line_column(text, 7), (3, 2), "characters, not bytes");
        assert_eq!(line_column(text, 99), (3, 4));
    }
}
