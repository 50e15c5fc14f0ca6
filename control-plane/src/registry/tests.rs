use super::*;
use crate::store::{FileStore, MemoryStore, content_hash};
use weft_proto::{parse_yaml, pb};

const MESH: &str = include_str!("../default-mesh.yaml");

fn mesh() -> MeshConfig {
    parse_yaml("t", MESH, &Limits::default()).unwrap()
}

async fn open(store: Arc<dyn Store>, text: &str) -> Registry {
    let cfg = parse_yaml("t", text, &Limits::default()).unwrap();
    Registry::open(store, "t", cfg, content_hash(text.as_bytes()))
        .await
        .unwrap()
}

#[tokio::test]
async fn identical_config_does_not_bump() {
    let reg = open(Arc::new(MemoryStore::new()), MESH).await;
    let mut rx = reg.subscribe();
    rx.borrow_and_update();
    assert_eq!(reg.current().version, 1);
    let out = reg.apply(mesh()).await.unwrap();
    assert_eq!(
        out,
        Outcome {
            version: 1,
            changed: false
        }
    );
    assert!(!rx.has_changed().unwrap(), "nothing published");

    let w = [("v1".to_owned(), 90), ("v2".to_owned(), 10)];
    let (out, rule) = reg.set_weights("reviews", None, &w).await.unwrap();
    assert_eq!((out.version, out.changed, rule), (2, true, 1));
    assert!(rx.has_changed().unwrap());
    // The same weights again: no new version.
    let (out, _) = reg.set_weights("reviews", None, &w).await.unwrap();
    assert_eq!((out.version, out.changed), (2, false));
}

#[tokio::test]
async fn invalid_config_is_refused_and_the_old_one_stays() {
    let reg = open(Arc::new(MemoryStore::new()), MESH).await;
    let mut bad = mesh();
    bad.routes[0].rules[1].backends[0].subset = "v9".into();
    let err = reg.apply(bad).await.unwrap_err();
    assert!(matches!(err, RegistryError::Invalid(_)), "{err}");
    assert!(err.to_string().contains("v9"), "{err}");

    let err = reg
        .set_weights("nope", None, &[("v1".into(), 1)])
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::Op(OpError::UnknownRoute(_))));
    assert_eq!(reg.current().version, 1);
    assert_eq!(reg.current().config, mesh());
}

#[tokio::test]
async fn restart_resumes_or_moves_forward() {
    let dir = tempfile::tempdir().unwrap();
    let store = || -> Arc<dyn Store> { Arc::new(FileStore::open(dir.path()).unwrap()) };

    // First run: version 1, then an API mutation → version 2.
    let reg = open(store(), MESH).await;
    let w = [("v1".to_owned(), 50), ("v2".to_owned(), 50)];
    reg.set_weights("reviews", None, &w).await.unwrap();
    let mutated = reg.current().config.clone();
    drop(reg);

    // Same file: the stored config (with the mutation) and its version are resumed.
    let reg = open(store(), MESH).await;
    assert_eq!(reg.current().version, 2);
    assert_eq!(reg.current().config, mutated);
    drop(reg);

    // The file changed while down: it wins, at stored version + 1.
    let edited = MESH.replace("weight: 100", "weight: 70");
    let reg = open(store(), &edited).await;
    assert_eq!(reg.current().version, 3);
    assert_eq!(
        reg.current().config.routes[0].rules[1].backends[0].weight,
        Some(70)
    );
    drop(reg);

    // A comment-only edit keeps the version and does not lose anything either.
    let commented = format!("# note\n{edited}");
    let reg = open(store(), &commented).await;
    assert_eq!(reg.current().version, 3);
}

#[tokio::test]
async fn a_stale_replica_redoes_its_change_on_top_of_the_newer_state() {
    // Two registries on one store: replicas sharing etcd, without the watch.
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let a = open(store.clone(), MESH).await;
    let b = open(store.clone(), MESH).await;
    assert_eq!((a.current().version, b.current().version), (1, 1));
    let (out, _) = a
        .set_weights("reviews", None, &[("v1".into(), 70), ("v2".into(), 30)])
        .await
        .unwrap();
    assert_eq!(out.version, 2);
    // B still runs version 1; its save conflicts, it takes in A's state and redoes.
    let w = [("v1".to_owned(), 40), ("v2".to_owned(), 60)];
    let (out, _) = b.set_weights("reviews", None, &w).await.unwrap();
    assert_eq!(out.version, 3, "never a second version 2");
    let stored = store.load().await.unwrap().unwrap().state;
    assert_eq!(stored.version, 3);
    assert_eq!(stored.config, b.current().config);
    assert_eq!(
        stored.config.routes[0].rules[1].backends[1].weight,
        Some(60)
    );
}

/// A discovered layer: service `cart.shop` (one endpoint) and its route, plus a
/// `reviews` service and route the base (the default mesh) also defines.
fn discovered() -> MeshConfig {
    let yaml = r#"
services:
  - name: cart.shop
    endpoints: [{address: "10.0.0.1:80"}]
  - name: reviews
    endpoints: [{address: "10.0.0.9:80"}]
routes:
  - name: cart.shop
    hosts: [cart.shop, cart]
    rules:
      - name: "shop/cart#0.0"
        backends: [{service: cart.shop}]
  - name: reviews
    hosts: [reviews]
    rules:
      - backends: [{service: reviews}]
"#;
    parse_yaml("d", yaml, &Limits::default()).unwrap()
}

