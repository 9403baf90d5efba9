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

    // (c) The same for an ETag edgecache generated (the origin sent none).
    let zipped = get(front, NO_ETAG, &[("accept-encoding", "gzip")]).await;
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

/// Decodes a gzip member (RFC 1952) and checks its CRC-32 and length trailer.
fn gunzip(data: &[u8]) -> Vec<u8> {
    assert!(data.len() >= 18, "too short for gzip: {} bytes", data.len());
    assert_eq!(&data[..3], &[0x1f, 0x8b, 8], "not a gzip/deflate stream");
    let flags = data[3];
    let mut pos = 10;
    if flags & 4 != 0 {
        let xlen = usize::from(u16::from_le_bytes([data[pos], data[pos + 1]]));
        pos += 2 + xlen;
    }
    for flag in [8, 16] {
        if flags & flag != 0 {
            pos += data[pos..]
                .iter()
                .position(|&b| b == 0)
                .expect("unterminated field")
                + 1;
        }
    }
    if flags & 2 != 0 {
        pos += 2;
    }
    let (out, used) = inflate(&data[pos..]);
    let trailer = &data[pos + used..];
    assert!(trailer.len() >= 8, "gzip trailer missing");
    let crc = u32::from_le_bytes(trailer[..4].try_into().unwrap());
    let size = u32::from_le_bytes(trailer[4..8].try_into().unwrap());
    assert_eq!(crc, crc32(&out), "gzip CRC-32 mismatch");
    assert_eq!(size, out.len() as u32, "gzip ISIZE mismatch");
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// LSB-first bit reader over a DEFLATE stream.
struct Bits<'a> {
    data: &'a [u8],
    pos: usize,
    buf: u32,
    count: u32,
}

impl Bits<'_> {
    fn take(&mut self, n: u32) -> u32 {
        while self.count < n {
            let byte = *self.data.get(self.pos).expect("truncated deflate stream");
            self.buf |= u32::from(byte) << self.count;
            self.pos += 1;
            self.count += 8;
        }
        let v = self.buf & ((1u32 << n) - 1);
        self.buf >>= n;
        self.count -= n;
        v
    }
}

/// A canonical Huffman code: how many codes of each length, and symbols in code order.
struct Huffman {
    counts: [u16; 16],
    symbols: Vec<u16>,
}

impl Huffman {
    fn new(lengths: &[u8]) -> Huffman {
        let mut counts = [0u16; 16];
        for &l in lengths {
            counts[usize::from(l)] += 1;
        }
        counts[0] = 0;
        let mut offsets = [0usize; 16];
        for len in 1..15 {
            offsets[len + 1] = offsets[len] + usize::from(counts[len]);
        }
        let mut symbols = vec![0u16; lengths.len()];
        for (sym, &l) in lengths.iter().enumerate() {
            if l != 0 {
                symbols[offsets[usize::from(l)]] = sym as u16;
                offsets[usize::from(l)] += 1;
            }
        }
        Huffman { counts, symbols }
    }

    fn decode(&self, bits: &mut Bits) -> u16 {
        let (mut code, mut first, mut index) = (0i32, 0i32, 0i32);
        for len in 1..16 {
            code |= bits.take(1) as i32;
            let count = i32::from(self.counts[len]);
            if code - first < count {
                return self.symbols[(index + code - first) as usize];
            }
            index += count;
            first = (first + count) << 1;
            code <<= 1;
        }
        panic!("invalid Huffman code in deflate stream");
    }
}

const LEN_BASE: [u16; 29] = [
    3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 15, 17, 19, 23, 27, 31, 35, 43, 51, 59, 67, 83, 99, 115, 131,
    163, 195, 227, 258,
];
const LEN_EXTRA: [u8; 29] = [
    0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4, 4, 5, 5, 5, 5, 0,
];
const DIST_BASE: [u16; 30] = [
    1, 2, 3, 4, 5, 7, 9, 13, 17, 25, 33, 49, 65, 97, 129, 193, 257, 385, 513, 769, 1025, 1537,
    2049, 3073, 4097, 6145, 8193, 12289, 16385, 24577,
];
const DIST_EXTRA: [u8; 30] = [
    0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13,
    13,
];

