//! The server side of the peer API: openraft RPCs, forwarded writes, read indexes and
//! membership changes, for the other members only (served on the peer listener).

use std::sync::Arc;

use mandate_core::pb;
use mandate_proto::v1::raft_peer_server::RaftPeer;
use mandate_proto::v1::{
    ForwardBatchRequest, ForwardBatchResponse, ForwardRequest, ForwardResponse, MembershipChange,
    MembershipChangeResponse, RaftPayload, ReadIndexRequest, ReadIndexResponse,
};
use openraft::error::RaftError;
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use tonic::{Request, Response, Status};

use crate::forwarder::FORWARD_COMMANDS_MAX;
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

/// One forwarded command's outcome, as the follower that sent it reads it.
fn outcome(node: &Node, routed: Result<pb::CommandResult, Routed>) -> ForwardResponse {
    match routed {
        Ok(result) => ForwardResponse {
            result: Some(result),
            ..Default::default()
        },
        Err(Routed::NotLeader) => ForwardResponse {
            not_leader: true,
            leader_hint: leader_hint(node),
            ..Default::default()
        },
        Err(Routed::Failed(e)) => ForwardResponse {
            error: e.to_string(),
            ..Default::default()
        },
    }
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
            Err(Routed::Failed(e)) => return Err(Status::unavailable(e.to_string())),
            routed => outcome(&self.node, routed),
        };
        Ok(Response::new(response))
    }

    async fn forward_batch(
        &self,
        request: Request<ForwardBatchRequest>,
    ) -> Result<Response<ForwardBatchResponse>, Status> {
        let commands = request.into_inner().commands;
        if commands.is_empty() {
            return Err(Status::invalid_argument(
                "forward_batch carries no commands",
            ));
        }
        if commands.len() > FORWARD_COMMANDS_MAX {
            return Err(Status::invalid_argument(format!(
                "forward_batch carries {} commands; at most {FORWARD_COMMANDS_MAX} fit in one call",
                commands.len()
            )));
        }
        let results = self
            .node
            .write_local_all(commands)
            .await
            .into_iter()
            .map(|routed| outcome(&self.node, routed))
            .collect();
        Ok(Response::new(ForwardBatchResponse { results }))
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

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;
    use crate::{Member, RaftTiming};

    #[tokio::test]
    async fn a_forward_batch_with_no_commands_or_too_many_is_refused_and_proposes_nothing() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let member = Member {
            peer_addr: "127.0.0.1:1".into(),
            client_addr: "127.0.0.1:2".into(),
        };
        let node = Node::start(1, member, dir.path(), &RaftTiming::default(), None)
            .await
            .expect("node starts");
        let service = PeerService::new(node.clone());
        let refused = |commands: Vec<pb::Command>| {
            let service = &service;
            async move {
                service
                    .forward_batch(Request::new(ForwardBatchRequest { commands }))
                    .await
                    .expect_err("refused")
            }
        };
        let empty = refused(vec![]).await;
        assert_eq!(empty.code(), Code::InvalidArgument);
        assert!(
            empty.message().contains("no commands"),
            "{}",
            empty.message()
        );
        let many = refused(vec![pb::Command::default(); FORWARD_COMMANDS_MAX + 1]).await;
        assert_eq!(many.code(), Code::InvalidArgument);
        assert!(
            many.message()
                .contains(&format!("at most {FORWARD_COMMANDS_MAX}")),
            "{}",
            many.message()
        );
        assert_eq!(node.metrics().last_log_index, None, "nothing was proposed");
    }
}
