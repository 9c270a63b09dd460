//! The raft log and vote on sled ([`openraft::storage::RaftLogStorage`]).
//!
//! Entries live in the `raft-log` tree keyed by big-endian index, encoded with bincode (openraft's
//! envelope; the payload inside is protobuf). The vote, the committed log id and the last purged
//! log id live in `raft-meta`.
//!
//! A purge records its point durably and returns; the entries below it are deleted afterwards,
//! off the raft core's path (purging the 100,000 entries before a snapshot used to stall it).
//! Until they are gone, reads and the log state ignore them.

use std::fmt::Debug;
use std::ops::RangeBounds;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{AnyError, Entry, LogId, OptionalSend, StorageError, StorageIOError, Vote};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::durability::Syncer;
use crate::error::OpenError;
use crate::types::{NodeId, TypeConfig};

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const LAST_PURGED: &[u8] = b"last-purged";
/// Log entries deleted in one sled batch by the background purge.
const PURGE_CHUNK: u64 = 4096;

type StorageResult<T> = Result<T, StorageError<NodeId>>;

/// The raft log of one node.
#[derive(Clone)]
pub struct LogStore {
    log: sled::Tree,
    meta: sled::Tree,
    syncer: Syncer,
    /// One past the last purged index (0: nothing purged); entries below it are not read.
    first_kept: Arc<AtomicU64>,
    purger: Arc<Purger>,
}

/// The thread that deletes purged entries; `None` parts when syncs run inline. Dropping the
/// last handle lets it finish its queue and joins it, releasing the database.
struct Purger {
    tx: Option<mpsc::Sender<u64>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Purger {
    fn start(log: &sled::Tree, inline: bool) -> Result<Self, std::io::Error> {
        if inline {
            return Ok(Purger {
                tx: None,
                thread: None,
            });
        }
        let (tx, rx) = mpsc::channel::<u64>();
        let log = log.clone();
        let thread = std::thread::Builder::new()
            .name("mandate-purge".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let index = rx.try_iter().fold(first, u64::max);
                    if let Err(e) = delete_entries_through(&log, index) {
                        tracing::error!(error = %e, index, "deleting purged log entries failed");
                    }
                }
            })?;
        Ok(Purger {
            tx: Some(tx),
            thread: Some(thread),
        })
    }
}

