//! RFC 9110 §13 preconditions evaluated at the edge: does a client's `If-None-Match` /
//! `If-Modified-Since` let us answer `304 Not Modified` from a stored response?
//!
//! nginx weakens an `ETag` (`W/"…"`) when it gzips a response, and clients then send the weak
//! form back; the weak comparison of §8.8.3.2 makes that still match.

use std::time::SystemTime;

use http::{header, HeaderMap, HeaderValue};

/// True when the request's preconditions say the client's copy is current (→ 304).
///
/// §13.2.2 order: `If-None-Match` decides when present; `If-Modified-Since` is considered
/// only without it, and only when the response has a `Last-Modified`.
pub fn not_modified(
    req: &HeaderMap,
    etag: Option<&HeaderValue>,
    last_modified: Option<SystemTime>,
) -> bool {
    if req.contains_key(header::IF_NONE_MATCH) {
        return if_none_match_matches(req, etag);
    }
    match (req.get(header::IF_MODIFIED_SINCE), last_modified) {
        (Some(ims), Some(lm)) => ims
            .to_str()
            .ok()
            .and_then(|v| httpdate::parse_http_date(v.trim()).ok())
            .is_some_and(|ims| lm <= ims),
        _ => false,
    }
}

/// §13.1.2: `*` matches any current representation; otherwise any listed entity-tag that
/// weakly matches ours. An unparseable list member is skipped, never a match.
fn if_none_match_matches(req: &HeaderMap, etag: Option<&HeaderValue>) -> bool {
    let ours = etag.and_then(|e| e.to_str().ok()).and_then(opaque_tag);
    for line in req.get_all(header::IF_NONE_MATCH) {
        let Ok(line) = line.to_str() else { continue };
        if line.trim() == "*" {
            return true;
        }
        let Some(ours) = ours else { continue };
        if entity_tags(line).any(|theirs| theirs == ours) {
            return true;
        }
    }
    false
}

/// The opaque-tag (with quotes) of an entity-tag, dropping any `W/` prefix: the weak
/// comparison of §8.8.3.2 ignores weakness.
fn opaque_tag(tag: &str) -> Option<&str> {
    let tag = tag.trim();
    let tag = tag.strip_prefix("W/").unwrap_or(tag);
    (tag.len() >= 2
        && tag.starts_with('"')
        && tag.ends_with('"')
        && !tag[1..tag.len() - 1].contains('"'))
    .then_some(tag)
}

/// Splits a comma-separated entity-tag list. Commas may appear inside an opaque-tag, so it
/// scans quote by quote instead of splitting on commas.
fn entity_tags(list: &str) -> impl Iterator<Item = &str> {
    let mut rest = list;
    std::iter::from_fn(move || {
        let start = rest.find('"')?;
        let end = rest[start + 1..].find('"')? + start + 1;
        let tag = &rest[start..=end];
        rest = &rest[end + 1..];
        Some(tag)
    })
}

/// A strong ETag derived from the body (given as its pieces, in order): `"` + 32 hex digits
/// of SHA-256 + `"`.
pub fn etag_for_body<P: AsRef<[u8]>>(pieces: &[P]) -> HeaderValue {
    use sha2::{Digest, Sha256};
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut hasher = Sha256::new();
    for piece in pieces {
        hasher.update(piece.as_ref());
    }
    let digest = hasher.finalize();
    let mut tag = Vec::with_capacity(34);
    tag.push(b'"');
    for byte in &digest[..16] {
        tag.push(HEX[usize::from(byte >> 4)]);
        tag.push(HEX[usize::from(byte & 0xf)]);
    }
    tag.push(b'"');
    // Only quotes and hex digits: always a valid header value.
    HeaderValue::from_bytes(&tag).unwrap_or_else(|_| HeaderValue::from_static("\"0\""))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn req(name: header::HeaderName, v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_str(v).unwrap());
        h
    }

    fn inm(v: &str, etag: &str) -> bool {
        not_modified(
            &req(header::IF_NONE_MATCH, v),
            Some(&HeaderValue::from_str(etag).unwrap()),
            None,
        )
    }

    #[test]
    fn if_none_match_weak_comparison() {
        assert!(inm("\"abc\"", "\"abc\""));
        assert!(inm("W/\"abc\"", "\"abc\""), "nginx-weakened tag must match");
        assert!(inm("\"abc\"", "W/\"abc\""));
        assert!(!inm("\"abd\"", "\"abc\""));
        assert!(!inm("abc", "\"abc\""), "unquoted is not an entity-tag");
    }

    #[test]
    fn if_none_match_lists_and_star() {
        assert!(inm("\"x\", W/\"abc\" , \"y\"", "\"abc\""));
        assert!(inm("\"a,b\", \"abc\"", "\"abc\""));
        assert!(!inm("\"x\", \"y\"", "\"abc\""));
        assert!(inm("*", "\"abc\""));
        assert!(!inm("\"", "\"abc\""));
        assert!(!inm("W/", "\"abc\""));
    }

    #[test]
    fn if_modified_since_only_without_if_none_match() {
        let lm = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let at = |t: SystemTime| req(header::IF_MODIFIED_SINCE, &httpdate::fmt_http_date(t));
        assert!(not_modified(&at(lm), None, Some(lm)));
        assert!(not_modified(
            &at(lm + Duration::from_secs(5)),
            None,
            Some(lm)
        ));
        assert!(!not_modified(
            &at(lm - Duration::from_secs(5)),
            None,
            Some(lm)
        ));
        assert!(!not_modified(
            &req(header::IF_MODIFIED_SINCE, "garbage"),
            None,
            Some(lm)
        ));
        let mut both = at(lm);
        both.insert(header::IF_NONE_MATCH, HeaderValue::from_static("\"other\""));
        assert!(!not_modified(
            &both,
            Some(&HeaderValue::from_static("\"abc\"")),
            Some(lm)
        ));
    }

    #[test]
    fn generated_etag_is_stable_and_content_dependent() {
        assert_eq!(
            etag_for_body(&[b"hello"]),
            etag_for_body(&[&b"he"[..], b"llo"])
        );
        assert_ne!(etag_for_body(&[b"hello"]), etag_for_body(&[b"hellp"]));
        assert_eq!(etag_for_body::<&[u8]>(&[]).len(), 34);
    }
}
