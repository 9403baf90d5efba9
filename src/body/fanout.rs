//! [`Fanout`]: one body, read once from the upstream and delivered to every request waiting on
//! that fetch. The producer (the cache fill) pushes pieces as they arrive; each [`Reader`] (one
//! per waiting response) reads them at its own pace from its own position.
//!
//! Memory: a body that will be stored is held whole anyway (at most `CACHE_MAX_OBJECT_BYTES`),
//! so every piece is kept and the producer never waits. Otherwise the start of the body is
//! kept while fewer than the per-flight `limit` bytes are held and the shared [`Budget`] has
//! room, so a request that arrives late can still join from byte 0; after that, pieces are
//! released as soon as every reader has them. When `limit` bytes are held (or the budget is
//! spent) and some reader is waiting for more, the slowest readers are *cut off* (their body
//! ends with [`StreamError::CutOff`], which closes their connection mid-body) and counted.
//! If no reader is waiting, the producer waits for one: the fastest reader sets the pace, the
//! slowest may lag by at most the bound.
//!
//! When every reader is gone and the body will not be stored, [`Fanout::room`] says
//! [`Room::Unwanted`] and the producer stops.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;

use super::pieces::Pieces;

/// The bound shared by every fanout: bytes held for bodies that will not be stored
/// (`STREAM_BUFFER_TOTAL_BYTES`), and the readers cut off for falling behind.
#[derive(Debug)]
pub struct Budget {
    limit: usize,
    held: AtomicUsize,
    cutoffs: AtomicU64,
}

impl Budget {
    pub fn new(limit: usize) -> Arc<Budget> {
        Arc::new(Budget {
            limit,
            held: AtomicUsize::new(0),
            cutoffs: AtomicU64::new(0),
        })
    }

    /// Bytes held now by bodies that will not be stored.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Relaxed)
    }

    /// Readers cut off so far for falling too far behind.
    pub fn cutoffs(&self) -> u64 {
        self.cutoffs.load(Ordering::Relaxed)
    }

    fn full(&self) -> bool {
        self.held() >= self.limit
    }
}

/// Why a reader's body ended early.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamError {
    /// The reader fell further behind the others than the buffer bound allows.
    CutOff,
    /// The upstream response failed mid-body.
    Upstream(Arc<str>),
    /// The fetch was stopped before the body was complete.
    Stopped,
}

impl std::fmt::Display for StreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamError::CutOff => f.write_str("cut off: fell too far behind the upstream body"),
            StreamError::Upstream(why) => write!(f, "upstream body failed: {why}"),
            StreamError::Stopped => f.write_str("upstream body stopped"),
        }
    }
}

impl std::error::Error for StreamError {}

/// What [`Fanout::room`] tells the producer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Room {
    /// Read and push the next piece.
    Go,
    /// Nobody wants the rest (no reader, not kept for the store): stop.
    Unwanted,
}

/// How the body ended, if it has.
#[derive(Debug, Clone)]
enum End {
    Open,
    Complete,
    Failed(StreamError),
}

/// A reader's place.
#[derive(Debug)]
struct Slot {
    /// Number of the next piece it reads.
    next: usize,
    cut: bool,
    waker: Option<Waker>,
}

#[derive(Debug)]
struct State {
    pieces: VecDeque<Bytes>,
    /// Number of `pieces[0]`: the pieces before it were released.
    first: usize,
    /// Bytes in `pieces`.
    held: usize,
    /// Every piece is kept (the body will be stored); not counted in the [`Budget`].
    keep_all: bool,
    end: End,
    slots: Vec<Option<Slot>>,
    /// Readers not cut off.
    live: usize,
    producer: Option<Waker>,
}

impl State {
    fn head(&self) -> usize {
        self.first + self.pieces.len()
    }

    fn live_slots(&self) -> impl Iterator<Item = &Slot> {
        self.slots.iter().flatten().filter(|s| !s.cut)
    }

