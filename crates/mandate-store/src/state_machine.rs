//! The state machine ([`openraft::storage::RaftStateMachine`]) on the state store.
//!
//! `apply` decodes each entry's command batch, runs `mandate_core::apply::apply_batch` over an
//! overlay of the state, and writes the overlay (each key to its keyspace), the applied log id
//! and the membership in one atomic batch. Readers use a [`StateView`], which sees only whole
//! batches.
//!
//! A snapshot reads a read snapshot of the store taken at the applied index, opened between
//! two applies and read on a blocking thread while apply goes on.

use std::ops::Bound;
use std::path::Path;

use mandate_core::state::{prefix_end, KeyValue, Overlay, StateRead};
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
use crate::parts::{self, Parts};
use crate::snapshot::{self, SnapshotDir, SnapshotFile};
use crate::types::{BatchOutcome, Member, NodeId, TypeConfig};
use crate::StateDb;

/// Storage-owned key: the applied log id (bincode).
const APPLIED: &[u8] = b"\x00applied";
/// Storage-owned key: the last membership applied (bincode).
const MEMBERSHIP: &[u8] = b"\x00membership";
/// Storage-owned key, present while a snapshot is installed: the keyspaces take it one after
/// another, and a node that stops part way finishes the install from the set-aside body when
/// it opens again.
const INSTALLING: &[u8] = b"\x00installing";

type StorageResult<T> = Result<T, StorageError<NodeId>>;
type Membership = StoredMembership<NodeId, Member>;

/// A read-only view of the materialized state; cheap to clone.
#[derive(Clone)]
pub struct StateView {
    parts: Parts,
    applied: watch::Receiver<u64>,
}

/// One entry a store iterator read.
fn read_entry(guard: fjall::Guard) -> Result<KeyValue, StorageFault> {
    guard
        .into_inner()
        .map(|(k, v)| (k.to_vec(), v.to_vec()))
        .map_err(|e| StorageFault(format!("scanning the state: {e}")))
}

impl StateRead for StateView {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageFault> {
        self.parts
            .of(key)
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
        // An empty range reaches no keyspace.
        let range = (
            Bound::Included(start),
            end.map_or(Bound::Unbounded, Bound::Excluded),
        );
        let sources = self.parts.for_range(start, end).map(|keyspace| {
            keyspace
                .range::<&[u8], _>(range)
                .take(limit)
                .map(read_entry)
        });
        parts::merged(sources).take(limit).collect()
    }
}

impl StateView {
    /// Entries whose key starts with `prefix`, from `start` (inclusive) on, in key order.
    pub fn scan(
        &self,
        prefix: &[u8],
        start: &[u8],
    ) -> impl Iterator<Item = Result<KeyValue, StorageFault>> + '_ {
        let start = start.max(prefix).to_vec();
        let end = prefix_end(prefix);
        let range = (
            Bound::Included(start.clone()),
            end.clone().map_or(Bound::Unbounded, Bound::Excluded),
        );
        let sources: Vec<_> = self
            .parts
            .for_range(&start, end.as_deref())
            .map(|keyspace| keyspace.range(range.clone()).map(read_entry))
            .collect();
        parts::merged(sources)
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
    parts: Parts,
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
    parts: &Parts,
    key: &[u8],
    value: &T,
) -> Result<(), AnyError> {
    let bytes = bincode::serialize(value).map_err(|e| AnyError::new(&*e))?;
    batch.insert(parts.of(key), key, bytes);
    Ok(())
}

