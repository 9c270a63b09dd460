//! Delegations, authorization decisions, approvals, grants, policies, keys, issuers and
//! secrets: what apply decides and how their events become state.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use crate::delegation::{
    self, Bounds, CHAIN_AGENTS_MAX, PURPOSE_BYTES_MAX, RESOURCES_PER_DELEGATION_MAX,
};
use crate::error::{DomainError, StorageFault};
use crate::pb::event::Kind as EventKind;
use crate::policy::{self, DecisionContext, Engine, Subject};
use crate::state::{decode, prefix_end, Overlay, StateExt, StateRead};
use crate::{keys, pb, validate, version, AgentId, UserId};

/// Longest delegation lifetime.
pub const DELEGATION_TTL_MS_MAX: u64 = 90 * 24 * 3600 * 1000;
/// Default grant lifetime.
pub const GRANT_TTL_MS_DEFAULT: u64 = 60_000;
/// Longest grant lifetime.
pub const GRANT_TTL_MS_MAX: u64 = 15 * 60_000;
/// Most uses of one grant.
pub const GRANT_USES_MAX: u32 = 100;
/// How long an approval waits for the user.
pub const APPROVAL_TTL_MS: u64 = 15 * 60_000;
/// Most grants, approvals or replay-cache entries one housekeeping command expires.
pub const EXPIRE_BATCH_MAX: usize = 1000;
/// Largest secret value, in bytes (sealed).
pub const SECRET_BYTES_MAX: usize = 64 * 1024;
/// Most request-context entries on one authorization.
pub const REQUEST_CONTEXT_ENTRIES_MAX: usize = 32;

/// Who issued a command, as apply sees it.
pub enum Actor {
    Operator(pb::OperatorToken),
    User(String),
    Agent(pb::Agent),
    /// No principal: a bearer of a grant token, or leader housekeeping.
    Bearer,
}

pub type Decided = Result<Vec<EventKind>, DomainError>;

fn refuse(e: DomainError) -> Result<Decided, StorageFault> {
    Ok(Err(e))
}

fn require_operator(actor: &Actor) -> Result<&pb::OperatorToken, DomainError> {
    match actor {
        Actor::Operator(t) => Ok(t),
        _ => Err(DomainError::unauthenticated(
            "this operation needs an operator token",
        )),
    }
}

fn get<M: prost::Message + Default>(
    state: &(impl StateRead + ?Sized),
    key: &[u8],
) -> Result<Option<M>, StorageFault> {
    state.get(key)?.map(|b| decode(key, &b)).transpose()
}

fn get_u64(state: &(impl StateRead + ?Sized), key: &[u8]) -> Result<u64, StorageFault> {
    match state.get(key)? {
        None => Ok(0),
        Some(b) => Ok(u64::from_be_bytes(b.as_slice().try_into().map_err(
            |_| StorageFault(format!("{:?} is not 8 bytes", String::from_utf8_lossy(key))),
        )?)),
    }
}

pub fn delegation_record(
    state: &(impl StateRead + ?Sized),
    id: &str,
) -> Result<Option<pb::Delegation>, StorageFault> {
    get(state, &keys::delegation(id))
}

pub fn grant_record(
    state: &(impl StateRead + ?Sized),
    id: &str,
) -> Result<Option<pb::Grant>, StorageFault> {
    get(state, &keys::grant(id))
}

pub fn approval_record(
    state: &(impl StateRead + ?Sized),
    id: &str,
) -> Result<Option<pb::Approval>, StorageFault> {
    get(state, &keys::approval(id))
}

pub fn active_signing_key(
    state: &(impl StateRead + ?Sized),
) -> Result<Option<pb::SigningKey>, StorageFault> {
    match state.get(keys::ACTIVE_SIGNING_KEY)? {
        None => Ok(None),
        Some(kid) => get(state, &keys::signing_key(&String::from_utf8_lossy(&kid))),
    }
}

fn is_active(status: i32) -> bool {
    status == pb::AgentStatus::Active as i32
}

// ---------------------------------------------------------------- issuers, policies, keys

pub fn put_issuer(actor: &Actor, c: &pb::PutIssuer) -> Decided {
    require_operator(actor)?;
    let issuer = c
        .issuer
        .as_ref()
        .ok_or_else(|| DomainError::invalid("issuer", "is required"))?;
    validate::issuer(issuer)?;
    Ok(vec![EventKind::IssuerPut(pb::IssuerPut {
        issuer: Some(issuer.clone()),
    })])
}

pub fn delete_issuer(
    state: &(impl StateRead + ?Sized),
    actor: &Actor,
    c: &pb::DeleteIssuer,
) -> Result<Decided, StorageFault> {
    if let Err(e) = require_operator(actor) {
        return refuse(e);
    }
    if state.get(&keys::issuer(&c.name))?.is_none() {
        return refuse(DomainError::not_found(
            "name",
            format!("no issuer {:?}", c.name),
        ));
    }
    Ok(Ok(vec![EventKind::IssuerDeleted(pb::IssuerDeleted {
        name: c.name.clone(),
    })]))
}

pub fn put_policy(
    state: &(impl StateRead + ?Sized),
    actor: &Actor,
    c: &pb::PutPolicy,
    time_ms: u64,
) -> Result<Decided, StorageFault> {
    if let Err(e) = require_operator(actor).and_then(|_| policy::document_name(&c.name)) {
        return refuse(e);
    }
    if let Err(problems) = policy::parse_document(&c.name, &c.text) {
        return refuse(policy::problems_error("text", &problems));
    }
    let existing = state.get(&keys::policy(&c.name))?.is_some();
    if !existing && state.scan_prefix(keys::POLICY_PREFIX)?.len() >= policy::POLICY_DOCUMENTS_MAX {
        return refuse(DomainError::precondition(
            "name",
            format!(
                "the cluster already holds {} policy documents, the most allowed",
                policy::POLICY_DOCUMENTS_MAX
            ),
        ));
    }
    let version = policy::policy_version(state)? + 1;
    Ok(Ok(vec![EventKind::PolicyPut(pb::PolicyPut {
        document: Some(pb::PolicyDocument {
            name: c.name.clone(),
            text: c.text.clone(),
            version,
            updated_ms: time_ms,
        }),
    })]))
}

pub fn delete_policy(
    state: &(impl StateRead + ?Sized),
    actor: &Actor,
    c: &pb::DeletePolicy,
) -> Result<Decided, StorageFault> {
    if let Err(e) = require_operator(actor) {
        return refuse(e);
    }
    if state.get(&keys::policy(&c.name))?.is_none() {
        return refuse(DomainError::not_found(
            "name",
            format!("no policy document {:?}", c.name),
        ));
    }
    let version = policy::policy_version(state)? + 1;
    Ok(Ok(vec![EventKind::PolicyDeleted(pb::PolicyDeleted {
        name: c.name.clone(),
        version,
    })]))
}

pub fn add_signing_key(
    state: &(impl StateRead + ?Sized),
    actor: &Actor,
    c: &pb::AddSigningKey,
    time_ms: u64,
) -> Result<Decided, StorageFault> {
    if let Err(e) = require_operator(actor) {
        return refuse(e);
    }
    let Some(key) = c.key.as_ref() else {
        return refuse(DomainError::invalid("key", "is required"));
    };
    if let Err(e) = validate::signing_key(key) {
        return refuse(e);
    }
    if state.get(&keys::signing_key(&key.kid))?.is_some() {
        return refuse(DomainError::exists(
            "key.kid",
            format!("signing key {:?} exists", key.kid),
        ));
    }
    Ok(Ok(vec![EventKind::SigningKeyAdded(pb::SigningKeyAdded {
        key: Some(pb::SigningKey {
            created_ms: time_ms,
            active: true,
            ..key.clone()
        }),
    })]))
}

// ---------------------------------------------------------------- delegations

