//! The proxy service behind both traffic listeners.
//!
//! Outbound: route the request with the running table, then forward it to the chosen endpoint.
//! Inbound: forward every request to the local application. Both stream bodies and trailers
//! and turn failures into responses through [`crate::error`].

use std::sync::Arc;

use crate::body::DownstreamBody;
use http::uri::Authority;
use http::{Request, Response};
use weft_proto::model::Protocol;

use crate::body::ProxyBody;
use crate::cors::Outcome;
use crate::error::{ProxyError, is_grpc};
use crate::identity::mesh::MeshClient;
use crate::metrics::{Direction, TargetLabels};
use crate::observe::{Observation, ObservedBody, RequestMeta, Telemetry};
use crate::routing::{Resolved, RouteError};
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
    direction: Direction,
    telemetry: Arc<Telemetry>,
}

impl Forwarder {
    /// The same forwarder sending to another local app address (transparent inbound: the
    /// app port is the connection's original destination port).
    pub fn for_app(&self, app: Authority) -> Self {
        let mode = match &self.inner.mode {
            Mode::Inbound { protocol, .. } => Mode::Inbound {
                app,
                protocol: *protocol,
            },
            Mode::Outbound(state) => Mode::Outbound(state.clone()),
        };
        Self {
            inner: Arc::new(Inner {
                mode,
                upstream: self.inner.upstream.clone(),
                mesh: self.inner.mesh.clone(),
                side: self.inner.side,
                direction: self.inner.direction,
                telemetry: self.inner.telemetry.clone(),
            }),
        }
    }

    /// How to reach `service` over mTLS: when this proxy has an identity and `service` has
    /// one (HTTP requests, upgrades and captured opaque TCP alike).
    pub fn mtls(
        &self,
        security: &crate::policy::SecurityTable,
        service: &str,
    ) -> Option<crate::resilience::call::Mtls> {
        let client = self.inner.mesh.as_ref()?;
        Some(crate::resilience::call::Mtls {
            client: client.clone(),
            identity: security.identity(service)?,
        })
    }

    /// The local app an inbound forwarder sends to; `None` outbound.
    pub fn app(&self) -> Option<&Authority> {
        match &self.inner.mode {
            Mode::Inbound { app, .. } => Some(app),
            Mode::Outbound(_) => None,
        }
    }

    pub fn new(mode: Mode, upstream: Upstream) -> Self {
        Self::with(mode, upstream, Telemetry::disabled(), None)
    }

    /// A forwarder that reports metrics, spans and access logs to `telemetry`.
    pub fn with_telemetry(mode: Mode, upstream: Upstream, telemetry: Arc<Telemetry>) -> Self {
        Self::with(mode, upstream, telemetry, None)
    }

    /// A forwarder that speaks mTLS (through `mesh`) to destinations that have an identity.
    pub fn with_mesh(mode: Mode, upstream: Upstream, mesh: Option<MeshClient>) -> Self {
        Self::with(mode, upstream, Telemetry::disabled(), mesh)
    }

    pub fn with(
        mode: Mode,
        upstream: Upstream,
        telemetry: Arc<Telemetry>,
        mesh: Option<MeshClient>,
    ) -> Self {
        let direction = match mode {
            Mode::Outbound(_) => Direction::Outbound,
            Mode::Inbound { .. } => Direction::Inbound,
        };
        Self {
            inner: Arc::new(Inner {
                mode,
                upstream,
                mesh,
                side: direction.as_str(),
                direction,
                telemetry,
            }),
        }
    }

    /// [`Self::handle`], observed: metrics, trace span and access log around it.
    //
    // The request path's functions return `async move` blocks instead of being `async fn`s: an
    // `async fn` keeps each by-value argument twice in its future (the argument and the local
    // it is moved to), and the request (264 bytes) would be carried, and copied at every
    // poll layer, once per layer more than needed.
    pub fn serve(
        &self,
        mut req: Request<DownstreamBody>,
    ) -> impl Future<Output = Response<ObservedBody>> {
        let obs = self.observe(&mut req);
        async move {
            let mut meta = RequestMeta {
                started: Some(obs.started()),
                ..RequestMeta::default()
            };
            let resp = self.handle_with(req, &mut meta).await;
            obs.respond(resp, meta)
        }
    }

    /// Starts observing a request; for callers that answer some requests themselves (the
    /// inbound guard) and must still have every answer counted and traced.
    pub(crate) fn observe(&self, req: &mut Request<DownstreamBody>) -> Observation {
        Observation::start(&self.inner.telemetry, self.inner.direction, req)
    }

    /// Never fails: errors become responses, so the connection stays up for the next request.
    pub async fn handle(&self, req: Request<DownstreamBody>) -> Response<ProxyBody> {
        self.handle_with(req, &mut RequestMeta::default()).await
    }

