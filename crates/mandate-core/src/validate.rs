//! Input validation shared by the server edge (so bad input is refused before anything is
//! proposed) and by apply (so a command that reached the log is checked again on every node).
//! Every error names the offending field.

use std::collections::BTreeMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use sha2::{Digest, Sha256};

use crate::error::DomainError;
use crate::limits::*;
use crate::pb;
use crate::principal::{UserId, AGENT_ID_PREFIX};

fn check_len(field: &str, value: &str, max: usize) -> Result<(), DomainError> {
    if value.len() > max {
        return Err(DomainError::invalid(
            field,
            format!("is {} bytes; at most {max} allowed", value.len()),
        ));
    }
    Ok(())
}

fn check_printable(field: &str, value: &str) -> Result<(), DomainError> {
    match value.chars().find(|c| c.is_control()) {
        Some(c) => Err(DomainError::invalid(
            field,
            format!("contains the control character {c:?}"),
        )),
        None => Ok(()),
    }
}

/// An agent name: 1–64 bytes of lowercase letters, digits, `-`, `_`, `.`, starting with a
/// letter or digit, and not shaped like an agent id.
pub fn agent_name(name: &str) -> Result<(), DomainError> {
    let field = "name";
    if name.is_empty() {
        return Err(DomainError::invalid(field, "must not be empty"));
    }
    check_len(field, name, AGENT_NAME_BYTES_MAX)?;
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.')))
    {
        return Err(DomainError::invalid(
            field,
            format!("contains {c:?}; allowed are a-z, 0-9, '-', '_' and '.'"),
        ));
    }
    if !name.starts_with(|c: char| c.is_ascii_alphanumeric()) {
        return Err(DomainError::invalid(
            field,
            "must start with a letter or a digit",
        ));
    }
    if name.starts_with(AGENT_ID_PREFIX) {
        return Err(DomainError::invalid(
            field,
            format!("must not start with {AGENT_ID_PREFIX:?}, which is reserved for agent ids"),
        ));
    }
    Ok(())
}

/// Free text such as a description: bounded, no control characters except newline and tab.
pub fn text(field: &str, value: &str, max: usize) -> Result<(), DomainError> {
    check_len(field, value, max)?;
    match value
        .chars()
        .find(|c| c.is_control() && !matches!(c, '\n' | '\t'))
    {
        Some(c) => Err(DomainError::invalid(
            field,
            format!("contains the control character {c:?}"),
        )),
        None => Ok(()),
    }
}

/// Labels: at most 32; keys 1–63 bytes of `a-z0-9._/-` starting with a letter or digit; values
/// up to 255 printable bytes.
pub fn labels(labels: &BTreeMap<String, String>) -> Result<(), DomainError> {
    if labels.len() > LABELS_PER_AGENT_MAX {
        return Err(DomainError::invalid(
            "labels",
            format!(
                "has {} labels; at most {LABELS_PER_AGENT_MAX} allowed",
                labels.len()
            ),
        ));
    }
    for (key, value) in labels {
        let field = format!("labels[{key}]");
        if key.is_empty() {
            return Err(DomainError::invalid("labels", "a label key is empty"));
        }
        check_len(&field, key, LABEL_KEY_BYTES_MAX)?;
        let key_ok = key.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && key.chars().all(|c| {
                c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '/' | '-')
            });
        if !key_ok {
            return Err(DomainError::invalid(
                &field,
                "key must start with a-z or 0-9 and contain only a-z, 0-9, '.', '_', '/', '-'",
            ));
        }
        check_len(&field, value, LABEL_VALUE_BYTES_MAX)?;
        check_printable(&field, value)?;
    }
    Ok(())
}

/// Parses one `key=value` label selector or assignment.
pub fn label_pair(field: &str, pair: &str) -> Result<(String, String), DomainError> {
    let (key, value) = pair
        .split_once('=')
        .ok_or_else(|| DomainError::invalid(field, format!("{pair:?} is not key=value")))?;
    let one = BTreeMap::from([(key.to_owned(), value.to_owned())]);
    labels(&one).map_err(|e| DomainError::invalid(field, e.message))?;
    Ok((key.to_owned(), value.to_owned()))
}

