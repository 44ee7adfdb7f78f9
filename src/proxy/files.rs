//! The Files API: resumable uploads, file lookups and deletions, each with the key the file
//! belongs to. A file uploaded with one key exists only for that key at Google, so gemgate
//! remembers which key started each upload and which key owns each file, and sends every later
//! request about the file — or naming it in `fileData.fileUri` — with that key.

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};

use bytes::Bytes;
use http::header;
use memchr::memmem::Finder;
use pingora::protocols::http::ServerSession;
use serde_json::Value;

use super::{
    auth, client_query, read_body, send, upstream_header, write_full, Exchange, Gateway,
    Generation, Outcome, Refusal, UpstreamRequest,
};
use crate::proxy::reply::GateError;

/// Uploads in progress and uploaded files, by id, with the id of the key they belong to (and
/// for files, when Google deletes them).
#[derive(Debug, Default)]
pub struct FileOwners {
    uploads: Mutex<HashMap<String, String>>,
    files: Mutex<HashMap<String, (String, u64)>>,
}

impl FileOwners {
    /// Files remembered from earlier runs.
    pub fn restore(&self, saved: Vec<(String, String, u64)>) {
        let now = crate::keys::clock::now_ms();
        let mut files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        for (id, key, expires) in saved.into_iter().filter(|f| f.2 > now) {
            files.insert(id, (key, expires));
        }
    }

    fn start_upload(&self, upload_id: String, key_id: String) {
        self.uploads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(upload_id, key_id);
    }

    /// A finished upload's URL is no longer a credential.
    fn finish_upload(&self, upload_id: &str) {
        self.uploads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(upload_id);
    }

    fn upload_key(&self, upload_id: &str) -> Option<String> {
        self.uploads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(upload_id)
            .cloned()
    }

    /// The key that owns file `id` (`files/abc` or `abc`).
    pub fn file_key(&self, id: &str) -> Option<String> {
        let id = id.rsplit('/').next().unwrap_or(id);
        let now = crate::keys::clock::now_ms();
        let files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        files
            .get(id)
            .filter(|(_, expires)| *expires > now)
            .map(|(k, _)| k.clone())
    }

    fn keys_with_files(&self) -> Vec<String> {
        let files = self.files.lock().unwrap_or_else(|e| e.into_inner());
        let now = crate::keys::clock::now_ms();
        let mut keys: Vec<String> = files
            .values()
            .filter(|(_, expires)| *expires > now)
            .map(|(k, _)| k.clone())
            .collect();
        keys.sort();
        keys.dedup();
        keys
    }
}

/// The files a Gemini request names in `fileData.fileUri`.
pub fn named_files(body: &[u8]) -> Vec<String> {
    // Built once: building a searcher costs more than searching a short request.
    static FILE_URI: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"/files/"));
    if FILE_URI.find(body).is_none() {
        return Vec::new();
    }
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return Vec::new();
    };
    v.get("contents")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|c| c.get("parts").and_then(Value::as_array))
        .flatten()
        .filter_map(|p| p.pointer("/fileData/fileUri")?.as_str())
        .filter_map(|u| u.split("/files/").nth(1).map(str::to_owned))
        .collect()
}

