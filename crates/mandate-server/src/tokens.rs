//! JWTs: grant tokens signed with the cluster keyring (EdDSA), agent client assertions
//! (RFC 7523 style, EdDSA with a registered agent key) and user tokens from trusted issuers
//! (RS256, ES256, EdDSA). Parsing and signature checks are jsonwebtoken's; this module only
//! chooses keys and states the rules.

use std::collections::HashMap;
use std::sync::Mutex;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ed25519_dalek::pkcs8::EncodePrivateKey;
use jsonwebtoken::jwk::{AlgorithmParameters, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use mandate_core::state::{decode, StateExt, StateRead};
use mandate_core::{authz, keys, pb, validate, AgentId, DomainError, UserId};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::sealing::Kek;

/// Longest lifetime of an agent's client assertion.
pub const ASSERTION_LIFETIME_S_MAX: u64 = 60;
/// Clock skew tolerated on assertions and grant tokens.
pub const LEEWAY_S: u64 = 5;
/// Longest `jti` accepted.
pub const JTI_BYTES_MAX: usize = 128;

fn unauthenticated(message: impl Into<String>) -> DomainError {
    DomainError::unauthenticated(message)
}

fn now_s() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

/// The `iss` of every grant token of a cluster.
pub fn grant_issuer(cluster_id: &str) -> String {
    format!("urn:mandate:{cluster_id}")
}

/// The `sub` of audit checkpoints, so that one is never mistaken for a grant.
pub const CHECKPOINT_SUBJECT: &str = "mandate:audit-checkpoint";

fn signing_purpose(kid: &str) -> String {
    format!("mandate:signing-key:{kid}")
}

/// A new cluster signing key, its private half sealed under the KEK.
pub fn new_signing_key(kek: &Kek) -> pb::SigningKey {
    let mut seed = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut seed);
    let signing = ed25519_dalek::SigningKey::from_bytes(&seed);
    let x = URL_SAFE_NO_PAD.encode(signing.verifying_key().as_bytes());
    let kid = validate::jwk_thumbprint(&x);
    pb::SigningKey {
        sealed_private: kek.seal(&signing_purpose(&kid), &seed),
        kid,
        x,
        created_ms: 0,
        active: true,
    }
}

fn state_fault(e: mandate_core::StorageFault) -> DomainError {
    DomainError::new(
        mandate_core::error::ErrorKind::FailedPrecondition,
        "state",
        e.0,
    )
}

/// Every published signing key.
pub fn signing_keys(state: &(impl StateRead + ?Sized)) -> Result<Vec<pb::SigningKey>, DomainError> {
    state
        .scan_prefix(keys::SIGNING_KEY_PREFIX)
        .map_err(state_fault)?
        .iter()
        .map(|(k, v)| decode(k, v).map_err(state_fault))
        .collect()
}

/// The JWKS document: every signing key, active first.
pub fn jwks(state: &(impl StateRead + ?Sized)) -> Result<(Value, String), DomainError> {
    let mut keys = signing_keys(state)?;
    keys.sort_by_key(|k| (!k.active, std::cmp::Reverse(k.created_ms)));
    let active = keys
        .iter()
        .find(|k| k.active)
        .map(|k| k.kid.clone())
        .unwrap_or_default();
    let published: Vec<Value> = keys
        .iter()
        .map(|k| json!({ "kty": "OKP", "crv": "Ed25519", "x": k.x, "kid": k.kid, "alg": "EdDSA", "use": "sig" }))
        .collect();
    Ok((json!({ "keys": published }), active))
}

/// Signs grant tokens, keeping unsealed keys in memory.
pub struct Signer {
    kek: Option<Kek>,
    keys: Mutex<HashMap<String, EncodingKey>>,
}

#[derive(Serialize, Deserialize)]
struct Actor {
    sub: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    act: Option<Box<Actor>>,
}

#[derive(Serialize, Deserialize)]
struct AuthorizationDetail {
    #[serde(rename = "type")]
    kind: String,
    actions: Vec<String>,
    locations: Vec<String>,
}

