//! Runtime configuration: raw environment variables in, a validated, typed [`Config`] out.
//!
//! Setting names are compatible with the proxy edgecache replaces (`UPSTREAM_URL`,
//! `DEFAULT_CACHE_EXPIRY_TIME_SECS`, `DEFAULT_REFRESH_WINDOW_SECS`, `REQ_TIMEOUT`,
//! `CLEAR_CACHE_KEY`), so an old `.env` keeps working. Parsing is pure: it takes a lookup
//! function, never reads the process environment itself, and reports the first bad variable
//! as a [`ConfigError`] that names it.
//!
//! Every numeric setting has a range, stated once where it is read (the `seconds`, `count` and
//! `byte_size` helpers of [`Config::from_lookup`]) and documented in the README's settings
//! table. The ranges keep every duration small enough that adding it (or twice it) to an
//! `Instant` cannot overflow: timeouts are at most a day, cache lifetimes at most a year.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::Duration;

use http::Uri;
use rustls::pki_types::CertificateDer;

/// Everything the daemon needs to run, validated.
#[derive(Clone, Debug)]
pub struct Config {
    /// Address the proxy listens on (`LISTEN_ADDR`).
    pub listen_addr: SocketAddr,
    /// The upstream backends: `UPSTREAM_URLS` (several, weighted), else `UPSTREAM_URL`.
    pub backends: Vec<BackendConfig>,
    /// Health checking, circuit breaking and connection pooling of the backends.
    pub pool: PoolConfig,
    /// Address of the operator listener (`/status`, `/metrics`): `OPS_LISTEN_ADDR` (old name
    /// `ADMIN_LISTEN_ADDR`, still read), default `127.0.0.1:9000`; `None` when `off`.
    pub ops_listen_addr: Option<SocketAddr>,
    /// Freshness given to a storable response without explicit freshness
    /// (`DEFAULT_CACHE_EXPIRY_TIME_SECS`); `None` means RFC 9111 rules only.
    pub default_ttl: Option<Duration>,
    /// At expiry, an entry requested within this window is refreshed in the background;
    /// otherwise it is dropped (`DEFAULT_REFRESH_WINDOW_SECS`). Zero disables refresh.
    pub refresh_window: Duration,
    /// Whole upstream request timeout (`REQ_TIMEOUT`); exceeded → 504.
    pub upstream_timeout: Duration,
    /// Admin password (`CLEAR_CACHE_KEY`); `None` disables admin requests (403).
    pub admin_key: Option<AdminKey>,
    /// `LOG_FORMAT`.
    pub log_format: LogFormat,
    /// How long in-flight requests may run after SIGTERM/SIGINT (`SHUTDOWN_GRACE_SECS`).
    pub shutdown_grace: Duration,
    /// Peers whose `X-Forwarded-*` headers are believed (`TRUSTED_PROXIES`).
    pub trusted_proxies: Vec<IpNet>,
    /// Responses with larger bodies are streamed and never stored (`CACHE_MAX_OBJECT_BYTES`);
    /// at most `max_bytes`.
    pub max_object_bytes: usize,
    /// The store's accounted size (bodies, headers, keys, per-entry overhead) never exceeds
    /// this (`CACHE_MAX_BYTES`).
    pub max_bytes: usize,
    /// A response streamed to several waiting requests and not stored holds at most this
    /// many bytes for its slowest reader (`STREAM_BUFFER_BYTES`); all such responses together
    /// at most `stream_buffer_total` (`STREAM_BUFFER_TOTAL_BYTES`).
    pub stream_buffer: usize,
    pub stream_buffer_total: usize,
    /// The shared second tier (`REDIS_URL`, `REDIS_TIMEOUT_MS`, `REDIS_MAX_OBJECT_BYTES`);
    /// `None`: every instance caches on its own, as without Redis.
    pub redis: Option<RedisConfig>,
    /// How long an expired entry that has validators is kept after its last use, so a later
    /// request can revalidate it (304) instead of refetching it (`STALE_RETENTION_SECS`).
    /// Zero drops every cold entry at expiry, as the predecessor did.
    pub stale_retention: Duration,
    /// When the upstream fails (unreachable, timeout, 5xx), a stored copy up to this long
    /// past expiry is served instead of the error, unless the response forbids serving it
    /// stale (`STALE_IF_ERROR_SECS`). A response's own `stale-if-error` also applies.
    pub stale_if_error: Duration,
    /// Limits on what clients may send.
    pub limits: Limits,
    /// Which request `Cache-Control` directives are obeyed (`CLIENT_CACHE_CONTROL`).
    pub client_cache_control: ClientCacheControl,
    /// Hosts this proxy answers for (`ALLOWED_HOSTS`); empty: any. Requests for other hosts
    /// get 421 before any lookup. `.example.com` / `*.example.com` cover subdomains.
    pub allowed_hosts: Vec<String>,
    /// Background refreshes (expiry, stale serving, admin) running at once at most
    /// (`REFRESH_CONCURRENCY`).
    pub refresh_concurrency: usize,
    /// `ROUTES_FILE`: per-path routing policy ([`crate::routes`]), loaded by the daemon at
    /// start-up and again on SIGHUP.
    pub routes_file: Option<std::path::PathBuf>,
    /// Async jobs and signed callbacks (`JOBS_*`, `CALLBACK_*`; see [`crate::jobs`]).
    pub jobs: JobsConfig,
}

/// Limits that protect the proxy from hostile or broken clients.
#[derive(Clone, Debug)]
pub struct Limits {
    /// A connection must deliver a request head this fast (`HEADER_READ_TIMEOUT_SECS`).
    pub header_read_timeout: Duration,
    /// An idle keep-alive connection is closed after this (`KEEPALIVE_TIMEOUT_SECS`).
    pub keepalive_timeout: Duration,
    /// Request line + headers above this are refused with 431/414 (`MAX_HEADER_BYTES`).
    pub max_header_bytes: usize,
    /// Open downstream connections at most (`MAX_CONNECTIONS`).
    pub max_connections: usize,
    /// Request bodies passed through above this are refused with 413; `None`: no limit
    /// (`MAX_REQUEST_BODY_BYTES`).
    pub max_request_body: Option<u64>,
}

/// How far clients' own `Cache-Control` request directives are obeyed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ClientCacheControl {
    /// Obey only what cannot force an origin fetch: `no-store`, `only-if-cached`,
    /// `max-stale`. `no-cache`, `max-age`, `min-fresh` and `Pragma: no-cache` are ignored, so
    /// no client can make the proxy hit the origin at will (the default).
    #[default]
    Safe,
    /// Obey all request directives (revalidations they cause are still coalesced).
    Full,
}

/// The admin password. Its `Debug` never prints the secret.
#[derive(Clone)]
pub struct AdminKey(pub(crate) String);

impl fmt::Debug for AdminKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AdminKey(<redacted>)")
    }
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

/// One upstream backend.
#[derive(Clone, Debug)]
pub struct BackendConfig {
    pub url: UpstreamUrl,
    /// Relative share of requests (nginx-style `weight=N`, default 1).
    pub weight: u32,
    /// Speak HTTP/2 only. Cleartext (`h2c://`, or `http://… h2`): with prior knowledge.
    /// `https://… h2`: TLS offers only `h2` by ALPN. Without it an `https://` backend is
    /// offered `h2` and `http/1.1` and spoken to in the protocol it picks.
    pub http2: bool,
}

/// How the backends are watched and connected to.
#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// Probed with GET on every backend (`HEALTH_CHECK_PATH`).
    pub health_path: String,
    /// Zero disables active checks (`HEALTH_CHECK_INTERVAL_SECS`).
    pub health_interval: Duration,
    pub health_timeout: Duration,
    /// Consecutive failed probes before a backend is marked down.
    pub failure_threshold: u32,
    /// Consecutive good probes before a down backend is back.
    pub recovery_threshold: u32,
    /// Consecutive failures of live traffic (connect errors, timeouts, 5xx) that open a
    /// backend's circuit breaker (`BREAKER_FAILURE_THRESHOLD`).
    pub breaker_threshold: u32,
    /// How long an open breaker keeps a backend out before one trial request
    /// (`BREAKER_COOLDOWN_SECS`).
    pub breaker_cooldown: Duration,
    pub connect_timeout: Duration,
    pub max_idle_per_host: usize,
    /// Idle keep-alive connections to a backend are retired after this
    /// (`UPSTREAM_IDLE_TIMEOUT_SECS`, default 4: below the 5 s after which Node, Apache and
    /// uvicorn close them). A backend's `Keep-Alive: timeout=N` lowers it for that backend.
    pub idle_timeout: Duration,
    /// Extra tries of an idempotent request that failed before any response byte
    /// (`UPSTREAM_RETRIES`, default 1; 0 disables).
    pub retries: u32,
    /// CA certificates trusted for `https://` backends besides the system's
    /// (`UPSTREAM_CA_FILE`); `None`: the system's only.
    pub ca_file: Option<CaFile>,
    /// Below this percentage of backends up by health checks, all of them take traffic
    /// (`HEALTH_PANIC_THRESHOLD`, default 50; 0 disables).
    pub panic_threshold: u8,
}

/// The parsed upstream base URL.
#[derive(Clone, Debug)]
pub struct UpstreamUrl {
    /// `https://`: reached over TLS, the host sent as SNI and checked against the
    /// certificate.
    pub tls: bool,
    /// `host:port` used for connecting and as the upstream `Host` header.
    pub authority: http::uri::Authority,
    /// Path prefix without a trailing slash (`""` when the URL has no path).
    pub path_prefix: String,
}

impl UpstreamUrl {
    /// `https` or `http` (also for an `h2c://` backend: cleartext).
    pub fn scheme(&self) -> &'static str {
        if self.tls {
            "https"
        } else {
            "http"
        }
    }

    /// Builds the absolute upstream URI for a downstream `path_and_query`.
    pub fn uri_for(&self, path_and_query: &str) -> Result<Uri, http::Error> {
        let mut pq = String::with_capacity(self.path_prefix.len() + path_and_query.len());
        pq.push_str(&self.path_prefix);
        pq.push_str(path_and_query);
        Uri::builder()
            .scheme(self.scheme())
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build()
    }
}

/// `UPSTREAM_CA_FILE`: one or more PEM CA certificates, read and checked at start-up.
#[derive(Clone)]
pub struct CaFile {
    /// As configured (for `--check`).
    pub path: String,
    /// Each certificate of the file, DER, in file order; at least one, each usable as a
    /// trust anchor.
    pub certs: Arc<[CertificateDer<'static>]>,
}

/// The path and how many certificates: the bytes say nothing to a reader.
impl fmt::Debug for CaFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CaFile")
            .field("path", &self.path)
            .field("certificates", &self.certs.len())
            .finish()
    }
}

impl CaFile {
    /// Reads `path`: every `CERTIFICATE` block of a PEM file (other blocks, such as a key,
    /// are skipped). Errs, in words for the operator, when the file cannot be read, holds no
    /// certificate, or a certificate is not usable as a CA.
    pub fn load(path: &str) -> Result<CaFile, String> {
        use rustls::pki_types::pem::PemObject as _;
        let pem = std::fs::read(path).map_err(|e| format!("cannot read `{path}`: {e}"))?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("`{path}` is not a PEM file: {e}"))?;
        if certs.is_empty() {
            return Err(format!(
                "`{path}` holds no certificate (expected PEM blocks -----BEGIN CERTIFICATE-----)"
            ));
        }
        let mut roots = rustls::RootCertStore::empty();
        for (i, cert) in certs.iter().enumerate() {
            roots.add(cert.clone()).map_err(|e| {
                format!(
                    "`{path}`: certificate {} is not usable as a CA certificate: {e}",
                    i + 1
                )
            })?;
        }
        Ok(CaFile {
            path: path.to_owned(),
            certs: certs.into(),
        })
    }
}

/// An IP network (`10.0.0.0/8`, or a single address).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    /// Whether `ip` lies inside this network (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }

    fn parse(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("`{s}` is not an IP address or CIDR network"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => match p.parse::<u8>() {
                Ok(p) if p <= max => p,
                _ => return Err(format!("`{s}` has an invalid prefix length")),
            },
        };
        Ok(IpNet { addr, prefix })
    }
}

impl fmt::Display for IpNet {
    /// `addr` alone for a single address, else `addr/prefix`: what `IpNet::parse` reads.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let single = if self.addr.is_ipv4() { 32 } else { 128 };
        if self.prefix == single {
            write!(f, "{}", self.addr)
        } else {
            write!(f, "{}/{}", self.addr, self.prefix)
        }
    }
}

/// One setting: its environment variable (the flag is its lower-kebab form, `--req-timeout`),
/// its default as the operator would write it (empty: unset), and one line on what it does.
/// `edgecache --help` is generated from [`SETTINGS`]; the README's settings table is the
/// reference with the details.
#[derive(Debug, Clone, Copy)]
pub struct Setting {
    pub name: &'static str,
    pub default: &'static str,
    pub help: &'static str,
}

impl Setting {
    /// The command-line flag without its dashes: `REQ_TIMEOUT` → `req-timeout`.
    pub fn flag(&self) -> String {
        self.name.to_ascii_lowercase().replace('_', "-")
    }
}

const fn setting(name: &'static str, default: &'static str, help: &'static str) -> Setting {
    Setting {
        name,
        default,
        help,
    }
}

