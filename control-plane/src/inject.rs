//! Sidecar injection: a pure function from a Pod (as Kubernetes JSON) to a JSON Patch, and the
//! AdmissionReview v1 exchange around it.
//!
//! Pods are handled as JSON values rather than typed structs so that fields this version does
//! not know survive untouched. The patch adds the interception init container, the proxy (a
//! native sidecar — an init container with `restartPolicy: Always` — by default, or a plain first
//! container with a postStart hook that waits for readiness on clusters older than 1.29), the
//! identity volumes, and rewrites HTTP probes to the proxy's health port so they still work when
//! inbound traffic requires mTLS. Injection is idempotent: an injected pod is left alone.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde_json::{Value, json};

/// Labels/annotations that steer injection.
pub const INJECT_KEY: &str = "weft.io/inject";
pub const STATUS_KEY: &str = "weft.io/status";
pub const NATIVE_SIDECAR_KEY: &str = "weft.io/native-sidecar";
pub const APP_PROBES_KEY: &str = "weft.io/app-probes";
/// `registry-only` closes the pod's connections to destinations outside the mesh (the proxy's
/// `--outbound-traffic-policy`); `allow-any` (the default) passes them through.
pub const OUTBOUND_POLICY_KEY: &str = "weft.io/outbound-traffic-policy";
pub const PROXY_NAME: &str = "weft-proxy";
/// Where the pod's projected service-account token is mounted in the proxy container.
const TOKEN_DIR: &str = "/var/run/secrets/weft";
const TOKEN_FILE: &str = "token";
pub const INIT_NAME: &str = "weft-init";
/// The proxy's health port (`/ready`, `/live`, `/app-health/...`), excluded from interception.
pub const HEALTH_PORT: u16 = 15020;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InjectConfig {
    pub proxy_image: String,
    /// The init container's image: `weft-proxy` plus the iptables tools (the proxy image is
    /// distroless and has none).
    pub init_image: String,
    /// gRPC address of the control plane as the proxy sees it.
    pub control_plane: String,
    /// Native sidecars by default (else legacy); a pod's `weft.io/native-sidecar: "true"` or
    /// `"false"` wins.
    pub native_sidecar: bool,
    pub proxy_uid: u32,
}

pub const DEFAULT_PROXY_IMAGE: &str = "ghcr.io/weft-mesh/weft-proxy:0.1.0";
pub const DEFAULT_INIT_IMAGE: &str = "ghcr.io/weft-mesh/weft-init:0.1.0";
pub const DEFAULT_CONTROL_PLANE: &str = "http://weft-control.weft-system.svc:15010";
pub const DEFAULT_PROXY_UID: u32 = 1337;

