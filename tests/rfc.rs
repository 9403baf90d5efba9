//! RFC 9111 behaviour beyond the core: ranges from stored responses, request directives and
//! their setting, targeted cache-control fields, invalidation of related URLs, retention of
//! stale entries for revalidation, and the RFC 9211 `Cache-Status` header. (The full public
//! suite runs in `conformance/run.sh`.)

mod common;

use bytes::Bytes;
use common::*;

async fn origin_with(
    headers: &'static [(&'static str, &'static str)],
    body: &'static str,
) -> Origin {
    Origin::start(move |_req| async move { reply(200, headers, body) }).await
}

/// Single byte ranges are served from the stored complete response; `If-Range` with another
/// validator gets the whole body; an unsatisfiable range gets 416.
#[tokio::test]
async fn ranges_are_served_from_the_stored_response() {
    let origin = origin_with(
        &[("cache-control", "max-age=60"), ("etag", "\"r\"")],
        "0123456789",
    )
    .await;
    let proxy = ProxyHandle::start(&origin.url(), &[]).await;
    let part = get(proxy.addr, "/r", &[("range", "bytes=2-4")]).await;
    assert_eq!((part.status, part.text().as_str()), (206, "234"));
    assert_eq!(part.header("content-range"), Some("bytes 2-4/10"));
    let suffix = get(proxy.addr, "/r", &[("range", "bytes=-3")]).await;
    assert_eq!((suffix.status, suffix.text().as_str()), (206, "789"));
    let whole = get(
        proxy.addr,
        "/r",
        &[("range", "bytes=0-1"), ("if-range", "\"other\"")],
    )
    .await;
    assert_eq!((whole.status, whole.text().as_str()), (200, "0123456789"));
    let bad = get(proxy.addr, "/r", &[("range", "bytes=50-")]).await;
    assert_eq!(
        (bad.status, bad.header("content-range")),
        (416, Some("bytes */10"))
    );
    assert_eq!(
        origin.hits("/r"),
        1,
        "the miss fetched the whole body once, without Range"
    );
}

/// `only-if-cached` never reaches the origin; `no-cache` from a client is ignored by default
/// (`CLIENT_CACHE_CONTROL=safe`) and honoured as a revalidation with `full`.
#[tokio::test]
async fn request_directives_follow_the_setting() {
    let origin = origin_with(&[("cache-control", "max-age=60"), ("etag", "\"d\"")], "doc").await;
    let safe = ProxyHandle::start(&origin.url(), &[]).await;
    let miss = get(safe.addr, "/d", &[("cache-control", "only-if-cached")]).await;
    assert_eq!(miss.status, 504);
    assert_eq!(origin.hits("/d"), 0);
    get(safe.addr, "/d", &[]).await;
    assert_eq!(
        get(safe.addr, "/d", &[("cache-control", "only-if-cached")])
            .await
            .cache(),
        "HIT"
    );
    assert_eq!(
        get(safe.addr, "/d", &[("cache-control", "no-cache")])
            .await
            .cache(),
        "HIT"
    );
    assert_eq!(
        origin.hits("/d"),
        1,
        "a client cannot force an origin fetch by default"
    );

    let full = ProxyHandle::start(&origin.url(), &[("CLIENT_CACHE_CONTROL", "full")]).await;
    get(full.addr, "/d", &[]).await;
    let forced = get(full.addr, "/d", &[("cache-control", "no-cache")]).await;
    assert_eq!((forced.status, forced.cache()), (200, "REFRESH"));
    assert_eq!(origin.hits("/d"), 3);
}

/// `Edgecache-Cache-Control` overrides `Cache-Control` for edgecache only and is removed
/// before responding; `Surrogate-Control` likewise.
#[tokio::test]
async fn targeted_fields_are_obeyed_and_stripped() {
    let origin = Origin::start(|req| async move {
        match req.uri().path() {
            "/e" => reply(
                200,
                &[
                    ("cache-control", "no-store"),
                    ("edgecache-cache-control", "max-age=60"),
                ],
                "e",
            ),
            _ => reply(
                200,
                &[
                    ("cache-control", "max-age=60"),
                    ("surrogate-control", "no-store"),
                ],
                "s",
            ),
        }
    })
    .await;
    let proxy = ProxyHandle::start(&origin.url(), &[]).await;
    get(proxy.addr, "/e", &[]).await;
    let hit = get(proxy.addr, "/e", &[]).await;
    assert_eq!(hit.cache(), "HIT");
    assert_eq!(
        hit.header("cache-control"),
        Some("no-store"),
        "downstream caches still see no-store"
    );
    assert!(hit.header("edgecache-cache-control").is_none());
    get(proxy.addr, "/s", &[]).await;
    let second = get(proxy.addr, "/s", &[]).await;
    assert_ne!(second.cache(), "HIT");
    assert!(second.header("surrogate-control").is_none());
}

/// A successful POST invalidates the same-origin URL in its `Location`.
#[tokio::test]
async fn unsafe_methods_invalidate_location() {
    let origin = Origin::start(|req| async move {
        match *req.method() {
            http::Method::POST => reply(201, &[("location", "/items/7")], ""),
            _ => reply(200, &[("cache-control", "max-age=60")], "item"),
        }
    })
    .await;
    let proxy = ProxyHandle::start(&origin.url(), &[]).await;
    get(proxy.addr, "/items/7", &[]).await;
    assert_eq!(get(proxy.addr, "/items/7", &[]).await.cache(), "HIT");
    send("POST", proxy.addr, "/items", &[], Bytes::from_static(b"{}")).await;
    assert_eq!(get(proxy.addr, "/items/7", &[]).await.cache(), "MISS");
}

/// With STALE_RETENTION_SECS an expired entry is kept and revalidated with its ETag: the
/// origin answers 304, the client gets the stored body (REFRESH), and Cache-Status says so.
#[tokio::test]
async fn retained_stale_entries_are_revalidated() {
    let origin = Origin::start(|req| async move {
        if req
            .headers()
            .get("if-none-match")
            .is_some_and(|v| v == "\"v\"")
        {
            reply(
                304,
                &[("etag", "\"v\""), ("cache-control", "max-age=0")],
                "",
            )
        } else {
            reply(
                200,
                &[("etag", "\"v\""), ("cache-control", "max-age=0")],
                "body",
            )
        }
    })
    .await;
    let proxy = ProxyHandle::start(&origin.url(), &[("STALE_RETENTION_SECS", "60")]).await;
    let first = get(proxy.addr, "/v", &[]).await;
    assert!(first
        .header("cache-status")
        .is_some_and(|v| v.starts_with("edgecache; fwd=uri-miss")));
    let second = get(proxy.addr, "/v", &[]).await;
    assert_eq!(
        (second.status, second.cache(), second.text().as_str()),
        (200, "REFRESH", "body")
    );
    assert!(
        second
            .header("cache-status")
            .is_some_and(|v| v.contains("fwd=stale")),
        "{:?}",
        second.header("cache-status")
    );
    assert_eq!(origin.hits("/v"), 2);
}
