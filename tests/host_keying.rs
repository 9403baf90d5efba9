//! Issue 10 items 1 and 2: no client-chosen host decides what another client gets (the host
//! is part of the key, `ALLOWED_HOSTS` refuses others), admin requests still reach a path
//! under every host, and the admin throttle counts the real client behind a trusted proxy.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use common::*;

/// An origin that builds its (cacheable) answer from `X-Forwarded-Host`, as frameworks that
/// make absolute URLs or redirects do.
async fn host_echo() -> Origin {
    let n = Arc::new(AtomicUsize::new(0));
    Origin::start(move |req| {
        let v = n.fetch_add(1, Ordering::SeqCst) + 1;
        let host = req
            .headers()
            .get("x-forwarded-host")
            .map(|h| h.to_str().unwrap_or("?").to_owned())
            .unwrap_or_else(|| "-".into());
        let proto = req
            .headers()
            .get("x-forwarded-proto")
            .map(|h| h.to_str().unwrap_or("?").to_owned())
            .unwrap_or_default();
        async move {
            reply(
                200,
                &[("cache-control", "max-age=600")],
                format!("{proto}://{host}/login v{v}"),
            )
        }
    })
    .await
}

/// Through a trusted proxy (loopback is trusted by default), `X-Forwarded-Host` reaches the
/// origin, so it is keyed: the second client never sees the first one's host.
#[tokio::test]
async fn forwarded_host_from_a_trusted_proxy_is_part_of_the_key() {
    let origin = host_echo().await;
    let proxy = ProxyHandle::start(&origin.url(), &[]).await;
    let evil = get(proxy.addr, "/p", &[("x-forwarded-host", "evil.example")]).await;
    assert_eq!(evil.text(), "http://evil.example/login v1");
    let good = get(proxy.addr, "/p", &[("x-forwarded-host", "good.example")]).await;
    assert_eq!(
        (good.cache(), good.text().as_str()),
        ("MISS", "http://good.example/login v2")
    );
    // Normalised: case and the default port do not make new entries.
    let again = get(proxy.addr, "/p", &[("x-forwarded-host", "GOOD.example:80")]).await;
    assert_eq!(
        (again.cache(), again.text().as_str()),
        ("HIT", "http://good.example/login v2")
    );
    // The scheme a trusted proxy reports is keyed too (no http links served to https).
    let tls = get(
        proxy.addr,
        "/p",
        &[
            ("x-forwarded-host", "good.example"),
            ("x-forwarded-proto", "https"),
        ],
    )
    .await;
    assert_eq!(
        (tls.cache(), tls.text().as_str()),
        ("MISS", "https://good.example/login v3")
    );
    // `Forwarded: host=` is never passed on (it would be unkeyed).
    let fwd = get(
        proxy.addr,
        "/p",
        &[
            ("x-forwarded-host", "good.example"),
            ("forwarded", "host=evil.example"),
        ],
    )
    .await;
    assert_eq!(fwd.cache(), "HIT");
    assert_eq!(origin.total(), 3);
}

/// From an untrusted peer its `X-Forwarded-Host` is ignored and `Host` is what the origin
/// hears and what is keyed.
#[tokio::test]
async fn host_from_an_untrusted_client_is_part_of_the_key() {
    let origin = host_echo().await;
    let proxy = ProxyHandle::start(&origin.url(), &[("TRUSTED_PROXIES", "none")]).await;
    let evil = get(
        proxy.addr,
        "/p",
        &[
            ("host", "evil.example"),
            ("x-forwarded-host", "evil2.example"),
        ],
    )
    .await;
    assert_eq!(evil.text(), "http://evil.example/login v1");
    let good = get(proxy.addr, "/p", &[("host", "good.example")]).await;
    assert_eq!(good.text(), "http://good.example/login v2");
    let hit = get(proxy.addr, "/p", &[("host", "good.example")]).await;
    assert_eq!(
        (hit.cache(), hit.text().as_str()),
        ("HIT", "http://good.example/login v2")
    );
    // A host that is not a host is refused, not keyed.
    let bad = get(proxy.addr, "/p", &[("host", "a b")]).await;
    assert_eq!(bad.status, 400);
    assert_eq!(origin.total(), 2);
}