/// Checks the shape of a delegation request (everything that needs no state).
pub fn delegation_shape(c: &pb::CreateDelegation) -> Result<(), DomainError> {
    AgentId::parse("agent", &c.agent)?;
    if c.actions.is_empty() {
        return Err(DomainError::invalid("actions", "name at least one action"));
    }
    for (i, a) in c.actions.iter().enumerate() {
        delegation::action(&format!("actions[{i}]"), a)?;
    }
    if c.resources.is_empty() {
        return Err(DomainError::invalid(
            "resources",
            "name at least one resource or prefix",
        ));
    }
    if c.resources.len() > RESOURCES_PER_DELEGATION_MAX {
        return Err(DomainError::invalid(
            "resources",
            format!(
                "has {}; at most {RESOURCES_PER_DELEGATION_MAX} allowed",
                c.resources.len()
            ),
        ));
    }
    for (i, r) in c.resources.iter().enumerate() {
        delegation::pattern(&format!("resources[{i}]"), r)?;
    }
    validate::text("purpose", &c.purpose, PURPOSE_BYTES_MAX)?;
    if c.ttl_ms == 0 || c.ttl_ms > DELEGATION_TTL_MS_MAX {
        return Err(DomainError::invalid(
            "ttl_seconds",
            format!(
                "must be between 1 and {} seconds",
                DELEGATION_TTL_MS_MAX / 1000
            ),
        ));
    }
    if c.may_redelegate && c.max_depth == 0 {
        return Err(DomainError::invalid(
            "max_depth",
            "must be at least 1 when re-delegation is allowed",
        ));
    }
    if !c.may_redelegate && c.max_depth != 0 {
        return Err(DomainError::invalid("max_depth", "needs may_redelegate"));
    }
    if c.max_depth as usize >= CHAIN_AGENTS_MAX {
        return Err(DomainError::invalid(
            "max_depth",
            format!("is at most {}", CHAIN_AGENTS_MAX - 1),
        ));
    }
    if let Some(a) = c.approval_actions.iter().find(|a| !c.actions.contains(a)) {
        return Err(DomainError::invalid(
            "approval_actions",
            format!("{a:?} is not among the delegated actions"),
        ));
    }
    Ok(())
}

fn sorted_unique(items: &[String]) -> Vec<String> {
    items
        .iter()
        .cloned()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// The resource a pattern stands for in a policy check: the prefix itself for `prefix/*`.
fn pattern_resource(pattern: &str) -> &str {
    pattern.strip_suffix("/*").unwrap_or(pattern)
}

pub fn create_delegation(
    state: &(impl StateRead + ?Sized),
    engine: &mut Engine,
    actor: &Actor,
    c: &pb::CreateDelegation,
    time_ms: u64,
) -> Result<Decided, StorageFault> {
    if let Err(e) = delegation_shape(c) {
        return refuse(e);
    }
    if delegation_record(state, &c.delegation_id)?.is_some() {
        return refuse(DomainError::exists(
            "delegation_id",
            format!("{} was already used", c.delegation_id),
        ));
    }
    let delegate = match state.agent(&c.agent)? {
        Some(a) if is_active(a.status) => a,
        Some(a) => {
            return refuse(DomainError::precondition(
                "agent",
                format!("agent {} is not active", a.id),
            ))
        }
        None => {
            return refuse(DomainError::not_found(
                "agent",
                format!("no agent {}", c.agent),
            ))
        }
    };
    let actions = sorted_unique(&c.actions);
    let resources = sorted_unique(&c.resources);
    let approval_actions = sorted_unique(&c.approval_actions);
    let expires_ms = time_ms.saturating_add(c.ttl_ms);
    let (user, delegator, parent_id, chain) = match (actor, c.parent_id.is_empty()) {
        (Actor::User(user), true) => {
            // A user delegates only what the policies let them do themselves.
            let set = engine.cluster_policies(state, || policy::documents(state))?;
            for action in &actions {
                for pattern in &resources {
                    let ctx = DecisionContext {
                        delegation_id: c.delegation_id.clone(),
                        purpose: c.purpose.clone(),
                        consented: actions.clone(),
                        chain: vec![c.agent.clone()],
                        time_ms,
                        ..Default::default()
                    };
                    let subject = Subject::User(user);
                    let verdict = policy::evaluate(
                        set.for_subject(&subject, action),
                        &subject,
                        action,
                        pattern_resource(pattern),
                        &ctx,
                    );
                    if !verdict.allowed {
                        return refuse(DomainError::denied(
                            "actions",
                            format!("user {user} is not permitted to {action} {pattern}, so cannot delegate it (no policy permits it)"),
                        ));
                    }
                }
            }
            (
                user.clone(),
                format!("User::{user}"),
                String::new(),
                vec![c.agent.clone()],
            )
        }
        (Actor::Agent(agent), false) => {
            let parent = match delegation_record(state, &c.parent_id)? {
                Some(p) => p,
                None => {
                    return refuse(DomainError::not_found(
                        "parent_id",
                        format!("no delegation {}", c.parent_id),
                    ))
                }
            };
            if parent.agent != agent.id {
                return refuse(DomainError::denied(
                    "parent_id",
                    format!("delegation {} is held by another agent", parent.id),
                ));
            }
            if parent.status != pb::DelegationStatus::Active as i32 || time_ms >= parent.expires_ms
            {
                return refuse(DomainError::precondition(
                    "parent_id",
                    format!("delegation {} is revoked or expired", parent.id),
                ));
            }
            if parent.chain.contains(&c.agent) {
                return refuse(DomainError::invalid(
                    "agent",
                    "is already in the delegation chain",
                ));
            }
            if parent.chain.len() >= CHAIN_AGENTS_MAX {
                return refuse(DomainError::denied(
                    "parent_id",
                    "the chain is as deep as Mandate allows",
                ));
            }
            let bounds = Bounds {
                actions: &actions,
                resources: &resources,
                expires_ms,
                max_uses: c.max_uses,
                may_redelegate: c.may_redelegate,
                max_depth: c.max_depth,
                approval_actions: &approval_actions,
            };
            if let Err(e) = delegation::attenuates(&parent, &bounds) {
                return refuse(e);
            }
            let mut chain = parent.chain.clone();
            chain.push(c.agent.clone());
            (
                parent.user.clone(),
                agent.id.clone(),
                parent.id.clone(),
                chain,
            )
        }
        (Actor::User(_), false) => {
            return refuse(DomainError::invalid(
                "parent_id",
                "users delegate directly; only agents re-delegate",
            ))
        }
        (Actor::Agent(_), true) => {
            return refuse(DomainError::invalid(
                "parent_id",
                "an agent re-delegates from a delegation it holds",
            ))
        }
        _ => {
            return refuse(DomainError::unauthenticated(
                "a delegation needs a user token or an agent assertion",
            ))
        }
    };
    let _ = delegate;
    Ok(Ok(vec![EventKind::DelegationCreated(
        pb::DelegationCreated {
            delegation: Some(pb::Delegation {
                id: c.delegation_id.clone(),
                user,
                agent: c.agent.clone(),
                delegator,
                parent_id,
                chain,
                actions,
                resources,
                purpose: c.purpose.clone(),
                created_ms: time_ms,
                expires_ms,
                max_uses: c.max_uses,
                uses: 0,
                may_redelegate: c.may_redelegate,
                max_depth: c.max_depth,
                approval_actions,
                status: pb::DelegationStatus::Active as i32,
                revoked_ms: 0,
                revoked_by: String::new(),
            }),
        },
    )]))
}

fn ids_under(
    state: &(impl StateRead + ?Sized),
    prefix: &[u8],
    owner: &str,
) -> Result<Vec<String>, StorageFault> {
    let mut key = prefix.to_vec();
    key.extend_from_slice(owner.as_bytes());
    key.push(b'/');
    Ok(state
        .scan_prefix(&key)?
        .iter()
        .map(|(k, _)| keys::last_segment(k))
        .collect())
}

pub fn revoke_delegation(
    state: &(impl StateRead + ?Sized),
    actor: &Actor,
    c: &pb::RevokeDelegation,
    time_ms: u64,
) -> Result<Decided, StorageFault> {
    let Some(root) = delegation_record(state, &c.delegation_id)? else {
        return refuse(DomainError::not_found(
            "id",
            format!("no delegation {}", c.delegation_id),
        ));
    };
    let by =
        match actor {
            Actor::Operator(t) => format!("operator:{}", t.id),
            Actor::User(u) if *u == root.user => format!("User::{u}"),
            // An agent may revoke what it (or an agent above it) delegated.
            Actor::Agent(a) if root.chain[..root.chain.len().saturating_sub(1)].contains(&a.id) => {
                a.id.clone()
            }
            _ => return refuse(DomainError::denied(
                "id",
                "only the delegating user, an agent above this hop, or an operator may revoke it",
            )),
        };
    if root.status == pb::DelegationStatus::Revoked as i32 {
        return Ok(Ok(vec![]));
    }
    let mut delegation_ids = Vec::new();
    let mut queue = VecDeque::from([root.id.clone()]);
    while let Some(id) = queue.pop_front() {
        if let Some(d) = delegation_record(state, &id)? {
            if d.status == pb::DelegationStatus::Active as i32 {
                delegation_ids.push(id.clone());
            }
        }
        queue.extend(ids_under(state, keys::DELEGATION_CHILD_PREFIX, &id)?);
    }
    let mut grant_ids = Vec::new();
    let mut approval_ids = Vec::new();
    for id in &delegation_ids {
        for g in ids_under(state, keys::GRANT_BY_DELEGATION_PREFIX, id)? {
            if grant_record(state, &g)?.is_some_and(|g| g.status == pb::GrantStatus::Active as i32)
            {
                grant_ids.push(g);
            }
        }
        for a in ids_under(state, keys::APPROVAL_BY_DELEGATION_PREFIX, id)? {
            if approval_record(state, &a)?
                .is_some_and(|a| a.status == pb::ApprovalStatus::Pending as i32)
            {
                approval_ids.push(a);
            }
        }
    }
    Ok(Ok(vec![EventKind::DelegationsRevoked(
        pb::DelegationsRevoked {
            delegation_ids,
            grant_ids,
            approval_ids,
            revoked_ms: time_ms,
            revoked_by: by,
        },
    )]))
}

// ---------------------------------------------------------------- decisions

/// The result of evaluating one request against the chain, ceilings and policies.
pub struct Evaluation {
    pub decision: pb::Decision,
    pub reasons: Vec<String>,
    pub policy_ids: Vec<String>,
    pub user: String,
    pub chain: Vec<String>,
    /// The delegations from the leaf up to the root.
    pub hops: Vec<pb::Delegation>,
}

/// Request facts an evaluation needs.
pub struct AuthorizeRequest<'a> {
    pub delegation_id: &'a str,
    pub action: &'a str,
    pub resource: &'a str,
    pub request_context: &'a BTreeMap<String, String>,
    pub approved: bool,
}

