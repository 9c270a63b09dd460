//! The raft log and vote in their own files ([`openraft::storage::RaftLogStorage`]).
//!
//! Entries are records in append-only segment files ([`crate::segments`]), each an openraft
//! `Entry` in bincode (openraft's envelope; the payload inside is protobuf). An append is
//! reported durable after `fdatasync` of the segment it went to, shared by every append that
//! arrives while a sync runs ([`crate::durability`]). The vote and the last purged log id
//! live in `meta`: two checksummed slots written in turn and synced, so a write torn by a
//! crash leaves the previous one readable. The committed log id lives in `committed`,
//! written in place and not synced: openraft only uses it to apply sooner after a restart, so
//! a lost or torn one is read as none, and one ahead of the durable log is not trusted.

use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io;
use std::ops::{Bound, RangeBounds};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{AnyError, Entry, LogId, OptionalSend, StorageError, StorageIOError, Vote};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::durability::{SyncMode, Syncer};
use crate::error::OpenError;
use crate::segments::{self, Segments};
use crate::types::{NodeId, TypeConfig};

/// Bytes of one `meta` slot.
const SLOT_BYTES: usize = 512;

type StorageResult<T> = Result<T, StorageError<NodeId>>;

/// What `meta` holds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Meta {
    pub vote: Option<Vote<NodeId>>,
    pub last_purged: Option<LogId<NodeId>>,
}

struct MetaFile {
    file: File,
    sequence: u64,
    meta: Meta,
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, AnyError> {
    bincode::serialize(value).map_err(|e| AnyError::new(&*e))
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, AnyError> {
    bincode::deserialize(bytes).map_err(|e| AnyError::new(&*e))
}

/// A checksummed slot value: the log's record framing, with `sequence` as the index.
fn seal(sequence: u64, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    segments::encode_record(&mut out, sequence, payload);
    out
}

fn read_all(file: &File) -> io::Result<Vec<u8>> {
    let len = file.metadata()?.len();
    let mut bytes = vec![0u8; usize::try_from(len).unwrap_or(0)];
    file.read_exact_at(&mut bytes, 0)?;
    Ok(bytes)
}

fn open_rw(path: &Path) -> Result<(File, bool), OpenError> {
    let existed = path.exists();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| OpenError::io(path, e))?;
    Ok((file, existed))
}

impl MetaFile {
    fn open(dir: &Path) -> Result<Self, OpenError> {
        let path = dir.join("meta");
        let (file, existed) = open_rw(&path)?;
        if !existed {
            segments::sync_dir(dir).map_err(|e| OpenError::io(dir, e))?;
        }
        let bytes = read_all(&file).map_err(|e| OpenError::io(&path, e))?;
        let newest = bytes
            .chunks(SLOT_BYTES)
            .filter_map(segments::decode_record)
            .max_by_key(|(sequence, _)| *sequence);
        let (sequence, meta) = match newest {
            None if bytes.iter().any(|b| *b != 0) => {
                return Err(OpenError::Corrupt(format!(
                    "{}: neither slot holds a whole record",
                    path.display()
                )))
            }
            None => (0, Meta::default()),
            Some((sequence, payload)) => (
                sequence,
                decode(payload)
                    .map_err(|e| OpenError::Corrupt(format!("{}: {e}", path.display())))?,
            ),
        };
        Ok(MetaFile {
            file,
            sequence,
            meta,
        })
    }

