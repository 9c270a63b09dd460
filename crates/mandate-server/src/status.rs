//! The one place where domain and cluster errors become gRPC statuses. A domain error carries
//! the offending field in the `mandate-field` metadata as well as in its message.

use mandate_core::error::ErrorKind;
use mandate_core::{pb, DomainError, StorageFault};
use mandate_raft::NodeError;
use tonic::{Code, Status};

/// Metadata key naming the field a refused request got wrong.
pub const FIELD_METADATA: &str = "mandate-field";

pub fn from_domain(e: &DomainError) -> Status {
    let code = match e.kind {
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::AlreadyExists => Code::AlreadyExists,
        ErrorKind::FailedPrecondition => Code::FailedPrecondition,
        ErrorKind::Unauthenticated => Code::Unauthenticated,
        ErrorKind::PermissionDenied => Code::PermissionDenied,
    };
    let mut status = Status::new(code, e.to_string());
    if let Ok(field) = e.field.parse() {
        status.metadata_mut().insert(FIELD_METADATA, field);
    }
    status
}

pub fn from_node(e: &NodeError) -> Status {
    match e {
        NodeError::Indeterminate(_) => Status::new(Code::Unknown, e.to_string()),
        NodeError::Membership(_) => Status::failed_precondition(e.to_string()),
        _ => Status::unavailable(e.to_string()),
    }
}

pub fn from_fault(e: &StorageFault) -> Status {
    tracing::error!(error = %e, "state storage fault");
    Status::internal(e.to_string())
}

/// The status for a command refused by apply.
pub fn from_command_error(e: &pb::CommandError) -> Status {
    from_domain(&DomainError::from(e))
}
