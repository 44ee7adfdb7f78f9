//! The Files API: resumable uploads, file lookups and deletions, each with the key the file
//! belongs to and the client that made it.
//!
//! A file uploaded with one key exists only for that key at Google, so gemgate remembers which
//! key started each upload and which key owns each file, and sends every later request about
//! the file — or naming it in `fileData.fileUri` — with that key.
//!
//! Every file also belongs to the client that uploaded it (its token's name; plain tokens are
//! named by a hash of the token): a client lists only its own files, and asking for, deleting
//! or using another client's file is answered 404 without a call to Google. Files recorded
//! before owners were kept belong to no client: only the admin API shows them
//! (`GET /admin/api/resources?kind=files`).

use std::collections::BTreeSet;
use std::sync::LazyLock;

use bytes::Bytes;
use http::header;
use memchr::memmem::Finder;
use pingora::protocols::http::ServerSession;
use serde_json::Value;

use super::{
    Exchange, Gateway, Generation, Outcome, Refusal, UpstreamRequest, auth, client_query,
    read_body, response_header, send, upstream_header, write_full,
};
use crate::clock::now_ms;
use crate::http::reply::GateError;
use crate::keys::owners::{DEFAULT_LIFETIME_MS, FileRecord, Kind, Owner};

/// The files a Gemini request names, wherever it names them: `fileData.fileUri` in
/// `contents`, but also in a `countTokens` request's `generateContentRequest`, a batch's input
/// file, a cached content's parts. Every string of the form `files/ID` or `…/files/ID` counts
/// (what is not a file gemgate uploaded is ignored by the caller).
pub fn named_files(body: &[u8]) -> BTreeSet<String> {
    // Built once: building a searcher costs more than searching a short request.
    static FILES: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"files/"));
    let mut names = BTreeSet::new();
    if FILES.find(body).is_none() {
        return names;
    }
    let Ok(v) = serde_json::from_slice::<Value>(body) else {
        return names;
    };
    let mut stack = vec![&v];
    while let Some(v) = stack.pop() {
        match v {
            Value::Array(items) => stack.extend(items),
            Value::Object(members) => stack.extend(members.values()),
            Value::String(s) => names.extend(file_id(s).map(str::to_owned)),
            _ => {}
        }
    }
    names
}

/// The cached content a request names (`"cachedContent": "cachedContents/ID"` at its top).
fn named_cache(body: &[u8]) -> Option<String> {
    static CACHE: LazyLock<Finder<'static>> = LazyLock::new(|| Finder::new(b"cachedContents/"));
    CACHE.find(body)?;
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Named {
        cached_content: Option<String>,
    }
    serde_json::from_slice::<Named>(body)
        .ok()?
        .cached_content
        .filter(|c| c.starts_with("cachedContents/"))
}

/// The ID in `files/ID` or `…/files/ID` (up to a `:` method, `?` or `#`).
fn file_id(s: &str) -> Option<&str> {
    let rest = match s.strip_prefix("files/") {
        Some(rest) => rest,
        None => &s[s.rfind("/files/")? + "/files/".len()..],
    };
    let id = rest.split([':', '?', '#', '/']).next().unwrap_or_default();
    (!id.is_empty()).then_some(id)
}

/// The answer to a client asking about a file that is not its own (or not there): the same as
/// for a file that does not exist, so a client cannot learn another's file names.
fn no_such_file() -> Refusal {
    super::owned::not_found(Kind::File)
}

