//! Hostile-input fuzzing of everything a proxy parses from outside: mesh YAML, control-plane
//! protobuf, requests against the routing table, and trace context headers (W3C
//! `traceparent`, B3 single and multi).
//!
//! A seeded mutational fuzzer (no nightly toolchain needed): seeds are real configurations,
//! mutations are byte edits and splices of YAML/protocol tokens. CI runs a bounded number of
//! iterations with a fixed seed; run longer with `WEFT_FUZZ_ITERS=200000 WEFT_FUZZ_SEED=<n>
//! cargo test -p weft-proxy --test fuzz --release`. A crash prints the seed and the input, which
//! then goes into `tests/fuzz-regressions/` and is replayed on every run.

mod common;

use std::panic::{AssertUnwindSafe, catch_unwind};

use http::Request;
use prost::Message;
use weft_proto::pb::ConfigResponse;
use weft_proto::{Limits, Resources, parse_yaml, to_resources};
use weft_proxy::routing::Table;
use weft_proxy::state::{ProxyState, Source};
use weft_proxy::trace::context::{self as trace, B3Style, Incoming, Outgoing};

const SEEDS: &[&str] = &[
    include_str!("../../control-plane/src/default-mesh.yaml"),
    r#"
services:
  - name: reviews
    protocol: grpc
    ports: [9080]
    endpoints:
      - {address: "127.0.0.1:9001", labels: {version: v1}, weight: 3}
      - {address: "[::1]:9002", labels: {version: v2}}
    subsets: {v1: {version: v1}, v2: {version: v2}}
    policy: {connect_timeout: 250ms, idle_timeout: 1m}
routes:
  - name: reviews
    hosts: [reviews, "*"]
    rules:
      - name: beta
        match:
          path: {regex: "/api/v[0-9]+/.*"}
          methods: [GET, POST]
          headers: [{name: x-user-group, exact: beta}, {name: x-debug, present: true, invert: true}]
          query: [{name: q, prefix: "a b"}]
        backends: [{service: reviews, subset: v2}]
        timeout: 2s
        retries: {attempts: 3, retry_on: [5xx, "503", reset], per_try_timeout: 100ms, backoff_base: 25ms, backoff_max: 1s}
      - backends:
          - {service: reviews, subset: v1, weight: 90}
          - {service: reviews, subset: v2, weight: 10}
"#,
];

/// Tokens worth splicing in: structure, edge values, and things that break naive parsers.
const DICT: &[&str] = &[
    "services:",
    "routes:",
    "rules:",
    "backends:",
    "match:",
    "headers:",
    "query:",
    "path:",
    "hosts:",
    "subsets:",
    "endpoints:",
    "- ",
    "{",
    "}",
    "[",
    "]",
    ": ",
    ",",
    "\n",
    "\n  ",
    "    ",
    "exact: ",
    "prefix: ",
    "regex: ",
    "present: true",
    "present: false",
    "invert: true",
    "weight: 0",
    "weight: 4294967295",
    "weight: -1",
    "timeout: 0s",
    "timeout: 99999999m",
    "\"*\"",
    "*",
    "&a ",
    "*a",
    "!!binary ",
    "~",
    "null",
    "\"(\"",
    "\"[a-z]{1000}\"",
    "\"\\u0000\"",
    "'",
    "\"",
    "127.0.0.1:0",
    "[::1]:1",
    "host:99999",
    "subset: nope",
    "service: nope",
    "protocol: grpc",
    "protocol: bogus",
    "methods: [get]",
    "retry_on: [x]",
    "attempts: 11",
    "%",
    "\t",
    "#",
];

struct Fuzzer {
    rng: fastrand::Rng,
}

