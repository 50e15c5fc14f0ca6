//! weft's shared API: the control-plane wire protocol ([`pb`], generated from
//! `proto/weft/config/v1/config.proto`) and the declarative mesh model ([`model`]) that
//! operators write, the control plane stores and the proxy compiles.

pub mod answer;
pub mod convert;
pub mod cors;
pub mod experiment;
pub mod headers;
pub mod locate;
pub mod model;
pub mod ops;
pub mod policy;
pub mod rewrite;
pub mod security;
pub mod stats;
#[cfg(test)]
mod test_support;
pub mod upstream_tls;
pub mod validate;

/// Generated protobuf and tonic code for `weft.config.v1`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod pb {
    tonic::include_proto!("weft.config.v1");
}

/// Generated protobuf and tonic code for `weft.identity.v1` (certificates for workloads).
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod identity_pb {
    tonic::include_proto!("weft.identity.v1");
}

pub use convert::{ConvertError, Delta, Resources, from_resources, to_resources};
pub use model::MeshConfig;
pub use validate::{ConfigError, Issue, Limits, parse_yaml, validate};
