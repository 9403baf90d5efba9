//! Building downstream responses: from a stored entry (200/HEAD/304 with `Age` and
//! `X-Cache-Status`), from a passed-through upstream response, or for an error.

use std::time::Instant;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};

use super::headers::X_CACHE_STATUS;
use crate::body::ProxyBody;
use crate::cache::conditional::not_modified;
use crate::cache::entry::CachedResponse;
use crate::error::UpstreamError;

/// What the cache did for a request, sent as `X-Cache-Status`.
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

    fn header(self) -> HeaderValue {
        HeaderValue::from_static(self.as_str())
    }
}

/// Headers a 304 carries over from the 200 it stands for (RFC 9110 §15.4.5).
const NOT_MODIFIED_HEADERS: [header::HeaderName; 7] = [
    header::CACHE_CONTROL,
    header::CONTENT_LOCATION,
    header::DATE,
    header::ETAG,
    header::EXPIRES,
    header::LAST_MODIFIED,
    header::VARY,
];

/// Serves a stored response: `304` when the client's preconditions match, else the stored
/// status, headers and (unless `head`) body. The body is a shared `Bytes`, never copied.
pub fn from_entry(
    entry: &CachedResponse,
    head: bool,
    req: &HeaderMap,
    status: CacheStatus,
    now: Instant,
) -> Response<ProxyBody> {
    let age = HeaderValue::from(entry.age(now).as_secs());
    if entry.status.is_success() && not_modified(req, Some(&entry.etag), entry.last_modified) {
        let mut resp = Response::new(ProxyBody::Empty);
        *resp.status_mut() = StatusCode::NOT_MODIFIED;
        let h = resp.headers_mut();
        for name in NOT_MODIFIED_HEADERS {
            for v in entry.headers.get_all(&name) {
                h.append(name.clone(), v.clone());
            }
        }
        h.insert(header::AGE, age);
        h.insert(X_CACHE_STATUS, status.header());
        return resp;
    }
    let body = if head {
        ProxyBody::Empty
    } else {
        ProxyBody::Full(Some(entry.body.clone()))
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = entry.status;
    let mut headers = entry.headers.clone();
    headers.insert(header::AGE, age);
    headers.insert(X_CACHE_STATUS, status.header());
    *resp.headers_mut() = headers;
    resp
}

/// Marks a response that did not come from the store; for HEAD drops the body (the upstream
/// was asked for GET so the entry could be stored).
pub fn passed(
    mut resp: Response<ProxyBody>,
    head: bool,
    status: CacheStatus,
) -> Response<ProxyBody> {
    resp.headers_mut().insert(X_CACHE_STATUS, status.header());
    if head {
        *resp.body_mut() = ProxyBody::Empty;
    }
    resp
}

/// The response for an upstream failure.
pub fn upstream_error(err: &UpstreamError) -> Response<ProxyBody> {
    let body = match err.status() {
        StatusCode::GATEWAY_TIMEOUT => "upstream timed out\n",
        StatusCode::BAD_REQUEST => "bad request\n",
        _ => "upstream unavailable\n",
    };
    plain(err.status(), body)
}

/// A small plain-text response.
pub fn plain(status: StatusCode, body: &'static str) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// A small JSON response.
pub fn json(status: StatusCode, body: String) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::full(body));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}
