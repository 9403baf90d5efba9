//! The request pipeline, in the order a request meets it:
//!
//! 1. `handle_inner` (route) — admin requests (a `Clear-Cache` header) go to [`purge`]
//!    (parsed and authorised by [`crate::admin`]) and never upstream; GET/HEAD go through the
//!    cache; everything else is passed through.
//! 2. `lookup` — the stored variant the request selects, and what to do with it
//!    ([`decide::serve`]): fresh → `HIT`; stale but servable (refresh window,
//!    `stale-while-revalidate`) → `STALE` plus a background refresh.
//! 3. `fetch_coalesced` — a miss or a revalidation joins the key's single flight (a request
//!    with `Authorization` gets a flight of its own); `lead` runs the fill in its own task,
//!    so it survives the leader's client going away.
//! 4. The fill ([`fetch`]: `fill`, `store`) publishes the response's head at once and
//!    streams the body to every waiter; `answer` turns what it published into each waiter's
//!    response ([`respond`]: from the stored entry, or from the body as it arrives).
//!
//! Steps return `Result<_, ProxyError>`; [`Proxy::handle`] turns an error into its one
//! response ([`respond::error`]), writes the access-log line and counts the request.
//!
//! The expiry task ([`Proxy::run_expiry`]) executes [`decide::on_deadline`]: it refreshes hot
//! keys when they expire and drops cold ones. Every decision is a pure function in
//! [`crate::cache::decide`]; this module only carries them out.

pub mod fetch;
pub mod fleet;
pub mod headers;
pub mod purge;
pub mod release;
pub mod respond;
pub mod routing;

use std::net::SocketAddr;
use std::sync::Arc;
use tokio::time::Instant;

use http::header::{self, HeaderMap};
use http::{Method, Request, Response};
use hyper::body::Incoming;
use tokio::sync::oneshot;

use crate::admin::CLEAR_CACHE;
use crate::body::ProxyBody;
use crate::body::Reader;
use crate::cache::coalesce::{FlightGuard, Role, Waiter};
use crate::cache::decide::{self, ExpiryAction, Now, OnError, Serve, Settings};
use crate::cache::entry::{clock_ms, CachedResponse};
use crate::cache::key::{
    host_allowed, origin_host, path_and_query, push_flight_suffix, request_key, split_key,
    BadOrigin, Key,
};
use crate::cache::{Cache, FetchOutcome};
use crate::config::Config;
use crate::error::{ErrorKind, ProxyError, Side, UpstreamError};
use crate::metrics::{Eviction, Metrics, RequestClass};
use crate::upstream::Upstream;
use fetch::FetchRequest;
use headers::{
    set_forwarded, set_forwarded_origin, strip_client_conditionals, strip_hop_by_hop, Downstream,
};
use respond::CacheStatus;
use std::sync::atomic::Ordering;
use tracing::Instrument;

/// Everything a request handler needs, shared by all connections.
pub struct Proxy {
    pub config: Config,
    pub cache: Cache,
    pub upstream: Upstream,
    pub metrics: Metrics,
    /// Wrong admin keys per client address.
    pub admin_throttle: crate::admin::Throttle,
    /// Background work (refreshes spawned here; the expiry task, probes and operator
    /// listener the server starts) under one cancellation tree, awaited at shutdown.
    pub background: crate::supervise::Background,
    /// The settings the cache's decisions ([`decide`]) read, taken from `config` once.
    settings: Settings,
    /// Background refreshes (expiry, stale serving, admin) share these `REFRESH_CONCURRENCY`
    /// slots, so a refresh of many keys never becomes a herd of its own.
    refresh_slots: Arc<tokio::sync::Semaphore>,
    /// The routes in force (`ROUTES_FILE`; empty without one), swapped whole on SIGHUP.
    routes: arc_swap::ArcSwapOption<routing::RouteTable>,
    /// Requests released at their route's client deadline ([`release`]), and the callbacks
    /// their results are sent to.
    pub jobs: crate::jobs::Jobs,
    pub callbacks: Arc<crate::jobs::callback::Callbacks>,
}

/// What a cache fill is asked for on behalf of one request, and how to answer it.
struct Asking<'a> {
    head: bool,
    /// The request's headers (preconditions, `Range`, the `Vary` variant it selects).
    req: &'a HeaderMap,
    /// The stored response being revalidated, for `stale-if-error`.
    base: Option<&'a Arc<CachedResponse>>,
    status: CacheStatus,
    key: &'a str,
}

/// Facts about one request gathered for its access-log line, and its span.
pub(crate) struct Trace {
    cache: Option<CacheStatus>,
    upstream_ms: Option<u64>,
    coalesced: bool,
    admin: bool,
    /// The request's span (`debug`): disabled — and free — unless debug logging is on.
    /// `key` is recorded on it once known.
    span: tracing::Span,
}

