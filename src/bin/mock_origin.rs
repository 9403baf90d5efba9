//! `mock-origin`: the deterministic demo/test origin that edgecache's quick start,
//! integration tests and benchmarks run against.
//!
//! Listens on `--listen ADDR`, else `$MOCK_ORIGIN_ADDR`, else `127.0.0.1:3006` (port 0
//! picks a free port). Once bound it prints exactly one stdout line,
//! `mock-origin listening on http://IP:PORT`. Speaks HTTP/1.1 and h2c; exits cleanly on
//! SIGINT/SIGTERM. Bad arguments or addresses exit with code 2, bind failures with 1.
//! `--help` lists the option and the routes, `--version` prints the version.
//!
//! # Routes
//!
//! - `GET|HEAD /data?id=X` (id defaults to `1`): `{"id":"X","updated_at":N,"value":"..."}`
//!   where `updated_at` is a per-id version counter starting at 1. Sends a strong
//!   `ETag` (first 16 hex chars of `sha256("X:N")`), `Last-Modified` and, only when
//!   `max_age=M` is given, `Cache-Control: max-age=M`. Answers `304` (ETag, no body)
//!   when `If-None-Match` matches (lists, `W/` and `*` understood) or, without
//!   `If-None-Match`, when `If-Modified-Since` is not older than `Last-Modified`.
//! - `PUT|POST /data?id=X`: bumps the id's `updated_at` (and `Last-Modified`, by at least
//!   one second, so it may run ahead of the clock) and returns 200 with the new JSON
//!   and validators. The request body is ignored.
//! - `/health-check` (any method): `200 ok`, or `503 unhealthy` while toggled off.
//! - `POST|PUT /admin/health?ok=true|false`: sets the health toggle.
//! - `GET|HEAD /bytes?size=N` (default 1024, capped at 16 GiB): N deterministic bytes,
//!   byte i = `(i*31+7) % 256`, `application/octet-stream`, streamed in 64 KiB chunks.
//!   Optional pacing: `interval_ms=D` pauses D ms after every `chunk=B` bytes (default
//!   64 KiB; frames stay at most 64 KiB), e.g. `chunk=1048576&interval_ms=50` sends
//!   1 MiB every 50 ms. No pause before the first byte or after the last; `chunk` without
//!   `interval_ms` changes nothing. `chunk=0` is a `400`.
//! - `/echo` (any method): JSON with `method`, `version`, `uri` (path+query), `host`,
//!   `headers` (lower-case name -> value, repeats joined with `, `), `body_len` and
//!   `body_sha256` of the request body, which is read as a stream.
//! - `GET /stats`: `{"total":N,"connections":C,"by_path":{"/data?id=1":3,...}}`.
//!   `GET /stats?path=KEY` (KEY percent-encoded) returns just that key's count as text.
//!   `POST /stats/reset` zeroes all counters. `/stats*` requests are never counted;
//!   every other request counts (on arrival) towards `total` and its raw `path?query`
//!   key. `connections` counts every accepted TCP connection, including the one
//!   used to ask for `/stats`.
//! - Anything else: `404` plain text.
//!
//! # Common query parameters (every route except `/stats*`)
//!
//! - `delay_ms=D`: sleep D ms before producing the response headers.
//! - `status=S`: override the status code (a number outside 200..=999 is ignored).
//! - `cc=VALUE`: set `Cache-Control` to VALUE (percent-decoded, e.g. `cc=max-age%3D60`);
//!   wins over `/data`'s `max_age`.
//! - `set_cookie=1`: add `Set-Cookie: session=abc`.
//! - `vary=Header-Name`: add `Vary: Header-Name`.
//! - `etag=0`: suppress `/data`'s ETag (`If-None-Match` then only matches `*`).
//! - `body=TEXT` (`/echo` only): respond with TEXT as `text/plain` instead of JSON.
//!
//! Query strings are form-decoded (`%XX` and `+` as space). Malformed numbers or header
//! values yield `400`.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::future::Future as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use sha2::{Digest, Sha256};
use tokio::net::TcpListener;

type Body = BoxBody<Bytes, Infallible>;

const DEFAULT_ADDR: &str = "127.0.0.1:3006";
const CHUNK: usize = 64 * 1024;
const MAX_BYTES: u64 = 16 << 30;
const DEFAULT_BYTES: u64 = 1024;
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// One chunk plus one period of the `/bytes` pattern; chunks are zero-copy slices of it.
static PATTERN: LazyLock<Bytes> = LazyLock::new(|| {
    (0..CHUNK + 256)
        .map(|i| ((i * 31 + 7) % 256) as u8)
        .collect()
});

