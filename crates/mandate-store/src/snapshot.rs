//! Snapshot files: a protobuf `SnapshotBody` holding every key of the state machine, written
//! with write-fsync-rename so a crash leaves either the old snapshot or the new one.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use mandate_proto::v1 as pb;
use openraft::{LogId, SnapshotMeta};
use prost::Message;

use crate::types::{Member, NodeId};

/// Version of the snapshot body layout; a node refuses a body with another version.
pub const FORMAT_VERSION: u32 = 1;
const CURRENT: &str = "current.snapshot";
/// How much of a snapshot file is written between two syncs.
pub const SYNC_EVERY_BYTES: usize = 8 * 1024 * 1024;

pub type Meta = SnapshotMeta<NodeId, Member>;

/// Writes a snapshot body entry by entry, so a state of any size is never held twice: the bytes
/// are those `SnapshotBody::encode_to_vec` gives for the same meta and entries.
pub struct Encoder {
    bytes: Vec<u8>,
    entries: usize,
}

impl Encoder {
    pub fn new(meta: &Meta) -> Result<Self, String> {
        let raft_meta = bincode::serialize(meta).map_err(|e| format!("snapshot meta: {e}"))?;
        let head = pb::SnapshotBody {
            format_version: FORMAT_VERSION,
            raft_meta,
            entries: Vec::new(),
        };
        Ok(Encoder {
            bytes: head.encode_to_vec(),
            entries: 0,
        })
    }

    /// Appends one entry; entries must come in strictly increasing key order.
    pub fn push(&mut self, key: Vec<u8>, value: Vec<u8>) {
        prost::encoding::message::encode(
            ENTRIES_FIELD,
            &pb::StateEntry { key, value },
            &mut self.bytes,
        );
        self.entries += 1;
    }

    /// How many entries have been appended.
    pub fn entries(&self) -> usize {
        self.entries
    }

    pub fn finish(self) -> Vec<u8> {
        self.bytes
    }
}

/// The field number of `SnapshotBody.entries`.
const ENTRIES_FIELD: u32 = 3;

/// Encodes a snapshot body.
pub fn encode(meta: &Meta, entries: Vec<pb::StateEntry>) -> Result<Vec<u8>, String> {
    let mut encoder = Encoder::new(meta)?;
    for entry in entries {
        encoder.push(entry.key, entry.value);
    }
    Ok(encoder.finish())
}

/// Decodes and checks a snapshot body.
pub fn decode(bytes: &[u8]) -> Result<(Meta, Vec<pb::StateEntry>), String> {
    let body = pb::SnapshotBody::decode(bytes).map_err(|e| format!("snapshot body: {e}"))?;
    if body.format_version != FORMAT_VERSION {
        return Err(format!(
            "snapshot format version {} is not {FORMAT_VERSION}",
            body.format_version
        ));
    }
    let meta: Meta =
        bincode::deserialize(&body.raft_meta).map_err(|e| format!("snapshot meta: {e}"))?;
    if body.entries.windows(2).any(|w| w[0].key >= w[1].key) {
        return Err("snapshot entries are not in strictly increasing key order".into());
    }
    Ok((meta, body.entries))
}

/// The directory holding a node's current snapshot.
#[derive(Clone)]
pub struct SnapshotDir {
    dir: PathBuf,
    /// The last log id of the newest snapshot stored since the node started.
    newest: Arc<Mutex<Option<LogId<NodeId>>>>,
}

impl SnapshotDir {
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        fs::create_dir_all(dir)?;
        Ok(SnapshotDir {
            dir: dir.to_owned(),
            newest: Arc::default(),
        })
    }

    /// Makes `bytes`, a snapshot up to `last`, the current snapshot, unless a newer one was
    /// stored meanwhile: a snapshot built while one from the leader was installed is older than
    /// it and must not replace it. Returns whether it was stored.
    pub fn store_if_newer(
        &self,
        bytes: &[u8],
        last: Option<LogId<NodeId>>,
    ) -> std::io::Result<bool> {
        let mut newest = self.newest.lock().unwrap_or_else(|e| e.into_inner());
        if newest.is_some() && last < *newest {
            return Ok(false);
        }
        self.store(bytes)?;
        *newest = last;
        Ok(true)
    }

    /// Replaces the current snapshot durably, whatever it holds. The file is synced every [`SYNC_EVERY_BYTES`] as
    /// it is written: one sync of a whole large snapshot at the end made the file system flush
    /// hundreds of megabytes at once, and the raft log's own fsyncs waited behind it.
    fn store(&self, bytes: &[u8]) -> std::io::Result<()> {
        let tmp = self.dir.join(format!("{CURRENT}.tmp"));
        let mut file = fs::File::create(&tmp)?;
        for chunk in bytes.chunks(SYNC_EVERY_BYTES) {
            file.write_all(chunk)?;
            file.sync_data()?;
        }
        file.sync_all()?;
        fs::rename(&tmp, self.dir.join(CURRENT))?;
        fs::File::open(&self.dir)?.sync_all()
    }

    /// The current snapshot's bytes, if one was ever stored.
    pub fn load(&self) -> std::io::Result<Option<Vec<u8>>> {
        match fs::read(self.dir.join(CURRENT)) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_older_snapshot_never_replaces_a_newer_one() {
        let dir = tempfile::tempdir().expect("dir");
        let snapshots = SnapshotDir::open(dir.path()).expect("open");
        let at = |index| Some(LogId::new(openraft::CommittedLeaderId::new(1, 1), index));
        assert!(snapshots.store_if_newer(b"ten", at(10)).expect("store"));
        assert!(!snapshots.store_if_newer(b"five", at(5)).expect("skip"));
        assert_eq!(
            snapshots.load().expect("load").as_deref(),
            Some(&b"ten"[..])
        );
        assert!(snapshots.store_if_newer(b"twelve", at(12)).expect("store"));
        assert_eq!(
            snapshots.load().expect("load").as_deref(),
            Some(&b"twelve"[..])
        );
    }

    #[test]
    fn the_entry_by_entry_encoding_is_the_body_prost_encodes() {
        let meta = Meta::default();
        let entries: Vec<pb::StateEntry> = (0..3u8)
            .map(|i| pb::StateEntry {
                key: vec![b'k', i],
                value: vec![i; usize::from(i) * 200],
            })
            .collect();
        let whole = pb::SnapshotBody {
            format_version: FORMAT_VERSION,
            raft_meta: bincode::serialize(&meta).expect("meta"),
            entries: entries.clone(),
        }
        .encode_to_vec();
        assert_eq!(encode(&meta, entries.clone()).expect("encode"), whole);
        let (_, decoded) = decode(&whole).expect("decode");
        assert_eq!(decoded, entries);
    }
}
