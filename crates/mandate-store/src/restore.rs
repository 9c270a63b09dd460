//! Seeding a new node's data directory from a saved snapshot (disaster recovery).
//!
//! The restored node starts as the only voter of a new cluster with the snapshot's state; the
//! other members then join it as learners and are promoted. Its log starts just after the
//! snapshot, so nothing before it is replayed.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use openraft::storage::{RaftLogStorage, RaftStateMachine};
use openraft::{LogId, Membership, SnapshotMeta, StoredMembership, Vote};

use crate::snapshot;
use crate::types::{Member, NodeId};

/// Restores the snapshot saved in `snapshot` into the empty directory `dir` for node `node_id`;
/// returns the log index the restored state reflects. The body is read and rewritten entry by
/// entry, so a snapshot of any size restores in bounded memory.
pub async fn restore(
    dir: &Path,
    snapshot: &Path,
    node_id: NodeId,
    member: Member,
) -> Result<u64, String> {
    if crate::holds_data(dir) {
        return Err(format!(
            "{} already holds a node's data; restore only into an empty directory",
            dir.display()
        ));
    }
    let saved = std::fs::File::open(snapshot)
        .map_err(|e| format!("cannot read {}: {e}", snapshot.display()))?;
    let mut decoder = snapshot::Decoder::open(std::io::BufReader::with_capacity(1 << 20, saved))?;
    let last: LogId<NodeId> = decoder
        .meta()
        .last_log_id
        .ok_or("the snapshot is empty (it reflects no log entry)")?;
    let membership = Membership::new(
        vec![BTreeSet::from([node_id])],
        BTreeMap::from([(node_id, member)]),
    );
    let restored_meta = SnapshotMeta {
        last_log_id: Some(last),
        last_membership: StoredMembership::new(Some(last), membership),
        snapshot_id: format!("restored-{}-{}", last.leader_id, last.index),
    };
    let (mut log, mut sm) = crate::open(dir).map_err(|e| e.to_string())?;
    let body = sm
        .begin_receiving_snapshot()
        .await
        .map_err(|e| e.to_string())?;
    let write_error = |e: std::io::Error| format!("writing the restored snapshot: {e}");
    let mut encoder = snapshot::Encoder::new(
        &restored_meta,
        std::io::BufWriter::with_capacity(1 << 20, body.file()),
    )
    .map_err(write_error)?;
    while let Some(entry) = decoder.next_entry()? {
        encoder
            .push(&entry.key, &entry.value)
            .map_err(write_error)?;
    }
    encoder.finish().map_err(write_error)?;
    sm.install_snapshot(&restored_meta, body)
        .await
        .map_err(|e| e.to_string())?;
    log.save_vote(&Vote::new(last.leader_id.term, node_id))
        .await
        .map_err(|e| e.to_string())?;
    log.purge(last).await.map_err(|e| e.to_string())?;
    Ok(last.index)
}
