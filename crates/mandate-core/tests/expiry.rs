//! Expiry of grants and replay-cache entries: each expiry index keeps a floor below which it
//! holds nothing, so its scans start past the entries already purged (in the LSM tree, their
//! tombstones) and stop at the first entry not yet due.

use std::cell::RefCell;

use mandate_core::authz::{self, EXPIRE_BATCH_MAX};
use mandate_core::fixture::{self, as_operator, decision_world, State};
use mandate_core::pb::{self, command::Kind, event::Kind as EventKind};
use mandate_core::policy::Engine;
use mandate_core::state::{KeyValue, StateExt, StateRead};
use mandate_core::version::{self, APPLY_VERSION_FIRST, APPLY_VERSION_MAX};
use mandate_core::{keys, StorageFault};
use prost::Message;

const WORKER: &str = "agt_00000000000000000000000000000001";
/// The fixture's own re-delegation used an assertion good until 60,000: its replay-cache entry
/// outlives every test here.
const FIXTURE_ASSERTIONS: usize = 1;

struct World {
    state: State,
    engine: Engine,
    index: u64,
}

impl World {
    fn new() -> World {
        let (state, engine, _) = decision_world().expect("the fixture builds");
        World {
            state,
            engine,
            index: 100,
        }
    }

    fn apply_at(&mut self, time_ms: u64, command: pb::Command) -> Vec<EventKind> {
        self.index += 1;
        let result = fixture::apply_at(
            &mut self.state,
            &mut self.engine,
            self.index,
            time_ms,
            command,
        )
        .expect("the command applies");
        let Some(pb::command_result::Outcome::Applied(applied)) = result.outcome else {
            panic!("the command was not applied: {result:?}");
        };
        applied.events.into_iter().filter_map(|e| e.kind).collect()
    }

    /// The worker's allowed read at `time_ms`: a grant living `ttl_ms`, and an assertion (its
    /// replay-cache entry) expiring at `assertion_expires_ms`.
    fn authorize(&mut self, time_ms: u64, ttl_ms: u64, assertion_expires_ms: u64) -> String {
        let n = self.index;
        let events = self.apply_at(
            time_ms,
            pb::Command {
                agent: WORKER.into(),
                kind: Some(Kind::Authorize(pb::Authorize {
                    delegation_id: "dlg_sub".into(),
                    action: "read".into(),
                    resource: "secret/team-a/db-password".into(),
                    request_context: fixture::request_context(),
                    ttl_ms,
                    assertion_kid: "k".into(),
                    assertion_jti: format!("jti-{n}"),
                    assertion_expires_ms,
                    grant_id: format!("grt_{n}"),
                    approval_id: format!("apv_{n}"),
                    ..Default::default()
                })),
                ..Default::default()
            },
        );
        let decided = events
            .into_iter()
            .find_map(|e| match e {
                EventKind::AuthorizationDecided(d) => Some(d),
                _ => None,
            })
            .expect("an authorization records its decision");
        assert_eq!(decided.decision, pb::Decision::Allow as i32, "{decided:?}");
        format!("jti-{n}")
    }

    /// The leader's housekeeping at `time_ms`: the expiry it commits, if anything was due.
    fn expire(&mut self, time_ms: u64) -> Option<pb::Expired> {
        let events = self.apply_at(
            time_ms,
            as_operator(Kind::ExpireGrants(pb::ExpireGrants {})),
        );
        events.into_iter().find_map(|e| match e {
            EventKind::Expired(e) => Some(e),
            _ => None,
        })
    }

    fn count(&self, prefix: &[u8]) -> usize {
        self.state
            .scan_prefix(prefix)
            .expect("the state reads")
            .len()
    }

    fn replay_cached(&self, jti: &str) -> bool {
        StateRead::get(&self.state, &keys::jti(WORKER, jti))
            .expect("the state reads")
            .is_some()
    }
}

/// A view of the state that records where each range scan starts.
struct Recording<'a> {
    state: &'a State,
    starts: RefCell<Vec<Vec<u8>>>,
}

impl StateRead for Recording<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageFault> {
        StateRead::get(self.state, key)
    }

    fn scan_range_first(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        limit: usize,
    ) -> Result<Vec<KeyValue>, StorageFault> {
        self.starts.borrow_mut().push(start.to_vec());
        self.state.scan_range_first(start, end, limit)
    }
}

