//! `fetch_upstream` + `store`: one upstream GET meant to fill the cache. It revalidates with
//! the stored validators when it has a base entry, reads the body completely (bounded by
//! `CACHE_MAX_OBJECT_BYTES` and `REQ_TIMEOUT`), asks the policy whether it may be shared, and
//! stores it. A failed or truncated body is never stored.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};

use super::headers::strip_hop_by_hop;
use super::Proxy;
use crate::body::ProxyBody;
use crate::cache::conditional::etag_for_body;
use crate::cache::entry::{CachedResponse, NewEntry};
use crate::cache::key::{split_key, VaryKey};
use crate::cache::policy::{self, CacheControl};
use crate::cache::FetchOutcome;
use crate::error::{chain, UpstreamError};

/// A fetch to fill (or revalidate) one cache entry.
pub(crate) struct FetchRequest {
    /// Primary key: the origin and the downstream path and query.
    pub key: Arc<str>,
    /// Headers for the upstream: already rewritten (hop-by-hop removed, X-Forwarded-* set,
    /// client preconditions and Range removed).
    pub headers: HeaderMap,
    /// The stale entry being revalidated, if any.
    pub base: Option<Arc<CachedResponse>>,
    /// Access time carried into the new entry (a background refresh must not make a key
    /// look recently requested).
    pub last_access_ms: u64,
}

/// What one fetch produced, for the requester that led it.
pub(crate) enum Fetched {
    /// A new complete response, stored.
    Stored(Arc<CachedResponse>),
    /// The base entry, freshened by a `304` and stored again.
    Revalidated(Arc<CachedResponse>),
    /// Not shareable: the response itself, for the leader only.
    Passed(Response<ProxyBody>),
    Failed(UpstreamError),
}

impl Fetched {
    /// What the coalesced waiters get.
    pub fn outcome(&self) -> FetchOutcome {
        match self {
            Fetched::Stored(e) | Fetched::Revalidated(e) => FetchOutcome::Stored(e.clone()),
            Fetched::Passed(_) => FetchOutcome::NotShared,
            Fetched::Failed(e) => FetchOutcome::Failed(e.clone()),
        }
    }
}

impl Proxy {
    /// Fetches `req.key` from upstream and stores the result when the policy allows.
    pub(crate) async fn fetch_for_cache(&self, req: FetchRequest) -> Fetched {
        let deadline = self.upstream.deadline();
        let request_time = SystemTime::now();
        let mut headers = req.headers.clone();
        headers.insert(
            SURROGATE_CAPABILITY,
            HeaderValue::from_static(SURROGATE_CAPABILITY_VALUE),
        );
        if let Some(base) = &req.base {
            if let Some(etag) = &base.upstream_etag {
                headers.insert(header::IF_NONE_MATCH, etag.clone());
            }
            if let Some(lm) = &base.upstream_last_modified {
                headers.insert(header::IF_MODIFIED_SINCE, lm.clone());
            }
        }

        let sent =
            self.upstream
                .send_idempotent(&Method::GET, split_key(&req.key).1, &headers, deadline);
        let resp = match sent.await {
            Ok(resp) => resp,
            Err(e) => return Fetched::Failed(e),
        };
        let response_time = SystemTime::now();
        let stored_at = Instant::now();
        // A stored response is never replaced by a server error: the good copy stays (and
        // may be served stale if the response or STALE_IF_ERROR_SECS allow).
        if req.base.is_some() && resp.status().is_server_error() {
            return Fetched::Failed(UpstreamError::Status(resp.status().as_u16()));
        }
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);

        if parts.status == StatusCode::NOT_MODIFIED {
            if let Some(base) = &req.base {
                return self.freshen(
                    &req,
                    base,
                    &parts.headers,
                    request_time,
                    response_time,
                    stored_at,
                );
            }
        }

        let req_cc = CacheControl::parse(&req.headers);
        let resp_cc = CacheControl::for_response(&parts.headers);
        let (lifetime, source) = policy::freshness_lifetime(
            parts.status,
            &parts.headers,
            &resp_cc,
            self.config.default_ttl,
            response_time,
        );
        let storable = policy::storability(
            &Method::GET,
            parts.status,
            &req.headers,
            &req_cc,
            &parts.headers,
            &resp_cc,
            !lifetime.is_zero(),
        );
        let too_large = declared_length(&parts.headers)
            .is_some_and(|n| n > self.config.max_object_bytes as u64);
        let not_stored = match storable {
            Err(reason) => Some(reason.as_str()),
            Ok(()) if too_large => Some("too_large"),
            Ok(()) => None,
        };
        if let Some(reason) = not_stored {
            tracing::debug!(key = %req.key, reason, "response not stored");
            strip_own_fields(&mut parts.headers);
            return Fetched::Passed(Response::from_parts(parts, ProxyBody::stream(body)));
        }

