//! `mandate policy|delegate|authorize|approval|grant|secret|keys|issuer`: delegation, policy and
//! per-request authorization from the command line.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use mandate_client::{pb, Client};
use serde_json::{json, Value};

use crate::identity::{self, parse_duration, AgentIdentity};
use crate::output::print;
use crate::{Connection, Failure};

fn read_file(path: &PathBuf) -> Result<String, Failure> {
    std::fs::read_to_string(path)
        .map_err(|e| Failure(format!("cannot read {}: {e}", path.display())))
}

fn status_name<T: std::fmt::Debug>(value: Result<T, prost::UnknownEnumValue>) -> String {
    value.map_or_else(
        |_| "unspecified".into(),
        |v| format!("{v:?}").to_lowercase(),
    )
}

pub fn delegation_json(d: &pb::Delegation) -> Value {
    json!({
        "id": d.id, "user": d.user, "agent": d.agent, "delegator": d.delegator, "parent_id": d.parent_id,
        "chain": d.chain, "actions": d.actions, "resources": d.resources, "purpose": d.purpose,
        "created_ms": d.created_ms, "expires_ms": d.expires_ms, "max_uses": d.max_uses, "uses": d.uses,
        "may_redelegate": d.may_redelegate, "max_depth": d.max_depth, "approval_actions": d.approval_actions,
        "status": status_name(pb::DelegationStatus::try_from(d.status)), "revoked_by": d.revoked_by,
    })
}

pub fn grant_json(g: &pb::Grant) -> Value {
    json!({
        "id": g.id, "agent": g.agent, "user": g.user, "chain": g.chain, "delegation_id": g.delegation_id,
        "action": g.action, "resource": g.resource, "issued_ms": g.issued_ms, "expires_ms": g.expires_ms,
        "uses_left": g.uses_left, "max_uses": g.max_uses, "status": status_name(pb::GrantStatus::try_from(g.status)),
    })
}

fn approval_json(a: &pb::Approval) -> Value {
    json!({
        "id": a.id, "agent": a.agent, "user": a.user, "delegation_id": a.delegation_id, "action": a.action,
        "resource": a.resource, "status": status_name(pb::ApprovalStatus::try_from(a.status)),
        "created_ms": a.created_ms, "expires_ms": a.expires_ms, "grant_id": a.grant_id, "reasons": a.reasons,
    })
}

/// The JSON of an authorization outcome: `decision`, and `grant_id`, `token`, `expires_at` on
/// allow, `reasons` always, `approval_id` on pending.
pub fn decision_json(r: &pb::AuthorizeResponse) -> Value {
    let decision = match pb::Decision::try_from(r.decision) {
        Ok(pb::Decision::Allow) => "allow",
        Ok(pb::Decision::Pending) => "pending",
        _ => "deny",
    };
    let mut v = json!({ "decision": decision, "reasons": r.reasons, "policy_ids": r.policy_ids, "applied_index": r.applied_index });
    if let Some(g) = &r.grant {
        v["grant_id"] = json!(g.id);
        v["token"] = json!(r.token);
        v["expires_at"] = json!(g.expires_ms.div_ceil(1000));
        v["expires_at_ms"] = json!(g.expires_ms);
        v["grant"] = grant_json(g);
    }
    if !r.approval_id.is_empty() {
        v["approval_id"] = json!(r.approval_id);
    }
    v
}

// ------------------------------------------------------------------ policy

#[derive(Args, Debug)]
pub struct PolicyCommand {
    #[command(subcommand)]
    command: PolicySub,
    #[command(flatten)]
    connection: Connection,
}

#[derive(Subcommand, Debug)]
enum PolicySub {
    /// Store (or replace) the policy document NAME from a .cedar file.
    Put { name: String, file: PathBuf },
    /// Show one policy document.
    Get { name: String },
    /// List every policy document.
    List,
    /// Delete a policy document.
    Delete { name: String },
    /// Check a .cedar file against Mandate's schema without storing it.
    Validate { file: PathBuf },
}

