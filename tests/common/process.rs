//! The real binaries as child processes: `edgecache` started with a clean environment in its
//! own directory, the `mock-origin` binary, and guards that kill and reap them on drop.

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::get;

pub const EDGECACHE: &str = env!("CARGO_BIN_EXE_edgecache");
pub const MOCK_ORIGIN: &str = env!("CARGO_BIN_EXE_mock-origin");

/// How long a process may take to start listening, or to exit when it should.
pub const DEADLINE: Duration = Duration::from_secs(15);

/// `edgecache` with only PATH and `env` in its environment, run in `dir` (so the only `.env`
/// it can read is one the test wrote there). Both listeners are on `127.0.0.1:0` unless `env`
/// says otherwise: the daemon reports the ports it got ([`Edgecache::start`]).
pub fn edgecache_cmd(dir: &Path, env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(EDGECACHE);
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("LISTEN_ADDR", "127.0.0.1:0")
        .env("OPS_LISTEN_ADDR", "127.0.0.1:0")
        // Health probes would show up in the mock origin's request counts.
        .env("HEALTH_CHECK_INTERVAL_SECS", "0")
        .envs(env.iter().copied())
        .current_dir(dir)
        .stdin(Stdio::null());
    cmd
}

/// A running `edgecache` whose stderr goes to a file in its directory.
pub struct Edgecache {
    pub child: Guard,
    /// The proxy's bound address, as the daemon reported it.
    pub addr: SocketAddr,
    /// The operator listener's bound address; `None` with `OPS_LISTEN_ADDR=off`.
    pub ops: Option<SocketAddr>,
    stderr_path: PathBuf,
    /// Kept open: the daemon's stdout stays a live pipe.
    _stdout: Option<BufReader<ChildStdout>>,
}

impl Edgecache {
    /// Starts it and waits for the line it prints once both listeners are bound,
    /// `edgecache listening on http://ADDR (operator: http://ADDR|off)`: no port is picked
    /// (and possibly taken by someone else) before the daemon binds it.
    pub async fn start(dir: &TempDir, env: &[(&str, &str)]) -> Edgecache {
        let stderr_path = dir.path.join("edgecache.stderr");
        let mut cmd = edgecache_cmd(&dir.path, env);
        cmd.stdout(Stdio::piped())
            .stderr(fs::File::create(&stderr_path).unwrap());
        let mut child = Guard::spawn("edgecache", cmd);
        let stdout = BufReader::new(child.0.stdout.take().unwrap());
        let (stdout, line) = read_line_within(stdout, DEADLINE).await;
        let stderr = || fs::read_to_string(&stderr_path).unwrap_or_default();
        let Some(line) = line else {
            panic!(
                "edgecache did not report listening within {DEADLINE:?}; stderr:\n{}",
                stderr()
            );
        };
        let parsed = line
            .trim_end()
            .strip_prefix("edgecache listening on http://")
            .and_then(|rest| rest.strip_suffix(')'))
            .and_then(|rest| rest.split_once(" (operator: "))
            .and_then(|(addr, ops)| {
                let ops = match ops {
                    "off" => None,
                    ops => Some(ops.strip_prefix("http://")?.parse().ok()?),
                };
                Some((addr.parse().ok()?, ops))
            });
        let Some((addr, ops)) = parsed else {
            let status = child.0.try_wait().ok().flatten();
            panic!(
                "unexpected edgecache output {line:?} (exit: {status:?}); stderr:\n{}",
                stderr()
            );
        };
        Edgecache {
            child,
            addr,
            ops,
            stderr_path,
            _stdout: stdout,
        }
    }

    /// The operator listener's address; panics when it is off.
    pub fn ops(&self) -> SocketAddr {
        self.ops.expect("OPS_LISTEN_ADDR is off")
    }

    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.0.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed: {status}");
    }

    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Sends SIGTERM and waits (up to 5 s) until the proxy's listener refuses connections:
    /// the signal has been handled and the daemon is draining.
    pub async fn terminate_and_stop_accepting(&self) {
        self.terminate();
        let addr = self.addr;
        assert!(
            super::eventually(Duration::from_secs(5), || std::net::TcpStream::connect(
                addr
            )
            .is_err())
            .await,
            "edgecache still accepts connections 5 s after SIGTERM"
        );
    }
}

