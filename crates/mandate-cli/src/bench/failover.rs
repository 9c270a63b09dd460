//! `mandate bench failover`: authorize load on a cluster the bench starts; every interval the
//! leader is SIGKILLed, and the time from the kill to the first authorization that was sent
//! after the kill and succeeded is how soon writes resume. The killed node restarts from its
//! own data before the next kill.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use mandate_client::{parse_addrs, pb};
use serde_json::{json, Value};

use super::workloads::{self, Workload, World};
use super::{Target, BENCH_CLIENTS_MAX};
use crate::output::print;
use crate::{Connection, Failure};

#[derive(Args, Debug)]
pub struct FailoverArgs {
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// Leader kills, one per interval.
    #[arg(long, default_value_t = 5)]
    kills: usize,
    /// Seconds between kills (the killed node restarts halfway through).
    #[arg(long, default_value_t = 10)]
    interval_secs: u64,
    /// Nodes in the cluster the bench starts.
    #[arg(long, default_value_t = 3)]
    nodes: u16,
}

/// One request's invocation and completion, and whether it succeeded.
type Op = (Instant, Instant, bool);

async fn leader(connection: &Connection) -> Result<u64, Failure> {
    let client = connection.client()?;
    let status = client
        .cluster(|mut c| async move { c.status(pb::StatusRequest {}).await })
        .await?;
    match status.leader {
        0 => Err(Failure("the cluster has no leader".into())),
        id => Ok(id),
    }
}

/// Wall-clock time of `at`, in Unix milliseconds, to find a kill in the nodes' logs.
fn since_epoch_ms(at: Instant) -> u128 {
    let now = std::time::SystemTime::now();
    let then = now
        .checked_sub(at.elapsed())
        .unwrap_or(std::time::UNIX_EPOCH);
    then.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

pub async fn run(connection: &Connection, args: FailoverArgs) -> Result<(), Failure> {
    if args.clients == 0 || args.clients > BENCH_CLIENTS_MAX {
        return Err(Failure(format!(
            "--clients must be between 1 and {BENCH_CLIENTS_MAX}"
        )));
    }
    if args.kills == 0 || args.interval_secs < 2 || args.nodes < 3 {
        return Err(Failure(
            "--kills is at least 1, --interval-secs at least 2 and --nodes at least 3".into(),
        ));
    }
    let mut target = Target::new(connection, Some(args.nodes)).await?;
    let result = measure(&mut target, &args).await;
    target.stop().await;
    let out = result?;
    print(&out, connection.json);
    Ok(())
}

async fn measure(target: &mut Target, args: &FailoverArgs) -> Result<Value, Failure> {
    let connection = target.connection.clone();
    let world = Arc::new(World::create(&connection, &Workload::Authorize).await?);
    let stop = Arc::new(AtomicBool::new(false));
    let addrs = parse_addrs(&connection.addr);
    let mut tasks = Vec::new();
    for i in 0..args.clients {
        let mut rotated = addrs.clone();
        rotated.rotate_left(i % addrs.len());
        let client = connection.client_at(&rotated)?;
        let (world, stop) = (world.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut ops: Vec<Op> = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                let started = Instant::now();
                let ok = workloads::once(&Workload::Authorize, &world, &client, i, n)
                    .await
                    .is_ok();
                ops.push((started, Instant::now(), ok));
                if !ok {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
            ops
        }));
    }
    let half = Duration::from_secs(args.interval_secs) / 2;
    let mut kills = Vec::new();
    let run = async {
        tokio::time::sleep(half).await;
        for _ in 0..args.kills {
            let id = leader(&connection).await?;
            let cluster = target
                .cluster
                .as_mut()
                .map(|(c, _)| c)
                .ok_or_else(|| Failure("failover needs a cluster the bench started".into()))?;
            let at = Instant::now();
            cluster.kill(id).await?;
            eprintln!("  killed leader {id}");
            tokio::time::sleep(half).await;
            cluster.restart(id).await?;
            kills.push((id, at));
            tokio::time::sleep(half).await;
        }
        Ok::<_, Failure>(())
    }
    .await;
    stop.store(true, Ordering::Relaxed);
    let mut ops = Vec::new();
    for t in tasks {
        ops.extend(
            t.await
                .map_err(|e| Failure(format!("a bench client failed: {e}")))?,
        );
    }
    run?;
    let mut rows = Vec::new();
    let mut resumes = Vec::new();
    for (id, at) in &kills {
        let resumed = ops
            .iter()
            .filter(|(start, _, ok)| *ok && start >= at)
            .map(|(_, end, _)| *end)
            .min();
        let failed = ops
            .iter()
            .filter(|(start, end, ok)| !*ok && end >= at && *start < *at + half)
            .count();
        let resume_ms = resumed.map(|r| r.duration_since(*at).as_secs_f64() * 1000.0);
        if let Some(ms) = resume_ms {
            resumes.push(ms);
        }
        rows.push(json!({
            "killed": id,
            "killed_at_ms": since_epoch_ms(*at),
            "resume_ms": resume_ms,
            "failed_requests": failed,
        }));
    }
    let succeeded = ops.iter().filter(|(_, _, ok)| *ok).count();
    Ok(json!({
        "clients": args.clients,
        "nodes": args.nodes,
        "kills": rows,
        "resume_ms_median": median(resumes.clone()),
        "resume_ms_max": resumes.iter().copied().fold(0.0, f64::max),
        "authorizations": succeeded,
    }))
}