#[derive(Clone, Copy)]
struct Item {
    updated_at: u64,
    /// Whole unix seconds, so every bump visibly changes the HTTP-date.
    modified: u64,
}

#[derive(Default)]
struct State {
    items: Mutex<HashMap<String, Item>>,
    unhealthy: AtomicBool,
    total: AtomicU64,
    connections: AtomicU64,
    by_path: Mutex<HashMap<String, u64>>,
}

impl State {
    /// Returns the id's current version (created at 1); `bump` advances it first.
    fn item(&self, id: &str, bump: bool) -> Item {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut items = lock(&self.items);
        let item = items.entry(id.to_owned()).or_insert(Item {
            updated_at: 1,
            modified: now,
        });
        if bump {
            item.updated_at += 1;
            item.modified = now.max(item.modified + 1);
        }
        *item
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A query parameter that failed to parse; rendered as `400 Bad Request`.
struct BadParam(&'static str);

/// Decoded query string; the first occurrence of a key wins.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(raw: &str) -> Self {
        let pairs = raw.split('&').filter(|p| !p.is_empty()).map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        });
        Query(pairs.collect())
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn parsed<T>(
        &self,
        key: &'static str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Result<Option<T>, BadParam> {
        self.get(key)
            .map(|v| parse(v).ok_or(BadParam(key)))
            .transpose()
    }

    fn number<T: std::str::FromStr>(&self, key: &'static str) -> Result<Option<T>, BadParam> {
        self.parsed(key, |v| v.parse().ok())
    }

    fn header(&self, key: &'static str) -> Result<Option<HeaderValue>, BadParam> {
        self.parsed(key, |v| HeaderValue::from_str(v).ok())
    }
}

/// Form-style decoding: `%XX` escapes and `+` as space; invalid escapes stay literal.
fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let hex = |i: usize| bytes.get(i).and_then(|&b| (b as char).to_digit(16));
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match (bytes[i], hex(i + 1), hex(i + 2)) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 2;
            }
            (b'+', ..) => out.push(b' '),
            (b, ..) => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Lazily generated `/bytes` body: byte i is `(i*31+7) % 256`, in frames of at most 64 KiB.
struct PatternBody {
    sent: u64,
    len: u64,
    pacing: Option<Pacing>,
}

/// `/bytes?chunk=B&interval_ms=D`: a pause of `interval` after every `chunk` bytes.
struct Pacing {
    chunk: u64,
    interval: Duration,
    /// Bytes still to send before the next pause.
    left: u64,
    pause: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl PatternBody {
    fn new(len: u64, pacing: Option<(u64, Duration)>) -> Self {
        let pacing = pacing.map(|(chunk, interval)| Pacing {
            chunk,
            interval,
            left: chunk,
            pause: None,
        });
        PatternBody {
            sent: 0,
            len,
            pacing,
        }
    }
}

impl hyper::body::Body for PatternBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = &mut *self;
        let mut n = (this.len - this.sent).min(CHUNK as u64) as usize;
        if n == 0 {
            return Poll::Ready(None);
        }
        if let Some(pacing) = &mut this.pacing {
            if pacing.left == 0 {
                let interval = pacing.interval;
                let pause = pacing
                    .pause
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(interval)));
                if pause.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                pacing.pause = None;
                pacing.left = pacing.chunk;
            }
            n = n.min(pacing.left.min(CHUNK as u64) as usize);
            pacing.left -= n as u64;
        }
        let start = (this.sent % 256) as usize;
        this.sent += n as u64;
        Poll::Ready(Some(Ok(Frame::data(PATTERN.slice(start..start + n)))))
    }

    fn is_end_stream(&self) -> bool {
        self.sent >= self.len
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.len - self.sent)
    }
}

fn respond(status: StatusCode, content_type: &'static str, body: Body) -> Response<Body> {
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let value = HeaderValue::from_static(content_type);
    resp.headers_mut().insert(header::CONTENT_TYPE, value);
    resp
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    respond(
        status,
        "text/plain; charset=utf-8",
        Full::new(body.into()).boxed(),
    )
}

/// A `200` with `value` serialized as its JSON body.
fn json(value: &impl serde::Serialize) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(body) => respond(
            StatusCode::OK,
            "application/json",
            Full::new(body.into()).boxed(),
        ),
        Err(err) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot serialize the response: {err}\n"),
        ),
    }
}

/// The `/data` body.
#[derive(serde::Serialize)]
struct DataBody<'a> {
    id: &'a str,
    updated_at: u64,
    value: String,
}

