//! What is stored, under which key, for how long; expiry with refresh or drop; errors.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;

/// edgecache with a default lifetime of `ttl` seconds and a refresh window of `window`.
async fn expiring(origin: &Origin, ttl: &str, window: &str) -> ProxyHandle {
    ProxyHandle::start(
        &origin.url(),
        &[
            ("DEFAULT_CACHE_EXPIRY_TIME_SECS", ttl),
            ("DEFAULT_REFRESH_WINDOW_SECS", window),
        ],
    )
    .await
}

/// The query string is part of the key: `/x?a=1` and `/x?a=2` are separate entries.
#[tokio::test]
async fn distinct_query_strings_are_distinct_entries() {
    let origin = Origin::start(|req| async move {
        reply(
            200,
            &[("cache-control", "max-age=60")],
            req.uri().query().unwrap_or("").to_string(),
        )
    })
    .await;
    let proxy = ProxyHandle::start(&origin.url(), &[]).await;
    let a = get(proxy.addr, "/x?a=1", &[]).await;
    let b = get(proxy.addr, "/x?a=2", &[]).await;
    assert_eq!((a.text().as_str(), a.cache()), ("a=1", "MISS"));
    assert_eq!((b.text().as_str(), b.cache()), ("a=2", "MISS"));
    let a2 = get(proxy.addr, "/x?a=1", &[]).await;
    assert_eq!((a2.text().as_str(), a2.cache()), ("a=1", "HIT"));
    assert_eq!((origin.hits("/x?a=1"), origin.hits("/x?a=2")), (1, 1));
}

/// A hot key is refreshed by the timer at expiry, before any client asks again, and clients
/// never see a miss.
#[tokio::test]
async fn expiry_refreshes_recently_requested_entries_in_the_background() {
    let origin = versioned_origin(&[]).await;
    let proxy = expiring(&origin, "0.3", "30").await;
    assert_eq!(get(proxy.addr, "/k", &[]).await.text(), "v1");
    // No client request: the expiry timer alone triggers the refetch.
    assert!(
        origin
            .wait_until(Duration::from_secs(5), |o| o.hits("/k") >= 2)
            .await,
        "refreshed by the timer"
    );
    assert!(
        eventually(Duration::from_secs(5), || {
            proxy
                .proxy
                .cache
                .lookup(&proxy.key("/k"), &Default::default())
                .is_some_and(|hit| hit.entry.body() != "v1")
        })
        .await
    );
    let got = get(proxy.addr, "/k", &[]).await;
    assert_ne!(got.cache(), "MISS");
    assert!(got.text().starts_with('v'));
}

/// An entry nobody asked for within the refresh window is dropped at expiry, not refreshed.
#[tokio::test]
async fn expiry_drops_entries_not_requested_within_the_window() {
    let origin = versioned_origin(&[]).await;
    let proxy = expiring(&origin, "0.5", "0").await;
    assert_eq!(get(proxy.addr, "/k", &[]).await.cache(), "MISS");
    assert!(!proxy.proxy.cache.is_empty());
    assert!(
        eventually(Duration::from_secs(5), || proxy.proxy.cache.is_empty()).await,
        "dropped"
    );
    assert_eq!(origin.hits("/k"), 1, "dropped, not refreshed");
    let again = get(proxy.addr, "/k", &[]).await;
    assert_eq!((again.cache(), again.text().as_str()), ("MISS", "v2"));
}

