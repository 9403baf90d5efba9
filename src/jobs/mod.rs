//! Async completion jobs and signed callbacks (issue 14), the building blocks: the job
//! registry ([`Jobs`]), the job URL's answers ([`respond`]), callback URLs and their
//! delivery ([`callback`]) and signatures ([`sign`]). Nothing here touches the request
//! pipeline; [`crate::proxy`] wires it in as described below.
//!
//! # The protocol
//!
//! A route with a client deadline answers a request whose upstream has not answered in time
//! with `202 Accepted`, `Location: /_edgecache/jobs/{id}` and
//! `{"id":…,"status":"pending","location":…}` ([`respond::accepted`]); the upstream request
//! goes on. `GET /_edgecache/jobs/{id}` ([`respond::job`]) then answers `202`
//! `{"id":…,"status":"pending"}` with `Retry-After: 1` while it runs; the upstream's response
//! (status, end-to-end headers, body, plus `X-Edgecache-Job: {id}`) once it is done; `502`
//! `{"id":…,"status":"failed","reason":…}` when the upstream request failed without a response
//! (or the job expired pending); `404` for an id that is unknown, malformed or forgotten.
//!
//! Ids are 128 bits from the operating system's CSPRNG, as 32 lower-case hex digits: the id is
//! the capability to read the result, so it cannot be guessed or enumerated.
//!
//! Identical requests in flight share one job: [`Jobs::start`] with the same
//! [`RequestHash`] while the job is pending joins it ([`Started::Existing`], same id). Each
//! distinct callback URL given to a job is called once when it finishes (at most
//! [`MAX_CALLBACKS_PER_JOB`]); giving the same URL twice calls it once.
//!
//! # Limits
//!
//! At most `JOBS_MAX` jobs are held, pending and finished together; [`Jobs::start`] beyond
//! that is [`StartError::Full`] (`503` with `Retry-After`, [`respond::unavailable`]). A pending
//! job still pending `JOBS_MAX_AGE_SECS` after it started fails as `expired` (no callback is
//! sent for it; a late result is dropped); a finished job is forgotten `JOBS_MAX_AGE_SECS`
//! after it finished (then `404`); an expiry counts from the first call (or sweep) that sees
//! it. So a job holds its slot for about twice that at most. Jobs live
//! in this process's memory only: **a restart loses every job**, pending or finished — their
//! URLs answer `404` and their callbacks are never sent — and jobs are not shared between
//! the instances of a fleet (a job URL must reach the instance that made it).
//!
//! # Wiring (for [`crate::proxy`])
//!
//! * At start-up: `Jobs::new(&config.jobs)` and
//!   `Arc::new(Callbacks::new(config.jobs.callback_secret.clone(), RetryPolicy::default()))`;
//!   spawn `jobs.sweep_every(Duration::from_secs(1))` on the [`crate::supervise::Background`]
//!   tree (the registry also sweeps as it is used; the task only frees memory while idle).
//! * Route first: [`parse_job_path`] on the request path. `Some(Some(id))` →
//!   `respond::job(&id, jobs.get(&id, Instant::now()))` for `GET`/`HEAD`,
//!   [`respond::method_not_allowed`] otherwise; `Some(None)` → [`respond::not_found`].
//!   Requests under `/_edgecache/` are never proxied.
//! * Before any upstream call, for a route with a client deadline: [`split_callback`] on the
//!   query, then [`CallbackTarget::parse`] with `config.jobs.callback_hosts`; an error →
//!   [`respond::callback_refused`] (`400`). Build the cache key, the [`RequestHash`] and the
//!   upstream request from the query *without* the `callback` parameter, so requests that
//!   differ only in their callback share a job and the upstream never sees it.
//! * When the deadline passes first: `jobs.start(hash, target, now)`; answer
//!   [`respond::accepted`]. On [`Started::New`], the task that awaits the upstream response
//!   (with the route's retries) must end the job: [`Jobs::complete`] with a [`JobResult`] of
//!   the response, or [`Jobs::fail`] when there is none, and hand the returned deliveries to
//!   [`Callbacks::spawn`]. On [`Started::Existing`] that task exists already. Cap result
//!   bodies (e.g. at `CACHE_MAX_OBJECT_BYTES`, failing the job beyond it): the registry bounds
//!   the number of jobs, not their bytes (`edgecache_jobs_result_bytes` shows them).
//! * `/metrics`: [`Jobs::render_metrics`] and [`Callbacks::render_metrics`].
//!
//! Time is passed in (`now`) everywhere in the registry, so tests drive it; it is
//! [`tokio::time::Instant`], the pipeline's clock.

