//! A real `redis-server` as a child process for the fleet tests: on a free loopback port, no
//! persistence, its own directory; killed on drop. [`RedisServer::cmd`] runs a command over a
//! raw RESP connection (a tiny encoder and reader: enough for simple, error, integer, bulk
//! and array replies), so tests can look into the shared tier without a client library.

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::process::{Guard, TempDir, DEADLINE};

/// The binary; CI installs it (`.ci/run`) when missing.
pub const REDIS_SERVER: &str = "redis-server";

/// How long one RESP command from a test may take.
const CMD_TIMEOUT: Duration = Duration::from_secs(5);

/// A RESP reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resp {
    Simple(String),
    Error(String),
    Int(i64),
    /// `None` is the null bulk string (`$-1`).
    Bulk(Option<Vec<u8>>),
    /// `None` is the null array (`*-1`).
    Array(Option<Vec<Resp>>),
}

impl Resp {
    /// The integer of an integer reply; panics on anything else.
    pub fn int(&self) -> i64 {
        match self {
            Resp::Int(n) => *n,
            other => panic!("expected an integer reply, got {other:?}"),
        }
    }

    /// A simple or bulk string as text; panics on anything else.
    pub fn text(&self) -> String {
        match self {
            Resp::Simple(s) => s.clone(),
            Resp::Bulk(Some(b)) => String::from_utf8_lossy(b).into_owned(),
            other => panic!("expected a string reply, got {other:?}"),
        }
    }

    /// The elements of an array reply (none for the null array); panics on anything else.
    pub fn items(&self) -> Vec<Resp> {
        match self {
            Resp::Array(items) => items.clone().unwrap_or_default(),
            other => panic!("expected an array reply, got {other:?}"),
        }
    }

    /// Every byte string in this reply (nested arrays flattened, integers and errors left out).
    pub fn bytes(&self) -> Vec<Vec<u8>> {
        match self {
            Resp::Simple(s) => vec![s.as_bytes().to_vec()],
            Resp::Bulk(Some(b)) => vec![b.clone()],
            Resp::Array(Some(items)) => items.iter().flat_map(Resp::bytes).collect(),
            _ => Vec::new(),
        }
    }
}

/// Encodes `args` as a RESP array of bulk strings.
pub fn encode(args: &[&[u8]]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        out.extend_from_slice(a);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// Reads one RESP reply.
pub fn read_reply(r: &mut impl BufRead) -> std::io::Result<Resp> {
    let mut line = Vec::new();
    r.read_until(b'\n', &mut line)?;
    if !line.ends_with(b"\r\n") {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("truncated RESP line {:?}", String::from_utf8_lossy(&line)),
        ));
    }
    let body = String::from_utf8_lossy(&line[1..line.len() - 2]).into_owned();
    let len = || -> std::io::Result<i64> {
        body.parse().map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("bad RESP length {body:?}"),
            )
        })
    };
    Ok(match line[0] {
        b'+' => Resp::Simple(body.clone()),
        b'-' => Resp::Error(body.clone()),
        b':' => Resp::Int(len()?),
        b'$' => match len()? {
            n if n < 0 => Resp::Bulk(None),
            n => {
                let mut buf = vec![0; n as usize + 2];
                r.read_exact(&mut buf)?;
                buf.truncate(n as usize);
                Resp::Bulk(Some(buf))
            }
        },
        b'*' => match len()? {
            n if n < 0 => Resp::Array(None),
            n => Resp::Array(Some(
                (0..n)
                    .map(|_| read_reply(r))
                    .collect::<std::io::Result<_>>()?,
            )),
        },
        other => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("unknown RESP type byte {:?}", char::from(other)),
            ))
        }
    })
}

/// Sends one command to `addr` on a fresh connection and reads its reply.
pub fn command(addr: SocketAddr, args: &[&[u8]]) -> std::io::Result<Resp> {
    let mut stream = TcpStream::connect_timeout(&addr, CMD_TIMEOUT)?;
    stream.set_read_timeout(Some(CMD_TIMEOUT))?;
    stream.set_write_timeout(Some(CMD_TIMEOUT))?;
    stream.write_all(&encode(args))?;
    read_reply(&mut BufReader::new(stream))
}

