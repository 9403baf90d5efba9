//! ETag/304 at the edge: matching, weak and list `If-None-Match`, `*`, `If-Modified-Since`,
//! and ETags generated from the body when the upstream sends none.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use common::*;

/// Matching, weak (as nginx sends after gzip), listed and `*` tags get 304; others get 200.
#[tokio::test]
async fn if_none_match_variants() {
    let origin = Origin::start(|_req| async {
        reply(
            200,
            &[("etag", "\"abc\""), ("cache-control", "max-age=60")],
            "body",
        )
    })
    .await;
    let proxy = ProxyHandle::start(&origin.url(), &[]).await;
    let first = get(proxy.addr, "/e", &[("if-none-match", "\"abc\"")]).await;
    assert_eq!(
        first.status, 304,
        "a conditional miss is answered from the fresh entry"
    );
    for (inm, status) in [
        ("\"abc\"", 304),
        ("W/\"abc\"", 304),
        ("\"x\", \"abc\"", 304),
        ("*", 304),
        ("\"nope\"", 200),
        ("W/\"nope\", \"x\"", 200),
    ] {
        let got = get(proxy.addr, "/e", &[("if-none-match", inm)]).await;
        assert_eq!(got.status, status, "If-None-Match: {inm}");
        if status == 304 {
            assert!(got.body.is_empty());
            assert_eq!(got.header("etag"), Some("\"abc\""));
            assert_eq!(got.header("cache-control"), Some("max-age=60"));
            assert!(got.header("date").is_some());
        }
    }
    assert_eq!(origin.hits("/e"), 1);
}

/// If-Modified-Since is honoured when there is no If-None-Match.
#[tokio::test]
async fn if_modified_since() {
    let lm = "Tue, 14 Nov 2023 22:13:20 GMT";
    let origin = Origin::start(move |_req| async move {
        reply(
            200,
            &[("last-modified", lm), ("cache-control", "max-age=60")],
            "body",
        )
    })
    .await;
    let proxy = ProxyHandle::start(&origin.url(), &[]).await;
    get(proxy.addr, "/m", &[]).await;
    assert_eq!(
        get(proxy.addr, "/m", &[("if-modified-since", lm)])
            .await
            .status,
        304
    );
    let earlier = "Tue, 14 Nov 2023 22:13:19 GMT";
    assert_eq!(
        get(proxy.addr, "/m", &[("if-modified-since", earlier)])
            .await
            .status,
        200
    );
    let both = get(
        proxy.addr,
        "/m",
        &[("if-modified-since", lm), ("if-none-match", "\"other\"")],
    )
    .await;
    assert_eq!(both.status, 200, "If-None-Match takes precedence");
}

/// Without an upstream ETag, one is generated from the body: stable across hits, different
/// when the body changes, and usable for 304.
#[tokio::test]
async fn generated_etag_is_stable_and_follows_the_body() {
    let n = Arc::new(AtomicUsize::new(0));
    let origin = Origin::start(move |_req| {
        let v = n.fetch_add(1, Ordering::SeqCst);
        async move { reply(200, &[("cache-control", "max-age=60")], format!("body-{v}")) }
    })
    .await;
    let proxy = ProxyHandle::start(&origin.url(), &[]).await;
    let a = get(proxy.addr, "/g", &[]).await;
    let b = get(proxy.addr, "/g", &[]).await;
    let etag = a.header("etag").unwrap().to_string();
    assert!(etag.starts_with('"') && etag.len() == 34, "{etag}");
    assert_eq!(b.header("etag"), Some(etag.as_str()));
    assert_eq!(
        get(proxy.addr, "/g", &[("if-none-match", &etag)])
            .await
            .status,
        304
    );

    send(
        "POST",
        proxy.addr,
        "/g",
        &[("clear-cache", "clear"), ("clear-cache-key", "Secret")],
        Bytes::new(),
    )
    .await;
    let c = get(proxy.addr, "/g", &[]).await;
    assert_ne!(c.header("etag"), Some(etag.as_str()), "new body, new ETag");
    assert_eq!(
        get(proxy.addr, "/g", &[("if-none-match", &etag)])
            .await
            .status,
        200
    );
}

/// A stale entry is revalidated with the upstream's validator; a 304 renews it.
#[tokio::test]
async fn stale_entry_is_revalidated_with_a_conditional_request() {
    let origin = Origin::start(|req| async move {
        if req
            .headers()
            .get("if-none-match")
            .is_some_and(|v| v == "\"r1\"")
        {
            reply(
                304,
                &[("etag", "\"r1\""), ("cache-control", "max-age=600")],
                "",
            )
        } else {
            reply(
                200,
                &[
                    ("etag", "\"r1\""),
                    ("cache-control", "max-age=0, must-revalidate"),
                ],
                "content",
            )
        }
    })
    .await;
    let proxy = ProxyHandle::start(&origin.url(), &[]).await;
    assert_eq!(get(proxy.addr, "/rv", &[]).await.cache(), "MISS");
    let second = get(proxy.addr, "/rv", &[]).await;
    assert_eq!(
        (second.status, second.cache(), second.text().as_str()),
        (200, "REFRESH", "content")
    );
    let third = get(proxy.addr, "/rv", &[]).await;
    assert_eq!(
        (third.cache(), third.text().as_str()),
        ("HIT", "content"),
        "304 renewed freshness"
    );
    assert_eq!(origin.hits("/rv"), 2);
}
