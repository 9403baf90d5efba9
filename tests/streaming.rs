//! Streaming single flight (issue 12): a coalesced fetch is shared with its followers as it
//! arrives — headers at once, then each chunk — whether or not it will be stored.
//!
//! Covered: one upstream request for 50 clients of a response too large to store; a storable
//! response whose followers get their first bytes before it is complete (then stored); an
//! upstream reset mid-body (every client sees an incomplete response, nothing is stored, the
//! next request fetches again); a follower that stops reading is cut off within
//! `STREAM_BUFFER_BYTES` while the others complete (`edgecache_stream_cutoffs_total`); the
//! daemon's peak memory with 50 followers of a 64 MiB body; HEAD, `If-None-Match` and `Range`
//! followers; unshareable responses (each waiter fetches its own, learnt from the leader's
//! headers); `Cache-Status: …; collapsed`; a late joiner of a storable response; the fetch
//! outliving the client that started it; the upstream connection released once every reader
//! is gone.
//!
//! The origin here is raw HTTP/1.1 over TCP (one response per connection, `connection:
//! close`), so a test scripts exactly when the headers and each byte go out and when the
//! connection drops. The clients are raw too: a test sees the first body byte as it arrives,
//! and tells a complete body from one cut short (EOF before `Content-Length`, or a chunked
//! body without its last chunk; `raw_client_tells_complete_bodies_from_cut_ones` checks it
//! does). Bodies are checked byte for byte against the pattern they were cut from as they
//! stream, without being kept (stronger than comparing digests, and cheap in a debug build).
//! No fixed sleeps: tests wait on gates, on requests reaching the origin and on metrics, each
//! with a deadline, and every test runs under a timeout.

mod common;

use std::fmt;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use common::process::{Edgecache, TempDir};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

/// How long a test waits for something that takes milliseconds when it works.
const WAIT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

/// 50 concurrent clients of a 16 MiB response, over `CACHE_MAX_OBJECT_BYTES` (8 MiB): one
/// upstream request, 50 complete and correct bodies, nothing stored (the next request goes
/// upstream again, a MISS).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_large_response_is_fetched_once_and_streamed_to_fifty_clients() {
    within(180, async {
        let body = pattern(16 * MIB);
        let gate = Gate::new();
        let origin = RawOrigin::serving(Serve::new(CACHEABLE, &body).headers_after(&gate)).await;
        let proxy = start_proxy(&origin, &[("CACHE_MAX_OBJECT_BYTES", "8MiB")]).await;
        let addr = proxy.addr;
        let clients = herd(&proxy, &origin, 50, |_| {
            let body = body.clone();
            tokio::spawn(async move { fetch(addr, "GET", "/big", &[], Some(body)).await })
        })
        .await;
        gate.open();
        for (i, client) in clients.into_iter().enumerate() {
            let got = client.await.unwrap();
            assert_complete(&got, &body, &format!("client {i}"));
            assert_eq!(got.cache(), "MISS", "client {i}: {got:?}");
        }
        assert_eq!(origin.count(), 1, "upstream requests for 50 clients");
        assert!(
            proxy.proxy.cache.is_empty(),
            "a response over CACHE_MAX_OBJECT_BYTES is not stored"
        );
        flights_ended(&proxy).await;
        let again = fetch(addr, "GET", "/big", &[], Some(body.clone())).await;
        assert_complete(&again, &body, "the next request");
        assert_eq!(again.cache(), "MISS", "{again:?}");
        assert_eq!(origin.count(), 2, "the next request went upstream again");
    })
    .await;
}

/// 50 clients of a storable 6 MiB response: one upstream request, and every client has its
/// first body bytes while the origin still holds the rest of the body (asserted on event
/// order: the rest is released only after all 50 had bytes). Then all bodies complete, and the
/// response is stored: the next request is a HIT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storable_response_reaches_followers_before_it_is_complete() {
    within(120, async {
        let body = pattern(6 * MIB);
        let (head, rest) = (Gate::new(), Gate::new());
        let serve = Serve::new(CACHEABLE, &body)
            .headers_after(&head)
            .first(64 * KIB)
            .rest_after(&rest);
        let origin = RawOrigin::serving(serve).await;
        let proxy = start_proxy(&origin, &[]).await;
        let addr = proxy.addr;
        let had_bytes = Arc::new(AtomicUsize::new(0));
        let clients = herd(&proxy, &origin, 50, |_| {
            let (body, had_bytes) = (body.clone(), had_bytes.clone());
            tokio::spawn(async move {
                let mut reply = match Reply::open(addr, "GET", "/six", &[]).await {
                    Ok(reply) => reply.expect(body),
                    Err(e) => return Received::failed(e),
                };
                if let Ok(Some(_)) = reply.next().await {
                    had_bytes.fetch_add(1, Ordering::SeqCst);
                }
                reply.finish().await
            })
        })
        .await;
        head.open();
        let all = eventually(WAIT, || had_bytes.load(Ordering::SeqCst) == 50).await;
        assert!(
            all,
            "only {} of 50 clients had body bytes while the origin held all but the first 64 KiB \
             of the body (followers must be streamed to, not answered once the body is complete)",
            had_bytes.load(Ordering::SeqCst)
        );
        assert_eq!(origin.count(), 1, "upstream requests for 50 clients");
        rest.open();
        for (i, client) in clients.into_iter().enumerate() {
            let got = client.await.unwrap();
            assert_complete(&got, &body, &format!("client {i}"));
            assert_eq!(got.cache(), "MISS", "client {i}: {got:?}");
        }
        stored(&proxy).await;
        let next = fetch(addr, "GET", "/six", &[], Some(body.clone())).await;
        assert_complete(&next, &body, "the next request");
        assert_eq!(next.cache(), "HIT", "stored once complete: {next:?}");
        assert_eq!(origin.count(), 1);
    })
    .await;
}

/// The origin declares 6 MiB (a storable response) and resets the connection after 3 MiB:
/// every client's response is visibly incomplete (an error status, or a body cut off before
/// its Content-Length / last chunk), nothing is stored, and the next request starts a new
/// upstream fetch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_reset_mid_body_fails_every_client_and_stores_nothing() {
    within(60, async {
        let body = pattern(6 * MIB);
        let gate = Gate::new();
        let origin = {
            let (body, gate) = (body.clone(), gate.clone());
            RawOrigin::start(move |arrival, mut conn| {
                let (body, gate) = (body.clone(), gate.clone());
                async move {
                    if arrival.n == 1 {
                        gate.pass().await;
                        let _ = conn.head(200, CACHEABLE, body.len()).await;
                        let _ = conn.send(&body[..3 * MIB]).await;
                        conn.reset();
                    } else {
                        let _ = conn.head(200, CACHEABLE, body.len()).await;
                        let _ = conn.send(&body).await;
                    }
                }
            })
            .await
        };
        let proxy = start_proxy(&origin, &[]).await;
        let addr = proxy.addr;
        let clients = herd(&proxy, &origin, 10, |_| {
            let body = body.clone();
            tokio::spawn(async move { fetch(addr, "GET", "/reset", &[], Some(body)).await })
        })
        .await;
        gate.open();
        for (i, client) in clients.into_iter().enumerate() {
            let got = client.await.unwrap();
            println!("client {i}: {got:?}");
            assert!(
                got.status >= 500 || (got.status == 200 && got.end.is_err()),
                "client {i} must see an error status or a body that ends in an error, \
                 never one that looks complete: {got:?}"
            );
            if got.status == 200 {
                assert_eq!(got.mismatch, None, "client {i}: the bytes it got are right");
            }
        }
        assert!(
            proxy.proxy.cache.is_empty(),
            "a body cut short is never stored"
        );
        flights_ended(&proxy).await;
        let next = fetch(addr, "GET", "/reset", &[], Some(body.clone())).await;
        assert_complete(&next, &body, "the next request");
        assert_eq!(next.cache(), "MISS", "{next:?}");
        assert_eq!(origin.count(), 2, "the next request started a new flight");
    })
    .await;
}

