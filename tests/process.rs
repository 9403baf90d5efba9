//! The real `edgecache` binary as a process: exit codes and messages for bad configuration,
//! `.env` handling, and signal-driven graceful shutdown. The origin is the real `mock-origin`
//! binary. Everything listens on ephemeral loopback ports; every child is killed on drop.

mod common;

use std::fs;
use std::net::TcpListener;
use std::time::{Duration, Instant};

use common::get;
use common::process::*;
use tokio::io::AsyncWriteExt;

/// Runs `edgecache` with `env` and asserts it stops before serving: exit code 2 and exactly one
/// stderr line that names `variable`, never a panic. Returns that line.
fn assert_refused(dir: &TempDir, env: &[(&str, &str)], variable: &str) -> String {
    assert_refused_with(dir, env, &[], variable)
}

/// [`assert_refused`] with command-line arguments.
fn assert_refused_with(
    dir: &TempDir,
    env: &[(&str, &str)],
    args: &[&str],
    variable: &str,
) -> String {
    let mut cmd = edgecache_cmd(&dir.path, env);
    cmd.args(args);
    let Finished {
        status,
        stdout,
        stderr,
    } = run_to_exit(dir, "edgecache", cmd);
    assert_eq!(
        status.code(),
        Some(2),
        "{env:?} {args:?}: {status}; stderr:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{env:?}: panic:\n{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "{env:?} {args:?}: want one stderr line, got:\n{stderr}"
    );
    assert!(
        lines[0].contains(variable),
        "{env:?} {args:?}: the message should name {variable}: {}",
        lines[0]
    );
    assert_eq!(stdout, "", "{env:?} {args:?}: nothing on stdout");
    stderr
}

/// A bad setting stops the daemon before it serves anything: exit code 2 and exactly one
/// stderr line that names the offending variable, never a panic. Covers a missing
/// `UPSTREAM_URL`, unparseable `REQ_TIMEOUT`, `LOG_FORMAT` and `LISTEN_ADDR`, a `LISTEN_ADDR`
/// that cannot be bound because the port is taken, counts and sizes out of range, and
/// `CACHE_MAX_OBJECT_BYTES` above `CACHE_MAX_BYTES`.
#[test]
fn bad_config_exits_2_with_one_line_naming_the_variable() {
    let dir = TempDir::new("badcfg");
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    let upstream = ("UPSTREAM_URL", "http://127.0.0.1:9");
    // LISTEN_ADDR is loopback/ephemeral in every case, so a daemon that wrongly starts
    // serving binds nothing public.
    let listen = ("LISTEN_ADDR", "127.0.0.1:0");
    let cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
        ("UPSTREAM_URL", vec![listen]),
        (
            "REQ_TIMEOUT",
            vec![listen, upstream, ("REQ_TIMEOUT", "abc")],
        ),
        ("LOG_FORMAT", vec![listen, upstream, ("LOG_FORMAT", "yaml")]),
        ("LISTEN_ADDR", vec![upstream, ("LISTEN_ADDR", "nonsense")]),
        (
            "LISTEN_ADDR",
            vec![upstream, ("LISTEN_ADDR", taken_addr.as_str())],
        ),
        (
            "MAX_CONNECTIONS",
            vec![listen, upstream, ("MAX_CONNECTIONS", "0")],
        ),
        (
            "CACHE_MAX_BYTES",
            vec![listen, upstream, ("CACHE_MAX_BYTES", "2048GiB")],
        ),
        (
            "CACHE_MAX_OBJECT_BYTES",
            vec![
                listen,
                upstream,
                ("CACHE_MAX_BYTES", "1MiB"),
                ("CACHE_MAX_OBJECT_BYTES", "2MiB"),
            ],
        ),
    ];
    for (variable, env) in cases {
        assert_refused(&dir, &env, variable);
    }
    drop(taken);
}

