//! A backend's health, as a pure state machine with time passed in: the active check's
//! verdict (probes against `HEALTH_CHECK_PATH`, with failure and recovery thresholds) and the
//! passive circuit breaker fed by live traffic (closed → open for a cool-down → half-open:
//! one trial request decides).

use std::time::{Duration, Instant};

/// Thresholds (from `PoolConfig`).
#[derive(Debug, Clone, Copy)]
pub struct Thresholds {
    pub probe_failures: u32,
    pub probe_recoveries: u32,
    pub breaker_failures: u32,
    pub breaker_cooldown: Duration,
}

/// The circuit breaker fed by live traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Breaker {
    /// Traffic flows; counts consecutive failures.
    Closed { failures: u32 },
    /// No traffic until the cool-down ends.
    Open { until: Instant },
    /// One trial request is allowed; `trial` says whether it is out.
    HalfOpen { trial: bool },
}

/// Whether a backend may take a request now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Yes,
    /// Yes, as the half-open breaker's single trial.
    Trial,
    No,
}

/// A state change worth one log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    MarkedDown,
    MarkedUp,
    BreakerOpened,
    BreakerHalfOpen,
    BreakerClosed,
}

impl Transition {
    pub fn as_str(self) -> &'static str {
        match self {
            Transition::MarkedDown => "marked down by health checks",
            Transition::MarkedUp => "marked up by health checks",
            Transition::BreakerOpened => "circuit breaker opened",
            Transition::BreakerHalfOpen => "circuit breaker half-open: sending one trial request",
            Transition::BreakerClosed => "circuit breaker closed",
        }
    }
}

/// Health of one backend.
#[derive(Debug, Clone)]
pub struct Health {
    /// Verdict of the active checks (backends start up: traffic is allowed before the
    /// first probe).
    pub up: bool,
    probe_failures: u32,
    probe_successes: u32,
    pub breaker: Breaker,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            up: true,
            probe_failures: 0,
            probe_successes: 0,
            breaker: Breaker::Closed { failures: 0 },
        }
    }
}

impl Health {
    /// May this backend take a request at `now`? Takes the half-open trial slot when it is
    /// free (the caller must then report the outcome with [`Health::on_result`]).
    pub fn admit(&mut self, now: Instant) -> (Admission, Option<Transition>) {
        if !self.up {
            return (Admission::No, None);
        }
        match self.breaker {
            Breaker::Closed { .. } => (Admission::Yes, None),
            Breaker::Open { until } if now < until => (Admission::No, None),
            Breaker::Open { .. } => {
                self.breaker = Breaker::HalfOpen { trial: true };
                (Admission::Trial, Some(Transition::BreakerHalfOpen))
            }
            Breaker::HalfOpen { trial: true } => (Admission::No, None),
            Breaker::HalfOpen { trial: false } => {
                self.breaker = Breaker::HalfOpen { trial: true };
                (Admission::Trial, None)
            }
        }
    }

    /// Whether [`Health::admit`] would say yes, without taking anything.
    pub fn available(&self, now: Instant) -> bool {
        self.up
            && match self.breaker {
                Breaker::Closed { .. } | Breaker::HalfOpen { trial: false } => true,
                Breaker::Open { until } => now >= until,
                Breaker::HalfOpen { trial: true } => false,
            }
    }

    /// Records the outcome of a live request (failure: connect error, timeout or 5xx).
    pub fn on_result(&mut self, ok: bool, now: Instant, t: &Thresholds) -> Option<Transition> {
        match (self.breaker, ok) {
            (Breaker::Closed { .. }, true) => {
                self.breaker = Breaker::Closed { failures: 0 };
                None
            }
            (Breaker::Closed { failures }, false) => {
                let failures = failures + 1;
                if failures >= t.breaker_failures {
                    self.breaker = Breaker::Open {
                        until: now + t.breaker_cooldown,
                    };
                    Some(Transition::BreakerOpened)
                } else {
                    self.breaker = Breaker::Closed { failures };
                    None
                }
            }
            (Breaker::HalfOpen { .. }, true) => {
                self.breaker = Breaker::Closed { failures: 0 };
                Some(Transition::BreakerClosed)
            }
            (Breaker::HalfOpen { .. }, false) => {
                self.breaker = Breaker::Open {
                    until: now + t.breaker_cooldown,
                };
                Some(Transition::BreakerOpened)
            }
            // A request admitted before the breaker opened: its outcome changes nothing.
            (Breaker::Open { .. }, _) => None,
        }
    }

