//! Deterministic simulation: Mandate's raft (openraft with Mandate's sled log store and state
//! machine, the very apply code servers run) on turmoil's simulated network, one thread for
//! every node, simulated time, and a seed that fixes every choice: message latencies, which
//! faults strike when, which node a client asks. The same seed replays the same run.
//!
//! Each node is a turmoil host serving two things on one port: raft's RPCs (bincode, as on the
//! real peer wire) and client writes (agent registrations, proposed on the leader). A client
//! host registers agents through random nodes while the driver crashes and restarts nodes
//! (they reopen their own data) and partitions them. At the end every fault is healed and the
//! checks run: every acknowledged write is on every node, every node's state is identical, and
//! no term ever had two leaders.
//!
//! The transport and client path are the simulation's own (Mandate's tonic peer service, the
//! batcher and leader forwarding are exercised by the container scenarios instead).

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use mandate_core::pb::{self, command::Kind, command_result::Outcome};
use mandate_core::state::StateExt;
use mandate_raft::snapshots::{self, SnapshotSchedule};
use mandate_store::{Batch, Member, NodeId, StateView, SyncMode, TypeConfig};
use openraft::error::{
    ClientWriteError, InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError,
    Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use turmoil::net::{TcpListener, TcpStream};

type Raft = openraft::Raft<TypeConfig>;

/// The port every simulated node listens on.
pub const PORT: u16 = 7500;
/// Simulated time from the Unix epoch at which every run starts (stamped command times).
pub const EPOCH_MS: u64 = 1_800_000_000_000;
/// The operator token every simulated write carries (bootstrapped first).
pub const ROOT_TOKEN_ID: &str = "tok_simulation";
/// Applied entries between two snapshots of one node (each node at its own offset).
pub const SNAPSHOT_EVERY: u64 = 100;
/// Longest a simulated RPC or client write may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest the healed cluster may take (in simulated time) to converge.
pub const CONVERGE_LIMIT: Duration = Duration::from_secs(60);

/// A simulated run's shape.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    pub seed: u64,
    pub nodes: u64,
    /// Agent registrations the client attempts.
    pub writes: usize,
    /// Simulated time between fault decisions (a fault or a calm spell lasts one to three of
    /// these), and the chance a fault is chosen at each.
    pub fault_every: Duration,
    pub fault_chance: f64,
}

impl Plan {
    pub fn new(seed: u64) -> Plan {
        Plan {
            seed,
            nodes: 3,
            writes: 300,
            fault_every: Duration::from_millis(1500),
            fault_chance: 0.6,
        }
    }
}

/// What a run did and found.
#[derive(Debug, Default)]
pub struct SimReport {
    pub seed: u64,
    /// Every event in order, with its simulated time: two runs of one seed have equal traces.
    pub trace: Vec<String>,
    pub acknowledged: usize,
    pub unknown: usize,
    pub faults: usize,
    pub violations: Vec<String>,
}

fn host(id: NodeId) -> String {
    format!("node-{id}")
}

/// Raft timing of node `id`: election timeouts differ per node and are fixed, because
/// openraft draws them from a thread-local rng the seed does not reach.
fn config(id: NodeId) -> openraft::Config {
    let min = 1_000 + 300 * id;
    openraft::Config {
        cluster_name: "mandate-sim".into(),
        heartbeat_interval: 200,
        election_timeout_min: min,
        election_timeout_max: min + 1,
        // Snapshots come from the production schedule, `snapshots::run`, every
        // `SNAPSHOT_EVERY` entries.
        snapshot_policy: openraft::SnapshotPolicy::Never,
        max_in_snapshot_log_to_keep: 20,
        ..Default::default()
    }
    .validate()
    .expect("a valid simulation config")
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
enum Rpc {
    AppendEntries,
    Vote,
    InstallSnapshot,
    Write,
}

/// A client write's answer.
#[derive(Debug, Serialize, Deserialize)]
enum WriteAnswer {
    /// Applied: the agent id.
    Applied(String),
    /// Applied as a refusal (the name was taken, ...).
    Refused(String),
    /// This node is not the leader (the leader it knows of).
    NotLeader(Option<NodeId>),
    /// Proposed, but no result came: it may or may not be applied.
    Unknown(String),
}

async fn send_frame(stream: &mut TcpStream, bytes: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(bytes.len()).map_err(std::io::Error::other)?;
    stream.write_all(&len.to_be_bytes()).await?;
    stream.write_all(bytes).await?;
    stream.flush().await
}

async fn read_frame(stream: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    stream.read_exact(&mut len).await?;
    let mut bytes = vec![0u8; u32::from_be_bytes(len) as usize];
    stream.read_exact(&mut bytes).await?;
    Ok(bytes)
}

/// One request and its answer over a fresh connection, bounded by `timeout`.
async fn call(to: &str, rpc: Rpc, body: &[u8], timeout: Duration) -> std::io::Result<Vec<u8>> {
    let exchange = async {
        let mut stream = TcpStream::connect((to, PORT)).await?;
        let header = bincode::serialize(&rpc).map_err(std::io::Error::other)?;
        send_frame(&mut stream, &header).await?;
        send_frame(&mut stream, body).await?;
        read_frame(&mut stream).await
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))?
}

