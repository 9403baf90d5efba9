//! Issue 13, first slice: fleet mode on Redis. Real `edgecache` processes share a real
//! `redis-server` as a second tier (L2) behind each one's in-memory cache (L1), in front of an
//! in-test origin that counts what reaches it. Everything is on 127.0.0.1; nothing waits a
//! fixed time: tests wait on events or poll with a deadline, and each is bounded by
//! [`TEST_TIMEOUT`].
//!
//! What is assumed of the daemon (the contract these tests pin down):
//! - `REDIS_URL` (`redis://127.0.0.1:PORT`) turns the tier on; unset, nothing changes.
//!   `REDIS_TIMEOUT_MS` (default 50) bounds each Redis operation on the request path;
//!   `REDIS_MAX_OBJECT_BYTES` (default 1MiB): larger responses stay L1-only.
//! - An L1 miss looks in Redis before going upstream; a copy found there is served with
//!   `X-Cache-Status: HIT` and `Cache-Status: edgecache; hit; detail=redis`. A response
//!   stored in L1 is written to Redis shortly after.
//! - Redis down or slow never fails a request; a breaker takes it out of the path.
//! - `/metrics` on the operator listener: `edgecache_redis_requests_total{op, result}` with
//!   op `get`/`set` and result `hit`/`miss`/`ok`/`error`/`skipped`, and the gauge
//!   `edgecache_redis_breaker_open` (0/1).
//!
//! The host is part of the cache key, so every request here sends the same `Host`
//! ([`HOST`]): otherwise each instance (each on its own port) would key `/k` differently.

mod common;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::process::{Edgecache, TempDir, DEADLINE};
use common::redis::{RedisCluster, RedisServer, TlsFiles};
use common::{get, reply, Got, Origin};

/// The `Host` every request sends, whichever instance it goes to.
const HOST: &str = "fleet.example";

/// Every test finishes within this or fails (a hang is a failure, not a stuck CI job).
const TEST_TIMEOUT: Duration = Duration::from_secs(120);

/// How long an asynchronous Redis write may take to show up.
const WRITE_DEADLINE: Duration = Duration::from_secs(10);

/// Size of the body of `/large*` paths.
const LARGE: usize = 4096;

/// Runs a test body under [`TEST_TIMEOUT`].
async fn bounded<F: Future>(test: F) -> F::Output {
    tokio::time::timeout(TEST_TIMEOUT, test)
        .await
        .unwrap_or_else(|_| panic!("test did not finish within {TEST_TIMEOUT:?}"))
}

/// The origin: every response is numbered by arrival (`#N`, counted over all paths), so two
/// copies of one path fetched separately differ. Paths:
/// - `/private*`: `Cache-Control: private, max-age=60`;
/// - `/nostore*`: `Cache-Control: no-store`;
/// - `/cookie*`: `max-age=60` with `Set-Cookie`;
/// - `/large*`: `max-age=60`, a body of [`LARGE`] bytes;
/// - anything else: `max-age=60`.
///
/// Uncacheable bodies carry `SECRET-<path>` so a test can look for them in Redis.
async fn fleet_origin() -> Origin {
    let n = Arc::new(AtomicUsize::new(0));
    let hung: Arc<std::sync::Mutex<std::collections::HashSet<String>>> = Arc::default();
    Origin::start(move |req| {
        let v = n.fetch_add(1, Ordering::SeqCst) + 1;
        let path = req.uri().path().to_owned();
        // `/hang…`: the first request for the path never gets an answer.
        let hang = path.starts_with("/hang") && hung.lock().unwrap().insert(path.clone());
        async move {
            let cacheable = [("cache-control", "max-age=60")];
            if hang {
                std::future::pending::<()>().await;
            }
            if path.starts_with("/slow") {
                // An origin that takes its time (not a synchronisation: the herd is formed
                // before the requests are sent, see the test).
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            if path.starts_with("/private") {
                let h = [("cache-control", "private, max-age=60")];
                reply(200, &h, format!("SECRET-{path} #{v}"))
            } else if path.starts_with("/nostore") {
                reply(
                    200,
                    &[("cache-control", "no-store")],
                    format!("SECRET-{path} #{v}"),
                )
            } else if path.starts_with("/cookie") {
                let h = [
                    ("cache-control", "max-age=60"),
                    ("set-cookie", "session=SECRET-cookie"),
                ];
                reply(200, &h, format!("SECRET-{path} #{v}"))
            } else if path.starts_with("/hot") {
                reply(
                    200,
                    &[("cache-control", "max-age=10")],
                    format!("{path} #{v}"),
                )
            } else if path.starts_with("/big") {
                let mut body = format!("{path} #{v} ").into_bytes();
                body.resize(64 << 10, b'x');
                reply(200, &cacheable, body)
            } else if path.starts_with("/large") {
                let mut body = format!("{path} #{v} ").into_bytes();
                body.resize(LARGE, b'x');
                reply(200, &cacheable, body)
            } else {
                reply(200, &cacheable, format!("{path} #{v}"))
            }
        }
    })
    .await
}

/// One `edgecache` process of the fleet, in its own directory.
struct Node {
    name: &'static str,
    proc: Edgecache,
    _dir: TempDir,
}

impl Node {
    /// Starts an instance in front of `origin`, with `REDIS_URL=redis` when given, and `env`
    /// on top. No background refreshes (`DEFAULT_REFRESH_WINDOW_SECS=0`): the origin sees
    /// only what the test's requests cause.
    async fn start(
        name: &'static str,
        origin: &Origin,
        redis: Option<&str>,
        env: &[(&str, &str)],
    ) -> Node {
        let dir = TempDir::new(&format!("fleet-{name}"));
        let upstream = origin.url();
        let mut vars: Vec<(&str, &str)> = vec![
            ("UPSTREAM_URL", upstream.as_str()),
            ("DEFAULT_REFRESH_WINDOW_SECS", "0"),
            ("REQ_TIMEOUT", "10"),
            ("SHUTDOWN_GRACE_SECS", "2"),
            // Generous Redis timeouts: these tests check the fleet's coordination, which a
            // loaded CI machine must not turn into timeouts (the default 50 ms is tested on
            // its own, in `redis_timeouts_are_short`).
            ("REDIS_TIMEOUT_MS", "2000"),
        ];
        if let Some(url) = redis {
            vars.push(("REDIS_URL", url));
        }
        vars.extend_from_slice(env);
        let proc = Edgecache::start(&dir, &vars).await;
        Node {
            name,
            proc,
            _dir: dir,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.proc.addr
    }

    /// `GET path` with `Host: fleet.example`; asserts nothing.
    async fn get(&self, path: &str) -> Got {
        get(self.addr(), path, &[("host", HOST)]).await
    }

    /// `GET path`, asserting a 200 (showing the daemon's stderr otherwise).
    async fn get_ok(&self, path: &str) -> Got {
        let got = self.get(path).await;
        assert_eq!(
            got.status,
            200,
            "{} GET {path}: {got:?}; stderr:\n{}",
            self.name,
            self.proc.stderr()
        );
        got
    }

    /// An admin `Clear-Cache` of `path` (the instance must have `CLEAR_CACHE_KEY=sekret`).
    async fn purge(&self, path: &str) -> Got {
        common::send(
            "POST",
            self.addr(),
            path,
            &[
                ("host", HOST),
                ("clear-cache", "true"),
                ("clear-cache-key", "sekret"),
            ],
            bytes::Bytes::new(),
        )
        .await
    }

    /// The `/metrics` text from the operator listener.
    async fn metrics(&self) -> String {
        let got = get(self.proc.ops(), "/metrics", &[]).await;
        assert_eq!(got.status, 200, "{} /metrics: {got:?}", self.name);
        got.text()
    }

    /// `edgecache_redis_requests_total{op="OP",result="RESULT"}`; 0 when absent.
    async fn redis_requests(&self, op: &str, result: &str) -> f64 {
        series(&self.metrics().await, &redis_series(op, result)).unwrap_or(0.0)
    }

    /// `edgecache_redis_breaker_open`; 0 when absent.
    async fn breaker_open(&self) -> f64 {
        series(&self.metrics().await, "edgecache_redis_breaker_open").unwrap_or(0.0)
    }

    /// Waits until this instance has written `n` entries to Redis
    /// (`op="set",result="ok"` ≥ n), at most [`WRITE_DEADLINE`].
    async fn wait_writes(&self, n: f64, redis: &RedisServer) {
        let ok = until(WRITE_DEADLINE, || async {
            self.redis_requests("set", "ok").await >= n
        })
        .await;
        assert!(
            ok,
            "{}: fewer than {n} Redis writes (set ok) within {WRITE_DEADLINE:?}; \
             redis keys: {:?}\nmetrics:\n{}\nstderr:\n{}",
            self.name,
            redis.keys("*"),
            redis_lines(&self.metrics().await),
            self.proc.stderr()
        );
    }

    fn assert_no_panic(&self) {
        let stderr = self.proc.stderr();
        assert!(
            !stderr.contains("panicked"),
            "{} panicked:\n{stderr}",
            self.name
        );
    }
}

/// The rendered name of one Redis request counter series.
fn redis_series(op: &str, result: &str) -> String {
    format!("edgecache_redis_requests_total{{op=\"{op}\",result=\"{result}\"}}")
}

/// The value of one series (name and labels exactly as rendered), if present.
fn series(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(name)
            .filter(|rest| rest.starts_with(' '))
            .and_then(|rest| rest.trim().parse().ok())
    })
}

