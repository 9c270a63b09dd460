//! Operator tokens: `mdt_<token id>.<secret>`. Only the SHA-256 of the secret is stored; the
//! secret has 256 bits of entropy, so a fast hash is the right tool (no password stretching).

use sha2::{Digest, Sha256};

use crate::error::DomainError;

/// Prefix of every operator token.
pub const TOKEN_PREFIX: &str = "mdt_";
/// Prefix of every token id.
pub const TOKEN_ID_PREFIX: &str = "tok_";

/// A token split into its id (public, stored in clear) and secret (never stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorSecret {
    pub id: String,
    pub secret: String,
}

impl OperatorSecret {
    /// Builds a token from the id and secret bytes drawn by the node that creates it.
    pub fn from_random(id_bytes: [u8; 8], secret_bytes: [u8; 32]) -> Self {
        OperatorSecret {
            id: format!("{TOKEN_ID_PREFIX}{}", hex::encode(id_bytes)),
            secret: hex::encode(secret_bytes),
        }
    }

    /// Parses a token presented by a caller.
    pub fn parse(token: &str) -> Result<Self, DomainError> {
        let malformed = || DomainError::unauthenticated("malformed operator token");
        let rest = token.strip_prefix(TOKEN_PREFIX).ok_or_else(malformed)?;
        let (id, secret) = rest.split_once('.').ok_or_else(malformed)?;
        let id_ok = id
            .strip_prefix(TOKEN_ID_PREFIX)
            .is_some_and(|hex| hex.len() == 16 && hex.bytes().all(|b| b.is_ascii_hexdigit()));
        if !id_ok || secret.len() != 64 || !secret.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(malformed());
        }
        Ok(OperatorSecret {
            id: id.to_owned(),
            secret: secret.to_owned(),
        })
    }

    pub fn secret_sha256(&self) -> Vec<u8> {
        Sha256::digest(self.secret.as_bytes()).to_vec()
    }

    /// The token as handed to the operator.
    pub fn render(&self) -> String {
        format!("{TOKEN_PREFIX}{}.{}", self.id, self.secret)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rendered_token_parses_back_to_the_same_id_and_secret() {
        let token = OperatorSecret::from_random([7; 8], [9; 32]);
        assert_eq!(OperatorSecret::parse(&token.render()), Ok(token));
    }

    #[test]
    fn malformed_tokens_are_unauthenticated() {
        for bad in [
            "",
            "mdt_",
            "Bearer x",
            "mdt_tok_0011.zz",
            "mdt_tok_00112233445566.00",
        ] {
            let err = OperatorSecret::parse(bad).expect_err(bad);
            assert_eq!(err.kind, crate::error::ErrorKind::Unauthenticated);
        }
    }
}
