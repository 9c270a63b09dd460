//! Property tests of the delegation algebra (invariant 4) and of revocation cascades
//! (invariant 3), through the real apply path.

use std::collections::{BTreeMap, BTreeSet};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use mandate_core::apply::apply_batch;
use mandate_core::authz::delegation_record;
use mandate_core::delegation::{attenuates, covers, matches, Bounds};
use mandate_core::pb::{self, command::Kind};
use mandate_core::policy::Engine;
use mandate_core::state::Overlay;
use proptest::prelude::*;

type State = BTreeMap<Vec<u8>, Vec<u8>>;

const SEGMENTS: &[&str] = &["a", "b", "c"];
const ACTIONS: &[&str] = &["read", "write", "delete", "list"];

fn pattern() -> impl Strategy<Value = String> {
    (
        proptest::collection::vec(0..SEGMENTS.len(), 1..4),
        any::<bool>(),
    )
        .prop_map(|(segs, wildcard)| {
            let path = segs
                .iter()
                .map(|i| SEGMENTS[*i])
                .collect::<Vec<_>>()
                .join("/");
            if wildcard {
                format!("{path}/*")
            } else {
                path
            }
        })
}

/// Every concrete path up to depth 4 over the segments.
fn universe() -> Vec<String> {
    let mut out: Vec<String> = SEGMENTS.iter().map(|s| (*s).to_owned()).collect();
    let mut frontier = out.clone();
    for _ in 1..4 {
        let next: Vec<String> = frontier
            .iter()
            .flat_map(|p| SEGMENTS.iter().map(move |s| format!("{p}/{s}")))
            .collect();
        out.extend(next.iter().cloned());
        frontier = next;
    }
    out
}

fn actions() -> impl Strategy<Value = Vec<String>> {
    proptest::sample::subsequence(ACTIONS, 1..=ACTIONS.len())
        .prop_map(|v| v.into_iter().map(str::to_owned).collect())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(500))]

    #[test]
    fn coverage_between_patterns_agrees_with_coverage_of_every_path(parent in pattern(), child in pattern()) {
        if covers(&parent, &child) {
            for path in universe() {
                prop_assert!(!matches(&child, &path) || matches(&parent, &path), "{parent} covers {child} but not {path}");
            }
        }
    }

    #[test]
    fn an_accepted_re_delegation_never_exceeds_its_parent(
        parent_actions in actions(), parent_resources in proptest::collection::vec(pattern(), 1..4),
        child_actions in actions(), child_resources in proptest::collection::vec(pattern(), 1..4),
        parent_uses in 0..6u64, used in 0..6u64, child_uses in 0..8u64,
        parent_depth in 0..4u32, child_depth in 0..4u32,
        parent_expiry in 1..100u64, child_expiry in 1..120u64,
        parent_approval in proptest::option::of(0..ACTIONS.len()), child_approval in proptest::option::of(0..ACTIONS.len()),
    ) {
        let parent = pb::Delegation {
            id: "dlg_parent".into(),
            actions: parent_actions.clone(),
            resources: parent_resources.clone(),
            max_uses: parent_uses,
            uses: used.min(parent_uses),
            may_redelegate: parent_depth > 0,
            max_depth: parent_depth,
            expires_ms: parent_expiry,
            approval_actions: parent_approval.map(|i| vec![ACTIONS[i].to_owned()]).unwrap_or_default(),
            ..Default::default()
        };
        let child_approval: Vec<String> = child_approval.map(|i| vec![ACTIONS[i].to_owned()]).unwrap_or_default();
        let bounds = Bounds {
            actions: &child_actions,
            resources: &child_resources,
            expires_ms: child_expiry,
            max_uses: child_uses,
            may_redelegate: child_depth > 0,
            max_depth: child_depth,
            approval_actions: &child_approval,
        };
        if attenuates(&parent, &bounds).is_ok() {
            prop_assert!(child_actions.iter().all(|a| parent_actions.contains(a)));
            for path in universe() {
                let child_allows = child_resources.iter().any(|p| matches(p, &path));
                let parent_allows = parent_resources.iter().any(|p| matches(p, &path));
                prop_assert!(!child_allows || parent_allows, "child reaches {path} beyond its parent");
            }
            prop_assert!(child_expiry <= parent_expiry);
            prop_assert!(child_depth < parent_depth);
            if parent_uses != 0 {
                prop_assert!(child_uses != 0 && child_uses <= parent_uses - parent.uses);
            }
            for a in &parent.approval_actions {
                prop_assert!(!child_actions.contains(a) || child_approval.contains(a));
            }
        }
    }
}

// ---- revocation cascades through the real apply path

fn agent_id(i: usize) -> String {
    format!("agt_{i:032x}")
}

fn apply(
    state: &mut State,
    engine: &mut Engine,
    index: u64,
    command: pb::Command,
) -> pb::CommandResult {
    let batch = pb::CommandBatch {
        commands: vec![command],
    };
    let mut overlay = Overlay::new(&*state);
    let mut results = apply_batch(&mut overlay, engine, &batch, index).expect("no storage fault");
    for (k, v) in overlay.into_writes() {
        match v {
            Some(v) => state.insert(k, v),
            None => state.remove(&k),
        };
    }
    results.remove(0)
}