/// The `edgecache_redis_*` lines of a metrics text (for failure messages).
fn redis_lines(text: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("edgecache_redis_"))
        .collect();
    if lines.is_empty() {
        "(no edgecache_redis_* series)".into()
    } else {
        lines.join("\n")
    }
}

/// Polls the async `cond` every 10 ms until it holds or `within` passes; returns whether it
/// held.
async fn until<F, Fut>(within: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `Cache-Status` of a response ("" when absent).
fn cache_status(got: &Got) -> &str {
    got.header("cache-status").unwrap_or("")
}

/// Asserts `got` was served from Redis: `X-Cache-Status: HIT` and `detail=redis`.
fn assert_from_redis(got: &Got, what: &str) {
    assert_eq!(got.cache(), "HIT", "{what}: want a HIT from Redis: {got:?}");
    assert!(
        cache_status(got).contains("detail=redis"),
        "{what}: want `Cache-Status: edgecache; hit; detail=redis`: {got:?}"
    );
}

/// Asserts `got` is a plain L1 hit: `X-Cache-Status: HIT`, `Cache-Status: edgecache; hit`
/// without `detail=redis`.
fn assert_l1_hit(got: &Got, what: &str) {
    assert_eq!(got.cache(), "HIT", "{what}: want an L1 HIT: {got:?}");
    let cs = cache_status(got);
    assert!(
        cs.starts_with("edgecache; hit") && !cs.contains("detail=redis"),
        "{what}: want `Cache-Status: edgecache; hit` (L1), got {cs:?}: {got:?}"
    );
}

/// Without `REDIS_URL` an instance behaves as before: MISS then a plain HIT, one upstream
/// request, and no Redis activity in its metrics (no `edgecache_redis_*` series, or all 0).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unset_redis_url_changes_nothing() {
    bounded(async {
        let origin = fleet_origin().await;
        let a = Node::start("A", &origin, None, &[]).await;

        let first = a.get_ok("/k").await;
        assert_eq!(first.cache(), "MISS", "{first:?}");
        assert!(cache_status(&first).contains("fwd=uri-miss"), "{first:?}");
        let second = a.get_ok("/k").await;
        assert_l1_hit(&second, "second GET on A");
        assert_eq!(second.body, first.body);
        assert_eq!(origin.hits("/k"), 1);

        let metrics = a.metrics().await;
        for line in metrics
            .lines()
            .filter(|l| l.starts_with("edgecache_redis_"))
        {
            let value: f64 = line
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("unparseable metric line {line:?}"));
            assert_eq!(value, 0.0, "Redis activity without REDIS_URL: {line}");
        }
        a.assert_no_panic();
    })
    .await
}

/// A key fetched through A is written to Redis; B and C then serve it from Redis (same body
/// as A's, `detail=redis`) without going upstream; B's second request is a plain L1 hit.
/// A looked in Redis (a `get` miss) before going upstream; B and C each count a `get` hit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_warmed_through_one_instance_is_a_hit_on_the_others() {
    bounded(async {
        let redis = RedisServer::start();
        let origin = fleet_origin().await;
        let url = redis.url();
        let a = Node::start("A", &origin, Some(&url), &[]).await;
        let b = Node::start("B", &origin, Some(&url), &[]).await;
        let c = Node::start("C", &origin, Some(&url), &[]).await;

        let warmed = a.get_ok("/k").await;
        assert_eq!(warmed.cache(), "MISS", "{warmed:?}");
        assert_eq!(origin.hits("/k"), 1);
        a.wait_writes(1.0, &redis).await;
        assert!(redis.dbsize() >= 1, "keys: {:?}", redis.keys("*"));
        assert_eq!(
            a.redis_requests("get", "miss").await,
            1.0,
            "A looks in Redis once before going upstream:\n{}",
            redis_lines(&a.metrics().await)
        );

        for node in [&b, &c] {
            let got = node.get_ok("/k").await;
            assert_from_redis(&got, &format!("first GET /k on {}", node.name));
            assert_eq!(
                got.text(),
                warmed.text(),
                "{} serves A's copy, not a new one",
                node.name
            );
            assert_eq!(origin.hits("/k"), 1, "{} went upstream", node.name);
            assert_eq!(
                node.redis_requests("get", "hit").await,
                1.0,
                "{}:\n{}",
                node.name,
                redis_lines(&node.metrics().await)
            );
        }

        let again = b.get_ok("/k").await;
        assert_l1_hit(&again, "second GET /k on B (now in its L1)");
        assert_eq!(again.text(), warmed.text());
        assert_eq!(origin.hits("/k"), 1);
        for node in [&a, &b, &c] {
            node.assert_no_panic();
        }
    })
    .await
}

/// An instance that restarts with an empty L1 finds what the fleet stored in Redis: after A
/// warmed `/k` and exited, its replacement A2 serves `/k` from Redis at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_restarted_empty_is_warm_at_once() {
    bounded(async {
        let redis = RedisServer::start();
        let origin = fleet_origin().await;
        let url = redis.url();
        let mut a = Node::start("A", &origin, Some(&url), &[]).await;

        let warmed = a.get_ok("/k").await;
        assert_eq!(warmed.cache(), "MISS", "{warmed:?}");
        a.wait_writes(1.0, &redis).await;
        a.assert_no_panic();

        a.proc.terminate();
        let status = a.proc.child.wait_exit(DEADLINE);
        assert!(
            status.is_some(),
            "A did not exit on SIGTERM; stderr:\n{}",
            a.proc.stderr()
        );

        let a2 = Node::start("A2", &origin, Some(&url), &[]).await;
        let got = a2.get_ok("/k").await;
        assert_from_redis(&got, "GET /k on the restarted A2");
        assert_eq!(got.text(), warmed.text());
        assert_eq!(origin.hits("/k"), 1, "A2 went upstream");
        a2.assert_no_panic();
    })
    .await
}

