//! Point-in-time cuts of the state tree, read while apply goes on.
//!
//! sled 0.34 has no read snapshots, and copying the whole state while apply waits stalled every
//! node for seconds once the state reached hundreds of megabytes. A cut instead records the
//! state as of one applied index lazily: a reader walks the tree in key order, and before apply
//! first overwrites or deletes a key the reader has not reached yet, it saves that key's value
//! as of the cut (its pre-image, or its absence). The reader prefers a pre-image to what it
//! finds in the tree, so it sees exactly the keys and values of the cut. Apply pays one read per
//! key it writes ahead of a reader; writes behind the reader, and all writes while no cut is
//! open, cost nothing more.

use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};

use mandate_core::state::KeyValue;

struct Cut {
    id: u64,
    /// The last key the reader has passed; `None` before its first chunk.
    passed: Option<Vec<u8>>,
    /// Values as of the cut (`None`: the key did not exist) of keys written since, ahead of the
    /// reader.
    preimages: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

#[derive(Default)]
struct Open {
    next_id: u64,
    cuts: Vec<Cut>,
}

/// The cuts open on one state tree. Every write to the tree must be announced to
/// [`Cuts::before_write`] first.
#[derive(Clone, Default)]
pub(crate) struct Cuts {
    open: Arc<Mutex<Open>>,
}

impl Cuts {
    fn lock(&self) -> MutexGuard<'_, Open> {
        // The lock guards plain data with no invariant a panic could break halfway.
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens a cut of `tree` as it is now. The caller must hold off writes until this returns.
    pub(crate) fn begin(&self, tree: &sled::Tree) -> CutReader {
        let mut open = self.lock();
        let id = open.next_id;
        open.next_id += 1;
        open.cuts.push(Cut {
            id,
            passed: None,
            preimages: BTreeMap::new(),
        });
        CutReader {
            tree: tree.clone(),
            cuts: self.clone(),
            id,
            done: false,
        }
    }

    /// Saves, for every open cut, the value as of the cut of each of `keys` that its reader has
    /// not reached and that has no pre-image yet. Call before writing `keys` to `tree`.
    pub(crate) fn before_write<'k>(
        &self,
        tree: &sled::Tree,
        keys: impl IntoIterator<Item = &'k [u8]>,
    ) -> sled::Result<()> {
        let mut open = self.lock();
        if open.cuts.is_empty() {
            return Ok(());
        }
        for key in keys {
            let mut current: Option<Option<Vec<u8>>> = None;
            for cut in &mut open.cuts {
                let behind = cut.passed.as_deref().is_some_and(|p| key <= p);
                if behind || cut.preimages.contains_key(key) {
                    continue;
                }
                let value = match &current {
                    Some(v) => v.clone(),
                    None => current.insert(tree.get(key)?.map(|v| v.to_vec())).clone(),
                };
                cut.preimages.insert(key.to_vec(), value);
            }
        }
        Ok(())
    }
}

/// Reads one cut in key order. Dropping it closes the cut.
pub(crate) struct CutReader {
    tree: sled::Tree,
    cuts: Cuts,
    id: u64,
    done: bool,
}

impl CutReader {
    /// The next entries of the cut, in key order: about `limit` of them, an empty chunk at the
    /// end, then `None`.
    pub(crate) fn next_chunk(&mut self, limit: usize) -> sled::Result<Option<Vec<KeyValue>>> {
        if self.done {
            return Ok(None);
        }
        let limit = limit.max(1);
        let mut open = self.cuts.lock();
        let position = open
            .cuts
            .iter()
            .position(|c| c.id == self.id)
            .expect("a cut stays open while its reader lives");
        let cut = &mut open.cuts[position];
        let from = match &cut.passed {
            Some(p) => Bound::Excluded(p.as_slice()),
            None => Bound::Unbounded,
        };
        let mut found = Vec::with_capacity(limit);
        for item in self
            .tree
            .range::<&[u8], _>((from, Bound::Unbounded))
            .take(limit)
        {
            let (k, v) = item?;
            found.push((k.to_vec(), v.to_vec()));
        }
        let last = (found.len() == limit).then(|| found[found.len() - 1].0.clone());
        let mut saved = Vec::new();
        while let Some(entry) = cut.preimages.first_entry() {
            if last.as_ref().is_some_and(|end| entry.key() > end) {
                break;
            }
            saved.push(entry.remove_entry());
        }
        let chunk = merge(found, saved);
        match last {
            Some(end) => cut.passed = Some(end),
            None => {
                open.cuts.remove(position);
                self.done = true;
            }
        }
        Ok(Some(chunk))
    }
}

impl Drop for CutReader {
    fn drop(&mut self) {
        if !self.done {
            self.cuts.lock().cuts.retain(|c| c.id != self.id);
        }
    }
}