#[derive(Serialize, Deserialize)]
struct GrantClaims {
    iss: String,
    sub: String,
    aud: String,
    act: Actor,
    authorization_details: Vec<AuthorizationDetail>,
    jti: String,
    iat: u64,
    exp: u64,
    delegation: String,
}

/// RFC 8693 `act`: the current actor outermost, earlier actors nested inside.
fn actor_claim(chain: &[String]) -> Actor {
    let mut actor: Option<Box<Actor>> = None;
    for agent in chain {
        actor = Some(Box::new(Actor {
            sub: agent.clone(),
            act: actor,
        }));
    }
    *actor.unwrap_or_else(|| {
        Box::new(Actor {
            sub: String::new(),
            act: None,
        })
    })
}

impl Signer {
    pub fn new(kek: Option<Kek>) -> Self {
        Signer {
            kek,
            keys: Mutex::new(HashMap::new()),
        }
    }

    pub fn kek(&self) -> Option<&Kek> {
        self.kek.as_ref()
    }

    fn encoding_key(
        &self,
        state: &(impl StateRead + ?Sized),
        kid: &str,
    ) -> Result<EncodingKey, DomainError> {
        let mut cache = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = cache.get(kid) {
            return Ok(k.clone());
        }
        let kek = self.kek.as_ref().ok_or_else(|| {
            DomainError::precondition(
                "kek",
                "this node has no key-encryption key (kek_file or MANDATE_KEK)",
            )
        })?;
        let key: pb::SigningKey = state
            .get(&keys::signing_key(kid))
            .map_err(state_fault)?
            .map(|b| decode(&keys::signing_key(kid), &b))
            .transpose()
            .map_err(state_fault)?
            .ok_or_else(|| DomainError::precondition("kid", format!("no signing key {kid}")))?;
        let seed = kek
            .open(&signing_purpose(kid), &key.sealed_private)
            .map_err(|e| DomainError::precondition("kek", e))?;
        let seed: [u8; 32] = seed.try_into().map_err(|_| {
            DomainError::precondition("kid", "sealed signing key has the wrong length")
        })?;
        let der = ed25519_dalek::SigningKey::from_bytes(&seed)
            .to_pkcs8_der()
            .map_err(|e| DomainError::precondition("kid", e.to_string()))?;
        let encoding = EncodingKey::from_ed_der(der.as_bytes());
        cache.insert(kid.to_owned(), encoding.clone());
        Ok(encoding)
    }

    /// A checkpoint of the audit trail: a compact JWS by the active cluster key whose claims
    /// name the record's position and hash and the count of records appended so far.
    pub fn sign_checkpoint(
        &self,
        state: &(impl StateRead + ?Sized),
        cluster_id: &str,
        head: &pb::AuditHead,
        now_s: u64,
    ) -> Result<String, DomainError> {
        let active = authz::active_signing_key(state)
            .map_err(state_fault)?
            .ok_or_else(|| DomainError::precondition("kid", "the cluster has no signing key"))?;
        let key = self.encoding_key(state, &active.kid)?;
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(active.kid);
        let claims = json!({
            "iss": grant_issuer(cluster_id),
            "sub": CHECKPOINT_SUBJECT,
            "position": format!("{}.{}", head.log_index, head.sequence),
            "hash": hex::encode(&head.hash),
            "records": head.records,
            "iat": now_s,
        });
        jsonwebtoken::encode(&header, &claims, &key)
            .map_err(|e| DomainError::precondition("checkpoint", e.to_string()))
    }

    /// The grant as a signed JWT (its claims are fully determined by the grant record).
    pub fn sign_grant(
        &self,
        state: &(impl StateRead + ?Sized),
        cluster_id: &str,
        grant: &pb::Grant,
    ) -> Result<String, DomainError> {
        let key = self.encoding_key(state, &grant.kid)?;
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(grant.kid.clone());
        let claims = GrantClaims {
            iss: grant_issuer(cluster_id),
            sub: grant.user.clone(),
            aud: if grant.audience.is_empty() {
                cluster_id.to_owned()
            } else {
                grant.audience.clone()
            },
            act: actor_claim(&grant.chain),
            authorization_details: vec![AuthorizationDetail {
                kind: "mandate".into(),
                actions: vec![grant.action.clone()],
                locations: vec![grant.resource.clone()],
            }],
            jti: grant.id.clone(),
            iat: grant.issued_ms / 1000,
            exp: grant.expires_ms.div_ceil(1000),
            delegation: grant.delegation_id.clone(),
        };
        jsonwebtoken::encode(&header, &claims, &key)
            .map_err(|e| DomainError::precondition("token", e.to_string()))
    }
}

