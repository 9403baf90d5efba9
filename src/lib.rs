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
//!   [`connection`] holds each connection to its head, keep-alive and stall deadlines.
//! * [`proxy`] — the pipeline: route → lookup → coalesced fetch → store → respond; plus the
//!   expiry task that refreshes hot keys and drops cold ones. [`proxy::headers`] rewrites
//!   headers between the two sides; [`proxy::purge`] executes admin requests.
//! * [`admin`] — `Clear-Cache` requests, pure: parse and authorise them (clear/refresh by
//!   path under every host, prefix or everything), decide refresh or drop per entry, shape
//!   the JSON report.
//! * [`cache`] — the cache itself, reached only through the [`cache::Cache`] facade (lookup,
//!   insert-with-timer, invalidate, purge, stats): [`cache::policy`] (pure RFC 9111 rules),
//!   [`cache::decide`] (pure: serve fresh/stale/revalidate, stale-on-error, timer time, the
//!   expiry task's refresh/recheck/drop),
//!   [`cache::conditional`] (pure RFC 9110 preconditions, ETag/304), [`cache::key`] (origin +
//!   path + query, and `Vary`),
//!   [`cache::entry`], [`cache::store`] (the sharded map), [`cache::coalesce`] (single
//!   flight) and [`cache::expiry`] (one timer heap for all entries).
//! * [`upstream`] — the backends: weighted balancing, health checks, circuit breakers,
//!   pooled clients; [`error`] maps failures to 502/503/504.
//! * [`ops`] — the operator listener (`OPS_LISTEN_ADDR`: `/status`, `/metrics`), off the
//!   proxy port;
//!   [`metrics`] holds the counters.
//! * [`supervise`] — accept with backoff, and restarts of background tasks that panic.
//! * [`config`] — environment variables to a validated [`config::Config`].
//! * [`body`] — the body type shared by hits (shared `Bytes`) and streams.
//!
//! Imports point down this list and never back: `proxy` uses `admin` and `cache`; `admin`
//! uses `cache` but not `proxy`; `cache` uses neither; `ops` reads `proxy`.

pub mod admin;
pub mod body;
pub mod cache;
pub mod config;
pub mod connection;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod metrics;
pub mod ops;
pub mod proxy;
pub mod server;
pub mod supervise;
pub mod upstream;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

pub use config::Config;

/// Runs the proxy on an already bound `listener` (and the operator routes on `ops`, when
/// given) until `shutdown` resolves and in-flight requests have drained.
pub async fn run(
    listener: TcpListener,
    ops: Option<TcpListener>,
    config: Config,
    shutdown: impl Future<Output = ()>,
) {
    let proxy = Arc::new(proxy::Proxy::new(config));
    let ops = ops.map(|l| tokio::spawn(ops::serve(l, proxy.clone())));
    server::serve(listener, proxy, shutdown).await;
    if let Some(task) = ops {
        task.abort();
    }
}
