//! Issue 14: a routes file (`ROUTES_FILE`) on top of the cache — allowlist, per-route
//! upstreams and key rules, injected upstream headers, rate limits that only upstream
//! requests spend, an in-flight cap, retries, slow requests released as jobs with signed
//! callbacks, and reload on SIGHUP. Real sockets: in-test origins, the proxy in-process or as
//! the real binary where logs, exit codes or signals are checked.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::process::{edgecache_cmd, run_to_exit, Edgecache, TempDir};
use common::*;
use http::{HeaderMap, Request};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use sha2::{Digest, Sha256};

/// Writes `text` as `routes.toml` in `dir`; returns its path.
fn routes_file(dir: &TempDir, text: &str) -> String {
    let path = dir.path.join("routes.toml");
    std::fs::write(&path, text).unwrap();
    path.to_string_lossy().into_owned()
}

/// An origin answering `200 <path?query>` with no freshness information, recording the
/// headers of every request it gets.
async fn recording_origin(seen: Arc<Mutex<Vec<(String, HeaderMap)>>>) -> Origin {
    Origin::start(move |req: Request<Incoming>| {
        let seen = seen.clone();
        async move {
            let pq = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
            seen.lock()
                .unwrap()
                .push((pq.to_string(), req.headers().clone()));
            reply(200, &[], pq.to_string())
        }
    })
    .await
}

async fn echo_origin(cache_control: &'static str) -> Origin {
    Origin::start(move |req: Request<Incoming>| async move {
        let pq = req.uri().path_and_query().map_or("/", |pq| pq.as_str());
        let headers: &[(&str, &str)] = if cache_control.is_empty() {
            &[]
        } else {
            &[("cache-control", cache_control)]
        };
        reply(200, headers, pq.to_string())
    })
    .await
}

fn ttl_of(got: &Got) -> u64 {
    let cs = got.header("cache-status").unwrap_or("");
    cs.split(';')
        .find_map(|p| p.trim().strip_prefix("ttl="))
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no ttl in Cache-Status {cs:?}"))
}

