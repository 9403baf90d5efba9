//! A backend's health, as a pure state machine with time passed in: the active check's
//! verdict (probes against `HEALTH_CHECK_PATH`, with failure and recovery thresholds) and the
//! passive circuit breaker fed by live traffic (closed → open for a cool-down → half-open:
//! one trial request decides; `HEALTH_CHECK_RECOVERY_THRESHOLD` passing probes also close
//! it). A probe answered 404/405/501 means the check path is wrong, not that the backend is
//! down. [`panic_mode`] decides when too few backends are up for the probes to be believed.

use std::time::Duration;

use tokio::time::Instant;

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

/// What one active probe found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// 2xx.
    Pass,
    /// No answer in time, a connection error, or any other status.
    Fail,
    /// 404, 405 or 501: the backend answers HTTP but has no such route. The check path is
    /// wrong for it, which says nothing about its health: it counts as alive (for the up/down
    /// verdict) but not as proof of recovery for an open breaker.
    NoRoute(u16),
}

impl Probe {
    /// Classifies a probe's response status.
    pub fn from_status(status: u16) -> Probe {
        match status {
            200..=299 => Probe::Pass,
            404 | 405 | 501 => Probe::NoRoute(status),
            _ => Probe::Fail,
        }
    }
}

/// Envoy's panic threshold: when fewer than `threshold_pct` percent of the `total` backends
/// are up by the health checks, the checks are more likely wrong than the backends all down,
/// so every backend takes traffic again (the breakers still apply). Never for a single
/// backend (it is never shut out anyway) nor with a threshold of 0.
pub fn panic_mode(up: usize, total: usize, threshold_pct: u8) -> bool {
    total > 1 && up.saturating_mul(100) < usize::from(threshold_pct).saturating_mul(total)
}

/// A state change worth one log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    MarkedDown,
    MarkedUp,
    BreakerOpened,
    BreakerHalfOpen,
    BreakerClosed,
    /// Closed by passing probes before its cool-down ended.
    BreakerClosedByProbes,
    /// The first probe answered 404/405/501 (logged once per backend).
    ProbeRouteMissing,
}

impl Transition {
    pub fn as_str(self) -> &'static str {
        match self {
            Transition::MarkedDown => "marked down by health checks",
            Transition::MarkedUp => "marked up by health checks",
            Transition::BreakerOpened => "circuit breaker opened",
            Transition::BreakerHalfOpen => "circuit breaker half-open: sending one trial request",
            Transition::BreakerClosed => "circuit breaker closed",
            Transition::BreakerClosedByProbes => "circuit breaker closed by passing health checks",
            Transition::ProbeRouteMissing => {
                "health check path not found on this backend: HEALTH_CHECK_PATH is probably wrong \
                 for it; keeping the backend in (set HEALTH_CHECK_PATH to a route that answers \
                 2xx, or HEALTH_CHECK_INTERVAL_SECS=0 to disable active checks)"
            }
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
    /// Passing probes since the breaker last opened.
    passes_since_opened: u32,
    /// Whether the wrong check path was already reported.
    route_warned: bool,
    pub breaker: Breaker,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            up: true,
            probe_failures: 0,
            probe_successes: 0,
            passes_since_opened: 0,
            route_warned: false,
            breaker: Breaker::Closed { failures: 0 },
        }
    }
}

impl Health {
    /// May this backend take a request at `now`? Takes the half-open trial slot when it is
    /// free (the caller must then report the outcome with [`Health::on_result`], or give the
    /// slot back with [`Health::on_abandoned`]). In `panic` mode the probes' verdict is
    /// ignored; the breaker still applies.
    pub fn admit(&mut self, now: Instant, panic: bool) -> (Admission, Option<Transition>) {
        if !self.up && !panic {
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
    pub fn available(&self, now: Instant, panic: bool) -> bool {
        (self.up || panic)
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
                    self.open(now, t);
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
                self.open(now, t);
                Some(Transition::BreakerOpened)
            }
            // A request admitted before the breaker opened: its outcome changes nothing.
            (Breaker::Open { .. }, _) => None,
        }
    }

    fn open(&mut self, now: Instant, t: &Thresholds) {
        self.breaker = Breaker::Open {
            until: now + t.breaker_cooldown,
        };
        self.passes_since_opened = 0;
    }

    /// A request admitted as the half-open trial ended without an outcome (its future was
    /// dropped: the client went away). The slot is given back so that the next request can
    /// be the trial; otherwise the backend would never get traffic again.
    pub fn on_abandoned(&mut self) {
        if self.breaker == (Breaker::HalfOpen { trial: true }) {
            self.breaker = Breaker::HalfOpen { trial: false };
        }
    }

