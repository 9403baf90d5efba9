//! The I/O wrapper around each client stream: [`TrackedIo`] stamps the connection's
//! [`Activity`] on every byte moved (so stalls are seen without reading the clock) and feeds
//! HTTP/1 request heads to the [`HeadScan`], recording which head, if any, had both framing
//! headers and how many whole heads wait in hyper's buffer.

use std::io;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use super::deadline::{Activity, PHASE_HTTP2};
use super::head_scan::HeadScan;

/// A client stream that stamps its [`Activity`] on every byte moved, and scans HTTP/1
/// request heads with a [`HeadScan`]: pipelined bodiless requests head after head; after a
/// head that announces a body, from the next request that starts once it is done (a head
/// pipelined behind a body is left to hyper, which frames it safely anyway).
#[derive(Debug)]
pub struct TrackedIo<S> {
    inner: S,
    activity: Arc<Activity>,
    scan: HeadScan,
    /// Arrival index of the head being scanned.
    head: u64,
    /// Inside a request body: not scanning until that request is done.
    in_body: bool,
}

impl<S> TrackedIo<S> {
    pub fn new(inner: S, activity: Arc<Activity>) -> Self {
        TrackedIo {
            inner,
            activity,
            scan: HeadScan::default(),
            head: 0,
            in_body: false,
        }
    }

    fn scan_heads(&mut self, mut bytes: &[u8]) {
        let a = &self.activity;
        if a.phase.load(Ordering::Relaxed) == PHASE_HTTP2 {
            return;
        }
        if self.in_body {
            let started = a.requests_started.load(Ordering::Relaxed);
            if started < self.head || a.in_flight.load(Ordering::Relaxed) > 0 {
                return;
            }
            self.in_body = false;
            self.head = started;
            self.scan = HeadScan::default();
        }
        while let Some(used) = self.scan.feed(bytes) {
            if self.scan.ambiguous() {
                a.ambiguous_head.store(self.head, Ordering::Relaxed);
            }
            self.head += 1;
            a.heads_seen.store(self.head, Ordering::Relaxed);
            let body = self.scan.has_body();
            self.scan = HeadScan::default();
            if body {
                self.in_body = true;
                a.on_head_scanned(false, Instant::now);
                return;
            }
            bytes = &bytes[used..];
        }
        a.on_head_scanned(self.scan.in_head(), Instant::now);
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for TrackedIo<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let this = &mut *self;
            let read = &buf.filled()[before..];
            this.activity.on_read(read, Instant::now);
            this.scan_heads(read);
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for TrackedIo<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.on_write();
        }
        polled
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.on_write();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::inflight::RequestGuard;

    #[test]
    fn a_pipelined_head_waiting_in_the_buffer_is_not_idle() {
        let a = Activity::opened_at(Instant::now(), Arc::default());
        let mut io = TrackedIo::new(tokio::io::empty(), a.clone());
        io.scan_heads(b"GET /a HTTP/1.1\r\n\r\n");
        drop(RequestGuard::start(&a));
        assert!(a.is_idle_keepalive());
        io.scan_heads(b"GET /b HTTP/1.1\r\n\r\n");
        assert!(!a.is_idle_keepalive(), "hyper has a whole head to serve");
        drop(RequestGuard::start(&a));
        assert!(a.is_idle_keepalive());
    }
}
