//! `apply`: commands become events, events become state.
//!
//! [`apply_batch`] runs the commands of one log entry in order. For each command,
//! [`decide`] reads the state and returns the events it causes or a [`DomainError`]; it writes
//! nothing, so a refused command leaves no trace but its result and its audit record.
//! [`materialize`] then folds each event into the state. The state is a pure function of the
//! event sequence: [`replay_event`] rebuilds it from the events each result carries (the log
//! itself is the durable history, so events are not stored a second time). The audit trail
//! (one record per command, applied or refused, see [`crate::audit`]) is written beside it and
//! is the one part that events do not rebuild.

use crate::audit;
use crate::authz::{self, Actor};
use crate::error::{DomainError, StorageFault};
use crate::pb::command::Kind as CommandKind;
use crate::pb::event::Kind as EventKind;
use crate::policy::Engine;
use crate::principal::AgentId;
use crate::state::{Overlay, StateExt, StateRead};
use crate::{keys, limits, pb, validate, version};

type Decision = Result<Vec<EventKind>, DomainError>;

/// Applies the commands of the log entry at `log_index` on top of `state`, returning one result
/// per command. Errors are storage faults only: domain refusals are results.
pub fn apply_batch<S: StateRead + ?Sized>(
    state: &mut Overlay<'_, S>,
    engine: &mut Engine,
    batch: &pb::CommandBatch,
    log_index: u64,
) -> Result<Vec<pb::CommandResult>, StorageFault> {
    // A node too old for the rules the cluster applies by stops here, before it writes anything.
    version::check_supported(version::current(state)?)?;
    // Audit records are numbered within the entry; most commands write exactly one.
    let mut record_sequence: u32 = 0;
    let mut results = Vec::with_capacity(batch.commands.len());
    for command in &batch.commands {
        let time_ms = command.time_ms.max(state.clock_ms()?);
        if let Some(CommandKind::RecordRefusals(r)) = &command.kind {
            // Refusals write the trail only: one record each.
            for mut record in audit::refusal_records(command, r, log_index, time_ms) {
                record.sequence = record_sequence;
                record_sequence += 1;
                audit::append(state, record)?;
            }
            results.push(pb::CommandResult {
                log_index,
                outcome: Some(pb::command_result::Outcome::Applied(
                    pb::CommandApplied::default(),
                )),
            });
            continue;
        }
        let outcome = if let Some(CommandKind::CompactAudit(c)) = &command.kind {
            // Leader housekeeping that only touches the trail (which events do not rebuild).
            audit::compact(state, (c.below_log_index, c.below_sequence))?;
            pb::command_result::Outcome::Applied(pb::CommandApplied::default())
        } else if let Some(CommandKind::AuditCheckpoint(c)) = &command.kind {
            match audit::checkpoint(state, c)? {
                Ok(()) => pb::command_result::Outcome::Applied(pb::CommandApplied::default()),
                Err(e) => pb::command_result::Outcome::Error((&e).into()),
            }
        } else {
            match decide(state, engine, command, time_ms)? {
                Err(error) => pb::command_result::Outcome::Error((&error).into()),
                Ok(kinds) => {
                    let mut events = Vec::with_capacity(kinds.len());
                    for kind in kinds {
                        replay_event(state, &kind, time_ms)?;
                        events.push(pb::Event { kind: Some(kind) });
                    }
                    let mut applied = summarize(state, command, events)?;
                    applied.time_ms = time_ms;
                    pb::command_result::Outcome::Applied(applied)
                }
            }
        };
        let record = audit::record(
            state,
            command,
            &outcome,
            (log_index, record_sequence),
            time_ms,
        )?;
        record_sequence += 1;
        audit::append(state, record)?;
        results.push(pb::CommandResult {
            log_index,
            outcome: Some(outcome),
        });
    }
    Ok(results)
}

/// Folds one event, caused by a command of effective time `time_ms`, into the state and
/// advances the command clock. Replaying the events of every applied command (each result
/// carries them and the time) yields exactly the state apply produced, audit trail aside.
pub fn replay_event<S: StateRead + ?Sized>(
    state: &mut Overlay<'_, S>,
    kind: &EventKind,
    time_ms: u64,
) -> Result<(), StorageFault> {
    materialize(state, kind, time_ms)?;
    if time_ms > state.clock_ms()? {
        state.put(keys::CLOCK.to_vec(), time_ms.to_be_bytes().to_vec());
    }
    Ok(())
}

