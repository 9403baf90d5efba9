//! `herd`: the load tool of the benchmark suite (`bench/run.sh`, see `bench/README.md`).
//! Loopback only; every mode is bounded in count or time and exits by itself.
//!
//! ```text
//! cargo run --release --example herd -- --url URL [--concurrency C] [--stats-url URL] [--timeout S]
//!                                           [--expect-bytes N]
//!     Thundering herd: opens C connections first (connect time is excluded), parks one
//!     request per connection at a barrier and releases them all at once. Each request's
//!     latency runs from that release to its last body byte, so the fastest (`min_ms`) is the
//!     leader's and the rest are the followers'. `last_sent_ms`: when the client had put the
//!     last request on the wire (its own share of the spread). With --stats-url
//!     (mock-origin's `/stats?path=<percent-encoded path?query>`) the origin's count for the
//!     key is read before and after, giving the upstream calls the herd caused.
//!     Time to first byte (TTFB) also runs from the release, to the first body byte (to the
//!     response head for an empty body). The request with the earliest first byte is taken
//!     as the leader (`ttfb_first_ms`); `ttfb_p50_ms`/`ttfb_p99_ms`/`ttfb_max_ms` are over
//!     the others (all of them when C = 1). `total_ms`: release to the last request's end.
//!     `bytes`: body bytes received by successful requests. --expect-bytes N: every body must
//!     be exactly N bytes of mock-origin's `/bytes` pattern (byte i = (i*31+7) % 256),
//!     checked as it streams in; a body that is not is an error and counts in `bad_bodies`.
//!     Prints:
//!     {"count","errors","min_ms","p50_ms","p99_ms","max_ms","p99_minus_min_ms",
//!      "last_sent_ms","upstream_calls","ttfb_first_ms","ttfb_p50_ms","ttfb_p99_ms",
//!      "ttfb_max_ms","total_ms","bytes","bad_bodies"}
//!     (upstream_calls is null without --stats-url; `count` and every latency are over the
//!     successful requests)
//!
//! herd --sequence N --url TEMPLATE [--inflight K] [--start I]
//!     Fetches N distinct URLs, TEMPLATE with `{i}` replaced by I, I+1, ..., over K keep-alive
//!     connections (default 64), each request waiting for the previous one on its connection.
//!     Prints {"count","errors","secs","rps"}.
//!
//! herd --load --url URL [--connections K] [--duration S]
//!     Closed-loop keep-alive load on one URL (the fallback when `wrk` is missing): K
//!     connections (default 64), each sending its next request when the previous answer is
//!     read, for S seconds (default 5). Prints {"count","errors","secs","rps","p50_ms",
//!     "p99_ms","max_ms"}.
//!
//! herd --serve ADDR
//!     The "bare" baseline: a minimal hyper server (same server settings as edgecache:
//!     HTTP/1.1 keep-alive + h2c, TCP_NODELAY) answering every request from memory with
//!     `size` (query parameter, default 1024, max 16 MiB) bytes sliced from one shared buffer,
//!     after `delay_ms` (query parameter, default 0) — so a herd against it with the same
//!     delay shows what answering C parked requests costs on this machine without any cache.
//!     Prints `herd-bare listening on http://IP:PORT` and runs until SIGINT/SIGTERM.
//!
//! herd --timed N --url TEMPLATE [--start I] [--match TEXT]
//!     Latency of single requests: N GETs of TEMPLATE (`{i}` replaced by I, I+1, ...) one
//!     after another on one keep-alive connection, each timed from sending to its last body
//!     byte. --match TEXT: counts the responses whose head (`name: value` lines, names in
//!     lower case) or first 4 KiB of body contain TEXT (`detail=redis`, `"acks":3`). A status
//!     other than 2xx is an error. Prints {"count","errors","p50_ms","p99_ms","max_ms",
//!     "matched","unmatched_sample"} (latencies over the successful requests).
//!
//! herd --free-port
//!     Prints a currently free loopback TCP port.
//! ```
//!
//! In every client mode, --host H sends `Host: H` instead of the URL's authority and
//! --header 'Name: value' (repeatable) adds a request header.
//!
//! Only `http://` URLs with an IP-literal or `localhost` host are accepted.

