//! The raft log's files: append-only segments of checksummed records.
//!
//! A segment is named after the index of the first entry written to it (20 decimal digits,
//! `.seg`) and starts with [`MAGIC`]. Each record is a 16-byte header — payload length (u32),
//! CRC-32 of the index and payload (u32), log index (u64), all little-endian — then the payload.
//! Appends go to the last segment; once it holds [`SEGMENT_BYTES`], the next append starts a
//! new one after syncing the old, so only the last segment can hold writes that never became
//! durable. Opening therefore checks every record of the last segment and cuts a torn tail
//! there, and walks only the headers of the others (a bad one there is corruption, refused).
//!
//! Positions of the entries live in memory (24 bytes each); payloads are read back with
//! positional reads, from the kernel's page cache for recent entries.

use std::collections::{BTreeMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::error::OpenError;

/// First bytes of every segment file.
const MAGIC: &[u8; 8] = b"MNDLOG01";
const RECORD_HEADER: usize = 16;
/// Size after which a segment is closed and the next append starts a new one.
pub const SEGMENT_BYTES: u64 = 64 * 1024 * 1024;
/// Largest payload a record may hold. A log entry is bounded by the batcher to about 1 MiB;
/// a length beyond this in a header is corruption, not an entry.
pub const RECORD_BYTES_MAX: usize = 16 * 1024 * 1024;

/// Where one entry's record is.
#[derive(Debug, Clone, Copy)]
struct Loc {
    /// The segment's name (first index).
    segment: u64,
    offset: u64,
    len: u32,
}

/// An entry's record, found under the lock and read outside it.
pub struct Located {
    pub index: u64,
    file: Arc<File>,
    offset: u64,
    len: u32,
}

/// The file that holds the newest writes; what a sync makes durable.
pub type ActiveFile = Arc<Mutex<Option<Arc<File>>>>;

/// The segments of one log directory and the position of every kept entry.
pub struct Segments {
    dir: PathBuf,
    segment_bytes: u64,
    files: BTreeMap<u64, Arc<File>>,
    /// Bytes in the last segment.
    tail_len: u64,
    /// Index of `locs[0]`, or of the next entry when `locs` is empty.
    first: u64,
    locs: VecDeque<Loc>,
    active: ActiveFile,
}

fn segment_name(first_index: u64) -> String {
    format!("{first_index:020}.seg")
}

fn parse_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".seg")?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn checksum(index: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&index.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

/// Appends one record (header, then payload) to `buf`. The log's `meta` and `committed` slots
/// use the same framing, with a sequence number in place of the index.
pub fn encode_record(buf: &mut Vec<u8>, index: u64, payload: &[u8]) {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    buf.extend_from_slice(&len.to_le_bytes());
    buf.extend_from_slice(&checksum(index, payload).to_le_bytes());
    buf.extend_from_slice(&index.to_le_bytes());
    buf.extend_from_slice(payload);
}

struct Header {
    len: u32,
    crc: u32,
    index: u64,
}

fn parse_header(bytes: &[u8; RECORD_HEADER]) -> Header {
    let word =
        |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let mut index = [0u8; 8];
    index.copy_from_slice(&bytes[8..16]);
    Header {
        len: word(0),
        crc: word(4),
        index: u64::from_le_bytes(index),
    }
}

/// The index and payload of the whole record at the start of `bytes`, if it is one.
pub fn decode_record(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let header: &[u8; RECORD_HEADER] = bytes.get(..RECORD_HEADER)?.try_into().ok()?;
    let header = parse_header(header);
    let payload = bytes.get(RECORD_HEADER..RECORD_HEADER + header.len as usize)?;
    (checksum(header.index, payload) == header.crc).then_some((header.index, payload))
}

/// Syncs a directory, so that files created, renamed or removed in it stay so.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn corrupt(path: &Path, offset: u64, what: &str) -> OpenError {
    OpenError::Corrupt(format!(
        "log segment {} at offset {offset}: {what}",
        path.display()
    ))
}

/// What [`scan`] found in one segment file.
struct Scanned {
    /// (index, position) of each whole record, in order.
    records: Vec<(u64, Loc)>,
    /// Where the whole records end.
    end: u64,
    /// Whether bytes after `end` are a torn record.
    torn: bool,
}

