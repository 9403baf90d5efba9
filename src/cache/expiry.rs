//! The expiry timer of every stored entry, kept in one binary heap served by one task — not a
//! task or timer per entry, so a million entries cost a million 24-byte heap slots and one
//! sleeping task.
//!
//! A slot holds its due time as signed nanoseconds from the cache clock's epoch (`tick`,
//! the same readings stored entries keep) rather than an `Instant` (16 bytes), next to the
//! version id and the thin [`Key`]. The conversion is exact both ways (an `Instant` is
//! nanoseconds too), so a deadline is handed out exactly when it is due and never before,
//! even for sub-second lifetimes. Offsets are signed because a tokio runtime under paused
//! time (tests) keeps the clock it was started with, possibly before that epoch: its
//! deadlines must keep their order and distance rather than collapse onto the epoch.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::time::Instant;

use tokio::sync::Notify;

use super::key::Key;

/// `at` as signed nanoseconds from the cache clock's epoch ([`super::entry::signed_nanos`]).
fn tick(at: Instant) -> i64 {
    super::entry::signed_nanos(at)
}

/// The instant of a [`tick`] reading (`None` only if the clock cannot represent it).
fn instant(tick: i64) -> Option<Instant> {
    super::entry::at_signed_nanos(tick)
}

/// A due time for version `id` of `key`: 24 bytes.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Deadline {
    /// When, as a [`tick`] reading.
    at: i64,
    id: u64,
    key: Key,
}

const _: () = assert!(std::mem::size_of::<Deadline>() == 24);

/// Deadlines, earliest first. Stale deadlines (of replaced or removed versions) are simply
/// popped and ignored by the consumer, which checks the version id.
#[derive(Default)]
pub struct ExpiryQueue {
    heap: Mutex<BinaryHeap<Reverse<Deadline>>>,
    wake: Notify,
}

/// How many due deadlines one wake-up hands out at most.
const BATCH: usize = 1024;

const HOUR: Duration = Duration::from_secs(3600);

impl ExpiryQueue {
    /// Schedules `key` version `id` for `at`.
    pub fn schedule(&self, at: Instant, key: Key, id: u64) {
        let at = tick(at);
        let earliest = {
            let mut heap = self.heap.lock().unwrap_or_else(|p| p.into_inner());
            let earliest = heap.peek().is_none_or(|Reverse(top)| at < top.at);
            heap.push(Reverse(Deadline { at, id, key }));
            earliest
        };
        if earliest {
            // A stored permit if the consumer is busy: no wake-up is lost.
            self.wake.notify_one();
        }
    }

