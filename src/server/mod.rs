//! The server shell: accept loop, one hyper connection task per client (HTTP/1.1 and h2c on
//! the same port), and graceful drain on shutdown; the expiry task and the health probes
//! run alongside on the proxy's background tree, restarted if they panic, cancelled and
//! awaited once connections have drained ([`crate::supervise`]).
//!
//! Each connection is held to its deadlines and watched for ambiguous request framing by
//! these parts:
//!
//! * [`deadline`] — the per-connection state machine ([`deadline::Activity`]: head, keep-alive
//!   and stall deadlines, time passed in) and the future that enforces it
//!   ([`deadline::Watched`]);
//! * [`reclaim`] — the registry of open connections, which closes idle keep-alive ones at
//!   `MAX_CONNECTIONS`;
//! * [`inflight`] — a request counted as in flight until its response body is dropped;
//! * [`head_scan`] — the pure HTTP/1 head scanner that spots `Content-Length` together with
//!   `Transfer-Encoding` (fuzzed: `fuzz/fuzz_targets/head_scan.rs`);
//! * [`io`] — the stream wrapper that feeds all of the above from the bytes moved.

pub mod deadline;
pub mod head_scan;
pub mod inflight;
pub mod io;
pub mod reclaim;

use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, TryAcquireError};
use tracing::Instrument;

use crate::metrics::{Listener, Task};
use crate::proxy::Proxy;
use crate::supervise::{accept, supervise};
use deadline::{Deadlines, Watched};
use inflight::{RequestGuard, Tracked};
use io::TrackedIo;
use reclaim::Registry;

/// Idle keep-alive connections asked to close each time the accept loop finds every
/// `MAX_CONNECTIONS` slot taken (nginx reclaims 32 at a time too).
const RECLAIM_BATCH: usize = 32;

/// The least time background tasks get to stop after the drain, however much of
/// `SHUTDOWN_GRACE_SECS` it used: a cancelled task ends at its next poll, so this only
/// matters for one stuck in a blocking call.
const BACKGROUND_STOP_MIN: Duration = Duration::from_secs(1);

