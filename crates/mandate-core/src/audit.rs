//! The audit trail: one record per command, built by apply from the command and its outcome,
//! stored by position in the same atomic batch as the state change, and hash-chained: every
//! record carries the SHA-256 of its predecessor and of itself (over its protobuf encoding with
//! `hash` empty, which prost makes canonical: fields in number order, maps as sorted maps).

use prost::Message;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::error::{DomainError, StorageFault};
use crate::pb::command::Kind as CommandKind;
use crate::pb::command_result::Outcome;
use crate::state::{decode, prefix_end, Overlay, StateExt, StateRead};
use crate::{authz, keys, pb};

/// The command's name, as the record's `type`.
pub fn type_name(kind: Option<&CommandKind>) -> &'static str {
    match kind {
        None => "unknown",
        Some(k) => match k {
            CommandKind::BootstrapCluster(_) => "bootstrap_cluster",
            CommandKind::CreateOperatorToken(_) => "create_operator_token",
            CommandKind::RevokeOperatorToken(_) => "revoke_operator_token",
            CommandKind::RegisterAgent(_) => "register_agent",
            CommandKind::UpdateAgent(_) => "update_agent",
            CommandKind::SetAgentStatus(_) => "set_agent_status",
            CommandKind::AddAgentKey(_) => "add_agent_key",
            CommandKind::RemoveAgentKey(_) => "remove_agent_key",
            CommandKind::PutIssuer(_) => "put_issuer",
            CommandKind::DeleteIssuer(_) => "delete_issuer",
            CommandKind::PutPolicy(_) => "put_policy",
            CommandKind::DeletePolicy(_) => "delete_policy",
            CommandKind::AddSigningKey(_) => "add_signing_key",
            CommandKind::CreateDelegation(_) => "create_delegation",
            CommandKind::RevokeDelegation(_) => "revoke_delegation",
            CommandKind::Authorize(_) => "authorize",
            CommandKind::DecideApproval(_) => "decide_approval",
            CommandKind::ConsumeGrant(_) => "consume_grant",
            CommandKind::EndGrant(_) => "end_grant",
            CommandKind::ExpireGrants(_) => "expire_grants",
            CommandKind::PutSecret(_) => "put_secret",
            CommandKind::CompactAudit(_) => "compact_audit",
            CommandKind::RecordRefusals(_) => "record_refusals",
            CommandKind::AuditCheckpoint(_) => "audit_checkpoint",
            CommandKind::RaiseApplyVersion(_) => "raise_apply_version",
        },
    }
}

/// A request context in the form its audit HMAC is taken over: `key=value` lines in key order,
/// each ended by a newline.
pub fn canonical_context(context: &std::collections::BTreeMap<String, String>) -> Vec<u8> {
    let mut text = Vec::new();
    for (k, v) in context {
        text.extend_from_slice(k.as_bytes());
        text.push(b'=');
        text.extend_from_slice(v.as_bytes());
        text.push(b'\n');
    }
    text
}

/// The hash of a record: SHA-256 of its encoding with `hash` empty.
pub fn hash(record: &pb::AuditRecord) -> Vec<u8> {
    let mut unhashed = record.clone();
    unhashed.hash.clear();
    Sha256::digest(unhashed.encode_to_vec()).to_vec()
}

/// Checks one record against its predecessor's hash; the error names what does not hold.
pub fn check(record: &pb::AuditRecord, prev_hash: Option<&[u8]>) -> Result<(), String> {
    if hash(record) != record.hash {
        return Err("the record does not match its hash".into());
    }
    match prev_hash {
        Some(prev) if prev != record.prev_hash.as_slice() => {
            Err("the record does not follow its predecessor (prev_hash differs)".into())
        }
        _ => Ok(()),
    }
}