pub mod callback;
pub mod respond;
pub mod sign;

use std::collections::{HashMap, VecDeque};
use std::fmt::{self, Write as _};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

pub use callback::{
    split_callback, CallbackRefused, CallbackTarget, Callbacks, Delivery, Outcome, RetryPolicy,
};

use crate::config::JobsConfig;
use crate::metrics;

/// Where job URLs live: `/_edgecache/jobs/{id}`.
pub const JOBS_PATH: &str = "/_edgecache/jobs/";
/// Distinct callback URLs one job calls at most.
pub const MAX_CALLBACKS_PER_JOB: usize = 8;
/// Longest failure reason kept (longer ones are cut).
const MAX_REASON_LEN: usize = 200;

/// A job's id: 128 random bits, shown as 32 lower-case hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct JobId([u8; 16]);

impl JobId {
    /// A fresh id from the operating system's CSPRNG.
    pub fn random() -> Result<Self, getrandom::Error> {
        let mut bytes = [0u8; 16];
        getrandom::getrandom(&mut bytes)?;
        Ok(JobId(bytes))
    }

    /// `/_edgecache/jobs/{id}`.
    pub fn location(&self) -> String {
        format!("{JOBS_PATH}{self}")
    }

    pub fn header_value(&self) -> HeaderValue {
        HeaderValue::try_from(self.to_string()).expect("hex is a valid header value")
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&sign::to_hex(&self.0))
    }
}

impl fmt::Debug for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JobId({self})")
    }
}

/// Exactly 32 lower-case hex digits (the form ids are shown in; anything else is no id).
impl FromStr for JobId {
    type Err = ();

    fn from_str(s: &str) -> Result<Self, ()> {
        if !s
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(());
        }
        sign::from_hex::<16>(s).map(JobId).ok_or(())
    }
}

/// Whether `path` is a job URL: `None` when it is not under [`JOBS_PATH`] (proxy it as
/// usual); `Some(None)` when it is but names no valid id (`404`); `Some(Some(id))`.
pub fn parse_job_path(path: &str) -> Option<Option<JobId>> {
    let rest = path.strip_prefix(JOBS_PATH)?;
    Some(rest.parse().ok())
}

/// What identifies identical requests: SHA-256 over everything that makes the upstream's
/// answer differ (see [`request_hash`]).
pub type RequestHash = [u8; 32];

/// SHA-256 over `parts`, each prefixed with its length, so that no two different lists give
/// the same input (`["ab", "c"]` ≠ `["a", "bc"]`). The pipeline passes the method, the cache
/// key (without the `callback` parameter) and whatever else reaches the upstream and changes
/// its answer.
pub fn request_hash(parts: &[&[u8]]) -> RequestHash {
    let mut h = Sha256::new();
    for part in parts {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.finalize().into()
}

/// A finished job's upstream response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobResult {
    pub status: StatusCode,
    /// End-to-end headers only (see [`JobResult::new`]).
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Dropped from a result: hop-by-hop fields (RFC 9110 §7.6.1; those named by `Connection`
/// too), `Content-Length` (the answer's own framing sets it) and `Set-Cookie` (a job's
/// result goes to whoever holds its id, and to callback receivers: never a session).
const NOT_STORED: [HeaderName; 11] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::CONTENT_LENGTH,
    header::SET_COOKIE,
];

impl JobResult {
    /// The upstream's `status`, `body` and its `headers` without hop-by-hop fields,
    /// `Content-Length` and `Set-Cookie`.
    pub fn new(status: StatusCode, headers: &HeaderMap, body: Bytes) -> Self {
        let mut kept = headers.clone();
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .collect();
        for name in named.iter().chain(NOT_STORED.iter()) {
            kept.remove(name);
        }
        JobResult {
            status,
            headers: kept,
            body,
        }
    }
}

/// A job as its URL shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobView {
    Pending {
        age: Duration,
    },
    Done(Arc<JobResult>),
    /// The upstream request failed without a response, or the job expired pending.
    Failed {
        reason: Arc<str>,
    },
}

/// Whether [`Jobs::start`] made a job or joined one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Started {
    /// A new job: its caller must end it ([`Jobs::complete`] / [`Jobs::fail`]).
    New,
    /// An identical request's job, still pending: its own task ends it.
    Existing,
}

