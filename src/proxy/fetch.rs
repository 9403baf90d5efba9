//! The cache fill (`Proxy::fill`): one upstream GET meant to fill the cache, run once for
//! every request waiting on its flight. It revalidates with the stored validators when it
//! has a base entry, asks the policy whether the response may be shared, publishes its head
//! at once and streams its body to every waiter through the flight's
//! [`Fanout`] as it arrives, then stores it (the same pieces)
//! when it is complete and within `CACHE_MAX_OBJECT_BYTES`. A failed or truncated body is
//! never stored.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::oneshot;
use tokio::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::headers::strip_hop_by_hop;
use super::Proxy;
use crate::body::fanout::{Fanout, Room, StreamError};
use crate::body::{Pieces, ProxyBody};
use crate::cache::coalesce::FlightGuard;
use crate::cache::conditional::etag_for_body;
use crate::cache::entry::{CachedResponse, Filling, NewEntry};
use crate::cache::key::{split_key, Key, VaryKey};
use crate::cache::policy::{self, CacheControl};
use crate::cache::FetchOutcome;
use crate::error::{chain, UpstreamError};

/// A fetch to fill (or revalidate) one cache entry.
pub(crate) struct FetchRequest {
    /// Primary key: the origin and the downstream path and query.
    pub key: Key,
    /// Headers for the upstream: already rewritten (hop-by-hop removed, X-Forwarded-* set,
    /// client preconditions and Range removed).
    pub headers: HeaderMap,
    /// The stale entry being revalidated, if any.
    pub base: Option<Arc<CachedResponse>>,
    /// Access time carried into the new entry (a background refresh must not make a key
    /// look recently requested).
    pub last_access_ms: u64,
    /// When the fill was asked for: a purge after this keeps it from being stored.
    pub started: Instant,
    /// The caller writes the stored entry to the shared tier itself (it holds the fleet's
    /// lease and must wake the other instances only once the copy is there).
    pub defer_share: bool,
    /// The address a per-client rate limit of the key's route charges (the requester that
    /// led the fill; unspecified for background refreshes).
    pub client: std::net::IpAddr,
}

/// Where the fill sends a response that may not be shared: to the request that started the
/// flight, which serves it alone (the others fetch their own).
pub(crate) type PassTo = Option<oneshot::Sender<Response<ProxyBody>>>;

impl Proxy {
    /// One cache fill: fetches `req.key` from upstream and publishes through `flight` what
    /// every waiter needs — the stored entry, the head of a body they read as it arrives
    /// (then the stored entry, or the failure), the note that it may not be shared (the
    /// response itself goes to `pass_to`), or the failure. Returns the final outcome.
    ///
    /// A body that will be stored is read at the upstream's pace within `REQ_TIMEOUT` and
    /// stored when complete, as the same pieces the waiters were sent. One that will not
    /// (over `CACHE_MAX_OBJECT_BYTES`) is read at the pace of its fastest reader, within the
    /// stream buffer bounds, with `REQ_TIMEOUT` between pieces; it stops when nobody reads
    /// it any more. A body that fails is never stored, and its readers' bodies end with an
    /// error.
    pub(crate) async fn fill(
        self: &Arc<Self>,
        req: FetchRequest,
        flight: &FlightGuard<FetchOutcome>,
        pass_to: PassTo,
    ) -> FetchOutcome {
        let fail = |e: UpstreamError| {
            flight.publish(FetchOutcome::Failed(e.clone()));
            FetchOutcome::Failed(e)
        };
        let deadline = self.upstream.deadline();
        let request_time = SystemTime::now();
        let mut headers = req.headers.clone();
        headers.insert(
            SURROGATE_CAPABILITY,
            HeaderValue::from_static(SURROGATE_CAPABILITY_VALUE),
        );
        if let Some(base) = &req.base {
            if let Some(etag) = base.upstream_etag() {
                headers.insert(header::IF_NONE_MATCH, etag);
            }
            if let Some(lm) = base.upstream_last_modified() {
                headers.insert(header::IF_MODIFIED_SINCE, lm);
            }
        }

        // The key's route (ROUTES_FILE): its pool, injected fields, limits and retries. The
        // admission is held until the fill ends: the route's in-flight cap counts it.
        let route = self.route_of_key(&req.key);
        let sent = self.send_upstream(
            route.as_ref(),
            super::routing::Outgoing {
                method: &Method::GET,
                path_and_query: split_key(&req.key).1,
                headers,
                body: super::routing::Resend::Empty,
                deadline,
                client: req.client,
            },
        );
        let (resp, _admitted) = match sent.await {
            Ok(sent) => sent,
            Err(e) => {
                return fail(match e.kind {
                    crate::error::ErrorKind::Upstream(e) => e,
                    other => UpstreamError::Request(other.as_str().to_owned()),
                })
            }
        };
        let default_ttl = route
            .as_ref()
            .and_then(|r| r.route().ttl)
            .or(self.config.default_ttl);
        let response_time = SystemTime::now();
        let received_at = Instant::now();
        // A stored response is never replaced by a server error: the good copy stays (and
        // may be served stale if the response or STALE_IF_ERROR_SECS allow).
        if req.base.is_some() && resp.status().is_server_error() {
            return fail(UpstreamError::Status(resp.status().as_u16()));
        }
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);