/// Every duration setting, with the value that used to panic (`1e19` overflowed an
/// `Instant`), a negative, an infinite and a NaN value: exit 2 and one line naming it.
/// The list is checked against `.env.example`, so a new duration setting must join it.
#[test]
fn absurd_durations_exit_2_with_one_line_naming_the_variable() {
    const DURATIONS: [&str; 14] = [
        "DEFAULT_CACHE_EXPIRY_TIME_SECS",
        "DEFAULT_REFRESH_WINDOW_SECS",
        "REQ_TIMEOUT",
        "SHUTDOWN_GRACE_SECS",
        "STALE_RETENTION_SECS",
        "STALE_IF_ERROR_SECS",
        "CONNECT_TIMEOUT_SECS",
        "HEALTH_CHECK_INTERVAL_SECS",
        "HEALTH_CHECK_TIMEOUT_SECS",
        "BREAKER_COOLDOWN_SECS",
        "UPSTREAM_IDLE_TIMEOUT_SECS",
        "HEADER_READ_TIMEOUT_SECS",
        "KEEPALIVE_TIMEOUT_SECS",
        "JOBS_MAX_AGE_SECS",
    ];
    for name in include_str!("../.env.example")
        .lines()
        .map(|l| l.trim_start_matches('#').trim_start())
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .filter(|k| k.ends_with("_SECS") || *k == "REQ_TIMEOUT")
    {
        assert!(DURATIONS.contains(&name), "{name} is not tested here");
    }
    let dir = TempDir::new("absurd");
    for name in DURATIONS {
        for value in ["1e19", "-1", "inf", "NaN"] {
            let env = [
                ("LISTEN_ADDR", "127.0.0.1:0"),
                ("UPSTREAM_URL", "http://127.0.0.1:9"),
                (name, value),
            ];
            assert_refused(&dir, &env, name);
        }
    }
}

/// An upstream URL with `user:password@` is refused, and the password is not printed.
#[test]
fn upstream_credentials_are_refused_without_printing_them() {
    let dir = TempDir::new("creds");
    let listen = ("LISTEN_ADDR", "127.0.0.1:0");
    for (variable, url) in [
        ("UPSTREAM_URL", "http://user:s3cret@127.0.0.1:9"),
        (
            "UPSTREAM_URLS",
            "http://127.0.0.1:9, http://user:s3cret@127.0.0.1:10 weight=2",
        ),
    ] {
        let line = assert_refused(&dir, &[listen, (variable, url)], variable);
        assert!(!line.contains("s3cret"), "the password was printed: {line}");
        assert!(line.contains("credentials"), "{line}");
    }
}

/// A `.env` line that cannot be parsed stops the daemon with one line that names the
/// setting but does not quote the file: after an unclosed quote, the rest of the file (secrets
/// included) would otherwise be printed.
#[test]
fn an_unparseable_dotenv_line_is_not_printed() {
    let dir = TempDir::new("dotenv-bad");
    fs::write(
        dir.path.join(".env"),
        "LISTEN_ADDR=127.0.0.1:0\n\
         CLEAR_CACHE_KEY='s3cret\n\
         UPSTREAM_URL=http://user:pa55@127.0.0.1:9\n",
    )
    .unwrap();
    let line = assert_refused(&dir, &[], "CLEAR_CACHE_KEY");
    assert!(line.contains(".env"), "{line}");
    for secret in ["s3cret", "pa55"] {
        assert!(!line.contains(secret), "a secret was printed: {line}");
    }
}

/// With every duration, count and size at the top of its range, the daemon starts and serves
/// (none of the deadlines it computes overflows).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn largest_settings_start_and_serve() {
    let origin = MockOrigin::start();
    let dir = TempDir::new("largest");
    let (day, year) = ("86400", "31536000");
    let env = [
        ("UPSTREAM_URL", origin.url.as_str()),
        ("DEFAULT_CACHE_EXPIRY_TIME_SECS", year),
        ("DEFAULT_REFRESH_WINDOW_SECS", year),
        ("STALE_RETENTION_SECS", year),
        ("STALE_IF_ERROR_SECS", year),
        ("REQ_TIMEOUT", day),
        ("SHUTDOWN_GRACE_SECS", day),
        ("CONNECT_TIMEOUT_SECS", day),
        ("HEALTH_CHECK_INTERVAL_SECS", day),
        ("HEALTH_CHECK_TIMEOUT_SECS", day),
        ("BREAKER_COOLDOWN_SECS", day),
        ("UPSTREAM_IDLE_TIMEOUT_SECS", day),
        ("HEADER_READ_TIMEOUT_SECS", day),
        ("KEEPALIVE_TIMEOUT_SECS", day),
        ("HEALTH_CHECK_FAILURE_THRESHOLD", "1000"),
        ("HEALTH_CHECK_RECOVERY_THRESHOLD", "1000"),
        ("BREAKER_FAILURE_THRESHOLD", "1000000"),
        ("UPSTREAM_MAX_IDLE_PER_HOST", "100000"),
        ("MAX_CONNECTIONS", "1000000"),
        ("CACHE_MAX_BYTES", "1TiB"),
        ("CACHE_MAX_OBJECT_BYTES", "1TiB"),
        ("MAX_HEADER_BYTES", "1MiB"),
        ("MAX_REQUEST_BODY_BYTES", "1TiB"),
    ];
    let proxy = Edgecache::start(&dir, &env).await;
    let addr = proxy.addr;
    for cache in ["MISS", "HIT"] {
        let got = get(addr, "/data?id=largest", &[]).await;
        assert_eq!(got.status, 200, "{got:?}; stderr:\n{}", proxy.stderr());
        assert_eq!(got.cache(), cache, "{got:?}");
    }
    assert!(!proxy.stderr().contains("panicked"), "{}", proxy.stderr());
}