fn deny(reasons: Vec<String>, policy_ids: Vec<String>, hops: Vec<pb::Delegation>) -> Evaluation {
    let (user, chain) = hops
        .first()
        .map(|d| (d.user.clone(), d.chain.clone()))
        .unwrap_or_default();
    Evaluation {
        decision: pb::Decision::Deny,
        reasons,
        policy_ids,
        user,
        chain,
        hops,
    }
}

/// Evaluates: the chain covers the request ∧ every agent in it is active and within its
/// ceiling ∧ the delegating user is permitted ∧ the policies permit the agent.
pub fn evaluate(
    state: &(impl StateRead + ?Sized),
    engine: &mut Engine,
    agent: &pb::Agent,
    req: &AuthorizeRequest<'_>,
    time_ms: u64,
) -> Result<Evaluation, StorageFault> {
    evaluate_with(state, engine, agent, req, time_ms, None)
}

/// The request as the policies see it, once the chain has been read and checked.
struct PolicyInputs<'a> {
    agent: &'a pb::Agent,
    /// Every agent of the chain, the acting one included, root first.
    chain_agents: Vec<pb::Agent>,
    user: String,
    ctx: DecisionContext,
}

/// What the policies said: the ceilings, the delegating user and the acting agent.
struct Verdict {
    permitted: bool,
    /// Why not, when not permitted.
    reasons: Vec<String>,
    policy_ids: Vec<String>,
}

/// Reads the chain under `req.delegation_id` and checks what needs no policy: the chain is
/// whole, covers the request, is unrevoked, unexpired and has uses left, and every agent in it
/// is active. `Err` is the denial, with the chain read so far.
fn chain_inputs<'a>(
    state: &(impl StateRead + ?Sized),
    agent: &'a pb::Agent,
    req: &AuthorizeRequest<'_>,
    time_ms: u64,
) -> Result<Result<(PolicyInputs<'a>, Vec<pb::Delegation>), Evaluation>, StorageFault> {
    let Some(leaf) = delegation_record(state, req.delegation_id)? else {
        return Ok(Err(deny(
            vec![format!("there is no delegation {}", req.delegation_id)],
            vec![],
            vec![],
        )));
    };
    if leaf.agent != agent.id {
        return Ok(Err(deny(
            vec![format!("delegation {} is held by another agent", leaf.id)],
            vec![],
            vec![],
        )));
    }
    let mut hops = vec![leaf];
    while let Some(parent_id) = hops
        .last()
        .map(|d| d.parent_id.clone())
        .filter(|p| !p.is_empty())
    {
        match delegation_record(state, &parent_id)? {
            Some(p) if hops.len() <= CHAIN_AGENTS_MAX => hops.push(p),
            _ => {
                return Err(StorageFault(format!(
                    "delegation chain above {} is broken",
                    req.delegation_id
                )))
            }
        }
    }
    let mut reasons = Vec::new();
    for d in &hops {
        if d.status != pb::DelegationStatus::Active as i32 {
            reasons.push(format!(
                "delegation {} was revoked by {}",
                d.id, d.revoked_by
            ));
        } else if time_ms >= d.expires_ms {
            reasons.push(format!("delegation {} expired", d.id));
        }
        if d.max_uses != 0 && d.uses >= d.max_uses {
            reasons.push(format!(
                "delegation {} has used all {} uses",
                d.id, d.max_uses
            ));
        }
        if !d.actions.iter().any(|a| a == req.action) {
            reasons.push(format!(
                "delegation {} does not include the action {:?}",
                d.id, req.action
            ));
        }
        if !d
            .resources
            .iter()
            .any(|p| delegation::matches(p, req.resource))
        {
            reasons.push(format!(
                "delegation {} does not cover {:?}",
                d.id, req.resource
            ));
        }
    }
    let chain = hops[0].chain.clone();
    let mut chain_agents = Vec::with_capacity(chain.len());
    for id in &chain {
        // The acting agent's record was read by the caller; the others come from state.
        let record = if *id == agent.id {
            Some(agent.clone())
        } else {
            state.agent(id)?
        };
        match record {
            Some(a) if is_active(a.status) => chain_agents.push(a),
            Some(a) => reasons.push(format!(
                "agent {} in the chain is {}",
                a.id,
                if a.status == pb::AgentStatus::Suspended as i32 {
                    "suspended"
                } else {
                    "retired"
                }
            )),
            None => reasons.push(format!("agent {id} in the chain does not exist")),
        }
    }
    if !reasons.is_empty() {
        return Ok(Err(deny(reasons, vec![], hops)));
    }
    let ctx = DecisionContext {
        delegation_id: hops[0].id.clone(),
        depth: i64::try_from(chain.len()).unwrap_or(i64::MAX) - 1,
        purpose: hops[0].purpose.clone(),
        consented: hops.last().map(|d| d.actions.clone()).unwrap_or_default(),
        chain,
        time_ms,
        request: req.request_context.clone(),
        approved: req.approved,
    };
    let inputs = PolicyInputs {
        agent,
        chain_agents,
        user: hops[0].user.clone(),
        ctx,
    };
    Ok(Ok((inputs, hops)))
}