pub async fn policy(cmd: PolicyCommand) -> Result<(), Failure> {
    let as_json = cmd.connection.json;
    let client = cmd.connection.client()?;
    let doc_json = |d: &pb::PolicyDocument| json!({ "name": d.name, "version": d.version, "updated_ms": d.updated_ms, "text": d.text });
    match cmd.command {
        PolicySub::Put { name, file } => {
            let request = pb::PutPolicyRequest {
                name,
                text: read_file(&file)?,
            };
            let r = client
                .authz(|mut c| {
                    let r = request.clone();
                    async move { c.put_policy(r).await }
                })
                .await?;
            let doc = r
                .policy
                .ok_or_else(|| Failure("no policy returned".into()))?;
            print(
                &json!({ "name": doc.name, "version": doc.version, "applied_index": r.applied_index }),
                as_json,
            );
        }
        PolicySub::Get { name } => {
            let r = client
                .authz(|mut c| {
                    let name = name.clone();
                    async move { c.get_policy(pb::PolicyNameRequest { name }).await }
                })
                .await?;
            let doc = r
                .policy
                .ok_or_else(|| Failure("no policy returned".into()))?;
            if as_json {
                print(&doc_json(&doc), true)
            } else {
                print!("{}", doc.text)
            }
        }
        PolicySub::List => {
            let r = client
                .authz(|mut c| async move { c.list_policies(pb::ListPoliciesRequest {}).await })
                .await?;
            if as_json {
                print(
                    &json!({ "version": r.version, "policies": r.policies.iter().map(doc_json).collect::<Vec<_>>() }),
                    true,
                );
            } else {
                for d in &r.policies {
                    println!("{}\tversion {}", d.name, d.version);
                }
            }
        }
        PolicySub::Delete { name } => {
            let r = client
                .authz(|mut c| {
                    let name = name.clone();
                    async move { c.delete_policy(pb::PolicyNameRequest { name }).await }
                })
                .await?;
            print(
                &json!({ "deleted": true, "applied_index": r.applied_index }),
                as_json,
            );
        }
        PolicySub::Validate { file } => {
            let text = read_file(&file)?;
            let r = client
                .authz(|mut c| {
                    let text = text.clone();
                    async move { c.validate_policy(pb::ValidatePolicyRequest { text }).await }
                })
                .await?;
            let problems: Vec<Value> = r
                .problems
                .iter()
                .map(|p| json!({ "line": p.line, "column": p.column, "message": p.message }))
                .collect();
            print(
                &json!({ "valid": r.valid, "policy_ids": r.policy_ids, "problems": problems }),
                as_json,
            );
            if !r.valid {
                let first = &r.problems[0];
                return Err(Failure(format!(
                    "{}:{}:{}: {}",
                    file.display(),
                    first.line,
                    first.column,
                    first.message
                )));
            }
        }
    }
    Ok(())
}

// ------------------------------------------------------------------ delegate

#[derive(Args, Debug, Clone)]
struct Bounds {
    /// An action to delegate (repeatable).
    #[arg(long = "action", required = true)]
    actions: Vec<String>,
    /// A resource or prefix like secret/team-a/* (repeatable).
    #[arg(long = "resource", required = true)]
    resources: Vec<String>,
    #[arg(long, default_value = "1h")]
    ttl: String,
    /// Most uses (0: no limit).
    #[arg(long, default_value_t = 0)]
    max_uses: u64,
    /// An action that needs the user's live approval (repeatable).
    #[arg(long = "approval-for")]
    approval_for: Vec<String>,
    #[arg(long)]
    may_redelegate: bool,
    #[arg(long, default_value_t = 0)]
    max_depth: u32,
    #[arg(long, default_value = "")]
    purpose: String,
}