/// `.env` in the working directory is read, and a real environment variable wins over it:
/// `.env` sets `UPSTREAM_URL` (the mock origin) and `LISTEN_ADDR` on 127.0.0.2, the
/// environment `LISTEN_ADDR` on 127.0.0.1. The daemon listens on the environment's address,
/// and a request through it reaches the upstream named in `.env`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dotenv_is_read_and_the_environment_wins() {
    let origin = MockOrigin::start();
    let dir = TempDir::new("dotenv");
    fs::write(
        dir.path.join(".env"),
        format!(
            "# written by tests/process.rs\n\
             UPSTREAM_URL={}\n\
             LISTEN_ADDR=127.0.0.2:0\n\
             SHUTDOWN_GRACE_SECS=1\n",
            origin.url
        ),
    )
    .unwrap();
    let mut proxy = Edgecache::start(&dir, &[("LISTEN_ADDR", "127.0.0.1:0")]).await;
    assert_eq!(
        proxy.addr.ip(),
        std::net::Ipv4Addr::LOCALHOST,
        "the .env LISTEN_ADDR must not be used when the environment sets one"
    );

    let got = get(proxy.addr, "/health-check", &[]).await;
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(got.text(), "ok");
    assert_eq!(got.cache(), "MISS", "served by edgecache: {got:?}");
    assert_eq!(
        origin.stats("/health-check").await,
        1,
        "the request reached the .env upstream"
    );
    proxy.terminate();
    let status = proxy
        .child
        .wait_exit(DEADLINE)
        .expect("edgecache exits on SIGTERM");
    assert!(status.success(), "{status}; stderr:\n{}", proxy.stderr());
}

/// SIGTERM drains: a request already in flight (the origin is still sleeping on it) completes
/// with 200, the listening socket closes at once so new connections are refused, and the
/// process exits 0 well within `SHUTDOWN_GRACE_SECS`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_in_flight_requests_then_exits_0() {
    let origin = MockOrigin::start();
    let dir = TempDir::new("graceful");
    let env = [
        ("UPSTREAM_URL", origin.url.as_str()),
        ("SHUTDOWN_GRACE_SECS", "10"),
    ];
    let mut proxy = Edgecache::start(&dir, &env).await;
    let addr = proxy.addr;

    let slow_path = "/data?id=slow&delay_ms=1500";
    let slow = tokio::spawn(get(addr, slow_path, &[]));
    // The origin counts the request before sleeping: once it is counted, it is in flight.
    origin.wait_for(slow_path, 1).await;
    let signalled = Instant::now();
    // New connections are refused soon after the signal.
    proxy.terminate_and_stop_accepting().await;

    let got = tokio::time::timeout(DEADLINE, slow)
        .await
        .expect("the in-flight request completes")
        .expect("client task");
    assert_eq!(got.status, 200, "{got:?}");
    assert!(got.text().contains("\"id\":\"slow\""), "{}", got.text());

    let status = proxy
        .child
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("no exit within the 10 s grace; stderr:\n{}", proxy.stderr()));
    assert_eq!(
        status.code(),
        Some(0),
        "{status}; stderr:\n{}",
        proxy.stderr()
    );
    assert!(
        signalled.elapsed() < Duration::from_secs(10),
        "exited after {:?}",
        signalled.elapsed()
    );
    assert!(!proxy.stderr().contains("panicked"), "{}", proxy.stderr());
}