        if parts.status == StatusCode::NOT_MODIFIED {
            if let Some(base) = &req.base {
                let times = (request_time, response_time, received_at);
                return match self.freshen(&req, base, &parts.headers, times) {
                    Ok(entry) => {
                        if !req.defer_share {
                            self.share(&req.key, &entry);
                        }
                        flight.publish(FetchOutcome::Stored(entry.clone()));
                        FetchOutcome::Stored(entry)
                    }
                    Err(resp) => pass(flight, pass_to, *resp),
                };
            }
        }

        let req_cc = CacheControl::parse(&req.headers);
        let resp_cc = CacheControl::for_response(&parts.headers);
        let (lifetime, source) = policy::freshness_lifetime(
            parts.status,
            &parts.headers,
            &resp_cc,
            default_ttl,
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
        if let Err(reason) = storable {
            tracing::debug!(key = %req.key, reason = reason.as_str(), "response not stored");
            strip_own_fields(&mut parts.headers);
            return pass(flight, pass_to, Response::from_parts(parts, body.into()));
        }
        let max = self.config.max_object_bytes as u64;
        let length = declared_length(&parts.headers);
        let storing = length.is_none_or(|n| n <= max);
        if !storing {
            tracing::debug!(key = %req.key, reason = "too_large", "response not stored");
        }

        let mut headers = owned(&parts.headers);
        strip_own_fields(&mut headers);
        let initial_age = policy::initial_age(&headers, request_time, response_time);
        headers.remove(header::AGE);
        if !headers.contains_key(header::DATE) {
            if let Ok(date) = HeaderValue::from_str(&httpdate::fmt_http_date(response_time)) {
                headers.insert(header::DATE, date);
            }
        }
        let vary_names: Vec<String> = policy::vary_names(&headers).collect();
        let filling = Arc::new(Filling {
            status: parts.status,
            etag: headers.get(header::ETAG).cloned(),
            last_modified: policy::http_date(&headers, header::LAST_MODIFIED),
            vary: VaryKey::capture(vary_names.iter().map(String::as_str), &req.headers),
            headers,
            length,
            received_at,
            initial_age,
            lifetime,
            storing,
        });
        let fanout = flight.body();
        fanout.keep_all(storing);
        // An empty body is complete with its head: stored first, then published (a waiter
        // answered from the head alone could ask again before it is stored).
        if length != Some(0) {
            flight.publish(FetchOutcome::Streaming(filling.clone()));
        }

        let last = match self
            .pump(body, fanout, storing, length, deadline, &req.key)
            .await
        {
            Pumped::Complete { stored: true, last } => last,
            Pumped::Complete {
                stored: false,
                last,
            } => {
                if let Some(last) = last {
                    fanout.push(last);
                }
                fanout.finish();
                return FetchOutcome::Streaming(filling);
            }
            Pumped::Unwanted => {
                tracing::debug!(key = %req.key, "nobody reads the response any more: fetch stopped");
                fanout.fail(StreamError::Stopped);
                return FetchOutcome::Streaming(filling);
            }
            Pumped::Failed(e) => {
                let outcome = fail(e.clone());
                fanout.fail(StreamError::Upstream(e.to_string().into()));
                return outcome;
            }
        };
        // The readers get the last piece (so, by `Content-Length`, the end of the body) only
        // once the entry is stored: whoever read the whole body finds it stored.
        let release_last = |last: Option<Bytes>, stored: bool| {
            if length == Some(0) && !stored {
                // Not published yet (see above): the waiters are answered from the head now.
                flight.publish(FetchOutcome::Streaming(filling.clone()));
            }
            if let Some(last) = last {
                fanout.push(last);
            }
            fanout.finish();
        };
        let Some(held) = fanout.pieces() else {
            release_last(last, false);
            return FetchOutcome::Streaming(filling);
        };
        if self.cache.purged_since(&req.key, req.started) {
            // Purged while it was fetched: the waiters had asked before; nobody else gets it.
            tracing::debug!(key = %req.key, "purged while fetched: not stored");
            release_last(last, false);
            return FetchOutcome::Streaming(filling);
        }
        let mut pieces = held.as_slice().to_vec();
        pieces.extend(last.iter().cloned());
        let entry = self.entry_from(&req, &filling, Pieces::new(pieces), resp_cc, source);
        self.store(req.key.clone(), entry.clone());
        if !req.defer_share {
            self.share(&req.key, &entry);
        }
        flight.publish(FetchOutcome::Stored(entry.clone()));
        release_last(last, true);
        FetchOutcome::Stored(entry)
    }

