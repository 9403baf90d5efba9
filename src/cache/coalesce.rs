//! Per-key single flight. The first request for a key becomes the leader and gets a
//! [`FlightGuard`]; everyone else gets a [`Waiter`] and is woken the moment the leader
//! publishes (a `watch` channel: no polling, no timer steps).
//!
//! A flight carries a [`Fanout`] for its body: every waiter, the leader's own request
//! included, is registered as a reader when it joins — before any byte arrives — so a body
//! published as it streams reaches each of them from byte 0. A flight stays joinable until
//! it publishes a final outcome ([`Outcome::is_final`]) or ends, and for as long as its
//! body's start is still held; a request that comes later starts a new flight in its place.
//! The guard removes its flight when it publishes a final outcome or is dropped, so an
//! abandoned flight never wedges its key.

use std::sync::Arc;

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use tokio::sync::watch;

use crate::body::fanout::{Budget, Fanout, StreamError};
use crate::body::Reader;

/// What a flight publishes: a final outcome ends the flight; others (a body still streaming)
/// may be followed by a final one.
pub trait Outcome: Clone {
    fn is_final(&self) -> bool;
}

struct Flight<T> {
    sender: watch::Sender<Option<T>>,
    body: Arc<Fanout>,
}

type Map<T> = Arc<DashMap<String, Arc<Flight<T>>>>;

/// In-progress flights by key, and the memory bounds of their bodies.
pub struct Flights<T> {
    map: Map<T>,
    /// Per-flight bound on bytes held for a body that will not be stored.
    limit: usize,
    budget: Arc<Budget>,
}

/// What [`Flights::join`] made of the caller.
pub enum Role<T> {
    /// No flight was running: the caller must fetch and publish through the guard.
    Leader(FlightGuard<T>),
    /// A flight is running: wait on the receiver.
    Follower(Waiter<T>),
}

/// A waiter's handle on a flight: the published outcome, and its own reader of the body.
pub struct Waiter<T> {
    rx: watch::Receiver<Option<T>>,
    body: Option<Reader>,
}

impl<T: Outcome> Waiter<T> {
    /// The first outcome published, or `None` if the leader was dropped without publishing.
    pub async fn wait(&mut self) -> Option<T> {
        self.rx
            .wait_for(Option::is_some)
            .await
            .ok()
            .and_then(|v| v.clone())
    }

    /// The final outcome: the last one published once it is final or the flight has ended.
    pub async fn wait_final(mut self) -> Option<T> {
        self.body = None; // it would hold the body back for nothing
        let _ = self
            .rx
            .wait_for(|v| v.as_ref().is_some_and(Outcome::is_final))
            .await;
        self.rx.borrow().clone()
    }

    /// This waiter's reader of the flight's body (from byte 0), once.
    pub fn take_body(&mut self) -> Option<Reader> {
        self.body.take()
    }
}

/// The leader's obligation to publish.
pub struct FlightGuard<T> {
    /// `None` for a detached flight (not in the map: nobody can join it).
    key: Option<String>,
    flight: Arc<Flight<T>>,
    map: Map<T>,
}

impl<T> Flights<T> {
    /// No flights yet; each body holds at most `limit` bytes it will not store, all of them
    /// together at most `total` (`STREAM_BUFFER_BYTES`, `STREAM_BUFFER_TOTAL_BYTES`).
    pub fn new(limit: usize, total: usize) -> Self {
        Flights {
            map: Arc::default(),
            limit,
            budget: Budget::new(total),
        }
    }

    fn flight(&self) -> Arc<Flight<T>> {
        Arc::new(Flight {
            sender: watch::Sender::new(None),
            body: Fanout::new(self.limit, self.budget.clone()),
        })
    }

    /// Joins the flight for `key`, starting one if none runs (or the running one can no
    /// longer be joined from its start).
    pub fn join(&self, key: String) -> Role<T> {
        match self.map.entry(key) {
            Entry::Occupied(mut e) => {
                if let Some(body) = e.get().body.subscribe() {
                    return Role::Follower(Waiter {
                        rx: e.get().sender.subscribe(),
                        body: Some(body),
                    });
                }
                let flight = self.flight();
                e.insert(flight.clone());
                Role::Leader(self.guard(Some(e.key().clone()), flight))
            }
            Entry::Vacant(e) => {
                let key = e.key().clone();
                let flight = self.flight();
                e.insert(flight.clone());
                Role::Leader(self.guard(Some(key), flight))
            }
        }
    }

    /// A flight of one, that nobody else can join (a request with credentials).
    pub fn detached(&self) -> FlightGuard<T> {
        self.guard(None, self.flight())
    }

    fn guard(&self, key: Option<String>, flight: Arc<Flight<T>>) -> FlightGuard<T> {
        FlightGuard {
            key,
            flight,
            map: self.map.clone(),
        }
    }

    /// Takes the flights whose keys `hit` selects out of the map: they run on for the
    /// requests already waiting, and later requests start new flights (after a purge, nobody
    /// new may join a fetch that started before it).
    pub fn detach_matching(&self, hit: impl Fn(&str) -> bool) {
        self.map.retain(|key, _| !hit(key));
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

    /// The shared bound's state: bytes held for bodies not stored, readers cut off.
    pub fn budget(&self) -> &Budget {
        &self.budget
    }
}

impl<T: Outcome> FlightGuard<T> {
    /// A waiter for the leader's own request, registered as a reader of the body.
    pub fn waiter(&self) -> Waiter<T> {
        Waiter {
            rx: self.flight.sender.subscribe(),
            body: self.flight.body.subscribe(),
        }
    }

