//! The upstream side: a pool of backends (`UPSTREAM_URL` or weighted `UPSTREAM_URLS`), each
//! with its own keep-alive connection pool (HTTP/1.1, HTTP/2 with prior knowledge, or
//! `https://` with HTTP/2 when the server picks it by ALPN: [`tls`]), picked
//! by smooth weighted round-robin ([`balancer`]) among those whose health allows it
//! ([`health`]: active probes plus a circuit breaker fed by live traffic; when too few are up
//! by the probes, all of them — Envoy's panic threshold). Failures are classified into
//! [`UpstreamError`].
//!
//! Retries: an idempotent request without a body that fails before any response byte arrived
//! (connect error, or a kept-alive connection the backend closed under it) is tried again —
//! up to `UPSTREAM_RETRIES` times, on another available backend, else on a fresh connection to
//! the same one — but never after the `REQ_TIMEOUT` deadline passed. Requests with a body are
//! retried only by hyper-util itself, when a pooled connection failed before the request was
//! written. To avoid the race in the first place, idle connections are retired after
//! `UPSTREAM_IDLE_TIMEOUT_SECS`, lowered per backend to below its advertised
//! `Keep-Alive: timeout=N`.

pub mod balancer;
pub mod health;
pub mod tls;

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, Version};
use hyper::body::{Body as _, Incoming};
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;

use crate::body::ProxyBody;
use crate::config::{BackendConfig, Config, PoolConfig, UpstreamUrl};
use crate::error::{chain, BodyFault, ProxyError, UpstreamError};
use crate::metrics::{self, Histogram};
use balancer::SmoothWeighted;
use health::{Admission, Health, Probe, Thresholds, Transition};
use tls::{Connector, TlsConfigs};

type HttpClient = Client<Connector, ProxyBody>;

/// One backend's health-check loop (see [`Upstream::health_checks`]).
pub type BoxedProbe = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// One upstream backend and its connection pool.
pub struct Backend {
    pub url: UpstreamUrl,
    pub weight: u32,
    pub http2: bool,
    /// The keep-alive pool; rebuilt (once per lowering) with a shorter idle timeout when the
    /// backend advertises `Keep-Alive: timeout=N` below the current one.
    client: RwLock<HttpClient>,
    /// The same without idle connections: retries go out on a connection of their own, as
    /// the pool could hand out another connection the backend is closing.
    fresh: HttpClient,
    connector: Connector,
    max_idle_per_host: usize,
    /// The current idle timeout of `client`, in milliseconds.
    idle_timeout_ms: AtomicU64,
    health: Mutex<Health>,
    requests: AtomicU64,
    failures: AtomicU64,
    /// Requests retried after failing on this backend.
    retries: AtomicU64,
    /// Responses by status class 1xx–5xx, then errors without a response.
    outcomes: [AtomicU64; 6],
    latency: Histogram,
}

/// One backend as `GET /status` reports it (the field names are the JSON keys).
#[derive(Debug, Clone, serde::Serialize)]
pub struct BackendStatus {
    /// `http://authority/prefix` (also for an `h2c://` backend) or `https://…`.
    pub url: String,
    pub weight: u32,
    pub http2: bool,
    /// `up`, `down`, `breaker_open` or `breaker_half_open`.
    pub state: &'static str,
    pub requests: u64,
    pub failures: u64,
    pub retries: u64,
    pub idle_timeout_ms: u64,
}

fn build_client(
    connector: &Connector,
    http2: bool,
    idle_timeout: Duration,
    max_idle: usize,
) -> HttpClient {
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .pool_idle_timeout(idle_timeout)
        .pool_max_idle_per_host(max_idle)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .http2_only(http2);
    builder.build(connector.clone())
}

impl Backend {
    fn new(cfg: &BackendConfig, pool: &PoolConfig, tls: Option<&TlsConfigs>) -> Self {
        let connector = Connector::new(cfg, pool, tls);
        let max_idle = if pool.idle_timeout.is_zero() {
            0
        } else {
            pool.max_idle_per_host
        };
        Backend {
            url: cfg.url.clone(),
            weight: cfg.weight,
            http2: cfg.http2,
            client: RwLock::new(build_client(
                &connector,
                cfg.http2,
                pool.idle_timeout,
                max_idle,
            )),
            fresh: build_client(&connector, cfg.http2, pool.idle_timeout, 0),
            connector,
            max_idle_per_host: max_idle,
            idle_timeout_ms: AtomicU64::new(duration_ms(pool.idle_timeout)),
            health: Mutex::new(Health::default()),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            outcomes: Default::default(),
            latency: Histogram::default(),
        }
    }

