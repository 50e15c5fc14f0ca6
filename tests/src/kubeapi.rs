//! A minimal Kubernetes API server for the discovery tests: exactly what kube-rs's watcher
//! uses, over real HTTP on loopback.
//!
//! - LIST `GET /api/v1/services`, `/apis/discovery.k8s.io/v1/endpointslices`,
//!   `/apis/gateway.networking.k8s.io/v1/httproutes` (all namespaces, or one with
//!   `…/namespaces/<ns>/…`): a `…List` object whose `metadata.resourceVersion` is the server's
//!   current one.
//! - WATCH (the same paths with `watch=true&resourceVersion=N`): a chunked stream of
//!   newline-delimited `{"type": "ADDED"|"MODIFIED"|"DELETED", "object": …}` events newer than
//!   N, kept open for the events that follow.
//!
//! - `POST /apis/authentication.k8s.io/v1/tokenreviews`: reviews the service-account tokens
//!   minted with [`FakeApiServer::service_account_token`] as the API server does (authenticated
//!   only for a known token whose audiences meet the requested ones; user
//!   `system:serviceaccount:<ns>:<name>`).
//!
//! Objects are real Kubernetes JSON (the tests build them with `k8s-openapi` / `gateway-api`
//! types and serde); every change gets the next resourceVersion, as in etcd. Anything else is
//! answered 404 with a `Status` object — also the HTTPRoute paths when the server is started
//! without the Gateway API CRDs. [`FakeApiServer::stop`] drops the listener and every open
//! connection (watches included), as an API server that went away.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::StreamExt as _;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio::task::{AbortHandle, JoinHandle};

/// The resource kinds served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Service,
    EndpointSlice,
    HttpRoute,
}

impl Kind {
    fn of_path(path: &str) -> Option<Kind> {
        match path {
            "/api/v1/services" => Some(Kind::Service),
            "/apis/discovery.k8s.io/v1/endpointslices" => Some(Kind::EndpointSlice),
            "/apis/gateway.networking.k8s.io/v1/httproutes" => Some(Kind::HttpRoute),
            _ => None,
        }
    }

    fn of_object(obj: &Value) -> Kind {
        match obj["kind"].as_str() {
            Some("Service") => Kind::Service,
            Some("EndpointSlice") => Kind::EndpointSlice,
            Some("HTTPRoute") => Kind::HttpRoute,
            other => panic!("the fake API server does not serve kind {other:?}"),
        }
    }

    fn list(self) -> (&'static str, &'static str) {
        match self {
            Kind::Service => ("v1", "ServiceList"),
            Kind::EndpointSlice => ("discovery.k8s.io/v1", "EndpointSliceList"),
            Kind::HttpRoute => ("gateway.networking.k8s.io/v1", "HTTPRouteList"),
        }
    }
}

/// One change, as a watch sends it.
#[derive(Debug, Clone)]
struct Event {
    rv: u64,
    kind: Kind,
    kind_type: &'static str,
    object: Value,
}

impl Event {
    fn line(&self) -> Bytes {
        let mut line = json!({"type": self.kind_type, "object": self.object}).to_string();
        line.push('\n');
        Bytes::from(line)
    }
}

#[derive(Debug, Default)]
struct State {
    rv: u64,
    objects: BTreeMap<(Kind, String, String), Value>,
    /// Every event since start (tests are short); a watch replays those newer than its rv.
    log: Vec<Event>,
}

struct Shared {
    state: Mutex<State>,
    events: broadcast::Sender<Event>,
    with_routes: bool,
    conns: Mutex<Vec<AbortHandle>>,
    /// LIST and WATCH requests answered, by path (with `?watch=true` marked).
    requests: Mutex<Vec<String>>,
    /// Service-account tokens: token → (username, audiences).
    tokens: Mutex<BTreeMap<String, (String, Vec<String>)>>,
}

