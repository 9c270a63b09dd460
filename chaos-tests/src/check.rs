//! Checks over a history, once the cluster has healed. Each returns what it found wrong.

use std::collections::BTreeSet;
use std::time::Duration;

use crate::history::{Operation, Outcome};

/// Invariant 1: every acknowledged write of `kind` is present (its key is in `present`, read
/// from the healed cluster).
pub fn acknowledged_writes_are_present(
    history: &[Operation],
    kind: &str,
    present: &BTreeSet<String>,
) -> Result<usize, String> {
    let acknowledged: Vec<&Operation> = history
        .iter()
        .filter(|o| o.kind == kind && matches!(o.outcome, Outcome::Ok { .. }))
        .collect();
    let lost: Vec<&str> = acknowledged
        .iter()
        .filter(|o| !present.contains(&o.key))
        .map(|o| o.key.as_str())
        .collect();
    if lost.is_empty() {
        Ok(acknowledged.len())
    } else {
        Err(format!(
            "{} acknowledged {kind} writes are missing after healing: {:?}",
            lost.len(),
            &lost[..lost.len().min(10)]
        ))
    }
}

/// A refused write left nothing behind: no key of a `Failed` operation is present.
pub fn refused_writes_are_absent(
    history: &[Operation],
    kind: &str,
    present: &BTreeSet<String>,
) -> Result<(), String> {
    let phantom: Vec<&str> = history
        .iter()
        .filter(|o| o.kind == kind && matches!(o.outcome, Outcome::Failed { .. }))
        .filter(|o| present.contains(&o.key))
        .map(|o| o.key.as_str())
        .collect();
    if phantom.is_empty() {
        Ok(())
    } else {
        Err(format!("refused {kind} writes are present: {phantom:?}"))
    }
}

/// Invariant (6): after `healed`, some write is acknowledged within `limit`; returns how long
/// it took (from `healed` to the completion of the first write invoked at or after it).
pub fn writes_resume_within(
    history: &[Operation],
    healed: Duration,
    limit: Duration,
) -> Result<Duration, String> {
    let first = history
        .iter()
        .filter(|o| o.invoked >= healed && matches!(o.outcome, Outcome::Ok { .. }))
        .map(|o| o.completed)
        .min()
        .ok_or_else(|| "no write was acknowledged after healing".to_owned())?;
    let took = first.saturating_sub(healed);
    if took <= limit {
        Ok(took)
    } else {
        Err(format!(
            "the first write after healing took {took:?} (limit {limit:?})"
        ))
    }
}
