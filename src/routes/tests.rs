use std::net::{IpAddr, Ipv4Addr};

use http::header::{self, HeaderMap, HeaderValue};

use super::*;

fn env(name: &str) -> Option<String> {
    match name {
        "UPSTREAM_TOKEN" => Some("t0ps3cret".into()),
        _ => None,
    }
}

fn parse(text: &str) -> Result<Routes, RoutesError> {
    Routes::parse(text, env)
}

/// The error of `text`, displayed.
fn error(text: &str) -> String {
    parse(text).unwrap_err().to_string()
}

const EXAMPLE: &str = r#"
allowlist = true                  # paths that match no route: 404

[[routes]]
prefix = "/api/"
methods = ["GET", "POST"]
upstream = "http://10.0.0.1:8080 weight=2, http://10.0.0.2:8080"
health_check_path = "/healthz"
cache = true
ttl_secs = 30
key_query_ignore = ["utm_*"]
query_cache_control = false
headers = { Authorization = "Bearer ${UPSTREAM_TOKEN}" }
rate_limit = { per_second = 10, burst = 20, queue = 50 }
max_in_flight = 100
retries = 3
retry_unsafe = false
client_deadline_secs = 2.5

[[routes]]
prefix = "/static/"
ttl_secs = 3600
query_cache_control = true
rate_limit = { per_second = 0.5, per_client = true, max_clients = 1000 }

[[routes]]
prefix = "/login"
cache = false
"#;

#[test]
fn the_example_file_parses() {
    let routes = parse(EXAMPLE).unwrap();
    assert!(routes.allowlist());
    let [api, stat, login] = routes.routes() else {
        panic!("three routes")
    };
    assert_eq!((api.number, api.prefix.as_str()), (1, "/api/"));
    assert_eq!(
        api.methods.as_ref().unwrap().listed(),
        [Method::GET, Method::POST]
    );
    let pool = api.upstream.as_ref().unwrap();
    assert_eq!(pool.len(), 2);
    assert_eq!(pool[0].url.authority, "10.0.0.1:8080");
    assert_eq!(pool[0].weight, 2);
    assert_eq!(api.health_check_path.as_deref(), Some("/healthz"));
    assert!(api.cache);
    assert_eq!(api.ttl, Some(Duration::from_secs(30)));
    assert!(api.key_query_ignore.matches("utm_source"));
    assert!(!api.query_cache_control);
    assert_eq!(
        api.headers.names().collect::<Vec<_>>(),
        [header::AUTHORIZATION]
    );
    assert_eq!(
        api.limits.rate_limit(),
        Some(&RateLimitConfig {
            per_second: 10.0,
            burst: 20,
            queue: 50,
            per_client: false,
            max_clients: 100_000,
        })
    );
    assert_eq!(api.limits.max_in_flight(), Some(100));
    assert_eq!(
        api.retry,
        Some(RetryPolicy {
            retries: 3,
            retry_unsafe: false
        })
    );
    assert_eq!(api.client_deadline, Some(Duration::from_millis(2500)));

    // Defaults: burst = per_second rounded up (at least 1), queue 0.
    let rl = stat.limits.rate_limit().unwrap();
    assert_eq!((rl.burst, rl.queue, rl.per_client), (1, 0, true));
    assert_eq!(rl.max_clients, 1000);
    assert!(stat.methods.is_none() && stat.upstream.is_none() && stat.retry.is_none());
    assert!(stat.query_cache_control);
    assert!(!login.cache);
    assert!(login.headers.is_empty());
    assert!(login.limits.rate_limit().is_none());
}