fn actor(command: &pb::Command) -> (&'static str, String) {
    if let Some(CommandKind::BootstrapCluster(_)) = &command.kind {
        return ("operator", command.audit_actor.clone());
    }
    if matches!(
        command.kind,
        Some(
            CommandKind::ExpireGrants(_)
                | CommandKind::CompactAudit(_)
                | CommandKind::RecordRefusals(_)
                | CommandKind::AuditCheckpoint(_)
                | CommandKind::RaiseApplyVersion(_)
        )
    ) {
        return ("system", String::new());
    }
    if !command.operator_token_id.is_empty() {
        // Token ids are named by their HMAC only (stamped by the serving node).
        ("operator", command.audit_actor.clone())
    } else if !command.user.is_empty() {
        ("user", command.user.clone())
    } else if !command.agent.is_empty() {
        ("agent", command.agent.clone())
    } else {
        ("anonymous", String::new())
    }
}

/// What the command itself names, for refused commands and as a base for applied ones.
fn from_command(record: &mut pb::AuditRecord, command: &pb::Command) {
    match &command.kind {
        Some(CommandKind::RegisterAgent(c)) => {
            record.target = c.agent_id.clone();
        }
        Some(CommandKind::UpdateAgent(c)) => record.target = c.agent_id.clone(),
        Some(CommandKind::SetAgentStatus(c)) => record.target = c.agent_id.clone(),
        Some(CommandKind::AddAgentKey(c)) => record.target = c.agent_id.clone(),
        Some(CommandKind::RemoveAgentKey(c)) => record.target = c.agent_id.clone(),
        Some(CommandKind::CreateOperatorToken(_) | CommandKind::RevokeOperatorToken(_)) => {
            record.target = command.audit_target.clone()
        }
        Some(CommandKind::PutIssuer(c)) => {
            record.target = c
                .issuer
                .as_ref()
                .map(|i| i.name.clone())
                .unwrap_or_default()
        }
        Some(CommandKind::DeleteIssuer(c)) => record.target = c.name.clone(),
        Some(CommandKind::PutPolicy(c)) => record.target = c.name.clone(),
        Some(CommandKind::DeletePolicy(c)) => record.target = c.name.clone(),
        Some(CommandKind::AddSigningKey(c)) => {
            record.target = c.key.as_ref().map(|k| k.kid.clone()).unwrap_or_default()
        }
        Some(CommandKind::CreateDelegation(c)) => {
            record.target = c.delegation_id.clone();
            record.delegation_id = c.delegation_id.clone();
            record.agent = c.agent.clone();
            record.action = c.actions.join(" ");
            record.resource = c.resources.join(" ");
        }
        Some(CommandKind::RevokeDelegation(c)) => {
            record.target = c.delegation_id.clone();
            record.delegation_id = c.delegation_id.clone();
        }
        Some(CommandKind::Authorize(c)) => {
            record.delegation_id = c.delegation_id.clone();
            record.action = c.action.clone();
            record.resource = c.resource.clone();
            record.context_digest = command.audit_context.clone();
            record.agent = command.agent.clone();
        }
        Some(CommandKind::DecideApproval(c)) => record.target = c.approval_id.clone(),
        Some(CommandKind::ConsumeGrant(c)) => {
            record.grant_id = c.grant_id.clone();
            record.action = c.action.clone();
            record.resource = c.resource.clone();
        }
        Some(CommandKind::EndGrant(c)) => record.grant_id = c.grant_id.clone(),
        Some(CommandKind::PutSecret(c)) => record.resource = c.path.clone(),
        Some(CommandKind::BootstrapCluster(c)) => record.target = c.cluster_id.clone(),
        Some(CommandKind::CompactAudit(c)) => {
            record.target = format!("{}.{}", c.below_log_index, c.below_sequence)
        }
        Some(CommandKind::AuditCheckpoint(c)) => {
            record.target = format!("{}.{}", c.log_index, c.sequence);
            record.checkpoint = c.jws.clone();
        }
        Some(CommandKind::RaiseApplyVersion(c)) => record.target = c.version.to_string(),
        Some(CommandKind::ExpireGrants(_) | CommandKind::RecordRefusals(_)) | None => {}
    }
}

