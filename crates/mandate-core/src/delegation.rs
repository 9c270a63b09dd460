//! The delegation algebra: resource patterns, coverage, and attenuation.
//!
//! A resource is a `/`-separated path (`secret/team-a/db-password`). A pattern is either an
//! exact path or a prefix ending in `/*`, which covers every path strictly below it
//! (`secret/team-a/*` covers `secret/team-a/db` and `secret/team-a/x/y`, not `secret/team-a`).
//! A re-delegation must be *attenuated*: narrower or equal to its parent in every dimension.

use std::collections::BTreeSet;

use crate::error::DomainError;
use crate::pb;

/// The actions Mandate knows; policies and delegations name only these.
pub const ACTIONS: &[&str] = &[
    "read", "write", "delete", "list", "create", "update", "call", "execute",
];
/// Longest resource path or pattern, in bytes.
pub const RESOURCE_BYTES_MAX: usize = 512;
/// Most resource patterns in one delegation.
pub const RESOURCES_PER_DELEGATION_MAX: usize = 32;
/// Longest purpose, in bytes.
pub const PURPOSE_BYTES_MAX: usize = 512;
/// Deepest chain: a user, then at most this many agents.
pub const CHAIN_AGENTS_MAX: usize = 8;

/// Checks an action name.
pub fn action(field: &str, action: &str) -> Result<(), DomainError> {
    if ACTIONS.contains(&action) {
        Ok(())
    } else {
        Err(DomainError::invalid(
            field,
            format!(
                "{action:?} is not an action; known actions are {}",
                ACTIONS.join(", ")
            ),
        ))
    }
}

fn check_segments(field: &str, path: &str) -> Result<(), DomainError> {
    if path.is_empty() {
        return Err(DomainError::invalid(field, "must not be empty"));
    }
    if path.len() > RESOURCE_BYTES_MAX {
        return Err(DomainError::invalid(
            field,
            format!(
                "is {} bytes; at most {RESOURCE_BYTES_MAX} allowed",
                path.len()
            ),
        ));
    }
    for segment in path.split('/') {
        if segment.is_empty() {
            return Err(DomainError::invalid(
                field,
                format!("{path:?} has an empty path segment"),
            ));
        }
        if let Some(c) = segment
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':' | '@')))
        {
            return Err(DomainError::invalid(
                field,
                format!(
                    "{path:?} contains {c:?}; path segments allow letters, digits and - _ . : @"
                ),
            ));
        }
    }
    Ok(())
}

/// Checks a concrete resource path.
pub fn resource(field: &str, path: &str) -> Result<(), DomainError> {
    check_segments(field, path)
}

/// Checks a resource pattern: an exact path or `prefix/*`.
pub fn pattern(field: &str, pattern: &str) -> Result<(), DomainError> {
    match pattern.strip_suffix("/*") {
        Some(prefix) => check_segments(field, prefix),
        None => check_segments(field, pattern),
    }
}

/// Does `pattern` cover the concrete `resource`?
pub fn matches(pattern: &str, resource: &str) -> bool {
    match pattern.strip_suffix("/*") {
        Some(prefix) => resource
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.starts_with('/') && rest.len() > 1),
        None => pattern == resource,
    }
}

/// Does the parent pattern cover everything the child pattern covers?
pub fn covers(parent: &str, child: &str) -> bool {
    match (parent.strip_suffix("/*"), child.strip_suffix("/*")) {
        (Some(p), Some(c)) => c == p || matches(parent, c),
        (Some(_), None) => matches(parent, child),
        (None, Some(_)) => false,
        (None, None) => parent == child,
    }
}

/// The bounds of a proposed delegation, as checked against its parent.
#[derive(Debug, Clone)]
pub struct Bounds<'a> {
    pub actions: &'a [String],
    pub resources: &'a [String],
    pub expires_ms: u64,
    pub max_uses: u64,
    pub may_redelegate: bool,
    pub max_depth: u32,
    pub approval_actions: &'a [String],
}

/// Checks that a re-delegation is attenuated: every action, resource, expiry, use count, depth
/// and approval requirement narrower than or equal to the parent's, given the parent's state.
pub fn attenuates(parent: &pb::Delegation, child: &Bounds<'_>) -> Result<(), DomainError> {
    if !parent.may_redelegate || parent.max_depth == 0 {
        return Err(DomainError::denied(
            "parent_id",
            format!("delegation {} may not be re-delegated", parent.id),
        ));
    }
    if child.max_depth > parent.max_depth - 1 {
        return Err(DomainError::denied(
            "max_depth",
            format!(
                "is {}; the parent allows at most {} more hops below this one",
                child.max_depth,
                parent.max_depth - 1
            ),
        ));
    }
    if let Some(a) = child.actions.iter().find(|a| !parent.actions.contains(a)) {
        return Err(DomainError::denied(
            "actions",
            format!("the parent does not include {a:?}"),
        ));
    }
    if let Some(r) = child
        .resources
        .iter()
        .find(|r| !parent.resources.iter().any(|p| covers(p, r)))
    {
        return Err(DomainError::denied(
            "resources",
            format!("the parent does not cover {r:?}"),
        ));
    }
    if child.expires_ms > parent.expires_ms {
        return Err(DomainError::denied(
            "ttl_seconds",
            "would outlive the parent delegation",
        ));
    }
    if parent.max_uses != 0 {
        let left = parent.max_uses.saturating_sub(parent.uses);
        if child.max_uses == 0 || child.max_uses > left {
            return Err(DomainError::denied(
                "max_uses",
                format!("the parent has {left} uses left; a re-delegation must set at most that"),
            ));
        }
    }
    let required: BTreeSet<&String> = parent
        .approval_actions
        .iter()
        .filter(|a| child.actions.contains(a))
        .collect();
    if let Some(a) = required
        .iter()
        .find(|a| !child.approval_actions.contains(a))
    {
        return Err(DomainError::denied(
            "approval_actions",
            format!("the parent requires live approval for {a:?}; so must the re-delegation"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_patterns_cover_descendants_but_not_themselves() {
        assert!(matches("secret/team-a/*", "secret/team-a/db"));
        assert!(matches("secret/team-a/*", "secret/team-a/x/y"));
        assert!(!matches("secret/team-a/*", "secret/team-a"));
        assert!(!matches("secret/team-a/*", "secret/team-ab/db"));
        assert!(matches("secret/x", "secret/x"));
        assert!(covers("secret/*", "secret/team-a/*"));
        assert!(covers("secret/team-a/*", "secret/team-a/*"));
        assert!(!covers("secret/team-a/*", "secret/*"));
        assert!(!covers("secret/team-a/db", "secret/team-a/*"));
    }

    #[test]
    fn malformed_patterns_name_the_problem() {
        assert!(pattern("resources[0]", "secret//x")
            .expect_err("empty")
            .message
            .contains("empty"));
        assert!(pattern("resources[0]", "secret/*/x").is_err());
        assert!(pattern("resources[0]", "secret/team-a/*").is_ok());
        assert!(action("action", "fly")
            .expect_err("unknown")
            .message
            .contains("read"));
    }
}
