//! The follower-side forwarder: the writes waiting on a follower go to the leader together.
//!
//! A follower hands every client write it receives to the leader. One call per write made the
//! follower and the leader each pay an HTTP/2 stream, TLS records, a server task and the
//! syscalls for every command (etcd, by contrast, lets a follower's proposals ride its raft
//! stream). The forwarder packs the writes waiting on this node into one `ForwardBatch` call: a
//! call leaves at once while fewer than [`FORWARDS_IN_FLIGHT_MAX`] are in flight, so an idle
//! node adds no latency; while that many are in flight, writes accumulate and leave together in
//! the next call, up to [`FORWARD_COMMANDS_MAX`] commands or [`FORWARD_BYTES_MAX`] bytes. The
//! leader puts them into its own batcher in order and answers one outcome per command.
//!
//! Each leader address has its own lane (queue, task and in-flight limit), so calls stuck at a
//! leader that stopped answering (paused, or cut off without a reset) never hold up writes to
//! the leader that replaced it; a stuck call ends at [`FORWARD_TIMEOUT_MS`] and its writes are
//! indeterminate. A leader from before `ForwardBatch` answers Unimplemented; the writes of that
//! call are then forwarded one by one, so a rolling upgrade may upgrade followers first.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mandate_core::pb;
use mandate_proto::v1::{ForwardBatchRequest, ForwardRequest, ForwardResponse};
use prost::Message;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tonic::{Code, Request};

use crate::batcher::held_or_next;
use crate::network::PeerClients;
use crate::node::{NodeError, Routed};

/// Most commands in one forwarding call.
pub const FORWARD_COMMANDS_MAX: usize = crate::batcher::BATCH_COMMANDS_MAX;
/// Most encoded bytes of commands in one forwarding call (a larger command goes alone).
pub const FORWARD_BYTES_MAX: usize = crate::batcher::BATCH_BYTES_MAX;
/// Most forwarding calls in flight from one node to one leader.
pub const FORWARDS_IN_FLIGHT_MAX: usize = 4;
/// Most writes queued for one leader; beyond this, writers wait (back-pressure).
pub const FORWARD_QUEUE_MAX: usize = crate::batcher::QUEUE_COMMANDS_MAX;
/// Longest a forwarding call may take, commit included, before its writes are indeterminate.
pub const FORWARD_TIMEOUT_MS: u64 = 10_000;

type Reply = oneshot::Sender<Result<pb::CommandResult, Routed>>;

struct Pending {
    command: pb::Command,
    reply: Reply,
}

/// Handle for forwarding writes to the leader.
#[derive(Clone)]
pub struct Forwarder {
    peers: PeerClients,
    /// One lane per leader peer address this node has forwarded to (at most one per member
    /// that has led).
    lanes: Arc<Mutex<HashMap<String, mpsc::Sender<Pending>>>>,
}

impl Forwarder {
    /// A forwarder that reaches leaders through `peers`; a lane's task starts with its first
    /// write.
    pub fn new(peers: PeerClients) -> Self {
        Forwarder {
            peers,
            lanes: Arc::default(),
        }
    }

    fn lane(&self, leader_addr: &str) -> mpsc::Sender<Pending> {
        let mut lanes = self.lanes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(tx) = lanes.get(leader_addr) {
            return tx.clone();
        }
        let (tx, rx) = mpsc::channel(FORWARD_QUEUE_MAX);
        tokio::spawn(run(self.peers.clone(), leader_addr.to_owned(), rx));
        lanes.insert(leader_addr.to_owned(), tx.clone());
        tx
    }

    /// Hands `command` to the leader at `leader_addr` (its peer address) and waits for its
    /// outcome there.
    pub async fn forward(
        &self,
        leader_addr: &str,
        command: pb::Command,
    ) -> Result<pb::CommandResult, Routed> {
        let (reply, rx) = oneshot::channel();
        self.lane(leader_addr)
            .send(Pending { command, reply })
            .await
            .map_err(|_| stopped("the forwarder has stopped"))?;
        rx.await
            .map_err(|_| stopped("the forwarder dropped the write"))?
    }
}

fn stopped(why: &str) -> Routed {
    Routed::Failed(NodeError::Stopped(why.into()))
}