/// While a hot entry is being refreshed, clients keep getting the previous copy (HIT while
/// it is fresh, then STALE: never a miss, never a wait); the new copy replaces it once the
/// refresh lands.
#[tokio::test]
async fn stale_copy_is_served_while_refresh_runs() {
    let n = Arc::new(AtomicUsize::new(0));
    // The refresh is held at the origin until the test has seen STALE.
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let held = gate.clone();
    let origin = Origin::start(move |_req| {
        let v = n.fetch_add(1, Ordering::SeqCst) + 1;
        let held = held.clone();
        async move {
            if v > 1 {
                // Forgotten: a later refresh (of v2) is held for good, so v2 stays.
                if let Ok(permit) = held.acquire().await {
                    permit.forget();
                }
            }
            reply(200, &[], format!("v{v}"))
        }
    })
    .await;
    let proxy = expiring(&origin, "0.2", "30").await;
    assert_eq!(get(proxy.addr, "/k", &[]).await.text(), "v1");
    assert!(
        origin
            .wait_until(Duration::from_secs(5), |o| o.hits("/k") == 2)
            .await,
        "refresh started"
    );
    // Until the refresh lands every client gets v1; polling until the entry is past its
    // 0.2 s lifetime (well inside REQ_TIMEOUT, so the held refresh is still running).
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    let mut saw_stale = false;
    while std::time::Instant::now() < deadline && !saw_stale {
        let got = get(proxy.addr, "/k", &[]).await;
        assert_eq!(got.text(), "v1");
        assert!(matches!(got.cache(), "HIT" | "STALE"), "{}", got.cache());
        saw_stale = got.cache() == "STALE";
    }
    assert!(saw_stale, "served stale while the refresh ran");
    assert_eq!(origin.hits("/k"), 2, "no second refresh meanwhile");
    gate.add_permits(1);
    assert!(
        eventually(Duration::from_secs(5), || proxy
            .proxy
            .cache
            .lookup(&proxy.key("/k"), &Default::default())
            .is_some_and(|hit| hit.entry.body() == "v2"))
        .await,
        "the refreshed copy replaced the stale one"
    );
    assert_eq!(get(proxy.addr, "/k", &[]).await.text(), "v2");
}

/// Explicit upstream freshness wins over the default; `Age` grows from the upstream's `Age`.
#[tokio::test]
async fn explicit_freshness_wins_and_age_is_reported() {
    let origin = Origin::start(|_req| async {
        reply(
            200,
            &[("cache-control", "max-age=600"), ("age", "100")],
            "x",
        )
    })
    .await;
    let proxy =
        ProxyHandle::start(&origin.url(), &[("DEFAULT_CACHE_EXPIRY_TIME_SECS", "0.1")]).await;
    get(proxy.addr, "/a", &[]).await;
    let entry = proxy
        .proxy
        .cache
        .lookup(&proxy.key("/a"), &Default::default())
        .unwrap()
        .entry;
    assert_eq!(entry.lifetime(), Duration::from_secs(600));
    let hit = get(proxy.addr, "/a", &[]).await;
    assert_eq!(hit.cache(), "HIT");
    let age: u64 = hit.header("age").unwrap().parse().unwrap();
    assert!((100..110).contains(&age), "age {age}");
}

/// Responses that must not be shared are never served to another client:
/// no-store, private, Set-Cookie, and a response to a request with Authorization.
#[tokio::test]
async fn private_responses_are_not_shared() {
    let origin = Origin::start(|req| async move {
        match req.uri().path() {
            "/no-store" => reply(200, &[("cache-control", "no-store")], "a"),
            "/private" => reply(200, &[("cache-control", "private, max-age=60")], "b"),
            "/cookie" => reply(200, &[("set-cookie", "session=1")], "c"),
            "/cookie-public" => reply(
                200,
                &[
                    ("set-cookie", "x=1"),
                    ("cache-control", "public, max-age=60"),
                ],
                "d",
            ),
            _ => reply(200, &[], "e"),
        }
    })
    .await;
    let proxy = ProxyHandle::start(&origin.url(), &[]).await;
    for path in ["/no-store", "/private", "/cookie"] {
        get(proxy.addr, path, &[]).await;
        let second = get(proxy.addr, path, &[]).await;
        assert_ne!(second.cache(), "HIT", "{path}");
        assert_eq!(origin.hits(path), 2, "{path} fetched for each client");
    }
    get(proxy.addr, "/auth", &[("authorization", "Bearer alice")]).await;
    get(proxy.addr, "/auth", &[]).await;
    assert_eq!(
        origin.hits("/auth"),
        2,
        "a response to an Authorization request is not shared"
    );
    get(proxy.addr, "/cookie-public", &[]).await;
    assert_eq!(
        get(proxy.addr, "/cookie-public", &[]).await.cache(),
        "HIT",
        "explicitly public"
    );
}