/// Every setting the daemon reads, in the order of `.env.example`.
pub const SETTINGS: &[Setting] = &[
    setting("UPSTREAM_URL", "", "Base URL of the upstream, http://host:port[/prefix] or https:// (TLS, certificate checked; HTTP/2 if the server picks it), h2c:// for HTTP/2 with prior knowledge; required unless UPSTREAM_URLS is set"),
    setting("DEFAULT_CACHE_EXPIRY_TIME_SECS", "2", "Freshness in seconds for storable responses without explicit freshness; 0 = RFC 9111 rules only (0-31536000)"),
    setting("DEFAULT_REFRESH_WINDOW_SECS", "60", "An entry requested within this many seconds before expiry is refreshed in the background, otherwise dropped; 0 = never refresh (0-31536000)"),
    setting("REQ_TIMEOUT", "10", "Upstream timeout in seconds, decimals allowed; exceeded -> 504 (0.001-86400)"),
    setting("CLEAR_CACHE_KEY", "", "Admin password for Clear-Cache requests (Clear-Cache-Key header); empty = admin requests get 403"),
    setting("LISTEN_ADDR", "0.0.0.0:8000", "Address the proxy listens on (IP:port; port 0 picks a free one, logged at startup)"),
    setting("LOG_FORMAT", "text", "Log output format: text or json"),
    setting("RUST_LOG", "info", "Log filter (tracing EnvFilter syntax), e.g. info, debug, edgecache=debug"),
    setting("SHUTDOWN_GRACE_SECS", "30", "On SIGTERM/SIGINT, seconds in-flight requests may take to finish; a second signal exits at once (0-86400)"),
    setting("TRUSTED_PROXIES", "127.0.0.1,::1", "Comma-separated IPs/CIDRs whose X-Forwarded-* headers are believed; none = nobody"),
    setting("ALLOWED_HOSTS", "", "Comma-separated hosts served (.example.com covers subdomains); others get 421. Empty: every host"),
    setting("REFRESH_CONCURRENCY", "16", "Background refreshes running at once at most (1-10000)"),
    setting("CACHE_MAX_OBJECT_BYTES", "8MiB", "Larger responses are streamed through, not stored; at most CACHE_MAX_BYTES (unset: 8MiB or CACHE_MAX_BYTES if smaller)"),
    setting("STREAM_BUFFER_BYTES", "16MiB", "A response fetched once for several requests and not stored holds at most this much for its slowest reader, who is cut off beyond it (64KiB-1TiB)"),
    setting("STREAM_BUFFER_TOTAL_BYTES", "256MiB", "All such responses together hold at most this much; at least STREAM_BUFFER_BYTES"),
    setting("STALE_RETENTION_SECS", "0", "Keep expired entries with validators this long after last use, to revalidate (304) instead of refetch (0-31536000)"),
    setting("STALE_IF_ERROR_SECS", "0", "On upstream failure, serve a stored copy up to this many seconds past expiry instead of the error; 0 = off (0-31536000)"),
    setting("CLIENT_CACHE_CONTROL", "safe", "Request Cache-Control directives obeyed: safe (no client can force origin fetches) or full"),
    setting("UPSTREAM_URLS", "", "Several backends instead of UPSTREAM_URL: \"http://10.0.0.1:8080 weight=3, https://api.internal h2\"; takes precedence"),
    setting("UPSTREAM_CA_FILE", "", "PEM file of CA certificates trusted for https:// backends besides the system's (a private CA)"),
    setting("OPS_LISTEN_ADDR", "127.0.0.1:9000", "Operator listener for GET /status and /metrics (IP:port, port 0 allowed); off disables it (old name ADMIN_LISTEN_ADDR still read)"),
    setting("CONNECT_TIMEOUT_SECS", "5", "Connect timeout to a backend, seconds: TCP connect, plus the TLS handshake for https (0.001-86400)"),
    setting("HEALTH_CHECK_PATH", "/health-check", "Path probed with GET on every backend; 2xx is healthy"),
    setting("HEALTH_CHECK_INTERVAL_SECS", "10", "Seconds between health probes; 0 = no active checks (0-86400)"),
    setting("HEALTH_CHECK_TIMEOUT_SECS", "2", "A probe slower than this many seconds failed (0.001-86400)"),
    setting("HEALTH_CHECK_FAILURE_THRESHOLD", "3", "Consecutive failed probes before a backend is taken out (1-1000)"),
    setting("HEALTH_CHECK_RECOVERY_THRESHOLD", "2", "Consecutive good probes before it is back (1-1000)"),
    setting("HEALTH_PANIC_THRESHOLD", "50", "Below this percentage of backends up by health checks, all take traffic; 0 = off (0-100)"),
    setting("BREAKER_FAILURE_THRESHOLD", "5", "Consecutive live-traffic failures that open a backend's circuit breaker (1-1000000)"),
    setting("BREAKER_COOLDOWN_SECS", "10", "Seconds an open breaker keeps a backend out before one trial request (0-86400)"),
    setting("UPSTREAM_MAX_IDLE_PER_HOST", "64", "Idle keep-alive connections kept per backend (1-100000)"),
    setting("UPSTREAM_IDLE_TIMEOUT_SECS", "4", "Seconds an idle backend connection is kept (0-86400)"),
    setting("UPSTREAM_RETRIES", "1", "Extra tries of an idempotent bodiless request that failed before any response byte (0-10)"),
    setting("CACHE_MAX_BYTES", "256MiB", "Hard bound on the bytes the cache holds; units B, KiB, MiB, GiB, TiB (64KiB-1TiB)"),
    setting("HEADER_READ_TIMEOUT_SECS", "10", "A request head must arrive within this many seconds, else the connection is closed (0.001-86400)"),
    setting("KEEPALIVE_TIMEOUT_SECS", "75", "Idle keep-alive connections are closed after this many seconds (0.001-86400)"),
    setting("MAX_HEADER_BYTES", "64KiB", "Request line + headers above this: 431/414 (8KiB-1MiB)"),
    setting("MAX_CONNECTIONS", "10000", "Open client connections at most; more wait in the listen backlog (1-1000000)"),
    setting("MAX_REQUEST_BODY_BYTES", "0", "Pass-through request bodies above this: 413; 0 = no limit (0-1TiB)"),
    setting("REDIS_URL", "", "Shared second tier for a fleet of instances: redis://[user:password@]host[:port][/db], rediss:// for TLS, redis+cluster://host:port,host:port (rediss+cluster://) for a Redis Cluster; empty = none"),
    setting("REDIS_CA_FILE", "", "PEM file of the CA(s) that sign the Redis server's certificate (rediss:// only); empty = the system's roots"),
    setting("REDIS_CLIENT_CERT_FILE", "", "PEM certificate (chain) this instance presents to Redis, for a server that asks clients for one (tls-auth-clients); with REDIS_CLIENT_KEY_FILE, rediss:// only; empty = none"),
    setting("REDIS_CLIENT_KEY_FILE", "", "PEM private key of REDIS_CLIENT_CERT_FILE (never logged or shown)"),
    setting("REDIS_TIMEOUT_MS", "50", "Each Redis operation on the request path gives up after this many milliseconds (1-60000)"),
    setting("REDIS_MAX_OBJECT_BYTES", "1MiB", "Larger responses are kept in this instance's memory only, not in Redis (0-1TiB)"),
    setting("ROUTES_FILE", "", "TOML file of routes: allowlist, per-route upstreams, cache rules, injected headers, rate limits, retries, client deadlines (README: Routes); re-read on SIGHUP; empty = none"),
    setting("CALLBACK_ALLOWED_HOSTS", "", "Comma-separated host:port entries a job's callback URL may name (exact match; IPs only if listed); empty = callbacks refused (400)"),
    setting("CALLBACK_SECRET", "", "HMAC-SHA256 key signing callbacks (Edgecache-Signature), at least 16 characters; required with CALLBACK_ALLOWED_HOSTS; never shown"),
    setting("JOBS_MAX", "10000", "Async jobs held at once at most (pending or finished); a new one beyond it gets 503 (1-1000000)"),
    setting("JOBS_MAX_AGE_SECS", "3600", "A pending job fails as expired this long after it started; a finished one is forgotten this long after it finished (1-86400)"),
];

/// Where and how the shared tier is reached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// `redis://[user:password@]host[:port][/db]` (`rediss://` for TLS), as given (it may hold
    /// a password: never logged or shown).
    pub url: String,
    /// `REDIS_CA_FILE`: the path as given and the PEM read from it at start-up; `None`: the
    /// system's roots. Certificates and host names are always checked.
    pub ca: Option<(String, Vec<u8>)>,
    /// `REDIS_CLIENT_CERT_FILE` / `REDIS_CLIENT_KEY_FILE`: the certificate this instance
    /// presents (mutual TLS), read at start-up.
    pub client: Option<RedisClientCert>,
    /// Each Redis operation on the request path gives up after this (`REDIS_TIMEOUT_MS`).
    pub timeout: Duration,
    /// Larger responses stay in this instance's memory only (`REDIS_MAX_OBJECT_BYTES`).
    pub max_object_bytes: usize,
}

/// The certificate and key an instance presents to a Redis server that asks for one. Its
/// `Debug` shows the paths only: the key is never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisClientCert {
    pub cert_path: String,
    pub cert_pem: Vec<u8>,
    pub key_path: String,
    pub key_pem: Vec<u8>,
}

impl std::fmt::Debug for RedisClientCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisClientCert")
            .field("cert_path", &self.cert_path)
            .field("key_path", &self.key_path)
            .finish_non_exhaustive()
    }
}

impl RedisConfig {
    /// What redis-rs needs for TLS beyond the URL: the private CA and the client certificate,
    /// when either is set (`None`: the system's roots, no client certificate).
    pub fn tls_certificates(&self) -> Option<redis::TlsCertificates> {
        if self.ca.is_none() && self.client.is_none() {
            return None;
        }
        Some(redis::TlsCertificates {
            client_tls: self.client.as_ref().map(|c| redis::ClientTlsConfig {
                client_cert: c.cert_pem.clone(),
                client_key: c.key_pem.clone(),
            }),
            root_cert: self.ca.as_ref().map(|(_, pem)| pem.clone()),
        })
    }
}

/// A configuration error: which variable, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub variable: &'static str,
    pub problem: String,
}

