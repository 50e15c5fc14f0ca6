//! Hostile-input fuzzing of the sidecar injector's AdmissionReview handler
//! ([`weft_control::inject::review`], what `POST /inject` runs).
//!
//! Seeds are real AdmissionReviews wrapping every pod of `tests/data/inject/`. Mutations are
//! structural (a value anywhere in the JSON tree replaced by a hostile one, a key dropped, an
//! array emptied, deep nesting) and byte-level (flips, cuts, splices). Properties: the handler
//! never panics; a readable review always gets a well-formed AdmissionReview back with the
//! request's uid, `allowed` a boolean, and a patch that is base64 JSON Patch which applies to
//! the pod it was made for; an unreadable one gets an error that says what is wrong.
//!
//! CI runs a bounded number of iterations with a fixed seed; run longer with
//! `WEFT_FUZZ_ITERS=100000 WEFT_FUZZ_SEED=<n> cargo test -p weft-control --test fuzz_admission`.
//! A crash prints the seed and the input, which then goes into `tests/fuzz-regressions/` and
//! is replayed on every run.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;

use base64::Engine as _;
use serde_json::{Value, json};
use weft_control::inject::{InjectConfig, review};

const DEFAULT_SEED: u64 = 0xad_5eed;

fn iterations() -> usize {
    std::env::var("WEFT_FUZZ_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

fn seed() -> u64 {
    std::env::var("WEFT_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_SEED)
}

/// AdmissionReviews around every input pod of the golden directory.
fn seeds() -> Vec<Value> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/inject");
    let mut out = Vec::new();
    let mut paths: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy();
            name.ends_with(".yaml") && !name.ends_with(".golden.yaml")
        })
        .collect();
    paths.sort();
    for (i, path) in paths.iter().enumerate() {
        let pod: Value = serde_yaml_ng::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        out.push(json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": format!("uid-{i}"),
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "operation": "CREATE",
                "namespace": "default",
                "object": pod,
            },
        }));
    }
    assert!(out.len() >= 7, "seed pods found: {}", out.len());
    out
}

/// Values that break naive handlers.
fn hostile(rng: &mut fastrand::Rng) -> Value {
    match rng.u8(0..12) {
        0 => Value::Null,
        1 => json!(true),
        2 => json!(-1),
        3 => json!(1e308),
        4 => json!(""),
        5 => json!("~1/~0\u{0}\u{202e}ünï"),
        6 => json!([]),
        7 => json!({}),
        8 => json!([null, 1, "x", {}]),
        9 => json!({"name": null, "image": 7, "ports": "all"}),
        10 => {
            // Deep nesting (serde_json's recursion limit is 128: stay near it).
            let mut v = json!("deep");
            for _ in 0..100 {
                v = json!([v]);
            }
            v
        }
        _ => json!("x".repeat(rng.usize(1..2000))),
    }
}

/// Every (parent path, key/index) in the tree, for picking a spot to mutate.
fn spots(v: &Value, path: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    out.push(path.clone());
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                path.push(k.clone());
                spots(child, path, out);
                path.pop();
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                path.push(i.to_string());
                spots(child, path, out);
                path.pop();
            }
        }
        _ => {}
    }
}

fn at_mut<'a>(v: &'a mut Value, path: &[String]) -> Option<&'a mut Value> {
    path.iter().try_fold(v, |v, k| match v {
        Value::Object(m) => m.get_mut(k),
        Value::Array(a) => a.get_mut(k.parse::<usize>().ok()?),
        _ => None,
    })
}

fn mutate_tree(rng: &mut fastrand::Rng, review: &mut Value) {
    let mut all = Vec::new();
    spots(review, &mut Vec::new(), &mut all);
    for _ in 0..rng.usize(1..=3) {
        let path = &all[rng.usize(0..all.len())];
        let Some(spot) = at_mut(review, path) else {
            continue;
        };
        match rng.u8(0..4) {
            0 | 1 => *spot = hostile(rng),
            2 => match spot {
                Value::Object(m) if !m.is_empty() => {
                    let key = m.keys().nth(rng.usize(0..m.len())).unwrap().clone();
                    m.remove(&key);
                }
                Value::Array(a) => a.clear(),
                other => *other = hostile(rng),
            },
            _ => {
                if let Value::Object(m) = spot {
                    m.insert(
                        [
                            "name",
                            "containers",
                            "initContainers",
                            "metadata",
                            "spec",
                            "annotations",
                            "labels",
                            "hostNetwork",
                            "readinessProbe",
                            "volumes",
                        ][rng.usize(0..10)]
                        .to_owned(),
                        hostile(rng),
                    );
                }
            }
        }
    }
}

