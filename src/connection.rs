//! Client connection deadlines: how long a connection may take to send a request head
//! (`HEADER_READ_TIMEOUT_SECS`), sit idle between requests (`KEEPALIVE_TIMEOUT_SECS`), or
//! stall with a request in flight, moving no bytes either way.
//!
//! hyper's own `header_read_timeout` also runs while a keep-alive connection waits for its
//! next request, which would make the idle timeout equal to the head timeout. So the server
//! turns it off and each connection carries an [`Activity`] record instead: the I/O wrapper
//! ([`TrackedIo`]) counts reads and writes and notes when a request head begins, a
//! [`RequestGuard`] (held by the service future, then by the response body) counts requests
//! in flight, [`Activity::deadline`] says when to look again, [`Activity::check`] whether the
//! connection is over its time, and [`Watched`] drives the connection future with a timer
//! it re-arms whenever a poll finds the deadline moved.
//!
//! The I/O wrapper also watches HTTP/1 request heads for one thing hyper does not report:
//! a head with both `Content-Length` and `Transfer-Encoding`. hyper drops the
//! `Content-Length` and frames by `Transfer-Encoding` (RFC 9112 §6.1 allows that); edgecache
//! answers such a request `400` and closes, as it does every other ambiguous framing
//! ([`HeadScan`]).
//!
//! At `MAX_CONNECTIONS`, the accept loop asks the [`Registry`] to close idle keep-alive
//! connections (as nginx does with its "reusable" connections), so clients parked on idle
//! connections cannot keep new ones waiting for a whole keep-alive timeout. Until a slot is
//! free the registry stays short of room, and a connection that goes idle meanwhile closes
//! itself at once rather than holding its slot for the keep-alive timeout.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The deadlines a connection is held to.
#[derive(Debug, Clone, Copy)]
pub struct Deadlines {
    /// From connect (first request) or from the first byte of a later request to a complete
    /// head.
    pub header: Duration,
    /// From the end of the last response to the first byte of the next request.
    pub keepalive: Duration,
    /// With a request in flight, the longest time without a byte read or written.
    pub stall: Duration,
}

/// Why a connection was closed by its deadlines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    /// The request head did not arrive in time (slowloris).
    Header,
    /// No new request within the keep-alive timeout.
    Idle,
    /// A request in flight moved no bytes for too long (a client that stopped reading).
    Stalled,
    /// Idle keep-alive, closed to make room at `MAX_CONNECTIONS`.
    Reclaimed,
}

impl Expired {
    /// Every reason, in discriminant order (the metrics index by it).
    pub const ALL: [Expired; 4] = [
        Expired::Header,
        Expired::Idle,
        Expired::Stalled,
        Expired::Reclaimed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Expired::Header => "header_timeout",
            Expired::Idle => "keepalive_timeout",
            Expired::Stalled => "stalled",
            Expired::Reclaimed => "reclaimed",
        }
    }
}

const NONE: u64 = u64::MAX;
const PHASE_FIRST: u8 = 0;
const PHASE_HTTP1: u8 = 1;
const PHASE_HTTP2: u8 = 2;
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

