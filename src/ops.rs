//! The operator listener (`OPS_LISTEN_ADDR`, default `127.0.0.1:9000`, so it is not public
//! by default): `GET /status` — backends with their health and breaker state, and cache size
//! — as JSON, and `GET /metrics` in the Prometheus text format. Kept off the proxy port so no
//! client can reach it through the proxy.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;

use crate::body::ProxyBody;
use crate::metrics::Listener;
use crate::proxy::respond;
use crate::proxy::Proxy;
use crate::upstream::BackendStatus;

/// Serves the operator routes until the proxy's background tree is cancelled (run it with
/// [`crate::supervise::Background::spawn`]; its connections are spawned there too, so they
/// end with it). A failing accept (out of file descriptors) is logged, counted and backed off
/// from, as on the proxy port.
pub async fn serve(listener: TcpListener, proxy: Arc<Proxy>) {
    loop {
        let (stream, _) =
            crate::supervise::accept(&listener, &proxy.metrics, Listener::Operator).await;
        let conn_proxy = proxy.clone();
        proxy.background.spawn("operator_connection", async move {
            let proxy = conn_proxy;
            let svc = service_fn(move |req| {
                let proxy = proxy.clone();
                async move { Ok::<_, Infallible>(route(&proxy, req)) }
            });
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn route(proxy: &Proxy, req: Request<Incoming>) -> Response<ProxyBody> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/status") => respond::json(StatusCode::OK, status_json(proxy)),
        (&Method::GET, "/metrics") => {
            let mut resp = respond::plain(StatusCode::OK, "");
            *resp.body_mut() = ProxyBody::full(metrics_text(proxy));
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        (&Method::GET, "/health") => respond::plain(StatusCode::OK, "ok\n"),
        _ => respond::plain(
            StatusCode::NOT_FOUND,
            "not found: try /status or /metrics\n",
        ),
    }
}

/// All series in the Prometheus text exposition format.
pub fn metrics_text(proxy: &Proxy) -> String {
    let stats = proxy.cache.stats();
    let mut out = String::with_capacity(8192);
    proxy.metrics.render(&mut out);
    let gauge = |out: &mut String, name: &str, help: &str, v: usize| {
        crate::metrics::series(out, name, "gauge", help);
        let _ = writeln!(out, "{name} {v}");
    };
    gauge(
        &mut out,
        "edgecache_cache_entries",
        "Stored responses (variants).",
        stats.entries,
    );
    gauge(
        &mut out,
        "edgecache_cache_bytes",
        "Accounted bytes of stored responses.",
        stats.bytes,
    );
    gauge(
        &mut out,
        "edgecache_inflight_fetches",
        "Upstream fetches other requests can join.",
        stats.in_flight,
    );
    gauge(
        &mut out,
        "edgecache_stream_buffer_bytes",
        "Bytes held for responses streamed to several requests and not stored.",
        stats.stream_buffer_bytes,
    );
    crate::metrics::series(
        &mut out,
        "edgecache_stream_cutoffs_total",
        "counter",
        "Requests cut off mid-body for falling further behind a shared response than STREAM_BUFFER_BYTES.",
    );
    let _ = writeln!(
        out,
        "edgecache_stream_cutoffs_total {}",
        stats.stream_cutoffs
    );
    if let Some(table) = proxy.route_table() {
        table.routes.render_metrics(&mut out);
        proxy.jobs.render_metrics(&mut out);
        proxy.callbacks.render_metrics(&mut out);
    }
    if let Some(tier) = proxy.cache.shared() {
        render_shared(&mut out, tier);
    }
    proxy.upstream.render_metrics(&mut out);
    out
}

/// The shared tier's series (only with `REDIS_URL`).
fn render_shared(out: &mut String, tier: &crate::cache::shared::SharedTier) {
    use std::sync::atomic::Ordering::Relaxed;
    let s = &tier.stats;
    crate::metrics::series(
        out,
        "edgecache_redis_requests_total",
        "counter",
        "Operations on the shared tier (REDIS_URL) by result; skipped: the breaker kept Redis out of the path, or a pending purge covers the key.",
    );
    for (op, result, n) in [
        ("get", "hit", &s.get_hit),
        ("get", "miss", &s.get_miss),
        ("get", "error", &s.get_error),
        ("get", "skipped", &s.get_skipped),
        ("set", "ok", &s.set_ok),
        ("set", "error", &s.set_error),
        ("set", "skipped", &s.set_skipped),
        ("purge", "ok", &s.purge_ok),
        ("purge", "error", &s.purge_error),
    ] {
        let _ = writeln!(
            out,
            "edgecache_redis_requests_total{{op=\"{op}\",result=\"{result}\"}} {}",
            n.load(Relaxed)
        );
    }
    crate::metrics::series(
        out,
        "edgecache_redis_lease_waits_total",
        "counter",
        "Misses that waited for another instance's fetch: served its copy from Redis, or fetched after all (it passed, died, or REQ_TIMEOUT ran out).",
    );
    for (result, n) in [
        ("served", &s.lease_waits_served),
        ("fetched", &s.lease_waits_fetched),
    ] {
        let _ = writeln!(
            out,
            "edgecache_redis_lease_waits_total{{result=\"{result}\"}} {}",
            n.load(Relaxed)
        );
    }
    crate::metrics::series(
        out,
        "edgecache_redis_leases_total",
        "counter",
        "Fleet leases asked for (one per miss led here that Redis did not have).",
    );
    let _ = writeln!(
        out,
        "edgecache_redis_leases_total {}",
        s.lease_tries.load(Relaxed)
    );
    crate::metrics::series(
        out,
        "edgecache_redis_breaker_open",
        "gauge",
        "1 while Redis is out of the request path after repeated failures.",
    );
    let _ = writeln!(
        out,
        "edgecache_redis_breaker_open {}",
        u8::from(tier.breaker_open())
    );
    crate::metrics::series(
        out,
        "edgecache_redis_pending_purges",
        "gauge",
        "Purges applied here that have not reached Redis yet.",
    );
    let _ = writeln!(
        out,
        "edgecache_redis_pending_purges {}",
        tier.pending_purges()
    );
}

/// The `GET /status` body (the field names are the JSON keys).
#[derive(serde::Serialize)]
struct Status {
    backends: Vec<BackendStatus>,
    panic_mode: bool,
    cache: CacheSummary,
    /// `ROUTES_FILE`'s routes (injected header names, never values); absent without one.
    #[serde(skip_serializing_if = "Option::is_none")]
    routes: Option<crate::routes::RoutesStatus>,
}

#[derive(serde::Serialize)]
struct CacheSummary {
    entries: usize,
    bytes: usize,
    in_flight: usize,
}

/// `{"backends":[…],"panic_mode":false,"cache":{"entries":N,"bytes":N,"in_flight":N}}`
pub fn status_json(proxy: &Proxy) -> String {
    let stats = proxy.cache.stats();
    let status = Status {
        backends: proxy.upstream.status(),
        panic_mode: proxy.upstream.panic_mode(),
        cache: CacheSummary {
            entries: stats.entries,
            bytes: stats.bytes,
            in_flight: stats.in_flight,
        },
        routes: proxy.route_table().map(|t| t.routes.status()),
    };
    // Plain structs of strings, numbers and booleans: serializing them cannot fail.
    serde_json::to_string(&status).unwrap_or_else(|_| "{}".into())
}