/// A follower that sends its request and never reads, on a 64 MiB response that is not stored
/// (`CACHE_MAX_OBJECT_BYTES=1MiB`), with `STREAM_BUFFER_BYTES=4MiB`: it is cut off (its
/// connection ends before the Content-Length; counted in `edgecache_stream_cutoffs_total`),
/// the leader and the three other followers get the whole body, from one upstream request.
/// 64 MiB is far more than the bound plus what the kernel's loopback buffers can hold (a few
/// MiB; the stalled client's receive buffer is also made small). The bound is 4 MiB rather
/// than less so that a reading client briefly descheduled on a loaded 2-core machine is not
/// mistaken for one that stopped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_that_stops_reading_is_cut_off_and_the_others_complete() {
    within(180, async {
        let body = pattern(64 * MIB);
        let gate = Gate::new();
        // The origin sends 256 KiB at a time, each once every reading client has what came
        // before: the readers are never more than 512 KiB apart, far inside the 4 MiB bound,
        // however the machine schedules them; only the stalled one falls behind.
        let pace = Pace::new(5);
        pace.skip(2);
        let origin = RawOrigin::serving(
            Serve::new(CACHEABLE, &body)
                .headers_after(&gate)
                .paced(&pace, 256 * KIB),
        )
        .await;
        let proxy = start_proxy(
            &origin,
            &[
                ("CACHE_MAX_OBJECT_BYTES", "1MiB"),
                ("STREAM_BUFFER_BYTES", "4MiB"),
            ],
        )
        .await;
        let addr = proxy.addr;
        let mut stalled = None;
        let readers = herd(&proxy, &origin, 5, |i| {
            if i == 2 {
                // The stalled follower: its request is sent here, its task only waits.
                let (tx, rx) = oneshot::channel();
                stalled = Some(rx);
                tokio::spawn(async move {
                    let _ = tx.send(send_stalled(addr, "/huge").await);
                    Received::failed("stalled".into())
                })
            } else {
                tokio::spawn(fetch_paced(addr, "/huge", body.clone(), &pace, i))
            }
        })
        .await;
        let stalled = stalled.unwrap().await.unwrap();
        gate.open();
        for (i, reader) in readers.into_iter().enumerate() {
            let got = reader.await.unwrap();
            if i != 2 {
                assert_complete(&got, &body, &format!("reading client {i}"));
            }
        }
        let cut_off = eventually(WAIT, || {
            series(&proxy.metrics(), "edgecache_stream_cutoffs_total").unwrap_or(0.0) >= 1.0
        })
        .await;
        assert!(
            cut_off,
            "edgecache_stream_cutoffs_total >= 1 expected; flight metrics:\n{}",
            flight_metrics(&proxy)
        );
        // Now read what the stalled follower was sent: it must end early, visibly.
        let got = tokio::time::timeout(WAIT, async {
            match Reply::read(stalled, "GET").await {
                Ok(reply) => reply.expect(body.clone()).finish().await,
                Err(e) => Received::failed(e),
            }
        })
        .await
        .expect("the stalled follower's connection was closed (reading it reached its end)");
        println!("stalled follower: {got:?}");
        assert!(
            got.end.is_err() && got.len < body.len() as u64,
            "the stalled follower was cut off before the end of the body: {got:?}"
        );
        assert_eq!(got.mismatch, None, "what it got before the cut is right");
        assert_eq!(origin.count(), 1, "upstream requests for 5 clients");
    })
    .await;
}

/// The global bound: two flights of a 48 MiB response that is not stored, each with a
/// reading leader and a follower that never reads. `STREAM_BUFFER_BYTES=64MiB` never binds a
/// single flight (its whole body fits), but `STREAM_BUFFER_TOTAL_BYTES=64MiB` cannot hold
/// both stalled followers' backlogs (~2 x 48 MiB): at least one of them is cut off, counted in
/// `edgecache_stream_cutoffs_total`, and both readers complete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_followers_of_two_flights_are_cut_off_at_the_global_bound() {
    within(180, async {
        let body = pattern(48 * MIB);
        let gate = Gate::new();
        let origin = RawOrigin::serving(Serve::new(CACHEABLE, &body).headers_after(&gate)).await;
        let proxy = start_proxy(
            &origin,
            &[
                ("CACHE_MAX_OBJECT_BYTES", "1MiB"),
                ("STREAM_BUFFER_BYTES", "64MiB"),
                ("STREAM_BUFFER_TOTAL_BYTES", "64MiB"),
            ],
        )
        .await;
        let addr = proxy.addr;
        let mut readers = Vec::new();
        let mut stalled = Vec::new();
        for path in ["/one", "/two"] {
            let (tx, rx) = oneshot::channel();
            let mut tx = Some(tx);
            let mut flight = herd(&proxy, &origin, 2, |i| {
                let body = body.clone();
                let tx = if i == 1 { tx.take() } else { None };
                tokio::spawn(async move {
                    match tx {
                        Some(tx) => {
                            let _ = tx.send(send_stalled(addr, path).await);
                            Received::failed("stalled".into())
                        }
                        None => fetch(addr, "GET", path, &[], Some(body)).await,
                    }
                })
            })
            .await;
            stalled.push(rx.await.unwrap());
            readers.push(flight.remove(0));
        }
        gate.open();
        for (i, reader) in readers.into_iter().enumerate() {
            assert_complete(&reader.await.unwrap(), &body, &format!("reader {i}"));
        }
        let cut_off = eventually(WAIT, || {
            series(&proxy.metrics(), "edgecache_stream_cutoffs_total").unwrap_or(0.0) >= 1.0
        })
        .await;
        assert!(
            cut_off,
            "edgecache_stream_cutoffs_total >= 1 expected; flight metrics:\n{}",
            flight_metrics(&proxy)
        );
        let mut cut = 0;
        for (i, stream) in stalled.into_iter().enumerate() {
            let got = tokio::time::timeout(WAIT, async {
                match Reply::read(stream, "GET").await {
                    Ok(reply) => reply.expect(body.clone()).finish().await,
                    Err(e) => Received::failed(e),
                }
            })
            .await
            .expect("a stalled follower's response ends, cut off or complete, once read");
            println!("stalled follower {i}: {got:?}");
            assert_eq!(got.mismatch, None, "stalled follower {i}: {got:?}");
            if got.end.is_err() {
                cut += 1;
            } else {
                assert_complete(&got, &body, &format!("stalled follower {i}"));
            }
        }
        assert!(cut >= 1, "at least one stalled follower was cut off");
        assert_eq!(origin.count(), 2, "one upstream request per flight");
    })
    .await;
}

