//! Resources pinned to the key that made them — files, cached contents, batches, interactions,
//! ephemeral tokens — looked up and recorded through one registry (`keys::owners`).
//!
//! Every such resource lives at Google in the Cloud project of the key that created it, so a
//! call about it with another key gets Google's 403. gemgate answers instead, without a call to
//! Google: 404 to a client asking about a resource that is not its own (or not there, the same
//! answer so names cannot be probed), 410 naming the key when the key has left the pool. A key
//! disabled or cooling down is answered 503 with `Retry-After` by the attempt loop, which a
//! pinned request never leaves for another key.

use bytes::Bytes;
use pingora::protocols::http::ServerSession;
use serde_json::Value;

use super::{
    Exchange, Gateway, Generation, Refusal, UpstreamRequest, client_query, read_body,
    upstream_header,
};
use crate::clock::now_ms;
use crate::http::reply::GateError;
use crate::keys::owners::{FileRecord, Kind, Owner};

/// Upstream calls one list may make in all (pages of up to 1,000, over every key that holds some of
/// the client's): a client spreading its resources over many keys cannot make one request cost
/// more.
const MAX_LIST_CALLS: usize = 32;

/// The field of a list answer that holds the resources (a batch list is of operations).
fn list_field(kind: Kind) -> &'static str {
    match kind {
        Kind::Batch => "operations",
        kind => kind.collection(),
    }
}

/// The answer to a client asking about a resource that is not its own (or not there).
pub(super) fn not_found(kind: Kind) -> Refusal {
    Refusal::Gate(GateError::new(
        404,
        format!("no such {} made through this gateway", kind.what()),
    ))
}

/// The pool index of key `key_id`, which owns a resource of `kind`; a key that left the pool
/// is answered 410 naming it: the resource cannot be reached any more.
pub(super) fn owner_key(
    generation: &Generation,
    key_id: &str,
    kind: Kind,
) -> Result<usize, Refusal> {
    generation.pool.index_of(key_id).ok_or_else(|| {
        Refusal::Gate(GateError::new(
            410,
            format!(
                "this {}'s key {key_id} has left the pool: it cannot be reached any more",
                kind.what()
            ),
        ))
    })
}

