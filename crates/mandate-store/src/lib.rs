//! sled-backed storage for a Mandate node: the raft log and vote ([`LogStore`]), the
//! materialized state machine ([`StateMachine`]) and its snapshots.
//!
//! Two sled databases per node. `db` holds the raft log: `raft-log` (entries by index) and
//! `raft-meta` (vote, committed and purged log ids). `state` holds the `state` tree: every key
//! of the materialized state, plus the applied log id and membership under the storage-owned
//! `\0` prefix, so that state and `last_applied` always change in one atomic sled batch.
//! Snapshots are single files written with write-fsync-rename.
//!
//! Durability: a log append is reported complete, and `save_vote` returns, only after sled has
//! flushed the log database and its file has been `fsync`ed (see [`durability`]). The state is
//! kept apart so that those syncs, one per appended entry, write only the log: sled flushes the
//! state database in the background, and it is synced before a snapshot lets the log be purged
//! and after a snapshot is installed. After a crash the state is a consistent prefix of what was
//! applied and openraft applies the rest again from the log.

// openraft's storage traits return `StorageError`, which is large; our helpers return the same
// type so that errors pass through unchanged.
#![allow(clippy::result_large_err)]

mod cut;
pub mod durability;
pub mod error;
pub mod log_store;
pub mod restore;
pub mod snapshot;
pub mod state_machine;
pub mod types;

use std::path::Path;

pub use durability::SyncMode;
pub use error::OpenError;
pub use log_store::LogStore;
pub use state_machine::{StateMachine, StateView};
pub use types::{Batch, BatchOutcome, Member, NodeId, TypeConfig};

/// sled's page cache for a node's state. sled's default (1 GiB) on top of the state's own
/// working set put a node past 2 GiB resident at a million delegations; pages outside it are
/// read back through the kernel's page cache.
pub const STATE_CACHE_BYTES: u64 = 256 * 1024 * 1024;
/// sled's page cache for a node's raft log: replication and audit catch-up read recent entries.
pub const LOG_CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// Opens (or creates) the storage of one node under `dir`.
pub fn open(dir: &Path) -> Result<(LogStore, StateMachine), OpenError> {
    open_with(dir, SyncMode::GroupCommit)
}

fn open_db(dir: &Path, cache_bytes: u64, mode: SyncMode) -> Result<sled::Db, OpenError> {
    let mut config = sled::Config::new()
        .path(dir)
        .segment_size(durability::SEGMENT_BYTES)
        .cache_capacity(cache_bytes);
    if mode == SyncMode::Inline {
        // No background flusher either: every flush is one the node asked for.
        config = config.flush_every_ms(None);
    }
    config
        .open()
        .map_err(|e| OpenError::Sled(dir.display().to_string(), e))
}

/// Opens the storage of one node, making writes durable as `mode` says.
pub fn open_with(dir: &Path, mode: SyncMode) -> Result<(LogStore, StateMachine), OpenError> {
    std::fs::create_dir_all(dir).map_err(|e| OpenError::io(dir, e))?;
    let log_dir = dir.join("db");
    let state_dir = dir.join("state");
    let log_db = open_db(&log_dir, LOG_CACHE_BYTES, mode)?;
    let state_db = open_db(&state_dir, STATE_CACHE_BYTES, mode)?;
    move_state_out_of_log_db(&log_db, &log_dir, &state_db, &state_dir)?;
    let log = LogStore::open(
        &log_db,
        durability::Syncer::start(log_db.clone(), &log_dir, mode)?,
    )?;
    let state_syncer = durability::Syncer::start(state_db.clone(), &state_dir, mode)?;
    let sm = StateMachine::open(&state_db, state_syncer, &dir.join("snapshots"))?;
    Ok((log, sm))
}

/// Name of the state tree, in the state database (and, in data directories written before the
/// state had its own database, in the log database).
pub(crate) const STATE_TREE: &str = "state";
/// Keys copied per batch when moving an old layout's state.
const MOVE_CHUNK: usize = 4096;

/// Data directories written before the state had its own database keep the state tree in the
/// log database: copy it over, make the copy durable, then drop the old tree. A crash part way
/// leaves the old tree in place, so the next open copies it again (the copy is idempotent).
fn move_state_out_of_log_db(
    log_db: &sled::Db,
    log_dir: &Path,
    state_db: &sled::Db,
    state_dir: &Path,
) -> Result<(), OpenError> {
    let sled_err = |what: &'static str| move |e| OpenError::Sled(what.into(), e);
    if !log_db
        .tree_names()
        .iter()
        .any(|name| name.as_ref() == STATE_TREE.as_bytes())
    {
        return Ok(());
    }
    let old = log_db
        .open_tree(STATE_TREE)
        .map_err(sled_err("the log database's old state tree"))?;
    let new = state_db
        .open_tree(STATE_TREE)
        .map_err(sled_err("tree state"))?;
    let mut batch = sled::Batch::default();
    let mut copied = 0usize;
    for item in old.iter() {
        let (key, value) = item.map_err(sled_err("reading the old state tree"))?;
        batch.insert(key, value);
        copied += 1;
        if copied.is_multiple_of(MOVE_CHUNK) {
            new.apply_batch(std::mem::take(&mut batch))
                .map_err(sled_err("copying the state"))?;
        }
    }
    new.apply_batch(batch)
        .map_err(sled_err("copying the state"))?;
    durability::sync_db(state_db, state_dir)?;
    log_db
        .drop_tree(STATE_TREE)
        .map_err(sled_err("dropping the old state tree"))?;
    durability::sync_db(log_db, log_dir)?;
    tracing::info!(keys = copied, "moved the state into its own database");
    Ok(())
}
