//! Responses of OpenAI's Responses API that clients asked gemgate to keep (`store`, the
//! default): each with its client, the turn's items (the client's input and the answer's
//! output) and the response it follows, so a later `previous_response_id` continues the
//! conversation on any instance. Kept until `responses.retention_days` after they were made.

use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::{Store, StoreError, io};

const RESPONSES: TableDefinition<&str, &[u8]> = TableDefinition::new("responses");

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
        {
            let mut table = tx.open_table(RESPONSES).map_err(io)?;
            match stored {
                Some(r) => {
                    let value = serde_json::to_vec(r).expect("a response serialises");
                    table.insert(id, value.as_slice()).map_err(io)?;
                }
                None => {
                    table.remove(id).map_err(io)?;
                }
            }
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
        {
            let mut table = tx.open_table(RESPONSES).map_err(io)?;
            for id in &expired {
                table.remove(id.as_str()).map_err(io)?;
            }
        }
        tx.commit().map_err(io)?;
        Ok(expired.len())
    }
}
