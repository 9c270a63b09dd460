//! The state machine ([`openraft::storage::RaftStateMachine`]) on the state store.
//!
//! `apply` decodes each entry's command batch, runs `mandate_core::apply::apply_batch` over an
//! overlay of the `state` keyspace, and writes the overlay, the applied log id and the
//! membership in one atomic batch. Readers use a [`StateView`], which sees only whole batches.
//!
//! A snapshot reads a read snapshot of the store taken at the applied index, opened between
//! two applies and read on a blocking thread while apply goes on.

use std::ops::Bound;
use std::path::Path;

use mandate_core::state::{KeyValue, Overlay, StateRead};
use mandate_core::{keys, StorageFault};
use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    AnyError, Entry, EntryPayload, LogId, OptionalSend, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership,
};
use tokio::sync::watch;

use fjall::Readable;

use crate::durability::Syncer;
use crate::error::OpenError;
use crate::snapshot::{self, SnapshotDir, SnapshotFile};
use crate::types::{BatchOutcome, Member, NodeId, TypeConfig};
use crate::StateDb;

/// Storage-owned key: the applied log id (bincode).
const APPLIED: &[u8] = b"\x00applied";
/// Storage-owned key: the last membership applied (bincode).
const MEMBERSHIP: &[u8] = b"\x00membership";

type StorageResult<T> = Result<T, StorageError<NodeId>>;
type Membership = StoredMembership<NodeId, Member>;

/// A read-only view of the materialized state; cheap to clone.
#[derive(Clone)]
pub struct StateView {
    tree: fjall::Keyspace,
    applied: watch::Receiver<u64>,
}

impl StateRead for StateView {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageFault> {
        self.tree
            .get(key)
            .map(|v| v.map(|v| v.to_vec()))
            .map_err(|e| StorageFault(format!("reading the state: {e}")))
    }

    fn scan_range_first(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StorageFault> {
        if end.is_some_and(|end| end <= start) {
            return Ok(Vec::new());
        }
        let range = (
            Bound::Included(start),
            end.map_or(Bound::Unbounded, Bound::Excluded),
        );
        self.tree
            .range::<&[u8], _>(range)
            .take(limit)
            .map(|guard| {
                guard
                    .into_inner()
                    .map(|(k, v)| (k.to_vec(), v.to_vec()))
                    .map_err(|e| StorageFault(format!("scanning the state: {e}")))
            })
            .collect()
    }
}

impl StateView {
    /// Entries whose key starts with `prefix`, from `start` (inclusive) on, in key order.
    pub fn scan(
        &self,
        prefix: &[u8],
        start: &[u8],
    ) -> impl Iterator<Item = Result<KeyValue, StorageFault>> + '_ {
        let items = if start > prefix {
            self.tree.range(start.to_vec()..)
        } else {
            self.tree.prefix(prefix)
        };
        let prefix = prefix.to_vec();
        items
            .map(|guard| {
                guard
                    .into_inner()
                    .map(|(k, v)| (k.to_vec(), v.to_vec()))
                    .map_err(|e| StorageFault(format!("scanning the state: {e}")))
            })
            .take_while(move |item| match item {
                Ok((k, _)) => k.starts_with(&prefix),
                Err(_) => true,
            })
    }

    /// The index of the last log entry applied to this state.
    pub fn applied_index(&self) -> u64 {
        *self.applied.borrow()
    }

    /// Follows the applied index as apply moves it.
    pub fn applied_watch(&self) -> watch::Receiver<u64> {
        self.applied.clone()
    }

    /// Every key of the state, in order (for tests and diagnostics).
    pub fn dump(&self) -> Result<Vec<KeyValue>, StorageFault> {
        self.scan(b"", b"").collect()
    }
}

/// The state machine of one node.
pub struct StateMachine {
    db: fjall::Database,
    tree: fjall::Keyspace,
    engine: mandate_core::policy::Engine,
    syncer: Syncer,
    snapshots: SnapshotDir,
    applied_tx: watch::Sender<u64>,
    view: StateView,
}