/// What one connection has been doing. Times are milliseconds since the connection opened.
#[derive(Debug)]
pub struct Activity {
    opened: Instant,
    in_flight: AtomicU32,
    /// Requests handed to the service so far.
    requests_started: AtomicU64,
    /// Reads and writes that moved bytes; compared at each check for stall detection (so
    /// moving bytes never reads the clock).
    io_events: AtomicU64,
    /// `io_events` at the last check, and when that check saw it move.
    progress_seen: AtomicU64,
    progress_at: AtomicU64,
    /// When the connection last became idle (no request in flight).
    idle_since: AtomicU64,
    /// When a request head was first seen incomplete (at the end of a read, or when the
    /// request before it ended); `NONE` otherwise. A head that arrives whole never sets it.
    head_started: AtomicU64,
    /// The HTTP/1 head scan stopped inside a head.
    partial_head: AtomicBool,
    /// First request not yet seen / HTTP/1 keep-alive / HTTP/2.
    phase: AtomicU8,
    /// Set by the [`Registry`]: close if idle. The connection task is woken through `waker`.
    reclaim: AtomicBool,
    waker: Mutex<Option<Waker>>,
    /// Index (in arrival order) of a request head with both `Content-Length` and
    /// `Transfer-Encoding`; `NONE` when there is none.
    ambiguous_head: AtomicU64,
    /// Complete request heads the scan has seen; more than `requests_started` means a head
    /// is waiting in hyper's buffer (a pipelined request), so the connection is not idle.
    heads_seen: AtomicU64,
    /// Shared with the [`Registry`]: set while the accept loop waits for a slot.
    room_wanted: Arc<AtomicBool>,
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Self::opened_at(Instant::now(), Arc::default())
    }

    fn opened_at(opened: Instant, room_wanted: Arc<AtomicBool>) -> Arc<Self> {
        Arc::new(Activity {
            opened,
            in_flight: AtomicU32::new(0),
            requests_started: AtomicU64::new(0),
            io_events: AtomicU64::new(0),
            progress_seen: AtomicU64::new(0),
            progress_at: AtomicU64::new(0),
            idle_since: AtomicU64::new(0),
            head_started: AtomicU64::new(NONE),
            partial_head: AtomicBool::new(false),
            phase: AtomicU8::new(PHASE_FIRST),
            reclaim: AtomicBool::new(false),
            waker: Mutex::new(None),
            ambiguous_head: AtomicU64::new(NONE),
            heads_seen: AtomicU64::new(0),
            room_wanted,
        })
    }

    fn ms(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.opened).as_millis() as u64
    }

    fn at(&self, ms: u64) -> Instant {
        self.opened + Duration::from_millis(ms)
    }

    /// Bytes were read. `now` is called only when they start an HTTP/2 connection.
    fn on_read(&self, first_bytes: &[u8], now: impl FnOnce() -> Instant) {
        self.io_events.fetch_add(1, Ordering::Relaxed);
        if self.phase.load(Ordering::Relaxed) == PHASE_FIRST && first_bytes.starts_with(H2_PREFACE)
        {
            // HTTP/2 frames between streams (PING, SETTINGS) are not request heads.
            self.phase.store(PHASE_HTTP2, Ordering::Relaxed);
            self.idle_since.store(self.ms(now()), Ordering::Relaxed);
        }
    }

    /// A read ended inside an HTTP/1 request head (`partial`), or a head was completed.
    /// Only an incomplete head with no request in flight starts the head timer, so the usual
    /// head that arrives in one read costs no clock read and moves no timer.
    fn on_head_scanned(&self, partial: bool, now: impl FnOnce() -> Instant) {
        self.partial_head.store(partial, Ordering::Relaxed);
        if partial
            && self.in_flight.load(Ordering::Relaxed) == 0
            && self.head_started.load(Ordering::Relaxed) == NONE
        {
            self.head_started.store(self.ms(now()), Ordering::Relaxed);
        }
    }

    fn on_write(&self) {
        self.io_events.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether the head about to be handed to the service (call before
    /// [`Activity::request_started`]) had both `Content-Length` and `Transfer-Encoding`.
    pub fn next_head_is_ambiguous(&self) -> bool {
        let next = self.requests_started.load(Ordering::Relaxed);
        self.ambiguous_head.load(Ordering::Relaxed) == next
    }

    /// A request head was handed to the service: the request is in flight until the guard
    /// (moved into the response body) is dropped.
    pub fn request_started(self: &Arc<Self>) -> RequestGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.requests_started.fetch_add(1, Ordering::Relaxed);
        self.head_started.store(NONE, Ordering::Relaxed);
        if self.phase.load(Ordering::Relaxed) == PHASE_FIRST {
            self.phase.store(PHASE_HTTP1, Ordering::Relaxed);
        }
        RequestGuard {
            activity: self.clone(),
        }
    }

    /// Between requests on a kept-alive connection: nothing in flight, no head begun or
    /// waiting to be served.
    pub fn is_idle_keepalive(&self) -> bool {
        // SeqCst pairs with `RequestGuard::drop` and `Registry::want_room`: either the
        // registry sees the request ended, or the connection sees room is wanted.
        self.in_flight.load(Ordering::SeqCst) == 0
            && self.phase.load(Ordering::Relaxed) != PHASE_FIRST
            && self.head_started.load(Ordering::Relaxed) == NONE
            && self.heads_seen.load(Ordering::Relaxed)
                <= self.requests_started.load(Ordering::Relaxed)
    }

    /// Asks the connection to close if it is idle when its task next runs, and wakes it.
    fn ask_to_close(&self) {
        self.reclaim.store(true, Ordering::Relaxed);
        if let Ok(waker) = self.waker.lock() {
            if let Some(w) = waker.as_ref() {
                w.wake_by_ref();
            }
        }
    }

    /// The connection's current deadline and what passing it means. Reads no clock: cheap
    /// enough to recompute whenever the connection task is polled.
    pub fn deadline(&self, limits: &Deadlines) -> (Instant, Expired) {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            // Progress is only looked for when this deadline passes (`check`), so a stall
            // is detected between one and two `stall` periods after the last byte.
            let since = self
                .progress_at
                .load(Ordering::Relaxed)
                .max(self.idle_since.load(Ordering::Relaxed));
            (self.at(since) + limits.stall, Expired::Stalled)
        } else if self.phase.load(Ordering::Relaxed) == PHASE_FIRST {
            // nginx's rule: the first request head is timed from the connect.
            (self.opened + limits.header, Expired::Header)
        } else {
            let head = self.head_started.load(Ordering::Relaxed);
            if head != NONE {
                (self.at(head) + limits.header, Expired::Header)
            } else {
                let idle = self.idle_since.load(Ordering::Relaxed);
                (self.at(idle) + limits.keepalive, Expired::Idle)
            }
        }
    }

    /// At or after the deadline: whether the connection is over its time. Bytes moved since
    /// the last check count as progress and push a stall deadline on.
    pub fn check(&self, limits: &Deadlines, now: Instant) -> Option<Expired> {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            let events = self.io_events.load(Ordering::Relaxed);
            if self.progress_seen.swap(events, Ordering::Relaxed) != events {
                self.progress_at.store(self.ms(now), Ordering::Relaxed);
                return None;
            }
        }
        let (at, why) = self.deadline(limits);
        (now >= at).then_some(why)
    }
}

