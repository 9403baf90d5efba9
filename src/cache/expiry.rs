//! The expiry timer of every stored entry, kept in one binary heap served by one task — not a
//! task or timer per entry, so a million entries cost a million heap slots (~40 bytes each)
//! and one sleeping task.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::{Arc, Mutex};
use tokio::time::Instant;

use tokio::sync::Notify;

/// A due time for version `id` of `key`.
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Deadline {
    at: Instant,
    id: u64,
    key: Arc<str>,
}

/// Deadlines, earliest first. Stale deadlines (of replaced or removed versions) are simply
/// popped and ignored by the consumer, which checks the version id.
#[derive(Default)]
pub struct ExpiryQueue {
    heap: Mutex<BinaryHeap<Reverse<Deadline>>>,
    wake: Notify,
}

/// How many due deadlines one wake-up hands out at most.
const BATCH: usize = 1024;

impl ExpiryQueue {
    /// Schedules `key` version `id` for `at`.
    pub fn schedule(&self, at: Instant, key: Arc<str>, id: u64) {
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
    pub async fn next_due(&self) -> Vec<(Arc<str>, u64)> {
        loop {
            let next = {
                let mut heap = self.heap.lock().unwrap_or_else(|p| p.into_inner());
                let now = Instant::now();
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
    use std::time::Duration;

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
        assert_eq!(due, vec![(Arc::from("now"), 2)]);
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
        assert_eq!(due, vec![(Arc::from("a"), 1)]);
        assert_eq!(Instant::now() - start, Duration::from_secs(100));
    }
}