/// With `ALLOWED_HOSTS`, other hosts get 421 before any lookup; the upstream never sees them.
#[tokio::test]
async fn allowed_hosts_refuses_other_hosts_before_any_lookup() {
    let origin = host_echo().await;
    let proxy = ProxyHandle::start(
        &origin.url(),
        &[("ALLOWED_HOSTS", "good.example, .cdn.example")],
    )
    .await;
    for host in ["evil.example", "good.example.evil", "127.0.0.1"] {
        let got = get(proxy.addr, "/p", &[("x-forwarded-host", host)]).await;
        assert_eq!(got.status, 421, "{host}");
        let post = send(
            "POST",
            proxy.addr,
            "/p",
            &[("x-forwarded-host", host)],
            Bytes::new(),
        )
        .await;
        assert_eq!(post.status, 421, "{host}");
    }
    assert_eq!(origin.total(), 0);
    for host in ["good.example", "Good.Example:8443", "a.cdn.example"] {
        let got = get(proxy.addr, "/p", &[("x-forwarded-host", host)]).await;
        assert_eq!(got.status, 200, "{host}");
    }
}

/// The upstream calls under its own address: `Clear-Cache` on a path reaches that path's
/// entries under every host; `Clear-Cache-Host` narrows it to one. A refresh keeps each
/// host's own answer.
#[tokio::test]
async fn admin_reaches_a_path_under_every_host() {
    let origin = host_echo().await;
    let proxy = ProxyHandle::start(&origin.url(), &[]).await;
    let hosts = ["a.example", "b.example", "c.example"];
    for h in hosts {
        get(proxy.addr, "/p", &[("x-forwarded-host", h)]).await;
        get(proxy.addr, "/other", &[("x-forwarded-host", h)]).await;
    }
    let key = [("clear-cache", "clear"), ("clear-cache-key", "Secret")];
    // Narrowed to one host.
    let one = admin(
        &proxy,
        "/p",
        &[key[0], key[1], ("clear-cache-host", "A.example")],
    )
    .await;
    assert_eq!(one.status, 200, "{}", one.text());
    assert!(one.text().contains(r#""variants":1"#), "{}", one.text());
    let a = get(proxy.addr, "/p", &[("x-forwarded-host", "a.example")]).await;
    assert_eq!(a.cache(), "MISS");
    let b = get(proxy.addr, "/p", &[("x-forwarded-host", "b.example")]).await;
    assert_eq!(b.cache(), "HIT");
    // The predecessor's request, unchanged: every host's copy of the path goes.
    let all = admin(&proxy, "/p", &key).await;
    assert!(
        all.text().contains(r#""action":"cleared","variants":3"#),
        "{}",
        all.text()
    );
    for h in hosts {
        let got = get(proxy.addr, "/p", &[("x-forwarded-host", h)]).await;
        assert_eq!(got.cache(), "MISS", "{h}");
        let other = get(proxy.addr, "/other", &[("x-forwarded-host", h)]).await;
        assert_eq!(other.cache(), "HIT", "{h}: other paths stay");
    }
    // A refresh refetches each host's copy with that host.
    let refresh = admin(&proxy, "/p", &[("clear-cache", "refresh"), key[1]]).await;
    assert!(
        refresh
            .text()
            .contains(r#""action":"refreshed","variants":3"#),
        "{}",
        refresh.text()
    );
    for h in hosts {
        let got = get(proxy.addr, "/p", &[("x-forwarded-host", h)]).await;
        assert_eq!(got.cache(), "HIT");
        assert!(
            got.text().starts_with(&format!("http://{h}/login")),
            "{h}: {}",
            got.text()
        );
    }
    // Prefix scope, narrowed by host.
    let prefix = admin(
        &proxy,
        "/",
        &[
            key[0],
            key[1],
            ("clear-cache-scope", "prefix"),
            ("clear-cache-host", "c.example"),
        ],
    )
    .await;
    assert!(
        prefix.text().contains(r#""cleared":2"#),
        "{}",
        prefix.text()
    );
    let c = get(proxy.addr, "/other", &[("x-forwarded-host", "c.example")]).await;
    assert_eq!(c.cache(), "MISS");
    let b = get(proxy.addr, "/other", &[("x-forwarded-host", "b.example")]).await;
    assert_eq!(b.cache(), "HIT");
}

/// Behind a trusted proxy every request comes from the proxy's address: wrong keys are counted
/// per real client (`X-Forwarded-For`), so a stranger guessing keys is throttled and the
/// upstream's own admin requests still go through.
#[tokio::test]
async fn admin_throttle_counts_the_client_behind_a_trusted_proxy() {
    let origin = host_echo().await;
    let proxy = ProxyHandle::start(&origin.url(), &[]).await;
    get(proxy.addr, "/p", &[]).await;
    let wrong = [
        ("clear-cache", "clear"),
        ("clear-cache-key", "guess"),
        ("x-forwarded-for", "203.0.113.66"),
    ];
    let mut statuses = Vec::new();
    for _ in 0..7 {
        statuses.push(admin(&proxy, "/p", &wrong).await.status);
    }
    assert_eq!(statuses, [401, 401, 401, 401, 401, 429, 429]);
    // A forged left-hand entry does not escape the throttle: the rightmost untrusted counts.
    let forged = [
        wrong[0],
        wrong[1],
        ("x-forwarded-for", "1.2.3.4, 203.0.113.66"),
    ];
    assert_eq!(admin(&proxy, "/p", &forged).await.status, 429);
    // The upstream, behind the same proxy, is not locked out.
    let upstream = [
        ("clear-cache", "clear"),
        ("clear-cache-key", "Secret"),
        ("x-forwarded-for", "10.1.2.3"),
    ];
    let got = admin(&proxy, "/p", &upstream).await;
    assert_eq!(got.status, 200, "{}", got.text());
    // A direct (untrusted) peer's X-Forwarded-For is not believed.
    let direct = ProxyHandle::start(&origin.url(), &[("TRUSTED_PROXIES", "none")]).await;
    for i in 0..5 {
        let spoofed = format!("198.51.100.{i}");
        let h = [wrong[0], wrong[1], ("x-forwarded-for", spoofed.as_str())];
        assert_eq!(admin(&direct, "/p", &h).await.status, 401);
    }
    let h = [wrong[0], wrong[1], ("x-forwarded-for", "198.51.100.99")];
    assert_eq!(
        admin(&direct, "/p", &h).await.status,
        429,
        "counted per peer"
    );
}

/// `Clear-Cache: refresh` on a prefix starts its refetches through the shared
/// `REFRESH_CONCURRENCY` slots: the upstream never sees more than that many at once, and
/// every entry is still refreshed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bulk_refresh_is_bounded_by_refresh_concurrency() {
    let (now, max) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (n2, m2) = (now.clone(), max.clone());
    let origin = Origin::start(move |_req| {
        let (now, max) = (n2.clone(), m2.clone());
        async move {
            let in_flight = now.fetch_add(1, Ordering::SeqCst) + 1;
            max.fetch_max(in_flight, Ordering::SeqCst);
            // Long enough for refreshes to overlap if nothing bounded them.
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            now.fetch_sub(1, Ordering::SeqCst);
            reply(200, &[("cache-control", "max-age=600")], "x")
        }
    })
    .await;
    let proxy = ProxyHandle::start(&origin.url(), &[("REFRESH_CONCURRENCY", "2")]).await;
    for i in 0..20 {
        get(proxy.addr, &format!("/r/{i}"), &[]).await;
    }
    max.store(0, Ordering::SeqCst);
    let got = admin(
        &proxy,
        "/r/",
        &[
            ("clear-cache", "refresh"),
            ("clear-cache-key", "Secret"),
            ("clear-cache-scope", "prefix"),
        ],
    )
    .await;
    assert!(got.text().contains(r#""refreshing":20"#), "{}", got.text());
    assert!(
        origin
            .wait_until(std::time::Duration::from_secs(10), |o| o.total() == 40)
            .await,
        "every entry refreshed: {}",
        origin.total()
    );
    assert!(
        max.load(Ordering::SeqCst) <= 2,
        "{} refreshes at once",
        max.load(Ordering::SeqCst)
    );
}
