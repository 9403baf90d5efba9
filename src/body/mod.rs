//! [`ProxyBody`]: the one body type that flows through the proxy in both directions — empty,
//! a shared in-memory `Bytes` or [`Pieces`] (cache hits: a reference-count bump, never a
//! copy), a stream passed through from the other side (optionally after a prefix already
//! read), or a [`fanout::Reader`] (one of the responses sharing a fetch in progress).
//!
//! [`pieces`] is the stored body type; [`fanout`] shares one body being fetched among every
//! request waiting for it, within a memory bound.

pub mod fanout;
pub mod pieces;

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::error::BodyFault;
pub use fanout::Reader;
pub use pieces::Pieces;

/// A request or response body.
#[derive(Debug)]
pub enum ProxyBody {
    Empty,
    /// A complete body held in memory; taken on first poll.
    Full(Option<Bytes>),
    /// A complete body in several shared pieces; `next` is the next piece to send.
    Pieces {
        pieces: Pieces,
        next: usize,
    },
    /// One reader of a body being fetched for several requests at once.
    Fanout(Reader),
    /// A streamed body, with bytes already read from it in `prefix`.
    Stream {
        prefix: Option<Bytes>,
        rest: Incoming,
    },
    /// A downstream request body on its way upstream, cut off after `remaining` bytes
    /// (`MAX_REQUEST_BODY_BYTES`). Its errors are [`BodyFault`]s, which come back with the
    /// failed send ([`BodyFault::find`]), so the caller can answer 413 or 400 instead of
    /// blaming the upstream.
    Downstream {
        rest: Incoming,
        remaining: u64,
    },
}

/// The error a body yields: hyper's, or a [`BodyFault`] of a downstream request body.
pub type BodyError = Box<dyn std::error::Error + Send + Sync>;

impl ProxyBody {
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        if bytes.is_empty() {
            ProxyBody::Empty
        } else {
            ProxyBody::Full(Some(bytes))
        }
    }

    /// A stored body: one `Bytes` when it is one piece (the common case), else its pieces.
    pub fn from_pieces(pieces: &Pieces) -> Self {
        if pieces.is_empty() {
            return ProxyBody::Empty;
        }
        match pieces.single() {
            Some(one) => ProxyBody::Full(Some(one.clone())),
            None => ProxyBody::Pieces {
                pieces: pieces.clone(),
                next: 0,
            },
        }
    }

    pub fn stream(rest: Incoming) -> Self {
        ProxyBody::Stream { prefix: None, rest }
    }
}

impl From<Incoming> for ProxyBody {
    fn from(rest: Incoming) -> Self {
        ProxyBody::stream(rest)
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            ProxyBody::Empty => Poll::Ready(None),
            ProxyBody::Full(bytes) => Poll::Ready(bytes.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Pieces { pieces, next } => {
                let piece = pieces.as_slice().get(*next).cloned();
                *next += 1;
                Poll::Ready(piece.map(|b| Ok(Frame::data(b))))
            }
            ProxyBody::Fanout(reader) => reader
                .poll_next(cx)
                .map(|p| p.map(|r| r.map(Frame::data).map_err(Into::into))),
            ProxyBody::Stream { prefix, rest } => {
                if let Some(p) = prefix.take().filter(|p| !p.is_empty()) {
                    return Poll::Ready(Some(Ok(Frame::data(p))));
                }
                Pin::new(rest).poll_frame(cx).map_err(Into::into)
            }
            ProxyBody::Downstream { rest, remaining } => match Pin::new(rest).poll_frame(cx) {
                Poll::Ready(Some(Err(e))) => {
                    tracing::debug!(error = %e, "downstream request body failed");
                    Poll::Ready(Some(Err(Box::new(BodyFault::Malformed.error()))))
                }
                Poll::Ready(Some(Ok(frame))) => {
                    let len = frame.data_ref().map_or(0, |d| d.len() as u64);
                    if len > *remaining {
                        return Poll::Ready(Some(Err(Box::new(BodyFault::TooLarge.error()))));
                    }
                    *remaining -= len;
                    Poll::Ready(Some(Ok(frame)))
                }
                other => other.map_err(Into::into),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Empty => true,
            ProxyBody::Full(bytes) => bytes.is_none(),
            ProxyBody::Pieces { pieces, next } => *next >= pieces.as_slice().len(),
            ProxyBody::Fanout(reader) => reader.is_finished(),
            ProxyBody::Stream { prefix, rest } => prefix.is_none() && rest.is_end_stream(),
            ProxyBody::Downstream { rest, .. } => rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Empty => SizeHint::with_exact(0),
            ProxyBody::Full(bytes) => {
                SizeHint::with_exact(bytes.as_ref().map_or(0, |b| b.len() as u64))
            }
            ProxyBody::Pieces { pieces, next } => SizeHint::with_exact(
                pieces
                    .as_slice()
                    .iter()
                    .skip(*next)
                    .map(|p| p.len() as u64)
                    .sum(),
            ),
            ProxyBody::Fanout(_) => SizeHint::new(),
            ProxyBody::Downstream { rest, .. } => rest.size_hint(),
            ProxyBody::Stream { prefix, rest } => {
                let extra = prefix.as_ref().map_or(0, |p| p.len() as u64);
                let inner = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower() + extra);
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper + extra);
                }
                hint
            }
        }
    }
}