/// Merges the tree's entries with pre-images of the same key range; a pre-image wins, and a
/// pre-image of absence drops the key.
fn merge(found: Vec<KeyValue>, saved: Vec<(Vec<u8>, Option<Vec<u8>>)>) -> Vec<KeyValue> {
    let mut out = Vec::with_capacity(found.len() + saved.len());
    let mut found = found.into_iter().peekable();
    let mut saved = saved.into_iter().peekable();
    loop {
        let order = match (found.peek(), saved.peek()) {
            (None, None) => return out,
            (Some(_), None) => Ordering::Less,
            (None, Some(_)) => Ordering::Greater,
            (Some((fk, _)), Some((sk, _))) => fk.cmp(sk),
        };
        if order == Ordering::Less {
            out.extend(found.next());
            continue;
        }
        if order == Ordering::Equal {
            found.next();
        }
        if let Some((k, Some(v))) = saved.next() {
            out.push((k, v));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> (tempfile::TempDir, sled::Tree) {
        let dir = tempfile::tempdir().expect("dir");
        let db = sled::Config::new()
            .path(dir.path().join("db"))
            .open()
            .expect("sled");
        let tree = db.open_tree("state").expect("tree");
        (dir, tree)
    }

    fn key(i: u32) -> Vec<u8> {
        format!("k{i:04}").into_bytes()
    }

    /// Writes like apply does: announce, then write.
    fn write(cuts: &Cuts, tree: &sled::Tree, key: &[u8], value: Option<&[u8]>) {
        cuts.before_write(tree, [key]).expect("pre-image");
        match value {
            Some(v) => tree.insert(key, v).map(|_| ()),
            None => tree.remove(key).map(|_| ()),
        }
        .expect("write");
    }

    fn dump(tree: &sled::Tree) -> Vec<KeyValue> {
        tree.iter()
            .map(|item| item.map(|(k, v)| (k.to_vec(), v.to_vec())))
            .collect::<Result<_, _>>()
            .expect("dump")
    }

    fn read_all(reader: &mut CutReader, limit: usize) -> Vec<KeyValue> {
        let mut all = Vec::new();
        while let Some(chunk) = reader.next_chunk(limit).expect("chunk") {
            all.extend(chunk);
        }
        all
    }

    #[test]
    fn a_cut_reads_the_state_as_it_was_although_writes_land_ahead_of_and_behind_the_reader() {
        let (_dir, tree) = tree();
        let cuts = Cuts::default();
        for i in 0..100 {
            tree.insert(key(i * 2), format!("v{i}").as_bytes())
                .expect("seed");
        }
        let before = dump(&tree);
        let mut reader = cuts.begin(&tree);
        let mut read = reader.next_chunk(10).expect("chunk").expect("first chunk");
        // Behind the reader (k0000..k0018), at its edge, ahead of it, and new keys either side.
        write(&cuts, &tree, &key(4), Some(b"changed behind"));
        write(&cuts, &tree, &key(18), None);
        write(&cuts, &tree, &key(20), Some(b"changed ahead"));
        write(&cuts, &tree, &key(20), Some(b"changed twice"));
        write(&cuts, &tree, &key(22), None);
        write(&cuts, &tree, &key(21), Some(b"new ahead"));
        write(&cuts, &tree, &key(3), Some(b"new behind"));
        write(&cuts, &tree, &key(500), Some(b"new at the end"));
        write(&cuts, &tree, &key(500), None);
        write(&cuts, &tree, &key(198), None);
        read.extend(reader.next_chunk(7).expect("chunk").expect("second chunk"));
        write(&cuts, &tree, &key(100), Some(b"changed later"));
        write(&cuts, &tree, &key(150), None);
        read.extend(read_all(&mut reader, 7));
        assert_eq!(read, before);
        assert!(reader.next_chunk(7).expect("after the end").is_none());
        // The cut is closed: writes no longer save anything.
        assert!(cuts.lock().cuts.is_empty());
    }

    #[test]
    fn two_cuts_each_see_their_own_moment_and_a_dropped_reader_closes_its_cut() {
        let (_dir, tree) = tree();
        let cuts = Cuts::default();
        for i in 0..30 {
            tree.insert(key(i), b"a").expect("seed");
        }
        let first_state = dump(&tree);
        let mut first = cuts.begin(&tree);
        write(&cuts, &tree, &key(5), Some(b"b"));
        write(&cuts, &tree, &key(40), Some(b"b"));
        let second_state = dump(&tree);
        let mut second = cuts.begin(&tree);
        let abandoned = cuts.begin(&tree);
        drop(abandoned);
        write(&cuts, &tree, &key(5), None);
        write(&cuts, &tree, &key(40), Some(b"c"));
        write(&cuts, &tree, &key(0), Some(b"c"));
        assert_eq!(read_all(&mut second, 4), second_state);
        assert_eq!(read_all(&mut first, 1000), first_state);
        assert!(cuts.lock().cuts.is_empty());
    }

    #[test]
    fn a_cut_of_an_empty_tree_is_empty_even_when_keys_arrive_before_it_is_read() {
        let (_dir, tree) = tree();
        let cuts = Cuts::default();
        let mut reader = cuts.begin(&tree);
        write(&cuts, &tree, b"x", Some(b"1"));
        assert!(read_all(&mut reader, 10).is_empty());
    }
}