    pub(crate) fn handle_with(
        &self,
        req: Request<DownstreamBody>,
        meta: &mut RequestMeta,
    ) -> impl Future<Output = Response<ProxyBody>> {
        let grpc = is_grpc(req.headers());
        let version = req.version();
        async move {
            let mut resp = match self.forward(req, meta).await {
                Ok(resp) => resp,
                Err(err) => {
                    meta.reason = Some(err.reason());
                    if let ProxyError::Route(RouteError::NoEndpoints { service, subset }) = &err {
                        // Error path only: the target is known by name, not by compiled labels.
                        meta.target = Some(Arc::new(TargetLabels::new("", service, subset)));
                    }
                    tracing::debug!(
                        side = self.inner.side,
                        reason = err.reason(),
                        error = %err,
                        "request failed in the proxy"
                    );
                    err.to_response(grpc, version)
                }
            };
            if let Some(grant) = meta.cors.take() {
                grant.apply(resp.headers_mut());
            }
            resp
        }
    }

    #[allow(
        clippy::manual_async_fn,
        reason = "an `async fn` would keep the request twice in its future"
    )]
    fn forward(
        &self,
        mut req: Request<DownstreamBody>,
        meta: &mut RequestMeta,
    ) -> impl Future<Output = Result<Response<ProxyBody>, ProxyError>> {
        async move {
            let (endpoint, protocol) = match &self.inner.mode {
                Mode::Outbound(state) => {
                    // Route while holding the snapshot, then let go of it before any `.await`:
                    // the request keeps only its backend set and rule policy (the endpoint is
                    // chosen per attempt), so a config swap cannot disturb it.
                    let snapshot = state.load();
                    // Captured connections carry where they were going (transparent mode).
                    let orig = req
                        .extensions()
                        .get::<crate::intercept::OriginalDst>()
                        .map(|o| o.0);
                    let resolved = snapshot.table.resolve_at(&req, orig)?;
                    match crate::cors::Cors::outcome(resolved.policy(), &req) {
                        None => {}
                        Some(Outcome::Grant(grant)) => meta.cors = Some(grant),
                        Some(Outcome::Preflight(resp, labels)) => {
                            meta.target = Some(labels);
                            return Ok(*resp);
                        }
                    }
                    let (set, policy, labels) = match resolved {
                        Resolved::Forward {
                            set,
                            policy,
                            labels,
                        } => (set, policy, labels),
                        Resolved::Answer {
                            answer,
                            policy,
                            labels,
                        } => {
                            meta.target = Some(labels);
                            let mut resp = answer.respond(&req);
                            if let Some(e) = &policy.headers {
                                e.response.apply(resp.headers_mut());
                            }
                            return Ok(resp);
                        }
                    };
                    meta.target = Some(labels);
                    if let Some(r) = &policy.rewrite {
                        r.apply(&mut req);
                    }
                    let edits = policy.headers.clone();
                    if let Some(e) = &edits {
                        e.request.apply(req.headers_mut());
                    }
                    // Experiments judge a subset by what its callers saw after retries: one
                    // outcome per request, recorded here.
                    let subset_stats = set.subset_stats.clone();
                    let started = meta.started.unwrap_or_else(std::time::Instant::now);
                    let mtls = self.mtls(&snapshot.security, &set.service);
                    drop(snapshot);
                    if crate::upgrade::is_upgrade(&req) {
                        let idx = set.choose(req.headers(), None).ok_or_else(|| {
                            RouteError::NoEndpoints {
                                service: set.service.clone(),
                                subset: set.subset.clone(),
                            }
                        })?;
                        let endpoint = set.endpoint(idx).authority.clone();
                        meta.upstream = Some(endpoint.clone());
                        // Boxed: rare, and the request's future stays small.
                        let tls = set.runtime.upstream.tls();
                        let upgrade = crate::upgrade::forward(req, endpoint, mtls.as_ref(), tls);
                        let mut resp = Box::pin(upgrade).await?;
                        if let Some(e) = &edits {
                            e.response.apply(resp.headers_mut());
                        }
                        return Ok(resp);
                    }
                    let result = crate::resilience::call::forward(
                        set,
                        policy,
                        req,
                        mtls,
                        self.inner.mesh.as_ref(),
                    )
                    .await;
                    let failed = result
                        .as_ref()
                        .map_or(true, |(r, _)| r.status().is_server_error());
                    let elapsed = started.elapsed();
                    meta.elapsed = Some(elapsed);
                    subset_stats.record(failed, elapsed);
                    let (mut resp, attempted) = result?;
                    if let Some(e) = &edits {
                        e.response.apply(resp.headers_mut());
                    }
                    meta.upstream = Some(attempted.endpoint);
                    meta.retries = attempted.retries;
                    return Ok(resp);
                }
                Mode::Inbound { app, protocol } => {
                    meta.target = Some(self.inner.telemetry.inbound_target.clone());
                    (app.clone(), *protocol)
                }
            };
            meta.upstream = Some(endpoint.clone());
            if crate::upgrade::is_upgrade(&req) {
                return Ok(Box::pin(crate::upgrade::forward(req, endpoint, None, None)).await?);
            }
            let protocol = UpstreamProtocol::resolve(protocol, req.version());
            Ok(self
                .inner
                .upstream
                .forward(req.map(Into::into), endpoint, protocol)
                .await?)
        }
    }
}