    fn health(&self) -> MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The pooled client (a cheap handle on the shared pool).
    fn client(&self) -> HttpClient {
        self.client
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Retires idle connections after `retire` from now on, if that is sooner than now.
    fn lower_idle_timeout(&self, retire: Duration) {
        let ms = duration_ms(retire);
        if ms >= self.idle_timeout_ms.load(Ordering::Relaxed) {
            return;
        }
        let mut client = self.client.write().unwrap_or_else(|p| p.into_inner());
        if ms >= self.idle_timeout_ms.load(Ordering::Relaxed) {
            return;
        }
        let max_idle = if retire.is_zero() {
            0
        } else {
            self.max_idle_per_host
        };
        *client = build_client(&self.connector, self.http2, retire, max_idle);
        self.idle_timeout_ms.store(ms, Ordering::Relaxed);
        tracing::info!(
            backend = %self.url.authority,
            idle_timeout_ms = ms,
            "backend closes idle connections early (Keep-Alive: timeout); retiring them before that"
        );
    }

    /// Builds the request for this backend: its URI and `Host`, and its HTTP version.
    fn request(
        &self,
        method: &Method,
        path_and_query: &str,
        headers: HeaderMap,
        body: ProxyBody,
    ) -> Result<Request<ProxyBody>, UpstreamError> {
        let uri = self
            .url
            .uri_for(path_and_query)
            .map_err(|e| UpstreamError::Request(e.to_string()))?;
        let mut req = Request::new(body);
        *req.method_mut() = method.clone();
        *req.uri_mut() = uri;
        *req.headers_mut() = headers;
        if self.http2 {
            *req.version_mut() = Version::HTTP_2;
            req.headers_mut().remove(header::HOST);
        } else {
            *req.version_mut() = Version::HTTP_11;
            if let Ok(host) = HeaderValue::from_str(self.url.authority.as_str()) {
                req.headers_mut().insert(header::HOST, host);
            }
        }
        Ok(req)
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The `timeout=N` parameter of a `Keep-Alive` response header (RFC 2068 §19.7.1.1): the
/// server closes a connection idle for `N` seconds.
pub fn keep_alive_timeout(value: &HeaderValue) -> Option<Duration> {
    value.to_str().ok()?.split(',').find_map(|param| {
        let (name, n) = param.split_once('=')?;
        if !name.trim().eq_ignore_ascii_case("timeout") {
            return None;
        }
        let secs: u64 = n.trim().trim_matches('"').parse().ok()?;
        Some(Duration::from_secs(secs))
    })
}

/// When to retire an idle connection the server closes after `closes_after`: a second
/// before (half the time for very short ones), so a request is never sent on a connection the
/// server is closing at that moment.
pub fn retire_before(closes_after: Duration) -> Duration {
    closes_after - (closes_after / 2).min(Duration::from_secs(1))
}

/// Methods a request may be repeated with (RFC 9110 §9.2.2).
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Whether a request that failed with `e` can be sent again without risk of a response
/// having reached anyone: `Client::request` only returns after the response head, so any
/// error but an unparsable answer or a misuse happened before a response existed.
fn retryable(e: &hyper_util::client::legacy::Error) -> bool {
    if e.is_connect() {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h) = s.downcast_ref::<hyper::Error>() {
            // Garbage from the backend is an answer, not a lost connection; `user` errors
            // would fail again.
            return !(h.is_parse()
                || h.is_parse_status()
                || h.is_parse_too_large()
                || h.is_user()
                || h.is_timeout());
        }
        source = s.source();
    }
    false
}

/// A failed attempt, and whether it may be retried.
struct Failed {
    error: UpstreamError,
    retryable: bool,
    /// The downstream request body failed (found in the client error's source chain): the
    /// client's fault, not the backend's.
    body_fault: Option<BodyFault>,
}

/// The right to send one request to one backend. Reporting the outcome feeds the backend's
/// breaker; dropped without a report (the request's future was dropped, e.g. the client went
/// away), it gives a half-open trial slot back so that the next request can be the trial.
struct Permit<'a> {
    upstream: &'a Upstream,
    index: usize,
    /// Whether the breaker keeps books (not for a lone backend, see [`Upstream::pick`]).
    tracked: bool,
    trial: bool,
    reported: bool,
}

impl Permit<'_> {
    fn report(mut self, ok: bool) {
        self.reported = true;
        if self.tracked {
            let backend = &self.upstream.backends[self.index];
            let transition =
                backend
                    .health()
                    .on_result(ok, Instant::now(), &self.upstream.thresholds);
            log_transition(backend, transition);
        }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.reported && self.trial {
            let backend = &self.upstream.backends[self.index];
            backend.health().on_abandoned();
            tracing::debug!(backend = %backend.url.authority, "half-open trial request abandoned; the next request is the trial");
        }
    }
}