impl Gateway {
    /// `POST /upload/v1beta/files`: `start` picks a key and hands the client an upload URL on
    /// gemgate; later commands go with the key that started the upload.
    pub(crate) async fn file_upload(
        &self,
        generation: &Generation,
        s: &mut ServerSession,
        x: &mut Exchange,
    ) -> Result<Outcome, Refusal> {
        x.action = "files.upload".into();
        let query = client_query(s);
        let upload_id = auth::query_param(&query, "upload_id").map(|v| v.into_owned());
        let pinned = self.upload_key(generation, s, upload_id.as_deref(), x)?;
        let rewrite = self
            .on_request(generation, s, "", "files.upload", false, &x.meta)
            .await?;
        let req = s.req_header();
        let finalize = req
            .headers
            .get("x-goog-upload-command")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|c| c.contains("finalize"));
        let body = read_body(s, generation.config.max_body_bytes).await?;
        let path = format!("/upload{}/files", generation.target.base.path);
        let mut header = upstream_header(generation, s.req_header(), &path, &query)?;
        for (name, value) in rewrite.headers {
            let _ = header.insert_header(name, value);
        }
        let mut up = UpstreamRequest::new(header, body);
        up.pinned = pinned;
        let answer = self.collect(generation, &up, x).await?;
        let owner = Owner {
            key: x.key.clone().unwrap_or_default(),
            client: x.meta.client.clone(),
        };
        let mut h = response_header(200, x);
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
                    .shared
                    .start_upload(id.clone(), owner.clone());
                // Back to the path the client used (`/gemini`, `v1`), with the upload's id.
                let url = format!(
                    "{}{}?upload_id={id}&upload_protocol=resumable",
                    public_base(generation, s, &x.meta.peer),
                    s.req_header().uri.path()
                );
                let _ = h.insert_header("x-goog-upload-url", url);
            } else {
                let _ = h.insert_header(name, value);
            }
        }
        if finalize {
            if let Some(id) = &upload_id {
                self.state.lasting.shared.finish_upload(id);
            }
            self.record_file(&answer, owner);
        }
        if !answer.is_empty() {
            let _ = h.insert_header(header::CONTENT_TYPE, "application/json; charset=UTF-8");
        }
        Ok(write_full(s, h, answer).await)
    }

    /// Who may send an upload command, and the key it must go with: starting an upload needs
    /// the client's token (any key); later commands go with the key that started it.
    fn upload_key(
        &self,
        generation: &Generation,
        s: &ServerSession,
        upload_id: Option<&str>,
        x: &mut Exchange,
    ) -> Result<Option<usize>, Refusal> {
        let Some(id) = upload_id else {
            self.admit(generation, s, http::Method::POST, &mut x.meta)?;
            return Ok(None);
        };
        // As at Google, an upload URL is its own credential (SDKs send no key with it): its
        // id is unguessable and was handed only to the client that started it.
        let owner = self
            .state
            .lasting
            .shared
            .upload(id)
            .ok_or_else(no_such_file)?;
        if s.req_header().method != http::Method::POST {
            return Err(Refusal::Gate(GateError::new(405, "use POST")));
        }
        x.meta.client = owner.client;
        Ok(Some(self.owner_index(generation, &owner.key)?))
    }

    /// `GET /v1beta/files` (the client's own files, from every key that holds some), `GET` or
    /// `DELETE /v1beta/files/{id}` (with the key that owns it).
    pub(crate) async fn files(
        &self,
        generation: &Generation,
        s: &mut ServerSession,
        id: Option<String>,
        x: &mut Exchange,
    ) -> Result<Outcome, Refusal> {
        let method = s.req_header().method.clone();
        let allowed = method == http::Method::GET || id.is_some() && method == http::Method::DELETE;
        let checked = if allowed {
            method.clone()
        } else {
            http::Method::GET
        };
        self.admit(generation, s, checked, &mut x.meta)?;
        x.action = match (&id, &method) {
            (None, _) => "files.list",
            (Some(_), &http::Method::DELETE) => "files.delete",
            _ => "files.get",
        }
        .into();
        let action = x.action.clone();
        let rewrite = self
            .on_request(generation, s, "", &action, false, &x.meta)
            .await?;
        let client = x.meta.client().to_owned();
        let query = client_query(s);
        let base = &generation.target.base.path;
        let request = |path: &str, key: &str| -> Result<UpstreamRequest, Refusal> {
            let mut header = upstream_header(generation, s.req_header(), path, &query)?;
            for (name, value) in &rewrite.headers {
                let _ = header.insert_header(name.clone(), value.clone());
            }
            let mut up = UpstreamRequest::new(header, Bytes::new());
            up.pinned = Some(self.owner_index(generation, key)?);
            Ok(up)
        };
        let Some(id) = id else {
            let header = upstream_header(generation, s.req_header(), &format!("{base}/files"), "")?;
            let template = UpstreamRequest::new(header, Bytes::new());
            let list = self
                .list_owned(generation, &template, &client, Kind::File, x)
                .await?;
            return Ok(send(s, x, 200, list).await);
        };
        let record = self
            .state
            .lasting
            .files
            .file(&id)
            .filter(|f| f.owner.client.as_deref() == Some(client.as_str()))
            .ok_or_else(no_such_file)?;
        let up = request(&format!("{base}/files/{id}"), &record.owner.key)?;
        let answer = self.collect(generation, &up, x).await?;
        if method == http::Method::DELETE {
            self.state.lasting.shared.remove_file(&id);
        }
        Ok(send(s, x, 200, answer).await)
    }

    /// Records the file a finished upload made (Google's answer names it), with its owner.
    fn record_file(&self, answer: &[u8], owner: Owner) {
        let file = serde_json::from_slice::<Value>(answer).unwrap_or_default();
        let Some(name) = file.pointer("/file/name").and_then(Value::as_str) else {
            return;
        };
        let id = name.trim_start_matches("files/").to_owned();
        let expires_ms = file
            .pointer("/file/expirationTime")
            .and_then(Value::as_str)
            .and_then(crate::clock::parse_rfc3339)
            .unwrap_or_else(|| now_ms() + DEFAULT_LIFETIME_MS);
        tracing::info!(file = %id, key = %owner.key, "file uploaded");
        let record = FileRecord { owner, expires_ms };
        self.state.lasting.shared.add_file(id, record);
    }

    /// The pool index of the key that owns an upload or a file.
    fn owner_index(&self, generation: &Generation, key_id: &str) -> Result<usize, Refusal> {
        super::owned::owner_key(generation, key_id, Kind::File)
    }

    /// The key a request must use because it names a file uploaded through gemgate; `None`
    /// when it names none (or only files gemgate did not upload). A file of another client is
    /// answered 404, before anything is sent.
    pub(super) fn file_pin(
        &self,
        generation: &Generation,
        body: &[u8],
        client: Option<&str>,
    ) -> Result<Option<usize>, Refusal> {
        // Most gateways hold no uploads: then the body need not be parsed at all.
        if !self.state.lasting.shared.holds_files() {
            return Ok(None);
        }
        let mut pin = None;
        let shared = &self.state.lasting.shared;
        if let Some(cache) = named_cache(body)
            && shared.file(&Kind::Cache.record_id(&cache)).is_some()
        {
            pin = Some(self.owned(generation, Kind::Cache, &cache, client)?.1);
        }
        for id in named_files(body) {
            let Some(file) = self.state.lasting.shared.file(&id) else {
                continue;
            };
            if file.owner.client.is_none() || file.owner.client.as_deref() != client {
                return Err(no_such_file());
            }
            let index = super::owned::owner_key(generation, &file.owner.key, Kind::File)?;
            if pin.is_some_and(|p| p != index) {
                return Err(Refusal::Gate(GateError::new(
                    400,
                    "this request names files or cached contents held by different keys' projects: no key can use them together",
                )));
            }
            pin = Some(index);
        }
        Ok(pin)
    }
}

