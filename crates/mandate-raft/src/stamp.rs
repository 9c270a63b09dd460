//! The leader's stamp: wall-clock time, a request id and any ids the command creates. Stamping
//! happens only on the leader, just before a batch is proposed, so apply never needs a clock or
//! a random source.

use std::time::{SystemTime, UNIX_EPOCH};

use mandate_core::pb::{self, command::Kind};
use mandate_core::AgentId;
use rand::RngCore;

/// Milliseconds since the Unix epoch on this node's clock.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Stamps one command: time, request id (kept if the caller supplied one) and generated ids.
pub fn stamp(command: &mut pb::Command, time_ms: u64, rng: &mut impl RngCore) {
    command.time_ms = time_ms;
    if command.request_id.is_empty() {
        let mut id = [0u8; 16];
        rng.fill_bytes(&mut id);
        command.request_id = format!("req_{}", hex(&id));
    }
    let mut id = |prefix: &str| {
        let mut bytes = [0u8; 16];
        rng.fill_bytes(&mut bytes);
        format!("{prefix}{}", hex(&bytes))
    };
    match command.kind.as_mut() {
        Some(Kind::RegisterAgent(register)) => {
            let mut bytes = [0u8; 16];
            rng.fill_bytes(&mut bytes);
            register.agent_id = AgentId::from_random(bytes).as_str().to_owned();
        }
        Some(Kind::CreateDelegation(c)) => c.delegation_id = id("dlg_"),
        Some(Kind::Authorize(c)) => {
            c.grant_id = id("grt_");
            c.approval_id = id("apv_");
        }
        Some(Kind::DecideApproval(c)) => c.grant_id = id("grt_"),
        _ => {}
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
