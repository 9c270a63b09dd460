//! The server side of the peer API: openraft RPCs, forwarded writes, read indexes and
//! membership changes, for the other members only (served on the peer listener).

use std::sync::Arc;
use std::time::Duration;

use mandate_core::pb;
use mandate_core::version::APPLY_VERSION_MAX;
use mandate_proto::v1::raft_peer_server::RaftPeer;
use mandate_proto::v1::{
    ApplyVersionRequest, ApplyVersionResponse, ForwardBatchRequest, ForwardBatchResponse,
    ForwardRequest, ForwardResponse, MembershipChange, MembershipChangeResponse, RaftPayload,
    ReadIndexRequest, ReadIndexResponse,
};
use openraft::error::RaftError;
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use tokio::time::Instant;
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

    /// Tells raft that the leader holding `vote` was heard from, as its heartbeat would.
    ///
    /// openraft 0.9 sends no heartbeats to a follower while a snapshot is in flight to it, and
    /// hands the snapshot's chunks to its receiver without passing them through the raft core,
    /// so during a long transfer and install (seconds for a large state) the follower's
    /// election timer ran out, it campaigned, and its higher term deposed a healthy leader. A
    /// chunk carries the leader's vote; an empty append under that vote, with no previous
    /// entry and nothing to commit, refreshes the leader's lease and changes no log. Raft
    /// refreshes the lease when it takes the append, but answers it only after what it answers
    /// first (the install itself, for the last chunk), so nothing waits for the answer.
    fn heard_from_leader(&self, vote: &openraft::Vote<NodeId>) {
        let heartbeat = AppendEntriesRequest {
            vote: *vote,
            prev_log_id: None,
            entries: Vec::new(),
            leader_commit: None,
        };
        let raft = self.node.raft.clone();
        // A stale vote is refused here as it is by the install itself; nothing to report.
        tokio::spawn(async move { raft.append_entries(heartbeat).await });
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
        let vote = rpc.vote;
        let install = self.node.raft.install_snapshot(rpc);
        tokio::pin!(install);
        // The leader is waiting on this call: hear from it now and every heartbeat interval
        // until the chunk is taken (the last chunk waits for the install, seconds on a large
        // state).
        self.heard_from_leader(&vote);
        let heartbeat = Duration::from_millis(self.node.raft.config().heartbeat_interval);
        let mut beats = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
        loop {
            tokio::select! {
                taken = &mut install => return encode(&taken),
                _ = beats.tick() => self.heard_from_leader(&vote),
            }
        }
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

    async fn apply_version(
        &self,
        _: Request<ApplyVersionRequest>,
    ) -> Result<Response<ApplyVersionResponse>, Status> {
        Ok(Response::new(ApplyVersionResponse {
            apply_version_max: APPLY_VERSION_MAX,
        }))
    }
}

#[cfg(test)]
mod tests {
    use tonic::Code;

    use super::*;
    use crate::{Member, RaftTiming};

    /// A node that has joined no cluster, its peer service, and the directory it lives in.
    async fn uninitialized_node(id: NodeId) -> (tempfile::TempDir, Arc<Node>, PeerService) {
        let dir = tempfile::tempdir().expect("temporary directory");
        let member = Member {
            peer_addr: "127.0.0.1:1".into(),
            client_addr: "127.0.0.1:2".into(),
        };
        let node = Node::start(id, member, dir.path(), &RaftTiming::default(), None)
            .await
            .expect("node starts");
        let service = PeerService::new(node.clone());
        (dir, node, service)
    }

    #[tokio::test]
    async fn a_forward_batch_with_no_commands_or_too_many_is_refused_and_proposes_nothing() {
        let (_dir, node, service) = uninitialized_node(1).await;
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

    #[tokio::test]
    async fn a_snapshot_chunk_counts_as_hearing_from_its_leader_and_changes_no_log() {
        let (_dir, node, service) = uninitialized_node(2).await;
        let leader_vote = openraft::Vote::new_committed(3, 1);
        let chunk = InstallSnapshotRequest::<TypeConfig> {
            vote: leader_vote,
            meta: openraft::SnapshotMeta {
                last_log_id: Some(openraft::LogId::new(
                    openraft::CommittedLeaderId::new(3, 1),
                    500,
                )),
                last_membership: Default::default(),
                snapshot_id: "3-500".into(),
            },
            offset: 0,
            data: vec![0; 1024],
            done: false,
        };
        let payload = to_payload(&chunk).expect("encode");
        service
            .install_snapshot(Request::new(payload))
            .await
            .expect("the chunk is taken");
        let metrics = node
            .raft
            .wait(Some(Duration::from_secs(5)))
            .metrics(|m| m.vote == leader_vote, "the chunk's vote is taken")
            .await
            .expect("the chunk's leader was not heard");
        assert_eq!(metrics.current_term, 3);
        assert_eq!(metrics.last_log_index, None, "the log changed");
        assert_eq!(metrics.snapshot, None, "a partial snapshot was installed");
    }
}
