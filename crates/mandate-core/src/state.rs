//! Reading and writing the materialized state: a sorted key/value space. The storage layer
//! provides [`StateRead`] over its state store; [`Overlay`] collects one batch's writes on top of
//! it so later commands of the batch see earlier ones, and so the whole batch is written
//! atomically.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;

use prost::Message;

use crate::error::StorageFault;
use crate::{keys, pb};

/// One key and its value.
pub type KeyValue = (Vec<u8>, Vec<u8>);

/// Read access to the materialized state.
pub trait StateRead {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageFault>;
    /// Every entry whose key starts with `prefix`, in key order.
    fn scan_prefix(&self, prefix: &[u8]) -> Result<Vec<KeyValue>, StorageFault> {
        self.scan_prefix_first(prefix, usize::MAX)
    }
    /// The first `limit` entries whose key starts with `prefix`, in key order.
    fn scan_prefix_first(
        &self,
        prefix: &[u8],
        limit: usize,
    ) -> Result<Vec<KeyValue>, StorageFault> {
        self.scan_range_first(prefix, prefix_end(prefix).as_deref(), limit)
    }
    /// The first `limit` entries with `start <= key < end` (no upper bound when `end` is
    /// `None`), in key order. A scan that starts past deleted keys does not read them again: in
    /// an LSM tree their tombstones stay until compaction drops them.
    fn scan_range_first(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StorageFault>;
}

/// The least key above every key that starts with `prefix`; `None` when there is none (the
/// prefix is empty or all `0xff`).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// The `(start, end)` bounds of a range as `BTreeMap::range` takes them.
fn bounds(start: &[u8], end: Option<&[u8]>) -> (Bound<Vec<u8>>, Bound<Vec<u8>>) {
    (
        Bound::Included(start.to_vec()),
        end.map_or(Bound::Unbounded, |e| Bound::Excluded(e.to_vec())),
    )
}

/// Pending writes (`None` = delete) layered over a base state. The base does not change while
/// an overlay is over it, so what a key read from the base is kept: commands of one batch read
/// the same records (the cluster, its signing key, an agent, its delegations) again and again.
pub struct Overlay<'a, S: StateRead + ?Sized> {
    base: &'a S,
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    read: RefCell<HashMap<Vec<u8>, Option<Vec<u8>>>>,
}

impl<'a, S: StateRead + ?Sized> Overlay<'a, S> {
    pub fn new(base: &'a S) -> Self {
        Overlay {
            base,
            writes: BTreeMap::new(),
            read: RefCell::default(),
        }
    }
    pub fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.writes.insert(key, Some(value));
    }
    pub fn delete(&mut self, key: Vec<u8>) {
        self.writes.insert(key, None);
    }
    pub fn put_message(&mut self, key: Vec<u8>, message: &impl Message) {
        self.put(key, message.encode_to_vec());
    }
    /// The writes, in key order, to be applied as one atomic batch.
    pub fn into_writes(self) -> BTreeMap<Vec<u8>, Option<Vec<u8>>> {
        self.writes
    }
}

impl<S: StateRead + ?Sized> StateRead for Overlay<'_, S> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageFault> {
        if let Some(value) = self.writes.get(key) {
            return Ok(value.clone());
        }
        if let Some(value) = self.read.borrow().get(key) {
            return Ok(value.clone());
        }
        let value = self.base.get(key)?;
        self.read.borrow_mut().insert(key.to_vec(), value.clone());
        Ok(value)
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
        let pending: Vec<(&Vec<u8>, &Option<Vec<u8>>)> =
            self.writes.range(bounds(start, end)).collect();
        // Each pending delete can hide one base entry, so read that many more from the base.
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = self
            .base
            .scan_range_first(start, end, limit.saturating_add(pending.len()))?
            .into_iter()
            .collect();
        for (key, value) in pending {
            match value {
                Some(v) => merged.insert(key.clone(), v.clone()),
                None => merged.remove(key),
            };
        }
        Ok(merged.into_iter().take(limit).collect())
    }
}

