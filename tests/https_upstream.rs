//! `https://` backends against a real TLS origin on loopback, with certificates made in the
//! test (a CA, and a leaf for `localhost` and 127.0.0.1 signed by it): caching through TLS,
//! SNI and `Host`, connection reuse, HTTP/2 by ALPN, certificates from an unknown CA (502,
//! nothing cached, the log says why; a fixed configuration works), a bad
//! `UPSTREAM_CA_FILE` stopping the daemon, breakers and health probes over TLS.

mod common;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::process::{edgecache_cmd, run_to_exit, Edgecache, TempDir};
use common::*;
use edgecache::config::{BackendConfig, Config};
use edgecache::upstream::Upstream;
use http::{HeaderMap, Method, Request, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;

/// A CA of our own: its certificate (PEM, for `UPSTREAM_CA_FILE`) and the leaf certificate
/// it issued for `localhost` and 127.0.0.1, with the leaf's key.
struct Pki {
    ca_pem: String,
    leaf: CertificateDer<'static>,
    leaf_key: Vec<u8>,
}

impl Pki {
    fn new(name: &str) -> Pki {
        Self::with_names(name, &["localhost", "127.0.0.1"])
    }

    /// A CA called `name` and a leaf for `names` (DNS names or IP addresses).
    fn with_names(name: &str, names: &[&str]) -> Pki {
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, format!("edgecache test CA {name}"));
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut leaf = CertificateParams::new(names).unwrap();
        leaf.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let leaf_key = KeyPair::generate().unwrap();
        let leaf_cert = leaf.signed_by(&leaf_key, &ca).unwrap();
        Pki {
            ca_pem: ca.pem(),
            leaf: leaf_cert.der().clone(),
            leaf_key: leaf_key.serialize_der(),
        }
    }

    /// Writes the CA certificate to `dir/ca.pem`; returns its path.
    fn ca_file(&self, dir: &TempDir) -> String {
        let path = dir.path.join("ca.pem");
        std::fs::write(&path, &self.ca_pem).unwrap();
        path.to_string_lossy().into_owned()
    }
}

/// One TLS handshake as the origin saw its ClientHello.
#[derive(Debug, Clone)]
struct Hello {
    sni: Option<String>,
    alpn: Vec<String>,
}

/// One request as the origin received it.
#[derive(Debug, Clone)]
struct Seen {
    path: String,
    version: Version,
    /// The `Host` header, else (HTTP/2) the `:authority`.
    host: String,
}

