//! The shared second tier on Redis (`REDIS_URL`): what one instance stored, the others find.
//!
//! Layout (version `ec1`), all keys of one path and query in one Redis Cluster slot (the
//! `{…}` hash tag is the first 16 hex digits of the path's SHA-256):
//!
//! * `ec1:{TAG}:v:ORIGIN` — a hash per stored URL (`ORIGIN` = `scheme://host[:port]`): one
//!   field per `Vary` variant ([`variant_field`]), each value one encoded entry
//!   ([`super::codec`]). Its TTL is raised to the longest a variant may still be served.
//! * `ec1:{TAG}:i:PATH` — the set of origins that have `PATH` stored: an exact-path purge
//!   reaches every host through it; a prefix purge finds these index keys by `SCAN`.
//!
//! One server (`redis://`, `rediss://`) or a Redis Cluster (`redis+cluster://`): every Lua
//! call touches only one path's keys (one slot); the purge stream, acknowledgement sets and
//! live-instance set are single keys; keyspace scans visit every master (`Conn`).
//!
//! Every operation on the request path is bounded by `REDIS_TIMEOUT_MS` and goes through a
//! [`Breaker`]: after [`FAILURES_TO_OPEN`] failures in a row Redis is left out of the path for
//! a while (1 s, doubling up to 30 s), then one trial operation decides. Nothing here fails a
//! client request: an unavailable tier is a miss, a write that fails is dropped and counted.
//! A purge that cannot reach Redis is kept and retried ([`SharedTier::retry_pending`]); until
//! it lands, reads of what it covers are misses, so a purged copy never comes back from Redis.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::config::RedisConfig;

use super::key::{origin_host, split_key, VaryKey};

/// Failures in a row that take Redis out of the path.
pub const FAILURES_TO_OPEN: u32 = 3;
const FIRST_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Pending purges kept for retry; past this, recovery drops everything the tier holds.
const MAX_PENDING: usize = 1000;
/// Admin purges may take longer than a request-path read (a prefix purge scans).
const PURGE_TIMEOUT: Duration = Duration::from_secs(5);

/// Circuit breaker for the tier: pure, `now` passed in.
#[derive(Debug, Default)]
pub struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
    backoff: Duration,
    /// A trial operation is under way (half-open).
    trial: bool,
}

impl Breaker {
    /// Whether an operation may go to Redis now. When the open period is over, one trial is
    /// let through; others wait for its outcome.
    pub fn allow(&mut self, now: Instant) -> bool {
        match self.open_until {
            None => true,
            Some(until) if now >= until && !self.trial => {
                self.trial = true;
                true
            }
            Some(_) => false,
        }
    }

    pub fn success(&mut self) {
        *self = Breaker::default();
    }

    pub fn failure(&mut self, now: Instant) {
        self.failures += 1;
        if self.trial || self.failures >= FAILURES_TO_OPEN {
            self.backoff = if self.open_until.is_none() {
                FIRST_BACKOFF
            } else {
                (self.backoff * 2).min(MAX_BACKOFF)
            };
            self.open_until = Some(now + self.backoff);
            self.trial = false;
        }
    }

    /// Whether Redis is out of the path (open, or half-open awaiting a trial).
    pub fn is_open(&self) -> bool {
        self.open_until.is_some()
    }
}

/// What the tier did, for `/metrics`.
#[derive(Debug, Default)]
pub struct SharedStats {
    pub get_hit: AtomicU64,
    pub get_miss: AtomicU64,
    pub get_error: AtomicU64,
    pub get_skipped: AtomicU64,
    pub set_ok: AtomicU64,
    pub set_error: AtomicU64,
    pub set_skipped: AtomicU64,
    pub purge_ok: AtomicU64,
    pub purge_error: AtomicU64,
    /// Leases asked for, and the waits for another instance's fetch that ended with its
    /// copy (`lease_waits_served`) or with this instance fetching after all.
    pub lease_tries: AtomicU64,
    pub lease_waits_served: AtomicU64,
    pub lease_waits_fetched: AtomicU64,
    /// Live instances at the last acknowledgement count.
    pub last_live: AtomicU64,
}

/// A purge Redis has not confirmed yet.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pending {
    /// One path and query, under one host (`None`: every host), any scheme.
    Path { path: String, host: Option<String> },
    /// Every path starting with this, under every origin.
    Prefix(String),
    /// Too many pending: drop everything.
    Everything,
}

impl Pending {
    fn covers(&self, origin: &str, path: &str) -> bool {
        match self {
            Pending::Path { path: p, host } => {
                p == path && host.as_deref().is_none_or(|h| origin_host(origin) == h)
            }
            Pending::Prefix(prefix) => path.starts_with(prefix.as_str()),
            Pending::Everything => true,
        }
    }
}

/// The tier's hash tag for a path and query.
pub fn path_tag(path: &str) -> String {
    let digest = Sha256::digest(path.as_bytes());
    let mut tag = String::with_capacity(16);
    for byte in &digest[..8] {
        tag.push_str(&format!("{byte:02x}"));
    }
    tag
}

/// The hash holding the variants of `key` (`scheme://host[:port]/path?query`).
pub fn variants_key(key: &str) -> String {
    let (origin, path) = split_key(key);
    format!("ec1:{{{}}}:v:{origin}", path_tag(path))
}

/// The set of origins that have `path` stored.
pub fn index_key(path: &str) -> String {
    format!("ec1:{{{}}}:i:{path}", path_tag(path))
}

/// The path an index key is for, if `key` is one.
pub fn index_path(key: &str) -> Option<&str> {
    let rest = key.strip_prefix("ec1:{")?;
    let (tag, rest) = rest.split_once("}:i:")?;
    (tag.len() == 16 && tag.bytes().all(|b| b.is_ascii_hexdigit())).then_some(rest)
}

