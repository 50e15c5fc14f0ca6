//! Request bodies that can be sent again: the first attempt streams from the client while the
//! chunks (shared `Bytes`, not copies) are kept, up to a cap; a retry or a mirror replays them
//! and then continues from the client where the first attempt left off. Once the body grows
//! past the cap the kept chunks are dropped and the request is no longer replayable: large
//! bodies stream through and are never buffered whole.

use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use crate::body::DownstreamBody;
use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use super::timeout::BoxError;

/// The body the upstream clients send.
#[derive(Debug)]
pub enum RequestBody {
    /// Streamed once, straight from the client.
    Stream(DownstreamBody),
    Replay(ReplayBody),
}

impl From<DownstreamBody> for RequestBody {
    fn from(b: DownstreamBody) -> Self {
        RequestBody::Stream(b)
    }
}

#[derive(Debug)]
struct Shared {
    source: Option<DownstreamBody>,
    chunks: Vec<Bytes>,
    trailers: Option<HeaderMap>,
    buffered: usize,
    cap: usize,
    /// More than `cap` bytes went through: chunks were dropped, no replay possible.
    overflow: bool,
    /// The client's body ended (all of it is in `chunks` unless `overflow`).
    done: bool,
    /// The client's body failed.
    failed: bool,
    hint: SizeHint,
}

/// One reader of a replayable body. Readers made by [`ReplayBody::replay`] start over.
#[derive(Debug)]
pub struct ReplayBody {
    shared: Arc<Mutex<Shared>>,
    pos: usize,
    trailers_sent: bool,
}

impl ReplayBody {
    /// `None` when the body is known to exceed `cap` (`content-length`): stream it instead.
    pub fn new(body: DownstreamBody, cap: usize) -> Result<Self, DownstreamBody> {
        let hint = body.size_hint();
        if hint.lower() as usize > cap {
            return Err(body);
        }
        let done = body.is_end_stream();
        Ok(Self {
            shared: Arc::new(Mutex::new(Shared {
                source: (!done).then_some(body),
                chunks: Vec::new(),
                trailers: None,
                buffered: 0,
                cap,
                overflow: false,
                done,
                failed: false,
                hint,
            })),
            pos: 0,
            trailers_sent: false,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new reader from the start; `None` when the kept chunks are gone (too large, or the
    /// client's body failed).
    pub fn replay(&self) -> Option<ReplayBody> {
        let s = self.lock();
        (!s.overflow && !s.failed).then(|| ReplayBody {
            shared: self.shared.clone(),
            pos: 0,
            trailers_sent: false,
        })
    }

    /// True when the whole body is kept: a copy can be sent without touching the client.
    pub fn is_complete(&self) -> bool {
        let s = self.lock();
        s.done && !s.overflow && !s.failed
    }
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let mut s = this.shared.lock().unwrap_or_else(|e| e.into_inner());
        if this.pos < s.chunks.len() {
            let chunk = s.chunks[this.pos].clone();
            this.pos += 1;
            return Poll::Ready(Some(Ok(Frame::data(chunk))));
        }
        if s.done {
            if !this.trailers_sent
                && let Some(t) = s.trailers.clone()
            {
                this.trailers_sent = true;
                return Poll::Ready(Some(Ok(Frame::trailers(t))));
            }
            return Poll::Ready(None);
        }
        if s.overflow && this.pos != usize::MAX {
            // Only the reader that went past the cap may continue; others cannot replay.
            return Poll::Ready(Some(Err("request body is too large to replay".into())));
        }
        let Some(source) = s.source.as_mut() else {
            return Poll::Ready(Some(Err("request body is gone".into())));
        };
        match Pin::new(source).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                s.done = true;
                s.source = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                s.failed = true;
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(Some(Ok(frame))) => {
                let frame = match frame.into_data() {
                    Ok(data) => {
                        if !s.overflow {
                            if s.buffered + data.len() <= s.cap {
                                s.buffered += data.len();
                                s.chunks.push(data.clone());
                                this.pos += 1;
                            } else {
                                s.overflow = true;
                                s.chunks = Vec::new();
                                this.pos = usize::MAX;
                            }
                        }
                        // hyper stops polling once `content-length` bytes are read: notice
                        // the end here, or the body would never count as complete.
                        if s.source.as_ref().is_some_and(Body::is_end_stream) {
                            s.done = true;
                            s.source = None;
                        }
                        Frame::data(data)
                    }
                    Err(frame) => match frame.into_trailers() {
                        Ok(t) => {
                            s.trailers = Some(t.clone());
                            s.done = true;
                            s.source = None;
                            this.trailers_sent = true;
                            Frame::trailers(t)
                        }
                        Err(other) => other,
                    },
                };
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let s = self.lock();
        s.done && self.pos >= s.chunks.len() && (s.trailers.is_none() || self.trailers_sent)
    }

    fn size_hint(&self) -> SizeHint {
        self.lock().hint
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RequestBody::Stream(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            RequestBody::Replay(b) => Pin::new(b).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Stream(b) => b.is_end_stream(),
            RequestBody::Replay(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Stream(b) => b.size_hint(),
            RequestBody::Replay(b) => b.size_hint(),
        }
    }
}
