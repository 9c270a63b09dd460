//! Property tests of determinism (invariant 7): random command sequences, applied batch by batch,
//! give exactly the state that replaying their events gives, and exactly the state that a
//! snapshot taken midway plus the remaining log gives.

use std::collections::BTreeMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use mandate_core::apply::{apply_batch, replay_event};
use mandate_core::pb::{self, command::Kind};
use mandate_core::policy::Engine as PolicyEngine;
use mandate_core::state::{decode, Overlay};
use mandate_core::{audit, keys, version};
use proptest::prelude::*;

type State = BTreeMap<Vec<u8>, Vec<u8>>;

const ROOT: &str = "tok_root";

fn agent_id(i: u8) -> String {
    format!("agt_{:032x}", i)
}

fn key(seed: u8) -> pb::Jwk {
    let public = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]).verifying_key();
    pb::Jwk {
        kid: format!("k{seed}"),
        kty: "OKP".into(),
        crv: "Ed25519".into(),
        x: URL_SAFE_NO_PAD.encode(public.as_bytes()),
    }
}

#[derive(Debug, Clone)]
enum Op {
    Register {
        id: u8,
        name: u8,
        owner: u8,
        key: u8,
    },
    Update {
        id: u8,
        description: u8,
        label: Option<u8>,
    },
    Status {
        id: u8,
        status: i32,
    },
    AddKey {
        id: u8,
        key: u8,
    },
    RemoveKey {
        id: u8,
        key: u8,
    },
    CreateToken {
        n: u8,
    },
    RevokeToken {
        n: u8,
    },
    Delegate {
        agent: u8,
        actions: u8,
        approval: bool,
        ttl: u64,
        depth: u8,
    },
    SubDelegate {
        parent: u8,
        agent: u8,
        ttl: u64,
    },
    Authorize {
        agent: u8,
        sub: bool,
        action: u8,
        uses: u8,
    },
    RevokeDelegation {
        agent: u8,
        sub: bool,
    },
    Consume {
        grant: u8,
    },
    Decide {
        approval: u8,
        approve: bool,
    },
    Expire,
    RaiseApplyVersion {
        version: u32,
    },
}

const ACTIONS: [&str; 3] = ["read", "write", "delete"];

fn actions_of(mask: u8) -> Vec<String> {
    let picked: Vec<String> = (0..3)
        .filter(|i| mask & (1 << i) != 0)
        .map(|i| ACTIONS[i].to_owned())
        .collect();
    if picked.is_empty() {
        vec!["read".into()]
    } else {
        picked
    }
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..12u8, 0..8u8, 0..3u8, 0..4u8).prop_map(|(id, name, owner, key)| Op::Register {
            id,
            name,
            owner,
            key
        }),
        (0..12u8, 0..3u8, proptest::option::of(0..3u8)).prop_map(|(id, description, label)| {
            Op::Update {
                id,
                description,
                label,
            }
        }),
        (0..12u8, 0..5i32).prop_map(|(id, status)| Op::Status { id, status }),
        (0..12u8, 0..12u8).prop_map(|(id, key)| Op::AddKey { id, key }),
        (0..12u8, 0..12u8).prop_map(|(id, key)| Op::RemoveKey { id, key }),
        (0..4u8).prop_map(|n| Op::CreateToken { n }),
        (0..4u8).prop_map(|n| Op::RevokeToken { n }),
        (0..4u8, 0..8u8, any::<bool>(), 1..100_000u64, 0..3u8).prop_map(
            |(agent, actions, approval, ttl, depth)| Op::Delegate {
                agent,
                actions,
                approval,
                ttl,
                depth
            }
        ),
        (0..4u8, 0..4u8, 1..100_000u64).prop_map(|(parent, agent, ttl)| Op::SubDelegate {
            parent,
            agent,
            ttl
        }),
        (0..4u8, any::<bool>(), 0..3u8, 0..3u8).prop_map(|(agent, sub, action, uses)| {
            Op::Authorize {
                agent,
                sub,
                action,
                uses,
            }
        }),
        (0..4u8, any::<bool>()).prop_map(|(agent, sub)| Op::RevokeDelegation { agent, sub }),
        (0..120u8).prop_map(|grant| Op::Consume { grant }),
        (0..120u8, any::<bool>()).prop_map(|(approval, approve)| Op::Decide { approval, approve }),
        Just(Op::Expire),
        (version::APPLY_VERSION_FIRST..=version::APPLY_VERSION_MAX)
            .prop_map(|version| Op::RaiseApplyVersion { version }),
    ]
}