/// The `SCAN MATCH` pattern for index keys of paths starting with `prefix` (a superset:
/// callers check [`index_path`]).
pub fn index_pattern(prefix: &str) -> String {
    let mut pattern = String::from("ec1:*:i:");
    for c in prefix.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('*');
    pattern
}

/// The hash field of one `Vary` variant: empty when the response does not vary, else a
/// digest of the names and the values the request had.
pub fn variant_field(vary: &VaryKey) -> Vec<u8> {
    if vary.names().is_empty() {
        return Vec::new();
    }
    let mut h = Sha256::new();
    for (name, value) in vary.names().iter().zip(vary.values()) {
        h.update(name.as_str().as_bytes());
        match value {
            Some(v) => {
                h.update([1]);
                h.update((v.len() as u64).to_le_bytes());
                h.update(v);
            }
            None => h.update([0]),
        }
    }
    h.finalize()[..16].to_vec()
}

/// Stores one variant and raises the TTLs of its hash and of the path's index to at least
/// ARGV[3] ms. KEYS: variants hash, index set. ARGV: field, blob, ttl ms, origin.
const WRITE: &str = r"
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local ttl = tonumber(ARGV[3])
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
redis.call('SADD', KEYS[2], ARGV[4])
if redis.call('PTTL', KEYS[2]) < ttl then redis.call('PEXPIRE', KEYS[2], ttl) end
return 1
";

/// How long a fleet lease lasts unless renewed; the holder renews it every third of that.
pub const LEASE: Duration = Duration::from_secs(2);
/// A waiter looks at Redis again this often even without a wake-up (a lost message, a holder
/// that died): the safety net, not the mechanism.
pub const RECHECK: Duration = Duration::from_millis(500);

/// The stored variants of one URL. KEYS: variants hash, index set. ARGV: origin.
///
/// The index is authoritative: variants whose origin the path's index does not list are not
/// there (a purge finds what it removes through the index, so a copy whose index entry was
/// evicted — any `maxmemory-policy` may evict the index before the hash — must not be served:
/// it would outlive a purge).
const LOOK: &str = r"
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 0 then return {} end
return redis.call('HVALS', KEYS[1])
";

/// One round trip for a miss: the stored variants if there are any (listed in the index, as
/// in [`LOOK`]), else the flight's lease if it is free. KEYS: variants hash, lease, index.
/// ARGV: token, ttl ms, origin. Returns {1, values}, {2, {}} (leased) or {3, {}} (another
/// instance holds the lease).
const LOOK_OR_LEASE: &str = r"
if redis.call('SISMEMBER', KEYS[3], ARGV[3]) == 1 then
  local v = redis.call('HVALS', KEYS[1])
  if #v > 0 then return {1, v} end
end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {2, {}} end
return {3, {}}
";

/// The stream every purge is announced on; each instance reads it from its own cursor, so
/// one that was away replays what it missed.
pub const PURGES: &str = "ec1:purges";

/// Announces a purge. KEYS: the purge stream. ARGV: max length, then the entry's field/value
/// pairs. A stream that does not exist (never created, or lost: evicted under an `allkeys-*`
/// policy, Redis restarted empty) is begun with a `genesis` entry, in the same atomic step:
/// a reader whose cursor is in an older stream then reads that entry first, and knows it may
/// have missed purges.
const ANNOUNCE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('XADD', KEYS[1], '*', 'kind', 'genesis')
end
return redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, 2))
";
/// Live instances: member = instance id, score = last heartbeat (ms since the epoch).
const INSTANCES: &str = "ec1:instances";
/// The purge stream keeps about this many entries (an instance further behind drops its
/// whole memory tier instead).
const STREAM_MAXLEN: usize = 10_000;
/// An instance whose heartbeat is older than this is not counted as live.
pub const ALIVE: Duration = Duration::from_secs(3);

/// A purge announced to the fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PurgeMsg {
    /// Acknowledgements are counted under this id.
    pub id: String,
    /// The instance that announced it (it applied it already).
    pub from: String,
    /// One path (`prefix == false`) or every path starting with `path`.
    pub prefix: bool,
    pub path: String,
    /// Only this host (`None`: every host).
    pub host: Option<String>,
}

/// What the purge reader does with what it reads.
pub trait PurgeSink: Send + Sync {
    /// Apply a purge another instance announced.
    fn apply(&self, msg: &PurgeMsg);
    /// Purges were missed (the stream was trimmed past this instance's cursor, or Redis lost
    /// it): drop everything held in memory.
    fn missed(&self);
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Whether stream id `a` is older than `b` (`ms-seq`).
fn stream_id_before(a: &str, b: &str) -> bool {
    let parse = |s: &str| {
        let (ms, seq) = s.split_once('-').unwrap_or((s, "0"));
        (
            ms.parse::<u64>().unwrap_or(0),
            seq.parse::<u64>().unwrap_or(0),
        )
    };
    parse(a) < parse(b)
}

/// What [`SharedTier::look_or_lease`] found.
pub enum Look {
    /// The stored variants (encoded).
    Stored(Vec<Vec<u8>>),
    /// Nothing stored, and this instance now holds the flight's lease.
    Leased(Lease),
    /// Nothing stored; another instance holds the lease (it is fetching).
    Held,
}

/// Renews a lease if it is still ours. KEYS: lease. ARGV: token, ttl ms.
const RENEW: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
";

/// Deletes a lease if it is still ours. KEYS: lease. ARGV: token.
const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// The lease key and wake-up channel of one flight (a URL and its `Vary` selection), in the
/// path's slot.
pub fn lease_names(key: &str, flight_key: &str) -> (String, String) {
    let (_, path) = split_key(key);
    let digest = Sha256::digest(flight_key.as_bytes());
    let mut id = String::with_capacity(16);
    for byte in &digest[..8] {
        id.push_str(&format!("{byte:02x}"));
    }
    let tag = path_tag(path);
    (format!("ec1:{{{tag}}}:l:{id}"), format!("ec1:c:{tag}:{id}"))
}

/// What the lease holder tells the instances waiting on its fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// The response is in the tier: read it.
    Stored,
    /// It will not be in the tier (not shareable, too large, failed): fetch your own.
    Pass,
}

