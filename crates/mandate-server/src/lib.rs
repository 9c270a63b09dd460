//! A Mandate node: configuration, the client-facing gRPC services (agent registry, cluster
//! administration), caller authentication, and the peer listener for raft.
//!
//! Errors from the domain and from the cluster are mapped to gRPC status codes once, in
//! [`status`]. Every request is authenticated with an operator token before anything is read or
//! proposed, and validated so that bad input is refused before it reaches the log.

pub mod audit_service;
pub mod audit_sink;
pub mod auth;
pub mod authz_service;
pub mod cluster_service;
pub mod config;
pub mod http;
pub mod jose;
pub mod refusals;
pub mod registry_service;
pub mod sealing;
pub mod server;
pub mod status;
pub mod tls;
pub mod tokens;

pub use config::NodeConfig;
pub use server::{run, ServerError};

/// Largest client request accepted, in bytes; larger ones are refused with `InvalidArgument`.
pub const REQUEST_BYTES_MAX: usize = 1024 * 1024;
/// Hard transport limit on client messages; above it tonic refuses with `OutOfRange`.
pub const CLIENT_MESSAGE_BYTES_MAX: usize = 4 * 1024 * 1024;