/// Envoy's panic mode, shared with the probe tasks: how many backends are up by the health
/// checks, and whether that is below `HEALTH_PANIC_THRESHOLD`.
struct PanicMode {
    total: usize,
    threshold: u8,
    up: Mutex<usize>,
    on: AtomicBool,
}

impl PanicMode {
    fn on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// Follows a backend's up/down transition; logs entering and leaving panic mode.
    fn follow(&self, transition: Option<Transition>) {
        let mut up = self.up.lock().unwrap_or_else(|p| p.into_inner());
        match transition {
            Some(Transition::MarkedDown) => *up = up.saturating_sub(1),
            Some(Transition::MarkedUp) => *up = (*up + 1).min(self.total),
            _ => return,
        }
        let panic = health::panic_mode(*up, self.total, self.threshold);
        if self.on.swap(panic, Ordering::Relaxed) != panic {
            if panic {
                tracing::warn!(
                    up = *up,
                    total = self.total,
                    threshold_percent = self.threshold,
                    "fewer than HEALTH_PANIC_THRESHOLD of the backends are up by health checks: panic mode, balancing over all of them (circuit breakers still apply)"
                );
            } else {
                tracing::info!(
                    up = *up,
                    total = self.total,
                    "enough backends are up by health checks again: panic mode over"
                );
            }
        }
    }
}

/// All backends, the balancer and the settings that govern them.
pub struct Upstream {
    backends: Vec<Arc<Backend>>,
    weights: Vec<u32>,
    balancer: Mutex<SmoothWeighted>,
    thresholds: Thresholds,
    timeout: Duration,
    pool: PoolConfig,
    panic: Arc<PanicMode>,
}

impl Upstream {
    /// The daemon's pool: `UPSTREAM_URL(S)` with the pool settings and `REQ_TIMEOUT`.
    pub fn new(config: &Config) -> Self {
        Self::from_parts(&config.backends, &config.pool, config.upstream_timeout)
    }

    /// A pool of `backends` (not empty: the configuration parsers refuse an empty list)
    /// governed by `pool`, each exchange within `timeout`.
    pub fn from_parts(backends: &[BackendConfig], pool: &PoolConfig, timeout: Duration) -> Self {
        // Loads the system's roots: only when some backend needs them.
        let tls = backends
            .iter()
            .any(|b| b.url.tls)
            .then(|| TlsConfigs::new(pool.ca_file.as_ref()));
        let backends: Vec<Arc<Backend>> = backends
            .iter()
            .map(|b| Arc::new(Backend::new(b, pool, tls.as_ref())))
            .collect();
        Upstream {
            weights: backends.iter().map(|b| b.weight).collect(),
            panic: Arc::new(PanicMode {
                total: backends.len(),
                threshold: pool.panic_threshold,
                up: Mutex::new(backends.len()),
                on: AtomicBool::new(false),
            }),
            backends,
            balancer: Mutex::default(),
            thresholds: Thresholds {
                probe_failures: pool.failure_threshold,
                probe_recoveries: pool.recovery_threshold,
                breaker_failures: pool.breaker_threshold,
                breaker_cooldown: pool.breaker_cooldown,
            },
            timeout,
            pool: pool.clone(),
        }
    }