/// Checks a grant token's signature and issuer against the published keys; returns the grant
/// id. Expiry and use are checked against the grant record by the caller.
pub fn verify_grant_token(
    state: &(impl StateRead + ?Sized),
    cluster_id: &str,
    token: &str,
) -> Result<String, DomainError> {
    let header = jsonwebtoken::decode_header(token)
        .map_err(|e| unauthenticated(format!("malformed grant token: {e}")))?;
    if header.alg != Algorithm::EdDSA {
        return Err(unauthenticated("grant tokens are EdDSA"));
    }
    let kid = header
        .kid
        .ok_or_else(|| unauthenticated("the grant token has no kid"))?;
    let key = signing_keys(state)?
        .into_iter()
        .find(|k| k.kid == kid)
        .ok_or_else(|| unauthenticated(format!("no cluster signing key {kid:?}")))?;
    let decoding =
        DecodingKey::from_ed_components(&key.x).map_err(|e| unauthenticated(e.to_string()))?;
    let mut validation = Validation::new(Algorithm::EdDSA);
    validation.set_issuer(&[grant_issuer(cluster_id)]);
    validation.validate_aud = false;
    validation.leeway = LEEWAY_S;
    validation.set_required_spec_claims(&["exp", "iss", "sub", "jti"]);
    let data = jsonwebtoken::decode::<GrantClaims>(token, &decoding, &validation)
        .map_err(|e| unauthenticated(format!("invalid grant token: {e}")))?;
    Ok(data.claims.jti)
}

#[derive(Deserialize)]
struct AssertionClaims {
    iss: String,
    sub: String,
    exp: u64,
    jti: Option<String>,
}

/// An agent authenticated by its client assertion.
pub struct VerifiedAgent {
    pub agent: pb::Agent,
    pub kid: String,
    pub jti: String,
    pub expires_ms: u64,
}

/// Checks an agent's client assertion: EdDSA with one of its registered keys, iss = sub =
/// agent id, aud = the cluster, exp at most 60 s ahead, a jti. The jti's single use is
/// enforced by apply, cluster-wide.
pub fn verify_agent_assertion(
    state: &(impl StateRead + ?Sized),
    cluster_id: &str,
    assertion: &str,
) -> Result<VerifiedAgent, DomainError> {
    if assertion.is_empty() {
        return Err(unauthenticated("an agent assertion is required"));
    }
    let header = jsonwebtoken::decode_header(assertion)
        .map_err(|e| unauthenticated(format!("malformed agent assertion: {e}")))?;
    if header.alg != Algorithm::EdDSA {
        return Err(unauthenticated(format!(
            "agent assertions must be EdDSA, not {:?}",
            header.alg
        )));
    }
    let unverified: AssertionClaims = jsonwebtoken::dangerous::insecure_decode_claims(assertion)
        .map_err(|e| unauthenticated(format!("malformed agent assertion: {e}")))?;
    AgentId::parse("agent_assertion.iss", &unverified.iss)
        .map_err(|e| unauthenticated(e.message))?;
    let agent = state
        .agent(&unverified.iss)
        .map_err(state_fault)?
        .ok_or_else(|| unauthenticated(format!("no agent {}", unverified.iss)))?;
    if agent.status != pb::AgentStatus::Active as i32 {
        return Err(unauthenticated(format!("agent {} is not active", agent.id)));
    }
    let candidates: Vec<&pb::Jwk> = match &header.kid {
        Some(kid) => agent.keys.iter().filter(|k| &k.kid == kid).collect(),
        None => agent.keys.iter().collect(),
    };
    if candidates.is_empty() {
        return Err(unauthenticated(
            "the assertion's key is not registered on the agent",
        ));
    }
    let mut validation = Validation::new(Algorithm::EdDSA);
    validation.set_audience(&[cluster_id]);
    validation.set_issuer(&[agent.id.as_str()]);
    validation.sub = Some(agent.id.clone());
    validation.leeway = LEEWAY_S;
    validation.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
    let mut last = String::from("no key verified the signature");
    for key in candidates {
        let decoding =
            DecodingKey::from_ed_components(&key.x).map_err(|e| unauthenticated(e.to_string()))?;
        match jsonwebtoken::decode::<AssertionClaims>(assertion, &decoding, &validation) {
            Ok(data) => {
                let claims = data.claims;
                if claims.exp > now_s() + ASSERTION_LIFETIME_S_MAX + LEEWAY_S {
                    return Err(unauthenticated(format!(
                        "the assertion may live at most {ASSERTION_LIFETIME_S_MAX} s"
                    )));
                }
                let jti = claims
                    .jti
                    .filter(|j| !j.is_empty() && j.len() <= JTI_BYTES_MAX)
                    .ok_or_else(|| {
                        unauthenticated(format!(
                            "the assertion needs a jti of 1 to {JTI_BYTES_MAX} bytes"
                        ))
                    })?;
                let _ = claims.sub;
                return Ok(VerifiedAgent {
                    agent: agent.clone(),
                    kid: key.kid.clone(),
                    jti,
                    expires_ms: claims.exp * 1000,
                });
            }
            Err(e) => last = e.to_string(),
        }
    }
    Err(unauthenticated(format!("invalid agent assertion: {last}")))
}

