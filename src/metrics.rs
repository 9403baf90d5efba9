//! Counters and gauges, rendered in the Prometheus text format on the operator listener
//! (`GET /metrics` on `OPS_LISTEN_ADDR`). Everything is a relaxed atomic: recording costs one
//! uncontended-ish increment and never takes a lock.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use crate::admin::Action;
use crate::connection::Expired;

/// Latency histogram buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// A fixed-bucket latency histogram.
#[derive(Default)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|&b| secs <= b) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// Appends `name_bucket{labels,le=…}`, `name_sum`, `name_count` lines.
    pub fn render(&self, out: &mut String, name: &str, labels: &str) {
        let mut cumulative = 0;
        for (i, le) in BUCKETS.iter().enumerate() {
            cumulative += self.buckets[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
        }
        let count = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
        let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
    }
}

/// Why entries left the store.
#[derive(Debug, Clone, Copy)]
pub enum Eviction {
    /// Expired and not worth keeping (cold, no stale allowance left).
    Expired,
    /// Pushed out to stay within `CACHE_MAX_BYTES`.
    Capacity,
    /// Cleared by an admin request.
    Admin,
    /// Invalidated by a successful unsafe request.
    Invalidated,
}

const EVICTION_REASONS: [&str; 4] = ["expired", "capacity", "admin", "invalidated"];

/// The listeners whose accept errors are counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Listener {
    /// `LISTEN_ADDR`: the clients'.
    Proxy,
    /// `OPS_LISTEN_ADDR`: `/status` and `/metrics`.
    Operator,
}

impl Listener {
    /// Every listener, in discriminant order (the metrics index by it).
    pub const ALL: [Listener; 2] = [Listener::Proxy, Listener::Operator];

    pub fn as_str(self) -> &'static str {
        match self {
            Listener::Proxy => "proxy",
            Listener::Operator => "operator",
        }
    }
}

/// The supervised background tasks ([`crate::supervise::supervise`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Task {
    /// Refreshes hot keys and drops cold ones ([`crate::proxy::Proxy::run_expiry`]).
    Expiry,
    /// The backends' active health probes.
    HealthCheck,
}

impl Task {
    /// Every task, in discriminant order (the metrics index by it).
    pub const ALL: [Task; 2] = [Task::Expiry, Task::HealthCheck];

    pub fn as_str(self) -> &'static str {
        match self {
            Task::Expiry => "expiry",
            Task::HealthCheck => "health_check",
        }
    }
}

/// The proxy's metrics.
#[derive(Default)]
pub struct Metrics {
    /// Requests by `X-Cache-Status`: hit, miss, stale, refresh, bypass, then admin and other.
    requests: [AtomicU64; 7],
    pub coalesced: AtomicU64,
    evictions: [AtomicU64; 4],
    pub refreshes_ok: AtomicU64,
    pub refreshes_failed: AtomicU64,
    /// Admin requests by outcome, indexed by position in [`Action::ALL`].
    admin: [AtomicU64; Action::ALL.len()],
    pub open_connections: AtomicI64,
    pub connections_total: AtomicU64,
    /// Connections closed by their deadlines, indexed by [`Expired`].
    connection_timeouts: [AtomicU64; Expired::ALL.len()],
    /// Failed accepts, indexed by [`Listener`].
    accept_errors: [AtomicU64; Listener::ALL.len()],
    /// Background tasks restarted after a panic, indexed by [`Task`].
    task_restarts: [AtomicU64; Task::ALL.len()],
}

/// Labels of `requests`, in index order.
pub const REQUEST_LABELS: [&str; 7] =
    ["HIT", "MISS", "STALE", "REFRESH", "BYPASS", "ADMIN", "NONE"];