/// The records of one segment file, in order. `verify` checks each payload's checksum and
/// stops at the first bad or short record (reporting a torn tail there); otherwise a bad
/// header is corruption.
fn scan(path: &Path, file: &File, verify: bool) -> Result<Scanned, OpenError> {
    let file_len = file.metadata().map_err(|e| OpenError::io(path, e))?.len();
    let mut magic = [0u8; 8];
    let segment = path
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(parse_segment_name)
        .unwrap_or_default();
    if file_len < MAGIC.len() as u64 {
        // Created, then the machine stopped before the magic reached the disk.
        return if verify {
            Ok(Scanned {
                records: Vec::new(),
                end: 0,
                torn: true,
            })
        } else {
            Err(corrupt(path, 0, "the file is shorter than its header"))
        };
    }
    file.read_exact_at(&mut magic, 0)
        .map_err(|e| OpenError::io(path, e))?;
    if &magic != MAGIC {
        return Err(corrupt(path, 0, "not a Mandate log segment"));
    }
    let mut records = Vec::new();
    let mut offset = MAGIC.len() as u64;
    let mut payload = Vec::new();
    while offset < file_len {
        let torn = |records| {
            Ok(Scanned {
                records,
                end: offset,
                torn: true,
            })
        };
        if file_len - offset < RECORD_HEADER as u64 {
            if verify {
                return torn(records);
            }
            return Err(corrupt(path, offset, "a record header is cut short"));
        }
        let mut header = [0u8; RECORD_HEADER];
        file.read_exact_at(&mut header, offset)
            .map_err(|e| OpenError::io(path, e))?;
        let header = parse_header(&header);
        let end = offset + RECORD_HEADER as u64 + u64::from(header.len);
        if header.len as usize > RECORD_BYTES_MAX || end > file_len {
            if verify {
                return torn(records);
            }
            return Err(corrupt(
                path,
                offset,
                "a record runs past the end of the file",
            ));
        }
        if verify {
            payload.resize(header.len as usize, 0);
            file.read_exact_at(&mut payload, offset + RECORD_HEADER as u64)
                .map_err(|e| OpenError::io(path, e))?;
            if checksum(header.index, &payload) != header.crc {
                return torn(records);
            }
        }
        records.push((
            header.index,
            Loc {
                segment,
                offset,
                len: header.len,
            },
        ));
        offset = end;
    }
    Ok(Scanned {
        records,
        end: offset,
        torn: false,
    })
}