impl Proxy {
    pub fn new(config: Config) -> Self {
        let upstream = Upstream::new(&config);
        let max_bytes = config.max_bytes;
        let mut cache = Cache::new(max_bytes, config.stream_buffer, config.stream_buffer_total);
        if let Some(redis) = &config.redis {
            // The URL was checked with the same parser when the configuration was read.
            match crate::cache::shared::SharedTier::new(redis) {
                Ok(tier) => cache = cache.with_shared(tier),
                Err(error) => {
                    tracing::error!(%error, "REDIS_URL unusable: running without the shared tier")
                }
            }
        }
        Proxy {
            cache,
            upstream,
            metrics: Metrics::default(),
            admin_throttle: Default::default(),
            background: crate::supervise::Background::new(),
            refresh_slots: Arc::new(tokio::sync::Semaphore::new(config.refresh_concurrency)),
            settings: Settings::from(&config),
            routes: arc_swap::ArcSwapOption::empty(),
            jobs: crate::jobs::Jobs::new(&config.jobs),
            callbacks: Arc::new(crate::jobs::callback::Callbacks::new(
                config.jobs.callback_secret.clone(),
                crate::jobs::callback::RetryPolicy::default(),
            )),
            config,
        }
    }

    /// Handles one downstream request: runs the pipeline (`handle_inner`) in the
    /// request's span, turns a failure into its response ([`respond::error`]), counts the
    /// request and writes its access-log line.
    pub async fn handle(
        self: &Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        // The access log needs the request line after the request is consumed: keep a copy
        // only when the line will actually be written.
        let down = Downstream::new(peer.ip(), &self.config.trusted_proxies);
        let logged =
            tracing::enabled!(target: "edgecache::access", tracing::Level::INFO).then(|| {
                let client = down.client(req.headers());
                (req.method().clone(), req.uri().clone(), client)
            });
        // At `debug` so that at the default `info` the hit path builds no span: the fields are
        // only evaluated, and the client address only derived, when the span is enabled.
        let span = tracing::debug_span!(
            "request",
            method = %req.method(),
            path = path_and_query(req.uri()),
            client = tracing::field::Empty,
            key = tracing::field::Empty,
        );
        if !span.is_disabled() {
            let client = match &logged {
                Some((_, _, client)) => *client,
                None => down.client(req.headers()),
            };
            span.record("client", tracing::field::display(client));
        }
        let mut trace = Trace {
            cache: None,
            upstream_ms: None,
            coalesced: false,
            admin: false,
            span: span.clone(),
        };
        let resp = match self
            .handle_inner(req, &down, &mut trace)
            .instrument(span)
            .await
        {
            Ok(resp) => resp,
            Err(e) => {
                log_error(&e, &trace.span);
                respond::error(&e)
            }
        };
        self.metrics
            .count_request(RequestClass::of(trace.cache, trace.admin));
        if let Some((method, uri, client)) = logged {
            tracing::info!(
                target: "edgecache::access",
                %method,
                path = %uri.path_and_query().map_or("/", |pq| pq.as_str()),
                status = resp.status().as_u16(),
                cache = trace.cache.map_or("-", CacheStatus::as_str),
                coalesced = trace.coalesced,
                upstream_ms = trace.upstream_ms,
                total_ms = started.elapsed().as_millis() as u64,
                %client,
                peer = %peer.ip(),
            );
        }
        resp
    }

    /// The route step: admin requests go to [`purge`](Proxy::purge), GET/HEAD to the cache,
    /// `CONNECT` is refused, anything else is passed through. Errs for a bad or unserved
    /// origin, and with whatever the step it chose failed with.
    async fn handle_inner(
        self: &Arc<Self>,
        mut req: Request<Incoming>,
        down: &Downstream<'_>,
        trace: &mut Trace,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        if req.headers().contains_key(CLEAR_CACHE) {
            trace.admin = true;
            return Ok(self.purge(req, down).await);
        }
        if let Some(resp) = self.job_status(&req) {
            return Ok(resp);
        }
        let route = self.route_request(&mut req)?;
        if let Some(limit) = route.as_ref().and_then(|r| r.route().client_deadline) {
            if let Some(route) = route {
                return self.release_after(req, down, route, limit, trace).await;
            }
        }
        self.dispatch(req, down, route, trace).await
    }

