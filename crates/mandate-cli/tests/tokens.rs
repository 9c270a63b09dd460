//! Grant tokens checked by an independent JWT library (jwt-simple) against the published JWKS,
//! and tampered tokens refused by Mandate and by that library alike.

mod common;

use std::collections::HashSet;

use base64::Engine;
use common::{client_at, DevCluster, World};
use jwt_simple::prelude::*;
use mandate_client::{pb, Code};

#[derive(Debug, Serialize, Deserialize)]
struct Act {
    sub: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Detail {
    #[serde(rename = "type")]
    kind: String,
    actions: Vec<String>,
    locations: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
struct GrantClaims {
    act: Act,
    authorization_details: Vec<Detail>,
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn unb64(text: &str) -> Vec<u8> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(text)
        .expect("base64url")
}

/// Rewrites one part of a compact JWT (0 header, 1 payload) through `edit`, keeping the signature.
fn tamper(token: &str, part: usize, edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    let mut json: serde_json::Value =
        serde_json::from_slice(&unb64(&parts[part])).expect("json part");
    edit(&mut json);
    parts[part] = b64(json.to_string().as_bytes());
    parts.join(".")
}

#[test]
fn grant_tokens_verify_with_an_independent_library_and_tampering_is_refused() {
    let c = DevCluster::start(3, 23800);
    let world = World::create(&c, "verified");
    let delegation = world.delegate(&c, &["read"], &["secret/team-a/*"], &[]);
    let all = c.addrs.join(",");
    let granted = world.authorize(
        &c,
        &delegation,
        "read",
        "secret/team-a/db",
        &["--audience", "payments-api"],
    );
    assert_eq!(granted["decision"], "allow", "{granted}");
    let token = granted["token"].as_str().expect("token").to_owned();
    let keys = c.json(&all, &["keys", "jwks"]);
    // Every node publishes the same keys over HTTP (TLS), as over gRPC, and answers its probes.
    for addr in &c.addrs {
        let (status, content_type, body) =
            common::http_get(&c.ca_cert, addr, "/.well-known/jwks.json");
        assert_eq!(status, 200, "{addr}: {body}");
        assert_eq!(content_type, "application/jwk-set+json");
        let published: serde_json::Value = serde_json::from_str(&body).expect("jwks json");
        assert_eq!(published, keys["jwks"], "{addr}");
        assert_eq!(
            common::http_get(&c.ca_cert, addr, "/healthz").0,
            200,
            "{addr}"
        );
        let (status, _, body) = common::http_get(&c.ca_cert, addr, "/readyz");
        assert!(status == 200 && body.starts_with("ready"), "{addr}: {body}");
    }
    let jwk = &keys["jwks"]["keys"][0];
    let public = Ed25519PublicKey::from_bytes(&unb64(jwk["x"].as_str().expect("x")))
        .expect("public key")
        .with_key_id(jwk["kid"].as_str().expect("kid"));
    let options = |audience: &str| VerificationOptions {
        allowed_issuers: Some(HashSet::from([keys["issuer"]
            .as_str()
            .expect("issuer")
            .to_owned()])),
        allowed_audiences: Some(HashSet::from([audience.to_owned()])),
        time_tolerance: Some(Duration::from_secs(0)),
        ..Default::default()
    };

    let claims = public
        .verify_token::<GrantClaims>(&token, Some(options("payments-api")))
        .expect("an independent library accepts the grant token");
    assert_eq!(claims.subject.as_deref(), Some("alice"));
    assert_eq!(claims.jwt_id.as_deref(), granted["grant_id"].as_str());
    assert_eq!(claims.custom.act.sub, world.agent_id);
    assert_eq!(claims.custom.authorization_details[0].actions, vec!["read"]);
    assert_eq!(
        claims.custom.authorization_details[0].locations,
        vec!["secret/team-a/db"]
    );
    assert!(
        public
            .verify_token::<GrantClaims>(&token, Some(options("another-api")))
            .is_err(),
        "wrong aud accepted"
    );

    let forged = tamper(&token, 1, |p| {
        p["authorization_details"][0]["locations"][0] = "secret/team-b/db".into()
    });
    let wrong_kid = tamper(&token, 0, |h| h["kid"] = "not-a-cluster-key".into());
    let alg_none = {
        let header = b64(br#"{"alg":"none","typ":"JWT"}"#);
        let payload = token.split('.').nth(1).expect("payload");
        format!("{header}.{payload}.")
    };
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let _enter = rt.enter();
    let client = client_at(&c.ca_cert, &c.addrs[1], &c.token);
    for (name, bad) in [
        ("forged", &forged),
        ("wrong kid", &wrong_kid),
        ("alg none", &alg_none),
    ] {
        assert!(
            public
                .verify_token::<GrantClaims>(bad, Some(options("payments-api")))
                .is_err(),
            "jwt-simple accepted the {name} token"
        );
        let consumed = rt.block_on(client.authz(|mut a| {
            let token = bad.clone();
            async move { a.consume(pb::ConsumeRequest { token }).await }
        }));
        assert_eq!(
            consumed.expect_err(name).code(),
            Code::Unauthenticated,
            "{name}"
        );
        let introspected = c.json(&all, &["grant", "introspect", bad]);
        assert_eq!(introspected["active"], false, "{name}");
    }

    // The genuine token still works once, and is inactive afterwards.
    let active = c.json(&all, &["grant", "introspect", &token]);
    assert_eq!(
        (active["active"].as_bool(), active["sub"].as_str()),
        (Some(true), Some("alice"))
    );
    c.json(&all, &["grant", "consume", &token]);
    assert_eq!(
        c.json(&all, &["grant", "introspect", &token])["active"],
        false
    );
}

#[test]
fn an_expired_grant_is_refused_by_mandate_and_by_an_independent_library_then_removed() {
    let c = DevCluster::start(1, 24200);
    let world = World::create(&c, "expiring");
    let delegation = world.delegate(&c, &["read"], &["secret/team-a/*"], &[]);
    let all = c.addrs.join(",");
    let granted = world.authorize(
        &c,
        &delegation,
        "read",
        "secret/team-a/db",
        &["--ttl", "1s"],
    );
    let token = granted["token"].as_str().expect("token").to_owned();
    let expires_ms = granted["expires_at_ms"].as_u64().expect("expiry");
    common::wait_for(
        "the grant to expire",
        std::time::Duration::from_secs(10),
        || {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .ok()?
                .as_millis() as u64;
            (now > expires_ms + 1000).then_some(())
        },
    );
    let keys = c.json(&all, &["keys", "jwks"]);
    let jwk = &keys["jwks"]["keys"][0];
    let public = Ed25519PublicKey::from_bytes(&unb64(jwk["x"].as_str().expect("x"))).expect("key");
    let strict = VerificationOptions {
        time_tolerance: Some(Duration::from_secs(0)),
        ..Default::default()
    };
    assert!(
        public
            .verify_token::<GrantClaims>(&token, Some(strict))
            .is_err(),
        "an expired token verified"
    );
    assert_eq!(
        c.json(&all, &["grant", "introspect", &token])["active"],
        false
    );
    let out = c.mandate(&["grant", "consume", &token]);
    assert!(!out.status.success());
    assert!(
        common::stderr(&out).contains("expired"),
        "{}",
        common::stderr(&out)
    );

    // The leader's housekeeping then removes the grant's record: an operator's revoke finds
    // nothing, and the token stays inactive.
    let grant_id = granted["grant_id"].as_str().expect("grant id");
    let refusal = common::wait_for(
        "the expired grant to be removed",
        std::time::Duration::from_secs(10),
        || {
            let out = c.mandate(&["grant", "revoke", grant_id]);
            let stderr = common::stderr(&out);
            (!out.status.success() && stderr.contains("expired and been removed")).then_some(stderr)
        },
    );
    assert!(refusal.contains(grant_id), "{refusal}");
    assert_eq!(
        c.json(&all, &["grant", "introspect", &token])["active"],
        false
    );
}
