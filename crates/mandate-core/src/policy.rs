//! Cedar policies: the schema, validation with line and column, and evaluation.
//!
//! Entity types: `User`, `Service`, `Agent` (name, owner, model, provider, labels as a set of
//! `key=value` strings) and `Resource`, whose parents are the path's prefixes
//! (`Resource::"secret/team-a/db"` is `in Resource::"secret/team-a"`, which is `in
//! Resource::"secret"`). Actions are [`crate::delegation::ACTIONS`]. Every request carries the
//! context `{ delegation: { id, depth, purpose, consented, chain }, time_ms, request, approved }`
//! where `request` is the caller's context as a set of `key=value` strings.
//!
//! Policy ids are `<document name>:<@id annotation>` or `<document name>:<index>`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::str::FromStr;
use std::sync::{Arc, OnceLock};

use cedar_policy::{
    ActionConstraint, Authorizer, Context, Decision, Entities, Entity, EntityId, EntityTypeName,
    EntityUid, Policy, PolicyId, PolicySet, PrincipalConstraint, Request, RestrictedExpression,
    Schema, ValidationMode, Validator,
};
use miette::Diagnostic;

use crate::error::{DomainError, StorageFault};
use crate::keys;
use crate::pb;
use crate::state::{decode, StateRead};

/// The Cedar schema every policy is validated against.
pub const SCHEMA: &str = r#"
entity User;
entity Service;
entity Agent = {
  name: String,
  owner: User,
  model: String,
  provider: String,
  labels: Set<String>,
};
entity Resource in [Resource];
type DelegationInfo = {
  id: String,
  depth: Long,
  purpose: String,
  consented: Set<String>,
  chain: Set<String>,
};
type RequestContext = {
  delegation: DelegationInfo,
  time_ms: Long,
  request: Set<String>,
  approved: Bool,
};
action read, write, delete, list, create, update, call, execute appliesTo {
  principal: [User, Agent, Service],
  resource: [Resource],
  context: RequestContext,
};
"#;

/// Largest policy document, in bytes.
pub const POLICY_BYTES_MAX: usize = 64 * 1024;
/// Most policy documents in a cluster.
pub const POLICY_DOCUMENTS_MAX: usize = 256;
/// Longest policy document name, in bytes.
pub const POLICY_NAME_BYTES_MAX: usize = 64;

fn schema() -> &'static Schema {
    static SCHEMA_PARSED: OnceLock<Schema> = OnceLock::new();
    SCHEMA_PARSED.get_or_init(|| {
        Schema::from_cedarschema_str(SCHEMA)
            .map(|(s, _warnings)| s)
            .expect("the built-in Cedar schema parses")
    })
}

/// One problem found in a policy document, located by line and column (1-based).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub message: String,
    pub line: u32,
    pub column: u32,
}

fn locate(text: &str, offset: usize) -> (u32, u32) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line as u32, column as u32)
}

/// Source spans of parse and validation errors are offsets into the whole document.
fn problem(text: &str, diagnostic: &dyn Diagnostic, message: String) -> Problem {
    let offset = diagnostic
        .labels()
        .and_then(|mut labels| labels.next())
        .map_or(0, |l| l.offset());
    let (line, column) = locate(text, offset);
    Problem {
        message,
        line,
        column,
    }
}

