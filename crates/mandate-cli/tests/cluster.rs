//! Multi-process cluster tests: every node is its own `mandate server` process.

mod common;

use std::time::{Duration, Instant};

use common::{wait_for, DevCluster};
use serde_json::Value;

fn register(c: &DevCluster, addr: &str, name: &str) -> String {
    let v = c.json(
        addr,
        &["agent", "register", "--name", name, "--owner", "alice"],
    );
    v["id"].as_str().expect("id").to_owned()
}

fn member(status: &Value, id: u64) -> &Value {
    status["members"]
        .as_array()
        .expect("members")
        .iter()
        .find(|m| m["id"] == id)
        .expect("member listed")
}

#[test]
fn registrations_survive_leader_loss_and_a_restarted_node_catches_up() {
    let mut c = DevCluster::start(3, 21000);
    let leader = c.leader();
    let follower = (1..=3).find(|n| *n != leader).expect("a follower");

    // Register on a follower; read it back linearizably on every node.
    let mut acknowledged = Vec::new();
    for i in 0..10 {
        let name = format!("before-{i}");
        let id = register(&c, &c.addr(follower), &name);
        acknowledged.push((name, id));
    }
    for node in 1..=3 {
        for (name, id) in &acknowledged {
            let got = c.json(&c.addr(node), &["agent", "get", name]);
            assert_eq!(got["id"], id.as_str(), "node {node} disagrees on {name}");
        }
    }

    // SIGKILL the leader; the survivors elect a new one that serves writes within 5 s.
    c.kill_node(leader);
    let survivors: Vec<String> = (1..=3)
        .filter(|n| *n != leader)
        .map(|n| c.addr(n))
        .collect();
    let survivors = survivors.join(",");
    let killed_at = Instant::now();
    let new_leader = wait_for("a new leader", Duration::from_secs(5), || {
        let s = c.status(&survivors)?;
        s["leader"].as_u64().filter(|l| *l != 0 && *l != leader)
    });
    let id = register(&c, &survivors, "after-failover");
    assert!(
        killed_at.elapsed() < Duration::from_secs(5),
        "the new leader {new_leader} took {:?} to serve a write",
        killed_at.elapsed()
    );
    acknowledged.push(("after-failover".into(), id));

    // Every acknowledged registration is still there.
    for (name, id) in &acknowledged {
        let got = c.json(&survivors, &["agent", "get", name]);
        assert_eq!(got["id"], id.as_str());
    }

    // The killed node restarts from its data and catches up with what it missed.
    c.restart_node(leader);
    let leader_addr = c.addr(leader);
    wait_for(
        "the restarted node to catch up",
        Duration::from_secs(20),
        || c.try_json(&leader_addr, &["agent", "get", "after-failover", "--stale"]),
    );
    let listed = c.json(
        &leader_addr,
        &["agent", "list", "--stale", "--owner", "alice"],
    );
    assert_eq!(
        listed["agents"].as_array().expect("agents").len(),
        acknowledged.len()
    );
}