fn from_grant(record: &mut pb::AuditRecord, grant: &pb::Grant) {
    record.grant_id = grant.id.clone();
    record.agent = grant.agent.clone();
    record.user = grant.user.clone();
    record.chain = grant.chain.clone();
    record.delegation_id = grant.delegation_id.clone();
    record.action = grant.action.clone();
    record.resource = grant.resource.clone();
}

/// What applied: the decision, the records touched.
fn from_applied(record: &mut pb::AuditRecord, applied: &pb::CommandApplied) {
    if let Some(grant) = &applied.grant {
        from_grant(record, grant);
    }
    if let Some(d) = &applied.delegation {
        record.user = d.user.clone();
        record.agent = d.agent.clone();
        record.chain = d.chain.clone();
    }
    if let Some(a) = &applied.approval {
        record.target = a.id.clone();
        record.agent = a.agent.clone();
        record.user = a.user.clone();
        record.delegation_id = a.delegation_id.clone();
        record.action = a.action.clone();
        record.resource = a.resource.clone();
        record.decision = match pb::ApprovalStatus::try_from(a.status) {
            Ok(pb::ApprovalStatus::Approved) => pb::Decision::Allow as i32,
            Ok(pb::ApprovalStatus::Denied) => pb::Decision::Deny as i32,
            _ => pb::Decision::Pending as i32,
        };
    }
    if let Some(d) = &applied.decision {
        record.agent = d.agent.clone();
        record.user = d.user.clone();
        record.chain = d.chain.clone();
        record.delegation_id = d.delegation_id.clone();
        record.action = d.action.clone();
        record.resource = d.resource.clone();
        record.decision = d.decision;
        record.policy_ids = d.policy_ids.clone();
        record.reasons = d.reasons.clone();
        record.grant_id = d.grant.as_ref().map(|g| g.id.clone()).unwrap_or_default();
        if let Some(a) = &d.approval {
            record.target = a.id.clone();
        }
    }
    if let Some(p) = &applied.policy {
        record.target = p.name.clone();
    }
    if let Some(a) = &applied.agent {
        record.target = a.id.clone();
    }
}

/// Fills who a grant or delegation named by the record belongs to, from `state`, when the
/// outcome did not say (a refused consume or revocation is still attributed).
fn attribute(
    record: &mut pb::AuditRecord,
    state: &(impl StateRead + ?Sized),
) -> Result<(), StorageFault> {
    if !record.grant_id.is_empty() && record.agent.is_empty() {
        if let Some(grant) = authz::grant_record(state, &record.grant_id)? {
            from_grant(record, &grant);
        }
    }
    if !record.delegation_id.is_empty() && record.user.is_empty() {
        if let Some(d) = authz::delegation_record(state, &record.delegation_id)? {
            record.user = d.user;
            record.chain = d.chain;
            if record.agent.is_empty() {
                record.agent = d.agent;
            }
        }
    }
    Ok(())
}

/// The record of one command at `position`, before chaining; `state` is the state after it.
pub fn record(
    state: &(impl StateRead + ?Sized),
    command: &pb::Command,
    outcome: &Outcome,
    position: (u64, u32),
    time_ms: u64,
) -> Result<pb::AuditRecord, StorageFault> {
    let (actor_kind, actor) = actor(command);
    let mut record = pb::AuditRecord {
        log_index: position.0,
        sequence: position.1,
        time_ms,
        r#type: type_name(command.kind.as_ref()).to_owned(),
        node: command.serving_node,
        request_id: command.request_id.clone(),
        actor_kind: actor_kind.to_owned(),
        actor,
        user: command.user.clone(),
        ..Default::default()
    };
    from_command(&mut record, command);
    match outcome {
        Outcome::Applied(applied) => {
            from_applied(&mut record, applied);
            record.result = "ok".into();
        }
        Outcome::Error(e) => {
            record.result = pb::ErrorCode::try_from(e.code)
                .map(|c| {
                    c.as_str_name()
                        .trim_start_matches("ERROR_CODE_")
                        .to_lowercase()
                })
                .unwrap_or_else(|_| "error".into());
            record.error = if e.field.is_empty() {
                e.message.clone()
            } else {
                format!("{}: {}", e.field, e.message)
            };
        }
    }
    attribute(&mut record, state)?;
    if command.audit_hash_secret_paths {
        hide_secret_paths(&mut record, command);
    }
    Ok(record)
}

