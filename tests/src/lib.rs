//! Harness for weft's end-to-end tests and local demo: builds and starts the real binaries on
//! loopback (port 0 everywhere), runs upstream apps on real sockets, and offers a small HTTP
//! client plus polling helpers (no fixed sleeps).

pub mod apps;
pub mod bins;
pub mod chaos;
pub mod demo;
pub mod etcd;
pub mod http;
pub mod identity;
pub mod kubeapi;
pub mod load;
pub mod mesh;
pub mod netns;
pub mod observe;
pub mod procs;
pub mod scale;
pub mod suite;

pub use apps::{GrpcApp, VersionApp};
pub use chaos::ChaosApp;
pub use http::{HttpClient, eventually};
pub use load::Load;
pub use procs::{ControlPlane, ControlPlaneOpts, Proxy, ProxyOpts, control_and_proxy};
