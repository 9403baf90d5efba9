//! Test harness: an in-test origin (a real hyper server on 127.0.0.1:0 whose behaviour each
//! test scripts and which counts what it receives), the real proxy on another ephemeral port,
//! and a small client.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use edgecache::proxy::Proxy;
use edgecache::Config;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

pub mod process;
pub mod redis;

pub type OriginResponse = Response<edgecache::body::ProxyBody>;
type Handler = Arc<
    dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = OriginResponse> + Send>> + Send + Sync,
>;

/// A scripted origin that counts requests by `path?query` and TCP connections.
pub struct Origin {
    pub addr: SocketAddr,
    hits: Arc<Mutex<HashMap<String, usize>>>,
    pub connections: Arc<AtomicUsize>,
    /// Requests whose head has arrived (counted before the handler runs).
    pub started: Arc<AtomicUsize>,
    /// Woken on every request that arrives: [`Origin::wait_until`] waits on it.
    arrived: Arc<tokio::sync::Notify>,
    /// The accept loop and every connection task, so `stop` can drop them all.
    tasks: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Origin {
    /// Starts an origin whose responses come from `handler`.
    pub async fn start<F, Fut>(handler: F) -> Origin
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = OriginResponse> + Send + 'static,
    {
        Self::start_on("127.0.0.1:0".parse().unwrap(), handler).await
    }

    /// Starts an origin on a given address (to bring a stopped backend back on its port).
    pub async fn start_on<F, Fut>(addr: SocketAddr, handler: F) -> Origin
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = OriginResponse> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |req| Box::pin(handler(req)));
        let listener = TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let hits: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let connections = Arc::new(AtomicUsize::new(0));
        let started = Arc::new(AtomicUsize::new(0));
        let (h, c, s) = (hits.clone(), connections.clone(), started.clone());
        let arrived = Arc::new(tokio::sync::Notify::new());
        let a = arrived.clone();
        let tasks: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let conn_tasks = tasks.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                c.fetch_add(1, Ordering::SeqCst);
                let (handler, hits, started) = (handler.clone(), h.clone(), s.clone());
                let arrived = a.clone();
                let conn = tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let key = req
                            .uri()
                            .path_and_query()
                            .map_or("/".to_string(), |pq| pq.to_string());
                        *hits.lock().unwrap().entry(key).or_default() += 1;
                        started.fetch_add(1, Ordering::SeqCst);
                        arrived.notify_waiters();
                        let fut = handler(req);
                        async move { Ok::<_, Infallible>(fut.await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
                conn_tasks.lock().unwrap().push(conn.abort_handle());
            }
        });
        tasks.lock().unwrap().push(accept.abort_handle());
        Origin {
            addr,
            hits,
            connections,
            started,
            arrived,
            tasks,
        }
    }

    /// Starts an origin whose responses from `handler` are held at `gate`: the handler is
    /// called as each request arrives, its future awaited once the gate is open.
    pub async fn start_behind<F, Fut>(gate: &Gate, handler: F) -> Origin
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = OriginResponse> + Send + 'static,
    {
        let gate = gate.clone();
        Self::start(move |req| {
            let (gate, response) = (gate.clone(), handler(req));
            async move {
                gate.pass().await;
                response.await
            }
        })
        .await
    }

    /// Waits until `cond` holds for this origin, re-checking it as each request arrives (an
    /// event, not a polling interval); returns false if `timeout` passes first. `cond` must
    /// read what the origin counts before it wakes waiters ([`Origin::hits`],
    /// [`Origin::total`], `started`), not what the handler itself changes: that may not have
    /// happened yet when the re-check runs.
    pub async fn wait_until(&self, timeout: Duration, cond: impl Fn(&Origin) -> bool) -> bool {
        let wait = async {
            loop {
                let arrived = self.arrived.notified();
                tokio::pin!(arrived);
                // Registered before the check, so a request between the two is not missed.
                arrived.as_mut().enable();
                if cond(self) {
                    return;
                }
                arrived.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }

    /// Stops accepting and drops every open connection: the backend is gone.
    pub fn stop(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
    }

    /// How many requests for `path_and_query` arrived.
    pub fn hits(&self, path_and_query: &str) -> usize {
        self.hits
            .lock()
            .unwrap()
            .get(path_and_query)
            .copied()
            .unwrap_or(0)
    }

    pub fn total(&self) -> usize {
        self.hits.lock().unwrap().values().sum()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// An origin whose body changes on every request (`v1`, `v2`, …), with `headers` on each.
pub async fn versioned_origin(headers: &'static [(&'static str, &'static str)]) -> Origin {
    let n = Arc::new(AtomicUsize::new(0));
    Origin::start(move |_req| {
        let v = n.fetch_add(1, Ordering::SeqCst) + 1;
        async move { reply(200, headers, format!("v{v}")) }
    })
    .await
}

/// An address nothing listens on, reserved for the test's lifetime: a socket bound to it but
/// not listening, so connecting is refused and no other test can take the port meanwhile.
pub fn refused_addr() -> (tokio::net::TcpSocket, SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    (socket, addr)
}

/// Holds origin handlers until the test opens it: a handler awaits [`Gate::pass`], the test
/// calls [`Gate::open`] once what it waits for (followers queued behind a fetch, say) has
/// happened. Open, it lets everything through.
#[derive(Clone)]
pub struct Gate(Arc<tokio::sync::Semaphore>);

impl Gate {
    pub fn new() -> Gate {
        Gate(Arc::new(tokio::sync::Semaphore::new(0)))
    }

    /// Returns once the gate is open.
    pub async fn pass(&self) {
        // No permit is ever added: `acquire` waits until `close`, then fails at once.
        let _ = self.0.acquire().await;
    }

    pub fn open(&self) {
        self.0.close();
    }
}

/// A response with a body and headers.
pub fn reply(status: u16, headers: &[(&str, &str)], body: impl Into<Bytes>) -> OriginResponse {
    let mut resp = Response::new(edgecache::body::ProxyBody::full(body.into()));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap();
    for (k, v) in headers {
        resp.headers_mut().append(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            http::HeaderValue::from_str(v).unwrap(),
        );
    }
    resp
}

/// The running proxy.
pub struct ProxyHandle {
    pub addr: SocketAddr,
    pub proxy: Arc<Proxy>,
    shutdown: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl ProxyHandle {
    /// The cache key of `path` as requested by [`send`] (which sends `Host: <proxy addr>`).
    pub fn key(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Starts edgecache in front of `upstream` with `env` on top of the test defaults.
    pub async fn start(upstream: &str, env: &[(&str, &str)]) -> ProxyHandle {
        let mut vars: HashMap<String, String> = HashMap::from([
            ("UPSTREAM_URL".into(), upstream.to_string()),
            ("LISTEN_ADDR".into(), "127.0.0.1:0".into()),
            ("CLEAR_CACHE_KEY".into(), "Secret".into()),
            ("REQ_TIMEOUT".into(), "5".into()),
            ("SHUTDOWN_GRACE_SECS".into(), "5".into()),
            // Probes would show up in the origins' request counts; pool tests turn them on.
            ("HEALTH_CHECK_INTERVAL_SECS".into(), "0".into()),
        ]);
        for (k, v) in env {
            vars.insert(k.to_string(), v.to_string());
        }
        let config = Config::from_lookup(|k| vars.get(k).cloned()).expect("test config is valid");
        let listener = TcpListener::bind(config.listen_addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let routes = config.routes_file.as_ref().map(|path| {
            edgecache::routes::Routes::load(path, |k| vars.get(k).cloned())
                .unwrap_or_else(|e| panic!("test routes are valid: {e}"))
        });
        let proxy = Arc::new(Proxy::new(config));
        if let Some(routes) = routes {
            proxy.install_routes(routes);
        }
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(edgecache::server::serve(listener, proxy.clone(), async {
            let _ = rx.await;
        }));
        ProxyHandle {
            addr,
            proxy,
            shutdown: Some(tx),
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// Waits (up to 5 s) until `n` requests in all have joined a fetch already under way as
    /// followers (counted as they join, before they wait); returns whether they did.
    pub async fn followers(&self, n: u64) -> bool {
        let metrics = &self.proxy.metrics;
        eventually(Duration::from_secs(5), || {
            metrics.coalesced.load(Ordering::SeqCst) >= n
        })
        .await
    }

    /// What `/metrics` would show now.
    pub fn metrics(&self) -> String {
        edgecache::ops::metrics_text(&self.proxy)
    }

    /// What `/status` would show now.
    pub fn status(&self) -> String {
        edgecache::ops::status_json(&self.proxy)
    }

    /// Signals shutdown and waits for the server to finish draining.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }
}

/// A complete response as the client saw it.
#[derive(Debug)]
pub struct Got {
    pub status: u16,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Got {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn cache(&self) -> &str {
        self.header("x-cache-status").unwrap_or("")
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends one request on a fresh connection and reads the whole response.
pub async fn send(
    method: &str,
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Got {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut req = Request::builder().method(method).uri(path);
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        req = req.header("host", addr.to_string());
    }
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = sender
        .send_request(req.body(Full::new(body)).unwrap())
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Got {
        status: parts.status.as_u16(),
        headers: parts.headers,
        body,
    }
}

pub async fn get(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> Got {
    send("GET", addr, path, headers, Bytes::new()).await
}

/// An admin request (`POST` with a body the proxy ignores) to the proxy.
pub async fn admin(proxy: &ProxyHandle, path: &str, headers: &[(&str, &str)]) -> Got {
    send(
        "POST",
        proxy.addr,
        path,
        headers,
        Bytes::from_static(b"ignored"),
    )
    .await
}

/// The value of one series (name and labels exactly as rendered) in a Prometheus text
/// exposition; panics, showing the text, if it is absent.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| {
            l.strip_prefix(series)
                .filter(|rest| rest.starts_with(' '))
                .and_then(|rest| rest.trim().parse().ok())
        })
        .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
}

/// Polls `cond` until it holds or `timeout` passes; returns whether it held.
pub async fn eventually(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cond()
}

/// Resident set size of a process (`"self"` or a pid), in KiB; 0 when unknown.
pub fn rss_kib(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}
