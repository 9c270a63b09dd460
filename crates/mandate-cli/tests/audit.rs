//! The audit trail: one attributed record per command, identical on every node, hash-chained
//! so that an edit to stored history is found at its position.

mod common;

use common::{as_refs, refused, DevCluster, World};
use mandate_client::pb;
use prost::Message;
use serde_json::Value;
use std::process::Command;

/// Every record on the node at `addr`, as the JSON lines `audit tail --json` prints.
fn trail(c: &DevCluster, addr: &str) -> Vec<String> {
    let out = c.mandate_at(addr, &["audit", "tail", "--from", "0", "--json"]);
    assert!(out.status.success(), "{}", common::stderr(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

fn parsed(lines: &[String]) -> Vec<Value> {
    lines
        .iter()
        .map(|l| serde_json::from_str(l).expect("one JSON record per line"))
        .collect()
}

fn of_type<'a>(records: &'a [Value], kind: &str) -> Vec<&'a Value> {
    records.iter().filter(|r| r["type"] == kind).collect()
}

#[test]
fn every_command_leaves_one_attributed_record_and_every_node_holds_the_same_verified_trail() {
    let c = DevCluster::start(3, 25200);
    let world = World::create(&c, "audited");
    let all = c.addrs.join(",");
    let delegation = world.delegate(&c, &["read"], &["secret/team-a/*"], &[]);
    let authorize = |resource: &str| {
        world.authorize(
            &c,
            &delegation,
            "read",
            resource,
            &["--context", "ticket=INC-4242"],
        )
    };
    let allowed = authorize("secret/team-a/db");
    assert_eq!(allowed["decision"], "allow", "{allowed}");
    let denied = authorize("secret/team-b/db");
    assert_eq!(denied["decision"], "deny", "{denied}");
    c.json(
        &all,
        &[
            "grant",
            "consume",
            allowed["token"].as_str().expect("token"),
        ],
    );
    let again = c.mandate(&[
        "grant",
        "consume",
        allowed["token"].as_str().expect("token"),
    ]);
    assert!(
        !again.status.success(),
        "a single-use grant was consumed twice"
    );
    refused(
        &c,
        &[
            "delegate",
            "create",
            "--user-token",
            &world.alice,
            "--agent",
            &world.agent_id,
            "--action",
            "read",
            "--resource",
            "secret/team-b/*",
        ],
        "PermissionDenied",
        "not permitted",
    );

    let leader_trail = trail(&c, &c.addrs[0]);
    let records = parsed(&leader_trail);
    let register = of_type(&records, "register_agent");
    assert_eq!(register.len(), 1, "{register:?}");
    assert_eq!(register[0]["actor_kind"], "operator");
    assert_eq!(register[0]["target"], world.agent_id.as_str());
    assert_eq!(of_type(&records, "put_policy").len(), 1);

    let delegations = of_type(&records, "create_delegation");
    assert_eq!(delegations.len(), 2, "one applied, one refused");
    assert_eq!(
        (
            &delegations[0]["actor_kind"],
            &delegations[0]["user"],
            &delegations[0]["agent"],
            &delegations[0]["target"],
            &delegations[0]["result"]
        ),
        (
            &Value::from("user"),
            &Value::from("alice"),
            &Value::from(world.agent_id.as_str()),
            &Value::from(delegation.as_str()),
            &Value::from("ok")
        )
    );
    assert_eq!(delegations[1]["result"], "permission_denied");
    assert!(
        delegations[1]["error"]
            .as_str()
            .is_some_and(|e| e.contains("not permitted")),
        "{}",
        delegations[1]
    );

    let decisions = of_type(&records, "authorize");
    assert_eq!(decisions.len(), 2);
    for (record, decision, resource) in [
        (decisions[0], "allow", "secret/team-a/db"),
        (decisions[1], "deny", "secret/team-b/db"),
    ] {
        assert_eq!(record["decision"], decision);
        assert_eq!(record["actor_kind"], "agent");
        assert_eq!(record["actor"], world.agent_id.as_str());
        assert_eq!(record["user"], "alice");
        assert_eq!(record["chain"], serde_json::json!([world.agent_id]));
        assert_eq!(record["delegation_id"], delegation.as_str());
        assert_eq!(record["resource"], resource);
        assert!(!record["reasons"].as_array().expect("reasons").is_empty());
    }
    assert_eq!(decisions[0]["grant_id"], allowed["grant_id"]);
    assert_eq!(decisions[0]["policy_ids"].as_array().map(Vec::len), Some(2));

    let consumed = of_type(&records, "consume_grant");
    assert_eq!(consumed.len(), 2, "one consumed, one refused");
    for record in &consumed {
        assert_eq!(record["grant_id"], allowed["grant_id"]);
        assert_eq!(record["user"], "alice");
        assert_eq!(record["agent"], world.agent_id.as_str());
    }
    assert_eq!(
        (&consumed[0]["result"], &consumed[1]["result"]),
        (&Value::from("ok"), &Value::from("failed_precondition"))
    );

    // Token ids and contexts appear only as their audit HMACs, which `audit hash` computes.
    let token_id = c
        .token
        .strip_prefix("mdt_")
        .and_then(|t| t.split_once('.'))
        .map(|(id, _)| id.to_owned())
        .expect("token id");
    let hashed = c.json(&all, &["audit", "hash", &token_id]);
    assert_eq!(register[0]["actor"], hashed["hmac"]);
    assert!(
        !leader_trail.iter().any(|l| l.contains(&token_id)),
        "a token id entered the trail"
    );
    let context = c.json(&all, &["audit", "hash", "--context", "ticket=INC-4242"]);
    assert_eq!(decisions[0]["context_digest"], context["hmac"]);
    assert!(!leader_trail.iter().any(|l| l.contains("INC-4242")));

    // Every node holds the same trail, byte for byte, and it verifies everywhere.
    for addr in &c.addrs[1..] {
        assert_eq!(trail(&c, addr), leader_trail, "{addr}");
    }
    for addr in &c.addrs {
        let verified = c.json(addr, &["audit", "verify"]);
        assert_eq!(
            verified["verified"].as_u64(),
            Some(records.len() as u64),
            "{addr}"
        );
    }

    // An export holds exactly the trail.
    let file = c.dir.path().join("trail.jsonl");
    let exported = c.json(
        &all,
        &["audit", "export", "--out", file.to_str().expect("utf-8")],
    );
    assert_eq!(exported["verified"].as_u64(), Some(records.len() as u64));
    let text = std::fs::read_to_string(&file).expect("export file");
    assert_eq!(text.lines().collect::<Vec<_>>(), leader_trail);

    // Filters select by type, agent and decision.
    let out = c.mandate(&[
        "audit",
        "tail",
        "--json",
        "--type",
        "authorize",
        "--decision",
        "deny",
        "--agent",
        &world.agent_id,
    ]);
    let filtered: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    assert_eq!(filtered.len(), 1);
    assert_eq!(filtered[0]["position"], decisions[1]["position"]);
}

#[test]
fn an_edit_to_a_stored_record_is_found_by_verify_at_its_position() {
    let mut c = DevCluster::start(1, 25400);
    let _world = World::create(&c, "tampered");
    let records = parsed(&trail(&c, &c.addrs[0]));
    let victim = records
        .iter()
        .find(|r| r["type"] == "register_agent")
        .expect("a registration record");
    let position = victim["position"].as_str().expect("position").to_owned();
    let (index, sequence) = position.split_once('.').expect("INDEX.SEQ");
    let key = mandate_core::keys::audit(
        index.parse().expect("index"),
        sequence.parse().expect("sequence"),
    );
    c.stop();

    let db = fjall::Database::builder(c.dir.path().join("node-1/state"))
        .open()
        .expect("open the node's state database");
    // Audit records live in the state database's `trail` keyspace.
    let tree = db
        .keyspace("trail", fjall::KeyspaceCreateOptions::default)
        .expect("trail keyspace");
    let stored = tree.get(&key).expect("read").expect("the record is stored");
    let mut record = pb::AuditRecord::decode(stored.as_ref()).expect("decode");
    record.actor = "tok_someone_else".into();
    tree.insert(&key, record.encode_to_vec()).expect("write");
    db.persist(fjall::PersistMode::SyncAll).expect("persist");
    drop(tree);
    drop(db);

    c.restart_dev();
    let out = c.mandate(&["audit", "verify"]);
    assert!(!out.status.success(), "a tampered trail verified");
    let err = common::stderr(&out);
    assert!(
        err.contains(&format!("does not verify at {position}")),
        "{err}"
    );
    // The records before it still verify on their own.
    let (index, _) = position.split_once('.').expect("INDEX.SEQ");
    let before = index.parse::<u64>().expect("index") - 1;
    let out = c.mandate(&["audit", "verify", "--to", &before.to_string()]);
    assert!(out.status.success(), "{}", common::stderr(&out));
}

fn register(c: &DevCluster, addrs: &str, name: &str) {
    c.json(
        addrs,
        &["agent", "register", "--name", name, "--owner", "alice"],
    );
}

/// Reads records from `stream` into `received` until `registrations` register_agent records
/// have arrived in all.
async fn read_until(
    stream: &mut tonic::Streaming<pb::AuditRecord>,
    received: &mut Vec<pb::AuditRecord>,
    registrations: usize,
) {
    let count = |r: &[pb::AuditRecord]| r.iter().filter(|r| r.r#type == "register_agent").count();
    while count(received) < registrations {
        let next = tokio::time::timeout(std::time::Duration::from_secs(20), stream.message())
            .await
            .expect("a record within 20 s")
            .expect("the stream stays up")
            .expect("the stream does not end while following");
        received.push(next);
    }
}

async fn subscribe(
    ca_cert: &std::path::Path,
    addr: &str,
    token: &str,
    from: Option<pb::AuditPosition>,
) -> tonic::Streaming<pb::AuditRecord> {
    common::client_at(ca_cert, addr, token)
        .audit(|mut a| async move {
            a.subscribe(pb::SubscribeRequest {
                from,
                follow: true,
                ..Default::default()
            })
            .await
        })
        .await
        .expect("subscribe")
}

#[test]
fn a_subscriber_that_moves_to_another_node_after_leader_loss_misses_and_repeats_nothing() {
    let mut c = DevCluster::start(3, 25600);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let leader = c.leader();
    let followers: Vec<u64> = (1..=3).filter(|n| *n != leader).collect();
    let (first, second) = (c.addr(followers[0]), c.addr(followers[1]));
    let survivors = format!("{first},{second}");

    let mut received = Vec::new();
    let mut stream = rt.block_on(subscribe(&c.ca_cert, &first, &c.token, None));
    for i in 0..5 {
        register(&c, &c.addrs.join(","), &format!("before-{i}"));
    }
    rt.block_on(read_until(&mut stream, &mut received, 5));

    // The leader dies mid-stream; the follower's stream carries on with the new leader's writes.
    c.kill_node(leader);
    common::wait_for("a new leader", std::time::Duration::from_secs(10), || {
        let s = c.status(&survivors)?;
        s["leader"].as_u64().filter(|l| *l != 0 && *l != leader)
    });
    for i in 0..5 {
        register(&c, &survivors, &format!("during-{i}"));
    }
    rt.block_on(read_until(&mut stream, &mut received, 10));

    // The subscriber moves to the other survivor, resuming after the last position it saw.
    drop(stream);
    let last = received.last().expect("records");
    let resume = pb::AuditPosition {
        log_index: last.log_index,
        sequence: last.sequence + 1,
    };
    let mut stream = rt.block_on(subscribe(&c.ca_cert, &second, &c.token, Some(resume)));
    for i in 0..5 {
        register(&c, &survivors, &format!("after-{i}"));
    }
    rt.block_on(read_until(&mut stream, &mut received, 15));
    drop(stream);

    // What the subscriber saw is exactly the committed trail: no gap, no duplicate.
    let committed = parsed(&trail(&c, &second));
    let seen: Vec<String> = received
        .iter()
        .map(|r| format!("{}.{}", r.log_index, r.sequence))
        .collect();
    let expected: Vec<String> = committed
        .iter()
        .take(seen.len())
        .map(|r| r["position"].as_str().expect("position").to_owned())
        .collect();
    assert_eq!(seen, expected);
    assert_eq!(
        received.last().map(|r| hex::encode(&r.hash)),
        committed
            .get(seen.len() - 1)
            .and_then(|r| r["hash"].as_str().map(str::to_owned))
    );

    // The old leader comes back and catches up; all three trails are identical and verify.
    c.restart_node(leader);
    let reference = trail(&c, &second);
    common::wait_for(
        "the old leader to catch up",
        std::time::Duration::from_secs(20),
        || {
            let out = c.mandate_at(&c.addr(leader), &["audit", "tail", "--json"]);
            (out.status.success()
                && String::from_utf8_lossy(&out.stdout).lines().count() >= reference.len())
            .then_some(())
        },
    );
    let reference = trail(&c, &second);
    for node in 1..=3 {
        assert_eq!(trail(&c, &c.addr(node)), reference, "node {node}");
        let out = c.mandate_at(&c.addr(node), &["audit", "verify"]);
        assert!(
            out.status.success(),
            "node {node}: {}",
            common::stderr(&out)
        );
    }
}

#[test]
fn retention_drops_the_oldest_records_and_the_rest_still_verifies() {
    let c = DevCluster::start_with_env(1, 25800, &[("MANDATE_AUDIT_RETAIN_RECORDS", "8")]);
    for i in 0..20 {
        register(&c, &c.addrs[0], &format!("kept-or-not-{i}"));
    }
    let records = common::wait_for(
        "the trail to be compacted",
        std::time::Duration::from_secs(20),
        || {
            let records = parsed(&trail(&c, &c.addrs[0]));
            (records.len() <= 10).then_some(records)
        },
    );
    let compactions = of_type(&records, "compact_audit");
    assert!(!compactions.is_empty(), "{records:?}");
    assert_eq!(compactions[0]["actor_kind"], "system");
    assert_ne!(
        records[0]["type"], "bootstrap_cluster",
        "the oldest records were dropped"
    );

    let verified = c.json(&c.addrs[0], &["audit", "verify"]);
    assert_eq!(
        verified["verified"].as_u64(),
        Some(records.len() as u64),
        "{verified}"
    );
    let oldest = records[0]["position"].as_str().expect("position");
    assert_eq!(verified["from"], oldest);
    refused(
        &c,
        &["audit", "tail", "--from", "1"],
        "FailedPrecondition",
        &format!("the oldest retained record is {oldest}"),
    );
}

/// Every line the file sink wrote, oldest file first.
fn sink_lines(path: &std::path::Path) -> Vec<String> {
    let mut files: Vec<std::path::PathBuf> = (1..=10)
        .rev()
        .map(|n| std::path::PathBuf::from(format!("{}.{n}", path.display())))
        .filter(|p| p.exists())
        .collect();
    files.push(path.to_owned());
    files
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|text| text.lines().map(str::to_owned).collect::<Vec<_>>())
        .collect()
}

#[test]
fn a_file_sink_holds_the_trail_once_across_rotation_and_restart() {
    let out = tempfile::tempdir().expect("sink dir");
    let path = out.path().join("trail.jsonl");
    let mut c = DevCluster::start_with_env(
        1,
        26000,
        &[
            ("MANDATE_AUDIT_FILE", path.to_str().expect("utf-8")),
            ("MANDATE_AUDIT_FILE_MAX_BYTES", "4096"),
        ],
    );
    for i in 0..12 {
        register(&c, &c.addrs[0], &format!("sunk-{i}"));
    }
    let copied = |c: &DevCluster| {
        common::wait_for(
            "the sink to hold the trail",
            std::time::Duration::from_secs(20),
            || (sink_lines(&path) == trail(c, &c.addrs[0])).then_some(()),
        );
    };
    copied(&c);
    let rotated = std::path::PathBuf::from(format!("{}.1", path.display()));
    assert!(rotated.exists(), "the file was rotated at 4096 bytes");
    for file in [&path, &rotated] {
        let size = std::fs::metadata(file).expect("size").len();
        assert!(size <= 4096, "{} is {size} bytes", file.display());
    }

    // After a restart the sink resumes from its cursor: nothing is written twice.
    c.stop();
    c.restart_dev();
    for i in 0..3 {
        register(&c, &c.addrs[0], &format!("after-restart-{i}"));
    }
    copied(&c);
    let info = c.json(&c.addrs[0], &["audit", "info"]);
    assert_eq!(info["sinks"][0]["name"], "file");
    assert_eq!(info["sinks"][0]["error"], "");
}

#[test]
fn a_sink_that_cannot_write_reports_its_error_and_never_blocks_writes() {
    let c = DevCluster::start_with_env(
        1,
        26200,
        &[("MANDATE_AUDIT_FILE", "/nonexistent-mandate-dir/trail.jsonl")],
    );
    for i in 0..5 {
        register(&c, &c.addrs[0], &format!("unsunk-{i}"));
    }
    let info = common::wait_for(
        "the sink to report its failure",
        std::time::Duration::from_secs(10),
        || {
            let info = c.json(&c.addrs[0], &["audit", "info"]);
            (info["sinks"][0]["error"] != "").then_some(info)
        },
    );
    assert!(info["sinks"][0]["lag_entries"].as_u64() > Some(0), "{info}");
    assert_eq!(info["sinks"][0]["written"], 0);
}

#[test]
fn refused_authentications_are_recorded_and_a_flood_is_counted_not_lost() {
    let c = DevCluster::start(1, 26400);
    // Well formed, but no such token: refused after a lookup, and named by its id's HMAC.
    let bad_operator = format!("mdt_tok_0123456789abcdef.{}", "0".repeat(64));
    let bad_operator = bad_operator.as_str();
    for _ in 0..3 {
        let out = Command::new(env!("CARGO_BIN_EXE_mandate"))
            .args(["agent", "list"])
            .env("MANDATE_ADDR", &c.addrs[0])
            .env("MANDATE_CA_CERT", &c.ca_cert)
            .env("MANDATE_TOKEN", bad_operator)
            .output()
            .expect("run mandate");
        assert!(!out.status.success());
    }
    refused(
        &c,
        &[
            "delegate",
            "create",
            "--user-token",
            "not.a.jwt",
            "--agent",
            "agt_00000000000000000000000000000001",
            "--action",
            "read",
            "--resource",
            "secret/x",
        ],
        "Unauthenticated",
        "user token",
    );
    let hashed = c.json(&c.addrs[0], &["audit", "hash", "tok_0123456789abcdef"]);
    let records = common::wait_for(
        "the refusals to be recorded",
        std::time::Duration::from_secs(10),
        || {
            let records = parsed(&trail(&c, &c.addrs[0]));
            let refusals = of_type(&records, "authentication_refused").len();
            (refusals >= 4).then_some(records)
        },
    );
    let refusals = of_type(&records, "authentication_refused");
    let operators: Vec<_> = refusals
        .iter()
        .filter(|r| r["actor_kind"] == "operator")
        .collect();
    assert_eq!(operators.len(), 3, "{refusals:?}");
    assert!(operators.iter().all(|r| r["actor"] == hashed["hmac"]));
    assert!(operators.iter().all(|r| r["result"] == "unauthenticated"));
    assert_eq!(
        refusals
            .iter()
            .filter(|r| r["actor_kind"] == "user")
            .count(),
        1
    );

    // A flood beyond the queue is dropped from the trail, counted, and the count recorded.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let client = std::sync::Arc::new(common::client_at(&c.ca_cert, &c.addrs[0], bad_operator));
        let calls = (0..1500).map(|_| {
            let client = client.clone();
            async move {
                client
                    .registry(|mut r| async move { r.list(pb::ListAgentsRequest::default()).await })
                    .await
            }
        });
        let results = futures_join_all(calls).await;
        assert!(results.iter().all(Result::is_err));
    });
    let info = c.json(&c.addrs[0], &["audit", "info"]);
    assert!(info["refusals_dropped"].as_u64() > Some(0), "{info}");
    let (status, _, metrics) = common::http_get(&c.ca_cert, &c.addrs[0], "/metrics");
    assert_eq!(status, 200);
    assert!(
        metrics.contains(&format!(
            "mandate_audit_refusals_dropped_total {}",
            info["refusals_dropped"]
        )),
        "{metrics}"
    );
    common::wait_for(
        "the dropped count to be recorded",
        std::time::Duration::from_secs(10),
        || {
            let records = parsed(&trail(&c, &c.addrs[0]));
            let dropped: u64 = of_type(&records, "authentication_refusals_dropped")
                .iter()
                .filter_map(|r| r["target"].as_str()?.parse::<u64>().ok())
                .sum();
            (dropped >= info["refusals_dropped"].as_u64().unwrap_or(u64::MAX)).then_some(())
        },
    );
}

