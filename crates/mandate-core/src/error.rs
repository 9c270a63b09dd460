//! The two ways apply can fail: a deterministic refusal of one command ([`DomainError`], the same
//! on every node, recorded as that command's result) or a storage fault (the node must stop).

use crate::pb;

/// What kind of refusal a [`DomainError`] is; maps one-to-one onto gRPC status codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidArgument,
    NotFound,
    AlreadyExists,
    FailedPrecondition,
    Unauthenticated,
    PermissionDenied,
}

/// A command refused by the domain, naming the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct DomainError {
    pub kind: ErrorKind,
    pub field: String,
    pub message: String,
}

impl DomainError {
    pub fn new(kind: ErrorKind, field: &str, message: impl Into<String>) -> Self {
        DomainError {
            kind,
            field: field.to_owned(),
            message: message.into(),
        }
    }
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::InvalidArgument, field, message)
    }
    pub fn not_found(field: &str, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, field, message)
    }
    pub fn exists(field: &str, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::AlreadyExists, field, message)
    }
    pub fn precondition(field: &str, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::FailedPrecondition, field, message)
    }
    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unauthenticated, "token", message)
    }
    pub fn denied(field: &str, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::PermissionDenied, field, message)
    }
}

impl From<&DomainError> for pb::CommandError {
    fn from(e: &DomainError) -> Self {
        let code = match e.kind {
            ErrorKind::InvalidArgument => pb::ErrorCode::InvalidArgument,
            ErrorKind::NotFound => pb::ErrorCode::NotFound,
            ErrorKind::AlreadyExists => pb::ErrorCode::AlreadyExists,
            ErrorKind::FailedPrecondition => pb::ErrorCode::FailedPrecondition,
            ErrorKind::Unauthenticated => pb::ErrorCode::Unauthenticated,
            ErrorKind::PermissionDenied => pb::ErrorCode::PermissionDenied,
        };
        pb::CommandError {
            code: code as i32,
            field: e.field.clone(),
            message: e.message.clone(),
        }
    }
}

impl From<&pb::CommandError> for DomainError {
    fn from(e: &pb::CommandError) -> Self {
        let kind = match pb::ErrorCode::try_from(e.code) {
            Ok(pb::ErrorCode::NotFound) => ErrorKind::NotFound,
            Ok(pb::ErrorCode::AlreadyExists) => ErrorKind::AlreadyExists,
            Ok(pb::ErrorCode::FailedPrecondition) => ErrorKind::FailedPrecondition,
            Ok(pb::ErrorCode::Unauthenticated) => ErrorKind::Unauthenticated,
            Ok(pb::ErrorCode::PermissionDenied) => ErrorKind::PermissionDenied,
            _ => ErrorKind::InvalidArgument,
        };
        DomainError {
            kind,
            field: e.field.clone(),
            message: e.message.clone(),
        }
    }
}

/// The state could not be read or decoded. Apply stops; the node must not guess.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("state machine storage fault: {0}")]
pub struct StorageFault(pub String);
