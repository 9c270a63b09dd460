//! Storage for a Mandate node: the raft log and vote ([`LogStore`]), the materialized state
//! machine ([`StateMachine`]) and its snapshots.
//!
//! Under a node's data directory: `log` holds the raft log — append-only segment files of
//! checksummed entries, the vote and purge point (`meta`) and the committed log id
//! (`committed`). `state` is a fjall database (an LSM tree) whose keyspaces hold every key of
//! the materialized state, split by prefix so that each is compacted apart (see [`parts`]),
//! plus the applied log id and membership under the storage-owned `\0` prefix, so that state
//! and `last_applied` always change in one atomic batch. `snapshots` holds single files
//! written with write-fsync-rename.
//!
//! Durability: a log append is reported complete, and `save_vote` returns, only after the
//! segment (or `meta`) has been `fdatasync`ed (see [`durability`]). The state's journal is
//! written without a sync, and synced before a snapshot lets the log be purged and after a
//! snapshot is installed. After a crash the state is a consistent prefix of what was applied
//! (the journal is replayed up to its last whole batch) and openraft applies the rest again
//! from the log.
//!
//! Data directories from earlier releases kept the state in a sled database under `state`, and
//! before that the log (and the state) in a sled database under `db`; opening one moves them
//! into this layout.

// openraft's storage traits return `StorageError`, which is large; our helpers return the same
// type so that errors pass through unchanged.
#![allow(clippy::result_large_err)]

pub mod durability;
pub mod error;
pub mod log_store;
mod parts;
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

/// The state store's block cache. Blocks outside it are read back through the kernel's page
/// cache; 256 MiB kept a node well under 2 GiB resident at a million delegations with sled, and
/// an LSM tree's blocks are smaller than sled's pages for the same records.
pub const STATE_CACHE_BYTES: u64 = 256 * 1024 * 1024;
/// The state store's journals: once they exceed this, the oldest memtables are flushed so the
/// journal can go. It bounds what a restart replays (fjall's minimum).
const STATE_JOURNAL_BYTES: u64 = 64 * 1024 * 1024;
/// The state store's write buffer per memtable.
const STATE_MEMTABLE_BYTES: u64 = 32 * 1024 * 1024;
/// sled's page cache for an earlier release's database, while its data is moved.
const OLD_DB_CACHE_BYTES: u64 = 64 * 1024 * 1024;

/// Opens (or creates) the storage of one node under `dir`.
pub fn open(dir: &Path) -> Result<(LogStore, StateMachine), OpenError> {
    open_with(dir, SyncMode::GroupCommit)
}

fn open_sled(dir: &Path) -> Result<sled::Db, OpenError> {
    sled::Config::new()
        .path(dir)
        .segment_size(durability::SEGMENT_BYTES)
        .cache_capacity(OLD_DB_CACHE_BYTES)
        .flush_every_ms(None)
        .open()
        .map_err(|e| OpenError::Sled(dir.display().to_string(), e))
}

/// The state database and its keyspaces.
pub(crate) struct StateDb {
    pub(crate) db: fjall::Database,
    pub(crate) parts: parts::Parts,
}

fn open_state_db(dir: &Path) -> Result<StateDb, OpenError> {
    let err = |what: &str| {
        let what = format!("{what} at {}", dir.display());
        move |e| OpenError::State(what, e)
    };
    let db = fjall::Database::builder(dir)
        .cache_size(STATE_CACHE_BYTES)
        .max_journaling_size(STATE_JOURNAL_BYTES)
        // Apply's batches stay in fjall's buffer until the state is synced or the buffer
        // fills: a crash loses only a suffix, which the raft log applies again.
        .manual_journal_persist(true)
        // One worker flushes and compacts in turn. With more, fjall 3.1's worker 0 hands every
        // compaction request back to the queue and, while another worker compacts, takes it
        // again at once: a spinning core for the whole compaction (docs/architecture.md,
        // Storage and durability).
        .worker_threads(1)
        .open()
        .map_err(err("opening"))?;
    let parts =
        parts::Parts::open(&db, STATE_MEMTABLE_BYTES).map_err(err("opening the keyspaces"))?;
    // A state kept in one keyspace, as before the split: move each key where it now belongs.
    let moved = parts
        .settle(&db, MOVE_CHUNK)
        .map_err(err("moving keys to their keyspaces"))?;
    if moved > 0 {
        db.persist(fjall::PersistMode::SyncAll)
            .map_err(err("syncing the moved keys"))?;
        tracing::info!(
            keys = moved,
            "moved keys of the state to their own keyspaces"
        );
    }
    Ok(StateDb { db, parts })
}

