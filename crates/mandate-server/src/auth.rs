//! Operator authentication: `authorization: Bearer mdt_<id>.<secret>` checked against the token
//! record (SHA-256 of the secret) in replicated state. Apply re-checks the token of every
//! command, so a revocation committed first always wins.

use mandate_core::state::StateExt;
use mandate_core::token::OperatorSecret;
use mandate_core::{pb, DomainError};
use mandate_raft::{Node, ReadConsistency};
use sha2::{Digest, Sha256};
use tonic::metadata::MetadataMap;
use tonic::Status;

use crate::refusals::Refusals;
use crate::status;

/// The bearer token presented with a request, if any.
pub fn bearer(metadata: &MetadataMap) -> Result<OperatorSecret, Status> {
    let header = metadata.get("authorization").ok_or_else(|| {
        status::from_domain(&DomainError::unauthenticated(
            "an operator token is required (authorization: Bearer <token>)",
        ))
    })?;
    let value = header.to_str().map_err(|_| {
        status::from_domain(&DomainError::unauthenticated(
            "the authorization header is not text",
        ))
    })?;
    let token = value.strip_prefix("Bearer ").ok_or_else(|| {
        status::from_domain(&DomainError::unauthenticated(
            "the authorization header must be \"Bearer <token>\"",
        ))
    })?;
    OperatorSecret::parse(token.trim()).map_err(|e| status::from_domain(&e))
}

fn check(node: &Node, secret: &OperatorSecret) -> Result<Option<pb::OperatorToken>, Status> {
    let token = node
        .view
        .operator_token(&secret.id)
        .map_err(|e| status::from_fault(&e))?;
    let presented = Sha256::digest(secret.secret.as_bytes());
    Ok(token.filter(|t| t.revoked_ms == 0 && digests_match(&t.secret_sha256, &presented)))
}

/// Compares two digests in time independent of where they differ.
fn digests_match(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Authenticates the caller as an operator. A token unknown to this node may have been created
/// on another node moments ago, so the node catches up linearizably before refusing.
/// Every refusal of a presented token is queued for the audit trail.
pub async fn operator(
    node: &Node,
    refusals: &Refusals,
    metadata: &MetadataMap,
) -> Result<pb::OperatorToken, Status> {
    let secret = match bearer(metadata) {
        Ok(s) => s,
        Err(status) => {
            if metadata.get("authorization").is_some() {
                refusals.operator(None, status.message());
            }
            return Err(status);
        }
    };
    if let Some(token) = check(node, &secret)? {
        return Ok(token);
    }
    node.read_barrier(ReadConsistency::Linearizable, 0)
        .await
        .map_err(|e| status::from_node(&e))?;
    check(node, &secret)?.ok_or_else(|| {
        let reason = "the operator token is unknown, revoked or wrong";
        refusals.operator(Some(&secret.id), reason);
        status::from_domain(&DomainError::unauthenticated(reason))
    })
}