/// The `/echo` body (the field order is the JSON order).
#[derive(serde::Serialize)]
struct EchoBody<'a> {
    method: &'a str,
    version: String,
    uri: &'a str,
    host: Option<String>,
    headers: BTreeMap<&'a str, String>,
    body_len: u64,
    body_sha256: String,
}

/// The `/stats` body.
#[derive(serde::Serialize)]
struct StatsBody<'a> {
    total: u64,
    connections: u64,
    by_path: BTreeMap<&'a str, u64>,
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let query = Query::parse(req.uri().query().unwrap_or(""));
    if path == "/stats" || path.starts_with("/stats/") {
        let method = req.method().clone();
        drain(req.into_body()).await;
        return stats(&state, &method, &path, &query);
    }
    state.total.fetch_add(1, Ordering::Relaxed);
    let key = req.uri().path_and_query().map_or(&*path, |pq| pq.as_str());
    *lock(&state.by_path).entry(key.to_owned()).or_default() += 1;

    serve(&state, req, &path, &query)
        .await
        .unwrap_or_else(|BadParam(key)| {
            text(
                StatusCode::BAD_REQUEST,
                format!("invalid query parameter `{key}`\n"),
            )
        })
}

/// Applies the common parameters around the route-specific handler.
async fn serve(
    state: &State,
    req: Request<Incoming>,
    path: &str,
    query: &Query,
) -> Result<Response<Body>, BadParam> {
    let status = query.number::<u16>("status")?;
    let cache_control = query.header("cc")?;
    let vary = query.header("vary")?;
    if let Some(delay_ms) = query.number("delay_ms")? {
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
    }

    let mut resp = route(state, req, path, query).await?;
    if let Some(status) = status
        .filter(|s| *s >= 200)
        .and_then(|s| StatusCode::from_u16(s).ok())
    {
        *resp.status_mut() = status;
    }
    let headers = resp.headers_mut();
    if let Some(cc) = cache_control {
        headers.insert(header::CACHE_CONTROL, cc);
    }
    if let Some(vary) = vary {
        headers.insert(header::VARY, vary);
    }
    if query.get("set_cookie") == Some("1") {
        headers.insert(header::SET_COOKIE, HeaderValue::from_static("session=abc"));
    }
    Ok(resp)
}

async fn route(
    state: &State,
    req: Request<Incoming>,
    path: &str,
    query: &Query,
) -> Result<Response<Body>, BadParam> {
    if path == "/echo" {
        return Ok(echo(req, query).await);
    }
    let (parts, body) = req.into_parts();
    drain(body).await;
    Ok(match (&parts.method, path) {
        (&Method::GET | &Method::HEAD, "/data") => data(state, &parts.headers, query, false)?,
        (&Method::PUT | &Method::POST, "/data") => data(state, &parts.headers, query, true)?,
        (_, "/health-check") if state.unhealthy.load(Ordering::Relaxed) => {
            text(StatusCode::SERVICE_UNAVAILABLE, "unhealthy")
        }
        (_, "/health-check") => text(StatusCode::OK, "ok"),
        (&Method::POST | &Method::PUT, "/admin/health") => {
            let healthy: bool = query.number("ok")?.ok_or(BadParam("ok"))?;
            state.unhealthy.store(!healthy, Ordering::Relaxed);
            text(StatusCode::OK, if healthy { "ok" } else { "unhealthy" })
        }
        (&Method::GET | &Method::HEAD, "/bytes") => {
            let len = query
                .number("size")?
                .unwrap_or(DEFAULT_BYTES)
                .min(MAX_BYTES);
            let chunk = query.number::<u64>("chunk")?.unwrap_or(CHUNK as u64);
            if chunk == 0 {
                return Err(BadParam("chunk"));
            }
            let pacing = query
                .number::<u64>("interval_ms")?
                .filter(|ms| *ms > 0)
                .map(|ms| (chunk, Duration::from_millis(ms)));
            let body = PatternBody::new(len, pacing).boxed();
            respond(StatusCode::OK, "application/octet-stream", body)
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    })
}

fn data(
    state: &State,
    req_headers: &HeaderMap,
    query: &Query,
    bump: bool,
) -> Result<Response<Body>, BadParam> {
    let id = query.get("id").unwrap_or("1");
    let max_age: Option<u64> = query.number("max_age")?;
    let item = state.item(id, bump);
    let modified = UNIX_EPOCH + Duration::from_secs(item.modified);
    let etag = (query.get("etag") != Some("0")).then(|| {
        let digest = Sha256::digest(format!("{id}:{}", item.updated_at));
        format!("\"{}\"", &format!("{digest:x}")[..16])
    });

    let mut resp = if !bump && not_modified(req_headers, etag.as_deref(), modified) {
        let mut resp = Response::new(Empty::new().boxed());
        *resp.status_mut() = StatusCode::NOT_MODIFIED;
        resp
    } else {
        json(&DataBody {
            id,
            updated_at: item.updated_at,
            value: format!("{id} at version {}", item.updated_at),
        })
    };
    let headers = resp.headers_mut();
    let mut set = |name, value: String| {
        if let Ok(value) = HeaderValue::try_from(value) {
            headers.insert(name, value);
        }
    };
    if let Some(etag) = etag {
        set(header::ETAG, etag);
    }
    set(header::LAST_MODIFIED, httpdate::fmt_http_date(modified));
    if let Some(max_age) = max_age {
        set(header::CACHE_CONTROL, format!("max-age={max_age}"));
    }
    Ok(resp)
}

/// RFC 9110 conditional GET: `If-None-Match` (weak comparison, lists, `*`) takes
/// precedence over `If-Modified-Since`.
fn not_modified(headers: &HeaderMap, etag: Option<&str>, modified: SystemTime) -> bool {
    let mut tags = headers.get_all(header::IF_NONE_MATCH).iter().peekable();
    if tags.peek().is_some() {
        return tags
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|tag| {
                let tag = tag.trim();
                tag == "*" || etag == Some(tag.strip_prefix("W/").unwrap_or(tag))
            });
    }
    headers
        .get(header::IF_MODIFIED_SINCE)
        .and_then(|v| httpdate::parse_http_date(v.to_str().ok()?).ok())
        .is_some_and(|since| modified <= since)
}