/// Errors keep their status. A 5xx is stored only when the origin gives it an explicit
/// lifetime; binary bodies survive byte for byte.
#[tokio::test]
async fn errors_keep_their_status_and_need_explicit_lifetime() {
    let origin = Origin::start(|req| async move {
        match req.uri().path() {
            "/boom" => reply(503, &[("cache-control", "public")], "down"),
            "/shed" => reply(503, &[("cache-control", "max-age=60")], "busy"),
            _ => reply(
                200,
                &[("content-type", "application/octet-stream")],
                (0..=255u8).collect::<Vec<_>>(),
            ),
        }
    })
    .await;
    let proxy = ProxyHandle::start(&origin.url(), &[]).await;
    assert_eq!(get(proxy.addr, "/boom", &[]).await.status, 503);
    assert_eq!(get(proxy.addr, "/boom", &[]).await.status, 503);
    assert_eq!(origin.hits("/boom"), 2, "no explicit lifetime: not stored");
    get(proxy.addr, "/shed", &[]).await;
    let shed = get(proxy.addr, "/shed", &[]).await;
    assert_eq!(
        (shed.status, shed.cache()),
        (503, "HIT"),
        "the origin said max-age=60"
    );
    get(proxy.addr, "/bin", &[]).await;
    let hit = get(proxy.addr, "/bin", &[]).await;
    assert_eq!(hit.cache(), "HIT");
    assert_eq!(hit.body, Bytes::from((0..=255u8).collect::<Vec<_>>()));
}

/// An origin that answers `good` (revalidatable, immediately stale) once, then 500s.
async fn failing_after_first() -> Origin {
    let n = Arc::new(AtomicUsize::new(0));
    Origin::start(move |_req| {
        let first = n.fetch_add(1, Ordering::SeqCst) == 0;
        async move {
            if first {
                reply(
                    200,
                    &[("cache-control", "max-age=0"), ("etag", "\"g\"")],
                    "good",
                )
            } else {
                reply(500, &[("cache-control", "max-age=60")], "broken")
            }
        }
    })
    .await
}

/// A stored response is never replaced by a server error; with STALE_IF_ERROR_SECS the stale
/// copy is served instead of the error, without it the client sees the upstream status.
#[tokio::test]
async fn server_error_never_replaces_a_stored_response() {
    let origin = failing_after_first().await;
    let strict = ProxyHandle::start(&origin.url(), &[("STALE_RETENTION_SECS", "60")]).await;
    get(strict.addr, "/p", &[]).await;
    assert_eq!(get(strict.addr, "/p", &[]).await.status, 500);
    let kept = strict
        .proxy
        .cache
        .lookup(&strict.key("/p"), &Default::default())
        .unwrap()
        .entry;
    assert_eq!(kept.body(), "good");

    let origin = failing_after_first().await;
    let lenient = ProxyHandle::start(
        &origin.url(),
        &[
            ("STALE_RETENTION_SECS", "60"),
            ("STALE_IF_ERROR_SECS", "60"),
        ],
    )
    .await;
    get(lenient.addr, "/p", &[]).await;
    let stale = get(lenient.addr, "/p", &[]).await;
    assert_eq!(
        (stale.status, stale.cache(), stale.text().as_str()),
        (200, "STALE", "good")
    );
    assert_eq!(origin.hits("/p"), 2, "the revalidation was tried");
}

/// Upstream down → 502; upstream slower than REQ_TIMEOUT → 504.
#[tokio::test]
async fn upstream_down_is_502_and_slow_is_504() {
    let (_reserved, dead) = refused_addr();
    let proxy = ProxyHandle::start(&format!("http://{dead}"), &[]).await;
    assert_eq!(get(proxy.addr, "/x", &[]).await.status, 502);

    let slow = Origin::start(|_req| async {
        tokio::time::sleep(Duration::from_secs(5)).await;
        reply(200, &[], "late")
    })
    .await;
    let proxy = ProxyHandle::start(&slow.url(), &[("REQ_TIMEOUT", "0.3")]).await;
    let started = std::time::Instant::now();
    assert_eq!(get(proxy.addr, "/x", &[]).await.status, 504);
    assert!(started.elapsed() < Duration::from_secs(3));
}