#[test]
fn an_expiry_scan_starts_past_every_entry_already_purged() {
    let mut world = World::new();
    let jtis: Vec<String> = (0..3)
        .map(|_| world.authorize(1_000, 1_000, 2_000))
        .collect();
    assert!(world.expire(1_500).is_none(), "nothing is due before 2,000");

    let expired = world.expire(3_000).expect("three grants are due at 3,000");
    assert_eq!(expired.grant_ids.len(), 3);
    assert_eq!(world.count(keys::GRANT_EXPIRY_PREFIX), 0);
    assert!(jtis.iter().all(|jti| !world.replay_cached(jti)));

    let view = Recording {
        state: &world.state,
        starts: RefCell::default(),
    };
    assert_eq!(authz::due_count(&view, 4_000).expect("the state reads"), 0);
    assert_eq!(
        authz::expire(&view, 4_000).expect("the state reads"),
        Ok(vec![])
    );
    let starts = view.starts.into_inner();
    assert_eq!(starts.len(), 6, "three indexes, asked twice");
    for prefix in [
        keys::GRANT_EXPIRY_PREFIX,
        keys::APPROVAL_EXPIRY_PREFIX,
        keys::JTI_EXPIRY_PREFIX,
    ] {
        let floor = keys::timed_start(prefix, 3_001);
        let scans: Vec<&Vec<u8>> = starts.iter().filter(|s| s.starts_with(prefix)).collect();
        assert_eq!(scans.len(), 2);
        assert!(
            scans.iter().all(|start| **start == floor),
            "every scan of {} starts past the purge at 3,000",
            String::from_utf8_lossy(prefix)
        );
    }
}

#[test]
fn an_entry_indexed_below_the_floor_lowers_it_and_is_still_purged() {
    let mut world = World::new();
    world.authorize(1_000, 1_000, 2_000);
    world.expire(3_000).expect("the first grant is due");

    // An assertion whose expiry is behind the purge, as one accepted within the clock-skew
    // leeway may be.
    let late = world.authorize(3_500, 60_000, 2_500);
    assert!(world.replay_cached(&late));
    assert_eq!(
        authz::due_count(&world.state, 3_600).expect("the state reads"),
        1
    );
    let expired = world.expire(3_600).expect("the replay-cache entry is due");
    assert!(expired.grant_ids.is_empty(), "the grant lives on");
    assert!(!world.replay_cached(&late));
    assert_eq!(world.count(keys::JTI_EXPIRY_PREFIX), FIXTURE_ASSERTIONS);
    assert_eq!(world.count(keys::GRANT_EXPIRY_PREFIX), 1);
}

#[test]
fn a_full_expiry_batch_leaves_the_rest_for_the_next_one() {
    let mut world = World::new();
    let total = EXPIRE_BATCH_MAX + 5;
    for _ in 0..total {
        world.authorize(1_000, 1_000, 2_000);
    }
    assert_eq!(
        authz::due_count(&world.state, 3_000).expect("the state reads"),
        EXPIRE_BATCH_MAX,
        "a backlog counts as a full batch, so the leader goes again at once"
    );
    let first = world.expire(3_000).expect("grants are due");
    assert_eq!(first.grant_ids.len(), EXPIRE_BATCH_MAX);
    assert_eq!(world.count(keys::GRANT_EXPIRY_PREFIX), 5);
    assert_eq!(world.count(keys::JTI_EXPIRY_PREFIX), 5 + FIXTURE_ASSERTIONS);
    assert_eq!(
        authz::due_count(&world.state, 3_000).expect("the state reads"),
        5
    );

    let second = world.expire(3_001).expect("the rest are due");
    assert_eq!(second.grant_ids.len(), 5);
    assert!(
        second
            .grant_ids
            .iter()
            .all(|id| !first.grant_ids.contains(id)),
        "no grant is expired twice"
    );
    assert_eq!(world.count(keys::GRANT_EXPIRY_PREFIX), 0);
    assert_eq!(world.count(keys::JTI_EXPIRY_PREFIX), FIXTURE_ASSERTIONS);
    assert_eq!(
        authz::due_count(&world.state, 10_000).expect("the state reads"),
        0
    );
}