    /// A waiter for the outcome only (a background refresh's caller).
    pub fn watcher(&self) -> Waiter<T> {
        Waiter {
            rx: self.flight.sender.subscribe(),
            body: None,
        }
    }

    /// The flight's body.
    pub fn body(&self) -> &Arc<Fanout> {
        &self.flight.body
    }

    /// Publishes `outcome` to every waiter; a final one ends the flight (later requests start
    /// a new one).
    pub fn publish(&self, outcome: T) {
        let last = outcome.is_final();
        self.flight.sender.send_replace(Some(outcome));
        if last {
            self.remove();
        }
    }
}

impl<T> FlightGuard<T> {
    fn remove(&self) {
        if let Some(key) = &self.key {
            let flight = &self.flight;
            self.map.remove_if(key, |_, v| Arc::ptr_eq(v, flight));
        }
    }
}

impl<T> Drop for FlightGuard<T> {
    /// Ends the flight; a body left unfinished (the fill panicked or was cancelled at
    /// shutdown) ends with an error for its readers instead of leaving them waiting.
    fn drop(&mut self) {
        self.remove();
        self.flight.body.fail(StreamError::Stopped);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[derive(Clone, Debug, PartialEq)]
    enum Out {
        Done(u32),
        Streaming,
    }

    impl Outcome for Out {
        fn is_final(&self) -> bool {
            matches!(self, Out::Done(_))
        }
    }

    fn flights() -> Flights<Out> {
        Flights::new(1 << 20, 1 << 30)
    }

    #[tokio::test]
    async fn followers_get_the_leaders_outcome() {
        let flights = flights();
        let Role::Leader(guard) = flights.join("k".into()) else {
            panic!("first is leader")
        };
        let followers: Vec<_> = (0..10)
            .map(|_| match flights.join("k".into()) {
                Role::Follower(mut w) => tokio::spawn(async move { w.wait().await }),
                Role::Leader(_) => panic!("second must follow"),
            })
            .collect();
        guard.publish(Out::Done(7));
        for f in followers {
            assert_eq!(f.await.unwrap(), Some(Out::Done(7)));
        }
        assert!(!flights.in_flight("k"));
    }

    #[tokio::test]
    async fn dropped_leader_releases_followers_and_the_key() {
        let flights = flights();
        let Role::Leader(guard) = flights.join("k".into()) else {
            panic!()
        };
        let Role::Follower(mut w) = flights.join("k".into()) else {
            panic!()
        };
        drop(guard);
        assert_eq!(w.wait().await, None);
        assert!(matches!(flights.join("k".into()), Role::Leader(_)));
    }

    #[tokio::test]
    async fn late_joiner_after_a_final_outcome_starts_a_new_flight() {
        let flights = flights();
        let Role::Leader(guard) = flights.join("k".into()) else {
            panic!()
        };
        let Role::Follower(mut w) = flights.join("k".into()) else {
            panic!()
        };
        guard.publish(Out::Done(1));
        assert_eq!(w.wait().await, Some(Out::Done(1)));
        assert!(matches!(flights.join("k".into()), Role::Leader(_)));
    }

    /// A streaming flight stays joinable, and a late joiner reads the body from byte 0.
    #[tokio::test]
    async fn a_streaming_flight_is_joined_from_the_start() {
        let flights = flights();
        let Role::Leader(guard) = flights.join("k".into()) else {
            panic!()
        };
        let mut own = guard.waiter();
        guard.publish(Out::Streaming);
        guard.body().push(Bytes::from_static(b"abc"));
        let Role::Follower(mut late) = flights.join("k".into()) else {
            panic!("a streaming flight can be joined")
        };
        assert_eq!(late.wait().await, Some(Out::Streaming));
        guard.body().finish();
        for w in [&mut own, &mut late] {
            let mut body = crate::body::ProxyBody::Fanout(w.take_body().unwrap());
            let got = http_body_util::BodyExt::collect(&mut body).await.unwrap();
            assert_eq!(got.to_bytes(), "abc");
        }
        let watcher = guard.watcher();
        guard.publish(Out::Done(2));
        assert_eq!(watcher.wait_final().await, Some(Out::Done(2)));
        assert!(!flights.in_flight("k"));
    }

    /// A leader that goes away mid-body (panic, cancellation) fails its readers' bodies.
    #[tokio::test]
    async fn an_abandoned_body_fails_its_readers() {
        let flights = flights();
        let Role::Leader(guard) = flights.join("k".into()) else {
            panic!()
        };
        let mut w = guard.waiter();
        guard.publish(Out::Streaming);
        guard.body().push(Bytes::from_static(b"abc"));
        drop(guard);
        let mut body = crate::body::ProxyBody::Fanout(w.take_body().unwrap());
        assert!(http_body_util::BodyExt::collect(&mut body).await.is_err());
    }

    /// Once the start of a body that is not stored was released, a newcomer leads a new
    /// flight in its place; the old one ending does not remove the new one.
    #[tokio::test]
    async fn a_flight_whose_start_is_gone_is_replaced() {
        let flights = Flights::<Out>::new(4, 1 << 30);
        let Role::Leader(old) = flights.join("k".into()) else {
            panic!()
        };
        let mut w = old.waiter();
        old.body().keep_all(false);
        old.body().push(Bytes::from_static(b"12345"));
        let mut body = w.take_body().unwrap();
        let _ = std::future::poll_fn(|cx| body.poll_next(cx)).await;
        assert_eq!(old.body().room().await, crate::body::fanout::Room::Go);
        let Role::Leader(new) = flights.join("k".into()) else {
            panic!("the start is gone: lead a new flight")
        };
        drop(old);
        assert!(flights.in_flight("k"), "still the new flight");
        drop(new);
        assert!(!flights.in_flight("k"));
    }
}
