//! Routes in the pipeline (`ROUTES_FILE`, parsed and matched by [`crate::routes`]): the table
//! in force — swapped whole on SIGHUP, each route with its own upstream pool and probes —,
//! the request step that applies a route before the cache (allowlist, query rewriting for the
//! key, dropping a client's copies of injected fields), and the one way any request goes
//! upstream (`Proxy::send_upstream`): within the route's rate limit and in-flight cap, with
//! its injected headers and its retries.
//!
//! Without a routes file the table is empty and every step here is a single load of an
//! empty pointer.

use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderValue, ALLOW, CACHE_CONTROL};
use http::{Method, Request, Response, Uri};
use hyper::body::Incoming;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Proxy;
use crate::body::ProxyBody;
use crate::cache::key::split_key;
use crate::error::{ErrorKind, Limited, ProxyError, UpstreamError};
use crate::metrics::Task;
use crate::routes::retry::{self, Outcome};
use crate::routes::{Admitted, Match, Route, Routes};
use crate::supervise::supervise;
use crate::upstream::Upstream;

/// The routes in force and what each needs at run time.
pub struct RouteTable {
    pub routes: Routes,
    /// By route index (file order): the route's own pool, when it names an `upstream`.
    pools: Vec<Option<Arc<Upstream>>>,
    /// Cancels this table's probes when it is replaced (dropped).
    probes: CancellationToken,
}

impl Drop for RouteTable {
    fn drop(&mut self) {
        self.probes.cancel();
    }
}

/// The route a request (or a cache fill) goes by: the table it came from stays alive while
/// the request runs, even if a reload replaces it.
#[derive(Clone)]
pub struct ActiveRoute {
    table: Arc<RouteTable>,
    index: usize,
}

impl ActiveRoute {
    fn new(table: &Arc<RouteTable>, route: &Route) -> Self {
        ActiveRoute {
            table: table.clone(),
            index: route.number - 1,
        }
    }

    pub fn route(&self) -> &Route {
        &self.table.routes.routes()[self.index]
    }

    /// The route's own pool; `None`: the global one.
    fn pool(&self) -> Option<&Upstream> {
        self.table.pools[self.index].as_deref()
    }
}

/// Marks a request whose `Cache-Control` came from its route's `cache-control` query
/// parameter: obeyed in full, whatever `CLIENT_CACHE_CONTROL` says of clients' own headers.
#[derive(Clone, Copy, Debug)]
pub(crate) struct QueryDirectives;

/// A request body that may have to be sent more than once.
pub(crate) enum Resend {
    /// No body.
    Empty,
    /// Read whole before the first try, so each retry sends it again.
    Buffered(Bytes),
    /// Streamed from the client: sent once, never retried after it started.
    Stream(ProxyBody),
}

impl Resend {
    fn body(&mut self) -> (ProxyBody, bool) {
        match self {
            Resend::Empty => (ProxyBody::Empty, true),
            Resend::Buffered(b) => (ProxyBody::full(b.clone()), true),
            Resend::Stream(body) => (std::mem::replace(body, ProxyBody::Empty), false),
        }
    }
}

/// One request to send upstream ([`Proxy::send_upstream`]).
pub(crate) struct Outgoing<'a> {
    pub method: &'a Method,
    pub path_and_query: &'a str,
    /// Already rewritten for the upstream (hop-by-hop removed, `X-Forwarded-*` set); the
    /// route's injected fields are added last.
    pub headers: HeaderMap,
    pub body: Resend,
    pub deadline: Instant,
    /// Charged by a per-client rate limit.
    pub client: IpAddr,
}

/// Request bodies up to this size are read whole on routes with retries, so a retry can send
/// them again; larger ones are streamed and not retried once sent.
pub(crate) const RETRY_BODY_LIMIT: u64 = 1 << 20;

