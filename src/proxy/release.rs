//! Releasing slow clients (a route's `client_deadline_secs`): the request runs in its own
//! task; when the deadline passes before it is answered, the client gets `202 Accepted` with
//! a job URL while the request goes on (with the route's retries; a cacheable answer is
//! stored under the request's key as usual). Its result is kept in the job registry
//! ([`crate::jobs`]) for `GET /_edgecache/jobs/{id}`, and POSTed, signed, to the request's
//! `callback` URL (refused with 400 before any upstream call unless its `host:port` is in
//! `CALLBACK_ALLOWED_HOSTS`). A request answered within its deadline gets its answer
//! directly, and no callback.

use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use tokio::time::Instant;

use super::headers::Downstream;
use super::respond::CacheStatus;
use super::routing::ActiveRoute;
use super::{Proxy, Trace};
use crate::body::ProxyBody;
use crate::error::{ErrorKind, ProxyError};
use crate::jobs::callback::{split_callback, CallbackTarget};
use crate::jobs::{self, request_hash, JobResult, Started};

/// A job answer ([`crate::jobs::respond`]) as a proxy response.
fn reply(resp: Response<Bytes>) -> Response<ProxyBody> {
    resp.map(ProxyBody::full)
}

/// What the request's own task hands back: its response and the facts for its log line.
type Finished = (
    Result<Response<ProxyBody>, ProxyError>,
    Option<CacheStatus>,
    Option<u64>,
    bool,
);

impl Proxy {
    /// `GET /_edgecache/jobs/{id}` (with routes loaded: jobs exist only then); `None` for
    /// any other path.
    pub(crate) fn job_status(&self, req: &Request<Incoming>) -> Option<Response<ProxyBody>> {
        self.config.routes_file.as_ref()?;
        let id = jobs::parse_job_path(req.uri().path())?;
        let resp = match (id, req.method()) {
            (None, _) => jobs::respond::not_found(),
            (Some(id), &Method::GET | &Method::HEAD) => {
                let mut resp = jobs::respond::job(&id, self.jobs.get(&id, Instant::now()));
                if req.method() == Method::HEAD {
                    *resp.body_mut() = Bytes::new();
                }
                resp
            }
            (Some(_), _) => jobs::respond::method_not_allowed(),
        };
        Some(reply(resp))
    }

    /// Runs a request of a route with a client deadline: answered directly when it is done
    /// within `limit`, else released with `202` and a job (see the module docs).
    pub(crate) async fn release_after(
        self: &Arc<Self>,
        mut req: Request<Incoming>,
        down: &Downstream<'_>,
        route: ActiveRoute,
        limit: std::time::Duration,
        trace: &mut Trace,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        // The callback first: a refused one is answered before anything reaches the upstream.
        let (callback, rest) = match split_callback(req.uri().query()) {
            Ok(split) => split,
            Err(why) => return Ok(reply(jobs::respond::callback_refused(&why))),
        };
        let target = match callback {
            None => None,
            Some(raw) => match CallbackTarget::parse(&raw, &self.config.jobs.callback_hosts) {
                Ok(target) => Some(target),
                Err(why) => return Ok(reply(jobs::respond::callback_refused(&why))),
            },
        };
        if target.is_some() {
            super::routing::set_query(&mut req, rest.as_deref().unwrap_or(""))?;
        }
        // Identical requests share a job: same method, target and host, and no body (a
        // request with a body is its own job).
        let host = req
            .headers()
            .get(http::header::HOST)
            .map_or(&b""[..], |h| h.as_bytes());
        let bodiless = !req.headers().contains_key(http::header::CONTENT_LENGTH)
            && !req.headers().contains_key(http::header::TRANSFER_ENCODING);
        let unique = (!bodiless).then(|| jobs::JobId::random().map(|id| id.to_string()));
        let unique = match unique {
            Some(Err(_)) => {
                return Ok(reply(jobs::respond::unavailable(
                    &jobs::StartError::NoRandomness,
                )))
            }
            Some(Ok(u)) => u,
            None => String::new(),
        };
        let hash = request_hash(&[
            req.method().as_str().as_bytes(),
            req.uri().to_string().as_bytes(),
            host,
            unique.as_bytes(),
        ]);

        let proxy = self.clone();
        let (peer, span) = (down.peer, trace.span.clone());
        let mut task = tokio::spawn(async move {
            let down = Downstream::new(peer, &proxy.config.trusted_proxies);
            let mut trace = Trace {
                cache: None,
                upstream_ms: None,
                coalesced: false,
                admin: false,
                span,
            };
            let resp = proxy.dispatch(req, &down, Some(route), &mut trace).await;
            (resp, trace.cache, trace.upstream_ms, trace.coalesced) as Finished
        });
        match tokio::time::timeout(limit, &mut task).await {
            Ok(Ok((resp, cache, upstream_ms, coalesced))) => {
                (trace.cache, trace.upstream_ms, trace.coalesced) = (cache, upstream_ms, coalesced);
                resp
            }
            Ok(Err(_)) => Err(ErrorKind::FetchAbandoned.into()),
            Err(_) => {
                let (id, started) = match self.jobs.start(hash, target, Instant::now()) {
                    Ok(started) => started,
                    // The request goes on (and may still fill the cache); no job holds it.
                    Err(why) => return Ok(reply(jobs::respond::unavailable(&why))),
                };
                if started == Started::New {
                    let proxy = self.clone();
                    let job = id;
                    self.background.spawn("job", async move {
                        proxy.finish_job(&job, task).await;
                    });
                }
                // Started::Existing: an identical request's task ends the job; this one's
                // task runs on to its end unawaited.
                tracing::debug!(job = %id, "client deadline passed: released with 202");
                Ok(reply(jobs::respond::accepted(&id)))
            }
        }
    }

    /// Waits for a released request's answer and ends its job with it: the response (its
    /// body read up to `CACHE_MAX_OBJECT_BYTES`) or the failure; then sends the callbacks.
    async fn finish_job(
        self: &Arc<Self>,
        id: &jobs::JobId,
        task: tokio::task::JoinHandle<Finished>,
    ) {
        let outcome = match task.await {
            Ok((Ok(resp), ..)) => {
                let (parts, body) = resp.into_parts();
                match Limited::new(body, self.config.max_object_bytes)
                    .collect()
                    .await
                {
                    Ok(body) => Ok(JobResult::new(
                        parts.status,
                        &parts.headers,
                        body.to_bytes(),
                    )),
                    Err(e) => Err(if e.is::<http_body_util::LengthLimitError>() {
                        "the response is larger than CACHE_MAX_OBJECT_BYTES".to_owned()
                    } else {
                        format!("the response body failed: {e}")
                    }),
                }
            }
            Ok((Err(e), ..)) => Err(e.kind.as_str().to_owned()),
            Err(_) => Err("the request's task ended without an answer".to_owned()),
        };
        let now = Instant::now();
        let deliveries = match outcome {
            Ok(result) => self.jobs.complete(id, result, now),
            Err(reason) => {
                tracing::warn!(job = %id, %reason, "released request failed");
                self.jobs.fail(id, &reason, now)
            }
        };
        if let Some(deliveries) = deliveries.filter(|d| !d.is_empty()) {
            self.callbacks.spawn(&self.background, deliveries);
        }
    }
}
