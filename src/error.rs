//! Failures and the one place they become responses.
//!
//! Every failure the proxy answers for is a [`ProxyError`]: what went wrong ([`ErrorKind`])
//! and whose fault it was ([`Side`], as pingora-error's `ErrorSource`). [`ProxyError::reply`]
//! is the only mapping from a failure to the status, body and extra headers a client gets;
//! [`crate::proxy::respond::error`] turns that reply into a response. Nothing here does I/O.
//!
//! [`UpstreamError`] stays a type of its own: it is what one upstream exchange produced, is
//! handed to every coalesced waiter and kept in the admin report.

use std::fmt;

use http::StatusCode;

/// Who caused a failure; decides how loudly it is logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The backend: unreachable, too slow, or answering garbage.
    Upstream,
    /// The client: a request this proxy will not or cannot serve.
    Downstream,
    /// This proxy itself.
    Internal,
}

impl Side {
    /// Short label for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Upstream => "upstream",
            Side::Downstream => "downstream",
            Side::Internal => "internal",
        }
    }
}

/// What went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ErrorKind {
    /// The `Host` (or `:authority`, or trusted `X-Forwarded-Host`) is missing or not a valid
    /// authority.
    InvalidHost,
    /// A trusted `X-Forwarded-Proto` that is neither `http` nor `https`.
    InvalidForwardedProto,
    /// The host is not one of `ALLOWED_HOSTS` (RFC 9110 §15.5.20).
    HostNotServed,
    /// `CONNECT`: this proxy does not tunnel.
    ConnectNotSupported,
    /// `Cache-Control: only-if-cached` and nothing usable is stored (RFC 9111 §5.2.1.7).
    NotCached,
    /// The request body is over `MAX_REQUEST_BODY_BYTES` (declared or streamed).
    BodyTooLarge,
    /// The request body was malformed (bad chunking) or cut short.
    BodyMalformed,
    /// A request head with both `Content-Length` and `Transfer-Encoding` (RFC 9112 §6.1).
    AmbiguousFraming,
    /// The upstream exchange failed.
    Upstream(UpstreamError),
    /// The task fetching for a coalesced miss ended without an answer.
    FetchAbandoned,
    /// `ROUTES_FILE` has `allowlist = true` and no route admits the path (404).
    NotRouted,
    /// The path is routed, but not for this method (405); the methods it is routed for.
    MethodNotRouted(String),
    /// The query could not be rewritten for the route (a parameter it removes left
    /// something that is not a valid request target or `Cache-Control` value).
    BadQuery,
}

impl ErrorKind {
    /// Whose fault this kind of failure is.
    pub fn side(&self) -> Side {
        match self {
            ErrorKind::InvalidHost
            | ErrorKind::InvalidForwardedProto
            | ErrorKind::HostNotServed
            | ErrorKind::ConnectNotSupported
            | ErrorKind::NotCached
            | ErrorKind::BodyTooLarge
            | ErrorKind::BodyMalformed
            | ErrorKind::AmbiguousFraming
            | ErrorKind::NotRouted
            | ErrorKind::MethodNotRouted(_)
            | ErrorKind::BadQuery => Side::Downstream,
            ErrorKind::Upstream(UpstreamError::Request(_)) | ErrorKind::FetchAbandoned => {
                Side::Internal
            }
            ErrorKind::Upstream(_) => Side::Upstream,
        }
    }

    /// Short label for logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            ErrorKind::InvalidHost => "invalid_host",
            ErrorKind::InvalidForwardedProto => "invalid_forwarded_proto",
            ErrorKind::HostNotServed => "host_not_served",
            ErrorKind::ConnectNotSupported => "connect_not_supported",
            ErrorKind::NotCached => "not_cached",
            ErrorKind::BodyTooLarge => "body_too_large",
            ErrorKind::BodyMalformed => "body_malformed",
            ErrorKind::AmbiguousFraming => "ambiguous_framing",
            ErrorKind::Upstream(e) => e.as_str(),
            ErrorKind::FetchAbandoned => "fetch_abandoned",
            ErrorKind::NotRouted => "not_routed",
            ErrorKind::MethodNotRouted(_) => "method_not_routed",
            ErrorKind::BadQuery => "bad_query",
        }
    }
}