/// Why [`Jobs::start`] made no job; the request is answered `503`
/// ([`respond::unavailable`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartError {
    /// `JOBS_MAX` jobs are held; the earliest one to go goes in `retry_after`.
    Full { retry_after: Duration },
    /// The pending job this request would join has [`MAX_CALLBACKS_PER_JOB`] callbacks.
    TooManyCallbacks,
    /// The operating system gave no random bytes for an id.
    NoRandomness,
}

impl StartError {
    pub fn as_str(self) -> &'static str {
        match self {
            StartError::Full { .. } => "full",
            StartError::TooManyCallbacks => "too_many_callbacks",
            StartError::NoRandomness => "no_randomness",
        }
    }
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::Full { .. } => f.write_str("too many jobs in progress (JOBS_MAX)"),
            StartError::TooManyCallbacks => write!(
                f,
                "this job already has {MAX_CALLBACKS_PER_JOB} callback URLs"
            ),
            StartError::NoRandomness => f.write_str("no random source for a job id"),
        }
    }
}

impl std::error::Error for StartError {}

/// What one [`Jobs::sweep`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    /// Pending jobs that reached `JOBS_MAX_AGE_SECS` and are now failed as expired.
    pub expired: usize,
    /// Finished jobs dropped `JOBS_MAX_AGE_SECS` after they finished.
    pub forgotten: usize,
}

enum State {
    Pending,
    Done(Arc<JobResult>),
    Failed(Arc<str>),
}

struct Job {
    hash: RequestHash,
    started: Instant,
    state: State,
    callbacks: Vec<CallbackTarget>,
}

#[derive(Default)]
struct Registry {
    jobs: HashMap<JobId, Job>,
    /// Pending jobs by request hash (finished ones are not joined).
    in_flight: HashMap<RequestHash, JobId>,
    /// `(started + max_age, id)` of pending jobs, oldest first; entries of jobs that finished
    /// meanwhile are skipped when they come up.
    pending_deadlines: VecDeque<(Instant, JobId)>,
    /// `(finished + max_age, id)` of finished jobs, in the order they finished.
    finished_deadlines: VecDeque<(Instant, JobId)>,
    /// Bytes of the finished results' bodies held.
    result_bytes: usize,
}

/// The job registry: every job of this process, bounded in number and age (see the module
/// docs). One mutex, held for a few map operations per call; the sweep's work is amortised
/// (each deadline is looked at once), so no call scans the registry.
pub struct Jobs {
    max_jobs: usize,
    max_age: Duration,
    registry: Mutex<Registry>,
    started: AtomicU64,
    joined: AtomicU64,
    refused_full: AtomicU64,
    refused_callbacks: AtomicU64,
    done: AtomicU64,
    failed: AtomicU64,
    expired: AtomicU64,
}

impl Jobs {
    pub fn new(config: &JobsConfig) -> Self {
        Self::with_limits(config.max_jobs, config.max_age)
    }

