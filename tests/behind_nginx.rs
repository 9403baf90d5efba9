//! edgecache behind the project's real `nginx.conf`: a real nginx process in front of the
//! in-process proxy, in front of an in-test origin, all on ephemeral loopback ports.
//!
//! nginx is required: when it is missing this test fails and says to install it.

mod common;

use std::fs;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::{get, reply, Got, Origin, ProxyHandle};
use http::HeaderMap;

/// How long nginx may take to accept connections, and to stop.
const NGINX_DEADLINE: Duration = Duration::from_secs(20);

/// The origin routes: one with a strong upstream ETag, one without (edgecache makes one).
const WITH_ETAG: &str = "/api/with-etag";
const NO_ETAG: &str = "/api/no-etag";

/// Through nginx (gzip) and edgecache (cache, ETag/304) to the origin:
///
/// * a gzip-accepting client gets `Content-Encoding: gzip`, nginx's weakened `W/"v1"` and a
///   body that gunzips to exactly the origin's JSON; a client without `Accept-Encoding` gets
///   the identity body and the strong `"v1"`;
/// * the weak `If-None-Match: W/"v1"` a browser sends back gets edgecache's `304` (no body);
/// * the same holds for the ETag edgecache generates when the origin sends none;
/// * nginx's `X-Forwarded-For` arrives (the origin sees the chain client, nginx) along with
///   `X-Forwarded-Proto`/`-Host`;
/// * the origin sees exactly one request per route although each was asked for several times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gzip_weak_etags_and_forwarded_headers_through_nginx() {
    let nginx_bin = find_nginx();

    let json = origin_json();
    let seen: Arc<Mutex<Vec<(String, HeaderMap)>>> = Arc::default();
    let origin = {
        let (json, seen) = (json.clone(), seen.clone());
        Origin::start(move |req| {
            let path = req.uri().path().to_owned();
            seen.lock()
                .unwrap()
                .push((path.clone(), req.headers().clone()));
            let json = json.clone();
            async move {
                match path.as_str() {
                    WITH_ETAG => reply(
                        200,
                        &[("content-type", "application/json"), ("etag", "\"v1\"")],
                        json,
                    ),
                    NO_ETAG => reply(200, &[("content-type", "application/json")], json),
                    _ => reply(404, &[("content-type", "text/plain")], "not found\n"),
                }
            }
        })
        .await
    };
    // A long default freshness: nothing may expire (and be refetched) while the test runs.
    let proxy =
        ProxyHandle::start(&origin.url(), &[("DEFAULT_CACHE_EXPIRY_TIME_SECS", "600")]).await;
    let nginx = Nginx::start(&nginx_bin, proxy.addr).await;
    let front = nginx.addr;

    // nginx itself answers.
    let health = get(front, "/nginx-health", &[]).await;
    assert_eq!(health.status, 200, "nginx health check: {health:?}");

    // (a) gzip, with the strong upstream ETag weakened by nginx.
    let zipped = get(front, WITH_ETAG, &[("accept-encoding", "gzip")]).await;
    assert_eq!(zipped.status, 200, "{zipped:?}");
    assert_eq!(
        zipped.header("content-encoding"),
        Some("gzip"),
        "{zipped:?}"
    );
    assert_eq!(zipped.header("etag"), Some("W/\"v1\""), "{zipped:?}");
    assert_eq!(zipped.header("content-type"), Some("application/json"));
    assert_eq!(zipped.cache(), "MISS", "first request fills the cache");
    assert!(
        vary_has_accept_encoding(&zipped),
        "gzip_vary on: expected Vary: Accept-Encoding, got {:?}",
        zipped.headers.get_all("vary")
    );
    let unzipped = gunzip(&zipped.body);
    assert_eq!(
        String::from_utf8(unzipped).unwrap(),
        json,
        "the gzipped body must decode to the origin's JSON"
    );
    assert!(
        zipped.body.len() < json.len(),
        "gzip should shrink the JSON"
    );

    // Without Accept-Encoding: identity body and the strong ETag, served from the cache.
    let plain = get(front, WITH_ETAG, &[]).await;
    assert_eq!(plain.status, 200, "{plain:?}");
    assert_eq!(plain.header("content-encoding"), None, "{plain:?}");
    assert_eq!(plain.header("etag"), Some("\"v1\""), "{plain:?}");
    assert_eq!(plain.text(), json);
    assert_eq!(plain.cache(), "HIT");

    // (b) The weak ETag sent back through nginx still yields 304, answered by edgecache.
    let revalidated = get(
        front,
        WITH_ETAG,
        &[("accept-encoding", "gzip"), ("if-none-match", "W/\"v1\"")],
    )
    .await;
    assert_eq!(revalidated.status, 304, "{revalidated:?}");
    assert!(
        revalidated.body.is_empty(),
        "a 304 has no body: {revalidated:?}"
    );
    assert_eq!(
        revalidated.cache(),
        "HIT",
        "edgecache answered the 304: {revalidated:?}"
    );

    // (c) The same for an ETag edgecache generated (the origin sent none). It is generated
    // from the whole body, so the response streamed while the body arrives has none; the
    // stored copy has it.
    let first = get(front, NO_ETAG, &[("accept-encoding", "gzip")]).await;
    assert_eq!(first.cache(), "MISS", "{first:?}");
    let zipped = get(front, NO_ETAG, &[("accept-encoding", "gzip")]).await;
    assert_eq!(zipped.cache(), "HIT", "{zipped:?}");
    assert_eq!(zipped.status, 200, "{zipped:?}");
    assert_eq!(
        zipped.header("content-encoding"),
        Some("gzip"),
        "{zipped:?}"
    );
    let weak = zipped
        .header("etag")
        .expect("edgecache generates an ETag")
        .to_owned();
    let strong = weak
        .strip_prefix("W/")
        .unwrap_or_else(|| panic!("nginx should weaken the generated ETag, got {weak}"));
    assert!(
        strong.len() > 2 && strong.starts_with('"') && strong.ends_with('"'),
        "not an entity-tag: {weak}"
    );
    assert_eq!(String::from_utf8(gunzip(&zipped.body)).unwrap(), json);

    let plain = get(front, NO_ETAG, &[]).await;
    assert_eq!(plain.status, 200, "{plain:?}");
    assert_eq!(
        plain.header("etag"),
        Some(strong),
        "same ETag, strong without gzip"
    );
    assert_eq!(plain.cache(), "HIT");

    for inm in [weak.as_str(), strong] {
        let revalidated = get(
            front,
            NO_ETAG,
            &[("accept-encoding", "gzip"), ("if-none-match", inm)],
        )
        .await;
        assert_eq!(
            revalidated.status, 304,
            "If-None-Match: {inm}: {revalidated:?}"
        );
        assert!(revalidated.body.is_empty(), "{revalidated:?}");
        assert_eq!(revalidated.cache(), "HIT", "{revalidated:?}");
    }

    // A tag that does not match gets the full (gzipped) body.
    let changed = get(
        front,
        NO_ETAG,
        &[
            ("accept-encoding", "gzip"),
            ("if-none-match", "W/\"other\""),
        ],
    )
    .await;
    assert_eq!(changed.status, 200, "{changed:?}");
    assert_eq!(String::from_utf8(gunzip(&changed.body)).unwrap(), json);

    // (e) Several requests per route through nginx, one request each at the origin.
    assert_eq!(origin.hits(WITH_ETAG), 1, "origin requests for {WITH_ETAG}");
    assert_eq!(origin.hits(NO_ETAG), 1, "origin requests for {NO_ETAG}");
    assert_eq!(origin.total(), 2);

    // (d) What reached the origin: nginx's X-Forwarded-For (the client, 127.0.0.1), extended
    // by edgecache with its peer (nginx, also 127.0.0.1) because 127.0.0.1 is a trusted proxy.
    // Without nginx's header edgecache would have sent just "127.0.0.1".
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "origin requests: {:?}", paths(&seen));
    for (path, headers) in seen.iter() {
        let h = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
        assert_eq!(
            h("x-forwarded-for"),
            Some("127.0.0.1, 127.0.0.1"),
            "X-Forwarded-For at the origin for {path}: {headers:?}"
        );
        assert_eq!(h("x-forwarded-proto"), Some("http"), "{path}: {headers:?}");
        assert_eq!(
            h("x-forwarded-host"),
            Some("127.0.0.1"),
            "{path}: {headers:?}"
        );
        assert_eq!(h("host"), Some(origin.addr.to_string().as_str()), "{path}");
        assert_eq!(
            h("if-none-match"),
            None,
            "client preconditions never go upstream"
        );
    }
    drop(nginx);
    proxy.shutdown().await;
}

