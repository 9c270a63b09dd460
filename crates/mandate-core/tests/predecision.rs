//! The verdict a receiving node makes before an authorization enters the log: apply takes it
//! only while everything it was made from is unchanged, and otherwise decides afresh.

use mandate_core::authz::{self, AuthorizeRequest};
use mandate_core::fixture::{self, allowed_request, as_operator, decision_world, State};
use mandate_core::pb::{self, command::Kind, event::Kind as EventKind};
use mandate_core::policy::Engine;

const WORKER: &str = "agt_00000000000000000000000000000001";
const PLANNER: &str = "agt_00000000000000000000000000000000";

/// The fixture's policies without the one that reads `context.time_ms`.
const TIMELESS_POLICIES: &str = r#"
@id("alice")
permit(principal == User::"alice", action == Action::"read", resource in Resource::"secret/team-a");
@id("agents")
permit(principal is Agent, action, resource in Resource::"secret") when { context.delegation.depth <= 2 };
"#;

struct World {
    state: State,
    engine: Engine,
    index: u64,
}

impl World {
    fn new(policies: &str) -> World {
        let (state, engine, _) = decision_world().expect("the fixture builds");
        let mut world = World {
            state,
            engine,
            index: 100,
        };
        world.put_policy("bench", policies);
        world
    }

    fn apply(&mut self, command: pb::Command) -> pb::CommandResult {
        self.index += 1;
        fixture::apply(&mut self.state, &mut self.engine, self.index, command)
            .expect("the command applies")
    }

    fn put_policy(&mut self, name: &str, text: &str) {
        self.apply(as_operator(Kind::PutPolicy(pb::PutPolicy {
            name: name.into(),
            text: text.into(),
        })));
    }

    fn agent(&self, id: &str) -> pb::Agent {
        use mandate_core::state::StateExt;
        self.state
            .agent(id)
            .expect("the state reads")
            .expect("the agent exists")
    }

    /// What a receiving node would hand to apply, decided on this state with its own engine.
    fn predecide(&self) -> Option<pb::Predecision> {
        let context = fixture::request_context();
        let request: AuthorizeRequest<'_> = allowed_request(&context);
        authz::predecide(
            &self.state,
            &mut Engine::default(),
            &self.agent(WORKER),
            &request,
            1_000,
        )
        .expect("the state reads")
    }

    /// Applies the worker's authorization carrying `predecision`.
    fn authorize(&mut self, predecision: Option<pb::Predecision>) -> pb::AuthorizationDecided {
        let n = self.index;
        let result = self.apply(pb::Command {
            agent: WORKER.into(),
            kind: Some(Kind::Authorize(pb::Authorize {
                delegation_id: "dlg_sub".into(),
                action: "read".into(),
                resource: "secret/team-a/db-password".into(),
                request_context: fixture::request_context(),
                assertion_kid: "k".into(),
                assertion_jti: format!("jti-{n}"),
                assertion_expires_ms: 60_000,
                grant_id: format!("grt_{n}"),
                approval_id: format!("apv_{n}"),
                predecision,
                ..Default::default()
            })),
            ..Default::default()
        });
        let Some(pb::command_result::Outcome::Applied(applied)) = result.outcome else {
            panic!("an authorization is always applied, allowed or not: {result:?}");
        };
        applied
            .events
            .into_iter()
            .find_map(|e| match e.kind {
                Some(EventKind::AuthorizationDecided(d)) => Some(d),
                _ => None,
            })
            .expect("an authorization records its decision")
    }
}

fn forged(mut p: pb::Predecision) -> pb::Predecision {
    p.permitted = false;
    p.reasons = vec!["the receiving node said no".into()];
    p.policy_ids = vec![];
    p
}

