//! One stored variant as one self-contained, versioned binary blob: the value of the shared
//! second tier (issue 13, "fleet mode on Redis") and, later, the in-memory representation.
//! Pure functions, no I/O: [`encode`] a [`CachedResponse`], [`decode`] (or
//! [`decode_shared`]) it back into the [`NewEntry`] that rebuilds it, in this process or
//! another one. Decoding never panics, whatever the bytes: anything that is not a blob
//! [`encode`] wrote is a [`DecodeError`].
//!
//! # Format, version 1
//!
//! Integers are unsigned LEB128 varints (7 bits a byte, low group first, at most 10 bytes)
//! unless said otherwise. A *string* is a varint length followed by that many bytes.
//!
//! | field | encoding |
//! |---|---|
//! | magic | the 2 bytes `EC` |
//! | version | 1 byte, [`VERSION`] (another value: [`DecodeError::Version`]) |
//! | flags | 1 byte, the bits below; an undefined combination is an error |
//! | key | string: the primary key it was stored under, checked against the caller's |
//! | status | varint, 100–999 |
//! | stored | varint: wall-clock ms since the UNIX epoch when it was stored (below) |
//! | initial age | varint ms, rounded **up** |
//! | lifetime | varint ms, rounded down |
//! | stale-while-revalidate | varint ms, rounded down |
//! | stale-if-error | varint ms, rounded down |
//! | ETag | string, only with [`flags::ETAG_EXPLICIT`] |
//! | upstream ETag | string, only with [`flags::UPSTREAM_ETAG_EXPLICIT`] |
//! | upstream Last-Modified | string, only with [`flags::UPSTREAM_LM_EXPLICIT`] |
//! | last modified | only with [`flags::LAST_MODIFIED_EXPLICIT`]: varint 0 (none) or 1 followed by varint seconds and varint nanoseconds since the epoch |
//! | Vary | varint count, then per header a *name* and a value tag: 0 when the request lacked the header, else 1 + the length, followed by the captured value |
//! | headers | varint count, then per field line a *name* and a string value, in the map's order (repeated names stay in order) |
//! | body | string: all pieces concatenated; it ends the blob, trailing bytes are an error |
//!
//! A *name* is a varint tag: odd, it is entry `tag >> 1` of the fixed table of common field
//! names ([`NAMES`], 1 byte instead of the name); even, a literal lowercase name of
//! `tag >> 1` bytes follows. The table is part of version 1: changing it needs a new version.
//!
//! The flags say which validators are derived instead of spelled out, so the usual entry
//! stores none of them twice:
//!
//! * the served ETag is the headers' `ETag` unless [`flags::ETAG_EXPLICIT`];
//! * the upstream's ETag is absent without [`flags::UPSTREAM_ETAG`], the served one without
//!   [`flags::UPSTREAM_ETAG_EXPLICIT`];
//! * the upstream's `Last-Modified` is absent without [`flags::UPSTREAM_LM`], the headers'
//!   `Last-Modified` without [`flags::UPSTREAM_LM_EXPLICIT`];
//! * the parsed last-modified time is the headers' `Last-Modified` as
//!   [`policy::http_date`] reads it unless [`flags::LAST_MODIFIED_EXPLICIT`].
//!
//! (A `304` can leave them apart: the stored `ETag` header is kept while the upstream's new
//! one is what is sent when revalidating.)
//!
//! # Times
//!
//! `stored_at` is a monotonic [`Instant`], meaningless in another process, so the blob holds
//! the wall-clock time it stands for: `wall - (now - stored_at)`, and decoding puts it back
//! as `now - (wall - stored)` (both `now`/`wall` pairs are the caller's, for deterministic
//! tests). A `stored` time in the future (clock skew between hosts) counts as `now`. Should
//! the monotonic clock not reach back that far (it can on platforms whose `Instant` starts
//! at boot), the entry is placed at `now` and the missing time is added to its initial age:
//! its age and freshness stay exact, only a long-expired entry looks as if it expired just
//! now. Durations are whole milliseconds, rounded so that a decoded entry is never fresher
//! than the original (at most ~2 ms older). No last-access time is kept: a blob is written
//! once per stored version, and the tier that reads it records its own accesses.
//!
//! # Size
//!
//! The key, the header values, the captured `Vary` values and the body, plus about 40 bytes
//! of framing for a typical response: a 1 KiB body with 6 headers (114 bytes of values), a
//! 37-byte key and `Vary: accept-encoding` is 1,216 bytes (the
//! `typical_1_kib_entry_is_compact` test).
//!
//! # Bodies
//!
//! [`decode`] copies the body out of the blob into one piece of its own, so the blob can go.
//! [`decode_shared`] slices a large body out of a shared blob instead (no copy of a
//! multi-megabyte body; the blob's other bytes are then kept alive with it).

use std::error::Error;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;
use tokio::time::Instant;

use super::entry::{CachedResponse, NewEntry};
use super::key::VaryKey;
use super::policy;
use crate::body::Pieces;

/// The first bytes of every blob.
pub const MAGIC: [u8; 2] = *b"EC";
/// The format version this module writes (and the only one it reads so far).
pub const VERSION: u8 = 1;

