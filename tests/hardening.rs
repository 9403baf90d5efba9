//! Hostile clients and broken upstreams, with raw TCP where a well-behaved client library
//! would refuse to send the bytes: limits answer with the right status, ambiguous framing is
//! refused, unkeyed override headers never reach the origin, admin key guessing is slowed,
//! and a broken upstream body is never stored.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Sends raw bytes, returns everything the proxy answers until it closes or `wait` passes.
async fn raw(addr: std::net::SocketAddr, bytes: &[u8], wait: Duration) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

async fn plain_origin() -> Origin {
    Origin::start(|_req| async { reply(200, &[("cache-control", "max-age=60")], "ok") }).await
}

/// Oversized headers → 431, an oversized request line → 414; nothing reaches the origin.
#[tokio::test]
async fn oversized_heads_get_431_and_414() {
    let origin = plain_origin().await;
    let proxy = ProxyHandle::start(&origin.url(), &[("MAX_HEADER_BYTES", "16KiB")]).await;
    let big = "a".repeat(20_000);
    let resp = raw(
        proxy.addr,
        format!("GET / HTTP/1.1\r\nhost: x\r\nx-big: {big}\r\n\r\n").as_bytes(),
        Duration::from_secs(2),
    )
    .await;
    assert!(
        resp.starts_with("HTTP/1.1 431"),
        "{}",
        &resp[..resp.len().min(80)]
    );
    let resp = raw(
        proxy.addr,
        format!("GET /{big} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes(),
        Duration::from_secs(2),
    )
    .await;
    assert!(
        resp.starts_with("HTTP/1.1 414") || resp.starts_with("HTTP/1.1 431"),
        "{}",
        &resp[..resp.len().min(80)]
    );
    assert_eq!(origin.total(), 0);
}

/// Ambiguous framing is refused with 400 and never forwarded.
#[tokio::test]
async fn request_smuggling_attempts_are_refused() {
    let origin = plain_origin().await;
    let proxy = ProxyHandle::start(&origin.url(), &[]).await;
    for attack in [
        "POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello!",
        "GET /a HTTP/1.1\r\nhost: x\r\nx-folded: a\r\n b\r\n\r\n",
        "POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        "POST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip, chunked, identity\r\n\r\n0\r\n\r\n",
    ] {
        let resp = raw(proxy.addr, attack.as_bytes(), Duration::from_secs(2)).await;
        assert!(resp.starts_with("HTTP/1.1 400") || resp.is_empty(), "{attack:?} → {}", &resp[..resp.len().min(60)]);
    }
    assert_eq!(origin.total(), 0, "nothing ambiguous reached the origin");
}

/// `Content-Length` together with `Transfer-Encoding` (in either order) is refused with 400
/// and the connection closed; nothing reaches the origin, and a request smuggled behind it
/// is never read.
#[tokio::test]
async fn content_length_with_transfer_encoding_is_refused() {
    let origin = plain_origin().await;
    let proxy = ProxyHandle::start(&origin.url(), &[]).await;
    for head in [
        "POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 40\r\ntransfer-encoding: chunked\r\n\r\n",
        "POST /a HTTP/1.1\r\nhost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
    ] {
        let smuggle = format!("{head}0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n");
        let started = Instant::now();
        let resp = raw(proxy.addr, smuggle.as_bytes(), Duration::from_secs(5)).await;
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "the connection was closed"
        );
        assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
        assert_eq!(
            resp.matches("HTTP/1.1").count(),
            1,
            "exactly one response: {resp}"
        );
    }
    // After a normal request on the same connection, the next head is checked too.
    let resp = raw(
        proxy.addr,
        b"GET /ok HTTP/1.1\r\nhost: x\r\n\r\nPOST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    assert_eq!(origin.total(), 1, "only GET /ok reached the origin: {resp}");
    // No false alarm: a chunked body that looks like header lines, then another request.
    let body = "content-length: 1\r\n\r\n";
    let resp = raw(
        proxy.addr,
        format!(
            "POST /p HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n\
             GET /ok HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
            body.len()
        )
        .as_bytes(),
        Duration::from_secs(5),
    )
    .await;
    assert_eq!(resp.matches("HTTP/1.1 200").count(), 2, "{resp}");
}

/// Empty lines before a request line (RFC 9112 §2.2: hyper ignores them) do not hide a
/// `Content-Length` + `Transfer-Encoding` head: on a kept-alive connection, `\r\nPOST …`
/// with both gets 400 and the connection is closed; nothing behind it is read.
#[tokio::test]
async fn ambiguous_framing_after_empty_lines_is_refused() {
    let origin = plain_origin().await;
    let proxy = ProxyHandle::start(&origin.url(), &[]).await;
    for blank in ["\r\n", "\r\n\r\n", "\n"] {
        let mut s = kept_alive(proxy.addr).await;
        s.write_all(
            format!(
                "{blank}POST /a HTTP/1.1\r\nhost: x\r\ncontent-length: 40\r\n\
                 transfer-encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nhost: x\r\n\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        let mut resp = Vec::new();
        let closed = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut resp)).await;
        let resp = String::from_utf8_lossy(&resp);
        assert!(
            matches!(closed, Ok(Ok(_))),
            "{blank:?}: connection closed: {resp}"
        );
        assert!(resp.starts_with("HTTP/1.1 400"), "{blank:?}: {resp}");
        assert_eq!(resp.matches("HTTP/1.1").count(), 1, "{blank:?}: {resp}");
        // GET /a is fetched once, then a hit; the POST never reaches the origin.
        assert_eq!(
            origin.total(),
            1,
            "{blank:?}: only GET /a reached the origin"
        );
    }
    // The same on a fresh connection (empty lines before its first request).
    let resp = raw(
        proxy.addr,
        b"\r\nPOST /a HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n0\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    // No false alarm: empty lines before an unambiguous request are just skipped.
    let resp = raw(
        proxy.addr,
        b"\r\n\r\nGET /ok HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
}

/// A client that never finishes its first request head is disconnected by edgecache's own
/// deadline, HEADER_READ_TIMEOUT_SECS after it connected (counted as `header_timeout`, which
/// a close by hyper's head timer would not be); others are served meanwhile.
#[tokio::test]
async fn slowloris_is_cut_off() {
    let origin = plain_origin().await;
    let proxy = ProxyHandle::start(&origin.url(), &[("HEADER_READ_TIMEOUT_SECS", "0.5")]).await;
    let connected = Instant::now();
    let mut slow = TcpStream::connect(proxy.addr).await.unwrap();
    slow.write_all(b"GET / HTTP/1.1\r\nhost: x\r\nx-a: ")
        .await
        .unwrap();
    assert_eq!(
        get(proxy.addr, "/other", &[]).await.status,
        200,
        "others are unaffected"
    );
    let mut buf = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut buf)).await;
    assert!(closed.is_ok(), "connection closed");
    let took = connected.elapsed();
    assert!(
        (Duration::from_millis(450)..Duration::from_secs(3)).contains(&took),
        "closed {took:?} after the connect, not at the 0.5 s head timeout"
    );
    assert!(buf.is_empty(), "no response to a head never finished");
    assert!(
        eventually(Duration::from_secs(5), || proxy.metrics().contains(
            r#"edgecache_connection_timeouts_total{reason="header_timeout"} 1"#
        ))
        .await,
        "closed by edgecache's head deadline:\n{}",
        proxy.metrics()
    );
}

/// Headers that would change the upstream's answer but are not in the cache key are never
/// forwarded; a client-supplied X-Forwarded-Host is replaced.
#[tokio::test]
async fn unkeyed_override_headers_are_stripped() {
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let s = seen.clone();
    let origin = Origin::start(move |req| {
        let names: Vec<String> = req
            .headers()
            .iter()
            .map(|(k, v)| format!("{k}={}", v.to_str().unwrap_or("")))
            .collect();
        s.lock().unwrap().extend(names);
        async { reply(200, &[("cache-control", "max-age=60")], "page") }
    })
    .await;
    let proxy = ProxyHandle::start(&origin.url(), &[("TRUSTED_PROXIES", "none")]).await;
    let got = get(
        proxy.addr,
        "/p",
        &[
            ("x-original-url", "/admin"),
            ("x-rewrite-url", "/admin"),
            ("x-forwarded-scheme", "nothttps"),
            ("x-http-method-override", "DELETE"),
            ("x-forwarded-host", "evil.example"),
            ("forwarded", "host=evil.example"),
        ],
    )
    .await;
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(origin.hits("/p"), 1, "the request reached the origin");
    let seen = seen.lock().unwrap().join("\n");
    // Replaced by the Host the client sent, not dropped.
    let host = format!("x-forwarded-host={}", proxy.addr);
    assert!(seen.contains(&host), "no {host} at the origin:\n{seen}");
    for bad in [
        "x-original-url",
        "x-rewrite-url",
        "x-forwarded-scheme",
        "x-http-method-override",
        "forwarded=",
        "evil.example",
    ] {
        assert!(!seen.contains(bad), "{bad} reached the origin:\n{seen}");
    }
}

/// MAX_REQUEST_BODY_BYTES: a declared or streamed body above it gets 413.
#[tokio::test]
async fn request_body_limit() {
    let origin = Origin::start(|req| async move {
        let _ = http_body_util::BodyExt::collect(req.into_body()).await;
        reply(200, &[], "took it")
    })
    .await;
    let proxy = ProxyHandle::start(&origin.url(), &[("MAX_REQUEST_BODY_BYTES", "1KiB")]).await;
    let small = send("POST", proxy.addr, "/u", &[], Bytes::from(vec![1u8; 512])).await;
    assert_eq!(small.status, 200);
    let big = send("POST", proxy.addr, "/u", &[], Bytes::from(vec![1u8; 4096])).await;
    assert_eq!(big.status, 413);
    let chunked = raw(
        proxy.addr,
        format!("POST /u HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n1000\r\n{}\r\n0\r\n\r\n", "y".repeat(4096)).as_bytes(),
        Duration::from_secs(3),
    )
    .await;
    assert!(
        chunked.starts_with("HTTP/1.1 413"),
        "{}",
        &chunked[..chunked.len().min(60)]
    );
}

/// A client's oversized or broken request body is the client's fault: it never counts as a
/// backend failure nor opens a backend's circuit breaker (with two backends, where breakers
/// keep books, and a threshold of one failure).
#[tokio::test]
async fn a_clients_bad_body_never_opens_a_backends_breaker() {
    let handler = |req: http::Request<hyper::body::Incoming>| async move {
        let _ = http_body_util::BodyExt::collect(req.into_body()).await;
        reply(200, &[], "took it")
    };
    let (a, b) = (Origin::start(handler).await, Origin::start(handler).await);
    let proxy = ProxyHandle::start(
        &a.url(),
        &[
            ("UPSTREAM_URLS", &format!("{}, {}", a.url(), b.url())),
            ("BREAKER_FAILURE_THRESHOLD", "1"),
            ("HEALTH_CHECK_INTERVAL_SECS", "0"),
            ("MAX_REQUEST_BODY_BYTES", "1KiB"),
        ],
    )
    .await;
    for _ in 0..4 {
        let big = raw(
            proxy.addr,
            format!("POST /u HTTP/1.1\r\nhost: x\r\nconnection: close\r\ntransfer-encoding: chunked\r\n\r\n1000\r\n{}\r\n0\r\n\r\n", "y".repeat(4096)).as_bytes(),
            Duration::from_secs(3),
        )
        .await;
        assert!(
            big.starts_with("HTTP/1.1 413"),
            "{}",
            &big[..big.len().min(60)]
        );
        let broken = raw(
            proxy.addr,
            b"POST /u HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n",
            Duration::from_secs(3),
        )
        .await;
        assert!(
            broken.starts_with("HTTP/1.1 400"),
            "{}",
            &broken[..broken.len().min(60)]
        );
    }
    let status = proxy.status();
    assert!(
        !status.contains(r#""failures":1"#) && status.matches(r#""failures":0"#).count() == 2,
        "{status}"
    );
    assert!(!status.contains("open"), "no breaker opened: {status}");
    // Both backends still take traffic.
    for _ in 0..4 {
        assert_eq!(
            get(proxy.addr, "/after", &[("cache-control", "no-store")])
                .await
                .status,
            200
        );
    }
    assert!(
        a.total() > 0 && b.total() > 0,
        "{} {}",
        a.total(),
        b.total()
    );
}

/// Repeated wrong admin keys from one address are answered 429 for a while.
#[tokio::test]
async fn admin_key_guessing_is_throttled() {
    let origin = plain_origin().await;
    let proxy = ProxyHandle::start(&origin.url(), &[]).await;
    let statuses: Vec<u16> = {
        let mut v = Vec::new();
        for i in 0..8 {
            let key = format!("guess{i}");
            v.push(
                send(
                    "POST",
                    proxy.addr,
                    "/x",
                    &[("clear-cache", "clear"), ("clear-cache-key", &key)],
                    Bytes::new(),
                )
                .await
                .status,
            );
        }
        v
    };
    assert_eq!(statuses, [401, 401, 401, 401, 401, 429, 429, 429]);
    let right = send(
        "POST",
        proxy.addr,
        "/x",
        &[("clear-cache", "clear"), ("clear-cache-key", "Secret")],
        Bytes::new(),
    )
    .await;
    assert_eq!(right.status, 429, "even the right key waits out the window");
}

/// A raw upstream that misbehaves in a scripted way after reading one request.
async fn broken_upstream(script: &'static [u8], then_hang: bool) -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(script).await;
                if then_hang {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
            });
        }
    });
    addr
}

