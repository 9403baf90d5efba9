//! [`Pieces`]: a complete body held in memory as the pieces it arrived in. A large response
//! that was streamed to its waiters while it was fetched is stored as those same pieces — the
//! stored entry and the readers share every byte, nothing is copied afterwards. (A small one,
//! at most 16 KiB, is copied into memory its entry owns — behind the head block, or in an
//! exact-size allocation when that takes less memory — and served as one piece that holds
//! the entry, see [`crate::cache::entry`].) A body of one piece is held without any slice
//! allocated around it.

use std::ops::RangeInclusive;
use std::sync::Arc;

use bytes::Bytes;

/// An immutable body made of shared pieces; cloning it is one reference-count bump. A body
/// of one piece (most small ones, and a stored entry's inline body) is held as that piece
/// alone, with no slice allocated around it.
#[derive(Debug, Clone)]
pub struct Pieces(Repr);

#[derive(Debug, Clone)]
enum Repr {
    /// One piece, possibly empty (then the body is empty).
    One(Bytes),
    /// Two or more non-empty pieces and their total length.
    Many(Arc<[Bytes]>, usize),
}

impl Default for Pieces {
    fn default() -> Pieces {
        Pieces(Repr::One(Bytes::new()))
    }
}

impl Pieces {
    /// A body from its pieces, in order. Empty pieces are dropped.
    pub fn new(pieces: Vec<Bytes>) -> Pieces {
        let mut pieces: Vec<Bytes> = pieces.into_iter().filter(|p| !p.is_empty()).collect();
        match pieces.len() {
            0 => Pieces::default(),
            1 => Pieces(Repr::One(pieces.pop().unwrap_or_default())),
            _ => {
                let len = pieces.iter().map(Bytes::len).sum();
                Pieces(Repr::Many(pieces.into(), len))
            }
        }
    }

    /// Total length in bytes.
    pub fn len(&self) -> usize {
        match &self.0 {
            Repr::One(b) => b.len(),
            Repr::Many(_, len) => *len,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The pieces, in order (none is empty).
    pub fn as_slice(&self) -> &[Bytes] {
        match &self.0 {
            Repr::One(b) if b.is_empty() => &[],
            Repr::One(b) => std::slice::from_ref(b),
            Repr::Many(pieces, _) => pieces,
        }
    }

    /// The body as one `Bytes` when it is a single piece.
    pub fn single(&self) -> Option<&Bytes> {
        match &self.0 {
            Repr::One(b) if !b.is_empty() => Some(b),
            _ => None,
        }
    }

    /// Bytes `range` of the body (clamped to its length), as slices of the same pieces.
    pub fn slice(&self, range: RangeInclusive<usize>) -> Pieces {
        let len = self.len();
        let (start, end) = (*range.start(), (*range.end()).min(len.saturating_sub(1)));
        if len == 0 || start > end {
            return Pieces::default();
        }
        let mut out = Vec::new();
        let mut at = 0;
        for piece in self.as_slice() {
            let (from, to) = (at, at + piece.len()); // this piece holds bytes from..to
            at = to;
            if to <= start {
                continue;
            }
            if from > end {
                break;
            }
            let lo = start.saturating_sub(from);
            let hi = (end + 1 - from).min(piece.len());
            out.push(piece.slice(lo..hi));
        }
        Pieces::new(out)
    }

    /// A copy as one contiguous vector (tests and small bodies only).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.len());
        for p in self.as_slice() {
            v.extend_from_slice(p);
        }
        v
    }
}

/// Equal when the bytes are, however they are split into pieces.
impl PartialEq for Pieces {
    fn eq(&self, other: &Pieces) -> bool {
        self.len() == other.len() && self.to_vec() == other.to_vec()
    }
}

impl PartialEq<[u8]> for Pieces {
    fn eq(&self, other: &[u8]) -> bool {
        self.len() == other.len() && {
            let mut rest = other;
            self.as_slice().iter().all(|p| {
                let (head, tail) = rest.split_at(p.len());
                rest = tail;
                head == &p[..]
            })
        }
    }
}

impl PartialEq<&str> for Pieces {
    fn eq(&self, other: &&str) -> bool {
        *self == *other.as_bytes()
    }
}

impl From<Bytes> for Pieces {
    fn from(b: Bytes) -> Pieces {
        Pieces(Repr::One(b))
    }
}

impl From<&'static str> for Pieces {
    fn from(s: &'static str) -> Pieces {
        Pieces::from(Bytes::from_static(s.as_bytes()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body() -> Pieces {
        Pieces::new(vec![
            Bytes::from_static(b"abc"),
            Bytes::new(),
            Bytes::from_static(b"defg"),
            Bytes::from_static(b"h"),
        ])
    }

    #[test]
    fn slices_cross_piece_boundaries() {
        let b = body();
        assert_eq!(b.len(), 8);
        assert_eq!(b.as_slice().len(), 3, "the empty piece is dropped");
        assert_eq!(b.to_vec(), b"abcdefgh");
        for start in 0..8 {
            for end in start..10 {
                let want = &b"abcdefgh"[start..=end.min(7)];
                assert_eq!(b.slice(start..=end).to_vec(), want, "{start}..={end}");
            }
        }
        assert!(b.slice(9..=12).is_empty());
        assert_eq!(b.slice(3..=6).single().map(|s| &s[..]), Some(&b"defg"[..]));
    }

    #[test]
    fn empty_and_single() {
        assert!(Pieces::default().is_empty());
        assert!(Pieces::default().slice(0..=3).is_empty());
        let one = Pieces::from(Bytes::from_static(b"x"));
        assert_eq!(one.single().map(|s| &s[..]), Some(&b"x"[..]));
        assert!(body().single().is_none());
        assert_eq!(body(), "abcdefgh");
        assert_ne!(body(), "abcdefgX");
        assert_ne!(body(), "abc");
        assert_eq!(body(), Pieces::from(Bytes::from_static(b"abcdefgh")));
        let empty = Pieces::from(Bytes::new());
        assert!(empty.is_empty() && empty.as_slice().is_empty() && empty.single().is_none());
        assert_eq!(
            Pieces::new(vec![Bytes::new(), Bytes::from_static(b"y")])
                .as_slice()
                .len(),
            1
        );
    }
}
