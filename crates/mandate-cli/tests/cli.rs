//! The CLI contract against a one-node `mandate dev` cluster: exact commands, JSON fields,
//! specific errors for bad input, and authentication.

mod common;

use common::{refused, stderr, DevCluster};

fn count_agents(c: &DevCluster) -> usize {
    let listed = c.json(
        &c.addrs.join(","),
        &["agent", "list", "--page-size", "1000"],
    );
    listed["agents"].as_array().expect("agents").len()
}

#[test]
fn the_agent_lifecycle_runs_through_the_cli() {
    let c = DevCluster::start(1, 22000);
    let key = c.dir.path().join("agent.pem");
    let jwk = c.json(
        &c.addrs[0],
        &["agent", "keygen", "--out", key.to_str().expect("utf-8")],
    );
    assert_eq!(
        (jwk["kty"].as_str(), jwk["crv"].as_str()),
        (Some("OKP"), Some("Ed25519"))
    );

    let agent = c.json(
        &c.addrs[0],
        &[
            "agent",
            "register",
            "--name",
            "billing-bot",
            "--owner",
            "alice",
            "--description",
            "pays invoices",
            "--label",
            "team=payments",
            "--public-key",
            key.to_str().expect("utf-8"),
        ],
    );
    let id = agent["id"].as_str().expect("id").to_owned();
    assert!(id.starts_with("agt_"));
    assert_eq!(agent["public_keys"][0]["kid"], jwk["kid"]);
    assert_eq!(
        c.json(&c.addrs[0], &["agent", "get", &id])["name"],
        "billing-bot"
    );

    for (verb, status) in [
        ("suspend", "suspended"),
        ("resume", "active"),
        ("retire", "retired"),
    ] {
        let v = c.json(&c.addrs[0], &["agent", verb, &id]);
        assert_eq!(v["status"], status, "after {verb}");
    }
    refused(
        &c,
        &["agent", "resume", &id],
        "FailedPrecondition",
        "retired",
    );
    let retired = c.json(&c.addrs[0], &["agent", "list", "--status", "retired"]);
    assert_eq!(retired["agents"][0]["id"], id.as_str());
    let by_label = c.json(&c.addrs[0], &["agent", "list", "--label", "team=payments"]);
    assert_eq!(by_label["agents"].as_array().expect("agents").len(), 1);
}