impl Bounds {
    fn request(&self, agent: String) -> Result<pb::CreateDelegationRequest, Failure> {
        Ok(pb::CreateDelegationRequest {
            agent,
            actions: self.actions.clone(),
            resources: self.resources.clone(),
            purpose: self.purpose.clone(),
            ttl_seconds: parse_duration(&self.ttl)?,
            max_uses: self.max_uses,
            may_redelegate: self.may_redelegate,
            max_depth: self.max_depth,
            approval_actions: self.approval_for.clone(),
            ..Default::default()
        })
    }
}

#[derive(Args, Debug)]
pub struct DelegateCommand {
    #[command(subcommand)]
    command: DelegateSub,
    #[command(flatten)]
    connection: Connection,
}

#[derive(Subcommand, Debug)]
enum DelegateSub {
    /// A user delegates to an agent.
    Create {
        #[arg(long)]
        user_token: String,
        #[arg(long)]
        agent: String,
        #[command(flatten)]
        bounds: Bounds,
    },
    /// An agent re-delegates part of a delegation it holds to a sub-agent.
    Sub {
        /// The re-delegating agent's private key.
        #[arg(long)]
        agent_key: PathBuf,
        /// The re-delegating agent.
        #[arg(long)]
        agent: String,
        /// The delegation it holds.
        #[arg(long)]
        parent: String,
        /// The sub-agent.
        #[arg(long)]
        to: String,
        #[command(flatten)]
        bounds: Bounds,
    },
    /// List delegations (a user's with --user-token; an operator's choice with --user/--agent).
    List {
        #[arg(long)]
        user_token: Option<String>,
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        agent: Option<String>,
    },
    /// Show one delegation.
    Get {
        id: String,
        #[arg(long)]
        user_token: Option<String>,
    },
    /// Revoke a delegation, everything re-delegated from it and every live grant under them.
    Revoke {
        id: String,
        #[arg(long)]
        user_token: Option<String>,
        #[arg(long, requires = "agent_key")]
        agent: Option<String>,
        #[arg(long)]
        agent_key: Option<PathBuf>,
    },
}

async fn assertion_for(
    client: &Client,
    agent: Option<&String>,
    key: Option<&PathBuf>,
) -> Result<String, Failure> {
    match (agent, key) {
        (Some(agent), Some(key)) => AgentIdentity::load(agent, key)?.assertion(client).await,
        _ => Ok(String::new()),
    }
}