/// What the caller of a command gets back: its events and the records it touched.
fn summarize(
    state: &(impl StateRead + ?Sized),
    command: &pb::Command,
    events: Vec<pb::Event>,
) -> Result<pb::CommandApplied, StorageFault> {
    let mut applied = pb::CommandApplied {
        agent: match target_agent(command) {
            Some(id) => state.agent(id)?,
            None => None,
        },
        ..Default::default()
    };
    match command.kind.as_ref() {
        Some(CommandKind::CreateDelegation(c)) => {
            applied.delegation = authz::delegation_record(state, &c.delegation_id)?;
        }
        Some(CommandKind::ConsumeGrant(c)) => {
            applied.grant = authz::grant_record(state, &c.grant_id)?
        }
        Some(CommandKind::EndGrant(c)) => applied.grant = authz::grant_record(state, &c.grant_id)?,
        Some(CommandKind::DecideApproval(c)) => {
            applied.approval = authz::approval_record(state, &c.approval_id)?;
            if let Some(a) = &applied.approval {
                applied.grant = authz::grant_record(state, &a.grant_id)?;
            }
        }
        _ => {}
    }
    for event in &events {
        match event.kind.as_ref() {
            Some(EventKind::AuthorizationDecided(d)) => {
                applied.grant.clone_from(&d.grant);
                applied.approval.clone_from(&d.approval);
                applied.decision = Some(d.clone());
            }
            Some(EventKind::PolicyPut(p)) => applied.policy.clone_from(&p.document),
            Some(EventKind::SecretWritten(w)) => applied.secret_version = w.version,
            _ => {}
        }
    }
    applied.events = events;
    Ok(applied)
}

fn target_agent(command: &pb::Command) -> Option<&str> {
    match command.kind.as_ref()? {
        CommandKind::RegisterAgent(c) => Some(&c.agent_id),
        CommandKind::UpdateAgent(c) => Some(&c.agent_id),
        CommandKind::SetAgentStatus(c) => Some(&c.agent_id),
        CommandKind::AddAgentKey(c) => Some(&c.agent_id),
        CommandKind::RemoveAgentKey(c) => Some(&c.agent_id),
        _ => None,
    }
}

/// Decides what a command does, reading but never writing the state.
pub fn decide(
    state: &(impl StateRead + ?Sized),
    engine: &mut Engine,
    command: &pb::Command,
    time_ms: u64,
) -> Result<Decision, StorageFault> {
    let Some(kind) = command.kind.as_ref() else {
        return Ok(Err(DomainError::invalid("command", "carries no operation")));
    };
    if let CommandKind::BootstrapCluster(c) = kind {
        return bootstrap(state, c, time_ms);
    }
    let principal = if command.operator_token_id.is_empty() {
        authz::actor(state, command)?
    } else {
        authenticate(state, &command.operator_token_id)?.map(Actor::Operator)
    };
    let principal = match principal {
        Ok(p) => p,
        Err(e) => return Ok(Err(e)),
    };
    if let (Actor::Agent(agent), false) = (&principal, matches!(kind, CommandKind::Authorize(_))) {
        // Every agent command spends its assertion's jti; authorizations record theirs in
        // their own decision event.
        if command.assertion_jti.is_empty()
            || state
                .get(&keys::jti(&agent.id, &command.assertion_jti))?
                .is_some()
        {
            return Ok(Err(DomainError::unauthenticated(
                "the client assertion's jti is missing or was already used (replay)",
            )));
        }
        let decided = decide_for(state, engine, kind, principal, time_ms)?;
        return Ok(decided.map(|mut events| {
            events.push(EventKind::AssertionUsed(pb::AssertionUsed {
                agent: command.agent.clone(),
                jti: command.assertion_jti.clone(),
                expires_ms: command.assertion_expires_ms,
            }));
            events
        }));
    }
    decide_for(state, engine, kind, principal, time_ms)
}

