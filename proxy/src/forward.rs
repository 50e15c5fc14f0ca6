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
use crate::identity::mesh::MeshClient;
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
    /// mTLS to destinations that have an identity; `None` when this proxy has none.
    mesh: Option<MeshClient>,
    /// `outbound` or `inbound`, for logs.
    side: &'static str,
}

impl Forwarder {
    pub fn new(mode: Mode, upstream: Upstream) -> Self {
        Self::with_mesh(mode, upstream, None)
    }

    pub fn with_mesh(mode: Mode, upstream: Upstream, mesh: Option<MeshClient>) -> Self {
        let side = match mode {
            Mode::Outbound(_) => "outbound",
            Mode::Inbound { .. } => "inbound",
        };
        Self {
            inner: Arc::new(Inner {
                mode,
                upstream,
                mesh,
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
        let (endpoint, protocol, identity) = match &self.inner.mode {
            Mode::Outbound(state) => {
                // Route while holding the snapshot, then let go of it before any `.await`:
                // the request keeps only the endpoint it was given, so a config swap cannot
                // disturb it.
                let snapshot = state.load();
                let target = snapshot.table.route(&req)?;
                let identity = self
                    .inner
                    .mesh
                    .as_ref()
                    .and_then(|_| snapshot.security.identity(&target.set.service));
                (
                    target.endpoint.authority.clone(),
                    target.set.protocol,
                    identity,
                )
            }
            Mode::Inbound { app, protocol } => (app.clone(), *protocol, None),
        };
        if let (Some(mesh), Some(identity)) = (&self.inner.mesh, identity) {
            return Ok(mesh.forward(req, endpoint, identity).await?);
        }
        let protocol = UpstreamProtocol::resolve(protocol, req.version());
        Ok(self.inner.upstream.forward(req, endpoint, protocol).await?)
    }
}