    /// At most `max_jobs` jobs (at least 1), each pending or finished for at most `max_age`.
    pub fn with_limits(max_jobs: usize, max_age: Duration) -> Self {
        Jobs {
            max_jobs: max_jobs.max(1),
            max_age,
            registry: Mutex::default(),
            started: AtomicU64::new(0),
            joined: AtomicU64::new(0),
            refused_full: AtomicU64::new(0),
            refused_callbacks: AtomicU64::new(0),
            done: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            expired: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Registry> {
        // The registry stays consistent across a panic (no call panics halfway).
        self.registry.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A job for the request `hash`: the pending one of an identical request, joined (its id,
    /// [`Started::Existing`]), else a new one ([`Started::New`]: the caller ends it).
    /// `callback`, if any, is added to the job unless it is there already. Sweeps first, so
    /// expired jobs make room.
    pub fn start(
        &self,
        hash: RequestHash,
        callback: Option<CallbackTarget>,
        now: Instant,
    ) -> Result<(JobId, Started), StartError> {
        let mut reg = self.lock();
        self.sweep_locked(&mut reg, now);
        if let Some(id) = reg.in_flight.get(&hash).copied() {
            let job = reg
                .jobs
                .get_mut(&id)
                .expect("in-flight jobs are registered");
            if let Some(cb) = callback {
                if !job.callbacks.contains(&cb) {
                    if job.callbacks.len() >= MAX_CALLBACKS_PER_JOB {
                        self.refused_callbacks.fetch_add(1, Ordering::Relaxed);
                        return Err(StartError::TooManyCallbacks);
                    }
                    job.callbacks.push(cb);
                }
            }
            self.joined.fetch_add(1, Ordering::Relaxed);
            return Ok((id, Started::Existing));
        }
        if reg.jobs.len() >= self.max_jobs {
            self.refused_full.fetch_add(1, Ordering::Relaxed);
            let next = [
                reg.pending_deadlines.front(),
                reg.finished_deadlines.front(),
            ]
            .into_iter()
            .flatten()
            .map(|(at, _)| *at)
            .min()
            .unwrap_or(now);
            let retry_after = next
                .saturating_duration_since(now)
                .max(Duration::from_secs(1));
            return Err(StartError::Full { retry_after });
        }
        let id = loop {
            let id = JobId::random().map_err(|_| StartError::NoRandomness)?;
            if !reg.jobs.contains_key(&id) {
                break id;
            }
        };
        reg.jobs.insert(
            id,
            Job {
                hash,
                started: now,
                state: State::Pending,
                callbacks: callback.into_iter().collect(),
            },
        );
        reg.in_flight.insert(hash, id);
        reg.pending_deadlines.push_back((now + self.max_age, id));
        self.started.fetch_add(1, Ordering::Relaxed);
        Ok((id, Started::New))
    }

    /// Ends pending job `id` with the upstream's response: its URL shows `result` from now
    /// on, and every callback URL gets one [`Delivery`] (returned: hand them to
    /// [`Callbacks::spawn`]). `None` when `id` is not pending (unknown, expired, or ended
    /// already): the result is dropped.
    pub fn complete(&self, id: &JobId, result: JobResult, now: Instant) -> Option<Vec<Delivery>> {
        let result = Arc::new(result);
        let deliveries = self.finish(id, State::Done(result.clone()), now)?;
        self.done.fetch_add(1, Ordering::Relaxed);
        Some(
            deliveries
                .into_iter()
                .map(|target| Delivery {
                    job: *id,
                    target,
                    status: result.status,
                    content_type: result.headers.get(header::CONTENT_TYPE).cloned(),
                    content_encoding: result.headers.get(header::CONTENT_ENCODING).cloned(),
                    body: result.body.clone(),
                })
                .collect(),
        )
    }

    /// Ends pending job `id` as failed (the upstream request ended without a response):
    /// its URL answers `502` with `reason` — shown to clients and receivers, so a short
    /// phrase without internals ("upstream timed out") — and every callback URL gets that
    /// JSON with `Edgecache-Status: 502`. `None` when `id` is not pending.
    pub fn fail(&self, id: &JobId, reason: &str, now: Instant) -> Option<Vec<Delivery>> {
        let reason: Arc<str> = clean_reason(reason).into();
        let deliveries = self.finish(id, State::Failed(reason.clone()), now)?;
        self.failed.fetch_add(1, Ordering::Relaxed);
        let body = respond::failed_body(id, &reason);
        Some(
            deliveries
                .into_iter()
                .map(|target| Delivery {
                    job: *id,
                    target,
                    status: StatusCode::BAD_GATEWAY,
                    content_type: Some(HeaderValue::from_static("application/json")),
                    content_encoding: None,
                    body: body.clone(),
                })
                .collect(),
        )
    }

    /// Moves pending job `id` to `state`; its callbacks.
    fn finish(&self, id: &JobId, state: State, now: Instant) -> Option<Vec<CallbackTarget>> {
        let mut reg = self.lock();
        self.sweep_locked(&mut reg, now);
        let reg = &mut *reg;
        let job = reg.jobs.get_mut(id)?;
        if !matches!(job.state, State::Pending) {
            return None;
        }
        if let State::Done(r) = &state {
            reg.result_bytes += r.body.len();
        }
        job.state = state;
        let callbacks = std::mem::take(&mut job.callbacks);
        let hash = job.hash;
        reg.in_flight.remove(&hash);
        reg.finished_deadlines.push_back((now + self.max_age, *id));
        Some(callbacks)
    }

    /// Job `id` as of `now`; `None` when unknown or forgotten.
    pub fn get(&self, id: &JobId, now: Instant) -> Option<JobView> {
        let mut reg = self.lock();
        self.sweep_locked(&mut reg, now);
        let job = reg.jobs.get(id)?;
        Some(match &job.state {
            State::Pending => JobView::Pending {
                age: now.saturating_duration_since(job.started),
            },
            State::Done(result) => JobView::Done(result.clone()),
            State::Failed(reason) => JobView::Failed {
                reason: reason.clone(),
            },
        })
    }

    /// Expires pending jobs older than `JOBS_MAX_AGE_SECS` (failed, `expired`; no callback)
    /// and forgets jobs finished longer ago than that. Every call of the registry does this
    /// first; call it periodically ([`Jobs::sweep_every`]) to free memory while idle.
    pub fn sweep(&self, now: Instant) -> Swept {
        let mut reg = self.lock();
        self.sweep_locked(&mut reg, now)
    }

    fn sweep_locked(&self, reg: &mut Registry, now: Instant) -> Swept {
        let mut swept = Swept::default();
        while let Some(&(at, id)) = reg.pending_deadlines.front() {
            if at > now {
                break;
            }
            reg.pending_deadlines.pop_front();
            let Some(job) = reg.jobs.get_mut(&id) else {
                continue;
            };
            if !matches!(job.state, State::Pending) {
                continue;
            }
            job.state = State::Failed("expired: no result within JOBS_MAX_AGE_SECS".into());
            job.callbacks = Vec::new();
            let hash = job.hash;
            reg.in_flight.remove(&hash);
            reg.finished_deadlines.push_back((now + self.max_age, id));
            swept.expired += 1;
        }
        while let Some(&(at, id)) = reg.finished_deadlines.front() {
            if at > now {
                break;
            }
            reg.finished_deadlines.pop_front();
            if let Some(job) = reg.jobs.remove(&id) {
                if let State::Done(r) = &job.state {
                    reg.result_bytes -= r.body.len();
                }
                swept.forgotten += 1;
            }
        }
        self.expired
            .fetch_add(swept.expired as u64, Ordering::Relaxed);
        swept
    }

    /// Sweeps every `period`, forever (spawn it on the background tree).
    pub async fn sweep_every(&self, period: Duration) {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.sweep(Instant::now());
        }
    }

    /// `(pending, finished)` jobs held.
    pub fn counts(&self) -> (usize, usize) {
        let reg = self.lock();
        let pending = reg.in_flight.len();
        (pending, reg.jobs.len() - pending)
    }

    /// Appends the job series in the Prometheus text format (see [`crate::metrics`]).
    pub fn render_metrics(&self, out: &mut String) {
        let (pending, finished, bytes) = {
            let reg = self.lock();
            let pending = reg.in_flight.len();
            (pending, reg.jobs.len() - pending, reg.result_bytes)
        };
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        metrics::series(
            out,
            "edgecache_jobs",
            "gauge",
            "Async jobs held, by state (at most JOBS_MAX together).",
        );
        let _ = writeln!(out, "edgecache_jobs{{state=\"pending\"}} {pending}");
        let _ = writeln!(out, "edgecache_jobs{{state=\"finished\"}} {finished}");
        metrics::series(
            out,
            "edgecache_jobs_result_bytes",
            "gauge",
            "Bytes of finished jobs' result bodies held.",
        );
        let _ = writeln!(out, "edgecache_jobs_result_bytes {bytes}");
        metrics::series(
            out,
            "edgecache_jobs_started_total",
            "counter",
            "Requests that became jobs: a new job, or joined an identical request's pending job.",
        );
        for (how, c) in [("new", &self.started), ("joined", &self.joined)] {
            let _ = writeln!(
                out,
                "edgecache_jobs_started_total{{how=\"{how}\"}} {}",
                load(c)
            );
        }
        metrics::series(
            out,
            "edgecache_jobs_refused_total",
            "counter",
            "Requests refused a job (503): JOBS_MAX reached, or the job has too many callback URLs.",
        );
        for (reason, c) in [
            ("full", &self.refused_full),
            ("too_many_callbacks", &self.refused_callbacks),
        ] {
            let _ = writeln!(
                out,
                "edgecache_jobs_refused_total{{reason=\"{reason}\"}} {}",
                load(c)
            );
        }
        metrics::series(
            out,
            "edgecache_jobs_finished_total",
            "counter",
            "Jobs ended: done (an upstream response), failed (none), expired (pending past JOBS_MAX_AGE_SECS).",
        );
        for (result, c) in [
            ("done", &self.done),
            ("failed", &self.failed),
            ("expired", &self.expired),
        ] {
            let _ = writeln!(
                out,
                "edgecache_jobs_finished_total{{result=\"{result}\"}} {}",
                load(c)
            );
        }
    }
}

/// `reason` on one line, printable, at most [`MAX_REASON_LEN`] characters.
fn clean_reason(reason: &str) -> String {
    let cleaned: String = reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(MAX_REASON_LEN)
        .collect();
    match cleaned.trim() {
        "" => "upstream request failed".to_owned(),
        r => r.to_owned(),
    }
}

#[cfg(test)]
mod tests;