/// A second SIGTERM during a long drain ends the process at once (non-zero), instead of
/// waiting for the in-flight request or the grace period.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_sigterm_during_drain_exits_at_once() {
    let origin = MockOrigin::start();
    let dir = TempDir::new("second-signal");
    let env = [
        ("UPSTREAM_URL", origin.url.as_str()),
        ("SHUTDOWN_GRACE_SECS", "60"),
        ("REQ_TIMEOUT", "60"),
    ];
    let mut proxy = Edgecache::start(&dir, &env).await;
    let addr = proxy.addr;

    // Raw TCP, kept open to the end: the request stays in flight however the process ends.
    let slow_path = "/data?id=stuck&delay_ms=30000";
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!("GET {slow_path} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    slow.write_all(head.as_bytes()).await.unwrap();
    origin.wait_for(slow_path, 1).await;
    // The listener closes once the first signal has been handled: now it is draining.
    proxy.terminate_and_stop_accepting().await;
    assert!(
        proxy.child.0.try_wait().unwrap().is_none(),
        "exited before draining"
    );

    let signalled = Instant::now();
    proxy.terminate();
    let status = proxy
        .child
        .wait_exit(Duration::from_secs(5))
        .unwrap_or_else(|| panic!("still running 5 s after a second SIGTERM"));
    assert!(
        !status.success(),
        "a cut-short drain should not report success: {status}"
    );
    assert!(signalled.elapsed() < Duration::from_secs(5));
    assert!(!proxy.stderr().contains("panicked"), "{}", proxy.stderr());
    drop(slow);
}

/// The mock origin's JSON bodies escape what a client controls: an id, a header value and a
/// request path holding `"` and `\` come back intact from `/data`, `/echo` and `/stats`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_origin_json_escapes_quotes_and_backslashes() {
    let origin = MockOrigin::start();
    let parse = |got: common::Got| -> serde_json::Value {
        assert_eq!(got.status, 200, "{got:?}");
        assert_eq!(got.header("content-type"), Some("application/json"));
        serde_json::from_str(&got.text()).unwrap_or_else(|e| panic!("{e}: {}", got.text()))
    };
    let data = parse(get(origin.addr, "/data?id=a%22b%5Cc", &[]).await);
    assert_eq!(data["id"], "a\"b\\c");
    assert_eq!(data["updated_at"], 1);
    assert_eq!(data["value"], "a\"b\\c at version 1");

    let echo = parse(get(origin.addr, "/echo", &[("x-quote", "say \"hi\" \\o/")]).await);
    assert_eq!(echo["method"], "GET");
    assert_eq!(echo["uri"], "/echo");
    assert_eq!(echo["headers"]["x-quote"], "say \"hi\" \\o/");
    assert_eq!(echo["body_len"], 0);
    // A raw `"` and `\` are valid in a request path (the origin answers 404 but counts it).
    assert_eq!(get(origin.addr, "/a\"b\\c", &[]).await.status, 404);

    let stats = parse(get(origin.addr, "/stats", &[]).await);
    assert_eq!(stats["by_path"]["/data?id=a%22b%5Cc"], 1, "{stats}");
    assert_eq!(stats["by_path"]["/a\"b\\c"], 1, "{stats}");
    assert_eq!(stats["total"], 3, "{stats}");
}

/// Every setting's name: `config::SETTINGS`, which a unit test in config.rs keeps equal to
/// the uncommented `NAME=` lines of `.env.example`, in order.
fn env_example_settings() -> Vec<&'static str> {
    edgecache::config::SETTINGS.iter().map(|s| s.name).collect()
}

