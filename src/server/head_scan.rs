//! The HTTP/1 request head scanner: finds request heads that carry both `Content-Length` and
//! `Transfer-Encoding`, which hyper does not report. hyper drops the `Content-Length` and
//! frames by `Transfer-Encoding` (RFC 9112 §6.1 allows that); edgecache answers such a request
//! `400` and closes, as it does every other ambiguous framing. Pure: fed bytes, no I/O, no
//! clock; the I/O wrapper ([`super::io::TrackedIo`]) feeds it, and the `head_scan` fuzz target
//! (`fuzz/`, through [`crate::fuzzing::exercise_head_scan`]) checks it whole, split and byte
//! by byte.

/// Finds request heads that carry both `Content-Length` and `Transfer-Encoding`, fed the
/// bytes of one head as they arrive (split anywhere). Only the start of each line is looked
/// at; it stops at the blank line that ends the head.
///
/// It must agree with hyper (httparse) about where each head starts and ends, or the heads
/// it flags are matched to the wrong requests: like httparse, it skips any number of empty
/// lines (CRLF or bare LF) before the request line (RFC 9112 §2.2), and those count neither
/// as a head of their own nor as the start of one.
#[derive(Debug, Default)]
pub struct HeadScan {
    /// The request line has begun: a byte other than CR or LF has been fed.
    begun: bool,
    /// The first bytes of the current line (enough for the longest name and its colon).
    line: [u8; 18],
    line_len: u8,
    /// Past the 18 bytes kept, or past the colon: the rest of the line is not looked at.
    line_skip: bool,
    content_length: bool,
    transfer_encoding: bool,
}

impl HeadScan {
    /// Feeds head bytes; returns how many it took when the head ended within them.
    ///
    /// Only lines that start with `c`/`t` are looked at, and only up to their colon; the
    /// rest of every line is skipped with a SIMD newline search.
    pub fn feed(&mut self, bytes: &[u8]) -> Option<usize> {
        let mut i = 0;
        if !self.begun {
            // RFC 9112 §2.2: empty lines before the request line are ignored, as httparse
            // does (any number, CRLF or LF). A lone CR it would refuse; hyper answers that.
            i = bytes.iter().position(|&b| b != b'\r' && b != b'\n')?;
            self.begun = true;
        }
        while i < bytes.len() {
            if self.line_skip {
                i += memchr::memchr(b'\n', &bytes[i..])?;
            }
            let b = bytes[i];
            i += 1;
            match b {
                b'\n' => {
                    let line = &self.line[..self.line_len as usize];
                    let blank = !self.line_skip && (line.is_empty() || line == b"\r");
                    self.line_len = 0;
                    self.line_skip = false;
                    if blank {
                        return Some(i);
                    }
                }
                b':' => {
                    let name = &self.line[..self.line_len as usize];
                    self.content_length |= name.eq_ignore_ascii_case(b"content-length");
                    self.transfer_encoding |= name.eq_ignore_ascii_case(b"transfer-encoding");
                    self.line_skip = true;
                }
                _ if self.line_len == 0 && !matches!(b, b'c' | b'C' | b't' | b'T' | b'\r') => {
                    self.line_skip = true;
                }
                _ if (self.line_len as usize) < self.line.len() => {
                    self.line[self.line_len as usize] = b;
                    self.line_len += 1;
                }
                _ => self.line_skip = true,
            }
        }
        None
    }

    /// Bytes of a head (past any empty lines before it) have been fed and its end not seen
    /// yet.
    pub fn in_head(&self) -> bool {
        self.begun
    }

    /// Both `Content-Length` and `Transfer-Encoding` were in the head.
    pub fn ambiguous(&self) -> bool {
        self.content_length && self.transfer_encoding
    }