impl Wake {
    fn as_str(self) -> &'static str {
        match self {
            Wake::Stored => "stored",
            Wake::Pass => "pass",
        }
    }
}

/// Waiters for wake-ups, by channel: fed by the instance's one pattern subscription.
#[derive(Default)]
struct Wakeups(dashmap::DashMap<String, tokio::sync::watch::Sender<Option<Wake>>>);

/// A registration for one channel's wake-up; unregisters when dropped.
pub struct WakeWaiter<'a> {
    wakeups: &'a Wakeups,
    channel: String,
    rx: tokio::sync::watch::Receiver<Option<Wake>>,
}

impl WakeWaiter<'_> {
    /// The wake-up, or `None` if `within` passed first.
    pub async fn wait(&mut self, within: Duration) -> Option<Wake> {
        match tokio::time::timeout(within, self.rx.wait_for(Option::is_some)).await {
            Ok(Ok(v)) => *v,
            _ => None,
        }
    }
}

impl Drop for WakeWaiter<'_> {
    fn drop(&mut self) {
        // Ours is the last receiver besides the sender's own count: remove the channel.
        self.wakeups
            .0
            .remove_if(&self.channel, |_, tx| tx.receiver_count() <= 1);
    }
}

/// A lease this instance holds on one flight.
#[derive(Debug, Clone)]
pub struct Lease {
    pub key: String,
    pub channel: String,
    pub token: String,
}

/// A token no other lease holder in the fleet has: std's per-process random hash keys over
/// the process id, a counter and the time.
fn lease_token() -> String {
    use std::hash::{BuildHasher, Hasher};
    static STATE: std::sync::OnceLock<std::hash::RandomState> = std::sync::OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let mut h = STATE
        .get_or_init(std::hash::RandomState::new)
        .build_hasher();
    h.write_u32(std::process::id());
    h.write_u64(NEXT.fetch_add(1, Ordering::Relaxed));
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    h.write_u128(nanos);
    format!("{:016x}{:08x}", h.finish(), std::process::id())
}