#[test]
fn bad_input_is_refused_with_the_field_named_and_nothing_written() {
    let c = DevCluster::start(1, 22200);
    c.json(
        &c.addrs[0],
        &["agent", "register", "--name", "taken", "--owner", "alice"],
    );
    let before = count_agents(&c);
    let bad_key = c.dir.path().join("bad.jwk");
    std::fs::write(&bad_key, r#"{"kty":"OKP","crv":"Ed25519","x":"AAAA"}"#).expect("write");
    let long_name = "x".repeat(65);
    let cases: Vec<(Vec<&str>, &str, &str)> = vec![
        (
            vec!["agent", "register", "--name", "", "--owner", "alice"],
            "InvalidArgument",
            "name: must not be empty",
        ),
        (
            vec![
                "agent", "register", "--name", &long_name, "--owner", "alice",
            ],
            "InvalidArgument",
            "name: is 65 bytes",
        ),
        (
            vec!["agent", "register", "--name", "taken", "--owner", "alice"],
            "AlreadyExists",
            "name",
        ),
        (
            vec!["agent", "register", "--name", "ok", "--owner", "al ice"],
            "InvalidArgument",
            "owner",
        ),
        (
            vec![
                "agent", "register", "--name", "ok", "--owner", "alice", "--label", "Bad=x",
            ],
            "InvalidArgument",
            "labels[Bad]",
        ),
        (
            vec![
                "agent",
                "register",
                "--name",
                "ok",
                "--owner",
                "alice",
                "--public-key",
                bad_key.to_str().expect("utf-8"),
            ],
            "InvalidArgument",
            "public_keys[0].x",
        ),
        (
            vec!["agent", "get", "agt_0123456789abcdef0123456789abcdef"],
            "NotFound",
            "id_or_name",
        ),
        (
            vec!["agent", "suspend", "agt_0123456789abcdef0123456789abcdef"],
            "NotFound",
            "id",
        ),
        (
            vec!["agent", "suspend", "agt_nothex"],
            "InvalidArgument",
            "id",
        ),
        (
            vec!["agent", "remove-key", "taken", "-hnosuchkid"],
            "NotFound",
            "has no key \"-hnosuchkid\"",
        ),
        (
            vec!["agent", "list", "--page-size", "5000"],
            "InvalidArgument",
            "page_size",
        ),
    ];
    for (args, code, needle) in &cases {
        refused(&c, args, code, needle);
    }
    assert_eq!(
        count_agents(&c),
        before,
        "a refused request wrote something"
    );
}

#[test]
fn requests_without_a_valid_token_are_unauthenticated_and_write_nothing() {
    let c = DevCluster::start(1, 22400);
    let before = count_agents(&c);
    let addr = c.addrs[0].clone();
    let run = |token: Option<&str>, args: &[&str]| {
        let mut cmd = std::process::Command::new(common::MANDATE);
        cmd.args(args)
            .env("MANDATE_ADDR", &addr)
            .env("MANDATE_CA_CERT", &c.ca_cert)
            .env_remove("MANDATE_TOKEN");
        if let Some(t) = token {
            cmd.env("MANDATE_TOKEN", t);
        }
        cmd.output().expect("run")
    };
    let register = [
        "agent", "register", "--name", "sneaky", "--owner", "mallory",
    ];
    let wrong =
        "mdt_tok_0000000000000000.0000000000000000000000000000000000000000000000000000000000000000";
    for token in [None, Some(wrong), Some("garbage")] {
        let out = run(token, &register);
        assert!(!out.status.success());
        assert!(stderr(&out).contains("Unauthenticated"), "{}", stderr(&out));
        let out = run(token, &["agent", "list"]);
        assert!(
            stderr(&out).contains("Unauthenticated"),
            "reads need a token too"
        );
    }
    assert_eq!(count_agents(&c), before);

    // The root token creates an operator token, which works until it is revoked.
    let created = c.json(&addr, &["token", "create", "--name", "ci"]);
    let operator = created["token"].as_str().expect("token").to_owned();
    let ok = run(
        Some(&operator),
        &[
            "agent",
            "register",
            "--name",
            "by-operator",
            "--owner",
            "alice",
        ],
    );
    assert!(ok.status.success(), "{}", stderr(&ok));
    let denied = run(Some(&operator), &["token", "create", "--name", "escalate"]);
    assert!(
        stderr(&denied).contains("PermissionDenied"),
        "{}",
        stderr(&denied)
    );
    c.json(
        &addr,
        &["token", "revoke", created["id"].as_str().expect("id")],
    );
    let after = run(
        Some(&operator),
        &[
            "agent",
            "register",
            "--name",
            "after-revoke",
            "--owner",
            "alice",
        ],
    );
    assert!(
        stderr(&after).contains("Unauthenticated"),
        "{}",
        stderr(&after)
    );
}

#[test]
fn concurrent_writers_each_get_their_own_result() {
    let c = DevCluster::start(1, 22600);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let results = runtime.block_on(async {
        let client = std::sync::Arc::new(common::clients(&c.ca_cert, &c.addrs, &c.token));
        let mut tasks = Vec::new();
        for i in 0..64 {
            let client = client.clone();
            tasks.push(tokio::spawn(async move {
                let name = format!("concurrent-{i}");
                let request = mandate_client::pb::RegisterAgentRequest {
                    name: name.clone(),
                    owner: "alice".into(),
                    ..Default::default()
                };
                let r = client
                    .registry(|mut r| {
                        let request = request.clone();
                        async move { r.register(request).await }
                    })
                    .await;
                (name, r)
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("task"));
        }
        out
    });
    let mut ids = std::collections::BTreeSet::new();
    for (name, result) in results {
        let agent = result.expect("registered").agent.expect("agent");
        assert_eq!(
            agent.name, name,
            "a caller received another caller's result"
        );
        assert!(ids.insert(agent.id));
    }
    assert_eq!(ids.len(), 64);
}

#[test]
fn an_oversized_request_is_refused_naming_the_request() {
    let c = DevCluster::start(1, 22800);
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let client = runtime.block_on(async { common::clients(&c.ca_cert, &c.addrs, &c.token) });
    for (size, code, field) in [
        (
            2 * 1024 * 1024,
            mandate_client::Code::InvalidArgument,
            Some("request"),
        ),
        (5 * 1024 * 1024, mandate_client::Code::OutOfRange, None),
    ] {
        let request = mandate_client::pb::RegisterAgentRequest {
            name: "huge".into(),
            owner: "alice".into(),
            description: "x".repeat(size),
            ..Default::default()
        };
        let err = runtime
            .block_on(client.registry(|mut r| {
                let request = request.clone();
                async move { r.register(request).await }
            }))
            .expect_err("an oversized request was accepted");
        assert_eq!(err.code(), code, "{err}");
        if let mandate_client::ClientError::Status { field: got, .. } = &err {
            assert_eq!(got.as_deref(), field);
        }
    }
    assert_eq!(count_agents(&c), 0);
}