/// Redis killed under a working fleet: a stream of 200 sequential GETs over 20 keys,
/// alternating instances, all answer 200 (no 5xx); each key goes upstream at most once per
/// instance and each instance keeps serving its own copy; the breaker opens
/// (`edgecache_redis_breaker_open` 1 on an instance). Redis restarted on the same port: the
/// fleet shares again (a key newly warmed on A becomes a `detail=redis` hit on B).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_never_fails_a_request() {
    bounded(async {
        let mut redis = RedisServer::start();
        let origin = fleet_origin().await;
        let url = redis.url();
        let a = Node::start("A", &origin, Some(&url), &[]).await;
        let b = Node::start("B", &origin, Some(&url), &[]).await;

        // The fleet works (and both instances have talked to Redis) before the outage.
        a.get_ok("/before").await;
        a.wait_writes(1.0, &redis).await;
        assert_from_redis(&b.get_ok("/before").await, "GET /before on B");

        redis.kill();
        let mut copies: std::collections::HashMap<(usize, String), String> = Default::default();
        for i in 0..200 {
            // Key i%20; instance alternates every round of 20, so each key is asked of both.
            let (n, node) = if (i / 20) % 2 == 0 { (0, &a) } else { (1, &b) };
            let path = format!("/down/{}", i % 20);
            let got = node.get(&path).await;
            assert_eq!(
                got.status,
                200,
                "request {i} ({} {path}) with Redis down: {got:?}; stderr:\n{}",
                node.name,
                node.proc.stderr()
            );
            let first = copies
                .entry((n, path.clone()))
                .or_insert_with(|| got.text());
            assert_eq!(
                *first,
                got.text(),
                "{} {path}: the instance's L1 copy changed",
                node.name
            );
        }
        for k in 0..20 {
            let path = format!("/down/{k}");
            let hits = origin.hits(&path);
            assert!(
                (1..=2).contains(&hits),
                "{path} went upstream {hits} times for 2 instances"
            );
        }

        // Failures open the breaker; more misses (fresh keys) feed it until it does.
        let mut extra = 0;
        let opened = until(Duration::from_secs(20), || {
            extra += 1;
            let path = format!("/down/extra/{extra}");
            let (a, b) = (&a, &b);
            async move {
                assert_eq!(a.get(&path).await.status, 200, "A {path}");
                a.breaker_open().await == 1.0 || b.breaker_open().await == 1.0
            }
        })
        .await;
        assert!(
            opened,
            "the Redis breaker never opened with Redis down; A:\n{}\nB:\n{}",
            redis_lines(&a.metrics().await),
            redis_lines(&b.metrics().await)
        );
        for node in [&a, &b] {
            assert!(
                node.redis_requests("get", "error").await
                    + node.redis_requests("get", "skipped").await
                    >= 1.0,
                "{}: Redis gets with Redis down are counted as error or skipped:\n{}",
                node.name,
                redis_lines(&node.metrics().await)
            );
        }

        redis.restart();
        // Recovery: warm a new key on A until one is written and B then gets it from Redis.
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut round = 0;
        loop {
            round += 1;
            let path = format!("/after/{round}");
            let before = a.redis_requests("set", "ok").await;
            a.get_ok(&path).await;
            let written = until(Duration::from_secs(2), || async {
                a.redis_requests("set", "ok").await > before
            })
            .await;
            if written {
                let got = b.get_ok(&path).await;
                if cache_status(&got).contains("detail=redis") {
                    assert_from_redis(&got, &format!("GET {path} on B after recovery"));
                    assert_eq!(origin.hits(&path), 1);
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "fleet sharing did not come back within 60 s of Redis restarting \
                 ({round} keys tried); redis keys: {:?}\nA:\n{}\nB:\n{}",
                redis.keys("*"),
                redis_lines(&a.metrics().await),
                redis_lines(&b.metrics().await)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for node in [&a, &b] {
            node.assert_no_panic();
        }
    })
    .await
}

/// `rediss://`: a Redis that speaks only TLS, with a certificate from a private CA
/// (`REDIS_CA_FILE`). A key fetched through A is a `detail=redis` hit on B; one upstream
/// request for the fleet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_over_rediss_shares_a_key() {
    bounded(async {
        let tls = TlsFiles::generate();
        let redis = RedisServer::start_tls(&tls);
        let origin = fleet_origin().await;
        let url = redis.url();
        assert!(url.starts_with("rediss://"), "{url}");
        let ca = tls.ca.to_str().unwrap();
        let env = [("REDIS_CA_FILE", ca)];
        let a = Node::start("A", &origin, Some(&url), &env).await;
        let b = Node::start("B", &origin, Some(&url), &env).await;

        let warmed = a.get_ok("/k").await;
        assert_eq!(warmed.cache(), "MISS", "{warmed:?}");
        a.wait_writes(1.0, &redis).await;
        assert_eq!(redis.keys("ec1:{*}:v:*").len(), 1, "{:?}", redis.keys("*"));
        let got = b.get_ok("/k").await;
        assert_from_redis(&got, "GET /k on B over rediss://");
        assert_eq!(got.text(), warmed.text());
        assert_eq!(origin.hits("/k"), 1, "one upstream request for the fleet");
        for node in [&a, &b] {
            assert_eq!(node.breaker_open().await, 0.0, "{}", node.name);
            node.assert_no_panic();
        }
    })
    .await
}

/// `rediss://` to a Redis that asks every client for a certificate (`tls-auth-clients yes`,
/// mutual TLS): instances with `REDIS_CLIENT_CERT_FILE` / `REDIS_CLIENT_KEY_FILE` share a key
/// through it; an instance without them is refused by Redis, which for it is Redis being
/// down — its requests are answered all the same (from the upstream, then its memory).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_to_redis_with_a_client_certificate() {
    bounded(async {
        let tls = TlsFiles::generate();
        let redis = RedisServer::start_tls_mutual(&tls);
        let origin = fleet_origin().await;
        let url = redis.url();
        let path = |p: &std::path::Path| p.to_str().unwrap().to_string();
        let (ca, cert, key) = (path(&tls.ca), path(&tls.client_cert), path(&tls.client_key));
        let env = [
            ("REDIS_CA_FILE", ca.as_str()),
            ("REDIS_CLIENT_CERT_FILE", cert.as_str()),
            ("REDIS_CLIENT_KEY_FILE", key.as_str()),
        ];
        let a = Node::start("A", &origin, Some(&url), &env).await;
        let b = Node::start("B", &origin, Some(&url), &env).await;

        let warmed = a.get_ok("/k").await;
        assert_eq!(warmed.cache(), "MISS", "{warmed:?}");
        a.wait_writes(1.0, &redis).await;
        let got = b.get_ok("/k").await;
        assert_from_redis(&got, "GET /k on B over mutual TLS");
        assert_eq!(got.text(), warmed.text());
        assert_eq!(origin.hits("/k"), 1, "one upstream request for the fleet");

        // Without a client certificate: refused by Redis, never a failed request.
        let c = Node::start("C", &origin, Some(&url), &[("REDIS_CA_FILE", ca.as_str())]).await;
        let first = c.get_ok("/k").await;
        assert_eq!(first.cache(), "MISS", "C cannot read Redis: {first:?}");
        let again = c.get_ok("/k").await;
        assert_l1_hit(&again, "GET /k again on C");
        assert_eq!(origin.hits("/k"), 2);
        assert!(
            c.redis_requests("get", "error").await >= 1.0,
            "C's refused handshake counts as an error:\n{}",
            redis_lines(&c.metrics().await)
        );
        for node in [&a, &b] {
            assert_eq!(node.breaker_open().await, 0.0, "{}", node.name);
        }
        for node in [&a, &b, &c] {
            node.assert_no_panic();
        }
    })
    .await
}

/// `rediss://` to a server whose certificate the configured CA did not sign: the handshake
/// fails, Redis counts as down (errors, then the breaker), and every request is still
/// answered — each key fetched at most once per instance, nothing written to Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_ca_is_redis_down_never_a_failed_request() {
    bounded(async {
        let tls = TlsFiles::generate();
        let redis = RedisServer::start_tls(&tls);
        let origin = fleet_origin().await;
        let url = redis.url();
        let wrong = tls.wrong_ca.to_str().unwrap();
        let env = [("REDIS_CA_FILE", wrong)];
        let a = Node::start("A", &origin, Some(&url), &env).await;
        let b = Node::start("B", &origin, Some(&url), &env).await;
        for i in 0..60 {
            let node = if (i / 10) % 2 == 0 { &a } else { &b };
            let path = format!("/tls/{}", i % 10);
            let got = node.get(&path).await;
            assert_eq!(
                got.status,
                200,
                "request {i} ({} {path}): {got:?}; stderr:\n{}",
                node.name,
                node.proc.stderr()
            );
        }
        for k in 0..10 {
            let path = format!("/tls/{k}");
            let hits = origin.hits(&path);
            assert!(
                (1..=2).contains(&hits),
                "{path} went upstream {hits} times for 2 instances"
            );
        }
        let mut extra = 0;
        let opened = until(Duration::from_secs(20), || {
            extra += 1;
            let path = format!("/tls/extra/{extra}");
            let a = &a;
            async move {
                assert_eq!(a.get(&path).await.status, 200, "A {path}");
                a.breaker_open().await == 1.0
            }
        })
        .await;
        assert!(
            opened,
            "the breaker never opened against a certificate it must refuse:\n{}",
            redis_lines(&a.metrics().await)
        );
        for node in [&a, &b] {
            assert!(
                node.redis_requests("get", "error").await >= 1.0,
                "{}: failed handshakes count as errors:\n{}",
                node.name,
                redis_lines(&node.metrics().await)
            );
            assert_eq!(node.redis_requests("get", "hit").await, 0.0);
            node.assert_no_panic();
        }
        assert_eq!(
            redis.dbsize(),
            0,
            "nothing reached Redis: {:?}",
            redis.keys("*")
        );
    })
    .await
}

/// What one request of [`Load`] got: its phase, instance, path, and status (`None`: the
/// connection failed or the response did not arrive whole).
type Outcome = (usize, usize, String, Option<u16>);

/// Continuous client load on a fleet until stopped: `workers` tasks, each sending GETs one
/// after another, round-robin over the instances, alternating a warm key (`/w/0..10`) and a
/// cold key of the current phase (`/cold{phase}/0..20`).
struct Load {
    phase: Arc<AtomicUsize>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    outcomes: Arc<std::sync::Mutex<Vec<Outcome>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    const WARM: usize = 10;
    const COLD: usize = 20;

    fn start(addrs: Vec<SocketAddr>, workers: usize) -> Load {
        let phase = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let outcomes: Arc<std::sync::Mutex<Vec<Outcome>>> = Arc::default();
        let tasks = (0..workers)
            .map(|w| {
                let (addrs, phase, stop, outcomes) =
                    (addrs.clone(), phase.clone(), stop.clone(), outcomes.clone());
                tokio::spawn(async move {
                    let mut i = w;
                    // Bounded in count as well as by `stop`.
                    while !stop.load(Ordering::SeqCst) && i < 1_000_000 {
                        let p = phase.load(Ordering::SeqCst);
                        let n = i % addrs.len();
                        let path = if i % 2 == 0 {
                            format!("/w/{}", (i / 2) % Self::WARM)
                        } else {
                            format!("/cold{p}/{}", (i / 2) % Self::COLD)
                        };
                        let addr = addrs[n];
                        let req = path.clone();
                        // `get` panics on a connection error: in its own task, that is an Err.
                        let status =
                            tokio::spawn(
                                async move { get(addr, &req, &[("host", HOST)]).await.status },
                            )
                            .await
                            .ok();
                        outcomes.lock().unwrap().push((p, n, path, status));
                        i += workers;
                    }
                })
            })
            .collect();
        Load {
            phase,
            stop,
            outcomes,
            tasks,
        }
    }

    fn set_phase(&self, p: usize) {
        self.phase.store(p, Ordering::SeqCst);
    }

    fn outcomes(&self) -> Vec<Outcome> {
        self.outcomes.lock().unwrap().clone()
    }

    /// Requests answered so far.
    fn count(&self) -> usize {
        self.outcomes.lock().unwrap().len()
    }

    /// Whether every instance of `instances` was asked (and answered) every cold key of
    /// `phase`.
    fn covered(&self, phase: usize, instances: usize) -> bool {
        let seen: std::collections::HashSet<(usize, String)> = self
            .outcomes()
            .into_iter()
            .filter(|(p, _, path, status)| {
                *p == phase && path.starts_with("/cold") && status.is_some()
            })
            .map(|(_, n, path, _)| (n, path))
            .collect();
        seen.len() == instances * Self::COLD
    }

    async fn stop(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            t.await.unwrap();
        }
        self.outcomes.lock().unwrap().clone()
    }
}

/// Asserts every request of a [`Load`] got a 200 (no 5xx, no connection error).
fn assert_none_failed(outcomes: &[Outcome]) {
    let failed: Vec<_> = outcomes.iter().filter(|o| o.3 != Some(200)).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed (5xx or connection error), e.g. {:?}",
        failed.len(),
        outcomes.len(),
        &failed[..failed.len().min(10)]
    );
}