#[tokio::test]
async fn only_listed_paths_reach_the_upstream() {
    let origin = echo_origin("max-age=60").await;
    let dir = TempDir::new("routes-allow");
    let file = routes_file(
        &dir,
        r#"
allowlist = true

[[routes]]
prefix = "/api/"

[[routes]]
prefix = "/read/"
methods = ["GET", "HEAD"]
"#,
    );
    let proxy = ProxyHandle::start(&origin.url(), &[("ROUTES_FILE", &file)]).await;

    let ok = get(proxy.addr, "/api/x", &[]).await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.text(), "/api/x");
    for path in ["/other", "/api", "/API/x", "/", "/apix"] {
        let got = get(proxy.addr, path, &[]).await;
        assert_eq!(got.status, 404, "{path} is on no route");
    }
    let post = send("POST", proxy.addr, "/elsewhere", &[], Bytes::from("x")).await;
    assert_eq!(post.status, 404);
    // The path is routed, the method is not.
    let wrong = send("POST", proxy.addr, "/read/x", &[], Bytes::from("x")).await;
    assert_eq!(
        wrong.status, 405,
        "a routed path with a method no route lists"
    );
    let allow = wrong.header("allow").unwrap_or("");
    assert!(allow.contains("GET"), "Allow: {allow}");
    assert_eq!(get(proxy.addr, "/read/x", &[]).await.status, 200);
    assert_eq!(
        origin.total(),
        2,
        "only /api/x and /read/x reached the upstream"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn each_route_has_its_own_upstream_and_key_rules() {
    let a = echo_origin("max-age=60").await;
    let b = echo_origin("max-age=60").await;
    let default = echo_origin("max-age=60").await;
    let dir = TempDir::new("routes-upstream");
    let file = routes_file(
        &dir,
        &format!(
            r#"
[[routes]]
prefix = "/a/"
upstream = "{a}"
key_query_ignore = ["utm_*", "fbclid"]

[[routes]]
prefix = "/a/special/"
upstream = "{b}"
"#,
            a = a.url(),
            b = b.url()
        ),
    );
    let proxy = ProxyHandle::start(&default.url(), &[("ROUTES_FILE", &file)]).await;

    assert_eq!(get(proxy.addr, "/a/x", &[]).await.status, 200);
    assert_eq!(a.hits("/a/x"), 1);
    assert_eq!(get(proxy.addr, "/a/special/y", &[]).await.status, 200);
    assert_eq!(b.hits("/a/special/y"), 1, "the longest prefix wins");
    assert_eq!(get(proxy.addr, "/z", &[]).await.status, 200);
    assert_eq!(default.hits("/z"), 1, "no route: the global pool");
    assert_eq!(a.total() + b.total() + default.total(), 3);

    // Ignored parameters are left out of the key, and out of the upstream request (which
    // must not depend on them, since one answer serves every value), so a background
    // refresh asks exactly what the first request asked.
    let first = get(proxy.addr, "/a/q?id=1&utm_source=mail", &[]).await;
    assert_eq!(first.cache(), "MISS");
    assert_eq!(first.text(), "/a/q?id=1");
    let second = get(proxy.addr, "/a/q?utm_medium=web&id=1&fbclid=abc", &[]).await;
    assert_eq!(
        second.cache(),
        "HIT",
        "same key once utm_* and fbclid are ignored"
    );
    assert_eq!(second.text(), "/a/q?id=1");
    let other = get(proxy.addr, "/a/q?id=2&utm_source=mail", &[]).await;
    assert_eq!(other.cache(), "MISS", "id is part of the key");
    // Requests that do not go through the cache keep their query.
    let post = send(
        "POST",
        proxy.addr,
        "/a/p?id=1&utm_source=mail",
        &[],
        Bytes::from("x"),
    )
    .await;
    assert_eq!(post.text(), "/a/p?id=1&utm_source=mail");
    // Only this route ignores them.
    get(proxy.addr, "/z?utm_source=1", &[]).await;
    let z = get(proxy.addr, "/z?utm_source=2", &[]).await;
    assert_eq!(z.cache(), "MISS");
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_route_sets_caching_and_the_default_lifetime() {
    let origin = echo_origin("").await;
    let dir = TempDir::new("routes-cache");
    let file = routes_file(
        &dir,
        r#"
[[routes]]
prefix = "/live/"
cache = false

[[routes]]
prefix = "/long/"
ttl_secs = 300
"#,
    );
    let proxy = ProxyHandle::start(
        &origin.url(),
        &[
            ("ROUTES_FILE", &file),
            ("DEFAULT_CACHE_EXPIRY_TIME_SECS", "5"),
        ],
    )
    .await;

    for _ in 0..2 {
        let got = get(proxy.addr, "/live/x", &[]).await;
        assert_eq!(got.status, 200);
        assert_eq!(got.cache(), "BYPASS");
    }
    assert_eq!(
        origin.hits("/live/x"),
        2,
        "cache = false: every request goes upstream"
    );

    // The miss's Cache-Status gives the stored response's freshness.
    let miss = get(proxy.addr, "/long/x", &[]).await;
    assert_eq!(miss.cache(), "MISS");
    assert!(
        ttl_of(&miss) > 200,
        "ttl_secs = 300 applies: {:?}",
        miss.headers
    );
    assert_eq!(get(proxy.addr, "/long/x", &[]).await.cache(), "HIT");

    let miss = get(proxy.addr, "/short/x", &[]).await;
    assert!(ttl_of(&miss) <= 5, "no route: the global default");
    assert_eq!(get(proxy.addr, "/short/x", &[]).await.cache(), "HIT");
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_cache_control_query_parameter_acts_as_request_directives() {
    let origin = echo_origin("max-age=60").await;
    let dir = TempDir::new("routes-qcc");
    let file = routes_file(
        &dir,
        r#"
[[routes]]
prefix = "/q/"
query_cache_control = true
"#,
    );
    let proxy = ProxyHandle::start(&origin.url(), &[("ROUTES_FILE", &file)]).await;
    assert_eq!(get(proxy.addr, "/q/x", &[]).await.cache(), "MISS");
    assert_eq!(get(proxy.addr, "/q/x", &[]).await.cache(), "HIT");
    let forced = get(proxy.addr, "/q/x?cache-control=no-cache", &[]).await;
    assert_ne!(forced.cache(), "HIT", "no-cache in the query revalidates");
    assert_eq!(
        origin.hits("/q/x"),
        2,
        "the parameter is not sent upstream, and it is not part of the key"
    );
    assert_eq!(origin.total(), 2);
    assert_eq!(get(proxy.addr, "/q/x", &[]).await.cache(), "HIT");
    proxy.shutdown().await;
}

#[tokio::test]
async fn injected_headers_replace_the_clients_and_stay_out_of_status() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let origin = recording_origin(seen.clone()).await;
    let dir = TempDir::new("routes-token");
    let file = routes_file(
        &dir,
        r#"
[[routes]]
prefix = "/api/"
ttl_secs = 60
headers = { Authorization = "Bearer ${UPSTREAM_TOKEN}", X-Api-Key = "key-${UPSTREAM_TOKEN}" }
"#,
    );
    let proxy = ProxyHandle::start(
        &origin.url(),
        &[("ROUTES_FILE", &file), ("UPSTREAM_TOKEN", "s3cr3t-t0ken")],
    )
    .await;

    let got = get(proxy.addr, "/api/a", &[]).await;
    assert_eq!(got.status, 200);
    let got = get(
        proxy.addr,
        "/api/b",
        &[("authorization", "Bearer client"), ("x-api-key", "mine")],
    )
    .await;
    assert_eq!(got.status, 200);
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2);
        for (path, headers) in seen.iter() {
            let auth: Vec<_> = headers.get_all("authorization").iter().collect();
            assert_eq!(auth, ["Bearer s3cr3t-t0ken"], "{path}");
            let key: Vec<_> = headers.get_all("x-api-key").iter().collect();
            assert_eq!(key, ["key-s3cr3t-t0ken"], "{path}");
        }
    }
    // Every client's request is the same upstream request: the answer is shared.
    assert_eq!(get(proxy.addr, "/api/a", &[]).await.cache(), "HIT");
    let status = proxy.status();
    assert!(
        !status.contains("s3cr3t"),
        "the token is in /status: {status}"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn the_rate_limit_spends_only_on_upstream_requests_and_recovers() {
    let origin = echo_origin("max-age=60").await;
    let dir = TempDir::new("routes-rate");
    let file = routes_file(
        &dir,
        r#"
[[routes]]
prefix = "/rl/"
rate_limit = { per_second = 1, burst = 2, queue = 0 }
"#,
    );
    let proxy = ProxyHandle::start(&origin.url(), &[("ROUTES_FILE", &file)]).await;

    // Distinct keys are misses: the first `burst` pass, then 429 (allowing for tokens that
    // came back while the requests ran on a slow machine).
    let started = Instant::now();
    let mut passed = Vec::new();
    let mut refused = None;
    for i in 0..10 {
        let path = format!("/rl/{i}");
        let got = get(proxy.addr, &path, &[]).await;
        match got.status {
            200 => passed.push(path),
            429 => {
                refused = Some((path, got));
                break;
            }
            s => panic!("{path}: unexpected {s}"),
        }
    }
    let (refused_path, refused) = refused.expect("the limit answered 429");
    let allowed = 2 + started.elapsed().as_secs() as usize + 1;
    assert!(passed.len() >= 2 && passed.len() <= allowed, "{passed:?}");
    let retry_after: u64 = refused
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("429 carries Retry-After");
    assert!((1..=2).contains(&retry_after), "Retry-After {retry_after}");
    assert!(
        refused.header("ratelimit-limit").is_some() || refused.header("ratelimit").is_some(),
        "429 carries RateLimit headers: {:?}",
        refused.headers
    );
    assert_eq!(
        origin.hits(&refused_path),
        0,
        "a refused request never went upstream"
    );

    // Hits never spend the limit.
    for _ in 0..20 {
        let got = get(proxy.addr, &passed[0], &[]).await;
        assert_eq!((got.status, got.cache()), (200, "HIT"));
    }
    // It recovers: a permit comes back within a few seconds.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = get(proxy.addr, &refused_path, &[]).await;
        if got.status == 200 {
            break;
        }
        assert_eq!(got.status, 429);
        assert!(Instant::now() < deadline, "no permit came back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let metrics = proxy.metrics();
    assert!(
        metrics.contains(
            "edgecache_route_rejected_total{prefix=\"/rl/\",methods=\"*\",reason=\"rate\"} "
        ),
        "rejections are counted: {metrics}"
    );
    proxy.shutdown().await;
}

#[tokio::test]
async fn queued_requests_wait_for_a_permit_instead_of_failing() {
    let origin = echo_origin("max-age=60").await;
    let dir = TempDir::new("routes-queue");
    let file = routes_file(
        &dir,
        r#"
[[routes]]
prefix = "/rq/"
rate_limit = { per_second = 10, burst = 1, queue = 10 }
"#,
    );
    let proxy = ProxyHandle::start(&origin.url(), &[("ROUTES_FILE", &file)]).await;
    let addr = proxy.addr;
    let tasks: Vec<_> = (0..5)
        .map(|i| tokio::spawn(async move { get(addr, &format!("/rq/{i}"), &[]).await.status }))
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200, "a queued request waits its turn");
    }
    assert_eq!(origin.total(), 5);
    proxy.shutdown().await;
}

#[tokio::test]
async fn the_in_flight_cap_answers_503_at_once() {
    let gate = Gate::new();
    let origin = Origin::start_behind(&gate, |req: Request<Incoming>| async move {
        reply(
            200,
            &[("cache-control", "max-age=60")],
            req.uri().path().to_string(),
        )
    })
    .await;
    let dir = TempDir::new("routes-inflight");
    let file = routes_file(
        &dir,
        r#"
[[routes]]
prefix = "/cap/"
max_in_flight = 2
"#,
    );
    let proxy = ProxyHandle::start(&origin.url(), &[("ROUTES_FILE", &file)]).await;
    let addr = proxy.addr;
    let held: Vec<_> = (0..2)
        .map(|i| tokio::spawn(async move { get(addr, &format!("/cap/{i}"), &[]).await.status }))
        .collect();
    assert!(
        origin
            .wait_until(Duration::from_secs(10), |o| o
                .started
                .load(Ordering::SeqCst)
                == 2)
            .await
    );
    let third = get(addr, "/cap/2", &[]).await;
    assert_eq!(third.status, 503, "over the cap: refused, not queued");
    assert_eq!(origin.hits("/cap/2"), 0);
    // Other routes are not capped.
    gate.open();
    for t in held {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(get(addr, "/cap/2", &[]).await.status, 200);
    proxy.shutdown().await;
}

/// An origin whose `/fail-N/…` paths answer 503 N times, then 200; `/always/…` 503 and
/// `/missing/…` 404 every time. POST bodies are echoed.
async fn flaky_origin() -> Origin {
    let counts: Arc<Mutex<std::collections::HashMap<String, usize>>> = Arc::default();
    Origin::start(move |req: Request<Incoming>| {
        let counts = counts.clone();
        async move {
            let path = req.uri().path().to_string();
            let body = req.into_body().collect().await.unwrap().to_bytes();
            let n = {
                let mut c = counts.lock().unwrap();
                let n = c.entry(path.clone()).or_default();
                *n += 1;
                *n
            };
            let fails: usize = path
                .strip_prefix("/r/fail-")
                .or_else(|| path.strip_prefix("/u/fail-"))
                .and_then(|rest| rest.split('/').next()?.parse().ok())
                .unwrap_or(0);
            if path.contains("/always") {
                reply(503, &[], "down")
            } else if path.contains("/missing") {
                reply(404, &[], "no")
            } else if n <= fails {
                reply(503, &[], "not yet")
            } else {
                reply(200, &[("cache-control", "max-age=60")], body)
            }
        }
    })
    .await
}

#[tokio::test]
async fn retries_reach_a_flaky_upstream_exactly_as_configured() {
    let origin = flaky_origin().await;
    let dir = TempDir::new("routes-retry");
    let file = routes_file(
        &dir,
        r#"
[[routes]]
prefix = "/r/"
retries = 3

[[routes]]
prefix = "/u/"
retries = 3
retry_unsafe = true
"#,
    );
    let proxy = ProxyHandle::start(&origin.url(), &[("ROUTES_FILE", &file)]).await;
    let addr = proxy.addr;

    let got = get(addr, "/r/fail-2/x", &[]).await;
    assert_eq!(got.status, 200);
    assert_eq!(origin.hits("/r/fail-2/x"), 3, "two 503s, then the answer");

    let got = get(addr, "/r/always/x", &[]).await;
    assert_eq!(got.status, 503);
    assert_eq!(origin.hits("/r/always/x"), 4, "the first try and 3 retries");

    let got = get(addr, "/r/missing/x", &[]).await;
    assert_eq!(got.status, 404);
    assert_eq!(origin.hits("/r/missing/x"), 1, "4xx is terminal");

    let got = send("POST", addr, "/r/fail-1/p", &[], Bytes::from("body")).await;
    assert_eq!(got.status, 503, "POST is not retried without retry_unsafe");
    assert_eq!(origin.hits("/r/fail-1/p"), 1);

    let got = send("POST", addr, "/u/fail-2/p", &[], Bytes::from("payload")).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.text(), "payload", "the body is sent again on each try");
    assert_eq!(origin.hits("/u/fail-2/p"), 3);
    proxy.shutdown().await;
}

/// HMAC-SHA256 (RFC 2104) written out here, so the test does not trust the proxy's own.
fn hmac_sha256(key: &[u8], msg: &[u8]) -> [u8; 32] {
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let pad = |b: u8| k.iter().map(|x| x ^ b).collect::<Vec<u8>>();
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(msg)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

type Delivered = Arc<Mutex<Vec<(HeaderMap, Bytes)>>>;

async fn callback_receiver() -> (Origin, Delivered) {
    let delivered: Delivered = Arc::default();
    let d = delivered.clone();
    let origin = Origin::start(move |req: Request<Incoming>| {
        let d = d.clone();
        async move {
            let headers = req.headers().clone();
            let body = req.into_body().collect().await.unwrap().to_bytes();
            d.lock().unwrap().push((headers, body));
            reply(200, &[], "ok")
        }
    })
    .await;
    (origin, delivered)
}

fn job_routes(dir: &TempDir) -> String {
    routes_file(
        dir,
        r#"
[[routes]]
prefix = "/slow/"
client_deadline_secs = 0.2
"#,
    )
}

#[tokio::test]
async fn a_slow_request_becomes_a_job_whose_result_is_stored_and_called_back_once() {
    let gate = Gate::new();
    let origin = Origin::start_behind(&gate, |req: Request<Incoming>| async move {
        reply(
            200,
            &[
                ("cache-control", "max-age=60"),
                ("content-type", "application/json"),
            ],
            format!("{{\"path\":\"{}\"}}", req.uri().path()),
        )
    })
    .await;
    let (hook, delivered) = callback_receiver().await;
    let dir = TempDir::new("routes-jobs");
    let file = job_routes(&dir);
    let allowed = hook.addr.to_string();
    let proxy = ProxyHandle::start(
        &origin.url(),
        &[
            ("ROUTES_FILE", &file),
            ("CALLBACK_ALLOWED_HOSTS", &allowed),
            ("CALLBACK_SECRET", "whsec-test-0123456789abcdef"),
        ],
    )
    .await;
    let addr = proxy.addr;

    let path = format!("/slow/r?callback=http://{}/hook", hook.addr);
    let accepted = get(addr, &path, &[]).await;
    assert_eq!(accepted.status, 202, "{}", accepted.text());
    let location = accepted.header("location").expect("Location").to_string();
    assert!(location.starts_with("/_edgecache/jobs/"), "{location}");
    let id = location.trim_start_matches("/_edgecache/jobs/").to_string();
    assert!(accepted.text().contains(&id));

    // An identical request while it runs joins the same job: one upstream request.
    let again = get(addr, &path, &[]).await;
    assert_eq!(again.status, 202);
    assert_eq!(again.header("location"), Some(location.as_str()));

    let pending = get(addr, &location, &[]).await;
    assert_eq!(pending.status, 202);
    assert!(pending.text().contains("pending"), "{}", pending.text());

    gate.open();
    let deadline = Instant::now() + Duration::from_secs(10);
    let done = loop {
        let got = get(addr, &location, &[]).await;
        if got.status != 202 {
            break got;
        }
        assert!(Instant::now() < deadline, "the job never finished");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(done.status, 200);
    assert_eq!(done.text(), r#"{"path":"/slow/r"}"#);
    assert_eq!(origin.total(), 1);

    // The result is stored under the request's key (the callback is not part of it).
    let hit = get(addr, "/slow/r", &[]).await;
    assert_eq!((hit.status, hit.cache()), (200, "HIT"));

    assert!(
        eventually(Duration::from_secs(10), || !delivered
            .lock()
            .unwrap()
            .is_empty())
        .await,
        "the callback was delivered"
    );
    let (headers, body) = delivered.lock().unwrap()[0].clone();
    assert_eq!(body.as_ref(), br#"{"path":"/slow/r"}"#);
    let signature = headers
        .get("edgecache-signature")
        .and_then(|v| v.to_str().ok())
        .expect("signed")
        .to_string();
    let t = signature
        .split(',')
        .find_map(|p| p.strip_prefix("t="))
        .expect("t=");
    let v1 = signature
        .split(',')
        .find_map(|p| p.strip_prefix("v1="))
        .expect("v1=");
    let mut msg = format!("{t}.").into_bytes();
    msg.extend_from_slice(&body);
    assert_eq!(
        v1,
        hex(&hmac_sha256(b"whsec-test-0123456789abcdef", &msg)),
        "valid signature"
    );
    // Delivered once: the job is done and the receiver said 200, so nothing is pending.
    let job_done = get(addr, &location, &[]).await;
    assert_eq!(job_done.status, 200);
    assert_eq!(delivered.lock().unwrap().len(), 1, "exactly one delivery");
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_callback_to_a_host_not_allowed_is_refused_before_any_upstream_call() {
    let origin = echo_origin("max-age=60").await;
    let (hook, delivered) = callback_receiver().await;
    let dir = TempDir::new("routes-refused");
    let file = job_routes(&dir);
    let allowed = hook.addr.to_string();
    let proxy = ProxyHandle::start(
        &origin.url(),
        &[
            ("ROUTES_FILE", &file),
            ("CALLBACK_ALLOWED_HOSTS", &allowed),
            ("CALLBACK_SECRET", "whsec-test-0123456789abcdef"),
        ],
    )
    .await;
    for callback in [
        "http://evil.example/hook".to_string(),
        format!("http://{allowed}@evil.example/hook"),
        format!("ftp://{allowed}/hook"),
        "not a url".to_string(),
    ] {
        let got = get(
            proxy.addr,
            &format!("/slow/x?callback={}", callback.replace(' ', "%20")),
            &[],
        )
        .await;
        assert_eq!(got.status, 400, "callback {callback:?}: {}", got.text());
    }
    assert_eq!(origin.total(), 0, "nothing reached the upstream");
    assert!(delivered.lock().unwrap().is_empty());
    proxy.shutdown().await;
}

#[tokio::test]
async fn a_bad_routes_file_is_refused_at_startup_naming_the_route_and_key() {
    let dir = TempDir::new("routes-bad");
    let cases = [
        (
            "[[routes]]\nprefix = \"/a/\"\n\n[[routes]]\nprefix = \"/b/\"\nttl_secs = -1\n",
            &["route 2", "ttl_secs"][..],
        ),
        (
            "[[routes]]\nprefix = \"/a/\"\nttl = 5\n",
            &["route 1", "ttl"][..],
        ),
        ("[[routes]]\nprefix = \"a/\"\n", &["route 1", "prefix"][..]),
        (
            "[[routes]]\nprefix = \"/a/\"\nheaders = { X-Token = \"${NOT_SET_ANYWHERE}\" }\n",
            &["route 1", "headers", "NOT_SET_ANYWHERE"][..],
        ),
        ("[[routes]\nprefix = 1", &["ROUTES_FILE"][..]),
    ];
    for (text, words) in cases {
        let file = routes_file(&dir, text);
        let out = run_to_exit(
            &dir,
            "edgecache",
            edgecache_cmd(
                &dir.path,
                &[
                    ("UPSTREAM_URL", "http://127.0.0.1:9"),
                    ("ROUTES_FILE", &file),
                ],
            ),
        );
        assert_eq!(out.status.code(), Some(2), "{text}\n{}", out.stderr);
        let lines: Vec<_> = out.stderr.lines().filter(|l| !l.is_empty()).collect();
        assert_eq!(lines.len(), 1, "one error line: {}", out.stderr);
        for w in words {
            assert!(lines[0].contains(w), "{w:?} missing in {:?}", lines[0]);
        }
    }
    let out = run_to_exit(
        &dir,
        "edgecache",
        edgecache_cmd(
            &dir.path,
            &[
                ("UPSTREAM_URL", "http://127.0.0.1:9"),
                ("ROUTES_FILE", "/nonexistent/routes.toml"),
            ],
        ),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stderr.contains("ROUTES_FILE"), "{}", out.stderr);
}

#[tokio::test]
async fn injected_tokens_never_reach_the_logs() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let origin = recording_origin(seen.clone()).await;
    let dir = TempDir::new("routes-logs");
    let file = routes_file(
        &dir,
        r#"
[[routes]]
prefix = "/api/"
headers = { Authorization = "Bearer ${UPSTREAM_TOKEN}" }
"#,
    );
    let daemon = Edgecache::start(
        &dir,
        &[
            ("UPSTREAM_URL", &origin.url()),
            ("ROUTES_FILE", &file),
            ("UPSTREAM_TOKEN", "s3cr3t-t0ken"),
            ("RUST_LOG", "trace"),
        ],
    )
    .await;
    assert_eq!(get(daemon.addr, "/api/a", &[]).await.status, 200);
    let status = get(daemon.ops(), "/status", &[]).await;
    assert_eq!(status.status, 200);
    assert!(!status.text().contains("s3cr3t"));
    assert_eq!(seen.lock().unwrap().len(), 1);
    daemon.terminate();
    let mut child = daemon.child;
    child.wait_exit(Duration::from_secs(15));
    let stderr = std::fs::read_to_string(dir.path.join("edgecache.stderr")).unwrap();
    assert!(
        stderr.contains("/api/a"),
        "the request was logged: {stderr}"
    );
    assert!(!stderr.contains("s3cr3t"), "the token was logged");
}

#[tokio::test]
async fn sighup_reloads_the_routes_under_load_without_failing_a_request() {
    let origin = echo_origin("max-age=60").await;
    let dir = TempDir::new("routes-reload");
    let v1 = "allowlist = true\n\n[[routes]]\nprefix = \"/a/\"\n";
    let v2 = "allowlist = true\n\n[[routes]]\nprefix = \"/a/\"\n\n[[routes]]\nprefix = \"/b/\"\n";
    let file = routes_file(&dir, v1);
    let daemon = Edgecache::start(
        &dir,
        &[("UPSTREAM_URL", &origin.url()), ("ROUTES_FILE", &file)],
    )
    .await;
    let addr = daemon.addr;
    assert_eq!(get(addr, "/b/x", &[]).await.status, 404);

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let failures = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let load: Vec<_> = (0..4)
        .map(|w| {
            let (stop, failures, done) = (stop.clone(), failures.clone(), done.clone());
            tokio::spawn(async move {
                let mut i = 0;
                while !stop.load(Ordering::SeqCst) {
                    // Hits and misses, over keep-alive-less connections.
                    let got = get(addr, &format!("/a/{}", (w * 1000 + i) % 50), &[]).await;
                    if got.status != 200 {
                        failures.fetch_add(1, Ordering::SeqCst);
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                    i += 1;
                }
            })
        })
        .collect();
    let pid = daemon.child.0.id().to_string();
    let hup = || {
        let status = std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap();
        assert!(status.success());
    };
    std::fs::write(&file, v2).unwrap();
    hup();
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(addr, "/b/x", &[]).await.status != 200 {
        assert!(Instant::now() < deadline, "the new route never applied");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // An invalid file is logged and the routes in force stay.
    std::fs::write(&file, "[[routes]]\nprefix = \"no-slash\"\n").unwrap();
    hup();
    assert!(
        eventually(Duration::from_secs(10), || daemon
            .stderr()
            .contains("no-slash"))
        .await,
        "the rejected reload is logged: {}",
        daemon.stderr()
    );
    assert_eq!(get(addr, "/b/x", &[]).await.status, 200);
    let before = done.load(Ordering::SeqCst);
    assert!(
        eventually(Duration::from_secs(10), || done.load(Ordering::SeqCst)
            > before + 20)
        .await
    );
    stop.store(true, Ordering::SeqCst);
    for t in load {
        t.await.unwrap();
    }
    assert_eq!(failures.load(Ordering::SeqCst), 0, "no request failed");
    assert!(
        daemon.stderr().contains("routes reloaded"),
        "{}",
        daemon.stderr()
    );
}