impl Gateway {
    /// `POST /upload/v1beta/files`: `start` picks a key and hands the client an upload URL on
    /// gemgate; later commands go with the key that started the upload.
    pub(super) async fn file_upload(
        &self,
        gen: &Generation,
        s: &mut ServerSession,
        x: &mut Exchange,
    ) -> Result<Outcome, Refusal> {
        let query = client_query(s);
        let upload_id = auth::query_param(&query, "upload_id").map(|v| v.into_owned());
        let owner = upload_id
            .as_deref()
            .and_then(|id| self.state.lasting.files.upload_key(id));
        let pinned = match (&upload_id, owner) {
            // Starting an upload needs the client's token.
            (None, _) => {
                self.admit(gen, s, http::Method::POST, x)?;
                None
            }
            // As at Google, an upload URL is its own credential (SDKs send no key with it):
            // its id is unguessable and was handed only to the client that started it.
            (Some(_), Some(owner)) => {
                if s.req_header().method != http::Method::POST {
                    return Err(Refusal::Gate(GateError::new(405, "use POST")));
                }
                Some(self.owner_index(gen, Some(owner))?)
            }
            (Some(_), None) => {
                return Err(Refusal::Gate(GateError::new(
                    404,
                    "no such upload through this gateway",
                )))
            }
        };
        let req = s.req_header();
        let finalize = req
            .headers
            .get("x-goog-upload-command")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|c| c.contains("finalize"));
        let body = read_body(s, gen.config.max_body_bytes).await?;
        let path = format!("/upload{}/files", gen.target.base.path);
        let header = upstream_header(gen, s.req_header(), &path, &query)?;
        let mut up = UpstreamRequest::new(header, body);
        up.pinned = pinned;
        let answer = self.collect(gen, &up, x).await?;
        let key_id = x.key.clone().unwrap_or_default();
        let mut h = super::response_header(200, x);
        for (name, value) in std::mem::take(&mut x.upload_headers) {
            if name == "x-goog-upload-url" {
                // The client uploads through gemgate, which knows the key for this upload.
                let Some(id) = value
                    .split_once("upload_id=")
                    .map(|(_, rest)| rest.split('&').next().unwrap_or_default().to_owned())
                else {
                    continue;
                };
                self.state
                    .lasting
                    .files
                    .start_upload(id.clone(), key_id.clone());
                let host = s
                    .req_header()
                    .headers
                    .get(header::HOST)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("localhost")
                    .to_owned();
                // Back to the path the client used (`/gemini`, `v1`), with the upload's id.
                let path = s.req_header().uri.path().to_owned();
                let url = format!("http://{host}{path}?upload_id={id}&upload_protocol=resumable");
                let _ = h.insert_header("x-goog-upload-url", url);
            } else {
                let _ = h.insert_header(name, value);
            }
        }
        if finalize {
            if let Some(id) = &upload_id {
                self.state.lasting.files.finish_upload(id);
            }
            let file = serde_json::from_slice::<Value>(&answer).unwrap_or_default();
            if let Some(name) = file.pointer("/file/name").and_then(Value::as_str) {
                let id = name.trim_start_matches("files/").to_owned();
                // Google keeps files 48 hours unless it says otherwise.
                let expires = file
                    .pointer("/file/expirationTime")
                    .and_then(Value::as_str)
                    .and_then(crate::keys::clock::parse_rfc3339)
                    .unwrap_or_else(|| crate::keys::clock::now_ms() + 48 * 3_600_000);
                tracing::info!(file = %id, key = %key_id, "file uploaded");
                self.state
                    .lasting
                    .files
                    .files
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id.clone(), (key_id.clone(), expires));
                self.save_file(id, Some((key_id, expires)));
            }
        }
        if !answer.is_empty() {
            let _ = h.insert_header(header::CONTENT_TYPE, "application/json; charset=UTF-8");
        }
        Ok(write_full(s, h, answer).await)
    }

    /// `GET /v1beta/files` (every key's files, merged), `GET` or `DELETE /v1beta/files/{id}`
    /// (with the key that owns it).
    pub(super) async fn files(
        &self,
        gen: &Generation,
        s: &mut ServerSession,
        id: Option<String>,
        x: &mut Exchange,
    ) -> Result<Outcome, Refusal> {
        let method = s.req_header().method.clone();
        let allowed = method == http::Method::GET || id.is_some() && method == http::Method::DELETE;
        self.admit(
            gen,
            s,
            if allowed {
                method.clone()
            } else {
                http::Method::GET
            },
            x,
        )?;
        let query = client_query(s);
        let base = &gen.target.base.path;
        let Some(id) = id else {
            let mut all = Vec::new();
            for key in self.state.lasting.files.keys_with_files() {
                let header =
                    upstream_header(gen, s.req_header(), &format!("{base}/files"), &query)?;
                let mut up = UpstreamRequest::new(header, Bytes::new());
                up.pinned = Some(self.owner_index(gen, Some(key))?);
                let page = self.collect(gen, &up, x).await?;
                if let Ok(Value::Object(mut v)) = serde_json::from_slice::<Value>(&page) {
                    if let Some(Value::Array(files)) = v.remove("files") {
                        all.extend(files);
                    }
                }
            }
            let body = serde_json::json!({ "files": all });
            return Ok(send(s, x, 200, Bytes::from(body.to_string())).await);
        };
        let owner = self.state.lasting.files.file_key(&id);
        let pinned = self.owner_index(gen, owner)?;
        let header = upstream_header(gen, s.req_header(), &format!("{base}/files/{id}"), &query)?;
        let mut up = UpstreamRequest::new(header, Bytes::new());
        up.pinned = Some(pinned);
        let answer = self.collect(gen, &up, x).await?;
        if method == http::Method::DELETE {
            self.state
                .lasting
                .files
                .files
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&id);
            self.save_file(id, None);
        }
        Ok(send(s, x, 200, answer).await)
    }

    /// Records a file's owner (or its deletion) in the store, off the request path.
    fn save_file(&self, id: String, owner: Option<(String, u64)>) {
        let Some(store) = self.state.lasting.store.clone() else {
            return;
        };
        tokio::task::spawn_blocking(move || {
            if let Err(e) = store.save_file(&id, owner) {
                tracing::error!(file = %id, "cannot save the file's owner: {e}");
            }
        });
    }

    /// The pool index of the key that owns an upload or a file.
    fn owner_index(&self, gen: &Generation, key_id: Option<String>) -> Result<usize, Refusal> {
        key_id.and_then(|k| gen.pool.index_of(&k)).ok_or_else(|| {
            Refusal::Gate(GateError::new(
                404,
                "no such file or upload through this gateway (or its key has left the pool)",
            ))
        })
    }

    /// The key a request must use because it names an uploaded file; `None` when it names
    /// none (or only files gemgate did not upload).
    pub(super) fn file_pin(&self, gen: &Generation, body: &[u8]) -> Option<usize> {
        named_files(body)
            .iter()
            .find_map(|f| self.state.lasting.files.file_key(f))
            .and_then(|k| gen.pool.index_of(&k))
    }
}