/// Runs the futures concurrently and collects their results in order.
async fn futures_join_all<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}

#[test]
fn the_leader_signs_checkpoints_that_verify_against_the_published_keys() {
    let c = DevCluster::start_with_env(1, 26600, &[("MANDATE_AUDIT_CHECKPOINT_INTERVAL_S", "1")]);
    for i in 0..3 {
        register(&c, &c.addrs[0], &format!("vouched-{i}"));
    }
    let records = common::wait_for(
        "a signed checkpoint",
        std::time::Duration::from_secs(15),
        || {
            let records = parsed(&trail(&c, &c.addrs[0]));
            (!of_type(&records, "audit_checkpoint").is_empty()).then_some(records)
        },
    );
    let checkpoint = of_type(&records, "audit_checkpoint")[0].clone();
    assert_eq!(checkpoint["actor_kind"], "system");
    assert_eq!(checkpoint["result"], "ok");
    let vouched = records
        .iter()
        .find(|r| r["position"] == checkpoint["target"])
        .expect("the record the checkpoint vouches for");
    let jws = checkpoint["checkpoint"].as_str().expect("jws");
    let claims: Value = serde_json::from_slice(
        &base64::Engine::decode(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD,
            jws.split('.').nth(1).expect("payload"),
        )
        .expect("base64"),
    )
    .expect("claims");
    assert_eq!(claims["hash"], vouched["hash"]);

    let verified = c.json(&c.addrs[0], &["audit", "verify"]);
    assert!(verified["checkpoints"].as_u64() >= Some(1), "{verified}");
}

