//! The job registry, the job URL's answers, callback URL checks and callback delivery —
//! the last against a real HTTP server on 127.0.0.1, and with a fake receiver on paused time
//! for the backoff schedule.

use std::collections::HashSet;
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::Mutex as StdMutex;
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::callback::{parse_retry_after, Attempt};
use super::respond;
use super::sign::verify;
use super::*;
use crate::config::{CallbackHost, CallbackSecret};
use crate::supervise::Background;

const SECRET: &[u8] = b"0123456789abcdef-test-secret";

fn hash(n: u8) -> RequestHash {
    request_hash(&[b"GET", &[n]])
}

fn allowed(list: &[&str]) -> Vec<CallbackHost> {
    list.iter()
        .map(|h| CallbackHost::parse(h).unwrap())
        .collect()
}

fn target(url: &str) -> CallbackTarget {
    let host = url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    CallbackTarget::parse(url, &allowed(&[&host])).unwrap()
}

fn result(status: u16, body: &'static str) -> JobResult {
    let mut h = HeaderMap::new();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    JobResult::new(StatusCode::from_u16(status).unwrap(), &h, Bytes::from(body))
}

async fn body_json(resp: Response<Bytes>) -> serde_json::Value {
    serde_json::from_slice(resp.body()).unwrap()
}

// --- Ids and paths ---

#[test]
fn ids_are_128_random_bits_in_lower_case_hex() {
    let ids: HashSet<String> = (0..1000)
        .map(|_| JobId::random().unwrap().to_string())
        .collect();
    assert_eq!(ids.len(), 1000);
    for id in &ids {
        assert_eq!(id.len(), 32, "{id}");
        assert!(
            id.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            "{id}"
        );
        let parsed: JobId = id.parse().unwrap();
        assert_eq!(&parsed.to_string(), id);
        assert_eq!(parsed.location(), format!("/_edgecache/jobs/{id}"));
        assert_eq!(parse_job_path(&parsed.location()), Some(Some(parsed)));
    }
    let id = ids.iter().next().unwrap();
    for bad in [
        id.to_uppercase(),
        id[..31].to_owned(),
        format!("{id}0"),
        format!("{id}/"),
        format!("+{}", &id[1..]),
        format!("{}g", &id[..31]),
        String::new(),
    ] {
        assert!(bad.parse::<JobId>().is_err(), "{bad}");
        assert_eq!(
            parse_job_path(&format!("{JOBS_PATH}{bad}")),
            Some(None),
            "{bad}"
        );
    }
    assert_eq!(parse_job_path("/_edgecache/jobs"), None);
    assert_eq!(parse_job_path("/api/jobs/x"), None);
}

#[test]
fn request_hash_separates_its_parts() {
    assert_ne!(request_hash(&[b"ab", b"c"]), request_hash(&[b"a", b"bc"]));
    assert_eq!(request_hash(&[b"GET", b"k"]), request_hash(&[b"GET", b"k"]));
}

// --- The registry ---

#[test]
fn identical_requests_in_flight_share_one_job() {
    let jobs = Jobs::with_limits(100, Duration::from_secs(60));
    let t0 = Instant::now();
    let (a, how) = jobs.start(hash(1), None, t0).unwrap();
    assert_eq!(how, Started::New);
    assert_eq!(
        jobs.start(hash(1), None, t0).unwrap(),
        (a, Started::Existing)
    );
    let (b, how) = jobs.start(hash(2), None, t0).unwrap();
    assert_eq!(how, Started::New);
    assert_ne!(a, b);
    assert_eq!(jobs.counts(), (2, 0));
    assert_eq!(jobs.complete(&a, result(200, "{}"), t0), Some(vec![]));
    // A finished job is not joined: the same request later is a new job.
    let (c, how) = jobs.start(hash(1), None, t0).unwrap();
    assert_eq!(how, Started::New);
    assert_ne!(c, a);
    assert_eq!(jobs.counts(), (2, 1));
}

#[test]
fn each_callback_url_of_a_job_is_delivered_once() {
    let jobs = Jobs::with_limits(100, Duration::from_secs(60));
    let t0 = Instant::now();
    let a = target("http://hooks.example:8080/a");
    let b = target("http://hooks.example:8080/b");
    let (id, _) = jobs.start(hash(1), Some(a.clone()), t0).unwrap();
    jobs.start(hash(1), Some(a.clone()), t0).unwrap();
    jobs.start(hash(1), Some(b.clone()), t0).unwrap();
    jobs.start(hash(1), None, t0).unwrap();
    let deliveries = jobs.complete(&id, result(201, "done"), t0).unwrap();
    let targets: Vec<_> = deliveries.iter().map(|d| d.target.clone()).collect();
    assert_eq!(targets, [a, b]);
    for d in &deliveries {
        assert_eq!(
            (d.job, d.status, &d.body[..]),
            (id, StatusCode::CREATED, &b"done"[..])
        );
        assert_eq!(d.content_type.as_ref().unwrap(), "application/json");
    }
    // Ended once: a second end is refused, and delivers nothing.
    assert_eq!(jobs.complete(&id, result(200, "again"), t0), None);
    assert_eq!(jobs.fail(&id, "late", t0), None);
    assert_eq!(
        jobs.complete(&JobId::random().unwrap(), result(200, ""), t0),
        None
    );
}

