//! `mandate demo`: the story of the product brief, run against the cluster in `MANDATE_ADDR`
//! with the operator token in `MANDATE_TOKEN`. Every step is printed; any surprise fails the
//! command.

use clap::Args;
use mandate_client::{pb, ClientError};

use crate::authz_cli::{
    create_delegation, decision_json, put_policy, register_agent, trust_new_issuer,
};
use crate::identity::{self, agent_assertion};
use crate::{Connection, Failure};

const POLICY: &str = r#"// Written by `mandate demo`.
@id("alice-team-a")
permit(principal == User::"alice", action in [Action::"read", Action::"delete"], resource in Resource::"secret/team-a");

@id("agents-one-hop")
permit(principal is Agent, action, resource in Resource::"secret") when { context.delegation.depth <= 1 };
"#;

const CEILING: &str = r#"permit(principal, action in [Action::"read", Action::"delete"], resource in Resource::"secret/team-a");"#;

#[derive(Args, Debug)]
pub struct DemoArgs {
    #[command(flatten)]
    connection: Connection,
}

fn step(n: u32, text: &str) {
    println!("\n==> {n}. {text}");
}

fn expect(condition: bool, what: &str) -> Result<(), Failure> {
    if condition {
        Ok(())
    } else {
        Err(Failure(format!("demo: expected {what}")))
    }
}

pub async fn run(args: DemoArgs) -> Result<(), Failure> {
    let client = args.connection.client()?;
    let run = hex::encode(rand::random::<[u8; 4]>());
    let cluster_id = identity::cluster_id(&client).await?;
    println!(
        "Mandate demo {run} against {} (cluster {cluster_id})",
        args.connection.addr
    );

    step(
        1,
        "Trust a demo identity provider and write the cluster policy",
    );
    let (idp, issuer) = trust_new_issuer(&client, "demo", &run).await?;
    put_policy(&client, "demo", POLICY).await?;
    println!("    issuer {issuer}; policy \"demo\":\n{POLICY}");

    step(2, "Register an agent with a fresh key and a ceiling");
    let agent_key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
    let register = pb::RegisterAgentRequest {
        name: format!("demo-agent-{run}"),
        owner: "alice".into(),
        description: "reads team-a secrets for alice".into(),
        public_keys: vec![identity::public_jwk(&agent_key.verifying_key())],
        ceiling: CEILING.into(),
        ..Default::default()
    };
    let agent = register_agent(&client, register).await?;
    println!("    agent {} ({})", agent.id, agent.name);

    step(3, "Store the secret secret/team-a/db-password");
    let value = format!("correct-horse-{run}");
    let put = pb::PutSecretRequest {
        path: "secret/team-a/db-password".into(),
        value: value.clone().into_bytes(),
        ..Default::default()
    };
    let written = client
        .authz(|mut c| {
            let r = put.clone();
            async move { c.put_secret(r).await }
        })
        .await?;
    println!("    version {}", written.version);

    step(4, "As alice: delegate read and delete on secret/team-a/* for 1 h, 5 uses, approval required for delete");
    let alice = identity::user_token(&idp, &issuer, "mandate", "alice", 600)?;
    let delegate = pb::CreateDelegationRequest {
        user_token: alice.clone(),
        agent: agent.id.clone(),
        actions: vec!["read".into(), "delete".into()],
        resources: vec!["secret/team-a/*".into()],
        purpose: "rotate the team-a database password".into(),
        ttl_seconds: 3600,
        max_uses: 5,
        approval_actions: vec!["delete".into()],
        ..Default::default()
    };
    let delegation = create_delegation(&client, delegate).await?;
    println!(
        "    delegation {} ({} → {})",
        delegation.id, delegation.user, delegation.agent
    );

    let authorize = |action: &str| pb::AuthorizeRequest {
        delegation_id: delegation.id.clone(),
        action: action.into(),
        resource: "secret/team-a/db-password".into(),
        ..Default::default()
    };
    let ask = |mut request: pb::AuthorizeRequest| {
        let client = &client;
        let agent_key = &agent_key;
        let agent_id = agent.id.clone();
        let cluster_id = cluster_id.clone();
        async move {
            request.agent_assertion = agent_assertion(&agent_id, agent_key, &cluster_id)?;
            let r = client
                .authz(|mut c| {
                    let r = request.clone();
                    async move { c.authorize(r).await }
                })
                .await?;
            Ok::<_, Failure>(r)
        }
    };

    step(5, "The agent asks to read secret/team-a/db-password");
    let allowed = ask(authorize("read")).await?;
    println!("    {}", decision_json(&allowed));
    expect(allowed.decision == pb::Decision::Allow as i32, "allow")?;

    step(6, "The agent reads the secret with its single-use token");
    let read = pb::ReadSecretRequest {
        path: "secret/team-a/db-password".into(),
        token: allowed.token.clone(),
    };
    let secret = client
        .authz(|mut c| {
            let r = read.clone();
            async move { c.read_secret(r).await }
        })
        .await?;
    println!("    value: {}", String::from_utf8_lossy(&secret.value));
    expect(secret.value == value.as_bytes(), "the stored value")?;

    step(7, "A second read with the same token is refused");
    let again = client
        .authz(|mut c| {
            let r = read.clone();
            async move { c.read_secret(r).await }
        })
        .await;
    match again {
        Err(ClientError::Status { message, code, .. }) => {
            println!("    refused ({code:?}): {message}")
        }
        other => {
            return Err(Failure(format!(
                "demo: expected the second read to be refused, got {other:?}"
            )))
        }
    }

    step(
        8,
        "The agent asks to delete it: alice must approve in person",
    );
    let pending = ask(authorize("delete")).await?;
    println!("    {}", decision_json(&pending));
    expect(pending.decision == pb::Decision::Pending as i32, "pending")?;
    let decide = pb::DecideApprovalRequest {
        user_token: alice.clone(),
        approval_id: pending.approval_id.clone(),
        approve: false,
    };
    client
        .authz(|mut c| {
            let r = decide.clone();
            async move { c.decide_approval(r).await }
        })
        .await?;
    println!("    alice denied approval {}", pending.approval_id);

    step(9, "Alice revokes the delegation");
    let revoke = pb::RevokeDelegationRequest {
        id: delegation.id.clone(),
        user_token: alice.clone(),
        agent_assertion: String::new(),
    };
    let revoked = client
        .authz(|mut c| {
            let r = revoke.clone();
            async move { c.revoke_delegation(r).await }
        })
        .await?;
    println!(
        "    revoked delegations {:?}, grants {:?}",
        revoked.revoked_delegation_ids, revoked.revoked_grant_ids
    );

    step(10, "The agent asks to read again: denied, with the reason");
    let denied = ask(authorize("read")).await?;
    println!("    {}", decision_json(&denied));
    expect(denied.decision == pb::Decision::Deny as i32, "deny")?;

    println!(
        "\nDemo complete: every step is in the replicated log, attributed to {} and to alice.",
        agent.id
    );
    Ok(())
}