/// The RFC 7638 thumbprint of an Ed25519 JWK: the default `kid`.
pub fn jwk_thumbprint(x: &str) -> String {
    let canonical = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#);
    URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
}

/// Checks an Ed25519 public JWK and fills in its `kid` (the thumbprint) when it has none.
pub fn jwk(field: &str, key: &pb::Jwk) -> Result<pb::Jwk, DomainError> {
    if key.kty != "OKP" {
        return Err(DomainError::invalid(
            &format!("{field}.kty"),
            format!("is {:?}; only \"OKP\" (Ed25519) keys are accepted", key.kty),
        ));
    }
    if key.crv != "Ed25519" {
        return Err(DomainError::invalid(
            &format!("{field}.crv"),
            format!("is {:?}; only \"Ed25519\" is accepted", key.crv),
        ));
    }
    let x_field = format!("{field}.x");
    let bytes = URL_SAFE_NO_PAD
        .decode(key.x.as_bytes())
        .map_err(|e| DomainError::invalid(&x_field, format!("is not base64url: {e}")))?;
    let raw: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
        DomainError::invalid(
            &x_field,
            format!("decodes to {} bytes; an Ed25519 key is 32", bytes.len()),
        )
    })?;
    ed25519_dalek::VerifyingKey::from_bytes(&raw)
        .map_err(|_| DomainError::invalid(&x_field, "is not a valid Ed25519 public key"))?;
    let kid = if key.kid.is_empty() {
        jwk_thumbprint(&key.x)
    } else {
        key.kid.clone()
    };
    let kid_field = format!("{field}.kid");
    check_len(&kid_field, &kid, KID_BYTES_MAX)?;
    check_printable(&kid_field, &kid)?;
    Ok(pb::Jwk {
        kid,
        kty: key.kty.clone(),
        crv: key.crv.clone(),
        x: key.x.clone(),
    })
}

/// Checks a key list: each key valid, no duplicate `kid`, at most [`KEYS_PER_AGENT_MAX`].
pub fn jwks(keys: &[pb::Jwk]) -> Result<Vec<pb::Jwk>, DomainError> {
    if keys.len() > KEYS_PER_AGENT_MAX {
        return Err(DomainError::invalid(
            "public_keys",
            format!(
                "has {} keys; at most {KEYS_PER_AGENT_MAX} allowed",
                keys.len()
            ),
        ));
    }
    let mut out: Vec<pb::Jwk> = Vec::with_capacity(keys.len());
    for (i, key) in keys.iter().enumerate() {
        let key = jwk(&format!("public_keys[{i}]"), key)?;
        if out.iter().any(|k| k.kid == key.kid) {
            return Err(DomainError::invalid(
                &format!("public_keys[{i}].kid"),
                format!("{:?} appears twice", key.kid),
            ));
        }
        out.push(key);
    }
    Ok(out)
}

/// Checks a registration and returns it normalised (key ids filled in).
pub fn register_agent(cmd: &pb::RegisterAgent) -> Result<pb::RegisterAgent, DomainError> {
    agent_name(&cmd.name)?;
    UserId::parse("owner", &cmd.owner)?;
    text("description", &cmd.description, DESCRIPTION_BYTES_MAX)?;
    text("model", &cmd.model, MODEL_BYTES_MAX)?;
    text("provider", &cmd.provider, MODEL_BYTES_MAX)?;
    labels(&cmd.labels)?;
    text("ceiling", &cmd.ceiling, CEILING_BYTES_MAX)?;
    crate::policy::parse_ceiling(&cmd.ceiling)
        .map_err(|problems| crate::policy::problems_error("ceiling", &problems))?;
    let keys = jwks(&cmd.keys)?;
    Ok(pb::RegisterAgent {
        keys,
        ..cmd.clone()
    })
}

