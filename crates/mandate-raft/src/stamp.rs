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
    let mut id = |prefix: &str| timed_id(prefix, time_ms, rng);
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

/// A new record's id: `prefix`, the stamp time as 12 hex digits of milliseconds, then 80 random
/// bits as 20 more. Ids sort by the time they were issued, so the records they key (and the
/// indexes that end in them) arrive at the end of their key ranges in the state store rather
/// than all over them (docs/benchmarks.md, One compaction worker, and time-ordered ids). The
/// random part keeps them unguessable and, at 80 bits a millisecond, unique.
fn timed_id(prefix: &str, time_ms: u64, rng: &mut impl RngCore) -> String {
    let mut random = [0u8; 10];
    rng.fill_bytes(&mut random);
    let millis = time_ms & 0xffff_ffff_ffff;
    format!("{prefix}{millis:012x}{}", hex(&random))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::SeedableRng;

    #[test]
    fn ids_issued_later_sort_after_earlier_ones_whatever_their_random_part() {
        let mut rng = StdRng::seed_from_u64(7);
        let times = [
            1_700_000_000_000,
            1_700_000_000_001,
            1_700_000_001_000,
            1_800_000_000_000,
        ];
        let ids: Vec<String> = times
            .iter()
            .flat_map(|&t| (0..50).map(move |_| t))
            .map(|t| timed_id("grt_", t, &mut rng))
            .collect();
        for pair in ids.windows(2) {
            let (earlier, later) = (&pair[0], &pair[1]);
            if earlier[4..16] != later[4..16] {
                assert!(earlier < later, "{earlier} should sort before {later}");
            }
        }
        let mut distinct = ids.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), ids.len(), "every id is new");
    }

    #[test]
    fn an_id_is_its_prefix_then_32_hex_digits_the_first_12_the_time() {
        let mut rng = StdRng::seed_from_u64(1);
        let id = timed_id("dlg_", 0x0123_4567_89ab, &mut rng);
        assert_eq!(id.len(), 4 + 32);
        assert!(id.starts_with("dlg_0123456789ab"), "{id}");
        assert!(id[4..]
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
    }

    #[test]
    fn stamping_an_authorization_gives_it_grant_and_approval_ids_of_its_time() {
        let mut rng = StdRng::seed_from_u64(3);
        let mut command = pb::Command {
            kind: Some(Kind::Authorize(pb::Authorize::default())),
            ..Default::default()
        };
        stamp(&mut command, 0x0000_0000_1000, &mut rng);
        let Some(Kind::Authorize(c)) = &command.kind else {
            panic!("the command is still an authorization");
        };
        assert!(c.grant_id.starts_with("grt_000000001000"), "{}", c.grant_id);
        assert!(
            c.approval_id.starts_with("apv_000000001000"),
            "{}",
            c.approval_id
        );
        assert_eq!(command.time_ms, 0x1000);
        assert!(command.request_id.starts_with("req_"));
    }
}
