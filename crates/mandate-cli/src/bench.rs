//! `mandate bench register|authorize|evaluate|audit`: registrations or authorizations per
//! second against a running cluster with a given number of concurrent clients, in-process
//! decision evaluations per second, and the audit trail's lag, replay and stall cost. Each
//! client has its own connections and starts at a different node, so followers forward to the
//! leader as they would in production.

mod audit;
mod evaluate;

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use mandate_client::{parse_addrs, pb, Client};
use serde_json::json;

use crate::identity;
use crate::output::print;
use crate::{Connection, Failure};

/// Most concurrent clients one phase may run.
pub const BENCH_CLIENTS_MAX: usize = 4096;

#[derive(Args, Debug)]
pub struct BenchCommand {
    #[command(subcommand)]
    command: BenchSub,
    #[command(flatten)]
    connection: Connection,
}

#[derive(Subcommand, Debug)]
enum BenchSub {
    /// Authorize (and receive a signed grant) as fast as N concurrent agents can, for each N.
    Authorize {
        #[arg(long, value_delimiter = ',', default_value = "1,64")]
        clients: Vec<usize>,
        #[arg(long, default_value_t = 10)]
        duration_secs: u64,
    },
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
    /// Register agents as fast as N concurrent clients can, for each N given.
    Register {
        /// Concurrent clients per phase, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "1,64")]
        clients: Vec<usize>,
        /// Length of each phase, in seconds.
        #[arg(long, default_value_t = 10)]
        duration_secs: u64,
    },
}

struct Worker {
    latencies_us: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
}

#[derive(Clone, Copy)]
enum Load {
    Register,
    Authorize,
}

impl Load {
    fn unit(self) -> &'static str {
        match self {
            Load::Register => "registrations",
            Load::Authorize => "authorizations",
        }
    }
}

/// What authorize workers need: an agent with its key, a delegation covering `secret/bench/*`.
struct AuthorizeWorld {
    agent_id: String,
    key: ed25519_dalek::SigningKey,
    cluster_id: String,
    delegation_id: String,
}

async fn authorize_world(client: &Client) -> Result<AuthorizeWorld, Failure> {
    let run = hex::encode(rand::random::<[u8; 4]>());
    let (idp, issuer) = crate::authz_cli::trust_new_issuer(client, "bench", &run).await?;
    crate::authz_cli::put_policy(client, "bench", BENCH_POLICY).await?;
    let key = ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng);
    let register = pb::RegisterAgentRequest {
        name: format!("bench-agent-{run}"),
        owner: "bench-user".into(),
        public_keys: vec![identity::public_jwk(&key.verifying_key())],
        ..Default::default()
    };
    let agent = client
        .registry(|mut c| {
            let r = register.clone();
            async move { c.register(r).await }
        })
        .await?
        .agent
        .ok_or_else(|| Failure("no agent returned".into()))?;
    let user = identity::user_token(&idp, &issuer, "mandate", "bench-user", 3600)?;
    let delegate = pb::CreateDelegationRequest {
        user_token: user,
        agent: agent.id.clone(),
        actions: vec!["read".into()],
        resources: vec!["secret/bench/*".into()],
        ttl_seconds: 3600,
        ..Default::default()
    };
    let delegation = client
        .authz(|mut c| {
            let r = delegate.clone();
            async move { c.create_delegation(r).await }
        })
        .await?
        .delegation
        .ok_or_else(|| Failure("no delegation returned".into()))?;
    Ok(AuthorizeWorld {
        agent_id: agent.id,
        key,
        cluster_id: identity::cluster_id(client).await?,
        delegation_id: delegation.id,
    })
}

const BENCH_POLICY: &str = r#"
@id("bench-user")
permit(principal == User::"bench-user", action == Action::"read", resource in Resource::"secret/bench");
@id("bench-agents")
permit(principal is Agent, action == Action::"read", resource in Resource::"secret/bench") when { context.delegation.depth <= 1 };
"#;

