//! Callbacks: which URLs a job may call back ([`CallbackTarget::parse`] against
//! `CALLBACK_ALLOWED_HOSTS`, and [`split_callback`] to take the `callback` parameter out of a
//! request's query), and delivering a finished job there ([`Callbacks`]): one signed `POST`
//! per job and callback URL, retried with backoff, counted for `/metrics`.
//!
//! # What a receiver gets
//!
//! `POST <callback URL>` with the upstream response's body, its `Content-Type` and
//! `Content-Encoding`, and:
//!
//! * `Edgecache-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(CALLBACK_SECRET, "<t>.<body>")>`
//!   ([`super::sign`]), signed afresh on every attempt;
//! * `Edgecache-Job: <job id>` — the same for every attempt: an idempotency key;
//! * `Edgecache-Status: <the upstream's status>` (`502` with a small JSON body when the
//!   upstream request failed without a response).
//!
//! # Delivery
//!
//! A `2xx` answer is a delivery; no further `POST` is made for that job and URL. Connection
//! errors, attempt timeouts, `408`, `429` and `5xx` are retried, up to [`RetryPolicy::attempts`]
//! in all, after an exponential backoff with jitter (at least what a `Retry-After` asks, within
//! [`RetryPolicy::max_backoff`]). Any other status (`3xx`, `4xx`) ends it at once: redirects
//! are not followed. An attempt that timed out after the receiver took the body is retried, so
//! a receiver may see a job twice: the `Edgecache-Job` header tells. Deliveries run on the
//! [`Background`] tree and are cancelled at shutdown, like everything a restart loses.
//!
//! Only `http://` callbacks for now: the client is built by [`build_client`] alone, so
//! `https://` is one connector away (accept the scheme in [`CallbackTarget::parse`], default
//! port 443, and wrap the connector with TLS there).

use std::fmt::{self, Write as _};
use std::future::Future;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt as _, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::sign::{signature_header, SIGNATURE_HEADER};
use super::JobId;
use crate::config::{CallbackHost, CallbackSecret};
use crate::metrics;
use crate::supervise::Background;

/// The query parameter naming a callback URL.
pub const CALLBACK_PARAM: &str = "callback";
/// Longest callback URL accepted (after percent-decoding).
pub const MAX_URL_LEN: usize = 2048;

/// The job's id, on every attempt.
pub const JOB_HEADER: HeaderName = HeaderName::from_static("edgecache-job");
/// The upstream response's status.
pub const STATUS_HEADER: HeaderName = HeaderName::from_static("edgecache-status");

/// Why a callback URL was refused; the request is answered `400` with this reason
/// ([`super::respond::callback_refused`]) before anything is sent upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallbackRefused {
    /// `CALLBACK_ALLOWED_HOSTS` is empty.
    Disabled,
    /// `callback=` with nothing after it.
    Empty,
    /// Two `callback` parameters.
    Repeated,
    /// Longer than [`MAX_URL_LEN`].
    TooLong,
    /// Bad percent-encoding, or not UTF-8.
    Encoding,
    /// Not an absolute URL: `http://host[:port][/path][?query]`, printable ASCII, no
    /// fragment, a valid port.
    Malformed,
    /// A scheme other than `http`.
    Scheme,
    /// `user[:password]@` in the authority (`http://allowed:80@evil/` names host `evil`).
    Userinfo,
    /// The URL's `host:port` (normalised) is not in `CALLBACK_ALLOWED_HOSTS`.
    NotAllowed(String),
}

impl CallbackRefused {
    /// A short word for logs and the JSON `reason`.
    pub fn as_str(&self) -> &'static str {
        match self {
            CallbackRefused::Disabled => "disabled",
            CallbackRefused::Empty => "empty",
            CallbackRefused::Repeated => "repeated",
            CallbackRefused::TooLong => "too_long",
            CallbackRefused::Encoding => "encoding",
            CallbackRefused::Malformed => "malformed",
            CallbackRefused::Scheme => "scheme",
            CallbackRefused::Userinfo => "userinfo",
            CallbackRefused::NotAllowed(_) => "host_not_allowed",
        }
    }
}