pub async fn delegate(cmd: DelegateCommand) -> Result<(), Failure> {
    let as_json = cmd.connection.json;
    let client = cmd.connection.client()?;
    let show = |d: Option<pb::Delegation>| -> Result<(), Failure> {
        let d = d.ok_or_else(|| Failure("no delegation returned".into()))?;
        print(&delegation_json(&d), as_json);
        Ok(())
    };
    match cmd.command {
        DelegateSub::Create {
            user_token,
            agent,
            bounds,
        } => {
            let request = pb::CreateDelegationRequest {
                user_token,
                ..bounds.request(agent)?
            };
            let r = client
                .authz(|mut c| {
                    let r = request.clone();
                    async move { c.create_delegation(r).await }
                })
                .await?;
            show(r.delegation)
        }
        DelegateSub::Sub {
            agent_key,
            agent,
            parent,
            to,
            bounds,
        } => {
            let identity = AgentIdentity::load(&agent, &agent_key)?;
            let request = pb::CreateDelegationRequest {
                agent_assertion: identity.assertion(&client).await?,
                parent_id: parent,
                ..bounds.request(to)?
            };
            let r = client
                .authz(|mut c| {
                    let r = request.clone();
                    async move { c.create_delegation(r).await }
                })
                .await?;
            show(r.delegation)
        }
        DelegateSub::List {
            user_token,
            user,
            agent,
        } => {
            let request = pb::ListDelegationsRequest {
                user: user.unwrap_or_default(),
                agent: agent.unwrap_or_default(),
                user_token: user_token.unwrap_or_default(),
            };
            let r = client
                .authz(|mut c| {
                    let r = request.clone();
                    async move { c.list_delegations(r).await }
                })
                .await?;
            if as_json {
                print(
                    &json!({ "delegations": r.delegations.iter().map(delegation_json).collect::<Vec<_>>() }),
                    true,
                );
            } else {
                for d in &r.delegations {
                    println!(
                        "{}\t{}\t{}\t{}\t{}",
                        d.id,
                        d.user,
                        d.agent,
                        d.actions.join(","),
                        status_name(pb::DelegationStatus::try_from(d.status))
                    );
                }
            }
            Ok(())
        }
        DelegateSub::Get { id, user_token } => {
            let request = pb::GetDelegationRequest {
                id,
                user_token: user_token.unwrap_or_default(),
            };
            let r = client
                .authz(|mut c| {
                    let r = request.clone();
                    async move { c.get_delegation(r).await }
                })
                .await?;
            show(r.delegation)
        }
        DelegateSub::Revoke {
            id,
            user_token,
            agent,
            agent_key,
        } => {
            let request = pb::RevokeDelegationRequest {
                id,
                user_token: user_token.unwrap_or_default(),
                agent_assertion: assertion_for(&client, agent.as_ref(), agent_key.as_ref()).await?,
            };
            let r = client
                .authz(|mut c| {
                    let r = request.clone();
                    async move { c.revoke_delegation(r).await }
                })
                .await?;
            print(
                &json!({ "revoked_delegation_ids": r.revoked_delegation_ids, "revoked_grant_ids": r.revoked_grant_ids, "applied_index": r.applied_index }),
                as_json,
            );
            Ok(())
        }
    }
}

// ------------------------------------------------------------------ authorize

#[derive(Args, Debug)]
pub struct AuthorizeArgs {
    #[arg(long)]
    agent: String,
    /// The agent's private key (PKCS#8 PEM).
    #[arg(long)]
    agent_key: PathBuf,
    #[arg(long)]
    delegation: String,
    #[arg(long)]
    action: String,
    #[arg(long)]
    resource: String,
    /// Request context, key=value (repeatable).
    #[arg(long = "context")]
    context: Vec<String>,
    /// Grant lifetime (default 60s).
    #[arg(long)]
    ttl: Option<String>,
    /// Grant uses (default 1).
    #[arg(long, default_value_t = 0)]
    uses: u32,
    #[arg(long, default_value = "")]
    audience: String,
    /// On pending, wait for the user's decision.
    #[arg(long)]
    wait: bool,
    /// How long --wait waits.
    #[arg(long, default_value = "10m")]
    wait_timeout: String,
    #[command(flatten)]
    connection: Connection,
}

pub async fn authorize(args: AuthorizeArgs) -> Result<(), Failure> {
    let client = args.connection.client()?;
    let identity = AgentIdentity::load(&args.agent, &args.agent_key)?;
    let context = parse_context(&args.context)?;
    let request = pb::AuthorizeRequest {
        agent_assertion: identity.assertion(&client).await?,
        delegation_id: args.delegation,
        action: args.action,
        resource: args.resource,
        context,
        ttl_seconds: args
            .ttl
            .as_deref()
            .map(parse_duration)
            .transpose()?
            .unwrap_or(0),
        uses: args.uses,
        audience: args.audience,
    };
    let mut r = client
        .authz(|mut c| {
            let r = request.clone();
            async move { c.authorize(r).await }
        })
        .await?;
    if args.wait && r.decision == pb::Decision::Pending as i32 {
        let deadline =
            std::time::Instant::now() + Duration::from_secs(parse_duration(&args.wait_timeout)?);
        eprintln!(
            "mandate: waiting for the user to decide approval {}",
            r.approval_id
        );
        while r.decision == pb::Decision::Pending as i32 && std::time::Instant::now() < deadline {
            let request = pb::GetApprovalRequest {
                agent_assertion: identity.assertion(&client).await?,
                approval_id: r.approval_id.clone(),
                wait_ms: APPROVAL_POLL_MS.min(
                    u64::try_from(
                        deadline
                            .saturating_duration_since(std::time::Instant::now())
                            .as_millis(),
                    )
                    .unwrap_or(APPROVAL_POLL_MS),
                ),
            };
            r = client
                .authz(|mut c| {
                    let r = request.clone();
                    async move { c.get_approval(r).await }
                })
                .await?;
        }
    }
    print(&decision_json(&r), args.connection.json);
    Ok(())
}

