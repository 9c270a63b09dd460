//! Workloads: concurrent clients driving the public API while nemeses act, every operation
//! recorded.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use mandate_client::{pb, Client, ClientError, Code};

use crate::history::{History, Operation, Outcome};

/// Most agents read back per page when checking what the cluster holds.
pub const LIST_PAGE_SIZE: u32 = 1000;

fn outcome(result: Result<String, ClientError>) -> Outcome {
    match result {
        Ok(value) => Outcome::Ok { value },
        // Refusals decided by the cluster: the write did not happen.
        Err(e @ ClientError::Status { .. })
            if matches!(
                e.code(),
                Code::InvalidArgument
                    | Code::AlreadyExists
                    | Code::NotFound
                    | Code::PermissionDenied
                    | Code::Unauthenticated
                    | Code::FailedPrecondition
            ) =>
        {
            Outcome::Failed {
                error: e.to_string(),
            }
        }
        // No answer, "outcome unknown", no leader: it may or may not have happened.
        Err(e) => Outcome::Unknown {
            error: e.to_string(),
        },
    }
}

/// One client registering agents named `<prefix>-<client>-<n>` until `stop`.
pub async fn register_until(
    client: Arc<Client>,
    id: usize,
    prefix: String,
    history: Arc<History>,
    stop: Arc<AtomicBool>,
) {
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let name = format!("{prefix}-{id}-{n}");
        let node = client.current_addr().to_owned();
        let invoked = history.now();
        let request = pb::RegisterAgentRequest {
            name: name.clone(),
            owner: "chaos".into(),
            ..Default::default()
        };
        let result = client
            .registry(|mut c| {
                let r = request.clone();
                async move { c.register(r).await }
            })
            .await
            .map(|r| r.agent.map(|a| a.id).unwrap_or_default());
        history.record(Operation {
            client: id,
            kind: "register",
            key: name,
            node,
            invoked,
            completed: history.now(),
            outcome: outcome(result),
        });
    }
}

/// The names of every agent whose name starts with `prefix`, read linearizably from the node(s)
/// `client` talks to.
pub async fn agent_names(client: &Client, prefix: &str) -> Result<BTreeSet<String>, ClientError> {
    let mut names = BTreeSet::new();
    let mut page_token = String::new();
    loop {
        let request = pb::ListAgentsRequest {
            page_size: LIST_PAGE_SIZE,
            page_token: page_token.clone(),
            ..Default::default()
        };
        let page = client
            .registry(|mut c| {
                let r = request.clone();
                async move { c.list(r).await }
            })
            .await?;
        names.extend(
            page.agents
                .into_iter()
                .map(|a| a.name)
                .filter(|n| n.starts_with(prefix)),
        );
        if page.next_page_token.is_empty() {
            return Ok(names);
        }
        page_token = page.next_page_token;
    }
}