fn bincode_decode<T: serde::de::DeserializeOwned>(
    read: fjall::Result<Option<fjall::Slice>>,
) -> Result<Option<T>, AnyError> {
    match read.map_err(|e| AnyError::new(&e))? {
        None => Ok(None),
        Some(bytes) => bincode::deserialize(&bytes)
            .map(Some)
            .map_err(|e| AnyError::new(&*e)),
    }
}

fn bincode_put<T: serde::Serialize>(
    batch: &mut fjall::OwnedWriteBatch,
    tree: &fjall::Keyspace,
    key: &[u8],
    value: &T,
) -> Result<(), AnyError> {
    let bytes = bincode::serialize(value).map_err(|e| AnyError::new(&*e))?;
    batch.insert(tree, key, bytes);
    Ok(())
}

impl StateMachine {
    pub(crate) fn open(
        state: StateDb,
        syncer: Syncer,
        snapshot_dir: &Path,
    ) -> Result<Self, OpenError> {
        let StateDb { db, tree } = state;
        let snapshots =
            SnapshotDir::open(snapshot_dir).map_err(|e| OpenError::io(snapshot_dir, e))?;
        let applied: Option<LogId<NodeId>> =
            bincode_decode(tree.get(APPLIED)).map_err(|e| OpenError::Corrupt(e.to_string()))?;
        let (applied_tx, applied_rx) = watch::channel(applied.map_or(0, |l| l.index));
        let view = StateView {
            tree: tree.clone(),
            applied: applied_rx,
        };
        Ok(StateMachine {
            db,
            tree,
            engine: mandate_core::policy::Engine::default(),
            syncer,
            snapshots,
            applied_tx,
            view,
        })
    }

    /// A read-only view that follows this state machine.
    pub fn view(&self) -> StateView {
        self.view.clone()
    }

    fn read_applied(&self) -> StorageResult<(Option<LogId<NodeId>>, Membership)> {
        let applied =
            bincode_decode(self.tree.get(APPLIED)).map_err(StorageIOError::read_state_machine)?;
        let membership = bincode_decode(self.tree.get(MEMBERSHIP))
            .map_err(StorageIOError::read_state_machine)?
            .unwrap_or_default();
        Ok((applied, membership))
    }
}