/// Checks a policy document name.
pub fn document_name(name: &str) -> Result<(), DomainError> {
    if name.is_empty() || name.len() > POLICY_NAME_BYTES_MAX {
        return Err(DomainError::invalid(
            "name",
            format!("must be 1 to {POLICY_NAME_BYTES_MAX} bytes"),
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.')))
    {
        return Err(DomainError::invalid(
            "name",
            format!("contains {c:?}; allowed are a-z, 0-9, '-', '_' and '.'"),
        ));
    }
    Ok(())
}

/// Parses and validates a document: its policies with Mandate ids, or every problem found.
pub fn parse_document(name: &str, text: &str) -> Result<Vec<Policy>, Vec<Problem>> {
    if text.len() > POLICY_BYTES_MAX {
        return Err(vec![Problem {
            message: format!(
                "the document is {} bytes; at most {POLICY_BYTES_MAX} allowed",
                text.len()
            ),
            line: 1,
            column: 1,
        }]);
    }
    let parsed = PolicySet::from_str(text).map_err(|errors| {
        errors
            .iter()
            .map(|e| problem(text, e, e.to_string()))
            .collect::<Vec<_>>()
    })?;
    if parsed.templates().next().is_some() {
        return Err(vec![Problem {
            message: "policy templates are not supported; write static policies".into(),
            line: 1,
            column: 1,
        }]);
    }
    let validation = Validator::new(schema().clone()).validate(&parsed, ValidationMode::Strict);
    if !validation.validation_passed() {
        return Err(validation
            .validation_errors()
            .map(|e| problem(text, e, e.to_string()))
            .collect());
    }
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    for (index, policy) in parsed.policies().enumerate() {
        let local = policy
            .annotation("id")
            .map_or_else(|| index.to_string(), str::to_owned);
        let id = format!("{name}:{local}");
        if !seen.insert(id.clone()) {
            return Err(vec![Problem {
                message: format!("two policies have the id {id:?}"),
                line: 1,
                column: 1,
            }]);
        }
        out.push(policy.new_id(PolicyId::new(id)));
    }
    Ok(out)
}

/// A document's problems as one domain error naming the first problem's position.
pub fn problems_error(field: &str, problems: &[Problem]) -> DomainError {
    let text = problems
        .iter()
        .map(|p| format!("line {}, column {}: {}", p.line, p.column, p.message))
        .collect::<Vec<_>>()
        .join("; ");
    DomainError::invalid(field, text)
}

/// Parses an agent ceiling (a policy document over the agent). Empty means no ceiling.
pub fn parse_ceiling(text: &str) -> Result<Option<PolicySet>, Vec<Problem>> {
    if text.trim().is_empty() {
        return Ok(None);
    }
    let policies = parse_document("ceiling", text)?;
    let mut set = PolicySet::new();
    for p in policies {
        set.add(p).map_err(|e| {
            vec![Problem {
                message: e.to_string(),
                line: 1,
                column: 1,
            }]
        })?;
    }
    Ok(Some(set))
}

/// What a decision is about, besides principal, action and resource.
#[derive(Debug, Clone, Default)]
pub struct DecisionContext {
    pub delegation_id: String,
    pub depth: i64,
    pub purpose: String,
    pub consented: Vec<String>,
    pub chain: Vec<String>,
    pub time_ms: u64,
    pub request: BTreeMap<String, String>,
    pub approved: bool,
}

/// The outcome of one Cedar evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    /// The policies that determined the outcome (permits on allow, forbids on deny).
    pub policy_ids: Vec<String>,
    pub errors: Vec<String>,
}

/// Who is asking, as a Cedar entity.
pub enum Subject<'a> {
    User(&'a str),
    Agent(&'a pb::Agent),
}

impl Subject<'_> {
    fn uid(&self) -> EntityUid {
        match self {
            Subject::User(id) => uid("User", id),
            Subject::Agent(agent) => uid("Agent", &agent.id),
        }
    }
}

fn type_name(kind: &str) -> EntityTypeName {
    static NAMES: OnceLock<HashMap<&'static str, EntityTypeName>> = OnceLock::new();
    let names = NAMES.get_or_init(|| {
        ["User", "Agent", "Service", "Resource", "Action"]
            .into_iter()
            .map(|k| {
                (
                    k,
                    EntityTypeName::from_str(k).expect("a built-in entity type name parses"),
                )
            })
            .collect()
    });
    names
        .get(kind)
        .cloned()
        .expect("only built-in entity types are named")
}

fn uid(kind: &str, id: &str) -> EntityUid {
    EntityUid::from_type_name_and_id(type_name(kind), EntityId::new(id))
}

/// The principal types, in the order [`PolicyIndex`] keeps them.
const PRINCIPAL_TYPES: [&str; 3] = ["User", "Agent", "Service"];

/// The policies of one action that can apply to principals of one type.
#[derive(Default)]
struct ForType {
    /// Policies whose scope admits any principal of the type.
    generic: Arc<PolicySet>,
    /// Policies naming one principal (`principal == T::"id"`), with the generic ones added.
    by_id: HashMap<String, Arc<PolicySet>>,
}

/// A policy set split by action and by the principals its policies can apply to, so that an
/// evaluation runs only the policies whose scope could match its request. The decision and the
/// determining policies are the same as evaluating the whole set: the policies left out
/// cannot apply. (The schema declares no action groups, so an action scope matches exactly
/// the actions it names.)
pub struct PolicyIndex {
    /// Per action of [`crate::delegation::ACTIONS`], per principal type.
    actions: Vec<[ForType; 3]>,
    empty: PolicySet,
    /// Whether any policy may read the decision time (see [`reads_time`]).
    reads_time: bool,
}

/// The context attribute that carries the decision time.
pub const TIME_ATTRIBUTE: &str = "time_ms";

/// Whether `policy` may read the decision time. Cedar has no computed attribute names, so a
/// policy reads `context.time_ms` only by naming it (`.time_ms`, `has time_ms`, `["time_ms"]`,
/// or a record with that key to compare `context` with); the policy's JSON form spells every
/// such name out, escapes resolved. Any string equal to the name counts, so the answer errs
/// towards yes.
fn reads_time(policy: &Policy) -> bool {
    fn names_time(v: &serde_json::Value) -> bool {
        match v {
            serde_json::Value::String(s) => s == TIME_ATTRIBUTE,
            serde_json::Value::Array(items) => items.iter().any(names_time),
            serde_json::Value::Object(fields) => fields
                .iter()
                .any(|(k, v)| k == TIME_ATTRIBUTE || names_time(v)),
            _ => false,
        }
    }
    policy.to_json().map_or(true, |json| names_time(&json))
}

impl PolicyIndex {
    pub fn new(set: &PolicySet) -> Result<Self, String> {
        let all = crate::delegation::ACTIONS;
        // (action, type) → generic policies; (action, type, id) → specific ones.
        let mut generic: HashMap<(usize, usize), Vec<Policy>> = HashMap::new();
        let mut specific: HashMap<(usize, usize, String), Vec<Policy>> = HashMap::new();
        let mut any_reads_time = false;
        for policy in set.policies() {
            any_reads_time = any_reads_time || reads_time(policy);
            let actions: Vec<usize> = match policy.action_constraint() {
                ActionConstraint::Any => (0..all.len()).collect(),
                ActionConstraint::Eq(a) => action_position(&a).into_iter().collect(),
                ActionConstraint::In(list) => list.iter().filter_map(action_position).collect(),
            };
            let (types, id) = match policy.principal_constraint() {
                PrincipalConstraint::Eq(p) => (
                    type_position(p.type_name()).into_iter().collect(),
                    Some(AsRef::<str>::as_ref(p.id()).to_owned()),
                ),
                PrincipalConstraint::Is(t) | PrincipalConstraint::IsIn(t, _) => {
                    (type_position(&t).into_iter().collect(), None)
                }
                PrincipalConstraint::Any | PrincipalConstraint::In(_) => {
                    ((0..PRINCIPAL_TYPES.len()).collect::<Vec<_>>(), None)
                }
            };
            for &a in &actions {
                for &t in &types {
                    match &id {
                        Some(id) => specific.entry((a, t, id.clone())).or_default(),
                        None => generic.entry((a, t)).or_default(),
                    }
                    .push(policy.clone());
                }
            }
        }
        let build = |policies: Vec<Policy>| {
            PolicySet::from_policies(policies)
                .map(Arc::new)
                .map_err(|e| e.to_string())
        };
        let mut actions: Vec<[ForType; 3]> = (0..all.len()).map(|_| Default::default()).collect();
        for ((a, t, id), mut policies) in specific {
            policies.extend(generic.get(&(a, t)).cloned().unwrap_or_default());
            actions[a][t].by_id.insert(id, build(policies)?);
        }
        for ((a, t), policies) in generic {
            actions[a][t].generic = build(policies)?;
        }
        Ok(PolicyIndex {
            actions,
            empty: PolicySet::new(),
            reads_time: any_reads_time,
        })
    }

    /// Whether a decision by these policies may depend on the decision time.
    pub fn reads_time(&self) -> bool {
        self.reads_time
    }

    /// The policies that can apply to `subject` doing `action`.
    pub fn for_subject(&self, subject: &Subject<'_>, action: &str) -> &PolicySet {
        let Some(for_action) = crate::delegation::ACTIONS
            .iter()
            .position(|a| *a == action)
            .map(|a| &self.actions[a])
        else {
            return &self.empty;
        };
        let (t, id) = match subject {
            Subject::User(id) => (0, *id),
            Subject::Agent(agent) => (1, agent.id.as_str()),
        };
        let for_type = &for_action[t];
        for_type.by_id.get(id).unwrap_or(&for_type.generic)
    }
}

fn action_position(uid: &EntityUid) -> Option<usize> {
    let id: &str = uid.id().as_ref();
    crate::delegation::ACTIONS.iter().position(|a| *a == id)
}

fn type_position(name: &EntityTypeName) -> Option<usize> {
    let name = name.to_string();
    PRINCIPAL_TYPES.iter().position(|t| *t == name)
}

fn string_set<'a>(items: impl IntoIterator<Item = &'a String>) -> RestrictedExpression {
    RestrictedExpression::new_set(
        items
            .into_iter()
            .map(|s| RestrictedExpression::new_string(s.clone())),
    )
}

fn context(ctx: &DecisionContext) -> Result<Context, String> {
    let delegation = RestrictedExpression::new_record([
        (
            "id".to_owned(),
            RestrictedExpression::new_string(ctx.delegation_id.clone()),
        ),
        (
            "depth".to_owned(),
            RestrictedExpression::new_long(ctx.depth),
        ),
        (
            "purpose".to_owned(),
            RestrictedExpression::new_string(ctx.purpose.clone()),
        ),
        ("consented".to_owned(), string_set(&ctx.consented)),
        ("chain".to_owned(), string_set(&ctx.chain)),
    ])
    .map_err(|e| e.to_string())?;
    let request: Vec<String> = ctx
        .request
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    Context::from_pairs([
        ("delegation".to_owned(), delegation),
        (
            "time_ms".to_owned(),
            RestrictedExpression::new_long(i64::try_from(ctx.time_ms).unwrap_or(i64::MAX)),
        ),
        ("request".to_owned(), string_set(&request)),
        (
            "approved".to_owned(),
            RestrictedExpression::new_bool(ctx.approved),
        ),
    ])
    .map_err(|e| e.to_string())
}

/// The resource as one entity whose parents are all its path prefixes, already closed under
/// `in`: `secret/team-a/db` is in `secret/team-a` and in `secret`. The prefixes need no entities
/// of their own (resources carry no attributes), which keeps Cedar's transitive closure trivial.
fn resource_entity(resource: &str) -> Entity {
    let parents = resource
        .match_indices('/')
        .map(|(at, _)| uid("Resource", &resource[..at]))
        .collect();
    Entity::new_no_attrs(uid("Resource", resource), parents)
}

/// The agents as Cedar entities.
pub fn agent_entities(agents: &[&pb::Agent]) -> Result<Entities, String> {
    let entities = agents
        .iter()
        .map(|a| agent_entity(a))
        .collect::<Result<Vec<_>, _>>()?;
    Entities::from_entities(entities, None).map_err(|e| e.to_string())
}

/// The agent as a Cedar entity with its registry attributes.
fn agent_entity(agent: &pb::Agent) -> Result<Entity, String> {
    let labels: Vec<String> = agent
        .labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let attrs = HashMap::from([
        (
            "name".to_owned(),
            RestrictedExpression::new_string(agent.name.clone()),
        ),
        (
            "owner".to_owned(),
            RestrictedExpression::new_entity_uid(uid("User", &agent.owner)),
        ),
        (
            "model".to_owned(),
            RestrictedExpression::new_string(agent.model.clone()),
        ),
        (
            "provider".to_owned(),
            RestrictedExpression::new_string(agent.provider.clone()),
        ),
        ("labels".to_owned(), string_set(&labels)),
    ]);
    Entity::new(uid("Agent", &agent.id), attrs, HashSet::new()).map_err(|e| e.to_string())
}

/// One request made ready for several evaluations: the entities (users, agents, the resource
/// and its ancestors), the action, the resource and the context are built once.
pub struct Prepared {
    entities: Entities,
    action: EntityUid,
    resource: EntityUid,
    context: Context,
}

impl Prepared {
    /// Prepares `action` on `resource` for users and the given agents (see [`agent_entities`]).
    pub fn new(
        agents: Entities,
        action: &str,
        resource: &str,
        ctx: &DecisionContext,
    ) -> Result<Self, String> {
        // Users carry no attributes or parents, so they need no entity: Cedar treats a
        // principal without one exactly as one with no attributes and no ancestors.
        // Every policy was validated against the schema when it was written, and these
        // entities are built here to the schema's shape, so evaluation skips re-validation.
        Ok(Prepared {
            entities: agents
                .add_entities([resource_entity(resource)], None)
                .map_err(|e| e.to_string())?,
            action: uid("Action", action),
            resource: uid("Resource", resource),
            context: context(ctx)?,
        })
    }

    /// Evaluates the policies of `index` that can apply to `subject`.
    pub fn evaluate_indexed(&self, index: &PolicyIndex, subject: &Subject<'_>) -> Verdict {
        self.evaluate(
            index.for_subject(subject, self.action.id().as_ref()),
            subject,
        )
    }

    /// Evaluates `set` for `subject`. Evaluation problems deny (and are reported).
    pub fn evaluate(&self, set: &PolicySet, subject: &Subject<'_>) -> Verdict {
        let principal = subject.uid();
        let request = match Request::new(
            principal,
            self.action.clone(),
            self.resource.clone(),
            self.context.clone(),
            None,
        ) {
            Ok(r) => r,
            Err(e) => {
                return Verdict {
                    allowed: false,
                    policy_ids: vec![],
                    errors: vec![e.to_string()],
                }
            }
        };
        let response = authorizer().is_authorized(&request, set, &self.entities);
        let mut policy_ids: Vec<String> = response
            .diagnostics()
            .reason()
            .map(|id| AsRef::<str>::as_ref(id).to_owned())
            .collect();
        policy_ids.sort();
        let errors = response
            .diagnostics()
            .errors()
            .map(|e| e.to_string())
            .collect();
        Verdict {
            allowed: response.decision() == Decision::Allow,
            policy_ids,
            errors,
        }
    }
}

fn authorizer() -> &'static Authorizer {
    static AUTHORIZER: OnceLock<Authorizer> = OnceLock::new();
    AUTHORIZER.get_or_init(Authorizer::new)
}

