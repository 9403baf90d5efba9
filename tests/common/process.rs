//! The real binaries as child processes: `edgecache` started with a clean environment in its
//! own directory, the `mock-origin` binary, and guards that kill and reap them on drop.

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
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
/// it can read is one the test wrote there).
pub fn edgecache_cmd(dir: &Path, env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(EDGECACHE);
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        // Tests run in parallel: no fixed operator port (a test may still set one).
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
    stderr_path: PathBuf,
}

impl Edgecache {
    /// Starts it and polls until `addr` accepts connections.
    pub async fn start(dir: &TempDir, env: &[(&str, &str)], addr: SocketAddr) -> Edgecache {
        let stderr_path = dir.path.join("edgecache.stderr");
        let mut cmd = edgecache_cmd(&dir.path, env);
        cmd.stdout(Stdio::null())
            .stderr(fs::File::create(&stderr_path).unwrap());
        let mut proxy = Edgecache {
            child: Guard::spawn("edgecache", cmd),
            stderr_path,
        };
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = proxy.child.0.try_wait().unwrap() {
                panic!(
                    "edgecache exited at startup ({status}); stderr:\n{}",
                    proxy.stderr()
                );
            }
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return proxy;
            }
            assert!(
                Instant::now() < deadline,
                "edgecache did not listen on {addr} within {DEADLINE:?}; stderr:\n{}",
                proxy.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
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

/// A free loopback port: bind port 0, note the port, release it.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
