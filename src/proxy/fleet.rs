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
use crate::admin::Acks;
use crate::body::ProxyBody;
use crate::cache::codec;
use crate::cache::decide::{self, Now, Serve};
use crate::cache::entry::CachedResponse;
use crate::cache::key::{origin_host, split_key, Key};
use crate::cache::shared::{
    lease_names, variant_field, Lease, Look, PurgeMsg, PurgeSink, Wake, RECHECK,
};
use crate::cache::Target;
use std::sync::atomic::Ordering;

impl Proxy {
    /// Writes a response just stored here to the shared tier, in the background, when it is
    /// small enough (`REDIS_MAX_OBJECT_BYTES`) and still worth keeping.
    pub(crate) fn share(self: &Arc<Self>, key: &Key, entry: &Arc<CachedResponse>) {
        if self.cache.shared().is_none() {
            return;
        }
        let (key, entry) = (key.clone(), entry.clone());
        let proxy = self.clone();
        self.background.spawn("share", async move {
            proxy.share_now(&key, &entry).await;
        });
    }

    /// [`Proxy::share`], awaited: whether the copy is in the tier now.
    pub(crate) async fn share_now(&self, key: &str, entry: &CachedResponse) -> bool {
        let Some(tier) = self.cache.shared() else {
            return false;
        };
        if entry.body_len() > tier.max_object_bytes() {
            return false;
        }
        let now = Instant::now();
        let Some(ttl) = decide::shared_ttl(entry, &self.settings, now) else {
            return false;
        };
        let blob = codec::encode(entry, key, now, SystemTime::now());
        tier.put(key, variant_field(&entry.vary), &blob, ttl).await
    }