    /// Waits until at least one deadline is due and returns the due ones.
    pub async fn next_due(&self) -> Vec<(Key, u64)> {
        loop {
            let next = {
                let mut heap = self.heap.lock().unwrap_or_else(|p| p.into_inner());
                let now = tick(Instant::now());
                let mut due = Vec::new();
                while due.len() < BATCH {
                    match heap.peek() {
                        Some(Reverse(top)) if top.at <= now => {
                            if let Some(Reverse(d)) = heap.pop() {
                                due.push((d.key, d.id));
                            }
                        }
                        _ => break,
                    }
                }
                if !due.is_empty() {
                    return due;
                }
                heap.peek().map(|Reverse(top)| top.at)
            };
            match next {
                Some(at) => {
                    // Waking late is harmless and waking early only loops: what is due is
                    // decided above, on the exact readings. (An instant the clock cannot
                    // hold is centuries away: look again in an hour.)
                    let at = instant(at).unwrap_or_else(|| Instant::now() + HOUR);
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {}
                        _ = self.wake.notified() => {}
                    }
                }
                None => self.wake.notified().await,
            }
        }
    }

    /// Number of pending deadlines (including stale ones).
    pub fn len(&self) -> usize {
        self.heap.lock().map(|h| h.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The epoch of [`tick`] readings: the cache clock's.
    fn epoch() -> std::time::Instant {
        crate::cache::entry::epoch().into_std()
    }
    use std::sync::Arc;

    #[tokio::test(start_paused = true)]
    async fn wakes_for_an_earlier_deadline() {
        let q = Arc::new(ExpiryQueue::default());
        let now = Instant::now();
        q.schedule(now + Duration::from_secs(3600), "late".into(), 1);
        let waiter = {
            let q = q.clone();
            tokio::spawn(async move { q.next_due().await })
        };
        q.schedule(now, "now".into(), 2);
        let due = tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(due, vec![(Key::from("now"), 2)]);
        assert_eq!(q.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn hands_out_in_deadline_order() {
        let q = ExpiryQueue::default();
        let past = Instant::now() - Duration::from_millis(10);
        q.schedule(past + Duration::from_millis(2), "b".into(), 2);
        q.schedule(past, "a".into(), 1);
        let due = q.next_due().await;
        assert_eq!(due.iter().map(|d| d.1).collect::<Vec<_>>(), vec![1, 2]);
    }

    /// Under paused time: a future deadline is handed out exactly when it is due, not
    /// before, without the test waiting in real time.
    #[tokio::test(start_paused = true)]
    async fn future_deadline_fires_at_its_time() {
        let q = ExpiryQueue::default();
        let start = Instant::now();
        q.schedule(start + Duration::from_secs(100), "a".into(), 1);
        let early = tokio::time::timeout(Duration::from_secs(99), q.next_due()).await;
        assert!(early.is_err(), "not due after 99 s");
        let due = q.next_due().await;
        assert_eq!(due, vec![(Key::from("a"), 1)]);
        assert_eq!(Instant::now() - start, Duration::from_secs(100));
    }

    /// A deadline half a second out (lifetimes can be that short) and a nanosecond past it
    /// are not handed out a nanosecond early.
    #[tokio::test(start_paused = true)]
    async fn sub_second_deadlines_never_fire_early() {
        let q = ExpiryQueue::default();
        let start = Instant::now();
        let at = start + Duration::from_nanos(500_000_001);
        q.schedule(at, "a".into(), 1);
        let early = tokio::time::timeout(Duration::from_millis(500), q.next_due()).await;
        assert!(early.is_err(), "not due at 500 ms");
        assert_eq!(q.next_due().await, vec![(Key::from("a"), 1)]);
        assert!(Instant::now() >= at);
    }

    /// The readings are exact both ways, and keep their order and distance on both sides of
    /// the epoch (another runtime's paused clock may be behind the one that set it).
    #[test]
    fn ticks_are_exact_and_ordered_across_the_epoch() {
        let epoch = Instant::from_std(epoch());
        assert_eq!(tick(epoch), 0);
        let ms = Duration::from_millis(1);
        let before = epoch.checked_sub(ms).expect("the clock has run for 1 ms");
        let way_before = epoch
            .checked_sub(2 * ms)
            .expect("the clock has run for 2 ms");
        let after = epoch + Duration::from_nanos(500_000_001);
        assert_eq!(tick(before), -1_000_000);
        assert_eq!(tick(way_before), -2_000_000);
        assert_eq!(tick(after), 500_000_001);
        for at in [way_before, before, epoch, after] {
            assert_eq!(instant(tick(at)), Some(at));
        }
        assert_eq!(
            std::mem::size_of::<Deadline>(),
            24,
            "was 40 with an Instant and an Arc<str>"
        );
    }

    /// Deadlines before and after the epoch come out in order, the earlier ones at once.
    #[tokio::test(start_paused = true)]
    async fn deadlines_before_the_epoch_keep_their_order() {
        let q = ExpiryQueue::default();
        let epoch = Instant::from_std(epoch());
        let ms = Duration::from_millis(1);
        let before = epoch.checked_sub(ms).expect("the clock has run for 1 ms");
        let way_before = epoch
            .checked_sub(2 * ms)
            .expect("the clock has run for 2 ms");
        q.schedule(before, "b".into(), 2);
        q.schedule(Instant::now() + Duration::from_secs(3600), "late".into(), 3);
        q.schedule(way_before, "a".into(), 1);
        let due = q.next_due().await;
        assert_eq!(due, vec![(Key::from("a"), 1), (Key::from("b"), 2)]);
        assert_eq!(q.len(), 1);
    }
}