/// The resources a command names, in the order the serving node hashed them.
fn command_resources(command: &pb::Command) -> Vec<&str> {
    match &command.kind {
        Some(CommandKind::PutSecret(c)) => vec![c.path.as_str()],
        Some(CommandKind::Authorize(c)) => vec![c.resource.as_str()],
        Some(CommandKind::ConsumeGrant(c)) => vec![c.resource.as_str()],
        Some(CommandKind::CreateDelegation(c)) => c.resources.iter().map(String::as_str).collect(),
        _ => Vec::new(),
    }
}

/// Replaces every secret path in `text`: one the command named by its stamped HMAC name,
/// any other by `[secret path]`.
fn scrub(text: &str, known: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(SECRET_PREFIX) {
        out.push_str(&rest[..at]);
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| c.is_whitespace() || "\"',;)".contains(c))
            .unwrap_or(tail.len());
        let path = &tail[..end];
        match known.iter().find(|(plain, _)| *plain == path) {
            Some((_, hashed)) if !hashed.is_empty() => out.push_str(hashed),
            _ => out.push_str("[secret path]"),
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// With `audit_hash_secret_paths`, no secret path stays in the record: the resource becomes
/// the serving node's HMAC names, and reasons and errors are scrubbed.
fn hide_secret_paths(record: &mut pb::AuditRecord, command: &pb::Command) {
    let hashed: Vec<&str> = command.audit_resource.split(' ').collect();
    let known: Vec<(&str, &str)> = command_resources(command)
        .into_iter()
        .zip(hashed.iter().copied().chain(std::iter::repeat("")))
        .collect();
    if !command.audit_resource.is_empty() {
        record.resource = command.audit_resource.clone();
    } else {
        record.resource = scrub(&record.resource, &known);
    }
    for reason in &mut record.reasons {
        *reason = scrub(reason, &known);
    }
    record.error = scrub(&record.error, &known);
}

/// Resources under this prefix are secret paths (hashed when the serving node is told to).
pub const SECRET_PREFIX: &str = "secret/";

/// The records of a batch of refused authentications: one per refusal, and one counting the
/// refusals that were dropped before they could be recorded.
pub fn refusal_records(
    command: &pb::Command,
    batch: &pb::RecordRefusals,
    log_index: u64,
    time_ms: u64,
) -> Vec<pb::AuditRecord> {
    let base = pb::AuditRecord {
        log_index,
        time_ms,
        node: command.serving_node,
        request_id: command.request_id.clone(),
        result: "unauthenticated".into(),
        ..Default::default()
    };
    let mut records: Vec<pb::AuditRecord> = batch
        .refusals
        .iter()
        .map(|r| pb::AuditRecord {
            r#type: "authentication_refused".into(),
            actor_kind: r.kind.clone(),
            actor: r.subject.clone(),
            error: r.reason.clone(),
            ..base.clone()
        })
        .collect();
    if batch.dropped > 0 {
        records.push(pb::AuditRecord {
            r#type: "authentication_refusals_dropped".into(),
            actor_kind: "system".into(),
            target: batch.dropped.to_string(),
            error: format!(
                "{} refused authentications on node {} were not recorded (rate limit)",
                batch.dropped, command.serving_node
            ),
            ..base
        });
    }
    records
}

/// Records a raft membership change (its own log entry, with no command): which members vote
/// and which learn from then on. Operators change membership through the cluster service;
/// raft's entry does not carry who asked, so the record names no actor.
pub fn membership<S: StateRead + ?Sized>(
    state: &mut Overlay<'_, S>,
    log_index: u64,
    voters: &[u64],
    learners: &[u64],
) -> Result<(), StorageFault> {
    let list = |ids: &[u64]| ids.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    let record = pb::AuditRecord {
        log_index,
        sequence: 0,
        time_ms: state.clock_ms()?,
        r#type: "change_membership".into(),
        actor_kind: "system".into(),
        target: format!("voters={} learners={}", list(voters), list(learners)),
        result: "ok".into(),
        ..Default::default()
    };
    append(state, record)
}

/// The newest record's position and hash, if any record was written.
pub fn head(state: &(impl StateRead + ?Sized)) -> Result<Option<pb::AuditHead>, StorageFault> {
    state
        .get(keys::AUDIT_HEAD)?
        .map(|v| decode(keys::AUDIT_HEAD, &v))
        .transpose()
}

/// Chains `record` after the current head and stores it with the new head.
pub fn append<S: StateRead + ?Sized>(
    state: &mut Overlay<'_, S>,
    mut record: pb::AuditRecord,
) -> Result<(), StorageFault> {
    let head = head(state)?.unwrap_or_default();
    record.prev_hash = head.hash;
    record.hash = hash(&record);
    state.put_message(
        keys::AUDIT_HEAD.to_vec(),
        &pb::AuditHead {
            log_index: record.log_index,
            sequence: record.sequence,
            hash: record.hash.clone(),
            records: head.records + 1,
        },
    );
    state.put_message(keys::audit(record.log_index, record.sequence), &record);
    Ok(())
}

/// Records a checkpoint when it vouches for a stored record with the hash it names; the
/// signature is for auditors to check against the cluster JWKS (`mandate audit verify`).
pub fn checkpoint<S: StateRead + ?Sized>(
    state: &mut Overlay<'_, S>,
    c: &pb::AuditCheckpoint,
) -> Result<Result<(), DomainError>, StorageFault> {
    let key = keys::audit(c.log_index, c.sequence);
    let stored: Option<pb::AuditRecord> = state.get(&key)?.map(|v| decode(&key, &v)).transpose()?;
    match stored {
        Some(r) if r.hash == c.hash && !c.jws.is_empty() => {
            state.put_message(
                keys::AUDIT_CHECKPOINT.to_vec(),
                &pb::AuditPosition {
                    log_index: c.log_index,
                    sequence: c.sequence,
                },
            );
            Ok(Ok(()))
        }
        Some(_) => Ok(Err(DomainError::invalid(
            "hash",
            "does not match the record the checkpoint names",
        ))),
        None => Ok(Err(DomainError::not_found(
            "position",
            format!("no audit record at {}.{}", c.log_index, c.sequence),
        ))),
    }
}

/// The position the last checkpoint vouched for.
pub fn last_checkpoint(
    state: &(impl StateRead + ?Sized),
) -> Result<Option<pb::AuditPosition>, StorageFault> {
    state
        .get(keys::AUDIT_CHECKPOINT)?
        .map(|v| decode(keys::AUDIT_CHECKPOINT, &v))
        .transpose()
}

/// Most records one compaction command drops.
pub const COMPACT_RECORDS_MAX: usize = 10_000;

/// Where the retained trail begins, if it was ever compacted.
pub fn base(state: &(impl StateRead + ?Sized)) -> Result<Option<pb::AuditBase>, StorageFault> {
    state
        .get(keys::AUDIT_BASE)?
        .map(|v| decode(keys::AUDIT_BASE, &v))
        .transpose()
}

/// How many records are retained.
pub fn retained(state: &(impl StateRead + ?Sized)) -> Result<u64, StorageFault> {
    let appended = head(state)?.map_or(0, |h| h.records);
    let removed = base(state)?.map_or(0, |b| b.removed);
    Ok(appended.saturating_sub(removed))
}

/// Drops the records before `below` (at most [`COMPACT_RECORDS_MAX`], oldest first) and moves
/// the base to the oldest record left; returns how many were dropped. The newest record is
/// never dropped, so the head always has a record to chain from.
pub fn compact<S: StateRead + ?Sized>(
    state: &mut Overlay<'_, S>,
    below: (u64, u32),
) -> Result<u64, StorageFault> {
    // The scan starts at the oldest record kept, past the tombstones of those dropped before.
    let from = base(state)?.map_or_else(
        || keys::AUDIT_PREFIX.to_vec(),
        |b| keys::audit(b.log_index, b.sequence),
    );
    let candidates = state.scan_range_first(
        &from,
        prefix_end(keys::AUDIT_PREFIX).as_deref(),
        COMPACT_RECORDS_MAX + 1,
    )?;
    let limit = keys::audit(below.0, below.1);
    let newest = head(state)?.map(|h| keys::audit(h.log_index, h.sequence));
    let mut dropped = 0u64;
    let mut last_hash = None;
    for (key, value) in candidates.iter().take(COMPACT_RECORDS_MAX) {
        if *key >= limit || Some(key) == newest.as_ref() {
            break;
        }
        let record: pb::AuditRecord = decode(key, value)?;
        state.delete(key.clone());
        last_hash = Some(record.hash);
        dropped += 1;
    }
    let Some(prev_hash) = last_hash else {
        return Ok(0);
    };
    let (key, value) = candidates
        .get(dropped as usize)
        .ok_or_else(|| StorageFault("compaction left no audit record".into()))?;
    let oldest: pb::AuditRecord = decode(key, value)?;
    let removed = base(state)?.map_or(0, |b| b.removed) + dropped;
    state.put_message(
        keys::AUDIT_BASE.to_vec(),
        &pb::AuditBase {
            log_index: oldest.log_index,
            sequence: oldest.sequence,
            prev_hash,
            removed,
        },
    );
    Ok(dropped)
}

/// The name of a decision, as records print it.
pub fn decision_name(d: i32) -> &'static str {
    match pb::Decision::try_from(d) {
        Ok(pb::Decision::Allow) => "allow",
        Ok(pb::Decision::Deny) => "deny",
        Ok(pb::Decision::Pending) => "pending",
        _ => "",
    }
}

/// A record as the JSON object `audit tail --json`, exports and sinks write.
pub fn to_json(r: &pb::AuditRecord) -> Value {
    json!({
        "position": format!("{}.{}", r.log_index, r.sequence),
        "log_index": r.log_index,
        "sequence": r.sequence,
        "time_ms": r.time_ms,
        "type": r.r#type,
        "node": r.node,
        "request_id": r.request_id,
        "actor_kind": r.actor_kind,
        "actor": r.actor,
        "agent": r.agent,
        "user": r.user,
        "chain": r.chain,
        "delegation_id": r.delegation_id,
        "action": r.action,
        "resource": r.resource,
        "context_digest": hex::encode(&r.context_digest),
        "decision": decision_name(r.decision),
        "policy_ids": r.policy_ids,
        "reasons": r.reasons,
        "grant_id": r.grant_id,
        "target": r.target,
        "result": r.result,
        "error": r.error,
        "checkpoint": r.checkpoint,
        "prev_hash": hex::encode(&r.prev_hash),
        "hash": hex::encode(&r.hash),
    })
}

/// Whether `record` passes a subscription's filters.
pub fn matches(record: &pb::AuditRecord, filter: &pb::SubscribeRequest) -> bool {
    (filter.types.is_empty() || filter.types.contains(&record.r#type))
        && (filter.agent.is_empty()
            || filter.agent == record.agent
            || record.chain.contains(&filter.agent))
        && (filter.user.is_empty() || filter.user == record.user)
        && (filter.decision == 0 || filter.decision == record.decision)
        && (filter.resource_prefix.is_empty()
            || record.resource.starts_with(&filter.resource_prefix))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn applied(n: u64) -> pb::AuditRecord {
        let empty: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        record(
            &empty,
            &pb::Command {
                operator_token_id: "tok_1".into(),
                kind: Some(CommandKind::RegisterAgent(pb::RegisterAgent {
                    agent_id: format!("agt_{n}"),
                    ..Default::default()
                })),
                ..Default::default()
            },
            &Outcome::Applied(pb::CommandApplied::default()),
            (n, 0),
            n * 10,
        )
        .expect("record")
    }

    #[test]
    fn appended_records_chain_and_any_edit_breaks_the_chain() {
        let base: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        let mut state = Overlay::new(&base);
        for n in 1..=3 {
            append(&mut state, applied(n)).expect("append");
        }
        let records: Vec<pb::AuditRecord> = state
            .scan_prefix(keys::AUDIT_PREFIX)
            .expect("scan")
            .iter()
            .map(|(k, v)| decode(k, v).expect("record"))
            .collect();
        assert_eq!(records.len(), 3);
        let mut prev: Option<Vec<u8>> = None;
        for r in &records {
            check(r, prev.as_deref()).expect("chain verifies");
            prev = Some(r.hash.clone());
        }
        assert_eq!(head(&state).expect("head").expect("some").records, 3);

        let mut edited = records[1].clone();
        edited.actor = "tok_other".into();
        assert!(check(&edited, Some(&records[0].hash)).is_err());
        let mut rehashed = edited.clone();
        rehashed.hash = hash(&rehashed);
        check(&rehashed, Some(&records[0].hash)).expect("a rehashed record checks alone");
        assert!(
            check(&records[2], Some(&rehashed.hash)).is_err(),
            "the successor no longer follows a rehashed record"
        );
    }

    #[test]
    fn compaction_keeps_the_chain_verifiable_from_the_oldest_retained_record() {
        let base_state: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        let mut state = Overlay::new(&base_state);
        for n in 1..=6 {
            append(&mut state, applied(n)).expect("append");
        }
        assert_eq!(compact(&mut state, (4, 0)).expect("compact"), 3);
        assert_eq!(retained(&state).expect("retained"), 3);
        let kept: Vec<pb::AuditRecord> = state
            .scan_prefix(keys::AUDIT_PREFIX)
            .expect("scan")
            .iter()
            .map(|(k, v)| decode(k, v).expect("record"))
            .collect();
        assert_eq!(kept[0].log_index, 4);
        let base = base(&state).expect("base").expect("set");
        assert_eq!((base.log_index, base.removed), (4, 3));
        let mut prev = Some(base.prev_hash);
        for r in &kept {
            check(r, prev.as_deref()).expect("verifies from the base");
            prev = Some(r.hash.clone());
        }
        // The newest record is never dropped, whatever the bound.
        assert_eq!(compact(&mut state, (99, 0)).expect("compact"), 2);
        assert_eq!(retained(&state).expect("retained"), 1);
    }

    #[test]
    fn scrubbing_replaces_every_secret_path_and_nothing_else() {
        let known = [("secret/a/db", "hmac:00ff")];
        assert_eq!(
            scrub(
                "delegation d covers read on secret/a/db; not \"secret/b/*\", see public/x",
                &known
            ),
            "delegation d covers read on hmac:00ff; not \"[secret path]\", see public/x"
        );
        assert_eq!(scrub("no paths here", &known), "no paths here");
    }

    #[test]
    fn a_refused_command_is_recorded_with_its_error_code() {
        let empty: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        let r = record(
            &empty,
            &pb::Command {
                user: "alice".into(),
                audit_context: vec![7; 32],
                kind: Some(CommandKind::Authorize(pb::Authorize {
                    delegation_id: "dlg_1".into(),
                    action: "read".into(),
                    resource: "secret/x".into(),
                    request_context: BTreeMap::from([("ticket".into(), "1".into())]),
                    ..Default::default()
                })),
                ..Default::default()
            },
            &Outcome::Error(pb::CommandError {
                code: pb::ErrorCode::PermissionDenied as i32,
                field: "delegation_id".into(),
                message: "no".into(),
            }),
            (7, 2),
            70,
        )
        .expect("record");
        assert_eq!(r.result, "permission_denied");
        assert_eq!(r.error, "delegation_id: no");
        assert_eq!((r.actor_kind.as_str(), r.actor.as_str()), ("user", "alice"));
        assert_eq!(r.resource, "secret/x");
        assert_eq!(
            r.context_digest,
            vec![7; 32],
            "the serving node's HMAC, as stamped"
        );
    }
}
