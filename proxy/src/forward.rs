//! The proxy service behind both traffic listeners.
//!
//! Outbound: route the request with the running table, then forward it to the chosen endpoint.
//! Inbound: forward every request to the local application. Both stream bodies and trailers
//! and turn failures into responses through [`crate::error`].

use std::sync::Arc;

use http::uri::Authority;
use http::{Request, Response};
use hyper::body::Incoming;
use weft_proto::model::Protocol;

use crate::body::ProxyBody;
use crate::error::{ProxyError, is_grpc};
use crate::state::ProxyState;
use crate::upstream::{Upstream, UpstreamProtocol};

/// Where a listener sends its requests.
#[derive(Debug)]
pub enum Mode {
    /// Route by host and rules with the running configuration.
    Outbound(Arc<ProxyState>),
    /// Send everything to the local application, in `protocol` (`auto`: as received).
    Inbound { app: Authority, protocol: Protocol },
}

/// Cheap to clone: one per connection, shared by its requests.
#[derive(Debug, Clone)]
pub struct Forwarder {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    mode: Mode,
    upstream: Upstream,
    /// `outbound` or `inbound`, for logs.
    side: &'static str,
}

impl Forwarder {
    pub fn new(mode: Mode, upstream: Upstream) -> Self {
        let side = match mode {
            Mode::Outbound(_) => "outbound",
            Mode::Inbound { .. } => "inbound",
        };
        Self {
            inner: Arc::new(Inner {
                mode,
                upstream,
                side,
            }),
        }
    }

    /// Never fails: errors become responses, so the connection stays up for the next request.
    pub async fn handle(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        let grpc = is_grpc(req.headers());
        let version = req.version();
        match self.forward(req).await {
            Ok(resp) => resp,
            Err(err) => {
                tracing::debug!(
                    side = self.inner.side,
                    reason = err.reason(),
                    error = %err,
                    "request failed in the proxy"
                );
                err.to_response(grpc, version)
            }
        }
    }

    async fn forward(&self, req: Request<Incoming>) -> Result<Response<ProxyBody>, ProxyError> {
        let (endpoint, protocol, stats) = match &self.inner.mode {
            Mode::Outbound(state) => {
                // Route while holding the snapshot, then let go of it before any `.await`:
                // the request keeps only the endpoint it was given, so a config swap cannot
                // disturb it.
                let snapshot = state.load();
                let target = snapshot.table.route(&req)?;
                let stats = Some(target.set.stats.clone());
                (
                    target.endpoint.authority.clone(),
                    target.set.protocol,
                    stats,
                )
            }
            Mode::Inbound { app, protocol } => (app.clone(), *protocol, None),
        };
        let protocol = UpstreamProtocol::resolve(protocol, req.version());
        let started = std::time::Instant::now();
        let result = self.inner.upstream.forward(req, endpoint, protocol).await;
        if let Some(stats) = stats {
            let failed = result
                .as_ref()
                .map_or(true, |r| r.status().is_server_error());
            stats.record(failed, started.elapsed());
        }
        Ok(result?)
    }
}