/// A connection future held to its [`Activity`]'s deadlines: resolves with the connection's
/// own result, or with why it was cut off (dropping the connection closes the socket). A
/// poll that finds the deadline moved earlier re-arms the timer; one that moved later is
/// re-armed when the timer fires.
pub struct Watched<C> {
    conn: Pin<Box<C>>,
    sleep: Pin<Box<Sleep>>,
    armed: Instant,
    activity: Arc<Activity>,
    limits: Deadlines,
    waker_stored: bool,
}

impl<C> Watched<C> {
    pub fn new(conn: C, activity: Arc<Activity>, limits: Deadlines) -> Self {
        let (armed, _) = activity.deadline(&limits);
        Watched {
            conn: Box::pin(conn),
            sleep: Box::pin(tokio::time::sleep_until(armed)),
            armed,
            activity,
            limits,
            waker_stored: false,
        }
    }
}

impl<C: Future> Future for Watched<C> {
    type Output = Result<C::Output, Expired>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if !this.waker_stored {
            // The task's waker is stable: store it once, for the registry to wake it.
            if let Ok(mut w) = this.activity.waker.lock() {
                *w = Some(cx.waker().clone());
            }
            this.waker_stored = true;
        }
        if let Poll::Ready(out) = this.conn.as_mut().poll(cx) {
            return Poll::Ready(Ok(out));
        }
        if this.activity.reclaim.swap(false, Ordering::Relaxed) && this.activity.is_idle_keepalive()
        {
            return Poll::Ready(Err(Expired::Reclaimed));
        }
        // The timer is only moved earlier here (a head that began after a long idle); a
        // deadline that moved later is picked up when the timer fires, so steady traffic
        // does not touch the timer wheel on every request.
        let (at, _) = this.activity.deadline(&this.limits);
        if at < this.armed {
            this.sleep.as_mut().reset(at);
            this.armed = at;
        }
        loop {
            if this.sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            if let Some(why) = this.activity.check(&this.limits, Instant::now()) {
                return Poll::Ready(Err(why));
            }
            // Not over its time: the deadline moved on. Re-arm for it (never in the past).
            let (at, _) = this.activity.deadline(&this.limits);
            this.armed = at.max(Instant::now() + Duration::from_millis(10));
            this.sleep.as_mut().reset(this.armed);
        }
    }
}