/// `edgecache --help` exits 0 without starting, and lists every setting of `.env.example`
/// as a flag (the lower-kebab form of its variable) and as its variable, with `--check`.
#[test]
fn help_lists_every_setting() {
    let dir = TempDir::new("help");
    let mut cmd = edgecache_cmd(&dir.path, &[("CLEAR_CACHE_KEY", "s3cret")]);
    cmd.arg("--help");
    let done = run_to_exit(&dir, "edgecache", cmd);
    assert!(done.status.success(), "{done:?}");
    let settings = env_example_settings();
    assert!(settings.len() > 30, "{settings:?}");
    for name in settings {
        let flag = format!("--{} <VALUE>", name.to_ascii_lowercase().replace('_', "-"));
        assert!(
            done.stdout.contains(&flag),
            "{flag} missing:\n{}",
            done.stdout
        );
        let env = format!("[env: {name}]");
        assert!(
            done.stdout.contains(&env),
            "{env} missing:\n{}",
            done.stdout
        );
    }
    for text in ["--check", "--version", "[default: 10]", "[default: 256MiB]"] {
        assert!(
            done.stdout.contains(text),
            "{text} missing:\n{}",
            done.stdout
        );
    }
    assert!(!done.stdout.contains("s3cret"), "{}", done.stdout);
}

/// `--version` prints the name and version and exits 0; an unknown flag is clap's usage
/// error, exit 2, before any configuration is read.
#[test]
fn version_and_unknown_flags() {
    let dir = TempDir::new("version");
    let mut cmd = edgecache_cmd(&dir.path, &[]);
    cmd.arg("--version");
    let done = run_to_exit(&dir, "edgecache", cmd);
    assert!(done.status.success(), "{done:?}");
    assert_eq!(
        done.stdout,
        format!("edgecache {}\n", env!("CARGO_PKG_VERSION"))
    );

    let mut cmd = edgecache_cmd(&dir.path, &[("UPSTREAM_URL", "http://127.0.0.1:9")]);
    cmd.arg("--upstream");
    let done = run_to_exit(&dir, "edgecache", cmd);
    assert_eq!(done.status.code(), Some(2), "{done:?}");
    assert!(done.stderr.contains("--upstream"), "{done:?}");
}

/// `--check` with the predecessor's `.env`: exit 0, every setting as `KEY=value` (defaults
/// filled in, the admin key redacted), then `configuration ok`; nothing is served.
#[test]
fn check_prints_the_effective_settings() {
    let dir = TempDir::new("check-ok");
    fs::write(
        dir.path.join(".env"),
        "DEFAULT_CACHE_EXPIRY_TIME_SECS=2\n\
         DEFAULT_REFRESH_WINDOW_SECS=60\n\
         REQ_TIMEOUT=2\n\
         UPSTREAM_URL=http://host.docker.internal:3006\n\
         CLEAR_CACHE_KEY=Secret\n",
    )
    .unwrap();
    let mut cmd = edgecache_cmd(&dir.path, &[]);
    cmd.arg("--check");
    let done = run_to_exit(&dir, "edgecache", cmd);
    assert!(done.status.success(), "{done:?}");
    assert_eq!(done.stderr, "", "{done:?}");
    let lines: Vec<&str> = done.stdout.lines().collect();
    assert_eq!(lines.last(), Some(&"configuration ok"), "{}", done.stdout);
    let names: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .collect();
    assert_eq!(names, env_example_settings(), "{}", done.stdout);
    for line in [
        "UPSTREAM_URL=http://host.docker.internal:3006",
        "REQ_TIMEOUT=2",
        "CLEAR_CACHE_KEY=<redacted>",
        "CACHE_MAX_BYTES=256MiB",
        // edgecache_cmd's test settings, from the environment.
        "LISTEN_ADDR=127.0.0.1:0",
        "OPS_LISTEN_ADDR=127.0.0.1:0",
        "HEALTH_CHECK_INTERVAL_SECS=0",
    ] {
        assert!(lines.contains(&line), "{line} missing:\n{}", done.stdout);
    }
    assert!(!done.stdout.contains("Secret"), "{}", done.stdout);
}

/// `--check` with an invalid setting: exit 2 and the one-line error, as when starting.
#[test]
fn check_refuses_a_bad_setting() {
    let dir = TempDir::new("check-bad");
    let env = [
        ("UPSTREAM_URL", "http://127.0.0.1:9"),
        ("CACHE_MAX_BYTES", "lots"),
    ];
    let checked = assert_refused_with(&dir, &env, &["--check"], "CACHE_MAX_BYTES");
    let started = assert_refused(&dir, &env, "CACHE_MAX_BYTES");
    assert_eq!(checked, started);
}