/// Resets mid-body, a short body for its Content-Length, garbage, or a hang after the head:
/// clients get an error, or the head (streamed on as it arrived) and a body cut short —
/// never a complete-looking 200 — and nothing is stored; concurrent waiters get the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn broken_upstream_bodies_are_never_stored() {
    let cases: [(&'static [u8], bool); 3] = [
        (b"HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\ncontent-length: 100\r\n\r\nonly-part", false),
        (b"HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n", false),
        (b"this is not http at all\r\n\r\n", false),
    ];
    for (script, hang) in cases {
        let up = broken_upstream(script, hang).await;
        let proxy = ProxyHandle::start(&format!("http://{up}"), &[]).await;
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                tokio::spawn(raw(
                    proxy.addr,
                    b"GET /b HTTP/1.1\r\nhost: x\r\n\r\n",
                    Duration::from_secs(3),
                ))
            })
            .collect();
        for w in waiters {
            let resp = w.await.unwrap();
            assert!(
                resp.starts_with("HTTP/1.1 502") || resp.is_empty() || cut_short(&resp),
                "{:?}: {resp}",
                String::from_utf8_lossy(script),
            );
        }
        assert!(proxy.proxy.cache.is_empty());
    }
    let hang = broken_upstream(
        b"HTTP/1.1 200 OK\r\ncache-control: max-age=60\r\ncontent-length: 100\r\n\r\nabc",
        true,
    )
    .await;
    let proxy = ProxyHandle::start(&format!("http://{hang}"), &[("REQ_TIMEOUT", "0.5")]).await;
    let resp = raw(
        proxy.addr,
        b"GET /h HTTP/1.1\r\nhost: x\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    // The head was streamed on at once; the body then timed out: the client sees it cut.
    assert!(
        resp.starts_with("HTTP/1.1 504") || cut_short(&resp),
        "{resp}"
    );
    assert!(proxy.proxy.cache.is_empty());
}