/// Where clients reach this gateway, for the links it hands out: `server.public_url` when set;
/// else the scheme the request came in with (a trusted proxy's `X-Forwarded-Proto`) and the
/// host a trusted proxy forwarded, or the `Host` the client sent when it names this gateway's
/// own address (or `localhost`), or else that address itself. A `Host` naming anything else
/// could be forged, and would send the upload somewhere else.
fn public_base(
    generation: &Generation,
    s: &ServerSession,
    peer: &crate::http::peer::Peer,
) -> String {
    if let Some(url) = &generation.config.public_url {
        return url.clone();
    }
    let scheme = if peer.https { "https" } else { "http" };
    let local = s.server_addr().and_then(|a| a.as_inet()).copied();
    let named = s
        .req_header()
        .headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .filter(|h| crate::http::peer::valid_authority(h))
        .filter(|h| names_this_gateway(h, local));
    let host = match (peer.forwarded_host.as_deref(), named, local) {
        (Some(forwarded), ..) => forwarded.to_owned(),
        (None, Some(host), _) => host.to_owned(),
        (None, None, Some(addr)) => addr.to_string(),
        (None, None, None) => "localhost".to_owned(),
    };
    format!("{scheme}://{host}")
}

/// Whether `host` (a `Host` value) names the address the connection came in on, or this machine
/// by its loopback names.
fn names_this_gateway(host: &str, local: Option<std::net::SocketAddr>) -> bool {
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    if name.eq_ignore_ascii_case("localhost") {
        return true;
    }
    match name.parse::<std::net::IpAddr>() {
        Ok(ip) => ip.is_loopback() || local.is_some_and(|l| l.ip() == ip),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_this_gateways_own_names_are_taken_from_host() {
        let local: Option<std::net::SocketAddr> = Some("10.1.2.3:8000".parse().unwrap());
        for ok in [
            "localhost:8000",
            "127.0.0.1:8000",
            "10.1.2.3:8000",
            "[::1]:8000",
        ] {
            assert!(names_this_gateway(ok, local), "{ok}");
        }
        for forged in ["evil.example", "evil.example:8000", "10.9.9.9:8000"] {
            assert!(!names_this_gateway(forged, local), "{forged}");
        }
    }
}
