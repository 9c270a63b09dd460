//! The record of what clients asked and what they were told.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How an operation ended, as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The cluster acknowledged it; `value` is what it answered (an id, a count).
    Ok { value: String },
    /// The cluster refused it: it did not happen.
    Failed { error: String },
    /// No answer (timeout, connection lost, "outcome unknown"): it may or may not have happened.
    Unknown { error: String },
}

/// One operation: what was asked, of which node, when, and how it ended.
#[derive(Debug, Clone)]
pub struct Operation {
    pub client: usize,
    /// `register`, `consume`, ...
    pub kind: &'static str,
    /// The operation's argument (the agent name registered, the grant consumed, ...).
    pub key: String,
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

    pub fn operations(&self) -> Vec<Operation> {
        self.operations
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
