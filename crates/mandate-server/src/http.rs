//! Plain HTTP on the client listener, beside gRPC: the grant-signing keys as a standard JWKS
//! document for resource servers that verify tokens offline, liveness/readiness probes for
//! load balancers and orchestrators, and Prometheus metrics.

use std::sync::Arc;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use mandate_raft::Node;

use mandate_core::audit;

use crate::audit_sink::SinkStates;
use crate::refusals::Refusals;
use crate::tokens;

/// Where the JWKS is served.
pub const JWKS_PATH: &str = "/.well-known/jwks.json";

/// The HTTP routes, to be merged into the gRPC router.
pub fn routes(node: Arc<Node>, refusals: Arc<Refusals>, sinks: SinkStates) -> Router {
    let jwks_node = node.clone();
    let metrics_node = node.clone();
    Router::new()
        .route(JWKS_PATH, get(move || jwks(jwks_node.clone())))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(move || ready(node.clone())))
        .route(
            "/metrics",
            get(move || metrics(metrics_node.clone(), refusals.clone(), sinks.clone())),
        )
}

/// A few gauges and counters in the Prometheus text format (0.0.4).
async fn metrics(node: Arc<Node>, refusals: Arc<Refusals>, sinks: SinkStates) -> Response {
    let m = node.metrics();
    let applied = m.last_applied.map_or(0, |l| l.index);
    let head = audit::head(&node.view).ok().flatten();
    let retained = audit::retained(&node.view).unwrap_or(0);
    let mut text = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: Vec<(String, u64)>| {
        text.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for (labels, value) in samples {
            text.push_str(&format!("{name}{labels} {value}\n"));
        }
    };
    let one = |v: u64| vec![(String::new(), v)];
    metric(
        "mandate_raft_term",
        "gauge",
        "The node's current raft term.",
        one(m.current_term),
    );
    metric(
        "mandate_raft_applied_index",
        "gauge",
        "The last log index applied to the state.",
        one(applied),
    );
    metric(
        "mandate_raft_is_leader",
        "gauge",
        "1 when this node is the leader.",
        one(u64::from(m.current_leader == Some(node.id))),
    );
    metric(
        "mandate_audit_records_appended_total",
        "counter",
        "Audit records ever appended to the trail.",
        one(head.map_or(0, |h| h.records)),
    );
    metric(
        "mandate_audit_records_retained",
        "gauge",
        "Audit records retained on this node.",
        one(retained),
    );
    metric(
        "mandate_audit_refusals_dropped_total",
        "counter",
        "Refused authentications this node dropped from the trail (rate limit).",
        one(refusals.dropped()),
    );
    let states = sinks.lock().map(|s| s.clone()).unwrap_or_default();
    let head_index = m.last_applied.map_or(0, |l| l.index);
    metric(
        "mandate_audit_sink_lag_entries",
        "gauge",
        "Log entries between a sink's cursor and the applied index.",
        states
            .iter()
            .map(|s| {
                let at = s.position.map_or(0, |p| p.0);
                (
                    format!("{{sink=\"{}\"}}", s.name),
                    head_index.saturating_sub(at),
                )
            })
            .collect(),
    );
    metric(
        "mandate_audit_sink_failing",
        "gauge",
        "1 while a sink's last step failed.",
        states
            .iter()
            .map(|s| {
                (
                    format!("{{sink=\"{}\"}}", s.name),
                    u64::from(!s.last_error.is_empty()),
                )
            })
            .collect(),
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

/// The JWKS as of this node's applied state (stale by at most replication lag; keys are
/// published before they sign, so a verifier never sees a token before its key).
async fn jwks(node: Arc<Node>) -> Response {
    match tokens::jwks(&node.view) {
        Ok((document, _)) => (
            [
                (header::CONTENT_TYPE, "application/jwk-set+json"),
                (header::CACHE_CONTROL, "max-age=60"),
            ],
            document.to_string(),
        )
            .into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")).into_response(),
    }
}

/// Most log entries a ready node may have appended but not yet applied.
pub const READY_APPLY_LAG_MAX: u64 = 1024;

/// Ready when this node knows a leader and has applied all but at most
/// [`READY_APPLY_LAG_MAX`] of the entries in its log.
async fn ready(node: Arc<Node>) -> Response {
    let metrics = node.metrics();
    let logged = metrics.last_log_index.unwrap_or(0);
    let applied = metrics.last_applied.map(|l| l.index).unwrap_or(0);
    match metrics.current_leader {
        None => (StatusCode::SERVICE_UNAVAILABLE, "no leader known\n").into_response(),
        Some(_) if logged.saturating_sub(applied) > READY_APPLY_LAG_MAX => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("applied {applied} of {logged} logged entries\n"),
        )
            .into_response(),
        Some(leader) => format!("ready; leader {leader}, applied {applied}\n").into_response(),
    }
}
