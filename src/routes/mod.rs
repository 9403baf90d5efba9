//! Per-path routing policy from an optional TOML file (`ROUTES_FILE`): which upstream pool a
//! path prefix goes to, whether and how it is cached, headers injected upstream, rate limits,
//! an in-flight cap, retries and a client deadline. Without the file nothing here is
//! consulted and the proxy behaves as it always did.
//!
//! ```toml
//! allowlist = true                  # paths that match no route: 404, the upstream never sees them
//!
//! [[routes]]
//! prefix = "/api/"                  # required; byte prefix of the path, longest wins
//! methods = ["GET", "POST"]         # optional; GET admits HEAD too
//! upstream = "http://10.0.0.1:8080 weight=2, http://10.0.0.2:8080"  # UPSTREAM_URLS syntax
//! health_check_path = "/healthz"    # the route pool's probe path (needs `upstream`)
//! cache = true                      # false: bypass the cache
//! ttl_secs = 30                     # freshness when the origin gives none (0 to 31536000)
//! key_query_ignore = ["utm_*"]      # query parameters left out of the key (`*` globs)
//! query_cache_control = false       # true: `?cache-control=...` acts as request directives
//! headers = { Authorization = "Bearer ${UPSTREAM_TOKEN}" }   # injected upstream
//! rate_limit = { per_second = 10, burst = 20, queue = 50 }   # also per_client, max_clients
//! max_in_flight = 100
//! retries = 3                       # 0 to 10 attempts after the first
//! retry_unsafe = false
//! client_deadline_secs = 2.5
//! ```
//!
//! Every key but `prefix` is optional; a key left out means the global setting (or today's
//! behaviour). Unknown keys are errors. [`Routes::parse`] is pure (text and an environment
//! lookup in, routes or a one-line [`RoutesError`] out), so a SIGHUP reload is
//! `Routes::load(path, |k| std::env::var(k).ok())` and a swap; a reload starts the limiters,
//! budgets and counters afresh.
//!
//! # Wiring (for the pipeline)
//!
//! * Startup: `Routes::load(&path, |k| std::env::var(k).ok())`; on `Err(e)` print `e` (one
//!   line) and exit 2. Keep `Option<Arc<Routes>>` (swap it on SIGHUP; a failed reload keeps
//!   the old one and logs the error).
//! * Per request, before the cache: `routes.match_route(&method, path)` (path without the
//!   query). [`Match::NotAllowed`] → 404 without touching the cache or the upstream;
//!   [`Match::Default`] → exactly today's path; [`Match::Route`] → apply its policy:
//!   * cache key: [`Route::filter_query`] on the query (borrowed when nothing is removed);
//!     with [`Route::query_cache_control`], [`query::take_cache_control`] first (its
//!     `directives` act as request `Cache-Control`, its `rest` is the query that goes on);
//!   * `cache = false` → bypass; [`Route::ttl`] → the default freshness;
//!   * upstream request: [`Route::upstream`] (its own pool, probed on
//!     [`Route::health_check_path`]) or the global pool; [`InjectedHeaders::apply`] last, so
//!     a client's own copies of those fields are replaced;
//!   * just before going upstream (misses, refreshes, pass-through — never hits):
//!     `route.limits.admit(client_ip).await`; `Err(r)` → answer `r.status()` with
//!     `r.headers()`; `Ok(a)` → keep `a` until the upstream exchange is over;
//!   * retries: [`retry::should_retry`], [`retry::backoff`], [`Route::retry_budget`];
//!   * [`Route::client_deadline`] bounds the whole request, queueing included.
//! * `/status`: [`Routes::status`] (names of injected headers, never their values).
//!   `/metrics`: [`Routes::render_metrics`].

pub mod headers;
pub mod limit;
mod matcher;
mod parse;
pub mod query;
pub mod retry;

use std::borrow::Cow;
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use http::Method;
use serde::Serialize;

use crate::config::BackendConfig;
use crate::metrics;
pub use headers::InjectedHeaders;
pub use limit::{Admitted, LimitCounters, Limits, RateLimitConfig, RateLimitState, Rejected};
pub use matcher::Methods;
pub use parse::RoutesError;
pub use query::{QueryDirectives, QueryFilter};
pub use retry::{Outcome, RetryBudget, RetryPolicy};