/// One line: control characters in the problem (a value echoed in it) are escaped.
impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid configuration: {}: ", self.variable)?;
        for c in self.problem.chars() {
            if c.is_control() {
                write!(f, "{}", c.escape_default())?;
            } else {
                write!(f, "{c}")?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads the configuration from the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Builds the configuration from any name → value lookup (tests pass a map).
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        // Empty values count as unset, as in the `.env` files of the predecessor.
        let var = |name: &'static str| {
            get(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        let bad = |variable: &'static str, problem: String| ConfigError { variable, problem };

        let listen_addr = match var("LISTEN_ADDR") {
            None => SocketAddr::from(([0, 0, 0, 0], 8000)),
            Some(v) => v
                .parse()
                .map_err(|_| bad("LISTEN_ADDR", format!("`{v}` is not an IP:port address")))?,
        };
        let backends = match (var("UPSTREAM_URLS"), var("UPSTREAM_URL")) {
            (Some(list), _) => parse_backends(&list).map_err(|p| bad("UPSTREAM_URLS", p))?,
            (None, Some(v)) => {
                let (url, http2) = parse_upstream(&v).map_err(|p| bad("UPSTREAM_URL", p))?;
                vec![BackendConfig { url, weight: 1, http2 }]
            }
            (None, None) => return Err(bad(
                "UPSTREAM_URL",
                "is not set; set it to the base URL of your service, e.g. http://127.0.0.1:3006 \
                     (or UPSTREAM_URLS for several; ./start.sh runs the bundled mock origin when it is empty)"
                    .into(),
            )),
        };
        // Seconds (decimals allowed) within `range`, else an error naming the variable.
        let seconds = |name: &'static str,
                       default: f64,
                       range: RangeInclusive<f64>|
         -> Result<Duration, ConfigError> {
            match var(name) {
                None => Ok(Duration::from_secs_f64(default)),
                Some(v) => parse_seconds(&v, &range).map_err(|p| bad(name, p)),
            }
        };
        let default_ttl = Some(seconds("DEFAULT_CACHE_EXPIRY_TIME_SECS", 2.0, 0.0..=YEAR)?)
            .filter(|d| !d.is_zero());
        let refresh_window = seconds("DEFAULT_REFRESH_WINDOW_SECS", 60.0, 0.0..=YEAR)?;
        let upstream_timeout = seconds("REQ_TIMEOUT", 10.0, MILLISECOND..=DAY)?;
        let shutdown_grace = seconds("SHUTDOWN_GRACE_SECS", 30.0, 0.0..=DAY)?;
        let admin_key = var("CLEAR_CACHE_KEY").map(AdminKey);
        let log_format = match var("LOG_FORMAT")
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(bad(
                    "LOG_FORMAT",
                    format!("`{other}` is not `text` or `json`"),
                ))
            }
        };
        let trusted_proxies = match var("TRUSTED_PROXIES") {
            None => vec![
                IpNet::parse("127.0.0.1").map_err(|p| bad("TRUSTED_PROXIES", p))?,
                IpNet::parse("::1").map_err(|p| bad("TRUSTED_PROXIES", p))?,
            ],
            Some(v) => v
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty() && !s.eq_ignore_ascii_case("none"))
                .map(IpNet::parse)
                .collect::<Result<_, _>>()
                .map_err(|p| bad("TRUSTED_PROXIES", p))?,
        };
        // A byte size (`8MiB`) within `range`, else an error naming the variable.
        let byte_size = |name: &'static str,
                         default: usize,
                         range: RangeInclusive<u64>|
         -> Result<usize, ConfigError> {
            match var(name) {
                None => Ok(default),
                Some(v) => parse_bytes_in(&v, &range).map_err(|p| bad(name, p)),
            }
        };
        let max_bytes = byte_size("CACHE_MAX_BYTES", 256 << 20, 64 * KIB..=TIB)?;
        // Unset, it is 8 MiB or the whole store if that is smaller; set, it must fit the store.
        let max_object_bytes =
            byte_size("CACHE_MAX_OBJECT_BYTES", (8 << 20).min(max_bytes), 0..=TIB)?;
        if max_object_bytes > max_bytes {
            return Err(bad(
                "CACHE_MAX_OBJECT_BYTES",
                format!(
                    "`{}` is more than CACHE_MAX_BYTES ({}): no object that large could be stored",
                    show_bytes(max_object_bytes as u64),
                    show_bytes(max_bytes as u64)
                ),
            ));
        }
        let stream_buffer = byte_size("STREAM_BUFFER_BYTES", 16 << 20, 64 * KIB..=TIB)?;
        let stream_buffer_total = byte_size(
            "STREAM_BUFFER_TOTAL_BYTES",
            (256 << 20).max(stream_buffer),
            0..=TIB,
        )?;
        if stream_buffer_total < stream_buffer {
            return Err(bad(
                "STREAM_BUFFER_TOTAL_BYTES",
                format!(
                    "`{}` is less than STREAM_BUFFER_BYTES ({})",
                    show_bytes(stream_buffer_total as u64),
                    show_bytes(stream_buffer as u64)
                ),
            ));
        }
        let redis = match var("REDIS_URL").filter(|v| !v.trim().is_empty()) {
            None => None,
            Some(url) => {
                let url = url.trim().to_string();
                check_redis_url(&url).map_err(|p| bad("REDIS_URL", p))?;
                let ca = match var("REDIS_CA_FILE").filter(|v| !v.trim().is_empty()) {
                    None => None,
                    Some(path) => {
                        let path = path.trim().to_string();
                        Some((
                            path.clone(),
                            read_redis_ca(&url, &path).map_err(|p| bad("REDIS_CA_FILE", p))?,
                        ))
                    }
                };
                let timeout_ms = match var("REDIS_TIMEOUT_MS") {
                    None => 50,
                    Some(v) => match v.trim().parse::<u64>() {
                        Ok(n) if (1..=60_000).contains(&n) => n,
                        _ => {
                            return Err(bad(
                                "REDIS_TIMEOUT_MS",
                                format!(
                                    "`{v}` is not a whole number of milliseconds from 1 to 60000"
                                ),
                            ))
                        }
                    },
                };
                let client = read_redis_client(
                    &url,
                    var("REDIS_CLIENT_CERT_FILE").filter(|v| !v.trim().is_empty()),
                    var("REDIS_CLIENT_KEY_FILE").filter(|v| !v.trim().is_empty()),
                )?;
                Some(RedisConfig {
                    url,
                    ca,
                    client,
                    timeout: Duration::from_millis(timeout_ms),
                    max_object_bytes: byte_size("REDIS_MAX_OBJECT_BYTES", 1 << 20, 0..=TIB)?,
                })
            }
        };
        // A whole number within `range`, else an error naming the variable.
        let count = |name: &'static str,
                     default: u32,
                     range: RangeInclusive<u32>|
         -> Result<u32, ConfigError> {
            match var(name) {
                None => Ok(default),
                Some(v) => match v.parse::<u32>() {
                    Ok(n) if range.contains(&n) => Ok(n),
                    _ => Err(bad(
                        name,
                        format!(
                            "`{v}` is not a whole number from {} to {}",
                            range.start(),
                            range.end()
                        ),
                    )),
                },
            }
        };
        let health_path = var("HEALTH_CHECK_PATH").unwrap_or_else(|| "/health-check".into());
        if !health_path.starts_with('/') || health_path.parse::<http::uri::PathAndQuery>().is_err()
        {
            return Err(bad(
                "HEALTH_CHECK_PATH",
                format!("`{health_path}` must be a path starting with /"),
            ));
        }
        let pool = PoolConfig {
            health_path,
            health_interval: seconds("HEALTH_CHECK_INTERVAL_SECS", 10.0, 0.0..=DAY)?,
            health_timeout: seconds("HEALTH_CHECK_TIMEOUT_SECS", 2.0, MILLISECOND..=DAY)?,
            failure_threshold: count("HEALTH_CHECK_FAILURE_THRESHOLD", 3, 1..=1000)?,
            recovery_threshold: count("HEALTH_CHECK_RECOVERY_THRESHOLD", 2, 1..=1000)?,
            breaker_threshold: count("BREAKER_FAILURE_THRESHOLD", 5, 1..=1_000_000)?,
            breaker_cooldown: seconds("BREAKER_COOLDOWN_SECS", 10.0, 0.0..=DAY)?,
            connect_timeout: seconds("CONNECT_TIMEOUT_SECS", 5.0, MILLISECOND..=DAY)?,
            max_idle_per_host: count("UPSTREAM_MAX_IDLE_PER_HOST", 64, 1..=100_000)? as usize,
            idle_timeout: seconds("UPSTREAM_IDLE_TIMEOUT_SECS", 4.0, 0.0..=DAY)?,
            retries: count("UPSTREAM_RETRIES", 1, 0..=10)?,
            ca_file: match var("UPSTREAM_CA_FILE") {
                None => None,
                Some(path) => Some(CaFile::load(&path).map_err(|p| bad("UPSTREAM_CA_FILE", p))?),
            },
            panic_threshold: match var("HEALTH_PANIC_THRESHOLD") {
                None => 50,
                Some(v) => match v.trim_end_matches('%').trim().parse::<u8>() {
                    Ok(n) if n <= 100 => n,
                    _ => {
                        return Err(bad(
                            "HEALTH_PANIC_THRESHOLD",
                            format!("`{v}` is not a percentage from 0 to 100"),
                        ))
                    }
                },
            },
        };
        // `ADMIN_LISTEN_ADDR` is the old name, kept as an alias: "admin" now means only the
        // `Clear-Cache` requests on the proxy port.
        let (ops_var, ops_value) = match (var("OPS_LISTEN_ADDR"), var("ADMIN_LISTEN_ADDR")) {
            (Some(v), Some(old)) if v != old => {
                return Err(bad(
                    "OPS_LISTEN_ADDR",
                    format!("`{v}` disagrees with its old name ADMIN_LISTEN_ADDR=`{old}`; set only OPS_LISTEN_ADDR"),
                ))
            }
            (Some(v), _) => ("OPS_LISTEN_ADDR", Some(v)),
            (None, Some(old)) => ("ADMIN_LISTEN_ADDR", Some(old)),
            (None, None) => ("OPS_LISTEN_ADDR", None),
        };
        let ops_listen_addr =
            match ops_value {
                None => Some(SocketAddr::from(([127, 0, 0, 1], 9000))),
                Some(v) if v.eq_ignore_ascii_case("off") => None,
                Some(v) => Some(v.parse().map_err(|_| {
                    bad(ops_var, format!("`{v}` is not an IP:port address or `off`"))
                })?),
            };
        let limits = Limits {
            header_read_timeout: seconds("HEADER_READ_TIMEOUT_SECS", 10.0, MILLISECOND..=DAY)?,
            keepalive_timeout: seconds("KEEPALIVE_TIMEOUT_SECS", 75.0, MILLISECOND..=DAY)?,
            // hyper refuses a read buffer below 8 KiB.
            max_header_bytes: byte_size("MAX_HEADER_BYTES", 64 << 10, 8 * KIB..=MIB)?,
            max_connections: count("MAX_CONNECTIONS", 10_000, 1..=1_000_000)? as usize,
            max_request_body: Some(byte_size("MAX_REQUEST_BODY_BYTES", 0, 0..=TIB)? as u64)
                .filter(|n| *n > 0),
        };
        let stale_retention = seconds("STALE_RETENTION_SECS", 0.0, 0.0..=YEAR)?;
        let stale_if_error = seconds("STALE_IF_ERROR_SECS", 0.0, 0.0..=YEAR)?;
        let client_cache_control = match var("CLIENT_CACHE_CONTROL")
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
        {
            None | Some("safe") => ClientCacheControl::Safe,
            Some("full") => ClientCacheControl::Full,
            Some(other) => {
                return Err(bad(
                    "CLIENT_CACHE_CONTROL",
                    format!("`{other}` is not `safe` or `full`"),
                ))
            }
        };
        let allowed_hosts = match var("ALLOWED_HOSTS") {
            None => Vec::new(),
            Some(v) => v
                .split(',')
                .map(str::trim)
                .filter(|h| !h.is_empty())
                .map(|h| {
                    let name = h.trim_start_matches("*.").trim_start_matches('.');
                    let valid = !name.is_empty()
                        && name.bytes().all(|b| {
                            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'[' | b']' | b':')
                        });
                    if valid {
                        Ok(h.to_ascii_lowercase())
                    } else {
                        Err(bad(
                            "ALLOWED_HOSTS",
                            format!("`{h}` is not a host name (list names like example.com, .example.com)"),
                        ))
                    }
                })
                .collect::<Result<_, _>>()?,
        };
        let refresh_concurrency = count("REFRESH_CONCURRENCY", 16, 1..=10_000)? as usize;
        // Read and checked where the routes are loaded (`crate::routes::Routes::load`, by the
        // daemon before it starts): the routes module builds on this one.
        let routes_file = var("ROUTES_FILE")
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
            .map(std::path::PathBuf::from);
        let jobs = JobsConfig::from_lookup(var)?;
        Ok(Config {
            routes_file,
            allowed_hosts,
            refresh_concurrency,
            limits,
            backends,
            pool,
            ops_listen_addr,
            stale_retention,
            stale_if_error,
            client_cache_control,
            listen_addr,
            default_ttl,
            refresh_window,
            upstream_timeout,
            admin_key,
            log_format,
            shutdown_grace,
            trusted_proxies,
            max_object_bytes,
            max_bytes,
            stream_buffer,
            stream_buffer_total,
            redis,
            jobs,
        })
    }
}