/// Whether `resp` (a whole HTTP/1.1 exchange, read to the connection's end) is a response
/// whose body visibly ends early: fewer bytes than its `Content-Length`, or chunked without
/// the last chunk. A client can never take it for a complete body.
fn cut_short(resp: &str) -> bool {
    let Some((head, body)) = resp.split_once("\r\n\r\n") else {
        return false;
    };
    let head = head.to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse::<usize>().ok());
    match length {
        Some(n) => body.len() < n,
        None => head.contains("transfer-encoding: chunked") && !body.ends_with("0\r\n\r\n"),
    }
}

/// No path normalisation on either side: the key is the exact path and query the origin is
/// asked for, so `/a/../b` can neither share `/b`'s entry nor fill it.
#[tokio::test]
async fn dot_segments_are_neither_normalised_nor_shared() {
    let origin = Origin::start(|req| async move {
        let pq = req
            .uri()
            .path_and_query()
            .map_or("/".to_string(), |pq| pq.to_string());
        reply(200, &[("cache-control", "max-age=60")], pq)
    })
    .await;
    let proxy = ProxyHandle::start(&origin.url(), &[]).await;
    for path in ["/b", "/a/../b", "/a/%2e%2e/b", "//b", "/b?"] {
        let got = get(proxy.addr, path, &[]).await;
        assert_eq!(got.text(), path, "the origin was asked for exactly {path}");
    }
    for path in ["/b", "/a/../b", "/a/%2e%2e/b", "//b", "/b?"] {
        let got = get(proxy.addr, path, &[]).await;
        assert_eq!((got.cache(), got.text().as_str()), ("HIT", path));
    }
}

