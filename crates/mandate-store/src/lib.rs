//! Storage for a Mandate node: the raft log and vote ([`LogStore`]), the materialized state
//! machine on sled ([`StateMachine`]) and its snapshots.
//!
//! Under a node's data directory: `log` holds the raft log — append-only segment files of
//! checksummed entries, the vote and purge point (`meta`) and the committed log id
//! (`committed`). `state` is a sled database holding the `state` tree: every key of the
//! materialized state, plus the applied log id and membership under the storage-owned `\0`
//! prefix, so that state and `last_applied` always change in one atomic sled batch.
//! `snapshots` holds single files written with write-fsync-rename.
//!
//! Durability: a log append is reported complete, and `save_vote` returns, only after the
//! segment (or `meta`) has been `fdatasync`ed (see [`durability`]). The state is flushed by
//! sled in the background, and synced before a snapshot lets the log be purged and after a
//! snapshot is installed. After a crash the state is a consistent prefix of what was applied
//! and openraft applies the rest again from the log.
//!
//! Data directories from earlier releases kept the log in a sled database under `db` (and,
//! before that, the state there too); opening one moves both into this layout.

// openraft's storage traits return `StorageError`, which is large; our helpers return the same
// type so that errors pass through unchanged.
#![allow(clippy::result_large_err)]

mod cut;
pub mod durability;
pub mod error;
pub mod log_store;
pub mod restore;
mod segments;
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
/// sled's page cache for an old layout's log database, while it is moved.
const OLD_LOG_CACHE_BYTES: u64 = 64 * 1024 * 1024;

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
    let state_dir = dir.join("state");
    let state_db = open_db(&state_dir, STATE_CACHE_BYTES, mode)?;
    move_old_log_db(dir, &state_db, &state_dir, mode)?;
    let log = LogStore::open(&dir.join("log"), mode)?;
    let state_syncer = durability::Syncer::for_sled(state_db.clone(), &state_dir, mode)?;
    let sm = StateMachine::open(&state_db, state_syncer, &dir.join("snapshots"))?;
    Ok((log, sm))
}

/// Whether `dir` holds a node's data.
pub fn holds_data(dir: &Path) -> bool {
    ["log", "db", "state"].iter().any(|d| dir.join(d).exists())
}

/// Moves an old layout's sled log database (`db`) into the log directory: its state tree, if
/// any, into the state database first; then the entries, vote, purge point and committed id
/// into a fresh directory, synced and renamed into place; then `db` is removed. A crash part
/// way repeats the unfinished steps on the next open.
fn move_old_log_db(
    dir: &Path,
    state_db: &sled::Db,
    state_dir: &Path,
    mode: SyncMode,
) -> Result<(), OpenError> {
    let old_dir = dir.join("db");
    if !old_dir.exists() {
        return Ok(());
    }
    let log_dir = dir.join("log");
    {
        let old = open_db(&old_dir, OLD_LOG_CACHE_BYTES, mode)?;
        move_state_out_of_log_db(&old, &old_dir, state_db, state_dir)?;
        if !log_dir.exists() {
            let moving = dir.join("log.moving");
            if moving.exists() {
                std::fs::remove_dir_all(&moving).map_err(|e| OpenError::io(&moving, e))?;
            }
            let moved = copy_old_log(&old, &moving)?;
            std::fs::rename(&moving, &log_dir).map_err(|e| OpenError::io(&log_dir, e))?;
            segments::sync_dir(dir).map_err(|e| OpenError::io(dir, e))?;
            tracing::info!(
                entries = moved,
                "moved the raft log out of its sled database"
            );
        }
    }
    std::fs::remove_dir_all(&old_dir).map_err(|e| OpenError::io(&old_dir, e))?;
    segments::sync_dir(dir).map_err(|e| OpenError::io(dir, e))
}

/// Copies the old log database's entries and metadata into `to`; returns the entries copied.
fn copy_old_log(old: &sled::Db, to: &Path) -> Result<usize, OpenError> {
    let sled_err = |what: &'static str| move |e| OpenError::Sled(what.into(), e);
    let tree = |name: &'static str| old.open_tree(name).map_err(sled_err(name));
    let (log, meta) = (tree("raft-log")?, tree("raft-meta")?);
    fn read<T: serde::de::DeserializeOwned>(
        meta: &sled::Tree,
        key: &str,
    ) -> Result<Option<T>, OpenError> {
        let corrupt = |e: String| OpenError::Corrupt(format!("the old log's {key}: {e}"));
        meta.get(key)
            .map_err(|e| corrupt(e.to_string()))?
            .map(|bytes| bincode::deserialize(&bytes).map_err(|e| corrupt(e.to_string())))
            .transpose()
    }
    let last_purged: Option<openraft::LogId<NodeId>> = read(&meta, "last-purged")?;
    let header = log_store::Meta {
        vote: read(&meta, "vote")?,
        last_purged,
    };
    let committed = read::<Option<openraft::LogId<NodeId>>>(&meta, "committed")?.flatten();
    let mut moved = 0;
    let entries = log.iter().filter_map(|item| {
        let entry = item
            .map_err(sled_err("reading the old log"))
            .and_then(|(k, v)| {
                let index = <[u8; 8]>::try_from(k.as_ref())
                    .map(u64::from_be_bytes)
                    .map_err(|_| OpenError::Corrupt("an old log key is not 8 bytes".into()))?;
                Ok((index, v.to_vec()))
            });
        // Entries at or below the purge point may not have been deleted yet.
        match entry {
            Ok((index, _)) if last_purged.is_some_and(|p| index <= p.index) => None,
            other => {
                moved += 1;
                Some(other)
            }
        }
    });
    LogStore::import(to, header, committed, entries)?;
    Ok(moved)
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
