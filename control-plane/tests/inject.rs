//! Golden tests of sidecar injection: every `tests/data/inject/<case>.yaml` pod is injected, the
//! patch applied with a real RFC 6902 implementation, and the result compared with
//! `<case>.golden.yaml`; injecting the result again must change nothing. Regenerate the golden
//! files after an intended change with `WEFT_UPDATE_GOLDEN=1 cargo test -p weft-control --test
//! inject` and review the diff.

use std::path::{Path, PathBuf};

use base64::Engine as _;
use serde_json::{Value, json};
use weft_control::inject::{Decision, InjectConfig, InjectError, inject, review};

fn data_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/inject")
}

fn read_yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Injects `pod` and applies the patch; returns the result and whether anything changed.
fn injected(pod: &Value) -> (Value, bool) {
    match inject(pod, &InjectConfig::default()).expect("a pod injects") {
        Decision::Skip(_) => (pod.clone(), false),
        Decision::Patch(ops) => {
            let patch: json_patch::Patch =
                serde_json::from_value(Value::Array(ops)).expect("valid JSON Patch");
            let mut out = pod.clone();
            json_patch::patch(&mut out, &patch).expect("the patch applies to its pod");
            (out, true)
        }
    }
}

#[test]
fn golden_pods() {
    let update = std::env::var_os("WEFT_UPDATE_GOLDEN").is_some();
    let mut cases = 0;
    for entry in std::fs::read_dir(data_dir()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with(".golden.yaml") || !name.ends_with(".yaml") {
            continue;
        }
        cases += 1;
        let pod = read_yaml(&path);
        let (out, _) = injected(&pod);
        let golden = path.with_file_name(name.replace(".yaml", ".golden.yaml"));
        if update {
            std::fs::write(&golden, serde_yaml_ng::to_string(&out).unwrap()).unwrap();
        }
        assert_eq!(
            out,
            read_yaml(&golden),
            "{name}: injected pod differs from {}",
            golden.display()
        );
        let (again, changed) = injected(&out);
        assert!(
            !changed && again == out,
            "{name}: injecting twice changed the pod"
        );
        assert_eq!(
            out["metadata"].get("managedFields"),
            pod["metadata"].get("managedFields"),
            "{name}"
        );
    }
    assert!(cases >= 7, "the golden directory holds the cases ({cases})");
}

#[test]
fn decisions_say_why() {
    let dir = data_dir();
    let skip =
        |case: &str| match inject(&read_yaml(&dir.join(case)), &InjectConfig::default()).unwrap() {
            Decision::Skip(reason) => reason,
            Decision::Patch(_) => panic!("{case} was injected"),
        };
    assert!(skip("host-network.yaml").contains("hostNetwork"));
    assert!(skip("opt-out-label.yaml").contains("opted out"));
    assert!(skip("opt-out-annotation.yaml").contains("opted out"));
    assert!(skip("already-injected.yaml").contains("already injected"));

    let (pod, _) = injected(&read_yaml(&dir.join("plain.yaml")));
    let init = pod["spec"]["initContainers"].as_array().unwrap();
    assert_eq!(init[0]["name"], "weft-init");
    assert_eq!(init[1]["name"], "weft-proxy");
    assert_eq!(
        init[1]["restartPolicy"], "Always",
        "native sidecar by default"
    );

    let (pod, _) = injected(&read_yaml(&dir.join("init-containers.yaml")));
    let names: Vec<_> = pod["spec"]["initContainers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].clone())
        .collect();
    assert_eq!(
        names,
        [json!("weft-init"), json!("weft-proxy"), json!("migrate")],
        "the pod's own init containers run in the mesh"
    );

    let (pod, _) = injected(&read_yaml(&dir.join("legacy-sidecar.yaml")));
    assert_eq!(pod["spec"]["containers"][0]["name"], "weft-proxy");
    assert!(pod["spec"]["containers"][0]["lifecycle"]["postStart"].is_object());
    assert_eq!(
        pod["spec"]["containers"][1]["readinessProbe"]["httpGet"]["port"], 15020,
        "probe indices follow the insertion"
    );

    let (pod, _) = injected(&read_yaml(&dir.join("probes-volumes-annotations.yaml")));
    let probes: Value = serde_json::from_str(
        pod["metadata"]["annotations"]["weft.io/app-probes"]
            .as_str()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        probes["ratings/readyz"],
        json!({"path": "/health", "port": 9080})
    );
    assert_eq!(
        pod["spec"]["containers"][0]["livenessProbe"]["httpGet"]["path"],
        "/app-health/ratings/livez"
    );
    assert!(
        pod["spec"]["containers"][1]["startupProbe"]["tcpSocket"].is_object(),
        "TCP probes are left alone"
    );
    assert_eq!(pod["metadata"]["annotations"]["team"], "ratings");

    // weft.io/outbound-traffic-policy reaches the proxy's flags; a typo refuses the pod.
    let with_policy = |value: &str| {
        let mut pod = read_yaml(&dir.join("plain.yaml"));
        pod["metadata"]["annotations"] = json!({"weft.io/outbound-traffic-policy": value});
        pod
    };
    let proxy_args = |pod: &Value| {
        let (pod, _) = injected(pod);
        pod["spec"]["initContainers"][1]["args"].clone()
    };
    let args = proxy_args(&with_policy("registry-only"));
    let args: Vec<_> = args
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        args.windows(2)
            .any(|w| w == ["--outbound-traffic-policy", "registry-only"]),
        "{args:?}"
    );
    for pod in [with_policy("allow-any"), read_yaml(&dir.join("plain.yaml"))] {
        let args = proxy_args(&pod).to_string();
        assert!(!args.contains("outbound-traffic-policy"), "{args}");
    }
    let err = inject(&with_policy("deny-all"), &InjectConfig::default()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "annotation weft.io/outbound-traffic-policy: \"deny-all\" is not one of allow-any, registry-only"
    );
}