/// A connection to the tier: one server (a [`ConnectionManager`] that reconnects by itself,
/// or a plain multiplexed connection for the purge reader), or a Redis Cluster (redis-rs's
/// cluster client: each command goes to the master of its key's slot, following `MOVED`).
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Plain(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(
        &'a mut self,
        cmd: &'a redis::Cmd,
    ) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Plain(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Plain(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Plain(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// A master of the tier to `SCAN`: `None` for a single server, else a Cluster master's
/// address.
type ScanNode = Option<(String, u16)>;

impl Conn {
    /// Where a keyspace-wide `SCAN` must look: the one server, or every Cluster master (each
    /// holds its own slots' keys), from `CLUSTER SLOTS`.
    async fn scan_nodes(&mut self) -> redis::RedisResult<Vec<ScanNode>> {
        let Conn::Cluster(c) = self else {
            return Ok(vec![None]);
        };
        // Each entry: start slot, end slot, [master ip, port, id, …], replicas…
        let slots: Vec<redis::Value> = redis::cmd("CLUSTER").arg("SLOTS").query_async(c).await?;
        let mut masters: Vec<ScanNode> = Vec::new();
        for range in slots {
            let redis::Value::Array(parts) = range else {
                continue;
            };
            let Some(redis::Value::Array(master)) = parts.get(2) else {
                continue;
            };
            let host: Option<String> = master
                .first()
                .and_then(|v| redis::from_redis_value_ref(v).ok());
            let port: Option<u16> = master
                .get(1)
                .and_then(|v| redis::from_redis_value_ref(v).ok());
            if let (Some(host), Some(port)) = (host, port) {
                let node = Some((host, port));
                if !masters.contains(&node) {
                    masters.push(node);
                }
            }
        }
        Ok(masters)
    }

    /// One `SCAN` page on `node`: the next cursor and the keys matching `pattern`.
    async fn scan_page(
        &mut self,
        node: &ScanNode,
        cursor: u64,
        pattern: &str,
    ) -> redis::RedisResult<(u64, Vec<String>)> {
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(1000);
        match (self, node) {
            (Conn::Cluster(c), Some((host, port))) => {
                use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
                let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
                    host: host.clone(),
                    port: *port,
                });
                let value = c.route_command(cmd, routing).await?;
                Ok(redis::from_redis_value(value)?)
            }
            (conn, _) => cmd.query_async(conn).await,
        }
    }
}

/// Where the tier is: how to open the connections that are not the shared one (the purge
/// reader's, the wake-up subscription's).
#[allow(clippy::large_enum_variant)] // one per process
enum Backend {
    Single(redis::Client),
    Cluster {
        client: redis::cluster::ClusterClient,
        /// The seed nodes, one client each: the wake-up subscription goes to one of them
        /// (`PUBLISH` reaches every node of a Cluster, so any one hears every wake-up).
        seeds: Vec<redis::Client>,
    },
}

impl Backend {
    /// A connection of the purge reader's own, whose `XREAD … BLOCK` holds up nothing else;
    /// in a Cluster, a cluster connection of its own (its commands go to the stream's slot
    /// owner, and follow the slot if it moves).
    async fn reader_conn(&self) -> redis::RedisResult<Conn> {
        let connect = Duration::from_secs(1);
        // Longer than the reader's BLOCK (1 s).
        let response = Duration::from_secs(5);
        match self {
            Backend::Single(client) => {
                let config = redis::AsyncConnectionConfig::new()
                    .set_connection_timeout(Some(connect))
                    .set_response_timeout(Some(response));
                Ok(Conn::Plain(
                    client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await?,
                ))
            }
            Backend::Cluster { client, .. } => {
                let config = redis::cluster::ClusterConfig::new()
                    .set_connection_timeout(connect)
                    .set_response_timeout(response);
                Ok(Conn::Cluster(
                    client.get_async_connection_with_config(config).await?,
                ))
            }
        }
    }

    /// The servers a wake-up subscription may go to, in the order to try them.
    fn pubsub_clients(&self) -> &[redis::Client] {
        match self {
            Backend::Single(client) => std::slice::from_ref(client),
            Backend::Cluster { seeds, .. } => seeds,
        }
    }
}

/// The shared tier: a Redis connection (multiplexed, reconnecting by itself), its breaker and
/// counters.
pub struct SharedTier {
    backend: Backend,
    /// This instance, in leases' place of origin and the purge stream's acknowledgements.
    instance: String,
    wakeups: Wakeups,
    look: redis::Script,
    look_or_lease: redis::Script,
    announce: redis::Script,
    renew: redis::Script,
    release: redis::Script,
    conn: Conn,
    timeout: Duration,
    max_object_bytes: usize,
    breaker: Mutex<Breaker>,
    pending: Mutex<Vec<Pending>>,
    write: redis::Script,
    pub stats: SharedStats,
}

impl SharedTier {
    /// The tier for `config`; connects lazily (a Redis that is down at start-up is only a
    /// miss until it is up). Errs only for a URL the client library refuses.
    pub fn new(config: &RedisConfig) -> Result<SharedTier, String> {
        // `rediss://` with a private CA: only its certificates are trusted; else the system's
        // roots (rustls-native-certs). A client certificate when one is configured.
        let certs = config.tls_certificates();
        let client_for = |url: &str| match &certs {
            Some(certs) => redis::Client::build_with_tls(url, certs.clone()),
            None => redis::Client::open(url),
        };
        let connect_timeout = config.timeout.max(Duration::from_millis(200));
        let (backend, conn) = match crate::config::redis_cluster_nodes(&config.url) {
            None => {
                let client = client_for(config.url.as_str()).map_err(|e| e.to_string())?;
                let manager = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(connect_timeout))
                    .set_response_timeout(Some(config.timeout))
                    .set_number_of_retries(2)
                    .set_max_delay(Duration::from_secs(1));
                let conn = ConnectionManager::new_lazy_with_config(client.clone(), manager)
                    .map_err(|e| e.to_string())?;
                (Backend::Single(client), Conn::Single(conn))
            }
            Some(nodes) => {
                let seeds = nodes
                    .iter()
                    .map(|n| client_for(n))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| e.to_string())?;
                let mut builder = redis::cluster::ClusterClientBuilder::new(nodes)
                    .connection_timeout(connect_timeout)
                    .response_timeout(config.timeout)
                    .retries(2)
                    .max_retry_wait(1000);
                if let Some(certs) = &certs {
                    builder = builder.certs(certs.clone());
                }
                let client = builder.build().map_err(|e| e.to_string())?;
                // Connects in the background; commands fail (a miss) until it has.
                let conn = client
                    .get_pending_async_connection_with_config(redis::cluster::ClusterConfig::new());
                (Backend::Cluster { client, seeds }, Conn::Cluster(conn))
            }
        };
        Ok(SharedTier {
            backend,
            instance: lease_token(),
            wakeups: Wakeups::default(),
            look: redis::Script::new(LOOK),
            look_or_lease: redis::Script::new(LOOK_OR_LEASE),
            announce: redis::Script::new(ANNOUNCE),
            renew: redis::Script::new(RENEW),
            release: redis::Script::new(RELEASE),
            conn,
            timeout: config.timeout,
            max_object_bytes: config.max_object_bytes,
            breaker: Mutex::default(),
            pending: Mutex::default(),
            write: redis::Script::new(WRITE),
            stats: SharedStats::default(),
        })
    }

    /// Larger bodies are not written to the tier.
    pub fn max_object_bytes(&self) -> usize {
        self.max_object_bytes
    }

    /// Whether Redis is out of the path now.
    pub fn breaker_open(&self) -> bool {
        self.breaker().is_open()
    }

    fn breaker(&self) -> std::sync::MutexGuard<'_, Breaker> {
        self.breaker.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, Vec<Pending>> {
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `op` against Redis within `timeout` unless the breaker says no; `None` when it
    /// was skipped or failed (logged at debug, the breaker told).
    async fn run<T, F>(&self, timeout: Duration, op: F) -> Result<T, Skipped>
    where
        F: std::future::Future<Output = redis::RedisResult<T>>,
    {
        if !self.breaker().allow(Instant::now()) {
            return Err(Skipped::BreakerOpen);
        }
        match tokio::time::timeout(timeout, op).await {
            Ok(Ok(v)) => {
                self.breaker().success();
                Ok(v)
            }
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "redis operation failed");
                self.failed();
                Err(Skipped::Failed)
            }
            Err(_) => {
                tracing::debug!(
                    timeout_ms = timeout.as_millis() as u64,
                    "redis operation timed out"
                );
                self.failed();
                Err(Skipped::Failed)
            }
        }
    }

    fn failed(&self) {
        let mut b = self.breaker();
        let was_open = b.is_open();
        b.failure(Instant::now());
        if b.is_open() && !was_open {
            tracing::warn!("redis unavailable: shared tier taken out of the request path");
        }
    }

    /// The encoded variants stored for `key`; empty on a miss, when Redis is unavailable, or
    /// while a purge covering `key` waits to reach Redis.
    pub async fn variants(&self, key: &str) -> Vec<Vec<u8>> {
        let (origin, path) = split_key(key);
        if self.pending().iter().any(|p| p.covers(origin, path)) {
            self.stats.get_skipped.fetch_add(1, Ordering::Relaxed);
            return Vec::new();
        }
        let mut invocation = self.look.prepare_invoke();
        invocation
            .key(variants_key(key))
            .key(index_key(path))
            .arg(origin);
        let mut conn = self.conn.clone();
        match self
            .run(self.timeout, async move {
                invocation.invoke_async::<Vec<Vec<u8>>>(&mut conn).await
            })
            .await
        {
            Ok(v) if v.is_empty() => {
                self.stats.get_miss.fetch_add(1, Ordering::Relaxed);
                v
            }
            Ok(v) => {
                self.stats.get_hit.fetch_add(1, Ordering::Relaxed);
                v
            }
            Err(Skipped::BreakerOpen) => {
                self.stats.get_skipped.fetch_add(1, Ordering::Relaxed);
                Vec::new()
            }
            Err(Skipped::Failed) => {
                self.stats.get_error.fetch_add(1, Ordering::Relaxed);
                Vec::new()
            }
        }
    }

    /// Stores one encoded variant of `key` for `ttl`; whether it landed.
    pub async fn put(&self, key: &str, field: Vec<u8>, blob: &[u8], ttl: Duration) -> bool {
        let (origin, path) = split_key(key);
        if self.pending().iter().any(|p| p.covers(origin, path)) {
            self.stats.set_skipped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        let mut invocation = self.write.prepare_invoke();
        invocation
            .key(variants_key(key))
            .key(index_key(path))
            .arg(field)
            .arg(blob)
            .arg(ttl.as_millis().max(1) as u64)
            .arg(origin);
        let mut conn = self.conn.clone();
        let result = self
            .run(self.timeout, async move {
                invocation.invoke_async::<i64>(&mut conn).await
            })
            .await;
        let counter = match result {
            Ok(_) => &self.stats.set_ok,
            Err(Skipped::BreakerOpen) => &self.stats.set_skipped,
            Err(Skipped::Failed) => &self.stats.set_error,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        result.is_ok()
    }

    /// Removes what the tier holds for `path` under `host` (`None`: every host; any scheme).
    /// Returns false when Redis could not be reached: the purge is then kept and retried.
    pub async fn purge_path(&self, path: &str, host: Option<&str>) -> bool {
        let pending = Pending::Path {
            path: path.to_string(),
            host: host.map(str::to_string),
        };
        self.purge(pending).await
    }

    /// Removes every path starting with `prefix` (`""`: everything), under every origin.
    pub async fn purge_prefix(&self, prefix: &str) -> bool {
        self.purge(Pending::Prefix(prefix.to_string())).await
    }

    async fn purge(&self, what: Pending) -> bool {
        let mut conn = self.conn.clone();
        let job = what.clone();
        let ok = self
            .run(PURGE_TIMEOUT, async move { execute(&mut conn, &job).await })
            .await
            .is_ok();
        if ok {
            self.stats.purge_ok.fetch_add(1, Ordering::Relaxed);
        } else {
            self.stats.purge_error.fetch_add(1, Ordering::Relaxed);
            let mut pending = self.pending();
            if pending.len() >= MAX_PENDING {
                pending.clear();
                pending.push(Pending::Everything);
            } else if !pending.contains(&Pending::Everything) {
                pending.push(what);
            }
            tracing::warn!(
                pending = pending.len(),
                "redis unavailable: purge applied here, kept to reach the shared tier later"
            );
        }
        ok
    }

    /// Sends the purges Redis missed, oldest first; each leaves the list once it landed.
    /// Returns how many are still pending.
    pub async fn retry_pending(&self) -> usize {
        loop {
            let Some(next) = self.pending().first().cloned() else {
                return 0;
            };
            let mut conn = self.conn.clone();
            let job = next.clone();
            if self
                .run(PURGE_TIMEOUT, async move { execute(&mut conn, &job).await })
                .await
                .is_err()
            {
                return self.pending().len();
            }
            self.stats.purge_ok.fetch_add(1, Ordering::Relaxed);
            let mut pending = self.pending();
            if let Some(i) = pending.iter().position(|p| *p == next) {
                pending.remove(i);
            }
        }
    }

    /// Purges waiting to reach Redis.
    pub fn pending_purges(&self) -> usize {
        self.pending().len()
    }

    /// Registers for the wake-up of `channel` (before looking at the lease, so a wake-up
    /// between the two is not missed).
    pub fn wake_waiter(&self, channel: &str) -> WakeWaiter<'_> {
        let rx = self
            .wakeups
            .0
            .entry(channel.to_string())
            .or_insert_with(|| tokio::sync::watch::Sender::new(None))
            .subscribe();
        WakeWaiter {
            wakeups: &self.wakeups,
            channel: channel.to_string(),
            rx,
        }
    }

    /// For a miss this instance leads: the variants stored for `key`, else the lease on the
    /// flight (`lease_key`, woken through `channel`) if it is free — atomically, so a holder
    /// that stored its copy and let go in between cannot be missed. `Err` when Redis cannot
    /// say (no tier in the path, or a pending purge covers `key`).
    pub async fn look_or_lease(
        &self,
        key: &str,
        lease_key: &str,
        channel: &str,
    ) -> Result<Look, ()> {
        let (origin, path) = split_key(key);
        if self.pending().iter().any(|p| p.covers(origin, path)) {
            self.stats.get_skipped.fetch_add(1, Ordering::Relaxed);
            return Err(());
        }
        let token = lease_token();
        let mut invocation = self.look_or_lease.prepare_invoke();
        invocation
            .key(variants_key(key))
            .key(lease_key)
            .key(index_key(path))
            .arg(&token)
            .arg(LEASE.as_millis() as u64)
            .arg(origin);
        let mut conn = self.conn.clone();
        let result = self
            .run(self.timeout, async move {
                invocation
                    .invoke_async::<(i64, Vec<Vec<u8>>)>(&mut conn)
                    .await
            })
            .await;
        let counter = match &result {
            Ok((1, _)) => &self.stats.get_hit,
            Ok(_) => &self.stats.get_miss,
            Err(Skipped::BreakerOpen) => &self.stats.get_skipped,
            Err(Skipped::Failed) => &self.stats.get_error,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        match result {
            Ok((1, values)) => Ok(Look::Stored(values)),
            Ok((2, _)) => {
                self.stats.lease_tries.fetch_add(1, Ordering::Relaxed);
                Ok(Look::Leased(Lease {
                    key: lease_key.to_string(),
                    channel: channel.to_string(),
                    token,
                }))
            }
            Ok(_) => {
                self.stats.lease_tries.fetch_add(1, Ordering::Relaxed);
                Ok(Look::Held)
            }
            Err(_) => Err(()),
        }
    }

    /// Takes the lease on a flight (`SET NX PX`): `Ok(Some)` when this instance is to fetch
    /// for the fleet, `Ok(None)` when another holds it, `Err` when Redis cannot say.
    pub async fn take_lease(&self, lease_key: &str, channel: &str) -> Result<Option<Lease>, ()> {
        let token = lease_token();
        let mut conn = self.conn.clone();
        let cmd = redis::cmd("SET")
            .arg(lease_key)
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(LEASE.as_millis() as u64)
            .clone();
        let got = self
            .run(self.timeout, async move {
                cmd.query_async::<Option<String>>(&mut conn).await
            })
            .await
            .map_err(drop)?;
        self.stats.lease_tries.fetch_add(1, Ordering::Relaxed);
        Ok(got.map(|_| Lease {
            key: lease_key.to_string(),
            channel: channel.to_string(),
            token,
        }))
    }

    /// Keeps `lease` alive until the future is dropped (renewed every third of [`LEASE`]).
    pub async fn keep(&self, lease: &Lease) {
        let mut tick = tokio::time::interval(LEASE / 3);
        tick.tick().await;
        loop {
            tick.tick().await;
            let mut invocation = self.renew.prepare_invoke();
            invocation
                .key(&lease.key)
                .arg(&lease.token)
                .arg(LEASE.as_millis() as u64);
            let mut conn = self.conn.clone();
            let _ = self
                .run(self.timeout, async move {
                    invocation.invoke_async::<i64>(&mut conn).await
                })
                .await;
        }
    }

    /// Tells the waiters how the fetch ended, then gives the lease back.
    pub async fn finish(&self, lease: &Lease, wake: Wake) {
        let mut conn = self.conn.clone();
        let publish = redis::cmd("PUBLISH")
            .arg(&lease.channel)
            .arg(wake.as_str())
            .clone();
        let _ = self
            .run(self.timeout, async move {
                publish.query_async::<i64>(&mut conn).await
            })
            .await;
        let mut invocation = self.release.prepare_invoke();
        invocation.key(&lease.key).arg(&lease.token);
        let mut conn = self.conn.clone();
        let _ = self
            .run(self.timeout, async move {
                invocation.invoke_async::<i64>(&mut conn).await
            })
            .await;
    }

    /// Announces a purge this instance applied to the others; its id, to count their
    /// acknowledgements ([`SharedTier::acks`]). `None` when Redis could not be reached.
    pub async fn announce(&self, prefix: bool, path: &str, host: Option<&str>) -> Option<String> {
        let id = lease_token();
        // The acknowledgement set and the stream are in different Cluster slots: two round
        // trips (this one's own acknowledgement first, so the set exists before anyone reads
        // the announcement).
        let acks = format!("ec1:acks:{id}");
        let mut pipe = redis::pipe();
        pipe.cmd("SADD").arg(&acks).arg(&self.instance).ignore();
        pipe.cmd("EXPIRE").arg(&acks).arg(60).ignore();
        let mut invocation = self.announce.prepare_invoke();
        invocation
            .key(PURGES)
            .arg(STREAM_MAXLEN)
            .arg("id")
            .arg(&id)
            .arg("from")
            .arg(&self.instance)
            .arg("kind")
            .arg(if prefix { "prefix" } else { "path" })
            .arg("path")
            .arg(path)
            .arg("host")
            .arg(host.unwrap_or(""));
        let mut conn = self.conn.clone();
        self.run(PURGE_TIMEOUT, async move {
            pipe.query_async::<()>(&mut conn).await?;
            invocation.invoke_async::<String>(&mut conn).await
        })
        .await
        .ok()
        .map(|_| id)
    }

    /// How many live instances (this one included) acknowledged purge `id`, and how many are
    /// live, once all did or `within` passed.
    pub async fn acks(&self, id: &str, within: Duration) -> (usize, usize) {
        let deadline = Instant::now() + within;
        let key = format!("ec1:acks:{id}");
        let mut last = (1, 1);
        loop {
            let since = now_ms().saturating_sub(ALIVE.as_millis() as u64);
            // Two keys in different Cluster slots: two commands, sent together.
            let scard = redis::cmd("SCARD").arg(&key).clone();
            let zcount = redis::cmd("ZCOUNT")
                .arg(INSTANCES)
                .arg(since)
                .arg("+inf")
                .clone();
            let (mut c1, mut c2) = (self.conn.clone(), self.conn.clone());
            if let Ok((acks, live)) = self
                .run(self.timeout, async move {
                    tokio::try_join!(
                        scard.query_async::<usize>(&mut c1),
                        zcount.query_async::<usize>(&mut c2)
                    )
                })
                .await
            {
                last = (acks, live.max(1));
                self.stats.last_live.store(live as u64, Ordering::Relaxed);
                if acks >= live {
                    return last;
                }
            }
            if Instant::now() >= deadline {
                return last;
            }
            // Acknowledgements arrive within a few ms of the announcement; this is the admin
            // path, never a client's.
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Says this instance is alive every second (for acknowledgement counts). Runs until
    /// shutdown (a stopped instance drops out of the count 3 s later).
    pub async fn heartbeat(&self) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let now = now_ms();
            let mut pipe = redis::pipe();
            pipe.cmd("ZADD")
                .arg(INSTANCES)
                .arg(now)
                .arg(&self.instance)
                .ignore();
            pipe.cmd("ZREMRANGEBYSCORE")
                .arg(INSTANCES)
                .arg("-inf")
                .arg(now.saturating_sub(60_000))
                .ignore();
            let mut conn = self.conn.clone();
            let _ = self
                .run(self.timeout, async move {
                    pipe.query_async::<()>(&mut conn).await
                })
                .await;
        }
    }

    /// Reads the purge stream from this instance's cursor and hands other instances' purges
    /// to `sink`, acknowledging each; reconnects after a failure and replays from the cursor.
    /// If purges were lost in between (trimmed, or Redis restarted empty), tells `sink` to
    /// drop everything. Runs until shutdown.
    pub async fn run_purges(&self, sink: &dyn PurgeSink) {
        use redis::streams::{StreamRangeReply, StreamReadReply};
        // None: not connected yet (start from the newest entry, nothing was missed).
        let mut cursor: Option<String> = None;
        let mut backoff = Duration::from_millis(100);
        loop {
            let Ok(mut conn) = self.backend.reader_conn().await else {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            };
            // Where the stream starts now: a cursor older than that missed purges.
            let first: Result<StreamRangeReply, _> = redis::cmd("XRANGE")
                .arg(PURGES)
                .arg("-")
                .arg("+")
                .arg("COUNT")
                .arg(1)
                .query_async(&mut conn)
                .await;
            let Ok(first) = first else {
                tokio::time::sleep(backoff).await;
                continue;
            };
            match (&cursor, first.ids.first()) {
                (None, _) => {
                    let last: Result<StreamRangeReply, _> = redis::cmd("XREVRANGE")
                        .arg(PURGES)
                        .arg("+")
                        .arg("-")
                        .arg("COUNT")
                        .arg(1)
                        .query_async(&mut conn)
                        .await;
                    let Ok(last) = last else {
                        tokio::time::sleep(backoff).await;
                        continue;
                    };
                    cursor = Some(last.ids.first().map_or("0-0".into(), |e| e.id.clone()));
                }
                (Some(c), Some(oldest)) if c != "0-0" && stream_id_before(c, &oldest.id) => {
                    tracing::warn!("purges were trimmed before this instance read them: dropping its memory tier");
                    sink.missed();
                    cursor = Some("0-0".into());
                }
                (Some(c), None) if c != "0-0" => {
                    tracing::warn!("the purge stream is gone (Redis restarted empty?): dropping this instance's memory tier");
                    sink.missed();
                    cursor = Some("0-0".into());
                }
                _ => {}
            }
            backoff = Duration::from_millis(100);
            loop {
                let from = cursor.clone().unwrap_or_else(|| "0-0".into());
                let read: Result<Option<StreamReadReply>, _> = redis::cmd("XREAD")
                    .arg("COUNT")
                    .arg(100)
                    .arg("BLOCK")
                    .arg(1000)
                    .arg("STREAMS")
                    .arg(PURGES)
                    .arg(&from)
                    .query_async(&mut conn)
                    .await;
                let Ok(read) = read else { break };
                let Some(read) = read else { continue };
                for entry in read.keys.into_iter().flat_map(|k| k.ids) {
                    let get = |f: &str| entry.get::<String>(f).unwrap_or_default();
                    if get("kind") == "genesis" {
                        // The stream was begun anew after this instance's cursor: what was
                        // announced in the old one after the cursor may be lost (evicted).
                        if cursor.as_deref().is_some_and(|c| c != "0-0") {
                            tracing::warn!("the purge stream was lost and begun anew (evicted?): dropping this instance's memory tier");
                            sink.missed();
                        }
                        cursor = Some(entry.id.clone());
                        continue;
                    }
                    let msg = PurgeMsg {
                        id: get("id"),
                        from: get("from"),
                        prefix: get("kind") == "prefix",
                        path: get("path"),
                        host: Some(get("host")).filter(|h| !h.is_empty()),
                    };
                    if msg.from != self.instance {
                        sink.apply(&msg);
                        let acks = format!("ec1:acks:{}", msg.id);
                        let _ = redis::pipe()
                            .cmd("SADD")
                            .arg(&acks)
                            .arg(&self.instance)
                            .ignore()
                            .cmd("EXPIRE")
                            .arg(&acks)
                            .arg(60)
                            .ignore()
                            .query_async::<()>(&mut conn)
                            .await;
                    }
                    cursor = Some(entry.id.clone());
                }
            }
            tokio::time::sleep(backoff).await;
        }
    }

    /// Listens for wake-ups (`PSUBSCRIBE ec1:c:*`) and hands them to the waiters; reconnects
    /// after a failure. Runs until shutdown.
    pub async fn run_wakeups(&self) {
        use futures_util::StreamExt;
        let mut backoff = Duration::from_millis(100);
        // In a Cluster, the next seed after one that failed.
        let servers = self.backend.pubsub_clients();
        let mut next = 0;
        loop {
            let client = &servers[next % servers.len()];
            next += 1;
            match client.get_async_pubsub().await {
                Ok(mut pubsub) => match pubsub.psubscribe("ec1:c:*").await {
                    Ok(()) => {
                        backoff = Duration::from_millis(100);
                        let mut messages = pubsub.into_on_message();
                        while let Some(msg) = messages.next().await {
                            let wake = match msg.get_payload_bytes() {
                                b"stored" => Wake::Stored,
                                _ => Wake::Pass,
                            };
                            if let Some(tx) = self.wakeups.0.get(msg.get_channel_name()) {
                                tx.send_replace(Some(wake));
                            }
                        }
                        tracing::debug!("redis wake-up subscription ended; reconnecting");
                    }
                    Err(e) => tracing::debug!(error = %e, "redis PSUBSCRIBE failed"),
                },
                Err(e) => tracing::debug!(error = %e, "redis pub/sub connection failed"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }
}

/// Why an operation did not reach Redis.
enum Skipped {
    BreakerOpen,
    Failed,
}

/// Carries out one purge.
/// Carries out one purge. Prefix purges and "everything" scan the whole keyspace: in a
/// Cluster, every master (each holds only its own slots' keys).
async fn execute(conn: &mut Conn, what: &Pending) -> redis::RedisResult<()> {
    let (pattern, prefix) = match what {
        Pending::Path { path, host } => {
            return purge_index(conn, &index_key(path), host.as_deref()).await
        }
        Pending::Prefix(prefix) => (index_pattern(prefix), Some(prefix.as_str())),
        Pending::Everything => ("ec1:*".to_string(), None),
    };
    for node in conn.scan_nodes().await? {
        let mut cursor: u64 = 0;
        loop {
            let (next, keys) = conn.scan_page(&node, cursor, &pattern).await?;
            match prefix {
                Some(prefix) => {
                    for key in keys {
                        if index_path(&key).is_some_and(|p| p.starts_with(prefix)) {
                            purge_index(conn, &key, None).await?;
                        }
                    }
                }
                // In a Cluster, redis-rs splits a DEL of keys of several slots into one per
                // slot (a single command may not span slots).
                None if !keys.is_empty() => {
                    redis::cmd("DEL").arg(&keys).query_async::<()>(conn).await?;
                }
                None => {}
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    Ok(())
}

/// Deletes the variants of the path an index key is for, under `host` (`None`: all), and
/// those origins from the index.
async fn purge_index(conn: &mut Conn, index: &str, host: Option<&str>) -> redis::RedisResult<()> {
    let Some(path) = index_path(index) else {
        return Ok(());
    };
    let stored: Vec<String> = redis::cmd("SMEMBERS").arg(index).query_async(conn).await?;
    let chosen: Vec<&String> = stored
        .iter()
        .filter(|o| host.is_none_or(|h| origin_host(o) == h))
        .collect();
    if chosen.is_empty() {
        return Ok(());
    }
    let mut pipe = redis::pipe();
    for origin in &chosen {
        pipe.cmd("DEL")
            .arg(variants_key(&format!("{origin}{path}")))
            .ignore();
    }
    pipe.cmd("SREM").arg(index).arg(&chosen).ignore();
    pipe.query_async::<()>(conn).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

    #[test]
    fn the_breaker_opens_backs_off_and_lets_one_trial_through() {
        let t0 = Instant::now();
        let mut b = Breaker::default();
        for _ in 0..FAILURES_TO_OPEN - 1 {
            assert!(b.allow(t0));
            b.failure(t0);
        }
        assert!(!b.is_open(), "not yet");
        b.failure(t0);
        assert!(b.is_open());
        assert!(!b.allow(t0 + Duration::from_millis(999)));
        assert!(b.allow(t0 + FIRST_BACKOFF), "one trial after the back-off");
        assert!(!b.allow(t0 + FIRST_BACKOFF), "only one");
        b.failure(t0 + FIRST_BACKOFF);
        assert!(!b.allow(t0 + FIRST_BACKOFF * 2), "the back-off doubled");
        assert!(b.allow(t0 + FIRST_BACKOFF * 3));
        b.success();
        assert!(!b.is_open());
        assert!(b.allow(t0));
        // The back-off stops growing at the cap.
        let mut b = Breaker::default();
        let mut now = t0;
        for _ in 0..FAILURES_TO_OPEN {
            b.failure(now);
        }
        for _ in 0..10 {
            now += MAX_BACKOFF;
            assert!(b.allow(now));
            b.failure(now);
        }
        assert!(b.allow(now + MAX_BACKOFF));
    }

    #[test]
    fn keys_share_a_slot_per_path_and_index_keys_name_their_path() {
        let v = variants_key("https://a.example/x?y=1");
        let i = index_key("/x?y=1");
        let tag = path_tag("/x?y=1");
        assert_eq!(v, format!("ec1:{{{tag}}}:v:https://a.example"));
        assert_eq!(i, format!("ec1:{{{tag}}}:i:/x?y=1"));
        assert_eq!(index_path(&i), Some("/x?y=1"));
        assert_eq!(index_path(&v), None);
        assert_eq!(index_path("ec1:{zz}:i:/x"), None);
        assert_eq!(index_pattern("/a*[b]?\\"), "ec1:*:i:/a\\*\\[b\\]\\?\\\\*");
    }

    #[test]
    fn variant_fields_tell_vary_selections_apart() {
        let none = VaryKey::default();
        assert!(variant_field(&none).is_empty());
        let mut gzip = HeaderMap::new();
        gzip.insert("accept-encoding", "gzip".parse().unwrap());
        let a = VaryKey::capture(["accept-encoding"].into_iter(), &gzip);
        let b = VaryKey::capture(["accept-encoding"].into_iter(), &HeaderMap::new());
        assert_ne!(
            variant_field(&a),
            variant_field(&b),
            "absent differs from present"
        );
        assert_eq!(variant_field(&a), variant_field(&a.clone()));
        assert_eq!(variant_field(&a).len(), 16);
    }

    #[test]
    fn pending_purges_cover_what_they_name() {
        let p = Pending::Path {
            path: "/x".into(),
            host: Some("a".into()),
        };
        assert!(p.covers("http://a", "/x"));
        assert!(p.covers("https://a", "/x"));
        assert!(!p.covers("http://b", "/x"));
        assert!(!p.covers("http://a", "/xy"));
        let all = Pending::Path {
            path: "/x".into(),
            host: None,
        };
        assert!(all.covers("http://b", "/x"));
        assert!(Pending::Prefix("/a/".into()).covers("http://z", "/a/b"));
        assert!(!Pending::Prefix("/a/".into()).covers("http://z", "/b"));
        assert!(Pending::Everything.covers("http://z", "/"));
    }
}