fn deadline<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request.set_timeout(Duration::from_millis(FORWARD_TIMEOUT_MS));
    request
}

/// The lane to the leader at `addr`.
async fn run(peers: PeerClients, addr: String, mut rx: mpsc::Receiver<Pending>) {
    let in_flight = Arc::new(Semaphore::new(FORWARDS_IN_FLIGHT_MAX));
    let mut next: Option<Pending> = None;
    loop {
        let Some(first) = held_or_next(&mut next, &mut rx).await else {
            return;
        };
        // While every call is in flight, the writes behind this one accumulate in the queue.
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let mut bytes = first.command.encoded_len();
        let mut group = vec![first];
        while group.len() < FORWARD_COMMANDS_MAX {
            let Ok(p) = rx.try_recv() else { break };
            let len = p.command.encoded_len();
            if bytes + len > FORWARD_BYTES_MAX {
                next = Some(p);
                break;
            }
            bytes += len;
            group.push(p);
        }
        let (peers, addr) = (peers.clone(), addr.clone());
        tokio::spawn(async move {
            send(&peers, &addr, group).await;
            drop(permit);
        });
    }
}

/// Forwards one group to the leader at `addr` and answers each of its writers.
async fn send(peers: &PeerClients, addr: &str, group: Vec<Pending>) {
    let mut client = match peers.client(addr) {
        Ok(c) => c,
        Err(e) => {
            let error = NodeError::Unavailable(e.to_string());
            for p in group {
                let _ = p.reply.send(Err(Routed::Failed(error.clone())));
            }
            return;
        }
    };
    let (commands, replies): (Vec<_>, Vec<_>) =
        group.into_iter().map(|p| (p.command, p.reply)).unzip();
    let request = deadline(ForwardBatchRequest {
        commands: commands.clone(),
    });
    match client.forward_batch(request).await {
        Ok(response) => {
            let mut results = response.into_inner().results.into_iter();
            for reply in replies {
                let outcome = match results.next() {
                    Some(r) => routed(addr, r),
                    None => Err(indeterminate(addr, "the leader answered fewer outcomes")),
                };
                let _ = reply.send(outcome);
            }
        }
        Err(status) if status.code() == Code::Unimplemented => {
            for (command, reply) in commands.into_iter().zip(replies) {
                let mut client = client.clone();
                let addr = addr.to_owned();
                tokio::spawn(async move {
                    let outcome = match client
                        .forward(deadline(ForwardRequest {
                            command: Some(command),
                        }))
                        .await
                    {
                        Ok(response) => routed(&addr, response.into_inner()),
                        Err(status) => Err(indeterminate(&addr, status.message())),
                    };
                    let _ = reply.send(outcome);
                });
            }
        }
        Err(status) => {
            for reply in replies {
                let _ = reply.send(Err(indeterminate(addr, status.message())));
            }
        }
    }
}

fn indeterminate(addr: &str, why: &str) -> Routed {
    Routed::Failed(NodeError::Indeterminate(format!(
        "forwarding to the leader at {addr} failed: {why}"
    )))
}