impl World {
    fn grant(&self, id: &str) -> Option<pb::Grant> {
        authz::grant_record(&self.state, id).expect("the state reads")
    }

    fn indexed_under_delegation(&self, id: &str) -> bool {
        StateRead::get(&self.state, &keys::grant_by_delegation("dlg_sub", id))
            .expect("the state reads")
            .is_some()
    }
}

#[test]
fn an_expired_grant_leaves_no_record_and_no_index_entry_behind() {
    let mut world = World::new();
    world.authorize(1_000, 1_000, 2_000);
    let id = format!("grt_{}", world.index - 1);
    assert!(world.grant(&id).is_some());
    assert!(world.indexed_under_delegation(&id));

    let expired = world.expire(2_000).expect("the grant is due at 2,000");
    assert_eq!(expired.grant_ids, vec![id.clone()]);
    assert!(world.grant(&id).is_none(), "the record is collected");
    assert!(!world.indexed_under_delegation(&id));
    assert_eq!(world.count(keys::GRANT_EXPIRY_PREFIX), 0);
}

#[test]
fn a_consumed_grant_says_so_until_its_lifetime_is_over_and_is_then_collected() {
    let mut world = World::new();
    world.authorize(1_000, 5_000, 2_000);
    let id = format!("grt_{}", world.index - 1);
    world.apply_at(
        1_500,
        as_operator(Kind::ConsumeGrant(pb::ConsumeGrant {
            grant_id: id.clone(),
            ..Default::default()
        })),
    );
    assert_eq!(
        world.grant(&id).map(|g| g.status),
        Some(pb::GrantStatus::Consumed as i32)
    );
    world
        .expire(3_000)
        .expect("the assertion's replay-cache entry is due");
    assert_eq!(
        world.grant(&id).map(|g| g.status),
        Some(pb::GrantStatus::Consumed as i32),
        "a used-up grant stays readable while its lifetime runs"
    );

    let expired = world.expire(6_000).expect("the grant is due at 6,000");
    assert!(
        expired.grant_ids.is_empty(),
        "a grant that ended before is not reported as expired"
    );
    assert!(world.grant(&id).is_none());
    assert!(!world.indexed_under_delegation(&id));
}

#[test]
fn a_grant_expiry_entry_holding_no_delegation_is_collected_through_the_record() {
    let mut world = World::new();
    world.authorize(1_000, 1_000, 2_000);
    let id = format!("grt_{}", world.index - 1);
    // Expiry entries written before they named the grant's delegation hold nothing.
    world
        .state
        .insert(keys::grant_expiry(2_000, &id), Vec::new());

    world.expire(2_000).expect("the grant is due at 2,000");
    assert!(world.grant(&id).is_none());
    assert!(!world.indexed_under_delegation(&id));
}

// ------------------------------------------------------------ apply versions

impl World {
    /// The world as a cluster bootstrapped before apply versions sees it: at the first.
    fn at_the_first_apply_version() -> World {
        let mut world = World::new();
        let mut cluster = world
            .state
            .cluster()
            .expect("the state reads")
            .expect("the fixture is bootstrapped");
        cluster.apply_version = 0;
        world
            .state
            .insert(keys::CLUSTER.to_vec(), cluster.encode_to_vec());
        assert_eq!(version::current(&world.state), Ok(APPLY_VERSION_FIRST));
        world
    }

    fn try_apply_at(&mut self, time_ms: u64, command: pb::Command) -> Result<(), String> {
        self.index += 1;
        fixture::apply_at(
            &mut self.state,
            &mut self.engine,
            self.index,
            time_ms,
            command,
        )
        .map(|_| ())
    }

    fn raise(&mut self, time_ms: u64, version: u32) -> Result<(), String> {
        self.try_apply_at(
            time_ms,
            pb::Command {
                kind: Some(Kind::RaiseApplyVersion(pb::RaiseApplyVersion { version })),
                ..Default::default()
            },
        )
    }

    fn consume(&mut self, time_ms: u64, id: &str) -> Result<(), String> {
        self.try_apply_at(
            time_ms,
            as_operator(Kind::ConsumeGrant(pb::ConsumeGrant {
                grant_id: id.into(),
                ..Default::default()
            })),
        )
    }

