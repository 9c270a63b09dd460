//! Refused authentications, for the audit trail. A refusal happens before anything is
//! proposed, so each node queues its refusals and proposes them in batches: at most
//! [`REFUSALS_PER_BATCH`] per [`REFUSAL_FLUSH_MS`], from a queue of [`REFUSAL_QUEUE`]. A flood
//! beyond that is dropped from the trail — counted, and the count itself is recorded with the
//! next batch and shown by `mandate audit info`, so nothing is dropped silently and a flood
//! cannot crowd out writes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mandate_core::pb;
use mandate_raft::Node;
use tokio::sync::mpsc;

use crate::sealing::AuditHasher;

/// Refusals waiting to be proposed, per node.
pub const REFUSAL_QUEUE: usize = 1024;
/// Most refusals proposed in one command.
pub const REFUSALS_PER_BATCH: usize = 100;
/// How often the queue is proposed.
pub const REFUSAL_FLUSH_MS: u64 = 1_000;
/// Longest reason kept.
const REASON_BYTES_MAX: usize = 256;

/// This node's queue of refused authentications.
pub struct Refusals {
    tx: mpsc::Sender<pb::Refusal>,
    rx: Mutex<Option<mpsc::Receiver<pb::Refusal>>>,
    hasher: AuditHasher,
    /// Refusals dropped since the last batch was proposed.
    pending_drops: AtomicU64,
    /// Refusals dropped since the node started.
    dropped_total: AtomicU64,
}

fn truncated(text: &str) -> String {
    let mut end = text.len().min(REASON_BYTES_MAX);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

impl Refusals {
    pub fn new(hasher: AuditHasher) -> Arc<Self> {
        let (tx, rx) = mpsc::channel(REFUSAL_QUEUE);
        Arc::new(Refusals {
            tx,
            rx: Mutex::new(Some(rx)),
            hasher,
            pending_drops: AtomicU64::new(0),
            dropped_total: AtomicU64::new(0),
        })
    }

    fn push(&self, kind: &str, subject: String, reason: &str) {
        let refusal = pb::Refusal {
            kind: kind.to_owned(),
            subject,
            reason: truncated(reason),
        };
        if self.tx.try_send(refusal).is_err() {
            self.pending_drops.fetch_add(1, Ordering::Relaxed);
            self.dropped_total.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// An operator token was refused; `token_id` is the id part it presented, if any.
    pub fn operator(&self, token_id: Option<&str>, reason: &str) {
        let subject = token_id
            .map(|id| self.hasher.token_id(id))
            .unwrap_or_default();
        self.push("operator", subject, reason);
    }

    /// A user token was refused; `subject` is the `sub` it claimed, if it could be read.
    pub fn user(&self, subject: Option<&str>, reason: &str) {
        self.push("user", subject.unwrap_or_default().to_owned(), reason);
    }

    /// An agent's client assertion was refused; `agent` is the `iss` it claimed, if readable.
    pub fn agent(&self, agent: Option<&str>, reason: &str) {
        self.push("agent", agent.unwrap_or_default().to_owned(), reason);
    }

    /// Refusals dropped from the trail since this node started.
    pub fn dropped(&self) -> u64 {
        self.dropped_total.load(Ordering::Relaxed)
    }
}

/// Proposes the queued refusals every [`REFUSAL_FLUSH_MS`] until the node stops.
pub async fn flush(node: Arc<Node>, refusals: Arc<Refusals>) {
    let Some(mut rx) = refusals.rx.lock().ok().and_then(|mut r| r.take()) else {
        return;
    };
    let mut tick = tokio::time::interval(Duration::from_millis(REFUSAL_FLUSH_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let mut batch = Vec::new();
        while batch.len() < REFUSALS_PER_BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let dropped = refusals.pending_drops.swap(0, Ordering::Relaxed);
        if batch.is_empty() && dropped == 0 {
            continue;
        }
        let command = pb::Command {
            kind: Some(pb::command::Kind::RecordRefusals(pb::RecordRefusals {
                refusals: batch,
                dropped,
            })),
            serving_node: node.id,
            ..Default::default()
        };
        let lost = match &command.kind {
            Some(pb::command::Kind::RecordRefusals(r)) => r.refusals.len() as u64 + r.dropped,
            _ => 0,
        };
        if let Err(e) = node.write(command).await {
            // Counted again as dropped, so the next batch records the loss.
            refusals.pending_drops.fetch_add(lost, Ordering::Relaxed);
            refusals.dropped_total.fetch_add(lost, Ordering::Relaxed);
            tracing::warn!(error = %e, "refused authentications could not be recorded");
        }
    }
}
