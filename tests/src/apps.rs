//! Upstream applications that run in the test process on real loopback sockets: an HTTP app
//! that says which version it is (HTTP/1.1 and h2c), and a gRPC echo service.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::Stream;
use tonic::{Code, Status};

/// Generated code of `tests/proto/echo.proto`.
#[allow(clippy::all, clippy::pedantic)]
pub mod echo {
    tonic::include_proto!("weft.testing.v1");
}

/// An HTTP app answering every request with its name, in the body and in `x-app-version`.
pub struct VersionApp {
    pub addr: SocketAddr,
    pub name: String,
    hits: Arc<AtomicU64>,
    faults: Arc<Faults>,
    task: JoinHandle<()>,
}

/// Injected misbehaviour of a [`VersionApp`], changeable while it runs.
#[derive(Default)]
struct Faults {
    /// Answer 500 to this many requests per thousand, spread evenly (deterministic).
    error_permille: AtomicU64,
    /// Added before answering.
    delay_ms: AtomicU64,
}

impl VersionApp {
    pub async fn start(name: &str) -> VersionApp {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind app");
        let addr = listener.local_addr().expect("app addr");
        let hits = Arc::new(AtomicU64::new(0));
        let faults = Arc::new(Faults::default());
        let (name_owned, hits2, faults2) = (name.to_owned(), hits.clone(), faults.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (name, hits, faults) = (name_owned.clone(), hits2.clone(), faults2.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        let n = hits.fetch_add(1, Ordering::Relaxed) + 1;
                        let permille = faults.error_permille.load(Ordering::Relaxed);
                        let delay = faults.delay_ms.load(Ordering::Relaxed);
                        // Request n fails when the running share of failures crosses a step.
                        let fail =
                            permille > 0 && (n * permille) / 1000 != ((n - 1) * permille) / 1000;
                        let host = req.headers().get(http::header::HOST).cloned();
                        let authority = req
                            .uri()
                            .authority()
                            .map(|a| a.to_string())
                            .unwrap_or_default();
                        let resp = Response::builder()
                            .status(if fail { 500 } else { 200 })
                            .header("x-app-version", name.as_str())
                            .header("x-seen-http-version", format!("{:?}", req.version()))
                            .header(
                                "x-seen-host",
                                host.and_then(|h| h.to_str().ok().map(str::to_owned))
                                    .unwrap_or(authority),
                            )
                            .body(Full::new(Bytes::from(format!("{name}\n"))))
                            .expect("response");
                        async move {
                            if delay > 0 {
                                tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
                            }
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        VersionApp {
            addr,
            name: name.to_owned(),
            hits,
            faults,
            task,
        }
    }

    /// From now on, answer 500 to `error_permille`/1000 of requests and add `delay_ms`.
    pub fn set_faults(&self, error_permille: u64, delay_ms: u64) {
        self.faults
            .error_permille
            .store(error_permille, Ordering::Relaxed);
        self.faults.delay_ms.store(delay_ms, Ordering::Relaxed);
    }

    /// Requests this app has served.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }
}

impl Drop for VersionApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Echo {
    name: String,
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<echo::EchoReply, Status>> + Send>>;

#[tonic::async_trait]
impl echo::echo_server::Echo for Echo {
    async fn unary(
        &self,
        req: tonic::Request<echo::EchoRequest>,
    ) -> Result<tonic::Response<echo::EchoReply>, Status> {
        let req = req.into_inner();
        if req.fail_with != 0 {
            return Err(Status::new(
                Code::from(req.fail_with),
                format!("{} failed as asked", self.name),
            ));
        }
        Ok(tonic::Response::new(echo::EchoReply {
            message: req.message,
            index: 0,
            served_by: self.name.clone(),
        }))
    }

    type ServerStreamStream = ReplyStream;

    async fn server_stream(
        &self,
        req: tonic::Request<echo::EchoRequest>,
    ) -> Result<tonic::Response<ReplyStream>, Status> {
        let req = req.into_inner();
        let name = self.name.clone();
        let replies = (0..req.count).map(move |i| {
            Ok(echo::EchoReply {
                message: req.message.clone(),
                index: i,
                served_by: name.clone(),
            })
        });
        // Ending with a non-OK status after messages puts grpc-status and custom metadata in
        // real HTTP/2 trailers, which is what a proxy most easily loses.
        let end = if req.fail_with != 0 {
            let mut md = tonic::metadata::MetadataMap::new();
            md.insert("x-trailer", "kept".parse().expect("ascii"));
            vec![Err(Status::with_metadata(
                Code::from(req.fail_with),
                "stream ended as asked",
                md,
            ))]
        } else {
            Vec::new()
        };
        Ok(tonic::Response::new(Box::pin(tokio_stream::iter(
            replies.chain(end),
        ))))
    }
}

/// A gRPC `Echo` server on loopback.
pub struct GrpcApp {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl GrpcApp {
    pub async fn start(name: &str) -> GrpcApp {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind grpc app");
        let addr = listener.local_addr().expect("grpc addr");
        let svc = echo::echo_server::EchoServer::new(Echo {
            name: name.to_owned(),
        });
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await;
        });
        GrpcApp { addr, task }
    }
}

impl Drop for GrpcApp {
    fn drop(&mut self) {
        self.task.abort();
    }
}
