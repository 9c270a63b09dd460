//! The `Authz` gRPC service: issuers, policies, delegations, authorization, approvals, grants,
//! signing keys and secrets.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use mandate_core::pb::{self, command::Kind, event::Kind as EventKind};
use mandate_core::state::{decode, StateExt};
use mandate_core::{authz, keys, policy, validate, AgentId, DomainError};
use mandate_proto::v1::authz_server::Authz;
use mandate_proto::v1::*;
use mandate_raft::{Node, ReadConsistency};
use tonic::{Request, Response, Status};

use crate::config::GrantConfig;
use crate::refusals::Refusals;
use crate::registry_service::{check_size, read_barrier};
use crate::sealing::AuditHasher;
use crate::server::{submit, submit_as, Principal};
use crate::tokens::{self, Signer};
use crate::{auth, status};

thread_local! {
    /// Each worker thread's parsed policies and chain entities for `Check` and for the
    /// verdicts `Authorize` hands to apply (apply keeps its own); every cache entry is keyed by
    /// the version of what it was built from.
    static CHECK_ENGINE: std::cell::RefCell<policy::Engine> =
        std::cell::RefCell::new(policy::Engine::default());
}

/// Longest an agent may wait for an approval in one call.
pub const APPROVAL_WAIT_MS_MAX: u64 = 60_000;

/// Delegation, policy and authorization, served by every node.
pub struct AuthzService {
    node: Arc<Node>,
    hasher: AuditHasher,
    signer: Arc<Signer>,
    grants: GrantConfig,
    refusals: Arc<Refusals>,
}

fn domain(e: DomainError) -> Status {
    status::from_domain(&e)
}

fn fault(e: mandate_core::StorageFault) -> Status {
    status::from_fault(&e)
}

fn now_ms() -> u64 {
    mandate_raft::stamp::now_ms()
}

impl AuthzService {
    pub fn new(
        node: Arc<Node>,
        signer: Arc<Signer>,
        grants: GrantConfig,
        hasher: AuditHasher,
        refusals: Arc<Refusals>,
    ) -> Self {
        AuthzService {
            node,
            hasher,
            signer,
            grants,
            refusals,
        }
    }

    /// The grant lifetime and uses to ask apply for, within this node's configured limits.
    fn grant_terms(&self, ttl_seconds: u64, uses: u32) -> Result<(u64, u32), Status> {
        let ttl = if ttl_seconds == 0 {
            self.grants.ttl_s_default
        } else {
            ttl_seconds
        };
        if ttl > self.grants.ttl_s_max {
            return Err(domain(DomainError::invalid(
                "ttl_seconds",
                format!("is at most {} on this cluster", self.grants.ttl_s_max),
            )));
        }
        if uses > self.grants.uses_max {
            return Err(domain(DomainError::invalid(
                "uses",
                format!("is at most {} on this cluster", self.grants.uses_max),
            )));
        }
        Ok((ttl * 1000, uses))
    }

    fn cluster_id(&self) -> Result<String, Status> {
        self.node
            .view
            .cluster()
            .map_err(fault)?
            .map(|c| c.cluster_id)
            .ok_or_else(|| {
                domain(DomainError::precondition(
                    "cluster",
                    "is not initialised yet",
                ))
            })
    }

    async fn linearizable(&self) -> Result<u64, Status> {
        self.node
            .read_barrier(ReadConsistency::Linearizable, 0)
            .await
            .map_err(|e| status::from_node(&e))
    }

    async fn caught_up(&self, index: u64) -> Result<(), Status> {
        self.node
            .wait_applied(index)
            .await
            .map(|_| ())
            .map_err(|e| status::from_node(&e))
    }

    async fn user(&self, token: &str) -> Result<String, Status> {
        match tokens::verify_user_token(&self.node.view, token) {
            Ok(user) => Ok(user),
            // An issuer registered moments ago elsewhere: catch up once before refusing.
            Err(_) => {
                self.linearizable().await?;
                tokens::verify_user_token(&self.node.view, token).map_err(|e| {
                    self.refusals
                        .user(tokens::claimed(token, "sub").as_deref(), &e.message);
                    domain(e)
                })
            }
        }
    }

