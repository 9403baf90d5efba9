//! The upstream side: a pool of backends (`UPSTREAM_URL` or weighted `UPSTREAM_URLS`), each
//! with its own keep-alive connection pool (HTTP/1.1, or HTTP/2 with prior knowledge), picked
//! by smooth weighted round-robin ([`balancer`]) among those whose health allows it
//! ([`health`]: active probes plus a circuit breaker fed by live traffic). Requests whose body
//! can be rebuilt (the cache's GETs and refreshes) are retried once on another backend when
//! the connection cannot be made. Failures are classified into [`UpstreamError`].

pub mod balancer;
pub mod health;

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, Version};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;

use crate::body::ProxyBody;
use crate::config::{BackendConfig, Config, PoolConfig, UpstreamUrl};
use crate::error::{chain, UpstreamError};
use crate::metrics::{self, Histogram};
use balancer::SmoothWeighted;
use health::{Admission, Health, Thresholds, Transition};

/// One upstream backend and its connection pool.
pub struct Backend {
    pub url: UpstreamUrl,
    pub weight: u32,
    pub http2: bool,
    client: Client<HttpConnector, ProxyBody>,
    health: Mutex<Health>,
    requests: AtomicU64,
    failures: AtomicU64,
    /// Responses by status class 1xx–5xx, then errors without a response.
    outcomes: [AtomicU64; 6],
    latency: Histogram,
}

impl Backend {
    fn new(cfg: &BackendConfig, pool: &PoolConfig) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(pool.connect_timeout));
        connector.enforce_http(false);
        let mut builder = Client::builder(TokioExecutor::new());
        builder
            .pool_idle_timeout(pool.idle_timeout)
            .pool_max_idle_per_host(pool.max_idle_per_host)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .http2_only(cfg.http2);
        Backend {
            url: cfg.url.clone(),
            weight: cfg.weight,
            http2: cfg.http2,
            client: builder.build(connector),
            health: Mutex::new(Health::default()),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            outcomes: Default::default(),
            latency: Histogram::default(),
        }
    }

    fn health(&self) -> MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|p| p.into_inner())
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

/// All backends, the balancer and the settings that govern them.
pub struct Upstream {
    backends: Vec<Arc<Backend>>,
    weights: Vec<u32>,
    balancer: Mutex<SmoothWeighted>,
    thresholds: Thresholds,
    timeout: Duration,
    pool: PoolConfig,
}

impl Upstream {
    pub fn new(config: &Config) -> Self {
        let backends: Vec<Arc<Backend>> = config
            .backends
            .iter()
            .map(|b| Arc::new(Backend::new(b, &config.pool)))
            .collect();
        Upstream {
            weights: backends.iter().map(|b| b.weight).collect(),
            backends,
            balancer: Mutex::default(),
            thresholds: Thresholds {
                probe_failures: config.pool.failure_threshold,
                probe_recoveries: config.pool.recovery_threshold,
                breaker_failures: config.pool.breaker_threshold,
                breaker_cooldown: config.pool.breaker_cooldown,
            },
            timeout: config.upstream_timeout,
            pool: config.pool.clone(),
        }
    }

    /// The deadline for an exchange starting now (`REQ_TIMEOUT`).
    pub fn deadline(&self) -> Instant {
        Instant::now() + self.timeout
    }

    /// Sends a bodiless request (the cache's GETs, refreshes, revalidations). When a
    /// backend cannot be connected to, it is retried once on another available backend.
    pub async fn send_idempotent(
        &self,
        method: &Method,
        path_and_query: &str,
        headers: &HeaderMap,
        deadline: Instant,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let first = self.pick(None)?;
        let req = self.backends[first.0].request(
            method,
            path_and_query,
            headers.clone(),
            ProxyBody::Empty,
        )?;
        match self.attempt(first, req, deadline).await {
            Err(UpstreamError::Connect(e)) => {
                let Ok(second) = self.pick(Some(first.0)) else {
                    return Err(UpstreamError::Connect(e));
                };
                tracing::debug!(backend = %self.backends[first.0].url.authority, "connect failed; retrying on another backend");
                let req = self.backends[second.0].request(
                    method,
                    path_and_query,
                    headers.clone(),
                    ProxyBody::Empty,
                )?;
                self.attempt(second, req, deadline).await
            }
            other => other,
        }
    }

    /// Sends a request with a streamed body, once: it is never retried after the body
    /// started to flow.
    pub async fn send_once(
        &self,
        method: &Method,
        path_and_query: &str,
        headers: HeaderMap,
        body: ProxyBody,
        deadline: Instant,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let pick = self.pick(None)?;
        let req = self.backends[pick.0].request(method, path_and_query, headers, body)?;
        self.attempt(pick, req, deadline).await
    }