/// Checks a metadata update.
pub fn update_agent(cmd: &pb::UpdateAgent) -> Result<(), DomainError> {
    if let Some(d) = &cmd.description {
        text("description", d, DESCRIPTION_BYTES_MAX)?;
    }
    if let Some(m) = &cmd.model {
        text("model", m, MODEL_BYTES_MAX)?;
    }
    if let Some(p) = &cmd.provider {
        text("provider", p, MODEL_BYTES_MAX)?;
    }
    if let Some(set) = &cmd.labels {
        labels(&set.labels)?;
    }
    Ok(())
}

/// An operator token's name: 1–128 printable bytes.
/// Longest host name in a member address (RFC 1035).
pub const HOST_BYTES_MAX: usize = 253;

/// A member address: `IP:port`, `[IPv6]:port` or `dns-name:port` (a name lets containers and
/// Kubernetes pods be reached by their stable names; certificates must carry it).
pub fn host_port(field: &str, addr: &str) -> Result<(), DomainError> {
    let bad = |why: &str| {
        DomainError::invalid(
            field,
            format!("{addr:?} is not host:port ({why}), e.g. 10.0.0.1:7400 or mandate-1:7400"),
        )
    };
    if addr.parse::<std::net::SocketAddr>().is_ok() {
        return Ok(());
    }
    let (host, port) = addr.rsplit_once(':').ok_or_else(|| bad("no port"))?;
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return Err(bad("the port is not 1 to 65535")),
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if host.is_empty() || host.len() > HOST_BYTES_MAX || !host.split('.').all(label_ok) {
        return Err(bad("the host is neither an IP address nor a DNS name"));
    }
    Ok(())
}

pub fn token_name(name: &str) -> Result<(), DomainError> {
    if name.is_empty() {
        return Err(DomainError::invalid("name", "must not be empty"));
    }
    check_len("name", name, TOKEN_NAME_BYTES_MAX)?;
    check_printable("name", name)
}

/// A trusted user-token issuer: a name, `iss`, `aud`, a JWKS with at least one key, a leeway.
pub fn issuer(i: &pb::TrustedIssuer) -> Result<(), DomainError> {
    crate::policy::document_name(&i.name)
        .map_err(|e| DomainError::invalid("issuer.name", e.message))?;
    for (field, value) in [
        ("issuer.issuer", &i.issuer),
        ("issuer.audience", &i.audience),
    ] {
        if value.is_empty() {
            return Err(DomainError::invalid(field, "must not be empty"));
        }
        text(field, value, 256)?;
    }
    if i.leeway_s > ISSUER_LEEWAY_S_MAX {
        return Err(DomainError::invalid(
            "issuer.leeway_s",
            format!("is at most {ISSUER_LEEWAY_S_MAX}"),
        ));
    }
    check_len("issuer.jwks_json", &i.jwks_json, 64 * 1024)?;
    let jwks: serde_json::Value = serde_json::from_str(&i.jwks_json)
        .map_err(|e| DomainError::invalid("issuer.jwks_json", format!("is not JSON: {e}")))?;
    let keys = jwks
        .get("keys")
        .and_then(|k| k.as_array())
        .filter(|k| !k.is_empty())
        .ok_or_else(|| {
            DomainError::invalid("issuer.jwks_json", "needs a non-empty \"keys\" array")
        })?;
    for (n, key) in keys.iter().enumerate() {
        let kty = key.get("kty").and_then(|v| v.as_str()).unwrap_or_default();
        if !matches!(kty, "RSA" | "EC" | "OKP") {
            return Err(DomainError::invalid(
                &format!("issuer.jwks_json.keys[{n}].kty"),
                format!("is {kty:?}; RSA (RS256), EC (ES256) and OKP (EdDSA) keys are accepted"),
            ));
        }
    }
    Ok(())
}

/// Most clock-skew leeway an issuer may be given, in seconds.
pub const ISSUER_LEEWAY_S_MAX: u64 = 300;

/// A cluster signing key: a valid Ed25519 public key and a sealed private half.
pub fn signing_key(key: &pb::SigningKey) -> Result<(), DomainError> {
    let jwk = pb::Jwk {
        kid: key.kid.clone(),
        kty: "OKP".into(),
        crv: "Ed25519".into(),
        x: key.x.clone(),
    };
    self::jwk("key", &jwk)?;
    if key.kid.is_empty() {
        return Err(DomainError::invalid("key.kid", "must not be empty"));
    }
    if key.sealed_private.is_empty() {
        return Err(DomainError::invalid(
            "key.sealed_private",
            "must not be empty",
        ));
    }
    Ok(())
}