    /// Fleet-wide single flight for a miss this instance leads: one round trip finds the
    /// stored copy, or takes the flight's lease (fetch for the fleet), or learns that another
    /// instance holds it — then waits for the holder's wake-up and looks again (also every
    /// [`RECHECK`], taking the lease over if the holder died). Fetches alone when there is no
    /// tier, Redis cannot say, the holder passed, the copy does not suit this request, or
    /// `REQ_TIMEOUT` ran out.
    pub(crate) async fn fleet_turn(
        &self,
        key: &Key,
        flight_key: &str,
        req: &HeaderMap,
    ) -> FleetTurn {
        let Some(tier) = self.cache.shared() else {
            return FleetTurn::Alone;
        };
        let (lease_key, channel) = lease_names(key, flight_key);
        let mut wake = tier.wake_waiter(&channel);
        let deadline = Instant::now() + self.config.upstream_timeout;
        let mut waited = false;
        let count = |waited: bool, counter: &std::sync::atomic::AtomicU64| {
            if waited {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        };
        loop {
            match tier.look_or_lease(key, &lease_key, &channel).await {
                Err(()) => return FleetTurn::Alone,
                Ok(Look::Stored(blobs)) => {
                    if let Some(entry) = self.usable_shared(key, blobs, req) {
                        count(waited, &tier.stats.lease_waits_served);
                        return FleetTurn::Found(entry);
                    }
                    // Only a copy this request cannot use (stale, another variant): fetch,
                    // but once for the fleet.
                    match tier.take_lease(&lease_key, &channel).await {
                        Ok(Some(lease)) => {
                            count(waited, &tier.stats.lease_waits_fetched);
                            return FleetTurn::Lead(lease);
                        }
                        Ok(None) => {}
                        Err(()) => return FleetTurn::Alone,
                    }
                }
                Ok(Look::Leased(lease)) => {
                    count(waited, &tier.stats.lease_waits_fetched);
                    return FleetTurn::Lead(lease);
                }
                Ok(Look::Held) => {}
            }
            waited = true;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() || wake.wait(RECHECK.min(left)).await == Some(Wake::Pass) {
                count(waited, &tier.stats.lease_waits_fetched);
                return FleetTurn::Alone;
            }
        }
    }

    /// Before refreshing `entry` (a hot key, at its refresh time) with a shared tier: adopt a
    /// newer copy another instance already put there, or take the key's flight lease — the
    /// same one a miss takes, so a miss elsewhere waits for this refresh instead of fetching
    /// too — and refresh for the fleet; if another instance holds it, leave it to that one
    /// (this instance adopts its copy at its next look, or reads it at its next miss).
    pub(crate) async fn refresh_turn(
        &self,
        key: &Key,
        flight_key: &str,
        entry: &CachedResponse,
    ) -> RefreshTurn {
        let Some(tier) = self.cache.shared() else {
            return RefreshTurn::Refresh(None);
        };
        let req = entry.vary.request_headers();
        if let Some(hit) = self.cache.lookup_shared(key, &req).await {
            // The same copy read back differs only by rounding (ms); a refreshed one lives
            // longer by the time between the two fetches.
            let newer =
                hit.entry.expires_at() > entry.expires_at() + std::time::Duration::from_millis(100);
            if newer && hit.entry.is_fresh(Instant::now()) {
                self.store(key.clone(), hit.entry.clone());
                return RefreshTurn::Adopted(hit.entry);
            }
        }
        let (lease_key, channel) = lease_names(key, flight_key);
        match tier.take_lease(&lease_key, &channel).await {
            Ok(Some(lease)) => RefreshTurn::Refresh(Some(lease)),
            Ok(None) => RefreshTurn::Elsewhere,
            // Redis cannot say: refresh here, as without a shared tier.
            Err(()) => RefreshTurn::Refresh(None),
        }
    }

    /// Runs `fill` holding the fleet's `lease` (renewed meanwhile); then writes a stored copy
    /// to the tier, wakes the waiting instances and gives the lease back. Without a lease,
    /// just the fill.
    pub(crate) async fn fill_for_fleet(
        &self,
        fill: impl std::future::Future<Output = crate::cache::FetchOutcome>,
        key: &str,
        lease: Option<Lease>,
    ) -> crate::cache::FetchOutcome {
        let (Some(lease), Some(tier)) = (lease, self.cache.shared()) else {
            return fill.await;
        };
        tokio::pin!(fill);
        let outcome = tokio::select! {
            outcome = &mut fill => outcome,
            () = tier.keep(&lease) => fill.await, // (keeping never ends)
        };
        let wake = match &outcome {
            crate::cache::FetchOutcome::Stored(entry) if self.share_now(key, entry).await => {
                Wake::Stored
            }
            _ => Wake::Pass,
        };
        tier.finish(&lease, wake).await;
        outcome
    }

    /// A copy from the tier this request may be served: put into memory (not written back).
    fn usable_shared(
        &self,
        key: &Key,
        blobs: Vec<Vec<u8>>,
        req: &HeaderMap,
    ) -> Option<Arc<CachedResponse>> {
        let hit = crate::cache::Cache::select_shared(key, blobs, req)?;
        let client = decide::client_directives(req, &self.settings);
        let now = Now::at(Instant::now());
        if decide::serve(Some(&hit.entry), &client, &self.settings, now) != Serve::Fresh {
            return None;
        }
        self.store(key.clone(), hit.entry.clone());
        Some(hit.entry)
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

    /// Announces a purge applied here to the other instances and waits (up to 5 s) for
    /// their acknowledgements; `None` without a shared tier. When Redis is away the purge
    /// reaches them later through the tier's pending purges and their replay of the stream.
    pub(crate) async fn announce_purge(
        &self,
        prefix: bool,
        path: &str,
        host: Option<&str>,
    ) -> Option<Acks> {
        let tier = self.cache.shared()?;
        let Some(id) = tier.announce(prefix, path, host).await else {
            return Some(Acks {
                acks: 1,
                instances: 1.max(tier.stats.last_live.load(Ordering::Relaxed) as usize),
            });
        };
        let (acks, instances) = tier.acks(&id, ACK_WAIT).await;
        Some(Acks { acks, instances })
    }

    /// A successful unsafe request invalidated `key` here: remove it from the shared tier and
    /// from the other instances' memory.
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
                // The other instances drop their copies too (not awaited: no reply waits).
                tier.announce(false, &path, Some(&host)).await;
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

/// How long an admin request waits at most for the live instances to acknowledge its purge
/// (it answers as soon as all did; one that stopped drops out of the live count after 3 s).
const ACK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Another instance's purge, read from the stream: applied to this instance's memory.
impl PurgeSink for Proxy {
    fn apply(&self, msg: &PurgeMsg) {
        let host = msg.host.as_deref();
        self.cache
            .note_purge(msg.prefix, &msg.path, host, Instant::now());
        let target = if msg.prefix {
            Target::Prefix(&msg.path)
        } else {
            Target::Path(&msg.path)
        };
        let removed = self
            .cache
            .purge(target, |o| host.is_none_or(|h| origin_host(o) == h));
        self.metrics
            .evicted(crate::metrics::Eviction::Admin, removed);
        tracing::debug!(path = %msg.path, prefix = msg.prefix, removed, "purge from the fleet applied");
    }

    fn missed(&self) {
        self.cache.note_purge(true, "", None, Instant::now());
        let removed = self.cache.purge(Target::Prefix(""), |_| true);
        self.metrics
            .evicted(crate::metrics::Eviction::Admin, removed);
    }
}

/// What to do about a hot key's refresh in a fleet.
pub(crate) enum RefreshTurn {
    /// Refresh it here, for the fleet when holding its lease (`None`: no tier, or Redis
    /// cannot say).
    Refresh(Option<Lease>),
    /// Another instance refreshed it already: its copy is now stored here too.
    Adopted(Arc<CachedResponse>),
    /// Another instance is refreshing it: nothing to do here (this instance adopts that copy
    /// at its next look, or fetches at its next miss).
    Elsewhere,
}

/// What the fleet says about a miss this instance leads.
pub(crate) enum FleetTurn {
    /// Fetch it for the fleet, holding this lease.
    Lead(Lease),
    /// Another instance fetched it: here it is (already in memory).
    Found(Arc<CachedResponse>),
    /// Fetch it alone.
    Alone,
}

/// The response for a copy found in the shared tier.
pub(crate) fn respond_shared(
    entry: &Arc<CachedResponse>,
    head: bool,
    req: &HeaderMap,
) -> Response<ProxyBody> {
    let mut resp = respond::from_entry(entry, head, req, CacheStatus::Hit, Instant::now());
    resp.headers_mut().insert(
        CACHE_STATUS,
        HeaderValue::from_static("edgecache; hit; detail=redis"),
    );
    resp
}