/// A failure the proxy answers for: what went wrong and whose fault it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyError {
    pub kind: ErrorKind,
    pub side: Side,
}

/// What a client gets for a [`ProxyError`]: the status, a short plain-text body and the
/// headers beyond `Content-Type` / `Cache-Control: no-store`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorReply {
    pub status: StatusCode,
    pub body: &'static str,
    /// `Retry-After`, in seconds.
    pub retry_after: Option<u64>,
    /// `Connection: close`: what follows on the connection cannot be trusted.
    pub close: bool,
}

impl ErrorReply {
    const fn new(status: StatusCode, body: &'static str) -> Self {
        ErrorReply {
            status,
            body,
            retry_after: None,
            close: false,
        }
    }

    const fn closing(self) -> Self {
        ErrorReply {
            close: true,
            ..self
        }
    }
}

impl ProxyError {
    /// The one mapping from a failure to what the client gets.
    pub fn reply(&self) -> ErrorReply {
        match &self.kind {
            ErrorKind::InvalidHost => ErrorReply::new(StatusCode::BAD_REQUEST, "invalid Host\n"),
            ErrorKind::InvalidForwardedProto => {
                ErrorReply::new(StatusCode::BAD_REQUEST, "invalid X-Forwarded-Proto\n")
            }
            ErrorKind::HostNotServed => ErrorReply::new(
                StatusCode::MISDIRECTED_REQUEST,
                "this host is not served here (ALLOWED_HOSTS)\n",
            ),
            ErrorKind::ConnectNotSupported => {
                ErrorReply::new(StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not supported\n")
            }
            ErrorKind::NotCached => {
                ErrorReply::new(StatusCode::GATEWAY_TIMEOUT, "not cached (only-if-cached)\n")
            }
            ErrorKind::BodyTooLarge => {
                ErrorReply::new(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n")
            }
            ErrorKind::BodyMalformed => {
                ErrorReply::new(StatusCode::BAD_REQUEST, "malformed request body\n").closing()
            }
            ErrorKind::AmbiguousFraming => ErrorReply::new(
                StatusCode::BAD_REQUEST,
                "Content-Length together with Transfer-Encoding is not accepted\n",
            )
            .closing(),
            ErrorKind::Upstream(e) => upstream_reply(e),
            ErrorKind::FetchAbandoned => {
                ErrorReply::new(StatusCode::BAD_GATEWAY, "upstream fetch was abandoned\n")
            }
            ErrorKind::NotRouted => ErrorReply::new(StatusCode::NOT_FOUND, "no route\n"),
            ErrorKind::MethodNotRouted(_) => ErrorReply::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not routed for this path\n",
            ),
            ErrorKind::BadQuery => ErrorReply::new(StatusCode::BAD_REQUEST, "bad query\n"),
        }
    }
}

/// The reply for an upstream failure ([`ProxyError::reply`] and [`UpstreamError::status`]).
fn upstream_reply(e: &UpstreamError) -> ErrorReply {
    match e {
        UpstreamError::Timeout => {
            ErrorReply::new(StatusCode::GATEWAY_TIMEOUT, "upstream timed out\n")
        }
        UpstreamError::Request(_) => ErrorReply::new(StatusCode::BAD_REQUEST, "bad request\n"),
        UpstreamError::NoBackend { retry_after_secs } => ErrorReply {
            retry_after: Some(*retry_after_secs),
            ..ErrorReply::new(StatusCode::SERVICE_UNAVAILABLE, "no healthy upstream\n")
        },
        UpstreamError::Status(code) => ErrorReply::new(
            StatusCode::from_u16(*code).unwrap_or(StatusCode::BAD_GATEWAY),
            "upstream error\n",
        ),
        UpstreamError::Connect(_) | UpstreamError::BadResponse(_) | UpstreamError::Body(_) => {
            ErrorReply::new(StatusCode::BAD_GATEWAY, "upstream unavailable\n")
        }
        UpstreamError::Limited(l) if l.status == StatusCode::TOO_MANY_REQUESTS => {
            ErrorReply::new(StatusCode::TOO_MANY_REQUESTS, "rate limited\n")
        }
        UpstreamError::Limited(_) => ErrorReply::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many requests in flight\n",
        ),
    }
}