/// Peak memory of the real daemon while 50 followers read a 64 MiB response that is not
/// stored, with `STREAM_BUFFER_BYTES=8MiB`: VmHWM stays within the baseline (VmHWM after
/// start-up and one small request) + the 8 MiB bound + 32 MiB. The readers are paced (the
/// origin sends each MiB once all 50 have the one before), so none is cut off and what is
/// held is the body's start kept for late joiners (up to the bound), then what the readers
/// have not all read. The constant covers what is not the shared buffer: the 50 client
/// connections' hyper buffers (capped at MAX_HEADER_BYTES, 64 KiB, each: ~3 MiB), the
/// upstream connection's read buffer (~400 KiB), tasks, and the allocator's retained pages.
/// Measured: +20 to +25 MiB (debug build); the code before streaming single flight (50
/// separate upstream streams) measured +47 to +85 MiB here; pieces of any size up to 400 KiB
/// instead of 64 KiB ones measured +40 to +54 MiB (allocator fragmentation). The numbers are
/// printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_followers_of_a_64_mib_body_stay_within_the_stream_buffer() {
    within(300, async {
        let body = pattern(64 * MIB);
        let gate = Gate::new();
        // Paced by the slowest of the 50 readers (1 MiB steps): they stay within 2 MiB of
        // each other whatever the scheduling, so none is cut off by the 8 MiB bound.
        let pace = Pace::new(50);
        let origin = {
            let serve = Serve::new(CACHEABLE, &body)
                .headers_after(&gate)
                .paced(&pace, MIB);
            RawOrigin::start(move |arrival, conn| {
                let serve = serve.clone();
                async move {
                    if arrival.target == "/warm" {
                        let mut conn = conn;
                        let _ = conn.head(200, &[("cache-control", "no-store")], 2).await;
                        let _ = conn.send(b"ok").await;
                    } else {
                        serve.run(conn).await;
                    }
                }
            })
            .await
        };
        let dir = TempDir::new("streaming-rss");
        let url = origin.url();
        let daemon = Edgecache::start(
            &dir,
            &[
                ("UPSTREAM_URL", url.as_str()),
                ("CACHE_MAX_OBJECT_BYTES", "8MiB"),
                ("STREAM_BUFFER_BYTES", "8MiB"),
                ("REQ_TIMEOUT", "120"),
                ("DEFAULT_REFRESH_WINDOW_SECS", "0"),
                ("RUST_LOG", "warn"),
            ],
        )
        .await;
        let pid = daemon.child.0.id().to_string();
        let addr = daemon.addr;
        let warm = fetch(addr, "GET", "/warm", &[], None).await;
        assert_eq!((warm.status, warm.len), (200, 2), "{warm:?}");
        let baseline = proc_status_kib(&pid, "VmHWM");
        assert!(baseline > 0, "VmHWM of the daemon is readable");

        let ops = daemon.ops();
        let coalesced = || async move {
            series(
                &get(ops, "/metrics", &[]).await.text(),
                "edgecache_coalesced_requests_total",
            )
            .unwrap_or(0.0)
        };
        let mut clients = vec![tokio::spawn(fetch_paced(
            addr,
            "/huge",
            body.clone(),
            &pace,
            0,
        ))];
        assert!(
            origin.wait_for(2, WAIT).await,
            "the leader's request reached the origin"
        );
        for i in 1..50 {
            clients.push(tokio::spawn(fetch_paced(
                addr,
                "/huge",
                body.clone(),
                &pace,
                i,
            )));
        }
        let deadline = Instant::now() + WAIT;
        while coalesced().await < 49.0 {
            assert!(
                Instant::now() < deadline,
                "49 followers did not join within {WAIT:?}: {} did",
                coalesced().await
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let started = Instant::now();
        gate.open();
        let mut results = Vec::new();
        for client in clients {
            results.push(client.await.unwrap());
        }
        let secs = started.elapsed().as_secs_f64();
        let peak = proc_status_kib(&pid, "VmHWM");
        let metrics = get(ops, "/metrics", &[]).await.text();
        let bound_kib = (8 * MIB / KIB) as u64;
        let slack_kib = (32 * MIB / KIB) as u64;
        println!(
            "50 x 64 MiB in {secs:.1} s; daemon VmHWM: baseline {} KiB, peak {} KiB \
             (+{} MiB; allowed +{} MiB = bound 8 + slack 32); upstream requests: {}; \
             cutoffs: {:?}",
            baseline,
            peak,
            peak.saturating_sub(baseline) / 1024,
            (bound_kib + slack_kib) / 1024,
            origin.hits("/huge"),
            series(&metrics, "edgecache_stream_cutoffs_total"),
        );
        assert!(
            peak <= baseline + bound_kib + slack_kib,
            "daemon peak RSS {peak} KiB exceeds baseline {baseline} KiB + 8 MiB + 32 MiB"
        );
        for (i, got) in results.iter().enumerate() {
            assert_complete(got, &body, &format!("client {i}"));
        }
        assert_eq!(origin.hits("/huge"), 1, "upstream requests for 50 clients");
    })
    .await;
}

/// A HEAD follower of a GET flight gets the headers (no body) as soon as they are in, while
/// the origin still holds most of the body; the leader then gets the whole body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_follower_gets_headers_while_the_body_is_held() {
    within(60, async {
        let body = pattern(MIB);
        let (head, rest) = (Gate::new(), Gate::new());
        let serve = Serve::new(CACHEABLE, &body)
            .headers_after(&head)
            .first(64 * KIB)
            .rest_after(&rest);
        let origin = RawOrigin::serving(serve).await;
        let proxy = start_proxy(&origin, &[]).await;
        let addr = proxy.addr;
        let mut clients = herd(&proxy, &origin, 2, |i| {
            let body = body.clone();
            let method = if i == 0 { "GET" } else { "HEAD" };
            tokio::spawn(async move { fetch(addr, method, "/h", &[], Some(body)).await })
        })
        .await;
        head.open();
        let follower = tokio::time::timeout(WAIT, clients.pop().unwrap())
            .await
            .expect("the HEAD follower is answered while the origin holds the body")
            .unwrap();
        assert_eq!(follower.status, 200, "{follower:?}");
        assert_eq!(follower.len, 0, "no body for HEAD: {follower:?}");
        if let Some(len) = follower.header("content-length") {
            assert_eq!(len, body.len().to_string(), "{follower:?}");
        }
        rest.open();
        let leader = clients.pop().unwrap().await.unwrap();
        assert_complete(&leader, &body, "the GET leader");
        assert_eq!(origin.count(), 1);
    })
    .await;
}

/// A follower whose `If-None-Match` matches the arriving `ETag` gets `304` as soon as the
/// headers are in, while the origin still holds the body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn if_none_match_follower_gets_304_while_the_body_is_held() {
    within(60, async {
        let body = pattern(MIB);
        let (head, rest) = (Gate::new(), Gate::new());
        let headers = &[("cache-control", "max-age=60"), ("etag", "\"v1\"")];
        let serve = Serve::new(headers, &body)
            .headers_after(&head)
            .first(64 * KIB)
            .rest_after(&rest);
        let origin = RawOrigin::serving(serve).await;
        let proxy = start_proxy(&origin, &[]).await;
        let addr = proxy.addr;
        let mut clients = herd(&proxy, &origin, 2, |i| {
            let body = body.clone();
            let headers: &'static [(&str, &str)] = if i == 0 {
                &[]
            } else {
                &[("if-none-match", "\"v1\"")]
            };
            tokio::spawn(async move { fetch(addr, "GET", "/inm", headers, Some(body)).await })
        })
        .await;
        head.open();
        let follower = tokio::time::timeout(WAIT, clients.pop().unwrap())
            .await
            .expect("the If-None-Match follower is answered while the origin holds the body")
            .unwrap();
        assert_eq!(follower.status, 304, "{follower:?}");
        assert_eq!(follower.header("etag"), Some("\"v1\""), "{follower:?}");
        assert_eq!(follower.len, 0, "{follower:?}");
        rest.open();
        let leader = clients.pop().unwrap().await.unwrap();
        assert_complete(&leader, &body, "the leader");
        assert_eq!(origin.count(), 1);
    })
    .await;
}

