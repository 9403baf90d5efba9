//! Client connection deadlines: how long a connection may take to send a request head
//! (`HEADER_READ_TIMEOUT_SECS`), sit idle between requests (`KEEPALIVE_TIMEOUT_SECS`), or
//! stall with a request in flight, moving no bytes either way.
//!
//! hyper's own `header_read_timeout` also runs while a keep-alive connection waits for its
//! next request, which would make the idle timeout equal to the head timeout. So the server
//! turns it off and each connection carries an [`Activity`] record instead: the I/O wrapper
//! ([`super::io::TrackedIo`]) counts reads and writes and notes when a request head begins, a
//! [`super::inflight::RequestGuard`] (held by the service future, then by the response body)
//! counts requests in flight, [`Activity::deadline`] says when to look again,
//! [`Activity::check`] whether the connection is over its time, and [`Watched`] drives the
//! connection future with a timer it re-arms whenever a poll finds the deadline moved.
//!
//! [`Activity`] is the state machine; its transitions read no clock: each one that needs the
//! time is passed it (or a closure that gives it, called only when needed), so the unit tests
//! below run on made-up instants. [`Watched`] is the one part that reads the clock and arms a timer.
//! It also closes a connection the reclaim [`super::reclaim::Registry`] asked to close, if the
//! connection is still idle.

pub use crate::metrics::Expired;
use atomic_waker::AtomicWaker;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

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

const NONE: u64 = u64::MAX;
const PHASE_FIRST: u8 = 0;
const PHASE_HTTP1: u8 = 1;
pub(super) const PHASE_HTTP2: u8 = 2;
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