/// A running fake API server.
pub struct FakeApiServer {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

type Body = BoxBody<Bytes, Infallible>;

impl FakeApiServer {
    /// Serves Services, EndpointSlices and (with `with_routes`, i.e. the Gateway API CRDs
    /// installed) HTTPRoutes.
    pub async fn start(with_routes: bool) -> FakeApiServer {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake API server");
        let addr = listener.local_addr().expect("fake API server addr");
        let shared = Arc::new(Shared {
            state: Mutex::default(),
            events: broadcast::channel(1024).0,
            with_routes,
            conns: Mutex::default(),
            requests: Mutex::default(),
            tokens: Mutex::default(),
        });
        let accept_shared = shared.clone();
        let accept = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let shared = accept_shared.clone();
                let conn = tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let shared = shared.clone();
                        async move {
                            if req.method() == http::Method::POST
                                && req.uri().path() == TOKEN_REVIEWS
                            {
                                let body = req.into_body().collect().await.map(|b| b.to_bytes());
                                return Ok::<_, Infallible>(review(
                                    &shared,
                                    &body.unwrap_or_default(),
                                ));
                            }
                            Ok::<_, Infallible>(handle(&shared, &req))
                        }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
                lock(&accept_shared.conns).push(conn.abort_handle());
            }
        });
        FakeApiServer {
            addr,
            shared,
            accept,
        }
    }

    /// Creates or replaces an object (ADDED or MODIFIED); `object` is any k8s-openapi or
    /// gateway-api object (its `kind` says where it belongs).
    pub fn apply(&self, object: &impl serde::Serialize) {
        let mut object = serde_json::to_value(object).expect("object to JSON");
        let kind = Kind::of_object(&object);
        let key = key(kind, &object);
        let mut state = lock(&self.shared.state);
        state.rv += 1;
        object["metadata"]["resourceVersion"] = Value::String(state.rv.to_string());
        let kind_type = if state.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        state.objects.insert(key, object.clone());
        let event = Event {
            rv: state.rv,
            kind,
            kind_type,
            object,
        };
        state.log.push(event.clone());
        // No watcher yet is fine: they replay the log.
        let _ = self.shared.events.send(event);
    }

    /// Deletes an object (DELETED); `object` names it.
    pub fn delete(&self, object: &impl serde::Serialize) {
        let object = serde_json::to_value(object).expect("object to JSON");
        let kind = Kind::of_object(&object);
        let mut state = lock(&self.shared.state);
        let Some(mut gone) = state.objects.remove(&key(kind, &object)) else {
            panic!("delete of an object the fake API server does not have: {object}");
        };
        state.rv += 1;
        gone["metadata"]["resourceVersion"] = Value::String(state.rv.to_string());
        let event = Event {
            rv: state.rv,
            kind,
            kind_type: "DELETED",
            object: gone,
        };
        state.log.push(event.clone());
        let _ = self.shared.events.send(event);
    }

    /// A token for service account `namespace/name` with `audiences`, as a projected
    /// service-account token volume gets one (opaque: only this server can review it).
    pub fn service_account_token(&self, namespace: &str, name: &str, audiences: &[&str]) -> String {
        let mut tokens = lock(&self.shared.tokens);
        let token = format!("fake-sa-token.{}.{namespace}.{name}", tokens.len());
        tokens.insert(
            token.clone(),
            (
                format!("system:serviceaccount:{namespace}:{name}"),
                audiences.iter().map(|a| (*a).to_owned()).collect(),
            ),
        );
        token
    }

    /// The requests answered so far (`GET path` or `WATCH path`), for diagnostics.
    pub fn requests(&self) -> Vec<String> {
        lock(&self.shared.requests).clone()
    }

    /// Goes away: the listener closes and every open connection (watches too) is dropped.
    pub fn stop(&self) {
        self.accept.abort();
        for conn in lock(&self.shared.conns).drain(..) {
            conn.abort();
        }
    }

    /// Writes a kubeconfig pointing at this server (plain HTTP, no credentials).
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig.yaml");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\nusers:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\ncurrent-context: fake\n",
            self.addr
        );
        std::fs::write(&path, text).expect("write kubeconfig");
        path
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn key(kind: Kind, object: &Value) -> (Kind, String, String) {
    let meta = &object["metadata"];
    (
        kind,
        meta["namespace"].as_str().unwrap_or("default").to_owned(),
        meta["name"].as_str().expect("object has a name").to_owned(),
    )
}

fn json_response(status: StatusCode, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(
            http_body_util::Full::new(Bytes::from(body.to_string()))
                .map_err(|e| match e {})
                .boxed(),
        )
        .expect("response")
}

fn not_found(path: &str) -> Response<Body> {
    json_response(
        StatusCode::NOT_FOUND,
        &json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("the server could not find the requested resource ({path})"),
            "reason": "NotFound", "code": 404
        }),
    )
}

/// Whether `object` is in the namespace a request is restricted to (`None`: all).
fn in_scope(namespace: Option<&str>, object: &Value) -> bool {
    namespace.is_none_or(|ns| object["metadata"]["namespace"].as_str() == Some(ns))
}

const TOKEN_REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";

