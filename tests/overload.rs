//! Overload: ten times as many clients as `MAX_CONNECTIONS` lets in at once, against the real
//! `edgecache` binary in front of the real `mock-origin`. Most ask for a hot key, some for
//! cold ones (misses through a small byte budget), and hostile connections sit idle or
//! trickle a request head. While it lasts, the proxy keeps serving (slower: new connections
//! wait in the listen backlog), answers nothing with a 5xx, and its memory stays bounded;
//! when the load stops, it serves normally again and its connections drain.
//!
//! Speed is not asserted here (that lives in `bench/overload.sh`); the figures are printed
//! (`cargo test --test overload -- --nocapture`).

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::process::*;
use common::{get, rss_kib};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MAX_CONNECTIONS: usize = 50;
const CLIENTS: usize = 10 * MAX_CONNECTIONS;
const HOSTILE: usize = 50;
const LOAD: Duration = Duration::from_secs(4);
/// Generous bound on the proxy's resident memory under this load (it idles at ~10 MiB).
const RSS_BOUND_KIB: u64 = 256 * 1024;

#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    server_errors: AtomicU64,
    other_status: AtomicU64,
    /// Connects or reads that gave up: the client's own patience, not an answer.
    gave_up: AtomicU64,
}

/// Sends one GET on `s` and reads the response head and its `content-length` body; returns
/// the status, or `None` when the connection closed or broke.
async fn request(s: &mut TcpStream, path: &str, buf: &mut Vec<u8>) -> Option<u16> {
    let req = format!("GET {path} HTTP/1.1\r\nhost: load\r\n\r\n");
    s.write_all(req.as_bytes()).await.ok()?;
    buf.clear();
    let mut chunk = [0u8; 8192];
    loop {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = std::str::from_utf8(&buf[..end]).ok()?;
        let status = head.get(9..12)?.parse().ok()?;
        let len: usize = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().to_owned())
            })
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        while buf.len() < end + 4 + len {
            let n = s.read(&mut chunk).await.ok()?;
            if n == 0 {
                return None;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        return Some(status);
    }
}