impl StateMachine {
    pub(crate) fn open(
        state: StateDb,
        syncer: Syncer,
        snapshot_dir: &Path,
    ) -> Result<Self, OpenError> {
        let StateDb { db, parts } = state;
        let snapshots =
            SnapshotDir::open(snapshot_dir).map_err(|e| OpenError::io(snapshot_dir, e))?;
        finish_install(&parts, &snapshots)?;
        let applied: Option<LogId<NodeId>> = bincode_decode(parts.state().get(APPLIED))
            .map_err(|e| OpenError::Corrupt(e.to_string()))?;
        let (applied_tx, applied_rx) = watch::channel(applied.map_or(0, |l| l.index));
        let view = StateView {
            parts: parts.clone(),
            applied: applied_rx,
        };
        Ok(StateMachine {
            db,
            parts,
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
        let applied = bincode_decode(self.parts.state().get(APPLIED))
            .map_err(StorageIOError::read_state_machine)?;
        let membership = bincode_decode(self.parts.state().get(MEMBERSHIP))
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
            let keyspace = self.parts.of(&key);
            match value {
                Some(v) => batch.insert(keyspace, key, v),
                None => batch.remove(keyspace, key),
            }
        }
        bincode_put(&mut batch, &self.parts, APPLIED, &last)
            .map_err(StorageIOError::write_state_machine)?;
        bincode_put(&mut batch, &self.parts, MEMBERSHIP, &membership)
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
            parts: self.parts.clone(),
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
        let (db, parts, snapshots, last) = (
            self.db.clone(),
            self.parts.clone(),
            self.snapshots.clone(),
            meta.last_log_id,
        );
        let install = move || install_file(&db, &parts, &snapshots, *data, storage, last);
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

/// Sets or clears the mark of an install under way, durably.
fn mark_installing(db: &fjall::Database, parts: &Parts, on: bool) -> fjall::Result<()> {
    let mut batch = db.batch();
    if on {
        batch.insert(parts.state(), INSTALLING, []);
    } else {
        batch.remove(parts.state(), INSTALLING);
    }
    batch.commit()?;
    db.persist(fjall::PersistMode::SyncAll)
}

/// Makes the body in `file` the whole state, then the node's snapshot; returns how many
/// entries the body held. The body is set aside and the install marked first: the keyspaces
/// take the new state one after another, and should the node stop between two of them,
/// [`finish_install`] completes the install from the set-aside body when it opens.
fn install_file(
    db: &fjall::Database,
    parts: &Parts,
    snapshots: &SnapshotDir,
    file: SnapshotFile,
    storage: Vec<NewEntry>,
    last: Option<LogId<NodeId>>,
) -> Result<usize, Installing> {
    let store = |e: fjall::Error| Installing::Store(AnyError::new(&e));
    let mut file = snapshots.own(file).map_err(Installing::Adopting)?;
    snapshots
        .set_aside(&mut file)
        .map_err(Installing::Adopting)?;
    mark_installing(db, parts, true).map_err(store)?;
    let ingested = file
        .reader()
        .map_err(|e| Installing::Snapshot(e.to_string()))
        .and_then(|reader| snapshot::Decoder::open(reader).map_err(Installing::Snapshot))
        .and_then(|body| ingest(parts, body, storage));
    let entries = match ingested {
        Ok(entries) => entries,
        // A malformed body is found before any keyspace takes it: the state is as it was.
        Err(Installing::Snapshot(e)) => {
            mark_installing(db, parts, false).map_err(store)?;
            snapshots
                .discard_installing()
                .map_err(Installing::Adopting)?;
            return Err(Installing::Snapshot(e));
        }
        Err(e) => return Err(e),
    };
    snapshots
        .adopt_if_newer(&mut file, last)
        .map_err(Installing::Adopting)?;
    Ok(entries)
}

/// Completes a snapshot install that the node's stop cut short, from the body set aside for
/// it; else removes a set-aside body left after its install completed.
fn finish_install(parts: &Parts, snapshots: &SnapshotDir) -> Result<(), OpenError> {
    let corrupt = |what: &str| OpenError::Corrupt(format!("finishing a snapshot install: {what}"));
    let marked = parts
        .state()
        .get(INSTALLING)
        .map_err(|e| OpenError::State("reading the install mark".into(), e))?;
    if marked.is_none() {
        return snapshots
            .discard_installing()
            .map_err(|e| corrupt(&e.to_string()));
    }
    let mut file = snapshots
        .open_installing()
        .map_err(|e| corrupt(&e.to_string()))?
        .ok_or_else(|| corrupt("the install was marked but its snapshot is gone"))?;
    let meta = file.meta().map_err(|e| corrupt(&e))?;
    tracing::warn!(
        snapshot = %meta.snapshot_id,
        "a snapshot install was cut short; finishing it"
    );
    let storage = storage_entries(&meta).map_err(|e| corrupt(&e.to_string()))?;
    let failed = |e: Installing| match e {
        Installing::Snapshot(e) => corrupt(&e),
        Installing::Store(e) => corrupt(&e.to_string()),
        Installing::Adopting(e) => corrupt(&e.to_string()),
    };
    let reader = file.reader().map_err(|e| corrupt(&e.to_string()))?;
    let body = snapshot::Decoder::open(reader).map_err(|e| corrupt(&e))?;
    ingest(parts, body, storage).map_err(failed)?;
    snapshots
        .adopt_if_newer(&mut file, meta.last_log_id)
        .map_err(|e| corrupt(&e.to_string()))?;
    Ok(())
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

/// Replaces the whole state with a snapshot's, one ingestion per keyspace: every entry of the
/// body, the storage-owned `storage` entries in place of the sender's, and a tombstone for
/// every key of the old state that neither holds. They are written in key order straight into
/// new tables, so memory stays bounded whatever the snapshot's size; the tables are synced,
/// and each keyspace's become visible and durable together when its ingestion finishes, the
/// `state` keyspace's (with the applied log id) last. Readers see each keyspace's old entries
/// until its ingestion finishes; the applied index moves only after the last.
fn ingest<R: std::io::BufRead>(
    parts: &Parts,
    mut body: snapshot::Decoder<R>,
    storage: Vec<NewEntry>,
) -> Result<usize, Installing> {
    let store = |e: fjall::Error| Installing::Store(AnyError::new(&e));
    let mut storage = storage.into_iter().peekable();
    let mut from_body = next_body(&mut body)?;
    let keyspaces = parts.all();
    let mut old = keyspaces
        .each_ref()
        .map(|keyspace| keyspace.iter().map(|guard| guard.key()));
    let mut next_old: [Option<fjall::Slice>; parts::COUNT] = Default::default();
    for (next, old) in next_old.iter_mut().zip(old.iter_mut()) {
        *next = old.next().transpose().map_err(store)?;
    }
    let [trail, expiring, state] = keyspaces.each_ref().map(fjall::Keyspace::start_ingestion);
    let mut ingestions = [
        trail.map_err(store)?,
        expiring.map_err(store)?,
        state.map_err(store)?,
    ];
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
        let i = parts::index_of(&key);
        while let Some(old_key) = next_old[i].take_if(|k| k.as_ref() <= key.as_slice()) {
            if old_key.as_ref() != key.as_slice() {
                ingestions[i].write_tombstone(old_key).map_err(store)?;
            }
            next_old[i] = old[i].next().transpose().map_err(store)?;
        }
        match value {
            Some(value) => ingestions[i].write(key, value),
            None => ingestions[i].write_tombstone(key),
        }
        .map_err(store)?;
    }
    for i in 0..parts::COUNT {
        while let Some(old_key) = next_old[i].take() {
            ingestions[i].write_tombstone(old_key).map_err(store)?;
            next_old[i] = old[i].next().transpose().map_err(store)?;
        }
    }
    drop(old);
    for ingestion in ingestions {
        ingestion.finish().map_err(store)?;
    }
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
    parts: Parts,
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
    let sources = reader
        .parts
        .all()
        .iter()
        .map(|keyspace| reader.snapshot.iter(keyspace).map(fjall::Guard::into_inner));
    for entry in parts::merged(sources) {
        let (key, value) = entry.map_err(|e| AnyError::new(&e))?;
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