/// The bits of the flags byte.
pub mod flags {
    /// The response forbids serving it stale.
    pub const FORBIDS_STALE: u8 = 1 << 0;
    /// The lifetime is the operator's default TTL.
    pub const OPERATOR_TTL: u8 = 1 << 1;
    /// The served ETag follows (else: the headers' `ETag`).
    pub const ETAG_EXPLICIT: u8 = 1 << 2;
    /// The upstream sent an ETag.
    pub const UPSTREAM_ETAG: u8 = 1 << 3;
    /// The upstream's ETag follows (else: the served one). Only with `UPSTREAM_ETAG`.
    pub const UPSTREAM_ETAG_EXPLICIT: u8 = 1 << 4;
    /// The upstream sent a `Last-Modified`.
    pub const UPSTREAM_LM: u8 = 1 << 5;
    /// The upstream's `Last-Modified` follows (else: the headers'). Only with `UPSTREAM_LM`.
    pub const UPSTREAM_LM_EXPLICIT: u8 = 1 << 6;
    /// The parsed last-modified time follows (else: parsed from the headers).
    pub const LAST_MODIFIED_EXPLICIT: u8 = 1 << 7;
}

/// Field names written as one table index (version 1; never reorder or change).
pub static NAMES: [HeaderName; 40] = [
    header::ACCEPT_RANGES,
    header::ACCESS_CONTROL_ALLOW_ORIGIN,
    header::AGE,
    header::CACHE_CONTROL,
    header::CONTENT_DISPOSITION,
    header::CONTENT_ENCODING,
    header::CONTENT_LANGUAGE,
    header::CONTENT_LENGTH,
    header::CONTENT_LOCATION,
    header::CONTENT_RANGE,
    header::CONTENT_SECURITY_POLICY,
    header::CONTENT_TYPE,
    header::DATE,
    header::ETAG,
    header::EXPIRES,
    header::LAST_MODIFIED,
    header::LINK,
    header::LOCATION,
    header::SERVER,
    header::SET_COOKIE,
    header::STRICT_TRANSPORT_SECURITY,
    header::VARY,
    header::VIA,
    header::X_CONTENT_TYPE_OPTIONS,
    header::X_FRAME_OPTIONS,
    header::ACCEPT_ENCODING,
    header::ACCEPT_LANGUAGE,
    header::ACCEPT,
    header::COOKIE,
    header::AUTHORIZATION,
    header::USER_AGENT,
    header::ORIGIN,
    header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
    header::ACCESS_CONTROL_EXPOSE_HEADERS,
    header::REFERRER_POLICY,
    header::X_XSS_PROTECTION,
    header::ALT_SVC,
    HeaderName::from_static("cdn-cache-control"),
    HeaderName::from_static("surrogate-control"),
    HeaderName::from_static("surrogate-key"),
];

/// Why a blob could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// It does not start with [`MAGIC`]: not an entry blob.
    Magic,
    /// A format version this build cannot read.
    Version(u8),
    /// It ends before a field does (or a length runs past its end).
    Truncated,
    /// A varint longer than 10 bytes or over `u64::MAX`, or a number out of its range.
    Varint,
    /// Bytes after the body.
    Trailing(usize),
    /// Undefined flag bits or combination.
    Flags(u8),
    /// It was stored under another key (a hash collision in the shared tier).
    KeyMismatch,
    /// Not a valid status code.
    Status(u64),
    /// An invalid field name (or a table index past [`NAMES`]).
    HeaderName,
    /// An invalid field value.
    HeaderValue,
    /// More field lines than a header map holds.
    TooManyHeaders,
    /// A validator derived from a header (`ETag`, `Last-Modified`) that is absent.
    MissingHeader(HeaderName),
    /// A last-modified time that is out of range.
    Time,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Magic => f.write_str("not a cache entry (bad magic)"),
            DecodeError::Version(v) => write!(f, "unsupported cache entry format version {v}"),
            DecodeError::Truncated => f.write_str("cache entry truncated"),
            DecodeError::Varint => f.write_str("malformed or out-of-range number"),
            DecodeError::Trailing(n) => write!(f, "{n} trailing bytes after the cache entry"),
            DecodeError::Flags(b) => write!(f, "invalid cache entry flags {b:#04x}"),
            DecodeError::KeyMismatch => f.write_str("cache entry stored under another key"),
            DecodeError::Status(s) => write!(f, "invalid status code {s}"),
            DecodeError::HeaderName => f.write_str("invalid header name"),
            DecodeError::HeaderValue => f.write_str("invalid header value"),
            DecodeError::TooManyHeaders => f.write_str("too many header fields"),
            DecodeError::MissingHeader(n) => write!(f, "{n} header missing"),
            DecodeError::Time => f.write_str("last-modified time out of range"),
        }
    }
}

impl Error for DecodeError {}