/// A `Range: bytes=a-b` follower of a response that is not stored (2 MiB over a 1 MiB
/// `CACHE_MAX_OBJECT_BYTES`, Content-Length known): `206` with exactly those bytes (a range
/// across the origin's first write), from the one upstream request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn range_follower_gets_exactly_its_bytes() {
    within(60, async {
        let body = pattern(2 * MIB);
        let (head, rest) = (Gate::new(), Gate::new());
        let serve = Serve::new(CACHEABLE, &body)
            .headers_after(&head)
            .first(64 * KIB)
            .rest_after(&rest);
        let origin = RawOrigin::serving(serve).await;
        let proxy = start_proxy(&origin, &[("CACHE_MAX_OBJECT_BYTES", "1MiB")]).await;
        let addr = proxy.addr;
        let mut clients = herd(&proxy, &origin, 2, |i| {
            let body = body.clone();
            tokio::spawn(async move {
                if i == 0 {
                    fetch(addr, "GET", "/r", &[], Some(body)).await
                } else {
                    let range = &[("range", "bytes=65000-70000")];
                    match Reply::open(addr, "GET", "/r", range).await {
                        Ok(reply) => reply.keep().finish().await,
                        Err(e) => Received::failed(e),
                    }
                }
            })
        })
        .await;
        head.open();
        rest.open();
        let follower = clients.pop().unwrap().await.unwrap();
        let leader = clients.pop().unwrap().await.unwrap();
        assert_complete(&leader, &body, "the leader");
        assert_eq!(follower.status, 206, "{follower:?}");
        assert_eq!(
            follower.header("content-range"),
            Some(format!("bytes 65000-70000/{}", body.len()).as_str()),
            "{follower:?}"
        );
        assert!(follower.end.is_ok(), "{follower:?}");
        assert!(
            follower.body.as_deref() == Some(&body[65000..=70000]),
            "the follower got exactly bytes 65000-70000: {follower:?}"
        );
        assert_eq!(origin.count(), 1, "upstream requests for both");
        assert!(proxy.proxy.cache.is_empty());
    })
    .await;
}

/// Responses that may not be shared (`private`, `Set-Cookie`, `Vary: *`) keep today's rule:
/// each waiter fetches its own. They learn it from the leader's headers: the followers' own
/// upstream requests arrive while the first response's body is still held open by the origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unshareable_response_followers_fetch_their_own_as_soon_as_headers_arrive() {
    within(60, async {
        let cases: [&'static [(&'static str, &'static str)]; 3] = [
            &[("cache-control", "private, max-age=60")],
            &[("cache-control", "max-age=60"), ("set-cookie", "s=1")],
            &[("cache-control", "max-age=60"), ("vary", "*")],
        ];
        for headers in cases {
            let body = pattern(MIB);
            let (head, rest) = (Gate::new(), Gate::new());
            let origin = {
                let (body, head, rest) = (body.clone(), head.clone(), rest.clone());
                RawOrigin::start(move |arrival, mut conn| {
                    let (body, head, rest) = (body.clone(), head.clone(), rest.clone());
                    async move {
                        let n = arrival.n.to_string();
                        let mut all = headers.to_vec();
                        all.push(("x-response", &n));
                        if arrival.n == 1 {
                            head.pass().await;
                        }
                        let _ = conn.head(200, &all, body.len()).await;
                        let _ = conn.send(&body[..64 * KIB]).await;
                        if arrival.n == 1 {
                            rest.pass().await;
                        }
                        let _ = conn.send(&body[64 * KIB..]).await;
                    }
                })
                .await
            };
            let proxy = start_proxy(&origin, &[]).await;
            let addr = proxy.addr;
            let clients = herd(&proxy, &origin, 5, |_| {
                let body = body.clone();
                tokio::spawn(async move { fetch(addr, "GET", "/me", &[], Some(body)).await })
            })
            .await;
            head.open();
            assert!(
                origin.wait_for(5, WAIT).await,
                "{headers:?}: the 4 followers' own upstream requests must arrive while the \
                 first body is incomplete; {} arrived",
                origin.count()
            );
            rest.open();
            let mut seen = Vec::new();
            for (i, client) in clients.into_iter().enumerate() {
                let got = client.await.unwrap();
                assert_complete(&got, &body, &format!("{headers:?} client {i}"));
                seen.push(got.header("x-response").unwrap_or("").to_string());
            }
            seen.sort();
            assert_eq!(
                seen,
                ["1", "2", "3", "4", "5"],
                "{headers:?}: each client got its own upstream response"
            );
            assert!(proxy.proxy.cache.is_empty());
        }
    })
    .await;
}

/// Coalesced requests are MISSes in `X-Cache-Status`; the followers' RFC 9211 `Cache-Status`
/// carries `collapsed`; `edgecache_coalesced_requests_total` counts the followers. (Whether
/// the leader's says `collapsed` too is left to the implementation.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_cache_status_says_collapsed() {
    within(60, async {
        let body = pattern(256 * KIB);
        let gate = Gate::new();
        let origin = RawOrigin::serving(Serve::new(CACHEABLE, &body).headers_after(&gate)).await;
        let proxy = start_proxy(&origin, &[]).await;
        let addr = proxy.addr;
        let clients = herd(&proxy, &origin, 4, |_| {
            let body = body.clone();
            tokio::spawn(async move { fetch(addr, "GET", "/c", &[], Some(body)).await })
        })
        .await;
        gate.open();
        for (i, client) in clients.into_iter().enumerate() {
            let got = client.await.unwrap();
            assert_complete(&got, &body, &format!("client {i}"));
            assert_eq!(got.cache(), "MISS", "client {i}: {got:?}");
            let cache_status = got.header("cache-status").unwrap_or("");
            assert!(
                cache_status.starts_with("edgecache;"),
                "client {i}: {got:?}"
            );
            let collapsed = cache_status
                .split(';')
                .any(|p| p.trim() == "collapsed" || p.trim().starts_with("collapsed="));
            assert!(
                collapsed || i == 0,
                "follower {i}: Cache-Status {cache_status:?} lacks `collapsed`"
            );
        }
        assert_eq!(
            metric(&proxy.metrics(), "edgecache_coalesced_requests_total"),
            3.0
        );
        assert_eq!(origin.count(), 1);
    })
    .await;
}

/// A request arriving while a storable response is still streaming (the leader already has
/// bytes, the origin holds the rest) joins that flight: no second upstream request, and it
/// gets the whole body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_joiner_of_a_storable_response_shares_the_flight() {
    within(60, async {
        let body = pattern(2 * MIB);
        let rest = Gate::new();
        let serve = Serve::new(CACHEABLE, &body)
            .first(64 * KIB)
            .rest_after(&rest);
        let origin = RawOrigin::serving(serve).await;
        let proxy = start_proxy(&origin, &[]).await;
        let addr = proxy.addr;
        let (first_tx, first_rx) = oneshot::channel();
        let leader = {
            let body = body.clone();
            tokio::spawn(async move {
                let mut reply = match Reply::open(addr, "GET", "/late", &[]).await {
                    Ok(reply) => reply.expect(body),
                    Err(e) => return Received::failed(e),
                };
                let first = reply.next().await;
                let _ = first_tx.send(matches!(first, Ok(Some(_))));
                reply.finish().await
            })
        };
        let had_bytes = tokio::time::timeout(WAIT, first_rx).await;
        assert!(
            matches!(had_bytes, Ok(Ok(true))),
            "the leader had body bytes while the origin held the rest"
        );
        let late = {
            let body = body.clone();
            tokio::spawn(async move { fetch(addr, "GET", "/late", &[], Some(body)).await })
        };
        assert!(
            proxy.followers(1).await,
            "the late request joined the flight"
        );
        rest.open();
        assert_complete(&leader.await.unwrap(), &body, "the leader");
        let late = late.await.unwrap();
        assert_complete(&late, &body, "the late joiner");
        assert_eq!(origin.count(), 1, "no second upstream request");
        stored(&proxy).await;
        assert_eq!(fetch(addr, "GET", "/late", &[], None).await.cache(), "HIT");
    })
    .await;
}