    /// Records an active probe's outcome.
    pub fn on_probe(&mut self, probe: Probe, t: &Thresholds) -> Option<Transition> {
        match probe {
            Probe::Pass | Probe::NoRoute(_) => {
                self.probe_failures = 0;
                self.probe_successes += 1;
                if !self.up && self.probe_successes >= t.probe_recoveries {
                    self.up = true;
                    // A recovered backend starts with a clean breaker.
                    self.breaker = Breaker::Closed { failures: 0 };
                    return Some(Transition::MarkedUp);
                }
                if matches!(probe, Probe::NoRoute(_)) {
                    if !self.route_warned {
                        self.route_warned = true;
                        return Some(Transition::ProbeRouteMissing);
                    }
                    return None;
                }
                // As Envoy un-ejects a host on a passing active check: the breaker opened on
                // live failures, the checks now say the backend is fine again.
                if !matches!(self.breaker, Breaker::Closed { .. }) {
                    self.passes_since_opened += 1;
                    if self.passes_since_opened >= t.probe_recoveries {
                        self.breaker = Breaker::Closed { failures: 0 };
                        return Some(Transition::BreakerClosedByProbes);
                    }
                }
            }
            Probe::Fail => {
                self.probe_successes = 0;
                self.passes_since_opened = 0;
                self.probe_failures += 1;
                if self.up && self.probe_failures >= t.probe_failures {
                    self.up = false;
                    return Some(Transition::MarkedDown);
                }
            }
        }
        None
    }

