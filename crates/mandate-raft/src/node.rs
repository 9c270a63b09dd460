//! A running raft member: routing writes to the leader, read barriers and membership changes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use mandate_core::pb;
use mandate_core::state::StateExt;
use mandate_core::version::{self, APPLY_VERSION_FIRST, APPLY_VERSION_MAX};
use mandate_proto::v1::{
    membership_change::Change, ApplyVersionRequest, MembershipChange, ReadIndexRequest,
};
use mandate_store::{Member, NodeId, StateView};
use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, RaftMetrics, ServerState};
use tonic::transport::ClientTlsConfig;

use crate::batcher::{BatchError, Batcher};
use crate::forwarder::Forwarder;
use crate::network::{NetworkFactory, PeerClients};
use crate::snapshots::{self, SnapshotSchedule};
use crate::{Raft, RaftTiming};

/// How long a request waits for a leader to be known.
pub const LEADER_WAIT_MS: u64 = 5_000;
/// How long a read waits for this node to apply up to the index it needs.
pub const APPLY_WAIT_MS: u64 = 5_000;
/// How many times a write follows a leader change before giving up.
pub const WRITE_ROUTE_ATTEMPTS_MAX: usize = 8;
/// How long the leader waits for a member to say which apply version it applies.
pub const APPLY_VERSION_ASK_TIMEOUT_MS: u64 = 2_000;

/// What a read needs from the node before it may look at local state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadConsistency {
    Linearizable,
    Stale,
}

/// Why a request could not be served by the cluster.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NodeError {
    #[error("no leader is known; the cluster may have lost its quorum or be electing")]
    NoLeader,
    #[error("the cluster is unavailable: {0}")]
    Unavailable(String),
    #[error("the write's outcome is unknown (it may or may not have been applied): {0}")]
    Indeterminate(String),
    #[error("this node has not applied index {wanted} within {waited_ms} ms (it is at {applied})")]
    Lagging {
        wanted: u64,
        applied: u64,
        waited_ms: u64,
    },
    #[error("this node is shutting down: {0}")]
    Stopped(String),
    #[error("{0}")]
    Membership(String),
}

fn routed(e: BatchError) -> Routed {
    match e {
        BatchError::NotLeader { .. } => Routed::NotLeader,
        BatchError::Indeterminate(e) => Routed::Failed(NodeError::Indeterminate(e)),
        BatchError::Stopped(e) => Routed::Failed(NodeError::Stopped(e)),
    }
}

/// One member of the cluster.
pub struct Node {
    pub id: NodeId,
    pub member: Member,
    pub raft: Raft,
    pub view: StateView,
    batcher: Batcher,
    forwarder: Forwarder,
    peers: PeerClients,
    /// The task asking raft for this node's snapshots; it ends with the node.
    snapshot_turns: tokio::task::JoinHandle<()>,
}

impl Drop for Node {
    fn drop(&mut self) {
        self.snapshot_turns.abort();
    }
}

impl Node {
    /// Opens the node's storage under `data_dir` and starts raft.
    pub async fn start(
        id: NodeId,
        member: Member,
        data_dir: &Path,
        timing: &RaftTiming,
        peer_tls: Option<ClientTlsConfig>,
    ) -> Result<Arc<Node>, String> {
        let config = timing
            .to_config()
            .map_err(|e| format!("raft configuration: {e}"))?;
        let schedule = SnapshotSchedule::new(timing.snapshot_logs_since_last)?;
        let (log, sm) = mandate_store::open(data_dir).map_err(|e| e.to_string())?;
        let view = sm.view();
        // A binary too old for the state it finds (a node downgraded after its cluster raised
        // the apply version) must not serve that state or apply to it.
        version::current(&view)
            .and_then(version::check_supported)
            .map_err(|e| e.0)?;
        let peers = PeerClients::new(peer_tls);
        let network = NetworkFactory {
            peers: peers.clone(),
        };
        let raft = Raft::new(id, Arc::new(config), network, log, sm)
            .await
            .map_err(|e| format!("starting raft: {e}"))?;
        let batcher = Batcher::start(raft.clone());
        let forwarder = Forwarder::new(peers.clone());
        let snapshot_turns = tokio::spawn(snapshots::run(raft.clone(), id, schedule));
        Ok(Arc::new(Node {
            id,
            member,
            raft,
            view,
            batcher,
            forwarder,
            peers,
            snapshot_turns,
        }))
    }

