//! The `AgentRegistry` gRPC service.

use std::sync::Arc;

use mandate_core::limits::{LIST_PAGE_SIZE_DEFAULT, LIST_PAGE_SIZE_MAX};
use mandate_core::pb::{self, command::Kind};
use mandate_core::principal::AGENT_ID_PREFIX;
use mandate_core::state::{decode, StateExt};
use mandate_core::{keys, validate, AgentId, DomainError, UserId};
use mandate_proto::v1::agent_registry_server::AgentRegistry;
use mandate_proto::v1::{
    AddAgentKeyRequest, AgentIdRequest, AgentResponse, GetAgentRequest, ListAgentsRequest,
    ListAgentsResponse, ReadOptions, RegisterAgentRequest, RemoveAgentKeyRequest,
    UpdateAgentRequest,
};
use mandate_raft::{Node, ReadConsistency};
use prost::Message;
use tonic::{Request, Response, Status};

use crate::refusals::Refusals;
use crate::sealing::AuditHasher;
use crate::server::submit;
use crate::{auth, status, REQUEST_BYTES_MAX};

/// The agent registry, served by every node.
pub struct RegistryService {
    node: Arc<Node>,
    hasher: AuditHasher,
    refusals: Arc<Refusals>,
}

impl RegistryService {
    pub fn new(node: Arc<Node>, hasher: AuditHasher, refusals: Arc<Refusals>) -> Self {
        RegistryService {
            node,
            hasher,
            refusals,
        }
    }
}

fn invalid(e: DomainError) -> Status {
    status::from_domain(&e)
}

/// Refuses a request larger than [`REQUEST_BYTES_MAX`] before anything else.
pub fn check_size(message: &impl Message) -> Result<(), Status> {
    let len = message.encoded_len();
    if len > REQUEST_BYTES_MAX {
        return Err(invalid(DomainError::invalid(
            "request",
            format!("is {len} bytes; at most {REQUEST_BYTES_MAX} allowed"),
        )));
    }
    Ok(())
}

/// Brings local state up to what the read asked for; returns the applied index it reflects.
pub async fn read_barrier(node: &Node, read: Option<&ReadOptions>) -> Result<u64, Status> {
    let (consistency, min) = match read {
        None => (ReadConsistency::Linearizable, 0),
        Some(r) => {
            let c = match pb::ReadConsistency::try_from(r.consistency) {
                Ok(pb::ReadConsistency::Stale) => ReadConsistency::Stale,
                Ok(pb::ReadConsistency::Linearizable) => ReadConsistency::Linearizable,
                Err(_) => {
                    return Err(invalid(DomainError::invalid(
                        "read.consistency",
                        format!("{} is not a read consistency", r.consistency),
                    )))
                }
            };
            (c, r.min_applied_index)
        }
    };
    node.read_barrier(consistency, min)
        .await
        .map_err(|e| status::from_node(&e))
}

/// Loads an agent that must exist. Local state can only lag, so a miss is confirmed with a
/// linearizable barrier before the request is refused.
async fn existing_agent(node: &Node, id: &str) -> Result<pb::Agent, Status> {
    AgentId::parse("id", id).map_err(invalid)?;
    let fault = |e| status::from_fault(&e);
    if let Some(agent) = node.view.agent(id).map_err(fault)? {
        return Ok(agent);
    }
    read_barrier(node, None).await?;
    node.view
        .agent(id)
        .map_err(fault)?
        .ok_or_else(|| invalid(DomainError::not_found("id", format!("no agent {id}"))))
}

fn lookup(node: &Node, id_or_name: &str) -> Result<Option<pb::Agent>, Status> {
    let fault = |e| status::from_fault(&e);
    if id_or_name.starts_with(AGENT_ID_PREFIX) {
        AgentId::parse("id_or_name", id_or_name).map_err(invalid)?;
        return node.view.agent(id_or_name).map_err(fault);
    }
    validate::agent_name(id_or_name)
        .map_err(|e| invalid(DomainError::invalid("id_or_name", e.message)))?;
    match node.view.agent_id_by_name(id_or_name).map_err(fault)? {
        Some(id) => node.view.agent(&id).map_err(fault),
        None => Ok(None),
    }
}