async fn echo(req: Request<Incoming>, query: &Query) -> Response<Body> {
    let (parts, mut body) = req.into_parts();
    let mut hasher = Sha256::new();
    let mut body_len = 0u64;
    while let Some(Ok(frame)) = body.frame().await {
        if let Ok(data) = frame.into_data() {
            body_len += data.len() as u64;
            hasher.update(&data);
        }
    }
    if let Some(body) = query.get("body") {
        return text(StatusCode::OK, body.to_owned());
    }

    let mut headers: BTreeMap<&str, String> = BTreeMap::new();
    for (name, value) in &parts.headers {
        let value = String::from_utf8_lossy(value.as_bytes());
        let joined = headers.entry(name.as_str()).or_default();
        if !joined.is_empty() {
            joined.push_str(", ");
        }
        joined.push_str(&value);
    }
    let host = match parts.headers.get(header::HOST) {
        Some(host) => Some(String::from_utf8_lossy(host.as_bytes()).into_owned()),
        None => parts.uri.authority().map(|a| a.as_str().to_owned()),
    };
    json(&EchoBody {
        method: parts.method.as_str(),
        version: format!("{:?}", parts.version),
        uri: parts.uri.path_and_query().map_or("/echo", |pq| pq.as_str()),
        host,
        headers,
        body_len,
        body_sha256: format!("{:x}", hasher.finalize()),
    })
}