fn paths(seen: &[(String, HeaderMap)]) -> Vec<&str> {
    seen.iter().map(|(p, _)| p.as_str()).collect()
}

fn vary_has_accept_encoding(got: &Got) -> bool {
    got.headers
        .get_all("vary")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|v| v.trim().eq_ignore_ascii_case("accept-encoding"))
}

/// About 2 KiB of JSON (over nginx's `gzip_min_length`).
fn origin_json() -> String {
    let items: Vec<String> = (0..40)
        .map(|i| {
            format!(
                r#"{{"id":{i},"name":"item-{i}","price_cents":{},"tags":["a","b"]}}"#,
                i * 137 % 1000
            )
        })
        .collect();
    let json = format!(r#"{{"items":[{}],"total":40}}"#, items.join(","));
    assert!((1800..4096).contains(&json.len()), "{}", json.len());
    json
}

/// nginx on PATH, else /usr/sbin/nginx; panics (fails the test) when there is none.
fn find_nginx() -> PathBuf {
    let on_path = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("nginx"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    on_path
        .into_iter()
        .chain([
            PathBuf::from("/usr/sbin/nginx"),
            PathBuf::from("/usr/local/sbin/nginx"),
        ])
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "nginx is required for this test but was not found on PATH or in /usr/sbin: \
                 install nginx (e.g. `apt-get install nginx`) and run the test again"
            )
        })
}

