//! The short chaos profile: the leader of a 3-node cluster of containers is SIGKILLed, or
//! paused, while eight clients register agents through every node. After healing, every
//! acknowledged registration is on every node, nothing refused is, and writes resume within
//! 10 s.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use mandate_chaos::check;
use mandate_chaos::cluster::Cluster;
use mandate_chaos::history::{History, Outcome};
use mandate_chaos::workload::{agent_names, register_until};

/// Concurrent writers.
const CLIENTS: usize = 8;
/// The workload runs this long before the fault, while it lasts, and after healing.
const PHASE: Duration = Duration::from_secs(4);
/// The others must elect a new leader within this while the old one is down (generous: debug
/// builds, two clusters and their clients share the machine's cores).
const ELECTION_LIMIT: Duration = Duration::from_secs(10);
/// Invariant (6): the healed cluster serves writes again within this.
const RESUME_LIMIT: Duration = Duration::from_secs(10);

/// A fault applied to the leader, and its healing.
type Nemesis = (fn(&Cluster, usize), fn(&Cluster, usize));

fn run_scenario(name: &str, base_port: u16, (fault, heal): Nemesis) {
    let cluster = Cluster::start(name, 3, base_port);
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    // Clients' lazy channels belong to this runtime.
    let _enter = rt.enter();
    let history = Arc::new(History::default());
    let stop = Arc::new(AtomicBool::new(false));
    let prefix = format!("chaos-{name}");
    let workers: Vec<_> = (0..CLIENTS)
        .map(|i| {
            // Each client starts at a different node and fails over among all of them.
            let mut addrs = cluster.addrs.clone();
            let n = addrs.len();
            addrs.rotate_left(i % n);
            rt.spawn(register_until(
                Arc::new(cluster.client_of(&addrs)),
                i,
                prefix.clone(),
                history.clone(),
                stop.clone(),
            ))
        })
        .collect();
    std::thread::sleep(PHASE);
    let leader = cluster.leader().expect("a leader before the fault");
    fault(&cluster, leader);
    // The fault took: the others elect a new leader while it lasts.
    let fault_at = std::time::Instant::now();
    let others: Vec<usize> = (1..=cluster.nodes).filter(|n| *n != leader).collect();
    let successor = loop {
        match cluster.leader_seen_by(&others) {
            Some(l) if l != leader => break l,
            _ if fault_at.elapsed() > ELECTION_LIMIT => {
                panic!("{name}: no new leader within {ELECTION_LIMIT:?} of the fault")
            }
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    };
    let elected_after = fault_at.elapsed();
    std::thread::sleep(PHASE.saturating_sub(elected_after));
    heal(&cluster, leader);
    let healed = history.now();
    std::thread::sleep(PHASE);
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        rt.block_on(w).expect("worker");
    }
    cluster.wait_alive(leader);

    let ops = history.operations();
    let resumed = check::writes_resume_within(&ops, healed, RESUME_LIMIT)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let mut acknowledged = 0;
    for node in 1..=cluster.nodes {
        let client = cluster.client_of(&cluster.addrs[node - 1..node]);
        let present = wait_for_names(&rt, &client, &prefix);
        acknowledged = check::acknowledged_writes_are_present(&ops, "register", &present)
            .unwrap_or_else(|e| panic!("{name}, node {node}: {e}"));
        check::refused_writes_are_absent(&ops, "register", &present)
            .unwrap_or_else(|e| panic!("{name}, node {node}: {e}"));
    }
    let unknown = ops
        .iter()
        .filter(|o| matches!(o.outcome, Outcome::Unknown { .. }))
        .count();
    assert!(acknowledged > 0, "{name}: nothing was acknowledged at all");
    println!(
        "{name}: {} operations, {acknowledged} acknowledged, {unknown} unknown; leader {leader} \
         replaced by {successor} after {elected_after:?}; writes resumed {resumed:?} after healing",
        ops.len()
    );
}

/// The agent names node `client` holds, once it answers (a restarted node catches up first).
fn wait_for_names(
    rt: &tokio::runtime::Runtime,
    client: &mandate_client::Client,
    prefix: &str,
) -> std::collections::BTreeSet<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match rt.block_on(agent_names(client, prefix)) {
            Ok(names) => return names,
            Err(e) if std::time::Instant::now() < deadline => {
                eprintln!("waiting for {}: {e}", client.current_addr());
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("{} never answered: {e}", client.current_addr()),
        }
    }
}

#[test]
fn acknowledged_writes_survive_a_sigkilled_leader() {
    run_scenario("kill-leader", 26400, (Cluster::kill, Cluster::restart));
}

#[test]
fn acknowledged_writes_survive_a_paused_leader() {
    run_scenario("pause-leader", 26500, (Cluster::pause, Cluster::unpause));
}
