//! The layout of the state machine's key space. Every key of the materialized state is built
//! here, so the layout can be read in one place.

/// `agent/<id>` → [`crate::pb::Agent`].
pub const AGENT_PREFIX: &[u8] = b"agent/";
/// `agent-name/<name>` → agent id.
pub const AGENT_NAME_PREFIX: &[u8] = b"agent-name/";
/// `token/<id>` → [`crate::pb::OperatorToken`].
pub const TOKEN_PREFIX: &[u8] = b"token/";
/// `audit/<log index: u64 BE><sequence: u32 BE>` → [`crate::pb::AuditRecord`].
pub const AUDIT_PREFIX: &[u8] = b"audit/";
/// → [`crate::pb::AuditHead`]: the newest audit record's position and hash.
pub const AUDIT_HEAD: &[u8] = b"audit-head";
/// → [`crate::pb::AuditPosition`] of the record the last checkpoint vouched for.
pub const AUDIT_CHECKPOINT: &[u8] = b"audit-checkpoint";
/// → [`crate::pb::AuditBase`], once the trail was compacted.
pub const AUDIT_BASE: &[u8] = b"audit-base";
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

pub fn audit(log_index: u64, sequence: u32) -> Vec<u8> {
    let mut rest = [0u8; 12];
    rest[..8].copy_from_slice(&log_index.to_be_bytes());
    rest[8..].copy_from_slice(&sequence.to_be_bytes());
    join(AUDIT_PREFIX, &rest)
}

/// The position an audit key stands for.
pub fn split_audit(key: &[u8]) -> Option<(u64, u32)> {
    let rest = key.strip_prefix(AUDIT_PREFIX)?;
    if rest.len() != 12 {
        return None;
    }
    let index = u64::from_be_bytes(rest[..8].try_into().ok()?);
    let sequence = u32::from_be_bytes(rest[8..].try_into().ok()?);
    Some((index, sequence))
}

/// `delegation/<id>` → [`crate::pb::Delegation`].
pub const DELEGATION_PREFIX: &[u8] = b"delegation/";
/// `delegation-user/<user>/<id>` → empty (delegations by root user).
pub const DELEGATION_BY_USER_PREFIX: &[u8] = b"delegation-user/";
/// `delegation-agent/<agent>/<id>` → empty (delegations by delegate).
pub const DELEGATION_BY_AGENT_PREFIX: &[u8] = b"delegation-agent/";
/// `delegation-child/<parent>/<id>` → empty (re-delegations below a delegation).
pub const DELEGATION_CHILD_PREFIX: &[u8] = b"delegation-child/";
/// `grant/<id>` → [`crate::pb::Grant`].
pub const GRANT_PREFIX: &[u8] = b"grant/";
/// `grant-delegation/<delegation>/<grant>` → empty (grants issued under a delegation).
pub const GRANT_BY_DELEGATION_PREFIX: &[u8] = b"grant-delegation/";
/// `grant-expiry/<expires_ms: u64 BE><grant id>` → empty, while the grant is active.
pub const GRANT_EXPIRY_PREFIX: &[u8] = b"grant-expiry/";
/// `policy/<name>` → [`crate::pb::PolicyDocument`].
pub const POLICY_PREFIX: &[u8] = b"policy/";
/// → the cluster policy version (u64 BE), bumped by every policy change.
pub const POLICY_VERSION: &[u8] = b"policy-version";
/// `approval/<id>` → [`crate::pb::Approval`].
pub const APPROVAL_PREFIX: &[u8] = b"approval/";
/// `approval-user/<user>/<id>` → empty.
pub const APPROVAL_BY_USER_PREFIX: &[u8] = b"approval-user/";
/// `approval-delegation/<delegation>/<id>` → empty.
pub const APPROVAL_BY_DELEGATION_PREFIX: &[u8] = b"approval-delegation/";
/// `approval-expiry/<expires_ms: u64 BE><id>` → empty, while the approval is pending.
pub const APPROVAL_EXPIRY_PREFIX: &[u8] = b"approval-expiry/";
/// `signing-key/<kid>` → [`crate::pb::SigningKey`].
pub const SIGNING_KEY_PREFIX: &[u8] = b"signing-key/";
/// → the kid of the active signing key.
pub const ACTIVE_SIGNING_KEY: &[u8] = b"signing-key-active";
/// `issuer/<name>` → [`crate::pb::TrustedIssuer`].
pub const ISSUER_PREFIX: &[u8] = b"issuer/";
/// `secret-latest/<path>` → the latest version (u64 BE).
pub const SECRET_LATEST_PREFIX: &[u8] = b"secret-latest/";
/// `secret-version/<path>\0<version: u64 BE>` → [`crate::pb::SecretVersion`].
pub const SECRET_VERSION_PREFIX: &[u8] = b"secret-version/";
/// `jti/<agent>/<jti>` → the assertion's expiry (u64 BE): the replay cache.
pub const JTI_PREFIX: &[u8] = b"jti/";
/// `jti-expiry/<expires_ms: u64 BE><agent>/<jti>` → empty.
pub const JTI_EXPIRY_PREFIX: &[u8] = b"jti-expiry/";
/// `expiry-floor/<index prefix>` → a key of that expiry index below which it holds no entry.
/// Scans of the index start there, not at the prefix, so they skip the tombstones of every
/// entry purged before.
pub const EXPIRY_FLOOR_PREFIX: &[u8] = b"expiry-floor/";

