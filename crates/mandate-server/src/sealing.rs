//! Sealing with the key-encryption key (KEK): ChaCha20-Poly1305, a random 96-bit nonce per
//! seal, and the record's purpose as associated data, so a sealed value cannot be moved to
//! another record. Every node holds the same KEK (from a file or `MANDATE_KEK`); it never
//! enters the replicated state.

use std::path::Path;

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use hmac::{Hmac, KeyInit as HmacKeyInit, Mac};
use rand::RngCore;
use sha2::Sha256;

const NONCE_BYTES: usize = 12;

/// The cluster's key-encryption key.
#[derive(Clone)]
pub struct Kek {
    cipher: ChaCha20Poly1305,
    /// The audit HMAC key derived from it (see [`AuditHasher`]).
    audit_key: [u8; 32],
}

/// What the audit key is derived for; changing it changes every audit HMAC.
const AUDIT_KEY_LABEL: &[u8] = b"mandate/v1/audit-hmac-key";

type HmacSha256 = Hmac<Sha256>;

fn hmac(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut mac =
        <HmacSha256 as HmacKeyInit>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(message);
    mac.finalize().into_bytes().into()
}

/// HMAC-SHA256 of the sensitive strings that audit records name (operator token ids, request
/// contexts), keyed by a key derived from the KEK — the same on every node, never stored.
/// Without a KEK there is no key and those fields stay empty; they never fall back to the
/// plain value.
#[derive(Clone, Default)]
pub struct AuditHasher {
    key: Option<[u8; 32]>,
    secret_paths: bool,
}

impl AuditHasher {
    pub fn new(kek: Option<&Kek>) -> Self {
        AuditHasher {
            key: kek.map(|k| k.audit_key),
            secret_paths: false,
        }
    }

    /// Also hash secret paths (`[audit] hash_secret_paths`).
    pub fn hashing_secret_paths(mut self, on: bool) -> Self {
        self.secret_paths = on;
        self
    }

    /// Whether secret paths are hashed.
    pub fn hashes_secret_paths(&self) -> bool {
        self.secret_paths
    }

    /// Resources as the trail names them when secret paths are hashed: each path under
    /// `secret/` as `hmac:<hex>` (empty without a key), others as they are.
    pub fn resources<'a>(&self, resources: impl IntoIterator<Item = &'a str>) -> String {
        resources
            .into_iter()
            .map(|r| {
                if r.starts_with(mandate_core::audit::SECRET_PREFIX) {
                    self.hmac(r.as_bytes())
                        .map(|h| format!("hmac:{}", hex::encode(h)))
                        .unwrap_or_default()
                } else {
                    r.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The HMAC of `value`, or `None` without a key.
    pub fn hmac(&self, value: &[u8]) -> Option<[u8; 32]> {
        self.key.map(|key| hmac(&key, value))
    }

    /// A token id as the trail names it: hex HMAC (empty without a key).
    pub fn token_id(&self, id: &str) -> String {
        self.hmac(id.as_bytes())
            .map(hex::encode)
            .unwrap_or_default()
    }

    /// A request context as the trail names it: the HMAC of its canonical form.
    pub fn context(&self, context: &std::collections::BTreeMap<String, String>) -> Vec<u8> {
        if context.is_empty() {
            return Vec::new();
        }
        self.hmac(&mandate_core::audit::canonical_context(context))
            .map(|h| h.to_vec())
            .unwrap_or_default()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum KekError {
    #[error("cannot read the key-encryption key file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the key-encryption key must be 64 hex digits (32 bytes)")]
    Malformed,
}

impl Kek {
    /// Parses 64 hex digits.
    pub fn from_hex(text: &str) -> Result<Self, KekError> {
        let bytes = hex::decode(text.trim()).map_err(|_| KekError::Malformed)?;
        let key: [u8; 32] = bytes.try_into().map_err(|_| KekError::Malformed)?;
        Ok(Kek {
            cipher: ChaCha20Poly1305::new(Key::from_slice(&key)),
            audit_key: hmac(&key, AUDIT_KEY_LABEL),
        })
    }

    /// Reads a file holding 64 hex digits.
    pub fn from_file(path: &Path) -> Result<Self, KekError> {
        let text = std::fs::read_to_string(path).map_err(|source| KekError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_hex(&text)
    }

    /// A fresh random KEK, as hex (what `mandate dev` writes).
    pub fn generate_hex() -> String {
        let mut key = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut key);
        hex::encode(key)
    }

    /// Seals `plaintext` for `purpose`: nonce followed by ciphertext and tag.
    pub fn seal(&self, purpose: &str, plaintext: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_BYTES];
        rand::thread_rng().fill_bytes(&mut nonce);
        let sealed = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: purpose.as_bytes(),
                },
            )
            .expect("ChaCha20-Poly1305 encryption of an in-memory buffer cannot fail");
        let mut out = nonce.to_vec();
        out.extend_from_slice(&sealed);
        out
    }

    /// Opens a sealed value; fails if it was sealed under another key or purpose, or altered.
    pub fn open(&self, purpose: &str, sealed: &[u8]) -> Result<Vec<u8>, String> {
        if sealed.len() < NONCE_BYTES {
            return Err("sealed value is too short".into());
        }
        let (nonce, body) = sealed.split_at(NONCE_BYTES);
        self.cipher
            .decrypt(Nonce::from_slice(nonce), Payload { msg: body, aad: purpose.as_bytes() })
            .map_err(|_| format!("cannot open the value sealed for {purpose}: wrong key-encryption key or corrupted data"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_value_opens_only_with_its_key_and_purpose() {
        let kek = Kek::from_hex(&Kek::generate_hex()).expect("kek");
        let sealed = kek.seal("secret:a", b"hunter2");
        assert_eq!(kek.open("secret:a", &sealed).expect("open"), b"hunter2");
        assert!(kek.open("secret:b", &sealed).is_err());
        let other = Kek::from_hex(&Kek::generate_hex()).expect("kek");
        assert!(other.open("secret:a", &sealed).is_err());
        assert!(!sealed.windows(7).any(|w| w == b"hunter2"));
    }

    #[test]
    fn a_malformed_kek_is_refused() {
        assert!(Kek::from_hex("abc").is_err());
        assert!(Kek::from_hex(&"zz".repeat(32)).is_err());
    }
}
