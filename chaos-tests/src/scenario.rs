//! A scenario: a cluster, the whole workload running through every node, faults applied and
//! healed, then every check over the history and the healed cluster.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mandate_client::{pb, Client};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tokio::task::JoinHandle;

use crate::check;
use crate::cluster::Cluster;
use crate::history::{History, Outcome};
use crate::workload::{self, Grants, Seen, Shared};

/// The others must elect a new leader within this while the old one is down or cut off.
/// Nominally an election takes openraft's leader lease (the maximum election timeout, 2 s)
/// plus one election timeout (1-2 s) after the last heartbeat; split votes among four
/// candidates cost more rounds, and in debug builds with five nodes and their clients on two
/// cores, elections of up to 10 s were seen. This bounds liveness; it is not the failover
/// target (see docs/reliability.md).
pub const ELECTION_LIMIT: Duration = Duration::from_secs(20);
/// Invariant (6): the healed cluster serves writes again within this.
pub const RESUME_LIMIT: Duration = Duration::from_secs(10);
/// Longest the healed cluster may take to converge (every member applied the leader's index).
pub const CONVERGE_LIMIT: Duration = Duration::from_secs(60);
/// The client id of the probe that measures how soon writes resume after a healing.
pub const PROBE_CLIENT: usize = 999;
/// Clients of each workload.
pub const REGISTER_CLIENTS: usize = 3;
pub const REGISTRY_CLIENTS: usize = 5;
pub const GRANT_CLIENTS: usize = 3;
/// Agents whose description the linearizability clients fight over.
pub const REGISTRY_KEYS: usize = 4;
/// The grant workload: agents (each with a sub-agent) and user delegations per agent.
pub const GRANT_AGENTS: usize = 2;
pub const DELEGATIONS_PER_AGENT: usize = 6;
/// The user revokes one delegation this often, keeping this many.
pub const REVOKE_EVERY: Duration = Duration::from_millis(1500);
pub const DELEGATIONS_KEPT: usize = 3;

/// How long things last: `MANDATE_CHAOS_PROFILE=long` multiplies rounds and phases.
#[derive(Debug, Clone, Copy)]
pub struct Profile {
    /// The workload runs this long before the first fault, between faults and at the end.
    pub phase: Duration,
    /// Faults in a random mix.
    pub rounds: usize,
    /// A fault lasts between these.
    pub hold: (Duration, Duration),
}

impl Profile {
    pub fn from_env() -> Profile {
        match std::env::var("MANDATE_CHAOS_PROFILE").as_deref() {
            Ok("long") => Profile {
                phase: Duration::from_secs(5),
                rounds: 30,
                hold: (Duration::from_secs(2), Duration::from_secs(8)),
            },
            _ => Profile {
                phase: Duration::from_secs(3),
                rounds: 4,
                hold: (Duration::from_secs(2), Duration::from_secs(4)),
            },
        }
    }
}

/// The seeds of random mixes: `MANDATE_CHAOS_SEED` (one seed, to replay a failure) or the
/// given defaults.
pub fn seeds(defaults: &[u64]) -> Vec<u64> {
    match std::env::var("MANDATE_CHAOS_SEED") {
        Ok(s) => vec![s.parse().expect("MANDATE_CHAOS_SEED is a u64")],
        Err(_) => defaults.to_vec(),
    }
}

/// The nemeses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// SIGKILL of the leader (restarted on its data to heal).
    KillLeader,
    /// SIGKILL of a follower.
    KillFollower,
    /// SIGSTOP of the leader's processes (SIGCONT to heal).
    PauseLeader,
    /// The leader cut off from every other node.
    PartitionLeader,
    /// A random minority cut off from the majority.
    PartitionMinority,
    /// Two halves that cannot reach each other, and one node that reaches both.
    Bridge,
    /// Every node's link drops 5% of packets and is shaped to 2 Mbit/s.
    LossySlow,
    /// SIGKILL of every node, then all start again at once.
    RestartAll,
}

impl Fault {
    pub const ALL: [Fault; 8] = [
        Fault::KillLeader,
        Fault::KillFollower,
        Fault::PauseLeader,
        Fault::PartitionLeader,
        Fault::PartitionMinority,
        Fault::Bridge,
        Fault::LossySlow,
        Fault::RestartAll,
    ];