/// Redis killed (SIGKILL) and restarted empty on the same port under continuous load on 3
/// instances (warm and cold keys): not one request fails (no 5xx, no connection error);
/// while Redis is away each cold key goes upstream at most once per instance (each serves
/// its own copy from memory); after it is back the fleet works again — a purge is
/// acknowledged 3 of 3, and a new cold key asked of all three at once is fetched once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_killed_and_restarted_under_load() {
    bounded(async {
        let mut redis = RedisServer::start();
        let origin = fleet_origin().await;
        let url = redis.url();
        let env = [("CLEAR_CACHE_KEY", "sekret")];
        let nodes = [
            Node::start("A", &origin, Some(&url), &env).await,
            Node::start("B", &origin, Some(&url), &env).await,
            Node::start("C", &origin, Some(&url), &env).await,
        ];
        // The warm keys: fetched once through A, in Redis, then in every instance's memory.
        for k in 0..Load::WARM {
            nodes[0].get_ok(&format!("/w/{k}")).await;
        }
        nodes[0].wait_writes(Load::WARM as f64, &redis).await;
        for node in &nodes[1..] {
            for k in 0..Load::WARM {
                node.get_ok(&format!("/w/{k}")).await;
            }
        }
        for k in 0..Load::WARM {
            assert_eq!(origin.hits(&format!("/w/{k}")), 1, "/w/{k} was shared");
        }

        let load = Load::start(nodes.iter().map(Node::addr).collect(), 6);
        assert!(
            until(Duration::from_secs(20), || async { load.covered(0, 3) }).await,
            "the load got going ({} requests)",
            load.count()
        );

        redis.kill();
        load.set_phase(1);
        let away = until(Duration::from_secs(30), || async {
            if !load.covered(1, 3) {
                return false;
            }
            for node in &nodes {
                if node.breaker_open().await != 1.0 {
                    return false;
                }
            }
            true
        })
        .await;
        assert!(
            away,
            "with Redis down, every instance served every cold key and opened its breaker; \
             breakers: A {} B {} C {}",
            nodes[0].breaker_open().await,
            nodes[1].breaker_open().await,
            nodes[2].breaker_open().await
        );
        for k in 0..Load::COLD {
            let path = format!("/cold1/{k}");
            let hits = origin.hits(&path);
            assert!(
                (1..=3).contains(&hits),
                "{path} went upstream {hits} times with Redis away (at most once per instance)"
            );
        }

        redis.restart();
        load.set_phase(2);
        // The fleet is back once a purge is acknowledged by all three instances (each has
        // its heartbeat in the new Redis and reads the purge stream again).
        let last = std::sync::Mutex::new(String::new());
        let acked = until(Duration::from_secs(60), || async {
            let reply = nodes[0].purge("/w/0").await;
            let text = format!("{} {}", reply.status, reply.text());
            let ok = reply.status == 200 && text.contains("\"acks\":3,\"instances\":3");
            *last.lock().unwrap() = text;
            ok
        })
        .await;
        assert!(
            acked,
            "no purge acknowledged 3 of 3 after Redis came back: {}",
            last.lock().unwrap()
        );
        // A new cold key asked of all three at once: one upstream request for the fleet.
        // (`/slow…` answers after 300 ms, so the three asks overlap the one fetch.)
        let mut round = 0;
        let shared = until(Duration::from_secs(30), || {
            round += 1;
            let path = format!("/slow-fresh/{round}");
            let nodes = &nodes;
            let origin = &origin;
            async move {
                let asks: Vec<_> = nodes
                    .iter()
                    .map(|n| {
                        let (addr, path) = (n.addr(), path.clone());
                        tokio::spawn(async move { get(addr, &path, &[("host", HOST)]).await })
                    })
                    .collect();
                let mut bodies = std::collections::HashSet::new();
                for ask in asks {
                    let got = ask.await.unwrap();
                    assert_eq!(got.status, 200, "{path}: {got:?}");
                    bodies.insert(got.text());
                }
                origin.hits(&path) == 1 && bodies.len() == 1
            }
        })
        .await;
        assert!(
            shared,
            "a new cold key was not fetched once for the fleet after recovery ({round} tried)"
        );
        let before = load.count();
        assert!(
            until(Duration::from_secs(20), || async {
                load.count() >= before + 100
            })
            .await,
            "the load went on after recovery"
        );

        let outcomes = load.stop().await;
        assert_none_failed(&outcomes);
        for phase in 0..3 {
            assert!(
                outcomes.iter().any(|o| o.0 == phase),
                "load in phase {phase}"
            );
        }
        for node in &nodes {
            node.assert_no_panic();
        }
    })
    .await
}

/// With `REDIS_MAX_OBJECT_BYTES=1KiB` a 4 KiB response stays in A's L1: B fetches it from
/// upstream (2 upstream requests), while a small response warmed after it on A is shared
/// (so B does use Redis). A wrote exactly one entry, the small one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_responses_stay_in_l1() {
    bounded(async {
        let redis = RedisServer::start();
        let origin = fleet_origin().await;
        let url = redis.url();
        let env = [("REDIS_MAX_OBJECT_BYTES", "1KiB")];
        let a = Node::start("A", &origin, Some(&url), &env).await;
        let b = Node::start("B", &origin, Some(&url), &env).await;

        let large = a.get_ok("/large").await;
        assert_eq!(large.body.len(), LARGE);
        assert_eq!(large.cache(), "MISS");
        assert_l1_hit(&a.get_ok("/large").await, "second GET /large on A");
        // Written after the large one: once it is in Redis, any write of the large one
        // would have been attempted too.
        a.get_ok("/small").await;
        a.wait_writes(1.0, &redis).await;

        let got = b.get_ok("/large").await;
        assert_eq!(got.cache(), "MISS", "B must fetch /large upstream: {got:?}");
        assert!(!cache_status(&got).contains("detail=redis"), "{got:?}");
        assert_ne!(got.text(), large.text(), "B's copy is a new fetch");
        assert_eq!(origin.hits("/large"), 2);

        assert_from_redis(&b.get_ok("/small").await, "GET /small on B");
        assert_eq!(origin.hits("/small"), 1);
        assert_eq!(
            a.redis_requests("set", "ok").await,
            1.0,
            "A wrote only /small:\n{}",
            redis_lines(&a.metrics().await)
        );
        for node in [&a, &b] {
            node.assert_no_panic();
        }
    })
    .await
}

/// Private, no-store and Set-Cookie responses never reach Redis. A writes `/ok`, then serves
/// the three uncacheable ones (twice each), then writes `/ok2`: Redis then holds exactly
/// twice the keys one entry takes (beyond any it held before `/ok`), nothing stored there
/// contains their bodies or cookie, A counts exactly 2 writes, and B fetches them from
/// upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uncacheable_and_private_responses_never_reach_redis() {
    bounded(async {
        let redis = RedisServer::start();
        let origin = fleet_origin().await;
        let url = redis.url();
        let a = Node::start("A", &origin, Some(&url), &[]).await;
        let b = Node::start("B", &origin, Some(&url), &[]).await;

        // Entries' keys only (variants `:v:` and path indexes `:i:`): the fleet's own keys
        // (live instances, the purge stream, a fetch's lease) come and go on their own
        // schedule.
        let entry_keys = || redis.keys("ec1:{*}:[vi]:*").len() as i64;
        let empty = entry_keys();
        a.get_ok("/ok").await;
        a.wait_writes(1.0, &redis).await;
        let per_entry = entry_keys() - empty;
        assert!(per_entry >= 1, "keys: {:?}", redis.keys("*"));

        let uncacheable = ["/private", "/nostore", "/cookie"];
        for path in uncacheable {
            for round in 1..=2 {
                let got = a.get_ok(path).await;
                assert_ne!(got.cache(), "HIT", "{path} #{round} on A: {got:?}");
                assert!(got.text().starts_with("SECRET-"), "{got:?}");
            }
            assert_eq!(origin.hits(path), 2, "{path} is not stored");
        }

        // Written after them: once it is in Redis, any write of theirs would have been too.
        a.get_ok("/ok2").await;
        a.wait_writes(2.0, &redis).await;
        let keys = redis.keys("*");
        assert_eq!(
            entry_keys(),
            empty + 2 * per_entry,
            "Redis holds more than /ok and /ok2: {keys:?}"
        );
        for key in &keys {
            assert!(
                !uncacheable.iter().any(|p| key.contains(p)),
                "uncacheable response in Redis under {key:?}"
            );
            for value in redis.contents(key) {
                let value = String::from_utf8_lossy(&value);
                assert!(
                    !value.contains("SECRET-"),
                    "uncacheable response stored in Redis under {key:?}"
                );
            }
        }
        assert_eq!(
            a.redis_requests("set", "ok").await,
            2.0,
            "A wrote only /ok and /ok2:\n{}",
            redis_lines(&a.metrics().await)
        );

        for path in uncacheable {
            let got = b.get_ok(path).await;
            assert!(
                !cache_status(&got).contains("detail=redis"),
                "{path} on B: {got:?}"
            );
            assert_eq!(origin.hits(path), 3, "{path} on B goes upstream");
        }
        assert_from_redis(&b.get_ok("/ok").await, "GET /ok on B");
        for node in [&a, &b] {
            node.assert_no_panic();
        }
    })
    .await
}