    /// One exchange with one backend; its outcome feeds that backend's breaker.
    async fn attempt(
        &self,
        (i, _): (usize, Admission),
        req: Request<ProxyBody>,
        deadline: Instant,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let backend = &self.backends[i];
        backend.requests.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let result = match tokio::time::timeout_at(deadline, backend.client.request(req)).await {
            Err(_) => Err(UpstreamError::Timeout),
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) if e.is_connect() => Err(UpstreamError::Connect(chain(&e))),
            Ok(Err(e)) => Err(UpstreamError::BadResponse(chain(&e))),
        };
        backend.latency.observe(started.elapsed());
        let class = match &result {
            Ok(resp) => usize::from(resp.status().as_u16() / 100).clamp(1, 5) - 1,
            Err(_) => 5,
        };
        backend.outcomes[class].fetch_add(1, Ordering::Relaxed);
        let ok = matches!(&result, Ok(resp) if !resp.status().is_server_error());
        if !ok {
            backend.failures.fetch_add(1, Ordering::Relaxed);
        }
        // A lone backend is never shut out (see `pick`): no breaker bookkeeping for it.
        if self.backends.len() > 1 {
            let transition =
                backend
                    .health()
                    .on_result(ok, Instant::now().into_std(), &self.thresholds);
            log_transition(backend, transition);
        }
        result
    }

    /// Chooses a backend among the available ones, skipping `exclude`.
    ///
    /// A single backend is never considered unavailable (as nginx ignores `max_fails` for a
    /// single server): with nothing to fail over to, shutting it out would only turn its own
    /// answers — or a quick connection error — into our 503s for a whole cool-down. Its
    /// health is still probed, logged and shown on `/status`.
    fn pick(&self, exclude: Option<usize>) -> Result<(usize, Admission), UpstreamError> {
        if self.backends.len() == 1 {
            return match exclude {
                Some(0) => Err(UpstreamError::NoBackend {
                    retry_after_secs: 1,
                }),
                _ => Ok((0, Admission::Yes)),
            };
        }
        let now = Instant::now().into_std();
        let chosen = {
            let mut balancer = self.balancer.lock().unwrap_or_else(|p| p.into_inner());
            balancer.pick(&self.weights, |i| {
                Some(i) != exclude && self.backends[i].health().available(now)
            })
        };
        if let Some(i) = chosen {
            let (admission, transition) = self.backends[i].health().admit(now);
            log_transition(&self.backends[i], transition);
            if admission != Admission::No {
                return Ok((i, admission));
            }
        }
        Err(UpstreamError::NoBackend {
            retry_after_secs: self.retry_after(now),
        })
    }

    /// Seconds until some backend may be tried again (for `Retry-After`).
    fn retry_after(&self, now: std::time::Instant) -> u64 {
        let breaker = self
            .backends
            .iter()
            .filter_map(|b| b.health().retry_at())
            .map(|at| at.saturating_duration_since(now))
            .min();
        let wait = breaker.unwrap_or(self.pool.health_interval);
        wait.as_secs_f64().ceil().max(1.0) as u64
    }

    /// Starts one active health-check task per backend (none when checks are disabled).
    pub fn spawn_health_checks(&self) -> Vec<tokio::task::JoinHandle<()>> {
        if self.pool.health_interval.is_zero() {
            return Vec::new();
        }
        self.backends
            .iter()
            .map(|b| tokio::spawn(probe_loop(b.clone(), self.pool.clone(), self.thresholds)))
            .collect()
    }

    /// The backends' state as a JSON array, for the status route.
    pub fn status_json(&self) -> String {
        let mut out = String::from("[");
        for (i, b) in self.backends.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(
                out,
                r#"{{"url":"http://{}{}","weight":{},"http2":{},"state":"{}","requests":{},"failures":{}}}"#,
                b.url.authority,
                b.url.path_prefix,
                b.weight,
                b.http2,
                b.health().state(),
                b.requests.load(Ordering::Relaxed),
                b.failures.load(Ordering::Relaxed),
            );
        }
        out.push(']');
        out
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
            "edgecache_backend_up",
            "gauge",
            "1 when a backend may take traffic (healthy, breaker not open).",
        );
        let now = Instant::now().into_std();
        for b in &self.backends {
            let up = u8::from(b.health().available(now));
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
async fn probe_loop(backend: Arc<Backend>, pool: PoolConfig, thresholds: Thresholds) {
    let mut ticker = tokio::time::interval(pool.health_interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let ok = match backend.request(
            &Method::GET,
            &pool.health_path,
            HeaderMap::new(),
            ProxyBody::Empty,
        ) {
            Ok(req) => {
                let probe = async {
                    let resp = backend.client.request(req).await.ok()?;
                    let ok = resp.status().is_success();
                    // Drain the small body so the connection goes back to the pool.
                    let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
                    Some(ok)
                };
                matches!(
                    tokio::time::timeout(pool.health_timeout, probe).await,
                    Ok(Some(true))
                )
            }
            Err(_) => false,
        };
        let transition = backend.health().on_probe(ok, &thresholds);
        log_transition(&backend, transition);
    }
}

fn log_transition(backend: &Backend, transition: Option<Transition>) {
    if let Some(t) = transition {
        match t {
            Transition::MarkedUp | Transition::BreakerClosed => {
                tracing::info!(backend = %backend.url.authority, "{}", t.as_str())
            }
            _ => tracing::warn!(backend = %backend.url.authority, "{}", t.as_str()),
        }
    }
}