fn stats(state: &State, method: &Method, path: &str, query: &Query) -> Response<Body> {
    let mut by_path = lock(&state.by_path);
    match (method, path, query.get("path")) {
        (&Method::GET, "/stats", Some(key)) => text(
            StatusCode::OK,
            by_path.get(key).copied().unwrap_or(0).to_string(),
        ),
        (&Method::GET, "/stats", None) => json(&StatsBody {
            total: state.total.load(Ordering::Relaxed),
            connections: state.connections.load(Ordering::Relaxed),
            by_path: by_path.iter().map(|(k, v)| (k.as_str(), *v)).collect(),
        }),
        (&Method::POST, "/stats/reset", _) => {
            by_path.clear();
            state.total.store(0, Ordering::Relaxed);
            state.connections.store(0, Ordering::Relaxed);
            text(StatusCode::OK, "reset\n")
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Reads and discards a request body so keep-alive connections stay reusable.
async fn drain(mut body: Incoming) {
    while let Some(Ok(_)) = body.frame().await {}
}

/// The command line: `--listen ADDR` (else `$MOCK_ORIGIN_ADDR`, else the default),
/// `--help`, `--version`. Usage errors exit 2 (clap's convention).
fn command() -> clap::Command {
    clap::Command::new("mock-origin")
        .version(env!("CARGO_PKG_VERSION"))
        .about("The deterministic demo/test origin of edgecache's quick start, tests and benchmarks.")
        .after_help(ROUTES)
        .arg(
            clap::Arg::new("listen")
                .long("listen")
                .value_name("ADDR")
                .env("MOCK_ORIGIN_ADDR")
                .default_value(DEFAULT_ADDR)
                .help("Address to listen on, IP:PORT (port 0 picks a free port); prints `mock-origin listening on http://IP:PORT` once bound"),
        )
}

/// The routes, for `--help` (the module documentation has the details).
const ROUTES: &str = "Routes:
  GET|HEAD /data?id=X[&max_age=M]   JSON {id, updated_at, value} with ETag, Last-Modified; 304 on a match
  PUT|POST /data?id=X               bump the id's version
  /health-check                     200 ok, or 503 while toggled off by POST /admin/health?ok=false
  GET|HEAD /bytes?size=N            N deterministic bytes (at most 16 GiB), streamed
           [&chunk=B&interval_ms=D]   paced: a D ms pause after every B bytes (B default 64 KiB)
  /echo                             the request as JSON (method, version, uri, host, headers, body_len, body_sha256)
  GET /stats[?path=KEY]             request counts; POST /stats/reset zeroes them
Every route but /stats takes delay_ms=D, status=S, cc=VALUE, set_cookie=1, vary=NAME, etag=0.";

fn listen_addr(args: &clap::ArgMatches) -> Result<SocketAddr, String> {
    let addr = args
        .get_one::<String>("listen")
        .map_or(DEFAULT_ADDR, String::as_str);
    addr.parse()
        .map_err(|_| format!("invalid listen address `{addr}` (expected IP:PORT)"))
}

/// Resolves on SIGINT (Ctrl-C) or, on Unix, SIGTERM.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

#[tokio::main]
async fn main() -> ExitCode {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .init();

    let args = command().get_matches();
    let addr = match listen_addr(&args) {
        Ok(addr) => addr,
        Err(err) => {
            eprintln!("mock-origin: {err}");
            return ExitCode::from(2);
        }
    };
    let listener = match TcpListener::bind(addr).await {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("mock-origin: cannot listen on {addr}: {err}");
            return ExitCode::from(1);
        }
    };
    let local = listener.local_addr().unwrap_or(addr);
    let mut stdout = std::io::stdout().lock();
    let _ =
        writeln!(stdout, "mock-origin listening on http://{local}").and_then(|()| stdout.flush());
    drop(stdout);

    let state = Arc::new(State::default());
    let builder = auto::Builder::new(TokioExecutor::new());
    let graceful = GracefulShutdown::new();
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Typically fd exhaustion: back off instead of spinning.
                    tracing::warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        state.connections.fetch_add(1, Ordering::Relaxed);
        let _ = stream.set_nodelay(true);
        let state = state.clone();
        let service = service_fn(move |req| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(handle(state, req).await) }
        });
        let conn = builder
            .serve_connection(TokioIo::new(stream), service)
            .into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            if let Err(err) = conn.await {
                tracing::debug!(%peer, %err, "connection ended with error");
            }
        });
    }

    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after the grace period; exiting anyway");
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Collects a `/bytes` body; returns it and the (paused-clock) time it took.
    async fn collect(body: PatternBody) -> (Bytes, Duration) {
        let start = tokio::time::Instant::now();
        let bytes = body.collect().await.map(|c| c.to_bytes());
        let Ok(bytes) = bytes;
        (bytes, start.elapsed())
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| ((i * 31 + 7) % 256) as u8).collect()
    }

    #[tokio::test(start_paused = true)]
    async fn paced_bytes_pause_between_chunks_only() {
        // 2.5 chunks of 100 KiB: two pauses (none before the first byte or after the last).
        let len = 250 * 1024;
        let body = PatternBody::new(len as u64, Some((100 * 1024, Duration::from_millis(50))));
        let (bytes, took) = collect(body).await;
        assert_eq!(bytes.as_ref(), pattern(len).as_slice());
        assert_eq!(took, Duration::from_millis(100));

        let (bytes, took) = collect(PatternBody::new(len as u64, None)).await;
        assert_eq!(bytes.as_ref(), pattern(len).as_slice());
        assert_eq!(took, Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn paced_frames_stay_within_a_chunk() {
        // chunk=1000 (not a divisor of 64 KiB): every frame ends at a chunk boundary at most.
        let mut body = PatternBody::new(2500, Some((1000, Duration::from_millis(10))));
        let mut sizes = Vec::new();
        while let Some(Ok(frame)) = body.frame().await {
            sizes.push(frame.into_data().map_or(0, |d| d.len()));
        }
        assert_eq!(sizes, [1000, 1000, 500]);
    }
}
