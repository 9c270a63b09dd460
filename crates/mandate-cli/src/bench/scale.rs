//! `mandate bench scale`: authorize latency on an empty cluster, then again after loading it
//! with agents, delegations and live grants, both at once and once the nodes have come to rest
//! (as the empty cluster was); each node's resident memory; and how long a node
//! takes to restart from its own data and catch up, then to catch up by installing the leader's
//! snapshot after falling behind it. Needs a cluster the bench starts.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use mandate_client::pb;
use serde_json::{json, Value};

use super::load::{self, Budget, Sweep};
use super::workloads::{Workload, World};
use super::{human_line, Target, BENCH_CLIENTS_MAX};
use crate::output::print;
use crate::{Connection, Failure};

#[derive(Args, Debug)]
pub struct ScaleArgs {
    #[arg(long, default_value_t = 100_000)]
    agents: u64,
    #[arg(long, default_value_t = 1_000_000)]
    delegations: u64,
    /// Live grants (each lives for the longest lifetime, 15 minutes, so loading must finish
    /// well within that).
    #[arg(long, default_value_t = 1_000_000)]
    grants: u64,
    /// Clients that load the cluster.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Length of each authorize measurement, in seconds.
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
}

/// How long a restarted node may take to catch up before the bench gives up on it.
const RESTART_TIMEOUT: Duration = Duration::from_secs(300);
/// How far the leader's log moves on while a follower is down, in entries: past the 1,000 a
/// snapshot keeps behind it by default, so the follower can only catch up from the snapshot.
const INSTALL_LOG_GAP: u64 = 3_000;
/// How long building, purging, sending and installing a snapshot may take.
const INSTALL_TIMEOUT: Duration = Duration::from_secs(600);
/// Lifetime of the loaded grants: the longest there is.
const LOADED_GRANT_TTL_S: u64 = mandate_core::authz::GRANT_TTL_MS_MAX / 1000;

/// How long the loaded cluster may take to come to rest before it is measured anyway.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(300);
/// A cluster is at rest when its nodes together use less CPU than this share of one core in
/// each of [`SETTLE_QUIET_WINDOWS`] windows of [`SETTLE_WINDOW`] in a row: heartbeats alone cost
/// an idle three-node cluster about 1%. One quiet window is not enough: fjall compacts in
/// bursts, and the replay cache is purged every 2 s, so a single 2-s window could fall between
/// them while the cluster was still busy.
const SETTLED_CPU_SHARE: f64 = 0.10;
const SETTLE_WINDOW: Duration = Duration::from_secs(2);
const SETTLE_QUIET_WINDOWS: u32 = 5;
/// Linux reports a process's CPU time in units of `USER_HZ`, which is 100 on every
/// architecture it runs on.
const USER_HZ: f64 = 100.0;

/// CPU seconds a process has used, user and system, all its threads (`/proc/PID/stat`).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces; the fields follow the last ')'.
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split(' ').collect();
    // After the name: state is the first field, utime the 12th, stime the 13th.
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 / USER_HZ)
}

/// Waits until the nodes `pids` are at rest: what the load left behind (the housekeeping that
/// purges the replay cache of the load's assertions, fjall's flushes and compactions) is done,
/// as it is for the empty cluster measured first. Returns the seconds waited and whether the
/// cluster came to rest within [`SETTLE_TIMEOUT`].
async fn settle(pids: &[u32]) -> (f64, bool) {
    let started = Instant::now();
    let total = || pids.iter().filter_map(|pid| cpu_seconds(*pid)).sum::<f64>();
    let mut before = total();
    let mut quiet = 0;
    loop {
        tokio::time::sleep(SETTLE_WINDOW).await;
        let now = total();
        let share = (now - before) / SETTLE_WINDOW.as_secs_f64();
        before = now;
        quiet = if share < SETTLED_CPU_SHARE {
            quiet + 1
        } else {
            0
        };
        if quiet == SETTLE_QUIET_WINDOWS {
            return (started.elapsed().as_secs_f64(), true);
        }
        if started.elapsed() > SETTLE_TIMEOUT {
            return (started.elapsed().as_secs_f64(), false);
        }
    }
}