/// `--context key=value` arguments as a map.
fn parse_context(pairs: &[String]) -> Result<std::collections::BTreeMap<String, String>, Failure> {
    pairs
        .iter()
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .ok_or_else(|| Failure(format!("--context {kv:?}: expected key=value")))
        })
        .collect()
}

#[derive(Args, Debug)]
pub struct CheckArgs {
    /// The acting agent (the delegation's holder).
    #[arg(long)]
    agent: String,
    #[arg(long)]
    delegation: String,
    #[arg(long)]
    action: String,
    #[arg(long)]
    resource: String,
    /// Request context, key=value (repeatable).
    #[arg(long = "context")]
    context: Vec<String>,
    /// Decide from this node's applied state, with no round trip to the leader.
    #[arg(long)]
    stale: bool,
    #[command(flatten)]
    connection: Connection,
}

/// `mandate check`: what an authorization would decide now, issuing nothing (operator token).
pub async fn check(args: CheckArgs) -> Result<(), Failure> {
    let client = args.connection.client()?;
    let request = pb::CheckRequest {
        items: vec![pb::CheckItem {
            agent: args.agent,
            delegation_id: args.delegation,
            action: args.action,
            resource: args.resource,
            context: parse_context(&args.context)?,
        }],
        read: args.stale.then_some(pb::ReadOptions {
            consistency: pb::ReadConsistency::Stale as i32,
            min_applied_index: 0,
        }),
    };
    let r = client
        .authz(|mut c| {
            let r = request.clone();
            async move { c.check(r).await }
        })
        .await?;
    let result = r
        .results
        .first()
        .ok_or_else(|| Failure("the node returned no decision".into()))?;
    print(
        &json!({
            "decision": mandate_core::audit::decision_name(result.decision),
            "reasons": result.reasons,
            "policy_ids": result.policy_ids,
            "applied_index": r.applied_index,
        }),
        args.connection.json,
    );
    Ok(())
}

/// The longest one poll for an approval's outcome asks the node to hold it: well inside the
/// client's bound on a call, so a long wait is a series of answered polls.
pub const APPROVAL_POLL_MS: u64 = mandate_client::REQUEST_TIMEOUT_MS - 5_000;

// ------------------------------------------------------------------ approvals

#[derive(Args, Debug)]
pub struct ApprovalCommand {
    #[command(subcommand)]
    command: ApprovalSub,
    #[command(flatten)]
    connection: Connection,
}

#[derive(Subcommand, Debug)]
enum ApprovalSub {
    /// The user's approvals.
    List {
        #[arg(long)]
        user_token: String,
        /// Only those still waiting.
        #[arg(long)]
        pending: bool,
    },
    /// Approve: the agent receives its grant.
    Approve {
        id: String,
        #[arg(long)]
        user_token: String,
    },
    /// Deny: the agent's request is refused.
    Deny {
        id: String,
        #[arg(long)]
        user_token: String,
    },
}