/// At MAX_CONNECTIONS, a new connection waits (in the listen backlog) while the open ones keep
/// being served — one with a request under way, one that has not sent its request yet —
/// and is served as soon as one closes.
#[tokio::test]
async fn max_connections_queues_new_connections_without_hurting_open_ones() {
    let gate = Gate::new();
    let held = gate.clone();
    let origin = Origin::start(move |req| {
        let held = held.clone();
        async move {
            if req.uri().path() == "/slow" {
                held.pass().await;
            }
            reply(200, &[("cache-control", "no-store")], "ok")
        }
    })
    .await;
    let proxy = ProxyHandle::start(&origin.url(), &[("MAX_CONNECTIONS", "2")]).await;
    let mut first = TcpStream::connect(proxy.addr).await.unwrap();
    let second = TcpStream::connect(proxy.addr).await.unwrap();
    first
        .write_all(b"GET /slow HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(
        origin
            .wait_until(Duration::from_secs(5), |o| o
                .started
                .load(std::sync::atomic::Ordering::SeqCst)
                == 1)
            .await
    );
    // A third has to wait for a slot: neither open connection is idle between requests.
    let third = tokio::spawn(raw(
        proxy.addr,
        b"GET /b HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        Duration::from_secs(10),
    ));
    // Elapsed time is what is under test: not served for a while (no event says "not yet").
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!third.is_finished(), "served beyond MAX_CONNECTIONS");
    gate.open();
    assert!(
        read_response(&mut first).await.starts_with("HTTP/1.1 200"),
        "the open request is unharmed"
    );
    drop(second);
    let resp = tokio::time::timeout(Duration::from_secs(5), third)
        .await
        .unwrap()
        .unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
}