/// Evaluates `set` for one request. Evaluation problems deny (and are reported).
pub fn evaluate(
    set: &PolicySet,
    subject: &Subject<'_>,
    action: &str,
    resource: &str,
    ctx: &DecisionContext,
) -> Verdict {
    let prepared = match subject {
        Subject::User(_) => Prepared::new(Entities::empty(), action, resource, ctx),
        Subject::Agent(agent) => {
            agent_entities(&[agent]).and_then(|agents| Prepared::new(agents, action, resource, ctx))
        }
    };
    match prepared {
        Ok(p) => p.evaluate(set, subject),
        Err(e) => Verdict {
            allowed: false,
            policy_ids: vec![],
            errors: vec![e],
        },
    }
}

/// Parsed policies, cached by the cluster policy version and by agent record version. The
/// cache is a pure function of state, so using it keeps apply deterministic.
#[derive(Default)]
pub struct Engine {
    cluster: Option<(u64, Arc<PolicyIndex>)>,
    ceilings: HashMap<String, (u64, Option<Arc<PolicyIndex>>)>,
    chains: HashMap<Vec<(String, u64)>, Entities>,
}

/// Most agent ceilings kept parsed at once.
pub const CEILING_CACHE_MAX: usize = 4096;

/// The cluster-wide policy version (bumped by every policy put or delete).
pub fn policy_version(state: &(impl StateRead + ?Sized)) -> Result<u64, StorageFault> {
    match state.get(keys::POLICY_VERSION)? {
        None => Ok(0),
        Some(b) => {
            Ok(u64::from_be_bytes(b.as_slice().try_into().map_err(
                |_| StorageFault("policy version is not 8 bytes".into()),
            )?))
        }
    }
}

