//! Cached contents (`/v1beta/cachedContents`): each belongs to the Cloud project of the key
//! that created it, so gemgate remembers that key (with the client that made it and when the
//! cache expires) and sends every later call about the cache — or naming it in a
//! `generateContent`'s `cachedContent` — with that key.
//!
//! The records are the owner registry's (`keys::owners`, kind `Cache`): kept in the store
//! across restarts and shared by a fleet. A client sees and uses only its own caches;
//! another's is answered 404 without a call to Google.

use pingora::protocols::http::ServerSession;
use serde_json::Value;

use super::{Exchange, Gateway, Generation, Outcome, Refusal, send};
use crate::keys::owners::{Kind, Owner};

/// How long Google keeps a cached content that does not say (its default TTL).
const DEFAULT_TTL_MS: u64 = 3_600_000;

/// The action of a call (on one cache, or on the collection) and the method its credentials
/// are checked for (one the route does not take is checked as a `GET`, then refused).
fn action_of(one: bool, method: &http::Method) -> (&'static str, http::Method) {
    use http::Method as M;
    let action = match (one, method) {
        (false, &M::POST) => "cachedContents.create",
        (false, &M::GET) => "cachedContents.list",
        (true, &M::GET) => "cachedContents.get",
        (true, &M::PATCH) => "cachedContents.patch",
        (true, &M::DELETE) => "cachedContents.delete",
        _ => {
            return (
                if one {
                    "cachedContents.get"
                } else {
                    "cachedContents.list"
                },
                M::GET,
            );
        }
    };
    (action, method.clone())
}

impl Gateway {
    /// `POST /v1beta/cachedContents` (create, on any key, or the key of the files it names),
    /// `GET` (the client's own, from every key that holds some); `GET`, `PATCH` or `DELETE
    /// /v1beta/cachedContents/{id}` with the key that owns it.
    pub(crate) async fn caches(
        &self,
        generation: &Generation,
        s: &mut ServerSession,
        id: Option<String>,
        x: &mut Exchange,
    ) -> Result<Outcome, Refusal> {
        let method = s.req_header().method.clone();
        let action = action_of(id.is_some(), &method);
        let path = match &id {
            Some(id) => format!("cachedContents/{id}"),
            None => "cachedContents".to_owned(),
        };
        let mut up = self.resource_call(generation, s, action, &path, x).await?;
        self.ask_plugins(generation, s, "", false, &mut up, x)
            .await?;
        let client = x.meta.client().to_owned();
        match (&id, &method) {
            (None, &http::Method::POST) => {
                up.pinned = self.file_pin(generation, &up.body, Some(&client))?;
                up.idempotent = false;
                let answer = self.collect(generation, &up, x).await?;
                let owner = Owner {
                    key: x.key.clone().unwrap_or_default(),
                    client: Some(client),
                };
                self.record_cache(&answer, owner);
                Ok(send(s, x, 200, answer).await)
            }
            (None, _) => {
                let list = self
                    .list_owned(generation, &up, &client, Kind::Cache, x)
                    .await?;
                Ok(send(s, x, 200, list).await)
            }
            (Some(id), _) => {
                let (record, index) = self.owned(generation, Kind::Cache, id, Some(&client))?;
                up.pinned = Some(index);
                let answer = self.collect(generation, &up, x).await?;
                if method == http::Method::DELETE {
                    self.forget_owned(Kind::Cache, id);
                } else if method == http::Method::PATCH {
                    self.record_cache(&answer, record.owner);
                }
                Ok(send(s, x, 200, answer).await)
            }
        }
    }

    /// Records the cache Google's answer describes (made or updated), with its owner and its
    /// expiry.
    fn record_cache(&self, answer: &[u8], owner: Owner) {
        let cache = serde_json::from_slice::<Value>(answer).unwrap_or_default();
        let Some(name) = cache["name"]
            .as_str()
            .filter(|n| n.starts_with("cachedContents/"))
        else {
            return;
        };
        let expires_ms = cache["expireTime"]
            .as_str()
            .and_then(crate::clock::parse_rfc3339);
        self.record_owned(Kind::Cache, name, owner, expires_ms, DEFAULT_TTL_MS);
    }
}