/// At MAX_CONNECTIONS, connections idle between keep-alive requests give up their slots, so
/// a new client is served long before the keep-alive timeout.
#[tokio::test]
async fn idle_keepalive_connections_make_room_at_max_connections() {
    let origin = plain_origin().await;
    let proxy = ProxyHandle::start(
        &origin.url(),
        &[("MAX_CONNECTIONS", "2"), ("KEEPALIVE_TIMEOUT_SECS", "60")],
    )
    .await;
    let mut idle = Vec::new();
    for _ in 0..2 {
        idle.push(kept_alive(proxy.addr).await);
    }
    let resp = raw(
        proxy.addr,
        b"GET /b HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        Duration::from_secs(10),
    )
    .await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    // Both idle connections were asked to close (the batch is larger than two).
    assert!(
        eventually(Duration::from_secs(5), || proxy.metrics().contains(
            "edgecache_connection_timeouts_total{reason=\"reclaimed\"} 2"
        ))
        .await
    );
}

/// At MAX_CONNECTIONS, connections that go idle *after* a new client started waiting give
/// up their slots too (not only those idle when the wait began): the new client is served
/// and the connections that went idle are closed, long before the keep-alive timeout.
#[tokio::test]
async fn connections_going_idle_while_a_client_waits_make_room() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let held = gate.clone();
    let origin = Origin::start(move |req| {
        let held = held.clone();
        async move {
            if req.uri().path().starts_with("/held") {
                if let Ok(p) = held.acquire().await {
                    p.forget();
                }
            }
            reply(200, &[("cache-control", "no-store")], "ok")
        }
    })
    .await;
    let proxy = ProxyHandle::start(
        &origin.url(),
        &[("MAX_CONNECTIONS", "2"), ("KEEPALIVE_TIMEOUT_SECS", "60")],
    )
    .await;
    // Both slots taken by requests under way (distinct keys: not coalesced), so nothing is
    // idle when the wait begins.
    let mut open = Vec::new();
    for i in 0..2 {
        let mut s = TcpStream::connect(proxy.addr).await.unwrap();
        s.write_all(format!("GET /held{i} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        open.push(s);
    }
    assert!(
        origin
            .wait_until(Duration::from_secs(5), |o| o
                .started
                .load(std::sync::atomic::Ordering::SeqCst)
                == 2)
            .await
    );
    let waiting = tokio::spawn(raw(
        proxy.addr,
        b"GET /b HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
        Duration::from_secs(30),
    ));
    // Now both requests end and their connections go idle.
    gate.add_permits(2);
    for s in &mut open {
        assert!(read_response(s).await.starts_with("HTTP/1.1 200"));
    }
    // Well inside the 60 s keep-alive timeout; on success this takes milliseconds.
    let resp = tokio::time::timeout(Duration::from_secs(20), waiting)
        .await
        .expect("the waiting client is served before the keep-alive timeout")
        .unwrap();
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    // The slot came from a connection that went idle: counted (before its slot was given
    // up), and closed by the proxy.
    let metrics = proxy.metrics();
    assert!(
        !metrics.contains("edgecache_connection_timeouts_total{reason=\"reclaimed\"} 0"),
        "{metrics}"
    );
    let (mut a, mut b) = ([0u8; 1], [0u8; 1]);
    let (first, second) = open.split_at_mut(1);
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        tokio::select! {
            r = first[0].read(&mut a) => r,
            r = second[0].read(&mut b) => r,
        }
    })
    .await;
    assert!(
        matches!(closed, Ok(Ok(0) | Err(_))),
        "an idle connection was closed: {closed:?}"
    );
}