async fn one_request(
    client: &Client,
    load: Load,
    run_id: &str,
    worker: usize,
    n: u64,
    world: Option<&AuthorizeWorld>,
) -> Result<(), String> {
    match (load, world) {
        (Load::Authorize, Some(w)) => {
            let request = pb::AuthorizeRequest {
                agent_assertion: identity::agent_assertion(&w.agent_id, &w.key, &w.cluster_id)
                    .map_err(|e| e.to_string())?,
                delegation_id: w.delegation_id.clone(),
                action: "read".into(),
                resource: format!("secret/bench/{worker}"),
                ..Default::default()
            };
            let r = client
                .authz(|mut c| {
                    let r = request.clone();
                    async move { c.authorize(r).await }
                })
                .await
                .map_err(|e| e.to_string())?;
            if r.decision == pb::Decision::Allow as i32 && !r.token.is_empty() {
                Ok(())
            } else {
                Err(format!("not allowed: {:?}", r.reasons))
            }
        }
        _ => {
            let request = pb::RegisterAgentRequest {
                name: format!("bench-{run_id}-{worker}-{n}"),
                owner: "bench".into(),
                description: "registered by mandate bench".into(),
                ..Default::default()
            };
            client
                .registry(|mut c| {
                    let request = request.clone();
                    async move { c.register(request).await }
                })
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    }
}

async fn worker(
    client: Client,
    run_id: String,
    worker: usize,
    until: Instant,
    load: Load,
    world: Option<Arc<AuthorizeWorld>>,
) -> Worker {
    let mut w = Worker {
        latencies_us: Vec::new(),
        errors: 0,
        first_error: None,
    };
    let mut n = 0u64;
    while Instant::now() < until {
        n += 1;
        let started = Instant::now();
        match one_request(&client, load, &run_id, worker, n, world.as_deref()).await {
            Ok(()) => w.latencies_us.push(started.elapsed().as_micros() as u64),
            Err(e) => {
                w.errors += 1;
                w.first_error.get_or_insert(e);
            }
        }
    }
    w
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[rank] as f64 / 1000.0
}

async fn phase(
    connection: &Connection,
    clients: usize,
    duration: Duration,
    world: Option<Arc<AuthorizeWorld>>,
) -> Result<serde_json::Value, Failure> {
    let load = if world.is_some() {
        Load::Authorize
    } else {
        Load::Register
    };
    let addrs = parse_addrs(&connection.addr);
    if addrs.is_empty() {
        return Err(Failure("no address given".into()));
    }
    let run_id = format!("{:08x}", rand::random::<u32>());
    let until = Instant::now() + duration;
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(clients);
    for i in 0..clients {
        let mut rotated = addrs.clone();
        rotated.rotate_left(i % addrs.len());
        let client = connection.client_at(&rotated)?;
        tasks.push(tokio::spawn(worker(
            client,
            run_id.clone(),
            i,
            until,
            load,
            world.clone(),
        )));
    }
    let mut latencies = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    for task in tasks {
        let w = task
            .await
            .map_err(|e| Failure(format!("a bench client failed: {e}")))?;
        latencies.extend(w.latencies_us);
        errors += w.errors;
        first_error = first_error.or(w.first_error);
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    Ok(json!({
        "clients": clients,
        "duration_s": elapsed,
        "requests": latencies.len(),
        "per_second": latencies.len() as f64 / elapsed,
        "latency_ms_p50": percentile(&latencies, 0.5),
        "latency_ms_p99": percentile(&latencies, 0.99),
        "errors": errors,
        "first_error": first_error,
    }))
}

pub async fn run(cmd: BenchCommand) -> Result<(), Failure> {
    let (clients, duration_secs, kind) = match cmd.command {
        BenchSub::Register {
            clients,
            duration_secs,
        } => (clients, duration_secs, Load::Register),
        BenchSub::Authorize {
            clients,
            duration_secs,
        } => (clients, duration_secs, Load::Authorize),
        BenchSub::Evaluate { iterations } => return evaluate::run(iterations, cmd.connection.json),
        BenchSub::Audit {
            clients,
            duration_secs,
        } => {
            if clients == 0 || clients > BENCH_CLIENTS_MAX || duration_secs == 0 {
                return Err(Failure(format!(
                    "--clients is 1 to {BENCH_CLIENTS_MAX} and --duration-secs at least 1"
                )));
            }
            let world = Arc::new(authorize_world(&cmd.connection.client()?).await?);
            let result = audit::run(
                &cmd.connection,
                clients,
                Duration::from_secs(duration_secs),
                world,
            )
            .await?;
            print(&result, cmd.connection.json);
            return Ok(());
        }
    };
    if clients.iter().any(|c| *c == 0 || *c > BENCH_CLIENTS_MAX) {
        return Err(Failure(format!(
            "--clients must each be between 1 and {BENCH_CLIENTS_MAX}"
        )));
    }
    if duration_secs == 0 {
        return Err(Failure("--duration-secs must be at least 1".into()));
    }
    let world = match kind {
        Load::Register => None,
        Load::Authorize => Some(Arc::new(authorize_world(&cmd.connection.client()?).await?)),
    };
    let mut phases = Vec::new();
    for c in &clients {
        let result = phase(
            &cmd.connection,
            *c,
            Duration::from_secs(duration_secs),
            world.clone(),
        )
        .await?;
        if !cmd.connection.json {
            println!(
                "{:>5} clients: {:>9.1} {}/s  (p50 {:.2} ms, p99 {:.2} ms, {} errors)",
                result["clients"],
                result["per_second"].as_f64().unwrap_or(0.0),
                kind.unit(),
                result["latency_ms_p50"].as_f64().unwrap_or(0.0),
                result["latency_ms_p99"].as_f64().unwrap_or(0.0),
                result["errors"],
            );
        }
        phases.push(result);
    }
    let rate = |p: &serde_json::Value| p["per_second"].as_f64().unwrap_or(0.0);
    let speedup = match (phases.first(), phases.last()) {
        (Some(first), Some(last)) if phases.len() > 1 && rate(first) > 0.0 => {
            Some(rate(last) / rate(first))
        }
        _ => None,
    };
    if cmd.connection.json {
        print(
            &json!({ "phases": phases, "speedup_last_over_first": speedup }),
            true,
        );
    } else if let Some(s) = speedup {
        println!("speed-up, last phase over first: {s:.1}x");
    }
    Ok(())
}
