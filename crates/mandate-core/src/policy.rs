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
    Authorizer, Context, Decision, Entities, Entity, EntityUid, Policy, PolicyId, PolicySet,
    Request, RestrictedExpression, Schema, ValidationMode, Validator,
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

fn uid(kind: &str, id: &str) -> EntityUid {
    EntityUid::from_str(&format!(
        "{kind}::{}",
        serde_json::Value::String(id.to_owned())
    ))
    .expect("an entity uid built from a JSON-escaped string parses")
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

fn resource_entities(resource: &str) -> Vec<Entity> {
    let segments: Vec<&str> = resource.split('/').collect();
    (1..=segments.len())
        .map(|n| {
            let path = segments[..n].join("/");
            let parents = if n > 1 {
                HashSet::from([uid("Resource", &segments[..n - 1].join("/"))])
            } else {
                HashSet::new()
            };
            Entity::new_no_attrs(uid("Resource", &path), parents)
        })
        .collect()
}

fn subject_entities(subject: &Subject<'_>) -> Result<(EntityUid, Vec<Entity>), String> {
    match subject {
        Subject::User(id) => {
            let u = uid("User", id);
            Ok((u.clone(), vec![Entity::new_no_attrs(u, HashSet::new())]))
        }
        Subject::Agent(agent) => {
            let a = uid("Agent", &agent.id);
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
            let entity =
                Entity::new(a.clone(), attrs, HashSet::new()).map_err(|e| e.to_string())?;
            let owner = Entity::new_no_attrs(uid("User", &agent.owner), HashSet::new());
            Ok((a, vec![entity, owner]))
        }
    }
}

/// Evaluates `set` for one request. Evaluation problems deny (and are reported).
pub fn evaluate(
    set: &PolicySet,
    subject: &Subject<'_>,
    action: &str,
    resource: &str,
    ctx: &DecisionContext,
) -> Verdict {
    let build = || -> Result<(Request, Entities), String> {
        let (principal, mut entities) = subject_entities(subject)?;
        entities.extend(resource_entities(resource));
        let request = Request::new(
            principal,
            uid("Action", action),
            uid("Resource", resource),
            context(ctx)?,
            Some(schema()),
        )
        .map_err(|e| e.to_string())?;
        let entities =
            Entities::from_entities(entities, Some(schema())).map_err(|e| e.to_string())?;
        Ok((request, entities))
    };
    let (request, entities) = match build() {
        Ok(built) => built,
        Err(e) => {
            return Verdict {
                allowed: false,
                policy_ids: vec![],
                errors: vec![e],
            }
        }
    };
    let response = Authorizer::new().is_authorized(&request, set, &entities);
    let mut policy_ids: Vec<String> = response
        .diagnostics()
        .reason()
        .map(|id| id.to_string())
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

/// Parsed policies, cached by the cluster policy version and by agent record version. The
/// cache is a pure function of state, so using it keeps apply deterministic.
#[derive(Default)]
pub struct Engine {
    cluster: Option<(u64, Arc<PolicySet>)>,
    ceilings: HashMap<String, (u64, Option<Arc<PolicySet>>)>,
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
    ) -> Result<Arc<PolicySet>, StorageFault> {
        let version = policy_version(state)?;
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
        let set = Arc::new(set);
        self.cluster = Some((version, set.clone()));
        Ok(set)
    }

    /// The agent's ceiling, or `None` when it has none.
    pub fn ceiling(&mut self, agent: &pb::Agent) -> Result<Option<Arc<PolicySet>>, StorageFault> {
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
            .map(Arc::new);
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
