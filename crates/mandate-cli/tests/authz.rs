//! Delegation, authorization and grants on a real 3-node cluster.

mod common;

use std::sync::Arc;

use common::{client_at, stderr, DevCluster, World};
use mandate_client::{pb, Code};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Runtime::new().expect("runtime")
}

async fn authorize(
    client: &mandate_client::Client,
    world: &World,
    delegation: &str,
    action: &str,
    resource: &str,
) -> pb::AuthorizeResponse {
    let request = pb::AuthorizeRequest {
        agent_assertion: world.assertion(),
        delegation_id: delegation.to_owned(),
        action: action.to_owned(),
        resource: resource.to_owned(),
        ..Default::default()
    };
    client
        .authz(|mut c| {
            let r = request.clone();
            async move { c.authorize(r).await }
        })
        .await
        .expect("authorize answers")
}

#[test]
fn the_demo_story_runs_against_a_three_node_cluster() {
    let c = DevCluster::start(3, 23000);
    let out = c.mandate(&["demo"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed: {}\n{stdout}",
        stderr(&out)
    );
    for step in [
        "==> 5.",
        "\"decision\":\"allow\"",
        "value: correct-horse-",
        "refused",
        "\"decision\":\"pending\"",
        "\"decision\":\"deny\"",
        "Demo complete",
    ] {
        assert!(
            stdout.contains(step),
            "demo output lacks {step:?}:\n{stdout}"
        );
    }
}

#[test]
fn concurrent_consumes_of_a_single_use_grant_succeed_exactly_once_across_nodes() {
    let c = DevCluster::start(3, 23200);
    let world = World::create(&c, "consumer");
    let delegation = world.delegate(&c, &["read"], &["secret/team-a/*"], &[]);
    let rt = runtime();
    let _enter = rt.enter();
    let clients: Vec<Arc<mandate_client::Client>> = c
        .addrs
        .iter()
        .map(|a| Arc::new(client_at(&c.ca_cert, a, &c.token)))
        .collect();
    let granted = rt.block_on(authorize(
        &clients[0],
        &world,
        &delegation,
        "read",
        "secret/team-a/db",
    ));
    assert_eq!(
        granted.decision,
        pb::Decision::Allow as i32,
        "{:?}",
        granted.reasons
    );
    let outcomes = rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..30 {
            let client = clients[i % clients.len()].clone();
            let token = granted.token.clone();
            tasks.push(tokio::spawn(async move {
                client
                    .authz(|mut a| {
                        let token = token.clone();
                        async move { a.consume(pb::ConsumeRequest { token }).await }
                    })
                    .await
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("task"));
        }
        out
    });
    let ok = outcomes.iter().filter(|o| o.is_ok()).count();
    assert_eq!(
        ok, 1,
        "a single-use grant was consumed {ok} times: {outcomes:?}"
    );
    for refused in outcomes.iter().filter_map(|o| o.as_ref().err()) {
        assert_eq!(refused.code(), Code::FailedPrecondition, "{refused}");
    }
}

#[test]
fn after_a_revocation_commits_no_node_issues_a_grant_under_it() {
    let c = DevCluster::start(3, 23400);
    let world = Arc::new(World::create(&c, "revoked"));
    let delegation = world.delegate(&c, &["read"], &["secret/team-a/*"], &[]);
    let rt = runtime();
    let _enter = rt.enter();
    let clients: Vec<Arc<mandate_client::Client>> = c
        .addrs
        .iter()
        .map(|a| Arc::new(client_at(&c.ca_cert, a, &c.token)))
        .collect();
    let live = rt.block_on(authorize(
        &clients[1],
        &world,
        &delegation,
        "read",
        "secret/team-a/x",
    ));
    assert_eq!(live.decision, pb::Decision::Allow as i32);

    // Authorizations race the revocation from every node; whatever commits after it is denied.
    let (revoked, raced) = rt.block_on(async {
        let mut tasks = Vec::new();
        for i in 0..24 {
            let client = clients[i % clients.len()].clone();
            let world = world.clone();
            let delegation = delegation.clone();
            tasks.push(tokio::spawn(async move {
                authorize(&client, &world, &delegation, "read", "secret/team-a/x").await
            }));
        }
        let revoke = pb::RevokeDelegationRequest {
            id: delegation.clone(),
            user_token: world.alice.clone(),
            agent_assertion: String::new(),
        };
        let revoked = clients[2]
            .authz(|mut a| {
                let r = revoke.clone();
                async move { a.revoke_delegation(r).await }
            })
            .await
            .expect("revoke");
        assert!(
            revoked
                .revoked_grant_ids
                .contains(&live.grant.as_ref().expect("grant").id),
            "the live grant was not revoked with its delegation"
        );
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("task"));
        }
        (revoked, out)
    });
    for r in &raced {
        if r.decision != pb::Decision::Allow as i32 {
            continue;
        }
        let grant = r.grant.as_ref().expect("an allow carries its grant");
        // Committed in an earlier entry, or earlier in the revocation's own batch: either way
        // the revocation's cascade must have revoked it.
        assert!(
            r.applied_index <= revoked.applied_index,
            "a grant was issued at {} after the revocation at {}",
            r.applied_index,
            revoked.applied_index
        );
        assert!(
            revoked.revoked_grant_ids.contains(&grant.id),
            "grant {} outlived the revocation",
            grant.id
        );
    }
    for client in &clients {
        let after = rt.block_on(authorize(
            client,
            &world,
            &delegation,
            "read",
            "secret/team-a/x",
        ));
        assert_eq!(after.decision, pb::Decision::Deny as i32);
        assert!(
            after.reasons.iter().any(|r| r.contains("revoked")),
            "{:?}",
            after.reasons
        );
    }
    let introspected = c.json(&c.addrs.join(","), &["grant", "introspect", &live.token]);
    assert_eq!(introspected["active"], false);
}