/// Records written by housekeeping rather than by a caller's request.
const HOUSEKEEPING: [&str; 5] = [
    "audit_checkpoint",
    "compact_audit",
    "expire_grants",
    "authentication_refused",
    "authentication_refusals_dropped",
];

/// Follows the trail call by call: each call must leave exactly one record of its own.
struct Expect<'a> {
    c: &'a DevCluster,
    seen: usize,
}

impl Expect<'_> {
    /// Runs `args` (which must succeed) and returns its JSON and the one record it left, which
    /// must be of `kind` and by an actor of `actor_kind`.
    fn one(&mut self, args: &[&str], kind: &str, actor_kind: &str) -> (Value, Value) {
        let out = self.c.json(&self.c.addrs.join(","), args);
        let records = parsed(&trail(self.c, &self.c.addrs[0]));
        let new: Vec<&Value> = records[self.seen..]
            .iter()
            .filter(|r| !HOUSEKEEPING.contains(&r["type"].as_str().unwrap_or_default()))
            .collect();
        self.seen = records.len();
        assert_eq!(new.len(), 1, "{args:?} left {new:?}");
        assert_eq!(new[0]["type"], kind, "{args:?}: {}", new[0]);
        assert_eq!(new[0]["actor_kind"], actor_kind, "{args:?}: {}", new[0]);
        assert_eq!(new[0]["result"], "ok", "{args:?}: {}", new[0]);
        (out, new[0].clone())
    }
}