/// [`command`] over TLS, trusting only `tls.ca_pem` (rustls with `ring`, host name
/// `127.0.0.1`), presenting `tls.client` when set.
pub fn command_tls(addr: SocketAddr, tls: &TlsClient, args: &[&[u8]]) -> std::io::Result<Resp> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let ca_pem = &tls.ca_pem;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots
            .add(cert.map_err(std::io::Error::other)?)
            .map_err(std::io::Error::other)?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .with_root_certificates(roots);
    let config = match &tls.client {
        None => config.with_no_client_auth(),
        Some((cert, key)) => {
            let chain = CertificateDer::pem_slice_iter(cert)
                .collect::<Result<Vec<_>, _>>()
                .map_err(std::io::Error::other)?;
            let key = PrivateKeyDer::from_pem_slice(key).map_err(std::io::Error::other)?;
            config
                .with_client_auth_cert(chain, key)
                .map_err(std::io::Error::other)?
        }
    };
    let name = ServerName::try_from(addr.ip().to_string()).map_err(std::io::Error::other)?;
    let conn = rustls::ClientConnection::new(std::sync::Arc::new(config), name)
        .map_err(std::io::Error::other)?;
    let sock = TcpStream::connect_timeout(&addr, CMD_TIMEOUT)?;
    sock.set_read_timeout(Some(CMD_TIMEOUT))?;
    sock.set_write_timeout(Some(CMD_TIMEOUT))?;
    let mut stream = rustls::StreamOwned::new(conn, sock);
    stream.write_all(&encode(args))?;
    stream.flush()?;
    read_reply(&mut BufReader::new(stream))
}

/// What the harness needs to talk to a TLS Redis: the CA to trust, and the client
/// certificate and key (PEM) to present when the server asks for one.
#[derive(Clone)]
pub struct TlsClient {
    pub ca_pem: Vec<u8>,
    pub client: Option<(Vec<u8>, Vec<u8>)>,
}

/// Certificates for a `rediss://` server, made with rcgen in `dir`: a CA, a server
/// certificate it signed for `127.0.0.1` and `localhost`, a client certificate it signed (for
/// mutual TLS), and another CA that signed nothing here (the "wrong CA").
pub struct TlsFiles {
    pub ca: std::path::PathBuf,
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub client_cert: std::path::PathBuf,
    pub client_key: std::path::PathBuf,
    pub wrong_ca: std::path::PathBuf,
    pub ca_pem: Vec<u8>,
    client_pem: (Vec<u8>, Vec<u8>),
    _dir: TempDir,
}

impl TlsFiles {
    pub fn generate() -> TlsFiles {
        use rcgen::{
            BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair,
            KeyUsagePurpose,
        };
        let dir = TempDir::new("redis-tls");
        let new_ca = |name: &str| {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            params.distinguished_name.push(DnType::CommonName, name);
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
        };
        let ca = new_ca("edgecache test CA");
        let wrong_ca = new_ca("edgecache wrong CA");
        let server_key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, "redis");
        let server = params.signed_by(&server_key, &ca).unwrap();
        let client_key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "edgecache");
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let client = params.signed_by(&client_key, &ca).unwrap();
        let write = |name: &str, pem: String| {
            let path = dir.path.join(name);
            fs::write(&path, pem).unwrap();
            path
        };
        TlsFiles {
            ca: write("ca.pem", ca.pem()),
            cert: write("redis.crt", server.pem()),
            key: write("redis.key", server_key.serialize_pem()),
            client_cert: write("client.crt", client.pem()),
            client_key: write("client.key", client_key.serialize_pem()),
            wrong_ca: write("wrong-ca.pem", wrong_ca.pem()),
            ca_pem: ca.pem().into_bytes(),
            client_pem: (
                client.pem().into_bytes(),
                client_key.serialize_pem().into_bytes(),
            ),
            _dir: dir,
        }
    }
}

/// Whether something on `addr` answers `PING` with `+PONG` (the inline form, as the brief
/// for readiness asks: a plain `PING\r\n`).
pub fn pings(addr: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).is_ok() && line.starts_with("+PONG")
}

