//! Keeping the daemon's long-lived loops alive: [`accept`] takes the next connection from a
//! listener and backs off (rather than spinning) while accepting fails, say for lack of file
//! descriptors (`EMFILE`); [`supervise`] runs a background task (the expiry task, the health
//! probes) and restarts it, with a growing delay, when it panics. Both log and count what
//! went wrong ([`crate::metrics::Metrics`]: `edgecache_accept_errors_total{listener}`,
//! `edgecache_task_restarts_total{task}`).

use std::any::Any;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::pin;
use std::task::Poll;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

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
/// inside this future, so aborting the future (shutdown) stops it too.
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

    /// Dropping the supervisor (shutdown aborts it) drops the running task too.
    #[tokio::test(start_paused = true)]
    async fn dropping_the_supervisor_stops_the_task() {
        let metrics = Metrics::default();
        let alive = std::sync::Arc::new(());
        let held = alive.clone();
        let supervised = supervise(Task::Expiry, &metrics, move || {
            let held = held.clone();
            async move {
                let _held = held;
                std::future::pending::<()>().await;
            }
        });
        let _ = tokio::time::timeout(Duration::from_secs(1), supervised).await;
        assert_eq!(std::sync::Arc::strong_count(&alive), 1);
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