impl From<ErrorKind> for ProxyError {
    fn from(kind: ErrorKind) -> Self {
        ProxyError {
            side: kind.side(),
            kind,
        }
    }
}

impl From<UpstreamError> for ProxyError {
    fn from(e: UpstreamError) -> Self {
        ErrorKind::Upstream(e).into()
    }
}

impl From<BodyFault> for ProxyError {
    fn from(fault: BodyFault) -> Self {
        match fault {
            BodyFault::TooLarge => ErrorKind::BodyTooLarge,
            BodyFault::Malformed => ErrorKind::BodyMalformed,
        }
        .into()
    }
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            ErrorKind::Upstream(e) => e.fmt(f),
            _ => f.write_str(self.reply().body.trim_end()),
        }
    }
}

impl std::error::Error for ProxyError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            ErrorKind::Upstream(e) => Some(e),
            _ => None,
        }
    }
}

/// Why a downstream request body could not be passed on: the client's fault (413 / 400), not
/// the upstream's.
///
/// It travels back through the failed send, with no shared state: the body yields it as its
/// error ([`BodyFault::error`], from [`crate::body::ProxyBody::Downstream`]) and
/// [`BodyFault::find`] reads it off the client's error.
///
/// * HTTP/1.1: hyper's client fails the send with the body's error as its source.
/// * HTTP/2 (`h2c://`): hyper's client only logs the body's error and resets the stream with
///   the reason it finds in that error's sources (hyper's `Error::h2_reason`); the send fails
///   with that locally initiated reset. Each fault has a reason of its own for this
///   ([`BodyFault::h2_reason`]); neither is one hyper resets a request stream with itself
///   (`CANCEL`, `INTERNAL_ERROR`), and a reset the backend sent or h2 made is never read as
///   a fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFault {
    /// Over `MAX_REQUEST_BODY_BYTES`.
    TooLarge,
    /// Bad chunking, or cut short.
    Malformed,
}

impl BodyFault {
    /// The reason an HTTP/2 request stream is reset with for this fault.
    pub fn h2_reason(self) -> h2::Reason {
        match self {
            // "Not processed": the backend must not act on a partial body.
            BodyFault::TooLarge => h2::Reason::REFUSED_STREAM,
            BodyFault::Malformed => h2::Reason::PROTOCOL_ERROR,
        }
    }

    /// The error a downstream body yields for this fault.
    pub fn error(self) -> BodyFaultError {
        BodyFaultError {
            fault: self,
            reset: self.h2_reason().into(),
        }
    }

    /// The body fault behind `e`, a failed upstream send, if it was one.
    pub fn find(e: &(dyn std::error::Error + 'static)) -> Option<BodyFault> {
        let mut source = Some(e);
        while let Some(s) = source {
            if let Some(e) = s.downcast_ref::<BodyFaultError>() {
                return Some(e.fault);
            }
            if let Some(h2) = s.downcast_ref::<h2::Error>() {
                // Reset by our side of the connection (not the backend, not h2 itself).
                let ours = h2.is_reset() && !h2.is_remote() && !h2.is_library();
                return [BodyFault::TooLarge, BodyFault::Malformed]
                    .into_iter()
                    .find(|f| ours && h2.reason() == Some(f.h2_reason()));
            }
            source = s.source();
        }
        None
    }
}

impl fmt::Display for BodyFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BodyFault::TooLarge => "request body exceeds MAX_REQUEST_BODY_BYTES",
            BodyFault::Malformed => "request body malformed or cut short",
        })
    }
}

/// The error a downstream body yields ([`BodyFault::error`]). Its source is the HTTP/2 reason
/// the stream is reset with, where hyper looks for one.
#[derive(Debug)]
pub struct BodyFaultError {
    fault: BodyFault,
    reset: h2::Error,
}

impl fmt::Display for BodyFaultError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.fault.fmt(f)
    }
}

impl std::error::Error for BodyFaultError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.reset)
    }
}

