//! Users from an external identity provider (RS256 and ES256 tokens) and what they may write.

mod common;

use common::{refused, DevCluster, World};
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::json;

const ISSUER: &str = "https://idp.example.test";
const AUDIENCE: &str = "mandate-tests";

/// A test identity provider: an RSA and a P-256 key from the fixtures, published as a JWKS.
struct IdentityProvider {
    rsa: EncodingKey,
    p256: EncodingKey,
}

impl IdentityProvider {
    fn load() -> Self {
        let fixture = |name: &str| {
            std::fs::read(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("tests/fixtures")
                    .join(name),
            )
            .expect("fixture key")
        };
        IdentityProvider {
            rsa: EncodingKey::from_rsa_pem(&fixture("test-issuer-rsa.pem")).expect("rsa key"),
            p256: EncodingKey::from_ec_pem(&fixture("test-issuer-p256.pem")).expect("p256 key"),
        }
    }

    fn jwks(&self) -> String {
        let public = |key: &EncodingKey, alg: Algorithm, kid: &str| {
            let mut jwk = Jwk::from_encoding_key(key, alg).expect("public jwk");
            jwk.common.key_id = Some(kid.to_owned());
            jwk
        };
        serde_json::to_string(&JwkSet {
            keys: vec![
                public(&self.rsa, Algorithm::RS256, "rsa-1"),
                public(&self.p256, Algorithm::ES256, "p256-1"),
            ],
        })
        .expect("jwks json")
    }

    /// A token for `sub`, signed with the key for `alg`, with `claims` overriding the defaults.
    fn token(&self, alg: Algorithm, sub: &str, claims: serde_json::Value) -> String {
        let (key, kid) = match alg {
            Algorithm::RS256 => (&self.rsa, "rsa-1"),
            _ => (&self.p256, "p256-1"),
        };
        let now = jsonwebtoken::get_current_timestamp();
        let mut body =
            json!({ "iss": ISSUER, "aud": AUDIENCE, "sub": sub, "iat": now, "exp": now + 300 });
        if let (Some(body), Some(extra)) = (body.as_object_mut(), claims.as_object()) {
            body.extend(extra.clone());
        }
        let mut header = Header::new(alg);
        header.kid = Some(kid.to_owned());
        encode(&header, &body, key).expect("sign user token")
    }
}

#[test]
fn users_of_an_rs256_and_an_es256_issuer_write_secrets_only_where_policies_permit() {
    let c = DevCluster::start(1, 25000);
    let _world = World::create(&c, "writer");
    let idp = IdentityProvider::load();
    let jwks = c.dir.path().join("idp-jwks.json");
    std::fs::write(&jwks, idp.jwks()).expect("write jwks");
    let all = c.addrs.join(",");
    c.json(
        &all,
        &[
            "issuer",
            "put",
            "corp",
            "--issuer",
            ISSUER,
            "--audience",
            AUDIENCE,
            "--jwks-file",
            jwks.to_str().expect("utf-8"),
        ],
    );

    for (alg, path) in [
        (Algorithm::RS256, "secret/team-a/from-rsa"),
        (Algorithm::ES256, "secret/team-a/from-ec"),
    ] {
        let token = idp.token(alg, "alice", json!({}));
        let written = c.json(&all, &["secret", "put", path, "v1", "--user-token", &token]);
        assert_eq!(written["version"], 1, "{alg:?}: {written}");
    }

    let es = idp.token(Algorithm::ES256, "alice", json!({}));
    refused(
        &c,
        &["secret", "put", "secret/team-b/x", "v", "--user-token", &es],
        "PermissionDenied",
        "alice is not permitted to write secret/team-b/x",
    );
    let bob = idp.token(Algorithm::RS256, "bob", json!({}));
    refused(
        &c,
        &[
            "secret",
            "put",
            "secret/team-a/x",
            "v",
            "--user-token",
            &bob,
        ],
        "PermissionDenied",
        "bob is not permitted",
    );

    let rsa = idp.token(Algorithm::RS256, "alice", json!({}));
    let mut parts: Vec<String> = rsa.split('.').map(str::to_owned).collect();
    parts[1] = common::base64_url(
        json!({ "iss": ISSUER, "aud": AUDIENCE, "sub": "bob", "exp": jsonwebtoken::get_current_timestamp() + 300 })
            .to_string()
            .as_bytes(),
    );
    let forged = parts.join(".");
    let wrong_audience = idp.token(Algorithm::RS256, "alice", json!({ "aud": "someone-else" }));
    let expired = idp.token(
        Algorithm::ES256,
        "alice",
        json!({ "exp": jsonwebtoken::get_current_timestamp() - 3600 }),
    );
    let untrusted = idp.token(
        Algorithm::ES256,
        "alice",
        json!({ "iss": "https://other.example" }),
    );
    for (token, needle) in [
        (&forged, "invalid user token"),
        (&wrong_audience, "invalid user token"),
        (&expired, "invalid user token"),
        (&untrusted, "not a trusted issuer"),
    ] {
        refused(
            &c,
            &[
                "secret",
                "put",
                "secret/team-b/x",
                "v",
                "--user-token",
                token,
            ],
            "Unauthenticated",
            needle,
        );
    }

    // None of the refused writes left a version behind.
    let written = c.json(&all, &["secret", "put", "secret/team-b/x", "by-operator"]);
    assert_eq!(written["version"], 1, "{written}");
}