/// Encodes a stored variant, stored under `key`, into one self-contained blob. `now` and
/// `wall` are the same moment on the monotonic and the wall clock.
pub fn encode(entry: &CachedResponse, key: &str, now: Instant, wall: SystemTime) -> Bytes {
    let served_etag = entry.headers.get(header::ETAG);
    let served_lm = entry.headers.get(header::LAST_MODIFIED);
    let mut fl = 0;
    let mut set = |bit: u8, on: bool| {
        if on {
            fl |= bit;
        }
    };
    set(flags::FORBIDS_STALE, entry.forbids_stale);
    set(flags::OPERATOR_TTL, entry.operator_ttl);
    let etag_explicit = served_etag != Some(&entry.etag);
    set(flags::ETAG_EXPLICIT, etag_explicit);
    set(flags::UPSTREAM_ETAG, entry.upstream_etag.is_some());
    let upstream_etag = entry.upstream_etag.as_ref().filter(|e| **e != entry.etag);
    set(flags::UPSTREAM_ETAG_EXPLICIT, upstream_etag.is_some());
    set(flags::UPSTREAM_LM, entry.upstream_last_modified.is_some());
    let upstream_lm = entry
        .upstream_last_modified
        .as_ref()
        .filter(|lm| Some(*lm) != served_lm);
    set(flags::UPSTREAM_LM_EXPLICIT, upstream_lm.is_some());
    let lm_explicit =
        policy::http_date(&entry.headers, header::LAST_MODIFIED) != entry.last_modified;
    set(flags::LAST_MODIFIED_EXPLICIT, lm_explicit);

    let header_bytes: usize = entry
        .headers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum();
    let mut out = Vec::with_capacity(
        96 + key.len()
            + entry.etag.len() * 2
            + header_bytes
            + entry.vary.heap_size()
            + entry.body.len(),
    );
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(fl);
    put_bytes(&mut out, key.as_bytes());
    put_varint(&mut out, u64::from(entry.status.as_u16()));
    let held = now.saturating_duration_since(entry.stored_at);
    let stored = wall.checked_sub(held).unwrap_or(UNIX_EPOCH);
    put_varint(
        &mut out,
        ms_down(stored.duration_since(UNIX_EPOCH).unwrap_or_default()),
    );
    put_varint(&mut out, ms_up(entry.initial_age));
    put_varint(&mut out, ms_down(entry.lifetime));
    put_varint(&mut out, ms_down(entry.stale_while_revalidate));
    put_varint(&mut out, ms_down(entry.stale_if_error));
    if etag_explicit {
        put_bytes(&mut out, entry.etag.as_bytes());
    }
    if let Some(e) = upstream_etag {
        put_bytes(&mut out, e.as_bytes());
    }
    if let Some(lm) = upstream_lm {
        put_bytes(&mut out, lm.as_bytes());
    }
    if lm_explicit {
        match entry.last_modified {
            None => put_varint(&mut out, 0),
            Some(t) => {
                let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
                put_varint(&mut out, 1);
                put_varint(&mut out, since.as_secs());
                put_varint(&mut out, u64::from(since.subsec_nanos()));
            }
        }
    }
    put_varint(&mut out, entry.vary.names().len() as u64);
    for (name, value) in entry.vary.names().iter().zip(entry.vary.values()) {
        put_name(&mut out, name);
        match value {
            None => put_varint(&mut out, 0),
            Some(v) => {
                put_varint(&mut out, v.len() as u64 + 1);
                out.extend_from_slice(v);
            }
        }
    }
    put_varint(&mut out, entry.headers.len() as u64);
    for (name, value) in &entry.headers {
        put_name(&mut out, name);
        put_bytes(&mut out, value.as_bytes());
    }
    put_varint(&mut out, entry.body.len() as u64);
    for piece in entry.body.as_slice() {
        out.extend_from_slice(piece);
    }
    Bytes::from(out)
}

/// Decodes a blob written by [`encode`] (any supported version) that was stored under `key`;
/// the body is copied out, so the blob can be dropped. `now` and `wall` are the same moment
/// on the monotonic and the wall clock.
pub fn decode(
    blob: &[u8],
    key: &str,
    now: Instant,
    wall: SystemTime,
) -> Result<NewEntry, DecodeError> {
    decode_with(blob, key, now, wall, Bytes::copy_from_slice)
}

/// [`decode`] from a shared blob: a large body becomes a slice of `blob` (no copy, the blob's
/// few hundred other bytes stay alive with it); a small one, where those bytes would be a
/// large share of what is kept, is copied like [`decode`] does.
pub fn decode_shared(
    blob: &Bytes,
    key: &str,
    now: Instant,
    wall: SystemTime,
) -> Result<NewEntry, DecodeError> {
    decode_with(blob, key, now, wall, |body| {
        let rest = blob.len() - body.len();
        if rest <= body.len() / 16 {
            blob.slice_ref(body)
        } else {
            Bytes::copy_from_slice(body)
        }
    })
}

/// The key a blob says it was stored under (without decoding the rest).
pub fn stored_key(blob: &[u8]) -> Result<&[u8], DecodeError> {
    let mut r = Reader { buf: blob };
    r.header()?;
    r.bytes()
}

