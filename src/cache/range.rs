//! RFC 9110 §14 range requests served from a stored complete response: one byte range per
//! request (a multi-range request is answered with the whole representation, which §14.2
//! allows), `If-Range` (§13.1.5), and the unsatisfiable case (416).

use std::time::SystemTime;

use http::{header, HeaderMap, HeaderValue};

/// What to send for a request's `Range`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeReply {
    /// No (usable) range: the whole representation, 200.
    Full,
    /// Bytes `start..=end` of the representation, 206.
    Partial { start: u64, end: u64 },
    /// 416 with `Content-Range: bytes */len`.
    Unsatisfiable,
}

/// Decides how to answer `req`'s `Range` for a stored body of `len` bytes.
pub fn select(
    req: &HeaderMap,
    len: u64,
    etag: Option<&HeaderValue>,
    last_modified: Option<SystemTime>,
) -> RangeReply {
    let Some(range) = req.get(header::RANGE).and_then(|v| v.to_str().ok()) else {
        return RangeReply::Full;
    };
    if let Some(if_range) = req.get(header::IF_RANGE) {
        if !if_range_matches(if_range, etag, last_modified) {
            return RangeReply::Full;
        }
    }
    parse(range, len)
}

/// §13.1.5: an entity-tag must match strongly; a date must equal `Last-Modified` exactly.
fn if_range_matches(
    if_range: &HeaderValue,
    etag: Option<&HeaderValue>,
    last_modified: Option<SystemTime>,
) -> bool {
    let Ok(v) = if_range.to_str() else {
        return false;
    };
    let v = v.trim();
    if v.starts_with('"') || v.starts_with("W/") {
        return !v.starts_with("W/")
            && etag
                .and_then(|e| e.to_str().ok())
                .is_some_and(|e| !e.starts_with("W/") && e.trim() == v);
    }
    match (httpdate::parse_http_date(v), last_modified) {
        (Ok(date), Some(lm)) => date == lm,
        _ => false,
    }
}

/// Parses one `bytes=` range against `len`; anything we do not serve as a single range
/// (other units, several ranges, bad syntax) is `Full`.
fn parse(range: &str, len: u64) -> RangeReply {
    let Some((unit, spec)) = range.trim().split_once('=') else {
        return RangeReply::Full;
    };
    if !unit.trim().eq_ignore_ascii_case("bytes") || spec.contains(',') {
        return RangeReply::Full;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeReply::Full;
    };
    let (first, last) = (first.trim(), last.trim());
    let number = |s: &str| -> Option<u64> {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .then(|| s.parse().unwrap_or(u64::MAX))
    };
    match (number(first), number(last)) {
        // Suffix range: the last N bytes.
        (None, Some(n)) if first.is_empty() => {
            if n == 0 || len == 0 {
                RangeReply::Unsatisfiable
            } else {
                RangeReply::Partial {
                    start: len.saturating_sub(n),
                    end: len - 1,
                }
            }
        }
        (Some(start), None) if last.is_empty() => {
            if start >= len {
                RangeReply::Unsatisfiable
            } else {
                RangeReply::Partial {
                    start,
                    end: len - 1,
                }
            }
        }
        (Some(start), Some(end)) if start <= end => {
            if start >= len {
                RangeReply::Unsatisfiable
            } else {
                RangeReply::Partial {
                    start,
                    end: end.min(len - 1),
                }
            }
        }
        _ => RangeReply::Full,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sel(range: &str, if_range: Option<&str>) -> RangeReply {
        let mut h = HeaderMap::new();
        h.insert(header::RANGE, HeaderValue::from_str(range).unwrap());
        if let Some(v) = if_range {
            h.insert(header::IF_RANGE, HeaderValue::from_str(v).unwrap());
        }
        select(&h, 100, Some(&HeaderValue::from_static("\"e\"")), None)
    }

    #[test]
    fn single_ranges() {
        assert_eq!(
            sel("bytes=0-9", None),
            RangeReply::Partial { start: 0, end: 9 }
        );
        assert_eq!(
            sel("bytes=90-", None),
            RangeReply::Partial { start: 90, end: 99 }
        );
        assert_eq!(
            sel("bytes=-10", None),
            RangeReply::Partial { start: 90, end: 99 }
        );
        assert_eq!(
            sel("bytes=-1000", None),
            RangeReply::Partial { start: 0, end: 99 }
        );
        assert_eq!(
            sel("bytes=50-5000", None),
            RangeReply::Partial { start: 50, end: 99 }
        );
        assert_eq!(
            sel("BYTES = 1-1", None),
            RangeReply::Partial { start: 1, end: 1 }
        );
    }

    #[test]
    fn unsatisfiable_and_ignored() {
        assert_eq!(sel("bytes=100-", None), RangeReply::Unsatisfiable);
        assert_eq!(sel("bytes=-0", None), RangeReply::Unsatisfiable);
        assert_eq!(sel("bytes=5-1", None), RangeReply::Full);
        assert_eq!(sel("bytes=0-1,5-6", None), RangeReply::Full);
        assert_eq!(sel("items=0-1", None), RangeReply::Full);
        assert_eq!(sel("bytes=a-b", None), RangeReply::Full);
        assert_eq!(
            sel("bytes=99999999999999999999999-", None),
            RangeReply::Unsatisfiable
        );
    }

    #[test]
    fn if_range() {
        assert_eq!(
            sel("bytes=0-1", Some("\"e\"")),
            RangeReply::Partial { start: 0, end: 1 }
        );
        assert_eq!(sel("bytes=0-1", Some("\"other\"")), RangeReply::Full);
        assert_eq!(
            sel("bytes=0-1", Some("W/\"e\"")),
            RangeReply::Full,
            "weak never matches"
        );
        assert_eq!(
            sel("bytes=0-1", Some("Tue, 14 Nov 2023 22:13:20 GMT")),
            RangeReply::Full
        );
    }
}