    /// Whether the fault takes the leader away, so that the others must elect a new one.
    fn removes_leader(self) -> bool {
        matches!(
            self,
            Fault::KillLeader | Fault::PauseLeader | Fault::PartitionLeader
        )
    }
}

/// A fault in place, and what healing it takes.
#[derive(Debug)]
struct Active {
    fault: Fault,
    nodes: Vec<usize>,
}

/// What a finished scenario found.
#[derive(Debug, Default)]
pub struct Report {
    pub name: String,
    pub seed: u64,
    pub operations: usize,
    pub acknowledged: usize,
    pub unknown: usize,
    pub faults: Vec<String>,
    pub checks: Vec<String>,
    pub violations: Vec<String>,
}

/// A cluster under the workload.
pub struct Run {
    pub name: String,
    pub cluster: Cluster,
    pub rt: Arc<tokio::runtime::Runtime>,
    shared: Shared,
    workers: Vec<JoinHandle<()>>,
    subscribers: Vec<(usize, Arc<Mutex<Vec<Seen>>>)>,
    grants: Arc<Grants>,
    prefix: String,
    heals: Vec<Duration>,
    /// How long each election after a fault that took the leader away took.
    elections: Vec<Duration>,
    faults: Vec<String>,
    violations: Vec<String>,
    rng: StdRng,
    seed: u64,
    pub profile: Profile,
}

impl Run {
    /// Starts `nodes` containers, sets the grant workload up and starts every worker.
    pub fn start(name: &str, nodes: usize, base_port: u16, seed: u64) -> Run {
        let cluster = Cluster::start(name, nodes, base_port);
        let rt = Arc::new(tokio::runtime::Runtime::new().expect("runtime"));
        let grants = {
            // Clients' lazy channels belong to this runtime.
            let _enter = rt.enter();
            let client = cluster.client();
            Arc::new(rt.block_on(Grants::setup(
                &client,
                name,
                GRANT_AGENTS,
                DELEGATIONS_PER_AGENT,
            )))
        };
        let mut run = Run {
            name: name.to_owned(),
            cluster,
            rt,
            shared: Shared {
                history: Arc::new(History::default()),
                stop: Arc::new(AtomicBool::new(false)),
            },
            workers: Vec::new(),
            subscribers: Vec::new(),
            grants,
            prefix: format!("chaos-{name}"),
            heals: Vec::new(),
            elections: Vec::new(),
            faults: Vec::new(),
            violations: Vec::new(),
            rng: StdRng::seed_from_u64(seed),
            seed,
            profile: Profile::from_env(),
        };
        run.spawn_workers();
        run
    }

    /// A client that starts at node `first` and fails over among every node.
    fn client_from(&self, first: usize) -> Arc<Client> {
        let mut addrs: Vec<String> = self
            .cluster
            .members
            .iter()
            .map(|n| self.cluster.addrs[n - 1].clone())
            .collect();
        let n = addrs.len();
        addrs.rotate_left(first % n);
        Arc::new(self.cluster.client_of(&addrs))
    }

    fn node_client(&self, node: usize) -> Arc<Client> {
        Arc::new(self.cluster.client_of(&self.cluster.addrs[node - 1..node]))
    }

    fn spawn_workers(&mut self) {
        let _enter = self.rt.enter();
        let shared = self.shared.clone();
        for i in 0..REGISTER_CLIENTS {
            let w = workload::register_until(
                self.client_from(i),
                i,
                self.prefix.clone(),
                shared.clone(),
            );
            self.workers.push(self.rt.spawn(w));
        }
        let keys: Arc<Vec<String>> = Arc::new(
            (0..REGISTRY_KEYS)
                .map(|k| format!("lin-{}-{k}", self.name))
                .collect(),
        );
        let ids = Arc::new(Mutex::new(HashMap::new()));
        for i in 0..REGISTRY_CLIENTS {
            let w = workload::registry_until(
                self.client_from(i),
                100 + i,
                keys.clone(),
                ids.clone(),
                self.seed.wrapping_mul(1000).wrapping_add(i as u64),
                shared.clone(),
            );
            self.workers.push(self.rt.spawn(w));
        }
        let consumers: Arc<Vec<Arc<Client>>> = Arc::new(
            self.cluster
                .members
                .iter()
                .map(|n| self.node_client(*n))
                .collect(),
        );
        for i in 0..GRANT_CLIENTS {
            let w = workload::grants_until(
                self.client_from(i),
                consumers.clone(),
                200 + i,
                self.grants.clone(),
                self.seed.wrapping_mul(1000).wrapping_add(500 + i as u64),
                shared.clone(),
            );
            self.workers.push(self.rt.spawn(w));
        }
        let delegator = workload::delegate_until(
            self.client_from(1),
            300,
            self.grants.clone(),
            shared.clone(),
        );
        self.workers.push(self.rt.spawn(delegator));
        let revoker = workload::revoke_until(
            self.client_from(0),
            self.grants.clone(),
            REVOKE_EVERY,
            DELEGATIONS_KEPT,
            shared.clone(),
        );
        self.workers.push(self.rt.spawn(revoker));
        for node in self.cluster.members.clone() {
            let seen = Arc::new(Mutex::new(Vec::new()));
            let w = workload::subscribe_until(self.node_client(node), seen.clone(), shared.clone());
            self.workers.push(self.rt.spawn(w));
            self.subscribers.push((node, seen));
        }
    }