/// Reads one line on a thread of its own, waiting at most `within`; `None` on a timeout, or
/// at EOF (the process exited) with nothing read. Gives the reader back to keep the pipe open.
async fn read_line_within<R: BufRead + Send + 'static>(
    mut reader: R,
    within: Duration,
) -> (Option<R>, Option<String>) {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let read = reader.read_line(&mut line);
        let _ = tx.send((reader, read.map(|_| line)));
    });
    match tokio::time::timeout(within, rx).await {
        Ok(Ok((reader, Ok(line)))) if !line.is_empty() => (Some(reader), Some(line)),
        Ok(Ok((reader, _))) => (Some(reader), None),
        _ => (None, None),
    }
}

/// The `mock-origin` binary on an ephemeral port.
pub struct MockOrigin {
    pub url: String,
    pub addr: SocketAddr,
    _child: Guard,
    _stdout: BufReader<ChildStdout>,
}

impl MockOrigin {
    pub fn start() -> MockOrigin {
        let mut cmd = Command::new(MOCK_ORIGIN);
        cmd.args(["--listen", "127.0.0.1:0"])
            .env_clear()
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = Guard::spawn("mock-origin", cmd);
        // It prints its address once bound; EOF (it exited) makes the line empty.
        let mut stdout = BufReader::new(child.0.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let url = line
            .trim()
            .strip_prefix("mock-origin listening on ")
            .unwrap_or_else(|| panic!("unexpected mock-origin output: {line:?}"))
            .to_owned();
        let addr = url.strip_prefix("http://").unwrap().parse().unwrap();
        MockOrigin {
            url,
            addr,
            _child: child,
            _stdout: stdout,
        }
    }

    /// How many requests for `path_and_query` the origin has received.
    pub async fn stats(&self, path_and_query: &str) -> usize {
        let encoded: String = path_and_query
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => {
                    char::from(b).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let got = get(self.addr, &format!("/stats?path={encoded}"), &[]).await;
        assert_eq!(got.status, 200, "{got:?}");
        got.text().trim().parse().unwrap()
    }
}

impl MockOrigin {
    /// Polls [`MockOrigin::stats`] (every 10 ms, up to [`DEADLINE`]) until `path_and_query`
    /// has arrived `n` times; panics if it has not by then.
    pub async fn wait_for(&self, path_and_query: &str, n: usize) {
        let deadline = Instant::now() + DEADLINE;
        while self.stats(path_and_query).await < n {
            assert!(
                Instant::now() < deadline,
                "{path_and_query} did not reach the origin {n} times within {DEADLINE:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// What a process that ran to its end printed, and how it ended.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Runs `cmd` (stdout and stderr into files in `dir`) and waits up to [`DEADLINE`] for it
/// to exit; panics if it is still running then (it is killed).
pub fn run_to_exit(dir: &TempDir, name: &str, mut cmd: Command) -> Finished {
    let (out, err) = (dir.path.join("stdout.txt"), dir.path.join("stderr.txt"));
    cmd.stdin(Stdio::null())
        .stdout(fs::File::create(&out).unwrap())
        .stderr(fs::File::create(&err).unwrap());
    let mut child = Guard::spawn(name, cmd);
    let status = child.wait_exit(DEADLINE).unwrap_or_else(|| {
        panic!(
            "{name} still running after {DEADLINE:?}; stderr:\n{}",
            fs::read_to_string(&err).unwrap_or_default()
        )
    });
    Finished {
        status,
        stdout: fs::read_to_string(&out).unwrap(),
        stderr: fs::read_to_string(&err).unwrap(),
    }
}

/// A child process that is killed (SIGKILL) and reaped when dropped, if still running.
pub struct Guard(pub Child);

impl Guard {
    pub fn spawn(name: &str, mut cmd: Command) -> Guard {
        Guard(
            cmd.spawn()
                .unwrap_or_else(|e| panic!("cannot start {name}: {e}")),
        )
    }

    /// Polls for the exit status until `within` passes; `None` if still running.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A uniquely named directory under the system temp dir, removed on drop.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicUsize = AtomicUsize::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos();
        let path = std::env::temp_dir().join(format!(
            "edgecache-{tag}-{}-{nanos}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&path).unwrap();
        TempDir { path }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}