    async fn agent(&self, assertion: &str) -> Result<tokens::VerifiedAgent, Status> {
        let cluster_id = self.cluster_id()?;
        match tokens::verify_agent_assertion(&self.node.view, &cluster_id, assertion) {
            Ok(a) => Ok(a),
            Err(_) => {
                self.linearizable().await?;
                tokens::verify_agent_assertion(&self.node.view, &cluster_id, assertion).map_err(
                    |e| {
                        self.refusals
                            .agent(tokens::claimed(assertion, "iss").as_deref(), &e.message);
                        domain(e)
                    },
                )
            }
        }
    }

    /// The caller of a call that operators, users and agents may make.
    async fn principal(
        &self,
        metadata: &tonic::metadata::MetadataMap,
        user_token: &str,
        agent_assertion: &str,
    ) -> Result<Principal, Status> {
        if !user_token.is_empty() {
            return Ok(Principal::User(self.user(user_token).await?));
        }
        if !agent_assertion.is_empty() {
            return Ok(Principal::agent(self.agent(agent_assertion).await?));
        }
        let token = auth::operator(&self.node, &self.refusals, metadata).await?;
        Ok(Principal::Operator(token.id))
    }

    fn sign(&self, grant: &pb::Grant) -> Result<String, Status> {
        let cluster_id = self.cluster_id()?;
        self.signer
            .sign_grant(&self.node.view, &cluster_id, grant)
            .map_err(domain)
    }

    /// The response for an approval as the agent sees it.
    fn approval_response(
        &self,
        approval: &pb::Approval,
        index: u64,
    ) -> Result<AuthorizeResponse, Status> {
        let status = pb::ApprovalStatus::try_from(approval.status)
            .unwrap_or(pb::ApprovalStatus::Unspecified);
        let mut response = AuthorizeResponse {
            decision: match status {
                pb::ApprovalStatus::Pending => pb::Decision::Pending,
                pb::ApprovalStatus::Approved => pb::Decision::Allow,
                _ => pb::Decision::Deny,
            } as i32,
            reasons: approval.reasons.clone(),
            approval_id: approval.id.clone(),
            approval_status: approval.status,
            applied_index: index,
            ..Default::default()
        };
        if status == pb::ApprovalStatus::Approved {
            let grant = authz::grant_record(&self.node.view, &approval.grant_id)
                .map_err(fault)?
                .ok_or_else(|| {
                    domain(DomainError::precondition(
                        "approval_id",
                        format!(
                            "the grant approval {} issued, {}, has expired",
                            approval.id, approval.grant_id
                        ),
                    ))
                })?;
            response.token = self.sign(&grant)?;
            response.grant = Some(grant);
        }
        Ok(response)
    }

    fn list_index<M: prost::Message + Default>(
        &self,
        index_prefix: &[u8],
        owner: &str,
        record: fn(&str) -> Vec<u8>,
    ) -> Result<Vec<M>, Status> {
        let mut prefix = index_prefix.to_vec();
        prefix.extend_from_slice(owner.as_bytes());
        prefix.push(b'/');
        let mut out = Vec::new();
        for item in self.node.view.scan(&prefix, &prefix) {
            let (key, _) = item.map_err(fault)?;
            let record_key = record(&keys::last_segment(&key));
            if let Some(bytes) =
                mandate_core::state::StateRead::get(&self.node.view, &record_key).map_err(fault)?
            {
                out.push(decode(&record_key, &bytes).map_err(fault)?);
            }
        }
        Ok(out)
    }
}

