//! The audit service: subscriptions to the trail. A subscription reads records from this
//! node's storage from its cursor on, in chunks, and (when following) waits for the node to
//! apply more. It never holds up apply: a slow subscriber only reads storage later, and a gone
//! subscriber's task ends.

use std::sync::Arc;
use std::time::Duration;

use mandate_core::state::{decode, StateExt, StateRead};
use mandate_core::{audit, keys, pb, DomainError, StorageFault};
use mandate_proto::v1::audit_server::Audit;
use mandate_raft::{Node, ReadConsistency};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::audit_sink::SinkStates;
use crate::config::AuditConfig;
use crate::refusals::Refusals;
use crate::sealing::AuditHasher;
use crate::tokens::Signer;
use crate::{auth, status};

/// Records read from storage per step.
pub const SUBSCRIBE_CHUNK: usize = 256;
/// Records buffered per subscriber before reading pauses.
pub const SUBSCRIBER_BUFFER: usize = 1024;
/// Longest value `Hash` takes.
pub const AUDIT_HASH_VALUE_MAX: usize = 64 * 1024;
/// Most type filters in one subscription.
pub const SUBSCRIBE_TYPES_MAX: usize = 32;

pub struct AuditService {
    node: Arc<Node>,
    sinks: SinkStates,
    hasher: AuditHasher,
    refusals: Arc<Refusals>,
}

fn position_of(p: &pb::AuditPosition) -> String {
    format!("{}.{}", p.log_index, p.sequence)
}

/// The retained trail's oldest record's position, from the key it is stored under.
fn oldest(node: &Node) -> Result<Option<(u64, u32)>, StorageFault> {
    Ok(node
        .view
        .scan(keys::AUDIT_PREFIX, keys::AUDIT_PREFIX)
        .next()
        .transpose()?
        .and_then(|(k, _)| keys::split_audit(&k)))
}

/// Where the leader would compact the trail below, by count and by age; `None` when nothing
/// is due. By count it waits for a slack of 1/64 of the limit (at least one record) beyond
/// it, so that the compaction's own record does not call for another compaction.
fn compaction_due(
    node: &Node,
    retention: &AuditConfig,
    now_ms: u64,
) -> Result<Option<(u64, u32)>, StorageFault> {
    let Some(first) = oldest(node)? else {
        return Ok(None);
    };
    let records = || node.view.scan(keys::AUDIT_PREFIX, keys::AUDIT_PREFIX);
    let position = |k: &[u8]| keys::split_audit(k).unwrap_or(first);
    let mut below = first;
    let retained = audit::retained(&node.view)?;
    let slack = (retention.retain_records / 64).max(1);
    if retained > retention.retain_records.saturating_add(slack) {
        let excess = usize::try_from(retained - retention.retain_records)
            .unwrap_or(usize::MAX)
            .min(audit::COMPACT_RECORDS_MAX);
        if let Some((k, _)) = records().nth(excess).transpose()? {
            below = below.max(position(&k));
        }
    }
    if retention.retain_age_s > 0 {
        let cutoff = now_ms.saturating_sub(retention.retain_age_s.saturating_mul(1000));
        // Records are in command-time order, so the first young one bounds the old ones. A
        // record with no time of its own (a membership change before any command) is as old
        // as the next record that has one.
        let mut age_below = (u64::MAX, u32::MAX);
        let mut untimed_run: Option<(u64, u32)> = None;
        for (seen, item) in records().take(audit::COMPACT_RECORDS_MAX + 1).enumerate() {
            let (k, v) = item?;
            let record: pb::AuditRecord = decode(&k, &v)?;
            let at = (record.log_index, record.sequence);
            if record.time_ms >= cutoff || seen == audit::COMPACT_RECORDS_MAX {
                age_below = untimed_run.unwrap_or(at);
                break;
            }
            if record.time_ms == 0 {
                untimed_run.get_or_insert(at);
            } else {
                untimed_run = None;
            }
        }
        below = below.max(age_below);
    }
    let newest = audit::head(&node.view)?.map(|h| (h.log_index, h.sequence));
    // Compaction never drops the newest record; asking for only that is asking for nothing.
    let droppable = newest.is_some_and(|n| n > first);
    Ok((below > first && droppable).then_some(below))
}