/// A running `redis-server` (or, between [`RedisServer::kill`] and
/// [`RedisServer::restart`], the port one ran on).
pub struct RedisServer {
    pub port: u16,
    /// Extra arguments, kept for restarts.
    extra: Vec<String>,
    /// TLS only (`--port 0 --tls-port PORT`): the CA's PEM, to talk to it.
    tls_ca: Option<TlsClient>,
    dir: TempDir,
    child: Option<Guard>,
}

impl RedisServer {
    /// Starts one with the defaults (no persistence, loopback only).
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    /// Starts one with extra arguments, e.g. `["--maxmemory", "2mb", "--maxmemory-policy",
    /// "allkeys-lru"]`. Panics, saying how to install it, when `redis-server` is missing:
    /// the fleet tests must not pass by skipping.
    pub fn start_with(extra: &[&str]) -> RedisServer {
        Self::start_inner(extra, None)
    }

    /// Starts one that speaks only TLS (`rediss://`), with `tls`'s server certificate; clients
    /// are not asked for certificates.
    pub fn start_tls(tls: &TlsFiles) -> RedisServer {
        Self::start_tls_with(tls, false)
    }

    /// Starts one that speaks only TLS and asks every client for a certificate signed by
    /// `tls`'s CA (`tls-auth-clients yes`, mutual TLS); the harness presents `tls`'s client
    /// certificate.
    pub fn start_tls_mutual(tls: &TlsFiles) -> RedisServer {
        Self::start_tls_with(tls, true)
    }

    fn start_tls_with(tls: &TlsFiles, mutual: bool) -> RedisServer {
        let path = |p: &std::path::Path| p.to_str().unwrap().to_string();
        let (cert, key, ca) = (path(&tls.cert), path(&tls.key), path(&tls.ca));
        let extra = [
            "--tls-cert-file",
            &cert,
            "--tls-key-file",
            &key,
            "--tls-ca-cert-file",
            &ca,
            "--tls-auth-clients",
            if mutual { "yes" } else { "no" },
        ];
        let client = TlsClient {
            ca_pem: tls.ca_pem.clone(),
            client: mutual.then(|| tls.client_pem.clone()),
        };
        Self::start_inner(&extra, Some(client))
    }

    fn start_inner(extra: &[&str], tls_ca: Option<TlsClient>) -> RedisServer {
        require_redis_server();
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        // A port is picked by binding :0 and letting go of it, so someone else may take it
        // before redis binds it: then redis exits ("Address already in use") and another is
        // picked.
        let mut last_log = String::new();
        for _ in 0..5 {
            let mut server = RedisServer {
                port: free_port(),
                extra: extra.clone(),
                tls_ca: tls_ca.clone(),
                dir: TempDir::new("redis"),
                child: None,
            };
            match server.spawn_and_wait() {
                Ok(()) => return server,
                Err(log) => last_log = log,
            }
        }
        panic!("redis-server did not start on a free port in 5 tries; last log:\n{last_log}");
    }

