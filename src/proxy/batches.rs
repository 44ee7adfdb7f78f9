//! The Batch API: `models/{model}:batchGenerateContent` makes a batch (of inline requests, or
//! of a file of them), `batches/{id}` gets, cancels or deletes it, `batches` lists the client's,
//! and `download/…/files/{id}:download` fetches its results file.
//!
//! A batch, like its results file, lives in the Cloud project of the key that made it: both are
//! recorded in the owner registry with that key and the client, and every later call about them
//! goes with that key. Batch jobs have quotas of their own: their requests are accounted under
//! the model `batch/{model}` (limits and cooldowns apart from the model's interactive ones), and
//! a batch's 429 never cools a key (see `attempt`).

use bytes::Bytes;
use pingora::protocols::http::ServerSession;
use serde_json::Value;

use super::calls::Verb;
use super::{
    Exchange, Gateway, Generation, Outcome, Refusal, Surface, UpstreamRequest, client_query,
    framing, send, upstream_header,
};
use crate::keys::owners::{Kind, Owner};

/// How long a batch is remembered: Google runs one for up to 48 hours, and keeps it (and its
/// results) for a while after.
const LIFETIME_MS: u64 = 30 * 24 * 3_600_000;
/// How long a batch's results file is remembered when Google does not say.
const RESULTS_LIFETIME_MS: u64 = crate::keys::owners::DEFAULT_LIFETIME_MS;

/// The model name a batch's requests are accounted under.
pub(super) fn batch_model(model: &str) -> String {
    format!("batch/{model}")
}

impl Gateway {
    /// The end of `models/{model}:batchGenerateContent` (checked, read and rewritten as any
    /// native call): sent on any key (or the key of the files it names), and the batch it
    /// makes recorded with that key.
    pub(super) async fn create_batch(
        &self,
        generation: &Generation,
        s: &mut ServerSession,
        mut up: UpstreamRequest,
        x: &mut Exchange,
    ) -> Result<Outcome, Refusal> {
        up.surface = Surface::Batch;
        up.idempotent = false;
        up.model = batch_model(&up.model);
        x.model.clone_from(&up.model);
        let answer = self.collect(generation, &up, x).await?;
        self.record_batch(&answer, self.owner_of(x));
        Ok(send(s, x, 200, answer).await)
    }

    /// `GET /v1beta/batches` (the client's own, from every key that holds some); `GET` or
    /// `DELETE /v1beta/batches/{id}`, `POST …/{id}:cancel`, with the key that owns it.
    pub(crate) async fn batches(
        &self,
        generation: &Generation,
        s: &mut ServerSession,
        id: Option<String>,
        verb: Verb,
        x: &mut Exchange,
    ) -> Result<Outcome, Refusal> {
        use http::Method as M;
        let method = s.req_header().method.clone();
        let (action, checked) = match (&id, verb, &method) {
            (None, ..) => ("batches.list", M::GET),
            (Some(_), Verb::Cancel, _) => ("batches.cancel", M::POST),
            (Some(_), Verb::None, &M::DELETE) => ("batches.delete", M::DELETE),
            (Some(_), Verb::None, _) => ("batches.get", M::GET),
        };
        let path = match (&id, verb) {
            (None, _) => "batches".to_owned(),
            (Some(id), Verb::None) => format!("batches/{id}"),
            (Some(id), Verb::Cancel) => format!("batches/{id}:cancel"),
        };
        let mut up = self
            .resource_call(generation, s, (action, checked), &path, x)
            .await?;
        self.ask_plugins(generation, s, "", false, &mut up, x)
            .await?;
        // A cancel's body is empty; whatever came is not sent on.
        up.body = Bytes::new();
        up.surface = Surface::Batch;
        let client = x.meta.client().to_owned();
        let Some(id) = id else {
            let list = self
                .list_owned(generation, &up, &client, Kind::Batch, x)
                .await?;
            self.record_listed(&list);
            return Ok(send(s, x, 200, list).await);
        };
        let (record, index) = self.owned(generation, Kind::Batch, &id, Some(&client))?;
        up.pinned = Some(index);
        let answer = self.collect(generation, &up, x).await?;
        match (&method, verb) {
            (&M::DELETE, _) => self.forget_owned(Kind::Batch, &id),
            (&M::GET, _) => self.record_batch(&answer, record.owner),
            _ => {}
        }
        Ok(send(s, x, 200, answer).await)
    }

    /// `GET /download/v1beta/files/{id}:download?alt=media`: a file's bytes (a batch's
    /// results), relayed as they come with the key that owns the file.
    pub(crate) async fn download(
        &self,
        generation: &Generation,
        s: &mut ServerSession,
        id: &str,
        x: &mut Exchange,
    ) -> Result<Outcome, Refusal> {
        self.admit(generation, s, http::Method::GET, &mut x.meta)?;
        x.action = "files.download".into();
        let rewrite = self
            .on_request(generation, s, "", "files.download", false, &x.meta)
            .await?;
        let client = x.meta.client.clone();
        let (_, index) = self.owned(generation, Kind::File, id, client.as_deref())?;
        let query = client_query(s);
        let path = format!(
            "/download{}/files/{id}:download",
            generation.target.base.path
        );
        let mut header = upstream_header(generation, s.req_header(), &path, &query)?;
        for (name, value) in rewrite.headers {
            let _ = header.insert_header(name, value);
        }
        let up = UpstreamRequest {
            pinned: Some(index),
            surface: Surface::Batch,
            reframe: framing(false, false),
            ..UpstreamRequest::new(header, Bytes::new())
        };
        self.relay_or_send(generation, &up, s, x).await
    }

    /// Who made what this exchange made: its key and its client.
    pub(super) fn owner_of(&self, x: &Exchange) -> Owner {
        Owner {
            key: x.key.clone().unwrap_or_default(),
            client: x.meta.client.clone(),
        }
    }

    /// Records the results files of the batches a list shows (each with its batch's owner).
    fn record_listed(&self, list: &[u8]) {
        let Ok(list) = serde_json::from_slice::<Value>(list) else {
            return;
        };
        for batch in list["operations"].as_array().into_iter().flatten() {
            let owner = batch["name"]
                .as_str()
                .and_then(|n| self.state.lasting.shared.file(&Kind::Batch.record_id(n)));
            if let Some(record) = owner {
                self.record_batch_value(batch, record.owner);
            }
        }
    }

    /// Records the batch Google's answer describes (an operation named `batches/…`) and, once
    /// it has one, its results file, both with `owner`.
    fn record_batch(&self, answer: &[u8], owner: Owner) {
        if let Ok(batch) = serde_json::from_slice::<Value>(answer) {
            self.record_batch_value(&batch, owner);
        }
    }

    fn record_batch_value(&self, batch: &Value, owner: Owner) {
        let Some(name) = batch["name"].as_str().filter(|n| n.starts_with("batches/")) else {
            return;
        };
        let results = ["/metadata/output/responsesFile", "/response/responsesFile"]
            .iter()
            .find_map(|p| batch.pointer(p).and_then(Value::as_str));
        if let Some(file) = results.filter(|f| f.starts_with("files/"))
            && self.state.lasting.shared.file(file).is_none()
        {
            self.record_owned(Kind::File, file, owner.clone(), None, RESULTS_LIFETIME_MS);
        }
        if self
            .state
            .lasting
            .shared
            .file(&Kind::Batch.record_id(name))
            .is_none()
        {
            self.record_owned(Kind::Batch, name, owner, None, LIFETIME_MS);
        }
    }
}
