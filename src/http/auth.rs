//! Client credentials on the proxy routes: where a request carries its token (`?key=`,
//! `x-goog-api-key`, `Authorization: Bearer`), and the token table it is checked against in
//! constant time.

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::ClientToken;

/// The accepted client tokens, kept as SHA-256 digests and compared in constant time.
#[derive(Debug, Default)]
pub struct Tokens {
    entries: Vec<([u8; 32], String)>,
}

impl Tokens {
    pub fn new(tokens: &[ClientToken]) -> Self {
        Tokens {
            entries: tokens
                .iter()
                .map(|t| {
                    (
                        Sha256::digest(t.secret.expose().as_bytes()).into(),
                        t.name.clone(),
                    )
                })
                .collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The name of the token `presented`, if it is one of ours. Every entry is compared, so
    /// the time taken does not depend on which one matches, or how much of it.
    pub fn check(&self, presented: &str) -> Option<&str> {
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        let mut found = None;
        for (known, name) in &self.entries {
            if bool::from(known.ct_eq(&digest)) {
                found = Some(name.as_str());
            }
        }
        found
    }
}

/// Whether `presented` is `secret`, compared as SHA-256 digests in constant time.
pub fn same_secret(presented: &str, secret: &str) -> bool {
    let a: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
    let b: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
    bool::from(a.ct_eq(&b))
}

/// Finds the client's credential: `?key=`, `x-goog-api-key`, or `Authorization: Bearer`.
pub fn credential<'a>(
    query: Option<&'a str>,
    goog_key: Option<&'a [u8]>,
    authorization: Option<&'a [u8]>,
) -> Option<std::borrow::Cow<'a, str>> {
    if let Some(k) = query.and_then(|q| query_param(q, "key")) {
        return Some(k);
    }
    if let Some(k) = goog_key.and_then(|v| std::str::from_utf8(v).ok()) {
        return Some(k.trim().into());
    }
    let auth = std::str::from_utf8(authorization?).ok()?.trim();
    let (scheme, token) = auth.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().into())
}

/// The (percent-decoded) value of query parameter `name`.
pub fn query_param<'a>(query: &'a str, name: &str) -> Option<std::borrow::Cow<'a, str>> {
    query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| form_decode(v))
}

/// A query or form value: `+` is a space, `%XX` a byte.
pub fn form_decode(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.contains(['%', '+']) {
        return s.into();
    }
    percent_encoding::percent_decode_str(&s.replace('+', " "))
        .decode_utf8_lossy()
        .into_owned()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    #[test]
    fn tokens_match_by_value() {
        let t = Tokens::new(&[ClientToken {
            name: "alice".into(),
            secret: Secret::new("sk-a"),
        }]);
        assert_eq!(t.check("sk-a"), Some("alice"));
        assert_eq!(t.check("sk-"), None);
        assert_eq!(t.check(""), None);
    }

    #[test]
    fn credential_sources() {
        assert_eq!(
            credential(Some("alt=sse&key=sk%2Da"), None, None).as_deref(),
            Some("sk-a")
        );
        assert_eq!(
            credential(None, Some(b"sk-b"), None).as_deref(),
            Some("sk-b")
        );
        assert_eq!(
            credential(None, None, Some(b"Bearer sk-c")).as_deref(),
            Some("sk-c")
        );
        assert_eq!(credential(None, None, Some(b"Basic xyz")), None);
        assert_eq!(form_decode("a%zzb%4"), "a%zzb%4");
    }
}
