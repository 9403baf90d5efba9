//! The upstream client: one pooled hyper-util client (keep-alive connections reused across
//! requests, unlike the predecessor's client-per-fetch), request URIs built from
//! `UPSTREAM_URL`, and failures classified into [`UpstreamError`].

use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;

use crate::body::ProxyBody;
use crate::config::UpstreamUrl;
use crate::error::{chain, UpstreamError};

/// Idle keep-alive connections kept per upstream host.
const MAX_IDLE_PER_HOST: usize = 256;
/// How long an idle upstream connection is kept.
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// A pooled client for the configured upstream.
pub struct Upstream {
    client: Client<HttpConnector, ProxyBody>,
    url: UpstreamUrl,
    timeout: Duration,
}

impl Upstream {
    pub fn new(url: UpstreamUrl, timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.enforce_http(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(IDLE_TIMEOUT)
            .pool_max_idle_per_host(MAX_IDLE_PER_HOST)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(connector);
        Upstream {
            client,
            url,
            timeout,
        }
    }

    /// The deadline for an exchange starting now (`REQ_TIMEOUT`).
    pub fn deadline(&self) -> Instant {
        Instant::now() + self.timeout
    }

    /// The upstream URI for a downstream path and query.
    pub fn uri_for(&self, path_and_query: &str) -> Result<http::Uri, UpstreamError> {
        self.url
            .uri_for(path_and_query)
            .map_err(|e| UpstreamError::Request(e.to_string()))
    }

    /// The `Host` the upstream expects.
    pub fn authority(&self) -> &http::uri::Authority {
        &self.url.authority
    }

    /// Sends `req` and waits for the response head until `deadline`.
    pub async fn send(
        &self,
        req: Request<ProxyBody>,
        deadline: Instant,
    ) -> Result<Response<Incoming>, UpstreamError> {
        match tokio::time::timeout_at(deadline, self.client.request(req)).await {
            Err(_) => Err(UpstreamError::Timeout),
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) if e.is_connect() => Err(UpstreamError::Connect(chain(&e))),
            Ok(Err(e)) => Err(UpstreamError::BadResponse(chain(&e))),
        }
    }
}