impl Proxy {
    /// Builds the table for `routes` (route pools, their probes) and puts it in force; only
    /// consulted with `ROUTES_FILE` set (`config.routes_file`), as the daemon and tests do.
    pub fn install_routes(self: &Arc<Self>, routes: Routes) {
        let probes = CancellationToken::new();
        let pools = routes
            .routes()
            .iter()
            .map(|route| {
                let backends = route.upstream.as_ref()?;
                let mut pool = self.config.pool.clone();
                if let Some(path) = &route.health_check_path {
                    pool.health_path = path.clone();
                }
                let upstream = Arc::new(Upstream::from_parts(
                    backends,
                    &pool,
                    self.config.upstream_timeout,
                ));
                for probe in upstream.health_checks() {
                    let (proxy, token) = (self.clone(), probes.clone());
                    self.background
                        .spawn(Task::HealthCheck.as_str(), async move {
                            tokio::select! {
                                _ = token.cancelled() => {}
                                _ = supervise(Task::HealthCheck, &proxy.metrics, probe) => {}
                            }
                        });
                }
                Some(upstream)
            })
            .collect();
        let table = RouteTable {
            routes,
            pools,
            probes,
        };
        self.routes.store(Some(Arc::new(table)));
    }

    /// SIGHUP: reads `ROUTES_FILE` again; a valid file replaces the routes in force (requests
    /// under way finish by the routes they started with; limits and counters start afresh),
    /// an invalid one is logged and changes nothing.
    pub fn reload_routes(self: &Arc<Self>) {
        let Some(path) = &self.config.routes_file else {
            return;
        };
        match Routes::load(path, |k| std::env::var(k).ok()) {
            Ok(routes) => {
                let n = routes.routes().len();
                self.install_routes(routes);
                tracing::info!(routes = n, file = %path.display(), "routes reloaded");
            }
            Err(error) => {
                tracing::error!(%error, "routes not reloaded: the routes in force stay");
            }
        }
    }

    /// The routes in force, if any.
    pub fn route_table(&self) -> Option<Arc<RouteTable>> {
        self.routes.load_full()
    }

    /// The route step, before the cache: refuses what the allowlist does not admit (404, or
    /// 405 with `Allow` when the path is routed for other methods), then rewrites the request
    /// for its route: `key_query_ignore` parameters and a `cache-control` query parameter
    /// leave the query (the latter becoming request directives), and the client's own copies
    /// of injected fields are dropped, so every client's request is the same upstream request.
    pub(crate) fn route_request(
        &self,
        req: &mut Request<Incoming>,
    ) -> Result<Option<ActiveRoute>, ProxyError> {
        if self.config.routes_file.is_none() {
            // No routes file: not even the table's atomic load on the hit path.
            return Ok(None);
        }
        let guard = self.routes.load();
        let Some(table) = guard.as_ref() else {
            return Ok(None);
        };
        let route = match table.routes.match_route(req.method(), req.uri().path()) {
            Match::Default => return Ok(None),
            Match::NotAllowed => {
                return Err(match table.routes.methods_for(req.uri().path()) {
                    Some(allow) => ErrorKind::MethodNotRouted(allow).into(),
                    None => ErrorKind::NotRouted.into(),
                })
            }
            Match::Route(route) => route,
        };
        let active = ActiveRoute::new(table, route);
        for name in route.headers.names() {
            req.headers_mut().remove(name);
        }
        // The query rules shape cache keys: requests that do not go through the cache keep
        // their query as sent.
        let keyed = route.cache && matches!(*req.method(), Method::GET | Method::HEAD);
        if !keyed {
            return Ok(Some(active));
        }
        if route.query_cache_control {
            // This route's clients give their directives in the query (the interface of the
            // Go caching proxy it replaces), obeyed in full: the operator chose it per route.
            req.headers_mut().remove(CACHE_CONTROL);
            req.extensions_mut().insert(QueryDirectives);
        }
        // Nothing is allocated unless the route takes something out of the query.
        let (new_query, directives) = {
            let Some(query) = req.uri().query() else {
                return Ok(Some(active));
            };
            let taken = if route.query_cache_control {
                crate::routes::query::take_cache_control(query)
            } else {
                None
            };
            let rest = taken.as_ref().map_or(query, |t| &t.rest);
            let filtered = route.filter_query(rest);
            let changed = taken.is_some() || matches!(filtered, std::borrow::Cow::Owned(_));
            let new_query = changed.then(|| filtered.into_owned());
            (new_query, taken.map(|t| t.directives))
        };
        if let Some(query) = new_query {
            set_query(req, &query)?;
        }
        if let Some(d) = directives.filter(|d| !d.is_empty()) {
            let value = HeaderValue::try_from(d).map_err(|_| ErrorKind::BadQuery)?;
            req.headers_mut().append(CACHE_CONTROL, value);
        }
        Ok(Some(active))
    }

