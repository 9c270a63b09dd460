//! The leader-side batcher: group commit for the raft log.
//!
//! openraft appends and fsyncs one entry at a time, so one command per entry would cap
//! throughput at one command per fsync. The batcher packs concurrent commands into one entry.
//! A batch is proposed when it holds [`BATCH_COMMANDS_MAX`] commands or [`BATCH_BYTES_MAX`]
//! bytes, when [`BATCH_LINGER_US`] has passed since its first command, or at once when no
//! proposal is in flight (an idle cluster adds no latency). At most [`PROPOSALS_IN_FLIGHT_MAX`]
//! batches are in flight; while the pipeline is full, commands accumulate. Every caller gets
//! the result of its own command.

use std::sync::Arc;
use std::time::Duration;

use mandate_core::pb;
use mandate_store::{Batch, Member, NodeId};
use openraft::error::{ClientWriteError, RaftError};
use prost::Message;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::time::Instant;

use crate::stamp;
use crate::Raft;

/// Most commands in one log entry.
pub const BATCH_COMMANDS_MAX: usize = mandate_core::limits::BATCH_COMMANDS_MAX;
/// Most encoded bytes of commands in one log entry (one record of a log segment).
pub const BATCH_BYTES_MAX: usize = 1024 * 1024;
/// Longest a command waits for company before its batch is proposed anyway.
pub const BATCH_LINGER_US: u64 = 1_000;
/// Most batches proposed and not yet applied.
pub const PROPOSALS_IN_FLIGHT_MAX: usize = 8;
/// Most commands queued in front of the batcher; beyond this, writers wait (back-pressure).
pub const QUEUE_COMMANDS_MAX: usize = 16 * 1024;

/// Why a write did not produce a result.
#[derive(Debug, Clone, thiserror::Error)]
pub enum BatchError {
    /// This node is not the leader: nothing was proposed.
    #[error("this node is not the leader")]
    NotLeader { leader: Option<(NodeId, Member)> },
    /// The outcome is unknown: the entry may or may not commit.
    #[error("the write's outcome is unknown: {0}")]
    Indeterminate(String),
    /// The raft node has stopped.
    #[error("the raft node has stopped: {0}")]
    Stopped(String),
}

type Reply = oneshot::Sender<Result<pb::CommandResult, BatchError>>;

struct Pending {
    command: pb::Command,
    reply: Reply,
}

/// Handle for submitting commands to the leader's batcher.
#[derive(Clone)]
pub struct Batcher {
    tx: mpsc::Sender<Pending>,
}

impl Batcher {
    /// Starts the batcher task for `raft`.
    pub fn start(raft: Raft) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE_COMMANDS_MAX);
        tokio::spawn(run(raft, rx));
        Batcher { tx }
    }

    /// Submits one unstamped command and waits for its result.
    pub async fn submit(&self, command: pb::Command) -> Result<pb::CommandResult, BatchError> {
        let queued = self.enqueue(command).await;
        outcome(queued).await
    }

    /// Submits unstamped commands in order, all before waiting for any, and returns their
    /// results in the same order.
    pub async fn submit_all(
        &self,
        commands: Vec<pb::Command>,
    ) -> Vec<Result<pb::CommandResult, BatchError>> {
        let mut queued = Vec::with_capacity(commands.len());
        for command in commands {
            queued.push(self.enqueue(command).await);
        }
        let mut results = Vec::with_capacity(queued.len());
        for q in queued {
            results.push(outcome(q).await);
        }
        results
    }

    async fn enqueue(&self, command: pb::Command) -> Result<Outcome, BatchError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Pending { command, reply })
            .await
            .map_err(|_| BatchError::Stopped("the batcher has stopped".into()))?;
        Ok(rx)
    }
}

type Outcome = oneshot::Receiver<Result<pb::CommandResult, BatchError>>;

async fn outcome(queued: Result<Outcome, BatchError>) -> Result<pb::CommandResult, BatchError> {
    queued?
        .await
        .map_err(|_| BatchError::Indeterminate("the batcher dropped the command".into()))?
}

/// The command held over from the last batch (it did not fit), else the next one queued;
/// `None` once every sender is gone.
pub(crate) async fn held_or_next<T>(held: &mut Option<T>, rx: &mut mpsc::Receiver<T>) -> Option<T> {
    match held.take() {
        Some(p) => Some(p),
        None => rx.recv().await,
    }
}

async fn run(raft: Raft, mut rx: mpsc::Receiver<Pending>) {
    let in_flight = Arc::new(Semaphore::new(PROPOSALS_IN_FLIGHT_MAX));
    let mut next: Option<Pending> = None;
    loop {
        let Some(first) = held_or_next(&mut next, &mut rx).await else {
            return;
        };
        let deadline = Instant::now() + Duration::from_micros(BATCH_LINGER_US);
        let mut bytes = first.command.encoded_len();
        let mut batch = vec![first];
        while batch.len() < BATCH_COMMANDS_MAX && bytes < BATCH_BYTES_MAX {
            let idle = in_flight.available_permits() == PROPOSALS_IN_FLIGHT_MAX;
            let more = if idle {
                rx.try_recv().ok()
            } else {
                tokio::time::timeout_at(deadline, rx.recv())
                    .await
                    .ok()
                    .flatten()
            };
            let Some(p) = more else { break };
            let len = p.command.encoded_len();
            if bytes + len > BATCH_BYTES_MAX {
                next = Some(p);
                break;
            }
            bytes += len;
            batch.push(p);
        }
        let permit = match in_flight.clone().acquire_owned().await {
            Ok(p) => p,
            Err(_) => return,
        };
        let raft = raft.clone();
        tokio::spawn(async move {
            propose(&raft, batch).await;
            drop(permit);
        });
    }
}

async fn propose(raft: &Raft, batch: Vec<Pending>) {
    let time_ms = stamp::now_ms();
    let (commands, replies): (Vec<_>, Vec<_>) = {
        let mut rng = rand::thread_rng();
        batch
            .into_iter()
            .map(|mut p| {
                stamp::stamp(&mut p.command, time_ms, &mut rng);
                (p.command, p.reply)
            })
            .unzip()
    };
    let count = commands.len();
    let outcome = raft
        .client_write(Batch::new(&pb::CommandBatch { commands }))
        .await;
    match outcome {
        Ok(response) => {
            let results = response.data.0;
            assert_eq!(
                results.len(),
                count,
                "apply returned one result per command"
            );
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(Ok(result));
            }
        }
        Err(e) => {
            let error = classify(e);
            for reply in replies {
                let _ = reply.send(Err(error.clone()));
            }
        }
    }
}

fn classify(e: RaftError<NodeId, ClientWriteError<NodeId, Member>>) -> BatchError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => BatchError::NotLeader {
            leader: f.leader_id.zip(f.leader_node),
        },
        RaftError::APIError(ClientWriteError::ChangeMembershipError(c)) => {
            BatchError::Indeterminate(c.to_string())
        }
        RaftError::Fatal(f) => BatchError::Stopped(f.to_string()),
    }
}