impl fmt::Display for CallbackRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CallbackRefused::Disabled => f.write_str("callbacks are not enabled on this proxy"),
            CallbackRefused::Empty => f.write_str("the callback parameter is empty"),
            CallbackRefused::Repeated => f.write_str("more than one callback parameter"),
            CallbackRefused::TooLong => {
                write!(f, "the callback URL is longer than {MAX_URL_LEN} bytes")
            }
            CallbackRefused::Encoding => {
                f.write_str("the callback parameter is not valid percent-encoded UTF-8")
            }
            CallbackRefused::Malformed => {
                f.write_str("the callback is not an absolute http://host[:port]/path URL")
            }
            CallbackRefused::Scheme => f.write_str("only http:// callbacks are supported"),
            CallbackRefused::Userinfo => {
                f.write_str("a callback URL may not contain user:password@")
            }
            CallbackRefused::NotAllowed(host) => {
                write!(f, "callbacks to {host} are not allowed")
            }
        }
    }
}

impl std::error::Error for CallbackRefused {}

/// Takes the `callback` parameter out of a request's query string: the decoded value (when
/// present) and the query without it (`None` when nothing else is left), to build the cache
/// key, the request hash and the upstream request from, so that requests differing only in
/// their callback share one job and the upstream never sees the parameter. The other
/// parameters are kept byte for byte, in order. Only the exact name `callback` counts; its
/// value is percent-decoded (`+` stays `+`). Two `callback` parameters are refused.
pub fn split_callback(
    query: Option<&str>,
) -> Result<(Option<String>, Option<String>), CallbackRefused> {
    let Some(query) = query else {
        return Ok((None, None));
    };
    let mut callback = None;
    let mut rest: Vec<&str> = Vec::new();
    for pair in query.split('&') {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        if name != CALLBACK_PARAM {
            rest.push(pair);
            continue;
        }
        if callback.is_some() {
            return Err(CallbackRefused::Repeated);
        }
        callback = Some(percent_decode(value)?);
    }
    let rest = Some(rest.join("&")).filter(|q| !q.is_empty());
    Ok((callback, rest))
}

fn percent_decode(v: &str) -> Result<String, CallbackRefused> {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = v.get(i + 1..i + 3).ok_or(CallbackRefused::Encoding)?;
            let byte = super::sign::from_hex::<1>(hex).ok_or(CallbackRefused::Encoding)?;
            out.push(byte[0]);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| CallbackRefused::Encoding)
}

/// A callback URL that passed [`CallbackTarget::parse`]: `http`, its `host:port` one of
/// `CALLBACK_ALLOWED_HOSTS`. Its URI names that normalised `host:port`, so the connection
/// goes exactly where the allow-list said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallbackTarget {
    uri: Uri,
    host: CallbackHost,
}