/// A checkpoint of the current head, when the trail grew since the last one.
fn checkpoint_due(
    node: &Node,
    signer: &Signer,
    now_ms: u64,
) -> Result<Option<pb::AuditCheckpoint>, DomainError> {
    let fault = |e: StorageFault| DomainError::precondition("state", e.0);
    let Some(head) = audit::head(&node.view).map_err(fault)? else {
        return Ok(None);
    };
    let last = audit::last_checkpoint(&node.view).map_err(fault)?;
    if last.is_some_and(|p| (p.log_index, p.sequence) == (head.log_index, head.sequence)) {
        return Ok(None);
    }
    // Nothing but the last checkpoint's own record since it: an idle trail is not re-signed.
    let key = keys::audit(head.log_index, head.sequence);
    let newest: Option<pb::AuditRecord> = node
        .view
        .get(&key)
        .and_then(|v| v.map(|v| decode(&key, &v)).transpose())
        .map_err(fault)?;
    if newest.is_some_and(|r| r.r#type == "audit_checkpoint") {
        return Ok(None);
    }
    let cluster_id = node
        .view
        .cluster()
        .map_err(fault)?
        .map(|c| c.cluster_id)
        .ok_or_else(|| DomainError::precondition("cluster", "is not initialised yet"))?;
    let jws = signer.sign_checkpoint(&node.view, &cluster_id, &head, now_ms / 1000)?;
    Ok(Some(pb::AuditCheckpoint {
        log_index: head.log_index,
        sequence: head.sequence,
        hash: head.hash,
        jws,
    }))
}

/// Leader housekeeping: compact the trail when it holds more than the retention allows, and
/// sign a checkpoint every `checkpoint_interval_s` when it has grown.
pub async fn housekeeping(
    node: Arc<Node>,
    retention: AuditConfig,
    signer: Arc<Signer>,
    interval: Duration,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let checkpoint_every = Duration::from_secs(retention.checkpoint_interval_s);
    let mut last_checkpoint = tokio::time::Instant::now();
    loop {
        tick.tick().await;
        if node.metrics().current_leader != Some(node.id) {
            continue;
        }
        let now = mandate_raft::stamp::now_ms();
        if last_checkpoint.elapsed() >= checkpoint_every {
            last_checkpoint = tokio::time::Instant::now();
            match checkpoint_due(&node, &signer, now) {
                Ok(Some(c)) => {
                    let command = pb::Command {
                        kind: Some(pb::command::Kind::AuditCheckpoint(c)),
                        serving_node: node.id,
                        ..Default::default()
                    };
                    if let Err(e) = node.write(command).await {
                        tracing::debug!(error = %e, "audit checkpoint did not run");
                    }
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "cannot sign an audit checkpoint"),
            }
        }
        let below = match compaction_due(&node, &retention, now) {
            Ok(Some(below)) => below,
            Ok(None) => continue,
            Err(e) => {
                tracing::error!(error = %e, "reading the audit trail for compaction");
                continue;
            }
        };
        let command = pb::Command {
            kind: Some(pb::command::Kind::CompactAudit(pb::CompactAudit {
                below_log_index: below.0,
                below_sequence: below.1,
            })),
            serving_node: node.id,
            ..Default::default()
        };
        if let Err(e) = node.write(command).await {
            tracing::debug!(error = %e, "audit compaction did not run");
        }
    }
}

