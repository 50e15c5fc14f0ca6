//! The config stream server over real sockets: snapshot, ACK, delta, NACK, coalescing, stale
//! nonces and refused streams, with `ConfigServiceClient` as the proxy.

mod common;

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming};
use weft_proto::pb::config_service_client::ConfigServiceClient;
use weft_proto::pb::{ConfigRequest, ConfigResponse, ErrorDetail, Node};

use common::{DEADLINE, eventually, start};

/// A fake proxy's end of a stream.
struct Proxy {
    tx: mpsc::Sender<ConfigRequest>,
    rx: Streaming<ConfigResponse>,
}

impl Proxy {
    async fn connect(
        grpc: std::net::SocketAddr,
        node: Option<Node>,
    ) -> Result<Self, tonic::Status> {
        let mut client = ConfigServiceClient::connect(format!("http://{grpc}"))
            .await
            .unwrap();
        let (tx, requests) = mpsc::channel(4);
        let hello = ConfigRequest {
            node,
            ..Default::default()
        };
        tx.send(hello).await.unwrap();
        let rx = client
            .stream_config(ReceiverStream::new(requests))
            .await?
            .into_inner();
        Ok(Self { tx, rx })
    }

    async fn recv(&mut self) -> Result<ConfigResponse, tonic::Status> {
        tokio::time::timeout(DEADLINE, self.rx.message())
            .await
            .expect("no response in time")
            .map(|m| m.expect("stream ended"))
    }

    async fn ack(&self, resp: &ConfigResponse) {
        self.answer(resp.version, &resp.nonce, None).await;
    }

    async fn answer(&self, version: u64, nonce: &str, error: Option<&str>) {
        let req = ConfigRequest {
            version,
            response_nonce: nonce.to_owned(),
            error_detail: error.map(|m| ErrorDetail { message: m.into() }),
            ..Default::default()
        };
        self.tx.send(req).await.unwrap();
    }
}

fn node(id: &str) -> Option<Node> {
    Some(Node {
        id: id.into(),
        service: "productpage".into(),
        namespace: "default".into(),
        labels: [("app".to_owned(), "productpage".to_owned())].into(),
        proxy_version: "test".into(),
        ..Default::default()
    })
}

fn weights(pairs: &[(&str, u32)]) -> Vec<(String, u32)> {
    pairs.iter().map(|(n, w)| ((*n).to_owned(), *w)).collect()
}

#[tokio::test]
async fn snapshot_ack_delta_nack() {
    let cp = start().await;
    let reg = cp.registry.clone();
    let mut proxy = Proxy::connect(cp.grpc, node("pp-1")).await.unwrap();

    // A full snapshot first.
    let snap = proxy.recv().await.unwrap();
    assert!(snap.full);
    assert_eq!(snap.version, 1);
    assert_eq!(snap.clusters.len(), 1);
    assert_eq!(snap.routes[0].name, "reviews");
    let p = &reg.status().proxies[0];
    assert_eq!(
        (p.node_id.as_str(), p.service.as_str(), p.connected),
        ("pp-1", "productpage", true)
    );
    assert_eq!(p.labels["app"], "productpage");

    proxy.ack(&snap).await;
    eventually("ACK of version 1", || async {
        (reg.status().proxies[0].acked_version == Some(1)).then_some(())
    })
    .await;

    // A change: a delta with only the changed route.
    reg.set_weights("reviews", None, &weights(&[("v1", 90), ("v2", 10)]))
        .await
        .unwrap();
    let delta = proxy.recv().await.unwrap();
    assert!(!delta.full);
    assert_eq!(delta.version, 2);
    assert!(delta.clusters.is_empty() && delta.removed_clusters.is_empty());
    assert!(delta.removed_routes.is_empty());
    assert_eq!(delta.routes.len(), 1);
    let w: Vec<u32> = delta.routes[0].rules[1]
        .backends
        .iter()
        .map(|b| b.weight)
        .collect();
    assert_eq!(w, vec![90, 10]);
    assert_ne!(delta.nonce, snap.nonce);

    // NACK: recorded, ACKed version unchanged.
    proxy.answer(1, &delta.nonce, Some("regex too big")).await;
    let p = eventually("NACK recorded", || async {
        reg.status().proxies[0]
            .last_nack
            .clone()
            .map(|n| (n, reg.status()))
    })
    .await;
    assert_eq!((p.0.version, p.0.error.as_str()), (2, "regex too big"));
    assert_eq!(p.1.proxies[0].acked_version, Some(1));
    assert_eq!(p.1.nacks.len(), 1);
    assert_eq!(p.1.nacks[0].node_id, "pp-1");

    // The next change is sent as a delta against what was ACKed (version 1), not 2.
    reg.set_weights("reviews", None, &weights(&[("v1", 80), ("v2", 20)]))
        .await
        .unwrap();
    let next = proxy.recv().await.unwrap();
    assert_eq!((next.version, next.full, next.routes.len()), (3, false, 1));

    // While version 3 is in flight, two more changes coalesce into one push of the newest.
    reg.set_weights("reviews", None, &weights(&[("v1", 70), ("v2", 30)]))
        .await
        .unwrap();
    reg.set_weights("reviews", None, &weights(&[("v1", 60), ("v2", 40)]))
        .await
        .unwrap();
    // A stale nonce is ignored: version 3 stays unacknowledged and nothing new is sent.
    proxy.answer(3, &snap.nonce, None).await;
    proxy.ack(&next).await;
    let newest = proxy.recv().await.unwrap();
    assert_eq!(newest.version, 5, "4 was coalesced away");
    let w: Vec<u32> = newest.routes[0].rules[1]
        .backends
        .iter()
        .map(|b| b.weight)
        .collect();
    assert_eq!(w, vec![60, 40]);
    proxy.ack(&newest).await;
    eventually("ACK of version 5", || async {
        (reg.status().proxies[0].acked_version == Some(5)).then_some(())
    })
    .await;

    // The proxy goes away: still listed, not connected.
    drop(proxy);
    eventually("disconnect recorded", || async {
        (!reg.status().proxies[0].connected).then_some(())
    })
    .await;
    assert_eq!(reg.status().proxies.len(), 1);
    cp.stop().await;
}

#[tokio::test]
async fn a_stream_without_node_id_is_refused() {
    let cp = start().await;
    for (node, what) in [(None, "no node"), (node(""), "empty id")] {
        let status = match Proxy::connect(cp.grpc, node).await {
            Err(status) => status,
            Ok(mut proxy) => proxy.recv().await.unwrap_err(),
        };
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert!(status.message().contains("node"), "{what}: {status:?}");
    }
    assert!(cp.registry.status().proxies.is_empty());
    cp.stop().await;
}

#[tokio::test]
async fn shutdown_ends_open_streams() {
    let cp = start().await;
    let mut proxy = Proxy::connect(cp.grpc, node("pp-2")).await.unwrap();
    let snap = proxy.recv().await.unwrap();
    proxy.ack(&snap).await;
    // `stop` fails if the open stream kept the server from draining.
    tokio::time::timeout(Duration::from_secs(5), cp.stop())
        .await
        .expect("stream blocked shutdown");
    let end = tokio::time::timeout(DEADLINE, proxy.rx.message())
        .await
        .unwrap();
    assert!(matches!(end, Err(_) | Ok(None)), "{end:?}");
}