/// A minimal DEFLATE (RFC 1951) decoder, enough to check nginx's gzip output without adding a
/// crate. Returns the decoded bytes and how many input bytes the stream used.
fn inflate(data: &[u8]) -> (Vec<u8>, usize) {
    let mut bits = Bits {
        data,
        pos: 0,
        buf: 0,
        count: 0,
    };
    let mut out = Vec::new();
    loop {
        let last = bits.take(1) == 1;
        match bits.take(2) {
            0 => {
                // Stored block: byte-aligned LEN, NLEN, then LEN raw bytes.
                bits.buf = 0;
                bits.count = 0;
                let p = bits.pos;
                let len = usize::from(u16::from_le_bytes([data[p], data[p + 1]]));
                let nlen = u16::from_le_bytes([data[p + 2], data[p + 3]]);
                assert_eq!(len as u16, !nlen, "stored block length check");
                out.extend_from_slice(&data[p + 4..p + 4 + len]);
                bits.pos = p + 4 + len;
            }
            1 => {
                let mut lengths = [0u8; 288];
                lengths[..144].fill(8);
                lengths[144..256].fill(9);
                lengths[256..280].fill(7);
                lengths[280..].fill(8);
                let lit = Huffman::new(&lengths);
                let dist = Huffman::new(&[5u8; 30]);
                inflate_block(&mut bits, &mut out, &lit, &dist);
            }
            2 => {
                let (lit, dist) = dynamic_tables(&mut bits);
                inflate_block(&mut bits, &mut out, &lit, &dist);
            }
            _ => panic!("invalid deflate block type"),
        }
        if last {
            return (out, bits.pos);
        }
    }
}

fn dynamic_tables(bits: &mut Bits) -> (Huffman, Huffman) {
    const ORDER: [usize; 19] = [
        16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15,
    ];
    let nlit = bits.take(5) as usize + 257;
    let ndist = bits.take(5) as usize + 1;
    let ncode = bits.take(4) as usize + 4;
    let mut code_lengths = [0u8; 19];
    for &i in &ORDER[..ncode] {
        code_lengths[i] = bits.take(3) as u8;
    }
    let code = Huffman::new(&code_lengths);
    let mut lengths = Vec::with_capacity(nlit + ndist);
    while lengths.len() < nlit + ndist {
        match code.decode(bits) {
            sym @ 0..=15 => lengths.push(sym as u8),
            16 => {
                let prev = *lengths.last().expect("repeat with no previous length");
                let n = 3 + bits.take(2);
                lengths.extend((0..n).map(|_| prev));
            }
            17 => {
                let n = 3 + bits.take(3);
                lengths.extend((0..n).map(|_| 0));
            }
            _ => {
                let n = 11 + bits.take(7);
                lengths.extend((0..n).map(|_| 0));
            }
        }
    }
    assert_eq!(lengths.len(), nlit + ndist, "code lengths overrun");
    (
        Huffman::new(&lengths[..nlit]),
        Huffman::new(&lengths[nlit..]),
    )
}

fn inflate_block(bits: &mut Bits, out: &mut Vec<u8>, lit: &Huffman, dist: &Huffman) {
    loop {
        let sym = lit.decode(bits);
        match sym {
            0..=255 => out.push(sym as u8),
            256 => return,
            _ => {
                let i = usize::from(sym - 257);
                let len = usize::from(LEN_BASE[i]) + bits.take(u32::from(LEN_EXTRA[i])) as usize;
                let d = usize::from(dist.decode(bits));
                let back = usize::from(DIST_BASE[d]) + bits.take(u32::from(DIST_EXTRA[d])) as usize;
                assert!(back <= out.len(), "deflate distance too far back");
                let start = out.len() - back;
                for k in 0..len {
                    out.push(out[start + k]);
                }
            }
        }
    }
}

/// The test's own gunzip decodes known streams (fixed Huffman codes with a back-reference,
/// and a stored block); dynamic Huffman blocks are what nginx sends above, checked by CRC-32.
#[test]
fn gunzip_decodes_known_streams() {
    // `printf 'hello hello hello hello' | gzip -n`
    let fixed = [
        0x1f, 0x8b, 0x08, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x03, 0xcb, 0x48, 0xcd, 0xc9, 0xc9,
        0x57, 0xc8, 0x40, 0x27, 0x01, 0xe3, 0x51, 0x3d, 0x8d, 0x17, 0x00, 0x00, 0x00,
    ];
    assert_eq!(gunzip(&fixed), b"hello hello hello hello");
    // A stored block: "abc".
    let mut stored = vec![
        0x1f, 0x8b, 0x08, 0, 0, 0, 0, 0, 0, 0xff, 0x01, 0x03, 0x00, 0xfc, 0xff,
    ];
    stored.extend_from_slice(b"abc");
    stored.extend_from_slice(&crc32(b"abc").to_le_bytes());
    stored.extend_from_slice(&3u32.to_le_bytes());
    assert_eq!(gunzip(&stored), b"abc");
}