/// The open connections, for closing idle ones under pressure.
#[derive(Debug, Default)]
pub struct Registry {
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Arc<Activity>>>,
    /// The accept loop waits for a slot: connections that go idle close at once.
    room_wanted: Arc<AtomicBool>,
}

/// A connection's place in the [`Registry`], given up on drop.
#[derive(Debug)]
pub struct Registered {
    registry: Arc<Registry>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        if let Ok(mut open) = self.registry.open.lock() {
            open.remove(&self.id);
        }
    }
}

impl Registry {
    /// A new connection's [`Activity`], registered until the [`Registered`] is dropped.
    pub fn register(self: &Arc<Self>) -> (Arc<Activity>, Registered) {
        let activity = Activity::opened_at(Instant::now(), self.room_wanted.clone());
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut open) = self.open.lock() {
            open.insert(id, activity.clone());
        }
        let registered = Registered {
            registry: self.clone(),
            id,
        };
        (activity, registered)
    }

    /// Every slot is taken and a new connection waits: asks up to `batch` idle keep-alive
    /// connections to close now, and every connection that goes idle from now until
    /// [`Registry::room_found`] to close as soon as it does. Returns how many were asked now.
    pub fn want_room(&self, batch: usize) -> usize {
        self.room_wanted.store(true, Ordering::SeqCst);
        let Ok(open) = self.open.lock() else {
            return 0;
        };
        let mut asked = 0;
        for activity in open.values() {
            if asked == batch {
                break;
            }
            if activity.is_idle_keepalive() {
                activity.ask_to_close();
                asked += 1;
            }
        }
        asked
    }

    /// A slot was found: connections going idle keep their slots again.
    pub fn room_found(&self) {
        self.room_wanted.store(false, Ordering::SeqCst);
    }
}

/// One request in flight on a connection; dropping it marks the connection idle again.
#[derive(Debug)]
pub struct RequestGuard {
    activity: Arc<Activity>,
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let a = &self.activity;
        let now = a.ms(Instant::now());
        a.idle_since.store(now, Ordering::Relaxed);
        if a.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            // A head pipelined behind this request arrived incomplete: time it from now.
            if a.partial_head.load(Ordering::Relaxed)
                && a.head_started.load(Ordering::Relaxed) == NONE
            {
                a.head_started.store(now, Ordering::Relaxed);
            }
            // At MAX_CONNECTIONS with a new connection waiting: give up the slot now (if
            // still idle when the connection task looks) instead of at the keep-alive
            // timeout.
            if a.room_wanted.load(Ordering::SeqCst) {
                a.ask_to_close();
            }
        }
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

/// Finds request heads that carry both `Content-Length` and `Transfer-Encoding`, fed the
/// bytes of one head as they arrive (split anywhere). Only the start of each line is looked
/// at; it stops at the blank line that ends the head.
///
/// It must agree with hyper (httparse) about where each head starts and ends, or the heads
/// it flags are matched to the wrong requests: like httparse, it skips any number of empty
/// lines (CRLF or bare LF) before the request line (RFC 9112 §2.2), and those count neither
/// as a head of their own nor as the start of one.
#[derive(Debug, Default)]
pub struct HeadScan {
    /// The request line has begun: a byte other than CR or LF has been fed.
    begun: bool,
    /// The first bytes of the current line (enough for the longest name and its colon).
    line: [u8; 18],
    line_len: u8,
    /// Past the 18 bytes kept, or past the colon: the rest of the line is not looked at.
    line_skip: bool,
    content_length: bool,
    transfer_encoding: bool,
}

impl HeadScan {
    /// Feeds head bytes; returns how many it took when the head ended within them.
    ///
    /// Only lines that start with `c`/`t` are looked at, and only up to their colon; the
    /// rest of every line is skipped with a SIMD newline search.
    pub fn feed(&mut self, bytes: &[u8]) -> Option<usize> {
        let mut i = 0;
        if !self.begun {
            // RFC 9112 §2.2: empty lines before the request line are ignored, as httparse
            // does (any number, CRLF or LF). A lone CR it would refuse; hyper answers that.
            i = bytes.iter().position(|&b| b != b'\r' && b != b'\n')?;
            self.begun = true;
        }
        while i < bytes.len() {
            if self.line_skip {
                i += memchr::memchr(b'\n', &bytes[i..])?;
            }
            let b = bytes[i];
            i += 1;
            match b {
                b'\n' => {
                    let line = &self.line[..self.line_len as usize];
                    let blank = !self.line_skip && (line.is_empty() || line == b"\r");
                    self.line_len = 0;
                    self.line_skip = false;
                    if blank {
                        return Some(i);
                    }
                }
                b':' => {
                    let name = &self.line[..self.line_len as usize];
                    self.content_length |= name.eq_ignore_ascii_case(b"content-length");
                    self.transfer_encoding |= name.eq_ignore_ascii_case(b"transfer-encoding");
                    self.line_skip = true;
                }
                _ if self.line_len == 0 && !matches!(b, b'c' | b'C' | b't' | b'T' | b'\r') => {
                    self.line_skip = true;
                }
                _ if (self.line_len as usize) < self.line.len() => {
                    self.line[self.line_len as usize] = b;
                    self.line_len += 1;
                }
                _ => self.line_skip = true,
            }
        }
        None
    }