    /// Reads `body` into `fanout` piece by piece; see [`Proxy::fill`] for the pace and bounds.
    /// A body being stored with a declared `length` ends when that many bytes arrived: its
    /// last piece is returned instead of pushed, for [`Proxy::fill`] to release after storing.
    async fn pump(
        &self,
        mut body: Incoming,
        fanout: &Fanout,
        mut storing: bool,
        length: Option<u64>,
        deadline: Instant,
        key: &str,
    ) -> Pumped {
        let max = self.config.max_object_bytes;
        let mut total = 0usize;
        loop {
            if fanout.room().await == Room::Unwanted {
                return Pumped::Unwanted;
            }
            let next = if storing {
                tokio::time::timeout_at(deadline, body.frame()).await
            } else {
                tokio::time::timeout(self.config.upstream_timeout, body.frame()).await
            };
            let frame = match next {
                Err(_) => return Pumped::Failed(UpstreamError::Timeout),
                Ok(None) => {
                    return Pumped::Complete {
                        stored: storing,
                        last: None,
                    }
                }
                Ok(Some(Err(e))) => return Pumped::Failed(UpstreamError::Body(chain(&e))),
                Ok(Some(Ok(frame))) => frame,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            total += data.len();
            if storing && total > max {
                tracing::debug!(key, reason = "too_large", "response not stored");
                storing = false;
                fanout.keep_all(false);
            }
            // Each piece gets its own exact-size allocation: held (for slow readers, or for the
            // entry's whole life), a slice of hyper's read buffer would pin all of that larger
            // buffer, several times the bytes counted against the bounds.
            let complete = storing && length == Some(total as u64);
            let mut parts = data.chunks(PIECE_BYTES).peekable();
            while let Some(part) = parts.next() {
                let piece = Bytes::copy_from_slice(part);
                if complete && parts.peek().is_none() {
                    return Pumped::Complete {
                        stored: true,
                        last: Some(piece),
                    };
                }
                fanout.push(piece);
            }
        }
    }

    /// The stored entry for a complete body that arrived as `filling`.
    fn entry_from(
        &self,
        req: &FetchRequest,
        filling: &Filling,
        body: Pieces,
        cc: CacheControl,
        source: policy::FreshnessSource,
    ) -> Arc<CachedResponse> {
        let mut headers = filling.headers.clone();
        let etag = match &filling.etag {
            Some(etag) => etag.clone(),
            None => {
                let etag = etag_for_body(body.as_slice());
                headers.insert(header::ETAG, etag.clone());
                etag
            }
        };
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        let entry = NewEntry {
            status: filling.status,
            last_modified: filling.last_modified,
            upstream_last_modified: headers.get(header::LAST_MODIFIED).cloned(),
            upstream_etag: filling.etag.clone(),
            headers,
            body,
            etag,
            vary: filling.vary.clone(),
            stored_at: filling.received_at,
            initial_age: filling.initial_age,
            lifetime: filling.lifetime,
            forbids_stale: cc.forbids_stale(),
            stale_while_revalidate: secs(cc.stale_while_revalidate),
            stale_if_error: secs(cc.stale_if_error),
            operator_ttl: source == policy::FreshnessSource::Default,
        };
        Arc::new(CachedResponse::new(
            entry,
            req.key.len(),
            req.last_access_ms,
        ))
    }

    /// RFC 9111 §4.3.4: a `304` updates the stored headers with those it carries and restarts
    /// the entry's age and freshness; the stored body is kept.
    /// Errs with the response for this requester alone when the `304` withdraws permission
    /// to share.
    fn freshen(
        &self,
        req: &FetchRequest,
        base: &Arc<CachedResponse>,
        update: &HeaderMap,
        (request_time, response_time, stored_at): (SystemTime, SystemTime, Instant),
    ) -> Result<Arc<CachedResponse>, Box<Response<ProxyBody>>> {
        let mut headers = base.headers_map();
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
            self.route_of_key(&req.key)
                .and_then(|r| r.route().ttl)
                .or(self.config.default_ttl),
            response_time,
        );
        let entry = NewEntry {
            status: base.status,
            etag: headers
                .get(header::ETAG)
                .cloned()
                .unwrap_or_else(|| base.etag()),
            last_modified: policy::http_date(&headers, header::LAST_MODIFIED),
            upstream_etag: update
                .get(header::ETAG)
                .cloned()
                .or_else(|| base.upstream_etag()),
            upstream_last_modified: update
                .get(header::LAST_MODIFIED)
                .cloned()
                .or_else(|| base.upstream_last_modified()),
            headers,
            body: base.body(),
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
        if cc.no_store || cc.private || self.cache.purged_since(&req.key, req.started) {
            // The origin withdrew permission to share: forget it, answer this requester only.
            self.cache.invalidate_version(&req.key, base.id);
            let mut resp = Response::new(ProxyBody::from_pieces(&entry.body()));
            *resp.status_mut() = entry.status;
            *resp.headers_mut() = entry.headers_map();
            return Err(Box::new(resp));
        }
        self.store(req.key.clone(), entry.clone());
        Ok(entry)
    }
}

/// The largest piece a body is copied into: one size class, so the allocator reuses the
/// memory of released pieces for new ones instead of fragmenting on every chunk size hyper
/// happens to read.
const PIECE_BYTES: usize = 64 << 10;

/// How [`Proxy::pump`] ended.
enum Pumped {
    /// The whole body arrived; `stored`: it is within `CACHE_MAX_OBJECT_BYTES`; `last`: its
    /// last piece, not pushed yet.
    Complete {
        last: Option<Bytes>,
        stored: bool,
    },
    /// Nobody reads it and it will not be stored.
    Unwanted,
    Failed(UpstreamError),
}

/// Hands a response that may not be shared to the request that started the flight and tells
/// the others to fetch their own.
fn pass(
    flight: &FlightGuard<FetchOutcome>,
    pass_to: PassTo,
    resp: Response<ProxyBody>,
) -> FetchOutcome {
    if let Some(to) = pass_to {
        let _ = to.send(resp);
    }
    flight.publish(FetchOutcome::NotShared);
    FetchOutcome::NotShared
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
