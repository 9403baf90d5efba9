//! The cache's verdict on one request ([`CacheStatus`]): the vocabulary shared by the
//! responses (`X-Cache-Status`, `Cache-Status`) and the metrics.

use http::HeaderValue;

/// What the cache did for a request, sent as `X-Cache-Status` (and counted by it in
/// `/metrics`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    /// Served from a fresh stored response.
    Hit,
    /// Not stored: fetched from upstream (alone or as one of a coalesced group).
    Miss,
    /// Served a stored response past its freshness while it is refreshed in the background,
    /// or because the upstream failed (stale-if-error).
    Stale,
    /// A stale stored response was revalidated or refetched from upstream for this request.
    Refresh,
    /// The cache was not consulted (methods other than GET/HEAD).
    Bypass,
}

impl CacheStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "HIT",
            CacheStatus::Miss => "MISS",
            CacheStatus::Stale => "STALE",
            CacheStatus::Refresh => "REFRESH",
            CacheStatus::Bypass => "BYPASS",
        }
    }

    /// The `X-Cache-Status` value.
    pub fn header(self) -> HeaderValue {
        HeaderValue::from_static(self.as_str())
    }
}