#[test]
fn a_job_takes_a_bounded_number_of_callback_urls() {
    let jobs = Jobs::with_limits(100, Duration::from_secs(60));
    let t0 = Instant::now();
    let url = |i: usize| target(&format!("http://hooks.example:8080/{i}"));
    let (id, _) = jobs.start(hash(1), Some(url(0)), t0).unwrap();
    for i in 1..MAX_CALLBACKS_PER_JOB {
        jobs.start(hash(1), Some(url(i)), t0).unwrap();
    }
    assert_eq!(
        jobs.start(hash(1), Some(url(99)), t0),
        Err(StartError::TooManyCallbacks)
    );
    // One it has already, or none, still joins.
    assert_eq!(
        jobs.start(hash(1), Some(url(3)), t0),
        Ok((id, Started::Existing))
    );
    assert_eq!(jobs.start(hash(1), None, t0), Ok((id, Started::Existing)));
    let deliveries = jobs.fail(&id, "upstream timed out", t0).unwrap();
    assert_eq!(deliveries.len(), MAX_CALLBACKS_PER_JOB);
}

#[test]
fn the_number_of_jobs_is_bounded() {
    let age = Duration::from_secs(60);
    let jobs = Jobs::with_limits(3, age);
    let t0 = Instant::now();
    let ids: Vec<JobId> = (1..=3)
        .map(|n| jobs.start(hash(n), None, t0).unwrap().0)
        .collect();
    let t1 = t0 + Duration::from_secs(10);
    let full = jobs.start(hash(4), None, t1).unwrap_err();
    assert_eq!(
        full,
        StartError::Full {
            retry_after: Duration::from_secs(50)
        }
    );
    let resp = respond::unavailable(&full);
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(resp.headers()[header::RETRY_AFTER], "50");
    // Joining an identical request's job needs no room.
    assert_eq!(
        jobs.start(hash(2), None, t1),
        Ok((ids[1], Started::Existing))
    );
    // A finished job still holds its slot until it is forgotten.
    jobs.complete(&ids[0], result(200, "x"), t1).unwrap();
    assert!(matches!(
        jobs.start(hash(4), None, t1),
        Err(StartError::Full { .. })
    ));
    // At t0 + 60 s the two pending ones expire (and hold their slots another 60 s); the
    // finished one is forgotten at t1 + 60 s.
    let t2 = t1 + age;
    assert_eq!(jobs.start(hash(4), None, t2).unwrap().1, Started::New);
    assert!(matches!(
        jobs.start(hash(5), None, t2),
        Err(StartError::Full { .. })
    ));
    let mut out = String::new();
    jobs.render_metrics(&mut out);
    assert!(
        out.contains("edgecache_jobs_refused_total{reason=\"full\"} 3\n"),
        "{out}"
    );
    assert!(
        out.contains("edgecache_jobs{state=\"pending\"} 1\n"),
        "{out}"
    );
    assert!(
        out.contains("edgecache_jobs{state=\"finished\"} 2\n"),
        "{out}"
    );
    assert!(
        out.contains("edgecache_jobs_finished_total{result=\"expired\"} 2\n"),
        "{out}"
    );
    assert!(
        out.contains("edgecache_jobs_started_total{how=\"joined\"} 1\n"),
        "{out}"
    );
    assert!(out.contains("# TYPE edgecache_jobs gauge\n"), "{out}");
}

