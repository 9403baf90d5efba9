//! Entry points that feed arbitrary bytes to the parsers a client or upstream controls:
//! every header parser (`Cache-Control` and the targeted fields, `Age`, `Expires`/`Date`,
//! `Vary`, `If-None-Match`, `If-Modified-Since`, `Range`/`If-Range`), the server's
//! request head scanner ([`crate::server::head_scan`]), and the stored-entry decoder a shared
//! tier reads ([`crate::cache::codec`]). Shared by the `cargo fuzz` targets (`fuzz/`), the
//! regression test over their corpora (`tests/parser_corpus.rs`) and unit tests. Not part
//! of the proxy's API.

use std::time::{Duration, SystemTime};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode};

use crate::cache::conditional::{etag_for_body, not_modified};
use crate::cache::key::VaryKey;
use crate::cache::policy::{self, CacheControl};
use crate::cache::range;

/// The fields the input is spread over, one value per `\n`-separated line, in this order.
const FIELDS: [HeaderName; 12] = [
    header::CACHE_CONTROL,
    HeaderName::from_static("cdn-cache-control"),
    HeaderName::from_static("surrogate-control"),
    header::AGE,
    header::EXPIRES,
    header::DATE,
    header::VARY,
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
    header::RANGE,
    header::IF_RANGE,
    header::ACCEPT_LANGUAGE,
];

/// Parses `data` every way edgecache parses untrusted headers. Must never panic, loop or
/// allocate without bound.
pub fn exercise_header_parsers(data: &[u8]) {
    let mut headers = HeaderMap::new();
    for (line, name) in data.split(|&b| b == b'\n').zip(FIELDS.iter().cycle()) {
        if let Ok(v) = HeaderValue::from_bytes(line) {
            headers.append(name.clone(), v);
        }
    }
    let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    let cc = CacheControl::for_response(&headers);
    let req_cc = CacheControl::parse(&headers);
    for status in [
        StatusCode::OK,
        StatusCode::NOT_FOUND,
        StatusCode::SERVICE_UNAVAILABLE,
    ] {
        let (lifetime, _) = policy::freshness_lifetime(status, &headers, &cc, None, now);
        let _ = policy::storability(
            &Method::GET,
            status,
            &headers,
            &req_cc,
            &headers,
            &cc,
            !lifetime.is_zero(),
        );
    }
    let _ = policy::initial_age(&headers, now, now);
    let names: Vec<String> = policy::vary_names(&headers).collect();
    let vary = VaryKey::capture(names.iter().map(String::as_str), &headers);
    let _ = vary.matches(&headers);
    let etag = headers
        .get(header::ETAG)
        .cloned()
        .unwrap_or_else(|| etag_for_body(&[data]));
    let lm = policy::http_date(&headers, header::DATE);
    let _ = not_modified(&headers, Some(&etag), lm);
    let _ = range::select(&headers, data.len() as u64, Some(&etag), lm);
}

/// Scans `data` as a stream of request heads ([`crate::server::head_scan::HeadScan`]) whole, split
/// at a point the input chooses, and one byte at a time; panics unless all three find the
/// same heads (end offsets and flags), and unless no head ends within the empty lines
/// before a request line. Must never panic otherwise, loop or allocate without bound.
pub fn exercise_head_scan(data: &[u8]) {
    use crate::server::head_scan::HeadScan;

    /// Each head found: where it ends in `data`, whether it was ambiguous, had a body.
    fn heads(
        data: &[u8],
        chunks: impl Iterator<Item = std::ops::Range<usize>>,
    ) -> Vec<(usize, bool, bool)> {
        let mut found = Vec::new();
        let mut scan = HeadScan::default();
        for range in chunks {
            let mut at = range.start;
            while let Some(used) = scan.feed(&data[at..range.end]) {
                at += used;
                found.push((at, scan.ambiguous(), scan.has_body()));
                scan = HeadScan::default();
            }
        }
        found
    }
    let whole = heads(data, std::iter::once(0..data.len()));
    let split = data.first().map_or(0, |&b| b as usize % (data.len() + 1));
    assert_eq!(
        whole,
        heads(data, [0..split, split..data.len()].into_iter())
    );
    assert_eq!(whole, heads(data, (0..data.len()).map(|i| i..i + 1)));
    let mut start = 0;
    for &(end, _, _) in &whole {
        let head = &data[start..end];
        assert!(
            head.iter().any(|&b| b != b'\r' && b != b'\n'),
            "empty lines counted as a head"
        );
        start = end;
    }
}

/// Decodes `data` as a stored-entry blob ([`crate::cache::codec`]), as it is and behind a
/// valid magic and version, from a slice and from shared bytes; panics unless both agree and
/// unless what decodes re-encodes to a fixed point (encoding the decoded entry and decoding
/// that again gives the same bytes). Must never panic otherwise, loop or allocate without
/// bound.
pub fn exercise_entry_codec(data: &[u8]) {
    use crate::cache::codec::{self, MAGIC, VERSION};
    use crate::cache::entry::CachedResponse;
    use bytes::Bytes;
    use tokio::time::Instant;

    let now = Instant::now();
    let wall = SystemTime::UNIX_EPOCH + Duration::new(1_700_000_000, 123_456_789);
    let framed: Vec<u8> = MAGIC
        .iter()
        .chain(&[VERSION])
        .chain(data)
        .copied()
        .collect();
    for blob in [data, &framed] {
        // The key the blob names, so decoding goes past the collision check.
        let key = codec::stored_key(blob)
            .ok()
            .and_then(|k| std::str::from_utf8(k).ok())
            .unwrap_or("")
            .to_owned();
        let shared = codec::decode_shared(&Bytes::copy_from_slice(blob), &key, now, wall);
        let reencode = |e| {
            let entry = CachedResponse::from_encoded(e, key.len(), 0);
            codec::encode(&entry, &key, now, wall)
        };
        match codec::decode(blob, &key, now, wall) {
            Err(e) => assert_eq!(shared.err(), Some(e), "decode and decode_shared differ"),
            Ok(entry) => {
                let once = reencode(entry);
                let shared = reencode(shared.expect("decode_shared fails where decode does not"));
                assert_eq!(once, shared, "decode and decode_shared differ");
                let again = codec::decode(&once, &key, now, wall).expect("re-encoded blob decodes");
                assert_eq!(reencode(again), once, "not a fixed point");
            }
        }
    }
}
