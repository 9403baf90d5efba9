//! Building downstream responses: from a stored entry (200/HEAD/304 with `Age` and
//! `X-Cache-Status`), from a response still arriving (the same, its body read from the
//! fetch's fanout), from a passed-through upstream response, or for an error ([`error`]:
//! the [`ProxyError::reply`] mapping made into a response).

use std::sync::Arc;
use tokio::time::Instant;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode};

use super::headers::{CACHE_STATUS, X_CACHE_STATUS};
use crate::body::{ProxyBody, Reader};
use crate::cache::conditional::not_modified;
use crate::cache::entry::{CachedResponse, Filling};
use crate::cache::range::{self, RangeReply};
pub use crate::cache::status::CacheStatus;
use crate::error::{ErrorKind, ProxyError, UpstreamError};

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
/// byte range, else the stored status, headers and (unless `head`) body. The body is shared
/// [`Pieces`](crate::body::Pieces), never copied (a range is a slice of them).
pub fn from_entry(
    entry: &Arc<CachedResponse>,
    head: bool,
    req: &HeaderMap,
    status: CacheStatus,
    now: Instant,
) -> Response<ProxyBody> {
    let age = HeaderValue::from(entry.age(now).as_secs());
    let cache_status = entry_cache_status(entry, status, now);
    // The validators are looked up in the entry's head block only for a request that has
    // preconditions or a range (most hits have neither).
    let conditional =
        req.contains_key(header::IF_NONE_MATCH) || req.contains_key(header::IF_MODIFIED_SINCE);
    if conditional && entry.status.is_success() {
        // RFC 9111 §4.3.2: without `Last-Modified`, `If-Modified-Since` is compared with the
        // stored response's `Date`.
        let last_modified = entry.last_modified().or_else(|| {
            req.contains_key(header::IF_MODIFIED_SINCE)
                .then(|| entry.header_bytes(&header::DATE).and_then(http_date))
                .flatten()
        });
        if not_modified(req, Some(&entry.etag()), last_modified) {
            let headers = entry.headers_map();
            return not_modified_response(&headers, age, status, cache_status);
        }
    }
    let len = entry.body_len() as u64;
    let reply = if entry.status == StatusCode::OK && req.contains_key(header::RANGE) {
        // The validators only matter to an `If-Range`.
        let if_range = req.contains_key(header::IF_RANGE);
        let etag = if_range.then(|| entry.etag());
        let last_modified = if_range.then(|| entry.last_modified()).flatten();
        range::select(req, len, etag.as_ref(), last_modified)
    } else {
        RangeReply::Full
    };
    let mut headers = entry.headers_map_with(3);
    headers.insert(header::AGE, age);
    headers.insert(X_CACHE_STATUS, status.header());
    headers.insert(CACHE_STATUS, cache_status);
    let code = range_headers(&mut headers, reply, len, entry.status);
    let body = match reply {
        _ if head => ProxyBody::Empty,
        RangeReply::Full => ProxyBody::from_pieces(&entry.body()),
        RangeReply::Partial { start, end } => {
            ProxyBody::from_pieces(&entry.body().slice(start as usize..=end as usize))
        }
        RangeReply::Unsatisfiable => ProxyBody::Empty,
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = code;
    *resp.headers_mut() = headers;
    resp
}

/// Serves a response whose body is still arriving, from this request's `reader` of it: like
/// [`from_entry`] — `304` as soon as the head is in when the client's preconditions match,
/// a `206` when the length is known (its bytes as they arrive), else the whole body as it
/// comes. `collapsed`: this request waited on another's fetch (RFC 9211).
pub fn from_filling(
    filling: &Filling,
    reader: Reader,
    head: bool,
    req: &HeaderMap,
    status: CacheStatus,
    collapsed: bool,
    now: Instant,
) -> Response<ProxyBody> {
    let age = HeaderValue::from(filling.age(now).as_secs());
    let cache_status = format!(
        "edgecache; fwd={}{}; ttl={}{}",
        if status == CacheStatus::Refresh {
            "stale"
        } else {
            "uri-miss"
        },
        if filling.storing { "; stored" } else { "" },
        filling.ttl(now).as_secs(),
        if collapsed { "; collapsed" } else { "" },
    );
    let cache_status = HeaderValue::from_str(&cache_status)
        .unwrap_or_else(|_| HeaderValue::from_static("edgecache"));
    let last_modified = filling.last_modified.or_else(|| {
        req.contains_key(header::IF_MODIFIED_SINCE)
            .then(|| crate::cache::policy::http_date(&filling.headers, header::DATE))
            .flatten()
    });
    if filling.status.is_success() && not_modified(req, filling.etag.as_ref(), last_modified) {
        return not_modified_response(&filling.headers, age, status, cache_status);
    }
    let reply = match filling.length {
        Some(len) if filling.status == StatusCode::OK => {
            range::select(req, len, filling.etag.as_ref(), filling.last_modified)
        }
        _ => RangeReply::Full,
    };
    let mut headers = filling.headers.clone();
    headers.insert(header::AGE, age);
    headers.insert(X_CACHE_STATUS, status.header());
    headers.insert(CACHE_STATUS, cache_status);
    let code = range_headers(
        &mut headers,
        reply,
        filling.length.unwrap_or(0),
        filling.status,
    );
    let body = match reply {
        _ if head => ProxyBody::Empty,
        RangeReply::Full => ProxyBody::Fanout(reader),
        RangeReply::Partial { start, end } => {
            ProxyBody::Fanout(reader.range(start, end - start + 1))
        }
        RangeReply::Unsatisfiable => ProxyBody::Empty,
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = code;
    *resp.headers_mut() = headers;
    resp
}

/// An HTTP-date field value, as [`crate::cache::policy::http_date`] reads one.
fn http_date(v: &[u8]) -> Option<std::time::SystemTime> {
    httpdate::parse_http_date(std::str::from_utf8(v).ok()?.trim()).ok()
}

/// RFC 9211's `collapsed`: this response came from a fetch another request started.
pub fn mark_collapsed(resp: &mut Response<ProxyBody>) {
    let h = resp.headers_mut();
    let Some(v) = h.get(CACHE_STATUS).and_then(|v| v.to_str().ok()) else {
        return;
    };
    if v.contains("collapsed") {
        return;
    }
    if let Ok(v) = HeaderValue::from_str(&format!("{v}; collapsed")) {
        h.insert(CACHE_STATUS, v);
    }
}

/// A `304` standing for a response with `headers`.
fn not_modified_response(
    headers: &HeaderMap,
    age: HeaderValue,
    status: CacheStatus,
    cache_status: HeaderValue,
) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::Empty);
    *resp.status_mut() = StatusCode::NOT_MODIFIED;
    let h = resp.headers_mut();
    for name in NOT_MODIFIED_HEADERS {
        for v in headers.get_all(&name) {
            h.append(name.clone(), v.clone());
        }
    }
    h.insert(header::AGE, age);
    h.insert(X_CACHE_STATUS, status.header());
    h.insert(CACHE_STATUS, cache_status);
    resp
}

/// Sets `Content-Range`/`Content-Length` for a range reply on a `len`-byte body; returns the
/// status to send (`full` for the whole body).
fn range_headers(
    headers: &mut HeaderMap,
    reply: RangeReply,
    len: u64,
    full: StatusCode,
) -> StatusCode {
    match reply {
        RangeReply::Full => full,
        RangeReply::Partial { start, end } => {
            if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{len}")) {
                headers.insert(header::CONTENT_RANGE, v);
            }
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start + 1));
            StatusCode::PARTIAL_CONTENT
        }
        RangeReply::Unsatisfiable => {
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                headers.insert(header::CONTENT_RANGE, v);
            }
            headers.insert(header::CONTENT_LENGTH, HeaderValue::from(0));
            StatusCode::RANGE_NOT_SATISFIABLE
        }
    }
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
    match &err.kind {
        ErrorKind::Upstream(UpstreamError::Limited(limited)) => {
            for (name, value) in &limited.headers {
                resp.headers_mut().insert(name.clone(), value.clone());
            }
        }
        ErrorKind::MethodNotRouted(allow) => {
            let (name, value) = super::routing::allow_header(allow);
            resp.headers_mut().insert(name, value);
        }
        _ => {}
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