/// A TLS origin (rustls + hyper, HTTP/1.1 and HTTP/2) that records connections, handshakes
/// and requests. `/health-check` answers 200 while `healthy`, else 503; every other path a
/// cacheable `tls <path>`.
struct TlsOrigin {
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    handshakes: Arc<AtomicUsize>,
    hellos: Arc<Mutex<Vec<Hello>>>,
    requests: Arc<Mutex<Vec<Seen>>>,
    healthy: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for TlsOrigin {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TlsOrigin {
    /// Serving `pki`'s leaf certificate; the server picks from `alpn` by its own order.
    async fn start(pki: &Pki, alpn: &[&str]) -> TlsOrigin {
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pki.leaf_key.clone()));
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![pki.leaf.clone()], key)
        .unwrap();
        config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
        let config = Arc::new(config);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections = Arc::new(AtomicUsize::new(0));
        let handshakes = Arc::new(AtomicUsize::new(0));
        let hellos: Arc<Mutex<Vec<Hello>>> = Arc::default();
        let requests: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let healthy = Arc::new(AtomicBool::new(true));
        let (c, h, he, r, ok) = (
            connections.clone(),
            handshakes.clone(),
            hellos.clone(),
            requests.clone(),
            healthy.clone(),
        );
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                c.fetch_add(1, Ordering::SeqCst);
                let (config, h, he, r, ok) =
                    (config.clone(), h.clone(), he.clone(), r.clone(), ok.clone());
                conns.spawn(async move {
                    let acceptor = tokio_rustls::LazyConfigAcceptor::new(
                        rustls::server::Acceptor::default(),
                        tcp,
                    );
                    let Ok(start) = acceptor.await else { return };
                    let hello = start.client_hello();
                    he.lock().unwrap().push(Hello {
                        sni: hello.server_name().map(str::to_owned),
                        alpn: hello
                            .alpn()
                            .map(|list| {
                                list.map(|p| String::from_utf8_lossy(p).into_owned())
                                    .collect()
                            })
                            .unwrap_or_default(),
                    });
                    let Ok(tls) = start.into_stream(config).await else {
                        return;
                    };
                    h.fetch_add(1, Ordering::SeqCst);
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let path = req.uri().path().to_owned();
                        let host = req
                            .headers()
                            .get(http::header::HOST)
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned)
                            .or_else(|| req.uri().authority().map(|a| a.to_string()))
                            .unwrap_or_default();
                        r.lock().unwrap().push(Seen {
                            path: path.clone(),
                            version: req.version(),
                            host,
                        });
                        let resp = if path == "/health-check" {
                            let status = if ok.load(Ordering::SeqCst) { 200 } else { 503 };
                            reply(status, &[], "")
                        } else {
                            reply(
                                200,
                                &[("cache-control", "max-age=60")],
                                format!("tls {path}"),
                            )
                        };
                        async move { Ok::<_, Infallible>(resp) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls), svc)
                        .await;
                });
            }
        });
        TlsOrigin {
            addr,
            connections,
            handshakes,
            hellos,
            requests,
            healthy,
            task,
        }
    }

    /// `https://localhost:PORT`.
    fn url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    fn requests(&self) -> Vec<Seen> {
        self.requests.lock().unwrap().clone()
    }

    fn hellos(&self) -> Vec<Hello> {
        self.hellos.lock().unwrap().clone()
    }
}

/// edgecache in-process in front of `upstream`, trusting `pki`'s CA (`UPSTREAM_CA_FILE`).
async fn proxy_trusting(
    pki: &Pki,
    dir: &TempDir,
    upstream: &str,
    env: &[(&str, &str)],
) -> ProxyHandle {
    let ca = pki.ca_file(dir);
    let mut vars = vec![("UPSTREAM_CA_FILE", ca.as_str())];
    vars.extend_from_slice(env);
    ProxyHandle::start(upstream, &vars).await
}

/// A GET through an https origin is a MISS, then a HIT with the same body; the origin was
/// asked once, over HTTP/1.1 (it offers only that), with `localhost` as SNI and
/// `localhost:PORT` as `Host`. By IP address, the certificate's IP entry is checked and no
/// SNI is sent (RFC 6066 has none for addresses).
#[tokio::test]
async fn miss_then_hit_through_an_https_origin() {
    let (pki, dir) = (Pki::new("a"), TempDir::new("https-basic"));
    let origin = TlsOrigin::start(&pki, &["http/1.1"]).await;
    let proxy = proxy_trusting(&pki, &dir, &origin.url(), &[]).await;
    let first = get(proxy.addr, "/a?x=1", &[]).await;
    assert_eq!(
        (first.status, first.cache(), first.text().as_str()),
        (200, "MISS", "tls /a")
    );
    let second = get(proxy.addr, "/a?x=1", &[]).await;
    assert_eq!(
        (second.status, second.cache(), second.text().as_str()),
        (200, "HIT", "tls /a")
    );
    let seen = origin.requests();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].version, Version::HTTP_11);
    assert_eq!(seen[0].host, format!("localhost:{}", origin.addr.port()));
    let hellos = origin.hellos();
    assert_eq!(hellos[0].sni.as_deref(), Some("localhost"), "{hellos:?}");
    assert_eq!(hellos[0].alpn, ["h2", "http/1.1"], "{hellos:?}");
    assert!(
        proxy.status().contains(&format!(
            r#""url":"https://localhost:{}""#,
            origin.addr.port()
        )),
        "{}",
        proxy.status()
    );

    let by_ip = proxy_trusting(&pki, &dir, &format!("https://{}", origin.addr), &[]).await;
    let got = get(by_ip.addr, "/by-ip", &[]).await;
    assert_eq!((got.status, got.text().as_str()), (200, "tls /by-ip"));
    let last = origin.hellos().pop().unwrap();
    assert_eq!(last.sni, None, "{last:?}");
    assert_eq!(
        origin.requests().last().unwrap().host,
        origin.addr.to_string()
    );
}