fn mutate_bytes(rng: &mut fastrand::Rng, input: &mut Vec<u8>) {
    for _ in 0..rng.usize(1..=4) {
        let len = input.len();
        if len < 2 {
            return;
        }
        match rng.u8(0..4) {
            0 => input[rng.usize(0..len)] ^= 1 << rng.u8(0..8),
            1 => input[rng.usize(0..len)] = b"{}[]\",:0\\"[rng.usize(0..9)],
            2 => {
                let a = rng.usize(0..len);
                input.truncate(a.max(1));
            }
            _ => {
                let a = rng.usize(0..len);
                let b = (a + rng.usize(1..=64)).min(len);
                let chunk = input[a..b].to_vec();
                let at = rng.usize(0..=input.len());
                input.splice(at..at, chunk);
            }
        }
    }
}

/// The properties, for one request body.
fn check(body: &[u8]) {
    let cfg = InjectConfig::default();
    let sent: Option<Value> = serde_json::from_slice(body).ok();
    match review(body, &cfg) {
        Err(e) => {
            let message = e.to_string();
            assert!(
                message.starts_with("malformed AdmissionReview: ") && message.len() > 27,
                "{message}"
            );
        }
        Ok(answer) => {
            let sent = sent.expect("an answered review was valid JSON");
            assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
            assert_eq!(answer["kind"], "AdmissionReview");
            let response = &answer["response"];
            assert_eq!(
                response["uid"], sent["request"]["uid"],
                "the request's uid is echoed"
            );
            let allowed = response["allowed"].as_bool().expect("allowed is a boolean");
            if !allowed {
                let message = response["status"]["message"]
                    .as_str()
                    .expect("a refusal says why");
                assert!(message.starts_with("weft sidecar injection: "), "{message}");
            }
            if let Some(patch) = response.get("patch") {
                assert!(allowed);
                assert_eq!(response["patchType"], "JSONPatch");
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(patch.as_str().expect("the patch is a string"))
                    .expect("the patch is base64");
                let patch: json_patch::Patch =
                    serde_json::from_slice(&bytes).expect("the patch is JSON Patch");
                let mut pod = sent["request"]["object"].clone();
                json_patch::patch(&mut pod, &patch)
                    .unwrap_or_else(|e| panic!("the patch does not apply to its pod: {e}"));
            }
        }
    }
}

fn guarded(what: &str, seed: u64, iteration: usize, input: &[u8]) {
    if catch_unwind(AssertUnwindSafe(|| check(input))).is_err() {
        panic!(
            "{what} failed (seed {seed}, iteration {iteration}); input:\n{}",
            String::from_utf8_lossy(input)
        );
    }
}

#[test]
fn fuzz_admission_review() {
    let seed = seed();
    let mut rng = fastrand::Rng::with_seed(seed);
    let seeds = seeds();
    for s in &seeds {
        check(s.to_string().as_bytes());
    }
    for i in 0..iterations() {
        let mut review = seeds[i % seeds.len()].clone();
        mutate_tree(&mut rng, &mut review);
        let mut body = serde_json::to_vec(&review).unwrap();
        if i % 3 == 0 {
            mutate_bytes(&mut rng, &mut body);
        }
        guarded("AdmissionReview", seed, i, &body);
    }
}

#[test]
fn fuzz_regressions_replay() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-regressions");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).expect("regression corpus") {
        let path = entry.unwrap().path();
        guarded(
            &path.display().to_string(),
            0,
            0,
            &std::fs::read(&path).unwrap(),
        );
        n += 1;
    }
    assert!(n > 0, "the regression corpus is empty");
}
