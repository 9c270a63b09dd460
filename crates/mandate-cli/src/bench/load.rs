//! One phase of load: N clients (tasks, or threads for in-process work) issuing requests
//! back to back through a warm-up and then a measured stretch of time or count; latencies in
//! an HdrHistogram; progress on stderr every few seconds.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use mandate_client::parse_addrs;
use serde_json::{json, Value};

use super::workloads::{self, Workload, World};
use crate::{Connection, Failure};

/// How long a measured phase runs.
#[derive(Debug, Clone, Copy)]
pub enum Budget {
    Time(Duration),
    Count(u64),
}

#[derive(Debug, Clone)]
pub struct Sweep {
    pub clients: Vec<usize>,
    pub budget: Budget,
    pub warmup: Duration,
}

/// Slowest latency a histogram holds, in microseconds (longer ones are clamped to it).
const LATENCY_US_MAX: u64 = 120_000_000;
/// How often a running phase reports progress on stderr.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// A failed request's client waits this long before the next, so an unavailable cluster is
/// not spun against.
const ERROR_BACKOFF: Duration = Duration::from_millis(10);

pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("constant, valid bounds")
}

/// The phase's clock, shared by its clients.
pub struct Clock {
    measure_from: Instant,
    until: Option<Instant>,
    remaining: Option<AtomicI64>,
    done: AtomicU64,
}

impl Clock {
    pub fn new(sweep: &Sweep) -> Self {
        let measure_from = Instant::now() + sweep.warmup;
        let (until, remaining) = match sweep.budget {
            Budget::Time(d) => (Some(measure_from + d), None),
            Budget::Count(n) => (
                None,
                Some(AtomicI64::new(i64::try_from(n).unwrap_or(i64::MAX))),
            ),
        };
        Clock {
            measure_from,
            until,
            remaining,
            done: AtomicU64::new(0),
        }
    }

    /// Whether a client should issue another request, and whether it is measured.
    pub fn next(&self) -> Option<bool> {
        let now = Instant::now();
        if now < self.measure_from {
            return Some(false);
        }
        if let Some(until) = self.until {
            return (now < until).then_some(true);
        }
        match &self.remaining {
            Some(r) => (r.fetch_sub(1, Ordering::Relaxed) > 0).then_some(true),
            None => None,
        }
    }
}

/// What one client measured.
pub struct Stats {
    pub latencies: Histogram<u64>,
    pub units: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    pub last_end: Option<Instant>,
}

impl Stats {
    pub fn new() -> Self {
        Stats {
            latencies: histogram(),
            units: 0,
            errors: 0,
            first_error: None,
            last_end: None,
        }
    }

    pub fn record(&mut self, clock: &Clock, started: Instant, result: Result<u64, String>) {
        let end = Instant::now();
        match result {
            Ok(units) => {
                let us = u64::try_from(end.duration_since(started).as_micros()).unwrap_or(u64::MAX);
                self.latencies.saturating_record(us.max(1));
                self.units += units;
                clock.done.fetch_add(units, Ordering::Relaxed);
            }
            Err(e) => {
                self.errors += 1;
                self.first_error.get_or_insert(e);
            }
        }
        self.last_end = Some(end);
    }

    pub fn merge(&mut self, other: Stats) {
        // Both histograms have the same bounds, so adding cannot fail.
        let _ = self.latencies.add(&other.latencies);
        self.units += other.units;
        self.errors += other.errors;
        self.first_error = self.first_error.take().or(other.first_error);
        self.last_end = self.last_end.max(other.last_end);
    }
}

/// Latency percentiles in milliseconds.
pub fn percentiles(h: &Histogram<u64>) -> Value {
    let ms = |us: u64| us as f64 / 1000.0;
    json!({
        "p50": ms(h.value_at_quantile(0.5)),
        "p90": ms(h.value_at_quantile(0.9)),
        "p99": ms(h.value_at_quantile(0.99)),
        "p99_9": ms(h.value_at_quantile(0.999)),
        "max": ms(h.max()),
        "mean": h.mean() / 1000.0,
    })
}

/// The JSON of a finished phase.
pub fn summary(workload: &str, unit: &str, clients: usize, clock: &Clock, stats: &Stats) -> Value {
    let end = match clock.until {
        Some(until) => until.min(stats.last_end.unwrap_or(until)),
        None => stats.last_end.unwrap_or(clock.measure_from),
    };
    let elapsed = end
        .saturating_duration_since(clock.measure_from)
        .as_secs_f64()
        .max(1e-9);
    json!({
        "workload": workload,
        "unit": unit,
        "clients": clients,
        "duration_s": elapsed,
        "requests": stats.latencies.len(),
        "per_second": stats.units as f64 / elapsed,
        "requests_per_second": stats.latencies.len() as f64 / elapsed,
        "latency_ms": percentiles(&stats.latencies),
        "errors": stats.errors,
        "first_error": stats.first_error,
    })
}