impl Segments {
    /// Opens the log in `dir` (created if missing). Entries at or below `purged` are dropped;
    /// the rest must be contiguous.
    pub fn open(dir: &Path, segment_bytes: u64, purged: Option<u64>) -> Result<Self, OpenError> {
        fs::create_dir_all(dir).map_err(|e| OpenError::io(dir, e))?;
        let mut names = Vec::new();
        for item in fs::read_dir(dir).map_err(|e| OpenError::io(dir, e))? {
            let item = item.map_err(|e| OpenError::io(dir, e))?;
            if let Some(first) = item.file_name().to_str().and_then(parse_segment_name) {
                names.push(first);
            }
        }
        names.sort_unstable();
        let mut files = BTreeMap::new();
        let mut records = Vec::new();
        let mut tail_len = 0;
        for (i, &name) in names.iter().enumerate() {
            let path = dir.join(segment_name(name));
            let last = i + 1 == names.len();
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| OpenError::io(&path, e))?;
            let Scanned {
                records: found,
                end,
                torn,
            } = scan(&path, &file, last)?;
            if torn {
                let dropped = file.metadata().map_err(|e| OpenError::io(&path, e))?.len() - end;
                tracing::warn!(
                    segment = %path.display(),
                    offset = end,
                    bytes = dropped,
                    "cutting the log's torn tail (writes that never became durable)"
                );
                let keep = end.max(MAGIC.len() as u64);
                if end < MAGIC.len() as u64 {
                    file.write_all_at(MAGIC, 0)
                        .map_err(|e| OpenError::io(&path, e))?;
                }
                file.set_len(keep).map_err(|e| OpenError::io(&path, e))?;
                file.sync_all().map_err(|e| OpenError::io(&path, e))?;
                tail_len = keep;
            } else {
                tail_len = end;
            }
            records.extend(found);
            files.insert(name, Arc::new(file));
        }
        let mut segments = Segments {
            dir: dir.to_path_buf(),
            segment_bytes,
            files,
            tail_len,
            first: purged.map_or(0, |p| p + 1),
            locs: VecDeque::with_capacity(records.len()),
            active: Arc::default(),
        };
        for (index, loc) in records {
            if purged.is_some_and(|p| index <= p) {
                continue;
            }
            let expected = segments.next_index();
            if !segments.locs.is_empty() && index != expected {
                return Err(corrupt(
                    &dir.join(segment_name(loc.segment)),
                    loc.offset,
                    &format!("entry {index} where entry {expected} belongs"),
                ));
            }
            if segments.locs.is_empty() {
                segments.first = index;
            }
            segments.locs.push_back(loc);
        }
        segments.remove_unused()?;
        segments.set_active();
        Ok(segments)
    }

    /// The handle a sync uses; it follows the last segment.
    pub fn active_file(&self) -> ActiveFile {
        self.active.clone()
    }

    fn set_active(&self) {
        let last = self.files.values().next_back().cloned();
        *self.active.lock().unwrap_or_else(|p| p.into_inner()) = last;
    }

    /// Index of the last kept entry, if any.
    pub fn last_index(&self) -> Option<u64> {
        (!self.locs.is_empty()).then(|| self.first + self.locs.len() as u64 - 1)
    }

    fn next_index(&self) -> u64 {
        self.first + self.locs.len() as u64
    }

    fn new_segment(&mut self, first_index: u64) -> io::Result<()> {
        if let Some(file) = self.files.values().next_back() {
            file.sync_data()?;
        }
        let path = self.dir.join(segment_name(first_index));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        file.write_all_at(MAGIC, 0)?;
        file.sync_all()?;
        sync_dir(&self.dir)?;
        self.files.insert(first_index, Arc::new(file));
        self.tail_len = MAGIC.len() as u64;
        self.set_active();
        Ok(())
    }

    /// Writes `entries` (index, payload) after the last one. They are readable at once and
    /// durable after the next sync of the active file.
    pub fn append<'a>(
        &mut self,
        entries: impl IntoIterator<Item = (u64, &'a [u8])>,
    ) -> io::Result<()> {
        let mut buf = Vec::new();
        let mut pending: Vec<Loc> = Vec::new();
        let mut next = self.last_index().map(|last| last + 1);
        for (index, payload) in entries {
            if payload.len() > RECORD_BYTES_MAX {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "log entry {index} is {} bytes, over the {RECORD_BYTES_MAX}-byte limit",
                        payload.len()
                    ),
                ));
            }
            if let Some(expected) = next.filter(|&expected| expected != index) {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("log entry {index} does not follow entry {}", expected - 1),
                ));
            }
            if self.locs.is_empty() && pending.is_empty() {
                self.first = index;
            }
            if self.files.is_empty() || self.tail_len + buf.len() as u64 >= self.segment_bytes {
                self.write_tail(&buf)?;
                buf.clear();
                self.locs.extend(pending.drain(..));
                self.new_segment(index)?;
            }
            pending.push(Loc {
                segment: *self.files.keys().next_back().unwrap_or(&index),
                offset: self.tail_len + buf.len() as u64,
                len: payload.len() as u32,
            });
            encode_record(&mut buf, index, payload);
            next = Some(index + 1);
        }
        self.write_tail(&buf)?;
        self.locs.extend(pending);
        Ok(())
    }

    fn write_tail(&mut self, buf: &[u8]) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let Some(file) = self.files.values().next_back() else {
            return Err(io::Error::other("the log has no segment to write to"));
        };
        file.write_all_at(buf, self.tail_len)?;
        self.tail_len += buf.len() as u64;
        Ok(())
    }

    /// Removes the entries from `index` on, durably.
    pub fn truncate(&mut self, index: u64) -> io::Result<()> {
        let Some(last) = self.last_index() else {
            return Ok(());
        };
        if index > last {
            return Ok(());
        }
        let keep = index.saturating_sub(self.first) as usize;
        let cut = self.locs[keep];
        // Newest first, so that a crash part way leaves a contiguous log.
        let later: Vec<u64> = self
            .files
            .range(cut.segment + 1..)
            .map(|(k, _)| *k)
            .collect();
        for name in later.into_iter().rev() {
            fs::remove_file(self.dir.join(segment_name(name)))?;
            self.files.remove(&name);
        }
        if let Some(file) = self.files.get(&cut.segment) {
            file.set_len(cut.offset)?;
            file.sync_all()?;
        }
        sync_dir(&self.dir)?;
        self.tail_len = cut.offset;
        self.locs.truncate(keep);
        self.set_active();
        Ok(())
    }

    /// Forgets the entries up to and including `index`, and removes the segments that hold
    /// only such entries (never the last one, which takes the next append).
    pub fn purge(&mut self, index: u64) -> io::Result<()> {
        while self.first <= index && !self.locs.is_empty() {
            self.locs.pop_front();
            self.first += 1;
        }
        if self.locs.is_empty() {
            self.first = self.first.max(index + 1);
        }
        self.remove_unused()
            .map_err(|e| io::Error::other(e.to_string()))
    }

    fn remove_unused(&mut self) -> Result<(), OpenError> {
        let Some(&last) = self.files.keys().next_back() else {
            return Ok(());
        };
        let keep_from = self.locs.front().map_or(last, |l| l.segment);
        let unused: Vec<u64> = self.files.range(..keep_from).map(|(k, _)| *k).collect();
        for name in unused {
            let path = self.dir.join(segment_name(name));
            fs::remove_file(&path).map_err(|e| OpenError::io(&path, e))?;
            self.files.remove(&name);
        }
        Ok(())
    }

    /// The records of the kept entries in `start..end` (end exclusive), to be read with
    /// [`read`].
    pub fn locate(&self, start: u64, end: u64) -> Vec<Located> {
        let start = start.max(self.first);
        let end = end.min(self.next_index());
        (start..end)
            .filter_map(|index| {
                let loc = self.locs[(index - self.first) as usize];
                self.files.get(&loc.segment).map(|file| Located {
                    index,
                    file: file.clone(),
                    offset: loc.offset,
                    len: loc.len,
                })
            })
            .collect()
    }
}