use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Barrier, Semaphore};

const USAGE: &str = "\
usage (see the top of examples/herd.rs):
  herd --url URL [--concurrency C] [--stats-url URL] [--timeout S] [--expect-bytes N]
                                                                    thundering herd
  herd --sequence N --url TEMPLATE-with-{i} [--inflight K] [--start I]   N distinct keys
  herd --load --url URL [--connections K] [--duration S]            closed-loop load
  herd --timed N --url TEMPLATE-with-{i} [--start I] [--match TEXT] one request at a time
  herd --serve IP:PORT                                              bare server
  herd --free-port                                                  print a free port
client modes also take --host H and --header 'Name: value' (repeatable)";

const SERVE_MAX: usize = 16 << 20;
const CONNECT_PARALLELISM: usize = 128;

static BUFFER: LazyLock<Bytes> =
    LazyLock::new(|| (0..SERVE_MAX).map(|i| ((i * 31 + 7) % 256) as u8).collect());

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opts = match Opts::parse(&args) {
        Ok(o) => o,
        Err(e) if e == "usage" => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("herd: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    if opts.free_port {
        return match StdListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
            Ok(a) => {
                println!("{}", a.port());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("herd: cannot bind 127.0.0.1:0: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("herd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        if let Some(addr) = &opts.serve {
            return serve(addr).await;
        }
        let url = opts.url.clone().ok_or("--url is required")?;
        let mut target = Target::parse(&url)?;
        if let Some(host) = &opts.host {
            target.host = host.clone();
        }
        target.headers = Arc::new(opts.headers.clone());
        if let Some(n) = opts.timed {
            timed(
                &target,
                n,
                opts.start,
                opts.matching.as_deref(),
                opts.timeout,
            )
            .await
        } else if let Some(n) = opts.sequence {
            sequence(&target, n, opts.start, opts.inflight, opts.timeout).await
        } else if opts.load {
            load(&target, opts.connections, opts.duration, opts.timeout).await
        } else {
            herd(
                &target,
                opts.concurrency,
                opts.stats_url.as_deref(),
                opts.timeout,
                opts.expect_bytes,
            )
            .await
        }
    });
    match result {
        Ok(line) => {
            if !line.is_empty() {
                println!("{line}");
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("herd: {e}");
            ExitCode::FAILURE
        }
    }
}

struct Opts {
    url: Option<String>,
    concurrency: usize,
    stats_url: Option<String>,
    timeout: Duration,
    expect_bytes: Option<u64>,
    sequence: Option<u64>,
    start: u64,
    inflight: usize,
    load: bool,
    connections: usize,
    duration: Duration,
    serve: Option<String>,
    free_port: bool,
    host: Option<String>,
    headers: Vec<(String, String)>,
    timed: Option<u64>,
    matching: Option<String>,
}

impl Opts {
    fn parse(args: &[String]) -> Result<Opts, String> {
        let mut o = Opts {
            url: None,
            concurrency: 1000,
            stats_url: None,
            timeout: Duration::from_secs(30),
            expect_bytes: None,
            sequence: None,
            start: 0,
            inflight: 64,
            load: false,
            connections: 64,
            duration: Duration::from_secs(5),
            serve: None,
            free_port: false,
            host: None,
            headers: Vec::new(),
            timed: None,
            matching: None,
        };
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            let (name, inline) = match arg.split_once('=') {
                Some((n, v)) if n.starts_with("--") => (n, Some(v.to_owned())),
                _ => (arg.as_str(), None),
            };
            let mut value = || -> Result<String, String> {
                inline
                    .clone()
                    .or_else(|| it.next().cloned())
                    .ok_or(format!("{name} needs a value"))
            };
            fn num<T: std::str::FromStr>(name: &str, v: String) -> Result<T, String> {
                v.parse()
                    .map_err(|_| format!("{name}: invalid number `{v}`"))
            }
            fn secs(name: &str, v: String) -> Result<Duration, String> {
                let s: f64 = num(name, v)?;
                if s.is_finite() && s > 0.0 {
                    Ok(Duration::from_secs_f64(s))
                } else {
                    Err(format!("{name} must be positive"))
                }
            }
            match name {
                "--url" => o.url = Some(value()?),
                "--concurrency" | "-c" => o.concurrency = num(name, value()?)?,
                "--stats-url" => o.stats_url = Some(value()?),
                "--timeout" => o.timeout = secs(name, value()?)?,
                "--expect-bytes" => o.expect_bytes = Some(num(name, value()?)?),
                "--sequence" => o.sequence = Some(num(name, value()?)?),
                "--start" => o.start = num(name, value()?)?,
                "--inflight" => o.inflight = num(name, value()?)?,
                "--load" => o.load = true,
                "--connections" => o.connections = num(name, value()?)?,
                "--duration" => o.duration = secs(name, value()?)?,
                "--serve" => o.serve = Some(value()?),
                "--free-port" => o.free_port = true,
                "--host" => o.host = Some(value()?),
                "--header" => {
                    let v = value()?;
                    let (n, val) = v
                        .split_once(':')
                        .ok_or(format!("--header: `{v}` is not `Name: value`"))?;
                    http::HeaderName::from_bytes(n.trim().as_bytes())
                        .map_err(|_| format!("--header: bad name in `{v}`"))?;
                    http::HeaderValue::from_str(val.trim())
                        .map_err(|_| format!("--header: bad value in `{v}`"))?;
                    o.headers.push((n.trim().to_owned(), val.trim().to_owned()));
                }
                "--timed" => o.timed = Some(num(name, value()?)?),
                "--match" => o.matching = Some(value()?),
                "-h" | "--help" => return Err("usage".into()),
                _ => return Err(format!("unknown argument `{arg}`")),
            }
        }
        if o.concurrency == 0 || o.inflight == 0 || o.connections == 0 {
            return Err("--concurrency, --inflight and --connections must be at least 1".into());
        }
        Ok(o)
    }
}

// ---- client plumbing ------------------------------------------------------------------------

/// `http://host:port/path?query` split into a socket address, Host header and origin-form.
#[derive(Clone)]
struct Target {
    addr: SocketAddr,
    host: String,
    path: String,
    /// Extra request headers (`--header`), validated when parsed.
    headers: Arc<Vec<(String, String)>>,
}

impl Target {
    fn parse(url: &str) -> Result<Target, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or(format!("only http:// URLs are supported: {url}"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let has_port = match authority.strip_prefix('[') {
            Some(v6) => v6.contains("]:"),
            None => authority.contains(':'),
        };
        let with_port = if has_port {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        let resolvable = with_port.replacen("localhost:", "127.0.0.1:", 1);
        let addr: SocketAddr = resolvable
            .parse()
            .map_err(|_| format!("the host of {url} must be an IP address or localhost"))?;
        Ok(Target {
            addr,
            host: authority.to_owned(),
            path: path.to_owned(),
            headers: Arc::default(),
        })
    }

    fn with_path(&self, path: String) -> Target {
        Target {
            path,
            ..self.clone()
        }
    }

    fn request(&self) -> Request<Empty<Bytes>> {
        let mut req = Request::get(&self.path).header(http::header::HOST, &self.host);
        for (name, value) in self.headers.iter() {
            req = req.header(name, value);
        }
        req.body(Empty::new()).expect("valid request")
    }
}

async fn connect(addr: SocketAddr) -> Result<SendRequest<Empty<Bytes>>, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake {addr}: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// What one request got.
struct Fetched {
    status: StatusCode,
    /// Body bytes received.
    len: u64,
    /// When the first body byte arrived (the response head, for an empty body).
    first_byte: Instant,
    /// False when the body was checked against the `/bytes` pattern and differed.
    body_ok: bool,
}

/// Sends one request and reads the whole body; a transport error is an Err. With `expect`,
/// the body is compared with the first `expect` bytes of the `/bytes` pattern as it arrives.
async fn fetch(
    sender: &mut SendRequest<Empty<Bytes>>,
    target: &Target,
    expect: Option<u64>,
) -> Result<Fetched, String> {
    sender.ready().await.map_err(|e| e.to_string())?;
    let resp = sender
        .send_request(target.request())
        .await
        .map_err(|e| e.to_string())?;
    let head = Instant::now();
    let status = resp.status();
    let mut body = resp.into_body();
    let mut len = 0u64;
    let mut first_byte = None;
    let mut body_ok = true;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| e.to_string())?;
        if let Some(data) = frame.data_ref() {
            if data.is_empty() {
                continue;
            }
            first_byte.get_or_insert_with(Instant::now);
            if expect.is_some() && body_ok {
                body_ok = is_pattern(len, data);
            }
            len += data.len() as u64;
        }
    }
    if let Some(n) = expect {
        body_ok &= len == n;
    }
    Ok(Fetched {
        status,
        len,
        first_byte: first_byte.unwrap_or(head),
        body_ok,
    })
}

/// Whether `data`, found at body offset `offset`, is that part of the `/bytes` pattern.
fn is_pattern(offset: u64, data: &[u8]) -> bool {
    // The pattern repeats every 256 bytes; BUFFER holds it from offset 0.
    let piece = SERVE_MAX - 256;
    data.chunks(piece).enumerate().all(|(k, part)| {
        let start = ((offset + (k * piece) as u64) % 256) as usize;
        BUFFER[start..start + part.len()] == *part
    })
}

/// A keep-alive connection that reconnects when the server closed it (nginx closes after
/// `keepalive_requests`); a failed request is retried once on a fresh connection.
struct Conn {
    addr: SocketAddr,
    sender: Option<SendRequest<Empty<Bytes>>>,
}

impl Conn {
    async fn get(&mut self, target: &Target, timeout: Duration) -> Result<StatusCode, String> {
        let mut last = String::new();
        for _ in 0..2 {
            if self.sender.as_ref().is_none_or(|s| s.is_closed()) {
                self.sender = Some(connect(self.addr).await?);
            }
            let sender = self.sender.as_mut().expect("connected");
            match tokio::time::timeout(timeout, fetch(sender, target, None)).await {
                Ok(Ok(fetched)) => return Ok(fetched.status),
                Ok(Err(e)) => last = e,
                Err(_) => last = format!("timeout after {timeout:?}"),
            }
            self.sender = None;
        }
        Err(last)
    }
}

/// Nearest-rank percentile of sorted values.
fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn num(x: f64) -> String {
    if x.is_finite() {
        format!("{x:.3}")
    } else {
        "null".into()
    }
}

/// GETs mock-origin's `/stats?path=...` and parses the count.
async fn origin_count(url: &str, timeout: Duration) -> Result<u64, String> {
    let target = Target::parse(url)?;
    let (status, body) = tokio::time::timeout(timeout, async {
        let mut sender = connect(target.addr).await?;
        sender.ready().await.map_err(|e| e.to_string())?;
        let resp = sender
            .send_request(target.request())
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok::<_, String>((status, body))
    })
    .await
    .map_err(|_| format!("{url}: timeout"))??;
    let text = String::from_utf8_lossy(&body);
    if status != StatusCode::OK {
        return Err(format!("{url}: status {status}: {text}"));
    }
    text.trim()
        .parse()
        .map_err(|_| format!("{url}: not a count: {text}"))
}

// ---- herd -------------------------------------------------------------------------------------

async fn herd(
    target: &Target,
    concurrency: usize,
    stats_url: Option<&str>,
    timeout: Duration,
    expect: Option<u64>,
) -> Result<String, String> {
    let target = Arc::new(target.clone());
    let before = match stats_url {
        Some(s) => Some(origin_count(s, timeout).await?),
        None => None,
    };

    // 1. All connections first, a bounded number of connects at a time.
    let limit = Arc::new(Semaphore::new(CONNECT_PARALLELISM));
    let mut connecting = Vec::with_capacity(concurrency);
    for _ in 0..concurrency {
        let limit = limit.clone();
        let addr = target.addr;
        connecting.push(tokio::spawn(async move {
            let _permit = limit.acquire_owned().await;
            connect(addr).await
        }));
    }
    let mut senders = Vec::with_capacity(concurrency);
    for c in connecting {
        senders.push(c.await.map_err(|e| e.to_string())??);
    }

    // 2. One task per connection, parked at the barrier with its connection ready.
    let barrier = Arc::new(Barrier::new(concurrency + 1));
    let mut tasks = Vec::with_capacity(concurrency);
    for mut sender in senders {
        let barrier = barrier.clone();
        let target = target.clone();
        tasks.push(tokio::spawn(async move {
            let ready = sender
                .ready()
                .await
                .map_err(|e| Failed::Other(e.to_string()));
            barrier.wait().await;
            ready?;
            let start = Instant::now();
            let result = tokio::time::timeout(timeout, fetch(&mut sender, &target, expect)).await;
            let end = Instant::now();
            match result {
                Ok(Ok(f)) if f.status == StatusCode::OK && f.body_ok => Ok(Timed {
                    start,
                    first_byte: f.first_byte,
                    end,
                    len: f.len,
                }),
                Ok(Ok(f)) if f.status == StatusCode::OK => Err(Failed::BadBody(f.len)),
                Ok(Ok(f)) => Err(Failed::Other(format!("status {}", f.status))),
                Ok(Err(e)) => Err(Failed::Other(e)),
                Err(_) => Err(Failed::Other(format!("timeout after {timeout:?}"))),
            }
        }));
    }
    // 3. Release: every request is issued at `released`; latencies count from there, so a
    // request the client itself put on the wire late is charged with that too (the bare
    // baseline shows how much that is).
    let released = Instant::now();
    barrier.wait().await;
    let mut latencies = Vec::with_capacity(concurrency);
    let mut ttfbs = Vec::with_capacity(concurrency);
    let mut last_sent = Duration::ZERO;
    let mut last_end = Duration::ZERO;
    let mut bytes = 0u64;
    let (mut errors, mut bad_bodies) = (0u64, 0u64);
    let mut first_error = None;
    for t in tasks {
        match t.await.map_err(|e| e.to_string())? {
            Ok(timed) => {
                let end = timed.end.saturating_duration_since(released);
                latencies.push(ms(end));
                ttfbs.push(ms(timed.first_byte.saturating_duration_since(released)));
                last_sent = last_sent.max(timed.start.saturating_duration_since(released));
                last_end = last_end.max(end);
                bytes += timed.len;
            }
            Err(e) => {
                errors += 1;
                let e = match e {
                    Failed::BadBody(len) => {
                        bad_bodies += 1;
                        format!("a {len}-byte body that is not the expected pattern")
                    }
                    Failed::Other(e) => e,
                };
                first_error.get_or_insert(e);
            }
        }
    }
    if let Some(e) = first_error {
        eprintln!("herd: {errors} request(s) failed, first: {e}");
    }
    let upstream = match (stats_url, before) {
        (Some(s), Some(b)) => origin_count(s, timeout)
            .await?
            .saturating_sub(b)
            .to_string(),
        _ => "null".into(),
    };
    latencies.sort_by(f64::total_cmp);
    let min = latencies.first().copied().unwrap_or(f64::NAN);
    let p99 = pct(&latencies, 99.0);
    // The earliest first byte is the leader's; the percentiles are the followers'.
    ttfbs.sort_by(f64::total_cmp);
    let ttfb_first = ttfbs.first().copied().unwrap_or(f64::NAN);
    let followers = if ttfbs.len() > 1 {
        &ttfbs[1..]
    } else {
        &ttfbs[..]
    };
    Ok(format!(
        "{{\"count\":{},\"errors\":{errors},\"min_ms\":{},\"p50_ms\":{},\"p99_ms\":{},\"max_ms\":{},\"p99_minus_min_ms\":{},\"last_sent_ms\":{},\"upstream_calls\":{upstream},\"ttfb_first_ms\":{},\"ttfb_p50_ms\":{},\"ttfb_p99_ms\":{},\"ttfb_max_ms\":{},\"total_ms\":{},\"bytes\":{bytes},\"bad_bodies\":{bad_bodies}}}",
        latencies.len(),
        num(min),
        num(pct(&latencies, 50.0)),
        num(p99),
        num(latencies.last().copied().unwrap_or(f64::NAN)),
        num(p99 - min),
        num(ms(last_sent)),
        num(ttfb_first),
        num(pct(followers, 50.0)),
        num(pct(followers, 99.0)),
        num(followers.last().copied().unwrap_or(f64::NAN)),
        num(ms(last_end)),
    ))
}

/// One successful herd request's timeline.
struct Timed {
    start: Instant,
    first_byte: Instant,
    end: Instant,
    len: u64,
}

/// Why a herd request did not count.
enum Failed {
    /// Status 200 but not the `--expect-bytes` body (its length).
    BadBody(u64),
    Other(String),
}

// ---- sequence ---------------------------------------------------------------------------------

async fn sequence(
    template: &Target,
    n: u64,
    start: u64,
    inflight: usize,
    timeout: Duration,
) -> Result<String, String> {
    let base = Arc::new(template.clone());
    if !base.path.contains("{i}") && n > 1 {
        return Err("--sequence needs `{i}` in the --url template".into());
    }
    let next = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..inflight.min(n.max(1) as usize) {
        let (base, next, errors) = (base.clone(), next.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn {
                addr: base.addr,
                sender: None,
            };
            let mut first_error = None;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let target = base.with_path(base.path.replace("{i}", &(start + i).to_string()));
                match conn.get(&target, timeout).await {
                    Ok(s) if s == StatusCode::OK => {}
                    Ok(s) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        first_error.get_or_insert(format!("status {s}"));
                    }
                    Err(e) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                        first_error.get_or_insert(e);
                    }
                }
            }
            first_error
        }));
    }
    let mut first_error = None;
    for t in tasks {
        if let Some(e) = t.await.map_err(|e| e.to_string())? {
            first_error.get_or_insert(e);
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let errors = errors.load(Ordering::Relaxed);
    if let Some(e) = first_error {
        eprintln!("herd: {errors} request(s) failed, first: {e}");
    }
    Ok(format!(
        "{{\"count\":{n},\"errors\":{errors},\"secs\":{},\"rps\":{}}}",
        num(secs),
        num(n as f64 / secs)
    ))
}

// ---- load -------------------------------------------------------------------------------------

async fn load(
    target: &Target,
    connections: usize,
    duration: Duration,
    timeout: Duration,
) -> Result<String, String> {
    let target = Arc::new(target.clone());
    let errors = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let deadline = t0 + duration;
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (target, errors) = (target.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut conn = Conn {
                addr: target.addr,
                sender: None,
            };
            let mut micros: Vec<u32> = Vec::with_capacity(1 << 14);
            while Instant::now() < deadline {
                let start = Instant::now();
                match conn.get(&target, timeout).await {
                    Ok(s) if s == StatusCode::OK => {
                        micros.push(start.elapsed().as_micros().min(u32::MAX as u128) as u32)
                    }
                    _ => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            micros
        }));
    }
    let mut all: Vec<u32> = Vec::new();
    for t in tasks {
        all.extend(t.await.map_err(|e| e.to_string())?);
    }
    let secs = t0.elapsed().as_secs_f64();
    all.sort_unstable();
    let sorted: Vec<f64> = all.iter().map(|&u| f64::from(u) / 1000.0).collect();
    Ok(format!(
        "{{\"count\":{},\"errors\":{},\"secs\":{},\"rps\":{},\"p50_ms\":{},\"p99_ms\":{},\"max_ms\":{}}}",
        sorted.len(),
        errors.load(Ordering::Relaxed),
        num(secs),
        num(sorted.len() as f64 / secs),
        num(pct(&sorted, 50.0)),
        num(pct(&sorted, 99.0)),
        num(sorted.last().copied().unwrap_or(f64::NAN)),
    ))
}

