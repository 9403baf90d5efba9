//! The upstream pool: weighted balancing, active health checks, the circuit breaker,
//! failover of idempotent requests, errors when no backend is left, connection reuse and
//! HTTP/2 backends — all against real backends on loopback.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// A backend that answers every request with its name, uncacheable.
async fn named(name: &'static str) -> Origin {
    Origin::start(move |_req| async move { reply(200, &[("cache-control", "no-store")], name) })
        .await
}

fn urls(origins: &[&Origin], weights: &[u32]) -> String {
    origins
        .iter()
        .zip(weights)
        .map(|(o, w)| format!("{} weight={w}", o.url()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Requests spread over backends in proportion to their weights (3:2:1).
#[tokio::test]
async fn weighted_split_follows_the_weights() {
    let (a, b, c) = (named("a").await, named("b").await, named("c").await);
    let proxy = ProxyHandle::start(
        "http://unused:1",
        &[("UPSTREAM_URLS", &urls(&[&a, &b, &c], &[3, 2, 1]))],
    )
    .await;
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
    let proxy = ProxyHandle::start(
        "http://unused:1",
        &[
            ("UPSTREAM_URLS", &urls(&[&a, &b], &[1, 1])),
            ("HEALTH_CHECK_INTERVAL_SECS", "0.1"),
            ("HEALTH_CHECK_FAILURE_THRESHOLD", "2"),
            ("HEALTH_CHECK_RECOVERY_THRESHOLD", "2"),
        ],
    )
    .await;
    let status = || edgecache::ops::status_json(&proxy.proxy);
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
        eventually(Duration::from_secs(5), || status()
            .contains(r#""state":"down""#))
        .await,
        "{}",
        status()
    );

    let b2 = Origin::start_on(b_addr, |_req| async {
        reply(200, &[("cache-control", "no-store")], "b")
    })
    .await;
    assert!(
        eventually(Duration::from_secs(5), || !status()
            .contains(r#""state":"down""#))
        .await,
        "{}",
        status()
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
    let proxy = ProxyHandle::start(
        "http://unused:1",
        &[
            ("UPSTREAM_URLS", &urls(&[&a, &b], &[1, 1])),
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
            .store
            .get(&proxy.key("/s"), &Default::default())
            .is_some_and(|e| !e.is_fresh(Instant::now()))
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
    let proxy = ProxyHandle::start(
        "http://unused:1",
        &[
            ("UPSTREAM_URLS", &urls(&[&flaky, &steady], &[1, 1])),
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
    assert!(edgecache::ops::status_json(&proxy.proxy).contains("breaker_open"));
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
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline && flaky.total() == before {
        get(proxy.addr, "/b?trial", &[]).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        flaky.total() > before,
        "the trial request went to the recovered backend"
    );
    assert!(
        eventually(Duration::from_secs(2), || !edgecache::ops::status_json(
            &proxy.proxy
        )
        .contains("breaker"))
        .await,
        "{}",
        edgecache::ops::status_json(&proxy.proxy)
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