#[tonic::async_trait]
impl Authz for AuthzService {
    async fn put_issuer(
        &self,
        request: Request<PutIssuerRequest>,
    ) -> Result<Response<IssuerResponse>, Status> {
        let token = auth::operator(&self.node, &self.refusals, request.metadata()).await?;
        check_size(request.get_ref())?;
        let issuer = request
            .into_inner()
            .issuer
            .ok_or_else(|| domain(DomainError::invalid("issuer", "is required")))?;
        validate::issuer(&issuer).map_err(domain)?;
        tokens::check_jwks(&issuer.jwks_json).map_err(domain)?;
        let (_, index) = submit(
            &self.node,
            &self.hasher,
            &token,
            Kind::PutIssuer(pb::PutIssuer {
                issuer: Some(issuer.clone()),
            }),
        )
        .await?;
        Ok(Response::new(IssuerResponse {
            issuer: Some(issuer),
            applied_index: index,
        }))
    }

    async fn list_issuers(
        &self,
        request: Request<ListIssuersRequest>,
    ) -> Result<Response<ListIssuersResponse>, Status> {
        auth::operator(&self.node, &self.refusals, request.metadata()).await?;
        self.linearizable().await?;
        let issuers = self
            .node
            .view
            .scan(keys::ISSUER_PREFIX, keys::ISSUER_PREFIX)
            .map(|item| item.and_then(|(k, v)| decode(&k, &v)).map_err(fault))
            .collect::<Result<_, _>>()?;
        Ok(Response::new(ListIssuersResponse { issuers }))
    }

    async fn put_policy(
        &self,
        request: Request<PutPolicyRequest>,
    ) -> Result<Response<PolicyResponse>, Status> {
        let token = auth::operator(&self.node, &self.refusals, request.metadata()).await?;
        check_size(request.get_ref())?;
        let r = request.into_inner();
        policy::document_name(&r.name).map_err(domain)?;
        policy::parse_document(&r.name, &r.text)
            .map_err(|p| domain(policy::problems_error("text", &p)))?;
        let (applied, index) = submit(
            &self.node,
            &self.hasher,
            &token,
            Kind::PutPolicy(pb::PutPolicy {
                name: r.name,
                text: r.text,
            }),
        )
        .await?;
        Ok(Response::new(PolicyResponse {
            policy: applied.policy,
            applied_index: index,
        }))
    }

    async fn get_policy(
        &self,
        request: Request<PolicyNameRequest>,
    ) -> Result<Response<PolicyResponse>, Status> {
        auth::operator(&self.node, &self.refusals, request.metadata()).await?;
        let name = request.into_inner().name;
        policy::document_name(&name).map_err(domain)?;
        let index = self.linearizable().await?;
        let key = keys::policy(&name);
        let doc = mandate_core::state::StateRead::get(&self.node.view, &key)
            .map_err(fault)?
            .map(|b| decode(&key, &b))
            .transpose()
            .map_err(fault)?
            .ok_or_else(|| {
                domain(DomainError::not_found(
                    "name",
                    format!("no policy document {name:?}"),
                ))
            })?;
        Ok(Response::new(PolicyResponse {
            policy: Some(doc),
            applied_index: index,
        }))
    }

    async fn list_policies(
        &self,
        request: Request<ListPoliciesRequest>,
    ) -> Result<Response<ListPoliciesResponse>, Status> {
        auth::operator(&self.node, &self.refusals, request.metadata()).await?;
        self.linearizable().await?;
        let policies = policy::documents(&self.node.view).map_err(fault)?;
        let version = policy::policy_version(&self.node.view).map_err(fault)?;
        Ok(Response::new(ListPoliciesResponse { policies, version }))
    }

    async fn delete_policy(
        &self,
        request: Request<PolicyNameRequest>,
    ) -> Result<Response<DeletePolicyResponse>, Status> {
        let token = auth::operator(&self.node, &self.refusals, request.metadata()).await?;
        let name = request.into_inner().name;
        policy::document_name(&name).map_err(domain)?;
        let (_, index) = submit(
            &self.node,
            &self.hasher,
            &token,
            Kind::DeletePolicy(pb::DeletePolicy { name }),
        )
        .await?;
        Ok(Response::new(DeletePolicyResponse {
            applied_index: index,
        }))
    }