    /// `redis://127.0.0.1:PORT` (`rediss://` for a TLS server).
    pub fn url(&self) -> String {
        let scheme = if self.tls_ca.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Whether the server process is running (started and not killed).
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.0.try_wait(), Ok(None)))
    }

    /// SIGKILLs the server (by its PID) and reaps it: the port refuses connections afterwards.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.0.kill();
            let _ = child.0.wait();
        }
    }

    /// Starts it again on the same port (empty: nothing is persisted), after [`kill`]. Retries
    /// until [`DEADLINE`] if the port is briefly unavailable.
    ///
    /// [`kill`]: RedisServer::kill
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + DEADLINE;
        loop {
            match self.spawn_and_wait() {
                Ok(()) => return,
                Err(log) if Instant::now() >= deadline => {
                    panic!("redis-server did not restart on port {}:\n{log}", self.port)
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Runs one command; panics if the server cannot be reached or answers with an error.
    pub fn cmd(&self, args: &[&str]) -> Resp {
        let raw: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        let reply = match &self.tls_ca {
            None => command(self.addr(), &raw),
            Some(ca) => command_tls(self.addr(), ca, &raw),
        };
        match reply {
            Ok(Resp::Error(e)) => panic!("redis {args:?}: error reply {e}"),
            Ok(reply) => reply,
            Err(e) => panic!("redis {args:?}: {e}"),
        }
    }

    /// `DBSIZE`.
    pub fn dbsize(&self) -> i64 {
        self.cmd(&["DBSIZE"]).int()
    }

    /// `KEYS pattern`, as text (lossy for binary keys).
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        let mut keys: Vec<String> = self
            .cmd(&["KEYS", pattern])
            .items()
            .iter()
            .map(Resp::text)
            .collect();
        keys.sort();
        keys
    }

    /// Every byte string stored under `key`, whatever its type (string, hash, list, set,
    /// sorted set; anything else as `DUMP`): to look for a marker in what was stored.
    pub fn contents(&self, key: &str) -> Vec<Vec<u8>> {
        let reply = match self.cmd(&["TYPE", key]).text().as_str() {
            "none" => return Vec::new(),
            "string" => self.cmd(&["GET", key]),
            "hash" => self.cmd(&["HGETALL", key]),
            "list" => self.cmd(&["LRANGE", key, "0", "-1"]),
            "set" => self.cmd(&["SMEMBERS", key]),
            "zset" => self.cmd(&["ZRANGE", key, "0", "-1"]),
            _ => self.cmd(&["DUMP", key]),
        };
        reply.bytes()
    }

    /// What redis-server logged so far (for failure messages).
    pub fn log(&self) -> String {
        fs::read_to_string(self.dir.path.join("redis.log")).unwrap_or_default()
    }

    /// Spawns the server on `self.port` and waits until it answers PING; on failure (it
    /// exited, or did not answer within [`DEADLINE`]) kills it and returns its log.
    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let log_path = self.dir.path.join("redis.log");
        let log = fs::File::create(&log_path).unwrap();
        let port = self.port.to_string();
        let mut cmd = Command::new(REDIS_SERVER);
        match self.tls_ca {
            None => cmd.args(["--port", &port]),
            Some(_) => cmd.args(["--port", "0", "--tls-port", &port]),
        };
        cmd.args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no", "--logfile", ""])
            .arg("--dir")
            .arg(&self.dir.path)
            .args(&self.extra)
            .current_dir(&self.dir.path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        let mut child = Guard::spawn(REDIS_SERVER, cmd);
        let addr = self.addr();
        let deadline = Instant::now() + DEADLINE;
        let answers = |addr| match &self.tls_ca {
            None => pings(addr),
            Some(ca) => {
                command_tls(addr, ca, &[b"PING"]).is_ok_and(|r| r == Resp::Simple("PONG".into()))
            }
        };
        loop {
            if answers(addr) {
                // Ours, not something else on the port: it is still running.
                if let Ok(None) = child.0.try_wait() {
                    self.child = Some(child);
                    return Ok(());
                }
            }
            if let Ok(Some(status)) = child.0.try_wait() {
                let log = fs::read_to_string(&log_path).unwrap_or_default();
                return Err(format!("redis-server exited ({status}):\n{log}"));
            }
            if Instant::now() >= deadline {
                drop(child);
                let log = fs::read_to_string(&log_path).unwrap_or_default();
                return Err(format!(
                    "redis-server not answering PING after {DEADLINE:?}:\n{log}"
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Panics with how to install `redis-server` if it cannot be run.
pub fn require_redis_server() {
    match Command::new(REDIS_SERVER)
        .arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
    {
        Ok(status) if status.success() => {}
        Ok(status) => panic!("`redis-server --version` failed ({status})"),
        Err(e) => panic!(
            "redis-server is required by the fleet tests but cannot be run ({e}): \
             install it, e.g. `apt-get install -y redis-server` (.ci/run does this)"
        ),
    }
}

/// A loopback port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A Redis Cluster of `masters` real `redis-server --cluster-enabled yes` processes on free
/// loopback ports, no replicas: the 16,384 slots split evenly (`CLUSTER ADDSLOTSRANGE`), the
/// nodes introduced to each other (`CLUSTER MEET`, with an explicit bus port: the default
/// port + 10000 may not exist for a high port); started only once every node reports
/// `cluster_state:ok` and knows every other.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start(masters: usize) -> RedisCluster {
        Self::start_nodes(masters, masters, 5000)
    }

    /// A cluster of `masters` masters, each with one replica (`CLUSTER REPLICATE`), whose
    /// nodes consider a silent node failed after `node_timeout_ms` — a master that dies is
    /// replaced by its replica about that long later. `nodes[..masters]` are the masters,
    /// `nodes[masters + i]` is master `i`'s replica. Started once every replica is linked to
    /// its master.
    pub fn start_with_replicas(masters: usize, node_timeout_ms: u64) -> RedisCluster {
        let cluster = Self::start_nodes(masters, 2 * masters, node_timeout_ms);
        for i in 0..masters {
            let id = cluster.nodes[i].cmd(&["CLUSTER", "MYID"]).text();
            let reply = cluster.nodes[masters + i].cmd(&["CLUSTER", "REPLICATE", &id]);
            assert_eq!(reply, Resp::Simple("OK".into()));
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let linked = (0..masters).all(|i| {
                let info = cluster.nodes[masters + i]
                    .cmd(&["INFO", "replication"])
                    .text();
                info.contains("role:slave") && info.contains("master_link_status:up")
            });
            if linked {
                return cluster;
            }
            assert!(
                Instant::now() < deadline,
                "the replicas did not link to their masters within 30 s: {}",
                cluster.nodes[masters].cmd(&["INFO", "replication"]).text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `count` nodes, the slots split over the first `masters`, all introduced to each other.
    fn start_nodes(masters: usize, count: usize, node_timeout_ms: u64) -> RedisCluster {
        let timeout = node_timeout_ms.to_string();
        let nodes: Vec<RedisServer> = (0..count)
            .map(|_| {
                let bus = free_port().to_string();
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    &timeout,
                    "--cluster-port",
                    &bus,
                ])
            })
            .collect();
        let per = 16384 / masters;
        for (i, node) in nodes.iter().take(masters).enumerate() {
            let first = i * per;
            let last = if i + 1 == masters {
                16383
            } else {
                first + per - 1
            };
            let reply = node.cmd(&[
                "CLUSTER",
                "ADDSLOTSRANGE",
                &first.to_string(),
                &last.to_string(),
            ]);
            assert_eq!(reply, Resp::Simple("OK".into()));
        }
        for node in &nodes[1..] {
            let bus = node
                .extra
                .iter()
                .skip_while(|a| *a != "--cluster-port")
                .nth(1)
                .unwrap()
                .clone();
            let reply =
                nodes[0].cmd(&["CLUSTER", "MEET", "127.0.0.1", &node.port.to_string(), &bus]);
            assert_eq!(reply, Resp::Simple("OK".into()));
        }
        let cluster = RedisCluster { nodes };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = cluster.nodes.iter().all(|n| {
                let info = n.cmd(&["CLUSTER", "INFO"]).text();
                info.contains("cluster_state:ok")
                    && info.contains(&format!("cluster_known_nodes:{count}\r"))
                    && info.contains("cluster_slots_assigned:16384")
            });
            if ready {
                return cluster;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster did not form within 30 s: {}",
                cluster.nodes[0].cmd(&["CLUSTER", "INFO"]).text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `redis+cluster://127.0.0.1:P1,127.0.0.1:P2`: the first two nodes as seeds (the client
    /// learns the others from them).
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self
            .nodes
            .iter()
            .take(2)
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis+cluster://{}", seeds.join(","))
    }

    /// The node that holds `key`'s slot (the ranges are the ones [`RedisCluster::start`]
    /// assigned; nothing moves slots in these tests). Not for a cluster with replicas.
    pub fn owner(&self, key: &str) -> &RedisServer {
        let slot = self.nodes[0].cmd(&["CLUSTER", "KEYSLOT", key]).int() as usize;
        let per = 16384 / self.nodes.len();
        &self.nodes[(slot / per).min(self.nodes.len() - 1)]
    }

    /// Whether node `i` (running) is a master now (`ROLE`).
    pub fn is_master(&self, i: usize) -> bool {
        matches!(self.nodes[i].cmd(&["ROLE"]).items().first(), Some(r) if r.text() == "master")
    }

    /// `KEYS pattern` over every node.
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        let mut keys: Vec<String> = self.nodes.iter().flat_map(|n| n.keys(pattern)).collect();
        keys.sort();
        keys
    }
}