impl Engine {
    /// The cluster policy set as of `state`.
    pub fn cluster_policies(
        &mut self,
        state: &(impl StateRead + ?Sized),
        documents: impl FnOnce() -> Result<Vec<pb::PolicyDocument>, StorageFault>,
    ) -> Result<Arc<PolicyIndex>, StorageFault> {
        self.cluster_policies_at(policy_version(state)?, documents)
    }

    /// The cluster policy set at policy version `version` (read by the caller).
    pub fn cluster_policies_at(
        &mut self,
        version: u64,
        documents: impl FnOnce() -> Result<Vec<pb::PolicyDocument>, StorageFault>,
    ) -> Result<Arc<PolicyIndex>, StorageFault> {
        if let Some((v, set)) = &self.cluster {
            if *v == version {
                return Ok(set.clone());
            }
        }
        let mut set = PolicySet::new();
        for doc in documents()? {
            let policies = parse_document(&doc.name, &doc.text).map_err(|p| {
                StorageFault(format!(
                    "stored policy {:?} no longer parses: {p:?}",
                    doc.name
                ))
            })?;
            for p in policies {
                set.add(p)
                    .map_err(|e| StorageFault(format!("stored policy {:?}: {e}", doc.name)))?;
            }
        }
        let index = Arc::new(PolicyIndex::new(&set).map_err(StorageFault)?);
        self.cluster = Some((version, index.clone()));
        Ok(index)
    }

