//! `mandate bench`: workloads over the public gRPC API, each swept over numbers of concurrent
//! clients, against the cluster in `--addr` or one the bench starts itself
//! (`--start-cluster N`); etcd's put side by side (`compare`); in-process decision evaluation
//! and offline token verification; the audit trail's lag; leader failover under load.
//!
//! Each client has its own connections and starts at a different node, so followers forward
//! to the leader as they would in production. Latencies go into an HdrHistogram per phase;
//! a warm-up before every phase is not measured.

mod audit;
mod etcd;
mod evaluate;
mod failover;
mod load;
mod plot;
mod scale;
mod workloads;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::dev::LocalCluster;
use crate::output::print;
use crate::{Connection, Failure};
use load::{Budget, Sweep};
use workloads::Workload;

/// Most concurrent clients one phase may run.
pub const BENCH_CLIENTS_MAX: usize = 4096;
/// First client port of a cluster the bench starts itself.
pub const BENCH_CLUSTER_PORT: u16 = 7700;

#[derive(Args, Debug)]
pub struct BenchCommand {
    #[command(subcommand)]
    command: BenchSub,
    #[command(flatten)]
    connection: Connection,
}

/// What every swept workload takes.
#[derive(Args, Debug, Clone)]
struct SweepArgs {
    /// Concurrent clients per phase, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    clients: Vec<usize>,
    /// Length of each measured phase, in seconds.
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    /// Requests per phase instead of a duration.
    #[arg(long, conflicts_with = "duration_secs")]
    count: Option<u64>,
    /// Unmeasured load before each phase, in seconds.
    #[arg(long, default_value_t = 2)]
    warmup_secs: u64,
    /// Write a PNG plot of throughput and p99 latency against clients.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Start a local cluster of this many nodes (release binary, TLS, durable) for the run,
    /// in a temporary directory, instead of using `--addr`.
    #[arg(long)]
    start_cluster: Option<u16>,
}

#[derive(Subcommand, Debug)]
enum BenchSub {
    /// Register agents.
    Register(SweepArgs),
    /// Create delegations (user token verified, policy checked, committed).
    Delegate(SweepArgs),
    /// Authorize and receive a signed single-use grant (a durable write per request).
    Authorize(SweepArgs),
    /// Authorize, then consume the grant (two durable writes per pair).
    AuthorizeConsume(SweepArgs),
    /// Check: read-only decisions on one node (the first of `--addr`) from its applied state.
    Check {
        #[command(flatten)]
        sweep: SweepArgs,
        /// Decisions per Check call.
        #[arg(long, default_value_t = 1)]
        batch: usize,
    },
    /// Introspect live grant tokens (verified, linearizable read).
    Introspect(SweepArgs),
    /// Offline verification of a grant token against the published JWKS, in-process; clients
    /// are threads.
    Verify(SweepArgs),
    /// Lag from commit to a live audit subscriber (on the last `--addr` node) under authorize
    /// load.
    AuditLag(SweepArgs),
    /// etcd's put (256-byte values, distinct keys) against `--etcd-endpoints`.
    Etcd {
        #[command(flatten)]
        sweep: SweepArgs,
        #[command(flatten)]
        etcd: etcd::EtcdArgs,
    },
    /// etcd put and Mandate authorize, phase by phase at the same client counts in one run,
    /// with the ratio at each.
    Compare {
        #[command(flatten)]
        sweep: SweepArgs,
        #[command(flatten)]
        etcd: etcd::EtcdArgs,
    },
    /// SIGKILL the leader under authorize load and measure how soon writes resume (needs
    /// `--start-cluster`).
    Failover(failover::FailoverArgs),
    /// Authorize latency empty and after loading agents, delegations and live grants; memory
    /// per node; restart time of a node from its own data (starts its own 3-node cluster).
    Scale(scale::ScaleArgs),
    /// In-process decision evaluations (chain check + ceiling + Cedar) on one core; needs no
    /// cluster.
    Evaluate {
        #[arg(long, default_value_t = 200_000)]
        iterations: u64,
    },
    /// Audit under authorize load: subscriber lag, the effect of a stalled subscriber on
    /// write throughput and its catch-up, and replay from storage.
    Audit {
        #[arg(long, default_value_t = 64)]
        clients: usize,
        #[arg(long, default_value_t = 10)]
        duration_secs: u64,
    },
}

