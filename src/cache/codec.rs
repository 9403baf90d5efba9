//! A stored variant's encoding, versioned: the in-memory entry's *head block* and the value of
//! the shared second tier (issue 13, "fleet mode on Redis"), which is that same block behind
//! the few fields only another process needs. Pure functions, no I/O: [`encode_head`] writes
//! the block a [`CachedResponse`] keeps, [`Fields`] walks its header fields, [`encode`] wraps
//! a [`CachedResponse`] into a shared-tier blob and [`decode`] (or [`decode_shared`]) reads one
//! back into the [`EncodedEntry`] that becomes a [`CachedResponse`] again, in this process or
//! another one. Decoding never panics, whatever the bytes: anything that is not a blob
//! [`encode`] wrote is a [`DecodeError`] (an old or unknown version is
//! [`DecodeError::Version`], which the shared tier treats as a miss).
//!
//! # Format, version 2
//!
//! Integers are unsigned LEB128 varints (7 bits a byte, low group first, at most 10 bytes)
//! unless said otherwise. A *string* is a varint length followed by that many bytes.
//!
//! A shared-tier blob:
//!
//! | field | encoding |
//! |---|---|
//! | magic | the 2 bytes `EC` |
//! | version | 1 byte, [`VERSION`] (another value: [`DecodeError::Version`]) |
//! | key | string: the primary key it was stored under, checked against the caller's |
//! | stored | varint: wall-clock ms since the UNIX epoch when it was stored (below) |
//! | initial age | varint ms, rounded **up** |
//! | lifetime | varint ms, rounded down |
//! | stale-while-revalidate | varint ms, rounded down |
//! | stale-if-error | varint ms, rounded down |
//! | Vary | varint count, then per header a *name* and a value tag: 0 when the request lacked the header, else 1 + the length, followed by the captured value |
//! | body length | varint |
//! | head block | below: what the in-memory entry holds |
//! | body | the body's bytes, exactly *body length* of them; they end the blob, anything after is an error |
//!
//! The head block (an in-memory entry keeps exactly these bytes, usually followed by the body
//! when that is at most [`INLINE_BODY_MAX`] bytes: head + body are then one allocation, and a
//! blob is the other fields followed by a copy of that allocation; see
//! `entry::body_inline` for when a small body is kept apart):
//!
//! | field | encoding |
//! |---|---|
//! | flags | 1 byte, the bits below; an undefined combination is an error |
//! | status | varint, 100–999 |
//! | ETag | string, only with [`flags::ETAG_EXPLICIT`] |
//! | upstream ETag | string, only with [`flags::UPSTREAM_ETAG_EXPLICIT`] |
//! | upstream Last-Modified | string, only with [`flags::UPSTREAM_LM_EXPLICIT`] |
//! | last modified | only with [`flags::LAST_MODIFIED_EXPLICIT`]: varint 0 (none) or 1 followed by varint seconds and varint nanoseconds since the epoch |
//! | headers | varint count (at most [`MAX_FIELDS`]), then per field line a *name* and a string value, in the map's order (repeated names stay in order); values are raw bytes, validated when decoded, so a hit serves them as slices of the block without another check |
//!
//! A *name* is a varint tag: odd, it is entry `tag >> 1` of the fixed table of common field
//! names ([`NAMES`], 1 byte instead of the name); even, a literal lowercase name of
//! `tag >> 1` bytes follows. The table is part of the version: changing it needs a new one.
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
//! Version 1 (until issue 13's compact entries) had the flags after the version, the status
//! and validators before `Vary`, and the body as a string; its blobs are
//! [`DecodeError::Version`]`(1)`, a miss: they expire from Redis on their own.
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
//! `typical_1_kib_entry_is_compact` test); its head block, what memory holds besides the
//! body, 130.
//!
//! # Bodies
//!
//! [`decode`] copies what it keeps out of the blob, so the blob can go: a small body with
//! the head block it follows (one allocation, or two when a stored entry would have two), a
//! large one into a piece of its own. [`decode_shared`] slices a large body (and its head block) out of a
//! shared blob instead (no copy of a multi-megabyte body; the blob's other bytes are then
//! kept alive with it).

use std::error::Error;
use std::fmt;
use std::ops::Range;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{self, HeaderName};
use http::StatusCode;
use tokio::time::Instant;

use super::entry::{body_inline, CachedResponse, EncodedEntry, NewEntry};
use super::key::VaryKey;
use super::policy;
use crate::body::Pieces;

/// The first bytes of every blob.
pub const MAGIC: [u8; 2] = *b"EC";
/// The format version this module writes (and the only one it reads).
pub const VERSION: u8 = 2;

/// Bodies up to this size are kept in the head block's allocation (copied there when
/// stored); larger ones keep the pieces they arrived in, shared with the readers that were
/// streamed them while they arrived (no copy of a large body).
pub const INLINE_BODY_MAX: usize = 16 * 1024;

/// The most header fields a head block holds (hyper accepts 100 by default): a decoded
/// block always fits in a `HeaderMap`.
pub const MAX_FIELDS: usize = 4096;

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