impl Default for InjectConfig {
    fn default() -> Self {
        Self {
            proxy_image: DEFAULT_PROXY_IMAGE.into(),
            init_image: DEFAULT_INIT_IMAGE.into(),
            control_plane: DEFAULT_CONTROL_PLANE.into(),
            native_sidecar: true,
            proxy_uid: DEFAULT_PROXY_UID,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InjectError {
    #[error("the object is not a Pod: {0}")]
    NotAPod(String),
    #[error("malformed AdmissionReview: {0}")]
    BadReview(String),
    #[error("annotation {key}: {value:?} is not one of {allowed}")]
    BadAnnotation {
        key: &'static str,
        value: String,
        allowed: &'static str,
    },
}

/// What injection decided for one pod.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// JSON Patch operations (RFC 6902), in order.
    Patch(Vec<Value>),
    Skip(&'static str),
}

fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

fn add(path: impl Into<String>, value: Value) -> Value {
    json!({"op": "add", "path": path.into(), "value": value})
}

fn str_at<'a>(v: &'a Value, path: &str) -> Option<&'a str> {
    v.pointer(path).and_then(Value::as_str)
}

/// Decides and builds the patch for `pod`.
pub fn inject(pod: &Value, cfg: &InjectConfig) -> Result<Decision, InjectError> {
    let spec = pod
        .get("spec")
        .filter(|s| s.is_object())
        .ok_or_else(|| InjectError::NotAPod("no spec object".into()))?;
    let containers = spec
        .get("containers")
        .and_then(Value::as_array)
        .ok_or_else(|| InjectError::NotAPod("spec.containers is not a list".into()))?;
    // The patch adds annotations under metadata: without an object there it would not apply
    // (found by the AdmissionReview fuzzer, tests/fuzz-regressions/metadata-not-an-object.json).
    if !pod.get("metadata").is_some_and(Value::is_object) {
        return Err(InjectError::NotAPod("no metadata object".into()));
    }
    let opt_out = |kind: &str| {
        str_at(pod, &format!("/metadata/{kind}/{}", escape(INJECT_KEY))) == Some("false")
    };
    if opt_out("labels") || opt_out("annotations") {
        return Ok(Decision::Skip("opted out with weft.io/inject: \"false\""));
    }
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        return Ok(Decision::Skip(
            "hostNetwork pods share the node's network; they are never injected",
        ));
    }
    let names = |field: &str| -> Vec<String> {
        spec.get(field)
            .and_then(Value::as_array)
            .map(|list| {
                list.iter()
                    .filter_map(|c| c.get("name").and_then(Value::as_str).map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let (init_names, app_names) = (names("initContainers"), names("containers"));
    if str_at(
        pod,
        &format!("/metadata/annotations/{}", escape(STATUS_KEY)),
    )
    .is_some()
        || init_names
            .iter()
            .chain(&app_names)
            .any(|n| n == PROXY_NAME || n == INIT_NAME)
    {
        return Ok(Decision::Skip("already injected"));
    }
    let native = match str_at(
        pod,
        &format!("/metadata/annotations/{}", escape(NATIVE_SIDECAR_KEY)),
    ) {
        Some("false") => false,
        Some("true") => true,
        _ => cfg.native_sidecar,
    };

    // A typo in a security setting refuses the pod rather than leaving its egress open.
    let registry_only = match str_at(
        pod,
        &format!("/metadata/annotations/{}", escape(OUTBOUND_POLICY_KEY)),
    ) {
        None | Some("allow-any") => false,
        Some("registry-only") => true,
        Some(other) => {
            return Err(InjectError::BadAnnotation {
                key: OUTBOUND_POLICY_KEY,
                value: other.to_owned(),
                allowed: "allow-any, registry-only",
            });
        }
    };

    let mut ops = Vec::new();
    let mut annotations = BTreeMap::new();
    annotations.insert(
        STATUS_KEY.to_owned(),
        Value::from(if native {
            "injected: native-sidecar"
        } else {
            "injected: container"
        }),
    );

    // Probes first: their paths index the containers as they are before any insertion.
    let mut probes = serde_json::Map::new();
    for (i, c) in containers.iter().enumerate() {
        let name = c.get("name").and_then(Value::as_str).unwrap_or("");
        for (field, short) in [
            ("readinessProbe", "readyz"),
            ("livenessProbe", "livez"),
            ("startupProbe", "startupz"),
        ] {
            if let Some(http) = c.get(field).and_then(|p| p.get("httpGet")) {
                probes.insert(format!("{name}/{short}"), http.clone());
                ops.push(json!({
                    "op": "replace",
                    "path": format!("/spec/containers/{i}/{field}/httpGet"),
                    "value": {"path": format!("/app-health/{name}/{short}"), "port": HEALTH_PORT, "scheme": "HTTP"},
                }));
            }
        }
    }
    if !probes.is_empty() {
        annotations.insert(
            APP_PROBES_KEY.to_owned(),
            Value::from(Value::Object(probes).to_string()),
        );
    }

    let init = init_container(cfg);
    let proxy = proxy_container(cfg, native, registry_only);
    match (
        native,
        spec.get("initContainers")
            .and_then(Value::as_array)
            .is_some(),
    ) {
        // Interception first, then the proxy, then the pod's own init containers, so that even
        // those run inside the mesh.
        (true, true) => {
            ops.push(add("/spec/initContainers/0", init));
            ops.push(add("/spec/initContainers/1", proxy));
        }
        (true, false) => ops.push(add("/spec/initContainers", json!([init, proxy]))),
        (false, has_init) => {
            ops.push(if has_init {
                add("/spec/initContainers/0", init)
            } else {
                add("/spec/initContainers", json!([init]))
            });
            ops.push(add("/spec/containers/0", proxy));
        }
    }
    let volumes = identity_volumes();
    match spec.get("volumes").and_then(Value::as_array) {
        Some(_) => ops.extend(volumes.into_iter().map(|v| add("/spec/volumes/-", v))),
        None => ops.push(add("/spec/volumes", Value::Array(volumes))),
    }
    match pod
        .pointer("/metadata/annotations")
        .and_then(Value::as_object)
    {
        Some(_) => ops.extend(
            annotations
                .into_iter()
                .map(|(k, v)| add(format!("/metadata/annotations/{}", escape(&k)), v)),
        ),
        None => ops.push(add(
            "/metadata/annotations",
            Value::Object(annotations.into_iter().collect()),
        )),
    }
    Ok(Decision::Patch(ops))
}

fn init_container(cfg: &InjectConfig) -> Value {
    json!({
        "name": INIT_NAME,
        "image": cfg.init_image,
        "args": ["init", "--proxy-uid", cfg.proxy_uid.to_string(), "--inbound-port", "15006",
                 "--outbound-port", "15001", "--exclude-inbound-ports", HEALTH_PORT.to_string()],
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
        "securityContext": {
            "runAsUser": 0, "runAsNonRoot": false, "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
        },
    })
}

fn proxy_container(cfg: &InjectConfig, native: bool, registry_only: bool) -> Value {
    let env_from = |name: &str, path: &str| json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}});
    let ready = json!({"httpGet": {"path": "/ready", "port": HEALTH_PORT}, "periodSeconds": 2, "failureThreshold": 30});
    let mut c = json!({
        "name": PROXY_NAME,
        "image": cfg.proxy_image,
        // The pod's service account and its projected token (audience `weft`) are its proof
        // of identity for a workload certificate (reviewed by the API server).
        "args": ["--control-plane", cfg.control_plane, "--node-id", "$(POD_NAME)", "--namespace", "$(POD_NAMESPACE)",
                 "--service-account", "$(SERVICE_ACCOUNT)", "--identity-token-file", format!("{TOKEN_DIR}/{TOKEN_FILE}"),
                 "--outbound-addr", "127.0.0.1:15001", "--inbound-addr", "0.0.0.0:15006",
                 "--admin-addr", format!("0.0.0.0:{HEALTH_PORT}"), "--transparent"],
        // The original probes reach the proxy from the pod's own annotation (downward API), so
        // `/app-health/...` can run them; an absent annotation is an empty value.
        "env": [env_from("POD_NAME", "metadata.name"), env_from("POD_NAMESPACE", "metadata.namespace"),
                env_from("SERVICE_ACCOUNT", "spec.serviceAccountName"),
                env_from("WEFT_APP_PROBES", &format!("metadata.annotations['{APP_PROBES_KEY}']")),
                // Set on pods by the PodTopologyLabels admission (Kubernetes 1.33+); empty
                // without it, and then zone-aware balancing is off for this proxy.
                env_from("WEFT_ZONE", "metadata.labels['topology.kubernetes.io/zone']")],
        "ports": [{"name": "weft-health", "containerPort": HEALTH_PORT}],
        "readinessProbe": ready,
        "resources": {"requests": {"cpu": "10m", "memory": "40Mi"}, "limits": {"memory": "256Mi"}},
        "securityContext": {
            "runAsUser": cfg.proxy_uid, "runAsGroup": cfg.proxy_uid, "runAsNonRoot": true,
            "allowPrivilegeEscalation": false, "readOnlyRootFilesystem": true, "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [{"name": "weft-token", "mountPath": TOKEN_DIR, "readOnly": true},
                         {"name": "weft-identity", "mountPath": "/var/run/weft"}],
    });
    if registry_only && let Some(args) = c["args"].as_array_mut() {
        args.extend([json!("--outbound-traffic-policy"), json!("registry-only")]);
    }
    if native {
        // The kubelet starts the app's containers only once this startup probe passes.
        c["restartPolicy"] = json!("Always");
        c["startupProbe"] = json!({"httpGet": {"path": "/ready", "port": HEALTH_PORT}, "periodSeconds": 1, "failureThreshold": 60});
    } else {
        // Older clusters: containers start in order and a postStart hook blocks the next one.
        c["lifecycle"] = json!({"postStart": {"exec": {"command": ["weft-proxy", "wait-ready", "--timeout", "60s"]}}});
    }
    c
}

fn identity_volumes() -> Vec<Value> {
    vec![
        json!({"name": "weft-token", "projected": {"sources": [{"serviceAccountToken": {"audience": crate::tokenreview::AUDIENCE, "expirationSeconds": 3600, "path": TOKEN_FILE}}]}}),
        json!({"name": "weft-identity", "emptyDir": {"medium": "Memory"}}),
    ]
}

/// Answers one AdmissionReview v1 request body. A review that cannot be read at all is an error
/// (the HTTP layer answers 400); a readable review always gets a review back.
pub fn review(body: &[u8], cfg: &InjectConfig) -> Result<Value, InjectError> {
    let review: Value =
        serde_json::from_slice(body).map_err(|e| InjectError::BadReview(e.to_string()))?;
    let api_version = review
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("");
    if api_version != "admission.k8s.io/v1" {
        return Err(InjectError::BadReview(format!(
            "apiVersion {api_version:?}: only admission.k8s.io/v1 is served"
        )));
    }
    let request = review
        .get("request")
        .ok_or_else(|| InjectError::BadReview("no request".into()))?;
    let uid = request
        .get("uid")
        .and_then(Value::as_str)
        .ok_or_else(|| InjectError::BadReview("request.uid is missing".into()))?;
    let mut response = json!({"uid": uid, "allowed": true});
    match request.get("object").map(|pod| inject(pod, cfg)) {
        Some(Ok(Decision::Patch(ops))) => {
            let patch = serde_json::to_vec(&ops).expect("JSON values serialize");
            response["patchType"] = json!("JSONPatch");
            response["patch"] = json!(base64::engine::general_purpose::STANDARD.encode(patch));
        }
        Some(Ok(Decision::Skip(reason))) => {
            response["warnings"] = json!([format!("weft: not injected: {reason}")])
        }
        Some(Err(e)) => {
            // Refuse rather than start the pod outside the mesh; the message says why.
            response["allowed"] = json!(false);
            response["status"] =
                json!({"code": 400, "message": format!("weft sidecar injection: {e}")});
        }
        None => return Err(InjectError::BadReview("request.object is missing".into())),
    }
    Ok(
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response}),
    )
}