/// Asks the policies: each chain agent's ceiling, then the cluster's (at policy version
/// `version`) for the delegating user and for the acting agent.
fn judge(
    state: &(impl StateRead + ?Sized),
    engine: &mut Engine,
    inputs: &PolicyInputs<'_>,
    req: &AuthorizeRequest<'_>,
    version: u64,
) -> Result<Verdict, StorageFault> {
    let denied = |reasons: Vec<String>, policy_ids: Vec<String>| Verdict {
        permitted: false,
        reasons,
        policy_ids,
    };
    let user = &inputs.user;
    let prepared = engine
        .chain_entities(&inputs.chain_agents)
        .and_then(|agents| policy::Prepared::new(agents, req.action, req.resource, &inputs.ctx));
    let prepared = match prepared {
        Ok(p) => p,
        Err(e) => {
            return Ok(denied(
                vec![format!("the request could not be evaluated: {e}")],
                vec![],
            ))
        }
    };
    for a in &inputs.chain_agents {
        if let Some(ceiling) = engine.ceiling(a)? {
            let v = prepared.evaluate_indexed(&ceiling, &Subject::Agent(a));
            if !v.allowed {
                return Ok(denied(
                    vec![format!(
                        "the ceiling of agent {} does not permit {} on {}",
                        a.id, req.action, req.resource
                    )],
                    v.policy_ids,
                ));
            }
        }
    }
    let set = engine.cluster_policies_at(version, || policy::documents(state))?;
    let for_user = prepared.evaluate_indexed(&set, &Subject::User(user));
    if !for_user.allowed {
        let why = if for_user.policy_ids.is_empty() {
            "no policy permits it"
        } else {
            "a policy forbids it"
        };
        return Ok(denied(
            vec![format!(
                "user {user} is not permitted to {} {} ({why})",
                req.action, req.resource
            )],
            for_user.policy_ids,
        ));
    }
    let for_agent = prepared.evaluate_indexed(&set, &Subject::Agent(inputs.agent));
    if !for_agent.allowed {
        let why = if for_agent.policy_ids.is_empty() {
            "no policy permits it"
        } else {
            "a policy forbids it"
        };
        return Ok(denied(
            vec![format!(
                "agent {} may not {} {} for {user} ({why})",
                inputs.agent.id, req.action, req.resource
            )],
            for_agent.policy_ids,
        ));
    }
    let mut policy_ids = for_user.policy_ids;
    policy_ids.extend(for_agent.policy_ids);
    policy_ids.sort();
    policy_ids.dedup();
    Ok(Verdict {
        permitted: true,
        reasons: vec![],
        policy_ids,
    })
}

/// Whether a verdict on `inputs` may depend on the decision time: some policy it consults
/// (a chain agent's ceiling, or the cluster's at policy version `version`) reads
/// `context.time_ms`.
fn reads_time(
    state: &(impl StateRead + ?Sized),
    engine: &mut Engine,
    inputs: &PolicyInputs<'_>,
    version: u64,
) -> Result<bool, StorageFault> {
    for a in &inputs.chain_agents {
        if engine.ceiling(a)?.is_some_and(|c| c.reads_time()) {
            return Ok(true);
        }
    }
    Ok(engine
        .cluster_policies_at(version, || policy::documents(state))?
        .reads_time())
}

/// SHA-256 over everything a verdict on `inputs` is a function of: the cluster policy
/// version, each chain agent's id and record version (its ceiling and attributes), the acting
/// agent, the user, the action, the resource and the decision context, with the time only
/// when a consulted policy reads it. Two states with the same digest get the same verdict.
fn inputs_digest(
    inputs: &PolicyInputs<'_>,
    req: &AuthorizeRequest<'_>,
    version: u64,
    reads_time: bool,
) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    fn field(h: &mut Sha256, bytes: &[u8]) {
        h.update((bytes.len() as u64).to_be_bytes());
        h.update(bytes);
    }
    fn list<'a>(h: &mut Sha256, items: impl ExactSizeIterator<Item = &'a String>) {
        h.update((items.len() as u64).to_be_bytes());
        for item in items {
            field(h, item.as_bytes());
        }
    }
    let mut h = Sha256::new();
    field(&mut h, b"mandate predecision 1");
    h.update(version.to_be_bytes());
    h.update((inputs.chain_agents.len() as u64).to_be_bytes());
    for a in &inputs.chain_agents {
        field(&mut h, a.id.as_bytes());
        h.update(a.version.to_be_bytes());
    }
    field(&mut h, inputs.agent.id.as_bytes());
    h.update(inputs.agent.version.to_be_bytes());
    field(&mut h, inputs.user.as_bytes());
    field(&mut h, req.action.as_bytes());
    field(&mut h, req.resource.as_bytes());
    let ctx = &inputs.ctx;
    field(&mut h, ctx.delegation_id.as_bytes());
    h.update(ctx.depth.to_be_bytes());
    field(&mut h, ctx.purpose.as_bytes());
    list(&mut h, ctx.consented.iter());
    list(&mut h, ctx.chain.iter());
    h.update((ctx.request.len() as u64).to_be_bytes());
    for (k, v) in &ctx.request {
        field(&mut h, k.as_bytes());
        field(&mut h, v.as_bytes());
    }
    h.update([u8::from(ctx.approved)]);
    if reads_time {
        h.update([1]);
        h.update(ctx.time_ms.to_be_bytes());
    } else {
        h.update([0]);
    }
    h.finalize().to_vec()
}

/// The verdict a receiving node puts into an authorization so that apply need not ask the
/// policies again: `None` when the request fails before the policies (apply finds that out
/// as cheaply) or when a consulted policy reads the decision time (apply's time is not known
/// here).
pub fn predecide(
    state: &(impl StateRead + ?Sized),
    engine: &mut Engine,
    agent: &pb::Agent,
    req: &AuthorizeRequest<'_>,
    time_ms: u64,
) -> Result<Option<pb::Predecision>, StorageFault> {
    let Ok((inputs, _)) = chain_inputs(state, agent, req, time_ms)? else {
        return Ok(None);
    };
    let version = policy::policy_version(state)?;
    if reads_time(state, engine, &inputs, version)? {
        return Ok(None);
    }
    let verdict = judge(state, engine, &inputs, req, version)?;
    Ok(Some(pb::Predecision {
        inputs_digest: inputs_digest(&inputs, req, version, false),
        permitted: verdict.permitted,
        reasons: verdict.reasons,
        policy_ids: verdict.policy_ids,
    }))
}

/// [`evaluate`], taking the policies' verdict from `predecided` when its inputs digest is
/// this state's.
fn evaluate_with(
    state: &(impl StateRead + ?Sized),
    engine: &mut Engine,
    agent: &pb::Agent,
    req: &AuthorizeRequest<'_>,
    time_ms: u64,
    predecided: Option<&pb::Predecision>,
) -> Result<Evaluation, StorageFault> {
    let (inputs, hops) = match chain_inputs(state, agent, req, time_ms)? {
        Ok(read) => read,
        Err(denied) => return Ok(denied),
    };
    let version = policy::policy_version(state)?;
    let reusable = match predecided {
        Some(p) => {
            let reads_time = reads_time(state, engine, &inputs, version)?;
            p.inputs_digest == inputs_digest(&inputs, req, version, reads_time)
        }
        None => false,
    };
    let verdict = match predecided {
        Some(p) if reusable => Verdict {
            permitted: p.permitted,
            reasons: p.reasons.clone(),
            policy_ids: p.policy_ids.clone(),
        },
        _ => judge(state, engine, &inputs, req, version)?,
    };
    if !verdict.permitted {
        return Ok(deny(verdict.reasons, verdict.policy_ids, hops));
    }
    let PolicyInputs { user, ctx, .. } = inputs;
    let policy_ids = verdict.policy_ids;
    let mut reasons = vec![format!(
        "delegation chain User::{user} → {} covers {} on {}; permitted by {}",
        ctx.chain.join(" → "),
        req.action,
        req.resource,
        policy_ids.join(", ")
    )];
    let needs_approval = hops
        .iter()
        .any(|d| d.approval_actions.iter().any(|a| a == req.action));
    let decision = if needs_approval && !req.approved {
        reasons.push(format!("{user} asked to approve {} in person", req.action));
        pb::Decision::Pending
    } else {
        pb::Decision::Allow
    };
    Ok(Evaluation {
        decision,
        reasons,
        policy_ids,
        user,
        chain: ctx.chain,
        hops,
    })
}

/// Checks an authorization request's own fields.
pub fn authorize_shape(c: &pb::Authorize) -> Result<(), DomainError> {
    delegation::action("action", &c.action)?;
    delegation::resource("resource", &c.resource)?;
    if c.delegation_id.is_empty() {
        return Err(DomainError::invalid("delegation_id", "must not be empty"));
    }
    if c.ttl_ms > GRANT_TTL_MS_MAX {
        return Err(DomainError::invalid(
            "ttl_seconds",
            format!("is at most {}", GRANT_TTL_MS_MAX / 1000),
        ));
    }
    if c.uses > GRANT_USES_MAX {
        return Err(DomainError::invalid(
            "uses",
            format!("is at most {GRANT_USES_MAX}"),
        ));
    }
    request_context_shape("context", &c.request_context)
}

