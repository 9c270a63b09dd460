//! A small, realistic decision world built through `apply` itself, for benchmarks (`mandate
//! bench evaluate`, the criterion benches): a cluster with 21 policies, two agents with
//! ceilings, and a two-hop delegation chain `dlg_root` (alice → agent 0) → `dlg_sub` (agent 0
//! → agent 1) over `secret/team-a/*`.

use std::collections::BTreeMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

use crate::apply::apply_batch;
use crate::authz::AuthorizeRequest;
use crate::pb::{self, command::Kind};
use crate::policy::Engine;
use crate::state::{Overlay, StateExt};

/// The seed of the one Ed25519 key of the world: every agent's key and the cluster's
/// token-signing key (`kid` "k").
pub const FIXTURE_KEY_SEED: [u8; 32] = [7; 32];

pub type State = BTreeMap<Vec<u8>, Vec<u8>>;

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

/// Applies `command` as log entry `index` at time 1,000 and writes its changes into `state`;
/// a refused command is an error naming why.
pub fn apply(
    state: &mut State,
    engine: &mut Engine,
    index: u64,
    command: pb::Command,
) -> Result<pb::CommandResult, String> {
    apply_at(state, engine, index, 1_000, command)
}

/// [`apply`] with the command's time at `time_ms` (apply never lets the clock go back).
pub fn apply_at(
    state: &mut State,
    engine: &mut Engine,
    index: u64,
    time_ms: u64,
    mut command: pb::Command,
) -> Result<pb::CommandResult, String> {
    command.time_ms = time_ms;
    let batch = pb::CommandBatch {
        commands: vec![command],
    };
    let mut overlay = Overlay::new(&*state);
    let mut results = apply_batch(&mut overlay, engine, &batch, index).map_err(|e| e.0)?;
    if let Some(pb::command_result::Outcome::Error(e)) = &results[0].outcome {
        return Err(format!("{}: {}", e.field, e.message));
    }
    for (k, v) in overlay.into_writes() {
        match v {
            Some(v) => state.insert(k, v),
            None => state.remove(&k),
        };
    }
    Ok(results.remove(0))
}

/// `kind` as a command of the fixture's root operator.
pub fn as_operator(kind: Kind) -> pb::Command {
    pb::Command {
        operator_token_id: "tok_bench".into(),
        kind: Some(kind),
        ..Default::default()
    }
}

/// The world: its state, a warmed engine, and the acting agent (agent 1, holder of `dlg_sub`).
pub fn decision_world() -> Result<(State, Engine, pb::Agent), String> {
    let mut state = State::new();
    let mut engine = Engine::default();
    let key = ed25519_dalek::SigningKey::from_bytes(&FIXTURE_KEY_SEED);
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
                apply_version: crate::version::APPLY_VERSION_MAX,
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
        .map_err(|e| e.0)?
        .ok_or("the fixture's agent is missing")?;
    Ok((state, engine, agent))
}

/// The context every fixture request carries.
pub fn request_context() -> BTreeMap<String, String> {
    BTreeMap::from([("ticket".to_owned(), "INC-1".to_owned())])
}

/// A request the world allows: agent 1 reads a secret under `dlg_sub`.
pub fn allowed_request(context: &BTreeMap<String, String>) -> AuthorizeRequest<'_> {
    AuthorizeRequest {
        delegation_id: "dlg_sub",
        action: "read",
        resource: "secret/team-a/db-password",
        request_context: context,
        approved: false,
    }
}
