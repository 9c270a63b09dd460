//! When a node builds its snapshots.
//!
//! openraft's own policy (`LogsSinceLast`) makes every member build at the same index, so on a
//! cluster that applies in step all of them copy their whole state at once: at a million
//! delegations that is seconds of disk writes and CPU on every node together, and the writes
//! waiting on a quorum have no member left at full speed. Here each member builds every
//! `every` applied entries like before, but at indexes offset by its place among the members,
//! so that the builds of a three-member cluster fall a third of the interval apart. A member
//! that builds its own snapshots still builds every `every` entries; only its first build moves.

use std::time::Duration;

use mandate_store::NodeId;

use crate::Raft;

/// How often the schedule looks at the applied index.
pub const SNAPSHOT_CHECK_MS: u64 = 250;

/// Every `every` applied entries, at this member's own offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotSchedule {
    every: u64,
}

impl SnapshotSchedule {
    /// A schedule building every `every` entries; `every` must be at least 1.
    pub fn new(every: u64) -> Result<Self, String> {
        if every == 0 {
            return Err(
                "snapshot_logs_since_last is 0; a snapshot needs at least 1 new entry".into(),
            );
        }
        Ok(SnapshotSchedule { every })
    }

    /// The index at which the member at `place` of `members` builds next, given that its
    /// newest snapshot (built, installed or asked for) is at `since`.
    ///
    /// Members build at `offset + k × every`, the offset being their share of the interval. The
    /// next build is at least half an interval after `since`, so that a snapshot installed from
    /// the leader just before this member's turn is not copied again at once.
    pub fn next_build(&self, since: u64, place: usize, members: usize) -> u64 {
        let members = members.max(1) as u64;
        let place = (place as u64).min(members - 1);
        let offset = self.every / members * place;
        let earliest = since.saturating_add((self.every / 2).max(1));
        if earliest <= offset {
            return offset;
        }
        let turns = (earliest - offset).div_ceil(self.every);
        offset.saturating_add(turns.saturating_mul(self.every))
    }
}

/// Asks `raft` for a snapshot whenever this member's turn in `schedule` comes, until raft stops.
pub async fn run(raft: Raft, id: NodeId, schedule: SnapshotSchedule) {
    let mut tick = tokio::time::interval(Duration::from_millis(SNAPSHOT_CHECK_MS));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let metrics = raft.metrics();
    let mut asked = 0u64;
    loop {
        tick.tick().await;
        let (applied, since, place, members) = {
            let m = metrics.borrow();
            if m.running_state.is_err() {
                return;
            }
            let membership = m.membership_config.membership();
            let place = membership.nodes().position(|(node, _)| *node == id);
            (
                m.last_applied.map_or(0, |l| l.index),
                m.snapshot.map_or(0, |s| s.index),
                place.unwrap_or(0),
                membership.nodes().count(),
            )
        };
        if applied < schedule.next_build(since.max(asked), place, members) {
            continue;
        }
        if raft.trigger().snapshot().await.is_err() {
            return;
        }
        asked = applied;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use mandate_core::pb;
    use mandate_store::Member;

    use super::*;
    use crate::{Node, RaftTiming};

    #[tokio::test]
    async fn a_node_builds_a_snapshot_on_its_turn_though_openraft_never_would() {
        let dir = tempfile::tempdir().expect("temporary directory");
        let member = Member {
            peer_addr: "127.0.0.1:1".into(),
            client_addr: "127.0.0.1:2".into(),
        };
        let timing = RaftTiming {
            snapshot_logs_since_last: 10,
            ..RaftTiming::default()
        };
        assert!(matches!(
            timing.to_config().expect("valid").snapshot_policy,
            openraft::SnapshotPolicy::Never
        ));
        let node = Node::start(1, member.clone(), dir.path(), &timing, None)
            .await
            .expect("node starts");
        node.initialize(BTreeMap::from([(1, member)]))
            .await
            .expect("initialized");
        for _ in 0..12 {
            node.write(pb::Command::default()).await.expect("applied");
        }
        let metrics = node
            .raft
            .wait(Some(Duration::from_secs(10)))
            .metrics(
                |m| m.snapshot.is_some_and(|s| s.index >= 10),
                "a snapshot past the first turn",
            )
            .await
            .expect("the schedule asked for no snapshot");
        assert!(dir.path().join("snapshots/current.snapshot").exists());
        assert!(metrics.last_applied.is_some_and(|l| l.index >= 12));
    }

    #[test]
    fn three_members_build_a_third_of_the_interval_apart_and_each_every_interval() {
        let schedule = SnapshotSchedule::new(90).expect("valid");
        let turns = |place| {
            let mut since = 0;
            (0..3)
                .map(|_| {
                    since = schedule.next_build(since, place, 3);
                    since
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(turns(0), [90, 180, 270]);
        assert_eq!(turns(1), [120, 210, 300]);
        assert_eq!(turns(2), [60, 150, 240]);
    }

    #[test]
    fn a_snapshot_installed_just_before_a_turn_postpones_it_by_an_interval() {
        let schedule = SnapshotSchedule::new(90).expect("valid");
        assert_eq!(schedule.next_build(115, 1, 3), 210);
        assert_eq!(schedule.next_build(60, 1, 3), 120);
    }

    #[test]
    fn a_single_member_or_a_tiny_interval_still_builds_after_new_entries() {
        let one = SnapshotSchedule::new(1).expect("valid");
        assert_eq!(one.next_build(0, 0, 1), 1);
        assert_eq!(one.next_build(7, 2, 3), 8);
        let alone = SnapshotSchedule::new(100).expect("valid");
        assert_eq!(alone.next_build(0, 0, 1), 100);
        assert_eq!(alone.next_build(100, 0, 1), 200);
        assert_eq!(
            alone.next_build(0, 5, 0),
            100,
            "a node not in the membership builds as the only one"
        );
    }

    #[test]
    fn an_interval_of_zero_is_refused_with_the_setting_named() {
        let err = SnapshotSchedule::new(0).expect_err("0 is refused");
        assert!(err.contains("snapshot_logs_since_last"), "{err}");
    }
}