/// Checks a request's context: at most [`REQUEST_CONTEXT_ENTRIES_MAX`] short text entries.
fn request_context_shape(
    field: &str,
    context: &BTreeMap<String, String>,
) -> Result<(), DomainError> {
    if context.len() > REQUEST_CONTEXT_ENTRIES_MAX {
        return Err(DomainError::invalid(
            field,
            format!("has more than {REQUEST_CONTEXT_ENTRIES_MAX} entries"),
        ));
    }
    for (k, v) in context {
        let entry = format!("{field}[{k}]");
        validate::text(&entry, k, 64)?;
        validate::text(&entry, v, 256)?;
        if k.is_empty() || k.contains('=') {
            return Err(DomainError::invalid(
                &entry,
                "keys are non-empty and contain no '='",
            ));
        }
    }
    Ok(())
}

/// Most items one `Check` call may decide.
pub const CHECK_ITEMS_MAX: usize = 1000;

/// Checks the items of a `Check` call; fields are named `items[i].<field>`.
pub fn check_shape(items: &[pb::CheckItem]) -> Result<(), DomainError> {
    if items.is_empty() || items.len() > CHECK_ITEMS_MAX {
        return Err(DomainError::invalid(
            "items",
            format!("holds 1 to {CHECK_ITEMS_MAX} items, not {}", items.len()),
        ));
    }
    for (i, item) in items.iter().enumerate() {
        let field = |name: &str| format!("items[{i}].{name}");
        if item.agent.is_empty() {
            return Err(DomainError::invalid(&field("agent"), "must not be empty"));
        }
        if item.delegation_id.is_empty() {
            return Err(DomainError::invalid(
                &field("delegation_id"),
                "must not be empty",
            ));
        }
        delegation::action(&field("action"), &item.action)?;
        delegation::resource(&field("resource"), &item.resource)?;
        request_context_shape(&field("context"), &item.context)?;
    }
    Ok(())
}

/// A read-only decision: what an authorization by `agent_id` would decide at `time_ms`,
/// without the assertion checks (the caller is not the agent) and changing nothing.
pub fn check(
    state: &(impl StateRead + ?Sized),
    engine: &mut Engine,
    agent_id: &str,
    req: &AuthorizeRequest<'_>,
    time_ms: u64,
) -> Result<Evaluation, StorageFault> {
    match state.agent(agent_id)? {
        None => Ok(deny(
            vec![format!("there is no agent {agent_id}")],
            vec![],
            vec![],
        )),
        Some(a) if !is_active(a.status) => Ok(deny(
            vec![format!(
                "agent {agent_id} is {}",
                if a.status == pb::AgentStatus::Suspended as i32 {
                    "suspended"
                } else {
                    "retired"
                }
            )],
            vec![],
            vec![],
        )),
        Some(a) => evaluate(state, engine, &a, req, time_ms),
    }
}

/// What a new grant is for; the rest comes from the evaluation and the keyring.
struct GrantSpec<'a> {
    id: &'a str,
    agent: &'a str,
    action: &'a str,
    resource: &'a str,
    ttl_ms: u64,
    uses: u32,
    audience: &'a str,
    approval_id: &'a str,
}

fn new_grant(
    state: &(impl StateRead + ?Sized),
    spec: &GrantSpec<'_>,
    eval: &Evaluation,
    time_ms: u64,
) -> Result<Option<pb::Grant>, StorageFault> {
    let Some(key) = active_signing_key(state)? else {
        return Ok(None);
    };
    let ttl = if spec.ttl_ms == 0 {
        GRANT_TTL_MS_DEFAULT
    } else {
        spec.ttl_ms
    };
    let uses = if spec.uses == 0 { 1 } else { spec.uses };
    Ok(Some(pb::Grant {
        id: spec.id.to_owned(),
        agent: spec.agent.to_owned(),
        user: eval.user.clone(),
        chain: eval.chain.clone(),
        delegation_id: eval.hops[0].id.clone(),
        action: spec.action.to_owned(),
        resource: spec.resource.to_owned(),
        issued_ms: time_ms,
        expires_ms: time_ms.saturating_add(ttl),
        max_uses: uses,
        uses_left: uses,
        status: pb::GrantStatus::Active as i32,
        ended_ms: 0,
        kid: key.kid,
        audience: spec.audience.to_owned(),
        approval_id: spec.approval_id.to_owned(),
    }))
}

pub fn authorize(
    state: &(impl StateRead + ?Sized),
    engine: &mut Engine,
    agent: &pb::Agent,
    c: &pb::Authorize,
    time_ms: u64,
) -> Result<Decided, StorageFault> {
    if let Err(e) = authorize_shape(c) {
        return refuse(e);
    }
    if c.assertion_jti.is_empty()
        || state
            .get(&keys::jti(&agent.id, &c.assertion_jti))?
            .is_some()
    {
        return refuse(DomainError::unauthenticated(
            "the client assertion's jti was already used (replay)",
        ));
    }
    if grant_record(state, &c.grant_id)?.is_some()
        || approval_record(state, &c.approval_id)?.is_some()
    {
        return refuse(DomainError::exists(
            "grant_id",
            "the stamped grant or approval id was already used",
        ));
    }
    if !agent.keys.iter().any(|k| k.kid == c.assertion_kid) {
        return refuse(DomainError::unauthenticated(
            "the key that signed the assertion is no longer registered",
        ));
    }
    let req = AuthorizeRequest {
        delegation_id: &c.delegation_id,
        action: &c.action,
        resource: &c.resource,
        request_context: &c.request_context,
        approved: false,
    };
    let mut eval = evaluate_with(state, engine, agent, &req, time_ms, c.predecision.as_ref())?;
    let mut grant = None;
    let mut approval = None;
    let mut used = Vec::new();
    match eval.decision {
        pb::Decision::Allow => {
            grant = new_grant(
                state,
                &GrantSpec {
                    id: &c.grant_id,
                    agent: &agent.id,
                    action: &c.action,
                    resource: &c.resource,
                    ttl_ms: c.ttl_ms,
                    uses: c.uses,
                    audience: &c.audience,
                    approval_id: "",
                },
                &eval,
                time_ms,
            )?;
            if grant.is_none() {
                eval.decision = pb::Decision::Deny;
                eval.reasons = vec!["the cluster has no token-signing key; an operator must run `mandate keys rotate`".into()];
            } else {
                used = eval.hops.iter().map(|d| d.id.clone()).collect();
            }
        }
        pb::Decision::Pending => {
            approval = Some(pb::Approval {
                id: c.approval_id.clone(),
                agent: agent.id.clone(),
                user: eval.user.clone(),
                delegation_id: c.delegation_id.clone(),
                action: c.action.clone(),
                resource: c.resource.clone(),
                grant_ttl_ms: c.ttl_ms,
                grant_uses: c.uses,
                status: pb::ApprovalStatus::Pending as i32,
                created_ms: time_ms,
                expires_ms: time_ms.saturating_add(APPROVAL_TTL_MS),
                decided_ms: 0,
                grant_id: String::new(),
                reasons: eval.reasons.clone(),
                request_context: c.request_context.clone(),
            });
        }
        _ => {}
    }
    Ok(Ok(vec![EventKind::AuthorizationDecided(
        pb::AuthorizationDecided {
            agent: agent.id.clone(),
            user: eval.user,
            chain: eval.chain,
            delegation_id: c.delegation_id.clone(),
            action: c.action.clone(),
            resource: c.resource.clone(),
            decision: eval.decision as i32,
            reasons: eval.reasons,
            policy_ids: eval.policy_ids,
            grant,
            approval,
            assertion_jti: c.assertion_jti.clone(),
            assertion_expires_ms: c.assertion_expires_ms,
            used_delegation_ids: used,
        },
    )]))
}