#[test]
fn pending_jobs_expire_and_finished_ones_are_forgotten() {
    let age = Duration::from_secs(10);
    let jobs = Jobs::with_limits(100, age);
    let t0 = Instant::now();
    let at = |s: u64| t0 + Duration::from_secs(s);
    let (slow, _) = jobs
        .start(hash(1), Some(target("http://hooks.example:8080/")), t0)
        .unwrap();
    let (quick, _) = jobs.start(hash(2), None, t0).unwrap();
    assert_eq!(
        jobs.get(&slow, at(9)),
        Some(JobView::Pending {
            age: Duration::from_secs(9)
        })
    );
    jobs.complete(&quick, result(200, "quick"), at(5)).unwrap();
    // Pending past the age: failed as expired (from the first call that sees it, here at
    // its deadline); no longer joined; a late result is dropped.
    match jobs.get(&slow, at(10)) {
        Some(JobView::Failed { reason }) => assert!(reason.starts_with("expired"), "{reason}"),
        other => panic!("{other:?}"),
    }
    assert!(matches!(jobs.get(&quick, at(14)), Some(JobView::Done(r)) if r.body == "quick"));
    assert_eq!(jobs.complete(&slow, result(200, "late"), at(11)), None);
    let (again, how) = jobs.start(hash(1), None, at(11)).unwrap();
    assert_eq!(how, Started::New);
    assert_ne!(again, slow);
    // Finished jobs are forgotten an age after they finished.
    assert_eq!(jobs.get(&quick, at(15)), None);
    assert!(jobs.get(&slow, at(19)).is_some());
    assert_eq!(
        jobs.sweep(at(20)),
        Swept {
            expired: 0,
            forgotten: 1
        }
    );
    assert_eq!(jobs.get(&slow, at(20)), None);
    assert_eq!(
        jobs.sweep(at(21)),
        Swept {
            expired: 1,
            forgotten: 0
        }
    );
    assert_eq!(
        jobs.sweep(at(31)),
        Swept {
            expired: 0,
            forgotten: 1
        }
    );
    assert_eq!(jobs.counts(), (0, 0));
    let mut out = String::new();
    jobs.render_metrics(&mut out);
    assert!(out.contains("edgecache_jobs_result_bytes 0\n"), "{out}");
}

#[tokio::test(start_paused = true)]
async fn the_sweeper_frees_memory_while_idle() {
    let jobs = Arc::new(Jobs::with_limits(100, Duration::from_secs(5)));
    let (id, _) = jobs.start(hash(1), None, Instant::now()).unwrap();
    jobs.complete(&id, result(200, "body"), Instant::now())
        .unwrap();
    let sweeper = tokio::spawn({
        let jobs = jobs.clone();
        async move { jobs.sweep_every(Duration::from_secs(1)).await }
    });
    assert_eq!(jobs.counts(), (0, 1));
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert_eq!(jobs.counts(), (0, 0));
    sweeper.abort();
}

#[test]
fn results_keep_end_to_end_headers_only() {
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("connection", "keep-alive, x-hop"),
        ("x-hop", "1"),
        ("keep-alive", "timeout=5"),
        ("transfer-encoding", "chunked"),
        ("content-length", "4"),
        ("set-cookie", "session=1"),
        ("content-type", "text/plain"),
        ("etag", "\"v1\""),
        ("x-custom", "kept"),
    ] {
        h.append(
            header::HeaderName::from_static(k),
            HeaderValue::from_static(v),
        );
    }
    let r = JobResult::new(StatusCode::OK, &h, Bytes::from_static(b"body"));
    let mut names: Vec<&str> = r.headers.keys().map(|k| k.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["content-type", "etag", "x-custom"]);
}

#[test]
fn a_failed_job_tells_its_callbacks_in_json() {
    let jobs = Jobs::with_limits(10, Duration::from_secs(60));
    let t0 = Instant::now();
    let (id, _) = jobs
        .start(hash(1), Some(target("http://hooks.example:8080/")), t0)
        .unwrap();
    let deliveries = jobs.fail(&id, "upstream\ntimed out", t0).unwrap();
    let d = &deliveries[0];
    assert_eq!(d.status, StatusCode::BAD_GATEWAY);
    assert_eq!(d.content_type.as_ref().unwrap(), "application/json");
    let json: serde_json::Value = serde_json::from_slice(&d.body).unwrap();
    assert_eq!(json["status"], "failed");
    assert_eq!(json["id"], id.to_string());
    assert_eq!(json["reason"], "upstream timed out");
    assert_eq!(
        jobs.get(&id, t0),
        Some(JobView::Failed {
            reason: "upstream timed out".into()
        })
    );
}

// --- The job URL's answers ---

#[tokio::test]
async fn the_first_answer_is_202_with_the_job_url() {
    let id = JobId::random().unwrap();
    let resp = respond::accepted(&id);
    assert_eq!(resp.status(), StatusCode::ACCEPTED);
    let location = format!("/_edgecache/jobs/{id}");
    assert_eq!(resp.headers()[header::LOCATION], location.as_str());
    assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
    assert_eq!(resp.headers()[header::CACHE_CONTROL], "no-store");
    assert_eq!(resp.headers()[header::CONTENT_TYPE], "application/json");
    assert_eq!(
        body_json(resp).await,
        serde_json::json!({"id": id.to_string(), "status": "pending", "location": location})
    );
}