fn command(op: &Op, actor: &str, time_ms: u64, n: usize) -> pb::Command {
    let mut principal_user = String::new();
    let mut principal_agent = String::new();
    let kind = match op.clone() {
        Op::Delegate {
            agent,
            actions,
            approval,
            ttl,
            depth,
        } => {
            principal_user = "alice".into();
            let actions = actions_of(actions);
            Kind::CreateDelegation(pb::CreateDelegation {
                delegation_id: format!("dlg_{agent}"),
                agent: agent_id(agent),
                approval_actions: if approval {
                    vec![actions[0].clone()]
                } else {
                    vec![]
                },
                actions,
                resources: vec!["secret/x/*".into()],
                ttl_ms: ttl,
                may_redelegate: depth > 0,
                max_depth: u32::from(depth),
                max_uses: 3,
                ..Default::default()
            })
        }
        Op::SubDelegate { parent, agent, ttl } => {
            principal_agent = agent_id(parent);
            Kind::CreateDelegation(pb::CreateDelegation {
                delegation_id: format!("dlg_s{agent}"),
                parent_id: format!("dlg_{parent}"),
                agent: agent_id(agent),
                actions: vec!["read".into()],
                resources: vec!["secret/x/y".into()],
                ttl_ms: ttl,
                max_uses: 1,
                ..Default::default()
            })
        }
        Op::Authorize {
            agent,
            sub,
            action,
            uses,
        } => {
            principal_agent = agent_id(agent);
            Kind::Authorize(pb::Authorize {
                delegation_id: if sub {
                    format!("dlg_s{agent}")
                } else {
                    format!("dlg_{agent}")
                },
                action: ACTIONS[action as usize].into(),
                resource: "secret/x/y".into(),
                ttl_ms: 300,
                uses: u32::from(uses),
                assertion_kid: "k0".into(),
                assertion_jti: format!("jti-{n}"),
                assertion_expires_ms: time_ms + 60_000,
                grant_id: format!("grt_{n}"),
                approval_id: format!("apv_{n}"),
                ..Default::default()
            })
        }
        Op::RevokeDelegation { agent, sub } => {
            principal_user = "alice".into();
            let delegation_id = if sub {
                format!("dlg_s{agent}")
            } else {
                format!("dlg_{agent}")
            };
            Kind::RevokeDelegation(pb::RevokeDelegation { delegation_id })
        }
        Op::Consume { grant } => Kind::ConsumeGrant(pb::ConsumeGrant {
            grant_id: format!("grt_{grant}"),
            ..Default::default()
        }),
        Op::Decide { approval, approve } => {
            principal_user = "alice".into();
            Kind::DecideApproval(pb::DecideApproval {
                approval_id: format!("apv_{approval}"),
                approve,
                grant_id: format!("grt_a{n}"),
            })
        }
        Op::Expire => Kind::ExpireGrants(pb::ExpireGrants {}),
        Op::RaiseApplyVersion { version } => {
            Kind::RaiseApplyVersion(pb::RaiseApplyVersion { version })
        }
        Op::Register {
            id,
            name,
            owner,
            key: k,
        } => Kind::RegisterAgent(pb::RegisterAgent {
            agent_id: agent_id(id),
            name: format!("bot-{name}"),
            owner: format!("user-{owner}"),
            keys: (0..k).map(key).collect(),
            ceiling: if name % 3 == 0 {
                "permit(principal, action == Action::\"read\", resource);".into()
            } else {
                String::new()
            },
            labels: BTreeMap::from([("team".into(), format!("t{}", name % 2))]),
            ..Default::default()
        }),
        Op::Update {
            id,
            description,
            label,
        } => Kind::UpdateAgent(pb::UpdateAgent {
            agent_id: agent_id(id),
            description: Some(format!("does things #{description}")),
            labels: label.map(|l| pb::LabelSet {
                labels: BTreeMap::from([("tier".into(), format!("{l}"))]),
            }),
            ..Default::default()
        }),
        Op::Status { id, status } => Kind::SetAgentStatus(pb::SetAgentStatus {
            agent_id: agent_id(id),
            status,
        }),
        Op::AddKey { id, key: k } => Kind::AddAgentKey(pb::AddAgentKey {
            agent_id: agent_id(id),
            key: Some(key(k)),
        }),
        Op::RemoveKey { id, key: k } => Kind::RemoveAgentKey(pb::RemoveAgentKey {
            agent_id: agent_id(id),
            kid: format!("k{k}"),
        }),
        Op::CreateToken { n } => Kind::CreateOperatorToken(pb::CreateOperatorToken {
            token_id: format!("tok_{n}"),
            name: format!("ops-{n}"),
            secret_sha256: vec![n; 32],
        }),
        Op::RevokeToken { n } => Kind::RevokeOperatorToken(pb::RevokeOperatorToken {
            token_id: format!("tok_{n}"),
        }),
    };
    let operator = if principal_user.is_empty()
        && principal_agent.is_empty()
        && !matches!(
            op,
            Op::Consume { .. } | Op::Expire | Op::RaiseApplyVersion { .. }
        ) {
        actor.to_owned()
    } else {
        String::new()
    };
    let assertion_jti = if principal_agent.is_empty() {
        String::new()
    } else {
        format!("jti-c{n}")
    };
    pb::Command {
        request_id: format!("req-{n}"),
        time_ms,
        operator_token_id: operator,
        user: principal_user,
        agent: principal_agent,
        assertion_jti,
        assertion_expires_ms: time_ms + 60_000,
        serving_node: u64::from(n as u8 % 3) + 1,
        kind: Some(kind),
        ..Default::default()
    }
}