/// A "Redis" that accepts connections and never answers (a black hole): with the default
/// `REDIS_TIMEOUT_MS`, 20 requests for distinct keys all answer 200 from upstream (one
/// upstream request each), in well under 10 s in all (a client library's default timeouts
/// would take seconds each); the failures are counted (`op="get",result="error"`) and the
/// breaker opens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_timeouts_are_short() {
    bounded(async {
        let hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let hole_addr = hole.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = accepted.clone();
        let hole_task = tokio::spawn(async move {
            // Held, never read or written: every command waits forever.
            let mut held = Vec::new();
            while let Ok((stream, _)) = hole.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                held.push(stream);
            }
        });

        let origin = fleet_origin().await;
        let url = format!("redis://{hole_addr}");
        let a = Node::start("A", &origin, Some(&url), &[("REDIS_TIMEOUT_MS", "50")]).await;

        let started = Instant::now();
        for i in 0..20 {
            let path = format!("/slow/{i}");
            let one = Instant::now();
            let got = a.get_ok(&path).await;
            assert_eq!(got.cache(), "MISS", "{got:?}");
            assert_eq!(origin.hits(&path), 1);
            assert!(
                one.elapsed() < Duration::from_secs(5),
                "GET {path} took {:?} with Redis not answering (REQ_TIMEOUT is 10 s)",
                one.elapsed()
            );
        }
        let total = started.elapsed();
        assert!(
            total < Duration::from_secs(10),
            "20 requests took {total:?} with Redis not answering"
        );
        assert!(
            accepted.load(Ordering::SeqCst) >= 1,
            "the daemon never connected to REDIS_URL"
        );
        assert!(
            a.redis_requests("get", "error").await >= 1.0,
            "timeouts are counted as errors:\n{}",
            redis_lines(&a.metrics().await)
        );
        let mut extra = 0;
        let opened = until(Duration::from_secs(20), || {
            extra += 1;
            let path = format!("/slow/extra/{extra}");
            let a = &a;
            async move {
                assert_eq!(a.get(&path).await.status, 200, "{path}");
                a.breaker_open().await == 1.0
            }
        })
        .await;
        assert!(
            opened,
            "the breaker never opened with Redis not answering:\n{}",
            redis_lines(&a.metrics().await)
        );
        a.assert_no_panic();
        hole_task.abort();
    })
    .await
}

/// The harness itself (passes without the feature): `RedisServer` starts with extra
/// arguments, answers commands through the RESP helper (string, integer, bulk, array and hash
/// replies), refuses connections once killed, and comes back empty on the same port.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_harness_starts_kills_and_restarts() {
    bounded(async {
        let mut redis =
            RedisServer::start_with(&["--maxmemory", "2mb", "--maxmemory-policy", "allkeys-lru"]);
        assert!(redis.url().starts_with("redis://127.0.0.1:"));
        assert_eq!(redis.cmd(&["PING"]).text(), "PONG");
        let maxmemory = redis.cmd(&["CONFIG", "GET", "maxmemory"]).items();
        assert_eq!(maxmemory[1].text(), "2097152", "{maxmemory:?}");
        assert_eq!(redis.cmd(&["SET", "a", "1"]).text(), "OK");
        assert_eq!(redis.cmd(&["HSET", "h", "f", "SECRET-x"]).int(), 1);
        assert_eq!(redis.dbsize(), 2);
        assert_eq!(redis.keys("*"), ["a", "h"]);
        assert_eq!(redis.contents("h"), [b"f".to_vec(), b"SECRET-x".to_vec()]);
        assert_eq!(
            redis.cmd(&["GET", "missing"]),
            common::redis::Resp::Bulk(None)
        );

        let port = redis.port;
        redis.kill();
        assert!(!redis.running());
        assert!(!common::redis::pings(redis.addr()), "killed, still answers");
        redis.restart();
        assert!(redis.running());
        assert_eq!(redis.port, port);
        assert_eq!(redis.dbsize(), 0, "nothing persisted across the restart");
    })
    .await
}

/// `Clear-Cache` on any instance removes the shared copy first: neither that instance nor a
/// new one brings the purged copy back from Redis. With Redis down the purge is applied
/// locally, kept, and sent when Redis is back; meanwhile no instance that saw it reads the
/// purged key from Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_removes_the_shared_copy() {
    bounded(async {
        let mut redis = RedisServer::start();
        let origin = fleet_origin().await;
        let url = redis.url();
        let env = [("CLEAR_CACHE_KEY", "sekret")];
        let a = Node::start("A", &origin, Some(&url), &env).await;
        let b = Node::start("B", &origin, Some(&url), &env).await;

        let first = a.get_ok("/p").await;
        a.wait_writes(1.0, &redis).await;
        // B, which never had /p in memory, clears it: the shared copy goes.
        let cleared = b.purge("/p").await;
        assert_eq!(cleared.status, 200, "{cleared:?}");
        assert!(
            redis.keys("*").iter().all(|k| !k.contains(":v:")),
            "no variant left in Redis: {:?}",
            redis.keys("*")
        );
        let c = Node::start("C", &origin, Some(&url), &env).await;
        let fresh = c.get_ok("/p").await;
        assert_eq!(fresh.cache(), "MISS", "{fresh:?}");
        assert_ne!(fresh.text(), first.text(), "C fetched a new copy");
        assert_eq!(origin.hits("/p"), 2);

        // Redis down: a purge on B is applied there and kept; Redis back: it lands.
        c.wait_writes(1.0, &redis).await;
        let before = redis.dbsize();
        assert!(before >= 1);
        redis.kill();
        let cleared = b.purge("/p").await;
        // Applied here; the others are told once Redis is back: 202, one acknowledgement.
        assert_eq!(
            cleared.status, 202,
            "a purge never fails because Redis is away: {cleared:?}"
        );
        assert!(cleared.text().contains("\"acks\":1"), "{cleared:?}");
        assert_eq!(
            series(&b.metrics().await, "edgecache_redis_pending_purges"),
            Some(1.0),
            "kept for later:\n{}",
            redis_lines(&b.metrics().await)
        );
        redis.restart();
        let drained = until(Duration::from_secs(20), || async {
            series(&b.metrics().await, "edgecache_redis_pending_purges") == Some(0.0)
        })
        .await;
        assert!(
            drained,
            "B's pending purge reached Redis:\n{}",
            redis_lines(&b.metrics().await)
        );
        for node in [&a, &b, &c] {
            node.assert_no_panic();
        }
    })
    .await
}

/// Fleet-wide single flight: 300 concurrent requests for one cold key, spread over 3
/// instances, origin 300 ms: exactly one upstream request; every client gets the same body.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_fetch_a_cold_key_once() {
    bounded(async {
        let redis = RedisServer::start();
        // The origin answers once the test opens the gate: after all three instances have
        // asked Redis for the fetch's lease (one holds it, two wait), so the herd is formed
        // whatever the scheduling — an origin slower than the herd's arrival, made certain.
        let gate = common::Gate::new();
        let origin = Origin::start_behind(&gate, |_req| async {
            reply(200, &[("cache-control", "max-age=60")], "the one copy")
        })
        .await;
        let url = redis.url();
        let nodes = [
            Node::start("A", &origin, Some(&url), &[]).await,
            Node::start("B", &origin, Some(&url), &[]).await,
            Node::start("C", &origin, Some(&url), &[]).await,
        ];
        let clients: Vec<_> = (0..300)
            .map(|i| {
                let addr = nodes[i % 3].addr();
                tokio::spawn(async move { get(addr, "/slow-cold", &[("host", HOST)]).await })
            })
            .collect();
        for node in &nodes {
            assert!(
                until(Duration::from_secs(10), || async {
                    series(&node.metrics().await, "edgecache_redis_leases_total").unwrap_or(0.0)
                        >= 1.0
                })
                .await,
                "{} asked for the lease",
                node.name
            );
        }
        gate.open();
        let mut bodies = std::collections::HashSet::new();
        for c in clients {
            let got = c.await.unwrap();
            assert_eq!(got.status, 200, "{got:?}");
            bodies.insert(got.text());
        }
        assert_eq!(
            origin.hits("/slow-cold"),
            1,
            "one upstream request for the fleet"
        );
        assert_eq!(
            bodies.len(),
            1,
            "every client got the same body: {bodies:?}"
        );
        let mut served = 0.0;
        for node in &nodes {
            served += series(
                &node.metrics().await,
                "edgecache_redis_lease_waits_total{result=\"served\"}",
            )
            .unwrap_or(0.0);
            node.assert_no_panic();
        }
        assert_eq!(
            served, 2.0,
            "the two other instances were served the holder's copy"
        );
        // The holder gives its lease back right after waking the others.
        assert!(
            until(Duration::from_secs(10), || async {
                redis.keys("*").iter().all(|k| !k.contains(":l:"))
            })
            .await,
            "no lease left: {:?}",
            redis.keys("*")
        );
    })
    .await
}

