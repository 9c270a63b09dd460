//! The server side of the peer API: openraft RPCs, forwarded writes, read indexes and
//! membership changes, for the other members only (served on the peer listener).

use std::sync::Arc;

use mandate_proto::v1::raft_peer_server::RaftPeer;
use mandate_proto::v1::{
    ForwardRequest, ForwardResponse, MembershipChange, MembershipChangeResponse, RaftPayload,
    ReadIndexRequest, ReadIndexResponse,
};
use openraft::error::RaftError;
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use tonic::{Request, Response, Status};

use crate::network::{from_payload, to_payload};
use crate::node::{Node, Routed};
use crate::{NodeId, TypeConfig};

/// The `RaftPeer` gRPC service of one node.
pub struct PeerService {
    node: Arc<Node>,
}

impl PeerService {
    pub fn new(node: Arc<Node>) -> Self {
        PeerService { node }
    }
}

fn bad_payload(e: bincode::Error) -> Status {
    Status::invalid_argument(format!("undecodable raft payload: {e}"))
}

fn encode<T: serde::Serialize>(value: &T) -> Result<Response<RaftPayload>, Status> {
    to_payload(value)
        .map(Response::new)
        .map_err(|e| Status::internal(format!("encoding raft reply: {e}")))
}

fn leader_hint(node: &Node) -> NodeId {
    node.leader().map_or(0, |(id, _)| id)
}

#[tonic::async_trait]
impl RaftPeer for PeerService {
    async fn append_entries(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let rpc: AppendEntriesRequest<TypeConfig> =
            from_payload(request.get_ref()).map_err(bad_payload)?;
        encode(&self.node.raft.append_entries(rpc).await)
    }

    async fn vote(&self, request: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
        let rpc: VoteRequest<NodeId> = from_payload(request.get_ref()).map_err(bad_payload)?;
        encode(&self.node.raft.vote(rpc).await)
    }

    async fn install_snapshot(
        &self,
        request: Request<RaftPayload>,
    ) -> Result<Response<RaftPayload>, Status> {
        let rpc: InstallSnapshotRequest<TypeConfig> =
            from_payload(request.get_ref()).map_err(bad_payload)?;
        encode(&self.node.raft.install_snapshot(rpc).await)
    }

    async fn forward(
        &self,
        request: Request<ForwardRequest>,
    ) -> Result<Response<ForwardResponse>, Status> {
        let command = request
            .into_inner()
            .command
            .ok_or_else(|| Status::invalid_argument("forward carries no command"))?;
        let response = match self.node.write_local(command).await {
            Ok(result) => ForwardResponse {
                result: Some(result),
                not_leader: false,
                leader_hint: 0,
            },
            Err(Routed::NotLeader) => ForwardResponse {
                result: None,
                not_leader: true,
                leader_hint: leader_hint(&self.node),
            },
            Err(Routed::Failed(e)) => return Err(Status::unavailable(e.to_string())),
        };
        Ok(Response::new(response))
    }

    async fn read_index(
        &self,
        _: Request<ReadIndexRequest>,
    ) -> Result<Response<ReadIndexResponse>, Status> {
        match self.node.leader_read_index().await {
            Ok(read_index) => Ok(Response::new(ReadIndexResponse { read_index })),
            Err(RaftError::APIError(e)) => Err(Status::failed_precondition(e.to_string())),
            Err(RaftError::Fatal(e)) => Err(Status::unavailable(e.to_string())),
        }
    }

    async fn change_membership(
        &self,
        request: Request<MembershipChange>,
    ) -> Result<Response<MembershipChangeResponse>, Status> {
        let response = match self.node.change_membership_local(request.get_ref()).await {
            Ok(()) => MembershipChangeResponse::default(),
            Err(Routed::NotLeader) => MembershipChangeResponse {
                not_leader: true,
                leader_hint: leader_hint(&self.node),
                error: String::new(),
            },
            Err(Routed::Failed(e)) => MembershipChangeResponse {
                error: e.to_string(),
                ..Default::default()
            },
        };
        Ok(Response::new(response))
    }
}
