//! The chaos scenarios: each nemesis on its own, membership changes, a lagging node, a wiped
//! node, and seeded random mixes on 3 and 5 nodes. Every scenario runs the whole workload
//! (registrations, linearizability clients, authorize and racing consumes, revocations, audit
//! subscribers on every node) and every check (`mandate_chaos::scenario::Run::finish`).
//!
//! `MANDATE_CHAOS_PROFILE=long` lengthens phases and mixes; `MANDATE_CHAOS_SEED=N` replays one
//! seed of the random mixes (chaos-tests/README.md).

use std::time::{Duration, Instant};

use mandate_chaos::cluster::{LOGS_KEPT_AFTER_SNAPSHOT, SNAPSHOT_LOGS_SINCE_LAST};
use mandate_chaos::scenario::{seeds, Fault, Run};

/// The fixed seeds CI runs the random mixes with.
const CI_SEEDS: [u64; 1] = [20261201];

/// One fault, on its own: a phase of workload, the fault held, healed, a phase more.
fn single(name: &str, base_port: u16, nodes: usize, fault: Fault) {
    let mut run = Run::start(name, nodes, base_port, 1);
    let phase = run.profile.phase;
    run.run_for(phase);
    run.fault(fault, run.profile.hold.1);
    run.run_for(phase);
    run.finish();
}

#[test]
fn a_sigkilled_leader_loses_no_acknowledged_write() {
    single("kill-leader", 26400, 3, Fault::KillLeader);
}

#[test]
fn a_paused_leader_is_replaced_and_rejoins() {
    single("pause-leader", 26500, 3, Fault::PauseLeader);
}

#[test]
fn a_leader_cut_off_from_the_majority_is_replaced() {
    single("partition-leader", 26600, 3, Fault::PartitionLeader);
}

#[test]
fn a_minority_partition_of_five_nodes_keeps_every_invariant() {
    single("partition-minority", 26700, 5, Fault::PartitionMinority);
}

#[test]
fn a_bridge_partition_of_five_nodes_keeps_every_invariant() {
    single("bridge", 26800, 5, Fault::Bridge);
}

#[test]
fn a_lossy_slow_network_keeps_every_invariant() {
    single("lossy-slow", 26900, 3, Fault::LossySlow);
}

#[test]
fn every_node_killed_at_once_comes_back_with_everything_acknowledged() {
    single("restart-all", 27000, 3, Fault::RestartAll);
}

#[test]
fn a_sigkilled_follower_catches_up() {
    single("kill-follower", 27100, 3, Fault::KillFollower);
}

#[test]
fn adding_and_removing_members_under_load_keeps_every_invariant() {
    let mut run = Run::start("membership", 3, 27200, 1);
    let phase = run.profile.phase;
    run.run_for(phase);
    let added = run.cluster.add_node(1);
    run.note_fault(format!("added node {added}"));
    run.healed();
    run.run_for(phase);
    let leader = run.leader().expect("a leader");
    let removed = *run
        .cluster
        .members
        .iter()
        .find(|n| **n != leader && **n != added)
        .expect("a follower to remove");
    run.cluster.remove_node(removed);
    run.note_fault(format!("removed node {removed}"));
    run.healed();
    run.run_for(phase);
    run.finish();
}

#[test]
fn a_wiped_node_is_replaced_and_the_replacement_catches_up() {
    let mut run = Run::start("wiped", 3, 27300, 1);
    let phase = run.profile.phase;
    run.run_for(phase);
    let leader = run.leader().expect("a leader");
    let lost = *run
        .cluster
        .members
        .iter()
        .find(|n| **n != leader)
        .expect("a follower");
    // Its disk is lost: the node dies, its data directory with it. The documented recovery
    // (docs/operations.md): remove it, and join a replacement with an empty data directory
    // under a new id.
    run.cluster.kill(lost);
    run.cluster.remove_node(lost);
    run.note_fault(format!("node {lost} killed and its data wiped"));
    let replacement = run.cluster.add_node(leader);
    run.note_fault(format!("replacement node {replacement} joined"));
    run.healed();
    run.run_for(phase);
    run.finish();
}

#[test]
fn a_follower_cut_off_past_the_log_it_needs_installs_a_snapshot() {
    let mut run = Run::start("lagging", 3, 27400, 1);
    let phase = run.profile.phase;
    run.run_for(phase);
    let leader = run.leader().expect("a leader");
    let lagging = *run
        .cluster
        .members
        .iter()
        .find(|n| **n != leader)
        .expect("a follower");
    let others: Vec<usize> = run
        .cluster
        .members
        .iter()
        .copied()
        .filter(|n| *n != lagging)
        .collect();
    let applied = |run: &Run, node: usize| {
        run.cluster
            .progress()
            .into_iter()
            .find(|(n, _)| *n == node)
            .map(|(_, a)| a)
    };
    let before = applied(&run, leader).expect("the leader's progress");
    run.cluster.cut(&[lagging], &others);
    run.note_fault(format!(
        "node {lagging} cut off until the log moved past a snapshot"
    ));
    // The leader must snapshot and purge the entries the lagging node lacks.
    let needed = before + SNAPSHOT_LOGS_SINCE_LAST + 2 * LOGS_KEPT_AFTER_SNAPSHOT;
    let deadline = Instant::now() + Duration::from_secs(120);
    while applied(&run, leader).is_none_or(|a| a < needed) {
        assert!(
            Instant::now() < deadline,
            "the workload did not reach index {needed}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    run.cluster.heal_network();
    run.healed();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !run
        .cluster
        .logs(lagging)
        .contains("installed a snapshot from the leader")
    {
        assert!(
            Instant::now() < deadline,
            "node {lagging} did not install a snapshot after healing:\n{}",
            run.cluster.logs(lagging)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    run.run_for(phase);
    run.finish();
}

#[test]
fn random_mixes_of_faults_on_three_nodes_keep_every_invariant() {
    for seed in seeds(&CI_SEEDS) {
        let mut run = Run::start("mix-3", 3, 27500, seed);
        let (phase, rounds) = (run.profile.phase, run.profile.rounds);
        run.run_for(phase);
        run.random_mix(&Fault::ALL, rounds);
        run.finish();
    }
}

#[test]
fn random_mixes_of_faults_on_five_nodes_keep_every_invariant() {
    for seed in seeds(&CI_SEEDS) {
        let mut run = Run::start("mix-5", 5, 27600, seed);
        let (phase, rounds) = (run.profile.phase, run.profile.rounds);
        run.run_for(phase);
        run.random_mix(&Fault::ALL, rounds);
        run.finish();
    }
}