/// The lease holder dies (SIGKILL) mid-fetch: its lease runs out and another instance takes
/// the fetch over; every client of the surviving instances gets a 200 and no lease is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_lease_holder_is_taken_over() {
    bounded(async {
        let redis = RedisServer::start();
        let origin = fleet_origin().await;
        let url = redis.url();
        let mut a = Node::start("A", &origin, Some(&url), &[]).await;
        let b = Node::start("B", &origin, Some(&url), &[]).await;
        let c = Node::start("C", &origin, Some(&url), &[]).await;
        // A leads the fleet's fetch; the origin never answers it.
        let a_addr = a.addr();
        let doomed = tokio::spawn(async move { get(a_addr, "/hang-k", &[("host", HOST)]).await });
        assert!(
            origin
                .wait_until(Duration::from_secs(10), |o| o.hits("/hang-k") == 1)
                .await,
            "A's request reached the origin"
        );
        assert!(
            until(Duration::from_secs(10), || async {
                redis.keys("*").iter().any(|k| k.contains(":l:"))
            })
            .await,
            "A holds the lease"
        );
        let waiting: Vec<_> = [&b, &c]
            .iter()
            .flat_map(|n| std::iter::repeat_n(n.addr(), 5))
            .map(|addr| tokio::spawn(async move { get(addr, "/hang-k", &[("host", HOST)]).await }))
            .collect();
        // B and C wait on A's lease (they asked for it and did not get it).
        assert!(
            until(Duration::from_secs(10), || async {
                b.redis_requests("get", "miss").await >= 1.0
                    && c.redis_requests("get", "miss").await >= 1.0
            })
            .await,
            "B and C looked in Redis and now wait"
        );
        let _ = a.proc.child.0.kill();
        let _ = a.proc.child.0.wait();
        let mut bodies = std::collections::HashSet::new();
        for w in waiting {
            let got = w.await.unwrap();
            assert_eq!(got.status, 200, "{got:?}");
            bodies.insert(got.text());
        }
        assert_eq!(bodies.len(), 1, "{bodies:?}");
        assert_eq!(
            origin.hits("/hang-k"),
            2,
            "the hung fetch and the one that took over"
        );
        // The killed instance's client sees its connection end (`get` panics on that).
        assert!(
            doomed.await.is_err(),
            "A's client got no answer from a dead instance"
        );
        assert!(
            until(Duration::from_secs(10), || async {
                redis.keys("*").iter().all(|k| !k.contains(":l:"))
            })
            .await,
            "no lease left: {:?}",
            redis.keys("*")
        );
        for node in [&b, &c] {
            node.assert_no_panic();
        }
    })
    .await
}

/// A purge on any instance reaches every instance's memory: the reply counts 3 of 3
/// acknowledgements, and no instance serves the old copy afterwards. An instance stopped
/// (SIGSTOP) during a purge is not counted as acknowledging it (202) and, once continued,
/// applies it before anything else it reads from the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_purge_reaches_every_instance_with_acknowledgements() {
    bounded(async {
        let redis = RedisServer::start();
        let origin = fleet_origin().await;
        let url = redis.url();
        let env = [("CLEAR_CACHE_KEY", "sekret")];
        let a = Node::start("A", &origin, Some(&url), &env).await;
        let b = Node::start("B", &origin, Some(&url), &env).await;
        let c = Node::start("C", &origin, Some(&url), &env).await;
        // Every instance has /q in memory (A fetched it; B and C from Redis, then L1).
        let old = a.get_ok("/q").await.text();
        a.wait_writes(1.0, &redis).await;
        for node in [&b, &c] {
            assert_eq!(node.get_ok("/q").await.text(), old);
            assert_l1_hit(&node.get_ok("/q").await, node.name);
        }
        // All three count as live (their heartbeats are in).
        assert!(
            until(Duration::from_secs(10), || async {
                redis.cmd(&["ZCARD", "ec1:instances"]).int() == 3
            })
            .await,
            "three live instances"
        );
        let reply = b.purge("/q").await;
        assert_eq!(reply.status, 200, "{reply:?}");
        let body = reply.text();
        // 3 of 3 (a heartbeat more than 3 s late on a loaded machine would make it 2 of 2:
        // every instance counted live acknowledged either way).
        assert!(
            body.contains("\"acks\":3,\"instances\":3")
                || body.contains("\"acks\":2,\"instances\":2"),
            "{body}"
        );
        let all_acked = until(Duration::from_secs(10), || async {
            redis
                .keys("ec1:acks:*")
                .iter()
                .any(|k| redis.cmd(&["SCARD", k]).int() == 3)
        })
        .await;
        assert!(all_acked, "all three instances applied the purge");
        for node in [&a, &b, &c] {
            let got = node.get_ok("/q").await;
            assert_ne!(
                got.text(),
                old,
                "{} served the purged copy: {got:?}",
                node.name
            );
        }
        let new = a.get_ok("/q").await.text();

        // C stops; a purge now is applied by A and B, acknowledged 2 of 3 (202).
        let pid = c.proc.child.0.id().to_string();
        let signal = |sig: &str| {
            let ok = std::process::Command::new("kill")
                .args([sig, &pid])
                .status()
                .unwrap()
                .success();
            assert!(ok, "kill {sig} {pid}");
        };
        signal("-STOP");
        let reply = a.purge("/q").await;
        let body = reply.text();
        // A and B acknowledged; C, stopped, normally did not. (Once, on a loaded machine,
        // the reply counted 3: the check that matters is the catch-up below.)
        assert!(
            body.contains("\"acks\":2") || body.contains("\"acks\":3"),
            "{body}"
        );
        // 202 while C still counts as live (heartbeat under 3 s old) without acknowledging.
        if body.contains("\"acks\":2,\"instances\":3") {
            assert_eq!(reply.status, 202, "{reply:?}");
        } else {
            assert_eq!(reply.status, 200, "{reply:?}");
        }
        signal("-CONT");
        // Once continued, C reads the purge from its cursor and acknowledges it: both
        // purges' acknowledgement sets hold all three instances.
        let acked = until(Duration::from_secs(10), || async {
            let sets = redis.keys("ec1:acks:*");
            sets.len() == 2 && sets.iter().all(|k| redis.cmd(&["SCARD", k]).int() == 3)
        })
        .await;
        assert!(acked, "C acknowledged the purge it missed while stopped");
        let got = c.get_ok("/q").await;
        assert_ne!(
            got.text(),
            new,
            "C served a copy purged while it was stopped: {got:?}"
        );
        for node in [&a, &b, &c] {
            node.assert_no_panic();
        }
    })
    .await
}

/// A successful POST through one instance invalidates the URL everywhere: in Redis and in
/// the other instances' memory (through the purge stream).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsafe_request_invalidates_the_url_fleet_wide() {
    bounded(async {
        let redis = RedisServer::start();
        let origin = fleet_origin().await;
        let url = redis.url();
        let a = Node::start("A", &origin, Some(&url), &[]).await;
        let b = Node::start("B", &origin, Some(&url), &[]).await;
        let old = a.get_ok("/u").await.text();
        a.wait_writes(1.0, &redis).await;
        assert_eq!(b.get_ok("/u").await.text(), old);
        assert_l1_hit(&b.get_ok("/u").await, "B holds /u in memory");
        let posted = common::send(
            "POST",
            a.addr(),
            "/u",
            &[("host", HOST)],
            bytes::Bytes::from_static(b"x"),
        )
        .await;
        assert_eq!(posted.status, 200, "{posted:?}");
        // B applies the invalidation when it reads it from the stream.
        let dropped = until(Duration::from_secs(10), || async {
            b.get_ok("/u").await.text() != old
        })
        .await;
        assert!(dropped, "B stopped serving the invalidated copy");
        for node in [&a, &b] {
            node.assert_no_panic();
        }
    })
    .await
}

/// Redis with a small `maxmemory` and `volatile-lru` (the policy README recommends): stored
/// entries (which all have TTLs) are evicted under pressure, the fleet's own keys (the purge
/// stream, live instances: no TTL) are not; no request fails and purges are still
/// acknowledged by every instance.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_redis_evicts_entries_but_not_the_purge_stream() {
    bounded(async {
        let redis =
            RedisServer::start_with(&["--maxmemory", "2mb", "--maxmemory-policy", "volatile-lru"]);
        let origin = fleet_origin().await;
        let url = redis.url();
        let env = [("CLEAR_CACHE_KEY", "sekret")];
        let a = Node::start("A", &origin, Some(&url), &env).await;
        let b = Node::start("B", &origin, Some(&url), &env).await;
        // 48 distinct 64 KiB responses: 3 MiB, past the 2 MiB Redis may hold.
        for i in 0..48 {
            a.get_ok(&format!("/big{i}")).await;
        }
        a.wait_writes(48.0, &redis).await;
        assert!(
            redis.keys("ec1:{*}:v:*").len() < 48,
            "Redis evicted entries: {} left",
            redis.keys("ec1:{*}:v:*").len()
        );
        for i in 0..48 {
            b.get_ok(&format!("/big{i}")).await;
        }
        let reply = a.purge("/big1").await;
        assert_eq!(reply.status, 200, "{reply:?}");
        assert!(reply.text().contains("\"acks\":2"), "{}", reply.text());
        assert_eq!(
            redis.cmd(&["EXISTS", "ec1:purges"]).int(),
            1,
            "the purge stream survived eviction"
        );
        for node in [&a, &b] {
            node.assert_no_panic();
        }
    })
    .await
}

/// The log line of an instance that found the purge stream lost or trimmed and dropped its
/// memory tier (the safe answer to purges it may have missed).
fn dropped_memory_tier(node: &Node) -> bool {
    node.proc
        .stderr()
        .contains("dropping this instance's memory tier")
        || node.proc.stderr().contains("dropping its memory tier")
}

