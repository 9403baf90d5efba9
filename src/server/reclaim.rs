//! Idle connections closed at `MAX_CONNECTIONS`: the accept loop asks the [`Registry`] to
//! close idle keep-alive connections (as nginx does with its "reusable" connections), so
//! clients parked on idle connections cannot keep new ones waiting for a whole keep-alive
//! timeout. Until a slot is free the registry stays short of room, and a connection that goes
//! idle meanwhile closes itself at once rather than holding its slot for the keep-alive
//! timeout ([`super::deadline::Activity`] carries the request to close; [`super::deadline::Watched`]
//! acts on it).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::time::Instant;

use super::deadline::Activity;

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::inflight::RequestGuard;

    /// While the accept loop waits for a slot, a connection asks to close the moment it goes
    /// idle, not only those idle when the wait began; once a slot is found, no longer.
    #[test]
    fn connections_going_idle_while_room_is_wanted_are_asked_to_close() {
        let registry = Arc::new(Registry::default());
        let (busy, _r1) = registry.register();
        let (fresh, _r2) = registry.register();
        let guard = RequestGuard::start(&busy);
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
        drop(RequestGuard::start(&busy));
        assert!(
            !busy.reclaim.load(Ordering::Relaxed),
            "room found: keeps its slot"
        );
        // Idle when the wait begins: asked at once.
        assert_eq!(registry.want_room(32), 1);
        assert!(busy.reclaim.load(Ordering::Relaxed));
    }
}