impl SweepArgs {
    fn sweep(&self) -> Result<Sweep, Failure> {
        if self.clients.is_empty()
            || self
                .clients
                .iter()
                .any(|c| *c == 0 || *c > BENCH_CLIENTS_MAX)
        {
            return Err(Failure(format!(
                "--clients must each be between 1 and {BENCH_CLIENTS_MAX}"
            )));
        }
        let budget = match self.count {
            Some(0) => return Err(Failure("--count must be at least 1".into())),
            Some(n) => Budget::Count(n),
            None if self.duration_secs == 0 => {
                return Err(Failure("--duration-secs must be at least 1".into()))
            }
            None => Budget::Time(Duration::from_secs(self.duration_secs)),
        };
        Ok(Sweep {
            clients: self.clients.clone(),
            budget,
            warmup: Duration::from_secs(self.warmup_secs),
        })
    }
}

/// A temporary directory removed when dropped, unless `MANDATE_BENCH_KEEP` is set (then its
/// path is printed, for the nodes' logs).
struct TempDir(PathBuf);

impl TempDir {
    fn new(label: &str) -> Result<Self, Failure> {
        let dir = std::env::temp_dir().join(format!(
            "mandate-bench-{label}-{:08x}",
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir)?;
        Ok(TempDir(dir))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("MANDATE_BENCH_KEEP").is_some() {
            eprintln!("mandate bench: kept {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// The cluster a run measures: the one in `--addr`, or one started for the run.
struct Target {
    connection: Connection,
    cluster: Option<(LocalCluster, TempDir)>,
}

impl Target {
    async fn new(connection: &Connection, start: Option<u16>) -> Result<Self, Failure> {
        let Some(nodes) = start else {
            return Ok(Target {
                connection: connection.clone(),
                cluster: None,
            });
        };
        let dir = TempDir::new("cluster")?;
        eprintln!(
            "mandate bench: starting {nodes} node(s) in {}",
            dir.0.display()
        );
        let cluster = LocalCluster::start(&dir.0, nodes, BENCH_CLUSTER_PORT).await?;
        let connection = Connection {
            addr: cluster.addrs.join(","),
            token: Some(cluster.token.clone()),
            ca_cert: Some(cluster.ca_file.clone()),
            json: connection.json,
        };
        Ok(Target {
            connection,
            cluster: Some((cluster, dir)),
        })
    }

    async fn stop(mut self) {
        if let Some((mut cluster, _dir)) = self.cluster.take() {
            cluster.stop().await;
        }
    }
}

fn human_line(p: &Value) -> String {
    let ms = |k: &str| p["latency_ms"][k].as_f64().unwrap_or(0.0);
    format!(
        "{:<18} {:>5} clients: {:>10.1}/s  p50 {:>7.2} ms  p90 {:>7.2}  p99 {:>7.2}  p99.9 {:>7.2}  errors {}",
        p["workload"].as_str().unwrap_or(""),
        p["clients"],
        p["per_second"].as_f64().unwrap_or(0.0),
        ms("p50"),
        ms("p90"),
        ms("p99"),
        ms("p99_9"),
        p["errors"],
    )
}

fn report(
    phases: &[Value],
    extra: Value,
    sweep: &SweepArgs,
    json_out: bool,
) -> Result<(), Failure> {
    if let Some(path) = &sweep.plot {
        plot::write(path, phases)?;
        if !json_out {
            println!("plot written to {}", path.display());
        }
    }
    if json_out {
        let mut out = json!({ "phases": phases });
        if let (Some(o), Value::Object(e)) = (out.as_object_mut(), extra) {
            o.extend(e);
        }
        print(&out, true);
    } else if let Value::Object(e) = extra {
        for (k, v) in e {
            println!("{k}: {v}");
        }
    }
    Ok(())
}

async fn swept(
    target: &Target,
    workload: Workload,
    plan: &Sweep,
    json_out: bool,
) -> Result<Vec<Value>, Failure> {
    let world = workloads::World::create(&target.connection, &workload).await?;
    let world = Arc::new(world);
    let mut phases = Vec::new();
    for clients in &plan.clients {
        let phase = load::phase(&target.connection, &workload, &world, *clients, plan).await?;
        if !json_out {
            println!("{}", human_line(&phase));
        }
        phases.push(phase);
    }
    Ok(phases)
}

pub async fn run(cmd: BenchCommand) -> Result<(), Failure> {
    // Ctrl-C drops the run: clusters it started are killed and their directories removed.
    tokio::select! {
        result = dispatch(cmd) => result,
        _ = tokio::signal::ctrl_c() => Err(Failure("interrupted".into())),
    }
}

async fn dispatch(cmd: BenchCommand) -> Result<(), Failure> {
    let json_out = cmd.connection.json;
    let (workload, sweep) = match cmd.command {
        BenchSub::Evaluate { iterations } => return evaluate::run(iterations, json_out),
        BenchSub::Audit {
            clients,
            duration_secs,
        } => {
            if clients == 0 || clients > BENCH_CLIENTS_MAX || duration_secs == 0 {
                return Err(Failure(format!(
                    "--clients is 1 to {BENCH_CLIENTS_MAX} and --duration-secs at least 1"
                )));
            }
            let result =
                audit::run(&cmd.connection, clients, Duration::from_secs(duration_secs)).await?;
            print(&result, json_out);
            return Ok(());
        }
        BenchSub::Failover(args) => return failover::run(&cmd.connection, args).await,
        BenchSub::Scale(args) => return scale::run(&cmd.connection, args).await,
        BenchSub::Etcd { sweep, etcd } => {
            let plan = sweep.sweep()?;
            let cluster = etcd::Etcd::connect_or_start(&etcd).await?;
            let mut phases = Vec::new();
            for clients in &plan.clients {
                let phase = etcd::phase(&cluster, *clients, &plan).await?;
                if !json_out {
                    println!("{}", human_line(&phase));
                }
                phases.push(phase);
            }
            cluster.stop().await;
            return report(&phases, json!({}), &sweep, json_out);
        }
        BenchSub::Compare { sweep, etcd } => {
            return compare(&cmd.connection, &sweep, &etcd, json_out).await
        }
        BenchSub::Register(s) => (Workload::Register, s),
        BenchSub::Delegate(s) => (Workload::Delegate, s),
        BenchSub::Authorize(s) => (Workload::Authorize, s),
        BenchSub::AuthorizeConsume(s) => (Workload::AuthorizeConsume, s),
        BenchSub::Check { sweep, batch } => {
            if batch == 0 || batch > mandate_core::authz::CHECK_ITEMS_MAX {
                return Err(Failure(format!(
                    "--batch must be between 1 and {}",
                    mandate_core::authz::CHECK_ITEMS_MAX
                )));
            }
            (Workload::Check { batch }, sweep)
        }
        BenchSub::Introspect(s) => (Workload::Introspect, s),
        BenchSub::Verify(s) => (Workload::Verify, s),
        BenchSub::AuditLag(s) => (Workload::AuditLag, s),
    };
    let plan = sweep.sweep()?;
    let target = Target::new(&cmd.connection, sweep.start_cluster).await?;
    let result = swept(&target, workload, &plan, json_out).await;
    target.stop().await;
    let phases = result?;
    let rate = |p: &Value| p["per_second"].as_f64().unwrap_or(0.0);
    let speedup = match (phases.first(), phases.last()) {
        (Some(first), Some(last)) if phases.len() > 1 && rate(first) > 0.0 => {
            json!({ "speedup_last_over_first": rate(last) / rate(first) })
        }
        _ => json!({}),
    };
    report(&phases, speedup, &sweep, json_out)
}

/// etcd put and Mandate authorize alternately at each client count, in one run.
async fn compare(
    connection: &Connection,
    sweep: &SweepArgs,
    etcd_args: &etcd::EtcdArgs,
    json_out: bool,
) -> Result<(), Failure> {
    let plan = sweep.sweep()?;
    let etcd = etcd::Etcd::connect_or_start(etcd_args).await?;
    let target = match Target::new(connection, sweep.start_cluster).await {
        Ok(t) => t,
        Err(e) => {
            etcd.stop().await;
            return Err(e);
        }
    };
    let result = async {
        let world =
            Arc::new(workloads::World::create(&target.connection, &Workload::Authorize).await?);
        let mut phases = Vec::new();
        let mut ratios = Vec::new();
        for clients in &plan.clients {
            let put = etcd::phase(&etcd, *clients, &plan).await?;
            let authorize = load::phase(
                &target.connection,
                &Workload::Authorize,
                &world,
                *clients,
                &plan,
            )
            .await?;
            let rate = |p: &Value| p["per_second"].as_f64().unwrap_or(0.0);
            let ratio = if rate(&put) > 0.0 {
                rate(&authorize) / rate(&put)
            } else {
                0.0
            };
            if !json_out {
                println!("{}", human_line(&put));
                println!("{}", human_line(&authorize));
                println!(
                    "{:<18} {clients:>5} clients: authorize/put = {ratio:.2}",
                    "ratio"
                );
            }
            ratios.push(json!({ "clients": clients, "authorize_over_etcd_put": ratio }));
            phases.push(put);
            phases.push(authorize);
        }
        Ok::<_, Failure>((phases, ratios))
    }
    .await;
    target.stop().await;
    etcd.stop().await;
    let (phases, ratios) = result?;
    report(&phases, json!({ "ratios": ratios }), sweep, json_out)
}
