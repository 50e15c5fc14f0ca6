//! weft's control plane.
//!
//! It reads the declarative mesh configuration (a YAML file, hot-reloaded), keeps the live
//! version in a [`registry::Registry`] backed by a [`store::Store`], streams it to every proxy
//! over gRPC ([`xds`]: full snapshot, then deltas, ACK/NACK tracked per proxy) and serves an
//! admin JSON API ([`admin`]) that `weftctl` ([`client`], [`cli`]) talks to.
//!
//! ```text
//! mesh.yaml ─▶ source (watch) ─┐
//! weftctl ─▶ admin (HTTP/JSON) ─┼─▶ registry ─▶ store
//!                               │      └─ watch channel ─▶ xds stream per proxy
//! ```

pub mod admin;
pub mod api;
pub mod ca;
pub mod certify;
pub mod cli;
pub mod client;
pub mod discovery;
pub mod etcd;
pub mod experiment;
pub mod experiment_api;
pub mod experiment_cli;
pub mod flags;
pub mod inject;
pub mod kubernetes;
pub mod leader;
pub mod metrics;
pub mod registry;
pub mod roster;
pub mod server;
pub mod shutdown;
pub mod source;
pub mod store;
pub mod tokenreview;
pub mod top;
pub mod webhook;
pub mod xds;
