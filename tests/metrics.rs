//! The Prometheus endpoint on the operator listener: scraped over HTTP, its counters move as
//! requests, coalesced waits, admin actions and upstream calls happen.

mod common;

use std::time::Duration;

use common::*;

/// Scrapes `/metrics` from the operator listener of `proxy`.
async fn scrape(ops: std::net::SocketAddr) -> String {
    let got = get(ops, "/metrics", &[]).await;
    assert_eq!(got.status, 200);
    assert!(got
        .header("content-type")
        .unwrap()
        .starts_with("text/plain; version=0.0.4"));
    got.text()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn counters_move_with_traffic() {
    let gate = Gate::new();
    let origin = Origin::start_behind(&gate, |_req| {
        let arrived = tokio::time::Instant::now();
        async move {
            // The upstream duration the histogram below is checked against: at least 100 ms.
            tokio::time::sleep_until(arrived + Duration::from_millis(100)).await;
            reply(200, &[("cache-control", "max-age=60")], "m")
        }
    })
    .await;
    let proxy = ProxyHandle::start(&origin.url(), &[]).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ops = listener.local_addr().unwrap();
    tokio::spawn(edgecache::ops::serve(listener, proxy.proxy.clone()));

    let before = scrape(ops).await;
    assert_eq!(
        metric(&before, "edgecache_requests_total{cache_status=\"HIT\"}"),
        0.0
    );

    let herd: Vec<_> = (0..10)
        .map(|_| tokio::spawn(get(proxy.addr, "/m", &[])))
        .collect();
    assert!(proxy.followers(9).await, "9 followers joined");
    gate.open();
    for h in herd {
        assert_eq!(h.await.unwrap().status, 200);
    }
    get(proxy.addr, "/m", &[]).await;
    admin(
        &proxy,
        "/m",
        &[("clear-cache", "clear"), ("clear-cache-key", "Secret")],
    )
    .await;
    admin(
        &proxy,
        "/m",
        &[("clear-cache", "clear"), ("clear-cache-key", "nope")],
    )
    .await;

    let after = scrape(ops).await;
    assert_eq!(
        metric(&after, "edgecache_requests_total{cache_status=\"MISS\"}"),
        10.0
    );
    assert_eq!(
        metric(&after, "edgecache_requests_total{cache_status=\"HIT\"}"),
        1.0
    );
    assert_eq!(
        metric(&after, "edgecache_requests_total{cache_status=\"ADMIN\"}"),
        2.0
    );
    assert_eq!(metric(&after, "edgecache_coalesced_requests_total"), 9.0);
    assert_eq!(
        metric(
            &after,
            "edgecache_admin_requests_total{outcome=\"cleared\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &after,
            "edgecache_admin_requests_total{outcome=\"unauthorized\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(&after, "edgecache_evictions_total{reason=\"admin\"}"),
        1.0
    );
    assert_eq!(metric(&after, "edgecache_cache_entries"), 0.0);
    let backend = format!("backend=\"{}\"", origin.addr);
    assert_eq!(
        metric(
            &after,
            &format!("edgecache_upstream_requests_total{{{backend},status=\"2xx\"}}")
        ),
        1.0
    );
    assert_eq!(
        metric(
            &after,
            &format!("edgecache_upstream_request_duration_seconds_count{{{backend}}}")
        ),
        1.0
    );
    assert_eq!(
        metric(
            &after,
            &format!("edgecache_upstream_request_duration_seconds_bucket{{{backend},le=\"0.05\"}}")
        ),
        0.0
    );
    // At least 100 ms (the origin's delay after the gate), however long the followers took
    // to join: below the 0.05 bucket never, in +Inf always, and the sum says so.
    assert_eq!(
        metric(
            &after,
            &format!("edgecache_upstream_request_duration_seconds_bucket{{{backend},le=\"+Inf\"}}")
        ),
        1.0
    );
    assert!(
        metric(
            &after,
            &format!("edgecache_upstream_request_duration_seconds_sum{{{backend}}}")
        ) >= 0.1
    );
    assert!(metric(&after, "edgecache_connections_total") >= 13.0);

    let status = get(ops, "/status", &[]).await;
    assert!(
        status.text().contains(r#""state":"up""#),
        "{}",
        status.text()
    );
}

/// `/status` keeps its exact shape: the field names, their order and the value types.
#[tokio::test]
async fn status_has_its_documented_shape() {
    let origin = Origin::start(|_req| async { reply(200, &[], "s") }).await;
    let proxy = ProxyHandle::start(&origin.url(), &[]).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ops = listener.local_addr().unwrap();
    tokio::spawn(edgecache::ops::serve(listener, proxy.proxy.clone()));

    let got = get(ops, "/status", &[]).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.header("content-type"), Some("application/json"));
    let want = format!(
        concat!(
            r#"{{"backends":[{{"url":"{}","weight":1,"http2":false,"state":"up","#,
            r#""requests":0,"failures":0,"retries":0,"idle_timeout_ms":4000}}],"#,
            r#""panic_mode":false,"cache":{{"entries":0,"bytes":0,"in_flight":0}}}}"#
        ),
        origin.url()
    );
    assert_eq!(got.text(), want);
}
