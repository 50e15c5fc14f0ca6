//! The response body type of the proxy: either the upstream's body, streamed through untouched
//! (data and trailers), or a small body the proxy made itself.
//!
//! An enum rather than a boxed trait object: no allocation per response, and both variants are
//! `Unpin`, so no pin projection is needed.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;

use crate::pool::UpstreamBody;

use crate::resilience::timeout::{BoxError, TrackedBody};

#[derive(Debug)]
pub enum ProxyBody {
    Upstream(UpstreamBody),
    Local(Full<Bytes>),
    /// An upstream body under a resilience policy (slots held, stream idle timeout).
    Tracked(TrackedBody),
}

impl ProxyBody {
    pub fn text(text: impl Into<Bytes>) -> Self {
        ProxyBody::Local(Full::new(text.into()))
    }

    pub fn empty() -> Self {
        // `Full` of an empty buffer reports end-of-stream at once, so HTTP/2 sends the
        // headers with END_STREAM: a gRPC trailers-only response.
        ProxyBody::Local(Full::new(Bytes::new()))
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ProxyBody::Upstream(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            ProxyBody::Tracked(body) => Pin::new(body).poll_frame(cx),
            ProxyBody::Local(body) => Pin::new(body)
                .poll_frame(cx)
                .map_err(|never: Infallible| match never {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Upstream(body) => body.is_end_stream(),
            ProxyBody::Tracked(body) => body.is_end_stream(),
            ProxyBody::Local(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Upstream(body) => body.size_hint(),
            ProxyBody::Tracked(body) => body.size_hint(),
            ProxyBody::Local(body) => body.size_hint(),
        }
    }
}

/// A downstream request's body: hyper's for the requests hyper parsed, none for those the
/// HTTP/1.1 fast path served (it takes only requests that are all head, see
/// [`crate::h1_server`]). Errors are hyper's, whichever side read it.
#[derive(Debug)]
pub enum DownstreamBody {
    Empty,
    Hyper(hyper::body::Incoming),
}

impl From<hyper::body::Incoming> for DownstreamBody {
    fn from(body: hyper::body::Incoming) -> Self {
        DownstreamBody::Hyper(body)
    }
}

impl Body for DownstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            DownstreamBody::Empty => Poll::Ready(None),
            DownstreamBody::Hyper(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            DownstreamBody::Empty => true,
            DownstreamBody::Hyper(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            DownstreamBody::Empty => SizeHint::with_exact(0),
            DownstreamBody::Hyper(b) => b.size_hint(),
        }
    }
}