#[test]
fn injected_values_never_show() {
    let routes = parse(EXAMPLE).unwrap();
    let debug = format!("{routes:?}");
    assert!(!debug.contains("t0ps3cret"), "{debug}");
    assert!(debug.contains("<redacted>"));
    let status = serde_json::to_string(&routes.status()).unwrap();
    assert!(!status.contains("t0ps3cret"), "{status}");
    assert!(
        status.contains(r#""injected_headers":["authorization"]"#),
        "{status}"
    );
    let mut metrics = String::new();
    routes.render_metrics(&mut metrics);
    assert!(!metrics.contains("t0ps3cret"));

    // The value does reach the upstream request, replacing the client's.
    let mut headers = HeaderMap::new();
    headers.insert(header::AUTHORIZATION, HeaderValue::from_static("mine"));
    routes.routes()[0].headers.apply(&mut headers);
    assert_eq!(headers[header::AUTHORIZATION], "Bearer t0ps3cret");
}

#[test]
fn an_empty_file_has_no_routes_and_changes_nothing() {
    let routes = parse("").unwrap();
    assert!(!routes.allowlist() && routes.routes().is_empty());
    assert!(matches!(
        routes.match_route(&Method::GET, "/anything"),
        Match::Default
    ));
}

#[test]
fn errors_name_the_file_route_and_key_on_one_line() {
    let text =
        "[[routes]]\nprefix = \"/\"\n\n[[routes]]\nprefix = \"/api/\"\nttl_secs = 40000000\n";
    let e = parse(text).unwrap_err();
    assert_eq!((e.route(), e.key()), (Some(2), Some("ttl_secs")));
    assert_eq!(
        e.in_file(Path::new("/etc/x.toml")).to_string(),
        "ROUTES_FILE /etc/x.toml: route 2 (prefix \"/api/\"): key `ttl_secs`: must be 0 to 31536000"
    );
    let missing = Routes::load(Path::new("/nonexistent/routes.toml"), env).unwrap_err();
    let shown = missing.to_string();
    assert!(
        shown.starts_with("ROUTES_FILE /nonexistent/routes.toml: cannot read the file:"),
        "{shown}"
    );
    assert!(!shown.contains('\n'));
}

#[test]
fn load_reads_a_file() {
    let dir = std::env::temp_dir().join(format!("edgecache-routes-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("routes.toml");
    std::fs::write(&path, EXAMPLE).unwrap();
    assert_eq!(Routes::load(&path, env).unwrap().routes().len(), 3);
    std::fs::write(&path, "[[routes]]\nprefix = \"/a\"\nttl = 1\n").unwrap();
    let e = Routes::load(&path, env).unwrap_err().to_string();
    assert!(
        e.starts_with(&format!(
            "ROUTES_FILE {}: route 1 (prefix \"/a\"): key `ttl`: unknown key",
            path.display()
        )),
        "{e}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn toml_syntax_errors_give_line_and_column() {
    let e = parse("[[routes]]\nprefix = \"/a\"\nttl_secs = = 3\n").unwrap_err();
    assert_eq!(e.position().map(|(line, _)| line), Some(3), "{e}");
    let shown = e.to_string();
    assert!(shown.starts_with("ROUTES_FILE: invalid TOML: "), "{shown}");
    assert!(shown.contains("(line 3, column "), "{shown}");
    assert!(!shown.contains('\n'), "{shown}");
    let e = parse("[[routes]]\nprefix = \"/a\n").unwrap_err();
    assert_eq!(e.position().map(|(line, _)| line), Some(2), "{e}");
}

#[test]
fn unknown_keys_are_errors() {
    let e = error("allowlist = true\nallowlits = false\n[[routes]]\nprefix = \"/\"\n");
    assert!(
        e.starts_with("ROUTES_FILE: key `allowlits`: unknown key `allowlits`, expected"),
        "{e}"
    );
    assert!(e.ends_with("(line 2, column 1)"), "{e}");

    let e = error("[[routes]]\nprefix = \"/a/\"\n[[routes]]\nprefix = \"/b/\"\nttl_sec = 3\n");
    assert!(
        e.starts_with("ROUTES_FILE: route 2 (prefix \"/b/\"): key `ttl_sec`: unknown key"),
        "{e}"
    );
    assert!(e.contains("`ttl_secs`"), "the known keys are listed: {e}");

    let e = error("[[routes]]\nprefix = \"/b/\"\nrate_limit = { per_second = 1, brust = 3 }\n");
    assert!(
        e.starts_with("ROUTES_FILE: route 1 (prefix \"/b/\"): key `rate_limit.brust`: unknown key"),
        "{e}"
    );
}

#[test]
fn type_errors_name_route_key_and_position() {
    let e = parse("[[routes]]\nprefix = \"/x/\"\nretries = \"3\"\n").unwrap_err();
    assert_eq!((e.route(), e.key()), (Some(1), Some("retries")));
    assert_eq!(e.position(), Some((3, 11)));
    let e = error("[[routes]]\nprefix = \"/x/\"\nmethods = [\"GET\", 3]\n");
    assert!(e.contains("key `methods[1]`: invalid type"), "{e}");
    let e = error("[[routes]]\nprefix = \"/x/\"\nheaders = { X-A = 1 }\n");
    assert!(e.contains("key `headers.X-A`: invalid type"), "{e}");
    let e = error("[[routes]]\nprefix = \"/x/\"\nmax_in_flight = -1\n");
    assert!(e.contains("key `max_in_flight`: invalid value"), "{e}");
    let e = error("routes = 3\n");
    assert!(
        e.starts_with("ROUTES_FILE: key `routes`: invalid type"),
        "{e}"
    );
}

#[test]
fn a_route_without_prefix_is_named_by_its_number() {
    let e = parse("[[routes]]\nprefix = \"/\"\n[[routes]]\nmethods = [\"GET\"]\n").unwrap_err();
    assert_eq!(
        e.to_string(),
        format!(
            "ROUTES_FILE: route 2: key `prefix`: is required (line {}, column 1)",
            e.position().unwrap().0
        )
    );
}

#[test]
fn header_values_expand_environment_variables() {
    let text = r#"
[[routes]]
prefix = "/a/"
headers = { X-Key = "k=${UPSTREAM_TOKEN}; $${literal}" }
"#;
    let routes = parse(text).unwrap();
    let mut h = HeaderMap::new();
    routes.routes()[0].headers.apply(&mut h);
    assert_eq!(h["x-key"], "k=t0ps3cret; ${literal}");

    let e =
        error("[[routes]]\nprefix = \"/a/\"\nheaders = { Authorization = \"Bearer ${NOPE}\" }\n");
    assert_eq!(
        e,
        "ROUTES_FILE: route 1 (prefix \"/a/\"): key `headers.Authorization`: environment variable `NOPE` is not set"
    );
    // The environment is whatever lookup the caller passes.
    let routes = Routes::parse(
        "[[routes]]\nprefix = \"/a/\"\nheaders = { A = \"${NOPE}\" }\n",
        |k| (k == "NOPE").then(|| "yes".to_string()),
    )
    .unwrap();
    assert_eq!(routes.routes()[0].headers.names().len(), 1);
}

#[test]
fn header_names_are_checked() {
    let e = error("[[routes]]\nprefix = \"/a/\"\nheaders = { Connection = \"close\" }\n");
    assert!(
        e.contains("key `headers.Connection`: is a hop-by-hop"),
        "{e}"
    );
    let e = error("[[routes]]\nprefix = \"/a/\"\nheaders = { \"bad name\" = \"x\" }\n");
    assert!(e.contains("is not a valid header name"), "{e}");
    let e = error("[[routes]]\nprefix = \"/a/\"\nheaders = { X-A = \"1\", x-a = \"2\" }\n");
    assert!(e.contains("is listed twice"), "{e}");
    let e = error("[[routes]]\nprefix = \"/a/\"\nheaders = { X-A = \"a\\u0001b\" }\n");
    assert!(e.contains("not a valid header value"), "{e}");
}

/// `(file snippet after prefix, key, message fragment)`.
const INVALID: &[(&str, &str, &str)] = &[
    ("methods = []", "methods", "is empty"),
    ("methods = [\"get\"]", "methods", "use `GET`"),
    ("methods = [\"GE T\"]", "methods", "not a method"),
    ("methods = [\"GET\", \"GET\"]", "methods", "listed twice"),
    (
        "upstream = \"ftp://x\"",
        "upstream",
        "must start with http://",
    ),
    ("upstream = \"\"", "upstream", "lists no backend"),
    (
        "upstream = \"http://a:1\"\nhealth_check_path = \"hz\"",
        "health_check_path",
        "must start with `/`",
    ),
    (
        "health_check_path = \"/hz\"",
        "health_check_path",
        "set `upstream` too",
    ),
    ("ttl_secs = -1", "ttl_secs", "must be 0 to 31536000"),
    ("ttl_secs = 31536001", "ttl_secs", "must be 0 to 31536000"),
    ("ttl_secs = nan", "ttl_secs", "must be 0 to 31536000"),
    (
        "cache = false\nttl_secs = 3",
        "ttl_secs",
        "no effect with `cache = false`",
    ),
    (
        "cache = false\nkey_query_ignore = [\"a\"]",
        "key_query_ignore",
        "no effect",
    ),
    (
        "cache = false\nquery_cache_control = true",
        "query_cache_control",
        "no effect",
    ),
    (
        "key_query_ignore = [\"\"]",
        "key_query_ignore",
        "a pattern is a parameter name",
    ),
    (
        "key_query_ignore = [\"a=b\"]",
        "key_query_ignore",
        "a pattern is a parameter name",
    ),
    (
        "client_deadline_secs = 0",
        "client_deadline_secs",
        "more than 0",
    ),
    (
        "client_deadline_secs = 86401",
        "client_deadline_secs",
        "at most 86400",
    ),
    ("retries = 11", "retries", "must be 0 to 10"),
    ("retry_unsafe = true", "retry_unsafe", "needs `retries`"),
    ("max_in_flight = 0", "max_in_flight", "must be 1 to"),
    (
        "rate_limit = { per_second = 0 }",
        "rate_limit.per_second",
        "more than 0",
    ),
    (
        "rate_limit = { per_second = -1 }",
        "rate_limit.per_second",
        "more than 0",
    ),
    (
        "rate_limit = { per_second = inf }",
        "rate_limit.per_second",
        "at most 1000000",
    ),
    (
        "rate_limit = { per_second = 1, burst = 0 }",
        "rate_limit.burst",
        "must be 1 to",
    ),
    (
        "rate_limit = { per_second = 1, queue = 100001 }",
        "rate_limit.queue",
        "must be 0 to 100000",
    ),
    (
        "rate_limit = { per_second = 1, max_clients = 5 }",
        "rate_limit.max_clients",
        "needs `per_client = true`",
    ),
    (
        "rate_limit = { per_second = 1, per_client = true, max_clients = 0 }",
        "rate_limit.max_clients",
        "must be 1 to",
    ),
    (
        "rate_limit = { burst = 1 }",
        "rate_limit.per_second",
        "is required",
    ),
];

#[test]
fn values_are_validated() {
    for (snippet, key, fragment) in INVALID {
        let text = format!("[[routes]]\nprefix = \"/r/\"\n{snippet}\n");
        let e = parse(&text).expect_err(snippet);
        assert_eq!(
            (e.route(), e.key()),
            (Some(1), Some(*key)),
            "{snippet}: {e}"
        );
        let shown = e.to_string();
        assert!(shown.contains(fragment), "{snippet}: {shown}");
        assert!(!shown.contains('\n'), "{snippet}: {shown}");
    }
}

#[test]
fn prefixes_are_validated() {
    for (prefix, fragment) in [
        ("api/", "must start with `/`"),
        ("", "must start with `/`"),
        ("/a b", "visible ASCII"),
        ("/a?x", "without `?`"),
        ("/é", "percent-encode"),
    ] {
        let e = parse(&format!("[[routes]]\nprefix = {prefix:?}\n")).unwrap_err();
        assert_eq!(e.key(), Some("prefix"), "{prefix}");
        assert!(e.to_string().contains(fragment), "{prefix}: {e}");
    }
    let e = error("allowlist = true\n");
    assert!(e.contains("key `allowlist`"), "{e}");
}

#[test]
fn one_route_per_prefix_and_method() {
    let e = parse("[[routes]]\nprefix = \"/a\"\n[[routes]]\nprefix = \"/a\"\n").unwrap_err();
    assert_eq!((e.route(), e.key()), (Some(2), Some("prefix")));
    assert!(e
        .to_string()
        .contains("route 1 has the same prefix for every method"));
    let e = error(
        "[[routes]]\nprefix = \"/a\"\nmethods = [\"GET\"]\n[[routes]]\nprefix = \"/a\"\nmethods = [\"POST\", \"HEAD\"]\n",
    );
    assert!(
        e.contains("key `methods`: route 1 has the same prefix for method HEAD"),
        "{e}"
    );
    // Disjoint method sets, or one list and one catch-all, may share a prefix.
    parse("[[routes]]\nprefix = \"/a\"\nmethods = [\"GET\"]\n[[routes]]\nprefix = \"/a\"\nmethods = [\"POST\"]\n[[routes]]\nprefix = \"/a\"\n").unwrap();
}

fn matched(routes: &Routes, method: Method, path: &str) -> Option<usize> {
    match routes.match_route(&method, path) {
        Match::Route(r) => Some(r.number),
        Match::NotAllowed => Some(0),
        Match::Default => None,
    }
}

#[test]
fn longest_prefix_wins_and_methods_pass_over() {
    let routes = parse(
        r#"
[[routes]]
prefix = "/"
[[routes]]
prefix = "/api/"
[[routes]]
prefix = "/api/v1/"
methods = ["POST"]
[[routes]]
prefix = "/api/v1/items"
methods = ["GET", "PURGE"]
[[routes]]
prefix = "/ap"
"#,
    )
    .unwrap();
    assert_eq!(matched(&routes, Method::GET, "/api/v1/items/3"), Some(4));
    assert_eq!(
        matched(&routes, Method::HEAD, "/api/v1/items"),
        Some(4),
        "GET admits HEAD"
    );
    let purge = Method::from_bytes(b"PURGE").unwrap();
    assert_eq!(matched(&routes, purge, "/api/v1/items"), Some(4));
    // POST is not one of route 4's: the next longest that takes POST.
    assert_eq!(matched(&routes, Method::POST, "/api/v1/items"), Some(3));
    // Neither 4 nor 3 takes PUT: /api/.
    assert_eq!(matched(&routes, Method::PUT, "/api/v1/items"), Some(2));
    assert_eq!(matched(&routes, Method::GET, "/api/v1/other"), Some(2));
    assert_eq!(
        matched(&routes, Method::GET, "/api"),
        Some(5),
        "byte prefix /ap"
    );
    assert_eq!(matched(&routes, Method::GET, "/apple"), Some(5));
    assert_eq!(matched(&routes, Method::GET, "/other"), Some(1));
    assert_eq!(matched(&routes, Method::GET, "/"), Some(1));
    assert_eq!(
        matched(&routes, Method::GET, ""),
        None,
        "no route matches an empty path"
    );
}

#[test]
fn allowlist_refuses_what_no_route_takes() {
    let routes = parse(
        "allowlist = true\n[[routes]]\nprefix = \"/api/\"\nmethods = [\"GET\"]\n[[routes]]\nprefix = \"/pub\"\n",
    )
    .unwrap();
    assert_eq!(matched(&routes, Method::GET, "/api/x"), Some(1));
    assert_eq!(matched(&routes, Method::POST, "/api/x"), Some(0));
    assert_eq!(matched(&routes, Method::GET, "/admin"), Some(0));
    assert_eq!(matched(&routes, Method::GET, "/api"), Some(0));
    assert_eq!(matched(&routes, Method::DELETE, "/pub/x"), Some(2));
    // A dot segment could take the path out of the prefix on the upstream.
    for path in [
        "/api/../admin",
        "/api/./x",
        "/api/%2e%2E/admin",
        "/api/.%2e/admin",
        "/api/..",
        "/pub/x/%2E",
    ] {
        assert_eq!(matched(&routes, Method::GET, path), Some(0), "{path}");
    }
    for path in ["/api/...", "/api/.well-known", "/api/a.b", "/api/%2e%2e%2e"] {
        assert_eq!(matched(&routes, Method::GET, path), Some(1), "{path}");
    }

    // Without the allowlist: no match is the default behaviour.
    let open = parse("[[routes]]\nprefix = \"/api/\"\nmethods = [\"GET\"]\n").unwrap();
    assert_eq!(matched(&open, Method::POST, "/api/x"), None);
    assert_eq!(matched(&open, Method::GET, "/other"), None);
}

/// 50 routes: 10 top-level sections, each with nested prefixes, some method-restricted.
fn fifty_routes() -> String {
    let mut text = String::from("allowlist = false\n");
    for s in 0..10 {
        let sections = [
            format!("/section{s}/"),
            format!("/section{s}/v1/"),
            format!("/section{s}/v1/items/"),
            format!("/section{s}/v2/"),
            format!("/section{s}/v2/items"),
        ];
        for (i, prefix) in sections.iter().enumerate() {
            text.push_str(&format!("[[routes]]\nprefix = \"{prefix}\"\n"));
            if i == 2 {
                text.push_str("methods = [\"GET\"]\n");
            }
            if i == 4 {
                text.push_str("methods = [\"POST\", \"PUT\"]\n");
            }
        }
    }
    text
}

/// The obvious answer: every route's prefix, longest accepting first.
fn oracle(routes: &Routes, method: &Method, path: &str) -> Option<usize> {
    routes
        .routes()
        .iter()
        .filter(|r| path.starts_with(&r.prefix) && r.allows(method))
        .max_by_key(|r| r.prefix.len())
        .map(|r| r.number)
}

#[test]
fn fifty_routes_match_as_a_linear_scan_would() {
    let routes = parse(&fifty_routes()).unwrap();
    assert_eq!(routes.routes().len(), 50);
    let mut paths = vec![String::new(), "/".into(), "/x".into(), "/section".into()];
    for s in 0..11 {
        for tail in [
            "",
            "v1",
            "v1/",
            "v1/items",
            "v1/items/",
            "v1/items/9",
            "v2",
            "v2/items",
            "v2/items/9",
            "v2/itemsX",
            "v3/",
        ] {
            paths.push(format!("/section{s}/{tail}"));
        }
        paths.push(format!("/section{s}"));
    }
    for path in &paths {
        for method in [
            Method::GET,
            Method::HEAD,
            Method::POST,
            Method::PUT,
            Method::DELETE,
        ] {
            assert_eq!(
                matched(&routes, method.clone(), path),
                oracle(&routes, &method, path),
                "{method} {path}"
            );
        }
    }
}

/// `cargo test --release --lib routes::tests::match_benchmark -- --ignored --nocapture`
/// prints the time per lookup against the 50-route file.
#[test]
#[ignore = "timing, not a check: run by hand with --release"]
fn match_benchmark() {
    let routes = parse(&fifty_routes()).unwrap();
    let paths = [
        "/section7/v1/items/12345?x=1",
        "/section3/v2/items",
        "/section9/v1/other/page.html",
        "/unrouted/path/to/asset.js",
        "/section0/",
    ];
    let methods = [Method::GET, Method::POST];
    let rounds = 2_000_000;
    let start = std::time::Instant::now();
    let mut found = 0usize;
    for i in 0..rounds {
        let path = std::hint::black_box(paths[i % paths.len()]);
        let method = &methods[i % 2];
        if let Match::Route(r) = routes.match_route(method, path) {
            found += r.number;
        }
    }
    let elapsed = start.elapsed();
    // The same lookups by a scan of every prefix, for comparison.
    let start = std::time::Instant::now();
    for i in 0..rounds {
        let path = std::hint::black_box(paths[i % paths.len()]);
        found += oracle(&routes, &methods[i % 2], path).unwrap_or(0);
    }
    let scan = start.elapsed();
    std::hint::black_box(found);
    let per = |d: std::time::Duration| d.as_nanos() as f64 / rounds as f64;
    println!(
        "match_route, 50 routes: {:.1} ns per lookup (a scan of all prefixes: {:.1} ns)",
        per(elapsed),
        per(scan)
    );
}

#[test]
fn filter_query_and_cache_control_helpers() {
    let routes = parse(EXAMPLE).unwrap();
    let api = &routes.routes()[0];
    assert_eq!(api.filter_query("utm_source=x&id=3&utm_medium=y"), "id=3");
    assert!(matches!(api.filter_query("id=3"), Cow::Borrowed("id=3")));
    let d = query::take_cache_control("cache-control=no-cache&id=3").unwrap();
    assert_eq!((d.directives.as_str(), &*d.rest), ("no-cache", "id=3"));
}

#[tokio::test(start_paused = true)]
async fn routes_limit_requests_and_render_metrics() {
    let routes = parse(
        "[[routes]]\nprefix = \"/a\\\"b/\"\nmethods = [\"GET\"]\nrate_limit = { per_second = 1, burst = 1 }\nmax_in_flight = 5\n[[routes]]\nprefix = \"/c/\"\nrate_limit = { per_second = 1, per_client = true }\nretries = 1\n",
    )
    .unwrap();
    let client = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let Match::Route(route) = routes.match_route(&Method::GET, "/a\"b/x") else {
        panic!()
    };
    let admitted = route.limits.admit(client).await.unwrap();
    let rejected = route.limits.admit(client).await.unwrap_err();
    assert_eq!(rejected.status(), http::StatusCode::TOO_MANY_REQUESTS);
    routes.routes()[1]
        .retry_budget
        .record_request(tokio::time::Instant::now());
    assert!(routes.routes()[1]
        .retry_budget
        .try_retry(tokio::time::Instant::now()));

    let mut out = String::new();
    routes.render_metrics(&mut out);
    for line in [
        r#"edgecache_route_admitted_total{prefix="/a\"b/",methods="GET"} 1"#,
        r#"edgecache_route_rejected_total{prefix="/a\"b/",methods="GET",reason="rate"} 1"#,
        r#"edgecache_route_rejected_total{prefix="/a\"b/",methods="GET",reason="in_flight"} 0"#,
        r#"edgecache_route_in_flight{prefix="/a\"b/",methods="GET"} 1"#,
        r#"edgecache_route_queue_waiting{prefix="/c/",methods="*"} 0"#,
        r#"edgecache_route_retries_total{prefix="/c/",methods="*",budget="granted"} 1"#,
        r#"edgecache_route_client_table_resets_total{prefix="/c/",methods="*"} 0"#,
        "# TYPE edgecache_route_queued_total counter",
    ] {
        assert!(out.contains(line), "{line}\n{out}");
    }
    assert!(!out.contains(r#"edgecache_route_client_table_resets_total{prefix="/a"#));
    drop(admitted);

    let status = serde_json::to_value(routes.status()).unwrap();
    assert_eq!(status["routes"][0]["counters"]["rejected_rate"], 1);
    assert_eq!(status["routes"][0]["methods"][0], "GET");
    assert_eq!(status["routes"][1]["rate_limit"]["per_client"], true);
    assert_eq!(status["routes"][1]["retries"], 1);
}

#[test]
fn dot_segments() {
    for (path, dot) in [
        ("/a/b", false),
        ("/a/./b", true),
        ("/a/../b", true),
        ("/..", true),
        ("/.", true),
        ("/a/.../b", false),
        ("/a/%2e/b", true),
        ("/a/%2E%2e", true),
        ("/a/%2e%2e%2e", false),
        ("/a/.b", false),
        ("/a/%2", false),
        ("/a%2e/", false),
    ] {
        assert_eq!(has_dot_segment(path), dot, "{path}");
    }
}
