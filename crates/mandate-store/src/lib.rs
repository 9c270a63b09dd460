//! sled-backed storage for a Mandate node: the raft log and vote ([`LogStore`]), the
//! materialized state machine ([`StateMachine`]) and its snapshots.
//!
//! One sled database per node holds three trees: `raft-log` (entries by index), `raft-meta`
//! (vote, committed and purged log ids) and `state` (every key of the materialized state, plus
//! the applied log id and membership under the storage-owned `\0` prefix, so that state and
//! `last_applied` always change in one atomic sled batch). Snapshots are single files written
//! with write-fsync-rename.
//!
//! Durability: a log append is reported complete, and `save_vote` returns, only after sled has
//! flushed its buffers and the database file has been `fsync`ed (see [`durability`]).

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

/// sled's page cache per node. sled's default (1 GiB) on top of the state's own working set
/// put a node past 2 GiB resident at a million delegations; pages outside it are read back
/// through the kernel's page cache.
pub const CACHE_BYTES: u64 = 256 * 1024 * 1024;

/// Opens (or creates) the storage of one node under `dir`.
pub fn open(dir: &Path) -> Result<(LogStore, StateMachine), OpenError> {
    open_with(dir, SyncMode::GroupCommit)
}

/// Opens the storage of one node, making writes durable as `mode` says.
pub fn open_with(dir: &Path, mode: SyncMode) -> Result<(LogStore, StateMachine), OpenError> {
    std::fs::create_dir_all(dir).map_err(|e| OpenError::io(dir, e))?;
    let db_dir = dir.join("db");
    let mut config = sled::Config::new()
        .path(&db_dir)
        .segment_size(durability::SEGMENT_BYTES)
        .cache_capacity(CACHE_BYTES);
    if mode == SyncMode::Inline {
        // No background flusher either: every flush is one the node asked for.
        config = config.flush_every_ms(None);
    }
    let db = config
        .open()
        .map_err(|e| OpenError::Sled(db_dir.display().to_string(), e))?;
    let syncer = durability::Syncer::start(db.clone(), &db_dir, mode)?;
    let log = LogStore::open(&db, syncer.clone())?;
    let sm = StateMachine::open(&db, syncer, &dir.join("snapshots"))?;
    Ok((log, sm))
}