pub fn decide_approval(
    state: &(impl StateRead + ?Sized),
    engine: &mut Engine,
    actor: &Actor,
    c: &pb::DecideApproval,
    time_ms: u64,
) -> Result<Decided, StorageFault> {
    let Actor::User(user) = actor else {
        return refuse(DomainError::unauthenticated(
            "approvals are decided with a user token",
        ));
    };
    let Some(approval) = approval_record(state, &c.approval_id)? else {
        return refuse(DomainError::not_found(
            "approval_id",
            format!("no approval {}", c.approval_id),
        ));
    };
    if approval.user != *user {
        return refuse(DomainError::denied(
            "approval_id",
            "this approval belongs to another user",
        ));
    }
    if approval.status != pb::ApprovalStatus::Pending as i32 {
        return refuse(DomainError::precondition(
            "approval_id",
            "this approval was already decided or has expired",
        ));
    }
    if time_ms >= approval.expires_ms {
        return refuse(DomainError::precondition(
            "approval_id",
            "this approval has expired",
        ));
    }
    let mut decided = pb::ApprovalDecided {
        approval_id: approval.id.clone(),
        approved: false,
        decided_ms: time_ms,
        grant: None,
        reasons: vec![format!("{user} denied the request")],
        used_delegation_ids: vec![],
    };
    if c.approve {
        let Some(agent) = state.agent(&approval.agent)? else {
            return Err(StorageFault(format!(
                "approval {} names a missing agent",
                approval.id
            )));
        };
        let req = AuthorizeRequest {
            delegation_id: &approval.delegation_id,
            action: &approval.action,
            resource: &approval.resource,
            request_context: &approval.request_context,
            approved: true,
        };
        let eval = evaluate(state, engine, &agent, &req, time_ms)?;
        if eval.decision == pb::Decision::Allow {
            let grant = new_grant(
                state,
                &GrantSpec {
                    id: &c.grant_id,
                    agent: &agent.id,
                    action: &approval.action,
                    resource: &approval.resource,
                    ttl_ms: approval.grant_ttl_ms,
                    uses: approval.grant_uses,
                    audience: "",
                    approval_id: &approval.id,
                },
                &eval,
                time_ms,
            )?;
            if let Some(grant) = grant {
                decided.approved = true;
                decided.reasons = eval.reasons;
                decided.used_delegation_ids = eval.hops.iter().map(|d| d.id.clone()).collect();
                decided.grant = Some(grant);
            } else {
                decided.reasons = vec!["the cluster has no token-signing key".into()];
            }
        } else {
            decided.reasons = eval.reasons;
        }
    }
    Ok(Ok(vec![EventKind::ApprovalDecided(decided)]))
}

// ---------------------------------------------------------------- grants

/// Why a grant id names no record: grants are removed once their lifetime is over (from
/// [`version::APPLY_VERSION_GRANTS_REMOVED`]; before it a missing grant never existed).
fn no_grant(state: &(impl StateRead + ?Sized), id: &str) -> Result<String, StorageFault> {
    Ok(if grants_removed(state)? {
        format!("no grant {id}: it has expired and been removed, or never existed")
    } else {
        format!("no grant {id}")
    })
}

/// Whether the cluster applies by the rules that remove grants at the end of their lifetime.
fn grants_removed(state: &(impl StateRead + ?Sized)) -> Result<bool, StorageFault> {
    Ok(version::current(state)? >= version::APPLY_VERSION_GRANTS_REMOVED)
}

pub fn consume_grant(
    state: &(impl StateRead + ?Sized),
    c: &pb::ConsumeGrant,
    time_ms: u64,
) -> Result<Decided, StorageFault> {
    let Some(grant) = grant_record(state, &c.grant_id)? else {
        return refuse(DomainError::not_found(
            "token",
            no_grant(state, &c.grant_id)?,
        ));
    };
    if grant.status != pb::GrantStatus::Active as i32 {
        let status = pb::GrantStatus::try_from(grant.status).map_or("inactive", |s| match s {
            pb::GrantStatus::Consumed => "already used up",
            pb::GrantStatus::Completed => "completed",
            pb::GrantStatus::Revoked => "revoked",
            pb::GrantStatus::Expired => "expired",
            _ => "inactive",
        });
        return refuse(DomainError::precondition(
            "token",
            format!("grant {} is {status}", grant.id),
        ));
    }
    if time_ms >= grant.expires_ms {
        return refuse(DomainError::precondition(
            "token",
            format!("grant {} has expired", grant.id),
        ));
    }
    if (!c.action.is_empty() && c.action != grant.action)
        || (!c.resource.is_empty() && c.resource != grant.resource)
    {
        return refuse(DomainError::denied(
            "token",
            format!(
                "the grant is for {} on {}, not {} on {}",
                grant.action, grant.resource, c.action, c.resource
            ),
        ));
    }
    Ok(Ok(vec![EventKind::GrantConsumed(pb::GrantConsumed {
        grant_id: grant.id,
        uses_left: grant.uses_left.saturating_sub(1),
        consumed_ms: time_ms,
    })]))
}

pub fn end_grant(
    state: &(impl StateRead + ?Sized),
    actor: &Actor,
    c: &pb::EndGrant,
    time_ms: u64,
) -> Result<Decided, StorageFault> {
    let Some(grant) = grant_record(state, &c.grant_id)? else {
        return refuse(DomainError::not_found(
            "grant_id",
            no_grant(state, &c.grant_id)?,
        ));
    };
    let status = match pb::GrantEnd::try_from(c.how) {
        Ok(pb::GrantEnd::Complete) => pb::GrantStatus::Completed,
        Ok(pb::GrantEnd::Revoke) => pb::GrantStatus::Revoked,
        _ => return refuse(DomainError::invalid("how", "is complete or revoke")),
    };
    let allowed = match actor {
        Actor::Agent(a) => a.id == grant.agent,
        Actor::User(u) => status == pb::GrantStatus::Revoked && *u == grant.user,
        Actor::Operator(_) => status == pb::GrantStatus::Revoked,
        Actor::Bearer => false,
    };
    if !allowed {
        return refuse(DomainError::denied(
            "grant_id",
            "only the grant's agent may complete it; its agent, user or an operator may revoke it",
        ));
    }
    if grant.status != pb::GrantStatus::Active as i32 {
        return Ok(Ok(vec![]));
    }
    Ok(Ok(vec![EventKind::GrantEnded(pb::GrantEnded {
        grant_id: grant.id,
        status: status as i32,
        ended_ms: time_ms,
    })]))
}

/// Where scans of the expiry index `prefix` start: below this key the index holds no entry.
fn expiry_floor(state: &(impl StateRead + ?Sized), prefix: &[u8]) -> Result<Vec<u8>, StorageFault> {
    Ok(state
        .get(&keys::expiry_floor(prefix))?
        .unwrap_or_else(|| prefix.to_vec()))
}

/// The least key of the expiry index `prefix` past every entry due at `time_ms`.
fn past_due(prefix: &[u8], time_ms: u64) -> Option<Vec<u8>> {
    match time_ms.checked_add(1) {
        Some(after) => Some(keys::timed_start(prefix, after)),
        None => prefix_end(prefix),
    }
}

/// An expiry index entry that is due: its key, the id it names, and its value (a grant's entry
/// holds the grant's delegation id; the others hold nothing).
struct Due {
    key: Vec<u8>,
    id: String,
    value: Vec<u8>,
}

/// Index entries due at `time_ms`, oldest first, at most [`EXPIRE_BATCH_MAX`]. The scan runs
/// from the index's floor to the first entry not yet due, so it reads neither the tombstones of
/// entries purged before nor the live entries of the future.
fn due(
    state: &(impl StateRead + ?Sized),
    prefix: &[u8],
    time_ms: u64,
) -> Result<Vec<Due>, StorageFault> {
    let from = expiry_floor(state, prefix)?;
    let to = past_due(prefix, time_ms);
    state
        .scan_range_first(&from, to.as_deref(), EXPIRE_BATCH_MAX)?
        .into_iter()
        .map(|(key, value)| {
            let (_, id) = keys::split_timed(prefix, &key)
                .ok_or_else(|| StorageFault("malformed expiry index key".into()))?;
            Ok(Due {
                id: String::from_utf8_lossy(&id).into_owned(),
                key,
                value,
            })
        })
        .collect()
}

/// How many entries are due at `time_ms` in the fullest expiry index (grants, approvals,
/// replay-cache entries), counted up to [`EXPIRE_BATCH_MAX`]. The leader proposes an expiry when
/// any is due, and the next one at once when this was a full batch, so expiry keeps pace with
/// any rate of authorizations.
pub fn due_count(state: &(impl StateRead + ?Sized), time_ms: u64) -> Result<usize, StorageFault> {
    let mut most = 0;
    for prefix in [
        keys::GRANT_EXPIRY_PREFIX,
        keys::APPROVAL_EXPIRY_PREFIX,
        keys::JTI_EXPIRY_PREFIX,
    ] {
        let from = expiry_floor(state, prefix)?;
        let to = past_due(prefix, time_ms);
        let found = state.scan_range_first(&from, to.as_deref(), EXPIRE_BATCH_MAX)?;
        most = most.max(found.len());
    }
    Ok(most)
}