    async fn validate_policy(
        &self,
        request: Request<ValidatePolicyRequest>,
    ) -> Result<Response<ValidatePolicyResponse>, Status> {
        auth::operator(&self.node, &self.refusals, request.metadata()).await?;
        check_size(request.get_ref())?;
        let text = request.into_inner().text;
        Ok(Response::new(
            match policy::parse_document("candidate", &text) {
                Ok(policies) => ValidatePolicyResponse {
                    valid: true,
                    problems: vec![],
                    policy_ids: policies.iter().map(|p| p.id().to_string()).collect(),
                },
                Err(problems) => ValidatePolicyResponse {
                    valid: false,
                    problems: problems
                        .into_iter()
                        .map(|p| PolicyProblem {
                            message: p.message,
                            line: p.line,
                            column: p.column,
                        })
                        .collect(),
                    policy_ids: vec![],
                },
            },
        ))
    }

    async fn create_delegation(
        &self,
        request: Request<CreateDelegationRequest>,
    ) -> Result<Response<DelegationResponse>, Status> {
        check_size(request.get_ref())?;
        let r = request.into_inner();
        let principal = match (r.user_token.is_empty(), r.agent_assertion.is_empty()) {
            (false, true) => Principal::User(self.user(&r.user_token).await?),
            (true, false) => Principal::agent(self.agent(&r.agent_assertion).await?),
            _ => return Err(domain(DomainError::unauthenticated("give exactly one of user_token (a user delegates) or agent_assertion (an agent re-delegates)"))),
        };
        let command = pb::CreateDelegation {
            delegation_id: String::new(),
            parent_id: r.parent_id,
            agent: r.agent,
            actions: r.actions,
            resources: r.resources,
            purpose: r.purpose,
            ttl_ms: r.ttl_seconds.saturating_mul(1000),
            max_uses: r.max_uses,
            may_redelegate: r.may_redelegate,
            max_depth: r.max_depth,
            approval_actions: r.approval_actions,
        };
        authz::delegation_shape(&command).map_err(domain)?;
        let (applied, index) = submit_as(
            &self.node,
            &self.hasher,
            principal,
            Kind::CreateDelegation(command),
        )
        .await?;
        Ok(Response::new(DelegationResponse {
            delegation: applied.delegation,
            applied_index: index,
        }))
    }

    async fn get_delegation(
        &self,
        request: Request<GetDelegationRequest>,
    ) -> Result<Response<DelegationResponse>, Status> {
        let principal = self
            .principal(request.metadata(), &request.get_ref().user_token, "")
            .await?;
        let id = request.into_inner().id;
        let index = self.linearizable().await?;
        let d = authz::delegation_record(&self.node.view, &id)
            .map_err(fault)?
            .ok_or_else(|| domain(DomainError::not_found("id", format!("no delegation {id}"))))?;
        if let Principal::User(u) = &principal {
            if *u != d.user {
                return Err(domain(DomainError::not_found(
                    "id",
                    format!("no delegation {id}"),
                )));
            }
        }
        Ok(Response::new(DelegationResponse {
            delegation: Some(d),
            applied_index: index,
        }))
    }

    async fn list_delegations(
        &self,
        request: Request<ListDelegationsRequest>,
    ) -> Result<Response<ListDelegationsResponse>, Status> {
        let principal = self
            .principal(request.metadata(), &request.get_ref().user_token, "")
            .await?;
        let r = request.into_inner();
        self.linearizable().await?;
        let delegations = match (&principal, r.user.is_empty(), r.agent.is_empty()) {
            (Principal::User(u), _, _) => {
                let mut all: Vec<pb::Delegation> =
                    self.list_index(keys::DELEGATION_BY_USER_PREFIX, u, keys::delegation)?;
                if !r.agent.is_empty() {
                    all.retain(|d| d.agent == r.agent);
                }
                all
            }
            (_, false, _) => {
                self.list_index(keys::DELEGATION_BY_USER_PREFIX, &r.user, keys::delegation)?
            }
            (_, true, false) => {
                AgentId::parse("agent", &r.agent).map_err(domain)?;
                self.list_index(keys::DELEGATION_BY_AGENT_PREFIX, &r.agent, keys::delegation)?
            }
            _ => {
                return Err(domain(DomainError::invalid(
                    "user",
                    "name a user or an agent to list delegations for",
                )))
            }
        };
        Ok(Response::new(ListDelegationsResponse { delegations }))
    }