    /// The head announced a body: the bytes after it are not the next head.
    pub fn has_body(&self) -> bool {
        self.content_length || self.transfer_encoding
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds chunks until the head ends; whether it was ambiguous.
    fn scan(chunks: &[&[u8]]) -> bool {
        let mut scan = HeadScan::default();
        for c in chunks {
            if scan.feed(c).is_some() {
                return scan.ambiguous();
            }
        }
        panic!("the head did not end");
    }

    #[test]
    fn head_scan_finds_content_length_with_transfer_encoding() {
        let head: &[u8] =
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(scan(&[head]));
        // Split anywhere, down to one byte at a time.
        let bytes: Vec<&[u8]> = head.chunks(1).collect();
        assert!(scan(&bytes));
        assert!(scan(&[
            b"POST / HTTP/1.1\r\ntransfer-ENCODING: chunked\r\ncontent-length:4\r\n\r\n"
        ]));
    }

    #[test]
    fn head_scan_ignores_what_is_not_a_field_name_of_this_head() {
        assert!(!scan(&[b"POST / HTTP/1.1\r\nContent-Length: 4\r\n\r\n"]));
        assert!(!scan(&[
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
        ]));
        // In a value, in a longer name, or after the head (the body, a pipelined request).
        assert!(!scan(&[
            b"POST / HTTP/1.1\r\nX-A: transfer-encoding: chunked\r\n",
            b"Content-Length-X: 1\r\nContent-Length: 5\r\n\r\n",
            b"Transfer-Encoding: chunked\r\n\r\n",
        ]));
        let mut head = HeadScan::default();
        let two = b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\n";
        assert_eq!(head.feed(two), Some(27));
        assert!(!head.has_body());
    }

    #[test]
    fn head_scan_skips_empty_lines_before_the_request_line_as_hyper_does() {
        let head: &[u8] =
            b"POST / HTTP/1.1\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n";
        for prefix in [&b"\r\n"[..], b"\n", b"\r\n\r\n\n"] {
            let bytes = [prefix, head].concat();
            // Whole, and split at every point: one head, ending where httparse says.
            for split in 0..=bytes.len() {
                let mut scan = HeadScan::default();
                let first = scan.feed(&bytes[..split]);
                let end = first.or_else(|| scan.feed(&bytes[split..]).map(|n| split + n));
                assert_eq!(end, Some(bytes.len()), "{prefix:?} split at {split}");
                assert!(scan.ambiguous(), "{prefix:?} split at {split}");
            }
        }
        // Empty lines alone are not a head, and do not begin one.
        let mut scan = HeadScan::default();
        assert_eq!(scan.feed(b"\r\n\r\n\n\r"), None);
        assert!(!scan.in_head());
        assert_eq!(scan.feed(b"\nG"), None);
        assert!(scan.in_head());
    }

    /// The scanner and httparse (hyper's parser) agree on where heads end and on whether
    /// both framing headers are present, for every head httparse accepts.
    #[test]
    fn head_scan_agrees_with_httparse() {
        let prefixes: [&[u8]; 4] = [b"", b"\r\n", b"\n\r\n", b"\r\n\r\n"];
        let lines: [&[u8]; 7] = [
            b"Host: x\r\n",
            b"content-length: 4\r\n",
            b"Transfer-Encoding: chunked\n",
            b"X-A: transfer-encoding: chunked\r\n",
            b"Content-Length-X: 1\r\n",
            b"TE: trailers\r\n",
            b"Transfer-Encodings: chunked\r\n",
        ];
        let mut checked = 0;
        for prefix in prefixes {
            for request_line in [&b"POST /a HTTP/1.1\r\n"[..], b"TRACE /t HTTP/1.1\n"] {
                for mask in 0u32..(1 << lines.len()) {
                    let mut bytes = [prefix, request_line].concat();
                    for (i, line) in lines.iter().enumerate() {
                        if mask & (1 << i) != 0 {
                            bytes.extend_from_slice(line);
                        }
                    }
                    bytes.extend_from_slice(b"\r\n");
                    let head_len = bytes.len();
                    bytes.extend_from_slice(b"GET /next HTTP/1.1\r\n\r\n");
                    let mut fields = [httparse::EMPTY_HEADER; 16];
                    let mut req = httparse::Request::new(&mut fields);
                    let Ok(httparse::Status::Complete(n)) = req.parse(&bytes) else {
                        panic!("httparse refused {:?}", String::from_utf8_lossy(&bytes));
                    };
                    assert_eq!(n, head_len);
                    let has = |name: &str| {
                        req.headers
                            .iter()
                            .any(|h| h.name.eq_ignore_ascii_case(name))
                    };
                    let mut scan = HeadScan::default();
                    assert_eq!(
                        scan.feed(&bytes),
                        Some(n),
                        "{:?}",
                        String::from_utf8_lossy(&bytes)
                    );
                    assert_eq!(
                        scan.ambiguous(),
                        has("content-length") && has("transfer-encoding"),
                        "{:?}",
                        String::from_utf8_lossy(&bytes)
                    );
                    checked += 1;
                }
            }
        }
        assert_eq!(checked, 4 * 2 * 128);
    }
}
