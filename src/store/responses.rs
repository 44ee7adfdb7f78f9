//! Responses of OpenAI's Responses API that clients asked gemgate to keep (`store`, the
//! default): each with its client, the turn's items (the client's input and the answer's
//! output) and the response it follows, so a later `previous_response_id` continues the
//! conversation on any instance. Kept until `responses.retention_days` after they were made,
//! and within a tenth of the data file's cap (`server.max_data_bytes`): past it, the oldest go first.

use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{Store, StoreError, io};

const RESPONSES: TableDefinition<&str, &[u8]> = TableDefinition::new("responses");
/// The bytes of kept responses (ids and values), in the meta table.
const RESPONSE_BYTES: &str = "response_bytes";

/// The share of a data file capped at `max_bytes` that kept responses may take. The logs take
/// at most 40% (see [`Store::keep_within`]); freed pages may be reused only in part.
fn response_room(max_bytes: u64) -> u64 {
    max_bytes / 10
}

/// One kept response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredResponse {
    /// The client that made it: no other sees or continues it.
    pub client: String,
    /// When it is forgotten (ms since the epoch).
    pub expires_ms: u64,
    /// The response it follows (`previous_response_id`).
    pub previous: Option<String>,
    /// This turn's items: the client's input, then the answer's output.
    pub items: Vec<serde_json::Value>,
    /// The Response object as answered.
    pub response: serde_json::Value,
}

impl Store {
    /// Keeps response `id` (`None`: forgets it).
    pub fn save_response(
        &self,
        id: &str,
        stored: Option<&StoredResponse>,
    ) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(io)?;
        let row = |value: usize| (id.len() + value) as i64;
        let grown = {
            let mut table = tx.open_table(RESPONSES).map_err(io)?;
            match stored {
                Some(r) => {
                    let value = serde_json::to_vec(r).expect("a response serialises");
                    let old = table.insert(id, value.as_slice()).map_err(io)?;
                    row(value.len()) - old.map_or(0, |o| row(o.value().len()))
                }
                None => {
                    let old = table.remove(id).map_err(io)?;
                    -old.map_or(0, |o| row(o.value().len()))
                }
            }
        };
        let total = add_response_bytes(&tx, grown)?;
        let room = response_room(self.max_bytes());
        if total > room {
            let gone = forget_oldest(&tx, total - room / 4 * 3)?;
            tracing::info!(
                responses = gone,
                max_bytes = self.max_bytes(),
                "kept responses reached a tenth of the data file's cap: the oldest were forgotten"
            );
        }
        tx.commit().map_err(io)
    }

    /// Response `id`, if kept and not expired.
    pub fn load_response(
        &self,
        id: &str,
        now_ms: u64,
    ) -> Result<Option<StoredResponse>, StoreError> {
        let tx = self.db.begin_read().map_err(io)?;
        let table = match tx.open_table(RESPONSES) {
            Ok(t) => t,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(io(e)),
        };
        let Some(value) = table.get(id).map_err(io)? else {
            return Ok(None);
        };
        Ok(serde_json::from_slice::<StoredResponse>(value.value())
            .ok()
            .filter(|r| r.expires_ms > now_ms))
    }

    /// Forgets the responses that expired before `now_ms`; returns how many.
    pub fn forget_expired_responses(&self, now_ms: u64) -> Result<usize, StoreError> {
        let expired: Vec<String> = {
            let tx = self.db.begin_read().map_err(io)?;
            let table = match tx.open_table(RESPONSES) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
                Err(e) => return Err(io(e)),
            };
            let mut expired = Vec::new();
            for row in table.iter().map_err(io)? {
                let (id, value) = row.map_err(io)?;
                #[derive(Deserialize)]
                struct Expiry {
                    expires_ms: u64,
                }
                let gone = serde_json::from_slice::<Expiry>(value.value())
                    .map_or(true, |e| e.expires_ms <= now_ms);
                if gone {
                    expired.push(id.value().to_owned());
                }
            }
            expired
        };
        if expired.is_empty() {
            return Ok(0);
        }
        let tx = self.db.begin_write().map_err(io)?;
        let mut grown = 0;
        {
            let mut table = tx.open_table(RESPONSES).map_err(io)?;
            for id in &expired {
                if let Some(old) = table.remove(id.as_str()).map_err(io)? {
                    grown -= (id.len() + old.value().len()) as i64;
                }
            }
        }
        add_response_bytes(&tx, grown)?;
        tx.commit().map_err(io)?;
        Ok(expired.len())
    }
}