    async fn revoke_delegation(
        &self,
        request: Request<RevokeDelegationRequest>,
    ) -> Result<Response<RevokeDelegationResponse>, Status> {
        let r = request.get_ref();
        let principal = self
            .principal(request.metadata(), &r.user_token, &r.agent_assertion)
            .await?;
        let id = request.into_inner().id;
        if id.is_empty() {
            return Err(domain(DomainError::invalid("id", "must not be empty")));
        }
        let (applied, index) = submit_as(
            &self.node,
            &self.hasher,
            principal,
            Kind::RevokeDelegation(pb::RevokeDelegation { delegation_id: id }),
        )
        .await?;
        let mut response = RevokeDelegationResponse {
            applied_index: index,
            ..Default::default()
        };
        for event in applied.events {
            if let Some(EventKind::DelegationsRevoked(e)) = event.kind {
                response.revoked_delegation_ids = e.delegation_ids;
                response.revoked_grant_ids = e.grant_ids;
            }
        }
        Ok(Response::new(response))
    }

    async fn authorize(
        &self,
        request: Request<AuthorizeRequest>,
    ) -> Result<Response<AuthorizeResponse>, Status> {
        check_size(request.get_ref())?;
        let r = request.into_inner();
        let agent = self.agent(&r.agent_assertion).await?;
        let (ttl_ms, uses) = self.grant_terms(r.ttl_seconds, r.uses)?;
        let mut command = pb::Authorize {
            delegation_id: r.delegation_id,
            action: r.action,
            resource: r.resource,
            request_context: r.context.into_iter().collect::<BTreeMap<_, _>>(),
            ttl_ms,
            uses,
            assertion_kid: agent.kid,
            assertion_jti: agent.jti,
            assertion_expires_ms: agent.expires_ms,
            grant_id: String::new(),
            approval_id: String::new(),
            audience: r.audience,
            predecision: None,
        };
        authz::authorize_shape(&command).map_err(domain)?;
        // Ask the policies here, once, rather than in every node's apply: apply takes this
        // verdict when nothing it was made from has changed by then.
        let req = authz::AuthorizeRequest {
            delegation_id: &command.delegation_id,
            action: &command.action,
            resource: &command.resource,
            request_context: &command.request_context,
            approved: false,
        };
        let predecision = CHECK_ENGINE
            .with(|engine| {
                authz::predecide(
                    &self.node.view,
                    &mut engine.borrow_mut(),
                    &agent.agent,
                    &req,
                    now_ms(),
                )
            })
            .map_err(fault)?;
        command.predecision = predecision;
        // The authorization records the jti in its own decision event.
        let principal = Principal::Agent {
            id: agent.agent.id,
            jti: String::new(),
            expires_ms: 0,
        };
        let (applied, index) = submit_as(
            &self.node,
            &self.hasher,
            principal,
            Kind::Authorize(command),
        )
        .await?;
        let decided = applied
            .decision
            .ok_or_else(|| Status::internal("apply returned no decision"))?;
        let mut response = AuthorizeResponse {
            decision: decided.decision,
            reasons: decided.reasons,
            policy_ids: decided.policy_ids,
            applied_index: index,
            ..Default::default()
        };
        if let Some(grant) = decided.grant {
            self.caught_up(index).await?;
            response.token = self.sign(&grant)?;
            response.grant = Some(grant);
        }
        if let Some(approval) = decided.approval {
            response.approval_id = approval.id;
            response.approval_status = approval.status;
        }
        Ok(Response::new(response))
    }