impl CallbackTarget {
    /// Checks `raw` (already percent-decoded, see [`split_callback`]) against `allowed`:
    /// `http://host[:port][/path][?query]` with printable ASCII only, no fragment, no
    /// backslash, no `user:password@`; the port defaults to 80; host names compare
    /// case-insensitively and exactly (no subdomains, no trailing-dot variants), IP
    /// addresses by value and only when listed as addresses.
    pub fn parse(raw: &str, allowed: &[CallbackHost]) -> Result<Self, CallbackRefused> {
        if allowed.is_empty() {
            return Err(CallbackRefused::Disabled);
        }
        if raw.is_empty() {
            return Err(CallbackRefused::Empty);
        }
        if raw.len() > MAX_URL_LEN {
            return Err(CallbackRefused::TooLong);
        }
        if !raw
            .bytes()
            .all(|b| (0x21..=0x7e).contains(&b) && b != b'\\' && b != b'#')
        {
            return Err(CallbackRefused::Malformed);
        }
        let (scheme, rest) = raw.split_once("://").ok_or(CallbackRefused::Malformed)?;
        if !scheme.eq_ignore_ascii_case("http") {
            let valid = scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b));
            return Err(if valid && !scheme.is_empty() {
                CallbackRefused::Scheme
            } else {
                CallbackRefused::Malformed
            });
        }
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(end);
        if authority.contains('@') {
            return Err(CallbackRefused::Userinfo);
        }
        let (host, port) = if authority.starts_with('[') {
            let close = authority.find(']').ok_or(CallbackRefused::Malformed)? + 1;
            let (host, after) = authority.split_at(close);
            match after {
                "" => (host, None),
                _ => (
                    host,
                    Some(after.strip_prefix(':').ok_or(CallbackRefused::Malformed)?),
                ),
            }
        } else {
            match authority.split_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        let port = match port {
            None => 80,
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => {
                match p.parse::<u16>() {
                    Ok(n) if n > 0 => n,
                    _ => return Err(CallbackRefused::Malformed),
                }
            }
            Some(_) => return Err(CallbackRefused::Malformed),
        };
        let host = CallbackHost {
            host: CallbackHost::normalise_host(host).ok_or(CallbackRefused::Malformed)?,
            port,
        };
        if !allowed.contains(&host) {
            return Err(CallbackRefused::NotAllowed(host.to_string()));
        }
        let path = match path {
            "" => "/".to_owned(),
            p if p.starts_with('?') => format!("/{p}"),
            p => p.to_owned(),
        };
        let uri = Uri::builder()
            .scheme("http")
            .authority(host.to_string())
            .path_and_query(path)
            .build()
            .map_err(|_| CallbackRefused::Malformed)?;
        Ok(CallbackTarget { uri, host })
    }

    /// The URI to `POST` to (normalised: lower-case host, explicit port).
    pub fn uri(&self) -> &Uri {
        &self.uri
    }

    /// The allow-list entry it matched.
    pub fn host(&self) -> &CallbackHost {
        &self.host
    }

    /// `http://host:port/path`, without the query (which may carry a receiver's token): what
    /// logs show.
    pub fn for_log(&self) -> String {
        format!("http://{}{}", self.host, self.uri.path())
    }
}

/// One `POST` to make: a finished job's outcome for one callback URL. Made by
/// [`super::Jobs::complete`] and [`super::Jobs::fail`], sent by [`Callbacks`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub job: JobId,
    pub target: CallbackTarget,
    /// The upstream response's status (`Edgecache-Status`).
    pub status: StatusCode,
    pub content_type: Option<HeaderValue>,
    pub content_encoding: Option<HeaderValue>,
    pub body: Bytes,
}

impl Delivery {
    /// The request of one attempt at `t` (Unix seconds), signed with `secret`.
    pub fn request(&self, secret: &[u8], t: u64) -> Request<Full<Bytes>> {
        let mut req = Request::new(Full::new(self.body.clone()));
        *req.method_mut() = http::Method::POST;
        *req.uri_mut() = self.target.uri.clone();
        let h = req.headers_mut();
        let signature = signature_header(secret, t, &self.body);
        h.insert(
            HeaderName::from_static(SIGNATURE_HEADER),
            HeaderValue::try_from(signature).expect("ASCII"),
        );
        h.insert(JOB_HEADER, self.job.header_value());
        h.insert(STATUS_HEADER, HeaderValue::from(self.status.as_u16()));
        if let Some(v) = &self.content_type {
            h.insert(header::CONTENT_TYPE, v.clone());
        }
        if let Some(v) = &self.content_encoding {
            h.insert(header::CONTENT_ENCODING, v.clone());
        }
        h.insert(
            header::USER_AGENT,
            HeaderValue::from_static(concat!("edgecache/", env!("CARGO_PKG_VERSION"))),
        );
        req
    }
}

/// How a delivery is retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub attempts: u32,
    /// Backoff before the first retry; doubled for each one after, up to `max_backoff`. The
    /// pause is drawn between half of that and all of it (jitter, so that deliveries that
    /// failed together do not all retry together).
    pub first_backoff: Duration,
    pub max_backoff: Duration,
    /// Connecting, sending and receiving the response head, per attempt.
    pub attempt_timeout: Duration,
}

