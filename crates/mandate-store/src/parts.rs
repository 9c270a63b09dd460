//! The state's keyspaces. Each key lives in exactly one, chosen by its prefix:
//!
//! - `trail`: the audit records (`audit/<index><seq>`). They are written once, in key order,
//!   and are most of the bytes the state takes in. On their own, a flushed table never overlaps
//!   the older ones, so compaction moves tables down instead of rewriting them.
//! - `expiring`: the expiry indexes and the assertion replay cache. Every entry is deleted
//!   within minutes of its writing, and the leader scans the indexes for due entries; on their
//!   own, their tombstones are compacted away without rewriting the long-lived records, and
//!   those scans do not walk past other records' tables.
//! - `state`: everything else, and the storage-owned `\0` keys.
//!
//! One fjall database holds the three, so a write batch across them is atomic and a database
//! snapshot sees all three at one instant. Readers never see the split: a range that may reach
//! more than one keyspace reads them all and merges the results in key order.

use std::iter::Peekable;
use std::sync::LazyLock;

use mandate_core::keys;
use mandate_core::state::prefix_end;

/// Name of the keyspace of everything not routed elsewhere (and of the one keyspace of
/// earlier releases).
pub(crate) const STATE: &str = "state";
/// Name of the audit records' keyspace.
pub(crate) const TRAIL: &str = "trail";
/// Name of the expiry indexes' and replay cache's keyspace.
pub(crate) const EXPIRING: &str = "expiring";

/// The key prefixes routed to each keyspace other than `state`, in the order of [`Parts::all`].
const ROUTED: [(&str, &[&[u8]]); 2] = [
    (TRAIL, &[keys::AUDIT_PREFIX]),
    (
        EXPIRING,
        &[
            keys::APPROVAL_EXPIRY_PREFIX,
            keys::GRANT_EXPIRY_PREFIX,
            keys::JTI_PREFIX,
            keys::JTI_EXPIRY_PREFIX,
        ],
    ),
];

/// Each routed prefix with the least key above all keys that start with it, and the position
/// in [`Parts::all`] of its keyspace; computed once, for the range checks of every scan.
static ROUTES: LazyLock<Vec<Route>> = LazyLock::new(|| {
    ROUTED
        .iter()
        .enumerate()
        .flat_map(|(part, (_, prefixes))| {
            prefixes.iter().map(move |&prefix| Route {
                part,
                prefix,
                end: prefix_end(prefix).expect("a routed prefix is not empty"),
            })
        })
        .collect()
});

struct Route {
    part: usize,
    prefix: &'static [u8],
    end: Vec<u8>,
}

impl Route {
    /// Whether some key starting with this prefix may lie in `start <= key < end`.
    fn meets(&self, start: &[u8], end: Option<&[u8]>) -> bool {
        start < self.end.as_slice() && end.is_none_or(|end| end > self.prefix)
    }

    /// Whether every key in `start <= key < end` starts with this prefix.
    fn holds(&self, start: &[u8], end: Option<&[u8]>) -> bool {
        end.is_some_and(|end| start >= self.prefix && end <= self.end.as_slice())
    }
}

/// How many keyspaces the state spans.
pub(crate) const COUNT: usize = 3;

/// The keyspaces of one state database.
#[derive(Clone)]
pub(crate) struct Parts {
    /// Indexed as [`ROUTED`], then `state` last.
    keyspaces: [fjall::Keyspace; COUNT],
}

/// The position in [`Parts::all`] of the keyspace that holds `key`.
pub(crate) fn index_of(key: &[u8]) -> usize {
    ROUTED
        .iter()
        .position(|(_, prefixes)| prefixes.iter().any(|p| key.starts_with(p)))
        .unwrap_or(COUNT - 1)
}

/// The positions in [`Parts::all`] of the keyspaces that may hold keys in `start <= key < end`;
/// none when the range is empty.
pub(crate) fn indexes_for(start: &[u8], end: Option<&[u8]>) -> Vec<usize> {
    if end.is_some_and(|end| end <= start) {
        return Vec::new();
    }
    let mut found = Vec::with_capacity(COUNT);
    let mut only_routed = false;
    for route in ROUTES.iter() {
        if route.meets(start, end) && found.last() != Some(&route.part) {
            found.push(route.part);
        }
        only_routed |= route.holds(start, end);
    }
    if !only_routed {
        found.push(COUNT - 1);
    }
    found
}

impl Parts {
    /// Opens (or creates) the keyspaces of `db`, each with memtables of `memtable_bytes`.
    pub(crate) fn open(db: &fjall::Database, memtable_bytes: u64) -> fjall::Result<Self> {
        let open = |name: &str| {
            db.keyspace(name, || {
                fjall::KeyspaceCreateOptions::default().max_memtable_size(memtable_bytes)
            })
        };
        Ok(Parts {
            keyspaces: [open(TRAIL)?, open(EXPIRING)?, open(STATE)?],
        })
    }

    /// The keyspace that holds `key`.
    pub(crate) fn of(&self, key: &[u8]) -> &fjall::Keyspace {
        &self.keyspaces[index_of(key)]
    }

    /// The keyspace of everything not routed elsewhere, storage-owned keys included.
    pub(crate) fn state(&self) -> &fjall::Keyspace {
        &self.keyspaces[COUNT - 1]
    }

    /// Every keyspace: the routed ones, then `state`.
    pub(crate) fn all(&self) -> &[fjall::Keyspace; COUNT] {
        &self.keyspaces
    }

    /// The keyspaces that may hold keys in `start <= key < end`.
    pub(crate) fn for_range(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
    ) -> impl Iterator<Item = &fjall::Keyspace> {
        indexes_for(start, end)
            .into_iter()
            .map(|i| &self.keyspaces[i])
    }

