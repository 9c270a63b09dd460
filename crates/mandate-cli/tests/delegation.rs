//! Re-delegation, approvals and bad input for every delegation and authorization call.

mod common;

use common::{as_refs, refused, DevCluster, World};

fn register_sub_agent(c: &DevCluster, name: &str) -> (String, String) {
    let key = c.dir.path().join(format!("{name}.pem"));
    let key = key.to_str().expect("utf-8").to_owned();
    c.json(&c.addrs[0], &["agent", "keygen", "--out", &key]);
    let agent = c.json(
        &c.addrs[0],
        &[
            "agent",
            "register",
            "--name",
            name,
            "--owner",
            "alice",
            "--public-key",
            &key,
        ],
    );
    (agent["id"].as_str().expect("id").to_owned(), key)
}

#[test]
fn a_sub_agent_gets_at_most_its_parents_authority_and_revocation_cascades() {
    let c = DevCluster::start(1, 24400);
    let world = World::create(&c, "parent-agent");
    let parent_key = c.dir.path().join("parent-agent.pem");
    let parent_key = parent_key.to_str().expect("utf-8");
    let root = world.delegate(
        &c,
        &["read", "list"],
        &["secret/team-a/*"],
        &["--may-redelegate", "--max-depth", "1", "--max-uses", "10"],
    );
    let (sub_id, sub_key) = register_sub_agent(&c, "sub-agent");
    let sub = |extra: &[&str]| {
        let mut args = vec![
            "delegate",
            "sub",
            "--agent",
            &world.agent_id,
            "--agent-key",
            parent_key,
            "--parent",
            &root,
            "--to",
            &sub_id,
        ];
        args.extend(extra);
        args.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    for (extra, needle) in [
        (
            vec![
                "--action",
                "delete",
                "--resource",
                "secret/team-a/*",
                "--max-uses",
                "1",
                "--ttl",
                "30m",
            ],
            "actions",
        ),
        (
            vec![
                "--action",
                "read",
                "--resource",
                "secret/*",
                "--max-uses",
                "1",
                "--ttl",
                "30m",
            ],
            "resources",
        ),
        (
            vec![
                "--action",
                "read",
                "--resource",
                "secret/team-a/*",
                "--max-uses",
                "11",
                "--ttl",
                "30m",
            ],
            "max_uses",
        ),
        (
            vec![
                "--action",
                "read",
                "--resource",
                "secret/team-a/*",
                "--max-uses",
                "1",
                "--ttl",
                "2h",
            ],
            "ttl",
        ),
        (
            vec![
                "--action",
                "read",
                "--resource",
                "secret/team-a/*",
                "--max-uses",
                "1",
                "--ttl",
                "30m",
                "--may-redelegate",
                "--max-depth",
                "1",
            ],
            "max_depth",
        ),
    ] {
        refused(&c, &as_refs(&sub(&extra)), "PermissionDenied", needle);
    }
    let child = c.json(
        &c.addrs[0],
        &as_refs(&sub(&[
            "--action",
            "read",
            "--resource",
            "secret/team-a/db",
            "--max-uses",
            "2",
            "--ttl",
            "30m",
        ])),
    );
    assert_eq!(child["chain"].as_array().expect("chain").len(), 2);
    let child_id = child["id"].as_str().expect("id").to_owned();

    let authorize = |agent: &str, key: &str, delegation: &str| {
        c.json(
            &c.addrs[0],
            &[
                "authorize",
                "--agent",
                agent,
                "--agent-key",
                key,
                "--delegation",
                delegation,
                "--action",
                "read",
                "--resource",
                "secret/team-a/db",
            ],
        )
    };
    let allowed = authorize(&sub_id, &sub_key, &child_id);
    assert_eq!(allowed["decision"], "allow", "{allowed}");
    assert_eq!(
        allowed["grant"]["chain"].as_array().expect("chain").len(),
        2
    );
    let introspected = c.json(
        &c.addrs[0],
        &[
            "grant",
            "introspect",
            allowed["token"].as_str().expect("token"),
        ],
    );
    assert_eq!(introspected["act"]["sub"], sub_id.as_str());
    assert_eq!(introspected["act"]["act"]["sub"], world.agent_id.as_str());

    let revoked = c.json(
        &c.addrs[0],
        &["delegate", "revoke", &root, "--user-token", &world.alice],
    );
    let ids: Vec<&str> = revoked["revoked_delegation_ids"]
        .as_array()
        .expect("ids")
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(
        ids.contains(&root.as_str()) && ids.contains(&child_id.as_str()),
        "{revoked}"
    );
    assert_eq!(revoked["revoked_grant_ids"][0], allowed["grant_id"]);
    let denied = authorize(&sub_id, &sub_key, &child_id);
    assert_eq!(denied["decision"], "deny");
}

#[test]
fn an_action_that_needs_approval_waits_for_the_user() {
    let c = DevCluster::start(1, 24600);
    let world = World::create(&c, "asker");
    let delegation = world.delegate(
        &c,
        &["read", "delete"],
        &["secret/team-a/*"],
        &["--approval-for", "delete"],
    );
    let pending = world.authorize(&c, &delegation, "delete", "secret/team-a/db", &[]);
    assert_eq!(pending["decision"], "pending");
    let approval = pending["approval_id"].as_str().expect("approval id");
    let listed = c.json(
        &c.addrs[0],
        &[
            "approval",
            "list",
            "--user-token",
            &world.alice,
            "--pending",
        ],
    );
    assert_eq!(listed["approvals"][0]["id"], approval);
    let approved = c.json(
        &c.addrs[0],
        &[
            "approval",
            "approve",
            approval,
            "--user-token",
            &world.alice,
        ],
    );
    assert_eq!(approved["status"], "approved");
    refused(
        &c,
        &[
            "approval",
            "approve",
            approval,
            "--user-token",
            &world.alice,
        ],
        "FailedPrecondition",
        "already decided",
    );
    assert!(approved["grant_id"]
        .as_str()
        .is_some_and(|g| g.starts_with("grt_")));
}

#[test]
fn an_approved_grant_asked_for_after_its_lifetime_is_refused_as_expired() {
    let c = DevCluster::start(1, 27200);
    let world = World::create(&c, "latecomer");
    let delegation = world.delegate(
        &c,
        &["delete"],
        &["secret/team-a/*"],
        &["--approval-for", "delete"],
    );
    let pending = world.authorize(
        &c,
        &delegation,
        "delete",
        "secret/team-a/db",
        &["--ttl", "1s"],
    );
    let approval = pending["approval_id"].as_str().expect("approval id");
    let approved = c.json(
        &c.addrs[0],
        &[
            "approval",
            "approve",
            approval,
            "--user-token",
            &world.alice,
        ],
    );
    let grant_id = approved["grant_id"].as_str().expect("grant id").to_owned();

    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let _enter = rt.enter();
    let client = common::client_at(&c.ca_cert, &c.addrs[0], &c.token);
    let fetch = || {
        let request = mandate_client::pb::GetApprovalRequest {
            agent_assertion: world.assertion(),
            approval_id: approval.to_owned(),
            wait_ms: 0,
        };
        rt.block_on(client.authz(|mut a| {
            let r = request.clone();
            async move { a.get_approval(r).await }
        }))
    };
    let fresh = fetch().expect("the approved grant is fetched while it lives");
    assert!(!fresh.token.is_empty());

    // Once the grant's second is over, housekeeping removes it, and asking again says so.
    let refusal = common::wait_for(
        "the approved grant to be removed",
        std::time::Duration::from_secs(10),
        || fetch().err(),
    );
    assert_eq!(refusal.code(), mandate_client::Code::FailedPrecondition);
    assert!(
        refusal
            .to_string()
            .contains(&format!("{grant_id}, has expired")),
        "{refusal}"
    );
}

#[test]
fn bad_input_to_delegation_and_authorization_calls_is_refused_and_changes_nothing() {
    let c = DevCluster::start(1, 24800);
    let world = World::create(&c, "careful");
    let key = c.dir.path().join("careful.pem");
    let key = key.to_str().expect("utf-8");
    let bad_policy = c.dir.path().join("bad.cedar");
    std::fs::write(
        &bad_policy,
        "permit(principal, action, resource);\npermit(principal action, resource);",
    )
    .expect("write");
    let unknown_attr = c.dir.path().join("unknown.cedar");
    std::fs::write(
        &unknown_attr,
        "permit(principal, action, resource)\n  when { context.nope == 1 };",
    )
    .expect("write");
    let bad_jwks = c.dir.path().join("bad.jwks");
    std::fs::write(&bad_jwks, r#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}"#).expect("write");
    let before = c.json(
        &c.addrs[0],
        &["delegate", "list", "--user-token", &world.alice],
    );
    let delegate = |extra: &[&str]| {
        let mut args = vec![
            "delegate",
            "create",
            "--user-token",
            world.alice.as_str(),
            "--agent",
            world.agent_id.as_str(),
        ];
        args.extend(extra);
        args.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let cases: Vec<(Vec<String>, &str, &str)> = vec![
        (
            vec![
                "policy".into(),
                "put".into(),
                "broken".into(),
                bad_policy.display().to_string(),
            ],
            "InvalidArgument",
            "line 2, column",
        ),
        (
            vec![
                "policy".into(),
                "put".into(),
                "broken".into(),
                unknown_attr.display().to_string(),
            ],
            "InvalidArgument",
            "line 2",
        ),
        (
            vec![
                "policy".into(),
                "put".into(),
                "Bad Name".into(),
                bad_policy.display().to_string(),
            ],
            "InvalidArgument",
            "name",
        ),
        (
            vec![
                "issuer".into(),
                "put".into(),
                "x".into(),
                "--issuer".into(),
                "i".into(),
                "--audience".into(),
                "a".into(),
                "--jwks-file".into(),
                bad_jwks.display().to_string(),
            ],
            "InvalidArgument",
            "kty",
        ),
        (
            delegate(&["--action", "fly", "--resource", "secret/team-a/*"]),
            "InvalidArgument",
            "actions[0]",
        ),
        (
            delegate(&["--action", "read", "--resource", "secret//x"]),
            "InvalidArgument",
            "resources[0]",
        ),
        (
            delegate(&[
                "--action",
                "read",
                "--resource",
                "secret/team-a/*",
                "--ttl",
                "0s",
            ]),
            "InvalidArgument",
            "ttl_seconds",
        ),
        (
            delegate(&[
                "--action",
                "read",
                "--resource",
                "secret/team-a/*",
                "--approval-for",
                "delete",
            ]),
            "InvalidArgument",
            "approval_actions",
        ),
        (
            delegate(&["--action", "read", "--resource", "secret/team-b/*"]),
            "PermissionDenied",
            "not permitted",
        ),
        (
            vec![
                "delegate".into(),
                "create".into(),
                "--user-token".into(),
                "not.a.jwt".into(),
                "--agent".into(),
                world.agent_id.clone(),
                "--action".into(),
                "read".into(),
                "--resource".into(),
                "secret/team-a/*".into(),
            ],
            "Unauthenticated",
            "user token",
        ),
        (
            vec![
                "authorize".into(),
                "--agent".into(),
                world.agent_id.clone(),
                "--agent-key".into(),
                key.into(),
                "--delegation".into(),
                "dlg_missing".into(),
                "--action".into(),
                "jump".into(),
                "--resource".into(),
                "secret/team-a/x".into(),
            ],
            "InvalidArgument",
            "action",
        ),
        (
            vec!["grant".into(), "consume".into(), "garbage".into()],
            "Unauthenticated",
            "grant token",
        ),
        (
            vec!["secret".into(), "put".into(), "team-a/x".into(), "v".into()],
            "InvalidArgument",
            "secret/",
        ),
        (
            vec![
                "approval".into(),
                "approve".into(),
                "apv_missing".into(),
                "--user-token".into(),
                world.alice.clone(),
            ],
            "NotFound",
            "approval_id",
        ),
        (
            vec![
                "delegate".into(),
                "revoke".into(),
                "dlg_missing".into(),
                "--user-token".into(),
                world.alice.clone(),
            ],
            "NotFound",
            "id",
        ),
    ];
    for (args, code, needle) in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        refused(&c, &args, code, needle);
    }
    let after = c.json(
        &c.addrs[0],
        &["delegate", "list", "--user-token", &world.alice],
    );
    assert_eq!(before, after, "a refused request changed the delegations");
    let policies = c.json(&c.addrs[0], &["policy", "list"]);
    assert_eq!(
        policies["policies"].as_array().expect("policies").len(),
        1,
        "a refused policy was stored"
    );
}
