//! Executes admin requests (`Clear-Cache`): [`crate::admin`] parses and authorises them and
//! shapes the report; this module does what they ask against the cache — drops variants,
//! starts refreshes (awaiting them for one path), counts evictions — and logs and counts the
//! outcome. Compare pingora's `proxy_purge.rs`.

use std::sync::Arc;
use tokio::time::Instant;

use http::header::{HeaderValue, RETRY_AFTER};
use http::{Request, Response};
use hyper::body::Incoming;

use super::headers::Downstream;
use super::{respond, Proxy};
use crate::admin::{self, AdminRefusal, AdminRequest, Outcome, Refreshes, Reply, Scope};
use crate::body::ProxyBody;
use crate::cache::coalesce::Waiter;
use crate::cache::key::{path_and_query, Key};
use crate::cache::FetchOutcome;
use crate::error::UpstreamError;
use crate::metrics::Eviction;

/// A refresh an admin request started: the key and the refresh's waiter.
type Started = (Key, Waiter<FetchOutcome>);

impl Proxy {
    /// Handles an admin request (one that carries `Clear-Cache`); it never goes upstream.
    pub(crate) async fn purge(
        self: &Arc<Self>,
        req: Request<Incoming>,
        down: &Downstream<'_>,
    ) -> Response<ProxyBody> {
        let path = path_and_query(req.uri());
        let client = down.client(req.headers());
        let parsed = admin::authorise(
            path,
            req.headers(),
            self.config.admin_key.as_ref(),
            &self.admin_throttle,
            client,
            Instant::now(),
        );
        let request = match parsed {
            Ok(request) => request,
            Err(refusal) => {
                match refusal {
                    AdminRefusal::Disabled => tracing::warn!(
                        %path, %client,
                        "admin request refused: CLEAR_CACHE_KEY is not set"
                    ),
                    AdminRefusal::Unauthorized { throttling_started } => {
                        if throttling_started {
                            tracing::warn!(
                                %client,
                                throttle_secs = admin::THROTTLE_WINDOW.as_secs(),
                                "admin key guessing: throttling this address"
                            );
                        }
                        tracing::warn!(%path, %client, "admin request with a missing or wrong Clear-Cache-Key");
                    }
                    AdminRefusal::Throttled { .. } | AdminRefusal::BadScope => {}
                }
                let reply = refusal.reply();
                self.metrics.admin(reply.action);
                return into_response(reply);
            }
        };
        // The shared tier first: a refresh must not find the old copy there. Then no fill
        // that started before this may store, nor be joined by a later request.
        let (prefix, host) = (request.scope != Scope::Exact, request.hosts.host());
        let target_path = match request.target() {
            crate::cache::Target::Path(p) | crate::cache::Target::Prefix(p) => p.to_string(),
        };
        self.purge_shared(request.target(), host).await;
        self.cache
            .note_purge(prefix, &target_path, host, Instant::now());
        let outcome = match request.scope {
            Scope::Exact => self.purge_path(&request).await,
            Scope::Prefix | Scope::All => self.purge_many(&request),
        };
        // Then every other instance's memory (REDIS_URL), counting who acknowledged.
        let acks = self.announce_purge(prefix, &target_path, host).await;
        let reply = admin::report_fleet(&request, &outcome, acks);
        self.metrics.admin(reply.action);
        tracing::info!(
            path = %request.path,
            mode = ?request.mode,
            scope = ?request.scope,
            host = request.hosts.host().unwrap_or("*"),
            action = reply.action.as_str(),
            status = reply.status.as_u16(),
            "admin request"
        );
        into_response(reply)
    }

    /// One path (under every host the filter lets through): clear or refresh each stored
    /// variant, waiting for refreshes to land.
    /// Refreshes or drops, per its mode, each stored variant `req` addresses. Returns how
    /// many were dropped and the refreshes started (their waiters may be awaited or dropped).
    fn refresh_or_drop(self: &Arc<Self>, req: &AdminRequest) -> (usize, Vec<Started>) {
        let window = self.config.refresh_window;
        let mut cleared = 0;
        let mut waiters = Vec::new();
        for (key, variants) in self
            .cache
            .select(req.target(), |o| req.hosts.matches_origin(o))
        {
            for entry in variants {
                if req.mode.refreshes(&entry, window) {
                    waiters.push((key.clone(), self.refresh(key.clone(), entry)));
                } else if self.cache.invalidate_version(&key, entry.id) {
                    cleared += 1;
                }
            }
        }
        self.metrics.evicted(Eviction::Admin, cleared);
        (cleared, waiters)
    }

    async fn purge_path(self: &Arc<Self>, req: &AdminRequest) -> Outcome {
        let (cleared, waiters) = self.refresh_or_drop(req);
        if waiters.is_empty() {
            return Outcome::Path {
                cleared,
                refreshes: None,
            };
        }
        let mut refreshes = Refreshes {
            ok: 0,
            failure: None,
        };
        for (key, w) in waiters {
            match w.wait_final().await {
                Some(FetchOutcome::Stored(_)) => refreshes.ok += 1,
                // The upstream no longer lets it be shared, or it is now too large to store:
                // the old copy must go too.
                Some(FetchOutcome::NotShared | FetchOutcome::Streaming(_)) => {
                    self.metrics
                        .evicted(Eviction::Admin, self.cache.invalidate(&key));
                    refreshes.ok += 1;
                }
                Some(FetchOutcome::Failed(e)) => refreshes.failure = Some(e),
                None => {
                    refreshes.failure = Some(UpstreamError::BadResponse("refresh abandoned".into()))
                }
            }
        }
        Outcome::Path {
            cleared,
            refreshes: Some(refreshes),
        }
    }

    /// Many keys (prefix or all): clears happen now, refreshes start in the background.
    /// Many keys: clears happen now, refreshes run in the background (not awaited).
    fn purge_many(self: &Arc<Self>, req: &AdminRequest) -> Outcome {
        if req.mode == admin::Mode::Clear {
            let cleared = self
                .cache
                .purge(req.target(), |o| req.hosts.matches_origin(o));
            self.metrics.evicted(Eviction::Admin, cleared);
            return Outcome::Many {
                cleared,
                refreshing: 0,
            };
        }
        let (cleared, waiters) = self.refresh_or_drop(req);
        Outcome::Many {
            cleared,
            refreshing: waiters.len(),
        }
    }
}

fn into_response(reply: Reply) -> Response<ProxyBody> {
    let mut resp = respond::json(reply.status, reply.body);
    if let Some(secs) = reply.retry_after {
        resp.headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}