fn commit(batch: fjall::OwnedWriteBatch) -> StorageResult<()> {
    batch
        .commit()
        .map_err(|e| StorageIOError::write_state_machine(AnyError::new(&e)).into())
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> StorageResult<(Option<LogId<NodeId>>, Membership)> {
        self.read_applied()
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<BatchOutcome>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let (_, mut membership) = self.read_applied()?;
        let mut overlay = Overlay::new(&self.view);
        let mut outcomes = Vec::new();
        let mut last = None;
        for entry in entries {
            let outcome = match &entry.payload {
                EntryPayload::Blank => BatchOutcome::default(),
                EntryPayload::Membership(m) => {
                    membership = StoredMembership::new(Some(entry.log_id), m.clone());
                    let voters: Vec<NodeId> = m.voter_ids().collect();
                    let learners: Vec<NodeId> = m.learner_ids().collect();
                    mandate_core::audit::membership(
                        &mut overlay,
                        entry.log_id.index,
                        &voters,
                        &learners,
                    )
                    .map_err(|e| StorageIOError::apply(entry.log_id, AnyError::new(&e)))?;
                    BatchOutcome::default()
                }
                EntryPayload::Normal(batch) => {
                    let commands = batch
                        .decode()
                        .map_err(|e| StorageIOError::apply(entry.log_id, AnyError::new(&e)))?;
                    let results = mandate_core::apply::apply_batch(
                        &mut overlay,
                        &mut self.engine,
                        &commands,
                        entry.log_id.index,
                    )
                    .map_err(|e| StorageIOError::apply(entry.log_id, AnyError::new(&e)))?;
                    BatchOutcome(results)
                }
            };
            outcomes.push(outcome);
            last = Some(entry.log_id);
        }
        let Some(last) = last else {
            return Ok(outcomes);
        };
        let writes = overlay.into_writes();
        let mut batch = fjall::OwnedWriteBatch::with_capacity(self.db.clone(), writes.len() + 2);
        for (key, value) in writes {
            assert!(
                !key.starts_with(keys::STORAGE_PREFIX),
                "the domain wrote a storage-owned key"
            );
            match value {
                Some(v) => batch.insert(&self.tree, key, v),
                None => batch.remove(&self.tree, key),
            }
        }
        bincode_put(&mut batch, &self.tree, APPLIED, &last)
            .map_err(StorageIOError::write_state_machine)?;
        bincode_put(&mut batch, &self.tree, MEMBERSHIP, &membership)
            .map_err(StorageIOError::write_state_machine)?;
        commit(batch)?;
        self.applied_tx.send_replace(last.index);
        Ok(outcomes)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        // Take the read snapshot now, while apply cannot run; the builder reads it while apply
        // goes on.
        let cut = CutReader {
            snapshot: self.db.snapshot(),
            tree: self.tree.clone(),
        };
        let cut = self
            .read_applied()
            .map(|(applied, membership)| (applied, membership, cut));
        SnapshotBuilder {
            cut: Some(cut),
            snapshots: self.snapshots.clone(),
            syncer: self.syncer.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<SnapshotFile>> {
        tracing::info!("receiving a snapshot from the leader");
        let file = self
            .snapshots
            .create("receiving")
            .map_err(|e| StorageIOError::write_snapshot(None, AnyError::new(&e)))?;
        Ok(Box::new(file))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Member>,
        data: Box<SnapshotFile>,
    ) -> StorageResult<()> {
        let signature = Some(meta.signature());
        let started = std::time::Instant::now();
        tracing::info!(
            snapshot = %meta.snapshot_id,
            bytes = data.file().metadata().map_or(0, |m| m.len()),
            "received a snapshot from the leader; installing it"
        );
        let storage = storage_entries(meta).map_err(StorageIOError::write_state_machine)?;
        let (tree, snapshots, last) = (self.tree.clone(), self.snapshots.clone(), meta.last_log_id);
        let install = move || install_file(&tree, &snapshots, *data, storage, last);
        let installed = if self.syncer.is_inline() {
            install()
        } else {
            tokio::task::spawn_blocking(install)
                .await
                .unwrap_or_else(|e| Err(Installing::Store(AnyError::new(&e))))
        };
        let entries = installed.map_err(|e| match e {
            Installing::Snapshot(e) => {
                StorageIOError::read_snapshot(signature.clone(), AnyError::error(e))
            }
            Installing::Store(e) => StorageIOError::write_state_machine(e),
            Installing::Adopting(e) => {
                StorageIOError::write_snapshot(signature.clone(), AnyError::new(&e))
            }
        })?;
        self.applied_tx
            .send_replace(meta.last_log_id.map_or(0, |l| l.index));
        self.engine = mandate_core::policy::Engine::default();
        tracing::info!(
            snapshot = %meta.snapshot_id,
            entries,
            elapsed_ms = started.elapsed().as_millis(),
            "installed a snapshot from the leader"
        );
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        let Some(mut file) = self
            .snapshots
            .open_current()
            .map_err(|e| StorageIOError::read_snapshot(None, AnyError::new(&e)))?
        else {
            return Ok(None);
        };
        let meta = file
            .meta()
            .map_err(|e| StorageIOError::read_snapshot(None, AnyError::error(e)))?;
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(file),
        }))
    }
}

/// Why installing a snapshot stopped.
enum Installing {
    /// The body is malformed.
    Snapshot(String),
    /// The state store failed.
    Store(AnyError),
    /// The installed body could not become the node's snapshot.
    Adopting(std::io::Error),
}