fn bootstrap() -> pb::CommandBatch {
    pb::CommandBatch {
        commands: vec![pb::Command {
            request_id: "req-boot".into(),
            time_ms: 1_000,
            kind: Some(Kind::BootstrapCluster(pb::BootstrapCluster {
                cluster_id: "c1".into(),
                root_token_id: ROOT.into(),
                root_secret_sha256: vec![0; 32],
                signing_key: Some(pb::SigningKey { kid: "sk".into(), x: key(1).x, sealed_private: vec![1], ..Default::default() }),
                // The log starts at the first apply version, so the ops raise it part way.
                apply_version: version::APPLY_VERSION_FIRST,
            })),
            ..Default::default()
        }, pb::Command {
            request_id: "req-policy".into(),
            time_ms: 1_000,
            operator_token_id: ROOT.into(),
            kind: Some(Kind::PutPolicy(pb::PutPolicy {
                name: "all".into(),
                text: "permit(principal, action, resource) when { context.delegation.depth <= 1 };".into(),
            })),
            ..Default::default()
        }],
    }
}

/// The log: a bootstrap entry, then the ops cut into batches, each stamped by a "leader" whose
/// clock may step backwards, with commands issued by the root, an operator token or a stranger.
fn log_of(ops: &[(Op, u8, u64)], batch_len: usize) -> Vec<pb::CommandBatch> {
    // Agents 0-3 exist from the start (with key k0), so the authorization ops often apply.
    let agents = (0..4u8)
        .map(|i| {
            command(
                &Op::Register {
                    id: i,
                    name: 20 + i,
                    owner: 0,
                    key: 1,
                },
                ROOT,
                1_000,
                9_000 + usize::from(i),
            )
        })
        .collect();
    let mut log = vec![bootstrap(), pb::CommandBatch { commands: agents }];
    for (i, chunk) in ops.chunks(batch_len.max(1)).enumerate() {
        let commands = chunk
            .iter()
            .enumerate()
            .map(|(j, (op, who, time))| {
                let actor = match who {
                    0 | 1 => ROOT.to_owned(),
                    2 => "tok_1".to_owned(),
                    _ => "tok_missing".to_owned(),
                };
                command(op, &actor, 1_000 + time, i * batch_len.max(1) + j)
            })
            .collect();
        log.push(pb::CommandBatch { commands });
    }
    log
}

fn apply_entry(state: &mut State, batch: &pb::CommandBatch, index: u64) -> Vec<pb::CommandResult> {
    let mut overlay = Overlay::new(&*state);
    let results = apply_batch(&mut overlay, &mut PolicyEngine::default(), batch, index)
        .expect("no storage fault in memory");
    let writes = overlay.into_writes();
    for (k, v) in writes {
        match v {
            Some(v) => state.insert(k, v),
            None => state.remove(&k),
        };
    }
    results
}

/// Applies `log` and returns every command's result, in log order.
fn apply_log(
    state: &mut State,
    log: &[pb::CommandBatch],
    first_index: u64,
) -> Vec<pb::CommandResult> {
    log.iter()
        .enumerate()
        .flat_map(|(i, batch)| apply_entry(state, batch, first_index + i as u64))
        .collect()
}

