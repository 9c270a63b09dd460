//! Checks over a history, once the cluster has healed. Each returns what it found wrong.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use mandate_client::Code;

use crate::history::{Operation, Outcome};
use crate::linearizability::{self, Call, Model, Verdict};
use crate::workload::{Delegation, Seen, ALLOW, INITIAL_DESCRIPTION};

/// Invariant 1: every acknowledged write of `kind` is present (its key is in `present`, read
/// from the healed cluster).
pub fn acknowledged_writes_are_present(
    history: &[Operation],
    kind: &str,
    present: &BTreeSet<String>,
) -> Result<usize, String> {
    all_present(history, kind, present, |o| Some(o.key.as_str()))
}

/// Invariant 1 for writes whose key the cluster chose: the value (the new object's id) of
/// every acknowledged operation of `kind` is in `present`.
pub fn acknowledged_ids_are_present(
    history: &[Operation],
    kind: &str,
    present: &BTreeSet<String>,
) -> Result<usize, String> {
    all_present(history, kind, present, |o| match &o.outcome {
        Outcome::Ok { value } => Some(value.as_str()),
        _ => None,
    })
}

/// Whether what `name` gives of every acknowledged operation of `kind` is in `present`;
/// how many there were.
fn all_present<'a>(
    history: &'a [Operation],
    kind: &str,
    present: &BTreeSet<String>,
    name: impl Fn(&'a Operation) -> Option<&'a str>,
) -> Result<usize, String> {
    let acknowledged: Vec<&str> = history
        .iter()
        .filter(|o| o.kind == kind && o.outcome.is_ok())
        .filter_map(name)
        .collect();
    let lost: Vec<&str> = acknowledged
        .iter()
        .copied()
        .filter(|n| !present.contains(*n))
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

/// Invariant (6): after `healed`, some write of `kind` is acknowledged within `limit`;
/// returns how long it took (from `healed` to the completion of the first write invoked at or
/// after it).
pub fn writes_resume_within(
    history: &[Operation],
    kind: &str,
    healed: Duration,
    limit: Duration,
) -> Result<Duration, String> {
    let first = history
        .iter()
        .filter(|o| o.kind == kind && o.invoked >= healed && o.outcome.is_ok())
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

/// Invariant (2): no single-use grant was consumed twice. Returns how many grants were
/// consumed (once).
pub fn no_grant_consumed_twice(history: &[Operation]) -> Result<usize, String> {
    let mut consumed: BTreeMap<&str, usize> = BTreeMap::new();
    for o in history
        .iter()
        .filter(|o| o.kind == "grant.consume" && o.outcome.is_ok())
    {
        *consumed.entry(o.key.as_str()).or_default() += 1;
    }
    let twice: Vec<_> = consumed.iter().filter(|(_, n)| **n > 1).collect();
    if twice.is_empty() {
        Ok(consumed.len())
    } else {
        Err(format!(
            "single-use grants consumed more than once: {twice:?}"
        ))
    }
}

/// Invariant (3): once the revocation of a delegation was acknowledged, no authorize under it
/// or under any delegation re-delegated from it was allowed, and no grant issued under them
/// was accepted, if invoked after that acknowledgement. Returns how many acknowledged
/// revocations were checked.
pub fn nothing_issued_or_accepted_after_revocation(
    history: &[Operation],
    delegations: &[Delegation],
) -> Result<usize, String> {
    // When each delegation was first covered by an acknowledged revocation.
    let mut revoked_at: HashMap<&str, Duration> = HashMap::new();
    let mut acknowledged = 0;
    for o in history
        .iter()
        .filter(|o| o.kind == "delegation.revoke" && o.outcome.is_ok())
    {
        acknowledged += 1;
        for d in delegations {
            if d.id == o.key || d.parent.as_deref() == Some(o.key.as_str()) {
                let at = revoked_at.entry(d.id.as_str()).or_insert(o.completed);
                *at = (*at).min(o.completed);
            }
        }
    }
    let mut late = Vec::new();
    for o in history.iter().filter(|o| o.outcome.is_ok()) {
        let delegation = match o.kind {
            "grant.authorize" => match &o.outcome {
                Outcome::Ok { value } if value.starts_with(ALLOW) => o.key.as_str(),
                _ => continue,
            },
            "grant.consume" => o.input.as_str(),
            _ => continue,
        };
        if let Some(at) = revoked_at.get(delegation) {
            if o.invoked > *at {
                late.push(format!(
                    "{} {} at {:?}, under {delegation} revoked at {at:?}",
                    o.kind, o.key, o.invoked
                ));
            }
        }
    }
    if late.is_empty() {
        Ok(acknowledged)
    } else {
        Err(format!(
            "{} grants issued or accepted after their revocation: {:?}",
            late.len(),
            &late[..late.len().min(10)]
        ))
    }
}

/// Invariant (4), across nodes: every node's trail (read up to one position) is the same,
/// in strictly increasing positions, each record chained to the one before it. Returns the
/// trail's length.
pub fn audit_trails_identical(trails: &[(usize, Vec<Seen>)]) -> Result<usize, String> {
    let Some((first_node, reference)) = trails.first() else {
        return Err("no audit trail was read".into());
    };
    for pair in reference.windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        if (b.log_index, b.sequence) <= (a.log_index, a.sequence) {
            return Err(format!(
                "node {first_node}: position {}.{} follows {}.{} (duplicate or out of order)",
                b.log_index, b.sequence, a.log_index, a.sequence
            ));
        }
        if b.prev_hash != a.hash {
            return Err(format!(
                "node {first_node}: record {}.{} does not chain to {}.{} (a gap)",
                b.log_index, b.sequence, a.log_index, a.sequence
            ));
        }
    }
    for (node, trail) in &trails[1..] {
        if trail != reference {
            let at = trail
                .iter()
                .zip(reference)
                .position(|(x, y)| x != y)
                .unwrap_or(trail.len().min(reference.len()));
            return Err(format!(
                "node {node}'s trail differs from node {first_node}'s at record {at} \
                 ({} and {} records)",
                trail.len(),
                reference.len()
            ));
        }
    }
    Ok(reference.len())
}

/// Invariant (4), for subscribers: what each saw is exactly the committed trail from its
/// start, with no gap, duplicate or reordering.
pub fn subscribers_saw_the_trail(
    trail: &[Seen],
    subscribers: &[(usize, Vec<Seen>)],
) -> Result<usize, String> {
    let mut total = 0;
    for (node, seen) in subscribers {
        if seen.is_empty() {
            return Err(format!("the subscriber on node {node} saw nothing"));
        }
        let start = trail.iter().position(|r| r == &seen[0]).ok_or_else(|| {
            format!("the subscriber on node {node} saw a record not in the trail")
        })?;
        let committed = &trail[start..];
        let n = seen.len().min(committed.len());
        if seen[..n] != committed[..n] {
            let at = seen
                .iter()
                .zip(committed)
                .position(|(a, b)| a != b)
                .unwrap_or(n);
            return Err(format!(
                "the subscriber on node {node} departs from the trail at its record {at}"
            ));
        }
        if seen.len() > committed.len() {
            return Err(format!(
                "the subscriber on node {node} saw {} records beyond the trail read",
                seen.len() - committed.len()
            ));
        }
        total += seen.len();
    }
    Ok(total)
}

/// The sequential specification of one registry record: absent, or present with a
/// description.
pub struct AgentRecord;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentOp {
    Create,
    Write(String),
    Read,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentAnswer {
    Created,
    AlreadyExists,
    Written,
    NotFound,
    Description(String),
}

impl Model for AgentRecord {
    type State = Option<String>;
    type Input = AgentOp;
    type Output = AgentAnswer;
    fn init(&self) -> Option<String> {
        None
    }
    fn step(&self, state: &Option<String>, input: &AgentOp) -> (Option<String>, AgentAnswer) {
        match (input, state) {
            (AgentOp::Create, None) => (Some(INITIAL_DESCRIPTION.into()), AgentAnswer::Created),
            (AgentOp::Create, Some(_)) => (state.clone(), AgentAnswer::AlreadyExists),
            (AgentOp::Write(v), Some(_)) => (Some(v.clone()), AgentAnswer::Written),
            (AgentOp::Write(_) | AgentOp::Read, None) => (None, AgentAnswer::NotFound),
            (AgentOp::Read, Some(v)) => (state.clone(), AgentAnswer::Description(v.clone())),
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Invariant (5): the registry's `agent.*` operations, per agent, are linearizable. Returns
/// how many operations were checked.
///
/// A write whose outcome is unknown and whose value no read returned is left out: placed
/// after every other operation it changes nothing anyone saw, so it can never be what makes
/// a history non-linearizable, and without it the search stays small.
pub fn registry_linearizable(history: &[Operation]) -> Result<usize, String> {
    let observed: BTreeSet<(&str, &str)> = history
        .iter()
        .filter(|o| o.kind == "agent.read")
        .filter_map(|o| match &o.outcome {
            Outcome::Ok { value } => Some((o.key.as_str(), value.as_str())),
            _ => None,
        })
        .collect();
    let mut calls: BTreeMap<String, Vec<Call<AgentOp, AgentAnswer>>> = BTreeMap::new();
    for o in history.iter().filter(|o| o.kind.starts_with("agent.")) {
        if o.kind == "agent.write"
            && matches!(o.outcome, Outcome::Unknown { .. })
            && !observed.contains(&(o.key.as_str(), o.input.as_str()))
        {
            continue;
        }
        let input = match o.kind {
            "agent.create" => AgentOp::Create,
            "agent.write" => AgentOp::Write(o.input.clone()),
            _ => AgentOp::Read,
        };
        let answer = match (&input, &o.outcome) {
            // No node took it: it did not happen.
            (
                _,
                Outcome::Failed {
                    code: Code::Unavailable,
                    ..
                },
            ) => continue,
            (_, Outcome::Unknown { .. }) => None,
            (AgentOp::Create, Outcome::Ok { .. }) => Some(AgentAnswer::Created),
            (AgentOp::Write(_), Outcome::Ok { .. }) => Some(AgentAnswer::Written),
            (AgentOp::Read, Outcome::Ok { value }) => Some(AgentAnswer::Description(value.clone())),
            (
                AgentOp::Create,
                Outcome::Failed {
                    code: Code::AlreadyExists,
                    ..
                },
            ) => Some(AgentAnswer::AlreadyExists),
            (
                _,
                Outcome::Failed {
                    code: Code::NotFound,
                    ..
                },
            ) => Some(AgentAnswer::NotFound),
            (_, Outcome::Failed { error, .. }) => {
                return Err(format!(
                    "{} of {} refused unexpectedly: {error}",
                    o.kind, o.key
                ));
            }
        };
        // A read with no answer tells nothing.
        if answer.is_none() && input == AgentOp::Read {
            continue;
        }
        calls.entry(o.key.clone()).or_default().push(Call {
            input,
            invoked: micros(o.invoked),
            completed: answer.map(|a| (micros(o.completed), a)),
        });
    }
    linearizability::check_partitioned(&AgentRecord, calls).map_err(
        |(key, verdict)| match verdict {
            Verdict::Violation { calls } => {
                format!("the registry history of {key} ({calls} operations) is not linearizable")
            }
            other => format!("the registry history of {key} could not be decided: {other:?}"),
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(
        kind: &'static str,
        input: &str,
        invoked: u64,
        completed: u64,
        outcome: Outcome,
    ) -> Operation {
        Operation {
            client: 0,
            kind,
            key: "a".into(),
            input: input.into(),
            node: String::new(),
            invoked: Duration::from_millis(invoked),
            completed: Duration::from_millis(completed),
            outcome,
        }
    }

    fn ok(value: &str) -> Outcome {
        Outcome::Ok {
            value: value.into(),
        }
    }

    fn unknown() -> Outcome {
        Outcome::Unknown {
            error: "connection lost".into(),
        }
    }

    #[test]
    fn many_unobserved_unknown_writes_do_not_stall_the_registry_check() {
        let mut history = vec![op("agent.create", "v0", 0, 1, ok("agt_1"))];
        for i in 0..200 {
            history.push(op("agent.write", &format!("w{i}"), 2, 2, unknown()));
        }
        history.push(op("agent.read", "", 10, 11, ok("v0")));
        assert_eq!(registry_linearizable(&history), Ok(2));
    }

    #[test]
    fn a_read_of_an_unknown_write_makes_it_count() {
        let history = vec![
            op("agent.create", "v0", 0, 1, ok("agt_1")),
            op("agent.write", "w1", 2, 3, unknown()),
            op("agent.read", "", 10, 11, ok("w1")),
            // Once w1 was seen, the older value may not come back.
            op("agent.read", "", 12, 13, ok("v0")),
        ];
        assert!(registry_linearizable(&history).is_err());
    }

    #[test]
    fn a_grant_consumed_twice_is_found() {
        let mut history = vec![
            op("grant.consume", "dlg_1", 0, 1, ok("")),
            op("grant.consume", "dlg_1", 0, 1, ok("")),
        ];
        assert!(no_grant_consumed_twice(&history).is_err());
        history.pop();
        assert_eq!(no_grant_consumed_twice(&history), Ok(1));
    }

    #[test]
    fn a_grant_accepted_after_its_revocation_was_acknowledged_is_found() {
        let delegations = vec![
            Delegation {
                id: "dlg_root".into(),
                parent: None,
                agent: 0,
            },
            Delegation {
                id: "dlg_sub".into(),
                parent: Some("dlg_root".into()),
                agent: 1,
            },
        ];
        let mut revoke = op("delegation.revoke", "", 0, 10, ok("dlg_root,dlg_sub"));
        revoke.key = "dlg_root".into();
        // Consumed under the re-delegation, invoked after the revocation returned.
        let mut consume = op("grant.consume", "dlg_sub", 11, 12, ok(""));
        consume.key = "grt_1".into();
        let history = vec![revoke.clone(), consume.clone()];
        assert!(nothing_issued_or_accepted_after_revocation(&history, &delegations).is_err());
        // Invoked before the revocation returned: concurrent, allowed.
        consume.invoked = Duration::from_millis(5);
        let history = vec![revoke, consume];
        assert_eq!(
            nothing_issued_or_accepted_after_revocation(&history, &delegations),
            Ok(1)
        );
    }
}