#[test]
fn a_replayed_assertion_is_refused_cluster_wide() {
    let c = DevCluster::start(3, 23600);
    let world = World::create(&c, "replayer");
    let delegation = world.delegate(&c, &["read"], &["secret/team-a/*"], &[]);
    let rt = runtime();
    let _enter = rt.enter();
    let assertion = world.assertion();
    let request = pb::AuthorizeRequest {
        agent_assertion: assertion,
        delegation_id: delegation,
        action: "read".into(),
        resource: "secret/team-a/db".into(),
        ..Default::default()
    };
    let first = rt.block_on(client_at(&c.ca_cert, &c.addrs[0], &c.token).authz(|mut a| {
        let r = request.clone();
        async move { a.authorize(r).await }
    }));
    assert!(first.is_ok());
    for addr in &c.addrs {
        let again = rt.block_on(client_at(&c.ca_cert, addr, &c.token).authz(|mut a| {
            let r = request.clone();
            async move { a.authorize(r).await }
        }));
        let err = again.expect_err("a replayed assertion was accepted");
        assert_eq!(err.code(), Code::Unauthenticated, "{err}");
    }

    // Other agent calls spend their assertion too: completing with a replayed one is refused.
    let grant = first.expect("authorized").grant.expect("a grant").id;
    let complete = pb::GrantIdRequest {
        grant_id: grant,
        agent_assertion: world.assertion(),
        user_token: String::new(),
    };
    let call = |addr: &str| {
        rt.block_on(client_at(&c.ca_cert, addr, &c.token).authz(|mut a| {
            let r = complete.clone();
            async move { a.complete(r).await }
        }))
    };
    call(&c.addrs[0]).expect("the first completion is accepted");
    let replayed = call(&c.addrs[2]).expect_err("a replayed completion assertion was accepted");
    assert_eq!(replayed.code(), Code::Unauthenticated, "{replayed}");
}

async fn check(
    client: &mandate_client::Client,
    items: Vec<pb::CheckItem>,
    read: Option<pb::ReadOptions>,
) -> Result<pb::CheckResponse, mandate_client::ClientError> {
    let request = pb::CheckRequest { items, read };
    client
        .authz(|mut c| {
            let r = request.clone();
            async move { c.check(r).await }
        })
        .await
}

fn check_item(agent: &str, delegation: &str, action: &str, resource: &str) -> pb::CheckItem {
    pb::CheckItem {
        agent: agent.to_owned(),
        delegation_id: delegation.to_owned(),
        action: action.to_owned(),
        resource: resource.to_owned(),
        ..Default::default()
    }
}

