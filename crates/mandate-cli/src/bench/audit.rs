//! `mandate bench audit`: what the audit trail costs and how fast it flows, under authorize
//! load. Four phases of the same load: with no subscriber, with a subscriber that stops
//! reading (whether writes slow down, then how fast it catches up), with no subscriber again,
//! and with a live subscriber on the last node given (the lag from a command's stamp to its
//! record arriving). Then a replay of the whole retained trail from storage.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mandate_client::{parse_addrs, pb, Client, Streaming};
use serde_json::{json, Value};

use super::load::{self, Budget, Sweep};
use super::workloads::{Workload, World};
use crate::{Connection, Failure};

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

async fn head(client: &Client) -> Result<pb::AuditPosition, Failure> {
    let info = client
        .audit(|mut c| async move { c.info(pb::AuditInfoRequest {}).await })
        .await?;
    let head = info.head.unwrap_or_default();
    Ok(pb::AuditPosition {
        log_index: head.log_index,
        sequence: head.sequence,
    })
}

async fn subscribe(
    client: &Client,
    from: Option<pb::AuditPosition>,
    follow: bool,
) -> Result<Streaming<pb::AuditRecord>, Failure> {
    Ok(client
        .audit(|mut c| async move {
            c.subscribe(pb::SubscribeRequest {
                from,
                follow,
                ..Default::default()
            })
            .await
        })
        .await?)
}

fn after(p: &pb::AuditPosition) -> Option<pb::AuditPosition> {
    Some(pb::AuditPosition {
        log_index: p.log_index + 1,
        sequence: 0,
    })
}

/// A live subscriber on `client`'s node collecting each authorize record's lag (µs) from its
/// command stamp to its arrival, until the returned sender fires.
async fn live_lags(
    client: &Client,
) -> Result<
    (
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<hdrhistogram::Histogram<u64>>,
    ),
    Failure,
> {
    let mut live = subscribe(client, after(&head(client).await?), true).await?;
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let reader = tokio::spawn(async move {
        let mut lags = load::histogram();
        loop {
            tokio::select! {
                _ = &mut stop_rx => return lags,
                next = live.message() => match next {
                    Ok(Some(r)) if r.r#type == "authorize" => {
                        lags.saturating_record(now_ms().saturating_sub(r.time_ms).max(1) * 1000)
                    }
                    Ok(Some(_)) => {}
                    _ => return lags,
                },
            }
        }
    });
    Ok((stop_tx, reader))
}

/// How long the live subscriber keeps reading after the load stops, for the phase's last
/// records.
const LAG_DRAIN: Duration = Duration::from_millis(500);

/// Authorize load with a live subscriber on the last node: the summary's `latency_ms` is the
/// commit-to-subscriber lag; `authorize_latency_ms` is the requests' own.
pub async fn lag_phase(
    connection: &Connection,
    world: &Arc<World>,
    clients: usize,
    sweep: &Sweep,
) -> Result<Value, Failure> {
    let last = parse_addrs(&connection.addr)
        .last()
        .cloned()
        .ok_or_else(|| Failure("no address given".into()))?;
    let client = connection.client_at(std::slice::from_ref(&last))?;
    let (stop, reader) = live_lags(&client).await?;
    let (clock, stats) =
        load::clients_phase(connection, &Workload::Authorize, world, clients, sweep).await?;
    tokio::time::sleep(LAG_DRAIN).await;
    let _ = stop.send(());
    let lags = reader
        .await
        .map_err(|e| Failure(format!("the subscriber failed: {e}")))?;
    let mut summary = load::summary("audit-lag", "authorizations", clients, &clock, &stats);
    summary["authorize_latency_ms"] = summary["latency_ms"].take();
    summary["latency_ms"] = load::percentiles(&lags);
    summary["lag_records"] = json!(lags.len());
    summary["subscriber_node"] = json!(last);
    Ok(summary)
}

async fn authorize_phase(
    connection: &Connection,
    world: &Arc<World>,
    clients: usize,
    duration: Duration,
) -> Result<Value, Failure> {
    let sweep = Sweep {
        clients: vec![clients],
        budget: Budget::Time(duration),
        warmup: Duration::ZERO,
    };
    load::phase(connection, &Workload::Authorize, world, clients, &sweep).await
}

pub async fn run(
    connection: &Connection,
    clients: usize,
    duration: Duration,
) -> Result<Value, Failure> {
    let world = Arc::new(World::create(connection, &Workload::Authorize).await?);
    let addrs = parse_addrs(&connection.addr);
    let last = addrs
        .last()
        .cloned()
        .ok_or_else(|| Failure("no address given".into()))?;
    let client = connection.client_at(std::slice::from_ref(&last))?;

    let baseline = authorize_phase(connection, &world, clients, duration).await?;

    // A stalled subscriber: opened, then not read while the load runs.
    let mut stalled = subscribe(&client, after(&head(&client).await?), true).await?;
    let with_stalled = authorize_phase(connection, &world, clients, duration).await?;
    let target = head(&client).await?;
    let started = Instant::now();
    let mut caught_up = 0u64;
    while let Some(r) = stalled
        .message()
        .await
        .map_err(|e| Failure(e.to_string()))?
    {
        caught_up += 1;
        if (r.log_index, r.sequence) >= (target.log_index, target.sequence) {
            break;
        }
    }
    let catch_up_s = started.elapsed().as_secs_f64();
    drop(stalled);

    // The baseline again: the state grows from phase to phase, so the stalled phase is
    // compared with the mean of the runs before and after it.
    let baseline_after = authorize_phase(connection, &world, clients, duration).await?;

    let (stop, reader) = live_lags(&client).await?;
    let with_live = authorize_phase(connection, &world, clients, duration).await?;
    tokio::time::sleep(LAG_DRAIN).await;
    let _ = stop.send(());
    let lags = reader
        .await
        .map_err(|e| Failure(format!("the subscriber failed: {e}")))?;

    // Replay of the retained trail from storage.
    let started = Instant::now();
    let mut replay = subscribe(&client, None, false).await?;
    let mut replayed = 0u64;
    while replay
        .message()
        .await
        .map_err(|e| Failure(e.to_string()))?
        .is_some()
    {
        replayed += 1;
    }
    let replay_s = started.elapsed().as_secs_f64();

    let rate = |p: &Value| p["per_second"].as_f64().unwrap_or(0.0);
    let mut lag = load::percentiles(&lags);
    lag["records"] = json!(lags.len());
    Ok(json!({
        "clients": clients,
        "subscriber_node": last,
        "authorize_per_second": {
            "no_subscriber_before": rate(&baseline),
            "stalled_subscriber": rate(&with_stalled),
            "no_subscriber_after": rate(&baseline_after),
            "live_subscriber": rate(&with_live),
        },
        "stalled_over_baseline": if rate(&baseline) + rate(&baseline_after) > 0.0 {
            2.0 * rate(&with_stalled) / (rate(&baseline) + rate(&baseline_after))
        } else {
            0.0
        },
        "lag_ms": lag,
        "stalled_catch_up": {
            "records": caught_up,
            "seconds": catch_up_s,
            "records_per_second": caught_up as f64 / catch_up_s.max(1e-9),
        },
        "replay": {
            "records": replayed,
            "seconds": replay_s,
            "records_per_second": replayed as f64 / replay_s.max(1e-9),
        },
    }))
}
