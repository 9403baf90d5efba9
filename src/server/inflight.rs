//! Requests in flight on a connection: a [`RequestGuard`] is taken when hyper hands a request
//! head to the service and held by the service future, then by the response body
//! ([`Tracked`]) until hyper drops it after the last byte (or when the connection goes away).
//! While any is held the connection is not idle: the stall deadline applies, not the
//! keep-alive one ([`super::deadline::Activity`]).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::Instant;

use super::deadline::Activity;

/// One request in flight on a connection; dropping it marks the connection idle again.
#[derive(Debug)]
pub struct RequestGuard {
    activity: Arc<Activity>,
}

impl RequestGuard {
    /// A request head was handed to the service ([`Activity::request_started`]); it is in
    /// flight until the guard is dropped.
    pub fn start(activity: &Arc<Activity>) -> Self {
        activity.request_started();
        RequestGuard {
            activity: activity.clone(),
        }
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.activity.request_ended(Instant::now());
    }
}

/// A response body that keeps its request counted as in flight until hyper drops it (after
/// the last byte is written, or when the connection goes away).
#[derive(Debug)]
pub struct Tracked<B> {
    inner: B,
    _guard: RequestGuard,
}

impl<B> Tracked<B> {
    pub fn new(inner: B, guard: RequestGuard) -> Self {
        Tracked {
            inner,
            _guard: guard,
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Tracked<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