#[derive(Deserialize)]
struct UserClaims {
    iss: String,
    sub: String,
}

fn issuers(state: &(impl StateRead + ?Sized)) -> Result<Vec<pb::TrustedIssuer>, DomainError> {
    state
        .scan_prefix(keys::ISSUER_PREFIX)
        .map_err(state_fault)?
        .iter()
        .map(|(k, v)| decode(k, v).map_err(state_fault))
        .collect()
}

/// The signature algorithm a user-token key is for: its `alg` when it names an asymmetric one
/// of its key type, otherwise RS256 for RSA, ES256/ES384 by curve, EdDSA for Ed25519.
fn algorithm_for(jwk: &jsonwebtoken::jwk::Jwk) -> Option<Algorithm> {
    use jsonwebtoken::jwk::{EllipticCurve, KeyAlgorithm as K};
    let declared = jwk.common.key_algorithm;
    match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => match declared {
            None | Some(K::RS256) => Some(Algorithm::RS256),
            Some(K::RS384) => Some(Algorithm::RS384),
            Some(K::RS512) => Some(Algorithm::RS512),
            Some(K::PS256) => Some(Algorithm::PS256),
            Some(K::PS384) => Some(Algorithm::PS384),
            Some(K::PS512) => Some(Algorithm::PS512),
            Some(_) => None,
        },
        AlgorithmParameters::EllipticCurve(ec) => match (&ec.curve, declared) {
            (EllipticCurve::P256, None | Some(K::ES256)) => Some(Algorithm::ES256),
            (EllipticCurve::P384, None | Some(K::ES384)) => Some(Algorithm::ES384),
            _ => None,
        },
        AlgorithmParameters::OctetKeyPair(okp) => match (&okp.curve, declared) {
            (EllipticCurve::Ed25519, None | Some(K::EdDSA)) => Some(Algorithm::EdDSA),
            _ => None,
        },
        _ => None,
    }
}

/// Checks that a JWKS parses and every key is usable; used before an issuer is stored.
pub fn check_jwks(jwks_json: &str) -> Result<(), DomainError> {
    let set: JwkSet = serde_json::from_str(jwks_json)
        .map_err(|e| DomainError::invalid("issuer.jwks_json", format!("is not a JWKS: {e}")))?;
    for (i, key) in set.keys.iter().enumerate() {
        algorithm_for(key).ok_or_else(|| {
            DomainError::invalid(
                &format!("issuer.jwks_json.keys[{i}]"),
                "is not an RSA (RS*/PS*), EC (P-256/P-384) or Ed25519 signing key",
            )
        })?;
        DecodingKey::from_jwk(key).map_err(|e| {
            DomainError::invalid(&format!("issuer.jwks_json.keys[{i}]"), e.to_string())
        })?;
    }
    Ok(())
}

