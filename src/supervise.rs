//! Keeping the daemon's long-lived loops alive, and stopping them: [`accept`] takes the next
//! connection from a listener and backs off (rather than spinning) while accepting fails, say
//! for lack of file descriptors (`EMFILE`); [`supervise`] runs a background task (the expiry
//! task, the health probes) and restarts it, with a growing delay, when it panics. Both log and
//! count what went wrong ([`crate::metrics::Metrics`]: `edgecache_accept_errors_total{listener}`,
//! `edgecache_task_restarts_total{task}`).
//!
//! [`Background`] holds all background work under one cancellation tree (the expiry task, the
//! health probes, background refreshes, the operator listener and its connections): at
//! shutdown the tree is cancelled and every task is awaited, so a task that panics on its way
//! out is reported, not lost.
//!
//! This module stays outside [`crate::server`] because the operator listener ([`crate::ops`])
//! and the proxy pipeline (refreshes) use it too, and `server` imports both.

use std::any::Any;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::{Listener, Metrics, Task};

/// First pause after a failed accept; doubled on each failure in a row.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
/// Longest pause between accept attempts.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// The next connection on `listener`. Errors are logged and counted; an error that concerns
/// only the connection being accepted (reset or aborted before it was taken) is retried at
/// once, any other (`EMFILE`, `ENFILE`, `ENOBUFS`, …) after a pause that doubles with each
/// failure in a row, from 5 ms to 1 s, so the loop neither spins nor stalls for long once
/// descriptors are free again. Cancel-safe: dropping the future loses no connection.
pub async fn accept(
    listener: &TcpListener,
    metrics: &Metrics,
    which: Listener,
) -> (TcpStream, SocketAddr) {
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        match listener.accept().await {
            Ok(conn) => return conn,
            Err(e) => {
                metrics.accept_failed(which);
                if is_connection_error(&e) {
                    tracing::debug!(listener = which.as_str(), error = %e, "accept: connection gone");
                    continue;
                }
                tracing::warn!(
                    listener = which.as_str(),
                    error = %e,
                    retry_ms = backoff.as_millis() as u64,
                    "accept failed; backing off"
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
            }
        }
    }
}

/// Errors about one incoming connection, not about the listener or the process.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionRefused
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    )
}

/// First pause before restarting a task that panicked; doubled for each panic that follows
/// a short run.
const RESTART_DELAY_MIN: Duration = Duration::from_millis(100);
/// Longest pause before a restart.
const RESTART_DELAY_MAX: Duration = Duration::from_secs(10);
/// A run this long resets the restart delay.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// Runs the task `start` makes until it returns; each time it panics, logs the panic (error
/// level), counts it in `edgecache_task_restarts_total{task}`, waits (100 ms, doubling up to
/// 10 s while it keeps panicking soon after each start) and starts it again. The task runs
/// inside this future, so dropping the future (shutdown cancels the [`Background`] tree it
/// runs on) stops it too.
pub async fn supervise<F, Fut>(task: Task, metrics: &Metrics, mut start: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut delay = RESTART_DELAY_MIN;
    loop {
        let started = Instant::now();
        let Err(panic) = catch_panic(start()).await else {
            return;
        };
        if started.elapsed() >= HEALTHY_RUN {
            delay = RESTART_DELAY_MIN;
        }
        metrics.task_restarted(task);
        tracing::error!(
            task = task.as_str(),
            panic = panic_message(panic.as_ref()),
            restart_in_ms = delay.as_millis() as u64,
            "background task panicked; restarting it"
        );
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(RESTART_DELAY_MAX);
    }
}

/// The daemon's background work under one cancellation tree. Every task is spawned with
/// [`Background::spawn`] under a child of the root token and tracked; at shutdown
/// [`Background::shutdown`] cancels the root and awaits them all, so none outlives `run` and
/// a panic on the way out is reported (error log, and [`crate::run`] returns an error, so the
/// daemon exits 1). Cloning gives another handle on the same tree.
///
/// Created with the [`crate::proxy::Proxy`] (which spawns refreshes on it); started tasks and
/// the shutdown belong to [`crate::run`] and [`crate::server::serve`].
#[derive(Debug, Clone, Default)]
pub struct Background {
    /// Cancelled once, at shutdown; each task watches a child of it.
    root: CancellationToken,
    /// Every task spawned on the tree, so shutdown can wait for the last one.
    tracker: TaskTracker,
    /// Tasks that panicked after the tree was cancelled.
    panicked_in_shutdown: Arc<AtomicUsize>,
}