impl Fuzzer {
    fn mutate(&mut self, input: &[u8]) -> Vec<u8> {
        let mut out = input.to_vec();
        for _ in 0..self.rng.usize(1..=4) {
            let len = out.len();
            match self.rng.u8(0..6) {
                0 if len > 0 => {
                    let i = self.rng.usize(0..len);
                    out[i] ^= 1 << self.rng.u8(0..8);
                }
                1 if len > 0 => {
                    let i = self.rng.usize(0..len);
                    out[i] = self.rng.u8(..);
                }
                2 if len > 1 => {
                    let a = self.rng.usize(0..len);
                    let b = (a + self.rng.usize(1..=16)).min(len);
                    out.drain(a..b);
                }
                3 if len > 1 => {
                    let a = self.rng.usize(0..len);
                    let b = (a + self.rng.usize(1..=32)).min(len);
                    let chunk = out[a..b].to_vec();
                    let at = self.rng.usize(0..=out.len());
                    out.splice(at..at, chunk);
                }
                _ => {
                    let token = DICT[self.rng.usize(0..DICT.len())].as_bytes();
                    let at = self.rng.usize(0..=out.len());
                    out.splice(at..at, token.iter().copied());
                }
            }
        }
        out
    }
}

fn iterations() -> usize {
    common::fuzz_setting("WEFT_FUZZ_ITERS", 3000) as usize
}

fn fuzzer() -> (u64, Fuzzer) {
    let seed = common::fuzz_setting("WEFT_FUZZ_SEED", DEFAULT_SEED);
    (
        seed,
        Fuzzer {
            rng: fastrand::Rng::with_seed(seed),
        },
    )
}

const DEFAULT_SEED: u64 = 0x5eed_f00d;

/// Runs `check` and turns a panic into a failure that shows the reproducer.
fn guarded(what: &str, seed: u64, iteration: usize, input: &[u8], check: impl FnOnce()) {
    if catch_unwind(AssertUnwindSafe(check)).is_err() {
        panic!(
            "{what} panicked (seed {seed}, iteration {iteration}); input:\n{}",
            String::from_utf8_lossy(input)
        );
    }
}

/// What the control plane accepts, the proxy must compile: otherwise a valid push is NACKed.
fn check_yaml(input: &[u8]) {
    let Ok(text) = std::str::from_utf8(input) else {
        return;
    };
    let Ok(cfg) = parse_yaml("fuzz.yaml", text, &Limits::default()) else {
        return;
    };
    let table = Table::compile(&cfg, &Limits::default())
        .unwrap_or_else(|e| panic!("accepted by validation but not compiled: {e}"));
    let back =
        weft_proto::from_resources(&to_resources(&cfg)).expect("own wire form converts back");
    Table::compile(&back, &Limits::default()).expect("wire round trip compiles");
    route_some(&table);
}

fn route_some(table: &Table) {
    let hosts = [
        "reviews",
        "REVIEWS:80",
        "",
        "*",
        "a.b.c",
        "[::1]:9",
        "reviews.",
        "ünïcode",
    ];
    let paths = [
        "/",
        "/api/v1/x",
        "/api/v/",
        "/%ff?q=a%20b&q",
        "/?q=a+b",
        "//",
        "/x?%zz=1",
    ];
    for (i, host) in hosts.iter().enumerate() {
        for path in paths {
            let mut req =
                Request::builder()
                    .uri(path)
                    .method(if i % 2 == 0 { "GET" } else { "POST" });
            if let Ok(h) = http::HeaderValue::from_str(host) {
                req = req.header("host", h);
            }
            if i % 3 == 0 {
                req = req.header("x-user-group", "beta").header("x-debug", "1");
            }
            if let Ok(req) = req.body(()) {
                let _ = table.route(&req);
            }
        }
    }
}

#[test]
fn fuzz_mesh_yaml() {
    let (seed, mut f) = fuzzer();
    for seed_text in SEEDS {
        check_yaml(seed_text.as_bytes());
    }
    for i in 0..iterations() {
        let base = SEEDS[i % SEEDS.len()].as_bytes();
        let input = f.mutate(base);
        guarded("mesh YAML", seed, i, &input, || check_yaml(&input));
    }
}