pub async fn approval(cmd: ApprovalCommand) -> Result<(), Failure> {
    let as_json = cmd.connection.json;
    let client = cmd.connection.client()?;
    let (id, user_token, approve) = match cmd.command {
        ApprovalSub::List {
            user_token,
            pending,
        } => {
            let request = pb::ListApprovalsRequest {
                user_token,
                pending_only: pending,
            };
            let r = client
                .authz(|mut c| {
                    let r = request.clone();
                    async move { c.list_approvals(r).await }
                })
                .await?;
            if as_json {
                print(
                    &json!({ "approvals": r.approvals.iter().map(approval_json).collect::<Vec<_>>() }),
                    true,
                );
            } else {
                for a in &r.approvals {
                    println!(
                        "{}\t{}\t{} {}\t{}",
                        a.id,
                        a.agent,
                        a.action,
                        a.resource,
                        status_name(pb::ApprovalStatus::try_from(a.status))
                    );
                }
            }
            return Ok(());
        }
        ApprovalSub::Approve { id, user_token } => (id, user_token, true),
        ApprovalSub::Deny { id, user_token } => (id, user_token, false),
    };
    let request = pb::DecideApprovalRequest {
        user_token,
        approval_id: id,
        approve,
    };
    let r = client
        .authz(|mut c| {
            let r = request.clone();
            async move { c.decide_approval(r).await }
        })
        .await?;
    let approval = r
        .approval
        .ok_or_else(|| Failure("no approval returned".into()))?;
    print(&approval_json(&approval), as_json);
    Ok(())
}

// ------------------------------------------------------------------ grants

#[derive(Args, Debug)]
pub struct GrantCommand {
    #[command(subcommand)]
    command: GrantSub,
    #[command(flatten)]
    connection: Connection,
}

#[derive(Subcommand, Debug)]
enum GrantSub {
    /// Use one use of a grant (the resource side); fails once it is used up.
    Consume { token: String },
    /// The agent ends its task: the grant dies.
    Complete {
        grant_id: String,
        #[arg(long)]
        agent: String,
        #[arg(long)]
        agent_key: PathBuf,
    },
    /// Revoke a grant (as an operator, the user with --user-token, or the agent).
    Revoke {
        grant_id: String,
        #[arg(long)]
        user_token: Option<String>,
        #[arg(long, requires = "agent_key")]
        agent: Option<String>,
        #[arg(long)]
        agent_key: Option<PathBuf>,
    },
    /// RFC 7662 introspection: JSON with `active`.
    Introspect { token: String },
}

pub async fn grant(cmd: GrantCommand) -> Result<(), Failure> {
    let as_json = cmd.connection.json;
    let client = cmd.connection.client()?;
    let show = |r: pb::GrantResponse| -> Result<(), Failure> {
        let g = r.grant.ok_or_else(|| Failure("no grant returned".into()))?;
        print(&grant_json(&g), as_json);
        Ok(())
    };
    match cmd.command {
        GrantSub::Consume { token } => {
            let r = client
                .authz(|mut c| {
                    let token = token.clone();
                    async move { c.consume(pb::ConsumeRequest { token }).await }
                })
                .await?;
            show(r)
        }
        GrantSub::Complete {
            grant_id,
            agent,
            agent_key,
        } => {
            let assertion = AgentIdentity::load(&agent, &agent_key)?
                .assertion(&client)
                .await?;
            let request = pb::GrantIdRequest {
                grant_id,
                agent_assertion: assertion,
                user_token: String::new(),
            };
            let r = client
                .authz(|mut c| {
                    let r = request.clone();
                    async move { c.complete(r).await }
                })
                .await?;
            show(r)
        }
        GrantSub::Revoke {
            grant_id,
            user_token,
            agent,
            agent_key,
        } => {
            let request = pb::GrantIdRequest {
                grant_id,
                agent_assertion: assertion_for(&client, agent.as_ref(), agent_key.as_ref()).await?,
                user_token: user_token.unwrap_or_default(),
            };
            let r = client
                .authz(|mut c| {
                    let r = request.clone();
                    async move { c.revoke_grant(r).await }
                })
                .await?;
            show(r)
        }
        GrantSub::Introspect { token } => {
            let r = client
                .authz(|mut c| {
                    let token = token.clone();
                    async move { c.introspect(pb::IntrospectRequest { token }).await }
                })
                .await?;
            let v: Value = serde_json::from_str(&r.json).map_err(|e| Failure(e.to_string()))?;
            print(&v, as_json);
            Ok(())
        }
    }
}