/// A TokenReview, answered as the API server does: authenticated when the token is known and
/// one of its audiences is requested (or none is requested).
fn review(shared: &Shared, body: &[u8]) -> Response<Body> {
    lock(&shared.requests).push(format!("POST {TOKEN_REVIEWS}"));
    let Ok(req) = serde_json::from_slice::<Value>(body) else {
        return json_response(
            StatusCode::BAD_REQUEST,
            &json!({"kind": "Status", "message": "not JSON"}),
        );
    };
    let token = req["spec"]["token"].as_str().unwrap_or_default();
    let wanted: Vec<&str> = req["spec"]["audiences"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let status = match lock(&shared.tokens).get(token) {
        Some((user, audiences)) => {
            let met: Vec<&String> = audiences
                .iter()
                .filter(|a| wanted.is_empty() || wanted.contains(&a.as_str()))
                .collect();
            if met.is_empty() {
                json!({"authenticated": false,
                       "error": format!("[invalid bearer token, token audiences {audiences:?} is invalid for the target audiences {wanted:?}]")})
            } else {
                json!({"authenticated": true, "user": {"username": user}, "audiences": met})
            }
        }
        None => {
            json!({"authenticated": false, "error": "[invalid bearer token, square/go-jose: error in cryptographic primitive]"})
        }
    };
    json_response(
        StatusCode::CREATED,
        &json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
            "metadata": {"creationTimestamp": null}, "spec": req["spec"], "status": status,
        }),
    )
}

fn handle(shared: &Shared, req: &Request<Incoming>) -> Response<Body> {
    let full_path = req.uri().path();
    // `/api/v1/namespaces/shop/services` is `/api/v1/services` restricted to `shop`.
    let (path, namespace) = match full_path.split_once("/namespaces/") {
        Some((prefix, rest)) => match rest.split_once('/') {
            Some((ns, resource)) => (format!("{prefix}/{resource}"), Some(ns.to_owned())),
            None => (full_path.to_owned(), None),
        },
        None => (full_path.to_owned(), None),
    };
    let path = path.as_str();
    let query: BTreeMap<String, String> = req
        .uri()
        .query()
        .map(|q| {
            q.split('&')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect()
        })
        .unwrap_or_default();
    let watch = query.get("watch").is_some_and(|w| w == "true" || w == "1");
    lock(&shared.requests).push(format!(
        "{} {full_path}",
        if watch { "WATCH" } else { "GET" }
    ));
    let kind = match Kind::of_path(path) {
        Some(Kind::HttpRoute) if !shared.with_routes => None,
        other => other,
    };
    let Some(kind) = kind.filter(|_| req.method() == http::Method::GET) else {
        return not_found(full_path);
    };
    if !watch {
        let state = lock(&shared.state);
        let items: Vec<&Value> = state
            .objects
            .iter()
            .filter(|((k, _, _), v)| *k == kind && in_scope(namespace.as_deref(), v))
            .map(|(_, v)| v)
            .collect();
        let (api_version, list_kind) = kind.list();
        return json_response(
            StatusCode::OK,
            &json!({
                "apiVersion": api_version, "kind": list_kind,
                "metadata": {"resourceVersion": state.rv.to_string()},
                "items": items,
            }),
        );
    }
    let since: u64 = query
        .get("resourceVersion")
        .and_then(|rv| rv.parse().ok())
        .unwrap_or(0);
    // Subscribe before reading the log so no event falls between the two.
    let live = shared.events.subscribe();
    let (backlog, last) = {
        let state = lock(&shared.state);
        let backlog: Vec<Bytes> = state
            .log
            .iter()
            .filter(|e| e.kind == kind && e.rv > since && in_scope(namespace.as_deref(), &e.object))
            .map(Event::line)
            .collect();
        (backlog, state.rv)
    };
    let replayed = futures_util::stream::iter(backlog);
    let following = futures_util::stream::unfold(live, move |mut live| {
        let namespace = namespace.clone();
        async move {
            loop {
                match live.recv().await {
                    Ok(e)
                        if e.kind == kind
                            && e.rv > last.max(since)
                            && in_scope(namespace.as_deref(), &e.object) =>
                    {
                        return Some((e.line(), live));
                    }
                    Ok(_) => {}
                    // A slow watcher lost events: end the watch; kube-rs re-lists.
                    Err(_) => return None,
                }
            }
        }
    });
    let frames = replayed
        .chain(following)
        .map(|b| Ok::<_, Infallible>(Frame::data(b)));
    Response::builder()
        .status(StatusCode::OK)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(BodyExt::boxed(StreamBody::new(frames)))
        .expect("watch response")
}