#[tokio::test]
async fn the_job_url_answers_pending_then_the_result() {
    let jobs = Jobs::with_limits(10, Duration::from_secs(60));
    let t0 = Instant::now();
    let (id, _) = jobs.start(hash(1), None, t0).unwrap();

    let pending = respond::job(&id, jobs.get(&id, t0));
    assert_eq!(pending.status(), StatusCode::ACCEPTED);
    assert_eq!(pending.headers()[header::RETRY_AFTER], "1");
    assert_eq!(pending.headers()[header::CACHE_CONTROL], "no-store");
    assert_eq!(
        pending.headers()["x-edgecache-job"],
        id.to_string().as_str()
    );
    assert_eq!(
        body_json(pending).await,
        serde_json::json!({"id": id.to_string(), "status": "pending"})
    );

    let mut h = HeaderMap::new();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/csv"));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("max-age=60"),
    );
    jobs.complete(
        &id,
        JobResult::new(StatusCode::IM_A_TEAPOT, &h, Bytes::from("a,b")),
        t0,
    )
    .unwrap();
    let done = respond::job(&id, jobs.get(&id, t0));
    assert_eq!(done.status(), StatusCode::IM_A_TEAPOT);
    assert_eq!(done.headers()[header::CONTENT_TYPE], "text/csv");
    assert_eq!(done.headers()[header::CACHE_CONTROL], "max-age=60");
    assert_eq!(done.headers()["x-edgecache-job"], id.to_string().as_str());
    assert_eq!(done.body(), "a,b");

    let unknown = respond::job(&id, None);
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    assert_eq!(respond::not_found().status(), StatusCode::NOT_FOUND);
    let failed = respond::job(
        &id,
        Some(JobView::Failed {
            reason: "upstream \"down\"".into(),
        }),
    );
    assert_eq!(failed.status(), StatusCode::BAD_GATEWAY);
    assert_eq!(
        body_json(failed).await,
        serde_json::json!({"id": id.to_string(), "status": "failed", "reason": "upstream \"down\""})
    );
    let post = respond::method_not_allowed();
    assert_eq!(post.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(post.headers()[header::ALLOW], "GET, HEAD");
}

#[tokio::test]
async fn a_refused_callback_is_a_400_with_the_reason() {
    let why = CallbackTarget::parse("http://evil:80/", &allowed(&["hooks:80"])).unwrap_err();
    let resp = respond::callback_refused(&why);
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    let json = body_json(resp).await;
    assert_eq!(json["error"], "callback refused");
    assert_eq!(json["reason"], "callbacks to evil:80 are not allowed");
}

// --- Callback URLs ---

#[test]
fn callback_urls_must_name_an_allowed_host_and_port() {
    use CallbackRefused::*;
    let list = allowed(&[
        "allowed:80",
        "hooks.example.com:8080",
        "127.0.0.1:9000",
        "[::1]:9001",
    ]);
    let ok = |raw: &str, want: &str| {
        let t = CallbackTarget::parse(raw, &list).unwrap_or_else(|e| panic!("{raw}: {e}"));
        assert_eq!(t.uri().to_string(), want, "{raw}");
    };
    ok("http://allowed/", "http://allowed:80/");
    ok("http://allowed", "http://allowed:80/");
    ok("http://allowed:80?x=1", "http://allowed:80/?x=1");
    ok("http://ALLOWED:80/Path?Q=1", "http://allowed:80/Path?Q=1");
    ok("HTTP://Allowed:080/", "http://allowed:80/");
    ok(
        "http://hooks.example.com:8080/x/y?token=abc",
        "http://hooks.example.com:8080/x/y?token=abc",
    );
    ok("http://127.0.0.1:9000/hook", "http://127.0.0.1:9000/hook");
    ok("http://[::1]:9001/", "http://[::1]:9001/");
    ok("http://[0:0::1]:9001/", "http://[::1]:9001/");

    let refused = |raw: &str, want: CallbackRefused| {
        assert_eq!(CallbackTarget::parse(raw, &list), Err(want), "{raw}");
    };
    // Userinfo: `allowed:80@` would be credentials for host `evil`.
    refused("http://allowed:80@evil/", Userinfo);
    refused("http://user:pw@allowed:80/", Userinfo);
    refused("http://@allowed/", Userinfo);
    refused("http://evil/@allowed:80", NotAllowed("evil:80".into()));
    refused("http://allowed:80\\@evil/", Malformed);
    refused("http://allowed:80%40evil/", Malformed);
    // Host and port must match an entry exactly.
    refused("http://allowed:8080/", NotAllowed("allowed:8080".into()));
    refused(
        "http://hooks.example.com/",
        NotAllowed("hooks.example.com:80".into()),
    );
    refused("http://sub.allowed/", NotAllowed("sub.allowed:80".into()));
    refused("http://allowed./", NotAllowed("allowed.:80".into()));
    refused(
        "http://127.0.0.1:9001/",
        NotAllowed("127.0.0.1:9001".into()),
    );
    refused(
        "http://2130706433:9000/",
        NotAllowed("2130706433:9000".into()),
    );
    refused(
        "http://localhost:9000/",
        NotAllowed("localhost:9000".into()),
    );
    refused("http://[::1]/", NotAllowed("[::1]:80".into()));
    // Other schemes.
    refused("https://allowed/", Scheme);
    refused("ftp://allowed:80/", Scheme);
    refused("javascript:alert(1)", Malformed);
    refused("file:///etc/passwd", Scheme);
    // Not an absolute URL, or not a clean one.
    for raw in [
        "//allowed:80/",
        "allowed:80",
        "/hook",
        "http:/allowed",
        "http:///path",
        "http://allowed:80/#frag",
        "http://allowed :80/",
        "http://allowed:/",
        "http://allowed:0/",
        "http://allowed:65536/",
        "http://allowed:+80/",
        "http://%61llowed/",
        "http://[::1:9001/",
        "http://[::1]x:9001/",
        "http://allowed/\u{e9}",
        "http://allowed/\r\nX-Injected: 1",
        "://allowed/",
    ] {
        refused(raw, Malformed);
    }
    refused("", Empty);
    refused(&format!("http://allowed/{}", "a".repeat(2048)), TooLong);
    assert_eq!(CallbackTarget::parse("http://allowed/", &[]), Err(Disabled));
}

