//! Which timeout fired, and the response body wrapper that enforces the stream idle timeout
//! and holds the request's in-flight and bulkhead slots until the body ends.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::pool::UpstreamBody;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::time::{Instant, Sleep};

use super::bulkhead::Permit;
use super::stats::InflightGuard;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeoutKind {
    Request,
    PerTry,
    Connect,
    StreamIdle,
}

impl TimeoutKind {
    /// The `x-weft-reason` value.
    pub fn reason(self) -> &'static str {
        match self {
            TimeoutKind::Request => "request_timeout",
            TimeoutKind::PerTry => "per_try_timeout",
            TimeoutKind::Connect => "connect_timeout",
            TimeoutKind::StreamIdle => "stream_idle_timeout",
        }
    }
}

impl fmt::Display for TimeoutKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.reason())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("stream idle timeout of {0:?} expired: the upstream sent nothing")]
pub struct StreamIdleTimeout(pub Duration);

/// An upstream response body with the slots it holds and an optional idle timer.
#[derive(Debug)]
pub struct TrackedBody {
    inner: UpstreamBody,
    _inflight: Option<InflightGuard>,
    _permit: Option<Permit>,
    idle: Option<(Duration, Pin<Box<Sleep>>)>,
}

impl TrackedBody {
    pub fn new(
        inner: UpstreamBody,
        inflight: Option<InflightGuard>,
        permit: Option<Permit>,
        idle: Option<Duration>,
    ) -> Self {
        Self {
            inner,
            _inflight: inflight,
            _permit: permit,
            idle: idle.map(|d| (d, Box::pin(tokio::time::sleep(d)))),
        }
    }
}

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl Body for TrackedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                if let Some((d, sleep)) = &mut this.idle {
                    sleep.as_mut().reset(Instant::now() + *d);
                }
                if frame.is_none() {
                    // Done: give the slots back now, not when hyper drops the body.
                    this._inflight = None;
                    this._permit = None;
                }
                Poll::Ready(frame)
            }
            Poll::Pending => {
                if let Some((d, sleep)) = &mut this.idle
                    && sleep.as_mut().poll(cx).is_ready()
                {
                    return Poll::Ready(Some(Err(StreamIdleTimeout(*d).into())));
                }
                Poll::Pending
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
