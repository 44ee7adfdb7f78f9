//! Responses of OpenAI's Responses API that clients asked gemgate to keep (`store`, the
//! default): each with its client, the turn's items (the client's input and the answer's
//! output) and the response it follows, so a later `previous_response_id` continues the
//! conversation on any instance. Kept until `responses.retention_days` after they were made,
//! and within a tenth of the data file's cap (`server.max_data_bytes`): past it, the oldest go first.
//!
//! A response to keep is queued in memory, readable at once, and written with the store's next
//! flush (every [`super::FLUSH_EVERY`]), all of a flush's in one transaction: a transaction of
//! its own for each took about 300 µs of CPU and a disk sync, one at a time, and held every
//! call that keeps its answer (the API's default) to about 2,600 a second on the machine where
//! it was measured. A crash loses what was queued, as it loses the last flush's key state and logs.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

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

/// Bytes of queued responses past which the request that adds one writes the queue itself
/// (off its worker thread) instead of leaving it to the flusher: a flusher that falls behind
/// slows the calls that keep responses rather than letting the queue grow. On a saturated
/// machine the flusher writes about every half second: at 14,000 calls a second keeping about
/// 1.2 KiB each, 8 MiB was passed at each flush and held calls up to 0.4 s at p99.
const QUEUED_ROOM: usize = 32 << 20;

/// A queued response as it is stored (JSON), or `None`: forget it.
type Row = Option<Arc<[u8]>>;

/// Kept responses (or forgettings) not yet written, by id.
#[derive(Default)]
pub(super) struct Queued {
    rows: Mutex<QueuedRows>,
    /// Held while a queue is written: writes of one id land in the order they were queued.
    writing: Mutex<()>,
}

#[derive(Default)]
struct QueuedRows {
    /// Each row with the number it was queued under: a row written is dropped from the queue
    /// only if it was not queued again meanwhile.
    by_id: HashMap<String, (u64, Row)>,
    next: u64,
    bytes: usize,
}

impl QueuedRows {
    fn cost(id: &str, value: &Row) -> usize {
        id.len() + value.as_ref().map_or(0, |v| v.len())
    }
}

impl Store {
    /// Queues response `id` to keep (`None`: to forget) with the next flush; readable (or
    /// gone) at once. True when the queue is past its room: the caller then writes it
    /// ([`Store::write_queued_responses`]), off the request path's threads.
    pub fn queue_response(&self, id: &str, stored: Option<&StoredResponse>) -> bool {
        let value =
            stored.map(|r| Arc::from(serde_json::to_vec(r).expect("a response serialises")));
        let mut rows = self
            .queued_responses
            .rows
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let rows = &mut *rows;
        rows.next += 1;
        rows.bytes += QueuedRows::cost(id, &value);
        if let Some((_, old)) = rows.by_id.insert(id.to_owned(), (rows.next, value)) {
            rows.bytes -= QueuedRows::cost(id, &old);
        }
        rows.bytes > QUEUED_ROOM
    }

    /// Writes the queued responses in one transaction; those not queued again meanwhile
    /// leave the queue.
    pub fn write_queued_responses(&self) -> Result<(), StoreError> {
        let queued = &self.queued_responses;
        let _writing = queued.writing.lock().unwrap_or_else(|e| e.into_inner());
        let mut taken: Vec<(String, u64, Row)> = {
            let rows = queued.rows.lock().unwrap_or_else(|e| e.into_inner());
            rows.by_id
                .iter()
                .map(|(id, (seq, value))| (id.clone(), *seq, value.clone()))
                .collect()
        };
        if taken.is_empty() {
            return Ok(());
        }
        // In the order of their ids (which begin with the time): added at the table's end.
        taken.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        let written = self.write_responses(
            taken
                .iter()
                .map(|(id, _, value)| (id.as_str(), value.as_deref())),
        );
        let mut rows = queued.rows.lock().unwrap_or_else(|e| e.into_inner());
        let rows = &mut *rows;
        if written.is_err() && rows.bytes > QUEUED_ROOM {
            // A file that cannot be written must not make the queue grow without end.
            tracing::error!(
                responses = rows.by_id.len(),
                "the data file cannot be written: the queued responses are dropped"
            );
            *rows = QueuedRows::default();
        }
        written?;
        for (id, seq, _) in taken {
            if rows.by_id.get(&id).is_some_and(|(now, _)| *now == seq) {
                let (_, value) = rows.by_id.remove(&id).expect("just seen");
                rows.bytes -= QueuedRows::cost(&id, &value);
            }
        }
        Ok(())
    }