#[test]
fn the_callback_parameter_is_taken_out_of_the_query() {
    let split = |q: Option<&str>| split_callback(q);
    assert_eq!(split(None), Ok((None, None)));
    assert_eq!(split(Some("a=1")), Ok((None, Some("a=1".into()))));
    assert_eq!(
        split(Some(
            "a=1&callback=http%3A%2F%2Fallowed%3A80%2Fh%3Fx%3D1%26y%3D2&b=%zz"
        )),
        Ok((
            Some("http://allowed:80/h?x=1&y=2".into()),
            Some("a=1&b=%zz".into())
        ))
    );
    assert_eq!(
        split(Some("callback=http://allowed/")),
        Ok((Some("http://allowed/".into()), None))
    );
    assert_eq!(split(Some("callback")), Ok((Some(String::new()), None)));
    assert_eq!(
        split(Some("Callback=x&callbacks=y")),
        Ok((None, Some("Callback=x&callbacks=y".into())))
    );
    assert_eq!(
        split(Some("callback=a&callback=b")),
        Err(CallbackRefused::Repeated)
    );
    for bad in ["callback=%zz", "callback=%e9", "callback=%", "callback=%4"] {
        assert_eq!(split(Some(bad)), Err(CallbackRefused::Encoding), "{bad}");
    }
}

// --- Delivery ---

fn policy() -> RetryPolicy {
    RetryPolicy {
        attempts: 5,
        first_backoff: Duration::from_millis(1),
        max_backoff: Duration::from_millis(4),
        attempt_timeout: Duration::from_secs(10),
    }
}

#[test]
fn backoff_doubles_with_jitter_within_bounds() {
    let p = RetryPolicy {
        first_backoff: Duration::from_secs(1),
        max_backoff: Duration::from_secs(8),
        ..RetryPolicy::default()
    };
    let secs = |retry, jitter, hint| p.backoff(retry, jitter, hint).as_secs_f64();
    assert_eq!((secs(1, 0.0, None), secs(1, 1.0, None)), (0.5, 1.0));
    assert_eq!((secs(2, 0.0, None), secs(2, 1.0, None)), (1.0, 2.0));
    assert_eq!((secs(4, 0.0, None), secs(4, 1.0, None)), (4.0, 8.0));
    assert_eq!((secs(40, 0.0, None), secs(u32::MAX, 1.0, None)), (4.0, 8.0));
    assert_eq!(secs(1, 0.5, Some(Duration::from_secs(3))), 3.0);
    assert_eq!(secs(1, 0.5, Some(Duration::from_secs(3600))), 8.0);
    let d = RetryPolicy::default();
    assert_eq!(
        (d.attempts, d.attempt_timeout),
        (5, Duration::from_secs(10))
    );
}

#[test]
fn retry_after_is_seconds_or_a_date() {
    let now = std::time::SystemTime::now();
    let v = |s: &str| HeaderValue::from_str(s).unwrap();
    assert_eq!(
        parse_retry_after(&v("7"), now),
        Some(Duration::from_secs(7))
    );
    let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
    let got = parse_retry_after(&v(&later), now).unwrap();
    assert!(
        (Duration::from_secs(29)..=Duration::from_secs(30)).contains(&got),
        "{got:?}"
    );
    let past = httpdate::fmt_http_date(now - Duration::from_secs(30));
    assert_eq!(parse_retry_after(&v(&past), now), Some(Duration::ZERO));
    assert_eq!(parse_retry_after(&v("soon"), now), None);
}

