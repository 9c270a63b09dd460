//! Credentials the CLI makes: agent client assertions, dev-issuer user tokens, key files, and
//! durations such as `1h`.

use std::path::Path;

use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::SigningKey;
use mandate_client::{pb, Client};

use crate::Failure;

/// `iss` and `aud` of the development user-token issuer.
pub const DEV_ISSUER: &str = "mandate-dev";
pub const DEV_AUDIENCE: &str = "mandate";

/// Parses `90s`, `15m`, `1h`, `7d` (or plain seconds).
pub fn parse_duration(text: &str) -> Result<u64, Failure> {
    let bad = || {
        Failure(format!(
            "{text:?} is not a duration (like 90s, 15m, 1h, 7d)"
        ))
    };
    let (number, unit) = text.trim().split_at(
        text.trim()
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.trim().len()),
    );
    let n: u64 = number.parse().map_err(|_| bad())?;
    let factor = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(bad()),
    };
    n.checked_mul(factor).ok_or_else(bad)
}

/// Reads an Ed25519 private key (PKCS#8 PEM).
pub fn read_signing_key(path: &Path) -> Result<SigningKey, Failure> {
    let pem = std::fs::read_to_string(path)
        .map_err(|e| Failure(format!("cannot read {}: {e}", path.display())))?;
    SigningKey::from_pkcs8_pem(&pem).map_err(|_| {
        Failure(format!(
            "{} is not a PEM Ed25519 private key",
            path.display()
        ))
    })
}

/// Writes secret `text` to a new file readable by its owner only (mode 0600), synced; refuses
/// to overwrite.
pub fn write_private(path: &Path, text: &str) -> Result<(), Failure> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options
        .open(path)
        .map_err(|e| Failure(format!("cannot create {}: {e}", path.display())))?;
    std::io::Write::write_all(&mut file, text.as_bytes())?;
    file.sync_all()?;
    Ok(())
}

/// Writes a new Ed25519 private key (PKCS#8 PEM, mode 0600); refuses to overwrite.
pub fn write_new_signing_key(path: &Path) -> Result<SigningKey, Failure> {
    let signing = SigningKey::generate(&mut rand::rngs::OsRng);
    let pem = signing
        .to_pkcs8_pem(Default::default())
        .map_err(|e| Failure(format!("encoding the private key: {e}")))?;
    write_private(path, &pem)?;
    Ok(signing)
}

pub use mandate_client::credentials::{agent_assertion, jwks_of, public_jwk, user_token};

impl From<mandate_client::credentials::SignError> for Failure {
    fn from(e: mandate_client::credentials::SignError) -> Self {
        Failure(e.to_string())
    }
}

/// A user token from the development issuer.
pub fn dev_user_token(issuer_key: &SigningKey, user: &str, ttl_s: u64) -> Result<String, Failure> {
    Ok(user_token(
        issuer_key,
        DEV_ISSUER,
        DEV_AUDIENCE,
        user,
        ttl_s,
    )?)
}

/// The cluster id (the audience of agent assertions), from the public JWKS endpoint.
pub async fn cluster_id(client: &Client) -> Result<String, Failure> {
    let jwks = client
        .authz(|mut c| async move { c.jwks(pb::JwksRequest {}).await })
        .await?;
    Ok(jwks.cluster_id)
}

/// An agent's signing identity, from `--agent` and `--agent-key`.
pub struct AgentIdentity {
    pub id: String,
    pub key: SigningKey,
}

impl AgentIdentity {
    pub fn load(id: &str, key_file: &Path) -> Result<Self, Failure> {
        Ok(AgentIdentity {
            id: id.to_owned(),
            key: read_signing_key(key_file)?,
        })
    }

    pub async fn assertion(&self, client: &Client) -> Result<String, Failure> {
        Ok(agent_assertion(
            &self.id,
            &self.key,
            &cluster_id(client).await?,
        )?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_units() {
        assert_eq!(parse_duration("90").ok(), Some(90));
        assert_eq!(parse_duration("15m").ok(), Some(900));
        assert_eq!(parse_duration("1h").ok(), Some(3600));
        assert!(parse_duration("1w").is_err());
        assert!(parse_duration("h").is_err());
    }
}