        let body = match read_body(body, self.config.max_object_bytes, deadline).await {
            Ok(ReadBody::Complete(bytes)) => bytes,
            Ok(ReadBody::TooLarge { prefix, rest }) => {
                tracing::debug!(key = %req.key, reason = "too_large", "response not stored");
                strip_own_fields(&mut parts.headers);
                let body = ProxyBody::Stream {
                    prefix: Some(prefix),
                    rest,
                };
                return Fetched::Passed(Response::from_parts(parts, body));
            }
            Err(e) => return Fetched::Failed(e),
        };

        let mut headers = owned(&parts.headers);
        strip_own_fields(&mut headers);
        let upstream_etag = headers.get(header::ETAG).cloned();
        let upstream_last_modified = headers.get(header::LAST_MODIFIED).cloned();
        let etag = match &upstream_etag {
            Some(etag) => etag.clone(),
            None => {
                let etag = etag_for_body(&body);
                headers.insert(header::ETAG, etag.clone());
                etag
            }
        };
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        let initial_age = policy::initial_age(&headers, request_time, response_time);
        headers.remove(header::AGE);
        if !headers.contains_key(header::DATE) {
            if let Ok(date) = HeaderValue::from_str(&httpdate::fmt_http_date(response_time)) {
                headers.insert(header::DATE, date);
            }
        }
        let vary_names: Vec<String> = policy::vary_names(&headers).collect();
        let vary = VaryKey::capture(vary_names.iter().map(String::as_str), &req.headers);
        let entry = NewEntry {
            status: parts.status,
            last_modified: policy::http_date(&headers, header::LAST_MODIFIED),
            headers,
            body,
            etag,
            upstream_etag,
            upstream_last_modified,
            vary,
            stored_at,
            initial_age,
            lifetime,
            forbids_stale: resp_cc.forbids_stale(),
            stale_while_revalidate: secs(resp_cc.stale_while_revalidate),
            stale_if_error: secs(resp_cc.stale_if_error),
            operator_ttl: source == policy::FreshnessSource::Default,
        };
        let entry = Arc::new(CachedResponse::new(
            entry,
            req.key.len(),
            req.last_access_ms,
        ));
        self.store(req.key.clone(), entry.clone());
        Fetched::Stored(entry)
    }

    /// RFC 9111 §4.3.4: a `304` updates the stored headers with those it carries and restarts
    /// the entry's age and freshness; the stored body is kept.
    fn freshen(
        &self,
        req: &FetchRequest,
        base: &CachedResponse,
        update: &HeaderMap,
        request_time: SystemTime,
        response_time: SystemTime,
        stored_at: Instant,
    ) -> Fetched {
        let mut headers = base.headers.clone();
        for name in update.keys() {
            // Fields describing the stored body itself are kept: updating them from a 304
            // could make them disagree with the bytes we hold (RFC 9111 §3.2 allows this).
            if BODY_FIELDS.contains(name) {
                continue;
            }
            headers.remove(name);
            for v in update.get_all(name) {
                headers.append(name.clone(), owned_value(v));
            }
        }
        let initial_age = policy::initial_age(&headers, request_time, response_time);
        headers.remove(header::AGE);
        let cc = CacheControl::for_response(&headers);
        strip_own_fields(&mut headers);
        let (lifetime, source) = policy::freshness_lifetime(
            base.status,
            &headers,
            &cc,
            self.config.default_ttl,
            response_time,
        );
        let entry = NewEntry {
            status: base.status,
            etag: headers
                .get(header::ETAG)
                .cloned()
                .unwrap_or_else(|| base.etag.clone()),
            last_modified: policy::http_date(&headers, header::LAST_MODIFIED),
            upstream_etag: update
                .get(header::ETAG)
                .cloned()
                .or_else(|| base.upstream_etag.clone()),
            upstream_last_modified: update
                .get(header::LAST_MODIFIED)
                .cloned()
                .or_else(|| base.upstream_last_modified.clone()),
            headers,
            body: base.body.clone(),
            vary: base.vary.clone(),
            stored_at,
            initial_age,
            lifetime,
            forbids_stale: cc.forbids_stale(),
            stale_while_revalidate: secs(cc.stale_while_revalidate),
            stale_if_error: secs(cc.stale_if_error),
            operator_ttl: source == policy::FreshnessSource::Default,
        };
        let entry = Arc::new(CachedResponse::new(
            entry,
            req.key.len(),
            req.last_access_ms,
        ));
        if cc.no_store || cc.private {
            // The origin withdrew permission to share: forget it, answer this requester only.
            self.cache.invalidate_version(&req.key, base.id);
            let mut resp = Response::new(ProxyBody::full(entry.body.clone()));
            *resp.status_mut() = entry.status;
            *resp.headers_mut() = entry.headers.clone();
            return Fetched::Passed(resp);
        }
        self.store(req.key.clone(), entry.clone());
        Fetched::Revalidated(entry)
    }
}