impl Config {
    /// The effective value of every setting [`Config::from_lookup`] reads, as `(name, value)`
    /// in the order of [`SETTINGS`], written so that reading them back gives this
    /// configuration again. `CLEAR_CACHE_KEY` is `<redacted>` when set. (`RUST_LOG` is not
    /// part of a `Config`; the caller adds it.)
    pub fn effective(&self) -> Vec<(&'static str, String)> {
        let secs = |d: Duration| d.as_secs_f64().to_string();
        let bytes = |n: usize| show_bytes(n as u64);
        // `h2c://` for cleartext HTTP/2; `https://… h2` needs the option (UPSTREAM_URLS only).
        let url = |b: &BackendConfig| {
            let scheme = match (b.url.tls, b.http2) {
                (false, true) => "h2c",
                _ => b.url.scheme(),
            };
            format!("{scheme}://{}{}", b.url.authority, b.url.path_prefix)
        };
        let h2_option = |b: &BackendConfig| if b.url.tls && b.http2 { " h2" } else { "" };
        let (upstream_url, upstream_urls) = match self.backends.as_slice() {
            [one] if one.weight == 1 && h2_option(one).is_empty() => (url(one), String::new()),
            list => (
                String::new(),
                list.iter()
                    .map(|b| format!("{}{} weight={}", url(b), h2_option(b), b.weight))
                    .collect::<Vec<_>>()
                    .join(", "),
            ),
        };
        let join = |items: Vec<String>, empty: &str| {
            if items.is_empty() {
                empty.to_owned()
            } else {
                items.join(",")
            }
        };
        let pool = &self.pool;
        let limits = &self.limits;
        let mut out = vec![
            ("UPSTREAM_URL", upstream_url),
            (
                "DEFAULT_CACHE_EXPIRY_TIME_SECS",
                secs(self.default_ttl.unwrap_or_default()),
            ),
            ("DEFAULT_REFRESH_WINDOW_SECS", secs(self.refresh_window)),
            ("REQ_TIMEOUT", secs(self.upstream_timeout)),
            (
                "CLEAR_CACHE_KEY",
                self.admin_key
                    .as_ref()
                    .map_or_else(String::new, |_| "<redacted>".into()),
            ),
            ("LISTEN_ADDR", self.listen_addr.to_string()),
            (
                "LOG_FORMAT",
                match self.log_format {
                    LogFormat::Text => "text".into(),
                    LogFormat::Json => "json".into(),
                },
            ),
            ("SHUTDOWN_GRACE_SECS", secs(self.shutdown_grace)),
            (
                "TRUSTED_PROXIES",
                join(
                    self.trusted_proxies
                        .iter()
                        .map(ToString::to_string)
                        .collect(),
                    "none",
                ),
            ),
            ("ALLOWED_HOSTS", join(self.allowed_hosts.clone(), "")),
            ("REFRESH_CONCURRENCY", self.refresh_concurrency.to_string()),
            ("CACHE_MAX_OBJECT_BYTES", bytes(self.max_object_bytes)),
            ("STREAM_BUFFER_BYTES", bytes(self.stream_buffer)),
            ("STREAM_BUFFER_TOTAL_BYTES", bytes(self.stream_buffer_total)),
            ("STALE_RETENTION_SECS", secs(self.stale_retention)),
            ("STALE_IF_ERROR_SECS", secs(self.stale_if_error)),
            (
                "CLIENT_CACHE_CONTROL",
                match self.client_cache_control {
                    ClientCacheControl::Safe => "safe".into(),
                    ClientCacheControl::Full => "full".into(),
                },
            ),
            ("UPSTREAM_URLS", upstream_urls),
            (
                "UPSTREAM_CA_FILE",
                pool.ca_file
                    .as_ref()
                    .map_or_else(String::new, |ca| ca.path.clone()),
            ),
            (
                "OPS_LISTEN_ADDR",
                self.ops_listen_addr
                    .map_or_else(|| "off".into(), |a| a.to_string()),
            ),
            ("CONNECT_TIMEOUT_SECS", secs(pool.connect_timeout)),
            ("HEALTH_CHECK_PATH", pool.health_path.clone()),
            ("HEALTH_CHECK_INTERVAL_SECS", secs(pool.health_interval)),
            ("HEALTH_CHECK_TIMEOUT_SECS", secs(pool.health_timeout)),
            (
                "HEALTH_CHECK_FAILURE_THRESHOLD",
                pool.failure_threshold.to_string(),
            ),
            (
                "HEALTH_CHECK_RECOVERY_THRESHOLD",
                pool.recovery_threshold.to_string(),
            ),
            ("HEALTH_PANIC_THRESHOLD", pool.panic_threshold.to_string()),
            (
                "BREAKER_FAILURE_THRESHOLD",
                pool.breaker_threshold.to_string(),
            ),
            ("BREAKER_COOLDOWN_SECS", secs(pool.breaker_cooldown)),
            (
                "UPSTREAM_MAX_IDLE_PER_HOST",
                pool.max_idle_per_host.to_string(),
            ),
            ("UPSTREAM_IDLE_TIMEOUT_SECS", secs(pool.idle_timeout)),
            ("UPSTREAM_RETRIES", pool.retries.to_string()),
            ("CACHE_MAX_BYTES", bytes(self.max_bytes)),
            ("HEADER_READ_TIMEOUT_SECS", secs(limits.header_read_timeout)),
            ("KEEPALIVE_TIMEOUT_SECS", secs(limits.keepalive_timeout)),
            ("MAX_HEADER_BYTES", bytes(limits.max_header_bytes)),
            ("MAX_CONNECTIONS", limits.max_connections.to_string()),
            (
                "MAX_REQUEST_BODY_BYTES",
                show_bytes(limits.max_request_body.unwrap_or(0)),
            ),
            (
                "REDIS_URL",
                match &self.redis {
                    None => String::new(),
                    Some(r) => redact_redis_password(&r.url),
                },
            ),
            (
                "REDIS_CA_FILE",
                self.redis
                    .as_ref()
                    .and_then(|r| r.ca.as_ref())
                    .map_or(String::new(), |(path, _)| path.clone()),
            ),
            (
                "REDIS_CLIENT_CERT_FILE",
                self.redis
                    .as_ref()
                    .and_then(|r| r.client.as_ref())
                    .map_or(String::new(), |c| c.cert_path.clone()),
            ),
            (
                "REDIS_CLIENT_KEY_FILE",
                self.redis
                    .as_ref()
                    .and_then(|r| r.client.as_ref())
                    .map_or(String::new(), |c| c.key_path.clone()),
            ),
            (
                "REDIS_TIMEOUT_MS",
                self.redis
                    .as_ref()
                    .map_or(50, |r| r.timeout.as_millis() as u64)
                    .to_string(),
            ),
            (
                "REDIS_MAX_OBJECT_BYTES",
                bytes(self.redis.as_ref().map_or(1 << 20, |r| r.max_object_bytes)),
            ),
            (
                "ROUTES_FILE",
                self.routes_file
                    .as_ref()
                    .map_or(String::new(), |p| p.display().to_string()),
            ),
        ];
        out.extend(self.jobs.effective());
        // In the order of SETTINGS (a name missing there would sort first; a test checks).
        out.sort_by_key(|(name, _)| SETTINGS.iter().position(|s| s.name == *name));
        out
    }
}

// --- Async jobs and signed callbacks (src/jobs/): JOBS_MAX, JOBS_MAX_AGE_SECS,
// CALLBACK_ALLOWED_HOSTS, CALLBACK_SECRET. ---

/// Async jobs and their callbacks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobsConfig {
    /// Jobs held at once at most, pending or finished (`JOBS_MAX`).
    pub max_jobs: usize,
    /// A pending job fails as expired this long after it started; a finished one is
    /// forgotten this long after it finished (`JOBS_MAX_AGE_SECS`).
    pub max_age: Duration,
    /// The only `host:port` pairs a callback URL may name (`CALLBACK_ALLOWED_HOSTS`);
    /// empty: every callback is refused.
    pub callback_hosts: Vec<CallbackHost>,
    /// Signs every callback (`CALLBACK_SECRET`); set whenever `callback_hosts` is not empty.
    pub callback_secret: Option<CallbackSecret>,
}

/// One `CALLBACK_ALLOWED_HOSTS` entry: a lower-case host name, or an IP address (IPv6 in
/// brackets, in its canonical text form), and a port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallbackHost {
    pub host: String,
    pub port: u16,
}

impl CallbackHost {
    /// Parses `host:port`, `1.2.3.4:port` or `[v6]:port`; the port is required. The host is
    /// normalised by [`CallbackHost::normalise_host`], as a callback URL's host is
    /// ([`crate::jobs::callback`]), so both sides compare alike.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("`{s}` has no port (write host:port)"))?;
        let port = match port.parse::<u16>() {
            Ok(p) if p > 0 && !port.starts_with('+') => p,
            _ => return Err(format!("`{s}` has no valid port (1-65535)")),
        };
        Ok(CallbackHost {
            host: Self::normalise_host(host).ok_or_else(|| format!("`{s}` is not a host:port"))?,
            port,
        })
    }

    /// `host` lower-cased, or an IP address in canonical form (IPv6 in brackets); `None`
    /// when it is neither a host name (letters, digits, `-`, `.`, `_`) nor an IP address.
    pub fn normalise_host(host: &str) -> Option<String> {
        if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            return v6
                .parse::<std::net::Ipv6Addr>()
                .ok()
                .map(|ip| format!("[{ip}]"));
        }
        if let Ok(ip) = host.parse::<std::net::Ipv4Addr>() {
            return Some(ip.to_string());
        }
        let name_char = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_');
        (!host.is_empty() && host.bytes().all(name_char)).then(|| host.to_ascii_lowercase())
    }
}

impl fmt::Display for CallbackHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.host, self.port)
    }
}

/// The callback signing key. Its `Debug` never prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct CallbackSecret(Vec<u8>);

impl CallbackSecret {
    /// Shortest `CALLBACK_SECRET` accepted, in bytes.
    pub const MIN_LEN: usize = 16;

    pub fn new(secret: impl Into<Vec<u8>>) -> Self {
        CallbackSecret(secret.into())
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for CallbackSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CallbackSecret(<redacted>)")
    }
}

impl JobsConfig {
    /// Reads the four settings through [`Config::from_lookup`]'s `var` (trimmed, empty =
    /// unset).
    fn from_lookup(var: impl Fn(&'static str) -> Option<String>) -> Result<Self, ConfigError> {
        let bad = |variable: &'static str, problem: String| ConfigError { variable, problem };
        let max_jobs = match var("JOBS_MAX") {
            None => 10_000,
            Some(v) => match v.parse::<usize>() {
                Ok(n) if (1..=1_000_000).contains(&n) => n,
                _ => {
                    return Err(bad(
                        "JOBS_MAX",
                        format!("`{v}` is not a whole number from 1 to 1000000"),
                    ))
                }
            },
        };
        let max_age = match var("JOBS_MAX_AGE_SECS") {
            None => Duration::from_secs(3600),
            Some(v) => parse_seconds(&v, &(1.0..=DAY)).map_err(|p| bad("JOBS_MAX_AGE_SECS", p))?,
        };
        let callback_hosts: Vec<CallbackHost> = match var("CALLBACK_ALLOWED_HOSTS") {
            None => Vec::new(),
            Some(v) => v
                .split(',')
                .map(str::trim)
                .filter(|h| !h.is_empty())
                .map(|h| {
                    CallbackHost::parse(h).map_err(|p| {
                        bad(
                            "CALLBACK_ALLOWED_HOSTS",
                            format!("{p}; list host:port entries, e.g. hooks.example.com:443,10.0.0.7:8080"),
                        )
                    })
                })
                .collect::<Result<_, _>>()?,
        };
        let callback_secret = var("CALLBACK_SECRET").map(CallbackSecret::new);
        match &callback_secret {
            None if !callback_hosts.is_empty() => {
                return Err(bad(
                    "CALLBACK_SECRET",
                    "is not set, but CALLBACK_ALLOWED_HOSTS is: callbacks must be signed \
                     (e.g. CALLBACK_SECRET=$(openssl rand -hex 32))"
                        .into(),
                ))
            }
            // The value is never echoed.
            Some(s) if s.as_bytes().len() < CallbackSecret::MIN_LEN => {
                return Err(bad(
                    "CALLBACK_SECRET",
                    format!(
                        "is shorter than {} characters (e.g. openssl rand -hex 32)",
                        CallbackSecret::MIN_LEN
                    ),
                ))
            }
            _ => {}
        }
        Ok(JobsConfig {
            max_jobs,
            max_age,
            callback_hosts,
            callback_secret,
        })
    }

    /// The four settings as [`Config::effective`] shows them; the secret as `<redacted>`.
    fn effective(&self) -> Vec<(&'static str, String)> {
        vec![
            (
                "CALLBACK_ALLOWED_HOSTS",
                self.callback_hosts
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            ),
            (
                "CALLBACK_SECRET",
                self.callback_secret
                    .as_ref()
                    .map_or_else(String::new, |_| "<redacted>".into()),
            ),
            ("JOBS_MAX", self.max_jobs.to_string()),
            ("JOBS_MAX_AGE_SECS", self.max_age.as_secs_f64().to_string()),
        ]
    }
}

// --- End of the async jobs settings. ---

/// `REDIS_URL` must be `redis://host[:port][/db]` or, for TLS, `rediss://…` (with optional
/// `user:password@`), or a Cluster's `redis+cluster://` / `rediss+cluster://` seed list
/// ([`redis_cluster_nodes`]). redis-rs's `#insecure` (no certificate checks) is refused: certificates
/// and host names are always checked.
fn check_redis_url(url: &str) -> Result<(), String> {
    if let Some(nodes) = redis_cluster_nodes(url) {
        let rest = url.split_once("://").map_or("", |(_, r)| r);
        if rest.contains('#') {
            return Err("has a `#` fragment: `#insecure` (no certificate checks) is not supported, and nothing else is".into());
        }
        if let Some((_, db)) = rest.split_once('/') {
            if !db.is_empty() && db != "0" {
                return Err(format!(
                    "database `{db}`: a Redis Cluster has only database 0"
                ));
            }
        }
        if nodes.is_empty() {
            return Err("has no host: expected redis+cluster://host:port[,host:port…]".into());
        }
        for node in &nodes {
            let host = node.split_once("://").map_or("", |(_, r)| r);
            let host = host.rsplit('@').next().unwrap_or("");
            if host.is_empty() || host.starts_with(':') || host.contains(char::is_whitespace) {
                return Err(format!(
                    "has an empty or invalid node `{}`: expected redis+cluster://host:port[,host:port…]",
                    redact_redis_password(node)
                ));
            }
            redis::Client::open(node.as_str()).map_err(|e| {
                format!("node `{}` is not usable: {e}", redact_redis_password(node))
            })?;
        }
        return Ok(());
    }
    let Some(rest) = url
        .strip_prefix("redis://")
        .or_else(|| url.strip_prefix("rediss://"))
    else {
        return Err("must start with redis:// (or rediss:// for TLS, redis+cluster:// or rediss+cluster:// for a Redis Cluster), e.g. redis://127.0.0.1:6379".into());
    };
    if rest.contains('#') {
        return Err("has a `#` fragment: `#insecure` (no certificate checks) is not supported, and nothing else is".into());
    }
    let authority = rest.split('/').next().unwrap_or("");
    let host = authority.rsplit('@').next().unwrap_or("");
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err("has no host: expected redis://host[:port][/db]".into());
    }
    if let Some(db) = rest
        .split_once('/')
        .map(|(_, db)| db)
        .filter(|d| !d.is_empty())
    {
        if db.parse::<u16>().is_err() {
            return Err(format!("database `{db}` is not a number"));
        }
    }
    // The client library's own parser, so nothing it would refuse gets past start-up.
    redis::Client::open(url)
        .map(drop)
        .map_err(|e| format!("is not a usable Redis URL: {e}"))
}

/// Whether `url` asks for TLS.
pub fn redis_tls(url: &str) -> bool {
    url.starts_with("rediss://") || url.starts_with("rediss+cluster://")
}

