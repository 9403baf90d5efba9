//! Building downstream responses: from a stored entry (200/HEAD/304 with `Age` and
//! `X-Cache-Status`), from a passed-through upstream response, or for an error ([`error`]:
//! the [`ProxyError::reply`] mapping made into a response).

use tokio::time::Instant;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};

use super::headers::{CACHE_STATUS, X_CACHE_STATUS};
use crate::body::ProxyBody;
use crate::cache::conditional::not_modified;
use crate::cache::entry::CachedResponse;
use crate::cache::range::{self, RangeReply};
pub use crate::cache::status::CacheStatus;
use crate::error::ProxyError;

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

/// Serves a stored response: `304` when the client's preconditions match, a `206`/`416` for a
/// byte range, else the stored status, headers and (unless `head`) body. The body is a shared
/// `Bytes`, never copied (a range is a slice of it).
pub fn from_entry(
    entry: &CachedResponse,
    head: bool,
    req: &HeaderMap,
    status: CacheStatus,
    now: Instant,
) -> Response<ProxyBody> {
    let age = HeaderValue::from(entry.age(now).as_secs());
    let cache_status = entry_cache_status(entry, status, now);
    // RFC 9111 §4.3.2: without `Last-Modified`, `If-Modified-Since` is compared with the
    // stored response's `Date`.
    let last_modified = entry.last_modified.or_else(|| {
        req.contains_key(header::IF_MODIFIED_SINCE)
            .then(|| crate::cache::policy::http_date(&entry.headers, header::DATE))
            .flatten()
    });
    if entry.status.is_success() && not_modified(req, Some(&entry.etag), last_modified) {
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
        h.insert(CACHE_STATUS, cache_status);
        return resp;
    }
    let len = entry.body.len() as u64;
    let reply = if entry.status == StatusCode::OK {
        range::select(req, len, &entry.etag, entry.last_modified)
    } else {
        RangeReply::Full
    };
    let mut headers = entry.headers.clone();
    headers.insert(header::AGE, age);
    headers.insert(X_CACHE_STATUS, status.header());
    headers.insert(CACHE_STATUS, cache_status);
    let (code, body) = match reply {
        RangeReply::Full => (entry.status, entry.body.clone()),
        RangeReply::Partial { start, end } => {
            let content_range = format!("bytes {start}-{end}/{len}");
            if let Ok(v) = HeaderValue::from_str(&content_range) {
                headers.insert(header::CONTENT_RANGE, v);
            }
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start + 1));
            let body = entry.body.slice(start as usize..=end as usize);
            (StatusCode::PARTIAL_CONTENT, body)
        }
        RangeReply::Unsatisfiable => {
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                headers.insert(header::CONTENT_RANGE, v);
            }
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(0));
            (StatusCode::RANGE_NOT_SATISFIABLE, bytes::Bytes::new())
        }
    };
    let body = if head || body.is_empty() {
        ProxyBody::Empty
    } else {
        ProxyBody::Full(Some(body))
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = code;
    *resp.headers_mut() = headers;
    resp
}

/// RFC 9211 `Cache-Status` for a response served from a stored entry. Hits get a static
/// value (no formatting, no allocation on the hit path); responses that went upstream carry
/// the remaining freshness as `ttl`.
fn entry_cache_status(entry: &CachedResponse, status: CacheStatus, now: Instant) -> HeaderValue {
    let ttl = || entry.expires_at().saturating_duration_since(now).as_secs();
    let v = match status {
        CacheStatus::Hit => return HeaderValue::from_static("edgecache; hit"),
        CacheStatus::Stale => return HeaderValue::from_static("edgecache; hit; detail=stale"),
        CacheStatus::Refresh => format!("edgecache; fwd=stale; stored; ttl={}", ttl()),
        CacheStatus::Miss | CacheStatus::Bypass => {
            format!("edgecache; fwd=uri-miss; stored; ttl={}", ttl())
        }
    };
    HeaderValue::from_str(&v).unwrap_or_else(|_| HeaderValue::from_static("edgecache"))
}

/// Marks a response that did not come from the store; for HEAD drops the body (the upstream
/// was asked for GET so the entry could be stored).
pub fn passed(
    mut resp: Response<ProxyBody>,
    head: bool,
    status: CacheStatus,
) -> Response<ProxyBody> {
    let fwd = if status == CacheStatus::Bypass {
        "method"
    } else {
        "uri-miss"
    };
    let cache_status = format!(
        "edgecache; fwd={fwd}; fwd-status={}",
        resp.status().as_u16()
    );
    let h = resp.headers_mut();
    h.insert(X_CACHE_STATUS, status.header());
    if let Ok(v) = HeaderValue::from_str(&cache_status) {
        h.insert(CACHE_STATUS, v);
    }
    if head {
        *resp.body_mut() = ProxyBody::Empty;
    }
    resp
}

/// The response for a failure: status, body and headers as [`ProxyError::reply`] says.
pub fn error(err: &ProxyError) -> Response<ProxyBody> {
    let reply = err.reply();
    let mut resp = plain(reply.status, reply.body);
    if let Some(secs) = reply.retry_after {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    if reply.close {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::{ErrorKind, UpstreamError};

    /// The reply's extra headers land on the response, after the two every error carries.
    #[test]
    fn error_responses_carry_the_replys_headers() {
        let no_backend = error(
            &UpstreamError::NoBackend {
                retry_after_secs: 4,
            }
            .into(),
        );
        assert_eq!(no_backend.status(), StatusCode::SERVICE_UNAVAILABLE);
        let h = no_backend.headers();
        assert_eq!(h[header::RETRY_AFTER], "4");
        assert_eq!(h[header::CONTENT_TYPE], "text/plain; charset=utf-8");
        assert_eq!(h[header::CACHE_CONTROL], "no-store");
        assert!(!h.contains_key(header::CONNECTION));

        let malformed = error(&ErrorKind::BodyMalformed.into());
        assert_eq!(malformed.status(), StatusCode::BAD_REQUEST);
        assert_eq!(malformed.headers()[header::CONNECTION], "close");
        assert!(!malformed.headers().contains_key(header::RETRY_AFTER));
        assert!(
            matches!(malformed.body(), ProxyBody::Full(Some(b)) if b == "malformed request body\n")
        );
    }
}
