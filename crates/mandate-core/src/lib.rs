//! Mandate's domain, pure and deterministic: principals, validation, commands, events,
//! materialized state and `apply`.
//!
//! Nothing here performs I/O, reads a clock or draws a random number. The leader stamps every
//! command with its time and generated ids before proposing it; [`apply::apply_batch`] then turns
//! each command into events (or a deterministic [`DomainError`]) and materializes the events into
//! a key/value overlay that the storage layer writes in one atomic batch. Replaying the same log
//! therefore always rebuilds exactly the same state (invariant 7).

pub mod apply;
pub mod audit;
pub mod authz;
pub mod delegation;
pub mod error;
pub mod fixture;
pub mod keys;
pub mod limits;
pub mod policy;
pub mod principal;
pub mod state;
pub mod token;
pub mod validate;
pub mod version;

pub use error::{DomainError, StorageFault};
pub use mandate_proto::v1 as pb;
pub use principal::{AgentId, Principal, ServiceId, UserId};