/// Reads one located record's payload, checking its header and checksum.
pub fn read(located: &Located) -> io::Result<Vec<u8>> {
    let mut bytes = vec![0u8; RECORD_HEADER + located.len as usize];
    located.file.read_exact_at(&mut bytes, located.offset)?;
    let whole = decode_record(&bytes).is_some_and(|(index, payload)| {
        index == located.index && payload.len() == located.len as usize
    });
    if !whole {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "the record of log entry {} at offset {} fails its checksum",
                located.index, located.offset
            ),
        ));
    }
    bytes.drain(..RECORD_HEADER);
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Segments this small hold three 40-byte records each.
    const SMALL: u64 = 150;

    fn payload(index: u64) -> Vec<u8> {
        format!("entry {index:034}").into_bytes()
    }

    fn append_range(segments: &mut Segments, range: std::ops::RangeInclusive<u64>) {
        let payloads: Vec<(u64, Vec<u8>)> = range.map(|i| (i, payload(i))).collect();
        segments
            .append(payloads.iter().map(|(i, p)| (*i, p.as_slice())))
            .expect("append");
    }

    fn read_all(segments: &Segments) -> Vec<(u64, Vec<u8>)> {
        segments
            .locate(0, u64::MAX)
            .iter()
            .map(|l| (l.index, read(l).expect("read")))
            .collect()
    }

    fn segment_files(dir: &Path) -> Vec<u64> {
        let mut names: Vec<u64> = fs::read_dir(dir)
            .expect("dir")
            .filter_map(|e| parse_segment_name(e.expect("entry").file_name().to_str()?))
            .collect();
        names.sort_unstable();
        names
    }

    #[test]
    fn entries_written_across_segments_read_back_the_same_after_a_reopen() {
        let dir = tempfile::tempdir().expect("dir");
        let mut segments = Segments::open(dir.path(), SMALL, None).expect("open");
        append_range(&mut segments, 1..=4);
        append_range(&mut segments, 5..=10);
        let written = read_all(&segments);
        assert_eq!(written.len(), 10);
        assert!(written.iter().all(|(i, p)| *p == payload(*i)));
        assert!(segment_files(dir.path()).len() >= 3, "the log rolled over");
        drop(segments);
        let reopened = Segments::open(dir.path(), SMALL, None).expect("reopen");
        assert_eq!(read_all(&reopened), written);
    }

    #[test]
    fn a_torn_tail_is_cut_back_to_the_last_whole_record_and_appends_continue_after_it() {
        let dir = tempfile::tempdir().expect("dir");
        let mut segments = Segments::open(dir.path(), SMALL, None).expect("open");
        append_range(&mut segments, 1..=8);
        drop(segments);
        let last = *segment_files(dir.path()).last().expect("a segment");
        let path = dir.path().join(segment_name(last));
        let len = fs::metadata(&path).expect("meta").len();
        let file = OpenOptions::new().write(true).open(&path).expect("open");
        file.set_len(len - 5).expect("tear the last record");
        drop(file);

        let mut segments = Segments::open(dir.path(), SMALL, None).expect("reopen");
        assert_eq!(segments.last_index(), Some(7));
        append_range(&mut segments, 8..=9);
        drop(segments);
        let segments = Segments::open(dir.path(), SMALL, None).expect("reopen again");
        let kept = read_all(&segments);
        assert_eq!(
            kept.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
            (1..=9).collect::<Vec<_>>()
        );
        assert!(kept.iter().all(|(i, p)| *p == payload(*i)));
    }

    #[test]
    fn a_bad_record_in_an_older_segment_is_refused_with_its_file_and_offset() {
        let dir = tempfile::tempdir().expect("dir");
        let mut segments = Segments::open(dir.path(), SMALL, None).expect("open");
        append_range(&mut segments, 1..=8);
        drop(segments);
        let first = segment_files(dir.path())[0];
        let path = dir.path().join(segment_name(first));
        let file = OpenOptions::new().write(true).open(&path).expect("open");
        // The first record's length, made to run past the end of the file.
        file.write_all_at(&u32::MAX.to_le_bytes(), MAGIC.len() as u64)
            .expect("corrupt");
        drop(file);
        let Err(error) = Segments::open(dir.path(), SMALL, None) else {
            panic!("a corrupt older segment opened");
        };
        let message = error.to_string();
        assert!(message.contains(&segment_name(first)), "{message}");
        assert!(message.contains("offset 8"), "{message}");
    }

    #[test]
    fn a_payload_changed_on_disk_fails_its_checksum_when_read() {
        let dir = tempfile::tempdir().expect("dir");
        let mut segments = Segments::open(dir.path(), SMALL, None).expect("open");
        append_range(&mut segments, 1..=2);
        let first = segment_files(dir.path())[0];
        let file = OpenOptions::new()
            .write(true)
            .open(dir.path().join(segment_name(first)))
            .expect("open");
        file.write_all_at(b"X", (MAGIC.len() + RECORD_HEADER + 3) as u64)
            .expect("corrupt");
        let located = segments.locate(1, 2);
        let error = read(&located[0]).expect_err("a changed payload was read");
        assert!(error.to_string().contains("log entry 1"), "{error}");
    }

    #[test]
    fn truncation_removes_later_segments_and_the_cut_holds_after_a_reopen() {
        let dir = tempfile::tempdir().expect("dir");
        let mut segments = Segments::open(dir.path(), SMALL, None).expect("open");
        append_range(&mut segments, 1..=10);
        segments.truncate(5).expect("truncate");
        assert_eq!(segments.last_index(), Some(4));
        append_range(&mut segments, 5..=6);
        drop(segments);
        let segments = Segments::open(dir.path(), SMALL, None).expect("reopen");
        let kept: Vec<u64> = read_all(&segments).iter().map(|(i, _)| *i).collect();
        assert_eq!(kept, (1..=6).collect::<Vec<_>>());
        assert!(segment_files(dir.path()).iter().all(|&s| s <= 5));
    }

    #[test]
    fn a_purge_removes_only_segments_whose_entries_are_all_purged() {
        let dir = tempfile::tempdir().expect("dir");
        let mut segments = Segments::open(dir.path(), SMALL, None).expect("open");
        append_range(&mut segments, 1..=10);
        let before = segment_files(dir.path());
        segments.purge(5).expect("purge");
        let after = segment_files(dir.path());
        assert!(after.len() < before.len(), "{before:?} -> {after:?}");
        assert!(
            after[0] <= 6,
            "the segment holding entry 6 is kept: {after:?}"
        );
        let kept: Vec<u64> = read_all(&segments).iter().map(|(i, _)| *i).collect();
        assert_eq!(kept, (6..=10).collect::<Vec<_>>());
        // Beyond the last entry: nothing is kept, and the next append follows the purge point.
        segments.purge(20).expect("purge all");
        assert_eq!(segments.last_index(), None);
        append_range(&mut segments, 21..=22);
        drop(segments);
        let segments = Segments::open(dir.path(), SMALL, Some(20)).expect("reopen");
        let kept: Vec<u64> = read_all(&segments).iter().map(|(i, _)| *i).collect();
        assert_eq!(kept, vec![21, 22]);
    }

    #[test]
    fn an_entry_that_does_not_follow_the_last_is_refused_and_nothing_is_written() {
        let dir = tempfile::tempdir().expect("dir");
        let mut segments = Segments::open(dir.path(), SMALL, None).expect("open");
        append_range(&mut segments, 1..=2);
        let gap = payload(4);
        let error = segments
            .append([(4, gap.as_slice())])
            .expect_err("a gap was accepted");
        assert!(
            error
                .to_string()
                .contains("log entry 4 does not follow entry 2"),
            "{error}"
        );
        assert_eq!(segments.last_index(), Some(2));
    }
}