    /// Writes `meta` to the older slot and syncs it.
    fn store(&mut self, meta: Meta) -> io::Result<()> {
        let payload = bincode::serialize(&meta).map_err(io::Error::other)?;
        let sequence = self.sequence + 1;
        let sealed = seal(sequence, &payload);
        if sealed.len() > SLOT_BYTES {
            return Err(io::Error::other("the log's meta record outgrew its slot"));
        }
        let slot = (sequence % 2) * SLOT_BYTES as u64;
        self.file.write_all_at(&sealed, slot)?;
        self.file.sync_data()?;
        self.sequence = sequence;
        self.meta = meta;
        Ok(())
    }
}

struct Shared {
    segments: Mutex<Segments>,
    meta: Mutex<MetaFile>,
    committed: File,
}

/// The raft log of one node.
#[derive(Clone)]
pub struct LogStore {
    shared: Arc<Shared>,
    syncer: Syncer,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl LogStore {
    /// Opens (or creates) the log in `dir`.
    pub(crate) fn open(dir: &Path, mode: SyncMode) -> Result<Self, OpenError> {
        Self::open_sized(dir, mode, segments::SEGMENT_BYTES)
    }

    pub(crate) fn open_sized(
        dir: &Path,
        mode: SyncMode,
        segment_bytes: u64,
    ) -> Result<Self, OpenError> {
        std::fs::create_dir_all(dir).map_err(|e| OpenError::io(dir, e))?;
        let meta = MetaFile::open(dir)?;
        let segments = Segments::open(dir, segment_bytes, meta.meta.last_purged.map(|l| l.index))?;
        let active = segments.active_file();
        let syncer = Syncer::start(
            "mandate-fsync",
            mode,
            Box::new(move || match lock(&active).clone() {
                Some(file) => file.sync_data(),
                None => Ok(()),
            }),
        )?;
        let (committed, _) = open_rw(&dir.join("committed"))?;
        Ok(LogStore {
            shared: Arc::new(Shared {
                segments: Mutex::new(segments),
                meta: Mutex::new(meta),
                committed,
            }),
            syncer,
        })
    }

    /// Writes a log moved from elsewhere into the empty directory `dir`, durably.
    pub(crate) fn import(
        dir: &Path,
        meta: Meta,
        committed: Option<LogId<NodeId>>,
        entries: impl IntoIterator<Item = Result<(u64, Vec<u8>), OpenError>>,
    ) -> Result<(), OpenError> {
        let store = Self::open(dir, SyncMode::Inline)?;
        let io = |e| OpenError::io(dir, e);
        let mut chunk = Vec::new();
        let flush = |chunk: &mut Vec<(u64, Vec<u8>)>| {
            let mut segments = lock(&store.shared.segments);
            let result = segments.append(chunk.iter().map(|(i, b)| (*i, b.as_slice())));
            chunk.clear();
            result
        };
        for entry in entries {
            chunk.push(entry?);
            if chunk.len() == 1024 {
                flush(&mut chunk).map_err(io)?;
            }
        }
        flush(&mut chunk).map_err(io)?;
        lock(&store.shared.meta).store(meta).map_err(io)?;
        store.write_committed(committed).map_err(io)?;
        let active = lock(&store.shared.segments).active_file();
        if let Some(file) = lock(&active).clone() {
            file.sync_data().map_err(io)?;
        }
        store.shared.committed.sync_data().map_err(io)?;
        Ok(())
    }

    fn write_committed(&self, committed: Option<LogId<NodeId>>) -> io::Result<()> {
        let payload = bincode::serialize(&committed).map_err(io::Error::other)?;
        self.shared.committed.write_all_at(&seal(0, &payload), 0)
    }

    /// The entry at `index`, if kept.
    fn entry_at(&self, index: u64) -> StorageResult<Option<Entry<TypeConfig>>> {
        let located = lock(&self.shared.segments).locate(index, index.saturating_add(1));
        match located.first() {
            None => Ok(None),
            Some(l) => read_entry(l).map(Some),
        }
    }
}

fn read_entry(located: &segments::Located) -> StorageResult<Entry<TypeConfig>> {
    let index = located.index;
    let bytes = segments::read(located)
        .map_err(|e| StorageIOError::read_log_at_index(index, AnyError::new(&e)))?;
    let entry: Entry<TypeConfig> =
        decode(&bytes).map_err(|e| StorageIOError::read_log_at_index(index, e))?;
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
    Ok(entry)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(i) => i.saturating_add(1),
            Bound::Excluded(i) => *i,
            Bound::Unbounded => u64::MAX,
        };
        let located = lock(&self.shared.segments).locate(start, end);
        located.iter().map(read_entry).collect()
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let last_purged_log_id = lock(&self.shared.meta).meta.last_purged;
        let last = lock(&self.shared.segments).last_index();
        let last_log_id = match last {
            Some(index) => self.entry_at(index)?.map(|e| e.log_id),
            None => None,
        }
        .or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        let mut meta = lock(&self.shared.meta);
        let next = Meta {
            vote: Some(*vote),
            ..meta.meta.clone()
        };
        meta.store(next)
            .map_err(|e| StorageIOError::write_vote(AnyError::new(&e)).into())
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        Ok(lock(&self.shared.meta).meta.vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId<NodeId>>) -> StorageResult<()> {
        self.write_committed(committed)
            .map_err(|e| StorageIOError::write(AnyError::new(&e)).into())
    }