    /// The deadline for an exchange starting now (`REQ_TIMEOUT`).
    pub fn deadline(&self) -> Instant {
        Instant::now() + self.timeout
    }

    /// Whether too few backends are up by the health checks for them to be believed, so that
    /// all take traffic (`HEALTH_PANIC_THRESHOLD`).
    pub fn panic_mode(&self) -> bool {
        self.panic.on()
    }

    /// Sends a bodiless idempotent request (the cache's GETs, refreshes, revalidations, and
    /// bodiless pass-through requests with an idempotent method). A failure before any
    /// response byte is retried up to `UPSTREAM_RETRIES` times: on another available
    /// backend, else on a fresh connection to the same one; never past `deadline`.
    pub async fn send_idempotent(
        &self,
        method: &Method,
        path_and_query: &str,
        headers: &HeaderMap,
        deadline: Instant,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let mut permit = self.pick(None)?;
        let mut fresh = false;
        let mut retries = 0;
        loop {
            let i = permit.index;
            let req = self.backends[i].request(
                method,
                path_and_query,
                headers.clone(),
                ProxyBody::Empty,
            )?;
            let failed = match self
                .attempt(permit, req, deadline, fresh, path_and_query)
                .await
            {
                Ok(resp) => return Ok(resp),
                Err(failed) => failed,
            };
            if !failed.retryable || retries >= self.pool.retries || Instant::now() >= deadline {
                return Err(failed.error);
            }
            let Some(next) = self.pick_retry(i) else {
                return Err(failed.error);
            };
            retries += 1;
            self.backends[i].retries.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(
                backend = %self.backends[i].url.authority,
                to = %self.backends[next.index].url.authority,
                path = path_and_query,
                error = %failed.error,
                "upstream request failed before a response; retrying on a fresh connection"
            );
            permit = next;
            fresh = true;
        }
    }

    /// Sends a request with a streamed body, once: it is never retried after the body
    /// started to flow (hyper-util itself resends one that a pooled connection failed
    /// before writing). Without a body and with an idempotent method it goes the
    /// [`Upstream::send_idempotent`] way, retries included.
    ///
    /// Errs with the client's fault ([`BodyFault`] → 413 / 400) when it was the downstream
    /// body that failed, else with the upstream's.
    pub async fn send_once(
        &self,
        method: &Method,
        path_and_query: &str,
        headers: HeaderMap,
        body: ProxyBody,
        deadline: Instant,
    ) -> Result<Response<Incoming>, ProxyError> {
        if is_idempotent(method) && body.is_end_stream() {
            return Ok(self
                .send_idempotent(method, path_and_query, &headers, deadline)
                .await?);
        }
        let permit = self.pick(None)?;
        let req = self.backends[permit.index].request(method, path_and_query, headers, body)?;
        self.attempt(permit, req, deadline, false, path_and_query)
            .await
            .map_err(|f| match f.body_fault {
                Some(fault) => fault.into(),
                None => f.error.into(),
            })
    }