/// Prints progress every few seconds until dropped.
pub struct Progress(tokio::task::JoinHandle<()>);

impl Progress {
    pub fn start(label: String, clock: Arc<Clock>) -> Self {
        Progress(tokio::spawn(async move {
            let started = Instant::now();
            loop {
                tokio::time::sleep(PROGRESS_EVERY).await;
                let done = clock.done.load(Ordering::Relaxed);
                let measured = Instant::now().saturating_duration_since(clock.measure_from);
                eprintln!(
                    "  {label}: {:.0} s, {done} done ({:.0}/s measured)",
                    started.elapsed().as_secs_f64(),
                    done as f64 / measured.as_secs_f64().max(1e-9)
                );
            }
        }))
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs one phase of `workload` with `clients` clients and returns its summary.
pub async fn phase(
    connection: &Connection,
    workload: &Workload,
    world: &Arc<World>,
    clients: usize,
    sweep: &Sweep,
) -> Result<Value, Failure> {
    match workload {
        Workload::Verify => threads_phase(world, clients, sweep).await,
        Workload::AuditLag => super::audit::lag_phase(connection, world, clients, sweep).await,
        _ => {
            let (clock, stats) = clients_phase(connection, workload, world, clients, sweep).await?;
            Ok(summary(
                workload.name(),
                workload.unit(),
                clients,
                &clock,
                &stats,
            ))
        }
    }
}

/// `clients` tasks, each with its own connections: `check` all on the first node, the others
/// each starting at a different node.
pub async fn clients_phase(
    connection: &Connection,
    workload: &Workload,
    world: &Arc<World>,
    clients: usize,
    sweep: &Sweep,
) -> Result<(Arc<Clock>, Stats), Failure> {
    let addrs = parse_addrs(&connection.addr);
    if addrs.is_empty() {
        return Err(Failure("no address given".into()));
    }
    let clock = Arc::new(Clock::new(sweep));
    let _progress = Progress::start(
        format!("{} {clients} clients", workload.name()),
        clock.clone(),
    );
    let mut tasks = Vec::with_capacity(clients);
    for i in 0..clients {
        let client = if matches!(workload, Workload::Check { .. }) {
            connection.client_at(&addrs[..1])?
        } else {
            let mut rotated = addrs.clone();
            rotated.rotate_left(i % addrs.len());
            connection.client_at(&rotated)?
        };
        let (workload, world, clock) = (workload.clone(), world.clone(), clock.clone());
        tasks.push(tokio::spawn(async move {
            let mut stats = Stats::new();
            let mut n = 0u64;
            while let Some(measured) = clock.next() {
                n += 1;
                let started = Instant::now();
                let result = workloads::once(&workload, &world, &client, i, n).await;
                let failed = result.is_err();
                if measured {
                    stats.record(&clock, started, result);
                }
                if failed {
                    tokio::time::sleep(ERROR_BACKOFF).await;
                }
            }
            stats
        }));
    }
    let mut total = Stats::new();
    for task in tasks {
        total.merge(
            task.await
                .map_err(|e| Failure(format!("a bench client failed: {e}")))?,
        );
    }
    Ok((clock, total))
}

/// In-process work on `threads` OS threads.
async fn threads_phase(
    world: &Arc<World>,
    threads: usize,
    sweep: &Sweep,
) -> Result<Value, Failure> {
    let clock = Arc::new(Clock::new(sweep));
    let _progress = Progress::start(format!("verify {threads} threads"), clock.clone());
    let mut handles = Vec::with_capacity(threads);
    for _ in 0..threads {
        let (world, clock) = (world.clone(), clock.clone());
        handles.push(tokio::task::spawn_blocking(move || {
            let mut stats = Stats::new();
            let verifier = world.verifier.as_ref();
            while let Some(measured) = clock.next() {
                let started = Instant::now();
                let result = verifier
                    .ok_or_else(|| "no verifier was set up".to_owned())
                    .and_then(workloads::verify_once)
                    .map(|()| 1);
                if measured {
                    stats.record(&clock, started, result);
                }
            }
            stats
        }));
    }
    let mut total = Stats::new();
    for h in handles {
        total.merge(
            h.await
                .map_err(|e| Failure(format!("a verify thread failed: {e}")))?,
        );
    }
    Ok(summary("verify", "verifications", threads, &clock, &total))
}