fn ok(result: &pb::CommandResult) -> bool {
    matches!(
        result.outcome,
        Some(pb::command_result::Outcome::Applied(_))
    )
}

fn command(kind: Kind) -> pb::Command {
    pb::Command {
        time_ms: 1_000,
        kind: Some(kind),
        ..Default::default()
    }
}

/// A cluster with alice permitted everything and `agents` registered agents.
fn world(agents: usize) -> (State, Engine, u64) {
    let mut state = State::new();
    let mut engine = Engine::default();
    let public = ed25519_dalek::SigningKey::from_bytes(&[9; 32]).verifying_key();
    let boot = command(Kind::BootstrapCluster(pb::BootstrapCluster {
        cluster_id: "c".into(),
        root_token_id: "tok_root".into(),
        root_secret_sha256: vec![0; 32],
        signing_key: Some(pb::SigningKey {
            kid: "k1".into(),
            x: URL_SAFE_NO_PAD.encode(public.as_bytes()),
            sealed_private: vec![1],
            ..Default::default()
        }),
        apply_version: mandate_core::version::APPLY_VERSION_MAX,
    }));
    assert!(ok(&apply(&mut state, &mut engine, 1, boot)));
    let mut index = 2;
    let mut policy = command(Kind::PutPolicy(pb::PutPolicy {
        name: "all".into(),
        text: "permit(principal, action, resource);".into(),
    }));
    policy.operator_token_id = "tok_root".into();
    assert!(ok(&apply(&mut state, &mut engine, index, policy)));
    for i in 0..agents {
        index += 1;
        let mut register = command(Kind::RegisterAgent(pb::RegisterAgent {
            agent_id: agent_id(i),
            name: format!("agent-{i}"),
            owner: "alice".into(),
            keys: vec![pb::Jwk {
                kid: "k".into(),
                kty: "OKP".into(),
                crv: "Ed25519".into(),
                x: URL_SAFE_NO_PAD.encode(public.as_bytes()),
            }],
            ..Default::default()
        }));
        register.operator_token_id = "tok_root".into();
        assert!(ok(&apply(&mut state, &mut engine, index, register)));
    }
    (state, engine, index)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn revoking_a_delegation_revokes_every_descendant_and_nothing_else(
        parents in proptest::collection::vec(any::<prop::sample::Index>(), 1..10),
        victim in any::<prop::sample::Index>(),
    ) {
        let agents = parents.len() + 1;
        let (mut state, mut engine, mut index) = world(agents);
        // Node 0: alice → agent 0. Node i: re-delegated by the holder of parent[i] to agent i.
        let mut ids = Vec::new();
        let mut parent_of: Vec<Option<usize>> = Vec::new();
        index += 1;
        let mut root = command(Kind::CreateDelegation(pb::CreateDelegation {
            delegation_id: "dlg_0".into(),
            agent: agent_id(0),
            actions: vec!["read".into()],
            resources: vec!["x/*".into()],
            ttl_ms: 1_000_000,
            may_redelegate: true,
            max_depth: 7,
            ..Default::default()
        }));
        root.user = "alice".into();
        prop_assert!(ok(&apply(&mut state, &mut engine, index, root)));
        ids.push("dlg_0".to_owned());
        parent_of.push(None);
        for (n, pick) in parents.iter().enumerate() {
            let child = n + 1;
            let parent = pick.index(ids.len());
            let holder = delegation_record(&state, &ids[parent]).expect("read").expect("exists");
            let depth_left = holder.max_depth;
            if depth_left == 0 || holder.chain.contains(&agent_id(child)) {
                continue;
            }
            index += 1;
            let id = format!("dlg_{child}");
            let mut sub = command(Kind::CreateDelegation(pb::CreateDelegation {
                delegation_id: id.clone(),
                parent_id: ids[parent].clone(),
                agent: agent_id(child),
                actions: vec!["read".into()],
                resources: vec!["x/*".into()],
                ttl_ms: 1_000_000 - child as u64,
                may_redelegate: depth_left > 1,
                max_depth: depth_left - 1,
                ..Default::default()
            }));
            sub.agent = holder.agent.clone();
            sub.assertion_jti = format!("jti-{child}");
            sub.assertion_expires_ms = 60_000;
            let result = apply(&mut state, &mut engine, index, sub);
            prop_assert!(ok(&result), "{result:?}");
            ids.push(id);
            parent_of.push(Some(parent));
        }
        let victim = victim.index(ids.len());
        index += 1;
        let mut revoke = command(Kind::RevokeDelegation(pb::RevokeDelegation { delegation_id: ids[victim].clone() }));
        revoke.user = "alice".into();
        prop_assert!(ok(&apply(&mut state, &mut engine, index, revoke)));

        let descends = |mut n: usize| loop {
            if n == victim { return true; }
            match parent_of[n] { Some(p) => n = p, None => return false }
        };
        let revoked: BTreeSet<usize> = (0..ids.len())
            .filter(|n| delegation_record(&state, &ids[*n]).expect("read").expect("exists").status == pb::DelegationStatus::Revoked as i32)
            .collect();
        let expected: BTreeSet<usize> = (0..ids.len()).filter(|n| descends(*n)).collect();
        prop_assert_eq!(revoked, expected);
    }
}