impl Default for RetryPolicy {
    /// 5 attempts, backoff 1 s doubling to at most 60 s, 10 s per attempt: a receiver down
    /// for up to about 15 s still gets the callback.
    fn default() -> Self {
        RetryPolicy {
            attempts: 5,
            first_backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(60),
            attempt_timeout: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// The pause before retry number `retry` (1 for the first), with `jitter` in `[0, 1]`
    /// choosing within `[half, full]` of the exponential step; at least `retry_after` (the
    /// receiver's `Retry-After`), and never more than `max_backoff`.
    pub fn backoff(&self, retry: u32, jitter: f64, retry_after: Option<Duration>) -> Duration {
        let step = self
            .first_backoff
            .saturating_mul(1u32 << retry.saturating_sub(1).min(20))
            .min(self.max_backoff);
        let pause = step.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0));
        pause
            .max(retry_after.unwrap_or_default())
            .min(self.max_backoff)
    }
}

/// How one delivery ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A `2xx` on attempt `attempts`.
    Delivered { attempts: u32 },
    /// An answer that is not retried (`3xx`, `4xx` but `408`/`429`).
    Rejected { status: StatusCode, attempts: u32 },
    /// Every attempt failed with something retryable; `last` says what.
    Exhausted { attempts: u32, last: String },
    /// No `CALLBACK_SECRET`: nothing is ever sent unsigned (configuration forbids this case).
    Unsigned,
}

/// One attempt's answer: a response head, or why there was none.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    Answered {
        status: StatusCode,
        retry_after: Option<Duration>,
    },
    /// Could not connect, the connection failed, or no response head in time.
    Failed(String),
}

type CallbackClient = Client<HttpConnector, Full<Bytes>>;

/// The callback HTTP client: plain HTTP/1.1 with a small keep-alive pool. The one place to
/// change for `https://` callbacks (a TLS connector, e.g. `hyper-rustls`, wrapping this
/// `HttpConnector`).
pub fn build_client(connect_timeout: Duration) -> CallbackClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(connect_timeout));
    Client::builder(TokioExecutor::new())
        // Below the 5 s after which Node, Apache and uvicorn close idle connections.
        .pool_idle_timeout(Duration::from_secs(4))
        .pool_max_idle_per_host(4)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector)
}

/// Sends [`Delivery`]s: the client, the secret, the retry policy and the counters.
pub struct Callbacks {
    client: CallbackClient,
    secret: Option<CallbackSecret>,
    policy: RetryPolicy,
    delivered: AtomicU64,
    failed: AtomicU64,
    retries: AtomicU64,
    in_flight: AtomicI64,
}

impl Callbacks {
    /// With `CALLBACK_SECRET` (`None` only when callbacks are off: then nothing is sent).
    pub fn new(secret: Option<CallbackSecret>, policy: RetryPolicy) -> Self {
        Callbacks {
            client: build_client(policy.attempt_timeout),
            secret,
            policy,
            delivered: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            in_flight: AtomicI64::new(0),
        }
    }

    /// Starts every delivery as its own task on `background` (cancelled at shutdown).
    pub fn spawn(self: &Arc<Self>, background: &Background, deliveries: Vec<Delivery>) {
        for d in deliveries {
            let this = self.clone();
            background.spawn("callback_delivery", async move {
                this.deliver(&d).await;
            });
        }
    }

    /// Delivers `d`: attempts, backoff and counting as the module docs say.
    pub async fn deliver(&self, d: &Delivery) -> Outcome {
        self.deliver_via(d, |req| post(&self.client, req)).await
    }