/// The routes file, validated.
#[derive(Debug)]
pub struct Routes {
    allowlist: bool,
    /// In file order.
    routes: Box<[Route]>,
    tree: matcher::Tree,
}

/// One `[[routes]]` entry.
#[derive(Debug)]
pub struct Route {
    /// 1-based position in the file (as in error messages).
    pub number: usize,
    pub prefix: String,
    /// `None`: every method.
    pub methods: Option<Methods>,
    /// The route's own pool (`UPSTREAM_URLS` syntax); `None`: the global pool.
    pub upstream: Option<Vec<BackendConfig>>,
    /// The route pool's probe path; `None`: `HEALTH_CHECK_PATH`.
    pub health_check_path: Option<String>,
    /// `false`: bypass the cache.
    pub cache: bool,
    /// Freshness when the origin gives none; `None`: the global default.
    pub ttl: Option<Duration>,
    /// Query parameters left out of the cache key.
    pub key_query_ignore: QueryFilter,
    /// A `cache-control` query parameter acts as request directives.
    pub query_cache_control: bool,
    /// Injected into upstream requests (values redacted from `Debug`).
    pub headers: InjectedHeaders,
    /// `None`: the global retry behaviour (`UPSTREAM_RETRIES`).
    pub retry: Option<RetryPolicy>,
    /// `None`: the global request timeout.
    pub client_deadline: Option<Duration>,
    /// Rate limit, in-flight cap and their counters.
    pub limits: Limits,
    /// Bounds this route's retries ([`retry::RetryBudget`]).
    pub retry_budget: RetryBudget,
}

/// What a request's method and path map to.
#[derive(Debug, Clone, Copy)]
pub enum Match<'a> {
    /// The route with the longest prefix of the path that admits the method.
    Route(&'a Route),
    /// `allowlist = true` and no route admits it (or the path has a `.`/`..` segment, which
    /// the upstream might resolve to a path outside the route): answer 404.
    NotAllowed,
    /// No route, no allowlist: handle the request as without a routes file.
    Default,
}

impl Routes {
    /// Parses and validates the routes file's text; `${VAR}` in header values come from
    /// `env`. Pure: nothing is read, logged or started.
    pub fn parse(text: &str, env: impl Fn(&str) -> Option<String>) -> Result<Routes, RoutesError> {
        let (allowlist, routes) = parse::parse(text, &env)?;
        let mut tree = matcher::Tree::default();
        for (i, route) in routes.iter().enumerate() {
            tree.insert(&route.prefix, i, route.methods.is_some());
        }
        Ok(Routes {
            allowlist,
            routes: routes.into_boxed_slice(),
            tree,
        })
    }