#[test]
fn every_call_that_changes_state_or_decides_leaves_exactly_one_attributed_record() {
    let c = DevCluster::start(1, 26800);
    let world = World::create(&c, "every");
    let key = c.dir.path().join("every.pem");
    let key = key.to_str().expect("utf-8");
    let agent = world.agent_id.as_str();
    let alice = world.alice.as_str();
    let mut expect = Expect {
        c: &c,
        seen: trail(&c, &c.addrs[0]).len(),
    };

    let (token, record) = expect.one(
        &["token", "create", "--name", "ops"],
        "create_operator_token",
        "operator",
    );
    let token_id = token["id"].as_str().expect("token id");
    let hashed = c.json(&c.addrs[0], &["audit", "hash", token_id]);
    assert_eq!(record["target"], hashed["hmac"]);
    expect.one(
        &["token", "revoke", token_id],
        "revoke_operator_token",
        "operator",
    );

    for (args, kind) in [
        (
            vec!["agent", "update", agent, "--description", "audited"],
            "update_agent",
        ),
        (vec!["agent", "suspend", agent], "set_agent_status"),
        (vec!["agent", "resume", agent], "set_agent_status"),
    ] {
        let (_, record) = expect.one(&args, kind, "operator");
        assert_eq!(record["target"], agent);
    }
    let second_key = c.dir.path().join("second.pem");
    let jwk = c.json(
        &c.addrs[0],
        &[
            "agent",
            "keygen",
            "--out",
            second_key.to_str().expect("utf-8"),
        ],
    );
    expect.one(
        &[
            "agent",
            "add-key",
            agent,
            "--public-key",
            second_key.to_str().expect("utf-8"),
        ],
        "add_agent_key",
        "operator",
    );
    expect.one(
        &[
            "agent",
            "remove-key",
            agent,
            jwk["kid"].as_str().expect("kid"),
        ],
        "remove_agent_key",
        "operator",
    );

    let extra = c.dir.path().join("extra.cedar");
    std::fs::write(
        &extra,
        "@id(\"nobody\")\nforbid(principal == User::\"mallory\", action, resource);\n",
    )
    .expect("policy file");
    expect.one(
        &["policy", "put", "extra", extra.to_str().expect("utf-8")],
        "put_policy",
        "operator",
    );
    expect.one(&["policy", "delete", "extra"], "delete_policy", "operator");
    expect.one(&["keys", "rotate"], "add_signing_key", "operator");
    expect.one(
        &["secret", "put", "secret/team-a/db", "v1"],
        "put_secret",
        "operator",
    );
    let (_, record) = expect.one(
        &[
            "secret",
            "put",
            "secret/team-a/db",
            "v2",
            "--user-token",
            alice,
        ],
        "put_secret",
        "user",
    );
    assert_eq!(record["actor"], "alice");

    let (delegation, record) = expect.one(
        &[
            "delegate",
            "create",
            "--user-token",
            alice,
            "--agent",
            agent,
            "--action",
            "read",
            "--action",
            "delete",
            "--resource",
            "secret/team-a/*",
            "--approval-for",
            "delete",
        ],
        "create_delegation",
        "user",
    );
    assert_eq!(
        (&record["user"], &record["agent"]),
        (&Value::from("alice"), &Value::from(agent))
    );
    let delegation = delegation["id"].as_str().expect("delegation id").to_owned();
    let authorize =
        |action: &str| world.authorize_args(&delegation, action, "secret/team-a/db", &[]);

    // Each ending of a grant: completed by the agent, revoked by an operator, consumed by a read.
    for (how, kind, actor_kind) in [
        ("complete", "end_grant", "agent"),
        ("revoke", "end_grant", "operator"),
        ("read", "consume_grant", "anonymous"),
    ] {
        let (granted, record) = expect.one(&as_refs(&authorize("read")), "authorize", "agent");
        assert_eq!(record["decision"], "allow", "{how}");
        assert_eq!(record["user"], "alice");
        let grant = granted["grant_id"].as_str().expect("grant").to_owned();
        let token = granted["token"].as_str().expect("token").to_owned();
        let args: Vec<&str> = match how {
            "complete" => vec![
                "grant",
                "complete",
                &grant,
                "--agent",
                agent,
                "--agent-key",
                key,
            ],
            "revoke" => vec!["grant", "revoke", &grant],
            _ => vec!["secret", "read", "secret/team-a/db", "--token", &token],
        };
        let (_, record) = expect.one(&args, kind, actor_kind);
        assert_eq!(record["grant_id"], grant.as_str(), "{how}");
        assert_eq!(record["user"], "alice", "{how}");
        assert_eq!(record["agent"], agent, "{how}");
    }

    for (verb, decision) in [("approve", "allow"), ("deny", "deny")] {
        let (pending, record) = expect.one(&as_refs(&authorize("delete")), "authorize", "agent");
        assert_eq!(record["decision"], "pending");
        let approval = pending["approval_id"]
            .as_str()
            .expect("approval id")
            .to_owned();
        let (_, record) = expect.one(
            &["approval", verb, &approval, "--user-token", alice],
            "decide_approval",
            "user",
        );
        assert_eq!(record["decision"], decision);
        assert_eq!(record["target"], approval.as_str());
    }

    let (_, record) = expect.one(
        &["delegate", "revoke", &delegation, "--user-token", alice],
        "revoke_delegation",
        "user",
    );
    assert_eq!(record["delegation_id"], delegation.as_str());
    let (_, record) = expect.one(&as_refs(&authorize("read")), "authorize", "agent");
    assert_eq!(record["decision"], "deny");
    let (_, record) = expect.one(&["agent", "retire", agent], "set_agent_status", "operator");
    assert_eq!(record["target"], agent);
}