    /// Moves the keys that the `state` keyspace holds but another should (earlier releases kept
    /// every key there), `chunk` keys per atomic batch; returns how many moved. With nothing to
    /// move it reads one empty range per routed prefix.
    pub(crate) fn settle(&self, db: &fjall::Database, chunk: usize) -> fjall::Result<usize> {
        let mut moved = 0;
        for prefix in ROUTED.iter().flat_map(|(_, prefixes)| prefixes.iter()) {
            let mut batch = db.batch();
            let mut in_batch = 0;
            for guard in self.state().prefix(prefix) {
                let (key, value) = guard.into_inner()?;
                batch.insert(self.of(&key), key.clone(), value);
                batch.remove(self.state(), key);
                in_batch += 1;
                if in_batch == chunk {
                    std::mem::replace(&mut batch, db.batch()).commit()?;
                    moved += in_batch;
                    in_batch = 0;
                }
            }
            batch.commit()?;
            moved += in_batch;
        }
        Ok(moved)
    }
}

/// Several iterators of disjoint keys, each in key order, read as one in key order. An error
/// ends nothing: it is passed on when its iterator comes up.
pub(crate) struct Merged<I: Iterator> {
    sources: Vec<Peekable<I>>,
}

/// Merges `sources`, whose keys are disjoint and each in key order.
pub(crate) fn merged<I, K, V, E>(sources: impl IntoIterator<Item = I>) -> Merged<I>
where
    I: Iterator<Item = Result<(K, V), E>>,
    K: AsRef<[u8]>,
{
    Merged {
        sources: sources.into_iter().map(Iterator::peekable).collect(),
    }
}

impl<I, K, V, E> Iterator for Merged<I>
where
    I: Iterator<Item = Result<(K, V), E>>,
    K: AsRef<[u8]>,
{
    type Item = Result<(K, V), E>;

    fn next(&mut self) -> Option<Self::Item> {
        let mut least: Option<(usize, &[u8])> = None;
        for (i, source) in self.sources.iter_mut().enumerate() {
            match source.peek() {
                Some(Err(_)) => {
                    least = Some((i, &[]));
                    break;
                }
                Some(Ok((key, _))) if least.is_none_or(|(_, k)| key.as_ref() < k) => {
                    least = Some((i, key.as_ref()));
                }
                _ => {}
            }
        }
        let (i, _) = least?;
        self.sources[i].next()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mandate_core::state::KeyValue;
    use mandate_core::StorageFault;

    #[test]
    fn each_key_is_routed_by_its_prefix() {
        assert_eq!(index_of(&keys::audit(7, 0)), 0);
        assert_eq!(index_of(&keys::grant_expiry(5, "g1")), 1);
        assert_eq!(index_of(&keys::approval_expiry(5, "a1")), 1);
        assert_eq!(index_of(&keys::jti("agent", "j")), 1);
        assert_eq!(index_of(&keys::jti_expiry(5, "agent", "j")), 1);
        assert_eq!(index_of(&keys::grant("g1")), COUNT - 1);
        assert_eq!(index_of(keys::AUDIT_HEAD), COUNT - 1);
        assert_eq!(index_of(b"\x00applied"), COUNT - 1);
    }

    #[test]
    fn a_range_inside_one_routed_prefix_reads_only_its_keyspace() {
        let end = prefix_end(keys::GRANT_EXPIRY_PREFIX).expect("end");
        assert_eq!(indexes_for(keys::GRANT_EXPIRY_PREFIX, Some(&end)), vec![1]);
        let due = keys::timed_start(keys::JTI_EXPIRY_PREFIX, 1_000);
        let until = keys::timed_start(keys::JTI_EXPIRY_PREFIX, 2_000);
        assert_eq!(indexes_for(&due, Some(&until)), vec![1]);
        let audit_end = prefix_end(keys::AUDIT_PREFIX).expect("end");
        assert_eq!(indexes_for(&keys::audit(3, 0), Some(&audit_end)), vec![0]);
    }

    #[test]
    fn a_range_that_may_span_keyspaces_reads_every_one_it_may_reach() {
        // `grant` covers `grant/…` (state) and `grant-expiry/…` (expiring).
        assert_eq!(indexes_for(b"grant", Some(b"grant0")), vec![1, COUNT - 1]);
        assert_eq!(indexes_for(b"", None), vec![0, 1, COUNT - 1]);
        // Past every routed prefix, only `state` is left.
        assert_eq!(indexes_for(b"zzz", None), vec![COUNT - 1]);
        // `grant/` sorts after `grant-expiry/`, and holds no routed key.
        let end = prefix_end(keys::GRANT_PREFIX).expect("end");
        assert_eq!(indexes_for(keys::GRANT_PREFIX, Some(&end)), vec![COUNT - 1]);
    }

    fn entries(keys: &[&str]) -> Vec<Result<KeyValue, StorageFault>> {
        keys.iter()
            .map(|k| Ok((k.as_bytes().to_vec(), Vec::new())))
            .collect()
    }

    #[test]
    fn merged_sources_come_out_in_key_order_with_errors_passed_on() {
        let mut second = entries(&["b", "e"]);
        second.insert(1, Err(StorageFault("bad block".into())));
        let out: Vec<_> = merged([
            entries(&["a", "d", "f"]).into_iter(),
            second.into_iter(),
            entries(&["c"]).into_iter(),
        ])
        .map(|r| r.map(|(k, _)| String::from_utf8(k).expect("utf-8")))
        .collect();
        let keys: Vec<_> = out
            .iter()
            .filter_map(|r| r.as_ref().ok().cloned())
            .collect();
        assert_eq!(keys, ["a", "b", "c", "d", "e", "f"]);
        assert_eq!(out.iter().filter(|r| r.is_err()).count(), 1);
    }
}