    /// The request for its step (after the admin check and its route): GET/HEAD to the
    /// cache (unless the route bypasses it), `CONNECT` refused, anything else passed
    /// through. Errs for a bad or unserved origin, and with whatever the step failed with.
    async fn dispatch(
        self: &Arc<Self>,
        req: Request<Incoming>,
        down: &Downstream<'_>,
        route: Option<routing::ActiveRoute>,
        trace: &mut Trace,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let key = match request_key(req.uri(), req.headers(), down.peer_trusted) {
            Ok(key) => key,
            Err(BadOrigin::Host) => return Err(ErrorKind::InvalidHost.into()),
            Err(BadOrigin::Scheme) => return Err(ErrorKind::InvalidForwardedProto.into()),
        };
        trace.span.record("key", key.as_str());
        if !self.config.allowed_hosts.is_empty()
            && !host_allowed(origin_host(split_key(&key).0), &self.config.allowed_hosts)
        {
            // RFC 9110 §15.5.20: not a host this proxy answers for; nothing is looked up.
            return Err(ErrorKind::HostNotServed.into());
        }
        let cached = route.as_ref().is_none_or(|r| r.route().cache);
        match *req.method() {
            Method::GET | Method::HEAD if cached => {
                // A GET or HEAD body has no defined meaning (RFC 9110 §9.3.1): it is not read.
                let (parts, _body) = req.into_parts();
                self.lookup(parts, down, key, trace).await
            }
            Method::CONNECT => Err(ErrorKind::ConnectNotSupported.into()),
            _ => {
                trace.cache = Some(CacheStatus::Bypass);
                self.pass(req, down, split_key(&key).0, route.as_ref(), trace)
                    .await
            }
        }
    }

    /// GET/HEAD: serve from the store when possible, else fetch through the single flight.
    async fn lookup(
        self: &Arc<Self>,
        req: http::request::Parts,
        down: &Downstream<'_>,
        key: String,
        trace: &mut Trace,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let head = req.method == Method::HEAD;
        let now = Instant::now();
        let client = if req.extensions.get::<routing::QueryDirectives>().is_some() {
            let full = Settings {
                client_cache_control: crate::config::ClientCacheControl::Full,
                ..self.settings
            };
            decide::client_directives(&req.headers, &full)
        } else {
            decide::client_directives(&req.headers, &self.settings)
        };
        let base = self.cache.lookup(&key, &req.headers).map(|hit| hit.entry);
        if let Some(entry) = &base {
            entry.touch();
        }
        // `serve` answers Fresh or Stale only for a stored entry.
        match (
            decide::serve(base.as_deref(), &client, &self.settings, Now::at(now)),
            &base,
        ) {
            (Serve::Fresh, Some(entry)) => {
                trace.cache = Some(CacheStatus::Hit);
                return Ok(respond::from_entry(
                    entry,
                    head,
                    &req.headers,
                    CacheStatus::Hit,
                    now,
                ));
            }
            (Serve::Stale { refresh }, Some(entry)) => {
                if refresh {
                    if let Some(key) = self.cache.shared_key(&key) {
                        drop(self.refresh_hot(key, entry.clone()));
                    }
                }
                trace.cache = Some(CacheStatus::Stale);
                return Ok(respond::from_entry(
                    entry,
                    head,
                    &req.headers,
                    CacheStatus::Stale,
                    now,
                ));
            }
            _ => {}
        }
        if client.only_if_cached {
            // RFC 9111 §5.2.1.7: nothing usable stored → 504, without contacting the origin.
            trace.cache = Some(CacheStatus::Miss);
            return Err(ErrorKind::NotCached.into());
        }
        let status = if base.is_some() {
            CacheStatus::Refresh
        } else {
            CacheStatus::Miss
        };
        trace.cache = Some(status);
        let started = Instant::now();
        let resp = self
            .fetch_coalesced(req, down, key, base, status, trace)
            .await;
        trace.upstream_ms = Some(started.elapsed().as_millis() as u64);
        resp
    }