/// HEAD is served from the stored GET response without a body; `Vary` keeps variants apart.
#[tokio::test]
async fn head_and_vary() {
    let origin = Origin::start(|req| async move {
        let lang = req
            .headers()
            .get("accept-language")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("none")
            .to_string();
        reply(
            200,
            &[("cache-control", "max-age=60"), ("vary", "Accept-Language")],
            lang,
        )
    })
    .await;
    let proxy = ProxyHandle::start(&origin.url(), &[]).await;
    let head = send(
        "HEAD",
        proxy.addr,
        "/v",
        &[("accept-language", "de")],
        Bytes::new(),
    )
    .await;
    assert_eq!((head.status, head.body.len()), (200, 0));
    assert_eq!(head.header("content-length"), Some("2"));
    assert_eq!(
        get(proxy.addr, "/v", &[("accept-language", "de")])
            .await
            .cache(),
        "HIT"
    );
    let fr = get(proxy.addr, "/v", &[("accept-language", "fr")]).await;
    assert_eq!((fr.cache(), fr.text().as_str()), ("MISS", "fr"));
    let de = get(proxy.addr, "/v", &[("accept-language", "de")]).await;
    assert_eq!((de.cache(), de.text().as_str()), ("HIT", "de"));
    assert_eq!(origin.hits("/v"), 2);
}

/// Client-supplied X-Forwarded-For is replaced when the peer is not a trusted proxy.
#[tokio::test]
async fn forwarded_headers_come_from_the_connection() {
    let origin = Origin::start(|req| async move {
        let xff = req
            .headers()
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        reply(200, &[("cache-control", "no-store")], xff)
    })
    .await;
    let untrusting = ProxyHandle::start(&origin.url(), &[("TRUSTED_PROXIES", "none")]).await;
    assert_eq!(
        get(untrusting.addr, "/ip", &[("x-forwarded-for", "6.6.6.6")])
            .await
            .text(),
        "127.0.0.1"
    );
    let trusting = ProxyHandle::start(&origin.url(), &[]).await;
    assert_eq!(
        get(trusting.addr, "/ip", &[("x-forwarded-for", "1.2.3.4")])
            .await
            .text(),
        "1.2.3.4, 127.0.0.1"
    );
}

/// A background refresh that fails keeps the stored copy in service and is retried with
/// backoff (1 s, then 2 s, …): clients polling the stale entry do not turn into a stream of
/// upstream attempts, and the new copy lands once the upstream recovers.
#[tokio::test]
async fn failed_refreshes_keep_the_copy_and_back_off() {
    let attempts: Arc<Mutex<Vec<std::time::Instant>>> = Arc::default();
    let seen = attempts.clone();
    let origin = Origin::start(move |_req| {
        let n = {
            let mut seen = seen.lock().unwrap();
            seen.push(std::time::Instant::now());
            seen.len()
        };
        async move {
            match n {
                1 => reply(200, &[], "v1"),
                2 | 3 => reply(500, &[], "down"),
                _ => reply(200, &[], "v2"),
            }
        }
    })
    .await;
    let proxy = expiring(&origin, "0.2", "30").await;
    assert_eq!(get(proxy.addr, "/k", &[]).await.text(), "v1");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut polls = 0;
    loop {
        let got = get(proxy.addr, "/k", &[]).await;
        polls += 1;
        assert_eq!(got.status, 200, "a failed refresh never reaches clients");
        if got.text() == "v2" {
            break;
        }
        assert_eq!(got.text(), "v1");
        assert!(
            std::time::Instant::now() < deadline,
            "the refresh never recovered"
        );
        // A client polling every 20 ms: the backoff's elapsed time is what is under test.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let at = attempts.lock().unwrap().clone();
    assert_eq!(
        at.len(),
        4,
        "{polls} client polls caused no extra upstream attempts"
    );
    assert!(
        at[2] - at[1] >= Duration::from_millis(950),
        "{:?}",
        at[2] - at[1]
    );
    assert!(
        at[3] - at[2] >= Duration::from_millis(1950),
        "{:?}",
        at[3] - at[2]
    );
}
