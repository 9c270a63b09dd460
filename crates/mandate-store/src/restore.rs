//! Seeding a new node's data directory from a saved snapshot (disaster recovery).
//!
//! The restored node starts as the only voter of a new cluster with the snapshot's state; the
//! other members then join it as learners and are promoted. Its log starts just after the
//! snapshot, so nothing before it is replayed.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;
use std::path::Path;

use openraft::storage::{RaftLogStorage, RaftStateMachine};
use openraft::{LogId, Membership, SnapshotMeta, StoredMembership, Vote};

use crate::snapshot;
use crate::types::{Member, NodeId};

/// Restores `snapshot_bytes` into the empty directory `dir` for node `node_id`; returns the log
/// index the restored state reflects.
pub async fn restore(
    dir: &Path,
    snapshot_bytes: &[u8],
    node_id: NodeId,
    member: Member,
) -> Result<u64, String> {
    if crate::holds_data(dir) {
        return Err(format!(
            "{} already holds a node's data; restore only into an empty directory",
            dir.display()
        ));
    }
    let (meta, entries) = snapshot::decode(snapshot_bytes)?;
    let last: LogId<NodeId> = meta
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
    let bytes = snapshot::encode(&restored_meta, entries)?;
    let (mut log, mut sm) = crate::open(dir).map_err(|e| e.to_string())?;
    sm.install_snapshot(&restored_meta, Box::new(Cursor::new(bytes)))
        .await
        .map_err(|e| e.to_string())?;
    log.save_vote(&Vote::new(last.leader_id.term, node_id))
        .await
        .map_err(|e| e.to_string())?;
    log.purge(last).await.map_err(|e| e.to_string())?;
    Ok(last.index)
}