impl Background {
    pub fn new() -> Self {
        Self::default()
    }

    /// Spawns `task` on the tree: it runs until it returns or the tree is cancelled, and is
    /// then dropped at its next poll (so its drop guards run inside the tracked task). A
    /// panic is caught and logged at error level under `name`; one after the cancel also
    /// counts as a panic during shutdown. A task that should be restarted after a panic runs
    /// [`supervise`] inside.
    pub fn spawn<F>(&self, name: &'static str, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let token = self.root.child_token();
        let panicked_in_shutdown = self.panicked_in_shutdown.clone();
        self.tracker.spawn(async move {
            let run = async {
                tokio::select! {
                    biased;
                    _ = token.cancelled() => {}
                    _ = task => {}
                }
            };
            // The task is dropped inside `run`, so a panic in its drop is caught here too.
            if let Err(panic) = catch_panic(run).await {
                let during_shutdown = token.is_cancelled();
                if during_shutdown {
                    panicked_in_shutdown.fetch_add(1, Ordering::SeqCst);
                }
                tracing::error!(
                    task = name,
                    panic = panic_message(panic.as_ref()),
                    during_shutdown,
                    "background task panicked"
                );
            }
        });
    }

    /// Cancels every task, then waits up to `within` for all of them to end (a cancelled task
    /// ends at its next poll; `within` bounds one stuck in a blocking call, which is then
    /// left to the runtime and logged). Returns how many panicked during shutdown (logged at
    /// error level).
    pub async fn shutdown(&self, within: Duration) -> usize {
        self.root.cancel();
        self.tracker.close();
        if tokio::time::timeout(within, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::error!(
                running = self.tracker.len(),
                waited_ms = within.as_millis() as u64,
                "background tasks did not stop in time"
            );
        }
        let panicked = self.panicked_in_shutdown();
        if panicked > 0 {
            tracing::error!(panicked, "background tasks panicked during shutdown");
        }
        panicked
    }

    /// Tasks that panicked after the tree was cancelled.
    pub fn panicked_in_shutdown(&self) -> usize {
        self.panicked_in_shutdown.load(Ordering::SeqCst)
    }

    /// Tasks spawned on the tree that have not ended yet.
    pub fn len(&self) -> usize {
        self.tracker.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tracker.is_empty()
    }
}

/// [`crate::run`]'s error: background tasks panicked during shutdown (each one is in the
/// error log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PanickedInShutdown(pub usize);

impl std::fmt::Display for PanickedInShutdown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} background task(s) panicked during shutdown (see the error log)",
            self.0
        )
    }
}

impl std::error::Error for PanickedInShutdown {}

/// Runs `fut` to completion, or until it panics (the panic payload).
async fn catch_panic<Fut: Future<Output = ()>>(fut: Fut) -> Result<(), Box<dyn Any + Send>> {
    let mut fut = pin!(fut);
    std::future::poll_fn(move |cx| {
        match catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(())) => Poll::Ready(Ok(())),
            // The future is not polled again: `start` makes a new one.
            Err(panic) => Poll::Ready(Err(panic)),
        }
    })
    .await
}

