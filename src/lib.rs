//! edgecache: a standalone caching reverse proxy.
//!
//! It answers repeated requests from memory, sends one upstream request per miss however many
//! clients ask at once, refreshes hot keys in the background before clients see a miss, and
//! lets the upstream service clear or refresh entries through a password-guarded admin path.
//!
//! # Layout
//!
//! A request flows top to bottom through these modules:
//!
//! * [`server`] — the shell: accept loop, HTTP/1.1 + h2c connections, graceful drain;
//!   [`server::deadline`] holds each connection to its head, keep-alive and stall deadlines,
//!   [`server::reclaim`] closes idle ones at `MAX_CONNECTIONS`, [`server::inflight`] counts
//!   requests in flight, [`server::head_scan`] spots `Content-Length` + `Transfer-Encoding`
//!   heads, and [`server::io`] wraps the client stream that feeds them.
//! * [`proxy`] — the pipeline: route → lookup → coalesced fetch → store → respond; plus the
//!   expiry task that refreshes hot keys and drops cold ones. [`proxy::fetch`] is the cache
//!   fill, which streams the response to every waiter as it arrives and stores it when
//!   complete; [`proxy::fleet`] reads and writes the shared tier around it (`REDIS_URL`);
//!   [`proxy::headers`] rewrites headers between the two sides; [`proxy::purge`] executes
//!   admin requests; [`proxy::routing`] holds the routes in force (swapped on SIGHUP, each
//!   with its own pool), applies a route before the cache and sends every upstream request
//!   within its route's limits and retries; [`proxy::release`] answers a request past its
//!   route's client deadline with `202` and a job.
//! * [`routes`] — the optional routes file (`ROUTES_FILE`): per-prefix policy (own upstream
//!   pool, cache on/off and TTL, query parameters left out of the key, injected headers,
//!   allowlist), parsed and validated as a pure function ([`routes::Routes::parse`]) and
//!   matched per request by longest prefix without allocating; [`routes::limit`] admits
//!   requests going upstream (GCRA rate limit with a bounded queue, in-flight cap),
//!   [`routes::retry`] decides retries (backoff with full jitter, a retry budget). It uses
//!   only `config` (the `UPSTREAM_URLS` syntax) and `metrics`.
//! * [`admin`] — `Clear-Cache` requests, pure: parse and authorise them (clear/refresh by
//!   path under every host, prefix or everything), decide refresh or drop per entry, shape
//!   the JSON report.
//! * [`cache`] — the cache itself, reached only through the [`cache::Cache`] facade (lookup,
//!   insert-with-timer, invalidate, purge, stats): [`cache::policy`] (pure RFC 9111 rules),
//!   [`cache::decide`] (pure: serve fresh/stale/revalidate, stale-on-error, timer time, the
//!   expiry task's refresh/recheck/drop),
//!   [`cache::conditional`] (pure RFC 9110 preconditions, ETag/304), [`cache::key`] (origin +
//!   path + query, and `Vary`),
//!   [`cache::entry`] (a stored response: one immutable head block — status, validators,
//!   header fields — and a small body, both owned by the entry and served as views that
//!   hold it; headers become a `HeaderMap` only when a response is built), [`cache::codec`] (that block's versioned encoding, and
//!   the shared tier's value: the same block behind the times, key and `Vary` selection),
//!   [`cache::shared`] (that tier on Redis: layout, breaker, purges kept while it is away),
//!   [`cache::store`] (the sharded map), [`cache::coalesce`] (single
//!   flight), [`cache::expiry`] (one timer heap for all entries) and [`cache::status`] (the
//!   `X-Cache-Status` verdict, shared with the metrics).
//! * [`upstream`] — the backends: weighted balancing, health checks, circuit breakers,
//!   pooled clients; [`upstream::tls`] connects to `https://` ones (rustls).
//! * [`error`] — failures as [`error::ProxyError`] (a kind and a side: upstream, downstream,
//!   internal) and the one mapping from a failure to its status, body and headers; the
//!   request body's fault ([`error::BodyFault`]) that travels back through hyper's error.
//! * [`jobs`] — async completion jobs (issue 14), the building blocks: the bounded job
//!   registry (ids, de-duplication of identical requests, expiry), the job URL's answers
//!   (`/_edgecache/jobs/{id}`), callback URLs checked against `CALLBACK_ALLOWED_HOSTS`, their
//!   signed delivery with retries ([`jobs::callback`]) and the HMAC signature
//!   ([`jobs::sign`]). Pure but for the delivery task; [`proxy::release`] wires it in. It uses `config`, `error`, `metrics` and `supervise`, no pipeline
//!   module.
//! * [`ops`] — the operator listener (`OPS_LISTEN_ADDR`: `/status`, `/metrics`), off the
//!   proxy port;
//!   [`metrics`] holds the counters and their label enums (it imports no pipeline module).
//! * [`supervise`] — accept with backoff, restarts of background tasks that panic, and the
//!   one cancellation tree ([`supervise::Background`]) all background work runs under:
//!   cancelled and awaited at shutdown, so a panic then is reported, not lost.
//! * [`config`] — environment variables and flags to a validated [`config::Config`]; the
//!   settings table ([`config::SETTINGS`]) that `edgecache --help` is generated from.
//! * [`body`] — the body type shared by hits (shared [`body::Pieces`]) and streams; a request
//!   body passed upstream fails with a [`error::BodyFault`]. [`body::fanout`] shares one
//!   body being fetched among every request waiting on it, within the stream buffer bounds;
//!   the flights in [`cache::coalesce`] own one each.
//! * [`alloc`] — the daemon's global allocator (mimalloc, called as glibc's `malloc` is so
//!   entries keep their size class) and its options; it uses no other module.
//!
//! Imports point down this list and never back: `proxy` uses `routes`, `jobs`, `admin` and
//! `cache`; `admin`
//! uses `cache` but not `proxy`; `cache` uses neither; `ops` reads `proxy`; `proxy`,
//! `cache` and `upstream` use `body`; `body` uses `error`, and `error` uses no module.