/// Twenty sequential misses go out on one kept-alive TLS connection: one TCP connection,
/// one handshake.
#[tokio::test]
async fn sequential_misses_reuse_one_tls_connection() {
    let (pki, dir) = (Pki::new("b"), TempDir::new("https-reuse"));
    let origin = TlsOrigin::start(&pki, &["http/1.1"]).await;
    let proxy = proxy_trusting(&pki, &dir, &origin.url(), &[]).await;
    for i in 0..20 {
        let got = get(proxy.addr, &format!("/r{i}"), &[]).await;
        assert_eq!((got.status, got.cache()), (200, "MISS"), "request {i}");
    }
    assert_eq!(origin.requests().len(), 20);
    assert_eq!(origin.connections.load(Ordering::SeqCst), 1);
    assert_eq!(origin.handshakes.load(Ordering::SeqCst), 1);
}

/// An origin that picks `h2` by ALPN is spoken to in HTTP/2 (with `:authority`), on one
/// connection for all requests. With the `h2` option only `h2` is offered.
#[tokio::test]
async fn http2_when_the_origin_picks_it_by_alpn() {
    let (pki, dir) = (Pki::new("c"), TempDir::new("https-h2"));
    let origin = TlsOrigin::start(&pki, &["h2", "http/1.1"]).await;
    let proxy = proxy_trusting(&pki, &dir, &origin.url(), &[]).await;
    for i in 0..5 {
        let got = get(proxy.addr, &format!("/h{i}"), &[]).await;
        assert_eq!((got.status, got.text()), (200, format!("tls /h{i}")));
    }
    let seen = origin.requests();
    assert!(
        seen.iter().all(|s| s.version == Version::HTTP_2),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .all(|s| s.host == format!("localhost:{}", origin.addr.port())),
        "{seen:?}"
    );
    assert_eq!(origin.handshakes.load(Ordering::SeqCst), 1);
    assert_eq!(origin.hellos()[0].alpn, ["h2", "http/1.1"]);

    let urls = format!("{} h2", origin.url());
    let h2_only = proxy_trusting(&pki, &dir, "http://unused:1", &[("UPSTREAM_URLS", &urls)]).await;
    let got = get(h2_only.addr, "/only", &[]).await;
    assert_eq!(got.status, 200, "{}", got.text());
    assert_eq!(origin.hellos().last().unwrap().alpn, ["h2"]);
    assert_eq!(origin.requests().last().unwrap().version, Version::HTTP_2);
}

/// A certificate from a CA nobody trusts: the real daemon answers 502 and stores nothing
/// (the next request is no HIT and reaches the origin's TLS again), and its log says why.
/// Started again trusting that CA (`UPSTREAM_CA_FILE`), the same origin serves.
#[tokio::test]
async fn unknown_ca_is_a_502_that_says_why_and_a_ca_file_fixes_it() {
    let (pki, dir) = (Pki::new("d"), TempDir::new("https-untrusted"));
    let origin = TlsOrigin::start(&pki, &["http/1.1"]).await;
    let other_ca = Pki::new("someone else");
    let wrong_ca = other_ca.ca_file(&dir);
    let daemon = Edgecache::start(
        &dir,
        &[
            ("UPSTREAM_URL", origin.url().as_str()),
            ("UPSTREAM_CA_FILE", wrong_ca.as_str()),
        ],
    )
    .await;
    for _ in 0..2 {
        let got = get(daemon.addr, "/secret", &[]).await;
        assert_eq!(got.status, 502, "{}", got.text());
        assert_ne!(got.cache(), "HIT");
    }
    assert!(origin.requests().is_empty());
    assert_eq!(origin.handshakes.load(Ordering::SeqCst), 0);
    // Two requests, each tried twice (UPSTREAM_RETRIES=1): every attempt reached the origin.
    assert!(origin.connections.load(Ordering::SeqCst) >= 4);
    assert!(
        eventually(Duration::from_secs(5), || daemon
            .stderr()
            .contains("certificate not trusted"))
        .await,
        "{}",
        daemon.stderr()
    );
    drop(daemon);

    let fixed_dir = TempDir::new("https-fixed");
    let right_ca = pki.ca_file(&fixed_dir);
    let daemon = Edgecache::start(
        &fixed_dir,
        &[
            ("UPSTREAM_URL", origin.url().as_str()),
            ("UPSTREAM_CA_FILE", right_ca.as_str()),
        ],
    )
    .await;
    let got = get(daemon.addr, "/secret", &[]).await;
    assert_eq!((got.status, got.text().as_str()), (200, "tls /secret"));
}

