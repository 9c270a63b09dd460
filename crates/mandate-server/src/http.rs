//! Plain HTTP on the client listener, beside gRPC: the grant-signing keys as a standard JWKS
//! document for resource servers that verify tokens offline, and liveness/readiness probes for
//! load balancers and orchestrators.

use std::sync::Arc;

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use mandate_raft::Node;

use crate::tokens;

/// Where the JWKS is served.
pub const JWKS_PATH: &str = "/.well-known/jwks.json";

/// The HTTP routes, to be merged into the gRPC router.
pub fn routes(node: Arc<Node>) -> Router {
    let jwks_node = node.clone();
    Router::new()
        .route(JWKS_PATH, get(move || jwks(jwks_node.clone())))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(move || ready(node.clone())))
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