/// Why an upstream exchange failed. Cloneable so one failure can be handed to every
/// coalesced waiter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamError {
    /// Could not connect (refused, unreachable, DNS).
    Connect(String),
    /// `REQ_TIMEOUT` passed before the response (or, when caching, its body) was complete.
    Timeout,
    /// The upstream answered with something that is not valid HTTP, or the connection
    /// broke before the response head.
    BadResponse(String),
    /// The response body failed or was cut short.
    Body(String),
    /// Internal: the request for the upstream could not be built.
    Request(String),
    /// No backend may take a request now (all down or their breakers open).
    NoBackend { retry_after_secs: u64 },
    /// The upstream answered a revalidation or refresh with this server error; the stored
    /// copy is kept rather than replaced by an error.
    Status(u16),
    /// A route's rate limit (429) or in-flight cap (503) kept the request from the upstream.
    Limited(Limited),
}

/// A request a route's limits kept from the upstream: the status and its fields
/// (`Retry-After`, `RateLimit-*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limited {
    pub status: StatusCode,
    pub headers: Vec<(http::HeaderName, http::HeaderValue)>,
}

impl UpstreamError {
    /// The status a client gets for this failure.
    pub fn status(&self) -> StatusCode {
        upstream_reply(self).status
    }

    /// Short label for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            UpstreamError::Connect(_) => "connect",
            UpstreamError::Timeout => "timeout",
            UpstreamError::NoBackend { .. } => "no_backend",
            UpstreamError::BadResponse(_) => "bad_response",
            UpstreamError::Body(_) => "body",
            UpstreamError::Request(_) => "request",
            UpstreamError::Status(_) => "status",
            UpstreamError::Limited(l) if l.status == StatusCode::TOO_MANY_REQUESTS => {
                "rate_limited"
            }
            UpstreamError::Limited(_) => "in_flight_cap",
        }
    }
}

impl fmt::Display for UpstreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UpstreamError::Connect(e) => write!(f, "upstream connect failed: {e}"),
            UpstreamError::Timeout => f.write_str("upstream timed out"),
            UpstreamError::NoBackend { .. } => f.write_str("no healthy upstream backend"),
            UpstreamError::BadResponse(e) => write!(f, "bad upstream response: {e}"),
            UpstreamError::Body(e) => write!(f, "upstream body failed: {e}"),
            UpstreamError::Request(e) => write!(f, "cannot build upstream request: {e}"),
            UpstreamError::Status(code) => write!(f, "upstream answered {code}"),
            UpstreamError::Limited(l) if l.status == StatusCode::TOO_MANY_REQUESTS => {
                f.write_str("over the route's rate limit")
            }
            UpstreamError::Limited(_) => f.write_str("at the route's in-flight cap"),
        }
    }
}

impl std::error::Error for UpstreamError {}