    /// Bytes of a head (past any empty lines before it) have been fed and its end not seen
    /// yet.
    pub fn in_head(&self) -> bool {
        self.begun
    }

    /// Both `Content-Length` and `Transfer-Encoding` were in the head.
    pub fn ambiguous(&self) -> bool {
        self.content_length && self.transfer_encoding
    }

    /// The head announced a body: the bytes after it are not the next head.
    pub fn has_body(&self) -> bool {
        self.content_length || self.transfer_encoding
    }
}

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

    const LIMITS: Deadlines = Deadlines {
        header: Duration::from_secs(10),
        keepalive: Duration::from_secs(75),
        stall: Duration::from_secs(60),
    };

    fn secs(t0: Instant, s: u64) -> Instant {
        t0 + Duration::from_secs(s)
    }

    #[test]
    fn first_request_head_is_timed_from_the_connect() {
        let t0 = Instant::now();
        let a = Activity::opened_at(t0, Arc::default());
        assert_eq!(a.deadline(&LIMITS), (secs(t0, 10), Expired::Header));
        assert_eq!(a.check(&LIMITS, secs(t0, 9)), None);
        a.on_read(b"GET / HTTP/1.1\r\n", || secs(t0, 5));
        assert_eq!(
            a.deadline(&LIMITS).0,
            secs(t0, 10),
            "not from the first byte"
        );
        assert_eq!(a.check(&LIMITS, secs(t0, 10)), Some(Expired::Header));
    }

    #[test]
    fn keepalive_idle_then_a_new_head_gets_the_header_timeout() {
        let t0 = Instant::now();
        let a = Activity::opened_at(t0, Arc::default());
        a.on_read(b"GET / HTTP/1.1\r\n\r\n", || t0);
        let guard = a.request_started();
        assert_eq!(a.check(&LIMITS, t0), None);
        drop(guard);
        let idle = Instant::now();
        let (at, why) = a.deadline(&LIMITS);
        assert_eq!(why, Expired::Idle);
        assert!(at > idle + Duration::from_secs(74) && at <= idle + LIMITS.keepalive);
        let later = idle + Duration::from_secs(30);
        a.on_head_scanned(true, || later);
        assert_eq!(a.check(&LIMITS, later + Duration::from_secs(9)), None);
        assert_eq!(
            a.check(&LIMITS, later + LIMITS.header),
            Some(Expired::Header)
        );
    }

    #[test]
    fn a_head_that_arrives_whole_does_not_start_the_head_timer() {
        let t0 = Instant::now();
        let a = Activity::opened_at(t0, Arc::default());
        drop(a.request_started());
        let (idle_deadline, why) = a.deadline(&LIMITS);
        assert_eq!(why, Expired::Idle);
        a.on_head_scanned(false, || panic!("no clock read for a whole head"));
        assert_eq!(a.deadline(&LIMITS), (idle_deadline, Expired::Idle));
    }

    #[test]
    fn a_partial_head_pipelined_behind_a_request_is_timed_from_its_end() {
        let t0 = Instant::now();
        let a = Activity::opened_at(t0, Arc::default());
        let guard = a.request_started();
        a.on_head_scanned(true, || t0); // in flight: not timed yet
        assert_eq!(a.deadline(&LIMITS).1, Expired::Stalled);
        drop(guard);
        let (at, why) = a.deadline(&LIMITS);
        assert_eq!(why, Expired::Header);
        assert!(at <= Instant::now() + LIMITS.header);
    }

    #[test]
    fn a_request_in_flight_is_only_cut_when_nothing_moves() {
        let t0 = Instant::now();
        let a = Activity::opened_at(t0, Arc::default());
        a.on_read(b"GET /big HTTP/1.1\r\n\r\n", || t0);
        let _guard = a.request_started();
        assert_eq!(a.deadline(&LIMITS), (secs(t0, 60), Expired::Stalled));
        // Bytes moved since the last look: progress, the deadline moves on.
        a.on_write();
        assert_eq!(a.check(&LIMITS, secs(t0, 60)), None);
        assert_eq!(a.deadline(&LIMITS).0, secs(t0, 120));
        // Nothing moved since: stalled.
        assert_eq!(a.check(&LIMITS, secs(t0, 120)), Some(Expired::Stalled));
    }

    /// Feeds chunks until the head ends; whether it was ambiguous.
    fn scan(chunks: &[&[u8]]) -> bool {
        let mut scan = HeadScan::default();
        for c in chunks {
            if scan.feed(c).is_some() {
                return scan.ambiguous();
            }
        }
        panic!("the head did not end");
    }

    #[test]
    fn head_scan_finds_content_length_with_transfer_encoding() {
        let head: &[u8] =
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(scan(&[head]));
        // Split anywhere, down to one byte at a time.
        let bytes: Vec<&[u8]> = head.chunks(1).collect();
        assert!(scan(&bytes));
        assert!(scan(&[
            b"POST / HTTP/1.1\r\ntransfer-ENCODING: chunked\r\ncontent-length:4\r\n\r\n"
        ]));
    }

    #[test]
    fn head_scan_ignores_what_is_not_a_field_name_of_this_head() {
        assert!(!scan(&[b"POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\n"]));
        assert!(!scan(&[
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        ]));
        // In a value, in a longer name, or after the head (the body, a pipelined request).
        assert!(!scan(&[
            b"POST / HTTP/1.1\r\nX-A: transfer-encoding: chunked\r\n",
            b"Content-Length-X: 1\r\nContent-Length: 5\r\n\r\n",
            b"Transfer-Encoding: chunked\r\n\r\n",
        ]));
        let mut head = HeadScan::default();
        let two = b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\n";
        assert_eq!(head.feed(two), Some(27));
        assert!(!head.has_body());
    }

    #[test]
    fn head_scan_skips_empty_lines_before_the_request_line_as_hyper_does() {
        let head: &[u8] =
            b"POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n";
        for prefix in [&b"\r\n"[..], b"\n", b"\r\n\r\n\n"] {
            let bytes = [prefix, head].concat();
            // Whole, and split at every point: one head, ending where httparse says.
            for split in 0..=bytes.len() {
                let mut scan = HeadScan::default();
                let first = scan.feed(&bytes[..split]);
                let end = first.or_else(|| scan.feed(&bytes[split..]).map(|n| split + n));
                assert_eq!(end, Some(bytes.len()), "{prefix:?} split at {split}");
                assert!(scan.ambiguous(), "{prefix:?} split at {split}");
            }
        }
        // Empty lines alone are not a head, and do not begin one.
        let mut scan = HeadScan::default();
        assert_eq!(scan.feed(b"\r\n\r\n\n\r"), None);
        assert!(!scan.in_head());
        assert_eq!(scan.feed(b"\nG"), None);
        assert!(scan.in_head());
    }

    /// The scanner and httparse (hyper's parser) agree on where heads end and on whether
    /// both framing headers are present, for every head httparse accepts.
    #[test]
    fn head_scan_agrees_with_httparse() {
        let prefixes: [&[u8]; 4] = [b"", b"\r\n", b"\n\r\n", b"\r\n\r\n"];
        let lines: [&[u8]; 7] = [
            b"Host: x\r\n",
            b"content-length: 4\r\n",
            b"Transfer-Encoding: chunked\n",
            b"X-A: transfer-encoding: chunked\r\n",
            b"Content-Length-X: 1\r\n",
            b"TE: trailers\r\n",
            b"Transfer-Encodings: chunked\r\n",
        ];
        let mut checked = 0;
        for prefix in prefixes {
            for request_line in [&b"POST /a HTTP/1.1\r\n"[..], b"TRACE /t HTTP/1.1\n"] {
                for mask in 0u32..(1 << lines.len()) {
                    let mut bytes = [prefix, request_line].concat();
                    for (i, line) in lines.iter().enumerate() {
                        if mask & (1 << i) != 0 {
                            bytes.extend_from_slice(line);
                        }
                    }
                    bytes.extend_from_slice(b"\r\n");
                    let head_len = bytes.len();
                    bytes.extend_from_slice(b"GET /next HTTP/1.1\r\n\r\n");
                    let mut fields = [httparse::EMPTY_HEADER; 16];
                    let mut req = httparse::Request::new(&mut fields);
                    let Ok(httparse::Status::Complete(n)) = req.parse(&bytes) else {
                        panic!("httparse refused {:?}", String::from_utf8_lossy(&bytes));
                    };
                    assert_eq!(n, head_len);
                    let has = |name: &str| {
                        req.headers
                            .iter()
                            .any(|h| h.name.eq_ignore_ascii_case(name))
                    };
                    let mut scan = HeadScan::default();
                    assert_eq!(
                        scan.feed(&bytes),
                        Some(n),
                        "{:?}",
                        String::from_utf8_lossy(&bytes)
                    );
                    assert_eq!(
                        scan.ambiguous(),
                        has("content-length") && has("transfer-encoding"),
                        "{:?}",
                        String::from_utf8_lossy(&bytes)
                    );
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 4 * 2 * 128);
    }

    #[test]
    fn only_idle_keepalive_connections_are_reclaimable() {
        let t0 = Instant::now();
        let a = Activity::opened_at(t0, Arc::default());
        assert!(!a.is_idle_keepalive(), "first request not seen yet");
        a.on_read(b"GET / HTTP/1.1\r\n\r\n", || t0);
        let guard = a.request_started();
        assert!(!a.is_idle_keepalive(), "request in flight");
        drop(guard);
        assert!(a.is_idle_keepalive());
        a.on_head_scanned(true, || t0);
        assert!(!a.is_idle_keepalive(), "a head has begun");
    }

    #[test]
    fn a_pipelined_head_waiting_in_the_buffer_is_not_idle() {
        let a = Activity::opened_at(Instant::now(), Arc::default());
        let mut io = TrackedIo::new(tokio::io::empty(), a.clone());
        io.scan_heads(b"GET /a HTTP/1.1\r\n\r\n");
        drop(a.request_started());
        assert!(a.is_idle_keepalive());
        io.scan_heads(b"GET /b HTTP/1.1\r\n\r\n");
        assert!(!a.is_idle_keepalive(), "hyper has a whole head to serve");
        drop(a.request_started());
        assert!(a.is_idle_keepalive());
    }

    /// While the accept loop waits for a slot, a connection asks to close the moment it goes
    /// idle, not only those idle when the wait began; once a slot is found, no longer.
    #[test]
    fn connections_going_idle_while_room_is_wanted_are_asked_to_close() {
        let registry = Arc::new(Registry::default());
        let (busy, _r1) = registry.register();
        let (fresh, _r2) = registry.register();
        let guard = busy.request_started();
        assert_eq!(registry.want_room(32), 0, "nothing idle yet");
        assert!(!busy.reclaim.load(Ordering::Relaxed));
        drop(guard);
        assert!(
            busy.reclaim.load(Ordering::Relaxed),
            "asked when it went idle"
        );
        assert!(
            !fresh.reclaim.load(Ordering::Relaxed),
            "first request not seen"
        );
        busy.reclaim.store(false, Ordering::Relaxed);
        registry.room_found();
        drop(busy.request_started());
        assert!(
            !busy.reclaim.load(Ordering::Relaxed),
            "room found: keeps its slot"
        );
        // Idle when the wait begins: asked at once.
        assert_eq!(registry.want_room(32), 1);
        assert!(busy.reclaim.load(Ordering::Relaxed));
    }

    #[test]
    fn http2_frames_between_streams_are_not_request_heads() {
        let t0 = Instant::now();
        let a = Activity::opened_at(t0, Arc::default());
        a.on_read(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", || secs(t0, 1));
        a.on_read(b"\x00\x00\x08\x06", || secs(t0, 20)); // a PING
        assert_eq!(a.deadline(&LIMITS), (secs(t0, 76), Expired::Idle));
        assert_eq!(a.check(&LIMITS, secs(t0, 20)), None);
    }
}
