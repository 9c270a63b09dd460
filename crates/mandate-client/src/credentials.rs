//! Credentials a caller signs for itself: an agent's client assertion (RFC 7523 style) and a
//! user token from an issuer the cluster trusts, with the public JWK and JWKS that publish
//! their keys.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ed25519_dalek::pkcs8::EncodePrivateKey;
use ed25519_dalek::{SigningKey, VerifyingKey};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

use crate::pb;

/// Lifetime of the client assertions signed here (the cluster accepts at most 60 s).
pub const ASSERTION_LIFETIME_S: u64 = 30;

/// Why a credential could not be signed.
#[derive(Debug, thiserror::Error)]
#[error("signing a credential: {0}")]
pub struct SignError(String);

/// Seconds since the Unix epoch.
pub fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
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

/// The JWKS publishing one Ed25519 key, as JSON.
pub fn jwks_of(key: &SigningKey) -> String {
    let jwk = public_jwk(&key.verifying_key());
    json!({ "keys": [{ "kty": "OKP", "crv": "Ed25519", "x": jwk.x, "kid": jwk.kid, "alg": "EdDSA", "use": "sig" }] }).to_string()
}

fn sign(key: &SigningKey, claims: &serde_json::Value) -> Result<String, SignError> {
    let der = key.to_pkcs8_der().map_err(|e| SignError(e.to_string()))?;
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(public_jwk(&key.verifying_key()).kid);
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_ed_der(der.as_bytes()))
        .map_err(|e| SignError(e.to_string()))
}

/// An agent's client assertion for the cluster `cluster_id`, with a fresh `jti`.
pub fn agent_assertion(
    agent_id: &str,
    key: &SigningKey,
    cluster_id: &str,
) -> Result<String, SignError> {
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

/// A user token for `user` signed by an issuer's key.
pub fn user_token(
    issuer_key: &SigningKey,
    issuer: &str,
    audience: &str,
    user: &str,
    ttl_s: u64,
) -> Result<String, SignError> {
    let now = now_s();
    sign(
        issuer_key,
        &json!({ "iss": issuer, "aud": audience, "sub": user, "iat": now, "exp": now + ttl_s }),
    )
}