/// The client that started a fetch of a response that is not stored hangs up after its first
/// bytes: the fetch carries on for the followers, who get the whole body from that one
/// upstream request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_outlives_the_leader_while_followers_read() {
    within(60, async {
        let body = pattern(2 * MIB);
        let (head, rest) = (Gate::new(), Gate::new());
        let serve = Serve::new(CACHEABLE, &body)
            .headers_after(&head)
            .first(64 * KIB)
            .rest_after(&rest);
        let origin = RawOrigin::serving(serve).await;
        let proxy = start_proxy(&origin, &[("CACHE_MAX_OBJECT_BYTES", "1MiB")]).await;
        let addr = proxy.addr;
        let (gone_tx, gone_rx) = oneshot::channel();
        let mut gone_tx = Some(gone_tx);
        let clients = herd(&proxy, &origin, 4, |i| {
            let body = body.clone();
            let gone = if i == 0 { gone_tx.take() } else { None };
            tokio::spawn(async move {
                match gone {
                    // The leader: reads its first bytes, then hangs up.
                    Some(gone) => {
                        let first = match Reply::open(addr, "GET", "/o", &[]).await {
                            Ok(mut reply) => reply.next().await.map(|p| p.is_some()),
                            Err(e) => Err(e),
                        };
                        let _ = gone.send(first);
                        Received::failed("hung up".into())
                    }
                    None => fetch(addr, "GET", "/o", &[], Some(body)).await,
                }
            })
        })
        .await;
        head.open();
        let first = tokio::time::timeout(WAIT, gone_rx).await;
        assert!(
            matches!(first, Ok(Ok(Ok(true)))),
            "the leader had body bytes while the origin held the rest: {first:?}"
        );
        rest.open();
        for (i, client) in clients.into_iter().enumerate().skip(1) {
            assert_complete(&client.await.unwrap(), &body, &format!("follower {i}"));
        }
        assert_eq!(
            origin.count(),
            1,
            "one upstream request, outliving the leader"
        );
    })
    .await;
}