    fn wake_readers(&mut self) {
        for slot in self.slots.iter_mut().flatten() {
            if let Some(w) = slot.waker.take() {
                w.wake();
            }
        }
    }

    fn wake_producer(&mut self) {
        if let Some(w) = self.producer.take() {
            w.wake();
        }
    }
}

/// A body shared by one producer and many readers; see the module documentation.
#[derive(Debug)]
pub struct Fanout {
    state: Mutex<State>,
    /// Bytes this fanout may hold for a body that will not be stored (`STREAM_BUFFER_BYTES`).
    limit: usize,
    budget: Arc<Budget>,
}

impl Fanout {
    /// A fanout that keeps every piece until told otherwise ([`Fanout::keep_all`]).
    pub fn new(limit: usize, budget: Arc<Budget>) -> Arc<Fanout> {
        Arc::new(Fanout {
            state: Mutex::new(State {
                pieces: VecDeque::new(),
                first: 0,
                held: 0,
                keep_all: true,
                end: End::Open,
                slots: Vec::new(),
                live: 0,
                producer: None,
            }),
            limit,
            budget,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent state (no invariant spans an
        // await or a user callback): carry on with it.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A reader from byte 0, or `None` when that is no longer possible (the start was
    /// released, or the body failed or was stopped).
    pub fn subscribe(self: &Arc<Self>) -> Option<Reader> {
        let mut s = self.lock();
        if s.first != 0 || matches!(s.end, End::Failed(_)) {
            return None;
        }
        let slot = Slot {
            next: 0,
            cut: false,
            waker: None,
        };
        let index = match s.slots.iter().position(Option::is_none) {
            Some(i) => {
                s.slots[i] = Some(slot);
                i
            }
            None => {
                s.slots.push(Some(slot));
                s.slots.len() - 1
            }
        };
        s.live += 1;
        Some(Reader {
            fanout: self.clone(),
            slot: index,
            pos: 0,
            skip: 0,
            take: u64::MAX,
            finished: false,
        })
    }

    /// Whether every piece is kept (for the store). Turning it off makes the held bytes count
    /// against the budget and lets them be released.
    pub fn keep_all(&self, keep: bool) {
        let mut s = self.lock();
        if s.keep_all == keep {
            return;
        }
        s.keep_all = keep;
        if keep {
            self.budget.held.fetch_sub(s.held, Ordering::Relaxed);
        } else {
            self.budget.held.fetch_add(s.held, Ordering::Relaxed);
            s.wake_producer();
        }
    }

    /// Readers that still want the body.
    pub fn readers(&self) -> usize {
        self.lock().live
    }

    /// Appends a piece and wakes the readers waiting for it.
    pub fn push(&self, piece: Bytes) {
        if piece.is_empty() {
            return;
        }
        let mut s = self.lock();
        s.held += piece.len();
        if !s.keep_all {
            self.budget.held.fetch_add(piece.len(), Ordering::Relaxed);
        }
        s.pieces.push_back(piece);
        s.wake_readers();
    }

    /// The body is complete: readers end cleanly once they have every piece.
    pub fn finish(&self) {
        self.end(End::Complete);
    }

    /// The body failed (or was stopped): every reader's body ends with `why`.
    pub fn fail(&self, why: StreamError) {
        self.end(End::Failed(why));
    }

    fn end(&self, end: End) {
        let mut s = self.lock();
        if matches!(s.end, End::Open) {
            s.end = end;
        }
        s.wake_readers();
    }

    /// The whole body, when it is still held from byte 0 (the producer's copy for the store).
    pub fn pieces(&self) -> Option<Pieces> {
        let s = self.lock();
        (s.first == 0).then(|| Pieces::new(s.pieces.iter().cloned().collect()))
    }

    /// Waits until the producer may push the next piece; see the module documentation.
    pub async fn room(&self) -> Room {
        poll_fn(|cx| self.poll_room(cx)).await
    }

    fn poll_room(&self, cx: &mut Context<'_>) -> Poll<Room> {
        let mut s = self.lock();
        loop {
            if s.keep_all {
                return Poll::Ready(Room::Go);
            }
            if s.live == 0 {
                return Poll::Ready(Room::Unwanted);
            }
            let under = s.held < self.limit && !self.budget.full();
            if under && s.first == 0 {
                return Poll::Ready(Room::Go); // the start is kept for late joiners
            }
            // Release what every reader has.
            let min = s.live_slots().map(|r| r.next).min().unwrap_or(s.head());
            let mut released = 0;
            while s.first < min {
                let Some(p) = s.pieces.pop_front() else { break };
                s.first += 1;
                released += p.len();
            }
            if released > 0 {
                s.held -= released;
                self.budget.held.fetch_sub(released, Ordering::Relaxed);
            }
            if under {
                return Poll::Ready(Room::Go);
            }
            if released > 0 {
                continue;
            }
            if s.held == 0 {
                return Poll::Ready(Room::Go);
            }
            let head = s.head();
            if s.live_slots().any(|r| r.next >= head) {
                // Someone is waiting for more: the slowest go, the others are not held back.
                let mut cut = 0;
                for slot in s.slots.iter_mut().flatten() {
                    if !slot.cut && slot.next == min {
                        slot.cut = true;
                        cut += 1;
                        if let Some(w) = slot.waker.take() {
                            w.wake();
                        }
                    }
                }
                s.live -= cut;
                self.budget.cutoffs.fetch_add(cut as u64, Ordering::Relaxed);
                continue;
            }
            s.producer = Some(cx.waker().clone());
            return Poll::Pending;
        }
    }
}

impl Drop for Fanout {
    fn drop(&mut self) {
        let s = self.lock();
        if !s.keep_all {
            self.budget.held.fetch_sub(s.held, Ordering::Relaxed);
        }
    }
}

/// One response's view of a [`Fanout`]: its pieces in order, optionally only a byte range.
#[derive(Debug)]
pub struct Reader {
    fanout: Arc<Fanout>,
    slot: usize,
    /// Bytes of the body read so far.
    pos: u64,
    /// Bytes to drop before the first delivered byte, and at most how many to deliver.
    skip: u64,
    take: u64,
    finished: bool,
}

impl Reader {
    /// Delivers only bytes `start..start + len` of the body.
    pub fn range(mut self, start: u64, len: u64) -> Reader {
        self.skip = start;
        self.take = len;
        self
    }

    /// The next piece: `Ready(None)` at the end of the body (or of the range), an error if
    /// the body failed or this reader was cut off.
    pub fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, StreamError>>> {
        if self.finished {
            return Poll::Ready(None);
        }
        let fanout = self.fanout.clone();
        let mut s = fanout.lock();
        loop {
            if self.take == 0 {
                self.finish(&mut s);
                return Poll::Ready(None);
            }
            let Some(slot) = s.slots.get(self.slot).and_then(Option::as_ref) else {
                self.finished = true;
                return Poll::Ready(Some(Err(StreamError::CutOff)));
            };
            if slot.cut || slot.next < s.first {
                self.finish(&mut s);
                return Poll::Ready(Some(Err(StreamError::CutOff)));
            }
            let next = slot.next;
            let Some(piece) = s.pieces.get(next - s.first).cloned() else {
                match s.end.clone() {
                    End::Complete => {
                        self.finish(&mut s);
                        return Poll::Ready(None);
                    }
                    End::Failed(e) => {
                        self.finish(&mut s);
                        return Poll::Ready(Some(Err(e)));
                    }
                    End::Open => {
                        if let Some(slot) = s.slots[self.slot].as_mut() {
                            slot.waker = Some(cx.waker().clone());
                        }
                        return Poll::Pending;
                    }
                }
            };
            if let Some(slot) = s.slots[self.slot].as_mut() {
                slot.next += 1;
            }
            s.wake_producer();
            let len = piece.len() as u64;
            let from = self.pos;
            self.pos += len;
            if self.pos <= self.skip {
                continue; // wholly before the range
            }
            let lo = self.skip.saturating_sub(from);
            let hi = (lo + self.take).min(len);
            self.take -= hi - lo;
            return Poll::Ready(Some(Ok(piece.slice(lo as usize..hi as usize))));
        }
    }

    /// Leaves the fanout: this reader no longer holds pieces back.
    fn finish(&mut self, s: &mut State) {
        self.finished = true;
        if let Some(slot) = s.slots.get_mut(self.slot).and_then(Option::take) {
            if !slot.cut {
                s.live -= 1;
            }
            s.wake_producer();
        }
    }

    /// Whether the body (or range) has been read to its end.
    pub fn is_finished(&self) -> bool {
        self.finished
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        if !self.finished {
            let fanout = self.fanout.clone();
            let mut s = fanout.lock();
            self.finish(&mut s);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;

    fn poll(r: &mut Reader) -> Poll<Option<Result<Bytes, StreamError>>> {
        r.poll_next(&mut Context::from_waker(Waker::noop()))
    }

    fn room(f: &Fanout) -> Poll<Room> {
        f.poll_room(&mut Context::from_waker(Waker::noop()))
    }

    fn piece(n: usize) -> Bytes {
        Bytes::from(vec![b'x'; n])
    }

    fn got(p: Poll<Option<Result<Bytes, StreamError>>>) -> usize {
        match p {
            Poll::Ready(Some(Ok(b))) => b.len(),
            other => panic!("expected a piece, got {other:?}"),
        }
    }

    #[test]
    fn readers_get_every_piece_and_the_end() {
        let f = Fanout::new(100, Budget::new(1000));
        let mut a = f.subscribe().unwrap();
        f.push(piece(3));
        let mut b = f.subscribe().unwrap();
        f.push(piece(4));
        assert_eq!(got(poll(&mut a)), 3);
        assert_eq!(got(poll(&mut a)), 4);
        assert!(poll(&mut a).is_pending());
        f.finish();
        assert!(matches!(poll(&mut a), Poll::Ready(None)));
        assert_eq!(got(poll(&mut b)), 3, "a late reader starts at byte 0");
        assert_eq!(got(poll(&mut b)), 4);
        assert!(matches!(poll(&mut b), Poll::Ready(None)));
        assert_eq!(f.pieces().unwrap().len(), 7);
    }

    #[test]
    fn a_failure_reaches_every_reader_after_what_it_had() {
        let f = Fanout::new(100, Budget::new(1000));
        let mut a = f.subscribe().unwrap();
        f.push(piece(3));
        f.fail(StreamError::Upstream("reset".into()));
        assert_eq!(got(poll(&mut a)), 3);
        assert!(matches!(
            poll(&mut a),
            Poll::Ready(Some(Err(StreamError::Upstream(_))))
        ));
        assert!(matches!(poll(&mut a), Poll::Ready(None)));
        assert!(f.subscribe().is_none(), "a failed body cannot be joined");
    }

    #[test]
    fn a_stored_body_is_kept_whole_and_never_waits() {
        let budget = Budget::new(10);
        let f = Fanout::new(10, budget.clone());
        let _slow = f.subscribe().unwrap();
        for _ in 0..10 {
            assert_eq!(room(&f), Poll::Ready(Room::Go));
            f.push(piece(5));
        }
        assert_eq!(budget.held(), 0, "a body kept for the store is not counted");
        assert_eq!(f.pieces().unwrap().len(), 50);
    }

    #[test]
    fn no_reader_and_not_stored_is_unwanted() {
        let f = Fanout::new(10, Budget::new(100));
        let r = f.subscribe().unwrap();
        f.keep_all(false);
        assert_eq!(room(&f), Poll::Ready(Room::Go));
        drop(r);
        assert_eq!(room(&f), Poll::Ready(Room::Unwanted));
    }

    /// The fastest reader sets the pace; the slowest is cut off once the window is full and
    /// someone waits for more; the cut reader's body ends with an error.
    #[test]
    fn the_slowest_reader_is_cut_off_at_the_bound() {
        let budget = Budget::new(1000);
        let f = Fanout::new(10, budget.clone());
        f.keep_all(false);
        let mut fast = f.subscribe().unwrap();
        let mut slow = f.subscribe().unwrap();
        f.push(piece(4));
        f.push(piece(4));
        assert_eq!(got(poll(&mut slow)), 4);
        assert_eq!(room(&f), Poll::Ready(Room::Go), "8 held < 10");
        f.push(piece(4));
        // 12 held, nobody waiting at the head: the producer waits.
        assert!(room(&f).is_pending());
        assert_eq!(budget.held(), 12);
        for _ in 0..3 {
            got(poll(&mut fast));
        }
        // fast waits at the head; releasing what both have (4) is enough: 8 < 10.
        assert_eq!(room(&f), Poll::Ready(Room::Go));
        assert_eq!(budget.held(), 8);
        f.push(piece(4));
        got(poll(&mut fast));
        // 12 held, slow holds them back, fast waits: slow is cut.
        assert_eq!(room(&f), Poll::Ready(Room::Go));
        assert_eq!(budget.cutoffs(), 1);
        assert!(matches!(
            poll(&mut slow),
            Poll::Ready(Some(Err(StreamError::CutOff)))
        ));
        assert_eq!(f.readers(), 1);
        assert_eq!(budget.held(), 0, "everything fast has read was released");
        assert!(f.subscribe().is_none(), "the start is gone: no late joiner");
        drop(f);
        drop(fast);
        drop(slow);
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn the_shared_budget_applies_across_fanouts() {
        let budget = Budget::new(10);
        let a = Fanout::new(100, budget.clone());
        a.keep_all(false);
        let ra = a.subscribe().unwrap();
        a.push(piece(10));
        let b = Fanout::new(100, budget.clone());
        b.keep_all(false);
        let mut rb = b.subscribe().unwrap();
        assert_eq!(
            room(&b),
            Poll::Ready(Room::Go),
            "an empty fanout may always start"
        );
        b.push(piece(2));
        assert!(room(&b).is_pending(), "the budget is full and nobody waits");
        got(poll(&mut rb));
        assert_eq!(
            room(&b),
            Poll::Ready(Room::Go),
            "released what its reader had"
        );
        drop((a, ra));
        assert_eq!(
            budget.held(),
            0,
            "a dropped, b released what its reader had"
        );
    }

    #[test]
    fn turning_keep_all_off_counts_what_is_held() {
        let budget = Budget::new(100);
        let f = Fanout::new(100, budget.clone());
        let _r = f.subscribe().unwrap();
        f.push(piece(7));
        assert_eq!(budget.held(), 0);
        f.keep_all(false);
        assert_eq!(budget.held(), 7);
        drop(f);
        assert_eq!(budget.held(), 7, "the reader still holds the fanout");
    }

    #[test]
    fn a_range_reader_gets_exactly_its_bytes() {
        let f = Fanout::new(100, Budget::new(1000));
        let r = f.subscribe().unwrap();
        let mut r = r.range(5, 6);
        for _ in 0..4 {
            f.push(piece(4));
        }
        let mut total = 0;
        while let Poll::Ready(Some(Ok(b))) = poll(&mut r) {
            total += b.len();
        }
        assert_eq!(total, 6);
        assert!(r.is_finished());
        assert_eq!(
            f.readers(),
            0,
            "a finished range reader no longer holds pieces back"
        );
    }
}