    /// Lets the workload run for `d` (the workload is the point: this is not a wait on a
    /// condition).
    pub fn run_for(&self, d: Duration) {
        std::thread::sleep(d);
    }

    /// The leader, waiting for one to be known (up to [`ELECTION_LIMIT`]).
    pub fn leader(&mut self) -> Option<usize> {
        let deadline = Instant::now() + ELECTION_LIMIT;
        loop {
            if let Some(l) = self.cluster.leader() {
                return Some(l);
            }
            if Instant::now() > deadline {
                let addrs: Vec<&str> = self
                    .cluster
                    .members
                    .iter()
                    .map(|n| self.cluster.addrs[n - 1].as_str())
                    .collect();
                let status = self.cluster.try_mandate(&[
                    "cluster",
                    "status",
                    "--json",
                    "--addr",
                    &addrs.join(","),
                ]);
                self.violations.push(format!(
                    "no leader within {ELECTION_LIMIT:?}; cluster status: {status:?}"
                ));
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn followers(&self, leader: Option<usize>) -> Vec<usize> {
        self.cluster
            .members
            .iter()
            .copied()
            .filter(|n| Some(*n) != leader)
            .collect()
    }

    fn inject(&mut self, fault: Fault) -> Active {
        let leader = self.leader();
        let members = self.cluster.members.clone();
        let mut followers = self.followers(leader);
        followers.shuffle(&mut self.rng);
        let nodes = match fault {
            Fault::KillLeader | Fault::PauseLeader | Fault::PartitionLeader => {
                leader.into_iter().collect()
            }
            Fault::KillFollower => followers.into_iter().take(1).collect(),
            Fault::PartitionMinority => {
                let mut all = members.clone();
                all.shuffle(&mut self.rng);
                all.truncate((members.len() - 1) / 2);
                all
            }
            Fault::Bridge => {
                let mut all = members.clone();
                all.shuffle(&mut self.rng);
                all
            }
            Fault::LossySlow | Fault::RestartAll => members.clone(),
        };
        match fault {
            Fault::KillLeader | Fault::KillFollower => {
                nodes.iter().for_each(|n| self.cluster.kill(*n))
            }
            Fault::PauseLeader => nodes.iter().for_each(|n| self.cluster.pause(*n)),
            Fault::PartitionLeader | Fault::PartitionMinority => {
                let rest: Vec<usize> = members
                    .iter()
                    .copied()
                    .filter(|n| !nodes.contains(n))
                    .collect();
                self.cluster.partition(&[nodes.clone(), rest]);
            }
            Fault::Bridge => {
                // nodes[0] is the bridge; the others split in two halves.
                let half = (nodes.len() - 1) / 2;
                let (a, b) = nodes[1..].split_at(half.max(1));
                self.cluster.cut(a, b);
            }
            Fault::LossySlow => nodes
                .iter()
                .for_each(|n| self.cluster.degrade(*n, 0.05, "2mbit")),
            Fault::RestartAll => self.cluster.kill_all(),
        }
        self.faults.push(format!("{fault:?} on {nodes:?}"));
        if fault.removes_leader() {
            if let Some(old) = leader {
                self.expect_new_leader(fault, old);
            }
        }
        Active { fault, nodes }
    }

    /// The nodes the fault left whole elect a leader other than `old`.
    fn expect_new_leader(&mut self, fault: Fault, old: usize) {
        let others = self.followers(Some(old));
        let start = Instant::now();
        while start.elapsed() < ELECTION_LIMIT {
            match self.cluster.leader_seen_by(&others) {
                Some(l) if l != old => {
                    self.elections.push(start.elapsed());
                    return;
                }
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
        let seen: Vec<String> = others
            .iter()
            .map(|n| {
                let addr = &self.cluster.addrs[n - 1];
                let status = self
                    .cluster
                    .try_mandate(&["cluster", "status", "--json", "--addr", addr]);
                format!("node {n}: {status:?}")
            })
            .collect();
        self.violations.push(format!(
            "{fault:?} of node {old}: no new leader within {ELECTION_LIMIT:?}; {seen:?}"
        ));
    }

    fn heal(&mut self, active: Active) {
        match active.fault {
            Fault::KillLeader | Fault::KillFollower => {
                active.nodes.iter().for_each(|n| self.cluster.restart(*n))
            }
            Fault::PauseLeader => active.nodes.iter().for_each(|n| self.cluster.unpause(*n)),
            Fault::PartitionLeader | Fault::PartitionMinority | Fault::Bridge => {
                self.cluster.heal_network()
            }
            Fault::LossySlow => {
                self.cluster.heal_network();
                active
                    .nodes
                    .iter()
                    .for_each(|n| self.cluster.clear_shaping(*n));
            }
            Fault::RestartAll => self.cluster.restart_all(),
        }
        self.healed();
    }

    /// Applies `fault` for `hold`, then heals it.
    pub fn fault(&mut self, fault: Fault, hold: Duration) {
        let active = self.inject(fault);
        self.run_for(hold);
        self.heal(active);
    }

    /// `rounds` faults drawn with the scenario's seed, each held for a random time in the
    /// profile's range, with a phase of workload between them. Faults are dealt from a
    /// shuffled deck of `faults`, reshuffled when it runs out, so that a mix covers them all
    /// before any comes twice.
    pub fn random_mix(&mut self, faults: &[Fault], rounds: usize) {
        let mut deck: Vec<Fault> = Vec::new();
        for _ in 0..rounds {
            if deck.is_empty() {
                deck = faults.to_vec();
                deck.shuffle(&mut self.rng);
            }
            let fault = deck.pop().expect("some faults");
            let (lo, hi) = self.profile.hold;
            let hold = self.rng.gen_range(lo..=hi);
            self.fault(fault, hold);
            self.run_for(self.profile.phase);
        }
    }

    /// Marks the present as a healing: writes must resume within [`RESUME_LIMIT`] of it.
    /// A probe client, fresh and failing over among every member, registers an agent at once
    /// and again until one is acknowledged (the workload's own clients may still be waiting
    /// on calls made before the healing, which would measure them rather than the cluster).
    pub fn healed(&mut self) {
        let healed = self.shared.history.now();
        self.heals.push(healed);
        let _enter = self.rt.enter();
        let probe = self.client_from(self.heals.len());
        let shared = self.shared.clone();
        let prefix = self.prefix.clone();
        let heal = self.heals.len();
        self.rt.block_on(async move {
            for attempt in 0.. {
                let name = format!("{prefix}-probe-{heal}-{attempt}");
                if workload::register_once(&probe, PROBE_CLIENT, name, &shared).await
                    || shared.history.now().saturating_sub(healed) > 3 * RESUME_LIMIT
                {
                    return;
                }
            }
        });
    }

    /// Records a fault applied outside [`Run::fault`] (membership changes and the like).
    pub fn note_fault(&mut self, what: String) {
        self.faults.push(what);
    }

    /// Stops the workload, lets the cluster converge, runs every check and reports; panics
    /// listing every violation.
    pub fn finish(mut self) -> Report {
        let rt = self.rt.clone();
        let _enter = rt.enter();
        self.shared.stop.store(true, Ordering::Relaxed);
        for w in std::mem::take(&mut self.workers) {
            if let Err(e) = self.rt.block_on(w) {
                self.violations.push(format!("a worker failed: {e}"));
            }
        }
        for node in self.cluster.members.clone() {
            self.cluster.wait_alive(node);
        }
        let mut report = Report {
            name: self.name.clone(),
            seed: self.seed,
            faults: std::mem::take(&mut self.faults),
            ..Default::default()
        };
        let ops = self.shared.history.operations();
        report.operations = ops.len();
        report.acknowledged = ops.iter().filter(|o| o.outcome.is_ok()).count();
        report.unknown = ops
            .iter()
            .filter(|o| matches!(o.outcome, Outcome::Unknown { .. }))
            .count();
        let mut checks = Vec::new();
        let mut violations = std::mem::take(&mut self.violations);
        let mut record = |name: &str, result: Result<String, String>| match result {
            Ok(found) => checks.push(format!("{name}: {found}")),
            Err(e) => violations.push(format!("{name}: {e}")),
        };
        if let Some(slowest) = self.elections.iter().max() {
            record(
                "(6) new leaders elected",
                Ok(format!(
                    "{} elections, slowest {slowest:?}",
                    self.elections.len()
                )),
            );
        }
        let converged = self.converge();
        record("(6) converged", converged.map(|d| format!("in {d:?}")));
        for healed in self.heals.clone() {
            record(
                "(6) writes resume",
                check::writes_resume_within(&ops, "register", healed, RESUME_LIMIT)
                    .map(|d| format!("{d:?} after the heal at {healed:?}")),
            );
        }
        for node in self.cluster.members.clone() {
            let client = self.cluster.client_of(&self.cluster.addrs[node - 1..node]);
            let present = self
                .rt
                .block_on(workload::agent_names(&client, &self.prefix));
            let present: BTreeSet<String> = match present {
                Ok(p) => p,
                Err(e) => {
                    record("(1) acknowledged writes", Err(format!("node {node}: {e}")));
                    continue;
                }
            };
            record(
                "(1) acknowledged writes present",
                check::acknowledged_writes_are_present(&ops, "register", &present)
                    .map(|n| format!("{n} on node {node}")),
            );
            record(
                "(1) refused writes absent",
                check::refused_writes_are_absent(&ops, "register", &present)
                    .map(|()| format!("on node {node}")),
            );
        }
        let (agent, sub_agent) = (
            self.grants.principals[0].id.clone(),
            self.grants.principals[self.grants.principals.len() / 2]
                .id
                .clone(),
        );
        for node in self.cluster.members.clone() {
            let client = self.cluster.client_of(&self.cluster.addrs[node - 1..node]);
            for (kind, to) in [("delegate", &agent), ("redelegate", &sub_agent)] {
                let present = self.rt.block_on(workload::delegation_ids(&client, to));
                record(
                    "(1) acknowledged delegations present",
                    present
                        .map_err(|e| format!("node {node}: {e}"))
                        .and_then(|p| check::acknowledged_ids_are_present(&ops, kind, &p))
                        .map(|n| format!("{n} {kind} on node {node}")),
                );
            }
        }
        record(
            "(2) single use",
            check::no_grant_consumed_twice(&ops).map(|n| format!("{n} grants consumed once")),
        );
        record(
            "(3) revocation",
            check::nothing_issued_or_accepted_after_revocation(&ops, &self.grants.delegations)
                .map(|n| format!("{n} acknowledged revocations")),
        );
        let audit = self.audit_checks();
        record("(4) audit", audit);
        let linearizable = check::registry_linearizable(&ops).map_err(|e| {
            // Keep the registry history for study: the violation names the agent.
            let path =
                std::env::temp_dir().join(format!("mandate-chaos-{}-registry.history", self.name));
            let lines: Vec<String> = ops
                .iter()
                .filter(|o| o.kind.starts_with("agent."))
                .map(|o| format!("{o:?}"))
                .collect();
            match std::fs::write(&path, lines.join("\n")) {
                Ok(()) => format!("{e} (history in {})", path.display()),
                Err(w) => format!("{e} (history not saved: {w})"),
            }
        });
        record(
            "(5) linearizable registry",
            linearizable.map(|n| format!("{n} operations")),
        );
        report.checks = checks;
        if !violations.is_empty() {
            // The containers go with the scenario: keep what the nodes logged.
            for node in self.cluster.members.clone() {
                let path = std::env::temp_dir()
                    .join(format!("mandate-chaos-{}-node-{node}.log", self.name));
                match std::fs::write(&path, self.cluster.logs(node)) {
                    Ok(()) => violations.push(format!("node {node}'s log: {}", path.display())),
                    Err(e) => violations.push(format!("node {node}'s log not saved: {e}")),
                }
            }
        }
        report.violations = violations;
        report.print();
        assert!(
            report.violations.is_empty(),
            "{}: {} violations: {:#?}",
            report.name,
            report.violations.len(),
            report.violations
        );
        assert!(
            report.acknowledged > 0,
            "{}: nothing was acknowledged",
            report.name
        );
        report
    }

    /// Waits until every member has applied what the leader has.
    fn converge(&mut self) -> Result<Duration, String> {
        let start = Instant::now();
        let target = loop {
            let progress = self.cluster.progress();
            if let Some(max) = progress.iter().map(|(_, a)| *a).max() {
                break max;
            }
            if start.elapsed() > CONVERGE_LIMIT {
                return Err("no member reports its progress".into());
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        self.cluster
            .wait_applied(target, CONVERGE_LIMIT)
            .map(|_| start.elapsed())
    }

    /// Invariant (4): every member's trail, read up to the leader's head, is the same chain;
    /// each subscriber saw exactly that sequence; `mandate audit verify` passes on every node.
    fn audit_checks(&self) -> Result<String, String> {
        let client = self.cluster.client_of(&self.cluster.addrs);
        let info = self
            .rt
            .block_on(client.audit(|mut c| async move { c.info(pb::AuditInfoRequest {}).await }))
            .map_err(|e| format!("audit info: {e}"))?;
        let head = info.head.ok_or("the trail has no head")?;
        let to = pb::AuditPosition {
            log_index: head.log_index,
            sequence: head.sequence,
        };
        let mut trails = Vec::new();
        for &node in &self.cluster.members {
            let client = self.cluster.client_of(&self.cluster.addrs[node - 1..node]);
            let trail = self
                .rt
                .block_on(tokio::time::timeout(
                    CONVERGE_LIMIT,
                    workload::audit_trail(&client, to),
                ))
                .map_err(|_| {
                    format!(
                        "node {node}'s trail did not reach {}.{}",
                        to.log_index, to.sequence
                    )
                })?
                .map_err(|e| format!("node {node}'s trail: {e}"))?;
            trails.push((node, trail));
        }
        let length = check::audit_trails_identical(&trails)?;
        let subscribers: Vec<(usize, Vec<Seen>)> = self
            .subscribers
            .iter()
            .filter(|(n, _)| self.cluster.members.contains(n))
            .map(|(n, seen)| (*n, seen.lock().unwrap_or_else(|p| p.into_inner()).clone()))
            .collect();
        let seen = check::subscribers_saw_the_trail(&trails[0].1, &subscribers)?;
        for &node in &self.cluster.members {
            self.cluster
                .try_mandate(&["audit", "verify", "--addr", &self.cluster.addrs[node - 1]])
                .map_err(|e| format!("audit verify on node {node}: {e}"))?;
        }
        Ok(format!(
            "{length} records identical on {} nodes; {} subscribers saw {seen} records in order; \
             audit verify passed",
            trails.len(),
            subscribers.len()
        ))
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

impl Report {
    /// One block per scenario; with `MANDATE_CHAOS_REPORT=FILE`, also a JSON line appended to
    /// FILE (the long profile's table is made from these).
    pub fn print(&self) {
        println!(
            "{} (seed {}): {} operations, {} acknowledged, {} unknown; {} faults: {:?}",
            self.name,
            self.seed,
            self.operations,
            self.acknowledged,
            self.unknown,
            self.faults.len(),
            self.faults
        );
        for c in &self.checks {
            println!("  ok   {c}");
        }
        for v in &self.violations {
            println!("  FAIL {v}");
        }
        if let Ok(path) = std::env::var("MANDATE_CHAOS_REPORT") {
            let line = serde_json::json!({
                "scenario": self.name,
                "seed": self.seed,
                "operations": self.operations,
                "acknowledged": self.acknowledged,
                "unknown": self.unknown,
                "faults": self.faults,
                "checks": self.checks,
                "violations": self.violations,
            });
            use std::io::Write;
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .unwrap_or_else(|e| panic!("open {path}: {e}"));
            writeln!(file, "{line}").unwrap_or_else(|e| panic!("write {path}: {e}"));
        }
    }
}