/// A claim a token *claims*, unverified, for the record of its refusal: at most 128 characters
/// of printable text, or nothing.
pub fn claimed(token: &str, claim: &str) -> Option<String> {
    let claims: Value = jsonwebtoken::dangerous::insecure_decode_claims(token).ok()?;
    let text = claims.get(claim)?.as_str()?;
    (text.len() <= 128 && text.chars().all(|c| !c.is_control())).then(|| text.to_owned())
}

/// Authenticates a user by a JWT from a trusted issuer; returns the user id (`sub`).
pub fn verify_user_token(
    state: &(impl StateRead + ?Sized),
    token: &str,
) -> Result<String, DomainError> {
    if token.is_empty() {
        return Err(unauthenticated("a user token is required"));
    }
    let header = jsonwebtoken::decode_header(token)
        .map_err(|e| unauthenticated(format!("malformed user token: {e}")))?;
    let unverified: UserClaims = jsonwebtoken::dangerous::insecure_decode_claims(token)
        .map_err(|e| unauthenticated(format!("malformed user token: {e}")))?;
    let issuer = issuers(state)?
        .into_iter()
        .find(|i| i.issuer == unverified.iss)
        .ok_or_else(|| unauthenticated(format!("{:?} is not a trusted issuer", unverified.iss)))?;
    let set: JwkSet =
        serde_json::from_str(&issuer.jwks_json).map_err(|e| unauthenticated(e.to_string()))?;
    let candidates: Vec<&jsonwebtoken::jwk::Jwk> = match &header.kid {
        Some(kid) => set.find(kid).into_iter().collect(),
        None => set.keys.iter().collect(),
    };
    if candidates.is_empty() {
        return Err(unauthenticated(
            "no key of the issuer matches the token's kid",
        ));
    }
    let mut last = String::from("no key verified the signature");
    for jwk in candidates {
        let Some(alg) = algorithm_for(jwk) else {
            continue;
        };
        if alg != header.alg {
            last = format!("the token is {:?} but the key is for {alg:?}", header.alg);
            continue;
        }
        let key = DecodingKey::from_jwk(jwk).map_err(|e| unauthenticated(e.to_string()))?;
        let mut validation = Validation::new(alg);
        validation.set_audience(&[issuer.audience.as_str()]);
        validation.set_issuer(&[issuer.issuer.as_str()]);
        validation.leeway = issuer.leeway_s;
        validation.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
        match jsonwebtoken::decode::<UserClaims>(token, &key, &validation) {
            Ok(data) => {
                UserId::parse("sub", &data.claims.sub)
                    .map_err(|e| unauthenticated(format!("the token's sub: {}", e.message)))?;
                return Ok(data.claims.sub);
            }
            Err(e) => last = e.to_string(),
        }
    }
    Err(unauthenticated(format!("invalid user token: {last}")))
}

/// The RFC 7662 introspection of a grant.
pub fn introspection(cluster_id: &str, grant: &pb::Grant, now_ms: u64) -> Value {
    let active = grant.status == pb::GrantStatus::Active as i32 && now_ms < grant.expires_ms;
    if !active {
        return json!({ "active": false });
    }
    json!({
        "active": true,
        "iss": grant_issuer(cluster_id),
        "sub": grant.user,
        "act": serde_json::to_value(actor_claim(&grant.chain)).unwrap_or(Value::Null),
        "aud": if grant.audience.is_empty() { cluster_id } else { grant.audience.as_str() },
        "jti": grant.id,
        "iat": grant.issued_ms / 1000,
        "exp": grant.expires_ms.div_ceil(1000),
        "token_type": "mandate_grant",
        "authorization_details": [{ "type": "mandate", "actions": [grant.action], "locations": [grant.resource] }],
        "uses_left": grant.uses_left,
    })
}

/// Is the grant still usable according to its record?
pub fn grant_active(grant: &pb::Grant, now_ms: u64) -> bool {
    grant.status == pb::GrantStatus::Active as i32 && now_ms < grant.expires_ms
}