/// A secret path: a resource path under `secret/`.
pub fn secret_path(path: &str) -> Result<(), DomainError> {
    crate::delegation::resource("path", path)?;
    if !path.starts_with("secret/") {
        return Err(DomainError::invalid(
            "path",
            format!("{path:?} must start with \"secret/\""),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good_key() -> pb::Jwk {
        let public = ed25519_dalek::SigningKey::from_bytes(&[3u8; 32]).verifying_key();
        pb::Jwk {
            kid: String::new(),
            kty: "OKP".into(),
            crv: "Ed25519".into(),
            x: URL_SAFE_NO_PAD.encode(public.as_bytes()),
        }
    }

    #[test]
    fn names_are_refused_with_the_reason() {
        for (name, needle) in [
            ("", "empty"),
            ("Billing", "'B'"),
            ("-bot", "start"),
            ("agt_bot", "reserved"),
            (&"x".repeat(65), "at most 64"),
        ] {
            let err = agent_name(name).expect_err(name);
            assert_eq!(err.field, "name");
            assert!(err.message.contains(needle), "{name}: {}", err.message);
        }
        agent_name("billing-bot.v2").expect("valid name");
    }

    #[test]
    fn a_key_without_kid_gets_its_rfc7638_thumbprint() {
        let key = jwk("k", &good_key()).expect("valid key");
        assert_eq!(key.kid, jwk_thumbprint(&good_key().x));
        assert_eq!(key.kid.len(), 43);
    }

    #[test]
    fn malformed_keys_name_the_bad_member() {
        let mut wrong_curve = good_key();
        wrong_curve.crv = "P-256".into();
        assert_eq!(jwk("k", &wrong_curve).expect_err("crv").field, "k.crv");
        let mut short = good_key();
        short.x = URL_SAFE_NO_PAD.encode([1u8; 31]);
        let err = jwk("k", &short).expect_err("short");
        assert_eq!(err.field, "k.x");
        assert!(err.message.contains("31 bytes"));
        let mut garbage = good_key();
        garbage.x = "!!!".into();
        assert_eq!(jwk("k", &garbage).expect_err("garbage").field, "k.x");
    }

    #[test]
    fn duplicate_key_ids_are_refused() {
        let err = jwks(&[good_key(), good_key()]).expect_err("duplicate");
        assert_eq!(err.field, "public_keys[1].kid");
    }

    #[test]
    fn a_ceiling_that_is_not_valid_cedar_is_refused_with_its_position() {
        let mut cmd = pb::RegisterAgent {
            name: "bot".into(),
            owner: "alice".into(),
            ceiling: "permit(principal, action, resource)\n  when { context.bogus };".into(),
            ..Default::default()
        };
        let err = register_agent(&cmd).expect_err("invalid ceiling");
        assert_eq!(err.field, "ceiling");
        assert!(err.message.contains("line 2"), "{}", err.message);
        cmd.ceiling = "permit(principal, action == Action::\"read\", resource);".into();
        register_agent(&cmd).expect("valid ceiling");
    }

    #[test]
    fn labels_are_bounded_and_shaped() {
        let too_many: BTreeMap<_, _> = (0..33).map(|i| (format!("k{i}"), "v".into())).collect();
        assert_eq!(labels(&too_many).expect_err("too many").field, "labels");
        let bad_key = BTreeMap::from([("Team".to_string(), "a".to_string())]);
        assert_eq!(labels(&bad_key).expect_err("bad key").field, "labels[Team]");
        let bad_value = BTreeMap::from([("team".to_string(), "a\u{7}".to_string())]);
        assert!(labels(&bad_value).is_err());
        assert_eq!(
            label_pair("label", "team=payments").expect("valid"),
            ("team".into(), "payments".into())
        );
        assert_eq!(
            label_pair("label", "team").expect_err("no =").field,
            "label"
        );
    }
}