#[test]
fn check_decides_as_authorize_would_issues_nothing_and_sees_a_revocation_on_every_node() {
    let c = DevCluster::start(3, 24000);
    let world = World::create(&c, "checker");
    let delegation = world.delegate(&c, &["read"], &["secret/team-a/*"], &[]);
    let rt = runtime();
    let _enter = rt.enter();
    let clients: Vec<mandate_client::Client> = c
        .addrs
        .iter()
        .map(|a| client_at(&c.ca_cert, a, &c.token))
        .collect();
    let items = vec![
        check_item(&world.agent_id, &delegation, "read", "secret/team-a/x"),
        check_item(&world.agent_id, &delegation, "write", "secret/team-a/x"),
        check_item(&world.agent_id, &delegation, "read", "secret/team-b/x"),
        check_item("agt_nobody", &delegation, "read", "secret/team-a/x"),
    ];
    let before = c.json(&c.addrs[0], &["cluster", "status"]);
    for client in &clients {
        let r = rt
            .block_on(check(client, items.clone(), None))
            .expect("check answers");
        let decisions: Vec<i32> = r.results.iter().map(|r| r.decision).collect();
        let (allow, deny) = (pb::Decision::Allow as i32, pb::Decision::Deny as i32);
        assert_eq!(decisions, vec![allow, deny, deny, deny], "{:?}", r.results);
        assert_eq!(
            r.results[0].policy_ids,
            vec!["world:agents", "world:alice-team-a"]
        );
        assert!(r.results[1].reasons[0].contains("does not include the action \"write\""));
        assert!(r.results[2].reasons[0].contains("does not cover"));
        assert!(r.results[3].reasons[0].contains("there is no agent agt_nobody"));
        let stale = pb::ReadOptions {
            consistency: pb::ReadConsistency::Stale as i32,
            min_applied_index: r.applied_index,
        };
        let again = rt
            .block_on(check(client, items[..1].to_vec(), Some(stale)))
            .expect("a stale check answers");
        assert_eq!(again.results[0].decision, allow);
    }
    let cli = |extra: &[&str]| {
        let mut args = vec![
            "check",
            "--agent",
            &world.agent_id,
            "--delegation",
            &delegation,
            "--action",
            "read",
            "--resource",
            "secret/team-a/x",
        ];
        args.extend(extra);
        c.json(&c.addrs.join(","), &args)
    };
    assert_eq!(cli(&[])["decision"], "allow");
    assert_eq!(cli(&["--stale"])["decision"], "allow");
    let after = c.json(&c.addrs[0], &["cluster", "status"]);
    assert_eq!(
        before["members"][0]["last_log_index"], after["members"][0]["last_log_index"],
        "checks appended to the log"
    );

    let revoke = pb::RevokeDelegationRequest {
        id: delegation.clone(),
        user_token: world.alice.clone(),
        agent_assertion: String::new(),
    };
    rt.block_on(clients[0].authz(|mut a| {
        let r = revoke.clone();
        async move { a.revoke_delegation(r).await }
    }))
    .expect("revoke");
    for client in &clients {
        let r = rt
            .block_on(check(client, items[..1].to_vec(), None))
            .expect("check answers");
        assert_eq!(r.results[0].decision, pb::Decision::Deny as i32);
        assert!(
            r.results[0].reasons[0].contains("revoked"),
            "{:?}",
            r.results
        );
    }
    let denied = cli(&[]);
    assert_eq!(denied["decision"], "deny");
    assert!(denied["reasons"][0]
        .as_str()
        .is_some_and(|r| r.contains("revoked")));
}

#[test]
fn check_refuses_bad_input_naming_the_item_and_field() {
    let c = DevCluster::start(1, 24050);
    let rt = runtime();
    let _enter = rt.enter();
    let client = client_at(&c.ca_cert, &c.addrs[0], &c.token);
    let good = check_item("agt_a", "dlg_a", "read", "secret/a");
    let cases: Vec<(Vec<pb::CheckItem>, &str, &str)> = vec![
        (vec![], "items", "1 to 1000 items"),
        (vec![good.clone(); 1001], "items", "not 1001"),
        (
            vec![
                good.clone(),
                check_item("agt_a", "dlg_a", "fly", "secret/a"),
            ],
            "items[1].action",
            "fly",
        ),
        (
            vec![check_item("agt_a", "dlg_a", "read", "secret//a")],
            "items[0].resource",
            "",
        ),
        (
            vec![check_item("", "dlg_a", "read", "secret/a")],
            "items[0].agent",
            "must not be empty",
        ),
        (
            vec![check_item("agt_a", "", "read", "secret/a")],
            "items[0].delegation_id",
            "must not be empty",
        ),
    ];
    for (items, field, needle) in cases {
        let e = rt
            .block_on(check(&client, items, None))
            .expect_err("bad input is refused");
        assert_eq!(e.code(), Code::InvalidArgument, "{e}");
        let message = e.to_string();
        assert!(
            message.contains(field) && message.contains(needle),
            "{field}: {message}"
        );
    }
    let ca = std::fs::read(&c.ca_cert).expect("read the CA");
    let anonymous =
        mandate_client::Client::with_ca(&c.addrs[..1], None, Some(&ca)).expect("client");
    let e = rt
        .block_on(check(&anonymous, vec![good], None))
        .expect_err("a check needs an operator token");
    assert_eq!(e.code(), Code::Unauthenticated);
}
