//! In-process decision evaluation: the chain check, the agent's ceiling and the Cedar policies,
//! exactly as apply runs them, over an in-memory state built through apply itself.

use std::collections::BTreeMap;
use std::time::Instant;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use mandate_core::apply::apply_batch;
use mandate_core::authz::{evaluate, AuthorizeRequest};
use mandate_core::pb::{self, command::Kind};
use mandate_core::policy::Engine;
use mandate_core::state::{Overlay, StateExt};
use serde_json::json;

use crate::output::print;
use crate::Failure;

type State = BTreeMap<Vec<u8>, Vec<u8>>;

/// Twenty policy documents' worth of rules, most of which do not apply: a realistic set.
fn policies() -> String {
    let mut text = String::from(
        "@id(\"alice\")\npermit(principal == User::\"alice\", action == Action::\"read\", resource in Resource::\"secret/team-a\");\n\
         @id(\"agents\")\npermit(principal is Agent, action, resource in Resource::\"secret\") when { context.delegation.depth <= 2 };\n",
    );
    for i in 0..18 {
        text.push_str(&format!(
            "@id(\"team-{i}\")\npermit(principal == User::\"user-{i}\", action in [Action::\"read\", Action::\"list\"], resource in Resource::\"secret/team-{i}\");\n"
        ));
    }
    text.push_str("@id(\"no-deletes-at-night\")\nforbid(principal is Agent, action == Action::\"delete\", resource) when { context.time_ms < 0 };\n");
    text
}

fn apply(
    state: &mut State,
    engine: &mut Engine,
    index: u64,
    mut command: pb::Command,
) -> Result<(), Failure> {
    command.time_ms = 1_000;
    let batch = pb::CommandBatch {
        commands: vec![command],
    };
    let mut overlay = Overlay::new(&*state);
    let results = apply_batch(&mut overlay, engine, &batch, index).map_err(|e| Failure(e.0))?;
    if let Some(pb::command_result::Outcome::Error(e)) = &results[0].outcome {
        return Err(Failure(format!(
            "setting up the benchmark state failed: {}: {}",
            e.field, e.message
        )));
    }
    for (k, v) in overlay.into_writes() {
        match v {
            Some(v) => state.insert(k, v),
            None => state.remove(&k),
        };
    }
    Ok(())
}

fn as_operator(kind: Kind) -> pb::Command {
    pb::Command {
        operator_token_id: "tok_bench".into(),
        kind: Some(kind),
        ..Default::default()
    }
}

pub fn run(iterations: u64, as_json: bool) -> Result<(), Failure> {
    let mut state = State::new();
    let mut engine = Engine::default();
    let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]);
    let x = URL_SAFE_NO_PAD.encode(key.verifying_key().as_bytes());
    let jwk = pb::Jwk {
        kid: "k".into(),
        kty: "OKP".into(),
        crv: "Ed25519".into(),
        x: x.clone(),
    };
    let mut index = 0;
    let mut next = || {
        index += 1;
        index
    };
    apply(
        &mut state,
        &mut engine,
        next(),
        pb::Command {
            kind: Some(Kind::BootstrapCluster(pb::BootstrapCluster {
                cluster_id: "bench".into(),
                root_token_id: "tok_bench".into(),
                root_secret_sha256: vec![0; 32],
                signing_key: Some(pb::SigningKey {
                    kid: "k".into(),
                    x,
                    sealed_private: vec![1],
                    ..Default::default()
                }),
            })),
            ..Default::default()
        },
    )?;
    apply(
        &mut state,
        &mut engine,
        next(),
        as_operator(Kind::PutPolicy(pb::PutPolicy {
            name: "bench".into(),
            text: policies(),
        })),
    )?;
    let ceiling = "permit(principal, action in [Action::\"read\", Action::\"list\"], resource in Resource::\"secret\");";
    for (i, name) in ["planner", "worker"].iter().enumerate() {
        apply(
            &mut state,
            &mut engine,
            next(),
            as_operator(Kind::RegisterAgent(pb::RegisterAgent {
                agent_id: format!("agt_{i:032x}"),
                name: (*name).into(),
                owner: "alice".into(),
                keys: vec![jwk.clone()],
                ceiling: ceiling.into(),
                labels: BTreeMap::from([("team".into(), "a".into())]),
                ..Default::default()
            })),
        )?;
    }
    let mut root = pb::Command {
        user: "alice".into(),
        kind: Some(Kind::CreateDelegation(pb::CreateDelegation {
            delegation_id: "dlg_root".into(),
            agent: format!("agt_{:032x}", 0),
            actions: vec!["read".into()],
            resources: vec!["secret/team-a/*".into()],
            ttl_ms: 3_600_000,
            may_redelegate: true,
            max_depth: 1,
            ..Default::default()
        })),
        ..Default::default()
    };
    apply(&mut state, &mut engine, next(), root.clone())?;
    root.user.clear();
    root.agent = format!("agt_{:032x}", 0);
    root.assertion_jti = "bench-jti".into();
    root.assertion_expires_ms = 60_000;
    root.kind = Some(Kind::CreateDelegation(pb::CreateDelegation {
        delegation_id: "dlg_sub".into(),
        parent_id: "dlg_root".into(),
        agent: format!("agt_{:032x}", 1),
        actions: vec!["read".into()],
        resources: vec!["secret/team-a/*".into()],
        ttl_ms: 1_800_000,
        ..Default::default()
    }));
    apply(&mut state, &mut engine, next(), root)?;

    let agent = state
        .agent(&format!("agt_{:032x}", 1))
        .map_err(|e| Failure(e.0))?
        .ok_or_else(|| Failure("benchmark agent missing".into()))?;
    let context = BTreeMap::from([("ticket".to_owned(), "INC-1".to_owned())]);
    let request = AuthorizeRequest {
        delegation_id: "dlg_sub",
        action: "read",
        resource: "secret/team-a/db-password",
        request_context: &context,
        approved: false,
    };
    let started = Instant::now();
    let mut allowed = 0u64;
    for _ in 0..iterations {
        let eval =
            evaluate(&state, &mut engine, &agent, &request, 2_000).map_err(|e| Failure(e.0))?;
        if eval.decision == pb::Decision::Allow {
            allowed += 1;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    if allowed != iterations {
        return Err(Failure(format!(
            "only {allowed} of {iterations} evaluations allowed"
        )));
    }
    let per_second = iterations as f64 / elapsed;
    if as_json {
        print(
            &json!({ "iterations": iterations, "seconds": elapsed, "evaluations_per_second": per_second, "chain_depth": 2, "policies": 21 }),
            true,
        );
    } else {
        println!("{iterations} evaluations (2-hop chain, ceiling, 21 policies) in {elapsed:.2} s: {per_second:.0}/s on one core");
    }
    Ok(())
}
