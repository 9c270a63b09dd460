//! The JOSE crypto provider: jsonwebtoken's RustCrypto provider, except that Ed25519 keys are
//! parsed once and kept.
//!
//! jsonwebtoken builds a signer or verifier for every token: for EdDSA it parses the PKCS#8
//! private key, which derives the public key (a scalar multiplication as costly as the
//! signature itself), and it decompresses the public point for every verification. Mandate
//! signs a grant per authorization and verifies an assertion per agent call, so this module
//! installs a provider (through jsonwebtoken's own extension point, [`CryptoProvider`]) that
//! keeps the parsed keys of the last [`KEYS_CACHED_MAX`] keys. Every other algorithm, and all
//! JOSE parsing and validation, stay jsonwebtoken's.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use ed25519_dalek::pkcs8::DecodePrivateKey;
use ed25519_dalek::{Signer as _, SigningKey, Verifier as _, VerifyingKey};
use jsonwebtoken::crypto::{rust_crypto, CryptoProvider, JwtSigner, JwtVerifier, KeyUtils};
use jsonwebtoken::errors::{Error, ErrorKind};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};

/// Most parsed Ed25519 keys kept, signing and verifying each; beyond it the cache starts over.
pub const KEYS_CACHED_MAX: usize = 1024;

struct Cache<K, V>(Mutex<HashMap<K, V>>);

impl<K: std::hash::Hash + Eq, V: Clone> Cache<K, V> {
    fn new() -> Self {
        Cache(Mutex::new(HashMap::new()))
    }

    fn get_or_try(&self, key: K, make: impl FnOnce() -> Result<V, Error>) -> Result<V, Error> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(v) = map.get(&key) {
            return Ok(v.clone());
        }
        let v = make()?;
        if map.len() >= KEYS_CACHED_MAX {
            map.clear();
        }
        map.insert(key, v.clone());
        Ok(v)
    }
}

fn signing_keys() -> &'static Cache<Vec<u8>, SigningKey> {
    static KEYS: OnceLock<Cache<Vec<u8>, SigningKey>> = OnceLock::new();
    KEYS.get_or_init(Cache::new)
}

fn verifying_keys() -> &'static Cache<[u8; 32], VerifyingKey> {
    static KEYS: OnceLock<Cache<[u8; 32], VerifyingKey>> = OnceLock::new();
    KEYS.get_or_init(Cache::new)
}

struct EdSigner(SigningKey);

impl signature::Signer<Vec<u8>> for EdSigner {
    fn try_sign(&self, msg: &[u8]) -> Result<Vec<u8>, signature::Error> {
        Ok(self.0.sign(msg).to_bytes().to_vec())
    }
}

impl JwtSigner for EdSigner {
    fn algorithm(&self) -> Algorithm {
        Algorithm::EdDSA
    }
}

struct EdVerifier(VerifyingKey);

impl signature::Verifier<Vec<u8>> for EdVerifier {
    fn verify(&self, msg: &[u8], sig: &Vec<u8>) -> Result<(), signature::Error> {
        let sig = ed25519_dalek::Signature::from_slice(sig).map_err(|_| signature::Error::new())?;
        self.0
            .verify(msg, &sig)
            .map_err(|_| signature::Error::new())
    }
}

impl JwtVerifier for EdVerifier {
    fn algorithm(&self) -> Algorithm {
        Algorithm::EdDSA
    }
}

fn signer(alg: &Algorithm, key: &EncodingKey) -> Result<Box<dyn JwtSigner>, Error> {
    if *alg != Algorithm::EdDSA {
        return (rust_crypto::DEFAULT_PROVIDER.signer_factory)(alg, key);
    }
    let der = key.as_bytes();
    let parsed = signing_keys().get_or_try(der.to_vec(), || {
        SigningKey::from_pkcs8_der(der).map_err(|_| ErrorKind::InvalidEddsaKey.into())
    })?;
    Ok(Box::new(EdSigner(parsed)))
}

fn verifier(alg: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>, Error> {
    if *alg != Algorithm::EdDSA {
        return (rust_crypto::DEFAULT_PROVIDER.verifier_factory)(alg, key);
    }
    let bytes: [u8; 32] = key
        .try_get_as_bytes()?
        .get(..32)
        .and_then(|b| b.try_into().ok())
        .ok_or(ErrorKind::InvalidEddsaKey)?;
    let parsed = verifying_keys().get_or_try(bytes, || {
        VerifyingKey::from_bytes(&bytes).map_err(|_| ErrorKind::InvalidEddsaKey.into())
    })?;
    Ok(Box::new(EdVerifier(parsed)))
}

/// Makes this the process's jsonwebtoken provider. Call it before the first token is signed or
/// verified; later calls do nothing.
pub fn install() {
    static INSTALLED: OnceLock<()> = OnceLock::new();
    INSTALLED.get_or_init(|| {
        let utils = &rust_crypto::DEFAULT_PROVIDER.key_utils;
        let provider: &'static CryptoProvider = Box::leak(Box::new(CryptoProvider {
            signer_factory: signer,
            verifier_factory: verifier,
            key_utils: KeyUtils {
                rsa_pub_components_from_private_key: utils.rsa_pub_components_from_private_key,
                rsa_pub_components_from_public_key: utils.rsa_pub_components_from_public_key,
                ec_pub_components_from_private_key: utils.ec_pub_components_from_private_key,
                ed_pub_components_from_private_key: utils.ed_pub_components_from_private_key,
                compute_digest: utils.compute_digest,
            },
        }));
        if provider.install_default().is_err() {
            tracing::warn!(
                "a jsonwebtoken crypto provider was already installed; keys are parsed per token"
            );
        }
    });
}