    /// Resolves when raft stops on its own: a storage fault (corrupt data, or an entry this
    /// binary cannot apply) or another fatal error, which it returns.
    pub async fn raft_stopped(&self) -> String {
        let mut metrics = self.raft.metrics();
        loop {
            if let Err(fatal) = &metrics.borrow().running_state {
                return fatal.to_string();
            }
            if metrics.changed().await.is_err() {
                return "raft's metrics closed".into();
            }
        }
    }

    /// The current raft metrics of this node.
    pub fn metrics(&self) -> RaftMetrics<NodeId, Member> {
        self.raft.metrics().borrow().clone()
    }

    /// The leader this node knows of, with its addresses.
    pub fn leader(&self) -> Option<(NodeId, Member)> {
        let m = self.metrics();
        let id = m.current_leader?;
        let member = m.membership_config.membership().get_node(&id)?.clone();
        Some((id, member))
    }

    async fn wait_for_leader(&self) -> Result<(NodeId, Member), NodeError> {
        if let Some(leader) = self.leader() {
            return Ok(leader);
        }
        let mut metrics = self.raft.metrics();
        let wait = async {
            loop {
                if metrics.changed().await.is_err() {
                    return Err(NodeError::Stopped("raft metrics closed".into()));
                }
                if let Some(leader) = self.leader() {
                    return Ok(leader);
                }
            }
        };
        tokio::time::timeout(Duration::from_millis(LEADER_WAIT_MS), wait)
            .await
            .unwrap_or(Err(NodeError::NoLeader))
    }

    /// Initialises a new cluster with these voters. Refused if this node is already initialised.
    pub async fn initialize(&self, members: BTreeMap<NodeId, Member>) -> Result<(), NodeError> {
        self.raft
            .initialize(members)
            .await
            .map_err(|e| NodeError::Membership(e.to_string()))
    }

    /// Runs a command through the leader, wherever it is, and returns its result.
    pub async fn write(&self, command: pb::Command) -> Result<pb::CommandResult, NodeError> {
        for _ in 0..WRITE_ROUTE_ATTEMPTS_MAX {
            let (leader_id, leader) = self.wait_for_leader().await?;
            let routed = if leader_id == self.id {
                self.write_local(command.clone()).await
            } else {
                self.forwarder
                    .forward(&leader.peer_addr, command.clone())
                    .await
            };
            match routed {
                Ok(result) => return Ok(result),
                Err(Routed::NotLeader) => self.await_leader_change(leader_id).await,
                Err(Routed::Failed(e)) => return Err(e),
            }
        }
        Err(NodeError::NoLeader)
    }

    /// Proposes a command on this node, which must be the leader.
    pub async fn write_local(&self, command: pb::Command) -> Result<pb::CommandResult, Routed> {
        self.batcher.submit(command).await.map_err(routed)
    }

    /// Proposes commands on this node, which must be the leader, in order; one outcome each.
    pub async fn write_local_all(
        &self,
        commands: Vec<pb::Command>,
    ) -> Vec<Result<pb::CommandResult, Routed>> {
        let results = self.batcher.submit_all(commands).await;
        results.into_iter().map(|r| r.map_err(routed)).collect()
    }

