//! The `Cluster` gRPC service: initialisation, status, membership, snapshots, operator tokens.

use crate::tls::{member_endpoint, Tls};
use std::collections::BTreeMap;
use std::io::{Read, Seek};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use mandate_core::pb::{self, command::Kind};
use mandate_core::state::StateExt;
use mandate_core::token::OperatorSecret;
use mandate_core::version::{self, APPLY_VERSION_MAX};
use mandate_core::{validate, DomainError};
use mandate_proto::v1::cluster_client::ClusterClient;
use mandate_proto::v1::cluster_server::Cluster;
use mandate_proto::v1::{
    membership_change::Change, AddLearnerRequest, CreateTokenRequest, CreateTokenResponse,
    InitRequest, InitResponse, Member as MemberMsg, MemberIdRequest, MemberStatus,
    MembershipChange, MembershipResponse, NodeStatusResponse, RevokeTokenRequest,
    RevokeTokenResponse, SnapshotChunk, SnapshotRequest, StatusRequest, StatusResponse,
};
use mandate_raft::node::role_name;
use mandate_raft::{Member, Node, ReadConsistency};
use rand::RngCore;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::config::NodeConfig;
use crate::refusals::Refusals;
use crate::sealing::AuditHasher;
use crate::server::submit;
use crate::tokens::Signer;
use crate::{auth, status};

/// How long `cluster status` waits for each member to answer.
pub const MEMBER_STATUS_TIMEOUT_MS: u64 = 1_000;
/// Size of the chunks a saved snapshot is streamed in.
pub const SNAPSHOT_STREAM_CHUNK_BYTES: usize = 1024 * 1024;
/// How many chunks are read ahead of the client.
const SNAPSHOT_STREAM_CHUNKS_AHEAD: usize = 4;
/// How long `snapshot save` waits for the snapshot to be built.
pub const SNAPSHOT_BUILD_TIMEOUT_MS: u64 = 60_000;

/// Cluster administration, served by every node.
pub struct ClusterService {
    node: Arc<Node>,
    config: NodeConfig,
    hasher: AuditHasher,
    signer: Arc<Signer>,
    refusals: Arc<Refusals>,
    tls: Option<Tls>,
}

impl ClusterService {
    pub fn new(
        node: Arc<Node>,
        config: NodeConfig,
        signer: Arc<Signer>,
        hasher: AuditHasher,
        refusals: Arc<Refusals>,
        tls: Option<Tls>,
    ) -> Self {
        ClusterService {
            node,
            config,
            hasher,
            signer,
            refusals,
            tls,
        }
    }

    fn local_status(&self) -> NodeStatusResponse {
        let m = self.node.metrics();
        let membership = m.membership_config.membership();
        let voter = membership.voter_ids().any(|v| v == self.node.id);
        let initialized = membership.nodes().next().is_some();
        NodeStatusResponse {
            status: Some(MemberStatus {
                id: self.node.id,
                peer_addr: self.node.member.peer_addr.clone(),
                client_addr: self.node.member.client_addr.clone(),
                role: role_name(m.state).to_owned(),
                term: m.current_term,
                last_log_index: m.last_log_index.unwrap_or(0),
                applied_index: m.last_applied.map_or(0, |l| l.index),
                voter,
                snapshot_index: m.snapshot.map_or(0, |l| l.index),
                purged_index: m.purged.map_or(0, |l| l.index),
                apply_version_max: APPLY_VERSION_MAX,
            }),
            leader: m.current_leader.unwrap_or(0),
            cluster_id: self
                .node
                .view
                .cluster()
                .ok()
                .flatten()
                .map(|c| c.cluster_id)
                .unwrap_or_default(),
            initialized,
        }
    }

