//! Credentials the CLI makes: agent client assertions, dev-issuer user tokens, key files, and
//! durations such as `1h`.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::{SigningKey, VerifyingKey};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use mandate_client::{pb, Client};
use serde_json::json;

use crate::Failure;

/// Lifetime of the client assertions the CLI signs.
pub const ASSERTION_LIFETIME_S: u64 = 30;
/// `iss` and `aud` of the development user-token issuer.
pub const DEV_ISSUER: &str = "mandate-dev";
pub const DEV_AUDIENCE: &str = "mandate";

pub fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

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

/// The public JWK of a key, with its RFC 7638 thumbprint as `kid`.
pub fn public_jwk(key: &VerifyingKey) -> pb::Jwk {
    let x = URL_SAFE_NO_PAD.encode(key.as_bytes());
    pb::Jwk {
        kid: mandate_core::validate::jwk_thumbprint(&x),
        kty: "OKP".into(),
        crv: "Ed25519".into(),
        x,
    }
}

fn sign(key: &SigningKey, claims: &serde_json::Value) -> Result<String, Failure> {
    let der = key.to_pkcs8_der().map_err(|e| Failure(e.to_string()))?;
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(public_jwk(&key.verifying_key()).kid);
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_ed_der(der.as_bytes()))
        .map_err(|e| Failure(e.to_string()))
}

/// An agent's client assertion for the cluster `cluster_id`.
pub fn agent_assertion(
    agent_id: &str,
    key: &SigningKey,
    cluster_id: &str,
) -> Result<String, Failure> {
    let now = now_s();
    sign(
        key,
        &json!({
            "iss": agent_id,
            "sub": agent_id,
            "aud": cluster_id,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME_S,
            "jti": hex::encode(rand::random::<[u8; 16]>()),
        }),
    )
}

/// A user token signed by an issuer's key.
pub fn user_token(
    issuer_key: &SigningKey,
    issuer: &str,
    audience: &str,
    user: &str,
    ttl_s: u64,
) -> Result<String, Failure> {
    let now = now_s();
    sign(
        issuer_key,
        &json!({ "iss": issuer, "aud": audience, "sub": user, "iat": now, "exp": now + ttl_s }),
    )
}

/// A user token from the development issuer.
pub fn dev_user_token(issuer_key: &SigningKey, user: &str, ttl_s: u64) -> Result<String, Failure> {
    user_token(issuer_key, DEV_ISSUER, DEV_AUDIENCE, user, ttl_s)
}

/// The JWKS publishing one Ed25519 key.
pub fn jwks_of(key: &SigningKey) -> String {
    let jwk = public_jwk(&key.verifying_key());
    json!({ "keys": [{ "kty": "OKP", "crv": "Ed25519", "x": jwk.x, "kid": jwk.kid, "alg": "EdDSA", "use": "sig" }] }).to_string()
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
        agent_assertion(&self.id, &self.key, &cluster_id(client).await?)
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