/// Field names written as one table index (never reorder or change within a version; the
/// first 40 are version 1's). Up to 64 entries a tag is one byte.
pub static NAMES: [HeaderName; 56] = [
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
    // Version 2.
    header::ACCESS_CONTROL_ALLOW_HEADERS,
    header::ACCESS_CONTROL_ALLOW_METHODS,
    header::ACCESS_CONTROL_MAX_AGE,
    header::CONTENT_SECURITY_POLICY_REPORT_ONLY,
    header::PRAGMA,
    header::TRAILER,
    header::WARNING,
    HeaderName::from_static("x-request-id"),
    HeaderName::from_static("x-powered-by"),
    HeaderName::from_static("server-timing"),
    HeaderName::from_static("timing-allow-origin"),
    HeaderName::from_static("permissions-policy"),
    HeaderName::from_static("cross-origin-resource-policy"),
    HeaderName::from_static("cross-origin-opener-policy"),
    HeaderName::from_static("x-robots-tag"),
    HeaderName::from_static("x-cache"),
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
    /// More field lines than [`MAX_FIELDS`].
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

/// Where things are in a head block, as [`encode_head`] wrote it or [`parse_head`] checked
/// it.
#[derive(Debug)]
pub struct HeadLayout {
    pub flags: u8,
    pub status: StatusCode,
    /// Offset of the header count (after the validators).
    pub headers_at: usize,
    /// The block's length (where an inline body starts).
    pub len: usize,
    /// The names written literally (not in [`NAMES`]), in order.
    pub literal_names: Vec<HeaderName>,
}

/// Appends `e`'s head block to `out`: flags, status, the validators its headers do not
/// already hold, and the header fields.
pub fn encode_head(out: &mut Vec<u8>, e: &NewEntry) -> HeadLayout {
    let start = out.len();
    let served_etag = e.headers.get(header::ETAG);
    let served_lm = e.headers.get(header::LAST_MODIFIED);
    let mut fl = 0;
    let mut set = |bit: u8, on: bool| {
        if on {
            fl |= bit;
        }
    };
    set(flags::FORBIDS_STALE, e.forbids_stale);
    set(flags::OPERATOR_TTL, e.operator_ttl);
    let etag_explicit = served_etag != Some(&e.etag);
    set(flags::ETAG_EXPLICIT, etag_explicit);
    set(flags::UPSTREAM_ETAG, e.upstream_etag.is_some());
    let upstream_etag = e.upstream_etag.as_ref().filter(|u| **u != e.etag);
    set(flags::UPSTREAM_ETAG_EXPLICIT, upstream_etag.is_some());
    set(flags::UPSTREAM_LM, e.upstream_last_modified.is_some());
    let upstream_lm = e
        .upstream_last_modified
        .as_ref()
        .filter(|lm| Some(*lm) != served_lm);
    set(flags::UPSTREAM_LM_EXPLICIT, upstream_lm.is_some());
    let lm_explicit = policy::http_date(&e.headers, header::LAST_MODIFIED) != e.last_modified;
    set(flags::LAST_MODIFIED_EXPLICIT, lm_explicit);

    out.push(fl);
    put_varint(out, u64::from(e.status.as_u16()));
    if etag_explicit {
        put_bytes(out, e.etag.as_bytes());
    }
    if let Some(u) = upstream_etag {
        put_bytes(out, u.as_bytes());
    }
    if let Some(lm) = upstream_lm {
        put_bytes(out, lm.as_bytes());
    }
    if lm_explicit {
        match e.last_modified {
            None => put_varint(out, 0),
            Some(t) => {
                let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
                put_varint(out, 1);
                put_varint(out, since.as_secs());
                put_varint(out, u64::from(since.subsec_nanos()));
            }
        }
    }
    let headers_at = out.len() - start;
    put_varint(out, e.headers.len() as u64);
    let mut literal_names = Vec::new();
    for (name, value) in &e.headers {
        if !put_name(out, name) {
            literal_names.push(name.clone());
        }
        put_bytes(out, value.as_bytes());
    }
    HeadLayout {
        flags: fl,
        status: e.status,
        headers_at,
        len: out.len() - start,
        literal_names,
    }
}

/// Checks a head block at the start of `buf` (which may go on with a body) and says where
/// its parts are. Every name and value is validated, so [`Fields`] can serve the values
/// unchecked.
pub fn parse_head(buf: &[u8]) -> Result<HeadLayout, DecodeError> {
    let mut r = Reader { buf };
    let fl = r.take(1)?[0];
    let has = |bit: u8| fl & bit != 0;
    if (has(flags::UPSTREAM_ETAG_EXPLICIT) && !has(flags::UPSTREAM_ETAG))
        || (has(flags::UPSTREAM_LM_EXPLICIT) && !has(flags::UPSTREAM_LM))
    {
        return Err(DecodeError::Flags(fl));
    }
    let status = r.varint()?;
    let status = u16::try_from(status)
        .ok()
        .and_then(|s| StatusCode::from_u16(s).ok())
        .ok_or(DecodeError::Status(status))?;
    if has(flags::ETAG_EXPLICIT) {
        r.value()?;
    }
    if has(flags::UPSTREAM_ETAG_EXPLICIT) {
        r.value()?;
    }
    if has(flags::UPSTREAM_LM_EXPLICIT) {
        r.value()?;
    }
    if has(flags::LAST_MODIFIED_EXPLICIT) {
        r.time()?;
    }
    let headers_at = buf.len() - r.buf.len();
    let count = r.count(2)?;
    if count > MAX_FIELDS {
        return Err(DecodeError::TooManyHeaders);
    }
    let mut literal_names = Vec::new();
    let (mut etag, mut lm) = (false, false);
    for _ in 0..count {
        let name = r.name()?;
        r.value()?;
        match name {
            Name::Table(i) => {
                let name = &NAMES[i];
                if *name == header::ETAG {
                    etag = true;
                } else if *name == header::LAST_MODIFIED {
                    lm = true;
                }
            }
            Name::Literal(n) => literal_names.push(n),
        }
    }
    let missing = |n: HeaderName| Err(DecodeError::MissingHeader(n));
    if !has(flags::ETAG_EXPLICIT) && !etag {
        return missing(header::ETAG);
    }
    if has(flags::UPSTREAM_LM) && !has(flags::UPSTREAM_LM_EXPLICIT) && !lm {
        return missing(header::LAST_MODIFIED);
    }
    Ok(HeadLayout {
        flags: fl,
        status,
        headers_at,
        len: buf.len() - r.buf.len(),
        literal_names,
    })
}

/// An HTTP-date value as [`policy::http_date`] reads it.
pub fn parse_date(v: &[u8]) -> Option<SystemTime> {
    let v = std::str::from_utf8(v).ok()?;
    httpdate::parse_http_date(v.trim()).ok()
}

/// The explicit validators of a head block whose flags are `fl`, as byte ranges into it
/// (`None` for one it does not spell out).
pub fn explicit_validators(block: &[u8], fl: u8) -> [Option<Range<usize>>; 3] {
    let mut r = Reader { buf: block };
    let mut out = [None, None, None];
    let _ = (|| -> Result<(), DecodeError> {
        r.take(1)?;
        r.varint()?;
        let bits = [
            flags::ETAG_EXPLICIT,
            flags::UPSTREAM_ETAG_EXPLICIT,
            flags::UPSTREAM_LM_EXPLICIT,
        ];
        for (slot, bit) in out.iter_mut().zip(bits) {
            if fl & bit != 0 {
                let v = r.bytes()?;
                let at = v.as_ptr() as usize - block.as_ptr() as usize;
                *slot = Some(at..at + v.len());
            }
        }
        Ok(())
    })();
    out
}

/// The last-modified time a head block whose flags are `fl` spells out
/// ([`flags::LAST_MODIFIED_EXPLICIT`]): `None` without the flag, or when it says none.
pub fn explicit_last_modified(block: &[u8], fl: u8) -> Option<SystemTime> {
    if fl & flags::LAST_MODIFIED_EXPLICIT == 0 {
        return None;
    }
    let mut r = Reader { buf: block };
    r.take(1).ok()?;
    r.varint().ok()?;
    for bit in [
        flags::ETAG_EXPLICIT,
        flags::UPSTREAM_ETAG_EXPLICIT,
        flags::UPSTREAM_LM_EXPLICIT,
    ] {
        if fl & bit != 0 {
            r.bytes().ok()?;
        }
    }
    r.time().ok()?
}

/// A field's name in a head block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldName {
    /// Entry `i` of [`NAMES`].
    Table(usize),
    /// The `i`-th literal name of the block ([`HeadLayout::literal_names`]).
    Literal(usize),
}