#[test]
fn fuzz_config_protobuf() {
    let (seed, mut f) = fuzzer();
    let state = ProxyState::new(Limits::default());
    let good = to_resources(&parse_yaml("seed", SEEDS[1], &Limits::default()).unwrap());
    state.apply(&good, 1, Source::File).unwrap();
    let encoded = ConfigResponse {
        version: 2,
        nonce: "n".into(),
        full: true,
        clusters: good.clusters.clone(),
        routes: good.routes.clone(),
        ..Default::default()
    }
    .encode_to_vec();
    for i in 0..iterations() {
        let input = f.mutate(&encoded);
        guarded("config protobuf", seed, i, &input, || {
            let Ok(resp) = ConfigResponse::decode(input.as_slice()) else {
                return;
            };
            let resources = Resources::default().apply_delta(&resp);
            let before = state.load_full().version;
            if state
                .apply(&resources, before + 1, Source::ControlPlane)
                .is_err()
            {
                assert_eq!(
                    state.load_full().version,
                    before,
                    "a refused config must leave the running one"
                );
            }
            route_some(&state.load_full().table);
        });
    }
}

/// Trace headers as callers send them: W3C, B3 single, B3 multi (`trace|span|sampled`).
const TRACE_SEEDS: &[&str] = &[
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
    "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
    "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90",
    "a3ce929d0e0e4736-e457b5a2e4d86bd1-d",
    "0",
    "80f198ee56343ba864fe8b2a57d3eff7|e457b5a2e4d86bd1|1",
    "a3ce929d0e0e4736|e457b5a2e4d86bd1|true",
];

/// Reading never panics; whatever context is read, the proxy's own span written from it
/// reads back as the same trace, in the same B3 style, with the same sampling decision.
fn check_trace(input: &[u8], kind: usize) {
    let mut headers = http::HeaderMap::new();
    let header = |bytes: &[u8]| http::HeaderValue::from_bytes(bytes).ok();
    match kind % 4 {
        0 => {
            if let Some(v) = header(input) {
                headers.insert(trace::TRACEPARENT, v);
            }
        }
        1 => {
            if let Some(v) = header(input) {
                headers.insert(trace::B3, v);
            }
        }
        _ => {
            let names = [
                trace::B3_TRACE_ID,
                trace::B3_SPAN_ID,
                trace::B3_SAMPLED,
                trace::B3_FLAGS,
            ];
            for (name, part) in names.into_iter().zip(input.split(|b| *b == b'|')) {
                if let Some(v) = header(part) {
                    headers.insert(name, v);
                }
            }
            if kind % 4 == 3
                && let Some(v) = header(input)
            {
                // Both at once: W3C must win without the B3 part breaking anything.
                headers.insert(trace::TRACEPARENT, v);
            }
        }
    }
    let incoming = Incoming::read(&headers);
    let Some((trace_id, parent_span)) = incoming.parent else {
        return;
    };
    assert_ne!(trace_id, [0; 16], "an all-zero trace id is invalid");
    let sampled = incoming.sampled.unwrap_or(true);
    let own = Outgoing {
        trace_id,
        span_id: [7; 8],
        parent_span_id: Some(parent_span),
        sampled,
        b3: incoming.b3,
    };
    own.inject(&mut headers);
    let again = Incoming::read(&headers);
    assert_eq!(
        again.parent,
        Some((trace_id, [7; 8])),
        "round trip of {incoming:?}"
    );
    assert_eq!(again.sampled, Some(sampled));
    assert_eq!(again.b3, incoming.b3);
    if incoming.b3 == Some(B3Style::Multi) {
        assert!(headers.get(trace::B3_FLAGS).is_none());
    }
}

#[test]
fn fuzz_trace_headers() {
    let (seed, mut f) = fuzzer();
    for (i, seed_text) in TRACE_SEEDS.iter().enumerate() {
        check_trace(seed_text.as_bytes(), i);
    }
    for i in 0..iterations() {
        let base = TRACE_SEEDS[i % TRACE_SEEDS.len()].as_bytes();
        let input = f.mutate(base);
        guarded("trace headers", seed, i, &input, || check_trace(&input, i));
    }
}

#[test]
fn fuzz_regressions_replay() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz-regressions");
    for entry in std::fs::read_dir(&dir).expect("regression corpus") {
        let path = entry.unwrap().path();
        let input = std::fs::read(&path).unwrap();
        guarded(&path.display().to_string(), 0, 0, &input, || {
            check_yaml(&input)
        });
    }
}