/// A flag wins over the environment and `.env`, and is validated exactly like the variable:
/// the same one-line error naming the variable, exit 2.
#[test]
fn a_flag_overrides_the_environment() {
    let dir = TempDir::new("flags");
    fs::write(dir.path.join(".env"), "MAX_CONNECTIONS=7\n").unwrap();
    let env = [
        ("UPSTREAM_URL", "http://127.0.0.1:9"),
        ("REQ_TIMEOUT", "abc"),
    ];
    let mut cmd = edgecache_cmd(&dir.path, &env);
    cmd.args(["--check", "--req-timeout", "2.5", "--max-connections=9"]);
    let done = run_to_exit(&dir, "edgecache", cmd);
    assert!(done.status.success(), "{done:?}");
    for line in ["REQ_TIMEOUT=2.5", "MAX_CONNECTIONS=9"] {
        assert!(
            done.stdout.lines().any(|l| l == line),
            "{line}:\n{}",
            done.stdout
        );
    }

    let env = [("UPSTREAM_URL", "http://127.0.0.1:9")];
    let from_env = assert_refused(&dir, &[env[0], ("REQ_TIMEOUT", "-1")], "REQ_TIMEOUT");
    let from_flag = assert_refused_with(&dir, &env, &["--req-timeout", "-1"], "REQ_TIMEOUT");
    assert_eq!(from_flag, from_env);
    let from_flag = assert_refused_with(
        &dir,
        &[env[0], ("REQ_TIMEOUT", "5")],
        &["--req-timeout=-1"],
        "REQ_TIMEOUT",
    );
    assert_eq!(from_flag, from_env);
}

/// `mock-origin --help` describes `--listen` and the routes, and exits 0 without listening.
#[test]
fn mock_origin_help() {
    let dir = TempDir::new("mock-help");
    let mut cmd = std::process::Command::new(MOCK_ORIGIN);
    cmd.env_clear().arg("--help");
    let done = run_to_exit(&dir, "mock-origin", cmd);
    assert!(done.status.success(), "{done:?}");
    for text in [
        "--listen <ADDR>",
        "MOCK_ORIGIN_ADDR",
        "/data?id=X",
        "/stats",
    ] {
        assert!(done.stdout.contains(text), "{text}:\n{}", done.stdout);
    }
    assert!(
        !done.stdout.starts_with("mock-origin listening"),
        "{}",
        done.stdout
    );
}

/// With port 0 the daemon reports the ports it bound, on stdout (read by the harness) and in
/// its `edgecache listening` log line (text and JSON); `OPS_LISTEN_ADDR=off` shows as off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bound_ports_are_reported() {
    let dir = TempDir::new("ports");
    let upstream = ("UPSTREAM_URL", "http://127.0.0.1:9");
    let proxy = Edgecache::start(&dir, &[upstream]).await;
    let (addr, ops) = (proxy.addr, proxy.ops());
    assert_ne!(addr.port(), 0);
    assert_ne!(ops.port(), 0);
    assert_eq!(get(ops, "/health", &[]).await.text(), "ok\n");
    assert_eq!(get(addr, "/x", &[]).await.status, 502, "the proxy answers");
    let log = strip_ansi(&proxy.stderr());
    let line = log
        .lines()
        .find(|l| l.contains("edgecache listening"))
        .unwrap_or_else(|| panic!("no listening line in\n{log}"));
    assert!(line.contains(&format!("listen={addr} ")), "{line}");
    assert!(line.contains(&format!("ops_listen={ops} ")), "{line}");
    drop(proxy);

    let env = [upstream, ("OPS_LISTEN_ADDR", "off"), ("LOG_FORMAT", "json")];
    let proxy = Edgecache::start(&dir, &env).await;
    assert_eq!(proxy.ops, None);
    let log = proxy.stderr();
    let line = log
        .lines()
        .find(|l| l.contains("edgecache listening"))
        .unwrap_or_else(|| panic!("no listening line in\n{log}"));
    let json: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(json["listen"], proxy.addr.to_string(), "{line}");
    assert_eq!(json["ops_listen"], "off", "{line}");
}

/// The text without ANSI colour sequences (`ESC [ ... m`).
fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}