/// Adds `grown` (negative: what was removed) to the bytes of kept responses; returns the new
/// total. A file from before they were counted has its table summed once.
fn add_response_bytes(tx: &redb::WriteTransaction, grown: i64) -> Result<u64, StoreError> {
    let mut meta = tx.open_table(super::META).map_err(io)?;
    let now = match meta.get(RESPONSE_BYTES).map_err(io)? {
        Some(n) => n.value().saturating_add_signed(grown),
        None => {
            let table = tx.open_table(RESPONSES).map_err(io)?;
            let mut sum = 0u64;
            for row in table.iter().map_err(io)? {
                let (id, value) = row.map_err(io)?;
                sum += (id.value().len() + value.value().len()) as u64;
            }
            sum
        }
    };
    meta.insert(RESPONSE_BYTES, now).map_err(io)?;
    Ok(now)
}

/// Forgets the oldest kept responses (the soonest to expire) until `at_least` bytes are gone;
/// returns how many.
fn forget_oldest(tx: &redb::WriteTransaction, at_least: u64) -> Result<usize, StoreError> {
    #[derive(Deserialize)]
    struct Expiry {
        expires_ms: u64,
    }
    let mut table = tx.open_table(RESPONSES).map_err(io)?;
    let mut rows = Vec::new();
    for row in table.iter().map_err(io)? {
        let (id, value) = row.map_err(io)?;
        let expires = serde_json::from_slice::<Expiry>(value.value()).map_or(0, |e| e.expires_ms);
        let bytes = (id.value().len() + value.value().len()) as u64;
        rows.push((expires, id.value().to_owned(), bytes));
    }
    rows.sort_unstable();
    let (mut freed, mut gone) = (0u64, 0usize);
    for (_, id, bytes) in rows {
        if freed >= at_least {
            break;
        }
        table.remove(id.as_str()).map_err(io)?;
        freed += bytes;
        gone += 1;
    }
    drop(table);
    add_response_bytes(tx, -(freed as i64))?;
    Ok(gone)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kept(client: &str, expires_ms: u64, text: &str) -> StoredResponse {
        StoredResponse {
            client: client.into(),
            expires_ms,
            previous: None,
            items: vec![serde_json::json!({ "type": "message", "content": text })],
            response: serde_json::json!({ "id": "r", "output_text": text }),
        }
    }

    #[test]
    fn kept_responses_stay_within_a_tenth_of_the_cap_the_oldest_forgotten_first() {
        let dir = tempfile::tempdir().unwrap();
        // A tenth of 200 kB: 20 kB for responses of about 2 kB each.
        let store = Store::open(dir.path(), 200_000).unwrap();
        let text = "x".repeat(1000);
        let row = 8 + serde_json::to_vec(&kept("c", 10_000, &text)).unwrap().len();
        for n in 0..100u64 {
            let id = format!("resp_{n:03}");
            store
                .save_response(&id, Some(&kept("c", 10_000 + n, &text)))
                .unwrap();
        }
        let held: Vec<u64> = (0..100u64)
            .filter(|n| {
                let id = format!("resp_{n:03}");
                store.load_response(&id, 0).unwrap().is_some()
            })
            .collect();
        // Trimmed to three quarters of the room when it passes it.
        let bytes = held.len() * row;
        assert!(
            (20_000 / 2..=20_000).contains(&bytes),
            "{} kept",
            held.len()
        );
        // The newest are the ones kept, without a gap.
        assert_eq!(held.last(), Some(&99));
        assert_eq!(held, (held[0]..100).collect::<Vec<_>>());
    }

    #[test]
    fn replacing_and_forgetting_keep_the_count_of_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 30).unwrap();
        let count = |store: &Store| {
            let tx = store.db.begin_write().unwrap();
            let n = add_response_bytes(&tx, 0).unwrap();
            tx.commit().unwrap();
            n
        };
        store
            .save_response("a", Some(&kept("c", 5, "one")))
            .unwrap();
        let one = count(&store);
        assert!(one > 0);
        store
            .save_response("a", Some(&kept("c", 5, "one")))
            .unwrap();
        assert_eq!(count(&store), one);
        store
            .save_response("b", Some(&kept("c", 7, "two")))
            .unwrap();
        assert_eq!(count(&store), 2 * one);
        assert_eq!(store.forget_expired_responses(6).unwrap(), 1);
        assert_eq!(count(&store), one);
        store.save_response("b", None).unwrap();
        store.save_response("never-kept", None).unwrap();
        assert_eq!(count(&store), 0);
    }
}
