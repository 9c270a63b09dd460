//! Snapshot files: a protobuf `SnapshotBody` holding every key of the state machine.
//!
//! A body is written to its file entry by entry and read back entry by entry, so neither
//! building, sending, receiving nor installing a snapshot holds the body in memory. A finished
//! file is synced and renamed over the current one, so a crash leaves either the old snapshot
//! or the new one.

use std::fs;
use std::io::{self, BufRead, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use mandate_proto::v1 as pb;
use openraft::{LogId, SnapshotMeta};
use prost::encoding::WireType;
use prost::Message;
use tokio::io::{AsyncRead, AsyncSeek, AsyncWrite, ReadBuf};

use crate::types::{Member, NodeId};

/// Version of the snapshot body layout; a node refuses a body with another version.
pub const FORMAT_VERSION: u32 = 1;
const CURRENT: &str = "current.snapshot";
/// A received snapshot while it is installed: kept across a restart, so that an install cut
/// short can be finished from it.
const INSTALLING: &str = "installing.snapshot";
/// Files being built or received end in this; whatever a crash left of them is removed on open.
const UNFINISHED: &str = "tmp";
/// How much of a snapshot file is written between two syncs.
pub const SYNC_EVERY_BYTES: u64 = 8 * 1024 * 1024;
/// The largest field a body may hold: the snapshot meta or one state entry. Larger is damage.
pub const MAX_FIELD_BYTES: u64 = 64 * 1024 * 1024;
/// The longest key an entry may have: the state store's limit.
pub const MAX_KEY_BYTES: usize = u16::MAX as usize;

/// The field numbers of `SnapshotBody`.
const VERSION_FIELD: u32 = 1;
const META_FIELD: u32 = 2;
const ENTRIES_FIELD: u32 = 3;

pub type Meta = SnapshotMeta<NodeId, Member>;

/// Writes a snapshot body entry by entry: the bytes are those `SnapshotBody::encode_to_vec`
/// gives for the same meta and entries.
pub struct Encoder<W: Write> {
    out: W,
    scratch: Vec<u8>,
    entries: usize,
    bytes: u64,
}

impl<W: Write> Encoder<W> {
    pub fn new(meta: &Meta, mut out: W) -> io::Result<Self> {
        let raft_meta = bincode::serialize(meta).map_err(io::Error::other)?;
        let head = pb::SnapshotBody {
            format_version: FORMAT_VERSION,
            raft_meta,
            entries: Vec::new(),
        }
        .encode_to_vec();
        out.write_all(&head)?;
        Ok(Encoder {
            out,
            scratch: Vec::new(),
            entries: 0,
            bytes: head.len() as u64,
        })
    }

    /// Appends one entry; entries must come in strictly increasing key order.
    pub fn push(&mut self, key: &[u8], value: &[u8]) -> io::Result<()> {
        self.scratch.clear();
        prost::encoding::message::encode(
            ENTRIES_FIELD,
            &pb::StateEntry {
                key: key.to_vec(),
                value: value.to_vec(),
            },
            &mut self.scratch,
        );
        self.out.write_all(&self.scratch)?;
        self.entries += 1;
        self.bytes += self.scratch.len() as u64;
        Ok(())
    }

    /// How many entries have been appended.
    pub fn entries(&self) -> usize {
        self.entries
    }

    /// How many bytes the body holds so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Flushes the body and hands back where it was written.
    pub fn finish(mut self) -> io::Result<W> {
        self.out.flush()?;
        Ok(self.out)
    }
}

/// Reads a snapshot body entry by entry, checking its version, its meta and that its keys
/// come in strictly increasing order.
pub struct Decoder<R: BufRead> {
    input: R,
    meta: Meta,
    previous: Option<Vec<u8>>,
}

impl<R: BufRead> Decoder<R> {
    /// Reads the body's head: its format version and meta.
    pub fn open(mut input: R) -> Result<Self, String> {
        let version = match read_field(&mut input)? {
            Some((VERSION_FIELD, Field::Varint(v))) => v,
            _ => 0,
        };
        if version != u64::from(FORMAT_VERSION) {
            return Err(format!(
                "snapshot format version {version} is not {FORMAT_VERSION}"
            ));
        }
        let raft_meta = match read_field(&mut input)? {
            Some((META_FIELD, Field::Bytes(b))) => b,
            _ => return Err("snapshot body: the meta does not follow the format version".into()),
        };
        let meta: Meta =
            bincode::deserialize(&raft_meta).map_err(|e| format!("snapshot meta: {e}"))?;
        Ok(Decoder {
            input,
            meta,
            previous: None,
        })
    }

    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    /// The next entry, or `None` at the end of the body.
    pub fn next_entry(&mut self) -> Result<Option<pb::StateEntry>, String> {
        let bytes = match read_field(&mut self.input)? {
            None => return Ok(None),
            Some((ENTRIES_FIELD, Field::Bytes(b))) => b,
            Some((tag, _)) => {
                return Err(format!(
                    "snapshot body: field {tag} where only entries (field {ENTRIES_FIELD}) may come"
                ))
            }
        };
        let entry =
            pb::StateEntry::decode(bytes.as_slice()).map_err(|e| format!("snapshot entry: {e}"))?;
        if entry.key.is_empty() || entry.key.len() > MAX_KEY_BYTES {
            return Err(format!(
                "snapshot entry: a key of {} bytes; keys hold 1 to {MAX_KEY_BYTES}",
                entry.key.len()
            ));
        }
        if self.previous.as_ref().is_some_and(|p| *p >= entry.key) {
            return Err("snapshot entries are not in strictly increasing key order".into());
        }
        self.previous = Some(entry.key.clone());
        Ok(Some(entry))
    }
}

enum Field {
    Varint(u64),
    Bytes(Vec<u8>),
}

/// Reads one field of the body, or `None` where the body ends between fields.
fn read_field(input: &mut impl BufRead) -> Result<Option<(u32, Field)>, String> {
    let Some(key) = read_varint(input)? else {
        return Ok(None);
    };
    let (tag, wire_type) = prost::encoding::decode_key(&mut key.as_slice())
        .map_err(|e| format!("snapshot body: {e}"))?;
    let truncated = || format!("snapshot body: truncated inside field {tag}");
    let field = match wire_type {
        WireType::Varint => {
            let bytes = read_varint(input)?.ok_or_else(truncated)?;
            Field::Varint(varint(&bytes)?)
        }
        WireType::LengthDelimited => {
            let len = varint(&read_varint(input)?.ok_or_else(truncated)?)?;
            if len > MAX_FIELD_BYTES {
                return Err(format!(
                    "snapshot body: field {tag} claims {len} bytes, more than the {MAX_FIELD_BYTES} any field may hold"
                ));
            }
            let mut bytes = Vec::with_capacity(len as usize);
            input
                .take(len)
                .read_to_end(&mut bytes)
                .map_err(|e| format!("snapshot body: {e}"))?;
            if bytes.len() as u64 != len {
                return Err(truncated());
            }
            Field::Bytes(bytes)
        }
        other => {
            let used = "the body uses only varints and length-delimited fields";
            return Err(format!(
                "snapshot body: field {tag} has wire type {other:?}; {used}"
            ));
        }
    };
    Ok(Some((tag, field)))
}

/// The raw bytes of one varint, or `None` at the end of the input.
fn read_varint(input: &mut impl BufRead) -> Result<Option<Vec<u8>>, String> {
    let mut bytes = Vec::with_capacity(10);
    loop {
        let mut byte = [0u8];
        match input.read(&mut byte) {
            Ok(0) if bytes.is_empty() => return Ok(None),
            Ok(0) => return Err("snapshot body: truncated inside a varint".into()),
            Ok(_) => bytes.push(byte[0]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(format!("snapshot body: {e}")),
        }
        if byte[0] < 0x80 {
            return Ok(Some(bytes));
        }
        if bytes.len() == 10 {
            return Err("snapshot body: a varint longer than ten bytes".into());
        }
    }
}

fn varint(bytes: &[u8]) -> Result<u64, String> {
    prost::encoding::decode_varint(&mut &bytes[..]).map_err(|e| format!("snapshot body: {e}"))
}

/// A snapshot body in its file: openraft's snapshot data. openraft reads and writes it in
/// chunks of a few megabytes, which are served here on the calling thread rather than handed to
/// a blocking thread each: the deterministic simulation must start no threads, and a chunk is a
/// page-cache copy.
#[derive(Debug)]
pub struct SnapshotFile {
    file: fs::File,
    path: PathBuf,
}

impl SnapshotFile {
    /// The open file, for reading or writing a body with blocking calls.
    pub fn file(&self) -> &fs::File {
        &self.file
    }

    /// A buffered reader of the body from its start, sharing this file's offset.
    pub fn reader(&mut self) -> io::Result<io::BufReader<&fs::File>> {
        self.file.rewind()?;
        Ok(io::BufReader::with_capacity(1 << 20, &self.file))
    }

    /// The body's meta, read from its head; the file is left at its start.
    pub fn meta(&mut self) -> Result<Meta, String> {
        let meta = Decoder::open(self.reader().map_err(|e| e.to_string())?)?
            .meta()
            .clone();
        self.file.rewind().map_err(|e| e.to_string())?;
        Ok(meta)
    }

    pub fn into_std(self) -> fs::File {
        self.file
    }
}

impl AsyncRead for SnapshotFile {
    fn poll_read(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let n = self.get_mut().file.read(buf.initialize_unfilled())?;
        buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for SnapshotFile {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Poll::Ready(self.get_mut().file.write(buf))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.get_mut().file.flush())
    }

    /// Durability comes when the file is adopted as the current snapshot, not here.
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncSeek for SnapshotFile {
    fn start_seek(self: Pin<&mut Self>, position: SeekFrom) -> io::Result<()> {
        self.get_mut().file.seek(position).map(|_| ())
    }

    fn poll_complete(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<u64>> {
        Poll::Ready(self.get_mut().file.stream_position())
    }
}

/// Writes through to a file, syncing it every [`SYNC_EVERY_BYTES`]: one sync of a whole large
/// snapshot at the end made the file system flush gigabytes at once, and the raft log's own
/// fsyncs waited behind it.
pub struct SyncingWriter<'a> {
    file: &'a fs::File,
    unsynced: u64,
}

impl<'a> SyncingWriter<'a> {
    pub fn new(file: &'a fs::File) -> Self {
        SyncingWriter { file, unsynced: 0 }
    }
}

impl Write for SyncingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.unsynced += n as u64;
        if self.unsynced >= SYNC_EVERY_BYTES {
            self.file.sync_data()?;
            self.unsynced = 0;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// The directory holding a node's current snapshot and the files being built or received.
#[derive(Clone)]
pub struct SnapshotDir {
    dir: PathBuf,
    /// The last log id of the newest snapshot stored since the node started.
    newest: Arc<Mutex<Option<LogId<NodeId>>>>,
    /// Numbers the unfinished files.
    next: Arc<AtomicU64>,
}

impl SnapshotDir {
    /// Opens the directory, removing whatever unfinished files a crash left.
    pub fn open(dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(dir)?;
        for entry in fs::read_dir(dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == UNFINISHED) {
                fs::remove_file(&path)?;
            }
        }
        Ok(SnapshotDir {
            dir: dir.to_owned(),
            newest: Arc::default(),
            next: Arc::default(),
        })
    }

    /// A new, empty file to build or receive a snapshot in; `purpose` names it.
    pub fn create(&self, purpose: &str) -> io::Result<SnapshotFile> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!("{purpose}-{n}.{UNFINISHED}"));
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        Ok(SnapshotFile { file, path })
    }

    /// Makes `snapshot`, a finished body up to `last`, the current snapshot, unless a newer one
    /// was stored meanwhile: a snapshot built while one from the leader was installed is older
    /// than it and must not replace it. Returns whether it was stored; either way the open file
    /// still reads the body.
    pub fn adopt_if_newer(
        &self,
        snapshot: &mut SnapshotFile,
        last: Option<LogId<NodeId>>,
    ) -> io::Result<bool> {
        snapshot.file.sync_all()?;
        let mut newest = self.newest.lock().unwrap_or_else(|e| e.into_inner());
        if newest.is_some() && last < *newest {
            fs::remove_file(&snapshot.path)?;
            return Ok(false);
        }
        let current = self.dir.join(CURRENT);
        fs::rename(&snapshot.path, &current)?;
        fs::File::open(&self.dir)?.sync_all()?;
        snapshot.path = current;
        *newest = last;
        Ok(true)
    }

    /// `snapshot` as a file of this directory that may be adopted: itself when this directory
    /// created it, else a copy (a body built by another node's store, as in tests).
    pub fn own(&self, mut snapshot: SnapshotFile) -> io::Result<SnapshotFile> {
        let unfinished = snapshot.path.extension().is_some_and(|e| e == UNFINISHED);
        if unfinished && snapshot.path.parent() == Some(self.dir.as_path()) {
            return Ok(snapshot);
        }
        let copy = self.create("copied")?;
        snapshot.file.rewind()?;
        io::copy(&mut snapshot.file, &mut copy.file())?;
        Ok(copy)
    }

    /// Keeps `snapshot`, a finished body about to be installed, as the one being installed: it
    /// survives a restart until [`SnapshotDir::adopt_if_newer`] or
    /// [`SnapshotDir::discard_installing`] takes it.
    pub fn set_aside(&self, snapshot: &mut SnapshotFile) -> io::Result<()> {
        snapshot.file.sync_all()?;
        let installing = self.dir.join(INSTALLING);
        fs::rename(&snapshot.path, &installing)?;
        fs::File::open(&self.dir)?.sync_all()?;
        snapshot.path = installing;
        Ok(())
    }

    /// The snapshot being installed when the node stopped, open at its start, if any.
    pub fn open_installing(&self) -> io::Result<Option<SnapshotFile>> {
        self.open_named(INSTALLING)
    }

    /// Removes the snapshot set aside for installing, if there is one.
    pub fn discard_installing(&self) -> io::Result<()> {
        match fs::remove_file(self.dir.join(INSTALLING)) {
            Ok(()) => fs::File::open(&self.dir)?.sync_all(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The current snapshot, open at its start, if one was ever stored.
    pub fn open_current(&self) -> io::Result<Option<SnapshotFile>> {
        self.open_named(CURRENT)
    }

    /// The file `name` of this directory, open at its start, if it exists.
    fn open_named(&self, name: &str) -> io::Result<Option<SnapshotFile>> {
        let path = self.dir.join(name);
        match fs::File::open(&path) {
            Ok(file) => Ok(Some(SnapshotFile { file, path })),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(meta: &Meta, entries: &[pb::StateEntry]) -> Vec<u8> {
        let mut encoder = Encoder::new(meta, Vec::new()).expect("head");
        for entry in entries {
            encoder.push(&entry.key, &entry.value).expect("push");
        }
        encoder.finish().expect("finish")
    }

    fn decode(bytes: &[u8]) -> Result<Vec<pb::StateEntry>, String> {
        let mut decoder = Decoder::open(bytes)?;
        let mut entries = Vec::new();
        while let Some(entry) = decoder.next_entry()? {
            entries.push(entry);
        }
        Ok(entries)
    }

    fn entries(n: u8) -> Vec<pb::StateEntry> {
        (0..n)
            .map(|i| pb::StateEntry {
                key: vec![b'k', i],
                value: vec![i; usize::from(i) * 200],
            })
            .collect()
    }

    fn store(snapshots: &SnapshotDir, bytes: &[u8], last: Option<LogId<NodeId>>) -> bool {
        let mut file = snapshots.create("test").expect("create");
        file.file().write_all(bytes).expect("write");
        snapshots.adopt_if_newer(&mut file, last).expect("adopt")
    }

    fn current(snapshots: &SnapshotDir) -> Vec<u8> {
        let mut bytes = Vec::new();
        snapshots
            .open_current()
            .expect("open")
            .expect("a current snapshot")
            .into_std()
            .read_to_end(&mut bytes)
            .expect("read");
        bytes
    }

    #[test]
    fn an_older_snapshot_never_replaces_a_newer_one() {
        let dir = tempfile::tempdir().expect("dir");
        let snapshots = SnapshotDir::open(dir.path()).expect("open");
        let at = |index| Some(LogId::new(openraft::CommittedLeaderId::new(1, 1), index));
        assert!(store(&snapshots, b"ten", at(10)));
        assert!(!store(&snapshots, b"five", at(5)));
        assert_eq!(current(&snapshots), b"ten");
        assert!(store(&snapshots, b"twelve", at(12)));
        assert_eq!(current(&snapshots), b"twelve");
        let left: Vec<_> = fs::read_dir(dir.path())
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(left, [CURRENT], "only the current snapshot stays on disk");
    }

    #[test]
    fn opening_the_directory_removes_what_a_crash_left_unfinished() {
        let dir = tempfile::tempdir().expect("dir");
        let snapshots = SnapshotDir::open(dir.path()).expect("open");
        assert!(store(&snapshots, b"kept", None));
        let half = snapshots.create("building").expect("create");
        half.file().write_all(b"half a body").expect("write");
        drop(half);
        let reopened = SnapshotDir::open(dir.path()).expect("reopen");
        assert_eq!(current(&reopened), b"kept");
        assert_eq!(fs::read_dir(dir.path()).expect("list").count(), 1);
    }

    #[test]
    fn the_entry_by_entry_encoding_is_the_body_prost_encodes_and_decodes_back() {
        let meta = Meta::default();
        let whole = pb::SnapshotBody {
            format_version: FORMAT_VERSION,
            raft_meta: bincode::serialize(&meta).expect("meta"),
            entries: entries(3),
        }
        .encode_to_vec();
        assert_eq!(body(&meta, &entries(3)), whole);
        assert_eq!(decode(&whole).expect("decode"), entries(3));
    }

    #[test]
    fn a_body_cut_short_inside_a_field_is_refused_as_truncated() {
        let all = entries(3);
        let whole = body(&Meta::default(), &all);
        let boundaries: Vec<usize> = (0..=all.len())
            .map(|n| body(&Meta::default(), &all[..n]).len())
            .collect();
        let err = decode(&whole[..2]).expect_err("no meta");
        assert!(err.contains("the meta does not follow"), "{err}");
        for cut in (1..whole.len()).filter(|&c| c != 2 && !boundaries.contains(&c)) {
            let err = decode(&whole[..cut]).expect_err("a cut body");
            assert!(err.contains("truncated inside"), "cut at {cut}: {err}");
        }
    }

    #[test]
    fn a_body_of_another_version_or_out_of_order_is_refused() {
        let mut other = pb::SnapshotBody {
            format_version: FORMAT_VERSION + 1,
            raft_meta: bincode::serialize(&Meta::default()).expect("meta"),
            entries: entries(2),
        };
        let err = decode(&other.encode_to_vec()).expect_err("another version");
        assert_eq!(
            err,
            format!("snapshot format version 2 is not {FORMAT_VERSION}")
        );
        other.format_version = FORMAT_VERSION;
        other.entries.reverse();
        let err = decode(&other.encode_to_vec()).expect_err("out of order");
        assert!(err.contains("strictly increasing"), "{err}");
    }

    #[test]
    fn an_entry_with_an_empty_or_overlong_key_is_refused() {
        for len in [0, MAX_KEY_BYTES + 1] {
            let entry = pb::StateEntry {
                key: vec![b'k'; len],
                value: b"v".to_vec(),
            };
            let err = decode(&body(&Meta::default(), &[entry])).expect_err("a bad key");
            assert_eq!(
                err,
                format!("snapshot entry: a key of {len} bytes; keys hold 1 to {MAX_KEY_BYTES}")
            );
        }
        let longest = pb::StateEntry {
            key: vec![b'k'; MAX_KEY_BYTES],
            value: Vec::new(),
        };
        let decoded = decode(&body(&Meta::default(), std::slice::from_ref(&longest)));
        assert_eq!(decoded, Ok(vec![longest]));
    }

    #[test]
    fn a_field_claiming_more_than_any_field_may_hold_is_refused_before_reading_it() {
        let mut bytes = body(&Meta::default(), &[]);
        prost::encoding::encode_key(ENTRIES_FIELD, WireType::LengthDelimited, &mut bytes);
        prost::encoding::encode_varint(u64::MAX >> 1, &mut bytes);
        let err = decode(&bytes).expect_err("a huge field");
        assert!(err.contains("more than the"), "{err}");
    }
}