/// Adds `key` to the expiry index `prefix`, holding `value`. An entry below the floor (its time
/// is behind an earlier purge: a command time from a leader whose clock lags, an assertion
/// within the skew leeway) lowers the floor to itself.
fn index_expiry<S: StateRead + ?Sized>(
    state: &mut Overlay<'_, S>,
    prefix: &[u8],
    key: Vec<u8>,
    value: Vec<u8>,
) -> Result<(), StorageFault> {
    if key < expiry_floor(state, prefix)? {
        state.put(keys::expiry_floor(prefix), key.clone());
    }
    state.put(key, value);
    Ok(())
}

pub fn expire(state: &(impl StateRead + ?Sized), time_ms: u64) -> Result<Decided, StorageFault> {
    let grants_due = due(state, keys::GRANT_EXPIRY_PREFIX, time_ms)?;
    let approvals_due = due(state, keys::APPROVAL_EXPIRY_PREFIX, time_ms)?;
    let jtis_due = due(state, keys::JTI_EXPIRY_PREFIX, time_ms)?;
    if grants_due.is_empty() && approvals_due.is_empty() && jtis_due.is_empty() {
        return Ok(Ok(vec![]));
    }
    let mut grant_ids = Vec::new();
    for entry in grants_due {
        if grant_record(state, &entry.id)?
            .is_some_and(|g| g.status == pb::GrantStatus::Active as i32)
        {
            grant_ids.push(entry.id);
        }
    }
    let mut approval_ids = Vec::new();
    for entry in approvals_due {
        if approval_record(state, &entry.id)?
            .is_some_and(|a| a.status == pb::ApprovalStatus::Pending as i32)
        {
            approval_ids.push(entry.id);
        }
    }
    Ok(Ok(vec![EventKind::Expired(pb::Expired {
        grant_ids,
        approval_ids,
        expired_ms: time_ms,
        replay_cache_purged_upto_ms: time_ms,
    })]))
}

// ---------------------------------------------------------------- secrets

/// Operators write any secret; a user writes one when the cluster policies permit the user
/// `write` on its path.
pub fn put_secret(
    state: &(impl StateRead + ?Sized),
    engine: &mut Engine,
    actor: &Actor,
    c: &pb::PutSecret,
    time_ms: u64,
) -> Result<Decided, StorageFault> {
    if let Err(e) = validate::secret_path(&c.path) {
        return refuse(e);
    }
    match actor {
        Actor::Operator(_) => {}
        Actor::User(user) => {
            let set = engine.cluster_policies(state, || policy::documents(state))?;
            let subject = Subject::User(user);
            let ctx = DecisionContext {
                time_ms,
                ..Default::default()
            };
            let verdict = policy::evaluate(
                set.for_subject(&subject, "write"),
                &subject,
                "write",
                &c.path,
                &ctx,
            );
            if !verdict.allowed {
                let why = if verdict.policy_ids.is_empty() {
                    "no policy permits it".to_owned()
                } else {
                    format!("forbidden by {}", verdict.policy_ids.join(", "))
                };
                return refuse(DomainError::denied(
                    "path",
                    format!("user {user} is not permitted to write {} ({why})", c.path),
                ));
            }
        }
        _ => {
            return refuse(DomainError::unauthenticated(
                "secrets are written with an operator token or a user token",
            ))
        }
    }
    if c.sealed_value.is_empty() || c.sealed_value.len() > SECRET_BYTES_MAX {
        return refuse(DomainError::invalid(
            "value",
            format!("must be 1 to {SECRET_BYTES_MAX} bytes once sealed"),
        ));
    }
    let version = get_u64(state, &keys::secret_latest(&c.path))? + 1;
    Ok(Ok(vec![EventKind::SecretWritten(pb::SecretWritten {
        path: c.path.clone(),
        version,
        sealed_value: c.sealed_value.clone(),
        created_ms: time_ms,
    })]))
}

/// The latest version of a secret.
pub fn latest_secret(
    state: &(impl StateRead + ?Sized),
    path: &str,
) -> Result<Option<pb::SecretVersion>, StorageFault> {
    let version = get_u64(state, &keys::secret_latest(path))?;
    if version == 0 {
        return Ok(None);
    }
    get(state, &keys::secret_version(path, version))
}

// ---------------------------------------------------------------- materialize

fn update<M: prost::Message + Default, S: StateRead + ?Sized>(
    state: &mut Overlay<'_, S>,
    key: Vec<u8>,
    change: impl FnOnce(&mut M),
) -> Result<M, StorageFault> {
    let mut record: M = get(state, &key)?.ok_or_else(|| {
        StorageFault(format!(
            "event references missing record {:?}",
            String::from_utf8_lossy(&key)
        ))
    })?;
    change(&mut record);
    state.put_message(key, &record);
    Ok(record)
}

fn store_grant<S: StateRead + ?Sized>(
    state: &mut Overlay<'_, S>,
    grant: &pb::Grant,
) -> Result<(), StorageFault> {
    state.put_message(keys::grant(&grant.id), grant);
    state.put(
        keys::grant_by_delegation(&grant.delegation_id, &grant.id),
        vec![],
    );
    // The entry names the delegation so that the grant's removal needs no read; before grants
    // were removed it held nothing.
    let delegation = if grants_removed(state)? {
        grant.delegation_id.as_bytes().to_vec()
    } else {
        vec![]
    };
    index_expiry(
        state,
        keys::GRANT_EXPIRY_PREFIX,
        keys::grant_expiry(grant.expires_ms, &grant.id),
        delegation,
    )
}

/// Ends a live grant. Its record stays, saying how it ended, until its lifetime is over; the
/// expiry due then removes it ([`collect_grant`]). Before grants were removed, ending one took
/// it out of the expiry index instead, and its record stayed for ever.
fn end<S: StateRead + ?Sized>(
    state: &mut Overlay<'_, S>,
    id: &str,
    status: pb::GrantStatus,
    at_ms: u64,
) -> Result<(), StorageFault> {
    let grant: pb::Grant = update(state, keys::grant(id), |g: &mut pb::Grant| {
        g.status = status as i32;
        g.ended_ms = at_ms;
    })?;
    if !grants_removed(state)? {
        state.delete(keys::grant_expiry(grant.expires_ms, id));
    }
    Ok(())
}

/// Removes a grant whose lifetime is over, however it ended: its record and its entry in its
/// delegation's index. The grant's expiry entry names the delegation; an entry written before
/// entries did holds nothing, and the record names it instead.
fn collect_grant<S: StateRead + ?Sized>(
    state: &mut Overlay<'_, S>,
    entry: &Due,
) -> Result<(), StorageFault> {
    let delegation = if entry.value.is_empty() {
        grant_record(state, &entry.id)?.map(|g| g.delegation_id)
    } else {
        Some(String::from_utf8_lossy(&entry.value).into_owned())
    };
    if let Some(delegation) = delegation {
        state.delete(keys::grant_by_delegation(&delegation, &entry.id));
    }
    state.delete(keys::grant(&entry.id));
    Ok(())
}

fn use_delegations<S: StateRead + ?Sized>(
    state: &mut Overlay<'_, S>,
    ids: &[String],
) -> Result<(), StorageFault> {
    for id in ids {
        update(state, keys::delegation(id), |d: &mut pb::Delegation| {
            d.uses += 1
        })?;
    }
    Ok(())
}

/// Deletes the entries of the expiry index `prefix` due at `time_ms` and raises the floor past
/// them: past everything due when the batch held it all, else just past the last one purged.
fn purge_due<S: StateRead + ?Sized>(
    state: &mut Overlay<'_, S>,
    prefix: &[u8],
    time_ms: u64,
) -> Result<Vec<Due>, StorageFault> {
    let due = due(state, prefix, time_ms)?;
    let floor = match due.last() {
        Some(last) if due.len() >= EXPIRE_BATCH_MAX => {
            let mut next = last.key.clone();
            next.push(0);
            Some(next)
        }
        _ => past_due(prefix, time_ms),
    };
    if let Some(floor) = floor {
        if floor > expiry_floor(state, prefix)? {
            state.put(keys::expiry_floor(prefix), floor);
        }
    }
    for entry in &due {
        state.delete(entry.key.clone());
    }
    Ok(due)
}

