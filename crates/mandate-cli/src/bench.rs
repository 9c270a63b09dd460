//! `mandate bench register`: registrations per second against a running cluster, with a given
//! number of concurrent clients. Each client has its own connections and starts at a different
//! node, so followers forward to the leader as they would in production.

use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use mandate_client::{parse_addrs, pb, Client};
use serde_json::json;

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

async fn worker(client: Client, run_id: String, worker: usize, until: Instant) -> Worker {
    let mut w = Worker {
        latencies_us: Vec::new(),
        errors: 0,
        first_error: None,
    };
    let mut n = 0u64;
    while Instant::now() < until {
        n += 1;
        let request = pb::RegisterAgentRequest {
            name: format!("bench-{run_id}-{worker}-{n}"),
            owner: "bench".into(),
            description: "registered by mandate bench".into(),
            ..Default::default()
        };
        let started = Instant::now();
        let result = client
            .registry(|mut c| {
                let request = request.clone();
                async move { c.register(request).await }
            })
            .await;
        match result {
            Ok(_) => w.latencies_us.push(started.elapsed().as_micros() as u64),
            Err(e) => {
                w.errors += 1;
                w.first_error.get_or_insert_with(|| e.to_string());
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
) -> Result<serde_json::Value, Failure> {
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
        let client = Client::new(&rotated, connection.token.as_deref())?;
        tasks.push(tokio::spawn(worker(client, run_id.clone(), i, until)));
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
        "registrations": latencies.len(),
        "per_second": latencies.len() as f64 / elapsed,
        "latency_ms_p50": percentile(&latencies, 0.5),
        "latency_ms_p99": percentile(&latencies, 0.99),
        "errors": errors,
        "first_error": first_error,
    }))
}

pub async fn run(cmd: BenchCommand) -> Result<(), Failure> {
    let BenchSub::Register {
        clients,
        duration_secs,
    } = cmd.command;
    if clients.iter().any(|c| *c == 0 || *c > BENCH_CLIENTS_MAX) {
        return Err(Failure(format!(
            "--clients must each be between 1 and {BENCH_CLIENTS_MAX}"
        )));
    }
    if duration_secs == 0 {
        return Err(Failure("--duration-secs must be at least 1".into()));
    }
    let mut phases = Vec::new();
    for c in &clients {
        let result = phase(&cmd.connection, *c, Duration::from_secs(duration_secs)).await?;
        if !cmd.connection.json {
            println!(
                "{:>5} clients: {:>9.1} registrations/s  (p50 {:.2} ms, p99 {:.2} ms, {} errors)",
                result["clients"],
                result["per_second"].as_f64().unwrap_or(0.0),
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
