//! The upstream pool: weighted balancing, active health checks (and their wrong-path and
//! panic-mode safeguards), the circuit breaker (closed by probes, trial slot given back),
//! failover and retries of idempotent requests, errors when no backend is left, connection
//! reuse, `Keep-Alive: timeout` and HTTP/2 backends — all against real backends on loopback.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use common::*;

/// A backend that answers every request with its name, uncacheable.
async fn named(name: &'static str) -> Origin {
    Origin::start(move |_req| async move { reply(200, &[("cache-control", "no-store")], name) })
        .await
}

/// Sends `GET {path}1`, `{path}2`, … (each must be answered 200) until `done` holds or
/// `within` passes; returns whether it held. A breaker's cool-down, trial and probes show
/// only through traffic, so these requests are the polling (10 ms apart).
async fn get_until(
    proxy: &ProxyHandle,
    path: &str,
    within: Duration,
    done: impl Fn() -> bool,
) -> bool {
    let deadline = Instant::now() + within;
    let mut i = 0;
    while !done() {
        if Instant::now() >= deadline {
            return false;
        }
        i += 1;
        let got = get(proxy.addr, &format!("{path}{i}"), &[]).await;
        assert_eq!(got.status, 200, "{path}{i}: {}", got.text());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

/// A steady backend, and edgecache balancing 1:1 over it and `flaky` with `env`, after GETs
/// `{path}0`, `{path}1`, … (`opening` of them, uncached) have opened `flaky`'s breaker.
async fn with_open_breaker(
    flaky: &Origin,
    env: &[(&str, &str)],
    path: &str,
    opening: usize,
) -> (Origin, ProxyHandle) {
    let steady = named("steady").await;
    let proxy = balanced(&[flaky, &steady], &[1, 1], env).await;
    for i in 0..opening {
        get(proxy.addr, &format!("{path}{i}"), &[]).await;
    }
    assert!(
        proxy.status().contains("breaker_open"),
        "{}",
        proxy.status()
    );
    (steady, proxy)
}

/// edgecache balancing over `origins` with `weights` (`UPSTREAM_URLS`), and `env`.
async fn balanced(origins: &[&Origin], weights: &[u32], env: &[(&str, &str)]) -> ProxyHandle {
    let upstreams = origins
        .iter()
        .zip(weights)
        .map(|(o, w)| format!("{} weight={w}", o.url()))
        .collect::<Vec<_>>()
        .join(", ");
    let mut vars = vec![("UPSTREAM_URLS", upstreams.as_str())];
    vars.extend_from_slice(env);
    ProxyHandle::start("http://unused:1", &vars).await
}

/// Requests spread over backends in proportion to their weights (3:2:1).
#[tokio::test]
async fn weighted_split_follows_the_weights() {
    let (a, b, c) = (named("a").await, named("b").await, named("c").await);
    let proxy = balanced(&[&a, &b, &c], &[3, 2, 1], &[]).await;
    for i in 0..600 {
        assert_eq!(get(proxy.addr, &format!("/w?{i}"), &[]).await.status, 200);
    }
    let (na, nb, nc) = (a.total() as f64, b.total() as f64, c.total() as f64);
    for (got, want) in [(na, 300.0), (nb, 200.0), (nc, 100.0)] {
        assert!((got - want).abs() <= want * 0.03, "split {na}/{nb}/{nc}");
    }
}

/// A backend killed mid-run: no client request fails (connect failures are retried on the
/// other backend), the health checks mark it down, and it comes back after recovery.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_backend_drops_out_without_failed_requests_and_returns() {
    let a = named("a").await;
    let b = named("b").await;
    let b_addr = b.addr;
    let proxy = balanced(
        &[&a, &b],
        &[1, 1],
        &[
            ("HEALTH_CHECK_INTERVAL_SECS", "0.1"),
            ("HEALTH_CHECK_FAILURE_THRESHOLD", "2"),
            ("HEALTH_CHECK_RECOVERY_THRESHOLD", "2"),
        ],
    )
    .await;
    for i in 0..20 {
        assert_eq!(get(proxy.addr, &format!("/k?{i}"), &[]).await.status, 200);
    }
    b.stop();
    for i in 0..200 {
        let got = get(proxy.addr, &format!("/k?after{i}"), &[]).await;
        assert_eq!(
            (got.status, got.text().as_str()),
            (200, "a"),
            "request {i} after the kill"
        );
    }
    assert!(
        eventually(Duration::from_secs(5), || proxy
            .status()
            .contains(r#""state":"down""#))
        .await,
        "{}",
        proxy.status()
    );

    let b2 = Origin::start_on(b_addr, |_req| async {
        reply(200, &[("cache-control", "no-store")], "b")
    })
    .await;
    assert!(
        eventually(Duration::from_secs(5), || !proxy
            .status()
            .contains(r#""state":"down""#))
        .await,
        "{}",
        proxy.status()
    );
    let mut saw_b = false;
    for i in 0..20 {
        saw_b |= get(proxy.addr, &format!("/k?back{i}"), &[]).await.text() == "b";
    }
    assert!(saw_b, "the recovered backend gets traffic again");
    drop(b2);
}

/// Every backend down: the first request finds both unreachable (502), their breakers open,
/// and then requests get 503 with Retry-After — or the stale copy when one exists and
/// STALE_IF_ERROR_SECS allows it.
#[tokio::test]
async fn all_backends_down_is_503_or_stale() {
    let body = |_req| async {
        reply(
            200,
            &[("cache-control", "max-age=1"), ("etag", "\"s\"")],
            "kept",
        )
    };
    let (a, b) = (Origin::start(body).await, Origin::start(body).await);
    let proxy = balanced(
        &[&a, &b],
        &[1, 1],
        &[
            ("BREAKER_FAILURE_THRESHOLD", "1"),
            ("BREAKER_COOLDOWN_SECS", "30"),
            ("STALE_RETENTION_SECS", "60"),
            ("STALE_IF_ERROR_SECS", "60"),
        ],
    )
    .await;
    assert_eq!(get(proxy.addr, "/s", &[]).await.text(), "kept");
    a.stop();
    b.stop();
    let first = get(proxy.addr, "/other", &[]).await;
    assert_eq!(first.status, 502, "neither backend can be connected to");
    let down = get(proxy.addr, "/other", &[]).await;
    assert_eq!(down.status, 503, "both breakers open: no backend");
    let retry: u64 = down.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=30).contains(&retry));
    let stale_now = eventually(Duration::from_secs(3), || {
        proxy
            .proxy
            .cache
            .lookup(&proxy.key("/s"), &Default::default())
            .is_some_and(|hit| !hit.entry.is_fresh(Instant::now()))
    });
    assert!(stale_now.await);
    let stale = get(proxy.addr, "/s", &[]).await;
    assert_eq!(
        (stale.status, stale.cache(), stale.text().as_str()),
        (200, "STALE", "kept")
    );
}

/// A single backend is never shut out: its failures and 5xx reach the client as they are,
/// and it is used again the moment it is back.
#[tokio::test]
async fn single_backend_is_never_shut_out() {
    let origin = named("only").await;
    let addr = origin.addr;
    let proxy = ProxyHandle::start(&origin.url(), &[("BREAKER_FAILURE_THRESHOLD", "1")]).await;
    origin.stop();
    for i in 0..3 {
        assert_eq!(get(proxy.addr, &format!("/x?{i}"), &[]).await.status, 502);
    }
    let back = Origin::start_on(addr, |_req| async {
        reply(200, &[("cache-control", "no-store")], "back")
    })
    .await;
    assert_eq!(get(proxy.addr, "/x?again", &[]).await.text(), "back");
    drop(back);
}

/// Live 5xx from one of two backends open its breaker: during the cool-down it gets
/// nothing (the other takes everything); then one trial request goes through and, succeeding,
/// closes it.
#[tokio::test]
async fn breaker_opens_and_half_opens() {
    let failing = Arc::new(AtomicBool::new(true));
    let f = failing.clone();
    let flaky = Origin::start(move |_req| {
        let status = if f.load(Ordering::SeqCst) { 500 } else { 200 };
        async move { reply(status, &[("cache-control", "no-store")], "flaky") }
    })
    .await;
    let steady = named("steady").await;
    let proxy = balanced(
        &[&flaky, &steady],
        &[1, 1],
        &[
            ("BREAKER_FAILURE_THRESHOLD", "2"),
            ("BREAKER_COOLDOWN_SECS", "0.5"),
        ],
    )
    .await;
    let mut statuses = Vec::new();
    for i in 0..4 {
        statuses.push(get(proxy.addr, &format!("/b?{i}"), &[]).await.status);
    }
    assert_eq!(
        statuses.iter().filter(|s| **s == 500).count(),
        2,
        "{statuses:?}"
    );
    assert!(proxy.status().contains("breaker_open"));
    let before = flaky.total();
    for i in 0..10 {
        let got = get(proxy.addr, &format!("/b?open{i}"), &[]).await;
        assert_eq!((got.status, got.text().as_str()), (200, "steady"));
    }
    assert_eq!(
        flaky.total(),
        before,
        "an open breaker sends nothing to the backend"
    );
    failing.store(false, Ordering::SeqCst);
    // After the cool-down one trial request reaches the flaky backend and closes the breaker.
    assert!(
        get_until(&proxy, "/b?trial", Duration::from_secs(5), || flaky.total()
            > before)
        .await,
        "the trial request went to the recovered backend"
    );
    assert!(
        eventually(Duration::from_secs(2), || !proxy
            .status()
            .contains("breaker"))
        .await,
        "{}",
        proxy.status()
    );
}

/// With a single backend, its own 5xx answers pass through and never open the breaker.
#[tokio::test]
async fn single_backend_5xx_passes_through() {
    let origin =
        Origin::start(|_req| async { reply(503, &[("cache-control", "no-store")], "busy") }).await;
    let proxy = ProxyHandle::start(&origin.url(), &[("BREAKER_FAILURE_THRESHOLD", "2")]).await;
    for i in 0..6 {
        let got = get(proxy.addr, &format!("/s?{i}"), &[]).await;
        assert_eq!(
            (got.status, got.text().as_str()),
            (503, "busy"),
            "the origin's answer, not ours"
        );
    }
    assert_eq!(origin.total(), 6);
}

/// Keep-alive: many requests, few TCP connections to the backend.
#[tokio::test]
async fn connections_are_reused() {
    let origin = named("a").await;
    let proxy = ProxyHandle::start(&origin.url(), &[]).await;
    for i in 0..200 {
        get(proxy.addr, &format!("/r?{i}"), &[]).await;
    }
    assert_eq!(origin.total(), 200);
    assert!(
        origin.connections.load(Ordering::SeqCst) <= 3,
        "{} connections",
        origin.connections.load(Ordering::SeqCst)
    );
}

/// An `h2c://` backend is spoken to over HTTP/2 with prior knowledge.
#[tokio::test]
async fn http2_backend() {
    let versions = Arc::new(AtomicUsize::new(0));
    let v = versions.clone();
    let origin = Origin::start(move |req| {
        if req.version() == http::Version::HTTP_2 {
            v.fetch_add(1, Ordering::SeqCst);
        }
        async move { reply(200, &[("cache-control", "max-age=60")], "over h2") }
    })
    .await;
    let proxy = ProxyHandle::start(&format!("h2c://{}", origin.addr), &[]).await;
    let got = get(proxy.addr, "/h2", &[]).await;
    assert_eq!((got.status, got.text().as_str()), (200, "over h2"));
    assert_eq!(versions.load(Ordering::SeqCst), 1);
}

/// A hand-written HTTP/1.1 origin, for what a hyper server will not do on request: close a
/// kept-alive connection on a request without answering it. `answer(n)` says whether the
/// `n`th request (from 0) on a connection gets `200 <name>`; otherwise, or once the origin is
/// killed, the connection is closed as soon as the request has arrived.
struct RawOrigin {
    addr: std::net::SocketAddr,
    connections: Arc<AtomicUsize>,
    /// Requests received, by method.
    methods: Arc<std::sync::Mutex<Vec<String>>>,
    dead: Arc<AtomicBool>,
    accept: tokio::task::AbortHandle,
}

impl RawOrigin {
    async fn start(
        name: &'static str,
        answer: impl Fn(usize) -> bool + Send + Sync + 'static,
    ) -> RawOrigin {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let methods: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
        let dead = Arc::new(AtomicBool::new(false));
        let answer = Arc::new(answer);
        let (c, m, d) = (connections.clone(), methods.clone(), dead.clone());
        let accept = tokio::spawn(async move {
            loop {
                let Ok((mut stream, _)) = listener.accept().await else {
                    continue;
                };
                c.fetch_add(1, Ordering::SeqCst);
                let (methods, dead, answer) = (m.clone(), d.clone(), answer.clone());
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    for n in 0.. {
                        // Read one request head and its Content-Length body.
                        let head_end = loop {
                            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                                break i + 4;
                            }
                            let mut chunk = [0u8; 4096];
                            match stream.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(k) => buf.extend_from_slice(&chunk[..k]),
                            }
                        };
                        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
                        let length: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        while buf.len() < head_end + length {
                            let mut chunk = [0u8; 4096];
                            match stream.read(&mut chunk).await {
                                Ok(0) | Err(_) => return,
                                Ok(k) => buf.extend_from_slice(&chunk[..k]),
                            }
                        }
                        let method = head.split(' ').next().unwrap_or("").to_uppercase();
                        buf.drain(..head_end + length);
                        methods.lock().unwrap().push(method.clone());
                        if dead.load(Ordering::SeqCst) || !answer(n) {
                            return; // closes the connection without a response
                        }
                        let body = if method == "HEAD" { "" } else { name };
                        let resp = format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\ncache-control: no-store\r\n\r\n{body}",
                            name.len()
                        );
                        if stream.write_all(resp.as_bytes()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        RawOrigin {
            addr,
            connections,
            methods,
            dead,
            accept: accept.abort_handle(),
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn requests(&self, method: &str) -> usize {
        self.methods
            .lock()
            .unwrap()
            .iter()
            .filter(|m| *m == method)
            .count()
    }

    /// The process is gone: nothing accepts, and the connections it kept alive close on the
    /// next request without an answer.
    fn kill(&self) {
        self.accept.abort();
        self.dead.store(true, Ordering::SeqCst);
    }
}

/// Item 3: an origin that closes every reused connection on its second request without
/// answering. With one backend, every GET (and bodiless HEAD/DELETE pass-through) still
/// succeeds: the failure happened before any response byte, so it is retried on a fresh
/// connection, and counted. A request with a body is not retried once sent.
#[tokio::test]
async fn reused_connection_closed_by_the_origin_is_retried_on_a_fresh_one() {
    let origin = RawOrigin::start("fresh", |n| n == 0).await;
    let proxy = ProxyHandle::start(&origin.url(), &[]).await;
    for i in 0..20 {
        let got = get(proxy.addr, &format!("/g?{i}"), &[]).await;
        assert_eq!((got.status, got.text().as_str()), (200, "fresh"), "GET {i}");
    }
    assert!(origin.connections.load(Ordering::SeqCst) > 10);
    for (i, method) in ["HEAD", "DELETE", "GET", "DELETE"].iter().enumerate() {
        let got = send(
            method,
            proxy.addr,
            &format!("/m?{i}"),
            &[],
            Default::default(),
        )
        .await;
        assert_eq!(got.status, 200, "{method}");
    }
    let metrics = proxy.metrics();
    let retries = metric(
        &metrics,
        &format!(
            "edgecache_upstream_retries_total{{backend=\"{}\"}}",
            origin.addr
        ),
    );
    assert!(retries >= 10.0, "retries counted: {retries}");

    // A body that was sent is never sent twice: the POST on a reused connection fails.
    assert_eq!(get(proxy.addr, "/warm", &[]).await.status, 200);
    let posted = send("POST", proxy.addr, "/p", &[], "data".into()).await;
    assert_eq!(posted.status, 502);
    assert_eq!(origin.requests("POST"), 1, "the POST was not retried");
}

/// Item 3: a backend killed while the proxy holds kept-alive connections to it, another one
/// healthy: no client sees an error (requests that hit a dead connection go to the other).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_backend_with_kept_alive_connections_fails_over() {
    let a = RawOrigin::start("a", |_| true).await;
    let b = RawOrigin::start("b", |_| true).await;
    let proxy = ProxyHandle::start(
        "http://unused:1",
        &[("UPSTREAM_URLS", &format!("{}, {}", a.url(), b.url()))],
    )
    .await;
    let wave = |tag: &'static str| {
        let addr = proxy.addr;
        (0..8)
            .map(|t| {
                tokio::spawn(async move {
                    let mut out = Vec::new();
                    for i in 0..15 {
                        let got = get(addr, &format!("/{tag}?{t}-{i}"), &[]).await;
                        out.push((got.status, got.text()));
                    }
                    out
                })
            })
            .collect::<Vec<_>>()
    };
    for task in wave("warm") {
        assert!(task.await.unwrap().iter().all(|(s, _)| *s == 200));
    }
    assert!(b.requests("GET") > 0 && b.connections.load(Ordering::SeqCst) > 1);
    b.kill();
    for task in wave("after") {
        for (status, body) in task.await.unwrap() {
            assert_eq!((status, body.as_str()), (200, "a"));
        }
    }
}

/// Item 3: an origin that says `Keep-Alive: timeout=1` has its idle connections retired
/// after 0.5 s, before it would close them, instead of after UPSTREAM_IDLE_TIMEOUT_SECS.
#[tokio::test]
async fn keep_alive_timeout_of_the_origin_retires_idle_connections_early() {
    let origin = Origin::start(|_req| async {
        reply(
            200,
            &[("cache-control", "no-store"), ("keep-alive", "timeout=1")],
            "ka",
        )
    })
    .await;
    let proxy = ProxyHandle::start(&origin.url(), &[]).await;
    assert_eq!(get(proxy.addr, "/ka?1", &[]).await.status, 200);
    assert!(
        proxy.status().contains(r#""idle_timeout_ms":500"#),
        "{}",
        proxy.status()
    );
    // The lowering rebuilt the pool (the first connection went with the old one).
    assert_eq!(get(proxy.addr, "/ka?2", &[]).await.status, 200);
    let conns = || origin.connections.load(Ordering::SeqCst);
    let after_rebuild = conns();
    assert_eq!(get(proxy.addr, "/ka?3", &[]).await.status, 200);
    assert_eq!(conns(), after_rebuild, "reused at once");
    // Idle time is what is under test here: longer than the 0.5 s retirement, shorter than
    // the origin's 1 s and the 4 s default.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(get(proxy.addr, "/ka?4", &[]).await.status, 200);
    assert_eq!(
        conns(),
        after_rebuild + 1,
        "the idle connection was retired, a new one made"
    );
}

/// A backend answering its live traffic, and `code` on the check path.
async fn checked(name: &'static str, code: u16, live: Arc<AtomicUsize>) -> Origin {
    Origin::start(move |req| {
        let probe = req.uri().path() == "/health-check";
        if !probe {
            live.fetch_add(1, Ordering::SeqCst);
        }
        async move {
            if probe {
                reply(code, &[], "")
            } else {
                reply(200, &[("cache-control", "no-store")], name)
            }
        }
    })
    .await
}

/// edgecache over `a` and `b` (1:1), probing each every 20 ms; two failed probes in a row
/// take a backend out.
async fn fast_checked(a: &Origin, b: &Origin) -> ProxyHandle {
    balanced(
        &[a, b],
        &[1, 1],
        &[
            ("HEALTH_CHECK_INTERVAL_SECS", "0.02"),
            ("HEALTH_CHECK_FAILURE_THRESHOLD", "2"),
        ],
    )
    .await
}

/// Item 4: backends without a `/health-check` route (404) are not taken out by the default
/// health checks.
#[tokio::test]
async fn backends_without_the_check_route_stay_in() {
    let (a, b) = (
        checked("a", 404, Arc::default()).await,
        checked("b", 405, Arc::default()).await,
    );
    let proxy = fast_checked(&a, &b).await;
    assert!(
        eventually(Duration::from_secs(5), || a.hits("/health-check") >= 4
            && b.hits("/health-check") >= 4)
        .await
    );
    let status = proxy.status();
    assert_eq!(status.matches(r#""state":"up""#).count(), 2, "{status}");
    assert!(status.contains(r#""panic_mode":false"#), "{status}");
    for i in 0..10 {
        assert_eq!(get(proxy.addr, &format!("/n?{i}"), &[]).await.status, 200);
    }
}

/// Item 4: when fewer than HEALTH_PANIC_THRESHOLD of the backends pass their checks, all of
/// them take traffic (panic mode, shown on /status) instead of every request getting 503.
#[tokio::test]
async fn panic_mode_when_too_few_backends_pass_their_checks() {
    let (live_a, live_b) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (a, b) = (
        checked("a", 500, live_a.clone()).await,
        checked("b", 500, live_b.clone()).await,
    );
    let proxy = fast_checked(&a, &b).await;
    assert!(
        eventually(Duration::from_secs(5), || proxy
            .status()
            .contains(r#""panic_mode":true"#))
        .await,
        "{}",
        proxy.status()
    );
    assert_eq!(proxy.status().matches(r#""state":"down""#).count(), 2);
    for i in 0..10 {
        assert_eq!(get(proxy.addr, &format!("/p?{i}"), &[]).await.status, 200);
    }
    assert!(live_a.load(Ordering::SeqCst) > 0 && live_b.load(Ordering::SeqCst) > 0);
    let metrics = proxy.metrics();
    assert_eq!(metric(&metrics, "edgecache_upstream_panic_mode"), 1.0);
}

/// Item 4: a breaker opened by live failures is closed by HEALTH_CHECK_RECOVERY_THRESHOLD
/// passing probes, long before its cool-down ends.
#[tokio::test]
async fn passing_probes_close_an_open_breaker() {
    let failing = Arc::new(AtomicBool::new(true));
    let live = Arc::new(AtomicUsize::new(0));
    let (f, l) = (failing.clone(), live.clone());
    let flaky = Origin::start(move |req| {
        let probe = req.uri().path() == "/health-check";
        let status = if probe || !f.load(Ordering::SeqCst) {
            200
        } else {
            500
        };
        if !probe {
            l.fetch_add(1, Ordering::SeqCst);
        }
        async move { reply(status, &[("cache-control", "no-store")], "flaky") }
    })
    .await;
    let (_steady, proxy) = with_open_breaker(
        &flaky,
        &[
            ("BREAKER_FAILURE_THRESHOLD", "1"),
            ("BREAKER_COOLDOWN_SECS", "600"),
            ("HEALTH_CHECK_INTERVAL_SECS", "0.05"),
            ("HEALTH_CHECK_RECOVERY_THRESHOLD", "2"),
        ],
        "/o?",
        4,
    )
    .await;
    failing.store(false, Ordering::SeqCst);
    let before = live.load(Ordering::SeqCst);
    assert!(
        get_until(&proxy, "/c?", Duration::from_secs(5), || live
            .load(Ordering::SeqCst)
            > before)
        .await,
        "the backend gets traffic again within 5 s of a 600 s cool-down: {}",
        proxy.status()
    );
}

/// Item 4: a client that disconnects while its request is the half-open trial does not leave
/// the trial slot taken for ever: the next request after it becomes the trial.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_half_open_trial_frees_the_slot() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // 0: 500, 1: never answer, 2: 200.
    let mode = Arc::new(std::sync::atomic::AtomicU8::new(0));
    let live = Arc::new(AtomicUsize::new(0));
    let (m, l) = (mode.clone(), live.clone());
    let flaky = Origin::start(move |_req| {
        l.fetch_add(1, Ordering::SeqCst);
        let mode = m.load(Ordering::SeqCst);
        async move {
            if mode == 1 {
                std::future::pending::<()>().await;
            }
            let status = if mode == 0 { 500 } else { 200 };
            reply(status, &[("cache-control", "no-store")], "flaky")
        }
    })
    .await;
    let (_steady, proxy) = with_open_breaker(
        &flaky,
        &[
            ("BREAKER_FAILURE_THRESHOLD", "1"),
            ("BREAKER_COOLDOWN_SECS", "0.2"),
        ],
        "/t?",
        2,
    )
    .await;
    mode.store(1, Ordering::SeqCst);

    // Pass-through POSTs until one is the trial and hangs at the flaky backend; then its
    // client goes away.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut abandoned = false;
    while !abandoned && Instant::now() < deadline {
        let before = flaky.total();
        let mut client = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        client
            .write_all(b"POST /t HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\nhi")
            .await
            .unwrap();
        let mut buf = [0u8; 1024];
        tokio::select! {
            _ = client.read(&mut buf) => {} // answered by the steady backend
            reached = flaky.wait_until(Duration::from_secs(5), |o| o.total() > before) => {
                abandoned = reached;
            }
        }
        drop(client);
    }
    assert!(abandoned, "a POST became the trial: {}", proxy.status());

    mode.store(2, Ordering::SeqCst);
    let before = live.load(Ordering::SeqCst);
    // Shorter than REQ_TIMEOUT: the abandoned trial never reports.
    assert!(
        get_until(&proxy, "/t?after", Duration::from_secs(3), || live
            .load(Ordering::SeqCst)
            > before)
        .await,
        "the backend got a new trial: {}",
        proxy.status()
    );
}