/// A key of the new state and its value; `None` removes the key.
type NewEntry = (Vec<u8>, Option<Vec<u8>>);

/// The storage-owned keys an installed snapshot sets, in key order: the applied log id it
/// reflects (removed when it reflects none) and its membership.
fn storage_entries(meta: &SnapshotMeta<NodeId, Member>) -> Result<Vec<NewEntry>, AnyError> {
    let encode = |e: bincode::Error| AnyError::new(&*e);
    let applied = meta
        .last_log_id
        .map(|l| bincode::serialize(&l))
        .transpose()
        .map_err(encode)?;
    let membership = bincode::serialize(&meta.last_membership).map_err(encode)?;
    let mut entries = vec![
        (APPLIED.to_vec(), applied),
        (MEMBERSHIP.to_vec(), Some(membership)),
    ];
    entries.sort();
    Ok(entries)
}

/// Makes the body in `file` the whole state, then the node's snapshot; returns how many
/// entries the body held.
fn install_file(
    tree: &fjall::Keyspace,
    snapshots: &SnapshotDir,
    mut file: SnapshotFile,
    storage: Vec<NewEntry>,
    last: Option<LogId<NodeId>>,
) -> Result<usize, Installing> {
    let reader = file
        .reader()
        .map_err(|e| Installing::Snapshot(e.to_string()))?;
    let body = snapshot::Decoder::open(reader).map_err(Installing::Snapshot)?;
    let entries = ingest(tree, body, storage)?;
    snapshots
        .own(file)
        .and_then(|mut file| snapshots.adopt_if_newer(&mut file, last))
        .map_err(Installing::Adopting)?;
    Ok(entries)
}

/// The body's next entry, skipping its storage-owned keys: they are the sender's.
fn next_body<R: std::io::BufRead>(
    body: &mut snapshot::Decoder<R>,
) -> Result<Option<NewEntry>, Installing> {
    loop {
        match body.next_entry().map_err(Installing::Snapshot)? {
            Some(e) if e.key.starts_with(keys::STORAGE_PREFIX) => continue,
            Some(e) => return Ok(Some((e.key, Some(e.value)))),
            None => return Ok(None),
        }
    }
}

/// Replaces the whole state with a snapshot's in one ingestion: every entry of the body, the
/// storage-owned `storage` entries in place of the sender's, and a tombstone for every key
/// of the old state that neither holds. They are written in key order straight into new
/// tables, so memory stays bounded whatever the snapshot's size; the tables are synced, and
/// become visible and durable together when the ingestion finishes. Readers see the old state
/// until then.
fn ingest<R: std::io::BufRead>(
    tree: &fjall::Keyspace,
    mut body: snapshot::Decoder<R>,
    storage: Vec<NewEntry>,
) -> Result<usize, Installing> {
    let store = |e: fjall::Error| Installing::Store(AnyError::new(&e));
    let mut storage = storage.into_iter().peekable();
    let mut from_body = next_body(&mut body)?;
    let mut old = tree.iter().map(|guard| guard.key());
    let mut next_old = old.next().transpose().map_err(store)?;
    let mut ingestion = tree.start_ingestion().map_err(store)?;
    let mut entries = 0usize;
    loop {
        let storage_first = match (storage.peek(), &from_body) {
            (Some((key, _)), Some((body_key, _))) => key < body_key,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => break,
        };
        let new = if storage_first {
            storage.next()
        } else {
            entries += 1;
            std::mem::replace(&mut from_body, next_body(&mut body)?)
        };
        let Some((key, value)) = new else { break };
        while let Some(old_key) = next_old.take_if(|k| k.as_ref() <= key.as_slice()) {
            if old_key.as_ref() != key.as_slice() {
                ingestion.write_tombstone(old_key).map_err(store)?;
            }
            next_old = old.next().transpose().map_err(store)?;
        }
        match value {
            Some(value) => ingestion.write(key, value),
            None => ingestion.write_tombstone(key),
        }
        .map_err(store)?;
    }
    while let Some(old_key) = next_old {
        ingestion.write_tombstone(old_key).map_err(store)?;
        next_old = old.next().transpose().map_err(store)?;
    }
    drop(old);
    ingestion.finish().map_err(store)?;
    Ok(entries)
}