    /// Reads and parses the file at `path` (errors name it).
    pub fn load(path: &Path, env: impl Fn(&str) -> Option<String>) -> Result<Routes, RoutesError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| RoutesError::new(format!("cannot read the file: {e}")).in_file(path))?;
        Self::parse(&text, env).map_err(|e| e.in_file(path))
    }

    /// The route for a request (`path` without its query): the longest prefix of `path` whose
    /// route admits `method`; a route whose methods exclude it is passed over for the next
    /// longest. Allocates nothing; its cost depends on how many prefixes of the path are
    /// routes, not on how many routes there are.
    #[inline]
    pub fn match_route(&self, method: &Method, path: &str) -> Match<'_> {
        if self.allowlist && has_dot_segment(path) {
            return Match::NotAllowed;
        }
        match self.tree.find(path, |i| self.routes[i].allows(method)) {
            Some(i) => Match::Route(&self.routes[i]),
            None if self.allowlist => Match::NotAllowed,
            None => Match::Default,
        }
    }

    /// For a request the allowlist refused: the methods the routes of its path's longest
    /// routed prefix admit (`GET, HEAD, POST`, for a 405's `Allow`); `None` when no route
    /// has a prefix of `path` (404).
    pub fn methods_for(&self, path: &str) -> Option<String> {
        if has_dot_segment(path) {
            return None;
        }
        let longest = self.tree.find(path, |_| true)?;
        let prefix = &self.routes[longest].prefix;
        let mut allowed: Vec<&str> = Vec::new();
        for route in self.routes.iter().filter(|r| &r.prefix == prefix) {
            match &route.methods {
                // A route of this prefix takes every method: the refusal was the dot segment.
                None => return None,
                Some(m) => allowed.extend(m.listed().iter().map(Method::as_str)),
            }
        }
        if allowed.contains(&"GET") && !allowed.contains(&"HEAD") {
            allowed.push("HEAD");
        }
        Some(allowed.join(", "))
    }

    pub fn allowlist(&self) -> bool {
        self.allowlist
    }

    /// The routes in file order.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// Forgets per-client rate-limit buckets that are full again, on every route (it also
    /// happens as requests come; a timer calling this returns memory after traffic stops).
    pub fn sweep(&self) {
        for r in self.routes.iter() {
            r.limits.sweep();
        }
    }

    /// The `/status` view: settings and counters, injected header names without values.
    pub fn status(&self) -> RoutesStatus {
        RoutesStatus {
            allowlist: self.allowlist,
            routes: self.routes.iter().map(Route::status).collect(),
        }
    }

    /// Appends the per-route series in the Prometheus text format.
    pub fn render_metrics(&self, out: &mut String) {
        /// A series' extra labels and how to read its value.
        type Series = (&'static str, fn(&Route, &LimitCounters) -> u64);
        /// Name, type, help, series.
        type Family = (&'static str, &'static str, &'static str, &'static [Series]);
        let families: [Family; 6] = [
            (
                "edgecache_route_admitted_total",
                "counter",
                "Requests of a route admitted upstream by its rate limit and in-flight cap (with or without waiting).",
                &[("", |_, c| c.admitted)],
            ),
            (
                "edgecache_route_queued_total",
                "counter",
                "Requests of a route over its rate that waited in its queue, then went upstream.",
                &[("", |_, c| c.queued)],
            ),
            (
                "edgecache_route_rejected_total",
                "counter",
                "Requests of a route refused: over the rate with the queue full (429), or at max_in_flight (503).",
                &[
                    ("reason=\"rate\"", |_, c| c.rejected_rate),
                    ("reason=\"in_flight\"", |_, c| c.rejected_in_flight),
                ],
            ),
            (
                "edgecache_route_queue_waiting",
                "gauge",
                "Requests of a route waiting in its rate-limit queue now.",
                &[("", |_, c| u64::from(c.waiting))],
            ),
            (
                "edgecache_route_in_flight",
                "gauge",
                "Requests of a route upstream now (routes with max_in_flight).",
                &[("", |_, c| u64::from(c.in_flight))],
            ),
            (
                "edgecache_route_retries_total",
                "counter",
                "Retries of a route's upstream requests granted or denied by its retry budget.",
                &[
                    ("budget=\"granted\"", |r, _| r.retry_budget.granted()),
                    ("budget=\"denied\"", |r, _| r.retry_budget.denied()),
                ],
            ),
        ];
        let counters: Vec<(String, LimitCounters)> = self
            .routes
            .iter()
            .map(|r| (r.metric_labels(), r.limits.counters()))
            .collect();
        for (name, kind, help, series) in families {
            metrics::series(out, name, kind, help);
            for (route, (labels, c)) in self.routes.iter().zip(&counters) {
                for (extra, value) in series {
                    let sep = if extra.is_empty() { "" } else { "," };
                    let _ = writeln!(out, "{name}{{{labels}{sep}{extra}}} {}", value(route, c));
                }
            }
        }
        let name = "edgecache_route_client_table_resets_total";
        metrics::series(
            out,
            name,
            "counter",
            "Times a route's per-client rate-limit table was emptied for holding more than max_clients active addresses.",
        );
        for (route, (labels, c)) in self.routes.iter().zip(&counters) {
            if route.limits.rate_limit().is_some_and(|r| r.per_client) {
                let _ = writeln!(out, "{name}{{{labels}}} {}", c.client_table_resets);
            }
        }
    }
}

impl Route {
    /// Whether the route admits `method`.
    #[inline]
    pub fn allows(&self, method: &Method) -> bool {
        self.methods.as_ref().is_none_or(|m| m.allows(method))
    }

