//! `mandate bench audit`: what the audit trail costs and how fast it flows, under authorize
//! load. Four phases of the same load: with no subscriber, with a subscriber that stops
//! reading (whether writes slow down, then how fast it catches up), with no subscriber again,
//! and with a live subscriber on the last node given (the lag from a command's stamp to its
//! record arriving). Then a replay of the whole retained trail from storage.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mandate_client::{parse_addrs, pb, Client, Streaming};
use serde_json::{json, Value};

use super::{percentile, phase, AuthorizeWorld};
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

pub async fn run(
    connection: &Connection,
    clients: usize,
    duration: Duration,
    world: Arc<AuthorizeWorld>,
) -> Result<Value, Failure> {
    let addrs = parse_addrs(&connection.addr);
    let last = addrs
        .last()
        .cloned()
        .ok_or_else(|| Failure("no address given".into()))?;
    let client = connection.client_at(std::slice::from_ref(&last))?;

    let baseline = phase(connection, clients, duration, Some(world.clone())).await?;

    // A stalled subscriber: opened, then not read while the load runs.
    let mut stalled = subscribe(&client, after(&head(&client).await?), true).await?;
    let with_stalled = phase(connection, clients, duration, Some(world.clone())).await?;
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
    let baseline_after = phase(connection, clients, duration, Some(world.clone())).await?;

    // A live subscriber: lag from each authorize command's stamp to its record's arrival.
    let mut live = subscribe(&client, after(&head(&client).await?), true).await?;
    let (stop_tx, mut stop_rx) = tokio::sync::oneshot::channel::<()>();
    let reader = tokio::spawn(async move {
        let mut lags = Vec::new();
        loop {
            tokio::select! {
                _ = &mut stop_rx => return lags,
                next = live.message() => match next {
                    Ok(Some(r)) if r.r#type == "authorize" => {
                        lags.push(now_ms().saturating_sub(r.time_ms) * 1000)
                    }
                    Ok(Some(_)) => {}
                    _ => return lags,
                },
            }
        }
    });
    let with_live = phase(connection, clients, duration, Some(world.clone())).await?;
    // Let the subscriber receive the last records of the phase before stopping it.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _ = stop_tx.send(());
    let mut lags = reader
        .await
        .map_err(|e| Failure(format!("the subscriber failed: {e}")))?;
    lags.sort_unstable();

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
        "lag_ms": {
            "records": lags.len(),
            "p50": percentile(&lags, 0.5),
            "p99": percentile(&lags, 0.99),
            "max": percentile(&lags, 1.0),
        },
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