fn admission_review(uid: &str, object: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {"uid": uid, "kind": {"group": "", "version": "v1", "kind": "Pod"}, "operation": "CREATE", "object": object},
    }))
    .unwrap()
}

#[test]
fn admission_review_round_trip() {
    let pod = read_yaml(&data_dir().join("plain.yaml"));
    let answer = review(
        &admission_review("1234-abcd", pod.clone()),
        &InjectConfig::default(),
    )
    .unwrap();
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    let resp = &answer["response"];
    assert_eq!(resp["uid"], "1234-abcd");
    assert_eq!(resp["allowed"], true);
    assert_eq!(resp["patchType"], "JSONPatch");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(resp["patch"].as_str().unwrap())
        .unwrap();
    let Decision::Patch(ops) = inject(&pod, &InjectConfig::default()).unwrap() else {
        panic!("plain pod is injected")
    };
    assert_eq!(
        serde_json::from_slice::<Value>(&patch).unwrap(),
        Value::Array(ops)
    );

    let skipped = review(
        &admission_review("u2", read_yaml(&data_dir().join("host-network.yaml"))),
        &InjectConfig::default(),
    )
    .unwrap();
    assert_eq!(skipped["response"]["allowed"], true);
    assert!(skipped["response"].get("patch").is_none());

    let not_a_pod = review(
        &admission_review("u3", json!({"spec": {"containers": 3}})),
        &InjectConfig::default(),
    )
    .unwrap();
    assert_eq!(not_a_pod["response"]["allowed"], false);
    assert!(
        not_a_pod["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("spec.containers")
    );

    for bad in [
        &b"{"[..],
        br#"{"apiVersion":"admission.k8s.io/v1beta1","request":{}}"#,
        br#"{"apiVersion":"admission.k8s.io/v1"}"#,
    ] {
        assert!(matches!(
            review(bad, &InjectConfig::default()),
            Err(InjectError::BadReview(_))
        ));
    }
}

/// The operator's injection settings (`--inject-*`) reach the pod: images, control-plane
/// address, proxy UID (in the init container's capture exemption too) and the legacy default.
#[test]
fn the_configured_images_address_and_uid_are_injected() {
    let cfg = InjectConfig {
        proxy_image: "registry.example/weft-proxy:9".into(),
        init_image: "registry.example/weft-init:9".into(),
        control_plane: "https://cp.example:15010".into(),
        native_sidecar: false,
        proxy_uid: 2000,
    };
    let pod = json!({
        "metadata": {"name": "p", "namespace": "default"},
        "spec": {"containers": [{"name": "app", "image": "app:1"}]}
    });
    let Decision::Patch(ops) = inject(&pod, &cfg).unwrap() else {
        panic!("a plain pod is injected");
    };
    let patch: json_patch::Patch = serde_json::from_value(Value::Array(ops)).unwrap();
    let mut out = pod.clone();
    json_patch::patch(&mut out, &patch).unwrap();
    let init = &out["spec"]["initContainers"][0];
    assert_eq!(init["image"], "registry.example/weft-init:9");
    let init_args = init["args"].to_string();
    assert!(init_args.contains(r#""--proxy-uid","2000""#), "{init_args}");
    // Legacy by default: the proxy is the first app container, not an init container.
    assert_eq!(out["spec"]["initContainers"].as_array().unwrap().len(), 1);
    let proxy = &out["spec"]["containers"][0];
    assert_eq!(proxy["image"], "registry.example/weft-proxy:9");
    assert!(
        proxy["args"]
            .to_string()
            .contains("https://cp.example:15010"),
        "{}",
        proxy["args"]
    );
    assert_eq!(proxy["securityContext"]["runAsUser"], 2000);
}