    fn membership_response(&self) -> MembershipResponse {
        let m = self.node.metrics();
        let membership = m.membership_config.membership();
        let voters: Vec<u64> = membership.voter_ids().collect();
        let mut response = MembershipResponse {
            applied_index: m.last_applied.map_or(0, |l| l.index),
            ..Default::default()
        };
        for (id, node) in membership.nodes() {
            let member = MemberMsg {
                id: *id,
                peer_addr: node.peer_addr.clone(),
                client_addr: node.client_addr.clone(),
            };
            if voters.contains(id) {
                response.voters.push(member);
            } else {
                response.learners.push(member);
            }
        }
        response
    }

    async fn change(&self, change: Change) -> Result<Response<MembershipResponse>, Status> {
        self.node
            .change_membership(MembershipChange {
                change: Some(change),
            })
            .await
            .map_err(|e| status::from_node(&e))?;
        Ok(Response::new(self.membership_response()))
    }

    async fn bootstrap(&self) -> Result<Response<InitResponse>, Status> {
        let root = OperatorSecret::from_random(random_bytes(), random_bytes());
        let cluster_id = format!("mc_{}", hex::encode(random_bytes::<8>()));
        let command = pb::Command {
            kind: Some(Kind::BootstrapCluster(pb::BootstrapCluster {
                cluster_id: cluster_id.clone(),
                root_token_id: root.id.clone(),
                root_secret_sha256: root.secret_sha256(),
                signing_key: self.signer.kek().map(crate::tokens::new_signing_key),
                apply_version: APPLY_VERSION_MAX,
            })),
            audit_actor: self.hasher.token_id(&root.id),
            serving_node: self.node.id,
            ..Default::default()
        };
        let result = self
            .node
            .write(command)
            .await
            .map_err(|e| status::from_node(&e))?;
        match result.outcome {
            Some(pb::command_result::Outcome::Applied(_)) => Ok(Response::new(InitResponse {
                cluster_id,
                root_token: root.render(),
                applied_index: result.log_index,
            })),
            Some(pb::command_result::Outcome::Error(e)) => Err(status::from_command_error(&e)),
            None => Err(Status::internal("apply returned no outcome")),
        }
    }
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    rand::thread_rng().fill_bytes(&mut bytes);
    bytes
}