type Cut = StorageResult<(Option<LogId<NodeId>>, Membership, CutReader)>;

/// Builds a snapshot from the cut opened when it was created.
pub struct SnapshotBuilder {
    cut: Option<Cut>,
    snapshots: SnapshotDir,
    /// The state database's syncer; inline mode reads the cut on the calling thread too (the
    /// deterministic simulation starts no threads).
    syncer: Syncer,
}

/// The state as of one applied index: a read snapshot of the store, which keeps the versions
/// it sees until it is dropped, whatever apply writes meanwhile.
struct CutReader {
    snapshot: fjall::Snapshot,
    tree: fjall::Keyspace,
}

/// A snapshot as written: its file and its size.
struct Written {
    file: SnapshotFile,
    entries: usize,
    bytes: u64,
}

/// Streams a whole cut into a snapshot file and stores it as the node's snapshot.
fn write_cut(
    meta: &snapshot::Meta,
    reader: CutReader,
    snapshots: &SnapshotDir,
) -> Result<Written, AnyError> {
    let io_error = |e: std::io::Error| AnyError::new(&e);
    let mut file = snapshots.create("building").map_err(io_error)?;
    let out = std::io::BufWriter::with_capacity(1 << 20, snapshot::SyncingWriter::new(file.file()));
    let mut encoder = snapshot::Encoder::new(meta, out).map_err(io_error)?;
    for guard in reader.snapshot.iter(&reader.tree) {
        let (key, value) = guard.into_inner().map_err(|e| AnyError::new(&e))?;
        encoder.push(&key, &value).map_err(io_error)?;
    }
    let (entries, bytes) = (encoder.entries(), encoder.bytes());
    encoder.finish().map_err(io_error)?;
    if !snapshots
        .adopt_if_newer(&mut file, meta.last_log_id)
        .map_err(io_error)?
    {
        tracing::info!(
            snapshot = %meta.snapshot_id,
            "a newer snapshot was installed while this one was built; keeping that one"
        );
    }
    Ok(Written {
        file,
        entries,
        bytes,
    })
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let (applied, membership, reader) = self.cut.take().unwrap_or_else(|| {
            Err(
                StorageIOError::read_state_machine(AnyError::error("snapshot builder used twice"))
                    .into(),
            )
        })?;
        let snapshot_id = match applied {
            Some(log_id) => format!("{}-{}", log_id.leader_id, log_id.index),
            None => "empty".to_owned(),
        };
        let meta = SnapshotMeta {
            last_log_id: applied,
            last_membership: membership,
            snapshot_id,
        };
        let started = std::time::Instant::now();
        let written = if self.syncer.is_inline() {
            write_cut(&meta, reader, &self.snapshots)
        } else {
            let (cut_meta, snapshots) = (meta.clone(), self.snapshots.clone());
            tokio::task::spawn_blocking(move || write_cut(&cut_meta, reader, &snapshots))
                .await
                .unwrap_or_else(|e| Err(AnyError::new(&e)))
        };
        let Written {
            file,
            entries,
            bytes,
        } = written.map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), e))?;
        // openraft purges the log below this snapshot next: the state on disk must reach it
        // first, or a crash could leave state behind the oldest entry still in the log.
        self.syncer.sync().await.map_err(|e| {
            StorageIOError::write_snapshot(Some(meta.signature()), AnyError::new(&e))
        })?;
        tracing::info!(
            snapshot = %meta.snapshot_id,
            entries,
            bytes,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "built a snapshot"
        );
        Ok(Snapshot {
            meta,
            snapshot: Box::new(file),
        })
    }
}