// ---- timed ------------------------------------------------------------------------------------

/// How much of each body `--timed` keeps for `--match`.
const MATCH_BODY_BYTES: usize = 4096;

async fn timed(
    template: &Target,
    n: u64,
    start: u64,
    matching: Option<&str>,
    timeout: Duration,
) -> Result<String, String> {
    if !template.path.contains("{i}") && n > 1 {
        return Err("--timed needs `{i}` in the --url template".into());
    }
    let mut sender: Option<SendRequest<Empty<Bytes>>> = None;
    let mut latencies = Vec::with_capacity(n as usize);
    let (mut errors, mut matched) = (0u64, 0u64);
    let mut first_error = None;
    let mut unmatched_sample = None;
    for i in 0..n {
        let target = template.with_path(template.path.replace("{i}", &(start + i).to_string()));
        if sender.as_ref().is_none_or(|s| s.is_closed()) {
            sender = Some(connect(target.addr).await?);
        }
        let s = sender.as_mut().expect("connected");
        // Ready before the clock starts: only the request itself is timed.
        s.ready().await.map_err(|e| e.to_string())?;
        let t0 = Instant::now();
        let result = tokio::time::timeout(timeout, async {
            let resp = s
                .send_request(target.request())
                .await
                .map_err(|e| e.to_string())?;
            let status = resp.status();
            let mut text = String::new();
            for (name, value) in resp.headers() {
                text.push_str(&format!(
                    "{name}: {}\n",
                    String::from_utf8_lossy(value.as_bytes())
                ));
            }
            let mut body = Vec::new();
            let mut stream = resp.into_body();
            while let Some(frame) = stream.frame().await {
                let frame = frame.map_err(|e| e.to_string())?;
                if let Some(data) = frame.data_ref() {
                    let room = MATCH_BODY_BYTES.saturating_sub(body.len());
                    body.extend_from_slice(&data[..data.len().min(room)]);
                }
            }
            text.push_str(&String::from_utf8_lossy(&body));
            Ok::<_, String>((status, text))
        })
        .await;
        let elapsed = t0.elapsed();
        match result {
            Ok(Ok((status, text))) if status.is_success() => {
                latencies.push(ms(elapsed));
                match matching {
                    Some(m) if text.contains(m) => matched += 1,
                    Some(_) => {
                        unmatched_sample.get_or_insert_with(|| {
                            format!("{} {status}: {}", target.path, text.replace('\n', " | "))
                        });
                    }
                    None => {}
                }
            }
            Ok(Ok((status, _))) => {
                errors += 1;
                first_error.get_or_insert(format!("{}: status {status}", target.path));
            }
            Ok(Err(e)) => {
                errors += 1;
                first_error.get_or_insert(e);
                sender = None;
            }
            Err(_) => {
                errors += 1;
                first_error.get_or_insert(format!("timeout after {timeout:?}"));
                sender = None;
            }
        }
    }
    if let Some(e) = first_error {
        eprintln!("herd: {errors} request(s) failed, first: {e}");
    }
    latencies.sort_by(f64::total_cmp);
    let sample = unmatched_sample.map_or("null".into(), |s| {
        let s: String = s
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(300)
            .collect();
        format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
    });
    Ok(format!(
        "{{\"count\":{},\"errors\":{errors},\"p50_ms\":{},\"p99_ms\":{},\"max_ms\":{},\"matched\":{},\"unmatched_sample\":{sample}}}",
        latencies.len(),
        num(pct(&latencies, 50.0)),
        num(pct(&latencies, 99.0)),
        num(latencies.last().copied().unwrap_or(f64::NAN)),
        if matching.is_some() { matched.to_string() } else { "null".into() },
    ))
}

// ---- bare server ------------------------------------------------------------------------------

async fn serve(addr: &str) -> Result<String, String> {
    let addr: SocketAddr = addr
        .parse()
        .map_err(|_| format!("--serve: `{addr}` is not IP:port"))?;
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    LazyLock::force(&BUFFER);
    println!("herd-bare listening on http://{local}");
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = &mut shutdown => return Ok(String::new()),
        };
        let _ = stream.set_nodelay(true);
        let builder = builder.clone();
        tokio::spawn(async move {
            let service = service_fn(|req: Request<Incoming>| async move {
                if let Some(delay) = query_number(&req, "delay_ms") {
                    tokio::time::sleep(Duration::from_millis(delay as u64)).await;
                }
                Ok::<_, Infallible>(bare_answer(&req))
            });
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn query_number(req: &Request<Incoming>, name: &str) -> Option<usize> {
    req.uri()
        .query()?
        .split('&')
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))?
        .parse()
        .ok()
}

fn bare_answer(req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let size = query_number(req, "size").unwrap_or(1024).min(SERVE_MAX);
    let mut resp = Response::new(Full::new(BUFFER.slice(..size)));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/octet-stream"),
    );
    resp
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
            }
            _ => std::future::pending().await,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