    /// Fetches a missing or stale entry once for all concurrent requesters.
    async fn fetch_coalesced(
        self: &Arc<Self>,
        parts: http::request::Parts,
        down: &Downstream<'_>,
        key: String,
        base: Option<Arc<CachedResponse>>,
        status: CacheStatus,
        trace: &mut Trace,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let head = parts.method == Method::HEAD;
        let key: Key = self
            .cache
            .shared_key(&key)
            .unwrap_or_else(|| Key::from(key));
        let fetch = FetchRequest {
            key: key.clone(),
            headers: self.upstream_headers(&parts.headers, down, split_key(&key).0, true),
            base: base.clone(),
            last_access_ms: clock_ms(),
            started: Instant::now(),
            defer_share: false,
            client: down.client(&parts.headers),
        };

        let ctx = Asking {
            head,
            req: &parts.headers,
            base: base.as_ref(),
            status,
            key: &key,
        };

        // A request with credentials may get a personalised answer: it never leads or joins a
        // flight, though the response is still stored when the origin marks it shareable.
        if parts.headers.contains_key(header::AUTHORIZATION) {
            return self.lead(self.cache.detached_flight(), fetch, &ctx).await;
        }

        let vary_names = match &base {
            Some(b) => b.vary.names().to_vec(),
            None => self.cache.vary_names(&key),
        };
        let mut flight_key = String::with_capacity(key.len());
        flight_key.push_str(&key);
        push_flight_suffix(&mut flight_key, &vary_names, &parts.headers);

        let flight = flight_key.clone();
        match self.cache.join_flight(flight_key) {
            Role::Leader(guard) => {
                // Someone may have stored it between our lookup and taking the flight.
                if let Some(entry) = self.cache.lookup(&key, &parts.headers).map(|hit| hit.entry) {
                    let now = Instant::now();
                    if entry.is_fresh(now) && base.as_ref().is_none_or(|b| b.id != entry.id) {
                        guard.publish(FetchOutcome::Stored(entry.clone()));
                        trace.cache = Some(CacheStatus::Hit);
                        return Ok(respond::from_entry(
                            &entry,
                            head,
                            &parts.headers,
                            CacheStatus::Hit,
                            now,
                        ));
                    }
                }
                // With REDIS_URL: another instance may have it, or be fetching it — one
                // fetch for the whole fleet (one look per flight here).
                let lease = match self.fleet_turn(&key, &flight, &parts.headers).await {
                    fleet::FleetTurn::Found(entry) => {
                        guard.publish(FetchOutcome::Stored(entry.clone()));
                        trace.cache = Some(CacheStatus::Hit);
                        return Ok(fleet::respond_shared(&entry, head, &parts.headers));
                    }
                    fleet::FleetTurn::Lead(lease) => Some(lease),
                    fleet::FleetTurn::Alone => None,
                };
                self.lead_for(guard, fetch, &ctx, lease).await
            }
            Role::Follower(mut waiter) => {
                trace.coalesced = true;
                self.metrics.coalesced.fetch_add(1, Ordering::Relaxed);
                let outcome = waiter.wait().await;
                let answer = outcome.and_then(|o| self.answer(o, waiter.take_body(), &ctx, true));
                match answer {
                    Some(mut resp) => {
                        if let Ok(resp) = &mut resp {
                            respond::mark_collapsed(resp);
                        }
                        resp
                    }
                    // Not shareable, another variant, or the leader vanished: fetch alone.
                    None => self.lead(self.cache.detached_flight(), fetch, &ctx).await,
                }
            }
        }
    }

    /// Starts the fill for `flight` in its own task — it completes (and is stored, and the
    /// followers are served) even if this client goes away; on the cancellation tree, so a
    /// panic in it is logged and shutdown awaits it — and answers this request from it.
    async fn lead(
        self: &Arc<Self>,
        flight: FlightGuard<FetchOutcome>,
        fetch: FetchRequest,
        ctx: &Asking<'_>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        self.lead_for(flight, fetch, ctx, None).await
    }

    /// [`Proxy::lead`], holding the fleet's `lease` on this fetch when given: it is kept
    /// alive while the fill runs; the copy is written to the shared tier, then the other
    /// instances are woken (to read it, or to fetch their own if it is not there), then the
    /// lease is given back.
    async fn lead_for(
        self: &Arc<Self>,
        flight: FlightGuard<FetchOutcome>,
        mut fetch: FetchRequest,
        ctx: &Asking<'_>,
        lease: Option<crate::cache::shared::Lease>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let mut waiter = flight.waiter();
        let (pass_to, passed) = oneshot::channel();
        let proxy = self.clone();
        fetch.defer_share = lease.is_some();
        self.background.spawn("fill", async move {
            let key = fetch.key.clone();
            let fill = proxy.fill(fetch, &flight, Some(pass_to));
            proxy.fill_for_fleet(fill, &key, lease).await;
        });
        let outcome = waiter.wait().await;
        if let Some(FetchOutcome::NotShared) = outcome {
            return match passed.await {
                Ok(resp) => Ok(respond::passed(resp, ctx.head, ctx.status)),
                Err(_) => Err(ErrorKind::FetchAbandoned.into()),
            };
        }
        match outcome.and_then(|o| self.answer(o, waiter.take_body(), ctx, false)) {
            Some(resp) => resp,
            None => {
                tracing::warn!(
                    key = ctx.key,
                    "the upstream fetch task ended without an answer"
                );
                Err(ErrorKind::FetchAbandoned.into())
            }
        }
    }

