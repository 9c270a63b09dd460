//! The store against openraft's storage contract, and Mandate's own snapshot guarantees.

use mandate_proto::v1 as pb;
use mandate_store::{Batch, LogStore, StateMachine, TypeConfig};
use openraft::storage::{RaftLogReader, RaftLogStorage, RaftLogStorageExt, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, RaftSnapshotBuilder, StorageError};
use tempfile::TempDir;

struct StoreBuilderOnDisk;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for StoreBuilderOnDisk {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError<u64>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let (log, sm) = mandate_store::open(dir.path()).expect("open store");
        Ok((dir, log, sm))
    }
}

#[test]
fn the_store_passes_the_openraft_storage_suite() {
    Suite::test_all(StoreBuilderOnDisk).expect("openraft storage suite");
}

fn entry(index: u64, commands: Vec<pb::Command>) -> Entry<TypeConfig> {
    Entry {
        log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
        payload: EntryPayload::Normal(Batch::new(&pb::CommandBatch { commands })),
    }
}

fn bootstrap() -> pb::Command {
    pb::Command {
        request_id: "boot".into(),
        time_ms: 10,
        operator_token_id: String::new(),
        kind: Some(pb::command::Kind::BootstrapCluster(pb::BootstrapCluster {
            cluster_id: "c".into(),
            root_token_id: "tok_root".into(),
            root_secret_sha256: vec![1; 32],
            signing_key: None,
            apply_version: mandate_core::version::APPLY_VERSION_MAX,
        })),
        ..Default::default()
    }
}

