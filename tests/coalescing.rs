//! Single flight: concurrent misses for one key send one upstream request, followers are
//! woken by notification with the same response, a disconnecting leader does not hurt them,
//! and unshareable responses are never handed to followers.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use tokio::io::AsyncWriteExt;

/// 200 concurrent cold requests → exactly one upstream request, 200 identical bodies.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_cold_requests_make_one_upstream_request() {
    let gate = Gate::new();
    let origin = Origin::start_behind(&gate, |_req| async {
        reply(200, &[("cache-control", "max-age=60")], vec![7u8; 4096])
    })
    .await;
    let proxy = ProxyHandle::start(&origin.url(), &[]).await;
    let tasks: Vec<_> = (0..200)
        .map(|_| tokio::spawn(get(proxy.addr, "/hot?x=1", &[])))
        .collect();
    // The fetch is held until every other request waits on it.
    assert!(proxy.followers(199).await, "199 followers joined");
    gate.open();
    let mut bodies = Vec::new();
    for t in tasks {
        let got = t.await.unwrap();
        assert_eq!(got.status, 200);
        bodies.push(got.body);
    }
    assert_eq!(
        origin.hits("/hot?x=1"),
        1,
        "one upstream request for 200 clients"
    );
    assert!(bodies.iter().all(|b| b == &bodies[0] && b.len() == 4096));
}

/// The leader's client hangs up mid-fetch: the fetch completes, followers get the response
/// and the entry is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_disconnect_does_not_fail_followers() {
    let gate = Gate::new();
    let origin = Origin::start_behind(&gate, |_req| async {
        reply(200, &[("cache-control", "max-age=60")], "payload")
    })
    .await;
    let proxy = ProxyHandle::start(&origin.url(), &[]).await;

    let mut leader = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    leader
        .write_all(format!("GET /slow HTTP/1.1\r\nhost: {}\r\n\r\n", proxy.addr).as_bytes())
        .await
        .unwrap();
    assert!(
        origin
            .wait_until(Duration::from_secs(5), |o| o.started.load(Ordering::SeqCst)
                == 1)
            .await
    );
    let followers: Vec<_> = (0..5)
        .map(|_| tokio::spawn(get(proxy.addr, "/slow", &[])))
        .collect();
    assert!(proxy.followers(5).await, "5 followers joined");
    drop(leader);
    // Give the proxy the hang-up before the fetch can answer: it must carry on regardless.
    assert!(
        eventually(Duration::from_secs(5), || proxy
            .metrics()
            .contains("edgecache_open_connections 5"))
        .await,
        "{}",
        proxy.metrics()
    );
    gate.open();
    for f in followers {
        let got = f.await.unwrap();
        assert_eq!((got.status, got.text().as_str()), (200, "payload"));
    }
    assert_eq!(origin.hits("/slow"), 1);
    assert_eq!(get(proxy.addr, "/slow", &[]).await.cache(), "HIT");
}

/// A `private` response is given to the leader only: every follower fetches its own copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unshareable_response_is_not_handed_to_followers() {
    let n = Arc::new(AtomicUsize::new(0));
    let gate = Gate::new();
    let origin = Origin::start_behind(&gate, move |_req| {
        let i = n.fetch_add(1, Ordering::SeqCst);
        async move {
            reply(
                200,
                &[("cache-control", "private, max-age=60")],
                format!("user-{i}"),
            )
        }
    })
    .await;
    let proxy = ProxyHandle::start(&origin.url(), &[]).await;
    let tasks: Vec<_> = (0..5)
        .map(|_| tokio::spawn(get(proxy.addr, "/me", &[])))
        .collect();
    // Four wait on the first fetch before it answers.
    assert!(proxy.followers(4).await, "4 followers joined");
    gate.open();
    let mut bodies = Vec::new();
    for t in tasks {
        bodies.push(t.await.unwrap().text());
    }
    bodies.sort();
    bodies.dedup();
    assert_eq!(
        bodies.len(),
        5,
        "each client got its own private response: {bodies:?}"
    );
    assert_eq!(origin.hits("/me"), 5);
}

/// Upstream failure: every coalesced waiter gets the same error status.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_waiter_gets_the_same_timeout() {
    let origin = Origin::start(|_req| async {
        // Never in time: the upstream answer comes long after REQ_TIMEOUT.
        tokio::time::sleep(Duration::from_secs(30)).await;
        reply(200, &[], "late")
    })
    .await;
    // Long enough that all 20 clients join the one flight before it times out even on a
    // loaded machine (joining takes milliseconds); short enough for a quick test.
    let proxy = ProxyHandle::start(&origin.url(), &[("REQ_TIMEOUT", "2")]).await;
    let tasks: Vec<_> = (0..20)
        .map(|_| tokio::spawn(get(proxy.addr, "/slow", &[])))
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap().status, 504);
    }
    assert_eq!(origin.hits("/slow"), 1);
}