fn join_all(prefix: &[u8], parts: &[&[u8]]) -> Vec<u8> {
    let mut key = prefix.to_vec();
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            key.push(b'/');
        }
        key.extend_from_slice(part);
    }
    key
}

/// The least key of the timed index `prefix` at `at_ms`.
pub fn timed_start(prefix: &[u8], at_ms: u64) -> Vec<u8> {
    timed(prefix, at_ms, b"")
}

pub fn expiry_floor(index_prefix: &[u8]) -> Vec<u8> {
    let mut key = EXPIRY_FLOOR_PREFIX.to_vec();
    key.extend_from_slice(index_prefix);
    key
}

fn timed(prefix: &[u8], at_ms: u64, rest: &[u8]) -> Vec<u8> {
    let mut key = prefix.to_vec();
    key.extend_from_slice(&at_ms.to_be_bytes());
    key.extend_from_slice(rest);
    key
}

pub fn delegation(id: &str) -> Vec<u8> {
    join(DELEGATION_PREFIX, id.as_bytes())
}
pub fn delegation_by_user(user: &str, id: &str) -> Vec<u8> {
    join_all(DELEGATION_BY_USER_PREFIX, &[user.as_bytes(), id.as_bytes()])
}
pub fn delegation_by_agent(agent: &str, id: &str) -> Vec<u8> {
    join_all(
        DELEGATION_BY_AGENT_PREFIX,
        &[agent.as_bytes(), id.as_bytes()],
    )
}
pub fn delegation_child(parent: &str, id: &str) -> Vec<u8> {
    join_all(DELEGATION_CHILD_PREFIX, &[parent.as_bytes(), id.as_bytes()])
}
pub fn grant(id: &str) -> Vec<u8> {
    join(GRANT_PREFIX, id.as_bytes())
}
pub fn grant_by_delegation(delegation: &str, grant: &str) -> Vec<u8> {
    join_all(
        GRANT_BY_DELEGATION_PREFIX,
        &[delegation.as_bytes(), grant.as_bytes()],
    )
}
pub fn grant_expiry(expires_ms: u64, id: &str) -> Vec<u8> {
    timed(GRANT_EXPIRY_PREFIX, expires_ms, id.as_bytes())
}
pub fn policy(name: &str) -> Vec<u8> {
    join(POLICY_PREFIX, name.as_bytes())
}
pub fn approval(id: &str) -> Vec<u8> {
    join(APPROVAL_PREFIX, id.as_bytes())
}
pub fn approval_by_user(user: &str, id: &str) -> Vec<u8> {
    join_all(APPROVAL_BY_USER_PREFIX, &[user.as_bytes(), id.as_bytes()])
}
pub fn approval_by_delegation(delegation: &str, id: &str) -> Vec<u8> {
    join_all(
        APPROVAL_BY_DELEGATION_PREFIX,
        &[delegation.as_bytes(), id.as_bytes()],
    )
}
pub fn approval_expiry(expires_ms: u64, id: &str) -> Vec<u8> {
    timed(APPROVAL_EXPIRY_PREFIX, expires_ms, id.as_bytes())
}
pub fn signing_key(kid: &str) -> Vec<u8> {
    join(SIGNING_KEY_PREFIX, kid.as_bytes())
}
pub fn issuer(name: &str) -> Vec<u8> {
    join(ISSUER_PREFIX, name.as_bytes())
}
pub fn secret_latest(path: &str) -> Vec<u8> {
    join(SECRET_LATEST_PREFIX, path.as_bytes())
}
pub fn secret_version(path: &str, version: u64) -> Vec<u8> {
    let mut key = join(SECRET_VERSION_PREFIX, path.as_bytes());
    key.push(0);
    key.extend_from_slice(&version.to_be_bytes());
    key
}
pub fn jti(agent: &str, jti: &str) -> Vec<u8> {
    join_all(JTI_PREFIX, &[agent.as_bytes(), jti.as_bytes()])
}
pub fn jti_expiry(expires_ms: u64, agent: &str, jti: &str) -> Vec<u8> {
    timed(
        JTI_EXPIRY_PREFIX,
        expires_ms,
        &join_all(b"", &[agent.as_bytes(), jti.as_bytes()]),
    )
}

/// The id at the end of an index key `<prefix><owner>/<id>`.
pub fn last_segment(key: &[u8]) -> String {
    let start = key.iter().rposition(|b| *b == b'/').map_or(0, |i| i + 1);
    String::from_utf8_lossy(&key[start..]).into_owned()
}

/// The `(time, rest)` of a timed index key.
pub fn split_timed(prefix: &[u8], key: &[u8]) -> Option<(u64, Vec<u8>)> {
    let rest = key.strip_prefix(prefix)?;
    let (at, id) = rest.split_at_checked(8)?;
    Some((u64::from_be_bytes(at.try_into().ok()?), id.to_vec()))
}