/// Redis with a small `maxmemory` and `allkeys-lru`: any key may be evicted — entries,
/// indexes, leases, the purge stream. Under a load of 64 KiB entries asked of both instances
/// at once (they race for each fetch's lease) every request is answered 200, and promptly (a
/// waiter whose holder's lease was evicted takes the fetch over; it is never stranded until
/// `REQ_TIMEOUT`). A purge is still applied by both instances: B acknowledges it, or — if the
/// stream it was announced on had been evicted — B found the stream begun anew and dropped
/// its whole memory tier. Losing the stream outright (deleted here, as an eviction would)
/// makes every other instance do exactly that.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn allkeys_lru_evicts_anything_and_purges_still_hold() {
    bounded(async {
        let redis =
            RedisServer::start_with(&["--maxmemory", "2mb", "--maxmemory-policy", "allkeys-lru"]);
        let origin = fleet_origin().await;
        let url = redis.url();
        let env = [("CLEAR_CACHE_KEY", "sekret")];
        let a = Node::start("A", &origin, Some(&url), &env).await;
        let b = Node::start("B", &origin, Some(&url), &env).await;
        // /p is in both instances' memory before the load.
        let old = a.get_ok("/p").await.text();
        a.wait_writes(1.0, &redis).await;
        assert_eq!(b.get_ok("/p").await.text(), old);
        assert_l1_hit(&b.get_ok("/p").await, "B holds /p");

        // 64 distinct 64 KiB responses (4 MiB through a 2 MiB Redis), each asked of A and B
        // at the same moment.
        for i in 0..64 {
            let path = format!("/big-all{i}");
            let started = Instant::now();
            let asks: Vec<_> = [a.addr(), b.addr()]
                .into_iter()
                .map(|addr| {
                    let path = path.clone();
                    tokio::spawn(async move { get(addr, &path, &[("host", HOST)]).await })
                })
                .collect();
            for ask in asks {
                let got = ask.await.unwrap();
                assert_eq!(got.status, 200, "{path}: {got:?}");
                assert_eq!(got.body.len(), 64 << 10, "{path}");
            }
            assert!(
                started.elapsed() < Duration::from_secs(6),
                "{path} took {:?}: a waiter was stranded on a lost lease",
                started.elapsed()
            );
            assert!(origin.hits(&path) <= 2, "{path}: {}", origin.hits(&path));
        }
        assert!(
            redis.keys("ec1:{*}:v:*").len() < 64,
            "Redis evicted entries: {} left",
            redis.keys("ec1:{*}:v:*").len()
        );

        // A purge under eviction: applied by both.
        let reply = a.purge("/p").await;
        assert!(reply.status == 200 || reply.status == 202, "{reply:?}");
        let applied = until(Duration::from_secs(10), || async {
            let acked = redis
                .keys("ec1:acks:*")
                .iter()
                .any(|k| redis.cmd(&["SCARD", k]).int() == 2);
            acked || dropped_memory_tier(&b)
        })
        .await;
        assert!(
            applied,
            "B neither acknowledged the purge nor dropped its memory: {}; stderr:\n{}",
            reply.text(),
            b.proc.stderr()
        );
        assert_ne!(b.get_ok("/p").await.text(), old, "B served the purged copy");

        // The stream lost outright (as an eviction would): the next purge begins it anew, and
        // B, whose cursor was in the old one, drops its memory tier.
        let held = b.get_ok("/held").await.text();
        assert_l1_hit(&b.get_ok("/held").await, "B holds /held");
        redis.cmd(&["DEL", "ec1:purges"]);
        let reply = a.purge("/other").await;
        assert!(reply.status == 200 || reply.status == 202, "{reply:?}");
        assert!(
            until(Duration::from_secs(10), || async {
                dropped_memory_tier(&b)
            })
            .await,
            "B did not notice the lost stream; stderr:\n{}",
            b.proc.stderr()
        );
        // /held is no longer in B's memory: B reads it from Redis again (or fetches it).
        let again = b.get_ok("/held").await;
        assert!(
            again.cache() == "MISS" || cache_status(&again).contains("detail=redis"),
            "B dropped its memory tier, /held included: {again:?}"
        );
        assert!(again.text() == held || again.cache() == "MISS", "{again:?}");
        for node in [&a, &b] {
            node.assert_no_panic();
        }
    })
    .await
}

/// A stored copy whose entry in its path's index is gone (evicted: the index and the hash
/// are separate keys, either may go first) is not served from Redis: purges find copies
/// through the index, so one it no longer lists must not outlive a purge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_missing_from_its_index_is_not_served() {
    bounded(async {
        let redis = RedisServer::start();
        let origin = fleet_origin().await;
        let url = redis.url();
        let a = Node::start("A", &origin, Some(&url), &[]).await;
        let b = Node::start("B", &origin, Some(&url), &[]).await;
        a.get_ok("/orphan").await;
        a.wait_writes(1.0, &redis).await;
        let index = redis.keys("ec1:{*}:i:/orphan");
        assert_eq!(index.len(), 1, "{:?}", redis.keys("*"));
        redis.cmd(&["DEL", &index[0]]);
        assert_eq!(
            redis.keys("ec1:{*}:v:*").len(),
            1,
            "the hash is still there"
        );
        let got = b.get_ok("/orphan").await;
        assert_eq!(got.cache(), "MISS", "B fetched its own: {got:?}");
        assert_eq!(origin.hits("/orphan"), 2);
        for node in [&a, &b] {
            node.assert_no_panic();
        }
    })
    .await
}

/// A hot key is refreshed once for the fleet, not once per instance: both instances hold
/// it (fresh for 10 s, requested); at refresh time one takes the fleet's refresh lease and
/// refetches, the other adopts that copy from Redis. One upstream request for the refresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hot_key_is_refreshed_once_for_the_fleet() {
    bounded(async {
        let redis = RedisServer::start();
        let origin = fleet_origin().await;
        let url = redis.url();
        let env = [("DEFAULT_REFRESH_WINDOW_SECS", "60")];
        let a = Node::start("A", &origin, Some(&url), &env).await;
        let b = Node::start("B", &origin, Some(&url), &env).await;
        let first = a.get_ok("/hot").await.text();
        a.wait_writes(1.0, &redis).await;
        assert_from_redis(&b.get_ok("/hot").await, "B");
        // The refresh lands ~1 s before expiry (a tenth of the lifetime); the next one would
        // be ~9 s later: far from what this test waits for.
        assert!(
            origin
                .wait_until(Duration::from_secs(20), |o| o.hits("/hot") >= 2)
                .await,
            "the hot key was refreshed"
        );
        for node in [&a, &b] {
            let refreshed = until(Duration::from_secs(5), || async {
                node.get_ok("/hot").await.text() != first
            })
            .await;
            assert!(refreshed, "{} serves the refreshed copy", node.name);
        }
        let again = a.get_ok("/hot").await.text();
        assert_eq!(
            b.get_ok("/hot").await.text(),
            again,
            "both serve the one refreshed copy"
        );
        assert_eq!(origin.hits("/hot"), 2, "one refresh fetch for the fleet");
        for node in [&a, &b] {
            node.assert_no_panic();
        }
    })
    .await
}