// ------------------------------------------------------------------ secrets, keys, issuers

#[derive(Args, Debug)]
pub struct SecretCommand {
    #[command(subcommand)]
    command: SecretSub,
    #[command(flatten)]
    connection: Connection,
}

#[derive(Subcommand, Debug)]
enum SecretSub {
    /// Write a new version of a secret (operators, or a user the policies permit `write`).
    Put {
        path: String,
        value: String,
        /// Write as this user (a user JWT) instead of with the operator token.
        #[arg(long)]
        user_token: Option<String>,
    },
    /// Read a secret with a grant token for `read` on exactly that path (uses the grant).
    Read {
        path: String,
        #[arg(long)]
        token: String,
    },
}

pub async fn secret(cmd: SecretCommand) -> Result<(), Failure> {
    let as_json = cmd.connection.json;
    let client = cmd.connection.client()?;
    match cmd.command {
        SecretSub::Put {
            path,
            value,
            user_token,
        } => {
            let request = pb::PutSecretRequest {
                path,
                value: value.into_bytes(),
                user_token: user_token.unwrap_or_default(),
            };
            let r = client
                .authz(|mut c| {
                    let r = request.clone();
                    async move { c.put_secret(r).await }
                })
                .await?;
            print(
                &json!({ "path": r.path, "version": r.version, "applied_index": r.applied_index }),
                as_json,
            );
        }
        SecretSub::Read { path, token } => {
            let request = pb::ReadSecretRequest { path, token };
            let r = client
                .authz(|mut c| {
                    let r = request.clone();
                    async move { c.read_secret(r).await }
                })
                .await?;
            let value = String::from_utf8_lossy(&r.value).into_owned();
            if as_json {
                print(
                    &json!({ "path": r.path, "version": r.version, "value": value }),
                    true,
                );
            } else {
                println!("{value}");
            }
        }
    }
    Ok(())
}

#[derive(Args, Debug)]
pub struct KeysCommand {
    #[command(subcommand)]
    command: KeysSub,
    #[command(flatten)]
    connection: Connection,
}

#[derive(Subcommand, Debug)]
enum KeysSub {
    /// Add a new token-signing key and make it active; older keys stay published.
    Rotate,
    /// Print the published JWKS.
    Jwks,
}

pub async fn keys(cmd: KeysCommand) -> Result<(), Failure> {
    let client = cmd.connection.client()?;
    let r = match cmd.command {
        KeysSub::Rotate => {
            client
                .authz(|mut c| async move { c.rotate_keys(pb::RotateKeysRequest {}).await })
                .await?
        }
        KeysSub::Jwks => {
            client
                .authz(|mut c| async move { c.jwks(pb::JwksRequest {}).await })
                .await?
        }
    };
    let jwks: Value = serde_json::from_str(&r.jwks_json).map_err(|e| Failure(e.to_string()))?;
    print(
        &json!({ "active_kid": r.active_kid, "issuer": r.grant_issuer, "cluster_id": r.cluster_id, "jwks": jwks }),
        cmd.connection.json,
    );
    Ok(())
}

#[derive(Args, Debug)]
pub struct IssuerCommand {
    #[command(subcommand)]
    command: IssuerSub,
    #[command(flatten)]
    connection: Connection,
}

#[derive(Subcommand, Debug)]
enum IssuerSub {
    /// Trust an issuer of user tokens.
    Put {
        name: String,
        #[arg(long)]
        issuer: String,
        #[arg(long)]
        audience: String,
        /// The issuer's JWKS (a file holding {"keys": [...]}).
        #[arg(long)]
        jwks_file: PathBuf,
        #[arg(long, default_value_t = 30)]
        leeway_secs: u64,
    },
    /// List trusted issuers.
    List,
}