    /// Waits (briefly) until this node learns of a leader other than `old`.
    async fn await_leader_change(&self, old: NodeId) {
        let mut metrics = self.raft.metrics();
        let changed = async {
            while metrics.changed().await.is_ok() {
                let leader = metrics.borrow().current_leader;
                if leader.is_some_and(|l| l != old) {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_millis(500), changed).await;
    }

    /// Makes local state fit for a read and returns the applied index it reflects.
    pub async fn read_barrier(
        &self,
        consistency: ReadConsistency,
        min_applied_index: u64,
    ) -> Result<u64, NodeError> {
        let wanted = match consistency {
            ReadConsistency::Stale => min_applied_index,
            ReadConsistency::Linearizable => self.read_index().await?.max(min_applied_index),
        };
        self.wait_applied(wanted).await
    }

    /// On the leader: the index a linearizable read must wait for, once a quorum has confirmed
    /// this node still leads. openraft answers the larger of its commit index and the first
    /// entry of its term; but a leader restarted without losing its term (openraft restores it
    /// as leader at once) knows a commit index that may lag entries committed and acknowledged
    /// before the crash, and its term's first entry is older still: a read at that index could
    /// miss an acknowledged write (the chaos suite's restart-all scenario caught one). The
    /// leader's last log index covers every entry it ever had committed, so reads wait for that
    /// instead; it is at most the entries in flight ahead of the commit index.
    pub async fn leader_read_index(
        &self,
    ) -> Result<u64, RaftError<NodeId, openraft::error::CheckIsLeaderError<NodeId, Member>>> {
        let (read, _) = self.raft.get_read_log_id().await?;
        let last_log = self.raft.metrics().borrow().last_log_index;
        Ok(read.map_or(0, |l| l.index).max(last_log.unwrap_or(0)))
    }

    /// The index a linearizable read must wait for, confirmed by the leader with a quorum.
    pub async fn read_index(&self) -> Result<u64, NodeError> {
        for _ in 0..WRITE_ROUTE_ATTEMPTS_MAX {
            let (leader_id, leader) = self.wait_for_leader().await?;
            if leader_id == self.id {
                match self.leader_read_index().await {
                    Ok(index) => return Ok(index),
                    Err(RaftError::APIError(_)) => {
                        self.await_leader_change(leader_id).await;
                        continue;
                    }
                    Err(RaftError::Fatal(f)) => return Err(NodeError::Stopped(f.to_string())),
                }
            }
            let mut client = self
                .peers
                .client(&leader.peer_addr)
                .map_err(|e| NodeError::Unavailable(e.to_string()))?;
            match client.read_index(ReadIndexRequest {}).await {
                Ok(r) => return Ok(r.into_inner().read_index),
                Err(status) if status.code() == tonic::Code::FailedPrecondition => {
                    self.await_leader_change(leader_id).await;
                }
                Err(status) => {
                    return Err(NodeError::Unavailable(format!(
                        "the leader at {} did not confirm a read index: {}",
                        leader.peer_addr,
                        status.message()
                    )))
                }
            }
        }
        Err(NodeError::NoLeader)
    }

    /// Waits until this node has applied `index`, and returns what it has applied.
    pub async fn wait_applied(&self, index: u64) -> Result<u64, NodeError> {
        let mut applied = self.view.applied_watch();
        let reached = tokio::time::timeout(
            Duration::from_millis(APPLY_WAIT_MS),
            applied.wait_for(|i| *i >= index),
        )
        .await;
        match reached {
            Ok(Ok(i)) => Ok(*i),
            Ok(Err(_)) => Err(NodeError::Stopped("the state machine has stopped".into())),
            Err(_) => Err(NodeError::Lagging {
                wanted: index,
                applied: self.view.applied_index(),
                waited_ms: APPLY_WAIT_MS,
            }),
        }
    }

    /// Applies a membership change on the leader, forwarding it there if needed.
    pub async fn change_membership(&self, change: MembershipChange) -> Result<(), NodeError> {
        for _ in 0..WRITE_ROUTE_ATTEMPTS_MAX {
            let (leader_id, leader) = self.wait_for_leader().await?;
            if leader_id == self.id {
                match self.change_membership_local(&change).await {
                    Err(Routed::NotLeader) => {
                        self.await_leader_change(leader_id).await;
                        continue;
                    }
                    Err(Routed::Failed(e)) => return Err(e),
                    Ok(()) => return Ok(()),
                }
            }
            let mut client = self
                .peers
                .client(&leader.peer_addr)
                .map_err(|e| NodeError::Unavailable(e.to_string()))?;
            let response = client
                .change_membership(change.clone())
                .await
                .map_err(|s| NodeError::Unavailable(s.message().to_owned()))?
                .into_inner();
            if response.not_leader {
                self.await_leader_change(leader_id).await;
                continue;
            }
            if !response.error.is_empty() {
                return Err(NodeError::Membership(response.error));
            }
            return Ok(());
        }
        Err(NodeError::NoLeader)
    }

    /// Applies a membership change; this node must be the leader.
    pub async fn change_membership_local(&self, change: &MembershipChange) -> Result<(), Routed> {
        let membership = self.metrics().membership_config.membership().clone();
        let result = match &change.change {
            None => {
                return Err(Routed::Failed(NodeError::Membership(
                    "no change given".into(),
                )))
            }
            Some(Change::AddLearner(m)) => {
                let member = Member {
                    peer_addr: m.peer_addr.clone(),
                    client_addr: m.client_addr.clone(),
                };
                self.raft.add_learner(m.id, member, false).await
            }
            Some(Change::Promote(id)) => {
                if membership.get_node(id).is_none() {
                    return Err(Routed::Failed(NodeError::Membership(format!(
                        "node {id} is not a member; add it as a learner first"
                    ))));
                }
                self.raft
                    .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([*id])), false)
                    .await
            }
            Some(Change::Remove(id)) => {
                if membership.get_node(id).is_none() {
                    return Err(Routed::Failed(NodeError::Membership(format!(
                        "node {id} is not a member"
                    ))));
                }
                let is_voter = membership.voter_ids().any(|v| v == *id);
                let removed = if is_voter {
                    self.raft
                        .change_membership(
                            ChangeMembers::RemoveVoters(BTreeSet::from([*id])),
                            false,
                        )
                        .await
                        .map(|_| ())
                } else {
                    Ok(())
                };
                match removed {
                    Ok(()) => {
                        self.raft
                            .change_membership(
                                ChangeMembers::RemoveNodes(BTreeSet::from([*id])),
                                false,
                            )
                            .await
                    }
                    Err(e) => Err(e),
                }
            }
        };
        match result {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                Err(Routed::NotLeader)
            }
            Err(e) => Err(Routed::Failed(NodeError::Membership(e.to_string()))),
        }
    }

    /// The newest apply version each member applies, this node's first, asked of the others
    /// over the peer API. A member from before apply versions answers `Unimplemented`: it
    /// applies the first. A member that does not answer leaves the question open, and the error
    /// names it.
    pub async fn members_apply_versions(&self) -> Result<Vec<u32>, NodeError> {
        let membership = self.metrics().membership_config.membership().clone();
        let mut versions = vec![APPLY_VERSION_MAX];
        for (id, member) in membership.nodes().filter(|(id, _)| **id != self.id) {
            let unanswered = |why: String| {
                NodeError::Unavailable(format!(
                    "node {id} at {} did not say which apply version it applies: {why}",
                    member.peer_addr
                ))
            };
            let mut client = self
                .peers
                .client(&member.peer_addr)
                .map_err(|e| unanswered(e.to_string()))?;
            let asked = tokio::time::timeout(
                Duration::from_millis(APPLY_VERSION_ASK_TIMEOUT_MS),
                client.apply_version(ApplyVersionRequest {}),
            )
            .await
            .map_err(|_| unanswered(format!("no answer in {APPLY_VERSION_ASK_TIMEOUT_MS} ms")))?;
            versions.push(match asked {
                Ok(answer) => answer.into_inner().apply_version_max,
                Err(status) if status.code() == tonic::Code::Unimplemented => APPLY_VERSION_FIRST,
                Err(status) => return Err(unanswered(status.message().to_owned())),
            });
        }
        Ok(versions)
    }

    /// Raises the cluster's apply version as far as every member applies, through the leader,
    /// and returns the version it raised to (`None`: nothing to raise, or no cluster yet).
    pub async fn raise_apply_version(&self) -> Result<Option<u32>, NodeError> {
        let cluster = self
            .view
            .cluster()
            .map_err(|e| NodeError::Unavailable(e.to_string()))?;
        let Some(current) = cluster.map(|c| version::effective(c.apply_version)) else {
            return Ok(None);
        };
        if current >= APPLY_VERSION_MAX {
            return Ok(None);
        }
        let Some(to) = version::raise_to(current, self.members_apply_versions().await?) else {
            return Ok(None);
        };
        let command = pb::Command {
            kind: Some(pb::command::Kind::RaiseApplyVersion(
                pb::RaiseApplyVersion { version: to },
            )),
            serving_node: self.id,
            ..Default::default()
        };
        match self.write(command).await?.outcome {
            Some(pb::command_result::Outcome::Applied(_)) => Ok(Some(to)),
            // Refused only when it is already as high: raised meanwhile on another leader's turn.
            Some(pb::command_result::Outcome::Error(_)) => Ok(None),
            None => Err(NodeError::Unavailable(
                "raising the apply version returned no outcome".into(),
            )),
        }
    }

    /// Is this node a voter, learner, leader...: its role for status output.
    pub fn role(&self) -> &'static str {
        role_name(self.metrics().state)
    }
}