    /// The response for what a fill published, when it can be shared with this request:
    /// `None` when the request must fetch alone (not shareable, or another `Vary` variant).
    fn answer(
        &self,
        outcome: FetchOutcome,
        body: Option<Reader>,
        ctx: &Asking<'_>,
        collapsed: bool,
    ) -> Option<Result<Response<ProxyBody>, ProxyError>> {
        let now = Instant::now();
        match outcome {
            FetchOutcome::Stored(entry) if entry.vary.matches(ctx.req) => Some(Ok(
                respond::from_entry(&entry, ctx.head, ctx.req, ctx.status, now),
            )),
            FetchOutcome::Streaming(filling) if filling.vary.matches(ctx.req) => {
                let resp = |body| {
                    respond::from_filling(
                        &filling, body, ctx.head, ctx.req, ctx.status, collapsed, now,
                    )
                };
                body.map(|body| Ok(resp(body)))
            }
            FetchOutcome::Failed(e) => {
                Some(self.respond_failed(e, ctx.head, ctx.req, ctx.base, ctx.key))
            }
            _ => None,
        }
    }

    /// An upstream failure fetching `key`: the stale entry when its `stale-if-error` allows,
    /// else the error. Logged here, where the path is known.
    fn respond_failed(
        &self,
        err: UpstreamError,
        head: bool,
        req: &HeaderMap,
        base: Option<&Arc<CachedResponse>>,
        key: &str,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let now = Instant::now();
        let path = split_key(key).1;
        let serve_stale = |b: &&Arc<CachedResponse>| {
            decide::on_upstream_error(b, &self.settings, now) == OnError::ServeStale
        };
        if let Some(base) = base.filter(serve_stale) {
            tracing::warn!(
                path,
                %key,
                kind = err.as_str(),
                error = %err,
                "upstream request failed; serving the stale copy"
            );
            return Ok(respond::from_entry(
                base,
                head,
                req,
                CacheStatus::Stale,
                now,
            ));
        }
        tracing::warn!(path, %key, kind = err.as_str(), error = %err, "upstream request failed");
        Err(err.into())
    }

    /// Starts (or joins) a background refresh of one stored variant. The returned waiter can
    /// be awaited for the outcome or dropped.
    pub(crate) fn refresh(
        self: &Arc<Self>,
        key: Key,
        entry: Arc<CachedResponse>,
    ) -> Waiter<FetchOutcome> {
        self.refresh_as(key, entry, false)
    }

    /// [`Proxy::refresh`] of a hot key (the expiry task, stale serving): with a shared tier,
    /// once for the fleet ([`Proxy::refresh_turn`]). Admin refreshes always refetch.
    pub(crate) fn refresh_hot(
        self: &Arc<Self>,
        key: Key,
        entry: Arc<CachedResponse>,
    ) -> Waiter<FetchOutcome> {
        self.refresh_as(key, entry, true)
    }

    fn refresh_as(
        self: &Arc<Self>,
        key: Key,
        entry: Arc<CachedResponse>,
        once_for_fleet: bool,
    ) -> Waiter<FetchOutcome> {
        let mut headers = entry.vary.request_headers();
        // Refreshes carry no client's headers, but the origin they are keyed by.
        set_forwarded_origin(&mut headers, split_key(&key).0);
        let mut flight_key = String::with_capacity(key.len());
        flight_key.push_str(&key);
        push_flight_suffix(&mut flight_key, entry.vary.names(), &headers);
        let flight_key_copy = flight_key.clone();
        match self.cache.join_flight(flight_key) {
            // An admin caller waits for the outcome only, never for the body.
            Role::Follower(mut waiter) => {
                drop(waiter.take_body());
                waiter
            }
            Role::Leader(guard) => {
                let waiter = guard.watcher();
                let fetch = FetchRequest {
                    key: key.clone(),
                    headers,
                    last_access_ms: entry.last_access_ms(),
                    base: Some(entry.clone()),
                    started: Instant::now(),
                    defer_share: false,
                    client: std::net::Ipv4Addr::UNSPECIFIED.into(),
                };
                let proxy = self.clone();
                let flight = flight_key_copy;
                self.background.spawn("refresh", async move {
                    // The semaphore is never closed; without a slot the refresh runs anyway.
                    let _slot = proxy.refresh_slots.clone().acquire_owned().await;
                    let mut lease = None;
                    if once_for_fleet {
                        match proxy.refresh_turn(&key, &flight, &entry).await {
                            fleet::RefreshTurn::Refresh(held) => lease = held,
                            fleet::RefreshTurn::Adopted(newer) => {
                                guard.publish(FetchOutcome::Stored(newer));
                                return;
                            }
                            fleet::RefreshTurn::Elsewhere => return,
                        }
                    }
                    let mut fetch = fetch;
                    // Holding the fleet's lease, the copy is written before waking the others.
                    fetch.defer_share = lease.is_some();
                    let fill = proxy.fill(fetch, &guard, None);
                    let outcome = proxy.fill_for_fleet(fill, &key, lease).await;
                    if let FetchOutcome::Failed(e) = outcome {
                        let backoff = entry.refresh_failed();
                        tracing::warn!(
                            path = split_key(&key).1,
                            %key,
                            kind = e.as_str(),
                            error = %e,
                            retry_in_secs = backoff.as_secs(),
                            "background refresh failed; keeping the stored copy"
                        );
                        proxy
                            .metrics
                            .refreshes_failed
                            .fetch_add(1, Ordering::Relaxed);
                    } else {
                        proxy.metrics.refreshes_ok.fetch_add(1, Ordering::Relaxed);
                    }
                });
                waiter
            }
        }
    }