pub mod admin;
pub mod alloc;
pub mod body;
pub mod cache;
pub mod config;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod jobs;
pub mod metrics;
pub mod ops;
pub mod proxy;
pub mod routes;
pub mod server;
pub mod supervise;
pub mod upstream;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

pub use config::Config;

/// Installs rustls's process-wide crypto provider, `ring`, once: redis-rs (`rediss://`) builds
/// its `rustls::ClientConfig` with the process default and offers no way to pass one. (HTTPS
/// upstreams pass `ring` explicitly, src/upstream/tls.rs, and need nothing installed.)
/// Called at the top of [`run`]; calling it again does nothing. `ring` and never `aws-lc-rs`:
/// the latter's build needs cmake and clang (see Cargo.toml).
pub fn install_crypto_provider() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Err: another provider was installed first (by an embedding program): keep it.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

/// Runs the proxy on an already bound `listener` (and the operator routes on `ops`, when
/// given) until `shutdown` resolves, in-flight requests have drained and background work
/// (expiry, health probes, refreshes, the operator listener and its connections) has been
/// cancelled and has ended. Errs if any of that background work panicked during shutdown
/// (each panic is in the error log); the daemon then exits 1.
///
/// `routes`: `ROUTES_FILE` as loaded at start-up; with it, SIGHUP reads the file again.
pub async fn run(
    listener: TcpListener,
    ops: Option<TcpListener>,
    config: Config,
    routes: Option<routes::Routes>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), supervise::PanickedInShutdown> {
    install_crypto_provider();
    let proxy = Arc::new(proxy::Proxy::new(config));
    if let Some(routes) = routes {
        proxy.install_routes(routes);
        reload_on_sighup(&proxy);
        let jobs_proxy = proxy.clone();
        proxy.background.spawn("jobs_sweep", async move {
            // Frees finished and expired jobs while no request comes to do it (requests
            // sweep as they use the registry).
            let every = std::time::Duration::from_secs(1);
            jobs_proxy.jobs.sweep_every(every).await;
        });
    }
    if let Some(l) = ops {
        // On the background tree: up while connections drain, cancelled with the rest.
        proxy
            .background
            .spawn("operator_listener", ops::serve(l, proxy.clone()));
    }
    server::serve(listener, proxy.clone(), shutdown).await;
    match proxy.background.panicked_in_shutdown() {
        0 => Ok(()),
        n => Err(supervise::PanickedInShutdown(n)),
    }
}

/// Reads `ROUTES_FILE` again on each SIGHUP ([`proxy::Proxy::reload_routes`]), on the
/// background tree.
fn reload_on_sighup(proxy: &Arc<proxy::Proxy>) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hangups = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(error) => {
                tracing::error!(%error, "cannot install the SIGHUP handler: routes reload off");
                return;
            }
        };
        let p = proxy.clone();
        proxy.background.spawn("routes_reload", async move {
            while hangups.recv().await.is_some() {
                p.reload_routes();
            }
        });
    }
}