#[test]
fn apply_takes_the_receiving_nodes_verdict_when_nothing_it_was_made_from_changed() {
    let mut world = World::new(TIMELESS_POLICIES);
    let predecision = world
        .predecide()
        .expect("timeless policies are decided ahead");
    assert!(predecision.permitted);
    assert_eq!(predecision.policy_ids, vec!["bench:agents", "bench:alice"]);
    let allowed = world.authorize(Some(predecision.clone()));
    assert_eq!(allowed.decision, pb::Decision::Allow as i32);
    assert_eq!(allowed.policy_ids, vec!["bench:agents", "bench:alice"]);
    // A verdict that differs from the policies' shows that apply took it rather than asking
    // them again.
    let denied = world.authorize(Some(forged(predecision)));
    assert_eq!(denied.decision, pb::Decision::Deny as i32);
    assert_eq!(denied.reasons, vec!["the receiving node said no"]);
}

#[test]
fn a_policy_change_after_the_verdict_makes_apply_ask_the_policies_again() {
    let mut world = World::new(TIMELESS_POLICIES);
    let predecision = world.predecide().expect("decided ahead");
    world.put_policy(
        "freeze",
        "@id(\"freeze\")\nforbid(principal is Agent, action, resource in Resource::\"secret/team-a\");",
    );
    let decided = world.authorize(Some(predecision.clone()));
    assert_eq!(decided.decision, pb::Decision::Deny as i32);
    assert_eq!(decided.policy_ids, vec!["freeze:freeze"]);
    // A forged verdict from before the change is not taken either.
    let decided = world.authorize(Some(forged(predecision)));
    assert_eq!(decided.policy_ids, vec!["freeze:freeze"]);
}

#[test]
fn a_delegation_revoked_after_the_verdict_denies_the_authorization() {
    let mut world = World::new(TIMELESS_POLICIES);
    let predecision = world.predecide().expect("decided ahead");
    assert!(predecision.permitted);
    world.apply(pb::Command {
        user: "alice".into(),
        kind: Some(Kind::RevokeDelegation(pb::RevokeDelegation {
            delegation_id: "dlg_root".into(),
        })),
        ..Default::default()
    });
    let decided = world.authorize(Some(predecision));
    assert_eq!(decided.decision, pb::Decision::Deny as i32);
    assert!(decided.grant.is_none());
    assert!(
        decided.reasons.iter().any(|r| r.contains("was revoked")),
        "{:?}",
        decided.reasons
    );
}

#[test]
fn a_chain_agent_changed_after_the_verdict_makes_apply_ask_the_policies_again() {
    let mut world = World::new(TIMELESS_POLICIES);
    let predecision = world.predecide().expect("decided ahead");
    world.apply(as_operator(Kind::UpdateAgent(pb::UpdateAgent {
        agent_id: PLANNER.into(),
        model: Some("a newer model".into()),
        ..Default::default()
    })));
    let decided = world.authorize(Some(forged(predecision)));
    assert_eq!(decided.decision, pb::Decision::Allow as i32);
    assert_eq!(decided.policy_ids, vec!["bench:agents", "bench:alice"]);
}

#[test]
fn policies_that_read_the_decision_time_are_not_decided_ahead() {
    // The fixture's own policies include one that reads `context.time_ms`.
    let (state, _, agent) = decision_world().expect("the fixture builds");
    let context = fixture::request_context();
    let ahead = authz::predecide(
        &state,
        &mut Engine::default(),
        &agent,
        &allowed_request(&context),
        1_000,
    )
    .expect("the state reads");
    assert_eq!(ahead, None);
    // Nor when the attribute is named through an escape.
    let mut world = World::new(TIMELESS_POLICIES);
    world.put_policy(
        "clock",
        "@id(\"clock\")\nforbid(principal, action, resource) when { context[\"time\\u{5f}ms\"] < 0 };",
    );
    assert_eq!(world.predecide(), None);
    assert_eq!(
        world.authorize(None).decision,
        pb::Decision::Allow as i32,
        "the clock policy forbids nothing at time 1,000"
    );
}

#[test]
fn a_request_the_chain_already_refuses_is_left_to_apply() {
    let mut world = World::new(TIMELESS_POLICIES);
    world.apply(pb::Command {
        user: "alice".into(),
        kind: Some(Kind::RevokeDelegation(pb::RevokeDelegation {
            delegation_id: "dlg_root".into(),
        })),
        ..Default::default()
    });
    assert_eq!(world.predecide(), None);
}
