//! Generated code for Mandate's protobuf schemas: the public gRPC API, the durable formats
//! (commands, events, state records, snapshots) and the internal raft transport.
//!
//! Without the `grpc` feature only the prost messages are built, so the pure domain crate can
//! use the durable formats without pulling in tonic.

#![allow(clippy::all, clippy::pedantic, missing_docs)]

/// Version 1 of the Mandate schemas.
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/mandate.v1.rs"));
}