/// Advertises edgecache as a surrogate (W3C Edge Architecture) so origins can target it.
const SURROGATE_CAPABILITY: header::HeaderName =
    header::HeaderName::from_static("surrogate-capability");
const SURROGATE_CAPABILITY_VALUE: &str = "edgecache=\"Surrogate/1.0\"";

/// Fields a `304` must not change on a stored response: they describe the stored bytes.
const BODY_FIELDS: [header::HeaderName; 5] = [
    header::CONTENT_LENGTH,
    header::CONTENT_ENCODING,
    header::CONTENT_RANGE,
    header::ETAG,
    header::HeaderName::from_static("content-md5"),
];

/// Removes the directive fields addressed to this cache alone; clients never see them.
fn strip_own_fields(headers: &mut HeaderMap) {
    headers.remove(policy::EDGECACHE_CACHE_CONTROL);
    headers.remove(policy::SURROGATE_CONTROL);
}

/// A copy of `headers` whose values own their bytes. hyper parses header values as slices of
/// its connection read buffer; storing those would keep that whole buffer alive per entry.
/// All values are copied into one exact-size buffer and sliced from it: one allocation per
/// entry instead of one per header.
fn owned(headers: &HeaderMap) -> HeaderMap {
    let total: usize = headers.values().map(|v| v.len()).sum();
    let mut buf = bytes::BytesMut::with_capacity(total);
    for v in headers.values() {
        buf.extend_from_slice(v.as_bytes());
    }
    let buf = buf.freeze();
    let mut out = HeaderMap::with_capacity(headers.len());
    let mut at = 0;
    for (name, value) in headers {
        let end = at + value.len();
        let mut copy =
            HeaderValue::from_maybe_shared(buf.slice(at..end)).unwrap_or_else(|_| value.clone());
        copy.set_sensitive(value.is_sensitive());
        out.append(name.clone(), copy);
        at = end;
    }
    out
}

fn owned_value(v: &HeaderValue) -> HeaderValue {
    let mut copy = HeaderValue::from_bytes(v.as_bytes()).unwrap_or_else(|_| v.clone());
    copy.set_sensitive(v.is_sensitive());
    copy
}

fn secs(v: Option<u64>) -> Duration {
    Duration::from_secs(v.unwrap_or(0))
}

fn declared_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse().ok())
}

enum ReadBody {
    Complete(Bytes),
    /// Passed the size limit: what was read so far and the rest of the stream.
    TooLarge {
        prefix: Bytes,
        rest: Incoming,
    },
}

/// Reads a whole body, up to `max` bytes, before `deadline`. A body that errors or ends early
/// (hyper checks `Content-Length` and chunked framing) is an error: never stored.
async fn read_body(
    mut body: Incoming,
    max: usize,
    deadline: tokio::time::Instant,
) -> Result<ReadBody, UpstreamError> {
    // Sized from Content-Length when known, and returned as an exact-size allocation: a
    // stored body must not pin hyper's (larger, shared) read buffer for its whole life.
    let hint = usize::try_from(body.size_hint().lower())
        .unwrap_or(max)
        .min(max);
    let mut buf: Vec<u8> = Vec::with_capacity(hint);
    loop {
        match tokio::time::timeout_at(deadline, body.frame()).await {
            Err(_) => return Err(UpstreamError::Timeout),
            Ok(None) => return Ok(ReadBody::Complete(Bytes::from(buf.into_boxed_slice()))),
            Ok(Some(Err(e))) => return Err(UpstreamError::Body(chain(&e))),
            Ok(Some(Ok(frame))) => {
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                buf.extend_from_slice(&data);
                if buf.len() > max {
                    return Ok(ReadBody::TooLarge {
                        prefix: Bytes::from(buf),
                        rest: body,
                    });
                }
            }
        }
    }
}
