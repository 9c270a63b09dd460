//! The audit service: subscriptions to the trail. A subscription reads records from this
//! node's storage from its cursor on, in chunks, and (when following) waits for the node to
//! apply more. It never holds up apply: a slow subscriber only reads storage later, and a gone
//! subscriber's task ends.

use std::sync::Arc;

use mandate_core::state::decode;
use mandate_core::{keys, pb, DomainError, StorageFault};
use mandate_proto::v1::audit_server::Audit;
use mandate_raft::{Node, ReadConsistency};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::{auth, status};

/// Records read from storage per step.
pub const SUBSCRIBE_CHUNK: usize = 256;
/// Records buffered per subscriber before reading pauses.
pub const SUBSCRIBER_BUFFER: usize = 1024;
/// Most type filters in one subscription.
pub const SUBSCRIBE_TYPES_MAX: usize = 32;

pub struct AuditService {
    node: Arc<Node>,
}

impl AuditService {
    pub fn new(node: Arc<Node>) -> Self {
        AuditService { node }
    }
}

fn check_filter(r: &pb::SubscribeRequest) -> Result<(), DomainError> {
    if r.types.len() > SUBSCRIBE_TYPES_MAX {
        return Err(DomainError::invalid(
            "types",
            format!("at most {SUBSCRIBE_TYPES_MAX} types"),
        ));
    }
    if pb::Decision::try_from(r.decision).is_err() {
        return Err(DomainError::invalid("decision", "is not a decision"));
    }
    if let (Some(from), Some(to)) = (&r.from, &r.to) {
        if (to.log_index, to.sequence) < (from.log_index, from.sequence) {
            return Err(DomainError::invalid("to", "is before from"));
        }
    }
    Ok(())
}

/// The key just after `key`, to resume a scan past it.
fn after(key: &[u8]) -> Vec<u8> {
    let mut next = key.to_vec();
    next.push(0);
    next
}

type Sender = mpsc::Sender<Result<pb::AuditRecord, Status>>;

/// Sends matching records from storage until the end (or, following, forever); returns when
/// the subscriber is gone, the end is passed, or storage fails (reported to the subscriber).
async fn feed(node: Arc<Node>, r: pb::SubscribeRequest, tx: Sender) {
    let from = r.from.unwrap_or_default();
    let mut cursor = keys::audit(from.log_index, from.sequence);
    let end = r.to.as_ref().map(|p| keys::audit(p.log_index, p.sequence));
    let mut applied = node.view.applied_watch();
    loop {
        applied.borrow_and_update();
        let chunk: Result<Vec<_>, StorageFault> = node
            .view
            .scan(keys::AUDIT_PREFIX, &cursor)
            .take(SUBSCRIBE_CHUNK)
            .collect();
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                let _ = tx.send(Err(status::from_fault(&e))).await;
                return;
            }
        };
        let full = chunk.len() == SUBSCRIBE_CHUNK;
        for (key, value) in chunk {
            if end.as_ref().is_some_and(|e| key > *e) {
                return;
            }
            cursor = after(&key);
            let record: pb::AuditRecord = match decode(&key, &value) {
                Ok(r) => r,
                Err(e) => {
                    let _ = tx.send(Err(status::from_fault(&e))).await;
                    return;
                }
            };
            if mandate_core::audit::matches(&record, &r) && tx.send(Ok(record)).await.is_err() {
                return;
            }
        }
        if full {
            continue;
        }
        if !r.follow {
            return;
        }
        tokio::select! {
            changed = applied.changed() => if changed.is_err() { return },
            () = tx.closed() => return,
        }
    }
}

#[tonic::async_trait]
impl Audit for AuditService {
    type SubscribeStream = ReceiverStream<Result<pb::AuditRecord, Status>>;

    async fn subscribe(
        &self,
        request: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        auth::operator(&self.node, request.metadata()).await?;
        let r = request.into_inner();
        check_filter(&r).map_err(|e| status::from_domain(&e))?;
        if !r.follow {
            // Without following, the subscription covers everything committed when it began.
            self.node
                .read_barrier(ReadConsistency::Linearizable, 0)
                .await
                .map_err(|e| status::from_node(&e))?;
        }
        let (tx, rx) = mpsc::channel(SUBSCRIBER_BUFFER);
        tokio::spawn(feed(self.node.clone(), r, tx));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