/// Renders an error and its sources on one line.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_mapping() {
        assert_eq!(UpstreamError::Timeout.status(), StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(
            UpstreamError::NoBackend {
                retry_after_secs: 3
            }
            .status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            UpstreamError::Connect("refused".into()).status(),
            StatusCode::BAD_GATEWAY
        );
        assert_eq!(
            UpstreamError::BadResponse("x".into()).status(),
            StatusCode::BAD_GATEWAY
        );
        assert_eq!(
            UpstreamError::Body("reset".into()).status(),
            StatusCode::BAD_GATEWAY
        );
    }

    fn reply(kind: ErrorKind) -> ErrorReply {
        ProxyError::from(kind).reply()
    }

    /// Every kind's status, body and extra headers, byte for byte as clients got them before
    /// the mapping moved here (integration tests assert on some).
    #[test]
    fn each_kind_has_one_reply() {
        /// Kind → status, body, `Retry-After`, `Connection: close`, side.
        type Case = (ErrorKind, u16, &'static str, Option<u64>, bool, Side);
        let cases: [Case; 16] = [
            (
                ErrorKind::InvalidHost,
                400,
                "invalid Host\n",
                None,
                false,
                Side::Downstream,
            ),
            (
                ErrorKind::InvalidForwardedProto,
                400,
                "invalid X-Forwarded-Proto\n",
                None,
                false,
                Side::Downstream,
            ),
            (
                ErrorKind::HostNotServed,
                421,
                "this host is not served here (ALLOWED_HOSTS)\n",
                None,
                false,
                Side::Downstream,
            ),
            (
                ErrorKind::ConnectNotSupported,
                405,
                "CONNECT is not supported\n",
                None,
                false,
                Side::Downstream,
            ),
            (
                ErrorKind::NotCached,
                504,
                "not cached (only-if-cached)\n",
                None,
                false,
                Side::Downstream,
            ),
            (
                ErrorKind::BodyTooLarge,
                413,
                "request body too large\n",
                None,
                false,
                Side::Downstream,
            ),
            (
                ErrorKind::BodyMalformed,
                400,
                "malformed request body\n",
                None,
                true,
                Side::Downstream,
            ),
            (
                ErrorKind::AmbiguousFraming,
                400,
                "Content-Length together with Transfer-Encoding is not accepted\n",
                None,
                true,
                Side::Downstream,
            ),
            (
                ErrorKind::FetchAbandoned,
                502,
                "upstream fetch was abandoned\n",
                None,
                false,
                Side::Internal,
            ),
            (
                ErrorKind::Upstream(UpstreamError::Timeout),
                504,
                "upstream timed out\n",
                None,
                false,
                Side::Upstream,
            ),
            (
                ErrorKind::Upstream(UpstreamError::NoBackend {
                    retry_after_secs: 7,
                }),
                503,
                "no healthy upstream\n",
                Some(7),
                false,
                Side::Upstream,
            ),
            (
                ErrorKind::Upstream(UpstreamError::Connect("refused".into())),
                502,
                "upstream unavailable\n",
                None,
                false,
                Side::Upstream,
            ),
            (
                ErrorKind::Upstream(UpstreamError::BadResponse("garbage".into())),
                502,
                "upstream unavailable\n",
                None,
                false,
                Side::Upstream,
            ),
            (
                ErrorKind::Upstream(UpstreamError::Body("reset".into())),
                502,
                "upstream unavailable\n",
                None,
                false,
                Side::Upstream,
            ),
            (
                ErrorKind::Upstream(UpstreamError::Status(503)),
                503,
                "upstream error\n",
                None,
                false,
                Side::Upstream,
            ),
            (
                ErrorKind::Upstream(UpstreamError::Request("bad uri".into())),
                400,
                "bad request\n",
                None,
                false,
                Side::Internal,
            ),
        ];
        for (kind, status, body, retry_after, close, side) in cases {
            let label = kind.as_str();
            let err = ProxyError::from(kind);
            assert_eq!(err.side, side, "{label}");
            let r = err.reply();
            assert_eq!(r.status.as_u16(), status, "{label}");
            assert_eq!(r.body, body, "{label}");
            assert_eq!(r.retry_after, retry_after, "{label}");
            assert_eq!(r.close, close, "{label}");
            if let ErrorKind::Upstream(e) = &err.kind {
                assert_eq!(e.status(), r.status, "{label}: one mapping");
            }
        }
    }

    /// An out-of-range upstream status cannot make a bogus status line.
    #[test]
    fn unusable_upstream_status_is_a_bad_gateway() {
        let r = reply(ErrorKind::Upstream(UpstreamError::Status(1000)));
        assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    }

    /// A body fault is found however deep a client error wraps it, and becomes the client's
    /// fault (413 / 400), not the upstream's.
    #[test]
    fn body_faults_are_found_in_the_source_chain() {
        #[derive(Debug)]
        struct Wrap(Box<dyn std::error::Error + Send + Sync>);
        impl fmt::Display for Wrap {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("wrapped")
            }
        }
        impl std::error::Error for Wrap {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&*self.0)
            }
        }
        for fault in [BodyFault::TooLarge, BodyFault::Malformed] {
            let deep = Wrap(Box::new(Wrap(Box::new(fault.error()))));
            assert_eq!(BodyFault::find(&deep), Some(fault));
        }
        assert_eq!(BodyFault::find(&Wrap("io".into())), None);
        // A reason that is not a locally initiated reset (here: no stream at all) is not
        // taken for a body fault.
        let reason: h2::Error = BodyFault::TooLarge.h2_reason().into();
        assert_eq!(BodyFault::find(&Wrap(Box::new(reason))), None);
        let err = ProxyError::from(BodyFault::Malformed);
        assert_eq!(
            (err.side, err.reply().status),
            (Side::Downstream, StatusCode::BAD_REQUEST)
        );
        assert_eq!(
            ProxyError::from(BodyFault::TooLarge).reply().status,
            StatusCode::PAYLOAD_TOO_LARGE
        );
    }
}