/// What one connection has been doing. Times are milliseconds since the connection opened.
#[derive(Debug)]
pub struct Activity {
    opened: Instant,
    pub(super) in_flight: AtomicU32,
    /// Requests handed to the service so far.
    pub(super) requests_started: AtomicU64,
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
    pub(super) phase: AtomicU8,
    /// Set by the [`super::reclaim::Registry`]: close if idle. The connection task is woken through `waker`.
    pub(super) reclaim: AtomicBool,
    waker: AtomicWaker,
    /// Index (in arrival order) of a request head with both `Content-Length` and
    /// `Transfer-Encoding`; `NONE` when there is none.
    pub(super) ambiguous_head: AtomicU64,
    /// Complete request heads the scan has seen; more than `requests_started` means a head
    /// is waiting in hyper's buffer (a pipelined request), so the connection is not idle.
    pub(super) heads_seen: AtomicU64,
    /// Shared with the [`super::reclaim::Registry`]: set while the accept loop waits for a slot.
    room_wanted: Arc<AtomicBool>,
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Self::opened_at(Instant::now(), Arc::default())
    }

    pub(super) fn opened_at(opened: Instant, room_wanted: Arc<AtomicBool>) -> Arc<Self> {
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
            waker: AtomicWaker::new(),
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
    pub(super) fn on_read(&self, first_bytes: &[u8], now: impl FnOnce() -> Instant) {
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
    pub(super) fn on_head_scanned(&self, partial: bool, now: impl FnOnce() -> Instant) {
        self.partial_head.store(partial, Ordering::Relaxed);
        if partial
            && self.in_flight.load(Ordering::Relaxed) == 0
            && self.head_started.load(Ordering::Relaxed) == NONE
        {
            self.head_started.store(self.ms(now()), Ordering::Relaxed);
        }
    }

    pub(super) fn on_write(&self) {
        self.io_events.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether the head about to be handed to the service (call before
    /// [`Activity::request_started`]) had both `Content-Length` and `Transfer-Encoding`.
    pub fn next_head_is_ambiguous(&self) -> bool {
        let next = self.requests_started.load(Ordering::Relaxed);
        self.ambiguous_head.load(Ordering::Relaxed) == next
    }

    /// A request head was handed to the service: the request is in flight until
    /// [`Activity::request_ended`] (called when its [`super::inflight::RequestGuard`], moved
    /// into the response body, is dropped).
    pub fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.requests_started.fetch_add(1, Ordering::Relaxed);
        self.head_started.store(NONE, Ordering::Relaxed);
        if self.phase.load(Ordering::Relaxed) == PHASE_FIRST {
            self.phase.store(PHASE_HTTP1, Ordering::Relaxed);
        }
    }

    /// A request started with [`Activity::request_started`] ended at `now`: the connection is
    /// idle again once none is left in flight.
    pub fn request_ended(&self, now: Instant) {
        let now = self.ms(now);
        self.idle_since.store(now, Ordering::Relaxed);
        if self.in_flight.fetch_sub(1, Ordering::SeqCst) == 1 {
            // A head pipelined behind this request arrived incomplete: time it from now.
            if self.partial_head.load(Ordering::Relaxed)
                && self.head_started.load(Ordering::Relaxed) == NONE
            {
                self.head_started.store(now, Ordering::Relaxed);
            }
            // At MAX_CONNECTIONS with a new connection waiting: give up the slot now (if
            // still idle when the connection task looks) instead of at the keep-alive
            // timeout.
            if self.room_wanted.load(Ordering::SeqCst) {
                self.ask_to_close();
            }
        }
    }

    /// Between requests on a kept-alive connection: nothing in flight, no head begun or
    /// waiting to be served.
    pub fn is_idle_keepalive(&self) -> bool {
        // SeqCst pairs with `Activity::request_ended` and `Registry::want_room`: either the
        // registry sees the request ended, or the connection sees room is wanted.
        self.in_flight.load(Ordering::SeqCst) == 0
            && self.phase.load(Ordering::Relaxed) != PHASE_FIRST
            && self.head_started.load(Ordering::Relaxed) == NONE
            && self.heads_seen.load(Ordering::Relaxed)
                <= self.requests_started.load(Ordering::Relaxed)
    }

    /// Asks the connection to close if it is idle when its task next runs, and wakes it.
    pub(super) fn ask_to_close(&self) {
        self.reclaim.store(true, Ordering::Relaxed);
        self.waker.wake();
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
        }
    }
}

impl<C: Future> Future for Watched<C> {
    type Output = Result<C::Output, Expired>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        // For the registry to wake this task (a clone only when the waker changed).
        this.activity.waker.register(cx.waker());
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
        a.request_started();
        assert_eq!(a.check(&LIMITS, t0), None);
        let idle = secs(t0, 2);
        a.request_ended(idle);
        assert_eq!(
            a.deadline(&LIMITS),
            (idle + LIMITS.keepalive, Expired::Idle)
        );
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
        a.request_started();
        a.request_ended(secs(t0, 1));
        let (idle_deadline, why) = a.deadline(&LIMITS);
        assert_eq!(why, Expired::Idle);
        a.on_head_scanned(false, || panic!("no clock read for a whole head"));
        assert_eq!(a.deadline(&LIMITS), (idle_deadline, Expired::Idle));
    }

    #[test]
    fn a_partial_head_pipelined_behind_a_request_is_timed_from_its_end() {
        let t0 = Instant::now();
        let a = Activity::opened_at(t0, Arc::default());
        a.request_started();
        a.on_head_scanned(true, || t0); // in flight: not timed yet
        assert_eq!(a.deadline(&LIMITS).1, Expired::Stalled);
        a.request_ended(secs(t0, 3));
        assert_eq!(a.deadline(&LIMITS), (secs(t0, 13), Expired::Header));
    }

    #[test]
    fn a_request_in_flight_is_only_cut_when_nothing_moves() {
        let t0 = Instant::now();
        let a = Activity::opened_at(t0, Arc::default());
        a.on_read(b"GET /big HTTP/1.1\r\n\r\n", || t0);
        a.request_started();
        assert_eq!(a.deadline(&LIMITS), (secs(t0, 60), Expired::Stalled));
        // Bytes moved since the last look: progress, the deadline moves on.
        a.on_write();
        assert_eq!(a.check(&LIMITS, secs(t0, 60)), None);
        assert_eq!(a.deadline(&LIMITS).0, secs(t0, 120));
        // Nothing moved since: stalled.
        assert_eq!(a.check(&LIMITS, secs(t0, 120)), Some(Expired::Stalled));
    }

    #[test]
    fn only_idle_keepalive_connections_are_reclaimable() {
        let t0 = Instant::now();
        let a = Activity::opened_at(t0, Arc::default());
        assert!(!a.is_idle_keepalive(), "first request not seen yet");
        a.on_read(b"GET / HTTP/1.1\r\n\r\n", || t0);
        a.request_started();
        assert!(!a.is_idle_keepalive(), "request in flight");
        a.request_ended(t0);
        assert!(a.is_idle_keepalive());
        a.on_head_scanned(true, || t0);
        assert!(!a.is_idle_keepalive(), "a head has begun");
    }

    /// [`Watched`] under paused time: a connection that sends nothing is cut at the head
    /// deadline from its connect, to the millisecond, and reported as such.
    #[tokio::test(start_paused = true)]
    async fn watched_cuts_a_silent_connection_at_the_head_deadline() {
        let t0 = Instant::now();
        let a = Activity::opened_at(t0, Arc::default());
        let out = Watched::new(std::future::pending::<()>(), a, LIMITS).await;
        assert_eq!(out, Err(Expired::Header));
        assert_eq!(Instant::now() - t0, LIMITS.header);
    }

    /// [`Watched`] under paused time: a head that begins during a keep-alive idle moves the
    /// deadline earlier, and the next poll re-arms the timer for it: cut `header` after the
    /// head began, not at the end of the idle timeout.
    #[tokio::test(start_paused = true)]
    async fn watched_rearms_for_a_head_that_begins_while_idle() {
        let t0 = Instant::now();
        let a = Activity::opened_at(t0, Arc::default());
        a.on_read(b"GET / HTTP/1.1\r\n\r\n", || t0);
        a.request_started();
        a.request_ended(t0);
        // The connection's I/O: the test wakes it when the head's first bytes "arrive".
        let bytes = Arc::new(tokio::sync::Notify::new());
        let arrived = bytes.clone();
        let conn = async move {
            arrived.notified().await;
            std::future::pending::<()>().await
        };
        let watched = tokio::spawn(Watched::new(conn, a.clone(), LIMITS));
        tokio::time::sleep(Duration::from_secs(30)).await;
        let head = Instant::now();
        a.on_head_scanned(true, || head);
        bytes.notify_one();
        assert_eq!(watched.await.unwrap(), Err(Expired::Header));
        assert_eq!(Instant::now() - head, LIMITS.header);
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