    /// When this backend may be tried again, if it is out now (for `Retry-After`).
    pub fn retry_at(&self, panic: bool) -> Option<Instant> {
        match self.breaker {
            Breaker::Open { until } if self.up || panic => Some(until),
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
        assert_eq!(h.on_probe(Probe::Fail, &T), None);
        assert_eq!(h.on_probe(Probe::Fail, &T), None);
        assert_eq!(h.on_probe(Probe::Fail, &T), Some(Transition::MarkedDown));
        assert_eq!(h.on_probe(Probe::Fail, &T), None, "logged once");
        assert_eq!(h.admit(Instant::now(), false).0, Admission::No);
        assert_eq!(h.on_probe(Probe::Pass, &T), None);
        assert_eq!(h.on_probe(Probe::Pass, &T), Some(Transition::MarkedUp));
        assert_eq!(h.admit(Instant::now(), false).0, Admission::Yes);
    }

    #[test]
    fn breaker_opens_half_opens_and_closes() {
        let t0 = Instant::now();
        let mut h = Health::default();
        assert_eq!(h.on_result(false, t0, &T), None);
        assert_eq!(h.on_result(false, t0, &T), Some(Transition::BreakerOpened));
        assert_eq!(h.admit(t0 + Duration::from_secs(5), false).0, Admission::No);
        let later = t0 + Duration::from_secs(11);
        assert_eq!(
            h.admit(later, false),
            (Admission::Trial, Some(Transition::BreakerHalfOpen))
        );
        assert_eq!(h.admit(later, false).0, Admission::No, "only one trial");
        assert_eq!(
            h.on_result(true, later, &T),
            Some(Transition::BreakerClosed)
        );
        assert_eq!(h.admit(later, false).0, Admission::Yes);
    }

    #[test]
    fn failed_trial_reopens() {
        let t0 = Instant::now();
        let mut h = Health::default();
        h.on_result(false, t0, &T);
        h.on_result(false, t0, &T);
        let later = t0 + Duration::from_secs(11);
        h.admit(later, false);
        assert_eq!(
            h.on_result(false, later, &T),
            Some(Transition::BreakerOpened)
        );
        assert_eq!(h.retry_at(false), Some(later + T.breaker_cooldown));
    }

    #[test]
    fn success_resets_the_failure_count() {
        let t0 = Instant::now();
        let mut h = Health::default();
        h.on_result(false, t0, &T);
        h.on_result(true, t0, &T);
        assert_eq!(h.on_result(false, t0, &T), None);
    }

    #[test]
    fn missing_check_route_keeps_the_backend_in_and_warns_once() {
        let mut h = Health::default();
        assert_eq!(Probe::from_status(404), Probe::NoRoute(404));
        assert_eq!(Probe::from_status(405), Probe::NoRoute(405));
        assert_eq!(Probe::from_status(501), Probe::NoRoute(501));
        assert_eq!(Probe::from_status(204), Probe::Pass);
        assert_eq!(Probe::from_status(503), Probe::Fail);
        assert_eq!(
            h.on_probe(Probe::NoRoute(404), &T),
            Some(Transition::ProbeRouteMissing)
        );
        for _ in 0..10 {
            assert_eq!(h.on_probe(Probe::NoRoute(404), &T), None, "warned once");
        }
        assert!(h.up);
        assert_eq!(h.admit(Instant::now(), false).0, Admission::Yes);
    }

    #[test]
    fn a_down_backend_answering_without_the_route_comes_back() {
        let mut h = Health::default();
        for _ in 0..3 {
            h.on_probe(Probe::Fail, &T);
        }
        assert!(!h.up);
        assert_eq!(h.on_probe(Probe::Pass, &T), None);
        assert_eq!(
            h.on_probe(Probe::NoRoute(404), &T),
            Some(Transition::MarkedUp)
        );
        assert_eq!(
            h.on_probe(Probe::NoRoute(404), &T),
            Some(Transition::ProbeRouteMissing),
            "the warning was deferred, not lost"
        );
    }

    #[test]
    fn passing_probes_close_an_open_breaker_before_its_cool_down() {
        let t0 = Instant::now();
        let mut h = Health::default();
        // Passes before the breaker opened do not count towards closing it.
        h.on_probe(Probe::Pass, &T);
        h.on_probe(Probe::Pass, &T);
        h.on_result(false, t0, &T);
        assert_eq!(h.on_result(false, t0, &T), Some(Transition::BreakerOpened));
        let soon = t0 + Duration::from_secs(1);
        assert_eq!(h.on_probe(Probe::Pass, &T), None);
        assert_eq!(
            h.admit(soon, false).0,
            Admission::No,
            "one pass is not enough"
        );
        assert_eq!(
            h.on_probe(Probe::Pass, &T),
            Some(Transition::BreakerClosedByProbes)
        );
        assert_eq!(h.admit(soon, false).0, Admission::Yes);
    }

    #[test]
    fn failed_or_routeless_probes_do_not_close_an_open_breaker() {
        let t0 = Instant::now();
        let mut h = Health::default();
        h.on_result(false, t0, &T);
        h.on_result(false, t0, &T);
        h.on_probe(Probe::Pass, &T);
        h.on_probe(Probe::Fail, &T);
        assert_eq!(
            h.on_probe(Probe::Pass, &T),
            None,
            "passes must be consecutive"
        );
        let mut g = Health::default();
        g.on_result(false, t0, &T);
        g.on_result(false, t0, &T);
        for _ in 0..5 {
            g.on_probe(Probe::NoRoute(404), &T);
        }
        assert_eq!(g.state(), "breaker_open");
    }

    #[test]
    fn an_abandoned_trial_gives_its_slot_back() {
        let t0 = Instant::now();
        let mut h = Health::default();
        h.on_result(false, t0, &T);
        h.on_result(false, t0, &T);
        let later = t0 + Duration::from_secs(11);
        assert_eq!(h.admit(later, false).0, Admission::Trial);
        assert_eq!(h.admit(later, false).0, Admission::No);
        h.on_abandoned();
        assert_eq!(
            h.admit(later, false).0,
            Admission::Trial,
            "the next request is the trial"
        );
        // An abandoned ordinary request changes nothing.
        let mut c = Health::default();
        c.on_abandoned();
        assert_eq!(c.breaker, Breaker::Closed { failures: 0 });
    }

    #[test]
    fn panic_mode_ignores_probes_but_not_breakers() {
        assert!(!panic_mode(1, 2, 50), "half up is not below half");
        assert!(panic_mode(0, 2, 50));
        assert!(panic_mode(1, 3, 50));
        assert!(!panic_mode(2, 3, 50));
        assert!(!panic_mode(0, 2, 0), "0 disables it");
        assert!(!panic_mode(0, 1, 50), "never for one backend");
        assert!(panic_mode(9, 10, 100));
        let t0 = Instant::now();
        let mut h = Health::default();
        for _ in 0..3 {
            h.on_probe(Probe::Fail, &T);
        }
        assert!(!h.available(t0, false));
        assert!(h.available(t0, true));
        assert_eq!(h.admit(t0, true).0, Admission::Yes);
        h.on_result(false, t0, &T);
        h.on_result(false, t0, &T);
        assert!(!h.available(t0, true), "the breaker still applies");
        assert_eq!(h.retry_at(true), Some(t0 + T.breaker_cooldown));
    }
}