fn parse_member(m: &MemberMsg) -> Result<(u64, Member), Status> {
    let invalid =
        |field: &str, message: String| status::from_domain(&DomainError::invalid(field, message));
    if m.id == 0 {
        return Err(invalid("member.id", "must be at least 1".into()));
    }
    for (field, addr) in [
        ("member.peer_addr", &m.peer_addr),
        ("member.client_addr", &m.client_addr),
    ] {
        mandate_core::validate::host_port(field, addr).map_err(|e| status::from_domain(&e))?;
    }
    Ok((
        m.id,
        Member {
            peer_addr: m.peer_addr.clone(),
            client_addr: m.client_addr.clone(),
        },
    ))
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<SnapshotChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Cluster for ClusterService {
    async fn init(&self, request: Request<InitRequest>) -> Result<Response<InitResponse>, Status> {
        let r = request.into_inner();
        let initialized = self.local_status().initialized;
        if initialized {
            // A cluster whose raft membership exists but whose bootstrap command never
            // committed (an init interrupted half-way) may finish bootstrapping.
            self.node
                .read_barrier(ReadConsistency::Linearizable, 0)
                .await
                .map_err(|e| status::from_node(&e))?;
            if self
                .node
                .view
                .cluster()
                .map_err(|e| status::from_fault(&e))?
                .is_some()
            {
                return Err(status::from_domain(&DomainError::precondition(
                    "cluster",
                    "is already initialised; its root token was shown once, at init",
                )));
            }
            return self.bootstrap().await;
        }
        let mut members = BTreeMap::new();
        let listed: Vec<MemberMsg> = if r.members.is_empty() {
            self.config
                .peers
                .iter()
                .map(|p| MemberMsg {
                    id: p.id,
                    peer_addr: p.peer_addr.clone(),
                    client_addr: p.client_addr.clone(),
                })
                .collect()
        } else {
            r.members
        };
        for m in &listed {
            let (id, member) = parse_member(m)?;
            members.insert(id, member);
        }
        members
            .entry(self.node.id)
            .or_insert_with(|| self.node.member.clone());
        self.node
            .initialize(members)
            .await
            .map_err(|e| status::from_node(&e))?;
        self.bootstrap().await
    }

    async fn status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        auth::operator(&self.node, &self.refusals, request.metadata()).await?;
        let local = self.local_status();
        let metrics = self.node.metrics();
        let membership = metrics.membership_config.membership().clone();
        let voters: Vec<u64> = membership.voter_ids().collect();
        let authorization = request.metadata().get("authorization").cloned();
        let mut members = Vec::new();
        for (id, node) in membership.nodes() {
            if *id == self.node.id {
                members.extend(local.status.clone());
                continue;
            }
            let fetched =
                member_status(&node.client_addr, self.tls.as_ref(), authorization.clone()).await;
            members.push(fetched.unwrap_or_else(|| MemberStatus {
                id: *id,
                peer_addr: node.peer_addr.clone(),
                client_addr: node.client_addr.clone(),
                role: "unreachable".into(),
                voter: voters.contains(id),
                ..Default::default()
            }));
        }
        Ok(Response::new(StatusResponse {
            cluster_id: local.cluster_id,
            leader: local.leader,
            term: metrics.current_term,
            members,
            served_by: self.node.id,
            apply_version: version::current(&self.node.view)
                .map_err(|e| Status::internal(e.to_string()))?,
        }))
    }

    async fn node_status(
        &self,
        request: Request<StatusRequest>,
    ) -> Result<Response<NodeStatusResponse>, Status> {
        auth::operator(&self.node, &self.refusals, request.metadata()).await?;
        Ok(Response::new(self.local_status()))
    }

    async fn add_learner(
        &self,
        request: Request<AddLearnerRequest>,
    ) -> Result<Response<MembershipResponse>, Status> {
        auth::operator(&self.node, &self.refusals, request.metadata()).await?;
        let m = request
            .into_inner()
            .member
            .ok_or_else(|| status::from_domain(&DomainError::invalid("member", "is required")))?;
        parse_member(&m)?;
        if self
            .node
            .metrics()
            .membership_config
            .membership()
            .get_node(&m.id)
            .is_some()
        {
            return Err(status::from_domain(&DomainError::exists(
                "member.id",
                format!("node {} is already a member", m.id),
            )));
        }
        self.change(Change::AddLearner(m)).await
    }

    async fn promote(
        &self,
        request: Request<MemberIdRequest>,
    ) -> Result<Response<MembershipResponse>, Status> {
        auth::operator(&self.node, &self.refusals, request.metadata()).await?;
        self.change(Change::Promote(request.into_inner().id)).await
    }

    async fn remove(
        &self,
        request: Request<MemberIdRequest>,
    ) -> Result<Response<MembershipResponse>, Status> {
        auth::operator(&self.node, &self.refusals, request.metadata()).await?;
        self.change(Change::Remove(request.into_inner().id)).await
    }

    type SnapshotSaveStream = ChunkStream;

    async fn snapshot_save(
        &self,
        request: Request<SnapshotRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        auth::operator(&self.node, &self.refusals, request.metadata()).await?;
        let applied = self.node.view.applied_index();
        self.node
            .raft
            .trigger()
            .snapshot()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        self.node
            .raft
            .wait(Some(Duration::from_millis(SNAPSHOT_BUILD_TIMEOUT_MS)))
            .metrics(
                |m| m.snapshot.is_some_and(|s| s.index >= applied),
                "snapshot covers the applied index",
            )
            .await
            .map_err(|e| Status::unavailable(format!("the snapshot was not built: {e}")))?;
        let snapshot = self
            .node
            .raft
            .get_snapshot()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?
            .ok_or_else(|| Status::unavailable("no snapshot is available"))?;
        // The file is read on a blocking thread, a chunk at a time as the client takes them.
        let mut file = snapshot.snapshot.into_std();
        let (tx, rx) = tokio::sync::mpsc::channel(SNAPSHOT_STREAM_CHUNKS_AHEAD);
        tokio::task::spawn_blocking(move || {
            if let Err(e) = send_file(&mut file, &tx) {
                // The client may be gone; then nobody is left to tell.
                let _ = tx.blocking_send(Err(Status::internal(format!(
                    "reading the snapshot file: {e}"
                ))));
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn create_token(
        &self,
        request: Request<CreateTokenRequest>,
    ) -> Result<Response<CreateTokenResponse>, Status> {
        let actor = auth::operator(&self.node, &self.refusals, request.metadata()).await?;
        let name = request.into_inner().name;
        validate::token_name(&name).map_err(|e| status::from_domain(&e))?;
        if !actor.root {
            return Err(status::from_domain(&DomainError::denied(
                "token",
                "only the root token may create operator tokens",
            )));
        }
        let token = OperatorSecret::from_random(random_bytes(), random_bytes());
        let kind = Kind::CreateOperatorToken(pb::CreateOperatorToken {
            token_id: token.id.clone(),
            name,
            secret_sha256: token.secret_sha256(),
        });
        let (_, index) = submit(&self.node, &self.hasher, &actor, kind).await?;
        Ok(Response::new(CreateTokenResponse {
            id: token.id.clone(),
            token: token.render(),
            applied_index: index,
        }))
    }

    async fn revoke_token(
        &self,
        request: Request<RevokeTokenRequest>,
    ) -> Result<Response<RevokeTokenResponse>, Status> {
        let actor = auth::operator(&self.node, &self.refusals, request.metadata()).await?;
        let id = request.into_inner().id;
        if id.is_empty() {
            return Err(status::from_domain(&DomainError::invalid(
                "id",
                "must not be empty",
            )));
        }
        let kind = Kind::RevokeOperatorToken(pb::RevokeOperatorToken { token_id: id });
        let (_, index) = submit(&self.node, &self.hasher, &actor, kind).await?;
        Ok(Response::new(RevokeTokenResponse {
            applied_index: index,
        }))
    }
}

async fn member_status(
    client_addr: &str,
    tls: Option<&Tls>,
    authorization: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
) -> Option<MemberStatus> {
    let endpoint = member_endpoint(client_addr, tls).ok()?;
    let mut request = Request::new(StatusRequest {});
    if let Some(value) = authorization {
        request.metadata_mut().insert("authorization", value);
    }
    // The whole exchange is bounded at once: a paused member accepts the connection (the
    // kernel does) but never finishes the TLS handshake, which the transport's own connect and
    // request timeouts do not cover.
    let asked = async {
        let channel = endpoint.connect().await.ok()?;
        ClusterClient::new(channel)
            .node_status(request)
            .await
            .ok()?
            .into_inner()
            .status
    };
    tokio::time::timeout(Duration::from_millis(MEMBER_STATUS_TIMEOUT_MS), asked)
        .await
        .ok()
        .flatten()
}

/// Sends `file` from its start in chunks until it ends or the receiver is gone.
fn send_file(
    file: &mut std::fs::File,
    tx: &tokio::sync::mpsc::Sender<Result<SnapshotChunk, Status>>,
) -> std::io::Result<()> {
    file.rewind()?;
    loop {
        let mut data = Vec::with_capacity(SNAPSHOT_STREAM_CHUNK_BYTES);
        (&mut *file)
            .take(SNAPSHOT_STREAM_CHUNK_BYTES as u64)
            .read_to_end(&mut data)?;
        if data.is_empty() || tx.blocking_send(Ok(SnapshotChunk { data })).is_err() {
            return Ok(());
        }
    }
}