/// openraft's network over simulated TCP.
#[derive(Clone, Default)]
struct SimNetwork;

struct SimPeer {
    target: NodeId,
}

impl RaftNetworkFactory<TypeConfig> for SimNetwork {
    type Network = SimPeer;
    async fn new_client(&mut self, target: NodeId, _node: &Member) -> SimPeer {
        SimPeer { target }
    }
}

impl SimPeer {
    async fn rpc<Req, Resp, E>(
        &self,
        rpc: Rpc,
        request: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, Member, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let body =
            bincode::serialize(request).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let reply = call(&host(self.target), rpc, &body, option.hard_ttl())
            .await
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        let result: Result<Resp, RaftError<NodeId, E>> =
            bincode::deserialize(&reply).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for SimPeer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        self.rpc(Rpc::AppendEntries, &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Member, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.rpc(Rpc::InstallSnapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Member, RaftError<NodeId>>> {
        self.rpc(Rpc::Vote, &rpc, &option).await
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    bincode::serialize(value).expect("bincode encodes every raft message")
}

/// Serves one connection: a raft RPC or a client write.
async fn serve_one(raft: Raft, id: NodeId, mut stream: TcpStream) -> std::io::Result<()> {
    let bad = |e: bincode::Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
    let rpc: Rpc = bincode::deserialize(&read_frame(&mut stream).await?).map_err(bad)?;
    let body = read_frame(&mut stream).await?;
    let reply = match rpc {
        Rpc::AppendEntries => encode(
            &raft
                .append_entries(bincode::deserialize(&body).map_err(bad)?)
                .await,
        ),
        Rpc::Vote => encode(&raft.vote(bincode::deserialize(&body).map_err(bad)?).await),
        Rpc::InstallSnapshot => encode(
            &raft
                .install_snapshot(bincode::deserialize(&body).map_err(bad)?)
                .await,
        ),
        Rpc::Write => {
            let command: Vec<u8> = bincode::deserialize(&body).map_err(bad)?;
            encode(&write(&raft, id, &command).await)
        }
    };
    send_frame(&mut stream, &reply).await
}

/// Proposes the command (protobuf bytes) on this node.
async fn write(raft: &Raft, id: NodeId, command: &[u8]) -> WriteAnswer {
    let command = match <pb::Command as prost::Message>::decode(command) {
        Ok(c) => c,
        Err(e) => return WriteAnswer::Refused(e.to_string()),
    };
    if raft.metrics().borrow().current_leader != Some(id) {
        return WriteAnswer::NotLeader(raft.metrics().borrow().current_leader);
    }
    let batch = Batch::new(&pb::CommandBatch {
        commands: vec![command],
    });
    match tokio::time::timeout(CALL_TIMEOUT, raft.client_write(batch)).await {
        Err(_) => WriteAnswer::Unknown("no result within the timeout".into()),
        // Proposed on this node: even "not leader" now means the entry may yet commit.
        Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
            WriteAnswer::Unknown(format!("lost leadership to {:?}", f.leader_id))
        }
        Ok(Err(e)) => WriteAnswer::Unknown(e.to_string()),
        Ok(Ok(response)) => match response.data.0.first().and_then(|r| r.outcome.clone()) {
            Some(Outcome::Applied(applied)) => {
                WriteAnswer::Applied(applied.agent.map(|a| a.id).unwrap_or_default())
            }
            Some(Outcome::Error(e)) => WriteAnswer::Refused(e.message),
            None => WriteAnswer::Unknown("no outcome".into()),
        },
    }
}

/// A node's software: open its own data, start raft, serve. Re-run when the node restarts.
async fn run_node(
    id: NodeId,
    members: BTreeMap<NodeId, Member>,
    dir: PathBuf,
    views: Rc<RefCell<BTreeMap<NodeId, (Raft, StateView)>>>,
) -> turmoil::Result {
    let (log, sm) = mandate_store::open_with(&dir, SyncMode::Inline)?;
    let view = sm.view();
    let raft = Raft::new(id, Arc::new(config(id)), SimNetwork, log, sm).await?;
    views.borrow_mut().insert(id, (raft.clone(), view));
    let schedule = SnapshotSchedule::new(SNAPSHOT_EVERY)?;
    tokio::spawn(snapshots::run(raft.clone(), id, schedule));
    if id == 1 && !raft.is_initialized().await? {
        raft.initialize(members).await?;
    }
    let listener = TcpListener::bind(("0.0.0.0", PORT)).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let raft = raft.clone();
        tokio::spawn(async move {
            // A broken connection is the caller's to notice (it times out).
            let _ = serve_one(raft, id, stream).await;
        });
    }
}

/// The command registering agent `name`, stamped as a leader would (time, ids), with ids
/// drawn from the name so a run is reproducible.
fn register(name: &str, now_ms: u64) -> Vec<u8> {
    let mut command = pb::Command {
        operator_token_id: ROOT_TOKEN_ID.into(),
        kind: Some(Kind::RegisterAgent(pb::RegisterAgent {
            name: name.into(),
            owner: "simulation".into(),
            ..Default::default()
        })),
        ..Default::default()
    };
    let seed = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    mandate_raft::stamp::stamp(&mut command, now_ms, &mut StdRng::seed_from_u64(seed));
    prost::Message::encode_to_vec(&command)
}

fn bootstrap() -> Vec<u8> {
    let command = pb::Command {
        request_id: "req_bootstrap".into(),
        time_ms: EPOCH_MS,
        kind: Some(Kind::BootstrapCluster(pb::BootstrapCluster {
            cluster_id: "mc_simulation".into(),
            root_token_id: ROOT_TOKEN_ID.into(),
            root_secret_sha256: vec![0; 32],
            signing_key: None,
            apply_version: mandate_core::version::APPLY_VERSION_MAX,
        })),
        ..Default::default()
    };
    prost::Message::encode_to_vec(&command)
}

fn now_ms() -> u64 {
    EPOCH_MS + u64::try_from(turmoil::elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// How the client's writes ended.
#[derive(Debug, Default)]
struct ClientLog {
    trace: Vec<String>,
    acknowledged: BTreeSet<String>,
    refused: BTreeSet<String>,
    unknown: usize,
}

/// The client: bootstraps the cluster, then registers `writes` agents through random nodes.
async fn run_client(plan: Plan, log: Rc<RefCell<ClientLog>>) -> turmoil::Result {
    let mut rng = StdRng::seed_from_u64(plan.seed ^ 0x5eed);
    let mut target = 1;
    loop {
        let body = encode(&bootstrap());
        match call(&host(target), Rpc::Write, &body, CALL_TIMEOUT).await {
            Ok(reply) => match bincode::deserialize::<WriteAnswer>(&reply)? {
                WriteAnswer::Applied(_) | WriteAnswer::Refused(_) => break,
                WriteAnswer::NotLeader(Some(l)) => target = l,
                _ => target = rng.gen_range(1..=plan.nodes),
            },
            Err(_) => target = rng.gen_range(1..=plan.nodes),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for n in 0..plan.writes {
        let name = format!("sim-{n}");
        let body = encode(&register(&name, now_ms()));
        let answer = match call(&host(target), Rpc::Write, &body, CALL_TIMEOUT).await {
            Ok(reply) => bincode::deserialize::<WriteAnswer>(&reply)?,
            Err(e) => WriteAnswer::Unknown(e.to_string()),
        };
        target = record(&mut log.borrow_mut(), name, target, answer)
            .unwrap_or_else(|| rng.gen_range(1..=plan.nodes));
        tokio::time::sleep(Duration::from_millis(rng.gen_range(10..100))).await;
    }
    Ok(())
}

/// Logs one write's answer; the node to ask next, when the answer names one.
fn record(
    log: &mut ClientLog,
    name: String,
    target: NodeId,
    answer: WriteAnswer,
) -> Option<NodeId> {
    log.trace.push(format!(
        "{:?} write {name} via node {target}: {answer:?}",
        turmoil::elapsed()
    ));
    match answer {
        WriteAnswer::Applied(_) => {
            log.acknowledged.insert(name);
            Some(target)
        }
        WriteAnswer::Refused(_) => {
            log.refused.insert(name);
            Some(target)
        }
        WriteAnswer::NotLeader(Some(leader)) => Some(leader),
        WriteAnswer::NotLeader(None) | WriteAnswer::Unknown(_) => {
            log.unknown += 1;
            None
        }
    }
}

/// A fault in place.
enum Fault {
    Crashed(NodeId),
    Partitioned(NodeId),
}

/// Runs one seed in `dir` (one data directory per node).
pub fn simulate(plan: Plan, dir: &Path) -> SimReport {
    let mut sim = turmoil::Builder::new()
        .rng_seed(plan.seed)
        .simulation_duration(Duration::from_secs(3600))
        .tick_duration(Duration::from_millis(10))
        .min_message_latency(Duration::from_millis(1))
        .max_message_latency(Duration::from_millis(30))
        .build();
    let members: BTreeMap<NodeId, Member> = (1..=plan.nodes)
        .map(|id| {
            let addr = format!("{}:{PORT}", host(id));
            (
                id,
                Member {
                    peer_addr: addr.clone(),
                    client_addr: addr,
                },
            )
        })
        .collect();
    let views: Rc<RefCell<BTreeMap<NodeId, (Raft, StateView)>>> = Rc::default();
    for id in 1..=plan.nodes {
        let (members, dir, views) = (members.clone(), dir.join(host(id)), views.clone());
        sim.host(host(id), move || {
            run_node(id, members.clone(), dir.clone(), views.clone())
        });
    }
    let client_log: Rc<RefCell<ClientLog>> = Rc::default();
    sim.client("client", run_client(plan, client_log.clone()));

    let mut report = SimReport {
        seed: plan.seed,
        ..Default::default()
    };
    let mut rng = StdRng::seed_from_u64(plan.seed ^ 0xfa17);
    let mut fault: Option<Fault> = None;
    let mut next_decision = plan.fault_every;
    let mut leaders: BTreeMap<u64, NodeId> = BTreeMap::new();
    let mut finished = false;
    while !finished {
        finished = match sim.step() {
            Ok(done) => done,
            Err(e) => {
                report
                    .violations
                    .push(format!("the simulation failed: {e}"));
                break;
            }
        };
        election_safety(&views.borrow(), &mut leaders, &mut report);
        if sim.elapsed() < next_decision {
            continue;
        }
        // Faults last, and calm spells between them last, from one to three decision periods.
        next_decision += plan.fault_every * rng.gen_range(1..=3);
        let now = sim.elapsed();
        match fault.take() {
            Some(Fault::Crashed(id)) => {
                sim.bounce(host(id));
                report.trace.push(format!("{now:?} restart node {id}"));
            }
            Some(Fault::Partitioned(id)) => {
                for other in (1..=plan.nodes).filter(|o| *o != id) {
                    sim.repair(host(id), host(other));
                }
                report.trace.push(format!("{now:?} heal node {id}"));
            }
            None if rng.gen_bool(plan.fault_chance) => {
                let id = rng.gen_range(1..=plan.nodes);
                report.faults += 1;
                if rng.gen_bool(0.5) {
                    // Its software stops and its handles go: it reopens its data on restart.
                    views.borrow_mut().remove(&id);
                    sim.crash(host(id));
                    report.trace.push(format!("{now:?} crash node {id}"));
                    fault = Some(Fault::Crashed(id));
                } else {
                    for other in (1..=plan.nodes).filter(|o| *o != id) {
                        sim.partition(host(id), host(other));
                    }
                    report.trace.push(format!("{now:?} partition node {id}"));
                    fault = Some(Fault::Partitioned(id));
                }
            }
            None => {}
        }
    }
    // Heal, then let the cluster converge.
    match fault {
        Some(Fault::Crashed(id)) => sim.bounce(host(id)),
        Some(Fault::Partitioned(id)) => {
            for other in (1..=plan.nodes).filter(|o| *o != id) {
                sim.repair(host(id), host(other));
            }
        }
        None => {}
    }
    let client = client_log.borrow();
    let healed = sim.elapsed();
    loop {
        if let Err(e) = sim.step() {
            report
                .violations
                .push(format!("the simulation failed: {e}"));
            break;
        }
        election_safety(&views.borrow(), &mut leaders, &mut report);
        if converged(&views.borrow(), plan.nodes, &client.acknowledged) {
            break;
        }
        if sim.elapsed() - healed > CONVERGE_LIMIT {
            report
                .violations
                .push(format!("not converged {CONVERGE_LIMIT:?} after healing"));
            break;
        }
    }
    report.trace.extend(client.trace.iter().cloned());
    report.acknowledged = client.acknowledged.len();
    report.unknown = client.unknown;
    check_states(&views.borrow(), &client, &mut report);
    report.trace.push(format!("leaders by term: {leaders:?}"));
    report
}

/// At most one leader per term, ever.
fn election_safety(
    views: &BTreeMap<NodeId, (Raft, StateView)>,
    leaders: &mut BTreeMap<u64, NodeId>,
    report: &mut SimReport,
) {
    for (id, (raft, _)) in views {
        let metrics = raft.metrics().borrow().clone();
        if metrics.current_leader == Some(*id) {
            let term = metrics.current_term;
            match leaders.get(&term) {
                Some(other) if other != id => report.violations.push(format!(
                    "two leaders in term {term}: nodes {other} and {id}"
                )),
                Some(_) => {}
                None => {
                    leaders.insert(term, *id);
                }
            }
        }
    }
}

/// Every node runs, all at one applied index, every acknowledged write applied.
fn converged(
    views: &BTreeMap<NodeId, (Raft, StateView)>,
    nodes: u64,
    acknowledged: &BTreeSet<String>,
) -> bool {
    if views.len() as u64 != nodes {
        return false;
    }
    let applied: BTreeSet<u64> = views.values().map(|(_, v)| v.applied_index()).collect();
    applied.len() == 1
        && views.values().all(|(_, v)| {
            acknowledged
                .iter()
                .all(|name| matches!(v.agent_id_by_name(name), Ok(Some(_))))
        })
}

fn check_states(
    views: &BTreeMap<NodeId, (Raft, StateView)>,
    client: &ClientLog,
    report: &mut SimReport,
) {
    let mut dumps = Vec::new();
    for (id, (_, view)) in views {
        for name in &client.acknowledged {
            if !matches!(view.agent_id_by_name(name), Ok(Some(_))) {
                report
                    .violations
                    .push(format!("acknowledged {name} is missing on node {id}"));
            }
        }
        for name in &client.refused {
            if matches!(view.agent_id_by_name(name), Ok(Some(_))) {
                report
                    .violations
                    .push(format!("refused {name} is present on node {id}"));
            }
        }
        match view.dump() {
            Ok(dump) => dumps.push((*id, dump)),
            Err(e) => report.violations.push(format!("node {id}: {e}")),
        }
    }
    if let Some((first, reference)) = dumps.first() {
        for (id, dump) in &dumps[1..] {
            if dump != reference {
                report.violations.push(format!(
                    "node {id}'s state differs from node {first}'s ({} and {} keys)",
                    dump.len(),
                    reference.len()
                ));
            }
        }
        report.trace.push(format!(
            "state: {} keys, identical on {} nodes",
            reference.len(),
            dumps.len()
        ));
    }
}

/// Seeds named in `MANDATE_SIM_SEEDS` (`1,2,3` or `1..500`), or `defaults`.
pub fn seeds(defaults: &[u64]) -> Vec<u64> {
    let Ok(text) = std::env::var("MANDATE_SIM_SEEDS") else {
        return defaults.to_vec();
    };
    if let Some((a, b)) = text.split_once("..") {
        let a: u64 = a.trim().parse().expect("MANDATE_SIM_SEEDS start");
        let b: u64 = b.trim().parse().expect("MANDATE_SIM_SEEDS end");
        return (a..b).collect();
    }
    text.split(',')
        .map(|s| s.trim().parse().expect("MANDATE_SIM_SEEDS lists u64 seeds"))
        .collect()
}