/// A free loopback port: bind port 0, note the port, release it.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A fresh, uniquely named directory under the system temp dir.
fn unique_temp_dir(tag: &str) -> PathBuf {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let dir = std::env::temp_dir().join(format!("edgecache-{tag}-{}-{nanos}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// A running nginx (master and workers) with the project's `nginx.conf`, rendered into its own
/// prefix directory. Dropping it stops nginx and removes the directory.
struct Nginx {
    addr: SocketAddr,
    child: Child,
    prefix: PathBuf,
}

impl Nginx {
    async fn start(bin: &Path, edgecache: SocketAddr) -> Nginx {
        let prefix = unique_temp_dir("nginx");
        fs::create_dir_all(prefix.join("logs")).unwrap();
        let template = fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("nginx.conf"))
            .expect("read nginx.conf");
        assert!(template.contains("${NGINX_PORT}") && template.contains("${EDGECACHE_UPSTREAM}"));
        let port = free_port();
        let conf = template
            .replace("${NGINX_PORT}", &port.to_string())
            .replace("${EDGECACHE_UPSTREAM}", &edgecache.to_string());
        let conf_path = prefix.join("nginx.conf");
        fs::write(&conf_path, conf).unwrap();

        let stderr = fs::File::create(prefix.join("nginx.stderr")).unwrap();
        let mut cmd = Command::new(bin);
        cmd.arg("-p").arg(&prefix).arg("-c").arg(&conf_path);
        cmd.args(["-g", "daemon off;"]);
        // Keep nginx away from its built-in error log path before it reads the config
        // (`-e` exists since nginx 1.19.5).
        let help = Command::new(bin)
            .arg("-h")
            .output()
            .map(|o| o.stderr)
            .unwrap_or_default();
        if String::from_utf8_lossy(&help).contains("-e filename") {
            cmd.args(["-e", "stderr"]);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
        let mut nginx = Nginx {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child,
            prefix,
        };
        nginx.wait_accepting().await;
        nginx
    }

    /// Polls until nginx accepts connections; fails with its stderr if it exits or times out.
    async fn wait_accepting(&mut self) {
        let deadline = Instant::now() + NGINX_DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "nginx exited during startup ({status}); stderr:\n{}",
                    self.stderr()
                );
            }
            if tokio::net::TcpStream::connect(self.addr).await.is_ok() {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "nginx did not accept connections on {} within {NGINX_DEADLINE:?}; stderr:\n{}",
                    self.addr,
                    self.stderr()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn stderr(&self) -> String {
        fs::read_to_string(self.prefix.join("nginx.stderr")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM lets the master stop its workers; SIGKILL would orphan them.
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            let deadline = Instant::now() + NGINX_DEADLINE;
            while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = fs::remove_dir_all(&self.prefix);
    }
}

/// Decodes a gzip member (RFC 1952); flate2 checks its CRC-32 and length trailer.
fn gunzip(data: &[u8]) -> Vec<u8> {
    use std::io::Read;
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data)
        .read_to_end(&mut out)
        .unwrap_or_else(|e| panic!("not a valid gzip stream ({} bytes): {e}", data.len()));
    out
}