    /// The agents of a delegation chain as Cedar entities, built once per chain and agent
    /// record versions.
    pub fn chain_entities(&mut self, agents: &[pb::Agent]) -> Result<Entities, String> {
        let key: Vec<(String, u64)> = agents.iter().map(|a| (a.id.clone(), a.version)).collect();
        if let Some(entities) = self.chains.get(&key) {
            return Ok(entities.clone());
        }
        let entities = agent_entities(&agents.iter().collect::<Vec<_>>())?;
        if self.chains.len() >= CEILING_CACHE_MAX {
            self.chains.clear();
        }
        self.chains.insert(key, entities.clone());
        Ok(entities)
    }

    /// The agent's ceiling, or `None` when it has none.
    pub fn ceiling(&mut self, agent: &pb::Agent) -> Result<Option<Arc<PolicyIndex>>, StorageFault> {
        if let Some((version, set)) = self.ceilings.get(&agent.id) {
            if *version == agent.version {
                return Ok(set.clone());
            }
        }
        let set = parse_ceiling(&agent.ceiling)
            .map_err(|p| {
                StorageFault(format!(
                    "the ceiling of {} no longer parses: {p:?}",
                    agent.id
                ))
            })?
            .map(|set| PolicyIndex::new(&set).map(Arc::new))
            .transpose()
            .map_err(StorageFault)?;
        if self.ceilings.len() >= CEILING_CACHE_MAX {
            self.ceilings.clear();
        }
        self.ceilings
            .insert(agent.id.clone(), (agent.version, set.clone()));
        Ok(set)
    }
}