/// Serves `proxy` on `listener` until `shutdown` resolves, then stops accepting and lets
/// in-flight requests finish for up to `SHUTDOWN_GRACE_SECS`; then cancels the proxy's
/// background work (expiry, probes, refreshes, the operator listener) and returns once it
/// has ended (within what is left of the grace period, at least a second). Panics during
/// that shutdown are logged and counted ([`crate::supervise::Background::shutdown`]).
pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>, shutdown: impl Future<Output = ()>) {
    // Supervised: a panic is logged, counted and the task restarted. The expiry queue lives
    // in the cache, so a restarted expiry task carries on where the last one stopped.
    let expiry_proxy = proxy.clone();
    proxy.background.spawn(Task::Expiry.as_str(), async move {
        let proxy = expiry_proxy;
        supervise(Task::Expiry, &proxy.metrics, || proxy.clone().run_expiry()).await;
    });
    if proxy.cache.shared().is_some() {
        let retry_proxy = proxy.clone();
        proxy.background.spawn("shared_purge_retry", async move {
            retry_proxy.run_shared_retry().await;
        });
        let heartbeat_proxy = proxy.clone();
        proxy.background.spawn("shared_heartbeat", async move {
            if let Some(tier) = heartbeat_proxy.cache.shared() {
                tier.heartbeat().await;
            }
        });
        let purges_proxy = proxy.clone();
        proxy.background.spawn("shared_purges", async move {
            if let Some(tier) = purges_proxy.cache.shared() {
                tier.run_purges(&*purges_proxy).await;
            }
        });
        let wake_proxy = proxy.clone();
        proxy.background.spawn("shared_wakeups", async move {
            if let Some(tier) = wake_proxy.cache.shared() {
                tier.run_wakeups().await;
            }
        });
    }
    for probe in proxy.upstream.health_checks() {
        let probe_proxy = proxy.clone();
        proxy
            .background
            .spawn(Task::HealthCheck.as_str(), async move {
                supervise(Task::HealthCheck, &probe_proxy.metrics, probe).await;
            });
    }
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    let limits = &proxy.config.limits;
    builder
        .http1()
        .timer(TokioTimer::new())
        // Off: hyper's would also time idle keep-alive connections. `deadline` enforces
        // HEADER_READ_TIMEOUT_SECS and KEEPALIVE_TIMEOUT_SECS separately.
        .header_read_timeout(None)
        // Request line + headers larger than this get 431 (or 414 for the URI).
        .max_buf_size(limits.max_header_bytes)
        .keep_alive(true);
    let deadlines = Deadlines {
        header: limits.header_read_timeout,
        keepalive: limits.keepalive_timeout,
        stall: limits
            .keepalive_timeout
            .max(proxy.config.upstream_timeout * 2),
    };
    let connections = Arc::new(Semaphore::new(limits.max_connections));
    let registry = Arc::new(Registry::default());
    builder.http2().timer(TokioTimer::new());
    tokio::pin!(shutdown);

    loop {
        // At MAX_CONNECTIONS, stop accepting: new connections wait in the kernel's backlog
        // while idle keep-alive connections are asked to make room; connections with a
        // request under way are unaffected.
        let permit = match connections.clone().try_acquire_owned() {
            Ok(p) => p,
            Err(TryAcquireError::Closed) => break,
            Err(TryAcquireError::NoPermits) => {
                // Until a slot frees, connections that go idle close as soon as they do.
                let asked = registry.want_room(RECLAIM_BATCH);
                tracing::debug!(
                    asked,
                    "at MAX_CONNECTIONS: closing idle keep-alive connections"
                );
                let permit = tokio::select! {
                    permit = connections.clone().acquire_owned() => permit.ok(),
                    _ = &mut shutdown => None,
                };
                registry.room_found();
                match permit {
                    Some(p) => p,
                    None => break,
                }
            }
        };
        let (stream, peer) = tokio::select! {
            // Out of file descriptors and similar: logged, counted, backed off from.
            conn = accept(&listener, &proxy.metrics, Listener::Proxy) => conn,
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        proxy
            .metrics
            .connections_total
            .fetch_add(1, Ordering::Relaxed);
        proxy
            .metrics
            .open_connections
            .fetch_add(1, Ordering::Relaxed);
        let counted = proxy.clone();
        let proxy = proxy.clone();
        let (activity, registered) = registry.register();
        let io = TokioIo::new(TrackedIo::new(stream, activity.clone()));
        let requests = activity.clone();
        // At `debug`, so the default `info` level creates nothing per connection. Request
        // spans ([`Proxy::handle`]) are its children: HTTP/2 streams run in tasks of their
        // own, so each request future is instrumented with it too.
        let conn_span = tracing::debug_span!("connection", %peer);
        let request_parent = conn_span.clone();
        let service = service_fn(move |req| {
            let proxy = proxy.clone();
            let ambiguous = requests.next_head_is_ambiguous();
            let guard = RequestGuard::start(&requests);
            async move {
                let resp = if ambiguous {
                    refuse_ambiguous_framing(peer)
                } else {
                    proxy.handle(req, peer).await
                };
                Ok::<_, Infallible>(resp.map(|body| Tracked::new(body, guard)))
            }
            .instrument(request_parent.clone())
        });
        let conn = builder.serve_connection(io, service).into_owned();
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _permit = permit;
            let _registered = registered;
            match Watched::new(conn, activity, deadlines).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, %peer, "connection ended with an error");
                }
                Err(why) => {
                    tracing::debug!(%peer, reason = why.as_str(), "connection closed by its deadline");
                    counted.metrics.connection_timed_out(why);
                }
            }
            counted
                .metrics
                .open_connections
                .fetch_sub(1, Ordering::Relaxed);
        }
        .instrument(conn_span));
    }

    drop(listener);
    let drain_started = tokio::time::Instant::now();
    let grace = proxy.config.shutdown_grace;
    tracing::info!(
        grace_secs = grace.as_secs_f64(),
        "shutting down: no new connections, draining"
    );
    tokio::select! {
        _ = graceful.shutdown() => tracing::info!("all connections drained"),
        _ = tokio::time::sleep(grace) => tracing::warn!("grace period over; closing remaining connections"),
    }
    let left = grace
        .saturating_sub(drain_started.elapsed())
        .max(BACKGROUND_STOP_MIN);
    proxy.background.shutdown(left).await;
}

/// The answer to a request head with both `Content-Length` and `Transfer-Encoding` (RFC 9112
/// §6.1: how requests are smuggled): 400, and the connection closes after it
/// ([`ErrorKind::AmbiguousFraming`](crate::error::ErrorKind::AmbiguousFraming)).
fn refuse_ambiguous_framing(peer: std::net::SocketAddr) -> http::Response<crate::body::ProxyBody> {
    tracing::warn!(%peer, "request with both Content-Length and Transfer-Encoding refused");
    crate::proxy::respond::error(&crate::error::ErrorKind::AmbiguousFraming.into())
}