/// When every client reading a response that will not be stored has hung up, the fetch stops
/// and the upstream connection is released: the origin, still sending (a 1 GiB body), sees
/// its writes fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_connection_is_released_when_every_reader_is_gone() {
    within(60, async {
        let gate = Gate::new();
        let released = Arc::new(AtomicUsize::new(0));
        let origin = {
            let (gate, released) = (gate.clone(), released.clone());
            RawOrigin::start(move |_arrival, mut conn| {
                let (gate, released) = (gate.clone(), released.clone());
                async move {
                    gate.pass().await;
                    let chunk = pattern(64 * KIB);
                    let mut sent = conn.head(200, CACHEABLE, 1 << 30).await;
                    // Sends until the proxy closes the connection (or the 1 GiB is out).
                    for _ in 0..(1 << 30) / chunk.len() {
                        if sent.is_err() {
                            break;
                        }
                        sent = conn.send(&chunk).await;
                    }
                    if sent.is_err() {
                        released.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
            .await
        };
        let proxy = start_proxy(&origin, &[("CACHE_MAX_OBJECT_BYTES", "1MiB")]).await;
        let addr = proxy.addr;
        let clients = herd(&proxy, &origin, 3, |_| {
            tokio::spawn(async move {
                // Reads the head and the first bytes, then hangs up.
                match Reply::open(addr, "GET", "/endless", &[]).await {
                    Ok(mut reply) => match reply.next().await {
                        Ok(Some(_)) => Received::failed("hung up after its first bytes".into()),
                        other => Received::failed(format!("no body bytes: {other:?}")),
                    },
                    Err(e) => Received::failed(e),
                }
            })
        })
        .await;
        gate.open();
        for (i, client) in clients.into_iter().enumerate() {
            let got = client.await.unwrap();
            assert_eq!(
                got.end,
                Err("hung up after its first bytes".to_string()),
                "client {i}"
            );
        }
        let all_released =
            eventually(WAIT, || released.load(Ordering::SeqCst) == origin.count()).await;
        assert!(
            all_released,
            "every upstream connection is closed once its readers are gone: {} of {} were",
            released.load(Ordering::SeqCst),
            origin.count()
        );
        assert_eq!(origin.count(), 1, "upstream requests for 3 clients");
    })
    .await;
}

/// The raw client itself (no proxy): it tells a complete body from one cut short, for both
/// framings the proxy may use towards followers.
#[tokio::test]
async fn raw_client_tells_complete_bodies_from_cut_ones() {
    within(30, async {
        const CASES: [(&str, &[u8], Result<u64, ()>); 7] = [
            ("/length", b"content-length: 4\r\n\r\nabcd", Ok(4)),
            ("/length-cut", b"content-length: 8\r\n\r\nabcd", Err(())),
            (
                "/chunked",
                b"transfer-encoding: chunked\r\n\r\n2\r\nab\r\n2;x=y\r\ncd\r\n0\r\n\r\n",
                Ok(4),
            ),
            (
                "/chunked-no-end",
                b"transfer-encoding: chunked\r\n\r\n4\r\nabcd\r\n",
                Err(()),
            ),
            (
                "/chunked-cut",
                b"transfer-encoding: chunked\r\n\r\n8\r\nabcd",
                Err(()),
            ),
            ("/close", b"\r\nabcd", Ok(4)),
            ("/wrong", b"content-length: 4\r\n\r\nabXd", Ok(4)),
        ];
        let origin = RawOrigin::start(|arrival, mut conn| async move {
            let (_, raw, _) = CASES.iter().find(|c| c.0 == arrival.target).unwrap();
            let mut out = b"HTTP/1.1 200 OK\r\nconnection: close\r\n".to_vec();
            out.extend_from_slice(raw);
            let _ = conn.stream.write_all(&out).await;
        })
        .await;
        let expected = Bytes::from_static(b"abcd");
        for (path, _, want) in CASES {
            let got = fetch(origin.addr, "GET", path, &[], Some(expected.clone())).await;
            assert_eq!(got.status, 200, "{path}: {got:?}");
            let mismatch = (path == "/wrong").then_some(2);
            assert_eq!(got.mismatch, mismatch, "{path}: {got:?}");
            match want {
                Ok(len) => assert_eq!((got.end.clone(), got.len), (Ok(()), len), "{path}"),
                Err(()) => assert!(got.end.is_err(), "{path}: {got:?}"),
            }
        }
        let head = fetch(origin.addr, "HEAD", "/length", &[], None).await;
        assert_eq!((head.status, head.len, head.end), (200, 0, Ok(())));
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// Headers of a storable response.
const CACHEABLE: &[(&str, &str)] = &[("cache-control", "max-age=60")];

/// The proxy in front of `origin` with `env`, on top of: `REQ_TIMEOUT=60` (streaming
/// 64 MiB to several clients of a debug build takes seconds) and no background refreshes
/// (`DEFAULT_REFRESH_WINDOW_SECS=0`: a HIT would otherwise refresh the entry and show up in
/// the origin's request count).
async fn start_proxy(origin: &RawOrigin, env: &[(&str, &str)]) -> ProxyHandle {
    let mut all = vec![("REQ_TIMEOUT", "60"), ("DEFAULT_REFRESH_WINDOW_SECS", "0")];
    all.extend_from_slice(env);
    ProxyHandle::start(&origin.url(), &all).await
}

/// Waits until no upstream fetch is running (`edgecache_inflight_fetches` is 0), so that the
/// next request cannot meet the flight that just ended.
async fn flights_ended(proxy: &ProxyHandle) {
    let ended = eventually(WAIT, || {
        series(&proxy.metrics(), "edgecache_inflight_fetches") == Some(0.0)
    })
    .await;
    assert!(
        ended,
        "the flight ended; flight metrics:\n{}",
        flight_metrics(proxy)
    );
}

/// Waits until the store holds something: a storable response is stored when its body is
/// complete, which the clients may see a moment before the store does.
async fn stored(proxy: &ProxyHandle) {
    let cache = &proxy.proxy.cache;
    assert!(
        eventually(WAIT, || !cache.is_empty()).await,
        "the complete response was stored"
    );
}

/// Runs a test body under a deadline: a hang fails the test instead of blocking CI.
async fn within<T>(secs: u64, test: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(secs), test)
        .await
        .unwrap_or_else(|_| panic!("test did not finish within {secs} s"))
}

/// The first `len` bytes (at most 64 MiB) of the test pattern, generated once: each byte
/// depends on its offset, so a lost, repeated or reordered chunk shows.
fn pattern(len: usize) -> Bytes {
    static PATTERN: OnceLock<Bytes> = OnceLock::new();
    PATTERN
        .get_or_init(|| {
            (0..(64 * MIB) as u64)
                .map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8)
                .collect::<Vec<u8>>()
                .into()
        })
        .slice(..len)
}

/// Starts `n` clients of one key, `client(i)` starting client `i`: the leader (0) first, the
/// followers once its request has reached the origin (which must hold it, behind a gate,
/// until the test says); returns once all `n - 1` followers joined the flight.
async fn herd<T>(
    proxy: &ProxyHandle,
    origin: &RawOrigin,
    n: usize,
    mut client: impl FnMut(usize) -> JoinHandle<T>,
) -> Vec<JoinHandle<T>> {
    let joined = proxy.proxy.metrics.coalesced.load(Ordering::SeqCst);
    let arrived = origin.count();
    let mut clients = vec![client(0)];
    assert!(
        origin.wait_for(arrived + 1, WAIT).await,
        "the leader's request reached the origin"
    );
    clients.extend((1..n).map(&mut client));
    assert!(
        proxy.followers(joined + n as u64 - 1).await,
        "{} followers joined the flight",
        n - 1
    );
    clients
}

/// The value of a series in a Prometheus text exposition, if it is there.
fn series(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

/// The series about flights and streaming in `/metrics`, for failure messages.
fn flight_metrics(proxy: &ProxyHandle) -> String {
    let text = proxy.metrics();
    let wanted = [
        "edgecache_stream",
        "edgecache_coalesced",
        "edgecache_inflight",
    ];
    let lines = text
        .lines()
        .filter(|l| wanted.iter().any(|w| l.starts_with(w)));
    lines.collect::<Vec<_>>().join("\n")
}

/// A `/proc/PID/status` field in KiB (`VmHWM`, `VmRSS`); 0 when unknown.
fn proc_status_kib(pid: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// Asserts that `got` is a 200 whose body is exactly `expected`, complete by its framing.
fn assert_complete(got: &Received, expected: &Bytes, who: &str) {
    assert_eq!(got.status, 200, "{who}: {got:?}");
    assert_eq!(got.end, Ok(()), "{who}: the body ended cleanly: {got:?}");
    assert_eq!(
        got.len,
        expected.len() as u64,
        "{who}: body length: {got:?}"
    );
    assert_eq!(got.mismatch, None, "{who}: body bytes: {got:?}");
}

// --- The raw origin ---------------------------------------------------------------------

/// A request as the raw origin received it.
#[derive(Debug, Clone)]
struct Arrival {
    /// 1 for the first request the origin received, 2 for the second, …
    n: usize,
    target: String,
}

/// An HTTP/1.1 origin over raw TCP: reads one request head per connection and hands the
/// connection to a script, which writes the response (headers, body pieces, a reset) when
/// it likes. Counts requests as their heads arrive.
struct RawOrigin {
    addr: SocketAddr,
    arrivals: Arc<Mutex<Vec<Arrival>>>,
    arrived: Arc<Notify>,
}

impl RawOrigin {
    async fn start<F, Fut>(script: F) -> RawOrigin
    where
        F: Fn(Arrival, OriginConn) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let arrivals: Arc<Mutex<Vec<Arrival>>> = Arc::default();
        let arrived = Arc::new(Notify::new());
        let script = Arc::new(script);
        let (list, notify) = (arrivals.clone(), arrived.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (script, list, notify) = (script.clone(), list.clone(), notify.clone());
                tokio::spawn(async move {
                    let mut conn = OriginConn { stream };
                    let Some(target) = conn.read_request().await else {
                        return;
                    };
                    let arrival = {
                        let mut list = list.lock().unwrap();
                        let arrival = Arrival {
                            n: list.len() + 1,
                            target,
                        };
                        list.push(arrival.clone());
                        arrival
                    };
                    notify.notify_waiters();
                    script(arrival, conn).await;
                });
            }
        });
        RawOrigin {
            addr,
            arrivals,
            arrived,
        }
    }

    /// An origin answering every request with `serve`.
    async fn serving(serve: Serve) -> RawOrigin {
        Self::start(move |_arrival, conn| serve.clone().run(conn)).await
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests for `target` received so far.
    fn hits(&self, target: &str) -> usize {
        let arrivals = self.arrivals.lock().unwrap();
        arrivals.iter().filter(|a| a.target == target).count()
    }

    /// Requests received so far.
    fn count(&self) -> usize {
        self.arrivals.lock().unwrap().len()
    }

    /// Waits until `n` requests in all have arrived; false if `timeout` passes first.
    async fn wait_for(&self, n: usize, timeout: Duration) -> bool {
        let wait = async {
            loop {
                let arrived = self.arrived.notified();
                tokio::pin!(arrived);
                // Registered before the check, so an arrival between the two is not missed.
                arrived.as_mut().enable();
                if self.count() >= n {
                    return;
                }
                arrived.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }
}

/// The origin's side of one connection.
struct OriginConn {
    stream: TcpStream,
}

impl OriginConn {
    /// Reads a request head (GET or HEAD: no body); its target, or `None` if the connection
    /// ends first.
    async fn read_request(&mut self) -> Option<String> {
        let mut buf = BytesMut::with_capacity(4 * KIB);
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut headers);
            if let Ok(httparse::Status::Complete(_)) = req.parse(&buf) {
                return req.path.map(str::to_string);
            }
            if buf.len() > 64 * KIB || self.stream.read_buf(&mut buf).await.ok()? == 0 {
                return None;
            }
        }
    }

    /// Sends the status line and `headers`, with `Content-Length: len` and
    /// `Connection: close`.
    async fn head(&mut self, status: u16, headers: &[(&str, &str)], len: usize) -> io::Result<()> {
        let mut head =
            format!("HTTP/1.1 {status} Whatever\r\ncontent-length: {len}\r\nconnection: close\r\n");
        for (name, value) in headers {
            head.push_str(&format!("{name}: {value}\r\n"));
        }
        head.push_str("\r\n");
        self.stream.write_all(head.as_bytes()).await
    }

    /// Sends body bytes, 64 KiB per write; an error once the peer has closed the connection.
    async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        for piece in bytes.chunks(64 * KIB) {
            self.stream.write_all(piece).await?;
        }
        self.stream.flush().await
    }

    /// Drops the connection with a TCP reset.
    fn reset(self) {
        let _ = self.stream.set_zero_linger();
    }
}

/// How far the slowest of a set of reading clients is: lets an origin send no faster than
/// they read, so that their distance from each other is bounded by the test, not by how the
/// machine schedules them.
struct Pace {
    received: Vec<std::sync::atomic::AtomicU64>,
    moved: Notify,
}

impl Pace {
    /// Progress of readers `0..n` (see [`Pace::skip`]).
    fn new(n: usize) -> Arc<Pace> {
        Arc::new(Pace {
            received: (0..n)
                .map(|_| std::sync::atomic::AtomicU64::new(0))
                .collect(),
            moved: Notify::new(),
        })
    }

    /// A reader that will never report (counts as having everything).
    fn skip(&self, i: usize) {
        self.received[i].store(u64::MAX, Ordering::SeqCst);
    }

    fn report(&self, i: usize, received: u64) {
        self.received[i].store(received, Ordering::SeqCst);
        self.moved.notify_waiters();
    }

    /// Waits until every reader has at least `bytes`.
    async fn wait_all(&self, bytes: u64) {
        loop {
            let moved = self.moved.notified();
            tokio::pin!(moved);
            moved.as_mut().enable();
            if self
                .received
                .iter()
                .all(|r| r.load(Ordering::SeqCst) >= bytes)
            {
                return;
            }
            moved.await;
        }
    }
}

/// The usual script: `headers` and `body` (with its Content-Length), the headers once
/// `head` opens, the first `first` bytes, the rest once `rest` opens — and, when `paced`,
/// never more than its lag ahead of the slowest reader.
#[derive(Clone)]
struct Serve {
    headers: Vec<(&'static str, &'static str)>,
    body: Bytes,
    head: Option<Gate>,
    first: usize,
    rest: Option<Gate>,
    paced: Option<(Arc<Pace>, usize)>,
}

impl Serve {
    fn new(headers: &[(&'static str, &'static str)], body: &Bytes) -> Serve {
        Serve {
            headers: headers.to_vec(),
            body: body.clone(),
            head: None,
            first: 0,
            rest: None,
            paced: None,
        }
    }

    /// Sends each `lag` bytes only once every reader of `pace` has the bytes before them.
    fn paced(mut self, pace: &Arc<Pace>, lag: usize) -> Serve {
        self.paced = Some((pace.clone(), lag));
        self
    }

    fn headers_after(mut self, gate: &Gate) -> Serve {
        self.head = Some(gate.clone());
        self
    }

    fn first(mut self, bytes: usize) -> Serve {
        self.first = bytes;
        self
    }

    fn rest_after(mut self, gate: &Gate) -> Serve {
        self.rest = Some(gate.clone());
        self
    }

    async fn run(self, mut conn: OriginConn) {
        if let Some(gate) = &self.head {
            gate.pass().await;
        }
        if conn
            .head(200, &self.headers, self.body.len())
            .await
            .is_err()
        {
            return;
        }
        if conn.send(&self.body[..self.first]).await.is_err() {
            return;
        }
        if let Some(gate) = &self.rest {
            gate.pass().await;
        }
        let Some((pace, lag)) = &self.paced else {
            let _ = conn.send(&self.body[self.first..]).await;
            return;
        };
        let mut sent = self.first;
        while sent < self.body.len() {
            pace.wait_all(sent.saturating_sub(*lag) as u64).await;
            let end = (sent + lag).min(self.body.len());
            if conn.send(&self.body[sent..end]).await.is_err() {
                return;
            }
            sent = end;
        }
    }
}

// --- The raw client ---------------------------------------------------------------------

/// Writes `method path` with `headers`, `Host` and `Connection: close` on `stream`.
async fn write_request(
    stream: &mut TcpStream,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> io::Result<()> {
    let mut req = format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n");
    for (name, value) in headers {
        req.push_str(&format!("{name}: {value}\r\n"));
    }
    req.push_str("\r\n");
    stream.write_all(req.as_bytes()).await
}

/// A client that sends a GET of `path` and never reads: its receive buffer is made small, so
/// the proxy's writes to it stall soon.
async fn send_stalled(addr: SocketAddr, path: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * KIB as u32).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    write_request(&mut stream, addr, "GET", path, &[])
        .await
        .unwrap();
    stream
}

/// [`fetch`] of a GET whose progress is reported to `pace` as reader `i`.
fn fetch_paced(
    addr: SocketAddr,
    path: &'static str,
    expected: Bytes,
    pace: &Arc<Pace>,
    i: usize,
) -> impl Future<Output = Received> {
    let pace = pace.clone();
    async move {
        match Reply::open(addr, "GET", path, &[]).await {
            Ok(reply) => reply.expect(expected).paced(&pace, i).finish().await,
            Err(e) => Received::failed(e),
        }
    }
}

/// Sends one request on a new connection and reads the whole response, checking the body
/// against `expected` as it arrives.
async fn fetch(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    expected: Option<Bytes>,
) -> Received {
    match Reply::open(addr, method, path, headers).await {
        Ok(reply) => match expected {
            Some(expected) => reply.expect(expected).finish().await,
            None => reply.finish().await,
        },
        Err(e) => Received::failed(e),
    }
}

/// How the rest of a response body is framed.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Framing {
    /// No body (HEAD, 1xx, 204, 304).
    None,
    /// `Content-Length` bytes still to come.
    Length(u64),
    /// Chunked: `left` bytes of the current chunk to come, then (if `crlf_due`) its CRLF.
    Chunked { left: u64, crlf_due: bool },
    /// Until the connection closes (no way to tell a complete body from a cut one).
    Close,
    /// Complete.
    Done,
}

/// A response being read by the raw client.
struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    stream: TcpStream,
    buf: BytesMut,
    framing: Framing,
    received: u64,
    expected: Option<Bytes>,
    mismatch: Option<u64>,
    kept: Option<Vec<u8>>,
    /// Reports the bytes received to a [`Pace`] as reader number `.1`.
    pace: Option<(Arc<Pace>, usize)>,
}

impl Reply {
    /// Connects, sends the request and reads the response head.
    async fn open(
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<Reply, String> {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        write_request(&mut stream, addr, method, path, headers)
            .await
            .map_err(|e| format!("sending the request: {e}"))?;
        Reply::read(stream, method).await
    }

    /// Reads the response head of a `method` request from `stream`.
    async fn read(mut stream: TcpStream, method: &str) -> Result<Reply, String> {
        let mut buf = BytesMut::with_capacity(64 * KIB);
        loop {
            let parsed = {
                let mut headers = [httparse::EMPTY_HEADER; 64];
                let mut resp = httparse::Response::new(&mut headers);
                match resp.parse(&buf) {
                    Ok(httparse::Status::Complete(n)) => {
                        let headers: Vec<(String, String)> = resp
                            .headers
                            .iter()
                            .map(|h| {
                                let value = String::from_utf8_lossy(h.value).into_owned();
                                (h.name.to_ascii_lowercase(), value)
                            })
                            .collect();
                        Some((n, resp.code.unwrap_or(0), headers))
                    }
                    Ok(httparse::Status::Partial) => None,
                    Err(e) => return Err(format!("bad response head: {e}")),
                }
            };
            if let Some((n, status, headers)) = parsed {
                buf.advance(n);
                let find = |name: &str| {
                    headers
                        .iter()
                        .find(|(k, _)| k == name)
                        .map(|(_, v)| v.as_str())
                };
                let framing = if method == "HEAD"
                    || (100..200).contains(&status)
                    || status == 204
                    || status == 304
                {
                    Framing::None
                } else if find("transfer-encoding")
                    .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"))
                {
                    Framing::Chunked {
                        left: 0,
                        crlf_due: false,
                    }
                } else if let Some(len) = find("content-length") {
                    Framing::Length(
                        len.trim()
                            .parse()
                            .map_err(|_| format!("bad Content-Length {len:?}"))?,
                    )
                } else {
                    Framing::Close
                };
                return Ok(Reply {
                    status,
                    headers,
                    stream,
                    buf,
                    framing,
                    received: 0,
                    expected: None,
                    mismatch: None,
                    kept: None,
                    pace: None,
                });
            }
            match stream.read_buf(&mut buf).await {
                Ok(0) => return Err("connection closed before the response head".into()),
                Ok(_) => {}
                Err(e) => return Err(format!("reading the response head: {e}")),
            }
        }
    }

    /// Checks the body against `expected` as it arrives (see [`Received::mismatch`]).
    fn expect(mut self, expected: Bytes) -> Reply {
        self.expected = Some(expected);
        self
    }

    /// Reports its progress to `pace` as reader `i`.
    fn paced(mut self, pace: &Arc<Pace>, i: usize) -> Reply {
        self.pace = Some((pace.clone(), i));
        self
    }

    /// Keeps the body (for small ones).
    fn keep(mut self) -> Reply {
        self.kept = Some(Vec::new());
        self
    }

    /// Reads more from the connection; `Ok(0)` at EOF.
    async fn fill(&mut self) -> Result<usize, String> {
        self.buf.reserve(64 * KIB);
        self.stream
            .read_buf(&mut self.buf)
            .await
            .map_err(|e| format!("after {} body bytes: {e}", self.received))
    }

    /// Up to `max` buffered or newly read bytes; `None` at EOF.
    async fn take(&mut self, max: u64) -> Result<Option<Bytes>, String> {
        if self.buf.is_empty() && self.fill().await? == 0 {
            return Ok(None);
        }
        let n = self
            .buf
            .len()
            .min(usize::try_from(max).unwrap_or(usize::MAX));
        Ok(Some(self.buf.split_to(n).freeze()))
    }

    /// One CRLF-terminated line of chunked framing.
    async fn line(&mut self) -> Result<String, String> {
        loop {
            if let Some(at) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = self.buf.split_to(at);
                self.buf.advance(2);
                return Ok(String::from_utf8_lossy(&line).into_owned());
            }
            if self.buf.len() > 4 * KIB {
                return Err("chunk header line too long".into());
            }
            if self.fill().await? == 0 {
                return Err(format!(
                    "connection closed in chunked framing after {} body bytes",
                    self.received
                ));
            }
        }
    }

    /// The next piece of the body: `Ok(None)` once it is complete by its framing, `Err` if
    /// the connection failed or ended first.
    async fn next(&mut self) -> Result<Option<Bytes>, String> {
        loop {
            match self.framing {
                Framing::None | Framing::Done => return Ok(None),
                Framing::Length(0) => {
                    self.framing = Framing::Done;
                    return Ok(None);
                }
                Framing::Length(left) => {
                    let Some(piece) = self.take(left).await? else {
                        return Err(format!(
                            "connection closed after {} body bytes, {left} short of the \
                             Content-Length",
                            self.received
                        ));
                    };
                    self.framing = Framing::Length(left - piece.len() as u64);
                    return Ok(Some(self.account(piece)));
                }
                Framing::Close => match self.take(u64::MAX).await? {
                    Some(piece) => return Ok(Some(self.account(piece))),
                    None => {
                        self.framing = Framing::Done;
                        return Ok(None);
                    }
                },
                Framing::Chunked { left: 0, crlf_due } => {
                    if crlf_due && !self.line().await?.is_empty() {
                        return Err("no CRLF after a chunk".into());
                    }
                    let line = self.line().await?;
                    let size = line.split(';').next().unwrap_or("").trim();
                    let size = u64::from_str_radix(size, 16)
                        .map_err(|_| format!("bad chunk size line {line:?}"))?;
                    if size == 0 {
                        while !self.line().await?.is_empty() {}
                        self.framing = Framing::Done;
                        return Ok(None);
                    }
                    self.framing = Framing::Chunked {
                        left: size,
                        crlf_due: false,
                    };
                }
                Framing::Chunked { left, .. } => {
                    let Some(piece) = self.take(left).await? else {
                        return Err(format!(
                            "connection closed inside a chunk after {} body bytes",
                            self.received
                        ));
                    };
                    self.framing = Framing::Chunked {
                        left: left - piece.len() as u64,
                        crlf_due: true,
                    };
                    return Ok(Some(self.account(piece)));
                }
            }
        }
    }

    /// Counts, checks and (if asked) keeps a piece of the body.
    fn account(&mut self, piece: Bytes) -> Bytes {
        let at = self.received as usize;
        if let (Some(expected), None) = (&self.expected, self.mismatch) {
            let same = expected
                .get(at..at + piece.len())
                .is_some_and(|e| e == &piece[..]);
            if !same {
                let first_diff = piece
                    .iter()
                    .zip(expected.get(at..).unwrap_or(&[]))
                    .position(|(a, b)| a != b)
                    .unwrap_or(piece.len().min(expected.len().saturating_sub(at)));
                self.mismatch = Some((at + first_diff) as u64);
            }
        }
        if let Some(kept) = &mut self.kept {
            kept.extend_from_slice(&piece);
        }
        self.received += piece.len() as u64;
        if let Some((pace, i)) = &self.pace {
            pace.report(*i, self.received);
        }
        piece
    }

    /// Reads the rest of the body.
    async fn finish(mut self) -> Received {
        let end = loop {
            match self.next().await {
                Ok(Some(_)) => {}
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        Received {
            status: self.status,
            headers: self.headers,
            framing: self.framing,
            len: self.received,
            end,
            mismatch: self.mismatch,
            body: self.kept,
        }
    }
}

/// A response as the raw client saw it.
struct Received {
    /// 0 when no response head arrived.
    status: u16,
    headers: Vec<(String, String)>,
    /// Where the framing stood when reading stopped.
    framing: Framing,
    /// Body bytes received.
    len: u64,
    /// `Ok` when the body was complete by its framing; else how it ended.
    end: Result<(), String>,
    /// The offset of the first body byte that differed from the expected body, or a byte
    /// beyond its end.
    mismatch: Option<u64>,
    /// The body, when kept.
    body: Option<Vec<u8>>,
}

impl Received {
    fn failed(why: String) -> Received {
        Received {
            status: 0,
            headers: Vec::new(),
            framing: Framing::Done,
            len: 0,
            end: Err(why),
            mismatch: None,
            body: None,
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn cache(&self) -> &str {
        self.header("x-cache-status").unwrap_or("")
    }
}

impl fmt::Debug for Received {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Received")
            .field("status", &self.status)
            .field("len", &self.len)
            .field("end", &self.end)
            .field("framing", &self.framing)
            .field("mismatch", &self.mismatch)
            .field("headers", &self.headers)
            .field("kept", &self.body.as_ref().map(Vec::len))
            .finish()
    }
}
