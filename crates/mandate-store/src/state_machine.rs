//! The state machine ([`openraft::storage::RaftStateMachine`]) on the state store.
//!
//! `apply` decodes each entry's command batch, runs `mandate_core::apply::apply_batch` over an
//! overlay of the `state` keyspace, and writes the overlay, the applied log id and the
//! membership in one atomic batch. Readers use a [`StateView`], which sees only whole batches.
//!
//! A snapshot reads a read snapshot of the store taken at the applied index, opened between
//! two applies and read on a blocking thread while apply goes on.

use std::io::Cursor;
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
use crate::snapshot::{self, SnapshotDir};
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

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Member>,
        data: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let bytes = data.into_inner();
        let signature = Some(meta.signature());
        let (_, entries) = snapshot::decode(&bytes)
            .map_err(|e| StorageIOError::read_snapshot(signature.clone(), AnyError::error(e)))?;
        // One atomic batch: every old key goes, every snapshot key comes, applied state is set.
        let mut batch = self.db.batch();
        let keep: std::collections::BTreeSet<&[u8]> =
            entries.iter().map(|e| e.key.as_slice()).collect();
        for guard in self.tree.iter() {
            let key = guard
                .key()
                .map_err(|e| StorageIOError::write_state_machine(AnyError::new(&e)))?;
            if !keep.contains(key.as_ref()) {
                batch.remove(&self.tree, key);
            }
        }
        for entry in &entries {
            batch.insert(&self.tree, entry.key.as_slice(), entry.value.as_slice());
        }
        match &meta.last_log_id {
            Some(log_id) => bincode_put(&mut batch, &self.tree, APPLIED, log_id)
                .map_err(StorageIOError::write_state_machine)?,
            None => batch.remove(&self.tree, APPLIED),
        }
        bincode_put(&mut batch, &self.tree, MEMBERSHIP, &meta.last_membership)
            .map_err(StorageIOError::write_state_machine)?;
        commit(batch)?;
        self.syncer
            .sync()
            .await
            .map_err(|e| StorageIOError::write_state_machine(AnyError::new(&e)))?;
        self.snapshots
            .store_if_newer(&bytes, meta.last_log_id)
            .map_err(|e| StorageIOError::write_snapshot(signature, AnyError::new(&e)))?;
        self.applied_tx
            .send_replace(meta.last_log_id.map_or(0, |l| l.index));
        self.engine = mandate_core::policy::Engine::default();
        tracing::info!(
            snapshot = %meta.snapshot_id,
            entries = entries.len(),
            "installed a snapshot from the leader"
        );
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        let Some(bytes) = self
            .snapshots
            .load()
            .map_err(|e| StorageIOError::read_snapshot(None, AnyError::new(&e)))?
        else {
            return Ok(None);
        };
        let (meta, _) = snapshot::decode(&bytes)
            .map_err(|e| StorageIOError::read_snapshot(None, AnyError::error(e)))?;
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        }))
    }
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

/// Reads a whole cut into an encoded snapshot body and stores it as the node's snapshot.
fn write_cut(
    meta: &snapshot::Meta,
    reader: CutReader,
    snapshots: &SnapshotDir,
) -> Result<(Vec<u8>, usize), AnyError> {
    let mut encoder = snapshot::Encoder::new(meta).map_err(AnyError::error)?;
    for guard in reader.snapshot.iter(&reader.tree) {
        let (key, value) = guard.into_inner().map_err(|e| AnyError::new(&e))?;
        encoder.push(key.to_vec(), value.to_vec());
    }
    let entries = encoder.entries();
    let bytes = encoder.finish();
    if !snapshots
        .store_if_newer(&bytes, meta.last_log_id)
        .map_err(|e| AnyError::new(&e))?
    {
        tracing::info!(
            snapshot = %meta.snapshot_id,
            "a newer snapshot was installed while this one was built; keeping that one"
        );
    }
    Ok((bytes, entries))
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
        let written = if self.syncer.is_inline() {
            write_cut(&meta, reader, &self.snapshots)
        } else {
            let (cut_meta, snapshots) = (meta.clone(), self.snapshots.clone());
            tokio::task::spawn_blocking(move || write_cut(&cut_meta, reader, &snapshots))
                .await
                .unwrap_or_else(|e| Err(AnyError::new(&e)))
        };
        let (bytes, entries) =
            written.map_err(|e| StorageIOError::write_snapshot(Some(meta.signature()), e))?;
        // openraft purges the log below this snapshot next: the state on disk must reach it
        // first, or a crash could leave state behind the oldest entry still in the log.
        self.syncer.sync().await.map_err(|e| {
            StorageIOError::write_snapshot(Some(meta.signature()), AnyError::new(&e))
        })?;
        tracing::info!(
            snapshot = %meta.snapshot_id,
            entries,
            bytes = bytes.len(),
            "built a snapshot"
        );
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}