/// A connection that has been served one request (`GET /a`) and is now idle between
/// keep-alive requests.
async fn kept_alive(addr: std::net::SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(read_response(&mut s).await.starts_with("HTTP/1.1 200"));
    s
}

/// Reads one response with a `content-length` body from a keep-alive connection.
async fn read_response(s: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed mid-response");
        buf.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&buf).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let len: usize = text[..end]
                .lines()
                .find_map(|l| l.strip_prefix("content-length: "))
                .map_or(0, |v| v.trim().parse().unwrap());
            if buf.len() >= end + 4 + len {
                return text;
            }
        }
    }
}

/// An idle keep-alive connection outlives HEADER_READ_TIMEOUT_SECS (hyper's own head timer
/// would close it then) and is closed after KEEPALIVE_TIMEOUT_SECS, counted in /metrics.
#[tokio::test]
async fn idle_keepalive_connections_get_their_own_timeout() {
    let origin = plain_origin().await;
    let proxy = ProxyHandle::start(
        &origin.url(),
        &[
            ("HEADER_READ_TIMEOUT_SECS", "0.3"),
            ("KEEPALIVE_TIMEOUT_SECS", "1.5"),
        ],
    )
    .await;
    let mut s = kept_alive(proxy.addr).await;
    // Idle for longer than the head timeout: still open, and serves a second request.
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(700), s.read(&mut byte)).await;
    assert!(
        early.is_err(),
        "closed while idle within the keep-alive timeout"
    );
    s.write_all(b"GET /a HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(read_response(&mut s).await.starts_with("HTTP/1.1 200"));
    let idle_from = Instant::now();
    let closed = tokio::time::timeout(Duration::from_secs(10), s.read(&mut byte)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "closed when idle");
    assert!(idle_from.elapsed() >= Duration::from_millis(1400));
    let metrics = proxy.metrics();
    assert!(
        metrics.contains("edgecache_connection_timeouts_total{reason=\"keepalive_timeout\"} 1"),
        "{metrics}"
    );
}