impl Metrics {
    /// Counts a request under the index of its label in [`REQUEST_LABELS`].
    pub fn request(&self, label_index: usize) {
        if let Some(c) = self.requests.get(label_index) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a connection closed by its deadlines.
    pub fn connection_timed_out(&self, why: Expired) {
        self.connection_timeouts[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a failed accept on a listener.
    pub fn accept_failed(&self, listener: Listener) {
        self.accept_errors[listener as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a background task restarted after a panic.
    pub fn task_restarted(&self, task: Task) {
        self.task_restarts[task as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn evicted(&self, reason: Eviction, n: usize) {
        if n > 0 {
            self.evictions[reason as usize].fetch_add(n as u64, Ordering::Relaxed);
        }
    }

    /// Counts an admin request by how it ended (the `action` of its reply).
    pub fn admin(&self, action: Action) {
        if let Some(i) = Action::ALL.iter().position(|a| *a == action) {
            self.admin[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Renders the proxy-wide series; the caller appends store and backend series.
    pub fn render(&self, out: &mut String) {
        series(
            out,
            "edgecache_requests_total",
            "counter",
            "Downstream requests by cache status.",
        );
        for (i, label) in REQUEST_LABELS.iter().enumerate() {
            let v = self.requests[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "edgecache_requests_total{{cache_status=\"{label}\"}} {v}"
            );
        }
        counter(
            out,
            "edgecache_coalesced_requests_total",
            "Requests that waited on another request's upstream fetch instead of making their own.",
            &self.coalesced,
        );
        series(
            out,
            "edgecache_evictions_total",
            "counter",
            "Stored responses removed, by reason.",
        );
        for (i, reason) in EVICTION_REASONS.iter().enumerate() {
            let v = self.evictions[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "edgecache_evictions_total{{reason=\"{reason}\"}} {v}");
        }
        series(
            out,
            "edgecache_refreshes_total",
            "counter",
            "Background and admin refreshes, by result.",
        );
        let _ = writeln!(
            out,
            "edgecache_refreshes_total{{result=\"ok\"}} {}",
            self.refreshes_ok.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "edgecache_refreshes_total{{result=\"failed\"}} {}",
            self.refreshes_failed.load(Ordering::Relaxed)
        );
        series(
            out,
            "edgecache_admin_requests_total",
            "counter",
            "Clear-Cache admin requests, by outcome.",
        );
        for (i, action) in Action::ALL.iter().enumerate() {
            let action = action.as_str();
            let v = self.admin[i].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "edgecache_admin_requests_total{{outcome=\"{action}\"}} {v}"
            );
        }
        series(
            out,
            "edgecache_open_connections",
            "gauge",
            "Downstream connections currently open.",
        );
        let _ = writeln!(
            out,
            "edgecache_open_connections {}",
            self.open_connections.load(Ordering::Relaxed)
        );
        counter(
            out,
            "edgecache_connections_total",
            "Downstream connections accepted.",
            &self.connections_total,
        );
        series(
            out,
            "edgecache_connection_timeouts_total",
            "counter",
            "Downstream connections closed for a slow head, idle keep-alive, a stalled transfer, or idle at MAX_CONNECTIONS (reclaimed).",
        );
        for why in Expired::ALL {
            let reason = why.as_str();
            let v = self.connection_timeouts[why as usize].load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "edgecache_connection_timeouts_total{{reason=\"{reason}\"}} {v}"
            );
        }
        series(
            out,
            "edgecache_accept_errors_total",
            "counter",
            "Failed accepts (out of file descriptors and the like), by listener.",
        );
        for listener in Listener::ALL {
            let v = self.accept_errors[listener as usize].load(Ordering::Relaxed);
            let name = listener.as_str();
            let _ = writeln!(
                out,
                "edgecache_accept_errors_total{{listener=\"{name}\"}} {v}"
            );
        }
        series(
            out,
            "edgecache_task_restarts_total",
            "counter",
            "Background tasks restarted after a panic, by task.",
        );
        for task in Task::ALL {
            let v = self.task_restarts[task as usize].load(Ordering::Relaxed);
            let name = task.as_str();
            let _ = writeln!(out, "edgecache_task_restarts_total{{task=\"{name}\"}} {v}");
        }
    }
}

/// Writes `# HELP` and `# TYPE` for a series.
pub fn series(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

fn counter(out: &mut String, name: &str, help: &str, v: &AtomicU64) {
    series(out, name, "counter", help);
    let _ = writeln!(out, "{name} {}", v.load(Ordering::Relaxed));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_is_cumulative() {
        let h = Histogram::default();
        h.observe(Duration::from_millis(3));
        h.observe(Duration::from_millis(30));
        h.observe(Duration::from_secs(60));
        let mut out = String::new();
        h.render(&mut out, "x", "b=\"1\"");
        assert!(out.contains("x_bucket{b=\"1\",le=\"0.005\"} 1"));
        assert!(out.contains("x_bucket{b=\"1\",le=\"0.05\"} 2"));
        assert!(out.contains("x_bucket{b=\"1\",le=\"+Inf\"} 3"));
        assert!(out.contains("x_count{b=\"1\"} 3"));
    }

    #[test]
    fn renders_every_series_with_type() {
        let m = Metrics::default();
        m.request(0);
        m.evicted(Eviction::Capacity, 2);
        m.admin(Action::Cleared);
        m.admin(Action::Refreshing);
        let mut out = String::new();
        m.render(&mut out);
        assert!(out.contains("edgecache_requests_total{cache_status=\"HIT\"} 1"));
        assert!(out.contains("edgecache_evictions_total{reason=\"capacity\"} 2"));
        assert!(out.contains("edgecache_admin_requests_total{outcome=\"cleared\"} 1"));
        assert!(out.contains("edgecache_admin_requests_total{outcome=\"refreshing\"} 1"));
        assert!(out.contains("edgecache_admin_requests_total{outcome=\"bad_request\"} 0"));
        assert!(out.contains("# TYPE edgecache_open_connections gauge"));
    }
}