#[tokio::test]
async fn the_base_wins_and_each_layer_keeps_the_other() {
    let reg = open(Arc::new(MemoryStore::new()), MESH).await;
    let out = reg.apply_discovered(discovered()).await.unwrap();
    assert_eq!((out.version, out.changed), (2, true));
    let live = reg.current().config.clone();
    assert!(live.routes.iter().any(|r| r.name == "cart.shop"));
    // The base's `reviews` beats the discovered one (its subsets are still there).
    let reviews = live.services.iter().find(|s| s.name == "reviews").unwrap();
    assert_eq!(reviews, &mesh().services[0]);
    assert_eq!(
        live.routes.iter().filter(|r| r.name == "reviews").count(),
        1
    );

    // A file reload keeps the discovered layer.
    let edited = MESH.replace("weight: 100", "weight: 70");
    let cfg = parse_yaml("t", &edited, &Limits::default()).unwrap();
    reg.apply_source(cfg, content_hash(edited.as_bytes()))
        .await
        .unwrap();
    assert!(
        reg.current()
            .config
            .routes
            .iter()
            .any(|r| r.name == "cart.shop")
    );
    // A new snapshot keeps the base (and its edit).
    reg.apply_discovered(MeshConfig::default()).await.unwrap();
    let live = reg.current().config.clone();
    assert!(!live.routes.iter().any(|r| r.name == "cart.shop"));
    assert_eq!(live.routes[0].rules[1].backends[0].weight, Some(70));
}

#[tokio::test]
async fn discovered_routes_belong_to_their_httproute() {
    let reg = open(Arc::new(MemoryStore::new()), MESH).await;
    reg.apply_discovered(discovered()).await.unwrap();
    let err = reg
        .set_weights("cart.shop", None, &[("cart.shop".into(), 1)])
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::Discovered { .. }), "{err}");
    assert!(err.to_string().contains("HTTPRoute shop/cart"), "{err}");
    // A route the base defines stays the operator's.
    let w = [("v1".to_owned(), 60), ("v2".to_owned(), 40)];
    reg.set_weights("reviews", None, &w).await.unwrap();
    // Nor can an applied experiment drive it.
    let mut with_experiment = mesh();
    let spec = r#"{name: c, route: cart.shop, service: reviews, stable: v1, candidate: v2,
            canary: {steps: [50, 100]}, interval: 1s}"#;
    with_experiment
        .experiments
        .push(serde_yaml_ng::from_str(spec).unwrap());
    let err = reg.apply(with_experiment).await.unwrap_err();
    assert!(matches!(err, RegistryError::Discovered { .. }), "{err}");
}

#[tokio::test]
async fn an_invalid_merge_is_refused_and_reported() {
    let reg = open(Arc::new(MemoryStore::new()), MESH).await;
    reg.apply_discovered(discovered()).await.unwrap();
    let good = reg.current();
    let mut bad = discovered();
    bad.routes[0].rules[0].backends[0].service = "nowhere".into();
    let err = reg.apply_discovered(bad).await.unwrap_err();
    assert!(matches!(err, RegistryError::Invalid(_)), "{err}");
    assert_eq!(reg.current().version, good.version);
    assert_eq!(reg.current().config, good.config);
    let reported = reg.status().last_discovery_error.unwrap();
    assert!(reported.contains("nowhere"), "{reported}");
    reg.apply_discovered(discovered()).await.unwrap();
    assert_eq!(reg.status().last_discovery_error, None);
}

#[tokio::test]
async fn the_discovered_layer_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let store = || -> Arc<dyn Store> { Arc::new(FileStore::open(dir.path()).unwrap()) };
    let reg = open(store(), MESH).await;
    reg.apply_discovered(discovered()).await.unwrap();
    let before = reg.current();
    drop(reg);
    // The API server may be away at start: the last discovered layer is served.
    let reg = open(store(), MESH).await;
    assert_eq!(reg.current().version, before.version);
    assert_eq!(reg.current().config, before.config);
}

#[tokio::test]
async fn proxy_status_tracks_acks_nacks_and_disconnects() {
    let reg = open(Arc::new(MemoryStore::new()), MESH).await;
    let node = pb::Node {
        id: "p1".into(),
        service: "reviews".into(),
        ..Default::default()
    };
    let conn = reg.connect(&node);
    conn.ack(1);
    conn.nack(2, "bad regex");
    // A reconnect before the old stream ends: the old handle must not win.
    let newer = reg.connect(&node);
    drop(conn);
    let st = reg.status();
    assert!(st.proxies[0].connected);
    assert_eq!(st.nacks.len(), 1);
    drop(newer);
    let p = &reg.status().proxies[0];
    assert!(!p.connected);
    assert_eq!(p.node_id, "p1");
}