fn decode_with<'a>(
    blob: &'a [u8],
    key: &str,
    now: Instant,
    wall: SystemTime,
    body: impl FnOnce(&'a [u8]) -> Bytes,
) -> Result<NewEntry, DecodeError> {
    let mut r = Reader { buf: blob };
    let fl = r.header()?;
    let has = |bit: u8| fl & bit != 0;
    if (has(flags::UPSTREAM_ETAG_EXPLICIT) && !has(flags::UPSTREAM_ETAG))
        || (has(flags::UPSTREAM_LM_EXPLICIT) && !has(flags::UPSTREAM_LM))
    {
        return Err(DecodeError::Flags(fl));
    }
    if r.bytes()? != key.as_bytes() {
        return Err(DecodeError::KeyMismatch);
    }
    let status = r.varint()?;
    let status = u16::try_from(status)
        .ok()
        .and_then(|s| StatusCode::from_u16(s).ok())
        .ok_or(DecodeError::Status(status))?;
    let stored_ms = r.varint()?;
    let initial_age = Duration::from_millis(r.varint()?);
    let lifetime = Duration::from_millis(r.varint()?);
    let stale_while_revalidate = Duration::from_millis(r.varint()?);
    let stale_if_error = Duration::from_millis(r.varint()?);
    let etag = has(flags::ETAG_EXPLICIT).then(|| r.value()).transpose()?;
    let upstream_etag = has(flags::UPSTREAM_ETAG_EXPLICIT)
        .then(|| r.value())
        .transpose()?;
    let upstream_lm = has(flags::UPSTREAM_LM_EXPLICIT)
        .then(|| r.value())
        .transpose()?;
    let last_modified = has(flags::LAST_MODIFIED_EXPLICIT)
        .then(|| r.time())
        .transpose()?;

    let vary_count = r.count(2)?;
    let mut names = Vec::with_capacity(vary_count);
    let mut values = Vec::with_capacity(vary_count);
    for _ in 0..vary_count {
        names.push(r.name()?);
        values.push(match r.varint()? {
            0 => None,
            n => Some(Box::from(r.take(len(n - 1)?)?)),
        });
    }
    let vary = VaryKey::from_parts(names, values).ok_or(DecodeError::Truncated)?;

    let header_count = r.count(2)?;
    let mut headers =
        HeaderMap::try_with_capacity(header_count).map_err(|_| DecodeError::TooManyHeaders)?;
    for _ in 0..header_count {
        let name = r.name()?;
        let value = r.value()?;
        headers
            .try_append(name, value)
            .map_err(|_| DecodeError::TooManyHeaders)?;
    }
    let body_bytes = r.bytes()?;
    if !r.buf.is_empty() {
        return Err(DecodeError::Trailing(r.buf.len()));
    }

    let etag = match etag {
        Some(e) => e,
        None => headers
            .get(header::ETAG)
            .cloned()
            .ok_or(DecodeError::MissingHeader(header::ETAG))?,
    };
    let upstream_etag =
        has(flags::UPSTREAM_ETAG).then(|| upstream_etag.unwrap_or_else(|| etag.clone()));
    let upstream_last_modified = if has(flags::UPSTREAM_LM) {
        Some(match upstream_lm {
            Some(lm) => lm,
            None => headers
                .get(header::LAST_MODIFIED)
                .cloned()
                .ok_or(DecodeError::MissingHeader(header::LAST_MODIFIED))?,
        })
    } else {
        None
    };
    let last_modified =
        last_modified.unwrap_or_else(|| policy::http_date(&headers, header::LAST_MODIFIED));

    // Back onto this process's monotonic clock.
    let elapsed = UNIX_EPOCH
        .checked_add(Duration::from_millis(stored_ms))
        .and_then(|stored| wall.duration_since(stored).ok())
        .unwrap_or(Duration::ZERO);
    let (stored_at, initial_age) = rebase(now.checked_sub(elapsed), now, elapsed, initial_age);

    Ok(NewEntry {
        status,
        headers,
        body: Pieces::from(body(body_bytes)),
        etag,
        last_modified,
        upstream_etag,
        upstream_last_modified,
        vary,
        stored_at,
        initial_age,
        lifetime,
        forbids_stale: has(flags::FORBIDS_STALE),
        stale_while_revalidate,
        stale_if_error,
        operator_ttl: has(flags::OPERATOR_TTL),
    })
}

/// `stored_at` and `initial_age` for an entry stored `elapsed` before `now`, given
/// `now.checked_sub(elapsed)`: when the monotonic clock cannot go back that far, the entry
/// is placed at `now` and keeps its age through its initial age instead.
fn rebase(
    back: Option<Instant>,
    now: Instant,
    elapsed: Duration,
    initial_age: Duration,
) -> (Instant, Duration) {
    match back {
        Some(at) => (at, initial_age),
        None => (now, initial_age.saturating_add(elapsed)),
    }
}