    async fn check(
        &self,
        request: Request<CheckRequest>,
    ) -> Result<Response<CheckResponse>, Status> {
        check_size(request.get_ref())?;
        auth::operator(&self.node, &self.refusals, request.metadata()).await?;
        let r = request.into_inner();
        authz::check_shape(&r.items).map_err(domain)?;
        let applied_index = read_barrier(&self.node, r.read.as_ref()).await?;
        let time_ms = now_ms();
        let results = CHECK_ENGINE.with(|engine| {
            let mut engine = engine.borrow_mut();
            r.items
                .iter()
                .map(|item| {
                    let req = authz::AuthorizeRequest {
                        delegation_id: &item.delegation_id,
                        action: &item.action,
                        resource: &item.resource,
                        request_context: &item.context,
                        approved: false,
                    };
                    authz::check(&self.node.view, &mut engine, &item.agent, &req, time_ms).map(
                        |e| CheckResult {
                            decision: e.decision as i32,
                            reasons: e.reasons,
                            policy_ids: e.policy_ids,
                        },
                    )
                })
                .collect::<Result<Vec<_>, _>>()
        });
        Ok(Response::new(CheckResponse {
            results: results.map_err(fault)?,
            applied_index,
        }))
    }

    async fn get_approval(
        &self,
        request: Request<GetApprovalRequest>,
    ) -> Result<Response<AuthorizeResponse>, Status> {
        let r = request.into_inner();
        let agent = self.agent(&r.agent_assertion).await?;
        let wait = Duration::from_millis(r.wait_ms.min(APPROVAL_WAIT_MS_MAX));
        let deadline = tokio::time::Instant::now() + wait;
        let mut applied = self.node.view.applied_watch();
        let mut index = self.linearizable().await?;
        loop {
            let approval = authz::approval_record(&self.node.view, &r.approval_id)
                .map_err(fault)?
                .filter(|a| a.agent == agent.agent.id)
                .ok_or_else(|| {
                    domain(DomainError::not_found(
                        "approval_id",
                        format!("no approval {} for this agent", r.approval_id),
                    ))
                })?;
            let pending = approval.status == pb::ApprovalStatus::Pending as i32;
            if !pending || tokio::time::Instant::now() >= deadline {
                return Ok(Response::new(self.approval_response(&approval, index)?));
            }
            if tokio::time::timeout_at(deadline, applied.changed())
                .await
                .is_err()
            {
                continue;
            }
            index = *applied.borrow();
        }
    }

    async fn list_approvals(
        &self,
        request: Request<ListApprovalsRequest>,
    ) -> Result<Response<ListApprovalsResponse>, Status> {
        let r = request.into_inner();
        let user = self.user(&r.user_token).await?;
        self.linearizable().await?;
        let mut approvals: Vec<pb::Approval> =
            self.list_index(keys::APPROVAL_BY_USER_PREFIX, &user, keys::approval)?;
        if r.pending_only {
            approvals.retain(|a| a.status == pb::ApprovalStatus::Pending as i32);
        }
        Ok(Response::new(ListApprovalsResponse { approvals }))
    }

    async fn decide_approval(
        &self,
        request: Request<DecideApprovalRequest>,
    ) -> Result<Response<ApprovalResponse>, Status> {
        let r = request.into_inner();
        let user = self.user(&r.user_token).await?;
        if r.approval_id.is_empty() {
            return Err(domain(DomainError::invalid(
                "approval_id",
                "must not be empty",
            )));
        }
        let kind = Kind::DecideApproval(pb::DecideApproval {
            approval_id: r.approval_id,
            approve: r.approve,
            grant_id: String::new(),
        });
        let (applied, index) =
            submit_as(&self.node, &self.hasher, Principal::User(user), kind).await?;
        Ok(Response::new(ApprovalResponse {
            approval: applied.approval,
            applied_index: index,
        }))
    }

    async fn consume(
        &self,
        request: Request<ConsumeRequest>,
    ) -> Result<Response<GrantResponse>, Status> {
        let token = request.into_inner().token;
        let grant_id = self.verified_grant_id(&token).await?;
        let kind = Kind::ConsumeGrant(pb::ConsumeGrant {
            grant_id,
            action: String::new(),
            resource: String::new(),
        });
        let (applied, index) = submit_as(&self.node, &self.hasher, Principal::Bearer, kind).await?;
        Ok(Response::new(GrantResponse {
            grant: applied.grant,
            applied_index: index,
        }))
    }