    async fn read_committed(&mut self) -> StorageResult<Option<LogId<NodeId>>> {
        let bytes = read_all(&self.shared.committed)
            .map_err(|e| StorageIOError::read(AnyError::new(&e)))?;
        let Some(committed) = segments::decode_record(&bytes)
            .and_then(|(_, payload)| decode::<Option<LogId<NodeId>>>(payload).ok())
            .flatten()
        else {
            return Ok(None);
        };
        // Written without a sync, it may have reached the disk before the entries it names.
        let purged = lock(&self.shared.meta).meta.last_purged;
        if purged.is_some_and(|p| p.index >= committed.index) {
            return Ok(Some(committed));
        }
        let kept = self.entry_at(committed.index)?.map(|e| e.log_id);
        Ok((kept == Some(committed)).then_some(committed))
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut encoded = Vec::new();
        for entry in entries {
            let bytes =
                encode(&entry).map_err(|e| StorageIOError::write_log_entry(entry.log_id, e))?;
            encoded.push((entry.log_id.index, bytes));
        }
        lock(&self.shared.segments)
            .append(encoded.iter().map(|(i, b)| (*i, b.as_slice())))
            .map_err(|e| StorageIOError::write_logs(AnyError::new(&e)))?;
        self.syncer
            .after_sync(move |result| callback.log_io_completed(result));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        lock(&self.shared.segments)
            .truncate(log_id.index)
            .map_err(|e| StorageIOError::write_logs(AnyError::new(&e)).into())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        // Record the purge point first: a crash between the two steps leaves extra entries
        // below it, which are skipped on open, never a gap above it.
        {
            let mut meta = lock(&self.shared.meta);
            let next = Meta {
                last_purged: Some(log_id),
                ..meta.meta.clone()
            };
            meta.store(next)
                .map_err(|e| StorageIOError::write_logs(AnyError::new(&e)))?;
        }
        lock(&self.shared.segments)
            .purge(log_id.index)
            .map_err(|e| StorageIOError::write_logs(AnyError::new(&e)).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::CommittedLeaderId;

    #[test]
    fn a_torn_meta_write_leaves_the_previous_vote_readable() {
        let dir = tempfile::tempdir().expect("dir");
        let vote = |term| Meta {
            vote: Some(Vote::new(term, 1)),
            last_purged: Some(LogId::new(CommittedLeaderId::new(1, 1), 5)),
        };
        let mut meta = MetaFile::open(dir.path()).expect("open");
        meta.store(vote(2)).expect("store");
        meta.store(vote(3)).expect("store");
        let newest = (meta.sequence % 2) * SLOT_BYTES as u64;
        // The newest slot's checksum no longer matches, as after a write cut short.
        meta.file.write_all_at(&[0xff; 4], newest).expect("tear");
        drop(meta);
        let meta = MetaFile::open(dir.path()).expect("reopen");
        assert_eq!(meta.meta.vote, Some(Vote::new(2, 1)));
        assert_eq!(meta.meta.last_purged.map(|l| l.index), Some(5));
    }

    #[test]
    fn a_meta_file_with_no_whole_slot_is_refused_as_corrupt() {
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join("meta"), [0x5a; 64]).expect("write");
        let Err(error) = MetaFile::open(dir.path()) else {
            panic!("a corrupt meta file opened");
        };
        assert!(error.to_string().contains("neither slot"), "{error}");
    }
}
