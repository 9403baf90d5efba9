//! Runtime configuration: raw environment variables in, a validated, typed [`Config`] out.
//!
//! Setting names are compatible with the proxy edgecache replaces (`UPSTREAM_URL`,
//! `DEFAULT_CACHE_EXPIRY_TIME_SECS`, `DEFAULT_REFRESH_WINDOW_SECS`, `REQ_TIMEOUT`,
//! `CLEAR_CACHE_KEY`), so an old `.env` keeps working. Parsing is pure: it takes a lookup
//! function, never reads the process environment itself, and reports the first bad variable
//! as a [`ConfigError`] that names it.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use http::Uri;

/// Everything the daemon needs to run, validated.
#[derive(Clone, Debug)]
pub struct Config {
    /// Address the proxy listens on (`LISTEN_ADDR`).
    pub listen_addr: SocketAddr,
    /// The upstream backends: `UPSTREAM_URLS` (several, weighted), else `UPSTREAM_URL`.
    pub backends: Vec<BackendConfig>,
    /// Health checking, circuit breaking and connection pooling of the backends.
    pub pool: PoolConfig,
    /// Address of the operator listener (`/status`, `/metrics`); `None` when `ADMIN_LISTEN_ADDR`
    /// is `off` (`ADMIN_LISTEN_ADDR`, default `127.0.0.1:9000`).
    pub admin_listen_addr: Option<SocketAddr>,
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
    /// Responses with larger bodies are streamed and never stored (`CACHE_MAX_OBJECT_BYTES`).
    pub max_object_bytes: usize,
    /// The store's accounted size (bodies, headers, keys, per-entry overhead) never exceeds
    /// this (`CACHE_MAX_BYTES`).
    pub max_bytes: usize,
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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientCacheControl {
    /// Obey only what cannot force an origin fetch: `no-store`, `only-if-cached`,
    /// `max-stale`. `no-cache`, `max-age`, `min-fresh` and `Pragma: no-cache` are ignored, so
    /// no client can make the proxy hit the origin at will (the default).
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
    /// Speak HTTP/2 with prior knowledge (`h2` option, or an `h2c://` URL).
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
    /// Below this percentage of backends up by health checks, all of them take traffic
    /// (`HEALTH_PANIC_THRESHOLD`, default 50; 0 disables).
    pub panic_threshold: u8,
}

/// The parsed upstream base URL.
#[derive(Clone, Debug)]
pub struct UpstreamUrl {
    /// `host:port` used for connecting and as the upstream `Host` header.
    pub authority: http::uri::Authority,
    /// Path prefix without a trailing slash (`""` when the URL has no path).
    pub path_prefix: String,
}

impl UpstreamUrl {
    /// Builds the absolute upstream URI for a downstream `path_and_query`.
    pub fn uri_for(&self, path_and_query: &str) -> Result<Uri, http::Error> {
        let mut pq = String::with_capacity(self.path_prefix.len() + path_and_query.len());
        pq.push_str(&self.path_prefix);
        pq.push_str(path_and_query);
        Uri::builder()
            .scheme("http")
            .authority(self.authority.clone())
            .path_and_query(pq)
            .build()
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

/// A configuration error: which variable, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub variable: &'static str,
    pub problem: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid configuration: {}: {}",
            self.variable, self.problem
        )
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
        let seconds = |name: &'static str, default: f64| -> Result<Duration, ConfigError> {
            match var(name) {
                None => Ok(Duration::from_secs_f64(default)),
                Some(v) => parse_seconds(&v).map_err(|p| bad(name, p)),
            }
        };
        let default_ttl =
            Some(seconds("DEFAULT_CACHE_EXPIRY_TIME_SECS", 2.0)?).filter(|d| !d.is_zero());
        let refresh_window = seconds("DEFAULT_REFRESH_WINDOW_SECS", 60.0)?;
        let upstream_timeout = seconds("REQ_TIMEOUT", 10.0)?;
        if upstream_timeout.is_zero() {
            return Err(bad("REQ_TIMEOUT", "must be greater than 0".into()));
        }
        let shutdown_grace = seconds("SHUTDOWN_GRACE_SECS", 30.0)?;
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
        let max_bytes = match var("CACHE_MAX_BYTES") {
            None => 256 << 20,
            Some(v) => match parse_bytes(&v) {
                Ok(0) => return Err(bad("CACHE_MAX_BYTES", "must be greater than 0".into())),
                Ok(n) => n,
                Err(p) => return Err(bad("CACHE_MAX_BYTES", p)),
            },
        };
        let max_object_bytes = match var("CACHE_MAX_OBJECT_BYTES") {
            None => 8 << 20,
            Some(v) => parse_bytes(&v).map_err(|p| bad("CACHE_MAX_OBJECT_BYTES", p))?,
        };
        let count = |name: &'static str, default: u32| -> Result<u32, ConfigError> {
            match var(name) {
                None => Ok(default),
                Some(v) => match v.parse::<u32>() {
                    Ok(n) if n > 0 => Ok(n),
                    _ => Err(bad(
                        name,
                        format!("`{v}` is not a whole number greater than 0"),
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
            health_interval: seconds("HEALTH_CHECK_INTERVAL_SECS", 10.0)?,
            health_timeout: seconds("HEALTH_CHECK_TIMEOUT_SECS", 2.0)?,
            failure_threshold: count("HEALTH_CHECK_FAILURE_THRESHOLD", 3)?,
            recovery_threshold: count("HEALTH_CHECK_RECOVERY_THRESHOLD", 2)?,
            breaker_threshold: count("BREAKER_FAILURE_THRESHOLD", 5)?,
            breaker_cooldown: seconds("BREAKER_COOLDOWN_SECS", 10.0)?,
            connect_timeout: seconds("CONNECT_TIMEOUT_SECS", 5.0)?,
            max_idle_per_host: count("UPSTREAM_MAX_IDLE_PER_HOST", 64)? as usize,
            idle_timeout: seconds("UPSTREAM_IDLE_TIMEOUT_SECS", 4.0)?,
            retries: match var("UPSTREAM_RETRIES") {
                None => 1,
                Some(v) => match v.parse::<u32>() {
                    Ok(n) if n <= 10 => n,
                    _ => return Err(bad("UPSTREAM_RETRIES", format!("`{v}` is not 0 to 10"))),
                },
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
        if pool.health_timeout.is_zero() {
            return Err(bad(
                "HEALTH_CHECK_TIMEOUT_SECS",
                "must be greater than 0".into(),
            ));
        }
        if pool.connect_timeout.is_zero() {
            return Err(bad("CONNECT_TIMEOUT_SECS", "must be greater than 0".into()));
        }
        let admin_listen_addr = match var("ADMIN_LISTEN_ADDR") {
            None => Some(SocketAddr::from(([127, 0, 0, 1], 9000))),
            Some(v) if v.eq_ignore_ascii_case("off") => None,
            Some(v) => Some(v.parse().map_err(|_| {
                bad(
                    "ADMIN_LISTEN_ADDR",
                    format!("`{v}` is not an IP:port address or `off`"),
                )
            })?),
        };
        let byte_size = |name: &'static str, default: usize| -> Result<usize, ConfigError> {
            match var(name) {
                None => Ok(default),
                Some(v) => parse_bytes(&v).map_err(|p| bad(name, p)),
            }
        };
        let limits = Limits {
            header_read_timeout: seconds("HEADER_READ_TIMEOUT_SECS", 10.0)?,
            keepalive_timeout: seconds("KEEPALIVE_TIMEOUT_SECS", 75.0)?,
            max_header_bytes: byte_size("MAX_HEADER_BYTES", 64 << 10)?,
            max_connections: count("MAX_CONNECTIONS", 10_000)? as usize,
            max_request_body: Some(byte_size("MAX_REQUEST_BODY_BYTES", 0)? as u64)
                .filter(|n| *n > 0),
        };
        if limits.header_read_timeout.is_zero() {
            return Err(bad(
                "HEADER_READ_TIMEOUT_SECS",
                "must be greater than 0".into(),
            ));
        }
        if limits.keepalive_timeout.is_zero() {
            return Err(bad(
                "KEEPALIVE_TIMEOUT_SECS",
                "must be greater than 0".into(),
            ));
        }
        if limits.max_header_bytes < 8192 {
            return Err(bad("MAX_HEADER_BYTES", "must be at least 8KiB".into()));
        }
        let stale_retention = seconds("STALE_RETENTION_SECS", 0.0)?;
        let stale_if_error = seconds("STALE_IF_ERROR_SECS", 0.0)?;
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
        Ok(Config {
            limits,
            backends,
            pool,
            admin_listen_addr,
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
        })
    }
}

/// Parses `UPSTREAM_URLS`: comma-separated base URLs, each optionally followed by
/// `weight=N` and `h2`, as in nginx's `upstream` block:
/// `http://10.0.0.1:8080 weight=3, http://10.0.0.2:8080`.
fn parse_backends(list: &str) -> Result<Vec<BackendConfig>, String> {
    let mut backends = Vec::new();
    for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let mut words = entry.split_whitespace();
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
                        "`{entry}`: unknown option `{option}` (use weight=N or h2)"
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

/// Parses one base URL; `h2c://` means HTTP/2 with prior knowledge.
fn parse_upstream(v: &str) -> Result<(UpstreamUrl, bool), String> {
    let uri: Uri = v.parse().map_err(|_| format!("`{v}` is not a URL"))?;
    let http2 = match uri.scheme_str() {
        Some("http") => false,
        Some("h2c") => true,
        Some("https") => return Err("https upstreams are not supported yet; use http://".into()),
        _ => return Err(format!("`{v}` must start with http://")),
    };
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| format!("`{v}` has no host"))?;
    if uri.query().is_some() {
        return Err(format!("`{v}` must not have a query string"));
    }
    let path_prefix = uri.path().trim_end_matches('/').to_owned();
    Ok((
        UpstreamUrl {
            authority,
            path_prefix,
        },
        http2,
    ))
}

/// Parses non-negative seconds, decimals allowed (`2`, `0.5`).
fn parse_seconds(v: &str) -> Result<Duration, String> {
    let secs: f64 = v
        .parse()
        .map_err(|_| format!("`{v}` is not a number of seconds"))?;
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("`{v}` must be a non-negative number of seconds"));
    }
    Duration::try_from_secs_f64(secs).map_err(|_| format!("`{v}` is out of range"))
}

/// Parses a byte size: `1048576`, `512KiB`, `8MiB`, `2GiB` (also `KB`/`MB`/`GB`, `k`/`m`/`g`).
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
        _ => {
            return Err(format!(
                "`{v}` has an unknown unit (use B, KiB, MiB or GiB)"
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
        assert_eq!(
            cfg(&[("UPSTREAM_URL", "https://x")]).unwrap_err().variable,
            "UPSTREAM_URL"
        );
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
            c.admin_listen_addr,
            Some(SocketAddr::from(([127, 0, 0, 1], 9000)))
        );
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
}