    /// One exchange with one backend; its outcome feeds that backend's breaker. `fresh`:
    /// on a new connection rather than a pooled one; `path`: the request's, for the log.
    async fn attempt(
        &self,
        permit: Permit<'_>,
        req: Request<ProxyBody>,
        deadline: Instant,
        fresh: bool,
        path: &str,
    ) -> Result<Response<Incoming>, Failed> {
        let backend = &self.backends[permit.index];
        backend.requests.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let client = if fresh {
            backend.fresh.clone()
        } else {
            backend.client()
        };
        let result = match tokio::time::timeout_at(deadline, client.request(req)).await {
            Err(_) => Err(Failed {
                error: UpstreamError::Timeout,
                retryable: false,
                body_fault: None,
            }),
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) => Err(Failed {
                retryable: retryable(&e),
                body_fault: BodyFault::find(&e),
                error: if e.is_connect() {
                    UpstreamError::Connect(chain(&e))
                } else {
                    UpstreamError::BadResponse(chain(&e))
                },
            }),
        };
        backend.latency.observe(started.elapsed());
        let class = match &result {
            Ok(resp) => usize::from(resp.status().as_u16() / 100).clamp(1, 5) - 1,
            Err(_) => 5,
        };
        backend.outcomes[class].fetch_add(1, Ordering::Relaxed);
        let ok = matches!(&result, Ok(resp) if !resp.status().is_server_error());
        // A request body the client cut short or sent too much of says nothing about the
        // backend: no failure counted, nothing reported to its breaker (a half-open trial
        // slot is given back when the permit drops).
        let clients_fault = matches!(&result, Err(f) if f.body_fault.is_some());
        if !ok && !clients_fault {
            backend.failures.fetch_add(1, Ordering::Relaxed);
        }
        if let Err(failed) = &result {
            // The caller warns once about the request; this says which backend failed it.
            tracing::debug!(
                backend = %backend.url.authority,
                path,
                error = %failed.error,
                body_fault = failed.body_fault.map(|f| f.to_string()),
                retryable = failed.retryable,
                "upstream attempt failed"
            );
        }
        // Read here: `Keep-Alive` is stripped as hop-by-hop before the response goes on.
        if let Ok(resp) = &result {
            if let Some(closes_after) = resp
                .headers()
                .get("keep-alive")
                .and_then(keep_alive_timeout)
            {
                backend.lower_idle_timeout(retire_before(closes_after));
            }
        }
        if !clients_fault {
            permit.report(ok);
        }
        result
    }

    /// Chooses a backend among the available ones, skipping `exclude`.
    ///
    /// A single backend is never considered unavailable (as nginx ignores `max_fails` for a
    /// single server): with nothing to fail over to, shutting it out would only turn its own
    /// answers — or a quick connection error — into our 503s for a whole cool-down. Its
    /// health is still probed, logged and shown on `/status`.
    fn pick(&self, exclude: Option<usize>) -> Result<Permit<'_>, UpstreamError> {
        let now = Instant::now();
        let panic = self.panic.on();
        if self.backends.len() == 1 {
            return match exclude {
                Some(0) => Err(UpstreamError::NoBackend {
                    retry_after_secs: 1,
                }),
                _ => self.admit(0, now, panic).ok_or(UpstreamError::NoBackend {
                    retry_after_secs: 1,
                }),
            };
        }
        let chosen = {
            let mut balancer = self.balancer.lock().unwrap_or_else(|p| p.into_inner());
            balancer.pick(&self.weights, |i| {
                Some(i) != exclude && self.backends[i].health().available(now, panic)
            })
        };
        if let Some(permit) = chosen.and_then(|i| self.admit(i, now, panic)) {
            return Ok(permit);
        }
        Err(UpstreamError::NoBackend {
            retry_after_secs: self.retry_after(now, panic),
        })
    }

    /// Asks backend `i`'s health for a permit (always granted to a lone backend).
    fn admit(&self, i: usize, now: Instant, panic: bool) -> Option<Permit<'_>> {
        let permit = |tracked, trial| Permit {
            upstream: self,
            index: i,
            tracked,
            trial,
            reported: false,
        };
        if self.backends.len() == 1 {
            return Some(permit(false, false));
        }
        let (admission, transition) = self.backends[i].health().admit(now, panic);
        log_transition(&self.backends[i], transition);
        match admission {
            Admission::Yes => Some(permit(true, false)),
            Admission::Trial => Some(permit(true, true)),
            Admission::No => None,
        }
    }

    /// Where to retry a request that failed on backend `failed`: another available backend,
    /// else `failed` itself if it may still take traffic.
    fn pick_retry(&self, failed: usize) -> Option<Permit<'_>> {
        self.pick(Some(failed))
            .ok()
            .or_else(|| self.admit(failed, Instant::now(), self.panic.on()))
    }

    /// Seconds until some backend may be tried again (for `Retry-After`).
    fn retry_after(&self, now: Instant, panic: bool) -> u64 {
        let breaker = self
            .backends
            .iter()
            .filter_map(|b| b.health().retry_at(panic))
            .map(|at| at.saturating_duration_since(now))
            .min();
        let wait = breaker.unwrap_or(self.pool.health_interval);
        wait.as_secs_f64().ceil().max(1.0) as u64
    }

    /// One active health-check loop per backend (none when checks are disabled), each a
    /// future that runs until dropped; the caller supervises each on its own, so a panic in
    /// one backend's probe restarts that probe only.
    pub fn health_checks(&self) -> Vec<impl Fn() -> BoxedProbe + Send + Sync + 'static> {
        if self.pool.health_interval.is_zero() {
            return Vec::new();
        }
        self.backends
            .iter()
            .map(|b| {
                let (backend, pool, thresholds, panic) = (
                    b.clone(),
                    self.pool.clone(),
                    self.thresholds,
                    self.panic.clone(),
                );
                move || -> BoxedProbe {
                    Box::pin(probe_loop(
                        backend.clone(),
                        pool.clone(),
                        thresholds,
                        panic.clone(),
                    ))
                }
            })
            .collect()
    }

    /// Each backend's `/status` entry, in configuration order.
    pub fn status(&self) -> Vec<BackendStatus> {
        self.backends
            .iter()
            .map(|b| BackendStatus {
                url: format!(
                    "{}://{}{}",
                    b.url.scheme(),
                    b.url.authority,
                    b.url.path_prefix
                ),
                weight: b.weight,
                http2: b.http2,
                state: b.health().state(),
                requests: b.requests.load(Ordering::Relaxed),
                failures: b.failures.load(Ordering::Relaxed),
                retries: b.retries.load(Ordering::Relaxed),
                idle_timeout_ms: b.idle_timeout_ms.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Appends the per-backend series in the Prometheus text format.
    pub fn render_metrics(&self, out: &mut String) {
        const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "error"];
        metrics::series(
            out,
            "edgecache_upstream_requests_total",
            "counter",
            "Upstream requests by backend and outcome (status class, or error without a response).",
        );
        for b in &self.backends {
            for (i, class) in CLASSES.iter().enumerate() {
                let v = b.outcomes[i].load(Ordering::Relaxed);
                let _ = writeln!(
                    out,
                    "edgecache_upstream_requests_total{{backend=\"{}\",status=\"{class}\"}} {v}",
                    b.url.authority
                );
            }
        }
        metrics::series(
            out,
            "edgecache_upstream_request_duration_seconds",
            "histogram",
            "Time to the upstream response head, by backend.",
        );
        for b in &self.backends {
            b.latency.render(
                out,
                "edgecache_upstream_request_duration_seconds",
                &format!("backend=\"{}\"", b.url.authority),
            );
        }
        metrics::series(
            out,
            "edgecache_upstream_retries_total",
            "counter",
            "Idempotent requests retried after failing on this backend before any response byte (on another backend, or on a fresh connection).",
        );
        for b in &self.backends {
            let _ = writeln!(
                out,
                "edgecache_upstream_retries_total{{backend=\"{}\"}} {}",
                b.url.authority,
                b.retries.load(Ordering::Relaxed)
            );
        }
        metrics::series(
            out,
            "edgecache_upstream_panic_mode",
            "gauge",
            "1 when fewer than HEALTH_PANIC_THRESHOLD of the backends are up by health checks, so all of them take traffic.",
        );
        let _ = writeln!(
            out,
            "edgecache_upstream_panic_mode {}",
            u8::from(self.panic.on())
        );
        metrics::series(
            out,
            "edgecache_backend_up",
            "gauge",
            "1 when a backend may take traffic (healthy, breaker not open).",
        );
        let now = Instant::now();
        let panic = self.panic.on();
        for b in &self.backends {
            let up = u8::from(b.health().available(now, panic));
            let _ = writeln!(
                out,
                "edgecache_backend_up{{backend=\"{}\",state=\"{}\"}} {up}",
                b.url.authority,
                b.health().state()
            );
        }
    }
}

/// Probes `backend` every interval and logs state changes once.
async fn probe_loop(
    backend: Arc<Backend>,
    pool: PoolConfig,
    thresholds: Thresholds,
    panic: Arc<PanicMode>,
) {
    let mut ticker = tokio::time::interval(pool.health_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let probe = match tokio::time::timeout(pool.health_timeout, probe(&backend, &pool)).await {
            Ok(Some(status)) => Probe::from_status(status),
            _ => Probe::Fail,
        };
        let transition = backend.health().on_probe(probe, &thresholds);
        match (transition, probe) {
            (Some(Transition::ProbeRouteMissing), Probe::NoRoute(status)) => tracing::warn!(
                backend = %backend.url.authority,
                path = %pool.health_path,
                status,
                transition = Transition::ProbeRouteMissing.as_str(),
                "health check route answers an error"
            ),
            _ => log_transition(&backend, transition),
        }
        panic.follow(transition);
    }
}

/// One probe's response status; `None` when no response came. A probe that fails on a
/// pooled connection is sent again on a fresh one, as live requests are.
async fn probe(backend: &Backend, pool: &PoolConfig) -> Option<u16> {
    let request = || {
        backend
            .request(
                &Method::GET,
                &pool.health_path,
                HeaderMap::new(),
                ProxyBody::Empty,
            )
            .ok()
    };
    let resp = match backend.client().request(request()?).await {
        Ok(resp) => resp,
        Err(e) if retryable(&e) => backend.fresh.request(request()?).await.ok()?,
        Err(_) => return None,
    };
    let status = resp.status().as_u16();
    // Drain the small body so the connection goes back to the pool.
    let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
    Some(status)
}

fn log_transition(backend: &Backend, transition: Option<Transition>) {
    if let Some(t) = transition {
        match t {
            Transition::MarkedUp
            | Transition::BreakerClosed
            | Transition::BreakerClosedByProbes => {
                tracing::info!(
                    backend = %backend.url.authority,
                    transition = t.as_str(),
                    "backend health changed"
                )
            }
            _ => tracing::warn!(
                backend = %backend.url.authority,
                transition = t.as_str(),
                "backend health changed"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_alive_timeout_is_parsed() {
        let v = |s: &'static str| HeaderValue::from_static(s);
        assert_eq!(
            keep_alive_timeout(&v("timeout=5")),
            Some(Duration::from_secs(5))
        );
        assert_eq!(
            keep_alive_timeout(&v("max=100, Timeout = 72")),
            Some(Duration::from_secs(72))
        );
        assert_eq!(keep_alive_timeout(&v("max=100")), None);
        assert_eq!(keep_alive_timeout(&v("timeout=soon")), None);
        assert_eq!(keep_alive_timeout(&v("timeout=-1")), None);
    }

    #[test]
    fn idle_connections_are_retired_before_the_server_closes_them() {
        let s = Duration::from_secs;
        assert_eq!(retire_before(s(5)), s(4), "Node, Apache, uvicorn");
        assert_eq!(retire_before(s(60)), s(59));
        assert_eq!(retire_before(s(1)), Duration::from_millis(500));
        assert_eq!(retire_before(s(0)), s(0));
    }

    #[test]
    fn only_idempotent_methods_are_retried() {
        for m in [
            Method::GET,
            Method::HEAD,
            Method::PUT,
            Method::DELETE,
            Method::OPTIONS,
        ] {
            assert!(is_idempotent(&m), "{m}");
        }
        for m in [Method::POST, Method::PATCH, Method::CONNECT] {
            assert!(!is_idempotent(&m), "{m}");
        }
    }

    /// The `http` crate's URI parser lets `"` and `\` through in a path, so a backend URL
    /// can hold characters JSON must escape: `/status` escapes them (the hand-written writer
    /// did not), the body parses and gives back the URL as configured.
    #[tokio::test]
    async fn status_escapes_the_backend_url() {
        for raw in [r#"http://127.0.0.1:1/a"b{c}"#, r"http://127.0.0.1:1/a\b"] {
            let config = Config::from_lookup(|k| (k == "UPSTREAM_URL").then(|| raw.to_owned()))
                .unwrap_or_else(|e| panic!("{raw} is no longer accepted ({e}): drop this case"));
            let json = serde_json::to_string(&Upstream::new(&config).status()).unwrap();
            let parsed: serde_json::Value = serde_json::from_str(&json).unwrap();
            assert_eq!(parsed[0]["url"], raw, "{json}");
            assert_eq!(parsed[0]["state"], "up", "{json}");
        }
    }
}
