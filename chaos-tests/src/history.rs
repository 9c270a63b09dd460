//! The record of what clients asked and what they were told.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use mandate_client::Code;

/// How long a client waits before its next operation after no node could take one.
pub const UNAVAILABLE_BACKOFF: Duration = Duration::from_millis(50);

/// How an operation ended, as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The cluster acknowledged it; `value` is what it answered (an id, a count).
    Ok { value: String },
    /// The cluster refused it: it did not happen.
    Failed { code: Code, error: String },
    /// No answer (timeout, connection lost, "outcome unknown"): it may or may not have happened.
    Unknown { error: String },
}

/// One operation: what was asked, of which node, when, and how it ended.
#[derive(Debug, Clone)]
pub struct Operation {
    pub client: usize,
    /// `register`, `consume`, ...
    pub kind: &'static str,
    /// What the operation acts on (the agent name registered, the grant consumed, ...).
    pub key: String,
    /// Its argument beyond the key (the value written, the delegation a grant is under, ...).
    pub input: String,
    /// The address the client first sent it to.
    pub node: String,
    pub invoked: Duration,
    pub completed: Duration,
    pub outcome: Outcome,
}

/// Operations in completion order, shared by the workload's tasks.
pub struct History {
    start: Instant,
    operations: Mutex<Vec<Operation>>,
}

impl Default for History {
    fn default() -> Self {
        History {
            start: Instant::now(),
            operations: Mutex::new(Vec::new()),
        }
    }
}

impl History {
    /// Time since the history began.
    pub fn now(&self) -> Duration {
        self.start.elapsed()
    }

    pub fn record(&self, operation: Operation) {
        self.operations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(operation);
    }

    /// Runs `call` and records it.
    pub async fn observe<F>(
        &self,
        client: usize,
        kind: &'static str,
        key: String,
        input: String,
        node: String,
        call: F,
    ) -> Outcome
    where
        F: std::future::Future<Output = Result<String, mandate_client::ClientError>>,
    {
        let invoked = self.now();
        let outcome = Outcome::of(call.await);
        self.record(Operation {
            client,
            kind,
            key,
            input,
            node,
            invoked,
            completed: self.now(),
            outcome: outcome.clone(),
        });
        if matches!(
            outcome,
            Outcome::Failed {
                code: Code::Unavailable,
                ..
            }
        ) {
            // Every node refused or was down: give the cluster a moment rather than spin.
            tokio::time::sleep(UNAVAILABLE_BACKOFF).await;
        }
        outcome
    }

    pub fn operations(&self) -> Vec<Operation> {
        self.operations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl Outcome {
    /// Classifies a client result: refusals the cluster decided, and requests no node could
    /// take, are `Failed` (the write did not happen); no answer or "outcome unknown" is
    /// `Unknown`.
    pub fn of(result: Result<String, mandate_client::ClientError>) -> Outcome {
        match result {
            Ok(value) => Outcome::Ok { value },
            Err(e @ mandate_client::ClientError::Status { .. })
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
                    code: e.code(),
                    error: e.to_string(),
                }
            }
            // The request reached no node that could act on it.
            Err(e @ mandate_client::ClientError::Unavailable(_)) => Outcome::Failed {
                code: Code::Unavailable,
                error: e.to_string(),
            },
            Err(e) => Outcome::Unknown {
                error: e.to_string(),
            },
        }
    }

    pub fn is_ok(&self) -> bool {
        matches!(self, Outcome::Ok { .. })
    }
}