/// The field lines of a checked head block ([`parse_head`] or [`encode_head`]), in order:
/// each name and its value's byte range in the block. Stops at the first malformed byte
/// (there is none in a checked block).
pub struct Fields<'a> {
    block: &'a [u8],
    at: usize,
    left: usize,
    literal: usize,
}

impl<'a> Fields<'a> {
    /// The fields of `block`, whose header count is at `headers_at`.
    pub fn new(block: &'a [u8], headers_at: usize) -> Self {
        let mut f = Fields {
            block,
            at: headers_at,
            left: 0,
            literal: 0,
        };
        f.left = f.varint().unwrap_or(0);
        f
    }

    /// How many fields are left.
    pub fn len(&self) -> usize {
        self.left
    }

    pub fn is_empty(&self) -> bool {
        self.left == 0
    }

    #[inline]
    fn varint(&mut self) -> Option<usize> {
        let b = *self.block.get(self.at)?;
        self.at += 1;
        if b < 0x80 {
            return Some(usize::from(b));
        }
        let mut v = usize::from(b & 0x7f);
        for shift in (7..64).step_by(7) {
            let b = *self.block.get(self.at)?;
            self.at += 1;
            v |= usize::from(b & 0x7f).checked_shl(shift)?;
            if b < 0x80 {
                return Some(v);
            }
        }
        None
    }
}

impl Iterator for Fields<'_> {
    type Item = (FieldName, Range<usize>);

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let tag = self.varint()?;
        let name = if tag & 1 == 1 {
            FieldName::Table(tag >> 1)
        } else {
            self.at = self.at.checked_add(tag >> 1)?;
            self.literal += 1;
            FieldName::Literal(self.literal - 1)
        };
        let len = self.varint()?;
        let start = self.at;
        self.at = start.checked_add(len)?;
        if self.at > self.block.len() {
            self.left = 0;
            return None;
        }
        Some((name, start..self.at))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, Some(self.left))
    }
}

/// Encodes a stored variant, stored under `key`, into one self-contained blob. `now` and
/// `wall` are the same moment on the monotonic and the wall clock.
pub fn encode(entry: &CachedResponse, key: &str, now: Instant, wall: SystemTime) -> Bytes {
    let head = entry.head_block();
    let mut out =
        Vec::with_capacity(64 + key.len() + entry.vary.heap_size() + head.len() + entry.body_len());
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    put_bytes(&mut out, key.as_bytes());
    let held = now.saturating_duration_since(entry.stored_at());
    let stored = wall.checked_sub(held).unwrap_or(UNIX_EPOCH);
    put_varint(
        &mut out,
        ms_down(stored.duration_since(UNIX_EPOCH).unwrap_or_default()),
    );
    put_varint(&mut out, ms_up(entry.initial_age()));
    put_varint(&mut out, ms_down(entry.lifetime()));
    put_varint(&mut out, ms_down(entry.stale_while_revalidate()));
    put_varint(&mut out, ms_down(entry.stale_if_error()));
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
    put_varint(&mut out, entry.body_len() as u64);
    out.extend_from_slice(head);
    for piece in entry.body_parts() {
        out.extend_from_slice(piece);
    }
    Bytes::from(out)
}

/// Decodes a blob written by [`encode`] (of this version) that was stored under `key`;
/// what it keeps is copied out, so the blob can be dropped. `now` and `wall` are the same
/// moment on the monotonic and the wall clock.
pub fn decode(
    blob: &[u8],
    key: &str,
    now: Instant,
    wall: SystemTime,
) -> Result<EncodedEntry, DecodeError> {
    decode_with(blob, key, now, wall, None)
}