#[test]
fn with_secret_paths_hashed_no_secret_path_enters_the_trail() {
    let c = DevCluster::start_with_env(1, 27000, &[("MANDATE_AUDIT_HASH_SECRET_PATHS", "true")]);
    let world = World::create(&c, "discreet");
    c.json(&c.addrs[0], &["secret", "put", "secret/team-a/db", "v1"]);
    let delegation = world.delegate(&c, &["read"], &["secret/team-a/*"], &[]);
    let granted = world.authorize(&c, &delegation, "read", "secret/team-a/db", &[]);
    c.json(
        &c.addrs[0],
        &[
            "grant",
            "consume",
            granted["token"].as_str().expect("token"),
        ],
    );

    let lines = trail(&c, &c.addrs[0]);
    assert!(
        !lines.iter().any(|l| l.contains("secret/team-a")),
        "a secret path entered the trail"
    );
    let records = parsed(&lines);
    let hashed = c.json(&c.addrs[0], &["audit", "hash", "secret/team-a/db"]);
    let named = format!("hmac:{}", hashed["hmac"].as_str().expect("hmac"));
    for kind in ["put_secret", "authorize"] {
        assert_eq!(
            of_type(&records, kind)[0]["resource"],
            named.as_str(),
            "{kind}"
        );
    }
    let pattern = c.json(&c.addrs[0], &["audit", "hash", "secret/team-a/*"]);
    assert_eq!(
        of_type(&records, "create_delegation")[0]["resource"],
        format!("hmac:{}", pattern["hmac"].as_str().expect("hmac")).as_str()
    );
    assert_eq!(
        of_type(&records, "consume_grant")[0]["resource"],
        "[secret path]"
    );
}
