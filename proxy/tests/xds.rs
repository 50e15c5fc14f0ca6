//! The config client against a scripted control plane: first request, ACK, NACK (the proxy's
//! regex budget is smaller than the control plane's), a delta against the last ACKed state,
//! traffic on the streamed config, and reconnection after the stream ends.

mod common;

use common::*;
use http::StatusCode;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status, Streaming};
use weft_proto::pb::config_service_server::{ConfigService, ConfigServiceServer};
use weft_proto::pb::{ConfigRequest, ConfigResponse};
use weft_proto::validate::Limits;
use weft_proto::{parse_yaml, to_resources};

/// One stream the proxy opened: what it sends, and where the test writes responses.
struct Stream {
    requests: Streaming<ConfigRequest>,
    responses: mpsc::Sender<Result<ConfigResponse, Status>>,
}

impl Stream {
    async fn next(&mut self) -> ConfigRequest {
        tokio::time::timeout(DEADLINE, self.requests.message())
            .await
            .expect("a request in time")
            .unwrap()
            .expect("the stream is open")
    }

    async fn send(&self, resp: ConfigResponse) {
        self.responses.send(Ok(resp)).await.unwrap();
    }
}

/// A control plane whose every stream is handed to the test.
struct Scripted(mpsc::UnboundedSender<Stream>);

#[tonic::async_trait]
impl ConfigService for Scripted {
    type StreamConfigStream = ReceiverStream<Result<ConfigResponse, Status>>;

    async fn stream_config(
        &self,
        request: Request<Streaming<ConfigRequest>>,
    ) -> Result<Response<Self::StreamConfigStream>, Status> {
        let (tx, rx) = mpsc::channel(4);
        let stream = Stream {
            requests: request.into_inner(),
            responses: tx,
        };
        self.0
            .send(stream)
            .map_err(|_| Status::unavailable("test over"))?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

fn response(yaml: &str, version: u64, full: bool) -> ConfigResponse {
    let res = to_resources(&parse_yaml("cp", yaml, &Limits::default()).unwrap());
    ConfigResponse {
        version,
        nonce: format!("n{version}"),
        full,
        clusters: res.clusters,
        routes: res.routes,
        ..Default::default()
    }
}

async fn next_stream(streams: &mut mpsc::UnboundedReceiver<Stream>) -> Stream {
    tokio::time::timeout(DEADLINE, streams.recv())
        .await
        .expect("the proxy connects in time")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_nacks_deltas_and_reconnects() {
    let echo = start_echo().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let cp = listener.local_addr().unwrap();
    let (streams_tx, mut streams) = mpsc::unbounded_channel();
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(ConfigServiceServer::new(Scripted(streams_tx)))
            .serve_with_incoming(TcpIncoming::from(listener)),
    );

    let dir = TempDir::new();
    let addr_file = dir.path("addrs.json");
    let cp_url = format!("http://{cp}");
    let _proxy = spawn_proxy(&[
        "--control-plane",
        &cp_url,
        "--outbound-addr",
        "127.0.0.1:0",
        "--admin-addr",
        "127.0.0.1:0",
        "--addr-file",
        addr_file.to_str().unwrap(),
        "--node-id",
        "node-1",
        "--service",
        "web",
        "--label",
        "version=v1",
        "--regex-size-limit",
        "65536",
        "--log",
        "warn",
    ]);
    let addrs = wait_for_addrs(&addr_file).await;
    let (outbound, admin) = (addr(&addrs, "outbound"), addr(&addrs, "admin"));

    let mut stream = next_stream(&mut streams).await;
    let hello = stream.next().await;
    let node = hello.node.unwrap();
    assert_eq!((node.id.as_str(), node.service.as_str()), ("node-1", "web"));
    assert_eq!(node.namespace, "default");
    assert_eq!(node.labels["version"], "v1");
    assert_eq!(hello.version, 0);
    assert_eq!(
        admin_get(admin, "/ready").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );

    // v1: full snapshot → ACK, ready, routes traffic.
    let v1 = format!(
        r#"
services: [{{name: echo, endpoints: [{{address: "{echo}"}}]}}]
routes:
  - {{name: a, hosts: [a.local], rules: [{{match: {{path: {{regex: "/[a-z]+"}}}}, backends: [{{service: echo}}]}}]}}
"#
    );
    stream.send(response(&v1, 1, true)).await;
    let ack = stream.next().await;
    assert_eq!((ack.version, ack.response_nonce.as_str()), (1, "n1"));
    assert!(ack.error_detail.is_none());
    assert_eq!(admin_get(admin, "/ready").await.status, StatusCode::OK);
    let r = send(outbound, http::Version::HTTP_11, get("a.local", "/abc")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);

    // v2: a regex the control plane accepts but this proxy's budget does not → NACK.
    let v2 = v1.replace("/[a-z]+", "/[a-z]{5000}");
    stream.send(response(&v2, 2, false)).await;
    let nack = stream.next().await;
    assert_eq!((nack.version, nack.response_nonce.as_str()), (1, "n2"));
    let reason = nack.error_detail.unwrap().message;
    assert!(reason.contains("limit"), "{reason}");
    let cfg: serde_json::Value =
        serde_json::from_str(&admin_get(admin, "/config").await.body).unwrap();
    assert_eq!(cfg["version"], 1);
    assert_eq!(cfg["source"], "control-plane");
    assert_eq!(cfg["last_nack"]["version"], 2);
    assert!(
        cfg["last_nack"]["error"]
            .as_str()
            .unwrap()
            .contains("limit")
    );
    assert_eq!(cfg["control_plane"]["connected"], true);
    assert_eq!(cfg["control_plane"]["address"], cp_url.as_str());
    let r = send(outbound, http::Version::HTTP_11, get("a.local", "/abc")).await;
    assert_eq!(r.status, StatusCode::OK, "the old config still serves");

    // v3: a delta adding route b, against v1 (the last ACKed state), not the refused v2.
    let mut delta = response(
        &format!(
            "services: [{{name: echo, endpoints: [{{address: \"{echo}\"}}]}}]\nroutes: [{{name: b, hosts: [b.local], rules: [{{backends: [{{service: echo}}]}}]}}]\n"
        ),
        3,
        false,
    );
    delta.clusters.clear();
    stream.send(delta).await;
    let ack = stream.next().await;
    assert_eq!((ack.version, ack.error_detail), (3, None));
    let r = send(outbound, http::Version::HTTP_11, get("b.local", "/")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let r = send(outbound, http::Version::HTTP_11, get("a.local", "/abc")).await;
    assert_eq!(r.status, StatusCode::OK, "route a survived the delta");

    // The control plane ends the stream: the proxy keeps serving and comes back with v3.
    drop(stream);
    let mut stream = next_stream(&mut streams).await;
    let hello = stream.next().await;
    assert_eq!(hello.version, 3);
    assert!(hello.node.is_some());
    let r = send(outbound, http::Version::HTTP_11, get("b.local", "/")).await;
    assert_eq!(r.status, StatusCode::OK);
    poll("reconnected status", async || {
        let cfg: serde_json::Value =
            serde_json::from_str(&admin_get(admin, "/config").await.body).ok()?;
        (cfg["control_plane"]["connected"] == true).then_some(())
    })
    .await;
}