    /// The route a cache fill of `key` goes by (the key's path, as a GET): the same one the
    /// request that started it matched, and the one a background refresh uses.
    pub(crate) fn route_of_key(&self, key: &str) -> Option<ActiveRoute> {
        let guard = self.routes.load();
        let table = guard.as_ref()?;
        let path = split_key(key).1;
        let path = path.split_once('?').map_or(path, |(p, _)| p);
        match table.routes.match_route(&Method::GET, path) {
            Match::Route(route) => Some(ActiveRoute::new(table, route)),
            _ => None,
        }
    }

    /// Sends one request upstream for `route` (or as without routes): its pool, its injected
    /// headers last, within its rate limit and in-flight cap (refused: a
    /// [`UpstreamError::Limited`] with the 429/503 and its fields), and with its retries —
    /// backoff with full jitter, within the retry budget and `deadline`, only while the body
    /// can be sent again ([`retry::should_retry`]). Returns the response and the admission,
    /// which the caller keeps until it has read the response (the in-flight slot).
    pub(crate) async fn send_upstream(
        &self,
        route: Option<&ActiveRoute>,
        out: Outgoing<'_>,
    ) -> Result<(Response<Incoming>, Option<Admitted>), ProxyError> {
        let Outgoing {
            method,
            path_and_query,
            mut headers,
            mut body,
            deadline,
            client,
        } = out;
        let Some(active) = route else {
            let (body, _) = body.body();
            let resp = self
                .upstream
                .send_once(method, path_and_query, headers, body, deadline)
                .await?;
            return Ok((resp, None));
        };
        let route = active.route();
        let pool = active.pool().unwrap_or(&self.upstream);
        route.headers.apply(&mut headers);
        route.retry_budget.record_request(Instant::now());
        let mut attempt = 1;
        loop {
            let admitted = route.limits.admit(client).await.map_err(|r| {
                ProxyError::from(ErrorKind::Upstream(UpstreamError::Limited(Limited {
                    status: r.status(),
                    headers: r.headers(),
                })))
            })?;
            let (this_body, resendable) = body.body();
            let result = pool
                .send_once(method, path_and_query, headers.clone(), this_body, deadline)
                .await;
            let outcome = match &result {
                Ok(resp) => Outcome::Status(resp.status()),
                Err(e) => match &e.kind {
                    ErrorKind::Upstream(UpstreamError::Connect(_))
                    | ErrorKind::Upstream(UpstreamError::NoBackend { .. }) => Outcome::NotSent,
                    ErrorKind::Upstream(_) => Outcome::Failed,
                    // The client's body failed: nothing to retry.
                    _ => return result.map(|r| (r, Some(admitted))),
                },
            };
            let retry = route.retry.as_ref().is_some_and(|policy| {
                resendable && retry::should_retry(method, outcome, attempt, policy)
            });
            if retry {
                let wait = retry::backoff(attempt, retry::random_unit());
                if Instant::now() + wait < deadline && route.retry_budget.try_retry(Instant::now())
                {
                    drop(result);
                    drop(admitted);
                    tracing::debug!(
                        route = %route.label(),
                        attempt,
                        ?outcome,
                        wait_ms = wait.as_millis() as u64,
                        "retrying upstream request"
                    );
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                    continue;
                }
            }
            return result.map(|r| (r, Some(admitted)));
        }
    }
}

/// Replaces the request's query (`""`: none), keeping its path.
pub(crate) fn set_query(req: &mut Request<Incoming>, query: &str) -> Result<(), ProxyError> {
    let path = req.uri().path();
    let pq = if query.is_empty() {
        path.to_owned()
    } else {
        format!("{path}?{query}")
    };
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = Some(pq.parse().map_err(|_| ErrorKind::BadQuery)?);
    *req.uri_mut() = Uri::from_parts(parts).map_err(|_| ErrorKind::BadQuery)?;
    Ok(())
}

/// The `Allow` field for a 405.
pub(crate) fn allow_header(methods: &str) -> (http::HeaderName, HeaderValue) {
    (
        ALLOW,
        HeaderValue::from_str(methods).unwrap_or(HeaderValue::from_static("GET")),
    )
}
