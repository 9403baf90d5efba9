//! The byte budget: the store never exceeds `CACHE_MAX_BYTES`, evicts cold entries before hot
//! ones, and responses above `CACHE_MAX_OBJECT_BYTES` are streamed without being stored —
//! without breaking coalesced waiters.

mod common;

use std::time::Duration;

use common::*;

/// 300 distinct 1 KiB objects through a 64 KiB cache: the accounted size never passes the
/// budget, evictions are counted, and a key requested all along stays cached.
#[tokio::test]
async fn store_stays_within_the_budget_and_keeps_hot_keys() {
    let origin = Origin::start(|_req| async {
        reply(200, &[("cache-control", "max-age=600")], vec![b'x'; 1024])
    })
    .await;
    let proxy = ProxyHandle::start(&origin.url(), &[("CACHE_MAX_BYTES", "64KiB")]).await;
    let store = &proxy.proxy.cache.store;
    for i in 0..300 {
        get(proxy.addr, "/hot", &[]).await;
        assert_eq!(
            get(proxy.addr, &format!("/cold/{i}"), &[]).await.status,
            200
        );
        assert!(store.bytes() <= 64 * 1024, "{} bytes stored", store.bytes());
    }
    assert_eq!(get(proxy.addr, "/hot", &[]).await.cache(), "HIT");
    assert_eq!(origin.hits("/hot"), 1, "the hot key was never evicted");
    assert!(store.len() < 64, "{} entries", store.len());
    let metrics = edgecache::ops::metrics_text(&proxy.proxy);
    let evicted: f64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("edgecache_evictions_total{reason=\"capacity\"} "))
        .unwrap()
        .parse()
        .unwrap();
    assert!(evicted >= 200.0, "{evicted} capacity evictions");
}

/// A body above CACHE_MAX_OBJECT_BYTES is streamed to every client intact and never stored;
/// concurrent waiters each fetch their own copy instead of failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_responses_stream_without_being_stored() {
    let body: Vec<u8> = (0..256 * 1024).map(|i| (i % 253) as u8).collect();
    let expected = body.clone();
    let origin = Origin::start(move |_req| {
        let body = body.clone();
        async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            reply(200, &[("cache-control", "max-age=600")], body)
        }
    })
    .await;
    let proxy = ProxyHandle::start(&origin.url(), &[("CACHE_MAX_OBJECT_BYTES", "64KiB")]).await;
    let clients: Vec<_> = (0..5)
        .map(|_| tokio::spawn(get(proxy.addr, "/big", &[])))
        .collect();
    for c in clients {
        let got = c.await.unwrap();
        assert_eq!(got.status, 200);
        assert!(got.body == expected, "intact body");
    }
    assert_eq!(origin.hits("/big"), 5);
    assert!(proxy.proxy.cache.store.is_empty());
}