impl Drop for Purger {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the log purge thread panicked");
            }
        }
    }
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, AnyError> {
    bincode::serialize(value).map_err(|e| AnyError::new(&*e))
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, AnyError> {
    bincode::deserialize(bytes).map_err(|e| AnyError::new(&*e))
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

impl LogStore {
    pub(crate) fn open(db: &sled::Db, syncer: Syncer) -> Result<Self, OpenError> {
        let open = |name: &str| {
            db.open_tree(name)
                .map_err(|e| OpenError::Sled(format!("tree {name}"), e))
        };
        let log = open("raft-log")?;
        let purger = Purger::start(&log, syncer.is_inline())
            .map_err(|e| OpenError::Thread("mandate-purge", e))?;
        let store = LogStore {
            log,
            meta: open("raft-meta")?,
            syncer,
            first_kept: Arc::default(),
            purger: Arc::new(purger),
        };
        let purged: Option<LogId<NodeId>> = store
            .read_meta(LAST_PURGED, StorageIOError::read_logs)
            .map_err(|e| OpenError::Corrupt(e.to_string()))?;
        if let Some(purged) = purged {
            store.first_kept.store(purged.index + 1, Ordering::Release);
            // A crash may have left entries below the purge point; finish deleting them.
            store.delete_through(purged.index);
        }
        Ok(store)
    }

    /// Deletes the entries up to `index`, on the purge thread unless syncs run inline.
    fn delete_through(&self, index: u64) {
        let queued = match &self.purger.tx {
            Some(tx) => tx.send(index).is_ok(),
            None => false,
        };
        if !queued {
            if let Err(e) = delete_entries_through(&self.log, index) {
                tracing::error!(error = %e, index, "deleting purged log entries failed");
            }
        }
    }

    fn read_meta<T: DeserializeOwned>(
        &self,
        key: &[u8],
        fail: fn(AnyError) -> StorageIOError<NodeId>,
    ) -> StorageResult<Option<T>> {
        let bytes = self.meta.get(key).map_err(|e| fail(AnyError::new(&e)))?;
        bytes
            .map(|b| decode(&b).map_err(|e| fail(e).into()))
            .transpose()
    }

    fn write_meta<T: Serialize>(
        &self,
        key: &[u8],
        value: &T,
        fail: fn(AnyError) -> StorageIOError<NodeId>,
    ) -> StorageResult<()> {
        let bytes = encode(value).map_err(fail)?;
        self.meta
            .insert(key, bytes)
            .map_err(|e| fail(AnyError::new(&e)))?;
        Ok(())
    }
}

/// Deletes every entry at or below `index`, a chunk of keys per batch, without reading them.
fn delete_entries_through(log: &sled::Tree, index: u64) -> sled::Result<()> {
    let Some((first, _)) = log.first()? else {
        return Ok(());
    };
    let Ok(first) = <[u8; 8]>::try_from(first.as_ref()).map(u64::from_be_bytes) else {
        return Err(sled::Error::Unsupported("a log key is not 8 bytes".into()));
    };
    let mut from = first;
    while from <= index {
        let to = index.min(from.saturating_add(PURGE_CHUNK - 1));
        let mut batch = sled::Batch::default();
        for i in from..=to {
            batch.remove(&index_key(i));
        }
        log.apply_batch(batch)?;
        from = to + 1;
    }
    Ok(())
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        let start = match range.start_bound() {
            std::ops::Bound::Included(i) => *i,
            std::ops::Bound::Excluded(i) => *i + 1,
            std::ops::Bound::Unbounded => 0,
        }
        .max(self.first_kept.load(Ordering::Acquire));
        let mut entries = Vec::new();
        for item in self.log.range(index_key(start)..) {
            let (key, value) = item.map_err(|e| StorageIOError::read_logs(AnyError::new(&e)))?;
            let index = u64::from_be_bytes(key.as_ref().try_into().map_err(|_| {
                StorageIOError::read_logs(AnyError::error("log key is not 8 bytes"))
            })?);
            if !range.contains(&index) {
                break;
            }
            let entry: Entry<TypeConfig> =
                decode(&value).map_err(|e| StorageIOError::read_log_at_index(index, e))?;
            if entry.log_id.index != index {
                return Err(StorageIOError::read_log_at_index(
                    index,
                    AnyError::error(format!(
                        "entry stored at {index} has log id {}",
                        entry.log_id
                    )),
                )
                .into());
            }
            entries.push(entry);
        }
        Ok(entries)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let last_purged_log_id: Option<LogId<NodeId>> =
            self.read_meta(LAST_PURGED, StorageIOError::read_logs)?;
        let last = self
            .log
            .last()
            .map_err(|e| StorageIOError::read_logs(AnyError::new(&e)))?;
        let last_entry = match last {
            Some((_, value)) => {
                let entry: Entry<TypeConfig> = decode(&value).map_err(StorageIOError::read_logs)?;
                Some(entry.log_id)
            }
            None => None,
        };
        // Entries at or below the purge point may still await deletion: they do not count.
        let last_log_id = match (last_entry, last_purged_log_id) {
            (Some(entry), Some(purged)) if entry.index <= purged.index => Some(purged),
            (None, purged) => purged,
            (entry, _) => entry,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        self.write_meta(VOTE, vote, StorageIOError::write_vote)?;
        self.syncer
            .sync()
            .await
            .map_err(|e| StorageIOError::write_vote(AnyError::new(&e)).into())
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        self.read_meta(VOTE, StorageIOError::read_vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        self.write_meta(COMMITTED, &committed, StorageIOError::write)
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeId>>> {
        Ok(self
            .read_meta::<Option<LogId<NodeId>>>(COMMITTED, StorageIOError::read)?
            .flatten())
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = sled::Batch::default();
        for entry in entries {
            let bytes =
                encode(&entry).map_err(|e| StorageIOError::write_log_entry(entry.log_id, e))?;
            batch.insert(&index_key(entry.log_id.index), bytes);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_logs(AnyError::new(&e)))?;
        self.syncer
            .after_sync(move |result| callback.log_io_completed(result));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        let mut batch = sled::Batch::default();
        for item in self.log.range(index_key(log_id.index)..) {
            let (key, _) = item.map_err(|e| StorageIOError::write_logs(AnyError::new(&e)))?;
            batch.remove(key);
        }
        self.log
            .apply_batch(batch)
            .map_err(|e| StorageIOError::write_logs(AnyError::new(&e)))?;
        self.syncer
            .sync()
            .await
            .map_err(|e| StorageIOError::write_logs(AnyError::new(&e)).into())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        // Record the purge point first: a crash between the two steps leaves extra entries
        // below it, which are harmless, never a gap above it.
        self.write_meta(LAST_PURGED, &log_id, StorageIOError::write_logs)?;
        self.syncer
            .sync()
            .await
            .map_err(|e| StorageIOError::write_logs(AnyError::new(&e)))?;
        self.first_kept
            .fetch_max(log_id.index + 1, Ordering::AcqRel);
        self.delete_through(log_id.index);
        Ok(())
    }
}