/// The name `cluster status` shows for a server state.
pub fn role_name(state: ServerState) -> &'static str {
    match state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Learner => "learner",
        ServerState::Candidate => "candidate",
        ServerState::Shutdown => "shutdown",
    }
}

/// The outcome of routing a request to one node.
#[derive(Debug)]
pub enum Routed {
    /// The target was not the leader; nothing happened and the caller may try the new leader.
    NotLeader,
    Failed(NodeError),
}

#[cfg(test)]
mod tests {
    use mandate_proto::v1::Member as MemberMsg;
    use tonic::service::Routes;
    use tonic::transport::server::TcpIncoming;

    use super::*;
    use crate::RaftTiming;

    /// A one-node cluster bootstrapped at the first apply version, as a cluster from before
    /// versions is.
    async fn cluster_at_the_first_version() -> (tempfile::TempDir, Arc<Node>) {
        let dir = tempfile::tempdir().expect("temporary directory");
        let member = Member {
            peer_addr: "127.0.0.1:1".into(),
            client_addr: "127.0.0.1:2".into(),
        };
        let node = Node::start(1, member.clone(), dir.path(), &RaftTiming::default(), None)
            .await
            .expect("node starts");
        node.initialize(BTreeMap::from([(1, member)]))
            .await
            .expect("initialized");
        let bootstrap = pb::Command {
            kind: Some(pb::command::Kind::BootstrapCluster(pb::BootstrapCluster {
                cluster_id: "mc_versions".into(),
                root_token_id: "tok_root".into(),
                root_secret_sha256: vec![0; 32],
                signing_key: None,
                apply_version: 0,
            })),
            ..Default::default()
        };
        let applied = node.write(bootstrap).await.expect("bootstrapped");
        assert!(matches!(
            applied.outcome,
            Some(pb::command_result::Outcome::Applied(_))
        ));
        assert_eq!(version::current(&node.view), Ok(APPLY_VERSION_FIRST));
        (dir, node)
    }