/// Folds one delegation/authorization event into the state; `false` when the event is not one
/// of this module's.
pub fn materialize<S: StateRead + ?Sized>(
    state: &mut Overlay<'_, S>,
    event: &EventKind,
) -> Result<bool, StorageFault> {
    match event {
        EventKind::IssuerPut(e) => {
            let issuer = e
                .issuer
                .as_ref()
                .ok_or_else(|| StorageFault("IssuerPut without issuer".into()))?;
            state.put_message(keys::issuer(&issuer.name), issuer);
        }
        EventKind::IssuerDeleted(e) => state.delete(keys::issuer(&e.name)),
        EventKind::PolicyPut(e) => {
            let doc = e
                .document
                .as_ref()
                .ok_or_else(|| StorageFault("PolicyPut without document".into()))?;
            state.put_message(keys::policy(&doc.name), doc);
            state.put(
                keys::POLICY_VERSION.to_vec(),
                doc.version.to_be_bytes().to_vec(),
            );
        }
        EventKind::PolicyDeleted(e) => {
            state.delete(keys::policy(&e.name));
            state.put(
                keys::POLICY_VERSION.to_vec(),
                e.version.to_be_bytes().to_vec(),
            );
        }
        EventKind::SigningKeyAdded(e) => {
            let key = e
                .key
                .as_ref()
                .ok_or_else(|| StorageFault("SigningKeyAdded without key".into()))?;
            if let Some(previous) = active_signing_key(state)? {
                update(
                    state,
                    keys::signing_key(&previous.kid),
                    |k: &mut pb::SigningKey| k.active = false,
                )?;
            }
            state.put_message(keys::signing_key(&key.kid), key);
            state.put(
                keys::ACTIVE_SIGNING_KEY.to_vec(),
                key.kid.as_bytes().to_vec(),
            );
        }
        EventKind::DelegationCreated(e) => {
            let d = e
                .delegation
                .as_ref()
                .ok_or_else(|| StorageFault("DelegationCreated without delegation".into()))?;
            state.put_message(keys::delegation(&d.id), d);
            state.put(keys::delegation_by_user(&d.user, &d.id), vec![]);
            state.put(keys::delegation_by_agent(&d.agent, &d.id), vec![]);
            if !d.parent_id.is_empty() {
                state.put(keys::delegation_child(&d.parent_id, &d.id), vec![]);
            }
        }
        EventKind::DelegationsRevoked(e) => {
            for id in &e.delegation_ids {
                update(state, keys::delegation(id), |d: &mut pb::Delegation| {
                    d.status = pb::DelegationStatus::Revoked as i32;
                    d.revoked_ms = e.revoked_ms;
                    d.revoked_by.clone_from(&e.revoked_by);
                })?;
            }
            for id in &e.grant_ids {
                end(state, id, pb::GrantStatus::Revoked, e.revoked_ms)?;
            }
            for id in &e.approval_ids {
                let a: pb::Approval = update(state, keys::approval(id), |a: &mut pb::Approval| {
                    a.status = pb::ApprovalStatus::Denied as i32;
                    a.decided_ms = e.revoked_ms;
                    a.reasons = vec!["the delegation was revoked".into()];
                })?;
                state.delete(keys::approval_expiry(a.expires_ms, id));
            }
        }
        EventKind::AuthorizationDecided(e) => {
            state.put(
                keys::jti(&e.agent, &e.assertion_jti),
                e.assertion_expires_ms.to_be_bytes().to_vec(),
            );
            index_expiry(
                state,
                keys::JTI_EXPIRY_PREFIX,
                keys::jti_expiry(e.assertion_expires_ms, &e.agent, &e.assertion_jti),
                vec![],
            )?;
            if let Some(grant) = &e.grant {
                store_grant(state, grant)?;
            }
            if let Some(a) = &e.approval {
                state.put_message(keys::approval(&a.id), a);
                state.put(keys::approval_by_user(&a.user, &a.id), vec![]);
                state.put(
                    keys::approval_by_delegation(&a.delegation_id, &a.id),
                    vec![],
                );
                index_expiry(
                    state,
                    keys::APPROVAL_EXPIRY_PREFIX,
                    keys::approval_expiry(a.expires_ms, &a.id),
                    vec![],
                )?;
            }
            use_delegations(state, &e.used_delegation_ids)?;
        }
        EventKind::ApprovalDecided(e) => {
            let a: pb::Approval = update(
                state,
                keys::approval(&e.approval_id),
                |a: &mut pb::Approval| {
                    a.status = if e.approved {
                        pb::ApprovalStatus::Approved
                    } else {
                        pb::ApprovalStatus::Denied
                    } as i32;
                    a.decided_ms = e.decided_ms;
                    a.grant_id = e.grant.as_ref().map(|g| g.id.clone()).unwrap_or_default();
                    a.reasons.clone_from(&e.reasons);
                },
            )?;
            state.delete(keys::approval_expiry(a.expires_ms, &a.id));
            if let Some(grant) = &e.grant {
                store_grant(state, grant)?;
            }
            use_delegations(state, &e.used_delegation_ids)?;
        }
        EventKind::GrantConsumed(e) => {
            let g: pb::Grant = update(state, keys::grant(&e.grant_id), |g: &mut pb::Grant| {
                g.uses_left = e.uses_left
            })?;
            if g.uses_left == 0 {
                end(state, &e.grant_id, pb::GrantStatus::Consumed, e.consumed_ms)?;
            }
        }
        EventKind::GrantEnded(e) => {
            let status = pb::GrantStatus::try_from(e.status)
                .map_err(|_| StorageFault("GrantEnded with bad status".into()))?;
            end(state, &e.grant_id, status, e.ended_ms)?;
        }
        EventKind::Expired(e) => {
            for id in &e.approval_ids {
                update(state, keys::approval(id), |a: &mut pb::Approval| {
                    a.status = pb::ApprovalStatus::Expired as i32;
                    a.decided_ms = e.expired_ms;
                })?;
            }
            if grants_removed(state)? {
                for entry in purge_due(state, keys::GRANT_EXPIRY_PREFIX, e.expired_ms)? {
                    collect_grant(state, &entry)?;
                }
            } else {
                for id in &e.grant_ids {
                    update(state, keys::grant(id), |g: &mut pb::Grant| {
                        g.status = pb::GrantStatus::Expired as i32;
                        g.ended_ms = e.expired_ms;
                    })?;
                }
                purge_due(state, keys::GRANT_EXPIRY_PREFIX, e.expired_ms)?;
            }
            purge_due(state, keys::APPROVAL_EXPIRY_PREFIX, e.expired_ms)?;
            for entry in purge_due(
                state,
                keys::JTI_EXPIRY_PREFIX,
                e.replay_cache_purged_upto_ms,
            )? {
                let mut key = keys::JTI_PREFIX.to_vec();
                key.extend_from_slice(entry.id.as_bytes());
                state.delete(key);
            }
        }
        EventKind::AssertionUsed(e) => {
            state.put(
                keys::jti(&e.agent, &e.jti),
                e.expires_ms.to_be_bytes().to_vec(),
            );
            index_expiry(
                state,
                keys::JTI_EXPIRY_PREFIX,
                keys::jti_expiry(e.expires_ms, &e.agent, &e.jti),
                vec![],
            )?;
        }
        EventKind::SecretWritten(e) => {
            state.put_message(
                keys::secret_version(&e.path, e.version),
                &pb::SecretVersion {
                    path: e.path.clone(),
                    version: e.version,
                    sealed_value: e.sealed_value.clone(),
                    created_ms: e.created_ms,
                },
            );
            state.put(
                keys::secret_latest(&e.path),
                e.version.to_be_bytes().to_vec(),
            );
        }
        _ => return Ok(false),
    }
    Ok(true)
}

/// The principal a command names, checked against state.
pub fn actor(
    state: &(impl StateRead + ?Sized),
    command: &pb::Command,
) -> Result<Result<Actor, DomainError>, StorageFault> {
    if !command.user.is_empty() {
        return Ok(UserId::parse("user", &command.user).map(|_| Actor::User(command.user.clone())));
    }
    if !command.agent.is_empty() {
        return Ok(match state.agent(&command.agent)? {
            Some(a) if is_active(a.status) => Ok(Actor::Agent(a)),
            Some(a) => Err(DomainError::unauthenticated(format!(
                "agent {} is not active",
                a.id
            ))),
            None => Err(DomainError::unauthenticated(format!(
                "no agent {}",
                command.agent
            ))),
        });
    }
    Ok(Ok(Actor::Bearer))
}