/// Dispatches a command whose principal is established.
fn decide_for(
    state: &(impl StateRead + ?Sized),
    engine: &mut Engine,
    kind: &CommandKind,
    principal: Actor,
    time_ms: u64,
) -> Result<Decision, StorageFault> {
    match kind {
        CommandKind::PutIssuer(c) => return Ok(authz::put_issuer(&principal, c)),
        CommandKind::DeleteIssuer(c) => return authz::delete_issuer(state, &principal, c),
        CommandKind::PutPolicy(c) => return authz::put_policy(state, &principal, c, time_ms),
        CommandKind::DeletePolicy(c) => return authz::delete_policy(state, &principal, c),
        CommandKind::AddSigningKey(c) => {
            return authz::add_signing_key(state, &principal, c, time_ms)
        }
        CommandKind::CreateDelegation(c) => {
            return authz::create_delegation(state, engine, &principal, c, time_ms)
        }
        CommandKind::RevokeDelegation(c) => {
            return authz::revoke_delegation(state, &principal, c, time_ms)
        }
        CommandKind::Authorize(c) => {
            let Actor::Agent(agent) = &principal else {
                return Ok(Err(DomainError::unauthenticated(
                    "authorization needs an agent assertion",
                )));
            };
            return authz::authorize(state, engine, agent, c, time_ms);
        }
        CommandKind::DecideApproval(c) => {
            return authz::decide_approval(state, engine, &principal, c, time_ms)
        }
        CommandKind::ConsumeGrant(c) => return authz::consume_grant(state, c, time_ms),
        CommandKind::EndGrant(c) => return authz::end_grant(state, &principal, c, time_ms),
        CommandKind::ExpireGrants(_) => return authz::expire(state, time_ms),
        CommandKind::RaiseApplyVersion(c) => return version::raise(state, c),
        CommandKind::CompactAudit(_)
        | CommandKind::RecordRefusals(_)
        | CommandKind::AuditCheckpoint(_) => {
            return Ok(Err(DomainError::invalid(
                "command",
                "this command writes the audit trail only and is applied by apply_batch",
            )))
        }
        CommandKind::PutSecret(c) => {
            return authz::put_secret(state, engine, &principal, c, time_ms)
        }
        _ => {}
    }
    let Actor::Operator(actor) = principal else {
        return Ok(Err(DomainError::unauthenticated(
            "an operator token is required",
        )));
    };
    match kind {
        CommandKind::CreateOperatorToken(c) => create_token(state, &actor, c, time_ms),
        CommandKind::RevokeOperatorToken(c) => revoke_token(state, &actor, c, time_ms),
        CommandKind::RegisterAgent(c) => register_agent(state, c, time_ms),
        CommandKind::UpdateAgent(c) => update_agent(state, c, time_ms),
        CommandKind::SetAgentStatus(c) => set_agent_status(state, c, time_ms),
        CommandKind::AddAgentKey(c) => add_agent_key(state, c, time_ms),
        CommandKind::RemoveAgentKey(c) => remove_agent_key(state, c, time_ms),
        _ => unreachable!("every other command was dispatched above"),
    }
}

/// The token behind a command must exist and be unrevoked when the command is applied, so a
/// revocation committed earlier in the log always wins.
fn authenticate(
    state: &(impl StateRead + ?Sized),
    token_id: &str,
) -> Result<Result<pb::OperatorToken, DomainError>, StorageFault> {
    if token_id.is_empty() {
        return Ok(Err(DomainError::unauthenticated(
            "an operator token is required",
        )));
    }
    Ok(match state.operator_token(token_id)? {
        Some(token) if token.revoked_ms == 0 => Ok(token),
        Some(_) => Err(DomainError::unauthenticated(
            "the operator token has been revoked",
        )),
        None => Err(DomainError::unauthenticated("unknown operator token")),
    })
}

fn bootstrap(
    state: &(impl StateRead + ?Sized),
    c: &pb::BootstrapCluster,
    time_ms: u64,
) -> Result<Decision, StorageFault> {
    if state.cluster()?.is_some() {
        return Ok(Err(DomainError::precondition(
            "cluster",
            "is already bootstrapped; its root token was shown once when it was",
        )));
    }
    if c.root_token_id.is_empty() || c.root_secret_sha256.len() != 32 || c.cluster_id.is_empty() {
        return Ok(Err(DomainError::invalid(
            "bootstrap_cluster",
            "needs a cluster id, a root token id and a 32-byte secret hash",
        )));
    }
    let apply_version = version::effective(c.apply_version);
    version::check_supported(apply_version)?;
    let cluster = pb::ClusterInfo {
        cluster_id: c.cluster_id.clone(),
        bootstrapped_ms: time_ms,
        root_token_id: c.root_token_id.clone(),
        apply_version,
    };
    let root_token = pb::OperatorToken {
        id: c.root_token_id.clone(),
        name: "root".into(),
        secret_sha256: c.root_secret_sha256.clone(),
        root: true,
        created_ms: time_ms,
        created_by: String::new(),
        revoked_ms: 0,
    };
    let mut events = vec![EventKind::ClusterBootstrapped(pb::ClusterBootstrapped {
        cluster: Some(cluster),
        root_token: Some(root_token),
    })];
    if let Some(key) = &c.signing_key {
        if let Err(e) = validate::signing_key(key) {
            return Ok(Err(e));
        }
        events.push(EventKind::SigningKeyAdded(pb::SigningKeyAdded {
            key: Some(pb::SigningKey {
                created_ms: time_ms,
                active: true,
                ..key.clone()
            }),
        }));
    }
    Ok(Ok(events))
}

