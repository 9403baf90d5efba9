//! Per-key single flight. The first request for a key becomes the leader and gets a
//! [`FlightGuard`]; everyone else gets a receiver and is woken the moment the leader publishes
//! (a `watch` channel: no polling, no timer steps). The guard removes the flight when it
//! publishes or is dropped, so an abandoned flight never wedges its key.

use std::sync::Arc;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use tokio::sync::watch;

/// In-progress flights by key.
pub struct Flights<T> {
    map: Arc<DashMap<String, Arc<watch::Sender<Option<T>>>>>,
}

impl<T> Default for Flights<T> {
    fn default() -> Self {
        Flights {
            map: Arc::default(),
        }
    }
}

/// What [`Flights::join`] made of the caller.
pub enum Role<T> {
    /// No flight was running: the caller must fetch and publish through the guard.
    Leader(FlightGuard<T>),
    /// A flight is running: wait on the receiver.
    Follower(Waiter<T>),
}

/// A follower's handle on a flight.
pub struct Waiter<T>(watch::Receiver<Option<T>>);

impl<T: Clone> Waiter<T> {
    /// The published outcome, or `None` if the leader was dropped without publishing.
    pub async fn wait(mut self) -> Option<T> {
        self.0
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|v| v.clone())
    }
}

/// The leader's obligation to publish.
pub struct FlightGuard<T> {
    key: String,
    sender: Arc<watch::Sender<Option<T>>>,
    map: Arc<DashMap<String, Arc<watch::Sender<Option<T>>>>>,
}

impl<T> Flights<T> {
    /// Joins the flight for `key`, starting one if none runs.
    pub fn join(&self, key: String) -> Role<T> {
        match self.map.entry(key) {
            Entry::Occupied(e) => Role::Follower(Waiter(e.get().subscribe())),
            Entry::Vacant(e) => {
                let key = e.key().clone();
                let sender = Arc::new(watch::Sender::new(None));
                e.insert(sender.clone());
                Role::Leader(FlightGuard {
                    key,
                    sender,
                    map: self.map.clone(),
                })
            }
        }
    }

    /// Whether a flight for `key` is running.
    pub fn in_flight(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    /// Number of running flights.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

impl<T> FlightGuard<T> {
    /// A receiver for the leader's own request.
    pub fn waiter(&self) -> Waiter<T> {
        Waiter(self.sender.subscribe())
    }

    /// Publishes the outcome to every waiter and ends the flight.
    pub fn publish(self, outcome: T) {
        self.sender.send_replace(Some(outcome));
        // Drop runs next and removes the flight.
    }
}

impl<T> Drop for FlightGuard<T> {
    fn drop(&mut self) {
        let sender = &self.sender;
        self.map.remove_if(&self.key, |_, v| Arc::ptr_eq(v, sender));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn followers_get_the_leaders_outcome() {
        let flights = Flights::<u32>::default();
        let Role::Leader(guard) = flights.join("k".into()) else {
            panic!("first is leader")
        };
        let followers: Vec<_> = (0..10)
            .map(|_| match flights.join("k".into()) {
                Role::Follower(w) => tokio::spawn(w.wait()),
                Role::Leader(_) => panic!("second must follow"),
            })
            .collect();
        guard.publish(7);
        for f in followers {
            assert_eq!(f.await.unwrap(), Some(7));
        }
        assert!(!flights.in_flight("k"));
    }

    #[tokio::test]
    async fn dropped_leader_releases_followers_and_the_key() {
        let flights = Flights::<u32>::default();
        let Role::Leader(guard) = flights.join("k".into()) else {
            panic!()
        };
        let Role::Follower(w) = flights.join("k".into()) else {
            panic!()
        };
        drop(guard);
        assert_eq!(w.wait().await, None);
        assert!(matches!(flights.join("k".into()), Role::Leader(_)));
    }

    #[tokio::test]
    async fn late_joiner_after_publish_starts_a_new_flight() {
        let flights = Flights::<u32>::default();
        let Role::Leader(guard) = flights.join("k".into()) else {
            panic!()
        };
        let Role::Follower(w) = flights.join("k".into()) else {
            panic!()
        };
        guard.publish(1);
        assert_eq!(w.wait().await, Some(1));
        assert!(matches!(flights.join("k".into()), Role::Leader(_)));
    }
}
