//! Shared helpers for the in-process integration tests: a control plane on 127.0.0.1:0 and
//! polling with a deadline (never fixed sleeps).

#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use weft_control::registry::Registry;
use weft_control::server::{ControlPlane, Options};
use weft_control::shutdown::{self, Trigger};
use weft_control::source::Source;

pub const DEADLINE: Duration = Duration::from_secs(10);

/// A control plane serving the embedded mesh from an in-memory store.
pub struct Running {
    pub registry: Registry,
    pub grpc: SocketAddr,
    pub admin: SocketAddr,
    /// The injector endpoint, when `opts.webhook` asked for it.
    pub webhook: Option<SocketAddr>,
    trigger: Trigger,
    task: tokio::task::JoinHandle<Result<(), weft_control::server::ServerError>>,
}

pub async fn start() -> Running {
    start_with(Options::default()).await
}

/// [`start`] with `opts`; the gRPC and admin listeners are always on 127.0.0.1:0.
pub async fn start_with(opts: Options) -> Running {
    let opts = Options {
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        admin_addr: "127.0.0.1:0".parse().unwrap(),
        ..opts
    };
    let loaded = Source::Embedded.load().unwrap();
    let cp = ControlPlane::bind(opts, loaded).await.unwrap();
    let (trigger, signal) = shutdown::channel();
    Running {
        registry: cp.registry().clone(),
        grpc: cp.grpc_addr(),
        admin: cp.admin_addr(),
        webhook: cp.webhook_addr(),
        trigger,
        task: tokio::spawn(cp.serve(signal)),
    }
}

impl Running {
    /// Shuts down and checks the servers drained cleanly.
    pub async fn stop(self) {
        self.trigger.fire();
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("control plane did not stop in time")
            .unwrap()
            .unwrap();
    }
}

/// Polls `check` until it returns `Some`, panicking with `what` after [`DEADLINE`].
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