/// The same failure through the pool's own API: a connect error (retryable) that names the
/// certificate problem; a name the certificate is not for is refused too.
#[tokio::test]
async fn certificate_errors_are_connect_errors_that_say_why() {
    let (pki, dir) = (Pki::new("e"), TempDir::new("https-errors"));
    let origin = TlsOrigin::start(&pki, &["http/1.1"]).await;
    let send = |url: String, ca: Option<String>| async move {
        let mut vars = vec![("UPSTREAM_URL", url), ("UPSTREAM_RETRIES", "0".to_string())];
        if let Some(ca) = ca {
            vars.push(("UPSTREAM_CA_FILE", ca));
        }
        let config = Config::from_lookup(|k| {
            vars.iter()
                .find(|(name, _)| *name == k)
                .map(|(_, v)| v.clone())
        })
        .unwrap();
        let upstream = Upstream::from_parts(&config.backends, &config.pool, Duration::from_secs(5));
        let deadline = upstream.deadline();
        upstream
            .send_idempotent(&Method::GET, "/e", &HeaderMap::new(), deadline)
            .await
            .map(|r| r.status().as_u16())
            .map_err(|e| (e.as_str(), e.to_string()))
    };
    let (kind, message) = send(origin.url(), None).await.unwrap_err();
    assert_eq!(kind, "connect", "{message}");
    assert!(message.contains("certificate not trusted"), "{message}");

    let ca = pki.ca_file(&dir);
    assert_eq!(send(origin.url(), Some(ca.clone())).await, Ok(200));

    // A certificate from the trusted CA, but for another name.
    let elsewhere = Pki::with_names("e", &["origin.example"]);
    let misnamed = TlsOrigin::start(&elsewhere, &["http/1.1"]).await;
    let ca = elsewhere.ca_file(&dir);
    let (kind, message) = send(misnamed.url(), Some(ca)).await.unwrap_err();
    assert_eq!(kind, "connect", "{message}");
    assert!(
        message.contains(r#"certificate not valid for name "localhost""#),
        "{message}"
    );
}

/// A pool of an https backend with an untrusted certificate and a plain http one: every
/// request succeeds (each handshake failure is retried on the other backend) and the https
/// backend's breaker opens.
#[tokio::test]
async fn handshake_failures_open_the_breaker_and_fail_over() {
    let (pki, dir) = (Pki::new("f"), TempDir::new("https-breaker"));
    let bad = TlsOrigin::start(&pki, &["http/1.1"]).await;
    let good =
        Origin::start(|_req| async { reply(200, &[("cache-control", "no-store")], "plain") }).await;
    let other_ca = Pki::new("not f").ca_file(&dir);
    let urls = format!("{}, {}", bad.url(), good.url());
    let proxy = ProxyHandle::start(
        "http://unused:1",
        &[
            ("UPSTREAM_URLS", urls.as_str()),
            ("UPSTREAM_CA_FILE", other_ca.as_str()),
            ("BREAKER_FAILURE_THRESHOLD", "2"),
            ("BREAKER_COOLDOWN_SECS", "60"),
        ],
    )
    .await;
    for i in 0..10 {
        let got = get(proxy.addr, &format!("/f{i}"), &[]).await;
        assert_eq!(
            (got.status, got.text().as_str()),
            (200, "plain"),
            "request {i}"
        );
    }
    let status = proxy.status();
    assert!(status.contains("breaker_open"), "{status}");
    assert!(bad.requests().is_empty());
    assert!(bad.connections.load(Ordering::SeqCst) >= 2);
}

/// Health probes go over TLS (one kept-alive connection) and follow the origin's health
/// endpoint: down when it fails, up again when it recovers. A backend whose certificate is
/// not trusted is down.
#[tokio::test]
async fn health_probes_over_tls() {
    let (pki, dir) = (Pki::new("g"), TempDir::new("https-health"));
    let origin = TlsOrigin::start(&pki, &["http/1.1"]).await;
    let untrusted = TlsOrigin::start(&Pki::new("not g"), &["http/1.1"]).await;
    let urls = format!("{}, {}", origin.url(), untrusted.url());
    let proxy = proxy_trusting(
        &pki,
        &dir,
        "http://unused:1",
        &[
            ("UPSTREAM_URLS", urls.as_str()),
            ("HEALTH_CHECK_INTERVAL_SECS", "0.05"),
            ("HEALTH_CHECK_FAILURE_THRESHOLD", "1"),
            ("HEALTH_CHECK_RECOVERY_THRESHOLD", "1"),
        ],
    )
    .await;
    let states = |proxy: &ProxyHandle| -> Vec<String> {
        let status: serde_json::Value = serde_json::from_str(&proxy.status()).unwrap();
        status["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["state"].as_str().unwrap().to_owned())
            .collect()
    };
    let within = Duration::from_secs(5);
    assert!(
        eventually(within, || states(&proxy) == ["up", "down"]).await,
        "{:?}",
        states(&proxy)
    );
    let probes = || {
        origin
            .requests()
            .iter()
            .filter(|s| s.path == "/health-check")
            .count()
    };
    assert!(eventually(within, || probes() >= 5).await);
    assert!(
        origin.handshakes.load(Ordering::SeqCst) < probes(),
        "probes reuse their connection"
    );
    origin.healthy.store(false, Ordering::SeqCst);
    assert!(
        eventually(within, || states(&proxy)[0] == "down").await,
        "{:?}",
        states(&proxy)
    );
    origin.healthy.store(true, Ordering::SeqCst);
    assert!(
        eventually(within, || states(&proxy)[0] == "up").await,
        "{:?}",
        states(&proxy)
    );
    assert!(untrusted.requests().is_empty());
}

/// `UPSTREAM_CA_FILE` naming a missing file, or one without a certificate, stops the real
/// daemon: exit 2, one stderr line naming the variable.
#[test]
fn a_bad_ca_file_stops_the_daemon() {
    let dir = TempDir::new("https-cafile");
    let missing = dir.path.join("missing.pem").to_string_lossy().into_owned();
    let empty = dir.path.join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    let empty = empty.to_string_lossy().into_owned();
    for ca in [missing.as_str(), empty.as_str()] {
        let cmd = edgecache_cmd(
            &dir.path,
            &[
                ("UPSTREAM_URL", "https://127.0.0.1:9"),
                ("UPSTREAM_CA_FILE", ca),
            ],
        );
        let done = run_to_exit(&dir, "edgecache", cmd);
        assert_eq!(done.status.code(), Some(2), "{done:?}");
        let lines: Vec<&str> = done.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{done:?}");
        assert!(lines[0].contains("UPSTREAM_CA_FILE"), "{}", lines[0]);
        assert!(lines[0].contains(ca), "{}", lines[0]);
        assert!(!done.stderr.contains("panicked"));
    }
}

/// Not a test of the daemon: the pool's constructor takes its parts (per-route pools
/// will), and the parts of a parsed configuration give the same pool as the configuration.
#[test]
fn a_pool_is_built_from_its_parts() {
    let config = Config::from_lookup(|k| {
        (k == "UPSTREAM_URLS").then(|| "http://127.0.0.1:1 weight=2, https://127.0.0.1:2".into())
    })
    .unwrap();
    let backends: &[BackendConfig] = &config.backends;
    let from_parts = Upstream::from_parts(backends, &config.pool, config.upstream_timeout);
    let whole = Upstream::new(&config);
    assert_eq!(
        format!("{:?}", from_parts.status()),
        format!("{:?}", whole.status())
    );
    assert_eq!(from_parts.status()[1].url, "https://127.0.0.1:2");
}