/// One well-behaved client: keep-alive requests until `stop`, reconnecting when closed.
async fn client(id: usize, addr: SocketAddr, stop: Arc<AtomicBool>, tally: Arc<Tally>) {
    let mut buf = Vec::with_capacity(4096);
    let mut n = 0usize;
    while !stop.load(Ordering::Relaxed) {
        let Ok(Ok(mut s)) =
            tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await
        else {
            tally.gave_up.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        while !stop.load(Ordering::Relaxed) {
            n += 1;
            // One request in ten is a miss for a key nobody else asks for.
            let path = if n.is_multiple_of(10) {
                format!("/bytes?size=4096&cc=max-age%3D60&k={id}-{n}")
            } else {
                "/bytes?size=1024&cc=max-age%3D60".to_owned()
            };
            match tokio::time::timeout(Duration::from_secs(10), request(&mut s, &path, &mut buf))
                .await
            {
                Ok(Some(200)) => tally.ok.fetch_add(1, Ordering::Relaxed),
                Ok(Some(status)) if status >= 500 => {
                    tally.server_errors.fetch_add(1, Ordering::Relaxed)
                }
                Ok(Some(_)) => tally.other_status.fetch_add(1, Ordering::Relaxed),
                Ok(None) => break, // closed (keep-alive timeout): reconnect
                Err(_) => {
                    tally.gave_up.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            };
        }
    }
}

/// A hostile connection: half of them never send anything, the other half trickle a
/// request head one byte at a time.
async fn hostile(i: usize, addr: SocketAddr, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        let Ok(Ok(mut s)) =
            tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await
        else {
            continue;
        };
        if i.is_multiple_of(2) {
            let mut sink = [0u8; 64];
            let _ = tokio::time::timeout(Duration::from_secs(10), s.read(&mut sink)).await;
        } else {
            for b in b"GET /slow HTTP/1.1\r\nhost: x\r\nx-a: aaaaaaaaaaaaaaaaaaaaaaa" {
                if stop.load(Ordering::Relaxed) || s.write_all(&[*b]).await.is_err() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Sequential requests on fresh connections until `n` in a row succeed within `each`.
async fn serves_normally(addr: SocketAddr, n: usize, each: Duration) -> bool {
    let mut buf = Vec::new();
    for _ in 0..n {
        let one = async {
            let mut s = TcpStream::connect(addr).await.ok()?;
            request(&mut s, "/bytes?size=1024&cc=max-age%3D60", &mut buf).await
        };
        if !matches!(tokio::time::timeout(each, one).await, Ok(Some(200))) {
            return false;
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_times_the_connection_limit_degrades_and_recovers() {
    let origin = MockOrigin::start();
    let dir = TempDir::new("overload");
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let max = MAX_CONNECTIONS.to_string();
    let ops = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut proxy = Edgecache::start(
        &dir,
        &[
            ("UPSTREAM_URL", origin.url.as_str()),
            ("LISTEN_ADDR", &addr.to_string()),
            ("MAX_CONNECTIONS", &max),
            ("CACHE_MAX_BYTES", "2MiB"),
            ("HEADER_READ_TIMEOUT_SECS", "1"),
            ("KEEPALIVE_TIMEOUT_SECS", "2"),
            ("OPS_LISTEN_ADDR", &ops.to_string()),
            ("RUST_LOG", "error"),
        ],
        addr,
    )
    .await;
    let pid = proxy.child.0.id().to_string();
    assert!(serves_normally(addr, 20, Duration::from_secs(2)).await);
    let rss_before = rss_kib(&pid);

    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let mut tasks = Vec::new();
    for id in 0..CLIENTS {
        tasks.push(tokio::spawn(client(id, addr, stop.clone(), tally.clone())));
    }
    for i in 0..HOSTILE {
        tasks.push(tokio::spawn(hostile(i, addr, stop.clone())));
    }
    let started = Instant::now();
    let mut rss_peak = 0;
    while started.elapsed() < LOAD {
        rss_peak = rss_peak.max(rss_kib(&pid));
        assert!(
            proxy.child.0.try_wait().unwrap().is_none(),
            "the proxy process died under load"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let served_under_load = tally.ok.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.abort();
    }
    let load_secs = started.elapsed().as_secs_f64();

    // Recovery: normal service on fresh connections, and the load's connections all closed.
    assert!(
        serves_normally_eventually(addr).await,
        "the proxy did not recover after the load stopped"
    );
    let open = open_connections_eventually(ops, 1).await;
    assert!(
        open <= 1,
        "{open} connections still open after the load stopped"
    );
    let rss_after = rss_kib(&pid);
    let server_errors = tally.server_errors.load(Ordering::Relaxed);
    println!(
        "overload: {CLIENTS} clients + {HOSTILE} hostile connections against MAX_CONNECTIONS={MAX_CONNECTIONS} for {load_secs:.1} s: \
         {served_under_load} responses 200 ({:.0}/s), {server_errors} 5xx, {} other statuses, {} client give-ups; \
         RSS before {} KiB, peak {rss_peak} KiB, after {rss_after} KiB",
        served_under_load as f64 / load_secs,
        tally.other_status.load(Ordering::Relaxed),
        tally.gave_up.load(Ordering::Relaxed),
        rss_before,
    );
    assert_eq!(server_errors, 0, "the proxy answered 5xx under load");
    assert_eq!(tally.other_status.load(Ordering::Relaxed), 0);
    assert!(served_under_load > 0, "nothing was served under load");
    assert!(rss_peak < RSS_BOUND_KIB, "RSS peaked at {rss_peak} KiB");
    assert!(proxy.child.0.try_wait().unwrap().is_none());
}

/// Polls `/metrics` until at most `want` client connections are open (or a deadline passes);
/// returns the last count seen.
async fn open_connections_eventually(ops: SocketAddr, want: i64) -> i64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let metrics = get(ops, "/metrics", &[]).await.text();
        let open = metrics
            .lines()
            .find_map(|l| l.strip_prefix("edgecache_open_connections "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(i64::MAX);
        if open <= want || Instant::now() >= deadline {
            return open;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls until a run of sequential requests is served normally, up to a deadline.
async fn serves_normally_eventually(addr: SocketAddr) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if serves_normally(addr, 20, Duration::from_secs(1)).await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}