/// [`decode`] from a shared blob: a large body and its head block become slices of `blob`
/// (no copy, the blob's few hundred other bytes stay alive with them); a small one, where
/// those bytes would be a large share of what is kept, is copied like [`decode`] does.
pub fn decode_shared(
    blob: &Bytes,
    key: &str,
    now: Instant,
    wall: SystemTime,
) -> Result<EncodedEntry, DecodeError> {
    decode_with(blob, key, now, wall, Some(blob))
}

/// The key a blob says it was stored under (without decoding the rest).
pub fn stored_key(blob: &[u8]) -> Result<&[u8], DecodeError> {
    let mut r = Reader { buf: blob };
    r.header()?;
    r.bytes()
}

fn decode_with(
    blob: &[u8],
    key: &str,
    now: Instant,
    wall: SystemTime,
    shared: Option<&Bytes>,
) -> Result<EncodedEntry, DecodeError> {
    let mut r = Reader { buf: blob };
    r.header()?;
    if r.bytes()? != key.as_bytes() {
        return Err(DecodeError::KeyMismatch);
    }
    let stored_ms = r.varint()?;
    let initial_age = Duration::from_millis(r.varint()?);
    let lifetime = Duration::from_millis(r.varint()?);
    let stale_while_revalidate = Duration::from_millis(r.varint()?);
    let stale_if_error = Duration::from_millis(r.varint()?);

    let vary_count = r.count(2)?;
    let mut names = Vec::with_capacity(vary_count);
    let mut values = Vec::with_capacity(vary_count);
    for _ in 0..vary_count {
        names.push(r.name()?.into_header_name());
        values.push(match r.varint()? {
            0 => None,
            n => Some(Box::from(r.take(len(n - 1)?)?)),
        });
    }
    let vary = VaryKey::from_parts(names, values).ok_or(DecodeError::Truncated)?;
    let body_len = len(r.varint()?)?;

    let block_at = blob.len() - r.buf.len();
    let head = parse_head(r.buf)?;
    let rest = r.buf.len() - head.len;
    if rest < body_len {
        return Err(DecodeError::Truncated);
    }
    if rest > body_len {
        return Err(DecodeError::Trailing(rest - body_len));
    }
    let head_range = block_at..block_at + head.len;
    let body_range = head_range.end..blob.len();
    let (block, body) = if body_inline(head.len, body_len) {
        // Head and body together, one exact-size allocation, as a stored entry keeps them.
        let block = Bytes::copy_from_slice(&blob[block_at..]);
        let body = block.slice(head.len..);
        (block, body)
    } else if body_len <= INLINE_BODY_MAX {
        (
            Bytes::copy_from_slice(&blob[head_range]),
            Bytes::copy_from_slice(&blob[body_range]),
        )
    } else {
        match shared {
            Some(b) if blob.len() - body_len <= body_len / 16 => {
                (b.slice(head_range), b.slice(body_range))
            }
            _ => (
                Bytes::copy_from_slice(&blob[head_range]),
                Bytes::copy_from_slice(&blob[body_range]),
            ),
        }
    };

    // Back onto this process's monotonic clock.
    let elapsed = UNIX_EPOCH
        .checked_add(Duration::from_millis(stored_ms))
        .and_then(|stored| wall.duration_since(stored).ok())
        .unwrap_or(Duration::ZERO);
    let (stored_at, initial_age) = rebase(now.checked_sub(elapsed), now, elapsed, initial_age);

    Ok(EncodedEntry {
        block,
        head,
        body: Pieces::from(body),
        vary,
        stored_at,
        initial_age,
        lifetime,
        stale_while_revalidate,
        stale_if_error,
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

/// Writes `name` as a table index (returns true) or a literal (false).
fn put_name(out: &mut Vec<u8>, name: &HeaderName) -> bool {
    match table_index(name) {
        Some(i) => {
            put_varint(out, ((i as u64) << 1) | 1);
            true
        }
        None => {
            put_varint(out, (name.as_str().len() as u64) << 1);
            out.extend_from_slice(name.as_str().as_bytes());
            false
        }
    }
}

/// `name`'s index in [`NAMES`].
pub fn table_index(name: &HeaderName) -> Option<usize> {
    NAMES.iter().position(|n| n == name)
}

/// A varint length as `usize`.
fn len(n: u64) -> Result<usize, DecodeError> {
    usize::try_from(n).map_err(|_| DecodeError::Truncated)
}

/// A name as read: a table entry (by index) or a literal one.
enum Name {
    Table(usize),
    Literal(HeaderName),
}

impl Name {
    fn into_header_name(self) -> HeaderName {
        match self {
            Name::Table(i) => NAMES[i].clone(),
            Name::Literal(n) => n,
        }
    }
}

/// Whether `v` is a valid field value (the bytes `HeaderValue::from_bytes` accepts).
pub(crate) fn valid_value(v: &[u8]) -> bool {
    v.iter().all(|&b| (b >= 32 && b != 127) || b == b'\t')
}

/// Reads fields off the front of the blob; every read checks what is left.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Magic and version.
    fn header(&mut self) -> Result<(), DecodeError> {
        if self.take(2).map_err(|_| DecodeError::Magic)? != MAGIC {
            return Err(DecodeError::Magic);
        }
        match self.take(1)?[0] {
            VERSION => Ok(()),
            v => Err(DecodeError::Version(v)),
        }
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

    /// A field value, checked.
    fn value(&mut self) -> Result<&'a [u8], DecodeError> {
        let v = self.bytes()?;
        if valid_value(v) {
            Ok(v)
        } else {
            Err(DecodeError::HeaderValue)
        }
    }

    fn name(&mut self) -> Result<Name, DecodeError> {
        let tag = self.varint()?;
        if tag & 1 == 1 {
            let i = usize::try_from(tag >> 1).map_err(|_| DecodeError::HeaderName)?;
            return if i < NAMES.len() {
                Ok(Name::Table(i))
            } else {
                Err(DecodeError::HeaderName)
            };
        }
        let name = self.take(len(tag >> 1)?)?;
        // Literal names are written lowercase and never for a table entry: anything else
        // is not a blob `encode` wrote (and would not be found by name).
        let parsed = HeaderName::from_bytes(name).map_err(|_| DecodeError::HeaderName)?;
        if parsed.as_str().as_bytes() != name || table_index(&parsed).is_some() {
            return Err(DecodeError::HeaderName);
        }
        Ok(Name::Literal(parsed))
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
    use http::{HeaderMap, HeaderValue};
    use std::sync::Arc;

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
            stale_if_error: Duration::from_secs(86_400),
            operator_ttl: true,
        }
    }

    fn stored(e: NewEntry) -> Arc<CachedResponse> {
        Arc::new(CachedResponse::new(e, KEY.len(), 0))
    }

    fn rebuilt(e: EncodedEntry) -> Arc<CachedResponse> {
        Arc::new(CachedResponse::from_encoded(e, KEY.len(), 0))
    }

    /// The fields of `h` in order, repeated names included.
    fn order(h: &HeaderMap) -> Vec<(String, Vec<u8>)> {
        h.iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    /// Every field but the times equal.
    fn assert_same(got: &Arc<CachedResponse>, want: &Arc<CachedResponse>) {
        assert_eq!(got.status, want.status);
        assert_eq!(got.headers_map(), want.headers_map());
        assert_eq!(
            order(&got.headers_map()),
            order(&want.headers_map()),
            "order kept"
        );
        assert_eq!(got.body(), want.body());
        assert_eq!(got.etag(), want.etag());
        assert_eq!(got.last_modified(), want.last_modified());
        assert_eq!(got.upstream_etag(), want.upstream_etag());
        assert_eq!(got.upstream_last_modified(), want.upstream_last_modified());
        assert_eq!(got.vary, want.vary);
        assert_eq!(got.lifetime(), want.lifetime());
        assert_eq!(got.forbids_stale(), want.forbids_stale());
        assert_eq!(got.stale_while_revalidate(), want.stale_while_revalidate());
        assert_eq!(got.stale_if_error(), want.stale_if_error());
        assert_eq!(got.operator_ttl(), want.operator_ttl());
        assert_eq!(got.head_block(), want.head_block(), "the same head block");
    }

    fn round_trip(e: NewEntry) -> (Arc<CachedResponse>, Arc<CachedResponse>, Bytes) {
        let now = Instant::now();
        let original = stored(e);
        let blob = encode(&original, KEY, now, wall0());
        let back = decode(&blob, KEY, now, wall0()).unwrap();
        assert_eq!(back.initial_age, original.initial_age());
        let drift = back
            .stored_at
            .saturating_duration_since(original.stored_at())
            + original
                .stored_at()
                .saturating_duration_since(back.stored_at);
        assert!(drift <= Duration::from_millis(1), "{drift:?}");
        let back = rebuilt(back);
        assert_same(&back, &original);
        (original, back, blob)
    }

    /// The flags byte of `blob`'s head block.
    fn flags_of(blob: &[u8]) -> u8 {
        rebuilt(decode(blob, KEY, Instant::now(), wall0()).unwrap()).head_block()[0]
    }

    #[test]
    fn a_full_entry_round_trips() {
        let now = Instant::now();
        let (original, back, blob) = round_trip(full(now));
        assert_eq!(&blob[..3], b"EC\x02");
        assert_eq!(back.vary.values().filter(Option::is_none).count(), 1);
        assert_eq!(back.vary.request_headers().len(), 2);
        // Validators are derived from the headers, not written twice.
        let explicit = flags::ETAG_EXPLICIT
            | flags::UPSTREAM_ETAG_EXPLICIT
            | flags::UPSTREAM_LM_EXPLICIT
            | flags::LAST_MODIFIED_EXPLICIT;
        assert_eq!(flags_of(&blob) & explicit, 0);
        // The blob ends with the entry's own block: head block, then the (inline) body.
        let block = [original.head_block(), &original.body().to_vec()].concat();
        assert!(blob.ends_with(&block));
        // Rebuilt, it is the same entry to the policy.
        let later = now + Duration::from_secs(100);
        assert_eq!(back.is_fresh(later), original.is_fresh(later));
        assert_eq!(back.revalidatable(), original.revalidatable());
        assert!(back.age(later) >= original.age(later));
        assert!(back.age(later) <= original.age(later) + Duration::from_millis(1));
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
        assert!(back.upstream_etag().is_none() && back.upstream_last_modified().is_none());
        assert!(back.body().is_empty());
        assert!(!back.revalidatable());
        assert_eq!(
            flags_of(&blob) & (flags::UPSTREAM_ETAG | flags::UPSTREAM_LM),
            0
        );
    }

    #[test]
    fn validators_that_differ_from_the_headers_are_written_out() {
        let now = Instant::now();
        // After a 304: the stored ETag header stays, the upstream's new one is sent next time.
        let mut e = full(now);
        e.upstream_etag = Some(hv("W/\"v4\""));
        e.upstream_last_modified = Some(hv("Sun, 12 Nov 2023 10:00:00 GMT"));
        e.last_modified = Some(UNIX_EPOCH + Duration::new(1_600_000_000, 5));
        let (original, back, blob) = round_trip(e);
        let explicit = flags::UPSTREAM_ETAG_EXPLICIT
            | flags::UPSTREAM_LM_EXPLICIT
            | flags::LAST_MODIFIED_EXPLICIT;
        assert_eq!(flags_of(&blob) & explicit, explicit);
        assert_eq!(original.upstream_etag(), Some(hv("W/\"v4\"")));
        assert_eq!(back.etag(), hv("\"v3\""));
        assert_eq!(
            back.upstream_last_modified(),
            Some(hv("Sun, 12 Nov 2023 10:00:00 GMT"))
        );
        assert_eq!(
            back.header(&header::LAST_MODIFIED),
            Some(hv("Mon, 13 Nov 2023 10:00:00 GMT"))
        );
        assert_eq!(
            back.last_modified(),
            Some(UNIX_EPOCH + Duration::new(1_600_000_000, 5))
        );
        // A served ETag the headers lack; a Last-Modified header that was not the upstream's;
        // a parseable header whose time is not kept.
        let mut e = full(now);
        e.headers.remove(header::ETAG);
        e.upstream_etag = None;
        e.upstream_last_modified = None;
        e.last_modified = None;
        let (_, back, blob) = round_trip(e);
        assert_eq!(flags_of(&blob) & flags::ETAG_EXPLICIT, flags::ETAG_EXPLICIT);
        assert_eq!(back.etag(), hv("\"v3\""));
        assert!(back.header(&header::ETAG).is_none());
        assert!(back.header(&header::LAST_MODIFIED).is_some());
        assert_eq!(back.last_modified(), None);
    }

    /// Every kind of field line survives the head block, in order: table names, literal
    /// names, repeated names interleaved with others, empty values, values that are not
    /// UTF-8 (obs-text) or hold tabs, and a long value (a multi-byte length).
    #[test]
    fn every_kind_of_header_round_trips_in_order() {
        let now = Instant::now();
        let mut h = HeaderMap::new();
        let lit = |n: &str| HeaderName::from_bytes(n.as_bytes()).unwrap();
        let raw = |b: &[u8]| HeaderValue::from_bytes(b).unwrap();
        h.append(header::SET_COOKIE, hv("a=1"));
        h.append(lit("x-one"), raw(b"caf\xc3\xa9 \xff\x80"));
        h.append(header::SET_COOKIE, hv("b=2"));
        h.append(lit("x-one"), raw(b""));
        h.append(header::ETAG, hv("\"t\""));
        h.append(lit("x-two"), raw(b"tab\there"));
        h.append(header::SET_COOKIE, hv("c=3"));
        h.append(lit("x-long"), raw(&[b'v'; 300]));
        h.append(
            HeaderName::from_static("cdn-cache-control"),
            hv("max-age=5"),
        );
        h.append(HeaderName::from_static("x-cache"), hv("HIT from elsewhere"));
        let want = order(&h);
        let mut e = full(now);
        e.headers = h;
        e.upstream_last_modified = None;
        e.last_modified = None;
        e.etag = hv("\"t\"");
        e.upstream_etag = None;
        let original = stored(e);
        assert_eq!(order(&original.headers_map()), want);
        let fields: Vec<(String, Vec<u8>)> = original
            .fields()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect();
        assert_eq!(fields, want);
        assert_eq!(original.field_count(), want.len());
        assert_eq!(
            original.header(&lit("x-one")),
            Some(raw(b"caf\xc3\xa9 \xff\x80"))
        );
        assert_eq!(original.header(&header::SET_COOKIE), Some(hv("a=1")));
        assert_eq!(original.header(&lit("x-absent")), None);
        assert_eq!(
            original.header_bytes(&lit("x-two")),
            Some(&b"tab\there"[..])
        );
        assert!(original.headers_map_with(3).capacity() >= want.len() + 3);
        let (_, back, _) = round_trip(full(now));
        assert_eq!(back.field_count(), 11);
        // And through a blob.
        let blob = encode(&original, KEY, now, wall0());
        let back = rebuilt(decode(&blob, KEY, now, wall0()).unwrap());
        assert_eq!(order(&back.headers_map()), want);
        assert_same(&back, &original);
    }

    /// A small body shares the head block's allocation (also when read back) unless apart
    /// they take less memory; a large one keeps the pieces it arrived in, uncopied.
    #[test]
    fn small_bodies_are_inline_large_ones_keep_their_pieces() {
        let now = Instant::now();
        let within = |e: &Arc<CachedResponse>| {
            let block = e.head_block().as_ptr_range();
            let body = e.body().as_slice()[0].as_ptr();
            std::ptr::eq(body, block.end)
        };
        let small = stored(full(now));
        assert!(within(&small), "inline, right behind the head block");
        assert_eq!(small.body().as_slice().len(), 1);
        let blob = encode(&small, KEY, now, wall0());
        assert!(within(&rebuilt(decode(&blob, KEY, now, wall0()).unwrap())));

        // A body that would push the one allocation into a larger size class (a 1 KiB body
        // behind a short head) gets an exact-size piece of its own instead (a copy), also
        // when read back.
        let mut e = full(now);
        e.headers.remove(header::CONTENT_LENGTH);
        e.body = Pieces::default();
        let head = stored(e).head_block().len();
        let n = (1024..INLINE_BODY_MAX)
            .find(|&n| !body_inline(head, n))
            .unwrap();
        let mut e = full(now);
        e.headers.remove(header::CONTENT_LENGTH);
        let kib = Bytes::from(vec![7u8; n]);
        e.body = Pieces::from(kib.clone());
        let apart = stored(e);
        assert_eq!(apart.head_block().len(), head);
        assert!(!within(&apart));
        assert_ne!(apart.body().as_slice()[0].as_ptr(), kib.as_ptr(), "copied");
        assert_eq!(apart.body(), *kib);
        let blob = encode(&apart, KEY, now, wall0());
        let back = rebuilt(decode(&blob, KEY, now, wall0()).unwrap());
        assert!(!within(&back));
        assert_eq!(back.body(), *kib);
        assert_same(&back, &apart);

        let mut e = full(now);
        e.headers.remove(header::CONTENT_LENGTH);
        let big = Bytes::from(vec![7u8; INLINE_BODY_MAX + 1]);
        e.body = Pieces::new(vec![big.slice(..100), big.slice(100..)]);
        let large = stored(e);
        assert!(!within(&large));
        assert_eq!(
            large.body().as_slice()[0].as_ptr(),
            big.as_ptr(),
            "not copied"
        );
        assert_eq!(large.body().as_slice().len(), 2);
        let (_, back, _) = round_trip(full(now));
        assert_eq!(back.body(), "abcde");
        // An empty body: nothing behind the head block.
        let mut e = full(now);
        e.body = Pieces::default();
        let empty = stored(e);
        assert!(empty.body().is_empty());
        assert!(empty.size < small.size);
    }

    #[test]
    fn sub_second_lifetimes_are_kept() {
        let now = Instant::now();
        let mut e = full(now);
        e.stored_at = now;
        e.initial_age = Duration::ZERO;
        e.lifetime = Duration::from_millis(500);
        let entry = stored(e);
        assert_eq!(entry.lifetime(), Duration::from_millis(500));
        assert!(entry.is_fresh(now + Duration::from_millis(499)));
        assert!(!entry.is_fresh(now + Duration::from_millis(500)));
        let mut e = full(now);
        e.lifetime = Duration::from_nanos(1_234_567);
        e.initial_age = Duration::from_nanos(7);
        let entry = stored(e);
        assert_eq!(entry.lifetime(), Duration::from_nanos(1_234_567));
        assert_eq!(entry.initial_age(), Duration::from_nanos(7));
        // Through a blob: whole milliseconds, never fresher.
        let blob = encode(&entry, KEY, now, wall0());
        let back = decode(&blob, KEY, now, wall0()).unwrap();
        assert_eq!(back.lifetime, Duration::from_millis(1));
        assert_eq!(back.initial_age, Duration::from_millis(1));
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
        let got = rebuilt(back).age(now2);
        assert!(
            got >= want && got <= want + Duration::from_millis(1),
            "{got:?} vs {want:?}"
        );

        // Written by a host whose clock is ahead: stored "in the future" counts as now.
        let back = decode(&blob, KEY, now2, wall0() - Duration::from_secs(60)).unwrap();
        assert_eq!(back.stored_at, now2);
        assert_eq!(back.initial_age, original.initial_age());

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
        let at = 3 + 1 + KEY.len(); // magic, version, key
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
        for v in [1, 3, 0xff] {
            let mut other = blob.to_vec();
            other[2] = v;
            assert_eq!(
                decode(&other, KEY, now, wall0()).err(),
                Some(DecodeError::Version(v))
            );
            assert_eq!(stored_key(&other), Err(DecodeError::Version(v)));
        }
        // A version 1 blob, as the previous release wrote it, is an unsupported version
        // (a miss), not an error of its fields.
        let v1 = b"EC\x01\x00\x01k\xc8\x01\x00\x00\x00\x00\x00\x00\x01\x1b\x02\"\"\x00";
        assert_eq!(
            decode(v1, "k", now, wall0()).err(),
            Some(DecodeError::Version(1))
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
            DecodeError::Version(1).to_string(),
            "unsupported cache entry format version 1"
        );
    }

    /// A blob for key `k` with no times and no `Vary`, then `head` and `body`.
    fn blob_with(head: &[u8], body: &[u8]) -> Vec<u8> {
        let mut b = b"EC\x02".to_vec();
        put_bytes(&mut b, b"k");
        b.extend_from_slice(&[0, 0, 0, 0, 0, 0]); // stored, age, lifetime, swr, sie; Vary
        put_varint(&mut b, body.len() as u64);
        b.extend_from_slice(head);
        b.extend_from_slice(body);
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
        // flags, status; then the headers.
        let head = |fl: u8, status: &[u8], rest: &[u8]| {
            let mut h = vec![fl];
            h.extend_from_slice(status);
            h.extend_from_slice(rest);
            h
        };
        let etag = [1, (13 << 1) | 1, 2, b'"', b'"'];
        assert!(d(&blob_with(&head(0, &[200, 1], &etag), b"")).is_none());
        assert!(d(&blob_with(&head(0, &[200, 1], &etag), b"body")).is_none());
        assert_eq!(
            d(&blob_with(&head(0, &[99], &etag), b"")),
            Some(DecodeError::Status(99))
        );
        assert_eq!(
            d(&blob_with(&head(0, &[0xe8, 0x07], &etag), b"")),
            Some(DecodeError::Status(1000))
        );
        assert_eq!(
            d(&blob_with(&head(0, &[200, 1], &[0]), b"")),
            Some(DecodeError::MissingHeader(header::ETAG))
        );
        let explicit_etag = [2, b'"', b'"', 0];
        assert!(d(&blob_with(
            &head(flags::ETAG_EXPLICIT, &[200, 1], &explicit_etag),
            b""
        ))
        .is_none());
        let lm_flags = flags::ETAG_EXPLICIT | flags::UPSTREAM_LM;
        assert_eq!(
            d(&blob_with(&head(lm_flags, &[200, 1], &explicit_etag), b"")),
            Some(DecodeError::MissingHeader(header::LAST_MODIFIED))
        );
        assert_eq!(
            d(&blob_with(
                &head(flags::UPSTREAM_ETAG_EXPLICIT, &[200, 1], &etag),
                b""
            )),
            Some(DecodeError::Flags(flags::UPSTREAM_ETAG_EXPLICIT))
        );
        // Header names and values.
        let bad_value = [1, (13 << 1) | 1, 2, b'\n', b'"'];
        assert_eq!(
            d(&blob_with(&head(0, &[200, 1], &bad_value), b"")),
            Some(DecodeError::HeaderValue)
        );
        let with_etag = |fields: &[u8]| {
            let mut h = vec![0, 200, 1, 2, (13 << 1) | 1, 2, b'"', b'"'];
            h.extend_from_slice(fields);
            blob_with(&h, b"")
        };
        assert!(d(&with_etag(&[6, b'x', b'-', b'a', 0])).is_none());
        for bad_name in [
            &[4, b'a', b' ', 0][..],         // not a token
            &[0, 0],                         // empty
            &[4, b'X', b'-', 0],             // not lowercase
            &[8, b'e', b't', b'a', b'g', 0], // a table name spelled out
            &[(56 << 1) | 1, 0],             // past the table
        ] {
            assert_eq!(
                d(&with_etag(bad_name)),
                Some(DecodeError::HeaderName),
                "{bad_name:?}"
            );
        }
        // Lengths and counts past the end, before anything is allocated for them.
        let huge_len = [1, (13 << 1) | 1, 0xff, 0xff, 0xff, 0xff, 0x0f, b'"'];
        assert_eq!(
            d(&blob_with(&head(0, &[200, 1], &huge_len), b"")),
            Some(DecodeError::Truncated)
        );
        let huge_count = [0xff, 0xff, 0xff, 0xff, 0x0f, 0, 0];
        assert_eq!(
            d(&blob_with(&head(0, &[200, 1], &huge_count), b"")),
            Some(DecodeError::Truncated)
        );
        let mut too_many = head(0, &[200, 1], &[]);
        put_varint(&mut too_many, MAX_FIELDS as u64 + 1);
        for _ in 0..=MAX_FIELDS {
            too_many.extend_from_slice(&[(13 << 1) | 1, 0]);
        }
        assert_eq!(
            d(&blob_with(&too_many, b"")),
            Some(DecodeError::TooManyHeaders)
        );
        let mut short_body = blob_with(&head(0, &[200, 1], &etag), b"body");
        short_body.pop();
        assert_eq!(d(&short_body), Some(DecodeError::Truncated));
        let mut huge_key = b"EC\x02".to_vec();
        huge_key.extend_from_slice(&[0xff; 9]);
        huge_key.push(0x01);
        assert_eq!(d(&huge_key), Some(DecodeError::Truncated));
        let mut long_varint = b"EC\x02".to_vec();
        long_varint.extend_from_slice(&[0xff; 9]);
        long_varint.push(0x02);
        assert_eq!(d(&long_varint), Some(DecodeError::Varint));
        let mut eleven = b"EC\x02".to_vec();
        eleven.extend_from_slice(&[0x80; 11]);
        assert_eq!(d(&eleven), Some(DecodeError::Varint));
        // An explicit last-modified time out of range.
        let mut bad_time = head(flags::LAST_MODIFIED_EXPLICIT, &[200, 1], &[1, 0]);
        put_varint(&mut bad_time, 1_000_000_000);
        assert_eq!(d(&blob_with(&bad_time, b"")), Some(DecodeError::Time));
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
                let entry = rebuilt(e);
                // Every accessor works on whatever decoded.
                let _ = (
                    entry.etag(),
                    entry.upstream_etag(),
                    entry.upstream_last_modified(),
                );
                assert_eq!(entry.headers_map().len(), entry.field_count());
                let again = encode(&entry, &key, now, wall0());
                assert_same(
                    &rebuilt(decode(&again, &key, now, wall0()).unwrap()),
                    &entry,
                );
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
                blob.splice(0..0, *b"EC\x02");
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
        let back = decode_shared(&blob, KEY, now, wall0()).unwrap();
        let range = blob.as_ptr_range();
        assert!(
            range.contains(&back.body.as_slice()[0].as_ptr()),
            "a slice of the blob"
        );
        assert!(range.contains(&back.block.as_ptr()), "so is the head block");
        let copied = decode(&blob, KEY, now, wall0()).unwrap();
        assert!(!range.contains(&copied.body.as_slice()[0].as_ptr()));
        let small = encode(&stored(full(now)), KEY, now, wall0());
        let body = decode_shared(&small, KEY, now, wall0()).unwrap().body;
        assert!(
            !small.as_ptr_range().contains(&body.as_slice()[0].as_ptr()),
            "copied"
        );
    }

    /// Writes the seeds of `fuzz/corpus/entry_codec` for this version (run with
    /// `--ignored` after a format change).
    #[test]
    #[ignore]
    fn write_fuzz_seeds() {
        let now = Instant::now();
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/entry_codec");
        let mut minimal = full(now);
        minimal.headers = headers(&[("etag", "\"\"")]);
        minimal.etag = hv("\"\"");
        minimal.upstream_etag = None;
        minimal.upstream_last_modified = None;
        minimal.last_modified = None;
        minimal.vary = VaryKey::default();
        minimal.body = Pieces::default();
        let mut explicit = full(now);
        explicit.upstream_etag = Some(hv("W/\"v4\""));
        explicit.upstream_last_modified = Some(hv("Sun, 12 Nov 2023 10:00:00 GMT"));
        explicit.last_modified = Some(UNIX_EPOCH + Duration::new(1_600_000_000, 5));
        explicit.headers.remove(header::ETAG);
        for (name, e) in [
            ("v2_full", full(now)),
            ("v2_minimal", minimal),
            ("v2_explicit_validators", explicit),
        ] {
            let blob = encode(&stored(e), KEY, now, wall0());
            std::fs::write(dir.join(name), &blob).unwrap();
        }
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
        let entry = CachedResponse::new(e, key.len(), 0);
        let blob = encode(&entry, key, now, wall0());
        let overhead = blob.len() - 1024;
        println!(
            "1 KiB entry, 6 headers, {}-byte key: {} bytes, head block {}",
            key.len(),
            blob.len(),
            entry.head_block().len()
        );
        // Header values 114 bytes, key 37, Vary value 4: ~1,220 bytes, ~40 of them framing.
        assert!(overhead <= 200, "{overhead}");
        // What memory holds besides the body: values and ~2 bytes of framing per field.
        assert!(
            entry.head_block().len() <= 114 + 6 * 3 + 4,
            "{}",
            entry.head_block().len()
        );
    }
}