fn require_root(actor: &pb::OperatorToken) -> Result<(), DomainError> {
    if actor.root {
        Ok(())
    } else {
        Err(DomainError::denied(
            "token",
            "only the root token may manage operator tokens",
        ))
    }
}

fn create_token(
    state: &(impl StateRead + ?Sized),
    actor: &pb::OperatorToken,
    c: &pb::CreateOperatorToken,
    time_ms: u64,
) -> Result<Decision, StorageFault> {
    if let Err(e) = require_root(actor).and_then(|()| validate::token_name(&c.name)) {
        return Ok(Err(e));
    }
    if c.secret_sha256.len() != 32 || c.token_id.is_empty() {
        return Ok(Err(DomainError::invalid(
            "token",
            "needs an id and a 32-byte secret hash",
        )));
    }
    if state.operator_token(&c.token_id)?.is_some() {
        return Ok(Err(DomainError::exists("id", "token id already in use")));
    }
    Ok(Ok(vec![EventKind::OperatorTokenCreated(
        pb::OperatorTokenCreated {
            token: Some(pb::OperatorToken {
                id: c.token_id.clone(),
                name: c.name.clone(),
                secret_sha256: c.secret_sha256.clone(),
                root: false,
                created_ms: time_ms,
                created_by: actor.id.clone(),
                revoked_ms: 0,
            }),
        },
    )]))
}

fn revoke_token(
    state: &(impl StateRead + ?Sized),
    actor: &pb::OperatorToken,
    c: &pb::RevokeOperatorToken,
    time_ms: u64,
) -> Result<Decision, StorageFault> {
    if let Err(e) = require_root(actor) {
        return Ok(Err(e));
    }
    Ok(match state.operator_token(&c.token_id)? {
        None => Err(DomainError::not_found(
            "id",
            format!("no operator token {:?}", c.token_id),
        )),
        Some(t) if t.root => Err(DomainError::precondition(
            "id",
            "the root token cannot be revoked",
        )),
        Some(t) if t.revoked_ms != 0 => Ok(vec![]),
        Some(_) => Ok(vec![EventKind::OperatorTokenRevoked(
            pb::OperatorTokenRevoked {
                token_id: c.token_id.clone(),
                revoked_ms: time_ms,
            },
        )]),
    })
}

fn register_agent(
    state: &(impl StateRead + ?Sized),
    c: &pb::RegisterAgent,
    time_ms: u64,
) -> Result<Decision, StorageFault> {
    let c = match AgentId::parse("id", &c.agent_id).and_then(|_| validate::register_agent(c)) {
        Ok(c) => c,
        Err(e) => return Ok(Err(e)),
    };
    if state.agent(&c.agent_id)?.is_some() {
        return Ok(Err(DomainError::exists(
            "id",
            format!(
                "agent id {} was already used; ids are never reused",
                c.agent_id
            ),
        )));
    }
    if let Some(existing) = state.agent_id_by_name(&c.name)? {
        return Ok(Err(DomainError::exists(
            "name",
            format!("an agent named {:?} already exists ({existing})", c.name),
        )));
    }
    let agent = pb::Agent {
        id: c.agent_id.clone(),
        name: c.name.clone(),
        owner: c.owner.clone(),
        description: c.description.clone(),
        model: c.model.clone(),
        provider: c.provider.clone(),
        labels: c.labels.clone(),
        status: pb::AgentStatus::Active as i32,
        keys: c.keys.clone(),
        ceiling: c.ceiling.clone(),
        created_ms: time_ms,
        updated_ms: time_ms,
        version: 1,
    };
    Ok(Ok(vec![EventKind::AgentRegistered(pb::AgentRegistered {
        agent: Some(agent),
    })]))
}