fn delivery(url: &str) -> Delivery {
    let jobs = Jobs::with_limits(10, Duration::from_secs(60));
    let (id, _) = jobs
        .start(hash(1), Some(target(url)), Instant::now())
        .unwrap();
    let mut h = HeaderMap::new();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(
        header::CONTENT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    let r = JobResult::new(StatusCode::OK, &h, Bytes::from_static(br#"{"answer":42}"#));
    jobs.complete(&id, r, Instant::now()).unwrap().remove(0)
}

#[test]
fn a_delivery_is_a_signed_post() {
    let d = delivery("http://hooks.example:8080/hook?token=t");
    let req = d.request(SECRET, 1_700_000_000);
    assert_eq!(req.method(), http::Method::POST);
    assert_eq!(req.uri(), "http://hooks.example:8080/hook?token=t");
    let h = req.headers();
    let sig = h["edgecache-signature"].to_str().unwrap();
    assert!(sig.starts_with("t=1700000000,v1="), "{sig}");
    assert_eq!(
        verify(SECRET, sig, br#"{"answer":42}"#, 1_700_000_100, 300),
        Ok(())
    );
    assert_eq!(h["edgecache-job"], d.job.to_string().as_str());
    assert_eq!(h["edgecache-status"], "200");
    assert_eq!(h[header::CONTENT_TYPE], "application/json");
    assert_eq!(h[header::CONTENT_ENCODING], "identity");
    assert!(h[header::USER_AGENT]
        .to_str()
        .unwrap()
        .starts_with("edgecache/"));
    assert_eq!(d.target.for_log(), "http://hooks.example:8080/hook");
}

fn answered(status: u16) -> Attempt {
    Attempt::Answered {
        status: StatusCode::from_u16(status).unwrap(),
        retry_after: None,
    }
}

/// One fake attempt.
type FakeAnswer = std::pin::Pin<Box<dyn std::future::Future<Output = Attempt> + Send>>;

/// A fake receiver that answers from `script` (the last answer repeats; `None` never
/// answers), counting the attempts in `calls`.
fn scripted(
    script: Vec<Option<Attempt>>,
    calls: &Arc<StdMutex<u32>>,
) -> impl FnMut(Request<Full<Bytes>>) -> FakeAnswer {
    let seen = calls.clone();
    move |_req: Request<Full<Bytes>>| -> FakeAnswer {
        let mut n = seen.lock().unwrap();
        let answer = script[(*n as usize).min(script.len() - 1)].clone();
        *n += 1;
        match answer {
            Some(a) => Box::pin(async move { a }),
            None => Box::pin(std::future::pending()),
        }
    }
}

/// A fresh attempt counter.
fn counter() -> Arc<StdMutex<u32>> {
    Arc::new(StdMutex::new(0))
}

/// Backoff on paused time: 503, 503, 200 pause between 0.5–1 s then 1–2 s; a receiver
/// that never answers costs an attempt timeout per attempt; Retry-After lengthens a pause.
#[tokio::test(start_paused = true)]
async fn retries_back_off_on_the_clock() {
    let p = RetryPolicy {
        attempts: 3,
        first_backoff: Duration::from_secs(1),
        max_backoff: Duration::from_secs(60),
        attempt_timeout: Duration::from_secs(10),
    };
    let callbacks = Callbacks::new(Some(CallbackSecret::new(SECRET)), p);
    let d = delivery("http://hooks.example:8080/");

    let calls = counter();
    let send = scripted(
        vec![
            Some(answered(503)),
            Some(answered(503)),
            Some(answered(200)),
        ],
        &calls,
    );
    let start = Instant::now();
    assert_eq!(
        callbacks.deliver_via(&d, send).await,
        Outcome::Delivered { attempts: 3 }
    );
    let took = start.elapsed();
    assert!(
        (Duration::from_millis(1500)..=Duration::from_secs(3)).contains(&took),
        "{took:?}"
    );
    assert_eq!(*calls.lock().unwrap(), 3);

    let calls = counter();
    let send = scripted(vec![None], &calls);
    let start = Instant::now();
    let outcome = callbacks.deliver_via(&d, send).await;
    assert_eq!(
        outcome,
        Outcome::Exhausted {
            attempts: 3,
            last: "timed out".into()
        }
    );
    let took = start.elapsed();
    assert!(
        (Duration::from_millis(31_500)..=Duration::from_secs(33)).contains(&took),
        "{took:?}"
    );
    assert_eq!(*calls.lock().unwrap(), 3);

    let busy = Attempt::Answered {
        status: StatusCode::TOO_MANY_REQUESTS,
        retry_after: Some(Duration::from_secs(7)),
    };
    let send = scripted(vec![Some(busy), Some(answered(204))], &counter());
    let start = Instant::now();
    assert_eq!(
        callbacks.deliver_via(&d, send).await,
        Outcome::Delivered { attempts: 2 }
    );
    assert!(start.elapsed() >= Duration::from_secs(7));

    let mut out = String::new();
    callbacks.render_metrics(&mut out);
    assert!(
        out.contains("edgecache_callbacks_total{result=\"delivered\"} 2\n"),
        "{out}"
    );
    assert!(
        out.contains("edgecache_callbacks_total{result=\"failed\"} 1\n"),
        "{out}"
    );
    assert!(
        out.contains("edgecache_callback_retries_total 5\n"),
        "{out}"
    );
    assert!(out.contains("edgecache_callbacks_in_flight 0\n"), "{out}");
}

#[tokio::test(start_paused = true)]
async fn nothing_is_sent_unsigned_or_retried_after_a_refusal() {
    let d = delivery("http://hooks.example:8080/");
    let unsigned = Callbacks::new(None, policy());
    let calls = counter();
    let send = scripted(vec![Some(answered(200))], &calls);
    assert_eq!(unsigned.deliver_via(&d, send).await, Outcome::Unsigned);
    assert_eq!(*calls.lock().unwrap(), 0);

    let callbacks = Callbacks::new(Some(CallbackSecret::new(SECRET)), policy());
    for status in [400, 404, 301, 410] {
        let calls = counter();
        let send = scripted(vec![Some(answered(status)), Some(answered(200))], &calls);
        let outcome = callbacks.deliver_via(&d, send).await;
        let status = StatusCode::from_u16(status).unwrap();
        assert_eq!(
            outcome,
            Outcome::Rejected {
                status,
                attempts: 1
            }
        );
        assert_eq!(*calls.lock().unwrap(), 1);
    }
    for status in [408, 429, 500, 502, 503] {
        let calls = counter();
        let send = scripted(vec![Some(answered(status)), Some(answered(200))], &calls);
        let outcome = callbacks.deliver_via(&d, send).await;
        assert_eq!(outcome, Outcome::Delivered { attempts: 2 }, "{status}");
        assert_eq!(*calls.lock().unwrap(), 2);
    }
}

// --- Delivery to a real receiver on 127.0.0.1 ---

/// One request as the receiver saw it.
#[derive(Debug)]
struct Received {
    uri: String,
    method: http::Method,
    headers: HeaderMap,
    body: Bytes,
}

/// An HTTP/1.1 receiver on 127.0.0.1 answering from `script` (the last status repeats);
/// every request it took is sent on the channel before it is answered.
async fn receiver(script: Vec<u16>) -> (u16, mpsc::UnboundedReceiver<Received>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::unbounded_channel();
    let script = Arc::new(script);
    let calls = Arc::new(StdMutex::new(0usize));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let (tx, script, calls) = (tx.clone(), script.clone(), calls.clone());
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                        let (tx, script, calls) = (tx.clone(), script.clone(), calls.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.unwrap().to_bytes();
                            let status = {
                                let mut n = calls.lock().unwrap();
                                let s = script[(*n).min(script.len() - 1)];
                                *n += 1;
                                s
                            };
                            let _ = tx.send(Received {
                                uri: parts.uri.to_string(),
                                method: parts.method,
                                headers: parts.headers,
                                body,
                            });
                            let mut resp = Response::new(Full::new(Bytes::from_static(b"ok")));
                            *resp.status_mut() = StatusCode::from_u16(status).unwrap();
                            Ok::<_, Infallible>(resp)
                        }
                    });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await;
            });
        }
    });
    (port, rx)
}