    /// [`Callbacks::deliver`] with the sending of one attempt given (tests pass a fake
    /// receiver). `send` need not time out: each attempt is bounded here.
    pub async fn deliver_via<S, F>(&self, d: &Delivery, mut send: S) -> Outcome
    where
        S: FnMut(Request<Full<Bytes>>) -> F,
        F: Future<Output = Attempt>,
    {
        let Some(secret) = &self.secret else {
            self.failed.fetch_add(1, Ordering::Relaxed);
            tracing::error!(job = %d.job, "callback not sent: no CALLBACK_SECRET");
            return Outcome::Unsigned;
        };
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let _in_flight = InFlight(&self.in_flight);
        let mut attempt = 1;
        loop {
            let req = d.request(secret.as_bytes(), unix_now());
            let answer = tokio::time::timeout(self.policy.attempt_timeout, send(req))
                .await
                .unwrap_or_else(|_| Attempt::Failed("timed out".into()));
            let (hint, last) = match answer {
                Attempt::Answered { status, .. } if status.is_success() => {
                    self.delivered.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(job = %d.job, target = d.target.for_log(), attempt, "callback delivered");
                    return Outcome::Delivered { attempts: attempt };
                }
                Attempt::Answered {
                    status,
                    retry_after,
                } if retryable(status) => (retry_after, status.to_string()),
                Attempt::Answered { status, .. } => {
                    self.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(job = %d.job, target = d.target.for_log(), status = status.as_u16(), attempt, "callback refused by its receiver; not retried");
                    return Outcome::Rejected {
                        status,
                        attempts: attempt,
                    };
                }
                Attempt::Failed(why) => (None, why),
            };
            if attempt >= self.policy.attempts {
                self.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(job = %d.job, target = d.target.for_log(), attempts = attempt, last = %last, "callback not delivered; giving up");
                return Outcome::Exhausted {
                    attempts: attempt,
                    last,
                };
            }
            let pause = self.policy.backoff(attempt, jitter(), hint);
            tracing::debug!(job = %d.job, target = d.target.for_log(), attempt, last = %last, retry_in_ms = pause.as_millis() as u64, "callback attempt failed");
            self.retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(pause).await;
            attempt += 1;
        }
    }

    /// Appends the callback series in the Prometheus text format (see [`crate::metrics`]).
    pub fn render_metrics(&self, out: &mut String) {
        metrics::series(
            out,
            "edgecache_callbacks_total",
            "counter",
            "Job callbacks by how they ended: delivered (a 2xx), failed (refused by the receiver, or every attempt failed).",
        );
        for (result, n) in [("delivered", &self.delivered), ("failed", &self.failed)] {
            let _ = writeln!(
                out,
                "edgecache_callbacks_total{{result=\"{result}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
        metrics::series(
            out,
            "edgecache_callback_retries_total",
            "counter",
            "Callback attempts retried after a connection error, a timeout, 408, 429 or 5xx.",
        );
        let _ = writeln!(
            out,
            "edgecache_callback_retries_total {}",
            self.retries.load(Ordering::Relaxed)
        );
        metrics::series(
            out,
            "edgecache_callbacks_in_flight",
            "gauge",
            "Callbacks being delivered (attempting or waiting to retry).",
        );
        let _ = writeln!(
            out,
            "edgecache_callbacks_in_flight {}",
            self.in_flight.load(Ordering::Relaxed)
        );
    }
}

struct InFlight<'a>(&'a AtomicI64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Worth another attempt: the receiver is busy or broken for now.
fn retryable(status: StatusCode) -> bool {
    status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
}

/// One attempt over the network. The outcome is decided by the response head; the body
/// (at most 64 KiB, for a second or so) is read only so the connection can be reused.
async fn post(client: &CallbackClient, req: Request<Full<Bytes>>) -> Attempt {
    match client.request(req).await {
        Ok(resp) => {
            let status = resp.status();
            let retry_after = resp
                .headers()
                .get(header::RETRY_AFTER)
                .and_then(|v| parse_retry_after(v, SystemTime::now()));
            let drain = Limited::new(resp.into_body(), 64 << 10).collect();
            let _ = tokio::time::timeout(Duration::from_secs(1), drain).await;
            Attempt::Answered {
                status,
                retry_after,
            }
        }
        Err(e) => Attempt::Failed(crate::error::chain(&e)),
    }
}

/// `Retry-After` as delay-seconds or an HTTP-date (a date in the past: no delay).
pub fn parse_retry_after(v: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let v = v.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs.min(86_400)));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A uniform draw in `[0, 1]` from the OS (0.5 if it fails: jitter is not security).
fn jitter() -> f64 {
    let mut b = [0u8; 4];
    match getrandom::getrandom(&mut b) {
        Ok(()) => f64::from(u32::from_le_bytes(b)) / f64::from(u32::MAX),
        Err(_) => 0.5,
    }
}