    /// Passes a request through without caching, streaming bodies both ways. A successful
    /// unsafe method invalidates the stored entry for its URL (RFC 9111 §4.4).
    async fn pass(
        self: &Arc<Self>,
        req: Request<Incoming>,
        down: &Downstream<'_>,
        origin: &str,
        route: Option<&routing::ActiveRoute>,
        trace: &mut Trace,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let (parts, body) = req.into_parts();
        let path = path_and_query(&parts.uri);
        let headers = self.upstream_headers(&parts.headers, down, origin, false);
        let method = parts.method.clone();
        let declared = parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.trim().parse::<u64>().ok());
        let remaining = match self.config.limits.max_request_body {
            None => u64::MAX,
            Some(limit) => {
                if declared.is_some_and(|n| n > limit) {
                    return Err(ErrorKind::BodyTooLarge.into());
                }
                limit
            }
        };
        let body = ProxyBody::Downstream {
            rest: body,
            remaining,
        };
        // A route that retries this method reads a small body whole first, so a retry can
        // send it again.
        let retried = route.and_then(|r| r.route().retry).is_some_and(|policy| {
            policy.retry_unsafe || crate::routes::retry::is_idempotent(&method)
        });
        let body = if parts.headers.contains_key(header::CONTENT_LENGTH)
            || parts.headers.contains_key(header::TRANSFER_ENCODING)
        {
            if retried && declared.is_some_and(|n| n <= routing::RETRY_BODY_LIMIT) {
                match http_body_util::BodyExt::collect(body).await {
                    Ok(all) => routing::Resend::Buffered(all.to_bytes()),
                    Err(e) => {
                        let fault = crate::error::BodyFault::find(&*e)
                            .unwrap_or(crate::error::BodyFault::Malformed);
                        return Err(fault.into());
                    }
                }
            } else {
                routing::Resend::Stream(body)
            }
        } else {
            routing::Resend::Empty
        };
        let started = Instant::now();
        let deadline = self.upstream.deadline();
        let sent = self.send_upstream(
            route,
            routing::Outgoing {
                method: &method,
                path_and_query: path,
                headers,
                body,
                deadline,
                client: down.client(&parts.headers),
            },
        );
        let result = sent.await.map(|(resp, _admitted)| resp);
        trace.upstream_ms = Some(started.elapsed().as_millis() as u64);
        match result {
            // A body the client sent too large or broken is its fault (413 / 400 and
            // `Connection: close`), not the upstream's: logged by `handle`, at debug.
            Err(e) if e.side == Side::Downstream => Err(e),
            Err(e) => {
                tracing::warn!(path, %method, kind = e.kind.as_str(), error = %e, "upstream request failed");
                Err(e)
            }
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                if !method.is_safe() && (parts.status.is_success() || parts.status.is_redirection())
                {
                    self.invalidate(origin, path, &parts.headers);
                }
                strip_hop_by_hop(&mut parts.headers);
                Ok(respond::passed(
                    Response::from_parts(parts, ProxyBody::stream(body)),
                    false,
                    CacheStatus::Bypass,
                ))
            }
        }
    }

    /// RFC 9111 §4.4: a successful unsafe request invalidates its target URI and the
    /// same-origin URIs in the response's `Location` and `Content-Location`.
    fn invalidate(self: &Arc<Self>, origin: &str, path: &str, resp: &HeaderMap) {
        let mut key = String::with_capacity(origin.len() + path.len());
        key.push_str(origin);
        key.push_str(path);
        let mut removed = self.cache.invalidate(&key);
        self.invalidate_shared(&key);
        for name in [header::LOCATION, header::CONTENT_LOCATION] {
            let Some(target) = resp.get(&name).and_then(|v| v.to_str().ok()) else {
                continue;
            };
            let Ok(uri) = target.trim().parse::<http::Uri>() else {
                continue;
            };
            let same_origin = match uri.authority() {
                None => true,
                Some(auth) => auth.as_str().eq_ignore_ascii_case(origin_host(origin)),
            };
            if same_origin && uri.path().starts_with('/') {
                key.truncate(origin.len());
                key.push_str(path_and_query(&uri));
                removed += self.cache.invalidate(&key);
                self.invalidate_shared(&key);
            }
        }
        self.metrics.evicted(Eviction::Invalidated, removed);
    }

    /// The headers to send upstream for a downstream request.
    fn upstream_headers(
        &self,
        downstream: &HeaderMap,
        down: &Downstream<'_>,
        origin: &str,
        for_cache: bool,
    ) -> HeaderMap {
        let mut h = downstream.clone();
        strip_hop_by_hop(&mut h);
        h.remove(header::EXPECT);
        set_forwarded(&mut h, down, origin);
        if for_cache {
            strip_client_conditionals(&mut h);
        }
        h
    }

    /// Stores `entry` and arms its timer ([`decide::timer_at`]); evicts for room, expired cold
    /// entries first ([`decide::evict_first`]).
    pub(crate) fn store(&self, key: Key, entry: Arc<CachedResponse>) {
        let at = decide::timer_at(&entry, &self.settings);
        let now = Now::at(Instant::now());
        let past_window = |e: &CachedResponse| decide::evict_first(e, &self.settings, now);
        let evicted = self.cache.insert(key, entry, at, &past_window);
        self.metrics.evicted(Eviction::Capacity, evicted);
    }

    /// The expiry task: when an entry is about to expire, refresh it in the background if a
    /// client asked for it within the refresh window; at expiry keep it while
    /// `stale-while-revalidate` / `stale-if-error` / `STALE_RETENTION_SECS` allow, else drop it.
    ///
    /// Run under [`crate::supervise::supervise`]: if handling one deadline panics, the rest
    /// of its batch is scheduled again (the queue lives in the cache), so the restarted task
    /// loses only the deadline that panicked.
    pub async fn run_expiry(self: Arc<Self>) {
        /// Puts back the deadlines of a batch not handled yet when it is dropped.
        struct Batch<'a> {
            due: std::vec::IntoIter<(Key, u64)>,
            cache: &'a Cache,
        }
        impl Drop for Batch<'_> {
            fn drop(&mut self) {
                let now = Instant::now();
                for (key, id) in self.due.by_ref() {
                    self.cache.recheck(now, key, id);
                }
            }
        }
        loop {
            let mut batch = Batch {
                due: self.cache.next_due().await.into_iter(),
                cache: &self.cache,
            };
            for (key, id) in batch.due.by_ref() {
                self.on_deadline(key, id);
            }
        }
    }

    fn on_deadline(self: &Arc<Self>, key: Key, id: u64) {
        let Some(entry) = self.cache.lookup_version(&key, id) else {
            return; // replaced or removed since
        };
        match decide::on_deadline(&entry, &self.settings, Now::at(Instant::now())) {
            ExpiryAction::Refresh { recheck } => {
                drop(self.refresh_hot(key.clone(), entry));
                self.cache.recheck(recheck, key, id);
            }
            ExpiryAction::Recheck(at) => self.cache.recheck(at, key, id),
            ExpiryAction::Drop => {
                if self.cache.invalidate_version(&key, id) {
                    self.metrics.evicted(Eviction::Expired, 1);
                }
                tracing::debug!(key = %key, "expired entry dropped");
            }
        }
    }
}