/// Every stored policy document, in name order.
pub fn documents(
    state: &(impl StateRead + ?Sized),
) -> Result<Vec<pb::PolicyDocument>, StorageFault> {
    state
        .scan_prefix(keys::POLICY_PREFIX)?
        .into_iter()
        .map(|(k, v)| decode(&k, &v))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEAM_A: &str = r#"
@id("members-read")
permit(principal == User::"alice", action == Action::"read", resource in Resource::"secret/team-a");

@id("agents-shallow")
permit(principal is Agent, action, resource) when { context.delegation.depth <= 1 };
"#;

    fn agent() -> pb::Agent {
        pb::Agent {
            id: "agt_00000000000000000000000000000001".into(),
            name: "bot".into(),
            owner: "alice".into(),
            ..Default::default()
        }
    }

    #[test]
    fn a_user_is_permitted_below_a_resource_prefix_and_the_policy_is_named() {
        let policies = parse_document("team-a", TEAM_A).expect("valid");
        let set = PolicySet::from_policies(policies).expect("set");
        let ctx = DecisionContext::default();
        let v = evaluate(
            &set,
            &Subject::User("alice"),
            "read",
            "secret/team-a/db",
            &ctx,
        );
        assert!(v.allowed, "{v:?}");
        assert_eq!(v.policy_ids, vec!["team-a:members-read".to_owned()]);
        let v = evaluate(
            &set,
            &Subject::User("alice"),
            "read",
            "secret/team-b/db",
            &ctx,
        );
        assert!(!v.allowed);
        let v = evaluate(
            &set,
            &Subject::User("bob"),
            "read",
            "secret/team-a/db",
            &ctx,
        );
        assert!(!v.allowed);
    }

    #[test]
    fn agent_policies_see_the_delegation_context() {
        let set = PolicySet::from_policies(parse_document("team-a", TEAM_A).expect("valid"))
            .expect("set");
        let shallow = DecisionContext {
            depth: 1,
            ..Default::default()
        };
        let deep = DecisionContext {
            depth: 2,
            ..Default::default()
        };
        assert!(
            evaluate(
                &set,
                &Subject::Agent(&agent()),
                "read",
                "secret/x",
                &shallow
            )
            .allowed
        );
        assert!(!evaluate(&set, &Subject::Agent(&agent()), "read", "secret/x", &deep).allowed);
    }

    #[test]
    fn a_policy_reads_the_decision_time_whenever_it_names_the_attribute() {
        let reads = |condition: &str| {
            let text = format!("permit(principal, action, resource) when {{ {condition} }};");
            let set =
                PolicySet::from_policies(parse_document("t", &text).expect("valid")).expect("set");
            PolicyIndex::new(&set).expect("index").reads_time()
        };
        assert!(reads("context.time_ms > 0"));
        assert!(reads("context has time_ms"));
        assert!(reads("context[\"time\\u{5f}ms\"] > 0"));
        assert!(!reads("context.delegation.depth <= 1"));
        assert!(!reads("context.request.contains(\"time=1\")"));
    }

    #[test]
    fn the_principal_index_decides_exactly_as_the_whole_set() {
        let text = format!(
            "{TEAM_A}\n@id(\"bob\")\npermit(principal == User::\"bob\", action, resource);\n\
             @id(\"no-agent-deletes\")\nforbid(principal is Agent, action == Action::\"delete\", resource);\n\
             @id(\"anyone-lists\")\npermit(principal, action == Action::\"list\", resource);"
        );
        let whole =
            PolicySet::from_policies(parse_document("mixed", &text).expect("valid")).expect("set");
        let index = PolicyIndex::new(&whole).expect("index");
        let agent = agent();
        let ctx = DecisionContext {
            depth: 1,
            ..Default::default()
        };
        for subject in [
            Subject::User("alice"),
            Subject::User("bob"),
            Subject::User("carol"),
            Subject::Agent(&agent),
        ] {
            for action in ["read", "delete", "list"] {
                for resource in ["secret/team-a/db", "secret/other"] {
                    let agents = agent_entities(&[&agent]).expect("entities");
                    let prepared = Prepared::new(agents, action, resource, &ctx).expect("prepare");
                    assert_eq!(
                        prepared.evaluate(&whole, &subject),
                        prepared.evaluate_indexed(&index, &subject)
                    );
                }
            }
        }
    }

    #[test]
    fn parse_and_schema_errors_carry_line_and_column() {
        let broken = "permit(principal, action, resource);\npermit(principal action, resource);";
        let problems = parse_document("p", broken).expect_err("syntax error");
        assert_eq!(problems[0].line, 2, "{problems:?}");
        let unknown = "permit(principal, action, resource)\n  when { context.nope == 1 };";
        let problems = parse_document("p", unknown).expect_err("schema error");
        assert_eq!(problems[0].line, 2, "{problems:?}");
        assert!(problems[0].column > 1, "{problems:?}");
    }
}
