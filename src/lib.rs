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
//! * [`server`] — the shell: accept loop, HTTP/1.1 + h2c connections, graceful drain.
//! * [`proxy`] — the pipeline: route → lookup → coalesced fetch → store → respond; plus the
//!   expiry task that refreshes hot keys and drops cold ones. [`proxy::headers`] rewrites
//!   headers between the two sides.
//! * [`admin`] — `Clear-Cache` requests: clear/refresh by key, prefix or everything.
//! * [`cache`] — the cache itself: [`cache::policy`] (pure RFC 9111 rules),
//!   [`cache::conditional`] (pure RFC 9110 preconditions, ETag/304), [`cache::key`],
//!   [`cache::entry`], [`cache::store`] (the sharded map), [`cache::coalesce`] (single
//!   flight) and [`cache::expiry`] (one timer heap for all entries).
//! * [`upstream`] — the pooled client to the origin; [`error`] maps its failures to 502/504.
//! * [`config`] — environment variables to a validated [`config::Config`].
//! * [`body`] — the body type shared by hits (shared `Bytes`) and streams.

pub mod admin;
pub mod body;
pub mod cache;
pub mod config;
pub mod error;
pub mod proxy;
pub mod server;
pub mod upstream;

use std::future::Future;
use std::sync::Arc;

use tokio::net::TcpListener;

pub use config::Config;

/// Runs the proxy on an already bound `listener` until `shutdown` resolves.
pub async fn run(listener: TcpListener, config: Config, shutdown: impl Future<Output = ()>) {
    let proxy = Arc::new(proxy::Proxy::new(config));
    server::serve(listener, proxy, shutdown).await;
}