fn register(i: u64) -> pb::Command {
    pb::Command {
        request_id: format!("r{i}"),
        time_ms: 10 + i,
        operator_token_id: "tok_root".into(),
        kind: Some(pb::command::Kind::RegisterAgent(pb::RegisterAgent {
            agent_id: format!("agt_{i:032x}"),
            name: format!("bot-{i}"),
            owner: "alice".into(),
            ..Default::default()
        })),
        ..Default::default()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().expect("tokio runtime")
}

/// A fresh store's state machine, with what must outlive it.
fn store() -> ((LogStore, TempDir), StateMachine) {
    let dir = tempfile::tempdir().expect("dir");
    let (log, sm) = mandate_store::open(dir.path()).expect("open store");
    ((log, dir), sm)
}

#[test]
fn a_snapshot_installed_elsewhere_plus_the_log_tail_rebuilds_the_same_state() {
    runtime().block_on(async {
        let (_a, mut sm_a) = store();
        let (_b, mut sm_b) = store();
        // B starts with stale keys that the snapshot must clear.
        sm_b.apply(vec![entry(1, vec![bootstrap(), register(99)])])
            .await
            .expect("apply b");

        sm_a.apply(vec![
            entry(1, vec![bootstrap()]),
            entry(2, vec![register(1), register(2)]),
        ])
        .await
        .expect("apply a");
        let snapshot = sm_a
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .expect("build");
        sm_b.install_snapshot(&snapshot.meta, snapshot.snapshot)
            .await
            .expect("install");
        let tail = vec![entry(3, vec![register(3)])];
        sm_a.apply(tail.clone()).await.expect("tail a");
        sm_b.apply(tail).await.expect("tail b");

        let dump_a = sm_a.view().dump().expect("dump a");
        assert_eq!(dump_a, sm_b.view().dump().expect("dump b"));
        assert!(!dump_a
            .iter()
            .any(|(k, _)| k == &mandate_core::keys::agent(&format!("agt_{:032x}", 99))));
        assert_eq!(sm_b.view().applied_index(), 3);
    });
}

#[test]
fn a_snapshot_sent_in_chunks_through_its_file_installs_and_becomes_the_receivers_snapshot() {
    use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
    runtime().block_on(async {
        let (_a, mut sm_a) = store();
        let (b_dir, mut sm_b) = store();
        sm_a.apply(vec![
            entry(1, vec![bootstrap()]),
            entry(2, (1..=200).map(register).collect()),
        ])
        .await
        .expect("apply a");
        let mut sent = sm_a
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .expect("build");
        // As openraft's sender and receiver do: seek to each chunk's offset, read, write.
        let end = sent
            .snapshot
            .seek(std::io::SeekFrom::End(0))
            .await
            .expect("end");
        let mut received = sm_b.begin_receiving_snapshot().await.expect("begin");
        let mut offset = 0;
        while offset < end {
            sent.snapshot
                .seek(std::io::SeekFrom::Start(offset))
                .await
                .expect("seek");
            let mut chunk = Vec::with_capacity(1000);
            (&mut sent.snapshot)
                .take(1000)
                .read_to_end(&mut chunk)
                .await
                .expect("read a chunk");
            received
                .seek(std::io::SeekFrom::Start(offset))
                .await
                .expect("seek");
            received.write_all(&chunk).await.expect("write a chunk");
            offset += chunk.len() as u64;
        }
        assert!(
            end > 200 * 50,
            "a body of {end} bytes is too small for 200 agents"
        );
        received.shutdown().await.expect("shutdown");
        sm_b.install_snapshot(&sent.meta, received)
            .await
            .expect("install");
        assert_eq!(
            sm_a.view().dump().expect("dump a"),
            sm_b.view().dump().expect("dump b")
        );
        let current = sm_b
            .get_current_snapshot()
            .await
            .expect("read")
            .expect("the received snapshot is kept");
        assert_eq!(current.meta, sent.meta);
        let kept: Vec<_> = std::fs::read_dir(b_dir.1.path().join("snapshots"))
            .expect("list")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(
            kept,
            ["current.snapshot"],
            "no unfinished file stays behind"
        );
    });
}

/// A's state at index 2: the cluster and 200 agents.
/// Bootstraps `sm` and registers agents 98 and 99, which a snapshot of
/// [`two_hundred_agents`] lacks.
async fn stale_agents(sm: &mut StateMachine) {
    sm.apply(vec![entry(
        1,
        vec![bootstrap(), register(98), register(99)],
    )])
    .await
    .expect("apply the stale agents");
}

async fn two_hundred_agents(sm: &mut StateMachine) -> openraft::storage::Snapshot<TypeConfig> {
    sm.apply(vec![
        entry(1, vec![bootstrap()]),
        entry(2, (1..=200).map(register).collect()),
    ])
    .await
    .expect("apply a");
    sm.get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .expect("build")
}

#[test]
fn an_installed_snapshot_replaces_the_whole_state_for_readers_and_after_a_reopen() {
    let rt = runtime();
    let (_a, mut sm_a) = store();
    let ((log_b, dir_b), mut sm_b) = store();
    let snapshot = rt.block_on(async {
        // B holds keys the snapshot lacks (agents 98 and 99) and one it holds (agent 1).
        stale_agents(&mut sm_b).await;
        sm_b.apply(vec![entry(2, vec![register(1)])])
            .await
            .expect("apply b");
        two_hundred_agents(&mut sm_a).await
    });
    let reader = sm_b.view();
    rt.block_on(sm_b.install_snapshot(&snapshot.meta, snapshot.snapshot))
        .expect("install");
    let state_a = sm_a.view().dump().expect("dump a");
    assert_eq!(reader.dump().expect("dump b"), state_a);
    assert_eq!(reader.applied_index(), 2);
    drop((reader, sm_b, log_b));

    let (_log_b, mut sm_b) = mandate_store::open(dir_b.path()).expect("reopen");
    assert_eq!(sm_b.view().dump().expect("dump b"), state_a);
    rt.block_on(async {
        let (applied, membership) = sm_b.applied_state().await.expect("applied");
        assert_eq!(applied, snapshot.meta.last_log_id);
        assert_eq!(membership, snapshot.meta.last_membership);
        let tail = vec![entry(3, vec![register(201)])];
        sm_a.apply(tail.clone()).await.expect("tail a");
        sm_b.apply(tail).await.expect("tail b");
    });
    assert_eq!(
        sm_b.view().dump().expect("dump b"),
        sm_a.view().dump().expect("dump a")
    );
}

#[test]
fn a_damaged_snapshot_is_refused_and_leaves_the_state_as_it_was() {
    use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
    runtime().block_on(async {
        let (_a, mut sm_a) = store();
        let (_b, mut sm_b) = store();
        sm_b.apply(vec![entry(1, vec![bootstrap(), register(99)])])
            .await
            .expect("apply b");
        let before = sm_b.view().dump().expect("dump b");
        let mut sent = two_hundred_agents(&mut sm_a).await;
        let mut body = Vec::new();
        sent.snapshot
            .seek(std::io::SeekFrom::Start(0))
            .await
            .expect("seek");
        sent.snapshot.read_to_end(&mut body).await.expect("read");
        let mut received = sm_b.begin_receiving_snapshot().await.expect("begin");
        received
            .write_all(&body[..body.len() - 1])
            .await
            .expect("write");
        received.shutdown().await.expect("shutdown");
        let err = sm_b
            .install_snapshot(&sent.meta, received)
            .await
            .expect_err("a truncated body installs");
        assert!(err.to_string().contains("truncated"), "{err}");
        assert_eq!(sm_b.view().dump().expect("dump b"), before);
        assert_eq!(sm_b.view().applied_index(), 1);
        assert!(sm_b.get_current_snapshot().await.expect("read").is_none());
    });
}

#[test]
fn a_reopened_store_keeps_its_log_vote_state_and_snapshot() {
    let dir = tempfile::tempdir().expect("dir");
    let before = runtime().block_on(async {
        let (mut log, mut sm) = mandate_store::open(dir.path()).expect("open");
        log.save_vote(&openraft::Vote::new(3, 1))
            .await
            .expect("vote");
        log.blocking_append(vec![
            entry(1, vec![bootstrap()]),
            entry(2, vec![register(1)]),
        ])
        .await
        .expect("append");
        sm.apply(vec![
            entry(1, vec![bootstrap()]),
            entry(2, vec![register(1)]),
        ])
        .await
        .expect("apply");
        sm.get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .expect("snapshot");
        sm.view().dump().expect("dump")
    });
    runtime().block_on(async {
        let (mut log, mut sm) = mandate_store::open(dir.path()).expect("reopen");
        assert_eq!(
            log.read_vote().await.expect("vote"),
            Some(openraft::Vote::new(3, 1))
        );
        let state = log.get_log_state().await.expect("log state");
        assert_eq!(state.last_log_id.map(|l| l.index), Some(2));
        let (applied, _) = sm.applied_state().await.expect("applied");
        assert_eq!(applied.map(|l| l.index), Some(2));
        assert_eq!(sm.view().dump().expect("dump"), before);
        let snapshot = sm
            .get_current_snapshot()
            .await
            .expect("read")
            .expect("a snapshot");
        assert_eq!(snapshot.meta.last_log_id.map(|l| l.index), Some(2));
    });
}

#[test]
fn a_snapshot_holds_the_state_at_its_cut_though_entries_apply_while_it_is_built() {
    runtime().block_on(async {
        let (_a, mut sm_a) = store();
        let (_b, mut sm_b) = store();
        sm_a.apply(vec![
            entry(1, vec![bootstrap()]),
            entry(2, (1..=50).map(register).collect()),
        ])
        .await
        .expect("apply a");
        let at_cut = sm_a.view().dump().expect("dump at the cut");
        let mut builder = sm_a.get_snapshot_builder().await;
        sm_a.apply(vec![entry(3, (51..=60).map(register).collect())])
            .await
            .expect("apply while the snapshot is built");
        let snapshot = builder.build_snapshot().await.expect("build");
        assert_eq!(snapshot.meta.last_log_id.map(|l| l.index), Some(2));
        sm_b.install_snapshot(&snapshot.meta, snapshot.snapshot)
            .await
            .expect("install");
        assert_eq!(sm_b.view().dump().expect("dump b"), at_cut);
        assert_eq!(sm_a.view().applied_index(), 3);
    });
}

#[test]
fn purged_entries_stay_unread_and_a_reopened_log_keeps_only_what_was_kept() {
    let dir = tempfile::tempdir().expect("dir");
    let indexes = |entries: Vec<Entry<TypeConfig>>| -> Vec<u64> {
        entries.iter().map(|e| e.log_id.index).collect()
    };
    runtime().block_on(async {
        let (mut log, _sm) = mandate_store::open(dir.path()).expect("open");
        let entries: Vec<_> = (1..=10).map(|i| entry(i, vec![register(i)])).collect();
        log.blocking_append(entries).await.expect("append");
        log.purge(LogId::new(CommittedLeaderId::new(1, 1), 6))
            .await
            .expect("purge");
        let kept = log.try_get_log_entries(0..).await.expect("read");
        assert_eq!(indexes(kept), vec![7, 8, 9, 10]);
    });
    runtime().block_on(async {
        let (mut log, _sm) = mandate_store::open(dir.path()).expect("reopen");
        let kept = log.try_get_log_entries(0..).await.expect("read");
        assert_eq!(indexes(kept), vec![7, 8, 9, 10]);
        let state = log.get_log_state().await.expect("log state");
        assert_eq!(state.last_purged_log_id.map(|l| l.index), Some(6));
        assert_eq!(state.last_log_id.map(|l| l.index), Some(10));
    });
}

#[test]
fn a_committed_id_ahead_of_the_durable_log_is_not_trusted_after_a_restart() {
    let dir = tempfile::tempdir().expect("dir");
    let id = |index| LogId::new(CommittedLeaderId::new(1, 1), index);
    runtime().block_on(async {
        let (mut log, _sm) = mandate_store::open(dir.path()).expect("open");
        let entries: Vec<_> = (1..=3).map(|i| entry(i, vec![register(i)])).collect();
        log.blocking_append(entries).await.expect("append");
        log.save_committed(Some(id(3))).await.expect("committed");
        assert_eq!(log.read_committed().await.expect("read"), Some(id(3)));
        // As if the committed id reached the disk and entry 3 did not.
        log.truncate(id(3)).await.expect("truncate");
    });
    runtime().block_on(async {
        let (mut log, _sm) = mandate_store::open(dir.path()).expect("reopen");
        assert_eq!(log.read_committed().await.expect("read"), None);
        log.save_committed(Some(id(2))).await.expect("committed");
        assert_eq!(log.read_committed().await.expect("read"), Some(id(2)));
    });
}

#[test]
fn a_data_directory_whose_log_is_a_sled_database_opens_with_its_log_moved() {
    let dir = tempfile::tempdir().expect("dir");
    let id = |index| LogId::new(CommittedLeaderId::new(2, 1), index);
    let vote = openraft::Vote::new_committed(2, 1);
    // The layout of earlier releases: the log and its metadata in a sled database under `db`.
    {
        let db = sled::Config::new()
            .path(dir.path().join("db"))
            .segment_size(mandate_store::durability::SEGMENT_BYTES)
            .open()
            .expect("old layout");
        let log = db.open_tree("raft-log").expect("log tree");
        for i in 3..=8 {
            let mut e = entry(i, vec![register(i)]);
            e.log_id = id(i);
            log.insert(i.to_be_bytes(), bincode::serialize(&e).expect("encode"))
                .expect("insert");
        }
        let meta = db.open_tree("raft-meta").expect("meta tree");
        let put = |key: &str, bytes: Vec<u8>| {
            meta.insert(key, bytes).expect("insert");
        };
        put("vote", bincode::serialize(&vote).expect("encode"));
        put("last-purged", bincode::serialize(&id(4)).expect("encode"));
        put(
            "committed",
            bincode::serialize(&Some(id(7))).expect("encode"),
        );
        db.flush().expect("flush");
    }
    runtime().block_on(async {
        let (mut log, _sm) = mandate_store::open(dir.path()).expect("open the old layout");
        let kept = log.try_get_log_entries(0..).await.expect("read");
        assert_eq!(
            kept.iter().map(|e| e.log_id).collect::<Vec<_>>(),
            (5..=8).map(id).collect::<Vec<_>>()
        );
        assert_eq!(log.read_vote().await.expect("vote"), Some(vote));
        assert_eq!(log.read_committed().await.expect("committed"), Some(id(7)));
        let state = log.get_log_state().await.expect("log state");
        assert_eq!(state.last_purged_log_id, Some(id(4)));
        assert_eq!(state.last_log_id, Some(id(8)));
    });
    assert!(
        !dir.path().join("db").exists(),
        "the old database is removed"
    );
}

/// The whole state (storage keys included) after a bootstrap and twenty registrations.
fn state_of_twenty_agents() -> Vec<(Vec<u8>, Vec<u8>)> {
    runtime().block_on(async {
        let (_a, mut sm) = store();
        sm.apply(vec![
            entry(1, vec![bootstrap()]),
            entry(2, (1..=20).map(register).collect()),
        ])
        .await
        .expect("apply");
        sm.view().dump().expect("dump")
    })
}

/// Writes `state` into the `state` tree of a sled database at `path`, as earlier releases did.
fn write_sled_state(path: &std::path::Path, state: &[(Vec<u8>, Vec<u8>)]) {
    let db = sled::Config::new()
        .path(path)
        .segment_size(mandate_store::durability::SEGMENT_BYTES)
        .open()
        .expect("old layout");
    let tree = db.open_tree("state").expect("old state tree");
    for (key, value) in state {
        tree.insert(key.as_slice(), value.as_slice())
            .expect("insert");
    }
    db.flush().expect("flush");
}

/// Opens `dir` and checks that it holds exactly `state`, applied to index 2.
fn assert_opens_with(dir: &std::path::Path, state: &[(Vec<u8>, Vec<u8>)]) {
    runtime().block_on(async {
        let (_log, mut sm) = mandate_store::open(dir).expect("open");
        assert_eq!(sm.view().dump().expect("dump"), state);
        let (applied, _) = sm.applied_state().await.expect("applied");
        assert_eq!(applied.map(|l| l.index), Some(2));
    });
}

#[test]
fn a_data_directory_from_before_the_state_had_its_own_database_opens_with_its_state_moved() {
    let old = tempfile::tempdir().expect("dir");
    let before = state_of_twenty_agents();
    // The old layout: the state tree beside the log, in the one database under `db`.
    write_sled_state(&old.path().join("db"), &before);
    assert_opens_with(old.path(), &before);
    assert!(
        !old.path().join("db").exists(),
        "the old database, state tree and all, is removed once moved"
    );
}

#[test]
fn a_data_directory_whose_state_is_a_sled_database_opens_with_its_state_moved() {
    let old = tempfile::tempdir().expect("dir");
    let before = state_of_twenty_agents();
    // The previous layout: the state in a sled database of its own under `state`.
    write_sled_state(&old.path().join("state"), &before);
    assert_opens_with(old.path(), &before);
    assert!(
        !old.path().join("state.sled").exists() && !old.path().join("state/db").exists(),
        "the sled database is removed once its state is moved"
    );
    // Opened again, the moved state is simply there.
    assert_opens_with(old.path(), &before);
}

#[test]
fn a_range_scan_of_the_view_reads_from_its_start_up_to_its_end_and_no_further() {
    use mandate_core::keys;
    use mandate_core::state::{prefix_end, StateRead};
    runtime().block_on(async {
        let (_a, mut sm) = store();
        sm.apply(vec![entry(
            1,
            vec![
                bootstrap(),
                register(1),
                register(2),
                register(3),
                register(4),
            ],
        )])
        .await
        .expect("apply");
        let view = sm.view();
        let agent = |i: u64| keys::agent(&format!("agt_{i:032x}"));
        let ids = |found: Vec<(Vec<u8>, Vec<u8>)>| -> Vec<Vec<u8>> {
            found.into_iter().map(|(k, _)| k).collect()
        };

        let middle = view
            .scan_range_first(&agent(2), Some(&agent(4)), 10)
            .expect("scan");
        assert_eq!(ids(middle), vec![agent(2), agent(3)]);

        let limited = view.scan_range_first(&agent(2), None, 1).expect("scan");
        assert_eq!(ids(limited), vec![agent(2)]);

        let past_agents = prefix_end(keys::AGENT_PREFIX);
        let to_the_last_agent = view
            .scan_range_first(&agent(3), past_agents.as_deref(), 10)
            .expect("scan");
        assert_eq!(ids(to_the_last_agent), vec![agent(3), agent(4)]);

        let reversed = view
            .scan_range_first(&agent(4), Some(&agent(2)), 10)
            .expect("scan");
        assert!(
            reversed.is_empty(),
            "an end at or before the start holds nothing"
        );
    });
}

/// Writes `state` into the one `state` keyspace of a fjall database at `path`, as releases
/// before the state was split into keyspaces did.
fn write_one_keyspace_state(path: &std::path::Path, state: &[(Vec<u8>, Vec<u8>)]) {
    let db = fjall::Database::builder(path).open().expect("old store");
    let keyspace = db
        .keyspace("state", fjall::KeyspaceCreateOptions::default)
        .expect("old keyspace");
    for (key, value) in state {
        keyspace
            .insert(key.as_slice(), value.as_slice())
            .expect("insert");
    }
    db.persist(fjall::PersistMode::SyncAll).expect("persist");
}

/// How many keys starting with `prefix` the keyspace `name` of the store at `path` holds.
fn keys_in(path: &std::path::Path, name: &str, prefix: &[u8]) -> usize {
    let db = fjall::Database::builder(path).open().expect("store");
    let keyspace = db
        .keyspace(name, fjall::KeyspaceCreateOptions::default)
        .expect("keyspace");
    keyspace.prefix(prefix).count()
}

#[test]
fn a_state_kept_in_one_keyspace_opens_with_each_key_moved_to_its_own() {
    use mandate_core::keys;
    let old = tempfile::tempdir().expect("dir");
    let mut before = state_of_twenty_agents();
    // A replay-cache entry and its expiry, as an authorization leaves them.
    before.push((keys::jti("agt_1", "j1"), 5_000u64.to_be_bytes().to_vec()));
    before.push((keys::jti_expiry(5_000, "agt_1", "j1"), Vec::new()));
    before.sort();
    let records = before
        .iter()
        .filter(|(k, _)| k.starts_with(keys::AUDIT_PREFIX))
        .count();
    assert!(records > 0, "the state holds audit records");
    let state_dir = old.path().join("state");
    write_one_keyspace_state(&state_dir, &before);

    assert_opens_with(old.path(), &before);
    assert_eq!(keys_in(&state_dir, "state", keys::AUDIT_PREFIX), 0);
    assert_eq!(keys_in(&state_dir, "state", keys::JTI_PREFIX), 0);
    assert_eq!(keys_in(&state_dir, "state", keys::JTI_EXPIRY_PREFIX), 0);
    assert_eq!(keys_in(&state_dir, "trail", keys::AUDIT_PREFIX), records);
    assert_eq!(keys_in(&state_dir, "expiring", keys::JTI_PREFIX), 1);
    assert_eq!(keys_in(&state_dir, "expiring", keys::JTI_EXPIRY_PREFIX), 1);
    // Opened again, nothing is left to move and the state is the same.
    assert_opens_with(old.path(), &before);
}

#[test]
fn a_snapshot_install_cut_short_is_finished_when_the_store_opens_again() {
    let rt = runtime();
    let ((_log_a, dir_a), mut sm_a) = store();
    let ((log_b, dir_b), mut sm_b) = store();
    let snapshot = rt.block_on(async {
        stale_agents(&mut sm_b).await;
        two_hundred_agents(&mut sm_a).await
    });
    let state_a = sm_a.view().dump().expect("dump a");
    drop((sm_b, log_b));
    // B stopped part way through installing A's snapshot: the body was set aside and the
    // install marked, and the keyspaces had not all taken it.
    let set_aside = dir_b.path().join("snapshots/installing.snapshot");
    std::fs::copy(dir_a.path().join("snapshots/current.snapshot"), &set_aside)
        .expect("set the body aside");
    {
        let db = fjall::Database::builder(dir_b.path().join("state"))
            .open()
            .expect("b's store");
        let state = db
            .keyspace("state", fjall::KeyspaceCreateOptions::default)
            .expect("state keyspace");
        state.insert(b"\x00installing", b"").expect("mark");
        db.persist(fjall::PersistMode::SyncAll).expect("persist");
    }

    let (_log_b, mut sm_b) = mandate_store::open(dir_b.path()).expect("reopen");
    assert_eq!(sm_b.view().dump().expect("dump b"), state_a);
    assert!(
        !set_aside.exists(),
        "the set-aside body became the snapshot"
    );
    rt.block_on(async {
        let (applied, _) = sm_b.applied_state().await.expect("applied");
        assert_eq!(applied, snapshot.meta.last_log_id);
        let current = sm_b
            .get_current_snapshot()
            .await
            .expect("read")
            .expect("a current snapshot");
        assert_eq!(current.meta.snapshot_id, snapshot.meta.snapshot_id);
    });
}