fn agent_response(
    applied: pb::CommandApplied,
    index: u64,
) -> Result<Response<AgentResponse>, Status> {
    let agent = applied
        .agent
        .ok_or_else(|| Status::internal("apply returned no agent for an agent command"))?;
    Ok(Response::new(AgentResponse {
        agent: Some(agent),
        applied_index: index,
    }))
}

impl RegistryService {
    async fn set_status(
        &self,
        request: Request<AgentIdRequest>,
        status: pb::AgentStatus,
    ) -> Result<Response<AgentResponse>, Status> {
        let token = auth::operator(&self.node, &self.refusals, request.metadata()).await?;
        let id = request.into_inner().id;
        existing_agent(&self.node, &id).await?;
        let kind = Kind::SetAgentStatus(pb::SetAgentStatus {
            agent_id: id,
            status: status as i32,
        });
        let (applied, index) = submit(&self.node, &self.hasher, &token, kind).await?;
        agent_response(applied, index)
    }
}

#[tonic::async_trait]
impl AgentRegistry for RegistryService {
    async fn register(
        &self,
        request: Request<RegisterAgentRequest>,
    ) -> Result<Response<AgentResponse>, Status> {
        let token = auth::operator(&self.node, &self.refusals, request.metadata()).await?;
        check_size(request.get_ref())?;
        let r = request.into_inner();
        let command = validate::register_agent(&pb::RegisterAgent {
            agent_id: String::new(),
            name: r.name,
            owner: r.owner,
            description: r.description,
            model: r.model,
            provider: r.provider,
            labels: r.labels,
            keys: r.public_keys,
            ceiling: r.ceiling,
        })
        .map_err(invalid)?;
        // Names are never freed, so a name this node already knows is certainly taken.
        if let Some(existing) = self
            .node
            .view
            .agent_id_by_name(&command.name)
            .map_err(|e| status::from_fault(&e))?
        {
            return Err(invalid(DomainError::exists(
                "name",
                format!(
                    "an agent named {:?} already exists ({existing})",
                    command.name
                ),
            )));
        }
        let (applied, index) = submit(
            &self.node,
            &self.hasher,
            &token,
            Kind::RegisterAgent(command),
        )
        .await?;
        agent_response(applied, index)
    }

    async fn get(
        &self,
        request: Request<GetAgentRequest>,
    ) -> Result<Response<AgentResponse>, Status> {
        auth::operator(&self.node, &self.refusals, request.metadata()).await?;
        let r = request.into_inner();
        if r.id_or_name.is_empty() {
            return Err(invalid(DomainError::invalid(
                "id_or_name",
                "must not be empty",
            )));
        }
        let applied_index = read_barrier(&self.node, r.read.as_ref()).await?;
        let agent = lookup(&self.node, &r.id_or_name)?.ok_or_else(|| {
            invalid(DomainError::not_found(
                "id_or_name",
                format!("no agent with id or name {:?}", r.id_or_name),
            ))
        })?;
        Ok(Response::new(AgentResponse {
            agent: Some(agent),
            applied_index,
        }))
    }

    async fn list(
        &self,
        request: Request<ListAgentsRequest>,
    ) -> Result<Response<ListAgentsResponse>, Status> {
        auth::operator(&self.node, &self.refusals, request.metadata()).await?;
        let r = request.into_inner();
        let page_size = match r.page_size {
            0 => LIST_PAGE_SIZE_DEFAULT,
            n if n > LIST_PAGE_SIZE_MAX => {
                return Err(invalid(DomainError::invalid(
                    "page_size",
                    format!("is {n}; at most {LIST_PAGE_SIZE_MAX} allowed"),
                )))
            }
            n => n,
        } as usize;
        if !r.page_token.is_empty() {
            AgentId::parse("page_token", &r.page_token).map_err(invalid)?;
        }
        if !r.owner.is_empty() {
            UserId::parse("owner", &r.owner).map_err(invalid)?;
        }
        let label = if r.label.is_empty() {
            None
        } else {
            Some(validate::label_pair("label", &r.label).map_err(invalid)?)
        };
        let status_filter = pb::AgentStatus::try_from(r.status).map_err(|_| {
            invalid(DomainError::invalid(
                "status",
                format!("{} is not an agent status", r.status),
            ))
        })?;
        let applied_index = read_barrier(&self.node, r.read.as_ref()).await?;

        let start = if r.page_token.is_empty() {
            keys::AGENT_PREFIX.to_vec()
        } else {
            let mut k = keys::agent(&r.page_token);
            k.push(0);
            k
        };
        let mut agents = Vec::new();
        let mut more = false;
        for item in self.node.view.scan(keys::AGENT_PREFIX, &start) {
            let (key, value) = item.map_err(|e| status::from_fault(&e))?;
            let agent: pb::Agent = decode(&key, &value).map_err(|e| status::from_fault(&e))?;
            let matches = (r.owner.is_empty() || agent.owner == r.owner)
                && (status_filter == pb::AgentStatus::Unspecified
                    || agent.status == status_filter as i32)
                && label
                    .as_ref()
                    .is_none_or(|(k, v)| agent.labels.get(k) == Some(v));
            if !matches {
                continue;
            }
            if agents.len() == page_size {
                more = true;
                break;
            }
            agents.push(agent);
        }
        let next_page_token = match (more, agents.last()) {
            (true, Some(last)) => last.id.clone(),
            _ => String::new(),
        };
        Ok(Response::new(ListAgentsResponse {
            agents,
            next_page_token,
            applied_index,
        }))
    }