impl AuditService {
    pub fn new(
        node: Arc<Node>,
        sinks: SinkStates,
        hasher: AuditHasher,
        refusals: Arc<Refusals>,
    ) -> Self {
        AuditService {
            node,
            sinks,
            hasher,
            refusals,
        }
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
/// Up to `limit` records, in order, from just after `cursor` (from the oldest retained when
/// there is none). Subscriptions and sinks both read the trail this way.
pub(crate) fn records_after(
    node: &Node,
    cursor: Option<(u64, u32)>,
    limit: usize,
) -> Result<Vec<pb::AuditRecord>, StorageFault> {
    let start = match cursor {
        Some((index, sequence)) => {
            let mut key = keys::audit(index, sequence);
            key.push(0);
            key
        }
        None => keys::AUDIT_PREFIX.to_vec(),
    };
    node.view
        .scan(keys::AUDIT_PREFIX, &start)
        .take(limit)
        .map(|item| item.and_then(|(k, v)| decode(&k, &v)))
        .collect()
}

type Sender = mpsc::Sender<Result<pb::AuditRecord, Status>>;

/// Sends matching records from storage until the end (or, following, forever); returns when
/// the subscriber is gone, the end is passed, or storage fails (reported to the subscriber).
async fn feed(node: Arc<Node>, r: pb::SubscribeRequest, tx: Sender) {
    // Resume just before `from`: the record at `from` itself is the first one sent.
    let mut cursor = r
        .from
        .filter(|p| (p.log_index, p.sequence) != (0, 0))
        .map(|p| match p.sequence {
            0 => (p.log_index - 1, u32::MAX),
            s => (p.log_index, s - 1),
        });
    let end = r.to.map(|p| (p.log_index, p.sequence));
    let mut applied = node.view.applied_watch();
    loop {
        applied.borrow_and_update();
        let chunk = match records_after(&node, cursor, SUBSCRIBE_CHUNK) {
            Ok(c) => c,
            Err(e) => {
                let _ = tx.send(Err(status::from_fault(&e))).await;
                return;
            }
        };
        let full = chunk.len() == SUBSCRIBE_CHUNK;
        for record in chunk {
            let at = (record.log_index, record.sequence);
            if end.is_some_and(|e| at > e) {
                return;
            }
            cursor = Some(at);
            if audit::matches(&record, &r) && tx.send(Ok(record)).await.is_err() {
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
        auth::operator(&self.node, &self.refusals, request.metadata()).await?;
        let r = request.into_inner();
        check_filter(&r).map_err(|e| status::from_domain(&e))?;
        if let (Some(from), Some(base)) = (
            r.from.filter(|p| (p.log_index, p.sequence) != (0, 0)),
            audit::base(&self.node.view).map_err(|e| status::from_fault(&e))?,
        ) {
            if (from.log_index, from.sequence) < (base.log_index, base.sequence) {
                return Err(status::from_domain(&DomainError::precondition(
                    "from",
                    format!(
                        "position {} is no longer retained; the oldest retained record is {}.{} (use --from 0 for the oldest)",
                        position_of(&from),
                        base.log_index,
                        base.sequence
                    ),
                )));
            }
        }
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

    async fn hash(
        &self,
        request: Request<pb::AuditHashRequest>,
    ) -> Result<Response<pb::AuditHashResponse>, Status> {
        auth::operator(&self.node, &self.refusals, request.metadata()).await?;
        let r = request.into_inner();
        if r.value.len() > AUDIT_HASH_VALUE_MAX {
            return Err(status::from_domain(&DomainError::invalid(
                "value",
                format!("is at most {AUDIT_HASH_VALUE_MAX} bytes"),
            )));
        }
        let hmac = self.hasher.hmac(&r.value).ok_or_else(|| {
            status::from_domain(&DomainError::precondition(
                "kek",
                "this node has no key-encryption key, so no audit key",
            ))
        })?;
        Ok(Response::new(pb::AuditHashResponse {
            hmac: hmac.to_vec(),
        }))
    }

    async fn info(
        &self,
        request: Request<pb::AuditInfoRequest>,
    ) -> Result<Response<pb::AuditInfo>, Status> {
        auth::operator(&self.node, &self.refusals, request.metadata()).await?;
        let applied_index = self
            .node
            .read_barrier(ReadConsistency::Linearizable, 0)
            .await
            .map_err(|e| status::from_node(&e))?;
        let fault = |e: StorageFault| status::from_fault(&e);
        let head = audit::head(&self.node.view).map_err(fault)?;
        let head_index = head.as_ref().map_or(0, |h| h.log_index);
        let sinks = self
            .sinks
            .lock()
            .map(|states| {
                states
                    .iter()
                    .map(|s| {
                        let (log_index, sequence) = s.position.unwrap_or_default();
                        pb::SinkStatus {
                            name: s.name.clone(),
                            log_index,
                            sequence,
                            written: s.written,
                            lag_entries: head_index.saturating_sub(log_index),
                            error: s.last_error.clone(),
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(Response::new(pb::AuditInfo {
            head,
            base: audit::base(&self.node.view).map_err(fault)?,
            retained: audit::retained(&self.node.view).map_err(fault)?,
            applied_index,
            sinks,
            refusals_dropped: self.refusals.dropped(),
        }))
    }
}
