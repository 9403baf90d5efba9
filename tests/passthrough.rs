//! Methods other than GET/HEAD are passed through, streamed both ways, never cached, and a
//! successful unsafe method invalidates the stored entry for its URL.

mod common;

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http::Request;
use http_body_util::channel::Channel;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use sha2::{Digest, Sha256};

/// A 16 MiB POST body is streamed to the upstream: the upstream sees the first chunk before
/// the client has sent the rest, the bytes arrive intact, and nothing is cached.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_post_is_streamed_not_cached_and_invalidates() {
    let received_first = Arc::new(AtomicUsize::new(0));
    let gets = Arc::new(AtomicUsize::new(0));
    let (rf, g) = (received_first.clone(), gets.clone());
    let origin = Origin::start(move |req| {
        let (rf, g) = (rf.clone(), g.clone());
        async move {
            if req.method() == http::Method::GET {
                let v = g.fetch_add(1, Ordering::SeqCst) + 1;
                return reply(200, &[("cache-control", "max-age=600")], format!("v{v}"));
            }
            let mut body = req.into_body();
            let mut hasher = Sha256::new();
            let mut n = 0usize;
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else {
                    return reply(400, &[], "broken body");
                };
                if let Ok(data) = frame.into_data() {
                    n += data.len();
                    hasher.update(&data);
                    rf.store(n, Ordering::SeqCst);
                }
            }
            let digest: String = hasher
                .finalize()
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            reply(
                201,
                &[("cache-control", "max-age=600")],
                format!("{n} {digest}"),
            )
        }
    })
    .await;
    let proxy = ProxyHandle::start(&origin.url(), &[]).await;
    assert_eq!(get(proxy.addr, "/doc", &[]).await.text(), "v1");
    assert_eq!(get(proxy.addr, "/doc", &[]).await.cache(), "HIT");

    let chunk = Bytes::from(
        (0..1024 * 1024)
            .map(|i| (i % 251) as u8)
            .collect::<Vec<u8>>(),
    );
    let mut expected = Sha256::new();
    for _ in 0..16 {
        expected.update(&chunk);
    }
    let expected: String = expected
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();

    let stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let (mut tx, body) = Channel::<Bytes, Infallible>::new(4);
    let req = Request::post("/doc")
        .header("host", proxy.addr.to_string())
        .body(body)
        .unwrap();
    let response = tokio::spawn(async move { sender.send_request(req).await });
    tx.send_data(chunk.clone()).await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), || received_first
            .load(Ordering::SeqCst)
            > 0)
        .await,
        "the upstream received bytes before the client finished: streamed, not buffered"
    );
    for _ in 1..16 {
        tx.send_data(chunk.clone()).await.unwrap();
    }
    drop(tx);
    let resp = response.await.unwrap().unwrap();
    assert_eq!(resp.status(), 201);
    assert_eq!(resp.headers()["x-cache-status"], "BYPASS");
    let text = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(
        String::from_utf8_lossy(&text),
        format!("{} {expected}", 16 * 1024 * 1024)
    );

    let after = get(proxy.addr, "/doc", &[]).await;
    assert_eq!(
        (after.cache(), after.text().as_str()),
        ("MISS", "v2"),
        "the POST invalidated /doc"
    );
    let post_again = send("POST", proxy.addr, "/doc", &[], Bytes::from_static(b"x")).await;
    assert_eq!(
        post_again.status, 201,
        "POST responses are never served from cache"
    );
}

/// A failed unsafe request does not invalidate; DELETE passes through with its status.
#[tokio::test]
async fn failed_unsafe_method_keeps_the_entry() {
    let origin = Origin::start(|req| async move {
        match *req.method() {
            http::Method::GET => reply(200, &[("cache-control", "max-age=600")], "doc"),
            _ => reply(409, &[], "conflict"),
        }
    })
    .await;
    let proxy = ProxyHandle::start(&origin.url(), &[]).await;
    get(proxy.addr, "/d", &[]).await;
    assert_eq!(
        send("DELETE", proxy.addr, "/d", &[], Bytes::new())
            .await
            .status,
        409
    );
    assert_eq!(get(proxy.addr, "/d", &[]).await.cache(), "HIT");
}