/// For a Redis Cluster URL — `redis+cluster://[user:password@]host:port[,host:port…][/0]`,
/// `rediss+cluster://…` with TLS — one `redis://` (`rediss://`) URL per seed node, each with
/// the credentials; `None` for any other URL. The seeds are where the client starts: it
/// learns the other nodes and the slots from them (`CLUSTER SLOTS`).
pub fn redis_cluster_nodes(url: &str) -> Option<Vec<String>> {
    let (scheme, rest) = if let Some(rest) = url.strip_prefix("redis+cluster://") {
        ("redis", rest)
    } else {
        ("rediss", url.strip_prefix("rediss+cluster://")?)
    };
    let authority = rest.split(['/', '#']).next().unwrap_or("");
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((u, h)) => (format!("{u}@"), h),
        None => (String::new(), authority),
    };
    Some(
        hosts
            .split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(|h| format!("{scheme}://{userinfo}{h}"))
            .collect(),
    )
}

/// Reads `REDIS_CA_FILE` for `url`: only with TLS, a readable file, at least one PEM
/// certificate that rustls accepts as a trust anchor.
fn read_redis_ca(url: &str, path: &str) -> Result<Vec<u8>, String> {
    if !redis_tls(url) {
        return Err("is only used with TLS: REDIS_URL must start with rediss://".into());
    }
    let pem = read_pem(
        path,
        b"-----BEGIN CERTIFICATE-----",
        "certificate (-----BEGIN CERTIFICATE-----)",
    )?;
    let certs = redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(pem.clone()),
    };
    redis_tls_client(url, certs).map_err(|e| format!("`{path}` is not a usable CA file: {e}"))?;
    Ok(pem)
}

/// The file at `path`, which must hold `marker` (a PEM boundary line) somewhere: it errs
/// saying the file cannot be read, or holds no PEM `what`.
fn read_pem(path: &str, marker: &[u8], what: &str) -> Result<Vec<u8>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("`{path}` cannot be read: {e}"))?;
    if pem.windows(marker.len()).any(|w| w == marker) {
        Ok(pem)
    } else {
        Err(format!("`{path}` holds no PEM {what}"))
    }
}

/// Whether redis-rs builds a TLS client for `url` with `certs` (parsing them as rustls
/// does). A cluster's seeds share the scheme: the first stands for all.
fn redis_tls_client(url: &str, certs: redis::TlsCertificates) -> Result<(), redis::RedisError> {
    let probe = redis_cluster_nodes(url)
        .and_then(|nodes| nodes.into_iter().next())
        .unwrap_or_else(|| url.to_string());
    redis::Client::build_with_tls(probe.as_str(), certs).map(drop)
}

/// Reads `REDIS_CLIENT_CERT_FILE` and `REDIS_CLIENT_KEY_FILE` for `url`: both or neither,
/// only with TLS, readable PEM files that redis-rs (rustls) accepts as a certificate and
/// its key. Errors name the variable; none quotes the key.
fn read_redis_client(
    url: &str,
    cert: Option<String>,
    key: Option<String>,
) -> Result<Option<RedisClientCert>, ConfigError> {
    let bad = |variable: &'static str, problem: String| ConfigError { variable, problem };
    let (cert_path, key_path) = match (cert, key) {
        (None, None) => return Ok(None),
        (Some(_), None) => {
            return Err(bad(
                "REDIS_CLIENT_KEY_FILE",
                "must be set with REDIS_CLIENT_CERT_FILE (the certificate's private key)".into(),
            ))
        }
        (None, Some(_)) => {
            return Err(bad(
                "REDIS_CLIENT_CERT_FILE",
                "must be set with REDIS_CLIENT_KEY_FILE (the key's certificate)".into(),
            ))
        }
        (Some(c), Some(k)) => (c.trim().to_string(), k.trim().to_string()),
    };
    if !redis_tls(url) {
        return Err(bad(
            "REDIS_CLIENT_CERT_FILE",
            "is only used with TLS: REDIS_URL must start with rediss://".into(),
        ));
    }
    let cert_pem = read_pem(
        &cert_path,
        b"-----BEGIN CERTIFICATE-----",
        "certificate (-----BEGIN CERTIFICATE-----)",
    )
    .map_err(|p| bad("REDIS_CLIENT_CERT_FILE", p))?;
    let key_pem = read_pem(
        &key_path,
        b"PRIVATE KEY-----",
        "private key (-----BEGIN … PRIVATE KEY-----)",
    )
    .map_err(|p| bad("REDIS_CLIENT_KEY_FILE", p))?;
    let certs = redis::TlsCertificates {
        client_tls: Some(redis::ClientTlsConfig {
            client_cert: cert_pem.clone(),
            client_key: key_pem.clone(),
        }),
        root_cert: None,
    };
    if redis_tls_client(url, certs).is_err() {
        // redis-rs's message may quote the file; the key's must not reach a log.
        return Err(bad(
            "REDIS_CLIENT_KEY_FILE",
            format!("`{cert_path}` and `{key_path}` are not a usable certificate and key"),
        ));
    }
    Ok(Some(RedisClientCert {
        cert_path,
        cert_pem,
        key_path,
        key_pem,
    }))
}

/// `url` with any password replaced by `<redacted>` (for `--check`), whatever the scheme
/// (`redis://`, `rediss://`, …).
pub fn redact_redis_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, path) = rest
        .split_once('/')
        .map_or((rest, None), |(a, p)| (a, Some(p)));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) if userinfo.contains(':') => {
            let user = userinfo.split(':').next().unwrap_or("");
            let path = path.map_or(String::new(), |p| format!("/{p}"));
            format!("{scheme}://{user}:<redacted>@{host}{path}")
        }
        _ => url.to_string(),
    }
}

/// Parses `UPSTREAM_URLS`: comma-separated base URLs, each optionally followed by
/// `weight=N` and `h2`, as in nginx's `upstream` block:
/// `http://10.0.0.1:8080 weight=3, https://10.0.0.2:8443 h2`. The error is the problem
/// without the variable's name, so that another setting can take the same syntax.
pub(crate) fn parse_backends(list: &str) -> Result<Vec<BackendConfig>, String> {
    let mut backends = Vec::new();
    for raw_entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let entry = redact_userinfo(raw_entry);
        let mut words = raw_entry.split_whitespace();
        let url = words.next().unwrap_or_default();
        let (url, mut http2) = parse_upstream(url)?;
        let mut weight = 1;
        for option in words {
            match option.split_once('=') {
                Some(("weight", n)) => match n.parse::<u32>() {
                    Ok(n) if (1..=1000).contains(&n) => weight = n,
                    _ => return Err(format!("`{entry}`: weight must be 1 to 1000")),
                },
                None if option == "h2" => http2 = true,
                _ => {
                    return Err(format!(
                        "`{entry}`: unknown option `{}` (use weight=N or h2)",
                        redact_userinfo(option)
                    ))
                }
            }
        }
        backends.push(BackendConfig { url, weight, http2 });
    }
    if backends.is_empty() {
        return Err("lists no backend".into());
    }
    Ok(backends)
}

/// Parses one base URL; `h2c://` means HTTP/2 with prior knowledge, `https://` TLS.
/// Credentials (`user:password@`) are refused, and error messages show the URL without
/// them: the authority is printed at startup, in `/status` and in metric labels, and sent
/// as `Host`.
fn parse_upstream(raw: &str) -> Result<(UpstreamUrl, bool), String> {
    let v = redact_userinfo(raw);
    let uri: Uri = raw.parse().map_err(|_| format!("`{v}` is not a URL"))?;
    let (tls, http2) = match uri.scheme_str() {
        Some("http") => (false, false),
        Some("h2c") => (false, true),
        Some("https") => (true, false),
        _ => return Err(format!("`{v}` must start with http:// or https://")),
    };
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| format!("`{v}` has no host"))?;
    if authority.as_str().contains('@') {
        return Err(format!(
            "`{v}` contains credentials (user:password@), which are not supported"
        ));
    }
    if uri.query().is_some() {
        return Err(format!("`{v}` must not have a query string"));
    }
    let path_prefix = uri.path().trim_end_matches('/').to_owned();
    Ok((
        UpstreamUrl {
            tls,
            authority,
            path_prefix,
        },
        http2,
    ))
}

/// `v` with everything between the scheme and the last `@` replaced, so that an error message
/// never shows a password, even one in a string that is not a valid URL.
fn redact_userinfo(v: &str) -> String {
    match v.rfind('@') {
        Some(at) => {
            let start = v.find("://").map(|i| i + 3).filter(|&s| s <= at);
            let start = start.unwrap_or(0);
            format!("{}<redacted>{}", &v[..start], &v[at..])
        }
        None => v.to_owned(),
    }
}

/// The smallest timeout, in seconds: the connection timers count whole milliseconds.
const MILLISECOND: f64 = 0.001;
/// The longest timeout, grace period or interval, in seconds.
const DAY: f64 = 86_400.0;
/// The longest cache lifetime setting (TTL, refresh window, stale allowances), in seconds.
const YEAR: f64 = 365.0 * DAY;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const TIB: u64 = 1 << 40;

/// Parses seconds, decimals allowed (`2`, `0.5`), within `range`. `NaN`, `inf` and negative
/// numbers are outside every range.
fn parse_seconds(v: &str, range: &RangeInclusive<f64>) -> Result<Duration, String> {
    let allowed = format!("{} to {} seconds", range.start(), range.end());
    let secs: f64 = v
        .parse()
        .map_err(|_| format!("`{v}` is not a number of seconds ({allowed})"))?;
    if !range.contains(&secs) {
        return Err(format!("`{v}` is out of range ({allowed})"));
    }
    Duration::try_from_secs_f64(secs).map_err(|_| format!("`{v}` is out of range ({allowed})"))
}

/// [`parse_bytes`] within `range`.
fn parse_bytes_in(v: &str, range: &RangeInclusive<u64>) -> Result<usize, String> {
    let allowed = format!(
        "{} to {}",
        show_bytes(*range.start()),
        show_bytes(*range.end())
    );
    match parse_bytes(v) {
        Ok(n) if range.contains(&(n as u64)) => Ok(n),
        Ok(_) => Err(format!("`{v}` is out of range ({allowed})")),
        Err(p) => Err(format!("{p} ({allowed})")),
    }
}

/// `n` bytes in the largest unit that divides it exactly (`8KiB`, `1TiB`, `1000`).
fn show_bytes(n: u64) -> String {
    for (unit, size) in [("TiB", TIB), ("GiB", 1 << 30), ("MiB", MIB), ("KiB", KIB)] {
        if n >= size && n.is_multiple_of(size) {
            return format!("{}{unit}", n / size);
        }
    }
    n.to_string()
}

