//! Shutdown of background work: the expiry task, the health probes and the operator listener
//! with its connections run on one cancellation tree, which is cancelled and awaited before
//! `server::serve` and `edgecache::run` return. (Draining client connections, and the
//! daemon's exit codes on SIGTERM, are in `tests/process.rs`.)

mod common;

use std::collections::HashMap;
use std::sync::Arc;

use common::*;
use edgecache::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, Notify};

/// `serve` returns only once the expiry task and a health probe caught in the middle of its
/// request have ended and been dropped: nothing still holds the proxy, nothing is left on
/// its background tree, nothing panicked. The probe's arrival at the origin is the event the
/// test waits for; the origin never answers it.
#[tokio::test]
async fn serve_returns_only_after_the_expiry_task_and_probes_have_ended() {
    let probed = Arc::new(Notify::new());
    let seen = probed.clone();
    let origin = Origin::start(move |req| {
        let seen = seen.clone();
        async move {
            if req.uri().path() == "/health-check" {
                seen.notify_one();
                std::future::pending::<()>().await;
            }
            reply(200, &[], "ok")
        }
    })
    .await;
    let handle = ProxyHandle::start(
        &origin.url(),
        &[
            ("HEALTH_CHECK_INTERVAL_SECS", "0.01"),
            ("HEALTH_CHECK_TIMEOUT_SECS", "600"),
        ],
    )
    .await;
    probed.notified().await;
    let proxy = handle.proxy.clone();
    assert_eq!(proxy.background.len(), 2, "the expiry task and one probe");

    handle.shutdown().await;
    assert!(proxy.background.is_empty());
    assert_eq!(
        Arc::strong_count(&proxy),
        1,
        "a background task still holds the proxy"
    );
    assert_eq!(proxy.background.panicked_in_shutdown(), 0);
}

/// `run` keeps the operator listener up while connections drain and returns `Ok` only once
/// the listener and its open connections are gone: right after it returns the port refuses
/// connections and an idle operator connection is closed.
#[tokio::test]
async fn run_closes_the_operator_listener_and_its_connections_before_returning() {
    let vars: HashMap<&str, &str> = HashMap::from([
        ("UPSTREAM_URL", "http://127.0.0.1:9"),
        ("LISTEN_ADDR", "127.0.0.1:0"),
        ("HEALTH_CHECK_INTERVAL_SECS", "0"),
        ("SHUTDOWN_GRACE_SECS", "5"),
    ]);
    let config = Config::from_lookup(|k| vars.get(k).map(|v| v.to_string())).unwrap();
    let listener = TcpListener::bind(config.listen_addr).await.unwrap();
    let ops = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let ops_addr = ops.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let run = tokio::spawn(edgecache::run(listener, Some(ops), config, None, async {
        let _ = rx.await;
    }));

    // A kept-alive operator connection, idle after one answered request.
    let mut conn = TcpStream::connect(ops_addr).await.unwrap();
    conn.write_all(b"GET /health HTTP/1.1\r\nHost: ops\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !answer.ends_with(b"ok\n") {
        let n = conn.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before answering");
        answer.extend_from_slice(&buf[..n]);
    }
    assert!(answer.starts_with(b"HTTP/1.1 200"));

    let _ = tx.send(());
    assert_eq!(run.await.unwrap(), Ok(()));
    assert!(
        TcpStream::connect(ops_addr).await.is_err(),
        "the operator port still accepts"
    );
    // Closed (EOF, or a reset), not left open: the read does not wait.
    let read = conn.read(&mut buf).await;
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}