    /// The query (without `?`) less the parameters named by `key_query_ignore`, for the cache
    /// key; borrowed when nothing is removed.
    pub fn filter_query<'q>(&self, query: &'q str) -> Cow<'q, str> {
        self.key_query_ignore.filter(query)
    }

    /// `route 2 (prefix "/api/")`, for log lines.
    pub fn label(&self) -> String {
        format!("route {} (prefix {:?})", self.number, self.prefix)
    }

    /// `prefix="/api/",methods="GET,POST"` (`methods="*"`: any), unique per route.
    fn metric_labels(&self) -> String {
        let methods = self.methods.as_ref().map_or("*".into(), Methods::label);
        format!(
            "prefix=\"{}\",methods=\"{}\"",
            escape_label(&self.prefix),
            escape_label(&methods)
        )
    }

    fn status(&self) -> RouteStatus {
        RouteStatus {
            route: self.number,
            prefix: self.prefix.clone(),
            methods: self
                .methods
                .as_ref()
                .map(|m| m.listed().iter().map(|m| m.to_string()).collect()),
            upstream: self.upstream.as_ref().map(|pool| {
                pool.iter()
                    .map(|b| {
                        let mut s = format!("{}{}", b.url.authority, b.url.path_prefix);
                        if b.weight != 1 {
                            let _ = write!(s, " weight={}", b.weight);
                        }
                        if b.http2 {
                            s.push_str(" h2");
                        }
                        s
                    })
                    .collect()
            }),
            health_check_path: self.health_check_path.clone(),
            cache: self.cache,
            ttl_secs: self.ttl.map(|d| d.as_secs_f64()),
            key_query_ignore: self
                .key_query_ignore
                .patterns()
                .map(str::to_owned)
                .collect(),
            query_cache_control: self.query_cache_control,
            injected_headers: self.headers.names().map(|n| n.to_string()).collect(),
            rate_limit: self.limits.rate_limit().cloned(),
            max_in_flight: self.limits.max_in_flight(),
            retries: self.retry.map(|r| r.retries),
            retry_unsafe: self.retry.is_some_and(|r| r.retry_unsafe),
            client_deadline_secs: self.client_deadline.map(|d| d.as_secs_f64()),
            counters: self.limits.counters(),
        }
    }
}

/// A Prometheus label value: `\`, `"` and newlines escaped.
fn escape_label(v: &str) -> Cow<'_, str> {
    if !v.contains(['\\', '"', '\n']) {
        return Cow::Borrowed(v);
    }
    Cow::Owned(
        v.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n"),
    )
}

/// Whether `path` has a `.` or `..` segment, literal or percent-encoded (`%2e`): an upstream
/// that resolves them would serve a path outside the prefix that was matched.
pub fn has_dot_segment(path: &str) -> bool {
    if memchr::memchr2(b'.', b'%', path.as_bytes()).is_none() {
        return false;
    }
    path.split('/').any(is_dot_segment)
}

fn is_dot_segment(segment: &str) -> bool {
    let mut rest = segment.as_bytes();
    let mut dots = 0;
    while !rest.is_empty() {
        if rest[0] == b'.' {
            rest = &rest[1..];
        } else if rest.len() >= 3 && rest[..3].eq_ignore_ascii_case(b"%2e") {
            rest = &rest[3..];
        } else {
            return false;
        }
        dots += 1;
    }
    (1..=2).contains(&dots)
}

/// `/status`: the routes file.
#[derive(Debug, Clone, Serialize)]
pub struct RoutesStatus {
    pub allowlist: bool,
    pub routes: Vec<RouteStatus>,
}

/// `/status`: one route's settings and counters. Injected headers by name only.
#[derive(Debug, Clone, Serialize)]
pub struct RouteStatus {
    pub route: usize,
    pub prefix: String,
    pub methods: Option<Vec<String>>,
    pub upstream: Option<Vec<String>>,
    pub health_check_path: Option<String>,
    pub cache: bool,
    pub ttl_secs: Option<f64>,
    pub key_query_ignore: Vec<String>,
    pub query_cache_control: bool,
    pub injected_headers: Vec<String>,
    pub rate_limit: Option<RateLimitConfig>,
    pub max_in_flight: Option<u32>,
    pub retries: Option<u32>,
    pub retry_unsafe: bool,
    pub client_deadline_secs: Option<f64>,
    pub counters: LimitCounters,
}

#[cfg(test)]
mod tests;