/// Loads the agent a command targets, refusing unknown ids and (unless `allow_retired`) retired
/// agents, whose records are frozen.
fn existing_agent(
    state: &(impl StateRead + ?Sized),
    id: &str,
    allow_retired: bool,
) -> Result<Result<pb::Agent, DomainError>, StorageFault> {
    if let Err(e) = AgentId::parse("id", id) {
        return Ok(Err(e));
    }
    Ok(match state.agent(id)? {
        None => Err(DomainError::not_found("id", format!("no agent {id}"))),
        Some(a) if !allow_retired && a.status == pb::AgentStatus::Retired as i32 => {
            Err(DomainError::precondition(
                "status",
                format!("agent {id} is retired; its record is frozen"),
            ))
        }
        Some(a) => Ok(a),
    })
}

fn update_agent(
    state: &(impl StateRead + ?Sized),
    c: &pb::UpdateAgent,
    time_ms: u64,
) -> Result<Decision, StorageFault> {
    let agent = match existing_agent(state, &c.agent_id, false)? {
        Ok(a) => a,
        Err(e) => return Ok(Err(e)),
    };
    if let Err(e) = validate::update_agent(c) {
        return Ok(Err(e));
    }
    let next = pb::AgentMetadataUpdated {
        agent_id: agent.id.clone(),
        description: c
            .description
            .clone()
            .unwrap_or_else(|| agent.description.clone()),
        model: c.model.clone().unwrap_or_else(|| agent.model.clone()),
        provider: c.provider.clone().unwrap_or_else(|| agent.provider.clone()),
        labels: c
            .labels
            .as_ref()
            .map_or_else(|| agent.labels.clone(), |l| l.labels.clone()),
        updated_ms: time_ms,
    };
    let unchanged = next.description == agent.description
        && next.model == agent.model
        && next.provider == agent.provider
        && next.labels == agent.labels;
    Ok(Ok(if unchanged {
        vec![]
    } else {
        vec![EventKind::AgentMetadataUpdated(next)]
    }))
}

fn set_agent_status(
    state: &(impl StateRead + ?Sized),
    c: &pb::SetAgentStatus,
    time_ms: u64,
) -> Result<Decision, StorageFault> {
    let to = match pb::AgentStatus::try_from(c.status) {
        Ok(s) if s != pb::AgentStatus::Unspecified => s,
        _ => {
            return Ok(Err(DomainError::invalid(
                "status",
                format!("{} is not an agent status", c.status),
            )))
        }
    };
    let agent = match existing_agent(state, &c.agent_id, to == pb::AgentStatus::Retired)? {
        Ok(a) => a,
        Err(e) => return Ok(Err(e)),
    };
    if agent.status == to as i32 {
        return Ok(Ok(vec![]));
    }
    Ok(Ok(vec![EventKind::AgentStatusChanged(
        pb::AgentStatusChanged {
            agent_id: agent.id,
            from: agent.status,
            to: to as i32,
            updated_ms: time_ms,
        },
    )]))
}

fn add_agent_key(
    state: &(impl StateRead + ?Sized),
    c: &pb::AddAgentKey,
    time_ms: u64,
) -> Result<Decision, StorageFault> {
    let agent = match existing_agent(state, &c.agent_id, false)? {
        Ok(a) => a,
        Err(e) => return Ok(Err(e)),
    };
    let key = match c.key.as_ref() {
        None => Err(DomainError::invalid("key", "is required")),
        Some(k) => validate::jwk("key", k),
    };
    let key = match key {
        Ok(k) => k,
        Err(e) => return Ok(Err(e)),
    };
    if agent.keys.iter().any(|k| k.kid == key.kid) {
        return Ok(Err(DomainError::exists(
            "key.kid",
            format!("agent {} already has a key {:?}", agent.id, key.kid),
        )));
    }
    if agent.keys.len() >= limits::KEYS_PER_AGENT_MAX {
        return Ok(Err(DomainError::precondition(
            "key",
            format!(
                "agent {} already has {} keys, the most allowed; remove one first",
                agent.id,
                agent.keys.len()
            ),
        )));
    }
    Ok(Ok(vec![EventKind::AgentKeyAdded(pb::AgentKeyAdded {
        agent_id: agent.id,
        key: Some(key),
        updated_ms: time_ms,
    })]))
}