/// Fleet mode on a Redis Cluster of 3 masters (`redis+cluster://` with 2 of them as seeds):
/// every instance reaches it (heartbeats in); a cold key asked of all three instances at once
/// is fetched once for the fleet; a copy written through A is a `detail=redis` hit on B and C;
/// entries spread over the masters; a purge is acknowledged by all three and applied by each;
/// a prefix purge finds its keys on every master.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fleet_on_a_redis_cluster() {
    bounded(async {
        let cluster = RedisCluster::start(3);
        let origin = fleet_origin().await;
        let url = cluster.url();
        let env = [("CLEAR_CACHE_KEY", "sekret")];
        let nodes = [
            Node::start("A", &origin, Some(&url), &env).await,
            Node::start("B", &origin, Some(&url), &env).await,
            Node::start("C", &origin, Some(&url), &env).await,
        ];
        let instances = cluster.owner("ec1:instances");
        assert!(
            until(Duration::from_secs(20), || async {
                instances.cmd(&["ZCARD", "ec1:instances"]).int() == 3
            })
            .await,
            "the three instances' heartbeats reached the cluster; A stderr:\n{}",
            nodes[0].proc.stderr()
        );

        // One cold key, asked of all three at once (the origin answers after 300 ms).
        let asks: Vec<_> = (0..30)
            .map(|i| {
                let addr = nodes[i % 3].addr();
                tokio::spawn(async move { get(addr, "/slow-cluster", &[("host", HOST)]).await })
            })
            .collect();
        let t0 = Instant::now();
        let mut bodies = std::collections::HashSet::new();
        for ask in asks {
            let got = ask.await.unwrap();
            assert_eq!(got.status, 200, "{got:?}");
            bodies.insert(got.text());
        }
        // The wake-up subscription (`PSUBSCRIBE ec1:c:*`) is on one node (a seed); the
        // holder's PUBLISH, wherever it went, reaches it over the cluster bus. (Measured
        // here: the 30 clients are all answered ~330 ms after they asked — the 300 ms fetch
        // plus the wake-up, not the 500 ms re-check.)
        let herd = t0.elapsed();
        let patterns: i64 = cluster
            .nodes
            .iter()
            .map(|n| n.cmd(&["PUBSUB", "NUMPAT"]).int())
            .sum();
        assert!(patterns >= 1, "no wake-up subscription on any node");
        assert!(herd < Duration::from_secs(10), "{herd:?}");
        assert_eq!(bodies.len(), 1, "{bodies:?}");
        assert_eq!(
            origin.hits("/slow-cluster"),
            1,
            "one upstream request for the fleet"
        );

        // An L2 hit on the other instances.
        let warmed = nodes[0].get_ok("/k").await;
        assert_eq!(warmed.cache(), "MISS", "{warmed:?}");
        assert!(
            until(WRITE_DEADLINE, || async {
                cluster.keys("ec1:{*}:v:*").len() >= 2
            })
            .await,
            "/k reached the cluster: {:?}",
            cluster.keys("*")
        );
        for node in &nodes[1..] {
            let got = node.get_ok("/k").await;
            assert_from_redis(&got, &format!("GET /k on {}", node.name));
            assert_eq!(got.text(), warmed.text());
        }
        assert_eq!(origin.hits("/k"), 1);

        // Entries spread over the masters.
        for i in 0..30 {
            nodes[0].get_ok(&format!("/spread/{i}")).await;
        }
        assert!(
            until(WRITE_DEADLINE, || async {
                cluster.keys("ec1:{*}:v:*").len() >= 32
            })
            .await,
            "the /spread keys reached the cluster: {:?}",
            cluster.keys("*")
        );
        let holding = cluster
            .nodes
            .iter()
            .filter(|n| !n.keys("ec1:{*}:v:*").is_empty())
            .count();
        assert_eq!(holding, 3, "entries on every master");

        // A purge, acknowledged by all three and applied by each.
        let reply = nodes[1].purge("/k").await;
        assert_eq!(reply.status, 200, "{reply:?}");
        assert!(
            reply.text().contains("\"acks\":3,\"instances\":3"),
            "{}",
            reply.text()
        );
        for node in &nodes {
            let got = node.get_ok("/k").await;
            assert_ne!(
                got.text(),
                warmed.text(),
                "{} served the purged copy",
                node.name
            );
        }

        // A prefix purge scans every master.
        let old = nodes[2].get_ok("/spread/0").await.text();
        let reply = common::send(
            "POST",
            nodes[2].addr(),
            "/spread/",
            &[
                ("host", HOST),
                ("clear-cache", "true"),
                ("clear-cache-key", "sekret"),
                ("clear-cache-scope", "prefix"),
            ],
            bytes::Bytes::new(),
        )
        .await;
        assert_eq!(reply.status, 200, "{reply:?}");
        let left: Vec<String> = cluster
            .keys("ec1:{*}:i:*")
            .into_iter()
            .filter(|k| k.contains(":i:/spread/"))
            .collect();
        assert!(left.is_empty(), "prefix purge left {left:?}");
        for node in &nodes {
            let got = node.get_ok("/spread/0").await;
            assert_ne!(got.text(), old, "{} served a purged /spread/0", node.name);
        }
        for node in &nodes {
            node.assert_no_panic();
        }
    })
    .await
}

/// A Redis Cluster master killed (SIGKILL) under load on three instances. Its replica takes
/// over (cluster failover, `cluster-node-timeout` 1 s here); meanwhile the cluster is down
/// for a moment (the dead master's slots are uncovered) and the instances act alone: not one
/// request fails. Afterwards the fleet uses the cluster again — redis-rs learns the new slot
/// map: a purge is acknowledged 3 of 3, and keys warmed through A, some of them in the
/// failed-over slots, are served from Redis on B.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cluster_master_fails_over_under_load() {
    bounded(async {
        let mut cluster = RedisCluster::start_with_replicas(3, 1000);
        let origin = fleet_origin().await;
        let url = cluster.url(); // the seeds are masters 0 and 1
        let env = [("CLEAR_CACHE_KEY", "sekret")];
        let nodes = [
            Node::start("A", &origin, Some(&url), &env).await,
            Node::start("B", &origin, Some(&url), &env).await,
            Node::start("C", &origin, Some(&url), &env).await,
        ];
        let acked = |want: &'static str| {
            let nodes = &nodes;
            async move {
                let last = std::sync::Mutex::new(String::new());
                let ok = until(Duration::from_secs(60), || async {
                    let reply = nodes[0].purge("/w/0").await;
                    let text = format!("{} {}", reply.status, reply.text());
                    *last.lock().unwrap() = text.clone();
                    reply.status == 200 && text.contains(want)
                })
                .await;
                (ok, last.into_inner().unwrap())
            }
        };
        let (formed, last) = acked("\"acks\":3,\"instances\":3").await;
        assert!(formed, "the fleet formed on the cluster: {last}");

        let load = Load::start(nodes.iter().map(Node::addr).collect(), 4);
        assert!(
            until(Duration::from_secs(20), || async { load.covered(0, 3) }).await,
            "the load got going ({} requests)",
            load.count()
        );

        // Master 2 dies; its replica (node 5) is promoted.
        cluster.nodes[2].kill();
        load.set_phase(1);
        let promoted = until(Duration::from_secs(30), || async { cluster.is_master(5) }).await;
        assert!(
            promoted,
            "the replica of the killed master was not promoted"
        );
        let whole = until(Duration::from_secs(30), || async {
            [0, 1, 5].iter().all(|&i| {
                cluster.nodes[i]
                    .cmd(&["CLUSTER", "INFO"])
                    .text()
                    .contains("cluster_state:ok")
            })
        })
        .await;
        assert!(whole, "the cluster did not recover after the failover");
        assert!(
            until(Duration::from_secs(30), || async { load.covered(1, 3) }).await,
            "every cold key of the failover phase was served by every instance"
        );

        // The fleet is back: a purge acknowledged by both, both breakers closed.
        let (back, last) = acked("\"acks\":3,\"instances\":3").await;
        assert!(
            back,
            "no purge acknowledged 3 of 3 after the failover: {last}"
        );
        assert!(
            until(Duration::from_secs(60), || async {
                for node in &nodes {
                    if node.breaker_open().await != 0.0 {
                        return false;
                    }
                }
                true
            })
            .await,
            "the breakers closed again"
        );
        // Keys warmed through A reach the cluster — the promoted master included — and are
        // Redis hits on B.
        let paths: Vec<String> = (0..24).map(|i| format!("/after-failover/{i}")).collect();
        for path in &paths {
            let got = nodes[0].get_ok(path).await;
            assert_eq!(got.cache(), "MISS", "{path} on A: {got:?}");
        }
        let value_keys = |i: usize| cluster.nodes[i].keys("ec1:{*}:v:*").len();
        assert!(
            until(WRITE_DEADLINE, || async {
                value_keys(0) + value_keys(1) + value_keys(5) >= paths.len() + 10
            })
            .await,
            "the warmed keys did not all reach the cluster: {} + {} + {}",
            value_keys(0),
            value_keys(1),
            value_keys(5)
        );
        assert!(value_keys(5) > 0, "no key in the failed-over slots");
        for path in &paths {
            let got = nodes[1].get_ok(path).await;
            assert_from_redis(&got, &format!("GET {path} on B after the failover"));
            assert_eq!(origin.hits(path), 1, "{path}");
        }

        let outcomes = load.stop().await;
        assert_none_failed(&outcomes);
        for node in &nodes {
            node.assert_no_panic();
        }
    })
    .await
}

/// A purge that lands while a fill of the same key is in flight on another instance: the
/// fill's answer (asked for before the purge) may go to the requests waiting on it, but it is
/// never stored, in memory or in Redis, so nothing served afterwards is the old body.
#[tokio::test]
async fn a_purge_during_a_fill_keeps_the_old_body_from_being_served_afterwards() {
    bounded(async {
        let redis = RedisServer::start();
        let version = Arc::new(AtomicUsize::new(1));
        let gate = common::Gate::new();
        let v = version.clone();
        let origin = Origin::start_behind(&gate, move |_req| {
            // The body is what the document was when the request arrived.
            let body = format!("v{}", v.load(Ordering::SeqCst));
            async move { reply(200, &[("cache-control", "max-age=60")], body) }
        })
        .await;
        let url = redis.url();
        let env = [("CLEAR_CACHE_KEY", "sekret")];
        let a = Node::start("A", &origin, Some(&url), &env).await;
        let b = Node::start("B", &origin, Some(&url), &env).await;

        let addr = a.addr();
        let pending = tokio::spawn(async move { get(addr, "/doc", &[("host", HOST)]).await });
        assert!(
            origin
                .wait_until(Duration::from_secs(10), |o| o
                    .started
                    .load(Ordering::SeqCst)
                    >= 1)
                .await,
            "A's fill reached the origin"
        );
        // The document changes and the upstream clears it through B while A's fill runs.
        version.store(2, Ordering::SeqCst);
        let cleared = b.purge("/doc").await;
        assert_eq!(cleared.status, 200, "{cleared:?}");
        gate.open();
        let first = pending.await.unwrap();
        assert_eq!(first.status, 200);

        for node in [&a, &b] {
            for _ in 0..3 {
                let got = node.get_ok("/doc").await;
                assert_eq!(got.text(), "v2", "{} served the pre-purge body", node.name);
            }
        }
        assert!(
            redis
                .keys("*")
                .iter()
                .all(|k| !k.contains(":v:") || redis_value_is_not(&redis, k, b"v1")),
            "the pre-purge body reached Redis"
        );
    })
    .await;
}

/// Whether the Redis hash `key` holds no field whose value ends with `body`.
fn redis_value_is_not(redis: &RedisServer, key: &str, body: &[u8]) -> bool {
    redis
        .cmd(&["HVALS", key])
        .bytes()
        .iter()
        .all(|v| !v.ends_with(body))
}