    async fn update(
        &self,
        request: Request<UpdateAgentRequest>,
    ) -> Result<Response<AgentResponse>, Status> {
        let token = auth::operator(&self.node, &self.refusals, request.metadata()).await?;
        check_size(request.get_ref())?;
        let r = request.into_inner();
        let command = pb::UpdateAgent {
            agent_id: r.id,
            description: r.description,
            model: r.model,
            provider: r.provider,
            labels: r
                .replace_labels
                .then_some(pb::LabelSet { labels: r.labels }),
        };
        validate::update_agent(&command).map_err(invalid)?;
        existing_agent(&self.node, &command.agent_id).await?;
        let (applied, index) =
            submit(&self.node, &self.hasher, &token, Kind::UpdateAgent(command)).await?;
        agent_response(applied, index)
    }

    async fn suspend(
        &self,
        request: Request<AgentIdRequest>,
    ) -> Result<Response<AgentResponse>, Status> {
        self.set_status(request, pb::AgentStatus::Suspended).await
    }

    async fn resume(
        &self,
        request: Request<AgentIdRequest>,
    ) -> Result<Response<AgentResponse>, Status> {
        self.set_status(request, pb::AgentStatus::Active).await
    }

    async fn retire(
        &self,
        request: Request<AgentIdRequest>,
    ) -> Result<Response<AgentResponse>, Status> {
        self.set_status(request, pb::AgentStatus::Retired).await
    }

    async fn add_key(
        &self,
        request: Request<AddAgentKeyRequest>,
    ) -> Result<Response<AgentResponse>, Status> {
        let token = auth::operator(&self.node, &self.refusals, request.metadata()).await?;
        check_size(request.get_ref())?;
        let r = request.into_inner();
        let key = r
            .key
            .as_ref()
            .ok_or_else(|| invalid(DomainError::invalid("key", "is required")))?;
        let key = validate::jwk("key", key).map_err(invalid)?;
        existing_agent(&self.node, &r.id).await?;
        let kind = Kind::AddAgentKey(pb::AddAgentKey {
            agent_id: r.id,
            key: Some(key),
        });
        let (applied, index) = submit(&self.node, &self.hasher, &token, kind).await?;
        agent_response(applied, index)
    }

    async fn remove_key(
        &self,
        request: Request<RemoveAgentKeyRequest>,
    ) -> Result<Response<AgentResponse>, Status> {
        let token = auth::operator(&self.node, &self.refusals, request.metadata()).await?;
        let r = request.into_inner();
        if r.kid.is_empty() {
            return Err(invalid(DomainError::invalid("kid", "must not be empty")));
        }
        let agent = existing_agent(&self.node, &r.id).await?;
        if !agent.keys.iter().any(|k| k.kid == r.kid) {
            return Err(invalid(DomainError::not_found(
                "kid",
                format!("agent {} has no key {:?}", agent.id, r.kid),
            )));
        }
        let kind = Kind::RemoveAgentKey(pb::RemoveAgentKey {
            agent_id: r.id,
            kid: r.kid,
        });
        let (applied, index) = submit(&self.node, &self.hasher, &token, kind).await?;
        agent_response(applied, index)
    }
}