fn remove_agent_key(
    state: &(impl StateRead + ?Sized),
    c: &pb::RemoveAgentKey,
    time_ms: u64,
) -> Result<Decision, StorageFault> {
    let agent = match existing_agent(state, &c.agent_id, false)? {
        Ok(a) => a,
        Err(e) => return Ok(Err(e)),
    };
    if !agent.keys.iter().any(|k| k.kid == c.kid) {
        return Ok(Err(DomainError::not_found(
            "kid",
            format!("agent {} has no key {:?}", agent.id, c.kid),
        )));
    }
    Ok(Ok(vec![EventKind::AgentKeyRemoved(pb::AgentKeyRemoved {
        agent_id: agent.id,
        kid: c.kid.clone(),
        updated_ms: time_ms,
    })]))
}

/// Folds one event into the state.
pub fn materialize<S: StateRead + ?Sized>(
    state: &mut Overlay<'_, S>,
    event: &EventKind,
    time_ms: u64,
) -> Result<(), StorageFault> {
    match event {
        EventKind::ClusterBootstrapped(e) => {
            let cluster = required(&e.cluster, "ClusterBootstrapped.cluster")?;
            let token = required(&e.root_token, "ClusterBootstrapped.root_token")?;
            state.put_message(keys::CLUSTER.to_vec(), cluster);
            state.put_message(keys::token(&token.id), token);
        }
        EventKind::ApplyVersionRaised(e) => {
            let mut cluster = state.cluster()?.ok_or_else(|| {
                StorageFault("the apply version is raised before bootstrap".into())
            })?;
            cluster.apply_version = e.to;
            state.put_message(keys::CLUSTER.to_vec(), &cluster);
        }
        EventKind::OperatorTokenCreated(e) => {
            let token = required(&e.token, "OperatorTokenCreated.token")?;
            state.put_message(keys::token(&token.id), token);
        }
        EventKind::OperatorTokenRevoked(e) => {
            let mut token = state.operator_token(&e.token_id)?.ok_or_else(|| {
                StorageFault(format!("event revokes unknown token {}", e.token_id))
            })?;
            token.revoked_ms = e.revoked_ms;
            state.put_message(keys::token(&token.id), &token);
        }
        EventKind::AgentRegistered(e) => {
            let agent = required(&e.agent, "AgentRegistered.agent")?;
            state.put(keys::agent_name(&agent.name), agent.id.as_bytes().to_vec());
            state.put_message(keys::agent(&agent.id), agent);
        }
        EventKind::AgentMetadataUpdated(e) => update_record(state, &e.agent_id, time_ms, |a| {
            a.description.clone_from(&e.description);
            a.model.clone_from(&e.model);
            a.provider.clone_from(&e.provider);
            a.labels.clone_from(&e.labels);
        })?,
        EventKind::AgentStatusChanged(e) => {
            update_record(state, &e.agent_id, time_ms, |a| a.status = e.to)?
        }
        EventKind::AgentKeyAdded(e) => {
            let key = required(&e.key, "AgentKeyAdded.key")?.clone();
            update_record(state, &e.agent_id, time_ms, |a| a.keys.push(key))?
        }
        EventKind::AgentKeyRemoved(e) => update_record(state, &e.agent_id, time_ms, |a| {
            a.keys.retain(|k| k.kid != e.kid)
        })?,
        other => {
            if !authz::materialize(state, other)? {
                return Err(StorageFault("an event kind has no materializer".into()));
            }
        }
    }
    Ok(())
}

fn required<'a, T>(field: &'a Option<T>, name: &str) -> Result<&'a T, StorageFault> {
    field
        .as_ref()
        .ok_or_else(|| StorageFault(format!("event field {name} is missing")))
}

fn update_record<S: StateRead + ?Sized>(
    state: &mut Overlay<'_, S>,
    agent_id: &str,
    time_ms: u64,
    change: impl FnOnce(&mut pb::Agent),
) -> Result<(), StorageFault> {
    let mut agent = state
        .agent(agent_id)?
        .ok_or_else(|| StorageFault(format!("event references unknown agent {agent_id}")))?;
    change(&mut agent);
    agent.updated_ms = time_ms;
    agent.version += 1;
    state.put_message(keys::agent(agent_id), &agent);
    Ok(())
}