/// A job with one callback to the receiver on `port`, completed: its delivery.
fn completed_job(port: u16) -> (Jobs, JobId, Delivery) {
    let allowed = allowed(&[&format!("127.0.0.1:{port}")]);
    let (raw, rest) = split_callback(Some(&format!(
        "q=1&callback=http%3A%2F%2F127.0.0.1%3A{port}%2Fhook%3Ftoken%3Dabc"
    )))
    .unwrap();
    assert_eq!(rest.as_deref(), Some("q=1"));
    let target = CallbackTarget::parse(&raw.unwrap(), &allowed).unwrap();
    let jobs = Jobs::with_limits(10, Duration::from_secs(60));
    let now = Instant::now();
    let (id, _) = jobs.start(hash(7), Some(target.clone()), now).unwrap();
    assert_eq!(
        jobs.start(hash(7), Some(target), now).unwrap(),
        (id, Started::Existing)
    );
    let mut deliveries = jobs
        .complete(&id, result(200, r#"{"answer":42}"#), now)
        .unwrap();
    assert_eq!(deliveries.len(), 1);
    (jobs, id, deliveries.remove(0))
}

fn assert_signed(r: &Received, id: &JobId) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let sig = r.headers["edgecache-signature"].to_str().unwrap();
    assert_eq!(verify(SECRET, sig, &r.body, now, 300), Ok(()), "{sig}");
    assert_eq!(r.method, http::Method::POST);
    assert_eq!(r.uri, "/hook?token=abc");
    assert_eq!(r.headers["edgecache-job"], id.to_string().as_str());
    assert_eq!(r.headers["edgecache-status"], "200");
    assert_eq!(r.headers[header::CONTENT_TYPE], "application/json");
    assert_eq!(r.body, r#"{"answer":42}"#);
}

#[tokio::test]
async fn a_callback_is_delivered_once_with_a_valid_signature() {
    let (port, mut rx) = receiver(vec![200]).await;
    let (_jobs, id, d) = completed_job(port);
    let callbacks = Callbacks::new(Some(CallbackSecret::new(SECRET)), policy());
    assert_eq!(
        callbacks.deliver(&d).await,
        Outcome::Delivered { attempts: 1 }
    );
    let r = rx.try_recv().unwrap();
    assert_signed(&r, &id);
    assert!(rx.try_recv().is_err(), "a second POST");
    let mut out = String::new();
    callbacks.render_metrics(&mut out);
    assert!(
        out.contains("edgecache_callbacks_total{result=\"delivered\"} 1\n"),
        "{out}"
    );
    assert!(
        out.contains("edgecache_callback_retries_total 0\n"),
        "{out}"
    );
}

#[tokio::test]
async fn a_receiver_failing_twice_gets_three_attempts_and_one_delivery() {
    let (port, mut rx) = receiver(vec![503, 503, 200]).await;
    let (_jobs, id, d) = completed_job(port);
    let callbacks = Callbacks::new(Some(CallbackSecret::new(SECRET)), policy());
    assert_eq!(
        callbacks.deliver(&d).await,
        Outcome::Delivered { attempts: 3 }
    );
    for _ in 0..3 {
        assert_signed(&rx.try_recv().unwrap(), &id);
    }
    assert!(rx.try_recv().is_err(), "a fourth POST");
    let mut out = String::new();
    callbacks.render_metrics(&mut out);
    assert!(
        out.contains("edgecache_callbacks_total{result=\"delivered\"} 1\n"),
        "{out}"
    );
    assert!(
        out.contains("edgecache_callbacks_total{result=\"failed\"} 0\n"),
        "{out}"
    );
    assert!(
        out.contains("edgecache_callback_retries_total 2\n"),
        "{out}"
    );
}

#[tokio::test]
async fn a_400_is_not_retried() {
    let (port, mut rx) = receiver(vec![400, 200]).await;
    let (_jobs, id, d) = completed_job(port);
    let callbacks = Callbacks::new(Some(CallbackSecret::new(SECRET)), policy());
    assert_eq!(
        callbacks.deliver(&d).await,
        Outcome::Rejected {
            status: StatusCode::BAD_REQUEST,
            attempts: 1
        }
    );
    assert_signed(&rx.try_recv().unwrap(), &id);
    assert!(rx.try_recv().is_err(), "retried after a 400");
    let mut out = String::new();
    callbacks.render_metrics(&mut out);
    assert!(
        out.contains("edgecache_callbacks_total{result=\"failed\"} 1\n"),
        "{out}"
    );
}

#[tokio::test]
async fn an_unreachable_receiver_is_given_up_after_the_last_attempt() {
    // A port nobody listens on any more.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let (_jobs, _id, d) = completed_job(port);
    let callbacks = Callbacks::new(Some(CallbackSecret::new(SECRET)), policy());
    match callbacks.deliver(&d).await {
        Outcome::Exhausted { attempts: 5, last } => assert!(!last.is_empty()),
        other => panic!("{other:?}"),
    }
    let mut out = String::new();
    callbacks.render_metrics(&mut out);
    assert!(
        out.contains("edgecache_callback_retries_total 4\n"),
        "{out}"
    );
}

/// [`Callbacks::spawn`] runs the delivery on the background tree.
#[tokio::test]
async fn spawned_deliveries_run_on_the_background_tree() {
    let (port, mut rx) = receiver(vec![200]).await;
    let (_jobs, id, d) = completed_job(port);
    let callbacks = Arc::new(Callbacks::new(Some(CallbackSecret::new(SECRET)), policy()));
    let background = Background::new();
    callbacks.spawn(&background, vec![d]);
    let r = tokio::time::timeout(Duration::from_secs(30), rx.recv())
        .await
        .unwrap()
        .unwrap();
    assert_signed(&r, &id);
    assert_eq!(background.shutdown(Duration::from_secs(5)).await, 0);
}