    fn status(&self, id: &str) -> Option<pb::GrantStatus> {
        self.grant(id)
            .map(|g| pb::GrantStatus::try_from(g.status).expect("a known status"))
    }
}

#[test]
fn at_the_first_apply_version_ended_grants_stay_and_expired_ones_are_marked() {
    let mut world = World::at_the_first_apply_version();
    world.authorize(1_000, 5_000, 2_000);
    let consumed = format!("grt_{}", world.index - 1);
    world.authorize(1_000, 1_000, 2_000);
    let lapsed = format!("grt_{}", world.index - 1);
    world.consume(1_500, &consumed).expect("consumed");
    assert_eq!(
        world.count(keys::GRANT_EXPIRY_PREFIX),
        1,
        "ending a grant took it out of the expiry index"
    );

    let expired = world.expire(6_000).expect("the other grant is due");
    assert_eq!(expired.grant_ids, vec![lapsed.clone()]);
    assert_eq!(world.status(&lapsed), Some(pb::GrantStatus::Expired));
    assert_eq!(world.status(&consumed), Some(pb::GrantStatus::Consumed));
    assert!(world.indexed_under_delegation(&consumed));
    assert_eq!(world.count(keys::GRANT_EXPIRY_PREFIX), 0);
}

#[test]
fn raising_the_apply_version_removes_the_grants_that_end_after_it() {
    let mut world = World::at_the_first_apply_version();
    world.authorize(1_000, 5_000, 2_000);
    let before = format!("grt_{}", world.index - 1);
    world.authorize(1_000, 5_000, 2_000);
    let after = format!("grt_{}", world.index - 1);
    world.consume(1_500, &before).expect("consumed");

    world.raise(1_600, APPLY_VERSION_MAX).expect("raised");
    assert_eq!(version::current(&world.state), Ok(APPLY_VERSION_MAX));
    world.consume(1_700, &after).expect("consumed");

    world.expire(6_000).expect("the second grant is due");
    assert!(world.grant(&after).is_none(), "ended after the raise");
    assert!(!world.indexed_under_delegation(&after));
    assert_eq!(
        world.status(&before),
        Some(pb::GrantStatus::Consumed),
        "ended before the raise, it left the expiry index and stays"
    );
}

#[test]
fn a_missing_grant_is_said_to_be_removed_only_where_grants_are_removed() {
    let mut first = World::at_the_first_apply_version();
    let refused = first.consume(1_000, "grt_gone").expect_err("no such grant");
    assert_eq!(refused, "token: no grant grt_gone");
    let mut newest = World::new();
    let refused = newest
        .consume(1_000, "grt_gone")
        .expect_err("no such grant");
    assert!(
        refused.contains("has expired and been removed"),
        "{refused}"
    );
}

#[test]
fn raising_the_apply_version_to_one_already_applied_is_refused() {
    let mut world = World::new();
    let refused = world
        .raise(1_000, APPLY_VERSION_MAX)
        .expect_err("already there");
    assert!(
        refused.starts_with("version: the cluster already applies version"),
        "{refused}"
    );
    assert_eq!(version::current(&world.state), Ok(APPLY_VERSION_MAX));
}

#[test]
fn a_version_this_binary_does_not_apply_stops_apply_before_it_writes() {
    let mut world = World::at_the_first_apply_version();
    let before = world.state.clone();
    let fault = world
        .raise(1_000, APPLY_VERSION_MAX + 1)
        .expect_err("too new");
    assert!(fault.contains("upgrade this node's binary"), "{fault}");
    assert_eq!(world.state, before);

    // A state installed from a newer leader: the next entry stops too, whatever it holds.
    let mut cluster = world.state.cluster().expect("reads").expect("bootstrapped");
    cluster.apply_version = APPLY_VERSION_MAX + 1;
    world
        .state
        .insert(keys::CLUSTER.to_vec(), cluster.encode_to_vec());
    let fault = world
        .try_apply_at(1_000, as_operator(Kind::ExpireGrants(pb::ExpireGrants {})))
        .expect_err("too new");
    assert!(fault.contains("upgrade this node's binary"), "{fault}");
}
