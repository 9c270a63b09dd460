//! Micro-benchmarks of grant tokens (`cargo bench -p mandate-server`): signing one as a node
//! does (jsonwebtoken with Mandate's JOSE provider, the key parsed once) and verifying one as
//! `Consume`, `Introspect` and `ReadSecret` do (`tokens::verify_grant_token` against the
//! cluster keyring in state).

// The allocator the `mandate` binary ships with: Cedar and prost allocate heavily, and the
// system allocator makes a decision about 1.6 times slower.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use ed25519_dalek::pkcs8::EncodePrivateKey;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use mandate_core::fixture::{decision_world, FIXTURE_KEY_SEED};
use mandate_server::tokens::{grant_issuer, verify_grant_token};
use serde_json::json;

fn claims() -> serde_json::Value {
    json!({
        "iss": grant_issuer("bench"),
        "sub": "alice",
        "aud": "bench",
        "act": { "sub": format!("agt_{:032x}", 1), "act": { "sub": format!("agt_{:032x}", 0) } },
        "authorization_details": [
            { "type": "mandate", "actions": ["read"], "locations": ["secret/team-a/db-password"] }
        ],
        "jti": "grt_0123456789abcdef0123456789abcdef",
        "iat": 4_000_000_000u64,
        "exp": 4_000_000_060u64,
        "delegation": "dlg_sub",
    })
}

fn tokens(c: &mut Criterion) {
    mandate_server::jose::install();
    let key = ed25519_dalek::SigningKey::from_bytes(&FIXTURE_KEY_SEED);
    let der = key.to_pkcs8_der().expect("PKCS#8");
    let encoding = EncodingKey::from_ed_der(der.as_bytes());
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some("k".into());
    let claims = claims();
    c.bench_function("grant token sign (EdDSA)", |b| {
        b.iter(|| jsonwebtoken::encode(&header, black_box(&claims), &encoding).expect("signs"))
    });
    let token = jsonwebtoken::encode(&header, &claims, &encoding).expect("signs");
    let (state, _, _) = decision_world().expect("the fixture builds");
    c.bench_function("grant token verify (EdDSA, keyring in state)", |b| {
        b.iter(|| verify_grant_token(&state, "bench", black_box(&token)).expect("verifies"))
    });
}

criterion_group!(benches, tokens);
criterion_main!(benches);