/// On a keep-alive connection that has been idle longer than HEADER_READ_TIMEOUT_SECS, a
/// request head that trickles in is cut off by edgecache's head deadline, timed from the
/// head's first byte: not during the idle time (as hyper's head timer would), and not given
/// what is left of the (longer) keep-alive timeout.
#[tokio::test]
async fn a_slow_head_after_keepalive_is_cut_off() {
    let origin = plain_origin().await;
    let proxy = ProxyHandle::start(
        &origin.url(),
        &[
            ("HEADER_READ_TIMEOUT_SECS", "0.5"),
            ("KEEPALIVE_TIMEOUT_SECS", "60"),
        ],
    )
    .await;
    let mut s = kept_alive(proxy.addr).await;
    // Elapsed idle time is what is under test: twice the head timeout, still open.
    let mut byte = [0u8; 1];
    let idle = tokio::time::timeout(Duration::from_secs(1), s.read(&mut byte)).await;
    assert!(idle.is_err(), "closed while idle: {idle:?}");
    let head_started = Instant::now();
    s.write_all(b"GET /a HTTP/1.1\r\nhost: x\r\nx-a: ")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await;
    assert!(
        closed.is_ok(),
        "slow head cut off long before the keep-alive timeout"
    );
    let took = head_started.elapsed();
    assert!(
        (Duration::from_millis(450)..Duration::from_secs(5)).contains(&took),
        "closed {took:?} after the head began, not at the 0.5 s head timeout"
    );
    assert!(
        eventually(Duration::from_secs(5), || proxy.metrics().contains(
            r#"edgecache_connection_timeouts_total{reason="header_timeout"} 1"#
        ))
        .await,
        "{}",
        proxy.metrics()
    );
    assert_eq!(origin.total(), 1);
}

/// A client that asks for a large body and stops reading holds its connection only until
/// nothing has moved for max(KEEPALIVE_TIMEOUT_SECS, 2 × REQ_TIMEOUT); then it is closed.
#[tokio::test]
async fn a_client_that_stops_reading_is_disconnected() {
    let big = Bytes::from(vec![b'x'; 32 << 20]);
    let origin = Origin::start(move |_req| {
        let big = big.clone();
        async move { reply(200, &[("cache-control", "no-store")], big) }
    })
    .await;
    let proxy = ProxyHandle::start(
        &origin.url(),
        &[("KEEPALIVE_TIMEOUT_SECS", "1"), ("REQ_TIMEOUT", "0.5")],
    )
    .await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET /big HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    assert!(
        eventually(Duration::from_secs(15), || proxy.metrics().contains(
            "edgecache_connection_timeouts_total{reason=\"stalled\"} 1"
        ))
        .await,
        "the stalled connection is closed"
    );
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got)).await;
    assert!(got.len() < 32 << 20, "the body was cut off, not completed");
}

/// `Vary: *` (alone or in a list) is never stored: every request goes to the origin.
#[tokio::test]
async fn vary_star_is_never_stored() {
    let origin = Origin::start(|req| async move {
        let vary = if req.uri().path() == "/list" {
            "accept, *"
        } else {
            "*"
        };
        reply(200, &[("cache-control", "max-age=60"), ("vary", vary)], "v")
    })
    .await;
    let proxy = ProxyHandle::start(&origin.url(), &[]).await;
    for path in ["/star", "/list"] {
        for _ in 0..3 {
            assert_ne!(get(proxy.addr, path, &[]).await.cache(), "HIT");
        }
        assert_eq!(origin.hits(path), 3, "{path} was stored");
    }
    assert!(proxy.proxy.cache.is_empty());
}

/// A response that varies on a header the first request lacked is stored for requests
/// without it only: a request that has the header (even empty) is a different variant, and
/// a request without it is served the stored one.
#[tokio::test]
async fn a_response_varying_on_an_absent_header_is_keyed_by_its_absence() {
    let origin = Origin::start(|req| async move {
        let lang = req
            .headers()
            .get("accept-language")
            .map_or("none".to_string(), |v| {
                format!("[{}]", v.to_str().unwrap_or("?"))
            });
        reply(
            200,
            &[("cache-control", "max-age=60"), ("vary", "Accept-Language")],
            lang,
        )
    })
    .await;
    let proxy = ProxyHandle::start(&origin.url(), &[]).await;
    assert_eq!(get(proxy.addr, "/v", &[]).await.text(), "none");
    let with = get(proxy.addr, "/v", &[("accept-language", "de")]).await;
    assert_eq!((with.cache(), with.text().as_str()), ("MISS", "[de]"));
    let empty = get(proxy.addr, "/v", &[("accept-language", "")]).await;
    assert_eq!((empty.cache(), empty.text().as_str()), ("MISS", "[]"));
    let without = get(proxy.addr, "/v", &[]).await;
    assert_eq!((without.cache(), without.text().as_str()), ("HIT", "none"));
    let de = get(proxy.addr, "/v", &[("accept-language", "de")]).await;
    assert_eq!((de.cache(), de.text().as_str()), ("HIT", "[de]"));
    assert_eq!(origin.hits("/v"), 3);
}
