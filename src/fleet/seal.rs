//! Secrets a fleet keeps in Redis (the admin edits, which hold key secrets and tokens; admin
//! sessions) are sealed with the fleet secret: XChaCha20-Poly1305, a random nonce per value,
//! and the Redis key name as associated data, so a value cannot be moved to another name.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use sha2::{Digest, Sha256};

const NONCE: usize = 24;

/// Seals and opens values with the key derived from the fleet secret.
pub struct Seal(XChaCha20Poly1305);

impl Seal {
    pub fn new(secret: &str) -> Seal {
        let key = Sha256::new()
            .chain_update(b"gemgate fleet seal v1\0")
            .chain_update(secret.as_bytes())
            .finalize();
        Seal(XChaCha20Poly1305::new(&key))
    }

    /// `plain` sealed for the Redis name `name`: nonce, then ciphertext and tag.
    pub fn seal(&self, name: &str, plain: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE];
        getrandom::getrandom(&mut nonce).expect("the system's random source");
        let sealed = self
            .0
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plain,
                    aad: name.as_bytes(),
                },
            )
            .expect("sealing never fails for in-memory sizes");
        let mut out = Vec::with_capacity(NONCE + sealed.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// The value sealed for `name`, or an error when it was sealed with another secret (or
    /// for another name, or changed).
    pub fn open(&self, name: &str, sealed: &[u8]) -> Result<Vec<u8>, &'static str> {
        if sealed.len() < NONCE {
            return Err("too short to be sealed");
        }
        let (nonce, body) = sealed.split_at(NONCE);
        self.0
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: body,
                    aad: name.as_bytes(),
                },
            )
            .map_err(|_| "sealed with another fleet secret, or changed")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_the_same_secret_and_name() {
        let seal = Seal::new("a fleet secret of some length");
        let sealed = seal.seal("gemgate:{f}:v1:edits", b"AIzaSy-secret");
        assert!(
            !sealed.windows(6).any(|w| w == b"AIzaSy"),
            "sealed in clear"
        );
        assert_eq!(
            seal.open("gemgate:{f}:v1:edits", &sealed).unwrap(),
            b"AIzaSy-secret"
        );
        assert!(seal.open("gemgate:{f}:v1:sessions", &sealed).is_err());
        let other = Seal::new("another fleet secret, same length");
        assert!(other.open("gemgate:{f}:v1:edits", &sealed).is_err());
        let mut changed = sealed.clone();
        *changed.last_mut().unwrap() ^= 1;
        assert!(seal.open("gemgate:{f}:v1:edits", &changed).is_err());
        assert!(seal.open("gemgate:{f}:v1:edits", b"short").is_err());
        // A fresh nonce each time: the same value never seals the same way twice.
        assert_ne!(sealed, seal.seal("gemgate:{f}:v1:edits", b"AIzaSy-secret"));
    }
}