    /// Records an active probe's outcome.
    pub fn on_probe(&mut self, ok: bool, t: &Thresholds) -> Option<Transition> {
        if ok {
            self.probe_failures = 0;
            self.probe_successes += 1;
            if !self.up && self.probe_successes >= t.probe_recoveries {
                self.up = true;
                // A recovered backend starts with a clean breaker.
                self.breaker = Breaker::Closed { failures: 0 };
                return Some(Transition::MarkedUp);
            }
        } else {
            self.probe_successes = 0;
            self.probe_failures += 1;
            if self.up && self.probe_failures >= t.probe_failures {
                self.up = false;
                return Some(Transition::MarkedDown);
            }
        }
        None
    }

    /// When this backend may be tried again, if it is out now (for `Retry-After`).
    pub fn retry_at(&self) -> Option<Instant> {
        match self.breaker {
            Breaker::Open { until } if self.up => Some(until),
            _ => None,
        }
    }

    /// Short label for the status route.
    pub fn state(&self) -> &'static str {
        match (self.up, self.breaker) {
            (false, _) => "down",
            (true, Breaker::Closed { .. }) => "up",
            (true, Breaker::Open { .. }) => "breaker_open",
            (true, Breaker::HalfOpen { .. }) => "breaker_half_open",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Thresholds = Thresholds {
        probe_failures: 3,
        probe_recoveries: 2,
        breaker_failures: 2,
        breaker_cooldown: Duration::from_secs(10),
    };

    #[test]
    fn probes_mark_down_after_threshold_and_up_after_recovery() {
        let mut h = Health::default();
        assert_eq!(h.on_probe(false, &T), None);
        assert_eq!(h.on_probe(false, &T), None);
        assert_eq!(h.on_probe(false, &T), Some(Transition::MarkedDown));
        assert_eq!(h.on_probe(false, &T), None, "logged once");
        assert_eq!(h.admit(Instant::now()).0, Admission::No);
        assert_eq!(h.on_probe(true, &T), None);
        assert_eq!(h.on_probe(true, &T), Some(Transition::MarkedUp));
        assert_eq!(h.admit(Instant::now()).0, Admission::Yes);
    }

    #[test]
    fn breaker_opens_half_opens_and_closes() {
        let t0 = Instant::now();
        let mut h = Health::default();
        assert_eq!(h.on_result(false, t0, &T), None);
        assert_eq!(h.on_result(false, t0, &T), Some(Transition::BreakerOpened));
        assert_eq!(h.admit(t0 + Duration::from_secs(5)).0, Admission::No);
        let later = t0 + Duration::from_secs(11);
        assert_eq!(
            h.admit(later),
            (Admission::Trial, Some(Transition::BreakerHalfOpen))
        );
        assert_eq!(h.admit(later).0, Admission::No, "only one trial");
        assert_eq!(
            h.on_result(true, later, &T),
            Some(Transition::BreakerClosed)
        );
        assert_eq!(h.admit(later).0, Admission::Yes);
    }

    #[test]
    fn failed_trial_reopens() {
        let t0 = Instant::now();
        let mut h = Health::default();
        h.on_result(false, t0, &T);
        h.on_result(false, t0, &T);
        let later = t0 + Duration::from_secs(11);
        h.admit(later);
        assert_eq!(
            h.on_result(false, later, &T),
            Some(Transition::BreakerOpened)
        );
        assert_eq!(h.retry_at(), Some(later + T.breaker_cooldown));
    }

    #[test]
    fn success_resets_the_failure_count() {
        let t0 = Instant::now();
        let mut h = Health::default();
        h.on_result(false, t0, &T);
        h.on_result(true, t0, &T);
        assert_eq!(h.on_result(false, t0, &T), None);
    }
}