    async fn complete(
        &self,
        request: Request<GrantIdRequest>,
    ) -> Result<Response<GrantResponse>, Status> {
        let r = request.into_inner();
        let agent = self.agent(&r.agent_assertion).await?;
        self.end(Principal::agent(agent), r.grant_id, pb::GrantEnd::Complete)
            .await
    }

    async fn revoke_grant(
        &self,
        request: Request<GrantIdRequest>,
    ) -> Result<Response<GrantResponse>, Status> {
        let r = request.get_ref();
        let principal = self
            .principal(request.metadata(), &r.user_token, &r.agent_assertion)
            .await?;
        self.end(
            principal,
            request.into_inner().grant_id,
            pb::GrantEnd::Revoke,
        )
        .await
    }

    async fn introspect(
        &self,
        request: Request<IntrospectRequest>,
    ) -> Result<Response<IntrospectResponse>, Status> {
        let token = request.into_inner().token;
        let inactive = || {
            Response::new(IntrospectResponse {
                active: false,
                json: r#"{"active":false}"#.into(),
            })
        };
        let Ok(grant_id) = self.verified_grant_id(&token).await else {
            return Ok(inactive());
        };
        self.linearizable().await?;
        let Some(grant) = authz::grant_record(&self.node.view, &grant_id).map_err(fault)? else {
            return Ok(inactive());
        };
        let json = tokens::introspection(&self.cluster_id()?, &grant, now_ms());
        Ok(Response::new(IntrospectResponse {
            active: json["active"].as_bool().unwrap_or(false),
            json: json.to_string(),
        }))
    }

    async fn jwks(&self, _: Request<JwksRequest>) -> Result<Response<JwksResponse>, Status> {
        let (jwks, active) = tokens::jwks(&self.node.view).map_err(domain)?;
        let cluster_id = self.cluster_id()?;
        Ok(Response::new(JwksResponse {
            jwks_json: jwks.to_string(),
            active_kid: active,
            grant_issuer: tokens::grant_issuer(&cluster_id),
            cluster_id,
        }))
    }

    async fn rotate_keys(
        &self,
        request: Request<RotateKeysRequest>,
    ) -> Result<Response<JwksResponse>, Status> {
        let token = auth::operator(&self.node, &self.refusals, request.metadata()).await?;
        let kek = self.signer.kek().ok_or_else(|| {
            domain(DomainError::precondition(
                "kek",
                "this node has no key-encryption key",
            ))
        })?;
        let key = tokens::new_signing_key(kek);
        let (_, index) = submit(
            &self.node,
            &self.hasher,
            &token,
            Kind::AddSigningKey(pb::AddSigningKey { key: Some(key) }),
        )
        .await?;
        self.caught_up(index).await?;
        self.jwks(Request::new(JwksRequest {})).await
    }

    async fn put_secret(
        &self,
        request: Request<PutSecretRequest>,
    ) -> Result<Response<PutSecretResponse>, Status> {
        check_size(request.get_ref())?;
        let principal = self
            .principal(request.metadata(), &request.get_ref().user_token, "")
            .await?;
        let r = request.into_inner();
        validate::secret_path(&r.path).map_err(domain)?;
        if r.value.is_empty() {
            return Err(domain(DomainError::invalid("value", "must not be empty")));
        }
        let kek = self.signer.kek().ok_or_else(|| {
            domain(DomainError::precondition(
                "kek",
                "this node has no key-encryption key",
            ))
        })?;
        let sealed = kek.seal(&secret_purpose(&r.path), &r.value);
        let (applied, index) = submit_as(
            &self.node,
            &self.hasher,
            principal,
            Kind::PutSecret(pb::PutSecret {
                path: r.path.clone(),
                sealed_value: sealed,
            }),
        )
        .await?;
        Ok(Response::new(PutSecretResponse {
            path: r.path,
            version: applied.secret_version,
            applied_index: index,
        }))
    }

