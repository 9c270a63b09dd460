//! Apply versions: which rules `apply` follows, so that nodes of two releases apply one log
//! alike.
//!
//! Every node applies every log entry, and the state (and the audit trail beside it) must come
//! out the same on each. A release that changes what a command does to the state would, in a
//! cluster upgraded one node at a time, apply the same entry one way on the nodes it runs on
//! and the old way on the others. So each change of that kind gets an apply version, and apply
//! follows the rules of the version recorded in the cluster's state, not the newest its binary
//! knows. The leader raises the recorded version (`RaiseApplyVersion`) only when every member
//! has said it applies the new one; a node asked to apply a version above its own stops with a
//! fault rather than apply by rules it does not have.
//!
//! | version | since | what changed |
//! | --- | --- | --- |
//! | 1 | the first release | |
//! | 2 | 2026-12-08 | a grant's record is removed when its lifetime is over, however it ended |

use crate::error::{DomainError, StorageFault};
use crate::pb;
use crate::pb::event::Kind as EventKind;
use crate::state::{StateExt, StateRead};

/// The rules of a cluster bootstrapped before apply versions existed.
pub const APPLY_VERSION_FIRST: u32 = 1;
/// Grants are removed, record and index entry, once their lifetime is over, however they
/// ended; before it, ended grants stayed for ever and expired ones were marked `expired`.
pub const APPLY_VERSION_GRANTS_REMOVED: u32 = 2;
/// The newest apply version this binary applies.
pub const APPLY_VERSION_MAX: u32 = APPLY_VERSION_GRANTS_REMOVED;

/// The apply version a stored or proposed value stands for: 0 was written by a release before
/// versions and means the first.
pub fn effective(raw: u32) -> u32 {
    raw.max(APPLY_VERSION_FIRST)
}

/// The apply version the cluster's state records (the first, before bootstrap).
pub fn current(state: &(impl StateRead + ?Sized)) -> Result<u32, StorageFault> {
    Ok(effective(
        state
            .cluster()?
            .map_or(APPLY_VERSION_FIRST, |c| c.apply_version),
    ))
}

/// Stops apply when the state asks for rules this binary does not have: a node that is too old
/// for the cluster (a snapshot from an upgraded leader, or a log that raised the version) must
/// not go on applying by other rules than its peers.
pub fn check_supported(version: u32) -> Result<(), StorageFault> {
    if version > APPLY_VERSION_MAX {
        return Err(StorageFault(format!(
            "the cluster applies its log at apply version {version}, but this binary applies \
             versions up to {APPLY_VERSION_MAX}: upgrade this node's binary"
        )));
    }
    Ok(())
}

/// Decides a `RaiseApplyVersion`: refused unless it moves the version up.
pub fn raise(
    state: &(impl StateRead + ?Sized),
    c: &pb::RaiseApplyVersion,
) -> Result<Result<Vec<EventKind>, DomainError>, StorageFault> {
    check_supported(c.version)?;
    let Some(cluster) = state.cluster()? else {
        return Ok(Err(DomainError::precondition(
            "cluster",
            "is not bootstrapped yet",
        )));
    };
    let from = effective(cluster.apply_version);
    if c.version <= from {
        return Ok(Err(DomainError::precondition(
            "version",
            format!(
                "the cluster already applies version {from}; {} would not raise it",
                c.version
            ),
        )));
    }
    Ok(Ok(vec![EventKind::ApplyVersionRaised(
        pb::ApplyVersionRaised {
            from,
            to: c.version,
        },
    )]))
}

/// The version the leader may raise the cluster to, given what each member said it applies
/// (`None`: the cluster is already there, or some member applies nothing newer).
pub fn raise_to(current: u32, members_max: impl IntoIterator<Item = u32>) -> Option<u32> {
    let lowest = members_max
        .into_iter()
        .map(effective)
        .fold(APPLY_VERSION_MAX, u32::min);
    (lowest > current).then_some(lowest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_version_is_raised_only_as_far_as_the_oldest_member_applies() {
        assert_eq!(raise_to(1, [2, 2, 2]), Some(2));
        assert_eq!(raise_to(1, [2, 1, 2]), None);
        assert_eq!(
            raise_to(1, [2, 0]),
            None,
            "0 is a node from before versions"
        );
        assert_eq!(raise_to(2, [2, 2]), None, "already there");
        assert_eq!(
            raise_to(1, [APPLY_VERSION_MAX + 5]),
            Some(APPLY_VERSION_MAX),
            "never past what this binary applies"
        );
        assert_eq!(raise_to(1, []), Some(APPLY_VERSION_MAX), "a single member");
    }

    #[test]
    fn a_version_above_this_binary_is_a_fault_that_names_both_versions() {
        assert!(check_supported(APPLY_VERSION_MAX).is_ok());
        let fault = check_supported(APPLY_VERSION_MAX + 1).expect_err("too new");
        assert!(
            fault
                .0
                .contains(&format!("apply version {}", APPLY_VERSION_MAX + 1))
                && fault.0.contains(&format!("up to {APPLY_VERSION_MAX}")),
            "{}",
            fault.0
        );
    }
}