pub async fn issuer(cmd: IssuerCommand) -> Result<(), Failure> {
    let as_json = cmd.connection.json;
    let client = cmd.connection.client()?;
    match cmd.command {
        IssuerSub::Put {
            name,
            issuer,
            audience,
            jwks_file,
            leeway_secs,
        } => {
            let trusted = pb::TrustedIssuer {
                name,
                issuer,
                audience,
                jwks_json: read_file(&jwks_file)?,
                leeway_s: leeway_secs,
            };
            put_issuer(&client, trusted).await?;
            print(&json!({ "stored": true }), as_json);
        }
        IssuerSub::List => {
            let r = client
                .authz(|mut c| async move { c.list_issuers(pb::ListIssuersRequest {}).await })
                .await?;
            let list: Vec<Value> = r.issuers.iter().map(|i| json!({ "name": i.name, "issuer": i.issuer, "audience": i.audience, "leeway_s": i.leeway_s })).collect();
            print(&json!({ "issuers": list }), as_json);
        }
    }
    Ok(())
}

/// Stores a trusted issuer.
pub async fn put_issuer(client: &Client, issuer: pb::TrustedIssuer) -> Result<(), Failure> {
    client
        .authz(|mut c| {
            let issuer = issuer.clone();
            async move {
                c.put_issuer(pb::PutIssuerRequest {
                    issuer: Some(issuer),
                })
                .await
            }
        })
        .await?;
    Ok(())
}

/// Trusts a freshly generated issuer named `<label>-<run>` (iss `mandate-<label>-<run>`,
/// aud `mandate`); returns its signing key and `iss`.
pub async fn trust_new_issuer(
    client: &Client,
    label: &str,
    run: &str,
) -> Result<(ed25519_dalek::SigningKey, String), Failure> {
    let key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
    let issuer = format!("mandate-{label}-{run}");
    put_issuer(
        client,
        pb::TrustedIssuer {
            name: format!("{label}-{run}"),
            issuer: issuer.clone(),
            audience: "mandate".into(),
            jwks_json: identity::jwks_of(&key),
            leeway_s: 30,
        },
    )
    .await?;
    Ok((key, issuer))
}

/// Registers an agent; returns its record.
pub async fn register_agent(
    client: &Client,
    request: pb::RegisterAgentRequest,
) -> Result<pb::Agent, Failure> {
    client
        .registry(|mut c| {
            let r = request.clone();
            async move { c.register(r).await }
        })
        .await?
        .agent
        .ok_or_else(|| Failure("no agent returned".into()))
}

/// Creates a delegation; returns its record.
pub async fn create_delegation(
    client: &Client,
    request: pb::CreateDelegationRequest,
) -> Result<pb::Delegation, Failure> {
    client
        .authz(|mut c| {
            let r = request.clone();
            async move { c.create_delegation(r).await }
        })
        .await?
        .delegation
        .ok_or_else(|| Failure("no delegation returned".into()))
}

/// Stores (or replaces) a policy document.
pub async fn put_policy(client: &Client, name: &str, text: &str) -> Result<(), Failure> {
    let policy = pb::PutPolicyRequest {
        name: name.into(),
        text: text.into(),
    };
    client
        .authz(|mut c| {
            let r = policy.clone();
            async move { c.put_policy(r).await }
        })
        .await?;
    Ok(())
}

/// The development issuer, trusting `key`.
pub fn dev_issuer(key: &ed25519_dalek::SigningKey) -> pb::TrustedIssuer {
    pb::TrustedIssuer {
        name: "dev".into(),
        issuer: identity::DEV_ISSUER.into(),
        audience: identity::DEV_AUDIENCE.into(),
        jwks_json: identity::jwks_of(key),
        leeway_s: 30,
    }
}