fn panic_message(panic: &(dyn Any + Send)) -> &str {
    if let Some(s) = panic.downcast_ref::<&'static str>() {
        s
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s
    } else {
        "(not a string)"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn rendered(metrics: &Metrics) -> String {
        let mut out = String::new();
        metrics.render(&mut out);
        out
    }

    /// A task that panics is counted, restarted after a delay that grows, and runs again;
    /// when it returns, supervision ends.
    #[tokio::test(start_paused = true)]
    async fn a_panicking_task_is_counted_and_restarted() {
        let metrics = Metrics::default();
        let starts = AtomicU32::new(0);
        let began = Instant::now();
        supervise(Task::Expiry, &metrics, || {
            let n = starts.fetch_add(1, Ordering::SeqCst);
            async move {
                tokio::time::sleep(Duration::from_millis(1)).await;
                if n < 3 {
                    panic!("boom {n}");
                }
            }
        })
        .await;
        assert_eq!(starts.load(Ordering::SeqCst), 4);
        let out = rendered(&metrics);
        assert!(
            out.contains("edgecache_task_restarts_total{task=\"expiry\"} 3"),
            "{out}"
        );
        assert!(out.contains("edgecache_task_restarts_total{task=\"health_check\"} 0"));
        // 100 + 200 + 400 ms of restart delay, plus the tasks' own 4 × 1 ms.
        assert_eq!(began.elapsed(), Duration::from_millis(704));
    }

    /// Dropping the supervisor (shutdown cancels its tree) drops the running task too.
    #[tokio::test(start_paused = true)]
    async fn dropping_the_supervisor_stops_the_task() {
        let metrics = Metrics::default();
        let alive = std::sync::Arc::new(());
        let held = alive.clone();
        let mut supervised = Box::pin(supervise(Task::Expiry, &metrics, move || {
            let held = held.clone();
            async move {
                let _held = held;
                std::future::pending::<()>().await;
            }
        }));
        let running = tokio::time::timeout(Duration::from_secs(1), supervised.as_mut()).await;
        assert!(
            running.is_err(),
            "a task that never ends is still supervised"
        );
        // `alive`, the start closure's copy, and the running task's own.
        assert_eq!(std::sync::Arc::strong_count(&alive), 3, "the task runs");
        drop(supervised);
        assert_eq!(std::sync::Arc::strong_count(&alive), 1, "and is dropped");
    }

    /// Log lines written while the returned guard is held (current thread only, so a
    /// current-thread runtime's tasks are captured).
    fn capture_logs() -> (Logs, tracing::subscriber::DefaultGuard) {
        let logs = Logs::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(logs.clone())
            .with_ansi(false)
            .finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }

    #[derive(Clone, Default)]
    struct Logs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl Logs {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
        }
    }

    impl io::Write for Logs {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Logs {
        type Writer = Logs;
        fn make_writer(&'a self) -> Logs {
            self.clone()
        }
    }

    /// Panics when dropped: a task whose clean-up fails at shutdown.
    struct PanicsOnDrop;

    impl Drop for PanicsOnDrop {
        fn drop(&mut self) {
            panic!("clean-up failed");
        }
    }

    /// Shutdown cancels every task on the tree (a supervised one too) and returns only once
    /// each has ended and been dropped; nothing panicked, nothing to report.
    #[tokio::test(start_paused = true)]
    async fn shutdown_cancels_and_awaits_every_task() {
        let background = Background::new();
        let metrics = std::sync::Arc::new(Metrics::default());
        let alive = std::sync::Arc::new(());
        for _ in 0..3 {
            let held = alive.clone();
            background.spawn("forever", async move {
                let _held = held;
                std::future::pending::<()>().await;
            });
        }
        let held = alive.clone();
        let m = metrics.clone();
        background.spawn("supervised", async move {
            let held = held;
            supervise(Task::Expiry, &m, || {
                let held = held.clone();
                async move {
                    let _held = held;
                    std::future::pending::<()>().await;
                }
            })
            .await;
        });
        background.spawn("done", async {});
        tokio::task::yield_now().await;
        assert_eq!(background.len(), 4, "the one that returned has ended");
        assert_eq!(std::sync::Arc::strong_count(&alive), 6);

        assert_eq!(background.shutdown(Duration::from_secs(1)).await, 0);
        assert!(background.is_empty());
        assert_eq!(
            std::sync::Arc::strong_count(&alive),
            1,
            "every task dropped"
        );
        // Spawned after shutdown: cancelled before it starts.
        background.spawn("late", std::future::pending());
        assert_eq!(background.shutdown(Duration::from_secs(1)).await, 0);
        assert!(background.is_empty());
    }

    /// A panic in a background task during shutdown (here in its clean-up, when the
    /// cancelled task is dropped) is logged at error level and counted; one while the task
    /// was running is logged too, but is not a shutdown failure; a supervised task that panics
    /// is still restarted and counted in the metrics under the tree.
    #[tokio::test(start_paused = true)]
    async fn a_panic_during_shutdown_is_reported() {
        let (logs, _guard) = capture_logs();
        let background = Background::new();
        let metrics = std::sync::Arc::new(Metrics::default());
        background.spawn("early", async { panic!("while running") });
        background.spawn("cleanup", async {
            let _cleanup = PanicsOnDrop;
            std::future::pending::<()>().await;
        });
        let m = metrics.clone();
        let starts = std::sync::Arc::new(AtomicU32::new(0));
        let counted = starts.clone();
        background.spawn("supervised", async move {
            supervise(Task::HealthCheck, &m, || {
                let n = counted.fetch_add(1, Ordering::SeqCst);
                async move {
                    if n == 0 {
                        panic!("first run");
                    }
                    std::future::pending::<()>().await;
                }
            })
            .await;
        });
        // The supervised task panics, waits 100 ms and runs again.
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(starts.load(Ordering::SeqCst), 2);
        assert!(
            rendered(&metrics).contains("edgecache_task_restarts_total{task=\"health_check\"} 1")
        );
        assert_eq!(background.panicked_in_shutdown(), 0);
        let log = logs.text();
        let line = log
            .lines()
            .find(|l| l.contains("while running"))
            .unwrap_or_else(|| panic!("no log line for the panic: {log}"));
        assert!(
            line.contains("ERROR") && line.contains("during_shutdown=false"),
            "{line}"
        );

        assert_eq!(background.shutdown(Duration::from_secs(1)).await, 1);
        assert_eq!(background.panicked_in_shutdown(), 1);
        assert!(background.is_empty());
        let log = logs.text();
        let line = log
            .lines()
            .find(|l| l.contains("clean-up failed"))
            .unwrap_or_else(|| panic!("no log line for the panic: {log}"));
        assert!(
            line.contains("ERROR") && line.contains("during_shutdown=true"),
            "{line}"
        );
        assert!(
            log.contains("background tasks panicked during shutdown"),
            "{log}"
        );
        assert_eq!(
            PanickedInShutdown(1).to_string(),
            "1 background task(s) panicked during shutdown (see the error log)"
        );
    }

    /// Accept errors that concern the process (here: a socket that is bound but not
    /// listening gives `EINVAL` at once, every time) back off instead of spinning, and are
    /// counted. Real time: a spinning loop would starve a paused clock's auto-advance.
    #[cfg(unix)]
    #[tokio::test]
    async fn accept_errors_back_off_and_are_counted() {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let listener = not_listening(socket);
        let metrics = Metrics::default();
        let _ = tokio::time::timeout(
            Duration::from_millis(500),
            accept(&listener, &metrics, Listener::Operator),
        )
        .await;
        let out = rendered(&metrics);
        let errors: u64 = out
            .lines()
            .find_map(|l| l.strip_prefix("edgecache_accept_errors_total{listener=\"operator\"} "))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        // Pauses of 5, 10, 20, … ms: 7 attempts in 500 ms; a spinning loop makes thousands.
        assert!(
            (2..=50).contains(&errors),
            "{errors} accept errors in 500 ms"
        );
        assert!(out.contains("edgecache_accept_errors_total{listener=\"proxy\"} 0"));
    }

    /// A `TcpListener` over a socket that is bound but not listening.
    #[cfg(unix)]
    fn not_listening(socket: tokio::net::TcpSocket) -> TcpListener {
        use std::os::fd::{FromRawFd, IntoRawFd};
        let fd = socket.into_raw_fd();
        // SAFETY: `fd` is a valid socket this function owns, handed over exactly once.
        let listener = unsafe { std::net::TcpListener::from_raw_fd(fd) };
        listener.set_nonblocking(true).unwrap();
        TcpListener::from_std(listener).unwrap()
    }
}
