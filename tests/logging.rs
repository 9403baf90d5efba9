//! Issue 11 item 9: requests are logged inside a span per connection (peer) and per request
//! (method, path, client, key); at the default `info` level neither span is created.
//!
//! Alone in its own test binary on purpose: `tracing` caches per call site whether anyone is
//! interested, process-wide, so a thread-local subscriber (`set_default`) in a binary whose
//! other tests run concurrently without one can see the spans' call sites cached as
//! uninteresting. Here one global subscriber is installed before anything logs.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::Layer;

/// A log sink.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

#[tokio::test]
async fn requests_are_logged_in_connection_and_request_spans() {
    // Two outputs of one subscriber: everything at debug, and what the default `info` shows.
    let (debug, info) = (Captured::default(), Captured::default());
    let (d, i) = (debug.clone(), info.clone());
    let subscriber = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(move || d.clone())
                .with_filter(LevelFilter::DEBUG),
        )
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(move || i.clone())
                .with_filter(LevelFilter::INFO),
        );
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let origin = Origin::start(|_req| async { reply(200, &[], "ok") }).await;
    let proxy = ProxyHandle::start(&origin.url(), &[("ALLOWED_HOSTS", "allowed.example")]).await;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(b"GET /x?y=1 HTTP/1.1\r\nhost: other.example\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    let resp = String::from_utf8_lossy(&out);
    assert!(resp.starts_with("HTTP/1.1 421"), "{resp}");
    // The access-log line is written when the response is; wait for it, not for a time.
    assert!(
        eventually(Duration::from_secs(5), || info
            .text()
            .contains("edgecache::access"))
        .await,
        "{}",
        info.text()
    );

    let debug = debug.text();
    let refused = debug
        .lines()
        .find(|l| l.contains("request refused"))
        .unwrap_or_else(|| panic!("{debug}"));
    assert!(refused.contains("connection{peer=127.0.0.1:"), "{refused}");
    assert!(
        refused.contains(
            r#"request{method=GET path="/x?y=1" client=127.0.0.1 key="http://other.example/x?y=1"}"#
        ),
        "{refused}"
    );
    assert!(refused.contains("kind=\"host_not_served\""), "{refused}");
    let info = info.text();
    assert!(
        !info.contains("request{") && !info.contains("connection{"),
        "{info}"
    );
}
