//! weft-proxy: weft's data-plane sidecar.
//!
//! Request path: [`server`] accepts HTTP/1.1 and h2c → [`forward`] routes with the running
//! [`routing::Table`] (held by [`state`], swapped by [`xds`]) → [`balance`] picks backend and
//! endpoint → [`upstream`] forwards on a pooled connection → failures become responses in
//! [`error`]. [`observe`] wraps each request for [`metrics`], [`trace`] and [`access_log`].
//! [`admin`] serves `/metrics`, `/config`, `/ready`, `/live`, `/log-level` and `/drain`; [`app`]
//! wires it all from [`cli`].
//!
//! Every traffic listener runs under [`limits`] (connections, header size and read timeout,
//! HTTP/2 streams, idle and per-connection quotas), enforced per connection by [`connection`].
//!
//! Kubernetes: [`intercept`] (`weft-proxy init` iptables rules, SO_ORIGINAL_DST, protocol
//! detection, transparent listeners) and [`health`] (`wait-ready`, `/app-health` probes).
//!
//! Identity (when `--service-account` is given): [`identity`] keeps a SPIFFE certificate from the
//! control plane's CA and speaks mTLS to destinations that have an identity
//! ([`identity::mesh`]); [`inbound`] applies peer authentication, [`jwt`] and [`policy`]
//! (authorization) before a request reaches the local app.

pub mod access_log;
pub mod admin;
pub mod answer;
pub mod app;
pub mod balance;
pub mod body;
pub mod cli;
pub mod connection;
pub mod cors;
pub mod counting;
pub mod error;
pub mod forward;
pub mod h1;
pub mod h1_server;
pub mod header_edits;
pub mod health;
pub mod identity;
pub mod inbound;
pub mod intercept;
pub mod jwt;
pub mod limits;
pub mod linger;
pub mod locality;
pub mod log_level;
pub mod metrics;
pub mod observe;
pub mod origination;
pub mod policy;
pub mod pool;
pub mod resilience;
pub mod rewrite;
pub mod routing;
pub mod server;
pub mod state;
pub mod stats;
pub mod sticky;
pub mod trace;
pub mod upgrade;
pub mod upstream;
pub mod xds;
