//! Upstream failures and the one place they become status codes.

use std::fmt;

use http::StatusCode;

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
}

impl UpstreamError {
    /// The status a client gets for this failure.
    pub fn status(&self) -> StatusCode {
        match self {
            UpstreamError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            UpstreamError::NoBackend { .. } => StatusCode::SERVICE_UNAVAILABLE,
            UpstreamError::Request(_) => StatusCode::BAD_REQUEST,
            UpstreamError::Status(code) => {
                StatusCode::from_u16(*code).unwrap_or(StatusCode::BAD_GATEWAY)
            }
            _ => StatusCode::BAD_GATEWAY,
        }
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
}