/// Parses a byte size: `1048576`, `512KiB`, `8MiB`, `2GiB`, `1TiB` (also `KB`/`MB`/`GB`/`TB`,
/// `k`/`m`/`g`/`t`: all powers of 1024).
pub fn parse_bytes(v: &str) -> Result<usize, String> {
    let v = v.trim();
    let split = v.find(|c: char| !c.is_ascii_digit()).unwrap_or(v.len());
    let (digits, unit) = v.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{v}` is not a byte size like 8MiB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        _ => {
            return Err(format!(
                "`{v}` has an unknown unit (use B, KiB, MiB, GiB or TiB)"
            ))
        }
    };
    n.checked_mul(mult)
        .and_then(|b| usize::try_from(b).ok())
        .ok_or_else(|| format!("`{v}` is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn predecessor_env_file_is_accepted() {
        let c = cfg(&[
            ("DEFAULT_CACHE_EXPIRY_TIME_SECS", "2"),
            ("DEFAULT_REFRESH_WINDOW_SECS", "60"),
            ("REQ_TIMEOUT", "2"),
            ("UPSTREAM_URL", "http://host.docker.internal:3006"),
            ("CLEAR_CACHE_KEY", "Secret"),
        ])
        .unwrap();
        assert_eq!(c.default_ttl, Some(Duration::from_secs(2)));
        assert_eq!(c.refresh_window, Duration::from_secs(60));
        assert_eq!(c.upstream_timeout, Duration::from_secs(2));
        assert_eq!(c.backends.len(), 1);
        assert_eq!(
            c.backends[0].url.authority.as_str(),
            "host.docker.internal:3006"
        );
        assert!(c.admin_key.is_some());
        assert!(!format!("{c:?}").contains("Secret"));
    }

    /// Every setting in `.env.example` is valid as shipped (with an upstream filled in),
    /// and the memory and connection limits are listed there.
    #[test]
    fn env_example_is_a_valid_config() {
        let text = include_str!("../.env.example");
        let mut vars: std::collections::HashMap<String, String> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        vars.insert("UPSTREAM_URL".into(), "http://127.0.0.1:1".into());
        let c = Config::from_lookup(|k| vars.get(k).cloned().filter(|v| !v.is_empty()));
        assert!(c.is_ok(), "{:?}", c.err());
        for name in [
            "CACHE_MAX_BYTES",
            "KEEPALIVE_TIMEOUT_SECS",
            "MAX_CONNECTIONS",
        ] {
            assert!(vars.contains_key(name), "{name} missing from .env.example");
        }
    }

    #[test]
    fn missing_upstream_names_the_variable() {
        assert_eq!(cfg(&[]).unwrap_err().variable, "UPSTREAM_URL");
    }

    #[test]
    fn bad_values_name_their_variable() {
        let up = ("UPSTREAM_URL", "http://127.0.0.1:1");
        for (k, v) in [
            ("REQ_TIMEOUT", "abc"),
            ("REQ_TIMEOUT", "0"),
            ("DEFAULT_CACHE_EXPIRY_TIME_SECS", "-1"),
            ("DEFAULT_REFRESH_WINDOW_SECS", "NaN"),
            ("LISTEN_ADDR", "localhost"),
            ("LOG_FORMAT", "yaml"),
            ("TRUSTED_PROXIES", "10.0.0.0/33"),
            ("CACHE_MAX_OBJECT_BYTES", "8 parsecs"),
            ("STALE_RETENTION_SECS", "soon"),
            ("STALE_IF_ERROR_SECS", "-3"),
            ("CACHE_MAX_BYTES", "lots"),
            ("CACHE_MAX_BYTES", "0"),
            ("MAX_HEADER_BYTES", "1KiB"),
            ("MAX_CONNECTIONS", "-1"),
            ("HEADER_READ_TIMEOUT_SECS", "0"),
            ("CLIENT_CACHE_CONTROL", "all"),
            ("UPSTREAM_URLS", "http://a:1 weight=0"),
            ("UPSTREAM_URLS", "http://a:1 heavy"),
            ("UPSTREAM_URLS", " , "),
            ("HEALTH_CHECK_FAILURE_THRESHOLD", "0"),
            ("CONNECT_TIMEOUT_SECS", "0"),
            ("ADMIN_LISTEN_ADDR", "nine-thousand"),
            ("OPS_LISTEN_ADDR", "nine-thousand"),
            ("UPSTREAM_RETRIES", "-1"),
            ("UPSTREAM_RETRIES", "11"),
            ("HEALTH_PANIC_THRESHOLD", "101"),
            ("HEALTH_PANIC_THRESHOLD", "half"),
        ] {
            assert_eq!(cfg(&[up, (k, v)]).unwrap_err().variable, k, "{k}={v}");
        }
        assert_eq!(
            cfg(&[("UPSTREAM_URL", "ftp://x")]).unwrap_err().variable,
            "UPSTREAM_URL"
        );
        for (k, v) in [
            ("UPSTREAM_CA_FILE", "/nonexistent/ca.pem"),
            ("UPSTREAM_URLS", "https://a:1 h3"),
        ] {
            assert_eq!(cfg(&[up, (k, v)]).unwrap_err().variable, k, "{k}={v}");
        }
    }

    /// `https://` backends, alone or mixed with cleartext ones; `h2` on one means "offer only
    /// h2", and `--check` writes it back in a form that reads back the same.
    #[test]
    fn https_backends() {
        let c = cfg(&[("UPSTREAM_URL", "https://api.example.com/v1/")]).unwrap();
        let b = &c.backends[0];
        assert!(b.url.tls && !b.http2);
        assert_eq!(b.url.authority.as_str(), "api.example.com");
        assert_eq!(
            b.url.uri_for("/x?a=1").unwrap().to_string(),
            "https://api.example.com/v1/x?a=1"
        );
        let c = cfg(&[(
            "UPSTREAM_URLS",
            "https://a:8443 weight=2 h2, http://b:80, h2c://c:81, https://d",
        )])
        .unwrap();
        let got: Vec<_> = c
            .backends
            .iter()
            .map(|b| (b.url.scheme(), b.url.authority.as_str(), b.weight, b.http2))
            .collect();
        assert_eq!(
            got,
            [
                ("https", "a:8443", 2, true),
                ("http", "b:80", 1, false),
                ("http", "c:81", 1, true),
                ("https", "d", 1, false)
            ]
        );
        let shown = c.effective();
        let urls = &shown.iter().find(|(k, _)| *k == "UPSTREAM_URLS").unwrap().1;
        assert_eq!(
            urls,
            "https://a:8443 h2 weight=2, http://b:80 weight=1, h2c://c:81 weight=1, https://d weight=1"
        );
        // A lone h2-only https backend needs the option, so it is shown as UPSTREAM_URLS.
        let c = cfg(&[("UPSTREAM_URLS", "https://a:1 h2")]).unwrap();
        let shown: std::collections::HashMap<_, _> = c.effective().into_iter().collect();
        assert_eq!(
            (
                shown["UPSTREAM_URL"].as_str(),
                shown["UPSTREAM_URLS"].as_str()
            ),
            ("", "https://a:1 h2 weight=1")
        );
    }

    /// `UPSTREAM_CA_FILE`: every certificate of a PEM file is read (a key beside them is
    /// skipped); a missing file, a file without certificates and a certificate that is not
    /// DER are refused, naming the variable, in one line.
    #[test]
    fn ca_file_is_read_and_checked_at_start() {
        let dir = std::env::temp_dir().join(format!("edgecache-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let write = |name: &str, text: &str| {
            let path = dir.join(name);
            std::fs::write(&path, text).unwrap();
            path.to_string_lossy().into_owned()
        };
        // A self-signed CA (the one in rustls' own test data would do as well; any X.509
        // certificate is a usable trust anchor).
        let ca = rcgen::CertificateParams::new(Vec::<String>::new())
            .unwrap()
            .self_signed(&rcgen::KeyPair::generate().unwrap())
            .unwrap()
            .pem();
        let two = write(
            "two.pem",
            &format!("{ca}\n-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n{ca}"),
        );
        let up = ("UPSTREAM_URL", "https://127.0.0.1:1");
        let c = cfg(&[up, ("UPSTREAM_CA_FILE", &two)]).unwrap();
        assert_eq!(c.pool.ca_file.as_ref().unwrap().certs.len(), 2);
        assert!(format!("{c:?}").contains("certificates: 2"));
        // `--check` names the file; read back, it gives the same configuration.
        let shown = c.effective();
        let back: Vec<(&str, &str)> = shown.iter().map(|(k, v)| (*k, v.as_str())).collect();
        assert_eq!(format!("{:?}", cfg(&back).unwrap()), format!("{c:?}"));
        let missing = dir.join("missing.pem").to_string_lossy().into_owned();
        let empty = write("empty.pem", "# nothing here\n");
        let garbage = write(
            "garbage.pem",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        );
        for (path, says) in [
            (&missing, "cannot read"),
            (&empty, "holds no certificate"),
            (&garbage, "certificate 1 is not usable"),
        ] {
            let err = cfg(&[up, ("UPSTREAM_CA_FILE", path)]).unwrap_err();
            assert_eq!(err.variable, "UPSTREAM_CA_FILE", "{err}");
            assert!(err.problem.contains(says), "{err}");
            assert_eq!(err.to_string().lines().count(), 1, "{err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Every duration setting with its range (seconds): the README documents the same.
    const DURATIONS: [(&str, f64, f64); 13] = [
        ("DEFAULT_CACHE_EXPIRY_TIME_SECS", 0.0, YEAR),
        ("DEFAULT_REFRESH_WINDOW_SECS", 0.0, YEAR),
        ("REQ_TIMEOUT", 0.001, DAY),
        ("SHUTDOWN_GRACE_SECS", 0.0, DAY),
        ("HEALTH_CHECK_INTERVAL_SECS", 0.0, DAY),
        ("HEALTH_CHECK_TIMEOUT_SECS", 0.001, DAY),
        ("BREAKER_COOLDOWN_SECS", 0.0, DAY),
        ("CONNECT_TIMEOUT_SECS", 0.001, DAY),
        ("UPSTREAM_IDLE_TIMEOUT_SECS", 0.0, DAY),
        ("HEADER_READ_TIMEOUT_SECS", 0.001, DAY),
        ("KEEPALIVE_TIMEOUT_SECS", 0.001, DAY),
        ("STALE_RETENTION_SECS", 0.0, YEAR),
        ("STALE_IF_ERROR_SECS", 0.0, YEAR),
    ];

    /// Both ends of every duration's range are accepted; just outside them, absurd values,
    /// non-finite and negative numbers are refused with an error naming the variable.
    #[test]
    fn every_duration_has_a_range() {
        let up = ("UPSTREAM_URL", "http://127.0.0.1:1");
        for (name, min, max) in DURATIONS {
            for ok in [min, max] {
                let v = ok.to_string();
                assert!(
                    cfg(&[up, (name, &v)]).is_ok(),
                    "{name}={v} should be accepted"
                );
            }
            let below = if min > 0.0 {
                "0".to_owned()
            } else {
                "-0.001".to_owned()
            };
            let above = (max + 1.0).to_string();
            for v in [
                below.as_str(),
                above.as_str(),
                "1e19",
                "1e300",
                "18446744073709551616",
                "inf",
                "-inf",
                "NaN",
                "-1",
                "10s",
            ] {
                let err = cfg(&[up, (name, v)]).unwrap_err();
                assert_eq!(err.variable, name, "{name}={v}: {err}");
                assert!(err.problem.contains(&max.to_string()), "{name}={v}: {err}");
            }
        }
    }

    /// The README's settings table states each duration's range as the code does.
    #[test]
    fn readme_documents_every_duration_range() {
        let readme = include_str!("../README.md");
        for (name, min, max) in DURATIONS {
            let row = readme
                .lines()
                .find(|l| l.starts_with(&format!("| `{name}` |")))
                .unwrap_or_else(|| panic!("{name} is not in the README's settings table"));
            let range = format!("Range `{min}`–`{max}`");
            assert!(row.contains(&range), "{name}: README should say {range}");
        }
    }

    /// `--help` states each duration's range as the code does.
    #[test]
    fn help_states_every_duration_range() {
        for (name, min, max) in DURATIONS {
            let setting = SETTINGS.iter().find(|s| s.name == name);
            let help = setting.map_or("", |s| s.help);
            let range = format!("({min}-{max})");
            assert!(
                help.contains(&range),
                "{name}: --help should say {range}: {help}"
            );
        }
    }

    /// Counts and byte sizes have ranges too.
    #[test]
    fn counts_and_sizes_have_ranges() {
        let up = ("UPSTREAM_URL", "http://127.0.0.1:1");
        for (name, ok, refused) in [
            (
                "HEALTH_CHECK_FAILURE_THRESHOLD",
                ["1", "1000"],
                ["0", "1001"],
            ),
            (
                "HEALTH_CHECK_RECOVERY_THRESHOLD",
                ["1", "1000"],
                ["0", "1001"],
            ),
            (
                "BREAKER_FAILURE_THRESHOLD",
                ["1", "1000000"],
                ["0", "1000001"],
            ),
            (
                "UPSTREAM_MAX_IDLE_PER_HOST",
                ["1", "100000"],
                ["0", "100001"],
            ),
            ("MAX_CONNECTIONS", ["1", "1000000"], ["0", "1e19"]),
            ("CACHE_MAX_BYTES", ["64KiB", "1TiB"], ["65535", "1025GiB"]),
            ("MAX_HEADER_BYTES", ["8KiB", "1MiB"], ["8191", "1025KiB"]),
            ("MAX_REQUEST_BODY_BYTES", ["0", "1TiB"], ["1025GiB", "-1"]),
            (
                "CACHE_MAX_OBJECT_BYTES",
                ["0", "256MiB"],
                ["99999999999999999999", "1e19"],
            ),
        ] {
            for v in ok {
                assert!(
                    cfg(&[up, (name, v)]).is_ok(),
                    "{name}={v} should be accepted"
                );
            }
            for v in refused {
                assert_eq!(
                    cfg(&[up, (name, v)]).unwrap_err().variable,
                    name,
                    "{name}={v}"
                );
            }
        }
    }

    /// `CACHE_MAX_OBJECT_BYTES` may not exceed `CACHE_MAX_BYTES`; unset, it shrinks to fit.
    #[test]
    fn object_size_limit_must_fit_the_store() {
        let up = ("UPSTREAM_URL", "http://127.0.0.1:1");
        let err = cfg(&[
            up,
            ("CACHE_MAX_BYTES", "1MiB"),
            ("CACHE_MAX_OBJECT_BYTES", "2MiB"),
        ])
        .unwrap_err();
        assert_eq!(err.variable, "CACHE_MAX_OBJECT_BYTES", "{err}");
        assert!(err.problem.contains("CACHE_MAX_BYTES (1MiB)"), "{err}");
        let same = cfg(&[
            up,
            ("CACHE_MAX_BYTES", "1MiB"),
            ("CACHE_MAX_OBJECT_BYTES", "1MiB"),
        ])
        .unwrap();
        assert_eq!(same.max_object_bytes, 1 << 20);
        let small = cfg(&[up, ("CACHE_MAX_BYTES", "64KiB")]).unwrap();
        assert_eq!(small.max_object_bytes, 64 << 10);
        let default = cfg(&[up]).unwrap();
        assert_eq!(
            (default.max_bytes, default.max_object_bytes),
            (256 << 20, 8 << 20)
        );
    }

    /// `user:password@` in an upstream URL is refused, and no error message shows the
    /// password, whatever else is wrong with the value.
    #[test]
    fn upstream_credentials_are_refused_and_never_echoed() {
        for (name, v) in [
            ("UPSTREAM_URL", "http://user:s3cret@127.0.0.1:1"),
            ("UPSTREAM_URL", "http://s3cret@127.0.0.1:1/api"),
            ("UPSTREAM_URL", "h2c://user:s3cret@127.0.0.1:1"),
            ("UPSTREAM_URL", "http://user:s3cret@127.0.0.1:1/?q=1"),
            ("UPSTREAM_URL", "ftp://user:s3cret@127.0.0.1:1"),
            ("UPSTREAM_URL", "http://user:s3cr et@127.0.0.1:1"),
            ("UPSTREAM_URL", "user:s3cret@127.0.0.1:1"),
            (
                "UPSTREAM_URLS",
                "http://a:1, http://user:s3cret@b:2 weight=2",
            ),
            ("UPSTREAM_URLS", "http://user:s3cret@b:2 weight=0"),
            ("UPSTREAM_URLS", "http://b:2 user:s3cret@"),
        ] {
            let err = cfg(&[(name, v)]).unwrap_err();
            assert_eq!(err.variable, name, "{v}: {err}");
            assert!(!err.to_string().contains("s3cret"), "{v}: {err}");
        }
        let err = cfg(&[("UPSTREAM_URL", "http://user:s3cret@127.0.0.1:1")]).unwrap_err();
        assert!(err.problem.contains("credentials"), "{err}");
        assert!(err.problem.contains("<redacted>@127.0.0.1:1"), "{err}");
    }

    /// The error is one line even when the value echoed in it is not.
    #[test]
    fn error_message_is_one_line() {
        let err = cfg(&[("UPSTREAM_URL", "http://a:1"), ("REQ_TIMEOUT", "1\n2")]).unwrap_err();
        assert_eq!(err.to_string().lines().count(), 1, "{err}");
        assert!(err.to_string().contains("REQ_TIMEOUT"), "{err}");
    }

    /// At the top of every range, the sums the daemon forms (a deadline from now, twice
    /// `REQ_TIMEOUT`, an expiry plus every stale allowance) stay far from overflowing.
    #[test]
    fn largest_settings_cannot_overflow_a_deadline() {
        let mut pairs: Vec<(&str, String)> = DURATIONS
            .iter()
            .map(|(name, _, max)| (*name, max.to_string()))
            .collect();
        pairs.push(("UPSTREAM_URL", "http://127.0.0.1:1".into()));
        let pairs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let c = cfg(&pairs).unwrap();
        let longest = [
            c.limits.header_read_timeout,
            c.limits.keepalive_timeout,
            c.upstream_timeout * 2,
            c.shutdown_grace,
            c.pool.breaker_cooldown,
            c.pool.health_interval,
            c.pool.health_timeout,
            c.pool.connect_timeout,
            c.pool.idle_timeout,
            c.default_ttl.unwrap_or_default()
                + c.refresh_window
                + c.stale_retention
                + c.stale_if_error
                // The largest delta-seconds a response may carry (`stale-while-revalidate`).
                + Duration::from_secs(1 << 31),
        ];
        let now = std::time::Instant::now();
        for d in longest {
            assert!(now.checked_add(d * 1000).is_some(), "{d:?}");
        }
    }

    #[test]
    fn zero_expiry_means_rfc_only_and_empty_key_disables_admin() {
        let c = cfg(&[
            ("UPSTREAM_URL", "http://127.0.0.1:9/api/"),
            ("DEFAULT_CACHE_EXPIRY_TIME_SECS", "0"),
            ("CLEAR_CACHE_KEY", ""),
        ])
        .unwrap();
        assert_eq!(c.default_ttl, None);
        assert!(c.admin_key.is_none());
        assert_eq!(
            c.backends[0].url.uri_for("/x?a=1").unwrap().to_string(),
            "http://127.0.0.1:9/api/x?a=1"
        );
    }

    #[test]
    fn weighted_backend_list() {
        let c = cfg(&[
            ("UPSTREAM_URL", "http://ignored:1"),
            (
                "UPSTREAM_URLS",
                "http://10.0.0.1:8080 weight=3, http://10.0.0.2:8080 h2,h2c://10.0.0.3:1",
            ),
        ])
        .unwrap();
        let got: Vec<_> = c
            .backends
            .iter()
            .map(|b| (b.url.authority.as_str(), b.weight, b.http2))
            .collect();
        assert_eq!(
            got,
            [
                ("10.0.0.1:8080", 3, false),
                ("10.0.0.2:8080", 1, true),
                ("10.0.0.3:1", 1, true)
            ]
        );
        assert_eq!(
            c.ops_listen_addr,
            Some(SocketAddr::from(([127, 0, 0, 1], 9000)))
        );
    }

    #[test]
    fn redis_settings_are_checked_and_the_password_never_shown() {
        let up = ("UPSTREAM_URL", "http://127.0.0.1:1");
        assert_eq!(cfg(&[up]).unwrap().redis, None);
        assert_eq!(cfg(&[up, ("REDIS_URL", " ")]).unwrap().redis, None);
        let c = cfg(&[
            up,
            ("REDIS_URL", "redis://:s3cret@10.0.0.5:6380/2"),
            ("REDIS_TIMEOUT_MS", "20"),
            ("REDIS_MAX_OBJECT_BYTES", "64KiB"),
        ])
        .unwrap();
        let r = c.redis.clone().unwrap();
        assert_eq!(r.timeout, Duration::from_millis(20));
        assert_eq!(r.max_object_bytes, 64 << 10);
        let shown: Vec<_> = c
            .effective()
            .into_iter()
            .filter(|(n, _)| n.starts_with("REDIS"))
            .collect();
        assert_eq!(
            shown[0],
            (
                "REDIS_URL",
                "redis://:<redacted>@10.0.0.5:6380/2".to_string()
            )
        );
        for (bad, var) in [
            ("http://x", "REDIS_URL"),
            ("rediss://x/#insecure", "REDIS_URL"),
            ("redis://", "REDIS_URL"),
            ("rediss://", "REDIS_URL"),
            ("redis://h/abc", "REDIS_URL"),
        ] {
            let err = cfg(&[up, ("REDIS_URL", bad)]).unwrap_err();
            assert_eq!(err.variable, var, "{bad}: {err}");
        }
        let err = cfg(&[up, ("REDIS_URL", "redis://h"), ("REDIS_TIMEOUT_MS", "0")]).unwrap_err();
        assert_eq!(err.variable, "REDIS_TIMEOUT_MS");
        assert_eq!(redact_redis_password("redis://u@h:1"), "redis://u@h:1");
        assert_eq!(
            redact_redis_password("rediss://u:pw@h:1/0"),
            "rediss://u:<redacted>@h:1/0"
        );
        assert_eq!(
            redact_redis_password("redis+cluster://:pw@h1:7000,h2:7001"),
            "redis+cluster://:<redacted>@h1:7000,h2:7001"
        );
    }

    /// A Redis Cluster: `redis+cluster://` (or `rediss+cluster://`) with comma-separated seed
    /// nodes, the credentials shared by all; only database 0.
    #[test]
    fn a_cluster_url_names_its_seed_nodes() {
        assert_eq!(redis_cluster_nodes("redis://h:1"), None);
        assert_eq!(
            redis_cluster_nodes("redis+cluster://u:pw@10.0.0.1:7000, 10.0.0.2:7001/0"),
            Some(vec![
                "redis://u:pw@10.0.0.1:7000".to_string(),
                "redis://u:pw@10.0.0.2:7001".to_string()
            ])
        );
        assert_eq!(
            redis_cluster_nodes("rediss+cluster://h1:7000"),
            Some(vec!["rediss://h1:7000".to_string()])
        );
        assert!(redis_tls("rediss+cluster://h1:7000"));
        let up = ("UPSTREAM_URL", "http://127.0.0.1:1");
        let c = cfg(&[up, ("REDIS_URL", "redis+cluster://:pw@h1:7000,h2:7001")]).unwrap();
        assert_eq!(
            c.effective()
                .into_iter()
                .find(|(n, _)| *n == "REDIS_URL")
                .unwrap()
                .1,
            "redis+cluster://:<redacted>@h1:7000,h2:7001"
        );
        for bad in [
            "redis+cluster://",
            "redis+cluster://h1:7000,,:7001",
            "redis+cluster://h1:7000/1",
            "rediss+cluster://h1:7000/#insecure",
        ] {
            let err = cfg(&[up, ("REDIS_URL", bad)]).unwrap_err();
            assert_eq!(err.variable, "REDIS_URL", "{bad}: {err}");
        }
    }

    /// `rediss://` is TLS with the system's roots, or with `REDIS_CA_FILE`'s; the CA file is
    /// read and checked at start-up, and refused without TLS.
    #[test]
    fn rediss_takes_an_optional_ca_file() {
        let up = ("UPSTREAM_URL", "http://127.0.0.1:1");
        let c = cfg(&[up, ("REDIS_URL", "rediss://:pw@redis.internal:6380")]).unwrap();
        let r = c.redis.clone().unwrap();
        assert!(redis_tls(&r.url));
        assert_eq!(r.ca, None);
        let shown: Vec<_> = c
            .effective()
            .into_iter()
            .filter(|(n, _)| n.starts_with("REDIS"))
            .collect();
        assert_eq!(
            shown[0].1, "rediss://:<redacted>@redis.internal:6380",
            "{shown:?}"
        );
        assert_eq!(shown[1], ("REDIS_CA_FILE", String::new()));

        let dir = std::env::temp_dir().join(format!("edgecache-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca.pem");
        let cert = rcgen::generate_simple_self_signed(vec!["redis.internal".into()]).unwrap();
        std::fs::write(&ca, cert.cert.pem()).unwrap();
        let ca_path = ca.to_str().unwrap();
        let c = cfg(&[
            up,
            ("REDIS_URL", "rediss://redis.internal:6380"),
            ("REDIS_CA_FILE", ca_path),
        ])
        .unwrap();
        let r = c.redis.clone().unwrap();
        assert_eq!(r.ca.as_ref().unwrap().0, ca_path);
        assert!(c
            .effective()
            .contains(&("REDIS_CA_FILE", ca_path.to_string())));
        // Without TLS, a file that is not there, a file without a certificate.
        let not_pem = dir.join("not.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        for (url, file) in [
            ("redis://redis.internal:6380", ca_path),
            ("rediss://redis.internal:6380", "/nonexistent/ca.pem"),
            ("rediss://redis.internal:6380", not_pem.to_str().unwrap()),
        ] {
            let err = cfg(&[up, ("REDIS_URL", url), ("REDIS_CA_FILE", file)]).unwrap_err();
            assert_eq!(err.variable, "REDIS_CA_FILE", "{url} {file}: {err}");
        }
        // Unused without REDIS_URL.
        assert_eq!(
            cfg(&[up, ("REDIS_CA_FILE", "/nonexistent")]).unwrap().redis,
            None
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A client certificate for Redis: both files or neither, TLS only, readable PEM that
    /// parses; shown by path, the key never.
    #[test]
    fn a_redis_client_certificate_takes_both_files() {
        let up = ("UPSTREAM_URL", "http://127.0.0.1:1");
        let url = ("REDIS_URL", "rediss://redis.internal:6380");
        let dir = std::env::temp_dir().join(format!("edgecache-client-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let made = rcgen::generate_simple_self_signed(vec!["edgecache".into()]).unwrap();
        let (cert, key, other) = (dir.join("c.pem"), dir.join("k.pem"), dir.join("x.pem"));
        std::fs::write(&cert, made.cert.pem()).unwrap();
        std::fs::write(&key, made.signing_key.serialize_pem()).unwrap();
        std::fs::write(&other, "hello").unwrap();
        let (cert, key, other) = (
            cert.to_str().unwrap(),
            key.to_str().unwrap(),
            other.to_str().unwrap(),
        );
        let c = cfg(&[
            up,
            url,
            ("REDIS_CLIENT_CERT_FILE", cert),
            ("REDIS_CLIENT_KEY_FILE", key),
        ])
        .unwrap();
        let r = c.redis.clone().unwrap();
        let client = r.client.clone().unwrap();
        assert_eq!(
            (client.cert_path.as_str(), client.key_path.as_str()),
            (cert, key)
        );
        let certs = r.tls_certificates().unwrap();
        assert!(certs.client_tls.is_some() && certs.root_cert.is_none());
        let shown = c.effective();
        assert!(shown.contains(&("REDIS_CLIENT_CERT_FILE", cert.to_string())));
        assert!(shown.contains(&("REDIS_CLIENT_KEY_FILE", key.to_string())));
        let debug = format!("{r:?}");
        assert!(!debug.contains("PRIVATE KEY"), "{debug}");
        assert!(cfg(&[up, url])
            .unwrap()
            .redis
            .unwrap()
            .tls_certificates()
            .is_none());

        for (env, variable) in [
            (
                vec![("REDIS_CLIENT_CERT_FILE", cert)],
                "REDIS_CLIENT_KEY_FILE",
            ),
            (
                vec![("REDIS_CLIENT_KEY_FILE", key)],
                "REDIS_CLIENT_CERT_FILE",
            ),
            (
                vec![
                    ("REDIS_CLIENT_CERT_FILE", "/nonexistent"),
                    ("REDIS_CLIENT_KEY_FILE", key),
                ],
                "REDIS_CLIENT_CERT_FILE",
            ),
            (
                vec![
                    ("REDIS_CLIENT_CERT_FILE", other),
                    ("REDIS_CLIENT_KEY_FILE", key),
                ],
                "REDIS_CLIENT_CERT_FILE",
            ),
            (
                vec![
                    ("REDIS_CLIENT_CERT_FILE", cert),
                    ("REDIS_CLIENT_KEY_FILE", cert),
                ],
                "REDIS_CLIENT_KEY_FILE",
            ),
        ] {
            let mut vars = vec![up, url];
            vars.extend(env.iter().copied());
            let err = cfg(&vars).unwrap_err();
            assert_eq!(err.variable, variable, "{env:?}: {err}");
            assert!(!err.problem.contains("PRIVATE KEY-----\n"), "{err}");
        }
        // Without TLS.
        let err = cfg(&[
            up,
            ("REDIS_URL", "redis://redis.internal:6379"),
            ("REDIS_CLIENT_CERT_FILE", cert),
            ("REDIS_CLIENT_KEY_FILE", key),
        ])
        .unwrap_err();
        assert_eq!(err.variable, "REDIS_CLIENT_CERT_FILE", "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn ops_listen_addr_keeps_its_old_name_as_an_alias() {
        let up = ("UPSTREAM_URL", "http://127.0.0.1:1");
        let addr = |a: &str| Some(a.parse::<SocketAddr>().unwrap());
        let new = cfg(&[up, ("OPS_LISTEN_ADDR", "127.0.0.1:9100")]).unwrap();
        assert_eq!(new.ops_listen_addr, addr("127.0.0.1:9100"));
        let old = cfg(&[up, ("ADMIN_LISTEN_ADDR", "127.0.0.1:9200")]).unwrap();
        assert_eq!(old.ops_listen_addr, addr("127.0.0.1:9200"));
        let off = cfg(&[up, ("ADMIN_LISTEN_ADDR", "off")]).unwrap();
        assert_eq!(off.ops_listen_addr, None);
        let same = cfg(&[
            up,
            ("OPS_LISTEN_ADDR", "127.0.0.1:9100"),
            ("ADMIN_LISTEN_ADDR", "127.0.0.1:9100"),
        ])
        .unwrap();
        assert_eq!(same.ops_listen_addr, addr("127.0.0.1:9100"));
        let clash = cfg(&[
            up,
            ("OPS_LISTEN_ADDR", "127.0.0.1:9100"),
            ("ADMIN_LISTEN_ADDR", "off"),
        ])
        .unwrap_err();
        assert_eq!(clash.variable, "OPS_LISTEN_ADDR");
    }

    #[test]
    fn pool_retry_idle_and_panic_defaults() {
        let c = cfg(&[("UPSTREAM_URL", "http://127.0.0.1:1")]).unwrap();
        assert_eq!(c.pool.idle_timeout, Duration::from_secs(4));
        assert_eq!((c.pool.retries, c.pool.panic_threshold), (1, 50));
        let c = cfg(&[
            ("UPSTREAM_URL", "http://127.0.0.1:1"),
            ("UPSTREAM_RETRIES", "0"),
            ("HEALTH_PANIC_THRESHOLD", "30%"),
        ])
        .unwrap();
        assert_eq!((c.pool.retries, c.pool.panic_threshold), (0, 30));
    }

    #[test]
    fn byte_sizes_and_networks() {
        assert_eq!(parse_bytes("8MiB"), Ok(8 << 20));
        assert_eq!(parse_bytes("2GiB"), Ok(2 << 30));
        assert_eq!(parse_bytes("512KiB"), Ok(512 << 10));
        assert_eq!(parse_bytes("100"), Ok(100));
        let net = IpNet::parse("172.28.0.0/16").unwrap();
        assert!(net.contains("172.28.3.4".parse().unwrap()));
        assert!(!net.contains("172.29.0.1".parse().unwrap()));
        assert!(IpNet::parse("127.0.0.1")
            .unwrap()
            .contains("::ffff:127.0.0.1".parse().unwrap()));
    }

    fn env_example_keys() -> Vec<&'static str> {
        include_str!("../.env.example")
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once('=').map(|(k, _)| k.trim()))
            .collect()
    }

    /// `--help` lists exactly the settings of `.env.example`, in its order.
    #[test]
    fn settings_table_is_env_example() {
        let names: Vec<&str> = SETTINGS.iter().map(|s| s.name).collect();
        assert_eq!(names, env_example_keys());
        assert_eq!(SETTINGS[3].flag(), "req-timeout");
        for s in SETTINGS {
            assert!(!s.help.is_empty() && !s.help.contains('\n'), "{}", s.name);
        }
    }

    /// A default in the table is the parser's default: setting it explicitly changes nothing.
    #[test]
    fn table_defaults_are_the_parser_defaults() {
        let up = ("UPSTREAM_URL", "http://127.0.0.1:1");
        let implicit = format!("{:?}", cfg(&[up]).unwrap());
        for s in SETTINGS.iter().filter(|s| !s.default.is_empty()) {
            let explicit = cfg(&[up, (s.name, s.default)])
                .unwrap_or_else(|e| panic!("{}={}: {e}", s.name, s.default));
            assert_eq!(
                format!("{explicit:?}"),
                implicit,
                "{}={}",
                s.name,
                s.default
            );
        }
    }

    /// The README's settings table has a row for every setting, stating the same default.
    #[test]
    fn readme_documents_every_setting_and_default() {
        let readme = include_str!("../README.md");
        for s in SETTINGS {
            let row = readme
                .lines()
                .find(|l| l.starts_with(&format!("| `{}` |", s.name)))
                .unwrap_or_else(|| panic!("{} is not in the README's settings table", s.name));
            if !s.default.is_empty() {
                let default = row.split('|').nth(2).unwrap_or_default();
                assert!(
                    default.contains(&format!("`{}`", s.default)),
                    "{}: README default {default:?}, table {:?}",
                    s.name,
                    s.default
                );
            }
        }
    }

    /// `--check` prints every setting's effective value; read back, they give the same
    /// configuration. The admin key is never shown.
    #[test]
    fn effective_settings_read_back_to_the_same_config() {
        let up = ("UPSTREAM_URL", "http://127.0.0.1:1/api/");
        for pairs in [
            vec![up],
            vec![
                ("DEFAULT_CACHE_EXPIRY_TIME_SECS", "2"),
                ("DEFAULT_REFRESH_WINDOW_SECS", "60"),
                ("REQ_TIMEOUT", "2.5"),
                ("UPSTREAM_URL", "h2c://host.docker.internal:3006"),
                ("CLEAR_CACHE_KEY", "Secret"),
            ],
            vec![
                up,
                (
                    "UPSTREAM_URLS",
                    "http://10.0.0.1:8080 weight=3, http://10.0.0.2:8080/p h2",
                ),
                ("LISTEN_ADDR", "[::1]:0"),
                ("ADMIN_LISTEN_ADDR", "OFF"),
                ("TRUSTED_PROXIES", "none"),
                ("ALLOWED_HOSTS", "Example.com, .example.org"),
                ("LOG_FORMAT", "JSON"),
                ("CLIENT_CACHE_CONTROL", "full"),
                ("CACHE_MAX_BYTES", "1MiB"),
                ("MAX_HEADER_BYTES", "10000"),
                ("MAX_REQUEST_BODY_BYTES", "2GiB"),
                ("HEALTH_PANIC_THRESHOLD", "30%"),
                ("DEFAULT_CACHE_EXPIRY_TIME_SECS", "0"),
                ("KEEPALIVE_TIMEOUT_SECS", "0.001"),
            ],
            vec![up, ("TRUSTED_PROXIES", "10.0.0.0/8, ::1, 192.168.1.7/32")],
        ] {
            let config = cfg(&pairs).unwrap();
            let shown = config.effective();
            let names: Vec<&str> = shown.iter().map(|(k, _)| *k).collect();
            let want: Vec<&str> = SETTINGS
                .iter()
                .map(|s| s.name)
                .filter(|n| *n != "RUST_LOG")
                .collect();
            assert_eq!(names, want);
            let text = format!("{shown:?}");
            assert!(!text.contains("Secret"), "{text}");
            let back: Vec<(&str, &str)> = shown.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let again = cfg(&back).unwrap_or_else(|e| panic!("{e}: {text}"));
            assert_eq!(format!("{again:?}"), format!("{config:?}"), "{text}");
        }
    }

    // --- Async jobs and callbacks settings. ---

    /// Defaults, the `host:port` list (normalised), the secret's rules, ranges, and the
    /// secret never shown by `Debug` or `--check`.
    #[test]
    fn jobs_and_callback_settings() {
        let up = ("UPSTREAM_URL", "http://127.0.0.1:1");
        let d = cfg(&[up]).unwrap().jobs;
        assert_eq!((d.max_jobs, d.max_age), (10_000, Duration::from_secs(3600)));
        assert!(d.callback_hosts.is_empty() && d.callback_secret.is_none());

        let secret = ("CALLBACK_SECRET", "0123456789abcdef-s3cret");
        let c = cfg(&[
            up,
            secret,
            (
                "CALLBACK_ALLOWED_HOSTS",
                " Hooks.Example.com:443, 10.0.0.7:8080 ,[0:0::1]:9000,",
            ),
            ("JOBS_MAX", "5"),
            ("JOBS_MAX_AGE_SECS", "1.5"),
        ])
        .unwrap();
        let hosts: Vec<String> = c
            .jobs
            .callback_hosts
            .iter()
            .map(|h| h.to_string())
            .collect();
        assert_eq!(
            hosts,
            ["hooks.example.com:443", "10.0.0.7:8080", "[::1]:9000"]
        );
        assert_eq!(c.jobs.max_jobs, 5);
        assert_eq!(c.jobs.max_age, Duration::from_millis(1500));
        assert_eq!(
            c.jobs.callback_secret.as_ref().unwrap().as_bytes(),
            b"0123456789abcdef-s3cret"
        );
        assert!(!format!("{c:?}").contains("s3cret"));
        let shown = c.effective();
        assert!(!format!("{shown:?}").contains("s3cret"), "{shown:?}");
        let value = |name: &str| shown.iter().find(|(n, _)| *n == name).unwrap().1.clone();
        assert_eq!(value("CALLBACK_SECRET"), "<redacted>");
        assert_eq!(
            value("CALLBACK_ALLOWED_HOSTS"),
            "hooks.example.com:443,10.0.0.7:8080,[::1]:9000"
        );
        assert_eq!(
            (value("JOBS_MAX"), value("JOBS_MAX_AGE_SECS")),
            ("5".into(), "1.5".into())
        );
        // Read back with the real secret in place of `<redacted>`: the same configuration.
        let back: Vec<(&str, &str)> = shown
            .iter()
            .map(|(k, v)| {
                (
                    *k,
                    if *k == "CALLBACK_SECRET" {
                        secret.1
                    } else {
                        v.as_str()
                    },
                )
            })
            .collect();
        assert_eq!(format!("{:?}", cfg(&back).unwrap()), format!("{c:?}"));

        // A secret without hosts is harmless; hosts without a secret are not.
        assert!(cfg(&[up, secret]).is_ok());
        for (pairs, var) in [
            (vec![("CALLBACK_ALLOWED_HOSTS", "a:1")], "CALLBACK_SECRET"),
            (
                vec![
                    ("CALLBACK_ALLOWED_HOSTS", "a:1"),
                    ("CALLBACK_SECRET", "short"),
                ],
                "CALLBACK_SECRET",
            ),
            (
                vec![secret, ("CALLBACK_ALLOWED_HOSTS", "hooks.example.com")],
                "CALLBACK_ALLOWED_HOSTS",
            ),
            (
                vec![secret, ("CALLBACK_ALLOWED_HOSTS", "http://a:1")],
                "CALLBACK_ALLOWED_HOSTS",
            ),
            (
                vec![secret, ("CALLBACK_ALLOWED_HOSTS", "u@a:1")],
                "CALLBACK_ALLOWED_HOSTS",
            ),
            (
                vec![secret, ("CALLBACK_ALLOWED_HOSTS", "a:0")],
                "CALLBACK_ALLOWED_HOSTS",
            ),
            (
                vec![secret, ("CALLBACK_ALLOWED_HOSTS", "a:65536")],
                "CALLBACK_ALLOWED_HOSTS",
            ),
            (
                vec![secret, ("CALLBACK_ALLOWED_HOSTS", "a:+80")],
                "CALLBACK_ALLOWED_HOSTS",
            ),
            (
                vec![secret, ("CALLBACK_ALLOWED_HOSTS", "::1:80")],
                "CALLBACK_ALLOWED_HOSTS",
            ),
            (
                vec![secret, ("CALLBACK_ALLOWED_HOSTS", "[not-v6]:80")],
                "CALLBACK_ALLOWED_HOSTS",
            ),
            (vec![("JOBS_MAX", "0")], "JOBS_MAX"),
            (vec![("JOBS_MAX", "1000001")], "JOBS_MAX"),
            (vec![("JOBS_MAX", "many")], "JOBS_MAX"),
            (vec![("JOBS_MAX_AGE_SECS", "0")], "JOBS_MAX_AGE_SECS"),
            (vec![("JOBS_MAX_AGE_SECS", "86401")], "JOBS_MAX_AGE_SECS"),
            (vec![("JOBS_MAX_AGE_SECS", "NaN")], "JOBS_MAX_AGE_SECS"),
        ] {
            let mut pairs = pairs;
            pairs.push(up);
            let err = cfg(&pairs).unwrap_err();
            assert_eq!(err.variable, var, "{pairs:?}: {err}");
            assert!(!err.to_string().contains("s3cret"), "{err}");
        }
        for ok in [
            ("JOBS_MAX", "1"),
            ("JOBS_MAX", "1000000"),
            ("JOBS_MAX_AGE_SECS", "1"),
            ("JOBS_MAX_AGE_SECS", "86400"),
        ] {
            assert!(cfg(&[up, ok]).is_ok(), "{ok:?}");
        }
        // The README and --help state the age's range as the code does.
        let readme = include_str!("../README.md");
        let row = readme
            .lines()
            .find(|l| l.starts_with("| `JOBS_MAX_AGE_SECS` |"))
            .unwrap();
        assert!(row.contains("Range `1`–`86400`"), "{row}");
        let help = SETTINGS
            .iter()
            .find(|s| s.name == "JOBS_MAX_AGE_SECS")
            .unwrap()
            .help;
        assert!(help.contains("(1-86400)"), "{help}");
    }
}
