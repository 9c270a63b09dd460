//! The layout of the state machine's key space. Every key of the materialized state is built
//! here, so the layout can be read in one place.

/// `agent/<id>` → [`crate::pb::Agent`].
pub const AGENT_PREFIX: &[u8] = b"agent/";
/// `agent-name/<name>` → agent id.
pub const AGENT_NAME_PREFIX: &[u8] = b"agent-name/";
/// `token/<id>` → [`crate::pb::OperatorToken`].
pub const TOKEN_PREFIX: &[u8] = b"token/";
/// `event/<log index: u64 BE><sequence: u32 BE>` → [`crate::pb::EventRecord`].
pub const EVENT_PREFIX: &[u8] = b"event/";
/// → [`crate::pb::ClusterInfo`], present once the cluster is bootstrapped.
pub const CLUSTER: &[u8] = b"cluster";
/// → the latest command time applied (u64 BE, milliseconds). Command time never goes backwards.
pub const CLOCK: &[u8] = b"clock";
/// Keys owned by the storage layer (applied log id, membership) start with this byte; the domain
/// never writes under it.
pub const STORAGE_PREFIX: &[u8] = b"\x00";

fn join(prefix: &[u8], rest: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(prefix.len() + rest.len());
    key.extend_from_slice(prefix);
    key.extend_from_slice(rest);
    key
}

pub fn agent(id: &str) -> Vec<u8> {
    join(AGENT_PREFIX, id.as_bytes())
}

pub fn agent_name(name: &str) -> Vec<u8> {
    join(AGENT_NAME_PREFIX, name.as_bytes())
}

pub fn token(id: &str) -> Vec<u8> {
    join(TOKEN_PREFIX, id.as_bytes())
}

pub fn event(log_index: u64, sequence: u32) -> Vec<u8> {
    let mut rest = [0u8; 12];
    rest[..8].copy_from_slice(&log_index.to_be_bytes());
    rest[8..].copy_from_slice(&sequence.to_be_bytes());
    join(EVENT_PREFIX, &rest)
}