/// Opens the storage of one node, making writes durable as `mode` says.
pub fn open_with(dir: &Path, mode: SyncMode) -> Result<(LogStore, StateMachine), OpenError> {
    std::fs::create_dir_all(dir).map_err(|e| OpenError::io(dir, e))?;
    let state_dir = dir.join("state");
    let old_state_dir = dir.join(OLD_STATE_DIR);
    if state_dir.join("db").exists() {
        // An earlier release's sled state: set it aside, the new store takes its place.
        std::fs::rename(&state_dir, &old_state_dir).map_err(|e| OpenError::io(&state_dir, e))?;
        segments::sync_dir(dir).map_err(|e| OpenError::io(dir, e))?;
    }
    let state = open_state_db(&state_dir)?;
    let old_log_dir = dir.join("db");
    let old_log_db = if old_log_dir.exists() {
        Some(open_sled(&old_log_dir)?)
    } else {
        None
    };
    move_old_state(dir, old_log_db.as_ref(), &state)?;
    if let Some(old) = old_log_db {
        move_old_log_db(dir, old)?;
    }
    let log = LogStore::open(&dir.join("log"), mode)?;
    let state_syncer = durability::Syncer::for_state(state.db.clone(), mode)?;
    let sm = StateMachine::open(state, state_syncer, &dir.join("snapshots"))?;
    Ok((log, sm))
}

/// Whether `dir` holds a node's data.
pub fn holds_data(dir: &Path) -> bool {
    ["log", "db", "state", OLD_STATE_DIR]
        .iter()
        .any(|d| dir.join(d).exists())
}

/// Moves an old layout's sled log database `old` (`db`) into the log directory (its state tree,
/// if any, was moved by [`move_old_state`]): the entries, vote, purge point and committed id
/// into a fresh directory, synced and renamed into place; then `db` is closed and removed. A
/// crash part way repeats the unfinished steps on the next open.
fn move_old_log_db(dir: &Path, old: sled::Db) -> Result<(), OpenError> {
    let old_dir = dir.join("db");
    let log_dir = dir.join("log");
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
    drop(old);
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

/// Name of the state tree in earlier releases' sled databases.
const STATE_TREE: &str = parts::STATE;
/// Where an earlier release's sled state database is set aside while it is moved.
const OLD_STATE_DIR: &str = "state.sled";
/// Keys copied per batch when moving an old layout's state.
const MOVE_CHUNK: usize = 4096;

/// Moves the state of an earlier release into the new store: from the state tree of the old
/// log database `old_log_db` (`db`), the oldest layout, or else from the sled state database set
/// aside as `state.sled`. The copy is made durable before the old copy is removed; a crash part way
/// copies again on the next open (the new store was empty before, and nothing else writes to
/// it while the node opens, so copying again is harmless).
fn move_old_state(
    dir: &Path,
    old_log_db: Option<&sled::Db>,
    state: &StateDb,
) -> Result<(), OpenError> {
    let old_state_dir = dir.join(OLD_STATE_DIR);
    let sled_err = |what: &'static str| move |e| OpenError::Sled(what.into(), e);
    let mut copied = None;
    if let Some(old) = old_log_db {
        if old
            .tree_names()
            .iter()
            .any(|name| name.as_ref() == STATE_TREE.as_bytes())
        {
            let tree = old
                .open_tree(STATE_TREE)
                .map_err(sled_err("the log database's old state tree"))?;
            copied = Some(copy_tree(&tree, state)?);
        }
    }
    if copied.is_none() && old_state_dir.exists() {
        let old = open_sled(&old_state_dir)?;
        let tree = old
            .open_tree(STATE_TREE)
            .map_err(sled_err("the old state database's tree"))?;
        copied = Some(copy_tree(&tree, state)?);
    }
    let Some(copied) = copied else {
        return Ok(());
    };
    state
        .db
        .persist(fjall::PersistMode::SyncAll)
        .map_err(|e| OpenError::State("syncing the moved state".into(), e))?;
    if old_state_dir.exists() {
        std::fs::remove_dir_all(&old_state_dir).map_err(|e| OpenError::io(&old_state_dir, e))?;
        segments::sync_dir(dir).map_err(|e| OpenError::io(dir, e))?;
    }
    tracing::info!(keys = copied, "moved the state into the LSM state store");
    Ok(())
}

/// Copies every key of a sled tree into the state store; returns how many.
fn copy_tree(from: &sled::Tree, to: &StateDb) -> Result<usize, OpenError> {
    let write_err = |e| OpenError::State("copying the state".into(), e);
    let mut batch = to.db.batch();
    let mut copied = 0usize;
    for item in from.iter() {
        let (key, value) = item.map_err(|e| OpenError::Sled("reading the old state".into(), e))?;
        batch.insert(to.parts.of(&key), key.as_ref(), value.as_ref());
        copied += 1;
        if copied.is_multiple_of(MOVE_CHUNK) {
            std::mem::replace(&mut batch, to.db.batch())
                .commit()
                .map_err(write_err)?;
        }
    }
    batch.commit().map_err(write_err)?;
    Ok(copied)
}