#[test]
fn a_learner_added_after_a_snapshot_receives_it_and_converges() {
    // Snapshot every 20 entries and keep no log behind a snapshot, so a new node can only be
    // brought up to date by a snapshot.
    let env = [
        ("MANDATE_SNAPSHOT_LOGS_SINCE_LAST", "20"),
        ("MANDATE_LOGS_KEPT_AFTER_SNAPSHOT", "0"),
    ];
    let mut c = DevCluster::start_with_env(3, 21200, &env);
    let all = c.addrs.join(",");
    for i in 0..60 {
        register(&c, &all, &format!("agent-{i}"));
    }
    let saved = c.dir.path().join("saved.snapshot");
    c.json(
        &all,
        &[
            "cluster",
            "snapshot",
            "save",
            saved.to_str().expect("utf-8"),
        ],
    );

    let learner_dir = c.dir.path().join("node-4");
    let (client, peer) = ("127.0.0.1:21203".to_owned(), "127.0.0.1:21303".to_owned());
    c.spawn_server(
        &[
            "--node-id",
            "4",
            "--client-addr",
            &client,
            "--peer-addr",
            &peer,
            "--data-dir",
            learner_dir.to_str().expect("utf-8"),
        ],
        // Default snapshot policy: the learner never builds a snapshot of its own here, so a
        // snapshot file on it can only have come from the leader.
        &[],
    );
    wait_for("node 4 to listen", Duration::from_secs(10), || {
        std::net::TcpStream::connect(&client).ok()
    });
    c.json(
        &all,
        &[
            "cluster",
            "add-learner",
            "--id",
            "4",
            "--peer-addr",
            &peer,
            "--client-addr",
            &client,
        ],
    );

    let leader = c.leader();
    wait_for("the learner to converge", Duration::from_secs(30), || {
        let s = c.status(&all)?;
        let applied = member(&s, leader)["applied_index"].as_u64()?;
        (member(&s, 4)["applied_index"].as_u64()? >= applied).then_some(())
    });
    assert!(
        learner_dir.join("snapshots/current.snapshot").exists(),
        "the learner was brought up to date without a snapshot"
    );
    let s = c.status(&all).expect("status");
    assert!(
        member(&s, leader)["purged_index"].as_u64() > Some(0),
        "the leader purged no log: {s}"
    );
    let newest = u64::from(mandate_core::version::APPLY_VERSION_MAX);
    assert_eq!(s["apply_version"].as_u64(), Some(newest), "{s}");
    for id in [1, 2, 3, 4] {
        assert_eq!(
            member(&s, id)["apply_version_max"].as_u64(),
            Some(newest),
            "{s}"
        );
    }
    assert!(
        member(&s, 4)["snapshot_index"].as_u64() > Some(0),
        "the status shows no snapshot on the learner: {s}"
    );
    let got = c.json(&client, &["agent", "get", "agent-0", "--stale"]);
    assert_eq!(got["name"], "agent-0");
    let listed = c.json(
        &client,
        &["agent", "list", "--stale", "--page-size", "1000"],
    );
    assert_eq!(listed["agents"].as_array().expect("agents").len(), 60);

    // The snapshot carried the audit trail: the learner holds the same records and they verify.
    let trail = |addr: &str, to: &str| {
        let out = c.mandate_at(addr, &["audit", "tail", "--json", "--to", to]);
        assert!(out.status.success(), "{}", common::stderr(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let info = c.json(&c.addr(leader), &["audit", "info"]);
    let head = info["head"].as_str().expect("head").to_owned();
    let leaders = trail(&c.addr(leader), &head);
    assert!(leaders.lines().count() > 60, "{leaders}");
    assert!(
        leaders.contains(r#""target":"voters=1,2,3 learners=4""#),
        "the learner's arrival is in the trail"
    );
    assert_eq!(trail(&client, &head), leaders);
    let verified = c.json(&client, &["audit", "verify", "--to", &head]);
    assert_eq!(
        verified["verified"].as_u64(),
        Some(leaders.lines().count() as u64)
    );

    let membership = c.json(&all, &["cluster", "promote", "4"]);
    assert!(membership["voters"]
        .as_array()
        .expect("voters")
        .iter()
        .any(|m| m["id"] == 4));
}

#[test]
fn dev_restarted_on_the_same_directory_keeps_its_data_and_token() {
    let mut c = DevCluster::start(1, 21400);
    let first_token = c.token.clone();
    let id = register(&c, &c.addr(1), "persistent");
    c.stop();
    c.restart_dev();
    assert_eq!(
        c.token, first_token,
        "a second bootstrap issued a new root token"
    );
    let got = c.json(&c.addr(1), &["agent", "get", "persistent"]);
    assert_eq!(got["id"], id.as_str());
    let env = std::fs::read_to_string(c.dir.path().join("env")).expect("DIR/env");
    assert!(env.contains(&format!("MANDATE_TOKEN={first_token}")));
    assert!(c.dir.path().join("node-1.pid").exists());
}

#[test]
fn a_saved_snapshot_restores_into_a_new_single_node_cluster() {
    let mut c = DevCluster::start(1, 21600);
    let id = register(&c, &c.addr(1), "backed-up");
    let file = c.dir.path().join("backup.snapshot");
    c.json(
        &c.addr(1),
        &["cluster", "snapshot", "save", file.to_str().expect("utf-8")],
    );

    let restored = c.dir.path().join("restored");
    let (client, peer) = ("127.0.0.1:21650".to_owned(), "127.0.0.1:21750".to_owned());
    let out = c.json(
        &c.addr(1),
        &[
            "cluster",
            "snapshot",
            "restore",
            file.to_str().expect("utf-8"),
            "--data-dir",
            restored.to_str().expect("utf-8"),
            "--node-id",
            "7",
            "--peer-addr",
            &peer,
            "--client-addr",
            &client,
        ],
    );
    assert!(out["restored_index"].as_u64().expect("index") >= 2);
    c.spawn_server(
        &[
            "--node-id",
            "7",
            "--client-addr",
            &client,
            "--peer-addr",
            &peer,
            "--data-dir",
            restored.to_str().expect("utf-8"),
        ],
        &[],
    );
    // The restored cluster keeps the operator tokens and registry of the original.
    let got = wait_for(
        "the restored node to serve",
        Duration::from_secs(20),
        || c.try_json(&client, &["agent", "get", "backed-up"]),
    );
    assert_eq!(got["id"], id.as_str());
    let after = c.json(
        &client,
        &[
            "agent",
            "register",
            "--name",
            "after-restore",
            "--owner",
            "bob",
        ],
    );
    assert_eq!(after["status"], "active");
}

#[test]
fn a_node_started_with_join_becomes_a_learner_and_can_be_removed() {
    let mut c = DevCluster::start(3, 21800);
    let all = c.addrs.join(",");
    register(&c, &all, "seen-by-joiner");
    let dir = c.dir.path().join("joiner");
    let (client, peer) = ("127.0.0.1:21803".to_owned(), "127.0.0.1:21903".to_owned());
    let token = c.token.clone();
    c.spawn_server(
        &[
            "--node-id",
            "5",
            "--client-addr",
            &client,
            "--peer-addr",
            &peer,
            "--data-dir",
            dir.to_str().expect("utf-8"),
            "--join",
            &c.addr(2),
        ],
        &[("MANDATE_JOIN_TOKEN", &token)],
    );
    let status = wait_for(
        "node 5 to join as a learner",
        Duration::from_secs(20),
        || {
            let s = c.status(&all)?;
            let joined = s["members"]
                .as_array()?
                .iter()
                .any(|m| m["id"] == 5 && m["voter"] == false);
            joined.then_some(s)
        },
    );
    assert_eq!(member(&status, 5)["client_addr"], client.as_str());
    wait_for("node 5 to replicate", Duration::from_secs(20), || {
        c.try_json(&client, &["agent", "get", "seen-by-joiner", "--stale"])
    });

    let membership = c.json(&all, &["cluster", "remove", "5"]);
    assert!(!membership["learners"]
        .as_array()
        .expect("learners")
        .iter()
        .any(|m| m["id"] == 5));
    let s = c.status(&all).expect("status");
    assert!(!s["members"]
        .as_array()
        .expect("members")
        .iter()
        .any(|m| m["id"] == 5));
}

#[test]
fn a_node_whose_state_asks_for_a_newer_apply_version_than_its_binary_refuses_to_start() {
    use mandate_core::pb;
    use prost::Message;

    let mut c = DevCluster::start(1, 27400);
    c.stop();
    // As if the cluster had been raised past this binary's newest version by a newer release.
    let too_new = mandate_core::version::APPLY_VERSION_MAX + 1;
    let db = fjall::Database::builder(c.dir.path().join("node-1/state"))
        .open()
        .expect("open the node's state database");
    let state = db
        .keyspace("state", fjall::KeyspaceCreateOptions::default)
        .expect("state keyspace");
    let stored = state
        .get(mandate_core::keys::CLUSTER)
        .expect("read")
        .expect("the cluster record is stored");
    let mut cluster = pb::ClusterInfo::decode(stored.as_ref()).expect("decode");
    cluster.apply_version = too_new;
    state
        .insert(mandate_core::keys::CLUSTER, cluster.encode_to_vec())
        .expect("write");
    db.persist(fjall::PersistMode::SyncAll).expect("persist");
    drop(state);
    drop(db);

    let config = c.dir.path().join("node-1/config.toml");
    let out = std::process::Command::new(common::MANDATE)
        .args(["server", "--config", config.to_str().expect("utf-8")])
        .output()
        .expect("run the node");
    assert!(!out.status.success(), "the node started");
    let err = common::stderr(&out);
    assert!(
        err.contains(&format!("apply version {too_new}"))
            && err.contains("upgrade this node's binary"),
        "{err}"
    );
}