impl StateRead for BTreeMap<Vec<u8>, Vec<u8>> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageFault> {
        Ok(BTreeMap::get(self, key).cloned())
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
        Ok(self
            .range(bounds(start, end))
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
}

/// Decodes a stored record; a record that does not decode is corruption, never a user error.
pub fn decode<M: Message + Default>(key: &[u8], bytes: &[u8]) -> Result<M, StorageFault> {
    M::decode(bytes).map_err(|e| {
        StorageFault(format!(
            "record at key {:?} does not decode: {e}",
            String::from_utf8_lossy(key)
        ))
    })
}

fn get_message<M: Message + Default>(
    state: &(impl StateRead + ?Sized),
    key: &[u8],
) -> Result<Option<M>, StorageFault> {
    state.get(key)?.map(|bytes| decode(key, &bytes)).transpose()
}

/// Typed getters over any [`StateRead`].
pub trait StateExt: StateRead {
    fn agent(&self, id: &str) -> Result<Option<pb::Agent>, StorageFault> {
        get_message(self, &keys::agent(id))
    }
    fn agent_id_by_name(&self, name: &str) -> Result<Option<String>, StorageFault> {
        let key = keys::agent_name(name);
        self.get(&key)?
            .map(|bytes| {
                String::from_utf8(bytes).map_err(|_| {
                    StorageFault(format!("agent name index for {name:?} is not UTF-8"))
                })
            })
            .transpose()
    }
    fn operator_token(&self, id: &str) -> Result<Option<pb::OperatorToken>, StorageFault> {
        get_message(self, &keys::token(id))
    }
    fn cluster(&self) -> Result<Option<pb::ClusterInfo>, StorageFault> {
        get_message(self, keys::CLUSTER)
    }
    fn clock_ms(&self) -> Result<u64, StorageFault> {
        match self.get(keys::CLOCK)? {
            None => Ok(0),
            Some(bytes) => {
                let raw: [u8; 8] = bytes
                    .as_slice()
                    .try_into()
                    .map_err(|_| StorageFault("clock record is not 8 bytes".into()))?;
                Ok(u64::from_be_bytes(raw))
            }
        }
    }
}

impl<T: StateRead + ?Sized> StateExt for T {}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;

    /// A base that counts its reads.
    struct Counting {
        entries: BTreeMap<Vec<u8>, Vec<u8>>,
        gets: Cell<usize>,
    }

    impl StateRead for Counting {
        fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageFault> {
            self.gets.set(self.gets.get() + 1);
            Ok(self.entries.get(key).cloned())
        }

        fn scan_range_first(
            &self,
            start: &[u8],
            end: Option<&[u8]>,
            limit: usize,
        ) -> Result<Vec<KeyValue>, StorageFault> {
            self.entries.scan_range_first(start, end, limit)
        }
    }

    #[test]
    fn an_overlay_reads_each_base_key_once_and_its_own_writes_win_over_what_it_read() {
        let base = Counting {
            entries: BTreeMap::from([
                (b"a".to_vec(), b"1".to_vec()),
                (b"b".to_vec(), b"2".to_vec()),
            ]),
            gets: Cell::new(0),
        };
        let mut overlay = Overlay::new(&base);
        for _ in 0..3 {
            assert_eq!(overlay.get(b"a").expect("get"), Some(b"1".to_vec()));
            assert_eq!(overlay.get(b"missing").expect("get"), None);
        }
        assert_eq!(
            base.gets.get(),
            2,
            "one base read per key, present or absent"
        );

        assert_eq!(overlay.get(b"b").expect("get"), Some(b"2".to_vec()));
        overlay.put(b"a".to_vec(), b"3".to_vec());
        overlay.delete(b"b".to_vec());
        overlay.put(b"missing".to_vec(), b"4".to_vec());
        assert_eq!(overlay.get(b"a").expect("get"), Some(b"3".to_vec()));
        assert_eq!(overlay.get(b"b").expect("get"), None);
        assert_eq!(overlay.get(b"missing").expect("get"), Some(b"4".to_vec()));
        assert_eq!(
            overlay.scan_prefix(b"").expect("scan"),
            vec![
                (b"a".to_vec(), b"3".to_vec()),
                (b"missing".to_vec(), b"4".to_vec())
            ]
        );
    }
}
