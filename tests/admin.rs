//! The admin protocol: `Clear-Cache` + `Clear-Cache-Key` requests clear or refresh entries,
//! are never forwarded upstream, and are refused without the right key.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use common::*;

/// Every version stored for ten minutes.
async fn stored_versions() -> Origin {
    versioned_origin(&[("cache-control", "max-age=600")]).await
}

/// A wrong or missing key → 401, the request never reaches the upstream, the entry stays.
#[tokio::test]
async fn wrong_or_missing_key_is_refused_and_not_forwarded() {
    let origin = stored_versions().await;
    let proxy = ProxyHandle::start(&origin.url(), &[]).await;
    get(proxy.addr, "/t/1", &[]).await;
    for headers in [
        vec![("clear-cache", "true"), ("clear-cache-key", "wrong")],
        vec![("clear-cache", "clear")],
        vec![("clear-cache", "clear"), ("clear-cache-key", "")],
    ] {
        let got = admin(&proxy, "/t/1", &headers).await;
        assert_eq!(got.status, 401);
        assert!(!got.text().contains("wrong"), "the key is never echoed");
    }
    assert_eq!(origin.total(), 1, "admin requests are never forwarded");
    let hit = get(proxy.addr, "/t/1", &[]).await;
    assert_eq!((hit.cache(), hit.text().as_str()), ("HIT", "v1"));
}

/// Without CLEAR_CACHE_KEY the admin path is disabled: 403.
#[tokio::test]
async fn admin_is_disabled_without_a_key() {
    let origin = stored_versions().await;
    let proxy = ProxyHandle::start(&origin.url(), &[("CLEAR_CACHE_KEY", "")]).await;
    let got = admin(
        &proxy,
        "/t/1",
        &[("clear-cache", "true"), ("clear-cache-key", "")],
    )
    .await;
    assert_eq!(got.status, 403);
    assert_eq!(origin.total(), 0);
}

/// `clear` drops the entry now; `refresh` refetches it now; unknown paths report not_cached.
#[tokio::test]
async fn clear_and_refresh_modes() {
    let origin = stored_versions().await;
    let proxy = ProxyHandle::start(&origin.url(), &[]).await;
    let key = [("clear-cache-key", "Secret")];

    get(proxy.addr, "/a?x=1", &[]).await;
    let got = admin(&proxy, "/a?x=1", &[key[0], ("clear-cache", "refresh")]).await;
    assert_eq!(got.status, 200);
    assert!(
        got.text().contains(r#""action":"refreshed""#),
        "{}",
        got.text()
    );
    let hit = get(proxy.addr, "/a?x=1", &[]).await;
    assert_eq!(
        (hit.cache(), hit.text().as_str()),
        ("HIT", "v2"),
        "refreshed in place"
    );

    let got = admin(&proxy, "/a?x=1", &[key[0], ("clear-cache", "clear")]).await;
    assert!(
        got.text().contains(r#""action":"cleared""#),
        "{}",
        got.text()
    );
    let miss = get(proxy.addr, "/a?x=1", &[]).await;
    assert_eq!((miss.cache(), miss.text().as_str()), ("MISS", "v3"));

    let got = admin(&proxy, "/never", &[key[0], ("clear-cache", "clear")]).await;
    assert!(
        got.text().contains(r#""action":"not_cached""#),
        "{}",
        got.text()
    );
}

/// `Clear-Cache: true` follows the refresh window: a recently requested entry is refreshed,
/// otherwise it is cleared.
#[tokio::test]
async fn window_mode_refreshes_hot_and_clears_cold() {
    let origin = stored_versions().await;
    let hot = ProxyHandle::start(&origin.url(), &[("DEFAULT_REFRESH_WINDOW_SECS", "60")]).await;
    get(hot.addr, "/w", &[]).await;
    let got = admin(
        &hot,
        "/w",
        &[("clear-cache", "True"), ("clear-cache-key", "Secret")],
    )
    .await;
    assert!(got.text().contains("refreshed"), "{}", got.text());
    assert_eq!(get(hot.addr, "/w", &[]).await.cache(), "HIT");

    let cold = ProxyHandle::start(&origin.url(), &[("DEFAULT_REFRESH_WINDOW_SECS", "0")]).await;
    get(cold.addr, "/w", &[]).await;
    let got = admin(
        &cold,
        "/w",
        &[("clear-cache", "True"), ("clear-cache-key", "Secret")],
    )
    .await;
    assert!(got.text().contains("cleared"), "{}", got.text());
    assert_eq!(get(cold.addr, "/w", &[]).await.cache(), "MISS");
}

/// Prefix and everything scopes.
#[tokio::test]
async fn prefix_and_all_scopes() {
    let origin = stored_versions().await;
    let proxy = ProxyHandle::start(&origin.url(), &[]).await;
    for p in ["/trades/1", "/trades/2", "/assets/1"] {
        get(proxy.addr, p, &[]).await;
    }
    let key = ("clear-cache-key", "Secret");
    let got = admin(
        &proxy,
        "/trades/",
        &[
            key,
            ("clear-cache", "clear"),
            ("clear-cache-scope", "prefix"),
        ],
    )
    .await;
    assert!(got.text().contains(r#""cleared":2"#), "{}", got.text());
    assert_eq!(get(proxy.addr, "/trades/1", &[]).await.cache(), "MISS");
    assert_eq!(get(proxy.addr, "/assets/1", &[]).await.cache(), "HIT");
    let got = admin(
        &proxy,
        "/",
        &[key, ("clear-cache", "clear"), ("clear-cache-scope", "all")],
    )
    .await;
    assert!(got.text().contains(r#""cleared":2"#), "{}", got.text());
    assert!(proxy.proxy.cache.is_empty());
    let bad = admin(
        &proxy,
        "/",
        &[
            key,
            ("clear-cache", "clear"),
            ("clear-cache-scope", "everything"),
        ],
    )
    .await;
    assert_eq!(bad.status, 400);
}

/// A refresh that fails (upstream timeout) keeps the previous copy and says so.
#[tokio::test]
async fn failed_refresh_keeps_the_previous_copy() {
    let n = Arc::new(AtomicUsize::new(0));
    let origin = Origin::start(move |_req| {
        let first = n.fetch_add(1, Ordering::SeqCst) == 0;
        async move {
            if !first {
                tokio::time::sleep(std::time::Duration::from_secs(5)).await;
            }
            reply(200, &[("cache-control", "max-age=600")], "good")
        }
    })
    .await;
    let proxy = ProxyHandle::start(&origin.url(), &[("REQ_TIMEOUT", "0.3")]).await;
    get(proxy.addr, "/r", &[]).await;
    let got = admin(
        &proxy,
        "/r",
        &[("clear-cache", "refresh"), ("clear-cache-key", "Secret")],
    )
    .await;
    assert_eq!(got.status, 504, "{}", got.text());
    assert!(
        got.text().contains("refresh_failed") && got.text().contains("previous"),
        "{}",
        got.text()
    );
    let hit = get(proxy.addr, "/r", &[]).await;
    assert_eq!((hit.cache(), hit.text().as_str()), ("HIT", "good"));
}