/// The events of the applied commands, each with its command's effective time.
fn applied_events(results: &[pb::CommandResult]) -> Vec<(u64, &pb::event::Kind)> {
    results
        .iter()
        .filter_map(|r| match &r.outcome {
            Some(pb::command_result::Outcome::Applied(a)) => Some(a),
            _ => None,
        })
        .flat_map(|a| {
            a.events
                .iter()
                .filter_map(move |e| e.kind.as_ref().map(|k| (a.time_ms, k)))
        })
        .collect()
}

fn rebuild_from_events(results: &[pb::CommandResult]) -> State {
    let mut rebuilt = State::new();
    for (time_ms, kind) in applied_events(results) {
        let mut overlay = Overlay::new(&rebuilt);
        replay_event(&mut overlay, kind, time_ms).expect("replay");
        let writes = overlay.into_writes();
        for (k, v) in writes {
            match v {
                Some(v) => rebuilt.insert(k, v),
                None => rebuilt.remove(&k),
            };
        }
    }
    rebuilt
}

/// The state without the audit trail, which events do not rebuild.
fn without_audit(state: &State) -> State {
    state
        .iter()
        .filter(|(k, _)| !k.starts_with(keys::AUDIT_PREFIX) && k.as_slice() != keys::AUDIT_HEAD)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn ops() -> impl Strategy<Value = Vec<(Op, u8, u64)>> {
    proptest::collection::vec((op(), 0..4u8, 0..500u64), 1..120)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn replaying_the_events_rebuilds_the_identical_state(ops in ops(), batch_len in 1..9usize) {
        let mut state = State::new();
        let results = apply_log(&mut state, &log_of(&ops, batch_len), 1);
        prop_assert_eq!(rebuild_from_events(&results), without_audit(&state));
    }

    #[test]
    fn every_command_leaves_one_audit_record_and_the_chain_verifies(
        ops in ops(), batch_len in 1..9usize,
    ) {
        let log = log_of(&ops, batch_len);
        let mut state = State::new();
        apply_log(&mut state, &log, 1);
        let commands: usize = log.iter().map(|b| b.commands.len()).sum();
        let mut prev: Option<Vec<u8>> = None;
        let mut records = 0;
        for (key, value) in state.range(keys::AUDIT_PREFIX.to_vec()..) {
            if !key.starts_with(keys::AUDIT_PREFIX) {
                break;
            }
            let record: pb::AuditRecord = decode(key, value).expect("audit records decode");
            prop_assert!(audit::check(&record, prev.as_deref()).is_ok(), "chain broken at {}.{}", record.log_index, record.sequence);
            prev = Some(record.hash);
            records += 1;
        }
        prop_assert_eq!(records, commands);
    }

    #[test]
    fn a_snapshot_plus_the_log_tail_gives_the_identical_state(
        ops in ops(), batch_len in 1..9usize, cut_permille in 0..1000usize,
    ) {
        let log = log_of(&ops, batch_len);
        let mut whole = State::new();
        apply_log(&mut whole, &log, 1);

        let cut = log.len() * cut_permille / 1000;
        let mut snapshot = State::new();
        apply_log(&mut snapshot, &log[..cut], 1);
        let mut restored = snapshot.clone();
        apply_log(&mut restored, &log[cut..], 1 + cut as u64);
        prop_assert_eq!(restored, whole);
    }

    #[test]
    fn applying_the_same_log_twice_gives_the_same_results_and_state(
        ops in ops(), batch_len in 1..9usize,
    ) {
        let log = log_of(&ops, batch_len);
        let run = || {
            let mut state = State::new();
            let results: Vec<_> = log
                .iter()
                .enumerate()
                .map(|(i, b)| apply_entry(&mut state, b, 1 + i as u64))
                .collect();
            (state, results)
        };
        prop_assert_eq!(run(), run());
    }

    #[test]
    fn registry_invariants_hold_after_any_sequence(ops in ops(), batch_len in 1..9usize) {
        let mut state = State::new();
        let results = apply_log(&mut state, &log_of(&ops, batch_len), 1);
        let mut last_clock = 0;
        for (time_ms, _) in applied_events(&results) {
            prop_assert!(time_ms >= last_clock, "command time went backwards");
            last_clock = time_ms;
        }
        let mut names = BTreeMap::new();
        for (key, value) in &state {
            if key.starts_with(keys::AGENT_PREFIX) {
                let agent: pb::Agent = decode(key, value).expect("agent decodes");
                prop_assert!(names.insert(agent.name.clone(), agent.id.clone()).is_none());
                prop_assert!(agent.keys.len() <= mandate_core::limits::KEYS_PER_AGENT_MAX);
                prop_assert!(agent.updated_ms >= agent.created_ms);
                let indexed = state.get(&keys::agent_name(&agent.name)).expect("name indexed");
                prop_assert_eq!(indexed.as_slice(), agent.id.as_bytes());
            }
        }
    }
}

#[test]
fn a_command_with_a_revoked_token_is_refused_at_apply() {
    let mut state = State::new();
    apply_entry(&mut state, &bootstrap(), 1);
    let create = command(&Op::CreateToken { n: 1 }, ROOT, 2_000, 1);
    let revoke = command(&Op::RevokeToken { n: 1 }, ROOT, 2_000, 2);
    let register = command(
        &Op::Register {
            id: 1,
            name: 1,
            owner: 1,
            key: 1,
        },
        "tok_1",
        2_000,
        3,
    );
    let results = apply_entry(
        &mut state,
        &pb::CommandBatch {
            commands: vec![create, revoke, register],
        },
        2,
    );
    let Some(pb::command_result::Outcome::Error(e)) = &results[2].outcome else {
        panic!("registration with a revoked token was applied: {results:?}");
    };
    assert_eq!(e.code, pb::ErrorCode::Unauthenticated as i32);
    assert!(!state.contains_key(&keys::agent(&agent_id(1))));
}

#[test]
fn a_refused_command_writes_nothing_and_its_batch_neighbours_still_apply() {
    let mut state = State::new();
    apply_entry(&mut state, &bootstrap(), 1);
    let first = command(
        &Op::Register {
            id: 1,
            name: 1,
            owner: 0,
            key: 1,
        },
        ROOT,
        2_000,
        1,
    );
    let duplicate = command(
        &Op::Register {
            id: 2,
            name: 1,
            owner: 0,
            key: 0,
        },
        ROOT,
        2_000,
        2,
    );
    let other = command(
        &Op::Register {
            id: 3,
            name: 3,
            owner: 0,
            key: 0,
        },
        ROOT,
        2_000,
        3,
    );
    let before = state.len();
    let results = apply_entry(
        &mut state,
        &pb::CommandBatch {
            commands: vec![first, duplicate, other],
        },
        2,
    );
    let Some(pb::command_result::Outcome::Error(e)) = &results[1].outcome else {
        panic!("duplicate name was applied");
    };
    assert_eq!(
        (e.code, e.field.as_str()),
        (pb::ErrorCode::AlreadyExists as i32, "name")
    );
    assert!(matches!(
        results[2].outcome,
        Some(pb::command_result::Outcome::Applied(_))
    ));
    assert!(!state.contains_key(&keys::agent(&agent_id(2))));
    // Two agents: record and name index each; an audit record for each of the three
    // commands; the clock and the audit head move forward in place.
    assert_eq!(state.len(), before + 2 * 2 + 3);
    assert_eq!(
        state.get(keys::CLOCK),
        Some(&2_000u64.to_be_bytes().to_vec())
    );
}

#[test]
fn a_retired_agent_cannot_be_resumed_or_edited() {
    let mut state = State::new();
    apply_entry(&mut state, &bootstrap(), 1);
    let register = command(
        &Op::Register {
            id: 1,
            name: 1,
            owner: 0,
            key: 1,
        },
        ROOT,
        2_000,
        1,
    );
    let retire = command(&Op::Status { id: 1, status: 3 }, ROOT, 2_000, 2);
    let resume = command(&Op::Status { id: 1, status: 1 }, ROOT, 2_000, 3);
    let update = command(
        &Op::Update {
            id: 1,
            description: 1,
            label: None,
        },
        ROOT,
        2_000,
        4,
    );
    let results = apply_entry(
        &mut state,
        &pb::CommandBatch {
            commands: vec![register, retire, resume, update],
        },
        2,
    );
    for refused in &results[2..] {
        let Some(pb::command_result::Outcome::Error(e)) = &refused.outcome else {
            panic!("retired agent changed: {refused:?}");
        };
        assert_eq!(e.field, "status");
    }
}
