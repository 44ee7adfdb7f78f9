//! Which key owns each resource made through gemgate: a file uploaded with one key exists only
//! for that key at Google, so every later request about it must go with that key (and only
//! for the client that made it).

use std::collections::HashMap;
use std::sync::Mutex;

use crate::clock::now_ms;

/// How long Google keeps a file that does not say.
pub const DEFAULT_LIFETIME_MS: u64 = 48 * 3_600_000;

/// The kinds of resource the registry keeps. Each lives at Google in the Cloud project of the
/// key that made it; a record's id is the kind's prefix and the resource's own id (`cache:abc`),
/// files keeping their bare ids from before there were other kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Cache,
    Batch,
    Interaction,
    /// An ephemeral token for the Live API (`auth_tokens/…`).
    Token,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::File,
        Kind::Cache,
        Kind::Batch,
        Kind::Interaction,
        Kind::Token,
    ];

    fn prefix(self) -> &'static str {
        match self {
            Kind::File => "",
            Kind::Cache => "cache:",
            Kind::Batch => "batch:",
            Kind::Interaction => "interaction:",
            Kind::Token => "token:",
        }
    }

    /// The collection's name in Google's API (`files`, `cachedContents`, …).
    pub fn collection(self) -> &'static str {
        match self {
            Kind::File => "files",
            Kind::Cache => "cachedContents",
            Kind::Batch => "batches",
            Kind::Interaction => "interactions",
            Kind::Token => "auth_tokens",
        }
    }

    /// What one is called in an error message.
    pub fn what(self) -> &'static str {
        match self {
            Kind::File => "file",
            Kind::Cache => "cached content",
            Kind::Batch => "batch",
            Kind::Interaction => "interaction",
            Kind::Token => "ephemeral token",
        }
    }

    pub fn from_collection(name: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.collection() == name)
    }

    /// The record id of resource `id` (`batches/abc` or `abc`). An ephemeral token is its own
    /// credential: it is kept (and logged, and shown) only as a SHA-256 of it.
    pub fn record_id(self, id: &str) -> String {
        let id = id.rsplit('/').next().unwrap_or(id);
        if self == Kind::Token {
            use sha2::{Digest, Sha256};
            let digest = Sha256::digest(id.as_bytes());
            let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
            return format!("{}{hex}", self.prefix());
        }
        format!("{}{id}", self.prefix())
    }

    /// The kind and the resource's own id of a record id.
    pub fn of_record(record_id: &str) -> (Kind, &str) {
        Kind::ALL[1..]
            .iter()
            .find_map(|&k| Some((k, record_id.strip_prefix(k.prefix())?)))
            .unwrap_or((Kind::File, record_id))
    }
}

/// Who a file or an upload belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// The id of the key that holds it at Google.
    pub key: String,
    /// The client that made it; `None` for files recorded before owners were kept.
    pub client: Option<String>,
}

/// A file uploaded through gemgate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRecord {
    pub owner: Owner,
    /// When Google deletes it (ms since the epoch).
    pub expires_ms: u64,
}

/// Uploads in progress and uploaded files, by id.
#[derive(Debug, Default)]
pub struct FileOwners {
    uploads: Mutex<HashMap<String, Owner>>,
    files: Mutex<HashMap<String, FileRecord>>,
}

impl FileOwners {
    /// Files remembered from earlier runs (those not yet expired).
    pub fn restore(&self, saved: Vec<(String, FileRecord)>) {
        let now = now_ms();
        let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        files.extend(saved.into_iter().filter(|(_, f)| f.expires_ms > now));
    }

    pub fn start_upload(&self, upload_id: String, owner: Owner) {
        self.uploads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(upload_id, owner);
    }

    /// Every upload in progress.
    pub fn uploads(&self) -> Vec<(String, Owner)> {
        let uploads = self.uploads.lock().unwrap_or_else(|e| e.into_inner());
        uploads
            .iter()
            .map(|(id, o)| (id.clone(), o.clone()))
            .collect()
    }

    /// A finished upload's URL is no longer a credential.
    pub fn finish_upload(&self, upload_id: &str) {
        self.uploads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(upload_id);
    }

    pub fn upload(&self, upload_id: &str) -> Option<Owner> {
        self.uploads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(upload_id)
            .cloned()
    }

    /// Whether gemgate has no file on record at all (then no request can name one of its).
    pub fn is_empty(&self) -> bool {
        self.files
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    /// File `id` (`files/abc` or `abc`), if gemgate uploaded it and it has not expired.
    pub fn file(&self, id: &str) -> Option<FileRecord> {
        let id = id.rsplit('/').next().unwrap_or(id);
        let files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        files.get(id).filter(|f| f.expires_ms > now_ms()).cloned()
    }

    pub fn insert(&self, id: String, record: FileRecord) {
        self.files
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, record);
    }

    pub fn remove(&self, id: &str) {
        self.files
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
    }

    /// Forgets the records that expired before `now`; returns their ids.
    pub fn prune(&self, now: u64) -> Vec<String> {
        let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        let gone: Vec<String> = files
            .iter()
            .filter(|(_, f)| f.expires_ms <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &gone {
            files.remove(id);
        }
        gone
    }

    /// Every live file, by id: the admin API's view.
    pub fn all(&self) -> Vec<(String, FileRecord)> {
        let now = now_ms();
        let files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        let mut all: Vec<(String, FileRecord)> = files
            .iter()
            .filter(|(_, f)| f.expires_ms > now)
            .map(|(id, f)| (id.clone(), f.clone()))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        all
    }

    /// `client`'s live files, grouped by the key that holds them.
    pub fn of_client(&self, client: &str) -> HashMap<String, Vec<String>> {
        let mut by_key: HashMap<String, Vec<String>> = HashMap::new();
        for (id, f) in self.all() {
            if f.owner.client.as_deref() == Some(client) {
                by_key.entry(f.owner.key).or_default().push(id);
            }
        }
        by_key
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_have_their_own_record_ids_and_tokens_are_hashed() {
        assert_eq!(Kind::File.record_id("files/abc"), "abc");
        assert_eq!(Kind::Cache.record_id("cachedContents/abc"), "cache:abc");
        assert_eq!(Kind::of_record("batch:b1"), (Kind::Batch, "b1"));
        assert_eq!(Kind::of_record("abc"), (Kind::File, "abc"));
        let token = Kind::Token.record_id("auth_tokens/secret-value");
        assert!(
            token.starts_with("token:") && !token.contains("secret"),
            "{token}"
        );
        assert_eq!(token, Kind::Token.record_id("secret-value"));
    }

    #[test]
    fn expired_records_are_pruned() {
        let owners = FileOwners::default();
        let owner = Owner {
            key: "k".into(),
            client: Some("c".into()),
        };
        for (id, expires_ms) in [("old", 10), ("new", u64::MAX)] {
            let record = FileRecord {
                owner: owner.clone(),
                expires_ms,
            };
            owners.insert(id.into(), record);
        }
        assert_eq!(owners.prune(100), ["old"]);
        assert!(owners.file("new").is_some());
        assert!(owners.prune(100).is_empty());
    }
}