/// A process's resident memory now (`VmRSS`) or at its peak (`VmHWM`), in MiB.
fn memory_mib(pid: u32, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// Each node's latest snapshot index (`None` for a node that did not answer).
async fn snapshot_indexes(connection: &Connection, addrs: &[String]) -> Vec<Option<u64>> {
    let mut out = Vec::with_capacity(addrs.len());
    for addr in addrs {
        out.push(
            node_status(connection, addr)
                .await
                .ok()
                .map(|s| s.snapshot_index),
        );
    }
    out
}

/// Authorize at 1 and at 64 clients on the nodes at `addrs`. Each phase says whether a node
/// built a snapshot during it: a build reads the whole state and slows every node for its
/// duration, on all three at about the same index.
async fn measure_authorize(
    connection: &Connection,
    addrs: &[String],
    world: &Arc<World>,
    duration: Duration,
    json_out: bool,
) -> Result<Vec<Value>, Failure> {
    let mut out = Vec::new();
    for clients in [1, 64] {
        let sweep = Sweep {
            clients: vec![clients],
            budget: Budget::Time(duration),
            warmup: Duration::from_secs(2),
        };
        let before = snapshot_indexes(connection, addrs).await;
        let mut p = load::phase(connection, &Workload::Authorize, world, clients, &sweep).await?;
        let built = snapshot_indexes(connection, addrs).await != before;
        p["snapshot_built_during"] = json!(built);
        if !json_out {
            let note = if built {
                " (a snapshot was built meanwhile)"
            } else {
                ""
            };
            println!("{}{note}", human_line(&p));
        }
        out.push(p);
    }
    Ok(out)
}

async fn fill(
    connection: &Connection,
    workload: Workload,
    count: u64,
    clients: usize,
    grant_ttl_s: u64,
    json_out: bool,
) -> Result<Value, Failure> {
    let mut world = World::create(connection, &workload).await?;
    world.grant_ttl_s = grant_ttl_s;
    let sweep = Sweep {
        clients: vec![clients],
        budget: Budget::Count(count),
        warmup: Duration::ZERO,
    };
    let p = load::phase(connection, &workload, &Arc::new(world), clients, &sweep).await?;
    if !json_out {
        println!("{}", human_line(&p));
    }
    Ok(p)
}

async fn node_status(connection: &Connection, addr: &str) -> Result<pb::MemberStatus, Failure> {
    let client = connection.client_at(&[addr.to_owned()])?;
    let r = client
        .cluster(|mut c| async move { c.node_status(pb::StatusRequest {}).await })
        .await?;
    Ok(r.status.unwrap_or_default())
}

async fn applied_index(connection: &Connection, addr: &str) -> Result<(u64, u64), Failure> {
    let client = connection.client_at(&[addr.to_owned()])?;
    let r = client
        .cluster(|mut c| async move { c.node_status(pb::StatusRequest {}).await })
        .await?;
    Ok((r.leader, r.status.map_or(0, |s| s.applied_index)))
}

/// Polls `check` every 50 ms until it yields a value, failing with `what` after `timeout`.
async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T, Failure>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>, Failure>>,
{
    let started = Instant::now();
    loop {
        // A node that is starting or electing refuses a status call; keep polling.
        if let Ok(Some(value)) = check().await {
            return Ok(value);
        }
        if started.elapsed() > timeout {
            return Err(Failure(format!(
                "{what} did not happen within {} s",
                timeout.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A follower that was down while the leader's log moved on past a snapshot catches up by
/// installing that snapshot: kill it, authorize until the log has moved `INSTALL_LOG_GAP`
/// entries on, have the leader build a snapshot (which purges its log behind it), restart the
/// follower, and time it until it has installed the snapshot and applied what the leader had.
/// Its peak resident memory covers receiving and installing the whole state.
async fn install_after_falling_behind(
    connection: &Connection,
    cluster: &mut crate::dev::LocalCluster,
    world: &Arc<World>,
    json_out: bool,
) -> Result<Value, Failure> {
    let (leader, _) = applied_index(connection, &cluster.addrs[0]).await?;
    let follower = (1..=3u64).rev().find(|id| *id != leader).unwrap_or(3);
    let addr_of = |id: u64| cluster.addrs[usize::try_from(id - 1).unwrap_or(0)].clone();
    let (leader_addr, follower_addr) = (addr_of(leader), addr_of(follower));
    let behind = node_status(connection, &follower_addr)
        .await?
        .last_log_index;
    let term_before = node_status(connection, &leader_addr).await?.term;
    cluster.kill(follower).await?;
    // One client: one log entry per authorize, so the count is the gap.
    let sweep = Sweep {
        clients: vec![1],
        budget: Budget::Count(INSTALL_LOG_GAP),
        warmup: Duration::ZERO,
    };
    let moved = load::phase(connection, &Workload::Authorize, world, 1, &sweep).await?;
    if !json_out {
        println!("{}", human_line(&moved));
    }
    let client = connection.client_at(std::slice::from_ref(&leader_addr))?;
    // The leader answers once the snapshot is built; its body is not needed here.
    drop(
        client
            .cluster(|mut c| async move { c.snapshot_save(pb::SnapshotRequest {}).await })
            .await?,
    );
    let snapshot_index = wait_for(
        "the leader's purging its log past the follower",
        INSTALL_TIMEOUT,
        || async {
            let s = node_status(connection, &leader_addr).await?;
            Ok((s.purged_index > behind).then_some(s.snapshot_index))
        },
    )
    .await?;
    let target = node_status(connection, &leader_addr).await?.applied_index;

    let restarted = Instant::now();
    cluster.restart(follower).await?;
    wait_for(
        &format!("node {follower}'s installing the snapshot and catching up"),
        INSTALL_TIMEOUT,
        || async {
            let s = node_status(connection, &follower_addr).await?;
            Ok((s.snapshot_index >= snapshot_index && s.applied_index >= target).then_some(()))
        },
    )
    .await?;
    let caught_up_s = restarted.elapsed().as_secs_f64();
    // A follower that campaigns while the snapshot reaches it raises the term.
    let term_after = node_status(connection, &leader_addr).await?.term;
    let pid = cluster
        .pids()
        .into_iter()
        .find_map(|(id, pid)| (id == follower).then_some(pid));
    Ok(json!({
        "node": follower,
        "log_index_when_stopped": behind,
        "snapshot_index": snapshot_index,
        "caught_up_s": caught_up_s,
        "leader_term_before": term_before,
        "leader_term_after": term_after,
        "peak_rss_mib": pid.and_then(|pid| memory_mib(pid, "VmHWM")),
    }))
}

pub async fn run(connection: &Connection, args: ScaleArgs) -> Result<(), Failure> {
    if args.clients == 0 || args.clients > BENCH_CLIENTS_MAX || args.duration_secs == 0 {
        return Err(Failure(format!(
            "--clients is 1 to {BENCH_CLIENTS_MAX} and --duration-secs at least 1"
        )));
    }
    let mut target = Target::new(connection, Some(3)).await?;
    let result = measure(&mut target, &args, connection.json).await;
    target.stop().await;
    print(&result?, connection.json);
    Ok(())
}

async fn measure(target: &mut Target, args: &ScaleArgs, json_out: bool) -> Result<Value, Failure> {
    let connection = target.connection.clone();
    let duration = Duration::from_secs(args.duration_secs);
    let cluster = target
        .cluster
        .as_mut()
        .map(|(c, _)| c)
        .ok_or_else(|| Failure("scale needs a cluster the bench started".into()))?;
    let addrs = cluster.addrs.clone();
    let world = Arc::new(World::create(&connection, &Workload::Authorize).await?);
    let empty = measure_authorize(&connection, &addrs, &world, duration, json_out).await?;

    let started = Instant::now();
    let mut filled = Vec::new();
    for (workload, count, ttl) in [
        (Workload::Register, args.agents, 0),
        (Workload::Delegate, args.delegations, 0),
        (Workload::Authorize, args.grants, LOADED_GRANT_TTL_S),
    ] {
        if count > 0 {
            filled.push(fill(&connection, workload, count, args.clients, ttl, json_out).await?);
        }
    }
    let load_s = started.elapsed().as_secs_f64();
    let loaded = measure_authorize(&connection, &addrs, &world, duration, json_out).await?;

    let node_pids: Vec<u32> = cluster.pids().into_iter().map(|(_, pid)| pid).collect();
    let (settle_s, settled) = settle(&node_pids).await;
    if !json_out {
        println!("at rest after {settle_s:.1} s (settled: {settled})");
    }
    let at_rest = measure_authorize(&connection, &addrs, &world, duration, json_out).await?;
    let rss: Vec<Value> = cluster
        .pids()
        .into_iter()
        .map(|(id, pid)| {
            json!({
                "node": id,
                "rss_mib": memory_mib(pid, "VmRSS"),
                "peak_rss_mib": memory_mib(pid, "VmHWM"),
            })
        })
        .collect();
    let disk_mib = dir_bytes(&cluster.dir) as f64 / (1024.0 * 1024.0);

    // Restart a follower from its own data: from the new process to its having applied what
    // the cluster had committed when it stopped.
    let (leader, _) = applied_index(&connection, &cluster.addrs[0]).await?;
    let follower = (1..=3u64).find(|id| *id != leader).unwrap_or(1);
    let addr = cluster.addrs[usize::try_from(follower - 1).unwrap_or(0)].clone();
    let (_, before) = applied_index(&connection, &addr).await?;
    cluster.kill(follower).await?;
    let restarted = Instant::now();
    cluster.restart(follower).await?;
    let listening_s = restarted.elapsed().as_secs_f64();
    wait_for(
        &format!("node {follower}'s catching up after restarting"),
        RESTART_TIMEOUT,
        || async {
            let (leader, applied) = applied_index(&connection, &addr).await?;
            Ok((leader != 0 && applied >= before).then_some(()))
        },
    )
    .await?;
    let ready_s = restarted.elapsed().as_secs_f64();
    let installed = install_after_falling_behind(&connection, cluster, &world, json_out).await?;
    let p99 = |v: &[Value], i: usize| v[i]["latency_ms"]["p99"].as_f64().unwrap_or(0.0);
    let over_empty = |v: &[Value]| {
        json!({
            "1_client": p99(v, 0) / p99(&empty, 0).max(1e-9),
            "64_clients": p99(v, 1) / p99(&empty, 1).max(1e-9),
        })
    };
    Ok(json!({
        "agents": args.agents,
        "delegations": args.delegations,
        "grants": args.grants,
        "load_seconds": load_s,
        "fill": filled,
        "authorize_empty": empty,
        "authorize_loaded": loaded,
        "p99_loaded_over_empty": over_empty(&loaded),
        "settle": { "seconds": settle_s, "settled": settled },
        "authorize_loaded_at_rest": at_rest,
        "p99_loaded_at_rest_over_empty": over_empty(&at_rest),
        "rss": rss,
        "data_dir_mib": disk_mib,
        "restart": {
            "node": follower,
            "listening_s": listening_s,
            "caught_up_s": ready_s,
            "applied_index_before": before,
        },
        "install": installed,
    }))
}

fn dir_bytes(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}