/// Logs a refusal of the client's request (its fault: routine, so at debug) in the request's
/// span. Every other failure was logged where it happened, with the path.
fn log_error(e: &ProxyError, span: &tracing::Span) {
    if e.side == Side::Downstream {
        let _in_request = span.enter();
        tracing::debug!(kind = e.kind.as_str(), error = %e, "request refused");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Lets spawned tasks woken by the last time advance run.
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    fn proxy(vars: &[(&str, &str)]) -> Arc<Proxy> {
        let config = Config::from_lookup(|k| {
            vars.iter()
                .find(|(name, _)| *name == k)
                .map(|(_, v)| v.to_string())
                .or_else(|| (k == "UPSTREAM_URL").then(|| "http://127.0.0.1:1".into()))
        })
        .expect("test config");
        Arc::new(Proxy::new(config))
    }

    /// The expiry task under paused time: a cold entry (fresh for 60 s) is kept past expiry
    /// while `STALE_IF_ERROR_SECS=30` allows, then dropped and counted — without the test
    /// waiting 90 real seconds.
    #[tokio::test(start_paused = true)]
    async fn cold_entries_are_kept_for_stale_if_error_then_dropped() {
        let proxy = proxy(&[
            ("DEFAULT_REFRESH_WINDOW_SECS", "0"),
            ("STALE_IF_ERROR_SECS", "30"),
        ]);
        let expiry = tokio::spawn(proxy.clone().run_expiry());
        let entry = crate::cache::entry::test_entry(10);
        let key = Key::from("http://a/x");
        proxy.store(key.clone(), entry.clone());
        let stored = |p: &Proxy| p.cache.lookup_version(&key, entry.id).is_some();

        tokio::time::sleep(Duration::from_secs(59)).await;
        settle().await;
        assert!(stored(&proxy), "fresh");
        tokio::time::sleep(Duration::from_secs(2)).await;
        settle().await;
        assert!(stored(&proxy), "expired, kept for stale-if-error");
        tokio::time::sleep(Duration::from_secs(30)).await;
        settle().await;
        assert!(!stored(&proxy), "dropped 30 s past expiry");
        let mut metrics = String::new();
        proxy.metrics.render(&mut metrics);
        assert!(metrics.contains("edgecache_evictions_total{reason=\"expired\"} 1"));
        expiry.abort();
    }

    /// Without any allowance a cold entry goes at expiry, not before.
    #[tokio::test(start_paused = true)]
    async fn cold_entries_are_dropped_at_expiry() {
        let proxy = proxy(&[("DEFAULT_REFRESH_WINDOW_SECS", "0")]);
        let expiry = tokio::spawn(proxy.clone().run_expiry());
        let entry = crate::cache::entry::test_entry(10);
        proxy.store(Key::from("http://a/y"), entry.clone());
        tokio::time::sleep(Duration::from_millis(59_999)).await;
        settle().await;
        assert!(!proxy.cache.is_empty());
        tokio::time::sleep(Duration::from_millis(2)).await;
        settle().await;
        assert!(proxy.cache.is_empty());
        expiry.abort();
    }

    /// An upstream that takes connections and reads whatever comes, never answering: the
    /// request body's own failure is all that can end an exchange with it.
    async fn silent_upstream() -> std::net::SocketAddr {
        use tokio::io::AsyncReadExt;
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
                });
            }
        });
        addr
    }

    /// The daemon on an ephemeral port, `UPSTREAM_URL=upstream`, no active health checks.
    async fn serve(
        upstream: String,
        vars: &'static [(&'static str, &'static str)],
    ) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = Config::from_lookup(|k| match k {
            "UPSTREAM_URL" => Some(upstream.clone()),
            "HEALTH_CHECK_INTERVAL_SECS" => Some("0".into()),
            _ => vars
                .iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string()),
        })
        .expect("test config");
        tokio::spawn(crate::run(
            listener,
            None,
            config,
            None,
            std::future::pending(),
        ));
        addr
    }

    /// Sends `request` on a new connection; returns what comes back before the connection
    /// closes (or 5 s pass).
    async fn exchange(addr: std::net::SocketAddr, request: &[u8]) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(request).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    }

    /// A streamed request body's faults travel to the answer through the body's error (no
    /// shared flag): over `MAX_REQUEST_BODY_BYTES` → 413; broken chunking → 400 and
    /// `Connection: close`. The upstream is not blamed (no 502).
    #[tokio::test]
    async fn request_body_faults_are_the_clients() {
        let upstream = format!("http://{}", silent_upstream().await);
        let proxy = serve(upstream, &[("MAX_REQUEST_BODY_BYTES", "1KiB")]).await;
        assert_body_faults_are_the_clients(proxy).await;
    }

    /// An over-limit chunked body gets 413, a broken one 400 with `Connection: close`.
    async fn assert_body_faults_are_the_clients(proxy: std::net::SocketAddr) {
        let big = format!(
            "POST /u HTTP/1.1\r\nhost: x\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\n800\r\n{}\r\n0\r\n\r\n",
            "y".repeat(2048)
        );
        let resp = exchange(proxy, big.as_bytes()).await;
        assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");
        assert!(resp.ends_with("request body too large\n"), "{resp}");

        let broken = b"POST /u HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n";
        let resp = exchange(proxy, broken).await;
        assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
        assert!(
            resp.to_ascii_lowercase().contains("connection: close"),
            "{resp}"
        );
        assert!(resp.ends_with("malformed request body\n"), "{resp}");
    }

    /// The same over HTTP/2 to an `h2c://` backend, where hyper does not hand the body's
    /// error back but resets the stream with the fault's reason (see `BodyFault`).
    #[tokio::test]
    async fn request_body_faults_are_the_clients_over_h2() {
        use hyper_util::rt::{TokioExecutor, TokioIo};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                tokio::spawn(async move {
                    // Answers only once the whole body is in.
                    let svc = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        let _ = http_body_util::BodyExt::collect(req.into_body()).await;
                        Ok::<_, std::convert::Infallible>(Response::new(ProxyBody::full("ok")))
                    });
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        let proxy = serve(
            format!("h2c://{addr}"),
            &[("MAX_REQUEST_BODY_BYTES", "1KiB")],
        )
        .await;
        let small = "POST /u HTTP/1.1\r\nhost: x\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
        let resp = exchange(proxy, small.as_bytes()).await;
        assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
        assert_body_faults_are_the_clients(proxy).await;
    }
}