    async fn add_learner(node: &Node, peer_addr: &str) {
        node.change_membership(MembershipChange {
            change: Some(Change::AddLearner(MemberMsg {
                id: 2,
                peer_addr: peer_addr.into(),
                client_addr: "127.0.0.1:3".into(),
            })),
        })
        .await
        .expect("learner added");
    }

    #[tokio::test]
    async fn a_leader_whose_members_all_apply_the_newest_version_raises_the_cluster_to_it() {
        let (_dir, node) = cluster_at_the_first_version().await;
        let raised = node
            .raise_apply_version()
            .await
            .expect("every member answered");
        assert_eq!(raised, Some(APPLY_VERSION_MAX));
        assert_eq!(version::current(&node.view), Ok(APPLY_VERSION_MAX));
        let again = node.raise_apply_version().await.expect("nothing to ask");
        assert_eq!(again, None, "raised past the newest version");
    }

    #[tokio::test]
    async fn a_member_from_before_apply_versions_keeps_the_cluster_at_the_first() {
        let (_dir, node) = cluster_at_the_first_version().await;
        // A peer listener that knows no apply-version call answers Unimplemented, as a node of
        // an earlier release does.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address").to_string();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_routes(Routes::default())
                .serve_with_incoming(TcpIncoming::from(listener)),
        );
        add_learner(&node, &addr).await;
        let versions = node.members_apply_versions().await.expect("answered");
        assert_eq!(versions, vec![APPLY_VERSION_MAX, APPLY_VERSION_FIRST]);
        let raised = node.raise_apply_version().await.expect("answered");
        assert_eq!(raised, None, "raised past what node 2 applies");
        assert_eq!(version::current(&node.view), Ok(APPLY_VERSION_FIRST));
    }

    #[tokio::test]
    async fn an_entry_raising_the_version_past_this_binary_stops_raft_with_the_fault() {
        let (_dir, node) = cluster_at_the_first_version().await;
        let raise = pb::Command {
            kind: Some(pb::command::Kind::RaiseApplyVersion(
                pb::RaiseApplyVersion {
                    version: APPLY_VERSION_MAX + 1,
                },
            )),
            ..Default::default()
        };
        assert!(node.write(raise).await.is_err(), "the entry was applied");
        let fault = tokio::time::timeout(Duration::from_secs(10), node.raft_stopped())
            .await
            .expect("raft went on");
        assert!(fault.contains("upgrade this node's binary"), "{fault}");
        assert_eq!(version::current(&node.view), Ok(APPLY_VERSION_FIRST));
    }

    #[tokio::test]
    async fn a_member_that_does_not_answer_is_named_and_the_version_stays() {
        let (_dir, node) = cluster_at_the_first_version().await;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("address").to_string();
        drop(listener);
        add_learner(&node, &addr).await;
        let Err(NodeError::Unavailable(why)) = node.raise_apply_version().await else {
            panic!("raised without hearing from node 2");
        };
        assert!(
            why.contains(&format!("node 2 at {addr}")),
            "the error does not name the member: {why}"
        );
        assert_eq!(version::current(&node.view), Ok(APPLY_VERSION_FIRST));
    }
}