impl Gateway {
    /// The start of a call on resources: the client admitted (its token checked, the method
    /// `checked`), the body read (of a `POST` or `PATCH`), and the upstream request made for
    /// `path` (under the base URL's version) with the client's query. Then [`Gateway::ask_plugins`].
    pub(super) async fn resource_call(
        &self,
        generation: &Generation,
        s: &mut ServerSession,
        (action, checked): (&'static str, http::Method),
        path: &str,
        x: &mut Exchange,
    ) -> Result<UpstreamRequest, Refusal> {
        self.admit(generation, s, checked, &mut x.meta)?;
        x.action = action.into();
        let body = match s.req_header().method {
            http::Method::POST | http::Method::PATCH => {
                read_body(s, generation.config.max_body_bytes).await?
            }
            _ => Bytes::new(),
        };
        let path = format!("{}/{path}", generation.target.base.path);
        let header = upstream_header(generation, s.req_header(), &path, &client_query(s))?;
        Ok(UpstreamRequest::new(header, body))
    }

    /// The `on_request` plugins' verdict on a call on resources (`model` is `""` but for a
    /// create): their headers go with it; they may not rewrite its model or body, which gemgate
    /// sends as they came.
    pub(super) async fn ask_plugins(
        &self,
        generation: &Generation,
        s: &ServerSession,
        model: &str,
        stream: bool,
        up: &mut UpstreamRequest,
        x: &Exchange,
    ) -> Result<(), Refusal> {
        let rewrite = self
            .on_request(generation, s, model, &x.action, stream, &x.meta)
            .await?;
        if rewrite.model.is_some() || rewrite.touches_body() {
            return Err(Refusal::Gate(GateError::new(
                500,
                format!(
                    "a plugin rewrote the model or body of {}, which gemgate sends unchanged",
                    x.action
                ),
            )));
        }
        for (name, value) in rewrite.headers {
            let _ = up.header.insert_header(name, value);
        }
        Ok(())
    }

    /// Resource `id` of `kind` (`batches/abc` or `abc`) when `client` owns it: its record and
    /// the pool index of its key.
    pub(super) fn owned(
        &self,
        generation: &Generation,
        kind: Kind,
        id: &str,
        client: Option<&str>,
    ) -> Result<(FileRecord, usize), Refusal> {
        let record = self
            .state
            .lasting
            .shared
            .file(&kind.record_id(id))
            .filter(|r| r.owner.client.is_some() && r.owner.client.as_deref() == client)
            .ok_or_else(|| not_found(kind))?;
        let index = owner_key(generation, &record.owner.key, kind)?;
        Ok((record, index))
    }

    /// Records resource `name` (`interactions/abc` or `abc`) of `kind`, made with `owner`'s key,
    /// until `expires_ms` (or `lifetime_ms` from now when Google did not say).
    pub(super) fn record_owned(
        &self,
        kind: Kind,
        name: &str,
        owner: Owner,
        expires_ms: Option<u64>,
        lifetime_ms: u64,
    ) {
        if name.is_empty() || owner.key.is_empty() {
            return;
        }
        let expires_ms = expires_ms.unwrap_or_else(|| now_ms() + lifetime_ms);
        let id = kind.record_id(name);
        tracing::info!(kind = kind.what(), %id, key = %owner.key, "resource recorded");
        let record = FileRecord { owner, expires_ms };
        self.state.lasting.shared.add_file(id, record);
    }

    /// Forgets a deleted resource.
    pub(super) fn forget_owned(&self, kind: Kind, id: &str) {
        self.state.lasting.shared.remove_file(&kind.record_id(id));
    }

    /// The client's resources of `kind`, all in one answer: each key that holds some is asked
    /// for its list (`template`'s path, every page), and only the client's are kept (the key's
    /// others are other clients').
    pub(super) async fn list_owned(
        &self,
        generation: &Generation,
        template: &UpstreamRequest,
        client: &str,
        kind: Kind,
        x: &mut Exchange,
    ) -> Result<Bytes, Refusal> {
        let field = list_field(kind);
        // Google's largest page: 100 files, 1,000 of the others.
        let page = if kind == Kind::File { 100 } else { 1000 };
        let collection = kind.collection();
        let mut all = Vec::new();
        let mut calls = 0;
        for (key, ids) in self.state.lasting.shared.files_of(client) {
            let mine: Vec<&str> = ids
                .iter()
                .filter_map(|id| match Kind::of_record(id) {
                    (k, id) if k == kind => Some(id),
                    _ => None,
                })
                .collect();
            // A key holding none of this kind, or gone from the pool, is skipped.
            let Some(index) = generation.pool.index_of(&key).filter(|_| !mine.is_empty()) else {
                continue;
            };
            let mut token: Option<String> = None;
            while calls < MAX_LIST_CALLS {
                calls += 1;
                let mut header = template.header.clone();
                let path = header.uri.path().to_owned();
                let uri = match &token {
                    Some(t) => format!(
                        "{path}?pageSize={page}&pageToken={}",
                        super::request::encode_query_value(t)
                    ),
                    None => format!("{path}?pageSize={page}"),
                };
                let Ok(uri) = uri.parse::<http::Uri>() else {
                    break;
                };
                header.set_uri(uri);
                let mut up = UpstreamRequest::new(header, Bytes::new());
                up.pinned = Some(index);
                up.surface = template.surface;
                let page = self.collect(generation, &up, x).await?;
                let Ok(Value::Object(mut v)) = serde_json::from_slice::<Value>(&page) else {
                    break;
                };
                if let Some(Value::Array(items)) = v.remove(field) {
                    all.extend(items.into_iter().filter(|item| {
                        item["name"]
                            .as_str()
                            .and_then(|n| n.strip_prefix(collection)?.strip_prefix('/'))
                            .is_some_and(|n| mine.contains(&n))
                    }));
                }
                token = v
                    .remove("nextPageToken")
                    .and_then(|t| t.as_str().map(str::to_owned))
                    .filter(|t| !t.is_empty());
                if token.is_none() {
                    break;
                }
            }
        }
        if calls >= MAX_LIST_CALLS {
            tracing::warn!(
                client,
                "a list of {collection} stopped at {MAX_LIST_CALLS} upstream calls"
            );
        }
        Ok(Bytes::from(serde_json::json!({ field: all }).to_string()))
    }
}
