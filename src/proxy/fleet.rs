//! The pipeline's side of the shared tier (`REDIS_URL`, [`crate::cache::shared`]): a miss
//! led by this instance looks there before going upstream; a response stored here is
//! written there; purges and invalidations remove it there too. Without `REDIS_URL` every
//! function here does nothing.

use std::sync::Arc;
use std::time::SystemTime;

use http::header::{HeaderMap, HeaderValue};
use http::Response;
use tokio::time::Instant;

use super::headers::CACHE_STATUS;
use super::respond::{self, CacheStatus};
use super::Proxy;
use crate::body::ProxyBody;
use crate::cache::codec;
use crate::cache::decide::{self, Now, Serve};
use crate::cache::entry::CachedResponse;
use crate::cache::key::{origin_host, split_key};
use crate::cache::shared::variant_field;
use crate::cache::Target;

impl Proxy {
    /// A usable copy of `key` from the shared tier for a request with headers `req`: put into
    /// memory (without writing it back) and returned, to be served as a `HIT` whose
    /// `Cache-Status` says `detail=redis`. `None` when there is no tier, no copy, or the copy
    /// is not fresh enough for this request.
    pub(crate) async fn look_in_shared(
        &self,
        key: &Arc<str>,
        req: &HeaderMap,
    ) -> Option<Arc<CachedResponse>> {
        let hit = self.cache.lookup_shared(key, req).await?;
        let client = decide::client_directives(req, &self.settings);
        let now = Now::at(Instant::now());
        if decide::serve(Some(&hit.entry), &client, &self.settings, now) != Serve::Fresh {
            return None;
        }
        self.store(key.clone(), hit.entry.clone());
        Some(hit.entry)
    }

    /// Writes a response just stored here to the shared tier, in the background, when it is
    /// small enough (`REDIS_MAX_OBJECT_BYTES`) and still worth keeping.
    pub(crate) fn share(self: &Arc<Self>, key: &Arc<str>, entry: &Arc<CachedResponse>) {
        let Some(tier) = self.cache.shared() else {
            return;
        };
        if entry.body.len() > tier.max_object_bytes() {
            return;
        }
        let now = Instant::now();
        let Some(ttl) = decide::shared_ttl(entry, &self.settings, now) else {
            return;
        };
        let blob = codec::encode(entry, key, now, SystemTime::now());
        let field = variant_field(&entry.vary);
        let key = key.clone();
        let proxy = self.clone();
        self.background.spawn("share", async move {
            if let Some(tier) = proxy.cache.shared() {
                tier.put(&key, field, blob.to_vec(), ttl).await;
            }
        });
    }

    /// Removes what an admin request addresses from the shared tier too — before it is
    /// refreshed, so a refresh never finds the old copy there. A purge Redis cannot take now
    /// is kept and sent when it can (`cache::shared`); until then reads of it miss.
    pub(crate) async fn purge_shared(&self, target: Target<'_>, host: Option<&str>) {
        let Some(tier) = self.cache.shared() else {
            return;
        };
        match target {
            Target::Path(path) => {
                tier.purge_path(path, host).await;
            }
            // A host-narrowed prefix purge removes the prefix under every host there: the
            // tier cannot list hosts by prefix cheaply, and over-purging is safe.
            Target::Prefix(prefix) => {
                tier.purge_prefix(prefix).await;
            }
        }
    }

    /// A successful unsafe request invalidated `key` here: remove it from the shared tier.
    pub(crate) fn invalidate_shared(self: &Arc<Self>, key: &str) {
        if self.cache.shared().is_none() {
            return;
        }
        let (origin, path) = split_key(key);
        let (host, path) = (origin_host(origin).to_string(), path.to_string());
        let proxy = self.clone();
        self.background.spawn("share", async move {
            if let Some(tier) = proxy.cache.shared() {
                tier.purge_path(&path, Some(&host)).await;
            }
        });
    }

    /// Sends purges that could not reach Redis once it is back; runs until shutdown.
    pub async fn run_shared_retry(self: Arc<Self>) {
        let Some(tier) = self.cache.shared() else {
            return;
        };
        let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if tier.pending_purges() > 0 {
                let left = tier.retry_pending().await;
                if left == 0 {
                    tracing::info!("redis back: pending purges reached the shared tier");
                }
            }
        }
    }
}

/// Marks a response served from the shared tier (`Cache-Status: edgecache; hit;
/// detail=redis`).
pub(crate) fn mark_shared(resp: &mut Response<ProxyBody>) {
    resp.headers_mut().insert(
        CACHE_STATUS,
        HeaderValue::from_static("edgecache; hit; detail=redis"),
    );
}

/// The response for a copy found in the shared tier.
pub(crate) fn respond_shared(
    entry: &CachedResponse,
    head: bool,
    req: &HeaderMap,
) -> Response<ProxyBody> {
    let mut resp = respond::from_entry(entry, head, req, CacheStatus::Hit, Instant::now());
    mark_shared(&mut resp);
    resp
}