    async fn read_secret(
        &self,
        request: Request<ReadSecretRequest>,
    ) -> Result<Response<ReadSecretResponse>, Status> {
        let r = request.into_inner();
        validate::secret_path(&r.path).map_err(domain)?;
        let grant_id = self.verified_grant_id(&r.token).await?;
        let kind = Kind::ConsumeGrant(pb::ConsumeGrant {
            grant_id,
            action: "read".into(),
            resource: r.path.clone(),
        });
        let (_, index) = submit_as(&self.node, &self.hasher, Principal::Bearer, kind).await?;
        self.caught_up(index).await?;
        let secret = authz::latest_secret(&self.node.view, &r.path)
            .map_err(fault)?
            .ok_or_else(|| {
                domain(DomainError::not_found(
                    "path",
                    format!("no secret at {}", r.path),
                ))
            })?;
        let kek = self.signer.kek().ok_or_else(|| {
            domain(DomainError::precondition(
                "kek",
                "this node has no key-encryption key",
            ))
        })?;
        let value = kek
            .open(&secret_purpose(&r.path), &secret.sealed_value)
            .map_err(|e| domain(DomainError::precondition("kek", e)))?;
        Ok(Response::new(ReadSecretResponse {
            path: r.path,
            version: secret.version,
            value,
        }))
    }
}

/// The associated data a secret is sealed with: its path.
fn secret_purpose(path: &str) -> String {
    format!("mandate:secret:{path}")
}

impl AuthzService {
    async fn verified_grant_id(&self, token: &str) -> Result<String, Status> {
        if token.is_empty() {
            return Err(domain(DomainError::unauthenticated(
                "a grant token is required",
            )));
        }
        let cluster_id = self.cluster_id()?;
        match tokens::verify_grant_token(&self.node.view, &cluster_id, token) {
            Ok(id) => Ok(id),
            Err(_) => {
                self.linearizable().await?;
                tokens::verify_grant_token(&self.node.view, &cluster_id, token).map_err(domain)
            }
        }
    }

    async fn end(
        &self,
        principal: Principal,
        grant_id: String,
        how: pb::GrantEnd,
    ) -> Result<Response<GrantResponse>, Status> {
        if grant_id.is_empty() {
            return Err(domain(DomainError::invalid(
                "grant_id",
                "must not be empty",
            )));
        }
        let kind = Kind::EndGrant(pb::EndGrant {
            grant_id,
            how: how as i32,
        });
        let (applied, index) = submit_as(&self.node, &self.hasher, principal, kind).await?;
        Ok(Response::new(GrantResponse {
            grant: applied.grant,
            applied_index: index,
        }))
    }
}

/// Leader housekeeping: raise the cluster's apply version once every member applies a newer
/// one, and expire grants, approvals and replay-cache entries that are due.
pub async fn housekeeping(node: Arc<Node>, interval: Duration) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if node.metrics().current_leader == Some(node.id) {
            match node.raise_apply_version().await {
                Ok(Some(version)) => tracing::info!(version, "raised the cluster's apply version"),
                Ok(None) => {}
                // `cluster status` shows the version and what each member applies.
                Err(e) => tracing::debug!(error = %e, "the apply version stays as it is"),
            }
        }
        // A full batch leaves more due: the next expiry is proposed at once, not a tick later,
        // so a backlog drains however fast authorizations arrive.
        while node.metrics().current_leader == Some(node.id) {
            let due = match authz::due_count(&node.view, now_ms()) {
                Ok(0) => break,
                Ok(due) => due,
                Err(e) => {
                    tracing::warn!(error = %e, "housekeeping could not read the expiry indexes");
                    break;
                }
            };
            let command = pb::Command {
                kind: Some(Kind::ExpireGrants(pb::ExpireGrants {})),
                serving_node: node.id,
                ..Default::default()
            };
            if let Err(e) = node.write(command).await {
                tracing::debug!(error = %e, "housekeeping did not run");
                break;
            }
            if due < authz::EXPIRE_BATCH_MAX {
                break;
            }
        }
    }
}