    /// Writes responses (`None`: forgets them) in one transaction, then keeps them within
    /// their room.
    fn write_responses<'a>(
        &self,
        rows: impl Iterator<Item = (&'a str, Option<&'a [u8]>)>,
    ) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(io)?;
        let row = |id: &str, value: usize| (id.len() + value) as i64;
        let mut grown = 0;
        {
            let mut table = tx.open_table(RESPONSES).map_err(io)?;
            for (id, value) in rows {
                let old = match value {
                    Some(value) => table.insert(id, value).map_err(io)?,
                    None => table.remove(id).map_err(io)?,
                };
                grown += value.map_or(0, |v| row(id, v.len()));
                grown -= old.map_or(0, |o| row(id, o.value().len()));
            }
        }
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
        let queued = {
            let rows = self
                .queued_responses
                .rows
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            rows.by_id.get(id).map(|(_, value)| value.clone())
        };
        if let Some(value) = queued {
            return Ok(value
                .and_then(|v| serde_json::from_slice::<StoredResponse>(&v).ok())
                .filter(|r| r.expires_ms > now_ms));
        }
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

    impl Store {
        /// Keeps response `id` (`None`: forgets it) now, in a transaction of its own.
        fn save_response(
            &self,
            id: &str,
            stored: Option<&StoredResponse>,
        ) -> Result<(), StoreError> {
            self.queue_response(id, stored);
            self.write_queued_responses()
        }
    }

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
    fn a_queued_forgetting_hides_the_response_and_is_written_with_the_queue() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 30).unwrap();
        store
            .save_response("a", Some(&kept("c", 5, "one")))
            .unwrap();
        store.queue_response("b", Some(&kept("c", 5, "two")));
        store.queue_response("a", None);
        assert_eq!(store.load_response("a", 0).unwrap(), None);
        assert_eq!(
            store.load_response("b", 0).unwrap(),
            Some(kept("c", 5, "two"))
        );
        // Expiry holds for queued responses too.
        assert_eq!(store.load_response("b", 5).unwrap(), None);
        store.write_queued_responses().unwrap();
        let queued = store.queued_responses.rows.lock().unwrap();
        assert!(queued.by_id.is_empty());
        assert_eq!(queued.bytes, 0);
        drop(queued);
        assert_eq!(store.load_response("a", 0).unwrap(), None);
        assert_eq!(
            store.load_response("b", 0).unwrap(),
            Some(kept("c", 5, "two"))
        );
    }

    #[test]
    fn a_queue_past_its_room_asks_its_caller_to_write_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), 1 << 30).unwrap();
        // About a quarter of the room each (the text is kept twice: input and answer).
        let big = kept("c", 5, &"x".repeat(QUEUED_ROOM / 8));
        let over: Vec<bool> = (0..5)
            .map(|n| store.queue_response(&format!("r{n}"), Some(&big)))
            .collect();
        assert_eq!(over, [false, false, false, true, true]);
        // Replacing a row counts its new size, not both.
        assert!(store.queue_response("r0", Some(&kept("c", 5, "small"))));
        store.write_queued_responses().unwrap();
        assert!(!store.queue_response("r5", Some(&big)));
        assert_eq!(store.load_response("r4", 0).unwrap(), Some(big));
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
