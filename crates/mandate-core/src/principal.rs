//! The three principal kinds. They are distinct types everywhere, so an agent id can never be
//! passed where a user id is expected.

use std::fmt;

use crate::error::DomainError;
use crate::limits::USER_ID_BYTES_MAX;

/// Prefix of every agent id; names may not start with it, so id-or-name lookups are unambiguous.
pub const AGENT_ID_PREFIX: &str = "agt_";
/// Hex digits after the prefix of an agent id (128 random bits drawn by the leader).
pub const AGENT_ID_HEX_LEN: usize = 32;

/// A human, authenticated by a trusted issuer; here, the owner of an agent.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UserId(String);

/// A registered agent (`agt_` followed by 32 lowercase hex digits).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AgentId(String);

/// A classic non-human identity.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceId(String);

/// Any principal, tagged with its kind.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Principal {
    User(UserId),
    Agent(AgentId),
    Service(ServiceId),
}

fn is_identifier_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@' | ':' | '+')
}

fn parse_identifier(field: &str, value: &str) -> Result<String, DomainError> {
    if value.is_empty() {
        return Err(DomainError::invalid(field, "must not be empty"));
    }
    if value.len() > USER_ID_BYTES_MAX {
        return Err(DomainError::invalid(
            field,
            format!(
                "is {} bytes; at most {USER_ID_BYTES_MAX} allowed",
                value.len()
            ),
        ));
    }
    if let Some(c) = value.chars().find(|c| !is_identifier_char(*c)) {
        return Err(DomainError::invalid(
            field,
            format!("contains {c:?}; allowed are letters, digits and . _ - @ : +"),
        ));
    }
    Ok(value.to_owned())
}

impl UserId {
    pub fn parse(field: &str, value: &str) -> Result<Self, DomainError> {
        parse_identifier(field, value).map(UserId)
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl ServiceId {
    pub fn parse(field: &str, value: &str) -> Result<Self, DomainError> {
        parse_identifier(field, value).map(ServiceId)
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl AgentId {
    /// Builds the id the leader draws for a new agent from 16 random bytes.
    pub fn from_random(bytes: [u8; 16]) -> Self {
        AgentId(format!("{AGENT_ID_PREFIX}{}", hex::encode(bytes)))
    }
    pub fn parse(field: &str, value: &str) -> Result<Self, DomainError> {
        let well_formed = value.strip_prefix(AGENT_ID_PREFIX).is_some_and(|hex| {
            hex.len() == AGENT_ID_HEX_LEN
                && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        });
        if well_formed {
            Ok(AgentId(value.to_owned()))
        } else {
            Err(DomainError::invalid(
                field,
                format!(
                    "{value:?} is not an agent id ({AGENT_ID_PREFIX} followed by {AGENT_ID_HEX_LEN} lowercase hex digits)"
                ),
            ))
        }
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "User::{:?}", self.0)
    }
}

impl fmt::Display for AgentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Agent::{:?}", self.0)
    }
}

impl fmt::Display for ServiceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Service::{:?}", self.0)
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Principal::User(id) => id.fmt(f),
            Principal::Agent(id) => id.fmt(f),
            Principal::Service(id) => id.fmt(f),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_ids_round_trip_and_reject_malformed_values() {
        let id = AgentId::from_random([0xab; 16]);
        assert_eq!(AgentId::parse("id", id.as_str()), Ok(id));
        for bad in [
            "",
            "agt_",
            "agt_ABABABABABABABABABABABABABABABAB",
            "usr_00",
            "billing-bot",
        ] {
            let err = AgentId::parse("id", bad).expect_err(bad);
            assert_eq!(err.field, "id");
        }
    }

    #[test]
    fn principals_of_different_kinds_never_compare_equal() {
        let user = Principal::User(UserId::parse("owner", "same").expect("valid"));
        let service = Principal::Service(ServiceId::parse("owner", "same").expect("valid"));
        assert_ne!(user, service);
        assert_eq!(user.to_string(), "User::\"same\"");
    }

    #[test]
    fn user_ids_name_the_offending_character() {
        let err = UserId::parse("owner", "al ice").expect_err("space is not allowed");
        assert_eq!(err.field, "owner");
        assert!(err.message.contains("' '"), "{}", err.message);
    }
}