fn ms_down(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn ms_up(d: Duration) -> u64 {
    u64::try_from(d.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    put_varint(out, b.len() as u64);
    out.extend_from_slice(b);
}

fn put_name(out: &mut Vec<u8>, name: &HeaderName) {
    match NAMES.iter().position(|n| n == name) {
        Some(i) => put_varint(out, ((i as u64) << 1) | 1),
        None => {
            put_varint(out, (name.as_str().len() as u64) << 1);
            out.extend_from_slice(name.as_str().as_bytes());
        }
    }
}

/// A varint length as `usize`.
fn len(n: u64) -> Result<usize, DecodeError> {
    usize::try_from(n).map_err(|_| DecodeError::Truncated)
}

/// Reads fields off the front of the blob; every read checks what is left.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Magic and version; returns the flags byte.
    fn header(&mut self) -> Result<u8, DecodeError> {
        if self.take(2).map_err(|_| DecodeError::Magic)? != MAGIC {
            return Err(DecodeError::Magic);
        }
        match self.take(1)?[0] {
            VERSION => {}
            v => return Err(DecodeError::Version(v)),
        }
        Ok(self.take(1)?[0])
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if n > self.buf.len() {
            return Err(DecodeError::Truncated);
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    fn varint(&mut self) -> Result<u64, DecodeError> {
        let mut v: u64 = 0;
        for i in 0..10 {
            let b = self.take(1)?[0];
            if i == 9 && b > 1 {
                return Err(DecodeError::Varint);
            }
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(DecodeError::Varint)
    }

    /// A length-prefixed byte string.
    fn bytes(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.varint()?;
        self.take(len(n)?)
    }

    /// A count of items each at least `min_size` bytes long, checked against what is left
    /// before anything is allocated for them.
    fn count(&mut self, min_size: usize) -> Result<usize, DecodeError> {
        let n = len(self.varint()?)?;
        if n > self.buf.len() / min_size {
            return Err(DecodeError::Truncated);
        }
        Ok(n)
    }

    fn value(&mut self) -> Result<HeaderValue, DecodeError> {
        HeaderValue::from_bytes(self.bytes()?).map_err(|_| DecodeError::HeaderValue)
    }

    fn name(&mut self) -> Result<HeaderName, DecodeError> {
        let tag = self.varint()?;
        if tag & 1 == 1 {
            let i = usize::try_from(tag >> 1).map_err(|_| DecodeError::HeaderName)?;
            return NAMES.get(i).cloned().ok_or(DecodeError::HeaderName);
        }
        let name = self.take(len(tag >> 1)?)?;
        HeaderName::from_bytes(name).map_err(|_| DecodeError::HeaderName)
    }

    /// An explicit last-modified time: 0, or 1 + seconds + nanoseconds since the epoch.
    fn time(&mut self) -> Result<Option<SystemTime>, DecodeError> {
        match self.varint()? {
            0 => Ok(None),
            1 => {
                let secs = self.varint()?;
                let nanos = u32::try_from(self.varint()?)
                    .ok()
                    .filter(|n| *n < 1_000_000_000)
                    .ok_or(DecodeError::Time)?;
                UNIX_EPOCH
                    .checked_add(Duration::new(secs, nanos))
                    .map(Some)
                    .ok_or(DecodeError::Time)
            }
            _ => Err(DecodeError::Time),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "http://example.com/assets/app.css?v=3";

    fn wall0() -> SystemTime {
        UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789)
    }

    fn hv(s: &str) -> HeaderValue {
        HeaderValue::from_str(s).unwrap()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut m = HeaderMap::new();
        for (k, v) in pairs {
            m.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), hv(v));
        }
        m
    }

    /// A full entry: repeated and unlisted header names, `Vary` with present, empty and
    /// absent values, every duration and flag set.
    fn full(now: Instant) -> NewEntry {
        let headers = headers(&[
            ("content-type", "text/css; charset=utf-8"),
            (
                "cache-control",
                "public, max-age=600, stale-while-revalidate=30",
            ),
            ("date", "Tue, 14 Nov 2023 22:13:20 GMT"),
            ("last-modified", "Mon, 13 Nov 2023 10:00:00 GMT"),
            ("etag", "\"v3\""),
            ("set-cookie", "a=1"),
            ("x-custom-thing", "one"),
            ("set-cookie", "b=2"),
            ("x-custom-thing", "two"),
            ("vary", "accept-encoding, x-absent, x-empty"),
            ("content-length", "5"),
        ]);
        let vary = VaryKey::capture(
            ["accept-encoding", "x-absent", "x-empty"].into_iter(),
            &self::headers(&[("accept-encoding", "gzip, br"), ("x-empty", "")]),
        );
        NewEntry {
            status: StatusCode::OK,
            last_modified: policy::http_date(&headers, header::LAST_MODIFIED),
            upstream_last_modified: headers.get(header::LAST_MODIFIED).cloned(),
            upstream_etag: Some(hv("\"v3\"")),
            etag: hv("\"v3\""),
            headers,
            body: Pieces::new(vec![Bytes::from_static(b"ab"), Bytes::from_static(b"cde")]),
            vary,
            stored_at: now.checked_sub(Duration::from_secs(7)).unwrap(),
            initial_age: Duration::from_millis(2_500),
            lifetime: Duration::from_secs(600),
            forbids_stale: true,
            stale_while_revalidate: Duration::from_secs(30),
            stale_if_error: Duration::from_millis(86_400_001),
            operator_ttl: true,
        }
    }

    fn stored(e: NewEntry) -> CachedResponse {
        CachedResponse::new(e, KEY.len(), 0)
    }

    /// Every field but the times equal.
    fn assert_same(got: &NewEntry, want: &CachedResponse) {
        assert_eq!(got.status, want.status);
        assert_eq!(got.headers, want.headers);
        let order = |h: &HeaderMap| -> Vec<(String, Vec<u8>)> {
            h.iter()
                .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
                .collect()
        };
        assert_eq!(order(&got.headers), order(&want.headers), "order kept");
        assert_eq!(got.body, want.body);
        assert_eq!(got.etag, want.etag);
        assert_eq!(got.last_modified, want.last_modified);
        assert_eq!(got.upstream_etag, want.upstream_etag);
        assert_eq!(got.upstream_last_modified, want.upstream_last_modified);
        assert_eq!(got.vary, want.vary);
        assert_eq!(got.lifetime, want.lifetime);
        assert_eq!(got.forbids_stale, want.forbids_stale);
        assert_eq!(got.stale_while_revalidate, want.stale_while_revalidate);
        assert_eq!(got.stale_if_error, want.stale_if_error);
        assert_eq!(got.operator_ttl, want.operator_ttl);
    }

    fn round_trip(e: NewEntry) -> (CachedResponse, NewEntry, Bytes) {
        let now = Instant::now();
        let original = stored(e);
        let blob = encode(&original, KEY, now, wall0());
        let back = decode(&blob, KEY, now, wall0()).unwrap();
        assert_same(&back, &original);
        assert_eq!(back.initial_age, original.initial_age);
        let drift = back.stored_at.saturating_duration_since(original.stored_at)
            + original.stored_at.saturating_duration_since(back.stored_at);
        assert!(drift <= Duration::from_millis(1), "{drift:?}");
        (original, back, blob)
    }

    #[test]
    fn a_full_entry_round_trips() {
        let now = Instant::now();
        let (original, back, blob) = round_trip(full(now));
        assert_eq!(&blob[..3], b"EC\x01");
        assert_eq!(back.vary.values().filter(Option::is_none).count(), 1);
        assert_eq!(back.vary.request_headers().len(), 2);
        // Validators are derived from the headers, not written twice.
        assert_eq!(blob[3] & flags::ETAG_EXPLICIT, 0);
        assert_eq!(blob[3] & flags::UPSTREAM_ETAG_EXPLICIT, 0);
        assert_eq!(blob[3] & flags::UPSTREAM_LM_EXPLICIT, 0);
        assert_eq!(blob[3] & flags::LAST_MODIFIED_EXPLICIT, 0);
        // Rebuilt, it is the same entry to the policy.
        let rebuilt = stored(back);
        let later = now + Duration::from_secs(100);
        assert_eq!(rebuilt.is_fresh(later), original.is_fresh(later));
        assert_eq!(rebuilt.revalidatable(), original.revalidatable());
        assert!(rebuilt.age(later) >= original.age(later));
        assert!(rebuilt.age(later) <= original.age(later) + Duration::from_millis(1));
    }

    #[test]
    fn generated_etag_and_no_validators_round_trip() {
        let now = Instant::now();
        let mut e = full(now);
        e.headers.remove(header::LAST_MODIFIED);
        e.headers
            .insert(header::ETAG, hv("\"0123456789abcdef0123456789abcdef\""));
        e.etag = hv("\"0123456789abcdef0123456789abcdef\"");
        e.upstream_etag = None;
        e.upstream_last_modified = None;
        e.last_modified = None;
        e.forbids_stale = false;
        e.operator_ttl = false;
        e.status = StatusCode::NOT_FOUND;
        e.vary = VaryKey::default();
        e.body = Pieces::default();
        let (_, back, blob) = round_trip(e);
        assert!(back.upstream_etag.is_none() && back.upstream_last_modified.is_none());
        assert!(back.body.is_empty());
        assert_eq!(blob[3] & (flags::UPSTREAM_ETAG | flags::UPSTREAM_LM), 0);
    }

    #[test]
    fn validators_that_differ_from_the_headers_are_written_out() {
        let now = Instant::now();
        // After a 304: the stored ETag header stays, the upstream's new one is sent next time.
        let mut e = full(now);
        e.upstream_etag = Some(hv("W/\"v4\""));
        e.upstream_last_modified = Some(hv("Sun, 12 Nov 2023 10:00:00 GMT"));
        e.last_modified = Some(UNIX_EPOCH + Duration::new(1_600_000_000, 5));
        let (_, _, blob) = round_trip(e);
        let explicit = flags::UPSTREAM_ETAG_EXPLICIT
            | flags::UPSTREAM_LM_EXPLICIT
            | flags::LAST_MODIFIED_EXPLICIT;
        assert_eq!(blob[3] & explicit, explicit);
        // A served ETag the headers lack; a Last-Modified header that was not the upstream's;
        // a parseable header whose time is not kept.
        let mut e = full(now);
        e.headers.remove(header::ETAG);
        e.upstream_etag = None;
        e.upstream_last_modified = None;
        e.last_modified = None;
        let (_, back, blob) = round_trip(e);
        assert_eq!(blob[3] & flags::ETAG_EXPLICIT, flags::ETAG_EXPLICIT);
        assert!(back.headers.contains_key(header::LAST_MODIFIED));
    }

    #[test]
    fn times_survive_another_process_clock() {
        let now = Instant::now();
        let original = stored(full(now));
        let blob = encode(&original, KEY, now, wall0());
        // Another process, an hour and a quarter second later, on another monotonic clock.
        let now2 = now + Duration::from_secs(86_400);
        let later = Duration::from_millis(3_600_250);
        let back = decode(&blob, KEY, now2, wall0() + later).unwrap();
        let want = original.age(now) + later;
        let got = stored(back).age(now2);
        assert!(
            got >= want && got <= want + Duration::from_millis(1),
            "{got:?} vs {want:?}"
        );

        // Written by a host whose clock is ahead: stored "in the future" counts as now.
        let back = decode(&blob, KEY, now2, wall0() - Duration::from_secs(60)).unwrap();
        assert_eq!(back.stored_at, now2);
        assert_eq!(back.initial_age, original.initial_age);

        // Durations round towards staleness, never fresher than the original.
        let mut e = full(now);
        e.initial_age = Duration::from_micros(1_500);
        e.lifetime = Duration::from_micros(60_000_900);
        let blob = encode(&stored(e), KEY, now, wall0());
        let back = decode(&blob, KEY, now, wall0()).unwrap();
        assert_eq!(back.initial_age, Duration::from_millis(2));
        assert_eq!(back.lifetime, Duration::from_millis(60_000));
    }

    #[test]
    fn an_unreachable_past_is_folded_into_the_initial_age() {
        let now = Instant::now();
        let (at, age) = rebase(None, now, Duration::from_secs(50), Duration::from_secs(3));
        assert_eq!((at, age), (now, Duration::from_secs(53)));
        let back = now.checked_sub(Duration::from_secs(1)).unwrap();
        let (at, age) = rebase(
            Some(back),
            now,
            Duration::from_secs(1),
            Duration::from_secs(3),
        );
        assert_eq!((at, age), (back, Duration::from_secs(3)));
        // A blob stored at the epoch decodes without panicking either way.
        let mut blob = encode(&stored(full(now)), KEY, now, wall0()).to_vec();
        let at = 4 + 1 + KEY.len() + 2; // magic, version, flags, key, status (2 bytes)
        let old = decode(&blob, KEY, now, wall0()).unwrap();
        blob.splice(at..at + 6, [0u8]);
        let back = decode(&blob, KEY, now, wall0()).unwrap();
        assert!(
            back.initial_age + now.saturating_duration_since(back.stored_at)
                > old.initial_age + Duration::from_secs(1_699_000_000)
        );
    }

    #[test]
    fn version_magic_and_key_are_checked() {
        let now = Instant::now();
        let blob = encode(&stored(full(now)), KEY, now, wall0());
        let mut v2 = blob.to_vec();
        v2[2] = 2;
        assert_eq!(
            decode(&v2, KEY, now, wall0()).err(),
            Some(DecodeError::Version(2))
        );
        let mut bad = blob.to_vec();
        bad[0] = b'X';
        assert_eq!(
            decode(&bad, KEY, now, wall0()).err(),
            Some(DecodeError::Magic)
        );
        assert_eq!(
            decode(b"", KEY, now, wall0()).err(),
            Some(DecodeError::Magic)
        );
        assert_eq!(
            decode(&blob, "http://example.com/other", now, wall0()).err(),
            Some(DecodeError::KeyMismatch)
        );
        assert_eq!(stored_key(&blob), Ok(KEY.as_bytes()));
        assert_eq!(
            DecodeError::Version(2).to_string(),
            "unsupported cache entry format version 2"
        );
    }

    /// `blob` with the fields after the flags replaced by `rest`.
    fn with_rest(flags: u8, rest: &[u8]) -> Vec<u8> {
        let mut b = b"EC\x01".to_vec();
        b.push(flags);
        put_bytes(&mut b, b"k");
        b.extend_from_slice(rest);
        b
    }

    #[test]
    fn malformed_fields_are_typed_errors() {
        let now = Instant::now();
        let d = |b: &[u8]| decode(b, "k", now, wall0()).err();
        let blob = encode(&stored(full(now)), KEY, now, wall0());
        let mut trailing = blob.to_vec();
        trailing.push(0);
        assert_eq!(
            decode(&trailing, KEY, now, wall0()).err(),
            Some(DecodeError::Trailing(1))
        );
        // status, stored, initial age, lifetime, swr, sie; no Vary; then the headers.
        let ok = |status: &[u8], headers: &[u8]| {
            let mut r = status.to_vec();
            r.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
            r.extend_from_slice(headers);
            r
        };
        let etag = [1, (13 << 1) | 1, 2, b'"', b'"', 0];
        assert!(decode(&with_rest(0, &ok(&[200, 1], &etag)), "k", now, wall0()).is_ok());
        assert_eq!(
            d(&with_rest(0, &ok(&[99], &etag))),
            Some(DecodeError::Status(99))
        );
        assert_eq!(
            d(&with_rest(0, &ok(&[0xe8, 0x07], &etag))),
            Some(DecodeError::Status(1000))
        );
        assert_eq!(
            d(&with_rest(0, &ok(&[200, 1], &[0, 0]))),
            Some(DecodeError::MissingHeader(header::ETAG))
        );
        let lm_flags = flags::ETAG_EXPLICIT | flags::UPSTREAM_LM;
        let mut explicit_etag = ok(&[200, 1], &[]);
        explicit_etag.splice(7..7, [2, b'"', b'"']);
        explicit_etag.extend_from_slice(&[0, 0]);
        assert!(d(&with_rest(flags::ETAG_EXPLICIT, &explicit_etag)).is_none());
        assert_eq!(
            d(&with_rest(lm_flags, &explicit_etag)),
            Some(DecodeError::MissingHeader(header::LAST_MODIFIED))
        );
        assert_eq!(
            d(&with_rest(flags::UPSTREAM_ETAG_EXPLICIT, &[])),
            Some(DecodeError::Flags(flags::UPSTREAM_ETAG_EXPLICIT))
        );
        // Header names and values.
        let bad_value = [1, (13 << 1) | 1, 2, b'\n', b'"', 0];
        assert_eq!(
            d(&with_rest(0, &ok(&[200, 1], &bad_value))),
            Some(DecodeError::HeaderValue)
        );
        let bad_name = [1, 4, b'a', b' ', 0, 0];
        assert_eq!(
            d(&with_rest(0, &ok(&[200, 1], &bad_name))),
            Some(DecodeError::HeaderName)
        );
        let empty_name = [1, 0, 0, 0];
        assert_eq!(
            d(&with_rest(0, &ok(&[200, 1], &empty_name))),
            Some(DecodeError::HeaderName)
        );
        let past_table = [1, (40 << 1) | 1, 0, 0];
        assert_eq!(
            d(&with_rest(0, &ok(&[200, 1], &past_table))),
            Some(DecodeError::HeaderName)
        );
        // Lengths and counts past the end, before anything is allocated for them.
        let huge_len = [1, (13 << 1) | 1, 0xff, 0xff, 0xff, 0xff, 0x0f, b'"'];
        assert_eq!(
            d(&with_rest(0, &ok(&[200, 1], &huge_len))),
            Some(DecodeError::Truncated)
        );
        let huge_count = [0xff, 0xff, 0xff, 0xff, 0x0f, 0, 0];
        assert_eq!(
            d(&with_rest(0, &ok(&[200, 1], &huge_count))),
            Some(DecodeError::Truncated)
        );
        let mut huge_key = b"EC\x01\x00".to_vec();
        huge_key.extend_from_slice(&[0xff; 9]);
        huge_key.push(0x01);
        assert_eq!(d(&huge_key), Some(DecodeError::Truncated));
        let mut long_varint = b"EC\x01\x00".to_vec();
        long_varint.extend_from_slice(&[0xff; 9]);
        long_varint.push(0x02);
        assert_eq!(d(&long_varint), Some(DecodeError::Varint));
        let mut eleven = b"EC\x01\x00".to_vec();
        eleven.extend_from_slice(&[0x80; 11]);
        assert_eq!(d(&eleven), Some(DecodeError::Varint));
        // An explicit last-modified time out of range.
        let mut bad_time = with_rest(flags::LAST_MODIFIED_EXPLICIT, &[200, 1, 0, 0, 0, 0, 0]);
        bad_time.extend_from_slice(&[1, 0]);
        put_varint(&mut bad_time, 1_000_000_000);
        assert_eq!(d(&bad_time), Some(DecodeError::Time));
    }

    #[test]
    fn every_truncation_is_an_error() {
        let now = Instant::now();
        let blob = encode(&stored(full(now)), KEY, now, wall0());
        for n in 0..blob.len() {
            assert!(decode(&blob[..n], KEY, now, wall0()).is_err(), "prefix {n}");
            assert!(decode_shared(&blob.slice(..n), KEY, now, wall0()).is_err());
        }
    }

    /// xorshift64*: deterministic pseudo-random bytes.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    /// Decodes `blob` every way, and re-encodes what decodes (it must decode the same, and
    /// be a fixed point: [`crate::fuzzing::exercise_entry_codec`]).
    fn never_panics(blob: &[u8], now: Instant) {
        crate::fuzzing::exercise_entry_codec(blob);
        let key = stored_key(blob)
            .ok()
            .and_then(|k| std::str::from_utf8(k).ok())
            .unwrap_or(KEY)
            .to_owned();
        let shared = decode_shared(&Bytes::copy_from_slice(blob), &key, now, wall0());
        match decode(blob, &key, now, wall0()) {
            Ok(e) => {
                assert!(shared.is_ok());
                let entry = stored(e);
                let again = encode(&entry, &key, now, wall0());
                assert_same(&decode(&again, &key, now, wall0()).unwrap(), &entry);
            }
            Err(err) => assert_eq!(shared.err(), Some(err)),
        }
    }

    #[test]
    fn random_bytes_never_panic() {
        let now = Instant::now();
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for i in 0..5_000 {
            let len = (rng.next() % 300) as usize;
            let mut blob: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
            if i % 2 == 0 {
                // Past the magic, so the fields behind it are exercised too.
                blob.splice(0..0, *b"EC\x01");
            }
            never_panics(&blob, now);
        }
    }

    #[test]
    fn flipped_bytes_never_panic() {
        let now = Instant::now();
        let blob = encode(&stored(full(now)), KEY, now, wall0());
        let mut rng = Rng(42);
        let mut decoded = 0;
        for at in 0..blob.len() {
            for mask in [0x01, 0x80, 0xff, rng.next() as u8 | 1] {
                let mut b = blob.to_vec();
                b[at] ^= mask;
                never_panics(&b, now);
                decoded += usize::from(decode(&b, KEY, now, wall0()).is_ok());
            }
        }
        // Flips in the body and in header values still decode: the fixed point is exercised.
        assert!(decoded > blob.len(), "{decoded} of {}", blob.len() * 4);
    }

    #[test]
    fn large_bodies_are_sliced_small_ones_copied() {
        let now = Instant::now();
        let mut e = full(now);
        e.headers.remove(header::CONTENT_LENGTH);
        e.body = Pieces::from(Bytes::from(vec![7u8; 64 * 1024]));
        let blob = encode(&stored(e), KEY, now, wall0());
        let body = decode_shared(&blob, KEY, now, wall0()).unwrap().body;
        let range = blob.as_ptr_range();
        assert!(
            range.contains(&body.as_slice()[0].as_ptr()),
            "a slice of the blob"
        );
        let small = encode(&stored(full(now)), KEY, now, wall0());
        let body = decode_shared(&small, KEY, now, wall0()).unwrap().body;
        assert!(
            !small.as_ptr_range().contains(&body.as_slice()[0].as_ptr()),
            "copied"
        );
    }

    #[test]
    fn typical_1_kib_entry_is_compact() {
        let now = Instant::now();
        let headers = headers(&[
            ("content-type", "application/json"),
            ("cache-control", "public, max-age=60"),
            ("date", "Tue, 14 Nov 2023 22:13:20 GMT"),
            ("last-modified", "Mon, 13 Nov 2023 10:00:00 GMT"),
            ("etag", "\"5f2b-18bc4a1f2c0\""),
            ("content-length", "1024"),
        ]);
        let e = NewEntry {
            status: StatusCode::OK,
            last_modified: policy::http_date(&headers, header::LAST_MODIFIED),
            upstream_last_modified: headers.get(header::LAST_MODIFIED).cloned(),
            upstream_etag: headers.get(header::ETAG).cloned(),
            etag: headers.get(header::ETAG).cloned().unwrap(),
            headers,
            body: Pieces::from(Bytes::from(vec![b'x'; 1024])),
            vary: VaryKey::capture(
                ["accept-encoding"].into_iter(),
                &self::headers(&[("accept-encoding", "gzip")]),
            ),
            stored_at: now,
            initial_age: Duration::ZERO,
            lifetime: Duration::from_secs(60),
            forbids_stale: false,
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::ZERO,
            operator_ttl: false,
        };
        let key = "http://api.example.com/v1/items/12345";
        let blob = encode(&stored(e), key, now, wall0());
        let overhead = blob.len() - 1024;
        println!(
            "1 KiB entry, 6 headers, {}-byte key: {} bytes",
            key.len(),
            blob.len()
        );
        // Header values 114 bytes, key 37, Vary value 4: 1,216 bytes, ~40 of them framing.
        assert!(overhead <= 200, "{overhead}");
    }
}