/// What one command's forwarded outcome means to its writer.
fn routed(addr: &str, response: ForwardResponse) -> Result<pb::CommandResult, Routed> {
    if response.not_leader {
        return Err(Routed::NotLeader);
    }
    if !response.error.is_empty() {
        return Err(indeterminate(addr, &response.error));
    }
    response
        .result
        .ok_or_else(|| indeterminate(addr, "the leader returned no result"))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use mandate_proto::v1::raft_peer_server::{RaftPeer, RaftPeerServer};
    use mandate_proto::v1::{
        ApplyVersionRequest, ApplyVersionResponse, ForwardBatchResponse, MembershipChange,
        MembershipChangeResponse, RaftPayload, ReadIndexRequest, ReadIndexResponse,
    };
    use tokio::sync::watch;
    use tonic::transport::server::TcpIncoming;
    use tonic::{Response, Status};

    use super::*;

    /// A stand-in leader. A command whose `time_ms` is a multiple of 3 commits at that index;
    /// one a multiple of 3 plus 1 meets a node that is not the leader; the rest are lost.
    /// Every call first takes a permit from `gate`, as a commit would hold it.
    struct FakeLeader {
        batches: bool,
        gate: Arc<Semaphore>,
        calls: watch::Sender<usize>,
        single_calls: Arc<AtomicUsize>,
    }

    fn answer(command: &pb::Command) -> ForwardResponse {
        match command.time_ms % 3 {
            0 => ForwardResponse {
                result: Some(pb::CommandResult {
                    log_index: command.time_ms,
                    outcome: None,
                }),
                ..Default::default()
            },
            1 => ForwardResponse {
                not_leader: true,
                ..Default::default()
            },
            _ => ForwardResponse {
                error: "the entry was lost".into(),
                ..Default::default()
            },
        }
    }

    fn not_here<T>() -> Result<Response<T>, Status> {
        Err(Status::unimplemented("the stand-in leader forwards only"))
    }

    #[tonic::async_trait]
    impl RaftPeer for FakeLeader {
        async fn append_entries(
            &self,
            _: Request<RaftPayload>,
        ) -> Result<Response<RaftPayload>, Status> {
            not_here()
        }
        async fn vote(&self, _: Request<RaftPayload>) -> Result<Response<RaftPayload>, Status> {
            not_here()
        }
        async fn install_snapshot(
            &self,
            _: Request<RaftPayload>,
        ) -> Result<Response<RaftPayload>, Status> {
            not_here()
        }
        async fn forward(
            &self,
            request: Request<ForwardRequest>,
        ) -> Result<Response<ForwardResponse>, Status> {
            self.single_calls.fetch_add(1, Ordering::SeqCst);
            let command = request.into_inner().command.unwrap_or_default();
            Ok(Response::new(answer(&command)))
        }
        async fn forward_batch(
            &self,
            request: Request<ForwardBatchRequest>,
        ) -> Result<Response<ForwardBatchResponse>, Status> {
            if !self.batches {
                return Err(Status::unimplemented("unknown method ForwardBatch"));
            }
            self.calls.send_modify(|c| *c += 1);
            self.gate.acquire().await.expect("gate open").forget();
            let results = request.into_inner().commands.iter().map(answer).collect();
            Ok(Response::new(ForwardBatchResponse { results }))
        }
        async fn read_index(
            &self,
            _: Request<ReadIndexRequest>,
        ) -> Result<Response<ReadIndexResponse>, Status> {
            not_here()
        }
        async fn change_membership(
            &self,
            _: Request<MembershipChange>,
        ) -> Result<Response<MembershipChangeResponse>, Status> {
            not_here()
        }
        async fn apply_version(
            &self,
            _: Request<ApplyVersionRequest>,
        ) -> Result<Response<ApplyVersionResponse>, Status> {
            not_here()
        }
    }

    struct Setup {
        addr: String,
        gate: Arc<Semaphore>,
        calls: watch::Receiver<usize>,
        single_calls: Arc<AtomicUsize>,
        forwarder: Forwarder,
    }

    async fn leader(batches: bool, permits: usize) -> Setup {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address").to_string();
        let gate = Arc::new(Semaphore::new(permits));
        let (calls_tx, calls) = watch::channel(0);
        let single_calls = Arc::new(AtomicUsize::new(0));
        let fake = FakeLeader {
            batches,
            gate: gate.clone(),
            calls: calls_tx,
            single_calls: single_calls.clone(),
        };
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(RaftPeerServer::new(fake))
                .serve_with_incoming(TcpIncoming::from(listener)),
        );
        Setup {
            addr,
            gate,
            calls,
            single_calls,
            forwarder: Forwarder::new(PeerClients::new(None)),
        }
    }

    fn command(time_ms: u64) -> pb::Command {
        pb::Command {
            time_ms,
            ..Default::default()
        }
    }

    fn write(
        s: &Setup,
        time_ms: u64,
    ) -> tokio::task::JoinHandle<Result<pb::CommandResult, Routed>> {
        let (forwarder, addr) = (s.forwarder.clone(), s.addr.clone());
        tokio::spawn(async move { forwarder.forward(&addr, command(time_ms)).await })
    }

    #[tokio::test]
    async fn writes_that_queue_behind_full_flight_leave_in_one_call_and_each_gets_its_own_result() {
        let mut s = leader(true, 0).await;
        let mut writers = Vec::new();
        // Fill every call slot with one write each, held at the leader.
        for i in 0..FORWARDS_IN_FLIGHT_MAX {
            writers.push(write(&s, 3 * i as u64));
            s.calls
                .wait_for(|c| *c == i + 1)
                .await
                .expect("the leader took the call");
        }
        let queued = 150;
        for i in FORWARDS_IN_FLIGHT_MAX..FORWARDS_IN_FLIGHT_MAX + queued {
            writers.push(write(&s, 3 * i as u64));
        }
        // Wait until the forwarder's queue holds them (one may already be in its hands).
        let lane = s.forwarder.lane(&s.addr);
        while FORWARD_QUEUE_MAX - lane.capacity() < queued - 1 {
            tokio::task::yield_now().await;
        }
        s.gate.add_permits(FORWARDS_IN_FLIGHT_MAX + 1);
        for (i, writer) in writers.into_iter().enumerate() {
            let result = writer.await.expect("writer ran").expect("committed");
            assert_eq!(
                result.log_index,
                3 * i as u64,
                "write {i} got another's result"
            );
        }
        assert_eq!(
            *s.calls.borrow(),
            FORWARDS_IN_FLIGHT_MAX + 1,
            "the {queued} queued writes should have left in one call"
        );
    }

    #[tokio::test]
    async fn calls_stuck_at_a_silent_leader_do_not_hold_up_writes_to_its_successor() {
        let mut silent = leader(true, 0).await;
        let mut stuck = Vec::new();
        for i in 0..FORWARDS_IN_FLIGHT_MAX + 1 {
            stuck.push(write(&silent, 3 * i as u64));
            if i < FORWARDS_IN_FLIGHT_MAX {
                silent
                    .calls
                    .wait_for(|c| *c == i + 1)
                    .await
                    .expect("the silent leader took the call");
            }
        }
        let successor = leader(true, 100).await;
        // A bound on the wait, so that a regression fails here instead of hanging.
        let result = tokio::time::timeout(
            Duration::from_secs(30),
            silent.forwarder.forward(&successor.addr, command(3)),
        )
        .await
        .expect("the write to the successor is not held up")
        .expect("the successor commits it");
        assert_eq!(result.log_index, 3);
        assert!(
            stuck.iter().all(|w| !w.is_finished()),
            "the silent leader's writes are still waiting"
        );
    }

    #[tokio::test]
    async fn a_forwarded_write_gets_its_own_outcome_committed_not_leader_or_lost() {
        let s = leader(true, 100).await;
        let [committed, not_leader, lost] = [0, 1, 2].map(|t| write(&s, t));
        let committed = committed.await.expect("ran");
        assert_eq!(committed.expect("committed").log_index, 0);
        let not_leader = not_leader.await.expect("ran");
        assert!(
            matches!(not_leader, Err(Routed::NotLeader)),
            "{not_leader:?}"
        );
        match lost.await.expect("ran") {
            Err(Routed::Failed(NodeError::Indeterminate(why))) => {
                assert!(why.contains("the entry was lost"), "{why}");
                assert!(why.contains(&s.addr), "{why}");
            }
            other => panic!("a lost entry is indeterminate, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_leader_without_forward_batch_gets_the_writes_one_by_one() {
        let s = leader(false, 0).await;
        let writers: Vec<_> = (0..10).map(|i| write(&s, 3 * i)).collect();
        for (i, writer) in writers.into_iter().enumerate() {
            let result = writer.await.expect("writer ran").expect("committed");
            assert_eq!(result.log_index, 3 * i as u64);
        }
        assert_eq!(s.single_calls.load(Ordering::SeqCst), 10);
    }

    #[tokio::test]
    async fn a_leader_that_cannot_be_reached_leaves_the_write_indeterminate() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("address").to_string();
        drop(listener);
        let forwarder = Forwarder::new(PeerClients::new(None));
        match forwarder.forward(&addr, command(0)).await {
            Err(Routed::Failed(NodeError::Indeterminate(why))) => {
                assert!(why.contains(&addr), "{why}")
            }
            other => panic!("an unreachable leader fails the write, got {other:?}"),
        }
    }
}
