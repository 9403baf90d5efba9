//! Counters and gauges, rendered in the Prometheus text format on the operator listener
//! (`GET /metrics` on `OPS_LISTEN_ADDR`). Everything is a relaxed atomic: recording costs one
//! uncontended-ish increment and never takes a lock.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use crate::admin::Action;
use crate::cache::status::CacheStatus;

/// Why a connection was closed by its deadlines.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expired {
    /// The request head did not arrive in time (slowloris).
    Header,
    /// No new request within the keep-alive timeout.
    Idle,
    /// A request in flight moved no bytes for too long (a client that stopped reading).
    Stalled,
    /// Idle keep-alive, closed to make room at `MAX_CONNECTIONS`.
    Reclaimed,
}

impl Expired {
    /// Every reason, in discriminant order (the metrics index by it).
    pub const ALL: [Expired; 4] = [
        Expired::Header,
        Expired::Idle,
        Expired::Stalled,
        Expired::Reclaimed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Expired::Header => "header_timeout",
            Expired::Idle => "keepalive_timeout",
            Expired::Stalled => "stalled",
            Expired::Reclaimed => "reclaimed",
        }
    }
}

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

impl Eviction {
    /// Every reason, in discriminant order (the metrics index by it).
    pub const ALL: [Eviction; 4] = [
        Eviction::Expired,
        Eviction::Capacity,
        Eviction::Admin,
        Eviction::Invalidated,
    ];

    /// The `reason` label of `edgecache_evictions_total`.
    pub fn as_str(self) -> &'static str {
        match self {
            Eviction::Expired => "expired",
            Eviction::Capacity => "capacity",
            Eviction::Admin => "admin",
            Eviction::Invalidated => "invalidated",
        }
    }
}

/// What a downstream request is counted under in `edgecache_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestClass {
    /// What the cache did, labelled as its `X-Cache-Status` header.
    Cache(CacheStatus),
    /// An admin (`Clear-Cache`) request.
    Admin,
    /// Answered before the cache was consulted (a refused request, say).
    Other,
}

impl RequestClass {
    /// Every class, in the order of the metric's series.
    pub const ALL: [RequestClass; 7] = [
        RequestClass::Cache(CacheStatus::Hit),
        RequestClass::Cache(CacheStatus::Miss),
        RequestClass::Cache(CacheStatus::Stale),
        RequestClass::Cache(CacheStatus::Refresh),
        RequestClass::Cache(CacheStatus::Bypass),
        RequestClass::Admin,
        RequestClass::Other,
    ];

    /// The class of a request: admin requests count as such whatever the cache did.
    pub fn of(cache: Option<CacheStatus>, admin: bool) -> Self {
        match (cache, admin) {
            (_, true) => RequestClass::Admin,
            (Some(status), false) => RequestClass::Cache(status),
            (None, false) => RequestClass::Other,
        }
    }

    /// The `cache_status` label: the `X-Cache-Status` value, `ADMIN` or `NONE`.
    pub fn as_str(self) -> &'static str {
        match self {
            RequestClass::Cache(status) => status.as_str(),
            RequestClass::Admin => "ADMIN",
            RequestClass::Other => "NONE",
        }
    }

    /// The position in [`RequestClass::ALL`] (an exhaustive match: no reliance on the
    /// order of `CacheStatus`'s variants).
    fn index(self) -> usize {
        match self {
            RequestClass::Cache(CacheStatus::Hit) => 0,
            RequestClass::Cache(CacheStatus::Miss) => 1,
            RequestClass::Cache(CacheStatus::Stale) => 2,
            RequestClass::Cache(CacheStatus::Refresh) => 3,
            RequestClass::Cache(CacheStatus::Bypass) => 4,
            RequestClass::Admin => 5,
            RequestClass::Other => 6,
        }
    }
}

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
    /// Requests, indexed by [`RequestClass::index`].
    requests: [AtomicU64; RequestClass::ALL.len()],
    pub coalesced: AtomicU64,
    /// Entries evicted, indexed by [`Eviction`].
    evictions: [AtomicU64; Eviction::ALL.len()],
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

impl Metrics {
    /// Counts a downstream request.
    pub fn count_request(&self, class: RequestClass) {
        self.requests[class.index()].fetch_add(1, Ordering::Relaxed);
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
        for class in RequestClass::ALL {
            let label = class.as_str();
            let v = self.requests[class.index()].load(Ordering::Relaxed);
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
        for reason in Eviction::ALL {
            let v = self.evictions[reason as usize].load(Ordering::Relaxed);
            let reason = reason.as_str();
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
        m.count_request(RequestClass::Cache(CacheStatus::Hit));
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

    /// Every request class and eviction reason has its own series, labelled by its enum:
    /// the cache statuses exactly as the `X-Cache-Status` header spells them.
    #[test]
    fn labels_come_from_the_enums() {
        let m = Metrics::default();
        for (n, class) in RequestClass::ALL.into_iter().enumerate() {
            assert_eq!(class.index(), n, "{class:?}");
            for _ in 0..=n {
                m.count_request(class);
            }
        }
        for (n, reason) in Eviction::ALL.into_iter().enumerate() {
            assert_eq!(reason as usize, n, "{reason:?}");
            m.evicted(reason, n + 10);
        }
        let mut out = String::new();
        m.render(&mut out);
        for (label, n) in [
            ("HIT", 1),
            ("MISS", 2),
            ("STALE", 3),
            ("REFRESH", 4),
            ("BYPASS", 5),
            ("ADMIN", 6),
            ("NONE", 7),
        ] {
            let line = format!("edgecache_requests_total{{cache_status=\"{label}\"}} {n}\n");
            assert!(out.contains(&line), "{line} missing from\n{out}");
        }
        for (reason, n) in [
            ("expired", 10),
            ("capacity", 11),
            ("admin", 12),
            ("invalidated", 13),
        ] {
            let line = format!("edgecache_evictions_total{{reason=\"{reason}\"}} {n}\n");
            assert!(out.contains(&line), "{line} missing from\n{out}");
        }
        // The index-based entry point the proxy still uses agrees with the enum.
        assert_eq!(
            RequestClass::of(Some(CacheStatus::Stale), false),
            RequestClass::ALL[CacheStatus::Stale as usize]
        );
        assert_eq!(
            RequestClass::of(Some(CacheStatus::Hit), true),
            RequestClass::Admin
        );
        assert_eq!(RequestClass::of(None, false), RequestClass::Other);
    }
}
